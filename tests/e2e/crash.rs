//! Crash safety and network faults: `batond` and agents SIGKILLed at
//! chosen points of rollouts, streams cut and stalled mid-batch. The fleet
//! must end consistent and no service version may start twice.

use baton_tests::fleet::Fleet;
use baton_tests::load::Load;
use baton_tests::proxy::FaultyProxy;
use baton_tests::{Batond, SOON, wait_until};

const QUICK: &str = "min_healthy_time = \"200ms\"\n";

/// How often `version` of the demo service started on `host`.
fn starts(fleet: &Fleet, host: &str, version: &str) -> usize {
    fleet
        .service_log(host)
        .matches(&format!("demo-service {version} listening"))
        .count()
}

/// A fleet whose agents reach `batond` through a proxy, with a short agent
/// timeout so stalls are noticed quickly.
fn behind_proxy(hosts: &[&str]) -> (Fleet, FaultyProxy) {
    let labeled: Vec<(&str, &[&str])> = hosts.iter().map(|h| (*h, &["role=web"][..])).collect();
    let mut fleet = Fleet::start_full(&labeled, &[], &["--agent-timeout", "1s"]);
    let proxy = FaultyProxy::start(fleet.batond.addr);
    fleet.set_agent_url(format!("https://{}", proxy.addr));
    for h in hosts {
        fleet.start_agent(h);
    }
    fleet.wait_connected();
    (fleet, proxy)
}

fn restart_batond(fleet: &mut Fleet) {
    let addr = fleet.batond.addr.to_string();
    fleet.batond.proc.kill();
    fleet.batond = Batond::start_on(&fleet.env, &addr, "batond", &["--agent-timeout", "1s"]);
}

#[test]
fn batond_killed_while_staging_and_while_rolling_back_ends_every_rollout_right() {
    let (mut fleet, proxy) = behind_proxy(&["h1", "h2", "h3"]);
    fleet.install("1.0.0");
    fleet.release("2.0.0", false);
    fleet.release("3.0.0", true);

    // Staging: downloads are held by the proxy while batond dies.
    proxy.stall();
    let id = fleet.start_rollout(&format!(
        "[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\n{QUICK}"
    ));
    fleet.wait_status(&id, "the rollout to stage", |s| s["state"] == "staging");
    restart_batond(&mut fleet);
    proxy.resume();
    let s = fleet.wait_done(&id, std::time::Duration::from_secs(120));
    assert_eq!(s["state"], "succeeded", "{s}");
    // The history survived the kill: numbered on without a gap, every
    // host's steps once each.
    let events = fleet.events(&id);
    for h in ["h1", "h2", "h3"] {
        let healthy = events
            .iter()
            .filter(|e| e["host"] == h && e["to"] == "healthy")
            .count();
        assert_eq!(healthy, 1, "{h}: {events:?}");
    }
    assert_eq!(events.last().unwrap()["to"], "succeeded");
    for h in ["h1", "h2", "h3"] {
        assert_eq!(fleet.get(h).as_deref(), Some("demo-service 2.0.0"));
        assert_eq!(
            starts(&fleet, h, "2.0.0"),
            1,
            "{h}:\n{}",
            fleet.service_log(h)
        );
    }

    // Rolling back: 3.0.0 fails on its first host, and batond dies while
    // that host goes back.
    let id = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"3.0.0\"\nmin_healthy_time = \"1s\"\nhealthy_deadline = \"2s\"\n",
    );
    fleet.wait_status(&id, "the rollback to begin", |s| {
        s["state"] == "rolling_back"
    });
    restart_batond(&mut fleet);
    let s = fleet.wait_done(&id, std::time::Duration::from_secs(120));
    assert_eq!(s["state"], "rolled_back", "{s}");
    let ran_v3: Vec<&str> = ["h1", "h2", "h3"]
        .into_iter()
        .filter(|h| starts(&fleet, h, "3.0.0") > 0)
        .collect();
    assert_eq!(ran_v3, vec!["h1"], "only the first host ever ran 3.0.0");
    assert_eq!(starts(&fleet, "h1", "3.0.0"), 1);
    for h in ["h1", "h2", "h3"] {
        assert_eq!(fleet.get(h).as_deref(), Some("demo-service 2.0.0"), "{h}");
    }
}

