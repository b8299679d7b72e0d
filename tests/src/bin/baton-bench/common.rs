//! What the scenarios share: a `batond` process, the simulator process,
//! an in-process Control API client, and readings from `/proc`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use baton_common::tls::ClientTls;
use baton_proto::control::v1::ListHostsRequest;
use baton_proto::control::v1::control_service_client::ControlServiceClient;
use baton_tests::{Batond, Proc, TestEnv, bin};
use serde_json::Value;
use tonic::transport::Channel;

/// Milliseconds since the epoch.
pub fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

/// Milliseconds, to three decimals.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Resident memory of a process, in bytes.
pub fn rss_bytes(pid: i32) -> u64 {
    status_kb(pid, "VmRSS:")
}

/// Resident anonymous memory (heap and stacks, not code) of a process.
pub fn rss_anon_bytes(pid: i32) -> u64 {
    status_kb(pid, "RssAnon:")
}

fn status_kb(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// CPU time (user + system) a process has used.
pub fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// CPU time of each live thread of a process in nanoseconds, from
/// `/proc/PID/task/TID/schedstat` (precise, where `/proc/PID/stat` counts
/// in clock ticks of 10 ms).
pub fn thread_cpu_ns(pid: i32) -> std::collections::BTreeMap<u32, u64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(ns) = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
        {
            out.insert(tid, ns);
        }
    }
    out
}

/// The CPU time threads spent between two [`thread_cpu_ns`] readings (a
/// thread started in between counts whole).
pub fn cpu_between(
    before: &std::collections::BTreeMap<u32, u64>,
    after: &std::collections::BTreeMap<u32, u64>,
) -> Duration {
    Duration::from_nanos(
        after
            .iter()
            .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
            .sum(),
    )
}

/// Bytes a process has written to its file descriptors (`wchar`).
pub fn bytes_written(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("wchar in /proc/PID/io")
}

/// The machine, for the report.
pub fn machine() -> Value {
    // Unreadable: the report says "unknown" rather than failing.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_else(|_| String::new());
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU", str::trim)
        .to_owned();
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| (kb / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned());
    serde_json::json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": memory_gib,
        "kernel": kernel,
        "open_files": baton_coordinator::limits::raise_open_files(),
    })
}

/// A `batond` process with its environment, quiet (warnings only).
pub struct Coordinator {
    pub env: TestEnv,
    pub batond: Batond,
}

impl Coordinator {
    /// Starts `batond` with certificates for `agents` (real agents; the
    /// simulator issues its own).
    pub fn start(agents: &[&str]) -> Self {
        Self::start_with(agents, &[])
    }

    /// [`Self::start`], with `extra` flags for `batond`.
    pub fn start_with(agents: &[&str], extra: &[&str]) -> Self {
        let env = TestEnv::new(agents);
        let batond = Batond::start(&env, "batond", extra);
        Self { env, batond }
    }

    pub fn url(&self) -> String {
        self.batond.url()
    }

    pub fn pid(&self) -> i32 {
        self.batond.proc.pid().as_raw()
    }

    /// Stops `batond` with SIGTERM and starts it again on the same
    /// address and data; returns how long the stop took and when (unix ms)
    /// the new process was spawned.
    pub fn restart(&mut self) -> (Duration, u128) {
        let t0 = Instant::now();
        self.batond.proc.terminate();
        let stopped = t0.elapsed();
        let spawned = unix_ms();
        self.batond = Batond::start_on(&self.env, &self.batond.addr.to_string(), "batond", &[]);
        (stopped, spawned)
    }

    /// A Control API client with the operator certificate.
    pub async fn control(&self) -> ControlServiceClient<Channel> {
        baton_cli::connect_control_with(
            &self.url(),
            &ClientTls::load(&self.env.tls(), "operator").unwrap(),
            Some(Duration::from_secs(60)),
        )
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20)
    }
}

/// How many hosts `batond` counts as connected.
pub async fn connected(control: &mut ControlServiceClient<Channel>) -> usize {
    control
        .list_hosts(ListHostsRequest {})
        .await
        .unwrap()
        .into_inner()
        .hosts
        .iter()
        .filter(|h| h.connected)
        .count()
}

/// The simulator process and the JSON lines it prints.
pub struct Sim {
    /// Held so the simulator is killed with this value.
    _proc: Proc,
    lines: mpsc::Receiver<Value>,
    pub agents: usize,
}

impl Sim {
    /// Starts `baton-sim` with `agents` agents against `coordinator`,
    /// plus `extra` flags, and waits until its certificates are made.
    pub fn start(coordinator: &Coordinator, agents: usize, extra: &[&str]) -> Self {
        let mut cmd = Command::new(bin("baton-sim"));
        cmd.args(["--coordinator", &coordinator.url(), "--tls-dir"])
            .arg(coordinator.env.tls())
            .args(["--agents", &agents.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("cannot start baton-sim");
        let mut proc = Proc {
            name: "baton-sim".into(),
            child,
            log: coordinator.env.path("sim.log"),
        };
        let stdout = proc.child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        let mut sim = Self {
            _proc: proc,
            lines: rx,
            agents,
        };
        sim.wait_event("ready", Duration::from_secs(120));
        sim
    }

    /// Waits for the next line of `event`; returns it.
    pub fn wait_event(&mut self, event: &str, timeout: Duration) -> Value {
        self.next_event(event, timeout, |_| true)
            .unwrap_or_else(|| {
                panic!(
                    "baton-sim did not report {event} within {}",
                    humantime::format_duration(timeout)
                )
            })
    }

    /// The next line of `event` that `pick` accepts, if one comes within
    /// `timeout`.
    pub fn next_event(
        &mut self,
        event: &str,
        timeout: Duration,
        pick: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if v["event"] == event && pick(&v) => return Some(v),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Waits until every agent is connected; returns when (unix ms).
    pub fn wait_all_connected(&mut self, timeout: Duration) -> u128 {
        let v = self.wait_event("all_connected", timeout);
        v["unix_ms"].as_u64().unwrap().into()
    }
}
