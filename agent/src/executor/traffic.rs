//! A command behind a local balancer (`run_on = "agent"`): the host is
//! drained before the swap and put back after, whatever the outcome (a
//! balancer's own health check keeps traffic off a release that failed).

use std::collections::BTreeMap;
use std::time::Duration;

use baton_common::command::FailureKind;
use baton_common::traffic::Traffic;
use baton_common::traffic::balancer::Server;
use tracing::{info, warn};

use tokio_util::sync::CancellationToken;

use super::failure::Failure;
use super::{Executor, lock};

impl Executor {
    /// Runs `inner` with the host drained from its balancer; `up_within`
    /// bounds the wait for the balancer to report the host up again after
    /// a success. A drain that fails fails the command unless `restore`
    /// (a rollback or removal: getting the old release back matters more
    /// than the connections the swap may cut).
    pub(super) async fn behind_balancer(
        &self,
        service: &str,
        traffic: &Traffic,
        up_within: Option<Duration>,
        restore: bool,
        inner: impl Future<Output = Result<(), Failure>>,
    ) -> Result<(), Failure> {
        let host = self
            .inner
            .config
            .vars
            .get("BATON_HOST_ID")
            .cloned()
            .unwrap_or_default();
        // The host's own labels; not its variables, which may hold
        // secrets that a name would carry into messages.
        let vars: BTreeMap<String, String> = self.inner.config.labels.clone();
        traffic
            .allowed_by(&self.inner.config.balancers, "this agent")
            .map_err(|e| Failure::new(FailureKind::Traffic, e))?;
        let server = Server::new(traffic, &host, &vars)
            .map_err(|e| Failure::new(FailureKind::Traffic, e))?;
        // An abort (or a rollback) during the drain cancels it like an
        // activation, and the host goes back at once.
        let slot = self.slot(service);
        let cancel = CancellationToken::new();
        let ticket = slot
            .next_activation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&slot.activations).push((ticket, cancel.clone()));
        let drained = tokio::select! {
            d = server.drain() => d,
            () = cancel.cancelled() => Err(String::new()),
        };
        lock(&slot.activations).retain(|(t, _)| *t != ticket);
        if cancel.is_cancelled() {
            let back = match server.ready(None).await {
                Ok(()) => "it was put back".to_owned(),
                Err(e) => format!("putting it back failed, it may still be drained: {e}"),
            };
            return Err(Failure::new(
                FailureKind::Cancelled,
                format!(
                    "{service}: cancelled by {} while its host was draining; {back}",
                    *lock(&slot.cancelled_by)
                ),
            ));
        }
        let drained = match drained {
            Ok(d) => d,
            Err(e) if restore => {
                // The failed drain put the host back (or said it could
                // not): nothing more to undo.
                warn!(server = %server.describe(), error = %e, "cannot drain the host; restoring its release anyway");
                return inner.await;
            }
            Err(e) => return Err(Failure::new(FailureKind::Traffic, e)),
        };
        crate::metrics::report_cut(drained.cut);
        if drained.cut > 0 {
            warn!(server = %server.describe(), cut = drained.cut, "drain_timeout ran out; the connections left are cut by the swap");
        } else {
            info!(server = %server.describe(), waited = ?drained.waited, "drained");
        }
        let result = inner.await;
        let up = if result.is_ok() { up_within } else { None };
        match (result, server.ready(up).await) {
            (Ok(()), Ok(())) => {
                info!(server = %server.describe(), "back in the balancer");
                Ok(())
            }
            (Ok(()), Err(e)) => Err(Failure::new(FailureKind::Traffic, e)),
            (Err(failure), Ok(())) => Err(failure),
            (Err(failure), Err(e)) => Err(failure.noted(&format!(
                "; then putting it back failed, it may still be drained: {e}"
            ))),
        }
    }
}
