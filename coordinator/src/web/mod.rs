//! The web dashboard (`batond --http-listen ADDR`): the fleet and the
//! rollouts, live over server-sent events, with pause, resume, abort,
//! promote and rollback for a signed-in operator.
//!
//! Everything it serves is in the binary (`assets/`, included at compile
//! time): no Node.js at run time, no CDN, no inline script (the
//! Content-Security-Policy allows only this origin's files).
//!
//! Reading needs no sign-in: whoever reaches the address sees the fleet,
//! which is why it binds to loopback unless told otherwise. Acting needs a
//! token from `baton dashboard token --role operator`, kept by the browser
//! in an HttpOnly, SameSite=Strict cookie; every action also needs the
//! `X-Baton-Action` header, which a cross-site form cannot send. Actions
//! are written to the audit log like the Control API's.

pub mod tokens;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use baton_common::host::HostView;
use baton_common::time::rfc3339;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::audit::Audit;
use crate::fleet::FleetHandle;
use crate::rollout::{Operator, Rollout, RolloutError, Rollouts};
use crate::store::Store;

/// The session cookie's name.
pub const COOKIE: &str = "baton_session";
/// The header every action must carry (cross-site forms cannot set it).
pub const ACTION_HEADER: &str = "x-baton-action";

/// The Control API call a dashboard action stands for: its role check and
/// audit entry are that call's ([`crate::authz::TABLE`]).
const CONTROL_ROLLOUT: &str = "ControlRollout";
/// The least time between two live updates to one browser: bursts of
/// changes (a batch of hosts turning healthy) are sent as one.
const COALESCE: Duration = Duration::from_millis(150);
/// Live streams served at once to signed-in readers; more are refused
/// (each costs a snapshot of the fleet and the rollouts on every change).
pub const MAX_LIVE: usize = 64;
/// Live streams served at once to readers who did not sign in: a pool of
/// their own, so that they can never lock signed-in operators out.
pub const MAX_ANONYMOUS_LIVE: usize = 32;
/// Live streams served at once to readers who did not sign in, from one
/// address.
pub const MAX_ANONYMOUS_LIVE_PER_ADDRESS: usize = 4;

/// Live streams per address of readers who did not sign in.
type PerAddress = Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// Who may hold a live stream: one pool for signed-in readers, one for the
/// others (also counted per address).
pub struct LiveSlots {
    signed_in: Arc<tokio::sync::Semaphore>,
    anonymous: Arc<tokio::sync::Semaphore>,
    per_address: PerAddress,
}

impl Default for LiveSlots {
    fn default() -> Self {
        Self {
            signed_in: Arc::new(tokio::sync::Semaphore::new(MAX_LIVE)),
            anonymous: Arc::new(tokio::sync::Semaphore::new(MAX_ANONYMOUS_LIVE)),
            per_address: Arc::default(),
        }
    }
}

/// A held live stream slot, given back when dropped.
struct LiveSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    address: Option<(std::net::IpAddr, PerAddress)>,
}

impl Drop for LiveSlot {
    fn drop(&mut self) {
        if let Some((ip, map)) = &self.address {
            let mut map = map
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(n) = map.get_mut(ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(ip);
                }
            }
        }
    }
}

impl LiveSlots {
    /// A slot for a reader, or why there is none.
    fn take(&self, signed_in: bool, peer: std::net::IpAddr) -> Result<LiveSlot, String> {
        if signed_in {
            return self
                .signed_in
                .clone()
                .try_acquire_owned()
                .map(|permit| LiveSlot {
                    _permit: permit,
                    address: None,
                })
                .map_err(|_| {
                    format!("{MAX_LIVE} signed-in dashboards are open already; close one")
                });
        }
        let permit = self.anonymous.clone().try_acquire_owned().map_err(|_| {
            format!(
                "{MAX_ANONYMOUS_LIVE} dashboards without a sign-in are open already; close one, or sign in"
            )
        })?;
        let mut map = self
            .per_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(peer).or_insert(0);
        if *n >= MAX_ANONYMOUS_LIVE_PER_ADDRESS {
            return Err(format!(
                "{MAX_ANONYMOUS_LIVE_PER_ADDRESS} dashboards without a sign-in are open from {peer} already; close one, or sign in"
            ));
        }
        *n += 1;
        Ok(LiveSlot {
            _permit: permit,
            address: Some((peer, self.per_address.clone())),
        })
    }
}
/// Events a rollout's page gets on its first load (the newest).
const EVENTS_TAIL: usize = 300;
/// Events a rollout's page gets at most per later load.
const EVENTS_PAGE: usize = 1000;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// What the dashboard reads from and acts on.
#[derive(Clone)]
pub struct Dashboard {
    /// The fleet registry.
    pub fleet: FleetHandle,
    /// The rollout driver.
    pub rollouts: Rollouts,
    /// Where sign-in tokens are kept.
    pub store: Arc<dyn Store>,
    /// Where actions are recorded.
    pub audit: Audit,
    /// Ends live streams on shutdown.
    pub shutdown: CancellationToken,
    /// Live streams left to serve.
    pub live: Arc<LiveSlots>,
}

