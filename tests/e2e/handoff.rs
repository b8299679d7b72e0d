//! Zero failed requests during upgrades: the agent hands the listening
//! socket to each new process, which starts beside the old one; the old one
//! drains. Real agents, real demo services, real HTTP clients.

use std::time::Duration;

use baton_tests::fleet::Fleet;
use baton_tests::load::{Load, get};
use baton_tests::{SOON, wait_until};

const QUICK: &str = "min_healthy_time = \"200ms\"\n";

/// Installs 1.0.0 and pushes 2.0.0 (both with `listen` unless told).
fn fleet_with_two_versions(listen: bool) -> Fleet {
    let fleet = Fleet::start(&["h1"]);
    for v in ["1.0.0", "2.0.0"] {
        let dir = fleet.release_dir_with(v, false, listen, "");
        let file = fleet.pack_with(&dir, v, &fleet.env.path("release.key"));
        fleet.push(&file);
    }
    let s = fleet.roll("1.0.0", &format!("hosts = {{ role = \"web\" }}\n{QUICK}"));
    assert_eq!(s["state"], "succeeded", "{s}");
    fleet
}

/// Rolls `version` out; back and forth between versions, so downgrades
/// are allowed (both releases stay on the host).
fn upgrade(fleet: &Fleet, version: &str) {
    let s = fleet.roll(version, &format!("allow_downgrade = true\n{QUICK}"));
    assert_eq!(s["state"], "succeeded", "{s}");
}

#[test]
fn five_upgrades_under_load_fail_no_request() {
    let fleet = fleet_with_two_versions(true);
    let load = Load::start(fleet.addr("h1"), 8);
    for version in ["2.0.0", "1.0.0", "2.0.0", "1.0.0", "2.0.0"] {
        upgrade(&fleet, version);
    }
    let stats = load.finish();
    assert_eq!(
        (stats.failed, stats.refused),
        (0, 0),
        "requests failed during the upgrades: {stats:?}"
    );
    assert!(
        stats.ok > 100,
        "too little load to mean anything: {stats:?}"
    );
    // Both versions answered along the way.
    assert!(
        stats.bodies.contains_key("demo-service 1.0.0")
            && stats.bodies.contains_key("demo-service 2.0.0"),
        "{stats:?}"
    );
    assert_eq!(fleet.get("h1").as_deref(), Some("demo-service 2.0.0"));
}

