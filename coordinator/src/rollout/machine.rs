//! The rollout state machine: `step(&Rollout, &Event, now) -> (Rollout,
//! Vec<Action>)`, pure — no I/O, no clock, no randomness — so every path is
//! unit- and property-tested without a runtime.
//!
//! ```text
//!  pending ─► staging ─► progressing ─────────────────────► succeeded
//!               │            │  ▲ resume        │ failure (> max_failures,
//!               │            ▼  │               │ progress_deadline)
//!               │          paused               ├─ auto_rollback ─► rolling_back ─► rolled_back
//!               └─ a host fails staging ─► failed ◄─ otherwise          │ a rollback fails
//!                                                                       └─► failed
//!  any non-terminal ── abort ──► aborted;   operator rollback ──► rolling_back
//! ```
//!
//! Hosts are replaced in a sliding window: at most `max_parallel` activate
//! at once, and one starts only if the hosts still in service stay at or
//! above `min_healthy` (a host that is activating, failed or disconnected
//! is out of service). Every command carries an id `<rollout>/<seq>`; the
//! host remembers the one outstanding command, which is re-sent whenever
//! the host reconnects (the agent answers a known id from its journal
//! instead of running it again) and updates for any other id are ignored.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use baton_common::command::{Command, CommandKind, CommandUpdate, HealthGate, Outcome, Phase};
use baton_common::host::HostId;
use serde::{Deserialize, Serialize};

/// Slack added to a health gate's deadline for the command deadline:
/// hooks, stopping the old process and the swap itself.
const COMMAND_SLACK: Duration = Duration::from_secs(120);

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Accepted, nothing sent yet.
    Pending,
    /// Every target host is staging the artifact.
    Staging,
    /// Hosts are being activated.
    Progressing,
    /// Waiting for an operator's promote (canary).
    AwaitingPromotion,
    /// Stopped by an operator; hosts already activating finish.
    Paused,
    /// Returning every touched host to its previous version.
    RollingBack,
    /// Every host runs the new version and is healthy.
    Succeeded,
    /// Failed, and not (or not completely) rolled back.
    Failed,
    /// Failed or rolled back by an operator; every touched host is back.
    RolledBack,
    /// Stopped for good by an operator; hosts left as they were.
    Aborted,
}

impl State {
    /// The contract's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Staging => "staging",
            Self::Progressing => "progressing",
            Self::AwaitingPromotion => "awaiting_promotion",
            Self::Paused => "paused",
            Self::RollingBack => "rolling_back",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
            Self::Aborted => "aborted",
        }
    }

    /// Whether nothing more will happen.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::RolledBack | Self::Aborted
        )
    }
}

/// Where one host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Nothing sent yet.
    Pending,
    /// Downloading, verifying, unpacking.
    Staging,
    /// The release is on the host, not running.
    Staged,
    /// Swapping and waiting for health.
    Activating,
    /// Runs the target version, healthy.
    Healthy,
    /// Staging, activation or rollback failed.
    Failed,
    /// Returning to the previous version.
    RollingBack,
    /// Back on the previous version (or the service removed).
    RolledBack,
}

impl HostState {
    /// The contract's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Staging => "staging",
            Self::Staged => "staged",
            Self::Activating => "activating",
            Self::Healthy => "healthy",
            Self::Failed => "failed",
            Self::RollingBack => "rolling_back",
            Self::RolledBack => "rolled_back",
        }
    }
}

/// A rollout of one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// `r-…`, unique, sorts by creation time.
    pub id: String,
    /// The plan as submitted.
    pub plan: String,
    /// Where it is.
    pub state: State,
    /// The state a paused rollout resumes to.
    pub resume_to: Option<State>,
    /// Undo everything on failure.
    pub auto_rollback: bool,
    /// Fail when no host turns healthy for this long.
    #[serde(with = "humantime_serde")]
    pub progress_deadline: Duration,
    /// The service being rolled out.
    pub service: ServiceRun,
    /// When it was started.
    pub created_at: SystemTime,
    /// The last change.
    pub updated_at: SystemTime,
    /// The last time a host turned healthy (or the rollout started or
    /// resumed): the progress deadline counts from here.
    pub progress_at: SystemTime,
    /// Why it failed or was rolled back.
    pub error: Option<String>,
    /// The next command's sequence number.
    pub next_seq: u64,
}

