//! The peer server: `ArtifactService.Fetch` for other agents, over mutual
//! TLS, of the payloads in [`Seeds`] only, at most `--peer-uploads` at a
//! time.

use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use baton_common::tls::{PeerIdentity, identity_from_der};
use baton_proto::agent::v1 as pb;
use baton_proto::agent::v1::artifact_service_server::{ArtifactService, ArtifactServiceServer};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::{PeerConfig, Seeds};

/// Bytes per message.
const CHUNK: u64 = 1 << 20;
/// How long a peer waits for the next piece of a payload this agent is
/// still downloading before the stream ends (the peer then goes elsewhere).
const PIECE_WAIT: Duration = Duration::from_secs(30);
/// TLS handshakes in progress at once; connections beyond are closed.
const HANDSHAKES: usize = 256;
/// How long a handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Streams one connection may hold at once.
const STREAMS_PER_CONNECTION: u32 = 16;

struct PeerApi {
    seeds: Arc<Seeds>,
    uploads: Arc<Semaphore>,
    rate: Option<Arc<Pace>>,
    shutdown: CancellationToken,
}

/// The host's upload rate, shared by its uploads: each chunk waits until
/// the bytes sent so far fit in the time elapsed.
#[derive(Debug)]
pub struct Pace {
    bytes_per_sec: u64,
    /// When the bytes granted so far may all have been sent.
    next: std::sync::Mutex<tokio::time::Instant>,
}

impl Pace {
    /// A pace of `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1),
            next: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits until `n` more bytes may go.
    pub async fn take(&self, n: u64) {
        let cost = Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
        let at = {
            let mut next = self
                .next
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Idle time is not saved up.
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + cost;
            start
        };
        tokio::time::sleep_until(at).await;
    }
}

type ChunkStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::FetchChunk, Status>> + Send>>;

/// `sha256:<64 lowercase hex>` → the hex.
fn digest_hex(digest: &str) -> Result<&str, Status> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| baton_common::hex::is_lower(h, 64))
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "digest {:?} is not sha256:<64 lowercase hex digits>",
                baton_common::text::prefix(digest, 80)
            ))
        })
}

#[tonic::async_trait]
impl ArtifactService for PeerApi {
    type FetchStream = ChunkStream;

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let req = request.into_inner();
        let hex = digest_hex(&req.digest)?;
        let served = self.seeds.get(hex).ok_or_else(|| {
            Status::not_found(format!("this agent does not serve {}", req.digest))
        })?;
        if req.offset > served.size {
            return Err(Status::out_of_range(format!(
                "offset {} is past the end of {} ({} bytes)",
                req.offset, req.digest, served.size
            )));
        }
        let permit = self.uploads.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(
                "this agent serves as many peers as it may; ask for another source",
            )
        })?;
        let file = std::fs::File::open(&served.path)
            .map_err(|e| Status::unavailable(format!("cannot open the payload: {e}")))?;
        let file = Arc::new(file);
        let (tx, rx) = mpsc::channel(4);
        let shutdown = self.shutdown.clone();
        let mut checked = served.checked;
        let size = served.size;
        let digest = req.digest.clone();
        let mut offset = req.offset;
        let rate = self.rate.clone();
        debug!(%digest, offset, "serving a peer");
        tokio::spawn(async move {
            let _permit = permit;
            while offset < size {
                // Only checked bytes leave this host.
                let available = tokio::select! {
                    waited = tokio::time::timeout(PIECE_WAIT, async { checked.wait_for(|c| *c > offset).await.map(|c| *c) }) => match waited {
                        Ok(Ok(c)) => c,
                        Ok(Err(_)) => {
                            let _ = tx.send(Err(Status::unavailable("this agent's own download of the payload stopped"))).await;
                            return;
                        }
                        Err(_) => {
                            let _ = tx.send(Err(Status::unavailable("the payload stopped arriving at this agent"))).await;
                            return;
                        }
                    },
                    () = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("the agent is shutting down"))).await;
                        return;
                    }
                };
                let want = (available.min(size) - offset).min(CHUNK);
                if let Some(rate) = &rate {
                    rate.take(want).await;
                }
                let reading = file.clone();
                let at = offset;
                let read = tokio::task::spawn_blocking(move || {
                    let mut data = vec![0u8; want as usize];
                    reading.read_exact_at(&mut data, at).map(|()| data)
                })
                .await;
                let data = match read {
                    Ok(Ok(data)) => data,
                    Ok(Err(e)) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!("read failed: {e}"))))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("read failed: {e}"))))
                            .await;
                        return;
                    }
                };
                let chunk = pb::FetchChunk {
                    offset,
                    data: data.into(),
                    size,
                };
                // A peer that stops reading gives its upload slot back.
                match tokio::time::timeout(PIECE_WAIT, tx.send(Ok(chunk))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        debug!(%digest, offset, "a peer stopped reading; its upload ended");
                        return;
                    }
                }
                crate::metrics::METRICS.peer_sent_bytes.inc_by(want);
                offset += want;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn source(
        &self,
        _request: Request<pb::SourceRequest>,
    ) -> Result<Response<pb::SourceAnswer>, Status> {
        Err(Status::unimplemented(
            "ask the coordinator where to download from",
        ))
    }
}

/// Admits agent certificates only.
#[allow(clippy::result_large_err)]
fn require_agent(req: Request<()>) -> Result<Request<()>, Status> {
    let leaf = req
        .peer_certs()
        .and_then(|certs| certs.first().cloned())
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    match identify(&leaf) {
        Some(_) => Ok(req),
        None => Err(Status::permission_denied(
            "only agents of this fleet may fetch from an agent",
        )),
    }
}

fn identify(der: &[u8]) -> Option<baton_common::host::HostId> {
    match identity_from_der(der) {
        Ok(PeerIdentity::Agent(id)) => Some(id),
        _ => None,
    }
}

/// Serves peers on `listener` until `shutdown`.
pub async fn run(
    listener: std::net::TcpListener,
    creds: super::Identity,
    seeds: Arc<Seeds>,
    config: PeerConfig,
    shutdown: CancellationToken,
) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot serve peers");
            return;
        }
    };
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, uploads = config.uploads, "serving staged payloads to peers");
    }
    let (conns, incoming) = mpsc::channel::<Result<_, std::io::Error>>(16);
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES));
    let accepting = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, from) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: pause, go on.
                        debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = accepting.cancelled() => return,
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                debug!(%from, "too many peer handshakes at once; closed a connection");
                continue;
            };
            let config = match super::tls::server_config(&creds()) {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "cannot serve peers over TLS");
                    continue;
                }
            };
            let conns = conns.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tcp.set_nodelay(true);
                let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                    Ok(Ok(tls)) => {
                        let _ = conns.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => debug!(%from, error = %e, "a peer's TLS handshake failed"),
                    Err(_) => debug!(%from, "a peer's TLS handshake timed out"),
                }
            });
        }
    });
    let api = PeerApi {
        seeds,
        uploads: Arc::new(Semaphore::new(config.uploads as usize)),
        rate: config.upload_rate.map(|r| Arc::new(Pace::new(r))),
        shutdown: shutdown.clone(),
    };
    let service = tonic::service::interceptor::InterceptedService::new(
        ArtifactServiceServer::new(api)
            .max_decoding_message_size(64 << 10)
            .max_encoding_message_size(8 << 20),
        require_agent,
    );
    let served = tonic::transport::Server::builder()
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .max_concurrent_streams(Some(STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(service)
        .serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown.cancelled_owned())
        .await;
    if let Err(e) = served {
        warn!(error = %e, "the peer server stopped");
    }
}
