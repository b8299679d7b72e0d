//! The etcd store against a real etcd (Debian's `etcd-server`), started on
//! loopback ports in a temp dir: the same conformance check the embedded
//! store passes. Built only with `--features etcd`; skipped, saying why,
//! when no `etcd` binary is installed (`.ci/run` installs one).

#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton_coordinator::store::{EtcdStore, conformance};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
    client: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until etcd accepts connections.
fn wait_for_etcd(etcd: &Etcd) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&etcd.client).is_err() {
        assert!(Instant::now() < deadline, "etcd did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_etcd() -> Option<Etcd> {
    if Command::new("etcd").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no etcd binary on the PATH (apt-get install etcd-server)");
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
    Some(Etcd {
        child,
        _dir: dir,
        client: format!("127.0.0.1:{client}"),
    })
}

#[tokio::test]
async fn the_etcd_store_behaves_like_the_embedded_one() {
    let Some(etcd) = start_etcd() else { return };
    let deadline = Instant::now() + Duration::from_secs(30);
    let store = loop {
        match EtcdStore::connect(std::slice::from_ref(&etcd.client)).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "etcd did not come up: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    conformance::check(&store).await;
}

/// Runs `baton` with the test's certificates against `url`.
fn baton(tls: &std::path::Path, url: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_baton"))
        .env_remove("BATON_COORDINATOR")
        .env_remove("BATON_TLS_DIR")
        .arg("--coordinator")
        .arg(url)
        .arg("--tls-dir")
        .arg(tls)
        .args(args)
        .output()
        .unwrap()
}

fn start_batond(dir: &std::path::Path, data: &str, etcd: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_batond"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join(data))
        .arg("--tls-dir")
        .arg(dir.join("tls"))
        .arg("--store")
        .arg(format!("etcd://{etcd}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("batond did not start: {line:?}"))
        .to_owned();
    (child, format!("https://{addr}"))
}

#[test]
fn batond_keeps_its_state_in_etcd() {
    let Some(etcd) = start_etcd() else { return };
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "certs",
        "init",
        "--out",
        tls.to_str().unwrap(),
        "--agents",
        "h1",
    ]);
    let key = dir.path().join("release");
    run(&["artifact", "keygen", "--out", key.to_str().unwrap()]);
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("service.toml"), "command = \"bin/x\"\n").unwrap();
    let file = dir.path().join("x.baton");
    run(&[
        "artifact",
        "pack",
        src.to_str().unwrap(),
        "--name",
        "x",
        "--version",
        "1.0.0",
        "--sign-key",
        dir.path().join("release.key").to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
    ]);

    // One batond stores the artifact's record in etcd...
    wait_for_etcd(&etcd);
    let (mut first, url) = start_batond(dir.path(), "one", &etcd.client);
    let out = baton(&tls, &url, &["artifact", "push", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    first.kill().unwrap();
    first.wait().unwrap();

    // ...and another one, with an empty data dir of its own, lists it.
    let (mut second, url) = start_batond(dir.path(), "two", &etcd.client);
    let out = baton(&tls, &url, &["artifact", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "x", "{list}");
    assert_eq!(list[0]["version"], "1.0.0", "{list}");
    second.kill().unwrap();
    second.wait().unwrap();
}
