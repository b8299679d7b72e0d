//! The protobuf form of commands and updates (`agent.v1`).

use baton_proto::agent::v1 as pb;

use super::*;
use crate::host::InvalidField;
use crate::time::{from_duration, from_timestamp, to_duration, to_timestamp};

fn check_id(id: &str, field: &str) -> Result<(), InvalidField> {
    if id.is_empty() || id.len() > MAX_COMMAND_ID_LEN || id.chars().any(char::is_control) {
        return Err(InvalidField::new(
            field,
            "must be 1 to 128 printable characters",
        ));
    }
    Ok(())
}

impl From<&Command> for pb::Command {
    fn from(c: &Command) -> Self {
        Self {
            id: c.id.clone(),
            deadline: Some(to_timestamp(c.deadline)),
            kind: Some(match &c.kind {
                CommandKind::Noop => pb::command::Kind::Noop(pb::Noop {}),
                CommandKind::Stage {
                    service,
                    version,
                    manifest,
                    signature,
                } => pb::command::Kind::Stage(pb::Stage {
                    service: service.clone(),
                    version: version.clone(),
                    manifest: manifest.clone(),
                    signature: signature.clone(),
                }),
                CommandKind::Activate {
                    service,
                    version,
                    gate,
                    allow_downgrade,
                } => pb::command::Kind::Activate(pb::Activate {
                    service: service.clone(),
                    version: version.clone(),
                    min_healthy_time: Some(to_duration(gate.min_healthy_time)),
                    healthy_deadline: Some(to_duration(gate.healthy_deadline)),
                    allow_downgrade: *allow_downgrade,
                }),
                CommandKind::Rollback {
                    service,
                    version,
                    gate,
                } => pb::command::Kind::Rollback(pb::Rollback {
                    service: service.clone(),
                    version: version.clone(),
                    min_healthy_time: Some(to_duration(gate.min_healthy_time)),
                    healthy_deadline: Some(to_duration(gate.healthy_deadline)),
                }),
                CommandKind::Remove { service } => pb::command::Kind::Remove(pb::Remove {
                    service: service.clone(),
                }),
                CommandKind::Cancel { service } => pb::command::Kind::Cancel(pb::Cancel {
                    service: service.clone(),
                }),
            }),
            traffic: c.traffic.as_ref().map(traffic_to_wire),
        }
    }
}

/// A command the agent cannot run, with the id to report the failure under
/// (when the id itself is readable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnusableCommand {
    /// The command's id, if valid.
    pub id: Option<String>,
    /// Why it cannot run.
    pub reason: InvalidField,
}

impl TryFrom<pb::Command> for Command {
    type Error = UnusableCommand;
    fn try_from(c: pb::Command) -> Result<Self, Self::Error> {
        check_id(&c.id, "command.id").map_err(|reason| UnusableCommand { id: None, reason })?;
        let fail = |field: &str, why: &str| UnusableCommand {
            id: Some(c.id.clone()),
            reason: InvalidField::new(field, why),
        };
        let deadline = c
            .deadline
            .as_ref()
            .and_then(from_timestamp)
            .ok_or_else(|| fail("command.deadline", "missing or invalid"))?;
        let kind = match c.kind {
            Some(pb::command::Kind::Noop(_)) => CommandKind::Noop,
            Some(pb::command::Kind::Stage(k)) => CommandKind::Stage {
                service: k.service,
                version: k.version,
                manifest: k.manifest,
                signature: k.signature,
            },
            Some(pb::command::Kind::Activate(k)) => CommandKind::Activate {
                service: k.service,
                version: k.version,
                gate: gate(k.min_healthy_time, k.healthy_deadline).ok_or_else(|| {
                    fail(
                        "command.activate",
                        "min_healthy_time and healthy_deadline are required, the deadline at most 24h and not shorter",
                    )
                })?,
                allow_downgrade: k.allow_downgrade,
            },
            Some(pb::command::Kind::Rollback(k)) => CommandKind::Rollback {
                service: k.service,
                version: k.version,
                gate: gate(k.min_healthy_time, k.healthy_deadline).ok_or_else(|| {
                    fail(
                        "command.rollback",
                        "min_healthy_time and healthy_deadline are required, the deadline at most 24h and not shorter",
                    )
                })?,
            },
            Some(pb::command::Kind::Remove(k)) => CommandKind::Remove { service: k.service },
            Some(pb::command::Kind::Cancel(k)) => CommandKind::Cancel { service: k.service },
            None => {
                return Err(fail(
                    "command.kind",
                    "unknown to this agent (is the agent older than the coordinator?)",
                ));
            }
        };
        let traffic = match c.traffic {
            None => None,
            Some(t) => Some(traffic_from_wire(t).map_err(|why| fail("command.traffic", &why))?),
        };
        if traffic.is_some()
            && !matches!(
                kind,
                CommandKind::Activate { .. }
                    | CommandKind::Rollback { .. }
                    | CommandKind::Remove { .. }
            )
        {
            return Err(fail(
                "command.traffic",
                "only an activate, rollback or remove drains a host",
            ));
        }
        Ok(Self {
            id: c.id,
            deadline,
            kind,
            traffic,
        })
    }
}

