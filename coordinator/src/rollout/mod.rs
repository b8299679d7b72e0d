//! Rollouts: the plan file ([`plan`]), the pure state machine
//! ([`machine`]) and the driver that persists each new state before acting
//! on it ([`driver`]).

pub mod driver;
pub mod machine;
pub mod plan;

use baton_common::time::to_timestamp;
use baton_proto::control::v1 as pb;

pub use driver::{RolloutError, Rollouts};
pub use machine::{Event, HostState, Operator, Rollout, State};

impl From<&Rollout> for pb::Rollout {
    fn from(r: &Rollout) -> Self {
        Self {
            id: r.id.clone(),
            state: r.state.as_str().to_owned(),
            services: r
                .services
                .iter()
                .map(|s| pb::ServiceRollout {
                    name: s.name.clone(),
                    version: s.version.clone(),
                    digest: s.digest.clone(),
                    state: s.state.as_str().to_owned(),
                    step: u32::try_from(s.step + 1).unwrap_or(u32::MAX),
                    steps: s.steps.iter().map(|n| u32::try_from(*n).unwrap_or(u32::MAX)).collect(),
                    depends_on: s.depends_on.clone(),
                    hosts: s
                        .hosts
                        .iter()
                        .map(|(id, h)| pb::HostRollout {
                            host_id: id.to_string(),
                            state: h.state.as_str().to_owned(),
                            from_version: h.from_version.clone().unwrap_or_default(),
                            to_version: h.to_version.clone(),
                            started_at: h.started_at.map(to_timestamp),
                            finished_at: h.finished_at.map(to_timestamp),
                            error: h.error.clone().unwrap_or_default(),
                            progress_percent: h.progress,
                            connected: h.connected,
                        })
                        .collect(),
                })
                .collect(),
            created_at: Some(to_timestamp(r.created_at)),
            updated_at: Some(to_timestamp(r.updated_at)),
            error: r.error.clone().unwrap_or_default(),
            plan: r.plan.clone(),
        }
    }
}

/// Whether a rollout state name (as on the wire) is terminal.
pub fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "rolled_back" | "aborted")
}
