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

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use baton_common::host::HostView;
use baton_common::time::rfc3339;
use baton_common::tls::Role;
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
/// The least time between two live updates to one browser: bursts of
/// changes (a batch of hosts turning healthy) are sent as one.
const COALESCE: Duration = Duration::from_millis(150);

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
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .with_state(dashboard)
}

/// Serves the dashboard on `listener` until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, dashboard: Dashboard) -> std::io::Result<()> {
    let shutdown = dashboard.shutdown.clone();
    axum::serve(listener, router(dashboard))
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
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == COOKIE).then(|| v.to_owned())
        })
}

impl Dashboard {
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
            "can_act": s.role >= Role::Operator,
        }),
        None => Value::Null,
    }
}

fn host_json(h: &HostView) -> Value {
    crate::cli::hosts::to_json(h)
}

fn rollout_summary(r: &Rollout) -> Value {
    json!({
        "id": r.id,
        "state": r.state.as_str(),
        "created_at": rfc3339(r.created_at),
        "updated_at": rfc3339(r.updated_at),
        "error": r.error.clone().unwrap_or_default(),
        "services": r.services.iter().map(|s| {
            let done = s.hosts.values().filter(|h| h.state == crate::rollout::HostState::Healthy).count();
            json!({
                "name": s.name,
                "version": s.version,
                "state": s.state.as_str(),
                "hosts": s.hosts.len(),
                "done": done,
            })
        }).collect::<Vec<_>>(),
    })
}

/// One rollout in full: services in dependency waves, steps and hosts.
fn rollout_json(r: &Rollout) -> Value {
    let mut wave_of: BTreeMap<&str, usize> = BTreeMap::new();
    // Services are stored in topological order: a service's wave is one
    // past the latest of its dependencies'.
    for s in &r.services {
        let w = s
            .depends_on
            .iter()
            .filter_map(|d| wave_of.get(d.as_str()))
            .map(|w| w + 1)
            .max()
            .unwrap_or(0);
        wave_of.insert(&s.name, w);
    }
    let waves = wave_of.values().copied().max().map_or(0, |m| m + 1);
    let mut by_wave: Vec<Vec<&str>> = vec![Vec::new(); waves];
    for s in &r.services {
        by_wave[wave_of[s.name.as_str()]].push(&s.name);
    }
    json!({
        "id": r.id,
        "state": r.state.as_str(),
        "created_at": rfc3339(r.created_at),
        "updated_at": rfc3339(r.updated_at),
        "error": r.error.clone().unwrap_or_default(),
        "plan": r.plan,
        "waves": by_wave,
        "services": r.services.iter().map(|s| json!({
            "name": s.name,
            "version": s.version,
            "state": s.state.as_str(),
            "wave": wave_of[s.name.as_str()] + 1,
            "depends_on": s.depends_on,
            "step": s.step + 1,
            "steps": s.steps,
            "max_parallel": s.max_parallel,
            "min_healthy": s.min_healthy,
            "hosts": s.hosts.iter().map(|(id, h)| json!({
                "host_id": id.to_string(),
                "state": h.state.as_str(),
                "from_version": h.from_version.clone().unwrap_or_default(),
                "to_version": h.to_version,
                "progress_percent": h.progress,
                "connected": h.connected,
                "started_at": h.started_at.map(rfc3339),
                "finished_at": h.finished_at.map(rfc3339),
                "error": h.error.clone().unwrap_or_default(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
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
    let session = d.session(&headers).await;
    match d.snapshot(session.as_ref()).await {
        Ok(v) => api(StatusCode::OK, v),
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn rollout(State(d): State<Dashboard>, Path(id): Path<String>) -> Response {
    let r = match d.rollouts.get(id.clone()).await {
        Ok(r) => r,
        Err(e) => return rollout_error(e),
    };
    let events = match d.rollouts.events(id).await {
        Ok(e) => e,
        Err(e) => return rollout_error(e),
    };
    let mut body = rollout_json(&r);
    body["events"] = serde_json::to_value(events).unwrap_or_default();
    api(StatusCode::OK, body)
}

async fn history(State(d): State<Dashboard>, Path(id): Path<String>) -> Response {
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
async fn live(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    let session = d.session(&headers).await;
    let Ok((_, mut hosts)) = d.fleet.watch().await else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the coordinator is stopping",
        );
    };
    let mut rollouts = d.rollouts.changes();
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(4);
    tokio::spawn(async move {
        loop {
            let body = match d.snapshot(session.as_ref()).await {
                Ok(v) => v.to_string(),
                Err(_) => return,
            };
            if tx
                .send(Ok(SseEvent::default().event("state").data(body)))
                .await
                .is_err()
            {
                return;
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
            d.audit
                .record(
                    "dashboard",
                    "",
                    "DashboardLogin",
                    "denied",
                    "unknown or expired token",
                )
                .await;
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

async fn logout() -> Response {
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
        d.audit
            .record("dashboard", "", "ControlRollout", "denied", "not signed in")
            .await;
        return problem(
            StatusCode::UNAUTHORIZED,
            "sign in with a token from `baton dashboard token --role operator` to act",
        );
    };
    let who = format!("{} (dashboard)", session.who);
    if session.role < Role::Operator {
        let why = format!(
            "role {} may not act on rollouts: it needs operator",
            session.role
        );
        d.audit
            .record(
                &who,
                session.role.as_str(),
                "ControlRollout",
                "denied",
                &why,
            )
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
            "ControlRollout",
            outcome,
            &error,
        )
        .await;
    match result {
        Ok(r) => api(StatusCode::OK, rollout_json(&r)),
        Err(e) => rollout_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn assets_load_only_from_this_origin() {
        assert!(!INDEX_HTML.contains("<script>"), "no inline script");
        assert!(!INDEX_HTML.contains("http://") && !INDEX_HTML.contains("https://"));
        assert!(INDEX_HTML.contains("/assets/app.js"));
    }
}
