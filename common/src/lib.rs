//! Types and helpers shared by the coordinator, the agent and the CLI:
//! the fleet's domain types, the TLS identity model, the dev PKI, and the
//! reconnect backoff.
//!
//! Protobuf types stay at the edge: they are converted to and from the
//! domain types here, where validation happens once.

#![forbid(unsafe_code)]

pub mod artifact;
pub mod backoff;
pub mod command;
pub mod hex;
pub mod host;
pub mod metrics;
pub mod pki;
pub mod process;
pub mod sdnotify;
pub mod text;
pub mod time;
pub mod tls;

/// The version of every Baton binary, reported by agents and the coordinator.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The exit code for a configuration error (`EX_CONFIG` from sysexits.h):
/// a bad flag, a malformed config file, a missing or unreadable certificate.
pub const EXIT_CONFIG: i32 = 64;

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
