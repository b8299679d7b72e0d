//! Writes of any size within a store's limits: at most [`MAX_TXN_OPS`]
//! operations and [`MAX_TXN_BYTES`] per transaction (etcd's defaults are
//! 128 operations and 1.5 MiB per request), whatever the fleet size.
//!
//! [`groups`] splits independent writes (the fleet registry's records).
//! [`write_atomic`] keeps a write that must be all-or-nothing (a rollout
//! step that moved 10,000 hosts) atomic across several transactions with a
//! redo log: the operations go to `redo/<scope>/<n>` first, then one small
//! transaction writes `redo/<scope>/commit` — the commit point — and only
//! then are they applied and the log deleted. [`recover`], at start,
//! finishes every committed log and drops every uncommitted one, so a
//! crash at any point leaves the whole write or none of it.

use serde::{Deserialize, Serialize};

use super::{Op, Store, StoreError, Txn};

/// The most operations in one transaction (etcd's `--max-txn-ops`
/// default).
pub const MAX_TXN_OPS: usize = 128;
/// The most bytes (keys and values) in one transaction, under etcd's
/// default request limit of 1.5 MiB.
pub const MAX_TXN_BYTES: usize = 1 << 20;
/// The most encoded bytes of one redo record.
const REDO_CHUNK_BYTES: usize = 768 * 1024;

const REDO_PREFIX: &str = "redo/";
const COMMIT: &str = "commit";

fn key_of(op: &Op) -> &str {
    match op {
        Op::Put(k, _) | Op::Delete(k) => k,
    }
}

/// Splits `ops` into transactions within the limits, in order. An
/// operation that alone is over [`MAX_TXN_BYTES`] is an error: no store
/// would take it, so it is refused before anything is written.
pub fn groups(ops: Vec<Op>) -> Result<Vec<Vec<Op>>, StoreError> {
    let mut out: Vec<Vec<Op>> = Vec::new();
    let mut bytes = 0;
    for op in ops {
        let n = op.size();
        if n > MAX_TXN_BYTES {
            return Err(StoreError::Backend {
                op: "txn",
                reason: format!(
                    "the value of {} is {n} bytes, above the limit of {MAX_TXN_BYTES} per write",
                    baton_common::text::prefix(key_of(&op), 80)
                ),
            });
        }
        match out.last_mut() {
            Some(group) if group.len() < MAX_TXN_OPS && bytes + n <= MAX_TXN_BYTES => {
                bytes += n;
                group.push(op);
            }
            _ => {
                bytes = n;
                out.push(vec![op]);
            }
        }
    }
    Ok(out)
}

/// Writes `groups` one transaction each, in order.
pub async fn write_groups(store: &dyn Store, groups: Vec<Vec<Op>>) -> Result<(), StoreError> {
    for ops in groups {
        store
            .txn(Txn {
                compares: vec![],
                ops,
            })
            .await?;
    }
    Ok(())
}

/// One operation in a redo record; values are kept as text when they are
/// UTF-8 (every record this coordinator writes), else as hex.
#[derive(Serialize, Deserialize)]
struct Entry {
    k: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    v: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    h: Option<String>,
}

impl Entry {
    fn of(op: &Op) -> Self {
        match op {
            Op::Put(k, v) => match std::str::from_utf8(v) {
                Ok(text) => Self {
                    k: k.clone(),
                    v: Some(text.to_owned()),
                    h: None,
                },
                Err(_) => Self {
                    k: k.clone(),
                    v: None,
                    h: Some(baton_common::hex::encode(v)),
                },
            },
            Op::Delete(k) => Self {
                k: k.clone(),
                v: None,
                h: None,
            },
        }
    }

    fn op(self) -> Option<Op> {
        Some(match (self.v, self.h) {
            (Some(v), _) => Op::Put(self.k, v.into_bytes()),
            (None, Some(h)) => Op::Put(self.k, baton_common::hex::decode(&h)?),
            (None, None) => Op::Delete(self.k),
        })
    }
}

fn redo_key(scope: &str, n: usize) -> String {
    format!("{REDO_PREFIX}{scope}/{n:06}")
}

fn commit_key(scope: &str) -> String {
    format!("{REDO_PREFIX}{scope}/{COMMIT}")
}

fn corrupt(key: &str, reason: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        reason: reason.to_string(),
    }
}

