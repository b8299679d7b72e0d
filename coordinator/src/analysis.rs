//! The analysis runner: takes the samples of a bake — from each host's
//! agent (`metrics`, `host`) or from Prometheus (`prometheus`) — every
//! `interval` for `duration`, and asks the engine's judge
//! ([`baton_engine::analysis::judge`]) what they say. A clear failure ends
//! a bake early; anything else is decided when it ends.
//!
//! The driver starts one run per bake in progress (after a restart too: a
//! bake interrupted by a crash starts again from its beginning, and
//! verdicts already reached are in the rollout's record) and turns its
//! result into an [`Event::Analysis`](baton_engine::Event).
//!
//! Bounded: at most [`CONCURRENCY`] samples in flight per check, at most
//! [`MAX_JUDGED`] samples per group judged (the latest), at most
//! [`MAX_KEPT`] per group kept in the stored record.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use baton_common::host::HostId;
use baton_engine::analysis::judge::{self, HostSeen, Look, Measurement, Series};
use baton_engine::analysis::{Check, CheckKind, Outcome, Quantity, Verdict};
use baton_proto::agent::v1::{MetricSample, ProcessSample, SampleRequest};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::fleet::FleetHandle;

/// Samples asked at once per check.
pub const CONCURRENCY: usize = 256;
/// The most samples per group (new, baseline) a judgement takes.
pub const MAX_JUDGED: usize = 100_000;
/// The most samples per group a verdict's record keeps.
pub const MAX_KEPT: usize = 512;
/// The most hosts of each group (new, baseline) sampled in one bake: a
/// random choice among more, so a bake over 10,000 hosts asks 2,000 agents
/// an interval, not 10,000.
pub const MAX_SAMPLED_HOSTS: usize = 1000;
/// The longest a sample may take.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most hosts a `${host}` query runs for in one bake.
pub const MAX_QUERIED_HOSTS: usize = 100;
/// Prometheus queries in flight at once per check.
const QUERIES_AT_ONCE: usize = 16;
/// The longest a Prometheus query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest Prometheus answer read.
const MAX_QUERY_BODY: usize = 1 << 20;

/// One bake to run.
#[derive(Debug, Clone)]
pub struct Bake {
    /// The rollout.
    pub rollout: String,
    /// The service's index and name.
    pub service: usize,
    /// Its name.
    pub name: String,
    /// The version under test.
    pub version: String,
    /// The step judged.
    pub step: usize,
    /// The checks.
    pub checks: Vec<Check>,
    /// Hosts on the new version.
    pub new_hosts: Vec<HostId>,
    /// Hosts still on the old version.
    pub baseline_hosts: Vec<HostId>,
}

/// What a check saw, kept with its verdict (`rollout-analysis/…`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Samples {
    /// The check.
    pub check: String,
    /// The new version's samples, in order (the last [`MAX_KEPT`]).
    pub new: Vec<f64>,
    /// The baseline's.
    pub baseline: Vec<f64>,
}

/// The key of a verdict's samples.
pub fn samples_key(rollout: &str, service: usize, step: usize, check: &str) -> String {
    format!("rollout-analysis/{rollout}/{service}/{step:04}/{check}")
}

/// The prefix of a rollout's sample records.
pub fn samples_prefix(rollout: &str) -> String {
    format!("rollout-analysis/{rollout}/")
}

/// One host's answer to a sample request.
enum Answer {
    /// The reply, and when it came.
    Reply(baton_proto::agent::v1::SampleReply, Instant),
    /// Not connected now.
    Away,
    Failed(String),
}