/// One service's part of a rollout, resolved against the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRun {
    /// The service.
    pub name: String,
    /// The target version.
    pub version: String,
    /// The target artifact's digest.
    pub digest: String,
    /// The signed manifest, sent to every host in `Stage`.
    pub manifest: Vec<u8>,
    /// Its signature.
    pub signature: Vec<u8>,
    /// Hosts replaced at once.
    pub max_parallel: usize,
    /// Hosts that must stay in service.
    pub min_healthy: usize,
    /// Failures tolerated.
    pub max_failures: u32,
    /// The health gate every activation waits for.
    pub gate: HealthGate,
    /// Failures so far.
    pub failures: u32,
    /// Every target host.
    pub hosts: BTreeMap<HostId, HostRun>,
}

/// One host's part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRun {
    /// Where it is.
    pub state: HostState,
    /// The version it ran before (`None`: a first install).
    pub from_version: Option<String>,
    /// The version it is moving to.
    pub to_version: String,
    /// When its activation began.
    pub started_at: Option<SystemTime>,
    /// When its activation (or rollback) ended.
    pub finished_at: Option<SystemTime>,
    /// Why it failed.
    pub error: Option<String>,
    /// Whether this rollout swapped it (so a rollback must restore it).
    pub touched: bool,
    /// The command in flight, re-sent on every reconnect until it ends.
    pub outstanding: Option<Command>,
    /// Whether the agent is connected (learnt from the fleet, not stored).
    #[serde(skip)]
    pub connected: bool,
    /// Progress of the outstanding command (not stored).
    #[serde(skip)]
    pub progress: u32,
}

impl HostRun {
    /// A host about to move `from` → `to`.
    pub fn new(from_version: Option<String>, to_version: String, connected: bool) -> Self {
        let state = if from_version.as_deref() == Some(to_version.as_str()) {
            HostState::Healthy
        } else {
            HostState::Pending
        };
        Self {
            state,
            from_version,
            to_version,
            started_at: None,
            finished_at: None,
            error: None,
            touched: false,
            outstanding: None,
            connected,
            progress: 0,
        }
    }

    /// Counts toward `min_healthy`.
    fn in_service(&self) -> bool {
        self.connected
            && matches!(
                self.state,
                HostState::Pending
                    | HostState::Staging
                    | HostState::Staged
                    | HostState::Healthy
                    | HostState::RolledBack
            )
    }
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An agent reported on a command.
    Update(HostId, CommandUpdate),
    /// A host's agent connected (or was found connected after a restart).
    Connected(HostId),
    /// A host's agent disconnected.
    Disconnected(HostId),
    /// Time passed.
    Tick,
    /// An operator acted.
    Operator(Operator),
}

/// What an operator can ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    /// Start no new host.
    Pause,
    /// Continue.
    Resume,
    /// Stop for good, leave hosts as they are.
    Abort,
    /// Return every touched host to its previous version.
    Rollback,
    /// Continue after a canary step.
    Promote,
}

impl Operator {
    /// The verb, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Abort => "abort",
            Self::Rollback => "roll back",
            Self::Promote => "promote",
        }
    }
}

/// What the driver must do after persisting the new state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send a command to a host (dropped if it is not connected: the
    /// command stays outstanding and is re-sent when it connects).
    Send(HostId, Command),
}

/// An operator action that does not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} rollout {id}: it is {state}")]
pub struct Refused {
    /// The rollout.
    pub id: String,
    /// What was asked.
    pub action: &'static str,
    /// Its state.
    pub state: &'static str,
}

