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
//! A rollout holds one or more services in topological order. A service
//! starts once every service it depends on has succeeded (at most
//! `max_parallel_services` at once) and its version requirements hold; its
//! hosts are replaced in a sliding window: at most `max_parallel` activate
//! at once, one starts only if the hosts still in service stay at or above
//! `min_healthy` (a host that is activating, failed or disconnected is out
//! of service), within the current step (canary: then `awaiting_promotion`),
//! and never while the same host activates for another service. A failure
//! rolls every changed service back, dependents first. Every command carries an id `<rollout>/<seq>`; the
//! host remembers the one outstanding command, which is re-sent whenever
//! the host reconnects (the agent answers a known id from its journal
//! instead of running it again) and updates for any other id are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use baton_common::command::{
    Command, CommandKind, CommandUpdate, FailureDetail, FailureKind, HealthGate, Outcome, Phase,
};
use baton_common::host::HostId;

use serde::{Deserialize, Serialize};

use crate::analysis::{Check, Outcome as Judged, Verdict};

/// Slack added to a health gate's deadline for the command deadline:
/// hooks, stopping the old process and the swap itself.
const COMMAND_SLACK: Duration = Duration::from_secs(120);
/// How much longer than `healthy_deadline` a host upgrading its own agent
/// may stay away before it counts as failed.
const AGENT_RETURN_GRACE: Duration = Duration::from_secs(30);

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

    /// Every state, in the order a rollout can reach them.
    pub const ALL: [Self; 10] = [
        Self::Pending,
        Self::Staging,
        Self::Progressing,
        Self::AwaitingPromotion,
        Self::Paused,
        Self::RollingBack,
        Self::Succeeded,
        Self::Failed,
        Self::RolledBack,
        Self::Aborted,
    ];
}

impl std::str::FromStr for State {
    type Err = String;

    /// The state of a contract name (`rolled_back`).
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("no rollout state {}", baton_common::text::quote(s)))
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

/// A rollout: one or more services, upgraded in dependency order.
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
    /// How many services may progress at once.
    pub max_parallel_services: usize,
    /// The services, in topological order (dependencies first).
    pub services: Vec<ServiceRun>,
    /// When it was started.
    pub created_at: SystemTime,
    /// The last change.
    pub updated_at: SystemTime,
    /// The last time a host turned healthy (or the rollout started,
    /// resumed or began rolling back): deadlines count from here.
    pub progress_at: SystemTime,
    /// Why it failed or was rolled back.
    pub error: Option<String>,
    /// The next command's sequence number.
    pub next_seq: u64,
    /// Target hosts whose agent is not connected (learnt from the fleet,
    /// not stored): deadlines for hosts away are checked only on these.
    #[serde(skip)]
    pub away: BTreeSet<HostId>,
    /// Host failures tolerated across all services (`None`: each
    /// service's `max_failures` alone).
    #[serde(default)]
    pub failure_budget: Option<u32>,
    /// Who started it (the operator's identity): an approval must come
    /// from someone else.
    #[serde(default)]
    pub started_by: String,
    /// Why no new host may start now (a freeze, a closed deployment
    /// window), as the driver last said ([`Event::Hold`]); stored, so a
    /// hold that lifted while `batond` was down is lifted on load (and
    /// its time not counted against `progress_deadline`). Hosts already
    /// activating finish; a pending rollout waits.
    #[serde(default)]
    pub held: Option<String>,
}

/// A bake in progress: the analysis of a step, started when its hosts
/// turned healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bake {
    /// The step judged.
    pub step: usize,
    /// When it began.
    pub since: SystemTime,
}

/// Where one service of a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Waiting for its dependencies (or a free service slot).
    Waiting,
    /// Replacing hosts.
    Progressing,
    /// A step (the canary) is done; waiting for `promote`.
    AwaitingPromotion,
    /// Every host is done.
    Succeeded,
    /// Returning its hosts to their previous versions.
    RollingBack,
    /// Every host it touched is back.
    RolledBack,
}

