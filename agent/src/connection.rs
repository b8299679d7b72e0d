//! The agent's one stream to the coordinator: connect, hello, heartbeats,
//! and reconnecting with capped, jittered exponential backoff for as long
//! as the agent runs.
//!
//! The link is a two-state machine (`Connected` while a session runs,
//! `Disconnected` with the backoff while waiting); a session ends when the
//! stream closes, breaks, or stays silent for the coordinator's
//! `silence_timeout` (also right after the agent was frozen and thawed).

use std::sync::Arc;
use std::time::Duration;

use baton_common::backoff::Backoff;
use baton_common::error_chain as chain;
use baton_common::host::{HostInfo, ServiceStatus};
use baton_common::time::from_duration;
use baton_proto::agent::v1::{
    AgentMessage, CoordinatorMessage, Heartbeat, InventoryUpdate, agent_message,
    agent_service_client::AgentServiceClient, coordinator_message,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, error, info, warn};

use crate::config::AgentConfig;
use crate::executor::Executor;

/// How long one connection attempt (TCP, TLS, stream open) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the coordinator's welcome.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages buffered towards the coordinator.
const OUTBOUND_BUFFER: usize = 16;
/// Log chunks waiting for the stream (`baton logs`).
const LOG_BUFFER: usize = 16;

/// Why a session ended.
#[derive(Debug)]
enum Ended {
    /// The agent is shutting down.
    Shutdown,
    /// The stream was lost after it worked; reconnect promptly.
    Lost(String),
}

/// Why a session could not be established.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("the coordinator refused the stream: {0}")]
    Refused(tonic::Status),
    #[error("{0}")]
    Protocol(String),
}

/// The connection loop of one agent.
pub struct Link {
    config: AgentConfig,
    /// One per coordinator URL: the configured ones, then leaders that
    /// followers pointed to.
    endpoints: Vec<(String, Endpoint)>,
    /// The one the next session tries.
    next: usize,
    /// The version the hello reports.
    version: String,
    /// Whether a session (welcomed) runs.
    connected: tokio::sync::watch::Sender<bool>,
    /// The certificate in use, and the download channel.
    creds: Credentials,
    /// The credentials' generation `endpoints` were built with.
    built_for: u64,
}

/// The agent's TLS identity, replaced when its certificate is renewed, and
/// the download channel to the coordinator of the current session, which
/// follows both.
#[derive(Clone)]
pub struct Credentials {
    tls: Arc<std::sync::RwLock<(u64, baton_common::tls::ClientTls)>>,
    fetch: Arc<tokio::sync::watch::Sender<Channel>>,
    url: Arc<std::sync::Mutex<String>>,
}

impl Credentials {
    /// The identity in use.
    pub fn current(&self) -> baton_common::tls::ClientTls {
        self.tls
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            .clone()
    }

    /// The download channel of the current session (mutual TLS to the
    /// coordinator the agent is connected to).
    pub fn channel(&self) -> Channel {
        self.fetch.borrow().clone()
    }

    fn generation(&self) -> u64 {
        self.tls
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
    }

    /// Uses `tls` from now on: new connections present it, and downloads
    /// get a channel that does.
    pub fn replace(&self, tls: baton_common::tls::ClientTls) {
        let url = self
            .url
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Ok(e) = endpoint(&url, &tls) {
            self.fetch.send_replace(e.connect_lazy());
        }
        let mut slot = self
            .tls
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = (slot.0 + 1, tls);
    }
}

/// The header in which a following coordinator names the leader.
const LEADER_HEADER: &str = "baton-leader";

/// How the agent reaches a coordinator, for its stream and its downloads.
///
/// Downloads set the HTTP/2 sizes: a payload comes as 1 MiB chunks, so the
/// coordinator may send frames of up to 1 MiB (rather than 16 KiB, a
/// frame header and a wake-up per 16 KiB) and have 16 MiB in flight
/// before it waits for the agent to catch up; the windows only bound what
/// the coordinator may send, nothing is allocated ahead.
pub fn endpoint(url: &str, tls: &baton_common::tls::ClientTls) -> Result<Endpoint, String> {
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("coordinator URL {url:?} is invalid: {}", chain(&e)))?
        .tls_config(tls.to_tonic())
        .map_err(|e| format!("cannot set up TLS: {}", chain(&e)))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .max_frame_size(DOWNLOAD_FRAME)
        .initial_stream_window_size(DOWNLOAD_WINDOW)
        .initial_connection_window_size(DOWNLOAD_WINDOW))
}

