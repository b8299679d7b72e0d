//! `baton demo-service` (hidden): the tiny HTTP service that `baton demo`,
//! the tests and the benchmarks roll out.
//!
//! - `GET /` answers `demo-service <version>`; `GET /healthz` answers 200,
//!   or 503 with `--broken` (the demo's bad release); `GET /slow?ms=N`
//!   answers after N milliseconds (a long request to drain); `GET
//!   /metrics` counts the requests to `/` and those answered 500
//!   (`app_requests_total`, `app_errors_total`): with `--error-rate F` that
//!   fraction of them fails, a bad release its health check does not see.
//! - It takes its listening socket from the systemd socket-activation
//!   protocol when the agent hands one over (`LISTEN_FDS`, `LISTEN_PID`,
//!   fd 3), and binds `--listen` itself otherwise.
//! - On SIGTERM/SIGINT it drains: it stops accepting (the socket stays open
//!   in the agent and the new process, so nothing is refused), finishes the
//!   requests in flight, answers the next request on each keep-alive
//!   connection with `Connection: close`, and exits when no connection is
//!   left (or after `--drain-max`).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::CliError;

/// Arguments of `baton demo-service`.
#[derive(Debug, clap::Args)]
pub struct DemoServiceArgs {
    /// Where to listen when no socket is handed over (`LISTEN_FDS`).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// The version to report.
    #[arg(long, value_name = "VERSION")]
    pub version: String,
    /// Fail every health check (a bad release).
    #[arg(long)]
    pub broken: bool,
    /// The longest a drain may take before the remaining connections are
    /// closed.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_max: Duration,
    /// Start slowly: wait this long after taking the socket before
    /// accepting and saying ready (connections queue meanwhile).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    pub ready_after: Duration,
    /// Ignore SIGTERM and SIGINT, serving on (a service that will not
    /// stop until it is killed).
    #[arg(long)]
    pub ignore_sigterm: bool,
    /// Answer this fraction of `GET /` with 500 (spread evenly: every
    /// 20th request at 0.05), counted in `/metrics`.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.0)]
    pub error_rate: f64,
}

/// Requests to `/` and those answered with an error.
#[derive(Default)]
struct Counts {
    requests: std::sync::atomic::AtomicU64,
    errors: std::sync::atomic::AtomicU64,
}

impl Counts {
    /// Counts a request; whether it fails (`rate` of them, evenly).
    fn count(&self, rate: f64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.requests.fetch_add(1, Relaxed);
        let fails = ((n + 1) as f64 * rate).floor() > (n as f64 * rate).floor();
        if fails {
            self.errors.fetch_add(1, Relaxed);
        }
        fails
    }

    fn metrics(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        format!(
            "# HELP app_requests_total Requests to /.\n# TYPE app_requests_total counter\napp_requests_total {}\n# HELP app_errors_total Requests to / answered with an error.\n# TYPE app_errors_total counter\napp_errors_total {}\n",
            self.requests.load(Relaxed),
            self.errors.load(Relaxed)
        )
    }
}

/// Runs the service until SIGTERM or SIGINT, then drains.
pub async fn run(args: DemoServiceArgs) -> Result<ExitCode, CliError> {
    if !(0.0..=1.0).contains(&args.error_rate) {
        return Err(
            CliError::new("--error-rate must be between 0 and 1").with_code(super::exit::USAGE)
        );
    }
    let shutdown = CancellationToken::new();
    if args.ignore_sigterm {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let version = args.version.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                println!("demo-service {version} ignores the stop signal");
            }
        });
    } else {
        let signals = baton_common::process::cancel_on_signal(shutdown.clone())?;
        tokio::spawn(signals);
    }
    let mut inherited = listenfd::ListenFd::from_env();
    let (listener, how) = match inherited.take_tcp_listener(0) {
        Ok(Some(std_listener)) => {
            std_listener.set_nonblocking(true)?;
            (TcpListener::from_std(std_listener)?, "an inherited socket")
        }
        _ => {
            let addr = args.listen.ok_or_else(|| {
                CliError::new("no socket handed over (LISTEN_FDS) and no --listen given")
            })?;
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| CliError::new(format!("cannot listen on {addr}: {e}")))?;
            (l, "its own socket")
        }
    };
    println!(
        "demo-service {} listening on {} ({how}, pid {})",
        args.version,
        listener.local_addr()?,
        std::process::id()
    );
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(ExitCode::SUCCESS),
        _ = tokio::time::sleep(args.ready_after) => {}
    }
    // The agent's readiness signal during a socket handoff (a no-op when
    // nobody listens).
    let notifier = baton_common::sdnotify::Notifier::from_env();
    notifier.ready(&format!("serving {}", args.version));
    let body = format!("demo-service {}\n", args.version);
    let tasks = tokio_util::task::TaskTracker::new();
    let counts = std::sync::Arc::new(Counts::default());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let body = body.clone();
                let how = How { broken: args.broken, error_rate: args.error_rate, counts: counts.clone() };
                let shutdown = shutdown.clone();
                tasks.spawn(async move { serve(stream, &body, &how, &shutdown).await });
            }
        }
    }
    // Stop accepting. With a handed-over socket the queue lives on in the
    // agent and in the new process, which accepts from it meanwhile.
    drop(listener);
    notifier.stopping();
    println!(
        "demo-service {} draining {} connection(s)",
        args.version,
        tasks.len()
    );
    tasks.close();
    if tokio::time::timeout(args.drain_max, tasks.wait())
        .await
        .is_err()
    {
        println!(
            "demo-service {} drain cut short after {:?}",
            args.version, args.drain_max
        );
    }
    println!("demo-service {} stopped", args.version);
    Ok(ExitCode::SUCCESS)
}

/// Serves requests on one connection until the client closes it, an error,
/// or — once draining — the first response (sent with `Connection: close`).
struct How {
    broken: bool,
    error_rate: f64,
    counts: std::sync::Arc<Counts>,
}

async fn serve(mut stream: TcpStream, body: &str, how: &How, shutdown: &CancellationToken) {
    let broken = how.broken;
    let mut buf = Vec::with_capacity(1024);
    loop {
        // Read one request head. An idle keep-alive connection is kept
        // open while draining: closing it could race a request the client
        // is sending; its next request is answered and then it is closed.
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 16 * 1024 {
                return;
            }
            let mut chunk = [0u8; 4096];
            let n = match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end);
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        let (status, text) = if path == "/healthz" {
            if broken {
                ("503 Service Unavailable", "unhealthy\n".to_owned())
            } else {
                ("200 OK", "ok\n".to_owned())
            }
        } else if path == "/metrics" {
            ("200 OK", how.counts.metrics())
        } else if path == "/" && how.counts.count(how.error_rate) {
            ("500 Internal Server Error", "failed\n".to_owned())
        } else if let Some(ms) = path
            .strip_prefix("/slow?ms=")
            .and_then(|v| v.parse::<u64>().ok())
        {
            // Logged so a test knows the request is in flight here.
            println!("{}: a slow request ({ms} ms) is in flight", body.trim());
            tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
            ("200 OK", body.to_owned())
        } else {
            ("200 OK", body.to_owned())
        };
        let close =
            head.to_ascii_lowercase().contains("connection: close") || shutdown.is_cancelled();
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{text}",
            text.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if stream.write_all(response.as_bytes()).await.is_err() || close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}
