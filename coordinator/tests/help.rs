//! `batond` teaches through `--help`, and bad flags exit with code 2.
//! (Having integration tests here also makes `cargo test --workspace`
//! build `batond`, which the end-to-end tests in `tests/` run.)

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
fn batond_help_names_every_flag_and_bad_flags_exit_2() {
    let (code, out, _) = run(env!("CARGO_BIN_EXE_batond"), &["--help"]);
    assert_eq!(code, Some(0));
    for needle in [
        "--listen",
        "--data-dir",
        "--tls-dir",
        "--config",
        "--agent-timeout",
        "--shutdown-grace",
    ] {
        assert!(out.contains(needle), "{needle} missing from:\n{out}");
    }
    let (code, _, err) = run(env!("CARGO_BIN_EXE_batond"), &["--no-such-flag"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = run(env!("CARGO_BIN_EXE_batond"), &["--agent-timeout", "soon"]);
    assert_eq!(code, Some(2), "{err}");
}
