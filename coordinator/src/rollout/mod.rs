//! Rollouts in the coordinator: the driver that persists each new state
//! before acting on it ([`driver`]), resolution at the edge ([`resolve`]),
//! the stored history ([`events`]) and the wire form. The plan, the state
//! machine, the events a step adds and the stored records are the
//! engine's ([`baton_engine`]), re-exported here by their old paths.

pub mod driver;
pub mod events;
pub mod resolve;

pub use baton_engine::{graph, is_terminal, machine, plan, record};

use baton_common::time::to_timestamp;
use baton_proto::control::v1 as pb;

pub use driver::{RolloutError, Rollouts};
pub use machine::{Event, HostState, Operator, Rollout, State};

/// A rollout's wire form (`control.v1.Rollout`).
pub fn to_pb(r: &Rollout) -> pb::Rollout {
    {
        pb::Rollout {
            id: r.id.clone(),
            state: r.state.as_str().to_owned(),
            rollout_state: rollout_state(r.state).into(),
            services: r
                .services
                .iter()
                .map(|s| pb::ServiceRollout {
                    name: s.name.clone(),
                    version: s.version.clone(),
                    digest: s.digest.clone(),
                    state: s.state.as_str().to_owned(),
                    service_state: service_state(s.state).into(),
                    step: u32::try_from(s.step + 1).unwrap_or(u32::MAX),
                    steps: s
                        .steps
                        .iter()
                        .map(|n| u32::try_from(*n).unwrap_or(u32::MAX))
                        .collect(),
                    depends_on: s.depends_on.clone(),
                    analysis: s.verdicts.iter().map(verdict_to_pb).collect(),
                    baking_since: s.bake.map(|b| to_timestamp(b.since)),
                    baking_step: s
                        .bake
                        .map_or(0, |b| u32::try_from(b.step + 1).unwrap_or(u32::MAX)),
                    approval: s.approval && !s.approved,
                    hosts: s
                        .hosts
                        .iter()
                        .map(|(id, h)| pb::HostRollout {
                            host_id: id.to_string(),
                            state: h.state.as_str().to_owned(),
                            host_state: host_state(h.state).into(),
                            failure: failure_to_pb(h.failure),
                            from_version: h.from_version.clone().unwrap_or_default(),
                            to_version: h.to_version.clone(),
                            started_at: h.started_at.map(to_timestamp),
                            finished_at: h.finished_at.map(to_timestamp),
                            error: h.error.clone().unwrap_or_default(),
                            progress_percent: h.progress,
                            connected: h.connected,
                            probe: h.detail.probe.clone(),
                            log_tail: h.detail.log_tail.clone(),
                        })
                        .collect(),
                })
                .collect(),
            created_at: Some(to_timestamp(r.created_at)),
            updated_at: Some(to_timestamp(r.updated_at)),
            error: r.error.clone().unwrap_or_default(),
            plan: r.plan.clone(),
            held: r.held.clone().unwrap_or_default(),
            started_by: r.started_by.clone(),
        }
    }
}

/// A verdict's wire form.
pub fn verdict_to_pb(v: &baton_engine::analysis::Verdict) -> pb::Verdict {
    pb::Verdict {
        name: v.name.clone(),
        kind: v.kind.clone(),
        step: u32::try_from(v.step + 1).unwrap_or(u32::MAX),
        verdict: v.verdict.as_str().to_owned(),
        reason: v.reason.clone(),
        value: v.value.map(|n| n.get()),
        baseline: v.baseline.map(|n| n.get()),
        threshold: v.threshold.map(|n| n.get()),
        statistic: v.statistic.map(|n| n.get()),
        p_value: v.p_value.map(|n| n.get()),
        samples: v.samples,
        baseline_samples: v.baseline_samples,
        at: Some(to_timestamp(v.at)),
    }
}

/// A rollout state on the wire.
pub fn rollout_state(s: State) -> pb::RolloutState {
    match s {
        State::Pending => pb::RolloutState::Pending,
        State::Staging => pb::RolloutState::Staging,
        State::Progressing => pb::RolloutState::Progressing,
        State::AwaitingPromotion => pb::RolloutState::AwaitingPromotion,
        State::Paused => pb::RolloutState::Paused,
        State::RollingBack => pb::RolloutState::RollingBack,
        State::Succeeded => pb::RolloutState::Succeeded,
        State::Failed => pb::RolloutState::Failed,
        State::RolledBack => pb::RolloutState::RolledBack,
        State::Aborted => pb::RolloutState::Aborted,
    }
}

/// A service's state in a rollout, on the wire.
pub fn service_state(s: machine::ServiceState) -> pb::ServiceRolloutState {
    use machine::ServiceState as S;
    match s {
        S::Waiting => pb::ServiceRolloutState::Waiting,
        S::Progressing => pb::ServiceRolloutState::Progressing,
        S::AwaitingPromotion => pb::ServiceRolloutState::AwaitingPromotion,
        S::Succeeded => pb::ServiceRolloutState::Succeeded,
        S::RollingBack => pb::ServiceRolloutState::RollingBack,
        S::RolledBack => pb::ServiceRolloutState::RolledBack,
    }
}

