//! Which waiting services start: dependencies done, a free slot, their
//! version requirements met, and an approval asked for when the plan says.

use std::time::SystemTime;

use super::{Action, Rollout, ServiceState, fail, unmet_requirement};

/// Lets waiting services whose dependencies succeeded start, as many as
/// `max_parallel_services` allows, once their requirements hold.
pub(super) fn start_services(r: &mut Rollout, now: SystemTime, actions: &mut Vec<Action>) {
    for si in 0..r.services.len() {
        let running = r
            .services
            .iter()
            .filter(|s| {
                matches!(
                    s.state,
                    ServiceState::Progressing | ServiceState::AwaitingPromotion
                )
            })
            .count();
        if running >= r.max_parallel_services {
            return;
        }
        let s = &r.services[si];
        if s.state != ServiceState::Waiting {
            continue;
        }
        let deps_done = s.depends_on.iter().all(|d| {
            r.services
                .iter()
                .any(|o| &o.name == d && o.state == ServiceState::Succeeded)
        });
        if !deps_done {
            continue;
        }
        if let Some(unmet) = unmet_requirement(r, si) {
            // A requirement on a service of this plan holds once that
            // service is through; one on the rest of the fleet never will.
            let fixable = r.services[si]
                .requires
                .keys()
                .all(|d| r.services.iter().any(|o| &o.name == d));
            if !fixable {
                fail(r, unmet, now, actions);
                return;
            }
            continue;
        }
        let s = &mut r.services[si];
        s.state = if s.approval && !s.approved {
            // Four eyes: an operator other than the starter promotes it.
            ServiceState::AwaitingPromotion
        } else {
            ServiceState::Progressing
        };
    }
}
