//! The rollout driver: one actor owns every running rollout, feeds it
//! events (agent updates, connects and disconnects, ticks, operator
//! requests) through [`machine::step`], **persists the new state, and only
//! then** sends the commands the step asked for.
//!
//! After a restart it loads every non-terminal rollout and feeds it a
//! `Connected` event for each host already connected, which re-sends that
//! host's outstanding command under its original id; the agent answers a
//! known id from its journal, so nothing runs twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use baton_common::command::{CommandUpdate, Phase};
use baton_common::host::{HostId, HostView};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::events;
use super::machine::{self, Action, Event, Operator, Rollout, State};
use super::plan::Plan;
use super::record;
use super::resolve;
use crate::artifacts::Artifacts;
use crate::fleet::FleetHandle;
use crate::store::{Op, Store, StoreError, batch};

/// How often deadlines are checked.
const TICK: Duration = Duration::from_millis(200);
/// Requests queued towards the driver.
const QUEUE: usize = 256;
/// The most agent updates taken at once: a burst of answers costs one pass
/// over the rollout and one write, not one each. While a rollout stages,
/// that many answers are one step: a stage command that succeeded is
/// stored as a small mark in one record for all of them
/// ([`record::StagedMark`]), so the step stays one transaction.
const UPDATES_PER_BURST: usize = 1024;
/// The most answers in one step while hosts activate: each may start
/// another activation, and the step's write (a host record each, its
/// events, its clock) stays one transaction of at most 128 operations.
const ANSWERS_PER_STEP: usize = 62;
/// How long a command may wait for room in a host's stream buffer; a host
/// that stopped reading must not stall every other rollout. An undelivered
/// command stays outstanding and is re-sent when the host reconnects.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a rollout request failed.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The plan or request is wrong; nothing was created.
    #[error("{0}")]
    Invalid(String),
    /// No such rollout.
    #[error("no rollout {0}")]
    NotFound(String),
    /// The request conflicts with the rollout's state or another rollout.
    #[error("{0}")]
    Conflict(String),
    /// The store failed; nothing was acted on.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The driver stopped (the coordinator is shutting down).
    #[error("the rollout driver has stopped")]
    Stopped,
}

impl From<machine::Refused> for RolloutError {
    fn from(r: machine::Refused) -> Self {
        Self::Conflict(r.to_string())
    }
}

type Reply<T> = oneshot::Sender<Result<T, RolloutError>>;

enum Request {
    Start {
        rollout: Box<Rollout>,
        who: String,
        reply: Reply<Rollout>,
    },
    Get {
        id: String,
        reply: Reply<Rollout>,
    },
    List {
        reply: Reply<Vec<Rollout>>,
    },
    Watch {
        id: String,
        reply: Reply<watch::Receiver<Rollout>>,
    },
    Control {
        id: String,
        op: Operator,
        who: String,
        reply: Reply<Rollout>,
    },
    Freeze {
        freeze: Option<crate::freeze::Freeze>,
        reply: Reply<FreezeView>,
    },
    GetFreeze {
        reply: Reply<FreezeView>,
    },
    StopTheLine {
        who: String,
        reply: Reply<Vec<String>>,
    },
}

/// A handle to the driver.
#[derive(Clone)]
pub struct Rollouts {
    tx: mpsc::Sender<Request>,
    changes: watch::Receiver<u64>,
    /// Histories are read here, outside the driver: a long one must not
    /// hold up the rollouts it drives.
    store: Arc<dyn Store>,
    /// Plans are resolved against these in the caller's task, outside the
    /// driver: a large plan costs its own request, not running rollouts.
    fleet: FleetHandle,
    artifacts: Artifacts,
    /// Plans parsed and resolved at once; more wait. A plan's parse may
    /// hold tens of megabytes for a moment, and a resolution a copy of the
    /// fleet: together they stay bounded however many clients ask.
    resolving: Arc<tokio::sync::Semaphore>,
}

/// Plans parsed and resolved at once (see `Rollouts::resolving`).
const RESOLVING: usize = 2;