/// How a write was made: for the store's measurements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Transactions used.
    pub txns: usize,
    /// Whether it went through the redo log.
    pub logged: bool,
    /// It committed, but applying its log failed: it is durable (a
    /// restart applies it), and [`finish`] must apply it before the next
    /// write of the same scope.
    pub pending: bool,
}

/// Writes `ops` all or nothing: in one transaction when they fit, else
/// through the redo log under `redo/<scope>/` (one writer per scope at a
/// time: a rollout's driver).
pub async fn write_atomic(
    store: &dyn Store,
    scope: &str,
    ops: Vec<Op>,
) -> Result<Written, StoreError> {
    let total: usize = ops.iter().map(Op::size).sum();
    if ops.len() <= MAX_TXN_OPS && total <= MAX_TXN_BYTES {
        store
            .txn(Txn {
                compares: vec![],
                ops,
            })
            .await?;
        return Ok(Written {
            txns: 1,
            logged: false,
            pending: false,
        });
    }
    // Checked before anything is written.
    let applied = groups(ops)?;
    let mut records: Vec<Vec<u8>> = Vec::new();
    let mut current: Vec<u8> = b"[".to_vec();
    for op in applied.iter().flatten() {
        let entry = serde_json::to_vec(&Entry::of(op)).map_err(|e| corrupt(key_of(op), e))?;
        if current.len() > 1 && current.len() + entry.len() + 1 > REDO_CHUNK_BYTES {
            current.push(b']');
            records.push(std::mem::replace(&mut current, b"[".to_vec()));
        }
        if current.len() > 1 {
            current.push(b',');
        }
        current.extend_from_slice(&entry);
    }
    current.push(b']');
    records.push(current);
    let mut txns = 0;
    let log: Vec<Op> = records
        .into_iter()
        .enumerate()
        .map(|(n, v)| Op::Put(redo_key(scope, n), v))
        .collect();
    let count = log.len();
    let log = groups(log)?;
    txns += log.len();
    write_groups(store, log).await?;
    store
        .put(&commit_key(scope), count.to_string().into_bytes())
        .await?;
    txns += 1;
    // Committed: from here on the write stands whatever happens.
    match apply_and_clear(store, scope, applied, count).await {
        Ok(n) => Ok(Written {
            txns: txns + n,
            logged: true,
            pending: false,
        }),
        Err(e) => {
            tracing::warn!(%scope, error = %e, "a committed write is not applied yet; it will be before the next one");
            Ok(Written {
                txns,
                logged: true,
                pending: true,
            })
        }
    }
}

/// Applies (or drops, when it never committed) what a failed write left
/// under `redo/<scope>/`.
pub async fn finish(store: &dyn Store, scope: &str) -> Result<(), StoreError> {
    recover_prefix(store, &format!("{REDO_PREFIX}{scope}/"))
        .await
        .map(|_| ())
}

/// Applies a committed log's operations, then deletes the log.
async fn apply_and_clear(
    store: &dyn Store,
    scope: &str,
    applied: Vec<Vec<Op>>,
    count: usize,
) -> Result<usize, StoreError> {
    let mut txns = applied.len();
    write_groups(store, applied).await?;
    // Applied: the commit key goes first, then the records (several
    // transactions for a big log). A crash between them leaves records
    // without a commit, which a restart drops; a commit whose records are
    // partly gone could never be applied again.
    let mut clear: Vec<Op> = vec![Op::Delete(commit_key(scope))];
    clear.extend((0..count).map(|n| Op::Delete(redo_key(scope, n))));
    let clear = groups(clear)?;
    txns += clear.len();
    write_groups(store, clear).await?;
    Ok(txns)
}

/// Finishes what a crash interrupted: every committed redo log is
/// applied, every uncommitted one dropped. Returns the scopes applied.
pub async fn recover(store: &dyn Store) -> Result<Vec<String>, StoreError> {
    recover_prefix(store, REDO_PREFIX).await
}