/// Text from an agent, without control characters (it reaches terminals
/// through `status`).
fn clean(text: &str) -> String {
    baton_common::text::prefix(text, 300)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A bake's result.
#[derive(Debug, Clone)]
pub struct Result {
    /// What was run.
    pub bake: Bake,
    /// One verdict per check.
    pub verdicts: Vec<Verdict>,
    /// What each check saw.
    pub samples: Vec<Samples>,
}

/// Runs bakes.
#[derive(Clone)]
pub struct Analyzer {
    fleet: FleetHandle,
    prometheus: Option<String>,
    client: reqwest::Client,
}

impl Analyzer {
    /// An analyzer asking `fleet`'s agents, and the Prometheus server at
    /// `prometheus` (its base URL) when there is one.
    pub fn new(fleet: FleetHandle, prometheus: Option<String>) -> Self {
        let client = reqwest::Client::builder()
            .timeout(QUERY_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self {
            fleet,
            prometheus,
            client,
        }
    }

    /// Runs every check of `bake` at once; ends early when `cancel` fires
    /// (the verdicts then say so, and the driver drops them).
    pub async fn run(&self, mut bake: Bake, cancel: CancellationToken) -> Result {
        for group in [&mut bake.new_hosts, &mut bake.baseline_hosts] {
            if group.len() > MAX_SAMPLED_HOSTS {
                fastrand::shuffle(group);
                group.truncate(MAX_SAMPLED_HOSTS);
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (i, check) in bake.checks.iter().cloned().enumerate() {
            let this = self.clone();
            let bake = bake.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move { (i, this.check(&bake, &check, &cancel).await) });
        }
        let mut out: Vec<Option<(Verdict, Samples)>> = vec![None; bake.checks.len()];
        while let Some(done) = tasks.join_next().await {
            if let Ok((i, v)) = done {
                out[i] = Some(v);
            }
        }
        let (verdicts, samples) = out
            .into_iter()
            .zip(&bake.checks)
            .map(|(v, check)| {
                v.unwrap_or_else(|| {
                    (
                        Verdict::new(
                            check,
                            bake.step,
                            Outcome::Inconclusive,
                            "the check's task failed".into(),
                            SystemTime::now(),
                        ),
                        Samples::default(),
                    )
                })
            })
            .unzip();
        Result {
            bake,
            verdicts,
            samples,
        }
    }

    async fn check(
        &self,
        bake: &Bake,
        check: &Check,
        cancel: &CancellationToken,
    ) -> (Verdict, Samples) {
        match &check.kind {
            CheckKind::Metrics { url, quantity } => {
                self.metrics(bake, check, url, quantity, cancel).await
            }
            CheckKind::Host { .. } => self.host(bake, check, cancel).await,
            CheckKind::Prometheus { query, count, .. } => {
                self.prometheus(bake, check, query, *count, cancel).await
            }
        }
    }

    /// Waits for the next interval of a bake begun at `start`; false when
    /// the bake is over or cancelled.
    async fn tick(start: Instant, check: &Check, n: u32, cancel: &CancellationToken) -> bool {
        let Some(at) = check.interval.checked_mul(n).map(|d| start + d) else {
            return false;
        };
        if at > start + check.duration + Duration::from_millis(5) {
            return false;
        }
        tokio::select! {
            () = cancel.cancelled() => false,
            () = tokio::time::sleep_until(at.into()) => true,
        }
    }

    /// Asks every host in `hosts` at once (bounded), answers by host.
    async fn ask_all(
        &self,
        hosts: &[HostId],
        make: impl Fn() -> SampleRequest,
    ) -> HashMap<HostId, Answer> {
        let limit = Arc::new(Semaphore::new(CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        for host in hosts {
            let host = host.clone();
            let req = make();
            let fleet = self.fleet.clone();
            let limit = limit.clone();
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let answer = match fleet.agent_sender(&host).await {
                    Ok(agent) => match fleet
                        .samples()
                        .ask(&host, &agent, req, SAMPLE_TIMEOUT)
                        .await
                    {
                        Ok(reply) => Answer::Reply(reply, Instant::now()),
                        Err(e) => Answer::Failed(clean(&e)),
                    },
                    // Away (after a restart, before it reconnects): no
                    // sample, and no error either.
                    Err(crate::fleet::SendError::NotConnected(_)) => Answer::Away,
                    Err(e) => Answer::Failed(e.to_string()),
                };
                (host, answer)
            });
        }
        let mut out = HashMap::with_capacity(hosts.len());
        while let Some(done) = tasks.join_next().await {
            if let Ok((host, answer)) = done {
                out.insert(host, answer);
            }
        }
        out
    }

    async fn metrics(
        &self,
        bake: &Bake,
        check: &Check,
        url: &str,
        quantity: &Quantity,
        cancel: &CancellationToken,
    ) -> (Verdict, Samples) {
        let families = quantity.families();
        let timeout_ms =
            u32::try_from(check.interval.min(SAMPLE_TIMEOUT).as_millis()).unwrap_or(5000);
        let make = || SampleRequest {
            service: bake.name.clone(),
            url: url.to_owned(),
            families: families.clone(),
            timeout_ms,
            ..SampleRequest::default()
        };
        let all: Vec<HostId> = bake
            .new_hosts
            .iter()
            .chain(
                check
                    .baseline
                    .then_some(&bake.baseline_hosts)
                    .into_iter()
                    .flatten(),
            )
            .cloned()
            .collect();
        let start = Instant::now();
        let new_hosts: std::collections::HashSet<&HostId> = bake.new_hosts.iter().collect();
        let mut prev: HashMap<HostId, (Instant, Vec<MetricSample>)> = HashMap::new();
        let mut groups = [Group::default(), Group::default()];
        let mut series = Series {
            new_hosts: bake.new_hosts.len(),
            baseline_hosts: bake.baseline_hosts.len(),
            ..Series::default()
        };
        let mut n = 0u32;
        loop {
            let answers = self.ask_all(&all, make).await;
            for (host, answer) in answers {
                let is_new = new_hosts.contains(&host);
                let g = usize::from(!is_new);
                match answer {
                    Answer::Reply(reply, now) => {
                        series.new_scrapes += u32::from(is_new);
                        if let Some((then, before)) =
                            prev.insert(host.clone(), (now, reply.samples.clone()))
                        {
                            // Rates over the time the scrapes were apart,
                            // not the nominal interval.
                            let apart = now.duration_since(then).max(Duration::from_millis(1));
                            groups[g].add(quantity, &before, &reply.samples, apart);
                        }
                    }
                    Answer::Away => {
                        // No sample; for the new version a scrape missed
                        // all the same (most missed: not judged).
                        series.new_scrapes += u32::from(is_new);
                        series.new_errors += u32::from(is_new);
                        if is_new {
                            series.last_error = Some(format!("{host}: not connected"));
                        }
                        prev.remove(&host);
                    }
                    Answer::Failed(e) => {
                        series.errors += 1;
                        series.new_scrapes += u32::from(is_new);
                        series.new_errors += u32::from(is_new);
                        series.last_error = Some(format!("{host}: {e}"));
                        // A gap: the next answer starts a new interval.
                        prev.remove(&host);
                    }
                }
            }
            groups[0].fill(&mut series.new, &mut series.value);
            groups[1].fill(&mut series.baseline, &mut series.baseline_value);
            n += 1;
            let last = !Self::tick(start, check, n, cancel).await;
            let look = if last { Look::Final } else { Look::Interim };
            if let Some(v) = judge::metrics(check, bake.step, &series, look, SystemTime::now())
                && (last || v.verdict == Outcome::Fail)
            {
                return (v, kept(&check.name, &series.new, &series.baseline));
            }
            if last || cancel.is_cancelled() {
                let v = judge::metrics(check, bake.step, &series, Look::Final, SystemTime::now())
                    .unwrap_or_else(|| {
                        Verdict::new(
                            check,
                            bake.step,
                            Outcome::Inconclusive,
                            "no judgement".into(),
                            SystemTime::now(),
                        )
                    });
                return (v, kept(&check.name, &series.new, &series.baseline));
            }
        }
    }

    async fn host(
        &self,
        bake: &Bake,
        check: &Check,
        cancel: &CancellationToken,
    ) -> (Verdict, Samples) {
        let make = || SampleRequest {
            service: bake.name.clone(),
            process: true,
            ..SampleRequest::default()
        };
        let start = Instant::now();
        // Every host of the new version is judged: one that never answers
        // has no observation and is inconclusive, never a pass.
        let mut seen: HashMap<HostId, (HostSeen, Option<ProcessSample>)> = bake
            .new_hosts
            .iter()
            .map(|h| {
                (
                    h.clone(),
                    (
                        HostSeen {
                            host: h.to_string(),
                            ..HostSeen::default()
                        },
                        None,
                    ),
                )
            })
            .collect();
        let mut n = 0u32;
        loop {
            for (host, answer) in self.ask_all(&bake.new_hosts, make).await {
                let Some((h, last)) = seen.get_mut(&host) else {
                    continue;
                };
                let reply = match answer {
                    Answer::Reply(reply, _) => reply,
                    Answer::Away => {
                        h.errors += 1;
                        h.last_error = Some("not connected".into());
                        continue;
                    }
                    Answer::Failed(e) => {
                        h.errors += 1;
                        h.last_error = Some(e);
                        continue;
                    }
                };
                let p = reply.process.unwrap_or_default();
                h.samples += 1;
                match last {
                    None => {
                        h.rss = (p.rss_bytes > 0).then_some((p.rss_bytes, p.rss_bytes));
                        h.fds = (p.open_fds > 0).then_some((p.open_fds, p.open_fds));
                    }
                    Some(last) => {
                        // A restart: the supervisor counted one, the pid
                        // changed, or nothing runs where something ran.
                        let counted = p.restarts.saturating_sub(last.restarts);
                        let replaced = u32::from(
                            counted == 0 && p.pid != 0 && last.pid != 0 && p.pid != last.pid,
                        );
                        let stopped = u32::from(counted == 0 && last.running && !p.running);
                        h.restarts = h.restarts.saturating_add(counted + replaced + stopped);
                        if let Some((first, _)) = h.rss
                            && p.rss_bytes > 0
                        {
                            h.rss = Some((first, p.rss_bytes));
                        }
                        if let Some((first, _)) = h.fds
                            && p.open_fds > 0
                        {
                            h.fds = Some((first, p.open_fds));
                        }
                    }
                }
                if !p.last_exit.is_empty() {
                    h.last_exit = Some(clean(&p.last_exit));
                }
                *last = Some(p);
            }
            n += 1;
            let hosts: Vec<HostSeen> = seen.values().map(|(h, _)| h.clone()).collect();
            let last = !Self::tick(start, check, n, cancel).await;
            let v = judge::host(check, bake.step, &hosts, SystemTime::now());
            if last || v.verdict == Outcome::Fail {
                let values: Vec<f64> = hosts.iter().map(|h| f64::from(h.restarts)).collect();
                return (v, kept(&check.name, &values, &[]));
            }
        }
    }

    async fn prometheus(
        &self,
        bake: &Bake,
        check: &Check,
        query: &str,
        count: u32,
        cancel: &CancellationToken,
    ) -> (Verdict, Samples) {
        let queries: Vec<String> = if query.contains("${host}") {
            // Once per host of the new version, at most
            // MAX_QUERIED_HOSTS of them, chosen at random.
            let mut hosts = bake.new_hosts.clone();
            if hosts.len() > MAX_QUERIED_HOSTS {
                fastrand::shuffle(&mut hosts);
                hosts.truncate(MAX_QUERIED_HOSTS);
            }
            hosts.iter().map(|h| fill(query, bake, Some(h))).collect()
        } else {
            vec![fill(query, bake, None)]
        };
        let start = Instant::now();
        // Counted as they come; only the last values are kept for the chart.
        let mut tally = judge::Tally::default();
        let mut values: std::collections::VecDeque<f64> = std::collections::VecDeque::new();
        let timeout = check
            .interval
            .clamp(Duration::from_millis(100), QUERY_TIMEOUT);
        let mut n = 0u32;
        loop {
            // The round's queries at once (at most QUERIES_AT_ONCE), each
            // within the interval.
            let limit = Arc::new(Semaphore::new(QUERIES_AT_ONCE));
            let mut round = tokio::task::JoinSet::new();
            for q in &queries {
                let (this, q, limit) = (self.clone(), q.clone(), limit.clone());
                round.spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    match tokio::time::timeout(timeout, this.query(&q)).await {
                        Ok(m) => m,
                        Err(_) => Measurement::Error(format!(
                            "no answer within {}",
                            humantime::format_duration(timeout)
                        )),
                    }
                });
            }
            while let Some(done) = round.join_next().await {
                let m = done.unwrap_or_else(|e| Measurement::Error(e.to_string()));
                if let Measurement::Value(v) = m {
                    values.push_back(v);
                    if values.len() > MAX_KEPT {
                        values.pop_front();
                    }
                }
                tally.add(check, &m);
            }
            n += 1;
            let last = n >= count || !Self::tick(start, check, n, cancel).await;
            let look = if last { Look::Final } else { Look::Interim };
            if let Some(v) = judge::prometheus(check, bake.step, &tally, look, SystemTime::now())
                && (last || matches!(v.verdict, Outcome::Fail | Outcome::Inconclusive))
            {
                let values: Vec<f64> = values.into_iter().collect();
                return (v, kept(&check.name, &values, &[]));
            }
        }
    }

    /// One instant query's single number.
    async fn query(&self, query: &str) -> Measurement {
        let Some(base) = &self.prometheus else {
            return Measurement::Error(
                "batond has no prometheus-url: set it in batond.toml or with --prometheus-url"
                    .into(),
            );
        };
        let url = format!("{}/api/v1/query", base.trim_end_matches('/'));
        let response = match self
            .client
            .get(&url)
            .query(&[("query", query)])
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return Measurement::Error(format!("{url}: {e}")),
        };
        let status = response.status();
        let body = match read_capped(response, MAX_QUERY_BODY).await {
            Ok(b) => b,
            Err(e) => return Measurement::Error(e),
        };
        if !status.is_success() {
            return Measurement::Error(format!(
                "{url} answered {status}: {}",
                baton_common::text::prefix(&String::from_utf8_lossy(&body), 200)
            ));
        }
        parse_query(&body)
    }
}

