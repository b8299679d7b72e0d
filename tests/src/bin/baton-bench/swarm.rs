//! `swarm-sim`: batond's real source scheduler (`baton_coordinator::swarm`)
//! driving a simulated fleet's downloads. Every host starts staging at
//! once (the worst case); each has a link of `gbit` Gbit/s each way; a
//! source's upload is shared evenly by the downloads it serves, and a
//! download from a host still fetching can go no further than that host's
//! last checked piece (pipelined). Hosts sent to wait ask again when told.
//! Time advances in steps of 5 ms; the scheduler's own CPU time is
//! measured on the side.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_common::artifact::piece_size_for;
use baton_common::host::HostId;
use baton_coordinator::swarm::{Ask, Source, Swarm, SwarmConfig};
use serde_json::{Value, json};

const STEP: Duration = Duration::from_millis(5);

#[derive(Clone, Copy, PartialEq)]
enum From {
    Nobody,
    Coordinator,
    Peer(usize),
}

struct Host {
    id: HostId,
    got: u64,
    from: From,
    done: bool,
    ask_at: Duration,
}

/// One simulated staging of `size_mb` MB over `hosts` hosts.
// Hosts are numbered, as the scheduler's answers name them.
#[allow(clippy::needless_range_loop)]
fn simulate(hosts: usize, size_mb: u64, gbit: f64, zones: usize) -> Value {
    let size = size_mb * 1_000_000;
    let piece = piece_size_for(size);
    let link = gbit * 1e9 / 8.0; // bytes per second, each way
    let config = SwarmConfig::default();
    let base = Instant::now();
    let mut swarm = Swarm::new(config, base);
    let mut fleet: Vec<Host> = (0..hosts)
        .map(|i| Host {
            id: HostId::try_from(format!("h{i}")).unwrap(),
            got: 0,
            from: From::Nobody,
            done: false,
            ask_at: Duration::ZERO,
        })
        .collect();
    let addr = |i: usize| SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 7445));
    let index = |id: &HostId| id.as_str()[1..].parse::<usize>().unwrap();
    let (mut t, mut asks, mut waits) = (Duration::ZERO, 0u64, 0u64);
    let mut scheduler = Duration::ZERO;
    let mut from_coordinator = 0u64;
    let mut done = 0;
    let mut children = vec![0u32; hosts + 1]; // the last: the coordinator
    let limit = Duration::from_secs(600);
    while done < hosts && t < limit {
        // Hosts without a source ask.
        let busy = children[hosts];
        let mut busy_now = busy;
        for i in 0..hosts {
            let h = &fleet[i];
            if h.done || h.from != From::Nobody || h.ask_at > t {
                continue;
            }
            let ask = Ask {
                offset: h.got,
                serve: Some(addr(i)),
                zone: Some(format!("z{}", i % zones)),
                rack: None,
                ..Ask::default()
            };
            let t0 = Instant::now();
            let answer = swarm.ask(&fleet[i].id.clone(), ask, busy_now, base + t);
            scheduler += t0.elapsed();
            asks += 1;
            match answer {
                Source::Coordinator => {
                    fleet[i].from = From::Coordinator;
                    children[hosts] += 1;
                    busy_now += 1;
                }
                Source::Peer(p, _) => {
                    let p = index(&p);
                    fleet[i].from = From::Peer(p);
                    children[p] += 1;
                }
                Source::Wait(after) => {
                    waits += 1;
                    fleet[i].ask_at = t + after;
                }
                Source::Done => {}
            }
        }
        // Bytes move for one step; the checked offset of each source is
        // read as it was at the step's start.
        let checked: Vec<u64> = fleet
            .iter()
            .map(|h| if h.done { size } else { h.got / piece * piece })
            .collect();
        let step = STEP.as_secs_f64();
        for i in 0..hosts {
            let (from, got) = (fleet[i].from, fleet[i].got);
            let (share, ceiling) = match from {
                From::Nobody => continue,
                From::Coordinator => (link / f64::from(children[hosts].max(1)), size),
                From::Peer(p) => (link / f64::from(children[p].max(1)), checked[p]),
            };
            let rate = share.min(link);
            let next = (got + (rate * step) as u64).min(ceiling).min(size);
            if from == From::Coordinator {
                from_coordinator += next - got;
            }
            fleet[i].got = next;
        }
        t += STEP;
        for i in 0..hosts {
            if fleet[i].done || fleet[i].got < size {
                continue;
            }
            fleet[i].done = true;
            done += 1;
            match fleet[i].from {
                From::Coordinator => children[hosts] -= 1,
                From::Peer(p) => children[p] -= 1,
                From::Nobody => {}
            }
            fleet[i].from = From::Nobody;
            let ask = Ask {
                offset: size,
                serve: Some(addr(i)),
                zone: Some(format!("z{}", i % zones)),
                done: true,
                ..Ask::default()
            };
            let t0 = Instant::now();
            swarm.ask(&fleet[i].id.clone(), ask, children[hosts], base + t);
            scheduler += t0.elapsed();
            asks += 1;
        }
    }
    let one_host = size as f64 / link;
    json!({
        "hosts": hosts,
        "staged": done,
        "seconds": t.as_secs_f64(),
        "one_host_seconds": one_host,
        "coordinator_egress_ratio": from_coordinator as f64 / size as f64,
        "asks": asks,
        "waits": waits,
        "scheduler_us_per_ask": scheduler.as_secs_f64() * 1e6 / asks.max(1) as f64,
        "scheduler_ms_total": scheduler.as_secs_f64() * 1e3,
    })
}

