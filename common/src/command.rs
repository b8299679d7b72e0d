//! Commands from the coordinator to an agent and the agent's updates about
//! them, as domain types; their protobuf form is in `wire`.

use std::time::{Duration, SystemTime};

/// The longest command id accepted.
pub const MAX_COMMAND_ID_LEN: usize = 128;
/// The longest `healthy_deadline` (and so `min_healthy_time`) of a health
/// gate, in plans and on the wire.
pub const MAX_HEALTHY_DEADLINE: Duration = Duration::from_secs(24 * 3600);
/// The longest error text an update carries; longer ones are cut (the
/// start says what failed; a hook's full output stays in the host's log).
pub const MAX_UPDATE_ERROR_CHARS: usize = 4096;
/// The most connections one update may say were cut (more is a lie).
pub const MAX_CONNECTIONS_CUT: u32 = 10_000_000;

/// Work for an agent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Command {
    /// Unique per command.
    pub id: String,
    /// When it must have finished.
    pub deadline: SystemTime,
    /// What to do.
    pub kind: CommandKind,
    /// The load balancer to drain the host from around it (`Activate`,
    /// `Rollback` and `Remove` of a service with `[service.traffic]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<crate::traffic::Traffic>,
}

/// What a command asks for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Nothing: succeed at once.
    Noop,
    /// Download, verify and unpack a release; nothing runs.
    Stage {
        /// The service.
        service: String,
        /// The release.
        version: String,
        /// The manifest exactly as signed.
        manifest: Vec<u8>,
        /// The signature over `manifest`.
        signature: Vec<u8>,
    },
    /// Make a staged release current and wait until it is healthy.
    Activate {
        /// The service.
        service: String,
        /// The staged release.
        version: String,
        /// The health gate.
        gate: HealthGate,
        /// A lower version than the current one may be activated (the
        /// plan's `allow_downgrade`), if the host still has it.
        allow_downgrade: bool,
    },
    /// Return to a release the host ran before and wait until healthy.
    Rollback {
        /// The service.
        service: String,
        /// The release to return to.
        version: String,
        /// The health gate.
        gate: HealthGate,
    },
    /// Stop the service and delete it with its releases.
    Remove {
        /// The service.
        service: String,
    },
    /// Stop the service's activations in flight (an aborted rollout).
    Cancel {
        /// The service.
        service: String,
    },
}

impl CommandKind {
    /// The service a command is about, if any.
    pub fn service(&self) -> Option<&str> {
        match self {
            Self::Noop => None,
            Self::Stage { service, .. }
            | Self::Activate { service, .. }
            | Self::Rollback { service, .. }
            | Self::Remove { service }
            | Self::Cancel { service } => Some(service),
        }
    }

    /// A short name for logs: `stage`, `activate`, …
    pub fn name(&self) -> &'static str {
        match self {
            Self::Noop => "noop",
            Self::Stage { .. } => "stage",
            Self::Activate { .. } => "activate",
            Self::Rollback { .. } => "rollback",
            Self::Remove { .. } => "remove",
            Self::Cancel { .. } => "cancel",
        }
    }
}

/// When a freshly started release counts as healthy, and when as failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthGate {
    /// Health checks must pass continuously this long.
    #[serde(with = "humantime_serde")]
    pub min_healthy_time: Duration,
    /// Not healthy this long after the start: failed.
    #[serde(with = "humantime_serde")]
    pub healthy_deadline: Duration,
}

/// Where a command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Received, not started.
    Accepted,
    /// Running.
    Running,
    /// Finished.
    Done(Outcome),
}

/// How a finished command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It did what it was asked.
    Succeeded,
    /// It did not.
    Failed,
}

/// The kind of a command's failure: what the state machine, the CLI, the
/// dashboard and the metrics can act on (the update's `error` says the
/// details). Names in JSON and metrics are the snake_case ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The command cannot run here: a malformed name or version, or an
    /// agent asked to remove itself.
    Invalid,
    /// Its deadline passed before it started.
    Late,
    /// A downgrade the plan did not allow, or a version below the highest
    /// the host ran.
    Refused,
    /// The manifest is malformed, for another artifact, expired, or not
    /// signed by a trusted key.
    Signature,
    /// The payload could not be fetched, or did not match its digest.
    Download,
    /// Unpacking or writing on the host failed.
    Disk,
    /// The release to activate is not staged on the host.
    NotStaged,
    /// A hook failed.
    Hook,
    /// The process could not be started, or exited while starting.
    Start,
    /// The process did not report readiness in time.
    NotReady,
    /// The health check did not pass within `healthy_deadline`.
    NotHealthy,
    /// The old process did not stop within `stop_timeout`.
    StopTimeout,
    /// An abort cancelled it.
    Cancelled,
    /// The host's agent was away longer than `healthy_deadline` while it
    /// activated: decided by the coordinator, never sent by an agent.
    Gone,
    /// The host ran the new version healthy, and an analysis of it failed
    /// (or was inconclusive with `on_inconclusive = "fail"`): decided by
    /// the coordinator, never sent by an agent.
    Analysis,
    /// The load balancer could not drain the host or put it back.
    Traffic,
    /// Anything else; also what a kind written by a newer version reads
    /// as.
    #[serde(other)]
    Internal,
}

