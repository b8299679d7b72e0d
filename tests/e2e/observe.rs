//! Seeing the fleet: Prometheus metrics from `batond` and an agent that
//! move with a real rollout, the rollout's persisted event history
//! (complete and in order, operator actions with who took them), a
//! host's activation history, and the dashboard's API: sign-in tokens,
//! read-only without one, actions only for an operator.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use baton_common::metrics::sample;
use baton_tests::fleet::Fleet;
use baton_tests::http::{get, request, scrape};
use baton_tests::{SOON, wait_until};
use serde_json::Value;

fn metric(doc: &str, name: &str) -> f64 {
    sample(doc, name).unwrap_or_else(|| panic!("no sample {name} in\n{doc}"))
}

fn json(out: &std::process::Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: not JSON: {e}"))
}

/// The address the agent's log says its metrics are served on.
fn agent_metrics_addr(fleet: &Fleet, host: &str) -> SocketAddr {
    wait_until("the agent to serve metrics", SOON, || {
        let log = fleet.agents[host].log_text();
        let line = log.lines().find(|l| l.contains("serving metrics"))?;
        let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
        addr.parse().ok()
    })
}

#[test]
fn metrics_move_with_a_rollout_and_its_events_are_complete_and_in_order() {
    let mut fleet = Fleet::start_full(
        &[("h1", &["role=web"]), ("h2", &["role=web"])],
        &[],
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
    );
    let metrics = fleet.batond.metrics.unwrap();
    fleet.agent_extra = vec!["--metrics-listen".into(), "127.0.0.1:0".into()];
    fleet.start_agent("h1");
    fleet.wait_connected();
    let agent_metrics = agent_metrics_addr(&fleet, "h1");

    fleet.install("1.0.0");
    let before = scrape(metrics);
    assert_eq!(metric(&before, "baton_hosts_connected"), 2.0);
    assert_eq!(metric(&before, "baton_hosts_disconnected"), 0.0);
    let healthy_before = metric(&before, "baton_host_activations_total{result=\"healthy\"}");
    let succeeded_before = metric(&before, "baton_rollouts{state=\"succeeded\"}");
    let activations_before = metric(&before, "baton_host_activation_duration_seconds_count");
    let waits_before = metric(&before, "baton_health_wait_duration_seconds_count");
    // h1's agent restarted with its metrics: a reconnect of a known host.
    assert!(
        metric(&before, "baton_stream_reconnects_total") >= 1.0,
        "{before}"
    );
    let agent_before = scrape(agent_metrics);
    assert_eq!(metric(&agent_before, "baton_agent_connected"), 1.0);

    // One host at a time, each kept a second in its health gate: slow
    // enough to be paused before it ends.
    fleet.release("2.0.0", false);
    let id = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\nmax_parallel = 1\nmin_healthy_time = \"1s\"\n",
    );
    let out = fleet.baton(&["rollout", "pause", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fleet.wait_status(&id, "the rollout to pause", |s| s["state"] == "paused");
    let out = fleet.baton(&["rollout", "resume", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = fleet.wait_done(&id, Duration::from_secs(90));
    assert_eq!(done["state"], "succeeded", "{done}");

    let after = scrape(metrics);
    assert_eq!(
        metric(&after, "baton_host_activations_total{result=\"healthy\"}") - healthy_before,
        2.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "baton_rollouts{state=\"succeeded\"}") - succeeded_before,
        1.0
    );
    assert_eq!(metric(&after, "baton_rollouts{state=\"paused\"}"), 0.0);
    assert_eq!(
        metric(&after, "baton_host_activation_duration_seconds_count") - activations_before,
        2.0
    );
    // Every activation held its health gate for at least the second.
    assert_eq!(
        metric(&after, "baton_health_wait_duration_seconds_count") - waits_before,
        2.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "baton_health_wait_duration_seconds_bucket{le=\"0.5\"}"
        ),
        metric(
            &before,
            "baton_health_wait_duration_seconds_bucket{le=\"0.5\"}"
        ),
        "a health wait under the 1 s min_healthy_time: {after}"
    );
    let agent_after = scrape(agent_metrics);
    assert_eq!(
        metric(
            &agent_after,
            "baton_agent_commands_total{kind=\"activate\",result=\"succeeded\"}"
        ),
        metric(
            &agent_before,
            "baton_agent_commands_total{kind=\"activate\",result=\"succeeded\"}"
        ) + 1.0,
        "{agent_after}"
    );
    assert!(
        metric(
            &agent_after,
            "baton_agent_health_wait_duration_seconds_count"
        ) > metric(
            &agent_before,
            "baton_agent_health_wait_duration_seconds_count"
        )
    );

    // A clean deploy is no health failure: the new process's first
    // probes, before it answers, are not counted.
    assert_eq!(
        metric(&agent_after, "baton_agent_health_check_failures_total"),
        metric(&agent_before, "baton_agent_health_check_failures_total"),
        "{agent_after}"
    );
    // Per service, the build, the process.
    assert_eq!(
        metric(
            &agent_after,
            "baton_agent_service_up{service=\"demo\",version=\"2.0.0\"}"
        ),
        1.0,
        "{agent_after}"
    );
    assert_eq!(
        metric(
            &agent_after,
            "baton_agent_service_healthy{service=\"demo\",version=\"2.0.0\"}"
        ),
        1.0,
        "{agent_after}"
    );
    for doc in [&agent_after, &after] {
        assert!(doc.contains("baton_build_info{program=\""), "{doc}");
        assert!(metric(doc, "process_resident_memory_bytes") > 0.0, "{doc}");
        assert!(metric(doc, "process_open_fds") > 0.0, "{doc}");
    }

    // The history: complete, numbered without gaps, in time order.
    let events = fleet.events(&id);
    let at: Vec<&str> = events.iter().map(|e| e["at"].as_str().unwrap()).collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]), "{at:?}");
    let first = &events[0];
    assert_eq!(
        (first["kind"].as_str(), first["to"].as_str()),
        (Some("rollout"), Some("pending"))
    );
    assert!(
        first["who"].as_str().unwrap().starts_with("operator "),
        "{first}"
    );
    assert!(
        first["message"]
            .as_str()
            .unwrap()
            .contains("demo 2.0.0 on 2 hosts"),
        "{first}"
    );
    let operator: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["kind"] == "operator")
        .map(|e| (e["to"].as_str().unwrap(), e["who"].as_str().unwrap()))
        .collect();
    assert_eq!(operator.len(), 2, "{operator:?}");
    assert_eq!(operator[0].0, "pause");
    assert_eq!(operator[1].0, "resume");
    assert!(operator.iter().all(|(_, who)| who.starts_with("operator ")));
    let rollout_states: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "rollout")
        .map(|e| e["to"].as_str().unwrap())
        .collect();
    assert!(rollout_states.contains(&"paused"), "{rollout_states:?}");
    assert_eq!(rollout_states.last(), Some(&"succeeded"));
    let mut hosts: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in events.iter().filter(|e| e["kind"] == "host") {
        assert_eq!(e["service"], "demo");
        hosts
            .entry(e["host"].as_str().unwrap())
            .or_default()
            .push(e["to"].as_str().unwrap());
    }
    for host in ["h1", "h2"] {
        assert_eq!(
            hosts[host],
            ["staging", "staged", "activating", "healthy"],
            "{host}"
        );
    }
    let services: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "service" && !e["to"].as_str().unwrap_or("").is_empty())
        .map(|e| e["to"].as_str().unwrap())
        .collect();
    assert_eq!(services.last(), Some(&"succeeded"), "{services:?}");
    // The text form has a line per event.
    let text = fleet.baton(&["rollout", "events", &id]);
    assert_eq!(
        String::from_utf8_lossy(&text.stdout).lines().count(),
        events.len()
    );
    let out = fleet.baton(&["rollout", "events", "r-nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no rollout has an id starting with"));
    assert_eq!(out.status.code(), Some(4), "not found is refused");

    // A host's history: this rollout on top, with both versions.
    let history = json(
        &fleet.baton(&["hosts", "h2", "--history", "--json"]),
        "history",
    );
    let top = &history[0];
    assert_eq!(top["rollout_id"], id.as_str());
    assert_eq!(
        (top["from_version"].as_str(), top["to_version"].as_str()),
        (Some("1.0.0"), Some("2.0.0"))
    );
    assert_eq!(top["state"], "healthy");
    assert!(top["finished_at"].as_str().is_some());
    let one = json(&fleet.baton(&["hosts", "h1", "--json"]), "hosts h1");
    assert_eq!(one["host_id"], "h1");
    assert_eq!(one["services"][0]["version"], "2.0.0");
    let out = fleet.baton(&["hosts", "nope", "--history"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no host nope"),
        "{out:?}"
    );

    // A version that never turns healthy: its first host fails (and is
    // rolled back with the rollout), which the counters and the history
    // say.
    let before = scrape(metrics);
    fleet.release("3.0.0", true);
    let id = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"3.0.0\"\nmax_parallel = 1\nmin_healthy_time = \"500ms\"\nhealthy_deadline = \"2s\"\n",
    );
    let done = fleet.wait_done(&id, Duration::from_secs(90));
    assert_eq!(done["state"], "rolled_back", "{done}");
    let after = scrape(metrics);
    let moved = |name: &str| metric(&after, name) - metric(&before, name);
    assert_eq!(
        moved("baton_host_activations_total{result=\"failed\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        moved("baton_host_activations_total{result=\"rolled_back\"}"),
        1.0
    );
    assert_eq!(
        moved("baton_host_activations_total{result=\"healthy\"}"),
        0.0
    );
    assert_eq!(moved("baton_host_activation_duration_seconds_count"), 1.0);
    assert_eq!(moved("baton_rollouts{state=\"rolled_back\"}"), 1.0);
    // By the kind the agent reported; every kind shows from the start.
    assert_eq!(
        moved("baton_host_failures_total{kind=\"not_healthy\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(moved("baton_host_failures_total{kind=\"signature\"}"), 0.0);
    assert!(before.contains("baton_host_failures_total{kind=\"stop_timeout\"} 0"));
    let events = fleet.events(&id);
    let failed: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["kind"] == "host" && e["from"] != "pending" && e["from"] != "staging")
        .map(|e| (e["from"].as_str().unwrap(), e["to"].as_str().unwrap()))
        .collect();
    assert_eq!(
        failed,
        [
            ("staged", "activating"),
            ("activating", "failed"),
            ("failed", "rolling_back"),
            ("rolling_back", "rolled_back")
        ],
        "{events:?}"
    );
}

