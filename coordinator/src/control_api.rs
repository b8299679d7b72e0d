//! `baton.control.v1.ControlService`: the operator API. Handlers validate
//! their input, forward to the registry and convert the answer; they hold
//! no state of their own.

use std::pin::Pin;
use std::time::SystemTime;

use baton_common::artifact::SignedManifest;
use baton_common::host::{HostId, Labels, validate_labels};
use baton_common::time::{from_duration, to_duration};
use baton_common::time::{from_unix_millis, to_timestamp};
use baton_common::tls::Role;
use baton_proto::control::v1 as pb;
use baton_proto::control::v1::{
    Artifact, AuditEntry, ControlRolloutRequest, GetHostRequest, GetRolloutRequest, Host,
    HostEvent, HostPing, ListArtifactsRequest, ListArtifactsResponse, ListAuditRequest,
    ListAuditResponse, ListHostsRequest, ListHostsResponse, ListRolloutsRequest,
    ListRolloutsResponse, PingHostsRequest, PingHostsResponse, PushArtifactRequest, Rollout,
    RolloutAction, StartRolloutRequest, StartRolloutResponse, WatchHostsRequest,
    control_service_server::ControlService, push_artifact_request,
};
use tokio_stream::StreamExt;

use crate::artifacts::{ArtifactRecord, ArtifactStoreError, Artifacts};
use crate::rollout::{Operator, RolloutError, Rollouts};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::fleet::{FleetHandle, FleetStopped};

/// How long `PingHosts` waits when the request does not say.
const DEFAULT_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The longest `PingHosts` waits.
pub const MAX_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Events a `ListRolloutEvents` page holds when the request does not say.
const DEFAULT_EVENTS_PAGE: usize = 1000;
/// The most a page holds (about 2 MB, under the message limit).
pub const MAX_EVENTS_PAGE: usize = 10_000;

/// Events buffered per watcher; a slow watcher back-pressures its own task
/// only, which then skips ahead with a fresh snapshot.
const WATCH_OUTBOUND: usize = 64;

/// The Control API.
pub struct ControlApi {
    fleet: FleetHandle,
    artifacts: Artifacts,
    rollouts: Rollouts,
    audit: crate::audit::Audit,
    enrollment: crate::enroll::Enrollment,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl ControlApi {
    /// A service answering from `fleet`, `artifacts` and `rollouts`; watch
    /// tasks are tracked by `tasks` and end when `shutdown` is cancelled.
    pub fn new(
        fleet: FleetHandle,
        artifacts: Artifacts,
        rollouts: Rollouts,
        audit: crate::audit::Audit,
        enrollment: crate::enroll::Enrollment,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            fleet,
            artifacts,
            rollouts,
            audit,
            enrollment,
            shutdown,
            tasks,
        }
    }
}

/// The caller as histories and the audit log name it, e.g.
/// `operator alice`.
fn caller_name<T>(request: &Request<T>) -> String {
    match request
        .extensions()
        .get::<baton_common::tls::PeerIdentity>()
    {
        Some(baton_common::tls::PeerIdentity::Operator { name, .. }) => format!("operator {name}"),
        Some(other) => other.to_string(),
        None => "an unidentified caller".to_owned(),
    }
}

/// Maps artifact errors to status codes.
pub fn artifact_status(e: ArtifactStoreError) -> Status {
    match e {
        ArtifactStoreError::Invalid(m) => Status::invalid_argument(m),
        ArtifactStoreError::Conflict(m) => Status::already_exists(m),
        ArtifactStoreError::NotFound(m) => Status::not_found(m),
        e @ (ArtifactStoreError::Io { .. } | ArtifactStoreError::Store(_)) => {
            tracing::error!(error = %e, "artifact store failure");
            Status::internal(e.to_string())
        }
    }
}

/// A plan no longer than [`crate::limits::MAX_PLAN_BYTES`].
fn bounded_plan(plan: String) -> Result<String, Status> {
    if plan.len() > crate::limits::MAX_PLAN_BYTES {
        return Err(Status::invalid_argument(format!(
            "the plan is {} bytes, above the limit of {}",
            plan.len(),
            crate::limits::MAX_PLAN_BYTES
        )));
    }
    Ok(plan)
}

