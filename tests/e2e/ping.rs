//! `baton ping`: a no-op through real agents' streams, answered and timed;
//! label selection; hosts that are gone are named, and the exit code says
//! whether the whole selection answered.

use baton_tests::fleet::Fleet;
use baton_tests::{SOON, wait_until};
use serde_json::Value;

fn ping(fleet: &Fleet, args: &[&str]) -> (bool, Value) {
    let mut all = vec!["ping", "--json"];
    all.extend_from_slice(args);
    let out = fleet.baton(&all);
    let doc = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ping printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), doc)
}

#[test]
fn every_agent_answers_a_ping_and_a_missing_one_is_named() {
    let mut fleet = Fleet::start_labeled(&[("h1", &["role=web"]), ("h2", &["role=db"])], &[]);

    let (ok, doc) = ping(&fleet, &[]);
    assert!(ok, "{doc}");
    assert_eq!(doc["answered"], 2, "{doc}");
    assert_eq!(doc["failed"], 0, "{doc}");
    let hosts = doc["hosts"].as_array().unwrap();
    assert_eq!(hosts[0]["host_id"], "h1");
    assert_eq!(hosts[1]["host_id"], "h2");
    for h in hosts {
        assert_eq!(h["error"], "", "{h}");
        assert!(h["answered_after_ms"].as_f64().unwrap() > 0.0, "{h}");
    }
    assert!(doc["p100_ms"].as_f64().unwrap() >= doc["p50_ms"].as_f64().unwrap());

    // A no-op is answered, never journaled: pinging costs a host no disk.
    let journal = |host: &str| {
        std::fs::read_dir(fleet.data_dir(host).join("commands"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let before = journal("h1");
    for _ in 0..3 {
        assert!(ping(&fleet, &[]).0);
    }
    assert_eq!(journal("h1"), before, "pings were journaled");

    let (ok, doc) = ping(&fleet, &["--label", "role=db"]);
    assert!(ok, "{doc}");
    assert_eq!(doc["hosts"].as_array().unwrap().len(), 1, "{doc}");
    assert_eq!(doc["hosts"][0]["host_id"], "h2");

    // The text form says how many answered.
    let out = fleet.baton(&["ping"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2 of 2 hosts answered"), "{text}");

    // h2 goes away: it is named, h1 still answers, and the exit code says
    // the fleet did not answer whole.
    fleet.agents.get_mut("h2").unwrap().kill();
    wait_until("h2 to count as disconnected", SOON, || {
        (!fleet.env.connected(&fleet.batond.url(), "h2")).then_some(())
    });
    let (ok, doc) = ping(&fleet, &[]);
    assert!(!ok, "a ping with a host missing must fail: {doc}");
    assert_eq!(doc["answered"], 1, "{doc}");
    assert_eq!(doc["hosts"][1]["error"], "not connected", "{doc}");
    assert!(doc["hosts"][1]["answered_after_ms"].is_null(), "{doc}");
    let out = fleet.baton(&["ping"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("h2: not connected"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A timeout outside what the API allows is refused, precisely.
    let out = fleet.baton(&["ping", "--timeout", "10m"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at most 5m"), "{err}");
}
