//! `baton logs HOST SERVICE`: a service's log, sent over the agent's
//! stream in chunks. Nothing changes on the host and nothing is journaled:
//! the last lines of the current release's `service.log` (or its unit's
//! journal, for a service systemd runs), then with `follow` what it logs
//! next, until the coordinator cancels the request or the stream ends.
//!
//! Bounded: at most [`MAX_STREAMS`] requests at once, [`MAX_LINES`] lines
//! and [`MAX_TAIL_BYTES`] read back, chunks of [`CHUNK_BYTES`], and while
//! following at most [`FOLLOW_BYTES_PER_TICK`] every [`FOLLOW_POLL`].

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use baton_proto::agent::v1::{LogChunk, LogRequest};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The most log requests an agent serves at once.
pub const MAX_STREAMS: usize = 8;
/// The most lines a request may ask for.
pub const MAX_LINES: u32 = 10_000;
/// Lines sent when a request asks for none.
pub const DEFAULT_LINES: u32 = 100;
/// The most bytes of a log's end read to find its last lines.
pub const MAX_TAIL_BYTES: u64 = 4 << 20;
/// The largest chunk sent.
pub const CHUNK_BYTES: usize = 16 << 10;
/// How often a followed log is looked at.
pub const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// The most bytes a followed log sends per look.
pub const FOLLOW_BYTES_PER_TICK: u64 = 256 << 10;

/// Where a service's log is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file the agent's supervisor appends to (rotated to `.1`).
    File(PathBuf),
    /// A systemd unit's journal.
    Journal(String),
}

fn chunk(id: &str, text: String) -> LogChunk {
    LogChunk {
        request_id: id.to_owned(),
        text,
        eof: false,
        error: String::new(),
    }
}

/// Sends `text` in chunks of at most [`CHUNK_BYTES`], cut at line ends
/// where there are any. False when the receiver is gone.
async fn send_text(out: &mpsc::Sender<LogChunk>, id: &str, mut text: &str) -> bool {
    while !text.is_empty() {
        let mut end = text.len().min(CHUNK_BYTES);
        if end < text.len() {
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            if let Some(nl) = text[..end].rfind('\n') {
                end = nl + 1;
            }
        }
        if out.send(chunk(id, text[..end].to_owned())).await.is_err() {
            return false;
        }
        text = &text[end..];
    }
    true
}

/// The last `lines` lines of the file at `path` (reading at most
/// [`MAX_TAIL_BYTES`] of its end), and the offset after them.
pub fn tail(path: &std::path::Path, lines: usize) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(MAX_TAIL_BYTES);
    f.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    f.take(len - start).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let text = if start > 0 {
        text.split_once('\n').map_or("", |(_, rest)| rest)
    } else {
        &text
    };
    let all: Vec<&str> = text.split_inclusive('\n').collect();
    let kept = all[all.len().saturating_sub(lines)..].concat();
    Ok((kept, start + bytes.len() as u64))
}

/// Serves one request: the tail, then (following) what comes, then an
/// end chunk (`eof`, or `error`). Returns when done, cancelled, or the
/// receiver is gone.
pub async fn serve(
    req: LogRequest,
    source: Result<Source, String>,
    out: mpsc::Sender<LogChunk>,
    cancel: CancellationToken,
) {
    let id = req.request_id.clone();
    let lines = match req.lines {
        0 => DEFAULT_LINES,
        n => n.min(MAX_LINES),
    } as usize;
    let result = match source {
        Err(e) => Err(e),
        Ok(Source::File(path)) => file(&id, &path, lines, req.follow, &out, &cancel).await,
        Ok(Source::Journal(unit)) => journal(&id, &unit, lines, req.follow, &out, &cancel).await,
    };
    let end = match result {
        Ok(()) => LogChunk {
            eof: true,
            ..chunk(&id, String::new())
        },
        Err(error) => LogChunk {
            error: baton_common::text::prefix(&error, 500),
            ..chunk(&id, String::new())
        },
    };
    if !cancel.is_cancelled() {
        let _ = out.send(end).await;
    }
}

async fn file(
    id: &str,
    path: &std::path::Path,
    lines: usize,
    follow: bool,
    out: &mpsc::Sender<LogChunk>,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let owned = path.to_owned();
    let (text, mut pos) = tokio::task::spawn_blocking(move || tail(&owned, lines))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "the service has logged nothing yet".to_owned(),
            _ => format!("cannot read its log: {e}"),
        })?;
    if !send_text(out, id, &text).await || !follow {
        return Ok(());
    }
    let mut inode = std::fs::metadata(path).map(|m| m.ino()).ok();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = out.closed() => return Ok(()),
            () = tokio::time::sleep(FOLLOW_POLL) => {}
        }
        let Ok(meta) = std::fs::metadata(path) else {
            continue;
        };
        // Rotated (a new file) or truncated: from its start.
        if Some(meta.ino()) != inode || meta.len() < pos {
            inode = Some(meta.ino());
            pos = 0;
        }
        if meta.len() == pos {
            continue;
        }
        let owned = path.to_owned();
        let from = pos;
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut f = std::fs::File::open(&owned)?;
            f.seek(SeekFrom::Start(from))?;
            let mut bytes = Vec::new();
            f.take(FOLLOW_BYTES_PER_TICK).read_to_end(&mut bytes)?;
            Ok(bytes)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot read its log: {e}"))?;
        pos += read.len() as u64;
        if !send_text(out, id, &String::from_utf8_lossy(&read)).await {
            return Ok(());
        }
    }
}

