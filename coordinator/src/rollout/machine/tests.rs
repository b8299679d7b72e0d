//! Unit and property tests of the pure state machine: no runtime, time is
//! a parameter.

use super::*;

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
}

fn host(i: usize) -> HostId {
    HostId::try_from(format!("h{i}")).unwrap()
}

fn rollout(hosts: usize, max_parallel: usize, min_healthy: usize) -> Rollout {
    let hosts = (0..hosts)
        .map(|i| (host(i), HostRun::new(Some("1".into()), "2".into(), true)))
        .collect();
    Rollout {
        id: "r-1".into(),
        plan: String::new(),
        state: State::Pending,
        resume_to: None,
        auto_rollback: true,
        progress_deadline: Duration::from_secs(600),
        service: ServiceRun {
            name: "api".into(),
            version: "2".into(),
            digest: "sha256:00".into(),
            manifest: b"{}".to_vec(),
            signature: vec![1],
            max_parallel,
            min_healthy,
            max_failures: 0,
            gate: HealthGate {
                min_healthy_time: Duration::from_secs(1),
                healthy_deadline: Duration::from_secs(30),
            },
            failures: 0,
            hosts,
        },
        created_at: t(0),
        updated_at: t(0),
        progress_at: t(0),
        error: None,
        next_seq: 0,
    }
}

/// Feeds an event, asserting it is accepted.
fn feed(r: &mut Rollout, e: Event, now: SystemTime) -> Vec<Action> {
    let (next, actions) = step(r, &e, now).unwrap();
    *r = next;
    actions
}

fn done(r: &Rollout, h: &HostId, outcome: Outcome) -> Event {
    let id = r.service.hosts[h].outstanding.as_ref().unwrap().id.clone();
    Event::Update(
        h.clone(),
        CommandUpdate::done(
            &id,
            outcome,
            if outcome == Outcome::Failed {
                "boom"
            } else {
                ""
            },
        ),
    )
}

fn kinds(actions: &[Action]) -> Vec<(String, &'static str)> {
    actions
        .iter()
        .map(|Action::Send(h, c)| (h.to_string(), c.kind.name()))
        .collect()
}

fn stage_all(r: &mut Rollout) {
    let hosts: Vec<HostId> = r.service.hosts.keys().cloned().collect();
    for h in hosts {
        if r.service.hosts[&h].state == HostState::Staging {
            let e = done(r, &h, Outcome::Succeeded);
            feed(r, e, t(1));
        }
    }
}

#[test]
fn stages_everywhere_first_then_activates_in_windows() {
    let mut r = rollout(4, 2, 2);
    let a = feed(&mut r, Event::Tick, t(0));
    assert_eq!(r.state, State::Staging);
    assert_eq!(kinds(&a).iter().filter(|(_, k)| *k == "stage").count(), 4);

    let e = done(&r, &host(0), Outcome::Succeeded);
    assert!(
        feed(&mut r, e, t(1)).is_empty(),
        "no activation before every host staged"
    );
    stage_all(&mut r);
    assert_eq!(r.state, State::Progressing);
    let activating: Vec<_> = r
        .service
        .hosts
        .iter()
        .filter(|(_, h)| h.state == HostState::Activating)
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(activating, vec![host(0), host(1)]);

    let e = done(&r, &host(0), Outcome::Succeeded);
    let a = feed(&mut r, e, t(3));
    assert_eq!(
        kinds(&a),
        vec![("h2".into(), "activate")],
        "a freed slot starts the next host"
    );
    for i in [1, 2, 3] {
        let e = done(&r, &host(i), Outcome::Succeeded);
        feed(&mut r, e, t(4));
    }
    assert_eq!(r.state, State::Succeeded);
    assert!(
        r.service
            .hosts
            .values()
            .all(|h| h.state == HostState::Healthy && h.finished_at.is_some())
    );
}

