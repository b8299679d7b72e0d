//! Bakes, verdicts, holds, approvals and the failure budget.

use super::*;
use crate::analysis::{Check, Outcome as Judged, Verdict};

fn check(on_inconclusive: &str) -> Check {
    crate::plan::Plan::parse(&format!(
        "[[service]]\nname = \"api\"\nversion = \"2.0.0\"\n[[service.analysis]]\nname = \"errors\"\nkind = \"metrics\"\nurl = \"http://127.0.0.1:1/m\"\nratio = [\"e\", \"r\"]\nbaseline = true\non_inconclusive = \"{on_inconclusive}\"\n"
    ))
    .unwrap()
    .services[0]
        .analysis[0]
        .clone()
}

/// 4 hosts in steps of 1, 2, 4 with one check.
fn analysed(on_inconclusive: &str) -> Rollout {
    let mut s = svc("api", &[0, 1, 2, 3], 2, 2);
    s.analysis = vec![check(on_inconclusive)];
    s.steps = vec![1, 2, 4];
    with_services(vec![s])
}

fn verdict(r: &Rollout, outcome: Judged) -> Event {
    let bake = r.services[0].bake.expect("a bake in progress");
    Event::Analysis {
        service: 0,
        step: bake.step,
        verdicts: vec![Verdict::new(
            &r.services[0].analysis[0],
            bake.step,
            outcome,
            format!("0.05 vs 0.01 ({})", outcome.as_str()),
            t(50),
        )],
    }
}

fn activating(r: &Rollout) -> Vec<HostId> {
    r.services[0]
        .hosts
        .iter()
        .filter(|(_, h)| h.state == HostState::Activating)
        .map(|(id, _)| id.clone())
        .collect()
}

fn healthy_all_activating(r: &mut Rollout, at: SystemTime) {
    for h in activating(r) {
        let e = done(r, &h, Outcome::Succeeded);
        feed(r, e, at);
    }
}

#[test]
fn each_step_bakes_and_a_pass_goes_on_to_the_next() {
    let mut r = analysed("pause");
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    assert_eq!(activating(&r), vec![host(0)], "the first step is one host");
    healthy_all_activating(&mut r, t(5));
    assert_eq!(
        r.services[0].bake.map(|b| b.step),
        Some(0),
        "healthy: the bake begins"
    );
    assert!(activating(&r).is_empty(), "no host starts during a bake");
    assert_eq!(
        r.next_deadline(),
        None,
        "a bake needs no tick: its verdicts come as an event"
    );
    // A bake longer than progress_deadline is no stall.
    feed(&mut r, Event::Tick, t(5000));
    assert_eq!(r.state, State::Progressing);
    // A verdict for another step (a stale bake) changes nothing.
    let stale = Event::Analysis {
        service: 0,
        step: 1,
        verdicts: vec![Verdict::new(
            &r.services[0].analysis[0],
            1,
            Judged::Fail,
            "x".into(),
            t(6),
        )],
    };
    feed(&mut r, stale, t(6));
    assert!(r.services[0].bake.is_some());
    let e = verdict(&r, Judged::Pass);
    feed(&mut r, e, t(5001));
    assert_eq!(activating(&r), vec![host(1)]);
    assert_eq!(r.services[0].verdicts.len(), 1);
    healthy_all_activating(&mut r, t(5002));
    let e = verdict(&r, Judged::Pass);
    feed(&mut r, e, t(5003));
    assert_eq!(activating(&r).len(), 2);
    healthy_all_activating(&mut r, t(5004));
    // After the last step, a last bake before success.
    assert_eq!(r.state, State::Progressing);
    assert_eq!(r.services[0].bake.map(|b| b.step), Some(2));
    let e = verdict(&r, Judged::Skipped);
    feed(&mut r, e, t(5005));
    assert_eq!(r.state, State::Succeeded);
    assert_eq!(r.services[0].verdicts.len(), 3);
}

#[test]
fn a_failed_verdict_fails_the_judged_hosts_and_rolls_back() {
    let mut r = analysed("pause");
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    healthy_all_activating(&mut r, t(5));
    let e = verdict(&r, Judged::Fail);
    let a = feed(&mut r, e, t(30));
    assert_eq!(r.state, State::RollingBack);
    assert_eq!(kinds(&a), vec![("h0".into(), "rollback")]);
    let h = &r.services[0].hosts[&host(0)];
    assert_eq!(h.failure, Some(FailureKind::Analysis));
    assert!(
        h.error.as_deref().unwrap().contains("analysis errors"),
        "{:?}",
        h.error
    );
    assert!(
        r.error.as_deref().unwrap().contains("0.05 vs 0.01"),
        "{:?}",
        r.error
    );
    for id in [1, 2, 3] {
        assert_eq!(
            r.services[0].hosts[&host(id)].state,
            HostState::Staged,
            "never touched"
        );
    }
}

