//! Signed release artifacts: one compressed, signed release of one service,
//! and everything needed to make, check and safely unpack it.
//!
//! # File format
//!
//! ```text
//! MAGIC                 b"BATONART1\n"
//! u32 big-endian        manifest length (at most 64 KiB)
//! manifest              JSON, exactly the bytes that were signed
//! u32 big-endian        signature length (at most 1 KiB; 0 = unsigned)
//! signature             Ed25519 over the manifest bytes
//! payload               a zstd-compressed tar, to the end of the file
//! ```
//!
//! The [`Manifest`] names the service and version and commits to the payload
//! by its SHA-256 digest and length, so the signature over the manifest
//! covers every byte of the artifact. Keys are plain one-line text files:
//! `baton-ed25519-secret <hex PKCS#8>` and `baton-ed25519-public <hex>`.
//!
//! # Threat model
//!
//! Only the holder of a trusted signing key can make an artifact that is
//! accepted; the artifact store, the coordinator and the network in between
//! are not trusted. A consumer therefore checks, in this order:
//! [`open_artifact`] (framing and limits), [`SignedManifest::verify`]
//! (signature by a trusted key), then the whole payload through a
//! [`PayloadHasher`], and only then calls [`unpack`].
//!
//! [`unpack`] is hardened anyway, as defence in depth against a leaked key or
//! a careless release: the decompressor and tar parser are attack surface,
//! and a tar can say anything. It refuses absolute paths, `..`, hard links,
//! devices, fifos, set-uid/set-gid files and symlinks that could lead out of
//! the destination; it never writes through a symlink; and it bounds the
//! number of entries and bytes. A failed unpack leaves nothing behind.
//!
//! Symlink targets must be relative and *normalized*: `..` may appear only
//! at the start of the target. That makes the lexical check sound even when
//! a target passes through another symlink (`x -> s/..` with `s -> .`
//! resolves outside the destination although it looks harmless lexically).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use ring::digest;
use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// The first bytes of every artifact file.
pub const MAGIC: &[u8] = b"BATONART1\n";

/// The largest manifest an artifact may carry.
pub const MAX_MANIFEST_BYTES: u32 = 64 * 1024;

/// The largest signature an artifact may carry (Ed25519 needs 64 bytes).
pub const MAX_SIGNATURE_BYTES: u32 = 1024;

/// The zstd level `pack` compresses with.
const ZSTD_LEVEL: i32 = 3;

/// The first word of a secret key file.
const SECRET_TAG: &str = "baton-ed25519-secret";

/// The first word of a public key file.
const PUBLIC_TAG: &str = "baton-ed25519-public";

/// Key files are one short line; reading more would only waste memory.
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

/// How many decompressed bytes each tar entry may take beyond its file
/// data: its header, GNU long-name and long-link records of a few KiB, and
/// padding. It bounds the decompressed stream so that a zstd bomb hidden in
/// a long-name record cannot exhaust memory.
const TAR_OVERHEAD_PER_ENTRY: u64 = 16 * 1024;

