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

/// The longest service name or version.
const MAX_TOKEN_CHARS: usize = 128;

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

/// Lowercase hex of `bytes`.
fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Decodes hex (either case); `None` if it is not hex.
fn from_hex(text: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes()
        .chunks_exact(2)
        .map(|pair| Some((nibble(pair[0])? << 4) | nibble(pair[1])?))
        .collect()
}

/// Whether `text` is exactly `len` lowercase hex digits.
fn is_lower_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    to_hex(digest::digest(&digest::SHA256, data).as_ref())
}

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
    let secret_line = format!("{SECRET_TAG} {}\n", to_hex(document.as_ref()));
    let public_line = format!("{PUBLIC_TAG} {}\n", to_hex(pair.public_key().as_ref()));
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
    let Some(bytes) = from_hex(hex.trim()) else {
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

/// The name every agent artifact carries, and no service may.
pub const AGENT_NAME: &str = "baton-agent";

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
        if !is_lower_hex(&self.payload_sha256, 64) {
            return Err(ArtifactError::BadManifest {
                reason: format!(
                    "payload_sha256 {:?} is not 64 lowercase hex digits",
                    shorten(&self.payload_sha256)
                ),
            });
        }
        if !self.key_id.is_empty() && !is_lower_hex(&self.key_id, 16) {
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

/// Checks a name-like token: 1–128 characters from `[A-Za-z0-9._-]` (plus
/// `extra`), starting with a letter or digit.
fn validate_token(
    what: &'static str,
    value: &str,
    extra: Option<char>,
) -> Result<(), ArtifactError> {
    let err = |reason: String| ArtifactError::InvalidName {
        what,
        value: shorten(value),
        reason,
    };
    let Some(first) = value.chars().next() else {
        return Err(err("it is empty".to_owned()));
    };
    if value.len() > MAX_TOKEN_CHARS {
        return Err(err(format!(
            "it is longer than {MAX_TOKEN_CHARS} characters"
        )));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(err("it must start with a letter or digit".to_owned()));
    }
    let allowed =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || Some(c) == extra;
    if let Some(c) = value.chars().find(|c| !allowed(*c)) {
        let plus = if extra.is_some() { ", '+'" } else { "" };
        return Err(err(format!(
            "it contains {c:?}; only letters, digits, '.', '_', '-'{plus} are allowed"
        )));
    }
    Ok(())
}

/// Checks a service name: 1–128 characters from `[A-Za-z0-9._-]`, starting
/// with a letter or digit (so never `.` or `..`). Names become directory
/// names on hosts, hence the strict syntax.
pub fn validate_name(name: &str) -> Result<(), ArtifactError> {
    validate_token("service name", name, None)
}

/// Checks a version: a semantic version (`1.2.0`, `2.0.0-rc.1`,
/// `1.2.0+build.7`) of at most 128 characters, every number fitting in 64
/// bits. One grammar for `pack`, `push`, plans and the agent, so that any
/// two versions have an order and a downgrade is always seen.
pub fn validate_version(version: &str) -> Result<(), ArtifactError> {
    validate_token("version", version, Some('+'))?;
    semver::Version::parse(version)
        .map(|_| ())
        .map_err(|e| ArtifactError::InvalidName {
            what: "version",
            value: shorten(version),
            reason: format!(
                "it is not a semantic version like 1.4.0 or 2.0.0-rc.1 ({e}; every number must fit in 64 bits)"
            ),
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
        to_hex(self.context.finish().as_ref())
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

// ---------------------------------------------------------------------------
// Pack
// ---------------------------------------------------------------------------

/// Checks a symlink target against the rules `unpack` enforces. `depth` is
/// the number of directories between the destination and the link.
fn check_link_target(target: &[u8], depth: usize) -> Result<(), String> {
    let shown = || shorten(&String::from_utf8_lossy(target));
    if target.is_empty() {
        return Err("its target is empty".to_owned());
    }
    if target.starts_with(b"/") {
        return Err(format!("its target {:?} is absolute", shown()));
    }
    let mut ups = 0usize;
    let mut seen_normal = false;
    for part in target.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." if seen_normal => {
                return Err(format!(
                    "its target {:?} has `..` after a name; only leading `..` are allowed",
                    shown()
                ));
            }
            b".." => ups += 1,
            _ => seen_normal = true,
        }
    }
    if ups > depth {
        return Err(format!(
            "its target {:?} points outside the artifact",
            shown()
        ));
    }
    Ok(())
}

/// A reader that yields exactly `remaining` bytes or fails, so a file that
/// shrinks while being packed cannot desynchronise the tar stream.
struct ExactReader<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let max = usize::try_from(self.remaining).map_or(buf.len(), |r| r.min(buf.len()));
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being packed",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Names a special file type for an error message.
fn special_kind(file_type: fs::FileType) -> &'static str {
    if file_type.is_fifo() {
        "fifo"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

/// Appends `root/rel` to the tar and, for a directory, its contents in
/// sorted order. Symlinks are stored as symlinks and never followed.
fn append_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
) -> Result<(), ArtifactError> {
    let path = root.join(rel);
    let meta = fs::symlink_metadata(&path).map_err(io_err("inspect", &path))?;
    let file_type = meta.file_type();
    let mut header = tar::Header::new_gnu();
    // Fixed owner and time keep the payload reproducible; unpack ignores both.
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_mode(meta.mode() & 0o777);
    if file_type.is_file() {
        let file = File::open(&path).map_err(io_err("open", &path))?;
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(meta.len());
        let data = ExactReader {
            inner: file,
            remaining: meta.len(),
        };
        builder
            .append_data(&mut header, rel, data)
            .map_err(io_err("pack", &path))
    } else if file_type.is_symlink() {
        let target = fs::read_link(&path).map_err(io_err("read symlink", &path))?;
        let depth = rel.components().count().saturating_sub(1);
        check_link_target(target.as_os_str().as_bytes(), depth).map_err(|reason| {
            ArtifactError::BadSymlink {
                path: path.clone(),
                reason,
            }
        })?;
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        builder
            .append_link(&mut header, rel, &target)
            .map_err(io_err("pack", &path))
    } else if file_type.is_dir() {
        if !rel.as_os_str().is_empty() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder
                .append_data(&mut header, rel, io::empty())
                .map_err(io_err("pack", &path))?;
        }
        let mut names = fs::read_dir(&path)
            .and_then(|entries| {
                entries
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<io::Result<Vec<_>>>()
            })
            .map_err(io_err("read directory", &path))?;
        // On Unix `OsString` orders by bytes, so the tar is deterministic.
        names.sort();
        for name in names {
            append_tree(builder, root, &rel.join(name))?;
        }
        Ok(())
    } else {
        Err(ArtifactError::SpecialFile {
            path,
            kind: special_kind(file_type),
        })
    }
}

/// A version for ordering: a semantic version, or one written before
/// versions had to be (`2`, `1.4`), read as `2.0.0`, `1.4.0`.
pub fn version_order(v: &str) -> Option<semver::Version> {
    semver::Version::parse(v).ok().or_else(|| {
        let parts = v.split('.').count();
        let padded = match parts {
            1 => format!("{v}.0.0"),
            2 => format!("{v}.0"),
            _ => return None,
        };
        semver::Version::parse(&padded).ok()
    })
}

/// Whether going from version `from` to `to` goes down. Versions that
/// cannot be ordered (written before versions had to be semantic, and
/// unreadable as one) count as a downgrade unless they are the same: what
/// cannot be ordered is never let through silently.
pub fn is_downgrade(from: &str, to: &str) -> bool {
    match (version_order(from), version_order(to)) {
        (Some(from), Some(to)) => to < from,
        _ => from != to,
    }
}

/// Agent artifacts, and only they, are named [`AGENT_NAME`].
fn check_kind(name: &str, kind: ArtifactKind) -> Result<(), ArtifactError> {
    let reason = match kind {
        ArtifactKind::Agent if name != AGENT_NAME => {
            format!("an agent artifact must be named {AGENT_NAME}, not {name:?}")
        }
        ArtifactKind::Service if name == AGENT_NAME => format!(
            "the name {AGENT_NAME} is reserved for agent artifacts (pack them with --kind agent)"
        ),
        _ => return Ok(()),
    };
    Err(ArtifactError::BadManifest { reason })
}

/// Packs the service directory `dir` into a signed artifact at `out`
/// (replacing any file there) and returns its manifest. See [`pack_kind`].
pub fn pack(
    dir: &Path,
    name: &str,
    version: &str,
    key: &SigningKey,
    out: &Path,
) -> Result<SignedManifest, ArtifactError> {
    pack_kind(
        dir,
        name,
        version,
        ArtifactKind::Service,
        DEFAULT_EXPIRY,
        key,
        out,
    )
}

/// Packs `dir` as an artifact of `kind`: a service directory holds
/// `service.toml`, an agent release the executable `baton-agent`.
///
/// The payload is a tar of the directory's contents with relative, sorted
/// paths; regular files, directories and symlinks (kept as symlinks, and
/// held to `unpack`'s rules); modes without set-uid, set-gid and sticky
/// bits; owner 0 and time 0. It is zstd-compressed and hashed in one pass
/// into a temporary file beside `out`.
pub fn pack_kind(
    dir: &Path,
    name: &str,
    version: &str,
    kind: ArtifactKind,
    expires_in: std::time::Duration,
    key: &SigningKey,
    out: &Path,
) -> Result<SignedManifest, ArtifactError> {
    use std::os::unix::fs::PermissionsExt;
    validate_name(name)?;
    validate_version(version)?;
    check_kind(name, kind)?;
    let (marker, executable) = match kind {
        ArtifactKind::Service => ("service.toml", false),
        ArtifactKind::Agent => (AGENT_NAME, true),
    };
    match fs::symlink_metadata(dir.join(marker)) {
        Ok(meta)
            if meta.file_type().is_file()
                && (!executable || meta.permissions().mode() & 0o100 != 0) => {}
        _ if kind == ArtifactKind::Agent => {
            return Err(ArtifactError::NoAgentBinary {
                dir: dir.to_owned(),
            });
        }
        _ => {
            return Err(ArtifactError::NoServiceToml {
                dir: dir.to_owned(),
            });
        }
    }
    let dir_real = fs::canonicalize(dir).map_err(io_err("resolve", dir))?;
    let out_dir = parent_dir(out);
    let out_dir_real = fs::canonicalize(out_dir).map_err(io_err("resolve", out_dir))?;
    if out_dir_real.starts_with(&dir_real) {
        return Err(ArtifactError::OutputInsideDir {
            out: out.to_owned(),
            dir: dir.to_owned(),
        });
    }

    let payload = TempFile::beside(out)?;
    let writer = HashingWriter {
        inner: BufWriter::new(&payload.file),
        hasher: PayloadHasher::new(),
    };
    let encoder = zstd::stream::Encoder::new(writer, ZSTD_LEVEL)
        .map_err(io_err("compress into", &payload.path))?;
    let mut builder = tar::Builder::new(encoder);
    append_tree(&mut builder, dir, Path::new(""))?;
    let mut writer = builder
        .into_inner()
        .and_then(|encoder| encoder.finish())
        .map_err(io_err("compress into", &payload.path))?;
    writer.flush().map_err(io_err("write", &payload.path))?;
    let HashingWriter { inner, hasher } = writer;
    drop(inner);

    let manifest = Manifest {
        name: name.to_owned(),
        kind,
        version: version.to_owned(),
        size: hasher.bytes(),
        payload_sha256: hasher.hex_digest(),
        created: crate::time::rfc3339(SystemTime::now()),
        key_id: key.public_key().key_id(),
        expires: Some(crate::time::rfc3339(SystemTime::now() + expires_in)),
    };
    let signed = SignedManifest::sign(manifest, key)?;
    let mut reader = &payload.file;
    reader.rewind().map_err(io_err("seek in", &payload.path))?;
    write_artifact(out, &signed, &mut reader)?;
    Ok(signed)
}

// ---------------------------------------------------------------------------
// Unpack
// ---------------------------------------------------------------------------

/// Bounds on what [`unpack`] will write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// The most tar entries (files, directories and symlinks).
    pub max_entries: u64,
    /// The most file bytes, summed over all files.
    pub max_bytes: u64,
}

