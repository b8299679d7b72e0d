//! The decisions of analysis, as pure functions of the samples: the
//! coordinator's runner gathers, these decide. The benchmark
//! (`baton-bench analysis`) runs the same functions on generated series.
//!
//! - **metrics**: the new version's samples (one per host and interval)
//!   against the baseline's scaled by `1 + tolerance`, by a one-sided
//!   Mann-Whitney U test (ties averaged, normal approximation with tie
//!   correction): it fails when the new version is worse with the plan's
//!   `confidence`. Interim looks (every interval once `min_samples` are
//!   in) fail early only at a ten times stricter level, so looking often
//!   does not buy false aborts. `max`/`min` hold the pooled value.
//! - **prometheus**: each measurement is a success, failure, inconclusive
//!   or error, counted against the limits as Argo Rollouts counts them.
//! - **host**: restarts, memory and open-file growth per host.

use std::time::SystemTime;

use super::{Check, CheckKind, Num, Outcome, Verdict};

/// The result of a Mann-Whitney U test of `x` against `y`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MannWhitney {
    /// U of `x`: how many (x, y) pairs have x above y (ties count half).
    pub u: f64,
    /// Its standardised value (positive: x tends to be larger).
    pub z: f64,
    /// The one-sided p-value of "x tends to be larger than y".
    pub p: f64,
}

