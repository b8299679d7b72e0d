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
        rt.spawn(
            tonic::transport::Server::builder()
                .tls_config(config)
                .unwrap()
                .add_service(AgentServiceServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Self {
            url,
            rt,
            agent,
            updates,
            next: std::cell::Cell::new(0),
        }
    }

    /// Sends `kind` as a command with a fresh id and waits (bounded) for
    /// the agent's final answer: `Ok(())` or its error.
    pub fn run(&self, kind: pb::command::Kind) -> Result<(), String> {
        self.next.set(self.next.get() + 1);
        let id = format!("rogue/{}", self.next.get());
        let deadline = std::time::SystemTime::now() + Duration::from_secs(120);
        let command = pb::Command {
            id: id.clone(),
            deadline: Some(baton_common::time::to_timestamp(deadline)),
            kind: Some(kind),
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
        loop {
            let update = self
                .updates
                .recv_timeout(crate::SOON)
                .unwrap_or_else(|_| panic!("no answer to {id}"));
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
}