/// The size of the copy buffer while unpacking.
const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// Making, reading, verifying or unpacking an artifact failed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// A file or directory could not be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("open", "write", ...).
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// `keygen` found a key file already in place.
    #[error("{} already exists; refusing to overwrite a key file", path.display())]
    KeyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// The system random generator or the key encoder failed.
    #[error("cannot generate an Ed25519 key pair: {reason}")]
    KeyGeneration {
        /// What failed.
        reason: String,
    },
    /// A key file is garbled or holds the wrong kind of key.
    #[error("{} is not a Baton {kind} key: {reason}", path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// `"secret"` or `"public"`.
        kind: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A service name or version does not follow the syntax rules.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// `"service name"` or `"version"`.
        what: &'static str,
        /// The offending value, shortened if long.
        value: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// The manifest is not valid JSON or breaks a field rule.
    #[error("malformed artifact manifest: {reason}")]
    BadManifest {
        /// What is wrong with it.
        reason: String,
    },
    /// A manifest or signature is above the format's limit.
    #[error("the {what} is {len} bytes, above the limit of {limit}")]
    TooLarge {
        /// `"manifest"` or `"signature"`.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        limit: u32,
    },
    /// An artifact file is not framed correctly.
    #[error("{} is not a valid Baton artifact: {reason}", path.display())]
    BadArtifact {
        /// The artifact file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The artifact carries no signature.
    #[error("artifact {name} {version} is not signed")]
    Unsigned {
        /// The service name.
        name: String,
        /// The version.
        version: String,
    },
    /// No trusted key verifies the signature, and the manifest names a key
    /// that is not trusted.
    #[error(
        "artifact {name} {version} is signed by key {key_id}, which is not among the {trusted} trusted keys"
    )]
    UntrustedKey {
        /// The service name.
        name: String,
        /// The version.
        version: String,
        /// The key id the manifest claims.
        key_id: String,
        /// How many keys are trusted.
        trusted: usize,
    },
    /// The manifest names a trusted key but the signature does not verify:
    /// the manifest or the signature was altered.
    #[error(
        "artifact {name} {version} names trusted key {key_id}, but its signature does not verify (the manifest or signature was altered)"
    )]
    BadSignature {
        /// The service name.
        name: String,
        /// The version.
        version: String,
        /// The key id the manifest claims.
        key_id: String,
    },
    /// A [`SignedManifest`]'s parsed fields differ from its signed bytes.
    #[error(
        "artifact {name} {version}: the manifest fields do not match the signed manifest bytes"
    )]
    ManifestMismatch {
        /// The service name.
        name: String,
        /// The version.
        version: String,
    },
    /// The payload length differs from the manifest's.
    #[error("payload is {actual} bytes but the manifest says {expected}")]
    SizeMismatch {
        /// The bytes seen.
        actual: u64,
        /// The manifest's `size`.
        expected: u64,
    },
    /// The payload digest differs from the manifest's.
    #[error("payload digest is sha256:{actual} but the manifest says sha256:{expected}")]
    DigestMismatch {
        /// The digest of the bytes seen.
        actual: String,
        /// The manifest's `payload_sha256`.
        expected: String,
    },
    /// The directory to pack is not a service directory.
    #[error("{} has no regular file service.toml at its top; it is not a service directory", dir.display())]
    NoServiceToml {
        /// The directory.
        dir: PathBuf,
    },
    /// The directory to pack as an agent holds no agent binary.
    #[error("{} has no executable regular file baton-agent at its top; it is not an agent release", dir.display())]
    NoAgentBinary {
        /// The directory.
        dir: PathBuf,
    },
    /// The artifact would be written inside the directory being packed.
    #[error("cannot write the artifact {} inside the directory being packed, {}", out.display(), dir.display())]
    OutputInsideDir {
        /// The artifact path.
        out: PathBuf,
        /// The directory.
        dir: PathBuf,
    },
    /// An output path names no file (`/`, `..`).
    #[error("{} does not name a file", path.display())]
    NotAFileName {
        /// The path.
        path: PathBuf,
    },
    /// The directory to pack holds a fifo, socket or device.
    #[error("cannot pack {}: it is a {kind}; only regular files, directories and symlinks can be packed", path.display())]
    SpecialFile {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The directory to pack holds a symlink `unpack` would refuse.
    #[error("cannot pack symlink {}: {reason}", path.display())]
    BadSymlink {
        /// The symlink.
        path: PathBuf,
        /// What is wrong with its target.
        reason: String,
    },
    /// `unpack`'s destination already exists.
    #[error("{} already exists; unpack needs a fresh destination", path.display())]
    DestExists {
        /// The destination.
        path: PathBuf,
    },
    /// The payload could not be decompressed or parsed as tar.
    #[error("cannot read the artifact payload: {source}")]
    Payload {
        /// The decompression, tar or read error.
        source: io::Error,
    },
    /// A tar entry is unsafe or unsupported.
    #[error("refusing to unpack entry {entry:?}: {reason}")]
    UnsafeEntry {
        /// The entry's path as written in the tar.
        entry: String,
        /// Why it is refused.
        reason: String,
    },
    /// The payload has more entries than allowed.
    #[error("the payload has more than {limit} entries, the limit")]
    TooManyEntries {
        /// The limit.
        limit: u64,
    },
    /// The payload's files add up to more bytes than allowed.
    #[error("entry {entry:?} takes the unpacked files past {limit} bytes, the limit")]
    TooManyBytes {
        /// The entry that crossed the limit.
        entry: String,
        /// The limit.
        limit: u64,
    },
}

