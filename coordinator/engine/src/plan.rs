//! The plan file (TOML): what to roll out, where and how carefully.
//!
//! Parsing is strict: unknown keys, bad durations and out-of-range numbers
//! are errors that name the service and key. [`Plan::parse`] checks the
//! file on its own; the driver then resolves it against the stored
//! artifacts and the fleet (which hosts, which counts).
//!
//! Every size and duration has a maximum ([`MAX_SERVICES`] and the other
//! constants here, documented in the README), enforced before anything else
//! looks at the plan; the graph work is linear ([`crate::graph`]); errors
//! quote at most a short prefix of what was written.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use baton_common::host::{Labels, validate_labels, validate_name};
use baton_common::text::quote;
use serde::{Deserialize, Serialize};

use crate::analysis::{Check, MAX_CHECKS, RawCheck};
use crate::graph;

/// The largest plan text accepted (`StartRollout`, `PlanRollout`,
/// `baton plan check`).
pub const MAX_PLAN_BYTES: usize = 1 << 20;
/// The most services one plan may name.
pub const MAX_SERVICES: usize = 256;
/// The most dependencies (`depends_on` and `requires` entries) in one plan.
pub const MAX_EDGES: usize = 4096;
/// The most labels one `hosts` selector may match on.
pub const MAX_SELECTOR_LABELS: usize = 16;
/// The most `steps` one service may have.
pub const MAX_STEPS: usize = 100;
/// The longest version requirement (`requires = { api = ">=2.0" }`).
pub const MAX_REQUIREMENT_CHARS: usize = 128;
/// The longest `progress_deadline`.
pub const MAX_PROGRESS_DEADLINE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The longest `healthy_deadline` (and so `min_healthy_time`).
pub use baton_common::command::MAX_HEALTHY_DEADLINE;
/// The longest `pause` between steps.
pub const MAX_PAUSE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The most `max_failures` one service may tolerate.
pub const MAX_FAILURES: u32 = 1_000_000;

/// A parsed, self-consistent plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Undo every change when the rollout fails.
    pub auto_rollback: bool,
    /// Fail when no host turns healthy for this long.
    #[serde(with = "humantime_serde")]
    pub progress_deadline: Duration,
    /// How many services may progress at once (`None`: no limit).
    pub max_parallel_services: Option<usize>,
    /// The services, in file order.
    pub services: Vec<ServicePlan>,
    /// Host failures tolerated across every service of the rollout
    /// (`None`: only each service's `max_failures`).
    #[serde(default)]
    pub failure_budget: Option<u32>,
}

/// One `[[service]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePlan {
    /// The service.
    pub name: String,
    /// The version to roll out.
    pub version: String,
    /// Label selector; `None` means the hosts that already run the service.
    pub hosts: Option<Labels>,
    /// How hosts are replaced.
    pub strategy: Strategy,
    /// How many hosts may be replaced at once.
    pub max_parallel: Amount,
    /// The floor of healthy hosts; `None` means all hosts minus one batch.
    pub min_healthy: Option<Amount>,
    /// How long a host's checks must pass continuously.
    #[serde(with = "humantime_serde")]
    pub min_healthy_time: Duration,
    /// How long a host may take to turn healthy.
    #[serde(with = "humantime_serde")]
    pub healthy_deadline: Duration,
    /// Host failures tolerated before the rollout fails.
    pub max_failures: u32,
    /// Services that must finish first.
    pub depends_on: Vec<String>,
    /// Version requirements on other services.
    pub requires: BTreeMap<String, String>,
    /// Hosts in the canary step (strategy `canary`).
    pub canary: Option<Amount>,
    /// Cumulative host counts per step, e.g. `["1", "25%", "100%"]`.
    pub steps: Option<Vec<Amount>>,
    /// Wait this long between steps.
    #[serde(with = "humantime_serde")]
    pub pause: Option<Duration>,
    /// Continue after the canary without an operator's `promote`.
    pub auto_promote: bool,
    /// Hosts may go to a lower version than they run (to a release they
    /// still have); refused otherwise.
    pub allow_downgrade: bool,
    /// Checks run for a bake time after each step's hosts turned healthy.
    #[serde(default)]
    pub analysis: Vec<Check>,
    /// The service waits for `promote` by an operator other than the one
    /// who started the rollout before its first host (and before each
    /// canary promotion).
    #[serde(default)]
    pub approval: bool,
    /// The load balancer its hosts are drained from around their swap.
    #[serde(default)]
    pub traffic: Option<baton_common::traffic::Traffic>,
}

/// How hosts are replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// `max_parallel` hosts at a time, never below `min_healthy`.
    Rolling,
    /// A canary step, then rolling after promotion.
    Canary,
    /// Every host at once.
    AllAtOnce,
}

