//! Hooks (`pre_start`, `post_start`, `pre_stop`, `post_stop`): commands
//! the agent runs around a service, bounded in time and killed whole.

use baton_common::command::FailureKind;

use super::failure::{Classify, Failure};
use super::release::Release;
use std::io::Write;

use tracing::warn;

use crate::service::{self, Hook, ServiceSpec};

/// What else ends a hook early: the deadline of the activation it is part
/// of, and its cancellation (a rollback, an abort).
#[derive(Clone, Copy)]
pub(super) struct Bound<'a> {
    /// The activation's deadline.
    pub until: tokio::time::Instant,
    /// Its cancellation.
    pub cancel: &'a tokio_util::sync::CancellationToken,
}

/// Runs `hook` (`which`) of `release` in its directory with the service's
/// environment, in its own process group (killed whole at its timeout, at
/// `bound`'s deadline or when `bound` is cancelled). Its output is
/// appended to the release's service log; on failure its last lines go
/// into the error.
pub(super) async fn run_hook(
    release: &Release,
    which: &str,
    hook: Option<&Hook>,
    bound: Option<Bound<'_>>,
) -> Result<(), Failure> {
    run(
        &release.name,
        &release.version,
        which,
        hook,
        &release.dir,
        &release.spec,
        &release.run_dir,
        bound,
    )
    .await
    .or_fail(FailureKind::Hook)
}

