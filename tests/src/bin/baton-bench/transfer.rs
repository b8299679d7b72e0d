//! The agent-side scenarios: staging a large artifact, and what an idle
//! agent costs its host.

use std::time::{Duration, Instant};

use baton_common::artifact;
use baton_common::tls::ClientTls;
use baton_proto::agent::v1::artifact_service_client::ArtifactServiceClient;
use baton_tests::{AgentOpts, start_agent};
use serde_json::{Value, json};

use crate::common::{
    Coordinator, bytes_written, connected, cpu_between, cpu_time, median, rss_anon_bytes,
    rss_bytes, thread_cpu_ns,
};
use crate::datapath;

/// `artifact`: a signed artifact of `size_mb` MB staged by `agents`
/// agents at once, `runs` times after one warm-up run: each agent verifies the signature and
/// downloads the payload with the agent's own code (asks batond for a
/// source, then a resumable stream over its own mTLS connection, each
/// piece checked against its signed hash as it is written to disk).
pub fn artifact(rt: &tokio::runtime::Runtime, size_mb: usize, agents: usize, runs: usize) -> Value {
    let names: Vec<String> = (1..=agents).map(|i| format!("bench-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let c = Coordinator::start(&refs);
    let dir = c.env.path("artifact");
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("service.toml"), "command = \"bin/x\"\n").unwrap();
    let mut noise = vec![0u8; size_mb << 20];
    fastrand::Rng::with_seed(1).fill(&mut noise);
    std::fs::write(src.join("payload.bin"), &noise).unwrap();
    drop(noise);
    let (key_path, public) = artifact::keygen(&dir.join("release")).unwrap();
    let key = artifact::read_signing_key(&key_path).unwrap();
    let trusted = vec![artifact::read_public_key(&public).unwrap()];
    let file = dir.join("big.baton");
    let signed = artifact::pack(&src, "big", "1.0.0", &key, &file).unwrap();
    std::fs::remove_dir_all(&src).unwrap();
    let size = signed.manifest.size;

    let (rates, aggregate, egress, cpu) = rt.block_on(async {
        let mut control = c.control().await;
        let (s, payload) = artifact::open_artifact(&file).unwrap();
        baton_cli::artifact::push_with(&mut control, s, payload)
            .await
            .unwrap();
        let mut clients = vec![];
        for name in &names {
            let tls = ClientTls::load(&c.env.tls(), &format!("agent-{name}")).unwrap();
            // The agent's own settings for reaching its coordinator.
            let channel = baton_agent::connection::endpoint(&c.url(), &tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            clients.push(ArtifactServiceClient::new(channel).max_decoding_message_size(8 << 20));
        }
        let (mut rates, mut aggregate, mut egress) = (vec![], vec![], vec![]);
        let me = std::process::id() as i32;
        // CPU time of batond, and of this process (the agent's code).
        let mut cpu = (Duration::ZERO, Duration::ZERO);
        // Run 0 warms up and is not counted: the payload was just written
        // by the push and is still being flushed to disk, which a real
        // rollout, staged long after its push, does not meet.
        for run in 0..=runs {
            let written = bytes_written(c.pid());
            let cpu0 = (cpu_time(c.pid()), cpu_time(me));
            let t0 = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for (i, client) in clients.iter().enumerate() {
                let client = client.clone();
                let signed = signed.clone();
                let trusted = trusted.clone();
                let dest = dir.join(format!("download-{run}-{i}"));
                tasks.spawn(async move {
                    let t0 = Instant::now();
                    signed.verify(&trusted).unwrap();
                    // The agent's path for artifacts with piece hashes
                    // (every one `baton artifact pack` makes): batond as
                    // the source, each piece checked as it arrives.
                    let seeds = std::sync::Arc::new(baton_agent::peers::Seeds::default());
                    let coordinator = move || client.clone();
                    let sources = baton_agent::executor::swarm::Sources {
                        coordinator: &coordinator,
                        tls: None,
                        seeds: &seeds,
                        serve: None,
                        serve_for: Duration::ZERO,
                    };
                    baton_agent::executor::swarm::download(
                        sources,
                        &signed.manifest,
                        &dest,
                        Default::default(),
                        |_| {},
                    )
                    .await
                    .unwrap();
                    let took = t0.elapsed();
                    std::fs::remove_file(&dest).unwrap();
                    took
                });
            }
            let mut this_run = vec![];
            while let Some(took) = tasks.join_next().await {
                this_run.push(size as f64 / took.unwrap().as_secs_f64() / 1e6);
            }
            let wall = t0.elapsed();
            let sent = bytes_written(c.pid()) - written;
            let total = (size * agents as u64) as f64 / wall.as_secs_f64() / 1e6;
            eprintln!(
                "  run {run}: per agent {} MB/s, all agents {total:.0} MB/s, egress {:.3}× the artifact",
                this_run
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join("/"),
                sent as f64 / size as f64
            );
            if run == 0 {
                continue;
            }
            cpu.0 += cpu_time(c.pid()).saturating_sub(cpu0.0);
            cpu.1 += cpu_time(me).saturating_sub(cpu0.1);
            rates.extend(this_run);
            aggregate.push(total);
            egress.push(sent as f64 / size as f64);
        }
        (rates, aggregate, egress, cpu)
    });
    let moved = (size * (agents * runs) as u64) as f64;
    let sha = datapath::sha256_mb_per_s();
    // What bounds the rate here, each step measured alone, and the
    // leanest data path doing the same work (see `datapath`).
    let aes = datapath::aes_gcm_mb_per_s();
    let disk = datapath::disk_write_mb_per_s(&dir, size);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    // Both ends share these cores: the sender seals every byte, the agent
    // opens and hashes it; nothing else (no copy, no syscall, no write)
    // is counted, and the work is taken as spread perfectly.
    let cpu_bound = cores / (1.0 / sha + 2.0 / aes);
    let (lean, lean_cpu) = {
        let (_, mut reader) = artifact::open_artifact(&file).unwrap();
        let mut payload = Vec::with_capacity(size as usize);
        std::io::Read::read_to_end(&mut reader, &mut payload).unwrap();
        assert_eq!(
            payload.len() as u64,
            size,
            "the payload ends the artifact file"
        );
        datapath::lean_tls(&payload, &signed.manifest, &dir, runs)
    };
    json!({
        "scenario": "artifact",
        "parameters": {"size_mb": size_mb, "agents": agents, "runs": runs, "payload_bytes": size},
        "figures": {
            "verify_mb_per_s": median(rates.clone()),
            "aggregate_mb_per_s": median(aggregate),
            "coordinator_egress_ratio": median(egress),
            "sha256_mb_per_s": sha,
            "aes_256_gcm_mb_per_s": aes,
            "disk_write_mb_per_s": disk,
            "cpu_bound_mb_per_s": cpu_bound,
            "lean_tls_mb_per_s": lean,
            "batond_cpu_ns_per_byte": cpu.0.as_nanos() as f64 / moved,
            "agent_cpu_ns_per_byte": cpu.1.as_nanos() as f64 / moved,
            "lean_tls_cpu_ns_per_byte": lean_cpu,
            "per_agent_runs_mb_per_s": rates,
        },
        // The target is for one agent with the machine to itself; several
        // at once share the coordinator and the cores.
        "targets": if agents == 1 {
            json!({"verify_mb_per_s": {"min": 1500.0}})
        } else {
            json!({})
        },
    })
}

/// `agent-idle`: one real `baton-agent` connected and idle for `seconds`.
pub fn agent_idle(rt: &tokio::runtime::Runtime, seconds: Duration) -> Value {
    let c = Coordinator::start(&["idle-1"]);
    let agent = start_agent(&c.env, &c.url(), AgentOpts::new("idle-1"));
    let pid = agent.pid().as_raw();
    let is_connected = || rt.block_on(async { connected(&mut c.control().await).await == 1 });
    baton_tests::wait_until("the agent to connect", baton_tests::SOON, || {
        is_connected().then_some(())
    });
    // Past its start-up work.
    std::thread::sleep(Duration::from_secs(2));
    let (ticks0, threads0) = (cpu_time(pid), thread_cpu_ns(pid));
    let t0 = Instant::now();
    std::thread::sleep(seconds);
    let (ticks, threads) = (cpu_time(pid), thread_cpu_ns(pid));
    let wall = t0.elapsed();
    // The precise per-thread count, unless threads that ended meanwhile
    // took more (the tick count includes them).
    let cpu = cpu_between(&threads0, &threads).max(ticks.saturating_sub(ticks0));
    let (rss, anon) = (rss_bytes(pid), rss_anon_bytes(pid));
    assert!(is_connected(), "the agent stayed connected");
    json!({
        "scenario": "agent-idle",
        "parameters": {"seconds": seconds.as_secs_f64()},
        "figures": {
            "rss_mb": rss as f64 / 1e6,
            "rss_anon_mb": anon as f64 / 1e6,
            "cpu_percent": cpu.as_secs_f64() / wall.as_secs_f64() * 100.0,
            "cpu_ms": cpu.as_secs_f64() * 1e3,
        },
        "targets": {"rss_mb": {"max": 10.0}, "cpu_percent": {"max": 0.1}},
    })
}
