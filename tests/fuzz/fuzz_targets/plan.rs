//! Plan files (`baton rollout start PLAN`): any text is refused with an
//! error or parses into a plan whose dependency order has every service.
#![no_main]

use baton_coordinator::rollout::plan::Plan;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(plan) = Plan::parse(text) {
        let mut order = plan.order();
        order.sort_unstable();
        assert_eq!(order, (0..plan.services.len()).collect::<Vec<_>>());
    }
});
