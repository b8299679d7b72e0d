//! Release payloads: the input as the zstd-compressed tar an artifact
//! carries, and compressed here (so the tar reader sees it too). Whatever
//! it holds, nothing is created outside the release directory (checked in
//! a private directory that holds only it), no symlink inside points out
//! of it (judged on the link text, so dangling ones count), no file is
//! writable by group or others, and a refused payload leaves nothing.
#![no_main]

use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use baton_common::artifact::{UnpackLimits, unpack};
use libfuzzer_sys::fuzz_target;

/// Every path under `dir`, symlinks not followed.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        out.push(path.clone());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&path, out);
        }
    }
}

/// Whether `target`, read relative to `link`'s directory, stays inside
/// `root` (lexically: `..` may not climb above it).
fn stays_inside(root: &Path, link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let Ok(rel) = link.parent().unwrap_or(root).strip_prefix(root) else {
        return false;
    };
    let mut depth: i64 = rel.components().count() as i64;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

fuzz_target!(|data: &[u8]| {
    let root = tempfile::tempdir().unwrap();
    let limits = UnpackLimits {
        max_entries: 64,
        max_bytes: 1 << 20,
    };
    let compressed = zstd::encode_all(data, 1).unwrap();
    for (i, payload) in [data, compressed.as_slice()].into_iter().enumerate() {
        let name = format!("release{i}");
        let dest = root.path().join(&name);
        let result = unpack(payload, &dest, &limits);
        let outside: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| !n.to_string_lossy().starts_with("release"))
            .collect();
        assert!(
            outside.is_empty(),
            "unpack wrote outside the release: {outside:?}"
        );
        if result.is_err() {
            assert!(!dest.exists(), "a refused payload left {}", dest.display());
            continue;
        }
        let mut all = Vec::new();
        walk(&dest, &mut all);
        for path in all {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                assert!(
                    stays_inside(&dest, &path, &target),
                    "{} points to {}",
                    path.display(),
                    target.display()
                );
            } else {
                assert_eq!(
                    meta.permissions().mode() & 0o022,
                    0,
                    "{} is writable by others",
                    path.display()
                );
            }
        }
        // Directories may have been left without permissions: the
        // temporary root is removed (best effort) when it is dropped.
        let mut dirs = Vec::new();
        walk(&dest, &mut dirs);
        for d in dirs.iter().chain([&dest]) {
            if std::fs::symlink_metadata(d).is_ok_and(|m| m.is_dir()) {
                let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700));
            }
        }
    }
});
