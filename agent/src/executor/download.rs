//! Downloading a payload from the coordinator: resumable, hashed as it
//! arrives, cut off when it dribbles, and never leaving behind a partial
//! file that would block the next attempt.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use baton_common::artifact::{Manifest, PayloadHasher};
use baton_common::command::FailureKind;
use baton_proto::agent::v1 as pb;
use baton_proto::agent::v1::artifact_service_client::ArtifactServiceClient;
use tonic::transport::Channel;
use tracing::{info, warn};

use super::failure::{Classify, Failure};

/// Attempts to resume a broken download before staging fails.
const FETCH_ATTEMPTS: u32 = 10;
/// Payload chunks (1 MiB each) received ahead of the disk and the hash.
const WRITE_AHEAD: usize = 8;
/// Bytes per second a download must reach over each window.
pub const MIN_FETCH_RATE: u64 = 16 << 10;
/// Stalls in a row after which staging fails: a source this slow is not
/// waited for (the slow-retrieval attack).
pub const STALLS: u32 = 3;
/// The default window over which a download must reach [`MIN_FETCH_RATE`].
pub const DEFAULT_STALL_WINDOW: Duration = Duration::from_secs(30);

/// How slow a download may be. A download below [`MIN_FETCH_RATE`] over a
/// window (or silent for one) has stalled: it is broken off and resumed,
/// and after [`STALLS`] stalls in a row staging fails — within
/// `STALLS × window` (90 s by default) of the source turning slow. From
/// `STALLS × window` on, the download's average since it began must keep
/// the rate too, so good windows between stalls do not reset the count.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The window.
    pub window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            window: DEFAULT_STALL_WINDOW,
        }
    }
}

/// Why one attempt of a download ended.
enum Broke {
    /// Too slow, or silent, for a window.
    Stalled(String),
    /// An error from the source.
    Status(tonic::Status),
}

impl From<tonic::Status> for Broke {
    fn from(s: tonic::Status) -> Self {
        Self::Status(s)
    }
}

