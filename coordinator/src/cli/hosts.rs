//! `baton hosts`: the fleet.

use std::process::ExitCode;

use baton_common::host::HostView;
use baton_common::time::rfc3339;
use baton_proto::control::v1::ListHostsRequest;
use baton_proto::control::v1::control_service_client::ControlServiceClient;
use tonic::transport::Channel;

use super::{Cli, CliError, call_failed};

/// Arguments of `baton hosts`.
#[derive(Debug, clap::Args)]
pub struct HostsArgs {
    /// Print one JSON document (an array of hosts) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `baton hosts`.
pub async fn run(cli: &Cli, args: &HostsArgs) -> Result<ExitCode, CliError> {
    let mut client = cli.control().await?;
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
        .map_err(|e| CliError(format!("the coordinator sent an invalid host: {e}")))
}

/// One host in the contract's JSON shape.
pub fn to_json(h: &HostView) -> serde_json::Value {
    serde_json::json!({
        "host_id": h.host_id,
        "connected": h.connected,
        "labels": h.labels,
        "services": h.services.iter().map(|s| serde_json::json!({
            "name": s.name,
            "version": s.version,
            "state": s.state.as_str(),
            "healthy": s.healthy,
        })).collect::<Vec<_>>(),
        "agent_version": h.agent_version,
        "first_seen": rfc3339(h.first_seen),
        "last_seen": rfc3339(h.last_seen),
        "peer_address": h.peer_address,
    })
}

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
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if hosts.is_empty() {
        out.push_str("(no host has registered yet)\n");
    }
    out
}

fn or_dash(s: String) -> String {
    if s.is_empty() { "-".into() } else { s }
}