/// Mann-Whitney U of `x` against `y`; `None` when either is empty or a
/// value is not finite.
pub fn mann_whitney(x: &[f64], y: &[f64]) -> Option<MannWhitney> {
    let (n, m) = (x.len(), y.len());
    if n == 0 || m == 0 || x.iter().chain(y).any(|v| !v.is_finite()) {
        return None;
    }
    let mut all: Vec<(f64, bool)> = x
        .iter()
        .map(|v| (*v, true))
        .chain(y.iter().map(|v| (*v, false)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = all.len();
    let mut rank_x = 0.0;
    let mut ties = 0.0;
    let mut i = 0;
    while i < total {
        let mut j = i;
        while j + 1 < total && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        // Ranks i+1 ..= j+1, averaged over the tie.
        let rank = (i + j) as f64 / 2.0 + 1.0;
        let t = (j - i + 1) as f64;
        ties += t * t * t - t;
        rank_x += all[i..=j].iter().filter(|(_, from_x)| *from_x).count() as f64 * rank;
        i = j + 1;
    }
    let (nf, mf, nt) = (n as f64, m as f64, total as f64);
    let u = rank_x - nf * (nf + 1.0) / 2.0;
    let mean = nf * mf / 2.0;
    let var = nf * mf / 12.0 * ((nt + 1.0) - ties / (nt * (nt - 1.0)).max(1.0));
    if var <= 0.0 {
        // Every value the same: nothing says x is larger.
        return Some(MannWhitney { u, z: 0.0, p: 0.5 });
    }
    // Continuity correction towards the mean.
    let diff = u - mean;
    let z = (diff - 0.5 * diff.signum()) / var.sqrt();
    Some(MannWhitney {
        u,
        z,
        p: upper_tail(z),
    })
}

/// P(Z > z) for a standard normal Z (|error| < 1.2e-7).
pub fn upper_tail(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// The complementary error function (Numerical Recipes' `erfcc`).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// Whether a judgement is the bake's last or an early look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// After an interval, before the bake ends: only a clear failure is
    /// decided.
    Interim,
    /// The bake is over: pass, fail or inconclusive.
    Final,
}

/// What a metrics check gathered.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// One value per host of the new version and interval.
    pub new: Vec<f64>,
    /// One value per baseline host and interval.
    pub baseline: Vec<f64>,
    /// The new version's pooled value (its ratio of summed increases, its
    /// mean rate, its quantile of summed buckets).
    pub value: Option<f64>,
    /// The baseline's pooled value.
    pub baseline_value: Option<f64>,
    /// Hosts of the new version sampled.
    pub new_hosts: usize,
    /// Hosts still on the old version.
    pub baseline_hosts: usize,
    /// Scrapes that failed (no answer, bad text, missing families).
    pub errors: u32,
    /// Scrapes of the new version's hosts.
    pub new_scrapes: u32,
    /// How many of those failed.
    pub new_errors: u32,
    /// The last error, for the reason.
    pub last_error: Option<String>,
}

fn fmt(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 || v.abs() < 0.001 {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

fn num(v: Option<f64>) -> Option<Num> {
    v.and_then(Num::new)
}

/// Decides a metrics check, or `None` (interim: nothing clear yet).
/// `first_step`: no earlier step compared against a baseline, so a
/// missing baseline is inconclusive rather than skipped.
pub fn metrics(
    check: &Check,
    step: usize,
    s: &Series,
    look: Look,
    now: SystemTime,
) -> Option<Verdict> {
    let verdict = |outcome: Outcome, reason: String| {
        let mut v = Verdict::new(check, step, outcome, reason, now);
        v.value = num(s.value);
        v.baseline = num(s.baseline_value);
        v.samples = s.new.len() as u32;
        v.baseline_samples = s.baseline.len() as u32;
        v.threshold = check.max.or(check.min);
        v
    };
    let enough = s.new.len() >= check.min_samples as usize;
    if !enough {
        if look == Look::Interim {
            return None;
        }
        let why = match (&s.last_error, s.new_hosts) {
            (_, 0) => "no host of the new version to sample".to_owned(),
            (Some(e), _) => format!(
                "{} sample(s) of the new version, min_samples = {} ({} scrape(s) failed, the last: {e})",
                s.new.len(),
                check.min_samples,
                s.errors
            ),
            (None, _) => format!(
                "{} sample(s) of the new version, min_samples = {} (no traffic, or the counters did not move)",
                s.new.len(),
                check.min_samples
            ),
        };
        return Some(verdict(Outcome::Inconclusive, why));
    }
    // Absolute limits, on the pooled value, at the end.
    if look == Look::Final {
        if (check.max.is_some() || check.min.is_some()) && !s.value.is_some_and(f64::is_finite) {
            return Some(verdict(
                Outcome::Inconclusive,
                "no value of the new version to hold to its limit".into(),
            ));
        }
        if let (Some(max), Some(v)) = (check.max, s.value)
            && v > max.get()
        {
            return Some(verdict(
                Outcome::Fail,
                format!(
                    "{} on the new version, above max = {}",
                    fmt(v),
                    fmt(max.get())
                ),
            ));
        }
        if let (Some(min), Some(v)) = (check.min, s.value)
            && v < min.get()
        {
            return Some(verdict(
                Outcome::Fail,
                format!(
                    "{} on the new version, below min = {}",
                    fmt(v),
                    fmt(min.get())
                ),
            ));
        }
    }
    let mut tested = None;
    if check.baseline {
        if s.baseline.len() < check.min_samples as usize {
            if look == Look::Interim {
                return None;
            }
            if check.max.is_some() || check.min.is_some() {
                let mut v = verdict(
                    Outcome::Pass,
                    format!(
                        "{} on the new version within its limit; no baseline to compare ({} host(s) on the old version, {} sample(s))",
                        s.value.map_or("no value".into(), fmt),
                        s.baseline_hosts,
                        s.baseline.len()
                    ),
                );
                v.threshold = check.max.or(check.min);
                return Some(v);
            }
            let (outcome, why) = if s.baseline_hosts == 0 && step > 0 {
                (
                    Outcome::Skipped,
                    "no host is left on the old version; the earlier steps were compared with it"
                        .to_owned(),
                )
            } else {
                (
                    Outcome::Inconclusive,
                    format!(
                        "{} baseline sample(s) from {} host(s) on the old version, min_samples = {}: nothing to compare with",
                        s.baseline.len(),
                        s.baseline_hosts,
                        check.min_samples
                    ),
                )
            };
            return Some(verdict(outcome, why));
        }
        let scale = 1.0 + check.tolerance.get();
        let margin = check.margin.get();
        let scaled: Vec<f64> = s.baseline.iter().map(|v| v * scale + margin).collect();
        let test = mann_whitney(&s.new, &scaled)?;
        let alpha = 1.0 - check.confidence.get();
        let level = match look {
            Look::Final => alpha,
            Look::Interim => alpha / 10.0,
        };
        let compared = format!(
            "{} on the new version vs {} on the baseline (+{:.0} %{} tolerated): Mann-Whitney z = {:.2}, p = {}",
            s.value.map_or("-".into(), fmt),
            s.baseline_value.map_or("-".into(), fmt),
            check.tolerance.get() * 100.0,
            if margin > 0.0 {
                format!(" + {}", fmt(margin))
            } else {
                String::new()
            },
            test.z,
            fmt(test.p)
        );
        if test.p < level {
            let mut v = verdict(Outcome::Fail, format!("{compared} < {}", fmt(level)));
            v.statistic = num(Some(test.z));
            v.p_value = num(Some(test.p));
            return Some(v);
        }
        tested = Some((test, compared));
    }
    if look == Look::Interim {
        return None;
    }
    // Nothing failed; but judged on a few hosts while most failed to
    // answer, it is no pass either.
    if s.new_scrapes > 0 && s.new_errors.saturating_mul(2) > s.new_scrapes {
        return Some(verdict(
            Outcome::Inconclusive,
            format!(
                "{} of {} scrapes of the new version failed (the last: {})",
                s.new_errors,
                s.new_scrapes,
                s.last_error.as_deref().unwrap_or("-")
            ),
        ));
    }
    let mut v = match &tested {
        Some((_, compared)) => verdict(Outcome::Pass, compared.clone()),
        None => verdict(
            Outcome::Pass,
            format!(
                "{} on the new version, within its limit",
                s.value.map_or("-".into(), fmt)
            ),
        ),
    };
    if let Some((test, _)) = tested {
        v.statistic = num(Some(test.z));
        v.p_value = num(Some(test.p));
    }
    Some(v)
}

/// One measurement of a prometheus check.
#[derive(Debug, Clone, PartialEq)]
pub enum Measurement {
    /// The query's value.
    Value(f64),
    /// The query answered with no series.
    Empty,
    /// The query failed.
    Error(String),
}

/// What one value is for a prometheus check.
fn classify(check: &Check, v: f64) -> Outcome {
    let CheckKind::Prometheus {
        success, failure, ..
    } = &check.kind
    else {
        return Outcome::Inconclusive;
    };
    let over = check.max.is_some_and(|m| v > m.get()) || check.min.is_some_and(|m| v < m.get());
    if over || failure.as_ref().is_some_and(|c| c.holds(v)) {
        return Outcome::Fail;
    }
    match (success, failure) {
        (Some(s), _) if s.holds(v) => Outcome::Pass,
        (Some(_), Some(_)) => Outcome::Inconclusive,
        (Some(_), None) => Outcome::Fail,
        (None, _) => Outcome::Pass,
    }
}

/// A prometheus check's measurements so far, counted as they come (the
/// runner keeps this, not the list: a bake of 10,000 measurements on
/// 1,000 hosts costs counters, not memory).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Measurements taken.
    pub total: u32,
    /// Successes.
    pub passed: u32,
    /// Failures.
    pub failed: u32,
    /// Inconclusive or empty measurements.
    pub unclear: u32,
    /// Failed queries.
    pub errors: u32,
    /// Errors in a row now.
    pub run: u32,
    /// The longest run of errors.
    pub max_run: u32,
    /// The last error.
    pub last_error: Option<String>,
    /// The last value.
    pub last: Option<f64>,
}

impl Tally {
    /// Counts one measurement.
    pub fn add(&mut self, check: &Check, m: &Measurement) {
        self.total = self.total.saturating_add(1);
        match m {
            Measurement::Value(v) => {
                self.run = 0;
                self.last = Some(*v);
                match classify(check, *v) {
                    Outcome::Pass => self.passed += 1,
                    Outcome::Fail => self.failed += 1,
                    _ => self.unclear += 1,
                }
            }
            Measurement::Empty => {
                // No data is never a pass.
                self.run = 0;
                self.unclear += 1;
            }
            Measurement::Error(e) => {
                self.errors += 1;
                self.run += 1;
                self.max_run = self.max_run.max(self.run);
                self.last_error = Some(baton_common::text::prefix(e, 200));
            }
        }
    }

    /// The tally of `ms`.
    pub fn of(check: &Check, ms: &[Measurement]) -> Self {
        let mut t = Self::default();
        for m in ms {
            t.add(check, m);
        }
        t
    }
}

/// Decides a prometheus check from its measurements so far, or `None`
/// (interim: nothing decided yet).
pub fn prometheus(
    check: &Check,
    step: usize,
    t: &Tally,
    look: Look,
    now: SystemTime,
) -> Option<Verdict> {
    let CheckKind::Prometheus {
        failure_limit,
        inconclusive_limit,
        consecutive_error_limit,
        ..
    } = &check.kind
    else {
        return None;
    };
    let (passed, failed, unclear, errors, max_run) =
        (t.passed, t.failed, t.unclear, t.errors, t.max_run);
    let last_error = t.last_error.clone();
    let counts = format!(
        "{passed} passed, {failed} failed, {unclear} inconclusive or empty, {errors} error(s) of {} measurement(s)",
        t.total
    );
    let verdict = |outcome: Outcome, reason: String| {
        let mut v = Verdict::new(check, step, outcome, reason, now);
        v.value = num(t.last);
        v.threshold = check.max.or(check.min);
        v.samples = passed + failed + unclear;
        v
    };
    if failed > *failure_limit {
        return Some(verdict(
            Outcome::Fail,
            format!("{counts}: more failures than failure_limit = {failure_limit}"),
        ));
    }
    if max_run > *consecutive_error_limit {
        return Some(verdict(
            Outcome::Inconclusive,
            format!(
                "{counts}: {max_run} errors in a row, more than consecutive_error_limit = {consecutive_error_limit} (the last: {})",
                last_error.unwrap_or_default()
            ),
        ));
    }
    if look == Look::Interim {
        return None;
    }
    if unclear > *inconclusive_limit {
        return Some(verdict(
            Outcome::Inconclusive,
            format!("{counts}: more than inconclusive_limit = {inconclusive_limit}"),
        ));
    }
    let values = passed + failed + unclear;
    let needed = check.min_samples.min(t.total).max(1);
    if passed == 0 || values < needed {
        return Some(verdict(
            Outcome::Inconclusive,
            format!(
                "{counts}: too few measurements with a value to pass (min_samples = {})",
                check.min_samples
            ),
        ));
    }
    Some(verdict(Outcome::Pass, counts))
}

/// What an agent saw of one host's process during a bake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSeen {
    /// The host.
    pub host: String,
    /// Observations taken.
    pub samples: u32,
    /// Restarts (a new process, or the service not running) since the
    /// first observation.
    pub restarts: u32,
    /// Resident memory at the first and the last observation.
    pub rss: Option<(u64, u64)>,
    /// Open files at the first and the last observation.
    pub fds: Option<(u64, u64)>,
    /// The last exit the agent saw, e.g. `exit code 1`.
    pub last_exit: Option<String>,
    /// Requests it answered with an error, and the last error.
    pub errors: u32,
    /// The last error.
    pub last_error: Option<String>,
}

/// Decides a host check over the hosts of the new version.
pub fn host(check: &Check, step: usize, seen: &[HostSeen], now: SystemTime) -> Verdict {
    let CheckKind::Host {
        max_restarts,
        max_memory_growth,
        max_fd_growth,
    } = &check.kind
    else {
        return Verdict::new(
            check,
            step,
            Outcome::Inconclusive,
            "not a host check".into(),
            now,
        );
    };
    let samples: u32 = seen.iter().map(|h| h.samples).sum();
    let verdict = |outcome: Outcome, reason: String, value: Option<f64>, threshold: Option<f64>| {
        let mut v = Verdict::new(check, step, outcome, reason, now);
        v.samples = samples;
        v.value = num(value);
        v.threshold = num(threshold);
        v
    };
    let growth = |pair: Option<(u64, u64)>| {
        pair.filter(|(a, _)| *a > 0)
            .map(|(a, b)| b as f64 / a as f64 - 1.0)
    };
    for h in seen {
        if h.restarts > *max_restarts {
            let exit = h
                .last_exit
                .as_deref()
                .map(|e| format!(", the last {e}"))
                .unwrap_or_default();
            return verdict(
                Outcome::Fail,
                format!(
                    "{} restarted {} time(s), max_restarts = {max_restarts}{exit}",
                    h.host, h.restarts
                ),
                Some(f64::from(h.restarts)),
                Some(f64::from(*max_restarts)),
            );
        }
        if let (Some(limit), Some(g)) = (max_memory_growth, growth(h.rss))
            && g > limit.get()
        {
            return verdict(
                Outcome::Fail,
                format!(
                    "{}: resident memory grew {:.0} %, more than max_memory_growth = {:.0} %",
                    h.host,
                    g * 100.0,
                    limit.get() * 100.0
                ),
                Some(g),
                Some(limit.get()),
            );
        }
        if let (Some(limit), Some(g)) = (max_fd_growth, growth(h.fds))
            && g > limit.get()
        {
            return verdict(
                Outcome::Fail,
                format!(
                    "{}: open files grew {:.0} %, more than max_fd_growth = {:.0} %",
                    h.host,
                    g * 100.0,
                    limit.get() * 100.0
                ),
                Some(g),
                Some(limit.get()),
            );
        }
    }
    // Too few observations, or more errors than answers: not judged.
    let short: Vec<String> = seen
        .iter()
        .filter(|h| h.samples < check.min_samples || h.errors > h.samples)
        .map(|h| match &h.last_error {
            Some(e) => format!("{} ({e})", h.host),
            None => h.host.clone(),
        })
        .collect();
    if seen.is_empty() || !short.is_empty() {
        return verdict(
            Outcome::Inconclusive,
            if seen.is_empty() {
                "no host of the new version to observe".into()
            } else {
                format!(
                    "fewer than min_samples = {} observations, or more errors than answers, on {}",
                    check.min_samples,
                    short.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                )
            },
            None,
            None,
        );
    }
    let restarts: u32 = seen.iter().map(|h| h.restarts).sum();
    verdict(
        Outcome::Pass,
        format!(
            "{} host(s), {samples} observation(s): {restarts} restart(s), memory and open files within limits",
            seen.len()
        ),
        Some(f64::from(restarts)),
        Some(f64::from(*max_restarts)),
    )
}
