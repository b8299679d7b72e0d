//! A service's `[service.traffic]`: its keys, read strictly (a key of the
//! other kind is an error, not ignored).

use baton_common::text::quote;
use baton_common::traffic::{Balancer, DEFAULT_DRAIN_TIMEOUT, MAX_DRAIN_TIMEOUT, RunOn, Traffic};
use serde::Deserialize;

use super::{PlanError, duration};

/// `[service.traffic]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTraffic {
    kind: String,
    socket: Option<String>,
    backend: Option<String>,
    server: Option<String>,
    drain_timeout: Option<String>,
    run_on: Option<String>,
    drain: Option<Vec<String>>,
    ready: Option<Vec<String>>,
    connections: Option<Vec<String>>,
}

impl RawTraffic {
    /// The checked form; `at` names the table in errors.
    pub(super) fn check(self, at: &dyn Fn(&str) -> String) -> Result<Traffic, PlanError> {
        let key = |k: &str| at(&format!("traffic.{k}"));
        let run_on = match self.run_on.as_deref().unwrap_or("coordinator") {
            "coordinator" => RunOn::Coordinator,
            "agent" => RunOn::Agent,
            other => {
                return Err(PlanError(format!(
                    "{}: {} is not \"coordinator\" or \"agent\"",
                    key("run_on"),
                    quote(other)
                )));
            }
        };
        let drain_timeout = duration(
            self.drain_timeout.as_deref(),
            DEFAULT_DRAIN_TIMEOUT,
            MAX_DRAIN_TIMEOUT,
            &key("drain_timeout"),
        )?;
        let stray = |keys: &[(&str, bool)], kind: &str| -> Result<(), PlanError> {
            match keys.iter().find(|(_, given)| *given) {
                Some((k, _)) => Err(PlanError(format!(
                    "{}: not a key of kind = {kind:?}",
                    key(k)
                ))),
                None => Ok(()),
            }
        };
        let required = |v: Option<String>, k: &str, kind: &str| {
            v.ok_or_else(|| PlanError(format!("{}: required with kind = {kind:?}", key(k))))
        };
        let balancer = match self.kind.as_str() {
            "haproxy" => {
                stray(
                    &[
                        ("drain", self.drain.is_some()),
                        ("ready", self.ready.is_some()),
                        ("connections", self.connections.is_some()),
                    ],
                    "haproxy",
                )?;
                Balancer::Haproxy {
                    socket: required(self.socket, "socket", "haproxy")?,
                    backend: required(self.backend, "backend", "haproxy")?,
                    server: self.server.unwrap_or_else(|| "${BATON_HOST_ID}".into()),
                }
            }
            "exec" => {
                stray(
                    &[
                        ("socket", self.socket.is_some()),
                        ("backend", self.backend.is_some()),
                        ("server", self.server.is_some()),
                    ],
                    "exec",
                )?;
                let argv = |v: Option<Vec<String>>, k: &str| {
                    v.ok_or_else(|| PlanError(format!("{}: required with kind = \"exec\"", key(k))))
                };
                Balancer::Exec {
                    drain: argv(self.drain, "drain")?,
                    ready: argv(self.ready, "ready")?,
                    connections: argv(self.connections, "connections")?,
                }
            }
            other => {
                return Err(PlanError(format!(
                    "{}: unknown kind {}; expected \"haproxy\" or \"exec\"",
                    key("kind"),
                    quote(other)
                )));
            }
        };
        let traffic = Traffic {
            balancer,
            drain_timeout,
            run_on,
        };
        traffic
            .validate()
            .map_err(|e| PlanError(format!("{}: {e}", at("traffic"))))?;
        Ok(traffic)
    }
}
