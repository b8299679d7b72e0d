//! The embedded store: one redb file in the data directory. redb commits
//! are durable (fsynced) before `commit` returns, so a write acknowledged
//! here survives a crash.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Compare, Op, Store, StoreError, Txn};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");

/// A [`Store`] in a redb database file.
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    /// Writers take turns in arrival order: redb's own lock is not fair,
    /// and a writer that commits back to back (a rollout's steps) must
    /// not starve the others (an audit record) for hundreds of
    /// milliseconds.
    writers: Arc<tokio::sync::Mutex<()>>,
}

fn backend(op: &'static str) -> impl FnOnce(redb::Error) -> StoreError {
    move |e| StoreError::Backend {
        op,
        reason: e.to_string(),
    }
}

impl RedbStore {
    /// Opens (or creates) the database at `path`. Fails when another process
    /// holds it open.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        // Create the table up front so reads never see it missing.
        let tx = db.begin_write().map_err(|e| backend("open")(e.into()))?;
        tx.open_table(KV).map_err(|e| backend("open")(e.into()))?;
        tx.commit().map_err(|e| backend("open")(e.into()))?;
        Ok(Self {
            db: Arc::new(db),
            writers: Arc::default(),
        })
    }

    fn get_blocking(&self, key: &str) -> Result<Option<Vec<u8>>, redb::Error> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(KV)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    fn list_blocking(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, redb::Error> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(KV)?;
        let mut out = Vec::new();
        for entry in table.range(prefix..)? {
            let (k, v) = entry?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn list_keys_blocking(&self, prefix: &str) -> Result<Vec<String>, redb::Error> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(KV)?;
        let mut out = Vec::new();
        for entry in table.range(prefix..)? {
            let (k, _) = entry?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push(k.value().to_owned());
        }
        Ok(out)
    }

    fn txn_blocking(&self, txn: &Txn) -> Result<bool, redb::Error> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(KV)?;
            for compare in &txn.compares {
                let holds = match compare {
                    Compare::Absent(k) => table.get(k.as_str())?.is_none(),
                    Compare::Equals(k, v) => table
                        .get(k.as_str())?
                        .is_some_and(|cur| cur.value() == v.as_slice()),
                };
                if !holds {
                    // Dropping the transaction aborts it: nothing is written.
                    return Ok(false);
                }
            }
            for op in &txn.ops {
                match op {
                    Op::Put(k, v) => {
                        table.insert(k.as_str(), v.as_slice())?;
                    }
                    Op::Delete(k) => {
                        table.remove(k.as_str())?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(true)
    }
}

/// Runs blocking redb work off the async worker threads.
async fn blocking<T: Send + 'static>(
    op: &'static str,
    f: impl FnOnce() -> Result<T, redb::Error> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend {
            op,
            reason: format!("worker failed: {e}"),
        })?
        .map_err(backend(op))
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (this, key) = (self.clone(), key.to_owned());
        blocking("get", move || this.get_blocking(&key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let (this, prefix) = (self.clone(), prefix.to_owned());
        blocking("list", move || this.list_blocking(&prefix)).await
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let (this, prefix) = (self.clone(), prefix.to_owned());
        blocking("list", move || this.list_keys_blocking(&prefix)).await
    }

    async fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
        let _turn = self.writers.lock().await;
        let this = self.clone();
        blocking("transaction", move || this.txn_blocking(&txn)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn redb_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("baton.redb")).unwrap();
        super::super::conformance::check(&store).await;
    }

    #[tokio::test]
    async fn writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baton.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            store.put("hosts/h1", b"{}".to_vec()).await.unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.get("hosts/h1").await.unwrap(), Some(b"{}".to_vec()));
    }
}