#[test]
fn an_inconclusive_verdict_pauses_or_fails_as_the_check_says() {
    let mut r = analysed("pause");
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    healthy_all_activating(&mut r, t(5));
    let e = verdict(&r, Judged::Inconclusive);
    feed(&mut r, e, t(30));
    assert_eq!(r.state, State::Paused);
    // The operator decides to go on: the next step starts.
    let a = feed(&mut r, Event::Operator(Operator::Resume), t(40));
    assert_eq!(kinds(&a), vec![("h1".into(), "activate")]);

    let mut r = analysed("fail");
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    healthy_all_activating(&mut r, t(5));
    let e = verdict(&r, Judged::Inconclusive);
    feed(&mut r, e, t(30));
    assert_eq!(r.state, State::RollingBack);
}

#[test]
fn a_canary_that_passes_its_analysis_promotes_itself() {
    let mut r = analysed("pause");
    r.services[0].promote = true;
    r.services[0].steps = vec![1, 4];
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    healthy_all_activating(&mut r, t(5));
    let e = verdict(&r, Judged::Pass);
    feed(&mut r, e, t(30));
    assert_eq!(r.state, State::Progressing, "promoted by its pass");
    assert_eq!(activating(&r).len(), 2);
    // Without analysis the same canary awaits an operator.
    let mut r = analysed("pause");
    r.services[0].analysis.clear();
    r.services[0].promote = true;
    r.services[0].steps = vec![1, 4];
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    healthy_all_activating(&mut r, t(5));
    assert_eq!(r.state, State::AwaitingPromotion);
}

#[test]
fn a_hold_stops_new_hosts_and_its_time_is_no_stall() {
    let mut r = rollout(4, 1, 3);
    feed(&mut r, Event::Hold(Some("frozen".into())), t(0));
    feed(&mut r, Event::Tick, t(0));
    assert_eq!(
        r.state,
        State::Pending,
        "a rollout started in a freeze waits"
    );
    assert_eq!(r.next_deadline(), None, "and needs no tick");
    feed(&mut r, Event::Hold(None), t(10));
    feed(&mut r, Event::Tick, t(10));
    stage_all(&mut r);
    assert_eq!(activating(&r).len(), 1);
    feed(&mut r, Event::Hold(Some("frozen".into())), t(11));
    let a = {
        let e = done(&r, &activating(&r)[0], Outcome::Succeeded);
        feed(&mut r, e, t(12))
    };
    assert!(
        a.is_empty(),
        "the host in flight finishes, no next one starts: {a:?}"
    );
    feed(&mut r, Event::Tick, t(5000));
    assert_eq!(r.state, State::Progressing, "held is not stalled");
    let a = feed(&mut r, Event::Hold(None), t(5001));
    assert_eq!(kinds(&a).len(), 1, "lifted: the next host starts");
    feed(&mut r, Event::Tick, t(5002));
    assert_eq!(
        r.state,
        State::Progressing,
        "the deadline counts from the lift"
    );
}

#[test]
fn an_approval_waits_for_a_promote_before_the_first_host() {
    let mut r = rollout(2, 1, 1);
    r.services[0].approval = true;
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    assert_eq!(r.state, State::AwaitingPromotion);
    assert!(activating(&r).is_empty());
    let a = feed(&mut r, Event::Operator(Operator::Promote), t(3));
    assert_eq!(kinds(&a), vec![("h0".into(), "activate")]);
    assert!(r.services[0].approved);
    assert_eq!(r.services[0].step, 0);
}

#[test]
fn the_failure_budget_spans_services() {
    let mut a = svc("a", &[0, 1], 1, 0);
    a.max_failures = 1;
    let mut b = svc("b", &[2, 3], 1, 0);
    b.max_failures = 1;
    let mut r = with_services(vec![a, b]);
    r.failure_budget = Some(1);
    feed(&mut r, Event::Tick, t(0));
    for si in 0..2 {
        let hosts: Vec<HostId> = r.services[si].hosts.keys().cloned().collect();
        for h in hosts {
            let e = done(&r, &h, Outcome::Succeeded);
            feed(&mut r, e, t(1));
        }
    }
    // One failure in each service: each within its max_failures, the two
    // together beyond the budget.
    let first = activating_in(&r, 0)[0].clone();
    let e = done(&r, &first, Outcome::Failed);
    feed(&mut r, e, t(2));
    assert_ne!(r.state, State::RollingBack);
    let second = activating_in(&r, 1)[0].clone();
    let e = done(&r, &second, Outcome::Failed);
    feed(&mut r, e, t(3));
    assert_eq!(r.state, State::RollingBack);
    assert!(
        r.error.as_deref().unwrap().contains("failure_budget = 1"),
        "{:?}",
        r.error
    );
}

fn activating_in(r: &Rollout, si: usize) -> Vec<HostId> {
    r.services[si]
        .hosts
        .iter()
        .filter(|(_, h)| h.state == HostState::Activating)
        .map(|(id, _)| id.clone())
        .collect()
}

#[test]
fn a_judged_step_stays_judged_when_its_verdicts_are_dropped_from_the_record() {
    let mut r = analysed("pause");
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    healthy_all_activating(&mut r, t(5));
    let e = verdict(&r, Judged::Pass);
    feed(&mut r, e, t(30));
    assert_eq!(r.services[0].judged, Some(0));
    // The rollout-wide cap dropped them (other services judged since).
    r.services[0].verdicts.clear();
    feed(&mut r, Event::Tick, t(31));
    assert!(r.services[0].bake.is_none(), "step 0 is not baked again");
    assert_eq!(activating(&r), vec![host(1)]);
}
