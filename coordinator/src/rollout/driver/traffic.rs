//! Commands behind a central balancer (`run_on = "coordinator"`): `batond`
//! drains the host's server, forwards the command to the agent, waits for
//! its answer, puts the server back, and only then lets the rollout see the
//! answer. One task per command in flight; a command re-sent after a
//! reconnect or a restart of `batond` goes through the same steps again
//! (drain and ready are idempotent, the agent answers a known id from its
//! journal), so no host is left drained by a crash at any step.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_common::command::{Command, CommandKind, CommandUpdate, FailureKind, Outcome, Phase};
use baton_common::host::HostId;
use baton_common::traffic::balancer::Server;
use baton_common::traffic::{RunOn, Traffic};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Driver;
use crate::fleet::FleetHandle;
use baton_engine::machine::{Action, Rollout};

/// How long forwarding a command to an agent's stream may wait.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// The commands in flight behind a central balancer.
pub(super) struct Balancers {
    running: Arc<Mutex<HashMap<String, Wrap>>>,
    /// Final answers, after the server is back: the driver applies them.
    done: mpsc::Sender<(HostId, CommandUpdate)>,
    done_rx: Option<mpsc::Receiver<(HostId, CommandUpdate)>>,
    /// What plans may use (`balancer` in batond's config).
    allowed: Arc<Vec<String>>,
    /// Each host's turn: its commands behind the balancer one at a time
    /// (one entry per host that ever had one).
    turns: Arc<Mutex<HashMap<HostId, Arc<tokio::sync::Mutex<()>>>>>,
}

struct Wrap {
    rollout: String,
    host: HostId,
    /// Drained: the command is with the agent (a re-send goes there).
    forwarded: bool,
    /// The agent's answer.
    answer: Option<oneshot::Sender<CommandUpdate>>,
    /// The rollout no longer waits for the command (an abort, a host
    /// given up, the rollout ended): put the host back and stop.
    superseded: CancellationToken,
}

/// What a task waits on: the agent's answer, and being superseded.
type Answer = (oneshot::Receiver<CommandUpdate>, CancellationToken);

