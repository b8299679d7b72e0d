//! A real HAProxy for tests (Debian's `haproxy`), in the foreground on a
//! free loopback port, in front of the hosts' demo services, with its
//! runtime API on a unix socket in the test's directory; stopped with it.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{Proc, SOON, TestEnv, wait_until};

/// The `haproxy` binary, or `None` after saying why the test is skipped
/// (a failure when `BATON_REQUIRE_HAPROXY` is set).
pub fn binary() -> Option<PathBuf> {
    let found = crate::prometheus::on_path("haproxy")
        .or_else(|| Some(PathBuf::from("/usr/sbin/haproxy")).filter(|p| p.is_file()));
    if found.is_none() {
        assert!(
            std::env::var_os("BATON_REQUIRE_HAPROXY").is_none(),
            "BATON_REQUIRE_HAPROXY is set but no haproxy is installed"
        );
        eprintln!("SKIPPED: no haproxy installed (bash .ci/run installs Debian's)");
    }
    found
}

/// The `wrk` binary's presence, or `false` after saying why the test is
/// skipped.
pub fn have_wrk() -> bool {
    let found = crate::prometheus::on_path("wrk").is_some();
    if !found {
        eprintln!("SKIPPED: no wrk on the PATH (bash .ci/run installs Debian's)");
    }
    found
}

/// A running HAProxy with one backend, `web`, of one server per host.
pub struct Haproxy {
    /// Where clients connect.
    pub front: SocketAddr,
    /// The runtime API's unix socket.
    pub socket: PathBuf,
    /// Its process.
    pub proc: Proc,
}

impl Haproxy {
    /// Where the runtime API of an HAProxy started in `env` will be (to
    /// allow it in `batond`'s and the agents' `balancer` setting first).
    pub fn socket_in(env: &TestEnv) -> PathBuf {
        env.path("haproxy/admin.sock")
    }

    /// Starts `binary` in front of `servers` (name, port), each checked
    /// with `GET /healthz` every 200 ms; one per `env`.
    pub fn start(binary: PathBuf, env: &TestEnv, servers: &[(&str, u16)]) -> Self {
        let socket = Self::socket_in(env);
        let dir = socket.parent().unwrap().to_owned();
        std::fs::create_dir_all(&dir).unwrap();
        let port = crate::fleet::free_port();
        let mut config = format!(
            "global\n    stats socket {} mode 600 level admin\n    stats timeout 10s\n\n\
             defaults\n    mode http\n    timeout connect 1s\n    timeout client 30s\n    timeout server 30s\n\n\
             frontend front\n    bind 127.0.0.1:{port}\n    default_backend web\n\n\
             backend web\n    balance roundrobin\n    option httpchk GET /healthz\n    default-server inter 200ms fall 2 rise 1\n",
            socket.display()
        );
        for (name, port) in servers {
            config.push_str(&format!("    server {name} 127.0.0.1:{port} check\n"));
        }
        std::fs::write(dir.join("haproxy.cfg"), &config).unwrap();
        let mut cmd = std::process::Command::new(binary);
        cmd.arg("-db").arg("-f").arg(dir.join("haproxy.cfg"));
        let proc = Proc::spawn(
            "haproxy",
            cmd,
            dir.join("haproxy.log"),
            std::process::Stdio::null(),
        );
        let me = Self {
            front: SocketAddr::from(([127, 0, 0, 1], port)),
            socket,
            proc,
        };
        wait_until("HAProxy to report every server up", SOON, || {
            let states = me.states().ok()?;
            (states.len() == servers.len() && states.values().all(|s| s == "UP")).then_some(())
        });
        me
    }

    /// One runtime-API command's answer.
    pub fn ask(&self, command: &str) -> std::io::Result<String> {
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("{command}\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// Each server of `web` and its status (`UP`, `DRAIN`, `DOWN`, …).
    pub fn states(&self) -> std::io::Result<std::collections::BTreeMap<String, String>> {
        let csv = self.ask("show stat web 4 -1")?;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |n: &str| header.iter().position(|c| *c == n);
        let (Some(sv), Some(st)) = (col("svname"), col("status")) else {
            return Ok(Default::default());
        };
        Ok(lines
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                Some((f.get(sv)?.to_string(), f.get(st)?.to_string()))
            })
            .collect())
    }

    /// The plan keys that drain hosts from this HAProxy's `web` backend
    /// (from `batond` unless `run_on` says otherwise).
    pub fn plan(&self, run_on: &str) -> String {
        format!(
            "\n[service.traffic]\nkind = \"haproxy\"\nsocket = {:?}\nbackend = \"web\"\ndrain_timeout = \"10s\"\nrun_on = \"{run_on}\"\n",
            self.socket.display().to_string()
        )
    }
}
