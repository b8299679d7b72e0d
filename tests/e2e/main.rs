//! End-to-end tests: real binaries, real gRPC over real mutual TLS, on
//! loopback, each test in its own temp dir and on its own ports.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub(crate) mod analysis;
mod bench;
mod cli;
mod config;
mod crash;
mod dashboard;
mod demo;
mod disk;
mod enroll;
#[cfg(feature = "etcd")]
mod etcd;
mod fleet;
mod ha;
mod handoff;
mod limits;
mod observe;
mod packaging;
mod peers;
mod ping;
mod roles;
mod rollout;
mod security;
mod selfupgrade;
mod stop;
mod structure;
mod system;
mod systemd;
mod traffic;
