//! `baton.agent.v1.ArtifactService`: agents download payloads by digest,
//! from any offset, so a broken download resumes where it stopped; and ask
//! where to download from ([`crate::swarm`]: here, or another agent).

use std::collections::HashMap;
use std::io::SeekFrom;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use baton_common::host::HostId;
use baton_common::tls::PeerIdentity;
use baton_proto::agent::v1::{
    FetchChunk, FetchRequest, SourceAnswer, SourceRequest, artifact_service_server::ArtifactService,
};
use std::io::Read as _;

use tokio::io::AsyncSeekExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::artifacts::{Artifacts, CHUNK};
use crate::control_api::artifact_status;
use crate::fleet::FleetHandle;
use crate::metrics::Metrics;
use crate::swarm::{Ask, Source, SwarmConfig, Swarms};

/// Chunks read ahead of the network.
const READ_AHEAD: usize = 4;

/// The longest `failed_reason` kept.
const MAX_REASON: usize = 256;

/// The payload download service.
pub struct ArtifactApi {
    artifacts: Artifacts,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    fleet: FleetHandle,
    metrics: Arc<Metrics>,
    swarms: Mutex<Swarms>,
    /// Downloads being served, by digest.
    serving: Arc<Mutex<HashMap<String, u32>>>,
    /// Origins of payloads stored elsewhere, by digest, as looked up.
    origins: Mutex<HashMap<String, (String, u64)>>,
}

/// Origins remembered at most (then forgotten all at once).
const MAX_ORIGINS: usize = 1024;

impl ArtifactApi {
    /// Serves payloads from `artifacts`, sharing downloads out by `swarm`.
    pub fn new(
        artifacts: Artifacts,
        fleet: FleetHandle,
        metrics: Arc<Metrics>,
        swarm: SwarmConfig,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            artifacts,
            shutdown,
            tasks,
            fleet,
            metrics,
            swarms: Mutex::new(Swarms::new(swarm)),
            serving: Arc::default(),
            origins: Mutex::default(),
        }
    }

    /// Downloads of `digest` being served now.
    fn serving(&self, digest: &str) -> u32 {
        lock(&self.serving).get(digest).copied().unwrap_or(0)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counts one download of a digest while it is served.
struct Serving {
    map: Arc<Mutex<HashMap<String, u32>>>,
    digest: String,
}

impl Serving {
    fn new(map: Arc<Mutex<HashMap<String, u32>>>, digest: String) -> Self {
        *lock(&map).entry(digest.clone()).or_default() += 1;
        Self { map, digest }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let mut map = lock(&self.map);
        if let Some(n) = map.get_mut(&self.digest) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.digest);
            }
        }
    }
}

/// Reads `serve_addr`: `IP:PORT`, an unspecified IP standing for the
/// caller's.
fn serve_addr(text: &str, caller: Option<SocketAddr>) -> Result<Option<SocketAddr>, Status> {
    if text.is_empty() {
        return Ok(None);
    }
    let bad = || {
        Status::invalid_argument(format!(
            "serve_addr {:?} is not IP:PORT with a port above 0",
            baton_common::text::prefix(text, 64)
        ))
    };
    let mut addr: SocketAddr = text.parse().map_err(|_| bad())?;
    if addr.port() == 0 {
        return Err(bad());
    }
    if addr.ip().is_multicast() {
        return Err(bad());
    }
    // An agent may point peers at loopback only from loopback itself
    // (a test or a one-machine fleet), not at another host's.
    if addr.ip().is_loopback() && !caller.is_some_and(|c| c.ip().to_canonical().is_loopback()) {
        return Err(Status::invalid_argument(format!(
            "serve_addr {:?} is a loopback address, and this agent is not on this machine",
            baton_common::text::prefix(text, 64)
        )));
    }
    if addr.ip().is_unspecified() {
        let Some(caller) = caller else {
            return Err(Status::invalid_argument(
                "serve_addr has an unspecified IP and the caller's address is unknown",
            ));
        };
        addr.set_ip(caller.ip().to_canonical());
    }
    Ok(Some(addr))
}

type ChunkStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<FetchChunk, Status>> + Send>>;

#[tonic::async_trait]
impl ArtifactService for ArtifactApi {
    type FetchStream = ChunkStream;

