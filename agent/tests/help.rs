//! `baton-agent --help` teaches every flag, and bad flags exit with code 2.
//! (Having an integration test here also makes `cargo test --workspace`
//! build `baton-agent`, which the end-to-end tests in `tests/` run.)

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;

#[test]
fn agent_help_names_every_flag_and_bad_flags_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_baton-agent"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--coordinator",
        "--host-id",
        "--data-dir",
        "--tls-dir",
        "--label",
        "--var",
        "--trusted-key",
        "--keep-releases",
        "--config",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_baton-agent"))
        .args(["--label", "novalue"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEY=VALUE"));
}

#[test]
fn help_never_prints_an_enrollment_token_from_the_environment() {
    for args in [&["--help"][..], &["enroll", "--help"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_baton-agent"))
            .args(args)
            .env("BATON_ENROLL_TOKEN", "bt1-do-not-show-me")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("BATON_ENROLL_TOKEN"), "{text}");
        assert!(!text.contains("do-not-show-me"), "{text}");
    }
}