/// Advances `rollout` by one event.
pub fn step(
    rollout: &Rollout,
    event: &Event,
    now: SystemTime,
) -> Result<(Rollout, Vec<Action>), Refused> {
    let mut r = rollout.clone();
    let mut actions = Vec::new();
    match event {
        Event::Operator(op) => operator(&mut r, *op, now, &mut actions)?,
        Event::Connected(host) => {
            let fresh = r
                .service
                .hosts
                .get(host)
                .and_then(|h| h.outstanding.as_ref())
                .map(|cmd| deadline_for(&r, &cmd.kind, now));
            if let Some(h) = r.service.hosts.get_mut(host) {
                h.connected = true;
                if let (Some(cmd), Some(deadline)) = (&mut h.outstanding, fresh) {
                    // Same id (the agent answers it from its journal if it
                    // ran), fresh deadline: a host that was away for long
                    // must still get its rollback.
                    cmd.deadline = deadline;
                    actions.push(Action::Send(host.clone(), cmd.clone()));
                }
            }
        }
        Event::Disconnected(host) => {
            if let Some(h) = r.service.hosts.get_mut(host) {
                h.connected = false;
            }
        }
        Event::Update(host, update) => on_update(&mut r, host, update, now, &mut actions),
        Event::Tick => {}
    }
    advance(&mut r, now, &mut actions);
    let moved = r.state != rollout.state
        || r.error != rollout.error
        || r.service
            .hosts
            .iter()
            .zip(&rollout.service.hosts)
            .any(|((_, a), (_, b))| a.state != b.state || a.outstanding != b.outstanding);
    if moved {
        r.updated_at = now;
    }
    Ok((r, actions))
}

fn operator(
    r: &mut Rollout,
    op: Operator,
    now: SystemTime,
    actions: &mut Vec<Action>,
) -> Result<(), Refused> {
    let refuse = |r: &Rollout| Refused {
        id: r.id.clone(),
        action: op.as_str(),
        state: r.state.as_str(),
    };
    match op {
        Operator::Pause => match r.state {
            State::Pending | State::Staging | State::Progressing | State::AwaitingPromotion => {
                r.resume_to = Some(r.state);
                r.state = State::Paused;
            }
            _ => return Err(refuse(r)),
        },
        Operator::Resume => match (r.state, r.resume_to) {
            (State::Paused, Some(to)) => {
                r.state = to;
                r.resume_to = None;
                // Time spent paused does not count against progress.
                r.progress_at = now;
            }
            _ => return Err(refuse(r)),
        },
        Operator::Abort => {
            if r.state.is_terminal() {
                return Err(refuse(r));
            }
            r.state = State::Aborted;
            r.resume_to = None;
            r.error = Some("aborted by an operator".into());
            for h in r.service.hosts.values_mut() {
                h.outstanding = None;
            }
        }
        Operator::Promote => match r.state {
            State::AwaitingPromotion => {
                r.state = State::Progressing;
                r.progress_at = now;
            }
            _ => return Err(refuse(r)),
        },
        Operator::Rollback => {
            if matches!(r.state, State::RollingBack | State::RolledBack) {
                return Err(refuse(r));
            }
            begin_rollback(r, "rolled back by an operator".into(), now, actions);
        }
    }
    Ok(())
}

