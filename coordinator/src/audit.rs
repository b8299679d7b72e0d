//! The audit log: every Control API call that changes something, allowed
//! or refused — who (the certificate's identity), what (the RPC), when, and
//! how it ended — persisted in the [`Store`] and read with `baton audit`.
//!
//! Two logs, so that refusals can never push real changes out:
//!
//! - `audit/<unix ms>-<count>-<random>`: the changes that happened
//!   (`ok`), kept by [`Retention`] — an age and a number of entries.
//! - `audit-refused/…`: calls that were `denied` or `failed`, rate-limited
//!   per caller: the first [`REFUSALS_RECORDED`] of a caller within
//!   [`REFUSAL_WINDOW`] are recorded one by one, the rest as one entry
//!   with their count ("4,212 denied calls in 10s: StartRollout 4,200,
//!   …"), and at most [`MAX_REFUSED_ENTRIES`] are kept.
//!
//! A listing merges both, newest first. Keys sort by time, so trimming
//! deletes from the front.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use crate::store::{Store, StoreError};

/// Entries `ListAudit` returns when no limit is asked for.
pub const DEFAULT_LIMIT: usize = 100;
/// The most entries one `ListAudit` returns.
pub const MAX_LIMIT: usize = 10_000;
/// Refused and failed calls kept; older ones are deleted first.
pub const MAX_REFUSED_ENTRIES: usize = 5_000;
/// Refused or failed calls of one caller recorded one by one per window.
pub const REFUSALS_RECORDED: u64 = 10;
/// The window over which a caller's refusals are counted.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(10);
/// Callers whose refusals are being counted at once; when more refuse at
/// the same moment, the oldest window is closed early.
const MAX_WINDOWS: usize = 10_000;
/// RPC names an aggregate entry lists by name; the rest are "other".
const NAMED_ACTIONS: usize = 8;
/// Records between two trims of a log.
const TRIM_EVERY: u64 = 64;

const CHANGES: &str = "audit/";
const REFUSED: &str = "audit-refused/";

/// How long, and how many, changes are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Changes older than this are deleted.
    pub max_age: Duration,
    /// At most this many changes are kept (the newest).
    pub max_entries: usize,
}

/// Keep changes for a year, and at most 20,000 of them.
pub const DEFAULT_RETENTION: Retention = Retention {
    max_age: Duration::from_secs(365 * 24 * 3600),
    max_entries: 20_000,
};
/// The longest `--audit-max-age`: ten years.
pub const MAX_RETENTION_AGE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The largest `--audit-max-entries`.
pub const MAX_RETENTION_ENTRIES: usize = 1_000_000;

/// At most `max` characters of `text`.
fn clip(text: &str, max: usize) -> String {
    baton_common::text::prefix(text, max)
}

/// One call, or (with `count` above 1) a caller's refused calls within a
/// window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When it ended (or was refused), Unix milliseconds; for an aggregate,
    /// when its window closed.
    pub at: u64,
    /// The caller, e.g. `operator alice`.
    pub who: String,
    /// The role its certificate carries (empty when none).
    pub role: String,
    /// The RPC, e.g. `StartRollout` (for an aggregate, the most frequent).
    pub action: String,
    /// `ok`, `denied` or `failed`.
    pub result: String,
    /// Why it was denied or failed (for an aggregate, the counts).
    pub error: String,
    /// How many calls the entry stands for.
    #[serde(default = "one")]
    pub count: u64,
}

fn one() -> u64 {
    1
}

/// One caller's refusals within a window.
struct Window {
    opened: Instant,
    recorded: u64,
    role: String,
    /// `(result, action)` → calls not recorded one by one.
    suppressed: BTreeMap<(String, String), u64>,
}

/// The log.
#[derive(Clone)]
pub struct Audit {
    store: Arc<dyn Store>,
    written: Arc<std::sync::atomic::AtomicU64>,
    retention: Retention,
    refused_cap: usize,
    windows: Arc<Mutex<HashMap<String, Window>>>,
    max_windows: usize,
    /// When windows that are over were last looked for: at most once a
    /// second, so a flood of refusals costs no scan each.
    last_sweep: Arc<Mutex<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves the map consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Audit {
    /// The log in `store`, with the default retention.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_retention(store, DEFAULT_RETENTION)
    }

    /// The log in `store`, keeping changes as `retention` says.
    pub fn with_retention(store: Arc<dyn Store>, retention: Retention) -> Self {
        Self {
            store,
            written: Arc::default(),
            retention,
            refused_cap: MAX_REFUSED_ENTRIES,
            windows: Arc::default(),
            max_windows: MAX_WINDOWS,
            last_sweep: Arc::new(Mutex::new(Instant::now())),
        }
    }

