//! `baton` teaches through `--help`. (Having integration tests here also
//! makes `cargo test --workspace` build `baton`, which the end-to-end
//! tests in `tests/` run.)

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn baton_help_lists_the_commands_and_global_flags() {
    let (code, out, _) = run(env!("CARGO_BIN_EXE_baton"), &["--help"]);
    assert_eq!(code, Some(0));
    for needle in [
        "certs",
        "hosts",
        "demo",
        "--coordinator",
        "BATON_COORDINATOR",
        "--tls-dir",
        "BATON_TLS_DIR",
    ] {
        assert!(out.contains(needle), "{needle} missing from:\n{out}");
    }
}