fn on_update(
    r: &mut Rollout,
    host: &HostId,
    update: &CommandUpdate,
    now: SystemTime,
    actions: &mut Vec<Action>,
) {
    if r.state.is_terminal() {
        return;
    }
    let Some(h) = r.service.hosts.get_mut(host) else {
        return;
    };
    let Some(cmd) = &h.outstanding else {
        return;
    };
    if cmd.id != update.command_id {
        return; // A superseded command (an activation a rollback cancelled).
    }
    let kind = cmd.kind.name();
    let outcome = match update.phase {
        Phase::Accepted | Phase::Running => {
            h.progress = update.progress_percent;
            return;
        }
        Phase::Done(outcome) => outcome,
    };
    h.outstanding = None;
    h.progress = 0;
    let failed = outcome == Outcome::Failed;
    match (kind, failed) {
        ("stage", false) => h.state = HostState::Staged,
        ("stage", true) => {
            h.state = HostState::Failed;
            h.error = Some(format!("staging failed: {}", update.error));
        }
        ("activate", false) => {
            h.state = HostState::Healthy;
            h.finished_at = Some(now);
            r.progress_at = now;
        }
        ("activate", true) => {
            h.state = HostState::Failed;
            h.finished_at = Some(now);
            h.error = Some(update.error.clone());
            r.service.failures += 1;
            // A failure within max_failures does not fail the rollout, but
            // the host must not stay on a version that failed it.
            if r.auto_rollback && r.service.failures <= r.service.max_failures {
                rollback_host(r, host, now, actions);
            }
        }
        ("rollback" | "remove", false) => {
            h.state = HostState::RolledBack;
            h.finished_at = Some(now);
        }
        ("rollback" | "remove", true) => {
            h.state = HostState::Failed;
            h.finished_at = Some(now);
            h.error = Some(format!("rollback failed: {}", update.error));
        }
        _ => {}
    }
}

/// When a command sent now must have finished.
fn deadline_for(r: &Rollout, kind: &CommandKind, now: SystemTime) -> SystemTime {
    match kind {
        CommandKind::Stage { .. } => now + r.progress_deadline,
        CommandKind::Noop | CommandKind::Remove { .. } => now + COMMAND_SLACK,
        CommandKind::Activate { gate, .. } | CommandKind::Rollback { gate, .. } => {
            now + gate.healthy_deadline + COMMAND_SLACK
        }
    }
}

/// Sends one touched host back to where it was.
fn rollback_host(r: &mut Rollout, host: &HostId, now: SystemTime, actions: &mut Vec<Action>) {
    let from = r
        .service
        .hosts
        .get(host)
        .and_then(|h| h.from_version.clone());
    let kind = match from {
        Some(version) => CommandKind::Rollback {
            service: r.service.name.clone(),
            version,
            gate: r.service.gate,
        },
        None => CommandKind::Remove {
            service: r.service.name.clone(),
        },
    };
    let deadline = deadline_for(r, &kind, now);
    send(r, host, kind, deadline, actions);
    if let Some(h) = r.service.hosts.get_mut(host) {
        h.state = HostState::RollingBack;
        h.finished_at = None;
    }
}

fn next_id(r: &mut Rollout) -> String {
    r.next_seq += 1;
    format!("{}/{}", r.id, r.next_seq)
}

fn send(
    r: &mut Rollout,
    host: &HostId,
    kind: CommandKind,
    deadline: SystemTime,
    actions: &mut Vec<Action>,
) {
    let id = next_id(r);
    let cmd = Command { id, deadline, kind };
    if let Some(h) = r.service.hosts.get_mut(host) {
        if h.connected {
            actions.push(Action::Send(host.clone(), cmd.clone()));
        }
        h.outstanding = Some(cmd);
        h.progress = 0;
    }
}

