//! `baton-bench`: the performance targets of the issues, measured on this
//! machine and written to `BENCHMARKS.md`.
//!
//! ```text
//! cargo build --release --workspace && target/release/baton-bench [--out BENCHMARKS.md]
//! ```
//!
//! 1. **Rollout overhead ratio**: 12 real agents, the demo service on each,
//!    a rolling upgrade with `max_parallel = 3` and `min_healthy_time = 1s`.
//!    actual = from `baton rollout start` until `baton rollout watch`
//!    exits; ideal = batches × (process start + `min_healthy_time`), with
//!    the process start measured here too. Target ≤ 1.10.
//! 2. **Fetch + verify throughput** of a 200 MB artifact over loopback mTLS:
//!    the agent's own download code (stream, hash while writing to disk,
//!    digest and size check) plus the signature check, against an
//!    in-process coordinator. Target ≥ 500 MB/s.
//! 3. **Zero-downtime upgrades**: `wrk` (installed from Debian packages
//!    when missing) against a host's service while it is upgraded 20 times
//!    in a row, with socket handoff and without (the baseline). Targets: 0
//!    errors, p99 during swaps ≤ 2× steady state, no request over 1 s.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use baton_common::artifact;
use baton_common::host::HostId;
use baton_common::tls::ClientTls;
use baton_proto::agent::v1::artifact_service_client::ArtifactServiceClient;
use baton_tests::fleet::Fleet;
use baton_tests::{SOON, bin};
use tokio_util::sync::CancellationToken;

const HOSTS: usize = 12;
const MAX_PARALLEL: usize = 3;
const MIN_HEALTHY: Duration = Duration::from_secs(1);
const ROLLOUT_RUNS: usize = 3;
const PAYLOAD: usize = 200 << 20;
const FETCH_RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// How long the demo service takes from spawn to accepting connections.
fn process_start() -> Duration {
    let mut samples = Vec::new();
    for _ in 0..5 {
        let port = baton_tests::fleet::free_port();
        let t0 = Instant::now();
        let mut child = Command::new(bin("baton"))
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
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < SOON, "the demo service did not start");
            std::thread::sleep(Duration::from_micros(200));
        }
        samples.push(t0.elapsed());
        child.kill().unwrap();
        child.wait().unwrap();
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

fn fetch_throughput(rt: &tokio::runtime::Runtime) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let host = HostId::try_from("bench-agent").unwrap();
    let tls = dir.path().join("tls");
    baton_common::pki::init(&tls, std::slice::from_ref(&host)).unwrap();
    let (key, public) = artifact::keygen(&dir.path().join("release")).unwrap();
    let key = artifact::read_signing_key(&key).unwrap();
    let trusted = vec![artifact::read_public_key(&public).unwrap()];

    eprintln!(
        "  packing a {} MB release of incompressible data",
        PAYLOAD >> 20
    );
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("service.toml"), "command = \"bin/x\"\n").unwrap();
    let mut noise = vec![0u8; PAYLOAD];
    fastrand::Rng::with_seed(1).fill(&mut noise);
    std::fs::write(src.join("payload.bin"), &noise).unwrap();
    drop(noise);
    let file = dir.path().join("big.baton");
    let signed = artifact::pack(&src, "big", "1.0.0", &key, &file).unwrap();

    rt.block_on(async {
        let coordinator = baton_coordinator::server::Coordinator::bind(
            baton_coordinator::config::Config::loopback(dir.path().join("batond"), tls.clone()),
        )
        .await
        .unwrap();
        let url = format!("https://{}", coordinator.local_addr());
        let stop = CancellationToken::new();
        let server = tokio::spawn(coordinator.run(stop.clone()));

        let mut control = baton_coordinator::cli::connect_control_with(
            &url,
            &ClientTls::load(&tls, "operator").unwrap(),
            None,
        )
        .await
        .unwrap();
        let (s, payload) = artifact::open_artifact(&file).unwrap();
        baton_coordinator::cli::artifact::push_with(&mut control, s, payload)
            .await
            .unwrap();

        let agent_tls = ClientTls::load(&tls, "agent-bench-agent").unwrap();
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .tls_config(agent_tls.to_tonic())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let client = ArtifactServiceClient::new(channel).max_decoding_message_size(8 << 20);
        let mut rates = Vec::new();
        for run in 0..FETCH_RUNS {
            let dest = dir.path().join(format!("download-{run}"));
            let t0 = Instant::now();
            signed.verify(&trusted).unwrap();
            baton_agent::executor::download(|| client.clone(), &signed.manifest, &dest, |_| {})
                .await
                .unwrap();
            let secs = t0.elapsed().as_secs_f64();
            let rate = signed.manifest.size as f64 / secs / 1e6;
            eprintln!("  fetch + verify {run}: {:.0} MB/s ({secs:.3}s)", rate);
            rates.push(rate);
            std::fs::remove_file(&dest).unwrap();
        }
        drop(control);
        stop.cancel();
        server.await.unwrap().unwrap();
        rates
    })
}

