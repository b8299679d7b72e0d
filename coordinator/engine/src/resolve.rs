//! Resolving a plan into a rollout: which hosts each service goes to, the
//! counts a percentage means for them, the steps, and every check that can
//! be made before anything starts.
//!
//! [`resolve`] is a pure function of the plan and the [`Facts`] the
//! coordinator gathered for it (the fleet and the artifacts the plan
//! names). The coordinator calls it in the API handler's task, not in the
//! driver, so a large plan or fleet costs the request that brought it,
//! never the rollouts already running.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use baton_common::host::{HostId, HostView};

use crate::machine::{HostRun, Rollout, ServiceRun, ServiceState, State};
use crate::plan::{Plan, Strategy};
use baton_common::names::AGENT_NAME;
use baton_common::version::{is_downgrade, satisfies};

/// Why a plan cannot be resolved against the fleet; nothing was created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unresolvable(pub String);

/// The pushed artifact of a (service, version): what a rollout carries of
/// it to the hosts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pushed {
    /// `sha256:<hex>` of the payload.
    pub digest: String,
    /// The manifest exactly as signed.
    pub manifest: Vec<u8>,
    /// The signature over the manifest.
    pub signature: Vec<u8>,
}

/// The most (service, host) pairs one rollout may hold: a system of 10
/// services over 10,000 hosts. Larger changes are split into several
/// rollouts.
pub const MAX_HOST_RUNS: usize = 100_000;

/// What resolving a plan needs to know of the coordinator's state.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Every registered host.
    pub fleet: Vec<HostView>,
    /// The pushed artifact of each (service, version) the plan names, when
    /// there is one.
    pub artifacts: HashMap<(String, String), Pushed>,
    /// The versions pushed of each service whose artifact is missing (for
    /// the error).
    pub pushed: HashMap<String, Vec<String>>,
}

