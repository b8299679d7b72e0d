//! The service definition: `service.toml` inside a release, parsed into a
//! [`ServiceSpec`] with every `${NAME}` variable substituted and every key
//! checked, so the supervisor and the health checks never see a half-valid
//! definition.
//!
//! The format is described in DESIGN.md, "service.toml (inside an
//! artifact)". Unknown keys are errors, and so are keys that belong to another
//! health-check kind.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Deserialize;

mod keys;
pub use keys::KEYS;

/// The file name of the service definition inside a release directory.
pub const SERVICE_FILE: &str = "service.toml";

/// The default `stop_timeout`: how long a stopping service may drain before
/// it is killed.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The default health-check `interval` and `timeout`.
pub const DEFAULT_CHECK_PERIOD: Duration = Duration::from_secs(1);
/// The largest `service.toml` read.
pub const MAX_SERVICE_FILE: u64 = 1 << 20;
/// The longest `stop_timeout` (drain time before SIGKILL).
pub const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(3600);
/// The longest timeout of a hook.
pub const MAX_HOOK_TIMEOUT: Duration = Duration::from_secs(3600);
/// The longest `health.interval` and `health.timeout`.
pub const MAX_CHECK_PERIOD: Duration = Duration::from_secs(300);

/// A service as `service.toml` defines it, variables substituted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The program: a path relative to the release directory (without `..`)
    /// or an absolute path. Resolve it with [`ServiceSpec::program`].
    pub command: String,
    /// The program's arguments.
    pub args: Vec<String>,
    /// Environment variables added on top of the agent's environment.
    pub env: BTreeMap<String, String>,
    /// Sockets the service listens on (e.g. `tcp://127.0.0.1:8080`).
    pub listen: Vec<String>,
    /// The signal that asks the service to stop (default SIGTERM).
    pub stop_signal: Signal,
    /// How long the service may take to stop before it is killed.
    pub stop_timeout: Duration,
    /// How to tell that the service is healthy; `None` means "running".
    pub health: Option<HealthSpec>,
    /// Commands run around the service's lifecycle.
    pub hooks: Hooks,
    /// Who runs the process: the agent, or systemd.
    pub supervisor: SupervisorKind,
    /// How a process started beside the old one during a socket handoff
    /// says it is ready to take over.
    pub ready: Readiness,
    /// The user (and group) the process, its hooks and its exec health
    /// checks run as; `None`: the agent's own.
    pub run_as: Option<RunAs>,
}

/// An unprivileged identity for a service (`user`/`group` in
/// `service.toml`), resolved on the host when the release is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The user's name.
    pub user: String,
    /// Its uid.
    pub uid: u32,
    /// The group's name (the user's primary group unless `group` is given).
    pub group: String,
    /// Its gid.
    pub gid: u32,
}

impl RunAs {
    /// Makes `cmd` run as this user and group (supplementary groups are
    /// dropped when the agent runs as root).
    pub fn apply(&self, cmd: &mut tokio::process::Command) {
        cmd.uid(self.uid).gid(self.gid);
    }
}

/// Resolves `user`/`group` against the host's user database.
fn run_as(
    user: Option<&str>,
    group: Option<&str>,
    vars: &BTreeMap<String, String>,
) -> Result<Option<RunAs>, SpecError> {
    use nix::unistd::{Group, User};
    let user = match (user, group) {
        (None, None) => return Ok(None),
        (None, Some(_)) => return Err(invalid("group", "only applies together with user")),
        (Some(u), _) => substitute("user", u, vars)?,
    };
    let found = User::from_name(&user)
        .map_err(|e| invalid("user", format!("cannot look up {user:?}: {e}")))?
        .ok_or_else(|| invalid("user", format!("there is no user {user:?} on this host")))?;
    let (group, gid) = match group {
        Some(g) => {
            let g = substitute("group", g, vars)?;
            let found = Group::from_name(&g)
                .map_err(|e| invalid("group", format!("cannot look up {g:?}: {e}")))?
                .ok_or_else(|| invalid("group", format!("there is no group {g:?} on this host")))?;
            (g, found.gid.as_raw())
        }
        None => {
            let name = Group::from_gid(found.gid)
                .ok()
                .flatten()
                .map_or_else(|| found.gid.to_string(), |g| g.name);
            (name, found.gid.as_raw())
        }
    };
    Ok(Some(RunAs {
        user,
        uid: found.uid.as_raw(),
        group,
        gid,
    }))
}

