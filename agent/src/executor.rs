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
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use baton_common::artifact::{self, Manifest, PayloadHasher, PublicKey, SignedManifest};
use baton_common::command::{Command, CommandKind, CommandUpdate, HealthGate, Outcome, Phase};
use baton_common::host::{ServiceState, ServiceStatus};
use baton_proto::agent::v1 as pb;
use baton_proto::agent::v1::artifact_service_client::ArtifactServiceClient;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use tracing::{debug, error, info, warn};

use crate::health::{self, Gate};
use crate::journal::Journal;
use crate::releases::Releases;
use crate::service::{self, HealthSpec, ServiceSpec};
use crate::supervisor::{ProcessState, Supervisor, SupervisorConfig};

/// Progress updates per command are sent at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Attempts to resume a broken download before staging fails.
const FETCH_ATTEMPTS: u32 = 10;

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
    fetch: ArtifactServiceClient<Channel>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// One download per payload at a time (two stages of one artifact
    /// would append to the same partial file).
    downloads: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    running: Mutex<HashSet<String>>,
    updates: broadcast::Sender<CommandUpdate>,
    inventory: watch::Sender<BTreeMap<String, ServiceStatus>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
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
}

#[derive(Default)]
struct SlotState {
    supervisor: Option<Supervisor>,
    monitor: Option<tokio::task::JoinHandle<()>>,
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
        channel: Channel,
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
        Ok(Self {
            inner: Arc::new(Inner {
                releases: Releases::new(&config.data_dir),
                journal,
                fetch: ArtifactServiceClient::new(channel).max_decoding_message_size(8 << 20),
                slots: Mutex::default(),
                downloads: Mutex::default(),
                running: Mutex::default(),
                updates: broadcast::channel(1024).0,
                inventory: watch::channel(BTreeMap::new()).0,
                shutdown,
                tasks: TaskTracker::new(),
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
    /// running is adopted (not restarted), a stopped one is started.
    pub async fn recover(&self) {
        for name in self.inner.releases.services() {
            let Some(version) = self.inner.releases.current(&name) else {
                continue;
            };
            let release_dir = self.inner.releases.release_dir(&name, &version);
            let spec = match service::load(&release_dir, &self.inner.config.vars) {
                Ok(spec) => spec,
                Err(e) => {
                    error!(service = %name, %version, error = %e, "cannot load the current release; not running it");
                    self.set_status(&name, &version, ServiceState::Failed, false);
                    continue;
                }
            };
            let slot = self.slot(&name);
            let mut st = slot.state.lock().await;
            let run_dir = self.inner.releases.run_dir(&name);
            let cfg = self.inner.config.supervisor;
            let adopted = match Supervisor::adopt(&name, &release_dir, spec.clone(), &run_dir, cfg)
            {
                Ok(Some(sup)) if sup.version() == version => {
                    info!(service = %name, %version, pid = ?sup.pid(), "adopted the running service");
                    Some(sup)
                }
                Ok(Some(stale)) => {
                    info!(service = %name, running = stale.version(), current = %version, "the running process is not the current release; replacing it");
                    if let Err(e) = stale.stop().await {
                        warn!(service = %name, error = %e, "cannot stop the stale process");
                    }
                    None
                }
                Ok(None) => None,
                Err(e) => {
                    warn!(service = %name, error = %e, "cannot adopt the service's process");
                    None
                }
            };
            let sup = match adopted {
                Some(sup) => sup,
                None => match Supervisor::start(
                    &name,
                    &version,
                    &release_dir,
                    spec.clone(),
                    &run_dir,
                    cfg,
                ) {
                    Ok(sup) => {
                        info!(service = %name, %version, "started the service, which was not running");
                        sup
                    }
                    Err(e) => {
                        error!(service = %name, %version, error = %e, "cannot start the service");
                        self.set_status(&name, &version, ServiceState::Failed, false);
                        continue;
                    }
                },
            };
            self.install(&mut st, &name, &version, spec, sup);
        }
    }

    /// Accepts a command from the coordinator and runs it in the
    /// background; its updates arrive on [`Executor::updates`].
    pub fn submit(&self, wire: pb::Command) {
        let command = match Command::try_from(wire) {
            Ok(c) => c,
            Err(unusable) => {
                warn!(id = ?unusable.id, reason = %unusable.reason, "refusing a command this agent cannot run");
                self.publish(CommandUpdate::done(
                    unusable.id.as_deref().unwrap_or("-"),
                    Outcome::Failed,
                    unusable.reason.to_string(),
                ));
                return;
            }
        };
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
            let outcome = tokio::select! {
                _ = this.inner.shutdown.cancelled() => None,
                r = this.run(command) => Some(r),
            };
            let Some(result) = outcome else {
                // Not journaled: the coordinator re-sends it after the
                // restart and it converges from wherever it stopped.
                lock(&this.inner.running).remove(&id);
                return;
            };
            let update = match &result {
                Ok(()) => CommandUpdate::done(&id, Outcome::Succeeded, ""),
                Err(e) => CommandUpdate::done(&id, Outcome::Failed, e.clone()),
            };
            match &result {
                Ok(()) => info!(%id, kind, "command succeeded"),
                Err(e) => warn!(%id, kind, error = %e, "command failed"),
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
            st.supervisor = None;
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

    async fn run(&self, command: Command) -> Result<(), String> {
        if command.deadline < SystemTime::now() {
            return Err("the command arrived after its deadline".into());
        }
        self.publish(accepted(&command.id));
        let kind = command.kind;
        if let Some(service) = kind.service() {
            baton_common::host::validate_name(service)
                .map_err(|e| format!("invalid service name {service:?}: {e}"))?;
        }
        match kind {
            CommandKind::Noop => Ok(()),
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
            } => self.activate(&service, &version, gate, false).await,
            CommandKind::Rollback {
                service,
                version,
                gate,
            } => self.activate(&service, &version, gate, true).await,
            CommandKind::Remove { service } => self.remove(&service).await,
        }
    }

    async fn stage(
        &self,
        id: &str,
        name: &str,
        version: &str,
        manifest: Vec<u8>,
        signature: Vec<u8>,
    ) -> Result<(), String> {
        artifact::validate_version(version).map_err(|e| e.to_string())?;
        if self.inner.releases.is_staged(name, version) {
            debug!(service = %name, %version, "already staged");
            return Ok(());
        }
        let signed = SignedManifest::parse(manifest, signature)
            .map_err(|e| format!("the artifact's manifest is invalid: {e}"))?;
        let m = &signed.manifest;
        if m.name != name || m.version != version {
            return Err(format!(
                "the manifest is for {} {}, not {name} {version}",
                m.name, m.version
            ));
        }
        if self.inner.config.trusted_keys.is_empty() {
            return Err(format!(
                "refusing {name} {version}: this agent trusts no release key (configure --trusted-key)"
            ));
        }
        signed
            .verify(&self.inner.config.trusted_keys)
            .map_err(|e| format!("refusing {name} {version}: {e}"))?;
        let gate = lock(&self.inner.downloads)
            .entry(m.payload_sha256.clone())
            .or_default()
            .clone();
        let _one_at_a_time = gate.lock().await;
        if self.inner.releases.is_staged(name, version) {
            return Ok(());
        }
        let payload = self.download(id, m).await?;
        // Unpacking is blocking file work; keep it off the runtime.
        let releases = self.inner.releases.clone();
        let (name_owned, version_owned) = (name.to_owned(), version.to_owned());
        let payload_path = payload.clone();
        let unpacked = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let dest = releases
                .staging_dir(&name_owned, &version_owned)
                .map_err(|e| format!("cannot prepare the release directory: {e}"))?;
            let file = std::fs::File::open(&payload_path)
                .map_err(|e| format!("cannot reopen the download: {e}"))?;
            artifact::unpack(
                std::io::BufReader::new(file),
                &dest,
                &artifact::UnpackLimits::default(),
            )
            .map_err(|e| format!("cannot unpack {name_owned} {version_owned}: {e}"))?;
            releases
                .commit_staged(&dest, &name_owned, &version_owned)
                .map_err(|e| format!("cannot move the release into place: {e}"))
        })
        .await
        .map_err(|e| format!("the unpack task failed: {e}"))
        .and_then(|r| r);
        // A payload that unpacked is not needed again; one that did not is
        // bad (it matched its signed digest, so it will not get better).
        let _ = std::fs::remove_file(&payload);
        unpacked?;
        info!(service = %name, %version, "staged");
        Ok(())
    }

    /// Downloads a payload into `downloads/<hex>.partial` (see
    /// [`download`]), reporting progress on the command.
    async fn download(&self, id: &str, m: &Manifest) -> Result<PathBuf, String> {
        let path = self
            .inner
            .config
            .data_dir
            .join("downloads")
            .join(format!("{}.partial", m.payload_sha256));
        let mut last_progress = Instant::now();
        download(self.inner.fetch.clone(), m, &path, |offset| {
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                self.publish(CommandUpdate {
                    command_id: id.to_owned(),
                    phase: Phase::Running,
                    progress_percent: u32::try_from(offset * 100 / m.size.max(1)).unwrap_or(100),
                    error: String::new(),
                });
            }
        })
        .await?;
        Ok(path)
    }

    /// Activation and rollback: make `version` current and running, then
    /// wait for the health gate.
    async fn activate(
        &self,
        name: &str,
        version: &str,
        gate: HealthGate,
        rollback: bool,
    ) -> Result<(), String> {
        artifact::validate_version(version).map_err(|e| e.to_string())?;
        let slot = self.slot(name);
        let cancel = CancellationToken::new();
        let ticket = slot
            .next_activation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if rollback {
            // Whatever is activating now, or waiting to, is what we undo.
            cancel_activations(&slot);
        } else {
            lock(&slot.activations).push((ticket, cancel.clone()));
        }
        let result = self
            .activate_locked(&slot, name, version, gate, rollback, &cancel)
            .await;
        lock(&slot.activations).retain(|(t, _)| *t != ticket);
        result
    }

    async fn activate_locked(
        &self,
        slot: &Slot,
        name: &str,
        version: &str,
        gate: HealthGate,
        rollback: bool,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let mut st = slot.state.lock().await;
        if cancel.is_cancelled() {
            return Err(format!(
                "{name} {version}: cancelled by a rollback before it started"
            ));
        }
        if !self.inner.releases.is_staged(name, version) {
            return Err(if rollback {
                format!("cannot roll back: release {name} {version} is no longer on this host")
            } else {
                format!(
                    "release {name} {version} is not staged on this host; stage (and verify) it first"
                )
            });
        }
        let release_dir = self.inner.releases.release_dir(name, version);
        let spec = service::load(&release_dir, &self.inner.config.vars)
            .map_err(|e| format!("{name} {version}: {e}"))?;
        let running = st
            .supervisor
            .as_ref()
            .is_some_and(|s| s.version() == version && *s.alive().borrow());
        let already = running && self.inner.releases.current(name).as_deref() == Some(version);
        // The release replaced here, kept on disk for a rollback.
        let mut previous: Option<String> = None;
        if already {
            info!(service = %name, %version, "already current and running; checking health only");
        } else {
            if let Some(hook) = &spec.hooks.pre_start {
                run_hook(hook, &release_dir, &spec, gate.healthy_deadline)
                    .await
                    .map_err(|e| format!("pre_start hook of {name} {version} failed: {e}"))?;
            }
            if cancel.is_cancelled() {
                return Err(format!(
                    "{name} {version}: cancelled by a rollback before the swap"
                ));
            }
            let from = self.inner.releases.current(name);
            previous = from.clone();
            self.inner
                .releases
                .swap(name, version)
                .map_err(|e| format!("cannot swap {name} to {version}: {e}"))?;
            self.set_status(name, version, ServiceState::Starting, false);
            if let Some(m) = st.monitor.take() {
                m.abort();
            }
            if let Some(old) = st.supervisor.take()
                && let Err(e) = old.stop().await
            {
                warn!(service = %name, error = %e, "stopping the old process failed");
            }
            let run_dir = self.inner.releases.run_dir(name);
            let sup = Supervisor::start(
                name,
                version,
                &release_dir,
                spec.clone(),
                &run_dir,
                self.inner.config.supervisor,
            )
            .map_err(|e| format!("cannot start {name} {version}: {e}"))?;
            info!(service = %name, from = ?from, to = %version, pid = ?sup.pid(), rollback, "swapped and started");
            self.install(&mut st, name, version, spec.clone(), sup);
        }
        let mut alive = st
            .supervisor
            .as_ref()
            .map(Supervisor::alive)
            .ok_or("the service has no process")?;
        let result = health::wait_healthy(
            spec.health.as_ref(),
            &release_dir,
            &Gate {
                min_healthy_time: gate.min_healthy_time,
                healthy_deadline: gate.healthy_deadline,
            },
            &mut alive,
            cancel,
        )
        .await;
        let took = result.map_err(|e| format!("{name} {version}: {e}"))?;
        info!(service = %name, %version, took = ?took, "healthy");
        self.set_status(name, version, ServiceState::Running, true);
        let keep = self.inner.config.keep_releases;
        let protect: Vec<&str> = previous.iter().map(String::as_str).collect();
        match self.inner.releases.prune(name, keep, &protect) {
            Ok(removed) if !removed.is_empty() => {
                info!(service = %name, removed = ?removed, "pruned old releases")
            }
            Ok(_) => {}
            Err(e) => warn!(service = %name, error = %e, "cannot prune old releases"),
        }
        Ok(())
    }

    async fn remove(&self, name: &str) -> Result<(), String> {
        let slot = self.slot(name);
        cancel_activations(&slot);
        let mut st = slot.state.lock().await;
        if let Some(m) = st.monitor.take() {
            m.abort();
        }
        if let Some(sup) = st.supervisor.take() {
            sup.stop()
                .await
                .map_err(|e| format!("cannot stop {name}: {e}"))?;
        }
        self.inner
            .releases
            .remove(name)
            .map_err(|e| format!("cannot remove {name}: {e}"))?;
        self.inner
            .inventory
            .send_if_modified(|inv| inv.remove(name).is_some());
        info!(service = %name, "removed");
        Ok(())
    }

    /// Installs a supervisor in the slot and starts watching it: process
    /// state and (between activations) the health check feed the
    /// inventory.
    fn install(
        &self,
        st: &mut SlotState,
        name: &str,
        version: &str,
        spec: ServiceSpec,
        sup: Supervisor,
    ) {
        let status = sup.status();
        st.supervisor = Some(sup);
        if let Some(m) = st.monitor.take() {
            m.abort();
        }
        let release_dir = self.inner.releases.release_dir(name, version);
        let this = self.clone();
        let (name, version) = (name.to_owned(), version.to_owned());
        st.monitor = Some(tokio::spawn(async move {
            this.monitor(&name, &version, spec.health, release_dir, status)
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
                    Some(h) => health::check_once(h, &release_dir).await.is_ok(),
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

/// Downloads the payload `m` describes into `path` over `client`, hashing
/// as it arrives (no second pass) and resuming from the bytes already
/// there — after a broken stream, or left by an earlier run. Fails (and
/// deletes the file) when size or digest do not match the manifest.
/// `progress` is called with the offset after every chunk.
pub async fn download(
    client: ArtifactServiceClient<Channel>,
    m: &Manifest,
    path: &std::path::Path,
    mut progress: impl FnMut(u64),
) -> Result<(), String> {
    let digest = format!("sha256:{}", m.payload_sha256);
    let path = path.to_path_buf();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut offset = file.metadata().map_err(|e| e.to_string())?.len();
    let mut hasher = PayloadHasher::new();
    if offset > m.size {
        file.set_len(0).map_err(|e| e.to_string())?;
        offset = 0;
    }
    if offset > 0 {
        // Left by an earlier run of the agent: hash what is there once.
        info!(%digest, offset, "resuming an interrupted download");
        let mut reader = std::fs::File::open(&path).map_err(|e| e.to_string())?;
        let mut buf = vec![0; 1 << 20];
        loop {
            let n = reader.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    let mut attempts = 0;
    while offset < m.size {
        let mut client = client.clone();
        let result: Result<(), tonic::Status> = async {
            let mut stream = client
                .fetch(pb::FetchRequest {
                    digest: digest.clone(),
                    offset,
                })
                .await?
                .into_inner();
            while let Some(chunk) = stream.message().await? {
                if chunk.offset != offset {
                    return Err(tonic::Status::data_loss(format!(
                        "chunk at offset {} where {offset} was expected",
                        chunk.offset
                    )));
                }
                if offset + chunk.data.len() as u64 > m.size {
                    return Err(tonic::Status::data_loss(
                        "the payload is longer than its manifest says",
                    ));
                }
                file.write_all(&chunk.data)
                    .map_err(|e| tonic::Status::internal(format!("cannot write: {e}")))?;
                hasher.update(&chunk.data);
                offset += chunk.data.len() as u64;
                progress(offset);
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) if offset < m.size => {
                return Err(format!(
                    "the coordinator ended the download of {digest} at {offset} of {} bytes",
                    m.size
                ));
            }
            Ok(()) => {}
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::NotFound
                        | tonic::Code::InvalidArgument
                        | tonic::Code::PermissionDenied
                        | tonic::Code::DataLoss
                ) =>
            {
                let _ = std::fs::remove_file(&path);
                return Err(format!("cannot download {digest}: {}", status.message()));
            }
            Err(status) => {
                attempts += 1;
                if attempts >= FETCH_ATTEMPTS {
                    return Err(format!(
                        "the download of {digest} broke {attempts} times, last at offset {offset}: {}",
                        status.message()
                    ));
                }
                warn!(%digest, offset, error = %status.message(), "the download broke; resuming from the offset");
                let delay = Duration::from_millis(100 * 2u64.pow(attempts.min(6)));
                tokio::time::sleep(delay).await;
            }
        }
    }
    file.sync_all().map_err(|e| e.to_string())?;
    if let Err(e) = hasher.finish(m) {
        let _ = std::fs::remove_file(&path);
        return Err(format!(
            "the download of {} {} is corrupt: {e}",
            m.name, m.version
        ));
    }
    Ok(())
}

/// Cancels every activation of the slot, running or queued.
fn cancel_activations(slot: &Slot) {
    for (_, token) in lock(&slot.activations).drain(..) {
        token.cancel();
    }
}

fn accepted(id: &str) -> CommandUpdate {
    CommandUpdate {
        command_id: id.to_owned(),
        phase: Phase::Accepted,
        progress_percent: 0,
        error: String::new(),
    }
}

/// Runs a hook in the release directory with the service's environment.
async fn run_hook(
    hook: &[String],
    release_dir: &std::path::Path,
    spec: &ServiceSpec,
    timeout: Duration,
) -> Result<(), String> {
    let Some((program, args)) = hook.split_first() else {
        return Ok(());
    };
    let mut cmd = tokio::process::Command::new(service::resolve(release_dir, program));
    cmd.args(args)
        .envs(&spec.env)
        .current_dir(release_dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| format!("timed out after {}", humantime::format_duration(timeout)))?
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!(
            "{} ({})",
            crate::supervisor::describe_exit(output.status),
            stderr.trim().lines().last().unwrap_or("no output")
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn a_failing_pre_start_hook_says_how_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for (name, body) in [
            ("ok", "#!/bin/sh\ntest \"$MODE\" = migrate\n"),
            (
                "fail",
                "#!/bin/sh\necho 'schema 7 is newer than this release' >&2\nexit 3\n",
            ),
            ("hang", "#!/bin/sh\nexec sleep 30\n"),
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
        let t = Duration::from_secs(10);
        run_hook(&["bin/ok".into()], dir.path(), &spec, t)
            .await
            .unwrap();
        let err = run_hook(&["bin/fail".into()], dir.path(), &spec, t)
            .await
            .unwrap_err();
        assert!(
            err.contains("3") && err.contains("schema 7 is newer than this release"),
            "{err}"
        );
        let err = run_hook(
            &["bin/hang".into()],
            dir.path(),
            &spec,
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(err.contains("timed out after 200ms"), "{err}");
    }
}