/// Resolves `plan` (parsed from `text`) against `facts` into a rollout
/// that has not started. Nothing is changed anywhere.
pub fn resolve(
    text: String,
    plan: &Plan,
    facts: &Facts,
    id: String,
    now: SystemTime,
) -> Result<Rollout, Unresolvable> {
    let fleet = &facts.fleet;
    let graph = plan.graph();
    let mut services = Vec::new();
    let mut host_runs = 0usize;
    for idx in crate::graph::order(&graph) {
        let svc = &plan.services[idx];
        let artifact = facts
            .artifacts
            .get(&(svc.name.clone(), svc.version.clone()))
            .ok_or_else(|| {
                let known = facts.pushed.get(&svc.name).cloned().unwrap_or_default();
                Unresolvable(if known.is_empty() {
                    format!(
                        "service {:?}: no artifact of this service has been pushed (baton artifact push)",
                        svc.name
                    )
                } else {
                    format!(
                        "service {:?}: version {:?} has not been pushed; pushed versions: {}",
                        svc.name,
                        svc.version,
                        baton_common::text::prefix(&known.join(", "), 400)
                    )
                })
            })?;
        let targets: Vec<&HostView> = match &svc.hosts {
            Some(selector) => fleet
                .iter()
                .filter(|h| selector.iter().all(|(k, v)| h.labels.get(k) == Some(v)))
                .collect(),
            None => fleet
                .iter()
                .filter(|h| running_version(h, &svc.name).is_some())
                .collect(),
        };
        if targets.is_empty() {
            return Err(Unresolvable(match &svc.hosts {
                Some(_) => format!(
                    "service {:?}: hosts = {{ {} }} matches no host among the {} registered",
                    svc.name,
                    baton_common::text::shorten(&svc.selector_text()),
                    fleet.len()
                ),
                None => format!(
                    "service {:?}: no host runs it yet; for a first install name the hosts with hosts = {{ label = \"value\" }}",
                    svc.name
                ),
            }));
        }
        host_runs = host_runs.saturating_add(targets.len());
        if host_runs > MAX_HOST_RUNS {
            return Err(Unresolvable(format!(
                "the plan changes more than {MAX_HOST_RUNS} (service, host) pairs; split it into several rollouts"
            )));
        }
        let n = targets.len();
        let max_parallel = match svc.strategy {
            Strategy::AllAtOnce => n,
            _ => svc.max_parallel.of(n).clamp(1, n),
        };
        let min_healthy = match svc.min_healthy {
            Some(a) => a.of(n),
            None => n.saturating_sub(max_parallel),
        };
        if min_healthy >= n {
            return Err(Unresolvable(format!(
                "service {:?}: min_healthy = {} keeps all {n} hosts in service, so none could be replaced; lower it",
                svc.name,
                svc.min_healthy
                    .map_or_else(|| min_healthy.to_string(), |a| a.to_string()),
            )));
        }
        // Steps count the hosts this rollout changes; hosts already on
        // the version are added to every step (they are done).
        let unchanged = targets
            .iter()
            .filter(|h| running_version(h, &svc.name) == Some(svc.version.as_str()))
            .count();
        let m = n - unchanged;
        let mut steps: Vec<usize> = if m == 0 {
            vec![n]
        } else {
            match (&svc.steps, svc.canary) {
                (Some(list), _) => list
                    .iter()
                    .map(|a| unchanged + a.of(m).clamp(1, m))
                    .collect(),
                (None, Some(c)) => vec![unchanged + c.of(m).clamp(1, m), n],
                // With analysis, a rolling service goes in batches of
                // max_parallel, each baked before the next (at most
                // MAX_STEPS batches: larger ones on a large fleet).
                (None, None) if !svc.analysis.is_empty() && svc.strategy == Strategy::Rolling => {
                    let batch = max_parallel.max(m.div_ceil(crate::plan::MAX_STEPS));
                    (1..=m.div_ceil(batch))
                        .map(|k| unchanged + (k * batch).min(m))
                        .collect()
                }
                (None, None) => vec![n],
            }
        };
        steps.dedup();
        if steps.windows(2).any(|w| w[0] > w[1]) {
            return Err(Unresolvable(format!(
                "service {:?}: steps must grow ({} hosts: {:?})",
                svc.name, n, steps
            )));
        }
        if steps.last() != Some(&n) {
            steps.push(n);
        }
        // Requirements that can never hold are refused now.
        let mut outside = BTreeMap::new();
        for (dep, req) in &svc.requires {
            if let Some(d) = plan.services.iter().find(|o| &o.name == dep) {
                if !satisfies(&d.version, req) {
                    return Err(Unresolvable(format!(
                        "service {:?} requires {dep} {req}, but this plan rolls {dep} out at {}",
                        svc.name, d.version
                    )));
                }
            } else {
                let running: Vec<(String, String)> = fleet
                    .iter()
                    .filter_map(|h| {
                        running_version(h, dep).map(|v| (h.host_id.to_string(), v.to_owned()))
                    })
                    .collect();
                if running.is_empty() {
                    return Err(Unresolvable(format!(
                        "service {:?} requires {dep} {req}, but no host runs {dep} and this plan does not install it",
                        svc.name
                    )));
                }
                if let Some((host, v)) = running.iter().find(|(_, v)| !satisfies(v, req)) {
                    return Err(Unresolvable(format!(
                        "service {:?} requires {dep} {req}, but {host} runs {dep} {v} and this plan does not upgrade it",
                        svc.name
                    )));
                }
                // The distinct versions are what requirements are checked
                // against; one per host would repeat them fleet-wide.
                let mut versions: Vec<String> = running.into_iter().map(|(_, v)| v).collect();
                versions.sort_unstable();
                versions.dedup();
                outside.insert(dep.clone(), versions);
            }
        }
        let hosts: BTreeMap<HostId, HostRun> = targets
            .iter()
            .map(|h| {
                let from = running_version(h, &svc.name)
                    .filter(|v| !v.is_empty())
                    .map(str::to_owned);
                (
                    h.host_id.clone(),
                    HostRun::new(from, svc.version.clone(), h.connected),
                )
            })
            .collect();
        if !svc.allow_downgrade
            && let Some((host, from)) = hosts.iter().find_map(|(id, h)| {
                h.from_version
                    .as_deref()
                    .filter(|f| is_downgrade(f, &svc.version))
                    .map(|f| (id, f))
            })
        {
            return Err(Unresolvable(format!(
                "service {:?}: {host} runs {from}, newer than {}; to go back, say allow_downgrade = true (hosts return only to releases they still have)",
                svc.name, svc.version
            )));
        }
        services.push(ServiceRun {
            name: svc.name.clone(),
            version: svc.version.clone(),
            digest: artifact.digest.clone(),
            manifest: artifact.manifest.clone(),
            signature: artifact.signature.clone(),
            // A requirement on a service of this plan orders it too.
            depends_on: graph[idx]
                .iter()
                .map(|d| plan.services[*d].name.clone())
                .collect(),
            requires: svc.requires.clone(),
            outside,
            max_parallel,
            min_healthy,
            max_failures: svc.max_failures,
            gate: baton_common::command::HealthGate {
                min_healthy_time: svc.min_healthy_time,
                healthy_deadline: svc.healthy_deadline,
            },
            steps,
            step: 0,
            promote: svc.strategy == Strategy::Canary && !svc.auto_promote,
            pause: svc.pause,
            step_done_at: None,
            failures: 0,
            state: ServiceState::Waiting,
            allow_downgrade: svc.allow_downgrade,
            analysis: svc.analysis.clone(),
            bake: None,
            verdicts: Vec::new(),
            judged: None,
            approval: svc.approval,
            approved: false,
            traffic: svc.traffic.clone(),
            hosts,
            changed: Default::default(),
        });
    }
    Ok(Rollout {
        id,
        plan: text,
        state: State::Pending,
        resume_to: None,
        auto_rollback: plan.auto_rollback,
        progress_deadline: plan.progress_deadline,
        max_parallel_services: plan.max_parallel_services.unwrap_or(usize::MAX),
        services,
        created_at: now,
        updated_at: now,
        progress_at: now,
        error: None,
        next_seq: 0,
        away: Default::default(),
        failure_budget: plan.failure_budget,
        started_by: String::new(),
        held: None,
    })
}

/// The version of `service` a host runs; for `baton-agent` (artifacts of
/// kind `agent`), the version of the host's agent, so the agent upgrades
/// through the same plans and engine as any service.
pub fn running_version<'a>(h: &'a HostView, service: &str) -> Option<&'a str> {
    if service == AGENT_NAME {
        Some(h.agent_version.as_str()).filter(|v| !v.is_empty())
    } else {
        h.services
            .iter()
            .find(|s| s.name == service)
            .map(|s| s.version.as_str())
    }
}
