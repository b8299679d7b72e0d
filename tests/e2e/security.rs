//! Identity and trust: certificates from another CA, an agent claiming
//! another host, and certificates used for the wrong API.

use baton_tests::{AgentOpts, Batond, SOON, TestEnv, copy_tls, start_agent, wait_until};

/// Waits until `proc`'s log shows `needle` at least `times` times.
fn wait_for_log(proc: &baton_tests::Proc, needle: &str, times: usize) {
    wait_until(
        &format!("{times}× {needle:?} in the log of {}", proc.name),
        SOON,
        || (proc.log_text().matches(needle).count() >= times).then_some(()),
    );
}

#[test]
fn certificates_from_another_ca_are_refused() {
    let env = TestEnv::new(&["h1"]);
    env.certs_init("other", &["h1"]);
    let batond = Batond::start(&env, "batond", &[]);
    let url = batond.url();

    // An agent that trusts our coordinator but holds a certificate from
    // another CA: the TLS handshake refuses it, attempt after attempt.
    copy_tls(
        &env,
        &[
            ("tls/ca.pem", "foreign-agent/ca.pem"),
            ("other/agent-h1.pem", "foreign-agent/agent-h1.pem"),
            ("other/agent-h1-key.pem", "foreign-agent/agent-h1-key.pem"),
        ],
    );
    let agent = start_agent(
        &env,
        &url,
        AgentOpts {
            tls: "foreign-agent",
            ..AgentOpts::new("h1")
        },
    );
    wait_for_log(&agent, "no stream to the coordinator", 2);
    assert!(
        env.host(&url, "h1").is_none(),
        "a foreign certificate must never register a host"
    );

    // The CLI with an operator certificate from another CA.
    copy_tls(
        &env,
        &[
            ("tls/ca.pem", "foreign-op/ca.pem"),
            ("other/operator.pem", "foreign-op/operator.pem"),
            ("other/operator-key.pem", "foreign-op/operator-key.pem"),
        ],
    );
    let out = env.baton(&url, &env.path("foreign-op"), &["hosts", "--json"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing on stdout on failure");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("baton: ") && err.trim_end().lines().count() == 1,
        "one sentence: {err}"
    );

    // The CLI trusting another CA refuses our coordinator.
    let out = env.baton(&url, &env.path("other"), &["hosts"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("cannot reach the coordinator") && err.contains("certificate"),
        "{err}"
    );
}

#[test]
fn an_agent_claiming_another_host_id_is_refused() {
    let env = TestEnv::new(&["h1", "h2"]);
    let batond = Batond::start(&env, "batond", &[]);
    let url = batond.url();
    // h1's certificate presented under h2's name.
    copy_tls(
        &env,
        &[
            ("tls/ca.pem", "impostor/ca.pem"),
            ("tls/agent-h1.pem", "impostor/agent-h2.pem"),
            ("tls/agent-h1-key.pem", "impostor/agent-h2-key.pem"),
        ],
    );
    let agent = start_agent(
        &env,
        &url,
        AgentOpts {
            tls: "impostor",
            ..AgentOpts::new("h2")
        },
    );

    wait_for_log(&agent, "the coordinator refused this agent", 1);
    assert!(
        agent
            .log_text()
            .contains("this certificate is for host h1, but the hello claims host h2"),
        "{}",
        agent.log_text()
    );
    wait_for_log(
        &batond.proc,
        "refused an agent whose hello claims another host id",
        1,
    );
    assert!(env.hosts(&url).is_empty(), "neither h1 nor h2 registered");
}

#[test]
fn certificates_are_only_good_for_their_own_api() {
    let env = TestEnv::new(&["h1"]);
    let batond = Batond::start(&env, "batond", &[]);
    let url = batond.url();

    // An agent certificate on the Control API.
    copy_tls(
        &env,
        &[
            ("tls/ca.pem", "agent-as-op/ca.pem"),
            ("tls/agent-h1.pem", "agent-as-op/operator.pem"),
            ("tls/agent-h1-key.pem", "agent-as-op/operator-key.pem"),
        ],
    );
    let out = env.baton(&url, &env.path("agent-as-op"), &["hosts"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("permission denied") && err.contains("only operator certificates"),
        "{err}"
    );

    // An operator certificate on the agent stream.
    copy_tls(
        &env,
        &[
            ("tls/ca.pem", "op-as-agent/ca.pem"),
            ("tls/operator.pem", "op-as-agent/agent-h1.pem"),
            ("tls/operator-key.pem", "op-as-agent/agent-h1-key.pem"),
        ],
    );
    let agent = start_agent(
        &env,
        &url,
        AgentOpts {
            tls: "op-as-agent",
            ..AgentOpts::new("h1")
        },
    );
    wait_for_log(&agent, "the coordinator refused this agent", 1);
    wait_for_log(
        &batond.proc,
        "refused a non-agent certificate on the agent stream",
        1,
    );
    assert!(env.hosts(&url).is_empty());
}

/// Least privilege: `user = "nobody"` in service.toml. The service, its
/// hooks and checks run as that user; its release belongs to root with the
/// service's group, readable but not writable by it.
#[test]
fn a_service_runs_as_its_own_user_and_cannot_change_its_release() {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: starting a service as another user needs the agent to run as root");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        eprintln!("SKIPPED: this host has no user nobody");
        return;
    };
    let fleet = baton_tests::fleet::Fleet::start(&["h1"]);
    // nobody must reach its release below the test's private temp dir.
    std::fs::set_permissions(
        fleet.env.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    // Somewhere nobody may write, to say who ran the hook.
    let out = fleet.env.path("hook-out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let dir = fleet.release_dir_with(
        "1.0.0",
        false,
        true,
        &format!(
            "\n[hooks]\npre_start = [\"/bin/sh\", \"-c\", \"id -u > {}/uid\"]\n",
            out.display()
        ),
    );
    let toml = std::fs::read_to_string(dir.join("service.toml")).unwrap();
    std::fs::write(
        dir.join("service.toml"),
        format!("user = \"nobody\"\n{toml}"),
    )
    .unwrap();
    let file = fleet.pack_with(&dir, "1.0.0", &fleet.env.path("release.key"));
    fleet.push(&file);
    // Another service's directory, as older agents left it (0755).
    let other = fleet.data_dir("h1").join("services/other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let id = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"1.0.0\"\nhosts = { role = \"web\" }\nmin_healthy_time = \"200ms\"\n",
    );
    let s = fleet.wait_done(&id, SOON);
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_eq!(fleet.get("h1").as_deref(), Some("demo-service 1.0.0"));

    // The process runs as nobody.
    let pid = fleet.service_pid("h1").unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace()
            .skip(1)
            .all(|u| u == nobody.uid.to_string()),
        "{uid}"
    );
    // So did its hook.
    let hook_uid = std::fs::read_to_string(out.join("uid")).unwrap();
    assert_eq!(hook_uid.trim(), nobody.uid.to_string());
    // The release: root's, the service's group, no write for it.
    let release = fleet.data_dir("h1").join("services/demo/releases/1.0.0");
    let meta = std::fs::metadata(release.join("service.toml")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, nobody.gid.as_raw()));
    assert_eq!(meta.mode() & 0o077, 0o040, "{:o}", meta.mode());
    let touched = std::process::Command::new("/bin/sh")
        .args(["-c", "touch service.toml || exit 3; touch new-file"])
        .current_dir(&release)
        .uid(nobody.uid.as_raw())
        .gid(nobody.gid.as_raw())
        .status()
        .unwrap();
    assert!(!touched.success(), "nobody could write its release");
    // Its own directory is open to its group only; the others are closed.
    let own = std::fs::metadata(fleet.data_dir("h1").join("services/demo")).unwrap();
    assert_eq!(
        (own.mode() & 0o777, own.gid()),
        (0o710, nobody.gid.as_raw())
    );
    assert_eq!(std::fs::metadata(&other).unwrap().mode() & 0o777, 0o700);
    // The agent's own state stays closed to it.
    let journal = std::fs::metadata(fleet.data_dir("h1").join("commands")).unwrap();
    assert_eq!(journal.mode() & 0o777, 0o700);
}

/// Without a client certificate a connection gets through TLS (a new host
/// must reach enrollment), and then only enrollment answers: every other
/// service says a certificate is required.
#[test]
fn without_a_certificate_only_enrollment_answers() {
    use baton_proto::agent::v1 as agent;
    use baton_proto::control::v1 as control;
    let env = TestEnv::new(&[]);
    let batond = Batond::start(&env, "batond", &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = env.anonymous_channel(&batond.url()).await;
        let err = control::control_service_client::ControlServiceClient::new(channel.clone())
            .list_hosts(control::ListHostsRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        assert!(
            err.message().contains("a client certificate is required"),
            "{err}"
        );
        let err = agent::artifact_service_client::ArtifactServiceClient::new(channel.clone())
            .fetch(agent::FetchRequest {
                digest: format!("sha256:{}", "0".repeat(64)),
                offset: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        let err = agent::enrollment_service_client::EnrollmentServiceClient::new(channel.clone())
            .renew(agent::RenewRequest {
                csr_pem: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        let err = baton_tests::abuse::enroll_with_a_guessed_token(channel).await;
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        assert!(err.message().contains("unknown enrollment token"), "{err}");
    });
    // None of it is in the audit log: strangers cannot fill the store.
    let out = env.baton(&batond.url(), &env.tls(), &["audit", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let log: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(log, serde_json::json!([]), "{log}");
}

/// The value of a counter in a Prometheus text document.
fn counter(doc: &str, name: &str) -> f64 {
    doc.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{doc}"))
}

/// Two agents sharing one host certificate: the newer stream wins, but
/// only a few times in a while; the conflict is told in the audit log, the
/// metrics and the coordinator's log, and the host's labels stop flipping.
#[test]
fn two_agents_with_one_certificate_take_the_stream_over_a_bounded_number_of_times() {
    use baton_coordinator::fleet::MAX_TAKEOVERS;
    let env = TestEnv::new(&["h1"]);
    let batond = Batond::start(&env, "batond", &["--metrics-listen", "127.0.0.1:0"]);
    let url = batond.url();
    let metrics = batond.metrics.unwrap();
    let scrape = || {
        baton_tests::http::request(metrics, "GET", "/metrics", &[], "")
            .unwrap()
            .body
    };
    let mut first = AgentOpts::new("h1");
    first.labels = &["side=a"];
    let _a = start_agent(&env, &url, first);
    wait_until("h1 to connect", SOON, || {
        let out = env.baton(&url, &env.tls(), &["hosts", "--json"]);
        String::from_utf8_lossy(&out.stdout)
            .contains("\"side\": \"a\"")
            .then_some(())
    });
    // A second agent with the same certificate, elsewhere on disk.
    let mut twin = std::process::Command::new(baton_tests::bin("baton-agent"));
    twin.args(["--coordinator", &url, "--host-id", "h1", "--data-dir"])
        .arg(env.path("twin"))
        .arg("--tls-dir")
        .arg(env.tls())
        .args(["--reconnect-max", "200ms", "--label", "side=b"]);
    let _b = baton_tests::Proc::spawn(
        "twin agent h1",
        twin,
        env.path("twin.log"),
        std::process::Stdio::null(),
    );
    // Both keep trying (reconnecting within 200 ms to 1 s): refusals pile
    // up while takeovers stay at the limit.
    wait_until("several refused takeovers", SOON, || {
        (counter(&scrape(), "baton_stream_takeovers_refused_total") >= 10.0).then_some(())
    });
    let doc = scrape();
    let takeovers = counter(&doc, "baton_stream_takeovers_total");
    assert!(
        (1.0..=MAX_TAKEOVERS as f64).contains(&takeovers),
        "{takeovers} takeovers"
    );
    let out = env.baton(&url, &env.tls(), &["audit", "--json", "--limit", "1000"]);
    assert!(out.status.success(), "{out:?}");
    let log: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = log.as_array().unwrap();
    let took: Vec<_> = entries
        .iter()
        .filter(|e| e["who"] == "agent h1" && e["action"] == "Connect" && e["result"] == "ok")
        .collect();
    assert_eq!(took.len() as f64, takeovers, "{log:#}");
    assert!(
        took.iter().all(|e| e["error"]
            .as_str()
            .unwrap()
            .contains("took over the live stream")),
        "{log:#}"
    );
    assert!(
        entries.iter().any(|e| e["who"] == "agent h1"
            && e["result"] == "denied"
            && e["error"]
                .as_str()
                .unwrap()
                .contains("are two agents using one certificate")),
        "{log:#}"
    );
}

/// A coordinator turned rogue (it holds the real coordinator certificate)
/// removes a service and then sends a signed, older release of it: the
/// agent remembers the highest version it ran, which the removal does not
/// erase, and refuses to stage or activate anything older.
#[test]
fn a_rogue_coordinator_cannot_bring_an_older_release_back_by_removing_the_service_first() {
    use baton_proto::agent::v1 as pb;
    use pb::command::Kind;
    let mut fleet = baton_tests::fleet::Fleet::start(&["h1"]);
    fleet.install("1.0.0");
    fleet.release("2.0.0", false);
    let s = fleet.roll("2.0.0", "min_healthy_time = \"200ms\"\n");
    assert_eq!(s["state"], "succeeded", "{s}");

    let rogue = baton_tests::rogue::Rogue::start(&fleet.env.tls());
    fleet.agent_url = rogue.url.clone();
    fleet.start_agent("h1");
    let (old, _) =
        baton_common::artifact::open_artifact(&fleet.env.path("demo-1.0.0.baton")).unwrap();
    rogue
        .run(Kind::Remove(pb::Remove {
            service: "demo".into(),
        }))
        .unwrap();
    assert!(!fleet.data_dir("h1").join("services/demo").exists());

    let error = rogue
        .run(Kind::Stage(pb::Stage {
            service: "demo".into(),
            version: "1.0.0".into(),
            manifest: old.bytes.clone(),
            signature: old.signature.clone(),
        }))
        .unwrap_err();
    assert!(
        error.contains("refusing demo 1.0.0: this host has run 2.0.0"),
        "{error}"
    );
    assert!(!fleet.data_dir("h1").join("services/demo").exists());
    let gate = |s| {
        Some(prost_types::Duration {
            seconds: s,
            nanos: 0,
        })
    };
    let error = rogue
        .run(Kind::Activate(pb::Activate {
            service: "demo".into(),
            version: "1.0.0".into(),
            min_healthy_time: gate(1),
            healthy_deadline: gate(30),
            allow_downgrade: true,
        }))
        .unwrap_err();
    assert!(error.contains("this host has run 2.0.0"), "{error}");
    // The newest release is still welcome.
    let (new, _) =
        baton_common::artifact::open_artifact(&fleet.env.path("demo-2.0.0.baton")).unwrap();
    let error = rogue
        .run(Kind::Stage(pb::Stage {
            service: "demo".into(),
            version: "2.0.0".into(),
            manifest: new.bytes,
            signature: new.signature,
        }))
        .unwrap_err();
    // (It gets as far as the download, which this coordinator cannot
    // serve: the version check let it through.)
    assert!(!error.contains("this host has run"), "{error}");
}

/// The slow-retrieval attack: a coordinator (or a network) that sends a
/// payload at one byte a second. The host's download stalls three windows
/// in a row and its staging fails, within three times
/// `--download-stall-timeout`; with `max_failures = 1` the other hosts go
/// on, and the slow one keeps serving its old release.
#[test]
fn a_download_at_a_byte_a_second_fails_its_host_within_the_cutoff_and_the_rest_goes_on() {
    let mut fleet = baton_tests::fleet::Fleet::start(&["h1", "h2", "h3"]);
    fleet.install("1.0.0");
    let proxy = baton_tests::proxy::TricklingProxy::start(fleet.batond.addr);
    fleet.set_agent_url(format!("https://{}", proxy.addr));
    fleet.agent_extra = vec!["--download-stall-timeout".into(), "1s".into()];
    fleet.start_agent("h3");
    fleet.wait_connected();
    fleet.release("2.0.0", false);
    proxy.trickle();
    let started = std::time::Instant::now();
    let s = fleet.roll("2.0.0", "max_failures = 1\nmin_healthy_time = \"200ms\"\n");
    assert_eq!(s["state"], "succeeded", "{s}");
    let hosts = baton_tests::fleet::Fleet::hosts_of(&s);
    assert_eq!(hosts["h1"]["state"], "healthy", "{s}");
    assert_eq!(hosts["h2"]["state"], "healthy", "{s}");
    assert_eq!(hosts["h3"]["state"], "failed", "{s}");
    let error = hosts["h3"]["error"].as_str().unwrap();
    assert!(
        error.contains("staging failed")
            && error.contains("stalled 3 times in a row, below 16 KiB/s for 1s each"),
        "{error}"
    );
    // Three seconds of stalls (and some slack), not ten attempts of 30 s.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(fleet.get("h3").as_deref(), Some("demo-service 1.0.0"));
}

/// Signs a certificate for `uris` (subject alternative names) with the
/// fleet CA in `tls`, valid from two hours to one hour ago: expired.
fn expired(tls: &std::path::Path, base: &str, uris: &[&str]) {
    use rcgen::{CertificateParams, Issuer, KeyPair, SanType};
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(tls.join("ca-key.pem")).unwrap()).unwrap();
    let ca = Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(tls.join("ca.pem")).unwrap(),
        ca_key,
    )
    .unwrap();
    let mut params = CertificateParams::default();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(2);
    params.not_after = now - time::Duration::hours(1);
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    std::fs::write(tls.join(format!("{base}.pem")), cert.pem()).unwrap();
    std::fs::write(tls.join(format!("{base}-key.pem")), key.serialize_pem()).unwrap();
}

/// A certificate of the fleet's own CA that has expired opens nothing: an
/// agent's does not open its stream, an operator's (an admin's, even)
/// reaches no call.
#[test]
fn expired_agent_and_operator_certificates_are_refused() {
    let env = TestEnv::new(&[]);
    let batond = Batond::start(&env, "batond", &[]);
    let url = batond.url();
    // An agent whose certificate expired an hour ago.
    copy_tls(&env, &[("tls/ca.pem", "old/ca.pem")]);
    expired(&env.tls(), "agent-h9", &["urn:baton:agent:h9"]);
    copy_tls(
        &env,
        &[
            ("tls/agent-h9.pem", "old/agent-h9.pem"),
            ("tls/agent-h9-key.pem", "old/agent-h9-key.pem"),
        ],
    );
    let mut opts = AgentOpts::new("h9");
    opts.tls = "old";
    let agent = start_agent(&env, &url, opts);
    wait_until("the agent to be refused", SOON, || {
        agent
            .log_text()
            .contains("received fatal alert: CertificateExpired")
            .then_some(())
    });
    assert!(env.hosts(&url).is_empty());
    // An admin whose certificate expired.
    expired(
        &env.tls(),
        "old-admin",
        &["urn:baton:operator:old-admin", "urn:baton:role:admin"],
    );
    let out = env.baton(
        &url,
        &env.tls(),
        &[
            "--cert",
            env.tls().join("old-admin.pem").to_str().unwrap(),
            "--key",
            env.tls().join("old-admin-key.pem").to_str().unwrap(),
            "hosts",
        ],
    );
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("old-admin.pem expired at"), "{stderr}");
    // And the coordinator refuses it too, for clients that do not check.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let read = |f: &str| std::fs::read(env.tls().join(f)).unwrap();
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")))
                    .identity(tonic::transport::Identity::from_pem(
                        read("old-admin.pem"),
                        read("old-admin-key.pem"),
                    )),
            )
            .unwrap()
            .connect()
            .await;
        let answered = match channel {
            Err(_) => false,
            Ok(channel) => {
                baton_proto::control::v1::control_service_client::ControlServiceClient::new(channel)
                    .list_hosts(baton_proto::control::v1::ListHostsRequest {})
                    .await
                    .is_ok()
            }
        };
        assert!(!answered, "an expired certificate was served");
    });
}
