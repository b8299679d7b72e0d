//! `baton ping`: a no-op through every agent's stream, timed.

use std::process::ExitCode;
use std::time::Duration;

use baton_common::host::parse_key_value;
use baton_common::time::{from_duration, to_duration};
use baton_proto::control::v1::PingHostsRequest;

use super::{Cli, CliError, call_failed};

/// Arguments of `baton ping`.
#[derive(Debug, clap::Args)]
pub struct PingArgs {
    /// Only hosts with this label; repeat to require several.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
    /// How long to wait for the answers (at most 5m).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print one JSON document: `hosts` (each `host_id`,
    /// `answered_after_ms`, `error`), `answered`, `failed`, `p50_ms`,
    /// `p100_ms`, `elapsed_ms`.
    #[arg(long)]
    pub json: bool,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Runs `baton ping`: exit 0 when every selected host answered, 1
/// otherwise.
pub async fn run(cli: &Cli, args: &PingArgs) -> Result<ExitCode, CliError> {
    let mut request = tonic::Request::new(PingHostsRequest {
        labels: args.labels.iter().cloned().collect(),
        timeout: Some(to_duration(args.timeout)),
    });
    // The call lasts up to the ping's own timeout, beyond the CLI's usual
    // 30 s per call; a margin covers answering.
    request.set_timeout(args.timeout + Duration::from_secs(30));
    let response = cli
        .control_without_timeout()
        .await?
        .ping_hosts(request)
        .await
        .map_err(|s| call_failed("pinging the fleet failed", s))?
        .into_inner();
    let mut times: Vec<Duration> = response
        .hosts
        .iter()
        .filter(|h| h.error.is_empty())
        .filter_map(|h| h.answered_after.as_ref().and_then(from_duration))
        .collect();
    times.sort();
    let failed = response.hosts.len() - times.len();
    let p50 = times.get(times.len().saturating_sub(1) / 2).copied();
    let p100 = times.last().copied();
    let elapsed = response
        .elapsed
        .as_ref()
        .and_then(from_duration)
        .unwrap_or_default();
    if args.json {
        let doc = serde_json::json!({
            "hosts": response.hosts.iter().map(|h| serde_json::json!({
                "host_id": h.host_id,
                "answered_after_ms": h.answered_after.as_ref().and_then(from_duration).map(ms),
                "error": h.error,
            })).collect::<Vec<_>>(),
            "answered": times.len(),
            "failed": failed,
            "p50_ms": p50.map(ms),
            "p100_ms": p100.map(ms),
            "elapsed_ms": ms(elapsed),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for h in response.hosts.iter().filter(|h| !h.error.is_empty()) {
            println!("{}: {}", h.host_id, h.error);
        }
        match (p50, p100) {
            (Some(p50), Some(p100)) => println!(
                "{} of {} hosts answered in {:.1} ms (median {:.1} ms)",
                times.len(),
                response.hosts.len(),
                ms(p100),
                ms(p50)
            ),
            _ => println!("0 of {} hosts answered", response.hosts.len()),
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
