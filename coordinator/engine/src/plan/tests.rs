use super::*;

const FULL: &str = r#"
auto_rollback = false
progress_deadline = "5m"

[[service]]
name = "api"
version = "2.0.0"
hosts = { role = "api" }
strategy = "rolling"
max_parallel = "25%"
min_healthy = "75%"
min_healthy_time = "2s"
healthy_deadline = "30s"
max_failures = 1
"#;

fn err(text: &str) -> String {
    Plan::parse(text).unwrap_err().0
}

#[test]
fn a_full_single_service_plan_parses() {
    let plan = Plan::parse(FULL).unwrap();
    assert!(!plan.auto_rollback);
    assert_eq!(plan.progress_deadline, Duration::from_secs(300));
    let s = &plan.services[0];
    assert_eq!(s.max_parallel, Amount::Percent(25));
    assert_eq!(s.min_healthy, Some(Amount::Percent(75)));
    assert_eq!(s.min_healthy_time, Duration::from_secs(2));
    assert_eq!(s.max_failures, 1);
    assert_eq!(s.selector_text(), "role=api");
}

#[test]
fn defaults_follow_the_contract() {
    let plan = Plan::parse("[[service]]\nname = \"api\"\nversion = \"1.0.0\"\n").unwrap();
    assert!(plan.auto_rollback);
    assert_eq!(plan.progress_deadline, Duration::from_secs(600));
    let s = &plan.services[0];
    assert_eq!(s.strategy, Strategy::Rolling);
    assert_eq!(s.max_parallel, Amount::Count(1));
    assert_eq!(s.min_healthy, None);
    assert_eq!(s.min_healthy_time, Duration::from_secs(10));
    assert_eq!(s.healthy_deadline, Duration::from_secs(300));
    assert_eq!(s.max_failures, 0);
    assert_eq!(s.hosts, None);
}

#[test]
fn bad_plans_get_precise_errors() {
    let svc = "[[service]]\nname = \"api\"\nversion = \"1.0.0\"\n";
    assert!(
        err(&format!(
            "{svc}min_healthy_time = \"5s\"\nhealthy_deadline = \"3s\"\n"
        ))
        .contains("healthy_deadline: 3s leaves no time to be healthy for min_healthy_time 5s")
    );
    assert!(err(&format!("{svc}colour = 1\n")).contains("unknown field `colour`"));
    assert!(err(&format!("bogus = 1\n{svc}")).contains("unknown field `bogus`"));
    assert!(
        err(&format!("{svc}min_healthy_time = \"2 parsecs\"\n"))
            .contains("min_healthy_time: invalid duration \"2 parsecs\"")
    );
    assert!(err(&format!("{svc}max_parallel = 0\n")).contains("max_parallel: must be at least 1"));
    assert!(
        err(&format!("{svc}max_parallel = \"0%\"\n")).contains("max_parallel: must be at least 1")
    );
    assert!(err(&format!("{svc}max_parallel = \"150%\"\n")).contains("more than 100%"));
    assert!(err(&format!("{svc}max_parallel = true\n")).contains("expected a host count"));
    assert!(err(&format!("{svc}max_failures = -1\n")).contains("max_failures: must be 0 or more"));
    assert!(err(&format!("{svc}strategy = \"yolo\"\n")).contains("unknown strategy \"yolo\""));
    assert!(err(&format!("{svc}canary = 1\n")).contains("only applies to strategy \"canary\""));
    assert!(err(&format!("{svc}hosts = {{}}\n")).contains("empty selector"));
    assert!(err("auto_rollback = true\n").contains("names no service"));
    assert!(err("[[service]]\nname = \"a/b\"\nversion = \"1.0.0\"\n").contains("name"));
    assert!(err("[[service]]\nname = \"api\"\nversion = \"../1\"\n").contains("version"));
    assert!(err("[[service]]\nname = \"api\"\n").contains("missing field `version`"));
    assert!(
        err("progress_deadline = \"0s\"\n[[service]]\nname = \"a\"\nversion = \"1.0.0\"\n")
            .contains("longer than zero")
    );
}

