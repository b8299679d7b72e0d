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

impl std::fmt::Display for Release {
    /// `name version`, as errors and logs name a release.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.name, self.version)
    }
}
