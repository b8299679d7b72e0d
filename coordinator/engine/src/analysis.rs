//! Analysis: checks that judge a new version by what it does, not only by
//! its health probe, run for a bake time after each step's hosts turned
//! healthy (`[[service.analysis]]` in a plan).
//!
//! - [`Check`]: one check as the plan gives it, parsed and bounded here;
//! - [`Verdict`]: what a check decided (pass, fail or inconclusive), with
//!   the numbers it decided on;
//! - [`judge`]: the pure decisions the coordinator's analysis runner calls
//!   with the samples it gathered — Mann-Whitney U of the new version's
//!   samples against the baseline's, absolute ceilings, Argo-style
//!   measurement counting, and what the agent sees of a process.
//!
//! No data is never a pass: too few samples, an empty result or errors
//! make a check inconclusive, and the plan says whether that pauses the
//! rollout for an operator or fails it.

use std::time::{Duration, SystemTime};

use baton_common::text::quote;
use serde::{Deserialize, Serialize};

use crate::plan_error::PlanError;

pub mod judge;

/// The most checks one service may have.
pub const MAX_CHECKS: usize = 16;
/// The shortest `interval`.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// The longest `interval`.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// The longest `duration` (bake time).
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// The most samples one check takes per host in one bake
/// (`duration / interval`, and `count`).
pub const MAX_SAMPLES: u32 = 10_000;
/// The longest `url`.
pub const MAX_URL_CHARS: usize = 512;
/// The longest `query`.
pub const MAX_QUERY_CHARS: usize = 4096;
/// The longest metric name.
pub const MAX_METRIC_CHARS: usize = 200;
/// The largest `tolerance` (100 = a hundred times worse).
pub const MAX_TOLERANCE: f64 = 100.0;
/// The verdicts a service keeps in its rollout's record (older ones stay
/// in their own analysis records).
pub const MAX_VERDICTS: usize = 64;
/// The verdicts a rollout's record keeps across all its services (its
/// header must stay well under a store write's 1 MiB).
pub const MAX_ROLLOUT_VERDICTS: usize = 256;
/// The longest reason a verdict keeps.
pub const MAX_REASON_CHARS: usize = 300;

const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_DURATION: Duration = Duration::from_secs(60);
const DEFAULT_TOLERANCE: f64 = 0.3;
const DEFAULT_CONFIDENCE: f64 = 0.99;
const DEFAULT_ERROR_LIMIT: u32 = 4;

/// A finite number that compares by value (so the records that hold one
/// stay `Eq`); never NaN or infinite, so its JSON always reads back.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Num(f64);

impl Num {
    /// `v`, if finite.
    pub fn new(v: f64) -> Option<Self> {
        v.is_finite().then_some(Self(v))
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Num {
    /// Zero.
    pub fn zero() -> Self {
        Self(0.0)
    }
}

impl PartialEq for Num {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Num {}

/// What a check measures and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum CheckKind {
    /// The service's own Prometheus endpoint, scraped by each host's agent.
    Metrics {
        /// `http://127.0.0.1:${port}/metrics` (the host's variables filled
        /// in by its agent; loopback only).
        url: String,
        /// The number computed per host and interval.
        quantity: Quantity,
    },
    /// A PromQL query against the Prometheus server in `batond`'s config.
    Prometheus {
        /// The query, with `${host}`, `${service}` and `${version}`.
        query: String,
        /// A measurement succeeds when this holds.
        success: Option<Condition>,
        /// A measurement fails when this holds.
        failure: Option<Condition>,
        /// Measurements per bake.
        count: u32,
        /// Failed measurements tolerated.
        failure_limit: u32,
        /// Inconclusive measurements tolerated.
        inconclusive_limit: u32,
        /// Errors in a row tolerated.
        consecutive_error_limit: u32,
    },
    /// What the agent sees of the service's process.
    Host {
        /// Restarts tolerated during the bake.
        max_restarts: u32,
        /// Growth of resident memory tolerated (0.5 = 50 %).
        max_memory_growth: Option<Num>,
        /// Growth of open files tolerated.
        max_fd_growth: Option<Num>,
    },
}

impl CheckKind {
    /// `metrics`, `prometheus` or `host`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Metrics { .. } => "metrics",
            Self::Prometheus { .. } => "prometheus",
            Self::Host { .. } => "host",
        }
    }
}

