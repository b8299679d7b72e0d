//! Activation and rollback: make a staged release current and running,
//! then wait for its health gate — within the command's deadline, and
//! cancellable by a rollback or an abort at every step.
//!
//! Two shapes: with `listen` sockets the new process starts beside the old
//! one (handoff), and the old one is stopped once the new one is ready;
//! without, the old one is stopped first. Either way:
//!
//! - stopping the old process counts against the deadline: it is killed
//!   when the time the activation has left (less `min_healthy_time`) runs
//!   out, and the activation fails saying so;
//! - a cancelled activation never swaps `current` afterwards;
//! - when the old process was stopped and the new release does not take
//!   its place (cancelled, out of time, a full disk, a start that fails),
//!   the old release is started again: it keeps serving.

use std::time::{Duration, SystemTime};

use baton_common::artifact;
use baton_common::command::{FailureKind, HealthGate};
use baton_common::host::ServiceState;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::failure::{Classify, Failure};
use super::hooks::{Bound, run_hook};
use super::release::Release;
use super::runner::{Runner, Unit};
use super::{
    Current, Executor, Slot, SlotState, cancel_activations, listen_specs, lock, notify_socket,
    wait_ready,
};
use crate::health::{self, Gate};
use crate::service::{self, Readiness, SupervisorKind};
use crate::supervisor::{Forced, StopBound, Stopped, Supervisor, SupervisorError};

/// The tokio instant of a wall-clock deadline (now, if it has passed).
pub(super) fn instant_of(deadline: SystemTime) -> Instant {
    let left = deadline
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    Instant::now()
        .checked_add(left)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(24 * 3600))
}

/// `gate` with its deadline cut to the time left until `until`.
fn within(gate: &Gate, until: Instant) -> Gate {
    Gate {
        min_healthy_time: gate.min_healthy_time,
        healthy_deadline: gate
            .healthy_deadline
            .min(until.saturating_duration_since(Instant::now())),
    }
}