#[test]
fn a_long_request_started_before_the_swap_completes_on_the_old_process() {
    let fleet = fleet_with_two_versions(true);
    let addr = fleet.addr("h1");
    let slow = std::thread::spawn(move || get(addr, "/slow?ms=1000", Duration::from_secs(10)));
    // The request is in flight on 1.0.0 (the only process) before the
    // rollout begins.
    wait_until("the slow request to reach 1.0.0", SOON, || {
        fleet
            .service_log("h1")
            .contains("demo-service 1.0.0: a slow request (1000 ms) is in flight")
            .then_some(())
    });
    upgrade(&fleet, "2.0.0");
    let (status, body) = slow.join().unwrap().expect("the slow request failed");
    assert_eq!((status, body.as_str()), (200, "demo-service 1.0.0"));
    let log = fleet.service_log("h1");
    // At least the slow request's connection (a health check may be in
    // flight on it too).
    let draining: u32 = log
        .lines()
        .find_map(|l| l.strip_prefix("demo-service 1.0.0 draining "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("1.0.0 was never told to stop:\n{log}"));
    assert!(
        draining >= 1,
        "1.0.0 was not draining the request when it was told to stop:\n{log}"
    );
}

#[test]
fn without_listen_the_same_upgrades_drop_requests() {
    // The negative control: stop-then-start leaves a gap the load sees,
    // so the zero above is a measurement, not an artefact of the client.
    let fleet = fleet_with_two_versions(false);
    let load = Load::start(fleet.addr("h1"), 8);
    for version in ["2.0.0", "1.0.0", "2.0.0", "1.0.0", "2.0.0"] {
        upgrade(&fleet, version);
    }
    let stats = load.finish();
    assert!(
        stats.failed + stats.refused > 0,
        "no drop without socket handoff: {stats:?}"
    );
}

#[test]
fn an_agent_restarted_between_upgrades_still_hands_the_socket_over() {
    let mut fleet = fleet_with_two_versions(true);
    let load = Load::start(fleet.addr("h1"), 8);
    upgrade(&fleet, "2.0.0");
    let pid = fleet.service_pid("h1").unwrap();
    fleet.agents.get_mut("h1").unwrap().kill();
    fleet.start_agent("h1");
    fleet.wait_connected();
    upgrade(&fleet, "1.0.0");
    let stats = load.finish();
    assert_eq!(
        (stats.failed, stats.refused),
        (0, 0),
        "requests failed around the agent restart: {stats:?}"
    );
    let log = fleet.agents["h1"].log_text();
    assert!(
        log.contains("recovered the listening sockets from the running service"),
        "{log}"
    );
    assert_ne!(fleet.service_pid("h1"), Some(pid));
    assert_eq!(fleet.get("h1").as_deref(), Some("demo-service 1.0.0"));
}

#[test]
fn a_failing_pre_start_hook_fails_the_host_and_the_old_version_keeps_serving() {
    let fleet = Fleet::start(&["h1"]);
    fleet.install("1.0.0");
    let dir = fleet.release_dir_with(
        "2.0.0",
        false,
        true,
        "\n[hooks]\npre_start = [\"/bin/sh\", \"-c\", \"echo checking the schema; echo schema 9 is unknown >&2; exit 4\"]\n",
    );
    let file = fleet.pack_with(&dir, "2.0.0", &fleet.env.path("release.key"));
    fleet.push(&file);
    let load = Load::start(fleet.addr("h1"), 4);
    let s = fleet.roll("2.0.0", QUICK);
    let stats = load.finish();
    assert_eq!(s["state"], "rolled_back", "{s}");
    let host = &Fleet::hosts_of(&s)["h1"];
    assert_eq!(
        host["error"],
        "pre_start hook of demo 2.0.0 failed: exited with status 4: checking the schema | schema 9 is unknown",
        "{s}"
    );
    assert_eq!(fleet.get("h1").as_deref(), Some("demo-service 1.0.0"));
    assert_eq!((stats.failed, stats.refused), (0, 0), "{stats:?}");
    assert!(
        !fleet
            .service_log("h1")
            .contains("demo-service 2.0.0 listening")
    );
}

#[test]
fn a_failing_pre_stop_hook_leaves_the_old_process_serving() {
    let fleet = Fleet::start(&["h1"]);
    // 1.0.0 refuses to be stopped: its pre_stop hook fails.
    let dir = fleet.release_dir_with(
        "1.0.0",
        false,
        true,
        "\n[hooks]\npre_stop = [\"/bin/sh\", \"-c\", \"echo still draining the load balancer >&2; exit 1\"]\n",
    );
    let file = fleet.pack_with(&dir, "1.0.0", &fleet.env.path("release.key"));
    fleet.push(&file);
    let s = fleet.roll("1.0.0", &format!("hosts = {{ role = \"web\" }}\n{QUICK}"));
    assert_eq!(s["state"], "succeeded", "{s}");
    fleet.release("2.0.0", false);
    let load = Load::start(fleet.addr("h1"), 4);
    let s = fleet.roll("2.0.0", QUICK);
    let stats = load.finish();
    assert_eq!(s["state"], "rolled_back", "{s}");
    let error = Fleet::hosts_of(&s)["h1"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.contains("pre_stop hook of demo 1.0.0 failed") && error.contains("still draining"),
        "{error}"
    );
    assert_eq!(fleet.get("h1").as_deref(), Some("demo-service 1.0.0"));
    assert_eq!((stats.failed, stats.refused), (0, 0), "{stats:?}");
    // 2.0.0 ran beside it and was stopped; 1.0.0 never was.
    let log = fleet.service_log("h1");
    assert!(log.contains("demo-service 2.0.0 listening"), "{log}");
    assert!(!log.contains("demo-service 1.0.0 draining"), "{log}");
}

#[test]
fn a_service_can_take_up_and_drop_listen_between_releases() {
    let fleet = Fleet::start(&["h1"]);
    for (v, listen) in [("1.0.0", false), ("2.0.0", true), ("3.0.0", false)] {
        let dir = fleet.release_dir_with(v, false, listen, "");
        let file = fleet.pack_with(&dir, v, &fleet.env.path("release.key"));
        fleet.push(&file);
    }
    let s = fleet.roll("1.0.0", &format!("hosts = {{ role = \"web\" }}\n{QUICK}"));
    assert_eq!(s["state"], "succeeded", "{s}");
    // The agent binds the address only after 1.0.0 (which bound it
    // itself) stopped, and lets go of it before 3.0.0 binds it again.
    for v in ["2.0.0", "3.0.0"] {
        let s = fleet.roll(v, QUICK);
        assert_eq!(s["state"], "succeeded", "{s}");
        assert_eq!(fleet.get("h1"), Some(format!("demo-service {v}")));
    }
    let log = fleet.service_log("h1");
    assert!(
        log.contains("demo-service 2.0.0 listening on 127.0.0.1"),
        "{log}"
    );
    assert!(log.contains("(an inherited socket"), "{log}");
    assert!(
        log.contains("demo-service 3.0.0 listening on 127.0.0.1")
            && log.contains("(its own socket"),
        "{log}"
    );
}

#[test]
fn an_old_process_killed_at_its_stop_timeout_reports_the_connections_it_cut() {
    let fleet = Fleet::start_full(
        &[("h1", &["role=web"])],
        &[],
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let metrics = fleet.batond.metrics.unwrap();
    for v in ["1.0.0", "2.0.0"] {
        let dir = fleet.release_dir_with(v, false, true, "");
        let toml = std::fs::read_to_string(dir.join("service.toml")).unwrap();
        assert!(toml.contains("stop_timeout = \"5s\""), "{toml}");
        std::fs::write(
            dir.join("service.toml"),
            toml.replace("stop_timeout = \"5s\"", "stop_timeout = \"1s\""),
        )
        .unwrap();
        let file = fleet.pack_with(&dir, v, &fleet.env.path("release.key"));
        fleet.push(&file);
    }
    let s = fleet.roll("1.0.0", &format!("hosts = {{ role = \"web\" }}\n{QUICK}"));
    assert_eq!(s["state"], "succeeded", "{s}");
    // A request longer than the old process's stop_timeout.
    let addr = fleet.addr("h1");
    let slow = std::thread::spawn(move || get(addr, "/slow?ms=20000", Duration::from_secs(30)));
    wait_until("the slow request to reach 1.0.0", SOON, || {
        fleet
            .service_log("h1")
            .contains("a slow request (20000 ms) is in flight")
            .then_some(())
    });
    let id = fleet.start_rollout(&format!(
        "[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\n{QUICK}"
    ));
    let s = fleet.wait_done(&id, Duration::from_secs(60));
    assert_eq!(s["state"], "succeeded", "{s}");
    assert!(
        slow.join().unwrap().is_err(),
        "the slow request was not cut"
    );
    // The cut is on record: an event of the host, and the metric.
    let events = fleet.events(&id);
    let cut = events
        .iter()
        .find(|e| e["to"] == "connections_cut")
        .unwrap_or_else(|| panic!("no connections_cut event in {events:?}"));
    assert_eq!(cut["host"], "h1", "{cut}");
    assert!(
        cut["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("1 connection(s) still open were cut")),
        "{cut}"
    );
    let doc = baton_tests::http::scrape(metrics);
    assert_eq!(
        baton_common::metrics::sample(&doc, "baton_connections_cut_total"),
        Some(1.0),
        "{doc}"
    );
}
