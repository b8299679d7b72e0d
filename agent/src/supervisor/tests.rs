//! Tests of the supervisor: starting, adopting, restarting, stopping
//! real processes.
use std::collections::BTreeMap;

use super::*;

const LIMIT: Duration = Duration::from_secs(20);

fn sh(script: &str) -> ServiceSpec {
    ServiceSpec {
        command: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env: BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]),
        listen: vec![],
        stop_signal: Signal::SIGTERM,
        stop_timeout: Duration::from_secs(5),
        health: None,
        hooks: Default::default(),
        supervisor: Default::default(),
        ready: Default::default(),
        run_as: None,
    }
}

fn fast() -> SupervisorConfig {
    SupervisorConfig {
        restart_backoff_initial: Duration::from_millis(50),
        restart_backoff_max: Duration::from_secs(1),
        log_max_bytes: 1024 * 1024,
        unrecorded_ok: false,
    }
}

/// Polls `condition` until it holds or `LIMIT` passes.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + LIMIT;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn status_until(
    sup: &Supervisor,
    what: &str,
    condition: impl FnMut(&ProcessStatus) -> bool,
) -> ProcessStatus {
    let mut status = sup.status();
    tokio::time::timeout(LIMIT, status.wait_for(condition))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "timed out waiting until {what}: {:?}",
                *sup.status().borrow()
            )
        })
        .unwrap()
        .clone()
}

fn log(run: &Path) -> String {
    std::fs::read_to_string(run.join(LOG_FILE)).unwrap_or_else(|_| String::new())
}

/// How many processes of `crash_restart_then_stop` have logged.
fn starts(run: &Path) -> usize {
    log(run).matches("start api 1.0.0 hello\n").count()
}

#[test]
fn stat_fields_are_counted_after_the_last_paren() {
    let mut fields: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
    fields[0] = "S".into();
    fields[22 - 3] = "987654".into();
    let text = format!("4242 (we(ird) ) name) {}\n", fields.join(" "));
    assert_eq!(
        parse_stat(&text),
        Some(ProcStat {
            state: 'S',
            pgrp: 5,
            start_time: 987654
        })
    );
    assert_eq!(parse_stat("4242 (short) S 1"), None);
    let me = read_stat(std::process::id()).unwrap();
    assert!(is_live_state(me.state));
    assert!(me.start_time > 0);
}

#[test]
fn exits_are_described() {
    assert_eq!(
        describe_exit(ExitStatus::from_raw(3 << 8)),
        "exited with status 3"
    );
    assert_eq!(describe_exit(ExitStatus::from_raw(11)), "killed by SIGSEGV");
    assert_eq!(
        describe_exit(ExitStatus::from_raw(6 | 0x80)),
        "killed by SIGABRT (core dumped)"
    );
}

#[tokio::test]
async fn crash_restart_then_stop() {
    let release = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let run = run.path().join("api");
    let spec = sh("echo start $BATON_SERVICE $BATON_VERSION $GREETING; \
         if [ -e crashed ]; then exec sleep 60; fi; touch crashed; exit 3");
    let sup = Supervisor::start("api", "1.0.0", release.path(), spec, &run, fast()).unwrap();
    assert_eq!(sup.version(), "1.0.0");

    let status = status_until(&sup, "the first restart", |s| {
        s.restarts == 1 && matches!(s.state, ProcessState::Running { .. })
    })
    .await;
    assert_eq!(status.last_exit.as_deref(), Some("exited with status 3"));
    let pid = sup.pid().unwrap();
    assert!(is_alive(pid));
    assert!(*sup.alive().borrow());
    let record = read_process_file(&run).unwrap().unwrap();
    assert_eq!(
        record,
        ProcessRecord {
            pid,
            start_time: read_stat(pid).unwrap().start_time,
            version: "1.0.0".into(),
            release_dir: release.path().to_owned(),
            listen: vec![],
        }
    );

    // Killed only once it has logged, so the log count below is exact.
    eventually("the second process logs", || starts(&run) == 2).await;
    nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let status = status_until(&sup, "the second restart", |s| {
        s.restarts == 2 && matches!(s.state, ProcessState::Running { .. })
    })
    .await;
    assert_eq!(status.last_exit.as_deref(), Some("killed by SIGKILL"));
    let pid = sup.pid().unwrap();
    assert_eq!(read_process_file(&run).unwrap().unwrap().pid, pid);

    eventually("the third process logs", || starts(&run) == 3).await;
    let status = sup.status();
    let alive = sup.alive();
    sup.stop().await.unwrap();
    assert!(!is_alive(pid));
    assert!(!*alive.borrow());
    assert_eq!(status.borrow().state, ProcessState::Stopped);
    assert_eq!(
        status.borrow().last_exit.as_deref(),
        Some("killed by SIGTERM")
    );
    assert!(!run.join(PROCESS_FILE).exists());
    assert_eq!(starts(&run), 3, "{}", log(&run));
}

#[tokio::test]
async fn a_service_ignoring_the_stop_signal_is_killed() {
    let release = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let mut spec = sh("trap '' TERM; echo ready; exec sleep 60");
    spec.stop_timeout = Duration::from_millis(300);
    let sup = Supervisor::start("api", "1.0.0", release.path(), spec, run.path(), fast()).unwrap();
    let pid = sup.pid().unwrap();
    eventually("the trap is set", || log(run.path()).contains("ready")).await;
    let status = sup.status();
    let started = std::time::Instant::now();
    sup.stop().await.unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(!is_alive(pid));
    assert_eq!(
        status.borrow().last_exit.as_deref(),
        Some("killed by SIGKILL")
    );
    assert_eq!(status.borrow().restarts, 0);
}

