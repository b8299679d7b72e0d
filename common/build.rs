//! Stamps the build with the commit it was made from, for `--version` and
//! `baton_build_info`: `BATON_COMMIT` when the builder sets it (a package
//! built outside git), else `git rev-parse` of the checkout, else
//! `unknown`. Cargo runs this again when HEAD moves.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=BATON_COMMIT");
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let commit = std::env::var("BATON_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(from_git)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=BATON_COMMIT={commit}");
    println!("cargo:rustc-env=BATON_VERSION_LINE={version} (commit {commit})");
}

/// The checkout's commit, watching what decides it.
fn from_git() -> Option<String> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").ok()?;
    let git = Path::new(&manifest).parent()?.join(".git");
    if !git.is_dir() {
        return None;
    }
    let head = git.join("HEAD");
    println!("cargo:rerun-if-changed={}", head.display());
    if let Ok(text) = std::fs::read_to_string(&head)
        && let Some(reference) = text.trim().strip_prefix("ref: ")
    {
        println!("cargo:rerun-if-changed={}", git.join(reference).display());
        println!(
            "cargo:rerun-if-changed={}",
            git.join("packed-refs").display()
        );
    }
    let out = Command::new("git")
        .arg("-C")
        .arg(Path::new(&manifest).parent()?)
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    let commit = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !commit.is_empty()).then_some(commit)
}