/// Returns a closure that wraps an I/O error with what was being done to
/// which path.
fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> ArtifactError + 'a {
    move |source| ArtifactError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

// ---------------------------------------------------------------------------
// Hex and digests
// ---------------------------------------------------------------------------

pub use crate::hex::sha256_hex;

use crate::text::shorten;

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// An Ed25519 secret key that signs artifact manifests.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        // An Ed25519 public key is always 32 bytes, so this cannot panic.
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey { bytes }
    }

    /// Signs `message`; the signature is 64 bytes.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
}

impl std::fmt::Debug for SigningKey {
    // Never print secret material; the key id is enough to tell keys apart.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.public_key().key_id())
            .finish_non_exhaustive()
    }
}

/// An Ed25519 public key trusted to sign artifacts.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicKey {
    bytes: [u8; 32],
}

impl PublicKey {
    /// The key's short name: the first 16 hex digits of the SHA-256 of the
    /// raw key. Manifests carry it so that errors can say which key signed.
    pub fn key_id(&self) -> String {
        let mut id = sha256_hex(&self.bytes);
        id.truncate(16);
        id
    }

    /// The raw 32-byte key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

/// `prefix` with `suffix` appended to its last component (`release.v2` +
/// `.key` is `release.v2.key`, which `with_extension` would get wrong).
fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut path = prefix.as_os_str().to_owned();
    path.push(suffix);
    PathBuf::from(path)
}

/// Writes a new file with `mode`, never replacing one, and syncs it.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), ArtifactError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => ArtifactError::KeyExists {
                path: path.to_owned(),
            },
            _ => io_err("create", path)(e),
        })?;
    file.write_all(contents).map_err(io_err("write", path))?;
    file.sync_all().map_err(io_err("sync", path))
}

/// Generates a key pair and writes `PREFIX.key` (mode 0600) and
/// `PREFIX.pub`. Refuses if either file exists. Returns both paths,
/// secret first.
pub fn keygen(prefix: &Path) -> Result<(PathBuf, PathBuf), ArtifactError> {
    let key_path = with_suffix(prefix, ".key");
    let pub_path = with_suffix(prefix, ".pub");
    for path in [&key_path, &pub_path] {
        if fs::symlink_metadata(path).is_ok() {
            return Err(ArtifactError::KeyExists { path: path.clone() });
        }
    }
    let rng = SystemRandom::new();
    let document =
        Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| ArtifactError::KeyGeneration {
            reason: e.to_string(),
        })?;
    let pair = Ed25519KeyPair::from_pkcs8(document.as_ref()).map_err(|e| {
        ArtifactError::KeyGeneration {
            reason: e.to_string(),
        }
    })?;
    let secret_line = format!("{SECRET_TAG} {}\n", crate::hex::encode(document.as_ref()));
    let public_line = format!(
        "{PUBLIC_TAG} {}\n",
        crate::hex::encode(pair.public_key().as_ref())
    );
    write_new_file(&key_path, secret_line.as_bytes(), 0o600)?;
    if let Err(e) = write_new_file(&pub_path, public_line.as_bytes(), 0o644) {
        // Do not leave a secret key behind without its public half.
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    fsync_dir(parent_dir(&key_path)).map_err(io_err("sync", parent_dir(&key_path)))?;
    Ok((key_path, pub_path))
}

/// Reads a one-line key file and returns its tag and decoded key bytes.
fn read_key_file(path: &Path, kind: &'static str) -> Result<(String, Vec<u8>), ArtifactError> {
    let bad = |reason: String| ArtifactError::BadKey {
        path: path.to_owned(),
        kind,
        reason,
    };
    let file = File::open(path).map_err(io_err("open", path))?;
    let mut text = String::new();
    file.take(MAX_KEY_FILE_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => bad("it is not text".to_owned()),
            _ => io_err("read", path)(e),
        })?;
    let line = text.trim();
    if line.contains('\n') {
        return Err(bad("it has more than one line".to_owned()));
    }
    let Some((tag, hex)) = line.split_once(' ') else {
        return Err(bad(format!(
            "expected one line `baton-ed25519-{kind} <hex>`"
        )));
    };
    let Some(bytes) = crate::hex::decode(hex.trim()) else {
        return Err(bad("the key is not valid hex".to_owned()));
    };
    Ok((tag.to_owned(), bytes))
}

