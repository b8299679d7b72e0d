//! `baton demo` runs the story on its own and cleans up.

use std::process::Command;

use baton_tests::bin;

#[test]
fn the_demo_registers_three_agents_and_cleans_up() {
    let out = Command::new(bin("baton"))
        .arg("demo")
        .env_remove("BATON_COORDINATOR")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for host in ["web-1", "web-2", "db-1"] {
        assert!(stdout.contains(&format!("+ {host} registered")), "{stdout}");
    }
    assert!(stdout.contains("role=db,zone=a"), "{stdout}");
    let dir = stdout.lines().next().unwrap().rsplit(' ').next().unwrap();
    assert!(
        !std::path::Path::new(dir).exists(),
        "the demo left {dir} behind"
    );
}
