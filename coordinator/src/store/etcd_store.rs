//! The [`Store`] on etcd (`batond --store etcd://HOST:PORT[,HOST:PORT…]`),
//! built with the `etcd` cargo feature. Every key lives under `/baton/`;
//! a transaction maps one to one onto an etcd transaction (an absent key
//! is `create_revision == 0`, an equal one is a value compare), so the
//! store keeps the embedded store's semantics exactly — the conformance
//! check runs against a real etcd in the tests.

use async_trait::async_trait;
use etcd_client::{Client, Compare as EtcdCompare, CompareOp, GetOptions, Txn as EtcdTxn, TxnOp};

use super::{Compare, Op, Store, StoreError, Txn};

/// The prefix of every Baton key in etcd.
const PREFIX: &str = "/baton/";

/// A store on an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

/// What makes a leader's writes its own: the leader key and the revision
/// that created it. Another leader's key (or none) has another revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The key, without the `/baton/` prefix.
    pub key: String,
    /// Its `create_revision` when this coordinator created it.
    pub revision: i64,
}

/// The leader's view of the store: every transaction also requires the
/// leader key to be the one this coordinator created, so a former leader
/// that wakes up after its lease ended writes nothing. A rejected write is
/// [`StoreError::Fenced`] (and cancels `lost`).
#[derive(Clone)]
pub struct FencedStore {
    inner: EtcdStore,
    fence: Fence,
    lost: tokio_util::sync::CancellationToken,
}

impl FencedStore {
    /// Fences `inner`'s writes with `fence`; `lost` is cancelled on the
    /// first write the fence rejects.
    pub fn new(inner: EtcdStore, fence: Fence, lost: tokio_util::sync::CancellationToken) -> Self {
        Self { inner, fence, lost }
    }
}

#[async_trait]
impl Store for FencedStore {
    async fn get(&self, k: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(k).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.list(prefix).await
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list_keys(prefix).await
    }

    async fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
        let fence = EtcdCompare::create_revision(
            key(&self.fence.key),
            CompareOp::Equal,
            self.fence.revision,
        );
        if self.inner.txn_with(txn, Some(fence)).await? {
            return Ok(true);
        }
        // Was it the fence or the caller's own compares?
        let resp = self
            .inner
            .client
            .kv_client()
            .get(key(&self.fence.key), None)
            .await
            .map_err(backend("txn"))?;
        let holds = resp
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == self.fence.revision);
        if holds {
            Ok(false)
        } else {
            self.lost.cancel();
            Err(StoreError::Fenced)
        }
    }
}

fn backend(op: &'static str) -> impl Fn(etcd_client::Error) -> StoreError {
    move |e| StoreError::Backend {
        op,
        reason: e.to_string(),
    }
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`host:port`, several for a
    /// cluster) and checks it answers.
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        let open = |reason: String| StoreError::Open {
            path: format!("etcd://{}", endpoints.join(",")),
            reason,
        };
        let urls: Vec<String> = endpoints.iter().map(|e| format!("http://{e}")).collect();
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(std::time::Duration::from_secs(10));
        let mut client = Client::connect(urls, Some(options))
            .await
            .map_err(|e| open(e.to_string()))?;
        client
            .status()
            .await
            .map_err(|e| open(format!("etcd does not answer: {e}")))?;
        Ok(Self { client })
    }
}

fn key(k: &str) -> String {
    format!("{PREFIX}{k}")
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, k: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(key(k), None)
            .await
            .map_err(backend("get"))?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(key(prefix), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(backend("list"))?;
        let mut out = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            let k = kv.key_str().map_err(backend("list"))?;
            out.push((
                k.strip_prefix(PREFIX).unwrap_or(k).to_owned(),
                kv.value().to_vec(),
            ));
        }
        // etcd returns keys in byte order, as the embedded store does.
        Ok(out)
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(
                key(prefix),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .map_err(backend("list"))?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let k = kv.key_str().map_err(backend("list"))?;
                Ok(k.strip_prefix(PREFIX).unwrap_or(k).to_owned())
            })
            .collect()
    }

    async fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
        self.txn_with(txn, None).await
    }
}

impl EtcdStore {
    /// The etcd client, for leases and the election.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A transaction with one more compare (the leader's fence).
    async fn txn_with(&self, txn: Txn, extra: Option<EtcdCompare>) -> Result<bool, StoreError> {
        let mut compares: Vec<EtcdCompare> = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::Absent(k) => EtcdCompare::create_revision(key(k), CompareOp::Equal, 0),
                Compare::Equals(k, v) => EtcdCompare::value(key(k), CompareOp::Equal, v.clone()),
            })
            .collect();
        compares.extend(extra);
        let ops: Vec<TxnOp> = txn
            .ops
            .iter()
            .map(|o| match o {
                Op::Put(k, v) => TxnOp::put(key(k), v.clone(), None),
                Op::Delete(k) => TxnOp::delete(key(k), None),
            })
            .collect();
        let resp = self
            .client
            .kv_client()
            .txn(EtcdTxn::new().when(compares).and_then(ops))
            .await
            .map_err(backend("txn"))?;
        Ok(resp.succeeded())
    }
}
