//! Whole-system upgrades: several services in dependency order, version
//! requirements, canaries and the system-wide rollback — on real agents
//! running real services.

use std::time::Duration;

use baton_tests::fleet::Fleet;
use baton_tests::wait_until;
use serde_json::Value;

const ROLLOUT: Duration = Duration::from_secs(120);

/// Six hosts: db on h1–h2, api on h3–h4, web on h5–h6 (with a zone label
/// each, so selectors can use two labels).
fn system() -> Fleet {
    Fleet::start_labeled(
        &[
            ("h1", &["role=db", "zone=a"]),
            ("h2", &["role=db", "zone=b"]),
            ("h3", &["role=api", "zone=a"]),
            ("h4", &["role=api", "zone=b"]),
            ("h5", &["role=web", "zone=a"]),
            ("h6", &["role=web", "zone=b"]),
        ],
        &["db", "api", "web"],
    )
}

const MIGRATE: &str =
    "\n[hooks]\npre_start = [\"/bin/sh\", \"-c\", \"echo migrating the schema to v2\"]\n";

/// Installs db/api/web 1.0.0 and pushes the 2.0.0 releases (`web_broken`:
/// web 2.0.0 never turns healthy).
fn installed(web_broken: bool) -> Fleet {
    let fleet = system();
    for svc in ["db", "api", "web"] {
        fleet.service_release(svc, "1.0.0", false, "");
    }
    let install = "[[service]]\nname = \"db\"\nversion = \"1.0.0\"\nhosts = { role = \"db\" }\nstrategy = \"all-at-once\"\nmin_healthy_time = \"200ms\"\n\n[[service]]\nname = \"api\"\nversion = \"1.0.0\"\nhosts = { role = \"api\" }\nstrategy = \"all-at-once\"\nmin_healthy_time = \"200ms\"\n\n[[service]]\nname = \"web\"\nversion = \"1.0.0\"\nhosts = { role = \"web\" }\nstrategy = \"all-at-once\"\nmin_healthy_time = \"200ms\"\n";
    let id = fleet.start_rollout(install);
    let s = fleet.wait_done(&id, ROLLOUT);
    assert_eq!(s["state"], "succeeded", "{s}");
    fleet.service_release("db", "2.0.0", false, MIGRATE);
    fleet.service_release("api", "2.0.0", false, "");
    fleet.service_release("web", "2.0.0", web_broken, "");
    fleet
}

const UPGRADE: &str = r#"
auto_rollback = true

[[service]]
name = "web"
version = "2.0.0"
depends_on = ["api"]
requires = { api = ">=2.0" }
min_healthy_time = "500ms"
healthy_deadline = "3s"

[[service]]
name = "api"
version = "2.0.0"
depends_on = ["db"]
min_healthy_time = "500ms"

[[service]]
name = "db"
version = "2.0.0"
hosts = { role = "db", zone = "a" }
min_healthy_time = "500ms"
"#;

fn service<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .unwrap_or_else(|| panic!("no service {name} in {s}"))
}

