//! The driver's part in analysis and safety rails: it runs one analysis
//! per bake in progress (again after a restart: a bake a crash interrupted
//! starts over, verdicts already reached are in the record), stores what
//! each check saw, feeds the verdicts to the rollout; it keeps the freeze
//! (an operator's, stored under [`freeze::KEY`], and the config's windows)
//! and tells every rollout when a hold begins or lifts; it pauses every
//! rollout at once (stop the line); and it refuses an approval by the
//! operator who started the rollout.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Driver, Event, Operator, Reply, Request, RolloutError, Rollouts, State};
use crate::analysis::{self, Analyzer};
use crate::fleet::FleetHandle;
use crate::freeze::{self, Calendar, Freeze, FreezeView};
use crate::store::{Store, StoreError};
use baton_engine::HostState;

/// What the driver is started with beyond its store and fleet.
#[derive(Clone, Default)]
pub struct DriverOptions {
    /// Counters.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The Prometheus server `prometheus` checks query (its base URL).
    pub prometheus: Option<String>,
    /// Deployment windows and freezes of the config.
    pub calendar: Calendar,
    /// The balancers plans may use through batond (`balancer`).
    pub balancers: Vec<String>,
}

/// The bakes running and the hold in force.
pub(super) struct Analysis {
    analyzer: Analyzer,
    running: HashMap<(String, usize, usize), CancellationToken>,
    tx: mpsc::Sender<analysis::Result>,
    pub(super) rx: mpsc::Receiver<analysis::Result>,
    calendar: Calendar,
    manual: Option<Freeze>,
    pub(super) hold: Option<String>,
}

impl Analysis {
    /// Reads the operator's freeze from the store.
    pub(super) async fn new(
        store: &dyn Store,
        fleet: FleetHandle,
        options: &DriverOptions,
    ) -> Result<Self, StoreError> {
        let manual = match store.get(freeze::KEY).await? {
            None => None,
            Some(bytes) => match serde_json::from_slice::<Freeze>(&bytes) {
                Ok(f) => Some(f),
                Err(e) => {
                    // Never a reason not to start, and never a reason to
                    // go ahead: held until an operator freezes or
                    // unfreezes again (either replaces it).
                    warn!(error = %e, "the stored freeze does not read; holding rollouts until `baton freeze` or `baton unfreeze` replaces it");
                    Some(Freeze {
                        until: None,
                        reason: "the stored freeze does not read; `baton unfreeze` or `baton freeze` replaces it".into(),
                        by: "batond".into(),
                        since: SystemTime::now(),
                    })
                }
            },
        };
        let (tx, rx) = mpsc::channel(64);
        let hold = options.calendar.held(manual.as_ref(), SystemTime::now());
        Ok(Self {
            analyzer: Analyzer::new(fleet, options.prometheus.clone()),
            running: HashMap::new(),
            tx,
            rx,
            calendar: options.calendar.clone(),
            manual,
            hold,
        })
    }
}

impl Driver {
    /// Starts an analysis for every bake of rollout `id` in progress that
    /// has none, and stops those whose bake ended.
    pub(super) fn reconcile_bakes(&mut self, id: &str) {
        let wanted: Vec<analysis::Bake> = match self.active.get(id) {
            Some(a) if !a.rollout.state.is_terminal() && a.rollout.state != State::RollingBack => a
                .rollout
                .services
                .iter()
                .enumerate()
                .filter_map(|(si, s)| {
                    let bake = s.bake?;
                    let host_ids = |pred: &dyn Fn(&baton_engine::machine::HostRun) -> bool| {
                        s.hosts
                            .iter()
                            .filter(|(_, h)| pred(h))
                            .map(|(id, _)| id.clone())
                            .collect()
                    };
                    Some(analysis::Bake {
                        rollout: id.to_owned(),
                        service: si,
                        name: s.name.clone(),
                        version: s.version.clone(),
                        step: bake.step,
                        checks: s.analysis.clone(),
                        new_hosts: host_ids(&|h| h.state == HostState::Healthy && h.touched),
                        // Hosts still on an older version (not those the
                        // rollout found already on the target).
                        baseline_hosts: host_ids(&|h| {
                            !h.touched
                                && h.from_version.as_deref().is_some_and(|v| v != s.version)
                                && h.state != HostState::Failed
                        }),
                    })
                })
                .collect(),
            _ => Vec::new(),
        };
        let a = &mut self.analysis;
        a.running.retain(|(rid, si, step), cancel| {
            let keep = rid != id || wanted.iter().any(|b| b.service == *si && b.step == *step);
            if !keep {
                cancel.cancel();
            }
            keep
        });
        for bake in wanted {
            let key = (bake.rollout.clone(), bake.service, bake.step);
            if a.running.contains_key(&key) {
                continue;
            }
            info!(rollout = %bake.rollout, service = %bake.name, step = bake.step + 1, new = bake.new_hosts.len(), baseline = bake.baseline_hosts.len(), "analysis begins");
            let cancel = CancellationToken::new();
            a.running.insert(key, cancel.clone());
            let (analyzer, tx) = (a.analyzer.clone(), a.tx.clone());
            tokio::spawn(async move {
                let result = analyzer.run(bake, cancel.clone()).await;
                if !cancel.is_cancelled() {
                    let _ = tx.send(result).await;
                }
            });
        }
    }

