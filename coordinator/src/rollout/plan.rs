//! The plan file (TOML): what to roll out, where and how carefully.
//!
//! Parsing is strict: unknown keys, bad durations and out-of-range numbers
//! are errors that name the service and key. [`Plan::parse`] checks the
//! file on its own; the driver then resolves it against the stored
//! artifacts and the fleet (which hosts, which counts).

use std::collections::BTreeMap;
use std::time::Duration;

use baton_common::host::{Labels, validate_name};
use serde::{Deserialize, Serialize};

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

/// Why a plan was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);
const DEFAULT_MIN_HEALTHY_TIME: Duration = Duration::from_secs(10);
const DEFAULT_HEALTHY_DEADLINE: Duration = Duration::from_secs(300);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    auto_rollback: Option<bool>,
    progress_deadline: Option<String>,
    max_parallel_services: Option<i64>,
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
}

fn duration(value: Option<&str>, default: Duration, at: &str) -> Result<Duration, PlanError> {
    let Some(text) = value else {
        return Ok(default);
    };
    let d = humantime::parse_duration(text)
        .map_err(|e| PlanError(format!("{at}: invalid duration {text:?}: {e}")))?;
    if d.is_zero() {
        return Err(PlanError(format!("{at}: must be longer than zero")));
    }
    Ok(d)
}

