//! The driver against a real store and registry, in-process.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use baton_common::host::{HostId, HostView};

use super::*;
use crate::rollout::machine::{HostState, INJECT_PANIC};
use crate::rollout::plan::Plan;
use crate::rollout::resolve::{Facts, Pushed, resolve};
use crate::store::RedbStore;

/// A rollout of `service` 2.0.0 over one host running 1.0.0, resolved from
/// `plan` (which may carry the fault marker in a comment).
fn rollout(id: &str, service: &str, comment: &str) -> Rollout {
    rollout_of(id, service, comment, 1)
}

/// The same over `hosts` hosts (`h1`, `h2`, …).
fn rollout_of(id: &str, service: &str, comment: &str, hosts: usize) -> Rollout {
    let text = format!(
        "{comment}\n[[service]]\nname = \"{service}\"\nversion = \"2.0.0\"\nmin_healthy = 0\n"
    );
    let plan = Plan::parse(&text).unwrap();
    let now = SystemTime::now();
    let host = |i: usize| HostView {
        host_id: HostId::try_from(format!("h{i}")).unwrap(),
        connected: false,
        labels: Default::default(),
        services: vec![baton_common::host::ServiceStatus {
            name: service.into(),
            version: "1.0.0".into(),
            state: baton_common::host::ServiceState::Running,
            healthy: true,
        }],
        agent_version: "0.1.0".into(),
        first_seen: now,
        last_seen: now,
        peer_address: String::new(),
        session: 0,
    };
    let mut facts = Facts {
        fleet: (1..=hosts).map(host).collect(),
        ..Facts::default()
    };
    facts.artifacts.insert(
        (service.to_owned(), "2.0.0".to_owned()),
        Pushed {
            digest: "sha256:00".into(),
            manifest: b"{}".to_vec(),
            signature: Vec::new(),
        },
    );
    resolve(text, &plan, &facts, id.to_owned(), now).unwrap()
}

async fn start(
    dir: &std::path::Path,
    store: Arc<dyn Store>,
) -> (Rollouts, CancellationToken, tokio::task::JoinHandle<()>) {
    let (rollouts, _, stop, task) = start_with_fleet(dir, store).await;
    (rollouts, stop, task)
}

async fn start_with_fleet(
    dir: &std::path::Path,
    store: Arc<dyn Store>,
) -> (
    Rollouts,
    crate::fleet::FleetHandle,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let (fleet, _fleet_task) = crate::fleet::spawn(store.clone()).await.unwrap();
    let artifacts = Artifacts::open(dir, store.clone(), 1 << 20).unwrap();
    let stop = CancellationToken::new();
    let (rollouts, task) = spawn(store, fleet.clone(), artifacts, stop.clone())
        .await
        .unwrap();
    (rollouts, fleet, stop, task)
}