impl Default for UnpackLimits {
    /// 100 000 entries and 4 GiB.
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_bytes: 4 * 1024 * 1024 * 1024,
        }
    }
}

/// What [`unpack`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Tar entries unpacked.
    pub entries: u64,
    /// File bytes written.
    pub bytes: u64,
}

/// Syncs a directory, making the creation, removal or renaming of its
/// entries durable.
pub fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// A reader that fails once more than `limit` bytes have passed, bounding
/// the decompressed stream (see [`TAR_OVERHEAD_PER_ENTRY`]).
struct CappedReader<R> {
    inner: R,
    remaining: u64,
    limit: u64,
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.remaining = self.remaining.checked_sub(n as u64).ok_or_else(|| {
            io::Error::other(format!(
                "it decompresses to more than {} bytes, beyond the unpack limits",
                self.limit
            ))
        })?;
        Ok(n)
    }
}

/// Turns a tar path into a relative path of plain names, or says why not.
fn entry_path(raw: &[u8]) -> Result<PathBuf, String> {
    if raw.is_empty() {
        return Err("its path is empty".to_owned());
    }
    if raw.starts_with(b"/") {
        return Err("its path is absolute".to_owned());
    }
    let mut path = PathBuf::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("its path has a `..` component".to_owned()),
            name => path.push(OsStr::from_bytes(name)),
        }
    }
    if path.as_os_str().is_empty() {
        return Err("its path names no file".to_owned());
    }
    Ok(path)
}