    /// A bake's verdicts: what each check saw is stored, then the verdicts
    /// step the rollout.
    pub(super) async fn on_baked(&mut self, result: analysis::Result) {
        let b = &result.bake;
        if self
            .analysis
            .running
            .remove(&(b.rollout.clone(), b.service, b.step))
            .is_none()
        {
            return;
        }
        for (v, samples) in result.verdicts.iter().zip(&result.samples) {
            info!(rollout = %b.rollout, service = %b.name, step = b.step + 1, check = %v.name, verdict = v.verdict.as_str(), reason = %v.reason, "analysis verdict");
            self.metrics
                .verdicts
                .inc(&[v.kind.as_str(), v.verdict.as_str()]);
            let record = serde_json::json!({ "verdict": v, "samples": samples });
            let key = analysis::samples_key(&b.rollout, b.service, b.step, &v.name);
            // The verdict itself goes into the rollout's record; its
            // samples are kept beside it when they can be.
            let bytes = match serde_json::to_vec(&record) {
                Ok(bytes) => bytes,
                Err(e) => {
                    warn!(%key, error = %e, "cannot encode an analysis's samples; not storing them");
                    continue;
                }
            };
            if let Err(e) = self.store.put(&key, bytes).await {
                warn!(%key, error = %e, "cannot store an analysis's samples");
            }
        }
        let event = Event::Analysis {
            service: b.service,
            step: b.step,
            verdicts: result.verdicts.clone(),
        };
        let id = b.rollout.clone();
        if let Err(e) = self.apply(&id, vec![event], None).await {
            // Not persisted, so the bake is still in progress: it runs
            // again.
            warn!(rollout = %id, error = %e, "an analysis's verdicts were not taken; analysing again");
            self.reconcile_bakes(&id);
        }
    }

