//! The fleet registry: every host the coordinator has ever seen, whether
//! its agent is connected, and the live stream to each connected agent.
//!
//! One actor task owns this state and loops over a closed [`Command`] enum;
//! gRPC handlers only hold a cloneable [`FleetHandle`] and forward commands
//! over a bounded channel, so a burst of agents back-pressures the handlers
//! instead of growing a queue without limit.
//!
//! Persistence is group-committed. A change to what a host *is* (a new
//! host, new labels, agent version or services) is durable before the
//! registry answers: the actor handles every command already queued, writes
//! all such changes in one transaction, and only then replies. Changes to
//! liveness only (last seen, peer address) are written at most once per
//! [`FLUSH_INTERVAL`] and when the registry stops. So a reconnect storm of
//! thousands of known agents costs a handful of fsyncs, not one each, and a
//! crash loses at most a second of last-seen times.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use baton_common::command::{Command as AgentCommand, CommandUpdate};
use baton_common::host::{HostId, HostInfo, HostView, Labels, ServiceStatus};
use baton_common::time::{from_unix_millis, unix_millis};
use baton_proto::agent::v1::{CoordinatorMessage, coordinator_message};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::{Op, Store, StoreError, Txn, batch};

/// How often dirty host records are written to the store.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Commands waiting for the actor; handlers wait when it is full.
const COMMAND_BUFFER: usize = 4096;

/// The most commands handled before a group commit.
const GROUP_COMMIT_MAX: usize = 1024;

/// Host changes buffered per watcher before it is resynced with a snapshot.
const WATCH_BUFFER: usize = 1024;

/// Command updates buffered towards the rollout driver: room for one
/// acknowledgement from each of 16k agents in a burst; beyond it, agents'
/// streams wait (nothing is dropped).
const UPDATE_BUFFER: usize = 16 * 1024;

/// Where agents' command updates go: the rollout driver's channel, once it
/// subscribed.
type UpdateSink = Arc<std::sync::Mutex<Vec<mpsc::Sender<(HostId, CommandUpdate)>>>>;

const HOST_PREFIX: &str = "hosts/";

/// One item of an agent's outbound stream: a message, or the status that
/// ends the stream. Both are boxed because every stream's channel
/// allocates a block of 32 slots up front: unboxed (about 150 bytes a
/// slot) that is 5 KiB per connected agent, boxed it is half a KiB.
pub type Outbound = Result<Box<CoordinatorMessage>, Box<tonic::Status>>;

/// The sending half of an agent's outbound stream.
pub type AgentSender = mpsc::Sender<Outbound>;

/// One accepted agent stream, as the registry hands it back to its handler.
#[derive(Debug, Clone)]
pub struct Session {
    /// Distinguishes this stream from earlier and later ones of the host.
    pub id: u64,
    /// Cancelled when a newer stream of the same host replaces this one.
    pub replaced: CancellationToken,
    /// The live stream this one replaced, if it did.
    pub took_over: Option<Takeover>,
}

/// A newer stream of a host replaces its live one at most this many times
/// within [`TAKEOVER_WINDOW`]; more are refused. A lost stream the
/// coordinator has not noticed yet is replaced once; two agents sharing one
/// certificate would take it from each other without end.
pub const MAX_TAKEOVERS: usize = 3;
/// See [`MAX_TAKEOVERS`].
pub const TAKEOVER_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

/// Why a stream was not registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The registry has stopped.
    #[error("the coordinator is shutting down")]
    Stopped,
    /// The host's live stream was taken over too often lately.
    #[error("{0}")]
    Conflict(String),
}

/// What a registered stream replaced, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    /// Where the replaced stream came from.
    pub from: String,
    /// Takeovers of this host within [`TAKEOVER_WINDOW`], this one included.
    pub recent: usize,
}

/// The registry's record of a host, as persisted.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct HostRecord {
    host_id: HostId,
    labels: Labels,
    services: Vec<ServiceStatus>,
    agent_version: String,
    first_seen_ms: u64,
    last_seen_ms: u64,
    peer_address: String,
}