/// Parses `3` or `"25%"`; `zero_ok` says whether 0 / 0% is allowed.
fn amount(value: &toml::Value, at: &str, zero_ok: bool) -> Result<Amount, PlanError> {
    let bad = || {
        PlanError(format!(
            "{at}: expected a host count like 2 or a percentage like \"25%\", found {value}"
        ))
    };
    let a = match value {
        toml::Value::Integer(n) => Amount::Count(u32::try_from(*n).map_err(|_| bad())?),
        toml::Value::String(s) => {
            let digits = s.trim().strip_suffix('%').ok_or_else(bad)?;
            let p: u32 = digits.trim().parse().map_err(|_| bad())?;
            if p > 100 {
                return Err(PlanError(format!("{at}: {s} is more than 100%")));
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
        let raw: RawPlan = toml::from_str(text)
            .map_err(|e| PlanError(format!("the plan is not valid: {}", e.to_string().trim())))?;
        let progress_deadline = duration(
            raw.progress_deadline.as_deref(),
            DEFAULT_PROGRESS_DEADLINE,
            "progress_deadline",
        )?;
        if raw.service.is_empty() {
            return Err(PlanError(
                "the plan names no service: add a [[service]] table".into(),
            ));
        }
        let mut services = Vec::with_capacity(raw.service.len());
        for (i, s) in raw.service.into_iter().enumerate() {
            services.push(ServicePlan::check(s, i)?);
        }
        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        for (i, s) in services.iter().enumerate() {
            if names[..i].contains(&s.name.as_str()) {
                return Err(PlanError(format!(
                    "service {:?} appears twice in the plan",
                    s.name
                )));
            }
            for dep in s.depends_on.iter().chain(s.requires.keys()) {
                if dep == &s.name {
                    return Err(PlanError(format!(
                        "service {:?} cannot depend on itself",
                        s.name
                    )));
                }
            }
            for dep in &s.depends_on {
                if !names.contains(&dep.as_str()) {
                    return Err(PlanError(format!(
                        "service {:?}: depends_on names {dep:?}, which is not in the plan",
                        s.name
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
        let plan = Self {
            auto_rollback: raw.auto_rollback.unwrap_or(true),
            progress_deadline,
            max_parallel_services,
            services,
        };
        if let Some(cycle) = plan.cycle() {
            return Err(PlanError(format!(
                "depends_on has a cycle: {}",
                cycle.join(" -> ")
            )));
        }
        Ok(plan)
    }

    /// A dependency cycle, as `a -> b -> a`, if there is one.
    fn cycle(&self) -> Option<Vec<String>> {
        fn visit<'a>(
            plan: &'a Plan,
            name: &'a str,
            path: &mut Vec<&'a str>,
            done: &mut std::collections::BTreeSet<&'a str>,
        ) -> Option<Vec<String>> {
            if let Some(at) = path.iter().position(|p| *p == name) {
                let mut cycle: Vec<String> = path[at..].iter().map(|s| (*s).to_owned()).collect();
                cycle.push(name.to_owned());
                return Some(cycle);
            }
            if done.contains(name) {
                return None;
            }
            path.push(name);
            let svc = plan.services.iter().find(|s| s.name == name)?;
            for dep in svc.after(plan) {
                if let Some(c) = visit(plan, dep, path, done) {
                    return Some(c);
                }
            }
            path.pop();
            done.insert(name);
            None
        }
        let mut done = std::collections::BTreeSet::new();
        self.services
            .iter()
            .find_map(|s| visit(self, &s.name, &mut Vec::new(), &mut done))
    }

    /// Service indices in dependency order (dependencies first; otherwise
    /// file order).
    pub fn order(&self) -> Vec<usize> {
        let mut placed: Vec<usize> = Vec::with_capacity(self.services.len());
        while placed.len() < self.services.len() {
            let before = placed.len();
            for (i, s) in self.services.iter().enumerate() {
                let ready = !placed.contains(&i)
                    && s.after(self)
                        .iter()
                        .all(|d| placed.iter().any(|p| self.services[*p].name == *d));
                if ready {
                    placed.push(i);
                }
            }
            if placed.len() == before {
                break; // a cycle; refused by `parse`
            }
        }
        placed
    }

    /// The services in waves: each wave depends only on earlier ones.
    pub fn waves(&self) -> Vec<Vec<String>> {
        let mut waves: Vec<Vec<String>> = Vec::new();
        let mut done: Vec<&str> = Vec::new();
        while done.len() < self.services.len() {
            let wave: Vec<String> = self
                .services
                .iter()
                .filter(|s| !done.contains(&s.name.as_str()))
                .filter(|s| s.after(self).iter().all(|d| done.contains(d)))
                .map(|s| s.name.clone())
                .collect();
            if wave.is_empty() {
                break;
            }
            done.extend(
                self.services
                    .iter()
                    .filter(|s| wave.contains(&s.name))
                    .map(|s| s.name.as_str()),
            );
            waves.push(wave);
        }
        waves
    }
}

impl ServicePlan {
    fn check(s: RawService, index: usize) -> Result<Self, PlanError> {
        let at = |key: &str| format!("service {:?} (#{}): {key}", s.name, index + 1);
        validate_name(&s.name)
            .map_err(|e| PlanError(format!("service #{}: name: {e}", index + 1)))?;
        baton_common::artifact::validate_version(&s.version)
            .map_err(|e| PlanError(format!("{}: {e}", at("version"))))?;
        let strategy = match s.strategy.as_deref().unwrap_or("rolling") {
            "rolling" => Strategy::Rolling,
            "canary" => Strategy::Canary,
            "all-at-once" => Strategy::AllAtOnce,
            other => {
                return Err(PlanError(format!(
                    "{}: unknown strategy {other:?}; expected \"rolling\", \"canary\" or \"all-at-once\"",
                    at("strategy")
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
            Some(n) => u32::try_from(n)
                .map_err(|_| PlanError(format!("{}: must be 0 or more", at("max_failures"))))?,
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
            .map(|p| duration(Some(p), Duration::ZERO, &at("pause")))
            .transpose()?;
        for (dep, req) in &s.requires {
            semver::VersionReq::parse(req).map_err(|e| {
                PlanError(format!(
                    "{}: {dep} = {req:?} is not a version requirement: {e}",
                    at("requires")
                ))
            })?;
        }
        if s.hosts.as_ref().is_some_and(BTreeMap::is_empty) {
            return Err(PlanError(format!(
                "{}: an empty selector; name labels or leave hosts out",
                at("hosts")
            )));
        }
        let min_healthy_time = duration(
            s.min_healthy_time.as_deref(),
            DEFAULT_MIN_HEALTHY_TIME,
            &at("min_healthy_time"),
        )?;
        let healthy_deadline = duration(
            s.healthy_deadline.as_deref(),
            DEFAULT_HEALTHY_DEADLINE,
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
        Ok(Self {
            min_healthy_time,
            healthy_deadline,
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

    /// The services of `plan` this one must come after: its `depends_on`
    /// and the services of the plan it `requires` a version of.
    pub fn after<'a>(&'a self, plan: &'a Plan) -> Vec<&'a str> {
        let mut out: Vec<&str> = self.depends_on.iter().map(String::as_str).collect();
        for dep in self.requires.keys() {
            if plan.services.iter().any(|s| &s.name == dep) && !out.contains(&dep.as_str()) {
                out.push(dep);
            }
        }
        out
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
mod tests {
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
        let plan = Plan::parse("[[service]]\nname = \"api\"\nversion = \"1\"\n").unwrap();
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
        let svc = "[[service]]\nname = \"api\"\nversion = \"1\"\n";
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
        assert!(
            err(&format!("{svc}max_parallel = 0\n")).contains("max_parallel: must be at least 1")
        );
        assert!(
            err(&format!("{svc}max_parallel = \"0%\"\n"))
                .contains("max_parallel: must be at least 1")
        );
        assert!(err(&format!("{svc}max_parallel = \"150%\"\n")).contains("more than 100%"));
        assert!(err(&format!("{svc}max_parallel = true\n")).contains("expected a host count"));
        assert!(
            err(&format!("{svc}max_failures = -1\n")).contains("max_failures: must be 0 or more")
        );
        assert!(err(&format!("{svc}strategy = \"yolo\"\n")).contains("unknown strategy \"yolo\""));
        assert!(err(&format!("{svc}canary = 1\n")).contains("only applies to strategy \"canary\""));
        assert!(err(&format!("{svc}hosts = {{}}\n")).contains("empty selector"));
        assert!(err("auto_rollback = true\n").contains("names no service"));
        assert!(err("[[service]]\nname = \"a/b\"\nversion = \"1\"\n").contains("name"));
        assert!(err("[[service]]\nname = \"api\"\nversion = \"../1\"\n").contains("version"));
        assert!(err("[[service]]\nname = \"api\"\n").contains("missing field `version`"));
        assert!(
            err("progress_deadline = \"0s\"\n[[service]]\nname = \"a\"\nversion = \"1\"\n")
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
            format!("[[service]]\nname = \"{name}\"\nversion = \"1\"\ndepends_on = [{deps}]\n")
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
        let bad_req = "[[service]]\nname = \"a\"\nversion = \"1\"\nrequires = { b = \"newest\" }\n";
        assert!(err(bad_req).contains("requires: b = \"newest\" is not a version requirement"));
        let no_canary = "[[service]]\nname = \"a\"\nversion = \"1\"\nstrategy = \"canary\"\n";
        assert!(err(no_canary).contains("needs canary = N"));
        assert!(
            err("max_parallel_services = 0\n[[service]]\nname = \"a\"\nversion = \"1\"\n")
                .contains("at least 1")
        );
        // A requirement on a service of the plan orders it like depends_on.
        let req = "[[service]]\nname = \"web\"\nversion = \"2\"\nrequires = { api = \">=2\" }\n[[service]]\nname = \"api\"\nversion = \"2\"\n";
        assert_eq!(Plan::parse(req).unwrap().order(), vec![1, 0]);
        let req_cycle = "[[service]]\nname = \"web\"\nversion = \"2\"\nrequires = { api = \">=2\" }\n[[service]]\nname = \"api\"\nversion = \"2\"\ndepends_on = [\"web\"]\n";
        assert_eq!(err(req_cycle), "depends_on has a cycle: web -> api -> web");
    }

    #[test]
    fn amounts_round_percentages_up() {
        assert_eq!(Amount::Percent(25).of(12), 3);
        assert_eq!(Amount::Percent(25).of(5), 2);
        assert_eq!(Amount::Percent(75).of(4), 3);
        assert_eq!(Amount::Count(2).of(4), 2);
    }
}
