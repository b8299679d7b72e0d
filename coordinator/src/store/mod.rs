//! The coordinator's durable state, behind a small key-value [`Store`]
//! trait shaped after etcd's data model (get, list by prefix, and one
//! transaction primitive: compare, then apply), so an etcd implementation
//! can stand in for the embedded one without touching its callers.
//!
//! Keys are UTF-8 paths (`hosts/web-01`); values are opaque bytes (the
//! callers store JSON, which keeps the store readable when debugging).

pub mod batch;
#[cfg(feature = "etcd")]
mod etcd_store;
mod redb_store;

#[cfg(feature = "etcd")]
pub use etcd_store::{EtcdStore, Fence, FencedStore};
pub use redb_store::RedbStore;

use async_trait::async_trait;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (wrong path, locked by another
    /// process, corrupted).
    #[error("cannot open the store at {path}: {reason}")]
    Open {
        /// The database file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A read or write failed.
    #[error("store {op} failed: {reason}")]
    Backend {
        /// Which operation.
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// A write of a coordinator that no longer leads: its etcd lease ended
    /// (it was paused or cut off), so another may lead and nothing it
    /// writes is applied.
    #[error("write rejected: this batond no longer leads (its etcd lease ended)")]
    Fenced,
    /// A stored value does not decode.
    #[error("stored value at {key} is corrupt: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// Why it does not decode.
        reason: String,
    },
}

/// A condition a transaction checks before it applies its operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists and holds exactly this value.
    Equals(String, Vec<u8>),
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Sets the key to the value.
    Put(String, Vec<u8>),
    /// Removes the key (no error when absent).
    Delete(String),
}

impl Op {
    /// Its size in a transaction: the key and the value.
    pub fn size(&self) -> usize {
        match self {
            Self::Put(k, v) => k.len() + v.len(),
            Self::Delete(k) => k.len(),
        }
    }
}

/// An atomic transaction: when every compare holds, every op is applied;
/// otherwise nothing is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// Conditions, all of which must hold.
    pub compares: Vec<Compare>,
    /// Writes, applied together.
    pub ops: Vec<Op>,
}

/// Durable key-value state. Implementations must be linearizable: a read
/// after a successful write sees it.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Reads every key starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// The keys starting with `prefix`, in key order, without their
    /// values: what a reader that wants a few of many records (a rollout's
    /// newest events) looks at first.
    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list(prefix)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    /// Applies `txn` atomically; returns whether its compares held (and so
    /// whether anything was written).
    async fn txn(&self, txn: Txn) -> Result<bool, StoreError>;

    /// Sets one key.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.txn(Txn {
            compares: vec![],
            ops: vec![Op::Put(key.to_owned(), value)],
        })
        .await
        .map(|_| ())
    }

    /// Sets `key` to `new` only if it currently holds `expected` (`None`:
    /// only if it is absent). Returns whether it was set.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let compare = match expected {
            None => Compare::Absent(key.to_owned()),
            Some(v) => Compare::Equals(key.to_owned(), v),
        };
        self.txn(Txn {
            compares: vec![compare],
            ops: vec![Op::Put(key.to_owned(), new)],
        })
        .await
    }
}

/// What the coordinator wrote to its store, for its metrics and the
/// benchmarks: the limits of [`batch`] are checked here in production.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Transactions applied.
    pub txns: std::sync::atomic::AtomicU64,
    /// Bytes of keys and values put.
    pub written_bytes: std::sync::atomic::AtomicU64,
    /// The most operations in one transaction.
    pub largest_txn_ops: std::sync::atomic::AtomicU64,
    /// The most bytes in one transaction.
    pub largest_txn_bytes: std::sync::atomic::AtomicU64,
}

/// A store that counts what goes through it into [`StoreStats`].
pub struct Measured {
    inner: std::sync::Arc<dyn Store>,
    stats: std::sync::Arc<StoreStats>,
}

impl Measured {
    /// Around `inner`, counting into `stats`.
    pub fn new(inner: std::sync::Arc<dyn Store>, stats: std::sync::Arc<StoreStats>) -> Self {
        Self { inner, stats }
    }
}

#[async_trait]
impl Store for Measured {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.list(prefix).await
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list_keys(prefix).await
    }

    async fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        let ops = txn.ops.len() as u64;
        let bytes = txn.ops.iter().map(Op::size).sum::<usize>() as u64;
        let applied = self.inner.txn(txn).await?;
        if applied {
            self.stats.txns.fetch_add(1, Relaxed);
            self.stats.written_bytes.fetch_add(bytes, Relaxed);
            self.stats.largest_txn_ops.fetch_max(ops, Relaxed);
            self.stats.largest_txn_bytes.fetch_max(bytes, Relaxed);
        }
        Ok(applied)
    }
}

