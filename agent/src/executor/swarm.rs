//! Downloading a payload whose manifest lists piece hashes, from whatever
//! source the coordinator names: itself, or another agent. Every piece is
//! checked as it arrives, so a source is trusted for nothing: one that
//! sends a bad piece is reported (and never named again), one that fails
//! or crawls is reported and replaced, and the download goes on from the
//! last checked piece with the next source. The file only ever holds
//! checked pieces plus the one being received; what is checked is served
//! to peers at once (see `crate::peers`).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_common::artifact::{Manifest, PieceChecker};
use baton_common::command::FailureKind;
use baton_common::host::HostId;
use baton_proto::agent::v1 as pb;
use baton_proto::agent::v1::artifact_service_client::ArtifactServiceClient;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::download::{Limits, MIN_FETCH_RATE, STALLS};
use super::failure::{Classify, Failure};
use crate::metrics::METRICS;
use crate::peers::{Seed, Seeds};

/// Attempts at the coordinator in a row that check nothing new before
/// staging fails.
const FRUITLESS: u32 = 10;

/// Peers that fail one download before it goes to the coordinator for the
/// rest: peers can slow a download down, never fail it.
const PEER_FAILURES: usize = 4;

/// What the download needs besides the manifest.
pub struct Sources<'a> {
    /// The coordinator (asked anew each time: after a failover, the new
    /// leader).
    pub coordinator: &'a (dyn Fn() -> ArtifactServiceClient<Channel> + Send + Sync),
    /// This agent's TLS identity, for peers; `None`: peers are not used.
    pub tls: Option<baton_common::tls::ClientTls>,
    /// What this agent serves.
    pub seeds: &'a Arc<Seeds>,
    /// Where this agent serves peers, as told to the coordinator.
    pub serve: Option<String>,
    /// How long it serves a staged payload, as told to the coordinator.
    pub serve_for: Duration,
}

/// Why one attempt ended.
enum Broke {
    /// The source sent a piece that does not match its hash.
    Corrupt(String),
    /// Anything else: an error, a stall, a slow source.
    Failed(tonic::Status),
    /// This host's own fault (a full disk): no source is to blame.
    Local(Failure),
}