/// What one wrk run reported.
#[derive(Debug, Default, Clone)]
struct Wrk {
    requests: u64,
    socket_errors: u64,
    non_2xx: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    seconds: f64,
}

/// `12.3us` / `4.5ms` / `1.2s` → milliseconds.
fn wrk_ms(v: &str) -> f64 {
    let num = |s: &str| s.parse::<f64>().unwrap_or(f64::NAN);
    if let Some(x) = v.strip_suffix("us") {
        num(x) / 1000.0
    } else if let Some(x) = v.strip_suffix("ms") {
        num(x)
    } else if let Some(x) = v.strip_suffix('m') {
        num(x) * 60_000.0
    } else if let Some(x) = v.strip_suffix('s') {
        num(x) * 1000.0
    } else {
        f64::NAN
    }
}

fn parse_wrk(out: &str) -> Wrk {
    let mut w = Wrk::default();
    for line in out.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        match t.as_slice() {
            ["Latency", _avg, _stdev, max, ..] => w.max_ms = wrk_ms(max),
            ["50%", v] => w.p50_ms = wrk_ms(v),
            ["99%", v] => w.p99_ms = wrk_ms(v),
            [n, "requests", "in", secs, ..] => {
                w.requests = n.parse().unwrap_or(0);
                w.seconds = wrk_ms(secs.trim_end_matches(',')) / 1000.0;
            }
            ["Socket", "errors:", rest @ ..] => {
                w.socket_errors = rest
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => w.non_2xx = n.parse().unwrap_or(0),
            _ => {}
        }
    }
    w
}