/// How a new process says it is ready (socket handoff only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Readiness {
    /// A first passing health check (default). The check reaches the
    /// shared socket, so the old process may answer it: prefer `notify`.
    #[default]
    Health,
    /// `READY=1` over `NOTIFY_SOCKET` (sd_notify), which the agent sets to
    /// a socket of that one process.
    Notify,
}

impl ServiceSpec {
    /// The program to execute: [`ServiceSpec::command`] resolved against the
    /// release directory.
    pub fn program(&self, release_dir: &Path) -> PathBuf {
        resolve(release_dir, &self.command)
    }
}

/// Commands run around the service's lifecycle, each in the release
/// directory with the service's environment; a failing one fails the
/// activation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    /// Before the new release starts (before the swap).
    pub pre_start: Option<Hook>,
    /// After the new release turned healthy.
    pub post_start: Option<Hook>,
    /// Before this release's process is stopped (the place to drain it
    /// from a load balancer when it has no `listen` sockets).
    pub pre_stop: Option<Hook>,
    /// After this release's process has stopped.
    pub post_stop: Option<Hook>,
}

/// One hook: a command line and how long it may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// The program (relative to the release directory, or absolute) and
    /// its arguments.
    pub command: Vec<String>,
    /// Killed, with its whole process group, after this long.
    pub timeout: Duration,
}

/// The default time a hook may run.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// Who runs the service's process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SupervisorKind {
    /// The agent itself (default).
    #[default]
    Native,
    /// A systemd unit: the agent swaps the release and restarts the unit
    /// with `systemctl`.
    Systemd {
        /// The unit, e.g. `web.service`.
        unit: String,
    },
}

/// How and how often to check a service's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    /// What one check does.
    pub check: Check,
    /// The time between checks once they pass.
    pub interval: Duration,
    /// The bound on one check.
    pub timeout: Duration,
}

/// One kind of health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// An HTTP GET of `url` (only `http://`) answers 2xx.
    Http {
        /// The URL, e.g. `http://127.0.0.1:8080/healthz`.
        url: String,
    },
    /// A TCP connection to `address` (`host:port`) succeeds.
    Tcp {
        /// `host:port`.
        address: String,
    },
    /// A command run in the release directory exits 0.
    Exec {
        /// The program (relative to the release directory or absolute) and
        /// its arguments; never empty.
        command: Vec<String>,
        /// Who runs it: the service's user, if it has one.
        run_as: Option<RunAs>,
    },
    /// `grpc.health.v1.Health/Check` over plaintext HTTP/2 answers SERVING.
    Grpc {
        /// `host:port`.
        address: String,
        /// The service name asked about; empty means the whole server.
        service: String,
    },
}

/// Why a service definition was refused. The messages name the file and the
/// key, so an operator can fix the artifact without reading code.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has unknown, missing or mistyped keys.
    #[error("service.toml: {0}")]
    Syntax(String),
    /// A key has a value that is not allowed.
    #[error("service.toml: {field}: {message}")]
    Invalid {
        /// The key, e.g. `health.url` or `args[2]`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A `${NAME}` names no defined variable.
    #[error("service.toml: {field}: undefined variable ${{{name}}}")]
    UndefinedVariable {
        /// The key, e.g. `health.url`.
        field: String,
        /// The variable's name.
        name: String,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Reads and parses `release_dir/service.toml`.
pub fn load(release_dir: &Path, vars: &BTreeMap<String, String>) -> Result<ServiceSpec, SpecError> {
    use std::io::Read;
    let path = release_dir.join(SERVICE_FILE);
    let mut text = String::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_SERVICE_FILE + 1).read_to_string(&mut text))
        .map_err(|source| SpecError::Read {
            path: path.clone(),
            source,
        })?;
    if text.len() as u64 > MAX_SERVICE_FILE {
        return Err(SpecError::Syntax(format!(
            "the file is larger than {} KiB",
            MAX_SERVICE_FILE >> 10
        )));
    }
    parse(&text, vars)
}