/// The number a `metrics` check computes per host and interval, from the
/// increase of counters between two scrapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantity {
    /// The increase of the first over the increase of the second (an error
    /// ratio); an interval in which the second did not grow has no sample.
    Ratio(String, String),
    /// The increase per second.
    Rate(String),
    /// The value as it is (memory, queue length).
    Gauge(String),
    /// A quantile of a histogram's observations in the interval, from the
    /// increase of its `_bucket` series.
    Quantile(String, Num),
}

impl Quantity {
    /// The metric families the agent must send.
    pub fn families(&self) -> Vec<String> {
        match self {
            Self::Ratio(a, b) => vec![a.clone(), b.clone()],
            Self::Rate(a) | Self::Gauge(a) => vec![a.clone()],
            Self::Quantile(h, _) => vec![format!("{h}_bucket")],
        }
    }
}

/// What an inconclusive check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnInconclusive {
    /// Pause the rollout for an operator (`resume` goes on, `rollback`
    /// undoes it).
    Pause,
    /// Treat it as a failure.
    Fail,
}

/// `result < 0.1`, `result >= 0.95 && result <= 1`, …: clauses joined by
/// `&&` within a group and groups by `||`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition(pub Vec<Vec<(Op, Num)>>);

/// A comparison in a [`Condition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl Condition {
    /// The longest condition.
    pub const MAX_CHARS: usize = 256;

    /// Parses `text`; `at` names the key in errors.
    pub fn parse(text: &str, at: &str) -> Result<Self, PlanError> {
        if text.chars().count() > Self::MAX_CHARS {
            return Err(PlanError(format!(
                "{at}: longer than {} characters",
                Self::MAX_CHARS
            )));
        }
        let bad = |why: &str| {
            PlanError(format!(
                "{at}: {} is not a condition ({why}); write e.g. \"result < 0.05\" or \"result >= 0.9 && result <= 1\"",
                quote(text)
            ))
        };
        let mut groups = Vec::new();
        for group in text.split("||") {
            let mut clauses = Vec::new();
            for clause in group.split("&&") {
                let clause = clause.trim();
                let rest = clause
                    .strip_prefix("result")
                    .ok_or_else(|| bad("each comparison starts with `result`"))?
                    .trim_start();
                let (op, rest) = [
                    ("<=", Op::Le),
                    (">=", Op::Ge),
                    ("==", Op::Eq),
                    ("!=", Op::Ne),
                    ("<", Op::Lt),
                    (">", Op::Gt),
                ]
                .into_iter()
                .find_map(|(s, op)| rest.strip_prefix(s).map(|r| (op, r)))
                .ok_or_else(|| bad("expected <, <=, >, >=, == or !="))?;
                let v: f64 = rest
                    .trim()
                    .parse()
                    .map_err(|_| bad("expected a number after the comparison"))?;
                let v = Num::new(v).ok_or_else(|| bad("the number must be finite"))?;
                clauses.push((op, v));
            }
            groups.push(clauses);
        }
        Ok(Self(groups))
    }

    /// Whether `v` satisfies it.
    pub fn holds(&self, v: f64) -> bool {
        self.0.iter().any(|group| {
            group.iter().all(|(op, n)| {
                let n = n.get();
                match op {
                    Op::Lt => v < n,
                    Op::Le => v <= n,
                    Op::Gt => v > n,
                    Op::Ge => v >= n,
                    Op::Eq => v == n,
                    Op::Ne => v != n,
                }
            })
        })
    }
}

