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
