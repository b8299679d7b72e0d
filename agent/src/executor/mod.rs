//! Runs the coordinator's commands on this host: stage (download, verify,
//! unpack), activate (hook, swap, restart, health gate), roll back and
//! remove — and keeps the inventory the coordinator sees.
//!
//! Commands are idempotent by id: a finished id is answered from the
//! [`Journal`], a running one is not started twice, and every operation
//! converges (activating the release that is already current and running
//! only re-runs the health gate). Operations on one service are
//! serialised; a rollback or removal first cancels an activation of the
//! same service still waiting for health.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use baton_common::artifact::{AGENT_NAME, PublicKey};
use baton_common::command::{
    Command, CommandKind, CommandUpdate, FailureKind, HealthGate, Outcome, Phase,
};
use baton_common::host::{ServiceState, ServiceStatus};
use baton_common::sdnotify::Notifier;
use baton_common::text::quote;
use baton_proto::agent::v1 as pb;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use tracing::{debug, error, info, warn};

use crate::health::{self, Gate};
use crate::journal::Journal;
use crate::releases::Releases;
use crate::selfupgrade::SelfUpgrade;
use crate::service::{self, ServiceSpec, SupervisorKind};
use crate::sockets::{ListenSocket, ListenSpec};
use crate::supervisor::{ProcessState, Supervisor, SupervisorConfig, read_process_file};

mod activate;
mod download;
mod failure;
mod hooks;
mod listen;
mod own_upgrade;
mod ready;
mod recover;
mod release;
mod remove;
mod runner;
mod stage;
pub mod swarm;
mod traffic;

pub use download::{DEFAULT_STALL_WINDOW, Limits as DownloadLimits, download};
use failure::{Classify, Failure};
use listen::listen_specs;
use ready::{notify_socket, wait_ready};
use recover::stored_fds;
use release::Release;
pub use runner::Systemctl;
use runner::{Runner, Unit};

/// Progress updates per command are sent at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Why a command that came too late was not run.
const LATE: &str = "the command arrived after its deadline";

/// What the executor needs from the agent's configuration.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// The agent's data directory.
    pub data_dir: PathBuf,
    /// `${NAME}` values for `service.toml` (with `BATON_HOST_ID`).
    pub vars: BTreeMap<String, String>,
    /// The host's labels (for a local balancer's `${NAME}`s).
    pub labels: BTreeMap<String, String>,
    /// The local balancers plans may use (`balancer`).
    pub balancers: Vec<String>,
    /// Keys whose signatures the agent accepts.
    pub trusted_keys: Vec<PublicKey>,
    /// Releases kept per service (the current one always is).
    pub keep_releases: usize,
    /// Restart backoff and log cap.
    pub supervisor: SupervisorConfig,
    /// The agent's own releases (commands for `baton-agent`).
    pub me: SelfUpgrade,
    /// How slow a download may get before staging fails.
    pub download: DownloadLimits,
    /// What drives units of services run by systemd.
    pub systemctl: Systemctl,
    /// Peer-to-peer staging.
    pub peers: crate::peers::PeerSetup,
}

/// Runs commands and owns the supervised services.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

struct Inner {
    config: ExecutorConfig,
    releases: Releases,
    journal: Journal,
    /// The highest version of each service this host ran healthy.
    installed: crate::installed::Installed,
    /// The coordinator to download from (the one the agent is connected
    /// to, which with several coordinators is the leader).
    fetch: watch::Receiver<Channel>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// One activation (or rollback) on this host at a time, whatever the
    /// service or rollout: two restarts at once could together take more
    /// of the host out of service than any one plan allows.
    host: tokio::sync::Mutex<()>,
    /// One download per payload at a time (two stages of one artifact
    /// would append to the same partial file).
    downloads: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    running: Mutex<HashSet<String>>,
    updates: broadcast::Sender<CommandUpdate>,
    inventory: watch::Sender<BTreeMap<String, ServiceStatus>>,
    /// systemd's notify socket, for the fd store (a no-op without one).
    notifier: Notifier,
    /// Sockets systemd passed back from its fd store at startup, by
    /// `<service>=<fd name>`.
    stored: Mutex<HashMap<String, OwnedFd>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// How the upgrade this process is the new agent of ended (`None`
    /// while undecided, or when there is none).
    trial: watch::Sender<Option<Result<(), String>>>,
}

