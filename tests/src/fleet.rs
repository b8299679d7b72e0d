//! A fleet for rollout tests: `batond`, N agents with a release key, a
//! `port` variable each and the label `role=web`, plus helpers to pack and
//! push releases of the demo service, run plans and read the result. On
//! drop, the services the agents started are killed too (they outlive
//! their agents by design).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::{AgentOpts, Batond, Proc, SOON, TestEnv, start_agent, wait_until};

/// The fleet.
pub struct Fleet {
    pub env: TestEnv,
    pub batond: Batond,
    pub agents: BTreeMap<String, Proc>,
    pub ports: BTreeMap<String, u16>,
    /// The URL agents use (differs from `batond.url()` behind a proxy).
    pub agent_url: String,
    /// Environment for the agents (set before starting them).
    pub agent_env: Vec<(String, String)>,
    /// Labels per host (default `role=web`).
    pub labels: BTreeMap<String, Vec<String>>,
    /// Ports of named services per host, passed as `--var port_<svc>=N`.
    pub svc_ports: BTreeMap<(String, String), u16>,
    /// The `--coordinator` the CLI uses (default: `batond`'s URL); several
    /// comma-separated with several coordinators.
    pub cli_url: Option<String>,
    /// More flags for every agent started from now on.
    pub agent_extra: Vec<String>,
    /// Agents started from now on keep their data on a tmpfs of this many
    /// bytes, in a mount namespace of their own (see
    /// [`crate::tmpfs_unavailable`]).
    pub agent_tmpfs: Option<u64>,
}

