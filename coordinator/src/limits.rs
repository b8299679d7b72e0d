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
pub use baton_engine::plan::MAX_PLAN_BYTES;

/// Streams a connection without a client certificate may have open.
pub const ANONYMOUS_STREAMS: u32 = 4;
/// The largest message a client without a certificate may send
/// (an enrollment: a token, a host id and a certificate request).
pub const MAX_ANONYMOUS_MESSAGE: usize = 16 << 10;
/// The largest header list a client without a certificate may send.
pub const MAX_ANONYMOUS_HEADER_LIST: u32 = 8 << 10;
/// HTTP/2 flow-control windows of a connection without a certificate: all
/// its streams together never have more than this in flight.
pub const ANONYMOUS_WINDOW: u32 = 64 << 10;
/// How long one call without a certificate may take.
pub const ANONYMOUS_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The server for clients without a certificate (see
/// the listener): few streams, small headers, messages and
/// windows, a timeout on every call.
pub fn anonymous_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(ANONYMOUS_STREAMS))
        .http2_max_header_list_size(Some(MAX_ANONYMOUS_HEADER_LIST))
        .http2_max_pending_accept_reset_streams(Some(8))
        .initial_stream_window_size(Some(ANONYMOUS_WINDOW))
        .initial_connection_window_size(Some(ANONYMOUS_WINDOW))
        .timeout(ANONYMOUS_REQUEST_TIMEOUT)
}

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

/// The longest `grpc-message` sent, in bytes before percent-encoding (at
/// most three times as many after): a status quotes at most this much of
/// anything (a plan error on a 400 KB line once reached clients as an
/// HTTP/2 protocol error, its header over their limit).
pub const MAX_STATUS_MESSAGE: usize = 2000;

/// `status` as sent: a message above the size limit is
/// `RESOURCE_EXHAUSTED` (as gRPC specifies, where tonic says
/// `OUT_OF_RANGE`), and every message is cut to [`MAX_STATUS_MESSAGE`].
/// `None` when it goes out as it is.
fn rewrite(status: &tonic::Status) -> Option<tonic::Status> {
    let long = status.message().len() > MAX_STATUS_MESSAGE;
    let size = status.code() == tonic::Code::OutOfRange
        && status.message().contains("message length too large");
    if !long && !size {
        return None;
    }
    let code = if size {
        tonic::Code::ResourceExhausted
    } else {
        status.code()
    };
    Some(tonic::Status::new(
        code,
        baton_common::text::prefix_bytes(status.message(), MAX_STATUS_MESSAGE),
    ))
}

/// Rewrites the status in `headers` (a trailers-only answer, or the
/// trailers of a stream) when [`rewrite`] says so.
fn rewrite_headers(headers: &mut http::HeaderMap) {
    if let Some(new) = tonic::Status::from_header_map(headers)
        .as_ref()
        .and_then(rewrite)
    {
        headers.remove("grpc-message");
        // A status whose message cannot be encoded keeps no message.
        let _ = new.add_header(headers);
    }
}

/// Tower layer applying [`rewrite`] to every answer, in its headers and in
/// its trailers.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatusLayer;

impl<S> tower::Layer<S> for StatusLayer {
    type Service = StatusRewrite<S>;

    fn layer(&self, inner: S) -> StatusRewrite<S> {
        StatusRewrite(inner)
    }
}

/// See [`StatusLayer`].
#[derive(Debug, Clone)]
pub struct StatusRewrite<S>(S);

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

impl<S, B> Service<http::Request<B>> for StatusRewrite<S>
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
            let (mut parts, body) = response.into_parts();
            rewrite_headers(&mut parts.headers);
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(Trailers(body)),
            ))
        })
    }
}

/// A response body whose trailers go through [`rewrite_headers`].
struct Trailers(tonic::body::Body);

impl http_body::Body for Trailers {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.0).poll_frame(cx).map(|frame| {
            frame.map(|frame| {
                frame.map(|frame| match frame.into_trailers() {
                    Ok(mut trailers) => {
                        rewrite_headers(&mut trailers);
                        http_body::Frame::trailers(trailers)
                    }
                    Err(data) => data,
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_and_size_errors_are_resource_exhausted() {
        assert!(rewrite(&tonic::Status::invalid_argument("short")).is_none());
        let long = rewrite(&tonic::Status::invalid_argument("x".repeat(400_000))).unwrap();
        assert_eq!(long.code(), tonic::Code::InvalidArgument);
        assert!(long.message().len() <= MAX_STATUS_MESSAGE + 3);
        let size = rewrite(&tonic::Status::out_of_range(
            "Error, decoded message length too large: found 5 bytes, the limit is: 4 bytes",
        ))
        .unwrap();
        assert_eq!(size.code(), tonic::Code::ResourceExhausted);
        let mut headers = http::HeaderMap::new();
        tonic::Status::not_found("é".repeat(100_000))
            .add_header(&mut headers)
            .unwrap();
        rewrite_headers(&mut headers);
        let back = tonic::Status::from_header_map(&headers).unwrap();
        assert_eq!(back.code(), tonic::Code::NotFound);
        assert!(back.message().len() <= MAX_STATUS_MESSAGE + 3);
        // Encoded, it stays far below a client's 16 KiB of headers.
        assert!(headers["grpc-message"].len() < 16 << 10);
    }
}
