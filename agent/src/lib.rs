//! The Baton host agent (`baton-agent`) as a library: the binary is a thin
//! `main.rs` over [`Agent`], and tests and `baton demo` run it in-process.

#![forbid(unsafe_code)]

pub mod config;
pub mod connection;
pub mod enroll;
pub mod executor;
pub mod health;
pub mod installed;
pub mod join;
pub mod journal;
pub mod logs;
pub mod metrics;
pub mod peers;
pub mod releases;
pub mod sample;
pub mod selfupgrade;
pub mod service;
pub mod sockets;
pub mod supervisor;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

pub use config::{AgentArgs, AgentConfig};
use tokio_util::sync::CancellationToken;

/// A configured agent, ready to run.
pub struct Agent {
    link: connection::Link,
    /// The peer server's socket, bound at startup, and what it serves.
    peers: Option<(std::net::TcpListener, peers::PeerConfig)>,
    seeds: std::sync::Arc<peers::Seeds>,
    tls_dir: Option<std::path::PathBuf>,
    host_id: baton_common::host::HostId,
    executor: executor::Executor,
    shutdown: CancellationToken,
}

impl Agent {
    /// Prepares an agent that runs inside another program (tests, `baton
    /// demo`): like [`Agent::upgradable`], but it reports its build version
    /// and cannot upgrade itself.
    pub fn new(config: AgentConfig) -> Result<Self, String> {
        let me = selfupgrade::SelfUpgrade::in_process(&config.data_dir);
        Self::upgradable(config, me)
    }

    /// Prepares the agent: creates its data directory with mode 0700 (and
    /// tightens an existing one), checks the coordinator URL and opens the
    /// command journal and the release store. `me` comes from
    /// [`selfupgrade::boot`].
    pub fn upgradable(config: AgentConfig, me: selfupgrade::SelfUpgrade) -> Result<Self, String> {
        let dir = &config.data_dir;
        // 0700, or 0711 once a service running as its own user needs to
        // traverse it (see `Executor::open_release_to`); never more.
        let mode = |m: u32| if m & 0o777 == 0o711 { 0o711 } else { 0o700 };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .and_then(|()| std::fs::metadata(dir))
            .and_then(|m| {
                std::fs::set_permissions(
                    dir,
                    std::fs::Permissions::from_mode(mode(m.permissions().mode())),
                )
            })
            .map_err(|e| format!("cannot create the data directory {}: {e}", dir.display()))?;
        let mut vars = config.vars.clone();
        vars.insert("BATON_HOST_ID".into(), config.host_id.to_string());
        let shutdown = CancellationToken::new();
        let link = connection::Link::new(config.clone(), me.version().to_owned())?;
        // Bound now, so a taken port fails the start.
        let listener = config
            .peers
            .listen
            .map(|addr| {
                std::net::TcpListener::bind(addr)
                    .map_err(|e| format!("cannot serve peers at {addr} (--peer-listen): {e}"))
            })
            .transpose()?;
        let serve = listener.as_ref().and_then(|l| l.local_addr().ok());
        let seeds = std::sync::Arc::new(peers::Seeds::default());
        peers::forget_kept(&config.data_dir.join("downloads"));
        let executor = executor::Executor::new(
            executor::ExecutorConfig {
                data_dir: config.data_dir.clone(),
                vars,
                labels: config.labels.clone(),
                balancers: config.balancers.clone(),
                trusted_keys: config.trusted_keys.clone(),
                keep_releases: config.keep_releases,
                supervisor: supervisor::SupervisorConfig::default(),
                me,
                download: config.download,
                systemctl: config.systemctl.clone(),
                peers: peers::PeerSetup {
                    seeds: seeds.clone(),
                    creds: Some(identity(&link)),
                    serve,
                    serve_for: config.peers.serve_for,
                },
            },
            link.channel(),
            shutdown.clone(),
        )?;
        Ok(Self {
            peers: listener.map(|l| (l, config.peers.clone())),
            seeds,
            tls_dir: config.tls_dir.clone(),
            host_id: config.host_id.clone(),
            link,
            executor,
            shutdown,
        })
    }

    /// The services this host runs, now and on every change.
    pub fn services(
        &self,
    ) -> tokio::sync::watch::Receiver<
        std::collections::BTreeMap<String, baton_common::host::ServiceStatus>,
    > {
        self.executor.inventory()
    }

    /// Whether the agent holds a stream to a coordinator, now and on
    /// every change.
    pub fn connected(&self) -> tokio::sync::watch::Receiver<bool> {
        self.link.connected()
    }

    /// Runs until `shutdown` is cancelled: first picks up the services a
    /// previous run left (running ones are adopted, not restarted), then
    /// holds the stream to the coordinator. Services keep running after
    /// the agent stops.
    pub async fn run(self, shutdown: CancellationToken) {
        self.executor.recover().await;
        self.executor.confirm_upgrade(self.link.connected());
        if let Some(dir) = self.tls_dir.clone() {
            tokio::spawn(enroll::renew_forever(
                dir,
                self.host_id.clone(),
                self.link.credentials(),
                shutdown.clone(),
            ));
        }
        if let Some((listener, config)) = self.peers {
            tokio::spawn(peers::serve::run(
                listener,
                identity(&self.link),
                self.seeds.clone(),
                config,
                shutdown.clone(),
            ));
        }
        tokio::spawn(peers::sweep_forever(self.seeds.clone(), shutdown.clone()));
        let notify = baton_common::sdnotify::lifecycle(
            "running; connecting to the coordinator".to_owned(),
            shutdown.clone(),
        );
        let inner = self.shutdown.clone();
        let stop = shutdown.clone();
        let forward = tokio::spawn(async move {
            stop.cancelled().await;
            inner.cancel();
        });
        self.link.run(shutdown, self.executor.clone()).await;
        self.executor.close().await;
        forward.abort();
        let _ = notify.await;
        tracing::info!("agent stopped");
    }
}

/// The agent's TLS identity as the link holds it now.
fn identity(link: &connection::Link) -> peers::Identity {
    let creds = link.credentials();
    std::sync::Arc::new(move || creds.current())
}

/// Stops every service under `data_dir` that a (stopped) agent left
/// running, with each service's own stop signal and timeout; `vars` are the
/// agent's `--var`s plus `BATON_HOST_ID`. For tearing down demos and tests: in production the
/// services outlive the agent on purpose.
pub async fn stop_services(
    data_dir: &std::path::Path,
    vars: &std::collections::BTreeMap<String, String>,
) -> Result<usize, String> {
    let releases = releases::Releases::new(data_dir);
    let mut stopped = 0;
    for name in releases.services() {
        let Some(version) = releases.current(&name) else {
            continue;
        };
        let release_dir = releases.release_dir(&name, &version);
        for run_dir in releases.run_dirs(&name) {
            let Some(record) =
                supervisor::read_process_file(&run_dir).map_err(|e| e.to_string())?
            else {
                continue;
            };
            // Stop what actually runs, which may be an older release.
            let spec = service::load(&record.release_dir, vars)
                .or_else(|_| service::load(&release_dir, vars))
                .map_err(|e| format!("{name}: {e}"))?;
            let adopted = supervisor::Supervisor::adopt(
                &name,
                &record.release_dir,
                spec,
                &run_dir,
                supervisor::SupervisorConfig::default(),
            )
            .map_err(|e| format!("{name}: {e}"))?;
            if let Some(sup) = adopted {
                sup.stop().await.map_err(|e| format!("{name}: {e}"))?;
                stopped += 1;
            }
        }
    }
    Ok(stopped)
}
