//! The fleet-scale scenarios: one real `batond` process and `baton-sim`
//! (a process of its own) holding N real mTLS agent streams.

use std::time::{Duration, Instant};

use baton_common::artifact;
use baton_common::metrics::sample;
use baton_proto::control::v1::{GetRolloutRequest, PingHostsRequest, StartRolloutRequest};
use baton_tests::http::scrape;
use serde_json::{Value, json};

use crate::common::{Coordinator, Sim, connected, cpu_time, median, ms, rss_bytes, unix_ms};

/// How long a large fleet may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(300);

/// Starts the simulator and waits until `batond` itself counts every
/// agent connected; returns the time from the simulator's first connection
/// attempt until the last agent was welcomed.
fn connect_fleet(rt: &tokio::runtime::Runtime, c: &Coordinator, sim: &mut Sim) -> Duration {
    let t0 = Instant::now();
    sim.wait_all_connected(CONNECT_TIMEOUT);
    let took = t0.elapsed();
    rt.block_on(async {
        let mut control = c.control().await;
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            let n = connected(&mut control).await;
            if n == sim.agents {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "batond counts {n} of {} agents connected",
                sim.agents
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    took
}

/// `memory`: `batond`'s resident memory idle, then with N agents
/// connected and heartbeating for `settle`.
pub fn memory(rt: &tokio::runtime::Runtime, agents: usize, settle: Duration) -> Value {
    let c = Coordinator::start(&[]);
    // Idle, after its start-up work.
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss_bytes(c.pid());
    let mut sim = Sim::start(&c, agents, &[]);
    let connect = connect_fleet(rt, &c, &mut sim);
    // Heartbeats flow meanwhile (every agent sends one every few seconds).
    std::thread::sleep(settle);
    let loaded = rss_bytes(c.pid());
    let per_agent = (loaded.saturating_sub(idle)) as f64 / agents as f64;
    json!({
        "scenario": "memory",
        "parameters": {"agents": agents, "settle_s": settle.as_secs_f64()},
        "figures": {
            "bytes_per_agent": per_agent.round(),
            "rss_idle_mb": idle as f64 / 1e6,
            "rss_loaded_mb": loaded as f64 / 1e6,
            "connect_all_ms": ms(connect),
        },
        "targets": {"bytes_per_agent": {"max": 32768}},
    })
}

/// `fanout`: `PingHosts` to N agents, `runs` times.
pub fn fanout(rt: &tokio::runtime::Runtime, agents: usize, runs: usize) -> Value {
    let c = Coordinator::start(&[]);
    let mut sim = Sim::start(&c, agents, &[]);
    connect_fleet(rt, &c, &mut sim);
    let (p50s, p100s) = rt.block_on(async {
        let mut control = c.control().await;
        let (mut p50s, mut p100s) = (vec![], vec![]);
        for run in 0..runs {
            let answer = control
                .ping_hosts(PingHostsRequest {
                    labels: Default::default(),
                    timeout: Some(baton_common::time::to_duration(Duration::from_secs(60))),
                })
                .await
                .unwrap()
                .into_inner();
            let mut times: Vec<f64> = answer
                .hosts
                .iter()
                .map(|h| {
                    assert!(h.error.is_empty(), "{}: {}", h.host_id, h.error);
                    let d = h
                        .answered_after
                        .as_ref()
                        .and_then(baton_common::time::from_duration)
                        .unwrap();
                    ms(d)
                })
                .collect();
            assert_eq!(times.len(), agents, "every agent answers");
            times.sort_by(f64::total_cmp);
            let p50 = times[(times.len() - 1) / 2];
            let p100 = times[times.len() - 1];
            eprintln!("  run {run}: p50 {p50:.1} ms, all {p100:.1} ms");
            p50s.push(p50);
            p100s.push(p100);
        }
        (p50s, p100s)
    });
    json!({
        "scenario": "fanout",
        "parameters": {"agents": agents, "runs": runs},
        "figures": {
            "p50_ms": median(p50s.clone()),
            "p100_ms": median(p100s.clone()),
            "p100_ms_worst": p100s.iter().copied().fold(0.0, f64::max),
            "runs_p100_ms": p100s,
        },
        "targets": {"p100_ms": {"max": 500.0}, "p100_ms_worst": {"max": 500.0}},
    })
}

/// `reconnect`: `batond` stopped (SIGTERM) and started again with N agents
/// connected; how long until every agent is back.
pub fn reconnect(rt: &tokio::runtime::Runtime, agents: usize) -> Value {
    let mut c = Coordinator::start(&[]);
    let mut sim = Sim::start(&c, agents, &[]);
    connect_fleet(rt, &c, &mut sim);
    let (stop, spawned) = c.restart();
    let listening = unix_ms();
    // The first time the whole fleet is connected after the new batond
    // started (an earlier line may still be queued).
    let back = sim
        .next_event("all_connected", Duration::from_secs(120), |v| {
            v["unix_ms"]
                .as_u64()
                .is_some_and(|t| u128::from(t) > spawned)
        })
        .and_then(|v| v["unix_ms"].as_u64())
        .map(u128::from);
    // batond agrees; agents still missing a minute on count as given up.
    let (missing, seen) = rt.block_on(async {
        let mut control = c.control().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let n = connected(&mut control).await;
            if n == agents || Instant::now() > deadline {
                break (agents - n, n);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let status = sim.wait_event("status", Duration::from_secs(10));
    json!({
        "scenario": "reconnect",
        "parameters": {"agents": agents, "reconnect_initial_ms": 100, "reconnect_max_ms": 5000},
        "figures": {
            // Not back within two minutes: the figure says so, far above
            // its target.
            "all_back_ms": back.map_or(120_000.0, |b| b.saturating_sub(spawned) as f64),
            "restart_to_listening_ms": listening.saturating_sub(spawned) as f64,
            "graceful_stop_ms": ms(stop),
            "gave_up": missing,
            "connected_after": seen,
            "failed_attempts": status["failed_attempts"],
        },
        "targets": {"all_back_ms": {"max": 10000.0}, "gave_up": {"max": 0}},
    })
}

/// `rollout`: a real rollout of the `demo` service over N simulated hosts,
/// on the embedded store or on a local etcd with its default limits.
pub fn rollout(
    rt: &tokio::runtime::Runtime,
    hosts: usize,
    max_parallel: usize,
    min_healthy: Duration,
    activation_delay: Duration,
    runs: usize,
    store: &str,
) -> Value {
    let etcd = (store == "etcd").then(|| {
        baton_tests::etcd::Etcd::start()
            .expect("--store etcd needs etcd (apt-get install etcd-server)")
    });
    let url = etcd.as_ref().map(baton_tests::etcd::Etcd::url);
    let mut extra = vec!["--metrics-listen", "127.0.0.1:0"];
    if let Some(url) = &url {
        extra.extend(["--store", url.as_str()]);
    }
    let c = Coordinator::start_with(&[], &extra);
    let metrics = c.batond.metrics.expect("batond serves metrics");
    let delay = format!("{}ms", activation_delay.as_millis());
    let mut sim = Sim::start(&c, hosts, &["--activation-delay", &delay]);
    connect_fleet(rt, &c, &mut sim);
    let batches = hosts.div_ceil(max_parallel);
    let ideal = (activation_delay + min_healthy) * u32::try_from(batches).unwrap();
    let dir = c.env.path("release");
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/service.toml"), "command = \"bin/demo\"\n").unwrap();
    let (key_path, _) = artifact::keygen(&dir.join("release")).unwrap();
    let key = artifact::read_signing_key(&key_path).unwrap();
    let written = || sample(&scrape(metrics), "baton_store_written_bytes").unwrap_or(0.0);
    let mut cpu = vec![];
    let mut bytes = vec![];
    let mut status_ms: Vec<f64> = vec![];
    let actual: Vec<Duration> = rt.block_on(async {
        let mut control = c.control().await;
        let mut actual = vec![];
        for run in 0..runs {
            let version = format!("2.0.{run}");
            let file = dir.join(format!("demo-{version}.baton"));
            artifact::pack(&dir.join("src"), "demo", &version, &key, &file).unwrap();
            let (signed, payload) = artifact::open_artifact(&file).unwrap();
            baton_cli::artifact::push_with(&mut control, signed, payload)
                .await
                .unwrap();
            let plan = format!(
                "[[service]]\nname = \"demo\"\nversion = \"{version}\"\nmax_parallel = {max_parallel}\nmin_healthy_time = \"{}ms\"\n",
                min_healthy.as_millis()
            );
            // What the fleet's arrival (or the previous run) left to do —
            // the registry persisting 10,000 hosts — is not the rollout's:
            // wait until the store is quiet.
            settle(metrics).await;
            let (cpu0, written0) = (cpu_time(c.pid()), written());
            let t0 = Instant::now();
            let id = control
                .start_rollout(StartRolloutRequest { plan })
                .await
                .unwrap()
                .into_inner()
                .id;
            let started = t0.elapsed();
            // `baton rollout status` while it runs: once a second, on its
            // own connection.
            let mut status = c.control().await;
            let poll_id = id.clone();
            let poller = tokio::spawn(async move {
                let mut took = vec![];
                loop {
                    let t = Instant::now();
                    let r = status
                        .get_rollout(GetRolloutRequest { id: poll_id.clone() })
                        .await
                        .unwrap()
                        .into_inner();
                    took.push(ms(t.elapsed()));
                    if baton_engine::is_terminal(&r.state) {
                        return took;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
            eprintln!("  started in {:.2}s", started.as_secs_f64());
            let state = watch_phases(&mut control, &id, t0, max_parallel).await;
            let took = t0.elapsed();
            if state != "succeeded" {
                let r = control
                    .get_rollout(GetRolloutRequest { id: id.clone() })
                    .await
                    .unwrap()
                    .into_inner();
                panic!("rollout {id} ended {state} after {took:?}: {}", r.error);
            }
            status_ms.extend(poller.await.unwrap());
            let (run_cpu, run_bytes) = (
                cpu_time(c.pid()).saturating_sub(cpu0).as_secs_f64(),
                written() - written0,
            );
            cpu.push(run_cpu);
            bytes.push(run_bytes);
            eprintln!(
                "  rollout {version}: {:.3} s, ratio {:.3}, batond cpu {:.2} s, {:.0} bytes written per host",
                took.as_secs_f64(),
                took.as_secs_f64() / ideal.as_secs_f64(),
                run_cpu,
                run_bytes / hosts as f64,
            );
            actual.push(took);
        }
        actual
    });
    let ratios: Vec<f64> = actual
        .iter()
        .map(|d| d.as_secs_f64() / ideal.as_secs_f64())
        .collect();
    let document = scrape(metrics);
    let largest_ops =
        sample(&document, "baton_store_largest_transaction_operations").unwrap_or(0.0);
    let largest_bytes = sample(&document, "baton_store_largest_transaction_bytes").unwrap_or(0.0);
    let registry = registry_hosts(rt, url.as_deref(), hosts);
    let status_max = status_ms.iter().copied().fold(0.0, f64::max);
    json!({
        "scenario": "rollout",
        "parameters": {
            "hosts": hosts,
            "max_parallel": max_parallel,
            "min_healthy_time_ms": min_healthy.as_millis(),
            "activation_delay_ms": activation_delay.as_millis(),
            "runs": runs,
            "store": store,
        },
        "figures": {
            "overhead_ratio": median(ratios.clone()),
            "batches": batches,
            "ideal_s": ideal.as_secs_f64(),
            "actual_s": actual.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
            "ratios": ratios,
            "store_bytes_per_host": median(bytes.iter().map(|b| b / hosts as f64).collect()),
            "batond_cpu_s_per_1000_hosts": median(cpu.iter().map(|s| s * 1000.0 / hosts as f64).collect()),
            "largest_transaction_operations": largest_ops,
            "largest_transaction_bytes": largest_bytes,
            "status_max_ms": status_max,
            "status_median_ms": median(status_ms.clone()),
            "registry_hosts_stored": registry,
        },
        "targets": {
            "overhead_ratio": {"max": 1.05},
            "store_bytes_per_host": {"max": 2048.0},
            "largest_transaction_operations": {"max": 128.0},
            "largest_transaction_bytes": {"max": 1048576.0},
            "status_max_ms": {"max": 200.0},
            "registry_hosts_stored": {"min": hosts},
        },
    })
}

/// How many host records the fleet registry holds in etcd (`url`), read
/// with etcd's own client: each of the `hosts` must be there, the
/// registry's writes split under etcd's 128 operations per transaction.
/// On the embedded store, `hosts`.
#[cfg(feature = "etcd")]
fn registry_hosts(rt: &tokio::runtime::Runtime, url: Option<&str>, hosts: usize) -> usize {
    let Some(url) = url else { return hosts };
    rt.block_on(async {
        let endpoint = url.trim_start_matches("etcd://").to_owned();
        let store = baton_coordinator::store::EtcdStore::connect(&[endpoint])
            .await
            .unwrap();
        use baton_coordinator::store::Store as _;
        store.list("hosts/").await.unwrap().len()
    })
}

/// Without the etcd feature the harness cannot read etcd: -1 (not met).
#[cfg(not(feature = "etcd"))]
fn registry_hosts(_: &tokio::runtime::Runtime, url: Option<&str>, hosts: usize) -> usize {
    if url.is_some() {
        eprintln!("  (baton-bench was built without --features etcd: the registry is not counted)");
        0
    } else {
        hosts
    }
}

/// Watches a rollout to its end, printing when its state changes and when
/// each batch's hosts are healthy (where the time goes); returns its last
/// state.
/// Waits until `batond` writes nothing to its store for half a second
/// (at most 60 s).
async fn settle(metrics: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let txns = || sample(&scrape(metrics), "baton_store_transactions").unwrap_or(0.0);
    let mut last = txns();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = txns();
        if now == last {
            return;
        }
        last = now;
    }
    eprintln!("  the store did not settle within 60 s; measuring anyway");
}

async fn watch_phases(
    control: &mut baton_proto::control::v1::control_service_client::ControlServiceClient<
        tonic::transport::Channel,
    >,
    id: &str,
    t0: Instant,
    batch: usize,
) -> String {
    let mut stream = control
        .watch_rollout(GetRolloutRequest { id: id.to_owned() })
        .await
        .unwrap()
        .into_inner();
    let (mut state, mut batches) = (String::new(), 0);
    let mut line = String::new();
    while let Some(r) = stream.message().await.unwrap() {
        let healthy = r
            .services
            .iter()
            .flat_map(|s| &s.hosts)
            .filter(|h| h.state == "healthy")
            .count();
        let t = t0.elapsed().as_secs_f64();
        if r.state != state {
            line.push_str(&format!(" {t:.2}s:{}", r.state));
            state = r.state.clone();
        }
        if healthy / batch.max(1) > batches {
            batches = healthy / batch.max(1);
            line.push_str(&format!(" {t:.2}s:{healthy}"));
        }
    }
    eprintln!("  phases:{line}");
    state
}
