//! `baton.agent.v1.ArtifactService`: agents download payloads by digest,
//! from any offset, so a broken download resumes where it stopped.

use std::io::SeekFrom;
use std::pin::Pin;

use baton_proto::agent::v1::{FetchChunk, FetchRequest, artifact_service_server::ArtifactService};
use std::io::Read as _;

use tokio::io::AsyncSeekExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::artifacts::{Artifacts, CHUNK};
use crate::control_api::artifact_status;

/// Chunks read ahead of the network.
const READ_AHEAD: usize = 4;

/// The payload download service.
pub struct ArtifactApi {
    artifacts: Artifacts,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl ArtifactApi {
    /// Serves payloads from `artifacts`.
    pub fn new(artifacts: Artifacts, shutdown: CancellationToken, tasks: TaskTracker) -> Self {
        Self {
            artifacts,
            shutdown,
            tasks,
        }
    }
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
        let mut file = file.into_std().await;
        // A plain thread reads ahead of the network: one read per chunk
        // straight into the memory the chunk then owns (no zeroing, no
        // copy out of an async file's own buffer).
        self.tasks.spawn_blocking(move || {
            let mut offset = req.offset;
            while offset < size && !shutdown.is_cancelled() {
                let want = usize::try_from(size - offset).unwrap_or(CHUNK).min(CHUNK);
                let mut data = Vec::with_capacity(want);
                let item = match (&mut file).take(want as u64).read_to_end(&mut data) {
                    Ok(n) if n == want => Ok(FetchChunk {
                        offset,
                        data: data.into(),
                        size,
                    }),
                    Ok(_) => Err(Status::internal("read failed: the file ended early")),
                    Err(e) => Err(Status::internal(format!("read failed: {e}"))),
                };
                let failed = item.is_err();
                offset += want as u64;
                if tx.blocking_send(item).is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