    /// The store the log is kept in (shared with other small records).
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Records a call stamped now: a change (`ok`) always, a refusal
    /// (`denied`, `failed`) within its caller's rate. A failed write is
    /// logged, not returned: the call it records has happened either way.
    pub async fn record(&self, who: &str, role: &str, action: &str, result: &str, error: &str) {
        let now = SystemTime::now();
        // Bounded: some of these come from callers not yet trusted.
        let entry = AuditEntry {
            at: baton_common::time::unix_millis(now),
            who: clip(who, 200),
            role: clip(role, 32),
            action: clip(action, 64),
            result: clip(result, 16),
            error: clip(error, 500),
            count: 1,
        };
        if result == "ok" {
            self.write(CHANGES, &entry).await;
            return;
        }
        let mut due = self.close_windows(false);
        let individually = {
            let mut windows = lock(&self.windows);
            if windows.len() >= self.max_windows && !windows.contains_key(&entry.who) {
                // Many callers refused at once: close the oldest early.
                if let Some(oldest) = windows
                    .iter()
                    .min_by_key(|(_, w)| w.opened)
                    .map(|(k, _)| k.clone())
                    && let Some(w) = windows.remove(&oldest)
                {
                    due.extend(aggregate(&oldest, w, now));
                }
            }
            let window = windows.entry(entry.who.clone()).or_insert_with(|| Window {
                opened: Instant::now(),
                recorded: 0,
                role: entry.role.clone(),
                suppressed: BTreeMap::new(),
            });
            if window.recorded < REFUSALS_RECORDED {
                window.recorded += 1;
                true
            } else {
                let key = (entry.result.clone(), entry.action.clone());
                if window.suppressed.len() < NAMED_ACTIONS || window.suppressed.contains_key(&key) {
                    *window.suppressed.entry(key).or_default() += 1;
                } else {
                    *window
                        .suppressed
                        .entry((entry.result.clone(), "other calls".into()))
                        .or_default() += 1;
                }
                false
            }
        };
        if individually {
            self.write(REFUSED, &entry).await;
        }
        for aggregate in due {
            warn!(who = %aggregate.who, calls = aggregate.count, "{}", aggregate.error);
            self.write(REFUSED, &aggregate).await;
        }
    }

    /// The refusals counted so far in windows still open, as entries; the
    /// windows stay open (their callers' budgets are not renewed).
    fn take_counts(&self) -> Vec<AuditEntry> {
        let now = SystemTime::now();
        let mut windows = lock(&self.windows);
        windows
            .iter_mut()
            .filter_map(|(who, w)| {
                let counted = Window {
                    opened: w.opened,
                    recorded: w.recorded,
                    role: w.role.clone(),
                    suppressed: std::mem::take(&mut w.suppressed),
                };
                aggregate(who, counted, now)
            })
            .collect()
    }

    /// Takes the windows that are over and turns those with uncounted
    /// refusals into entries; looks at most once a second unless `now`.
    fn close_windows(&self, now: bool) -> Vec<AuditEntry> {
        {
            let mut last = lock(&self.last_sweep);
            if !now && last.elapsed() < Duration::from_secs(1) {
                return Vec::new();
            }
            *last = Instant::now();
        }
        let now = SystemTime::now();
        let mut windows = lock(&self.windows);
        let over: Vec<String> = windows
            .iter()
            .filter(|(_, w)| w.opened.elapsed() >= REFUSAL_WINDOW)
            .map(|(k, _)| k.clone())
            .collect();
        over.into_iter()
            .filter_map(|who| {
                let w = windows.remove(&who)?;
                aggregate(&who, w, now)
            })
            .collect()
    }

    async fn write(&self, prefix: &'static str, entry: &AuditEntry) {
        // Time, then this process's count (entries of one millisecond stay
        // in order), then a random tail (two coordinators never collide).
        let n = self
            .written
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = format!("{prefix}{:020}-{n:012}-{:04x}", entry.at, fastrand::u16(..));
        let write = match serde_json::to_vec(entry) {
            Ok(value) => self.store.put(&key, value).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = write {
            error!(who = %entry.who, action = %entry.action, result = %entry.result, error = %e, "cannot write the audit log");
        }
        if n.is_multiple_of(TRIM_EVERY) {
            self.trim(CHANGES, self.retention.max_entries).await;
            self.trim(REFUSED, self.refused_cap).await;
        }
    }

    /// Deletes the entries under `prefix` beyond the newest `cap` and
    /// those older than the retention's age.
    async fn trim(&self, prefix: &str, cap: usize) {
        let Ok(all) = self.store.list(prefix).await else {
            return;
        };
        let oldest_kept = baton_common::time::unix_millis(
            SystemTime::now()
                .checked_sub(self.retention.max_age)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        );
        let expired = all
            .iter()
            .take_while(|(k, _)| key_millis(prefix, k).is_some_and(|at| at < oldest_kept))
            .count();
        let excess = all.len().saturating_sub(cap).max(expired);
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

    /// The newest `limit` entries of both logs, newest first. Refusals
    /// counted so far are written first, so the listing has them.
    pub async fn list(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let mut counted = self.close_windows(true);
        counted.extend(self.take_counts());
        for aggregate in counted {
            self.write(REFUSED, &aggregate).await;
        }
        let limit = limit.min(MAX_LIMIT);
        let mut out = Vec::new();
        for prefix in [CHANGES, REFUSED] {
            let all = self.store.list(prefix).await?;
            for (key, value) in all.into_iter().rev().take(limit) {
                let entry: AuditEntry =
                    serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                        key: key.clone(),
                        reason: e.to_string(),
                    })?;
                out.push((key[prefix.len()..].to_owned(), entry));
            }
        }
        // Keys after the prefix sort by time, then by count.
        out.sort_by(|a, b| b.0.cmp(&a.0));
        out.truncate(limit);
        Ok(out.into_iter().map(|(_, e)| e).collect())
    }
}