#[test]
fn the_full_format_parses_and_bad_graphs_are_refused() {
    let two = r#"
max_parallel_services = 2

[[service]]
name = "web"
version = "3.1.0"
depends_on = ["api"]
requires = { api = ">=2.0" }
strategy = "canary"
canary = "25%"
auto_promote = true

[[service]]
name = "api"
version = "2.0.0"
steps = ["1", "50%", "100%"]
pause = "30s"
"#;
    let plan = Plan::parse(two).unwrap();
    assert_eq!(plan.max_parallel_services, Some(2));
    assert_eq!(plan.order(), vec![1, 0], "api before web");
    assert_eq!(
        plan.waves(),
        vec![vec!["api".to_owned()], vec!["web".to_owned()]]
    );
    assert_eq!(plan.services[0].canary, Some(Amount::Percent(25)));
    assert_eq!(
        plan.services[1].steps,
        Some(vec![
            Amount::Count(1),
            Amount::Percent(50),
            Amount::Percent(100)
        ])
    );
    assert_eq!(plan.services[1].pause, Some(Duration::from_secs(30)));

    let svc = |name: &str, deps: &str| {
        format!("[[service]]\nname = \"{name}\"\nversion = \"1.0.0\"\ndepends_on = [{deps}]\n")
    };
    let cycle = format!(
        "{}{}{}",
        svc("a", "\"c\""),
        svc("b", "\"a\""),
        svc("c", "\"b\"")
    );
    assert_eq!(err(&cycle), "depends_on has a cycle: a -> c -> b -> a");
    assert!(err(&svc("a", "\"a\"")).contains("cannot depend on itself"));
    let dangling = format!("{}{}", svc("a", ""), svc("b", "\"c\""));
    assert!(err(&dangling).contains("depends_on names \"c\""));
    let twice = format!("{}{}", svc("a", ""), svc("a", ""));
    assert!(err(&twice).contains("appears twice"));
    let bad_req = "[[service]]\nname = \"a\"\nversion = \"1.0.0\"\nrequires = { b = \"newest\" }\n";
    assert!(err(bad_req).contains("requires: b = \"newest\" is not a version requirement"));
    let no_canary = "[[service]]\nname = \"a\"\nversion = \"1.0.0\"\nstrategy = \"canary\"\n";
    assert!(err(no_canary).contains("needs canary = N"));
    assert!(
        err("max_parallel_services = 0\n[[service]]\nname = \"a\"\nversion = \"1.0.0\"\n")
            .contains("at least 1")
    );
    // A requirement on a service of the plan orders it like depends_on.
    let req = "[[service]]\nname = \"web\"\nversion = \"2.0.0\"\nrequires = { api = \">=2\" }\n[[service]]\nname = \"api\"\nversion = \"2.0.0\"\n";
    assert_eq!(Plan::parse(req).unwrap().order(), vec![1, 0]);
    let req_cycle = "[[service]]\nname = \"web\"\nversion = \"2.0.0\"\nrequires = { api = \">=2\" }\n[[service]]\nname = \"api\"\nversion = \"2.0.0\"\ndepends_on = [\"web\"]\n";
    assert_eq!(err(req_cycle), "depends_on has a cycle: web -> api -> web");
}

/// `n` services, each depending on the next; `ring` closes the chain.
fn chain(n: usize, ring: bool) -> String {
    let mut text = String::new();
    for i in 0..n {
        let dep = if i + 1 < n {
            format!("\"s{}\"", i + 1)
        } else if ring {
            "\"s0\"".to_owned()
        } else {
            String::new()
        };
        text.push_str(&format!(
            "[[service]]\nname = \"s{i}\"\nversion = \"1.0.0\"\ndepends_on = [{dep}]\n"
        ));
    }
    text
}