/// Runs wrk against `addr` until `during` returns, then stops it with
/// SIGINT (wrk then prints its report).
fn wrk_while(addr: std::net::SocketAddr, during: impl FnOnce()) -> Wrk {
    let child = Command::new("wrk")
        .args(["-t2", "-c16", "-d600s", "--latency", "--timeout", "5s"])
        .arg(format!("http://{addr}/"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("cannot run wrk");
    // Let wrk connect before the measured period; a benchmark, not a test.
    std::thread::sleep(Duration::from_millis(300));
    during();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

/// Installs wrk from Debian packages when missing.
fn ensure_wrk() {
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
                let id = fleet.start_rollout(&plan(v, ""));
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

fn main() {
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(
            || PathBuf::from("BENCHMARKS.md"),
            |root| root.join("BENCHMARKS.md"),
        );
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, path] = args.as_slice()
        && flag == "--out"
    {
        out = PathBuf::from(path);
    } else if !args.is_empty() {
        eprintln!("usage: baton-bench [--out FILE]");
        std::process::exit(64);
    }
    for name in ["baton", "batond", "baton-agent"] {
        let path = baton_tests::bin_dir().join(name);
        if !path.exists() {
            eprintln!(
                "baton-bench: {} is missing; run `cargo build --release --workspace` first",
                path.display()
            );
            std::process::exit(1);
        }
    }
    let rt = tokio::runtime::Runtime::new().unwrap();

    eprintln!(
        "rollout overhead: {HOSTS} agents, max_parallel {MAX_PARALLEL}, min_healthy_time {MIN_HEALTHY:?}"
    );
    let r = rollout_overhead();
    eprintln!("fetch + verify: {} MB over loopback mTLS", PAYLOAD >> 20);
    let rates = fetch_throughput(&rt);
    ensure_wrk();
    eprintln!("zero-downtime upgrades under wrk");
    let h = handoff_under_load();

    let ratios: Vec<f64> = r
        .runs
        .iter()
        .map(|d| d.as_secs_f64() / r.ideal.as_secs_f64())
        .collect();
    let ratio = median(ratios.clone());
    let rate = median(rates.clone());
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let text = format!(
        "# Benchmarks\n\n\
Measured by the benchmark harness (`tests/src/bin/baton-bench.rs`) on a {cpus}-core {cpu}, \
release build. Reproduce with:\n\n\
```sh\ncargo build --release --workspace && target/release/baton-bench\n```\n\n\
It rewrites this file. Every figure is the median of its runs.\n\n\
| benchmark | result | target | |\n|---|---|---|---|\n\
| rollout overhead ratio ({HOSTS} hosts, `max_parallel = {MAX_PARALLEL}`, `min_healthy_time = 1s`) | {ratio:.3} | ≤ 1.10 | {} |\n\
| fetch + verify throughput, {} MB artifact, loopback mTLS | {rate:.0} MB/s | ≥ 500 MB/s | {} |\n\n\
## Rollout overhead ratio\n\n\
Real `batond`, {HOSTS} real `baton-agent` processes and the demo service (an HTTP server) on each, \
checked by an `http` health check every 200 ms. Each run rolls a new version out with \
`max_parallel = {MAX_PARALLEL}`: staging on every host, then {} batches of swap, stop, start and \
health gate. *Actual* runs from `baton rollout start` until `baton rollout watch` exits (so it \
includes both CLI processes); *ideal* = batches × (process start + `min_healthy_time`).\n\n\
- process start (spawn until it accepts connections): {:.1} ms\n\
- ideal: {:.3} s\n\
- actual: {}\n\
- ratios: {}\n\n\
## Fetch + verify throughput\n\n\
The agent's own download code (`baton_agent::executor::download`: a resumable `ArtifactService.Fetch` \
stream of 1 MiB chunks, SHA-256 while writing to disk, size and digest check) plus the ed25519 \
signature check, against a coordinator in the same process over loopback mutual TLS. The payload \
is {} MB of random bytes, so zstd cannot shrink it.\n\n\
- runs: {}\n",
        verdict(ratio <= 1.10),
        PAYLOAD >> 20,
        verdict(rate >= 500.0),
        HOSTS.div_ceil(MAX_PARALLEL),
        r.start.as_secs_f64() * 1e3,
        r.ideal.as_secs_f64(),
        r.runs
            .iter()
            .map(|d| format!("{:.3} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        ratios
            .iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(", "),
        PAYLOAD >> 20,
        rates
            .iter()
            .map(|x| format!("{x:.0} MB/s"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let wrk_row = |name: &str, w: &Wrk| {
        format!(
            "| {name} | {} | {:.0} | {} | {} | {:.2} | {:.2} | {:.1} |\n",
            w.requests,
            w.requests as f64 / w.seconds.max(1e-9),
            w.socket_errors,
            w.non_2xx,
            w.p50_ms,
            w.p99_ms,
            w.max_ms
        )
    };
    let errors = h.swaps.socket_errors + h.swaps.non_2xx;
    let p99_ok = h.swaps.p99_ms <= 2.0 * h.steady.p99_ms;
    let max_ok = h.swaps.max_ms < 1000.0;
    let text = format!(
        "{text}\n## Zero-downtime upgrades under load\n\n\
`wrk -t2 -c16 --latency` (keep-alive, 16 connections) against one host's demo service while \
it is upgraded {SWAPS} times in a row (1.0.0 ↔ 2.0.0, each a real rollout: staging, activation, \
`min_healthy_time = 200ms`), {swaps:.1} s in all. With `listen` the agent hands the socket to each \
new process and the old one drains; the baseline is the same run without `listen` \
(stop, then start). Steady state is 5 s of the same load with no upgrade.\n\n\
| target | result | |\n|---|---|---|\n\
| 0 errors during {SWAPS} upgrades | {errors} | {} |\n\
| p99 during swaps ≤ 2× steady state | {:.2} ms vs {:.2} ms | {} |\n\
| no request slower than 1 s | max {:.1} ms | {} |\n\n\
| run | requests | req/s | socket errors | non-2xx | p50 ms | p99 ms | max ms |\n\
|---|---|---|---|---|---|---|---|\n{}{}{}",
        verdict(errors == 0),
        h.swaps.p99_ms,
        h.steady.p99_ms,
        verdict(p99_ok),
        h.swaps.max_ms,
        verdict(max_ok),
        wrk_row("steady state (no upgrade)", &h.steady),
        wrk_row(&format!("{SWAPS} upgrades, socket handoff"), &h.swaps),
        wrk_row(
            &format!("{SWAPS} upgrades, no `listen` (baseline)"),
            &h.baseline
        ),
        swaps = h.swap_seconds,
    );
    std::fs::write(&out, text).unwrap();
    eprintln!("wrote {}", out.display());
    println!(
        "rollout overhead ratio {ratio:.3} (target ≤ 1.10); fetch + verify {rate:.0} MB/s (target ≥ 500)"
    );
    println!(
        "{SWAPS} upgrades under wrk: {errors} errors, p99 {:.2} ms (steady {:.2} ms), max {:.1} ms; baseline without listen: {} errors",
        h.swaps.p99_ms,
        h.steady.p99_ms,
        h.swaps.max_ms,
        h.baseline.socket_errors + h.baseline.non_2xx
    );
}
