//! What a bake's verdicts do to a rollout.

use std::time::SystemTime;

use baton_common::command::FailureKind;

use super::{Action, HostState, Rollout, State, fail, rollback_host};
use crate::analysis::{
    MAX_ROLLOUT_VERDICTS, MAX_VERDICTS, OnInconclusive, Outcome as Judged, Verdict,
};

/// A bake ended: its verdicts are kept, a failure takes the failure path
/// (every host the bake judged fails, counting against `max_failures`),
/// an inconclusive verdict pauses the rollout (or fails it, as its check
/// says). A verdict for any other bake than the one in progress (a bake
/// restarted after a crash, a step already judged) is ignored.
pub(super) fn on_verdicts(
    r: &mut Rollout,
    si: usize,
    step: usize,
    verdicts: &[Verdict],
    now: SystemTime,
    actions: &mut Vec<Action>,
) {
    if r.state.is_terminal() || r.state == State::RollingBack {
        return;
    }
    let Some(s) = r.services.get_mut(si) else {
        return;
    };
    if s.bake.map(|b| b.step) != Some(step) || verdicts.is_empty() {
        return;
    }
    s.bake = None;
    s.judged = Some(step);
    s.verdicts.extend(verdicts.iter().cloned());
    let extra = s.verdicts.len().saturating_sub(MAX_VERDICTS);
    s.verdicts.drain(..extra);
    // The rollout's header holds every service's verdicts: at most
    // MAX_ROLLOUT_VERDICTS in all, the oldest dropped first (each stays
    // in its own analysis record).
    loop {
        let total: usize = r.services.iter().map(|s| s.verdicts.len()).sum();
        if total <= MAX_ROLLOUT_VERDICTS {
            break;
        }
        let Some(oldest) = r
            .services
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.verdicts.first().map(|v| (v.at, i)))
            .min()
            .map(|(_, i)| i)
        else {
            break;
        };
        r.services[oldest].verdicts.remove(0);
    }
    // The bake's time does not count against progress_deadline.
    r.progress_at = now;
    let s = &r.services[si];
    let policy = |v: &Verdict| {
        s.analysis
            .iter()
            .find(|c| c.name == v.name)
            .map_or(OnInconclusive::Pause, |c| c.on_inconclusive)
    };
    let failed = verdicts.iter().find(|v| {
        v.verdict == Judged::Fail
            || (v.verdict == Judged::Inconclusive && policy(v) == OnInconclusive::Fail)
    });
    if let Some(v) = failed {
        let why = format!(
            "analysis {} of {} {} ({}): {}",
            v.name,
            s.name,
            s.version,
            v.verdict.as_str(),
            v.reason
        );
        fail_judged(r, si, &why, now, actions);
        return;
    }
    if verdicts.iter().any(|v| v.verdict == Judged::Inconclusive)
        && matches!(r.state, State::Progressing | State::AwaitingPromotion)
    {
        // An operator decides: resume goes on, rollback undoes.
        r.resume_to = Some(r.state);
        r.state = State::Paused;
    }
}

/// Every host of service `si` running the new version failed an
/// analysis: each counts against `max_failures` (within it, each rolls
/// back on its own; beyond it, the rollout fails as for any failure).
fn fail_judged(r: &mut Rollout, si: usize, why: &str, now: SystemTime, actions: &mut Vec<Action>) {
    let auto_rollback = r.auto_rollback;
    let judged = r.services[si].hosts_where(|h| h.state == HostState::Healthy && h.touched);
    if judged.is_empty() {
        fail(r, why.to_owned(), now, actions);
        return;
    }
    for id in judged {
        let s = &mut r.services[si];
        if let Some(h) = s.host_mut(&id) {
            h.state = HostState::Failed;
            h.finished_at = Some(now);
            h.error = Some(baton_common::text::prefix(why, 500));
            h.failure = Some(FailureKind::Analysis);
        }
        s.failures = s.failures.saturating_add(1);
        if auto_rollback && s.failures <= s.max_failures {
            rollback_host(r, si, &id, now, actions);
        }
    }
}
