//! A rollout's event history: every change of the rollout's state, of a
//! service's state or step, of a host's state, and every operator action
//! with who took it, in order (within one step, causes first: the host
//! that turned healthy before the rollout that therefore succeeded).
//!
//! The driver derives the events of a step from the hosts it changed and
//! the rollout's header before and after it ([`changes`]) and writes them
//! in the same atomic write as the new state, in records of at most
//! [`EVENTS_PER_RECORD`] (`events/<rollout>/<first seq>`), so the history
//! never disagrees with the state.

use std::collections::BTreeMap;
use std::time::SystemTime;

use baton_common::command::{FailureDetail, FailureKind};
use baton_common::host::HostId;

use baton_common::time::unix_millis;
use serde::{Deserialize, Serialize};

use crate::machine::{HostRun, HostState, Rollout};

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The rollout was started, or its state changed.
    Rollout,
    /// A service's state or step changed.
    Service,
    /// A host's state changed.
    Host,
    /// An operator acted on the rollout.
    Operator,
    /// A service's bake began, or a check reached its verdict.
    Analysis,
    /// A kind a newer `batond` wrote (read back after a downgrade).
    #[serde(other)]
    Other,
}

impl Kind {
    /// The name in JSON and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rollout => "rollout",
            Self::Service => "service",
            Self::Host => "host",
            Self::Operator => "operator",
            Self::Analysis => "analysis",
            Self::Other => "other",
        }
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutEvent {
    /// Its place in the rollout's history, from 0, without gaps.
    pub seq: u64,
    /// When it happened, Unix milliseconds.
    pub at: u64,
    /// What it is about.
    pub kind: Kind,
    /// The service (service and host events).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
    /// The host (host events).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// The state before (empty when there was none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub from: String,
    /// The state after, or the operator's action.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub to: String,
    /// Who acted (operator events and the start).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub who: String,
    /// Details: versions, the step, an error.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The kind of a host's failure (host events into `failed`, and a
    /// failure rolled back on its way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureKind>,
    /// What the operator needs to see of a host's failure: the failing
    /// probe's last answer and the end of the service's log (host events
    /// into `failed`).
    #[serde(default, skip_serializing_if = "FailureDetail::is_empty")]
    pub detail: FailureDetail,
}

/// The key prefix of a rollout's events.
pub fn prefix(rollout: &str) -> String {
    format!("events/{rollout}/")
}

/// The key of the events of one step, by the sequence number of its first.
pub fn key(rollout: &str, first_seq: u64) -> String {
    format!("events/{rollout}/{first_seq:012}")
}

/// A new event, numbered later.
fn event(kind: Kind, at: u64) -> RolloutEvent {
    RolloutEvent {
        seq: 0,
        at,
        kind,
        service: String::new(),
        host: String::new(),
        from: String::new(),
        to: String::new(),
        who: String::new(),
        message: String::new(),
        failure: None,
        detail: FailureDetail::default(),
    }
}

