use std::time::{Duration, SystemTime};

use super::judge::{self, HostSeen, Look, Measurement, Series, mann_whitney};
use super::*;
use crate::plan::Plan;

const SERVICE: &str = "[[service]]\nname = \"api\"\nversion = \"2.0.0\"\n";

fn checks(analysis: &str) -> Result<Vec<Check>, String> {
    Plan::parse(&format!("{SERVICE}{analysis}"))
        .map(|p| p.services[0].analysis.clone())
        .map_err(|e| e.0)
}

fn err(analysis: &str) -> String {
    checks(analysis).expect_err("refused")
}

#[test]
fn the_design_example_parses() {
    let c = checks(
        r#"
[[service.analysis]]
name = "errors"
kind = "metrics"
url = "http://127.0.0.1:${port}/metrics"
ratio = ["app_errors_total", "app_requests_total"]
baseline = true
tolerance = 0.5
max = 0.02
interval = "2s"
duration = "20s"
min_samples = 5
on_inconclusive = "pause"

[[service.analysis]]
name = "p-errors"
kind = "prometheus"
query = 'sum(rate(app_errors_total{host="${host}"}[30s]))'
max = 0.1
interval = "5s"
duration = "30s"
"#,
    )
    .unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(
        c[0].kind,
        CheckKind::Metrics {
            url: "http://127.0.0.1:${port}/metrics".into(),
            quantity: Quantity::Ratio("app_errors_total".into(), "app_requests_total".into()),
        }
    );
    assert!(c[0].baseline);
    assert_eq!(c[0].samples(), 10);
    assert_eq!(c[0].on_inconclusive, OnInconclusive::Pause);
    assert!(matches!(
        c[1].kind,
        CheckKind::Prometheus {
            count: 6,
            failure_limit: 0,
            ..
        }
    ));
}

#[test]
fn bad_checks_are_refused_with_the_key_named() {
    let m = "[[service.analysis]]\nname = \"e\"\nkind = \"metrics\"\nurl = \"http://127.0.0.1:1/metrics\"\n";
    for (text, says) in [
        (
            "[[service.analysis]]\nname = \"e\"\nkind = \"magic\"\n",
            "unknown kind",
        ),
        (
            "[[service.analysis]]\nname = \"e\"\nkind = \"metrics\"\nratio = [\"a\", \"b\"]\nmax = 1\n",
            "url",
        ),
        (
            &format!("{m}ratio = [\"a\"]\nmax = 1\n"),
            "name two counters",
        ),
        (&format!("{m}ratio = [\"a\", \"b\"]\n"), "say what fails"),
        (
            &format!("{m}ratio = [\"a\", \"b\"]\nrate = \"c\"\nmax = 1\n"),
            "exactly one of",
        ),
        (
            &format!("{m}ratio = [\"a b\", \"c\"]\nmax = 1\n"),
            "not a Prometheus metric name",
        ),
        (&format!("{m}rate = \"a\"\nmax = nan\n"), "finite"),
        (&format!("{m}rate = \"a\"\nmax = inf\n"), "finite"),
        (
            &format!("{m}rate = \"a\"\nbaseline = true\ntolerance = -1\n"),
            "tolerance",
        ),
        (
            &format!("{m}rate = \"a\"\nmax = 1\nmin_samples = 0\n"),
            "no data is never a pass",
        ),
        (
            &format!("{m}rate = \"a\"\nmax = 1\ninterval = \"10s\"\nduration = \"5s\"\n"),
            "shorter than interval",
        ),
        (
            &format!("{m}rate = \"a\"\nmax = 1\ninterval = \"100ms\"\nduration = \"24h\"\n"),
            "more than the limit of 10000",
        ),
        (
            &format!("{m}rate = \"a\"\nmax = 1\ninterval = \"1ns\"\n"),
            "interval",
        ),
        (
            &format!("{m}rate = \"a\"\nmax = 1\nquery = \"up\"\n"),
            "only applies to kind = \"prometheus\"",
        ),
        (
            &format!("{m}rate = \"a\"\nmax = 1\non_inconclusive = \"shrug\"\n"),
            "neither",
        ),
        (&format!("{m}histogram = \"h\"\nmax = 1\n"), "quantile"),
        (
            &format!("{m}histogram = \"h\"\nquantile = 1.5\nmax = 1\n"),
            "between 0 and 1",
        ),
        (
            "[[service.analysis]]\nname = \"e\"\nkind = \"metrics\"\nurl = \"file:///etc/passwd\"\nrate = \"a\"\nmax = 1\n",
            "http://",
        ),
        (
            "[[service.analysis]]\nname = \"p\"\nkind = \"prometheus\"\nquery = \"up\"\n",
            "say what passes or fails",
        ),
        (
            "[[service.analysis]]\nname = \"p\"\nkind = \"prometheus\"\nquery = \"up\"\nsuccess = \"up > 1\"\n",
            "not a condition",
        ),
        (
            "[[service.analysis]]\nname = \"p\"\nkind = \"prometheus\"\nquery = \"\"\nmax = 1\n",
            "1 to 4096",
        ),
        (
            "[[service.analysis]]\nname = \"h\"\nkind = \"host\"\nmax = 1\n",
            "max_restarts",
        ),
        (
            "[[service.analysis]]\nname = \"h\"\nkind = \"host\"\nmax_restarts = -1\n",
            "0 or more",
        ),
        (
            "[[service.analysis]]\nname = \"../x\"\nkind = \"host\"\n",
            "name",
        ),
        (
            "[[service.analysis]]\nname = \"h\"\nkind = \"host\"\n[[service.analysis]]\nname = \"h\"\nkind = \"host\"\n",
            "two checks are named",
        ),
        (
            "[[service.analysis]]\nname = \"h\"\nkind = \"host\"\nbogus = 1\n",
            "unknown field",
        ),
    ] {
        let e = err(text);
        assert!(e.contains(says), "{text:?}: {e}");
        assert!(e.len() < 600, "a short error: {e}");
    }
    let many: String = (0..17)
        .map(|i| format!("[[service.analysis]]\nname = \"h{i}\"\nkind = \"host\"\n"))
        .collect();
    assert!(err(&many).contains("limit of 16"));
}

