//! `baton audit`: who changed what, and who was refused (admin only).

use std::process::ExitCode;

use baton_common::time::{from_timestamp, rfc3339_millis};
use baton_proto::control::v1::{AuditEntry, ListAuditRequest};

use super::{Cli, CliError, call_failed};

/// Arguments of `baton audit`.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Print one JSON document (an array, newest first).
    #[arg(long)]
    pub json: bool,
    /// How many entries, newest first.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub limit: u32,
}

fn at(e: &AuditEntry) -> String {
    e.at.as_ref()
        .and_then(from_timestamp)
        .map(rfc3339_millis)
        .unwrap_or_default()
}

/// Runs `baton audit`.
pub async fn run(cli: &Cli, args: &AuditArgs) -> Result<ExitCode, CliError> {
    let entries = cli
        .control()
        .await?
        .list_audit(ListAuditRequest { limit: args.limit })
        .await
        .map_err(|s| call_failed("reading the audit log failed", s))?
        .into_inner()
        .entries;
    if args.json {
        let doc: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "at": at(e),
                    "who": e.who,
                    "role": e.role,
                    "action": e.action,
                    "result": e.result,
                    "error": e.error,
                    "count": e.count.max(1),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else if entries.is_empty() {
        println!("(the audit log is empty)");
    } else {
        for e in &entries {
            let role = if e.role.is_empty() {
                "no role"
            } else {
                &e.role
            };
            let error = if e.error.is_empty() {
                String::new()
            } else {
                format!(": {}", e.error)
            };
            let times = if e.count > 1 {
                format!(" ×{}", e.count)
            } else {
                String::new()
            };
            println!(
                "{}  {} ({role})  {}  {}{times}{error}",
                at(e),
                e.who,
                e.action,
                e.result
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
