//! The highest version of each service this host ever ran healthy, kept in
//! `<data-dir>/installed/<service>` — outside the service's own directory,
//! so that removing the service does not erase it (the high-water mark TUF
//! and Uptane keep against rollback attacks). A release older than it is
//! never staged again, and activated only when the plan allows a
//! downgrade and the host still holds the release.

use std::io::Write;
use std::path::{Path, PathBuf};

use baton_common::artifact::{fsync_dir, validate_version};
use baton_common::command::FailureKind;
use baton_common::version::is_downgrade;

/// Why a version of a service may not be staged or activated here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// It is older than the highest version the host ran.
    #[error("{0}")]
    Below(String),
    /// The record of the highest version cannot be read (the check it
    /// guards does not open because a file was damaged).
    #[error("{0}")]
    Unreadable(String),
}

impl Refusal {
    /// The kind of the command failure this makes.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Below(_) => FailureKind::Refused,
            Self::Unreadable(_) => FailureKind::Disk,
        }
    }
}

/// `<data-dir>/installed/`.
#[derive(Debug, Clone)]
pub struct Installed {
    dir: PathBuf,
}

impl Installed {
    /// The records under `data_dir`, creating their directory.
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let dir = data_dir.join("installed");
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&dir)?;
        Ok(Self { dir })
    }

    /// The highest version of `service` ever recorded. A record that cannot
    /// be read is an error, never "no record": the check it guards must
    /// not open because a file was damaged.
    pub fn highest(&self, service: &str) -> Result<Option<String>, String> {
        let path = self.dir.join(service);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let version = text.trim();
                validate_version(version).map_err(|e| {
                    format!(
                        "the record of the highest {service} version this host ran, {}, is unreadable ({e}); after checking the host, delete it to start over",
                        path.display()
                    )
                })?;
                Ok(Some(version.to_owned()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Raises the record of `service` to `version` when that is higher
    /// (write, fsync, rename, fsync the directory).
    pub fn record(&self, service: &str, version: &str) -> Result<(), String> {
        // A version from before versions had to be semantic ones (a host
        // upgraded from an older Baton) cannot be ordered: it is not a
        // mark. The next release, which must be one, will be.
        if validate_version(version).is_err() {
            return Ok(());
        }
        if let Some(highest) = self.highest(service).ok().flatten()
            && !is_downgrade(version, &highest)
        {
            return Ok(());
        }
        let path = self.dir.join(service);
        let tmp = self.dir.join(format!(".{service}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(version.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            fsync_dir(&self.dir)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot record {service} {version} as installed: {e}")
        })
    }

    /// Why staging or activating `version` of `service` must be refused,
    /// if it must: it is older than the highest version recorded, and the
    /// host does not hold it (`held`) or the plan does not allow a
    /// downgrade.
    pub fn refuse(
        &self,
        service: &str,
        version: &str,
        held: bool,
        allow_downgrade: bool,
    ) -> Result<(), Refusal> {
        let Some(highest) = self.highest(service).map_err(Refusal::Unreadable)? else {
            return Ok(());
        };
        if !is_downgrade(&highest, version) || (held && allow_downgrade) {
            return Ok(());
        }
        Err(Refusal::Below(if held {
            format!(
                "refusing {service} {version}: this host has run {highest}, and going back needs allow_downgrade = true in the plan"
            )
        } else {
            format!(
                "refusing {service} {version}: this host has run {highest}, and an older release is installed again only while the host still holds it (this one it does not)"
            )
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_only_rises_and_survives_everything_but_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let installed = Installed::open(dir.path()).unwrap();
        assert_eq!(installed.highest("api").unwrap(), None);
        installed.refuse("api", "0.1.0", false, false).unwrap();
        installed.record("api", "2.0.0").unwrap();
        installed.record("api", "1.0.0").unwrap();
        assert_eq!(
            Installed::open(dir.path())
                .unwrap()
                .highest("api")
                .unwrap()
                .as_deref(),
            Some("2.0.0")
        );
        installed.refuse("api", "2.0.0", false, false).unwrap();
        installed.refuse("api", "2.1.0", false, false).unwrap();
        let e = installed.refuse("api", "1.0.0", false, true).unwrap_err();
        assert_eq!(e.kind(), FailureKind::Refused);
        assert!(e.to_string().contains("does not"), "{e}");
        let e = installed.refuse("api", "1.0.0", true, false).unwrap_err();
        assert!(e.to_string().contains("allow_downgrade"), "{e}");
        installed.refuse("api", "1.0.0", true, true).unwrap();
        // A version that is not a semantic one is no mark.
        installed.record("legacy", "v1").unwrap();
        assert_eq!(installed.highest("legacy").unwrap(), None);
        // A damaged record refuses rather than opening the check.
        std::fs::write(dir.path().join("installed/api"), "garbage").unwrap();
        let e = installed.refuse("api", "3.0.0", false, false).unwrap_err();
        // The host's record failed, not the release.
        assert_eq!(e.kind(), FailureKind::Disk);
    }
}
