//! The system-wide rollback: every service a rollout changed goes back,
//! dependents first, each in windows of its own `max_parallel` and never
//! below its floor, one activation per host at a time.

use std::time::SystemTime;

use baton_common::command::CommandKind;
use baton_common::host::HostId;

use super::{
    Action, HostRun, HostState, Rollout, ServiceRun, ServiceState, State, advance,
    clear_outstanding, send,
};

/// Sends one touched host of service `si` back to where it was.
pub(super) fn rollback_host(
    r: &mut Rollout,
    si: usize,
    host: &HostId,
    now: SystemTime,
    actions: &mut Vec<Action>,
) {
    let s = &r.services[si];
    let from = s.hosts.get(host).and_then(|h| h.from_version.clone());
    let kind = match from {
        Some(version) => CommandKind::Rollback {
            service: s.name.clone(),
            version,
            gate: s.gate,
        },
        None => CommandKind::Remove {
            service: s.name.clone(),
        },
    };
    send(r, si, host, kind, actions, now);
    if let Some(h) = r.services[si].host_mut(host) {
        h.state = HostState::RollingBack;
        h.finished_at = None;
    }
}

/// Starts the system-wide rollback: every service this rollout changed,
/// in reverse dependency order.
pub(super) fn begin_rollback(
    r: &mut Rollout,
    why: String,
    now: SystemTime,
    actions: &mut Vec<Action>,
) {
    r.state = State::RollingBack;
    r.resume_to = None;
    r.error = Some(why);
    r.progress_at = now;
    for s in &mut r.services {
        // Untouched hosts keep what they run; a staged release is unused.
        for id in s.hosts_where(|h| !h.touched && h.outstanding.is_some()) {
            if let Some(h) = s.host_mut(&id) {
                h.outstanding = None;
                if h.state == HostState::Staging {
                    h.state = HostState::Staged;
                }
            }
        }
        // A host left mid-activation or mid-rollback with no command (an
        // abort, a rollback that timed out) is taken back again.
        let interrupted = s.hosts_where(|h| {
            h.touched
                && h.outstanding.is_none()
                && matches!(h.state, HostState::Activating | HostState::RollingBack)
        });
        for id in interrupted {
            if let Some(h) = s.host_mut(&id) {
                h.state = HostState::Failed;
                h.error = Some("interrupted; rolling back".into());
                h.failure = Some(baton_common::command::FailureKind::Cancelled);
            }
        }
        let touched = s.hosts.values().any(|h| h.touched);
        s.state = match (touched, s.state) {
            (true, _) => ServiceState::RollingBack,
            (false, ServiceState::Progressing | ServiceState::AwaitingPromotion) => {
                ServiceState::Waiting
            }
            (false, other) => other,
        };
    }
    advance(r, now, actions);
}

/// Whether `s` depends on the service `name`, directly or through others.
fn depends_on_transitively(r: &Rollout, s: &ServiceRun, name: &str) -> bool {
    let mut stack: Vec<&str> = s.depends_on.iter().map(String::as_str).collect();
    let mut seen: Vec<&str> = Vec::new();
    while let Some(d) = stack.pop() {
        if d == name {
            return true;
        }
        if seen.contains(&d) {
            continue;
        }
        seen.push(d);
        if let Some(o) = r.services.iter().find(|o| o.name == d) {
            stack.extend(o.depends_on.iter().map(String::as_str));
        }
    }
    false
}

/// Whether service `si` still has hosts this rollout must return.
fn needs_rollback(s: &ServiceRun) -> bool {
    s.hosts
        .values()
        .any(|h| h.touched && !matches!(h.state, HostState::RolledBack) && !rollback_failed(h))
}

fn rollback_failed(h: &HostRun) -> bool {
    h.state == HostState::Failed
        && h.error
            .as_deref()
            .is_some_and(|e| e.starts_with("rollback failed"))
}