/// The dashboard's routes.
pub fn router(dashboard: Dashboard) -> axum::Router {
    axum::Router::new()
        .route("/", get(index))
        .route("/assets/app.js", get(app_js))
        .route("/assets/app.css", get(app_css))
        .route("/api/state", get(state))
        .route("/api/live", get(live))
        .route("/api/rollouts/{id}", get(rollout))
        .route("/api/rollouts/{id}/{action}", post(act))
        .route("/api/hosts/{id}/history", get(history))
        .route("/api/hosts/{id}/logs/{service}", get(host_logs))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .with_state(dashboard)
}

/// What a coordinator that follows another (with an etcd store) serves on
/// the dashboard's address until it leads: the page says where to look.
pub fn follower_router() -> axum::Router {
    axum::Router::new().fallback(|| async {
        problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "this batond follows another (etcd store): open the dashboard of the leading batond",
        )
    })
}

/// Serves the dashboard on `listener` until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, dashboard: Dashboard) -> std::io::Result<()> {
    let shutdown = dashboard.shutdown.clone();
    axum::serve(
        listener,
        router(dashboard).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; frame-ancestors 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

/// An API answer that is never cached.
fn api(status: StatusCode, body: Value) -> Response {
    (status, [(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    api(status, json!({ "error": message.into() }))
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().to_owned())
}

/// Whether the request named the dashboard by an IP address or
/// `localhost`. A page of another site can reach a dashboard on loopback
/// by a DNS name it re-points at 127.0.0.1 (DNS rebinding); such a name
/// is never one of these, and carries no session cookie.
fn host_is_address(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

impl Dashboard {
    /// The session of a request that may read: any request naming the
    /// dashboard by address, and one naming it otherwise (behind a proxy,
    /// or a rebinding attack) only when signed in.
    async fn reader(&self, headers: &HeaderMap) -> Result<Option<tokens::Session>, Response> {
        let session = self.session(headers).await;
        if session.is_none() && !host_is_address(headers) {
            return Err(problem(
                StatusCode::UNAUTHORIZED,
                "reached by a host name: sign in with a token from `baton dashboard token` to read",
            ));
        }
        Ok(session)
    }

    async fn session(&self, headers: &HeaderMap) -> Option<tokens::Session> {
        let token = cookie_token(headers)?;
        match tokens::check(self.store.as_ref(), &token).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot check a dashboard session");
                None
            }
        }
    }

    /// The fleet and every rollout, as the pages draw them.
    async fn snapshot(&self, session: Option<&tokens::Session>) -> Result<Value, String> {
        let hosts = self.fleet.list().await.map_err(|e| e.to_string())?;
        let rollouts = self.rollouts.list().await.map_err(|e| e.to_string())?;
        Ok(json!({
            "version": baton_common::VERSION,
            "session": session_json(session),
            "hosts": hosts.iter().map(host_json).collect::<Vec<_>>(),
            "rollouts": rollouts.iter().map(rollout_summary).collect::<Vec<_>>(),
        }))
    }
}

fn session_json(session: Option<&tokens::Session>) -> Value {
    match session {
        Some(s) => json!({
            "role": s.role.as_str(),
            "who": s.who,
            "expires": rfc3339(s.expires),
            "can_act": crate::authz::decide_role(CONTROL_ROLLOUT, s.role).is_ok(),
        }),
        None => Value::Null,
    }
}

fn host_json(h: &HostView) -> Value {
    baton_common::host::to_json(h)
}

/// What every view of a rollout starts with.
fn rollout_head(r: &Rollout) -> Value {
    json!({
        "id": r.id,
        "state": r.state.as_str(),
        "created_at": rfc3339(r.created_at),
        "updated_at": rfc3339(r.updated_at),
        "error": r.error.clone().unwrap_or_default(),
        "held": r.held,
    })
}

fn rollout_summary(r: &Rollout) -> Value {
    let mut v = rollout_head(r);
    v["services"] = json!(
        r.services
            .iter()
            .map(|s| {
                let done = s
                    .hosts
                    .values()
                    .filter(|h| h.state == crate::rollout::HostState::Healthy)
                    .count();
                json!({
                    "name": s.name,
                    "version": s.version,
                    "state": s.state.as_str(),
                    "hosts": s.hosts.len(),
                    "done": done,
                })
            })
            .collect::<Vec<_>>()
    );
    v
}

/// Which hosts of each service a rollout's page shows: a page of them,
/// optionally only those in one state. Every service's counts by state
/// come whole, so a page of 10,000 hosts stays a page.
#[derive(Debug, Clone, Default)]
struct HostPage {
    /// The first host shown (in host id order), from 0.
    hosts_from: Option<usize>,
    /// How many hosts per service: [`HOSTS_PAGE`] by default, at most
    /// [`MAX_HOSTS_PAGE`].
    hosts_limit: Option<usize>,
    /// Only hosts in this state.
    state: Option<String>,
}

/// Hosts per service a rollout's page gets by default.
const HOSTS_PAGE: usize = 100;
/// The most hosts per service one answer holds.
const MAX_HOSTS_PAGE: usize = 1000;

fn host_row(
    id: &baton_common::host::HostId,
    h: &crate::rollout::machine::HostRun,
    deadline: Duration,
) -> Value {
    // While its health gate runs: when the host must be healthy by.
    let gate_deadline = (h.state == crate::rollout::HostState::Activating)
        .then_some(h.started_at)
        .flatten()
        .and_then(|t| t.checked_add(deadline))
        .map(rfc3339);
    json!({
        "host_id": id.to_string(),
        "state": h.state.as_str(),
        "from_version": h.from_version.clone().unwrap_or_default(),
        "to_version": h.to_version,
        "progress_percent": h.progress,
        "connected": h.connected,
        "started_at": h.started_at.map(rfc3339),
        "finished_at": h.finished_at.map(rfc3339),
        "gate_deadline": gate_deadline,
        "error": h.error.clone().unwrap_or_default(),
        "failure": h.failure.map(|k| k.as_str()),
        "probe": h.detail.probe,
        "log_tail": h.detail.log_tail,
    })
}

/// One rollout in full: services in dependency waves, steps, counts of
/// hosts by state and a page of hosts.
fn rollout_json(r: &Rollout, page: &HostPage) -> Value {
    let waves = crate::rollout::graph::waves(&crate::rollout::service_graph(r));
    let mut wave_of = vec![0; r.services.len()];
    for (w, wave) in waves.iter().enumerate() {
        for &i in wave {
            wave_of[i] = w;
        }
    }
    let by_wave: Vec<Vec<&str>> = waves
        .iter()
        .map(|wave| wave.iter().map(|i| r.services[*i].name.as_str()).collect())
        .collect();
    let from = page.hosts_from.unwrap_or(0);
    let limit = page
        .hosts_limit
        .unwrap_or(HOSTS_PAGE)
        .clamp(1, MAX_HOSTS_PAGE);
    let mut v = rollout_head(r);
    v["plan"] = json!(r.plan);
    v["waves"] = json!(by_wave);
    v["services"] = json!(
        r.services
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut counts: std::collections::BTreeMap<&str, usize> =
                    std::collections::BTreeMap::new();
                for h in s.hosts.values() {
                    *counts.entry(h.state.as_str()).or_default() += 1;
                }
                let wanted = |h: &crate::rollout::machine::HostRun| {
                    page.state
                        .as_deref()
                        .is_none_or(|st| h.state.as_str() == st)
                };
                let matching = s.hosts.values().filter(|h| wanted(h)).count();
                json!({
                    "name": s.name,
                    "version": s.version,
                    "state": s.state.as_str(),
                    "wave": wave_of.get(i).copied().unwrap_or(0) + 1,
                    "depends_on": s.depends_on,
                    "step": s.step + 1,
                    "steps": s.steps,
                    "max_parallel": s.max_parallel,
                    "min_healthy": s.min_healthy,
                    "healthy_deadline_ms": s.gate.healthy_deadline.as_millis() as u64,
                    "min_healthy_time_ms": s.gate.min_healthy_time.as_millis() as u64,
                    "counts": counts,
                    "analysis": s.verdicts.iter().map(|v| json!({
                        "name": v.name,
                        "kind": v.kind,
                        "step": v.step + 1,
                        "verdict": v.verdict.as_str(),
                        "reason": v.reason,
                        "value": v.value.map(|n| n.get()),
                        "baseline": v.baseline.map(|n| n.get()),
                        "threshold": v.threshold.map(|n| n.get()),
                        "p_value": v.p_value.map(|n| n.get()),
                    })).collect::<Vec<_>>(),
                    "baking": s.bake.map(|b| json!({"step": b.step + 1, "since": rfc3339(b.since)})),
                    "approval": s.approval && !s.approved,
                    "hosts_total": s.hosts.len(),
                    "hosts_matching": matching,
                    "hosts_from": from,
                    "hosts": s.hosts.iter()
                        .filter(|(_, h)| wanted(h))
                        .skip(from)
                        .take(limit)
                        .map(|(id, h)| host_row(id, h, s.gate.healthy_deadline))
                        .collect::<Vec<_>>(),
                })
            })
            .collect::<Vec<_>>()
    );
    v
}

