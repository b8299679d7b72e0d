//! Who may call what on the Control API. The operator certificate's role
//! (see [`Role`]) must reach the role [`TABLE`] names for the RPC; an RPC
//! the table does not name is refused to everyone (deny by default). Calls
//! that change something — anything above `viewer` — are written to the
//! [`Audit`] log, allowed or refused.
//!
//! [`Authorized`] wraps the generated service and the interceptor that
//! admits operator certificates only, so that a refused caller of any kind
//! (no certificate, an agent's) is audited too.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use baton_common::tls::{PeerIdentity, Role};
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tracing::warn;

use crate::audit::Audit;

/// The role each Control API call needs.
pub const TABLE: &[(&str, Role)] = &[
    ("ListHosts", Role::Viewer),
    ("GetHost", Role::Viewer),
    ("WatchHosts", Role::Viewer),
    ("ListArtifacts", Role::Viewer),
    ("GetRollout", Role::Viewer),
    ("ListRollouts", Role::Viewer),
    ("WatchRollout", Role::Viewer),
    ("PlanRollout", Role::Viewer),
    ("ListRolloutEvents", Role::Viewer),
    ("GetHostHistory", Role::Viewer),
    // A token for at most the caller's own role (checked by the handler).
    ("CreateDashboardToken", Role::Viewer),
    // Sends a command (a no-op) to every selected agent.
    ("PingHosts", Role::Operator),
    ("PushArtifact", Role::Operator),
    ("StartRollout", Role::Operator),
    ("ControlRollout", Role::Operator),
    ("ListAudit", Role::Admin),
    ("CreateEnrollment", Role::Admin),
    ("ListPendingEnrollments", Role::Admin),
    ("DecideEnrollment", Role::Admin),
    // Reads what a service logged, which may hold what only operators see.
    ("StreamLogs", Role::Operator),
    ("Freeze", Role::Operator),
    ("Unfreeze", Role::Operator),
    ("GetFreeze", Role::Viewer),
    ("StopTheLine", Role::Operator),
];

/// The role `method` (the RPC's name) needs; `None`: nobody may call it.
pub fn required(method: &str) -> Option<Role> {
    TABLE.iter().find(|(m, _)| *m == method).map(|(_, r)| *r)
}

/// The caller as the audit log names it, and its role as written.
fn caller(peer: Option<&PeerIdentity>) -> (String, String) {
    match peer {
        Some(PeerIdentity::Operator { name, role }) => (format!("operator {name}"), role.clone()),
        Some(other) => (other.to_string(), String::new()),
        None => ("an unidentified caller".into(), String::new()),
    }
}

/// Decides one call: `Ok` or why not.
pub fn decide(method: &str, role: &str) -> Result<(), String> {
    let Some(need) = required(method) else {
        return Err(format!("{method} is not a call this coordinator allows"));
    };
    let Ok(have) = role.parse::<Role>() else {
        return Err(format!(
            "the certificate carries no known role ({role:?}); issue one with `baton certs issue-operator NAME --role viewer|operator|admin`"
        ));
    };
    decide_for(method, need, have)
}

/// Decides one call by a caller whose role is already known (a dashboard
/// session acting on the API's behalf): the same table as gRPC.
pub fn decide_role(method: &str, have: Role) -> Result<(), String> {
    let Some(need) = required(method) else {
        return Err(format!("{method} is not a call this coordinator allows"));
    };
    decide_for(method, need, have)
}

fn decide_for(method: &str, need: Role, have: Role) -> Result<(), String> {
    if have >= need {
        Ok(())
    } else {
        Err(format!(
            "role {have} may not call {method}: it needs {need}"
        ))
    }
}

/// The Control API behind the role check and the audit log.
#[derive(Clone)]
pub struct Authorized<S> {
    inner: S,
    audit: Audit,
}

impl<S> Authorized<S> {
    /// Wraps `inner`, writing to `audit`.
    pub fn new(inner: S, audit: Audit) -> Self {
        Self { inner, audit }
    }
}

impl<S: NamedService> NamedService for Authorized<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

impl<S, B, RB> Service<http::Request<B>> for Authorized<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method: String = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .chars()
            .take(64)
            .collect();
        let probe = tonic::Request::from_parts(
            tonic::metadata::MetadataMap::new(),
            req.extensions().clone(),
            (),
        );
        let peer = crate::auth::identify(&probe);
        let (who, role) = caller(peer.as_ref().ok());
        // Unknown calls count as changes: refusing them is worth a record.
        // Only callers with a Baton certificate are recorded: anyone else
        // could fill the store (they are logged).
        let changes = required(&method).is_none_or(|r| r > Role::Viewer) && peer.is_ok();
        let audit = self.audit.clone();
        let refusal = match &peer {
            Err(status) => Some(status.clone()),
            Ok(PeerIdentity::Operator { .. }) => decide(&method, &role)
                .err()
                .map(tonic::Status::permission_denied),
            Ok(other) => Some(tonic::Status::permission_denied(format!(
                "{other} may not call the Control API: only operator certificates may"
            ))),
        };
        if let Some(status) = refusal {
            let why = status.message().to_owned();
            warn!(%who, %role, %method, reason = %why, "refused a Control API call");
            if changes {
                // Spawned: a caller that resets the stream cannot skip it.
                tokio::spawn(async move {
                    audit.record(&who, &role, &method, "denied", &why).await;
                });
            }
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let call = self.inner.call(req);
        if !changes {
            return Box::pin(async move { Ok(call.await?.map(tonic::body::Body::new)) });
        }
        // A change runs to its end, and is recorded, even if the caller
        // goes away meanwhile.
        let done = tokio::spawn(async move {
            let response = call.await?.map(tonic::body::Body::new);
            {
                // A failure before any response is a trailers-only answer:
                // its status is in the headers.
                let (result, error) = match tonic::Status::from_header_map(response.headers()) {
                    Some(s) if s.code() != tonic::Code::Ok => {
                        ("failed", format!("{:?}: {}", s.code(), s.message()))
                    }
                    _ => ("ok", String::new()),
                };
                audit.record(&who, &role, &method, result, &error).await;
            }
            Ok(response)
        });
        Box::pin(async move {
            match done.await {
                Ok(result) => result,
                Err(e) => Ok(tonic::Status::internal(format!("the call failed: {e}")).into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_reach_what_they_need_and_nothing_else() {
        assert!(decide("ListHosts", "viewer").is_ok());
        assert!(
            decide("StartRollout", "viewer")
                .unwrap_err()
                .contains("needs operator")
        );
        assert!(decide("StartRollout", "operator").is_ok());
        assert!(
            decide("ListAudit", "operator")
                .unwrap_err()
                .contains("needs admin")
        );
        assert!(decide("ListAudit", "admin").is_ok());
        assert!(
            decide("ListHosts", "")
                .unwrap_err()
                .contains("no known role")
        );
        assert!(
            decide("ListHosts", "root")
                .unwrap_err()
                .contains("no known role")
        );
        assert!(
            decide("DropEverything", "admin")
                .unwrap_err()
                .contains("not a call this coordinator allows")
        );
    }
}
