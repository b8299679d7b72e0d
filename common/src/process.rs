//! Process plumbing shared by the daemons and the CLI: logging setup and
//! turning SIGTERM/SIGINT into a cancellation.

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Logs to stderr through `tracing`, filtered by `RUST_LOG` (falling back
/// to `default`, e.g. `"info"`). Calling it twice is harmless. By default
/// the HTTP/2 library says only errors: its warnings name each abusive
/// peer's stream (a rapid reset, say) and would let any client fill the
/// log; Baton logs what it refuses itself, at most once a second.
pub fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default},h2=error")));
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

/// Reads a TOML config file into `T`; the error is one message naming the
/// file (toml's own message, which shows the offending line, is kept).
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        format!(
            "config file {} is invalid: {}",
            path.display(),
            e.to_string().trim_end()
        )
    })
}

/// The keys a `deny_unknown_fields` TOML reader accepts where `probe`
/// (TOML holding an unknown key `__probe`) puts it: read from the error
/// it answers with.
pub fn toml_keys<T: serde::de::DeserializeOwned>(probe: &str) -> Vec<String> {
    match toml::from_str::<T>(probe) {
        Ok(_) => Vec::new(),
        Err(e) => crate::reference::expected_fields(e.message()),
    }
}

/// Parses a daemon's flags. `--help` and `--version` print and exit 0; a
/// usage error prints and exits 2, like any other configuration error.
pub fn parse_args<T: clap::Parser>() -> Result<T, std::process::ExitCode> {
    T::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            std::process::ExitCode::from(crate::EXIT_CONFIG as u8)
        } else {
            std::process::ExitCode::SUCCESS
        }
    })
}

/// A multi-threaded tokio runtime, one worker per core; on failure prints
/// why, prefixed with the program's name.
pub fn runtime(program: &str) -> Result<tokio::runtime::Runtime, std::process::ExitCode> {
    runtime_with(program, None)
}

/// A multi-threaded tokio runtime with at most `workers` worker threads
/// (`None`: one per core).
pub fn runtime_with(
    program: &str,
    workers: Option<usize>,
) -> Result<tokio::runtime::Runtime, std::process::ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        builder.worker_threads(n.min(cores).max(1));
    }
    builder.enable_all().build().map_err(|e| {
        eprintln!("{program}: cannot start the async runtime: {e}");
        std::process::ExitCode::FAILURE
    })
}