fn rollout_error(e: RolloutError) -> Response {
    match e {
        RolloutError::NotFound(_) => problem(StatusCode::NOT_FOUND, e.to_string()),
        RolloutError::Conflict(_) => problem(StatusCode::CONFLICT, e.to_string()),
        RolloutError::Invalid(_) => problem(StatusCode::BAD_REQUEST, e.to_string()),
        RolloutError::Store(_) | RolloutError::Stopped => {
            problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

async fn state(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    let session = match d.reader(&headers).await {
        Ok(s) => s,
        Err(refused) => return refused,
    };
    match d.snapshot(session.as_ref()).await {
        Ok(v) => api(StatusCode::OK, v),
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

#[derive(serde::Deserialize)]
struct EventsQuery {
    /// Events from this `seq` on (what the page has not seen).
    since: Option<u64>,
    /// The page of events before this `seq` (older ones).
    before: Option<u64>,
    // The page of hosts (not `flatten`ed: a query string's numbers do
    // not survive it).
    hosts_from: Option<usize>,
    hosts_limit: Option<usize>,
    state: Option<String>,
}

/// One rollout with a page of its hosts and of its events: the newest
/// [`EVENTS_TAIL`] events, `?since=SEQ` those from SEQ on (what is new),
/// or `?before=SEQ` the [`EVENTS_PAGE`] before SEQ (older ones). Hosts:
/// see [`HostPage`].
async fn rollout(
    State(d): State<Dashboard>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = d.reader(&headers).await {
        return refused;
    }
    let r = match d.rollouts.get(id.clone()).await {
        Ok(r) => r,
        Err(e) => return rollout_error(e),
    };
    let events = match (q.since, q.before) {
        (Some(since), _) => d.rollouts.events(&id, since, EVENTS_PAGE).await,
        (None, Some(before)) => d.rollouts.events_before(&id, before, EVENTS_PAGE).await,
        (None, None) => d.rollouts.events_before(&id, u64::MAX, EVENTS_TAIL).await,
    };
    let events = match events {
        Ok(e) => e,
        Err(e) => return rollout_error(e),
    };
    let hosts = HostPage {
        hosts_from: q.hosts_from,
        hosts_limit: q.hosts_limit,
        state: q.state,
    };
    let mut body = rollout_json(&r, &hosts);
    // Each check's latest samples, for its chart (absent when unreadable:
    // the verdicts themselves are in the rollout).
    if let Ok(mut samples) = d.rollouts.analysis_samples(&id).await
        && let Some(services) = body["services"].as_array_mut()
    {
        for (i, s) in services.iter_mut().enumerate() {
            s["charts"] = json!(
                samples
                    .remove(&i)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(step, c)| json!({
                        "check": c.check,
                        "step": step + 1,
                        "new": c.new,
                        "baseline": c.baseline,
                    }))
                    .collect::<Vec<_>>()
            );
        }
    }
    body["events"] = match serde_json::to_value(events) {
        Ok(events) => events,
        Err(e) => {
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the events of rollout {id}: {e}"),
            );
        }
    };
    api(StatusCode::OK, body)
}

/// The Control API call reading a log stands for.
const STREAM_LOGS: &str = "StreamLogs";
/// The most of a log the host page shows.
const HOST_LOG_LINES: u32 = 50;
/// How long the host page waits for a log.
const HOST_LOG_WAIT: Duration = Duration::from_secs(10);
/// The most bytes of a log one answer holds.
const HOST_LOG_BYTES: usize = 256 * 1024;

/// The last lines of a service's log on a host, for a signed-in operator
/// (the role `baton logs` needs; audited like it).
async fn host_logs(
    State(d): State<Dashboard>,
    Path((id, service)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(session) = d.session(&headers).await else {
        return problem(
            StatusCode::UNAUTHORIZED,
            "sign in with a token from `baton dashboard token --role operator` to read logs",
        );
    };
    let who = format!("{} (dashboard)", session.who);
    if let Err(why) = crate::authz::decide_role(STREAM_LOGS, session.role) {
        d.audit
            .record(&who, session.role.as_str(), STREAM_LOGS, "denied", &why)
            .await;
        return problem(StatusCode::FORBIDDEN, why);
    }
    let Ok(host) = baton_common::host::HostId::try_from(id.as_str()) else {
        return problem(StatusCode::BAD_REQUEST, format!("{id:?} is not a host id"));
    };
    let result = read_log(&d, &host, &service).await;
    let (outcome, error) = match &result {
        Ok(_) => ("ok", format!("host {host} service {service}")),
        Err((_, e)) => ("failed", format!("host {host} service {service}: {e}")),
    };
    d.audit
        .record(&who, session.role.as_str(), STREAM_LOGS, outcome, &error)
        .await;
    match result {
        Ok(text) => api(StatusCode::OK, json!({ "text": text })),
        Err((status, e)) => problem(status, e),
    }
}

async fn read_log(
    d: &Dashboard,
    host: &baton_common::host::HostId,
    service: &str,
) -> Result<String, (StatusCode, String)> {
    use crate::logs::Next;
    let unavailable = |e: String| (StatusCode::SERVICE_UNAVAILABLE, e);
    baton_common::host::validate_name(service)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("service: {e}")))?;
    let agent = d
        .fleet
        .agent_sender(host)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let mut sub = d
        .fleet
        .logs()
        .open(host.clone(), agent, service, HOST_LOG_LINES, false)
        .map_err(|e| unavailable(e.to_string()))?;
    let collect = async {
        let mut text = String::new();
        loop {
            match sub.next().await {
                Next::Text(t) => {
                    text.push_str(&t);
                    if text.len() > HOST_LOG_BYTES {
                        return Ok(text);
                    }
                }
                Next::End => return Ok(text),
                Next::Failed(e) => return Err((StatusCode::NOT_FOUND, e)),
                Next::Lost => return Err(unavailable(format!("host {host}'s stream ended"))),
            }
        }
    };
    tokio::time::timeout(HOST_LOG_WAIT, collect)
        .await
        .map_err(|_| unavailable(format!("host {host} did not answer in time")))?
}

async fn history(
    State(d): State<Dashboard>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = d.reader(&headers).await {
        return refused;
    }
    let Ok(host) = baton_common::host::HostId::try_from(id.as_str()) else {
        return problem(StatusCode::BAD_REQUEST, format!("{id:?} is not a host id"));
    };
    match d.rollouts.list().await {
        Ok(all) => api(
            StatusCode::OK,
            Value::Array(
                crate::rollout::host_history(&all, &host)
                    .into_iter()
                    .map(|a| {
                        json!({
                            "rollout_id": a.rollout_id,
                            "rollout_state": a.rollout_state.as_str(),
                            "service": a.service,
                            "from_version": a.from_version.unwrap_or_default(),
                            "to_version": a.to_version,
                            "state": a.state.as_str(),
                            "started_at": a.started_at.map(rfc3339),
                            "finished_at": a.finished_at.map(rfc3339),
                            "error": a.error.unwrap_or_default(),
                        })
                    })
                    .collect(),
            ),
        ),
        Err(e) => rollout_error(e),
    }
}

/// Server-sent events: a `state` event (the body of `/api/state`) now and
/// after every change of the fleet or of a rollout, at most one per
/// [`COALESCE`].
async fn live(
    State(d): State<Dashboard>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let session = match d.reader(&headers).await {
        Ok(s) => s,
        Err(refused) => return refused,
    };
    let permit = match d.live.take(session.is_some(), peer.ip()) {
        Ok(p) => p,
        Err(why) => return problem(StatusCode::SERVICE_UNAVAILABLE, why),
    };
    let Ok((_, mut hosts)) = d.fleet.watch().await else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the coordinator is stopping",
        );
    };
    let mut rollouts = d.rollouts.changes();
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(4);
    tokio::spawn(async move {
        let _permit = permit;
        loop {
            let body = match d.snapshot(session.as_ref()).await {
                Ok(v) => v.to_string(),
                Err(_) => return,
            };
            // A browser that stopped reading must not keep this task (and
            // the registry handle it holds) past shutdown.
            tokio::select! {
                r = tx.send(Ok(SseEvent::default().event("state").data(body))) => if r.is_err() { return },
                _ = d.shutdown.cancelled() => return,
            }
            tokio::select! {
                _ = d.shutdown.cancelled() => return,
                _ = tx.closed() => return,
                r = hosts.recv() => if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) { return },
                r = rollouts.changed() => if r.is_err() { return },
            }
            tokio::time::sleep(COALESCE).await;
            // Everything up to now is in the next snapshot.
            while let Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) =
                hosts.try_recv()
            {}
            rollouts.mark_unchanged();
        }
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[derive(serde::Deserialize)]
struct Login {
    token: String,
}

async fn login(State(d): State<Dashboard>, Json(body): Json<Login>) -> Response {
    let token = body.token.trim();
    let session = match tokens::check(d.store.as_ref(), token).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            // Logged, not audited: anyone reaching the page could fill
            // the audit log (and push real entries out of it).
            warn!("dashboard sign-in refused: unknown or expired token");
            return problem(
                StatusCode::UNAUTHORIZED,
                "unknown or expired token; make one with `baton dashboard token --role operator`",
            );
        }
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    info!(who = %session.who, role = %session.role, "dashboard sign-in");
    let max_age = session
        .expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default()
        .as_secs();
    let cookie = format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}");
    let mut response = api(
        StatusCode::OK,
        json!({ "session": session_json(Some(&session)) }),
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// Signs out: the token stops working (everywhere it was used) and the
/// cookie is cleared.
async fn logout(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    if let Some(token) = cookie_token(&headers)
        && let Err(e) = tokens::revoke(d.store.as_ref(), &token).await
    {
        return problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    let mut response = api(StatusCode::OK, json!({ "session": null }));
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("baton_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    response
}

async fn act(
    State(d): State<Dashboard>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let op = match action.as_str() {
        "pause" => Operator::Pause,
        "resume" => Operator::Resume,
        "abort" => Operator::Abort,
        "promote" => Operator::Promote,
        "rollback" => Operator::Rollback,
        other => {
            return problem(
                StatusCode::NOT_FOUND,
                format!("no action {other:?}: pause, resume, abort, promote or rollback"),
            );
        }
    };
    if !headers.contains_key(ACTION_HEADER) {
        return problem(
            StatusCode::FORBIDDEN,
            format!("actions must carry the {ACTION_HEADER} header"),
        );
    }
    let Some(session) = d.session(&headers).await else {
        // Logged, not audited (see `login`).
        warn!(%action, "dashboard action refused: not signed in");
        return problem(
            StatusCode::UNAUTHORIZED,
            "sign in with a token from `baton dashboard token --role operator` to act",
        );
    };
    let who = format!("{} (dashboard)", session.who);
    // The same table as the gRPC call it stands for.
    if let Err(why) = crate::authz::decide_role(CONTROL_ROLLOUT, session.role) {
        d.audit
            .record(&who, session.role.as_str(), CONTROL_ROLLOUT, "denied", &why)
            .await;
        return problem(StatusCode::FORBIDDEN, why);
    }
    let result = d.rollouts.control(id, op, who.clone()).await;
    let (outcome, error) = match &result {
        Ok(_) => ("ok", String::new()),
        Err(e) => ("failed", e.to_string()),
    };
    d.audit
        .record(
            &who,
            session.role.as_str(),
            CONTROL_ROLLOUT,
            outcome,
            &error,
        )
        .await;
    match result {
        Ok(r) => api(StatusCode::OK, rollout_json(&r, &HostPage::default())),
        Err(e) => rollout_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_common::tls::Role;

    #[test]
    fn a_rollout_of_ten_thousand_hosts_is_drawn_as_counts_and_a_page() {
        let mut r =
            crate::rollout::machine::tests_support::single("r-1", "web", 10_000, String::new());
        for (i, h) in r.services[0].hosts.values_mut().enumerate() {
            if i % 10 == 0 {
                h.state = crate::rollout::HostState::Failed;
            }
        }
        let v = rollout_json(&r, &HostPage::default());
        let s = &v["services"][0];
        assert_eq!(s["hosts_total"], 10_000);
        assert_eq!(s["counts"]["failed"], 1_000);
        assert_eq!(s["counts"]["pending"], 9_000);
        assert_eq!(s["hosts"].as_array().unwrap().len(), HOSTS_PAGE);
        // A page of the failed ones, from the 950th: the last 50.
        let page = HostPage {
            hosts_from: Some(950),
            hosts_limit: Some(100_000),
            state: Some("failed".into()),
        };
        let v = rollout_json(&r, &page);
        let hosts = v["services"][0]["hosts"].as_array().unwrap();
        assert_eq!(hosts.len(), 50);
        assert!(hosts.iter().all(|h| h["state"] == "failed"));
        assert_eq!(v["services"][0]["hosts_matching"], 1_000);
        // The answer stays small whatever the fleet.
        assert!(v.to_string().len() < 100_000, "{}", v.to_string().len());
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; baton_session=btd1-ab; b=2"),
        );
        assert_eq!(cookie_token(&h).as_deref(), Some("btd1-ab"));
        assert_eq!(cookie_token(&HeaderMap::new()), None);
    }

    #[test]
    fn only_addresses_and_localhost_read_without_a_session() {
        let host = |h: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, HeaderValue::from_static(h));
            host_is_address(&m)
        };
        assert!(host("127.0.0.1:7080"));
        assert!(host("localhost:7080"));
        assert!(host("[::1]:7080"));
        assert!(host("10.0.0.5"));
        assert!(!host("attacker.example:7080"));
        assert!(!host("localhost.attacker.example"));
        assert!(!host_is_address(&HeaderMap::new()));
    }

    #[test]
    fn dashboard_actions_are_checked_by_the_grpc_table() {
        assert_eq!(
            crate::authz::required(CONTROL_ROLLOUT),
            Some(Role::Operator)
        );
        assert!(crate::authz::decide_role(CONTROL_ROLLOUT, Role::Viewer).is_err());
        assert!(crate::authz::decide_role(CONTROL_ROLLOUT, Role::Operator).is_ok());
        assert!(crate::authz::decide_role("NoSuchCall", Role::Admin).is_err());
    }

    #[test]
    fn assets_load_only_from_this_origin() {
        assert!(!INDEX_HTML.contains("<script>"), "no inline script");
        assert!(!INDEX_HTML.contains("http://") && !INDEX_HTML.contains("https://"));
        assert!(INDEX_HTML.contains("/assets/app.js"));
    }
}