/// One step of the system-wide rollback: a service goes back only after
/// every service depending on it is back; each goes back in windows of its
/// own `max_parallel`, one activation per host at a time.
pub(super) fn roll_back_services(r: &mut Rollout, now: SystemTime, actions: &mut Vec<Action>) {
    for si in (0..r.services.len()).rev() {
        let name = r.services[si].name.clone();
        let dependents_back = r.services.iter().all(|o| {
            !depends_on_transitively(r, o, &name)
                || (!needs_rollback(o)
                    && !o.hosts.values().any(|h| h.state == HostState::RollingBack))
        });
        let s = &r.services[si];
        let busy = s
            .hosts
            .values()
            .filter(|h| h.state == HostState::RollingBack)
            .count();
        if !needs_rollback(s) && busy == 0 {
            if s.hosts.values().any(|h| h.touched) {
                r.services[si].state = ServiceState::RolledBack;
            }
            continue;
        }
        if !dependents_back {
            continue;
        }
        // The window and the floor hold for reverts too: hosts activating
        // or rolling back never exceed max_parallel, and a host that
        // serves is taken back only while the others keep the floor. A
        // host still activating becomes one rolling back (no more out);
        // one out of service already costs only the window.
        let mut room = s.max_parallel.saturating_sub(
            s.hosts
                .values()
                .filter(|h| matches!(h.state, HostState::Activating | HostState::RollingBack))
                .count(),
        );
        let mut serving = s.hosts.values().filter(|h| h.in_service()).count();
        let mut candidates: Vec<(&HostId, &HostRun)> = s
            .hosts
            .iter()
            .filter(|(id, h)| {
                h.touched
                    && !matches!(h.state, HostState::RolledBack | HostState::RollingBack)
                    && !rollback_failed(h)
                    && !r.services.iter().enumerate().any(|(oi, o)| {
                        oi != si
                            && o.hosts.get(*id).is_some_and(|x| {
                                matches!(x.state, HostState::Activating | HostState::RollingBack)
                            })
                    })
            })
            .collect();
        candidates.sort_by_key(|(_, h)| (h.state != HostState::Activating, h.in_service()));
        let mut hosts: Vec<HostId> = Vec::new();
        for (id, h) in candidates {
            // (Chosen in that order, sent in host order below.)
            if h.state == HostState::Activating {
                hosts.push(id.clone());
            } else if room > 0 && (!h.in_service() || serving > s.min_healthy) {
                room -= 1;
                if h.in_service() {
                    serving -= 1;
                }
                hosts.push(id.clone());
            }
        }
        hosts.sort();
        r.services[si].state = ServiceState::RollingBack;
        for host in hosts {
            rollback_host(r, si, &host, now, actions);
        }
    }
    let busy: Vec<String> = r
        .services
        .iter()
        .flat_map(|s| {
            s.hosts
                .iter()
                .filter(|(_, h)| {
                    h.state == HostState::RollingBack
                        || (h.touched
                            && !matches!(h.state, HostState::RolledBack)
                            && !rollback_failed(h))
                })
                .map(move |(id, _)| format!("{} on {id}", s.name))
        })
        .collect();
    if busy.is_empty() {
        let failed: Vec<String> = r
            .services
            .iter()
            .flat_map(|s| {
                s.hosts
                    .iter()
                    .filter(|(_, h)| rollback_failed(h))
                    .map(move |(id, h)| {
                        format!("{} on {id}: {}", s.name, h.error.as_deref().unwrap_or(""))
                    })
            })
            .collect();
        if failed.is_empty() {
            r.state = State::RolledBack;
        } else {
            r.state = State::Failed;
            r.error = Some(format!(
                "{}; then the rollback failed: {}",
                r.error.as_deref().unwrap_or("rolling back"),
                super::summary(&failed)
            ));
        }
        return;
    }
    let stalled = now
        .duration_since(r.progress_at)
        .is_ok_and(|d| d >= r.progress_deadline);
    if stalled {
        // A host that never comes back must not hold the services (and
        // every later rollout of them) forever.
        clear_outstanding(r);
        r.state = State::Failed;
        r.error = Some(format!(
            "{}; then the rollback did not finish within progress_deadline {} on {}",
            r.error.as_deref().unwrap_or("rolling back"),
            humantime::format_duration(r.progress_deadline),
            busy.join(", ")
        ));
    }
}
