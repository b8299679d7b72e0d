//! The release store on the host:
//!
//! ```text
//! <data-dir>/services/<name>/releases/<version>/   one directory per release
//! <data-dir>/services/<name>/current -> releases/<version>
//! <data-dir>/services/<name>/run/                 process.json, service.log
//! ```
//!
//! A release directory appears only complete (unpacked into a temporary
//! directory, fsynced, then renamed), so its existence means "staged and
//! verified". `current` is replaced by renaming a new symlink over it,
//! which is atomic: after a crash it names either the old or the new
//! release, never nothing.

use std::io;
use std::path::{Path, PathBuf};

use baton_common::artifact::fsync_dir;

/// The name of a new `current` symlink before it is renamed into place.
const SWAP_PREFIX: &str = ".current-";

/// A staging directory untouched this long was abandoned.
const STALE_STAGING: std::time::Duration = std::time::Duration::from_secs(3600);

/// Where releases live.
#[derive(Debug, Clone)]
pub struct Releases {
    root: PathBuf,
}

impl Releases {
    /// The store under `<data_dir>/services`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("services"),
        }
    }

    /// A store of the same layout under `root` (the agent's own releases
    /// live in `<data-dir>/agent`).
    pub fn at(root: PathBuf) -> Self {
        Self { root }
    }

    /// `services/<name>`.
    pub fn service_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// `services/<name>/releases/<version>`.
    pub fn release_dir(&self, name: &str, version: &str) -> PathBuf {
        self.service_dir(name).join("releases").join(version)
    }

    /// `services/<name>/run/<version>`: the process file and the log of
    /// that release's process (two run side by side during a handoff).
    pub fn run_dir(&self, name: &str, version: &str) -> PathBuf {
        self.service_dir(name).join("run").join(version)
    }

    /// Every existing run directory of a service.
    pub fn run_dirs(&self, name: &str) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.service_dir(name).join("run")) else {
            return vec![];
        };
        let mut dirs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        dirs
    }

    /// Whether `version` of `name` is staged (complete and verified).
    pub fn is_staged(&self, name: &str, version: &str) -> bool {
        self.release_dir(name, version).is_dir()
    }

    /// The version `current` points at.
    pub fn current(&self, name: &str) -> Option<String> {
        let target = std::fs::read_link(self.service_dir(name).join("current")).ok()?;
        target
            .file_name()
            .map(|v| v.to_string_lossy().into_owned())
            .filter(|v| !v.is_empty())
    }

    /// Every service with a `current` release, sorted.
    pub fn services(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return vec![];
        };
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| baton_common::host::validate_name(n).is_ok() && self.current(n).is_some())
            .collect();
        names.sort();
        names
    }

    /// A fresh directory to unpack `version` into, beside its final place
    /// (same file system, so the final rename is atomic).
    pub fn staging_dir(&self, name: &str, version: &str) -> io::Result<PathBuf> {
        let releases = self.service_dir(name).join("releases");
        // Private: a service running as its own user is let into its own
        // directory only (see `Executor::open_release_to`).
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&releases)?;
        Ok(releases.join(format!(".staging-{version}-{:08x}", fastrand::u32(..))))
    }

    /// Moves an unpacked release into place.
    pub fn commit_staged(&self, unpacked: &Path, name: &str, version: &str) -> io::Result<()> {
        let dest = self.release_dir(name, version);
        std::fs::rename(unpacked, &dest)?;
        fsync_dir(&self.service_dir(name).join("releases"))
    }

    /// Points `current` at `version`, atomically.
    pub fn swap(&self, name: &str, version: &str) -> io::Result<()> {
        self.swap_steps(name, version, usize::MAX)
    }

    /// [`Releases::swap`], stopping (as a crash would) after `steps` of its
    /// steps: make a new symlink beside `current`, rename it over
    /// `current`, fsync the directory.
    fn swap_steps(&self, name: &str, version: &str, steps: usize) -> io::Result<()> {
        let dir = self.service_dir(name);
        let tmp = dir.join(format!("{SWAP_PREFIX}{:08x}", fastrand::u32(..)));
        if steps == 0 {
            return Ok(());
        }
        std::os::unix::fs::symlink(Path::new("releases").join(version), &tmp)?;
        if steps == 1 {
            return Ok(());
        }
        if let Err(e) = std::fs::rename(&tmp, dir.join("current")) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        if steps == 2 {
            return Ok(());
        }
        fsync_dir(&dir)
    }

    /// Removes what an interrupted swap left beside `current` (a symlink
    /// that was never renamed into place).
    pub fn clean(&self, name: &str) {
        let Ok(entries) = std::fs::read_dir(self.service_dir(name)) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(SWAP_PREFIX) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Deletes the oldest releases beyond `keep`, never `current` nor any
    /// of `protect`; leftovers of interrupted staging go too. Returns the
    /// versions removed.
    pub fn prune(&self, name: &str, keep: usize, protect: &[&str]) -> io::Result<Vec<String>> {
        let dir = self.service_dir(name).join("releases");
        let current = self.current(name);
        let mut releases = Vec::new();
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let version = entry.file_name().to_string_lossy().into_owned();
            if version.starts_with(".staging-") {
                // Leftovers of an interrupted staging; a recent one may be
                // a staging in progress.
                let stale = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().unwrap_or_default() > STALE_STAGING);
                if stale {
                    std::fs::remove_dir_all(entry.path())?;
                }
                continue;
            }
            let modified = entry.metadata().and_then(|m| m.modified())?;
            releases.push((modified, version));
        }
        // Newest first; the kept ones are the newest `keep`.
        releases.sort_by(|a, b| b.cmp(a));
        let mut removed = Vec::new();
        for (_, version) in releases.into_iter().skip(keep) {
            if current.as_deref() == Some(version.as_str()) || protect.contains(&version.as_str()) {
                continue;
            }
            std::fs::remove_dir_all(dir.join(&version))?;
            removed.push(version);
        }
        if !removed.is_empty() {
            fsync_dir(&dir)?;
        }
        Ok(removed)
    }

    /// Deletes a service and all its releases.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        let dir = self.service_dir(name);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => fsync_dir(&self.root),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a restarted agent finds: the release `current` names, which
    /// must be complete (its service.toml and payload there).
    fn found(r: &Releases, name: &str) -> String {
        let version = r.current(name).expect("current names a release");
        let dir = r.release_dir(name, &version);
        assert_eq!(
            std::fs::read_to_string(dir.join("payload")).unwrap(),
            format!("payload of {version}"),
            "{version} is incomplete"
        );
        version
    }

    fn staged_with_payload(r: &Releases, name: &str, version: &str) {
        let tmp = r.staging_dir(name, version).unwrap();
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("service.toml"), "command = \"x\"\n").unwrap();
        std::fs::write(tmp.join("payload"), format!("payload of {version}")).unwrap();
        r.commit_staged(&tmp, name, version).unwrap();
    }

    #[test]
    fn a_crash_at_any_step_of_a_swap_leaves_the_old_or_the_new_release_complete() {
        for steps in 0..=3 {
            let dir = tempfile::tempdir().unwrap();
            let r = Releases::new(dir.path());
            staged_with_payload(&r, "api", "1.0.0");
            r.swap("api", "1.0.0").unwrap();
            staged_with_payload(&r, "api", "2.0.0");
            // The crash: the swap stops after `steps` steps.
            r.swap_steps("api", "2.0.0", steps).unwrap();
            // The restart: a fresh view of the same directory.
            let after = Releases::new(dir.path());
            after.clean("api");
            let version = found(&after, "api");
            let expected = if steps >= 2 { "2.0.0" } else { "1.0.0" };
            assert_eq!(version, expected, "crash after {steps} steps");
            // Nothing of the interrupted swap is left, and the next swap
            // works.
            let leftovers: Vec<_> = std::fs::read_dir(after.service_dir("api"))
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
                .collect();
            assert!(leftovers.is_empty(), "{leftovers:?}");
            after.swap("api", "2.0.0").unwrap();
            assert_eq!(found(&after, "api"), "2.0.0");
        }
    }

    #[test]
    fn a_crash_while_staging_leaves_no_release_that_looks_complete() {
        let dir = tempfile::tempdir().unwrap();
        let r = Releases::new(dir.path());
        // Unpacked halfway: the staging directory exists, the release
        // does not.
        let tmp = r.staging_dir("api", "3.0.0").unwrap();
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("service.toml"), "command = \"x\"\n").unwrap();
        assert!(!r.is_staged("api", "3.0.0"));
        // Staging again later works beside it, and pruning takes the
        // abandoned one once it is old.
        staged_with_payload(&r, "api", "3.0.0");
        assert!(r.is_staged("api", "3.0.0"));
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::open(&tmp)
            .unwrap()
            .set_times(std::fs::FileTimes::new().set_modified(old))
            .unwrap();
        r.swap("api", "3.0.0").unwrap();
        r.prune("api", 3, &[]).unwrap();
        assert!(!tmp.exists());
    }

    fn staged(r: &Releases, name: &str, version: &str) {
        let tmp = r.staging_dir(name, version).unwrap();
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("service.toml"), "command = \"x\"\n").unwrap();
        r.commit_staged(&tmp, name, version).unwrap();
    }

    #[test]
    fn swap_is_a_rename_and_prune_keeps_current_and_protected() {
        let dir = tempfile::tempdir().unwrap();
        let r = Releases::new(dir.path());
        assert_eq!(r.current("api"), None);
        for v in ["1", "2", "3", "4", "5"] {
            staged(&r, "api", v);
            // Distinct modification times, oldest first.
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(r.is_staged("api", "3"));
        r.swap("api", "1").unwrap();
        r.swap("api", "5").unwrap();
        assert_eq!(r.current("api").as_deref(), Some("5"));
        assert_eq!(r.services(), vec!["api".to_owned()]);
        let releases = dir.path().join("services/api/releases");
        std::fs::create_dir_all(releases.join(".staging-6-0")).unwrap();
        std::fs::create_dir_all(releases.join(".staging-7-0")).unwrap();
        // One abandoned two hours ago, one being unpacked right now.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::open(releases.join(".staging-6-0"))
            .unwrap()
            .set_times(std::fs::FileTimes::new().set_modified(old))
            .unwrap();
        let removed = r.prune("api", 2, &["1"]).unwrap();
        assert_eq!(removed, vec!["3".to_owned(), "2".to_owned()]);
        assert!(r.is_staged("api", "1") && r.is_staged("api", "4") && r.is_staged("api", "5"));
        assert!(!releases.join(".staging-6-0").exists());
        assert!(releases.join(".staging-7-0").exists());
        r.remove("api").unwrap();
        assert!(r.services().is_empty());
        r.remove("api").unwrap();
    }
}
