//! The whole plan path (`baton rollout start PLAN`): any text is refused
//! with a short error or parses into a plan whose dependency order has
//! every service, whose waves cover it, and which resolves against a fleet
//! — into a rollout or a short error — without panicking.
#![no_main]

use std::time::SystemTime;

use baton_common::host::{HostId, HostView, ServiceState, ServiceStatus};
use baton_engine::plan::Plan;
use baton_engine::resolve::{Facts, Pushed, resolve};
use libfuzzer_sys::fuzz_target;

/// Three hosts with labels, running some services; every service the plan
/// names has an artifact of the version it asks for.
fn facts(plan: &Plan) -> Facts {
    let now = SystemTime::UNIX_EPOCH;
    let host = |id: &str, role: &str, services: &[(&str, &str)]| HostView {
        host_id: HostId::try_from(id).unwrap(),
        connected: id != "h3",
        labels: [("role".to_owned(), role.to_owned())].into(),
        services: services
            .iter()
            .map(|(name, version)| ServiceStatus {
                name: (*name).to_owned(),
                version: (*version).to_owned(),
                state: ServiceState::Running,
                healthy: true,
            })
            .collect(),
        agent_version: "0.1.0".to_owned(),
        first_seen: now,
        last_seen: now,
        peer_address: String::new(),
        session: 0,
    };
    let mut facts = Facts {
        fleet: vec![
            host("h1", "web", &[("web", "1.0.0"), ("api", "2.0.0")]),
            host("h2", "api", &[("api", "1.0.0"), ("db", "0.9.0")]),
            host("h3", "web", &[("web", "1.0.0")]),
        ],
        ..Facts::default()
    };
    for s in &plan.services {
        facts.artifacts.insert(
            (s.name.clone(), s.version.clone()),
            Pushed {
                digest: format!("sha256:{}", "0".repeat(64)),
                manifest: b"{}".to_vec(),
                signature: Vec::new(),
            },
        );
    }
    facts
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let plan = match Plan::parse(text) {
        Ok(plan) => plan,
        Err(e) => {
            // Errors quote a short prefix, never the input.
            assert!(e.0.len() <= 2_000, "a {}-byte error", e.0.len());
            return;
        }
    };
    let mut order = plan.order();
    order.sort_unstable();
    assert_eq!(order, (0..plan.services.len()).collect::<Vec<_>>());
    let waves: usize = plan.waves().iter().map(Vec::len).sum();
    assert_eq!(waves, plan.services.len());
    let now = SystemTime::UNIX_EPOCH;
    match resolve(text.to_owned(), &plan, &facts(&plan), "r-1-0000".into(), now) {
        Ok(rollout) => {
            assert_eq!(rollout.services.len(), plan.services.len());
            for s in &rollout.services {
                assert!(s.max_parallel >= 1 && s.min_healthy < s.hosts.len());
                assert_eq!(s.steps.last(), Some(&s.hosts.len()));
            }
        }
        Err(e) => assert!(e.to_string().len() <= 2_000),
    }
});
