//! `baton.agent.v1.AgentService`: accepts agent streams, checks the hello
//! against the certificate, registers the host and keeps the stream alive.
//!
//! Each stream costs one small task and one bounded outbound channel; the
//! only timer is the silence timeout on the next inbound message, re-armed
//! by each message (so it wakes once per heartbeat, not on a tick).

use std::pin::Pin;
use std::time::Duration;

use baton_common::command::CommandUpdate;
use baton_common::host::{HostId, HostInfo, services_from_agent};
use baton_common::time::to_duration;
use baton_common::tls::PeerIdentity;
use baton_proto::agent::v1::{
    AgentMessage, CoordinatorMessage, Ping, Welcome, agent_message,
    agent_service_server::AgentService, coordinator_message,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::fleet::{AgentSender, FleetHandle, Outbound, Session};

/// Messages buffered towards one agent; senders wait when it is full.
const OUTBOUND_BUFFER: usize = 32;

/// How long a new stream may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How streams are kept alive.
#[derive(Debug, Clone, Copy)]
pub struct StreamTiming {
    /// How often agents send heartbeats.
    pub heartbeat_interval: Duration,
    /// Silence after which a stream is declared dead.
    pub silence_timeout: Duration,
}

impl StreamTiming {
    /// Three heartbeats fit in the timeout, so one or two lost or late
    /// heartbeats never disconnect a healthy agent.
    pub fn from_timeout(silence_timeout: Duration) -> Self {
        Self {
            heartbeat_interval: silence_timeout / 3,
            silence_timeout,
        }
    }
}

/// The agent stream service.
pub struct AgentApi {
    fleet: FleetHandle,
    timing: StreamTiming,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    audit: crate::audit::Audit,
}

impl AgentApi {
    /// A service registering hosts in `fleet`; its stream tasks are tracked
    /// by `tasks` and end when `shutdown` is cancelled.
    /// Takeovers of a host's stream are written to `audit`.
    pub fn new(
        fleet: FleetHandle,
        timing: StreamTiming,
        shutdown: CancellationToken,
        tasks: TaskTracker,
        audit: crate::audit::Audit,
    ) -> Self {
        Self {
            fleet,
            timing,
            shutdown,
            tasks,
            audit,
        }
    }
}

fn message(kind: coordinator_message::Kind) -> Outbound {
    Ok(Box::new(CoordinatorMessage { kind: Some(kind) }))
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type ConnectStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let Some(PeerIdentity::Agent(cert_host)) =
            request.extensions().get::<PeerIdentity>().cloned()
        else {
            return Err(Status::permission_denied(
                "only agent certificates may open an agent stream",
            ));
        };
        let peer_address = request
            .remote_addr()
            .map_or_else(String::new, |a| a.to_string());
        let mut inbound = request.into_inner();

        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no hello within {HELLO_TIMEOUT:?}"
                )));
            }
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => {
                return Err(Status::invalid_argument(
                    "the stream ended before its hello",
                ));
            }
            Ok(Ok(Some(AgentMessage {
                kind: Some(agent_message::Kind::Hello(hello)),
            }))) => hello,
            Ok(Ok(Some(_))) => {
                return Err(Status::invalid_argument(
                    "the first message of an agent stream must be a hello",
                ));
            }
        };
        let info =
            HostInfo::try_from(hello).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if info.host_id != cert_host {
            warn!(
                certificate = %cert_host, claimed = %info.host_id, peer = %peer_address,
                "refused an agent whose hello claims another host id than its certificate"
            );
            return Err(Status::permission_denied(format!(
                "this certificate is for host {cert_host}, but the hello claims host {}",
                info.host_id
            )));
        }

        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let welcome = Welcome {
            coordinator_version: baton_common::VERSION.to_owned(),
            heartbeat_interval: Some(to_duration(self.timing.heartbeat_interval)),
            silence_timeout: Some(to_duration(self.timing.silence_timeout)),
        };
        // The channel is new and empty: this cannot be full.
        let _ = tx.try_send(message(coordinator_message::Kind::Welcome(welcome)));
        let host = info.host_id.clone();
        let who = format!("agent {host}");
        let session = match self
            .fleet
            .connect(info, peer_address.clone(), tx.clone())
            .await
        {
            Ok(session) => session,
            Err(crate::fleet::ConnectError::Stopped) => {
                return Err(Status::unavailable("the coordinator is shutting down"));
            }
            Err(crate::fleet::ConnectError::Conflict(why)) => {
                self.audit.record(&who, "", "Connect", "denied", &why).await;
                return Err(Status::resource_exhausted(why));
            }
        };
        if let Some(t) = &session.took_over {
            let what = format!(
                "a new stream from {peer_address} took over the live stream from {} ({} in the last {})",
                t.from,
                t.recent,
                humantime::format_duration(crate::fleet::TAKEOVER_WINDOW)
            );
            self.audit.record(&who, "", "Connect", "ok", &what).await;
        }
        let stream = SessionTask {
            host,
            session,
            inbound,
            tx,
            fleet: self.fleet.clone(),
            timing: self.timing,
            shutdown: self.shutdown.clone(),
        };
        self.tasks.spawn(stream.run());
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|item| item.map(|m| *m).map_err(|s| *s)),
        )))
    }
}

