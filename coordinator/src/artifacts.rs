//! The coordinator's artifact store: payloads content-addressed on disk
//! (`<data-dir>/blobs/sha256/<hex>`), their signed manifests in the
//! [`Store`] under `artifacts/<name>/<version>`.
//!
//! The coordinator checks that an upload's bytes match the size and digest
//! its manifest claims, but never the signature: agents verify that against
//! keys they pin themselves, so a compromised coordinator cannot make them
//! run anything unsigned.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use baton_common::artifact::{PieceChecker, SignedManifest};
use ring::digest;
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

/// Bytes per chunk streamed to agents: large enough that per-message
/// overhead vanishes, well under gRPC's 4 MiB default message limit.
pub const CHUNK: usize = 1 << 20;

/// A stored artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// The service.
    pub name: String,
    /// The release.
    pub version: String,
    /// `sha256:<hex>` of the payload.
    pub digest: String,
    /// Payload bytes.
    pub size: u64,
    /// When it was packed.
    pub created: String,
    /// The key the manifest names.
    pub key_id: String,
    /// The manifest exactly as signed.
    pub manifest: String,
    /// The signature, hex.
    pub signature: String,
    /// Where agents fetch the artifact file from instead of this
    /// coordinator, which then holds no payload (an `http(s)://` URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// The longest origin URL.
pub const MAX_ORIGIN_CHARS: usize = 2048;

/// Checks an origin URL and writes `s3://BUCKET/KEY` as the bucket's https
/// URL.
pub fn check_origin(text: &str) -> Result<String, ArtifactStoreError> {
    let quoted = || baton_common::text::prefix(text, 80).to_string();
    if text.len() > MAX_ORIGIN_CHARS {
        return Err(ArtifactStoreError::Invalid(format!(
            "the origin is {} characters, above the limit of {MAX_ORIGIN_CHARS}",
            text.len()
        )));
    }
    if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ArtifactStoreError::Invalid(format!(
            "the origin {:?} holds spaces or control characters",
            quoted()
        )));
    }
    let url = if let Some(rest) = text.strip_prefix("s3://") {
        let Some((bucket, key)) = rest.split_once('/').filter(|(b, k)| {
            !k.is_empty()
                && !b.is_empty()
                && b.len() <= 63
                && b.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        }) else {
            return Err(ArtifactStoreError::Invalid(format!(
                "the origin {:?} is not s3://BUCKET/KEY",
                quoted()
            )));
        };
        format!("https://{bucket}.s3.amazonaws.com/{key}")
    } else {
        text.to_owned()
    };
    let host = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .map(|rest| rest.split(['/', '?']).next().unwrap_or(""))
        .ok_or_else(|| {
            ArtifactStoreError::Invalid(format!(
                "the origin {:?} must start with http://, https:// or s3://",
                quoted()
            ))
        })?;
    if host.is_empty() || host.contains('@') {
        return Err(ArtifactStoreError::Invalid(format!(
            "the origin {:?} names no host (or carries credentials: use a presigned URL)",
            quoted()
        )));
    }
    Ok(url)
}

/// Where the payload starts in an artifact file with this manifest and
/// signature (see `baton_common::artifact`'s file format).
pub fn payload_offset(manifest_len: usize, signature_len: usize) -> u64 {
    (baton_common::artifact::MAGIC.len() + 4 + manifest_len + 4 + signature_len) as u64
}

/// Why an artifact operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactStoreError {
    /// The upload or request is wrong; nothing was stored.
    #[error("{0}")]
    Invalid(String),
    /// The same name and version exists with other content.
    #[error("{0}")]
    Conflict(String),
    /// No such payload.
    #[error("{0}")]
    NotFound(String),
    /// Disk trouble.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Payloads on disk plus manifests in the store.
#[derive(Clone)]
pub struct Artifacts {
    dir: PathBuf,
    store: Arc<dyn Store>,
    max_size: u64,
}

fn key(name: &str, version: &str) -> String {
    format!("artifacts/{name}/{version}")
}

/// Checks `sha256:<64 lowercase hex>` and returns the hex part.
pub fn digest_hex(digest: &str) -> Result<&str, ArtifactStoreError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or_else(|| {
            ArtifactStoreError::Invalid(format!(
                "digest {digest:?} is not of the form sha256:<64 lowercase hex digits>"
            ))
        })
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ArtifactStoreError {
    let what = what.into();
    move |source| ArtifactStoreError::Io { what, source }
}

