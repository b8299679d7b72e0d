//! Load-balancer draining: how a plan's `[service.traffic]` takes a host
//! out of its balancer before the swap and puts it back after its health
//! gate, as a domain type that commands carry. What talks to a balancer is
//! in [`balancer`] (feature `runtime`).
//!
//! A command that carries a [`Traffic`] runs as: drain the host's server →
//! wait until its connections reach zero (or `drain_timeout`, after which
//! the ones left are counted as cut) → the command itself → ready → (on
//! success) wait until the balancer reports the server up. The server is
//! put back whatever the command's outcome: a host is never left drained by
//! a command that drained it (a balancer's own health check keeps traffic
//! off a release that failed until its rollback).

use std::collections::BTreeMap;
use std::time::Duration;

#[cfg(feature = "runtime")]
pub mod balancer;

/// The longest `drain_timeout`.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(3600);
/// `drain_timeout` when the plan does not say.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest runtime-API address (a unix path or `tcp://IP:PORT`); a
/// unix socket path cannot be longer than 107 bytes anyway.
pub const MAX_SOCKET_CHARS: usize = 256;
/// The longest backend or server name, before and after `${…}` expansion.
pub const MAX_NAME_CHARS: usize = 128;
/// The most arguments of an `exec` command.
pub const MAX_ARGS: usize = 32;
/// The longest argument of an `exec` command.
pub const MAX_ARG_CHARS: usize = 1024;

/// Where the balancer's commands run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOn {
    /// On `batond`: one central balancer for every host.
    Coordinator,
    /// On each host's agent: a balancer local to the host.
    Agent,
}

/// How to reach the balancer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balancer {
    /// HAProxy's runtime API.
    Haproxy {
        /// A unix socket path, or `tcp://IP:PORT`.
        socket: String,
        /// The backend, with `${…}` placeholders.
        backend: String,
        /// The host's server in that backend, with `${…}` placeholders.
        server: String,
    },
    /// Operator commands, each given the host id as its last argument.
    Exec {
        /// Takes the host out (new connections go elsewhere).
        drain: Vec<String>,
        /// Puts it back.
        ready: Vec<String>,
        /// Prints the host's open connections (one number).
        connections: Vec<String>,
    },
}

/// A service's `[service.traffic]`, as commands carry it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    /// The balancer.
    pub balancer: Balancer,
    /// How long a drained host's connections may take to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Where the balancer's commands run.
    pub run_on: RunOn,
}

impl Traffic {
    /// Checks every limit: what a plan or a command carries is bounded.
    pub fn validate(&self) -> Result<(), String> {
        if self.drain_timeout > MAX_DRAIN_TIMEOUT {
            return Err(format!(
                "drain_timeout {} is above the limit of {}",
                humantime::format_duration(self.drain_timeout),
                humantime::format_duration(MAX_DRAIN_TIMEOUT)
            ));
        }
        match &self.balancer {
            Balancer::Haproxy {
                socket,
                backend,
                server,
            } => {
                validate_socket(socket)?;
                for (key, v) in [("backend", backend), ("server", server)] {
                    if v.is_empty() {
                        return Err(format!("{key} is empty"));
                    }
                    if v.chars().count() > MAX_NAME_CHARS {
                        return Err(format!(
                            "{key} {} is longer than {MAX_NAME_CHARS} characters",
                            crate::text::quote(v)
                        ));
                    }
                    if v.chars().any(|c| c.is_control() || c.is_whitespace()) {
                        return Err(format!(
                            "{key} {} holds a space or a control character",
                            crate::text::quote(v)
                        ));
                    }
                }
            }
            Balancer::Exec {
                drain,
                ready,
                connections,
            } => {
                for (key, argv) in [
                    ("drain", drain),
                    ("ready", ready),
                    ("connections", connections),
                ] {
                    validate_argv(key, argv)?;
                }
            }
        }
        Ok(())
    }
}

/// The most balancers one `batond` or agent may be allowed.
pub const MAX_ALLOWED: usize = 64;