#[test]
fn the_floor_limits_the_window() {
    // 4 hosts, window 3, but at least 3 must stay in service: one at a time.
    let mut r = rollout(4, 3, 3);
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    let active = r
        .service
        .hosts
        .values()
        .filter(|h| h.state == HostState::Activating)
        .count();
    assert_eq!(active, 1);
    // A disconnected host counts against the floor: nothing more starts.
    let e = done(&r, &host(0), Outcome::Succeeded);
    feed(&mut r, Event::Disconnected(host(3)), t(2));
    let a = feed(&mut r, e, t(2));
    assert!(a.is_empty(), "{a:?}");
    let a = feed(&mut r, Event::Connected(host(3)), t(3));
    assert_eq!(kinds(&a), vec![("h1".into(), "activate")]);
}

#[test]
fn a_failure_rolls_back_only_the_touched_hosts() {
    let mut r = rollout(4, 2, 2);
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    let e = done(&r, &host(0), Outcome::Failed);
    let a = feed(&mut r, e, t(5));
    assert_eq!(r.state, State::RollingBack);
    assert_eq!(
        kinds(&a),
        vec![("h0".into(), "rollback"), ("h1".into(), "rollback")]
    );
    assert!(r.error.as_deref().unwrap().contains("h0: boom"));
    // The cancelled activation's late answer is ignored.
    let stale = Event::Update(
        host(1),
        CommandUpdate::done("r-1/6", Outcome::Succeeded, ""),
    );
    feed(&mut r, stale, t(6));
    assert_eq!(r.service.hosts[&host(1)].state, HostState::RollingBack);
    for i in [0, 1] {
        let e = done(&r, &host(i), Outcome::Succeeded);
        feed(&mut r, e, t(7));
    }
    assert_eq!(r.state, State::RolledBack);
    assert_eq!(r.service.hosts[&host(2)].state, HostState::Staged);
    assert!(r.service.hosts[&host(2)].started_at.is_none());
}

#[test]
fn without_auto_rollback_a_failure_just_fails() {
    let mut r = rollout(2, 1, 1);
    r.auto_rollback = false;
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    let e = done(&r, &host(0), Outcome::Failed);
    assert!(feed(&mut r, e, t(5)).is_empty());
    assert_eq!(r.state, State::Failed);
}

#[test]
fn max_failures_tolerates_that_many() {
    let mut r = rollout(3, 1, 0);
    r.service.max_failures = 1;
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    let e = done(&r, &host(0), Outcome::Failed);
    let a = feed(&mut r, e, t(5));
    assert_eq!(r.state, State::Progressing);
    // The tolerated failure goes back on its own; the next host starts.
    assert_eq!(
        kinds(&a),
        vec![("h0".into(), "rollback"), ("h1".into(), "activate")]
    );
    let e = done(&r, &host(1), Outcome::Succeeded);
    feed(&mut r, e, t(6));
    let e = done(&r, &host(2), Outcome::Succeeded);
    feed(&mut r, e, t(7));
    assert_eq!(r.state, State::Progressing, "h0 is still rolling back");
    let e = done(&r, &host(0), Outcome::Succeeded);
    feed(&mut r, e, t(8));
    assert_eq!(r.state, State::Succeeded);
    assert_eq!(r.service.hosts[&host(0)].state, HostState::RolledBack);
}

#[test]
fn a_staging_failure_fails_before_anything_is_touched() {
    let mut r = rollout(3, 1, 0);
    feed(&mut r, Event::Tick, t(0));
    let e = done(&r, &host(1), Outcome::Failed);
    let a = feed(&mut r, e, t(1));
    assert!(a.is_empty());
    assert_eq!(r.state, State::Staging, "waits for every host's answer");
    let e = done(&r, &host(0), Outcome::Succeeded);
    feed(&mut r, e, t(1));
    let e = done(&r, &host(2), Outcome::Failed);
    feed(&mut r, e, t(1));
    assert_eq!(r.state, State::Failed);
    assert!(
        r.error.as_deref().unwrap().contains("2 host(s)"),
        "{:?}",
        r.error
    );
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains("h1: staging failed: boom"),
        "{:?}",
        r.error
    );
    assert!(
        r.service
            .hosts
            .values()
            .all(|h| !h.touched && h.outstanding.is_none())
    );
}

