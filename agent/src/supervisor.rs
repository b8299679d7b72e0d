//! One service's process: spawn it, restart it when it dies, stop it.
//!
//! Services outlive the agent: a restarted (or upgraded, or crashed) agent
//! must find its services still running and pick them up again. So a
//! service runs in its own process group (signals aimed at the agent's group
//! never reach it), is never killed when its handle drops, and is recorded
//! in `<run_dir>/process.json` (pid, kernel start time, version, release
//! directory), which [`Supervisor::adopt`] reads back. The start time guards
//! against a recycled pid: a pid only names our process if the kernel's
//! start time for it still matches.
//!
//! Architecture invariant: dropping or aborting a [`Supervisor`] stops the
//! *monitoring* only; the only path that signals a service is
//! [`Supervisor::stop`] (and the clean-up of a dead service's leftover
//! group members).
//!
//! Both output streams are appended to `<run_dir>/service.log`, which is
//! capped by copy-and-truncate (see [`cap_log`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::process::Child;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use std::sync::Arc;

use command_fds::{CommandFdExt, FdMapping};

use crate::service::ServiceSpec;
use crate::sockets::ListenSocket;

/// The file in the run directory that records the running process.
pub const PROCESS_FILE: &str = "process.json";

/// The file in the run directory that collects the service's stdout and
/// stderr.
pub const LOG_FILE: &str = "service.log";

/// A process that ran at least this long before dying restarts after the
/// initial backoff again: it was healthy for a while, not crash-looping.
const STABLE_RUN: Duration = Duration::from_secs(10);

/// How often an adopted process (not our child, so no `wait`) is looked at.
const ADOPTED_POLL: Duration = Duration::from_millis(100);

/// How often the process group is looked at while stopping.
const STOP_POLL: Duration = Duration::from_millis(20);

/// How often the log's size is checked.
const LOG_CHECK_EVERY: Duration = Duration::from_secs(2);

/// How long SIGKILL may take before stopping fails. SIGKILL cannot be
/// ignored, so only a process stuck in the kernel gets this far.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// How a supervisor restarts and caps the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SupervisorConfig {
    /// The delay before the first restart (and after a run of 10 s or more).
    pub restart_backoff_initial: Duration,
    /// The cap on the delay, which doubles with each quick crash.
    pub restart_backoff_max: Duration,
    /// `service.log` is rotated to `service.log.1` beyond this size.
    pub log_max_bytes: u64,
    /// Start the process even when its `process.json` cannot be written
    /// (a full disk): an agent restart will not find it, but it serves.
    /// For bringing an old release back; otherwise a process that cannot
    /// be recorded is not started.
    pub unrecorded_ok: bool,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            restart_backoff_initial: Duration::from_secs(1),
            restart_backoff_max: Duration::from_secs(30),
            log_max_bytes: 10 * 1024 * 1024,
            unrecorded_ok: false,
        }
    }
}

/// What the supervised process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    /// The process runs.
    Running {
        /// Its pid, which is also its process group id.
        pid: u32,
    },
    /// The process died unexpectedly and is restarted after a delay.
    Restarting {
        /// The delay.
        after: Duration,
    },
    /// The process was stopped on purpose; it is not restarted.
    Stopped,
}

/// The supervisor's report on its process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessStatus {
    /// What the process is doing.
    pub state: ProcessState,
    /// How often the process was restarted after dying.
    pub restarts: u32,
    /// How the last process ended, e.g. "exited with status 3" or "killed by
    /// SIGSEGV".
    pub last_exit: Option<String>,
}

/// The contents of `process.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// The pid, which is also the process group id.
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks after boot): with the
    /// pid, it identifies the process even if the pid is reused.
    pub start_time: u64,
    /// The service version the process runs.
    pub version: String,
    /// The release directory the process was started from.
    pub release_dir: PathBuf,
    /// The `listen` entries handed to it as fds 3, 4, … (so the agent can
    /// recover the sockets from it after a restart).
    #[serde(default)]
    pub listen: Vec<String>,
}