/// The largest HTTP/2 frame the coordinator may send the agent.
const DOWNLOAD_FRAME: u32 = 1 << 20;
/// How much the coordinator may send ahead of the agent's reading.
const DOWNLOAD_WINDOW: u32 = 16 << 20;

/// The leader a following coordinator named in its refusal.
fn leader_of(status: &tonic::Status) -> Option<String> {
    (status.code() == tonic::Code::Unavailable)
        .then(|| {
            status
                .metadata()
                .get(LEADER_HEADER)?
                .to_str()
                .ok()
                .map(str::to_owned)
        })
        .flatten()
}

impl Link {
    /// Prepares the endpoints; fails on a malformed coordinator URL.
    pub fn new(config: AgentConfig, version: String) -> Result<Self, String> {
        let endpoints = config
            .coordinators
            .iter()
            .map(|url| Ok((url.clone(), endpoint(url, &config.tls)?)))
            .collect::<Result<Vec<_>, String>>()?;
        let (fetch_url, first) = endpoints.first().cloned().ok_or("no coordinator URL")?;
        let creds = Credentials {
            tls: Arc::new(std::sync::RwLock::new((0, config.tls.clone()))),
            fetch: Arc::new(tokio::sync::watch::channel(first.connect_lazy()).0),
            url: Arc::new(std::sync::Mutex::new(fetch_url)),
        };
        Ok(Self {
            config,
            endpoints,
            next: 0,
            version,
            connected: tokio::sync::watch::channel(false).0,
            creds,
            built_for: 0,
        })
    }

    /// A lazily connected channel for other services (artifact downloads)
    /// to the coordinator of the current session; it reconnects by itself.
    pub fn channel(&self) -> tokio::sync::watch::Receiver<Channel> {
        self.creds.fetch.subscribe()
    }

    /// The identity the link presents, for renewing it.
    pub fn credentials(&self) -> Credentials {
        self.creds.clone()
    }

    /// Makes `url` the next coordinator to try.
    fn point_at(&mut self, url: &str) {
        if !url.starts_with("https://") {
            warn!(%url, "a coordinator named a leader that is not an https:// URL; ignoring it");
            return;
        }
        match self.endpoints.iter().position(|(u, _)| u == url) {
            Some(i) => self.next = i,
            None => match endpoint(url, &self.creds.current()) {
                Ok(e) => {
                    self.endpoints.push((url.to_owned(), e));
                    self.next = self.endpoints.len() - 1;
                }
                Err(e) => {
                    warn!(%url, error = %e, "a coordinator named a leader this agent cannot use")
                }
            },
        }
    }

