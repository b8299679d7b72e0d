//! `batond`'s Prometheus metrics (`batond --metrics-listen ADDR`): hosts connected and disconnected,
//! rollouts by state, host activations by result, activation and
//! health-wait durations, health-check failures and stream reconnects.
//!
//! Counters live here and are bumped by the registry and the rollout
//! driver; the gauges are what the caller read from them at the scrape
//! ([`Gauges`]). The module depends on no other part of the coordinator.

use std::sync::Arc;

use baton_common::metrics::{Counter, CounterVec, Exposition, Histogram};
use baton_engine::State;

/// What a serving coordinator's gauges show, read at the scrape; a part
/// that could not be read is left out.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// (connected, registered) hosts.
    pub hosts: Option<(usize, usize)>,
    /// The state of every rollout in the store.
    pub rollouts: Option<Vec<State>>,
}

/// The coordinator's counters, shared by the registry and the driver.
#[derive(Debug)]
pub struct Metrics {
    /// Agent streams accepted.
    pub connects: Counter,
    /// Agent streams accepted from hosts that were registered before
    /// (a reconnect after a lost stream, an agent or coordinator restart).
    pub reconnects: Counter,
    /// Hosts' activations (and rollbacks) that ended, by result:
    /// `healthy`, `failed`, `rolled_back`.
    pub activations: CounterVec,
    /// Hosts that failed in a rollout, by the kind of failure (`unknown`
    /// when an older agent did not say).
    pub host_failures: CounterVec,
    /// From a host's activation start to its end (healthy or failed).
    pub activation: Histogram,
    /// From the swap's end to healthy: the part of an activation spent
    /// in the health gate, as the agents report it.
    pub health_wait: Histogram,
    /// A running service's health check turned from passing to failing,
    /// as reported in a host's inventory.
    pub health_check_failures: Counter,
    /// A newer stream of a host replaced its live one.
    pub takeovers: Counter,
    /// A newer stream was refused: the host's stream was taken over too
    /// often (two agents with one certificate).
    pub takeovers_refused: Counter,
    /// Analysis verdicts, by the check's kind and the verdict.
    pub verdicts: CounterVec,
    /// Connections cut by hosts' commands: a drain past its
    /// `drain_timeout`, an old process stopped at its `stop_timeout`.
    pub connections_cut: Counter,
    /// Payload bytes sent to agents (and other coordinators).
    pub artifact_sent_bytes: Counter,
    /// Answers to agents asking where to download from, by source:
    /// `coordinator`, `peer`, `wait`, `done`.
    pub artifact_sources: CounterVec,
    /// What was written to the store.
    pub store: Arc<crate::store::StoreStats>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            connects: Counter::default(),
            reconnects: Counter::default(),
            activations: CounterVec::with_values(&[&["failed"], &["healthy"], &["rolled_back"]]),
            host_failures: CounterVec::with_values(
                &baton_common::command::FailureKind::ALL
                    .map(|k| [k.as_str()])
                    .each_ref()
                    .map(|k| k.as_slice()),
            ),
            activation: Histogram::default(),
            health_wait: Histogram::default(),
            health_check_failures: Counter::default(),
            takeovers: Counter::default(),
            takeovers_refused: Counter::default(),
            connections_cut: Counter::default(),
            artifact_sent_bytes: Counter::default(),
            artifact_sources: CounterVec::with_values(&[
                &["coordinator"],
                &["done"],
                &["origin"],
                &["peer"],
                &["wait"],
            ]),
            verdicts: CounterVec::with_values(&[
                &["metrics", "pass"],
                &["metrics", "fail"],
                &["metrics", "inconclusive"],
                &["prometheus", "pass"],
                &["prometheus", "fail"],
                &["prometheus", "inconclusive"],
                &["host", "pass"],
                &["host", "fail"],
                &["host", "inconclusive"],
            ]),
            store: Arc::default(),
        }
    }
}