impl FailureKind {
    /// Every kind.
    pub const ALL: [Self; 17] = [
        Self::Invalid,
        Self::Late,
        Self::Refused,
        Self::Signature,
        Self::Download,
        Self::Disk,
        Self::NotStaged,
        Self::Hook,
        Self::Start,
        Self::NotReady,
        Self::NotHealthy,
        Self::StopTimeout,
        Self::Cancelled,
        Self::Gone,
        Self::Analysis,
        Self::Traffic,
        Self::Internal,
    ];

    /// The name in JSON, tables and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Late => "late",
            Self::Refused => "refused",
            Self::Signature => "signature",
            Self::Download => "download",
            Self::Disk => "disk",
            Self::NotStaged => "not_staged",
            Self::Hook => "hook",
            Self::Start => "start",
            Self::NotReady => "not_ready",
            Self::NotHealthy => "not_healthy",
            Self::StopTimeout => "stop_timeout",
            Self::Cancelled => "cancelled",
            Self::Internal => "internal",
            Self::Gone => "gone",
            Self::Analysis => "analysis",
            Self::Traffic => "traffic",
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The most characters of a failing probe's answer a failure carries.
pub const MAX_PROBE_CHARS: usize = 512;
/// The most bytes of a service's log a failure carries (its end).
pub const MAX_LOG_TAIL_BYTES: usize = 4096;

/// What an operator needs to see of a failed activation beyond its error:
/// the failing health probe's last answer and the last lines the service
/// logged. Both bounded and without control characters but newlines and
/// tabs; empty when there is nothing to show.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FailureDetail {
    /// The last health check's answer (e.g. `GET … returned 503: body`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub probe: String,
    /// The end of the service's log, whole lines.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub log_tail: String,
}

impl FailureDetail {
    /// Both parts, cleaned and cut to their bounds (the log from its end).
    pub fn new(probe: &str, log_tail: &str) -> Self {
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_control() && c != '\n' && c != '\t' {
                        '?'
                    } else {
                        c
                    }
                })
                .collect()
        };
        let probe = crate::text::prefix(&clean(probe), MAX_PROBE_CHARS);
        let mut tail = clean(log_tail);
        if tail.len() > MAX_LOG_TAIL_BYTES {
            let mut cut = tail.len() - MAX_LOG_TAIL_BYTES;
            while !tail.is_char_boundary(cut) {
                cut += 1;
            }
            // From the first whole line in what is kept.
            let from = tail[cut..].find('\n').map_or(cut, |i| cut + i + 1);
            tail = tail[from..].to_owned();
        }
        Self {
            probe,
            log_tail: tail.trim_end().to_owned(),
        }
    }

    /// Nothing to show.
    pub fn is_empty(&self) -> bool {
        self.probe.is_empty() && self.log_tail.is_empty()
    }
}

/// An agent's report about one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandUpdate {
    /// The command.
    pub command_id: String,
    /// Where it is.
    pub phase: Phase,
    /// 0–100 within the phase.
    pub progress_percent: u32,
    /// Why it failed, when it did.
    pub error: String,
    /// How long a finished activation's health gate took.
    pub health_wait: Option<Duration>,
    /// The kind of failure, when it failed and the agent said (agents
    /// older than the field do not).
    pub failure: Option<FailureKind>,
    /// A failed activation's probe answer and log tail.
    pub detail: FailureDetail,
    /// Connections the command had to cut (a drain past its
    /// `drain_timeout`, an old process stopped at its `stop_timeout`).
    pub connections_cut: u32,
}

impl CommandUpdate {
    /// A final update.
    pub fn done(command_id: &str, outcome: Outcome, error: impl Into<String>) -> Self {
        Self {
            command_id: command_id.to_owned(),
            phase: Phase::Done(outcome),
            progress_percent: 100,
            error: error.into(),
            health_wait: None,
            failure: None,
            detail: FailureDetail::default(),
            connections_cut: 0,
        }
    }

    /// A final update of a command that failed, and why.
    pub fn failed(command_id: &str, kind: FailureKind, error: impl Into<String>) -> Self {
        Self {
            failure: Some(kind),
            ..Self::done(command_id, Outcome::Failed, error)
        }
    }
}

/// The protobuf form.
#[cfg(feature = "wire")]
mod wire;
#[cfg(feature = "wire")]
pub use wire::*;

