//! The audit log: every Control API call that changes something, allowed
//! or refused — who (the certificate's identity), what (the RPC), when, and
//! how it ended — persisted in the [`Store`] under
//! `audit/<unix ms>-<count>-<random>` (so a listing is in time order) and read with
//! `baton audit`.

use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tracing::error;

use crate::store::{Store, StoreError};

/// Entries `ListAudit` returns when no limit is asked for.
pub const DEFAULT_LIMIT: usize = 100;
/// Entries kept; older ones are deleted (the log cannot fill the store).
pub const MAX_ENTRIES: usize = 5000;
/// Records between two trims of the log.
const TRIM_EVERY: u64 = 64;

/// At most `max` characters of `text`.
fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

/// One call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When it ended (or was refused), Unix milliseconds.
    pub at: u64,
    /// The caller, e.g. `operator alice`.
    pub who: String,
    /// The role its certificate carries (empty when none).
    pub role: String,
    /// The RPC, e.g. `StartRollout`.
    pub action: String,
    /// `ok`, `denied` or `failed`.
    pub result: String,
    /// Why it was denied or failed.
    pub error: String,
}

/// The log.
#[derive(Clone)]
pub struct Audit {
    store: Arc<dyn Store>,
    written: Arc<std::sync::atomic::AtomicU64>,
    cap: usize,
}

impl Audit {
    /// The log in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_cap(store, MAX_ENTRIES)
    }

    /// A log keeping the newest `cap` entries.
    pub fn with_cap(store: Arc<dyn Store>, cap: usize) -> Self {
        Self {
            store,
            written: Arc::default(),
            cap,
        }
    }

    /// The store the log is kept in (shared with other small records).
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Appends an entry stamped now. A failed write is logged, not
    /// returned: the call it records has happened either way.
    pub async fn record(&self, who: &str, role: &str, action: &str, result: &str, error: &str) {
        let at = baton_common::time::unix_millis(SystemTime::now());
        // Bounded: some of these come from callers not yet trusted.
        let entry = AuditEntry {
            at,
            who: clip(who, 200),
            role: clip(role, 32),
            action: clip(action, 64),
            result: result.to_owned(),
            error: clip(error, 500),
        };
        // Time, then this process's count (entries of one millisecond stay
        // in order), then a random tail (two coordinators never collide).
        let n = self
            .written
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = format!("audit/{at:020}-{n:012}-{:04x}", fastrand::u16(..));
        let write = match serde_json::to_vec(&entry) {
            Ok(value) => self.store.put(&key, value).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = write {
            error!(%who, %action, %result, error = %e, "cannot write the audit log");
        }
        if n.is_multiple_of(TRIM_EVERY) {
            self.trim().await;
        }
    }

    /// Deletes all but the newest [`MAX_ENTRIES`].
    async fn trim(&self) {
        let Ok(all) = self.store.list("audit/").await else {
            return;
        };
        let excess = all.len().saturating_sub(self.cap);
        for chunk in all[..excess].chunks(64) {
            let txn = crate::store::Txn {
                compares: vec![],
                ops: chunk
                    .iter()
                    .map(|(k, _)| crate::store::Op::Delete(k.clone()))
                    .collect(),
            };
            if let Err(e) = self.store.txn(txn).await {
                error!(error = %e, "cannot trim the audit log");
                return;
            }
        }
    }

    /// The newest `limit` entries, newest first.
    pub async fn list(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let all = self.store.list("audit/").await?;
        all.into_iter()
            .rev()
            .take(limit)
            .map(|(key, value)| {
                serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                    key,
                    reason: e.to_string(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_log_keeps_its_newest_entries_and_bounds_their_fields() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::RedbStore::open(&dir.path().join("db")).unwrap());
        let audit = Audit::with_cap(store, 10);
        for i in 0..=TRIM_EVERY {
            audit
                .record(&format!("operator {i}"), "admin", "StartRollout", "ok", "")
                .await;
        }
        // The 65th record trims the log to the newest 10.
        let all = audit.list(1000).await.unwrap();
        assert_eq!(all.len(), 10);
        assert_eq!(all[0].who, format!("operator {TRIM_EVERY}"));
        audit
            .record(
                &"x".repeat(10_000),
                "r",
                &"m".repeat(1000),
                "denied",
                &"e".repeat(10_000),
            )
            .await;
        let newest = &audit.list(1).await.unwrap()[0];
        assert!(newest.who.chars().count() <= 201 && newest.error.chars().count() <= 501);
        assert!(newest.action.chars().count() <= 65);
    }
}