impl ServiceState {
    /// The name shown in `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Progressing => "progressing",
            Self::AwaitingPromotion => "awaiting_promotion",
            Self::Succeeded => "succeeded",
            Self::RollingBack => "rolling_back",
            Self::RolledBack => "rolled_back",
        }
    }
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
    /// Services of this plan that must succeed first.
    pub depends_on: Vec<String>,
    /// Version requirements (semver) on other services.
    pub requires: BTreeMap<String, String>,
    /// For required services outside the plan: the versions hosts ran when
    /// the rollout started.
    pub outside: BTreeMap<String, Vec<String>>,
    /// Hosts replaced at once.
    pub max_parallel: usize,
    /// Hosts that must stay in service.
    pub min_healthy: usize,
    /// Failures tolerated.
    pub max_failures: u32,
    /// The health gate every activation waits for.
    pub gate: HealthGate,
    /// Cumulative host counts per step (the last is every host).
    pub steps: Vec<usize>,
    /// The current step.
    pub step: usize,
    /// Wait for `promote` after each step but the last (canary).
    pub promote: bool,
    /// Wait this long between steps.
    #[serde(with = "humantime_serde")]
    pub pause: Option<Duration>,
    /// When the current step completed (for `pause`).
    pub step_done_at: Option<SystemTime>,
    /// Failures so far.
    pub failures: u32,
    /// Where it is.
    pub state: ServiceState,
    /// Every target host.
    pub hosts: BTreeMap<HostId, HostRun>,
    /// The plan allows going to a lower version.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// The checks run after each step (from the plan).
    #[serde(default)]
    pub analysis: Vec<Check>,
    /// The bake in progress, if any.
    #[serde(default)]
    pub bake: Option<Bake>,
    /// The verdicts reached, oldest first (at most [`MAX_VERDICTS`]; a
    /// rollout's record keeps at most 256 in all).
    #[serde(default)]
    pub verdicts: Vec<Verdict>,
    /// The last step judged (however many of its verdicts are still kept).
    #[serde(default)]
    pub judged: Option<usize>,
    /// The service needs an approval (by an operator other than its
    /// starter) before its first host.
    #[serde(default)]
    pub approval: bool,
    /// It was approved.
    #[serde(default)]
    pub approved: bool,
    /// The load balancer its hosts are drained from around each
    /// activation and rollback (from the plan; filled into the commands
    /// as they are sent, not stored per host).
    #[serde(default)]
    pub traffic: Option<baton_common::traffic::Traffic>,
    /// Hosts changed since the driver last took them, with their value
    /// before (not stored): what a step persists and reports.
    #[serde(skip)]
    pub changed: Changed,
}

/// Hosts a step changed, each with its value before the first change;
/// equal to any other (it records how a value came about, not what it is).
#[derive(Debug, Clone, Default)]
pub struct Changed(pub BTreeMap<HostId, HostRun>);

impl PartialEq for Changed {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Changed {}

impl ServiceRun {
    /// A host to change: remembered with its value before, so the driver
    /// persists (and reports) only the hosts a step changed. Every change
    /// of a host goes through here.
    pub fn host_mut(&mut self, id: &HostId) -> Option<&mut HostRun> {
        let h = self.hosts.get_mut(id)?;
        self.changed
            .0
            .entry(id.clone())
            .or_insert_with(|| h.clone());
        Some(h)
    }