/// Why supervising failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The program could not be started.
    #[error("cannot start {}: {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file in the run directory could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the file.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// `process.json` is not what this module writes.
    #[error("{}: {message}", path.display())]
    CorruptProcessFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The process survived SIGKILL.
    #[error("process group {pid} is still running {}s after SIGKILL", KILL_WAIT.as_secs())]
    StillRunning {
        /// The process (group) id.
        pid: u32,
    },
    /// The monitoring task panicked or was aborted.
    #[error("the supervisor task failed: {0}")]
    Task(String),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SupervisorError {
    let what = what.into();
    move |source| SupervisorError::Io { what, source }
}

/// Supervises one service process. The monitoring runs in a task owned by
/// this handle; dropping the handle aborts the task but leaves the process
/// running, to be picked up again with [`Supervisor::adopt`].
pub struct Supervisor {
    version: String,
    status: watch::Receiver<ProcessStatus>,
    alive: watch::Receiver<bool>,
    /// Asks the task to stop the process; `None` once used.
    stop: Option<oneshot::Sender<StopBound>>,
    /// `None` once joined by [`Supervisor::stop`].
    task: Option<JoinHandle<Result<Stopped, SupervisorError>>>,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Supervisor {
    /// Spawns the service now and supervises it. Fails if the program
    /// cannot be started or `process.json` cannot be written. Must be called
    /// within a Tokio runtime.
    pub fn start(
        name: &str,
        version: &str,
        release_dir: &Path,
        spec: ServiceSpec,
        run_dir: &Path,
        config: SupervisorConfig,
    ) -> Result<Self, SupervisorError> {
        Self::start_listening(
            name,
            version,
            release_dir,
            spec,
            run_dir,
            config,
            Arc::default(),
        )
    }

    /// Like [`Supervisor::start`], handing `sockets` to the process (and to
    /// every restart of it) as fds 3, 4, … with `LISTEN_FDS`, `LISTEN_PID`
    /// and `LISTEN_FDNAMES` set, as systemd's socket activation does.
    pub fn start_listening(
        name: &str,
        version: &str,
        release_dir: &Path,
        spec: ServiceSpec,
        run_dir: &Path,
        config: SupervisorConfig,
        sockets: Arc<Vec<ListenSocket>>,
    ) -> Result<Self, SupervisorError> {
        let ctx = Context {
            name: name.to_owned(),
            version: version.to_owned(),
            release_dir: release_dir.to_owned(),
            spec,
            run_dir: run_dir.to_owned(),
            config,
            sockets,
        };
        std::fs::create_dir_all(run_dir)
            .map_err(io_error(format!("cannot create {}", run_dir.display())))?;
        let running = ctx.spawn()?;
        info!(service = %name, version, pid = running.pid, "service started");
        Ok(Self::launch(ctx, running))
    }

    /// Picks up the process recorded in `run_dir/process.json`, e.g. after
    /// the agent restarted. Returns `None` (and removes the file) unless
    /// that pid is alive, is not a zombie, and has the recorded start time.
    /// The version is the recorded one. Must be called within a Tokio
    /// runtime.
    pub fn adopt(
        name: &str,
        release_dir: &Path,
        spec: ServiceSpec,
        run_dir: &Path,
        config: SupervisorConfig,
    ) -> Result<Option<Self>, SupervisorError> {
        Self::adopt_listening(name, release_dir, spec, run_dir, config, Arc::default())
    }

    /// Like [`Supervisor::adopt`]; a restart after a crash gets `sockets`
    /// (recovered from the adopted process by the caller).
    pub fn adopt_listening(
        name: &str,
        release_dir: &Path,
        spec: ServiceSpec,
        run_dir: &Path,
        config: SupervisorConfig,
        sockets: Arc<Vec<ListenSocket>>,
    ) -> Result<Option<Self>, SupervisorError> {
        let path = run_dir.join(PROCESS_FILE);
        let record = match read_process_file(run_dir) {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(None),
            Err(SupervisorError::CorruptProcessFile { message, .. }) => {
                warn!(service = %name, file = %path.display(), %message, "removing an unreadable process file");
                remove_process_file(run_dir)?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if !is_same_process(record.pid, record.start_time) {
            info!(service = %name, pid = record.pid, "the recorded process is gone; removing the process file");
            remove_process_file(run_dir)?;
            return Ok(None);
        }
        if record.release_dir != release_dir {
            warn!(
                service = %name,
                recorded = %record.release_dir.display(),
                given = %release_dir.display(),
                "adopting a process started from another release directory; restarts use the given one"
            );
        }
        info!(service = %name, version = %record.version, pid = record.pid, "adopted a running service");
        let ctx = Context {
            name: name.to_owned(),
            version: record.version,
            release_dir: release_dir.to_owned(),
            spec,
            run_dir: run_dir.to_owned(),
            config,
            sockets,
        };
        let running = Running {
            process: Process::Adopted {
                pid: record.pid,
                start_time: record.start_time,
            },
            pid: record.pid,
            since: Instant::now(),
        };
        Ok(Some(Self::launch(ctx, running)))
    }

    fn launch(ctx: Context, running: Running) -> Self {
        let (status_tx, status) = watch::channel(ProcessStatus {
            state: ProcessState::Running { pid: running.pid },
            restarts: 0,
            last_exit: None,
        });
        let (alive_tx, alive) = watch::channel(true);
        let (stop_tx, stop_rx) = oneshot::channel();
        let version = ctx.version.clone();
        let monitor = Monitor {
            ctx,
            status: status_tx,
            alive: alive_tx,
        };
        Self {
            version,
            status,
            alive,
            stop: Some(stop_tx),
            task: Some(tokio::spawn(monitor.run(running, stop_rx))),
        }
    }

    /// The current process's pid (also its process group id), if one runs.
    pub fn pid(&self) -> Option<u32> {
        match self.status.borrow().state {
            ProcessState::Running { pid } => Some(pid),
            _ => None,
        }
    }

    /// The service version this supervisor runs.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The process's state, restart count and last exit.
    pub fn status(&self) -> watch::Receiver<ProcessStatus> {
        self.status.clone()
    }

    /// True while the current process runs; false between a death and the
    /// restart, and after [`Supervisor::stop`]. Closed when the supervisor
    /// is dropped.
    pub fn alive(&self) -> watch::Receiver<bool> {
        self.alive.clone()
    }

    /// Sends the spec's stop signal to the process group, waits up to
    /// `stop_timeout` for the group to be gone, then SIGKILLs the group and
    /// waits again. Removes `process.json`. Nothing is restarted afterwards.
    pub async fn stop(self) -> Result<(), SupervisorError> {
        self.stop_within(StopBound::default()).await.map(drop)
    }

    /// [`Supervisor::stop`], with the wait for the stop signal cut short
    /// (and SIGKILL sent at once) when `bound` says: at its deadline, or
    /// when its token is cancelled. Says whether and why it was forced.
    pub async fn stop_within(mut self, bound: StopBound) -> Result<Stopped, SupervisorError> {
        if let Some(stop) = self.stop.take() {
            // An error means the task has already ended; its result says why.
            let _ = stop.send(bound);
        }
        match self.task.take() {
            Some(task) => task
                .await
                .map_err(|e| SupervisorError::Task(e.to_string()))?,
            None => Ok(Stopped::default()),
        }
    }
}

/// How long a stop may wait for the process to exit on its stop signal,
/// besides its `stop_timeout`.
#[derive(Debug, Clone, Default)]
pub struct StopBound {
    /// Kill it at this instant at the latest.
    pub until: Option<tokio::time::Instant>,
    /// Kill it as soon as this is cancelled.
    pub cut: CancellationToken,
}

/// Why a process was killed instead of exiting on its stop signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forced {
    /// Its `stop_timeout` ran out.
    StopTimeout,
    /// The bound's deadline came first.
    Deadline,
    /// The bound's token was cancelled.
    Cancelled,
}

/// How a stop ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stopped {
    /// Killed, and why; `None` when it exited on its stop signal (or
    /// nothing ran).
    pub forced: Option<Forced>,
    /// How long it was given before it was killed or exited.
    pub waited: Duration,
    /// TCP connections it still had open when it was killed (the target
    /// is 0).
    pub open_connections: u32,
}

/// What the monitoring task needs to (re)start the service.
struct Context {
    name: String,
    version: String,
    release_dir: PathBuf,
    spec: ServiceSpec,
    run_dir: PathBuf,
    config: SupervisorConfig,
    /// Handed to every process as fds 3, 4, …
    sockets: Arc<Vec<ListenSocket>>,
}

/// A process being supervised.
enum Process {
    /// Spawned by this supervisor: `wait` tells when and how it ends.
    Child(Child),
    /// Found running (see [`Supervisor::adopt`]): not our child, so it is
    /// watched through `/proc`.
    Adopted { pid: u32, start_time: u64 },
}

struct Running {
    process: Process,
    pid: u32,
    since: Instant,
}

impl Context {
    /// Spawns the service and records it in `process.json`.
    fn spawn(&self) -> Result<Running, SupervisorError> {
        let log_path = self.run_dir.join(LOG_FILE);
        let stdout = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&log_path)
            .map_err(io_error(format!("cannot open {}", log_path.display())))?;
        let stderr = stdout
            .try_clone()
            .map_err(io_error(format!("cannot open {}", log_path.display())))?;
        let program = self.spec.program(&self.release_dir);
        // The shell below would only say so after the fork: a program that
        // is not there, or not a file, is reported precisely now.
        match std::fs::metadata(&program) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(SupervisorError::Spawn {
                    program: program.clone(),
                    source: std::io::Error::other("not a file"),
                });
            }
            Err(source) => {
                return Err(SupervisorError::Spawn {
                    program: program.clone(),
                    source,
                });
            }
        }
        // The process waits at a gate until it is recorded: a shell reads
        // "go" from a pipe on its stdin, which the agent writes only once
        // `process.json` is durable, then execs the service (keeping its
        // pid). An agent killed in between closes the pipe unwritten, and
        // the shell exits without running the service, so no process is
        // ever left running that a restarted agent cannot find.
        let (gate, go) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| {
            SupervisorError::Spawn {
                program: program.clone(),
                source: std::io::Error::from(e),
            }
        })?;
        let listen = if self.sockets.is_empty() {
            ""
        } else {
            // LISTEN_PID must be the service's own pid, known only after
            // the fork: the shell sets it to its own and execs the
            // service, which keeps that pid (and the inherited fds).
            "LISTEN_PID=$$; export LISTEN_PID; "
        };
        let mut command = tokio::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(format!(
                "read -r go && [ \"$go\" = go ] || exit 125; exec </dev/null; {listen}exec \"$0\" \"$@\""
            ))
            .arg(&program)
            .args(&self.spec.args)
            .stdin(Stdio::from(gate));
        if !self.sockets.is_empty() {
            command
                .env("LISTEN_FDS", self.sockets.len().to_string())
                .env(
                    "LISTEN_FDNAMES",
                    self.sockets
                        .iter()
                        .map(|s| s.spec.fd_name())
                        .collect::<Vec<_>>()
                        .join(":"),
                );
            let mut mappings = Vec::with_capacity(self.sockets.len());
            for (i, socket) in self.sockets.iter().enumerate() {
                mappings.push(FdMapping {
                    parent_fd: socket
                        .fd
                        .try_clone()
                        .map_err(io_error("cannot duplicate a listening socket".to_owned()))?,
                    child_fd: 3 + i32::try_from(i).unwrap_or(i32::MAX - 3),
                });
            }
            command
                .fd_mappings(mappings)
                .map_err(|_| SupervisorError::Spawn {
                    program: program.clone(),
                    source: std::io::Error::other("two sockets mapped to one fd"),
                })?;
        }
        if self.sockets.is_empty() {
            // The agent's own socket activation (systemd's fd store) is not
            // the service's.
            command
                .env_remove("LISTEN_FDS")
                .env_remove("LISTEN_PID")
                .env_remove("LISTEN_FDNAMES");
        }
        if let Some(r) = &self.spec.run_as {
            r.apply(&mut command);
        }
        let mut child = command
            // The service manager's socket and watchdog are the agent's.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            // The agent's secrets are not the service's.
            .env_remove("BATON_ENROLL_TOKEN")
            .envs(&self.spec.env)
            .env("BATON_SERVICE", &self.name)
            .env("BATON_VERSION", &self.version)
            .current_dir(&self.release_dir)
            .stdout(stdout)
            .stderr(stderr)
            // Its own group: a Ctrl-C or SIGTERM aimed at the agent's group
            // must not reach the service, and stopping can signal the whole
            // service (children included) at once.
            .process_group(0)
            // The service must outlive this handle, and the agent.
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| SupervisorError::Spawn {
                program: program.clone(),
                source,
            })?;
        // `id` is `None` only after `wait` has completed, which has not been
        // called yet.
        let pid = child.id().ok_or_else(|| SupervisorError::Spawn {
            program: program.clone(),
            source: std::io::Error::other("the process has no pid"),
        })?;
        // The child is not reaped before `wait`, so its stat is readable even
        // if it has already exited.
        let start_time = read_stat(pid).map_or(0, |s| s.start_time);
        let record = ProcessRecord {
            pid,
            start_time,
            version: self.version.clone(),
            release_dir: self.release_dir.clone(),
            listen: self.sockets.iter().map(|s| s.spec.clone().into()).collect(),
        };
        if let Err(e) = write_process_file(&self.run_dir, &record) {
            if self.config.unrecorded_ok {
                error!(service = %self.name, version = %self.version, error = %e, "starting the service unrecorded: an agent restart will not find it");
            } else {
                // An unrecorded service would be orphaned by the next agent
                // restart; it never passes its gate (and is killed anyway).
                drop(go);
                kill_group(pid, Signal::SIGKILL);
                let _ = child.start_kill();
                return Err(e);
            }
        }
        // Recorded: let it run. A failed write means the shell is gone
        // already; the monitor sees it exit.
        let _ = std::fs::File::from(go).write_all(b"go\n");
        Ok(Running {
            process: Process::Child(child),
            pid,
            since: Instant::now(),
        })
    }
}