/// A count of hosts or a percentage of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Amount {
    /// That many hosts.
    Count(u32),
    /// That percentage of the hosts.
    Percent(u32),
}

impl Amount {
    /// The number of hosts out of `total`, rounding a percentage up.
    pub fn of(self, total: usize) -> usize {
        match self {
            Self::Count(n) => n as usize,
            Self::Percent(p) => (total * p as usize).div_ceil(100),
        }
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

pub use crate::plan_error::PlanError;

const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);
const DEFAULT_MIN_HEALTHY_TIME: Duration = Duration::from_secs(10);
const DEFAULT_HEALTHY_DEADLINE: Duration = Duration::from_secs(300);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    auto_rollback: Option<bool>,
    progress_deadline: Option<String>,
    max_parallel_services: Option<i64>,
    failure_budget: Option<i64>,
    #[serde(default)]
    service: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    version: String,
    hosts: Option<Labels>,
    strategy: Option<String>,
    max_parallel: Option<toml::Value>,
    min_healthy: Option<toml::Value>,
    min_healthy_time: Option<String>,
    healthy_deadline: Option<String>,
    max_failures: Option<i64>,
    #[serde(default)]
    depends_on: Vec<String>,
    #[serde(default)]
    requires: BTreeMap<String, String>,
    canary: Option<toml::Value>,
    steps: Option<Vec<toml::Value>>,
    pause: Option<String>,
    auto_promote: Option<bool>,
    allow_downgrade: Option<bool>,
    #[serde(default)]
    analysis: Vec<RawCheck>,
    approval: Option<bool>,
    traffic: Option<traffic::RawTraffic>,
}