#[test]
fn the_dashboard_reads_freely_and_acts_only_for_a_signed_in_operator() {
    let fleet = Fleet::start_full(
        &[("h1", &["role=web"])],
        &[],
        &["--http-listen", "127.0.0.1:0"],
    );
    let web = fleet.batond.dashboard.unwrap();
    fleet.install("1.0.0");

    // The page and its assets come from the binary, under a strict policy.
    let page = get(web, "/");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("/assets/app.js"));
    assert!(
        page.header("content-security-policy")
            .unwrap()
            .contains("default-src 'self'")
    );
    assert_eq!(get(web, "/assets/app.js").status, 200);
    assert_eq!(get(web, "/assets/app.css").status, 200);

    // Reading needs no sign-in.
    let state = get(web, "/api/state").json();
    assert_eq!(state["session"], Value::Null);
    assert_eq!(state["hosts"][0]["host_id"], "h1");
    assert_eq!(state["hosts"][0]["services"][0]["version"], "1.0.0");

    fleet.release("2.0.0", false);
    let id = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\nmin_healthy_time = \"30s\"\nhealthy_deadline = \"60s\"\n",
    );
    let pause = format!("/api/rollouts/{id}/pause");
    let act = |cookie: &str| {
        request(
            web,
            "POST",
            &pause,
            &[("cookie", cookie), ("x-baton-action", "1")],
            "",
        )
        .unwrap()
    };

    // Not signed in, a wrong token, a viewer's token: refused.
    assert_eq!(act("").status, 401);
    let bad = request(
        web,
        "POST",
        "/api/login",
        &[("content-type", "application/json")],
        r#"{"token":"btd1-nope"}"#,
    )
    .unwrap();
    assert_eq!(bad.status, 401, "{}", bad.body);
    let token = |role: &str| {
        let out = fleet.baton(&["dashboard", "token", "--role", role, "--json"]);
        json(&out, "dashboard token")["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let viewer = token("viewer");
    let answer = act(&format!("baton_session={viewer}"));
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert!(answer.body.contains("needs operator"), "{}", answer.body);

    // An operator signs in; the cookie it gets acts, but only with the
    // action header (a cross-site form cannot send one).
    let operator = token("operator");
    let login = request(
        web,
        "POST",
        "/api/login",
        &[("content-type", "application/json")],
        &format!(r#"{{"token":"{operator}"}}"#),
    )
    .unwrap();
    assert_eq!(login.status, 200, "{}", login.body);
    let cookie = login.header("set-cookie").unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_owned();
    let no_header = request(web, "POST", &pause, &[("cookie", &session)], "").unwrap();
    assert_eq!(no_header.status, 403);
    let state = request(web, "GET", "/api/state", &[("cookie", &session)], "")
        .unwrap()
        .json();
    assert_eq!(state["session"]["role"], "operator");
    assert_eq!(state["session"]["can_act"], true);
    let paused = act(&session);
    assert_eq!(paused.status, 200, "{}", paused.body);
    assert_eq!(paused.json()["state"], "paused");
    assert_eq!(fleet.status(&id)["state"], "paused");
    // Again: the machine refuses, and says why.
    let again = act(&session);
    assert_eq!(again.status, 409, "{}", again.body);

    // The history names the dashboard user.
    let detail = get(web, &format!("/api/rollouts/{id}")).json();
    let pause_event = detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "operator")
        .unwrap()
        .clone();
    assert_eq!(pause_event["to"], "pause");
    assert!(
        pause_event["who"]
            .as_str()
            .unwrap()
            .ends_with("(dashboard)"),
        "{pause_event}"
    );

    // A viewer certificate cannot mint an operator token.
    let out = baton_tests::bin_command("baton")
        .arg("--tls-dir")
        .arg(fleet.env.tls())
        .args(["certs", "issue-operator", "eve", "--role", "viewer"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let tls = fleet.env.tls();
    let cert = tls.join("eve.pem");
    let key = tls.join("eve-key.pem");
    let out = fleet.baton(&[
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "dashboard",
        "token",
        "--role",
        "operator",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a certificate with that role"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = fleet.baton(&["rollout", "abort", &id]);
    assert!(out.status.success());
}

#[test]
fn a_real_prometheus_scrapes_batond_and_an_agent() {
    let Some(prometheus) = baton_tests::prometheus::binary() else {
        return;
    };
    let mut fleet = Fleet::start_full(
        &[("h1", &["role=web"])],
        &[],
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let coordinator = fleet.batond.metrics.unwrap();
    fleet.agent_extra = vec!["--metrics-listen".into(), "127.0.0.1:0".into()];
    fleet.start_agent("h1");
    fleet.wait_connected();
    let agent = agent_metrics_addr(&fleet, "h1");
    let server = baton_tests::prometheus::Prometheus::start(
        prometheus,
        &fleet.env,
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: batond\n    static_configs:\n      - targets: ['{coordinator}']\n  - job_name: agent\n    static_configs:\n      - targets: ['{agent}']\n"
        ),
    );
    let api = server.api;
    // Prometheus reads both documents: both targets up, and the samples
    // there with their names and labels.
    let query = |q: &str| -> Option<Value> {
        let a = request(api, "GET", &format!("/api/v1/query?query={q}"), &[], "").ok()?;
        let v: Value = serde_json::from_str(&a.body).ok()?;
        let result = v["data"]["result"].as_array()?.clone();
        (!result.is_empty()).then_some(Value::Array(result))
    };
    wait_until("both targets to be up in Prometheus", SOON, || {
        let up = query("up")?;
        (up.as_array()?.len() == 2 && up.as_array()?.iter().all(|r| r["value"][1] == "1"))
            .then_some(())
    });
    let connects = wait_until("a batond counter in Prometheus", SOON, || {
        query("baton_stream_connects_total")
    });
    assert!(connects[0]["metric"]["job"] == "batond", "{connects}");
    let info = wait_until("the agent's build info in Prometheus", SOON, || {
        query("baton_build_info%7Bprogram%3D%22baton-agent%22%7D")
    });
    assert_eq!(
        info[0]["metric"]["version"],
        env!("CARGO_PKG_VERSION"),
        "{info}"
    );
    let connected = wait_until("the agent's gauge in Prometheus", SOON, || {
        query("baton_agent_connected")
    });
    assert_eq!(connected[0]["value"][1], "1", "{connected}");
}

#[test]
fn the_example_alert_rules_pass_promtool_and_name_only_metrics_baton_exports() {
    let Some(promtool) = baton_tests::prometheus::on_path("promtool") else {
        assert!(
            std::env::var_os("BATON_REQUIRE_PROMETHEUS").is_none(),
            "BATON_REQUIRE_PROMETHEUS is set but no promtool is on the PATH"
        );
        eprintln!("SKIPPED: no promtool on the PATH");
        return;
    };
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/guides/observability/alerts.yml");
    let out = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every baton_ metric a rule names is one the daemons export.
    let text = std::fs::read_to_string(&rules).unwrap();
    let exported = [
        baton_coordinator::metrics::Metrics::default().render(Some(Default::default())),
        std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../docs/guides/observability.md"),
        )
        .unwrap(),
    ]
    .join("\n");
    for name in text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("baton_"))
    {
        assert!(
            exported.contains(name),
            "alerts.yml names {name}, which nothing exports"
        );
    }
}
