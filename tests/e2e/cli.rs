//! The operator CLI's contract beyond single calls: `latest` and id
//! prefixes, `rollout start --watch` (NDJSON with `--json`, events in the
//! order and at the times they were recorded, also for a finished
//! rollout), `baton plan check` without a coordinator, and the exit codes.

use serde_json::Value;

use baton_tests::fleet::Fleet;

fn lines(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn start_watch_follows_the_rollout_and_ids_resolve_by_prefix_and_latest() {
    let fleet = Fleet::start(&["h1", "h2"]);
    fleet.release("1.0.0", false);
    let plan = fleet.env.path("plan.toml");
    std::fs::write(
        &plan,
        "[[service]]\nname = \"demo\"\nversion = \"1.0.0\"\nhosts = { role = \"web\" }\nmin_healthy_time = \"1s\"\n",
    )
    .unwrap();

    // Offline first: no coordinator is asked (a URL nothing listens on).
    let out = baton_tests::bin_command("baton")
        .args(["--coordinator", "https://127.0.0.1:9", "plan", "check"])
        .arg(&plan)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("valid: 1 service in 1 wave"), "{text}");
    assert!(text.contains("demo → 1.0.0"), "{text}");
    let bad = fleet.env.path("bad.toml");
    std::fs::write(
        &bad,
        "[[service]]\nname = \"demo\"\nversion = \"1\"\nmax_paralel = 2\n",
    )
    .unwrap();
    let out = fleet.baton(&["plan", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_paralel"),
        "{out:?}"
    );
    let out = fleet.baton(&["plan", "check", bad.to_str().unwrap(), "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false, "{v}");

    // Start and follow: the id, then one event per line until it ends.
    let out = fleet.baton(&[
        "rollout",
        "start",
        plan.to_str().unwrap(),
        "--watch",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let all = lines(&out);
    let id = serde_json::from_str::<Value>(&all[0]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let events: Vec<Value> = all[1..]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(
        events.iter().enumerate().all(|(i, e)| e["seq"] == i as u64),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap()["to"], "succeeded");
    // The service succeeds only after its last host turned healthy.
    let healthy = events
        .iter()
        .rposition(|e| e["kind"] == "host" && e["to"] == "healthy")
        .unwrap();
    let done = events
        .iter()
        .position(|e| e["kind"] == "service" && e["to"] == "succeeded")
        .unwrap();
    assert!(healthy < done, "{events:?}");

    // Watching it again later prints the same history with the times it
    // happened, not the time of the watch.
    let later = fleet.baton(&["rollout", "watch", "latest", "--json"]);
    assert!(later.status.success(), "{later:?}");
    let again: Vec<Value> = lines(&later)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(again, events);

    // latest, a prefix, an unknown prefix, an ambiguous one.
    let status = |id: &str| fleet.baton(&["rollout", "status", id, "--json"]);
    let v: Value = serde_json::from_slice(&status("latest").stdout).unwrap();
    assert_eq!(v["id"], id.as_str());
    let v: Value = serde_json::from_slice(&status(&id[..id.len() - 2]).stdout).unwrap();
    assert_eq!(v["id"], id.as_str());
    let out = status("zz-no-such");
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let second = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"1.0.0\"\nhosts = { role = \"web\" }\n",
    );
    fleet.wait_done(&second, std::time::Duration::from_secs(60));
    let common: String = id
        .chars()
        .zip(second.chars())
        .take_while(|(a, b)| a == b)
        .map(|(a, _)| a)
        .collect();
    let out = status(&common);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("give more of the id"),
        "{out:?}"
    );
    let v: Value = serde_json::from_slice(&status("latest").stdout).unwrap();
    assert_eq!(v["id"], second.as_str());
    // Text watch of a finished rollout ends with its state and exit 0.
    let out = fleet.baton(&["rollout", "watch", &id]);
    assert!(out.status.success(), "{out:?}");
    let text = lines(&out);
    assert_eq!(text.last().unwrap(), &format!("rollout {id} succeeded"));
}

#[test]
fn a_failed_activation_carries_the_probes_answer_and_the_services_log() {
    let fleet = Fleet::start(&["h1"]);
    fleet.install("1.0.0");
    fleet.release("2.0.0", true);
    let id = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\nmin_healthy_time = \"200ms\"\nhealthy_deadline = \"2s\"\n",
    );
    let status = fleet.wait_done(&id, std::time::Duration::from_secs(60));
    assert_eq!(status["state"], "rolled_back", "{status}");
    let h1 = &Fleet::hosts_of(&status)["h1"];
    // The probe's answer: the status and the start of the body.
    let probe = h1["probe"].as_str().unwrap_or_default();
    assert!(probe.contains("returned 503: unhealthy"), "{h1}");
    // The service's log: what the new process printed.
    let log = h1["log_tail"].as_str().unwrap_or_default();
    assert!(log.contains("demo-service 2.0.0 listening"), "{h1}");
    // The same in the history, on the host's way into `failed` ...
    let events = fleet.events(&id);
    let failed = events
        .iter()
        .find(|e| e["kind"] == "host" && e["to"] == "failed")
        .unwrap();
    assert_eq!(failed["probe"], probe, "{failed}");
    assert_eq!(failed["log_tail"], log, "{failed}");
    // ... and in the text an operator reads.
    let out = fleet.baton(&["rollout", "status", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("probe: GET http://"), "{text}");
    assert!(text.contains("| demo-service 2.0.0 listening"), "{text}");
}

#[test]
fn baton_logs_reads_and_follows_a_services_log_through_its_agent() {
    use std::io::{Read, Write};
    let fleet = Fleet::start(&["h1"]);
    fleet.install("1.0.0");
    let out = fleet.baton(&["logs", "h1", "demo", "-n", "50"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("demo-service 1.0.0 listening"), "{text}");

    // An unknown service, a host that is not there.
    let out = fleet.baton(&["logs", "h1", "nope"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no service"),
        "{out:?}"
    );
    let out = fleet.baton(&["logs", "h9", "demo"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    // Following: what the service logs next arrives.
    let mut cmd = baton_tests::bin_command("baton");
    cmd.args(["--coordinator", &fleet.batond.url(), "--tls-dir"])
        .arg(fleet.env.tls())
        .args(["logs", "h1", "demo", "--follow", "-n", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    // The follow has begun once the last line is there.
    baton_tests::wait_until("the log's last line", baton_tests::SOON, || {
        (!seen.lock().unwrap().is_empty()).then_some(())
    });
    let mut s = std::net::TcpStream::connect(fleet.addr("h1")).unwrap();
    s.write_all(b"GET /slow?ms=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    baton_tests::wait_until("the new line to be followed", baton_tests::SOON, || {
        seen.lock()
            .unwrap()
            .contains("a slow request")
            .then_some(())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();

    // Every call is audited (that a viewer may not call it is checked
    // with every RPC in roles.rs).
    let out = fleet.baton(&["audit", "--json", "--limit", "100"]);
    let log: Value = serde_json::from_slice(&out.stdout).unwrap();
    let calls = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "StreamLogs")
        .count();
    assert!(calls >= 3, "{log}");
}
