//! Small pieces of the driver: a panic's message, the service two
//! rollouts share, and the activation metrics of a step.

use std::collections::BTreeMap;
use std::time::SystemTime;

use baton_common::host::HostId;

use super::events;
use super::machine::{HostRun, Rollout};

/// The message of a caught panic.
pub(super) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// A service two rollouts both change, if any.
pub(super) fn shared_service(a: &Rollout, b: &Rollout) -> Option<String> {
    a.services
        .iter()
        .find(|s| b.services.iter().any(|o| o.name == s.name))
        .map(|s| s.name.clone())
}

/// Counts the host activations and rollbacks a step ended, and how long
/// each activation took (`changed`: the hosts it changed, as they were).
pub(super) fn count_activations(
    metrics: &crate::metrics::Metrics,
    changed: &[BTreeMap<HostId, HostRun>],
    history: &[events::RolloutEvent],
    now: SystemTime,
) {
    for e in history.iter().filter(|e| e.kind == events::Kind::Host) {
        if e.to == "failed" {
            metrics
                .host_failures
                .inc(&[e.failure.map_or("unknown", |k| k.as_str())]);
        }
        let result = match (e.from.as_str(), e.to.as_str()) {
            ("activating", "healthy") => "healthy",
            ("activating" | "rolling_back", "failed") => "failed",
            ("rolling_back", "rolled_back") => "rolled_back",
            _ => continue,
        };
        metrics.activations.inc(&[result]);
        if e.from == "activating" {
            let started = HostId::try_from(e.host.as_str()).ok().and_then(|host| {
                changed
                    .iter()
                    .find_map(|c| c.get(&host))
                    .and_then(|h| h.started_at)
            });
            if let Some(took) = started.and_then(|t| now.duration_since(t).ok()) {
                metrics.activation.observe(took);
            }
        }
    }
}