/// Downloads `m`'s payload into `path` (resuming after the checked pieces
/// already there) and returns its registration with `sources.seeds`, to be
/// kept once staged. `progress` gets the checked offset as it grows.
pub async fn download(
    sources: Sources<'_>,
    m: &Manifest,
    path: &Path,
    limits: Limits,
    mut progress: impl FnMut(u64),
) -> Result<Seed, Failure> {
    let digest = format!("sha256:{}", m.payload_sha256);
    let opening = (path.to_path_buf(), m.clone());
    let (file, mut checker) =
        tokio::task::spawn_blocking(move || open_checked(&opening.0, &opening.1))
            .await
            .map_err(|e| format!("cannot open {}: {e}", path.display()))
            .or_fail(FailureKind::Internal)?
            .or_fail(FailureKind::Disk)?;
    let file = Arc::new(file);
    if checker.checked() > 0 {
        info!(%digest, offset = checker.checked(), "resuming an interrupted download at its last checked piece");
    }
    let seed = sources
        .seeds
        .begin(&m.payload_sha256, path, m.size, checker.checked());
    let mut failed: Option<(HostId, String, bool)> = None;
    // Peers that failed this download: not tried again by it.
    let mut failed_peers: Vec<HostId> = Vec::new();
    let mut fruitless = 0;
    // Coordinator stalls in a row (see `download::Limits`).
    let mut stalls = 0;
    let mut waiting_since: Option<Instant> = None;
    while checker.checked() < m.size {
        let ask = pb::SourceRequest {
            digest: digest.clone(),
            offset: checker.checked(),
            serve_addr: sources.serve.clone().unwrap_or_default(),
            // No failed peer: the field's empty default, as proto3 says.
            failed_peer: failed
                .as_ref()
                .map_or_else(String::new, |f| f.0.to_string()),
            failed_reason: failed
                .as_ref()
                .map(|f| baton_common::text::prefix(&f.1, 200).to_string())
                .unwrap_or_default(),
            corrupt: failed.as_ref().is_some_and(|f| f.2),
            done: false,
            serve_for_ms: 0,
        };
        if let Some((peer, _, _)) = failed.take() {
            failed_peers.push(peer);
        }
        let answer = if failed_peers.len() >= PEER_FAILURES {
            // Enough peers failed this one: the coordinator, told of the
            // last failure on the way.
            let _ = tokio::time::timeout(limits.window, (sources.coordinator)().source(ask)).await;
            pb::SourceAnswer::default()
        } else {
            match tokio::time::timeout(limits.window, (sources.coordinator)().source(ask)).await {
                Ok(Ok(a)) => a.into_inner(),
                // A coordinator without sources: itself.
                Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => pb::SourceAnswer::default(),
                Ok(Err(s)) if fatal(&s) => {
                    return Err(Failure::new(
                        FailureKind::Download,
                        format!("cannot download {digest}: {}", s.message()),
                    ));
                }
                Ok(Err(s)) => {
                    fruitless += 1;
                    give_up(fruitless, &digest, &checker, m, s.message())?;
                    backoff(fruitless).await;
                    continue;
                }
                Err(_) => {
                    stalls += 1;
                    stalled(
                        stalls,
                        &digest,
                        &checker,
                        m,
                        limits,
                        "no answer to where to download from",
                    )?;
                    continue;
                }
            }
        };
        // The artifact's external origin stands where batond would.
        let origin = (answer.peer.is_empty() && !answer.url.is_empty())
            .then(|| (answer.url.clone(), answer.url_offset));
        let peer = if answer.retry_after_ms > 0 {
            // Every source is busy. Waiting is fine while the swarm moves;
            // past the stall window, the coordinator serves anyway.
            let since = *waiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() < limits.window {
                let wait = Duration::from_millis(u64::from(answer.retry_after_ms.min(5_000)));
                tokio::time::sleep(wait).await;
                continue;
            }
            None
        } else if answer.peer.is_empty() {
            None
        } else {
            match (sources.tls.as_ref(), parse_peer(&answer)) {
                (Some(tls), Some((id, addr))) if !failed_peers.contains(&id) => {
                    Some((tls, id, addr))
                }
                // Not usable here: the coordinator instead.
                _ => None,
            }
        };
        waiting_since = None;
        let (open, from) = match (peer, &origin) {
            (None, Some((url, offset))) => (Open::Origin(url.clone(), *offset), None),
            (None, None) => (Open::Grpc((sources.coordinator)()), None),
            (Some((tls, id, addr)), _) => match crate::peers::tls::connect(tls, &id, addr).await {
                Ok(channel) => (
                    Open::Grpc(
                        ArtifactServiceClient::new(channel).max_decoding_message_size(8 << 20),
                    ),
                    Some(id),
                ),
                Err(why) => {
                    debug!(%digest, peer = %id, %why, "cannot reach a peer");
                    failed = Some((id, why, false));
                    continue;
                }
            },
        };
        let before = checker.checked();
        let source = match (&from, &origin) {
            (Some(_), _) => "peer",
            (None, Some(_)) => "origin",
            (None, None) => "coordinator",
        };
        let result = pull(
            open,
            &digest,
            m,
            &file,
            &mut checker,
            &seed,
            limits,
            source,
            &mut progress,
        )
        .await;
        if checker.checked() > before {
            fruitless = 0;
            stalls = 0;
        } else if from.is_none() {
            fruitless += 1;
        }
        match (result, from) {
            (Ok(()), _) => {}
            (Err(Broke::Local(failure)), _) => {
                // A write that failed (a full disk) leaves a file that holds
                // space and ends in a torn piece: it goes.
                drop(seed);
                let _ = std::fs::remove_file(path);
                return Err(Failure::new(
                    failure.kind,
                    format!("{}; the partial download was deleted", failure.message),
                ));
            }
            (Err(Broke::Corrupt(why)), Some(peer)) => {
                warn!(%digest, %peer, %why, "a peer sent a bad piece; it is reported and avoided");
                METRICS.corrupt_pieces.inc();
                failed = Some((peer, why, true));
            }
            (Err(Broke::Corrupt(why)), None) => {
                // The coordinator's (or the origin's) own copy is bad: no
                // other source has better (they all came from it).
                let _ = std::fs::remove_file(path);
                let whose = match &origin {
                    Some((url, _)) => format!(
                        "the copy of {digest} at its origin {}",
                        baton_common::text::prefix(url, 120)
                    ),
                    None => format!("the coordinator's copy of {digest}"),
                };
                return Err(Failure::new(
                    FailureKind::Download,
                    format!("{whose} is corrupt: {why}"),
                ));
            }
            (Err(Broke::Failed(s)), Some(peer)) => {
                debug!(%digest, %peer, error = %s.message(), "a download from a peer failed; asking for another source");
                failed = Some((peer, s.message().to_owned(), false));
            }
            (Err(Broke::Failed(s)), None) if s.code() == tonic::Code::DeadlineExceeded => {
                stalls += 1;
                stalled(stalls, &digest, &checker, m, limits, s.message())?;
                warn!(%digest, offset = checker.checked(), stalls, reason = %s.message(), "the download stalled; resuming from the last checked piece");
            }
            (Err(Broke::Failed(s)), None) => {
                if fatal(&s) {
                    return Err(Failure::new(
                        FailureKind::Download,
                        format!("cannot download {digest}: {}", s.message()),
                    ));
                }
                warn!(%digest, offset = checker.checked(), error = %s.message(), "the download broke; resuming from the last checked piece");
                give_up(fruitless, &digest, &checker, m, s.message())?;
                backoff(fruitless).await;
            }
        }
    }
    let syncing = file.clone();
    let synced = tokio::task::spawn_blocking(move || syncing.sync_all())
        .await
        .map_err(|e| format!("the sync failed: {e}"))
        .or_fail(FailureKind::Internal)?;
    if let Err(e) = synced {
        drop(seed);
        let _ = std::fs::remove_file(path);
        return Err(Failure::new(
            FailureKind::Disk,
            format!(
                "cannot write {}: {e}; the partial download was deleted",
                path.display()
            ),
        ));
    }
    // Said so the coordinator can name this host as a source; not needed
    // for the download itself.
    let done = pb::SourceRequest {
        digest: digest.clone(),
        offset: m.size,
        serve_addr: sources.serve.clone().unwrap_or_default(),
        done: true,
        serve_for_ms: u64::try_from(sources.serve_for.as_millis()).unwrap_or(u64::MAX),
        ..Default::default()
    };
    let _ =
        tokio::time::timeout(Duration::from_secs(5), (sources.coordinator)().source(done)).await;
    Ok(seed)
}

