//! `BENCHMARKS.md`, rendered from the results of `baton-bench all`.

use std::fmt::Write as _;

use serde_json::Value;

/// What each scenario measures, and the field's figure to compare with.
struct About {
    scenario: &'static str,
    title: &'static str,
    what: &'static str,
    field: &'static str,
    /// Shown when a target of the scenario is missed: where the time or
    /// the memory goes, as measured.
    when_missed: &'static str,
}

const ABOUT: &[About] = &[
    About {
        scenario: "memory",
        title: "Coordinator memory per agent",
        what: "`batond` alone, idle, then with every simulated agent connected over its own mutual-TLS \
connection and heartbeating for `settle_s` seconds. `bytes_per_agent` = (resident memory with the \
agents − resident memory idle) ÷ agents. `connect_all_ms` is from the simulator's first connection \
attempt (512 at a time) until the last agent was welcomed.",
        when_missed: "heaptrack on `batond` puts the live heap per agent at about 54 KB, most of it \
fixed by the libraries under tonic: h2's 16 KiB connection write buffer and 8 KiB frame read buffer, \
a 4 KiB HPACK buffer, rustls' 4 KiB record buffer, three tasks per stream (hyper's connection, the \
HTTP/2 stream, ours), h2's stream slabs and the TLS state. What Baton controls was cut from about \
22 KiB to under 3 KiB (256-byte codec buffers instead of 8 KiB each way, boxed outbound channel \
slots); the rest needs a leaner HTTP/2 server or lazily allocated buffers upstream. \
[ARCHITECTURE.md](ARCHITECTURE.md) has the table.",
        field: "grpc-go spends about 96 KB per connection with its default buffers (\"We would expect 96KB \
per connection with the defaults\", [grpc/grpc-go#3728](https://github.com/grpc/grpc-go/issues/3728)); \
\"with 1000 connections open, those buffers consume 100MB\" ([grpc/grpc-go#5751](https://github.com/grpc/grpc-go/issues/5751)).",
    },
    About {
        scenario: "fanout",
        title: "Fan-out: a command to every agent and every answer back",
        what: "`PingHosts` (what `baton ping` calls) sends a no-op command down every connected agent's \
stream at once and waits for every acknowledgement. `p50_ms`/`p100_ms` are the median and the last \
answer's time from the start of the fan-out, as `batond` measured it; the figure is the median over \
the runs; `p100_ms_worst` is the slowest run, and is held to the target too. Agents answer a no-op \
at once, without journaling it.",
        when_missed: "",
        field: "Kubernetes' SLO for mutating API calls is a 99th percentile ≤ 1 s per cluster-day, for \
clusters up to 5,000 nodes ([sig-scalability SLO](https://github.com/kubernetes/community/blob/master/sig-scalability/slos/api_call_latency.md)); \
Nomad placed 1,000,000 containers on 5,000 hosts in under 5 minutes, 3,750 a second ([C1M](https://www.hashicorp.com/c1m)).",
    },
    About {
        scenario: "reconnect",
        title: "Reconnect storm after a coordinator restart",
        what: "With every agent connected, `batond` is stopped with SIGTERM (it closes every stream) and \
started again on the same address and data. `all_back_ms` runs from the new process's spawn until the \
last agent is welcomed again; `batond` then confirms the count. The simulated agents use the real \
agent's capped, jittered exponential backoff (100 ms doubling to 5 s), are not held back in any other \
way (the first connect of the fleet is, 512 at a time), and never give up; `gave_up` counts agents \
still missing a minute later.",
        when_missed: "",
        field: "Nomad clients heartbeat every 20–40 s at 1,000 clients and 100–200 s at 5,000, with a 10 s \
grace ([Nomad server configuration](https://developer.hashicorp.com/nomad/docs/configuration/server)); \
Kubernetes marks a silent node unhealthy after 50 s (`node-monitor-grace-period`, [kubernetes#126287](https://github.com/kubernetes/kubernetes/pull/126287)).",
    },
    About {
        scenario: "rollout",
        title: "Rollout overhead over simulated hosts",
        what: "A real rollout (staging on every host, then batches of `max_parallel`) of a pushed, signed \
artifact over simulated hosts whose activation takes `activation_delay_ms` plus the plan's \
`min_healthy_time`. *Actual* runs from `StartRollout` until `WatchRollout` reports `succeeded`; \
*ideal* = batches × (activation delay + `min_healthy_time`), the time the health gates alone take. `store_bytes_per_host`: bytes of keys and values `batond` wrote to its store during the rollout, per host (`baton_store_written_bytes`); `largest_transaction_*`: the largest transaction since `batond` started (etcd allows 128 operations and 1.5 MiB); `batond_cpu_s_per_1000_hosts`: `batond`'s CPU time during the rollout; `status_*_ms`: `GetRollout` (what `baton rollout status` calls) once a second during it, on its own connection; `registry_hosts_stored`: host records the fleet registry holds in the store at the end. With `--store etcd` the harness starts a local etcd with its default limits.",
        when_missed: "At 10,000 hosts about 1 s goes above the ideal, nearly all of it before the first batch, while the 10,000 simulated agents, `batond` (and etcd) share the two cores: answering `StartRollout` and sending the first commands (resolving 10,000 hosts, storing them, sending 10,000 `Stage` commands: about 0.16 s), then staging (10,000 commands and 10,000 answers over TLS: about 0.55 s, of which `batond` spends about 0.43 s writing ~35 steps, each a record of staged marks and the step's events in one transaction); each batch then takes about 1.08 s against 1.05 s. `BATON_TEST_RUST_LOG=info,baton_coordinator::rollout=debug` shows it in `batond`'s log: the time to resolve and start a plan, and where the driver's time goes once a second.",
        field: "Nomad's `update` block, Argo Rollouts and CodeDeploy publish no overhead figure; their \
steps are gated by polling intervals (e.g. Argo Rollouts' analysis `interval`), which this ratio would include.",
    },
    About {
        scenario: "analysis",
        title: "Analysis: catching a bad canary, never aborting a good one",
        what: "The coordinator's judge (`baton_engine::analysis::judge`, the code `batond` runs) on \
generated counters, bake after bake as the runner calls it: 10 hosts, 1 of them (10 %) on the new \
version, 100 requests a second each, one sample per host and interval (the ratio of the increases \
of an error and a request counter), an early look after every interval once `min_samples` are in and \
the last look after `duration`. Realistic noise: each host has its own error rate (log-normal around \
the fleet's, σ = 0.15), Poisson request counts and Poisson error counts around the rate times a \
per-interval fluctuation (log-normal, σ = 0.1). `detected_within_3m`: the share of 1,000 trials whose \
canary goes from 1 % to 2 % errors that fail within 3 minutes (`detect_p50_s`, `detect_p90_s`: when); \
`false_abort_rate`: the share of 1,000 A/A trials (1 % on both versions) that fail. The check is \
`baseline = true`, `tolerance = 0.3`, `interval = \"5s\"`, `duration = \"3m\"`, `min_samples = 5`, \
`confidence = 0.99`. `bake_10000_hosts_ms` is one whole bake over 10,000 hosts (1,000 new), every \
look's test included. The seed is fixed, so a run gives the same figures. End to end, \
`tests/e2e/analysis.rs` rolls a release failing 5 % of its requests out to real agents and sees it \
failed after its first batch by an early look, before its 5-second bake ends (the whole test, \
installation included, takes about 4 s here).",
        when_missed: "",
        field: "Kayenta's guidance is canary analyses several hours long; Flagger judges request \
success rate and latency against fixed thresholds every `interval`, without a baseline \
([flagger#225](https://github.com/fluxcd/flagger/issues/225), open since 2019).",
    },
    About {
        scenario: "artifact",
        title: "Artifact staging: download, hash and signature check",
        what: "K agents at once each verify the ed25519 signature of a signed artifact and download its \
payload (random bytes, so zstd cannot shrink it) from a real `batond` with the agent's own code \
(`baton_agent::executor::swarm::download`: `ArtifactService.Source` names `batond`, then a resumable \
`ArtifactService.Fetch` stream over the agent's own mutual-TLS connection, each 4 MiB piece checked \
against its signed SHA-256 as it is written to disk). `verify_mb_per_s` is \
per agent (median); `coordinator_egress_ratio` = bytes `batond` wrote to its sockets (`wchar` in \
`/proc/PID/io`) ÷ artifact size. A first, uncounted run warms up: the push has just written the \
payload, and its flush to disk would otherwise compete with the first download. \
What bounds the rate, each measured alone on this machine: `sha256_mb_per_s` (SHA-256 on one core, \
the agent's implementation), `aes_256_gcm_mb_per_s` (ring's AES-256-GCM, the cipher both ends of \
the connection run, on one core, 16 KiB records), `disk_write_mb_per_s` (the payload's size written \
to a new file in the same directory and synced, as a staged download is); `cpu_bound_mb_per_s` = \
cores ÷ (1/SHA-256 + 2/AES-GCM), the most any data path could reach with both ends sharing this \
machine's cores and nothing but hashing and the cipher counted. `batond_cpu_ns_per_byte` and \
`agent_cpu_ns_per_byte`: CPU time (user and system) of each end per byte staged. \
`lean_tls_mb_per_s` and `lean_tls_cpu_ns_per_byte`: the leanest data path there could be, measured \
for comparison (`baton-bench`'s `datapath.rs`, not Baton's code): the payload over one bare TLS 1.3 \
stream on loopback, no HTTP/2, no protobuf, one thread sending, one receiving and one writing and \
checking every piece, then syncing, as the agent does.",
        when_missed: "Measured on this machine (2 shared vCPUs, kernel 6.18 under Firecracker) with \
this run's figures and, for the transport without the disk, the same command with \
`TMPDIR=/dev/shm` (tmpfs): the Fetch path 384 MB/s, the lean TLS stream 684 MB/s, at 4.7 and 2.6 ns \
of CPU per byte for both ends together.\n\n\
- **The disk.** A download counts as staged once synced: writing the payload and syncing it takes \
this disk about 0.4 s alone (`disk_write_mb_per_s` ≈ 500), so no data path stages 200 MB here at \
1,500 MB/s. On disk, the lean stream reaches only 1.3 times the Fetch path.\n\
- **The CPU.** SHA-256 runs at about 1,450 MB/s on one core of this VM, so checking alone takes most \
of a core at the target; `cpu_bound_mb_per_s` (about 1,900) counts only hashing and the cipher \
at both ends. Every copy between kernel and user space, the page cache's page allocation and \
loopback TCP come on top.\n\n\
What was measured, and what was chosen:\n\n\
- *Kernel TLS with `sendfile`:* not available here. This kernel is built without `CONFIG_TLS` \
(`/proc/sys/net/ipv4/tcp_available_ulp` lists only `mptcp`). Without it, `sendfile` cannot be \
used on a TLS connection, because user space has to encrypt every byte anyway.\n\
- *A leaner data path:* the bare TLS stream above. It uses 45% less CPU per byte than gRPC, \
which copies each chunk into protobuf and HTTP/2 buffers at both ends. But it is still 2.2 \
times short of the target on tmpfs, and 5.4 times short on disk.\n\
- *Choice:* payloads stay on `ArtifactService.Fetch`. A second protocol would need its own \
authentication, limits, resumption and peer serving for a 1.3-fold gain on this machine's disk. \
It is the first step if hosts with NVMe disks and free cores need more than about 700 MB/s per \
agent (see ARCHITECTURE.md).\n\n\
An earlier machine of this kind (kernel 6.18.44-fc-v1098) measured 565 MB/s for this command.",
        field: "SHA-256 with the SHA extensions runs at 1,979 MB/s on one core of a 3.7 GHz Ryzen 7 2700X \
([minio/sha256-simd](https://github.com/minio/sha256-simd)): staging cannot beat hashing.",
    },
    About {
        scenario: "swarm-sim",
        title: "Peer-to-peer staging at fleet scale (simulated links, the real scheduler)",
        what: "`batond`'s source scheduler (`baton_coordinator::swarm`, the code `ArtifactService.Source` \
runs) driving a simulated fleet's downloads: every host starts staging at the same instant (the worst \
case); each host has `gbit_per_host` each way; a source's upload is shared evenly by the downloads it \
serves; a download from a host still fetching goes no further than that host's last checked 4 MiB \
piece (pipelined); time advances in 5 ms steps. Run at hosts ÷ 100, hosts ÷ 10 and hosts, so that the \
cost is seen growing with the fleet. `staged_seconds`: until the last host holds every byte; \
`coordinator_egress_ratio`: bytes `batond` served ÷ artifact; `scheduler_us_per_ask`: the scheduler's \
own CPU time per question, measured. Not simulated: connection set-up, failures, disk and CPU.",
        when_missed: "",
        field: "Uber's Kraken: a 3 GB image to 2,600 hosts in 10 s at the median, 18 s at p99 \
([Kraken](https://github.com/uber/kraken)); Dragonfly: a 200 MB file to 1,200 clients in about 12 s \
([Dragonfly](https://d7y.io/)).",
    },
    About {
        scenario: "peers",
        title: "Peer-to-peer staging on real agents",
        what: "A release carrying `size_mb` MB of random bytes is staged (downloaded, every piece \
checked, unpacked) by one real `baton-agent`, then by `agents` real agents started with \
`--peer-listen`, all at once (a rollout with `strategy = \"all-at-once\"`): the time until every \
agent's release directory exists, and the bytes `batond` sent (`baton_artifact_sent_bytes_total`) ÷ \
the payload.",
        when_missed: "All the agents run on this machine's two cores and one disk: each checks, writes and \
unpacks its own copy (50 × 200 MB is 10 GB hashed and 20 GB written), so K agents do K times one \
agent's work on the same cores and disk and `time_ratio` grows with K whatever the network does. The bound is for a fleet whose hosts each have their own CPU and \
link, which `swarm-sim` models; `coordinator_egress_ratio` is what this run can show.",
        field: "",
    },
    About {
        scenario: "agent-idle",
        title: "An idle agent's cost to its host",
        what: "One real `baton-agent`, connected to `batond` and idle (heartbeats only) for `seconds`: \
its resident memory at the end and its CPU time over the period: the larger of the threads' own \
count (`/proc/PID/task/TID/schedstat`, in nanoseconds) and the process's (`/proc/PID/stat`, in \
10 ms ticks, which also counts threads that ended meanwhile) — an upper bound. \
`rss_anon_mb` is the part that is the agent's own (heap and stacks); the rest is the binary's \
code, shared with every other process running it.",
        when_missed: "",
        field: "The AWS CodeDeploy agent: \"about 45 MiB\" idle, about 100 MiB after two deployments \
([aws-codedeploy-agent#32](https://github.com/aws/aws-codedeploy-agent/issues/32)); a Consul client \
peaked at 87 MB in HashiCorp's ECS tests ([Consul on ECS](https://developer.hashicorp.com/consul/docs/v1.11.x/ecs/task-resource-usage)).",
    },
    About {
        scenario: "rollout-agents",
        title: "Rollout overhead on real agents",
        what: "12 real `baton-agent` processes, the demo service (an HTTP server) on each, checked by an \
`http` health check every 200 ms. Each run rolls a new version out 3 at a time: staging, then \
batches of swap, stop, start and health gate. *Ideal* = batches × (process start + `min_healthy_time`).",
        field: "",
        when_missed: "",
    },
    About {
        scenario: "handoff",
        title: "Zero-downtime upgrades under load",
        what: "`wrk -t2 -c16 --latency` against one host's demo service while it is upgraded 20 times \
in a row (each a real rollout with `min_healthy_time = 200ms`). With `listen` the agent hands the \
socket to each new process and the old one drains; the baseline is the same run without `listen` \
(stop, then start).",
        field: "",
        when_missed: "",
    },
    About {
        scenario: "traffic",
        title: "Draining through a load balancer",
        what: "Three real agents behind a real HAProxy (roundrobin, `option httpchk` every 200 ms), the \
demo service without `listen` (stop, then start) and closing its connections at once when told to \
stop, as most services without socket activation do. `wrk -t2 -c16` asks for `/slow?ms=20` through \
HAProxy while the hosts are upgraded 10 times, one at a time (`min_healthy_time = 500ms`): drained by \
`[service.traffic]` (`kind = \"haproxy\"`, run by `batond`), then the same without. `rollout_s` is the \
median rollout; `overhead_s_per_host` = (drained − baseline) ÷ hosts: the drain, the return and the \
wait for HAProxy to see the host up.",
        field: "AWS CodeDeploy's in-place deployments behind an ELB deregister each instance and wait \
for the target group's deregistration delay, 300 s by default \
([CodeDeploy and ELB](https://docs.aws.amazon.com/codedeploy/latest/userguide/integrations-aws-elastic-load-balancing.html)).",
        when_missed: "",
    },
];