/// Parses the text of a `service.toml`, substituting `${NAME}` from `vars`
/// in `args`, `env` values, `listen`, the health check's `url`, `address`
/// and `command`, and the hooks.
pub fn parse(text: &str, vars: &BTreeMap<String, String>) -> Result<ServiceSpec, SpecError> {
    let raw: RawSpec =
        toml::from_str(text).map_err(|e| SpecError::Syntax(describe_toml_error(text, &e)))?;

    // A systemd unit names its own command; the agent's supervisor needs one.
    let command = match (&raw.command, raw.supervisor.as_deref()) {
        (Some(c), _) => {
            validate_program("command", c)?;
            c.clone()
        }
        (None, Some("systemd")) => String::new(),
        (None, _) => return Err(SpecError::Syntax("missing field `command`".into())),
    };
    let args = substitute_all("args", &raw.args, vars)?;
    let env = raw
        .env
        .iter()
        .map(|(k, v)| {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(invalid(
                    format!("env.{k}"),
                    "not a valid environment variable name",
                ));
            }
            Ok((k.clone(), substitute(&format!("env.{k}"), v, vars)?))
        })
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    let listen = substitute_all("listen", &raw.listen, vars)?;
    let stop_signal = match &raw.stop_signal {
        None => Signal::SIGTERM,
        Some(name) => parse_signal(name).ok_or_else(|| {
            invalid(
                "stop_signal",
                format!("unknown signal {name:?} (expected a name such as SIGTERM or TERM)"),
            )
        })?,
    };
    let stop_timeout = match &raw.stop_timeout {
        None => DEFAULT_STOP_TIMEOUT,
        Some(text) => parse_duration("stop_timeout", text, MAX_STOP_TIMEOUT)?,
    };
    let run_as = run_as(raw.user.as_deref(), raw.group.as_deref(), vars)?;
    if run_as.is_some() && raw.supervisor.as_deref() == Some("systemd") {
        return Err(invalid(
            "user",
            "does not apply with supervisor = \"systemd\": set User= in the unit",
        ));
    }
    let health = raw
        .health
        .as_ref()
        .map(|h| health(h, vars, run_as.as_ref()))
        .transpose()?;
    let hooks = hooks(&raw.hooks, vars)?;
    let supervisor = match (raw.supervisor.as_deref(), &raw.unit) {
        (None | Some("native"), None) => SupervisorKind::Native,
        (Some("systemd"), Some(unit)) => {
            let unit = substitute("unit", unit, vars)?;
            if unit.is_empty() || unit.contains('/') || unit.chars().any(char::is_whitespace) {
                return Err(invalid("unit", format!("{unit:?} is not a unit name")));
            }
            SupervisorKind::Systemd { unit }
        }
        (Some("systemd"), None) => {
            return Err(invalid(
                "unit",
                "supervisor = \"systemd\" needs unit = \"name.service\"",
            ));
        }
        (None | Some("native"), Some(_)) => {
            return Err(invalid(
                "unit",
                "only applies with supervisor = \"systemd\"",
            ));
        }
        (Some(other), _) => {
            return Err(invalid(
                "supervisor",
                format!("unknown supervisor {other:?} (expected \"native\" or \"systemd\")"),
            ));
        }
    };
    Ok(ServiceSpec {
        command,
        args,
        env,
        listen,
        stop_signal,
        stop_timeout,
        health,
        hooks,
        supervisor,
        ready: match raw.ready.as_deref() {
            None | Some("health") => Readiness::Health,
            Some("notify") => Readiness::Notify,
            Some(other) => {
                return Err(invalid(
                    "ready",
                    format!("unknown readiness {other:?} (expected \"health\" or \"notify\")"),
                ));
            }
        },
        run_as,
    })
}

/// Resolves a program path from `service.toml` against the release
/// directory; absolute paths stay as they are.
pub fn resolve(release_dir: &Path, program: &str) -> PathBuf {
    release_dir.join(program)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    command: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    listen: Vec<String>,
    stop_signal: Option<String>,
    stop_timeout: Option<String>,
    health: Option<RawHealth>,
    #[serde(default)]
    hooks: RawHooks,
    supervisor: Option<String>,
    unit: Option<String>,
    ready: Option<String>,
    user: Option<String>,
    group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: String,
    url: Option<String>,
    address: Option<String>,
    command: Option<Vec<String>>,
    service: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    /// The default timeout of every hook.
    timeout: Option<String>,
    pre_start: Option<toml::Value>,
    post_start: Option<toml::Value>,
    pre_stop: Option<toml::Value>,
    post_stop: Option<toml::Value>,
}

