//! Commands down the agent stream and updates back, with the real
//! coordinator and the real agent library in-process over real mTLS gRPC.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, SystemTime};

use baton_agent::{Agent, AgentConfig};
use baton_common::command::{Command, CommandKind, Outcome, Phase};
use baton_common::host::HostId;
use baton_common::tls::ClientTls;
use baton_coordinator::config::Config;
use baton_coordinator::fleet::SendError;
use baton_coordinator::server::Coordinator;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_reaches_the_agent_and_its_outcome_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let h1 = HostId::try_from("h1").unwrap();
    baton_common::pki::init(&tls, std::slice::from_ref(&h1)).unwrap();
    let coordinator = Coordinator::bind(Config::loopback(dir.path().join("batond"), tls.clone()))
        .await
        .unwrap();
    let url = format!("https://{}", coordinator.local_addr());
    let fleet = coordinator.fleet().expect("an embedded store");
    let stop = CancellationToken::new();
    let server = tokio::spawn(coordinator.run(stop.clone()));

    let command = Command {
        id: "c-1".into(),
        deadline: SystemTime::now() + Duration::from_secs(30),
        kind: CommandKind::Noop,
        traffic: None,
    };
    assert_eq!(
        fleet.send_command(h1.clone(), &command).await,
        Err(SendError::NotConnected(h1.clone()))
    );

    let agent_stop = CancellationToken::new();
    let config = AgentConfig {
        coordinators: vec![url],
        tls: ClientTls::load(&tls, "agent-h1").unwrap(),
        tls_dir: None,
        host_id: h1.clone(),
        data_dir: dir.path().join("agent"),
        labels: Default::default(),
        vars: Default::default(),
        balancers: Vec::new(),
        trusted_keys: vec![],
        keep_releases: 3,
        reconnect_initial: Duration::from_millis(50),
        metrics_listen: None,
        reconnect_max: Duration::from_millis(500),
        download: Default::default(),
        systemctl: Default::default(),
        peers: Default::default(),
    };
    let agent = tokio::spawn(Agent::new(config).unwrap().run(agent_stop.clone()));

    let mut updates = fleet.command_updates();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !fleet
            .get(h1.clone())
            .await
            .unwrap()
            .is_some_and(|h| h.connected)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("h1 connects");

    fleet.send_command(h1.clone(), &command).await.unwrap();
    // A command past its deadline fails with a reason instead of running.
    let late = Command {
        id: "c-late".into(),
        deadline: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
        kind: CommandKind::Noop,
        traffic: None,
    };
    fleet.send_command(h1.clone(), &late).await.unwrap();

    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (host, update) = tokio::time::timeout(Duration::from_secs(30), updates.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(host, h1);
        // Only the final updates; an `Accepted` may come first.
        if matches!(update.phase, Phase::Done(_)) {
            seen.push(update);
        }
    }
    // Commands run concurrently on the agent; their answers may cross.
    seen.sort_by(|a, b| a.command_id.cmp(&b.command_id));
    assert_eq!(
        (seen[0].command_id.as_str(), seen[0].phase),
        ("c-1", Phase::Done(Outcome::Succeeded))
    );
    assert_eq!(
        (seen[1].command_id.as_str(), seen[1].phase),
        ("c-late", Phase::Done(Outcome::Failed))
    );
    assert!(seen[1].error.contains("deadline"), "{:?}", seen[1]);

    agent_stop.cancel();
    agent.await.unwrap();
    drop(fleet);
    stop.cancel();
    server.await.unwrap().unwrap();
}