fn figure(v: &Value) -> String {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 || f.abs() >= 100.0 => format!("{f:.0}"),
            Some(f) if f.abs() >= 10.0 => format!("{f:.1}"),
            Some(f) => format!("{f:.3}"),
            None => n.to_string(),
        },
        Value::Array(items) => items.iter().map(figure).collect::<Vec<_>>().join(", "),
        Value::Object(_) => "(see JSON)".into(),
        other => other.to_string(),
    }
}

fn bound(b: &Value) -> String {
    match (b["max"].as_f64(), b["min"].as_f64()) {
        (Some(m), _) => format!("≤ {}", figure(&m.into())),
        (_, Some(m)) => format!("≥ {}", figure(&m.into())),
        _ => String::new(),
    }
}

/// The wrk runs of a scenario, a row each.
fn wrk_table(out: &mut String, r: &Value, rows: &[(&str, &str)]) {
    if rows.is_empty() {
        return;
    }
    let _ = write!(
        out,
        "\n| run | requests | req/s | socket errors | non-2xx | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|---|---|\n"
    );
    for (label, key) in rows {
        let w = &r["figures"][key];
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} | {} | {} | {} | {} |",
            w["requests"],
            w["requests_per_s"],
            w["socket_errors"],
            w["non_2xx"],
            figure(&w["p50_ms"]),
            figure(&w["p99_ms"]),
            figure(&w["max_ms"])
        );
    }
}

