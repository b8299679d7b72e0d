//! Limits on every edge of `batond`, so that hostile or careless clients
//! cannot exhaust it: message sizes, streams per connection, header sizes,
//! the TLS handshake (`baton_common::tls::TLS_HANDSHAKE_TIMEOUT`), plan
//! sizes, and the file descriptors it may hold.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::{Service, http};

/// The largest message any Baton RPC accepts (artifact chunks are 1 MiB).
pub const MAX_MESSAGE: usize = 4 << 20;
/// The largest message the artifact service accepts (fetch requests).
pub const MAX_FETCH_REQUEST: usize = 64 << 10;
/// Concurrent HTTP/2 streams per connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// The largest header list a client may send.
pub const MAX_HEADER_LIST: u32 = 16 << 10;
/// Streams a client may reset before its acceptance (the "rapid reset"
/// attack) before the connection is closed.
pub const MAX_PENDING_RESETS: usize = 64;
/// The largest plan text `StartRollout`/`PlanRollout` accept.
pub const MAX_PLAN_BYTES: usize = 1 << 20;

/// A server builder with the connection limits set.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
}

/// Raises the soft limit on open files to the hard one: every agent holds
/// a connection. Returns the limit now in force.
pub fn raise_open_files() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Tower layer: a message above the size limit is `RESOURCE_EXHAUSTED`, as
/// gRPC specifies, where tonic says `OUT_OF_RANGE`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SizeStatusLayer;

impl<S> tower::Layer<S> for SizeStatusLayer {
    type Service = SizeStatus<S>;

    fn layer(&self, inner: S) -> SizeStatus<S> {
        SizeStatus(inner)
    }
}

/// See [`SizeStatusLayer`].
#[derive(Debug, Clone)]
pub struct SizeStatus<S>(S);

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

impl<S, B> Service<http::Request<B>> for SizeStatus<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call = self.0.call(req);
        Box::pin(async move {
            let response = call.await?;
            match tonic::Status::from_header_map(response.headers()) {
                Some(s)
                    if s.code() == tonic::Code::OutOfRange
                        && s.message().contains("message length too large") =>
                {
                    Ok(tonic::Status::resource_exhausted(s.message().to_owned()).into_http())
                }
                _ => Ok(response),
            }
        })
    }
}
