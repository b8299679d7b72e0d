//! Rollouts built for other modules' tests.

#![allow(clippy::unwrap_used)]

use super::*;

/// One service over `hosts` hosts (`web-00000`, …) running 1.0.0,
/// all connected, to go to 2.0.0; a manifest of about a kilobyte.
pub fn single(id: &str, service: &str, hosts: usize, plan: String) -> Rollout {
    let t0 = std::time::UNIX_EPOCH + Duration::from_millis(1_764_000_000_000);
    let hosts = (0..hosts)
        .map(|i| {
            (
                HostId::try_from(format!("web-{i:05}")).unwrap(),
                HostRun::new(Some("1.0.0".into()), "2.0.0".into(), true),
            )
        })
        .collect();
    Rollout {
        id: id.into(),
        plan,
        state: State::Pending,
        resume_to: None,
        auto_rollback: true,
        progress_deadline: Duration::from_secs(600),
        max_parallel_services: usize::MAX,
        services: vec![ServiceRun {
            name: service.into(),
            version: "2.0.0".into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
            manifest: vec![b'm'; 1024],
            signature: vec![7; 64],
            depends_on: vec![],
            requires: BTreeMap::new(),
            outside: BTreeMap::new(),
            max_parallel: 100,
            min_healthy: 0,
            max_failures: 0,
            gate: HealthGate {
                min_healthy_time: Duration::from_secs(1),
                healthy_deadline: Duration::from_secs(300),
            },
            steps: vec![usize::MAX],
            step: 0,
            promote: false,
            pause: None,
            step_done_at: None,
            failures: 0,
            state: ServiceState::Waiting,
            hosts,
            allow_downgrade: false,
            analysis: Vec::new(),
            bake: None,
            verdicts: Vec::new(),
            judged: None,
            approval: false,
            approved: false,
            traffic: None,
            changed: Changed::default(),
        }],
        created_at: t0,
        updated_at: t0,
        progress_at: t0,
        error: None,
        next_seq: 0,
        away: BTreeSet::new(),
        failure_budget: None,
        started_by: String::new(),
        held: None,
    }
}
