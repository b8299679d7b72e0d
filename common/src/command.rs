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

/// Work for an agent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Command {
    /// Unique per command.
    pub id: String,
    /// When it must have finished.
    pub deadline: SystemTime,
    /// What to do.
    pub kind: CommandKind,
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
    fn a_command_of_unknown_kind_keeps_its_id_for_the_failure_report() {
        let cmd = Command {
            id: "c1".into(),
            deadline: SystemTime::now(),
            kind: CommandKind::Noop,
        };
        let mut wire = pb::Command::from(&cmd);
        assert_eq!(Command::try_from(wire.clone()).unwrap().id, "c1");
        wire.kind = None;
        let err = Command::try_from(wire).unwrap_err();
        assert_eq!(err.id.as_deref(), Some("c1"));
        assert_eq!(err.reason.field, "command.kind");
    }
}
