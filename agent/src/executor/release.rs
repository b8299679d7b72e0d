//! One release of one service on this host, as the steps of a command
//! pass it around: the hooks, the health gate, the restart of an old
//! release and the process runner all take this one value.

use std::path::PathBuf;

use crate::releases::Releases;
use crate::service::ServiceSpec;

/// A release: which service and version, where it is unpacked, where it
/// runs, and its `service.toml` as parsed.
#[derive(Debug, Clone)]
pub(super) struct Release {
    /// The service.
    pub name: String,
    /// The version.
    pub version: String,
    /// Its unpacked, read-only directory.
    pub dir: PathBuf,
    /// Its writable run directory (logs, process records).
    pub run_dir: PathBuf,
    /// Its parsed `service.toml`.
    pub spec: ServiceSpec,
}

impl Release {
    /// `name` `version` as `releases` lays it out, with `spec`.
    pub fn new(releases: &Releases, name: &str, version: &str, spec: ServiceSpec) -> Self {
        Self {
            name: name.to_owned(),
            version: version.to_owned(),
            dir: releases.release_dir(name, version),
            run_dir: releases.run_dir(name, version),
            spec,
        }
    }
}

/// How many of the log's last lines a failure carries.
const LOG_TAIL_LINES: usize = 20;
/// How much of the log's end is read to find them.
const LOG_TAIL_READ: u64 = 64 * 1024;

impl Release {
    /// The last lines this release's process logged: the end of
    /// `service.log` in its run directory (the agent's own supervisor), or
    /// its unit's journal (systemd). Empty when there is none.
    pub async fn log_tail(&self) -> String {
        match &self.spec.supervisor {
            crate::service::SupervisorKind::Systemd { unit } => journal_tail(unit).await,
            crate::service::SupervisorKind::Native => {
                let path = self.run_dir.join(crate::supervisor::LOG_FILE);
                tokio::task::spawn_blocking(move || file_tail(&path))
                    .await
                    .unwrap_or_default()
            }
        }
    }
}

/// The last [`LOG_TAIL_LINES`] lines of the file at `path`, reading at
/// most [`LOG_TAIL_READ`] bytes of its end.
pub(super) fn file_tail(path: &std::path::Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(LOG_TAIL_READ);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    if f.take(LOG_TAIL_READ).read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    // A cut first line is dropped when the read did not start the file.
    let text = if start > 0 {
        text.split_once('\n').map_or("", |(_, rest)| rest)
    } else {
        &text
    };
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// The last lines of a systemd unit's journal (`journalctl`), bounded by
/// a timeout; empty when journalctl is missing or says nothing.
async fn journal_tail(unit: &str) -> String {
    let run = tokio::process::Command::new("journalctl")
        .args(["--no-pager", "--output=cat", "--lines"])
        .arg(LOG_TAIL_LINES.to_string())
        .arg("--unit")
        .arg(unit)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(std::time::Duration::from_secs(3), run).await {
        Ok(Ok(out)) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => String::new(),
    }
}

impl std::fmt::Display for Release {
    /// `name version`, as errors and logs name a release.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.name, self.version)
    }
}