/// Every key of a plan file, in reading order: the top-level keys, then
/// those of a `[[service]]` table (`service[].name`, …). The plan
/// reference (docs/reference/plan.md) is generated from this list, and a
/// test checks it against the keys the reader accepts.
pub const KEYS: &[baton_common::reference::Key] = {
    use baton_common::reference::Key;
    &[
        Key {
            key: "auto_rollback",
            value: "bool",
            default: "`true`",
            about: "When the rollout fails, undo every change it made: each host it swapped goes back to its previous release (a first install is stopped and removed), services in reverse dependency order, and the rollout ends `rolled_back`. With `false` it ends `failed` and hosts stay where they are.",
        },
        Key {
            key: "progress_deadline",
            value: "duration (`\"30s\"`, `\"10m\"`)",
            default: "`\"10m\"`",
            about: "The rollout fails when no host turns healthy (or, while staging, staging does not finish) for this long. A `pause` between steps or a wait for `promote` does not count. Longer than zero, at most 7 days.",
        },
        Key {
            key: "max_parallel_services",
            value: "integer",
            default: "no limit",
            about: "How many services may progress at once. Services whose dependencies have all succeeded (a wave) run side by side up to this number. At least 1.",
        },
        Key {
            key: "failure_budget",
            value: "integer",
            default: "none",
            about: "Host failures tolerated across every service of the rollout, over all its steps (a failed analysis counts each host it judged). When more hosts fail the rollout fails (and rolls back), even if each service is within its own `max_failures`. 0 to 1,000,000.",
        },
        Key {
            key: "service[]",
            value: "array of tables (`[[service]]`)",
            default: "required",
            about: "One table per service to roll out: at least one, at most 256, each service named once. Among the services free to go, file order decides.",
        },
        Key {
            key: "service[].name",
            value: "string",
            default: "required",
            about: "The service, as its artifacts were pushed: 1–128 characters of `[A-Za-z0-9._-]`, starting with a letter or digit.",
        },
        Key {
            key: "service[].version",
            value: "string",
            default: "required",
            about: "The version to roll out, which must have been pushed: a semantic version (`2.0.0`, `2.0.0-rc.1+build.7`; `2` or `1.4` are refused).",
        },
        Key {
            key: "service[].hosts",
            value: "table of labels (`{ role = \"api\", zone = \"a\" }`)",
            default: "the hosts that already run the service",
            about: "A label selector: the hosts carrying every one of these labels; not empty, at most 16 labels. Without it, the hosts that already run the service, so a first install must name its hosts.",
        },
        Key {
            key: "service[].strategy",
            value: "`\"rolling\"`, `\"canary\"` or `\"all-at-once\"`",
            default: "`\"rolling\"`",
            about: "`rolling`: up to `max_parallel` hosts at a time, never below `min_healthy`. `all-at-once`: every host at once (`max_parallel` is ignored). `canary`: the `canary` hosts (or the first of `steps`) first, then wait for `baton rollout promote` unless `auto_promote`; it needs `canary` or `steps`.",
        },
        Key {
            key: "service[].max_parallel",
            value: "count or percentage (`2` or `\"25%\"`)",
            default: "`1`",
            about: "How many hosts may be activating at once; a percentage of the service's hosts is rounded up. At least 1 (a percentage at most 100%); more than there are hosts means all of them. Ignored by `all-at-once`.",
        },
        Key {
            key: "service[].min_healthy",
            value: "count or percentage (`3` or `\"75%\"`)",
            default: "the hosts minus one batch (`max_parallel`)",
            about: "The floor of hosts in service that the rollout never crosses; hosts activating, rolling back, disconnected or failed by this rollout are out of service. A percentage is rounded up; 0 is allowed, and a floor that keeps every host in service is refused.",
        },
        Key {
            key: "service[].min_healthy_time",
            value: "duration",
            default: "`\"10s\"`",
            about: "How long a host's health checks must pass without a failure (without `[health]`, its process stay alive) for the host to be healthy. Longer than zero and shorter than `healthy_deadline`.",
        },
        Key {
            key: "service[].healthy_deadline",
            value: "duration",
            default: "`\"5m\"`",
            about: "How long a host's new release may take to pass its health gate; a host not healthy by then, or whose agent is away this long while activating, has failed. Longer than `min_healthy_time`, at most 1 day.",
        },
        Key {
            key: "service[].max_failures",
            value: "integer",
            default: "`0`",
            about: "Failed hosts tolerated (a host that cannot stage counts too); one more fails the rollout. A tolerated failed activation is rolled back on its host when `auto_rollback` is on. 0 to 1,000,000.",
        },
        Key {
            key: "service[].depends_on",
            value: "array of strings (service names)",
            default: "`[]`",
            about: "Services of this plan that must have succeeded everywhere before this one starts; a rollback runs in the reverse order. No cycles, no self-dependency, and at most 4,096 `depends_on` and `requires` entries in a plan.",
        },
        Key {
            key: "service[].requires",
            value: "table of version requirements (`{ api = \">=2.0\" }`)",
            default: "`{}`",
            about: "Semantic-version requirements on other services, each at most 128 characters: the version this plan rolls out, or else the version every host runs, must satisfy them, when the plan is submitted and again before this service starts. A requirement on a service of the plan also orders it like `depends_on`.",
        },
        Key {
            key: "service[].canary",
            value: "count or percentage (`1` or `\"10%\"`)",
            default: "",
            about: "Strategy `canary` only, and not with `steps`: how many of the hosts to change go first (a percentage rounded up, at least 1). Then the rollout awaits `promote`, or continues by itself with `auto_promote`.",
        },
        Key {
            key: "service[].steps",
            value: "array of counts or percentages (`[\"1\", \"25%\", \"100%\"]`)",
            default: "",
            about: "Cumulative numbers of the hosts to change, one per step, growing; a last step of every host is added when missing. Each at least 1, at most 100 steps, not with `canary`. Between steps a `canary` rollout without `auto_promote` awaits `promote`; otherwise the next step starts after `pause` (at once without one).",
        },
        Key {
            key: "service[].pause",
            value: "duration",
            default: "no pause",
            about: "How long to wait after each step before the next (with `steps`, or `canary` with `auto_promote`); it does not count against `progress_deadline`. Longer than zero, at most 7 days.",
        },
        Key {
            key: "service[].auto_promote",
            value: "bool",
            default: "`false`",
            about: "Strategy `canary`: continue after each step once its hosts are healthy, instead of awaiting `baton rollout promote`. No effect with other strategies.",
        },
        Key {
            key: "service[].allow_downgrade",
            value: "bool",
            default: "`false`",
            about: "Let hosts that run a newer version go back to `version`; such a plan is refused otherwise. An agent still only returns to a release it has kept.",
        },
        Key {
            key: "service[].approval",
            value: "bool",
            default: "`false`",
            about: "The service waits in `awaiting_promotion` before its first host, and before each canary promotion, until `baton rollout promote` by an operator other than the one who started the rollout (four eyes). The promote is audited with who gave it.",
        },
        Key {
            key: "service[].analysis[]",
            value: "table",
            default: "none",
            about: "Checks run for a bake time after each step's hosts turned healthy (with analysis, a rolling service goes in steps of `max_parallel` hosts), before a canary's promotion (a pass promotes by itself) and after the last step. Fail takes the failure path (the judged hosts count against `max_failures`, then the rollout rolls back); inconclusive pauses or fails as `on_inconclusive` says. At most 16 per service. See docs/guides/analysis.md.",
        },
        Key {
            key: "service[].analysis[].name",
            value: "string",
            default: "required",
            about: "Unique within the service; in `status`, events and metrics.",
        },
        Key {
            key: "service[].analysis[].kind",
            value: "`\"metrics\"`, `\"prometheus\"` or `\"host\"`",
            default: "required",
            about: "`metrics`: each host's agent scrapes the service's own Prometheus endpoint. `prometheus`: a PromQL query against `prometheus_url` in `batond`'s config. `host`: what the agent sees of the process (restarts, memory, open files).",
        },
        Key {
            key: "service[].analysis[].url",
            value: "string",
            default: "required for `metrics`",
            about: "The service's Prometheus endpoint on its host, `http://127.0.0.1:${port}/metrics`; the agent fills in its variables and fetches only loopback addresses.",
        },
        Key {
            key: "service[].analysis[].ratio",
            value: "[\"errors\", \"requests\"]",
            default: "",
            about: "`metrics`: per host and interval, the increase of the first counter over the increase of the second (an interval with no requests has no sample). One of `ratio`, `rate`, `gauge`, `histogram`.",
        },
        Key {
            key: "service[].analysis[].rate",
            value: "string",
            default: "",
            about: "`metrics`: a counter's increase per second.",
        },
        Key {
            key: "service[].analysis[].gauge",
            value: "string",
            default: "",
            about: "`metrics`: a gauge's value.",
        },
        Key {
            key: "service[].analysis[].histogram",
            value: "string",
            default: "",
            about: "`metrics`: a histogram (its `_bucket` series); with `quantile`, the quantile of the observations in each interval.",
        },
        Key {
            key: "service[].analysis[].quantile",
            value: "number",
            default: "",
            about: "With `histogram`: between 0 and 1, e.g. 0.99.",
        },
        Key {
            key: "service[].analysis[].baseline",
            value: "bool",
            default: "`false`",
            about: "`metrics`: compare the new version's samples with those of the hosts still on the old version at the same moment (one-sided Mann-Whitney U test). Needs `min_samples` on both sides; after the last step no host is left on the old version and the comparison is `skipped`.",
        },
        Key {
            key: "service[].analysis[].tolerance",
            value: "number",
            default: "`0.3`",
            about: "With `baseline`: how much worse than the baseline still passes (0.5 = 50 % worse). 0 to 100.",
        },
        Key {
            key: "service[].analysis[].margin",
            value: "number",
            default: "`0`",
            about: "With `baseline`: how much worse than the baseline still passes, absolutely, on top of `tolerance` (each baseline sample counts as `sample × (1 + tolerance) + margin`). A baseline with no errors at all tolerates nothing by `tolerance` alone: `margin = 0.001` lets 0.1 % more errors through. 0 or more.",
        },
        Key {
            key: "service[].analysis[].confidence",
            value: "number",
            default: "`0.99`",
            about: "With `baseline`: the confidence a failure needs (one-sided p below 1 − confidence at the end, ten times below it at an early look). At least 0.5, below 1.",
        },
        Key {
            key: "service[].analysis[].max",
            value: "number",
            default: "none",
            about: "An absolute ceiling: `metrics` on the new version's pooled value (ratio of summed counters, mean, quantile of summed buckets); `prometheus` on each measurement.",
        },
        Key {
            key: "service[].analysis[].min",
            value: "number",
            default: "none",
            about: "An absolute floor, like `max`.",
        },
        Key {
            key: "service[].analysis[].interval",
            value: "duration",
            default: "`\"10s\"`",
            about: "One sample (scrape, query, observation) per interval. 100ms to 1h.",
        },
        Key {
            key: "service[].analysis[].duration",
            value: "duration",
            default: "`\"1m\"`",
            about: "The bake time after the step's hosts turned healthy; a clear failure can stop it early. At least `interval`, at most 24h and 10,000 intervals. It does not count against `progress_deadline`.",
        },
        Key {
            key: "service[].analysis[].min_samples",
            value: "integer",
            default: "the samples of a bake, at most 5",
            about: "Fewer samples of the new version (or, with `baseline`, of the old): inconclusive, never a pass. At least 1.",
        },
        Key {
            key: "service[].analysis[].on_inconclusive",
            value: "`\"pause\"` or `\"fail\"`",
            default: "`\"pause\"`",
            about: "`pause`: the rollout pauses for an operator (`resume` goes on, `rollback` undoes). `fail`: treated as a failure.",
        },
        Key {
            key: "service[].analysis[].query",
            value: "string",
            default: "required for `prometheus`",
            about: "PromQL, with `${host}`, `${service}` and `${version}` filled in; with `${host}` it runs once per host of the new version. Its result must be one number (a scalar or one series); no series is inconclusive. At most 4,096 characters.",
        },
        Key {
            key: "service[].analysis[].success",
            value: "string",
            default: "none",
            about: "`prometheus`: a measurement succeeds when this holds, e.g. `\"result < 0.05\"` (comparisons of `result` joined by `&&` and `||`).",
        },
        Key {
            key: "service[].analysis[].failure",
            value: "string",
            default: "none",
            about: "`prometheus`: a measurement fails when this holds. With both `success` and `failure`, a value that meets neither is inconclusive.",
        },
        Key {
            key: "service[].analysis[].count",
            value: "integer",
            default: "`duration / interval`",
            about: "`prometheus`: measurements per bake.",
        },
        Key {
            key: "service[].analysis[].failure_limit",
            value: "integer",
            default: "`0`",
            about: "`prometheus`: failed measurements tolerated.",
        },
        Key {
            key: "service[].analysis[].inconclusive_limit",
            value: "integer",
            default: "`0`",
            about: "`prometheus`: inconclusive or empty measurements tolerated.",
        },
        Key {
            key: "service[].analysis[].consecutive_error_limit",
            value: "integer",
            default: "`4`",
            about: "`prometheus`: failed queries in a row tolerated; more is inconclusive.",
        },
        Key {
            key: "service[].analysis[].max_restarts",
            value: "integer",
            default: "`0`",
            about: "`host`: restarts of the service (a new process, or none running) tolerated during the bake.",
        },
        Key {
            key: "service[].analysis[].max_memory_growth",
            value: "number",
            default: "none",
            about: "`host`: growth of resident memory from the first to the last observation tolerated (0.5 = 50 %).",
        },
        Key {
            key: "service[].analysis[].max_fd_growth",
            value: "number",
            default: "none",
            about: "`host`: growth of open files tolerated.",
        },
        Key {
            key: "service[].traffic",
            value: "table",
            default: "none",
            about: "Take each host out of its load balancer before its swap and put it back after its health gate: drain → wait until its connections reach zero (or `drain_timeout`) → activate → health gate → ready → wait until the balancer reports it up → the next host. For services without `listen` sockets behind a balancer. A rollback and an abort put every drained host back. See docs/guides/traffic.md.",
        },
        Key {
            key: "service[].traffic.kind",
            value: "string",
            default: "required",
            about: "`haproxy` (HAProxy's runtime API) or `exec` (your commands: nginx, Envoy, a cloud balancer, Consul maintenance mode).",
        },
        Key {
            key: "service[].traffic.socket",
            value: "string",
            default: "required (`haproxy`)",
            about: "The runtime API: an absolute unix socket path (at most 107 bytes) or `tcp://IP:PORT`. It needs `level admin`.",
        },
        Key {
            key: "service[].traffic.backend",
            value: "string",
            default: "required (`haproxy`)",
            about: "The backend, with `${BATON_HOST_ID}` and `${host}` filled in per host (with `run_on = \"agent\"` also `${LABEL}`, the host's labels as its agent is configured; never its variables, which may be secrets). The result must be 1 to 128 letters, digits, `-`, `_`, `.` or `:`.",
        },
        Key {
            key: "service[].traffic.server",
            value: "string",
            default: "`\"${BATON_HOST_ID}\"`",
            about: "The host's server in that backend, filled in as `backend` is. An operator's `MAINT` before the drain is restored after it (not made ready).",
        },
        Key {
            key: "service[].traffic.drain_timeout",
            value: "duration",
            default: "`\"30s\"`",
            about: "How long a drained host's connections may take to finish; the ones still open then are cut by the swap, counted, and reported as an event and in `baton_connections_cut_total`. At most 1h.",
        },
        Key {
            key: "service[].traffic.run_on",
            value: "string",
            default: "`\"coordinator\"`",
            about: "`coordinator`: `batond` talks to one central balancer; `agent`: each host's agent talks to a balancer on the host.",
        },
        Key {
            key: "service[].traffic.drain",
            value: "list of strings",
            default: "required (`exec`)",
            about: "`exec`: the command (program by its absolute path, arguments) that takes a host out; the host id is appended (and in `BATON_HOST_ID`). Exit status 0 is success. At most 32 arguments of 1,024 characters; 30 s. The program must be in the `balancer` setting of whoever runs it.",
        },
        Key {
            key: "service[].traffic.ready",
            value: "list of strings",
            default: "required (`exec`)",
            about: "`exec`: the command that puts a host back, as `drain`.",
        },
        Key {
            key: "service[].traffic.connections",
            value: "list of strings",
            default: "required (`exec`)",
            about: "`exec`: the command that prints the host's open connections (one number), as `drain`.",
        },
    ]
};