/// How to reach a source.
enum Open {
    /// `ArtifactService.Fetch` (batond, or a peer).
    Grpc(ArtifactServiceClient<Channel>),
    /// The artifact file at an external origin, its payload from this
    /// offset on.
    Origin(String, u64),
}

/// What a source sends.
enum Feed {
    Grpc(tonic::Streaming<pb::FetchChunk>),
    Http {
        response: reqwest::Response,
        at: u64,
    },
}

/// HTTP bodies come in small chunks; they are gathered up to this much
/// (or for up to a second) before being written and hashed.
const HTTP_BATCH: usize = 1 << 20;

/// The HTTP client for origins: rustls with the system's roots, at most 5
/// redirects (any content is checked), the environment's proxy.
static HTTP: std::sync::LazyLock<Result<reqwest::Client, String>> =
    std::sync::LazyLock::new(|| {
        reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::limited(5))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("baton-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))
    });

impl Open {
    /// Asks the source for the payload of `digest` (`size` bytes) from
    /// `start` on.
    async fn open(self, digest: &str, start: u64, size: u64) -> Result<Feed, Broke> {
        match self {
            Self::Grpc(mut client) => Ok(Feed::Grpc(
                client
                    .fetch(pb::FetchRequest {
                        digest: digest.to_owned(),
                        offset: start,
                    })
                    .await
                    .map_err(Broke::Failed)?
                    .into_inner(),
            )),
            Self::Origin(url, offset) => {
                let bad = |what: &str| {
                    Broke::Failed(tonic::Status::invalid_argument(format!(
                        "the origin's payload offset {what}"
                    )))
                };
                let first = offset.checked_add(start).ok_or_else(|| bad("overflows"))?;
                let last = offset
                    .checked_add(size)
                    .and_then(|end| end.checked_sub(1))
                    .ok_or_else(|| bad("overflows"))?;
                let client = HTTP
                    .as_ref()
                    .map_err(|e| Broke::Failed(tonic::Status::internal(e.clone())))?;
                let response = client
                    .get(&url)
                    .header(reqwest::header::RANGE, format!("bytes={first}-{last}"))
                    .send()
                    .await
                    .map_err(|e| {
                        Broke::Failed(tonic::Status::unavailable(format!(
                            "cannot reach the origin: {}",
                            baton_common::error_chain(&e)
                        )))
                    })?;
                let status = response.status();
                match status.as_u16() {
                    206 => {
                        let range = response
                            .headers()
                            .get(reqwest::header::CONTENT_RANGE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        if !range.starts_with(&format!("bytes {first}-")) {
                            return Err(Broke::Corrupt(format!(
                                "the origin sent the range {:?} for bytes {first}-{last}",
                                baton_common::text::prefix(range, 60)
                            )));
                        }
                    }
                    200 if first == 0 => {}
                    200 => {
                        return Err(Broke::Failed(tonic::Status::failed_precondition(
                            "the origin does not serve byte ranges",
                        )));
                    }
                    // Not there, or not for us: no retry will change that.
                    401 | 403 | 404 | 410 => {
                        return Err(Broke::Failed(tonic::Status::not_found(format!(
                            "the origin answered {status}"
                        ))));
                    }
                    _ => {
                        return Err(Broke::Failed(tonic::Status::unavailable(format!(
                            "the origin answered {status}"
                        ))));
                    }
                }
                Ok(Feed::Http {
                    response,
                    at: start,
                })
            }
        }
    }
}

impl Feed {
    /// The next bytes and where they start; `None` at the end.
    async fn next(&mut self) -> Result<Option<pb::FetchChunk>, tonic::Status> {
        match self {
            Self::Grpc(stream) => stream.message().await,
            Self::Http { response, at } => {
                let mut batch = bytes::BytesMut::new();
                let began = Instant::now();
                while batch.len() < HTTP_BATCH && began.elapsed() < Duration::from_secs(1) {
                    match response.chunk().await {
                        Ok(Some(data)) => batch.extend_from_slice(&data),
                        Ok(None) => break,
                        Err(e) => {
                            return Err(tonic::Status::unavailable(format!(
                                "the origin's answer broke: {}",
                                baton_common::error_chain(&e)
                            )));
                        }
                    }
                }
                if batch.is_empty() {
                    return Ok(None);
                }
                let offset = *at;
                *at += batch.len() as u64;
                Ok(Some(pb::FetchChunk {
                    offset,
                    data: batch.freeze(),
                    size: 0,
                }))
            }
        }
    }
}

/// Errors that no other attempt will fix.
fn fatal(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::NotFound
            | tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::FailedPrecondition
    )
}

