//! The command journal: the outcome of every finished command, by id, on
//! disk before it is reported. A command re-sent after a reconnect (or a
//! coordinator restart) is answered from here instead of running again.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use baton_common::artifact::fsync_dir;
use baton_common::command::{CommandUpdate, FailureDetail, FailureKind, Outcome};
use serde::{Deserialize, Serialize};

/// Entries older than this are dropped at startup.
const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// One finished command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    id: String,
    succeeded: bool,
    error: String,
    /// The kind of failure (absent in entries written before kinds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failure: Option<FailureKind>,
    /// A failed activation's probe answer and log tail, re-sent with the
    /// outcome after a reconnect.
    #[serde(default, skip_serializing_if = "FailureDetail::is_empty")]
    detail: FailureDetail,
}

/// `<data-dir>/commands/`.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

/// Command ids may hold `/`; file names may not.
fn file_name(id: &str) -> String {
    let mut s: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    // Distinct ids that map to one name differ in this suffix.
    s.push_str(&format!("-{:016x}.json", fnv(id)));
    s
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

impl Journal {
    /// Opens (creating) the journal and drops old entries.
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let dir = data_dir.join("commands");
        std::fs::create_dir_all(&dir)?;
        let now = SystemTime::now();
        for entry in std::fs::read_dir(&dir)?.flatten() {
            // A temporary file is what a crash or a full disk left mid-write.
            if entry.path().extension().is_some_and(|e| e == "tmp") {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > RETENTION);
            if old {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self { dir })
    }

    /// The recorded final update of `id`, if it finished before.
    pub fn lookup(&self, id: &str) -> Option<CommandUpdate> {
        let bytes = std::fs::read(self.dir.join(file_name(id))).ok()?;
        let e: Entry = serde_json::from_slice(&bytes).ok()?;
        (e.id == id).then(|| CommandUpdate {
            failure: e.failure.filter(|_| !e.succeeded),
            detail: FailureDetail::new(&e.detail.probe, &e.detail.log_tail),
            ..CommandUpdate::done(
                id,
                if e.succeeded {
                    Outcome::Succeeded
                } else {
                    Outcome::Failed
                },
                e.error,
            )
        })
    }

    /// Records a final update durably (write, fsync, rename, fsync dir).
    pub fn record(&self, update: &CommandUpdate) -> std::io::Result<()> {
        let succeeded = matches!(
            update.phase,
            baton_common::command::Phase::Done(Outcome::Succeeded)
        );
        let entry = Entry {
            id: update.command_id.clone(),
            succeeded,
            error: update.error.clone(),
            failure: update.failure,
            detail: update.detail.clone(),
        };
        let path = self.dir.join(file_name(&update.command_id));
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(&entry).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            fsync_dir(&self.dir)
        };
        // A full disk must not leave empty temporary files behind.
        write().inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.lookup("r-1/1"), None);
        let done = CommandUpdate::failed("r-1/1", FailureKind::Hook, "boom");
        j.record(&done).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.lookup("r-1/1"), Some(done));
        assert_eq!(
            j.lookup("r-1_1"),
            None,
            "ids that sanitise alike stay apart"
        );
    }

    #[test]
    fn an_entry_from_before_failure_kinds_still_answers() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        std::fs::write(
            dir.path().join("commands").join(file_name("r-2/1")),
            br#"{"id":"r-2/1","succeeded":false,"error":"boom"}"#,
        )
        .unwrap();
        let old = j.lookup("r-2/1").unwrap();
        assert_eq!(old, CommandUpdate::done("r-2/1", Outcome::Failed, "boom"));
        assert_eq!(old.failure, None);
    }
}
