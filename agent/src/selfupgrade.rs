//! The agent upgrading itself: artifacts of kind `agent` (always named
//! `baton-agent`) roll out through the same engine as services.
//!
//! ```text
//! <data-dir>/agent/state.json        which agent release runs; a trial in progress
//! <data-dir>/agent/watchdog.sock     the watchdog of a trial, while it runs
//! <data-dir>/agent/baton-agent/releases/<version>/baton-agent
//! ```
//!
//! Activating agent version V, as the running agent A:
//! 1. A records a *trial* in `state.json`: the command, V, the binary and
//!    version to go back to, its own arguments, its pid and start time, and
//!    the deadline (`healthy_deadline` from now).
//! 2. A starts a *watchdog* W: its own binary, known good, with
//!    `--upgrade-watchdog`. W binds `watchdog.sock` and says so.
//! 3. A re-executes itself (execve) into V's binary, B. The pid stays, so
//!    the services stay its children and systemd's main pid is unchanged;
//!    nothing is restarted and no socket is closed (the services hold
//!    theirs, and B copies them back as after any agent restart).
//! 4. B knows it is the trial by its pid and start time. It adopts the
//!    services, connects to the coordinator, stays connected for
//!    `min_healthy_time` and tells W `ready`. W, and only W, commits
//!    (`current` = V, trial cleared), answers `committed` and exits; B
//!    journals the command as succeeded.
//! 5. If B dies first, or the deadline passes, W reverts: it records the
//!    failure, sets `current` back, SIGKILLs B (the services live on in
//!    their own process groups), and then either exits for systemd to start
//!    the unit again or, outside systemd, executes the previous binary
//!    itself with A's arguments. That agent journals the failure, so the
//!    coordinator's re-sent command learns it.
//!
//! Every agent start checks the state first: a trial recorded for a process
//! that is gone (the host rebooted, W was killed) is reverted the same way,
//! and when `current` names a release this process is not running, it
//! executes that release's binary (a *trampoline*: systemd's `ExecStart`
//! keeps naming the installed binary).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use baton_common::artifact::{AGENT_NAME, fsync_dir};
use baton_common::command::{CommandUpdate, HealthGate, Outcome};
use baton_common::time::{from_unix_millis, unix_millis};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::journal::Journal;
use crate::releases::Releases;
use crate::supervisor::{is_same_process, live_start_time};

/// The hidden flag that makes `baton-agent` a watchdog.
pub const WATCHDOG_FLAG: &str = "--upgrade-watchdog";
/// What the watchdog prints once it listens.
const WATCHING: &str = "watching";
/// How long the new agent waits for the watchdog's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the watchdog looks at the new agent.
const WATCH_EVERY: Duration = Duration::from_millis(20);
/// How long the watchdog waits for a killed agent to be gone.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long the agent must look gone before the watchdog believes it:
/// while a multi-threaded process executes a new program, its main thread
/// shows as a zombie for a moment.
const GONE_FOR: Duration = Duration::from_millis(500);

/// `<data-dir>/agent/state.json`.
// Unknown fields are ignored, not refused: an older agent that a rollback
// returns to must still start on a newer agent's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    /// The agent release that runs; `None`: the binary installed on the
    /// host (`base`).
    current: Option<String>,
    /// The installed binary, recorded at the first upgrade.
    base: Option<Base>,
    /// An upgrade in progress.
    trial: Option<Trial>,
    /// An upgrade that failed, not yet journaled.
    failed: Option<Failed>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Base {
    exe: PathBuf,
    version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Trial {
    command_id: String,
    /// The version being tried.
    version: String,
    /// What `current` becomes when it is confirmed (`None`: the base).
    target: Option<String>,
    /// What `current` was.
    previous: Option<String>,
    previous_exe: PathBuf,
    previous_version: String,
    /// The arguments the agent was started with (argv[0] included).
    argv: Vec<String>,
    agent_pid: u32,
    agent_start: u64,
    /// Unix milliseconds.
    deadline: u64,
    #[serde(with = "humantime_serde")]
    min_healthy_time: Duration,
    #[serde(with = "humantime_serde")]
    healthy_deadline: Duration,
    /// Whether the agent runs under systemd, which restarts it.
    systemd: bool,
    /// The watchdog's pid and start time, once it runs.
    #[serde(default)]
    watchdog: Option<(u32, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Failed {
    command_id: String,
    reason: String,
}

/// What `main` does after [`boot`].
pub enum Boot {
    /// Run as this process.
    Run(SelfUpgrade),
    /// Run another binary instead (the trampoline); `exec` it.
    Exec(Command),
}

/// A trial this process is the new agent of.
#[derive(Debug, Clone)]
pub struct TrialInfo {
    /// The activation's command id.
    pub command_id: String,
    /// How long to stay connected before confirming.
    pub min_healthy_time: Duration,
}

/// The lock that makes one agent per data directory: held for the life of
/// the process (released by the kernel at exit, and at exec, after which
/// the new agent takes it again).
#[derive(Clone)]
struct DirLock(#[allow(dead_code)] Option<Arc<nix::fcntl::Flock<std::fs::File>>>);

impl std::fmt::Debug for DirLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "held" } else { "none" })
    }
}