impl Executor {
    /// Activation and rollback: make `version` current and running, then
    /// wait for the health gate, all by `deadline`.
    pub(super) async fn activate(
        &self,
        name: &str,
        version: &str,
        gate: HealthGate,
        rollback: bool,
        deadline: SystemTime,
    ) -> Result<(), Failure> {
        artifact::validate_version(version).or_fail(FailureKind::Invalid)?;
        let slot = self.slot(name);
        let cancel = CancellationToken::new();
        let ticket = slot
            .next_activation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if rollback {
            // Whatever is activating now, or waiting to, is what we undo.
            cancel_activations(&slot, "a rollback");
        } else {
            lock(&slot.activations).push((ticket, cancel.clone()));
        }
        let result = self
            .activate_locked(
                &slot,
                name,
                version,
                gate,
                rollback,
                &cancel,
                instant_of(deadline),
            )
            .await;
        lock(&slot.activations).retain(|(t, _)| *t != ticket);
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn activate_locked(
        &self,
        slot: &Slot,
        name: &str,
        version: &str,
        gate: HealthGate,
        rollback: bool,
        cancel: &CancellationToken,
        until: Instant,
    ) -> Result<(), Failure> {
        let cancelled = |when: &str| {
            Failure::new(
                FailureKind::Cancelled,
                format!(
                    "{name} {version}: cancelled by {} {when}",
                    *lock(&slot.cancelled_by)
                ),
            )
        };
        // A step that failed because a cancel arrived reports the cancel.
        let or_cancelled = |when: &str, e: Failure| {
            if cancel.is_cancelled() {
                cancelled(when)
            } else {
                e
            }
        };
        let mut st = slot.state.lock().await;
        let _one_per_host = tokio::select! {
            guard = self.inner.host.lock() => guard,
            () = cancel.cancelled() => return Err(cancelled("before it started")),
        };
        if cancel.is_cancelled() {
            return Err(cancelled("before it started"));
        }
        if !self.inner.releases.is_staged(name, version) {
            return Err(Failure::new(
                FailureKind::NotStaged,
                if rollback {
                    format!("cannot roll back: release {name} {version} is no longer on this host")
                } else {
                    format!(
                        "release {name} {version} is not staged on this host; stage (and verify) it first"
                    )
                },
            ));
        }
        let dir = self.inner.releases.release_dir(name, version);
        let spec = service::load(&dir, &self.inner.config.vars)
            .map_err(|e| format!("{name} {version}: {e}"))
            .or_fail(FailureKind::Invalid)?;
        let release = Release::new(&self.inner.releases, name, version, spec);
        if let Some(r) = &release.spec.run_as {
            self.open_release_to(name, &release.dir, r)
                .map_err(|e| {
                    format!(
                        "{name} {version}: cannot prepare the release for user {}: {e}",
                        r.user
                    )
                })
                .or_fail(FailureKind::Disk)?;
        }
        let health_gate = Gate {
            min_healthy_time: gate.min_healthy_time,
            healthy_deadline: gate.healthy_deadline,
        };
        // The old process may take until here to stop: the new one still
        // needs min_healthy_time to prove itself.
        let stop_until = until
            .checked_sub(gate.min_healthy_time)
            .unwrap_or_else(Instant::now);
        let already = st
            .current
            .as_ref()
            .is_some_and(|c| c.release.version == version && c.is_alive())
            && self.inner.releases.current(name).as_deref() == Some(version);
        if already {
            info!(service = %name, %version, "already current and running; checking health only");
            gate_current(&st, &release, &within(&health_gate, until), cancel).await?;
            self.set_status(name, version, ServiceState::Running, true);
            self.record_installed(name, version);
            return Ok(());
        }

        let bound = Some(Bound { until, cancel });
        run_hook(
            &release,
            "pre_start",
            release.spec.hooks.pre_start.as_ref(),
            bound,
        )
        .await
        .map_err(|e| or_cancelled("in its pre_start hook", e))?;
        if cancel.is_cancelled() {
            return Err(cancelled("before the swap"));
        }
        let from = self.inner.releases.current(name);
        let specs = listen_specs(&release.spec).or_fail(FailureKind::Invalid)?;
        let native = release.spec.supervisor == SupervisorKind::Native;
        // A handoff needs the old process to hold exactly these sockets;
        // otherwise (no listen before, or other addresses) it is replaced
        // stop-then-start.
        let handoff = native
            && !specs.is_empty()
            && st.current.as_ref().is_some_and(|c| {
                c.is_alive()
                    && c.process.native().is_some()
                    && c.release.spec.listen == release.spec.listen
            })
            && specs.iter().eq(st.sockets.iter().map(|s| &s.spec));

        if handoff {
            // The new process starts beside the old one on the same
            // sockets. Once it is ready the old one is told to stop and
            // drains its requests while the new one takes the queue over:
            // the sockets never close. A new process that dies or is not
            // ready in time is stopped, and the old one never noticed.
            let sockets = st.sockets.clone();
            let mut new_spec = release.spec.clone();
            let notify = match release.spec.ready {
                Readiness::Notify => {
                    let (name, socket) = notify_socket().or_fail(FailureKind::Start)?;
                    new_spec.env.insert("NOTIFY_SOCKET".into(), name);
                    Some(socket)
                }
                Readiness::Health => None,
            };
            self.swap(name, version).or_fail(FailureKind::Disk)?;
            let new = match Supervisor::start_listening(
                name,
                version,
                &release.dir,
                new_spec,
                &release.run_dir,
                self.inner.config.supervisor,
                sockets,
            ) {
                Ok(sup) => sup,
                Err(e) => {
                    self.swap_back(name, from.as_deref());
                    return Err(Failure::new(
                        FailureKind::Start,
                        format!("cannot start {name} {version}: {e}"),
                    ));
                }
            };
            info!(service = %name, from = ?from, to = %version, pid = ?new.pid(), rollback, "started beside the old process on the same sockets");
            let mut alive = new.alive();
            let mut ready = wait_ready(
                &release.spec,
                &release.dir,
                &mut alive,
                cancel,
                &within(&health_gate, until),
                notify,
            )
            .await
            .map_err(|e| {
                or_cancelled(
                    "before the new process was ready",
                    Failure::new(FailureKind::NotReady, format!("{name} {version}: {e}")),
                )
            });
            // Still before anything is stopped: a failing pre_stop leaves
            // the old process serving.
            if ready.is_ok()
                && let Some(old) = &st.current
            {
                ready = self.pre_stop(old, bound).await;
            }
            if ready.is_ok() && cancel.is_cancelled() {
                ready = Err(cancelled("before the old process was stopped"));
            }
            if let Err(e) = ready {
                if let Err(stop) = new.stop().await {
                    warn!(service = %name, error = %stop, "cannot stop the new process");
                }
                self.swap_back(name, from.as_deref());
                return Err(e);
            }
            let old = st.current.take();
            if let Some(m) = st.monitor.take() {
                m.abort();
            }
            self.install(&mut st, release.clone(), Box::new(new));
            if let Some(old) = old {
                // The new process serves already; the old one drains. Cut
                // short, it is killed, and the activation says why (a
                // rollback that cancelled it then swaps back).
                let kept = old.release.clone();
                let stopped = self.stop_bounded(name, old, stop_until, cancel).await?;
                if let Some(e) = forced_error(name, &kept, &stopped, &cancelled) {
                    return Err(e);
                }
                self.post_stop(&kept, bound).await?;
            }
        } else {
            // Stop, then start: the service is down in between (without
            // `listen` sockets, `pre_stop` is where to drain it).
            let old = match st.current.take() {
                Some(old) => {
                    if let Err(e) = self.pre_stop(&old, bound).await {
                        st.current = Some(old);
                        return Err(e);
                    }
                    if cancel.is_cancelled() {
                        st.current = Some(old);
                        return Err(cancelled("before the old process was stopped"));
                    }
                    if let Some(m) = st.monitor.take() {
                        m.abort();
                    }
                    self.set_status(name, version, ServiceState::Starting, false);
                    let kept = old.release.clone();
                    let stopped = self.stop_bounded(name, old, stop_until, cancel).await?;
                    if let Some(e) = forced_error(name, &kept, &stopped, &cancelled) {
                        let note = self.restore(&mut st, name, &kept);
                        return Err(e.noted(&note));
                    }
                    Some(kept)
                }
                None => None,
            };
            let restore = |this: &Self, st: &mut SlotState| {
                old.as_ref()
                    .map(|kept| this.restore(st, name, kept))
                    .unwrap_or_default()
            };
            // Nothing past this point happens once cancelled: `current`
            // stays where it is.
            if cancel.is_cancelled() {
                let note = restore(self, &mut st);
                return Err(cancelled("before the swap").noted(&note));
            }
            // Sockets this release does not declare are let go before it
            // starts (it may bind the address itself).
            self.release_sockets(&mut st, name, &specs);
            if let Err(e) = self.swap(name, version) {
                let note = restore(self, &mut st);
                return Err(Failure::new(FailureKind::Disk, format!("{e}{note}")));
            }
            self.set_status(name, version, ServiceState::Starting, false);
            let started = match &release.spec.supervisor {
                SupervisorKind::Systemd { unit } => self.inner.config.systemctl.run(&["restart", unit])
                    .await
                    .map(|()| {
                        info!(service = %name, from = ?from, to = %version, %unit, "swapped and restarted the unit");
                        Box::new(Unit::new(unit.clone())) as Box<dyn Runner>
                    }),
                SupervisorKind::Native => self.sockets_for(&mut st, name, &specs).and_then(|sockets| {
                    Supervisor::start_listening(name, version, &release.dir, release.spec.clone(), &release.run_dir, self.inner.config.supervisor, sockets)
                        .map(|sup| {
                            info!(service = %name, from = ?from, to = %version, pid = ?sup.pid(), rollback, "swapped and started");
                            Box::new(sup) as Box<dyn Runner>
                        })
                        .map_err(|e| e.to_string())
                }),
            };
            let runner = match started {
                Ok(r) => r,
                Err(e) => {
                    // Point current back, so that a restarted agent does
                    // not start the release that failed, and start the
                    // old one again.
                    self.swap_back(name, from.as_deref());
                    let note = restore(self, &mut st);
                    return Err(Failure::new(
                        FailureKind::Start,
                        format!("cannot start {name} {version}: {e}{note}"),
                    ));
                }
            };
            self.install(&mut st, release.clone(), runner);
            if let Some(kept) = &old {
                self.post_stop(kept, bound).await?;
            }
        }
        // The health gate, on the new process alone, in the time left.
        gate_current(&st, &release, &within(&health_gate, until), cancel)
            .await
            .map_err(|e| or_cancelled("during its health gate", e))?;
        run_hook(
            &release,
            "post_start",
            release.spec.hooks.post_start.as_ref(),
            bound,
        )
        .await?;
        // Sockets the new release no longer declares are closed.
        self.release_sockets(&mut st, name, &specs);
        self.set_status(name, version, ServiceState::Running, true);
        self.record_installed(name, version);
        let keep = self.inner.config.keep_releases;
        let protect: Vec<&str> = from.iter().map(String::as_str).collect();
        match self.inner.releases.prune(name, keep, &protect) {
            Ok(removed) if !removed.is_empty() => {
                info!(service = %name, removed = ?removed, "pruned old releases")
            }
            Ok(_) => {}
            Err(e) => warn!(service = %name, error = %e, "cannot prune old releases"),
        }
        Ok(())
    }

    /// Starts a release the activation stopped again, so that it keeps
    /// serving; says so, for the activation's error.
    fn restore(&self, st: &mut SlotState, name: &str, old: &Release) -> String {
        if old.spec.supervisor != SupervisorKind::Native {
            return String::new();
        }
        self.swap_back(name, Some(&old.version));
        let started = listen_specs(&old.spec)
            .and_then(|specs| self.sockets_for(st, name, &specs))
            .and_then(|sockets| {
                Supervisor::start_listening(
                    name,
                    &old.version,
                    &old.dir,
                    old.spec.clone(),
                    &old.run_dir,
                    // Serving matters more than a record here: the disk
                    // may be what failed the activation.
                    crate::supervisor::SupervisorConfig {
                        unrecorded_ok: true,
                        ..self.inner.config.supervisor
                    },
                    sockets,
                )
                .map_err(|e| e.to_string())
            });
        match started {
            Ok(sup) => {
                info!(service = %name, version = %old.version, pid = ?sup.pid(), "started the old release again");
                self.install(st, old.clone(), Box::new(sup));
                format!("; {} was started again", old.version)
            }
            Err(e) => {
                error!(service = %name, version = %old.version, error = %e, "cannot start the old release again");
                format!("; and {} could not be started again: {e}", old.version)
            }
        }
    }

    /// The `pre_stop` hook of a release about to be stopped.
    pub(super) async fn pre_stop(
        &self,
        old: &Current,
        bound: Option<Bound<'_>>,
    ) -> Result<(), Failure> {
        let hook = old.release.spec.hooks.pre_stop.as_ref();
        self.old_hook("pre_stop", hook, &old.release, bound).await
    }

    /// The `post_stop` hook of a release that was stopped.
    async fn post_stop(&self, old: &Release, bound: Option<Bound<'_>>) -> Result<(), Failure> {
        let hook = old.spec.hooks.post_stop.as_ref();
        self.old_hook("post_stop", hook, old, bound).await
    }

    /// Runs `hook` (`which`) of the release `old`, in its own run directory.
    async fn old_hook(
        &self,
        which: &str,
        hook: Option<&crate::service::Hook>,
        old: &Release,
        bound: Option<Bound<'_>>,
    ) -> Result<(), Failure> {
        run_hook(old, which, hook, bound).await
    }

    /// Stops a replaced release (stop signal, drain, SIGKILL), then runs
    /// its `post_stop` hook. The process is stopped whatever the hook does.
    pub(super) async fn stop_old(
        &self,
        name: &str,
        old: Current,
        until: Instant,
    ) -> Result<(), Failure> {
        let kept = old.release.clone();
        let cancel = CancellationToken::new();
        self.stop_bounded(name, old, until, &cancel).await?;
        self.post_stop(
            &kept,
            Some(Bound {
                until,
                cancel: &cancel,
            }),
        )
        .await
    }

    /// Stops a release's process, killing it early at `until` or when
    /// `cancel` is cancelled (a unit is left to its restart or stop).
    async fn stop_bounded(
        &self,
        name: &str,
        old: Current,
        until: Instant,
        cancel: &CancellationToken,
    ) -> Result<Stopped, Failure> {
        let timeout = old.release.spec.stop_timeout;
        old.process
            .stop_for_swap(StopBound {
                until: Some(until),
                cut: cancel.clone(),
            })
            .await
            .inspect(|stopped| crate::metrics::report_cut(stopped.open_connections))
            .map_err(|e| match e {
                    SupervisorError::StillRunning { pid } => Failure::new(
                        FailureKind::StopTimeout,
                        format!(
                            "the old process of {name} {} (pid {pid}) did not exit within its stop_timeout of {}, nor after SIGKILL",
                            old.release.version,
                            humantime::format_duration(timeout)
                        ),
                    ),
                    other => Failure::new(
                        FailureKind::Internal,
                        format!("cannot stop {name} {}: {other}", old.release.version),
                    ),
                })
    }
}

/// The activation's error when the old process had to be killed early:
/// cancelled, or out of time (a kill at its own `stop_timeout` is what the
/// service asked for, and no error).
fn forced_error(
    name: &str,
    old: &Release,
    stopped: &Stopped,
    cancelled: &dyn Fn(&str) -> Failure,
) -> Option<Failure> {
    match stopped.forced? {
        Forced::StopTimeout => None,
        Forced::Cancelled => Some(cancelled(
            "while the old process was stopping (it was killed)",
        )),
        Forced::Deadline => Some(Failure::new(
            FailureKind::StopTimeout,
            format!(
                "the old process of {name} {} did not exit within {} of its stop signal, and the activation's deadline came first (its stop_timeout is {}); it was killed",
                old.version,
                humantime::format_duration(Duration::from_secs(stopped.waited.as_secs())),
                humantime::format_duration(old.spec.stop_timeout)
            ),
        )),
    }
}

/// The health gate on the slot's current process.
async fn gate_current(
    st: &SlotState,
    release: &Release,
    gate: &Gate,
    cancel: &CancellationToken,
) -> Result<(), Failure> {
    let mut alive = st
        .current
        .as_ref()
        .map(Current::alive)
        .ok_or_else(|| Failure::new(FailureKind::Start, "the service has no process"))?;
    let took = health::wait_healthy(
        release.spec.health.as_ref(),
        &release.dir,
        gate,
        &mut alive,
        cancel,
    )
    .await;
    let took = match took {
        Ok(took) => took,
        Err(e) => {
            // What the operator needs to see: the failing probe's last
            // answer and what the service logged before it.
            let probe = match &e {
                health::GateError::NotHealthy { last, .. } => last.clone(),
                _ => String::new(),
            };
            let detail = match e {
                health::GateError::Cancelled => baton_common::command::FailureDetail::default(),
                _ => baton_common::command::FailureDetail::new(&probe, &release.log_tail().await),
            };
            return Err(Failure::new(e.kind(), format!("{release}: {e}")).with_detail(detail));
        }
    };
    info!(service = %release.name, version = %release.version, took = ?took, "healthy");
    Ok(())
}
