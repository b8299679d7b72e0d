//! What an operator's action does to a rollout.

use std::time::SystemTime;

use baton_common::command::{Command, CommandKind};

use super::{
    Action, Operator, Refused, Rollout, ServiceState, State, begin_rollback, deadline_for,
};

/// Applies `op`, or refuses it before changing anything.
pub(super) fn operator(
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
        Operator::Promote => {
            let waiting = r
                .services
                .iter()
                .any(|s| s.state == ServiceState::AwaitingPromotion);
            if r.state != State::AwaitingPromotion || !waiting {
                return Err(refuse(r));
            }
            for s in &mut r.services {
                if s.state == ServiceState::AwaitingPromotion {
                    s.state = ServiceState::Progressing;
                    if s.approval && !s.approved {
                        // Approved before its first host: step 0 begins.
                        s.approved = true;
                    } else {
                        s.step += 1;
                        s.step_done_at = None;
                    }
                }
            }
            r.state = State::Progressing;
            r.progress_at = now;
        }
        Operator::Abort => {
            if r.state.is_terminal() {
                return Err(refuse(r));
            }
            r.state = State::Aborted;
            r.resume_to = None;
            r.error = Some("aborted by an operator".into());
            // An activation in flight is cancelled on its host: it never
            // swaps afterwards, and an old release it stopped is started
            // again. (Sent once, to connected hosts; not outstanding. A
            // rollback in flight goes on: it returns a host to what it ran,
            // and cutting it short would leave it between the two.)
            let mut cancels = Vec::new();
            for s in &mut r.services {
                let name = s.name.clone();
                for host in s.hosts_where(|h| h.outstanding.is_some()) {
                    let Some(h) = s.host_mut(&host) else { continue };
                    let in_flight = matches!(
                        h.outstanding.as_ref().map(|c| &c.kind),
                        Some(CommandKind::Activate { .. })
                    );
                    if in_flight && h.connected {
                        cancels.push((host.clone(), name.clone()));
                    }
                    h.outstanding = None;
                }
            }
            for (host, service) in cancels {
                r.next_seq = r.next_seq.saturating_add(1);
                let kind = CommandKind::Cancel { service };
                let command = Command {
                    id: format!("{}/{}", r.id, r.next_seq),
                    deadline: deadline_for(r, &kind, now),
                    kind,
                    traffic: None,
                };
                actions.push(Action::Send(host, command));
            }
        }
        Operator::Rollback => {
            if matches!(r.state, State::RollingBack | State::RolledBack) {
                return Err(refuse(r));
            }
            begin_rollback(r, "rolled back by an operator".into(), now, actions);
        }
    }
    Ok(())
}