/// A hook is `["prog", "arg"]` or `{ command = ["prog"], timeout = "30s" }`.
fn hook(
    field: &str,
    value: &toml::Value,
    default_timeout: Duration,
    vars: &BTreeMap<String, String>,
) -> Result<Hook, SpecError> {
    let strings = |field: &str, v: &toml::Value| -> Result<Vec<String>, SpecError> {
        v.as_array()
            .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_owned)).collect())
            .ok_or_else(|| {
                invalid(
                    field,
                    "expected an array of strings, e.g. [\"bin/migrate\", \"--check\"]",
                )
            })
    };
    match value {
        toml::Value::Array(_) => Ok(Hook {
            command: command_line(field, &strings(field, value)?, vars)?,
            timeout: default_timeout,
        }),
        toml::Value::Table(t) => {
            if let Some(k) = t
                .keys()
                .find(|k| !matches!(k.as_str(), "command" | "timeout"))
            {
                return Err(invalid(
                    format!("{field}.{k}"),
                    "unknown key (expected command or timeout)",
                ));
            }
            let command = t
                .get("command")
                .ok_or_else(|| invalid(field, "a hook table needs command = [...]"))?;
            let timeout = match t.get("timeout") {
                None => default_timeout,
                Some(toml::Value::String(text)) => {
                    parse_duration(&format!("{field}.timeout"), text, MAX_HOOK_TIMEOUT)?
                }
                Some(_) => {
                    return Err(invalid(
                        format!("{field}.timeout"),
                        "expected a duration like \"30s\"",
                    ));
                }
            };
            let f = format!("{field}.command");
            Ok(Hook {
                command: command_line(&f, &strings(&f, command)?, vars)?,
                timeout,
            })
        }
        _ => Err(invalid(
            field,
            "expected [\"program\", \"arg\"] or { command = [...], timeout = \"30s\" }",
        )),
    }
}

fn hooks(raw: &RawHooks, vars: &BTreeMap<String, String>) -> Result<Hooks, SpecError> {
    let timeout = match &raw.timeout {
        None => DEFAULT_HOOK_TIMEOUT,
        Some(text) => parse_duration("hooks.timeout", text, MAX_HOOK_TIMEOUT)?,
    };
    let one = |name: &str, v: &Option<toml::Value>| {
        v.as_ref()
            .map(|v| hook(&format!("hooks.{name}"), v, timeout, vars))
            .transpose()
    };
    Ok(Hooks {
        pre_start: one("pre_start", &raw.pre_start)?,
        post_start: one("post_start", &raw.post_start)?,
        pre_stop: one("pre_stop", &raw.pre_stop)?,
        post_stop: one("post_stop", &raw.post_stop)?,
    })
}

/// The keys of `[health]` that only some kinds take, and which kinds.
const KIND_KEYS: [(&str, &[&str]); 4] = [
    ("url", &["http"]),
    ("address", &["tcp", "grpc"]),
    ("command", &["exec"]),
    ("service", &["grpc"]),
];

fn health(
    raw: &RawHealth,
    vars: &BTreeMap<String, String>,
    run_as: Option<&RunAs>,
) -> Result<HealthSpec, SpecError> {
    let kind = raw.kind.as_str();
    if !matches!(kind, "http" | "tcp" | "exec" | "grpc") {
        return Err(invalid(
            "health.kind",
            format!("unknown kind {kind:?} (expected \"http\", \"tcp\", \"exec\" or \"grpc\")"),
        ));
    }
    let present = [
        raw.url.is_some(),
        raw.address.is_some(),
        raw.command.is_some(),
        raw.service.is_some(),
    ];
    for ((key, kinds), present) in KIND_KEYS.iter().zip(present) {
        if present && !kinds.contains(&kind) {
            return Err(invalid(
                format!("health.{key}"),
                format!(
                    "not allowed with kind = {kind:?} (only with kind = {})",
                    kinds
                        .iter()
                        .map(|k| format!("{k:?}"))
                        .collect::<Vec<_>>()
                        .join(" or kind = ")
                ),
            ));
        }
    }
    let required = |key: &str, value: Option<&String>| -> Result<String, SpecError> {
        value
            .cloned()
            .ok_or_else(|| invalid("health", format!("kind = {kind:?} requires `{key}`")))
    };
    let check = match kind {
        "http" => {
            let url = substitute("health.url", &required("url", raw.url.as_ref())?, vars)?;
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(invalid(
                    "health.url",
                    format!("{url:?} is not an http:// or https:// URL"),
                ));
            }
            Check::Http { url }
        }
        "tcp" | "grpc" => {
            let address = substitute(
                "health.address",
                &required("address", raw.address.as_ref())?,
                vars,
            )?;
            validate_address("health.address", &address)?;
            if kind == "tcp" {
                Check::Tcp { address }
            } else {
                Check::Grpc {
                    address,
                    service: raw.service.clone().unwrap_or_default(),
                }
            }
        }
        _ => {
            let command = raw
                .command
                .as_ref()
                .ok_or_else(|| invalid("health", "kind = \"exec\" requires `command`"))?;
            Check::Exec {
                command: command_line("health.command", command, vars)?,
                run_as: run_as.cloned(),
            }
        }
    };
    let period = |key: &str, value: &Option<String>| -> Result<Duration, SpecError> {
        let field = format!("health.{key}");
        match value {
            None => Ok(DEFAULT_CHECK_PERIOD),
            Some(text) => match parse_duration(&field, text, MAX_CHECK_PERIOD)? {
                d if d.is_zero() => Err(invalid(field, "must be longer than zero")),
                d => Ok(d),
            },
        }
    };
    Ok(HealthSpec {
        check,
        interval: period("interval", &raw.interval)?,
        timeout: period("timeout", &raw.timeout)?,
    })
}

