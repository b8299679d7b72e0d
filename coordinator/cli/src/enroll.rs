//! `baton enroll`: one-time tokens for new hosts (admin only).

use std::process::ExitCode;
use std::time::Duration;

use baton_common::time::to_duration;
use baton_proto::control::v1::CreateEnrollmentRequest;

use super::{Cli, CliError, call_failed, timestamp_text};

/// Enrollment commands.
#[derive(Debug, clap::Subcommand)]
pub enum EnrollCommand {
    /// Print a one-time token with which a new host enrolls as HOST-ID:
    /// `baton-agent --enroll-token TOKEN --host-id HOST-ID ...` generates
    /// its key on the host and gets its certificate from the coordinator.
    Create {
        /// The new host's id.
        #[arg(long, value_name = "ID")]
        host_id: String,
        /// How long the token is good for (at most 24h).
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Print `{"token": ..., "expires_at": ...}`.
        #[arg(long)]
        json: bool,
    },
}

/// Runs an enrollment command.
pub async fn run(cli: &Cli, cmd: &EnrollCommand) -> Result<ExitCode, CliError> {
    let EnrollCommand::Create { host_id, ttl, json } = cmd;
    let created = cli
        .control()
        .await?
        .create_enrollment(CreateEnrollmentRequest {
            host_id: host_id.clone(),
            ttl: Some(to_duration(*ttl)),
        })
        .await
        .map_err(|s| call_failed("creating the enrollment token failed", s))?
        .into_inner();
    let expires = timestamp_text(created.expires_at.as_ref());
    if *json {
        println!(
            "{}",
            serde_json::json!({ "token": created.token, "expires_at": expires })
        );
    } else {
        println!("{}", created.token);
        eprintln!(
            "enroll {host_id} before {expires}: baton-agent --enroll-token TOKEN --host-id {host_id} ..."
        );
    }
    Ok(ExitCode::SUCCESS)
}
