//! A disk that fills up on a host: staging fails with a precise error,
//! the old release keeps serving, and nothing is left behind that blocks
//! the next attempt. The agent's data directory is a tmpfs of 16 MiB in a
//! mount namespace of its own (`unshare`), so the disk really fills.

use std::path::PathBuf;

use baton_tests::fleet::Fleet;

const DISK: u64 = 16 << 20;

/// A path inside the agent's own view of the file system.
fn inside(fleet: &Fleet, rel: &str) -> PathBuf {
    let pid = fleet.agents["h1"].pid();
    PathBuf::from(format!(
        "/proc/{pid}/root{}",
        fleet.data_dir("h1").join(rel).display()
    ))
}

fn names(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Pushes demo `version` with a file of `bytes` bytes, random (so it does
/// not compress) or zeros (so it does, and only unpacking fills the disk).
fn push_with_file(fleet: &Fleet, version: &str, bytes: usize, random: bool) {
    let dir = fleet.release_dir(version, false);
    let data: Vec<u8> = if random {
        (0..bytes).map(|_| fastrand::u8(..)).collect()
    } else {
        vec![0; bytes]
    };
    std::fs::write(dir.join("ballast.bin"), data).unwrap();
    let file = fleet.pack_with(&dir, version, &fleet.env.path("release.key"));
    fleet.push(&file);
}

const QUICK: &str = "min_healthy_time = \"200ms\"\n";

#[test]
fn a_full_disk_fails_staging_precisely_and_leaves_nothing_that_blocks_the_next() {
    if let Some(why) = baton_tests::tmpfs_unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let mut fleet = Fleet::start(&["h1"]);
    fleet.agent_tmpfs = Some(DISK);
    fleet.start_agent("h1");
    fleet.wait_connected();
    fleet.install("1.0.0");

    // A download larger than the disk.
    push_with_file(&fleet, "2.0.0", 24 << 20, true);
    let s = fleet.roll("2.0.0", QUICK);
    assert_eq!(s["state"], "failed", "{s}");
    let error = Fleet::hosts_of(&s)["h1"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.contains("No space left on device")
            && error.contains("the partial download was deleted"),
        "{error}"
    );
    // The host's disk, not the source, failed it.
    assert_eq!(Fleet::hosts_of(&s)["h1"]["failure"], "disk", "{s}");
    assert_eq!(fleet.get("h1").as_deref(), Some("demo-service 1.0.0"));
    assert_eq!(names(&inside(&fleet, "downloads")), Vec::<String>::new());

    // The next release stages and activates.
    fleet.release("3.0.0", false);
    let s = fleet.roll("3.0.0", QUICK);
    assert_eq!(s["state"], "succeeded", "{s}");

    // A payload that downloads but does not fit unpacked.
    push_with_file(&fleet, "4.0.0", 40 << 20, false);
    let s = fleet.roll("4.0.0", QUICK);
    assert_eq!(s["state"], "failed", "{s}");
    let error = Fleet::hosts_of(&s)["h1"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(error.contains("No space left on device"), "{error}");
    assert_eq!(Fleet::hosts_of(&s)["h1"]["failure"], "disk", "{s}");
    let releases = names(&inside(&fleet, "services/demo/releases"));
    assert!(
        releases.iter().all(|r| !r.starts_with(".staging")),
        "{releases:?}"
    );
    assert!(names(&inside(&fleet, "downloads")).is_empty());
    assert_eq!(fleet.get("h1").as_deref(), Some("demo-service 3.0.0"));

    // A disk so full that even the journal cannot write: no empty
    // temporary files are left, and once there is room again all works.
    let filler = inside(&fleet, "filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0x55u8; 1 << 16];
    while std::io::Write::write_all(&mut f, &block).is_ok() {}
    drop(f);
    fleet.release("5.0.0", false);
    let s = fleet.roll("5.0.0", QUICK);
    assert_eq!(s["state"], "failed", "{s}");
    let journal = names(&inside(&fleet, "commands"));
    assert!(journal.iter().all(|n| !n.ends_with(".tmp")), "{journal:?}");
    assert_eq!(fleet.get("h1").as_deref(), Some("demo-service 3.0.0"));
    std::fs::remove_file(&filler).unwrap();
    let s = fleet.roll("5.0.0", QUICK);
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_eq!(fleet.get("h1").as_deref(), Some("demo-service 5.0.0"));
}
