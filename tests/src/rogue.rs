//! A rogue coordinator: it holds the coordinator's real certificate (as a
//! compromised `batond` would) and speaks the agent stream, sending
//! whatever commands a test tells it to. Tests of what a compromised
//! coordinator can and cannot make an agent do use it.

use std::pin::Pin;
use std::time::Duration;

use baton_proto::agent::v1 as pb;
use baton_proto::agent::v1::agent_service_server::{AgentService, AgentServiceServer};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

type Outbound = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

/// Serves the payloads of the artifact files it is given, by digest.
#[derive(Clone, Default)]
struct Payloads(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>);

#[tonic::async_trait]
impl pb::artifact_service_server::ArtifactService for Payloads {
    type FetchStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::FetchChunk, Status>> + Send>>;

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let req = request.into_inner();
        let payload = self
            .0
            .lock()
            .unwrap()
            .get(&req.digest)
            .cloned()
            .ok_or_else(|| Status::not_found(req.digest.clone()))?;
        let size = payload.len() as u64;
        let start = usize::try_from(req.offset).unwrap().min(payload.len());
        let chunks: Vec<Result<pb::FetchChunk, Status>> = payload[start..]
            .chunks(1 << 20)
            .enumerate()
            .map(|(i, c)| {
                Ok(pb::FetchChunk {
                    offset: (start + i * (1 << 20)) as u64,
                    data: bytes::Bytes::copy_from_slice(c),
                    size,
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn source(
        &self,
        _request: Request<pb::SourceRequest>,
    ) -> Result<Response<pb::SourceAnswer>, Status> {
        // As a coordinator older than peer-to-peer staging: itself.
        Err(Status::unimplemented("no sources here"))
    }
}

struct Service {
    /// The stream to the connected agent, once one connects.
    agent: std::sync::Arc<Mutex<Option<Outbound>>>,
    updates: std::sync::mpsc::Sender<pb::CommandUpdate>,
}

#[tonic::async_trait]
impl AgentService for Service {
    type ConnectStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let welcome = pb::Welcome {
            coordinator_version: "rogue".into(),
            heartbeat_interval: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            silence_timeout: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
        };
        let message = |kind| pb::CoordinatorMessage { kind: Some(kind) };
        tx.send(Ok(message(pb::coordinator_message::Kind::Welcome(welcome))))
            .await
            .map_err(|_| Status::internal("gone"))?;
        *self.agent.lock().await = Some(tx.clone());
        let updates = self.updates.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = inbound.next().await {
                match msg.kind {
                    Some(pb::agent_message::Kind::Heartbeat(hb)) => {
                        let ping = pb::coordinator_message::Kind::Ping(pb::Ping { seq: hb.seq });
                        let _ = tx.send(Ok(message(ping))).await;
                    }
                    Some(pb::agent_message::Kind::CommandUpdate(u)) => {
                        let _ = updates.send(u);
                    }
                    _ => {}
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// A rogue coordinator on a loopback port.
pub struct Rogue {
    /// Its URL, for an agent's `--coordinator`.
    pub url: String,
    rt: tokio::runtime::Runtime,
    agent: std::sync::Arc<Mutex<Option<Outbound>>>,
    updates: std::sync::mpsc::Receiver<pb::CommandUpdate>,
    next: std::cell::Cell<u64>,
    payloads: Payloads,
}

impl Rogue {
    /// Serves with the coordinator's certificate from `tls`.
    pub fn start(tls: &std::path::Path) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let read = |f: &str| std::fs::read(tls.join(f)).unwrap();
        let config = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                read("coordinator.pem"),
                read("coordinator-key.pem"),
            ))
            .client_ca_root(tonic::transport::Certificate::from_pem(read("ca.pem")));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let agent = std::sync::Arc::default();
        let (updates_tx, updates) = std::sync::mpsc::channel();
        let service = Service {
            agent: std::sync::Arc::clone(&agent),
            updates: updates_tx,
        };
        let payloads = Payloads::default();
        rt.spawn(
            tonic::transport::Server::builder()
                .tls_config(config)
                .unwrap()
                .add_service(AgentServiceServer::new(service))
                .add_service(pb::artifact_service_server::ArtifactServiceServer::new(
                    payloads.clone(),
                ))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Self {
            url,
            rt,
            agent,
            updates,
            next: std::cell::Cell::new(0),
            payloads,
        }
    }

    /// Serves the payload of an artifact file; returns its `Stage` command.
    pub fn offer(&self, artifact: &std::path::Path) -> pb::command::Kind {
        use std::io::Read;
        let (signed, mut file) = baton_common::artifact::open_artifact(artifact).unwrap();
        let mut payload = Vec::new();
        file.read_to_end(&mut payload).unwrap();
        self.payloads.0.lock().unwrap().insert(
            format!("sha256:{}", signed.manifest.payload_sha256),
            payload,
        );
        pb::command::Kind::Stage(pb::Stage {
            service: signed.manifest.name.clone(),
            version: signed.manifest.version.clone(),
            manifest: signed.bytes,
            signature: signed.signature,
        })
    }

    /// Sends `kind` with a fresh id and a deadline `within` from now;
    /// returns the id (see [`Rogue::outcome`]).
    pub fn send(&self, kind: pb::command::Kind, within: Duration) -> String {
        self.next.set(self.next.get() + 1);
        let id = format!("rogue/{}", self.next.get());
        let command = pb::Command {
            id: id.clone(),
            deadline: Some(baton_common::time::to_timestamp(
                std::time::SystemTime::now() + within,
            )),
            kind: Some(kind),
            traffic: None,
        };
        crate::wait_until(
            "an agent to connect to the rogue coordinator",
            crate::SOON,
            || {
                self.rt.block_on(async {
                    let agent = self.agent.lock().await.clone()?;
                    let msg = pb::CoordinatorMessage {
                        kind: Some(pb::coordinator_message::Kind::Command(command.clone())),
                    };
                    agent.send(Ok(msg)).await.ok()
                })
            },
        );
        id
    }

    /// Waits (up to `timeout`) for the final answer to `id`: `Ok(())` or
    /// the agent's error.
    pub fn outcome(&self, id: &str, timeout: Duration) -> Result<(), String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let update = self
                .updates
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no answer to {id} within {timeout:?}"));
            if update.command_id != id || update.phase != pb::CommandPhase::Done as i32 {
                continue;
            }
            return if update.outcome == pb::CommandOutcome::Succeeded as i32 {
                Ok(())
            } else {
                Err(update.error)
            };
        }
    }

    /// Sends `kind` as a command with a fresh id and a two-minute deadline,
    /// and waits (bounded) for the agent's final answer.
    pub fn run(&self, kind: pb::command::Kind) -> Result<(), String> {
        let id = self.send(kind, Duration::from_secs(120));
        self.outcome(&id, crate::SOON)
    }
}