/// One service's supervisor and the lock that serialises its operations.
#[derive(Default)]
struct Slot {
    state: tokio::sync::Mutex<SlotState>,
    /// Activations submitted and not finished, each cancellable by a
    /// rollback or removal (registered before they wait for the lock, so
    /// one queued behind another operation is cancelled too).
    activations: Mutex<Vec<(u64, CancellationToken)>>,
    /// Numbers the activations.
    next_activation: std::sync::atomic::AtomicU64,
    /// What cancelled the activations last cancelled (`a rollback`, `an
    /// abort`), for their errors.
    cancelled_by: Mutex<&'static str>,
}

#[derive(Default)]
struct SlotState {
    /// The release that serves (or should).
    current: Option<Current>,
    monitor: Option<tokio::task::JoinHandle<()>>,
    /// The listening sockets the agent owns for this service, in the order
    /// of the current `listen` list.
    sockets: Arc<Vec<ListenSocket>>,
}

/// A running release.
struct Current {
    release: Release,
    process: Box<dyn Runner>,
}

impl Current {
    fn alive(&self) -> watch::Receiver<bool> {
        self.process.alive()
    }

    fn is_alive(&self) -> bool {
        *self.alive().borrow()
    }
}

impl Drop for SlotState {
    fn drop(&mut self) {
        if let Some(m) = &self.monitor {
            m.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these plain-data locks leaves the data
    // consistent (every critical section is a single insert or remove).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Executor {
    /// Opens the journal and the release store. `channel` reaches the
    /// coordinator (for downloads). Call [`Executor::recover`] next.
    pub fn new(
        config: ExecutorConfig,
        channel: watch::Receiver<Channel>,
        shutdown: CancellationToken,
    ) -> Result<Self, String> {
        let journal = Journal::open(&config.data_dir).map_err(|e| {
            format!(
                "cannot open the command journal in {}: {e}",
                config.data_dir.display()
            )
        })?;
        let downloads = config.data_dir.join("downloads");
        std::fs::create_dir_all(&downloads)
            .map_err(|e| format!("cannot create {}: {e}", downloads.display()))?;
        let installed = crate::installed::Installed::open(&config.data_dir).map_err(|e| {
            format!(
                "cannot open the installed-version records in {}: {e}",
                config.data_dir.display()
            )
        })?;
        // The agent that runs, unless it is a new one still on trial (a
        // revert would leave the record above what runs).
        if config.me.trial().is_none()
            && let Err(e) = installed.record(AGENT_NAME, config.me.version())
        {
            warn!(error = %e, "cannot record the agent's own version");
        }
        Ok(Self {
            inner: Arc::new(Inner {
                releases: Releases::new(&config.data_dir),
                journal,
                installed,
                fetch: channel,
                slots: Mutex::default(),
                host: tokio::sync::Mutex::new(()),
                downloads: Mutex::default(),
                running: Mutex::default(),
                updates: broadcast::channel(1024).0,
                inventory: watch::channel(BTreeMap::new()).0,
                notifier: Notifier::from_env(),
                stored: Mutex::new(stored_fds()),
                shutdown,
                tasks: TaskTracker::new(),
                trial: watch::channel(None).0,
                config,
            }),
        })
    }

    /// Command updates from now on (the session forwards them).
    pub fn updates(&self) -> broadcast::Receiver<CommandUpdate> {
        self.inner.updates.subscribe()
    }

    /// The inventory, updated whenever a service changes.
    pub fn inventory(&self) -> watch::Receiver<BTreeMap<String, ServiceStatus>> {
        self.inner.inventory.subscribe()
    }

    /// Where service `name`'s log is: its current release's
    /// `service.log`, or its unit's journal when systemd runs it.
    pub fn log_source(&self, name: &str) -> Result<crate::logs::Source, String> {
        baton_common::host::validate_name(name)
            .map_err(|e| format!("invalid service name {}: {e}", quote(name)))?;
        let releases = &self.inner.releases;
        let version = releases
            .current(name)
            .ok_or_else(|| format!("no service {} runs on this host", quote(name)))?;
        let spec = crate::service::load(
            &releases.release_dir(name, &version),
            &self.inner.config.vars,
        )
        .map_err(|e| e.to_string())?;
        Ok(match spec.supervisor {
            crate::service::SupervisorKind::Systemd { unit } => crate::logs::Source::Journal(unit),
            crate::service::SupervisorKind::Native => crate::logs::Source::File(
                releases
                    .run_dir(name, &version)
                    .join(crate::supervisor::LOG_FILE),
            ),
        })
    }

    /// What the agent sees of `name`'s process, for analysis: whether it
    /// runs, its pid, restarts, memory and open files. Never waits for an
    /// activation: while one holds the service, it says so.
    pub fn process_sample(
        &self,
        name: &str,
    ) -> Result<baton_proto::agent::v1::ProcessSample, String> {
        let slot = lock(&self.inner.slots)
            .get(name)
            .cloned()
            .ok_or_else(|| format!("no service {} runs on this host", quote(name)))?;
        let state = slot
            .state
            .try_lock()
            .map_err(|_| format!("{name} is being changed on this host"))?;
        let Some(current) = state.current.as_ref() else {
            return Ok(baton_proto::agent::v1::ProcessSample::default());
        };
        let status = current.process.status().borrow().clone();
        let pid = match status.state {
            crate::supervisor::ProcessState::Running { pid } => Some(pid),
            _ => None,
        };
        let (rss_bytes, open_fds) = pid.map_or((0, 0), crate::sample::proc_usage);
        Ok(baton_proto::agent::v1::ProcessSample {
            running: current.is_alive() && (pid.is_some() || current.process.unit().is_some()),
            pid: pid.unwrap_or(0),
            restarts: status.restarts,
            rss_bytes,
            open_fds,
            last_exit: status.last_exit.unwrap_or_default(),
        })
    }

    /// Accepts a command from the coordinator and runs it in the
    /// background; its updates arrive on [`Executor::updates`].
    pub fn submit(&self, wire: pb::Command) {
        let command = match Command::try_from(wire) {
            Ok(c) => c,
            Err(unusable) => {
                warn!(id = ?unusable.id, reason = %unusable.reason, "refusing a command this agent cannot run");
                self.publish(CommandUpdate::failed(
                    unusable.id.as_deref().unwrap_or("-"),
                    FailureKind::Invalid,
                    unusable.reason.to_string(),
                ));
                return;
            }
        };
        // A no-op changes nothing, so running it twice is harmless: it is
        // answered at once and never journaled (a `baton ping` loop must
        // not cost every host two fsyncs and a file per ping).
        if command.kind == CommandKind::Noop {
            let update = if command.deadline < SystemTime::now() {
                CommandUpdate::failed(&command.id, FailureKind::Late, LATE)
            } else {
                CommandUpdate::done(&command.id, Outcome::Succeeded, "")
            };
            self.publish(update);
            return;
        }
        // Cancelling changes nothing on disk and cancelling twice is
        // harmless: answered at once, never journaled, like a no-op.
        if let CommandKind::Cancel { service } = &command.kind {
            let update = match baton_common::host::validate_name(service) {
                Err(e) => CommandUpdate::failed(
                    &command.id,
                    FailureKind::Invalid,
                    format!("invalid service name: {e}"),
                ),
                Ok(()) => {
                    let slot = lock(&self.inner.slots).get(service).cloned();
                    if let Some(slot) = slot {
                        info!(%service, id = %command.id, "cancelling the service's activations");
                        cancel_activations(&slot, "an abort");
                    }
                    CommandUpdate::done(&command.id, Outcome::Succeeded, "")
                }
            };
            self.publish(update);
            return;
        }
        // Claim the id first, then look in the journal: a task journals
        // before it lets go of its id, so a re-send racing the end of a
        // run sees one or the other, never neither.
        if !lock(&self.inner.running).insert(command.id.clone()) {
            debug!(id = %command.id, "the command is already running");
            self.publish(accepted(&command.id));
            return;
        }
        if let Some(done) = self.inner.journal.lookup(&command.id) {
            debug!(id = %command.id, "answering a re-sent command from the journal");
            lock(&self.inner.running).remove(&command.id);
            self.publish(done);
            return;
        }
        let this = self.clone();
        self.inner.tasks.spawn(async move {
            let id = command.id.clone();
            let kind = command.kind.name();
            let started = std::time::Instant::now();
            let health_wait = crate::metrics::HealthWait::default();
            let cut = crate::metrics::ConnectionsCut::default();
            let run = crate::metrics::CONNECTIONS_CUT.scope(
                cut.clone(),
                crate::metrics::HEALTH_WAIT.scope(health_wait.clone(), this.run(command)),
            );
            let outcome = tokio::select! {
                _ = this.inner.shutdown.cancelled() => None,
                r = run => Some(r),
            };
            let Some(result) = outcome else {
                // Not journaled: the coordinator re-sends it after the
                // restart and it converges from wherever it stopped.
                lock(&this.inner.running).remove(&id);
                return;
            };
            let mut update = match &result {
                Ok(()) => CommandUpdate::done(&id, Outcome::Succeeded, ""),
                Err(e) => CommandUpdate {
                    detail: e.detail.clone(),
                    ..CommandUpdate::failed(&id, e.kind, e.message.clone())
                },
            };
            update.health_wait = health_wait.get();
            update.connections_cut = cut.get();
            let metrics = &crate::metrics::METRICS;
            metrics
                .commands
                .inc(&[kind, if result.is_ok() { "succeeded" } else { "failed" }]);
            if matches!(kind, "activate" | "rollback") {
                metrics.activation.observe(started.elapsed());
            }
            match &result {
                Ok(()) => info!(%id, kind, "command succeeded"),
                Err(e) => warn!(%id, kind, failure = %e.kind, error = %e, "command failed"),
            }
            if let Err(e) = this.inner.journal.record(&update) {
                error!(%id, error = %e, "cannot journal the command's outcome; a re-send will run it again");
            }
            lock(&this.inner.running).remove(&id);
            this.publish(update);
        });
    }

    /// Stops accepting work and waits for running commands to wind down.
    /// Services keep running.
    pub async fn close(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        let slots: Vec<Arc<Slot>> = lock(&self.inner.slots).values().cloned().collect();
        for slot in slots {
            let mut st = slot.state.lock().await;
            // Dropping a supervisor ends its monitoring, not its process.
            st.current = None;
            if let Some(m) = st.monitor.take() {
                m.abort();
            }
        }
    }

    fn publish(&self, update: CommandUpdate) {
        // Nobody listening means no session: the coordinator re-sends.
        let _ = self.inner.updates.send(update);
    }

    fn slot(&self, name: &str) -> Arc<Slot> {
        lock(&self.inner.slots)
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    fn set_status(&self, name: &str, version: &str, state: ServiceState, healthy: bool) {
        self.inner.inventory.send_if_modified(|inv| {
            let new = ServiceStatus {
                name: name.to_owned(),
                version: version.to_owned(),
                state,
                healthy,
            };
            if inv.get(name) == Some(&new) {
                return false;
            }
            inv.insert(name.to_owned(), new);
            true
        });
    }

    async fn run(&self, mut command: Command) -> Result<(), Failure> {
        if command.deadline < SystemTime::now() {
            return Err(Failure::new(FailureKind::Late, LATE));
        }
        self.publish(accepted(&command.id));
        if let Some(traffic) = command.traffic.take() {
            if command.kind.service() == Some(AGENT_NAME) {
                return Err(Failure::new(
                    FailureKind::Invalid,
                    "the agent itself is not drained from a balancer",
                ));
            }
            if let Some(service) = command.kind.service() {
                baton_common::host::validate_name(service)
                    .map_err(|e| format!("invalid service name {}: {e}", quote(service)))
                    .or_fail(FailureKind::Invalid)?;
            }
            // A removed service has no health for the balancer to see.
            let up_within = match &command.kind {
                CommandKind::Activate { gate, .. } | CommandKind::Rollback { gate, .. } => {
                    Some(gate.healthy_deadline)
                }
                _ => None,
            };
            return self
                .behind_balancer(
                    command.kind.service().unwrap_or_default(),
                    &traffic,
                    up_within,
                    !matches!(command.kind, CommandKind::Activate { .. }),
                    self.run_kind(command.clone()),
                )
                .await;
        }
        self.run_kind(command).await
    }

    async fn run_kind(&self, command: Command) -> Result<(), Failure> {
        let kind = command.kind;
        if let Some(service) = kind.service() {
            baton_common::host::validate_name(service)
                .map_err(|e| format!("invalid service name {}: {e}", quote(service)))
                .or_fail(FailureKind::Invalid)?;
        }
        match kind {
            // Answered in `submit`, never run.
            CommandKind::Noop | CommandKind::Cancel { .. } => Ok(()),
            CommandKind::Stage {
                service,
                version,
                manifest,
                signature,
            } => {
                self.stage(&command.id, &service, &version, manifest, signature)
                    .await
            }
            CommandKind::Activate {
                service,
                version,
                gate,
                allow_downgrade,
            } if service == AGENT_NAME => {
                self.upgrade_self(&command.id, &version, gate, allow_downgrade)
                    .await
            }
            CommandKind::Rollback {
                service,
                version,
                gate,
            } if service == AGENT_NAME => {
                self.upgrade_self(&command.id, &version, gate, true).await
            }
            CommandKind::Remove { service } if service == AGENT_NAME => Err(Failure::new(
                FailureKind::Invalid,
                "the agent cannot remove itself",
            )),
            CommandKind::Activate {
                service,
                version,
                gate,
                allow_downgrade,
            } => {
                if !allow_downgrade
                    && let Some(current) = self.inner.releases.current(&service)
                    && baton_common::version::is_downgrade(&current, &version)
                {
                    return Err(downgrade_refused(&service, &current, &version));
                }
                // Also below what ran here once, and was removed since.
                self.inner.installed.refuse(
                    &service,
                    &version,
                    self.inner.releases.is_staged(&service, &version),
                    allow_downgrade,
                )?;
                self.activate(&service, &version, gate, false, command.deadline)
                    .await
            }
            CommandKind::Rollback {
                service,
                version,
                gate,
            } => {
                self.activate(&service, &version, gate, true, command.deadline)
                    .await
            }
            CommandKind::Remove { service } => self.remove(&service, command.deadline).await,
        }
    }

    /// Lets a service that runs as its own user reach its release and
    /// nothing else: the directories down to it are traversable but not
    /// listable (0711; the agent's own state below them stays 0700), and
    /// the release belongs to the agent and the service's group, which may
    /// read it (and execute what the owner may) but write nothing.
    fn open_release_to(
        &self,
        name: &str,
        release_dir: &std::path::Path,
        r: &service::RunAs,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let set = |path: &std::path::Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        };
        let data = &self.inner.config.data_dir;
        for private in ["commands", "downloads", "agent"] {
            let dir = data.join(private);
            if dir.is_dir() {
                set(&dir, 0o700)?;
            }
        }
        // Traversable down to the services; every other service's
        // directory closed (0700, or its own group's 0710); this one's open
        // to its group only.
        for dir in [data.clone(), data.join("services")] {
            set(&dir, 0o711)?;
        }
        let service = self.inner.releases.service_dir(name);
        for entry in std::fs::read_dir(data.join("services"))? {
            let other = entry?.path();
            let meta = std::fs::symlink_metadata(&other)?;
            if other != service && meta.is_dir() && meta.mode() & 0o007 != 0 {
                set(&other, 0o700)?;
            }
        }
        for dir in [service.clone(), service.join("releases")] {
            std::os::unix::fs::lchown(&dir, None, Some(r.gid))?;
            set(&dir, 0o710)?;
        }
        let mut stack = vec![release_dir.to_owned()];
        while let Some(path) = stack.pop() {
            let meta = std::fs::symlink_metadata(&path)?;
            std::os::unix::fs::lchown(&path, None, Some(r.gid))?;
            if meta.file_type().is_symlink() {
                continue;
            }
            let owner = meta.mode() & 0o700;
            if meta.is_dir() {
                set(&path, 0o750)?;
                for entry in std::fs::read_dir(&path)? {
                    stack.push(entry?.path());
                }
            } else {
                // The group gets the owner's read and execute, never write.
                set(&path, owner | ((owner >> 3) & 0o050))?;
            }
        }
        Ok(())
    }

    /// Raises the high-water mark of `name` to `version`, which just
    /// turned healthy. Not fatal: the activation happened.
    fn record_installed(&self, name: &str, version: &str) {
        if let Err(e) = self.inner.installed.record(name, version) {
            error!(service = %name, %version, error = %e, "cannot record the installed version; rollback protection for it rests on the releases kept");
        }
    }

    fn swap(&self, name: &str, version: &str) -> Result<(), String> {
        self.inner
            .releases
            .swap(name, version)
            .map_err(|e| format!("cannot swap {name} to {version}: {e}"))
    }

    /// Points `current` back after a failed handoff.
    fn swap_back(&self, name: &str, from: Option<&str>) {
        if let Some(from) = from
            && let Err(e) = self.inner.releases.swap(name, from)
        {
            error!(service = %name, %from, error = %e, "cannot point current back");
        }
    }

    /// Installs a running release in the slot and starts watching it:
    /// process state and (between activations) the health check feed the
    /// inventory.
    fn install(&self, st: &mut SlotState, release: Release, process: Box<dyn Runner>) {
        if let Some(m) = st.monitor.take() {
            m.abort();
        }
        let status = process.status();
        // Listed at once (the hello after a restart must carry it); the
        // monitor refines state and health from here.
        let state = match status.borrow().state {
            ProcessState::Running { .. } => ServiceState::Running,
            ProcessState::Restarting { .. } => ServiceState::Failed,
            ProcessState::Stopped => ServiceState::Stopped,
        };
        let healthy = self
            .inner
            .inventory
            .borrow()
            .get(&release.name)
            .is_some_and(|s| s.version == release.version && s.healthy);
        self.set_status(&release.name, &release.version, state, healthy);
        let this = self.clone();
        let watched = release.clone();
        st.current = Some(Current { release, process });
        st.monitor = Some(tokio::spawn(async move {
            this.monitor(&watched, status).await;
        }));
    }

    async fn monitor(
        &self,
        release: &Release,
        mut status: watch::Receiver<crate::supervisor::ProcessStatus>,
    ) {
        let (name, version) = (&release.name, &release.version);
        let health = release.spec.health.as_ref();
        let interval = health
            .as_ref()
            .map_or(Duration::from_secs(1), |h| h.interval);
        // A check that fails counts once the service has answered: the
        // probes of a process still starting are not health failures.
        let mut answered = false;
        loop {
            let state = match status.borrow_and_update().state {
                ProcessState::Running { .. } => ServiceState::Running,
                ProcessState::Restarting { .. } => ServiceState::Failed,
                ProcessState::Stopped => ServiceState::Stopped,
            };
            let healthy = if state == ServiceState::Running {
                match health {
                    Some(h) => {
                        let passed = health::check_once(h, &release.dir).await.is_ok();
                        if passed {
                            answered = true;
                        } else if answered {
                            crate::metrics::METRICS.health_check_failures.inc();
                        }
                        passed
                    }
                    None => true,
                }
            } else {
                false
            };
            self.set_status(name, version, state, healthy);
            tokio::select! {
                changed = status.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}

fn downgrade_refused(name: &str, current: &str, version: &str) -> Failure {
    Failure::new(
        FailureKind::Refused,
        format!(
            "refusing to downgrade {name} from {current} to {version}: the plan must say allow_downgrade = true (and the host must still have {version})"
        ),
    )
}

/// Cancels every activation of the slot, running or queued.
fn cancel_activations(slot: &Slot, by: &'static str) {
    *lock(&slot.cancelled_by) = by;
    for (_, token) in lock(&slot.activations).drain(..) {
        token.cancel();
    }
}

fn accepted(id: &str) -> CommandUpdate {
    CommandUpdate {
        command_id: id.to_owned(),
        phase: Phase::Accepted,
        progress_percent: 0,
        health_wait: None,
        error: String::new(),
        failure: None,
        detail: Default::default(),
        connections_cut: 0,
    }
}

impl crate::sample::Source for Executor {
    fn vars(&self) -> &BTreeMap<String, String> {
        &self.inner.config.vars
    }

    fn process(&self, service: &str) -> Result<baton_proto::agent::v1::ProcessSample, String> {
        self.process_sample(service)
    }
}