/// The monitoring task: the only owner of the process and the status
/// senders.
struct Monitor {
    ctx: Context,
    status: watch::Sender<ProcessStatus>,
    alive: watch::Sender<bool>,
}

/// What woke the monitoring loop.
enum Event {
    /// [`Supervisor::stop`] was called.
    Stop(StopBound),
    /// The handle was dropped: stop monitoring, leave the process alone.
    Detach,
    /// The process ended unexpectedly, described.
    Exited(String),
    /// The restart delay is over.
    Restart,
    /// Time to look at the log's size.
    CapLog,
}

impl Monitor {
    async fn run(
        self,
        first: Running,
        mut stop: oneshot::Receiver<StopBound>,
    ) -> Result<Stopped, SupervisorError> {
        let name = self.ctx.name.clone();
        let config = self.ctx.config;
        let mut running = Some(first);
        let mut backoff = config.restart_backoff_initial;
        let mut restart_at = Instant::now();
        let mut log_tick = tokio::time::interval(LOG_CHECK_EVERY);
        log_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let event = match running.as_mut() {
                Some(current) => tokio::select! {
                    biased;
                    asked = &mut stop => match asked { Ok(bound) => Event::Stop(bound), Err(_) => Event::Detach },
                    exit = wait_exit(&mut current.process) => Event::Exited(exit),
                    _ = log_tick.tick() => Event::CapLog,
                },
                None => tokio::select! {
                    biased;
                    asked = &mut stop => match asked { Ok(bound) => Event::Stop(bound), Err(_) => Event::Detach },
                    () = tokio::time::sleep_until(restart_at) => Event::Restart,
                    _ = log_tick.tick() => Event::CapLog,
                },
            };
            match event {
                Event::Detach => return Ok(Stopped::default()),
                Event::Stop(bound) => return self.stop(running.take(), bound).await,
                Event::CapLog => self.cap_log().await,
                Event::Exited(exit) => {
                    let Some(dead) = running.take() else { continue };
                    self.alive.send_replace(false);
                    if group_has_live_members(dead.pid) {
                        warn!(service = %name, pgid = dead.pid, "killing what is left of the dead service's process group");
                        kill_group(dead.pid, Signal::SIGKILL);
                    }
                    let delay = if dead.since.elapsed() >= STABLE_RUN {
                        config.restart_backoff_initial
                    } else {
                        backoff
                    };
                    backoff = (delay * 2).min(config.restart_backoff_max);
                    warn!(
                        service = %name,
                        pid = dead.pid,
                        exit = %exit,
                        restart_in = %humantime::format_duration(delay),
                        "service exited unexpectedly"
                    );
                    restart_at = Instant::now() + delay;
                    self.status.send_modify(|s| {
                        s.state = ProcessState::Restarting { after: delay };
                        s.last_exit = Some(exit);
                    });
                }
                Event::Restart => match self.ctx.spawn() {
                    Ok(new) => {
                        info!(service = %name, pid = new.pid, "service restarted");
                        self.status.send_modify(|s| {
                            s.state = ProcessState::Running { pid: new.pid };
                            s.restarts += 1;
                        });
                        self.alive.send_replace(true);
                        running = Some(new);
                    }
                    Err(e) => {
                        let delay = backoff;
                        backoff = (delay * 2).min(config.restart_backoff_max);
                        error!(service = %name, error = %e, retry_in = %humantime::format_duration(delay), "cannot restart the service");
                        restart_at = Instant::now() + delay;
                        self.status.send_modify(|s| {
                            s.state = ProcessState::Restarting { after: delay };
                            s.last_exit = Some(format!("cannot restart: {e}"));
                        });
                    }
                },
            }
        }
    }

    /// Stops the process (if one runs) and forgets it.
    async fn stop(
        &self,
        running: Option<Running>,
        bound: StopBound,
    ) -> Result<Stopped, SupervisorError> {
        let name = &self.ctx.name;
        let mut last_exit = None;
        let mut stopped = Stopped::default();
        if let Some(mut current) = running {
            let pid = current.pid;
            let signal = self.ctx.spec.stop_signal;
            let timeout = self.ctx.spec.stop_timeout;
            info!(service = %name, pid, %signal, "stopping the service");
            let began = Instant::now();
            kill_group(pid, signal);
            let deadline = async {
                match bound.until {
                    Some(until) => tokio::time::sleep_until(until).await,
                    None => std::future::pending().await,
                }
            };
            let waited = tokio::select! {
                exit = wait_group_gone(&mut current.process, pid, timeout) => exit.ok_or(Forced::StopTimeout),
                () = deadline => Err(Forced::Deadline),
                () = bound.cut.cancelled() => Err(Forced::Cancelled),
            };
            stopped.waited = began.elapsed();
            let exit = match waited {
                Ok(exit) => exit,
                Err(forced) => {
                    let why = match forced {
                        Forced::StopTimeout => "its stop_timeout ran out",
                        Forced::Deadline => "its activation's deadline came",
                        Forced::Cancelled => "its activation was cancelled",
                    };
                    warn!(
                        service = %name,
                        pid,
                        "the service did not stop within {} and {why}; killing it",
                        humantime::format_duration(stopped.waited)
                    );
                    stopped.forced = Some(forced);
                    stopped.open_connections = conns::open_connections(pid);
                    if stopped.open_connections > 0 {
                        warn!(service = %name, pid, connections = stopped.open_connections, "killing it cuts the connections it still has open");
                    }
                    kill_group(pid, Signal::SIGKILL);
                    wait_group_gone(&mut current.process, pid, KILL_WAIT)
                        .await
                        .ok_or(SupervisorError::StillRunning { pid })?
                }
            };
            info!(service = %name, pid, exit = %exit, "service stopped");
            last_exit = Some(exit);
        }
        remove_process_file(&self.ctx.run_dir)?;
        self.alive.send_replace(false);
        self.status.send_modify(|s| {
            s.state = ProcessState::Stopped;
            if last_exit.is_some() {
                s.last_exit = last_exit;
            }
        });
        Ok(stopped)
    }

    async fn cap_log(&self) {
        let path = self.ctx.run_dir.join(LOG_FILE);
        let max = self.ctx.config.log_max_bytes;
        let result = tokio::task::spawn_blocking({
            let path = path.clone();
            move || cap_log(&path, max)
        })
        .await;
        match result {
            Ok(Ok(true)) => info!(service = %self.ctx.name, "rotated {}", path.display()),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                warn!(service = %self.ctx.name, error = %e, "cannot cap {}", path.display())
            }
            Err(e) => warn!(service = %self.ctx.name, error = %e, "the log capping task failed"),
        }
    }
}

