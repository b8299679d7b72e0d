//! `baton logs HOST SERVICE`: a service's log through its host's agent.

use std::io::Write;
use std::process::ExitCode;

use baton_proto::control::v1::StreamLogsRequest;

use super::{Cli, CliError, call_failed};

/// Arguments of `baton logs`.
#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The host.
    pub host: String,
    /// The service.
    pub service: String,
    /// Keep printing what the service logs until Ctrl-C.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// How many of the last lines (at most 10000).
    #[arg(long, short = 'n', default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub lines: u32,
}

/// Runs `baton logs`.
pub async fn run(cli: &Cli, args: &LogsArgs) -> Result<ExitCode, CliError> {
    let mut client = if args.follow {
        cli.control_without_timeout().await?
    } else {
        cli.control().await?
    };
    let mut stream = client
        .stream_logs(StreamLogsRequest {
            host_id: args.host.clone(),
            service: args.service.clone(),
            lines: args.lines,
            follow: args.follow,
        })
        .await
        .map_err(|s| call_failed(&format!("the log of {} on {}", args.service, args.host), s))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    loop {
        match stream.message().await {
            Ok(Some(chunk)) => {
                // A closed pipe (`baton logs … | head`) ends quietly.
                if out
                    .write_all(chunk.text.as_bytes())
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Ok(None) => return Ok(ExitCode::SUCCESS),
            Err(s) => return Err(call_failed("the log stream broke", s)),
        }
    }
}
