//! The scenarios on real agents: a rolling upgrade of the demo service on
//! 12 real `baton-agent` processes, and 20 upgrades of one host under
//! `wrk` with and without socket handoff.

use std::process::Command;
use std::time::{Duration, Instant};

use baton_tests::fleet::Fleet;
use baton_tests::wrk::{KillOnDrop, Wrk, wrk_while};
use baton_tests::{SOON, bin};
use serde_json::{Value, json};

use crate::common::median;

const HOSTS: usize = 12;
const MAX_PARALLEL: usize = 3;
const MIN_HEALTHY: Duration = Duration::from_secs(1);
const ROLLOUT_RUNS: usize = 3;

/// How long the demo service takes from spawn to accepting connections.
fn process_start() -> Duration {
    let mut samples = Vec::new();
    for _ in 0..5 {
        let port = baton_tests::fleet::free_port();
        let t0 = Instant::now();
        let child = Command::new(bin("baton"))
            .args([
                "demo-service",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--version",
                "x",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Killed however this ends.
        let _child = KillOnDrop(Some(child));
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < SOON, "the demo service did not start");
            std::thread::sleep(Duration::from_micros(200));
        }
        samples.push(t0.elapsed());
    }
    samples.sort();
    samples[samples.len() / 2]
}

struct RolloutResult {
    start: Duration,
    runs: Vec<Duration>,
    ideal: Duration,
}