/// Waits until the process ends and describes how. Cancel-safe.
async fn wait_exit(process: &mut Process) -> String {
    match process {
        Process::Child(child) => match child.wait().await {
            Ok(status) => describe_exit(status),
            Err(e) => format!("exited (waiting for it failed: {e})"),
        },
        Process::Adopted { pid, start_time } => {
            while is_same_process(*pid, *start_time) {
                tokio::time::sleep(ADOPTED_POLL).await;
            }
            // After the agent re-executed itself its services are still its
            // children: reap the zombie (for anyone else's child this fails
            // with ECHILD, which is fine).
            if let Some(p) = i32::try_from(*pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
                && let Ok(Some((_, status))) =
                    rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG)
            {
                return match (status.exit_status(), status.terminating_signal()) {
                    (Some(code), _) => format!("exited with status {code}"),
                    (_, Some(sig)) => format!("killed by signal {sig}"),
                    _ => "exited".to_owned(),
                };
            }
            "exited (status unknown: the process was adopted, not started, by this agent)"
                .to_owned()
        }
    }
}

/// Waits up to `limit` for the process to end and every other member of its
/// group to be gone; `None` on timeout.
async fn wait_group_gone(process: &mut Process, pgid: u32, limit: Duration) -> Option<String> {
    tokio::time::timeout(limit, async {
        let exit = wait_exit(process).await;
        while group_has_live_members(pgid) {
            tokio::time::sleep(STOP_POLL).await;
        }
        exit
    })
    .await
    .ok()
}