async fn read_capped(
    mut response: reqwest::Response,
    max: usize,
) -> std::result::Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > max {
            return Err(format!("the answer is larger than {} KiB", max >> 10));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A Prometheus instant-query answer as one measurement.
pub fn parse_query(body: &[u8]) -> Measurement {
    #[derive(Deserialize)]
    struct QueryAnswer {
        status: String,
        #[serde(default)]
        error: String,
        data: Option<Data>,
    }
    #[derive(Deserialize)]
    struct Data {
        #[serde(rename = "resultType")]
        kind: String,
        result: serde_json::Value,
    }
    let answer: QueryAnswer = match serde_json::from_slice(body) {
        Ok(a) => a,
        Err(e) => return Measurement::Error(format!("not a Prometheus answer: {e}")),
    };
    if answer.status != "success" {
        return Measurement::Error(format!(
            "the query failed: {}",
            baton_common::text::prefix(&answer.error, 200)
        ));
    }
    let Some(data) = answer.data else {
        return Measurement::Error("the answer has no data".into());
    };
    let value = |pair: &serde_json::Value| -> Option<f64> { pair.get(1)?.as_str()?.parse().ok() };
    let v = match data.kind.as_str() {
        "scalar" => value(&data.result),
        "vector" => {
            let list = data.result.as_array().cloned().unwrap_or_default();
            match list.len() {
                0 => return Measurement::Empty,
                1 => list[0].get("value").and_then(value),
                n => {
                    return Measurement::Error(format!(
                        "the query gave {n} series; it must give one number (wrap it in sum() or max())"
                    ));
                }
            }
        }
        other => {
            return Measurement::Error(format!(
                "the query gave a {other}; it must give one number"
            ));
        }
    };
    match v {
        Some(v) if v.is_finite() => Measurement::Value(v),
        Some(_) => Measurement::Empty,
        None => Measurement::Error("the answer's value is not a number".into()),
    }
}

fn fill(query: &str, bake: &Bake, host: Option<&HostId>) -> String {
    let mut q = query
        .replace("${service}", &bake.name)
        .replace("${version}", &bake.version);
    if let Some(h) = host {
        q = q.replace("${host}", h.as_str());
    }
    q
}

fn kept(check: &str, new: &[f64], baseline: &[f64]) -> Samples {
    let tail = |v: &[f64]| v[v.len().saturating_sub(MAX_KEPT)..].to_vec();
    Samples {
        check: check.to_owned(),
        new: tail(new),
        baseline: tail(baseline),
    }
}

/// One group's samples (new version or baseline) as they come.
#[derive(Default)]
struct Group {
    values: Vec<f64>,
    /// Summed numerators and denominators (ratio), sums (rate, gauge),
    /// summed bucket increases (quantile).
    num: f64,
    den: f64,
    buckets: Vec<(f64, f64)>,
    /// The quantile asked (quantile only).
    q: Option<f64>,
}

fn get(samples: &[MetricSample], family: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.family == family && s.le.is_empty())
        .map(|s| s.value)
}

