//! Who may call what. Every connection is TLS against the fleet's CA; a
//! client certificate, when presented, must be the CA's (the TLS layer
//! checks), and is optional there only so that a new host can reach
//! enrollment. These interceptors then require one, read its Baton
//! identity, and admit agents only to the agent stream and operators only
//! to the Control API.
//! The identity is left in the request's extensions for the handlers.

use baton_common::tls::{PeerIdentity, identity_from_der};
use tonic::{Request, Status};
use tracing::warn;

/// Reads the caller's identity from its client certificate.
pub(crate) fn identify(req: &Request<()>) -> Result<PeerIdentity, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    identity_from_der(leaf).map_err(|e| {
        warn!(peer = ?req.remote_addr(), error = %e, "refused a client certificate without a Baton identity");
        Status::permission_denied(e.to_string())
    })
}

/// Admits agent certificates only; for the agent stream.
pub fn require_agent(mut req: Request<()>) -> Result<Request<()>, Status> {
    match identify(&req)? {
        peer @ PeerIdentity::Agent(_) => {
            req.extensions_mut().insert(peer);
            Ok(req)
        }
        other => {
            warn!(peer = ?req.remote_addr(), identity = %other, "refused a non-agent certificate on the agent stream");
            Err(Status::permission_denied(format!(
                "{other} may not open an agent stream: only agent certificates may"
            )))
        }
    }
}

/// Admits agents and other coordinators (copying payloads between
/// coordinators that share an etcd store); for artifact downloads.
pub fn require_agent_or_coordinator(mut req: Request<()>) -> Result<Request<()>, Status> {
    match identify(&req)? {
        peer @ (PeerIdentity::Agent(_) | PeerIdentity::Coordinator) => {
            req.extensions_mut().insert(peer);
            Ok(req)
        }
        other => {
            warn!(peer = ?req.remote_addr(), identity = %other, "refused a certificate on artifact downloads");
            Err(Status::permission_denied(format!(
                "{other} may not download payloads: only agent and coordinator certificates may"
            )))
        }
    }
}

/// Admits operator certificates only; for the Control API.
pub fn require_operator(mut req: Request<()>) -> Result<Request<()>, Status> {
    match identify(&req)? {
        peer @ PeerIdentity::Operator { .. } => {
            req.extensions_mut().insert(peer);
            Ok(req)
        }
        other => {
            warn!(peer = ?req.remote_addr(), identity = %other, "refused a non-operator certificate on the Control API");
            Err(Status::permission_denied(format!(
                "{other} may not call the Control API: only operator certificates may"
            )))
        }
    }
}
