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
use super::resolve;
use crate::artifacts::Artifacts;
use crate::fleet::FleetHandle;
use crate::store::{Compare, Op, Store, StoreError, Txn};

/// How often deadlines are checked.
const TICK: Duration = Duration::from_millis(200);
/// Requests queued towards the driver.
const QUEUE: usize = 256;
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
        let (text, plan) = tokio::task::spawn_blocking(move || {
            let plan = Plan::parse(&text);
            (text, plan)
        })
        .await
        .map_err(|_| RolloutError::Stopped)?;
        let plan = plan.map_err(|e| RolloutError::Invalid(e.0))?;
        let facts = resolve::gather(&plan, &self.fleet, &self.artifacts).await?;
        let now = SystemTime::now();
        tokio::task::spawn_blocking(move || {
            resolve::resolve(text, &plan, &facts, resolve::new_id(now), now)
        })
        .await
        .map_err(|_| RolloutError::Stopped)?
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

    /// A counter that moves whenever any rollout changes (started,
    /// stepped, finished): for views that redraw on change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

struct Active {
    rollout: Rollout,
    /// What the store holds, to skip writes that change nothing durable.
    stored: Vec<u8>,
    watch: watch::Sender<Rollout>,
    /// The sequence number of its next event.
    next_event: u64,
}

struct Driver {
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
    /// Rollouts whose hosts reported progress since the last tick: their
    /// watchers see it on the next tick, not on every update.
    progressed: HashSet<String>,
    /// Rollouts not running, decoded from the store at the first listing
    /// and kept since: they change only through this driver, and listing
    /// (the dashboard on every change, each metrics scrape) must not
    /// decode the whole history inside the actor every time.
    finished: Option<BTreeMap<String, Rollout>>,
    metrics: Arc<crate::metrics::Metrics>,
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
    format!("rollouts/{id}")
}

fn decode(k: &str, v: &[u8]) -> Result<Rollout, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        key: k.to_owned(),
        reason: e.to_string(),
    })
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
    spawn_with(store, fleet, artifacts, shutdown, Arc::default()).await
}