struct Live {
    session: u64,
    replaced: CancellationToken,
    /// Held for sending commands to the agent; dropped on disconnect,
    /// which (with the handler's clone) ends the outbound stream.
    sender: AgentSender,
}

struct Entry {
    record: HostRecord,
    live: Option<Live>,
    /// When newer streams replaced a live one, within the window.
    takeovers: std::collections::VecDeque<std::time::Instant>,
}

impl Entry {
    fn view(&self) -> HostView {
        HostView {
            host_id: self.record.host_id.clone(),
            connected: self.live.is_some(),
            labels: self.record.labels.clone(),
            services: self.record.services.clone(),
            agent_version: self.record.agent_version.clone(),
            first_seen: from_unix_millis(self.record.first_seen_ms),
            last_seen: from_unix_millis(self.record.last_seen_ms),
            peer_address: self.record.peer_address.clone(),
            session: self.live.as_ref().map_or(0, |l| l.session),
        }
    }
}

/// What the actor can be asked to do.
enum Command {
    Connect {
        info: HostInfo,
        peer_address: String,
        sender: AgentSender,
        reply: oneshot::Sender<Result<Session, ConnectError>>,
    },
    Seen {
        host: HostId,
        session: u64,
    },
    Inventory {
        host: HostId,
        session: u64,
        services: Vec<ServiceStatus>,
    },
    Disconnect {
        host: HostId,
        session: u64,
        reason: String,
    },
    List {
        reply: oneshot::Sender<Vec<HostView>>,
    },
    Get {
        host: HostId,
        reply: oneshot::Sender<Option<HostView>>,
    },
    Watch {
        reply: oneshot::Sender<(Vec<HostView>, broadcast::Receiver<HostView>)>,
    },
    Sender {
        host: HostId,
        reply: oneshot::Sender<Option<AgentSender>>,
    },
    Senders {
        labels: Labels,
        reply: oneshot::Sender<Vec<(HostId, Option<AgentSender>)>>,
    },
    /// The live streams of these hosts, in their order.
    SendersOf {
        hosts: Vec<HostId>,
        reply: oneshot::Sender<Vec<Option<AgentSender>>>,
    },
}

/// A command could not be handed to an agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The host has no live stream.
    #[error("host {0} is not connected")]
    NotConnected(HostId),
    /// The registry stopped.
    #[error("the fleet registry has stopped")]
    Stopped,
    /// The host's stream stayed full: it stopped reading.
    #[error("the stream of host {0} is full")]
    Full(HostId),
}

/// The registry stopped (the coordinator is shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the fleet registry has stopped")]
pub struct FleetStopped;

/// A cheap, cloneable handle to the registry actor.
#[derive(Clone)]
pub struct FleetHandle {
    tx: mpsc::Sender<Command>,
    updates: UpdateSink,
    pings: Pings,
    logs: crate::logs::Registry,
    samples: crate::samples::Registry,
}

/// Pings in flight by their nonce, each with where its answers go.
type Pings = Arc<std::sync::Mutex<HashMap<u64, mpsc::UnboundedSender<(HostId, CommandUpdate)>>>>;

/// The prefix of a ping's command ids: `ping-<nonce, 16 hex digits>-<n>`.
pub const PING_PREFIX: &str = "ping-";

/// The answers to one ping in flight; it stops receiving them when
/// dropped.
pub struct PingAnswers {
    nonce: u64,
    answers: mpsc::UnboundedReceiver<(HostId, CommandUpdate)>,
    pings: Pings,
}

impl PingAnswers {
    /// The id of this ping's command to the `n`th host.
    pub fn command_id(&self, n: usize) -> String {
        format!("{PING_PREFIX}{:016x}-{n}", self.nonce)
    }

    /// The next final answer, with the host that sent it.
    pub async fn recv(&mut self) -> Option<(HostId, CommandUpdate)> {
        self.answers.recv().await
    }
}