fn give_up(
    fruitless: u32,
    digest: &str,
    checker: &PieceChecker,
    m: &Manifest,
    last: &str,
) -> Result<(), Failure> {
    if fruitless < FRUITLESS {
        return Ok(());
    }
    Err(Failure::new(
        FailureKind::Download,
        format!(
            "the download of {digest} got nothing from {fruitless} sources in a row, at {} of {} bytes (last: {})",
            checker.checked(),
            m.size,
            baton_common::text::prefix(last, 200)
        ),
    ))
}

/// Fails after [`STALLS`] stalls of the coordinator in a row: a source
/// this slow is not waited for (the slow-retrieval attack).
fn stalled(
    stalls: u32,
    digest: &str,
    checker: &PieceChecker,
    m: &Manifest,
    limits: Limits,
    last: &str,
) -> Result<(), Failure> {
    if stalls < STALLS {
        return Ok(());
    }
    Err(Failure::new(
        FailureKind::Download,
        format!(
            "the download of {digest} stalled {stalls} times in a row, below {} KiB/s for {} each (last: {}), at {} of {} bytes",
            MIN_FETCH_RATE >> 10,
            humantime::format_duration(limits.window),
            baton_common::text::prefix(last, 200),
            checker.checked(),
            m.size
        ),
    ))
}

async fn backoff(attempt: u32) {
    tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(attempt.min(5)))).await;
}

fn parse_peer(answer: &pb::SourceAnswer) -> Option<(HostId, std::net::SocketAddr)> {
    Some((
        HostId::try_from(answer.peer.as_str()).ok()?,
        answer.addr.parse().ok()?,
    ))
}

