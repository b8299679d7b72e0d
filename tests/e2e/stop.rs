//! Stopping the old process of a service that ignores SIGTERM (with a
//! stop_timeout of ten minutes): the stop counts against the activation's
//! deadline, a rollback or an abort cuts it short at once, a cancelled
//! activation never swaps `current`, the old release is started again so
//! it keeps serving, and the error says what happened.

use std::time::{Duration, Instant};

use baton_proto::agent::v1 as pb;
use baton_tests::fleet::Fleet;
use baton_tests::rogue::Rogue;
use baton_tests::{SOON, wait_until};

/// Pushes demo `version`, a release that ignores its stop signal and may
/// take ten minutes to stop.
fn push_stubborn(fleet: &Fleet, version: &str) {
    let dir = fleet.release_dir_with(version, false, false, "");
    let toml = std::fs::read_to_string(dir.join("service.toml"))
        .unwrap()
        .replace("stop_timeout = \"5s\"", "stop_timeout = \"10m\"")
        .replace(
            &format!("\"--version\", \"{version}\""),
            &format!("\"--version\", \"{version}\", \"--ignore-sigterm\""),
        );
    std::fs::write(dir.join("service.toml"), toml).unwrap();
    let file = fleet.pack_with(&dir, version, &fleet.env.path("release.key"));
    fleet.push(&file);
}

/// A fleet of one host running the stubborn 1.0.0, with 2.0.0 pushed.
fn stubborn_fleet() -> Fleet {
    let fleet = Fleet::start(&["h1"]);
    push_stubborn(&fleet, "1.0.0");
    let s = fleet.roll(
        "1.0.0",
        "hosts = { role = \"web\" }\nmin_healthy_time = \"200ms\"\n",
    );
    assert_eq!(s["state"], "succeeded", "{s}");
    fleet.release("2.0.0", false);
    fleet
}

fn ignored_stops(fleet: &Fleet) -> usize {
    fleet
        .service_log("h1")
        .matches("demo-service 1.0.0 ignores the stop signal")
        .count()
}

fn current(fleet: &Fleet) -> String {
    std::fs::read_link(fleet.data_dir("h1").join("services/demo/current"))
        .unwrap()
        .display()
        .to_string()
}

/// Starts a rollout to 2.0.0 and returns its id once 1.0.0 has ignored the
/// SIGTERM that began its stop.
fn roll_until_the_old_process_ignores_its_stop(fleet: &Fleet) -> String {
    let id = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\nmin_healthy_time = \"200ms\"\n",
    );
    wait_until("1.0.0 to ignore its stop signal", SOON, || {
        (ignored_stops(fleet) >= 1).then_some(())
    });
    id
}

/// After a cancelled activation: 1.0.0 serves again from its own release
/// and 2.0.0 never got as far as listening.
fn the_old_release_serves_and_the_new_never_started(fleet: &Fleet) {
    wait_until("1.0.0 to serve again", SOON, || {
        (fleet.get("h1").as_deref() == Some("demo-service 1.0.0")).then_some(())
    });
    assert_eq!(current(fleet), "releases/1.0.0");
    assert!(
        !fleet
            .service_log("h1")
            .contains("demo-service 2.0.0 listening"),
        "the cancelled activation started 2.0.0"
    );
}

#[test]
fn a_rollback_cuts_short_the_stop_of_an_old_process_that_ignores_sigterm() {
    let fleet = stubborn_fleet();
    let started = Instant::now();
    let id = roll_until_the_old_process_ignores_its_stop(&fleet);
    let out = fleet.baton(&["rollout", "rollback", &id]);
    assert!(out.status.success(), "{out:?}");
    let s = fleet.wait_done(&id, SOON);
    assert_eq!(s["state"], "rolled_back", "{s}");
    // Seconds, not the ten minutes of its stop_timeout.
    assert!(started.elapsed() < Duration::from_secs(120));
    the_old_release_serves_and_the_new_never_started(&fleet);
    let log = fleet.agents["h1"].log_text();
    assert!(
        log.contains("cancelled by a rollback while the old process was stopping (it was killed); 1.0.0 was started again"),
        "{log}"
    );
}

#[test]
fn the_stop_counts_against_the_deadline_and_an_abort_cancels_it() {
    let mut fleet = stubborn_fleet();
    let rogue = Rogue::start(&fleet.env.tls());
    fleet.agent_url = rogue.url.clone();
    fleet.start_agent("h1");
    rogue
        .run(rogue.offer(&fleet.env.path("demo-2.0.0.baton")))
        .unwrap();
    let activate = || {
        pb::command::Kind::Activate(pb::Activate {
            service: "demo".into(),
            version: "2.0.0".into(),
            min_healthy_time: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            healthy_deadline: Some(prost_types::Duration {
                seconds: 4,
                nanos: 0,
            }),
            allow_downgrade: false,
        })
    };

    // Six seconds in all: the stop may take five, leaving one for the
    // health gate. It takes them, the process is killed, the activation
    // fails saying why, and 1.0.0 serves again.
    let started = Instant::now();
    let id = rogue.send(activate(), Duration::from_secs(6));
    let error = rogue.outcome(&id, SOON).unwrap_err();
    assert!(
        error.contains("the old process of demo 1.0.0 did not exit within")
            && error.contains("the activation's deadline came first (its stop_timeout is 10m)")
            && error.ends_with("1.0.0 was started again"),
        "{error}"
    );
    assert!(started.elapsed() < SOON);
    wait_until("1.0.0 to serve again", SOON, || {
        (fleet.get("h1").as_deref() == Some("demo-service 1.0.0")).then_some(())
    });
    assert_eq!(current(&fleet), "releases/1.0.0");

    // An abort (the coordinator's Cancel) ends the stop at once, and the
    // activation never swaps.
    let before = ignored_stops(&fleet);
    let id = rogue.send(activate(), Duration::from_secs(600));
    wait_until("1.0.0 to ignore its stop signal again", SOON, || {
        (ignored_stops(&fleet) > before).then_some(())
    });
    rogue
        .run(pb::command::Kind::Cancel(pb::Cancel {
            service: "demo".into(),
        }))
        .unwrap();
    let error = rogue.outcome(&id, SOON).unwrap_err();
    assert!(
        error.contains("demo 2.0.0: cancelled by an abort while the old process was stopping"),
        "{error}"
    );
    the_old_release_serves_and_the_new_never_started(&fleet);
}

#[test]
fn an_abort_cancels_the_activation_on_its_host_and_the_old_release_serves() {
    let fleet = stubborn_fleet();
    let id = roll_until_the_old_process_ignores_its_stop(&fleet);
    let out = fleet.baton(&["rollout", "abort", &id]);
    assert!(out.status.success(), "{out:?}");
    let s = fleet.wait_done(&id, SOON);
    assert_eq!(s["state"], "aborted", "{s}");
    // The coordinator's Cancel reached the host: the stop was cut short,
    // nothing swapped, and 1.0.0 serves again.
    wait_until("the activation to be cancelled", SOON, || {
        fleet.agents["h1"]
            .log_text()
            .contains("cancelled by an abort while the old process was stopping")
            .then_some(())
    });
    the_old_release_serves_and_the_new_never_started(&fleet);
}