/// The state of one unpack: the destination, the limits and the counters.
struct Unpacker<'a> {
    dest: &'a Path,
    limits: &'a UnpackLimits,
    stats: UnpackStats,
    /// Every directory created, relative to `dest`, with the mode to give it
    /// once its entries are written.
    dirs: BTreeMap<PathBuf, u32>,
    buffer: Vec<u8>,
}

impl Unpacker<'_> {
    /// Makes sure every parent of `rel` is a real directory inside `dest`,
    /// creating missing ones, and returns the full path of `rel`.
    fn prepare_parents(&mut self, rel: &Path, entry: &str) -> Result<PathBuf, ArtifactError> {
        let mut sub = PathBuf::new();
        let parents: Vec<Component<'_>> = rel.components().collect();
        for part in parents.iter().take(parents.len().saturating_sub(1)) {
            sub.push(part);
            let full = self.dest.join(&sub);
            match fs::symlink_metadata(&full) {
                Ok(meta) if meta.file_type().is_dir() => {}
                Ok(meta) => {
                    let what = if meta.file_type().is_symlink() {
                        "a symlink"
                    } else {
                        "not a directory"
                    };
                    return Err(ArtifactError::UnsafeEntry {
                        entry: entry.to_owned(),
                        reason: format!("its parent {} is {what}", sub.display()),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    DirBuilder::new()
                        .mode(0o700)
                        .create(&full)
                        .map_err(io_err("create directory", &full))?;
                    self.dirs.insert(sub.clone(), 0o755);
                }
                Err(e) => return Err(io_err("inspect", &full)(e)),
            }
        }
        Ok(self.dest.join(rel))
    }

    /// Unpacks one tar entry.
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ArtifactError> {
        self.stats.entries += 1;
        if self.stats.entries > self.limits.max_entries {
            return Err(ArtifactError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refuse = |reason: String| ArtifactError::UnsafeEntry {
            entry: name.clone(),
            reason,
        };
        let rel = entry_path(&entry.path_bytes()).map_err(refuse)?;
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::Symlink => {}
            tar::EntryType::Link => return Err(refuse("it is a hard link".to_owned())),
            tar::EntryType::Char => return Err(refuse("it is a character device".to_owned())),
            tar::EntryType::Block => return Err(refuse("it is a block device".to_owned())),
            tar::EntryType::Fifo => return Err(refuse("it is a fifo".to_owned())),
            other => {
                return Err(refuse(format!(
                    "it has the unsupported entry type {:?}",
                    char::from(other.as_byte())
                )));
            }
        }
        let mode = entry
            .header()
            .mode()
            .map_err(|e| refuse(format!("its mode field is unreadable: {e}")))?;
        if mode & 0o4000 != 0 {
            return Err(refuse("it has the set-uid bit".to_owned()));
        }
        if mode & 0o2000 != 0 {
            return Err(refuse("it has the set-gid bit".to_owned()));
        }
        // Nobody but the owner (the agent) may ever change a release:
        // group and world write bits are dropped.
        let mode = mode & 0o755;
        let path = self.prepare_parents(&rel, &name)?;
        match kind {
            tar::EntryType::Directory => self.directory(&rel, &path, mode, &name),
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let depth = rel.components().count().saturating_sub(1);
                check_link_target(&target, depth).map_err(refuse)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path).map_err(|e| {
                    match e.kind() {
                        io::ErrorKind::AlreadyExists => ArtifactError::UnsafeEntry {
                            entry: name.clone(),
                            reason: "its path already exists (a duplicate entry)".to_owned(),
                        },
                        _ => io_err("create symlink", &path)(e),
                    }
                })
            }
            _ => self.file(entry, &path, mode, &name),
        }
    }

    /// Creates a directory entry, or adopts one created as a parent.
    fn directory(
        &mut self,
        rel: &Path,
        path: &Path,
        mode: u32,
        name: &str,
    ) -> Result<(), ArtifactError> {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_dir() => {}
            Ok(_) => {
                return Err(ArtifactError::UnsafeEntry {
                    entry: name.to_owned(),
                    reason: "its path already exists and is not a directory".to_owned(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .mode(0o700)
                    .create(path)
                    .map_err(io_err("create directory", path))?;
            }
            Err(e) => return Err(io_err("inspect", path)(e)),
        }
        // The mode is applied at the end, so a read-only directory can
        // still receive its entries first.
        self.dirs.insert(rel.to_owned(), mode);
        Ok(())
    }

    /// Writes a regular file, counting its bytes against the limit.
    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
        mode: u32,
        name: &str,
    ) -> Result<(), ArtifactError> {
        let too_many = || ArtifactError::TooManyBytes {
            entry: name.to_owned(),
            limit: self.limits.max_bytes,
        };
        if self.stats.bytes.saturating_add(entry.size()) > self.limits.max_bytes {
            return Err(too_many());
        }
        // `create_new` fails on any existing path, symlinks included, so a
        // file is never written through a link.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => ArtifactError::UnsafeEntry {
                    entry: name.to_owned(),
                    reason: "its path already exists (a duplicate entry)".to_owned(),
                },
                _ => io_err("create", path)(e),
            })?;
        loop {
            let n = match entry.read(&mut self.buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(ArtifactError::Payload { source }),
            };
            self.stats.bytes += n as u64;
            if self.stats.bytes > self.limits.max_bytes {
                return Err(too_many());
            }
            file.write_all(&self.buffer[..n])
                .map_err(io_err("write", path))?;
        }
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(io_err("set the mode of", path))?;
        file.sync_all().map_err(io_err("sync", path))
    }

    /// Applies directory modes, deepest first, and syncs every directory,
    /// `dest` and its parent.
    fn finish(&self) -> Result<(), ArtifactError> {
        let mut dirs: Vec<(&PathBuf, &u32)> = self.dirs.iter().collect();
        dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
        let root_mode = 0o755;
        for (path, mode) in dirs
            .into_iter()
            .map(|(rel, mode)| (self.dest.join(rel), *mode))
            .chain([(self.dest.to_owned(), root_mode)])
        {
            // Open before changing the mode: a directory without read
            // permission could not be opened for the sync afterwards.
            let dir = File::open(&path).map_err(io_err("open", &path))?;
            dir.set_permissions(Permissions::from_mode(mode))
                .map_err(io_err("set the mode of", &path))?;
            dir.sync_all().map_err(io_err("sync", &path))?;
        }
        let parent = parent_dir(self.dest);
        fsync_dir(parent).map_err(io_err("sync", parent))
    }
}