/// Sends `signal` to the process group; a group that is already gone is
/// fine.
fn kill_group(pgid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pgid) else { return };
    match killpg(Pid::from_raw(raw), signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => warn!(pgid, %signal, error = %e, "cannot signal the process group"),
    }
}

/// "exited with status 3", "killed by SIGSEGV", "killed by SIGABRT (core
/// dumped)".
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    if let Some(number) = status.signal() {
        let name = Signal::try_from(number)
            .map_or_else(|_| format!("signal {number}"), |s| s.as_str().to_owned());
        let core = if status.core_dumped() {
            " (core dumped)"
        } else {
            ""
        };
        return format!("killed by {name}{core}");
    }
    format!("ended ({status})")
}

/// Whether the process a record names still runs (same pid, same start
/// time, not a zombie).
pub fn is_alive_record(record: &ProcessRecord) -> bool {
    is_same_process(record.pid, record.start_time)
}

/// Reads `run_dir/process.json`; `None` if there is none.
pub fn read_process_file(run_dir: &Path) -> Result<Option<ProcessRecord>, SupervisorError> {
    let path = run_dir.join(PROCESS_FILE);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(format!("cannot read {}", path.display()))(e)),
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| SupervisorError::CorruptProcessFile {
            path,
            message: e.to_string(),
        })
}

