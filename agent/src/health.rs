//! Health checks and the health gate a host passes before an upgrade moves
//! on.
//!
//! [`check_once`] runs one check of a [`HealthSpec`]; [`wait_healthy`] runs
//! checks until the service has passed continuously for the gate's
//! `min_healthy_time`, and fails on the deadline, when the process dies, or
//! on cancel. The gate is built for speed: before the first pass it retries
//! fast (10 ms, doubling, capped at the interval), and after it a check is
//! scheduled exactly at `first pass + min_healthy_time`, so a healthy
//! service is declared healthy at that instant rather than up to an interval
//! later.

use std::path::Path;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::service::{Check, HealthSpec, resolve};

/// The first retry delay before a check has ever passed.
const FIRST_RETRY: Duration = Duration::from_millis(10);

/// The most of a failing HTTP answer's body read.
const MAX_STATUS_LINE: usize = 8 * 1024;

/// What "healthy" means for one host during an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    /// How long the checks must pass without a failure in between.
    pub min_healthy_time: Duration,
    /// How long the service has, from the start of the wait, to become
    /// healthy.
    pub healthy_deadline: Duration,
}

/// Runs one check, bounded by `spec.timeout`. `release_dir` is the working
/// directory of `exec` checks and what their relative program is resolved
/// against.
pub async fn check_once(spec: &HealthSpec, release_dir: &Path) -> Result<(), String> {
    let timeout = spec.timeout;
    let (what, result) = match &spec.check {
        Check::Http { url } => (
            format!("GET {url}"),
            tokio::time::timeout(timeout, http_get(url)).await,
        ),
        Check::Tcp { address } => (
            format!("connect {address}"),
            tokio::time::timeout(timeout, tcp_connect(address)).await,
        ),
        Check::Grpc { address, service } => (
            format!("gRPC health check of {service:?} at {address}"),
            tokio::time::timeout(timeout, grpc_check(address, service, timeout)).await,
        ),
        // The exec check handles its own timeout: the command must be killed,
        // not just abandoned.
        Check::Exec { command, run_as } => {
            return exec(command, run_as.as_ref(), release_dir, timeout).await;
        }
    };
    result.unwrap_or_else(|_| Err(format!("{what} timed out after {}", fmt_duration(timeout))))
}

/// Why a health gate ended without the release turning healthy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    /// A rollback or an abort cancelled it.
    #[error("cancelled")]
    Cancelled,
    /// The process exited while the gate ran.
    #[error("the process exited during the health check")]
    Exited,
    /// The process's supervisor went away while the gate ran.
    #[error("the supervisor stopped during the health check")]
    SupervisorStopped,
    /// The checks did not pass for `min_healthy_time` by the deadline.
    #[error("not healthy within {within}: {last}")]
    NotHealthy {
        /// The deadline, as written.
        within: String,
        /// The last check's error, or how long it had been passing.
        last: String,
    },
}

impl GateError {
    /// The kind of the command failure this makes.
    pub fn kind(&self) -> baton_common::command::FailureKind {
        use baton_common::command::FailureKind;
        match self {
            Self::Cancelled => FailureKind::Cancelled,
            Self::Exited | Self::SupervisorStopped => FailureKind::Start,
            Self::NotHealthy { .. } => FailureKind::NotHealthy,
        }
    }
}

/// Waits until the service is healthy and returns how long that took.
///
/// Healthy means: checks have passed continuously for
/// `gate.min_healthy_time` (any failure restarts the clock); without a
/// health spec, the process is still alive after `min_healthy_time`. Fails
/// with "not healthy within …: <last check error>" at `gate.healthy_deadline`,
/// when `alive` turns false, and on `cancel`.
pub async fn wait_healthy(
    spec: Option<&HealthSpec>,
    release_dir: &Path,
    gate: &Gate,
    alive: &mut watch::Receiver<bool>,
    cancel: &CancellationToken,
) -> Result<Duration, GateError> {
    let start = Instant::now();
    let result = wait_passing(spec, release_dir, gate, alive, cancel).await;
    let took = start.elapsed();
    // A gate that gives up is a failed activation (counted with the
    // commands), not a failed check of a service that was healthy: the
    // probes a starting process fails before it answers are not failures.
    crate::metrics::METRICS.health_wait.observe(took);
    // Outside a command (the tests) there is nobody to tell.
    let _ = crate::metrics::HEALTH_WAIT.try_with(|w| w.set(took));
    result
}