fn duration(
    value: Option<&str>,
    default: Duration,
    max: Duration,
    at: &str,
) -> Result<Duration, PlanError> {
    let Some(text) = value else {
        return Ok(default);
    };
    baton_common::time::parse_bounded(text, Duration::from_nanos(1), max)
        .map_err(|e| PlanError(format!("{at}: {e}")))
}

/// A TOML parse error as a line and column, the parser's message, and a
/// short excerpt of the line (never the whole input).
fn syntax_error(text: &str, e: &toml::de::Error) -> PlanError {
    let Some(span) = e.span() else {
        return PlanError(format!(
            "the plan is not valid: {}",
            baton_common::text::prefix(e.message(), 300)
        ));
    };
    let start = span.start.min(text.len());
    let before = text.get(..start).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let excerpt = text
        .get(line_start..)
        .and_then(|rest| rest.lines().next())
        .unwrap_or("");
    PlanError(format!(
        "the plan is not valid: line {line}, column {column}: {} (the line: {})",
        baton_common::text::prefix(e.message(), 300),
        quote(excerpt)
    ))
}

/// Parses `3` or `"25%"`; `zero_ok` says whether 0 / 0% is allowed.
fn amount(value: &toml::Value, at: &str, zero_ok: bool) -> Result<Amount, PlanError> {
    let bad = || {
        PlanError(format!(
            "{at}: expected a host count like 2 or a percentage like \"25%\", found {}",
            baton_common::text::shorten(&value.to_string())
        ))
    };
    let a = match value {
        toml::Value::Integer(n) => Amount::Count(u32::try_from(*n).map_err(|_| bad())?),
        toml::Value::String(s) => {
            let digits = s.trim().strip_suffix('%').ok_or_else(bad)?;
            let p: u32 = digits.trim().parse().map_err(|_| bad())?;
            if p > 100 {
                return Err(PlanError(format!("{at}: {p}% is more than 100%")));
            }
            Amount::Percent(p)
        }
        _ => return Err(bad()),
    };
    if !zero_ok && matches!(a, Amount::Count(0) | Amount::Percent(0)) {
        return Err(PlanError(format!("{at}: must be at least 1")));
    }
    Ok(a)
}