/// The report.
pub fn markdown(machine: &Value, results: &[Value]) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "# Benchmarks\n\n\
Measured by `baton-bench` (`tests/src/bin/baton-bench/`) with release builds on {} cores \
({}), {} GiB of memory, Linux {}, an open-file limit of {} per process. `batond`, the fleet \
simulator `baton-sim` and the benchmark are separate processes sharing those cores.\n\n\
Regenerate this file with:\n\n```sh\nbash .ci/bench\n```\n\n\
(`cargo build --release --workspace && target/release/baton-bench all --markdown BENCHMARKS.md`). \
Each scenario also runs alone and prints one JSON document; its command is given below. \
The measurements are kept in `BENCHMARKS.json`; `baton-bench render --json BENCHMARKS.json --markdown \
BENCHMARKS.md` renders this file again from them.\n\n\
## Summary\n\n| scenario | figure | result | target | |\n|---|---|---|---|---|\n",
        machine["cores"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["open_files"],
    );
    for r in results {
        let Some(targets) = r["targets"].as_object() else {
            continue;
        };
        for (name, b) in targets {
            let v = &r["figures"][name];
            let ok = b["max"]
                .as_f64()
                .is_none_or(|m| v.as_f64().is_some_and(|x| x <= m))
                && b["min"]
                    .as_f64()
                    .is_none_or(|m| v.as_f64().is_some_and(|x| x >= m));
            let _ = writeln!(
                out,
                "| `{}` | `{name}` | {} | {} | {} |",
                r["command"].as_str().unwrap_or("?"),
                figure(v),
                bound(b),
                if ok { "met" } else { "**missed**" }
            );
        }
    }
    for r in results {
        let scenario = r["scenario"].as_str().unwrap_or("?");
        let about = ABOUT.iter().find(|a| a.scenario == scenario);
        let agents = r["parameters"]["agents"].as_u64().unwrap_or(1);
        let suffix = if scenario == "artifact" {
            format!(
                ", {agents} agent{} at once",
                if agents == 1 { "" } else { "s" }
            )
        } else if scenario == "rollout" {
            format!(
                ", {} hosts, {} store",
                r["parameters"]["hosts"].as_u64().unwrap_or(0),
                r["parameters"]["store"].as_str().unwrap_or("redb")
            )
        } else {
            String::new()
        };
        let _ = write!(
            out,
            "\n## {}{suffix}\n\n```sh\ntarget/release/{}\n```\n\n",
            about.map_or(scenario, |a| a.title),
            r["command"].as_str().unwrap_or("?")
        );
        if let Some(a) = about {
            let _ = write!(out, "{}\n\n", a.what);
        }
        let _ = writeln!(out, "| figure | value |\n|---|---|");
        if let Some(figures) = r["figures"].as_object() {
            for (name, v) in figures {
                if v.is_object() || v.is_array() {
                    continue;
                }
                let _ = writeln!(out, "| `{name}` | {} |", figure(v));
            }
        }
        if let Some(params) = r["parameters"].as_object() {
            let list: Vec<String> = params
                .iter()
                .map(|(k, v)| format!("`{k}` = {}", figure(v)))
                .collect();
            let _ = write!(out, "\nParameters: {}.\n", list.join(", "));
        }
        let rows: &[(&str, &str)] = match scenario {
            "handoff" => &[
                ("steady state (no upgrade)", "steady"),
                ("20 upgrades, socket handoff", "with_handoff"),
                ("20 upgrades, no `listen` (baseline)", "without_listen"),
            ],
            "traffic" => &[
                ("10 upgrades, drained", "drained"),
                ("10 upgrades, no `traffic` (baseline)", "without_traffic"),
            ],
            _ => &[],
        };
        wrk_table(&mut out, r, rows);
        if let Some(runs) = r["figures"]["runs"].as_array()
            && scenario == "swarm-sim"
        {
            let _ = writeln!(
                out,
                "\n| hosts | staged in (s) | one host alone (s) | `batond` egress (× artifact) | scheduler µs per ask |\n|---|---|---|---|---|"
            );
            for run in runs {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} |",
                    figure(&run["hosts"]),
                    figure(&run["seconds"]),
                    figure(&run["one_host_seconds"]),
                    figure(&run["coordinator_egress_ratio"]),
                    figure(&run["scheduler_us_per_ask"])
                );
            }
        }
        if let Some(a) = about
            && !a.when_missed.is_empty()
            && r["met"] == false
        {
            let _ = write!(out, "\n**Why the target is missed:** {}\n", a.when_missed);
        }
        if let Some(a) = about
            && !a.field.is_empty()
        {
            let _ = write!(out, "\n**The field:** {}\n", a.field);
        }
    }
    out
}