fn rollout_status(e: RolloutError) -> Status {
    match e {
        RolloutError::Invalid(m) => Status::invalid_argument(m),
        RolloutError::NotFound(id) => Status::not_found(format!("no rollout {id}")),
        RolloutError::Conflict(m) => Status::failed_precondition(m),
        RolloutError::Store(e) => Status::internal(e.to_string()),
        RolloutError::Stopped => Status::unavailable("the coordinator is shutting down"),
    }
}

fn artifact(r: ArtifactRecord) -> Artifact {
    Artifact {
        name: r.name,
        version: r.version,
        digest: r.digest,
        size: r.size,
        created: r.created,
        key_id: r.key_id,
        origin: r.origin.unwrap_or_default(),
    }
}

type RolloutStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<Rollout, Status>> + Send>>;

fn stopped(_: FleetStopped) -> Status {
    Status::unavailable("the coordinator is shutting down")
}

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<HostEvent, Status>> + Send>>;

type LogStream = Pin<
    Box<dyn tokio_stream::Stream<Item = Result<baton_proto::control::v1::LogText, Status>> + Send>,
>;

/// How long an agent may take to start answering a log request.
const LOG_FIRST_ANSWER: std::time::Duration = std::time::Duration::from_secs(10);

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

    async fn push_artifact(
        &self,
        request: Request<tonic::Streaming<PushArtifactRequest>>,
    ) -> Result<Response<Artifact>, Status> {
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(PushArtifactRequest {
                kind: Some(push_artifact_request::Kind::Header(h)),
            })) => h,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of an upload must be the artifact header",
                ));
            }
        };
        let manifest = SignedManifest::parse(header.manifest, header.signature)
            .map_err(|e| Status::invalid_argument(format!("the manifest is not valid: {e}")))?;
        let (name, version) = (
            manifest.manifest.name.clone(),
            manifest.manifest.version.clone(),
        );
        if !header.origin.is_empty() {
            // The payload is at its origin: nothing else may follow.
            if let Some(next) = stream.next().await {
                next?;
                return Err(Status::invalid_argument(
                    "an upload with an origin carries no payload: the header is all",
                ));
            }
            let record = self
                .artifacts
                .record_origin(manifest, &header.origin)
                .await
                .map_err(artifact_status)?;
            tracing::info!(%name, %version, digest = %record.digest, size = record.size, origin = ?record.origin, "artifact recorded; its payload is at its origin");
            return Ok(Response::new(artifact(record)));
        }
        let mut upload = self.artifacts.begin(manifest).map_err(artifact_status)?;
        while let Some(msg) = stream.next().await {
            match msg?.kind {
                Some(push_artifact_request::Kind::Chunk(data)) => {
                    upload.write(&data).map_err(artifact_status)?;
                }
                _ => {
                    return Err(Status::invalid_argument(
                        "after the header an upload carries only payload chunks",
                    ));
                }
            }
        }
        let record = upload.finish().await.map_err(artifact_status)?;
        tracing::info!(%name, %version, digest = %record.digest, size = record.size, "artifact stored");
        Ok(Response::new(artifact(record)))
    }

    async fn list_artifacts(
        &self,
        _request: Request<ListArtifactsRequest>,
    ) -> Result<Response<ListArtifactsResponse>, Status> {
        let all = self.artifacts.list().await.map_err(artifact_status)?;
        Ok(Response::new(ListArtifactsResponse {
            artifacts: all.into_iter().map(artifact).collect(),
        }))
    }

    async fn start_rollout(
        &self,
        request: Request<StartRolloutRequest>,
    ) -> Result<Response<StartRolloutResponse>, Status> {
        let who = caller_name(&request);
        let r = self
            .rollouts
            .start(bounded_plan(request.into_inner().plan)?, who)
            .await
            .map_err(rollout_status)?;
        Ok(Response::new(StartRolloutResponse { id: r.id }))
    }

    async fn get_rollout(
        &self,
        request: Request<GetRolloutRequest>,
    ) -> Result<Response<Rollout>, Status> {
        let r = self
            .rollouts
            .get(request.into_inner().id)
            .await
            .map_err(rollout_status)?;
        Ok(Response::new(crate::rollout::to_pb(&r)))
    }

    async fn list_rollouts(
        &self,
        _request: Request<ListRolloutsRequest>,
    ) -> Result<Response<ListRolloutsResponse>, Status> {
        let all = self.rollouts.list().await.map_err(rollout_status)?;
        Ok(Response::new(ListRolloutsResponse {
            rollouts: all.iter().map(crate::rollout::to_pb).collect(),
        }))
    }

    type WatchRolloutStream = RolloutStream;

    type StreamLogsStream = LogStream;

    async fn stream_logs(
        &self,
        request: Request<baton_proto::control::v1::StreamLogsRequest>,
    ) -> Result<Response<LogStream>, Status> {
        use crate::logs::Next;
        use baton_proto::control::v1::LogText;
        let who = request
            .extensions()
            .get::<baton_common::tls::PeerIdentity>()
            .map_or_else(|| "an unidentified caller".to_owned(), ToString::to_string);
        let req = request.into_inner();
        let host = HostId::try_from(req.host_id.as_str())
            .map_err(|e| Status::invalid_argument(format!("host id {}", e.reason)))?;
        baton_common::host::validate_name(&req.service).map_err(|e| {
            Status::invalid_argument(format!(
                "service {}: {e}",
                baton_common::text::quote(&req.service)
            ))
        })?;
        if req.lines > crate::logs::MAX_LINES {
            return Err(Status::invalid_argument(format!(
                "lines {} is out of range: at most {}",
                req.lines,
                crate::logs::MAX_LINES
            )));
        }
        let agent = self.fleet.agent_sender(&host).await.map_err(|e| match e {
            crate::fleet::SendError::Stopped => {
                Status::unavailable("the coordinator is shutting down")
            }
            other => Status::unavailable(other.to_string()),
        })?;
        let mut sub = self
            .fleet
            .logs()
            .open(host.clone(), agent, &req.service, req.lines, req.follow)
            .map_err(|e| match e {
                crate::logs::OpenError::Busy => Status::resource_exhausted(e.to_string()),
                crate::logs::OpenError::NotConnected(_) => Status::unavailable(e.to_string()),
            })?;
        tracing::info!(%who, %host, service = %req.service, follow = req.follow, "streaming a service's log");
        // The first answer before the response: an unknown service is a
        // status, not a broken stream.
        let first = tokio::time::timeout(LOG_FIRST_ANSWER, sub.next())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "host {host} did not answer within {}s",
                    LOG_FIRST_ANSWER.as_secs()
                ))
            })?;
        let first = match first {
            Next::Text(text) => Some(text),
            Next::End => None,
            Next::Failed(e) if e.starts_with("no service") => return Err(Status::not_found(e)),
            Next::Failed(e) => return Err(Status::failed_precondition(e)),
            Next::Lost => {
                return Err(Status::unavailable(format!("host {host}'s stream ended")));
            }
        };
        let (tx, out) = mpsc::channel(crate::logs::BUFFER);
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let Some(first) = first else {
                return;
            };
            if tx.send(Ok(LogText { text: first })).await.is_err() {
                return;
            }
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    next = sub.next() => next,
                };
                let item = match next {
                    Next::Text(text) => Ok(LogText { text }),
                    Next::End => return,
                    Next::Failed(e) => Err(Status::failed_precondition(e)),
                    Next::Lost => Err(Status::unavailable(
                        "the log stream ended: the host disconnected, or this client read too slowly",
                    )),
                };
                let last = item.is_err();
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn watch_rollout(
        &self,
        request: Request<GetRolloutRequest>,
    ) -> Result<Response<RolloutStream>, Status> {
        let mut rx = self
            .rollouts
            .watch(request.into_inner().id)
            .await
            .map_err(rollout_status)?;
        let (tx, out) = mpsc::channel(WATCH_OUTBOUND);
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let forward = async {
                loop {
                    let now = crate::rollout::to_pb(&rx.borrow_and_update());
                    let done = crate::rollout::is_terminal(&now.state);
                    if tx.send(Ok(now)).await.is_err() || done {
                        return;
                    }
                    if rx.changed().await.is_err() {
                        // The driver let go: the last value was terminal
                        // and has been sent, or the coordinator stops.
                        return;
                    }
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = forward => {}
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn plan_rollout(
        &self,
        request: Request<StartRolloutRequest>,
    ) -> Result<Response<baton_proto::control::v1::RolloutPlan>, Status> {
        let r = self
            .rollouts
            .plan(bounded_plan(request.into_inner().plan)?)
            .await
            .map_err(rollout_status)?;
        Ok(Response::new(crate::rollout::dry_run(&r)))
    }

    async fn freeze(
        &self,
        request: Request<pb::FreezeRequest>,
    ) -> Result<Response<pb::FreezeStatus>, Status> {
        let who = caller_name(&request);
        let req = request.into_inner();
        let until = crate::freeze::until_from_pb(req.until.as_ref(), SystemTime::now())
            .map_err(Status::invalid_argument)?;
        let reason = crate::freeze::check_reason(&req.reason).map_err(Status::invalid_argument)?;
        let view = self
            .rollouts
            .freeze(until, reason, who)
            .await
            .map_err(rollout_status)?;
        Ok(Response::new(crate::freeze::to_pb(&view)))
    }

    async fn unfreeze(
        &self,
        _request: Request<pb::UnfreezeRequest>,
    ) -> Result<Response<pb::FreezeStatus>, Status> {
        let view = self.rollouts.unfreeze().await.map_err(rollout_status)?;
        Ok(Response::new(crate::freeze::to_pb(&view)))
    }

    async fn get_freeze(
        &self,
        _request: Request<pb::GetFreezeRequest>,
    ) -> Result<Response<pb::FreezeStatus>, Status> {
        let view = self.rollouts.freeze_view().await.map_err(rollout_status)?;
        Ok(Response::new(crate::freeze::to_pb(&view)))
    }

    async fn stop_the_line(
        &self,
        request: Request<pb::StopTheLineRequest>,
    ) -> Result<Response<pb::StopTheLineResponse>, Status> {
        let who = caller_name(&request);
        let paused = self
            .rollouts
            .stop_the_line(who)
            .await
            .map_err(rollout_status)?;
        Ok(Response::new(pb::StopTheLineResponse { paused }))
    }

    async fn control_rollout(
        &self,
        request: Request<ControlRolloutRequest>,
    ) -> Result<Response<Rollout>, Status> {
        let who = caller_name(&request);
        let req = request.into_inner();
        let op = match RolloutAction::try_from(req.action) {
            Ok(RolloutAction::Pause) => Operator::Pause,
            Ok(RolloutAction::Resume) => Operator::Resume,
            Ok(RolloutAction::Abort) => Operator::Abort,
            Ok(RolloutAction::Rollback) => Operator::Rollback,
            Ok(RolloutAction::Promote) => Operator::Promote,
            Ok(RolloutAction::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "action {} is unspecified or unknown",
                    req.action
                )));
            }
        };
        let r = self
            .rollouts
            .control(req.id, op, who)
            .await
            .map_err(rollout_status)?;
        Ok(Response::new(crate::rollout::to_pb(&r)))
    }

    async fn list_rollout_events(
        &self,
        request: Request<pb::ListRolloutEventsRequest>,
    ) -> Result<Response<pb::ListRolloutEventsResponse>, Status> {
        let req = request.into_inner();
        let limit = match req.limit {
            0 => DEFAULT_EVENTS_PAGE,
            n => usize::try_from(n)
                .unwrap_or(MAX_EVENTS_PAGE)
                .min(MAX_EVENTS_PAGE),
        };
        // One more than asked tells whether there are more.
        let mut events = self
            .rollouts
            .events(&req.id, req.since, limit + 1)
            .await
            .map_err(rollout_status)?;
        let more = events.len() > limit;
        events.truncate(limit);
        Ok(Response::new(pb::ListRolloutEventsResponse {
            more,
            events: events
                .into_iter()
                .map(|e| pb::RolloutEvent {
                    seq: e.seq,
                    at: Some(to_timestamp(from_unix_millis(e.at))),
                    kind: e.kind.as_str().to_owned(),
                    service: e.service,
                    host: e.host,
                    from: e.from,
                    to: e.to,
                    who: e.who,
                    message: e.message,
                    failure: crate::rollout::failure_to_pb(e.failure),
                    probe: e.detail.probe,
                    log_tail: e.detail.log_tail,
                })
                .collect(),
        }))
    }

    async fn get_host_history(
        &self,
        request: Request<GetHostRequest>,
    ) -> Result<Response<pb::HostHistory>, Status> {
        let host = HostId::try_from(request.into_inner().host_id.as_str())
            .map_err(|e| Status::invalid_argument(format!("host id {}", e.reason)))?;
        if self
            .fleet
            .get(host.clone())
            .await
            .map_err(stopped)?
            .is_none()
        {
            return Err(Status::not_found(format!(
                "no host {host} has ever registered"
            )));
        }
        let all = self.rollouts.list().await.map_err(rollout_status)?;
        Ok(Response::new(pb::HostHistory {
            host_id: host.to_string(),
            activations: crate::rollout::host_history(&all, &host)
                .into_iter()
                .map(|a| pb::HostActivation {
                    rollout_id: a.rollout_id,
                    service: a.service,
                    from_version: a.from_version.unwrap_or_default(),
                    to_version: a.to_version,
                    state: a.state.as_str().to_owned(),
                    started_at: a.started_at.map(to_timestamp),
                    finished_at: a.finished_at.map(to_timestamp),
                    error: a.error.unwrap_or_default(),
                    rollout_state: a.rollout_state.as_str().to_owned(),
                })
                .collect(),
        }))
    }

    async fn create_dashboard_token(
        &self,
        request: Request<pb::CreateDashboardTokenRequest>,
    ) -> Result<Response<pb::CreateDashboardTokenResponse>, Status> {
        let who = caller_name(&request);
        let have = match request
            .extensions()
            .get::<baton_common::tls::PeerIdentity>()
        {
            Some(baton_common::tls::PeerIdentity::Operator { role, .. }) => {
                role.parse::<Role>().ok()
            }
            _ => None,
        };
        let req = request.into_inner();
        let want = req.role.parse::<Role>().map_err(|_| {
            Status::invalid_argument(format!(
                "role {:?} is not viewer, operator or admin",
                req.role
            ))
        })?;
        if have.is_none_or(|have| have < want) {
            let why = format!(
                "a {} token needs a certificate with that role; yours has {}",
                want,
                have.map_or("none", Role::as_str)
            );
            self.audit
                .record(
                    &who,
                    have.map_or("", Role::as_str),
                    "CreateDashboardToken",
                    "denied",
                    &why,
                )
                .await;
            return Err(Status::permission_denied(why));
        }
        let ttl = match req.ttl.as_ref() {
            None => crate::web::tokens::DEFAULT_TTL,
            Some(d) => from_duration(d)
                .filter(|d| !d.is_zero() && *d <= crate::web::tokens::MAX_TTL)
                .ok_or_else(|| {
                    Status::invalid_argument("ttl: must be above zero and at most 7 days")
                })?,
        };
        let (token, expires) = crate::web::tokens::create(self.audit.store(), want, &who, ttl)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.audit
            .record(
                &who,
                have.map_or("", Role::as_str),
                "CreateDashboardToken",
                "ok",
                "",
            )
            .await;
        Ok(Response::new(pb::CreateDashboardTokenResponse {
            token,
            expires_at: Some(to_timestamp(expires)),
            role: want.as_str().to_owned(),
        }))
    }

    async fn create_enrollment(
        &self,
        request: Request<baton_proto::control::v1::CreateEnrollmentRequest>,
    ) -> Result<Response<baton_proto::control::v1::CreateEnrollmentResponse>, Status> {
        let by = match request
            .extensions()
            .get::<baton_common::tls::PeerIdentity>()
        {
            Some(p) => p.to_string(),
            None => "an unidentified caller".to_owned(),
        };
        let req = request.into_inner();
        let host = if req.host_id.is_empty() {
            None
        } else {
            Some(
                HostId::try_from(req.host_id.as_str())
                    .map_err(|e| Status::invalid_argument(format!("host id {}", e.reason)))?,
            )
        };
        if host.is_none() && req.uses == 0 {
            return Err(Status::invalid_argument(
                "give the host id the token is for, or how many hosts may use it (uses)",
            ));
        }
        let ttl = req
            .ttl
            .as_ref()
            .and_then(baton_common::time::from_duration)
            .ok_or_else(|| Status::invalid_argument("ttl is required"))?;
        let spec = crate::enroll::TokenSpec {
            host,
            ttl,
            uses: req.uses,
            labels: req.labels.into_iter().collect(),
            approve: req.approve,
        };
        let created = self.enrollment.create(spec, &by).await?;
        Ok(Response::new(
            baton_proto::control::v1::CreateEnrollmentResponse {
                token: created.token,
                expires_at: Some(baton_common::time::to_timestamp(created.expires)),
                join_token: created.join_token,
                uses: created.uses,
            },
        ))
    }

    async fn list_pending_enrollments(
        &self,
        _request: Request<baton_proto::control::v1::ListPendingEnrollmentsRequest>,
    ) -> Result<Response<baton_proto::control::v1::ListPendingEnrollmentsResponse>, Status> {
        let pending = self.enrollment.pending().await?;
        Ok(Response::new(
            baton_proto::control::v1::ListPendingEnrollmentsResponse {
                pending: pending.into_iter().map(pending_to_pb).collect(),
            },
        ))
    }

    async fn decide_enrollment(
        &self,
        request: Request<baton_proto::control::v1::DecideEnrollmentRequest>,
    ) -> Result<Response<baton_proto::control::v1::PendingEnrollment>, Status> {
        let req = request.into_inner();
        let host = HostId::try_from(req.host_id.as_str())
            .map_err(|e| Status::invalid_argument(format!("host id {}", e.reason)))?;
        let decided = self.enrollment.decide(&host, req.accept).await?;
        Ok(Response::new(pending_to_pb(decided)))
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => crate::audit::DEFAULT_LIMIT,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let entries = self
            .audit
            .list(limit)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ListAuditResponse {
            entries: entries
                .into_iter()
                .map(|e| AuditEntry {
                    at: Some(baton_common::time::to_timestamp(
                        baton_common::time::from_unix_millis(e.at),
                    )),
                    who: e.who,
                    role: e.role,
                    action: e.action,
                    result: e.result,
                    error: e.error,
                    count: e.count,
                })
                .collect(),
        }))
    }

    async fn ping_hosts(
        &self,
        request: Request<PingHostsRequest>,
    ) -> Result<Response<PingHostsResponse>, Status> {
        let request = request.into_inner();
        let labels: Labels = request.labels.into_iter().collect();
        validate_labels(&labels).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let timeout = match request.timeout {
            None => DEFAULT_PING_TIMEOUT,
            Some(d) => from_duration(&d)
                .filter(|d| !d.is_zero() && *d <= MAX_PING_TIMEOUT)
                .ok_or_else(|| {
                    Status::invalid_argument("timeout: must be above zero and at most 5m")
                })?,
        };
        let report = crate::ping::ping(&self.fleet, labels, timeout)
            .await
            .map_err(stopped)?;
        Ok(Response::new(PingHostsResponse {
            hosts: report
                .hosts
                .into_iter()
                .map(|h| HostPing {
                    host_id: h.host.to_string(),
                    answered_after: h.answered_after.map(to_duration),
                    error: h.error.unwrap_or_default(),
                })
                .collect(),
            elapsed: Some(to_duration(report.elapsed)),
        }))
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

fn pending_to_pb(p: crate::enroll::PendingHost) -> baton_proto::control::v1::PendingEnrollment {
    baton_proto::control::v1::PendingEnrollment {
        host_id: p.host,
        from: p.from,
        requested_at: Some(baton_common::time::to_timestamp(p.at)),
        labels: p.labels.into_iter().collect(),
        key_sha256: p.key_sha256,
        state: p.state.to_owned(),
    }
}
