//! The artifact file: magic, manifest, signature, payload; written
//! atomically beside its final path and opened with its framing and limits
//! checked.

use super::*;

/// The directory holding `path`; `.` for a bare file name.
pub(super) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// A temporary file beside its final path, removed on drop unless
/// persisted. Renaming within one directory makes the final write atomic.
pub(super) struct TempFile {
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) persisted: bool,
}

impl TempFile {
    /// Creates `.NAME.PID.RANDOM.tmp` in the directory of `target`.
    pub(super) fn beside(target: &Path) -> Result<Self, ArtifactError> {
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
    pub(super) fn persist(&mut self, target: &Path) -> Result<(), ArtifactError> {
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
pub(super) fn header_len(what: &'static str, len: usize, limit: u32) -> Result<u32, ArtifactError> {
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
