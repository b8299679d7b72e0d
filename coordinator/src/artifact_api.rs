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
        let file = file.into_std().await;
        self.tasks.spawn(async move {
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
}