impl Rollouts {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, RolloutError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| RolloutError::Stopped)?;
        rx.await.map_err(|_| RolloutError::Stopped)?
    }

    /// Validates, persists and starts a plan on behalf of `who` (as the
    /// event history names them, e.g. `operator alice`).
    pub async fn start(&self, plan: String, who: String) -> Result<Rollout, RolloutError> {
        let rollout = Box::new(self.plan(plan).await?);
        self.ask(|reply| Request::Start {
            rollout,
            who,
            reply,
        })
        .await
    }

    /// Resolves a plan as `start` would, without starting or storing it.
    /// Parsing and resolving run here, on a blocking thread, never in the
    /// driver.
    pub async fn plan(&self, text: String) -> Result<Rollout, RolloutError> {
        let _turn = self
            .resolving
            .acquire()
            .await
            .map_err(|_| RolloutError::Stopped)?;
        let t0 = std::time::Instant::now();
        let (text, plan) = tokio::task::spawn_blocking(move || {
            let plan = Plan::parse(&text);
            (text, plan)
        })
        .await
        .map_err(|_| RolloutError::Stopped)?;
        let plan = plan.map_err(|e| RolloutError::Invalid(e.0))?;
        let t1 = std::time::Instant::now();
        let facts = resolve::gather(&plan, &self.fleet, &self.artifacts).await?;
        let t2 = std::time::Instant::now();
        let now = SystemTime::now();
        let resolved = tokio::task::spawn_blocking(move || {
            resolve::resolve(text, &plan, &facts, resolve::new_id(now), now)
        })
        .await
        .map_err(|_| RolloutError::Stopped)?
        .map_err(|e| RolloutError::Invalid(e.0));
        debug!(
            parsing = ?t1.duration_since(t0),
            gathering = ?t2.duration_since(t1),
            resolving = ?t2.elapsed(),
            "plan resolved"
        );
        resolved
    }

    /// One rollout.
    pub async fn get(&self, id: String) -> Result<Rollout, RolloutError> {
        check_id(&id)?;
        self.ask(|reply| Request::Get { id, reply }).await
    }

    /// Every rollout, newest first.
    pub async fn list(&self) -> Result<Vec<Rollout>, RolloutError> {
        self.ask(|reply| Request::List { reply }).await
    }

    /// The rollout now and after every change; the sender is dropped once
    /// it is terminal.
    pub async fn watch(&self, id: String) -> Result<watch::Receiver<Rollout>, RolloutError> {
        check_id(&id)?;
        self.ask(|reply| Request::Watch { id, reply }).await
    }

    /// An operator action, by `who` (recorded in the event history).
    pub async fn control(
        &self,
        id: String,
        op: Operator,
        who: String,
    ) -> Result<Rollout, RolloutError> {
        check_id(&id)?;
        self.ask(|reply| Request::Control { id, op, who, reply })
            .await
    }

    /// A rollout's events from `since` on (by `seq`), at most `limit`, in
    /// order; NotFound for an unknown rollout. (Every step's events are
    /// stored with its state, so what is read is consistent.)
    pub async fn events(
        &self,
        id: &str,
        since: u64,
        limit: usize,
    ) -> Result<Vec<events::RolloutEvent>, RolloutError> {
        check_id(id)?;
        if self.store.get(&key(id)).await?.is_none() {
            return Err(RolloutError::NotFound(id.to_owned()));
        }
        Ok(events::load(self.store.as_ref(), id, since, limit).await?)
    }

    /// A rollout's newest `limit` events before `before` (by `seq`), in
    /// order: its history paged from the end.
    pub async fn events_before(
        &self,
        id: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<events::RolloutEvent>, RolloutError> {
        check_id(id)?;
        if self.store.get(&key(id)).await?.is_none() {
            return Err(RolloutError::NotFound(id.to_owned()));
        }
        Ok(events::load_before(self.store.as_ref(), id, before, limit).await?)
    }

    /// A counter that moves whenever any rollout changes (started,
    /// stepped, finished): for views that redraw on change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

struct Active {
    rollout: Rollout,
    /// The stored header and clock, to skip writes that change nothing
    /// durable.
    header: Vec<u8>,
    clock: Vec<u8>,
    /// Published to watchers at most once a tick (and at once when the
    /// rollout's state changes): a snapshot costs the whole rollout.
    watch: watch::Sender<Rollout>,
    /// The sequence number of its next event.
    next_event: u64,
    /// When it next needs a tick (see [`Rollout::next_deadline`]).
    due: Option<SystemTime>,
}

impl Active {
    /// A rollout as the store holds it.
    fn new(rollout: Rollout, next_event: u64) -> Result<Self, StoreError> {
        let k = key(&rollout.id);
        Ok(Self {
            header: record::encode_header(&rollout).map_err(|e| corrupt(&k, e))?,
            clock: record::encode_clock(&rollout).map_err(|e| corrupt(&k, e))?,
            watch: watch::channel(rollout.clone()).0,
            due: rollout.next_deadline(),
            rollout,
            next_event,
        })
    }
}

/// Where the driver's time went since the last report (logged at debug
/// level once a second while it works: `RUST_LOG=baton_coordinator=debug`).
#[derive(Default)]
struct Work {
    steps: u64,
    events: u64,
    stepping: Duration,
    writing: Duration,
    sending: Duration,
    since: Option<std::time::Instant>,
}

struct Driver {
    work: Work,
    store: Arc<dyn Store>,
    fleet: FleetHandle,
    artifacts: Artifacts,
    active: BTreeMap<String, Active>,
    /// Connected hosts and the session number of their stream.
    connected: HashMap<HostId, u64>,
    /// Rollouts whose last step could not be persisted: the event behind it
    /// is lost, so their outstanding commands are re-sent on the next tick
    /// and the agents answer them again from their journals.
    resend: HashSet<String>,
    /// Scopes whose last atomic write committed but was not applied in
    /// full (`batch::Written::pending`): finished before any other write
    /// of the same scope, and retried every tick, whether or not the
    /// rollout still runs.
    pending: HashSet<String>,
    /// Rollouts whose hosts reported progress since the last tick: their
    /// watchers see it on the next tick, not on every update.
    progressed: HashSet<String>,
    /// Rollouts not running, decoded from the store at the first listing
    /// and kept since: they change only through this driver, and listing
    /// (the dashboard on every change, each metrics scrape) must not
    /// decode the whole history inside the actor every time.
    finished: Option<BTreeMap<String, Rollout>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Bakes in progress, and the freeze.
    analysis: bake::Analysis,
    /// Commands behind a central balancer.
    balancers: traffic::Balancers,
    /// Moves on every change of any rollout.
    changed: watch::Sender<u64>,
}

/// The longest rollout id accepted (ours are about 22 characters).
pub const MAX_ID_CHARS: usize = 64;

/// A rollout id is 1–64 characters of `[A-Za-z0-9._-]`: anything else
/// (NUL bytes, slashes that would reach other store keys, a megabyte) is
/// refused as invalid rather than looked up.
pub fn check_id(id: &str) -> Result<(), RolloutError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_CHARS
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RolloutError::Invalid(format!(
            "{} is not a rollout id: ids are 1 to {MAX_ID_CHARS} letters, digits, '.', '_' or '-' (see baton rollout list)",
            baton_common::text::quote(id)
        )))
    }
}

