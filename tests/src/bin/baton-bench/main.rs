//! `baton-bench`: Baton's performance, measured on this machine with the
//! real binaries, one scenario at a time or all of them.
//!
//! ```text
//! cargo build --release --workspace
//! target/release/baton-bench memory --agents 10000
//! target/release/baton-bench all --markdown BENCHMARKS.md
//! ```
//!
//! Each scenario prints one JSON document on stdout: `scenario`,
//! `parameters`, `figures`, `targets` (each figure's bound), `met`, the
//! `command` that reproduces it and the `machine` it ran on. Progress goes
//! to stderr. `all` prints `{"machine", "results": [...]}` and, with
//! `--markdown FILE`, writes the report (`BENCHMARKS.md` is written so,
//! never by hand: `.ci/bench` regenerates it).
//!
//! Fleet-scale scenarios run `batond` and `baton-sim` (the fleet
//! simulator, see `baton-sim --help`) as two processes, so each has its
//! own 20,000 open files; both raise their soft limit to the hard one.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;
mod datapath;
mod judge;
mod realfleet;
mod report;
mod scale;
mod swarm;
mod traffic;
mod transfer;

use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;

/// Baton's benchmarks; each prints one JSON document.
#[derive(Parser, Debug)]
#[command(name = "baton-bench")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug, Clone)]
enum Scenario {
    /// batond's resident memory idle and with N agents connected; figure
    /// `bytes_per_agent` (target ≤ 32 KiB at 10,000).
    Memory {
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        /// How long the agents heartbeat before memory is read.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        settle: Duration,
    },
    /// A no-op to every agent and every answer back (`PingHosts`);
    /// figures `p50_ms`, `p100_ms` (medians over the runs) and
    /// `p100_ms_worst` (target: all within 500 ms at 10,000, every run).
    Fanout {
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// batond restarted under N connected agents; figure `all_back_ms`
    /// (target ≤ 10 s at 10,000, none gives up).
    Reconnect {
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
    },
    /// A real rollout over simulated hosts; figure `overhead_ratio` =
    /// actual ÷ (batches × (activation delay + min_healthy_time)) (target
    /// ≤ 1.05 at 100 hosts, 10 at a time).
    Rollout {
        #[arg(long, default_value_t = 100)]
        hosts: usize,
        #[arg(long, default_value_t = 10)]
        max_parallel: usize,
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        min_healthy_time: Duration,
        /// The simulated activation's own time, before its health gate.
        #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
        activation_delay: Duration,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// batond's store: `redb` (embedded) or `etcd` (a local etcd
        /// started for the run, with its default limits).
        #[arg(long, default_value = "redb", value_parser = ["redb", "etcd"])]
        store: String,
    },
    /// A signed artifact staged by K agents at once; figures
    /// `verify_mb_per_s` (per agent: download + hash + signature check;
    /// target ≥ 1,500) and `coordinator_egress_ratio`.
    Artifact {
        #[arg(long, default_value_t = 200)]
        size_mb: usize,
        #[arg(long, default_value_t = 1)]
        agents: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// One real agent, connected and idle; figures `rss_mb` (target ≤ 10)
    /// and `cpu_percent` (target ≤ 0.1).
    AgentIdle {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// The real analysis judge on generated error counters: a canary
    /// whose error ratio doubles, and as many A/A trials; figures
    /// `detected_within_3m` (target ≥ 0.9) and `false_abort_rate` (target
    /// < 0.01).
    Analysis {
        #[arg(long, default_value_t = 10)]
        hosts: usize,
        #[arg(long, default_value_t = 10)]
        canary_percent: usize,
        #[arg(long, default_value_t = 100.0)]
        rps: f64,
        #[arg(long, default_value_t = 0.01)]
        base_error: f64,
        #[arg(long, default_value_t = 0.02)]
        bad_error: f64,
        #[arg(long, default_value_t = 1000)]
        trials: usize,
        /// The check's keys (TOML), as in a plan.
        #[arg(long, default_value = DEFAULT_CHECK)]
        check: String,
    },
    /// batond's real source scheduler driving a simulated fleet's
    /// downloads (every host at once, `gbit` each way, sources' uploads
    /// shared, pipelined through peers still fetching), at hosts / 100,
    /// hosts / 10 and hosts; figures `staged_seconds` (target ≤ 60 s for
    /// 1 GB to 10,000 hosts at 10 Gbit/s) and `coordinator_egress_ratio`
    /// (target ≤ 2).
    SwarmSim {
        #[arg(long, default_value_t = 10_000)]
        hosts: usize,
        #[arg(long, default_value_t = 1000)]
        size_mb: u64,
        #[arg(long, default_value_t = 10.0)]
        gbit: f64,
    },
    /// A release staged by one real agent, then by K real agents serving
    /// each other (`--peer-listen`); figures `coordinator_egress_ratio`
    /// (target ≤ 2) and `time_ratio` (K agents against one; target ≤ 2,
    /// which needs a machine per agent: here all share two cores).
    Peers {
        #[arg(long, default_value_t = 50)]
        agents: usize,
        #[arg(long, default_value_t = 200)]
        size_mb: usize,
    },
    /// The rollout overhead on 12 real agents running the demo service.
    RolloutAgents,
    /// 20 upgrades of one host under wrk, with socket handoff and without:
    /// failed requests and latency.
    Handoff,
    /// 10 rolling upgrades of 3 hosts behind a real HAProxy under wrk,
    /// drained by `[service.traffic]` and not: failed requests and the
    /// rollout time draining costs.
    Traffic,
    /// Renders the report from the JSON `all` printed, without measuring
    /// again (after a change to the report's text).
    Render {
        /// The JSON document `all` printed (`BENCHMARKS.json`).
        #[arg(long, value_name = "FILE")]
        json: std::path::PathBuf,
        /// Write the report here (Markdown).
        #[arg(long, value_name = "FILE")]
        markdown: std::path::PathBuf,
    },
    /// Every scenario at its target size (about five minutes here).
    All {
        /// Agents for memory, fanout and reconnect.
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        /// Simulated hosts for rollout.
        #[arg(long, default_value_t = 100)]
        hosts: usize,
        /// Artifact size.
        #[arg(long, default_value_t = 200)]
        size_mb: usize,
        /// How long the agents heartbeat before batond's memory is read.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        settle: Duration,
        /// How long the idle agent is watched, in seconds.
        #[arg(long, default_value_t = 60)]
        idle_seconds: u64,
        /// Leave out the scenarios on real agents (rollout-agents, handoff).
        #[arg(long)]
        simulated_only: bool,
        /// Write the report here (Markdown).
        #[arg(long, value_name = "FILE")]
        markdown: Option<std::path::PathBuf>,
    },
}

/// The check `baton-bench analysis` judges with.
const DEFAULT_CHECK: &str =
    "baseline = true\ntolerance = 0.3\ninterval = \"5s\"\nduration = \"3m\"\nmin_samples = 5\n";

/// Whether each figure is within its target.
fn met(doc: &Value) -> bool {
    doc["targets"].as_object().is_none_or(|targets| {
        targets.iter().all(|(name, bound)| {
            let Some(v) = doc["figures"][name].as_f64() else {
                return false;
            };
            bound["max"].as_f64().is_none_or(|m| v <= m)
                && bound["min"].as_f64().is_none_or(|m| v >= m)
        })
    })
}

fn command_line(s: &Scenario) -> String {
    let d = |d: &Duration| humantime::format_duration(*d).to_string();
    match s {
        Scenario::Memory { agents, settle } => {
            format!(
                "baton-bench memory --agents {agents} --settle {}",
                d(settle)
            )
        }
        Scenario::Fanout { agents, runs } => {
            format!("baton-bench fanout --agents {agents} --runs {runs}")
        }
        Scenario::Reconnect { agents } => format!("baton-bench reconnect --agents {agents}"),
        Scenario::Rollout {
            hosts,
            max_parallel,
            min_healthy_time,
            activation_delay,
            runs,
            store,
        } => format!(
            "baton-bench rollout --hosts {hosts} --max-parallel {max_parallel} --min-healthy-time {} --activation-delay {} --runs {runs}{}",
            d(min_healthy_time),
            d(activation_delay),
            if store == "redb" {
                String::new()
            } else {
                format!(" --store {store}")
            }
        ),
        Scenario::Artifact {
            size_mb,
            agents,
            runs,
        } => format!("baton-bench artifact --size-mb {size_mb} --agents {agents} --runs {runs}"),
        Scenario::AgentIdle { seconds } => {
            format!("baton-bench agent-idle --seconds {seconds}")
        }
        Scenario::Analysis {
            hosts,
            canary_percent,
            rps,
            base_error,
            bad_error,
            trials,
            check,
        } => format!(
            "baton-bench analysis --hosts {hosts} --canary-percent {canary_percent} --rps {rps} --base-error {base_error} --bad-error {bad_error} --trials {trials}{}",
            if check == DEFAULT_CHECK {
                String::new()
            } else {
                format!(" --check {check:?}")
            }
        ),
        Scenario::SwarmSim {
            hosts,
            size_mb,
            gbit,
        } => format!("baton-bench swarm-sim --hosts {hosts} --size-mb {size_mb} --gbit {gbit}"),
        Scenario::Peers { agents, size_mb } => {
            format!("baton-bench peers --agents {agents} --size-mb {size_mb}")
        }
        Scenario::RolloutAgents => "baton-bench rollout-agents".into(),
        Scenario::Handoff => "baton-bench handoff".into(),
        Scenario::Traffic => "baton-bench traffic".into(),
        Scenario::Render { .. } => "baton-bench render".into(),
        Scenario::All { .. } => "baton-bench all".into(),
    }
}

fn run(rt: &tokio::runtime::Runtime, s: &Scenario, machine: &Value) -> Value {
    eprintln!("== {}", command_line(s));
    let mut doc = match s.clone() {
        Scenario::Memory { agents, settle } => scale::memory(rt, agents, settle),
        Scenario::Fanout { agents, runs } => scale::fanout(rt, agents, runs),
        Scenario::Reconnect { agents } => scale::reconnect(rt, agents),
        Scenario::Rollout {
            hosts,
            max_parallel,
            min_healthy_time,
            activation_delay,
            runs,
            store,
        } => scale::rollout(
            rt,
            hosts,
            max_parallel,
            min_healthy_time,
            activation_delay,
            runs,
            &store,
        ),
        Scenario::Artifact {
            size_mb,
            agents,
            runs,
        } => transfer::artifact(rt, size_mb, agents, runs),
        Scenario::AgentIdle { seconds } => transfer::agent_idle(rt, Duration::from_secs(seconds)),
        Scenario::Analysis {
            hosts,
            canary_percent,
            rps,
            base_error,
            bad_error,
            trials,
            check,
        } => judge::analysis(&judge::Params {
            hosts,
            canary_percent,
            rps,
            base_error,
            bad_error,
            trials,
            check,
        }),
        Scenario::SwarmSim {
            hosts,
            size_mb,
            gbit,
        } => swarm::swarm_sim(hosts, size_mb, gbit),
        Scenario::Peers { agents, size_mb } => swarm::peers(agents, size_mb),
        Scenario::RolloutAgents => realfleet::rollout_agents(),
        Scenario::Handoff => realfleet::handoff(),
        Scenario::Traffic => traffic::traffic(),
        Scenario::All { .. } | Scenario::Render { .. } => {
            unreachable!("not one scenario")
        }
    };
    doc["met"] = met(&doc).into();
    doc["command"] = command_line(s).into();
    doc["machine"] = machine.clone();
    eprintln!("   {}", doc["figures"]);
    doc
}

fn main() {
    let args = Args::parse();
    if let Scenario::Render { json, markdown } = &args.scenario {
        let doc: Value = std::fs::read(json)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .unwrap_or_else(|e| {
                eprintln!("baton-bench: cannot read {}: {e}", json.display());
                std::process::exit(1);
            });
        let results = doc["results"].as_array().cloned().unwrap_or_default();
        std::fs::write(markdown, report::markdown(&doc["machine"], &results)).unwrap();
        eprintln!("wrote {}", markdown.display());
        return;
    }
    for name in ["baton", "batond", "baton-agent", "baton-sim"] {
        let path = baton_tests::bin_dir().join(name);
        if !path.exists() {
            eprintln!(
                "baton-bench: {} is missing; run `cargo build --release --workspace` first",
                path.display()
            );
            std::process::exit(1);
        }
    }
    let machine = common::machine();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Scenario::All {
        agents,
        hosts,
        size_mb,
        settle,
        idle_seconds,
        simulated_only,
        markdown,
    } = args.scenario
    else {
        let doc = run(&rt, &args.scenario, &machine);
        println!("{}", serde_json::to_string_pretty(&doc).unwrap());
        return;
    };
    let mut scenarios = vec![
        Scenario::Memory { agents, settle },
        Scenario::Fanout { agents, runs: 5 },
        Scenario::Reconnect { agents },
        Scenario::Rollout {
            hosts,
            max_parallel: 10,
            min_healthy_time: Duration::from_secs(1),
            activation_delay: Duration::from_millis(50),
            runs: 3,
            store: "redb".into(),
        },
    ];
    // Ten and a hundred times that, one batch in ten, on both stores.
    for store in ["redb", "etcd"] {
        for (hosts, runs) in [(hosts * 10, 3), (hosts * 100, 1)] {
            scenarios.push(Scenario::Rollout {
                hosts,
                max_parallel: hosts / 10,
                min_healthy_time: Duration::from_secs(1),
                activation_delay: Duration::from_millis(50),
                runs,
                store: store.into(),
            });
        }
    }
    scenarios.extend([
        Scenario::Artifact {
            size_mb,
            agents: 1,
            runs: 3,
        },
        Scenario::Artifact {
            size_mb,
            agents: 4,
            runs: 1,
        },
        Scenario::AgentIdle {
            seconds: idle_seconds,
        },
        Scenario::SwarmSim {
            hosts: agents,
            size_mb: 1000,
            gbit: 10.0,
        },
        Scenario::Analysis {
            hosts: 10,
            canary_percent: 10,
            rps: 100.0,
            base_error: 0.01,
            bad_error: 0.02,
            trials: 1000,
            check: DEFAULT_CHECK.into(),
        },
    ]);
    if !simulated_only {
        scenarios.extend([
            Scenario::RolloutAgents,
            Scenario::Handoff,
            Scenario::Traffic,
            Scenario::Peers {
                agents: 50,
                size_mb: 20,
            },
        ]);
    }
    let results: Vec<Value> = scenarios.iter().map(|s| run(&rt, s, &machine)).collect();
    if let Some(path) = markdown {
        std::fs::write(&path, report::markdown(&machine, &results)).unwrap();
        eprintln!("wrote {}", path.display());
    }
    let doc = serde_json::json!({"machine": machine, "results": results});
    println!("{}", serde_json::to_string_pretty(&doc).unwrap());
}
