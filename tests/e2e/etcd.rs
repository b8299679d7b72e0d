//! The etcd store against a real etcd: the conformance check the embedded
//! store passes, and the leader's fence. Built with the `etcd` feature
//! (`.ci/run` builds every feature); skipped, saying why, when no `etcd`
//! binary is installed.

use std::time::{Duration, Instant};

use baton_coordinator::store::{EtcdStore, conformance};
use baton_tests::etcd::Etcd;

/// A store on `etcd`, once it answers (bounded).
async fn connect(etcd: &Etcd) -> EtcdStore {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match EtcdStore::connect(std::slice::from_ref(&etcd.client)).await {
            Ok(s) => return s,
            Err(e) => {
                assert!(Instant::now() < deadline, "etcd did not come up: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test]
async fn the_etcd_store_behaves_like_the_embedded_one() {
    let Some(etcd) = Etcd::start() else { return };
    let store = connect(&etcd).await;
    conformance::check(&store).await;
}

/// The leader's fence: writes apply only while the leader key is the one
/// this coordinator created; once its lease is gone (as after a pause past
/// the TTL), and even after another leader took the key, every write is
/// rejected with `Fenced` and changes nothing.
#[tokio::test]
async fn a_fenced_store_writes_nothing_once_its_lease_is_gone() {
    use baton_coordinator::store::{Fence, FencedStore, Store, StoreError};
    let Some(etcd) = Etcd::start() else { return };
    let store = connect(&etcd).await;
    let mut client = store.client();
    let lease = client.lease_grant(30, None).await.unwrap().id();
    let put = client
        .put(
            "/baton/leader",
            "https://a",
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    let revision = put.header().unwrap().revision();
    let lost = tokio_util::sync::CancellationToken::new();
    let fenced = FencedStore::new(
        store.clone(),
        Fence {
            key: "leader".into(),
            revision,
        },
        lost.clone(),
    );
    // While it leads: writes apply, and a failed compare is just `false`.
    fenced.put("rollouts/r1", b"one".to_vec()).await.unwrap();
    assert!(
        !fenced
            .compare_and_swap("rollouts/r1", Some(b"nope".to_vec()), b"x".to_vec())
            .await
            .unwrap()
    );
    assert!(!lost.is_cancelled());

    // The lease ends (etcd deletes the key) and another leader takes it.
    client.lease_revoke(lease).await.unwrap();
    client
        .put("/baton/leader", "https://b", None)
        .await
        .unwrap();
    let err = fenced
        .put("rollouts/r1", b"stale".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced), "{err}");
    assert!(err.to_string().contains("no longer leads"), "{err}");
    assert!(lost.is_cancelled());
    let err = fenced
        .compare_and_swap("rollouts/r2", None, b"stale".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced), "{err}");
    // Nothing it wrote after losing the lease is there.
    assert_eq!(
        store.get("rollouts/r1").await.unwrap(),
        Some(b"one".to_vec())
    );
    assert_eq!(store.get("rollouts/r2").await.unwrap(), None);
}
