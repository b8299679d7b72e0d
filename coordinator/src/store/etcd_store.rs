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

    async fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
        let compares: Vec<EtcdCompare> = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::Absent(k) => EtcdCompare::create_revision(key(k), CompareOp::Equal, 0),
                Compare::Equals(k, v) => EtcdCompare::value(key(k), CompareOp::Equal, v.clone()),
            })
            .collect();
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
