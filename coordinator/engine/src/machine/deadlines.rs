//! Deadlines: a host away too long while it activates, a command's own
//! deadline, and a rollout that stopped making progress.

use std::time::{Duration, SystemTime};

use baton_common::command::{CommandKind, FailureKind};
use baton_common::host::HostId;
use baton_common::time::later;

use super::{
    AGENT_RETURN_GRACE, Action, COMMAND_SLACK, HostState, Rollout, ServiceRun, ServiceState, State,
    fail,
};

/// A host activating whose agent has been away longer than the service's
/// `healthy_deadline` has failed: it counts against `max_failures` (and,
/// being disconnected, against `min_healthy` all along). Its late answer,
/// if it ever comes, is ignored; a rollback reaches it when it returns.
pub(super) fn gone_hosts_fail(r: &mut Rollout, now: SystemTime) {
    if r.away.is_empty() {
        return;
    }
    let away: Vec<HostId> = r.away.iter().cloned().collect();
    for s in &mut r.services {
        let deadline = gone_deadline(s);
        for id in &away {
            let Some(h) = s.hosts.get(id) else { continue };
            if h.connected {
                continue;
            }
            let since = h.gone_since.unwrap_or(now);
            let gone = now.duration_since(since).unwrap_or_default();
            let fails = h.state == HostState::Activating && gone >= deadline;
            if h.gone_since.is_some() && !fails {
                continue;
            }
            let Some(h) = s.host_mut(id) else { continue };
            h.gone_since = Some(since);
            if fails {
                h.state = HostState::Failed;
                h.outstanding = None;
                h.finished_at = Some(now);
                h.error = Some(format!(
                    "the host was gone for {}, longer than healthy_deadline",
                    humantime::format_duration(gone)
                ));
                h.failure = Some(FailureKind::Gone);
                s.failures = s.failures.saturating_add(1);
            }
        }
    }
}

/// How long a host of `s` may be away while it activates.
pub(super) fn gone_deadline(s: &ServiceRun) -> Duration {
    let deadline = s.gate.healthy_deadline;
    if s.name == baton_common::names::AGENT_NAME {
        // An agent upgrading itself leaves on purpose; its watchdog
        // decides within healthy_deadline and the agent then running
        // reconnects and reports.
        deadline.saturating_add(AGENT_RETURN_GRACE)
    } else {
        deadline
    }
}

/// When a command sent now must have finished.
/// A command's deadline for service `si`: a host behind a balancer also
/// gets its drain, and the wait for the balancer to report it up again.
pub(super) fn deadline_of(
    r: &Rollout,
    si: usize,
    kind: &CommandKind,
    now: SystemTime,
) -> SystemTime {
    let base = deadline_for(r, kind, now);
    let traffic = r.services.get(si).and_then(|s| s.traffic.as_ref());
    match (traffic, kind) {
        (Some(t), CommandKind::Activate { gate, .. } | CommandKind::Rollback { gate, .. }) => {
            later(base, t.drain_timeout.saturating_add(gate.healthy_deadline))
        }
        (Some(t), CommandKind::Remove { .. }) => later(base, t.drain_timeout),
        _ => base,
    }
}

pub(super) fn deadline_for(r: &Rollout, kind: &CommandKind, now: SystemTime) -> SystemTime {
    match kind {
        CommandKind::Stage { .. } => later(now, r.progress_deadline),
        CommandKind::Noop | CommandKind::Remove { .. } | CommandKind::Cancel { .. } => {
            later(now, COMMAND_SLACK)
        }
        CommandKind::Activate { gate, .. } | CommandKind::Rollback { gate, .. } => {
            later(now, gate.healthy_deadline.saturating_add(COMMAND_SLACK))
        }
    }
}

pub(super) fn check_progress(r: &mut Rollout, now: SystemTime, actions: &mut Vec<Action>) {
    let stalled = now
        .duration_since(r.progress_at)
        .is_ok_and(|d| d >= r.progress_deadline);
    // Waiting for a promote or in a planned pause is not a stall: the
    // deadline only runs while some service has work in hand (or staging).
    let working = r.state == State::Staging
        || r.services.iter().any(|s| {
            s.state == ServiceState::Progressing && s.step_done_at.is_none() && s.bake.is_none()
        });
    if stalled && working && r.held.is_none() {
        let what = if r.state == State::Staging {
            "staging did not finish"
        } else {
            "no host turned healthy"
        };
        // Which hosts it waited on, and on what: the cause is there.
        let waiting: Vec<String> = r
            .services
            .iter()
            .flat_map(|s| {
                s.hosts.iter().filter_map(move |(id, h)| {
                    let kind = h.outstanding.as_ref()?.kind.name();
                    let since = h
                        .started_at
                        .and_then(|t| now.duration_since(t).ok())
                        .map(|d| {
                            format!(
                                " for {}",
                                humantime::format_duration(Duration::from_secs(d.as_secs()))
                            )
                        })
                        .unwrap_or_default();
                    let away = if h.connected { "" } else { ", disconnected" };
                    Some(format!("{} on {id} ({kind}{since}{away})", s.name))
                })
            })
            .take(10)
            .collect();
        let waiting = if waiting.is_empty() {
            String::new()
        } else {
            format!("; still waiting on {}", waiting.join(", "))
        };
        fail(
            r,
            format!(
                "{what} within progress_deadline {}{waiting}",
                humantime::format_duration(r.progress_deadline)
            ),
            now,
            actions,
        );
    }
}