/// Explains a key file's tag that is not `expected`.
fn wrong_tag(tag: &str, expected: &str) -> String {
    match tag {
        SECRET_TAG => "it holds a secret key; use the .pub file".to_owned(),
        PUBLIC_TAG => "it holds a public key; use the .key file".to_owned(),
        _ => format!("it starts with {:?}, not {expected:?}", shorten(tag)),
    }
}

/// Reads a secret key written by [`keygen`].
pub fn read_signing_key(path: &Path) -> Result<SigningKey, ArtifactError> {
    let (tag, bytes) = read_key_file(path, "secret")?;
    let bad = |reason: String| ArtifactError::BadKey {
        path: path.to_owned(),
        kind: "secret",
        reason,
    };
    if tag != SECRET_TAG {
        return Err(bad(wrong_tag(&tag, SECRET_TAG)));
    }
    let pair = Ed25519KeyPair::from_pkcs8(&bytes)
        .map_err(|e| bad(format!("its PKCS#8 document is invalid: {e}")))?;
    Ok(SigningKey { pair })
}

/// Reads a public key written by [`keygen`].
pub fn read_public_key(path: &Path) -> Result<PublicKey, ArtifactError> {
    let (tag, bytes) = read_key_file(path, "public")?;
    let bad = |reason: String| ArtifactError::BadKey {
        path: path.to_owned(),
        kind: "public",
        reason,
    };
    if tag != PUBLIC_TAG {
        return Err(bad(wrong_tag(&tag, PUBLIC_TAG)));
    }
    let bytes = <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| bad(format!("the key is {} bytes, not 32", bytes.len())))?;
    Ok(PublicKey { bytes })
}

// ---------------------------------------------------------------------------
// Manifest
// ---------------------------------------------------------------------------

pub use crate::names::AGENT_NAME;

/// What an artifact delivers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// A service release: `service.toml` and its files.
    #[default]
    Service,
    /// A release of `baton-agent` itself: the binary `baton-agent` at the
    /// top, which agents re-execute into (see the agent's `selfupgrade`).
    Agent,
}

impl ArtifactKind {
    /// `"service"` or `"agent"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Agent => "agent",
        }
    }

    fn is_service(&self) -> bool {
        *self == Self::Service
    }
}

impl std::str::FromStr for ArtifactKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "service" => Ok(Self::Service),
            "agent" => Ok(Self::Agent),
            _ => Err(format!("unknown artifact kind {s:?} (service | agent)")),
        }
    }
}

/// What an artifact holds, signed by its maker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The service name (see [`validate_name`]); [`AGENT_NAME`] for an
    /// agent artifact.
    pub name: String,
    /// What the artifact delivers; absent means a service (so manifests
    /// signed before kinds existed keep their meaning and bytes).
    #[serde(default, skip_serializing_if = "ArtifactKind::is_service")]
    pub kind: ArtifactKind,
    /// The release version (see [`validate_version`]).
    pub version: String,
    /// Lowercase hex SHA-256 of the payload exactly as stored (compressed).
    pub payload_sha256: String,
    /// The payload's length in bytes, as stored (compressed).
    pub size: u64,
    /// When the artifact was packed, RFC 3339 in UTC.
    pub created: String,
    /// The [`PublicKey::key_id`] of the signing key; empty if unsigned.
    pub key_id: String,
    /// After this instant (RFC 3339, UTC) agents refuse to stage the
    /// artifact, so a coordinator cannot serve a stale one forever (the
    /// freeze attack). Absent only in manifests signed before expiry
    /// existed, which agents refuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

/// How long a packed artifact stays valid unless told otherwise.
pub const DEFAULT_EXPIRY: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// The longest an artifact may be valid (`baton artifact pack --expires-in`).
pub const MAX_EXPIRY: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 24 * 3600);

