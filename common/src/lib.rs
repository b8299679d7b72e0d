//! Types and rules shared by the coordinator, the agent, the CLI and the
//! rollout engine.
//!
//! Always built: the domain types (hosts, commands) and the one rule each
//! for names ([`names`]), versions ([`version`]), hex ([`hex`]), times and
//! text. Feature `wire`: their protobuf form; validation of what comes off
//! the wire happens once, there. Feature `runtime` (default): what does
//! I/O — artifacts, TLS and the dev PKI, metrics, processes, sd_notify and
//! secret tokens. The rollout engine depends on this crate without
//! `runtime`, and so builds without tokio.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod command;
pub mod hex;
pub mod host;
pub mod names;
pub mod reference;
pub mod text;
pub mod time;
pub mod traffic;
pub mod version;

#[cfg(feature = "runtime")]
pub mod artifact;
#[cfg(feature = "runtime")]
pub mod metrics;
#[cfg(feature = "runtime")]
pub mod pki;
#[cfg(feature = "runtime")]
pub mod process;
#[cfg(feature = "runtime")]
pub mod sdnotify;
#[cfg(feature = "runtime")]
pub mod secret;
#[cfg(feature = "runtime")]
pub mod tls;

/// The version of every Baton binary, reported by agents and the coordinator.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The exit code for a configuration error, the same as a usage error:
/// a bad flag, a malformed config file, a missing or unreadable certificate.
pub const EXIT_CONFIG: i32 = exit::USAGE as i32;

/// Formats an error with its whole source chain, skipping repeats. tonic's
/// transport errors say little at the top ("transport error") and
/// everything useful (a refused connection, an unknown CA) below.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The exit codes of `baton`, `batond` and `baton-agent` (documented in
/// docs/reference/exit-codes.md).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// The operation failed: a rollout ended failed, a check found
    /// problems, a daemon stopped on an error.
    pub const FAILED: u8 = 1;
    /// A usage error: bad flags, arguments, configuration or input.
    pub const USAGE: u8 = 2;
    /// No coordinator could be reached or it did not accept this client.
    pub const UNREACHABLE: u8 = 3;
    /// The coordinator refused: permission denied, a precondition failed,
    /// not found.
    pub const REFUSED: u8 = 4;
}

/// The commit this build was made from (`build.rs`: `BATON_COMMIT` at
/// build time, else git's, else `unknown`).
pub const COMMIT: &str = env!("BATON_COMMIT");

/// What `--version` prints after a program's name: `0.1.0 (commit abc…)`.
pub const VERSION_LINE: &str = env!("BATON_VERSION_LINE");