impl Metrics {
    /// The text-format document, with the gauges of a serving
    /// coordinator (`None` while it follows another).
    pub fn render(&self, serving: Option<Gauges>) -> String {
        let mut e = Exposition::default();
        e.build_info("batond");
        e.process();
        e.gauge(
            "baton_coordinator_leading",
            "1 while this batond serves the fleet (alone, or leading); 0 while it follows another.",
            if serving.is_some() { 1.0 } else { 0.0 },
        );
        let Some(gauges) = serving else {
            self.counters(&mut e);
            return e.finish();
        };
        if let Some((up, registered)) = gauges.hosts {
            e.gauge(
                "baton_hosts_connected",
                "Registered hosts whose agent holds a stream now.",
                up as f64,
            );
            e.gauge(
                "baton_hosts_disconnected",
                "Registered hosts whose agent does not hold a stream now.",
                registered.saturating_sub(up) as f64,
            );
        }
        if let Some(all) = gauges.rollouts {
            let samples: Vec<(String, f64)> = State::ALL
                .iter()
                .map(|s| {
                    let n = all.iter().filter(|r| *r == s).count();
                    (s.as_str().to_owned(), n as f64)
                })
                .collect();
            e.gauge_vec(
                "baton_rollouts",
                "Rollouts by state (every rollout in the store).",
                "state",
                &samples,
            );
        }
        self.counters(&mut e);
        e.finish()
    }

    fn counters(&self, e: &mut Exposition) {
        use std::sync::atomic::Ordering::Relaxed;
        let store = &self.store;
        for (name, help, value) in [
            (
                "baton_store_transactions",
                "Store transactions applied since batond started (a counter).",
                &store.txns,
            ),
            (
                "baton_store_written_bytes",
                "Bytes of keys and values written to the store since batond started (a counter).",
                &store.written_bytes,
            ),
            (
                "baton_store_largest_transaction_operations",
                "The most operations in one store transaction since batond started (etcd allows 128).",
                &store.largest_txn_ops,
            ),
            (
                "baton_store_largest_transaction_bytes",
                "The most bytes in one store transaction since batond started (at most 1 MiB).",
                &store.largest_txn_bytes,
            ),
        ] {
            e.gauge(name, help, value.load(Relaxed) as f64);
        }
        e.counter_vec(
            "baton_host_activations_total",
            "Host activations and rollbacks that ended, by result.",
            &["result"],
            &self.activations,
        );
        e.counter_vec(
            "baton_host_failures_total",
            "Hosts that failed in a rollout (staging, activation or rollback), by the kind of failure.",
            &["kind"],
            &self.host_failures,
        );
        e.counter_vec(
            "baton_analysis_verdicts_total",
            "Verdicts of analysis checks, by the check's kind and the verdict (pass, fail, inconclusive, skipped).",
            &["kind", "verdict"],
            &self.verdicts,
        );
        e.counter(
            "baton_connections_cut_total",
            "Connections still open that hosts' commands had to cut: a drain past its drain_timeout, an old process stopped at the end of its stop_timeout (the target is 0).",
            &self.connections_cut,
        );
        e.counter(
            "baton_artifact_sent_bytes_total",
            "Payload bytes batond sent to agents and other coordinators (with peers serving, about one copy per payload).",
            &self.artifact_sent_bytes,
        );
        e.counter_vec(
            "baton_artifact_sources_total",
            "Answers to agents asking where to download a payload from, by source (coordinator, origin, peer, wait, done).",
            &["source"],
            &self.artifact_sources,
        );
        e.histogram(
            "baton_host_activation_duration_seconds",
            "Host activations, from the command's start to healthy or failed.",
            &self.activation,
        );
        e.histogram(
            "baton_health_wait_duration_seconds",
            "Time activations spent in the health gate, as agents report it.",
            &self.health_wait,
        );
        e.counter(
            "baton_health_check_failures_total",
            "Running services whose health check turned from passing to failing.",
            &self.health_check_failures,
        );
        e.counter(
            "baton_stream_connects_total",
            "Agent streams accepted.",
            &self.connects,
        );
        e.counter(
            "baton_stream_reconnects_total",
            "Agent streams accepted from hosts registered before.",
            &self.reconnects,
        );
        e.counter(
            "baton_stream_takeovers_total",
            "Agent streams that replaced a live stream of the same host.",
            &self.takeovers,
        );
        e.counter(
            "baton_stream_takeovers_refused_total",
            "Agent streams refused because the host's stream was taken over too often (two agents with one certificate).",
            &self.takeovers_refused,
        );
    }
}