/// Decides what happens next from where everything is now.
fn advance(r: &mut Rollout, now: SystemTime, actions: &mut Vec<Action>) {
    match r.state {
        State::Pending => {
            r.state = State::Staging;
            let deadline = now + r.progress_deadline;
            let hosts: Vec<HostId> = hosts_in(r, HostState::Pending);
            for host in hosts {
                let kind = CommandKind::Stage {
                    service: r.service.name.clone(),
                    version: r.service.version.clone(),
                    manifest: r.service.manifest.clone(),
                    signature: r.service.signature.clone(),
                };
                send(r, &host, kind, deadline, actions);
                if let Some(h) = r.service.hosts.get_mut(&host) {
                    h.state = HostState::Staging;
                }
            }
            r.progress_at = now;
            advance(r, now, actions);
        }
        State::Staging => {
            let failed = failed_hosts(r);
            let staging = r
                .service
                .hosts
                .values()
                .any(|h| h.state == HostState::Staging);
            if !failed.is_empty() && !staging {
                // Every host has answered, so each one's error is on
                // record. Nothing was swapped yet: nothing to undo.
                for h in r.service.hosts.values_mut() {
                    h.outstanding = None;
                }
                r.state = State::Failed;
                r.error = Some(format!(
                    "staging failed on {} host(s), nothing was activated: {}",
                    failed.len(),
                    failed.join("; ")
                ));
            } else if r
                .service
                .hosts
                .values()
                .all(|h| matches!(h.state, HostState::Staged | HostState::Healthy))
            {
                r.state = State::Progressing;
                r.progress_at = now;
                advance(r, now, actions);
            } else {
                check_progress(r, now, actions);
            }
        }
        State::Progressing => {
            if r.service.failures > r.service.max_failures {
                let failed = failed_hosts(r);
                fail(
                    r,
                    format!(
                        "{} host(s) failed, more than max_failures = {}: {}",
                        r.service.failures,
                        r.service.max_failures,
                        failed.join("; ")
                    ),
                    now,
                    actions,
                );
                return;
            }
            start_hosts(r, now, actions);
            let done = r.service.hosts.values().all(|h| {
                matches!(
                    h.state,
                    HostState::Healthy | HostState::Failed | HostState::RolledBack
                )
            });
            if done {
                r.state = State::Succeeded;
            } else {
                check_progress(r, now, actions);
            }
        }
        State::Paused => {
            // Hosts still activating finish; a failure among them is still
            // acted on, because it says the new version is bad.
            if r.service.failures > r.service.max_failures {
                r.resume_to = None;
                fail(
                    r,
                    format!(
                        "{} host(s) failed while paused, more than max_failures = {}",
                        r.service.failures, r.service.max_failures
                    ),
                    now,
                    actions,
                );
            }
        }
        State::RollingBack => {
            let busy: Vec<String> = r
                .service
                .hosts
                .iter()
                .filter(|(_, h)| h.state == HostState::RollingBack)
                .map(|(id, _)| id.to_string())
                .collect();
            let stalled = now
                .duration_since(r.progress_at)
                .is_ok_and(|d| d >= r.progress_deadline);
            if !busy.is_empty() && stalled {
                // A host that never comes back must not hold the service
                // (and every later rollout of it) forever.
                for h in r.service.hosts.values_mut() {
                    h.outstanding = None;
                }
                r.state = State::Failed;
                r.error = Some(format!(
                    "{}; then the rollback did not finish within progress_deadline {} on {}",
                    r.error.as_deref().unwrap_or("rolling back"),
                    humantime::format_duration(r.progress_deadline),
                    busy.join(", ")
                ));
            } else if busy.is_empty() {
                let failed: Vec<String> = r
                    .service
                    .hosts
                    .iter()
                    .filter(|(_, h)| {
                        h.touched
                            && h.state == HostState::Failed
                            && h.error
                                .as_deref()
                                .is_some_and(|e| e.starts_with("rollback failed"))
                    })
                    .map(|(id, h)| format!("{id}: {}", h.error.as_deref().unwrap_or("")))
                    .collect();
                if failed.is_empty() {
                    r.state = State::RolledBack;
                } else {
                    r.state = State::Failed;
                    r.error = Some(format!(
                        "{}; then the rollback failed on {}",
                        r.error.as_deref().unwrap_or("rolling back"),
                        failed.join("; ")
                    ));
                }
            }
        }
        State::AwaitingPromotion
        | State::Succeeded
        | State::Failed
        | State::RolledBack
        | State::Aborted => {}
    }
}