/// Takes `<data-dir>/agent.lock`, or says who has it.
fn lock_data_dir(data_dir: &Path) -> Result<DirLock, String> {
    let path = data_dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(DirLock(Some(Arc::new(lock)))),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let pid = std::fs::read_to_string(data_dir.join("agent.pid"))
                .unwrap_or_else(|_| String::new());
            Err(format!(
                "another baton-agent (pid {}) runs on {}; one agent per data directory",
                pid.trim(),
                data_dir.display()
            ))
        }
        Err((_, e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

/// The agent's view of its own releases.
#[derive(Debug, Clone)]
pub struct SelfUpgrade {
    data_dir: PathBuf,
    dir: PathBuf,
    releases: Releases,
    version: String,
    /// Whether this process is `baton-agent` itself (an agent run inside
    /// another program cannot execute into a new binary).
    enabled: bool,
    trial: Option<TrialInfo>,
    _lock: DirLock,
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

fn load(dir: &Path) -> Result<State, String> {
    let path = state_path(dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is corrupt: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes the state atomically and durably.
fn save(dir: &Path, state: &State) -> Result<(), String> {
    let path = state_path(dir);
    let tmp = dir.join(format!(".state-{:08x}.json", fastrand::u32(..)));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        fsync_dir(dir)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn current_exe() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("cannot tell which binary runs: {e}"))
}

fn own_pid() -> u32 {
    std::process::id()
}

fn args() -> Result<Vec<String>, String> {
    std::env::args_os()
        .map(|a| {
            a.into_string()
                .map_err(|a| format!("the agent's argument {a:?} is not UTF-8"))
        })
        .collect()
}

/// A command running `exe` with `argv[1..]`, stdout on stderr (a watchdog's
/// stdout is a pipe to a process that is gone).
fn agent_command(exe: &Path, argv: &[String]) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args(argv.iter().skip(1));
    if let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() {
        cmd.stdout(Stdio::from(fd));
    }
    cmd
}

impl SelfUpgrade {
    /// The store of agent releases, for staging.
    pub fn releases(&self) -> &Releases {
        &self.releases
    }

    /// The version this agent reports: its release's, or the version it
    /// was built as.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The trial this process is the new agent of, if any.
    pub fn trial(&self) -> Option<&TrialInfo> {
        self.trial.as_ref()
    }

    /// An agent inside another program (tests, `baton demo`): it reports
    /// its build version and refuses agent activations.
    pub fn in_process(data_dir: &Path) -> Self {
        let dir = data_dir.join("agent");
        Self {
            data_dir: data_dir.to_owned(),
            releases: Releases::at(dir.clone()),
            dir,
            version: baton_common::VERSION.to_owned(),
            enabled: false,
            trial: None,
            _lock: DirLock(None),
        }
    }

    fn binary(&self, version: &str) -> PathBuf {
        self.releases
            .release_dir(AGENT_NAME, version)
            .join(AGENT_NAME)
    }

    /// Starts running `version`: records the trial, starts the watchdog and
    /// re-executes into the new binary. Returns only on failure, with
    /// nothing changed. Blocking.
    pub fn begin(&self, command_id: &str, version: &str, gate: HealthGate) -> Result<(), String> {
        if !self.enabled {
            return Err("this agent runs inside another program and cannot upgrade itself".into());
        }
        let mut state = load(&self.dir)?;
        if let Some(t) = &state.trial {
            return Err(format!(
                "the agent is already being upgraded to {} (command {})",
                t.version, t.command_id
            ));
        }
        let exe = current_exe()?;
        if exe.to_string_lossy().ends_with(" (deleted)") {
            return Err(format!(
                "this agent's binary {} was replaced while it runs; restart the agent, then upgrade it",
                exe.display()
            ));
        }
        let base = match &state.base {
            Some(b) => b.clone(),
            None if state.current.is_none() => Base {
                exe: exe.clone(),
                version: self.version.clone(),
            },
            None => return Err("the agent's state names a release but no installed binary".into()),
        };
        let (target, new_exe) = if self.binary(version).is_file() {
            (Some(version.to_owned()), self.binary(version))
        } else if base.version == version {
            (None, base.exe.clone())
        } else {
            return Err(format!(
                "baton-agent {version} is not staged on this host (stage it first)"
            ));
        };
        let sock = self.dir.join("watchdog.sock");
        if sock.as_os_str().len() > 100 {
            return Err(format!(
                "the data directory's path is too long for the watchdog's socket {}",
                sock.display()
            ));
        }
        let start = live_start_time(own_pid()).ok_or("cannot read this process's start time")?;
        state.base = Some(base);
        state.trial = Some(Trial {
            command_id: command_id.to_owned(),
            version: version.to_owned(),
            target,
            previous: state.current.clone(),
            previous_exe: exe.clone(),
            previous_version: self.version.clone(),
            argv: args()?,
            agent_pid: own_pid(),
            agent_start: start,
            deadline: unix_millis(baton_common::time::later(
                SystemTime::now(),
                gate.healthy_deadline,
            )),
            min_healthy_time: gate.min_healthy_time,
            healthy_deadline: gate.healthy_deadline,
            systemd: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: None,
        });
        save(&self.dir, &state)?;
        let undo = |state: &mut State, why: String| {
            state.trial = None;
            match save(&self.dir, state) {
                Ok(()) => why,
                Err(e) => format!("{why}; and {e}"),
            }
        };
        let mut watchdog = match self.start_watchdog(&exe) {
            Ok(w) => w,
            Err(e) => return Err(undo(&mut state, e)),
        };
        // Recorded, so the new agent knows whether the watchdog still
        // decides (it must not commit on its own while it does).
        let pid = watchdog.id();
        if let Some(t) = state.trial.as_mut() {
            t.watchdog = live_start_time(pid).map(|start| (pid, start));
        }
        if let Err(e) = save(&self.dir, &state) {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
            return Err(undo(&mut state, e));
        }
        info!(from = %self.version, to = %version, exe = %new_exe.display(), "re-executing into the new agent");
        let Some(argv) = state.trial.as_ref().map(|t| t.argv.clone()) else {
            return Err("the trial vanished".into());
        };
        let e = agent_command(&new_exe, &argv).exec();
        // Still here: the exec failed. Stand the watchdog down first, so
        // it does not revert (and kill) this agent.
        let _ = UnixStream::connect(&sock).and_then(|mut s| s.write_all(b"abort\n"));
        let _ = watchdog.wait();
        Err(undo(
            &mut state,
            format!("cannot execute {}: {e}", new_exe.display()),
        ))
    }

    fn start_watchdog(&self, exe: &Path) -> Result<std::process::Child, String> {
        let mut child = Command::new(exe)
            .arg(WATCHDOG_FLAG)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the upgrade watchdog: {e}"))?;
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|out| BufReader::new(out).read_line(&mut line));
        if matches!(read, Some(Ok(_))) && line.trim() == WATCHING {
            return Ok(child);
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(format!(
            "the upgrade watchdog did not start (it said {:?})",
            line.trim()
        ))
    }

    /// The new agent's side of a trial, once it is healthy: asks the
    /// watchdog to commit (or commits itself when the watchdog is gone).
    /// Blocking.
    pub fn confirm(&self) -> Result<(), String> {
        let sock = self.dir.join("watchdog.sock");
        let answer = UnixStream::connect(&sock).and_then(|mut s| {
            s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
            writeln!(s, "ready {}", self.version)?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok(line)
        });
        match answer {
            Ok(line) if line.starts_with("committed") => {
                // Reap the watchdog, our child since before the exec.
                if let Some(pid) = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse::<i32>().ok())
                    .and_then(rustix::process::Pid::from_raw)
                {
                    let _ =
                        rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
                }
                info!(version = %self.version, "the upgrade is confirmed");
                Ok(())
            }
            other => {
                let mut state = load(&self.dir)?;
                match &state.trial {
                    // The watchdog still runs: it decides (it may be
                    // reverting right now).
                    Some(t)
                        if t.agent_pid == own_pid()
                            && t.watchdog.is_some_and(|(p, s)| is_same_process(p, s)) =>
                    {
                        Err(format!("the upgrade watchdog did not confirm: {other:?}"))
                    }
                    // No watchdog any more (it was killed): if the trial
                    // is still ours, nobody else will decide it.
                    Some(t) if t.agent_pid == own_pid() => {
                        warn!(answer = ?other, "the upgrade watchdog is gone; confirming the upgrade without it");
                        state.current = t.target.clone();
                        state.trial = None;
                        save(&self.dir, &state)
                    }
                    // Decided: committed unless a failure was recorded.
                    None if state.failed.is_none() => Ok(()),
                    _ => Err(format!("the upgrade watchdog did not confirm: {other:?}")),
                }
            }
        }
    }

    /// Removes agent releases beyond `keep`, never the current one or the
    /// installed binary's.
    pub fn prune(&self, keep: usize) {
        let Ok(state) = load(&self.dir) else { return };
        let mut protect: Vec<&str> = vec![self.version.as_str()];
        protect.extend(state.current.as_deref());
        match self.releases.prune(AGENT_NAME, keep, &protect) {
            Ok(gone) if !gone.is_empty() => info!(?gone, "removed old agent releases"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot remove old agent releases"),
        }
    }
}

/// Runs first in every `baton-agent`: settles a trial whose agent is gone,
/// journals a failed upgrade, and says whether to run this binary or
/// another.
pub fn boot(data_dir: &Path) -> Result<Boot, String> {
    let dir = data_dir.join("agent");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let lock = lock_data_dir(data_dir)?;
    let mut state = load(&dir)?;
    let me = own_pid();
    let mut trial = None;
    if let Some(t) = state.trial.clone() {
        if t.agent_pid == me && live_start_time(me) == Some(t.agent_start) {
            info!(version = %t.version, command = %t.command_id, "starting as the new agent of an upgrade on trial");
            trial = Some(TrialInfo {
                command_id: t.command_id,
                min_healthy_time: t.min_healthy_time,
            });
        } else if is_same_process(t.agent_pid, t.agent_start) {
            return Err(format!(
                "another baton-agent (pid {}) runs on {} and is upgrading itself",
                t.agent_pid,
                data_dir.display()
            ));
        } else {
            let reason = format!(
                "the agent stopped before baton-agent {} was confirmed (the host restarted, or the upgrade watchdog died); back to {}",
                t.version, t.previous_version
            );
            warn!(%reason, "reverting an unfinished agent upgrade");
            state.failed = Some(Failed {
                command_id: t.command_id,
                reason,
            });
            state.current = t.previous;
            state.trial = None;
            save(&dir, &state)?;
        }
    }
    if let Some(f) = state.failed.clone() {
        let journal = Journal::open(data_dir).map_err(|e| {
            format!(
                "cannot open the command journal in {}: {e}",
                data_dir.display()
            )
        })?;
        journal
            .record(&CommandUpdate::done(
                &f.command_id,
                Outcome::Failed,
                f.reason,
            ))
            .map_err(|e| format!("cannot journal the failed agent upgrade: {e}"))?;
        state.failed = None;
        save(&dir, &state)?;
    }
    let releases = Releases::at(dir.clone());
    let exe = current_exe()?;
    let mut version = baton_common::VERSION.to_owned();
    let running = |v: &str| releases.release_dir(AGENT_NAME, v).join(AGENT_NAME);
    if let Some(t) = &state.trial
        && trial.is_some()
    {
        version = t.version.clone();
    } else if state.current.is_none()
        && state.trial.is_none()
        && let Some(base) = &state.base
        && (base.exe != exe || base.version != version)
        && !exe.to_string_lossy().ends_with(" (deleted)")
        && !exe.starts_with(&dir)
    {
        // Running the installed binary, which may have been upgraded by
        // the host's package manager since: that is what a rollback to
        // "the installed agent" means from now on.
        info!(exe = %exe.display(), %version, "the installed agent changed");
        state.base = Some(Base {
            exe: exe.clone(),
            version: version.clone(),
        });
        save(&dir, &state)?;
    } else if let Some(v) = &state.current {
        let binary = running(v);
        if same_file(&exe, &binary) {
            version = v.clone();
        } else if binary.is_file() {
            info!(release = %v, exe = %binary.display(), "running the agent's current release");
            return Ok(Boot::Exec(agent_command(&binary, &args()?)));
        } else {
            error!(release = %v, "the agent's current release is missing; running the installed binary");
        }
    }
    Ok(Boot::Run(SelfUpgrade {
        data_dir: data_dir.to_owned(),
        releases,
        dir,
        version,
        enabled: true,
        trial,
        _lock: lock,
    }))
}

/// `baton-agent --upgrade-watchdog --data-dir DIR`: watches the trial in
/// `DIR/agent/state.json` (see the module docs).
pub fn watchdog(data_dir: &Path) -> ExitCode {
    match watch(data_dir) {
        Ok(code) => code,
        Err(e) => {
            error!(error = %e, "the upgrade watchdog failed");
            ExitCode::FAILURE
        }
    }
}

fn watch(data_dir: &Path) -> Result<ExitCode, String> {
    let dir = data_dir.join("agent");
    let state = load(&dir)?;
    let t = state
        .trial
        .clone()
        .ok_or("no agent upgrade is in progress")?;
    let sock = dir.join("watchdog.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)
        .map_err(|e| format!("cannot listen on {}: {e}", sock.display()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot listen on {}: {e}", sock.display()))?;
    println!("{WATCHING}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let deadline = from_unix_millis(t.deadline);
    let mut gone_since: Option<std::time::Instant> = None;
    let result = loop {
        if SystemTime::now() >= deadline {
            break Err(format!(
                "the new agent {} did not come back healthy within {}",
                t.version,
                humantime::format_duration(t.healthy_deadline)
            ));
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let mut line = String::new();
                let read = stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(2))))
                    .and_then(|()| BufReader::new(&stream).read_line(&mut line));
                match (read, line.split_whitespace().next()) {
                    (Ok(_), Some("ready")) => break Ok(stream),
                    (Ok(_), Some("abort")) => {
                        // The old agent could not execute the new one and
                        // stays; it clears the trial itself.
                        let _ = std::fs::remove_file(&sock);
                        return Ok(ExitCode::SUCCESS);
                    }
                    _ => {}
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => warn!(error = %e, "the upgrade watchdog cannot accept"),
        }
        if is_same_process(t.agent_pid, t.agent_start) {
            gone_since = None;
        } else if gone_since
            .get_or_insert_with(std::time::Instant::now)
            .elapsed()
            >= GONE_FOR
        {
            break Err(format!(
                "the new agent {} exited before it came back healthy",
                t.version
            ));
        }
        std::thread::sleep(WATCH_EVERY);
    };
    let _ = std::fs::remove_file(&sock);
    let mut state = load(&dir)?;
    match result {
        Ok(mut stream) => {
            state.current = t.target.clone();
            state.trial = None;
            save(&dir, &state)?;
            info!(version = %t.version, "the new agent is healthy; upgrade committed");
            let _ = writeln!(stream, "committed {}", own_pid());
            Ok(ExitCode::SUCCESS)
        }
        Err(reason) => {
            warn!(%reason, back_to = %t.previous_version, "reverting the agent upgrade");
            state.failed = Some(Failed {
                command_id: t.command_id.clone(),
                reason: format!("{reason}; reverted to {}", t.previous_version),
            });
            state.current = t.previous.clone();
            state.trial = None;
            save(&dir, &state)?;
            if is_same_process(t.agent_pid, t.agent_start) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(t.agent_pid).unwrap_or(i32::MAX)),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let until = std::time::Instant::now() + KILL_WAIT;
                while is_same_process(t.agent_pid, t.agent_start)
                    && std::time::Instant::now() < until
                {
                    std::thread::sleep(WATCH_EVERY);
                }
            }
            if t.systemd {
                info!("systemd starts the previous agent");
                return Ok(ExitCode::SUCCESS);
            }
            info!(exe = %t.previous_exe.display(), "starting the previous agent");
            let e = agent_command(&t.previous_exe, &t.argv).exec();
            Err(format!(
                "cannot execute the previous agent {}: {e}",
                t.previous_exe.display()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_trial_is_reverted_and_journaled_at_boot() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("agent");
        std::fs::create_dir_all(&dir).unwrap();
        let state = State {
            current: Some("2.0.0".into()),
            base: Some(Base {
                exe: "/usr/bin/baton-agent".into(),
                version: "1.0.0".into(),
            }),
            trial: Some(Trial {
                command_id: "c-1".into(),
                version: "3.0.0".into(),
                target: Some("3.0.0".into()),
                previous: Some("2.0.0".into()),
                previous_exe: "/x".into(),
                previous_version: "2.0.0".into(),
                argv: vec!["baton-agent".into()],
                // No process has pid 0 with this start time.
                agent_pid: u32::MAX - 1,
                agent_start: 1,
                deadline: 0,
                min_healthy_time: Duration::ZERO,
                healthy_deadline: Duration::from_secs(1),
                systemd: false,
                watchdog: None,
            }),
            failed: None,
        };
        save(&dir, &state).unwrap();
        // 2.0.0 is not staged, so the trampoline does not fire.
        let Boot::Run(su) = boot(data.path()).unwrap() else {
            panic!("expected to run")
        };
        assert!(su.trial().is_none());
        let after = load(&dir).unwrap();
        assert_eq!(after.trial, None);
        assert_eq!(after.failed, None, "journaled, then cleared");
        assert_eq!(after.current.as_deref(), Some("2.0.0"));
        let journal = Journal::open(data.path()).unwrap();
        let done = journal.lookup("c-1").expect("the failure is journaled");
        assert!(
            done.error
                .contains("before baton-agent 3.0.0 was confirmed"),
            "{done:?}"
        );
    }

    #[test]
    fn one_agent_per_data_directory() {
        let data = tempfile::tempdir().unwrap();
        let Boot::Run(first) = boot(data.path()).unwrap() else {
            panic!("expected to run")
        };
        std::fs::write(data.path().join("agent.pid"), "4242\n").unwrap();
        let Err(e) = boot(data.path()) else {
            panic!("a second agent on one data directory must be refused")
        };
        assert!(e.contains("another baton-agent (pid 4242)"), "{e}");
        drop(first);
        assert!(matches!(boot(data.path()), Ok(Boot::Run(_))));
    }

    #[test]
    fn a_corrupt_state_file_stops_the_agent_with_its_path() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("agent");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("state.json"), b"{nope").unwrap();
        let Err(e) = boot(data.path()) else {
            panic!("a corrupt state must stop the agent")
        };
        assert!(e.contains("state.json is corrupt"), "{e}");
    }

    #[test]
    fn an_in_process_agent_refuses_to_upgrade_itself() {
        let data = tempfile::tempdir().unwrap();
        let su = SelfUpgrade::in_process(data.path());
        let e = su
            .begin(
                "c",
                "2.0.0",
                HealthGate {
                    min_healthy_time: Duration::ZERO,
                    healthy_deadline: Duration::from_secs(1),
                },
            )
            .unwrap_err();
        assert!(e.contains("cannot upgrade itself"), "{e}");
    }
}
