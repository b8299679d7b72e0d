//! Rollouts end to end: real `batond`, real agents, real demo services
//! answering HTTP, artifacts packed, signed and pushed with the real CLI.

use std::time::{Duration, SystemTime};

use baton_common::artifact;
use baton_tests::fleet::Fleet;
use baton_tests::proxy::CuttingProxy;
use baton_tests::{Batond, SOON, wait_until};
use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde_json::Value;

/// Long enough for a rollout of a few hosts on a loaded machine.
const ROLLOUT: Duration = Duration::from_secs(90);

fn time(v: &Value) -> SystemTime {
    let text = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap();
    SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(t.unix_timestamp_nanos()).unwrap())
}

const QUICK: &str = "min_healthy_time = \"200ms\"\n";

fn plan(version: &str, extra: &str) -> String {
    format!("[[service]]\nname = \"demo\"\nversion = \"{version}\"\n{extra}")
}

#[test]
fn a_rolling_upgrade_never_takes_more_than_max_parallel_hosts_out() {
    let fleet = Fleet::start(&["h1", "h2", "h3", "h4"]);
    fleet.install("1.0.0");
    fleet.release("2.0.0", false);
    let id = fleet.start_rollout(&plan(
        "2.0.0",
        "max_parallel = 2\nmin_healthy_time = \"1s\"\n",
    ));
    let s = fleet.wait_done(&id, ROLLOUT);
    assert_eq!(s["state"], "succeeded", "{s}");

    let hosts = Fleet::hosts_of(&s);
    let mut spans = Vec::new();
    for (id, h) in &hosts {
        assert_eq!(h["state"], "healthy", "{h}");
        assert_eq!(
            (h["from_version"].as_str(), h["to_version"].as_str()),
            (Some("1.0.0"), Some("2.0.0"))
        );
        assert_eq!(fleet.get(id).as_deref(), Some("demo-service 2.0.0"), "{id}");
        spans.push((time(&h["started_at"]), time(&h["finished_at"])));
    }
    // Out of service from activation start to healthy: at every start,
    // count the spans open at that instant.
    for (start, _) in &spans {
        let open = spans
            .iter()
            .filter(|(s, f)| s <= start && start < f)
            .count();
        assert!(open <= 2, "{open} hosts out of service at once: {spans:?}");
    }
    // The window was used: not one host at a time.
    assert!(
        spans
            .iter()
            .any(|(s1, _)| spans.iter().filter(|(s, f)| s <= s1 && s1 < f).count() == 2),
        "never two hosts at once: {spans:?}"
    );
}

#[test]
fn a_version_that_never_turns_healthy_is_rolled_back_after_its_first_batch() {
    let fleet = Fleet::start(&["h1", "h2", "h3", "h4"]);
    fleet.install("2.0.0");
    fleet.release("3.0.0", true);
    let id = fleet.start_rollout(&plan(
        "3.0.0",
        "max_parallel = 2\nmin_healthy_time = \"1s\"\nhealthy_deadline = \"2s\"\n",
    ));
    let s = fleet.wait_done(&id, ROLLOUT);
    assert_eq!(s["state"], "rolled_back", "{s}");
    assert!(s["error"].as_str().unwrap().contains("returned 503"), "{s}");
    // The hosts that ran it failed their health gate, and say so as a kind
    // in the status, in the history and in the metrics.
    let kinds: Vec<serde_json::Value> = Fleet::hosts_of(&s)
        .into_values()
        .map(|h| h["failure"].clone())
        .filter(|k| !k.is_null())
        .collect();
    assert!(
        !kinds.is_empty() && kinds.iter().all(|k| *k == "not_healthy"),
        "{s}"
    );
    let events = fleet.events(&id);
    let failed: Vec<&serde_json::Value> = events.iter().filter(|e| e["to"] == "failed").collect();
    assert!(
        !failed.is_empty() && failed.iter().all(|e| e["failure"] == "not_healthy"),
        "{events:?}"
    );

    let hosts = Fleet::hosts_of(&s);
    let ran: Vec<&String> = hosts
        .iter()
        .filter(|(_, h)| !h["started_at"].is_null())
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ran.len(), 2, "only the first batch may run 3.0.0: {s}");
    for (id, h) in &hosts {
        let expected = if ran.contains(&id) {
            "rolled_back"
        } else {
            "staged"
        };
        assert_eq!(h["state"], expected, "{id}: {h}");
        assert_eq!(fleet.get(id).as_deref(), Some("demo-service 2.0.0"), "{id}");
        let started_v3 = fleet
            .service_log(id)
            .matches("demo-service 3.0.0 listening")
            .count();
        assert_eq!(started_v3, usize::from(ran.contains(&id)), "{id}");
    }
}