impl Manifest {
    /// When the manifest expires; `None` when it carries no expiry.
    pub fn expires_at(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339(self.expires.as_deref()?).ok()
    }

    /// Whether agents may stage it at `now`: `Err` says why not.
    pub fn check_fresh(&self, now: SystemTime) -> Result<(), String> {
        match (&self.expires, self.expires_at()) {
            (None, _) => {
                Err("its manifest carries no expiry (pack it again with this baton)".into())
            }
            (Some(text), Some(at)) if at <= now => Err(format!(
                "its manifest expired at {text} (sign a fresh one with baton artifact pack)"
            )),
            (Some(_), Some(_)) => Ok(()),
            (Some(text), None) => Err(format!("its manifest's expiry {text:?} is not a time")),
        }
    }
}

impl Manifest {
    /// Checks the field rules [`SignedManifest::parse`] enforces.
    fn validate(&self) -> Result<(), ArtifactError> {
        validate_name(&self.name)?;
        validate_version(&self.version)?;
        check_kind(&self.name, self.kind)?;
        if let Some(text) = &self.expires
            && self.expires_at().is_none()
        {
            return Err(ArtifactError::BadManifest {
                reason: format!("expires {:?} is not an RFC 3339 time", shorten(text)),
            });
        }
        if !crate::hex::is_lower(&self.payload_sha256, 64) {
            return Err(ArtifactError::BadManifest {
                reason: format!(
                    "payload_sha256 {:?} is not 64 lowercase hex digits",
                    shorten(&self.payload_sha256)
                ),
            });
        }
        if !self.key_id.is_empty() && !crate::hex::is_lower(&self.key_id, 16) {
            return Err(ArtifactError::BadManifest {
                reason: format!(
                    "key_id {:?} is not 16 lowercase hex digits",
                    shorten(&self.key_id)
                ),
            });
        }
        Ok(())
    }
}

/// A manifest together with the exact bytes that were signed and the
/// signature. The bytes, not a re-serialization, are what is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest {
    /// The parsed manifest.
    pub manifest: Manifest,
    /// The exact JSON bytes that were signed.
    pub bytes: Vec<u8>,
    /// The Ed25519 signature over `bytes`; empty if unsigned.
    pub signature: Vec<u8>,
}

impl SignedManifest {
    /// Serializes `manifest` and signs it with `key`. The manifest is taken
    /// as given: its `key_id` should be `key.public_key().key_id()`.
    pub fn sign(manifest: Manifest, key: &SigningKey) -> Result<Self, ArtifactError> {
        manifest.validate()?;
        let bytes =
            serde_json::to_vec_pretty(&manifest).map_err(|e| ArtifactError::BadManifest {
                reason: e.to_string(),
            })?;
        let signature = key.sign(&bytes);
        Ok(Self {
            manifest,
            bytes,
            signature,
        })
    }

    /// Parses manifest bytes and checks its fields (name and version syntax,
    /// digest format). Does not check the signature; see [`Self::verify`].
    pub fn parse(bytes: Vec<u8>, signature: Vec<u8>) -> Result<Self, ArtifactError> {
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| ArtifactError::BadManifest {
                reason: e.to_string(),
            })?;
        manifest.validate()?;
        Ok(Self {
            manifest,
            bytes,
            signature,
        })
    }

    /// Checks that the signature over `bytes` verifies against at least one
    /// of the `trusted` keys, and that `manifest` is what `bytes` say.
    pub fn verify(&self, trusted: &[PublicKey]) -> Result<(), ArtifactError> {
        let name = || self.manifest.name.clone();
        let version = || self.manifest.version.clone();
        if self.signature.is_empty() {
            return Err(ArtifactError::Unsigned {
                name: name(),
                version: version(),
            });
        }
        // The fields are public, so a caller could have edited `manifest`
        // after parsing; the signature only vouches for `bytes`.
        let signed: Option<Manifest> = serde_json::from_slice(&self.bytes).ok();
        if signed.as_ref() != Some(&self.manifest) {
            return Err(ArtifactError::ManifestMismatch {
                name: name(),
                version: version(),
            });
        }
        let verifies = trusted.iter().any(|key| {
            UnparsedPublicKey::new(&signature::ED25519, key.as_bytes())
                .verify(&self.bytes, &self.signature)
                .is_ok()
        });
        if verifies {
            return Ok(());
        }
        let key_id = self.manifest.key_id.clone();
        if trusted.iter().any(|key| key.key_id() == key_id) {
            Err(ArtifactError::BadSignature {
                name: name(),
                version: version(),
                key_id,
            })
        } else {
            Err(ArtifactError::UntrustedKey {
                name: name(),
                version: version(),
                key_id,
                trusted: trusted.len(),
            })
        }
    }
}

