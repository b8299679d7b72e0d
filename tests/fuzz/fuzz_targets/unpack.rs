//! Release payloads: the input as the zstd-compressed tar an artifact
//! carries, and compressed here (so the tar reader sees it too). Whatever
//! it holds, nothing is created outside the release directory, no
//! symlink inside leads out of it, and a refused payload leaves nothing.
#![no_main]

use std::path::Path;

use baton_common::artifact::{UnpackLimits, unpack};
use libfuzzer_sys::fuzz_target;

/// Every path under `dir`, symlinks not followed.
fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
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

fuzz_target!(|data: &[u8]| {
    let root = tempfile::tempdir().unwrap();
    let dest = root.path().join("release");
    let limits = UnpackLimits {
        max_entries: 64,
        max_bytes: 1 << 20,
    };
    let compressed = zstd::encode_all(data, 1).unwrap();
    for payload in [data, compressed.as_slice()] {
        let result = unpack(payload, &dest, &limits);
        let outside: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "release")
            .collect();
        assert!(
            outside.is_empty(),
            "unpack wrote outside the release: {outside:?}"
        );
        if result.is_err() {
            assert!(!dest.exists(), "a refused payload left {}", dest.display());
            continue;
        }
        let real = std::fs::canonicalize(&dest).unwrap();
        let mut all = Vec::new();
        walk(&dest, &mut all);
        for path in all {
            if let Ok(target) = std::fs::canonicalize(&path) {
                assert!(
                    target.starts_with(&real),
                    "{} leads to {}",
                    path.display(),
                    target.display()
                );
            }
        }
        std::fs::remove_dir_all(&dest).unwrap();
    }
});
