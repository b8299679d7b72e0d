//! `baton enroll`: tokens for new hosts, and the hosts waiting for approval
//! (admin only).

use std::process::ExitCode;
use std::time::Duration;

use baton_common::host::parse_key_value;
use baton_common::time::to_duration;
use baton_proto::control::v1::{
    CreateEnrollmentRequest, DecideEnrollmentRequest, ListPendingEnrollmentsRequest,
    PendingEnrollment,
};

use super::{Cli, CliError, call_failed, timestamp_text};

/// Enrollment commands.
#[derive(Debug, clap::Subcommand)]
pub enum EnrollCommand {
    /// Print a join token with which new hosts enroll (`baton-agent enroll
    /// --token TOKEN`): for one named host, or for up to --uses hosts. The
    /// token carries the fleet CA's fingerprint, so a host needs nothing
    /// else to trust the coordinator. Every use is in the audit log.
    #[command(after_help = "Examples:
  baton enroll create --host-id web-1
  baton enroll create --uses 500 --ttl 7d --label role=api
  baton enroll create --uses 20 --approve      # each host waits for `baton enroll accept`")]
    Create {
        /// The one host the token is for (omit with --uses).
        #[arg(
            long,
            value_name = "ID",
            conflicts_with = "uses",
            required_unless_present = "uses"
        )]
        host_id: Option<String>,
        /// How many hosts may enroll with it (at most 10000), whatever their ids.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
        uses: Option<u32>,
        /// How long the token is good for (at most 7days).
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// A label every host enrolling with it gets, e.g. `--label
        /// role=api`; repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        labels: Vec<(String, String)>,
        /// Hosts enrolling with it wait as pending until `baton enroll
        /// accept HOST`.
        #[arg(long)]
        approve: bool,
        /// Print `{"token": ..., "expires_at": ..., "uses": ...}`.
        #[arg(long)]
        json: bool,
    },
    /// List the hosts waiting for approval, with the fingerprint of the
    /// key each asks a certificate for (compare it with what `baton-agent
    /// enroll` printed on the host).
    #[command(after_help = "Example:\n  baton enroll pending")]
    Pending {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Accept a pending host: its certificate is signed, and its waiting
    /// `baton-agent enroll` finishes.
    #[command(after_help = "Example:\n  baton enroll accept web-7")]
    Accept {
        /// The host id.
        host: String,
    },
    /// Reject a pending host: its token use is spent and it is refused.
    #[command(after_help = "Example:\n  baton enroll reject web-7")]
    Reject {
        /// The host id.
        host: String,
    },
}

fn pending_json(p: &PendingEnrollment) -> serde_json::Value {
    serde_json::json!({
        "host_id": p.host_id,
        "from": p.from,
        "requested_at": timestamp_text(p.requested_at.as_ref()),
        "labels": p.labels,
        "key_sha256": p.key_sha256,
        "state": p.state,
    })
}

/// Runs an enrollment command.
pub async fn run(cli: &Cli, cmd: &EnrollCommand) -> Result<ExitCode, CliError> {
    match cmd {
        EnrollCommand::Create {
            host_id,
            uses,
            ttl,
            labels,
            approve,
            json,
        } => {
            let created = cli
                .control()
                .await?
                .create_enrollment(CreateEnrollmentRequest {
                    host_id: host_id.clone().unwrap_or_default(),
                    ttl: Some(to_duration(*ttl)),
                    uses: uses.unwrap_or(0),
                    labels: labels.iter().cloned().collect(),
                    approve: *approve,
                })
                .await
                .map_err(|s| call_failed("creating the enrollment token failed", s))?
                .into_inner();
            let expires = timestamp_text(created.expires_at.as_ref());
            if *json {
                println!(
                    "{}",
                    serde_json::json!({
                        "token": created.join_token,
                        "expires_at": expires,
                        "uses": created.uses,
                    })
                );
            } else {
                println!("{}", created.join_token);
                let who = match host_id {
                    Some(h) => format!("host {h}"),
                    None if created.uses == 1 => "one host".to_owned(),
                    None => format!("up to {} hosts", created.uses),
                };
                eprintln!(
                    "for {who} until {expires}; on each host, as root:\n  baton-agent enroll --coordinator {} --token TOKEN",
                    cli.coordinator.split(',').next().unwrap_or_default()
                );
            }
        }
        EnrollCommand::Pending { json } => {
            let pending = cli
                .control()
                .await?
                .list_pending_enrollments(ListPendingEnrollmentsRequest {})
                .await
                .map_err(|s| call_failed("listing pending hosts failed", s))?
                .into_inner()
                .pending;
            if *json {
                let all: Vec<_> = pending.iter().map(pending_json).collect();
                println!("{}", serde_json::Value::Array(all));
            } else if pending.is_empty() {
                eprintln!("no host waits for approval");
            } else {
                let mut table = crate::table::Table::new(["HOST", "FROM", "ASKED", "KEY SHA-256"]);
                for p in &pending {
                    table.row([
                        p.host_id.clone(),
                        p.from.clone(),
                        timestamp_text(p.requested_at.as_ref()),
                        p.key_sha256.clone(),
                    ]);
                }
                print!("{table}");
            }
        }
        EnrollCommand::Accept { host } | EnrollCommand::Reject { host } => {
            let accept = matches!(cmd, EnrollCommand::Accept { .. });
            let decided = cli
                .control()
                .await?
                .decide_enrollment(DecideEnrollmentRequest {
                    host_id: host.clone(),
                    accept,
                })
                .await
                .map_err(|s| call_failed("deciding the enrollment failed", s))?
                .into_inner();
            eprintln!("host {}: {}", decided.host_id, decided.state);
        }
    }
    Ok(ExitCode::SUCCESS)
}