/// `host: error` for every failed host, for the rollout's error.
fn failed_hosts(r: &Rollout) -> Vec<String> {
    r.service
        .hosts
        .iter()
        .filter(|(_, h)| h.state == HostState::Failed)
        .map(|(id, h)| format!("{id}: {}", h.error.as_deref().unwrap_or("failed")))
        .collect()
}

fn hosts_in(r: &Rollout, state: HostState) -> Vec<HostId> {
    r.service
        .hosts
        .iter()
        .filter(|(_, h)| h.state == state)
        .map(|(id, _)| id.clone())
        .collect()
}

/// Starts as many staged hosts as the window and the floor allow.
fn start_hosts(r: &mut Rollout, now: SystemTime, actions: &mut Vec<Action>) {
    let activating = r
        .service
        .hosts
        .values()
        .filter(|h| h.state == HostState::Activating)
        .count();
    let in_service = r.service.hosts.values().filter(|h| h.in_service()).count();
    let room = r
        .service
        .max_parallel
        .saturating_sub(activating)
        .min(in_service.saturating_sub(r.service.min_healthy));
    // Connected hosts first: starting a disconnected one would only take
    // a window slot until it returns.
    let candidates: Vec<HostId> = r
        .service
        .hosts
        .iter()
        .filter(|(_, h)| h.state == HostState::Staged && h.connected)
        .map(|(id, _)| id.clone())
        .take(room)
        .collect();
    let deadline = now + r.service.gate.healthy_deadline + COMMAND_SLACK;
    for host in candidates {
        let kind = CommandKind::Activate {
            service: r.service.name.clone(),
            version: r.service.version.clone(),
            gate: r.service.gate,
        };
        send(r, &host, kind, deadline, actions);
        if let Some(h) = r.service.hosts.get_mut(&host) {
            h.state = HostState::Activating;
            h.touched = true;
            h.started_at = Some(now);
            h.finished_at = None;
        }
    }
}

fn check_progress(r: &mut Rollout, now: SystemTime, actions: &mut Vec<Action>) {
    let stalled = now
        .duration_since(r.progress_at)
        .is_ok_and(|d| d >= r.progress_deadline);
    if stalled {
        let what = if r.state == State::Staging {
            "staging did not finish"
        } else {
            "no host turned healthy"
        };
        fail(
            r,
            format!(
                "{what} within progress_deadline {}",
                humantime::format_duration(r.progress_deadline)
            ),
            now,
            actions,
        );
    }
}

/// The rollout failed: roll back if asked to, else stop where it is.
fn fail(r: &mut Rollout, why: String, now: SystemTime, actions: &mut Vec<Action>) {
    if r.auto_rollback && r.service.hosts.values().any(|h| h.touched) {
        begin_rollback(r, why, now, actions);
    } else {
        for h in r.service.hosts.values_mut() {
            h.outstanding = None;
        }
        r.state = State::Failed;
        r.error = Some(why);
    }
}

/// Sends every host this rollout swapped back to where it was.
fn begin_rollback(r: &mut Rollout, why: String, now: SystemTime, actions: &mut Vec<Action>) {
    r.state = State::RollingBack;
    r.resume_to = None;
    r.error = Some(why);
    r.progress_at = now;
    let touched: Vec<HostId> = r
        .service
        .hosts
        .iter()
        .filter(|(_, h)| {
            h.touched && !matches!(h.state, HostState::RolledBack | HostState::RollingBack)
        })
        .map(|(id, _)| id.clone())
        .collect();
    for host in touched {
        rollback_host(r, &host, now, actions);
    }
    // Untouched hosts keep what they run; their staged release is unused.
    for h in r.service.hosts.values_mut() {
        if !h.touched && h.outstanding.is_some() {
            h.outstanding = None;
        }
    }
    advance(r, now, actions);
}

#[cfg(test)]
mod tests;
