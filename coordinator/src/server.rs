//! Assembles and runs the coordinator: TLS, the store, the fleet registry,
//! the agent and control services, health and reflection, and graceful
//! shutdown (signal → drain streams → grace timeout → final flush).

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;
use std::time::Duration;

use baton_common::tls::{ServerTls, TlsError};
use baton_proto::agent::v1::agent_service_server::AgentServiceServer;
use baton_proto::agent::v1::artifact_service_server::ArtifactServiceServer;
use baton_proto::control::v1::control_service_server::ControlServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::agent_api::{AgentApi, StreamTiming};
use crate::artifact_api::ArtifactApi;
use crate::artifacts::Artifacts;
use crate::auth;
use crate::config::{Config, StoreConfig};
use crate::control_api::ControlApi;
use crate::fleet::{self, FleetHandle};
use crate::rollout;
use crate::store::{RedbStore, Store, StoreError};

use crate::health::SERVICES;

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A certificate or key is missing or invalid (a configuration error).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The data directory cannot be created.
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The store cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The artifact directory cannot be prepared.
    #[error("cannot prepare the artifact store: {0}")]
    Artifacts(String),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl StartError {
    /// Whether the operator's configuration is at fault (exit code 2).
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Tls(_) | Self::DataDir { .. })
    }
}

/// The coordinator stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store failed while loading state.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The gRPC server failed.
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not be set up.
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    /// The fleet CA's key is there but unreadable.
    #[error("cannot read the fleet CA (for enrollment): {0}")]
    Ca(String),
    /// The artifact store could not be opened on taking the lead.
    #[error("cannot open the artifact store: {0}")]
    Artifacts(String),
    /// This coordinator led, and stopped leading (its etcd lease ended or
    /// a write was fenced off); it stopped so as to restart as a follower.
    #[error("lost the leadership: another batond may lead now; restart this one to follow")]
    LostLeadership,
}

/// What the coordinator serves from.
enum Backend {
    /// State is open and this coordinator is the only one.
    Ready {
        fleet: FleetHandle,
        fleet_task: tokio::task::JoinHandle<()>,
        artifacts: Artifacts,
        store: Arc<dyn Store>,
    },
    /// State is in etcd, shared with other coordinators: follow until
    /// elected, then lead.
    #[cfg(feature = "etcd")]
    Ha(Box<crate::ha::Candidate>),
}

/// A coordinator that has loaded its configuration and bound its port,
/// ready to run.
pub struct Coordinator {
    config: Config,
    /// The TLS configuration connections are accepted with.
    rustls: Arc<tokio_rustls::rustls::ServerConfig>,
    backend: Backend,
    listener: TcpListener,
    web: WebListeners,
}

/// The plain-HTTP endpoints, bound with the main port so that a taken
/// address fails the start.
struct WebListeners {
    metrics: Option<TcpListener>,
    dashboard: Option<TcpListener>,
    counters: Arc<crate::metrics::Metrics>,
}

impl WebListeners {
    async fn bind(config: &Config) -> Result<Self, StartError> {
        let bind = |addr: Option<SocketAddr>| async move {
            match addr {
                None => Ok(None),
                Some(addr) => TcpListener::bind(addr)
                    .await
                    .map(Some)
                    .map_err(|source| StartError::Bind { addr, source }),
            }
        };
        Ok(Self {
            metrics: bind(config.metrics_listen).await?,
            dashboard: bind(config.http_listen).await?,
            counters: Arc::default(),
        })
    }
}