/// [`wait_healthy`] without recording it: for readiness before a socket
/// handover, which is not the health gate.
pub async fn wait_passing(
    spec: Option<&HealthSpec>,
    release_dir: &Path,
    gate: &Gate,
    alive: &mut watch::Receiver<bool>,
    cancel: &CancellationToken,
) -> Result<Duration, GateError> {
    let start = Instant::now();
    let deadline = start + gate.healthy_deadline;
    // Without a spec, a "check" always passes and only the process's
    // liveness (watched below) and the clock matter.
    let interval = spec.map_or(gate.min_healthy_time, |s| s.interval);
    let mut retry = FIRST_RETRY.min(interval);
    let mut first_pass: Option<Instant> = None;
    let mut next_check = start;
    let mut last_error = String::from("no check has completed yet");

    loop {
        let step = async {
            tokio::time::sleep_until(next_check).await;
            match spec {
                Some(spec) => check_once(spec, release_dir).await,
                None => Ok(()),
            }
        };
        let result = tokio::select! {
            biased;
            () = cancel.cancelled() => return Err(GateError::Cancelled),
            exited = alive.wait_for(|alive| !*alive) => {
                return Err(match exited {
                    Ok(_) => GateError::Exited,
                    Err(_) => GateError::SupervisorStopped,
                });
            }
            result = step => result,
            () = tokio::time::sleep_until(deadline) => {
                if let Some(first) = first_pass {
                    last_error = format!(
                        "passing for {} of the required {}",
                        fmt_duration(Instant::now() - first),
                        fmt_duration(gate.min_healthy_time)
                    );
                }
                return Err(GateError::NotHealthy {
                    within: fmt_duration(gate.healthy_deadline),
                    last: last_error,
                });
            }
        };
        let now = Instant::now();
        match result {
            Ok(()) => {
                let first = *first_pass.get_or_insert(now);
                let healthy_at = first + gate.min_healthy_time;
                if now >= healthy_at {
                    return Ok(now - start);
                }
                next_check = (now + interval).min(healthy_at);
                retry = FIRST_RETRY.min(interval);
            }
            Err(error) => {
                tracing::debug!(%error, "health check failed");
                last_error = error;
                first_pass = None;
                next_check = now + retry;
                retry = (retry * 2).min(interval);
            }
        }
    }
}

async fn tcp_connect(address: &str) -> Result<(), String> {
    connect(address).await.map(drop)
}

async fn connect(address: &str) -> Result<TcpStream, String> {
    TcpStream::connect(address)
        .await
        .map_err(|e| format!("connect {address}: {}", io_message(&e)))
}

/// The HTTP client of every `http` check (reqwest over rustls, the
/// system's CA certificates for `https://`): no redirects followed, no
/// proxy, and no connection kept between checks, so each check reaches
/// the process listening now.
static HTTP: std::sync::LazyLock<Result<reqwest::Client, String>> =
    std::sync::LazyLock::new(|| {
        reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_max_idle_per_host(0)
            .user_agent(concat!("baton-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))
    });

/// The innermost I/O error of `e`, if any.
fn io_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    let mut found = None;
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            found = Some(io);
        }
        cur = err.source();
    }
    found
}

/// What went wrong with a request, in a line: `connect HOST:PORT: why`
/// when it never connected, else `GET URL: why`.
fn http_error(url: &str, e: &reqwest::Error) -> String {
    if e.is_connect() {
        let authority = e
            .url()
            .map(|u| {
                format!(
                    "{}:{}",
                    u.host_str().unwrap_or_default(),
                    u.port_or_known_default().unwrap_or_default()
                )
            })
            .unwrap_or_default();
        let why = match io_cause(e) {
            Some(io) => io_message(io),
            None => baton_common::error_chain(e),
        };
        return format!("connect {authority}: {why}");
    }
    format!("GET {url}: {}", baton_common::error_chain(e))
}

