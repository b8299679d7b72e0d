//! What a failed rollout says: its failed hosts, the first few of them.

use super::{HostState, Rollout};

/// The most hosts a rollout's error names; the rest are counted.
const ERROR_HOSTS: usize = 10;
/// The most characters of one host's error in a rollout's error.
const ERROR_HOST_CHARS: usize = 200;

/// The first failures of `failed`, each cut short, and how many more:
/// a rollout's error stays small (it is stored in the rollout's header)
/// however many hosts failed, and however long their errors.
pub fn summary(failed: &[String]) -> String {
    let mut out: Vec<String> = failed
        .iter()
        .take(ERROR_HOSTS)
        .map(|f| baton_common::text::prefix(f, ERROR_HOST_CHARS))
        .collect();
    if failed.len() > ERROR_HOSTS {
        out.push(format!("and {} more", failed.len() - ERROR_HOSTS));
    }
    out.join("; ")
}

/// `host: error` for every failed host, for the rollout's error.
pub(super) fn failed_hosts(r: &Rollout) -> Vec<String> {
    r.services
        .iter()
        .flat_map(|s| {
            s.hosts
                .iter()
                .filter(|(_, h)| h.state == HostState::Failed)
                .map(move |(id, h)| {
                    format!(
                        "{} on {id}: {}",
                        s.name,
                        h.error.as_deref().unwrap_or("failed")
                    )
                })
        })
        .collect()
}