fn key(id: &str) -> String {
    record::header_key(id)
}

/// The scope of a rollout's atomic writes.
fn scope(id: &str) -> String {
    format!("rollout/{id}")
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    }
}

/// Starts the driver: loads the rollouts a previous run left unfinished
/// and resumes them. Ends when `shutdown` is cancelled or every handle is
/// dropped.
pub async fn spawn(
    store: Arc<dyn Store>,
    fleet: FleetHandle,
    artifacts: Artifacts,
    shutdown: CancellationToken,
) -> Result<(Rollouts, tokio::task::JoinHandle<()>), StoreError> {
    spawn_with(store, fleet, artifacts, shutdown, DriverOptions::default()).await
}

/// [`spawn`], with counters, a Prometheus server for analysis and the
/// config's deployment windows.
pub async fn spawn_with(
    store: Arc<dyn Store>,
    fleet: FleetHandle,
    artifacts: Artifacts,
    shutdown: CancellationToken,
    options: DriverOptions,
) -> Result<(Rollouts, tokio::task::JoinHandle<()>), StoreError> {
    let analysis = bake::Analysis::new(store.as_ref(), fleet.clone(), &options).await?;
    // A write a crash interrupted is finished (or dropped) first.
    for scope in batch::recover(store.as_ref()).await? {
        info!(%scope, "finished a write interrupted by a crash");
    }
    remove_unfinished_starts(store.as_ref()).await?;
    let mut active = BTreeMap::new();
    let mut pending = HashSet::new();
    for (k, v) in store.list("rollouts/").await? {
        let (rollout, old) = match load_record(store.as_ref(), &k, &v).await {
            Ok(r) => r,
            Err(e) => {
                // A record that does not decode (or a newer schema's) must
                // not keep the coordinator from starting; it is left in
                // the store as it is.
                error!(key = %k, error = %e, "skipping a stored rollout that does not load");
                continue;
            }
        };
        if old && convert(store.as_ref(), &rollout).await? {
            pending.insert(scope(&rollout.id));
        }
        if !rollout.state.is_terminal() {
            info!(id = %rollout.id, state = rollout.state.as_str(), "resuming a rollout");
            let next_event = events::next_seq(store.as_ref(), &rollout.id).await?;
            let mut rollout = rollout;
            // Every host counts as away until the fleet says otherwise.
            rollout.set_connections(|_| false);
            active.insert(rollout.id.clone(), Active::new(rollout, next_event)?);
        }
    }
    let (tx, rx) = mpsc::channel(QUEUE);
    let (changed, changes) = watch::channel(0);
    let driver = Driver {
        work: Work::default(),
        store,
        fleet,
        artifacts,
        active,
        connected: HashMap::new(),
        resend: HashSet::new(),
        pending,
        progressed: HashSet::new(),
        finished: None,
        metrics: options.metrics,
        analysis,
        balancers: traffic::Balancers::new(options.balancers),
        changed,
    };
    let handle = Rollouts {
        tx,
        changes,
        store: driver.store.clone(),
        fleet: driver.fleet.clone(),
        artifacts: driver.artifacts.clone(),
        resolving: Arc::new(tokio::sync::Semaphore::new(RESOLVING)),
    };
    let task = tokio::spawn(driver.run(rx, shutdown));
    Ok((handle, task))
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>, shutdown: CancellationToken) {
        let mut updates = self.fleet.command_updates();
        let Ok((snapshot, mut changes)) = self.fleet.watch().await else {
            return;
        };
        // The hold now, before any step can start a host; then bakes a
        // restart interrupted start over.
        for id in self.active.keys().cloned().collect::<Vec<_>>() {
            self.sync_hold(&id).await;
        }
        self.sync_connected(&snapshot).await;
        self.resume_balanced();
        let mut baked = std::mem::replace(&mut self.analysis.rx, mpsc::channel(1).1);
        let mut balanced = self.balancers.take_done();
        for id in self.active.keys().cloned().collect::<Vec<_>>() {
            self.reconcile_bakes(&id);
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                req = rx.recv() => match req {
                    Some(req) => self.handle(req).await,
                    None => break,
                },
                u = updates.recv() => match u {
                    Some(first) => {
                        // Take what else has arrived into the same steps:
                        // many while a rollout stages (its answers are one
                        // small write), a few otherwise, so ticks and
                        // operators are not kept waiting behind a long
                        // run of steps.
                        let staging = self
                            .active
                            .values()
                            .any(|a| a.rollout.state == State::Staging);
                        let cap = if staging { UPDATES_PER_BURST } else { 2 * ANSWERS_PER_STEP };
                        let mut burst = vec![first];
                        while burst.len() < cap {
                            match updates.try_recv() {
                                Ok(u) => burst.push(u),
                                Err(_) => break,
                            }
                        }
                        self.on_updates(burst, false).await;
                    }
                    None => break,
                },
                Some(result) = baked.recv() => self.on_baked(result).await,
                Some(done) = balanced.recv() => self.on_updates(vec![done], true).await,
                c = changes.recv() => match c {
                    Ok(view) => self.on_host(&view).await,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if let Ok(all) = self.fleet.list().await {
                            self.sync_connected(&all).await;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = tick.tick() => {
                    for id in std::mem::take(&mut self.resend) {
                        self.resend_outstanding(&id).await;
                    }
                    for id in std::mem::take(&mut self.progressed) {
                        if let Some(a) = self.active.get(&id) {
                            a.watch.send_replace(a.rollout.clone());
                            self.changed.send_modify(|n| *n += 1);
                        }
                    }
                    self.report_work();
                    self.check_hold().await;
                    for scope in self.pending.clone() {
                        match batch::finish(self.store.as_ref(), &scope).await {
                            Ok(()) => {
                                self.pending.remove(&scope);
                            }
                            Err(e) => warn!(%scope, error = %e, "a committed write is still not applied; trying again"),
                        }
                    }
                    // Only rollouts with a deadline due are stepped.
                    let now = SystemTime::now();
                    let due: Vec<String> = self
                        .active
                        .iter()
                        .filter(|(_, a)| a.due.is_some_and(|d| d <= now))
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in due {
                        if let Err(e) = self.apply(&id, vec![Event::Tick], None).await {
                            debug!(rollout = %id, error = %e, "a tick's step was not taken");
                        }
                    }
                }
            }
        }
        info!("rollout driver stopped");
    }

    /// Agents' updates. Only one that answers the host's outstanding
    /// command in its rollout can move it: anything else (a superseded
    /// command, an id a hostile agent made up) is dropped before any work,
    /// and progress is noted in place and published on the next tick. The
    /// final answers of a burst go into one step per rollout.
    async fn on_updates(&mut self, burst: Vec<(HostId, CommandUpdate)>, balanced: bool) {
        let mut steps: BTreeMap<String, Vec<Event>> = BTreeMap::new();
        for (host, update) in burst {
            let Some((id, _)) = update.command_id.split_once('/') else {
                continue;
            };
            let Some(entry) = self.active.get_mut(id) else {
                continue;
            };
            let mut answers = false;
            let mut progress_only = false;
            for s in &mut entry.rollout.services {
                let Some(h) = s.hosts.get_mut(&host) else {
                    continue;
                };
                if h.outstanding
                    .as_ref()
                    .is_none_or(|c| c.id != update.command_id)
                {
                    continue;
                }
                answers = true;
                if !matches!(update.phase, Phase::Done(_)) {
                    // Progress is not stored: no step.
                    if h.progress != update.progress_percent {
                        h.progress = update.progress_percent;
                        self.progressed.insert(id.to_owned());
                    }
                    progress_only = true;
                }
                break;
            }
            if !answers {
                debug!(rollout = %id, %host, command = %update.command_id, "dropping an update for no outstanding command");
                continue;
            }
            if progress_only || (!balanced && self.divert(id, &host, &update)) {
                continue;
            }
            if let Some(took) = update.health_wait {
                self.metrics.health_wait.observe(took);
            }
            self.metrics
                .connections_cut
                .inc_by(update.connections_cut.into());
            steps
                .entry(id.to_owned())
                .or_default()
                .push(Event::Update(host, update));
        }
        for (id, events) in steps {
            // While staging, an answer starts nothing: the whole burst fits
            // one transaction.
            let staging = self
                .active
                .get(&id)
                .is_some_and(|a| a.rollout.state == State::Staging);
            let per_step = if staging {
                UPDATES_PER_BURST
            } else {
                ANSWERS_PER_STEP
            };
            let mut events = events.into_iter().peekable();
            while events.peek().is_some() {
                let step: Vec<Event> = events.by_ref().take(per_step).collect();
                if let Err(e) = self.apply(&id, step, None).await {
                    debug!(rollout = %id, error = %e, "agents' answers were not taken");
                }
            }
        }
    }

    /// Brings the connected set in line with `hosts`, telling rollouts.
    async fn sync_connected(&mut self, hosts: &[HostView]) {
        let now: HashMap<HostId, u64> = hosts
            .iter()
            .filter(|h| h.connected)
            .map(|h| (h.host_id.clone(), h.session))
            .collect();
        let gone: Vec<HostId> = self
            .connected
            .keys()
            .filter(|h| !now.contains_key(*h))
            .cloned()
            .collect();
        let mut events = Vec::new();
        for host in gone {
            self.connected.remove(&host);
            events.push(Event::Disconnected(host));
        }
        // Every connected host, also ones we knew: after a restart or a lag
        // this re-sends what is outstanding, which is always safe.
        for (host, session) in now {
            self.connected.insert(host.clone(), session);
            events.push(Event::Connected(host));
        }
        self.host_events(events).await;
    }

    async fn on_host(&mut self, view: &HostView) {
        let known = self.connected.get(&view.host_id).copied();
        let event = match (view.connected, known) {
            // A new stream, possibly replacing one whose end we never saw:
            // whatever was queued on the old one may be lost, so re-send.
            (true, k) if k != Some(view.session) => {
                self.connected.insert(view.host_id.clone(), view.session);
                Event::Connected(view.host_id.clone())
            }
            (false, Some(_)) => {
                self.connected.remove(&view.host_id);
                Event::Disconnected(view.host_id.clone())
            }
            _ => return,
        };
        self.host_events(vec![event]).await;
    }

    /// Connections and disconnections, one step per rollout they concern.
    async fn host_events(&mut self, events: Vec<Event>) {
        let mut steps: BTreeMap<String, Vec<Event>> = BTreeMap::new();
        for event in events {
            let (Event::Connected(host) | Event::Disconnected(host)) = &event else {
                continue;
            };
            for (id, a) in &self.active {
                if a.rollout
                    .services
                    .iter()
                    .any(|s| s.hosts.contains_key(host))
                {
                    steps.entry(id.clone()).or_default().push(event.clone());
                }
            }
        }
        for (id, events) in steps {
            if let Err(e) = self.apply(&id, events, None).await {
                debug!(rollout = %id, error = %e, "connection changes were not taken");
            }
        }
    }

    /// One step over `events`, by the operator `who` when one asked: the
    /// rollout changes in place, what it changed (its header if it moved,
    /// the hosts it changed, its events) is persisted in one atomic
    /// write, and only then are its commands sent. A write that fails
    /// puts the rollout back as it was.
    async fn apply(
        &mut self,
        id: &str,
        events: Vec<Event>,
        who: Option<&str>,
    ) -> Result<(), RolloutError> {
        let entry = self
            .active
            .get_mut(id)
            .ok_or_else(|| RolloutError::NotFound(id.to_owned()))?;
        let now = SystemTime::now();
        let t0 = std::time::Instant::now();
        self.work.steps += 1;
        self.work.events += events.len() as u64;
        let before = entry.rollout.header();
        // One rollout must never take the driver (and every other rollout)
        // down: a step that panics fails that rollout where it stands, and
        // the failure is stored, so a restart does not replay it.
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            machine::apply(&mut entry.rollout, &events, now)
        }));
        let actions = match stepped {
            Ok(Ok(actions)) => actions,
            Ok(Err(refused)) => {
                let changed = entry.rollout.take_changed();
                entry.rollout.restore(before, changed);
                return Err(refused.into());
            }
            Err(panic) => {
                let why = panic_text(panic.as_ref());
                error!(rollout = %id, error = %why, "stepping the rollout failed unexpectedly; failing it where it stands");
                let changed = entry.rollout.take_changed();
                entry.rollout.restore(before.clone(), changed);
                machine::faulted(&mut entry.rollout, &why, now);
                Vec::new()
            }
        };
        let changed = entry.rollout.take_changed();
        let mut history = Vec::new();
        if let (Some(Event::Operator(op)), Some(who)) = (events.first(), who) {
            history.push(events::operator(op.as_str(), who, now));
        }
        history.extend(events::changes(&before, &entry.rollout, &changed, now));
        events::number(&mut history, entry.next_event);
        let prepared = prepare(
            id,
            &entry.rollout,
            (&entry.header, &entry.clock),
            &changed,
            &history,
        );
        let (ops, (header, clock)) = match prepared {
            Ok(p) => p,
            Err(e) => {
                entry.rollout.restore(before, changed);
                return Err(e.into());
            }
        };
        let t1 = std::time::Instant::now();
        self.work.stepping += t1 - t0;
        if !ops.is_empty() {
            let store = self.store.as_ref();
            let pending = &mut self.pending;
            let write = async {
                // A committed write not applied in full is applied first:
                // no later write may land under it.
                if pending.contains(&scope(id)) {
                    batch::finish(store, &scope(id)).await?;
                    pending.remove(&scope(id));
                }
                batch::write_atomic(store, &scope(id), ops).await
            };
            match write.await {
                Ok(written) => {
                    if written.pending {
                        self.pending.insert(scope(id));
                    }
                    entry.header = header;
                    entry.clock = clock;
                    entry.next_event += history.len() as u64;
                    count_activations(&self.metrics, &changed, &history, now);
                }
                Err(e) => {
                    // Not persisted, so not acted on: the old state stands.
                    // The events are lost, so ask the agents again.
                    error!(rollout = %id, error = %e, "cannot persist a rollout step; not acting on it");
                    entry.rollout.restore(before, changed);
                    entry.due = entry.rollout.next_deadline();
                    self.resend.insert(id.to_owned());
                    return Err(e.into());
                }
            }
        }
        let t2 = std::time::Instant::now();
        self.work.writing += t2 - t1;
        let mut actions = actions;
        for Action::Send(_, command) in &mut actions {
            entry.rollout.payload(command);
        }
        let state = entry.rollout.state;
        if state != before.state {
            match &entry.rollout.error {
                Some(e) if state.is_terminal() || state == State::RollingBack => {
                    warn!(rollout = %id, state = state.as_str(), error = %e, "rollout state changed")
                }
                _ => info!(rollout = %id, state = state.as_str(), "rollout state changed"),
            }
        }
        entry.due = entry.rollout.next_deadline();
        let moved =
            entry.rollout.updated_at != before.updated_at || changed.iter().any(|c| !c.is_empty());
        if state != before.state {
            // Watchers see a change of the rollout's state at once; other
            // changes on the next tick.
            entry.watch.send_replace(entry.rollout.clone());
            self.changed.send_modify(|n| *n += 1);
        } else if moved {
            self.progressed.insert(id.to_owned());
        }
        if state.is_terminal() {
            // Dropping the sender ends every watch after its last value.
            if let Some(done) = self.active.remove(id) {
                self.progressed.remove(id);
                if let Some(finished) = &mut self.finished {
                    finished.insert(id.to_owned(), done.rollout);
                }
            }
        }
        self.balancers
            .prune(id, self.active.get(id).map(|a| &a.rollout));
        self.deliver_all(id, actions).await;
        self.work.sending += t2.elapsed();
        self.reconcile_bakes(id);
        Ok(())
    }

    /// Says where the driver's time went, once a second while it works.
    fn report_work(&mut self) {
        let now = std::time::Instant::now();
        let since = *self.work.since.get_or_insert(now);
        if now.duration_since(since) < Duration::from_secs(1) {
            return;
        }
        let w = std::mem::take(&mut self.work);
        self.work.since = Some(now);
        if w.steps > 0 {
            debug!(
                steps = w.steps,
                events = w.events,
                stepping = ?w.stepping,
                writing = ?w.writing,
                sending = ?w.sending,
                over = ?now.duration_since(since),
                "rollout driver work"
            );
        }
    }

    /// A rollout as it is now: running ones from memory, others from the
    /// store.
    async fn current(&self, id: &str) -> Result<Rollout, RolloutError> {
        match self.active.get(id) {
            Some(a) => Ok(a.rollout.clone()),
            None => self.load(id).await.map(|r| self.with_connected(r)),
        }
    }

    async fn handle(&mut self, req: Request) {
        match req {
            Request::Start {
                rollout,
                who,
                reply,
            } => {
                let _ = reply.send(self.start(*rollout, &who).await);
            }
            Request::Get { id, reply } => {
                let _ = reply.send(self.current(&id).await);
            }
            Request::List { reply } => {
                let r = self
                    .list()
                    .await
                    .map(|all| all.into_iter().map(|r| self.with_connected(r)).collect());
                let _ = reply.send(r);
            }
            Request::Watch { id, reply } => {
                let r = match self.active.get(&id) {
                    Some(a) => Ok(a.watch.subscribe()),
                    // A finished rollout: its one value, then the end.
                    None => self.load(&id).await.map(|r| watch::channel(r).1),
                };
                let _ = reply.send(r);
            }
            Request::Control { id, op, who, reply } => {
                let r = match self.check_approval(&id, op, &who) {
                    Ok(()) => self.control(id, op, &who).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Request::Freeze { freeze, reply } => {
                let _ = reply.send(self.set_freeze(freeze).await);
            }
            Request::GetFreeze { reply } => {
                let _ = reply.send(Ok(self.freeze_view()));
            }
            Request::StopTheLine { who, reply } => {
                let _ = reply.send(Ok(self.stop_the_line(&who).await));
            }
        }
    }

    /// A stored rollout with its hosts' connections as they are now
    /// (connections are not stored).
    fn with_connected(&self, mut r: Rollout) -> Rollout {
        for s in &mut r.services {
            for (id, h) in &mut s.hosts {
                h.connected = self.connected.contains_key(id);
            }
        }
        r
    }

    async fn load(&self, id: &str) -> Result<Rollout, RolloutError> {
        if let Some(r) = self.finished.as_ref().and_then(|f| f.get(id)) {
            return Ok(r.clone());
        }
        match self.store.get(&key(id)).await? {
            Some(v) => Ok(load_record(self.store.as_ref(), &key(id), &v).await?.0),
            None => Err(RolloutError::NotFound(id.to_owned())),
        }
    }

    async fn list(&mut self) -> Result<Vec<Rollout>, RolloutError> {
        if self.finished.is_none() {
            let mut finished = BTreeMap::new();
            for (k, v) in self.store.list("rollouts/").await? {
                let r = match load_record(self.store.as_ref(), &k, &v).await {
                    Ok((r, _)) => r,
                    Err(e) => {
                        warn!(key = %k, error = %e, "not listing a stored rollout that does not load");
                        continue;
                    }
                };
                if !self.active.contains_key(&r.id) {
                    finished.insert(r.id.clone(), r);
                }
            }
            self.finished = Some(finished);
        }
        let mut all: Vec<Rollout> = self.active.values().map(|a| a.rollout.clone()).collect();
        all.extend(
            self.finished
                .iter()
                .flat_map(BTreeMap::values)
                .filter(|r| !self.active.contains_key(&r.id))
                .cloned(),
        );
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        Ok(all)
    }

    async fn control(
        &mut self,
        id: String,
        op: Operator,
        who: &str,
    ) -> Result<Rollout, RolloutError> {
        if !self.active.contains_key(&id) {
            // Its last write applied in full before it is read again.
            if self.pending.contains(&scope(&id)) {
                batch::finish(self.store.as_ref(), &scope(&id)).await?;
                self.pending.remove(&scope(&id));
                if let Some(finished) = &mut self.finished {
                    finished.remove(&id);
                }
            }
            let r = self.load(&id).await?;
            if op != Operator::Rollback {
                return Err(machine::step(&r, &Event::Operator(op), SystemTime::now())
                    .err()
                    .map_or_else(
                        || RolloutError::Conflict(format!("rollout {id} has ended")),
                        Into::into,
                    ));
            }
            // Rolling back a finished rollout: only while nothing newer
            // has changed the same service.
            if let Some(newer) = self
                .list()
                .await?
                .into_iter()
                .find(|o| o.created_at > r.created_at && shared_service(o, &r).is_some())
            {
                return Err(RolloutError::Conflict(format!(
                    "cannot roll back rollout {id}: the newer rollout {} changed service {} since",
                    newer.id,
                    shared_service(&newer, &r).unwrap_or_default()
                )));
            }
            if let Some(other) = self
                .active
                .values()
                .find(|a| shared_service(&a.rollout, &r).is_some())
            {
                return Err(RolloutError::Conflict(format!(
                    "cannot roll back rollout {id}: rollout {} is changing service {}",
                    other.rollout.id,
                    shared_service(&other.rollout, &r).unwrap_or_default()
                )));
            }
            let next_event = events::next_seq(self.store.as_ref(), &id).await?;
            let mut r = r;
            r.set_connections(|h| self.connected.contains_key(h));
            self.active.insert(id.clone(), Active::new(r, next_event)?);
        }
        let result = self.apply(&id, vec![Event::Operator(op)], Some(who)).await;
        if result.is_err()
            && self
                .active
                .get(&id)
                .is_some_and(|a| a.rollout.state.is_terminal())
        {
            self.active.remove(&id);
        }
        let result = match result {
            Ok(()) => self.current(&id).await,
            Err(e) => Err(e),
        };
        info!(rollout = %id, action = op.as_str(), %who, ok = result.is_ok(), "operator action");
        result
    }

    async fn start(&mut self, mut rollout: Rollout, who: &str) -> Result<Rollout, RolloutError> {
        // Connections may have changed since the plan was resolved.
        rollout.set_connections(|h| self.connected.contains_key(h));
        who.clone_into(&mut rollout.started_by);
        rollout.held.clone_from(&self.analysis.hold);
        self.balancers.permit(&rollout)?;
        if let Some(other) = self
            .active
            .values()
            .find(|a| shared_service(&a.rollout, &rollout).is_some())
        {
            return Err(RolloutError::Conflict(format!(
                "rollout {} of service {} is still {}; wait for it, or abort it",
                other.rollout.id,
                shared_service(&other.rollout, &rollout).unwrap_or_default(),
                other.rollout.state.as_str()
            )));
        }
        let id = rollout.id.clone();
        if self.store.get(&key(&id)).await?.is_some() {
            return Err(RolloutError::Conflict(format!(
                "rollout id {id} is taken; retry"
            )));
        }
        // The first step is taken before anything is stored, so a new
        // rollout's hosts are written once, already staging.
        let now = SystemTime::now();
        let before = rollout.header();
        // The history starts with the rollout as submitted (pending).
        let mut history = events::started(&rollout, who, rollout.created_at);
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            machine::apply(&mut rollout, &[Event::Tick], now)
        }));
        let actions = match stepped {
            Ok(Ok(actions)) => actions,
            Ok(Err(refused)) => return Err(refused.into()),
            Err(panic) => {
                return Err(RolloutError::Invalid(format!(
                    "this plan cannot be started: stepping it failed unexpectedly (please report it): {}",
                    panic_text(panic.as_ref())
                )));
            }
        };
        let changed = rollout.take_changed();
        history.extend(events::changes(&before, &rollout, &changed, now));
        events::number(&mut history, 0);
        let stepped_in = now.elapsed().unwrap_or_default();
        // Clock first, header last (see `record::all_records`): a start a
        // crash interrupts is not a rollout, and is removed on load. So it
        // needs no redo log, whatever its size.
        let mut records = record::all_records(&rollout).map_err(|e| corrupt(&key(&id), e))?;
        let at = records.len().saturating_sub(1);
        let started = events::records(&id, &history).map_err(|e| corrupt(&key(&id), e))?;
        records.splice(at..at, started);
        let ops = records.into_iter().map(|(k, v)| Op::Put(k, v)).collect();
        let t0 = std::time::Instant::now();
        batch::write_groups(self.store.as_ref(), batch::groups(ops)?).await?;
        info!(
            rollout = %id,
            stepped_in = ?stepped_in,
            stored_in = ?t0.elapsed(),
            services = %rollout.services.iter().map(|s| format!("{}@{}", s.name, s.version)).collect::<Vec<_>>().join(","),
            hosts = rollout.services.iter().map(|s| s.hosts.len()).sum::<usize>(),
            "rollout started"
        );
        let terminal = rollout.state.is_terminal();
        let active = Active::new(rollout, history.len() as u64)?;
        if terminal {
            // (Nothing to do: every host already runs the version.)
            if let Some(finished) = &mut self.finished {
                finished.insert(id.clone(), active.rollout.clone());
            }
            self.changed.send_modify(|n| *n += 1);
            return Ok(active.rollout);
        }
        self.active.insert(id.clone(), active);
        self.changed.send_modify(|n| *n += 1);
        let (t0, sent) = (std::time::Instant::now(), actions.len());
        let mut actions = actions;
        if let Some(a) = self.active.get(&id) {
            for Action::Send(_, command) in &mut actions {
                a.rollout.payload(command);
            }
        }
        self.deliver_all(&id, actions).await;
        debug!(rollout = %id, commands = sent, took = ?t0.elapsed(), "first commands sent");
        self.current(&id).await
    }
}

mod bake;
mod helpers;
mod persist;
mod send;
mod traffic;

pub use crate::freeze::FreezeView;
pub use bake::DriverOptions;
use helpers::{count_activations, panic_text, shared_service};
use persist::{convert, load_record, prepare, remove_unfinished_starts};

#[cfg(test)]
mod tests;
