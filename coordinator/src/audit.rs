//! The audit log: every Control API call that changes something, allowed
//! or refused — who (the certificate's identity), what (the RPC), when, and
//! how it ended — persisted in the [`Store`] under
//! `audit/<unix ms>-<random>` (so a listing is in time order) and read with
//! `baton audit`.

use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tracing::error;

use crate::store::{Store, StoreError};

/// Entries `ListAudit` returns when no limit is asked for.
pub const DEFAULT_LIMIT: usize = 100;

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
}

impl Audit {
    /// The log in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Appends an entry stamped now. A failed write is logged, not
    /// returned: the call it records has happened either way.
    pub async fn record(&self, who: &str, role: &str, action: &str, result: &str, error: &str) {
        let at = baton_common::time::unix_millis(SystemTime::now());
        let entry = AuditEntry {
            at,
            who: who.to_owned(),
            role: role.to_owned(),
            action: action.to_owned(),
            result: result.to_owned(),
            error: error.to_owned(),
        };
        let key = format!("audit/{at:020}-{:08x}", fastrand::u32(..));
        let write = match serde_json::to_vec(&entry) {
            Ok(value) => self.store.put(&key, value).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = write {
            error!(%who, %action, %result, error = %e, "cannot write the audit log");
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