/// `GET url`: healthy on a 2xx answer; otherwise the error quotes the
/// status and the start of the body.
async fn http_get(url: &str) -> Result<(), String> {
    let client = HTTP.as_ref().map_err(Clone::clone)?;
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| http_error(url, &e))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = body_prefix(response).await;
    let code = status.as_u16();
    if body.is_empty() {
        Err(format!("GET {url} returned {code}"))
    } else {
        Err(format!("GET {url} returned {code}: {body}"))
    }
}

/// The most of a failing answer's body quoted in the error.
const MAX_BODY_QUOTE: usize = 200;

/// The start of a response's body on one line (whitespace runs become one
/// space), at most [`MAX_BODY_QUOTE`] characters, waiting at most briefly.
async fn body_prefix(mut response: reqwest::Response) -> String {
    let mut buf = Vec::new();
    let read = async {
        while buf.len() < MAX_STATUS_LINE {
            match response.chunk().await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), read).await;
    let text = String::from_utf8_lossy(&buf);
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    baton_common::text::prefix(&one_line, MAX_BODY_QUOTE)
}

async fn grpc_check(address: &str, service: &str, timeout: Duration) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let what = format!("gRPC health check of {service:?} at {address}");
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("{what}: {}", baton_common::error_chain(&e)))?
        .connect_timeout(timeout);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect {address}: {}", baton_common::error_chain(&e)))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|status| format!("{what}: {:?}: {}", status.code(), status.message()))?;
    let status = response.into_inner().status;
    if status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        let name = ServingStatus::try_from(status)
            .map_or_else(|_| status.to_string(), |s| s.as_str_name().to_owned());
        Err(format!("{what} returned {name}"))
    }
}

/// Runs the command in its own process group and kills the group if it
/// outlives `timeout`, so a hung check leaves nothing behind.
async fn exec(
    command: &[String],
    run_as: Option<&crate::service::RunAs>,
    release_dir: &Path,
    timeout: Duration,
) -> Result<(), String> {
    let Some((program, args)) = command.split_first() else {
        return Err("exec: the command is empty".to_owned());
    };
    let what = format!("exec {program}");
    let mut cmd = tokio::process::Command::new(resolve(release_dir, program));
    if let Some(r) = run_as {
        r.apply(&mut cmd);
    }
    let mut child = cmd
        .env_remove("BATON_ENROLL_TOKEN")
        .args(args)
        .current_dir(release_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {}", io_message(&e)))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!(
            "{what} {}",
            crate::supervisor::describe_exit(status)
        )),
        Ok(Err(e)) => Err(format!("{what}: {}", io_message(&e))),
        Err(_) => {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                // The group may already be gone; nothing to do then.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill().await;
            Err(format!("{what} timed out after {}", fmt_duration(timeout)))
        }
    }
}

/// `Connection refused (os error 111)` → `connection refused`: the
/// operator-facing form used in check errors.
pub(crate) fn io_message(error: &std::io::Error) -> String {
    let text = error.to_string();
    let text = match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_owned(),
        _ => text,
    };
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (Some(first), Some(second))
            if first.is_ascii_uppercase() && !second.is_ascii_uppercase() =>
        {
            first.to_ascii_lowercase().to_string() + &text[1..]
        }
        _ => text,
    }
}