/// One `[[service.analysis]]` table, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Unique within the service.
    pub name: String,
    /// What it measures.
    pub kind: CheckKind,
    /// Compare the new version's hosts with those still on the old one.
    pub baseline: bool,
    /// How much worse than the baseline still passes (0.5 = 50 %).
    pub tolerance: Num,
    /// And by how much more, absolutely (a baseline of zero errors
    /// tolerates nothing by a ratio alone).
    #[serde(default = "Num::zero")]
    pub margin: Num,
    /// An absolute ceiling.
    pub max: Option<Num>,
    /// An absolute floor.
    pub min: Option<Num>,
    /// The confidence a baseline comparison needs to fail (0.99).
    pub confidence: Num,
    /// One sample per interval.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// The bake time.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Fewer samples of the new version: inconclusive, never a pass.
    pub min_samples: u32,
    /// What an inconclusive verdict does.
    pub on_inconclusive: OnInconclusive,
}

/// The keys of `[[service.analysis]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCheck {
    name: String,
    kind: String,
    url: Option<String>,
    ratio: Option<Vec<String>>,
    rate: Option<String>,
    gauge: Option<String>,
    histogram: Option<String>,
    quantile: Option<f64>,
    baseline: Option<bool>,
    tolerance: Option<f64>,
    margin: Option<f64>,
    max: Option<f64>,
    min: Option<f64>,
    confidence: Option<f64>,
    interval: Option<String>,
    duration: Option<String>,
    min_samples: Option<i64>,
    on_inconclusive: Option<String>,
    query: Option<String>,
    success: Option<String>,
    failure: Option<String>,
    count: Option<i64>,
    failure_limit: Option<i64>,
    inconclusive_limit: Option<i64>,
    consecutive_error_limit: Option<i64>,
    max_restarts: Option<i64>,
    max_memory_growth: Option<f64>,
    max_fd_growth: Option<f64>,
}

fn metric_name(name: &str, at: &str) -> Result<String, PlanError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_METRIC_CHARS
        && name.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
        });
    if ok {
        Ok(name.to_owned())
    } else {
        Err(PlanError(format!(
            "{at}: {} is not a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*, at most {MAX_METRIC_CHARS} characters)",
            quote(name)
        )))
    }
}

fn count(v: Option<i64>, default: u32, max: u32, at: &str) -> Result<u32, PlanError> {
    match v {
        None => Ok(default),
        Some(n) if n < 0 => Err(PlanError(format!("{at}: must be 0 or more"))),
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| PlanError(format!("{at}: {n} is more than the limit of {max}"))),
    }
}

fn number(v: Option<f64>, at: &str) -> Result<Option<Num>, PlanError> {
    v.map(|v| Num::new(v).ok_or_else(|| PlanError(format!("{at}: must be a finite number"))))
        .transpose()
}

fn span(
    text: Option<&str>,
    default: Duration,
    min: Duration,
    max: Duration,
    at: &str,
) -> Result<Duration, PlanError> {
    match text {
        None => Ok(default),
        Some(t) => baton_common::time::parse_bounded(t, min, max)
            .map_err(|e| PlanError(format!("{at}: {e}"))),
    }
}