fn buckets(samples: &[MetricSample]) -> Vec<(f64, f64)> {
    let mut b: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| {
            let le = if s.le == "+Inf" {
                f64::INFINITY
            } else {
                s.le.parse().ok()?
            };
            Some((le, s.value))
        })
        .collect();
    b.sort_by(|a, b| a.0.total_cmp(&b.0));
    b
}

/// The `q` quantile of cumulative buckets, interpolated within a bucket as
/// Prometheus' `histogram_quantile` does.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let width = count - lower.1;
            let within = if width > 0.0 {
                (rank - lower.1) / width
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, count);
    }
    None
}

impl Group {
    /// The sample one host's interval gives, from its scrape before and now.
    fn add(
        &mut self,
        quantity: &Quantity,
        before: &[MetricSample],
        now: &[MetricSample],
        interval: Duration,
    ) {
        // A number an agent sent that is not finite is no sample, and must
        // not poison the pooled value.
        if before.iter().chain(now).any(|m| !m.value.is_finite()) {
            return;
        }
        let sample = match quantity {
            Quantity::Ratio(a, b) => {
                let (Some(a0), Some(a1), Some(b0), Some(b1)) =
                    (get(before, a), get(now, a), get(before, b), get(now, b))
                else {
                    return;
                };
                let (da, db) = (a1 - a0, b1 - b0);
                // A counter reset, or no requests: no sample.
                if da < 0.0 || db <= 0.0 {
                    return;
                }
                self.num += da;
                self.den += db;
                da / db
            }
            Quantity::Rate(a) => {
                let (Some(a0), Some(a1)) = (get(before, a), get(now, a)) else {
                    return;
                };
                if a1 < a0 {
                    return;
                }
                let r = (a1 - a0) / interval.as_secs_f64();
                self.num += r;
                self.den += 1.0;
                r
            }
            Quantity::Gauge(a) => {
                let Some(v) = get(now, a) else { return };
                self.num += v;
                self.den += 1.0;
                v
            }
            Quantity::Quantile(_, q) => {
                self.q = Some(q.get());
                let (b0, b1) = (buckets(before), buckets(now));
                if b0.len() != b1.len() {
                    return;
                }
                let delta: Vec<(f64, f64)> =
                    b1.iter().zip(&b0).map(|(n, o)| (n.0, n.1 - o.1)).collect();
                if delta.iter().any(|(_, c)| *c < 0.0) {
                    return;
                }
                if self.buckets.len() == delta.len() {
                    for (acc, d) in self.buckets.iter_mut().zip(&delta) {
                        acc.1 += d.1;
                    }
                } else if self.buckets.is_empty() {
                    self.buckets.clone_from(&delta);
                }
                let Some(v) = quantile(q.get(), &delta) else {
                    return;
                };
                v
            }
        };
        if sample.is_finite() {
            self.values.push(sample);
            // Only the latest MAX_JUDGED are judged: older ones go, in
            // batches, so memory stays bounded however long the bake.
            if self.values.len() >= 2 * MAX_JUDGED {
                self.values.drain(..self.values.len() - MAX_JUDGED);
            }
        }
    }

