//! The Baton rollout engine: everything about a rollout that is a pure
//! function of its inputs.
//!
//! - [`plan`]: the plan file, parsed and checked on its own;
//! - [`resolve`]: a plan against the facts the coordinator gathered (the
//!   fleet, the pushed artifacts) into a rollout that has not started;
//! - [`machine`]: the state machine that steps a rollout by events (agent
//!   updates, operator actions, ticks) into actions;
//! - [`events`]: the history a step adds;
//! - [`record`]: the stored form of a rollout, versioned, and its
//!   conversions;
//! - [`graph`]: the dependency order of services.
//!
//! The crate has no tokio and does no I/O (it depends on `baton-common`
//! without its `runtime` feature): the coordinator's driver reads and
//! writes the store and talks to agents, and calls in here to decide. So
//! the engine is tested by properties and fixtures, without a runtime.

#![forbid(unsafe_code)]

pub mod analysis;
pub mod events;
pub mod graph;
pub mod machine;
pub mod plan;
pub mod plan_error;
pub mod record;
pub mod resolve;

pub use machine::{Event, HostState, Operator, Rollout, State};

/// Whether a rollout state name (as on the wire and in JSON) is terminal.
pub fn is_terminal(state: &str) -> bool {
    state.parse::<State>().is_ok_and(State::is_terminal)
}
