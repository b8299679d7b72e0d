//! Roles on the Control API: every RPC, read from the API's own
//! descriptor, called with a viewer's, an operator's and an admin's
//! certificate over real mTLS; each must be refused exactly when the role
//! is below what `authz::TABLE` names. Changes, allowed or refused, land
//! in the audit log.

use baton_common::tls::Role;
use baton_coordinator::authz;
use baton_tests::{Batond, SOON, TestEnv, wait_until};
use prost::Message;
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

/// Every Control API method: name, client-streaming, server-streaming.
fn methods() -> Vec<(String, bool, bool)> {
    let fds = prost_types::FileDescriptorSet::decode(baton_proto::FILE_DESCRIPTOR_SET).unwrap();
    let service = fds
        .file
        .iter()
        .flat_map(|f| &f.service)
        .find(|s| s.name() == "ControlService")
        .expect("the Control API is in the descriptor");
    service
        .method
        .iter()
        .map(|m| {
            (
                m.name().to_owned(),
                m.client_streaming(),
                m.server_streaming(),
            )
        })
        .collect()
}

/// Calls `method` with an empty request; the status code it ends with.
async fn call(
    channel: Channel,
    method: &str,
    client_streaming: bool,
    server_streaming: bool,
) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path =
        PathAndQuery::try_from(format!("/baton.control.v1.ControlService/{method}")).unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let once = || tonic::Request::new(tokio_stream::once(()));
    let result = match (client_streaming, server_streaming) {
        (false, false) => grpc
            .unary(tonic::Request::new(()), path, codec)
            .await
            .map(drop),
        (false, true) => grpc
            .server_streaming(tonic::Request::new(()), path, codec)
            .await
            .map(drop),
        (true, false) => grpc.client_streaming(once(), path, codec).await.map(drop),
        (true, true) => grpc.streaming(once(), path, codec).await.map(drop),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

fn issue(env: &TestEnv, name: &str, role: &str) {
    let out = baton_tests::bin_command("baton")
        .arg("--tls-dir")
        .arg(env.tls())
        .args(["certs", "issue-operator", name, "--role", role])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn every_rpc_is_allowed_exactly_to_the_roles_the_table_names_and_changes_are_audited() {
    let env = TestEnv::new(&["h1"]);
    let batond = Batond::start(&env, "batond", &[]);
    let url = batond.url();
    for role in Role::ALL {
        issue(&env, &format!("{role}1"), role.as_str());
    }
    let methods = methods();
    // Deny by default: a call the table forgot is refused to everyone,
    // and this says which.
    for (m, ..) in &methods {
        assert!(
            authz::required(m).is_some(),
            "{m} has no role in authz::TABLE"
        );
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for role in Role::ALL {
            let channel = env.channel(&url, &format!("{role}1")).await;
            for (m, cs, ss) in &methods {
                let code = call(channel.clone(), m, *cs, *ss).await;
                let allowed = role >= authz::required(m).unwrap();
                assert_eq!(
                    code == Code::PermissionDenied,
                    !allowed,
                    "{role} calling {m} ended with {code:?}"
                );
            }
        }
        // An agent's certificate is no operator's, and the attempt is
        // audited like any other.
        let agent = env.channel(&url, "agent-h1").await;
        assert_eq!(
            call(agent, "StartRollout", false, false).await,
            Code::PermissionDenied
        );
        // The admin reads the audit log: refused and allowed changes, not
        // reads.
        let admin = env.channel(&url, "admin1").await;
        let mut client =
            baton_proto::control::v1::control_service_client::ControlServiceClient::new(admin);
        // Refusals are recorded in the background: wait (bounded) for
        // the last one.
        let deadline = std::time::Instant::now() + SOON;
        let log = loop {
            let log = client
                .list_audit(baton_proto::control::v1::ListAuditRequest { limit: 1000 })
                .await
                .unwrap()
                .into_inner()
                .entries;
            if log.iter().any(|e| e.who == "agent h1") || std::time::Instant::now() > deadline {
                break log;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let has = |who: &str, action: &str, result: &str| {
            log.iter()
                .any(|e| e.who == who && e.action == action && e.result == result)
        };
        assert!(
            has("operator viewer1", "StartRollout", "denied"),
            "{log:#?}"
        );
        assert!(has("agent h1", "StartRollout", "denied"), "{log:#?}");
        assert!(
            has("operator viewer1", "PushArtifact", "denied"),
            "{log:#?}"
        );
        assert!(has("operator operator1", "ListAudit", "denied"), "{log:#?}");
        // Allowed, and failed on its empty plan.
        assert!(
            has("operator operator1", "StartRollout", "failed"),
            "{log:#?}"
        );
        assert!(log.iter().all(|e| e.action != "ListHosts"), "{log:#?}");
        assert!(
            log.iter()
                .all(|e| e.at.is_some() && (e.who.starts_with("agent ") || !e.role.is_empty()))
        );
    });

    // The CLI with --cert/--key: a viewer is told why it may not.
    let plan = env.path("plan.toml");
    std::fs::write(&plan, "[[service]]\nname = \"x\"\nversion = \"1\"\n").unwrap();
    let cert = env.tls().join("viewer1.pem");
    let key = env.tls().join("viewer1-key.pem");
    let out = env.baton(
        &url,
        &env.tls(),
        &[
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "rollout",
            "start",
            plan.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Refused: exit 4 (docs/reference/exit-codes.md).
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains(
            "permission denied: role viewer may not call StartRollout: it needs operator"
        ),
        "{stderr}"
    );
    let log = wait_until("the refusal in the audit log", SOON, || {
        let out = env.baton(&url, &env.tls(), &["audit", "--json"]);
        assert!(out.status.success(), "{out:?}");
        let log: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (log[0]["who"] == "operator viewer1").then_some(log)
    });
    assert_eq!(log[0]["who"], "operator viewer1", "{log}");
    assert_eq!(log[0]["action"], "StartRollout", "{log}");
    assert_eq!(log[0]["result"], "denied", "{log}");
}

#[test]
fn issuing_an_operator_certificate_needs_the_ca_and_never_overwrites() {
    let env = TestEnv::new(&[]);
    let run = |dir: &std::path::Path, name: &str, role: &str| {
        baton_tests::bin_command("baton")
            .arg("--tls-dir")
            .arg(dir)
            .args(["certs", "issue-operator", name, "--role", role])
            .output()
            .unwrap()
    };
    let out = run(&env.tls(), "ci", "root");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'root'"));
    let out = run(&env.tls(), "ci", "operator");
    assert!(out.status.success(), "{out:?}");
    let out = run(&env.tls(), "ci", "admin");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ci.pem: exists"),
        "{out:?}"
    );
    let empty = env.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = run(&empty, "ci", "viewer");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ca-key.pem"),
        "{out:?}"
    );
}

/// A viewer (or any certificate) hammering calls it may not make cannot
/// flush the audit log: its refusals are recorded one by one up to a rate
/// and counted beyond it, in a log of their own, and an admin's change
/// stays.
#[test]
fn a_flood_of_refused_calls_is_counted_and_never_pushes_an_admins_change_out() {
    use baton_proto::control::v1 as pb;
    let env = TestEnv::new(&[]);
    let batond = Batond::start(&env, "batond", &[]);
    let url = batond.url();
    issue(&env, "mallory", "viewer");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut admin = pb::control_service_client::ControlServiceClient::new(
            env.channel(&url, "operator").await,
        );
        admin
            .create_enrollment(pb::CreateEnrollmentRequest {
                host_id: "web-09".into(),
                ttl: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        // More refusals than the old log kept in all (5,000), as fast as
        // eight streams can make them.
        let viewer = env.channel(&url, "mallory").await;
        let flood = 6_000;
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let viewer = viewer.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..flood / 8 {
                    assert_eq!(
                        call(viewer.clone(), "StartRollout", false, false).await,
                        Code::PermissionDenied
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Every refusal is accounted for, in few entries; the admin's
        // change is still there.
        let deadline = std::time::Instant::now() + SOON;
        let log = loop {
            let log = admin
                .list_audit(pb::ListAuditRequest { limit: 10_000 })
                .await
                .unwrap()
                .into_inner()
                .entries;
            let counted: u64 = log
                .iter()
                .filter(|e| e.who == "operator mallory" && e.result == "denied")
                .map(|e| e.count.max(1))
                .sum();
            if counted == flood || std::time::Instant::now() > deadline {
                break log;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        let mallory: Vec<_> = log.iter().filter(|e| e.who == "operator mallory").collect();
        let counted: u64 = mallory.iter().map(|e| e.count.max(1)).sum();
        assert_eq!(counted, flood, "{mallory:#?}");
        assert!(mallory.len() < 50, "{} entries", mallory.len());
        assert!(
            mallory
                .iter()
                .any(|e| e.count > 1 && e.error.contains("StartRollout denied")),
            "{mallory:#?}"
        );
        assert!(
            log.iter().any(|e| e.who == "operator operator"
                && e.action == "CreateEnrollment"
                && e.result == "ok"),
            "{log:#?}"
        );
    });
}