/// Checks a name-like token against [`crate::names`]'s grammar (plus
/// `extra`).
fn validate_token(
    what: &'static str,
    value: &str,
    extra: Option<char>,
) -> Result<(), ArtifactError> {
    crate::names::check(value, extra).map_err(|reason| ArtifactError::InvalidName {
        what,
        value: shorten(value),
        reason,
    })
}

/// Checks a service name: 1–128 characters from `[A-Za-z0-9._-]`, starting
/// with a letter or digit (so never `.` or `..`). Names become directory
/// names on hosts, hence the strict syntax.
pub fn validate_name(name: &str) -> Result<(), ArtifactError> {
    validate_token("service name", name, None)
}

/// Checks a version: see [`crate::version::check`].
pub fn validate_version(version: &str) -> Result<(), ArtifactError> {
    crate::version::check(version).map_err(|reason| ArtifactError::InvalidName {
        what: "version",
        value: shorten(version),
        reason,
    })
}

// ---------------------------------------------------------------------------
// File format
// ---------------------------------------------------------------------------

/// The directory holding `path`; `.` for a bare file name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// A temporary file beside its final path, removed on drop unless
/// persisted. Renaming within one directory makes the final write atomic.
struct TempFile {
    path: PathBuf,
    file: File,
    persisted: bool,
}

impl TempFile {
    /// Creates `.NAME.PID.RANDOM.tmp` in the directory of `target`.
    fn beside(target: &Path) -> Result<Self, ArtifactError> {
        let file_name = target
            .file_name()
            .ok_or_else(|| ArtifactError::NotAFileName {
                path: target.to_owned(),
            })?;
        let mut name = OsString::from(".");
        name.push(file_name);
        name.push(format!(
            ".{}.{:016x}.tmp",
            std::process::id(),
            fastrand::u64(..)
        ));
        let path = parent_dir(target).join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(io_err("create", &path))?;
        Ok(Self {
            path,
            file,
            persisted: false,
        })
    }

    /// Syncs the file, renames it to `target` and syncs the directory.
    fn persist(&mut self, target: &Path) -> Result<(), ArtifactError> {
        self.file.sync_all().map_err(io_err("sync", &self.path))?;
        fs::rename(&self.path, target).map_err(io_err("rename into place", target))?;
        self.persisted = true;
        let dir = parent_dir(target);
        fsync_dir(dir).map_err(io_err("sync", dir))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            // Best effort: the error that got us here matters more.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Checks a header field's length against its limit and returns it as u32.
fn header_len(what: &'static str, len: usize, limit: u32) -> Result<u32, ArtifactError> {
    u32::try_from(len)
        .ok()
        .filter(|l| *l <= limit)
        .ok_or(ArtifactError::TooLarge { what, len, limit })
}

/// Writes an artifact file atomically: a temporary file in the same
/// directory, synced, then renamed over `out`. The payload is copied as is
/// and not checked against the manifest, so tests can craft bad artifacts.
pub fn write_artifact(
    out: &Path,
    manifest: &SignedManifest,
    payload: &mut impl Read,
) -> Result<(), ArtifactError> {
    let manifest_len = header_len("manifest", manifest.bytes.len(), MAX_MANIFEST_BYTES)?;
    let signature_len = header_len("signature", manifest.signature.len(), MAX_SIGNATURE_BYTES)?;
    let mut tmp = TempFile::beside(out)?;
    {
        let mut w = BufWriter::new(&tmp.file);
        let mut write = |w: &mut BufWriter<&File>| -> io::Result<()> {
            w.write_all(MAGIC)?;
            w.write_all(&manifest_len.to_be_bytes())?;
            w.write_all(&manifest.bytes)?;
            w.write_all(&signature_len.to_be_bytes())?;
            w.write_all(&manifest.signature)?;
            io::copy(payload, w)?;
            w.flush()
        };
        write(&mut w).map_err(io_err("write", &tmp.path))?;
    }
    tmp.persist(out)
}

/// Opens an artifact and reads its header. Returns the manifest (not yet
/// verified: call [`SignedManifest::verify`]) and the file positioned at
/// the start of the payload, whose length has been checked against the
/// manifest's `size`.
pub fn open_artifact(path: &Path) -> Result<(SignedManifest, File), ArtifactError> {
    let bad = |reason: String| ArtifactError::BadArtifact {
        path: path.to_owned(),
        reason,
    };
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let mut read_exact = |buf: &mut [u8], what: &str| {
        file.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => bad(format!("the file ends inside the {what}")),
            _ => io_err("read", path)(e),
        })
    };

