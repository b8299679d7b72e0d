//! Unit and property tests of the pure state machine: no runtime, time is
//! a parameter.

use super::*;

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
}

fn host(i: usize) -> HostId {
    HostId::try_from(format!("h{i}")).unwrap()
}

fn svc(name: &str, hosts: &[usize], max_parallel: usize, min_healthy: usize) -> ServiceRun {
    ServiceRun {
        name: name.into(),
        version: "2".into(),
        digest: "sha256:00".into(),
        manifest: b"{}".to_vec(),
        signature: vec![1],
        depends_on: vec![],
        requires: BTreeMap::new(),
        outside: BTreeMap::new(),
        max_parallel,
        min_healthy,
        max_failures: 0,
        gate: HealthGate {
            min_healthy_time: Duration::from_secs(1),
            healthy_deadline: Duration::from_secs(30),
        },
        steps: vec![hosts.len()],
        step: 0,
        promote: false,
        pause: None,
        step_done_at: None,
        failures: 0,
        state: ServiceState::Waiting,
        allow_downgrade: false,
        analysis: Vec::new(),
        bake: None,
        verdicts: Vec::new(),
        judged: None,
        approval: false,
        approved: false,
        traffic: None,
        hosts: hosts
            .iter()
            .map(|i| (host(*i), HostRun::new(Some("1".into()), "2".into(), true)))
            .collect(),
        changed: Default::default(),
    }
}

fn with_services(services: Vec<ServiceRun>) -> Rollout {
    Rollout {
        id: "r-1".into(),
        plan: String::new(),
        state: State::Pending,
        resume_to: None,
        auto_rollback: true,
        progress_deadline: Duration::from_secs(600),
        max_parallel_services: usize::MAX,
        services,
        created_at: t(0),
        updated_at: t(0),
        progress_at: t(0),
        error: None,
        next_seq: 0,
        away: Default::default(),
        failure_budget: None,
        started_by: String::new(),
        held: None,
    }
}

fn rollout(hosts: usize, max_parallel: usize, min_healthy: usize) -> Rollout {
    let ids: Vec<usize> = (0..hosts).collect();
    with_services(vec![svc("api", &ids, max_parallel, min_healthy)])
}

/// Feeds an event, asserting it is accepted.
fn feed(r: &mut Rollout, e: Event, now: SystemTime) -> Vec<Action> {
    let (next, actions) = step(r, &e, now).unwrap();
    *r = next;
    actions
}

