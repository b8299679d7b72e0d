//! Sending commands to agents: one by one or in one batch, re-sending
//! what is outstanding; a command behind a central balancer goes through
//! its task in [`super::traffic`] first.

use tracing::warn;

use baton_common::host::HostId;

use super::{Action, Driver, SEND_TIMEOUT};

impl Driver {
    /// Sends every outstanding command of a rollout to its connected hosts
    /// again (same ids, so agents answer rather than re-run).
    pub(super) async fn resend_outstanding(&mut self, id: &str) {
        let Some(entry) = self.active.get(id) else {
            return;
        };
        let commands: Vec<_> = entry
            .rollout
            .services
            .iter()
            .flat_map(|s| s.hosts.iter())
            .filter(|(h, _)| self.connected.contains_key(*h))
            .filter_map(|(h, run)| {
                let mut command = run.outstanding.clone()?;
                entry.rollout.payload(&mut command);
                Some(Action::Send(h.clone(), command))
            })
            .collect();
        self.deliver_all(id, commands).await;
    }

    /// Sends a step's commands: one by one when they are few, else with
    /// one question to the registry for every stream (a batch of 1,000
    /// activations must not be 1,000 round trips to the registry).
    pub(super) async fn deliver_all(&self, id: &str, actions: Vec<Action>) {
        // Behind a central balancer, batond drains the host first.
        let actions = self.balancers.route(&self.fleet, id, actions);
        if actions.len() < 16 {
            for Action::Send(host, command) in actions {
                self.deliver(id, host, command).await;
            }
            return;
        }
        let commands = actions
            .into_iter()
            .map(|Action::Send(host, command)| (host, command))
            .collect();
        match self.fleet.send_commands(commands, SEND_TIMEOUT).await {
            Ok(missed) => {
                for (host, command, e) in missed {
                    // It stays outstanding and is re-sent when the host returns.
                    warn!(rollout = %id, %host, %command, error = %e, "command not delivered yet");
                }
            }
            Err(e) => warn!(rollout = %id, error = %e, "commands not delivered"),
        }
    }

    async fn deliver(&self, id: &str, host: HostId, command: baton_common::command::Command) {
        match tokio::time::timeout(
            SEND_TIMEOUT,
            self.fleet.send_command(host.clone(), &command),
        )
        .await
        {
            Ok(Ok(())) => {}
            // It stays outstanding and is re-sent when the host returns.
            Ok(Err(e)) => {
                warn!(rollout = %id, %host, command = %command.id, error = %e, "command not delivered yet")
            }
            Err(_) => {
                warn!(rollout = %id, %host, command = %command.id, "the host's stream is full; the command waits for its reconnect")
            }
        }
    }
}
