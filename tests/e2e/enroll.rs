//! Enrollment: a new host with only the CA's certificate gets its own
//! with a one-time token; a token reused, expired or for another host id,
//! and a host id already enrolled, are refused and audited; the agent
//! renews its certificate before it expires without dropping its stream.

use std::time::{Duration, SystemTime};

use baton_common::tls::{PeerIdentity, cert_validity, identity_from_der, read_keyed_cert};
use baton_tests::{AgentOpts, Batond, SOON, TestEnv, start_agent, wait_until};
use serde_json::Value;

fn token(env: &TestEnv, url: &str, host: &str, ttl: &str) -> (String, SystemTime) {
    let out = env.baton(
        url,
        &env.tls(),
        &[
            "enroll",
            "create",
            "--host-id",
            host,
            "--ttl",
            ttl,
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let expires = humantime::parse_rfc3339(v["expires_at"].as_str().unwrap()).unwrap();
    (v["token"].as_str().unwrap().to_owned(), expires)
}

/// A TLS directory holding only the fleet's CA certificate.
fn bare_tls(env: &TestEnv, name: &str) -> String {
    let dir = env.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(env.tls().join("ca.pem"), dir.join("ca.pem")).unwrap();
    name.to_owned()
}

fn enroll_fails(env: &TestEnv, url: &str, host: &str, tls: &str, token: &str) -> String {
    let mut opts = AgentOpts::new(host);
    opts.tls = tls;
    opts.extra = vec!["--enroll-token".into(), token.into()];
    let mut agent = start_agent(env, url, opts);
    let status = agent.wait_exit(SOON);
    assert!(!status.success());
    agent.log_text()
}

#[test]
fn a_new_host_enrolls_once_with_a_token_and_renews_its_certificate_in_place() {
    let env = TestEnv::new(&[]);
    let batond = Batond::start(&env, "batond", &["--agent-cert-lifetime", "6s"]);
    let url = batond.url();
    let (good, _) = token(&env, &url, "h9", "10m");

    // Another host id with h9's token: refused, and the token survives.
    let tls = bare_tls(&env, "h8-tls");
    let log = enroll_fails(&env, &url, "h8", &tls, &good);
    assert!(
        log.contains("this enrollment token is for host h9, not h8"),
        "{log}"
    );

    // The happy path: the key is made on the host, the certificate names
    // h9, and the agent connects with it.
    let tls = bare_tls(&env, "h9-tls");
    let mut opts = AgentOpts::new("h9");
    opts.tls = &tls;
    opts.extra = vec!["--enroll-token".into(), good.clone()];
    let agent = start_agent(&env, &url, opts);
    wait_until("h9 to connect", SOON, || {
        env.connected(&url, "h9").then_some(())
    });
    let dir = env.path(&tls);
    let key_mode = std::fs::metadata(dir.join("agent-h9-key.pem")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode.permissions()) & 0o777,
        0o600
    );
    let first = read_keyed_cert(&dir.join("agent-h9.pem"), &dir.join("agent-h9-key.pem")).unwrap();
    assert_eq!(
        identity_from_der(&first.leaf_der).unwrap(),
        PeerIdentity::Agent("h9".try_into().unwrap())
    );
    let (_, first_until) = cert_validity(&first.cert_pem).unwrap();

    // The token is spent, and h9 cannot be taken over.
    let log = enroll_fails(&env, &url, "h9", &bare_tls(&env, "h9-again"), &good);
    assert!(
        log.contains("this enrollment token was already used"),
        "{log}"
    );
    let out = env.baton(&url, &env.tls(), &["enroll", "create", "--host-id", "h9"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("host h9 is already enrolled"),
        "{out:?}"
    );
    // An expired token.
    let (late, expires) = token(&env, &url, "h7", "1s");
    // (The printed time is rounded down to the second.)
    let expired = expires + Duration::from_secs(1);
    wait_until("the token to expire", SOON, || {
        (SystemTime::now() > expired).then_some(())
    });
    let log = enroll_fails(&env, &url, "h7", &bare_tls(&env, "h7-tls"), &late);
    assert!(log.contains("this enrollment token expired at"), "{log}");

    // Renewal: before the 6 s certificate ends, a new one replaces it on
    // disk, and the stream stays up throughout.
    wait_until("the certificate to be renewed", SOON, || {
        let now = read_keyed_cert(&dir.join("agent-h9.pem"), &dir.join("agent-h9-key.pem")).ok()?;
        let (_, until) = cert_validity(&now.cert_pem)?;
        (until > first_until).then_some(())
    });
    assert!(SystemTime::now() < first_until + Duration::from_secs(1));
    assert!(env.connected(&url, "h9"));
    let log = agent.log_text();
    assert!(log.contains("renewed the agent certificate"), "{log}");
    assert!(!log.contains("lost the coordinator"), "{log}");
    // Once the first certificate has expired, a restarted agent connects
    // with the renewed one.
    drop(agent);
    wait_until("the first certificate to expire", SOON, || {
        (SystemTime::now() > first_until).then_some(())
    });
    let mut opts = AgentOpts::new("h9");
    opts.tls = &tls;
    let _agent = start_agent(&env, &url, opts);
    wait_until("h9 to connect again", SOON, || {
        env.connected(&url, "h9").then_some(())
    });

    // Everything is in the audit log.
    let out = env.baton(&url, &env.tls(), &["audit", "--json", "--limit", "1000"]);
    let log: Value = serde_json::from_slice(&out.stdout).unwrap();
    let has = |action: &str, result: &str, text: &str| {
        log.as_array().unwrap().iter().any(|e| {
            e["action"] == action
                && e["result"] == result
                && e["error"].as_str().unwrap_or_default().contains(text)
        })
    };
    assert!(has("Enroll", "denied", "for host h9, not h8"), "{log}");
    assert!(has("Enroll", "denied", "already used"), "{log}");
    assert!(has("Enroll", "denied", "expired"), "{log}");
    assert!(has("Enroll", "ok", ""), "{log}");
    assert!(has("Renew", "ok", ""), "{log}");
    assert!(
        has("CreateEnrollment", "failed", "already enrolled"),
        "{log}"
    );
}

/// `baton-agent enroll` for host `host` with `token`, writing under
/// `env/join-<host>` and never starting anything.
fn join_command(
    env: &TestEnv,
    url: &str,
    host: &str,
    token: &str,
    extra: &[&str],
) -> std::process::Command {
    let dir = env.path(&format!("join-{host}"));
    let mut cmd = baton_tests::bin_command("baton-agent");
    cmd.args([
        "enroll",
        "--coordinator",
        url,
        "--token",
        token,
        "--host-id",
        host,
    ])
    .arg("--config")
    .arg(dir.join("agent.toml"))
    .arg("--data-dir")
    .arg(dir.join("data"))
    .arg("--keys-dir")
    .arg(dir.join("keys"))
    .arg("--no-start")
    .args(extra);
    cmd
}

fn create(env: &TestEnv, url: &str, args: &[&str]) -> String {
    let mut all = vec!["enroll", "create", "--json", "--ttl", "10m"];
    all.extend_from_slice(args);
    let out = env.baton(url, &env.tls(), &all);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["token"].as_str().unwrap().to_owned()
}

#[test]
fn fifty_hosts_enroll_with_one_token_and_some_wait_for_an_operator() {
    let env = TestEnv::new(&[]);
    let batond = Batond::start(&env, "batond", &[]);
    let url = batond.url();
    let release_pub = env.path("release.pub");
    let out = env.baton(
        &url,
        &env.tls(),
        &[
            "artifact",
            "keygen",
            "--out",
            env.path("release").to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(release_pub.exists(), "{out:?}");

    // One token for 50 hosts, granting a label; it carries the CA's
    // fingerprint, so the hosts start with nothing but the token.
    let token = create(&env, &url, &["--uses", "50", "--label", "role=api"]);
    let (_, pin) = token
        .split_once('.')
        .expect("a join token carries the CA fingerprint");
    assert_eq!(pin.len(), 64);
    let keyfile = release_pub.clone();
    let mut running: Vec<(String, std::process::Child)> = (0..50)
        .map(|i| {
            let host = format!("j{i:02}");
            let mut cmd = join_command(
                &env,
                &url,
                &host,
                &token,
                &[
                    "--trusted-key",
                    keyfile.to_str().unwrap(),
                    "--label",
                    "rack=r1",
                ],
            );
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            (host, cmd.spawn().unwrap())
        })
        .collect();
    for (host, child) in running.drain(..) {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The 51st is refused, and writes no configuration.
    let out = join_command(&env, &url, "j50", &token, &[])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("all 50 uses of this enrollment token are spent"),
        "{err}"
    );
    assert!(!env.path("join-j50/agent.toml").exists());

    // What one host got: a configuration the agent runs from alone.
    let dir = env.path("join-j07");
    let config = std::fs::read_to_string(dir.join("agent.toml")).unwrap();
    assert!(config.contains("host-id = \"j07\""), "{config}");
    assert!(
        config.contains("role = \"api\"") && config.contains("rack = \"r1\""),
        "{config}"
    );
    assert!(dir.join("keys").read_dir().unwrap().count() == 1);
    let mode = std::fs::metadata(dir.join("data/tls/agent-j07-key.pem")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    // Again without --force: refused, nothing changed.
    let out = join_command(&env, &url, "j07", &token, &[])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pass --force"),
        "{out:?}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("agent.toml")).unwrap(),
        config
    );
    let mut cmd = baton_tests::bin_command("baton-agent");
    cmd.arg("--config").arg(dir.join("agent.toml"));
    let _agent =
        baton_tests::Proc::spawn("j07", cmd, env.path("j07.log"), std::process::Stdio::null());
    let host = wait_until("j07 to connect", SOON, || {
        env.host(&url, "j07").filter(|h| h["connected"] == true)
    });
    assert_eq!(host["labels"]["role"], "api", "{host}");

    // A token whose hosts wait for approval.
    let token = create(&env, &url, &["--uses", "2", "--approve"]);
    let spawn = |host: &str| {
        let mut cmd = join_command(&env, &url, host, &token, &["--wait", "1m"]);
        cmd.stdout(std::process::Stdio::null());
        baton_tests::Proc::spawn(
            host,
            cmd,
            env.path(&format!("{host}.log")),
            std::process::Stdio::null(),
        )
    };
    let (mut a, mut b) = (spawn("p1"), spawn("p2"));
    let pending = wait_until("two hosts to wait for approval", SOON, || {
        let out = env.baton(&url, &env.tls(), &["enroll", "pending", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v.as_array()?.len() == 2).then_some(v)
    });
    // The fingerprint an operator compares is the one the host printed.
    let key = pending[0]["key_sha256"].as_str().unwrap().to_owned();
    wait_until("p1 to print its key", SOON, || {
        let log = a.log_text() + &b.log_text();
        log.contains(&key).then_some(())
    });
    let out = env.baton(&url, &env.tls(), &["enroll", "accept", "p1"]);
    assert!(out.status.success(), "{out:?}");
    let out = env.baton(&url, &env.tls(), &["enroll", "reject", "p2"]);
    assert!(out.status.success(), "{out:?}");
    assert!(a.wait_exit(SOON).success(), "{}", a.log_text());
    assert!(!b.wait_exit(SOON).success());
    assert!(b.log_text().contains("rejected"), "{}", b.log_text());
    assert!(env.path("join-p1/agent.toml").exists());
    assert!(!env.path("join-p2/agent.toml").exists());
    let out = env.baton(&url, &env.tls(), &["enroll", "accept", "p2"]);
    assert!(!out.status.success());

    // Every use is audited.
    let out = env.baton(&url, &env.tls(), &["audit", "--json", "--limit", "1000"]);
    let log: Value = serde_json::from_slice(&out.stdout).unwrap();
    let count = |result: &str| {
        log.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "Enroll" && e["result"] == result)
            .count()
    };
    // 50 hosts, p1 after its acceptance (and p1's retries before it).
    assert!(count("ok") >= 51, "{log}");
    assert!(count("pending") >= 2, "{log}");
    assert!(count("denied") >= 2, "{log}");
}
