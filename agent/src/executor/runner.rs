//! Who runs a release's process: the agent's own [`Supervisor`], or
//! systemd (`supervisor = "systemd"` in `service.toml`). The executor
//! drives both through [`Runner`]; which one a release gets is its
//! `service.toml`'s choice, and the `systemctl` a unit is driven with is
//! the agent's configuration ([`Systemctl`], `--systemctl`).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use tokio::sync::watch;

use crate::supervisor::{
    ProcessState, ProcessStatus, StopBound, Stopped, Supervisor, SupervisorError,
};

/// A stop in progress.
pub(super) type Stopping = Pin<Box<dyn Future<Output = Result<Stopped, SupervisorError>> + Send>>;

/// A running release's process, however it is run.
pub(super) trait Runner: Send + Sync {
    /// Turns false when the process is gone for good.
    fn alive(&self) -> watch::Receiver<bool>;
    /// Its state, for the inventory.
    fn status(&self) -> watch::Receiver<ProcessStatus>;
    /// The agent's own supervisor of it, when the agent runs it (only
    /// such a process can hand its sockets to a new one).
    fn native(&self) -> Option<&Supervisor>;
    /// The systemd unit running it, when systemd does.
    fn unit(&self) -> Option<&str>;
    /// Stops it to replace it: signal, drain, kill at `bound`.
    fn stop_for_swap(self: Box<Self>, bound: StopBound) -> Stopping;
}

impl Runner for Supervisor {
    fn alive(&self) -> watch::Receiver<bool> {
        Supervisor::alive(self)
    }

    fn status(&self) -> watch::Receiver<ProcessStatus> {
        Supervisor::status(self)
    }

    fn native(&self) -> Option<&Supervisor> {
        Some(self)
    }

    fn unit(&self) -> Option<&str> {
        None
    }

    fn stop_for_swap(self: Box<Self>, bound: StopBound) -> Stopping {
        Box::pin(self.stop_within(bound))
    }
}

/// A release whose process is a systemd unit.
pub(super) struct Unit {
    name: String,
    // Never turns false: systemd restarts the unit.
    alive: watch::Sender<bool>,
    // Always running (its health check tells the rest); held for as long
    // as the unit is the release's, so the service's monitor keeps
    // checking its health between activations.
    status: watch::Sender<ProcessStatus>,
}

impl Unit {
    /// The unit `name`, started (or restarted) already.
    pub fn new(name: String) -> Self {
        Self {
            name,
            alive: watch::channel(true).0,
            status: watch::channel(ProcessStatus {
                state: ProcessState::Running { pid: 0 },
                restarts: 0,
                last_exit: None,
            })
            .0,
        }
    }
}

impl Runner for Unit {
    fn alive(&self) -> watch::Receiver<bool> {
        self.alive.subscribe()
    }

    fn status(&self) -> watch::Receiver<ProcessStatus> {
        self.status.subscribe()
    }

    fn native(&self) -> Option<&Supervisor> {
        None
    }

    fn unit(&self) -> Option<&str> {
        Some(&self.name)
    }

    fn stop_for_swap(self: Box<Self>, _: StopBound) -> Stopping {
        // `systemctl restart` stops the old process as it starts the new.
        tracing::debug!(unit = %self.name, "the unit is restarted or stopped by systemctl");
        Box::pin(std::future::ready(Ok(Stopped::default())))
    }
}

/// The `systemctl` the agent drives units with (`--systemctl`; a stand-in
/// in tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Systemctl {
    program: PathBuf,
}

impl Default for Systemctl {
    /// `systemctl` on the PATH.
    fn default() -> Self {
        Self::new(PathBuf::from("systemctl"))
    }
}

impl Systemctl {
    /// `program` as systemctl.
    pub fn new(program: PathBuf) -> Self {
        Self { program }
    }

    /// Runs `systemctl ARGS`.
    pub async fn run(&self, args: &[&str]) -> Result<(), String> {
        let program = self.program.display();
        let out = tokio::process::Command::new(&self.program)
            .args(args)
            // The agent's own notify socket and fds are not systemctl's.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program} {} failed ({}): {}",
                args.join(" "),
                crate::supervisor::describe_exit(out.status),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn systemctl_failures_say_what_ran_and_why() {
        assert_eq!(
            Systemctl::new("/bin/true".into())
                .run(&["restart", "x"])
                .await,
            Ok(())
        );
        let e = Systemctl::new("/bin/false".into())
            .run(&["restart", "web.service"])
            .await
            .unwrap_err();
        assert!(
            e.starts_with("/bin/false restart web.service failed"),
            "{e}"
        );
        let e = Systemctl::new("/nonexistent/systemctl".into())
            .run(&["stop", "x"])
            .await
            .unwrap_err();
        assert!(e.contains("cannot run /nonexistent/systemctl"), "{e}");
    }

    #[tokio::test]
    async fn a_unit_is_running_and_stays_alive() {
        let u: Box<dyn Runner> = Box::new(Unit::new("web.service".into()));
        assert_eq!(u.unit(), Some("web.service"));
        assert!(u.native().is_none());
        assert!(*u.alive().borrow());
        let mut status = u.status();
        assert!(matches!(
            status.borrow().state,
            ProcessState::Running { .. }
        ));
        // The status stays open while the unit is the release's (the
        // monitor waits on it between health checks), and closes with it.
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), status.changed()).await;
        assert!(waited.is_err(), "the status closed: {waited:?}");
        drop(u);
        assert!(status.changed().await.is_err());
    }
}
