//! The end-to-end test harness: starts the real `batond`, `baton-agent`
//! and `baton` binaries on loopback with temp dirs and real certificates,
//! waits on conditions with deadlines (never on sleeps), and kills what it
//! started when a test ends. When a test panics, the logs of the processes
//! it started are printed.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub mod abuse;
pub mod cdp;
pub mod etcd;
pub mod fleet;
pub mod haproxy;
pub mod http;
pub mod load;
pub mod origin;
pub mod prometheus;
pub mod proxy;
pub mod rogue;
pub mod wrk;

/// A generous bound for anything that should happen "soon": long enough for
/// a loaded CI machine, short enough to fail a hung test.
pub const SOON: Duration = Duration::from_secs(30);

/// The directory holding the workspace's binaries: `BATON_BIN_DIR`, or the
/// cargo target directory this test binary was built into.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BATON_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/e2e-<hash> → target/<profile>; a binary of
    // this crate (the benchmark) sits in target/<profile> itself.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    if dir.ends_with("deps") {
        dir.parent().unwrap().to_owned()
    } else {
        dir.to_owned()
    }
}

/// The path of one of Baton's binaries; panics with a hint when it was not
/// built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} does not exist: build the binaries first (cargo build --workspace, or cargo test --workspace)",
        path.display()
    );
    path
}

/// Polls `check` until it returns `Some`, failing the test after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A temporary directory with a dev PKI in `tls/`.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    /// Creates the directory and runs `baton certs init` for `agents`.
    pub fn new(agents: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("baton-test-")
            .tempdir()
            .unwrap();
        let env = Self { dir };
        env.certs_init("tls", agents);
        env
    }

    /// A path inside the environment.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The main TLS directory.
    pub fn tls(&self) -> PathBuf {
        self.path("tls")
    }

    /// Runs `baton certs init --out <rel>`.
    pub fn certs_init(&self, rel: &str, agents: &[&str]) {
        let out = Command::new(bin("baton"))
            .args(["certs", "init", "--out"])
            .arg(self.path(rel))
            .args(if agents.is_empty() {
                vec![]
            } else {
                vec!["--agents".to_owned(), agents.join(",")]
            })
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "certs init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `baton` against `url` with the TLS directory `tls`.
    pub fn baton(&self, url: &str, tls: &Path, args: &[&str]) -> Output {
        Command::new(bin("baton"))
            .env_remove("BATON_COORDINATOR")
            .env_remove("BATON_TLS_DIR")
            .arg("--coordinator")
            .arg(url)
            .arg("--tls-dir")
            .arg(tls)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// A gRPC channel to `url` with `ca.pem` and the certificate pair
    /// `name` (`operator`, `agent-h1`, …) from the env's TLS directory.
    pub async fn channel(&self, url: &str, name: &str) -> tonic::transport::Channel {
        let tls = baton_common::tls::ClientTls::load(&self.tls(), name).unwrap();
        tonic::transport::Endpoint::from_shared(url.to_owned())
            .unwrap()
            .tls_config(tls.to_tonic())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A channel to `url` without a client certificate (a new host before
    /// it enrolls, or a stranger).
    pub async fn anonymous_channel(&self, url: &str) -> tonic::transport::Channel {
        let ca = std::fs::read(self.tls().join("ca.pem")).unwrap();
        tonic::transport::Endpoint::from_shared(url.to_owned())
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
            )
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// `baton hosts --json` with the operator certificate, parsed.
    pub fn hosts(&self, url: &str) -> Vec<serde_json::Value> {
        let out = self.baton(url, &self.tls(), &["hosts", "--json"]);
        assert!(
            out.status.success(),
            "baton hosts failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        match serde_json::from_slice(&out.stdout).unwrap() {
            serde_json::Value::Array(hosts) => hosts,
            other => panic!("baton hosts --json printed {other}"),
        }
    }

    /// One host from `baton hosts --json`, if listed.
    pub fn host(&self, url: &str, id: &str) -> Option<serde_json::Value> {
        self.hosts(url).into_iter().find(|h| h["host_id"] == id)
    }

    /// Whether the host is listed and connected.
    pub fn connected(&self, url: &str, id: &str) -> bool {
        self.host(url, id).is_some_and(|h| h["connected"] == true)
    }
}

/// A process started by a test; killed when dropped, its log printed if
/// the test is failing.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd`, its stderr into `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf, stdout: Stdio) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            // BATON_TEST_RUST_LOG overrides the filter, e.g. to see the
            // rollout driver's work at debug level in a benchmark.
            .env(
                "RUST_LOG",
                std::env::var("BATON_TEST_RUST_LOG")
                    .unwrap_or_else(|_| "info,h2=warn,hyper=warn,tower=warn".to_owned()),
            );
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap())
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap();
    }

    /// The process's stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|_| String::new())
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let name = self.name.clone();
        wait_until(&format!("{name} to exit"), timeout, || {
            self.child.try_wait().unwrap()
        })
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(SOON)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A stopped process cannot die of SIGKILL until it is continued.
        let _ = kill(self.pid(), Signal::SIGCONT);
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.name, self.log_text());
        }
    }
}

/// A running `batond`.
pub struct Batond {
    pub proc: Proc,
    pub addr: SocketAddr,
    /// The dashboard's address, when started with `--http-listen`.
    pub dashboard: Option<SocketAddr>,
    /// The metrics' address, when started with `--metrics-listen`.
    pub metrics: Option<SocketAddr>,
}