/// One attempt from one source, from the last checked piece on.
#[allow(clippy::too_many_arguments)]
async fn pull(
    open: Open,
    digest: &str,
    m: &Manifest,
    file: &Arc<nix::fcntl::Flock<std::fs::File>>,
    checker: &mut PieceChecker,
    seed: &Seed,
    limits: Limits,
    source: &'static str,
    progress: &mut impl FnMut(u64),
) -> Result<(), Broke> {
    // Whatever the last source left of an unfinished piece goes.
    checker.rewind();
    let start = checker.checked();
    file.set_len(start).map_err(|e| {
        Broke::Local(Failure::new(
            FailureKind::Disk,
            format!("cannot truncate the download: {e}"),
        ))
    })?;
    let stall = |what: String| Broke::Failed(tonic::Status::deadline_exceeded(what));
    let window_len = limits.window;
    let mut stream = tokio::time::timeout(window_len, open.open(digest, start, m.size))
        .await
        .map_err(|_| stall("no answer within the stall window".into()))??;
    let mut window = (Instant::now(), start);
    let mut at = start;
    while at < m.size {
        let next = tokio::time::timeout(window_len, stream.next())
            .await
            .map_err(|_| {
                stall(format!(
                    "nothing received for {}",
                    humantime::format_duration(window_len)
                ))
            })?
            .map_err(Broke::Failed)?;
        let Some(chunk) = next else {
            return Err(Broke::Failed(tonic::Status::unavailable(format!(
                "the source ended the stream at {at} of {} bytes",
                m.size
            ))));
        };
        if chunk.offset == at && at.saturating_add(chunk.data.len() as u64) > m.size {
            return Err(Broke::Corrupt(
                "the payload is longer than its manifest says".into(),
            ));
        }
        if chunk.offset != at {
            // Not what was asked for: as bad as a bad piece.
            return Err(Broke::Corrupt(format!(
                "the source sent {} bytes at offset {} where {at} was expected",
                chunk.data.len(),
                chunk.offset
            )));
        }
        let len = chunk.data.len() as u64;
        let before = checker.checked();
        let writing = file.clone();
        let mut c = checker.clone();
        let data = chunk.data;
        let (c, result) = tokio::task::spawn_blocking(move || {
            let written = writing.write_all_at(&data, at);
            let fed = c.feed(&data);
            (c, written.map(|()| fed))
        })
        .await
        .map_err(|e| Broke::Failed(tonic::Status::internal(e.to_string())))?;
        *checker = c;
        match result {
            Err(e) => {
                return Err(Broke::Local(Failure::new(
                    FailureKind::Disk,
                    format!("cannot write {}: {e}", m.payload_sha256),
                )));
            }
            Ok(Err(bad)) => {
                let _ = file.set_len(bad.start);
                return Err(Broke::Corrupt(bad.to_string()));
            }
            Ok(Ok(checked)) => {
                at += len;
                if checked > before {
                    seed.publish(checked);
                    METRICS.fetched_bytes.inc_by(&[source], checked - before);
                    progress(checked);
                }
            }
        }
        if window.0.elapsed() >= window_len {
            let secs = window.0.elapsed().as_secs_f64().max(0.001);
            let rate = ((at - window.1) as f64 / secs) as u64;
            if rate < MIN_FETCH_RATE {
                return Err(stall(format!(
                    "it ran at {rate} bytes/s, below {MIN_FETCH_RATE}"
                )));
            }
            window = (Instant::now(), at);
        }
    }
    Ok(())
}

/// Opens (or creates) the download file, locked, and checks the pieces
/// already there; cuts it back to the last good piece.
fn open_checked(
    path: &Path,
    m: &Manifest,
) -> Result<(nix::fcntl::Flock<std::fs::File>, PieceChecker), String> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("cannot lock {}: {e}", path.display()))?;
    let mut checker =
        PieceChecker::new(m, 0).ok_or_else(|| "the manifest lists no pieces".to_owned())?;
    let len = file
        .metadata()
        .map_err(|e| e.to_string())?
        .len()
        .min(m.size);
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = usize::try_from(len - at)
            .unwrap_or(buf.len())
            .min(buf.len());
        file.read_exact_at(&mut buf[..n], at)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if checker.feed(&buf[..n]).is_err() {
            break;
        }
        at += n as u64;
    }
    checker.rewind();
    file.set_len(checker.checked())
        .map_err(|e| format!("cannot truncate {}: {e}", path.display()))?;
    Ok((file, checker))
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_common::artifact::{ArtifactKind, PIECE_UNIT, hash_pieces};

    #[test]
    fn a_partial_file_is_cut_back_to_its_last_good_piece() {
        let payload: Vec<u8> = (0..PIECE_UNIT * 3).map(|i| (i % 253) as u8).collect();
        let m = Manifest {
            name: "api".into(),
            kind: ArtifactKind::Service,
            version: "1.0.0".into(),
            payload_sha256: baton_common::hex::sha256_hex(&payload),
            size: payload.len() as u64,
            created: String::new(),
            key_id: String::new(),
            expires: None,
            piece_size: PIECE_UNIT,
            pieces: hash_pieces(&payload[..], PIECE_UNIT).unwrap(),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.partial");
        // Two good pieces and half of a third: resumes after two.
        std::fs::write(&path, &payload[..(PIECE_UNIT * 5 / 2) as usize]).unwrap();
        let (_, c) = open_checked(&path, &m).unwrap();
        assert_eq!(c.checked(), 2 * PIECE_UNIT);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * PIECE_UNIT);
        // A bad second piece: only the first is kept.
        let mut bad = payload.clone();
        bad[(PIECE_UNIT + 3) as usize] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        let (_, c) = open_checked(&path, &m).unwrap();
        assert_eq!(c.checked(), PIECE_UNIT);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), PIECE_UNIT);
    }
}