#[test]
fn huge_plans_rings_and_chains_are_answered_at_once_with_a_precise_error() {
    for ring in [false, true] {
        let started = std::time::Instant::now();
        let e = err(&chain(10_000, ring));
        assert!(
            e.contains("10000 services, more than the limit of 256"),
            "{e}"
        );
        // Linear work: a regression to the old cubic ordering, or a
        // recursive cycle check, would not finish (or overflow) here.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
    // At the limit, a chain orders and a ring is named briefly.
    let plan = Plan::parse(&chain(MAX_SERVICES, false)).unwrap();
    assert_eq!(plan.order().first(), Some(&(MAX_SERVICES - 1)));
    assert_eq!(plan.waves().len(), MAX_SERVICES);
    let e = err(&chain(MAX_SERVICES, true));
    assert!(
        e.starts_with("depends_on has a cycle: s0 -> s1 -> s2"),
        "{e}"
    );
    assert!(e.contains("(256 services in all)") && e.len() < 200, "{e}");
}

#[test]
fn durations_and_counts_have_maximums() {
    let svc = "[[service]]\nname = \"api\"\nversion = \"1.0.0\"\n";
    let e = err(&format!("{svc}healthy_deadline = \"300000000000y\"\n"));
    assert!(
        e.contains("healthy_deadline: ") && e.contains("maximum of 1day"),
        "{e}"
    );
    let e = err(&format!("progress_deadline = \"8days\"\n{svc}"));
    assert!(e.contains("maximum of 7days"), "{e}");
    assert!(err(&format!("{svc}pause = \"1year\"\n")).contains("maximum of 7days"));
    assert!(err(&format!("{svc}max_failures = 99999999999\n")).contains("limit of 1000000"));
    let steps: Vec<String> = (0..101).map(|_| "\"1\"".to_owned()).collect();
    assert!(err(&format!("{svc}steps = [{}]\n", steps.join(","))).contains("limit of 100"));
    let labels: Vec<String> = (0..17).map(|i| format!("k{i} = \"v\"")).collect();
    assert!(err(&format!("{svc}hosts = {{ {} }}\n", labels.join(", "))).contains("limit of 16"));
    let e = err(&format!(
        "{svc}requires = {{ db = \"{}\" }}\n",
        ">".repeat(200)
    ));
    assert!(e.contains("longer than 128 characters"), "{e}");
}

#[test]
fn errors_quote_a_short_prefix_of_the_input() {
    let svc = "[[service]]\nname = \"api\"\nversion = \"1.0.0\"\n";
    let long = "x".repeat(400_000);
    for text in [
        format!("{svc}strategy = \"{long}\"\n"),
        format!("{svc}healthy_deadline = \"{long}\"\n"),
        format!("{svc}max_parallel = \"{long}\"\n"),
        format!("{svc}depends_on = [\"{long}\"]\n"),
        format!("{svc}hosts = {{ {long} = \"v\" }}\n"),
        format!("{svc}requires = {{ db = \"{long}\" }}\n"),
        // A syntax error on a 400 KB line.
        format!("{svc}oops = {long}\n"),
        format!("[[service]]\nname = \"{long}\"\nversion = \"1.0.0\"\n"),
    ] {
        let e = err(&text);
        assert!(e.len() < 600, "{} bytes: {}", e.len(), &e[..200]);
    }
    let e = err(&format!("{svc}oops = {long}\n"));
    assert!(e.contains("line 4, column 8"), "{e}");
}

/// The names a `deny_unknown_fields` reader accepts, from the error a
/// probe key gets (serde lists them all).
fn accepted<T: serde::de::DeserializeOwned>(probe: &str) -> Vec<String> {
    let e = toml::from_str::<T>(probe)
        .err()
        .expect("the probe is refused");
    baton_common::reference::probed_fields(e.message()).unwrap()
}

/// What differs between the keys documented and those accepted.
fn drift(documented: &[String], accepted: &[String]) -> String {
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|k| !documented.contains(k))
        .collect();
    let unknown: Vec<&String> = documented
        .iter()
        .filter(|k| !accepted.contains(k))
        .collect();
    format!("undocumented keys: {missing:?}; documented but not accepted: {unknown:?}")
}

#[test]
fn the_key_reference_lists_exactly_the_keys_a_plan_may_have() {
    use baton_common::reference::keys_under;
    for (probe, prefix, accepted) in [
        ("__probe = 1", "", accepted::<RawPlan>("__probe = 1")),
        (
            "[[service]]",
            "service[].",
            accepted::<RawPlan>("[[service]]\n__probe = 1\n"),
        ),
        (
            "[[service.analysis]]",
            "service[].analysis[].",
            accepted::<RawPlan>("[[service]]\n[[service.analysis]]\n__probe = 1\n"),
        ),
    ] {
        let documented = keys_under(KEYS, prefix);
        assert!(!accepted.is_empty(), "{probe}: no field list");
        assert_eq!(
            documented,
            accepted,
            "{probe}: {}",
            drift(&documented, &accepted)
        );
    }
    for k in KEYS {
        assert!(
            !k.value.is_empty() && !k.about.is_empty(),
            "{}: describe it",
            k.key
        );
    }
}

#[test]
fn amounts_round_percentages_up() {
    assert_eq!(Amount::Percent(25).of(12), 3);
    assert_eq!(Amount::Percent(25).of(5), 2);
    assert_eq!(Amount::Percent(75).of(4), 3);
    assert_eq!(Amount::Count(2).of(4), 2);
}

const TRAFFIC: &str = r#"
[[service]]
name = "web"
version = "2.0.0"

[service.traffic]
kind = "haproxy"
socket = "/run/haproxy/admin.sock"
backend = "web"
server = "${BATON_HOST_ID}"
drain_timeout = "30s"
run_on = "coordinator"
"#;