impl Coordinator {
    /// Loads the TLS files, opens the store and binds the listen address;
    /// fails before anything is served.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let tls = ServerTls::load_coordinator(&config.tls_dir)?;
        let rustls = tls.rustls_config()?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .map_err(|source| StartError::DataDir {
                path: config.data_dir.display().to_string(),
                source,
            })?;
        let store: Arc<dyn Store> = match &config.store {
            StoreConfig::Embedded => {
                Arc::new(RedbStore::open(&config.data_dir.join("baton.redb"))?)
            }
            #[cfg(feature = "etcd")]
            StoreConfig::Etcd(endpoints) => {
                let etcd = crate::store::EtcdStore::connect(endpoints).await?;
                let client_tls =
                    baton_common::tls::ClientTls::load(&config.tls_dir, "coordinator")?;
                let artifacts = Artifacts::open(
                    &config.data_dir,
                    Arc::new(etcd.clone()),
                    config.max_artifact_size,
                )
                .map_err(|e| StartError::Artifacts(e.to_string()))?;
                let listener = bind_listener(config.listen).await?;
                let url = config
                    .advertise_url
                    .clone()
                    .unwrap_or_else(|| format!("https://{}", local_addr(&listener, config.listen)));
                let web = WebListeners::bind(&config).await?;
                let candidate = crate::ha::Candidate {
                    etcd,
                    artifacts,
                    url,
                    ttl: config.lease_ttl,
                    client_tls,
                };
                return Ok(Self {
                    config,
                    rustls,
                    backend: Backend::Ha(Box::new(candidate)),
                    listener,
                    web,
                });
            }
            #[cfg(not(feature = "etcd"))]
            StoreConfig::Etcd(endpoints) => {
                // The configuration refuses this already; said again here
                // for anyone building a Config by hand.
                return Err(StartError::Store(StoreError::Open {
                    path: format!("etcd://{}", endpoints.join(",")),
                    reason: "this batond was built without the etcd feature".into(),
                }));
            }
        };
        let web = WebListeners::bind(&config).await?;
        let store: Arc<dyn Store> = Arc::new(crate::store::Measured::new(
            store,
            web.counters.store.clone(),
        ));
        let artifacts = Artifacts::open(&config.data_dir, store.clone(), config.max_artifact_size)
            .map_err(|e| StartError::Artifacts(e.to_string()))?;
        let listener = bind_listener(config.listen).await?;
        let (fleet, fleet_task) = fleet::spawn_with(store.clone(), web.counters.clone()).await?;
        Ok(Self {
            config,
            rustls,
            backend: Backend::Ready {
                fleet,
                fleet_task,
                artifacts,
                store,
            },
            listener,
            web,
        })
    }

    /// A handle to the fleet registry, for embedding the coordinator
    /// (tests, the demo); `None` with an etcd store, where it exists only
    /// while leading. Drop every clone before the coordinator stops: the
    /// registry's final flush waits for the last handle.
    pub fn fleet(&self) -> Option<FleetHandle> {
        match &self.backend {
            Backend::Ready { fleet, .. } => Some(fleet.clone()),
            #[cfg(feature = "etcd")]
            Backend::Ha(_) => None,
        }
    }

    /// The address actually bound (differs from the configured one for
    /// port 0).
    pub fn local_addr(&self) -> SocketAddr {
        local_addr(&self.listener, self.config.listen)
    }

    /// Where the metrics are served, when they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.web.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where the dashboard is served, when it is.
    pub fn dashboard_addr(&self) -> Option<SocketAddr> {
        self.web
            .dashboard
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` is cancelled, then drains: open streams are
    /// told to go away, given `shutdown_grace` to close, and the registry
    /// is flushed to the store.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServeError> {
        let addr = self.local_addr();
        let grace = self.config.shutdown_grace;
        let timing = StreamTiming::from_timeout(self.config.agent_timeout);
        let tasks = TaskTracker::new();
        let listener = Arc::new(self.listener);
        // Cancelled when a leader stops leading (never without etcd).
        #[cfg_attr(not(feature = "etcd"), allow(unused_mut))]
        let mut lost = CancellationToken::new();
        #[cfg(feature = "etcd")]
        let mut leadership = None;
        let (fleet, fleet_task, artifacts, store) = match self.backend {
            Backend::Ready {
                fleet,
                fleet_task,
                artifacts,
                store,
            } => (fleet, fleet_task, artifacts, store),
            #[cfg(feature = "etcd")]
            Backend::Ha(candidate) => {
                // While following, the HTTP endpoints answer too: metrics
                // without the fleet's gauges, the dashboard pointing at
                // the leader. They hand their ports over when this leads.
                let following = shutdown.child_token();
                let mut follower_tasks = Vec::new();
                if let Some(listener) = self.web.metrics.as_ref().and_then(dup_listener) {
                    let counters = self.web.counters.clone();
                    let render = move || {
                        let counters = counters.clone();
                        async move { counters.render(None) }
                    };
                    follower_tasks.push(tokio::spawn(baton_common::metrics::serve(
                        listener,
                        render,
                        following.clone(),
                    )));
                }
                if let Some(listener) = self.web.dashboard.as_ref().and_then(dup_listener) {
                    let stop = following.clone();
                    follower_tasks.push(tokio::spawn(async move {
                        axum::serve(listener, crate::web::follower_router())
                            .with_graceful_shutdown(async move { stop.cancelled().await })
                            .await
                    }));
                }
                let led = crate::ha::follow_then_lead(
                    *candidate,
                    self.rustls.clone(),
                    listener.clone(),
                    shutdown.clone(),
                )
                .await;
                following.cancel();
                for mut task in follower_tasks {
                    if tokio::time::timeout(grace, &mut task).await.is_err() {
                        task.abort();
                    }
                }
                let Some(led) = led? else {
                    info!("batond stopped while following");
                    return Ok(());
                };
                let store: Arc<dyn Store> = Arc::new(crate::store::Measured::new(
                    Arc::new(led.store.clone()),
                    self.web.counters.store.clone(),
                ));
                let artifacts = Artifacts::open(
                    &self.config.data_dir,
                    store.clone(),
                    self.config.max_artifact_size,
                )
                .map_err(|e| ServeError::Artifacts(e.to_string()))?;
                for missing in artifacts
                    .list()
                    .await
                    .map_err(|e| ServeError::Artifacts(e.to_string()))?
                    .into_iter()
                    .filter(|a| a.origin.is_none() && !artifacts.has_blob(&a.digest))
                {
                    warn!(name = %missing.name, version = %missing.version, digest = %missing.digest, "this leader lacks the payload (its pusher died before it was copied); push the artifact again");
                }
                let (fleet, fleet_task) =
                    fleet::spawn_with(store.clone(), self.web.counters.clone()).await?;
                let (watch_lost, stop) = (led.lost.clone(), shutdown.clone());
                tokio::spawn(async move {
                    watch_lost.cancelled().await;
                    tracing::error!("lost the leadership; stopping");
                    stop.cancel();
                });
                lost = led.lost.clone();
                leadership = Some(led);
                (fleet, fleet_task, artifacts, store)
            }
        };
        // The driver stops on `shutdown` and then drops its fleet handle,
        // which the registry's final flush waits for.
        let (rollouts, rollout_task) = rollout::driver::spawn_with(
            store.clone(),
            fleet.clone(),
            artifacts.clone(),
            shutdown.clone(),
            rollout::driver::DriverOptions {
                metrics: self.web.counters.clone(),
                prometheus: self.config.prometheus_url.clone(),
                calendar: self.config.calendar.clone(),
                balancers: self.config.balancers.clone(),
            },
        )
        .await?;

        let (health, health_service) = tonic_health::server::health_reporter();
        for name in SERVICES {
            health
                .set_service_status(*name, ServingStatus::Serving)
                .await;
        }
        // Reflection in both versions: v1, and v1alpha that many clients
        // still speak (grpcio's reflection client, older grpcurl, Postman).
        let reflection_builder = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(baton_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection = reflection_builder()
            .build_v1()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        let reflection_alpha = reflection_builder()
            .build_v1alpha()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        use crate::limits::{MAX_FETCH_REQUEST, MAX_MESSAGE};
        use tonic::service::interceptor::InterceptedService;
        let audit = crate::audit::Audit::with_retention(store.clone(), self.config.audit_retention);
        let agents = InterceptedService::new(
            AgentServiceServer::new(AgentApi::new(
                fleet.clone(),
                timing,
                shutdown.clone(),
                tasks.clone(),
                audit.clone(),
            ))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
            auth::require_agent,
        );
        let mut web_tasks = Vec::new();
        if let Some(listener) = self.web.metrics {
            let (counters, fleet, rollouts) =
                (self.web.counters.clone(), fleet.clone(), rollouts.clone());
            let render = move || {
                let (counters, fleet, rollouts) =
                    (counters.clone(), fleet.clone(), rollouts.clone());
                async move {
                    let hosts =
                        fleet.list().await.ok().map(|hosts| {
                            (hosts.iter().filter(|h| h.connected).count(), hosts.len())
                        });
                    let rollouts = rollouts
                        .list()
                        .await
                        .ok()
                        .map(|all| all.iter().map(|r| r.state).collect());
                    counters.render(Some(crate::metrics::Gauges { hosts, rollouts }))
                }
            };
            info!(addr = ?listener.local_addr().ok(), "serving metrics at /metrics");
            web_tasks.push(tokio::spawn(baton_common::metrics::serve(
                listener,
                render,
                shutdown.clone(),
            )));
        }
        if let Some(listener) = self.web.dashboard {
            let addr = listener.local_addr().ok();
            if addr.is_some_and(|a| !a.ip().is_loopback()) {
                warn!(addr = ?addr, "the dashboard is reachable from other machines over plain HTTP, and anyone reaching it can read the fleet");
            }
            info!(addr = ?addr, "serving the dashboard");
            web_tasks.push(tokio::spawn(crate::web::serve(
                listener,
                crate::web::Dashboard {
                    fleet: fleet.clone(),
                    rollouts: rollouts.clone(),
                    store: store.clone(),
                    audit: audit.clone(),
                    shutdown: shutdown.clone(),
                    live: Arc::default(),
                },
            )));
        }
        let ca = baton_common::pki::Ca::load(&self.config.tls_dir)
            .map_err(|e| ServeError::Ca(e.to_string()))?;
        if ca.is_none() {
            info!("no ca-key.pem in the TLS directory: enrollment and certificate renewal are off");
        }
        // Join tokens carry the CA's fingerprint (the same file the TLS
        // configuration was built from at bind).
        let ca_sha256 = baton_common::tls::read_ca(&self.config.tls_dir.join("ca.pem"))
            .map(|pem| baton_common::tls::ca_fingerprint(&pem))
            .unwrap_or_default();
        let enrollment = crate::enroll::Enrollment::new(
            store.clone(),
            ca,
            ca_sha256,
            self.config.agent_cert_lifetime,
            audit.clone(),
        );
        let enroll_api =
            baton_proto::agent::v1::enrollment_service_server::EnrollmentServiceServer::new(
                crate::enroll::EnrollmentApi(enrollment.clone()),
            )
            .max_decoding_message_size(MAX_FETCH_REQUEST);
        // The same service for clients without a certificate, with their
        // smaller limits.
        let anonymous_enroll_api =
            baton_proto::agent::v1::enrollment_service_server::EnrollmentServiceServer::new(
                crate::enroll::EnrollmentApi(enrollment.clone()),
            )
            .max_decoding_message_size(crate::limits::MAX_ANONYMOUS_MESSAGE)
            .max_encoding_message_size(MAX_FETCH_REQUEST);
        // Roles and the audit log around everything, so that callers the
        // operator-only interceptor would refuse are audited too.
        let control = crate::authz::Authorized::new(
            InterceptedService::new(
                ControlServiceServer::new(ControlApi::new(
                    fleet.clone(),
                    artifacts.clone(),
                    rollouts,
                    audit.clone(),
                    enrollment,
                    shutdown.clone(),
                    tasks.clone(),
                ))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
                auth::require_operator,
            ),
            audit,
        );
        let artifact_api = InterceptedService::new(
            ArtifactServiceServer::new(ArtifactApi::new(
                artifacts.clone(),
                fleet.clone(),
                self.web.counters.clone(),
                crate::swarm::SwarmConfig {
                    coordinator_slots: self.config.artifact_uploads,
                    ..crate::swarm::SwarmConfig::default()
                },
                shutdown.clone(),
                tasks.clone(),
            ))
            .max_decoding_message_size(MAX_FETCH_REQUEST)
            .max_encoding_message_size(MAX_MESSAGE),
            auth::require_agent_or_coordinator,
        );
        drop(fleet);

        // HTTP/2 keepalive catches dead peers below the application's own
        // heartbeats (a vanished host whose socket never closes).
        let keepalive = timing.heartbeat_interval.max(Duration::from_secs(1));
        let split = crate::listener::accept(listener, self.rustls.clone(), shutdown.clone());
        let anonymous = crate::limits::anonymous_server()
            .layer(crate::limits::StatusLayer)
            .layer(auth::AnonymousGateLayer)
            .add_service(anonymous_enroll_api)
            .serve_with_incoming_shutdown(split.anonymous, shutdown.clone().cancelled_owned());
        let server = crate::limits::server()
            .http2_keepalive_interval(Some(keepalive))
            .http2_keepalive_timeout(Some(timing.silence_timeout))
            .layer(crate::limits::StatusLayer)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(agents)
            .add_service(control)
            .add_service(artifact_api)
            .add_service(enroll_api)
            .serve_with_incoming_shutdown(split.certified, {
                let shutdown = shutdown.clone();
                let health = health.clone();
                async move {
                    shutdown.cancelled().await;
                    for name in SERVICES {
                        health
                            .set_service_status(*name, ServingStatus::NotServing)
                            .await;
                    }
                }
            });
        info!(%addr, agent_timeout = %humantime::format_duration(timing.silence_timeout), "batond serving");

        // Both servers end together: the certified one's result is what
        // counts (the anonymous one only ever serves enrollment).
        let mut server = Box::pin(async move {
            let (served, anonymous) = tokio::join!(server, anonymous);
            if let Err(e) = anonymous {
                warn!(error = %e, "the server for clients without a certificate failed");
            }
            served
        });
        let served = tokio::select! {
            r = &mut server => r,
            _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                warn!(grace = %humantime::format_duration(grace), "connections still open after the shutdown grace; closing them");
                Ok(())
            }
        };
        info!("draining");
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            warn!("some stream tasks did not end within the shutdown grace");
        }
        // Dropping the server drops the services' registry handles; the
        // registry then flushes and ends.
        drop(server);
        // They hold registry handles: one that hangs on a stuck client is
        // stopped, so that the registry's final flush still happens.
        for mut task in web_tasks {
            if tokio::time::timeout(grace, &mut task).await.is_err() {
                warn!("an HTTP endpoint did not stop within the shutdown grace; closing it");
                task.abort();
                let _ = task.await;
            }
        }
        if tokio::time::timeout(grace, rollout_task).await.is_err() {
            warn!("the rollout driver did not stop within the shutdown grace");
        }
        if tokio::time::timeout(grace, fleet_task).await.is_err() {
            warn!("the fleet registry did not flush within the shutdown grace");
        }
        if lost.is_cancelled() {
            return Err(ServeError::LostLeadership);
        }
        #[cfg(feature = "etcd")]
        if let Some(led) = leadership {
            led.resign().await;
        }
        info!("batond stopped");
        served.map_err(ServeError::from)
    }
}

/// A second handle on a bound listener (the follower's servers use it
/// while the original waits for the leader's).
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
fn dup_listener(listener: &TcpListener) -> Option<TcpListener> {
    let dup = socket_dup(listener)
        .map_err(|e| warn!(error = %e, "cannot share an HTTP listener while following"))
        .ok()?;
    TcpListener::from_std(dup).ok()
}

#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
fn socket_dup(listener: &TcpListener) -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::AsFd;
    let fd = listener.as_fd().try_clone_to_owned()?;
    let std = std::net::TcpListener::from(fd);
    std.set_nonblocking(true)?;
    Ok(std)
}

/// The address a listener bound (a bound listener always has one).
fn local_addr(listener: &TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}

/// Connections the kernel queues before `batond` accepts them: a fleet of
/// agents reconnects at once after a coordinator restart.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind_listener(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let bind = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind().map_err(|source| StartError::Bind { addr, source })
}