/// A health gate from the wire: both durations present, the deadline at
/// most [`MAX_HEALTHY_DEADLINE`] and longer than `min_healthy_time`.
fn gate(
    min_healthy_time: Option<prost_types::Duration>,
    healthy_deadline: Option<prost_types::Duration>,
) -> Option<HealthGate> {
    let gate = HealthGate {
        min_healthy_time: from_duration(&min_healthy_time?)?,
        healthy_deadline: from_duration(&healthy_deadline?)?,
    };
    (gate.healthy_deadline <= MAX_HEALTHY_DEADLINE
        && gate.min_healthy_time <= gate.healthy_deadline)
        .then_some(gate)
}

impl From<&CommandUpdate> for pb::CommandUpdate {
    fn from(u: &CommandUpdate) -> Self {
        let (phase, outcome) = match u.phase {
            Phase::Accepted => (pb::CommandPhase::Accepted, pb::CommandOutcome::Unspecified),
            Phase::Running => (pb::CommandPhase::Running, pb::CommandOutcome::Unspecified),
            Phase::Done(Outcome::Succeeded) => {
                (pb::CommandPhase::Done, pb::CommandOutcome::Succeeded)
            }
            Phase::Done(Outcome::Failed) => (pb::CommandPhase::Done, pb::CommandOutcome::Failed),
        };
        Self {
            command_id: u.command_id.clone(),
            phase: phase.into(),
            progress_percent: u.progress_percent,
            outcome: outcome.into(),
            error: u.error.clone(),
            health_wait: u.health_wait.map(to_duration),
            failure: u
                .failure
                .map_or(pb::FailureKind::Unspecified, pb::FailureKind::from)
                .into(),
            probe: u.detail.probe.clone(),
            log_tail: u.detail.log_tail.clone(),
            connections_cut: u.connections_cut,
        }
    }
}

impl From<FailureKind> for pb::FailureKind {
    fn from(k: FailureKind) -> Self {
        match k {
            FailureKind::Invalid => Self::Invalid,
            FailureKind::Late => Self::Late,
            FailureKind::Refused => Self::Refused,
            FailureKind::Signature => Self::Signature,
            FailureKind::Download => Self::Download,
            FailureKind::Disk => Self::Disk,
            FailureKind::NotStaged => Self::NotStaged,
            FailureKind::Hook => Self::Hook,
            FailureKind::Start => Self::Start,
            FailureKind::NotReady => Self::NotReady,
            FailureKind::NotHealthy => Self::NotHealthy,
            FailureKind::StopTimeout => Self::StopTimeout,
            FailureKind::Cancelled => Self::Cancelled,
            FailureKind::Internal => Self::Internal,
            FailureKind::Gone => Self::Gone,
            FailureKind::Analysis => Self::Analysis,
            FailureKind::Traffic => Self::Traffic,
        }
    }
}

/// The kind of a wire value: `None` for unspecified (success, or an older
/// agent); a value this coordinator does not know (a newer agent) is
/// `Internal`, never a refusal of the whole update.
pub fn failure_kind(value: i32) -> Option<FailureKind> {
    match pb::FailureKind::try_from(value) {
        Ok(pb::FailureKind::Unspecified) => None,
        Ok(known) => FailureKind::ALL
            .into_iter()
            .find(|k| pb::FailureKind::from(*k) == known),
        Err(_) => Some(FailureKind::Internal),
    }
}

