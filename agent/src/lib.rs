//! The Baton host agent (`baton-agent`) as a library: the binary is a thin
//! `main.rs` over [`Agent`], and tests and `baton demo` run it in-process.

#![forbid(unsafe_code)]

pub mod config;
pub mod connection;
pub mod inventory;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

pub use config::{AgentArgs, AgentConfig};
use tokio_util::sync::CancellationToken;

/// A configured agent, ready to run.
pub struct Agent {
    link: connection::Link,
}

impl Agent {
    /// Prepares the agent: creates its data directory with mode 0700 (and
    /// tightens an existing one) and checks the coordinator URL.
    pub fn new(config: AgentConfig) -> Result<Self, String> {
        let dir = &config.data_dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| format!("cannot create the data directory {}: {e}", dir.display()))?;
        Ok(Self {
            link: connection::Link::new(config)?,
        })
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        self.link.run(shutdown).await;
        tracing::info!("agent stopped");
    }
}