/// The events of a rollout's start.
pub fn started(r: &Rollout, who: &str, now: SystemTime) -> Vec<RolloutEvent> {
    let mut e = event(Kind::Rollout, unix_millis(now));
    e.to = r.state.as_str().to_owned();
    e.who = who.to_owned();
    e.message = format!(
        "started: {}",
        r.services
            .iter()
            .map(|s| format!("{} {} on {} hosts", s.name, s.version, s.hosts.len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    vec![e]
}

/// An operator's action.
pub fn operator(action: &str, who: &str, now: SystemTime) -> RolloutEvent {
    let mut e = event(Kind::Operator, unix_millis(now));
    e.to = action.to_owned();
    e.who = who.to_owned();
    e
}

/// What changed from `old` to `new`, causes before their effects: each
/// service's hosts, then the service's state and step (in plan order),
/// then the rollout's state. (Compares every host: for tests; the driver
/// uses [`changes`], which costs only the hosts a step changed.)
pub fn diff(old: &Rollout, new: &Rollout, now: SystemTime) -> Vec<RolloutEvent> {
    let changed: Vec<BTreeMap<HostId, HostRun>> = old
        .services
        .iter()
        .zip(&new.services)
        .map(|(before, after)| {
            after
                .hosts
                .iter()
                .filter_map(|(id, h)| {
                    let was = before.hosts.get(id)?;
                    (was != h).then(|| (id.clone(), was.clone()))
                })
                .collect()
        })
        .collect();
    changes(old, new, &changed, now)
}

/// What a step changed: `old` is the rollout before it (its hosts are not
/// read: [`Rollout::header`] is enough), `changed` the hosts it changed
/// with their values before (by service index), `new` the rollout after.
pub fn changes(
    old: &Rollout,
    new: &Rollout,
    changed: &[BTreeMap<HostId, HostRun>],
    now: SystemTime,
) -> Vec<RolloutEvent> {
    let at = unix_millis(now);
    let mut out = Vec::new();
    for (si, (before, after)) in old.services.iter().zip(&new.services).enumerate() {
        for (id, was) in changed.get(si).into_iter().flatten() {
            let Some(h) = after.hosts.get(id) else {
                continue;
            };
            if h.connections_cut > was.connections_cut {
                // The target is 0: each cut is on record.
                let mut e = event(Kind::Host, at);
                e.service = after.name.clone();
                e.host = id.to_string();
                e.to = "connections_cut".into();
                e.message = format!(
                    "{} connection(s) still open were cut (the drain's drain_timeout or the old process's stop_timeout ran out)",
                    h.connections_cut - was.connections_cut
                );
                out.push(e);
            }
            if was.state == h.state {
                continue;
            }
            let new_error = h.error.is_some() && h.error != was.error;
            let message = match &h.error {
                Some(err) if new_error => baton_common::text::prefix(err, MESSAGE_CHARS),
                _ => format!(
                    "{} → {}",
                    h.from_version.as_deref().unwrap_or("(none)"),
                    h.to_version
                ),
            };
            // A failure rolled back in the same step (auto_rollback) went
            // through `failed` on its way: the history says so.
            let failed_on_the_way = h.error.is_some()
                && h.error != was.error
                && matches!(
                    was.state,
                    HostState::Activating | HostState::Staging | HostState::Healthy
                )
                && matches!(h.state, HostState::RollingBack | HostState::RolledBack);
            let steps = if failed_on_the_way {
                vec![(was.state, HostState::Failed), (HostState::Failed, h.state)]
            } else {
                path(was.state, h.state)
            };
            for (from, to) in steps {
                let mut e = event(Kind::Host, at);
                e.service = after.name.clone();
                e.host = id.to_string();
                e.from = from.as_str().to_owned();
                e.to = to.as_str().to_owned();
                e.message = message.clone();
                if new_error && to == HostState::Failed {
                    e.failure = h.failure;
                    e.detail = h.detail.clone();
                }
                out.push(e);
            }
        }
        if after.bake.is_some() && before.bake != after.bake {
            let mut e = event(Kind::Analysis, at);
            e.service = after.name.clone();
            e.to = "baking".into();
            e.message = format!(
                "step {}: {} check(s) for {}",
                after.bake.map_or(0, |b| b.step + 1),
                after.analysis.len(),
                after
                    .analysis
                    .iter()
                    .map(|c| humantime::format_duration(c.duration).to_string())
                    .max()
                    .unwrap_or_default()
            );
            out.push(e);
        }
        // New verdicts (each list keeps its last MAX_VERDICTS).
        let fresh = after
            .verdicts
            .iter()
            .filter(|v| !before.verdicts.contains(v));
        for v in fresh {
            let mut e = event(Kind::Analysis, at);
            e.service = after.name.clone();
            e.from = v.name.clone();
            e.to = v.verdict.as_str().to_owned();
            e.message = baton_common::text::prefix(
                &format!("step {}: {}", v.step + 1, v.reason),
                MESSAGE_CHARS,
            );
            out.push(e);
        }
        if before.state != after.state {
            let mut e = event(Kind::Service, at);
            e.service = after.name.clone();
            e.from = before.state.as_str().to_owned();
            e.to = after.state.as_str().to_owned();
            out.push(e);
        }
        if before.step != after.step {
            let mut e = event(Kind::Service, at);
            e.service = after.name.clone();
            e.message = format!(
                "step {} of {}: up to {} hosts",
                after.step + 1,
                after.steps.len(),
                after.steps.get(after.step).copied().unwrap_or_default()
            );
            out.push(e);
        }
    }
    if old.state != new.state {
        let mut e = event(Kind::Rollout, at);
        e.from = old.state.as_str().to_owned();
        e.to = new.state.as_str().to_owned();
        if old.error != new.error
            && let Some(error) = &new.error
        {
            e.message = baton_common::text::prefix(error, MESSAGE_CHARS);
        }
        out.push(e);
    }
    out
}

/// The most events in one stored record: a step that moves 10,000 hosts
/// writes its events in several records, each well under a write's limit.
pub const EVENTS_PER_RECORD: usize = 1000;
/// The most encoded bytes of one record (before its last event).
const RECORD_BYTES: usize = 256 * 1024;
/// The most characters of an event's message (an agent's error may be
/// 4,096 characters, each control character six bytes in JSON).
pub const MESSAGE_CHARS: usize = 1000;

/// The records of a step's numbered `events`: (key, value), each at most
/// [`EVENTS_PER_RECORD`] events and about [`RECORD_BYTES`].
pub fn records(
    rollout: &str,
    events: &[RolloutEvent],
) -> Result<Vec<(String, Vec<u8>)>, serde_json::Error> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, e) in events.iter().enumerate() {
        let n = serde_json::to_vec(e)?.len() + 1;
        if i > start && (i - start >= EVENTS_PER_RECORD || bytes + n > RECORD_BYTES) {
            out.push((
                key(rollout, events[start].seq),
                serde_json::to_vec(&events[start..i])?,
            ));
            start = i;
            bytes = 0;
        }
        bytes += n;
    }
    if start < events.len() {
        out.push((
            key(rollout, events[start].seq),
            serde_json::to_vec(&events[start..])?,
        ));
    }
    Ok(out)
}

/// The steps from `from` to `to`: a host that went through states in
/// one step of the machine (the last host to stage starts activating at
/// once) gets each of the forward path's steps, so every host's history
/// reads the same; any other change is one step.
fn path(from: HostState, to: HostState) -> Vec<(HostState, HostState)> {
    const FORWARD: [HostState; 5] = [
        HostState::Pending,
        HostState::Staging,
        HostState::Staged,
        HostState::Activating,
        HostState::Healthy,
    ];
    let place = |s| FORWARD.iter().position(|f| *f == s);
    match (place(from), place(to)) {
        (Some(a), Some(b)) if a < b => FORWARD[a..=b].windows(2).map(|w| (w[0], w[1])).collect(),
        _ => vec![(from, to)],
    }
}

/// Numbers `events` from `first`.
pub fn number(events: &mut [RolloutEvent], first: u64) {
    for (i, e) in events.iter_mut().enumerate() {
        e.seq = first + i as u64;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn records_stay_small_whatever_the_messages() {
        // 2,000 events of 4 KiB of control characters (6 bytes each in
        // JSON): split by bytes, not only by count.
        let mut events: Vec<RolloutEvent> = (0..2000)
            .map(|_| {
                let mut e = event(Kind::Host, 1);
                e.message = "\u{1}".repeat(4096);
                e
            })
            .collect();
        number(&mut events, 0);
        let records = records("r-1", &events).unwrap();
        assert!(records.len() > 2);
        for (k, v) in &records {
            assert!(v.len() < RECORD_BYTES + 64 * 1024, "{k}: {} bytes", v.len());
        }
        let back: usize = records
            .iter()
            .map(|(_, v)| {
                serde_json::from_slice::<Vec<RolloutEvent>>(v)
                    .unwrap()
                    .len()
            })
            .sum();
        assert_eq!(back, 2000);
    }
}