/// Checks a `balancer` setting: at most [`MAX_ALLOWED`] entries of 1 to
/// 1,024 characters without NUL.
pub fn check_allowed(allowed: &[String]) -> Result<(), String> {
    if allowed.len() > MAX_ALLOWED
        || allowed
            .iter()
            .any(|b| b.is_empty() || b.len() > 1024 || b.contains('\0'))
    {
        return Err(format!(
            "balancer: at most {MAX_ALLOWED} entries of 1 to 1,024 characters without NUL"
        ));
    }
    Ok(())
}

impl Traffic {
    /// Whether whoever runs this may: its runtime-API socket, or each of
    /// its commands' programs, must be among `allowed` (the `balancer`
    /// setting of `batond` or the agent). A plan is not signed, so it
    /// must not make `batond` or an agent run a program, or talk to a
    /// socket, that their operator did not name.
    pub fn allowed_by(&self, allowed: &[String], who: &str) -> Result<(), String> {
        let wanted: Vec<&str> = match &self.balancer {
            Balancer::Haproxy { socket, .. } => vec![socket.as_str()],
            Balancer::Exec {
                drain,
                ready,
                connections,
            } => [drain, ready, connections]
                .iter()
                .filter_map(|argv| argv.first().map(String::as_str))
                .collect(),
        };
        match wanted.iter().find(|w| !allowed.iter().any(|a| a == *w)) {
            None => Ok(()),
            Some(w) => Err(format!(
                "{} is not a balancer {who} may use: name it in its `balancer` setting (flag --balancer, repeatable), which lists the runtime-API sockets and programs a plan may use",
                crate::text::quote(w)
            )),
        }
    }
}

fn validate_socket(socket: &str) -> Result<(), String> {
    if socket.chars().count() > MAX_SOCKET_CHARS || socket.contains('\0') {
        return Err(format!(
            "socket {} is longer than {MAX_SOCKET_CHARS} characters or holds a NUL",
            crate::text::quote(socket)
        ));
    }
    if let Some(addr) = socket.strip_prefix("tcp://") {
        addr.parse::<std::net::SocketAddr>()
            .map_err(|_| format!("socket {} is not tcp://IP:PORT", crate::text::quote(socket)))?;
        return Ok(());
    }
    if !socket.starts_with('/') {
        return Err(format!(
            "socket {} is neither an absolute unix socket path nor tcp://IP:PORT",
            crate::text::quote(socket)
        ));
    }
    if socket.len() > 107 {
        return Err(format!(
            "socket {} is longer than a unix socket path can be (107 bytes)",
            crate::text::quote(socket)
        ));
    }
    Ok(())
}

fn validate_argv(key: &str, argv: &[String]) -> Result<(), String> {
    let Some(program) = argv.first().filter(|p| !p.is_empty()) else {
        return Err(format!(
            "{key} needs a command (a list: program, arguments)"
        ));
    };
    if !program.starts_with('/') {
        // Not looked up on a PATH: the program allowed is the one run.
        return Err(format!(
            "{key}: the program {} must be an absolute path",
            crate::text::quote(program)
        ));
    }
    if argv.len() > MAX_ARGS {
        return Err(format!(
            "{key} has {} arguments, the limit is {MAX_ARGS}",
            argv.len()
        ));
    }
    for a in argv {
        if a.chars().count() > MAX_ARG_CHARS || a.contains('\0') {
            return Err(format!(
                "{key}: argument {} is longer than {MAX_ARG_CHARS} characters or holds a NUL",
                crate::text::quote(a)
            ));
        }
    }
    Ok(())
}

