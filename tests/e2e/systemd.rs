//! systemd integration without systemd: the notify protocol against a real
//! notify socket the test owns, and services managed as systemd units
//! through a `systemctl` stand-in that records its calls.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baton_tests::fleet::Fleet;
use baton_tests::{AgentOpts, SOON, TestEnv, bin, start_agent};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Reads notify datagrams until `want` has been seen `times` times.
fn expect(socket: &UnixDatagram, want: &str, times: usize, seen: &mut Vec<String>) {
    let deadline = Instant::now() + SOON;
    let mut count = seen.iter().filter(|m| m.lines().any(|l| l == want)).count();
    let mut buf = [0u8; 4096];
    while count < times {
        assert!(
            Instant::now() < deadline,
            "no {want} (x{times}) in {seen:?}"
        );
        match socket.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == want) {
                    count += 1;
                }
                seen.push(msg);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
}

fn notify_socket(env: &TestEnv) -> (std::path::PathBuf, UnixDatagram) {
    let path = env.path("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    (path, socket)
}

#[test]
fn batond_and_the_agent_speak_sd_notify() {
    let env = TestEnv::new(&["h1"]);
    let (path, socket) = notify_socket(&env);
    let mut batond = Command::new(bin("batond"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(env.path("batond"))
        .arg("--tls-dir")
        .arg(env.tls())
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(batond.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = format!(
        "https://{}",
        line.trim().strip_prefix("listening on ").unwrap()
    );
    let mut seen = Vec::new();
    expect(&socket, "READY=1", 1, &mut seen);
    // Half the watchdog timeout: at least three keep-alives soon after.
    expect(&socket, "WATCHDOG=1", 3, &mut seen);

    // The agent, with the same socket (the test is its service manager).
    let mut opts = AgentOpts::new("h1");
    opts.env = vec![
        ("NOTIFY_SOCKET".into(), path.display().to_string()),
        ("WATCHDOG_USEC".into(), "200000".into()),
    ];
    let mut agent = start_agent(&env, &url, opts);
    expect(&socket, "READY=1", 2, &mut seen);
    agent.signal(Signal::SIGTERM);
    expect(&socket, "STOPPING=1", 1, &mut seen);
    assert!(agent.wait_exit(SOON).success());

    kill(
        Pid::from_raw(i32::try_from(batond.id()).unwrap()),
        Signal::SIGTERM,
    )
    .unwrap();
    expect(&socket, "STOPPING=1", 2, &mut seen);
    assert!(batond.wait().unwrap().success());
}

/// A `systemctl` stand-in: records each call, and on `restart UNIT` (re)starts
/// the demo service from the release `current` points at, as systemd would
/// start the unit.
fn fake_systemctl(fleet: &Fleet, host: &str) -> std::path::PathBuf {
    let dir = fleet.data_dir(host);
    let script = fleet.env.path(&format!("systemctl-{host}"));
    let calls = fleet.env.path(&format!("systemctl-{host}.calls"));
    let pidfile = fleet.env.path(&format!("systemctl-{host}.pid"));
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/bash
echo "$*" >> {calls}
case "$1" in
  restart|stop)
    if [ -f {pid} ]; then kill "$(cat {pid})" 2>/dev/null; rm -f {pid}; fi
    ;;
esac
if [ "$1" = restart ]; then
  version=$(basename "$(readlink {dir}/services/demo/current)")
  {baton} demo-service --listen 127.0.0.1:{port} --version "$version" > /dev/null 2>&1 &
  echo $! > {pid}
  # systemd waits for the unit to start; so does the stand-in.
  for _ in $(seq 1 200); do
    (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && exit 0
    sleep 0.01
  done
fi
exit 0
"#,
            calls = calls.display(),
            pid = pidfile.display(),
            dir = dir.display(),
            baton = bin("baton").display(),
            port = fleet.ports[host],
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

#[test]
fn a_service_managed_by_systemd_is_swapped_restarted_and_rolled_back() {
    let mut fleet = Fleet::start(&["h1"]);
    let script = fake_systemctl(&fleet, "h1");
    // Whatever happens, the stand-in's service is ours to stop.
    let _stand_in = KillOnDrop(fleet.env.path("systemctl-h1.pid"));
    fleet.agent_extra = vec!["--systemctl".into(), script.display().to_string()];
    fleet.start_agent("h1");
    fleet.wait_connected();
    for (version, broken) in [("1.0.0", false), ("2.0.0", false), ("3.0.0", true)] {
        let dir = fleet.env.path(&format!("unit-{version}"));
        std::fs::create_dir_all(&dir).unwrap();
        // 3.0.0 checks a port nothing listens on: never healthy.
        let check = if broken {
            "127.0.0.1:1"
        } else {
            "127.0.0.1:${port}"
        };
        std::fs::write(
            dir.join("service.toml"),
            format!(
                "supervisor = \"systemd\"\nunit = \"demo-${{BATON_HOST_ID}}.service\"\n\n[health]\nkind = \"http\"\nurl = \"http://{check}/healthz\"\ninterval = \"100ms\"\n"
            ),
        )
        .unwrap();
        let file = fleet.pack_with(&dir, version, &fleet.env.path("release.key"));
        fleet.push(&file);
    }
    let s = fleet.roll(
        "1.0.0",
        "hosts = { role = \"web\" }\nmin_healthy_time = \"200ms\"\n",
    );
    assert_eq!(s["state"], "succeeded", "{s}");
    let s = fleet.roll("2.0.0", "min_healthy_time = \"200ms\"\n");
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_eq!(fleet.get("h1").as_deref(), Some("demo-service 2.0.0"));
    // 3.0.0's health check never passes: rolled back with another restart.
    let s = fleet.roll(
        "3.0.0",
        "min_healthy_time = \"200ms\"\nhealthy_deadline = \"1s\"\n",
    );
    assert_eq!(s["state"], "rolled_back", "{s}");
    assert_eq!(fleet.get("h1").as_deref(), Some("demo-service 2.0.0"));
    let calls = std::fs::read_to_string(fleet.env.path("systemctl-h1.calls")).unwrap();
    assert_eq!(
        calls.lines().collect::<Vec<_>>(),
        vec!["restart demo-h1.service"; 4],
        "{calls}"
    );
    // Between activations the unit's health is still watched: once its
    // process dies, the host reports the service unhealthy.
    let healthy = || {
        let out = fleet.baton(&["hosts", "h1", "--json"]);
        let host: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        host["services"][0]["healthy"].as_bool()
    };
    assert_eq!(healthy(), Some(true));
    let pid: i32 = std::fs::read_to_string(fleet.env.path("systemctl-h1.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    baton_tests::wait_until("the dead unit to show unhealthy", baton_tests::SOON, || {
        (healthy() == Some(false)).then_some(())
    });
}

/// Kills the process whose pid a file holds, when dropped (also when the
/// test fails).
struct KillOnDrop(std::path::PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}