#[test]
fn the_contracts_traffic_keys_parse() {
    use baton_common::traffic::{Balancer, RunOn};
    let plan = Plan::parse(TRAFFIC).unwrap();
    let t = plan.services[0].traffic.as_ref().unwrap();
    assert_eq!(t.run_on, RunOn::Coordinator);
    assert_eq!(t.drain_timeout, Duration::from_secs(30));
    assert_eq!(
        t.balancer,
        Balancer::Haproxy {
            socket: "/run/haproxy/admin.sock".into(),
            backend: "web".into(),
            server: "${BATON_HOST_ID}".into(),
        }
    );
    // Defaults: the host id as the server, 30 s, batond.
    let plan = Plan::parse(
        "[[service]]\nname = \"web\"\nversion = \"2.0.0\"\n[service.traffic]\nkind = \"haproxy\"\nsocket = \"tcp://127.0.0.1:9999\"\nbackend = \"b\"\n",
    )
    .unwrap();
    let t = plan.services[0].traffic.as_ref().unwrap();
    assert_eq!(t.run_on, RunOn::Coordinator);
    assert!(
        matches!(&t.balancer, Balancer::Haproxy { server, .. } if server == "${BATON_HOST_ID}")
    );
    let exec = Plan::parse(
        "[[service]]\nname = \"web\"\nversion = \"2.0.0\"\n[service.traffic]\nkind = \"exec\"\nrun_on = \"agent\"\ndrain = [\"/usr/local/bin/lb\", \"drain\"]\nready = [\"/usr/local/bin/lb\", \"ready\"]\nconnections = [\"/usr/local/bin/lb\", \"count\"]\n",
    )
    .unwrap();
    assert_eq!(
        exec.services[0].traffic.as_ref().unwrap().run_on,
        RunOn::Agent
    );
}

#[test]
fn bad_traffic_keys_are_precise_errors() {
    let with = |extra: &str| {
        err(&format!(
            "[[service]]\nname = \"web\"\nversion = \"2.0.0\"\n[service.traffic]\n{extra}"
        ))
    };
    let cases = [
        ("kind = \"nginx\"\n", "unknown kind \"nginx\""),
        (
            "kind = \"haproxy\"\nbackend = \"b\"\n",
            "traffic.socket: required",
        ),
        (
            "kind = \"haproxy\"\nsocket = \"/s\"\n",
            "traffic.backend: required",
        ),
        (
            "kind = \"haproxy\"\nsocket = \"/s\"\nbackend = \"b\"\ndrain = [\"x\"]\n",
            "traffic.drain: not a key of kind = \"haproxy\"",
        ),
        (
            "kind = \"exec\"\nsocket = \"/s\"\n",
            "traffic.socket: not a key of kind = \"exec\"",
        ),
        (
            "kind = \"exec\"\nready = [\"/r\"]\nconnections = [\"/c\"]\n",
            "traffic.drain: required",
        ),
        (
            "kind = \"exec\"\ndrain = []\nready = [\"/r\"]\nconnections = [\"/c\"]\n",
            "drain needs a command",
        ),
        (
            "kind = \"exec\"\ndrain = [\"lb\"]\nready = [\"/r\"]\nconnections = [\"/c\"]\n",
            "traffic: drain: the program \"lb\" must be an absolute path",
        ),
        (
            "kind = \"haproxy\"\nsocket = \"relative.sock\"\nbackend = \"b\"\n",
            "neither an absolute unix socket path nor tcp://IP:PORT",
        ),
        (
            "kind = \"haproxy\"\nsocket = \"/s\"\nbackend = \"b c\"\n",
            "holds a space or a control character",
        ),
        (
            "kind = \"haproxy\"\nsocket = \"/s\"\nbackend = \"b\"\ndrain_timeout = \"2h\"\n",
            "traffic.drain_timeout",
        ),
        (
            "kind = \"haproxy\"\nsocket = \"/s\"\nbackend = \"b\"\nrun_on = \"both\"\n",
            "traffic.run_on: \"both\" is not",
        ),
        (
            "kind = \"haproxy\"\nsocket = \"/s\"\nbackend = \"b\"\nweight = 3\n",
            "weight",
        ),
    ];
    for (extra, want) in cases {
        let e = with(extra);
        assert!(e.contains(want), "{extra:?}: {e}");
    }
}

#[test]
fn a_drain_longer_than_the_progress_deadline_is_refused() {
    let e = err(
        "progress_deadline = \"10m\"\n[[service]]\nname = \"web\"\nversion = \"2.0.0\"\n[service.traffic]\nkind = \"haproxy\"\nsocket = \"/s\"\nbackend = \"b\"\ndrain_timeout = \"1h\"\n",
    );
    assert!(
        e.contains(
            "progress_deadline 10m leaves no time for a host's drain (traffic.drain_timeout 1h)"
        ),
        "{e}"
    );
}
