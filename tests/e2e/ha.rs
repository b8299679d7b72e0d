//! Three coordinators on one etcd: one leads, agents and the CLI given
//! every URL find it, payloads pushed through one are served by the next
//! leader, the leader SIGKILLed mid-rollout is replaced and the rollout
//! finishes, and a leader paused past its lease stops leading when it
//! wakes. Skipped, saying why, without etcd or a batond built with it.

use std::time::Duration;

use baton_common::metrics::sample;
use baton_tests::etcd::{Etcd, batond_has_etcd};
use baton_tests::fleet::Fleet;
use baton_tests::{Batond, SOON, wait_until};
use nix::sys::signal::Signal;

const QUICK: &str = "min_healthy_time = \"200ms\"\n";

/// How often `version` of the demo service started on `host`.
fn starts(fleet: &Fleet, host: &str, version: &str) -> usize {
    fleet
        .service_log(host)
        .matches(&format!("demo-service {version} listening"))
        .count()
}

fn leads(b: &Batond) -> bool {
    b.proc.log_text().contains("INFO leading")
}

#[test]
fn three_coordinators_on_etcd_survive_their_leader() {
    let Some(etcd) = Etcd::start() else { return };
    if !batond_has_etcd() {
        return;
    }
    let store = etcd.url();
    let args = [
        "--store",
        store.as_str(),
        "--lease-ttl",
        "2s",
        "--agent-timeout",
        "2s",
    ];
    let hosts: Vec<(&str, &[&str])> = ["h1", "h2", "h3"]
        .iter()
        .map(|h| (*h, &["role=web"][..]))
        .collect();
    // The first batond leads (it is alone when it starts).
    let mut fleet = Fleet::start_full(&hosts, &[], &args);
    wait_until("the first batond to lead", SOON, || {
        leads(&fleet.batond).then_some(())
    });
    // The others also serve metrics and the dashboard: while following,
    // metrics without the fleet and a dashboard that points at the leader.
    let web = [
        "--metrics-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ];
    let with_web: Vec<&str> = args.iter().chain(&web).copied().collect();
    let b2 = Batond::start(&fleet.env, "batond2", &with_web);
    let b3 = Batond::start(&fleet.env, "batond3", &with_web);
    for b in [&b2, &b3] {
        let doc = baton_tests::http::scrape(b.metrics.unwrap());
        assert_eq!(
            sample(&doc, "baton_coordinator_leading"),
            Some(0.0),
            "{doc}"
        );
        assert_eq!(sample(&doc, "baton_hosts_connected"), None, "{doc}");
        let page = baton_tests::http::get(b.dashboard.unwrap(), "/api/state");
        assert_eq!(page.status, 503, "{}", page.body);
        assert!(page.body.contains("follows another"), "{}", page.body);
    }
    // A follower answers with where the leader is: the CLI given only a
    // follower's URL ends up at the leader.
    let out = fleet
        .env
        .baton(&b2.url(), &fleet.env.tls(), &["hosts", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let urls = [fleet.batond.url(), b2.url(), b3.url()].join(",");
    fleet.cli_url = Some(urls.clone());
    fleet.set_agent_url(urls);
    for h in ["h1", "h2", "h3"] {
        fleet.start_agent(h);
    }
    fleet.wait_connected();
    fleet.install("1.0.0");

    // Pushed through the leader; both followers copy the payloads.
    let digests = [fleet.release("2.0.0", false), fleet.release("3.0.0", false)];
    for data in ["batond2", "batond3"] {
        for d in &digests {
            let blob = fleet
                .env
                .path(data)
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:"));
            wait_until(&format!("{data} to copy {d}"), SOON, || {
                blob.is_file().then_some(())
            });
        }
    }

    // The leader is SIGKILLed in the middle of a rollout; another takes
    // over and finishes it, starting every host's 2.0.0 exactly once.
    let id = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\nmax_parallel = 1\nmin_healthy_time = \"1s\"\n",
    );
    fleet.wait_status(&id, "the first host to be healthy", |s| {
        Fleet::hosts_of(s).values().any(|h| h["state"] == "healthy")
    });
    fleet.batond.proc.signal(Signal::SIGKILL);
    let s = fleet.wait_done(&id, Duration::from_secs(90));
    assert_eq!(s["state"], "succeeded", "{s}");
    for h in ["h1", "h2", "h3"] {
        assert_eq!(fleet.get(h).as_deref(), Some("demo-service 2.0.0"));
        assert_eq!(starts(&fleet, h, "2.0.0"), 1, "{h}");
    }
    let (leader, follower) = if leads(&b2) { (b2, b3) } else { (b3, b2) };
    assert!(leads(&leader), "a new leader was elected");
    // The new leader took its HTTP ports over: the fleet's gauges and the
    // dashboard are there, and the rollout's history runs on without a
    // gap across the two leaders.
    wait_until("the new leader's metrics", SOON, || {
        let doc = baton_tests::http::scrape(leader.metrics.unwrap());
        (sample(&doc, "baton_coordinator_leading") == Some(1.0)
            && sample(&doc, "baton_hosts_connected") == Some(3.0))
        .then_some(())
    });
    let state = baton_tests::http::get(leader.dashboard.unwrap(), "/api/state");
    assert_eq!(state.status, 200, "{}", state.body);
    assert_eq!(state.json()["hosts"].as_array().unwrap().len(), 3);
    let events = fleet.events(&id);
    assert_eq!(events.last().unwrap()["to"], "succeeded");

    // 3.0.0 was pushed through the dead coordinator: the new leader serves
    // it from its copy.
    let s = fleet.roll("3.0.0", QUICK);
    assert_eq!(s["state"], "succeeded", "{s}");

    // The new leader is paused past its lease: the last one takes over.
    leader.proc.signal(Signal::SIGSTOP);
    wait_until("the last batond to lead", Duration::from_secs(30), || {
        leads(&follower).then_some(())
    });
    let s = fleet.roll("2.0.0", &format!("allow_downgrade = true\n{QUICK}"));
    assert_eq!(s["state"], "succeeded", "{s}");
    // Woken, the paused one finds its lease gone and stops leading: it
    // exits (to be restarted as a follower) and writes nothing.
    leader.proc.signal(Signal::SIGCONT);
    let mut leader = leader;
    let status = leader.proc.wait_exit(SOON);
    assert!(!status.success(), "{}", leader.proc.log_text());
    let log = leader.proc.log_text();
    assert!(log.contains("lost the leadership"), "{log}");
    // Its registry still held the agents it had before the pause; marking
    // them gone was its last write, and etcd refused it.
    assert!(
        log.contains("write rejected: this batond no longer leads"),
        "{log}"
    );
    // Nothing it did after waking undid the last leader's work.
    let list = fleet.baton(&["rollout", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let states: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert!(states.iter().all(|s| *s == "succeeded"), "{list}");
    assert_eq!(states.len(), 4, "{list}");
    fleet.wait_connected();
    for h in ["h1", "h2", "h3"] {
        assert_eq!(fleet.get(h).as_deref(), Some("demo-service 2.0.0"));
    }
}