fn fmt_duration(d: Duration) -> String {
    // Whole milliseconds read better than humantime's nanosecond tails.
    let millis = Duration::from_millis(d.as_millis().try_into().unwrap_or(u64::MAX));
    if millis.is_zero() && !d.is_zero() {
        return humantime::format_duration(d).to_string();
    }
    humantime::format_duration(millis).to_string()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A tiny HTTP responder: answers each request with the next status from
    /// `script` (repeating the last one), counting requests.
    struct Responder {
        port: u16,
        hits: Arc<AtomicUsize>,
        status: Arc<Mutex<Vec<u16>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Responder {
        async fn start(script: &[u16]) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let hits = Arc::new(AtomicUsize::new(0));
            let status = Arc::new(Mutex::new(script.to_vec()));
            let task = tokio::spawn({
                let hits = hits.clone();
                let status = status.clone();
                async move {
                    loop {
                        let Ok((mut stream, _)) = listener.accept().await else {
                            return;
                        };
                        let code = {
                            let mut script = status.lock().unwrap();
                            if script.len() > 1 {
                                script.remove(0)
                            } else {
                                script[0]
                            }
                        };
                        hits.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(async move {
                            let mut buf = Vec::new();
                            let mut chunk = [0u8; 512];
                            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                                match stream.read(&mut chunk).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                                }
                            }
                            let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                            assert!(head.starts_with("get /healthz?x=1 http/1.1\r\n"), "{head}");
                            assert!(head.contains("\r\nhost: 127.0.0.1:"), "{head}");
                            let body =
                                format!("HTTP/1.1 {code} Whatever\r\nContent-Length: 0\r\n\r\n");
                            let _ = stream.write_all(body.as_bytes()).await;
                        });
                    }
                }
            });
            Self {
                port,
                hits,
                status,
                task,
            }
        }

        fn url(&self) -> String {
            format!("http://127.0.0.1:{}/healthz?x=1", self.port)
        }

        fn spec(&self, interval: Duration) -> HealthSpec {
            HealthSpec {
                check: Check::Http { url: self.url() },
                interval,
                timeout: Duration::from_secs(2),
            }
        }

        fn set(&self, script: &[u16]) {
            *self.status.lock().unwrap() = script.to_vec();
        }
    }

    impl Drop for Responder {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// A port with nothing listening on it (bound, then released).
    async fn closed_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    }

    fn spec(check: Check) -> HealthSpec {
        HealthSpec {
            check,
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(2),
        }
    }

    fn gate(min: u64, deadline: u64) -> Gate {
        Gate {
            min_healthy_time: Duration::from_millis(min),
            healthy_deadline: Duration::from_millis(deadline),
        }
    }

    #[tokio::test]
    async fn http_check_passes_on_2xx_only() {
        let dir = tempfile::tempdir().unwrap();
        let server = Responder::start(&[200, 204, 503]).await;
        let s = server.spec(Duration::from_secs(1));
        assert_eq!(check_once(&s, dir.path()).await, Ok(()));
        assert_eq!(check_once(&s, dir.path()).await, Ok(()));
        assert_eq!(
            check_once(&s, dir.path()).await,
            Err(format!("GET {} returned 503", server.url()))
        );
        let port = closed_port().await;
        let refused = spec(Check::Http {
            url: format!("http://127.0.0.1:{port}/healthz"),
        });
        assert_eq!(
            check_once(&refused, dir.path()).await,
            Err(format!("connect 127.0.0.1:{port}: connection refused"))
        );
        // https is spoken (TLS, checked against the system's CAs): a
        // plain-HTTP server on the other end fails the handshake.
        let plain = Responder::start(&[200]).await;
        let https = spec(Check::Http {
            url: format!("https://127.0.0.1:{}/healthz", plain.port),
        });
        let err = check_once(&https, dir.path()).await.unwrap_err();
        assert!(
            err.starts_with(&format!("GET https://127.0.0.1:{}/healthz", plain.port))
                || err.starts_with("connect 127.0.0.1"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn http_check_times_out() {
        let dir = tempfile::tempdir().unwrap();
        // Accepts (via the backlog) but never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let s = HealthSpec {
            check: Check::Http { url: url.clone() },
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(200),
        };
        assert_eq!(
            check_once(&s, dir.path()).await,
            Err(format!("GET {url} timed out after 200ms"))
        );
    }

    #[tokio::test]
    async fn tcp_check() {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = spec(Check::Tcp {
            address: listener.local_addr().unwrap().to_string(),
        });
        assert_eq!(check_once(&open, dir.path()).await, Ok(()));
        let port = closed_port().await;
        let closed = spec(Check::Tcp {
            address: format!("127.0.0.1:{port}"),
        });
        assert_eq!(
            check_once(&closed, dir.path()).await,
            Err(format!("connect 127.0.0.1:{port}: connection refused"))
        );
    }

    #[tokio::test]
    async fn exec_check_runs_in_the_release_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("marker"), "").unwrap();
        let sh = |script: &str| {
            spec(Check::Exec {
                command: vec!["/bin/sh".into(), "-c".into(), script.into()],
                run_as: None,
            })
        };
        assert_eq!(check_once(&sh("test -e marker"), dir.path()).await, Ok(()));
        assert_eq!(
            check_once(&sh("exit 1"), dir.path()).await,
            Err("exec /bin/sh exited with status 1".into())
        );
        let missing = spec(Check::Exec {
            command: vec!["bin/nope".into()],
            run_as: None,
        });
        let error = check_once(&missing, dir.path()).await.unwrap_err();
        assert_eq!(
            error,
            "exec bin/nope: cannot start: no such file or directory"
        );

        let mut slow = sh("echo $$ > pid; exec sleep 30");
        slow.timeout = Duration::from_millis(300);
        let started = std::time::Instant::now();
        assert_eq!(
            check_once(&slow, dir.path()).await,
            Err("exec /bin/sh timed out after 300ms".into())
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // The hung command was killed, not abandoned.
        let pid: i32 = std::fs::read_to_string(dir.path().join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let limit = std::time::Instant::now() + Duration::from_secs(5);
        while crate::supervisor::is_alive(pid.unsigned_abs()) {
            assert!(
                std::time::Instant::now() < limit,
                "the timed-out check is still running"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn grpc_check_against_tonic_health() {
        use tokio_stream::wrappers::TcpListenerStream;
        use tonic_health::ServingStatus;

        let dir = tempfile::tempdir().unwrap();
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("api.v1.Api", ServingStatus::Serving)
            .await;
        reporter
            .set_service_status("api.v1.Down", ServingStatus::NotServing)
            .await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let grpc = |service: &str| {
            spec(Check::Grpc {
                address: address.clone(),
                service: service.into(),
            })
        };
        assert_eq!(check_once(&grpc(""), dir.path()).await, Ok(()));
        assert_eq!(check_once(&grpc("api.v1.Api"), dir.path()).await, Ok(()));
        assert_eq!(
            check_once(&grpc("api.v1.Down"), dir.path()).await,
            Err(format!(
                "gRPC health check of \"api.v1.Down\" at {address} returned NOT_SERVING"
            ))
        );
        let unknown = check_once(&grpc("nope"), dir.path()).await.unwrap_err();
        assert!(unknown.contains("NotFound"), "{unknown}");
        server.abort();

        let port = closed_port().await;
        let refused = spec(Check::Grpc {
            address: format!("127.0.0.1:{port}"),
            service: String::new(),
        });
        let error = check_once(&refused, dir.path()).await.unwrap_err();
        assert!(
            error.starts_with(&format!("connect 127.0.0.1:{port}: ")) && error.contains("refused"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn healthy_at_min_healthy_time_after_a_late_start() {
        let dir = tempfile::tempdir().unwrap();
        let server = Responder::start(&[503]).await;
        // A long interval: the gate must not wait for it, neither for the
        // first pass nor for declaring healthiness.
        let s = server.spec(Duration::from_secs(5));
        let (_alive_tx, mut alive) = watch::channel(true);
        let cancel = CancellationToken::new();
        let g = gate(300, 20_000);
        let up_at = Arc::new(Mutex::new(None));
        let flip = tokio::spawn({
            let up_at = up_at.clone();
            let status = server.status.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(80)).await;
                *status.lock().unwrap() = vec![200];
                *up_at.lock().unwrap() = Some(std::time::Instant::now());
            }
        });
        let took = wait_healthy(Some(&s), dir.path(), &g, &mut alive, &cancel)
            .await
            .unwrap();
        let done = std::time::Instant::now();
        flip.await.unwrap();
        let up = up_at.lock().unwrap().unwrap();
        let after_up = done - up;
        assert!(took >= g.min_healthy_time, "{took:?}");
        assert!(after_up >= g.min_healthy_time, "{after_up:?}");
        // Ideal: 300 ms plus one fast retry (< 160 ms); generous for a loaded
        // machine, yet far below the 5 s interval.
        assert!(
            after_up < g.min_healthy_time + Duration::from_millis(800),
            "{after_up:?}"
        );
    }

    #[tokio::test]
    async fn a_failed_check_restarts_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        // pass, pass, FAIL, then pass forever.
        let server = Responder::start(&[200, 200, 503, 200]).await;
        let s = server.spec(Duration::from_millis(100));
        let (_alive_tx, mut alive) = watch::channel(true);
        let took = wait_healthy(
            Some(&s),
            dir.path(),
            &gate(300, 20_000),
            &mut alive,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        // The failure came at least two intervals in, and 300 ms of passing
        // checks must follow it.
        assert!(took >= Duration::from_millis(500), "{took:?}");
        assert!(server.hits.load(Ordering::SeqCst) >= 6);
    }

    #[tokio::test]
    async fn the_deadline_reports_the_last_error() {
        let dir = tempfile::tempdir().unwrap();
        let server = Responder::start(&[503]).await;
        let s = server.spec(Duration::from_millis(100));
        let (_alive_tx, mut alive) = watch::channel(true);
        let started = std::time::Instant::now();
        let error = wait_healthy(
            Some(&s),
            dir.path(),
            &gate(100, 300),
            &mut alive,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert_eq!(
            error,
            format!(
                "not healthy within 300ms: GET {} returned 503",
                server.url()
            )
        );
        assert!(started.elapsed() < Duration::from_secs(3));

        // Passing, but not for long enough before the deadline.
        server.set(&[200]);
        let error = wait_healthy(
            Some(&s),
            dir.path(),
            &gate(1_000, 300),
            &mut alive,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert_eq!(error.kind(), baton_common::command::FailureKind::NotHealthy);
        let error = error.to_string();
        assert!(
            error.starts_with("not healthy within 300ms: passing for ")
                && error.ends_with(" of the required 1s"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn exit_and_cancel_end_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let server = Responder::start(&[503]).await;
        let s = server.spec(Duration::from_millis(100));
        let g = gate(100, 20_000);

        let (alive_tx, mut alive) = watch::channel(true);
        let dies = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            alive_tx.send_replace(false);
            alive_tx
        });
        let error = wait_healthy(
            Some(&s),
            dir.path(),
            &g,
            &mut alive,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert_eq!(error, GateError::Exited);
        // A release that dies in its gate did not start, which is another
        // failure than one that runs unhealthy.
        assert_eq!(error.kind(), baton_common::command::FailureKind::Start);
        drop(dies.await.unwrap());

        let (_alive_tx, mut alive) = watch::channel(true);
        let cancel = CancellationToken::new();
        let canceller = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                cancel.cancel();
            }
        });
        let error = wait_healthy(Some(&s), dir.path(), &g, &mut alive, &cancel)
            .await
            .unwrap_err();
        assert_eq!(error, GateError::Cancelled);
        canceller.await.unwrap();
    }

    #[tokio::test]
    async fn without_a_spec_alive_for_min_healthy_time_is_healthy() {
        let dir = tempfile::tempdir().unwrap();
        let (alive_tx, mut alive) = watch::channel(true);
        let took = wait_healthy(
            None,
            dir.path(),
            &gate(200, 20_000),
            &mut alive,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(3),
            "{took:?}"
        );

        alive_tx.send_replace(false);
        let error = wait_healthy(
            None,
            dir.path(),
            &gate(200, 20_000),
            &mut alive,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert_eq!(error, GateError::Exited);
    }

    #[test]
    fn io_messages_are_lower_case_without_errno() {
        let e = std::io::Error::from_raw_os_error(111);
        assert_eq!(io_message(&e), "connection refused");
        assert_eq!(
            io_message(&std::io::Error::other("HTTP broke")),
            "HTTP broke"
        );
    }
}
