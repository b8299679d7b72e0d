//! A no-op command down every selected agent's stream at once, timed
//! until every answer is back: how an operator checks that the whole fleet
//! answers (`baton ping`), and what the fan-out benchmark measures.
//!
//! The hosts come from one question to the registry; each command goes
//! straight into its stream's channel (a full channel gets its own task,
//! so one slow agent does not hold up the rest); the answers come back on
//! a channel of this ping's own (`FleetHandle::ping_answers`), registered
//! before the first command leaves and never shared with the rollouts'
//! command-update broadcast.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use baton_common::command::{Command, CommandKind, Outcome, Phase};
use baton_common::host::{HostId, Labels};
use baton_proto::agent::v1::{CoordinatorMessage, coordinator_message};
use tokio::sync::mpsc::error::TrySendError;
use tracing::debug;

use crate::fleet::{FleetHandle, FleetStopped};

const CLOSED: &str = "its stream closed before the ping was sent";
const FULL: &str = "its stream stayed full until the timeout: the agent is not reading";

/// One host's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPing {
    /// The host.
    pub host: HostId,
    /// From the start of the fan-out until its answer, if it answered.
    pub answered_after: Option<Duration>,
    /// Why there is no successful answer.
    pub error: Option<String>,
}

/// What a ping found.
#[derive(Debug, Clone)]
pub struct PingReport {
    /// Every selected host, sorted by host id.
    pub hosts: Vec<HostPing>,
    /// From the first command until the last answer or the timeout.
    pub elapsed: Duration,
}

/// Pings every host whose labels include `labels`, waiting at most
/// `timeout` for the answers.
pub async fn ping(
    fleet: &FleetHandle,
    labels: Labels,
    timeout: Duration,
) -> Result<PingReport, FleetStopped> {
    let mut answers = fleet.ping_answers();
    let targets = fleet.senders(labels).await?;
    let started = Instant::now();
    let give_up = tokio::time::Instant::from_std(started) + timeout;
    let deadline = baton_common::time::later(SystemTime::now(), timeout);
    let mut hosts = Vec::with_capacity(targets.len());
    let mut waiting = HashMap::with_capacity(targets.len());
    let mut queued = tokio::task::JoinSet::new();
    for (i, (host, sender)) in targets.into_iter().enumerate() {
        let Some(sender) = sender else {
            hosts.push(HostPing {
                host,
                answered_after: None,
                error: Some("not connected".into()),
            });
            continue;
        };
        let id = answers.command_id(i);
        let message = Box::new(CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Command(
                (&Command {
                    id: id.clone(),
                    deadline,
                    kind: CommandKind::Noop,
                    traffic: None,
                })
                    .into(),
            )),
        });
        let index = hosts.len();
        let mut error = None;
        match sender.try_send(Ok(message)) {
            Ok(()) => {
                waiting.insert(id, index);
            }
            Err(TrySendError::Full(message)) => {
                waiting.insert(id, index);
                queued.spawn(async move {
                    let sent = match tokio::time::timeout_at(give_up, sender.send(message)).await {
                        Ok(Ok(())) => None,
                        Ok(Err(_)) => Some(CLOSED),
                        Err(_) => Some(FULL),
                    };
                    (index, sent)
                });
            }
            Err(TrySendError::Closed(_)) => error = Some(CLOSED.to_owned()),
        }
        hosts.push(HostPing {
            host,
            answered_after: None,
            error,
        });
    }
    debug!(hosts = hosts.len(), "pings sent");

    while !waiting.is_empty() {
        tokio::select! {
            Some(Ok((index, Some(why)))) = queued.join_next(), if !queued.is_empty() => {
                waiting.retain(|_, i| *i != index);
                hosts[index].error = Some(why.into());
            }
            next = tokio::time::timeout_at(give_up, answers.recv()) => match next {
                Err(_) => break,
                Ok(None) => return Err(FleetStopped),
                Ok(Some((host, update))) => {
                    let Phase::Done(outcome) = update.phase else {
                        continue;
                    };
                    let Some(index) = waiting.remove(&update.command_id) else {
                        continue;
                    };
                    // An answer from another host than the one asked is
                    // not an answer.
                    if hosts[index].host != host {
                        waiting.insert(update.command_id, index);
                        continue;
                    }
                    hosts[index].answered_after = Some(started.elapsed());
                    if outcome == Outcome::Failed {
                        hosts[index].error = Some(update.error);
                    }
                }
            },
        }
    }
    let elapsed = started.elapsed();
    queued.abort_all();
    for index in waiting.into_values() {
        hosts[index].error = Some(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        ));
    }
    Ok(PingReport { hosts, elapsed })
}