impl Batond {
    /// Starts `batond` on a free loopback port with the env's TLS dir and
    /// `data` as its data dir, plus `extra` flags; waits until it listens.
    pub fn start(env: &TestEnv, data: &str, extra: &[&str]) -> Self {
        Self::start_on(env, "127.0.0.1:0", data, extra)
    }

    /// Like [`Batond::start`] on a given address (to restart on the same one).
    pub fn start_on(env: &TestEnv, listen: &str, data: &str, extra: &[&str]) -> Self {
        let mut cmd = Command::new(bin("batond"));
        cmd.args(["--listen", listen, "--data-dir"])
            .arg(env.path(data))
            .arg("--tls-dir")
            .arg(env.tls())
            .args(extra);
        let log = env.path(&format!("batond-{}.log", unique()));
        let mut proc = Proc::spawn("batond", cmd, log, Stdio::piped());
        let stdout = proc.child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(SOON)
            .unwrap_or_else(|_| panic!("batond did not start:\n{}", proc.log_text()));
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        // The HTTP endpoints follow, one line each, in this order.
        let next = |flag: &str, prefix: &str| -> Option<SocketAddr> {
            if !extra.contains(&flag) {
                return None;
            }
            let line = rx
                .recv_timeout(SOON)
                .unwrap_or_else(|_| panic!("batond printed no {prefix:?} line"));
            let rest = line
                .strip_prefix(prefix)
                .unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"));
            Some(
                rest.trim_end_matches("/metrics")
                    .trim_end_matches('/')
                    .parse()
                    .unwrap(),
            )
        };
        let dashboard = next("--http-listen", "dashboard on http://");
        let metrics = next("--metrics-listen", "metrics on http://");
        Self {
            addr: addr.parse().unwrap(),
            proc,
            dashboard,
            metrics,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

/// Options for starting an agent.
pub struct AgentOpts<'a> {
    pub host_id: &'a str,
    pub labels: &'a [&'a str],
    /// The TLS directory relative to the env (default `tls`).
    pub tls: &'a str,
    /// More flags (`--var`, `--trusted-key`, …).
    pub extra: Vec<String>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// Keep the data directory on a tmpfs of this many bytes, mounted in a
    /// mount namespace of the agent's own (a disk that can fill up).
    pub tmpfs: Option<u64>,
}

impl<'a> AgentOpts<'a> {
    pub fn new(host_id: &'a str) -> Self {
        Self {
            host_id,
            labels: &[],
            tls: "tls",
            extra: vec![],
            env: vec![],
            tmpfs: None,
        }
    }
}

/// Why an agent cannot get a tmpfs of its own here, if it cannot: making
/// a mount namespace needs root or unprivileged user namespaces.
pub fn tmpfs_unavailable() -> Option<String> {
    let out = tmpfs_command(&std::env::temp_dir(), 1 << 20)
        .arg("/bin/true")
        .output();
    match out {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "cannot mount a tmpfs in a namespace: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run unshare: {e}")),
    }
}

/// `unshare` making a mount namespace with a tmpfs of `bytes` over `dir`,
/// then running what follows (append the program and its arguments).
fn tmpfs_command(dir: &Path, bytes: u64) -> Command {
    let mut cmd = Command::new("unshare");
    if !nix::unistd::geteuid().is_root() {
        cmd.args(["--user", "--map-root-user"]);
    }
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "/bin/sh",
        "-c",
        "mount -t tmpfs -o size=\"$1\" tmpfs \"$2\" && shift 2 && exec \"$@\"",
        "sh",
        &bytes.to_string(),
    ])
    .arg(dir);
    cmd
}

/// Starts `baton-agent` for `opts.host_id` against `url`.
pub fn start_agent(env: &TestEnv, url: &str, opts: AgentOpts<'_>) -> Proc {
    let data = env.path(&format!("agent-{}", opts.host_id));
    let mut cmd = match opts.tmpfs {
        None => Command::new(bin("baton-agent")),
        Some(bytes) => {
            std::fs::create_dir_all(&data).unwrap();
            let mut cmd = tmpfs_command(&data, bytes);
            cmd.arg(bin("baton-agent"));
            cmd
        }
    };
    cmd.args([
        "--coordinator",
        url,
        "--host-id",
        opts.host_id,
        "--data-dir",
    ])
    .arg(env.path(&format!("agent-{}", opts.host_id)))
    .arg("--tls-dir")
    .arg(env.path(opts.tls))
    .args(["--reconnect-max", "1s"]);
    for label in opts.labels {
        cmd.args(["--label", label]);
    }
    cmd.args(&opts.extra);
    cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
    let log = env.path(&format!("agent-{}-{}.log", opts.host_id, unique()));
    Proc::spawn(
        &format!("baton-agent {}", opts.host_id),
        cmd,
        log,
        Stdio::null(),
    )
}

/// A `Command` for one of the workspace's binaries, with the CLI's
/// environment variables cleared.
pub fn bin_command(name: &str) -> Command {
    let mut cmd = Command::new(bin(name));
    cmd.env_remove("BATON_COORDINATOR")
        .env_remove("BATON_TLS_DIR")
        .stdin(Stdio::null());
    cmd
}

pub(crate) fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Copies files from one TLS directory to another under new names, to
/// build deliberately wrong identities.
pub fn copy_tls(env: &TestEnv, pairs: &[(&str, &str)]) {
    for (from, to) in pairs {
        let to = env.path(to);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(env.path(from), &to).unwrap_or_else(|e| panic!("copy {from}: {e}"));
    }
}