async fn journal(
    id: &str,
    unit: &str,
    lines: usize,
    follow: bool,
    out: &mpsc::Sender<LogChunk>,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new("journalctl");
    cmd.args(["--no-pager", "--output=cat", "--lines"])
        .arg(lines.to_string())
        .arg("--unit")
        .arg(unit)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    if follow {
        cmd.arg("--follow");
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run journalctl for {unit}: {e}"))?;
    let Some(stdout) = child.stdout.take() else {
        return Err("journalctl gave no output".into());
    };
    let mut reader = tokio::io::BufReader::new(stdout).lines();
    loop {
        let line = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = out.closed() => return Ok(()),
            line = reader.next_line() => line,
        };
        match line {
            Ok(Some(mut line)) => {
                line.push('\n');
                if !send_text(out, id, &line).await {
                    return Ok(());
                }
            }
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("cannot read journalctl's output: {e}")),
        }
    }
}

/// The requests being served by one stream: each one's cancel token.
#[derive(Debug, Default)]
pub struct Streams {
    running: std::collections::HashMap<String, CancellationToken>,
}

impl Streams {
    /// Starts serving `req` from `source` into `out`, unless
    /// [`MAX_STREAMS`] are running (then says so on `out`).
    pub fn start(
        &mut self,
        req: LogRequest,
        source: Result<Source, String>,
        out: mpsc::Sender<LogChunk>,
    ) {
        self.running.retain(|_, c| !c.is_cancelled());
        let id = baton_common::text::prefix(&req.request_id, 64);
        if self.running.len() >= MAX_STREAMS || self.running.contains_key(&id) {
            let refusal = LogChunk {
                error: format!("this host serves {MAX_STREAMS} log requests at most at once"),
                ..chunk(&id, String::new())
            };
            let _ = out.try_send(refusal);
            return;
        }
        let cancel = CancellationToken::new();
        self.running.insert(id.clone(), cancel.clone());
        tokio::spawn(async move {
            serve(
                LogRequest {
                    request_id: id,
                    ..req
                },
                source,
                out,
                cancel.clone(),
            )
            .await;
            cancel.cancel();
        });
    }

    /// Stops serving request `id`.
    pub fn cancel(&mut self, id: &str) {
        if let Some(c) = self.running.remove(id) {
            c.cancel();
        }
    }
}

impl Drop for Streams {
    /// The stream ended: every request it served ends too.
    fn drop(&mut self) {
        for c in self.running.values() {
            c.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_is_the_last_lines_even_of_a_long_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("service.log");
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &text).unwrap();
        let (tail3, pos) = tail(&path, 3).unwrap();
        assert_eq!(tail3, "line 997\nline 998\nline 999\n");
        assert_eq!(pos, text.len() as u64);
        let (all, _) = tail(&path, 5000).unwrap();
        assert_eq!(all, text);
    }

    #[tokio::test]
    async fn a_followed_log_sends_what_comes_and_survives_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("service.log");
        std::fs::write(&path, "old\n").unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let req = LogRequest {
            request_id: "r1".into(),
            service: "web".into(),
            lines: 10,
            follow: true,
        };
        let task = tokio::spawn(serve(
            req,
            Ok(Source::File(path.clone())),
            tx,
            cancel.clone(),
        ));
        assert_eq!(rx.recv().await.unwrap().text, "old\n");
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"new\n")
            .unwrap();
        assert_eq!(rx.recv().await.unwrap().text, "new\n");
        // Rotated: the new file from its start.
        std::fs::rename(&path, dir.path().join("service.log.1")).unwrap();
        std::fs::write(&path, "after\n").unwrap();
        assert_eq!(rx.recv().await.unwrap().text, "after\n");
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_log_ends_with_an_error_and_big_text_comes_in_chunks() {
        let (tx, mut rx) = mpsc::channel(16);
        let req = LogRequest {
            request_id: "r2".into(),
            service: "web".into(),
            lines: 0,
            follow: false,
        };
        serve(
            req,
            Ok(Source::File("/nonexistent/x".into())),
            tx,
            CancellationToken::new(),
        )
        .await;
        let end = rx.recv().await.unwrap();
        assert!(end.error.contains("logged nothing"), "{end:?}");

        let (tx, mut rx) = mpsc::channel(64);
        let text = "x".repeat(100) + "\n";
        let big = text.repeat(500);
        assert!(send_text(&tx, "r3", &big).await);
        drop(tx);
        let mut got = String::new();
        while let Some(c) = rx.recv().await {
            assert!(c.text.len() <= CHUNK_BYTES);
            assert!(c.text.ends_with('\n'));
            got.push_str(&c.text);
        }
        assert_eq!(got, big);
    }
}