    /// Re-reads the hold; when it began or lifted, every running rollout
    /// is told.
    pub(super) async fn check_hold(&mut self) {
        let now = SystemTime::now();
        let a = &mut self.analysis;
        if a.manual.as_ref().is_some_and(|f| !f.holds(now)) {
            a.manual = None;
        }
        let hold = a.calendar.held(a.manual.as_ref(), now);
        if hold != a.hold {
            match &hold {
                Some(why) => info!(%why, "new hosts are held"),
                None => info!("the hold lifted: rollouts go on"),
            }
            a.hold = hold;
        }
        // Every tick: a rollout whose last hold could not be stored is
        // told again (a comparison when nothing changed).
        let ids: Vec<String> = self
            .active
            .iter()
            .filter(|(_, r)| r.rollout.held != self.analysis.hold)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.sync_hold(&id).await;
        }
    }

    /// Tells rollout `id` the hold now if it was stepped under another
    /// (after a restart: a freeze that ended, a window that opened while
    /// `batond` was down).
    pub(super) async fn sync_hold(&mut self, id: &str) {
        let hold = self.analysis.hold.clone();
        if self.active.get(id).is_some_and(|a| a.rollout.held != hold)
            && let Err(e) = self.apply(id, vec![Event::Hold(hold)], None).await
        {
            warn!(rollout = %id, error = %e, "could not tell a rollout about the hold");
        }
    }

    /// Sets (`Some`) or lifts (`None`) the operator's freeze.
    pub(super) async fn set_freeze(
        &mut self,
        freeze: Option<Freeze>,
    ) -> Result<FreezeView, RolloutError> {
        match &freeze {
            Some(f) => {
                let bytes =
                    serde_json::to_vec(f).map_err(|e| RolloutError::Invalid(e.to_string()))?;
                self.store.put(freeze::KEY, bytes).await?;
                info!(by = %f.by, reason = %f.reason, until = ?f.until, "frozen");
            }
            None => {
                self.store
                    .txn(crate::store::Txn {
                        compares: vec![],
                        ops: vec![crate::store::Op::Delete(freeze::KEY.to_owned())],
                    })
                    .await?;
                info!("unfrozen");
            }
        }
        self.analysis.manual = freeze;
        self.check_hold().await;
        Ok(self.freeze_view())
    }

    /// The freeze now.
    pub(super) fn freeze_view(&self) -> FreezeView {
        FreezeView {
            freeze: self.analysis.manual.clone(),
            held: self.analysis.hold.clone(),
        }
    }

    /// Pauses every rollout that can be paused, now.
    pub(super) async fn stop_the_line(&mut self, who: &str) -> Vec<String> {
        let ids: Vec<String> = self
            .active
            .iter()
            .filter(|(_, a)| {
                matches!(
                    a.rollout.state,
                    State::Pending | State::Staging | State::Progressing | State::AwaitingPromotion
                )
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut paused = Vec::new();
        for id in ids {
            match self
                .apply(&id, vec![Event::Operator(Operator::Pause)], Some(who))
                .await
            {
                Ok(()) => paused.push(id),
                Err(e) => warn!(rollout = %id, error = %e, "stop the line: could not pause"),
            }
        }
        warn!(%who, paused = paused.len(), "stop the line: every running rollout paused");
        paused
    }

    /// A promote of a service that needs approval must come from someone
    /// other than the rollout's starter.
    pub(super) fn check_approval(
        &self,
        id: &str,
        op: Operator,
        who: &str,
    ) -> Result<(), RolloutError> {
        let Some(a) = self.active.get(id) else {
            return Ok(());
        };
        let r = &a.rollout;
        let approving = r.services.iter().any(|s| {
            s.approval && s.state == baton_engine::machine::ServiceState::AwaitingPromotion
        });
        // The person, whichever way they act (the dashboard's actions are
        // `… (dashboard)`).
        let person = |w: &str| w.strip_suffix(" (dashboard)").unwrap_or(w).to_owned();
        if op == Operator::Promote
            && approving
            && !r.started_by.is_empty()
            && person(&r.started_by) == person(who)
        {
            return Err(RolloutError::Conflict(format!(
                "rollout {id} needs an approval by an operator other than the one who started it ({who})"
            )));
        }
        Ok(())
    }
}

impl Rollouts {
    /// Freezes rollouts (`until`: when it ends by itself).
    pub async fn freeze(
        &self,
        until: Option<SystemTime>,
        reason: String,
        who: String,
    ) -> Result<FreezeView, RolloutError> {
        let freeze = Freeze {
            until,
            reason,
            by: who,
            since: SystemTime::now(),
        };
        self.ask(|reply| Request::Freeze {
            freeze: Some(freeze),
            reply,
        })
        .await
    }

    /// Lifts the operator's freeze.
    pub async fn unfreeze(&self) -> Result<FreezeView, RolloutError> {
        self.ask(|reply| Request::Freeze {
            freeze: None,
            reply,
        })
        .await
    }

    /// The freeze now.
    pub async fn freeze_view(&self) -> Result<FreezeView, RolloutError> {
        self.ask(|reply: Reply<FreezeView>| Request::GetFreeze { reply })
            .await
    }

    /// The samples of each check's latest verdict in rollout `id`, by
    /// service index (for the dashboard's charts): at most one record per
    /// check, each at most [`analysis::MAX_KEPT`] values a side.
    pub async fn analysis_samples(
        &self,
        id: &str,
    ) -> Result<HashMap<usize, Vec<(usize, analysis::Samples)>>, RolloutError> {
        super::check_id(id)?;
        let prefix = analysis::samples_prefix(id);
        // Keys first: only each check's latest record is read.
        let mut latest: HashMap<(usize, String), (usize, String)> = HashMap::new();
        for key in self.store.list_keys(&prefix).await? {
            let mut parts = key[prefix.len()..].splitn(3, '/');
            let (Some(si), Some(step), Some(check)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Ok(si), Ok(step)) = (si.parse::<usize>(), step.parse::<usize>()) else {
                continue;
            };
            let slot = latest
                .entry((si, check.to_owned()))
                .or_insert((step, key.clone()));
            if step >= slot.0 {
                *slot = (step, key);
            }
        }
        #[derive(serde::Deserialize)]
        struct Stored {
            samples: analysis::Samples,
        }
        let mut read: HashMap<(usize, String), (usize, analysis::Samples)> = HashMap::new();
        for ((si, check), (step, key)) in latest {
            if let Some(value) = self.store.get(&key).await?
                && let Ok(stored) = serde_json::from_slice::<Stored>(&value)
            {
                read.insert((si, check), (step, stored.samples));
            }
        }
        let latest = read;
        let mut out: HashMap<usize, Vec<(usize, analysis::Samples)>> = HashMap::new();
        for ((si, _), v) in latest {
            out.entry(si).or_default().push(v);
        }
        Ok(out)
    }

    /// Pauses every running rollout; their ids.
    pub async fn stop_the_line(&self, who: String) -> Result<Vec<String>, RolloutError> {
        self.ask(|reply| Request::StopTheLine { who, reply }).await
    }
}