async fn recover_prefix(store: &dyn Store, prefix: &str) -> Result<Vec<String>, StoreError> {
    let mut scopes: std::collections::BTreeMap<String, Vec<(String, Vec<u8>)>> =
        std::collections::BTreeMap::new();
    for (k, v) in store.list(prefix).await? {
        let Some((scope, _)) = k
            .strip_prefix(REDO_PREFIX)
            .and_then(|rest| rest.rsplit_once('/'))
        else {
            continue;
        };
        scopes.entry(scope.to_owned()).or_default().push((k, v));
    }
    let mut applied = Vec::new();
    for (scope, records) in scopes {
        let commit = commit_key(&scope);
        let committed = records.iter().find(|(k, _)| *k == commit);
        let Some((_, count)) = committed else {
            // Never committed: the write did not happen.
            let drop: Vec<Op> = records.into_iter().map(|(k, _)| Op::Delete(k)).collect();
            write_groups(store, groups(drop)?).await?;
            tracing::info!(%scope, "dropped an unfinished write that a crash interrupted before it committed");
            continue;
        };
        let count: usize = std::str::from_utf8(count)
            .ok()
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| corrupt(&commit, "not a count"))?;
        let mut ops = Vec::new();
        for n in 0..count {
            let key = redo_key(&scope, n);
            let (_, value) = records
                .iter()
                .find(|(k, _)| *k == key)
                .ok_or_else(|| corrupt(&key, "missing from a committed redo log"))?;
            let entries: Vec<Entry> =
                serde_json::from_slice(value).map_err(|e| corrupt(&key, e))?;
            for e in entries {
                ops.push(e.op().ok_or_else(|| corrupt(&key, "a value is not hex"))?);
            }
        }
        apply_and_clear(store, &scope, groups(ops)?, count).await?;
        tracing::info!(%scope, "finished a write that a crash interrupted after it committed");
        applied.push(scope);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::store::RedbStore;
    use crate::store::testing::Limited;

    fn puts(n: usize, value: usize) -> Vec<Op> {
        (0..n)
            .map(|i| Op::Put(format!("k/{i:05}"), vec![b'"'; value]))
            .collect()
    }

    fn limited(dir: &tempfile::TempDir, txns: usize) -> Limited {
        Limited::new(RedbStore::open(&dir.path().join("db")).unwrap(), txns)
    }

    #[test]
    fn groups_keep_within_both_limits_and_refuse_one_value_over_them() {
        let g = groups(puts(1000, 10)).unwrap();
        assert_eq!(g.len(), 8);
        assert!(g.iter().all(|g| g.len() <= MAX_TXN_OPS));
        let g = groups(puts(10, 300 * 1024)).unwrap();
        assert!(
            g.iter()
                .all(|g| g.iter().map(Op::size).sum::<usize>() <= MAX_TXN_BYTES)
        );
        assert_eq!(g.iter().map(Vec::len).sum::<usize>(), 10);
        let err = groups(puts(1, MAX_TXN_BYTES + 1)).unwrap_err().to_string();
        assert!(err.contains("above the limit"), "{err}");
    }

    #[tokio::test]
    async fn a_big_write_is_atomic_across_transactions_and_a_crash_at_any_point_leaves_all_or_nothing()
     {
        // 1,000 values of 2 KiB of quotes (which double when escaped).
        let ops = puts(1000, 2048);
        let dir = tempfile::tempdir().unwrap();
        let whole = limited(&dir, usize::MAX);
        let written = write_atomic(&whole, "s", ops.clone()).await.unwrap();
        assert!(written.logged);
        let total = written.txns;
        assert_eq!(whole.list("k/").await.unwrap().len(), 1000);
        assert!(whole.list("redo/").await.unwrap().is_empty());
        drop(whole);
        // Crash after each possible transaction, then restart.
        for crash_after in 0..total {
            let dir = tempfile::tempdir().unwrap();
            let store = limited(&dir, crash_after);
            // Before the commit it fails; after it, it stands (pending).
            if let Ok(w) = write_atomic(&store, "s", ops.clone()).await {
                assert!(w.pending, "after {crash_after}");
            }
            store.allow(usize::MAX);
            recover(&store).await.unwrap();
            let n = store.list("k/").await.unwrap().len();
            assert!(n == 0 || n == 1000, "after {crash_after}: {n} of 1000");
            assert!(store.list("redo/").await.unwrap().is_empty());
            if n == 1000 {
                for (k, v) in store.list("k/").await.unwrap() {
                    assert_eq!(v.len(), 2048, "{k}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_small_write_is_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = limited(&dir, usize::MAX);
        let w = write_atomic(&store, "s", puts(3, 10)).await.unwrap();
        assert_eq!(
            w,
            Written {
                txns: 1,
                logged: false,
                pending: false
            }
        );
    }
}