/// Drives one accepted stream until it ends, then deregisters it.
struct SessionTask {
    host: HostId,
    session: Session,
    inbound: Streaming<AgentMessage>,
    tx: AgentSender,
    fleet: FleetHandle,
    timing: StreamTiming,
    shutdown: CancellationToken,
}

impl SessionTask {
    async fn run(mut self) {
        let ended = self.pump().await;
        let reason = ended.message().to_owned();
        // Tell the agent why, when it is still listening; it reconnects
        // (after a protocol error, with a precise code).
        let _ = self.tx.try_send(Err(Box::new(ended)));
        self.fleet
            .disconnect(self.host, self.session.id, reason)
            .await;
    }

    /// Handles inbound messages; returns why the stream ended, as the
    /// status the agent is told: `UNAVAILABLE` when it should simply come
    /// back, `INVALID_ARGUMENT` when it broke the protocol.
    async fn pump(&mut self) -> Status {
        loop {
            let next = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Status::unavailable("the coordinator is shutting down"),
                _ = self.session.replaced.cancelled() => return Status::unavailable("replaced by a newer stream of the same host"),
                next = tokio::time::timeout(self.timing.silence_timeout, self.inbound.message()) => next,
            };
            let msg = match next {
                Err(_) => {
                    return Status::unavailable(format!(
                        "no message for {}",
                        humantime::format_duration(self.timing.silence_timeout)
                    ));
                }
                Ok(Err(status)) => {
                    return Status::unavailable(format!(
                        "the stream broke: {}",
                        baton_common::text::prefix(status.message(), 300)
                    ));
                }
                Ok(Ok(None)) => return Status::unavailable("the agent closed its stream"),
                Ok(Ok(Some(msg))) => msg,
            };
            match msg.kind {
                Some(agent_message::Kind::Heartbeat(hb)) => {
                    self.fleet.seen(self.host.clone(), self.session.id).await;
                    // A full buffer means the agent is not reading; it will
                    // time out on its own side, so dropping a ping is fine.
                    let _ = self
                        .tx
                        .try_send(message(coordinator_message::Kind::Ping(Ping {
                            seq: hb.seq,
                        })));
                }
                Some(agent_message::Kind::Inventory(update)) => {
                    match services_from_agent(update.services, "inventory.services") {
                        Ok(services) => {
                            self.fleet
                                .inventory(self.host.clone(), self.session.id, services)
                                .await
                        }
                        Err(e) => {
                            warn!(host = %self.host, error = %e, "ending a stream that sent an invalid inventory");
                            return Status::invalid_argument(format!("invalid inventory: {e}"));
                        }
                    }
                }
                Some(agent_message::Kind::CommandUpdate(update)) => {
                    match CommandUpdate::try_from(update) {
                        Ok(update) => {
                            self.fleet.seen(self.host.clone(), self.session.id).await;
                            self.fleet.publish_update(self.host.clone(), update).await;
                        }
                        Err(e) => {
                            warn!(host = %self.host, error = %e, "ending a stream that sent an invalid command update");
                            return Status::invalid_argument(format!(
                                "invalid command update: {e}"
                            ));
                        }
                    }
                }
                Some(agent_message::Kind::LogChunk(chunk)) => {
                    self.fleet.logs().deliver(&self.host, chunk);
                }
                Some(agent_message::Kind::SampleReply(reply)) => {
                    self.fleet.samples().deliver(&self.host, reply);
                }
                Some(agent_message::Kind::Hello(_)) => {
                    warn!(host = %self.host, "ending a stream that sent a second hello");
                    return Status::invalid_argument(
                        "a second hello on one stream: a stream starts with one hello, then heartbeats, inventories and command updates",
                    );
                }
                None => {
                    debug!(host = %self.host, "ignoring an agent message of a kind this coordinator does not know")
                }
            }
        }
    }
}
