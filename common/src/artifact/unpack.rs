//! Unpacking a verified payload: bounded (entries, bytes) and refusing
//! anything that could leave the release directory or matter beyond it
//! (absolute paths, `..`, hard links, symlinks out, devices, FIFOs,
//! set-uid and set-gid bits). A refused payload leaves nothing.

use super::*;

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
