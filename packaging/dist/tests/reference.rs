//! The reference in docs/reference is what the code says: regenerated
//! here and compared with the checked-in pages.

use std::path::Path;

#[test]
fn the_reference_docs_are_what_the_code_says() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/reference");
    let mut stale = Vec::new();
    for (name, text) in baton_dist::reference().unwrap() {
        let on_disk = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        if on_disk != text {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "docs/reference/{stale:?} differ from the code: run `cargo run -p baton-dist -- reference docs/reference` and commit the result"
    );
}

#[test]
fn every_config_file_key_is_a_flag_and_every_command_has_an_example() {
    // Keys without a flag of their name make the reference fail to build.
    baton_dist::config_reference().unwrap();
    let mut missing = Vec::new();
    for (name, cmd) in baton_dist::all_commands() {
        // A group of commands teaches through its commands; a program
        // (`baton-agent` runs, and has `enroll`) shows its own.
        if cmd.has_subcommands() && name.contains(' ') {
            continue;
        }
        let after = cmd
            .get_after_long_help()
            .or(cmd.get_after_help())
            .map(ToString::to_string)
            .unwrap_or_default();
        if !after.contains("Example") {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "commands without an example in --help: {missing:?}"
    );
}

#[test]
fn man_pages_and_completions_are_written_for_every_program() {
    let dir = std::env::temp_dir().join(format!("baton-dist-test-{}", std::process::id()));
    let pages = baton_dist::man_pages(&dir.join("man")).unwrap();
    for page in [
        "baton.1",
        "batond.1",
        "baton-agent.1",
        "baton-rollout-start.1",
        "baton-agent-enroll.1",
    ] {
        assert!(pages.iter().any(|p| p == page), "{page} in {pages:?}");
    }
    let text = std::fs::read_to_string(dir.join("man/baton-rollout-start.1")).unwrap();
    assert!(text.contains(".TH"), "{text}");
    let files = baton_dist::completions(&dir.join("completions")).unwrap();
    assert_eq!(files.len(), 9, "{files:?}");
    let bash = std::fs::read_to_string(dir.join("completions/bash/baton.bash")).unwrap();
    assert!(
        bash.contains("rollout"),
        "bash completion names the commands"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