    /// The hosts matching `pred`, to change one by one with
    /// [`Self::host_mut`].
    fn hosts_where(&self, pred: impl Fn(&HostRun) -> bool) -> Vec<HostId> {
        self.hosts
            .iter()
            .filter(|(_, h)| pred(h))
            .map(|(id, _)| id.clone())
            .collect()
    }
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
    /// The kind of its failure, when it failed and the kind is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureKind>,
    /// A failed activation's probe answer and the end of the service's log.
    #[serde(default, skip_serializing_if = "FailureDetail::is_empty")]
    pub detail: FailureDetail,
    /// Whether this rollout swapped it (so a rollback must restore it).
    pub touched: bool,
    /// The command in flight, re-sent on every reconnect until it ends.
    pub outstanding: Option<Command>,
    /// Connections its commands had to cut (a drain past `drain_timeout`,
    /// an old process stopped at its `stop_timeout`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub connections_cut: u32,
    /// Whether the agent is connected (learnt from the fleet, not stored).
    #[serde(skip)]
    pub connected: bool,
    /// Progress of the outstanding command (not stored).
    #[serde(skip)]
    pub progress: u32,
    /// Since when the agent has been away (not stored: after a restart it
    /// counts from the first tick).
    #[serde(skip)]
    pub gone_since: Option<SystemTime>,
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
            failure: None,
            detail: FailureDetail::default(),
            touched: false,
            outstanding: None,
            connections_cut: 0,
            connected,
            progress: 0,
            gone_since: None,
        }
    }

    /// Counts toward `min_healthy`.
    fn in_service(&self) -> bool {
        self.connected && self.usable()
    }

    /// Serves (or will, once back): anything but a host taken out by this
    /// rollout. A host that failed before it was touched (its staging
    /// failed) still runs its old release.
    fn usable(&self) -> bool {
        match self.state {
            HostState::Pending
            | HostState::Staging
            | HostState::Staged
            | HostState::Healthy
            | HostState::RolledBack => true,
            HostState::Failed => !self.touched,
            HostState::Activating | HostState::RollingBack => false,
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
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
    /// The driver's hold changed: `Some(why)` while a freeze or a closed
    /// deployment window holds new hosts back, `None` when it lifts (the
    /// time held does not count against `progress_deadline`).
    Hold(Option<String>),
    /// A bake ended: the verdicts of service `service`'s checks on step
    /// `step` (ignored unless that bake is the one in progress).
    Analysis {
        /// The service's index.
        service: usize,
        /// The step judged.
        step: usize,
        /// One per check.
        verdicts: Vec<Verdict>,
    },
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

/// A plan text starting with this makes [`step`] panic, in tests only: the
/// driver's containment of faults is tested with it.
#[cfg(any(test, feature = "testing"))]
pub const INJECT_PANIC: &str = "# inject a panic";

/// Advances `rollout` by one event, returning the new state (a copy: for
/// tests and previews; the driver steps its rollouts in place with
/// [`apply`]).
pub fn step(
    rollout: &Rollout,
    event: &Event,
    now: SystemTime,
) -> Result<(Rollout, Vec<Action>), Refused> {
    let mut r = rollout.clone();
    let actions = apply(&mut r, std::slice::from_ref(event), now)?;
    for s in &mut r.services {
        s.changed.0.clear();
    }
    Ok((r, actions))
}

/// What [`apply`] compares to tell whether a step moved the rollout.
#[derive(PartialEq)]
struct Shape {
    state: State,
    error: Option<String>,
    services: Vec<(ServiceState, usize)>,
}

impl Shape {
    fn of(r: &Rollout) -> Self {
        Self {
            state: r.state,
            error: r.error.clone(),
            services: r.services.iter().map(|s| (s.state, s.step)).collect(),
        }
    }
}

/// Advances `rollout` in place by `events`, then settles it once: the cost
/// is that of the events and of one pass over the rollout, however many
/// events there are. Every host changed is recorded in its service's
/// [`ServiceRun::changed`], so the caller persists only those.
///
/// An operator's event is refused before it changes anything; the driver
/// applies those one at a time, so a refusal leaves the rollout as it was.
pub fn apply(r: &mut Rollout, events: &[Event], now: SystemTime) -> Result<Vec<Action>, Refused> {
    #[cfg(any(test, feature = "testing"))]
    if r.plan.starts_with(INJECT_PANIC) {
        panic!("a fault injected by a test");
    }
    let before = Shape::of(r);
    let mut actions = Vec::new();
    for event in events {
        take(r, event, now, &mut actions)?;
    }
    if !r.state.is_terminal() {
        gone_hosts_fail(r, now);
    }
    advance(r, now, &mut actions);
    if r.state.is_terminal() || r.state == State::RollingBack {
        // Nothing is judged any more.
        for s in &mut r.services {
            s.bake = None;
        }
    }
    let moved = before != Shape::of(r)
        || r.services.iter().any(|s| {
            s.changed.0.iter().any(|(id, was)| {
                s.hosts
                    .get(id)
                    .is_some_and(|h| h.state != was.state || h.outstanding != was.outstanding)
            })
        });
    if moved {
        r.updated_at = now;
    }
    Ok(actions)
}

/// The direct effect of one event, before the rollout is settled.
fn take(
    r: &mut Rollout,
    event: &Event,
    now: SystemTime,
    actions: &mut Vec<Action>,
) -> Result<(), Refused> {
    match event {
        Event::Operator(op) => operator(r, *op, now, actions)?,
        Event::Connected(host) => {
            r.away.remove(host);
            for si in 0..r.services.len() {
                let fresh = r.services[si]
                    .hosts
                    .get(host)
                    .and_then(|h| h.outstanding.as_ref())
                    .map(|cmd| deadline_of(r, si, &cmd.kind, now));
                if let Some(h) = r.services[si].host_mut(host) {
                    h.connected = true;
                    h.gone_since = None;
                    if let (Some(cmd), Some(deadline)) = (&mut h.outstanding, fresh) {
                        // Same id (the agent answers it from its journal if
                        // it ran), fresh deadline: a host that was away for
                        // long must still get its rollback.
                        cmd.deadline = deadline;
                        actions.push(Action::Send(host.clone(), cmd.clone()));
                    }
                }
            }
        }
        Event::Disconnected(host) => {
            let mut known = false;
            for s in &mut r.services {
                if let Some(h) = s.host_mut(host) {
                    h.connected = false;
                    h.gone_since.get_or_insert(now);
                    known = true;
                }
            }
            if known {
                r.away.insert(host.clone());
            }
        }
        Event::Update(host, update) => on_update(r, host, update, now, actions),
        Event::Analysis {
            service,
            step,
            verdicts,
        } => on_verdicts(r, *service, *step, verdicts, now, actions),
        Event::Hold(why) => {
            if r.held.is_some() && why.is_none() {
                r.progress_at = now;
            }
            r.held.clone_from(why);
        }
        Event::Tick => {}
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
    // The service whose outstanding command on this host it answers; any
    // other id is a superseded command (an activation a rollback cancelled).
    let Some(si) = r.services.iter().position(|s| {
        s.hosts
            .get(host)
            .and_then(|h| h.outstanding.as_ref())
            .is_some_and(|c| c.id == update.command_id)
    }) else {
        return;
    };
    let auto_rollback = r.auto_rollback;
    let rolling_back = r.state == State::RollingBack;
    let s = &mut r.services[si];
    let Some(h) = s.host_mut(host) else {
        return;
    };
    let kind = h.outstanding.as_ref().map_or("", |c| c.kind.name());
    let outcome = match update.phase {
        Phase::Accepted | Phase::Running => {
            h.progress = update.progress_percent;
            return;
        }
        Phase::Done(outcome) => outcome,
    };
    h.outstanding = None;
    h.progress = 0;
    h.connections_cut = h.connections_cut.saturating_add(update.connections_cut);
    let failed = outcome == Outcome::Failed;
    match (kind, failed) {
        ("stage", false) => h.state = HostState::Staged,
        ("stage", true) => {
            // A host that cannot stage keeps running what it ran; it counts
            // against max_failures like any failed host.
            h.state = HostState::Failed;
            h.error = Some(format!("staging failed: {}", update.error));
            h.failure = update.failure;
            s.failures = s.failures.saturating_add(1);
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
            h.failure = update.failure;
            h.detail = update.detail.clone();
            s.failures = s.failures.saturating_add(1);
            // A failure within max_failures does not fail the rollout, but
            // the host must not stay on a version that failed it. (While
            // the system rolls back, the rollback takes it in its turn.)
            if auto_rollback && s.failures <= s.max_failures && !rolling_back {
                rollback_host(r, si, host, now, actions);
            }
        }
        ("rollback" | "remove", false) => {
            h.state = HostState::RolledBack;
            h.finished_at = Some(now);
            r.progress_at = now;
        }
        ("rollback" | "remove", true) => {
            h.state = HostState::Failed;
            h.finished_at = Some(now);
            h.error = Some(format!("rollback failed: {}", update.error));
            h.failure = update.failure;
            h.detail = update.detail.clone();
        }
        _ => {}
    }
}

fn send(
    r: &mut Rollout,
    si: usize,
    host: &HostId,
    kind: CommandKind,
    actions: &mut Vec<Action>,
    now: SystemTime,
) {
    let deadline = deadline_of(r, si, &kind, now);
    r.next_seq = r.next_seq.saturating_add(1);
    let cmd = Command {
        id: format!("{}/{}", r.id, r.next_seq),
        deadline,
        kind,
        traffic: None,
    };
    if let Some(h) = r.services[si].host_mut(host) {
        if h.connected {
            actions.push(Action::Send(host.clone(), cmd.clone()));
        }
        h.outstanding = Some(cmd);
        h.progress = 0;
    }
}

/// Whether `host` runs an activation or rollback for any service.
fn host_busy(r: &Rollout, host: &HostId) -> bool {
    r.services.iter().any(|s| {
        s.hosts
            .get(host)
            .is_some_and(|h| matches!(h.state, HostState::Activating | HostState::RollingBack))
    })
}

/// Decides what happens next from where everything is now.
fn advance(r: &mut Rollout, now: SystemTime, actions: &mut Vec<Action>) {
    match r.state {
        // Started during a freeze: it waits.
        State::Pending if r.held.is_some() => {}
        State::Pending => {
            r.state = State::Staging;
            for si in 0..r.services.len() {
                let hosts: Vec<HostId> = r.services[si]
                    .hosts
                    .iter()
                    .filter(|(_, h)| h.state == HostState::Pending)
                    .map(|(id, _)| id.clone())
                    .collect();
                for host in hosts {
                    let s = &r.services[si];
                    let kind = CommandKind::Stage {
                        service: s.name.clone(),
                        version: s.version.clone(),
                        // Filled in when sent ([`Rollout::payload`]): the
                        // manifest is the service's, not copied per host.
                        manifest: Vec::new(),
                        signature: Vec::new(),
                    };
                    send(r, si, &host, kind, actions, now);
                    if let Some(h) = r.services[si].host_mut(&host) {
                        h.state = HostState::Staging;
                    }
                }
            }
            r.progress_at = now;
            advance(r, now, actions);
        }
        State::Staging => {
            let all = r.services.iter().flat_map(|s| s.hosts.values());
            let staging = all.clone().any(|h| h.state == HostState::Staging);
            let failed = failed_hosts(r);
            let too_many = r.services.iter().any(|s| s.failures > s.max_failures);
            if too_many && !staging {
                // Every host has answered, so each one's error is on
                // record. Nothing was swapped yet: nothing to undo.
                clear_outstanding(r);
                r.state = State::Failed;
                r.error = Some(format!(
                    "staging failed on {} host(s), nothing was activated: {}",
                    failed.len(),
                    summary(&failed)
                ));
            } else if !staging {
                // Failures within max_failures: the rest go on.
                r.state = State::Progressing;
                r.progress_at = now;
                advance(r, now, actions);
            } else {
                check_progress(r, now, actions);
            }
        }
        State::Progressing | State::AwaitingPromotion => {
            if let Some(s) = r.services.iter().find(|s| s.failures > s.max_failures) {
                let why = format!(
                    "{}: {} host(s) failed, more than max_failures = {}: {}",
                    s.name,
                    s.failures,
                    s.max_failures,
                    summary(&failed_hosts(r))
                );
                fail(r, why, now, actions);
                return;
            }
            if let Some(budget) = r.failure_budget {
                let total: u32 = r
                    .services
                    .iter()
                    .fold(0u32, |n, s| n.saturating_add(s.failures));
                if total > budget {
                    let why = format!(
                        "{total} host(s) failed across the rollout, more than failure_budget = {budget}: {}",
                        summary(&failed_hosts(r))
                    );
                    fail(r, why, now, actions);
                    return;
                }
            }
            // A service finishing lets its dependents start, a step
            // finishing lets the next one start: settle all of it now.
            for _ in 0..=r.services.len() * 4 + 2 {
                let before: Vec<(ServiceState, usize)> =
                    r.services.iter().map(|s| (s.state, s.step)).collect();
                start_services(r, now, actions);
                if r.state.is_terminal() || r.state == State::RollingBack {
                    return;
                }
                for si in 0..r.services.len() {
                    if r.services[si].state == ServiceState::Progressing
                        && let Some(why) = progress_service(r, si, now, actions)
                    {
                        fail(r, why, now, actions);
                        return;
                    }
                }
                let after: Vec<(ServiceState, usize)> =
                    r.services.iter().map(|s| (s.state, s.step)).collect();
                if before == after {
                    break;
                }
            }
            if r.services
                .iter()
                .all(|s| s.state == ServiceState::Succeeded)
            {
                r.state = State::Succeeded;
                return;
            }
            r.state = if r
                .services
                .iter()
                .any(|s| s.state == ServiceState::AwaitingPromotion)
            {
                State::AwaitingPromotion
            } else {
                State::Progressing
            };
            check_progress(r, now, actions);
        }
        State::Paused => {
            // Hosts still activating finish; a failure among them is still
            // acted on, because it says the new version is bad.
            if let Some(s) = r.services.iter().find(|s| s.failures > s.max_failures) {
                let why = format!(
                    "{}: {} host(s) failed while paused, more than max_failures = {}",
                    s.name, s.failures, s.max_failures
                );
                r.resume_to = None;
                fail(r, why, now, actions);
            }
        }
        State::RollingBack => roll_back_services(r, now, actions),
        State::Succeeded | State::Failed | State::RolledBack | State::Aborted => {}
    }
}

fn clear_outstanding(r: &mut Rollout) {
    for s in &mut r.services {
        for id in s.hosts_where(|h| h.outstanding.is_some()) {
            if let Some(h) = s.host_mut(&id) {
                h.outstanding = None;
            }
        }
    }
}

/// Starts hosts of one service within its window, floor and step, and
/// moves it through its steps.
fn progress_service(
    r: &mut Rollout,
    si: usize,
    now: SystemTime,
    actions: &mut Vec<Action>,
) -> Option<String> {
    let s = &r.services[si];
    // A host rolling back (its activation failed within max_failures) is
    // in the window as much as one activating.
    let activating = s
        .hosts
        .values()
        .filter(|h| matches!(h.state, HostState::Activating | HostState::RollingBack))
        .count();
    let in_service = s.hosts.values().filter(|h| h.in_service()).count();
    let started = s
        .hosts
        .values()
        .filter(|h| {
            !matches!(
                h.state,
                HostState::Pending | HostState::Staging | HostState::Staged
            )
        })
        .count();
    let step_limit = s.steps.get(s.step).copied().unwrap_or(s.hosts.len());
    // Held (a freeze, a closed window) or baking: no new host starts.
    let held = r.held.is_some() || s.bake.is_some();
    let room = if held { 0 } else { s.max_parallel }
        .saturating_sub(activating)
        .min(in_service.saturating_sub(s.min_healthy))
        .min(step_limit.saturating_sub(started));
    // Hosts that failed (within max_failures) stay out of service. If they
    // alone leave no room above the floor, waiting cannot help: say so
    // now instead of at the progress deadline.
    let usable = s.hosts.values().filter(|h| h.usable()).count();
    let remaining = s.hosts.values().any(|h| h.state == HostState::Staged);
    let in_flight = s
        .hosts
        .values()
        .any(|h| matches!(h.state, HostState::Activating | HostState::RollingBack));
    if remaining && !in_flight && usable <= s.min_healthy {
        return Some(format!(
            "{}: {} failed host(s) leave {usable} usable, and min_healthy = {} allows none of the rest to be replaced",
            s.name,
            s.hosts.len() - usable,
            s.min_healthy
        ));
    }
    let candidates: Vec<HostId> = s
        .hosts
        .iter()
        .filter(|(id, h)| h.state == HostState::Staged && h.connected && !host_busy(r, id))
        .map(|(id, _)| id.clone())
        .take(room)
        .collect();
    for host in candidates {
        let s = &r.services[si];
        let kind = CommandKind::Activate {
            service: s.name.clone(),
            version: s.version.clone(),
            gate: s.gate,
            allow_downgrade: s.allow_downgrade,
        };
        send(r, si, &host, kind, actions, now);
        if let Some(h) = r.services[si].host_mut(&host) {
            h.state = HostState::Activating;
            h.touched = true;
            h.started_at = Some(now);
            h.finished_at = None;
        }
    }
    let s = &mut r.services[si];
    let settled = |h: &HostRun| {
        matches!(
            h.state,
            HostState::Healthy | HostState::Failed | HostState::RolledBack
        )
    };
    let all_settled = s.hosts.values().all(settled);
    let step_limit = s.steps.get(s.step).copied().unwrap_or(s.hosts.len());
    let step_settled = s.hosts.values().filter(|h| settled(h)).count() >= step_limit
        && !s
            .hosts
            .values()
            .any(|h| matches!(h.state, HostState::Activating | HostState::RollingBack));
    if (all_settled || step_settled) && !s.analysis.is_empty() {
        // The step's hosts are through their health gate: bake, unless
        // this step is judged already or no host of it runs the new
        // version (they all failed within max_failures).
        let judged = s.judged.is_some_and(|j| j >= s.step);
        let judgeable = s
            .hosts
            .values()
            .any(|h| h.state == HostState::Healthy && h.touched);
        if !judged && judgeable {
            if s.bake.is_none() {
                s.bake = Some(Bake {
                    step: s.step,
                    since: now,
                });
            }
            return None;
        }
    }
    if all_settled {
        s.state = ServiceState::Succeeded;
        return None;
    }
    if step_settled && s.step + 1 < s.steps.len() {
        // A canary step whose every check passed promotes itself, unless
        // the service needs a person's approval.
        let verdicts: Vec<&Verdict> = s.verdicts.iter().filter(|v| v.step == s.step).collect();
        let passed = !verdicts.is_empty()
            && verdicts
                .iter()
                .all(|v| matches!(v.verdict, Judged::Pass | Judged::Skipped));
        if s.promote && (!passed || s.approval) {
            s.state = ServiceState::AwaitingPromotion;
        } else if let Some(pause) = s.pause {
            let done = *s.step_done_at.get_or_insert(now);
            if now.duration_since(done).is_ok_and(|d| d >= pause) {
                s.step += 1;
                s.step_done_at = None;
                r.progress_at = now;
            }
        } else {
            s.step += 1;
        }
    }
    None
}

/// The rollout failed: roll back if asked to, else stop where it is.
fn fail(r: &mut Rollout, why: String, now: SystemTime, actions: &mut Vec<Action>) {
    let touched = r
        .services
        .iter()
        .any(|s| s.hosts.values().any(|h| h.touched));
    if r.auto_rollback && touched {
        begin_rollback(r, why, now, actions);
    } else {
        clear_outstanding(r);
        r.state = State::Failed;
        r.error = Some(why);
    }
}

/// The rollout as it stands, failed because stepping it went wrong in an
/// unexpected way (`why`): no command is sent, nothing is rolled back
/// automatically (an operator can still roll it back), and the record is
/// kept so that a restart does not step it into the same fault again.
pub fn faulted(r: &mut Rollout, why: &str, now: SystemTime) {
    clear_outstanding(r);
    r.state = State::Failed;
    r.resume_to = None;
    r.updated_at = now;
    r.error = Some(format!(
        "stopped by an internal error, hosts left as they are (please report it): {}",
        baton_common::text::prefix(why, 300)
    ));
}

mod bake;
mod deadlines;
mod operator;
mod report;
mod requires;
mod rollback;
mod services;
mod view;

use bake::on_verdicts;
use deadlines::{check_progress, deadline_for, deadline_of, gone_deadline, gone_hosts_fail};
use operator::operator;
use report::failed_hosts;
pub use report::summary;
pub use requires::satisfies;
use requires::unmet_requirement;
use rollback::{begin_rollback, roll_back_services, rollback_host};
use services::start_services;

#[cfg(test)]
mod tests;

/// Rollouts for tests, here and in the coordinator (feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub mod tests_support;
