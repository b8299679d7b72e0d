//! `baton.control.v1.ControlService`: the operator API. Handlers validate
//! their input, forward to the registry and convert the answer; they hold
//! no state of their own.

use std::pin::Pin;

use baton_common::host::HostId;
use baton_proto::control::v1::{
    GetHostRequest, Host, HostEvent, ListHostsRequest, ListHostsResponse, WatchHostsRequest,
    control_service_server::ControlService,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::fleet::{FleetHandle, FleetStopped};

/// Events buffered per watcher; a slow watcher back-pressures its own task
/// only, which then skips ahead with a fresh snapshot.
const WATCH_OUTBOUND: usize = 64;

/// The Control API.
pub struct ControlApi {
    fleet: FleetHandle,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl ControlApi {
    /// A service answering from `fleet`; watch tasks are tracked by `tasks`
    /// and end when `shutdown` is cancelled.
    pub fn new(fleet: FleetHandle, shutdown: CancellationToken, tasks: TaskTracker) -> Self {
        Self {
            fleet,
            shutdown,
            tasks,
        }
    }
}

fn stopped(_: FleetStopped) -> Status {
    Status::unavailable("the coordinator is shutting down")
}

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<HostEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ControlService for ControlApi {
    async fn list_hosts(
        &self,
        _request: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        let hosts = self.fleet.list().await.map_err(stopped)?;
        Ok(Response::new(ListHostsResponse {
            hosts: hosts.iter().map(Host::from).collect(),
        }))
    }

    async fn get_host(&self, request: Request<GetHostRequest>) -> Result<Response<Host>, Status> {
        let id = HostId::try_from(request.into_inner().host_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        match self.fleet.get(id.clone()).await.map_err(stopped)? {
            Some(view) => Ok(Response::new(Host::from(&view))),
            None => Err(Status::not_found(format!(
                "no host {id} has ever registered"
            ))),
        }
    }

    type WatchHostsStream = EventStream;

    async fn watch_hosts(
        &self,
        _request: Request<WatchHostsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let (snapshot, changes) = self.fleet.watch().await.map_err(stopped)?;
        let (tx, rx) = mpsc::channel(WATCH_OUTBOUND);
        let fleet = self.fleet.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = forward(fleet, snapshot, changes, &tx) => {}
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Sends the snapshot, then every change; resyncs with a new snapshot when
/// the watcher fell behind. Returns when the watcher goes away.
async fn forward(
    fleet: FleetHandle,
    mut snapshot: Vec<baton_common::host::HostView>,
    mut changes: broadcast::Receiver<baton_common::host::HostView>,
    tx: &mpsc::Sender<Result<HostEvent, Status>>,
) {
    loop {
        for view in &snapshot {
            if tx
                .send(Ok(HostEvent {
                    host: Some(Host::from(view)),
                    snapshot: true,
                }))
                .await
                .is_err()
            {
                return;
            }
        }
        loop {
            match changes.recv().await {
                Ok(view) => {
                    if tx
                        .send(Ok(HostEvent {
                            host: Some(Host::from(&view)),
                            snapshot: false,
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    debug!(missed = n, "host watcher fell behind; resending a snapshot");
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
        match fleet.watch().await {
            Ok((s, c)) => (snapshot, changes) = (s, c),
            Err(_) => return,
        }
    }
}