#[allow(clippy::too_many_arguments)]
async fn run(
    service_name: &str,
    version: &str,
    which: &str,
    hook: Option<&Hook>,
    release_dir: &std::path::Path,
    spec: &ServiceSpec,
    run_dir: &std::path::Path,
    bound: Option<Bound<'_>>,
) -> Result<(), String> {
    let Some(hook) = hook else {
        return Ok(());
    };
    let Some((program, args)) = hook.command.split_first() else {
        return Ok(());
    };
    let fail = |why: String| format!("{which} hook of {service_name} {version} failed: {why}");
    let mut cmd = tokio::process::Command::new(service::resolve(release_dir, program));
    cmd.args(args)
        .envs(&spec.env)
        .env("BATON_SERVICE", service_name)
        .env("BATON_VERSION", version)
        .env("BATON_HOOK", which)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("BATON_ENROLL_TOKEN")
        .current_dir(release_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(r) = &spec.run_as {
        r.apply(&mut cmd);
    }
    let child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot run {program}: {e}")))?;
    let pgid = child.id();
    // The whole group: a hook's children must not outlive it.
    let kill = || {
        if let Some(pid) = pgid.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    };
    let left = bound.map(|b| {
        b.until
            .saturating_duration_since(tokio::time::Instant::now())
    });
    let limit = left.map_or(hook.timeout, |l| l.min(hook.timeout));
    let cancelled = async {
        match bound {
            Some(b) => b.cancel.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = tokio::time::timeout(limit, child.wait_with_output()) => r,
        () = cancelled => {
            kill();
            append_log(run_dir, which, b"", b"(killed: its activation was cancelled)\n");
            return Err(fail("its activation was cancelled; killed with its process group".into()));
        }
    };
    let output = match result {
        Ok(r) => r.map_err(|e| fail(e.to_string()))?,
        Err(_) => {
            kill();
            append_log(run_dir, which, b"", b"(killed at its timeout)\n");
            return Err(fail(if limit < hook.timeout {
                format!(
                    "still running when the activation's deadline came (after {}; its timeout is {}); killed with its process group",
                    humantime::format_duration(limit),
                    humantime::format_duration(hook.timeout)
                )
            } else {
                format!(
                    "timed out after {}; killed with its process group",
                    humantime::format_duration(hook.timeout)
                )
            }));
        }
    };
    append_log(run_dir, which, &output.stdout, &output.stderr);
    if output.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines[lines.len().saturating_sub(3)..].join(" | ");
    Err(fail(format!(
        "{}: {}",
        crate::supervisor::describe_exit(output.status),
        if last.is_empty() { "no output" } else { &last }
    )))
}

/// Appends a hook's output to the service log of its release.
fn append_log(run_dir: &std::path::Path, which: &str, stdout: &[u8], stderr: &[u8]) {
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(run_dir)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join(crate::supervisor::LOG_FILE))?;
        for line in String::from_utf8_lossy(stdout)
            .lines()
            .chain(String::from_utf8_lossy(stderr).lines())
        {
            writeln!(f, "[{which} hook] {line}")?;
        }
        Ok(())
    };
    if let Err(e) = write() {
        warn!(error = %e, "cannot write a hook's output to the service log");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn hooks_fail_with_their_last_lines_and_die_whole_at_their_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let pids = dir.path().join("pids");
        for (name, body) in [
            ("ok", "#!/bin/sh\ntest \"$MODE\" = migrate && test \"$BATON_HOOK\" = pre_start\necho migrated\n".to_owned()),
            ("fail", "#!/bin/sh\necho checking\necho 'schema 7 is newer than this release' >&2\nexit 3\n".to_owned()),
            ("hang", format!("#!/bin/sh\nsleep 300 &\necho $! > {}\nexec sleep 300\n", pids.display())),
        ] {
            let path = bin.join(name);
            std::fs::write(&path, body).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let spec = service::parse(
            "command = \"bin/ok\"\nenv = { MODE = \"migrate\" }\n",
            &BTreeMap::new(),
        )
        .unwrap();
        let hook = |cmd: &str, ms: u64| Hook {
            command: vec![cmd.to_owned()],
            timeout: Duration::from_millis(ms),
        };
        let run_it = |h: Hook| {
            let (dir, spec, run) = (dir.path().to_owned(), spec.clone(), run.clone());
            async move {
                let release = Release {
                    name: "api".into(),
                    version: "2.0.0".into(),
                    dir,
                    run_dir: run,
                    spec,
                };
                run_hook(&release, "pre_start", Some(&h), None).await
            }
        };
        run_it(hook("bin/ok", 10_000)).await.unwrap();
        let err = run_it(hook("bin/fail", 10_000)).await.unwrap_err();
        assert_eq!(
            err,
            Failure::new(
                FailureKind::Hook,
                "pre_start hook of api 2.0.0 failed: exited with status 3: checking | schema 7 is newer than this release"
            )
        );
        let log = std::fs::read_to_string(run.join("service.log")).unwrap();
        assert!(log.contains("[pre_start hook] migrated"), "{log}");
        assert!(log.contains("[pre_start hook] schema 7"), "{log}");

        let err = run_it(hook("bin/hang", 300)).await.unwrap_err().message;
        assert!(
            err.contains("timed out after 300ms; killed with its process group"),
            "{err}"
        );
        // The hook's background child died with it.
        let child: i32 = std::fs::read_to_string(&pids)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while crate::supervisor::is_alive_record(&crate::supervisor::ProcessRecord {
            pid: u32::try_from(child).unwrap(),
            start_time: read_start(child),
            version: String::new(),
            release_dir: PathBuf::new(),
            listen: vec![],
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "the hook's child {child} survived"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Field 22 of /proc/<pid>/stat (0 once the process is gone).
    fn read_start(pid: i32) -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|t| t.rsplit_once(')').map(|(_, r)| r.to_owned()))
            .and_then(|r| r.split_whitespace().nth(19).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn a_hook_ends_at_its_activations_deadline_or_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let spec = service::parse("command = \"/bin/sleep\"\n", &BTreeMap::new()).unwrap();
        let hook = Hook {
            command: vec!["/bin/sleep".to_owned(), "300".to_owned()],
            timeout: Duration::from_secs(3600),
        };
        async fn run_it(
            dir: &std::path::Path,
            spec: &ServiceSpec,
            hook: &Hook,
            bound: Bound<'_>,
        ) -> Result<(), String> {
            let run = dir.join("run");
            // The kind is the hook's; the tests below read the details.
            let release = Release {
                name: "api".into(),
                version: "2.0.0".into(),
                dir: dir.to_owned(),
                run_dir: run,
                spec: spec.clone(),
            };
            run_hook(&release, "pre_start", Some(hook), Some(bound))
                .await
                .map_err(|e| {
                    assert_eq!(e.kind, FailureKind::Hook);
                    e.message
                })
        }
        let started = std::time::Instant::now();
        let never = tokio_util::sync::CancellationToken::new();
        let err = run_it(
            dir.path(),
            &spec,
            &hook,
            Bound {
                until: tokio::time::Instant::now() + Duration::from_millis(300),
                cancel: &never,
            },
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("still running when the activation's deadline came"),
            "{err}"
        );
        let cancel = tokio_util::sync::CancellationToken::new();
        let cut = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cut.cancel();
        });
        let err = run_it(
            dir.path(),
            &spec,
            &hook,
            Bound {
                until: tokio::time::Instant::now() + Duration::from_secs(3600),
                cancel: &cancel,
            },
        )
        .await
        .unwrap_err();
        assert!(err.contains("its activation was cancelled"), "{err}");
        // Minutes of hook timeout left, cut to well under a minute.
        assert!(started.elapsed() < Duration::from_secs(60));
    }
}