impl Drop for PingAnswers {
    fn drop(&mut self) {
        lock(&self.pings).remove(&self.nonce);
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The nonce of a ping's command id.
fn ping_nonce(command_id: &str) -> Option<u64> {
    let rest = command_id.strip_prefix(PING_PREFIX)?;
    u64::from_str_radix(rest.get(..16)?, 16).ok()
}

impl FleetHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, FleetStopped> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| FleetStopped)?;
        rx.await.map_err(|_| FleetStopped)
    }

    async fn tell(&self, cmd: Command) {
        // A stopped registry means the coordinator is shutting down; the
        // caller has nothing useful to do with that.
        let _ = self.tx.send(cmd).await;
    }

    /// Registers a newly accepted agent stream, replacing any older one of
    /// the same host.
    pub async fn connect(
        &self,
        info: HostInfo,
        peer_address: String,
        sender: AgentSender,
    ) -> Result<Session, ConnectError> {
        self.ask(|reply| Command::Connect {
            info,
            peer_address,
            sender,
            reply,
        })
        .await
        .map_err(|_| ConnectError::Stopped)?
    }

    /// Records that a host's stream delivered a message.
    pub async fn seen(&self, host: HostId, session: u64) {
        self.tell(Command::Seen { host, session }).await;
    }

    /// Records a host's new service inventory.
    pub async fn inventory(&self, host: HostId, session: u64, services: Vec<ServiceStatus>) {
        self.tell(Command::Inventory {
            host,
            session,
            services,
        })
        .await;
    }

    /// Records that a host's stream ended; ignored if a newer stream of the
    /// host has replaced it meanwhile.
    pub async fn disconnect(&self, host: HostId, session: u64, reason: String) {
        self.tell(Command::Disconnect {
            host,
            session,
            reason,
        })
        .await;
    }

    /// Every registered host, sorted by host id.
    pub async fn list(&self) -> Result<Vec<HostView>, FleetStopped> {
        self.ask(|reply| Command::List { reply }).await
    }

    /// One host.
    pub async fn get(&self, host: HostId) -> Result<Option<HostView>, FleetStopped> {
        self.ask(|reply| Command::Get { host, reply }).await
    }

    /// The open `baton logs` requests, whose chunks the agents' streams
    /// deliver.
    pub fn logs(&self) -> &crate::logs::Registry {
        &self.logs
    }

    /// Analysis samples awaited from agents.
    pub fn samples(&self) -> &crate::samples::Registry {
        &self.samples
    }

    /// The outbound queue of `host`'s stream.
    pub async fn agent_sender(&self, host: &HostId) -> Result<AgentSender, SendError> {
        self.ask(|reply| Command::Sender {
            host: host.clone(),
            reply,
        })
        .await
        .map_err(|_| SendError::Stopped)?
        .ok_or_else(|| SendError::NotConnected(host.clone()))
    }

    /// Queues `command` on the host's live stream, waiting while that
    /// stream's bounded buffer is full (back-pressure from a slow agent).
    pub async fn send_command(
        &self,
        host: HostId,
        command: &AgentCommand,
    ) -> Result<(), SendError> {
        let sender = self
            .ask(|reply| Command::Sender {
                host: host.clone(),
                reply,
            })
            .await
            .map_err(|_| SendError::Stopped)?
            .ok_or_else(|| SendError::NotConnected(host.clone()))?;
        let msg = CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Command(command.into())),
        };
        // A closed channel means the stream ended after we looked it up.
        sender
            .send(Ok(Box::new(msg)))
            .await
            .map_err(|_| SendError::NotConnected(host))
    }

    /// Sends many commands: one question to the registry for the streams,
    /// then each command straight to its host's stream (waiting at most
    /// `wait` for room in one). Returns the hosts it could not reach now.
    pub async fn send_commands(
        &self,
        commands: Vec<(HostId, AgentCommand)>,
        wait: std::time::Duration,
    ) -> Result<Vec<(HostId, String, SendError)>, FleetStopped> {
        let hosts: Vec<HostId> = commands.iter().map(|(h, _)| h.clone()).collect();
        let senders = self
            .ask(|reply| Command::SendersOf { hosts, reply })
            .await?;
        let mut missed = Vec::new();
        for ((host, command), sender) in commands.into_iter().zip(senders) {
            let Some(sender) = sender else {
                missed.push((host.clone(), command.id, SendError::NotConnected(host)));
                continue;
            };
            let msg = Ok(Box::new(CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Command((&command).into())),
            }));
            let sent = match sender.try_send(msg) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(msg)) => {
                    match tokio::time::timeout(wait, sender.send(msg)).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(_)) => Err(SendError::NotConnected(host.clone())),
                        Err(_) => Err(SendError::Full(host.clone())),
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    Err(SendError::NotConnected(host.clone()))
                }
            };
            if let Err(e) = sent {
                missed.push((host, command.id, e));
            }
        }
        Ok(missed)
    }

    /// Every host whose labels include all of `labels` (all hosts when it
    /// is empty), sorted, with the sender of its live stream if it has one:
    /// one question to the registry however large the fleet.
    pub async fn senders(
        &self,
        labels: Labels,
    ) -> Result<Vec<(HostId, Option<AgentSender>)>, FleetStopped> {
        self.ask(|reply| Command::Senders { labels, reply }).await
    }

    /// Every command update from every agent (but pings'), from now on,
    /// for each subscriber (the rollout driver; a test may listen beside
    /// it). Nothing is dropped: while the subscriber is
    /// 16k updates behind, agents' streams wait for it. (A broadcast that
    /// dropped updates made the subscriber re-send every outstanding
    /// command to recover, whose answers made it fall behind again: a
    /// storm that never ended at 10,000 hosts.)
    pub fn command_updates(&self) -> mpsc::Receiver<(HostId, CommandUpdate)> {
        let (tx, rx) = mpsc::channel(UPDATE_BUFFER);
        let mut sinks = lock(&self.updates);
        sinks.retain(|s| !s.is_closed());
        sinks.push(tx);
        rx
    }

    /// Registers a ping: its commands' answers go to it alone, never
    /// through the command-update broadcast, so that pinging 10,000 hosts
    /// can neither lose answers to a lagging broadcast nor push a
    /// rollout's subscriber into lagging.
    pub fn ping_answers(&self) -> PingAnswers {
        let (tx, answers) = mpsc::unbounded_channel();
        let mut pings = lock(&self.pings);
        let nonce = loop {
            let n = fastrand::u64(..);
            if !pings.contains_key(&n) {
                break n;
            }
        };
        pings.insert(nonce, tx);
        drop(pings);
        PingAnswers {
            nonce,
            answers,
            pings: self.pings.clone(),
        }
    }

    /// Publishes an agent's command update to the subscribers (a ping's
    /// final answer to its ping only; a ping's other updates to nobody).
    pub async fn publish_update(&self, host: HostId, update: CommandUpdate) {
        if let Some(nonce) = ping_nonce(&update.command_id) {
            if matches!(update.phase, baton_common::command::Phase::Done(_))
                && let Some(to) = lock(&self.pings).get(&nonce)
            {
                let _ = to.send((host, update));
            }
            return;
        }
        // No subscriber (or one that stopped) is not an error.
        let sinks = lock(&self.updates).clone();
        if let [sink] = sinks.as_slice() {
            let _ = sink.send((host, update)).await;
        } else {
            for sink in &sinks {
                let _ = sink.send((host.clone(), update.clone())).await;
            }
        }
    }

    /// A snapshot of the fleet plus every change after it.
    pub async fn watch(
        &self,
    ) -> Result<(Vec<HostView>, broadcast::Receiver<HostView>), FleetStopped> {
        self.ask(|reply| Command::Watch { reply }).await
    }
}