#[test]
fn conditions_read_like_argo_conditions() {
    let c = Condition::parse("result >= 0.9 && result <= 1 || result == 5", "x").unwrap();
    assert!(c.holds(0.95) && c.holds(5.0));
    assert!(!c.holds(0.5) && !c.holds(1.5));
    for bad in [
        "",
        "result",
        "result < x",
        "x < 1",
        "result ~ 1",
        "result < nan",
    ] {
        assert!(Condition::parse(bad, "k").is_err(), "{bad:?}");
    }
    assert!(Condition::parse(&"result < 1 && ".repeat(100), "k").is_err());
}

#[test]
fn mann_whitney_matches_hand_computed_values() {
    // Every x below every y: U = 0.
    let t = mann_whitney(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]).unwrap();
    assert_eq!(t.u, 0.0);
    assert!(t.p > 0.95);
    let t = mann_whitney(&[4.0, 5.0, 6.0], &[1.0, 2.0, 3.0]).unwrap();
    assert_eq!(t.u, 9.0);
    assert!(t.p < 0.05);
    // Ties count half.
    let t = mann_whitney(&[1.0, 1.0], &[1.0, 1.0]).unwrap();
    assert_eq!(t.u, 2.0);
    assert_eq!(t.p, 0.5);
    assert!(mann_whitney(&[], &[1.0]).is_none());
    assert!(mann_whitney(&[f64::NAN], &[1.0]).is_none());
    // The normal tail is right to 1e-6.
    assert!((judge::upper_tail(1.959_964) - 0.025).abs() < 1e-6);
    assert!((judge::upper_tail(0.0) - 0.5).abs() < 1e-6);
}

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)
}

fn ratio_check(extra: &str) -> Check {
    checks(&format!(
        "[[service.analysis]]\nname = \"errors\"\nkind = \"metrics\"\nurl = \"http://127.0.0.1:1/m\"\nratio = [\"e\", \"r\"]\nbaseline = true\ntolerance = 0.5\ninterval = \"1s\"\nduration = \"20s\"\nmin_samples = 5\n{extra}"
    ))
    .unwrap()
    .remove(0)
}

/// A deterministic spread of values around `mean` (±20 %).
fn around(mean: f64, n: usize, seed: u64) -> Vec<f64> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| mean * (0.8 + 0.4 * rng.f64())).collect()
}

