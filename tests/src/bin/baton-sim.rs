//! `baton-sim`: a fleet of simulated agents in one process, for measuring
//! `batond` at fleet scale.
//!
//! Every simulated agent is what `batond` sees from a real one: its own
//! certificate (issued here with the fleet CA's key), its own TCP
//! connection with mutual TLS, one `AgentService.Connect` stream with a
//! hello carrying labels and a service inventory, heartbeats at the pace
//! the welcome asks for, and answers to every command. Only the work on the
//! host is simulated:
//!
//! - `noop` succeeds at once;
//! - `stage` succeeds after `--stage-delay` (nothing is downloaded);
//! - `activate` and `rollback` take `--activation-delay` plus the command's
//!   `min_healthy_time`, then report the new version in the inventory and
//!   succeed — or, an activation with probability `--failure-rate`, fail
//!   without changing anything (a rollback never fails by chance);
//! - `remove` drops the service.
//!
//! Like the real agent, a simulated agent answers a re-sent command id
//! with its recorded result, refuses to activate a version it has not
//! staged, and reconnects with the agent's own capped, jittered backoff,
//! forever.
//!
//! Progress goes to stdout as JSON lines: `{"event":"ready",...}` once the
//! certificates are made, `{"event":"all_connected","unix_ms":...}` each
//! time the whole fleet is connected again, and a `status` line every
//! `--report-interval`.

#![allow(missing_docs)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use baton_common::backoff::Backoff;
use baton_common::command::{Command, CommandKind, HealthGate};
use baton_common::host::HostId;
use baton_common::pki::Ca;
use baton_proto::agent::v1 as pb;
use baton_proto::agent::v1::agent_service_client::AgentServiceClient;
use clap::Parser;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Simulated Baton agents: N real mTLS agent streams from one process.
#[derive(Parser, Debug)]
#[command(name = "baton-sim", version)]
struct Args {
    /// The coordinator's URL.
    #[arg(long, default_value = "https://127.0.0.1:7443")]
    coordinator: String,
    /// The fleet's TLS directory: `ca.pem` and `ca-key.pem`, with which
    /// every simulated agent gets its own certificate.
    #[arg(long)]
    tls_dir: PathBuf,
    /// How many agents to simulate.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Host ids are this prefix and a five-digit number: `sim-00001`, ….
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// A service every host runs, as NAME=VERSION; repeatable.
    #[arg(long = "service", default_value = "demo=1.0.0")]
    services: Vec<String>,
    /// A label every host carries, as KEY=VALUE; repeatable.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// How long an activation takes before its health gate
    /// (`min_healthy_time`) starts.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    activation_delay: Duration,
    /// How long staging takes.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    stage_delay: Duration,
    /// The share of activations that fail, from 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
    /// The first reconnect delay (the agent's backoff).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    reconnect_initial: Duration,
    /// The cap on reconnect delays.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    reconnect_max: Duration,
    /// First connection attempts in flight at once, so that starting a
    /// large fleet is not a single burst of handshakes. Reconnects are not
    /// held back: real agents are not coordinated either.
    #[arg(long, default_value_t = 512)]
    connect_concurrency: usize,
    /// How often a status line is printed.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    report_interval: Duration,
}