async fn until(rollouts: &Rollouts, id: &str, what: impl Fn(&Rollout) -> bool) -> Rollout {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = rollouts.get(id.to_owned()).await.unwrap();
        if what(&r) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id}: {:?}",
            r.state
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_rollout_whose_step_panics_is_failed_and_kept_and_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("db")).unwrap());
    // Two unfinished rollouts, as a previous run left them: one whose step
    // panics, one ordinary.
    for r in [
        rollout("r-1-bad", "web", INJECT_PANIC),
        rollout("r-2-good", "api", ""),
    ] {
        store
            .put(&key(&r.id), serde_json::to_vec(&r).unwrap())
            .await
            .unwrap();
    }
    let (rollouts, stop, task) = start(dir.path(), store.clone()).await;
    let bad = until(&rollouts, "r-1-bad", |r| r.state.is_terminal()).await;
    assert_eq!(bad.state, State::Failed);
    let why = bad.error.unwrap();
    assert!(
        why.contains("internal error") && why.contains("a fault injected by a test"),
        "{why}"
    );
    // The driver lives on: the other rollout was stepped (its host was
    // sent the stage command), and requests are answered.
    let good = until(&rollouts, "r-2-good", |r| r.state == State::Staging).await;
    assert!(
        good.services[0]
            .hosts
            .values()
            .all(|h| h.outstanding.is_some())
    );
    assert_eq!(rollouts.list().await.unwrap().len(), 2);
    stop.cancel();
    task.await.unwrap();

    // The failure was stored: a restart does not step it into the fault
    // again, and its history says what happened.
    let (rollouts, stop, task) = start(dir.path(), store.clone()).await;
    let again = rollouts.get("r-1-bad".into()).await.unwrap();
    assert_eq!(again.state, State::Failed);
    let history = rollouts.events("r-1-bad", 0, 100).await.unwrap();
    assert!(history.iter().any(|e| e.to == "failed"), "{history:?}");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn updates_for_no_outstanding_command_change_nothing_and_progress_shows_on_the_next_tick() {
    use baton_common::command::{CommandUpdate, Outcome, Phase};
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("db")).unwrap());
    let r = rollout("r-3-upd", "web", "");
    store
        .put(&key(&r.id), serde_json::to_vec(&r).unwrap())
        .await
        .unwrap();
    let (rollouts, fleet, stop, task) = start_with_fleet(dir.path(), store).await;
    let staging = until(&rollouts, "r-3-upd", |r| r.state == State::Staging).await;
    let h1 = HostId::try_from("h1").unwrap();
    let outstanding = staging.services[0].hosts[&h1].outstanding.clone().unwrap();
    // A flood of answers to commands that were never sent (a hostile
    // agent making ids up): nothing moves.
    for i in 0..10_000 {
        fleet
            .publish_update(
                h1.clone(),
                CommandUpdate::done(&format!("r-3-upd/{}", 1000 + i), Outcome::Failed, "no"),
            )
            .await;
    }
    // Progress on the real command shows (on the next tick).
    fleet
        .publish_update(
            h1.clone(),
            CommandUpdate {
                command_id: outstanding.id.clone(),
                phase: Phase::Running,
                progress_percent: 42,
                error: String::new(),
                health_wait: None,
                failure: None,
                detail: Default::default(),
                connections_cut: 0,
            },
        )
        .await;
    let shown = until(&rollouts, "r-3-upd", |r| {
        r.services[0].hosts[&h1].progress == 42
    })
    .await;
    assert_eq!(shown.state, State::Staging);
    assert_eq!(shown.services[0].hosts[&h1].state, HostState::Staging);
    assert_eq!(shown.updated_at, staging.updated_at, "no step was taken");
    // The real answer moves it.
    fleet
        .publish_update(
            h1.clone(),
            CommandUpdate::done(&outstanding.id, Outcome::Succeeded, ""),
        )
        .await;
    until(&rollouts, "r-3-upd", |r| {
        r.services[0].hosts[&h1].state == HostState::Staged
    })
    .await;
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_start_a_crash_interrupted_is_removed_and_a_finished_one_loads_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("db")).unwrap());
    // A start that wrote everything but its header (the last write).
    let cut = rollout("r-4-cut", "web", "");
    let mut records = record::all_records(&cut).unwrap();
    let header = records.pop().unwrap();
    assert_eq!(header.0, key("r-4-cut"));
    for (k, v) in records {
        store.put(&k, v).await.unwrap();
    }
    // A whole one, as a start writes it.
    let whole = rollout("r-5-whole", "api", "");
    for (k, v) in record::all_records(&whole).unwrap() {
        store.put(&k, v).await.unwrap();
    }
    let (rollouts, stop, task) = start(dir.path(), store.clone()).await;
    let listed: Vec<String> = rollouts
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(listed, vec!["r-5-whole".to_owned()]);
    for prefix in [
        record::hosts_prefix("r-4-cut"),
        record::plan_prefix("r-4-cut"),
        record::clock_key("r-4-cut"),
    ] {
        assert!(store.list(&prefix).await.unwrap().is_empty(), "{prefix}");
    }
    let loaded = until(&rollouts, "r-5-whole", |r| r.state == State::Staging).await;
    assert_eq!(loaded.plan, whole.plan);
    assert_eq!(loaded.services[0].manifest, whole.services[0].manifest);
    stop.cancel();
    task.await.unwrap();
}

/// A thousand stage answers are one step and one transaction of a few
/// operations (a mark per host in one record, not a record per host), and
/// a driver that starts on the store finds every host staged.
#[tokio::test]
async fn a_thousand_stage_answers_are_one_small_write_and_load_back_staged() {
    use baton_common::command::{CommandUpdate, Outcome};
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(crate::store::StoreStats::default());
    let redb: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("db")).unwrap());
    let store: Arc<dyn Store> = Arc::new(crate::store::Measured::new(redb, stats.clone()));
    let r = rollout_of("r-6-stage", "web", "", 1000);
    for (k, v) in record::all_records(&r).unwrap() {
        store.put(&k, v).await.unwrap();
    }
    let (rollouts, fleet, stop, task) = start_with_fleet(dir.path(), store.clone()).await;
    let staging = until(&rollouts, "r-6-stage", |r| r.state == State::Staging).await;
    use std::sync::atomic::Ordering::SeqCst;
    let txns_before = stats.txns.load(SeqCst);
    for (host, h) in &staging.services[0].hosts {
        let id = &h.outstanding.as_ref().unwrap().id;
        fleet
            .publish_update(
                host.clone(),
                CommandUpdate::done(id, Outcome::Succeeded, ""),
            )
            .await;
    }
    let staged = until(&rollouts, "r-6-stage", |r| {
        r.services[0]
            .hosts
            .values()
            .all(|h| h.state == HostState::Staged)
    })
    .await;
    assert_eq!(staged.services[0].hosts.len(), 1000);
    // Per-host records would take at least eight transactions of 128.
    let txns = stats.txns.load(SeqCst) - txns_before;
    assert!(txns <= 4, "{txns} transactions for 1,000 stage answers");
    assert!(stats.largest_txn_ops.load(SeqCst) <= 128);
    assert!(stats.largest_txn_bytes.load(SeqCst) <= 1 << 20);
    assert!(
        !store
            .list(&record::staged_prefix("r-6-stage"))
            .await
            .unwrap()
            .is_empty()
    );
    stop.cancel();
    task.await.unwrap();

    // A restart reads the marks: every host staged, nothing outstanding.
    let (rollouts, stop, task) = start(dir.path(), store.clone()).await;
    let loaded = rollouts.get("r-6-stage".into()).await.unwrap();
    assert!(
        loaded.services[0]
            .hosts
            .values()
            .all(|h| h.state == HostState::Staged && h.outstanding.is_none()),
        "{:?}",
        loaded.services[0]
            .hosts
            .values()
            .find(|h| h.state != HostState::Staged)
    );
    stop.cancel();
    task.await.unwrap();
}