impl Wrap {
    /// A task's entry; with `answered`, the agent's answer is in already
    /// (the command is with the agent).
    fn new(rollout: &str, host: &HostId, answered: Option<CommandUpdate>) -> (Self, Answer) {
        let (tx, rx) = oneshot::channel();
        let superseded = CancellationToken::new();
        let forwarded = answered.is_some();
        let answer = match answered {
            Some(update) => {
                let _ = tx.send(update);
                None
            }
            None => Some(tx),
        };
        let wrap = Self {
            rollout: rollout.to_owned(),
            host: host.clone(),
            forwarded,
            answer,
            superseded: superseded.clone(),
        };
        (wrap, (rx, superseded))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether `traffic` is run by `batond`.
pub(super) fn central(traffic: Option<&Traffic>) -> bool {
    traffic.is_some_and(|t| t.run_on == RunOn::Coordinator)
}

impl Balancers {
    pub(super) fn new(allowed: Vec<String>) -> Self {
        let (done, rx) = mpsc::channel(256);
        Self {
            running: Arc::default(),
            done,
            done_rx: Some(rx),
            allowed: Arc::new(allowed),
            turns: Arc::default(),
        }
    }

    /// Refuses a rollout whose central balancer batond may not use.
    pub(super) fn permit(&self, rollout: &Rollout) -> Result<(), super::RolloutError> {
        for s in &rollout.services {
            if let Some(t) = s
                .traffic
                .as_ref()
                .filter(|t| t.run_on == RunOn::Coordinator)
            {
                t.allowed_by(&self.allowed, "batond").map_err(|e| {
                    super::RolloutError::Invalid(format!("service {}: traffic: {e}", s.name))
                })?;
            }
        }
        Ok(())
    }

    /// The final answers, for the driver's loop (once).
    pub(super) fn take_done(&mut self) -> mpsc::Receiver<(HostId, CommandUpdate)> {
        self.done_rx.take().unwrap_or_else(|| mpsc::channel(1).1)
    }

    /// The commands to send to agents as they are: a command behind a
    /// central balancer starts its task instead (or, re-sent once its host
    /// is drained, goes to the agent without its traffic part).
    pub(super) fn route(
        &self,
        fleet: &FleetHandle,
        rollout: &str,
        actions: Vec<Action>,
    ) -> Vec<Action> {
        let mut out = Vec::with_capacity(actions.len());
        for Action::Send(host, command) in actions {
            if !central(command.traffic.as_ref()) {
                out.push(Action::Send(host, command));
                continue;
            }
            let mut running = lock(&self.running);
            match running.get(&command.id) {
                Some(w) if w.forwarded => out.push(Action::Send(host, for_agent(&command))),
                Some(_) => {}
                None => {
                    let (wrap, answer) = Wrap::new(rollout, &host, None);
                    running.insert(command.id.clone(), wrap);
                    self.spawn(fleet, host, command, answer, true);
                }
            }
        }
        out
    }

    /// An agent's final answer to `command` (its traffic part filled in):
    /// taken by the command's task, or, with no task (`batond` restarted and
    /// the agent answered from its journal first), by a new one that makes
    /// sure the host is drained and then puts it back.
    pub(super) fn answer(
        &self,
        fleet: &FleetHandle,
        rollout: &str,
        host: HostId,
        command: Command,
        update: CommandUpdate,
    ) {
        let mut running = lock(&self.running);
        if let Some(w) = running.get_mut(&command.id) {
            // The first answer counts; a repeat is dropped.
            if let Some(tx) = w.answer.take() {
                let _ = tx.send(update);
            }
            return;
        }
        let (wrap, answer) = Wrap::new(rollout, &host, Some(update));
        running.insert(command.id.clone(), wrap);
        self.spawn(fleet, host, command, answer, false);
    }

    /// Tells the tasks of `rollout` whose command it no longer waits for
    /// (an abort, a host given up, the rollout ended) to put their host
    /// back and stop.
    pub(super) fn prune(&self, rollout_id: &str, rollout: Option<&Rollout>) {
        let mut running = lock(&self.running);
        if running.is_empty() {
            return;
        }
        for (id, w) in running.iter_mut() {
            if w.rollout != rollout_id {
                continue;
            }
            let wanted = rollout.is_some_and(|r| {
                r.services.iter().any(|s| {
                    s.hosts
                        .get(&w.host)
                        .and_then(|h| h.outstanding.as_ref())
                        .is_some_and(|c| &c.id == id)
                })
            });
            if !wanted {
                w.superseded.cancel();
            }
        }
    }

    fn spawn(
        &self,
        fleet: &FleetHandle,
        host: HostId,
        command: Command,
        answer: Answer,
        forward: bool,
    ) {
        let running = self.running.clone();
        let turns = self.turns.clone();
        let done = self.done.clone();
        let allowed = self.allowed.clone();
        let fleet = fleet.clone();
        tokio::spawn(async move {
            let id = command.id.clone();
            let update = match command
                .traffic
                .as_ref()
                .map(|t| t.allowed_by(&allowed, "batond"))
            {
                // Allowed when it started; batond's config changed since.
                Some(Err(e)) => Some(CommandUpdate::failed(&command.id, FailureKind::Traffic, e)),
                _ => behind(&fleet, &running, &turns, &host, &command, answer, forward).await,
            };
            lock(&running).remove(&id);
            if let Some(update) = update {
                let _ = done.send((host, update)).await;
            }
        });
    }
}

/// The command as the agent gets it: without the part `batond` runs.
fn for_agent(command: &Command) -> Command {
    Command {
        traffic: None,
        ..command.clone()
    }
}

/// How long to wait for the balancer to report the server up after a
/// successful command: the health gate's own deadline (a removed service
/// has none: its server is put back without waiting).
fn up_within(kind: &CommandKind) -> Option<Duration> {
    match kind {
        CommandKind::Activate { gate, .. } | CommandKind::Rollback { gate, .. } => {
            Some(gate.healthy_deadline)
        }
        _ => None,
    }
}

/// One command behind the balancer; its final answer for the rollout, or
/// `None` when it was superseded.
async fn behind(
    fleet: &FleetHandle,
    running: &Mutex<HashMap<String, Wrap>>,
    host_locks: &Mutex<HashMap<HostId, Arc<tokio::sync::Mutex<()>>>>,
    host: &HostId,
    command: &Command,
    (answer, superseded): Answer,
    forward: bool,
) -> Option<CommandUpdate> {
    let failed = |e: String| Some(CommandUpdate::failed(&command.id, FailureKind::Traffic, e));
    let traffic = command.traffic.as_ref()?;
    // Only the host id: labels are what agents say of themselves, and a
    // compromised agent must not name another host's server.
    let server = match Server::new(traffic, host.as_str(), &BTreeMap::new()) {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    // One command at a time per host: a superseded command's return must
    // not land in the middle of the next one's drain.
    let turn = lock(host_locks).entry(host.clone()).or_default().clone();
    let _turn = turn.lock().await;
    let mut drained = baton_common::traffic::balancer::Drained {
        cut: 0,
        waited: Duration::ZERO,
    };
    // A drain that failed put the host back itself (or said it could not).
    let mut put_back = true;
    // The agent answered already (from its journal, after a restart of
    // batond): nothing is left to drain for; only the return.
    if forward {
        let d = tokio::select! {
            d = server.drain() => d,
            () = superseded.cancelled() => {
                // Never sent: the host goes straight back.
                if let Err(e) = server.ready(None).await {
                    warn!(command = %command.id, %host, error = %e, "cannot put the host back after its command was superseded; it may still be drained");
                }
                return None;
            }
        };
        let restore = !matches!(command.kind, CommandKind::Activate { .. });
        drained = match d {
            Ok(d) => d,
            // Getting the old release back matters more than the
            // connections the swap may cut.
            Err(e) if restore => {
                warn!(command = %command.id, %host, error = %e, "cannot drain the host; restoring its release anyway");
                put_back = false;
                drained
            }
            Err(e) => {
                warn!(command = %command.id, %host, error = %e, "cannot drain the host; the command is not sent");
                return failed(e);
            }
        };
        if drained.cut > 0 {
            warn!(command = %command.id, server = %server.describe(), cut = drained.cut, "drain_timeout ran out; the connections left are cut by the swap");
        } else if put_back {
            info!(command = %command.id, server = %server.describe(), waited = ?drained.waited, "drained");
        }
        // Under the map's lock, so a supersede either comes first (and
        // the command is never sent) or finds it forwarded.
        let go = {
            let mut running = lock(running);
            match running.get_mut(&command.id) {
                Some(w) if !superseded.is_cancelled() => {
                    w.forwarded = true;
                    true
                }
                _ => false,
            }
        };
        if !go {
            if let Err(e) = server.ready(None).await {
                warn!(command = %command.id, %host, error = %e, "cannot put the host back after its command was superseded; it may still be drained");
            }
            return None;
        }
        // Not delivered now: it is re-sent (to the agent, since the host
        // is drained) when the host reconnects.
        let _ = tokio::time::timeout(
            FORWARD_TIMEOUT,
            fleet.send_command(host.clone(), &for_agent(command)),
        )
        .await;
    }
    // No deadline of its own: the rollout gives up on a host that never
    // answers (its deadlines), and that supersedes the command.
    let agent = tokio::select! {
        a = answer => a.ok(),
        () = superseded.cancelled() => None,
    };
    let succeeded = agent
        .as_ref()
        .is_some_and(|u| u.phase == Phase::Done(Outcome::Succeeded));
    let up = if succeeded {
        up_within(&command.kind)
    } else {
        None
    };
    let ready = if put_back {
        server.ready(up).await
    } else {
        Ok(())
    };
    let mut update = agent?;
    update.connections_cut = update.connections_cut.saturating_add(drained.cut);
    match ready {
        Ok(()) => info!(command = %command.id, server = %server.describe(), "back in the balancer"),
        Err(e) if succeeded => {
            update = CommandUpdate {
                connections_cut: update.connections_cut,
                ..CommandUpdate::failed(&command.id, FailureKind::Traffic, e)
            };
        }
        Err(e) => {
            update.error = format!(
                "{}; then putting it back failed, it may still be drained: {e}",
                update.error
            );
        }
    }
    Some(update)
}

impl Driver {
    /// Whether an agent's final answer belongs to a command behind a
    /// central balancer (then its task takes it, and the rollout sees it
    /// once the host is back in the balancer).
    pub(super) fn divert(&self, id: &str, host: &HostId, update: &CommandUpdate) -> bool {
        if !matches!(update.phase, Phase::Done(_)) {
            return false;
        }
        let Some(entry) = self.active.get(id) else {
            return false;
        };
        let found = entry.rollout.services.iter().find_map(|s| {
            let command = s.hosts.get(host)?.outstanding.as_ref()?;
            let swaps = matches!(
                command.kind,
                CommandKind::Activate { .. }
                    | CommandKind::Rollback { .. }
                    | CommandKind::Remove { .. }
            );
            (command.id == update.command_id && swaps && central(s.traffic.as_ref()))
                .then(|| command.clone())
        });
        let Some(mut command) = found else {
            return false;
        };
        entry.rollout.payload(&mut command);
        self.balancers
            .answer(&self.fleet, id, host.clone(), command, update.clone());
        true
    }
}

impl Driver {
    /// After a restart: every command a resumed rollout has outstanding
    /// behind a central balancer gets its task now, whether or not its
    /// host is back, so a host a crash left drained is put back even if
    /// the rollout then stops waiting for it (an abort, a host given up).
    pub(super) fn resume_balanced(&self) {
        for (id, entry) in &self.active {
            let actions: Vec<Action> = entry
                .rollout
                .services
                .iter()
                .filter(|s| central(s.traffic.as_ref()))
                .flat_map(|s| s.hosts.iter())
                .filter_map(|(host, h)| {
                    let mut command = h.outstanding.clone()?;
                    swaps(&command.kind).then_some(())?;
                    entry.rollout.payload(&mut command);
                    Some(Action::Send(host.clone(), command))
                })
                .collect();
            if !actions.is_empty() {
                // Hosts connected already are sent their commands by
                // their own reconnect; the tasks are what matters here.
                let _ = self.balancers.route(&self.fleet, id, actions);
            }
        }
    }
}

/// Whether a command swaps a release (and so runs behind the balancer).
fn swaps(kind: &CommandKind) -> bool {
    matches!(
        kind,
        CommandKind::Activate { .. } | CommandKind::Rollback { .. } | CommandKind::Remove { .. }
    )
}