    /// The group's samples and pooled value, for the judge.
    fn fill(&self, values: &mut Vec<f64>, pooled: &mut Option<f64>) {
        let from = self.values.len().saturating_sub(MAX_JUDGED);
        values.clear();
        values.extend_from_slice(&self.values[from..]);
        *pooled = if let Some(q) = self.q {
            quantile(q, &self.buckets)
        } else if self.den > 0.0 {
            Some(self.num / self.den)
        } else {
            None
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_answers_are_one_number_or_not_a_pass() {
        let one = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.5,"0.25"]}]}}"#;
        assert_eq!(parse_query(one), Measurement::Value(0.25));
        let scalar = br#"{"status":"success","data":{"resultType":"scalar","result":[1.5,"3"]}}"#;
        assert_eq!(parse_query(scalar), Measurement::Value(3.0));
        let none = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse_query(none), Measurement::Empty);
        let nan = br#"{"status":"success","data":{"resultType":"scalar","result":[1.5,"NaN"]}}"#;
        assert_eq!(parse_query(nan), Measurement::Empty);
        let two = br#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"1"]},{"value":[1,"2"]}]}}"#;
        assert!(matches!(parse_query(two), Measurement::Error(e) if e.contains("2 series")));
        let bad = br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert!(matches!(parse_query(bad), Measurement::Error(e) if e.contains("parse error")));
        assert!(matches!(parse_query(b"<html>"), Measurement::Error(_)));
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let b = [(0.1, 50.0), (0.5, 90.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(0.5, &b), Some(0.1));
        let q = quantile(0.7, &b).unwrap();
        assert!((q - 0.3).abs() < 1e-9, "{q}");
        assert_eq!(quantile(0.99, &b), Some(0.5));
        assert_eq!(quantile(0.5, &[(1.0, 0.0)]), None);
    }

    #[test]
    fn ratios_come_from_increases_and_resets_give_none() {
        let s = |e: f64, r: f64| {
            vec![
                MetricSample {
                    family: "e".into(),
                    le: String::new(),
                    value: e,
                },
                MetricSample {
                    family: "r".into(),
                    le: String::new(),
                    value: r,
                },
            ]
        };
        let q = Quantity::Ratio("e".into(), "r".into());
        let mut g = Group::default();
        g.add(&q, &s(1.0, 100.0), &s(6.0, 200.0), Duration::from_secs(1));
        g.add(&q, &s(6.0, 200.0), &s(0.0, 10.0), Duration::from_secs(1));
        g.add(&q, &s(6.0, 200.0), &s(6.0, 200.0), Duration::from_secs(1));
        assert_eq!(g.values, vec![0.05]);
        // An agent's NaN or infinity is no sample and leaves the pool alone.
        g.add(
            &q,
            &s(6.0, 200.0),
            &s(f64::NAN, 300.0),
            Duration::from_secs(1),
        );
        g.add(
            &q,
            &s(6.0, 200.0),
            &s(f64::INFINITY, 300.0),
            Duration::from_secs(1),
        );
        assert_eq!(g.values, vec![0.05]);
        let (mut v, mut pooled) = (Vec::new(), None);
        g.fill(&mut v, &mut pooled);
        assert_eq!(pooled, Some(0.05));
    }
}
