//! `baton-bench analysis`: the real judge ([`baton_engine::analysis::judge`])
//! on generated error counters, bake after bake, the way the coordinator
//! calls it: one sample per host and interval (the ratio of the increases
//! of two counters), an early look after every interval once
//! `min_samples` are in, the last look when the bake ends.
//!
//! The series have realistic noise: each host has its own error rate
//! (log-normal around the fleet's, σ = 0.15), its request count per
//! interval is Poisson, its error count Poisson around its rate times a
//! per-interval fluctuation (log-normal, σ = 0.1). A canary of
//! `canary_percent` of the hosts runs the new version; in a "bad" trial its
//! rate is `bad_error` instead of `base_error`, in an A/A trial the same.

use std::time::{Duration, Instant, SystemTime};

use baton_engine::analysis::judge::{self, Look, Series};
use baton_engine::analysis::{Check, Outcome};
use serde_json::{Value, json};

/// What one scenario simulates.
#[derive(Debug, Clone)]
pub struct Params {
    pub hosts: usize,
    pub canary_percent: usize,
    pub rps: f64,
    pub base_error: f64,
    pub bad_error: f64,
    pub trials: usize,
    pub check: String,
}

fn normal(rng: &mut fastrand::Rng) -> f64 {
    // Box-Muller.
    let (u, v) = (rng.f64().max(1e-12), rng.f64());
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

fn poisson(rng: &mut fastrand::Rng, lambda: f64) -> f64 {
    if lambda > 30.0 {
        return (lambda + lambda.sqrt() * normal(rng)).round().max(0.0);
    }
    // Knuth.
    let limit = (-lambda).exp();
    let (mut k, mut p) = (0.0, 1.0);
    loop {
        p *= rng.f64();
        if p <= limit {
            return k;
        }
        k += 1.0;
    }
}

/// One bake: when it failed (`Some(elapsed)`), or `None` when it passed
/// or was inconclusive.
fn bake(check: &Check, p: &Params, bad: bool, rng: &mut fastrand::Rng) -> Option<Duration> {
    let new = (p.hosts * p.canary_percent).div_ceil(100).max(1);
    let rate = |is_new: bool, rng: &mut fastrand::Rng| {
        let base = if is_new && bad {
            p.bad_error
        } else {
            p.base_error
        };
        base * (0.15 * normal(rng)).exp()
    };
    let rates: Vec<(bool, f64)> = (0..p.hosts)
        .map(|i| {
            let is_new = i < new;
            (is_new, rate(is_new, rng))
        })
        .collect();
    let secs = check.interval.as_secs_f64();
    let intervals = check.samples();
    let mut s = Series {
        new_hosts: new,
        baseline_hosts: p.hosts - new,
        ..Series::default()
    };
    let (mut num, mut den) = ([0.0f64; 2], [0.0f64; 2]);
    for n in 1..=intervals {
        for (is_new, r) in &rates {
            let requests = poisson(rng, p.rps * secs);
            if requests <= 0.0 {
                continue;
            }
            let fluctuation = (0.1 * normal(rng)).exp();
            let errors = poisson(rng, requests * r * fluctuation).min(requests);
            let g = usize::from(!is_new);
            num[g] += errors;
            den[g] += requests;
            if *is_new {
                s.new.push(errors / requests);
            } else {
                s.baseline.push(errors / requests);
            }
        }
        s.value = Some(num[0] / den[0].max(1.0));
        s.baseline_value = Some(num[1] / den[1].max(1.0));
        let look = if n == intervals {
            Look::Final
        } else {
            Look::Interim
        };
        if let Some(v) = judge::metrics(check, 0, &s, look, SystemTime::UNIX_EPOCH) {
            return (v.verdict == Outcome::Fail).then(|| check.interval * n);
        }
    }
    None
}

/// Runs the trials; the scenario's JSON document.
pub fn analysis(p: &Params) -> Value {
    let check = baton_engine::plan::Plan::parse(&format!(
        "[[service]]\nname = \"api\"\nversion = \"2.0.0\"\n[[service.analysis]]\nname = \"errors\"\nkind = \"metrics\"\nurl = \"http://127.0.0.1:1/metrics\"\nratio = [\"errors\", \"requests\"]\n{}",
        p.check
    ))
    .unwrap_or_else(|e| panic!("the check does not parse: {e}"))
    .services[0]
        .analysis[0]
        .clone();
    let mut rng = fastrand::Rng::with_seed(0x00ba_7011);
    let t0 = Instant::now();
    let mut caught: Vec<f64> = (0..p.trials)
        .filter_map(|_| bake(&check, p, true, &mut rng).map(|d| d.as_secs_f64()))
        .collect();
    caught.sort_by(f64::total_cmp);
    let false_aborts = (0..p.trials)
        .filter(|_| bake(&check, p, false, &mut rng).is_some())
        .count();
    let judged_in = t0.elapsed();
    // A whole bake over 10,000 hosts (1,000 of them new): every look's
    // test over every sample so far.
    let big = Params {
        hosts: 10_000,
        ..p.clone()
    };
    let t1 = Instant::now();
    bake(&check, &big, false, &mut rng);
    let big_bake = t1.elapsed();
    let within = Duration::from_secs(180).as_secs_f64();
    let detected = caught.iter().filter(|t| **t <= within).count() as f64 / p.trials as f64;
    let pct = |q: f64| {
        caught
            .get(((caught.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    json!({
        "scenario": "analysis",
        "parameters": {
            "hosts": p.hosts,
            "canary_percent": p.canary_percent,
            "rps_per_host": p.rps,
            "base_error": p.base_error,
            "bad_error": p.bad_error,
            "trials": p.trials,
            "interval_s": check.interval.as_secs_f64(),
            "duration_s": check.duration.as_secs_f64(),
            "tolerance": check.tolerance.get(),
            "confidence": check.confidence.get(),
            "min_samples": check.min_samples,
        },
        "figures": {
            "detected_within_3m": detected,
            "detect_p50_s": pct(0.5),
            "detect_p90_s": pct(0.9),
            "false_abort_rate": false_aborts as f64 / p.trials as f64,
            "judge_all_trials_ms": judged_in.as_secs_f64() * 1000.0,
            "bake_10000_hosts_ms": big_bake.as_secs_f64() * 1000.0,
        },
        "targets": {
            "detected_within_3m": {"min": 0.9},
            "false_abort_rate": {"max": 0.01},
        },
    })
}
