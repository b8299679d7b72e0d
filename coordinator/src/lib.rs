//! The Baton coordinator (`batond`).
//!
//! `batond` holds desired state and the fleet registry, accepts one
//! mutual-TLS gRPC stream per agent and serves the Control API. Its
//! `main.rs` is thin over this library, so tests and `baton demo` run the
//! real thing in-process. The rollout engine it drives is
//! [`baton_engine`]; the operator CLI is the `baton-cli` crate, a client
//! of the Control API.

#![forbid(unsafe_code)]

pub mod agent_api;
pub mod analysis;
pub mod artifact_api;
pub mod artifacts;
pub mod audit;
pub mod auth;
pub mod authz;
pub mod config;
pub mod control_api;
pub mod enroll;
pub mod fleet;
pub mod freeze;
#[cfg(feature = "etcd")]
pub mod ha;
pub mod health;
pub mod limits;
pub mod listener;
pub mod logs;
pub mod metrics;
pub mod ping;
pub mod rollout;
pub mod samples;
pub mod server;
pub mod store;
pub mod swarm;
pub mod web;
