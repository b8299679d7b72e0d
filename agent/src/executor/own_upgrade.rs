//! Commands for the agent itself (`baton-agent` artifacts): activation
//! hands over to [`crate::selfupgrade`], which re-executes the new agent
//! on trial; the new agent confirms once it has been connected long
//! enough.

use super::*;

impl Executor {
    /// Activation or rollback of the agent itself (see
    /// [`crate::selfupgrade`]): on success this process is replaced, and
    /// the new agent answers the re-sent command.
    pub(super) async fn upgrade_self(
        &self,
        id: &str,
        version: &str,
        gate: HealthGate,
        allow_downgrade: bool,
    ) -> Result<(), Failure> {
        let me = self.inner.config.me.clone();
        if let Some(trial) = me.trial() {
            // This process is the new agent of an upgrade on trial: nothing
            // else about the agent runs before that is decided.
            let mut rx = self.inner.trial.subscribe();
            let outcome = rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|o| o.clone());
            if trial.command_id == id {
                // The new agent failing its trial is an unhealthy release.
                return outcome
                    .unwrap_or_else(|| Err("the agent is stopping".into()))
                    .or_fail(FailureKind::NotHealthy);
            }
        }
        let _host = self.inner.host.lock().await;
        if me.version() == version {
            info!(%version, "the agent already runs this version");
            return Ok(());
        }
        if !allow_downgrade && baton_common::version::is_downgrade(me.version(), version) {
            return Err(downgrade_refused(AGENT_NAME, me.version(), version));
        }
        self.inner.installed.refuse(
            AGENT_NAME,
            version,
            me.releases().is_staged(AGENT_NAME, version),
            allow_downgrade,
        )?;
        if self.inner.notifier.enabled() {
            // Across the exec the new agent copies sockets back from the
            // running services; systemd's fd store, which also holds them,
            // is handed out only when the unit starts. A service that is
            // down now would find its port taken by the store.
            let slots: Vec<(String, Arc<Slot>)> = lock(&self.inner.slots)
                .iter()
                .map(|(n, s)| (n.clone(), s.clone()))
                .collect();
            for (name, slot) in slots {
                let st = slot.state.lock().await;
                if !st.sockets.is_empty() && !st.current.as_ref().is_some_and(Current::is_alive) {
                    return Err(Failure::new(
                        FailureKind::Refused,
                        format!(
                            "service {name} is not running, and its sockets would not survive the agent's re-execution under systemd; upgrade the agent once it runs"
                        ),
                    ));
                }
            }
        }
        let (id, version) = (id.to_owned(), version.to_owned());
        tokio::task::spawn_blocking(move || me.begin(&id, &version, gate))
            .await
            .map_err(|e| {
                Failure::new(
                    FailureKind::Internal,
                    format!("the upgrade task failed: {e}"),
                )
            })?
            .or_fail(FailureKind::Start)
    }

    /// When this process is the new agent of an upgrade on trial: once it
    /// has been connected for the trial's `min_healthy_time`, asks the
    /// watchdog to commit, then journals the activation as succeeded.
    pub fn confirm_upgrade(&self, mut connected: watch::Receiver<bool>) {
        let me = self.inner.config.me.clone();
        let Some(trial) = me.trial().cloned() else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let healthy = async {
                loop {
                    connected.wait_for(|c| *c).await.ok()?;
                    tokio::select! {
                        _ = tokio::time::sleep(trial.min_healthy_time) => return Some(()),
                        lost = connected.wait_for(|c| !*c) => { lost.ok()?; }
                    }
                }
            };
            tokio::select! {
                _ = this.inner.shutdown.cancelled() => return,
                h = healthy => if h.is_none() { return },
            }
            let result = tokio::task::spawn_blocking(move || me.confirm())
                .await
                .map_err(|e| format!("the confirmation task failed: {e}"))
                .and_then(|r| r);
            match &result {
                Ok(()) => {
                    let update = CommandUpdate::done(&trial.command_id, Outcome::Succeeded, "");
                    if let Err(e) = this.inner.journal.record(&update) {
                        error!(id = %trial.command_id, error = %e, "cannot journal the agent upgrade");
                    }
                    this.publish(update);
                    this.record_installed(AGENT_NAME, this.inner.config.me.version());
                    this.inner.config.me.prune(this.inner.config.keep_releases);
                }
                Err(e) => error!(error = %e, "cannot confirm the agent upgrade"),
            }
            this.inner.trial.send_replace(Some(result));
        });
    }
}