/// Writes `process.json` atomically: a reader (or a crash) sees the old
/// file or the new one, never a torn one.
fn write_process_file(run_dir: &Path, record: &ProcessRecord) -> Result<(), SupervisorError> {
    let path = run_dir.join(PROCESS_FILE);
    let tmp = run_dir.join(format!("{PROCESS_FILE}.tmp"));
    let what = format!("cannot write {}", path.display());
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(record)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        File::open(run_dir)?.sync_all()
    };
    write().map_err(io_error(what))
}

fn remove_process_file(run_dir: &Path) -> Result<(), SupervisorError> {
    let path = run_dir.join(PROCESS_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(format!("cannot remove {}", path.display()))(e)),
    }
}

/// Caps a log that the service appends to: beyond `max` bytes, copies it to
/// `<name>.1` (replacing that) and truncates it to zero. Returns whether it
/// did. The service keeps its file open with `O_APPEND`, so its next write
/// lands at the new end of the file.
///
/// Known race: lines written between the copy and the truncation are lost.
/// Renaming instead would not lose them, but the service would keep writing
/// into the renamed file, and we cannot ask it to reopen.
pub fn cap_log(path: &Path, max: u64) -> std::io::Result<bool> {
    let len = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(false);
    }
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    std::fs::copy(path, &rotated)?;
    OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

