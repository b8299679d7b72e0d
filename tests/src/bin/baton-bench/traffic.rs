//! `traffic`: rolling upgrades of three hosts behind a real HAProxy under
//! `wrk`, the service without `listen` (stop, then start, its connections
//! closed at once), with `[service.traffic]` draining each host and
//! without: failed requests, and what the draining costs in rollout time.

use std::time::{Duration, Instant};

use baton_tests::fleet::Fleet;
use baton_tests::haproxy::{self, Haproxy};
use baton_tests::wrk::{Wrk, wrk_on_while};
use serde_json::{Value, json};

use crate::common::median;
use crate::realfleet::{ensure_wrk, wrk_json};

const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
const UPGRADES: usize = 10;
/// Requests in flight for a while, as real ones are.
const REQUEST: &str = "/slow?ms=20";
const MIN_HEALTHY: &str = "500ms";

struct Run {
    wrk: Wrk,
    seconds: Vec<f64>,
}

/// `UPGRADES` rolling upgrades (one host at a time), back and forth
/// between two versions, under wrk; `extra` is appended to each plan.
fn upgrades(fleet: &Fleet, lb: &Haproxy, extra: &str) -> Run {
    let mut seconds = Vec::with_capacity(UPGRADES);
    let wrk = wrk_on_while(lb.front, REQUEST, || {
        for i in 0..UPGRADES {
            let version = if i % 2 == 0 { "2.0.0" } else { "1.0.0" };
            let t0 = Instant::now();
            let id = fleet.start_rollout(&format!(
                "[[service]]\nname = \"demo\"\nversion = \"{version}\"\nallow_downgrade = true\nmax_parallel = 1\nmin_healthy_time = \"{MIN_HEALTHY}\"\n{extra}"
            ));
            let s = fleet.wait_done(&id, Duration::from_secs(120));
            assert_eq!(s["state"], "succeeded", "{s}");
            seconds.push(t0.elapsed().as_secs_f64());
        }
    });
    Run { wrk, seconds }
}

pub fn traffic() -> Value {
    ensure_wrk();
    let binary =
        haproxy::binary().expect("the traffic scenario needs haproxy (apt-get install haproxy)");
    let mut fleet = Fleet::start(&HOSTS);
    let socket = Haproxy::socket_in(&fleet.env);
    fleet.allow_balancers(&[socket.display().to_string()]);
    fleet.push_closing_release("1.0.0", false);
    fleet.push_closing_release("2.0.0", false);
    let id = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"1.0.0\"\nhosts = { role = \"web\" }\nstrategy = \"all-at-once\"\nmin_healthy_time = \"200ms\"\n",
    );
    assert_eq!(
        fleet.wait_done(&id, Duration::from_secs(60))["state"],
        "succeeded"
    );
    let servers: Vec<(&str, u16)> = HOSTS.iter().map(|h| (*h, fleet.ports[*h])).collect();
    let lb = Haproxy::start(binary, &fleet.env, &servers);
    eprintln!("  {UPGRADES} rolling upgrades of 3 hosts behind HAProxy, drained");
    let drained = upgrades(&fleet, &lb, &lb.plan("coordinator"));
    eprintln!("  the same without traffic (baseline)");
    let baseline = upgrades(&fleet, &lb, "");
    let with_s = median(drained.seconds.clone());
    let without_s = median(baseline.seconds.clone());
    json!({
        "scenario": "traffic",
        "parameters": {
            "hosts": HOSTS.len(),
            "upgrades": UPGRADES,
            "max_parallel": 1,
            "min_healthy_time_ms": 500,
            "request": REQUEST,
            "wrk": "-t2 -c16 --latency",
        },
        "figures": {
            "errors": drained.wrk.socket_errors + drained.wrk.non_2xx,
            "baseline_errors": baseline.wrk.socket_errors + baseline.wrk.non_2xx,
            "rollout_s": with_s,
            "baseline_rollout_s": without_s,
            "overhead_s_per_host": (with_s - without_s) / HOSTS.len() as f64,
            "p99_ms": drained.wrk.p99_ms,
            "baseline_p99_ms": baseline.wrk.p99_ms,
            "drained": wrk_json(&drained.wrk),
            "without_traffic": wrk_json(&baseline.wrk),
        },
        "targets": {"errors": {"max": 0}, "overhead_s_per_host": {"max": 1.0}},
    })
}