#[test]
fn an_agent_killed_while_staging_swapping_and_health_checking_drops_no_request() {
    let (mut fleet, proxy) = behind_proxy(&["h1"]);
    fleet.install("1.0.0");
    fleet.release("2.0.0", false);
    let load = Load::start(fleet.addr("h1"), 8);

    // Killed while staging (its download held by the proxy).
    proxy.stall();
    let id = fleet.start_rollout(&format!(
        "[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\n{QUICK}"
    ));
    fleet.wait_status(&id, "h1 to stage", |s| {
        Fleet::hosts_of(s)["h1"]["state"] == "staging"
    });
    fleet.agents.get_mut("h1").unwrap().kill();
    proxy.resume();
    fleet.start_agent("h1");
    let s = fleet.wait_done(&id, std::time::Duration::from_secs(120));
    assert_eq!(s["state"], "succeeded", "{s}");

    // Killed while the new process is in its health gate.
    let id = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"1.0.0\"\nmin_healthy_time = \"3s\"\nallow_downgrade = true\n",
    );
    wait_until("1.0.0 to start again beside 2.0.0", SOON, || {
        (starts(&fleet, "h1", "1.0.0") == 2).then_some(())
    });
    fleet.agents.get_mut("h1").unwrap().kill();
    fleet.start_agent("h1");
    let s = fleet.wait_done(&id, std::time::Duration::from_secs(120));
    assert_eq!(s["state"], "succeeded", "{s}");

    // Killed during the swap: `current` names 3.0.0, whose process has
    // started beside 1.0.0 and is not ready yet (it starts slowly).
    let dir = fleet.release_dir("3.0.0", false);
    let toml = std::fs::read_to_string(dir.join("service.toml")).unwrap();
    std::fs::write(
        dir.join("service.toml"),
        toml.replace("\"3.0.0\"", "\"3.0.0\", \"--ready-after\", \"2s\""),
    )
    .unwrap();
    let file = fleet.pack_with(&dir, "3.0.0", &fleet.env.path("release.key"));
    fleet.push(&file);
    let id = fleet.start_rollout(&format!(
        "[[service]]\nname = \"demo\"\nversion = \"3.0.0\"\n{QUICK}"
    ));
    wait_until("3.0.0 to start beside 1.0.0", SOON, || {
        (starts(&fleet, "h1", "3.0.0") == 1).then_some(())
    });
    fleet.agents.get_mut("h1").unwrap().kill();
    fleet.start_agent("h1");
    let s = fleet.wait_done(&id, std::time::Duration::from_secs(120));
    assert_eq!(s["state"], "succeeded", "{s}");

    let stats = load.finish();
    assert_eq!((stats.failed, stats.refused), (0, 0), "{stats:?}");
    assert_eq!(fleet.get("h1").as_deref(), Some("demo-service 3.0.0"));
    assert_eq!(
        starts(&fleet, "h1", "1.0.0"),
        2,
        "1.0.0 started once per activation"
    );
    assert_eq!(starts(&fleet, "h1", "2.0.0"), 1);
    assert_eq!(starts(&fleet, "h1", "3.0.0"), 1);
    // Exactly one process serves: each older one was stopped, after the
    // restarted agent found it beside the current release.
    let log = fleet.service_log("h1");
    assert!(log.contains("demo-service 2.0.0 stopped"), "{log}");
    assert!(log.contains("demo-service 1.0.0 stopped"), "{log}");
}

#[test]
fn a_cut_and_a_stalled_stream_mid_batch_run_nothing_twice() {
    let (fleet, proxy) = behind_proxy(&["h1", "h2"]);
    fleet.install("1.0.0");
    fleet.release("2.0.0", false);
    let id = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\nmin_healthy_time = \"2s\"\n",
    );
    // h1 first: cut every stream while it is in its health gate.
    wait_until("h1 to start 2.0.0", SOON, || {
        (starts(&fleet, "h1", "2.0.0") == 1).then_some(())
    });
    proxy.reset();
    // h2 next: stall everything for longer than the agent timeout.
    wait_until("h2 to start 2.0.0", SOON, || {
        (starts(&fleet, "h2", "2.0.0") == 1).then_some(())
    });
    proxy.stall();
    wait_until("the coordinator to notice the stall", SOON, || {
        (!fleet.env.connected(&fleet.batond.url(), "h2")).then_some(())
    });
    proxy.resume();
    let s = fleet.wait_done(&id, std::time::Duration::from_secs(120));
    assert_eq!(s["state"], "succeeded", "{s}");
    for h in ["h1", "h2"] {
        assert_eq!(
            starts(&fleet, h, "2.0.0"),
            1,
            "{h}:\n{}",
            fleet.service_log(h)
        );
        assert_eq!(fleet.get(h).as_deref(), Some("demo-service 2.0.0"));
    }
}