/// Unpacks a zstd-compressed tar payload into `dest`, which must not exist
/// (its parent must). Refuses, naming the entry, anything unsafe: absolute
/// or `..` paths, hard links, devices, fifos, set-uid/set-gid files,
/// symlinks that could lead outside `dest`, paths through symlinks, and
/// more than `limits` allow. Files keep their permission bits. Everything
/// written is synced. On error, `dest` is removed.
pub fn unpack(
    payload: impl Read,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackStats, ArtifactError> {
    DirBuilder::new()
        .mode(0o700)
        .create(dest)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => ArtifactError::DestExists {
                path: dest.to_owned(),
            },
            _ => io_err("create directory", dest)(e),
        })?;
    let result = unpack_into(payload, dest, limits);
    if result.is_err() {
        // Best effort: the unpack error matters more than a cleanup one.
        let _ = fs::remove_dir_all(dest);
    }
    result
}

/// The body of [`unpack`], once `dest` exists.
fn unpack_into(
    payload: impl Read,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackStats, ArtifactError> {
    let decoder =
        zstd::stream::Decoder::new(payload).map_err(|source| ArtifactError::Payload { source })?;
    let limit = limits.max_bytes.saturating_add(
        limits
            .max_entries
            .saturating_add(1)
            .saturating_mul(TAR_OVERHEAD_PER_ENTRY),
    );
    let capped = CappedReader {
        inner: decoder,
        remaining: limit,
        limit,
    };
    let mut archive = tar::Archive::new(capped);
    let mut unpacker = Unpacker {
        dest,
        limits,
        stats: UnpackStats::default(),
        dirs: BTreeMap::new(),
        buffer: vec![0u8; COPY_BUFFER_BYTES],
    };
    let entries = archive
        .entries()
        .map_err(|source| ArtifactError::Payload { source })?;
    for entry in entries {
        let mut entry = entry.map_err(|source| ArtifactError::Payload { source })?;
        unpacker.entry(&mut entry)?;
    }
    unpacker.finish()?;
    Ok(unpacker.stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fresh key pair in `dir`.
    fn keys(dir: &Path, name: &str) -> (SigningKey, PublicKey) {
        let (key, public) = keygen(&dir.join(name)).unwrap();
        (
            read_signing_key(&key).unwrap(),
            read_public_key(&public).unwrap(),
        )
    }

    /// A small service directory: a config, an executable, a data file in a
    /// subdirectory and a symlink to the executable.
    fn service_dir(root: &Path) -> PathBuf {
        let dir = root.join("svc");
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::create_dir_all(dir.join("share/data")).unwrap();
        fs::write(dir.join("service.toml"), "name = \"api\"\n").unwrap();
        fs::write(dir.join("bin/run"), "#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(dir.join("bin/run"), Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.join("share/data/table.txt"), "x".repeat(10_000)).unwrap();
        fs::set_permissions(
            dir.join("share/data/table.txt"),
            Permissions::from_mode(0o640),
        )
        .unwrap();
        symlink("bin/run", dir.join("current")).unwrap();
        dir
    }

    /// Hashes the rest of `file` and checks it against `manifest`.
    fn hash_payload(mut file: File, manifest: &Manifest) -> Result<(), ArtifactError> {
        let mut hasher = PayloadHasher::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = file.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        hasher.clone().finish(manifest)
    }

    /// Packs the test service and returns the artifact path and key pair.
    fn packed(root: &Path) -> (PathBuf, SigningKey, PublicKey) {
        let (key, public) = keys(root, "release");
        let out = root.join("api-1.2.0.art");
        pack(&service_dir(root), "api", "1.2.0", &key, &out).unwrap();
        (out, key, public)
    }

    #[test]
    fn keygen_round_trips_and_refuses_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let prefix = tmp.path().join("release.v2");
        let (key_path, pub_path) = keygen(&prefix).unwrap();
        assert_eq!(key_path, tmp.path().join("release.v2.key"));
        assert_eq!(pub_path, tmp.path().join("release.v2.pub"));
        let mode = fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            fs::read_to_string(&key_path)
                .unwrap()
                .starts_with("baton-ed25519-secret ")
        );
        assert!(
            fs::read_to_string(&pub_path)
                .unwrap()
                .starts_with("baton-ed25519-public ")
        );

        let key = read_signing_key(&key_path).unwrap();
        let public = read_public_key(&pub_path).unwrap();
        assert_eq!(key.public_key(), public);
        assert_eq!(public.key_id().len(), 16);
        assert!(format!("{key:?}").contains(&public.key_id()));

        let err = keygen(&prefix).unwrap_err().to_string();
        assert!(err.contains("release.v2.key already exists"), "{err}");
        assert!(err.contains("refusing to overwrite"), "{err}");
    }

    #[test]
    fn garbled_key_files_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let (key_path, pub_path) = keygen(&tmp.path().join("k")).unwrap();

        let err = read_public_key(&key_path).unwrap_err().to_string();
        assert!(err.contains("k.key is not a Baton public key"), "{err}");
        assert!(err.contains("holds a secret key"), "{err}");
        let err = read_signing_key(&pub_path).unwrap_err().to_string();
        assert!(err.contains("k.pub is not a Baton secret key"), "{err}");

        let junk = tmp.path().join("junk.pub");
        fs::write(&junk, "ssh-ed25519 AAAA\n").unwrap();
        let err = read_public_key(&junk).unwrap_err().to_string();
        assert!(err.contains("junk.pub is not a Baton public key"), "{err}");
        fs::write(&junk, "baton-ed25519-public abcd\n").unwrap();
        let err = read_public_key(&junk).unwrap_err().to_string();
        assert!(err.contains("the key is 2 bytes, not 32"), "{err}");
        fs::write(&junk, "baton-ed25519-secret zz\n").unwrap();
        let err = read_signing_key(&junk).unwrap_err().to_string();
        assert!(err.contains("not valid hex"), "{err}");
    }

    #[test]
    fn names_and_versions_are_checked() {
        validate_name("api").unwrap();
        validate_name("my_svc-2.x").unwrap();
        validate_version("1.2.0+build.7").unwrap();
        let cases = [
            (validate_name(""), "it is empty"),
            (validate_name(".."), "must start with a letter or digit"),
            (validate_name("-x"), "must start with a letter or digit"),
            (validate_name("a/b"), "it contains '/'"),
            (validate_name("a+b"), "it contains '+'"),
            (validate_name(&"a".repeat(129)), "longer than 128"),
            (validate_version("1 2"), "it contains ' '"),
            (validate_version("2"), "not a semantic version"),
            (validate_version("1.4"), "not a semantic version"),
            (
                validate_version("1.99999999999999999999.0"),
                "not a semantic version",
            ),
        ];
        for (result, want) in cases {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(want), "{err} lacks {want}");
        }
    }

    #[test]
    fn pack_open_verify_hash_unpack_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let (out, _key, public) = packed(tmp.path());

        let (signed, file) = open_artifact(&out).unwrap();
        assert_eq!(signed.manifest.name, "api");
        assert_eq!(signed.manifest.version, "1.2.0");
        assert_eq!(signed.manifest.key_id, public.key_id());
        assert!(signed.manifest.created.ends_with('Z'));
        signed.verify(std::slice::from_ref(&public)).unwrap();
        hash_payload(file, &signed.manifest).unwrap();

        let (_, file) = open_artifact(&out).unwrap();
        let dest = tmp.path().join("unpacked");
        let stats = unpack(file, &dest, &UnpackLimits::default()).unwrap();
        // service.toml, bin, bin/run, current, share, share/data, table.txt.
        assert_eq!(stats.entries, 7);
        assert_eq!(stats.bytes, 10_000 + 13 + 18);
        assert_eq!(
            fs::read_to_string(dest.join("bin/run")).unwrap(),
            "#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            fs::read_to_string(dest.join("share/data/table.txt"))
                .unwrap()
                .len(),
            10_000
        );
        let mode = |p: &str| fs::metadata(dest.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("bin/run"), 0o755);
        assert_eq!(mode("share/data/table.txt"), 0o640);
        assert_eq!(mode(""), 0o755);
        assert_eq!(
            fs::read_link(dest.join("current")).unwrap(),
            Path::new("bin/run")
        );
        // No temporary files are left beside the artifact.
        let mut left: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "api-1.2.0.art",
                "release.key",
                "release.pub",
                "svc",
                "unpacked"
            ]
        );
    }

    #[test]
    fn pack_is_deterministic_apart_from_the_time() {
        let tmp = tempfile::tempdir().unwrap();
        let (key, _) = keys(tmp.path(), "k");
        let dir = service_dir(tmp.path());
        let a = pack(&dir, "api", "1.0.0", &key, &tmp.path().join("a.art")).unwrap();
        let b = pack(&dir, "api", "1.0.0", &key, &tmp.path().join("b.art")).unwrap();
        assert_eq!(a.manifest.payload_sha256, b.manifest.payload_sha256);
    }

    #[test]
    fn verify_refuses_a_wrong_key() {
        let tmp = tempfile::tempdir().unwrap();
        let (out, key, _) = packed(tmp.path());
        let (_, other) = keys(tmp.path(), "other");
        let (signed, _) = open_artifact(&out).unwrap();
        let err = signed.verify(&[other]).unwrap_err().to_string();
        let want = format!(
            "artifact api 1.2.0 is signed by key {}, which is not among the 1 trusted keys",
            key.public_key().key_id()
        );
        assert_eq!(err, want);
    }

    #[test]
    fn verify_refuses_an_unsigned_artifact() {
        let tmp = tempfile::tempdir().unwrap();
        let (out, _, public) = packed(tmp.path());
        let (mut signed, mut file) = open_artifact(&out).unwrap();
        signed.signature.clear();
        let unsigned = tmp.path().join("unsigned.art");
        write_artifact(&unsigned, &signed, &mut file).unwrap();
        let (signed, _) = open_artifact(&unsigned).unwrap();
        let err = signed.verify(&[public]).unwrap_err().to_string();
        assert_eq!(err, "artifact api 1.2.0 is not signed");
    }

    #[test]
    fn a_flipped_payload_byte_fails_the_digest() {
        let tmp = tempfile::tempdir().unwrap();
        let (out, _, public) = packed(tmp.path());
        let mut bytes = fs::read(&out).unwrap();
        let last = bytes.len() - 10;
        bytes[last] ^= 0x01;
        fs::write(&out, &bytes).unwrap();

        let (signed, file) = open_artifact(&out).unwrap();
        signed.verify(&[public]).unwrap();
        let err = hash_payload(file, &signed.manifest)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("payload digest is sha256:"), "{err}");
        assert!(
            err.ends_with(&format!(
                "but the manifest says sha256:{}",
                signed.manifest.payload_sha256
            )),
            "{err}"
        );
    }

    #[test]
    fn an_edited_manifest_fails_the_signature() {
        let tmp = tempfile::tempdir().unwrap();
        let (out, _, public) = packed(tmp.path());
        let (signed, _) = open_artifact(&out).unwrap();
        let text = String::from_utf8(signed.bytes.clone()).unwrap();
        let edited = text.replace("\"1.2.0\"", "\"1.2.1\"");
        assert_ne!(text, edited);
        let tampered =
            SignedManifest::parse(edited.into_bytes(), signed.signature.clone()).unwrap();
        let err = tampered
            .verify(std::slice::from_ref(&public))
            .unwrap_err()
            .to_string();
        assert!(err.contains("artifact api 1.2.1"), "{err}");
        assert!(err.contains("signature does not verify"), "{err}");

        // Editing the parsed fields without the bytes is caught too.
        let mut edited = signed.clone();
        edited.manifest.size += 1;
        let err = edited.verify(&[public]).unwrap_err().to_string();
        assert!(
            err.contains("do not match the signed manifest bytes"),
            "{err}"
        );
    }

    #[test]
    fn open_refuses_bad_framing() {
        let tmp = tempfile::tempdir().unwrap();
        let (out, _, _) = packed(tmp.path());
        let bytes = fs::read(&out).unwrap();

        let bad = tmp.path().join("bad.art");
        fs::write(&bad, b"NOTBATON!\nxxxx").unwrap();
        let err = open_artifact(&bad).unwrap_err().to_string();
        assert!(
            err.contains("bad.art is not a valid Baton artifact"),
            "{err}"
        );
        assert!(err.contains("magic"), "{err}");

        fs::write(&bad, &bytes[..bytes.len() - 1]).unwrap();
        let err = open_artifact(&bad).unwrap_err().to_string();
        assert!(err.contains("payload is"), "{err}");
        assert!(err.contains("but the manifest says"), "{err}");

        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&(MAX_MANIFEST_BYTES + 1).to_be_bytes());
        fs::write(&bad, &huge).unwrap();
        let err = open_artifact(&bad).unwrap_err().to_string();
        assert!(
            err.contains("its manifest is 65537 bytes, above the limit"),
            "{err}"
        );

        fs::write(&bad, &bytes[..20]).unwrap();
        let err = open_artifact(&bad).unwrap_err().to_string();
        assert!(err.contains("the file ends inside the manifest"), "{err}");
    }

    #[test]
    fn parse_checks_fields() {
        let manifest = |name: &str, digest: &str| {
            format!(
                r#"{{"name":"{name}","version":"1.0.0","payload_sha256":"{digest}","size":1,"created":"x","key_id":""}}"#
            )
            .into_bytes()
        };
        let good = "a".repeat(64);
        SignedManifest::parse(manifest("api", &good), vec![]).unwrap();
        let err = SignedManifest::parse(manifest("../x", &good), vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid service name \"../x\""), "{err}");
        let err = SignedManifest::parse(manifest("api", &"A".repeat(64)), vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("payload_sha256"), "{err}");
        let mut extra = manifest("api", &good);
        extra.truncate(extra.len() - 1);
        extra.extend_from_slice(br#","evil":1}"#);
        let err = SignedManifest::parse(extra, vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `evil`"), "{err}");
    }

    #[test]
    fn agent_artifacts_hold_an_executable_and_carry_their_kind_signed() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let (key, public) = keys(tmp.path(), "k");
        let dir = tmp.path().join("agent");
        fs::create_dir(&dir).unwrap();
        let out = tmp.path().join("a.art");
        let agent = |name: &str| {
            pack_kind(
                &dir,
                name,
                "2.0.0",
                ArtifactKind::Agent,
                DEFAULT_EXPIRY,
                &key,
                &out,
            )
        };
        let err = agent(AGENT_NAME).unwrap_err().to_string();
        assert!(
            err.contains("no executable regular file baton-agent"),
            "{err}"
        );
        fs::write(dir.join(AGENT_NAME), b"#!/bin/sh\n").unwrap();
        let err = agent(AGENT_NAME).unwrap_err().to_string();
        assert!(
            err.contains("no executable regular file baton-agent"),
            "{err}"
        );
        fs::set_permissions(dir.join(AGENT_NAME), fs::Permissions::from_mode(0o755)).unwrap();
        let err = agent("api").unwrap_err().to_string();
        assert!(err.contains("must be named baton-agent"), "{err}");
        let signed = agent(AGENT_NAME).unwrap();
        assert_eq!(signed.manifest.kind, ArtifactKind::Agent);
        assert!(String::from_utf8_lossy(&signed.bytes).contains("\"kind\": \"agent\""));
        let back = SignedManifest::parse(signed.bytes.clone(), signed.signature.clone()).unwrap();
        back.verify(&[public]).unwrap();
        assert_eq!(back.manifest.kind, ArtifactKind::Agent);

        // A service may not take the agent's name, and a service manifest
        // says nothing of kinds (its bytes are as before kinds existed).
        let svc = service_dir(tmp.path());
        let err = pack(&svc, AGENT_NAME, "1.0.0", &key, &out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("reserved for agent artifacts"), "{err}");
        let signed = pack(&svc, "api", "1.0.0", &key, &out).unwrap();
        assert!(!String::from_utf8_lossy(&signed.bytes).contains("kind"));
    }

    #[test]
    fn pack_refuses_a_non_service_dir_and_special_files() {
        let tmp = tempfile::tempdir().unwrap();
        let (key, _) = keys(tmp.path(), "k");
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let err = pack(&empty, "api", "1.0.0", &key, &tmp.path().join("a.art"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("empty has no regular file service.toml"),
            "{err}"
        );

        let dir = service_dir(tmp.path());
        let _socket = std::os::unix::net::UnixListener::bind(dir.join("ctl.sock")).unwrap();
        let err = pack(&dir, "api", "1.0.0", &key, &tmp.path().join("a.art"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot pack"), "{err}");
        assert!(err.contains("ctl.sock: it is a socket"), "{err}");
        assert!(!tmp.path().join("a.art").exists());

        fs::remove_file(dir.join("ctl.sock")).unwrap();
        symlink("../../etc", dir.join("bin/escape")).unwrap();
        let err = pack(&dir, "api", "1.0.0", &key, &tmp.path().join("a.art"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot pack symlink"), "{err}");
        assert!(err.contains("points outside the artifact"), "{err}");

        fs::remove_file(dir.join("bin/escape")).unwrap();
        let err = pack(&dir, "api", "1.0.0", &key, &dir.join("a.art"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("inside the directory being packed"), "{err}");
    }

    // --- Malicious payloads -------------------------------------------------

    /// One raw tar entry; the name and link are written straight into the
    /// header so that nothing sanitizes them.
    struct Raw<'a> {
        name: &'a [u8],
        kind: tar::EntryType,
        mode: u32,
        link: &'a [u8],
        data: &'a [u8],
    }

    fn file(name: &[u8]) -> Raw<'_> {
        Raw {
            name,
            kind: tar::EntryType::Regular,
            mode: 0o644,
            link: b"",
            data: b"pwned\n",
        }
    }

    fn link<'a>(name: &'a [u8], target: &'a [u8]) -> Raw<'a> {
        Raw {
            name,
            kind: tar::EntryType::Symlink,
            mode: 0o777,
            link: target,
            data: b"",
        }
    }

    fn payload(entries: &[Raw<'_>]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for e in entries {
            let mut header = tar::Header::new_gnu();
            header.as_old_mut().name[..e.name.len()].copy_from_slice(e.name);
            header.as_old_mut().linkname[..e.link.len()].copy_from_slice(e.link);
            header.set_entry_type(e.kind);
            header.set_mode(e.mode);
            header.set_size(e.data.len() as u64);
            header.set_cksum();
            builder.append(&header, e.data).unwrap();
        }
        zstd::stream::encode_all(&builder.into_inner().unwrap()[..], 3).unwrap()
    }

    /// Every path under `root`, relative.
    fn tree(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_owned()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                out.push(path.strip_prefix(root).unwrap().display().to_string());
                if fs::symlink_metadata(&path).unwrap().is_dir() {
                    stack.push(path);
                }
            }
        }
        out.sort();
        out
    }

    /// Unpacks `entries` into `TMP/jail/dest`, expects an error, checks
    /// that nothing is left anywhere under TMP, and returns the message.
    fn refused_with(entries: &[Raw<'_>], limits: &UnpackLimits) -> String {
        let tmp = tempfile::tempdir().unwrap();
        let jail = tmp.path().join("jail");
        fs::create_dir(&jail).unwrap();
        let dest = jail.join("dest");
        let err = unpack(&payload(entries)[..], &dest, limits)
            .unwrap_err()
            .to_string();
        assert_eq!(tree(tmp.path()), ["jail"], "after: {err}");
        err
    }

    fn refused(entries: &[Raw<'_>]) -> String {
        refused_with(entries, &UnpackLimits::default())
    }

    #[test]
    fn unpack_refuses_absolute_and_dotdot_paths() {
        let err = refused(&[file(b"/tmp/x")]);
        assert_eq!(
            err,
            "refusing to unpack entry \"/tmp/x\": its path is absolute"
        );
        let err = refused(&[file(b"../x")]);
        assert!(
            err.contains("entry \"../x\": its path has a `..` component"),
            "{err}"
        );
        let err = refused(&[file(b"ok"), file(b"a/../../x")]);
        assert!(
            err.contains("entry \"a/../../x\": its path has a `..` component"),
            "{err}"
        );
        let err = refused(&[file(b"./")]);
        assert!(err.contains("its path names no file"), "{err}");
    }

    #[test]
    fn unpack_refuses_escaping_symlinks() {
        let err = refused(&[link(b"l", b"../../etc")]);
        assert!(err.contains("entry \"l\""), "{err}");
        assert!(err.contains("points outside the artifact"), "{err}");
        let err = refused(&[link(b"l", b"/etc")]);
        assert!(err.contains("its target \"/etc\" is absolute"), "{err}");
        let err = refused(&[link(b"s", b"."), link(b"x", b"s/..")]);
        assert!(err.contains("entry \"x\""), "{err}");
        assert!(err.contains("only leading `..` are allowed"), "{err}");
        let err = refused(&[link(b"l", b"")]);
        assert!(err.contains("its target is empty"), "{err}");
    }

    #[test]
    fn unpack_never_writes_through_a_symlink() {
        let err = refused(&[link(b"d", b"."), file(b"d/x")]);
        assert!(
            err.contains("entry \"d/x\": its parent d is a symlink"),
            "{err}"
        );
        // A file replacing an existing link is refused as well.
        let err = refused(&[link(b"f", b"g"), file(b"f")]);
        assert!(
            err.contains("entry \"f\": its path already exists"),
            "{err}"
        );
    }

    #[test]
    fn unpack_refuses_links_devices_and_fifos() {
        let hard = Raw {
            kind: tar::EntryType::Link,
            ..link(b"h", b"service.toml")
        };
        assert!(refused(&[hard]).contains("entry \"h\": it is a hard link"));
        let char_dev = Raw {
            kind: tar::EntryType::Char,
            data: b"",
            ..file(b"tty")
        };
        assert!(refused(&[char_dev]).contains("entry \"tty\": it is a character device"));
        let block = Raw {
            kind: tar::EntryType::Block,
            data: b"",
            ..file(b"sda")
        };
        assert!(refused(&[block]).contains("entry \"sda\": it is a block device"));
        let fifo = Raw {
            kind: tar::EntryType::Fifo,
            data: b"",
            ..file(b"pipe")
        };
        assert!(refused(&[fifo]).contains("entry \"pipe\": it is a fifo"));
        let contiguous = Raw {
            kind: tar::EntryType::Continuous,
            ..file(b"c")
        };
        assert!(refused(&[contiguous]).contains("unsupported entry type '7'"));
    }

    #[test]
    fn unpack_refuses_setuid_and_setgid() {
        let setuid = Raw {
            mode: 0o4755,
            ..file(b"bin/su")
        };
        let err = refused(&[file(b"ok"), setuid]);
        assert_eq!(
            err,
            "refusing to unpack entry \"bin/su\": it has the set-uid bit"
        );
        let setgid = Raw {
            mode: 0o2755,
            ..file(b"sg")
        };
        assert!(refused(&[setgid]).contains("it has the set-gid bit"));
    }

    #[test]
    fn unpack_enforces_the_limits() {
        let limits = UnpackLimits {
            max_entries: 2,
            max_bytes: 1_000,
        };
        let err = refused_with(&[file(b"a"), file(b"b"), file(b"c")], &limits);
        assert_eq!(err, "the payload has more than 2 entries, the limit");

        let big = vec![b'x'; 1_001];
        let limits = UnpackLimits {
            max_entries: 10,
            max_bytes: 1_000,
        };
        let err = refused_with(
            &[
                file(b"small"),
                Raw {
                    data: &big,
                    ..file(b"big")
                },
            ],
            &limits,
        );
        assert_eq!(
            err,
            "entry \"big\" takes the unpacked files past 1000 bytes, the limit"
        );
    }

    #[test]
    fn unpack_refuses_an_existing_dest_and_garbage() {
        let tmp = tempfile::tempdir().unwrap();
        let err = unpack(
            &payload(&[file(b"a")])[..],
            tmp.path(),
            &UnpackLimits::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("already exists; unpack needs a fresh destination"),
            "{err}"
        );

        let dest = tmp.path().join("dest");
        let err = unpack(&b"not zstd at all"[..], &dest, &UnpackLimits::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cannot read the artifact payload"), "{err}");
        assert!(!dest.exists());
    }

    #[test]
    fn unpack_applies_directory_modes_last() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("dest");
        let read_only = Raw {
            kind: tar::EntryType::Directory,
            mode: 0o555,
            data: b"",
            ..file(b"ro/")
        };
        let stats = unpack(
            &payload(&[read_only, file(b"ro/inner")])[..],
            &dest,
            &UnpackLimits::default(),
        )
        .unwrap();
        assert_eq!(
            stats,
            UnpackStats {
                entries: 2,
                bytes: 6
            }
        );
        assert_eq!(
            fs::read_to_string(dest.join("ro/inner")).unwrap(),
            "pwned\n"
        );
        let mode = fs::metadata(dest.join("ro")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o555);
        // Let the temp dir clean up.
        fs::set_permissions(dest.join("ro"), Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn unpack_drops_group_and_world_write() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("dest");
        let open_dir = Raw {
            kind: tar::EntryType::Directory,
            mode: 0o777,
            data: b"",
            ..file(b"open/")
        };
        let open_file = Raw {
            mode: 0o666,
            ..file(b"open/file")
        };
        unpack(
            &payload(&[open_dir, open_file])[..],
            &dest,
            &UnpackLimits::default(),
        )
        .unwrap();
        let mode = |p: &str| fs::metadata(dest.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode("open"), mode("open/file")), (0o755, 0o644));
    }
}