/// `swarm-sim`: the same staging at `hosts / 100`, `hosts / 10` and
/// `hosts` hosts, so that its cost is seen growing with the fleet.
pub fn swarm_sim(hosts: usize, size_mb: u64, gbit: f64) -> Value {
    let mut runs = vec![];
    for n in [hosts / 100, hosts / 10, hosts] {
        let n = n.max(2);
        let r = simulate(n, size_mb, gbit, 10);
        eprintln!(
            "  {n} hosts: staged in {:.2}s (one host alone {:.2}s), coordinator egress {:.2}× the artifact, scheduler {:.1} µs per ask",
            r["seconds"].as_f64().unwrap(),
            r["one_host_seconds"].as_f64().unwrap(),
            r["coordinator_egress_ratio"].as_f64().unwrap(),
            r["scheduler_us_per_ask"].as_f64().unwrap(),
        );
        runs.push(r);
    }
    // The full size is the figure; the smaller runs show how it grows.
    let last = runs.last().cloned().expect("three runs were made");
    json!({
        "scenario": "swarm-sim",
        "parameters": {"hosts": hosts, "size_mb": size_mb, "gbit_per_host": gbit},
        "figures": {
            "staged_seconds": last["seconds"],
            "coordinator_egress_ratio": last["coordinator_egress_ratio"],
            "scheduler_us_per_ask": last["scheduler_us_per_ask"],
            "runs": runs,
        },
        "targets": {"staged_seconds": {"max": 60.0}, "coordinator_egress_ratio": {"max": 2.0}},
    })
}

/// Stages a `size_mb` MB release on `agents` real agents serving each
/// other (`--peer-listen`), all at once; the time until every agent has
/// it staged, and what `batond` sent.
fn stage_on(agents: usize, size_mb: usize) -> (Duration, f64) {
    use baton_tests::fleet::Fleet;
    let names: Vec<String> = (1..=agents).map(|i| format!("p{i:03}")).collect();
    let hosts: Vec<(&str, &[&str])> = names
        .iter()
        .map(|h| (h.as_str(), &["role=web"][..]))
        .collect();
    let fleet = Fleet::start_with(
        &hosts,
        &[],
        &["--metrics-listen", "127.0.0.1:0"],
        &["--peer-listen", "127.0.0.2:0"],
    );
    let dir = fleet.release_dir("1.0.0", false);
    let mut noise = vec![0u8; size_mb << 20];
    fastrand::Rng::with_seed(3).fill(&mut noise);
    std::fs::write(dir.join("noise.bin"), &noise).unwrap();
    drop(noise);
    let file = fleet.pack_with(&dir, "1.0.0", &fleet.env.path("release.key"));
    let digest = fleet.push(&file);
    let size = std::fs::metadata(
        fleet
            .env
            .path("batond/blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .unwrap()
    .len();
    let sent = || {
        let doc = baton_tests::http::scrape(fleet.batond.metrics.unwrap());
        baton_common::metrics::sample(&doc, "baton_artifact_sent_bytes_total").unwrap()
    };
    let before = sent();
    let t0 = Instant::now();
    let id = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"1.0.0\"\nhosts = { role = \"web\" }\nstrategy = \"all-at-once\"\nmin_healthy_time = \"100ms\"\n",
    );
    baton_tests::wait_until("every agent to stage", Duration::from_secs(600), || {
        names
            .iter()
            .all(|h| {
                fleet
                    .data_dir(h)
                    .join("services/demo/releases/1.0.0/service.toml")
                    .exists()
            })
            .then_some(())
    });
    let took = t0.elapsed();
    let s = fleet.wait_done(&id, Duration::from_secs(600));
    assert_eq!(s["state"], "succeeded", "{s}");
    (took, (sent() - before) / size as f64)
}

/// `peers`: a release staged by one real agent, then by `agents` real
/// agents serving each other: the time each took and `batond`'s egress.
pub fn peers(agents: usize, size_mb: usize) -> Value {
    let (one, _) = stage_on(1, size_mb);
    eprintln!("  1 agent: staged in {:.2}s", one.as_secs_f64());
    let (many, egress) = stage_on(agents, size_mb);
    eprintln!(
        "  {agents} agents: staged in {:.2}s, batond sent {egress:.2}× the artifact",
        many.as_secs_f64()
    );
    json!({
        "scenario": "peers",
        "parameters": {"agents": agents, "size_mb": size_mb},
        "figures": {
            "one_agent_seconds": one.as_secs_f64(),
            "all_agents_seconds": many.as_secs_f64(),
            "time_ratio": many.as_secs_f64() / one.as_secs_f64(),
            "coordinator_egress_ratio": egress,
        },
        "targets": {"coordinator_egress_ratio": {"max": 2.0}, "time_ratio": {"max": 2.0}},
    })
}