    let mut magic = [0u8; MAGIC.len()];
    read_exact(&mut magic, "magic")?;
    if magic != MAGIC {
        return Err(bad(
            "it does not start with the Baton artifact magic".to_owned()
        ));
    }
    let mut read_field = |what: &'static str, limit: u32| -> Result<Vec<u8>, ArtifactError> {
        let mut len = [0u8; 4];
        read_exact(&mut len, what)?;
        let len = u32::from_be_bytes(len);
        if len > limit {
            return Err(bad(format!(
                "its {what} is {len} bytes, above the limit of {limit}"
            )));
        }
        // A u32 always fits in usize on the platforms Baton supports.
        let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
        read_exact(&mut bytes, what)?;
        Ok(bytes)
    };
    let manifest_bytes = read_field("manifest", MAX_MANIFEST_BYTES)?;
    let signature = read_field("signature", MAX_SIGNATURE_BYTES)?;
    let signed =
        SignedManifest::parse(manifest_bytes, signature).map_err(|e| bad(e.to_string()))?;

    let start = file.stream_position().map_err(io_err("seek in", path))?;
    let len = file.metadata().map_err(io_err("inspect", path))?.len();
    let payload = len.saturating_sub(start);
    if payload != signed.manifest.size {
        return Err(bad(format!(
            "its payload is {payload} bytes but the manifest says {} (truncated or padded?)",
            signed.manifest.size
        )));
    }
    Ok((signed, file))
}

// ---------------------------------------------------------------------------
// Streaming verification
// ---------------------------------------------------------------------------

/// Hashes a payload as it streams past and checks it against the manifest.
#[derive(Clone)]
pub struct PayloadHasher {
    context: digest::Context,
    bytes: u64,
}

impl PayloadHasher {
    /// A hasher that has seen nothing.
    pub fn new() -> Self {
        Self {
            context: digest::Context::new(&digest::SHA256),
            bytes: 0,
        }
    }

    /// Feeds the next payload bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.context.update(data);
        self.bytes = self.bytes.saturating_add(data.len() as u64);
    }

    /// How many bytes were fed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The lowercase hex digest of everything fed.
    fn hex_digest(self) -> String {
        crate::hex::encode(self.context.finish().as_ref())
    }

    /// Checks the length and digest of everything fed against `manifest`.
    pub fn finish(self, manifest: &Manifest) -> Result<(), ArtifactError> {
        if self.bytes != manifest.size {
            return Err(ArtifactError::SizeMismatch {
                actual: self.bytes,
                expected: manifest.size,
            });
        }
        let actual = self.hex_digest();
        if actual != manifest.payload_sha256 {
            return Err(ArtifactError::DigestMismatch {
                actual,
                expected: manifest.payload_sha256.clone(),
            });
        }
        Ok(())
    }
}

impl Default for PayloadHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for PayloadHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadHasher")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

/// A writer that hashes everything written through it, so `pack` digests
/// the compressed payload in the same pass that writes it.
struct HashingWriter<W> {
    inner: W,
    hasher: PayloadHasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

pub use crate::version::{is_downgrade, order as version_order};

mod pack;
use pack::{check_kind, check_link_target};
pub use pack::{pack, pack_kind};

mod unpack;
pub use unpack::{UnpackLimits, UnpackStats, fsync_dir, unpack};

#[cfg(test)]
mod tests;
