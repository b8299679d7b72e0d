//! `baton demo`: the whole story on one machine with nothing else
//! installed. A coordinator and three agents run in this process, on
//! loopback, in a temporary directory, over the same mutual-TLS gRPC they
//! use in production. The demo signs three releases of a tiny HTTP
//! service (this binary's hidden `demo-service` command), installs 1.0.0,
//! rolls 2.0.0 out one host at a time, then tries a broken 3.0.0 that
//! fails its health check on the first host and is rolled back
//! automatically, then a 4.0.0 whose health check passes but which fails
//! one request in ten: analysis against the hosts still on 2.0.0 catches
//! it after its first host and rolls it back. Everything is stopped and
//! removed on exit or Ctrl-C.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use baton_agent::{Agent, AgentConfig};
use baton_common::artifact;
use baton_common::host::{HostId, HostView};
use baton_common::tls::ClientTls;
use baton_proto::control::v1::WatchHostsRequest;
use baton_proto::control::v1::control_service_client::ControlServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{CliError, DemoArgs, call_failed, connect_control_with, hosts, rollout};
use baton_coordinator::config::Config;
use baton_coordinator::server::Coordinator;

/// The demo's hosts and their labels.
const HOSTS: &[(&str, &str, &str)] = &[
    ("web-1", "web", "a"),
    ("web-2", "web", "b"),
    ("web-3", "web", "c"),
];

/// How long the demo waits for the fleet to change state.
const STEP_DEADLINE: Duration = Duration::from_secs(60);

/// Runs `fut` unless `stop` is cancelled first.
async fn unless<T>(stop: &CancellationToken, fut: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        _ = stop.cancelled() => None,
        v = fut => Some(v),
    }
}

/// A free loopback port for a host's demo service.
fn free_port() -> Result<u16, CliError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Writes a release directory of the demo service and packs it.
fn release(
    dir: &Path,
    key: &artifact::SigningKey,
    version: &str,
    broken: bool,
    error_rate: f64,
) -> Result<PathBuf, CliError> {
    let exe = std::env::current_exe()?;
    let src = dir.join(format!("src-{version}"));
    std::fs::create_dir_all(&src)?;
    let broken_arg = if broken {
        ", \"--broken\"".to_owned()
    } else if error_rate > 0.0 {
        format!(", \"--error-rate\", \"{error_rate}\"")
    } else {
        String::new()
    };
    std::fs::write(
        src.join("service.toml"),
        format!(
            r#"command = {exe:?}
args = ["demo-service", "--listen", "127.0.0.1:${{port}}", "--version", "{version}"{broken_arg}]
listen = ["tcp://127.0.0.1:${{port}}"]   # the agent owns the socket and hands it over
ready = "notify"                       # READY=1 says the new process can take over
stop_signal = "SIGTERM"
stop_timeout = "5s"

[health]
kind = "http"
url = "http://127.0.0.1:${{port}}/healthz"
interval = "250ms"
timeout = "1s"
"#
        ),
    )?;
    std::fs::write(src.join("RELEASE"), format!("demo-service {version}\n"))?;
    let out = dir.join(format!("demo-{version}.baton"));
    artifact::pack(&src, "demo", version, key, &out)?;
    Ok(out)
}

/// Asks one host's demo service which version it runs.
async fn ask(port: u16) -> String {
    let answer = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
            .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    match tokio::time::timeout(Duration::from_secs(2), answer).await {
        Ok(Ok(text)) => text
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or("")
            .trim()
            .to_owned(),
        Ok(Err(e)) => format!("({e})"),
        Err(_) => "(no answer)".into(),
    }
}

