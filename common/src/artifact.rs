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

mod format;
mod keys;
mod manifest;
mod pieces;
mod verify;
pub use format::*;
pub use keys::*;
pub use manifest::*;
pub use pieces::*;
pub use verify::*;

mod pack;
use pack::{check_kind, check_link_target};
pub use pack::{pack, pack_kind};

mod unpack;
pub use unpack::{UnpackLimits, UnpackStats, fsync_dir, unpack};

#[cfg(test)]
mod tests;
