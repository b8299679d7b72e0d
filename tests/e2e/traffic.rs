//! Load-balancer draining: a real HAProxy in front of three hosts whose
//! demo service takes no socket from the agent (stop, then start) and
//! closes its connections as soon as it is told to stop, `wrk` through it
//! during rolling upgrades. Drained first, each host's swap
//! costs no request; without `traffic` the same upgrade does.

use std::time::Duration;

use baton_tests::fleet::Fleet;
use baton_tests::haproxy::{self, Haproxy};
use baton_tests::load::get;
use baton_tests::wrk::wrk_on_while;
use baton_tests::{Batond, SOON, wait_until};

const HOSTS: [&str; 3] = ["h1", "h2", "h3"];

/// Three hosts on 1.0.0 without `listen`, 2.0.0 pushed, an HAProxy in
/// front; `None` (after saying why) when HAProxy or wrk is missing.
fn fleet_behind_haproxy() -> Option<(Fleet, Haproxy)> {
    fleet_allowing(&[])
}

/// [`fleet_behind_haproxy`], `batond` and the agents allowed to use the
/// HAProxy and `more` balancers (restarted with `--balancer`).
fn fleet_allowing(more: &[String]) -> Option<(Fleet, Haproxy)> {
    let binary = haproxy::binary()?;
    if !haproxy::have_wrk() {
        return None;
    }
    let mut fleet = Fleet::start(&HOSTS);
    let mut allowed = vec![Haproxy::socket_in(&fleet.env).display().to_string()];
    allowed.extend(more.iter().cloned());
    fleet.allow_balancers(&allowed);
    fleet.push_closing_release("1.0.0", false);
    fleet.push_closing_release("2.0.0", false);
    let s = fleet.roll(
        "1.0.0",
        "hosts = { role = \"web\" }\nstrategy = \"all-at-once\"\nmin_healthy_time = \"200ms\"\n",
    );
    assert_eq!(s["state"], "succeeded", "{s}");
    let servers: Vec<(&str, u16)> = HOSTS.iter().map(|h| (*h, fleet.ports[*h])).collect();
    let lb = Haproxy::start(binary, &fleet.env, &servers);
    Some((fleet, lb))
}

/// What wrk asks for: requests in flight for 20 ms, as real ones are.
const REQUEST: &str = "/slow?ms=20";

/// Sends three requests of `ms` through HAProxy, one after another so
/// round robin gives each host one, and waits until each is in flight.
fn slow_requests(
    fleet: &Fleet,
    lb: &Haproxy,
    ms: u64,
) -> Vec<std::thread::JoinHandle<std::io::Result<(u16, String)>>> {
    let front = lb.front;
    let path = format!("/slow?ms={ms}");
    let threads = (0..3)
        .map(|_| {
            let path = path.clone();
            let t = std::thread::spawn(move || get(front, &path, Duration::from_secs(30)));
            std::thread::sleep(Duration::from_millis(50));
            t
        })
        .collect();
    for h in HOSTS {
        wait_until("a slow request on every host", SOON, || {
            fleet
                .service_log(h)
                .contains(&format!("a slow request ({ms} ms) is in flight"))
                .then_some(())
        });
    }
    threads
}

/// Every server of HAProxy's `web` is `UP` and every host serves `version`.
fn assert_all_up_on(fleet: &Fleet, lb: &Haproxy, version: &str) {
    let states = lb.states().unwrap();
    assert!(states.values().all(|s| s == "UP"), "{states:?}");
    for h in HOSTS {
        assert_eq!(
            fleet.get(h).as_deref(),
            Some(format!("demo-service {version}").as_str())
        );
    }
}

/// Waits until HAProxy shows a server of `web` drained.
fn wait_drained(lb: &Haproxy) {
    wait_until("HAProxy to show a host drained", SOON, || {
        lb.states()
            .ok()?
            .values()
            .any(|s| s == "DRAIN")
            .then_some(())
    });
}

const ROLLING: &str = "min_healthy_time = \"300ms\"\nmax_parallel = 1\n";

#[test]
fn a_rolling_upgrade_drained_through_haproxy_fails_no_request_and_lets_slow_ones_finish() {
    drained_upgrade_fails_no_request("coordinator");
}

#[test]
fn a_balancer_run_by_each_hosts_agent_drains_it_as_well() {
    drained_upgrade_fails_no_request("agent");
}

