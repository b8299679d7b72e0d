//! `baton freeze` and `baton unfreeze`: hold every rollout (new ones wait
//! in `pending`, running ones start no new host) until a time or until
//! unfrozen; audited, and shown in every rollout's status.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use baton_common::time::{from_timestamp, rfc3339, to_timestamp};
use baton_proto::control::v1::{FreezeRequest, FreezeStatus, GetFreezeRequest, UnfreezeRequest};

use super::{Cli, CliError, call_failed};

/// Arguments of `baton freeze`.
#[derive(Debug, clap::Args)]
pub struct FreezeArgs {
    /// When the freeze ends by itself: RFC 3339 (2026-12-27T00:00:00Z) or
    /// a duration from now (2h, 3days). Without it, until `baton
    /// unfreeze`.
    #[arg(long, value_name = "TIME", conflicts_with = "status")]
    pub until: Option<String>,
    /// Why, shown with the freeze (at most 256 characters).
    #[arg(
        long,
        value_name = "TEXT",
        default_value = "",
        conflicts_with = "status"
    )]
    pub reason: String,
    /// Only say whether, and why, rollouts are held now.
    #[arg(long)]
    pub status: bool,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `baton unfreeze`.
#[derive(Debug, clap::Args)]
pub struct UnfreezeArgs {
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

fn until(text: &str) -> Result<SystemTime, CliError> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t);
    }
    let d: Duration = humantime::parse_duration(text).map_err(|_| {
        CliError::new(format!(
            "--until {}: neither a time (2026-12-27T00:00:00Z) nor a duration (2h)",
            baton_common::text::quote(text)
        ))
        .with_code(super::exit::USAGE)
    })?;
    SystemTime::now()
        .checked_add(d)
        .ok_or_else(|| CliError::new("--until is too far ahead").with_code(super::exit::USAGE))
}

fn show(s: &FreezeStatus, json: bool) -> Result<(), CliError> {
    let until = s.until.as_ref().and_then(from_timestamp).map(rfc3339);
    if json {
        let doc = serde_json::json!({
            "frozen": s.frozen,
            "until": until,
            "reason": s.reason,
            "by": s.by,
            "since": s.since.as_ref().and_then(from_timestamp).map(rfc3339),
            "held": s.held,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    if s.frozen {
        println!(
            "frozen by {} {}{}",
            s.by,
            until.map_or_else(|| "until unfrozen".to_owned(), |u| format!("until {u}")),
            if s.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", s.reason)
            }
        );
    } else {
        println!("not frozen by an operator");
    }
    if s.held.is_empty() {
        println!("rollouts may start hosts now");
    } else {
        println!("held now: {}", s.held);
    }
    Ok(())
}

/// Runs `baton freeze`.
pub async fn freeze(cli: &Cli, args: &FreezeArgs) -> Result<ExitCode, CliError> {
    let mut control = cli.control().await?;
    let status = if args.status {
        control
            .get_freeze(GetFreezeRequest {})
            .await
            .map_err(|s| call_failed("reading the freeze failed", s))?
    } else {
        let until = args.until.as_deref().map(until).transpose()?;
        control
            .freeze(FreezeRequest {
                until: until.map(to_timestamp),
                reason: args.reason.clone(),
            })
            .await
            .map_err(|s| call_failed("freezing failed", s))?
    };
    show(&status.into_inner(), args.json)?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `baton unfreeze`.
pub async fn unfreeze(cli: &Cli, args: &UnfreezeArgs) -> Result<ExitCode, CliError> {
    let status = cli
        .control()
        .await?
        .unfreeze(UnfreezeRequest {})
        .await
        .map_err(|s| call_failed("unfreezing failed", s))?;
    show(&status.into_inner(), args.json)?;
    Ok(ExitCode::SUCCESS)
}