    async fn fetch(&self, request: Request<FetchRequest>) -> Result<Response<ChunkStream>, Status> {
        let req = request.into_inner();
        let path = self
            .artifacts
            .blob_path(&req.digest)
            .map_err(artifact_status)?;
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Status::not_found(format!("no payload {}", req.digest)));
            }
            Err(e) => return Err(Status::internal(format!("cannot open {}: {e}", req.digest))),
        };
        let size = file
            .metadata()
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .len();
        if req.offset > size {
            return Err(Status::out_of_range(format!(
                "offset {} is past the end of {} ({size} bytes)",
                req.offset, req.digest
            )));
        }
        file.seek(SeekFrom::Start(req.offset))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        debug!(digest = %req.digest, offset = req.offset, size, "serving a payload");
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let shutdown = self.shutdown.clone();
        let file = file.into_std().await;
        let serving = Serving::new(self.serving.clone(), req.digest.clone());
        let metrics = self.metrics.clone();
        self.tasks.spawn(async move {
            let _serving = serving;
            let mut offset = req.offset;
            let mut file = Some(file);
            while offset < size {
                let want = usize::try_from(size - offset).unwrap_or(CHUNK).min(CHUNK);
                let Some(mut reading) = file.take() else {
                    return;
                };
                // Each read runs on the blocking pool straight into the
                // memory the chunk is then sent from (no zeroing, no copy
                // out of an async file's buffer); waiting for the agent to
                // take the chunk holds no thread.
                let read = tokio::task::spawn_blocking(move || {
                    let mut data = Vec::with_capacity(want);
                    let n = (&mut reading).take(want as u64).read_to_end(&mut data);
                    (reading, n, data)
                });
                let item = match read.await {
                    Ok((reading, Ok(n), data)) if n == want => {
                        file = Some(reading);
                        Ok(FetchChunk {
                            offset,
                            data: data.into(),
                            size,
                        })
                    }
                    Ok((_, Ok(_), _)) => Err(Status::internal("read failed: the file ended early")),
                    Ok((_, Err(e), _)) => Err(Status::internal(format!("read failed: {e}"))),
                    Err(e) => Err(Status::internal(format!("read failed: {e}"))),
                };
                let failed = item.is_err();
                if !failed {
                    metrics.artifact_sent_bytes.inc_by(want as u64);
                }
                offset += want as u64;
                tokio::select! {
                    sent = tx.send(item) => if sent.is_err() || failed { return },
                    () = shutdown.cancelled() => {
                        // Retryable: the agent resumes from its offset at
                        // the next coordinator.
                        let _ = tx.try_send(Err(Status::unavailable(
                            "the coordinator is shutting down; resume the download",
                        )));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn source(
        &self,
        request: Request<SourceRequest>,
    ) -> Result<Response<SourceAnswer>, Status> {
        let Some(PeerIdentity::Agent(host)) = request.extensions().get::<PeerIdentity>().cloned()
        else {
            return Err(Status::permission_denied(
                "only agents ask where to download from",
            ));
        };
        let caller = request.remote_addr();
        let req = request.into_inner();
        self.artifacts
            .blob_path(&req.digest)
            .map_err(artifact_status)?;
        // A payload stored here, or at its origin.
        let origin = if self.artifacts.has_blob(&req.digest) {
            None
        } else {
            let known = lock(&self.origins).get(&req.digest).cloned();
            let found = match known {
                Some(o) => Some(o),
                None => self
                    .artifacts
                    .origin_of(&req.digest)
                    .await
                    .map_err(artifact_status)?,
            };
            let Some(found) = found else {
                return Err(Status::not_found(format!("no payload {}", req.digest)));
            };
            let mut origins = lock(&self.origins);
            if origins.len() >= MAX_ORIGINS {
                origins.clear();
            }
            origins.insert(req.digest.clone(), found.clone());
            Some(found)
        };
        let serve = serve_addr(&req.serve_addr, caller)?;
        let failed = match req.failed_peer.as_str() {
            "" => None,
            text => Some(
                HostId::try_from(text)
                    .map_err(|e| Status::invalid_argument(format!("failed_peer: {}", e.reason)))?,
            ),
        };
        let reason = baton_common::text::prefix(&req.failed_reason, MAX_REASON);
        if let Some(peer) = &failed {
            if req.corrupt {
                warn!(%host, %peer, digest = %req.digest, %reason, "a peer served a piece that does not match its signed hash; it serves this payload no more");
            } else {
                info!(%host, %peer, digest = %req.digest, %reason, "a download from a peer failed; another source is chosen");
            }
        }
        let labels = match self.fleet.get(host.clone()).await {
            Ok(Some(view)) => view.labels,
            _ => Default::default(),
        };
        let ask = Ask {
            offset: req.offset,
            serve,
            zone: labels.get("zone").cloned(),
            rack: labels.get("rack").cloned(),
            failed,
            corrupt: req.corrupt,
            done: req.done,
            // At most a week, as an agent's --peer-serve-for.
            serve_for: (req.serve_for_ms > 0).then(|| {
                std::time::Duration::from_millis(req.serve_for_ms.min(7 * 24 * 3600 * 1000))
            }),
        };
        let busy = self.serving(&req.digest);
        let source = lock(&self.swarms).ask(&req.digest, &host, ask, busy, Instant::now());
        let (answer, what) = match (source, origin) {
            (Source::Coordinator, Some((url, url_offset))) => (
                SourceAnswer {
                    url,
                    url_offset,
                    ..SourceAnswer::default()
                },
                "origin",
            ),
            (source, _) => match source {
                Source::Coordinator => (SourceAnswer::default(), "coordinator"),
                Source::Peer(peer, addr) => (
                    SourceAnswer {
                        peer: peer.to_string(),
                        addr: addr.to_string(),
                        ..SourceAnswer::default()
                    },
                    "peer",
                ),
                Source::Wait(after) => (
                    SourceAnswer {
                        retry_after_ms: u32::try_from(after.as_millis()).unwrap_or(u32::MAX).max(1),
                        ..SourceAnswer::default()
                    },
                    "wait",
                ),
                Source::Done => (SourceAnswer::default(), "done"),
            },
        };
        self.metrics.artifact_sources.inc(&[what]);
        debug!(%host, digest = %req.digest, source = what, peer = %answer.peer, "named a download source");
        Ok(Response::new(answer))
    }
}