impl Plan {
    /// Parses and checks a plan file's text.
    pub fn parse(text: &str) -> Result<Self, PlanError> {
        let raw: RawPlan = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
        let progress_deadline = duration(
            raw.progress_deadline.as_deref(),
            DEFAULT_PROGRESS_DEADLINE,
            MAX_PROGRESS_DEADLINE,
            "progress_deadline",
        )?;
        if raw.service.is_empty() {
            return Err(PlanError(
                "the plan names no service: add a [[service]] table".into(),
            ));
        }
        if raw.service.len() > MAX_SERVICES {
            return Err(PlanError(format!(
                "the plan names {} services, more than the limit of {MAX_SERVICES}; split it into several rollouts",
                raw.service.len()
            )));
        }
        let edges: usize = raw
            .service
            .iter()
            .map(|s| s.depends_on.len() + s.requires.len())
            .sum();
        if edges > MAX_EDGES {
            return Err(PlanError(format!(
                "the plan has {edges} depends_on and requires entries, more than the limit of {MAX_EDGES}"
            )));
        }
        let mut services = Vec::with_capacity(raw.service.len());
        for (i, s) in raw.service.into_iter().enumerate() {
            services.push(ServicePlan::check(s, i)?);
        }
        let mut names: HashSet<&str> = HashSet::with_capacity(services.len());
        for s in &services {
            if !names.insert(s.name.as_str()) {
                return Err(PlanError(format!(
                    "service {:?} appears twice in the plan",
                    s.name
                )));
            }
        }
        for s in &services {
            for dep in s.depends_on.iter().chain(s.requires.keys()) {
                if dep == &s.name {
                    return Err(PlanError(format!(
                        "service {:?} cannot depend on itself",
                        s.name
                    )));
                }
            }
            for dep in &s.depends_on {
                if !names.contains(dep.as_str()) {
                    return Err(PlanError(format!(
                        "service {:?}: depends_on names {}, which is not in the plan",
                        s.name,
                        quote(dep)
                    )));
                }
            }
        }
        // A host behind a balancer may take its drain and its health gate
        // before it turns healthy: progress_deadline must leave room.
        for s in &services {
            if let Some(t) = &s.traffic {
                let need = t.drain_timeout.saturating_add(s.healthy_deadline);
                if progress_deadline <= need {
                    return Err(PlanError(format!(
                        "service {:?}: progress_deadline {} leaves no time for a host's drain (traffic.drain_timeout {}) and health gate (healthy_deadline {}); make progress_deadline longer than both together",
                        s.name,
                        humantime::format_duration(progress_deadline),
                        humantime::format_duration(t.drain_timeout),
                        humantime::format_duration(s.healthy_deadline)
                    )));
                }
            }
        }
        let max_parallel_services = match raw.max_parallel_services {
            None => None,
            Some(n) if n >= 1 => usize::try_from(n).ok(),
            Some(_) => {
                return Err(PlanError(
                    "max_parallel_services: must be at least 1".into(),
                ));
            }
        };
        let failure_budget = match raw.failure_budget {
            None => None,
            Some(n) if n < 0 => {
                return Err(PlanError("failure_budget: must be 0 or more".into()));
            }
            Some(n) => Some(
                u32::try_from(n)
                    .ok()
                    .filter(|n| *n <= MAX_FAILURES)
                    .ok_or_else(|| {
                        PlanError(format!(
                            "failure_budget: {n} is more than the limit of {MAX_FAILURES}"
                        ))
                    })?,
            ),
        };
        let plan = Self {
            auto_rollback: raw.auto_rollback.unwrap_or(true),
            progress_deadline,
            max_parallel_services,
            services,
            failure_budget,
        };
        if let Some(cycle) = graph::cycle(&plan.graph()) {
            let names: Vec<&str> = cycle
                .iter()
                .map(|i| plan.services[*i].name.as_str())
                .collect();
            // A ring of hundreds is named by its start and its length.
            let shown = if names.len() > 12 {
                format!(
                    "{} -> … ({} services in all) … -> {}",
                    names[..6].join(" -> "),
                    names.len() - 1,
                    names[names.len() - 6..].join(" -> ")
                )
            } else {
                names.join(" -> ")
            };
            return Err(PlanError(format!("depends_on has a cycle: {shown}")));
        }
        Ok(plan)
    }