#[cfg(all(test, feature = "wire"))]
mod tests {
    use super::*;
    use baton_proto::agent::v1 as pb;

    #[test]
    fn updates_round_trip_and_bad_ones_are_refused() {
        let done = CommandUpdate::done("c1", Outcome::Failed, "boom");
        assert_eq!(
            CommandUpdate::try_from(pb::CommandUpdate::from(&done)).unwrap(),
            done
        );

        let mut zero = pb::CommandUpdate::from(&done);
        zero.phase = 0;
        assert_eq!(
            CommandUpdate::try_from(zero).unwrap_err().field,
            "command_update.phase"
        );
        let mut no_outcome = pb::CommandUpdate::from(&done);
        no_outcome.outcome = 0;
        assert_eq!(
            CommandUpdate::try_from(no_outcome).unwrap_err().field,
            "command_update.outcome"
        );
    }

    #[test]
    fn failure_kinds_cross_the_wire_and_only_on_a_failure() {
        for kind in FailureKind::ALL {
            let failed = CommandUpdate::failed("c1", kind, "why");
            let back = CommandUpdate::try_from(pb::CommandUpdate::from(&failed)).unwrap();
            // An agent cannot claim the coordinator's own verdict.
            let expected = if matches!(kind, FailureKind::Gone | FailureKind::Analysis) {
                FailureKind::Internal
            } else {
                kind
            };
            assert_eq!(back.failure, Some(expected));
            assert_eq!(failure_kind(pb::FailureKind::from(kind).into()), Some(kind));
            // The JSON name is the metric label and the CLI's word.
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::from(kind.as_str())
            );
        }
        // An older agent says nothing; a newer one says what this
        // coordinator does not know, which is never a refusal.
        let mut wire =
            pb::CommandUpdate::from(&CommandUpdate::failed("c1", FailureKind::Hook, "why"));
        wire.failure = 0;
        assert_eq!(CommandUpdate::try_from(wire.clone()).unwrap().failure, None);
        wire.failure = 999;
        assert_eq!(
            CommandUpdate::try_from(wire.clone()).unwrap().failure,
            Some(FailureKind::Internal)
        );
        // A success has no kind, whatever the wire says.
        let mut ok = pb::CommandUpdate::from(&CommandUpdate::done("c1", Outcome::Succeeded, ""));
        ok.failure = pb::FailureKind::Hook.into();
        assert_eq!(CommandUpdate::try_from(ok).unwrap().failure, None);
        // A kind stored by a newer version reads as internal.
        assert_eq!(
            serde_json::from_str::<FailureKind>("\"meteor\"").unwrap(),
            FailureKind::Internal
        );
    }

    #[test]
    fn a_command_of_unknown_kind_keeps_its_id_for_the_failure_report() {
        let cmd = Command {
            id: "c1".into(),
            deadline: SystemTime::now(),
            kind: CommandKind::Noop,
            traffic: None,
        };
        let mut wire = pb::Command::from(&cmd);
        assert_eq!(Command::try_from(wire.clone()).unwrap().id, "c1");
        wire.kind = None;
        let err = Command::try_from(wire).unwrap_err();
        assert_eq!(err.id.as_deref(), Some("c1"));
        assert_eq!(err.reason.field, "command.kind");
    }

    #[test]
    fn traffic_goes_over_the_wire_bounded_and_only_with_a_swap() {
        use crate::traffic::{Balancer, RunOn, Traffic};
        let traffic = Traffic {
            balancer: Balancer::Haproxy {
                socket: "/run/haproxy/admin.sock".into(),
                backend: "web".into(),
                server: "${BATON_HOST_ID}".into(),
            },
            drain_timeout: Duration::from_secs(30),
            run_on: RunOn::Agent,
        };
        let cmd = Command {
            id: "c1".into(),
            deadline: SystemTime::now(),
            kind: CommandKind::Remove {
                service: "web".into(),
            },
            traffic: Some(traffic.clone()),
        };
        let wire = pb::Command::from(&cmd);
        assert_eq!(Command::try_from(wire.clone()).unwrap(), cmd);
        // Not around a command that swaps nothing.
        let mut noop = wire.clone();
        noop.kind = Some(pb::command::Kind::Noop(pb::Noop {}));
        let err = Command::try_from(noop).unwrap_err();
        assert_eq!(err.reason.field, "command.traffic");
        // Bounded like a plan's.
        let mut long = wire.clone();
        if let Some(t) = &mut long.traffic {
            t.drain_timeout = Some(prost_types::Duration {
                seconds: 7200,
                nanos: 0,
            });
        }
        assert!(Command::try_from(long).is_err());
        let mut none = wire;
        if let Some(t) = &mut none.traffic {
            t.balancer = None;
        }
        assert!(Command::try_from(none).is_err());
    }
}