/// wrk and a 2-second request on every host through HAProxy while the
/// hosts are upgraded one by one, drained by `run_on`.
fn drained_upgrade_fails_no_request(run_on: &str) {
    let Some((fleet, lb)) = fleet_behind_haproxy() else {
        return;
    };
    // A 2-second request in flight on every host before the rollout:
    // each host's drain waits for it.
    let slow = slow_requests(&fleet, &lb, 2000);
    let mut status = serde_json::Value::Null;
    let wrk = wrk_on_while(lb.front, REQUEST, || {
        status = fleet.roll("2.0.0", &format!("{ROLLING}{}", lb.plan(run_on)));
    });
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_eq!(
        (wrk.socket_errors, wrk.non_2xx),
        (0, 0),
        "requests failed through the balancer: {wrk:?}"
    );
    assert!(
        wrk.requests > 100,
        "too little load to mean anything: {wrk:?}"
    );
    for t in slow {
        let (code, body) = t.join().unwrap().expect("a slow request failed");
        assert_eq!((code, body.as_str()), (200, "demo-service 1.0.0"));
    }
    // Every server is back and runs 2.0.0; nothing was cut.
    assert_all_up_on(&fleet, &lb, "2.0.0");
    // Whoever ran the balancer's commands says so.
    let logs: Vec<String> = if run_on == "agent" {
        HOSTS.iter().map(|h| fleet.agents[*h].log_text()).collect()
    } else {
        vec![fleet.batond.proc.log_text()]
    };
    let drained = logs
        .iter()
        .map(|l| l.matches("drained").count())
        .sum::<usize>();
    assert!(drained >= 3, "{logs:?}");
    assert!(
        logs.iter().all(|l| !l.contains("connections left are cut")),
        "{logs:?}"
    );
}

#[test]
fn without_traffic_the_same_upgrade_through_haproxy_fails_requests() {
    // The negative control: the zero above is a measurement.
    let Some((fleet, lb)) = fleet_behind_haproxy() else {
        return;
    };
    let mut status = serde_json::Value::Null;
    let wrk = wrk_on_while(lb.front, REQUEST, || {
        status = fleet.roll("2.0.0", ROLLING);
    });
    assert_eq!(status["state"], "succeeded", "{status}");
    assert!(
        wrk.socket_errors + wrk.non_2xx > 0,
        "no failed request without draining: {wrk:?}"
    );
}

#[test]
fn batond_killed_while_a_host_is_drained_finishes_the_rollout_with_every_server_ready() {
    let Some((mut fleet, lb)) = fleet_behind_haproxy() else {
        return;
    };
    let allowed = format!("--balancer={}", lb.socket.display());
    // A long request holds h1 (the first host) in its drain.
    let slow = slow_requests(&fleet, &lb, 4000);
    let id = fleet.start_rollout(&format!(
        "[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\n{ROLLING}{}",
        lb.plan("coordinator")
    ));
    wait_drained(&lb);
    let addr = fleet.batond.addr.to_string();
    fleet.batond.proc.kill();
    fleet.batond = Batond::start_on(&fleet.env, &addr, "batond", &[&allowed]);
    let s = fleet.wait_done(&id, Duration::from_secs(120));
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_all_up_on(&fleet, &lb, "2.0.0");
    for t in slow {
        let (code, _) = t.join().unwrap().expect("a slow request failed");
        assert_eq!(code, 200);
    }
}

#[test]
fn a_balancer_that_does_not_answer_fails_the_host_precisely_and_the_others_keep_serving() {
    // Accepts, never answers.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_socket = format!("tcp://{}", mute.local_addr().unwrap());
    let Some((fleet, lb)) = fleet_allowing(std::slice::from_ref(&mute_socket)) else {
        return;
    };
    // A balancer batond was not told it may use is refused up front: a
    // plan is not signed, so it must not point batond anywhere it likes.
    let out = fleet.try_start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\n[service.traffic]\nkind = \"exec\"\ndrain = [\"/bin/sh\", \"-c\", \"touch /tmp/owned\"]\nready = [\"/bin/true\"]\nconnections = [\"/bin/true\"]\n",
    );
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"/bin/sh\" is not a balancer batond may use"),
        "{stderr}"
    );
    let plan = format!(
        "{ROLLING}\n[service.traffic]\nkind = \"haproxy\"\nsocket = \"tcp://{}\"\nbackend = \"web\"\n",
        mute.local_addr().unwrap()
    );
    let s = fleet.roll("2.0.0", &plan);
    // h1 failed before anything was swapped; its rollback (a health check
    // of what it runs) went on without the balancer.
    assert_eq!(s["state"], "rolled_back", "{s}");
    let error = s["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("did not answer within 5s for web/h1")
            && error.contains("nothing was changed"),
        "{error}"
    );
    let id = s["id"].as_str().unwrap();
    let failed: Vec<_> = fleet
        .events(id)
        .into_iter()
        .filter(|e| e["to"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["host"], "h1", "{failed:?}");
    assert_eq!(failed[0]["failure"], "traffic", "{failed:?}");
    // Nothing was swapped: every host serves 1.0.0 through HAProxy.
    for h in HOSTS {
        assert_eq!(fleet.get(h).as_deref(), Some("demo-service 1.0.0"));
    }
    let states = lb.states().unwrap();
    assert!(states.values().all(|s| s == "UP"), "{states:?}");
    let (code, _) = get(lb.front, "/", SOON).unwrap();
    assert_eq!(code, 200);
}

