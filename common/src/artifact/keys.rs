//! Signing and public keys: one-line text files
//! (`baton-ed25519-secret <hex PKCS#8>`, `baton-ed25519-public <hex>`),
//! made by `keygen` and read back with their kind checked.

use super::*;

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
pub(super) fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut path = prefix.as_os_str().to_owned();
    path.push(suffix);
    PathBuf::from(path)
}

/// Writes a new file with `mode`, never replacing one, and syncs it.
pub(super) fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), ArtifactError> {
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
pub(super) fn read_key_file(
    path: &Path,
    kind: &'static str,
) -> Result<(String, Vec<u8>), ArtifactError> {
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
pub(super) fn wrong_tag(tag: &str, expected: &str) -> String {
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