/// The parts of `/proc/<pid>/stat` we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    /// Field 3: R, S, D, Z, T, X, …
    state: char,
    /// Field 5.
    pgrp: u32,
    /// Field 22, in clock ticks after boot.
    start_time: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses
/// and may itself contain spaces and parentheses, so the fields are counted
/// from after the *last* `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(5 - 3)?.parse().ok()?,
        start_time: fields.get(22 - 3)?.parse().ok()?,
    })
}

fn read_stat(pid: u32) -> Option<ProcStat> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|text| parse_stat(&text))
}

fn is_live_state(state: char) -> bool {
    !matches!(state, 'Z' | 'X' | 'x')
}

/// Whether `pid` exists and is not a zombie.
#[cfg(test)]
pub(crate) fn is_alive(pid: u32) -> bool {
    read_stat(pid).is_some_and(|s| is_live_state(s.state))
}

/// When the live (not zombie) process `pid` started, in clock ticks after
/// boot: with the pid, what names a process for good.
pub(crate) fn live_start_time(pid: u32) -> Option<u64> {
    read_stat(pid)
        .filter(|s| is_live_state(s.state))
        .map(|s| s.start_time)
}

/// Whether `pid` is still the process that started at `start_time`, and
/// not a zombie.
pub(crate) fn is_same_process(pid: u32, start_time: u64) -> bool {
    read_stat(pid).is_some_and(|s| s.start_time == start_time && is_live_state(s.state))
}

/// Whether any process other than a zombie is in process group `pgid`.
/// Scans `/proc`; only used when a service ends, so the cost is fine.
fn group_has_live_members(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .any(|pid| read_stat(pid).is_some_and(|s| s.pgrp == pgid && is_live_state(s.state)))
}

mod conns;
#[cfg(test)]
mod tests;
