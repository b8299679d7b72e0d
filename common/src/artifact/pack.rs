//! Packing a release directory into a signed artifact: a deterministic,
//! compressed tar of regular files, directories and symlinks that stay
//! inside, behind the signed manifest.

use super::*;

/// Checks a symlink target against the rules `unpack` enforces. `depth` is
/// the number of directories between the destination and the link.
pub(super) fn check_link_target(target: &[u8], depth: usize) -> Result<(), String> {
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

/// Agent artifacts, and only they, are named [`AGENT_NAME`].
pub(super) fn check_kind(name: &str, kind: ArtifactKind) -> Result<(), ArtifactError> {
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
    if expires_in.is_zero() || expires_in > MAX_EXPIRY {
        return Err(ArtifactError::BadManifest {
            reason: format!(
                "expires in {}: it must be more than zero and at most 10 years",
                crate::text::shorten(&humantime::format_duration(expires_in).to_string())
            ),
        });
    }
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
    // Piece hashes in a second pass: the piece size depends on the size,
    // known only now.
    let size = hasher.bytes();
    let piece_size = piece_size_for(size);
    let mut reader = &payload.file;
    reader.rewind().map_err(io_err("seek in", &payload.path))?;
    let pieces = hash_pieces(io::BufReader::new(reader), piece_size)
        .map_err(io_err("read back", &payload.path))?;

    let manifest = Manifest {
        name: name.to_owned(),
        kind,
        version: version.to_owned(),
        size,
        payload_sha256: hasher.hex_digest(),
        created: crate::time::rfc3339(SystemTime::now()),
        key_id: key.public_key().key_id(),
        expires: Some(crate::time::rfc3339(crate::time::later(
            SystemTime::now(),
            expires_in,
        ))),
        piece_size: if size == 0 { 0 } else { piece_size },
        pieces,
    };
    let signed = SignedManifest::sign(manifest, key)?;
    let mut reader = &payload.file;
    reader.rewind().map_err(io_err("seek in", &payload.path))?;
    write_artifact(out, &signed, &mut reader)?;
    Ok(signed)
}
