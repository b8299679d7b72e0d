//! `batond`: the Baton coordinator daemon. See `batond --help`.

use std::io::Write;
use std::process::ExitCode;

use baton_common::EXIT_CONFIG;
use baton_coordinator::config::{BatondArgs, Config};
use baton_coordinator::server::Coordinator;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = match baton_common::process::parse_args::<BatondArgs>() {
        Ok(args) => args,
        Err(code) => return code,
    };
    baton_common::process::init_logging("info");
    // Every agent holds a connection: use every descriptor allowed.
    let open_files = baton_coordinator::limits::raise_open_files();
    tracing::debug!(open_files, "open file limit");
    let config = match Config::resolve(args) {
        Ok(c) => c,
        Err(errors) => {
            for e in errors.0 {
                eprintln!("batond: {e}");
            }
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let runtime = match baton_common::process::runtime("batond") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let coordinator = match Coordinator::bind(config).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("batond: {e}");
                return if e.is_config() {
                    ExitCode::from(EXIT_CONFIG as u8)
                } else {
                    ExitCode::FAILURE
                };
            }
        };
        // Handlers first: once the address is printed, SIGTERM must already
        // mean a graceful shutdown.
        let shutdown = CancellationToken::new();
        let signals = match baton_common::process::cancel_on_signal(shutdown.clone()) {
            Ok(wait) => tokio::spawn(wait),
            Err(e) => {
                eprintln!("batond: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        // The first line on stdout: scripts and tests read the bound
        // address from it (useful with port 0).
        println!("listening on {}", coordinator.local_addr());
        // Then, when served, the plain-HTTP endpoints, one line each.
        if let Some(addr) = coordinator.dashboard_addr() {
            println!("dashboard on http://{addr}/");
        }
        if let Some(addr) = coordinator.metrics_addr() {
            println!("metrics on http://{addr}/metrics");
        }
        let _ = std::io::stdout().flush();
        let notify = baton_common::sdnotify::lifecycle(
            format!("serving on {}", coordinator.local_addr()),
            shutdown.clone(),
        );
        let result = coordinator.run(shutdown).await;
        signals.abort();
        let _ = notify.await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("batond: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
