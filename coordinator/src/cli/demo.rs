//! `baton demo`: the story on one machine with nothing else installed. A
//! coordinator and three agents run in this process, on loopback, in a
//! temporary directory, over the same mutual-TLS gRPC they use in
//! production; everything is stopped and removed on exit or Ctrl-C.

use std::process::ExitCode;
use std::time::Duration;

use baton_agent::{Agent, AgentConfig};
use baton_common::host::{HostId, HostView};
use baton_common::tls::ClientTls;
use baton_proto::control::v1::WatchHostsRequest;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{CliError, call_failed, connect_control, hosts};
use crate::config::Config;
use crate::server::Coordinator;

/// Arguments of `baton demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the fleet running after the story until Ctrl-C, e.g. to try
    /// `baton hosts` against it from another terminal.
    #[arg(long)]
    pub keep_running: bool,
}

/// The demo's hosts and their labels.
const HOSTS: &[(&str, &str, &str)] = &[
    ("web-1", "web", "a"),
    ("web-2", "web", "b"),
    ("db-1", "db", "a"),
];

/// How long the demo waits for the fleet to change state.
const STEP_DEADLINE: Duration = Duration::from_secs(30);

/// Runs `fut` unless `stop` is cancelled first.
async fn unless<T>(stop: &CancellationToken, fut: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        _ = stop.cancelled() => None,
        v = fut => Some(v),
    }
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<ExitCode, CliError> {
    let dir = tempfile::Builder::new().prefix("baton-demo-").tempdir()?;
    let interrupted = CancellationToken::new();
    let signals = tokio::spawn(baton_common::process::cancel_on_signal(
        interrupted.clone(),
    )?);
    println!(
        "Baton demo: one coordinator and {} agents on loopback, in {}",
        HOSTS.len(),
        dir.path().display()
    );

    let tls_dir = dir.path().join("tls");
    let ids: Vec<HostId> = HOSTS
        .iter()
        .map(|(id, _, _)| HostId::try_from(*id))
        .collect::<Result<_, _>>()?;
    baton_common::pki::init(&tls_dir, &ids)?;
    println!(
        "  created a CA and mTLS certificates for the coordinator, the operator and each agent"
    );

    let coordinator = Coordinator::bind(Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().join("batond"),
        tls_dir: tls_dir.clone(),
        agent_timeout: crate::config::DEFAULT_AGENT_TIMEOUT,
        shutdown_grace: Duration::from_secs(5),
        max_artifact_size: crate::config::DEFAULT_MAX_ARTIFACT_SIZE,
    })
    .await?;
    let url = format!("https://{}", coordinator.local_addr());
    let coordinator_stop = CancellationToken::new();
    let coordinator_task = tokio::spawn(coordinator.run(coordinator_stop.clone()));
    println!("  batond listening on {url}");

    let mut control = connect_control(&url, &ClientTls::load(&tls_dir, "operator")?).await?;
    let mut events = control
        .watch_hosts(WatchHostsRequest {})
        .await
        .map_err(|s| call_failed("watching hosts failed", s))?
        .into_inner();

    let agents_stop = CancellationToken::new();
    let mut agents = JoinSet::new();
    for (id, role, zone) in HOSTS {
        let host_id = HostId::try_from(*id)?;
        let config = AgentConfig {
            coordinator: url.clone(),
            tls: ClientTls::load(&tls_dir, &format!("agent-{host_id}"))?,
            host_id,
            data_dir: dir.path().join("agents").join(id),
            labels: [
                ("role".to_owned(), (*role).to_owned()),
                ("zone".to_owned(), (*zone).to_owned()),
            ]
            .into(),
            vars: Default::default(),
            trusted_keys: vec![],
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(2),
        };
        agents.spawn(Agent::new(config)?.run(agents_stop.clone()));
    }
    println!(
        "  started agents {}; waiting for them to register:",
        HOSTS.iter().map(|h| h.0).collect::<Vec<_>>().join(", ")
    );

    let mut outcome = Ok(ExitCode::SUCCESS);
    let registered = unless(
        &interrupted,
        tokio::time::timeout(STEP_DEADLINE, async {
            let mut connected = std::collections::BTreeSet::new();
            while connected.len() < HOSTS.len() {
                let Some(event) = events
                    .message()
                    .await
                    .map_err(|s| call_failed("the host watch broke", s))?
                else {
                    return Err(CliError("the coordinator ended the host watch".into()));
                };
                let Some(host) = event.host.map(HostView::try_from).transpose()? else {
                    continue;
                };
                if host.connected && connected.insert(host.host_id.clone()) {
                    let labels = host
                        .labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    println!(
                        "    + {} registered ({labels}) from {}",
                        host.host_id, host.peer_address
                    );
                }
            }
            Ok::<_, CliError>(())
        }),
    )
    .await;
    match registered {
        None => outcome = Ok(ExitCode::from(130)),
        Some(Err(_)) => {
            outcome = Err(CliError(format!(
                "the agents did not all register within {STEP_DEADLINE:?}"
            )))
        }
        Some(Ok(Err(e))) => outcome = Err(e),
        Some(Ok(Ok(()))) => match hosts::fetch(&mut control).await {
            // Failing here still stops everything below.
            Err(e) => outcome = Err(e),
            Ok(views) => {
                println!("\nThe fleet, as `baton hosts` shows it:\n");
                for line in hosts::table(&views).lines() {
                    println!("  {line}");
                }
                if args.keep_running {
                    println!(
                        "\nThe fleet keeps running: try `baton --coordinator {url} --tls-dir {} hosts`.",
                        tls_dir.display()
                    );
                    println!("Press Ctrl-C to stop.");
                    interrupted.cancelled().await;
                }
            }
        },
    }

    println!("\nStopping the agents and the coordinator...");
    agents_stop.cancel();
    while agents.join_next().await.is_some() {}
    coordinator_stop.cancel();
    match coordinator_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => outcome = Err(CliError(format!("the coordinator failed: {e}"))),
        Err(e) => outcome = Err(CliError(format!("the coordinator task failed: {e}"))),
    }
    signals.abort();
    drop(dir);
    println!("Everything stopped; the demo's temporary directory is removed.");
    outcome
}
