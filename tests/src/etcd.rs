//! A real etcd (Debian's `etcd-server`) on loopback ports in a temp dir,
//! for the tests of the etcd store and of several coordinators. Tests skip,
//! saying why, when no `etcd` binary is installed (`.ci/run` installs it).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::fleet::free_port;
use crate::wait_until;

/// A running etcd; killed on drop.
pub struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
    /// `127.0.0.1:PORT` for clients.
    pub client: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Etcd {
    /// Starts etcd and waits (bounded) until it accepts connections;
    /// `None`, with a printed reason, when no etcd is installed.
    pub fn start() -> Option<Self> {
        if Command::new("etcd").arg("--version").output().is_err() {
            skip("no etcd binary on the PATH (apt-get install etcd-server)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let child = Command::new("etcd")
            .args(["--name", "baton-test", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!(
                "--initial-cluster=baton-test=http://127.0.0.1:{peer}"
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let etcd = Self {
            child,
            _dir: dir,
            client: format!("127.0.0.1:{client}"),
        };
        wait_until(
            "etcd to accept connections",
            Duration::from_secs(30),
            || std::net::TcpStream::connect(&etcd.client).ok(),
        );
        Some(etcd)
    }

    /// `etcd://127.0.0.1:PORT`, for `batond --store`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.client)
    }
}

/// Whether the workspace's `batond` was built with etcd support; prints
/// why not when it was not.
pub fn batond_has_etcd() -> bool {
    let out = Command::new(crate::bin("batond"))
        .args([
            "--store",
            "etcd://127.0.0.1:1",
            "--data-dir",
            "/nonexistent",
            "--tls-dir",
            "/nonexistent",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("without etcd support") {
        skip(
            "batond was built without the etcd feature (cargo build --features etcd; .ci/run does)",
        );
        return false;
    }
    true
}

/// Says why an etcd test is skipped, or, when `BATON_REQUIRE_ETCD` is set
/// (as `.ci/run` does), fails the test instead.
fn skip(why: &str) {
    assert!(
        std::env::var_os("BATON_REQUIRE_ETCD").is_none(),
        "BATON_REQUIRE_ETCD is set but {why}"
    );
    eprintln!("SKIPPED: {why}");
}