#[test]
fn five_percent_errors_against_one_fail_and_the_same_rates_pass() {
    let c = ratio_check("");
    let bad = Series {
        new: around(0.05, 20, 1),
        baseline: around(0.01, 40, 2),
        value: Some(0.05),
        baseline_value: Some(0.01),
        new_hosts: 1,
        baseline_hosts: 2,
        ..Series::default()
    };
    let v = judge::metrics(&c, 0, &bad, Look::Final, now()).unwrap();
    assert_eq!(v.verdict, Outcome::Fail, "{}", v.reason);
    assert!(v.p_value.unwrap().get() < 0.01 && v.statistic.unwrap().get() > 2.0);
    assert!(v.reason.contains("Mann-Whitney"), "{}", v.reason);
    // An early look sees it too: it is clear.
    assert_eq!(
        judge::metrics(&c, 0, &bad, Look::Interim, now())
            .unwrap()
            .verdict,
        Outcome::Fail
    );
    let same = Series {
        new: around(0.01, 20, 3),
        baseline: around(0.01, 40, 4),
        value: Some(0.01),
        baseline_value: Some(0.01),
        new_hosts: 1,
        baseline_hosts: 2,
        ..Series::default()
    };
    assert!(
        judge::metrics(&c, 0, &same, Look::Interim, now()).is_none(),
        "an early look never passes"
    );
    let v = judge::metrics(&c, 0, &same, Look::Final, now()).unwrap();
    assert_eq!(v.verdict, Outcome::Pass, "{}", v.reason);
    assert_eq!((v.samples, v.baseline_samples), (20, 40));
}

#[test]
fn no_data_is_never_a_pass() {
    let c = ratio_check("max = 0.5\n");
    let empty = Series {
        new_hosts: 1,
        baseline_hosts: 2,
        ..Series::default()
    };
    let v = judge::metrics(&c, 0, &empty, Look::Final, now()).unwrap();
    assert_eq!(v.verdict, Outcome::Inconclusive, "{}", v.reason);
    assert!(v.reason.contains("no traffic"), "{}", v.reason);
    let errors = Series {
        errors: 20,
        last_error: Some("connection refused".into()),
        new_hosts: 1,
        ..Series::default()
    };
    let v = judge::metrics(&c, 0, &errors, Look::Final, now()).unwrap();
    assert_eq!(v.verdict, Outcome::Inconclusive);
    assert!(v.reason.contains("connection refused"), "{}", v.reason);
    // A baseline comparison without a baseline on the first step:
    // inconclusive; after earlier steps compared: skipped.
    let c = ratio_check("");
    let alone = Series {
        new: vec![0.01; 10],
        value: Some(0.01),
        new_hosts: 1,
        ..Series::default()
    };
    assert_eq!(
        judge::metrics(&c, 0, &alone, Look::Final, now())
            .unwrap()
            .verdict,
        Outcome::Inconclusive
    );
    assert_eq!(
        judge::metrics(&c, 2, &alone, Look::Final, now())
            .unwrap()
            .verdict,
        Outcome::Skipped
    );
    // Prometheus: errors and empty answers never pass.
    let p = checks("[[service.analysis]]\nname = \"p\"\nkind = \"prometheus\"\nquery = \"up\"\nmax = 0.1\ncount = 3\ninconclusive_limit = 5\n").unwrap().remove(0);
    let v = judge::prometheus(
        &p,
        0,
        &judge::Tally::of(
            &p,
            &[Measurement::Empty, Measurement::Empty, Measurement::Empty],
        ),
        Look::Final,
        now(),
    )
    .unwrap();
    assert_eq!(v.verdict, Outcome::Inconclusive, "{}", v.reason);
    let v = judge::prometheus(
        &p,
        0,
        &judge::Tally::of(&p, &vec![Measurement::Error("503".into()); 3]),
        Look::Final,
        now(),
    )
    .unwrap();
    assert_eq!(v.verdict, Outcome::Inconclusive, "{}", v.reason);
    let v = judge::prometheus(
        &p,
        0,
        &judge::Tally::of(&p, &vec![Measurement::Error("x".into()); 5]),
        Look::Interim,
        now(),
    )
    .unwrap();
    assert!(v.reason.contains("errors in a row"), "{}", v.reason);
}

#[test]
fn prometheus_measurements_count_as_argo_counts_them() {
    let p = checks("[[service.analysis]]\nname = \"p\"\nkind = \"prometheus\"\nquery = \"up\"\nmax = 0.1\ncount = 4\nfailure_limit = 1\n").unwrap().remove(0);
    let v = |ms: &[f64], look| {
        let ms: Vec<Measurement> = ms.iter().map(|v| Measurement::Value(*v)).collect();
        judge::prometheus(&p, 0, &judge::Tally::of(&p, &ms), look, now())
    };
    assert_eq!(
        v(&[0.0, 0.2, 0.0, 0.0], Look::Final).unwrap().verdict,
        Outcome::Pass
    );
    assert_eq!(
        v(&[0.2, 0.2], Look::Interim).unwrap().verdict,
        Outcome::Fail
    );
    assert!(v(&[0.0, 0.2], Look::Interim).is_none());
    let both = checks("[[service.analysis]]\nname = \"p\"\nkind = \"prometheus\"\nquery = \"up\"\nsuccess = \"result > 0.9\"\nfailure = \"result < 0.5\"\ncount = 2\n").unwrap().remove(0);
    let v = judge::prometheus(
        &both,
        0,
        &judge::Tally::of(&both, &[Measurement::Value(0.95), Measurement::Value(0.7)]),
        Look::Final,
        now(),
    )
    .unwrap();
    assert_eq!(v.verdict, Outcome::Inconclusive, "{}", v.reason);
}