    /// Whether the agent has a welcomed stream to the coordinator, now and
    /// as it changes.
    pub fn connected(&self) -> tokio::sync::watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Runs until `shutdown` is cancelled, reconnecting whenever the stream
    /// is lost. Never gives up.
    pub async fn run(mut self, shutdown: CancellationToken, executor: Executor) {
        let mut backoff = Backoff::new(self.config.reconnect_initial, self.config.reconnect_max);
        loop {
            let ended = self.session(&shutdown, &mut backoff, &executor).await;
            self.connected.send_replace(false);
            match ended {
                Ok(Ended::Shutdown) => return,
                Ok(Ended::Lost(reason)) => warn!(%reason, "lost the coordinator; reconnecting"),
                Err(SessionError::Refused(status)) if leader_of(&status).is_some() => {
                    let leader = leader_of(&status).unwrap_or_default();
                    info!(%leader, "that coordinator follows; going to the leader");
                    self.point_at(&leader);
                }
                Err(SessionError::Connect(e)) if self.endpoints.len() > 1 => {
                    let (url, _) = &self.endpoints[self.next];
                    warn!(coordinator = %url, error = %e, "cannot reach this coordinator; trying the next");
                    self.next = (self.next + 1) % self.endpoints.len();
                }
                Err(SessionError::Refused(status))
                    if self.endpoints.len() > 1 && status.code() == tonic::Code::Unavailable =>
                {
                    warn!(reason = %status.message(), "no leader yet; trying the next coordinator");
                    self.next = (self.next + 1) % self.endpoints.len();
                }
                Err(SessionError::Refused(status))
                    if status.code() == tonic::Code::PermissionDenied =>
                {
                    error!(reason = %status.message(), "the coordinator refused this agent; check its certificate and --host-id");
                }
                Err(e) => warn!(error = %e, "no stream to the coordinator"),
            }
            let delay = backoff.next_delay();
            debug!(delay = ?delay, "waiting before reconnecting");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn hello(&self, services: Vec<ServiceStatus>) -> AgentMessage {
        let info = HostInfo {
            host_id: self.config.host_id.clone(),
            agent_version: self.version.clone(),
            labels: self.config.labels.clone(),
            services,
        };
        AgentMessage {
            kind: Some(agent_message::Kind::Hello((&info).into())),
        }
    }

    async fn session(
        &mut self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
        executor: &Executor,
    ) -> Result<Ended, SessionError> {
        // A renewed certificate: every endpoint presents the new one.
        let generation = self.creds.generation();
        if generation != self.built_for {
            let tls = self.creds.current();
            for (url, e) in &mut self.endpoints {
                if let Ok(fresh) = endpoint(url, &tls) {
                    *e = fresh;
                }
            }
            self.built_for = generation;
        }
        // Subscribed before the hello, so nothing between the two is missed.
        let mut updates = executor.updates();
        let mut inventory = executor.inventory();
        let services: Vec<ServiceStatus> =
            inventory.borrow_and_update().values().cloned().collect();
        let connect = async {
            let channel: Channel = self.endpoints[self.next]
                .1
                .connect()
                .await
                .map_err(|e| SessionError::Connect(chain(&e)))?;
            let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
            // The channel is new and empty: this cannot be full.
            let _ = tx.try_send(self.hello(services));
            let response = AgentServiceClient::new(channel)
                .connect(ReceiverStream::new(rx))
                .await
                .map_err(SessionError::Refused)?;
            Ok::<_, SessionError>((tx, response.into_inner()))
        };
        let (tx, mut inbound) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
            r = tokio::time::timeout(CONNECT_TIMEOUT + WELCOME_TIMEOUT, connect) => {
                r.map_err(|_| SessionError::Connect("timed out".into()))??
            }
        };

        let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Welcome(w)),
            }))) => w,
            Ok(Err(status)) => return Err(SessionError::Refused(status)),
            Ok(Ok(_)) => {
                return Err(SessionError::Protocol(
                    "the coordinator did not open with a welcome".into(),
                ));
            }
            Err(_) => {
                return Err(SessionError::Protocol(
                    "no welcome from the coordinator".into(),
                ));
            }
        };
        let heartbeat_every = welcome
            .heartbeat_interval
            .as_ref()
            .and_then(from_duration)
            .filter(|d| *d >= Duration::from_millis(100))
            .ok_or_else(|| {
                SessionError::Protocol("the welcome carries no usable heartbeat interval".into())
            })?;
        let silence = welcome
            .silence_timeout
            .as_ref()
            .and_then(from_duration)
            .filter(|d| *d > heartbeat_every)
            .ok_or_else(|| {
                SessionError::Protocol("the welcome carries no usable silence timeout".into())
            })?;
        info!(
            coordinator = %self.endpoints[self.next].0,
            version = %welcome.coordinator_version,
            heartbeat = %humantime::format_duration(heartbeat_every),
            "connected to the coordinator"
        );
        backoff.reset();
        let metrics = &crate::metrics::METRICS;
        if metrics.connects.get() > 0 {
            metrics.reconnects.inc();
        }
        metrics.connects.inc();
        self.connected.send_replace(true);
        {
            let (url, endpoint) = &self.endpoints[self.next];
            let mut current = self
                .creds
                .url
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *current != *url {
                current.clone_from(url);
                self.creds.fetch.send_replace(endpoint.connect_lazy());
            }
        }

        // `baton logs`: requests served beside the commands, their chunks
        // sent on this stream (and all of them ended with it).
        let (log_tx, mut log_rx) = mpsc::channel(LOG_BUFFER);
        let mut log_streams = crate::logs::Streams::default();
        // Analysis samples: answered in the background, one reply each.
        let (sample_tx, mut sample_rx) = mpsc::channel(crate::sample::MAX_IN_FLIGHT);
        let sampler = crate::sample::Sampler::default();
        let sample_source: std::sync::Arc<dyn crate::sample::Source> =
            std::sync::Arc::new(executor.clone());
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + heartbeat_every, heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        let mut deadline = Instant::now() + silence;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // Dropping the sender half-closes the stream, so the
                    // coordinator marks this host disconnected at once.
                    drop(tx);
                    return Ok(Ended::Shutdown);
                }
                _ = heartbeat.tick() => {
                    seq += 1;
                    let msg = AgentMessage { kind: Some(agent_message::Kind::Heartbeat(Heartbeat { seq })) };
                    if tx.try_send(msg).is_err() {
                        debug!(seq, "outbound buffer full; skipping a heartbeat");
                    }
                }
                update = updates.recv() => {
                    let update = match update {
                        Ok(u) => u,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            // The coordinator re-sends what it still waits
                            // for after a reconnect; the journal answers.
                            return Ok(Ended::Lost(format!("{n} command updates could not be sent in time")));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(Ended::Shutdown),
                    };
                    let msg = AgentMessage { kind: Some(agent_message::Kind::CommandUpdate((&update).into())) };
                    // Waiting here is back-pressure from the coordinator;
                    // silence still ends it.
                    if tokio::time::timeout_at(deadline, tx.send(msg)).await.is_err() {
                        return Ok(Ended::Lost("the coordinator stopped reading the stream".into()));
                    }
                }
                Some(reply) = sample_rx.recv() => {
                    let msg = AgentMessage { kind: Some(agent_message::Kind::SampleReply(reply)) };
                    if tokio::time::timeout_at(deadline, tx.send(msg)).await.is_err() {
                        return Ok(Ended::Lost("the coordinator stopped reading the stream".into()));
                    }
                }
                Some(chunk) = log_rx.recv() => {
                    let msg = AgentMessage { kind: Some(agent_message::Kind::LogChunk(chunk)) };
                    if tokio::time::timeout_at(deadline, tx.send(msg)).await.is_err() {
                        return Ok(Ended::Lost("the coordinator stopped reading the stream".into()));
                    }
                }
                changed = inventory.changed() => {
                    if changed.is_err() {
                        return Ok(Ended::Shutdown);
                    }
                    let services: Vec<ServiceStatus> = inventory.borrow_and_update().values().cloned().collect();
                    let msg = AgentMessage { kind: Some(agent_message::Kind::Inventory(InventoryUpdate {
                        services: services.iter().map(Into::into).collect(),
                    })) };
                    if tokio::time::timeout_at(deadline, tx.send(msg)).await.is_err() {
                        return Ok(Ended::Lost("the coordinator stopped reading the stream".into()));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Ok(Ended::Lost(format!(
                        "nothing heard from the coordinator for {}", humantime::format_duration(silence)
                    )));
                }
                msg = inbound.message() => match msg {
                    Ok(Some(msg)) => {
                        deadline = Instant::now() + silence;
                        match msg.kind {
                            Some(coordinator_message::Kind::Ping(_)) => {}
                            Some(coordinator_message::Kind::Command(command)) => executor.submit(command),
                            Some(coordinator_message::Kind::LogRequest(req)) => {
                                let source = executor.log_source(&req.service);
                                log_streams.start(req, source, log_tx.clone());
                            }
                            Some(coordinator_message::Kind::LogCancel(c)) => log_streams.cancel(&c.request_id),
                            Some(coordinator_message::Kind::SampleRequest(req)) => {
                                sampler.start(req, sample_source.clone(), sample_tx.clone());
                            }
                            Some(coordinator_message::Kind::Welcome(_)) => {
                                return Ok(Ended::Lost("a second welcome on one stream".into()));
                            }
                            None => debug!("ignoring a coordinator message of a kind this agent does not know"),
                        }
                    }
                    Ok(None) => return Ok(Ended::Lost("the coordinator closed the stream".into())),
                    Err(status) => return Ok(Ended::Lost(format!("{}: {}", status.code(), status.message()))),
                },
            }
        }
    }
}
