//! The agent's own Prometheus metrics (`baton-agent --metrics-listen`):
//! whether it is connected, its reconnects, the commands it ran, how long
//! activations and health waits took, failed health checks, each
//! service's up and healthy state, the build and the process.
//!
//! One agent runs per process, so the counters are process-wide.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use baton_common::metrics::{Counter, CounterVec, Exposition, Histogram};

/// The agent's counters.
#[derive(Debug)]
pub struct AgentMetrics {
    /// Streams opened to a coordinator.
    pub connects: Counter,
    /// Streams opened after an earlier one was lost.
    pub reconnects: Counter,
    /// Commands finished, by kind and result.
    pub commands: CounterVec,
    /// Whole activations (hooks, swap, restart, health gate).
    pub activation: Histogram,
    /// Health gates, from the new process's start to healthy (or giving up).
    pub health_wait: Histogram,
    /// Checks of a running service that did not pass once it had passed
    /// (a starting process's probes before it answers are not failures;
    /// a health gate that gives up is a failed activation, counted in
    /// `commands`).
    pub health_check_failures: Counter,
    /// Payload bytes served to other agents.
    pub peer_sent_bytes: Counter,
    /// Payload bytes received and checked, by source (`coordinator`,
    /// `peer`).
    pub fetched_bytes: CounterVec,
    /// Peers that sent a piece not matching its signed hash.
    pub corrupt_pieces: Counter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            connects: Counter::default(),
            reconnects: Counter::default(),
            // Every kind and result from the first scrape, at 0.
            commands: CounterVec::with_values(&[
                &["activate", "failed"],
                &["activate", "succeeded"],
                &["remove", "failed"],
                &["remove", "succeeded"],
                &["rollback", "failed"],
                &["rollback", "succeeded"],
                &["stage", "failed"],
                &["stage", "succeeded"],
            ]),
            activation: Histogram::default(),
            health_wait: Histogram::default(),
            health_check_failures: Counter::default(),
            peer_sent_bytes: Counter::default(),
            fetched_bytes: CounterVec::with_values(&[&["coordinator"], &["origin"], &["peer"]]),
            corrupt_pieces: Counter::default(),
        }
    }
}

/// This process's metrics.
pub static METRICS: LazyLock<AgentMetrics> = LazyLock::new(AgentMetrics::default);

/// The text-format document; `connected` is the stream's state now,
/// `services` what the host runs.
pub fn render(connected: bool, services: &[baton_common::host::ServiceStatus]) -> String {
    let m = &*METRICS;
    let mut e = Exposition::default();
    e.build_info("baton-agent");
    e.process();
    let by_service =
        |f: &dyn Fn(&baton_common::host::ServiceStatus) -> bool| -> Vec<(Vec<String>, f64)> {
            services
                .iter()
                .map(|s| {
                    (
                        vec![s.name.clone(), s.version.clone()],
                        if f(s) { 1.0 } else { 0.0 },
                    )
                })
                .collect()
        };
    e.gauge_family(
        "baton_agent_service_up",
        "Whether the service's process runs (1) or not (0), by service and version.",
        &["service", "version"],
        &by_service(&|s| s.state == baton_common::host::ServiceState::Running),
    );
    e.gauge_family(
        "baton_agent_service_healthy",
        "Whether the service's health check passes (1) or not (0), by service and version.",
        &["service", "version"],
        &by_service(&|s| s.healthy),
    );
    e.gauge(
        "baton_agent_connected",
        "Whether the agent holds a stream to a coordinator (1) or not (0).",
        if connected { 1.0 } else { 0.0 },
    );
    e.counter(
        "baton_agent_stream_connects_total",
        "Streams opened to a coordinator.",
        &m.connects,
    );
    e.counter(
        "baton_agent_stream_reconnects_total",
        "Streams opened after an earlier stream of this process was lost.",
        &m.reconnects,
    );
    e.counter_vec(
        "baton_agent_commands_total",
        "Commands from the coordinator that finished, by kind and result.",
        &["kind", "result"],
        &m.commands,
    );
    e.histogram(
        "baton_agent_activation_duration_seconds",
        "Activations and rollbacks, from the command's start to its end.",
        &m.activation,
    );
    e.histogram(
        "baton_agent_health_wait_duration_seconds",
        "Health gates, from the start of waiting to healthy or giving up.",
        &m.health_wait,
    );
    e.counter(
        "baton_agent_health_check_failures_total",
        "Health checks of a running service that failed after it had passed (a starting process's first probes are not counted).",
        &m.health_check_failures,
    );
    e.counter(
        "baton_agent_peer_sent_bytes_total",
        "Payload bytes this agent served to other agents (--peer-listen).",
        &m.peer_sent_bytes,
    );
    e.counter_vec(
        "baton_agent_fetched_bytes_total",
        "Payload bytes received and checked, by source (coordinator, origin, peer).",
        &["source"],
        &m.fetched_bytes,
    );
    e.counter(
        "baton_agent_corrupt_pieces_total",
        "Pieces from peers that did not match their signed hash (each peer is then avoided).",
        &m.corrupt_pieces,
    );
    e.finish()
}

/// The time the current command spent in health gates (the last gate, when
/// it ran several), reported with its outcome.
#[derive(Debug, Clone, Default)]
pub struct HealthWait(Arc<Mutex<Option<Duration>>>);

impl HealthWait {
    /// Records a gate's duration.
    pub fn set(&self, took: Duration) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(took);
    }

    /// The last gate's duration, if a gate ran.
    pub fn get(&self) -> Option<Duration> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

tokio::task_local! {
    /// The running command's health wait, set by the health gate.
    pub static HEALTH_WAIT: HealthWait;
    /// Connections the running command had to cut, reported with its
    /// outcome.
    pub static CONNECTIONS_CUT: ConnectionsCut;
}

/// Connections a command cut: a drain past its `drain_timeout`, an old
/// process killed at the end of its `stop_timeout`.
#[derive(Debug, Clone, Default)]
pub struct ConnectionsCut(Arc<std::sync::atomic::AtomicU32>);

impl ConnectionsCut {
    /// How many so far.
    pub fn get(&self) -> u32 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Adds `n` to the running command's cut connections (outside a command:
/// nothing to report to).
pub fn report_cut(n: u32) {
    if n == 0 {
        return;
    }
    let _ = CONNECTIONS_CUT.try_with(|c| {
        let _ = c.0.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |v| Some(v.saturating_add(n)),
        );
    });
}