/// An upload in progress: bytes go to a temporary file and into the hash.
pub struct Upload {
    artifacts: Artifacts,
    manifest: SignedManifest,
    file: std::fs::File,
    tmp: tempfile::TempPath,
    hash: digest::Context,
    /// The manifest's piece hashes, checked as the payload arrives.
    pieces: Option<PieceChecker>,
    received: u64,
}

impl Artifacts {
    /// Opens (creating) `<data_dir>/blobs`.
    pub fn open(
        data_dir: &Path,
        store: Arc<dyn Store>,
        max_size: u64,
    ) -> Result<Self, ArtifactStoreError> {
        let dir = data_dir.join("blobs");
        for d in [dir.join("sha256"), dir.join("tmp")] {
            std::fs::create_dir_all(&d).map_err(io(format!("cannot create {}", d.display())))?;
        }
        Ok(Self {
            dir,
            store,
            max_size,
        })
    }

    /// Where a payload lives.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, ArtifactStoreError> {
        Ok(self.dir.join("sha256").join(digest_hex(digest)?))
    }

    /// One artifact.
    pub async fn get(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<ArtifactRecord>, ArtifactStoreError> {
        let k = key(name, version);
        match self.store.get(&k).await? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(|e| {
                StoreError::Corrupt {
                    key: k,
                    reason: e.to_string(),
                }
                .into()
            }),
        }
    }

    /// Every artifact, by name then version.
    pub async fn list(&self) -> Result<Vec<ArtifactRecord>, ArtifactStoreError> {
        let mut out = Vec::new();
        for (k, v) in self.store.list("artifacts/").await? {
            out.push(serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                key: k,
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// Records an artifact whose payload agents fetch from `origin` (see
    /// [`check_origin`]): only the manifest is stored. Pushing the same
    /// again is not an error; another origin for a stored version is.
    pub async fn record_origin(
        &self,
        manifest: SignedManifest,
        origin: &str,
    ) -> Result<ArtifactRecord, ArtifactStoreError> {
        let origin = check_origin(origin)?;
        let m = &manifest.manifest;
        if !m.has_pieces() {
            return Err(ArtifactStoreError::Invalid(format!(
                "artifact {} {} lists no piece hashes, and agents check a payload from an origin piece by piece: pack it again with this baton",
                m.name, m.version
            )));
        }
        if m.size > self.max_size {
            return Err(ArtifactStoreError::Invalid(format!(
                "artifact {} {} is {} bytes, above this coordinator's limit of {} bytes",
                m.name, m.version, m.size, self.max_size
            )));
        }
        let record = ArtifactRecord {
            name: m.name.clone(),
            version: m.version.clone(),
            digest: format!("sha256:{}", m.payload_sha256),
            size: m.size,
            created: m.created.clone(),
            key_id: m.key_id.clone(),
            manifest: String::from_utf8_lossy(&manifest.bytes).into_owned(),
            signature: baton_common::hex::encode(&manifest.signature),
            origin: Some(origin),
        };
        if let Some(existing) = self.get(&m.name, &m.version).await? {
            if existing.digest != record.digest
                || existing.manifest != record.manifest
                || existing.origin != record.origin
            {
                return Err(ArtifactStoreError::Conflict(format!(
                    "artifact {} {} was already pushed with digest {}{}; a version is immutable, push a new version",
                    m.name,
                    m.version,
                    existing.digest,
                    match existing.origin.as_deref() {
                        Some(o) => format!(" at {}", baton_common::text::prefix(o, 80)),
                        None => " (its payload stored here)".to_owned(),
                    }
                )));
            }
            return Ok(existing);
        }
        let value = serde_json::to_vec(&record).map_err(|e| {
            ArtifactStoreError::Invalid(format!("cannot encode the artifact record: {e}"))
        })?;
        if !self
            .store
            .compare_and_swap(&key(&m.name, &m.version), None, value)
            .await?
        {
            return Err(ArtifactStoreError::Conflict(format!(
                "artifact {} {} was pushed concurrently; push it again to see which won",
                m.name, m.version
            )));
        }
        Ok(record)
    }

    /// The origin of the artifact with payload `digest`, and where its
    /// payload starts there; `None` when no stored artifact has one.
    pub async fn origin_of(
        &self,
        digest: &str,
    ) -> Result<Option<(String, u64)>, ArtifactStoreError> {
        Ok(self.list().await?.into_iter().find_map(|r| {
            let origin = r.origin.filter(|_| r.digest == digest)?;
            Some((
                origin,
                payload_offset(r.manifest.len(), r.signature.len() / 2),
            ))
        }))
    }

    /// Starts an upload of the artifact `manifest` describes.
    pub fn begin(&self, manifest: SignedManifest) -> Result<Upload, ArtifactStoreError> {
        if manifest.manifest.size > self.max_size {
            return Err(ArtifactStoreError::Invalid(format!(
                "artifact {} {} is {} bytes, above this coordinator's limit of {} bytes",
                manifest.manifest.name,
                manifest.manifest.version,
                manifest.manifest.size,
                self.max_size
            )));
        }
        let tmp = tempfile::NamedTempFile::new_in(self.dir.join("tmp"))
            .map_err(io("cannot create an upload file"))?;
        let (file, tmp) = tmp.into_parts();
        let pieces = PieceChecker::new(&manifest.manifest, 0);
        Ok(Upload {
            artifacts: self.clone(),
            manifest,
            file,
            tmp,
            pieces,
            hash: digest::Context::new(&digest::SHA256),
            received: 0,
        })
    }
}

impl Upload {
    /// Appends payload bytes.
    pub fn write(&mut self, data: &[u8]) -> Result<(), ArtifactStoreError> {
        self.received += data.len() as u64;
        if self.received > self.manifest.manifest.size {
            return Err(ArtifactStoreError::Invalid(format!(
                "the upload is longer than the {} bytes its manifest declares",
                self.manifest.manifest.size
            )));
        }
        self.hash.update(data);
        if let Some(pieces) = &mut self.pieces {
            // Agents check pieces against the manifest: an artifact whose
            // pieces do not match would fail on every host.
            pieces.feed(data).map_err(|e| {
                ArtifactStoreError::Invalid(format!("the payload does not match its manifest: {e}"))
            })?;
        }
        self.file
            .write_all(data)
            .map_err(io("cannot write the upload"))
    }

    /// Checks size and digest, moves the payload into place and records
    /// the manifest. Pushing the same artifact twice is not an error.
    pub async fn finish(self) -> Result<ArtifactRecord, ArtifactStoreError> {
        let m = &self.manifest.manifest;
        if self.received != m.size {
            return Err(ArtifactStoreError::Invalid(format!(
                "the upload ended after {} bytes, but the manifest declares {}",
                self.received, m.size
            )));
        }
        let got = baton_common::hex::encode(self.hash.finish().as_ref());
        if got != m.payload_sha256 {
            return Err(ArtifactStoreError::Invalid(format!(
                "the payload's digest is sha256:{got} but the manifest says sha256:{}",
                m.payload_sha256
            )));
        }
        let digest = format!("sha256:{got}");
        let record = ArtifactRecord {
            name: m.name.clone(),
            version: m.version.clone(),
            digest: digest.clone(),
            size: m.size,
            created: m.created.clone(),
            key_id: m.key_id.clone(),
            manifest: String::from_utf8_lossy(&self.manifest.bytes).into_owned(),
            signature: baton_common::hex::encode(&self.manifest.signature),
            origin: None,
        };
        if let Some(existing) = self.artifacts.get(&m.name, &m.version).await? {
            if existing.digest != record.digest || existing.manifest != record.manifest {
                return Err(ArtifactStoreError::Conflict(format!(
                    "artifact {} {} was already pushed with digest {}; a version is immutable, push a new version",
                    m.name, m.version, existing.digest
                )));
            }
            // Known, but its payload may be missing here (with several
            // coordinators: pushed to one that died before it was copied).
            let path = self.artifacts.blob_path(&digest)?;
            if !path.is_file() {
                persist(&self.file, self.tmp, &path)?;
            }
            return Ok(existing);
        }
        let path = self.artifacts.blob_path(&digest)?;
        persist(&self.file, self.tmp, &path)?;
        let value = serde_json::to_vec(&record).map_err(|e| {
            ArtifactStoreError::Invalid(format!("cannot encode the artifact record: {e}"))
        })?;
        // Only the first writer of a name and version wins; a concurrent
        // push of other content loses here rather than overwriting.
        let key = key(&m.name, &m.version);
        if !self
            .artifacts
            .store
            .compare_and_swap(&key, None, value)
            .await?
        {
            // Another push of this name and version won; its payload is
            // another file unless the content is the same.
            let won = self.artifacts.get(&m.name, &m.version).await?;
            if won.as_ref().is_none_or(|w| w.digest != digest) {
                let _ = std::fs::remove_file(&path);
            }
            return Err(ArtifactStoreError::Conflict(format!(
                "artifact {} {} was pushed concurrently; push it again to see which won",
                m.name, m.version
            )));
        }
        Ok(record)
    }
}

/// A payload being copied from another coordinator (see
/// [`Artifacts::copy_blob`]).
pub struct BlobCopy {
    path: PathBuf,
    file: std::fs::File,
    tmp: tempfile::TempPath,
    hash: digest::Context,
    expected: String,
}

impl Artifacts {
    /// Whether the payload is stored here.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|p| p.is_file())
    }

    /// Starts storing the payload `digest` from another coordinator; it
    /// appears only once [`BlobCopy::finish`] has checked its digest.
    pub fn copy_blob(&self, digest: &str) -> Result<BlobCopy, ArtifactStoreError> {
        let path = self.blob_path(digest)?;
        let tmp = tempfile::NamedTempFile::new_in(self.dir.join("tmp"))
            .map_err(io("cannot create a copy file"))?;
        let (file, tmp) = tmp.into_parts();
        Ok(BlobCopy {
            path,
            file,
            tmp,
            hash: digest::Context::new(&digest::SHA256),
            expected: digest_hex(digest)?.to_owned(),
        })
    }
}

impl BlobCopy {
    /// Appends bytes.
    pub fn write(&mut self, data: &[u8]) -> Result<(), ArtifactStoreError> {
        self.hash.update(data);
        self.file
            .write_all(data)
            .map_err(io("cannot write the copy"))
    }

    /// Checks the digest and moves the payload into place.
    pub fn finish(self) -> Result<(), ArtifactStoreError> {
        let got = baton_common::hex::encode(self.hash.finish().as_ref());
        if got != self.expected {
            return Err(ArtifactStoreError::Invalid(format!(
                "the copied payload's digest is sha256:{got}, not sha256:{}",
                self.expected
            )));
        }
        persist(&self.file, self.tmp, &self.path)
    }
}

/// Moves a complete, synced payload file into place at `path`, durably.
fn persist(
    file: &std::fs::File,
    tmp: tempfile::TempPath,
    path: &Path,
) -> Result<(), ArtifactStoreError> {
    file.sync_all().map_err(io("cannot sync the payload"))?;
    tmp.persist(path).map_err(|e| ArtifactStoreError::Io {
        what: format!("cannot move the payload to {}", path.display()),
        source: e.error,
    })?;
    let dir = path.parent().unwrap_or(path);
    baton_common::artifact::fsync_dir(dir).map_err(io("cannot sync the blob directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_http_urls_and_s3_is_written_as_its_https_url() {
        assert_eq!(
            check_origin("https://releases.example/api.baton").unwrap(),
            "https://releases.example/api.baton"
        );
        assert_eq!(
            check_origin("s3://my-releases/api/2.0.0.baton").unwrap(),
            "https://my-releases.s3.amazonaws.com/api/2.0.0.baton"
        );
        for (bad, why) in [
            ("ftp://x/y", "must start with"),
            ("http:///y", "names no host"),
            ("https://user:pw@host/y", "credentials"),
            ("s3://bucket", "is not s3://BUCKET/KEY"),
            ("s3://Upper/k", "is not s3://BUCKET/KEY"),
            ("https://host/a b", "spaces or control"),
            ("https://host/\0", "spaces or control"),
        ] {
            let err = check_origin(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let long = format!("https://h/{}", "a".repeat(MAX_ORIGIN_CHARS));
        assert!(
            check_origin(&long)
                .unwrap_err()
                .to_string()
                .contains("above the limit")
        );
        // The payload starts after the magic, two lengths, the manifest
        // and the signature.
        assert_eq!(payload_offset(100, 64), 10 + 4 + 100 + 4 + 64);
    }
}