/// Stores for tests.
#[cfg(test)]
pub mod testing {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A store that holds every transaction to etcd's default limits
    /// (refusing one over them, as etcd does) and fails every transaction
    /// after the first `left` (a crash, or a store that refuses).
    pub struct Limited {
        inner: RedbStore,
        left: AtomicUsize,
        /// Transactions tried.
        pub tried: AtomicUsize,
        /// The most operations seen in one transaction.
        pub largest: AtomicUsize,
    }

    impl Limited {
        /// Around `inner`, succeeding `left` transactions.
        pub fn new(inner: RedbStore, left: usize) -> Self {
            Self {
                inner,
                left: left.into(),
                tried: 0.into(),
                largest: 0.into(),
            }
        }

        /// Lets the next `n` transactions succeed.
        pub fn allow(&self, n: usize) {
            self.left.store(n, Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl Store for Limited {
        async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.inner.list(prefix).await
        }
        async fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
            self.tried.fetch_add(1, Ordering::SeqCst);
            self.largest.fetch_max(txn.ops.len(), Ordering::SeqCst);
            let bytes: usize = txn.ops.iter().map(Op::size).sum();
            if txn.ops.len() > batch::MAX_TXN_OPS || bytes > batch::MAX_TXN_BYTES {
                return Err(StoreError::Backend {
                    op: "txn",
                    reason: format!(
                        "too many operations in txn request ({} ops, {bytes} bytes)",
                        txn.ops.len()
                    ),
                });
            }
            let left = self.left.load(Ordering::SeqCst);
            if left == 0 {
                return Err(StoreError::Backend {
                    op: "txn",
                    reason: "refused by the test".into(),
                });
            }
            self.left.store(left - 1, Ordering::SeqCst);
            self.inner.txn(txn).await
        }
    }
}

/// The behaviour every [`Store`] implementation must show; run against each
/// implementation by its tests. Panicking is how it reports, so it
/// unwraps freely.
#[allow(clippy::unwrap_used)]
pub mod conformance {
    use super::*;

    /// Exercises get, put, list, compare-and-swap and transactions,
    /// panicking on the first deviation.
    pub async fn check(store: &dyn Store) {
        assert_eq!(store.get("a/1").await.unwrap(), None);
        store.put("a/1", b"one".to_vec()).await.unwrap();
        store.put("a/2", b"two".to_vec()).await.unwrap();
        store.put("b/1", b"other".to_vec()).await.unwrap();
        assert_eq!(store.get("a/1").await.unwrap(), Some(b"one".to_vec()));

        let listed = store.list("a/").await.unwrap();
        assert_eq!(
            listed,
            vec![
                ("a/1".into(), b"one".to_vec()),
                ("a/2".into(), b"two".to_vec())
            ]
        );
        assert!(store.list("c/").await.unwrap().is_empty());
        assert_eq!(store.list_keys("a/").await.unwrap(), ["a/1", "a/2"]);
        assert!(store.list_keys("c/").await.unwrap().is_empty());

        // Compare-and-swap: only the expected value wins.
        assert!(
            !store
                .compare_and_swap("a/1", Some(b"nope".to_vec()), b"x".to_vec())
                .await
                .unwrap()
        );
        assert!(
            store
                .compare_and_swap("a/1", Some(b"one".to_vec()), b"uno".to_vec())
                .await
                .unwrap()
        );
        assert!(
            !store
                .compare_and_swap("a/1", None, b"x".to_vec())
                .await
                .unwrap()
        );
        assert!(
            store
                .compare_and_swap("a/3", None, b"three".to_vec())
                .await
                .unwrap()
        );
        assert_eq!(store.get("a/1").await.unwrap(), Some(b"uno".to_vec()));

        // A failed transaction writes nothing at all.
        let failed = Txn {
            compares: vec![Compare::Absent("a/1".into())],
            ops: vec![
                Op::Put("a/4".into(), b"four".to_vec()),
                Op::Delete("a/2".into()),
            ],
        };
        assert!(!store.txn(failed).await.unwrap());
        assert_eq!(store.get("a/4").await.unwrap(), None);
        assert_eq!(store.get("a/2").await.unwrap(), Some(b"two".to_vec()));

        // A successful one writes everything.
        let ok = Txn {
            compares: vec![
                Compare::Equals("a/1".into(), b"uno".to_vec()),
                Compare::Absent("a/4".into()),
            ],
            ops: vec![
                Op::Put("a/4".into(), b"four".to_vec()),
                Op::Delete("a/2".into()),
            ],
        };
        assert!(store.txn(ok).await.unwrap());
        assert_eq!(store.get("a/4").await.unwrap(), Some(b"four".to_vec()));
        assert_eq!(store.get("a/2").await.unwrap(), None);
        // A prefix is a prefix of keys, not of path segments only.
        assert_eq!(store.list("a").await.unwrap().len(), 3);
    }
}