fn rollout_overhead() -> RolloutResult {
    let names: Vec<String> = (1..=HOSTS).map(|i| format!("h{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let fleet = Fleet::start(&refs);
    fleet.install("1.0.0");
    let start = process_start();
    let batches = HOSTS.div_ceil(MAX_PARALLEL) as u32;
    let ideal = (start + MIN_HEALTHY) * batches;
    let mut runs = Vec::new();
    for run in 0..ROLLOUT_RUNS {
        let version = format!("2.0.{run}");
        fleet.release(&version, false);
        let plan = format!(
            "[[service]]\nname = \"demo\"\nversion = \"{version}\"\nmax_parallel = {MAX_PARALLEL}\nmin_healthy_time = \"{}ms\"\n",
            MIN_HEALTHY.as_millis()
        );
        let t0 = Instant::now();
        let id = fleet.start_rollout(&plan);
        let watch = fleet.baton(&["rollout", "watch", &id]);
        let took = t0.elapsed();
        assert!(
            watch.status.success(),
            "rollout {id} did not succeed: {}",
            String::from_utf8_lossy(&watch.stdout)
        );
        eprintln!("  rollout {version}: {:.3}s", took.as_secs_f64());
        runs.push(took);
    }
    RolloutResult { start, runs, ideal }
}

/// Installs wrk from Debian packages when missing.
pub fn ensure_wrk() {
    if Command::new("wrk").arg("--version").output().is_ok() {
        return;
    }
    eprintln!("installing wrk (apt-get install wrk)");
    let sudo = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() != b"0");
    let install = |update: bool| {
        let mut c = if sudo {
            Command::new("sudo")
        } else {
            Command::new("apt-get")
        };
        if sudo {
            c.arg("apt-get");
        }
        if update {
            c.args(["update", "-qq"]);
        } else {
            c.args(["install", "-y", "--no-install-recommends", "wrk"]);
        }
        c.status().is_ok_and(|s| s.success())
    };
    if !install(false) {
        assert!(install(true) && install(false), "cannot install wrk");
    }
}

const SWAPS: usize = 20;

struct HandoffResult {
    steady: Wrk,
    swaps: Wrk,
    baseline: Wrk,
    swap_seconds: f64,
}

/// wrk against one host while it is upgraded `SWAPS` times, with and
/// without socket handoff, plus a steady-state run.
fn handoff_under_load() -> HandoffResult {
    let run = |listen: bool| -> (Wrk, Option<Wrk>, f64) {
        let fleet = Fleet::start(&["h1"]);
        for v in ["1.0.0", "2.0.0"] {
            let dir = fleet.release_dir_with(v, false, listen, "");
            let file = fleet.pack_with(&dir, v, &fleet.env.path("release.key"));
            fleet.push(&file);
        }
        let plan = |v: &str, extra: &str| {
            format!(
                "[[service]]\nname = \"demo\"\nversion = \"{v}\"\nmin_healthy_time = \"200ms\"\n{extra}"
            )
        };
        let id = fleet.start_rollout(&plan("1.0.0", "hosts = { role = \"web\" }\n"));
        assert_eq!(fleet.wait_done(&id, SOON)["state"], "succeeded");
        let addr = fleet.addr("h1");
        let steady = listen.then(|| wrk_while(addr, || std::thread::sleep(Duration::from_secs(5))));
        let mut took = 0.0;
        let swaps = wrk_while(addr, || {
            let t0 = Instant::now();
            for i in 0..SWAPS {
                let v = if i % 2 == 0 { "2.0.0" } else { "1.0.0" };
                // Every other upgrade returns to 1.0.0, still kept on the
                // host: a downgrade the plan must allow.
                let id = fleet.start_rollout(&plan(v, "allow_downgrade = true\n"));
                let s = fleet.wait_done(&id, SOON);
                assert_eq!(s["state"], "succeeded", "{s}");
            }
            took = t0.elapsed().as_secs_f64();
        });
        (swaps, steady, took)
    };
    eprintln!("  {SWAPS} upgrades with socket handoff under wrk");
    let (swaps, steady, swap_seconds) = run(true);
    eprintln!("  the same without listen (baseline)");
    let (baseline, _, _) = run(false);
    HandoffResult {
        steady: steady.unwrap_or_default(),
        swaps,
        baseline,
        swap_seconds,
    }
}

/// `rollout-agents`: the overhead ratio on real agents and processes.
pub fn rollout_agents() -> Value {
    let r = rollout_overhead();
    let ratios: Vec<f64> = r
        .runs
        .iter()
        .map(|d| d.as_secs_f64() / r.ideal.as_secs_f64())
        .collect();
    json!({
        "scenario": "rollout-agents",
        "parameters": {
            "hosts": HOSTS,
            "max_parallel": MAX_PARALLEL,
            "min_healthy_time_ms": MIN_HEALTHY.as_millis(),
            "runs": ROLLOUT_RUNS,
        },
        "figures": {
            "overhead_ratio": median(ratios.clone()),
            "process_start_ms": r.start.as_secs_f64() * 1e3,
            "ideal_s": r.ideal.as_secs_f64(),
            "actual_s": r.runs.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
            "ratios": ratios,
        },
        "targets": {"overhead_ratio": {"max": 1.10}},
    })
}

pub fn wrk_json(w: &Wrk) -> Value {
    json!({
        "requests": w.requests,
        "requests_per_s": (w.requests as f64 / w.seconds.max(1e-9)).round(),
        "socket_errors": w.socket_errors,
        "non_2xx": w.non_2xx,
        "p50_ms": w.p50_ms,
        "p99_ms": w.p99_ms,
        "max_ms": w.max_ms,
    })
}

/// `handoff`: zero failed requests while a host is upgraded under load.
pub fn handoff() -> Value {
    ensure_wrk();
    let h = handoff_under_load();
    json!({
        "scenario": "handoff",
        "parameters": {"upgrades": SWAPS, "wrk": "-t2 -c16 --latency", "min_healthy_time_ms": 200},
        "figures": {
            "errors": h.swaps.socket_errors + h.swaps.non_2xx,
            "p99_ms": h.swaps.p99_ms,
            "steady_p99_ms": h.steady.p99_ms,
            "p99_vs_steady": h.swaps.p99_ms / h.steady.p99_ms.max(1e-9),
            "max_ms": h.swaps.max_ms,
            "baseline_errors": h.baseline.socket_errors + h.baseline.non_2xx,
            "upgrades_s": h.swap_seconds,
            "steady": wrk_json(&h.steady),
            "with_handoff": wrk_json(&h.swaps),
            "without_listen": wrk_json(&h.baseline),
        },
        "targets": {"errors": {"max": 0}, "p99_vs_steady": {"max": 2.0}, "max_ms": {"max": 1000.0}},
    })
}