/// A free loopback port for a service to bind later, from below the
/// kernel's ephemeral range: a port the kernel hands out (to a listener on
/// port 0, or to the local end of an outgoing connection, of which peers
/// and health checks make many) could take it before the service binds.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral);
    if high > low + 1000 {
        let span = high - low;
        let start = fastrand::u32(0..span);
        for _ in 0..1000 {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let port = low + (start + n) % span;
            if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
                return port as u16;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

impl Fleet {
    /// Starts `batond` and one agent per host, and waits until all are
    /// connected.
    pub fn start(hosts: &[&str]) -> Self {
        let labeled: Vec<(&str, &[&str])> = hosts.iter().map(|h| (*h, &["role=web"][..])).collect();
        Self::start_labeled(&labeled, &[])
    }

    /// Points the agents at another URL (a proxy); restart them after.
    pub fn set_agent_url(&mut self, url: String) {
        self.agent_url = url;
    }

    /// Starts agents with their own labels and a port for each named
    /// service (`${port_<svc>}` in a service.toml), for multi-service plans.
    pub fn start_labeled(hosts: &[(&str, &[&str])], services: &[&str]) -> Self {
        Self::start_full(hosts, services, &[])
    }

    /// The general constructor: labels, named services, extra `batond`
    /// flags. (Agents behind a proxy: `set_agent_url`, then restart them.)
    pub fn start_full(hosts: &[(&str, &[&str])], services: &[&str], batond_args: &[&str]) -> Self {
        Self::start_with(hosts, services, batond_args, &[])
    }

    /// Like [`Fleet::start_full`], every agent started with `agent_args`
    /// too (kept in `agent_extra` for agents started later).
    pub fn start_with(
        hosts: &[(&str, &[&str])],
        services: &[&str],
        batond_args: &[&str],
        agent_args: &[&str],
    ) -> Self {
        let names: Vec<&str> = hosts.iter().map(|(h, _)| *h).collect();
        let env = TestEnv::new(&names);
        let out = crate::bin_command("baton")
            .args(["artifact", "keygen", "--out"])
            .arg(env.path("release"))
            .output()
            .unwrap();
        ok(&out, "keygen");
        let batond = Batond::start(&env, "batond", batond_args);
        let agent_url = batond.url();
        let mut fleet = Self {
            env,
            batond,
            agents: BTreeMap::new(),
            ports: names
                .iter()
                .map(|h| ((*h).to_owned(), free_port()))
                .collect(),
            agent_url,
            agent_env: vec![],
            labels: hosts
                .iter()
                .map(|(h, l)| ((*h).to_owned(), l.iter().map(|x| (*x).to_owned()).collect()))
                .collect(),
            svc_ports: names
                .iter()
                .flat_map(|h| {
                    services
                        .iter()
                        .map(move |s| (((*h).to_owned(), (*s).to_owned()), free_port()))
                })
                .collect(),
            cli_url: None,
            agent_extra: agent_args.iter().map(|a| (*a).to_owned()).collect(),
            agent_tmpfs: None,
        };
        for h in names {
            fleet.start_agent(h);
        }
        fleet.wait_connected();
        fleet
    }

    /// Packs and pushes release `version` of the demo service as service
    /// `svc` (listening on `${port_<svc>}`), with `extra` appended to its
    /// service.toml.
    pub fn service_release(&self, svc: &str, version: &str, broken: bool, extra: &str) -> String {
        let dir = self.env.path(&format!("src-{svc}-{version}"));
        std::fs::create_dir_all(&dir).unwrap();
        let broken = if broken { ", \"--broken\"" } else { "" };
        std::fs::write(
            dir.join("service.toml"),
            format!(
                r#"command = {:?}
args = ["demo-service", "--listen", "127.0.0.1:${{port_{svc}}}", "--version", "{svc} {version}"{broken}]
listen = ["tcp://127.0.0.1:${{port_{svc}}}"]
ready = "notify"
stop_timeout = "5s"

[health]
kind = "http"
url = "http://127.0.0.1:${{port_{svc}}}/healthz"
interval = "200ms"
timeout = "1s"
{extra}"#,
                crate::bin("baton").display().to_string()
            ),
        )
        .unwrap();
        let out_file = self.env.path(&format!("{svc}-{version}.baton"));
        let out = crate::bin_command("baton")
            .args(["artifact", "pack"])
            .arg(&dir)
            .args(["--name", svc, "--version", version, "--sign-key"])
            .arg(self.env.path("release.key"))
            .arg("--out")
            .arg(&out_file)
            .output()
            .unwrap();
        ok(&out, "artifact pack");
        self.push(&out_file)
    }

    /// What `svc` on `host` answers on `/`.
    pub fn get_svc(&self, host: &str, svc: &str) -> Option<String> {
        let port = self.svc_ports[&(host.to_owned(), svc.to_owned())];
        crate::load::get(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            "/",
            Duration::from_secs(5),
        )
        .ok()
        .map(|(_, body)| body)
    }

    /// Starts (or restarts) one host's agent.
    pub fn start_agent(&mut self, host: &str) {
        let labels: Vec<String> = self
            .labels
            .get(host)
            .cloned()
            .unwrap_or_else(|| vec!["role=web".to_owned()]);
        let label_refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        let mut opts = AgentOpts::new(host);
        opts.labels = &label_refs;
        opts.extra = vec![
            "--var".into(),
            format!("port={}", self.ports[host]),
            "--trusted-key".into(),
            self.env.path("release.pub").display().to_string(),
        ];
        for ((h, svc), port) in &self.svc_ports {
            if h == host {
                opts.extra.push("--var".into());
                opts.extra.push(format!("port_{svc}={port}"));
            }
        }
        opts.extra.extend(self.agent_extra.iter().cloned());
        opts.env = self.agent_env.clone();
        opts.tmpfs = self.agent_tmpfs;
        // One agent per data directory (the agent locks it): the old one
        // goes first, also one that took over after a reverted upgrade.
        self.agents.remove(host);
        if let Some(pid) = agent_pid_file(&self.data_dir(host)) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            wait_until("the old agent to be gone", SOON, || {
                agent_pid_file(&self.data_dir(host)).is_none().then_some(())
            });
        }
        let proc = start_agent(&self.env, &self.agent_url, opts);
        self.agents.insert(host.to_owned(), proc);
    }

    /// Waits until every agent is connected.
    pub fn wait_connected(&self) {
        let url = self.cli_url.clone().unwrap_or_else(|| self.batond.url());
        wait_until("every agent to connect", SOON, || {
            let hosts = self.env.hosts(&url);
            (hosts.len() == self.agents.len() && hosts.iter().all(|h| h["connected"] == true))
                .then_some(())
        });
    }

    /// Runs `baton` against the coordinator.
    pub fn baton(&self, args: &[&str]) -> Output {
        let url = self.cli_url.clone().unwrap_or_else(|| self.batond.url());
        self.env.baton(&url, &self.env.tls(), args)
    }

    /// Writes a release directory of the demo service (with its socket
    /// handed over by the agent).
    pub fn release_dir(&self, version: &str, broken: bool) -> PathBuf {
        self.release_dir_with(version, broken, true, "")
    }

    /// A release directory of the demo service; `listen` says whether the
    /// agent owns and hands over its socket; `extra` is appended to
    /// `service.toml` (hooks, …).
    pub fn release_dir_with(
        &self,
        version: &str,
        broken: bool,
        listen: bool,
        extra: &str,
    ) -> PathBuf {
        let dir = self.env.path(&format!("src-{version}"));
        std::fs::create_dir_all(&dir).unwrap();
        let broken = if broken { ", \"--broken\"" } else { "" };
        let listen = if listen {
            "listen = [\"tcp://127.0.0.1:${port}\"]\nready = \"notify\"\n"
        } else {
            ""
        };
        std::fs::write(
            dir.join("service.toml"),
            format!(
                r#"command = {:?}
args = ["demo-service", "--listen", "127.0.0.1:${{port}}", "--version", "{version}"{broken}]
{listen}stop_timeout = "5s"

[health]
kind = "http"
url = "http://127.0.0.1:${{port}}/healthz"
interval = "200ms"
timeout = "1s"
{extra}"#,
                crate::bin("baton").display().to_string()
            ),
        )
        .unwrap();
        dir
    }

    /// `baton artifact pack` of `dir` as `demo` `version` with `key`.
    pub fn pack_with(&self, dir: &Path, version: &str, key: &Path) -> PathBuf {
        let out_file = self.env.path(&format!("demo-{version}.baton"));
        let out = crate::bin_command("baton")
            .args(["artifact", "pack"])
            .arg(dir)
            .args(["--name", "demo", "--version", version, "--sign-key"])
            .arg(key)
            .arg("--out")
            .arg(&out_file)
            .output()
            .unwrap();
        ok(&out, "artifact pack");
        out_file
    }

    /// `baton artifact push FILE`; the digest.
    pub fn push(&self, file: &Path) -> String {
        let out = self.baton(&["artifact", "push", file.to_str().unwrap()]);
        ok(&out, "artifact push").trim().to_owned()
    }

    /// Packs and pushes a release of the demo service.
    pub fn release(&self, version: &str, broken: bool) -> String {
        let dir = self.release_dir(version, broken);
        let file = self.pack_with(&dir, version, &self.env.path("release.key"));
        self.push(&file)
    }

    /// `baton rollout start` of a plan; the rollout id.
    pub fn start_rollout(&self, plan: &str) -> String {
        let out = self.try_start_rollout(plan);
        let v: Value = serde_json::from_str(&ok(&out, "rollout start")).unwrap();
        v["id"].as_str().unwrap().to_owned()
    }

    /// `baton rollout start --json` of a plan, whatever happens.
    pub fn try_start_rollout(&self, plan: &str) -> Output {
        let path = self.env.path(&format!("plan-{}.toml", crate::unique()));
        std::fs::write(&path, plan).unwrap();
        self.baton(&["rollout", "start", path.to_str().unwrap(), "--json"])
    }

    /// `baton rollout status ID --json`.
    pub fn status(&self, id: &str) -> Value {
        let out = self.baton(&["rollout", "status", id, "--json"]);
        serde_json::from_str(&ok(&out, "rollout status")).unwrap()
    }

    /// `baton rollout events ID --json`, checked to be numbered from 0
    /// without a gap.
    pub fn events(&self, id: &str) -> Vec<Value> {
        let out = self.baton(&["rollout", "events", id, "--json"]);
        let doc: Value = serde_json::from_str(&ok(&out, "rollout events")).unwrap();
        let events = doc.as_array().unwrap().clone();
        assert!(
            events.iter().enumerate().all(|(i, e)| e["seq"] == i as u64),
            "the history has a gap: {events:?}"
        );
        events
    }

    /// Waits until the rollout is in a terminal state and returns it.
    /// On a timeout it says where the rollout stood and what `batond`
    /// logged last.
    pub fn wait_done(&self, id: &str, timeout: Duration) -> Value {
        let done = |s: &Value| {
            matches!(
                s["state"].as_str(),
                Some("succeeded" | "failed" | "rolled_back" | "aborted")
            )
        };
        let until = std::time::Instant::now() + timeout;
        loop {
            let s = self.status(id);
            if done(&s) {
                return s;
            }
            if std::time::Instant::now() >= until {
                let log = self.batond.proc.log_text();
                let tail: String = log
                    .lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                panic!(
                    "timed out after {timeout:?} waiting for rollout {id} to end; it stands at {s}\nbatond's last lines:\n{tail}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `check` holds for the rollout's status.
    pub fn wait_status(&self, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        wait_until(what, SOON, || {
            let s = self.status(id);
            check(&s).then_some(s)
        })
    }

    /// The hosts of a rollout's (only) service, by host id.
    pub fn hosts_of(status: &Value) -> BTreeMap<String, Value> {
        status["services"][0]["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h["host_id"].as_str().unwrap().to_owned(), h.clone()))
            .collect()
    }

    /// What the host's demo service answers on `/`, if anything.
    pub fn get(&self, host: &str) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.ports[host])).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text.split("\r\n\r\n").nth(1)?.trim().to_owned())
    }

    /// The address of the host's demo service.
    pub fn addr(&self, host: &str) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.ports[host]))
    }

    /// Starts a rollout of `version` to every host with `extra` plan keys
    /// and waits for it to end; returns the final status.
    pub fn roll(&self, version: &str, extra: &str) -> Value {
        let id = self.start_rollout(&format!(
            "[[service]]\nname = \"demo\"\nversion = \"{version}\"\n{extra}"
        ));
        self.wait_done(&id, Duration::from_secs(90))
    }

    /// Restarts `batond` and every agent allowed to use the load
    /// balancers `allowed` (`--balancer`), and waits for the agents.
    pub fn allow_balancers(&mut self, allowed: &[String]) {
        let flags: Vec<String> = allowed
            .iter()
            .flat_map(|a| ["--balancer".to_owned(), a.clone()])
            .collect();
        let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
        let addr = self.batond.addr.to_string();
        self.batond.proc.kill();
        self.batond = Batond::start_on(&self.env, &addr, "batond", &flag_refs);
        self.agent_extra.extend(flags.iter().cloned());
        let hosts: Vec<String> = self.ports.keys().cloned().collect();
        for h in hosts {
            self.start_agent(&h);
        }
        self.wait_connected();
    }

    /// Packs and pushes `version` of the demo service without `listen`
    /// (stop, then start), closing its connections as soon as it is told
    /// to stop, as most services without socket activation do.
    pub fn push_closing_release(&self, version: &str, broken: bool) {
        let dir = self.release_dir_with(version, broken, false, "");
        let toml = std::fs::read_to_string(dir.join("service.toml")).unwrap();
        let args = format!("\"--version\", \"{version}\"");
        assert!(toml.contains(&args), "{toml}");
        std::fs::write(
            dir.join("service.toml"),
            toml.replace(&args, &format!("{args}, \"--drain-max\", \"0s\"")),
        )
        .unwrap();
        let file = self.pack_with(&dir, version, &self.env.path("release.key"));
        self.push(&file);
    }

    /// The host's agent data directory.
    pub fn data_dir(&self, host: &str) -> PathBuf {
        self.env.path(&format!("agent-{host}"))
    }

    /// The pid of the host's demo service (its current release's), from
    /// its `process.json`.
    pub fn service_pid(&self, host: &str) -> Option<i32> {
        let services = self.data_dir(host).join("services/demo");
        let current = std::fs::read_link(services.join("current")).ok()?;
        let version = current.file_name()?;
        let text = std::fs::read_to_string(services.join("run").join(version).join("process.json"))
            .ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        i32::try_from(v["pid"].as_u64()?).ok()
    }

    /// Every pid recorded for the host's demo service (all releases).
    pub fn service_pids(&self, host: &str) -> Vec<i32> {
        let run = self.data_dir(host).join("services/demo/run");
        let Ok(entries) = std::fs::read_dir(run) else {
            return vec![];
        };
        entries
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("process.json")).ok())
            .filter_map(|t| serde_json::from_str::<Value>(&t).ok())
            .filter_map(|v| i32::try_from(v["pid"].as_u64()?).ok())
            .collect()
    }

    /// The host's demo service logs, all releases, concatenated.
    pub fn service_log(&self, host: &str) -> String {
        let run = self.data_dir(host).join("services/demo/run");
        let Ok(entries) = std::fs::read_dir(run) else {
            return String::new();
        };
        let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        dirs.sort();
        dirs.iter()
            .filter_map(|d| std::fs::read_to_string(d.join("service.log")).ok())
            .collect()
    }

    /// Installs `version` on every host and waits for success.
    pub fn install(&self, version: &str) {
        self.release(version, false);
        let id = self.start_rollout(&format!(
            "[[service]]\nname = \"demo\"\nversion = \"{version}\"\nhosts = {{ role = \"web\" }}\nstrategy = \"all-at-once\"\nmin_healthy_time = \"200ms\"\n"
        ));
        let s = self.wait_done(&id, SOON);
        assert_eq!(s["state"], "succeeded", "{s}");
        for host in self.ports.keys() {
            assert_eq!(
                self.get(host).as_deref(),
                Some(format!("demo-service {version}").as_str())
            );
        }
    }
}

