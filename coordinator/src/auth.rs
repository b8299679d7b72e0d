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

/// What a connection without a client certificate may call: enrollment
/// (a new host's token is its credential). Anything else is answered
/// `UNAUTHENTICATED` before its body is read.
#[derive(Debug, Clone)]
pub struct AnonymousGate<S>(pub S);

/// The one gRPC service open to clients without a certificate.
const ENROLLMENT_PATH: &str = "/baton.agent.v1.EnrollmentService/";

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for AnonymousGate<S>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<B>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
        >,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        if req.uri().path().starts_with(ENROLLMENT_PATH) {
            return Box::pin(self.0.call(req));
        }
        let status = Status::unauthenticated(
            "a client certificate is required: without one, only enrollment answers",
        );
        Box::pin(std::future::ready(Ok(status.into_http())))
    }
}

/// Tower layer for [`AnonymousGate`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AnonymousGateLayer;

impl<S> tower::Layer<S> for AnonymousGateLayer {
    type Service = AnonymousGate<S>;

    fn layer(&self, inner: S) -> AnonymousGate<S> {
        AnonymousGate(inner)
    }
}