#[test]
fn a_host_check_fails_on_restarts_and_growth() {
    let h = checks("[[service.analysis]]\nname = \"proc\"\nkind = \"host\"\nmax_memory_growth = 0.5\ninterval = \"1s\"\nduration = \"5s\"\n").unwrap().remove(0);
    let fine = HostSeen {
        host: "h1".into(),
        samples: 5,
        rss: Some((100, 120)),
        fds: Some((10, 30)),
        ..HostSeen::default()
    };
    assert_eq!(
        judge::host(&h, 0, std::slice::from_ref(&fine), now()).verdict,
        Outcome::Pass
    );
    let restarted = HostSeen {
        restarts: 1,
        last_exit: Some("exit code 3".into()),
        ..fine.clone()
    };
    let v = judge::host(&h, 0, &[fine.clone(), restarted], now());
    assert_eq!(v.verdict, Outcome::Fail);
    assert!(v.reason.contains("exit code 3"), "{}", v.reason);
    let leaking = HostSeen {
        rss: Some((100, 300)),
        ..fine.clone()
    };
    assert_eq!(judge::host(&h, 0, &[leaking], now()).verdict, Outcome::Fail);
    assert_eq!(
        judge::host(&h, 0, &[], now()).verdict,
        Outcome::Inconclusive
    );
    let short = HostSeen { samples: 1, ..fine };
    assert_eq!(
        judge::host(&h, 0, &[short], now()).verdict,
        Outcome::Inconclusive
    );
}

#[test]
fn numbers_that_cannot_be_stored_are_not() {
    assert!(Num::new(f64::NAN).is_none());
    assert!(Num::new(f64::INFINITY).is_none());
    let v = Verdict::new(
        &ratio_check(""),
        0,
        Outcome::Pass,
        "x".repeat(10_000),
        now(),
    );
    assert!(v.reason.chars().count() <= MAX_REASON_CHARS + 1);
    let back: Verdict = serde_json::from_slice(&serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!(back, v);
}

#[test]
fn a_margin_tolerates_errors_where_the_baseline_has_none_and_failed_scrapes_are_not_judged() {
    // A baseline with no errors at all: any error is worse by a ratio;
    // a margin says how much is still fine.
    let few = Series {
        new: (0..36)
            .map(|i| if i % 7 == 0 { 0.0014 } else { 0.0 })
            .collect(),
        baseline: vec![0.0; 180],
        value: Some(0.0002),
        baseline_value: Some(0.0),
        new_hosts: 1,
        baseline_hosts: 5,
        ..Series::default()
    };
    let strict = ratio_check("");
    assert_eq!(
        judge::metrics(&strict, 0, &few, Look::Final, now())
            .unwrap()
            .verdict,
        Outcome::Fail
    );
    let lenient = ratio_check("margin = 0.002\n");
    assert_eq!(
        judge::metrics(&lenient, 0, &few, Look::Final, now())
            .unwrap()
            .verdict,
        Outcome::Pass
    );
    // Most scrapes of the new version failed: the few that answered do
    // not decide.
    let mostly_failed = Series {
        new_scrapes: 100,
        new_errors: 99,
        last_error: Some("h7: connection refused".into()),
        ..few.clone()
    };
    let v = judge::metrics(&lenient, 0, &mostly_failed, Look::Final, now()).unwrap();
    assert_eq!(v.verdict, Outcome::Inconclusive, "{}", v.reason);
    assert!(v.reason.contains("99 of 100"), "{}", v.reason);
    // A limit with no value to hold to it never passes.
    let limited = ratio_check("max = 0.5\n");
    let no_value = Series { value: None, ..few };
    assert_eq!(
        judge::metrics(&limited, 0, &no_value, Look::Final, now())
            .unwrap()
            .verdict,
        Outcome::Inconclusive
    );
    assert!(err("[[service.analysis]]\nname = \"e\"\nkind = \"metrics\"\nurl = \"http://127.0.0.1:1/m\"\nrate = \"a\"\nmax = 1\nmargin = 0.1\n").contains("only with baseline"));
}