/// `template` with `${BATON_HOST_ID}` and `${host}` replaced by `host`, and
/// every other `${NAME}` by `vars[NAME]` (on an agent, the host's labels;
/// on `batond`, nothing else). An undefined name, or a result that is not a name
/// HAProxy accepts (letters, digits, `-_.:`), is an error: a value must not
/// smuggle a second runtime-API command in.
pub fn expand_name(
    key: &str,
    template: &str,
    host: &str,
    vars: &BTreeMap<String, String>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!(
                "{key} {}: an unclosed ${{",
                crate::text::quote(template)
            ));
        };
        let name = &after[..end];
        let value = match name {
            "BATON_HOST_ID" | "host" => host,
            _ => vars.get(name).map(String::as_str).ok_or_else(|| {
                format!(
                    "{key} {}: ${{{}}} is not defined for host {host} (use BATON_HOST_ID or host; with run_on = \"agent\" also one of its labels)",
                    crate::text::quote(template),
                    crate::text::shorten(name)
                )
            })?,
        };
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    if out.is_empty()
        || out.chars().count() > MAX_NAME_CHARS
        || !out
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        // Not quoting what it became: a value is not to be echoed.
        return Err(format!(
            "{key} {} for host {host} is not a balancer name once filled in (1 to {MAX_NAME_CHARS} letters, digits, '-', '_', '.', ':')",
            crate::text::quote(template)
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> BTreeMap<String, String> {
        [
            ("rack".to_owned(), "r1".to_owned()),
            ("evil".to_owned(), "x\nshutdown sessions".to_owned()),
        ]
        .into_iter()
        .collect()
    }

    #[test]
    fn names_are_expanded_per_host_and_checked() {
        assert_eq!(
            expand_name("server", "${BATON_HOST_ID}", "h1", &vars()).unwrap(),
            "h1"
        );
        assert_eq!(
            expand_name("server", "web-${rack}-${host}", "h1", &vars()).unwrap(),
            "web-r1-h1"
        );
        let e = expand_name("server", "${zone}", "h1", &vars()).unwrap_err();
        assert!(e.contains("${zone} is not defined for host h1"), "{e}");
        let e = expand_name("server", "${evil}", "h1", &vars()).unwrap_err();
        assert!(e.contains("not a balancer name"), "{e}");
        assert!(expand_name("server", "${rack", "h1", &vars()).is_err());
        assert!(expand_name("server", "", "h1", &vars()).is_err());
        let long = "x".repeat(MAX_NAME_CHARS + 1);
        assert!(expand_name("server", &long, "h1", &vars()).is_err());
    }

    fn haproxy(socket: &str) -> Traffic {
        Traffic {
            balancer: Balancer::Haproxy {
                socket: socket.into(),
                backend: "web".into(),
                server: "${BATON_HOST_ID}".into(),
            },
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            run_on: RunOn::Coordinator,
        }
    }

    #[test]
    fn a_balancer_setting_is_bounded_and_matched_exactly() {
        let one = vec!["/run/haproxy/admin.sock".to_owned()];
        assert!(check_allowed(&one).is_ok());
        assert!(check_allowed(&[String::new()]).is_err());
        assert!(check_allowed(&["/a\0".to_owned()]).is_err());
        assert!(check_allowed(&vec!["/s".to_owned(); MAX_ALLOWED + 1]).is_err());
        let t = haproxy("/run/haproxy/admin.sock");
        assert!(t.allowed_by(&one, "batond").is_ok());
        let e = haproxy("/run/haproxy/../haproxy/admin.sock")
            .allowed_by(&one, "batond")
            .unwrap_err();
        assert!(e.contains("is not a balancer batond may use"), "{e}");
        assert!(t.allowed_by(&[], "batond").is_err());
    }

    #[test]
    fn limits_are_checked() {
        assert!(haproxy("/run/haproxy/admin.sock").validate().is_ok());
        assert!(haproxy("tcp://127.0.0.1:9999").validate().is_ok());
        for bad in [
            "run/admin.sock",
            "tcp://localhost:1",
            "tcp://127.0.0.1",
            "/a\0b",
            &format!("/{}", "x".repeat(200)),
        ] {
            assert!(haproxy(bad).validate().is_err(), "{bad:?}");
        }
        let mut t = haproxy("/s");
        t.drain_timeout = MAX_DRAIN_TIMEOUT + Duration::from_secs(1);
        assert!(t.validate().unwrap_err().contains("drain_timeout"));
        let exec = |drain: Vec<String>| Traffic {
            balancer: Balancer::Exec {
                drain,
                ready: vec!["/bin/ready".into()],
                connections: vec!["/bin/conns".into()],
            },
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            run_on: RunOn::Agent,
        };
        assert!(exec(vec!["/bin/drain".into()]).validate().is_ok());
        assert!(
            exec(vec!["drain".into()])
                .validate()
                .unwrap_err()
                .contains("absolute path")
        );
        assert!(exec(vec![]).validate().is_err());
        assert!(exec(vec![String::new()]).validate().is_err());
        assert!(exec(vec!["/x".into(); MAX_ARGS + 1]).validate().is_err());
        assert!(exec(vec!["/a\0".into()]).validate().is_err());
    }
}