impl Check {
    /// Checks one table; `at` is `service "api" (#1): analysis[0]`.
    pub(crate) fn parse(raw: RawCheck, at: &str) -> Result<Self, PlanError> {
        let key = |k: &str| format!("{at}.{k}");
        baton_common::names::check(&raw.name, None)
            .map_err(|e| PlanError(format!("{}: {e}", key("name"))))?;
        let interval = span(
            raw.interval.as_deref(),
            DEFAULT_INTERVAL,
            MIN_INTERVAL,
            MAX_INTERVAL,
            &key("interval"),
        )?;
        let duration = span(
            raw.duration.as_deref(),
            DEFAULT_DURATION,
            MIN_INTERVAL,
            MAX_DURATION,
            &key("duration"),
        )?;
        if duration < interval {
            return Err(PlanError(format!(
                "{}: {} is shorter than interval {}; a bake takes at least one sample",
                key("duration"),
                humantime::format_duration(duration),
                humantime::format_duration(interval)
            )));
        }
        let samples = duration.as_nanos() / interval.as_nanos().max(1);
        if samples > u128::from(MAX_SAMPLES) {
            return Err(PlanError(format!(
                "{}: {samples} samples per host (duration / interval), more than the limit of {MAX_SAMPLES}; take a longer interval",
                key("duration")
            )));
        }
        let samples = samples as u32;
        let tolerance = number(raw.tolerance, &key("tolerance"))?.unwrap_or(Num(DEFAULT_TOLERANCE));
        if !(0.0..=MAX_TOLERANCE).contains(&tolerance.get()) {
            return Err(PlanError(format!(
                "{}: must be between 0 and {MAX_TOLERANCE}",
                key("tolerance")
            )));
        }
        let margin = number(raw.margin, &key("margin"))?.unwrap_or(Num(0.0));
        if margin.get() < 0.0 {
            return Err(PlanError(format!("{}: must be 0 or more", key("margin"))));
        }
        if raw.margin.is_some() && !raw.baseline.unwrap_or(false) {
            return Err(PlanError(format!(
                "{}: only with baseline = true",
                key("margin")
            )));
        }
        let confidence =
            number(raw.confidence, &key("confidence"))?.unwrap_or(Num(DEFAULT_CONFIDENCE));
        if !(0.5..1.0).contains(&confidence.get()) {
            return Err(PlanError(format!(
                "{}: must be at least 0.5 and less than 1 (0.99 is usual)",
                key("confidence")
            )));
        }
        let max = number(raw.max, &key("max"))?;
        let min = number(raw.min, &key("min"))?;
        if let (Some(lo), Some(hi)) = (min, max)
            && lo.get() > hi.get()
        {
            return Err(PlanError(format!("{}: min is above max", key("min"))));
        }
        let min_samples = count(
            raw.min_samples,
            samples.clamp(1, 5),
            MAX_SAMPLES,
            &key("min_samples"),
        )?;
        if min_samples == 0 {
            return Err(PlanError(format!(
                "{}: must be at least 1: no data is never a pass",
                key("min_samples")
            )));
        }
        let on_inconclusive = match raw.on_inconclusive.as_deref().unwrap_or("pause") {
            "pause" => OnInconclusive::Pause,
            "fail" => OnInconclusive::Fail,
            other => {
                return Err(PlanError(format!(
                    "{}: {} is neither \"pause\" nor \"fail\"",
                    key("on_inconclusive"),
                    quote(other)
                )));
            }
        };
        let only = |k: &str, given: bool, kind: &str| {
            if given {
                Err(PlanError(format!(
                    "{}: only applies to kind = \"{kind}\"",
                    key(k)
                )))
            } else {
                Ok(())
            }
        };
        let metrics_keys = raw.url.is_some()
            || raw.ratio.is_some()
            || raw.rate.is_some()
            || raw.gauge.is_some()
            || raw.histogram.is_some()
            || raw.quantile.is_some();
        let prometheus_keys = raw.query.is_some()
            || raw.success.is_some()
            || raw.failure.is_some()
            || raw.count.is_some()
            || raw.failure_limit.is_some()
            || raw.inconclusive_limit.is_some()
            || raw.consecutive_error_limit.is_some();
        let host_keys = raw.max_restarts.is_some()
            || raw.max_memory_growth.is_some()
            || raw.max_fd_growth.is_some();
        let baseline = raw.baseline.unwrap_or(false);
        let kind = match raw.kind.as_str() {
            "metrics" => {
                only("query", prometheus_keys, "prometheus")?;
                only("max_restarts", host_keys, "host")?;
                let url = raw.url.ok_or_else(|| {
                    PlanError(format!(
                        "{}: a metrics check needs the service's endpoint, e.g. \"http://127.0.0.1:${{port}}/metrics\"",
                        key("url")
                    ))
                })?;
                if url.chars().count() > MAX_URL_CHARS || !url.starts_with("http://") {
                    return Err(PlanError(format!(
                        "{}: {} must be an http:// URL of at most {MAX_URL_CHARS} characters (the agent fetches it on its own host)",
                        key("url"),
                        quote(&url)
                    )));
                }
                let given = [
                    raw.ratio.is_some(),
                    raw.rate.is_some(),
                    raw.gauge.is_some(),
                    raw.histogram.is_some(),
                ]
                .iter()
                .filter(|g| **g)
                .count();
                if given != 1 {
                    return Err(PlanError(format!(
                        "{at}: a metrics check computes exactly one of ratio = [\"errors\", \"requests\"], rate = \"name\", gauge = \"name\" or histogram = \"name\" (with quantile)"
                    )));
                }
                let quantity = if let Some(pair) = raw.ratio {
                    let [a, b] = <[String; 2]>::try_from(pair).map_err(|_| {
                        PlanError(format!(
                            "{}: name two counters, [\"errors\", \"requests\"]",
                            key("ratio")
                        ))
                    })?;
                    Quantity::Ratio(
                        metric_name(&a, &key("ratio"))?,
                        metric_name(&b, &key("ratio"))?,
                    )
                } else if let Some(r) = raw.rate {
                    Quantity::Rate(metric_name(&r, &key("rate"))?)
                } else if let Some(g) = raw.gauge {
                    Quantity::Gauge(metric_name(&g, &key("gauge"))?)
                } else {
                    let h = raw.histogram.unwrap_or_default();
                    let q = raw.quantile.ok_or_else(|| {
                        PlanError(format!(
                            "{}: a histogram needs quantile = 0.99 (or another)",
                            key("quantile")
                        ))
                    })?;
                    if !(q > 0.0 && q < 1.0) {
                        return Err(PlanError(format!(
                            "{}: must be between 0 and 1",
                            key("quantile")
                        )));
                    }
                    Quantity::Quantile(metric_name(&h, &key("histogram"))?, Num(q))
                };
                if raw.quantile.is_some() && !matches!(quantity, Quantity::Quantile(..)) {
                    return Err(PlanError(format!(
                        "{}: only with histogram",
                        key("quantile")
                    )));
                }
                if !baseline && max.is_none() && min.is_none() {
                    return Err(PlanError(format!(
                        "{at}: say what fails: baseline = true (compare with hosts on the old version), max or min"
                    )));
                }
                CheckKind::Metrics { url, quantity }
            }
            "prometheus" => {
                only("url", metrics_keys, "metrics")?;
                only("max_restarts", host_keys, "host")?;
                if baseline {
                    return Err(PlanError(format!(
                        "{}: a prometheus check judges its query's result; compare versions inside the query",
                        key("baseline")
                    )));
                }
                let query = raw.query.ok_or_else(|| {
                    PlanError(format!(
                        "{}: a prometheus check needs a PromQL query",
                        key("query")
                    ))
                })?;
                if query.trim().is_empty() || query.chars().count() > MAX_QUERY_CHARS {
                    return Err(PlanError(format!(
                        "{}: must be 1 to {MAX_QUERY_CHARS} characters",
                        key("query")
                    )));
                }
                let success = raw
                    .success
                    .as_deref()
                    .map(|t| Condition::parse(t, &key("success")))
                    .transpose()?;
                let failure = raw
                    .failure
                    .as_deref()
                    .map(|t| Condition::parse(t, &key("failure")))
                    .transpose()?;
                if success.is_none() && failure.is_none() && max.is_none() && min.is_none() {
                    return Err(PlanError(format!(
                        "{at}: say what passes or fails: max, min, success or failure"
                    )));
                }
                let measurements =
                    count(raw.count, samples.max(1), MAX_SAMPLES, &key("count"))?.max(1);
                CheckKind::Prometheus {
                    query,
                    success,
                    failure,
                    count: measurements,
                    failure_limit: count_limit(raw.failure_limit, &key("failure_limit"))?,
                    inconclusive_limit: count_limit(
                        raw.inconclusive_limit,
                        &key("inconclusive_limit"),
                    )?,
                    consecutive_error_limit: count(
                        raw.consecutive_error_limit,
                        DEFAULT_ERROR_LIMIT,
                        MAX_SAMPLES,
                        &key("consecutive_error_limit"),
                    )?,
                }
            }
            "host" => {
                only("url", metrics_keys, "metrics")?;
                only("query", prometheus_keys, "prometheus")?;
                if baseline || max.is_some() || min.is_some() {
                    return Err(PlanError(format!(
                        "{at}: a host check is judged by max_restarts, max_memory_growth and max_fd_growth"
                    )));
                }
                let growth = |v: Option<f64>, k: &str| -> Result<Option<Num>, PlanError> {
                    let n = number(v, &key(k))?;
                    if n.is_some_and(|n| n.get() < 0.0) {
                        return Err(PlanError(format!("{}: must be 0 or more", key(k))));
                    }
                    Ok(n)
                };
                CheckKind::Host {
                    max_restarts: count(raw.max_restarts, 0, MAX_SAMPLES, &key("max_restarts"))?,
                    max_memory_growth: growth(raw.max_memory_growth, "max_memory_growth")?,
                    max_fd_growth: growth(raw.max_fd_growth, "max_fd_growth")?,
                }
            }
            other => {
                return Err(PlanError(format!(
                    "{}: unknown kind {}; expected \"metrics\", \"prometheus\" or \"host\"",
                    key("kind"),
                    quote(other)
                )));
            }
        };
        Ok(Self {
            name: raw.name,
            kind,
            baseline,
            tolerance,
            margin,
            max,
            min,
            confidence,
            interval,
            duration,
            min_samples,
            on_inconclusive,
        })
    }