fn done(r: &Rollout, h: &HostId, outcome: Outcome) -> Event {
    let id = r
        .services
        .iter()
        .find_map(|s| s.hosts.get(h).and_then(|x| x.outstanding.as_ref()))
        .unwrap()
        .id
        .clone();
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
    let hosts: Vec<HostId> = r.services[0].hosts.keys().cloned().collect();
    for h in hosts {
        if r.services[0].hosts[&h].state == HostState::Staging {
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
    let activating: Vec<_> = r.services[0]
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
        r.services[0]
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
    let active = r.services[0]
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
    assert_eq!(r.services[0].hosts[&host(1)].state, HostState::RollingBack);
    for i in [0, 1] {
        let e = done(&r, &host(i), Outcome::Succeeded);
        feed(&mut r, e, t(7));
    }
    assert_eq!(r.state, State::RolledBack);
    assert_eq!(r.services[0].hosts[&host(2)].state, HostState::Staged);
    assert!(r.services[0].hosts[&host(2)].started_at.is_none());
}

#[test]
fn a_failure_keeps_the_kind_the_agent_reported() {
    let mut r = rollout(2, 1, 1);
    r.auto_rollback = false;
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    let id = r.services[0].hosts[&host(0)]
        .outstanding
        .as_ref()
        .unwrap()
        .id
        .clone();
    let update = CommandUpdate::failed(&id, FailureKind::NotHealthy, "returned 503");
    feed(&mut r, Event::Update(host(0), update), t(5));
    let h = &r.services[0].hosts[&host(0)];
    assert_eq!(h.state, HostState::Failed);
    assert_eq!(h.failure, Some(FailureKind::NotHealthy));
    // The stored record keeps it, and so does the history.
    let record = crate::record::host(h);
    assert_eq!(record.failure, Some(FailureKind::NotHealthy));
    // An update from an agent that did not say has no kind.
    let mut r = rollout(2, 1, 1);
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    let e = done(&r, &host(0), Outcome::Failed);
    feed(&mut r, e, t(5));
    assert_eq!(r.services[0].hosts[&host(0)].failure, None);
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
    r.services[0].max_failures = 1;
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    let e = done(&r, &host(0), Outcome::Failed);
    let a = feed(&mut r, e, t(5));
    assert_eq!(r.state, State::Progressing);
    // The tolerated failure goes back on its own, inside the window of
    // one: the next host starts once it is back.
    assert_eq!(kinds(&a), vec![("h0".into(), "rollback")]);
    let e = done(&r, &host(0), Outcome::Succeeded);
    let a = feed(&mut r, e, t(6));
    assert_eq!(kinds(&a), vec![("h1".into(), "activate")]);
    let e = done(&r, &host(1), Outcome::Succeeded);
    feed(&mut r, e, t(7));
    let e = done(&r, &host(2), Outcome::Succeeded);
    feed(&mut r, e, t(8));
    assert_eq!(r.state, State::Succeeded);
    assert_eq!(r.services[0].hosts[&host(0)].state, HostState::RolledBack);
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
        r.services[0]
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
            .contains("rollback did not finish within progress_deadline 1m on api on h1"),
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
    assert_eq!(r.services[0].hosts[&host(0)].state, HostState::Healthy);
    assert!(step(&r, &Event::Operator(Operator::Pause), t(3)).is_err());
    let a = feed(&mut r, Event::Operator(Operator::Resume), t(1000));
    assert_eq!(r.state, State::Progressing);
    assert_eq!(kinds(&a), vec![("h1".into(), "activate")]);
    assert_eq!(r.progress_at, t(1000), "time paused does not count");
    // The activation in flight on h1 is cancelled there; nothing else is
    // sent, and nothing stays outstanding.
    let a = feed(&mut r, Event::Operator(Operator::Abort), t(1001));
    assert_eq!(kinds(&a), vec![("h1".into(), "cancel")]);
    assert_eq!(r.state, State::Aborted);
    assert!(
        r.services[0]
            .hosts
            .values()
            .all(|h| h.outstanding.is_none())
    );
    let err = step(&r, &Event::Operator(Operator::Resume), t(1002)).unwrap_err();
    assert_eq!(err.to_string(), "cannot resume rollout r-1: it is aborted");
    let err = step(&r, &Event::Operator(Operator::Promote), t(1002)).unwrap_err();
    assert_eq!(err.to_string(), "cannot promote rollout r-1: it is aborted");
}

#[test]
fn a_first_install_rolls_back_by_removing() {
    let mut r = rollout(1, 1, 0);
    r.services[0].hosts.get_mut(&host(0)).unwrap().from_version = None;
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
    r.set_connections(|h| *h != host(1));
    let a = feed(&mut r, Event::Tick, t(0));
    assert_eq!(
        kinds(&a),
        vec![("h0".into(), "stage")],
        "nothing sent to a disconnected host"
    );
    let id = r.services[0].hosts[&host(1)]
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
    *r.services[0].hosts.get_mut(&host(1)).unwrap() =
        HostRun::new(Some("2".into()), "2".into(), true);
    let a = feed(&mut r, Event::Tick, t(0));
    assert_eq!(kinds(&a), vec![("h0".into(), "stage")]);
    stage_all(&mut r);
    let e = done(&r, &host(0), Outcome::Succeeded);
    feed(&mut r, e, t(3));
    assert_eq!(r.state, State::Succeeded);
    assert!(!r.services[0].hosts[&host(1)].touched);
}

/// Answers every outstanding command of `kind` with `outcome`.
fn answer(r: &mut Rollout, kind: &str, outcome: Outcome, now: SystemTime) -> Vec<Action> {
    let mut all = Vec::new();
    let pending: Vec<(HostId, String)> = r
        .services
        .iter()
        .flat_map(|s| s.hosts.iter())
        .filter_map(|(id, h)| {
            let c = h.outstanding.as_ref()?;
            (c.kind.name() == kind).then(|| (id.clone(), c.id.clone()))
        })
        .collect();
    for (h, id) in pending {
        let e = Event::Update(
            h,
            CommandUpdate::done(
                &id,
                outcome,
                if outcome == Outcome::Failed {
                    "boom"
                } else {
                    ""
                },
            ),
        );
        all.extend(feed(r, e, now));
    }
    all
}

fn state_of(r: &Rollout, name: &str) -> ServiceState {
    r.services.iter().find(|s| s.name == name).unwrap().state
}

/// db ← api ← web on separate hosts.
fn system() -> Rollout {
    let db = svc("db", &[0, 1], 1, 1);
    let mut api = svc("api", &[2, 3], 1, 1);
    api.depends_on = vec!["db".into()];
    let mut web = svc("web", &[4, 5], 1, 1);
    web.depends_on = vec!["api".into()];
    web.requires = BTreeMap::from([("api".to_owned(), ">=2".to_owned())]);
    with_services(vec![db, api, web])
}

#[test]
fn services_go_in_dependency_order() {
    let mut r = system();
    feed(&mut r, Event::Tick, t(0));
    answer(&mut r, "stage", Outcome::Succeeded, t(1));
    assert_eq!(r.state, State::Progressing);
    assert_eq!(state_of(&r, "db"), ServiceState::Progressing);
    assert_eq!(state_of(&r, "api"), ServiceState::Waiting);
    let mut order = Vec::new();
    for i in 0..20 {
        let a = answer(&mut r, "activate", Outcome::Succeeded, t(2 + i));
        for Action::Send(h, _) in a {
            order.push(h.to_string());
        }
        if r.state == State::Succeeded {
            break;
        }
    }
    assert_eq!(r.state, State::Succeeded);
    // db's second host, then api's, then web's: never a dependent early.
    assert_eq!(order, vec!["h1", "h2", "h3", "h4", "h5"]);
}

#[test]
fn a_failing_dependent_rolls_the_system_back_in_reverse_order() {
    let mut r = system();
    feed(&mut r, Event::Tick, t(0));
    answer(&mut r, "stage", Outcome::Succeeded, t(1));
    for i in 0..4 {
        answer(&mut r, "activate", Outcome::Succeeded, t(2 + i));
    }
    assert_eq!(state_of(&r, "web"), ServiceState::Progressing);
    // web's first host fails: web goes back first, then api, then db.
    let a = answer(&mut r, "activate", Outcome::Failed, t(10));
    assert_eq!(r.state, State::RollingBack);
    assert_eq!(kinds(&a), vec![("h4".into(), "rollback")]);
    let a = answer(&mut r, "rollback", Outcome::Succeeded, t(11));
    assert_eq!(
        kinds(&a),
        vec![("h2".into(), "rollback")],
        "api after web, one at a time"
    );
    let a = answer(&mut r, "rollback", Outcome::Succeeded, t(12));
    assert_eq!(kinds(&a), vec![("h3".into(), "rollback")]);
    let a = answer(&mut r, "rollback", Outcome::Succeeded, t(13));
    assert_eq!(kinds(&a), vec![("h0".into(), "rollback")], "db last");
    answer(&mut r, "rollback", Outcome::Succeeded, t(14));
    answer(&mut r, "rollback", Outcome::Succeeded, t(15));
    assert_eq!(r.state, State::RolledBack, "{:?}", r.error);
    assert!(r.error.as_deref().unwrap().contains("web on h4: boom"));
    for s in &r.services {
        assert_eq!(s.state, ServiceState::RolledBack, "{}", s.name);
    }
    assert!(
        r.services[2].hosts[&host(5)].started_at.is_none(),
        "web stopped at its first host"
    );
}

#[test]
fn a_host_never_runs_two_activations_at_once() {
    // Two independent services on the same two hosts.
    let mut r = with_services(vec![svc("a", &[0, 1], 2, 0), svc("b", &[0, 1], 2, 0)]);
    feed(&mut r, Event::Tick, t(0));
    let a = answer(&mut r, "stage", Outcome::Succeeded, t(1));
    let hosts: Vec<String> = kinds(&a)
        .into_iter()
        .filter(|(_, k)| *k == "activate")
        .map(|(h, _)| h)
        .collect();
    assert_eq!(
        hosts,
        vec!["h0", "h1"],
        "b waits for the hosts a is activating"
    );
    let a = answer(&mut r, "activate", Outcome::Succeeded, t(2));
    assert_eq!(
        kinds(&a),
        vec![("h0".into(), "activate"), ("h1".into(), "activate")]
    );
    answer(&mut r, "activate", Outcome::Succeeded, t(3));
    assert_eq!(r.state, State::Succeeded);
}

#[test]
fn a_canary_waits_for_promotion_unless_auto_promoted() {
    let mut r = rollout(4, 2, 0);
    r.services[0].steps = vec![1, 4];
    r.services[0].promote = true;
    feed(&mut r, Event::Tick, t(0));
    answer(&mut r, "stage", Outcome::Succeeded, t(1));
    answer(&mut r, "activate", Outcome::Succeeded, t(2));
    assert_eq!(r.state, State::AwaitingPromotion);
    let on_new = r.services[0]
        .hosts
        .values()
        .filter(|h| h.state == HostState::Healthy)
        .count();
    assert_eq!(on_new, 1);
    // Waiting for an operator never times out.
    feed(&mut r, Event::Tick, t(100_000));
    assert_eq!(r.state, State::AwaitingPromotion);
    let a = feed(&mut r, Event::Operator(Operator::Promote), t(100_001));
    assert_eq!(a.len(), 2, "the rest at max_parallel");
    answer(&mut r, "activate", Outcome::Succeeded, t(100_002));
    let a = answer(&mut r, "activate", Outcome::Succeeded, t(100_003));
    assert!(a.is_empty());
    assert_eq!(r.state, State::Succeeded);

    let mut auto = rollout(4, 2, 0);
    auto.services[0].steps = vec![1, 4];
    feed(&mut auto, Event::Tick, t(0));
    answer(&mut auto, "stage", Outcome::Succeeded, t(1));
    let a = answer(&mut auto, "activate", Outcome::Succeeded, t(2));
    assert_eq!(a.len(), 2, "auto_promote continues at once");
}

#[test]
fn steps_pause_between_them() {
    let mut r = rollout(4, 4, 0);
    r.services[0].steps = vec![1, 2, 4];
    r.services[0].pause = Some(Duration::from_secs(30));
    feed(&mut r, Event::Tick, t(0));
    answer(&mut r, "stage", Outcome::Succeeded, t(1));
    let a = answer(&mut r, "activate", Outcome::Succeeded, t(2));
    assert!(a.is_empty(), "pausing after step 1");
    assert!(feed(&mut r, Event::Tick, t(20)).is_empty());
    let a = feed(&mut r, Event::Tick, t(33));
    assert_eq!(a.len(), 1, "step 2: one more host");
    answer(&mut r, "activate", Outcome::Succeeded, t(34));
    let a = feed(&mut r, Event::Tick, t(70));
    assert_eq!(a.len(), 2, "step 3: the rest");
}

#[test]
fn a_requirement_outside_the_plan_that_breaks_fails_the_rollout() {
    let mut r = rollout(2, 1, 0);
    r.services[0].requires = BTreeMap::from([("db".to_owned(), ">=5".to_owned())]);
    r.services[0].outside = BTreeMap::from([("db".to_owned(), vec!["4.2.0".to_owned()])]);
    r.auto_rollback = false;
    feed(&mut r, Event::Tick, t(0));
    answer(&mut r, "stage", Outcome::Succeeded, t(1));
    assert_eq!(r.state, State::Failed);
    assert_eq!(
        r.error.as_deref(),
        Some("api requires db >=5, but a host runs db 4.2.0")
    );
}

/// Random systems: up to 8 services on random DAGs over up to 30 hosts with
/// overlapping host sets, random failures, disconnects and operator
/// actions; then everything is answered until the rollout ends.
#[test]
fn property_systems_keep_their_invariants_and_always_end() {
    for seed in 0..150u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let n_hosts = rng.usize(1..=30);
        let n_svc = rng.usize(1..=8);
        let mut services = Vec::new();
        for i in 0..n_svc {
            let mut ids: Vec<usize> = (0..n_hosts).filter(|_| rng.bool()).collect();
            if ids.is_empty() {
                ids.push(rng.usize(0..n_hosts));
            }
            let window = rng.usize(1..=ids.len());
            let floor = rng.usize(0..ids.len());
            let mut s = svc(&format!("s{i}"), &ids, window, floor);
            s.depends_on = (0..i)
                .filter(|_| rng.u8(0..4) == 0)
                .map(|d| format!("s{d}"))
                .collect();
            s.max_failures = rng.u32(0..2);
            if rng.u8(0..4) == 0 {
                s.steps = vec![1.min(ids.len()), ids.len()];
                s.promote = rng.bool();
            }
            services.push(s);
        }
        let mut r = with_services(services);
        r.auto_rollback = rng.bool();
        r.max_parallel_services = rng.usize(1..=3);
        let hosts_of = |r: &Rollout| -> Vec<HostId> {
            let mut all: Vec<HostId> = r
                .services
                .iter()
                .flat_map(|s| s.hosts.keys().cloned())
                .collect();
            all.sort();
            all.dedup();
            all
        };
        let all_hosts = hosts_of(&r);
        let mut now = 0u64;
        let mut activations: BTreeMap<(String, HostId), std::collections::BTreeSet<String>> =
            BTreeMap::new();
        let mut check = |r: &Rollout, before: &Rollout, actions: &[Action], seed: u64| {
            for Action::Send(h, c) in actions {
                if matches!(c.kind.name(), "rollback" | "remove") {
                    let svc = c.kind.service().unwrap();
                    let run = r.services.iter().find(|s| s.name == svc).unwrap();
                    assert!(
                        run.hosts[h].touched,
                        "seed {seed}: rolled back untouched {svc} on {h}"
                    );
                }
                if c.kind.name() == "activate" {
                    let svc = c.kind.service().unwrap().to_owned();
                    let ids = activations.entry((svc, h.clone())).or_default();
                    ids.insert(c.id.clone());
                    assert_eq!(
                        ids.len(),
                        1,
                        "seed {seed}: {h} activated twice for one service"
                    );
                }
            }
            for h in &all_hosts {
                let busy = r
                    .services
                    .iter()
                    .filter(|s| {
                        s.hosts.get(h).is_some_and(|x| {
                            matches!(x.state, HostState::Activating | HostState::RollingBack)
                        })
                    })
                    .count();
                assert!(
                    busy <= 1,
                    "seed {seed}: {h} runs {busy} activations at once"
                );
            }
            for (si, s) in r.services.iter().enumerate() {
                // The window holds for reverts too: hosts activating and
                // hosts rolling back together never exceed max_parallel.
                let out = s
                    .hosts
                    .values()
                    .filter(|h| matches!(h.state, HostState::Activating | HostState::RollingBack))
                    .count();
                let was = before.services[si]
                    .hosts
                    .values()
                    .filter(|h| matches!(h.state, HostState::Activating | HostState::RollingBack))
                    .count();
                assert!(
                    out <= s.max_parallel.max(was),
                    "seed {seed}: {} has {out} hosts activating or rolling back, max_parallel {}",
                    s.name,
                    s.max_parallel
                );
                // A revert that takes a serving host out keeps the floor.
                let reverted_serving = actions.iter().any(|Action::Send(h, c)| {
                    matches!(c.kind.name(), "rollback" | "remove")
                        && c.kind.service() == Some(&s.name)
                        && before.services[si].hosts[h].in_service()
                });
                if reverted_serving {
                    let in_service = s.hosts.values().filter(|h| h.in_service()).count();
                    assert!(
                        in_service >= s.min_healthy,
                        "seed {seed}: a rollback of {} took it below its floor ({in_service} < {})",
                        s.name,
                        s.min_healthy
                    );
                }
                let newly = actions.iter().any(|Action::Send(h, c)| {
                    c.kind.name() == "activate"
                        && c.kind.service() == Some(&s.name)
                        && before.services[si].hosts[h].state != HostState::Activating
                });
                if newly {
                    let in_service = s.hosts.values().filter(|h| h.in_service()).count();
                    assert!(
                        in_service >= s.min_healthy,
                        "seed {seed}: {} below its floor",
                        s.name
                    );
                    for d in &s.depends_on {
                        let dep = r.services.iter().find(|o| &o.name == d).unwrap();
                        assert_eq!(
                            dep.state,
                            ServiceState::Succeeded,
                            "seed {seed}: {} before {d}",
                            s.name
                        );
                    }
                }
            }
        };
        for _ in 0..300 {
            now += rng.u64(0..30);
            let h = all_hosts[rng.usize(0..all_hosts.len())].clone();
            let event = match rng.u8(0..12) {
                0 => Event::Disconnected(h.clone()),
                1 | 2 => Event::Connected(h.clone()),
                3 => Event::Tick,
                4 => Event::Operator(
                    [
                        Operator::Pause,
                        Operator::Resume,
                        Operator::Promote,
                        Operator::Promote,
                        Operator::Abort,
                        Operator::Rollback,
                    ][rng.usize(0..6)],
                ),
                _ => {
                    let out: Vec<String> = r
                        .services
                        .iter()
                        .filter_map(|s| s.hosts.get(&h)?.outstanding.as_ref().map(|c| c.id.clone()))
                        .collect();
                    match out.first() {
                        Some(id) => Event::Update(
                            h.clone(),
                            CommandUpdate::done(
                                id,
                                if rng.u8(0..6) == 0 {
                                    Outcome::Failed
                                } else {
                                    Outcome::Succeeded
                                },
                                "x",
                            ),
                        ),
                        None => Event::Tick,
                    }
                }
            };
            let before = r.clone();
            let Ok((next, actions)) = step(&r, &event, t(now)) else {
                continue;
            };
            r = next;
            check(&r, &before, &actions, seed);
            stepped_in_place_records_every_change(&before, &event, &r, t(now), seed);
            a_tick_before_the_next_deadline_changes_nothing(&r, t(now), &mut rng, seed);
        }
        // Then the world behaves: every host connects, every command
        // succeeds, promotions are granted. The rollout must end.
        for h in &all_hosts {
            let before = r.clone();
            let (next, actions) = step(&r, &Event::Connected(h.clone()), t(now)).unwrap();
            r = next;
            check(&r, &before, &actions, seed);
        }
        if r.state == State::Paused {
            r = step(&r, &Event::Operator(Operator::Resume), t(now))
                .unwrap()
                .0;
        }
        for _ in 0..2000 {
            if r.state.is_terminal() {
                break;
            }
            now += 5;
            let pending: Vec<(HostId, String)> = r
                .services
                .iter()
                .flat_map(|s| s.hosts.iter())
                .filter_map(|(id, h)| Some((id.clone(), h.outstanding.as_ref()?.id.clone())))
                .collect();
            let event = if let Some((h, id)) = pending.first() {
                Event::Update(h.clone(), CommandUpdate::done(id, Outcome::Succeeded, ""))
            } else if r.state == State::AwaitingPromotion {
                Event::Operator(Operator::Promote)
            } else {
                Event::Tick
            };
            let before = r.clone();
            let (next, actions) = step(&r, &event, t(now)).unwrap();
            r = next;
            check(&r, &before, &actions, seed);
        }
        assert!(r.state.is_terminal(), "seed {seed}: stuck in {:?}", r.state);
        if r.state == State::RolledBack {
            for s in &r.services {
                for (id, h) in &s.hosts {
                    assert!(
                        !h.touched || h.state == HostState::RolledBack,
                        "seed {seed}: {} on {id} not restored ({:?})",
                        s.name,
                        h.state
                    );
                }
            }
        }
    }
}

#[test]
fn a_long_rollback_keeps_its_deadline_alive_host_by_host() {
    let mut r = rollout(4, 1, 0);
    r.progress_deadline = Duration::from_secs(60);
    r.services[0].max_parallel = 4;
    feed(&mut r, Event::Tick, t(0));
    answer(&mut r, "stage", Outcome::Succeeded, t(1));
    answer(&mut r, "activate", Outcome::Succeeded, t(2));
    // Roll the four hosts back one at a time, 50 s each: longer than one
    // progress_deadline in all, never without progress for one.
    r.services[0].max_parallel = 1;
    feed(&mut r, Event::Operator(Operator::Rollback), t(10));
    for i in 1..=4 {
        feed(&mut r, Event::Tick, t(10 + 50 * i - 1));
        assert_eq!(r.state, State::RollingBack, "{:?}", r.error);
        answer(&mut r, "rollback", Outcome::Succeeded, t(10 + 50 * i));
    }
    assert_eq!(r.state, State::RolledBack, "{:?}", r.error);
}

#[test]
fn a_pause_or_a_wait_for_promote_is_not_a_stall() {
    let mut r = rollout(2, 2, 0);
    r.progress_deadline = Duration::from_secs(60);
    r.services[0].steps = vec![1, 2];
    r.services[0].pause = Some(Duration::from_secs(600));
    feed(&mut r, Event::Tick, t(0));
    answer(&mut r, "stage", Outcome::Succeeded, t(1));
    answer(&mut r, "activate", Outcome::Succeeded, t(2));
    feed(&mut r, Event::Tick, t(300));
    assert_eq!(r.state, State::Progressing, "{:?}", r.error);
    let a = feed(&mut r, Event::Tick, t(603));
    assert_eq!(a.len(), 1, "the pause ended; the deadline restarts");
    assert_eq!(r.state, State::Progressing, "{:?}", r.error);

    let mut c = rollout(2, 2, 0);
    c.services[0].steps = vec![1, 2];
    c.services[0].promote = true;
    feed(&mut c, Event::Tick, t(0));
    answer(&mut c, "stage", Outcome::Succeeded, t(1));
    answer(&mut c, "activate", Outcome::Succeeded, t(2));
    assert_eq!(c.state, State::AwaitingPromotion);
    // Ticks while waiting change nothing (nothing to persist every 200 ms).
    let (next, _) = step(&c, &Event::Tick, t(50_000)).unwrap();
    assert_eq!(next, c);
}

#[test]
fn failed_hosts_that_leave_no_room_fail_at_once_with_the_reason() {
    // 4 hosts, one at a time, floor 3, one failure tolerated (no rollback).
    let mut r = rollout(4, 1, 3);
    r.auto_rollback = false;
    r.services[0].max_failures = 1;
    feed(&mut r, Event::Tick, t(0));
    answer(&mut r, "stage", Outcome::Succeeded, t(1));
    answer(&mut r, "activate", Outcome::Failed, t(2));
    assert_eq!(r.state, State::Failed);
    assert_eq!(
        r.error.as_deref(),
        Some(
            "api: 1 failed host(s) leave 3 usable, and min_healthy = 3 allows none of the rest to be replaced"
        )
    );
}

#[test]
fn rollback_waits_for_dependents_through_an_untouched_service() {
    // a ← b ← c, where b is already on its target (nothing to undo).
    let a = svc("a", &[0], 1, 0);
    let mut b = svc("b", &[1], 1, 0);
    b.depends_on = vec!["a".into()];
    *b.hosts.get_mut(&host(1)).unwrap() = HostRun::new(Some("2".into()), "2".into(), true);
    let mut c = svc("c", &[2], 1, 0);
    c.depends_on = vec!["b".into()];
    let mut r = with_services(vec![a, b, c]);
    feed(&mut r, Event::Tick, t(0));
    answer(&mut r, "stage", Outcome::Succeeded, t(1));
    answer(&mut r, "activate", Outcome::Succeeded, t(2)); // a
    let a2 = answer(&mut r, "activate", Outcome::Failed, t(3)); // c fails
    assert_eq!(
        kinds(&a2),
        vec![("h2".into(), "rollback")],
        "c first, a waits"
    );
    let a3 = answer(&mut r, "rollback", Outcome::Succeeded, t(4));
    assert_eq!(kinds(&a3), vec![("h0".into(), "rollback")], "then a");
    answer(&mut r, "rollback", Outcome::Succeeded, t(5));
    assert_eq!(r.state, State::RolledBack);
    assert_eq!(
        state_of(&r, "b"),
        ServiceState::Succeeded,
        "b was never changed"
    );
}

#[test]
fn a_host_gone_longer_than_its_deadline_has_failed() {
    let mut r = rollout(2, 1, 0);
    feed(&mut r, Event::Tick, t(0));
    answer(&mut r, "stage", Outcome::Succeeded, t(1));
    assert_eq!(r.services[0].hosts[&host(0)].state, HostState::Activating);
    feed(&mut r, Event::Disconnected(host(0)), t(2));
    feed(&mut r, Event::Tick, t(20));
    assert_eq!(
        r.state,
        State::Progressing,
        "still within healthy_deadline (30s)"
    );
    feed(&mut r, Event::Tick, t(33));
    let h = &r.services[0].hosts[&host(0)];
    assert!(
        h.error.as_deref().unwrap().contains("gone for 31s"),
        "{:?}",
        h.error
    );
    assert_eq!(h.failure, Some(FailureKind::Gone));
    // max_failures = 0: the rollout rolls back; the gone host gets its
    // rollback when it returns.
    assert_eq!(r.state, State::RollingBack);
    let a = feed(&mut r, Event::Connected(host(0)), t(40));
    assert_eq!(kinds(&a), vec![("h0".into(), "rollback")]);
}

/// The history the driver writes is what `events::diff` finds between
/// consecutive states: a whole rollout gives every host its four steps in
/// order and ends with the rollout's success.
#[test]
fn the_event_history_of_a_rollout_is_complete_and_ordered() {
    use crate::events::{self, Kind};
    let mut r = rollout(3, 1, 2);
    let mut history = events::started(&r, "operator alice", t(0));
    let mut step_to = |r: &mut Rollout, e: Event, now: SystemTime| {
        let before = r.clone();
        let actions = feed(r, e, now);
        history.extend(events::diff(&before, r, now));
        actions
    };
    step_to(&mut r, Event::Tick, t(0));
    for i in 0..3 {
        let e = done(&r, &host(i), Outcome::Succeeded);
        step_to(&mut r, e, t(1));
    }
    for (i, now) in [(0, 2), (1, 3), (2, 4)] {
        let e = done(&r, &host(i), Outcome::Succeeded);
        step_to(&mut r, e, t(now));
    }
    assert_eq!(r.state, State::Succeeded);
    events::number(&mut history, 0);
    assert!(history.iter().enumerate().all(|(i, e)| e.seq == i as u64));
    assert!(history.windows(2).all(|w| w[0].at <= w[1].at));
    assert_eq!(history[0].who, "operator alice");
    let states: Vec<&str> = history
        .iter()
        .filter(|e| e.kind == Kind::Rollout)
        .map(|e| e.to.as_str())
        .collect();
    assert_eq!(states, ["pending", "staging", "progressing", "succeeded"]);
    for i in 0..3 {
        let id = host(i).to_string();
        let steps: Vec<(&str, &str)> = history
            .iter()
            .filter(|e| e.kind == Kind::Host && e.host == id)
            .map(|e| (e.from.as_str(), e.to.as_str()))
            .collect();
        assert_eq!(
            steps,
            [
                ("pending", "staging"),
                ("staging", "staged"),
                ("staged", "activating"),
                ("activating", "healthy")
            ],
            "{id}"
        );
    }
    let service: Vec<&str> = history
        .iter()
        .filter(|e| e.kind == Kind::Service && !e.to.is_empty())
        .map(|e| e.to.as_str())
        .collect();
    assert_eq!(service, ["progressing", "succeeded"]);
    // A failure's reason travels with the host's event.
    let mut r = rollout(2, 1, 1);
    feed(&mut r, Event::Tick, t(0));
    for i in 0..2 {
        let e = done(&r, &host(i), Outcome::Succeeded);
        feed(&mut r, e, t(1));
    }
    let before = r.clone();
    let failing = r.services[0]
        .hosts
        .iter()
        .find(|(_, h)| h.state == HostState::Activating)
        .map(|(id, _)| id.clone())
        .unwrap();
    let e = done(&r, &failing, Outcome::Failed);
    feed(&mut r, e, t(2));
    let failed = events::diff(&before, &r, t(2));
    // (With auto_rollback it goes straight on to rolling back.)
    let host_event = failed
        .iter()
        .find(|e| e.kind == Kind::Host && e.host == failing.to_string())
        .unwrap();
    assert_eq!(host_event.from, "activating");
    assert!(host_event.message.contains("boom"), "{host_event:?}");
}

/// Stepping in place gives the same rollout as stepping a copy, and every
/// host that differs is among the changed ones, with its value before:
/// the driver persists only those.
fn stepped_in_place_records_every_change(
    before: &Rollout,
    event: &Event,
    after: &Rollout,
    now: SystemTime,
    seed: u64,
) {
    let mut r = before.clone();
    apply(&mut r, std::slice::from_ref(event), now).unwrap();
    let changed = r.take_changed();
    assert_eq!(&r, after, "seed {seed}: in place differs from a copy");
    for (si, s) in after.services.iter().enumerate() {
        for (id, h) in &s.hosts {
            let was = &before.services[si].hosts[id];
            if was != h || was.connected != h.connected || was.gone_since != h.gone_since {
                assert_eq!(
                    changed[si].get(id),
                    Some(was),
                    "seed {seed}: {id} of {} changed unrecorded on {event:?}",
                    s.name
                );
            }
        }
    }
}

/// A tick at any time before [`Rollout::next_deadline`] changes nothing:
/// the driver may skip it.
fn a_tick_before_the_next_deadline_changes_nothing(
    r: &Rollout,
    now: SystemTime,
    rng: &mut fastrand::Rng,
    seed: u64,
) {
    let until = r
        .next_deadline()
        .unwrap_or(now + Duration::from_secs(10 * 86_400));
    let Ok(room) = until.duration_since(now) else {
        return;
    };
    if room.is_zero() {
        return;
    }
    let at = now
        + Duration::from_millis(rng.u64(0..u64::try_from(room.as_millis()).unwrap_or(u64::MAX)));
    let (next, actions) = step(r, &Event::Tick, at).unwrap();
    assert!(
        actions.is_empty(),
        "seed {seed}: a tick before the deadline acted: {actions:?}"
    );
    assert_eq!(
        &next, r,
        "seed {seed}: a tick at {at:?} before the deadline {until:?} changed the rollout"
    );
}

/// A failed write puts the rollout back as it was before the step: its
/// state, its hosts, and what a header leaves out (the plan, the signed
/// manifests, the hosts away), which the header does not copy.
#[test]
fn restore_undoes_a_step_and_keeps_what_the_header_leaves_out() {
    let mut r = rollout(4, 2, 2);
    r.plan = "# a plan\n".repeat(10_000);
    r.services[0].manifest = vec![7; 4096];
    r.services[0].signature = vec![9; 64];
    feed(&mut r, Event::Tick, t(0));
    stage_all(&mut r);
    feed(&mut r, Event::Disconnected(host(3)), t(1));
    r.take_changed();
    let original = r.clone();

    let header = r.header();
    assert!(header.plan.is_empty() && header.services[0].manifest.is_empty());
    assert!(header.services[0].hosts.is_empty());
    assert_eq!(r, original, "taking a header changes nothing");
    let e = done(&r, &host(0), Outcome::Failed);
    apply(&mut r, &[e], t(5)).unwrap();
    assert_ne!(r.state, original.state);
    let changed = r.take_changed();
    r.restore(header, changed);
    assert_eq!(r, original);
    assert_eq!(r.plan.len(), "# a plan\n".len() * 10_000);
    assert_eq!(r.services[0].manifest, vec![7; 4096]);
    assert!(r.away.contains(&host(3)));
}

mod analysis;