/// The pid in an agent's `agent.pid`, if that process is still a
/// `baton-agent` (a pid reused by anything else is left alone).
pub fn agent_pid_file(data_dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(data_dir.join("agent.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains("baton-agent")
        .then_some(pid)
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // The services' pids, read while the agents still run: an agent
        // whose data directory is a tmpfs of its own (`agent_tmpfs`) keeps
        // it in its own mount namespace, seen from here only through its
        // `/proc/<pid>/root`.
        let mut dirs: Vec<PathBuf> = Vec::new();
        for (host, agent) in &self.agents {
            let root = PathBuf::from(format!("/proc/{}/root", agent.pid()));
            let data = self.data_dir(host);
            dirs.push(root.join(data.strip_prefix("/").unwrap_or(&data)));
        }
        dirs.extend(self.ports.keys().map(|host| self.data_dir(host)));
        let pids: Vec<i32> = dirs.iter().flat_map(|d| service_pids(d)).collect();
        // Agents first, so nothing restarts the services we kill.
        self.agents.clear();
        for host in self.ports.keys() {
            // An agent that took over after a reverted self-upgrade is
            // not one of our children.
            if let Some(pid) = agent_pid_file(&self.data_dir(host)) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        for pid in pids.into_iter().chain(
            self.ports
                .keys()
                .flat_map(|h| service_pids(&self.data_dir(h))),
        ) {
            // The service leads its own process group.
            let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
        }
    }
}

/// The pids of the services an agent with data directory `data` runs, from
/// their `process.json` records.
fn service_pids(data: &std::path::Path) -> Vec<i32> {
    std::fs::read_dir(data.join("services"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|svc| {
            std::fs::read_dir(svc.path().join("run"))
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter_map(|run| std::fs::read_to_string(run.path().join("process.json")).ok())
        .filter_map(|t| serde_json::from_str::<Value>(&t).ok())
        .filter_map(|v| i32::try_from(v["pid"].as_u64()?).ok())
        .collect()
}
