//! A rollout's event history in the store: reading it back. What the
//! events are and how a step's events are derived is the engine's
//! ([`baton_engine::events`]); the driver writes them with the step.

pub use baton_engine::events::*;

use crate::store::{Store, StoreError};

/// The first `seq` a record's key names (`events/<id>/<first seq>`).
fn first_seq(key: &str) -> u64 {
    key.rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// One record's events; a record that does not decode is skipped with a
/// warning: a damaged history must not hide the rest of it.
async fn read(store: &dyn Store, key: &str) -> Result<Vec<RolloutEvent>, StoreError> {
    let Some(v) = store.get(key).await? else {
        return Ok(Vec::new());
    };
    Ok(match serde_json::from_slice::<Vec<RolloutEvent>>(&v) {
        Ok(batch) => batch,
        Err(e) => {
            tracing::warn!(key = %key, error = %e, "skipping rollout events that do not decode");
            Vec::new()
        }
    })
}

/// The events of a rollout from `since` on (by `seq`), at most `limit`,
/// in order. Only the records that hold them are read (their keys name
/// their first event).
pub async fn load(
    store: &dyn Store,
    rollout: &str,
    since: u64,
    limit: usize,
) -> Result<Vec<RolloutEvent>, StoreError> {
    let keys = store.list_keys(&prefix(rollout)).await?;
    let mut all = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        // Every event of this record is before the next record's first.
        if keys.get(i + 1).is_some_and(|next| first_seq(next) <= since) {
            continue;
        }
        all.extend(read(store, k).await?.into_iter().filter(|e| e.seq >= since));
        if all.len() >= limit {
            all.truncate(limit);
            break;
        }
    }
    Ok(all)
}

/// The newest `limit` events of a rollout before `before` (by `seq`), in
/// order: a page of its history read from its end.
pub async fn load_before(
    store: &dyn Store,
    rollout: &str,
    before: u64,
    limit: usize,
) -> Result<Vec<RolloutEvent>, StoreError> {
    let keys = store.list_keys(&prefix(rollout)).await?;
    let mut pages: Vec<Vec<RolloutEvent>> = Vec::new();
    let mut have = 0;
    for k in keys.iter().rev() {
        if first_seq(k) >= before {
            continue;
        }
        let batch: Vec<RolloutEvent> = read(store, k)
            .await?
            .into_iter()
            .filter(|e| e.seq < before)
            .collect();
        have += batch.len();
        pages.push(batch);
        if have >= limit {
            break;
        }
    }
    let mut all: Vec<RolloutEvent> = pages.into_iter().rev().flatten().collect();
    all.drain(..all.len().saturating_sub(limit));
    Ok(all)
}

/// The sequence number the next event of a rollout gets: past the last
/// record's events (or, when that one does not decode, past its first).
pub async fn next_seq(store: &dyn Store, rollout: &str) -> Result<u64, StoreError> {
    let keys = store.list_keys(&prefix(rollout)).await?;
    let Some(k) = keys.last() else {
        return Ok(0);
    };
    let first = first_seq(k);
    let last = match store.get(k).await? {
        Some(v) => serde_json::from_slice::<Vec<RolloutEvent>>(&v)
            .ok()
            .and_then(|batch| batch.last().map(|e| e.seq)),
        None => None,
    };
    Ok(last.map_or(first + 1, |seq| seq + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    #[tokio::test]
    async fn history_reads_from_either_end_touch_only_the_records_they_need() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("db")).unwrap();
        let now = std::time::SystemTime::now();
        // 2,500 events in records of at most 1,000.
        let events: Vec<RolloutEvent> = (0..2500)
            .map(|seq| {
                let mut e = operator("pause", "t", now);
                e.seq = seq;
                e
            })
            .collect();
        for (k, v) in records("r-1", &events).unwrap() {
            store.put(&k, v).await.unwrap();
        }
        assert_eq!(next_seq(&store, "r-1").await.unwrap(), 2500);
        let tail = load_before(&store, "r-1", u64::MAX, 300).await.unwrap();
        assert_eq!(
            tail.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (2200..2500).collect::<Vec<_>>()
        );
        let page = load_before(&store, "r-1", 1100, 200).await.unwrap();
        assert_eq!(page.first().map(|e| e.seq), Some(900));
        assert_eq!(page.last().map(|e| e.seq), Some(1099));
        let from = load(&store, "r-1", 1999, 3).await.unwrap();
        assert_eq!(
            from.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1999, 2000, 2001]
        );
        assert!(load_before(&store, "r-1", 0, 10).await.unwrap().is_empty());
        assert_eq!(next_seq(&store, "r-none").await.unwrap(), 0);
    }
}