#[test]
fn a_tampered_artifact_never_activates_anywhere() {
    let fleet = Fleet::start(&["h1", "h2"]);
    fleet.install("1.0.0");
    let key = fleet.env.path("release.key");

    // One payload byte changed, the manifest's digest and piece hashes
    // fixed up by an attacker without the key: the coordinator stores it, the signature
    // no longer matches.
    let good = fleet.pack_with(&fleet.release_dir("6.0.1", false), "6.0.1", &key);
    let (signed, mut file) = artifact::open_artifact(&good).unwrap();
    let mut payload = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut payload).unwrap();
    let last = payload.len() - 1;
    payload[last] ^= 1;
    let mut m = signed.manifest.clone();
    m.payload_sha256 = artifact::sha256_hex(&payload);
    m.pieces = artifact::hash_pieces(payload.as_slice(), m.piece_size).unwrap();
    let forged = artifact::SignedManifest {
        bytes: serde_json::to_vec(&m).unwrap(),
        manifest: m,
        signature: signed.signature.clone(),
    };
    let tampered = fleet.env.path("tampered.baton");
    artifact::write_artifact(&tampered, &forged, &mut payload.as_slice()).unwrap();
    fleet.push(&tampered);

    // Signed with a key the agents do not trust.
    let other = fleet.env.path("other");
    artifact::keygen(&other).unwrap();
    let wrong = fleet.pack_with(
        &fleet.release_dir("6.0.2", false),
        "6.0.2",
        &fleet.env.path("other.key"),
    );
    fleet.push(&wrong);

    // Not signed at all.
    let good = fleet.pack_with(&fleet.release_dir("6.0.3", false), "6.0.3", &key);
    let (mut unsigned, mut file) = artifact::open_artifact(&good).unwrap();
    unsigned.signature.clear();
    let path = fleet.env.path("unsigned.baton");
    artifact::write_artifact(&path, &unsigned, &mut file).unwrap();
    fleet.push(&path);

    // Signed by the right key, but expired (a replayed stale artifact).
    let good = fleet.pack_with(&fleet.release_dir("6.0.5", false), "6.0.5", &key);
    let (signed, mut file) = artifact::open_artifact(&good).unwrap();
    let mut m = signed.manifest.clone();
    m.expires = Some(baton_common::time::rfc3339(
        std::time::SystemTime::now() - std::time::Duration::from_secs(3600),
    ));
    let stale =
        artifact::SignedManifest::sign(m, &artifact::read_signing_key(&key).unwrap()).unwrap();
    let path = fleet.env.path("expired.baton");
    artifact::write_artifact(&path, &stale, &mut file).unwrap();
    fleet.push(&path);

    // A compromised coordinator serving another payload under a good
    // manifest (mix-and-match), or more bytes than it declares.
    let blob = |digest: &str| {
        fleet
            .env
            .path("batond/blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let other = std::fs::read(blob(&fleet.release("6.0.0", false))).unwrap();
    for (version, extra) in [("6.0.6", false), ("6.0.7", true)] {
        let digest = fleet.release(version, false);
        let mut bytes = std::fs::read(blob(&digest)).unwrap();
        if extra {
            bytes.extend_from_slice(b"and then some");
        } else {
            let len = bytes.len();
            bytes = other.clone();
            bytes.resize(len, 0);
        }
        std::fs::write(blob(&digest), bytes).unwrap();
    }

    for (version, why, kind) in [
        ("6.0.1", "signature", "signature"),
        ("6.0.2", "not among the 1 trusted keys", "signature"),
        ("6.0.3", "not signed", "signature"),
        ("6.0.5", "expired at", "signature"),
        ("6.0.6", "copy of sha256:", "download"),
        ("6.0.7", "longer than its manifest says", "download"),
    ] {
        let id = fleet.start_rollout(&plan(version, "max_parallel = 2\n"));
        let s = fleet.wait_done(&id, ROLLOUT);
        assert_eq!(s["state"], "failed", "{s}");
        for (host, h) in Fleet::hosts_of(&s) {
            assert_eq!(h["state"], "failed", "{s}");
            assert!(h["started_at"].is_null(), "{version} activated on {host}");
            let error = h["error"].as_str().unwrap();
            assert!(
                error.contains("staging failed") && error.contains(why),
                "{version}: {error}"
            );
            // The agent said what kind of failure it was.
            assert_eq!(h["failure"], kind, "{version}: {h}");
            assert_eq!(fleet.get(&host).as_deref(), Some("demo-service 1.0.0"));
            assert!(
                !fleet
                    .data_dir(&host)
                    .join(format!("services/demo/releases/{version}"))
                    .exists()
            );
        }
    }

    // A payload that does not match its manifest is refused at the door.
    let good = fleet.pack_with(&fleet.release_dir("6.0.4", false), "6.0.4", &key);
    let mut bytes = std::fs::read(&good).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&good, bytes).unwrap();
    let out = fleet.baton(&["artifact", "push", good.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid argument") && stderr.contains("does not match its manifest"),
        "{stderr}"
    );
    let list = String::from_utf8(fleet.baton(&["artifact", "list", "--json"]).stdout).unwrap();
    assert!(!list.contains("6.0.4"), "{list}");
}

#[test]
fn pause_holds_the_window_resume_continues_and_abort_leaves_hosts_healthy() {
    let fleet = Fleet::start(&["h1", "h2", "h3"]);
    fleet.install("1.0.0");
    fleet.release("2.0.0", false);
    let id = fleet.start_rollout(&plan("2.0.0", "min_healthy_time = \"3s\"\n"));
    fleet.wait_status(&id, "the first host to activate", |s| {
        Fleet::hosts_of(s)
            .values()
            .any(|h| h["state"] == "activating")
    });
    let out = fleet.baton(&["rollout", "pause", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The host in flight finishes; nothing else starts.
    let s = fleet.wait_status(&id, "the activating host to finish", |s| {
        Fleet::hosts_of(s)
            .values()
            .all(|h| h["state"] != "activating")
    });
    assert_eq!(s["state"], "paused");
    let started = |s: &Value| {
        Fleet::hosts_of(s)
            .values()
            .filter(|h| !h["started_at"].is_null())
            .count()
    };
    assert_eq!(started(&s), 1, "{s}");
    let again = fleet.baton(&["rollout", "pause", &id]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("failed precondition"));

    assert!(fleet.baton(&["rollout", "resume", &id]).status.success());
    fleet.wait_status(&id, "a second host to start", |s| started(s) == 2);
    let out = fleet.baton(&["rollout", "abort", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = fleet.status(&id);
    assert_eq!(s["state"], "aborted");

    // Hosts stay where they are (none goes back), and each is healthy.
    let url = fleet.batond.url();
    wait_until("every host to be healthy", SOON, || {
        fleet
            .env
            .hosts(&url)
            .iter()
            .all(|h| h["services"][0]["healthy"] == true)
            .then_some(())
    });
    let versions: Vec<String> = ["h1", "h2", "h3"]
        .iter()
        .map(|h| fleet.get(h).unwrap())
        .collect();
    assert_eq!(
        versions.iter().filter(|v| v.ends_with("2.0.0")).count(),
        2,
        "{versions:?}"
    );
    assert_eq!(
        versions.iter().filter(|v| v.ends_with("1.0.0")).count(),
        1,
        "{versions:?}"
    );
    let s = fleet.status(&id);
    assert_eq!(started(&s), 2, "nothing starts after an abort: {s}");
}

#[test]
fn a_coordinator_killed_mid_rollout_resumes_it_and_activates_no_host_twice() {
    let mut fleet = Fleet::start(&["h1", "h2", "h3"]);
    fleet.install("1.0.0");
    fleet.release("2.0.0", false);
    let id = fleet.start_rollout(&plan("2.0.0", "min_healthy_time = \"2s\"\n"));
    fleet.wait_status(&id, "the first host to activate", |s| {
        Fleet::hosts_of(s)
            .values()
            .any(|h| h["state"] == "activating")
    });
    let addr = fleet.batond.addr.to_string();
    fleet.batond.proc.kill();
    fleet.batond = Batond::start_on(&fleet.env, &addr, "batond", &[]);

    let s = fleet.wait_done(&id, ROLLOUT);
    assert_eq!(s["state"], "succeeded", "{s}");
    for host in ["h1", "h2", "h3"] {
        assert_eq!(fleet.get(host).as_deref(), Some("demo-service 2.0.0"));
        let starts = fleet
            .service_log(host)
            .matches("demo-service 2.0.0 listening")
            .count();
        assert_eq!(
            starts,
            1,
            "{host} started 2.0.0 {starts} times:\n{}",
            fleet.service_log(host)
        );
    }
}

#[test]
fn an_agent_restarted_mid_rollout_keeps_its_service_running() {
    let mut fleet = Fleet::start(&["h1", "h2"]);
    fleet.install("1.0.0");
    fleet.release("2.0.0", false);
    let id = fleet.start_rollout(&plan("2.0.0", "min_healthy_time = \"3s\"\n"));
    // h1 goes first (hosts start in id order): kill its agent while its
    // new process is in the health gate.
    wait_until("h1 to start 2.0.0", SOON, || {
        fleet
            .service_log("h1")
            .contains("demo-service 2.0.0 listening")
            .then_some(())
    });
    let pid = fleet.service_pid("h1").unwrap();
    fleet.agents.get_mut("h1").unwrap().kill();
    assert!(
        kill(Pid::from_raw(pid), None).is_ok(),
        "the service died with its agent"
    );
    assert_eq!(fleet.get("h1").as_deref(), Some("demo-service 2.0.0"));
    fleet.start_agent("h1");

    let s = fleet.wait_done(&id, ROLLOUT);
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_eq!(
        fleet.service_pid("h1"),
        Some(pid),
        "the service was restarted"
    );
    assert_eq!(fleet.get("h1").as_deref(), Some("demo-service 2.0.0"));
    assert_eq!(
        fleet
            .service_log("h1")
            .matches("demo-service 2.0.0 listening")
            .count(),
        1
    );
    let agent_log = fleet.agents["h1"].log_text();
    assert!(
        agent_log.contains("adopted the running service"),
        "{agent_log}"
    );
}

#[test]
fn a_broken_download_resumes_from_its_offset() {
    let mut fleet = Fleet::start(&["h1"]);
    // Agents reach the coordinator through a proxy that cuts the first
    // connection to carry 6 MB towards them: past the first 4 MiB piece.
    let proxy = CuttingProxy::start(fleet.batond.addr, 6 << 20);
    fleet.set_agent_url(format!("https://{}", proxy.addr));
    fleet.start_agent("h1");
    fleet.wait_connected();

    let dir = fleet.release_dir("1.0.0", false);
    // 8 MB that do not compress.
    let mut noise = vec![0u8; 8 << 20];
    let mut rng = fastrand::Rng::with_seed(7);
    rng.fill(&mut noise);
    std::fs::write(dir.join("noise.bin"), &noise).unwrap();
    let file = fleet.pack_with(&dir, "1.0.0", &fleet.env.path("release.key"));
    fleet.push(&file);
    let id = fleet.start_rollout(&plan(
        "1.0.0",
        "hosts = { role = \"web\" }\nmin_healthy_time = \"200ms\"\n",
    ));
    let s = fleet.wait_done(&id, ROLLOUT);
    assert_eq!(s["state"], "succeeded", "{s}");
    assert!(proxy.has_cut(), "the proxy never cut a connection");
    let log = fleet.agents["h1"].log_text();
    let line = log
        .lines()
        .find(|l| l.contains("the download broke; resuming from the last checked piece"))
        .unwrap_or_else(|| panic!("no resume in the agent log:\n{log}"));
    let offset: u64 = line
        .split("offset=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    // At the end of the first piece, the last one checked.
    assert_eq!(offset, 4 << 20, "resumed at {offset}: {line}");
    let staged = fleet
        .data_dir("h1")
        .join("services/demo/releases/1.0.0/noise.bin");
    assert_eq!(std::fs::read(staged).unwrap(), noise);
}

#[test]
fn bad_plans_are_refused_precisely_and_create_nothing() {
    let fleet = Fleet::start(&["h1"]);
    fleet.release("1.0.0", false);
    let cases = [
        (
            plan("1.0.0", "hosts = { role = \"web\" }\ncolour = \"red\"\n"),
            "unknown field `colour`",
        ),
        (
            plan(
                "1.0.0",
                "hosts = { role = \"web\" }\nmin_healthy_time = \"soon\"\n",
            ),
            "min_healthy_time: invalid duration \"soon\"",
        ),
        (
            plan("1.0.0", "hosts = { role = \"web\" }\nmax_parallel = 0\n"),
            "max_parallel: must be at least 1",
        ),
        (
            plan("1.0.0", "hosts = { role = \"db\" }\n"),
            "hosts = { role=db } matches no host",
        ),
        (plan("1.0.0", ""), "no host runs it yet"),
        (
            plan("9.9.9", "hosts = { role = \"web\" }\n"),
            "version \"9.9.9\" has not been pushed; pushed versions: 1.0.0",
        ),
        (
            "[[service]]\nname = \"nosuch\"\nversion = \"1.0.0\"\nhosts = { role = \"web\" }\n"
                .to_owned(),
            "no artifact of this service has been pushed",
        ),
        (
            "[[service]]\nname = \"web\"\nversion = \"2\"\nhosts = { role = \"web\" }\n".to_owned(),
            "it is not a semantic version",
        ),
        (
            "[[service]]\nname = \"web\"\nversion = \"1.99999999999999999999.0\"\n".to_owned(),
            "every number must fit in 64 bits",
        ),
    ];
    for (text, expected) in cases {
        let out = fleet.try_start_rollout(&text);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted:\n{text}");
        assert!(stderr.contains("invalid argument"), "{stderr}");
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in: {stderr}"
        );
    }
    let list = fleet.baton(&["rollout", "list", "--json"]);
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "[]");
    assert!(!fleet.data_dir("h1").join("services/demo").exists());
}

#[test]
fn a_failed_first_install_is_rolled_back_by_removing_the_service() {
    let fleet = Fleet::start(&["h1", "h2"]);
    fleet.release("3.0.0", true);
    let id = fleet.start_rollout(&plan(
        "3.0.0",
        "hosts = { role = \"web\" }\nmin_healthy_time = \"1s\"\nhealthy_deadline = \"2s\"\n",
    ));
    let s = fleet.wait_done(&id, ROLLOUT);
    assert_eq!(s["state"], "rolled_back", "{s}");
    let hosts = Fleet::hosts_of(&s);
    assert_eq!(hosts["h1"]["state"], "rolled_back", "{s}");
    assert!(hosts["h1"]["from_version"].is_null());
    for host in ["h1", "h2"] {
        assert_eq!(fleet.get(host), None, "{host} still serves");
    }
    assert!(!fleet.data_dir("h1").join("services/demo").exists());
    let url = fleet.batond.url();
    wait_until("h1 to report no service", SOON, || {
        fleet.env.host(&url, "h1").unwrap()["services"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    });
}

#[test]
fn a_downgrade_needs_allow_downgrade_and_a_release_the_host_still_has() {
    let fleet = Fleet::start(&["h1"]);
    fleet.install("1.0.0");
    fleet.release("2.0.0", false);
    let s = fleet.roll("2.0.0", QUICK);
    assert_eq!(s["state"], "succeeded", "{s}");

    // Refused when the plan is read, with nothing started.
    let out = fleet.try_start_rollout(&plan("1.0.0", QUICK));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("h1 runs 2.0.0, newer than 1.0.0; to go back, say allow_downgrade = true"),
        "{stderr}"
    );
    let list = fleet.baton(&["rollout", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");

    // Said explicitly: back to 1.0.0, which h1 still has.
    let s = fleet.roll("1.0.0", &format!("allow_downgrade = true\n{QUICK}"));
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_eq!(fleet.get("h1").as_deref(), Some("demo-service 1.0.0"));

    // An older release h1 never had is refused by the agent itself, even
    // when the plan allows downgrades: nothing older is ever fetched.
    fleet.release("0.9.0", false);
    let s = fleet.roll("0.9.0", &format!("allow_downgrade = true\n{QUICK}"));
    assert_eq!(s["state"], "failed", "{s}");
    let h1 = &Fleet::hosts_of(&s)["h1"];
    let error = h1["error"].as_str().unwrap();
    assert!(
        error.contains("refusing to stage demo 0.9.0: it is older than the 1.0.0 this host runs"),
        "{error}"
    );
    assert!(
        !fleet
            .data_dir("h1")
            .join("services/demo/releases/0.9.0")
            .exists()
    );
    assert_eq!(fleet.get("h1").as_deref(), Some("demo-service 1.0.0"));
}