#[test]
fn the_progress_deadline_turns_a_stuck_rollout_into_a_rollback() {
    let mut r = rollout(2, 1, 1);
    r.progress_deadline = Duration::from_secs(60);
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    feed(&mut r, Event::Tick, t(30));
    assert_eq!(r.state, State::Progressing);
    let a = feed(&mut r, Event::Tick, t(62));
    assert_eq!(r.state, State::RollingBack);
    assert_eq!(kinds(&a), vec![("h0".into(), "rollback")]);
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains("no host turned healthy within progress_deadline 1m")
    );
}

#[test]
fn a_rollback_that_cannot_finish_fails_after_the_progress_deadline() {
    let mut r = rollout(2, 2, 0);
    r.progress_deadline = Duration::from_secs(60);
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    feed(&mut r, Event::Disconnected(host(1)), t(2));
    let e = done(&r, &host(0), Outcome::Failed);
    feed(&mut r, e, t(3));
    assert_eq!(r.state, State::RollingBack);
    let e = done(&r, &host(0), Outcome::Succeeded);
    feed(&mut r, e, t(4));
    feed(&mut r, Event::Tick, t(30));
    assert_eq!(r.state, State::RollingBack, "h1 may still come back");
    // When it does, its rollback is re-sent with a fresh deadline.
    let a = feed(&mut r, Event::Connected(host(1)), t(40));
    let Action::Send(_, c) = &a[0];
    assert_eq!(c.deadline, t(40) + Duration::from_secs(30) + COMMAND_SLACK);
    feed(&mut r, Event::Disconnected(host(1)), t(41));
    feed(&mut r, Event::Tick, t(64));
    assert_eq!(r.state, State::Failed);
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains("rollback did not finish within progress_deadline 1m on h1"),
        "{:?}",
        r.error
    );
}

#[test]
fn pause_resume_abort() {
    let mut r = rollout(3, 1, 0);
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    feed(&mut r, Event::Operator(Operator::Pause), t(2));
    assert_eq!(r.state, State::Paused);
    let e = done(&r, &host(0), Outcome::Succeeded);
    assert!(feed(&mut r, e, t(3)).is_empty(), "paused: no new host");
    assert_eq!(r.service.hosts[&host(0)].state, HostState::Healthy);
    assert!(step(&r, &Event::Operator(Operator::Pause), t(3)).is_err());
    let a = feed(&mut r, Event::Operator(Operator::Resume), t(1000));
    assert_eq!(r.state, State::Progressing);
    assert_eq!(kinds(&a), vec![("h1".into(), "activate")]);
    assert_eq!(r.progress_at, t(1000), "time paused does not count");
    let a = feed(&mut r, Event::Operator(Operator::Abort), t(1001));
    assert!(a.is_empty());
    assert_eq!(r.state, State::Aborted);
    let err = step(&r, &Event::Operator(Operator::Resume), t(1002)).unwrap_err();
    assert_eq!(err.to_string(), "cannot resume rollout r-1: it is aborted");
    let err = step(&r, &Event::Operator(Operator::Promote), t(1002)).unwrap_err();
    assert_eq!(err.to_string(), "cannot promote rollout r-1: it is aborted");
}

#[test]
fn a_first_install_rolls_back_by_removing() {
    let mut r = rollout(1, 1, 0);
    r.service.hosts.get_mut(&host(0)).unwrap().from_version = None;
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    let e = done(&r, &host(0), Outcome::Succeeded);
    feed(&mut r, e, t(2));
    assert_eq!(r.state, State::Succeeded);
    let a = feed(&mut r, Event::Operator(Operator::Rollback), t(3));
    assert_eq!(kinds(&a), vec![("h0".into(), "remove")]);
}

#[test]
fn outstanding_commands_are_resent_with_the_same_id_on_reconnect() {
    let mut r = rollout(2, 1, 0);
    r.service.hosts.get_mut(&host(1)).unwrap().connected = false;
    let a = feed(&mut r, Event::Tick, t(0));
    assert_eq!(
        kinds(&a),
        vec![("h0".into(), "stage")],
        "nothing sent to a disconnected host"
    );
    let id = r.service.hosts[&host(1)]
        .outstanding
        .as_ref()
        .unwrap()
        .id
        .clone();
    let a = feed(&mut r, Event::Connected(host(1)), t(1));
    let Action::Send(h, c) = &a[0];
    assert_eq!((h, c.id.as_str()), (&host(1), id.as_str()));
}