/// What every agent shares: the settings and the fleet-wide counters.
struct Shared {
    url: String,
    agents: usize,
    activation_delay: Duration,
    stage_delay: Duration,
    failure_rate: f64,
    reconnect_initial: Duration,
    reconnect_max: Duration,
    labels: baton_common::host::Labels,
    connect_slots: Semaphore,
    /// Agents with a welcomed stream right now.
    connected: AtomicUsize,
    /// Welcomed streams since the start.
    sessions: AtomicU64,
    /// Connection attempts that failed.
    failed_attempts: AtomicU64,
    /// Commands answered.
    commands: AtomicU64,
    /// Whether the whole fleet was connected at the last change.
    all: AtomicBool,
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

fn emit(line: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

impl Shared {
    fn up(&self) {
        let now = self.connected.fetch_add(1, Ordering::SeqCst) + 1;
        self.sessions.fetch_add(1, Ordering::Relaxed);
        if now == self.agents && !self.all.swap(true, Ordering::SeqCst) {
            emit(&serde_json::json!({
                "event": "all_connected",
                "unix_ms": unix_ms(),
                "connected": now,
            }));
        }
    }

    fn down(&self) {
        self.connected.fetch_sub(1, Ordering::SeqCst);
        self.all.store(false, Ordering::SeqCst);
    }
}

/// One service on a simulated host.
struct Service {
    version: String,
    /// Releases on the host: staged ones and the ones it ran.
    releases: BTreeSet<String>,
}

/// A finished command's answer, kept for a re-sent id.
const KEEP_RESULTS: usize = 64;

struct SimAgent {
    host: HostId,
    tls: ClientTlsConfig,
    services: BTreeMap<String, Service>,
    /// Answers of finished commands by id (the journal).
    results: HashMap<String, pb::CommandUpdate>,
    /// Their ids, oldest first, to bound `results`.
    order: std::collections::VecDeque<String>,
    /// Commands still running.
    running: HashSet<String>,
    shared: Arc<Shared>,
}

/// What a running command reports when it ends.
struct Finished {
    id: String,
    /// The service's new version on success, if it changed.
    change: Option<(String, Option<String>)>,
    /// `Err(reason)` on failure.
    result: Result<(), String>,
}

fn done(id: &str, result: &Result<(), String>) -> pb::CommandUpdate {
    pb::CommandUpdate {
        command_id: id.to_owned(),
        phase: pb::CommandPhase::Done as i32,
        progress_percent: 100,
        outcome: match result {
            Ok(()) => pb::CommandOutcome::Succeeded as i32,
            Err(_) => pb::CommandOutcome::Failed as i32,
        },
        error: result.as_ref().err().cloned().unwrap_or_default(),
        // No health gate runs on a simulated host.
        health_wait: None,
        // What fails a simulated host is its script, not a real cause.
        failure: match result {
            Ok(()) => pb::FailureKind::Unspecified as i32,
            Err(_) => pb::FailureKind::Internal as i32,
        },
        ..Default::default()
    }
}

fn msg(kind: pb::agent_message::Kind) -> pb::AgentMessage {
    pb::AgentMessage { kind: Some(kind) }
}

impl SimAgent {
    fn inventory(&self) -> Vec<pb::ServiceStatus> {
        self.services
            .iter()
            .map(|(name, s)| pb::ServiceStatus {
                name: name.clone(),
                version: s.version.clone(),
                state: pb::ServiceState::Running as i32,
                healthy: true,
            })
            .collect()
    }

    fn hello(&self) -> pb::AgentMessage {
        msg(pb::agent_message::Kind::Hello(pb::Hello {
            host_id: self.host.to_string(),
            agent_version: baton_common::VERSION.to_owned(),
            labels: self
                .shared
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            services: self.inventory(),
        }))
    }

    fn record(&mut self, update: pb::CommandUpdate) {
        self.running.remove(&update.command_id);
        self.order.push_back(update.command_id.clone());
        self.results.insert(update.command_id.clone(), update);
        while self.order.len() > KEEP_RESULTS {
            if let Some(old) = self.order.pop_front() {
                self.results.remove(&old);
            }
        }
        self.shared.commands.fetch_add(1, Ordering::Relaxed);
    }

    /// Starts a command, or answers it from the journal. Returns the
    /// messages to send now.
    fn command(
        &mut self,
        command: pb::Command,
        finished: &mpsc::UnboundedSender<Finished>,
    ) -> Vec<pb::AgentMessage> {
        if let Some(update) = self.results.get(&command.id) {
            return vec![msg(pb::agent_message::Kind::CommandUpdate(update.clone()))];
        }
        if self.running.contains(&command.id) {
            return vec![];
        }
        let id = command.id.clone();
        let command = match Command::try_from(command) {
            Ok(c) => c,
            Err(e) => {
                let update = done(&id, &Err(format!("invalid command: {}", e.reason)));
                self.record(update.clone());
                return vec![msg(pb::agent_message::Kind::CommandUpdate(update))];
            }
        };
        if command.deadline < SystemTime::now() {
            let update = done(&id, &Err("the command arrived after its deadline".into()));
            self.record(update.clone());
            return vec![msg(pb::agent_message::Kind::CommandUpdate(update))];
        }
        let (delay, change, result) = match command.kind {
            // Simulated activations cannot be cut short: a cancel is
            // answered and changes nothing.
            CommandKind::Noop | CommandKind::Cancel { .. } => {
                let update = done(&id, &Ok(()));
                self.record(update.clone());
                return vec![msg(pb::agent_message::Kind::CommandUpdate(update))];
            }
            CommandKind::Stage {
                service, version, ..
            } => {
                self.services
                    .entry(service.clone())
                    .or_insert_with(|| Service {
                        version: String::new(),
                        releases: BTreeSet::new(),
                    })
                    .releases
                    .insert(version);
                (self.shared.stage_delay, None, Ok(()))
            }
            CommandKind::Activate {
                ref service,
                ref version,
                gate: HealthGate {
                    min_healthy_time, ..
                },
                ..
            }
            | CommandKind::Rollback {
                ref service,
                ref version,
                gate: HealthGate {
                    min_healthy_time, ..
                },
            } => {
                let (service, version) = (service.clone(), version.clone());
                let staged = self
                    .services
                    .get(&service)
                    .is_some_and(|s| s.releases.contains(&version));
                // A rollback returns to a release that ran: it does not
                // fail by chance.
                let may_fail = matches!(command.kind, CommandKind::Activate { .. });
                let result = if !staged {
                    Err(format!("{service} {version} is not staged on this host"))
                } else if may_fail && fastrand::f64() < self.shared.failure_rate {
                    Err(format!(
                        "{service} {version} did not turn healthy (simulated failure)"
                    ))
                } else {
                    Ok(())
                };
                (
                    self.shared.activation_delay + min_healthy_time,
                    Some((service, Some(version))),
                    result,
                )
            }
            CommandKind::Remove { service } => (Duration::ZERO, Some((service, None)), Ok(())),
        };
        self.running.insert(id.clone());
        let accepted = pb::CommandUpdate {
            command_id: id.clone(),
            phase: pb::CommandPhase::Accepted as i32,
            ..Default::default()
        };
        let finished = finished.clone();
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let _ = finished.send(Finished { id, change, result });
        });
        vec![msg(pb::agent_message::Kind::CommandUpdate(accepted))]
    }