/// A command line (hook or exec check): not empty, a valid program first,
/// variables substituted.
fn command_line(
    field: &str,
    raw: &[String],
    vars: &BTreeMap<String, String>,
) -> Result<Vec<String>, SpecError> {
    let command = substitute_all(field, raw, vars)?;
    let Some(program) = command.first() else {
        return Err(invalid(field, "must not be empty"));
    };
    validate_program(&format!("{field}[0]"), program)?;
    Ok(command)
}

/// A program must be absolute, or relative and stay inside the release
/// directory.
fn validate_program(field: &str, program: &str) -> Result<(), SpecError> {
    if program.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if program.contains('\0') {
        return Err(invalid(field, "must not contain NUL"));
    }
    let path = Path::new(program);
    if !path.is_absolute() && path.components().any(|c| c == Component::ParentDir) {
        return Err(invalid(
            field,
            format!(
                "{program:?} leaves the release directory (a relative path must not contain `..`)"
            ),
        ));
    }
    Ok(())
}

/// `host:port` with a numeric port; the host may be a name, an IPv4 address
/// or a bracketed IPv6 address.
fn validate_address(field: &str, address: &str) -> Result<(), SpecError> {
    let ok = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if ok {
        Ok(())
    } else {
        Err(invalid(field, format!("{address:?} is not host:port")))
    }
}

/// Parses a duration of at most `max` (zero allowed: callers that need
/// more say so).
fn parse_duration(field: &str, text: &str, max: Duration) -> Result<Duration, SpecError> {
    baton_common::time::parse_bounded(text, Duration::ZERO, max).map_err(|e| invalid(field, e))
}

/// Accepts `SIGTERM`, `TERM` and the same in lower case.
fn parse_signal(name: &str) -> Option<Signal> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&full).ok()
}

fn substitute_all(
    field: &str,
    values: &[String],
    vars: &BTreeMap<String, String>,
) -> Result<Vec<String>, SpecError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| substitute(&format!("{field}[{i}]"), v, vars))
        .collect()
}

/// Replaces each `${NAME}` in `text` with the variable's value. A `$` not
/// followed by `{` stays as it is; values are not substituted again.
pub(crate) fn substitute(
    field: &str,
    text: &str,
    vars: &BTreeMap<String, String>,
) -> Result<String, SpecError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(invalid(field, format!("unterminated `${{` in {text:?}")));
        };
        let name = &after[..end];
        if name.is_empty() {
            return Err(invalid(field, format!("empty `${{}}` in {text:?}")));
        }
        let value = vars.get(name).ok_or_else(|| SpecError::UndefinedVariable {
            field: field.to_owned(),
            name: name.to_owned(),
        })?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// toml's own message is several lines with a source excerpt; this keeps the
