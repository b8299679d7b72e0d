//! Process plumbing shared by the daemons and the CLI: logging setup and
//! turning SIGTERM/SIGINT into a cancellation.

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Logs to stderr through `tracing`, filtered by `RUST_LOG` (falling back
/// to `default`, e.g. `"info"`). Calling it twice is harmless.
pub fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}

/// Installs SIGTERM and SIGINT handlers now, and returns a future that
/// cancels `token` when either arrives. Installing before the future is
/// spawned matters: a daemon that says it is ready must already handle
/// SIGTERM gracefully. Must be called inside a tokio runtime.
pub fn cancel_on_signal(
    token: CancellationToken,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = token.cancelled() => return,
        };
        tracing::info!(signal = name, "shutting down");
        token.cancel();
    })
}

/// Everything wrong with a configuration, one sentence per problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigErrors(pub Vec<String>);