    /// Applies a finished command; returns the messages to send.
    fn finish(&mut self, f: Finished) -> Vec<pb::AgentMessage> {
        let mut out = Vec::new();
        if let (Ok(()), Some((service, version))) = (&f.result, f.change) {
            match version {
                Some(v) => {
                    let s = self.services.entry(service).or_insert_with(|| Service {
                        version: String::new(),
                        releases: BTreeSet::new(),
                    });
                    s.releases.insert(v.clone());
                    s.version = v;
                }
                None => {
                    self.services.remove(&service);
                }
            }
            out.push(msg(pb::agent_message::Kind::Inventory(
                pb::InventoryUpdate {
                    services: self.inventory(),
                },
            )));
        }
        let update = done(&f.id, &f.result);
        self.record(update.clone());
        out.push(msg(pb::agent_message::Kind::CommandUpdate(update)));
        out
    }

    async fn run(mut self) {
        let shared = self.shared.clone();
        let (finished_tx, mut finished_rx) = mpsc::unbounded_channel();
        let mut backoff = Backoff::new(shared.reconnect_initial, shared.reconnect_max);
        let endpoint = match Endpoint::from_shared(shared.url.clone())
            .and_then(|e| e.tls_config(self.tls.clone()))
        {
            Ok(e) => e
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true),
            Err(e) => {
                eprintln!("baton-sim: {}: bad coordinator URL: {e}", self.host);
                std::process::exit(2);
            }
        };
        let mut welcomed_once = false;
        loop {
            let slot = if welcomed_once {
                None
            } else {
                shared.connect_slots.acquire().await.ok()
            };
            let session = self.open(&endpoint).await;
            drop(slot);
            match session {
                Ok((tx, inbound, silence, heartbeat)) => {
                    welcomed_once = true;
                    shared.up();
                    backoff.reset();
                    self.session(
                        tx,
                        inbound,
                        silence,
                        heartbeat,
                        &finished_tx,
                        &mut finished_rx,
                    )
                    .await;
                    shared.down();
                }
                Err(_) => {
                    shared.failed_attempts.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// Connects, says hello and waits for the welcome.
    async fn open(
        &mut self,
        endpoint: &Endpoint,
    ) -> Result<
        (
            mpsc::Sender<pb::AgentMessage>,
            tonic::Streaming<pb::CoordinatorMessage>,
            Duration,
            Duration,
        ),
        String,
    > {
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        let mut client = AgentServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(16);
        let _ = tx.try_send(self.hello());
        let mut inbound = tokio::time::timeout(
            Duration::from_secs(10),
            client.connect(ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| "no answer to the stream".to_owned())?
        .map_err(|s| s.to_string())?
        .into_inner();
        let welcome = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| "no welcome".to_owned())?
            .map_err(|s| s.to_string())?;
        match welcome.and_then(|m| m.kind) {
            Some(pb::coordinator_message::Kind::Welcome(w)) => {
                let d = |d: Option<prost_types::Duration>, default| {
                    d.as_ref()
                        .and_then(baton_common::time::from_duration)
                        .unwrap_or(default)
                };
                let silence = d(w.silence_timeout, Duration::from_secs(10));
                let heartbeat = d(w.heartbeat_interval, silence / 3);
                Ok((tx, inbound, silence, heartbeat))
            }
            other => Err(format!("expected a welcome, got {other:?}")),
        }
    }

    async fn session(
        &mut self,
        tx: mpsc::Sender<pb::AgentMessage>,
        mut inbound: tonic::Streaming<pb::CoordinatorMessage>,
        silence: Duration,
        heartbeat: Duration,
        finished_tx: &mpsc::UnboundedSender<Finished>,
        finished_rx: &mut mpsc::UnboundedReceiver<Finished>,
    ) {
        // Spread heartbeats over the interval, as agents started at
        // different times would.
        let first = heartbeat.mul_f64(fastrand::f64());
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + first, heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0;
        loop {
            let out = tokio::select! {
                next = tokio::time::timeout(silence, inbound.message()) => match next {
                    Ok(Ok(Some(m))) => match m.kind {
                        Some(pb::coordinator_message::Kind::Command(c)) => self.command(c, finished_tx),
                        _ => vec![],
                    },
                    _ => return,
                },
                Some(f) = finished_rx.recv() => self.finish(f),
                _ = beat.tick() => {
                    seq += 1;
                    vec![msg(pb::agent_message::Kind::Heartbeat(pb::Heartbeat { seq }))]
                }
            };
            for m in out {
                if tx.send(m).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn parse_pairs(items: &[String], what: &str) -> Vec<(String, String)> {
    items
        .iter()
        .map(|s| {
            baton_common::host::parse_key_value(s).unwrap_or_else(|e| {
                eprintln!("baton-sim: --{what} {s:?}: {e}");
                std::process::exit(2);
            })
        })
        .collect()
}

/// Issues a certificate for every host, on every core.
fn certificates(ca: &Ca, ca_pem: &[u8], hosts: &[HostId]) -> Vec<ClientTlsConfig> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = hosts.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = hosts
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|host| {
                            let (key_pem, csr) = baton_common::pki::agent_csr()?;
                            let cert_pem =
                                ca.sign_agent(&csr, host, Duration::from_secs(7 * 86_400))?;
                            Ok::<_, baton_common::pki::PkiError>(
                                ClientTlsConfig::new()
                                    .ca_certificate(Certificate::from_pem(ca_pem))
                                    .identity(Identity::from_pem(cert_pem, key_pem)),
                            )
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| match w.join() {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    eprintln!("baton-sim: cannot issue agent certificates: {e}");
                    std::process::exit(1);
                }
                Err(_) => std::process::exit(1),
            })
            .collect()
    })
}

fn main() {
    let args = Args::parse();
    if !(0.0..=1.0).contains(&args.failure_rate) {
        eprintln!("baton-sim: --failure-rate must be between 0 and 1");
        std::process::exit(2);
    }
    let open_files = baton_coordinator::limits::raise_open_files();
    // A connection each, plus room for the runtime and the output.
    if open_files < args.agents as u64 + 64 {
        eprintln!(
            "baton-sim: {} agents need about {} open files; the limit here is {open_files}",
            args.agents,
            args.agents + 64
        );
        std::process::exit(2);
    }
    let ca = match Ca::load(&args.tls_dir) {
        Ok(Some(ca)) => ca,
        Ok(None) => {
            eprintln!(
                "baton-sim: {} has no ca-key.pem: the simulator issues each agent its own certificate with the fleet CA",
                args.tls_dir.display()
            );
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("baton-sim: {e}");
            std::process::exit(2);
        }
    };
    let ca_pem = match baton_common::tls::read_ca(&args.tls_dir.join("ca.pem")) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("baton-sim: {e}");
            std::process::exit(2);
        }
    };
    let services = parse_pairs(&args.services, "service");
    let labels = parse_pairs(&args.labels, "label").into_iter().collect();
    let hosts: Vec<HostId> = (1..=args.agents)
        .map(|i| {
            HostId::try_from(format!("{}{i:05}", args.prefix)).unwrap_or_else(|e| {
                eprintln!("baton-sim: --prefix {:?}: {e}", args.prefix);
                std::process::exit(2);
            })
        })
        .collect();

    let t0 = Instant::now();
    let tls = certificates(&ca, &ca_pem, &hosts);
    emit(&serde_json::json!({
        "event": "ready",
        "agents": args.agents,
        "certificates_ms": t0.elapsed().as_millis(),
        "open_files": open_files,
    }));

    let shared = Arc::new(Shared {
        url: args.coordinator.clone(),
        agents: args.agents,
        activation_delay: args.activation_delay,
        stage_delay: args.stage_delay,
        failure_rate: args.failure_rate,
        reconnect_initial: args.reconnect_initial,
        reconnect_max: args.reconnect_max,
        labels,
        connect_slots: Semaphore::new(args.connect_concurrency.max(1)),
        connected: AtomicUsize::new(0),
        sessions: AtomicU64::new(0),
        failed_attempts: AtomicU64::new(0),
        commands: AtomicU64::new(0),
        all: AtomicBool::new(false),
    });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("baton-sim: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async move {
        for (host, tls) in hosts.into_iter().zip(tls) {
            let agent = SimAgent {
                host,
                tls,
                services: services
                    .iter()
                    .map(|(name, version)| {
                        (
                            name.clone(),
                            Service {
                                version: version.clone(),
                                releases: BTreeSet::from([version.clone()]),
                            },
                        )
                    })
                    .collect(),
                results: HashMap::new(),
                order: Default::default(),
                running: HashSet::new(),
                shared: shared.clone(),
            };
            tokio::spawn(agent.run());
        }
        let mut tick = tokio::time::interval(args.report_interval);
        let start = Instant::now();
        let stop = baton_common::process::cancel_on_signal(Default::default());
        let stop = match stop {
            Ok(s) => s,
            Err(e) => {
                eprintln!("baton-sim: cannot handle signals: {e}");
                std::process::exit(1);
            }
        };
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = tick.tick() => emit(&serde_json::json!({
                    "event": "status",
                    "elapsed_ms": start.elapsed().as_millis(),
                    "connected": shared.connected.load(Ordering::SeqCst),
                    "sessions": shared.sessions.load(Ordering::Relaxed),
                    "failed_attempts": shared.failed_attempts.load(Ordering::Relaxed),
                    "commands": shared.commands.load(Ordering::Relaxed),
                })),
            }
        }
    });
}