    /// The dependency graph by service index: what each service must come
    /// after (its `depends_on`, then the services of the plan it
    /// `requires` a version of).
    pub fn graph(&self) -> Vec<Vec<usize>> {
        let names: Vec<&str> = self.services.iter().map(|s| s.name.as_str()).collect();
        graph::build(&names, |i| {
            let s = &self.services[i];
            s.depends_on
                .iter()
                .chain(s.requires.keys())
                .map(String::as_str)
        })
    }

    /// Service indices in dependency order: dependencies first; among the
    /// services free to go, file order.
    pub fn order(&self) -> Vec<usize> {
        graph::order(&self.graph())
    }

    /// The services in waves: each wave depends only on earlier ones.
    pub fn waves(&self) -> Vec<Vec<String>> {
        graph::waves(&self.graph())
            .into_iter()
            .map(|wave| {
                wave.into_iter()
                    .map(|i| self.services[i].name.clone())
                    .collect()
            })
            .collect()
    }
}

impl ServicePlan {
    fn check(s: RawService, index: usize) -> Result<Self, PlanError> {
        let at = |key: &str| format!("service {:?} (#{}): {key}", s.name, index + 1);
        validate_name(&s.name)
            .map_err(|e| PlanError(format!("service #{}: name: {e}", index + 1)))?;
        baton_common::version::check(&s.version).map_err(|e| {
            PlanError(format!(
                "{}: {} is not a valid version: {e}",
                at("version"),
                quote(&s.version)
            ))
        })?;
        let strategy = match s.strategy.as_deref().unwrap_or("rolling") {
            "rolling" => Strategy::Rolling,
            "canary" => Strategy::Canary,
            "all-at-once" => Strategy::AllAtOnce,
            other => {
                return Err(PlanError(format!(
                    "{}: unknown strategy {}; expected \"rolling\", \"canary\" or \"all-at-once\"",
                    at("strategy"),
                    quote(other)
                )));
            }
        };
        let max_parallel = match &s.max_parallel {
            Some(v) => amount(v, &at("max_parallel"), false)?,
            None => Amount::Count(1),
        };
        let min_healthy = s
            .min_healthy
            .as_ref()
            .map(|v| amount(v, &at("min_healthy"), true))
            .transpose()?;
        let max_failures = match s.max_failures {
            None => 0,
            Some(n) if n < 0 => {
                return Err(PlanError(format!(
                    "{}: must be 0 or more",
                    at("max_failures")
                )));
            }
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| *n <= MAX_FAILURES)
                .ok_or_else(|| {
                    PlanError(format!(
                        "{}: {n} is more than the limit of {MAX_FAILURES}",
                        at("max_failures")
                    ))
                })?,
        };
        let canary = match (&s.canary, strategy) {
            (None, _) => None,
            (Some(v), Strategy::Canary) => Some(amount(v, &at("canary"), false)?),
            (Some(_), _) => {
                return Err(PlanError(format!(
                    "{}: only applies to strategy \"canary\"",
                    at("canary")
                )));
            }
        };
        if strategy == Strategy::Canary && canary.is_none() && s.steps.is_none() {
            return Err(PlanError(format!(
                "{}: strategy \"canary\" needs canary = N (or steps = [...])",
                at("canary")
            )));
        }
        let steps = match &s.steps {
            None => None,
            Some(list) if list.is_empty() => {
                return Err(PlanError(format!(
                    "{}: name at least one step",
                    at("steps")
                )));
            }
            Some(list) if list.len() > MAX_STEPS => {
                return Err(PlanError(format!(
                    "{}: {} steps, more than the limit of {MAX_STEPS}",
                    at("steps"),
                    list.len()
                )));
            }
            Some(list) => Some(
                list.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        // Steps may be written as strings: "1", "25%".
                        let v = match v {
                            toml::Value::String(t) if !t.ends_with('%') => t
                                .parse::<i64>()
                                .map(toml::Value::Integer)
                                .unwrap_or_else(|_| v.clone()),
                            other => other.clone(),
                        };
                        amount(&v, &at(&format!("steps[{i}]")), false)
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        if canary.is_some() && steps.is_some() {
            return Err(PlanError(format!(
                "{}: give canary = N or steps = [...], not both",
                at("steps")
            )));
        }
        let pause = s
            .pause
            .as_deref()
            .map(|p| duration(Some(p), Duration::ZERO, MAX_PAUSE, &at("pause")))
            .transpose()?;
        for dep in &s.depends_on {
            validate_name(dep).map_err(|e| PlanError(format!("{}: {e}", at("depends_on"))))?;
        }
        for (dep, req) in &s.requires {
            validate_name(dep).map_err(|e| PlanError(format!("{}: {e}", at("requires"))))?;
            if req.chars().count() > MAX_REQUIREMENT_CHARS {
                return Err(PlanError(format!(
                    "{}: the requirement on {dep} is longer than {MAX_REQUIREMENT_CHARS} characters",
                    at("requires")
                )));
            }
            baton_common::version::check_requirement(req).map_err(|e| {
                PlanError(format!(
                    "{}: {dep} = {} is not a version requirement: {e}",
                    at("requires"),
                    quote(req)
                ))
            })?;
        }
        if let Some(selector) = &s.hosts {
            if selector.is_empty() {
                return Err(PlanError(format!(
                    "{}: an empty selector; name labels or leave hosts out",
                    at("hosts")
                )));
            }
            if selector.len() > MAX_SELECTOR_LABELS {
                return Err(PlanError(format!(
                    "{}: {} labels, more than the limit of {MAX_SELECTOR_LABELS}",
                    at("hosts"),
                    selector.len()
                )));
            }
            validate_labels(selector)
                .map_err(|e| PlanError(format!("{}: {}: {}", at("hosts"), e.field, e.reason)))?;
        }
        let min_healthy_time = duration(
            s.min_healthy_time.as_deref(),
            DEFAULT_MIN_HEALTHY_TIME,
            MAX_HEALTHY_DEADLINE,
            &at("min_healthy_time"),
        )?;
        let healthy_deadline = duration(
            s.healthy_deadline.as_deref(),
            DEFAULT_HEALTHY_DEADLINE,
            MAX_HEALTHY_DEADLINE,
            &at("healthy_deadline"),
        )?;
        if healthy_deadline <= min_healthy_time {
            return Err(PlanError(format!(
                "{}: {} leaves no time to be healthy for min_healthy_time {}; make it longer",
                at("healthy_deadline"),
                humantime::format_duration(healthy_deadline),
                humantime::format_duration(min_healthy_time)
            )));
        }
        if s.analysis.len() > MAX_CHECKS {
            return Err(PlanError(format!(
                "{}: {} checks, more than the limit of {MAX_CHECKS}",
                at("analysis"),
                s.analysis.len()
            )));
        }
        if s.approval == Some(true) && s.auto_promote == Some(true) {
            return Err(PlanError(format!(
                "{}: approval needs an operator's promote, which auto_promote would skip; give one or the other",
                at("approval")
            )));
        }
        let mut analysis: Vec<Check> = Vec::with_capacity(s.analysis.len());
        for (i, raw) in s.analysis.into_iter().enumerate() {
            let check = Check::parse(raw, &at(&format!("analysis[{i}]")))?;
            if analysis.iter().any(|c| c.name == check.name) {
                return Err(PlanError(format!(
                    "{}: two checks are named {}",
                    at(&format!("analysis[{i}].name")),
                    quote(&check.name)
                )));
            }
            analysis.push(check);
        }
        let traffic = s.traffic.map(|t| t.check(&at)).transpose()?;
        Ok(Self {
            min_healthy_time,
            healthy_deadline,
            analysis,
            traffic,
            approval: s.approval.unwrap_or(false),
            name: s.name,
            version: s.version,
            hosts: s.hosts,
            strategy,
            max_parallel,
            min_healthy,
            max_failures,
            depends_on: s.depends_on,
            requires: s.requires,
            canary,
            steps,
            pause,
            auto_promote: s.auto_promote.unwrap_or(false),
            allow_downgrade: s.allow_downgrade.unwrap_or(false),
        })
    }

    /// The label selector as `k=v,k=v`, for messages.
    pub fn selector_text(&self) -> String {
        self.hosts
            .iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests;
mod traffic;
