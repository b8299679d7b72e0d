//! Analysis end to end: real agents scrape the demo service's own
//! `/metrics` while a paced client sends it traffic, and the coordinator
//! judges the new version against the hosts still on the old one. A
//! release whose health check passes but which fails 5 % of its requests
//! is stopped after its first batch and rolled back, with the numbers in
//! `status`; the same behaviour in both versions passes; no data never
//! passes; a real Prometheus decides a `prometheus` check; a freeze holds
//! a rollout and `pause --all` stops the line.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use baton_tests::fleet::Fleet;
use baton_tests::{SOON, wait_until};
use serde_json::Value;

const HOSTS: [&str; 4] = ["h1", "h2", "h3", "h4"];

/// Packs and pushes `version` of the demo service answering `error_rate`
/// of its requests with 500 (its health check passes regardless).
pub(crate) fn release(fleet: &Fleet, version: &str, error_rate: f64) {
    let dir = fleet.env.path(&format!("src-{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("service.toml"),
        format!(
            r#"command = {:?}
args = ["demo-service", "--listen", "127.0.0.1:${{port}}", "--version", "{version}", "--error-rate", "{error_rate}"]
listen = ["tcp://127.0.0.1:${{port}}"]
ready = "notify"
stop_timeout = "5s"

[health]
kind = "http"
url = "http://127.0.0.1:${{port}}/healthz"
interval = "200ms"
timeout = "1s"
"#,
            baton_tests::bin("baton").display().to_string()
        ),
    )
    .unwrap();
    let file = fleet.pack_with(&dir, version, &fleet.env.path("release.key"));
    fleet.push(&file);
}

/// Installs `version` everywhere at once.
pub(crate) fn install(fleet: &Fleet, version: &str, error_rate: f64) {
    release(fleet, version, error_rate);
    let id = fleet.start_rollout(&format!(
        "[[service]]\nname = \"demo\"\nversion = \"{version}\"\nhosts = {{ role = \"web\" }}\nstrategy = \"all-at-once\"\nmin_healthy_time = \"200ms\"\n"
    ));
    assert_eq!(fleet.wait_done(&id, SOON)["state"], "succeeded");
}

/// One client per host sending `GET /` about 60 times a second until
/// dropped: paced, so the machine is not saturated.
pub(crate) struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    pub(crate) fn start(fleet: &Fleet) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = fleet
            .ports
            .keys()
            .map(|h| {
                let addr = fleet.addr(h);
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _ = baton_tests::load::get(addr, "/", Duration::from_secs(2));
                        std::thread::sleep(Duration::from_millis(15));
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub(crate) fn plan(version: &str, check: &str) -> String {
    format!(
        r#"[[service]]
name = "demo"
version = "{version}"
max_parallel = 2
min_healthy_time = "200ms"

[[service.analysis]]
name = "errors"
kind = "metrics"
url = "http://127.0.0.1:${{port}}/metrics"
ratio = ["app_errors_total", "app_requests_total"]
{check}
"#
    )
}

pub(crate) const BASELINE: &str =
    "baseline = true\ntolerance = 0.5\ninterval = \"500ms\"\nduration = \"5s\"\nmin_samples = 4\n";

fn verdicts(status: &Value) -> Vec<Value> {
    status["services"][0]["analysis"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_release_that_passes_its_health_check_but_fails_requests_is_rolled_back_after_its_first_batch()
{
    let fleet = Fleet::start(&HOSTS);
    install(&fleet, "1.0.0", 0.0);
    release(&fleet, "2.0.0", 0.05);
    let _traffic = Traffic::start(&fleet);
    let id = fleet.start_rollout(&plan("2.0.0", BASELINE));
    let s = fleet.wait_done(&id, Duration::from_secs(120));
    assert_eq!(s["state"], "rolled_back", "{s:#}");
    let v = verdicts(&s);
    assert_eq!(v.len(), 1, "one bake, after the first batch: {v:#?}");
    assert_eq!(v[0]["verdict"], "fail", "{v:#?}");
    assert_eq!(v[0]["step"], 1);
    // The numbers it was decided on.
    let value = v[0]["value"].as_f64().unwrap();
    assert!((0.03..0.08).contains(&value), "{v:#?}");
    assert_eq!(v[0]["baseline"].as_f64(), Some(0.0), "{v:#?}");
    assert!(v[0]["p_value"].as_f64().unwrap() < 0.01, "{v:#?}");
    assert!(v[0]["samples"].as_u64().unwrap() >= 4);
    assert!(v[0]["reason"].as_str().unwrap().contains("Mann-Whitney"));
    // The first batch (two hosts) failed by analysis and went back; the
    // others were never touched.
    let hosts = Fleet::hosts_of(&s);
    let judged: Vec<&String> = hosts
        .iter()
        .filter(|(_, h)| h["failure"] == "analysis")
        .map(|(id, _)| id)
        .collect();
    assert_eq!(judged.len(), 2, "{s:#}");
    for h in HOSTS {
        assert_eq!(fleet.get(h).as_deref(), Some("demo-service 1.0.0"));
    }
    for h in hosts.values() {
        assert!(
            matches!(h["state"].as_str(), Some("rolled_back" | "staged")),
            "{h}"
        );
    }
    // In the events, and in the text status.
    let events = fleet.events(&id);
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "analysis" && e["to"] == "baking"),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "analysis" && e["to"] == "fail"),
        "{events:#?}"
    );
    let text = String::from_utf8(fleet.baton(&["rollout", "status", &id]).stdout).unwrap();
    assert!(text.contains("analysis errors (step 1): FAIL"), "{text}");
}

#[test]
fn the_same_behaviour_in_both_versions_passes() {
    let fleet = Fleet::start(&HOSTS);
    install(&fleet, "1.0.0", 0.05);
    release(&fleet, "2.0.0", 0.05);
    let _traffic = Traffic::start(&fleet);
    let id = fleet.start_rollout(&plan("2.0.0", BASELINE));
    let s = fleet.wait_done(&id, Duration::from_secs(120));
    assert_eq!(s["state"], "succeeded", "{s:#}");
    let v = verdicts(&s);
    // After the first batch compared with the baseline: pass; after the
    // last, no host is left on the old version: skipped.
    let outcomes: Vec<&str> = v.iter().map(|v| v["verdict"].as_str().unwrap()).collect();
    assert_eq!(outcomes, vec!["pass", "skipped"], "{v:#?}");
    assert!(v[0]["baseline_samples"].as_u64().unwrap() >= 4, "{v:#?}");
}

#[test]
fn a_check_with_no_data_never_passes() {
    let fleet = Fleet::start(&HOSTS[..2]);
    install(&fleet, "1.0.0", 0.0);
    release(&fleet, "2.0.0", 0.0);
    // No traffic at all: the counters never move.
    let id = fleet.start_rollout(&plan(
        "2.0.0",
        "max = 0.5\ninterval = \"500ms\"\nduration = \"3s\"\nmin_samples = 3\n",
    ));
    let s = fleet.wait_status(&id, "the rollout to pause for an operator", |s| {
        s["state"] == "paused"
    });
    let v = verdicts(&s);
    assert_eq!(v[0]["verdict"], "inconclusive", "{v:#?}");
    assert!(
        v[0]["reason"].as_str().unwrap().contains("no traffic"),
        "{v:#?}"
    );
    // An operator decides: roll it back.
    let out = fleet.baton(&["rollout", "rollback", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fleet.wait_done(&id, SOON)["state"], "rolled_back");

    // A check whose endpoint does not answer, with on_inconclusive =
    // "fail": the errors are never a pass either.
    let id = fleet.start_rollout(&format!(
        "{}on_inconclusive = \"fail\"\n",
        plan(
            "2.0.0",
            "max = 0.5\ninterval = \"500ms\"\nduration = \"2s\"\nmin_samples = 2\n"
        )
        .replace("${port}/metrics", "1/metrics")
    ));
    let s = fleet.wait_done(&id, Duration::from_secs(60));
    assert_eq!(s["state"], "rolled_back", "{s:#}");
    let v = verdicts(&s);
    assert_eq!(v[0]["verdict"], "inconclusive", "{v:#?}");
    assert!(
        v[0]["reason"]
            .as_str()
            .unwrap()
            .contains("scrape(s) failed"),
        "{v:#?}"
    );
}

#[test]
fn a_prometheus_check_against_a_real_prometheus_decides_a_rollout() {
    let Some(binary) = baton_tests::prometheus::binary() else {
        return;
    };
    let hosts: Vec<(&str, &[&str])> = HOSTS[..2].iter().map(|h| (*h, &["role=web"][..])).collect();
    // batond is told Prometheus' URL first; Prometheus starts once the
    // services' ports are known.
    let prom_port = baton_tests::fleet::free_port();
    let prom_url = format!("http://127.0.0.1:{prom_port}");
    let fleet = Fleet::start_full(&hosts, &[], &["--prometheus-url", &prom_url]);
    let targets: Vec<String> = HOSTS[..2]
        .iter()
        .map(|h| {
            format!(
                "      - targets: ['127.0.0.1:{}']\n        labels: {{ host: '{h}' }}\n",
                fleet.ports[*h]
            )
        })
        .collect();
    let config = format!(
        "global:\n  scrape_interval: 500ms\nscrape_configs:\n  - job_name: demo\n    static_configs:\n{}",
        targets.join("")
    );
    let server =
        baton_tests::prometheus::Prometheus::start_on(binary, &fleet.env, &config, prom_port);
    install(&fleet, "1.0.0", 0.0);
    release(&fleet, "2.0.0", 0.2);
    let _traffic = Traffic::start(&fleet);
    wait_until("Prometheus to scrape both services", SOON, || {
        let (code, body) =
            baton_tests::load::get(server.api, "/api/v1/query?query=up", Duration::from_secs(2))
                .ok()?;
        (code == 200 && body.matches("\"1\"").count() >= 2).then_some(())
    });
    let id = fleet.start_rollout(
        r#"[[service]]
name = "demo"
version = "2.0.0"
max_parallel = 1
min_healthy_time = "200ms"

[[service.analysis]]
name = "error-ratio"
kind = "prometheus"
query = 'sum(rate(app_errors_total{host="${host}"}[3s])) / sum(rate(app_requests_total{host="${host}"}[3s]))'
max = 0.05
interval = "1s"
duration = "15s"
failure_limit = 2
inconclusive_limit = 10
"#,
    );
    let s = fleet.wait_done(&id, Duration::from_secs(120));
    assert_eq!(s["state"], "rolled_back", "{s:#}");
    let v = verdicts(&s);
    assert_eq!(v[0]["kind"], "prometheus");
    assert_eq!(v[0]["verdict"], "fail", "{v:#?}");
    assert!(v[0]["value"].as_f64().unwrap() > 0.05, "{v:#?}");
}

#[test]
fn a_freeze_holds_a_rollout_and_stop_the_line_pauses_every_one() {
    let fleet = Fleet::start(&HOSTS[..2]);
    install(&fleet, "1.0.0", 0.0);
    release(&fleet, "2.0.0", 0.0);
    let out = fleet.baton(&[
        "freeze",
        "--until",
        "1h",
        "--reason",
        "incident 4711",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(f["frozen"], true);
    assert!(f["held"].as_str().unwrap().contains("incident 4711"), "{f}");
    let id = fleet.start_rollout(
        "progress_deadline = \"2s\"\n[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\nmin_healthy_time = \"200ms\"\n",
    );
    // Held: pending, and the held time is no stall (progress_deadline 2s).
    let s = fleet.wait_status(&id, "the rollout to say it is held", |s| {
        !s["held"].is_null()
    });
    assert_eq!(s["state"], "pending", "{s:#}");
    // (Waiting out the deadline on purpose: nothing may happen in it.)
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fleet.status(&id)["state"], "pending");
    // A bad --until is refused and changes nothing.
    let bad = fleet.baton(&["freeze", "--until", "yesterday-ish"]);
    assert_eq!(bad.status.code(), Some(2));
    let out = fleet.baton(&["unfreeze"]);
    assert!(out.status.success());
    let s = fleet.wait_done(&id, SOON);
    assert_eq!(s["state"], "succeeded", "{s:#}");
    // The audit log has both.
    let audit = String::from_utf8(fleet.baton(&["audit", "--json"]).stdout).unwrap();
    assert!(
        audit.contains("Freeze") && audit.contains("Unfreeze"),
        "{audit}"
    );

    // Stop the line: every running rollout pauses at once.
    release(&fleet, "3.0.0", 0.0);
    let id = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"3.0.0\"\nmin_healthy_time = \"3s\"\n",
    );
    fleet.wait_status(&id, "an activation", |s| {
        Fleet::hosts_of(s)
            .values()
            .any(|h| h["state"] == "activating" || h["state"] == "healthy")
    });
    let out = fleet.baton(&["rollout", "pause", "--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));
    assert_eq!(fleet.status(&id)["state"], "paused");
    let out = fleet.baton(&["rollout", "resume", &id]);
    assert!(out.status.success());
    assert_eq!(fleet.wait_done(&id, SOON)["state"], "succeeded");
}

#[test]
fn batond_killed_during_a_bake_keeps_the_verdicts_reached_and_bakes_again() {
    let mut fleet = Fleet::start(&HOSTS);
    install(&fleet, "1.0.0", 0.05);
    release(&fleet, "2.0.0", 0.05);
    let _traffic = Traffic::start(&fleet);
    // Batches of one: a verdict after the first, then a second bake.
    let id = fleet
        .start_rollout(&plan("2.0.0", BASELINE).replace("max_parallel = 2", "max_parallel = 1"));
    fleet.wait_status(&id, "the first verdict and the second bake", |s| {
        verdicts(s).len() == 1 && s["services"][0]["baking"]["step"] == 2
    });
    let addr = fleet.batond.addr.to_string();
    fleet.batond.proc.kill();
    fleet.batond = baton_tests::Batond::start_on(&fleet.env, &addr, "batond", &[]);
    let s = fleet.wait_done(&id, Duration::from_secs(120));
    assert_eq!(s["state"], "succeeded", "{s:#}");
    let v = verdicts(&s);
    let steps: Vec<(u64, &str)> = v
        .iter()
        .map(|v| (v["step"].as_u64().unwrap(), v["verdict"].as_str().unwrap()))
        .collect();
    // The first verdict survived; the interrupted bake ran again, once.
    assert_eq!(
        steps,
        vec![(1, "pass"), (2, "pass"), (3, "pass"), (4, "skipped")],
        "{v:#?}"
    );
}

#[test]
fn an_approval_needs_an_operator_other_than_the_starter() {
    let fleet = Fleet::start_full(
        &[("h1", &["role=web"]), ("h2", &["role=web"])],
        &[],
        &["--http-listen", "127.0.0.1:0"],
    );
    install(&fleet, "1.0.0", 0.0);
    release(&fleet, "2.0.0", 0.0);
    let out = baton_tests::bin_command("baton")
        .arg("--tls-dir")
        .arg(fleet.env.tls())
        .args(["certs", "issue-operator", "bob", "--role", "operator"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let id = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\napproval = true\nmin_healthy_time = \"200ms\"\n",
    );
    let s = fleet.wait_status(&id, "the rollout to await approval", |s| {
        s["state"] == "awaiting_promotion"
    });
    assert_eq!(s["services"][0]["approval"], true);
    assert!(
        Fleet::hosts_of(&s).values().all(|h| h["state"] == "staged"),
        "{s:#}"
    );
    // The starter cannot approve their own rollout.
    let out = fleet.baton(&["rollout", "promote", &id]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("other than the one who started it"), "{err}");
    assert_eq!(fleet.status(&id)["state"], "awaiting_promotion");
    // Nor through the dashboard, signed in as themselves.
    let out = fleet.baton(&["dashboard", "token", "--role", "operator", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let token: Value = serde_json::from_slice(&out.stdout).unwrap();
    let web = fleet.batond.dashboard.unwrap();
    let answer = baton_tests::http::request(
        web,
        "POST",
        &format!("/api/rollouts/{id}/promote"),
        &[
            (
                "cookie",
                &format!("baton_session={}", token["token"].as_str().unwrap()),
            ),
            ("x-baton-action", "1"),
        ],
        "",
    )
    .unwrap();
    assert_eq!(answer.status, 409, "{}", answer.body);
    assert!(
        answer.body.contains("other than the one who started it"),
        "{}",
        answer.body
    );
    assert_eq!(fleet.status(&id)["state"], "awaiting_promotion");
    // Another operator can.
    let tls = fleet.env.tls();
    let bob = |f: &str| tls.join(f).to_str().unwrap().to_owned();
    let out = fleet.baton(&[
        "--cert",
        &bob("bob.pem"),
        "--key",
        &bob("bob-key.pem"),
        "rollout",
        "promote",
        &id,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fleet.wait_done(&id, SOON)["state"], "succeeded");
    let events = fleet.events(&id);
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "operator" && e["who"] == "operator bob"),
        "{events:#?}"
    );
}

#[test]
fn a_freeze_that_ends_while_batond_is_down_lets_its_held_rollouts_go_on() {
    let mut fleet = Fleet::start(&HOSTS[..2]);
    install(&fleet, "1.0.0", 0.0);
    release(&fleet, "2.0.0", 0.0);
    let out = fleet.baton(&["freeze", "--until", "3s", "--reason", "short"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = fleet.start_rollout(
        "progress_deadline = \"2s\"\n[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\nmin_healthy_time = \"200ms\"\n",
    );
    fleet.wait_status(&id, "the rollout to be held", |s| !s["held"].is_null());
    let addr = fleet.batond.addr.to_string();
    fleet.batond.proc.kill();
    // The freeze ends, and the held time passes progress_deadline, while
    // batond is down.
    std::thread::sleep(Duration::from_secs(4));
    fleet.batond = baton_tests::Batond::start_on(&fleet.env, &addr, "batond", &[]);
    let s = fleet.wait_done(&id, Duration::from_secs(60));
    assert_eq!(s["state"], "succeeded", "{s:#}");
}