/// position and the message on one line.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("port".to_owned(), "8080".to_owned()),
            ("BATON_HOST_ID".to_owned(), "h1".to_owned()),
        ])
    }

    fn err(text: &str) -> String {
        parse(text, &vars()).unwrap_err().to_string()
    }

    #[test]
    fn minimal_file_gets_the_defaults() {
        let spec = parse("command = \"bin/server\"", &vars()).unwrap();
        assert_eq!(
            spec,
            ServiceSpec {
                command: "bin/server".into(),
                args: vec![],
                env: BTreeMap::new(),
                listen: vec![],
                stop_signal: Signal::SIGTERM,
                stop_timeout: Duration::from_secs(10),
                health: None,
                hooks: Hooks::default(),
                supervisor: SupervisorKind::Native,
                ready: Readiness::Health,
                run_as: None,
            }
        );
        assert_eq!(
            spec.program(Path::new("/r/1.0")),
            Path::new("/r/1.0/bin/server")
        );
        let abs = parse("command = \"/usr/bin/env\"", &vars()).unwrap();
        assert_eq!(abs.program(Path::new("/r/1.0")), Path::new("/usr/bin/env"));
    }

    #[test]
    fn the_design_example_parses_with_variables() {
        let text = r#"
command = "bin/server"
args = ["--port", "${port}", "--host=${BATON_HOST_ID}-x"]
env = { RUST_LOG = "info", PORT = "${port}" }
listen = ["tcp://127.0.0.1:${port}"]
stop_signal = "SIGINT"
stop_timeout = "2s 500ms"

[health]
kind = "http"
url = "http://127.0.0.1:${port}/healthz"
interval = "500ms"
timeout = "1s"

[hooks]
pre_start = ["bin/migrate", "--check", "${port}"]
"#;
        let spec = parse(text, &vars()).unwrap();
        assert_eq!(spec.args, ["--port", "8080", "--host=h1-x"]);
        assert_eq!(spec.env["PORT"], "8080");
        assert_eq!(spec.env["RUST_LOG"], "info");
        assert_eq!(spec.listen, ["tcp://127.0.0.1:8080"]);
        assert_eq!(spec.stop_signal, Signal::SIGINT);
        assert_eq!(spec.stop_timeout, Duration::from_millis(2500));
        assert_eq!(
            spec.health,
            Some(HealthSpec {
                check: Check::Http {
                    url: "http://127.0.0.1:8080/healthz".into()
                },
                interval: Duration::from_millis(500),
                timeout: Duration::from_secs(1),
            })
        );
        assert_eq!(
            spec.hooks.pre_start,
            Some(Hook {
                command: vec!["bin/migrate".to_owned(), "--check".into(), "8080".into()],
                timeout: DEFAULT_HOOK_TIMEOUT,
            })
        );
    }

    #[test]
    fn hooks_take_a_command_or_a_table_with_a_timeout() {
        let spec = parse(
            "command = \"x\"\n[hooks]\ntimeout = \"5s\"\npre_stop = [\"bin/drain\"]\npost_start = { command = [\"bin/warm\", \"${port}\"], timeout = \"2s\" }\n",
            &vars(),
        )
        .unwrap();
        assert_eq!(spec.hooks.pre_stop.unwrap().timeout, Duration::from_secs(5));
        let post = spec.hooks.post_start.unwrap();
        assert_eq!(post.command, vec!["bin/warm".to_owned(), "8080".into()]);
        assert_eq!(post.timeout, Duration::from_secs(2));
        assert!(spec.hooks.post_stop.is_none());
        assert_eq!(
            err("command = \"x\"\n[hooks]\npost_stop = { command = [\"a\"], after = \"1s\" }"),
            "service.toml: hooks.post_stop.after: unknown key (expected command or timeout)"
        );
        assert_eq!(
            err("command = \"x\"\n[hooks]\npost_stop = { timeout = \"1s\" }"),
            "service.toml: hooks.post_stop: a hook table needs command = [...]"
        );
        assert!(err("command = \"x\"\n[hooks]\npre_stop = 3").contains("hooks.pre_stop: expected"));
        assert!(err("command = \"x\"\n[hooks]\nwhen = [\"a\"]").contains("unknown field `when`"));
    }

    #[test]
    fn a_service_may_be_a_systemd_unit() {
        let spec = parse(
            "command = \"x\"\nsupervisor = \"systemd\"\nunit = \"web-${port}.service\"",
            &vars(),
        )
        .unwrap();
        assert_eq!(
            spec.supervisor,
            SupervisorKind::Systemd {
                unit: "web-8080.service".into()
            }
        );
        assert!(err("command = \"x\"\nsupervisor = \"systemd\"").contains("needs unit"));
        assert!(
            err("command = \"x\"\nunit = \"a.service\"").contains("only applies with supervisor")
        );
        assert!(
            err("command = \"x\"\nsupervisor = \"runit\"").contains("unknown supervisor \"runit\"")
        );
    }

    #[test]
    fn every_health_kind() {
        let check = |body: &str| {
            parse(&format!("command = \"x\"\n[health]\n{body}"), &vars())
                .unwrap()
                .health
                .unwrap()
        };
        let tcp = check("kind = \"tcp\"\naddress = \"127.0.0.1:${port}\"");
        assert_eq!(
            tcp.check,
            Check::Tcp {
                address: "127.0.0.1:8080".into()
            }
        );
        assert_eq!(
            (tcp.interval, tcp.timeout),
            (Duration::from_secs(1), Duration::from_secs(1))
        );
        assert_eq!(
            check("kind = \"exec\"\ncommand = [\"bin/check\", \"${port}\"]").check,
            Check::Exec {
                command: vec!["bin/check".into(), "8080".into()],
                run_as: None,
            }
        );
        assert_eq!(
            check("kind = \"grpc\"\naddress = \"localhost:${port}\"").check,
            Check::Grpc {
                address: "localhost:8080".into(),
                service: String::new()
            }
        );
        assert_eq!(
            check("kind = \"grpc\"\naddress = \"[::1]:9\"\nservice = \"api.v1.Api\"").check,
            Check::Grpc {
                address: "[::1]:9".into(),
                service: "api.v1.Api".into()
            }
        );
    }

    #[test]
    fn signal_names() {
        for (name, signal) in [
            ("SIGTERM", Signal::SIGTERM),
            ("TERM", Signal::SIGTERM),
            ("SIGQUIT", Signal::SIGQUIT),
            ("HUP", Signal::SIGHUP),
            ("SIGUSR1", Signal::SIGUSR1),
            ("USR2", Signal::SIGUSR2),
            ("SIGKILL", Signal::SIGKILL),
            ("int", Signal::SIGINT),
        ] {
            let spec = parse(
                &format!("command = \"x\"\nstop_signal = \"{name}\""),
                &vars(),
            )
            .unwrap();
            assert_eq!(spec.stop_signal, signal, "{name}");
        }
        assert_eq!(
            err("command = \"x\"\nstop_signal = \"SIGFOO\""),
            "service.toml: stop_signal: unknown signal \"SIGFOO\" (expected a name such as SIGTERM or TERM)"
        );
    }

    #[test]
    fn user_and_group_are_resolved_on_the_host() {
        let spec = parse("command = \"x\"\nuser = \"root\"", &vars()).unwrap();
        assert_eq!(
            spec.run_as,
            Some(RunAs {
                user: "root".into(),
                uid: 0,
                group: "root".into(),
                gid: 0
            })
        );
        let err = parse("command = \"x\"\nuser = \"no-such-user-here\"", &vars()).unwrap_err();
        assert!(
            err.to_string()
                .contains("there is no user \"no-such-user-here\""),
            "{err}"
        );
        let err = parse("command = \"x\"\ngroup = \"root\"", &vars()).unwrap_err();
        assert!(
            err.to_string().contains("only applies together with user"),
            "{err}"
        );
        let err = parse(
            "command = \"x\"\nuser = \"root\"\ngroup = \"no-such-group\"",
            &vars(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("there is no group"), "{err}");
    }

    #[test]
    fn errors_say_what_and_where() {
        assert_eq!(
            err(
                "command = \"x\"\n[health]\nkind = \"http\"\nurl = \"http://127.0.0.1:${prot}/healthz\""
            ),
            "service.toml: health.url: undefined variable ${prot}"
        );
        assert_eq!(
            err("command = \"x\"\nargs = [\"a\", \"${nope}\"]"),
            "service.toml: args[1]: undefined variable ${nope}"
        );
        assert_eq!(
            err("command = \"x\"\nenv = { A = \"${nope}\" }"),
            "service.toml: env.A: undefined variable ${nope}"
        );
        assert_eq!(
            err("command = \"x\"\n[hooks]\npre_start = [\"${nope}\"]"),
            "service.toml: hooks.pre_start[0]: undefined variable ${nope}"
        );
        assert_eq!(
            err("command = \"x\"\nargs = [\"${port\"]"),
            "service.toml: args[0]: unterminated `${` in \"${port\""
        );
        let unknown = err("command = \"x\"\nfoo = 1");
        assert!(
            unknown.starts_with("service.toml: line 2, column 1: unknown field `foo`"),
            "{unknown}"
        );
        let unknown = err("command = \"x\"\n[health]\nkind = \"tcp\"\naddress = \"a:1\"\nport = 3");
        assert!(
            unknown.contains("line 5") && unknown.contains("unknown field `port`"),
            "{unknown}"
        );
        let missing = err("args = []");
        assert!(missing.contains("missing field `command`"), "{missing}");
        let syntax = err("command = \"x\"\nargs = [");
        assert!(syntax.starts_with("service.toml: line 2"), "{syntax}");
        assert_eq!(
            err("command = \"x\"\n[health]\nkind = \"http\""),
            "service.toml: health: kind = \"http\" requires `url`"
        );
        assert_eq!(
            err("command = \"x\"\n[health]\nkind = \"exec\""),
            "service.toml: health: kind = \"exec\" requires `command`"
        );
        assert_eq!(
            err(
                "command = \"x\"\n[health]\nkind = \"tcp\"\nurl = \"http://a/\"\naddress = \"a:1\""
            ),
            "service.toml: health.url: not allowed with kind = \"tcp\" (only with kind = \"http\")"
        );
        assert_eq!(
            err("command = \"x\"\n[health]\nkind = \"http\"\nurl = \"http://a/\"\nservice = \"s\""),
            "service.toml: health.service: not allowed with kind = \"http\" (only with kind = \"grpc\")"
        );
        assert_eq!(
            err("command = \"x\"\n[health]\nkind = \"udp\""),
            "service.toml: health.kind: unknown kind \"udp\" (expected \"http\", \"tcp\", \"exec\" or \"grpc\")"
        );
        assert_eq!(
            err("command = \"x\"\n[health]\nkind = \"http\"\nurl = \"ftp://a/\""),
            "service.toml: health.url: \"ftp://a/\" is not an http:// or https:// URL"
        );
        assert_eq!(
            err("command = \"x\"\n[health]\nkind = \"tcp\"\naddress = \"localhost\""),
            "service.toml: health.address: \"localhost\" is not host:port"
        );
        assert_eq!(
            err("command = \"x\"\n[health]\nkind = \"exec\"\ncommand = []"),
            "service.toml: health.command: must not be empty"
        );
    }

    #[test]
    fn bad_durations_and_paths() {
        let bad = err("command = \"x\"\nstop_timeout = \"ten seconds\"");
        assert!(
            bad.starts_with("service.toml: stop_timeout: invalid duration \"ten seconds\": "),
            "{bad}"
        );
        let bad =
            err("command = \"x\"\n[health]\nkind = \"tcp\"\naddress = \"a:1\"\ninterval = \"5\"");
        assert!(
            bad.starts_with("service.toml: health.interval: invalid duration \"5\""),
            "{bad}"
        );
        assert_eq!(
            err("command = \"x\"\n[health]\nkind = \"tcp\"\naddress = \"a:1\"\ntimeout = \"0s\""),
            "service.toml: health.timeout: must be longer than zero"
        );
        assert_eq!(
            err("command = \"../other/bin\""),
            "service.toml: command: \"../other/bin\" leaves the release directory (a relative path must not contain `..`)"
        );
        assert_eq!(
            err("command = \"\""),
            "service.toml: command: must not be empty"
        );
        assert_eq!(
            err("command = \"x\"\n[hooks]\npre_start = [\"bin/../../x\"]"),
            "service.toml: hooks.pre_start[0]: \"bin/../../x\" leaves the release directory (a relative path must not contain `..`)"
        );
    }

    /// The names a `deny_unknown_fields` reader accepts, from the error a
    /// probe key gets (serde lists them all).
    fn accepted<T: serde::de::DeserializeOwned>(probe: &str) -> Vec<String> {
        let e = toml::from_str::<T>(probe)
            .err()
            .expect("the probe is refused");
        baton_common::reference::probed_fields(e.message()).unwrap()
    }

    #[test]
    fn the_key_reference_lists_exactly_the_keys_service_toml_may_have() {
        use baton_common::reference::keys_under;
        for (prefix, accepted) in [
            ("", accepted::<RawSpec>("__probe = 1")),
            ("health.", accepted::<RawSpec>("[health]\n__probe = 1\n")),
            ("hooks.", accepted::<RawSpec>("[hooks]\n__probe = 1\n")),
        ] {
            let documented = keys_under(KEYS, prefix);
            assert!(!accepted.is_empty(), "{prefix:?}: no field list");
            let undocumented: Vec<&String> = accepted
                .iter()
                .filter(|k| !documented.contains(k))
                .collect();
            let unknown: Vec<&String> = documented
                .iter()
                .filter(|k| !accepted.contains(k))
                .collect();
            assert_eq!(
                documented, accepted,
                "{prefix:?}: undocumented keys: {undocumented:?}; documented but not accepted: {unknown:?}"
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
    fn load_reads_the_release_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = load(dir.path(), &vars()).unwrap_err().to_string();
        assert!(
            missing.starts_with("cannot read ") && missing.contains("service.toml"),
            "{missing}"
        );
        std::fs::write(
            dir.path().join(SERVICE_FILE),
            "command = \"bin/s\"\nargs = [\"${port}\"]",
        )
        .unwrap();
        assert_eq!(load(dir.path(), &vars()).unwrap().args, ["8080"]);
    }
}
