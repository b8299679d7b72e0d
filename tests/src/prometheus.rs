//! A real Prometheus server for tests (Debian's `prometheus`), started on
//! a free loopback port with a config the test writes, stopped with it.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::{Proc, TestEnv};

/// Where a program is on the PATH.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The `prometheus` binary, or `None` after saying why the test is
/// skipped (a failure when `BATON_REQUIRE_PROMETHEUS` is set).
pub fn binary() -> Option<PathBuf> {
    let found = on_path("prometheus");
    if found.is_none() {
        assert!(
            std::env::var_os("BATON_REQUIRE_PROMETHEUS").is_none(),
            "BATON_REQUIRE_PROMETHEUS is set but no prometheus is on the PATH"
        );
        eprintln!("SKIPPED: no prometheus on the PATH (bash .ci/run installs Debian's)");
    }
    found
}

/// A running Prometheus.
pub struct Prometheus {
    /// Its HTTP API.
    pub api: SocketAddr,
    _proc: Proc,
}

impl Prometheus {
    /// Starts `binary` with `config` (prometheus.yml) in `env`.
    pub fn start(binary: PathBuf, env: &TestEnv, config: &str) -> Self {
        Self::start_on(binary, env, config, crate::fleet::free_port())
    }

    /// [`Self::start`] on loopback port `port`.
    pub fn start_on(binary: PathBuf, env: &TestEnv, config: &str, port: u16) -> Self {
        let dir = env.path(&format!("prometheus-{}", crate::unique()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let mut cmd = std::process::Command::new(binary);
        cmd.arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        let proc = Proc::spawn(
            "prometheus",
            cmd,
            dir.join("prometheus.log"),
            std::process::Stdio::null(),
        );
        Self {
            api: SocketAddr::from(([127, 0, 0, 1], port)),
            _proc: proc,
        }
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.api)
    }
}