    /// How many samples a bake takes per host.
    pub fn samples(&self) -> u32 {
        match &self.kind {
            CheckKind::Prometheus { count, .. } => *count,
            _ => (self.duration.as_nanos() / self.interval.as_nanos().max(1))
                .clamp(1, u128::from(MAX_SAMPLES)) as u32,
        }
    }
}

fn count_limit(v: Option<i64>, at: &str) -> Result<u32, PlanError> {
    count(v, 0, MAX_SAMPLES, at)
}

/// What a check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The new version is no worse than allowed.
    Pass,
    /// It is worse.
    Fail,
    /// Not enough to decide (no data, too few samples, errors).
    Inconclusive,
    /// Not run for this step: a baseline comparison after the last step,
    /// when no host is left on the old version (its earlier steps were).
    Skipped,
}

impl Outcome {
    /// The name in `status` and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::Inconclusive => "inconclusive",
            Self::Skipped => "skipped",
        }
    }
}

/// A check's verdict on one step, with what it was decided on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The check's name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// The step it judged (0 is the first batch or the canary).
    pub step: usize,
    /// The decision.
    pub verdict: Outcome,
    /// Why, in a sentence with the numbers.
    pub reason: String,
    /// The new version's value (its pooled ratio, mean or quantile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Num>,
    /// The baseline's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Num>,
    /// The limit the value was held to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<Num>,
    /// The test statistic (Mann-Whitney's z).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistic: Option<Num>,
    /// Its one-sided p-value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p_value: Option<Num>,
    /// Samples of the new version.
    pub samples: u32,
    /// Samples of the baseline.
    #[serde(default)]
    pub baseline_samples: u32,
    /// When it was decided.
    #[serde(with = "humantime_serde")]
    pub at: SystemTime,
}

impl Verdict {
    /// A verdict with only a reason (the numbers are filled in after).
    pub fn new(
        check: &Check,
        step: usize,
        verdict: Outcome,
        reason: String,
        at: SystemTime,
    ) -> Self {
        Self {
            name: check.name.clone(),
            kind: check.kind.name().to_owned(),
            step,
            verdict,
            reason: baton_common::text::prefix(&reason, MAX_REASON_CHARS),
            value: None,
            baseline: None,
            threshold: None,
            statistic: None,
            p_value: None,
            samples: 0,
            baseline_samples: 0,
            at,
        }
    }
}

#[cfg(test)]
mod tests;
