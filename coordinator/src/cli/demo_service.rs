//! `baton demo-service` (hidden): the tiny HTTP service that `baton demo`
//! and the tests roll out. `GET /` answers `demo-service <version>`,
//! `GET /healthz` answers 200 — or 503 with `--broken`, which is how the
//! demo's bad release fails its health check. HTTP/1.1 with keep-alive,
//! stops on SIGTERM/SIGINT after finishing the requests in flight.

use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::CliError;

/// Arguments of `baton demo-service`.
#[derive(Debug, clap::Args)]
pub struct DemoServiceArgs {
    /// Where to listen.
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// The version to report.
    #[arg(long, value_name = "VERSION")]
    pub version: String,
    /// Fail every health check (a bad release).
    #[arg(long)]
    pub broken: bool,
}

/// Runs the service until SIGTERM or SIGINT.
pub async fn run(args: DemoServiceArgs) -> Result<ExitCode, CliError> {
    let shutdown = CancellationToken::new();
    let signals = baton_common::process::cancel_on_signal(shutdown.clone())?;
    tokio::spawn(signals);
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError(format!("cannot listen on {}: {e}", args.listen)))?;
    println!(
        "demo-service {} listening on {} (pid {})",
        args.version,
        args.listen,
        std::process::id()
    );
    let body = format!("demo-service {}\n", args.version);
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let body = body.clone();
                let broken = args.broken;
                let shutdown = shutdown.clone();
                tasks.spawn(async move { serve(stream, &body, broken, &shutdown).await });
            }
        }
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
    println!("demo-service {} stopped", args.version);
    Ok(ExitCode::SUCCESS)
}

/// Serves requests on one connection until it closes, an error, or
/// shutdown between requests.
async fn serve(mut stream: TcpStream, body: &str, broken: bool, shutdown: &CancellationToken) {
    let mut buf = Vec::with_capacity(1024);
    loop {
        // Read one request head.
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 16 * 1024 {
                return;
            }
            let mut chunk = [0u8; 2048];
            let n = tokio::select! {
                _ = shutdown.cancelled(), if buf.is_empty() => return,
                r = stream.read(&mut chunk) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            };
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end);
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        let close =
            head.to_ascii_lowercase().contains("connection: close") || shutdown.is_cancelled();
        let (status, text) = match path {
            "/healthz" if broken => ("503 Service Unavailable", "unhealthy\n"),
            "/healthz" => ("200 OK", "ok\n"),
            _ => ("200 OK", body),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{text}",
            text.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if stream.write_all(response.as_bytes()).await.is_err() || close {
            return;
        }
    }
}
