//! `baton dashboard token`: sign-in tokens for the web dashboard.

use std::process::ExitCode;
use std::time::Duration;

use baton_common::time::to_duration;
use baton_proto::control::v1::CreateDashboardTokenRequest;

use super::{Cli, CliError, call_failed, timestamp_text};

/// Dashboard commands.
#[derive(Debug, clap::Subcommand)]
pub enum DashboardCommand {
    /// Print a token that signs in to the web dashboard (`batond
    /// --http-listen`). Paste it into the dashboard's sign-in field; with
    /// `--role operator` its Pause, Resume, Abort, Promote and Roll back
    /// buttons act, with `viewer` the dashboard stays read-only. The role
    /// may not exceed your certificate's.
    #[command(
        after_help = "Examples:\n  baton dashboard token\n  baton dashboard token --role operator --ttl 1h"
    )]
    Token {
        /// What the token may do.
        #[arg(long, value_enum, default_value_t = baton_common::tls::Role::Viewer)]
        role: baton_common::tls::Role,
        /// How long it signs in (at most 7 days).
        #[arg(long, value_name = "DURATION", default_value = "12h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Print `{"token": ..., "role": ..., "expires_at": ...}`.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a dashboard command.
pub async fn run(cli: &Cli, cmd: &DashboardCommand) -> Result<ExitCode, CliError> {
    let DashboardCommand::Token { role, ttl, json } = cmd;
    let created = cli
        .control()
        .await?
        .create_dashboard_token(CreateDashboardTokenRequest {
            role: role.as_str().to_owned(),
            ttl: Some(to_duration(*ttl)),
        })
        .await
        .map_err(|s| call_failed("creating the dashboard token failed", s))?
        .into_inner();
    let expires = timestamp_text(created.expires_at.as_ref());
    if *json {
        println!(
            "{}",
            serde_json::json!({ "token": created.token, "role": created.role, "expires_at": expires })
        );
    } else {
        println!("{}", created.token);
        eprintln!(
            "a {} token, good until {expires}: paste it into the dashboard's sign-in field",
            created.role
        );
    }
    Ok(ExitCode::SUCCESS)
}
