//! What the driver needs of a rollout beyond stepping it: its
//! connections, the hosts a step changed and how to put them back, a copy
//! without its hosts, a command's payload, and when it next needs a tick.

use std::collections::BTreeMap;
use std::time::SystemTime;

use baton_common::command::{Command, CommandKind};
use baton_common::host::HostId;
use baton_common::time::later;

use super::{HostRun, HostState, Rollout, ServiceState, State, gone_deadline};

impl Rollout {
    /// Sets every target host's connection from `connected` (after a
    /// start or a load; afterwards `Connected` and `Disconnected` events
    /// keep it).
    pub fn set_connections(&mut self, connected: impl Fn(&HostId) -> bool) {
        self.away.clear();
        for s in &mut self.services {
            for (id, h) in &mut s.hosts {
                h.connected = connected(id);
                if !h.connected {
                    self.away.insert(id.clone());
                }
            }
        }
    }

    /// The hosts each service changed since the last call, with their
    /// values before (see [`ServiceRun::changed`]), by service index.
    pub fn take_changed(&mut self) -> Vec<BTreeMap<HostId, HostRun>> {
        self.services
            .iter_mut()
            .map(|s| std::mem::take(&mut s.changed.0))
            .collect()
    }

    /// A copy of what a step may change but the hosts: cheap whatever the
    /// fleet or plan size. What no step changes (the plan, the signed
    /// manifests) and the facts the driver keeps (hosts away) are left
    /// out; [`Self::restore`] keeps them from the rollout it restores.
    pub fn header(&mut self) -> Rollout {
        let bulk = self.take_bulk();
        let copy = self.clone();
        self.put_bulk(bulk);
        copy
    }

    /// Puts back what a step changed: `header` (from [`Self::header`]
    /// before it) and the hosts' values before (from
    /// [`Self::take_changed`]).
    pub fn restore(&mut self, header: Rollout, changed: Vec<BTreeMap<HostId, HostRun>>) {
        let restored: Vec<Vec<HostId>> = changed
            .iter()
            .map(|was| was.keys().cloned().collect())
            .collect();
        let mut bulk = self.take_bulk();
        for (h, was) in bulk.hosts.iter_mut().zip(changed) {
            for (id, old) in was {
                h.insert(id, old);
            }
        }
        *self = header;
        self.put_bulk(bulk);
        // Connections are facts, not state: the newest stand.
        for (s, ids) in self.services.iter_mut().zip(restored) {
            for id in ids {
                if let Some(h) = s.hosts.get_mut(&id) {
                    h.connected = !self.away.contains(&id);
                }
            }
        }
    }

    /// Moves out what [`Self::header`] does not copy: the hosts, the
    /// plan, the signed manifests and the hosts away.
    fn take_bulk(&mut self) -> Bulk {
        Bulk {
            hosts: self
                .services
                .iter_mut()
                .map(|s| std::mem::take(&mut s.hosts))
                .collect(),
            signed: self
                .services
                .iter_mut()
                .map(|s| {
                    (
                        std::mem::take(&mut s.manifest),
                        std::mem::take(&mut s.signature),
                    )
                })
                .collect(),
            plan: std::mem::take(&mut self.plan),
            away: std::mem::take(&mut self.away),
        }
    }

    /// Moves back what [`Self::take_bulk`] took.
    fn put_bulk(&mut self, bulk: Bulk) {
        for ((s, h), (manifest, signature)) in
            self.services.iter_mut().zip(bulk.hosts).zip(bulk.signed)
        {
            s.hosts = h;
            s.manifest = manifest;
            s.signature = signature;
        }
        self.plan = bulk.plan;
        self.away = bulk.away;
    }

    /// A command as it goes to its host: a `Stage` gets its service's
    /// signed manifest (held once per service, not in every host's
    /// outstanding command).
    pub fn payload(&self, command: &mut Command) {
        // A host behind a balancer is drained around the command.
        if let CommandKind::Activate { service, .. }
        | CommandKind::Rollback { service, .. }
        | CommandKind::Remove { service } = &command.kind
            && command.traffic.is_none()
            && let Some(s) = self.services.iter().find(|s| &s.name == service)
        {
            command.traffic.clone_from(&s.traffic);
        }
        if let CommandKind::Stage {
            service,
            manifest,
            signature,
            ..
        } = &mut command.kind
            && manifest.is_empty()
            && let Some(s) = self.services.iter().find(|s| &s.name == service)
        {
            manifest.clone_from(&s.manifest);
            signature.clone_from(&s.signature);
        }
    }

    /// When this rollout next needs a [`Event::Tick`]: its progress
    /// deadline while it waits on hosts, the end of a planned pause, a
    /// host away during its activation. `None`: no deadline (terminal, or
    /// waiting for an operator). A tick before it changes nothing, so the
    /// driver ticks only rollouts that are due.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        if self.state.is_terminal() {
            return None;
        }
        let mut due: Option<SystemTime> = None;
        let mut at = |t: SystemTime| due = Some(due.map_or(t, |d| d.min(t)));
        let working = match self.state {
            State::Pending => {
                if self.held.is_none() {
                    at(self.created_at);
                }
                false
            }
            State::Staging | State::RollingBack => true,
            // A bake is no stall (its verdicts come as an event).
            State::Progressing | State::AwaitingPromotion => self.services.iter().any(|s| {
                s.state == ServiceState::Progressing && s.step_done_at.is_none() && s.bake.is_none()
            }),
            State::Paused
            | State::Succeeded
            | State::Failed
            | State::RolledBack
            | State::Aborted => false,
        };
        if working && self.held.is_none() {
            at(later(self.progress_at, self.progress_deadline));
        }
        for s in &self.services {
            if let (ServiceState::Progressing, Some(done), Some(pause)) =
                (s.state, s.step_done_at, s.pause)
                && self.state != State::Paused
            {
                at(later(done, pause));
            }
        }
        for id in &self.away {
            for s in &self.services {
                let Some(h) = s.hosts.get(id) else { continue };
                if h.state != HostState::Activating {
                    continue;
                }
                match h.gone_since {
                    Some(since) => at(later(since, gone_deadline(s))),
                    // Not yet counted (after a restart): now.
                    None => at(self.created_at),
                }
            }
        }
        due
    }
}

/// What a step's header leaves out (see [`Rollout::header`]).
struct Bulk {
    hosts: Vec<BTreeMap<HostId, HostRun>>,
    signed: Vec<(Vec<u8>, Vec<u8>)>,
    plan: String,
    away: std::collections::BTreeSet<HostId>,
}