#[test]
fn hosts_already_on_the_target_are_left_alone() {
    let mut r = rollout(2, 1, 0);
    *r.service.hosts.get_mut(&host(1)).unwrap() = HostRun::new(Some("2".into()), "2".into(), true);
    let a = feed(&mut r, Event::Tick, t(0));
    assert_eq!(kinds(&a), vec![("h0".into(), "stage")]);
    stage_all(&mut r);
    let e = done(&r, &host(0), Outcome::Succeeded);
    feed(&mut r, e, t(3));
    assert_eq!(r.state, State::Succeeded);
    assert!(!r.service.hosts[&host(1)].touched);
}

/// Random event sequences never break the invariants.
#[test]
fn property_invariants_hold_under_random_events() {
    for seed in 0..300u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let n = rng.usize(1..7);
        let window = rng.usize(1..=n);
        let floor = rng.usize(0..n);
        let mut r = rollout(n, window, floor);
        r.auto_rollback = rng.bool();
        r.service.max_failures = rng.u32(0..2);
        let mut now = 0u64;
        let mut activations: BTreeMap<HostId, std::collections::BTreeSet<String>> = BTreeMap::new();
        for _ in 0..200 {
            now += rng.u64(0..40);
            let h = host(rng.usize(0..n));
            let event = match rng.u8(0..10) {
                0 => Event::Disconnected(h.clone()),
                1 | 2 => Event::Connected(h.clone()),
                3 => Event::Tick,
                4 => Event::Operator(
                    [
                        Operator::Pause,
                        Operator::Resume,
                        Operator::Abort,
                        Operator::Rollback,
                        Operator::Promote,
                    ][rng.usize(0..5)],
                ),
                _ => match &r.service.hosts[&h].outstanding {
                    Some(c) => Event::Update(
                        h.clone(),
                        CommandUpdate::done(
                            &c.id,
                            if rng.u8(0..5) == 0 {
                                Outcome::Failed
                            } else {
                                Outcome::Succeeded
                            },
                            "x",
                        ),
                    ),
                    None => Event::Tick,
                },
            };
            let before = r.clone();

            let Ok((next, actions)) = step(&r, &event, t(now)) else {
                continue;
            };
            r = next;
            if before.state.is_terminal() && !matches!(event, Event::Operator(Operator::Rollback)) {
                assert_eq!(
                    r.state, before.state,
                    "seed {seed}: terminal states are absorbing"
                );
            }
            for Action::Send(h, c) in &actions {
                assert!(
                    r.service.hosts[h].connected,
                    "seed {seed}: sent to a disconnected host"
                );
                if c.kind.name() == "activate" {
                    // Re-sending the same id is fine (the agent answers it
                    // from its journal); a second id would run it twice.
                    let ids = activations.entry(h.clone()).or_default();
                    ids.insert(c.id.clone());
                    assert_eq!(ids.len(), 1, "seed {seed}: {h} activated twice");
                }
                if matches!(c.kind.name(), "rollback" | "remove") {
                    assert!(
                        r.service.hosts[h].touched,
                        "seed {seed}: rolled back an untouched host"
                    );
                }
            }
            let activating = r
                .service
                .hosts
                .values()
                .filter(|h| h.state == HostState::Activating)
                .count();
            assert!(
                activating <= window,
                "seed {seed}: {activating} activating > window {window}"
            );
            let started = actions.iter().any(|Action::Send(h, c)| {
                c.kind.name() == "activate"
                    && before.service.hosts[h].state != HostState::Activating
            });
            if started {
                let in_service = r.service.hosts.values().filter(|h| h.in_service()).count();
                assert!(
                    in_service >= floor,
                    "seed {seed}: started a host below the floor"
                );
            }
            if r.state == State::Succeeded {
                assert!(
                    r.service
                        .hosts
                        .values()
                        .all(|h| matches!(h.state, HostState::Healthy | HostState::Failed))
                );
            }
            if r.state.is_terminal() && r.state != State::Succeeded {
                assert!(
                    r.error.is_some(),
                    "seed {seed}: {:?} without a reason",
                    r.state
                );
            }
        }
    }
}
