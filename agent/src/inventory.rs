//! The host's service inventory, read from the release store on disk:
//! `<data-dir>/services/<name>/current` is a symlink to
//! `releases/<version>`, so the link's target names the version.

use std::path::Path;

use baton_common::host::{ServiceState, ServiceStatus, validate_name};
use tracing::warn;

/// Every service with a `current` release, sorted by name. Nothing
/// supervises them yet, so each is reported stopped and not healthy.
pub fn scan(data_dir: &Path) -> Vec<ServiceStatus> {
    let services = data_dir.join("services");
    let Ok(entries) = std::fs::read_dir(&services) else {
        return vec![];
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if validate_name(&name).is_err() {
            continue;
        }
        let current = entry.path().join("current");
        let Ok(target) = std::fs::read_link(&current) else {
            continue;
        };
        match target.file_name().map(|v| v.to_string_lossy().into_owned()) {
            Some(version) if !version.is_empty() => out.push(ServiceStatus {
                name,
                version,
                state: ServiceState::Stopped,
                healthy: false,
            }),
            _ => warn!(link = %current.display(), "ignoring a current link that names no release"),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_links_name_the_versions() {
        let dir = tempfile::tempdir().unwrap();
        assert!(scan(dir.path()).is_empty());
        let api = dir.path().join("services/api");
        std::fs::create_dir_all(api.join("releases/2.0.0")).unwrap();
        std::os::unix::fs::symlink("releases/2.0.0", api.join("current")).unwrap();
        std::fs::create_dir_all(dir.path().join("services/half-installed/releases/1.0.0")).unwrap();
        let found = scan(dir.path());
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].name.as_str(), found[0].version.as_str()),
            ("api", "2.0.0")
        );
    }
}
