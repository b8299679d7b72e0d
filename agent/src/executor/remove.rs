//! Removal: stop the service (after its `pre_stop` hook) and delete it
//! with its releases.

use super::*;

impl Executor {
    pub(super) async fn remove(&self, name: &str, deadline: SystemTime) -> Result<(), Failure> {
        let slot = self.slot(name);
        cancel_activations(&slot, "a removal");
        let mut st = slot.state.lock().await;
        let until = activate::instant_of(deadline);
        // The hook first, while the service is still in place and
        // watched: a failing pre_stop leaves it as it was.
        if let Some(old) = st.current.as_ref() {
            let never = CancellationToken::new();
            let bound = hooks::Bound {
                until,
                cancel: &never,
            };
            self.pre_stop(old, Some(bound)).await?;
        }
        if let Some(m) = st.monitor.take() {
            m.abort();
        }
        if let Some(old) = st.current.take() {
            let unit = old.process.unit().map(str::to_owned);
            self.stop_old(name, old, until).await?;
            if let Some(unit) = unit {
                self.inner
                    .config
                    .systemctl
                    .run(&["stop", &unit])
                    .await
                    .map_err(|e| format!("cannot stop {name}: {e}"))
                    .or_fail(FailureKind::Internal)?;
            }
        }
        self.release_sockets(&mut st, name, &[]);
        self.inner
            .releases
            .remove(name)
            .map_err(|e| format!("cannot remove {name}: {e}"))
            .or_fail(FailureKind::Disk)?;
        self.inner
            .inventory
            .send_if_modified(|inv| inv.remove(name).is_some());
        info!(service = %name, "removed");
        Ok(())
    }
}