struct Actor {
    store: Arc<dyn Store>,
    hosts: HashMap<HostId, Entry>,
    dirty: HashSet<HostId>,
    /// Whether `dirty` holds a change that must be durable before the
    /// replies in `deferred` are sent.
    urgent: bool,
    /// After a failed write, none is tried again before this: a store that
    /// refuses must not be asked again on every message of 10,000 agents.
    retry_at: Option<tokio::time::Instant>,
    /// Failed writes in a row (for the backoff).
    failures: u32,
    /// Replies held back until the next group commit, so nobody is told
    /// about a change that a crash could still undo.
    deferred: Vec<Box<dyn FnOnce() + Send>>,
    changes: broadcast::Sender<HostView>,
    next_session: u64,
    metrics: Arc<crate::metrics::Metrics>,
}

/// Loads the registry from the store and starts its actor. The actor ends
/// when every [`FleetHandle`] is dropped, after a final flush; await the
/// returned task to know the registry is persisted.
pub async fn spawn(
    store: Arc<dyn Store>,
) -> Result<(FleetHandle, tokio::task::JoinHandle<()>), StoreError> {
    spawn_with(store, Arc::default()).await
}

/// [`spawn`], counting connects, reconnects and health-check failures in
/// `metrics`.
pub async fn spawn_with(
    store: Arc<dyn Store>,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<(FleetHandle, tokio::task::JoinHandle<()>), StoreError> {
    let mut hosts = HashMap::new();
    for (key, value) in store.list(HOST_PREFIX).await? {
        let record: HostRecord =
            serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
        hosts.insert(
            record.host_id.clone(),
            Entry {
                record,
                live: None,
                takeovers: std::collections::VecDeque::new(),
            },
        );
    }
    info!(hosts = hosts.len(), "fleet registry loaded");
    let (tx, rx) = mpsc::channel(COMMAND_BUFFER);
    let actor = Actor {
        store,
        hosts,
        dirty: HashSet::new(),
        urgent: false,
        retry_at: None,
        failures: 0,
        deferred: Vec::new(),
        changes: broadcast::channel(WATCH_BUFFER).0,
        next_session: 1,
        metrics,
    };
    let task = tokio::spawn(actor.run(rx));
    Ok((
        FleetHandle {
            tx,
            updates: UpdateSink::default(),
            pings: Pings::default(),
            logs: crate::logs::Registry::default(),
            samples: crate::samples::Registry::default(),
        },
        task,
    ))
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut flush = tokio::time::interval(FLUSH_INTERVAL);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => {
                        self.handle(cmd);
                        // Take what else is queued into the same commit.
                        for _ in 1..GROUP_COMMIT_MAX {
                            match rx.try_recv() {
                                Ok(cmd) => self.handle(cmd),
                                Err(_) => break,
                            }
                        }
                        if self.urgent {
                            self.flush().await;
                        }
                        self.reply_deferred();
                    }
                    None => break,
                },
                _ = flush.tick(), if !self.dirty.is_empty() => self.flush().await,
            }
        }
        self.flush().await;
        self.reply_deferred();
        debug!("fleet registry stopped");
    }

    fn reply_deferred(&mut self) {
        for reply in self.deferred.drain(..) {
            reply();
        }
    }

    fn handle(&mut self, cmd: Command) {
        let now = SystemTime::now();
        match cmd {
            Command::Connect {
                info,
                peer_address,
                sender,
                reply,
            } => {
                let id = info.host_id.clone();
                let now_ms = unix_millis(now);
                let took_over = match self.hosts.get_mut(&id) {
                    Some(entry) if entry.live.is_some() => {
                        let instant = std::time::Instant::now();
                        while entry
                            .takeovers
                            .front()
                            .is_some_and(|t| instant.duration_since(*t) >= TAKEOVER_WINDOW)
                        {
                            entry.takeovers.pop_front();
                        }
                        if entry.takeovers.len() >= MAX_TAKEOVERS {
                            self.metrics.takeovers_refused.inc();
                            let why = format!(
                                "host {id} already has a live stream, from {}, and newer streams took it over {} times in the last {}: are two agents using one certificate? Refusing this one, from {peer_address}",
                                entry.record.peer_address,
                                entry.takeovers.len(),
                                humantime::format_duration(TAKEOVER_WINDOW)
                            );
                            warn!(host = %id, peer = %peer_address, "{why}");
                            self.reply(reply, Err(ConnectError::Conflict(why)));
                            return;
                        }
                        entry.takeovers.push_back(instant);
                        Some(Takeover {
                            from: entry.record.peer_address.clone(),
                            recent: entry.takeovers.len(),
                        })
                    }
                    _ => None,
                };
                let session = self.next_session;
                self.next_session += 1;
                let replaced = CancellationToken::new();
                let live = Live {
                    session,
                    replaced: replaced.clone(),
                    sender,
                };
                let entry = self.hosts.entry(id.clone()).or_insert_with(|| Entry {
                    record: HostRecord {
                        host_id: id.clone(),
                        labels: Labels::new(),
                        services: vec![],
                        agent_version: String::new(),
                        first_seen_ms: now_ms,
                        last_seen_ms: now_ms,
                        peer_address: String::new(),
                    },
                    live: None,
                    takeovers: std::collections::VecDeque::new(),
                });
                if let Some(old) = entry.live.replace(live) {
                    if let Some(t) = &took_over {
                        warn!(host = %id, old_session = old.session, from = %t.from, to = %peer_address, recent = t.recent, "a new stream takes the host's live stream over");
                    }
                    self.metrics.takeovers.inc();
                    old.replaced.cancel();
                }
                let r = &mut entry.record;
                let is_new = r.agent_version.is_empty();
                self.metrics.connects.inc();
                if !is_new {
                    self.metrics.reconnects.inc();
                }
                let identity_changed = is_new
                    || r.labels != info.labels
                    || r.services != info.services
                    || r.agent_version != info.agent_version;
                r.labels = info.labels;
                r.services = info.services;
                r.agent_version = info.agent_version;
                r.last_seen_ms = now_ms;
                r.peer_address = peer_address;
                info!(host = %id, session, peer = %r.peer_address, version = %r.agent_version, new = is_new, "agent connected");
                self.urgent |= identity_changed;
                self.changed(&id);
                // The handler may have given up meanwhile; its stream then
                // ends and a disconnect for this session follows.
                self.reply(
                    reply,
                    Ok(Session {
                        id: session,
                        replaced,
                        took_over,
                    }),
                );
            }
            Command::Seen { host, session } => {
                if let Some(entry) = self.current(&host, session) {
                    entry.record.last_seen_ms = unix_millis(now);
                }
            }
            Command::Inventory {
                host,
                session,
                services,
            } => {
                let metrics = self.metrics.clone();
                if let Some(entry) = self.current(&host, session) {
                    entry.record.last_seen_ms = unix_millis(now);
                    if entry.record.services != services {
                        let turned_unhealthy = services
                            .iter()
                            .filter(|new| {
                                !new.healthy
                                    && entry.record.services.iter().any(|old| {
                                        old.name == new.name
                                            && old.version == new.version
                                            && old.healthy
                                    })
                            })
                            .count();
                        for _ in 0..turned_unhealthy {
                            metrics.health_check_failures.inc();
                        }
                        entry.record.services = services;
                        self.urgent = true;
                        self.changed(&host);
                    }
                }
            }
            Command::Disconnect {
                host,
                session,
                reason,
            } => {
                if let Some(entry) = self.current(&host, session) {
                    entry.live = None;
                    entry.record.last_seen_ms = unix_millis(now);
                    warn!(host = %host, session, %reason, "agent disconnected");
                    self.changed(&host);
                }
            }
            Command::List { reply } => self.reply(reply, self.snapshot()),
            Command::Get { host, reply } => {
                let view = self.hosts.get(&host).map(Entry::view);
                self.reply(reply, view);
            }
            Command::Watch { reply } => {
                self.reply(reply, (self.snapshot(), self.changes.subscribe()))
            }
            Command::Senders { labels, reply } => {
                let mut hosts: Vec<_> = self
                    .hosts
                    .iter()
                    .filter(|(_, e)| {
                        labels
                            .iter()
                            .all(|(k, v)| e.record.labels.get(k) == Some(v))
                    })
                    .map(|(id, e)| (id.clone(), e.live.as_ref().map(|l| l.sender.clone())))
                    .collect();
                hosts.sort_by(|a, b| a.0.cmp(&b.0));
                let _ = reply.send(hosts);
            }
            Command::SendersOf { hosts, reply } => {
                let senders = hosts
                    .iter()
                    .map(|h| {
                        self.hosts
                            .get(h)
                            .and_then(|e| e.live.as_ref().map(|l| l.sender.clone()))
                    })
                    .collect();
                let _ = reply.send(senders);
            }
            Command::Sender { host, reply } => {
                let sender = self
                    .hosts
                    .get(&host)
                    .and_then(|e| e.live.as_ref())
                    .map(|l| l.sender.clone());
                // Not deferred: sending a command needs no commit first.
                let _ = reply.send(sender);
            }
        }
    }

    /// Answers after the group commit; a caller that went away is ignored.
    fn reply<T: Send + 'static>(&mut self, reply: oneshot::Sender<T>, value: T) {
        self.deferred.push(Box::new(move || {
            let _ = reply.send(value);
        }));
    }

    /// The host's entry, only while `session` is its live stream.
    fn current(&mut self, host: &HostId, session: u64) -> Option<&mut Entry> {
        self.hosts
            .get_mut(host)
            .filter(|e| e.live.as_ref().is_some_and(|l| l.session == session))
    }

    fn snapshot(&self) -> Vec<HostView> {
        let mut all: Vec<HostView> = self.hosts.values().map(Entry::view).collect();
        all.sort_by(|a, b| a.host_id.cmp(&b.host_id));
        all
    }

    fn changed(&mut self, host: &HostId) {
        self.dirty.insert(host.clone());
        if let Some(entry) = self.hosts.get(host) {
            // No watcher is not an error.
            let _ = self.changes.send(entry.view());
        }
    }

    async fn flush(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        if self
            .retry_at
            .is_some_and(|at| tokio::time::Instant::now() < at)
        {
            return;
        }
        let mut ops = Vec::with_capacity(self.dirty.len());
        for id in &self.dirty {
            if let Some(entry) = self.hosts.get(id) {
                match serde_json::to_vec(&entry.record) {
                    Ok(v) => ops.push(Op::Put(format!("{HOST_PREFIX}{id}"), v)),
                    Err(e) => warn!(host = %id, error = %e, "cannot encode host record"),
                }
            }
        }
        // Within the store's limits per transaction, whatever the fleet
        // size: each record stands alone, so the groups need not be one
        // transaction.
        let result = match batch::groups(ops) {
            Ok(groups) => {
                let mut result = Ok(());
                for group in groups {
                    let written: Vec<HostId> = group
                        .iter()
                        .filter_map(|op| match op {
                            Op::Put(k, _) => k.strip_prefix(HOST_PREFIX),
                            Op::Delete(_) => None,
                        })
                        .filter_map(|id| HostId::try_from(id).ok())
                        .collect();
                    let txn = Txn {
                        compares: vec![],
                        ops: group,
                    };
                    if let Err(e) = self.store.txn(txn).await {
                        result = Err(e);
                        break;
                    }
                    for id in written {
                        self.dirty.remove(&id);
                    }
                }
                result
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                self.dirty.clear();
                self.urgent = false;
                if self.failures > 0 {
                    info!(
                        after = self.failures,
                        "the fleet registry is persisted again"
                    );
                }
                self.failures = 0;
                self.retry_at = None;
            }
            // Kept dirty: tried again after a backoff (1 s, doubling to
            // 16 s). Deferred replies still go out: refusing agents
            // because the disk is full would turn a storage problem into a
            // fleet outage.
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                self.urgent = false;
                let wait = Duration::from_secs(1 << self.failures.min(5).saturating_sub(1));
                self.retry_at = Some(tokio::time::Instant::now() + wait);
                warn!(error = %e, hosts = self.dirty.len(), failures = self.failures, retry_in = ?wait, "cannot persist the fleet registry; will retry")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    fn info(id: &str) -> HostInfo {
        HostInfo {
            host_id: HostId::try_from(id).unwrap(),
            agent_version: "0.1.0".into(),
            labels: [("role".to_string(), "api".to_string())].into(),
            services: vec![],
        }
    }

    #[tokio::test]
    async fn registry_tracks_sessions_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let (fleet, task) = spawn(store.clone()).await.unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let h1 = HostId::try_from("h1").unwrap();

        let first = fleet
            .connect(info("h1"), "127.0.0.1:1".into(), tx.clone())
            .await
            .unwrap();
        let second = fleet
            .connect(info("h1"), "127.0.0.1:2".into(), tx.clone())
            .await
            .unwrap();
        assert!(
            first.replaced.is_cancelled(),
            "the older stream must be told it was replaced"
        );
        assert!(!second.replaced.is_cancelled());

        // The replaced stream's disconnect must not mark the host disconnected.
        fleet.disconnect(h1.clone(), first.id, "test".into()).await;
        let view = fleet.get(h1.clone()).await.unwrap().unwrap();
        assert!(view.connected);
        assert_eq!(view.peer_address, "127.0.0.1:2");

        fleet.disconnect(h1.clone(), second.id, "test".into()).await;
        assert!(!fleet.get(h1.clone()).await.unwrap().unwrap().connected);

        drop(fleet);
        task.await.unwrap();
        let (fleet, _task) = spawn(store).await.unwrap();
        let hosts = fleet.list().await.unwrap();
        assert_eq!(hosts.len(), 1);
        assert!(!hosts[0].connected);
        assert_eq!(hosts[0].labels.get("role").map(String::as_str), Some("api"));
    }

    #[tokio::test]
    async fn a_thousand_hosts_reach_a_store_that_takes_128_operations_a_transaction() {
        use crate::store::testing::Limited;
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let limited = Arc::new(Limited::new(
            RedbStore::open(&dir.path().join("s.redb")).unwrap(),
            usize::MAX,
        ));
        let store: Arc<dyn Store> = limited.clone();
        let (fleet, task) = spawn(store.clone()).await.unwrap();
        let (tx, _rx) = mpsc::channel(1);
        // Connected at once, so they share group commits.
        let joins: Vec<_> = (0..1000)
            .map(|i| {
                let (fleet, tx) = (fleet.clone(), tx.clone());
                tokio::spawn(async move {
                    fleet
                        .connect(info(&format!("h{i}")), "127.0.0.1:1".into(), tx)
                        .await
                        .unwrap()
                })
            })
            .collect();
        for j in joins {
            j.await.unwrap();
        }
        drop(fleet);
        task.await.unwrap();
        assert!(limited.largest.load(Ordering::SeqCst) <= batch::MAX_TXN_OPS);
        let (fleet, _task) = spawn(store).await.unwrap();
        assert_eq!(fleet.list().await.unwrap().len(), 1000);
    }

    #[tokio::test]
    async fn a_store_that_refuses_is_not_asked_again_on_every_message() {
        use crate::store::testing::Limited;
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let limited = Arc::new(Limited::new(
            RedbStore::open(&dir.path().join("s.redb")).unwrap(),
            0,
        ));
        let (fleet, _task) = spawn(limited.clone()).await.unwrap();
        let (tx, _rx) = mpsc::channel(1);
        // 300 hosts connect one after another, each asking for a durable
        // write; the store refuses every one.
        for i in 0..300 {
            fleet
                .connect(info(&format!("h{i}")), "127.0.0.1:1".into(), tx.clone())
                .await
                .unwrap();
        }
        let tried = limited.tried.load(Ordering::SeqCst);
        assert!(tried <= 3, "{tried} writes tried for 300 connections");
        // Once it takes writes again, everything reaches it.
        limited.allow(usize::MAX);
        // (After its backoff: a few seconds.)
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let stored = limited.list(HOST_PREFIX).await.unwrap().len();
            if stored == 300 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{stored} of 300 stored"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn no_command_update_is_dropped_while_its_subscriber_is_behind() {
        use baton_common::command::{CommandUpdate, Outcome};
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let (fleet, _task) = spawn(store).await.unwrap();
        let mut updates = fleet.command_updates();
        // Far more than the buffer, published before anything is read:
        // the publisher waits instead of dropping.
        let n = UPDATE_BUFFER * 3;
        let publisher = tokio::spawn(async move {
            let h1 = HostId::try_from("h1").unwrap();
            for i in 0..n {
                fleet
                    .publish_update(
                        h1.clone(),
                        CommandUpdate::done(&format!("r-1/{i}"), Outcome::Succeeded, ""),
                    )
                    .await;
            }
        });
        for i in 0..n {
            let (_, u) = updates.recv().await.unwrap();
            assert_eq!(u.command_id, format!("r-1/{i}"));
        }
        publisher.await.unwrap();
    }
}