/// A host's state in a rollout, on the wire.
pub fn host_state(s: HostState) -> pb::HostRolloutState {
    match s {
        HostState::Pending => pb::HostRolloutState::Pending,
        HostState::Staging => pb::HostRolloutState::Staging,
        HostState::Staged => pb::HostRolloutState::Staged,
        HostState::Activating => pb::HostRolloutState::Activating,
        HostState::Healthy => pb::HostRolloutState::Healthy,
        HostState::Failed => pb::HostRolloutState::Failed,
        HostState::RollingBack => pb::HostRolloutState::RollingBack,
        HostState::RolledBack => pb::HostRolloutState::RolledBack,
    }
}

/// A failure kind on the wire (unspecified: none).
pub fn failure_to_pb(kind: Option<baton_common::command::FailureKind>) -> i32 {
    kind.map_or(
        baton_proto::agent::v1::FailureKind::Unspecified,
        baton_proto::agent::v1::FailureKind::from,
    )
    .into()
}

/// What a resolved (not started) rollout would do: waves of services and
/// the batches of each.
pub fn dry_run(r: &Rollout) -> pb::RolloutPlan {
    let waves = graph::waves(&service_graph(r))
        .into_iter()
        .map(|wave| pb::PlanWave {
            services: wave
                .into_iter()
                .map(|i| plan_service(&r.services[i]))
                .collect(),
        })
        .collect();
    pb::RolloutPlan { waves }
}

/// The dependency graph of a rollout's services, by index.
pub fn service_graph(r: &Rollout) -> Vec<Vec<usize>> {
    let names: Vec<&str> = r.services.iter().map(|s| s.name.as_str()).collect();
    graph::build(&names, |i| {
        r.services[i].depends_on.iter().map(String::as_str)
    })
}

fn plan_service(s: &machine::ServiceRun) -> pb::PlanService {
    let to_change: Vec<&baton_common::host::HostId> = s
        .hosts
        .iter()
        .filter(|(_, h)| h.state != HostState::Healthy)
        .map(|(id, _)| id)
        .collect();
    let unchanged = s.hosts.len() - to_change.len();
    let batch = s
        .max_parallel
        .min(s.hosts.len().saturating_sub(s.min_healthy))
        .max(1);
    let mut batches = Vec::new();
    let mut done = unchanged;
    let mut next = to_change.into_iter().peekable();
    for (i, limit) in s.steps.iter().enumerate() {
        while done < *limit && next.peek().is_some() {
            let hosts: Vec<String> = next
                .by_ref()
                .take(batch.min(limit - done))
                .map(ToString::to_string)
                .collect();
            done += hosts.len();
            batches.push(pb::PlanBatch {
                hosts,
                step: u32::try_from(i + 1).unwrap_or(u32::MAX),
                then_promote: false,
            });
        }
        if s.promote
            && i + 1 < s.steps.len()
            && let Some(last) = batches.last_mut()
        {
            last.then_promote = true;
        }
    }
    pb::PlanService {
        name: s.name.clone(),
        version: s.version.clone(),
        max_parallel: u32::try_from(s.max_parallel).unwrap_or(u32::MAX),
        min_healthy: u32::try_from(s.min_healthy).unwrap_or(u32::MAX),
        batches,
        depends_on: s.depends_on.clone(),
        unchanged_hosts: s
            .hosts
            .iter()
            .filter(|(_, h)| h.state == HostState::Healthy)
            .map(|(id, _)| id.to_string())
            .collect(),
        requires: s.requires.clone().into_iter().collect(),
    }
}

/// One service of one rollout on one host: what `baton hosts HOST
/// --history` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    /// The rollout.
    pub rollout_id: String,
    /// The rollout's state.
    pub rollout_state: State,
    /// The service.
    pub service: String,
    /// The version before (`None`: a first install).
    pub from_version: Option<String>,
    /// The target version.
    pub to_version: String,
    /// The host's state in the rollout.
    pub state: HostState,
    /// When its activation began.
    pub started_at: Option<std::time::SystemTime>,
    /// When its activation (or rollback) ended.
    pub finished_at: Option<std::time::SystemTime>,
    /// Why it failed.
    pub error: Option<String>,
}

/// What the rollouts in `all` (newest first) did on `host`: every service
/// that changed it or tried to; hosts a rollout left alone (already on the
/// version, or never reached) are not listed.
pub fn host_history(all: &[Rollout], host: &baton_common::host::HostId) -> Vec<Activation> {
    let mut out = Vec::new();
    for r in all {
        for s in &r.services {
            let Some(h) = s.hosts.get(host) else { continue };
            let acted = h.started_at.is_some()
                || h.touched
                || !matches!(h.state, HostState::Pending | HostState::Healthy);
            if !acted {
                continue;
            }
            out.push(Activation {
                rollout_id: r.id.clone(),
                rollout_state: r.state,
                service: s.name.clone(),
                from_version: h.from_version.clone(),
                to_version: h.to_version.clone(),
                state: h.state,
                started_at: h.started_at,
                finished_at: h.finished_at,
                error: h.error.clone(),
            });
        }
    }
    out
}