/// The time a key was written at.
fn key_millis(prefix: &str, key: &str) -> Option<u64> {
    key.strip_prefix(prefix)?.get(..20)?.parse().ok()
}

/// The entry summing up a closed window's uncounted refusals, if any.
fn aggregate(who: &str, w: Window, now: SystemTime) -> Option<AuditEntry> {
    let total: u64 = w.suppressed.values().sum();
    if total == 0 {
        return None;
    }
    let mut by_count: Vec<(&(String, String), &u64)> = w.suppressed.iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let ((result, action), _) = by_count[0];
    let parts: Vec<String> = by_count
        .iter()
        .map(|((result, action), n)| format!("{action} {result} {n}"))
        .collect();
    let took = w.opened.elapsed().as_secs().max(1);
    Some(AuditEntry {
        at: baton_common::time::unix_millis(now),
        who: who.to_owned(),
        role: w.role,
        action: action.clone(),
        result: result.clone(),
        error: clip(
            &format!(
                "{who}: {total} more refused or failed calls in {took}s, not recorded one by one: {}",
                parts.join(", ")
            ),
            500,
        ),
        count: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::RedbStore::open(&dir.path().join("db")).unwrap());
        (dir, store)
    }

    #[tokio::test]
    async fn changes_are_kept_by_their_retention_and_fields_are_bounded() {
        let (_dir, store) = store();
        let audit = Audit::with_retention(
            store,
            Retention {
                max_age: Duration::from_secs(3600),
                max_entries: 10,
            },
        );
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

    #[tokio::test]
    async fn a_flood_of_refusals_is_counted_and_never_pushes_changes_out() {
        let (_dir, store) = store();
        let audit = Audit::new(store.clone());
        audit
            .record("operator admin", "admin", "StartRollout", "ok", "")
            .await;
        // A viewer hammering calls it may not make, far more than the
        // refused log keeps.
        for i in 0..(MAX_REFUSED_ENTRIES as u64 * 3) {
            let action = if i % 2 == 0 {
                "StartRollout"
            } else {
                "ListAudit"
            };
            audit
                .record("operator mallory", "viewer", action, "denied", "needs more")
                .await;
        }
        let refused = store.list(REFUSED).await.unwrap();
        assert_eq!(
            refused.len() as u64,
            REFUSALS_RECORDED,
            "one by one, then counted"
        );
        // The admin's change is still there.
        let changes = store.list(CHANGES).await.unwrap();
        assert_eq!(changes.len(), 1);
        // A listing writes the count so far, with each call named.
        let all = audit.list(100).await.unwrap();
        let counted = all.iter().find(|e| e.count > 1).unwrap();
        assert_eq!(
            counted.count,
            MAX_REFUSED_ENTRIES as u64 * 3 - REFUSALS_RECORDED
        );
        assert!(
            counted.error.contains("StartRollout denied")
                && counted.error.contains("ListAudit denied"),
            "{}",
            counted.error
        );
        assert_eq!(counted.who, "operator mallory");
        assert!(
            all.iter()
                .any(|e| e.who == "operator admin" && e.result == "ok")
        );
    }

    #[tokio::test]
    async fn many_callers_refused_at_once_stay_bounded() {
        let (_dir, store) = store();
        let mut audit = Audit::new(store);
        audit.max_windows = 3;
        for i in 0..10 {
            for _ in 0..REFUSALS_RECORDED + 3 {
                audit
                    .record(&format!("agent h{i}"), "", "GetHost", "denied", "")
                    .await;
            }
        }
        assert_eq!(lock(&audit.windows).len(), 3);
        // The windows closed early were written with their counts.
        let listed = audit.list(1000).await.unwrap();
        let h0 = listed
            .iter()
            .find(|e| e.who == "agent h0" && e.count > 1)
            .unwrap();
        assert_eq!(h0.count, 3);
        assert!(h0.error.contains("3 more refused"), "{}", h0.error);
    }
}