fn times(s: &Value, name: &str, key: &str) -> Vec<String> {
    let mut t: Vec<String> = service(s, name)["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h[key].as_str().map(str::to_owned))
        .collect();
    t.sort();
    t
}

#[test]
fn a_system_upgrades_in_dependency_order() {
    let fleet = installed(false);
    // A dry run first: the waves, and nothing changes.
    let path = fleet.env.path("upgrade.toml");
    std::fs::write(&path, UPGRADE).unwrap();
    let out = fleet.baton(&["rollout", "plan", path.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let waves: Vec<Vec<&str>> = plan["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            w.as_array()
                .unwrap()
                .iter()
                .map(|s| s["name"].as_str().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(waves, vec![vec!["db"], vec!["api"], vec!["web"]]);
    assert_eq!(
        plan["waves"][0][0]["batches"][0]["hosts"],
        serde_json::json!(["h1"])
    );
    let list = fleet.baton(&["rollout", "list", "--json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&list.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1,
        "the dry run created a rollout"
    );

    let id = fleet.start_rollout(UPGRADE);
    let s = fleet.wait_done(&id, ROLLOUT);
    assert_eq!(s["state"], "succeeded", "{s}");
    // The order holds: each service starts after the one it depends on
    // finished on every host.
    let db_done = times(&s, "db", "finished_at").pop().unwrap();
    let api_start = times(&s, "api", "started_at").remove(0);
    let api_done = times(&s, "api", "finished_at").pop().unwrap();
    let web_start = times(&s, "web", "started_at").remove(0);
    assert!(
        db_done <= api_start,
        "api started {api_start} before db finished {db_done}"
    );
    assert!(
        api_done <= web_start,
        "web started {web_start} before api finished {api_done}"
    );
    for (host, svc, v) in [
        ("h1", "db", "2.0.0"),
        ("h2", "db", "1.0.0"), // not selected: zone = b
        ("h3", "api", "2.0.0"),
        ("h4", "api", "2.0.0"),
        ("h5", "web", "2.0.0"),
        ("h6", "web", "2.0.0"),
    ] {
        assert_eq!(
            fleet.get_svc(host, svc),
            Some(format!("demo-service {svc} {v}")),
            "{host}"
        );
    }
    let db_log = std::fs::read_to_string(
        fleet
            .data_dir("h1")
            .join("services/db/run/2.0.0/service.log"),
    )
    .unwrap();
    assert!(
        db_log.contains("[pre_start hook] migrating the schema to v2"),
        "{db_log}"
    );
}

#[test]
fn a_failing_service_rolls_the_whole_system_back_in_reverse_order() {
    let fleet = installed(true);
    let id = fleet.start_rollout(UPGRADE);
    let s = fleet.wait_done(&id, ROLLOUT);
    assert_eq!(s["state"], "rolled_back", "{s}");
    assert!(s["error"].as_str().unwrap().contains("web"), "{s}");
    // web stopped at its first batch.
    let web_started = times(&s, "web", "started_at");
    assert_eq!(web_started.len(), 1, "{s}");
    // Rolled back after web, in reverse order: api's hosts finished rolling
    // back after web's, db's after api's.
    let web_back = times(&s, "web", "finished_at").pop().unwrap();
    let api_back = times(&s, "api", "finished_at");
    let db_back = times(&s, "db", "finished_at");
    assert!(
        api_back.iter().all(|t| *t >= web_back),
        "api back before web: {s}"
    );
    assert!(
        db_back.iter().all(|t| api_back.iter().all(|a| t >= a)),
        "db back before api: {s}"
    );
    for svc in ["db", "api", "web"] {
        assert_eq!(service(&s, svc)["state"], "rolled_back", "{s}");
    }
    for (host, svc) in [
        ("h1", "db"),
        ("h3", "api"),
        ("h4", "api"),
        ("h5", "web"),
        ("h6", "web"),
    ] {
        assert_eq!(
            fleet.get_svc(host, svc),
            Some(format!("demo-service {svc} 1.0.0")),
            "{host}"
        );
    }
}

#[test]
fn impossible_constraints_and_cycles_are_refused_with_nothing_changed() {
    let fleet = system();
    fleet.service_release("api", "1.0.0", false, "");
    fleet.service_release("web", "2.0.0", false, "");
    let id = fleet.start_rollout(
        "[[service]]\nname = \"api\"\nversion = \"1.0.0\"\nhosts = { role = \"api\" }\nmin_healthy_time = \"200ms\"\n",
    );
    assert_eq!(fleet.wait_done(&id, ROLLOUT)["state"], "succeeded");
    let before = fleet.baton(&["rollout", "list", "--json"]).stdout;
    let cases = [
        (
            "[[service]]\nname = \"web\"\nversion = \"2.0.0\"\nhosts = { role = \"web\" }\nrequires = { api = \">=2.0\" }\n",
            "service \"web\" requires api >=2.0, but h3 runs api 1.0.0 and this plan does not upgrade it",
        ),
        (
            "[[service]]\nname = \"web\"\nversion = \"2.0.0\"\nhosts = { role = \"web\" }\nrequires = { api = \">=2.0\" }\n\n[[service]]\nname = \"api\"\nversion = \"1.0.0\"\n",
            "service \"web\" requires api >=2.0, but this plan rolls api out at 1.0.0",
        ),
        (
            "[[service]]\nname = \"web\"\nversion = \"2.0.0\"\ndepends_on = [\"api\"]\n\n[[service]]\nname = \"api\"\nversion = \"1.0.0\"\ndepends_on = [\"web\"]\n",
            "depends_on has a cycle: web -> api -> web",
        ),
    ];
    for (plan, expected) in cases {
        let out = fleet.try_start_rollout(plan);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted:\n{plan}");
        assert!(
            stderr.contains("invalid argument") && stderr.contains(expected),
            "expected {expected:?} in {stderr}"
        );
    }
    assert_eq!(fleet.baton(&["rollout", "list", "--json"]).stdout, before);
    assert!(!fleet.data_dir("h5").join("services/web").exists());
}

#[test]
fn a_canary_waits_for_promotion_and_auto_promote_does_not() {
    let fleet = system();
    fleet.service_release("web", "1.0.0", false, "");
    fleet.service_release("web", "2.0.0", false, "");
    fleet.service_release("web", "3.0.0", false, "");
    let id = fleet.start_rollout(
        "[[service]]\nname = \"web\"\nversion = \"1.0.0\"\nhosts = { role = \"web\" }\nmin_healthy_time = \"200ms\"\n",
    );
    assert_eq!(fleet.wait_done(&id, ROLLOUT)["state"], "succeeded");

    let canary = "[[service]]\nname = \"web\"\nversion = \"2.0.0\"\nstrategy = \"canary\"\ncanary = 1\nmin_healthy_time = \"200ms\"\n";
    let id = fleet.start_rollout(canary);
    let s = fleet.wait_status(&id, "the canary to await promotion", |s| {
        s["state"] == "awaiting_promotion"
    });
    let on_new: Vec<&str> = service(&s, "web")["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["state"] == "healthy")
        .map(|h| h["host_id"].as_str().unwrap())
        .collect();
    assert_eq!(on_new.len(), 1, "{s}");
    let versions: Vec<String> = ["h5", "h6"]
        .iter()
        .map(|h| fleet.get_svc(h, "web").unwrap())
        .collect();
    assert_eq!(
        versions.iter().filter(|v| v.ends_with("2.0.0")).count(),
        1,
        "{versions:?}"
    );
    // Another rollout of web must wait; one of a disjoint service need not.
    let again = fleet.try_start_rollout(canary);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("failed precondition")
            && stderr.contains(&format!(
                "rollout {id} of service web is still awaiting_promotion"
            )),
        "{stderr}"
    );
    fleet.service_release("api", "1.0.0", false, "");
    let other = fleet.start_rollout(
        "[[service]]\nname = \"api\"\nversion = \"1.0.0\"\nhosts = { role = \"api\" }\nmin_healthy_time = \"200ms\"\n",
    );
    assert_eq!(fleet.wait_done(&other, ROLLOUT)["state"], "succeeded");
    let out = fleet.baton(&["rollout", "promote", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = fleet.wait_done(&id, ROLLOUT);
    assert_eq!(s["state"], "succeeded", "{s}");
    for h in ["h5", "h6"] {
        assert_eq!(
            fleet.get_svc(h, "web").as_deref(),
            Some("demo-service web 2.0.0")
        );
    }

    let auto = "[[service]]\nname = \"web\"\nversion = \"3.0.0\"\nstrategy = \"canary\"\ncanary = \"50%\"\nauto_promote = true\nmin_healthy_time = \"200ms\"\n";
    let id = fleet.start_rollout(auto);
    let s = fleet.wait_done(&id, ROLLOUT);
    assert_eq!(s["state"], "succeeded", "{s}");
    wait_until("both hosts on 3.0.0", Duration::from_secs(10), || {
        ["h5", "h6"]
            .iter()
            .all(|h| fleet.get_svc(h, "web").as_deref() == Some("demo-service web 3.0.0"))
            .then_some(())
    });
}
