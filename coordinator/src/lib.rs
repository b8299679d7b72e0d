//! The Baton coordinator (`batond`) and the operator CLI (`baton`).
//!
//! `batond` holds desired state and the fleet registry, accepts one
//! mutual-TLS gRPC stream per agent and serves the Control API. The CLI is
//! a client of that API. Both binaries are thin `main.rs` files over this
//! library, so tests and the demo can run the real thing in-process.

#![forbid(unsafe_code)]

pub mod agent_api;
pub mod artifact_api;
pub mod artifacts;
pub mod audit;
pub mod auth;
pub mod authz;
pub mod cli;
pub mod config;
pub mod control_api;
pub mod enroll;
pub mod fleet;
#[cfg(feature = "etcd")]
pub mod ha;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod ping;
pub mod rollout;
pub mod server;
pub mod store;
pub mod web;