#[tokio::test]
async fn stop_kills_the_whole_group() {
    let release = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    // The shell waits for a background child that ignores SIGTERM.
    let spec = {
        let mut spec = sh("(trap '' TERM; exec sleep 60) & echo $! > child; wait");
        spec.stop_timeout = Duration::from_millis(200);
        spec
    };
    let sup = Supervisor::start("api", "1.0.0", release.path(), spec, run.path(), fast()).unwrap();
    let child_file = release.path().join("child");
    eventually("the grandchild is started", || {
        std::fs::read_to_string(&child_file).is_ok_and(|s| s.ends_with('\n'))
    })
    .await;
    let grandchild: u32 = std::fs::read_to_string(&child_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(is_alive(grandchild));
    sup.stop().await.unwrap();
    assert!(!is_alive(grandchild));
}

#[tokio::test]
async fn adopt_after_drop_then_stop() {
    let release = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let sup = Supervisor::start(
        "api",
        "2.0.0",
        release.path(),
        sh("exec sleep 60"),
        run.path(),
        fast(),
    )
    .unwrap();
    let pid = sup.pid().unwrap();
    drop(sup);
    // Not synchronisation: a grace period in which a wrongful kill would
    // show.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        is_alive(pid),
        "dropping the supervisor must not stop the service"
    );

    let sup = Supervisor::adopt(
        "api",
        release.path(),
        sh("exec sleep 60"),
        run.path(),
        fast(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(sup.pid(), Some(pid));
    assert_eq!(sup.version(), "2.0.0");
    assert!(*sup.alive().borrow());
    let status = sup.status();
    sup.stop().await.unwrap();
    assert!(!is_alive(pid));
    assert_eq!(status.borrow().state, ProcessState::Stopped);
    assert!(!run.path().join(PROCESS_FILE).exists());
}

#[tokio::test]
async fn an_adopted_process_that_dies_is_restarted() {
    let release = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let spec = sh("echo run $BATON_VERSION; exec sleep 60");
    let sup = Supervisor::start(
        "api",
        "2.0.0",
        release.path(),
        spec.clone(),
        run.path(),
        fast(),
    )
    .unwrap();
    let pid = sup.pid().unwrap();
    eventually("the service logs", || log(run.path()).contains("run 2.0.0")).await;
    drop(sup);
    let sup = Supervisor::adopt("api", release.path(), spec, run.path(), fast())
        .unwrap()
        .unwrap();
    let mut alive = sup.alive();
    nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    tokio::time::timeout(LIMIT, alive.wait_for(|a| !*a))
        .await
        .unwrap()
        .unwrap();
    let status = status_until(&sup, "the restart", |s| {
        s.restarts == 1 && matches!(s.state, ProcessState::Running { .. })
    })
    .await;
    // The test process started it, so the adopter's reap may find the
    // status (the agent-restarted-in-place case) unless tokio's orphan
    // reaper took the zombie first: either is right.
    let exit = status.last_exit.unwrap();
    assert!(
        exit.starts_with("exited (status unknown") || exit.starts_with("killed by signal"),
        "{exit}"
    );
    let new_pid = sup.pid().unwrap();
    assert_ne!(new_pid, pid);
    assert_eq!(read_process_file(run.path()).unwrap().unwrap().pid, new_pid);
    eventually("the restarted process logs", || {
        log(run.path()).matches("run 2.0.0").count() == 2
    })
    .await;
    sup.stop().await.unwrap();
    assert!(!is_alive(new_pid));
}

#[tokio::test]
async fn stale_process_files_are_not_adopted() {
    let release = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let adopt = || Supervisor::adopt("api", release.path(), sh("exit 0"), run.path(), fast());
    assert!(adopt().unwrap().is_none());

    // A live pid, but another process's start time: a reused pid.
    let record = ProcessRecord {
        pid: std::process::id(),
        start_time: 1,
        version: "1.0.0".into(),
        release_dir: release.path().to_owned(),
        listen: vec![],
    };
    write_process_file(run.path(), &record).unwrap();
    assert!(adopt().unwrap().is_none());
    assert!(!run.path().join(PROCESS_FILE).exists());

    // A dead pid.
    let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    write_process_file(
        run.path(),
        &ProcessRecord {
            pid: dead,
            ..record
        },
    )
    .unwrap();
    assert!(adopt().unwrap().is_none());
    assert!(!run.path().join(PROCESS_FILE).exists());

    std::fs::write(run.path().join(PROCESS_FILE), "{not json").unwrap();
    assert!(adopt().unwrap().is_none());
    assert!(!run.path().join(PROCESS_FILE).exists());
}

#[tokio::test]
async fn a_missing_program_is_an_error() {
    let release = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let mut spec = sh("");
    spec.command = "bin/missing".into();
    let error = Supervisor::start("api", "1.0.0", release.path(), spec, run.path(), fast())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        error,
        format!(
            "cannot start {}/bin/missing: No such file or directory (os error 2)",
            release.path().display()
        )
    );
    assert!(!run.path().join(PROCESS_FILE).exists());
}

#[test]
fn cap_log_copies_and_truncates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(LOG_FILE);
    assert!(!cap_log(&path, 10).unwrap());
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    file.write_all(b"0123456789").unwrap();
    assert!(!cap_log(&path, 10).unwrap());
    file.write_all(b"abc").unwrap();
    assert!(cap_log(&path, 10).unwrap());
    assert_eq!(
        std::fs::read(dir.path().join("service.log.1")).unwrap(),
        b"0123456789abc"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    // The appending writer continues at the new end, leaving no hole.
    file.write_all(b"next").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"next");
}