/// [`spawn`], counting host activations in `metrics`.
pub async fn spawn_with(
    store: Arc<dyn Store>,
    fleet: FleetHandle,
    artifacts: Artifacts,
    shutdown: CancellationToken,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<(Rollouts, tokio::task::JoinHandle<()>), StoreError> {
    let mut active = BTreeMap::new();
    for (k, v) in store.list("rollouts/").await? {
        let rollout = match decode(&k, &v) {
            Ok(r) => r,
            Err(e) => {
                // A record from an older format must not keep the
                // coordinator from starting; it is left in the store.
                error!(key = %k, error = %e, "skipping a stored rollout that does not decode");
                continue;
            }
        };
        if !rollout.state.is_terminal() {
            info!(id = %rollout.id, state = rollout.state.as_str(), "resuming a rollout");
            let next_event = events::next_seq(store.as_ref(), &rollout.id).await?;
            active.insert(
                rollout.id.clone(),
                Active {
                    watch: watch::channel(rollout.clone()).0,
                    rollout,
                    stored: v,
                    next_event,
                },
            );
        }
    }
    let (tx, rx) = mpsc::channel(QUEUE);
    let (changed, changes) = watch::channel(0);
    let driver = Driver {
        store,
        fleet,
        artifacts,
        active,
        connected: HashMap::new(),
        resend: HashSet::new(),
        progressed: HashSet::new(),
        finished: None,
        metrics,
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
        self.sync_connected(&snapshot).await;
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
                    Ok((host, update)) => {
                        let Some((id, _)) = update.command_id.split_once('/') else { continue };
                        let id = id.to_owned();
                        self.on_update(&id, host, update).await;
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        warn!(missed = n, "fell behind on agent updates; re-sending outstanding commands to recover");
                        let hosts: Vec<HostId> = self.connected.keys().cloned().collect();
                        for host in hosts {
                            self.host_event(Event::Connected(host)).await;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
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
                    let ids: Vec<String> = self.active.keys().cloned().collect();
                    for id in ids {
                        self.apply(&id, Event::Tick).await.ok();
                    }
                }
            }
        }
        info!("rollout driver stopped");
    }

    /// An agent's update. Only one that answers the host's outstanding
    /// command in that rollout can move it: anything else (a superseded
    /// command, an id a hostile agent made up) is dropped before any work,
    /// and progress is noted in place and published on the next tick —
    /// a step, which costs the whole rollout, is taken for final answers
    /// only.
    async fn on_update(&mut self, id: &str, host: HostId, update: CommandUpdate) {
        let Some(entry) = self.active.get_mut(id) else {
            return;
        };
        let mut answers = false;
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
                if h.progress != update.progress_percent {
                    h.progress = update.progress_percent;
                    self.progressed.insert(id.to_owned());
                }
                return;
            }
        }
        if !answers {
            debug!(rollout = %id, %host, command = %update.command_id, "dropping an update for no outstanding command");
            return;
        }
        if let Some(took) = update.health_wait {
            self.metrics.health_wait.observe(took);
        }
        self.apply(id, Event::Update(host, update)).await.ok();
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
        for host in gone {
            self.connected.remove(&host);
            self.host_event(Event::Disconnected(host)).await;
        }
        // Every connected host, also ones we knew: after a restart or a lag
        // this re-sends what is outstanding, which is always safe.
        for (host, session) in now {
            self.connected.insert(host.clone(), session);
            self.host_event(Event::Connected(host)).await;
        }
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
        self.host_event(event).await;
    }

    /// Sends every outstanding command of a rollout to its connected hosts
    /// again (same ids, so agents answer rather than re-run).
    async fn resend_outstanding(&mut self, id: &str) {
        let Some(entry) = self.active.get(id) else {
            return;
        };
        let commands: Vec<_> = entry
            .rollout
            .services
            .iter()
            .flat_map(|s| s.hosts.iter())
            .filter(|(h, _)| self.connected.contains_key(*h))
            .filter_map(|(h, run)| Some((h.clone(), run.outstanding.clone()?)))
            .collect();
        for (host, command) in commands {
            self.deliver(id, host, command).await;
        }
    }

    async fn deliver(&self, id: &str, host: HostId, command: baton_common::command::Command) {
        match tokio::time::timeout(
            SEND_TIMEOUT,
            self.fleet.send_command(host.clone(), &command),
        )
        .await
        {
            Ok(Ok(())) => {}
            // It stays outstanding and is re-sent when the host returns.
            Ok(Err(e)) => {
                warn!(rollout = %id, %host, command = %command.id, error = %e, "command not delivered yet")
            }
            Err(_) => {
                warn!(rollout = %id, %host, command = %command.id, "the host's stream is full; the command waits for its reconnect")
            }
        }
    }

    async fn host_event(&mut self, event: Event) {
        let (Event::Connected(host) | Event::Disconnected(host)) = &event else {
            return;
        };
        let ids: Vec<String> = self
            .active
            .iter()
            .filter(|(_, a)| {
                a.rollout
                    .services
                    .iter()
                    .any(|s| s.hosts.contains_key(host))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.apply(&id, event.clone()).await.ok();
        }
    }

    /// One step: compute, persist, publish, act.
    async fn apply(&mut self, id: &str, event: Event) -> Result<Rollout, RolloutError> {
        self.apply_by(id, event, None).await
    }

    /// One step, with the operator who asked for it (when one did): the
    /// new state and its events are persisted together.
    async fn apply_by(
        &mut self,
        id: &str,
        event: Event,
        who: Option<&str>,
    ) -> Result<Rollout, RolloutError> {
        let entry = self
            .active
            .get_mut(id)
            .ok_or_else(|| RolloutError::NotFound(id.to_owned()))?;
        let now = SystemTime::now();
        // One rollout must never take the driver (and every other rollout)
        // down: a step that panics fails that rollout where it stands, and
        // the failure is stored, so a restart does not replay it.
        let computed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            compute(entry, &event, who, id, now)
        }));
        let (next, actions, bytes, history) = match computed {
            Ok(result) => result?,
            Err(panic) => {
                let why = panic_text(panic.as_ref());
                error!(rollout = %id, error = %why, "stepping the rollout failed unexpectedly; failing it where it stands");
                let next = machine::faulted(&entry.rollout, &why, now);
                let mut history = events::diff(&entry.rollout, &next, now);
                events::number(&mut history, entry.next_event);
                let bytes = serde_json::to_vec(&next).map_err(|e| StoreError::Corrupt {
                    key: key(id),
                    reason: e.to_string(),
                })?;
                (next, Vec::new(), bytes, history)
            }
        };
        if bytes != entry.stored || !history.is_empty() {
            let mut ops = vec![Op::Put(key(id), bytes.clone())];
            if !history.is_empty() {
                ops.push(Op::Put(
                    events::key(id, entry.next_event),
                    serde_json::to_vec(&history).map_err(|e| StoreError::Corrupt {
                        key: events::key(id, entry.next_event),
                        reason: e.to_string(),
                    })?,
                ));
            }
            let write = self.store.txn(Txn {
                compares: vec![],
                ops,
            });
            if let Err(e) = write.await {
                // Not persisted, so not acted on: the old state stands and
                // the next event retries.
                // The event is lost, so ask the agents again.
                error!(rollout = %id, error = %e, "cannot persist a rollout step; not acting on it");
                self.resend.insert(id.to_owned());
                return Err(e.into());
            }
            entry.stored = bytes;
            entry.next_event += history.len() as u64;
            count_activations(&self.metrics, &entry.rollout, &history, now);
        }
        if next.state != entry.rollout.state {
            match &next.error {
                Some(e) if next.state.is_terminal() || next.state == State::RollingBack => {
                    warn!(rollout = %id, state = next.state.as_str(), error = %e, "rollout state changed")
                }
                _ => info!(rollout = %id, state = next.state.as_str(), "rollout state changed"),
            }
        }
        if entry.rollout != next {
            entry.rollout = next.clone();
            entry.watch.send_replace(next.clone());
            self.changed.send_modify(|n| *n += 1);
        }
        if next.state.is_terminal() {
            // Dropping the sender ends every watch after its last value.
            self.active.remove(id);
            if let Some(finished) = &mut self.finished {
                finished.insert(id.to_owned(), next.clone());
            }
        }
        for Action::Send(host, command) in actions {
            self.deliver(id, host, command).await;
        }
        Ok(next)
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
                let r = match self.active.get(&id) {
                    Some(a) => Ok(a.rollout.clone()),
                    None => self.load(&id).await.map(|r| self.with_connected(r)),
                };
                let _ = reply.send(r);
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
                let _ = reply.send(self.control(id, op, &who).await);
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
        match self.store.get(&key(id)).await? {
            Some(v) => Ok(decode(&key(id), &v)?),
            None => Err(RolloutError::NotFound(id.to_owned())),
        }
    }

    async fn list(&mut self) -> Result<Vec<Rollout>, RolloutError> {
        if self.finished.is_none() {
            let mut finished = BTreeMap::new();
            for (k, v) in self.store.list("rollouts/").await? {
                let Ok(r) = decode(&k, &v) else {
                    warn!(key = %k, "not listing a stored rollout that does not decode");
                    continue;
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
            let stored = serde_json::to_vec(&r).map_err(|e| StoreError::Corrupt {
                key: key(&id),
                reason: e.to_string(),
            })?;
            let next_event = events::next_seq(self.store.as_ref(), &id).await?;
            self.active.insert(
                id.clone(),
                Active {
                    watch: watch::channel(r.clone()).0,
                    rollout: r,
                    stored,
                    next_event,
                },
            );
            let connected: Vec<HostId> = self.connected.keys().cloned().collect();
            if let Some(a) = self.active.get_mut(&id) {
                for s in &mut a.rollout.services {
                    for host in &connected {
                        if let Some(h) = s.hosts.get_mut(host) {
                            h.connected = true;
                        }
                    }
                }
            }
        }
        let result = self.apply_by(&id, Event::Operator(op), Some(who)).await;
        if result.is_err()
            && self
                .active
                .get(&id)
                .is_some_and(|a| a.rollout.state.is_terminal())
        {
            self.active.remove(&id);
        }
        info!(rollout = %id, action = op.as_str(), %who, ok = result.is_ok(), "operator action");
        result
    }

    async fn start(&mut self, mut rollout: Rollout, who: &str) -> Result<Rollout, RolloutError> {
        // Connections may have changed since the plan was resolved.
        for s in &mut rollout.services {
            for (id, h) in &mut s.hosts {
                h.connected = self.connected.contains_key(id);
            }
        }
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
        let bytes = serde_json::to_vec(&rollout).map_err(|e| StoreError::Corrupt {
            key: key(&id),
            reason: e.to_string(),
        })?;
        let mut history = events::started(&rollout, who, rollout.created_at);
        events::number(&mut history, 0);
        let created = Txn {
            compares: vec![Compare::Absent(key(&id))],
            ops: vec![
                Op::Put(key(&id), bytes.clone()),
                Op::Put(
                    events::key(&id, 0),
                    serde_json::to_vec(&history).map_err(|e| StoreError::Corrupt {
                        key: events::key(&id, 0),
                        reason: e.to_string(),
                    })?,
                ),
            ],
        };
        if !self.store.txn(created).await? {
            return Err(RolloutError::Conflict(format!(
                "rollout id {id} is taken; retry"
            )));
        }
        info!(
            rollout = %id,
            services = %rollout.services.iter().map(|s| format!("{}@{}", s.name, s.version)).collect::<Vec<_>>().join(","),
            "rollout started"
        );
        self.active.insert(
            id.clone(),
            Active {
                watch: watch::channel(rollout.clone()).0,
                rollout,
                stored: bytes,
                next_event: history.len() as u64,
            },
        );
        self.changed.send_modify(|n| *n += 1);
        self.apply(&id, Event::Tick).await
    }
}

/// What one step of a rollout yields: the next state, the commands it
/// asks for, its stored form and its events (numbered).
type Stepped = (Rollout, Vec<Action>, Vec<u8>, Vec<events::RolloutEvent>);

/// Steps a rollout and prepares what the driver persists; pure.
fn compute(
    entry: &Active,
    event: &Event,
    who: Option<&str>,
    id: &str,
    now: SystemTime,
) -> Result<Stepped, RolloutError> {
    let (next, actions) = machine::step(&entry.rollout, event, now)?;
    let bytes = serde_json::to_vec(&next).map_err(|e| StoreError::Corrupt {
        key: key(id),
        reason: e.to_string(),
    })?;
    let mut history = Vec::new();
    if let (Event::Operator(op), Some(who)) = (event, who) {
        history.push(events::operator(op.as_str(), who, now));
    }
    history.extend(events::diff(&entry.rollout, &next, now));
    events::number(&mut history, entry.next_event);
    Ok((next, actions, bytes, history))
}

/// The message of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// A service two rollouts both change, if any.
fn shared_service(a: &Rollout, b: &Rollout) -> Option<String> {
    a.services
        .iter()
        .find(|s| b.services.iter().any(|o| o.name == s.name))
        .map(|s| s.name.clone())
}

/// Counts the host activations and rollbacks a step ended, and how long
/// each activation took (`before` is the state before the step).
fn count_activations(
    metrics: &crate::metrics::Metrics,
    before: &Rollout,
    history: &[events::RolloutEvent],
    now: SystemTime,
) {
    for e in history.iter().filter(|e| e.kind == events::Kind::Host) {
        let result = match (e.from.as_str(), e.to.as_str()) {
            ("activating", "healthy") => "healthy",
            ("activating" | "rolling_back", "failed") => "failed",
            ("rolling_back", "rolled_back") => "rolled_back",
            _ => continue,
        };
        metrics.activations.inc(&[result]);
        if e.from == "activating" {
            let started = before
                .services
                .iter()
                .find(|s| s.name == e.service)
                .and_then(|s| s.hosts.get(&HostId::try_from(e.host.as_str()).ok()?))
                .and_then(|h| h.started_at);
            if let Some(took) = started.and_then(|t| now.duration_since(t).ok()) {
                metrics.activation.observe(took);
            }
        }
    }
}

#[cfg(test)]
mod tests;
