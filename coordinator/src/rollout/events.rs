//! A rollout's event history in the store: reading it back. What the
//! events are and how a step's events are derived is the engine's
//! ([`baton_engine::events`]); the driver writes them with the step.

pub use baton_engine::events::*;

use crate::store::{Store, StoreError};

/// The events of a rollout from `since` on (by `seq`), at most `limit`,
/// in order. A record that does not decode is skipped with a warning: a
/// damaged history must not hide the rest of it.
pub async fn load(
    store: &dyn Store,
    rollout: &str,
    since: u64,
    limit: usize,
) -> Result<Vec<RolloutEvent>, StoreError> {
    let mut all = Vec::new();
    for (k, v) in store.list(&prefix(rollout)).await? {
        match serde_json::from_slice::<Vec<RolloutEvent>>(&v) {
            Ok(batch) => all.extend(batch.into_iter().filter(|e| e.seq >= since)),
            Err(e) => {
                tracing::warn!(key = %k, error = %e, "skipping rollout events that do not decode")
            }
        }
        if all.len() >= limit {
            all.truncate(limit);
            break;
        }
    }
    Ok(all)
}

/// The sequence number the next event of a rollout gets: past the last
/// record's events (or, when that one does not decode, past its first).
pub async fn next_seq(store: &dyn Store, rollout: &str) -> Result<u64, StoreError> {
    let records = store.list(&prefix(rollout)).await?;
    let Some((k, v)) = records.last() else {
        return Ok(0);
    };
    let first: u64 = k
        .rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(match serde_json::from_slice::<Vec<RolloutEvent>>(v) {
        Ok(batch) => batch.last().map_or(first, |e| e.seq) + 1,
        Err(_) => first + 1,
    })
}
