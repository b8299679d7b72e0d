//! Registration, liveness and restarts of the fleet.

use std::time::{Duration, Instant};

use baton_tests::{AgentOpts, Batond, SOON, TestEnv, start_agent, wait_until};
use nix::sys::signal::Signal;

/// The bound for noticing a silent agent with the default settings.
const DETECTION_BOUND: Duration = Duration::from_secs(15);

#[test]
fn three_agents_register_with_their_labels() {
    let env = TestEnv::new(&["h1", "h2", "h3"]);
    let batond = Batond::start(&env, "batond", &[]);
    let url = batond.url();
    let _agents: Vec<_> = [("h1", "api", "a"), ("h2", "api", "b"), ("h3", "web", "a")]
        .iter()
        .map(|(id, role, zone)| {
            let (role, zone) = (format!("role={role}"), format!("zone={zone}"));
            start_agent(
                &env,
                &url,
                AgentOpts {
                    labels: &[&role, &zone],
                    ..AgentOpts::new(id)
                },
            )
        })
        .collect();

    let hosts = wait_until("three connected hosts", SOON, || {
        let hosts = env.hosts(&url);
        (hosts.len() == 3 && hosts.iter().all(|h| h["connected"] == true)).then_some(hosts)
    });
    let ids: Vec<_> = hosts
        .iter()
        .map(|h| h["host_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["h1", "h2", "h3"], "sorted by host id");
    assert_eq!(
        hosts[0]["labels"],
        serde_json::json!({"role": "api", "zone": "a"})
    );
    assert_eq!(
        hosts[2]["labels"],
        serde_json::json!({"role": "web", "zone": "a"})
    );
    for h in &hosts {
        assert_eq!(
            h["services"],
            serde_json::json!([]),
            "no service installed yet"
        );
        assert_eq!(h["agent_version"], env!("CARGO_PKG_VERSION"));
        for key in ["first_seen", "last_seen"] {
            let t = h[key].as_str().unwrap();
            assert!(
                t.ends_with('Z') && t.len() == 20,
                "{key} is not RFC 3339: {t}"
            );
        }
    }

    // The table form lists the same hosts.
    let out = env.baton(&url, &env.tls(), &["hosts"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("HOST"), "{table}");
    assert!(table.contains("role=web,zone=a"), "{table}");
}

#[test]
fn a_killed_agent_is_disconnected_within_the_bound_and_returns() {
    let env = TestEnv::new(&["h1"]);
    // Default agent timeout: the test checks the shipped bound.
    let batond = Batond::start(&env, "batond", &[]);
    let url = batond.url();
    let mut agent = start_agent(&env, &url, AgentOpts::new("h1"));
    wait_until("h1 connected", SOON, || {
        env.connected(&url, "h1").then_some(())
    });

    let killed = Instant::now();
    agent.kill();
    wait_until("h1 disconnected", DETECTION_BOUND, || {
        (!env.connected(&url, "h1")).then_some(())
    });
    assert!(killed.elapsed() < DETECTION_BOUND);

    let _agent = start_agent(&env, &url, AgentOpts::new("h1"));
    wait_until("h1 connected again", SOON, || {
        env.connected(&url, "h1").then_some(())
    });
}

#[test]
fn a_frozen_agent_is_disconnected_and_reconnects_when_thawed() {
    let env = TestEnv::new(&["h1", "h2"]);
    // A SIGSTOPped agent keeps its socket open: only the silence timeout
    // can notice it. A short timeout keeps the test quick; the default
    // (10 s, within the 15 s bound) is checked by a unit test.
    let batond = Batond::start(&env, "batond", &["--agent-timeout", "2s"]);
    let url = batond.url();
    let frozen = start_agent(&env, &url, AgentOpts::new("h1"));
    let _steady = start_agent(&env, &url, AgentOpts::new("h2"));
    wait_until("both connected", SOON, || {
        (env.connected(&url, "h1") && env.connected(&url, "h2")).then_some(())
    });

    frozen.signal(Signal::SIGSTOP);
    wait_until("frozen h1 disconnected", DETECTION_BOUND, || {
        (!env.connected(&url, "h1")).then_some(())
    });
    assert!(
        batond.proc.log_text().contains("no message for 2s"),
        "the coordinator says why"
    );
    assert!(env.connected(&url, "h2"), "the other agent is unaffected");

    frozen.signal(Signal::SIGCONT);
    wait_until("thawed h1 connected again", SOON, || {
        env.connected(&url, "h1").then_some(())
    });
}

#[test]
fn the_registry_survives_a_coordinator_restart_and_agents_return_by_themselves() {
    let env = TestEnv::new(&["h1", "h2", "h3"]);
    let mut batond = Batond::start(&env, "batond", &[]);
    let url = batond.url();
    let listen = batond.addr.to_string();
    let _h1 = start_agent(
        &env,
        &url,
        AgentOpts {
            labels: &["role=api"],
            ..AgentOpts::new("h1")
        },
    );
    let _h2 = start_agent(&env, &url, AgentOpts::new("h2"));
    let mut h3 = start_agent(
        &env,
        &url,
        AgentOpts {
            labels: &["role=db"],
            ..AgentOpts::new("h3")
        },
    );
    wait_until("three connected", SOON, || {
        (env.hosts(&url)
            .iter()
            .filter(|h| h["connected"] == true)
            .count()
            == 3)
            .then_some(())
    });
    let first_seen = env.host(&url, "h3").unwrap()["first_seen"].clone();

    // h3 goes away for good; then the coordinator restarts.
    h3.kill();
    wait_until("h3 disconnected", SOON, || {
        (!env.connected(&url, "h3")).then_some(())
    });
    assert!(
        batond.proc.terminate().success(),
        "batond exits 0 on SIGTERM"
    );
    assert!(batond.proc.log_text().contains("batond stopped"));
    drop(batond);
    let batond = Batond::start_on(&env, &listen, "batond", &[]);
    assert_eq!(batond.url(), url);

    // h1 and h2 reconnect by themselves; h3 is still known, disconnected,
    // with its labels and its first registration time.
    wait_until("h1 and h2 back", SOON, || {
        (env.connected(&url, "h1") && env.connected(&url, "h2")).then_some(())
    });
    let h3 = env.host(&url, "h3").expect("h3 survived the restart");
    assert_eq!(h3["connected"], false);
    assert_eq!(h3["labels"], serde_json::json!({"role": "db"}));
    assert_eq!(h3["first_seen"], first_seen);
}

#[test]
fn a_sigkilled_coordinator_keeps_the_registry() {
    let env = TestEnv::new(&["h1"]);
    let mut batond = Batond::start(&env, "batond", &[]);
    let url = batond.url();
    let listen = batond.addr.to_string();
    let mut agent = start_agent(
        &env,
        &url,
        AgentOpts {
            labels: &["role=api"],
            ..AgentOpts::new("h1")
        },
    );
    wait_until("h1 connected", SOON, || {
        env.connected(&url, "h1").then_some(())
    });
    // A registration is durable before the host is listed as connected.
    agent.kill();
    batond.proc.kill();
    drop(batond);
    let batond = Batond::start_on(&env, &listen, "batond", &[]);
    let h1 = env
        .host(&batond.url(), "h1")
        .expect("h1 survived a SIGKILL of the coordinator");
    assert_eq!(h1["connected"], false);
    assert_eq!(h1["labels"], serde_json::json!({"role": "api"}));
}

#[test]
fn health_and_reflection_are_served() {
    use baton_common::tls::ClientTls;
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    let env = TestEnv::new(&[]);
    let batond = Batond::start(&env, "batond", &[]);
    let tls = ClientTls::load(&env.tls(), "operator").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(batond.url())
            .unwrap()
            .tls_config(tls.to_tonic())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel.clone());
        for service in [
            "",
            "baton.agent.v1.AgentService",
            "baton.control.v1.ControlService",
        ] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
        }

        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut reflection = ServerReflectionClient::new(channel.clone());
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("{response:?}")
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        for expected in [
            "baton.agent.v1.AgentService",
            "baton.control.v1.ControlService",
            "grpc.health.v1.Health",
        ] {
            assert!(
                names.contains(&expected),
                "{expected} missing from {names:?}"
            );
        }

        // The same through v1alpha, which many clients still speak, down
        // to the file that describes a method.
        use tonic_reflection::pb::v1alpha::{
            ServerReflectionRequest as AlphaRequest,
            server_reflection_client::ServerReflectionClient as AlphaClient,
            server_reflection_request::MessageRequest as AlphaMessage,
            server_reflection_response::MessageResponse as AlphaResponse,
        };
        let mut alpha = AlphaClient::new(channel);
        let requests = vec![
            AlphaRequest {
                host: String::new(),
                message_request: Some(AlphaMessage::ListServices(String::new())),
            },
            AlphaRequest {
                host: String::new(),
                message_request: Some(AlphaMessage::FileContainingSymbol(
                    "baton.control.v1.ControlService.StartRollout".into(),
                )),
            },
        ];
        let mut responses = alpha
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let first = responses.message().await.unwrap().unwrap();
        let Some(AlphaResponse::ListServicesResponse(list)) = first.message_response else {
            panic!("{first:?}")
        };
        let alpha_names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(
            alpha_names.contains(&"baton.control.v1.ControlService"),
            "{alpha_names:?}"
        );
        let second = responses.message().await.unwrap().unwrap();
        let Some(AlphaResponse::FileDescriptorResponse(files)) = second.message_response else {
            panic!("{second:?}")
        };
        assert!(!files.file_descriptor_proto.is_empty());
    });
}

#[test]
fn agents_notice_a_frozen_coordinator_and_reconnect_when_it_thaws() {
    let env = TestEnv::new(&["h1"]);
    let batond = Batond::start(&env, "batond", &["--agent-timeout", "2s"]);
    let url = batond.url();
    let agent = start_agent(&env, &url, AgentOpts::new("h1"));
    wait_until("h1 connected", SOON, || {
        env.connected(&url, "h1").then_some(())
    });

    // A frozen coordinator keeps its sockets open; the agent must notice
    // the silence on its own.
    batond.proc.signal(Signal::SIGSTOP);
    wait_until("the agent to notice the silence", DETECTION_BOUND, || {
        agent
            .log_text()
            .contains("nothing heard from the coordinator for 2s")
            .then_some(())
    });
    batond.proc.signal(Signal::SIGCONT);
    wait_until("h1 connected again", SOON, || {
        (agent
            .log_text()
            .matches("connected to the coordinator")
            .count()
            >= 2
            && env.connected(&url, "h1"))
        .then_some(())
    });
}
