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

use baton_common::artifact::{self, AGENT_NAME, PublicKey};
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
use crate::service::{self, HealthSpec, ServiceSpec, SupervisorKind};
use crate::sockets::{ListenSocket, ListenSpec};
use crate::supervisor::{ProcessState, Supervisor, SupervisorConfig, read_process_file};

mod activate;
mod download;
mod failure;
mod hooks;
mod stage;

pub use download::{DEFAULT_STALL_WINDOW, Limits as DownloadLimits, download};
use failure::{Classify, Failure};
use hooks::systemctl;

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
    version: String,
    release_dir: PathBuf,
    spec: ServiceSpec,
    process: Runner,
}

/// Who runs a release's process.
enum Runner {
    /// The agent's own supervisor.
    Native(Supervisor),
    /// A systemd unit; `alive` never turns false (systemd restarts it).
    Systemd {
        unit: String,
        alive: watch::Sender<bool>,
    },
}

impl Current {
    fn alive(&self) -> watch::Receiver<bool> {
        match &self.process {
            Runner::Native(s) => s.alive(),
            Runner::Systemd { alive, .. } => alive.subscribe(),
        }
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

    /// Picks up the services a previous agent run left: a process still
    /// running is adopted (not restarted) together with its listening
    /// sockets, a stopped one is started, and a process of another release
    /// left by an interrupted swap is stopped.
    pub async fn recover(&self) {
        for name in self.inner.releases.services() {
            // A swap a crash interrupted left its new symlink unrenamed.
            self.inner.releases.clean(&name);
            if let Err(e) = self.recover_one(&name).await {
                error!(service = %name, error = %e, "cannot recover the service");
            }
        }
        // Stored sockets no service claimed (one removed meanwhile, or a
        // listen entry that changed): close them and tell systemd.
        let unclaimed: Vec<String> = lock(&self.inner.stored)
            .drain()
            .map(|(name, _)| name)
            .collect();
        for name in unclaimed {
            info!(fd = %name, "closing a stored socket no service claims");
            self.inner.notifier.remove_fds(&name);
        }
    }

    async fn recover_one(&self, name: &str) -> Result<(), String> {
        let version = self
            .inner
            .releases
            .current(name)
            .ok_or("no current release")?;
        // A host that ran this before the records existed: what runs is
        // the mark to start from. Only then: `current` may be a release
        // whose health gate a crash interrupted, which must not raise it.
        if matches!(self.inner.installed.highest(name), Ok(None))
            && let Err(e) = self.inner.installed.record(name, &version)
        {
            warn!(service = %name, error = %e, "cannot record the installed version");
        }
        let release_dir = self.inner.releases.release_dir(name, &version);
        let spec = service::load(&release_dir, &self.inner.config.vars).map_err(|e| {
            self.set_status(name, &version, ServiceState::Failed, false);
            format!("cannot load the current release {version}: {e}")
        })?;
        let slot = self.slot(name);
        let mut st = slot.state.lock().await;
        if let SupervisorKind::Systemd { unit } = &spec.supervisor {
            info!(service = %name, %version, %unit, "managed by systemd");
            let unit = unit.clone();
            self.install(
                &mut st,
                name,
                &version,
                &release_dir,
                spec,
                Runner::Systemd {
                    unit,
                    alive: watch::channel(true).0,
                },
            );
            return Ok(());
        }
        let cfg = self.inner.config.supervisor;
        // Every process a previous run left, per release.
        let mut live = Vec::new();
        for dir in self.inner.releases.run_dirs(name) {
            match read_process_file(&dir) {
                Ok(Some(record)) if crate::supervisor::is_alive_record(&record) => {
                    live.push((dir, record))
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(service = %name, dir = %dir.display(), error = %e, "unreadable process file")
                }
            }
        }
        let specs = listen_specs(&spec)?;
        st.sockets = Arc::new(self.recover_sockets(name, &specs, &live));
        if !specs.is_empty() && st.sockets.is_empty() {
            if live.is_empty() {
                // After a reboot nothing runs and nothing was stored: bind
                // afresh before starting the service below.
                self.sockets_for(&mut st, name, &specs)?;
            } else {
                error!(service = %name, "cannot recover the running service's sockets; its next activation will fail to bind them until it is restarted");
            }
        }
        let mut current = None;
        for (dir, record) in live {
            let rel = record.release_dir.clone();
            let this_spec =
                service::load(&rel, &self.inner.config.vars).unwrap_or_else(|_| spec.clone());
            let adopted =
                Supervisor::adopt_listening(name, &rel, this_spec, &dir, cfg, st.sockets.clone())
                    .map_err(|e| e.to_string())?;
            let Some(sup) = adopted else { continue };
            if record.version == version && current.is_none() {
                info!(service = %name, %version, pid = ?sup.pid(), "adopted the running service");
                current = Some(sup);
            } else {
                info!(service = %name, running = %record.version, current = %version, "stopping a process an interrupted swap left behind");
                if let Err(e) = sup.stop().await {
                    warn!(service = %name, error = %e, "cannot stop the stale process");
                }
            }
        }
        let sup = match current {
            Some(sup) => sup,
            None => {
                let run_dir = self.inner.releases.run_dir(name, &version);
                let sup = Supervisor::start_listening(
                    name,
                    &version,
                    &release_dir,
                    spec.clone(),
                    &run_dir,
                    cfg,
                    st.sockets.clone(),
                )
                .map_err(|e| {
                    self.set_status(name, &version, ServiceState::Failed, false);
                    format!("cannot start {version}: {e}")
                })?;
                info!(service = %name, %version, "started the service, which was not running");
                sup
            }
        };
        self.install(
            &mut st,
            name,
            &version,
            &release_dir,
            spec,
            Runner::Native(sup),
        );
        Ok(())
    }

    /// The service's listening sockets after an agent restart: from
    /// systemd's fd store if it gave them back, else copied out of a live
    /// process that has them. Entries found nowhere are bound again later.
    fn recover_sockets(
        &self,
        name: &str,
        specs: &[ListenSpec],
        live: &[(PathBuf, crate::supervisor::ProcessRecord)],
    ) -> Vec<ListenSocket> {
        if specs.is_empty() {
            return Vec::new();
        }
        let mut stored = lock(&self.inner.stored);
        let from_store: Option<Vec<ListenSocket>> = specs
            .iter()
            .map(|spec| {
                let fd = stored.remove(&format!("{name}={}", spec.fd_name()))?;
                spec.matches(&fd).then(|| ListenSocket {
                    spec: spec.clone(),
                    fd,
                })
            })
            .collect();
        if let Some(sockets) = from_store {
            info!(service = %name, count = sockets.len(), "recovered the listening sockets from systemd's fd store");
            return sockets;
        }
        let texts: Vec<String> = specs.iter().map(ListenSpec::text).collect();
        for (_, record) in live {
            if record.listen != texts {
                continue;
            }
            match crate::sockets::recover(record.pid, specs) {
                Ok(sockets) => {
                    info!(service = %name, pid = record.pid, count = sockets.len(), "recovered the listening sockets from the running service");
                    return sockets;
                }
                Err(e) => {
                    warn!(service = %name, error = %e, "cannot recover the listening sockets from the running service")
                }
            }
        }
        Vec::new()
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
            let outcome = tokio::select! {
                _ = this.inner.shutdown.cancelled() => None,
                r = crate::metrics::HEALTH_WAIT.scope(health_wait.clone(), this.run(command)) => Some(r),
            };
            let Some(result) = outcome else {
                // Not journaled: the coordinator re-sends it after the
                // restart and it converges from wherever it stopped.
                lock(&this.inner.running).remove(&id);
                return;
            };
            let mut update = match &result {
                Ok(()) => CommandUpdate::done(&id, Outcome::Succeeded, ""),
                Err(e) => CommandUpdate::failed(&id, e.kind, e.message.clone()),
            };
            update.health_wait = health_wait.get();
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

    async fn run(&self, command: Command) -> Result<(), Failure> {
        if command.deadline < SystemTime::now() {
            return Err(Failure::new(FailureKind::Late, LATE));
        }
        self.publish(accepted(&command.id));
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
                    && artifact::is_downgrade(&current, &version)
                {
                    return Err(downgrade_refused(&service, &current, &version));
                }
                // Also below what ran here once, and was removed since.
                self.inner
                    .installed
                    .refuse(
                        &service,
                        &version,
                        self.inner.releases.is_staged(&service, &version),
                        allow_downgrade,
                    )
                    .or_fail(FailureKind::Refused)?;
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

    /// Activation or rollback of the agent itself (see
    /// [`crate::selfupgrade`]): on success this process is replaced, and
    /// the new agent answers the re-sent command.
    async fn upgrade_self(
        &self,
        id: &str,
        version: &str,
        gate: HealthGate,
        allow_downgrade: bool,
    ) -> Result<(), Failure> {
        let me = self.inner.config.me.clone();
        if let Some(trial) = me.trial() {
            // This process is the new agent of an upgrade on trial: nothing
            // else about the agent runs before that is decided.
            let mut rx = self.inner.trial.subscribe();
            let outcome = rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|o| o.clone());
            if trial.command_id == id {
                // The new agent failing its trial is an unhealthy release.
                return outcome
                    .unwrap_or_else(|| Err("the agent is stopping".into()))
                    .or_fail(FailureKind::NotHealthy);
            }
        }
        let _host = self.inner.host.lock().await;
        if me.version() == version {
            info!(%version, "the agent already runs this version");
            return Ok(());
        }
        if !allow_downgrade && artifact::is_downgrade(me.version(), version) {
            return Err(downgrade_refused(AGENT_NAME, me.version(), version));
        }
        self.inner
            .installed
            .refuse(
                AGENT_NAME,
                version,
                me.releases().is_staged(AGENT_NAME, version),
                allow_downgrade,
            )
            .or_fail(FailureKind::Refused)?;
        if self.inner.notifier.enabled() {
            // Across the exec the new agent copies sockets back from the
            // running services; systemd's fd store, which also holds them,
            // is handed out only when the unit starts. A service that is
            // down now would find its port taken by the store.
            let slots: Vec<(String, Arc<Slot>)> = lock(&self.inner.slots)
                .iter()
                .map(|(n, s)| (n.clone(), s.clone()))
                .collect();
            for (name, slot) in slots {
                let st = slot.state.lock().await;
                if !st.sockets.is_empty() && !st.current.as_ref().is_some_and(Current::is_alive) {
                    return Err(Failure::new(
                        FailureKind::Refused,
                        format!(
                            "service {name} is not running, and its sockets would not survive the agent's re-execution under systemd; upgrade the agent once it runs"
                        ),
                    ));
                }
            }
        }
        let (id, version) = (id.to_owned(), version.to_owned());
        tokio::task::spawn_blocking(move || me.begin(&id, &version, gate))
            .await
            .map_err(|e| {
                Failure::new(
                    FailureKind::Internal,
                    format!("the upgrade task failed: {e}"),
                )
            })?
            .or_fail(FailureKind::Start)
    }

    /// When this process is the new agent of an upgrade on trial: once it
    /// has been connected for the trial's `min_healthy_time`, asks the
    /// watchdog to commit, then journals the activation as succeeded.
    pub fn confirm_upgrade(&self, mut connected: watch::Receiver<bool>) {
        let me = self.inner.config.me.clone();
        let Some(trial) = me.trial().cloned() else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let healthy = async {
                loop {
                    connected.wait_for(|c| *c).await.ok()?;
                    tokio::select! {
                        _ = tokio::time::sleep(trial.min_healthy_time) => return Some(()),
                        lost = connected.wait_for(|c| !*c) => { lost.ok()?; }
                    }
                }
            };
            tokio::select! {
                _ = this.inner.shutdown.cancelled() => return,
                h = healthy => if h.is_none() { return },
            }
            let result = tokio::task::spawn_blocking(move || me.confirm())
                .await
                .map_err(|e| format!("the confirmation task failed: {e}"))
                .and_then(|r| r);
            match &result {
                Ok(()) => {
                    let update = CommandUpdate::done(&trial.command_id, Outcome::Succeeded, "");
                    if let Err(e) = this.inner.journal.record(&update) {
                        error!(id = %trial.command_id, error = %e, "cannot journal the agent upgrade");
                    }
                    this.publish(update);
                    this.record_installed(AGENT_NAME, this.inner.config.me.version());
                    this.inner.config.me.prune(this.inner.config.keep_releases);
                }
                Err(e) => error!(error = %e, "cannot confirm the agent upgrade"),
            }
            this.inner.trial.send_replace(Some(result));
        });
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

    /// The sockets for `specs`: kept ones reused, new ones bound (and put
    /// in systemd's fd store when the agent runs under systemd).
    fn sockets_for(
        &self,
        st: &mut SlotState,
        name: &str,
        specs: &[ListenSpec],
    ) -> Result<Arc<Vec<ListenSocket>>, String> {
        if specs.iter().eq(st.sockets.iter().map(|s| &s.spec)) {
            return Ok(st.sockets.clone());
        }
        let mut out = Vec::with_capacity(specs.len());
        let mut fresh = Vec::new();
        for spec in specs {
            let existing = st.sockets.iter().find(|s| &s.spec == spec);
            let fd = match existing {
                Some(s) => {
                    s.fd.try_clone()
                        .map_err(|e| format!("cannot duplicate {}: {e}", spec.text()))?
                }
                None => {
                    let fd = spec
                        .bind()
                        .map_err(|e| format!("cannot listen on {}: {e}", spec.text()))?;
                    info!(service = %name, listen = %spec.text(), "listening on behalf of the service");
                    fresh.push(spec.clone());
                    fd
                }
            };
            out.push(ListenSocket {
                spec: spec.clone(),
                fd,
            });
        }
        // Stored only once every socket is bound, so a failed bind leaves
        // nothing behind in systemd's store.
        for s in out.iter().filter(|s| fresh.contains(&s.spec)) {
            if let Err(e) = self
                .inner
                .notifier
                .store_fds(&format!("{name}={}", s.spec.fd_name()), &[s.fd.as_fd()])
            {
                warn!(service = %name, error = %e, "cannot put the socket in systemd's fd store");
            }
        }
        let sockets = Arc::new(out);
        st.sockets = sockets.clone();
        Ok(sockets)
    }

    /// Closes the sockets `specs` does not declare, and takes them out of
    /// systemd's fd store.
    fn release_sockets(&self, st: &mut SlotState, name: &str, specs: &[ListenSpec]) {
        if st.sockets.iter().all(|s| specs.contains(&s.spec)) {
            return;
        }
        let mut left = Vec::new();
        for s in st.sockets.iter() {
            if specs.contains(&s.spec) {
                if let Ok(fd) = s.fd.try_clone() {
                    left.push(ListenSocket {
                        spec: s.spec.clone(),
                        fd,
                    });
                }
            } else {
                info!(service = %name, listen = %s.spec.text(), "closing a socket the service no longer declares");
                self.inner
                    .notifier
                    .remove_fds(&format!("{name}={}", s.spec.fd_name()));
            }
        }
        st.sockets = Arc::new(left);
    }

    async fn remove(&self, name: &str, deadline: SystemTime) -> Result<(), Failure> {
        let slot = self.slot(name);
        cancel_activations(&slot, "a removal");
        let mut st = slot.state.lock().await;
        let until = activate::instant_of(deadline);
        // The hook first, while the service is still in place and
        // watched: a failing pre_stop leaves it as it was.
        if let Some(old) = st.current.as_ref() {
            let never = CancellationToken::new();
            let bound = hooks::Bound {
                until,
                cancel: &never,
            };
            self.pre_stop(name, old, Some(bound)).await?;
        }
        if let Some(m) = st.monitor.take() {
            m.abort();
        }
        if let Some(old) = st.current.take() {
            let unit = match &old.process {
                Runner::Systemd { unit, .. } => Some(unit.clone()),
                Runner::Native(_) => None,
            };
            self.stop_old(name, old, until).await?;
            if let Some(unit) = unit {
                systemctl(&["stop", &unit])
                    .await
                    .map_err(|e| format!("cannot stop {name}: {e}"))
                    .or_fail(FailureKind::StopTimeout)?;
            }
        }
        self.release_sockets(&mut st, name, &[]);
        self.inner
            .releases
            .remove(name)
            .map_err(|e| format!("cannot remove {name}: {e}"))
            .or_fail(FailureKind::Disk)?;
        self.inner
            .inventory
            .send_if_modified(|inv| inv.remove(name).is_some());
        info!(service = %name, "removed");
        Ok(())
    }

    /// Installs a running release in the slot and starts watching it:
    /// process state and (between activations) the health check feed the
    /// inventory.
    fn install(
        &self,
        st: &mut SlotState,
        name: &str,
        version: &str,
        release_dir: &std::path::Path,
        spec: ServiceSpec,
        process: Runner,
    ) {
        if let Some(m) = st.monitor.take() {
            m.abort();
        }
        let status = match &process {
            Runner::Native(sup) => sup.status(),
            // A unit is reported running; its health check tells the rest.
            Runner::Systemd { .. } => {
                watch::channel(crate::supervisor::ProcessStatus {
                    state: ProcessState::Running { pid: 0 },
                    restarts: 0,
                    last_exit: None,
                })
                .1
            }
        };
        let health = spec.health.clone();
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
            .get(name)
            .is_some_and(|s| s.version == version && s.healthy);
        self.set_status(name, version, state, healthy);
        st.current = Some(Current {
            version: version.to_owned(),
            release_dir: release_dir.to_owned(),
            spec,
            process,
        });
        let this = self.clone();
        let (name, version, release_dir) =
            (name.to_owned(), version.to_owned(), release_dir.to_owned());
        st.monitor = Some(tokio::spawn(async move {
            this.monitor(&name, &version, health, release_dir, status)
                .await;
        }));
    }

    async fn monitor(
        &self,
        name: &str,
        version: &str,
        health: Option<HealthSpec>,
        release_dir: PathBuf,
        mut status: watch::Receiver<crate::supervisor::ProcessStatus>,
    ) {
        let interval = health
            .as_ref()
            .map_or(Duration::from_secs(1), |h| h.interval);
        loop {
            let state = match status.borrow_and_update().state {
                ProcessState::Running { .. } => ServiceState::Running,
                ProcessState::Restarting { .. } => ServiceState::Failed,
                ProcessState::Stopped => ServiceState::Stopped,
            };
            let healthy = if state == ServiceState::Running {
                match &health {
                    Some(h) => {
                        let passed = health::check_once(h, &release_dir).await.is_ok();
                        if !passed {
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
    }
}

/// Binds the datagram socket a new process announces `READY=1` on, in the
/// abstract namespace (no path length limit, nothing left on disk).
fn notify_socket() -> Result<(String, tokio::net::UnixDatagram), String> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!(
        "baton-ready-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| format!("cannot name a notify socket: {e}"))?;
    let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr)
        .and_then(|s| {
            s.set_nonblocking(true)?;
            tokio::net::UnixDatagram::from_std(s)
        })
        .map_err(|e| format!("cannot bind a notify socket: {e}"))?;
    Ok((format!("@{name}"), socket))
}

/// Waits until a process started beside the old one is ready to take the
/// sockets over: `READY=1` on its notify socket (`ready = "notify"`), or
/// else a first passing health check (which the old process may answer:
/// the weaker choice, for services that cannot notify).
async fn wait_ready(
    spec: &ServiceSpec,
    release_dir: &std::path::Path,
    alive: &mut watch::Receiver<bool>,
    cancel: &CancellationToken,
    gate: &Gate,
    notify: Option<tokio::net::UnixDatagram>,
) -> Result<(), String> {
    let deadline = gate.healthy_deadline;
    let mut for_check = alive.clone();
    let ready = async {
        match &notify {
            Some(socket) => {
                let mut buf = vec![0u8; 4096];
                loop {
                    let n = socket.recv(&mut buf).await.map_err(|e| e.to_string())?;
                    if String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .any(|l| l == "READY=1")
                    {
                        return Ok(());
                    }
                }
            }
            None => health::wait_passing(
                spec.health.as_ref(),
                release_dir,
                // The whole gate, while the old process still serves: the
                // check may reach either process, so only its length (and
                // the new process staying alive) says something.
                gate,
                &mut for_check,
                cancel,
            )
            .await
            .map(|_| ()),
        }
    };
    tokio::select! {
        r = ready => r,
        () = cancel.cancelled() => Err("cancelled".into()),
        _ = alive.wait_for(|a| !*a) => Err("the new process exited before it was ready".into()),
        () = tokio::time::sleep(deadline) => Err(format!(
            "not ready within {} (no READY=1 on its notify socket)",
            humantime::format_duration(deadline)
        )),
    }
}

/// Parses a spec's `listen` entries.
fn listen_specs(spec: &ServiceSpec) -> Result<Vec<ListenSpec>, String> {
    spec.listen.iter().map(|l| ListenSpec::parse(l)).collect()
}

/// The descriptors systemd handed this agent from its fd store
/// (`LISTEN_FDS`, named `<service>=<fd name>` in `LISTEN_FDNAMES`).
fn stored_fds() -> HashMap<String, OwnedFd> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut out = HashMap::new();
    let mut fds = listenfd::ListenFd::from_env();
    for (i, name) in names.into_iter().enumerate() {
        let fd: Option<OwnedFd> = match fds.take_tcp_listener(i) {
            Ok(Some(l)) => Some(l.into()),
            _ => match fds.take_unix_listener(i) {
                Ok(Some(l)) => Some(l.into()),
                _ => None,
            },
        };
        if let Some(fd) = fd {
            out.insert(name, fd);
        }
    }
    out
}