/// Downloads the payload `m` describes into `path` over `client()`, hashing
/// as it arrives (no second pass) and resuming from the bytes already
/// there — after a broken stream, or left by an earlier run. Fails (and
/// deletes the file) when size or digest do not match the manifest.
/// `progress` is called with the offset after every chunk. A failure is
/// `disk` when the file could not be opened or written, `download` when
/// the source failed or sent what the manifest does not describe.
pub async fn download(
    client: impl Fn() -> ArtifactServiceClient<Channel>,
    m: &Manifest,
    path: &std::path::Path,
    limits: Limits,
    mut progress: impl FnMut(u64),
) -> Result<(), Failure> {
    let window_len = limits.window;
    let digest = format!("sha256:{}", m.payload_sha256);
    let path = path.to_path_buf();
    let opening = path.clone();
    let size = m.size;
    let (file, hasher, mut offset) =
        tokio::task::spawn_blocking(move || open_partial(&opening, size))
            .await
            .map_err(|e| format!("cannot open {}: {e}", path.display()))
            .or_fail(FailureKind::Internal)?
            .or_fail(FailureKind::Disk)?;
    if offset > 0 {
        info!(%digest, offset, "resuming an interrupted download");
    }
    // Disk and hash work run on threads of their own, overlapping the
    // network and each other: while one chunk is written and another
    // hashed, the next ones are received and decrypted, so staging runs at
    // the pace of its slowest step (SHA-256) rather than of all the steps
    // one after another. Chunks are shared, not copied.
    let (chunks, mut inbox) = tokio::sync::mpsc::channel::<bytes::Bytes>(WRITE_AHEAD);
    let (to_hash, mut hash_inbox) = tokio::sync::mpsc::channel::<bytes::Bytes>(WRITE_AHEAD);
    let writing = path.clone();
    let writer = tokio::task::spawn_blocking(move || {
        while let Some(data) = inbox.blocking_recv() {
            (&*file)
                .write_all(&data)
                .map_err(|e| format!("cannot write {}: {e}", writing.display()))?;
        }
        Ok::<_, String>(file)
    });
    let mut hasher = hasher;
    let hashing = tokio::task::spawn_blocking(move || {
        while let Some(data) = hash_inbox.blocking_recv() {
            hasher.update(&data);
        }
        hasher
    });
    // `Err((why, delete the partial file))`.
    let received: Result<(), (String, bool)> = async {
        let mut attempts = 0;
        let mut stalls = 0;
        // The download as a whole must keep MIN_FETCH_RATE too, judged
        // from STALLS windows on: a source alternating good windows with
        // stalls cannot keep it dribbling.
        let began = (Instant::now(), offset);
        let average = |offset: u64| {
            let secs = began.0.elapsed().as_secs_f64();
            (secs >= (window_len * STALLS).as_secs_f64())
                .then(|| ((offset - began.1) as f64 / secs.max(0.001)) as u64)
                .filter(|rate| *rate < MIN_FETCH_RATE)
        };
        while offset < m.size {
            // Asked anew each attempt: after a coordinator failover the
            // agent downloads from the new leader.
            let mut client = client();
            let mut kept_pace = false;
            let result: Result<(), Broke> = async {
                let answer = client.fetch(pb::FetchRequest {
                    digest: digest.clone(),
                    offset,
                });
                let mut stream = tokio::time::timeout(window_len, answer)
                    .await
                    .map_err(|_| {
                        Broke::Stalled(format!(
                            "no answer for {}",
                            humantime::format_duration(window_len)
                        ))
                    })??
                    .into_inner();
                let mut window = (Instant::now(), offset);
                loop {
                    let next = tokio::time::timeout(window_len, stream.message())
                        .await
                        .map_err(|_| {
                            Broke::Stalled(format!(
                                "nothing received for {}",
                                humantime::format_duration(window_len)
                            ))
                        })?;
                    let Some(chunk) = next? else {
                        if offset < m.size {
                            // Retryable: a coordinator going away may end
                            // the stream before its end.
                            return Err(Broke::Status(tonic::Status::unavailable(format!(
                                "the coordinator ended the stream at {offset} of {} bytes",
                                m.size
                            ))));
                        }
                        break;
                    };
                    if chunk.offset != offset {
                        return Err(Broke::Status(tonic::Status::data_loss(format!(
                            "chunk at offset {} where {offset} was expected",
                            chunk.offset
                        ))));
                    }
                    if offset.saturating_add(chunk.data.len() as u64) > m.size {
                        return Err(Broke::Status(tonic::Status::data_loss(
                            "the payload is longer than its manifest says",
                        )));
                    }
                    let len = chunk.data.len() as u64;
                    if to_hash.send(chunk.data.clone()).await.is_err()
                        || chunks.send(chunk.data).await.is_err()
                    {
                        // The writer failed; its error is what counts.
                        return Ok(());
                    }
                    offset += len;
                    progress(offset);
                    if window.0.elapsed() >= window_len {
                        let secs = window.0.elapsed().as_secs_f64().max(0.001);
                        let rate = ((offset - window.1) as f64 / secs) as u64;
                        if rate < MIN_FETCH_RATE {
                            return Err(Broke::Stalled(format!(
                                "it ran at {rate} bytes/s, below {MIN_FETCH_RATE}"
                            )));
                        }
                        kept_pace = true;
                        window = (Instant::now(), offset);
                    }
                }
                Ok(())
            }
            .await;
            if kept_pace {
                stalls = 0;
            }
            let result = match result {
                Err(Broke::Stalled(why)) => {
                    stalls += 1;
                    if stalls >= STALLS {
                        return Err((
                            format!(
                                "the download of {digest} stalled {stalls} times in a row, below {} KiB/s for {} each (last: {why}), at {offset} of {} bytes",
                                MIN_FETCH_RATE >> 10,
                                humantime::format_duration(window_len),
                                m.size
                            ),
                            false,
                        ));
                    }
                    if let Some(rate) = average(offset) {
                        return Err((
                            format!(
                                "the download of {digest} averaged {rate} bytes/s over {}, below {} KiB/s, at {offset} of {} bytes",
                                humantime::format_duration(std::time::Duration::from_secs(
                                    began.0.elapsed().as_secs()
                                )),
                                MIN_FETCH_RATE >> 10,
                                m.size
                            ),
                            false,
                        ));
                    }
                    warn!(%digest, offset, stalls, reason = %why, "the download stalled; resuming from the offset");
                    continue;
                }
                Err(Broke::Status(status)) => Err(status),
                Ok(()) => Ok(()),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::NotFound
                            | tonic::Code::InvalidArgument
                            | tonic::Code::PermissionDenied
                            | tonic::Code::Unauthenticated
                            | tonic::Code::Unimplemented
                            | tonic::Code::DataLoss
                    ) =>
                {
                    return Err((
                        format!("cannot download {digest}: {}", status.message()),
                        true,
                    ));
                }
                Err(status) => {
                    attempts += 1;
                    if attempts >= FETCH_ATTEMPTS {
                        return Err((
                            format!(
                                "the download of {digest} broke {attempts} times, last at offset {offset}: {}",
                                status.message()
                            ),
                            false,
                        ));
                    }
                    warn!(%digest, offset, error = %status.message(), "the download broke; resuming from the offset");
                    let delay = Duration::from_millis(100 * 2u64.pow(attempts.min(6)));
                    tokio::time::sleep(delay).await;
                }
            }
        }
        Ok(())
    }
    .await;
    // Whatever happened, the file is settled before anything else touches
    // it: the writer has written what it was given and let go.
    drop((chunks, to_hash));
    let written = writer
        .await
        .map_err(|e| format!("the download writer failed: {e}"))
        .or_fail(FailureKind::Internal)?;
    let hasher = hashing
        .await
        .map_err(|e| format!("the download hasher failed: {e}"))
        .or_fail(FailureKind::Internal)?;
    // A write that failed (a full disk, an I/O error) leaves a file that
    // holds space and may end in a torn chunk: it goes, so that nothing
    // blocks the next attempt. Only a broken stream keeps it, to resume.
    let file = match (received, written) {
        (_, Err(why)) => {
            let _ = std::fs::remove_file(&path);
            return Err(Failure::new(
                FailureKind::Disk,
                format!("{why}; the partial download was deleted"),
            ));
        }
        (Err((why, delete)), Ok(_)) => {
            if delete {
                let _ = std::fs::remove_file(&path);
            }
            return Err(Failure::new(FailureKind::Download, why));
        }
        (Ok(()), Ok(file)) => file,
    };
    if let Err(e) = file.sync_all() {
        drop(file);
        let _ = std::fs::remove_file(&path);
        return Err(Failure::new(
            FailureKind::Disk,
            format!(
                "cannot write {}: {e}; the partial download was deleted",
                path.display()
            ),
        ));
    }
    drop(file);
    if let Err(e) = hasher.finish(m) {
        let _ = std::fs::remove_file(&path);
        return Err(Failure::new(
            FailureKind::Download,
            format!("the download of {} {} is corrupt: {e}", m.name, m.version),
        ));
    }
    Ok(())
}