#[test]
fn an_abort_while_a_host_is_drained_puts_it_back_at_once() {
    abort_while_drained("coordinator");
}

#[test]
fn an_abort_while_an_agent_drains_its_host_puts_it_back_at_once() {
    abort_while_drained("agent");
}

fn abort_while_drained(run_on: &str) {
    let Some((fleet, lb)) = fleet_behind_haproxy() else {
        return;
    };
    // 20-second requests: the drain would wait for them; the abort does
    // not.
    let _slow = slow_requests(&fleet, &lb, 20_000);
    let id = fleet.start_rollout(&format!(
        "[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\n{ROLLING}{}",
        lb.plan(run_on).replace("10s", "60s")
    ));
    wait_drained(&lb);
    let out = fleet.baton(&["rollout", "abort", &id]);
    assert!(out.status.success(), "{out:?}");
    wait_until("every server back in HAProxy", SOON, || {
        lb.states().ok()?.values().all(|s| s == "UP").then_some(())
    });
    let s = fleet.status(&id);
    assert_eq!(s["state"], "aborted", "{s}");
    // Nothing was swapped.
    for h in HOSTS {
        assert_eq!(fleet.get(h).as_deref(), Some("demo-service 1.0.0"));
    }
}

#[test]
fn a_release_that_fails_its_health_gate_is_rolled_back_behind_the_balancer_without_a_failed_request()
 {
    let Some((fleet, lb)) = fleet_behind_haproxy() else {
        return;
    };
    fleet.push_closing_release("3.0.0", true);
    let mut status = serde_json::Value::Null;
    let wrk = wrk_on_while(lb.front, REQUEST, || {
        status = fleet.roll(
            "3.0.0",
            &format!(
                "{ROLLING}healthy_deadline = \"2s\"\n{}",
                lb.plan("coordinator")
            ),
        );
    });
    assert_eq!(status["state"], "rolled_back", "{status}");
    assert_eq!(
        (wrk.socket_errors, wrk.non_2xx),
        (0, 0),
        "requests failed through the balancer: {wrk:?}"
    );
    assert_all_up_on(&fleet, &lb, "1.0.0");
}

#[test]
fn a_server_an_operator_put_in_maintenance_stays_there() {
    let Some((fleet, lb)) = fleet_behind_haproxy() else {
        return;
    };
    assert_eq!(lb.ask("set server web/h3 state maint").unwrap().trim(), "");
    let s = fleet.roll("2.0.0", &format!("{ROLLING}{}", lb.plan("coordinator")));
    assert_eq!(s["state"], "succeeded", "{s}");
    let states = lb.states().unwrap();
    assert_eq!(states["h1"], "UP", "{states:?}");
    assert_eq!(states["h2"], "UP", "{states:?}");
    assert!(states["h3"].starts_with("MAINT"), "{states:?}");
    for h in HOSTS {
        assert_eq!(fleet.get(h).as_deref(), Some("demo-service 2.0.0"));
    }
}

#[test]
fn an_agent_killed_while_it_drains_its_host_finishes_the_rollout_with_every_server_ready() {
    let Some((mut fleet, lb)) = fleet_behind_haproxy() else {
        return;
    };
    // A long request holds h1 (the first host) in its drain.
    let slow = slow_requests(&fleet, &lb, 4000);
    let id = fleet.start_rollout(&format!(
        "[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\n{ROLLING}{}",
        lb.plan("agent")
    ));
    wait_until("HAProxy to show h1 drained", SOON, || {
        (lb.states().ok()?.get("h1")? == "DRAIN").then_some(())
    });
    // SIGKILL: the command is not journaled, so the restarted agent runs
    // it again when the coordinator re-sends it.
    fleet.agents.get_mut("h1").unwrap().kill();
    fleet.start_agent("h1");
    fleet.wait_connected();
    let s = fleet.wait_done(&id, Duration::from_secs(120));
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_all_up_on(&fleet, &lb, "2.0.0");
    for t in slow {
        let (code, _) = t.join().unwrap().expect("a slow request failed");
        assert_eq!(code, 200);
    }
}