/// Sends requests to every host's service in a loop (4 clients, a new
/// connection each time) until `stop`; returns (answered, failed).
async fn request_loop(ports: Vec<u16>, stop: CancellationToken) -> (u64, u64) {
    let mut clients = JoinSet::new();
    for c in 0..4 {
        let (ports, stop) = (ports.clone(), stop.clone());
        clients.spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut i = c;
            while !stop.is_cancelled() {
                let port = ports[i % ports.len()];
                i += 1;
                let one = async {
                    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                    s.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
                        .await?;
                    let mut text = String::new();
                    s.read_to_string(&mut text).await?;
                    Ok::<_, std::io::Error>(text.starts_with("HTTP/1.1 200"))
                };
                match tokio::time::timeout(Duration::from_secs(2), one).await {
                    Ok(Ok(true)) => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        });
    }
    let mut total = (0, 0);
    while let Some(r) = clients.join_next().await {
        if let Ok((ok, failed)) = r {
            total.0 += ok;
            total.1 += failed;
        }
    }
    total
}

struct Story<'a> {
    control: ControlServiceClient<Channel>,
    ports: &'a BTreeMap<String, u16>,
    summary: Vec<String>,
}

impl Story<'_> {
    /// The last analysis verdict of the newest rollout, as a line.
    async fn last_verdict(&mut self) -> Option<String> {
        let list = self
            .control
            .list_rollouts(baton_proto::control::v1::ListRolloutsRequest::default())
            .await
            .ok()?
            .into_inner();
        let r = list.rollouts.first()?;
        let v = r.services.first()?.analysis.last()?;
        Some(format!(
            "{} {}: {}",
            v.name,
            v.verdict.to_uppercase(),
            v.reason
        ))
    }

    /// Starts a plan and follows it live; returns the final state.
    async fn rollout(&mut self, title: &str, plan: &str) -> Result<String, CliError> {
        println!("\n== {title}\n");
        for line in plan.trim().lines() {
            println!("   | {line}");
        }
        println!();
        let started = Instant::now();
        let id = self
            .control
            .start_rollout(baton_proto::control::v1::StartRolloutRequest {
                plan: plan.to_owned(),
            })
            .await
            .map_err(|s| call_failed("the plan was refused", s))?
            .into_inner()
            .id;
        rollout::watch(&mut self.control, &id, false).await?;
        let r = self
            .control
            .get_rollout(baton_proto::control::v1::GetRolloutRequest { id: id.clone() })
            .await
            .map_err(|s| call_failed("getting the rollout failed", s))?
            .into_inner();
        let took = started.elapsed();
        println!("\n   the services answer:");
        for (host, port) in self.ports {
            println!("     {host}: {}", ask(*port).await);
        }
        self.summary.push(format!(
            "{title}: {} in {:.1}s",
            r.state,
            took.as_secs_f64()
        ));
        Ok(r.state)
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
    let (key_path, pub_path) = artifact::keygen(&dir.path().join("release"))?;
    let key = artifact::read_signing_key(&key_path)?;
    println!("  created a CA, mTLS certificates and an ed25519 release key");

    let mut config = Config::loopback(dir.path().join("batond"), tls_dir.clone());
    config.http_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let coordinator = Coordinator::bind(config).await?;
    let url = format!("https://{}", coordinator.local_addr());
    let dashboard = coordinator
        .dashboard_addr()
        .map(|a| format!("http://{a}/"))
        .unwrap_or_default();
    let coordinator_stop = CancellationToken::new();
    let coordinator_task = tokio::spawn(coordinator.run(coordinator_stop.clone()));
    println!("  batond listening on {url}; its dashboard at {dashboard}");

    let mut control =
        connect_control_with(&url, &ClientTls::load(&tls_dir, "operator")?, None).await?;
    let mut events = control
        .watch_hosts(WatchHostsRequest {})
        .await
        .map_err(|s| call_failed("watching hosts failed", s))?
        .into_inner();

    let agents_stop = CancellationToken::new();
    let mut agents = JoinSet::new();
    let mut ports = BTreeMap::new();
    let mut agent_dirs = Vec::new();
    for (id, role, zone) in HOSTS {
        let host_id = HostId::try_from(*id)?;
        let port = free_port()?;
        ports.insert((*id).to_owned(), port);
        let vars: BTreeMap<String, String> = [("port".to_owned(), port.to_string())].into();
        let data_dir = dir.path().join("agents").join(id);
        let mut all_vars = vars.clone();
        all_vars.insert("BATON_HOST_ID".into(), (*id).to_owned());
        agent_dirs.push((data_dir.clone(), all_vars));
        let config = AgentConfig {
            coordinators: vec![url.clone()],
            tls: ClientTls::load(&tls_dir, &format!("agent-{host_id}"))?,
            tls_dir: None,
            host_id,
            data_dir,
            labels: [
                ("role".to_owned(), (*role).to_owned()),
                ("zone".to_owned(), (*zone).to_owned()),
            ]
            .into(),
            vars,
            balancers: Vec::new(),
            trusted_keys: vec![artifact::read_public_key(&pub_path)?],
            keep_releases: baton_agent::config::DEFAULT_KEEP_RELEASES,
            reconnect_initial: Duration::from_millis(100),
            metrics_listen: None,
            reconnect_max: Duration::from_secs(2),
            download: Default::default(),
            systemctl: Default::default(),
            peers: Default::default(),
        };
        agents.spawn(Agent::new(config)?.run(agents_stop.clone()));
    }
    println!(
        "  started agents {}; waiting for them to register:",
        HOSTS.iter().map(|h| h.0).collect::<Vec<_>>().join(", ")
    );

    let story = async {
        tokio::time::timeout(STEP_DEADLINE, async {
            let mut connected = std::collections::BTreeSet::new();
            while connected.len() < HOSTS.len() {
                let Some(event) = events
                    .message()
                    .await
                    .map_err(|s| call_failed("the host watch broke", s))?
                else {
                    return Err(CliError::new("the coordinator ended the host watch"));
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
        })
        .await
        .map_err(|_| {
            CliError::new(format!(
                "the agents did not all register within {STEP_DEADLINE:?}"
            ))
        })??;

        println!("\n== Signing and pushing four releases of the demo service\n");
        for (version, broken, error_rate) in [
            ("1.0.0", false, 0.0),
            ("2.0.0", false, 0.0),
            ("3.0.0", true, 0.0),
            ("4.0.0", false, 0.1),
        ] {
            let file = release(dir.path(), &key, version, broken, error_rate)?;
            let (signed, payload) = artifact::open_artifact(&file)?;
            let stored = super::artifact::push_with(&mut control, signed, payload).await?;
            let note = if broken {
                "  (broken: its /healthz answers 503)"
            } else if error_rate > 0.0 {
                "  (bad: /healthz passes, but one request in ten fails)"
            } else {
                ""
            };
            println!("   demo {version}  {}{note}", stored.digest);
        }

        let mut story = Story {
            control: control.clone(),
            ports: &ports,
            summary: Vec::new(),
        };
        let install = story
            .rollout(
                "Installing demo 1.0.0 on every web host at once",
                "[[service]]\nname = \"demo\"\nversion = \"1.0.0\"\nhosts = { role = \"web\" }\nstrategy = \"all-at-once\"\nmin_healthy_time = \"1s\"\n",
            )
            .await?;
        // Clients keep calling every host while 2.0.0 rolls out: each
        // agent hands the listening socket to the new process, so not one
        // request fails.
        let load_stop = CancellationToken::new();
        let load = tokio::spawn(request_loop(
            ports.values().copied().collect(),
            load_stop.clone(),
        ));
        let upgrade = story
            .rollout(
                "Rolling demo 2.0.0 out one host at a time, under a request loop",
                "[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\nmax_parallel = 1\nmin_healthy_time = \"1s\"\nhealthy_deadline = \"10s\"\n",
            )
            .await;
        load_stop.cancel();
        let (answered, failed) = load.await.unwrap_or((0, u64::MAX));
        let upgrade = upgrade?;
        println!("\n   the request loop: {answered} requests during the rollout, {failed} failed");
        story.summary.push(format!(
            "Requests during the 2.0.0 rollout: {answered}, failed: {failed}"
        ));
        let broken = story
            .rollout(
                "Trying the broken demo 3.0.0",
                "auto_rollback = true\n\n[[service]]\nname = \"demo\"\nversion = \"3.0.0\"\nmax_parallel = 1\nmin_healthy_time = \"1s\"\nhealthy_deadline = \"2s\"\n",
            )
            .await?;

        // 4.0.0 passes its health check: only its own metrics show that
        // it fails requests. Analysis compares the host that runs it with
        // the two still on 2.0.0, under the same request loop.
        let load_stop = CancellationToken::new();
        let load = tokio::spawn(request_loop(
            ports.values().copied().collect(),
            load_stop.clone(),
        ));
        let analysed = story
            .rollout(
                "Trying demo 4.0.0, healthy by its probe but failing requests, with analysis",
                "[[service]]\nname = \"demo\"\nversion = \"4.0.0\"\nmax_parallel = 1\nmin_healthy_time = \"1s\"\n\n[[service.analysis]]\nname = \"errors\"\nkind = \"metrics\"\nurl = \"http://127.0.0.1:${port}/metrics\"\nratio = [\"app_errors_total\", \"app_requests_total\"]\nbaseline = true\ninterval = \"500ms\"\nduration = \"10s\"\nmin_samples = 4\n",
            )
            .await;
        load_stop.cancel();
        let _ = load.await;
        let analysed = analysed?;
        if let Some(v) = story.last_verdict().await {
            println!("\n   the verdict: {v}");
        }

        println!("\n== Summary\n");
        for line in &story.summary {
            println!("   {line}");
        }
        let ok = install == "succeeded"
            && upgrade == "succeeded"
            && broken == "rolled_back"
            && analysed == "rolled_back"
            && failed == 0;
        if ok {
            println!(
                "\n   3.0.0 never got past its first host: it failed the health gate and every host it touched is back on 2.0.0."
            );
            println!(
                "   4.0.0 passed its health gate, but analysis saw its error ratio against the hosts still on 2.0.0 and rolled it back after its first host."
            );
        }
        let views = hosts::fetch(&mut control).await?;
        println!("\nThe fleet, as `baton hosts` shows it:\n");
        for line in hosts::table(&views).lines() {
            println!("  {line}");
        }
        if !ok {
            return Err(CliError::new("the demo did not go as expected (see above)"));
        }
        Ok(ExitCode::SUCCESS)
    };
    let mut outcome = match unless(&interrupted, story).await {
        None => Ok(ExitCode::from(130)),
        Some(r) => r,
    };
    if args.keep_running && matches!(outcome, Ok(ExitCode::SUCCESS)) {
        println!(
            "\nThe fleet keeps running: try `baton --coordinator {url} --tls-dir {} rollout list`,",
            tls_dir.display()
        );
        println!(
            "or open {dashboard} and sign in with the token `baton --coordinator {url} --tls-dir {} dashboard token --role operator` prints.",
            tls_dir.display()
        );
        println!("Press Ctrl-C to stop.");
        interrupted.cancelled().await;
    }

    println!("\nStopping the agents, their services and the coordinator...");
    agents_stop.cancel();
    while agents.join_next().await.is_some() {}
    for (data_dir, vars) in &agent_dirs {
        if let Err(e) = baton_agent::stop_services(data_dir, vars).await {
            outcome = Err(CliError::new(format!("cannot stop a demo service: {e}")));
        }
    }
    drop(control);
    coordinator_stop.cancel();
    match coordinator_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => outcome = Err(CliError::new(format!("the coordinator failed: {e}"))),
        Err(e) => outcome = Err(CliError::new(format!("the coordinator task failed: {e}"))),
    }
    signals.abort();
    drop(dir);
    println!("Everything stopped; the demo's temporary directory is removed.");
    outcome
}