/// Opens (or creates) a partial download for appending, locked
/// exclusively — waiting out the writer of an earlier, cancelled download
/// of the same payload that is still finishing its queued chunks — and
/// hashes what is already there. A file longer than the payload starts
/// over. Returns the file, the hasher and the offset to resume from.
fn open_partial(
    path: &std::path::Path,
    size: u64,
) -> Result<(nix::fcntl::Flock<std::fs::File>, PayloadHasher, u64), String> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("cannot lock {}: {e}", path.display()))?;
    let mut offset = file.metadata().map_err(|e| e.to_string())?.len();
    let mut hasher = PayloadHasher::new();
    if offset > size {
        file.set_len(0).map_err(|e| e.to_string())?;
        offset = 0;
    }
    if offset > 0 {
        // Left by an earlier run: hash what is there once.
        let mut reader = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let mut buf = vec![0; 1 << 20];
        loop {
            let n = reader.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    Ok((file, hasher, offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_download_is_locked_resumed_and_restarted_when_too_long() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("payload.part");
        std::fs::write(&path, b"0123456789").unwrap();
        let (file, _, offset) = open_partial(&path, 100).unwrap();
        assert_eq!(offset, 10, "resumes after what is there");

        // A second download of the same payload waits until the first one
        // (here: its writer, still appending) lets go of the file.
        let second = path.clone();
        let (opened, waited) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let r = open_partial(&second, 100).map(|(_, _, offset)| offset);
            let _ = opened.send(());
            r
        });
        assert!(
            waited.recv_timeout(Duration::from_millis(300)).is_err(),
            "the second opener must wait for the lock"
        );
        (&*file).write_all(b"abc").unwrap();
        drop(file);
        assert_eq!(t.join().unwrap().unwrap(), 13, "it sees every byte written");

        // Longer than the payload: starts over.
        let (_, _, offset) = open_partial(&path, 5).unwrap();
        assert_eq!(offset, 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    /// A source that keeps pace for one window, then goes silent for one,
    /// over and over: never three stalls in a row, a third of the rate on
    /// average.
    struct Alternating {
        window: Duration,
    }

    #[tonic::async_trait]
    impl pb::artifact_service_server::ArtifactService for Alternating {
        type FetchStream = std::pin::Pin<
            Box<dyn tokio_stream::Stream<Item = Result<pb::FetchChunk, tonic::Status>> + Send>,
        >;

        async fn fetch(
            &self,
            request: tonic::Request<pb::FetchRequest>,
        ) -> Result<tonic::Response<Self::FetchStream>, tonic::Status> {
            let offset = request.into_inner().offset;
            let window = self.window;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                // Enough for the first window (counted at a byte sent just
                // after it, with another in between so that no gap is a
                // window long), then silence.
                let first = bytes::Bytes::from(vec![0u8; (MIN_FETCH_RATE * 3 / 2) as usize]);
                let len = first.len() as u64;
                let chunk = |offset: u64, data: bytes::Bytes| {
                    Ok(pb::FetchChunk {
                        offset,
                        data,
                        size: 1 << 30,
                    })
                };
                let _ = tx.send(chunk(offset, first)).await;
                for i in 0..3 {
                    tokio::time::sleep(window * 4 / 10).await;
                    let byte = bytes::Bytes::from_static(b"x");
                    let _ = tx.send(chunk(offset + len + i, byte)).await;
                }
                tokio::time::sleep(window * 10).await;
            });
            Ok(tonic::Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )))
        }

        async fn source(
            &self,
            _request: tonic::Request<pb::SourceRequest>,
        ) -> Result<tonic::Response<pb::SourceAnswer>, tonic::Status> {
            Err(tonic::Status::unimplemented("no sources here"))
        }
    }

    #[tokio::test]
    async fn a_source_alternating_good_windows_and_stalls_fails_on_its_average() {
        // Messages come 0.4 windows apart (robust to a loaded machine); the
        // window is judged at the third, after 1.2 windows.
        let window = Duration::from_secs(1);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::artifact_service_server::ArtifactServiceServer::new(
                    Alternating { window },
                ))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let m = Manifest {
            name: "api".into(),
            kind: Default::default(),
            version: "1.0.0".into(),
            payload_sha256: "0".repeat(64),
            size: 1 << 30,
            created: String::new(),
            key_id: String::new(),
            expires: None,
            piece_size: 0,
            pieces: vec![],
        };
        let dir = tempfile::tempdir().unwrap();
        // Judged from the third window on, not left to dribble.
        let err = tokio::time::timeout(
            window * 20,
            download(
                || ArtifactServiceClient::new(channel.clone()),
                &m,
                &dir.path().join("payload.partial"),
                Limits { window },
                |_| {},
            ),
        )
        .await
        .expect("the download was left to dribble")
        .unwrap_err();
        // The source's fault, not the disk's.
        assert_eq!(err.kind, FailureKind::Download);
        let err = err.message;
        assert!(
            err.contains("averaged") && err.contains("below 16 KiB/s"),
            "{err}"
        );
    }
}
