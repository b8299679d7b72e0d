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
    for host in ["web-1", "web-2", "web-3"] {
        assert!(stdout.contains(&format!("+ {host} registered")), "{stdout}");
    }
    // The story: 1.0.0 installed, 2.0.0 rolled out, 3.0.0 rolled back
    // after failing on its first host, and every host serves 2.0.0.
    assert!(
        stdout.contains("Installing demo 1.0.0 on every web host at once: succeeded"),
        "{stdout}"
    );
    assert!(
        stdout
            .contains("Rolling demo 2.0.0 out one host at a time, under a request loop: succeeded"),
        "{stdout}"
    );
    assert!(
        stdout.contains(", failed: 0"),
        "requests failed during the rollout:\n{stdout}"
    );
    assert!(
        stdout.contains("Trying the broken demo 3.0.0: rolled_back"),
        "{stdout}"
    );
    let after = stdout
        .rsplit("== Trying the broken demo 3.0.0")
        .next()
        .unwrap();
    let (broken, analysed) = after
        .split_once("== Trying demo 4.0.0")
        .expect("the fourth act");
    assert_eq!(
        broken.matches("-> activating").count(),
        1,
        "3.0.0 reached more than one host:\n{broken}"
    );
    assert_eq!(
        broken.matches(": demo-service 2.0.0").count(),
        3,
        "{broken}"
    );
    // 4.0.0 passes its health gate on its first host, and analysis rolls
    // it back before a second host starts.
    assert!(
        stdout.contains("healthy by its probe but failing requests, with analysis: rolled_back"),
        "{stdout}"
    );
    assert_eq!(
        analysed.matches("-> activating").count(),
        1,
        "4.0.0 reached more than one host:\n{analysed}"
    );
    assert!(analysed.contains("activating -> healthy"), "{analysed}");
    assert!(analysed.contains("errors -> fail"), "{analysed}");
    assert!(analysed.contains("the verdict: errors FAIL"), "{analysed}");
    assert_eq!(
        analysed.matches(": demo-service 2.0.0").count(),
        3,
        "{analysed}"
    );
    assert!(stdout.contains("demo@2.0.0 (running, healthy)"), "{stdout}");
    let dir = stdout.lines().next().unwrap().rsplit(' ').next().unwrap();
    assert!(
        !std::path::Path::new(dir).exists(),
        "the demo left {dir} behind"
    );
}

#[test]
fn ctrl_c_stops_a_running_demo_cleanly() {
    use baton_tests::{SOON, wait_until};
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let out_dir = tempfile::tempdir().unwrap();
    let out_path = out_dir.path().join("stdout");
    let mut child = Command::new(bin("baton"))
        .args(["demo", "--keep-running"])
        .env_remove("BATON_COORDINATOR")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&out_path).unwrap_or_else(|_| String::new());
    wait_until("the demo to wait for Ctrl-C", SOON, || {
        read().contains("Press Ctrl-C").then_some(())
    });
    kill(
        Pid::from_raw(i32::try_from(child.id()).unwrap()),
        Signal::SIGINT,
    )
    .unwrap();
    let status = wait_until("the demo to exit", SOON, || child.try_wait().unwrap());
    assert!(status.success(), "{status:?}\n{}", read());
    let stdout = read();
    assert!(stdout.contains("Everything stopped"), "{stdout}");
    let dir = stdout
        .lines()
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned();
    assert!(
        !std::path::Path::new(&dir).exists(),
        "the demo left {dir} behind"
    );
}
