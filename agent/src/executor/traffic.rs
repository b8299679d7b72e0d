//! A command behind a local balancer (`run_on = "agent"`): the host is
//! drained before the swap and put back after, whatever the outcome (a
//! balancer's own health check keeps traffic off a release that failed).

use std::collections::BTreeMap;
use std::time::Duration;

use baton_common::command::FailureKind;
use baton_common::traffic::Traffic;
use baton_common::traffic::balancer::Server;
use tracing::{info, warn};

use super::Executor;
use super::failure::Failure;

impl Executor {
    /// Runs `inner` with the host drained from its balancer; `up_within`
    /// bounds the wait for the balancer to report the host up again after
    /// a success.
    pub(super) async fn behind_balancer(
        &self,
        traffic: &Traffic,
        up_within: Option<Duration>,
        inner: impl Future<Output = Result<(), Failure>>,
    ) -> Result<(), Failure> {
        let host = self
            .inner
            .config
            .vars
            .get("BATON_HOST_ID")
            .cloned()
            .unwrap_or_default();
        let mut vars: BTreeMap<String, String> = self.inner.config.labels.clone();
        vars.extend(self.inner.config.vars.clone());
        let server = Server::new(traffic, &host, &vars)
            .map_err(|e| Failure::new(FailureKind::Traffic, e))?;
        let drained = server.drain().await.map_err(|e| {
            Failure::new(
                FailureKind::Traffic,
                format!("{e}; the host was not drained, nothing was changed"),
            )
        })?;
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