impl TryFrom<pb::CommandUpdate> for CommandUpdate {
    type Error = InvalidField;
    fn try_from(u: pb::CommandUpdate) -> Result<Self, Self::Error> {
        check_id(&u.command_id, "command_update.command_id")?;
        let outcome = pb::CommandOutcome::try_from(u.outcome).map_err(|_| {
            InvalidField::new(
                "command_update.outcome",
                format!("unknown outcome {}", u.outcome),
            )
        })?;
        let phase = match (pb::CommandPhase::try_from(u.phase), outcome) {
            (Ok(pb::CommandPhase::Accepted), pb::CommandOutcome::Unspecified) => Phase::Accepted,
            (Ok(pb::CommandPhase::Running), pb::CommandOutcome::Unspecified) => Phase::Running,
            (Ok(pb::CommandPhase::Done), pb::CommandOutcome::Succeeded) => {
                Phase::Done(Outcome::Succeeded)
            }
            (Ok(pb::CommandPhase::Done), pb::CommandOutcome::Failed) => {
                Phase::Done(Outcome::Failed)
            }
            (Ok(pb::CommandPhase::Done), _) => {
                return Err(InvalidField::new(
                    "command_update.outcome",
                    "a finished command needs an outcome",
                ));
            }
            (Ok(pb::CommandPhase::Accepted | pb::CommandPhase::Running), _) => {
                return Err(InvalidField::new(
                    "command_update.outcome",
                    "only a finished command has an outcome",
                ));
            }
            (Ok(pb::CommandPhase::Unspecified) | Err(_), _) => {
                return Err(InvalidField::new(
                    "command_update.phase",
                    format!("unknown or unspecified phase {}", u.phase),
                ));
            }
        };
        if u.progress_percent > 100 {
            return Err(InvalidField::new(
                "command_update.progress_percent",
                "must be at most 100",
            ));
        }
        Ok(Self {
            command_id: u.command_id,
            phase,
            progress_percent: u.progress_percent,
            error: crate::text::prefix(&u.error, MAX_UPDATE_ERROR_CHARS),
            // An unusable duration is dropped: it only feeds a metric.
            health_wait: u.health_wait.as_ref().and_then(from_duration),
            // Only a failure has a kind; only the coordinator decides that
            // a host was gone, and an agent saying so of itself is not
            // believed.
            failure: match phase {
                Phase::Done(Outcome::Failed) => failure_kind(u.failure).map(|k| match k {
                    FailureKind::Gone | FailureKind::Analysis => FailureKind::Internal,
                    other => other,
                }),
                _ => None,
            },
            // Bounded whatever the agent sent.
            detail: FailureDetail::new(&u.probe, &u.log_tail),
            connections_cut: u.connections_cut.min(MAX_CONNECTIONS_CUT),
        })
    }
}

fn traffic_to_wire(t: &crate::traffic::Traffic) -> pb::Traffic {
    use crate::traffic::Balancer;
    pb::Traffic {
        balancer: Some(match &t.balancer {
            Balancer::Haproxy {
                socket,
                backend,
                server,
            } => pb::traffic::Balancer::Haproxy(pb::HaproxyBalancer {
                socket: socket.clone(),
                backend: backend.clone(),
                server: server.clone(),
            }),
            Balancer::Exec {
                drain,
                ready,
                connections,
            } => pb::traffic::Balancer::Exec(pb::ExecBalancer {
                drain: drain.clone(),
                ready: ready.clone(),
                connections: connections.clone(),
            }),
        }),
        drain_timeout: Some(to_duration(t.drain_timeout)),
    }
}

/// Traffic on the wire is always the agent's to run.
fn traffic_from_wire(t: pb::Traffic) -> Result<crate::traffic::Traffic, String> {
    use crate::traffic::{Balancer, RunOn, Traffic};
    let balancer = match t.balancer {
        Some(pb::traffic::Balancer::Haproxy(h)) => Balancer::Haproxy {
            socket: h.socket,
            backend: h.backend,
            server: h.server,
        },
        Some(pb::traffic::Balancer::Exec(e)) => Balancer::Exec {
            drain: e.drain,
            ready: e.ready,
            connections: e.connections,
        },
        None => return Err("no balancer (an unknown kind from a newer coordinator?)".into()),
    };
    let drain_timeout = t
        .drain_timeout
        .as_ref()
        .and_then(from_duration)
        .ok_or("drain_timeout is missing or invalid")?;
    let traffic = Traffic {
        balancer,
        drain_timeout,
        run_on: RunOn::Agent,
    };
    traffic.validate()?;
    Ok(traffic)
}
