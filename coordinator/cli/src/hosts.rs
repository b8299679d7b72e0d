//! `baton hosts`: the fleet.

use std::process::ExitCode;

use baton_common::host::HostView;
use baton_common::time::from_timestamp;
use baton_common::time::rfc3339;
use baton_proto::control::v1::control_service_client::ControlServiceClient;
use baton_proto::control::v1::{GetHostRequest, HostActivation, ListHostsRequest};
use tonic::transport::Channel;

use super::{Cli, CliError, call_failed};

/// Arguments of `baton hosts`.
#[derive(Debug, clap::Args)]
pub struct HostsArgs {
    /// Show only this host.
    #[arg(value_name = "HOST")]
    pub host: Option<String>,
    /// With HOST: the activations rollouts made on it, newest first
    /// (rollout, service, versions, result, when).
    #[arg(long, requires = "host")]
    pub history: bool,
    /// Print one JSON document (an array of hosts; with `--history`, of
    /// activations) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `baton hosts`.
pub async fn run(cli: &Cli, args: &HostsArgs) -> Result<ExitCode, CliError> {
    let mut client = cli.control().await?;
    if let Some(host) = &args.host {
        if args.history {
            return history(&mut client, host, args.json).await;
        }
        let h = client
            .get_host(GetHostRequest {
                host_id: host.clone(),
            })
            .await
            .map_err(|s| call_failed(&format!("getting host {host} failed"), s))?
            .into_inner();
        let h = HostView::try_from(h)
            .map_err(|e| CliError::new(format!("the coordinator sent an invalid host: {e}")))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&to_json(&h))?);
        } else {
            print!("{}", table(std::slice::from_ref(&h)));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let hosts = fetch(&mut client).await?;
    if args.json {
        let doc = serde_json::Value::Array(hosts.iter().map(to_json).collect());
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", table(&hosts));
    }
    Ok(ExitCode::SUCCESS)
}

/// Lists the fleet through the Control API, as domain types.
pub async fn fetch(client: &mut ControlServiceClient<Channel>) -> Result<Vec<HostView>, CliError> {
    let response = client
        .list_hosts(ListHostsRequest {})
        .await
        .map_err(|s| call_failed("listing hosts failed", s))?;
    response
        .into_inner()
        .hosts
        .into_iter()
        .map(HostView::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CliError::new(format!("the coordinator sent an invalid host: {e}")))
}

pub use baton_common::host::to_json;

/// The hosts as an aligned text table.
pub fn table(hosts: &[HostView]) -> String {
    let mut rows = vec![[
        "HOST".to_owned(),
        "CONNECTED".into(),
        "AGENT".into(),
        "LABELS".into(),
        "SERVICES".into(),
    ]];
    for h in hosts {
        let labels = h
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let services = h
            .services
            .iter()
            .map(|s| {
                format!(
                    "{}@{} ({}{})",
                    s.name,
                    s.version,
                    s.state,
                    if s.healthy { ", healthy" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(" ");
        let connected = if h.connected {
            "yes".to_owned()
        } else {
            format!("no (last seen {})", rfc3339(h.last_seen))
        };
        rows.push([
            h.host_id.to_string(),
            connected,
            h.agent_version.clone(),
            or_dash(labels),
            or_dash(services),
        ]);
    }
    let mut out = align(&rows);
    if hosts.is_empty() {
        out.push_str("(no host has registered yet)\n");
    }
    out
}

fn or_dash(s: String) -> String {
    if s.is_empty() { "-".into() } else { s }
}

/// `baton hosts HOST --history`.
async fn history(
    client: &mut ControlServiceClient<Channel>,
    host: &str,
    json: bool,
) -> Result<ExitCode, CliError> {
    let all = client
        .get_host_history(GetHostRequest {
            host_id: host.to_owned(),
        })
        .await
        .map_err(|s| call_failed(&format!("getting the history of {host} failed"), s))?
        .into_inner()
        .activations;
    let at = |t: Option<&prost_types::Timestamp>| t.and_then(from_timestamp).map(rfc3339);
    if json {
        let doc: Vec<serde_json::Value> = all
            .iter()
            .map(|a| {
                serde_json::json!({
                    "rollout_id": a.rollout_id,
                    "rollout_state": a.rollout_state,
                    "service": a.service,
                    "from_version": a.from_version,
                    "to_version": a.to_version,
                    "state": a.state,
                    "started_at": at(a.started_at.as_ref()),
                    "finished_at": at(a.finished_at.as_ref()),
                    "error": a.error,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", history_table(host, &all));
    }
    Ok(ExitCode::SUCCESS)
}

fn history_table(host: &str, all: &[HostActivation]) -> String {
    if all.is_empty() {
        return format!("no rollout has changed {host} yet\n");
    }
    let at = |t: Option<&prost_types::Timestamp>| {
        t.and_then(from_timestamp)
            .map_or_else(|| "-".to_owned(), rfc3339)
    };
    let mut rows = vec![[
        "ROLLOUT".to_owned(),
        "SERVICE".into(),
        "VERSION".into(),
        "RESULT".into(),
        "STARTED".into(),
        "FINISHED".into(),
        "ERROR".into(),
    ]];
    for a in all {
        let from = if a.from_version.is_empty() {
            "(none)"
        } else {
            &a.from_version
        };
        rows.push([
            a.rollout_id.clone(),
            a.service.clone(),
            format!("{from} -> {}", a.to_version),
            a.state.clone(),
            at(a.started_at.as_ref()),
            at(a.finished_at.as_ref()),
            or_dash(a.error.clone()),
        ]);
    }
    align(&rows)
}

fn align<const N: usize>(rows: &[[String; N]]) -> String {
    let mut table = crate::table::Table::new(rows[0].each_ref().map(String::as_str));
    for r in &rows[1..] {
        table.row(r.clone());
    }
    table.to_string()
}
