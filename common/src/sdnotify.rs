//! The systemd notification protocol (`sd_notify(3)`), without libsystemd:
//! datagrams of `KEY=VALUE` lines to the socket named by `NOTIFY_SOCKET`
//! (a path, or `@name` for the abstract namespace).
//!
//! `batond` and `baton-agent` send `READY=1` once they serve, `STOPPING=1`
//! when they begin to shut down, and `WATCHDOG=1` every half
//! `WATCHDOG_USEC` while they run. The agent also keeps its services'
//! listening sockets in systemd's file-descriptor store (`FDSTORE=1` with
//! the descriptors attached), so they survive its own restarts.
//!
//! Without `NOTIFY_SOCKET` (not run by systemd) every call does nothing.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// A connection to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<UnixDatagram>,
    watchdog: Option<Duration>,
}

fn connect(target: &str) -> std::io::Result<UnixDatagram> {
    let socket = UnixDatagram::unbound()?;
    if let Some(name) = target.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        socket.connect_addr(&addr)?;
    } else {
        socket.connect(target)?;
    }
    Ok(socket)
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the
    /// environment. A socket that cannot be reached is logged and ignored:
    /// notifications are never worth failing over.
    pub fn from_env() -> Self {
        let socket = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|s| !s.is_empty())
            .and_then(|target| match connect(&target) {
                Ok(s) => Some(s),
                Err(e) => {
                    warn!(socket = %target, error = %e, "cannot reach the service manager's notify socket");
                    None
                }
            });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && for_us)
            .map(Duration::from_micros);
        Self { socket, watchdog }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends `state` (newline-separated `KEY=VALUE` lines).
    pub fn notify(&self, state: &str) {
        if let Some(s) = &self.socket
            && let Err(e) = s.send(state.as_bytes())
        {
            debug!(error = %e, state, "sd_notify failed");
        }
    }

    /// `READY=1` plus a status line.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={status}"));
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.notify("STOPPING=1\nSTATUS=stopping");
    }

    /// How often to send `WATCHDOG=1`: half the manager's timeout.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.enabled()).map(|w| w / 2)
    }

    /// Sends `WATCHDOG=1` every [`Notifier::watchdog_interval`] until
    /// `stop`; `None` when no watchdog is asked for. The caller owns the
    /// task.
    pub fn spawn_watchdog(self, stop: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let every = self.watchdog_interval()?;
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => self.notify("WATCHDOG=1"),
                }
            }
        }))
    }

    /// Takes the descriptors stored under `name` out of the manager's
    /// file-descriptor store (`FDSTOREREMOVE=1`), so they are closed.
    pub fn remove_fds(&self, name: &str) {
        self.notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
    }

    /// Hands descriptors to the manager's file-descriptor store under
    /// `name` (`FDSTORE=1`, `FDNAME=name`, the descriptors as `SCM_RIGHTS`).
    /// systemd passes them back to the next run with `LISTEN_FDS` and
    /// `LISTEN_FDNAMES`.
    pub fn store_fds(&self, name: &str, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        let Some(socket) = &self.socket else {
            return Ok(());
        };
        let text = format!("FDSTORE=1\nFDNAME={name}");
        let mut space =
            vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(std::io::Error::other(
                "too many descriptors for one message",
            ));
        }
        rustix::net::sendmsg(
            socket,
            &[IoSlice::new(text.as_bytes())],
            &mut control,
            SendFlags::empty(),
        )?;
        Ok(())
    }
}

/// Tells the service manager (if any) that the daemon is ready, feeds its
/// watchdog while the daemon runs, and says `STOPPING=1` the moment
/// `shutdown` is cancelled, then ends. The caller owns the task.
pub fn lifecycle(status: String, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    let n = Notifier::from_env();
    tokio::spawn(async move {
        n.ready(&status);
        let mut watchdog = n.watchdog_interval().map(tokio::time::interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    n.stopping();
                    return;
                }
                _ = async {
                    match &mut watchdog {
                        Some(t) => { t.tick().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => n.notify("WATCHDOG=1"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_descriptors_reach_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            socket: Some(connect(path.to_str().unwrap()).unwrap()),
            watchdog: Some(Duration::from_millis(100)),
        };
        n.ready("serving");
        let mut buf = [0u8; 256];
        let len = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_millis(50)));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        use std::os::fd::AsFd;
        n.store_fds("web.0", &[listener.as_fd()]).unwrap();
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
        let mut data = [0u8; 64];
        let msg = rustix::net::recvmsg(
            &manager,
            &mut [std::io::IoSliceMut::new(&mut data)],
            &mut control,
            rustix::net::RecvFlags::empty(),
        )
        .unwrap();
        assert_eq!(&data[..msg.bytes], b"FDSTORE=1\nFDNAME=web.0");
        let mut got = Vec::new();
        for m in control.drain() {
            if let rustix::net::RecvAncillaryMessage::ScmRights(fds) = m {
                got.extend(fds);
            }
        }
        assert_eq!(got.len(), 1);
        let back = std::net::TcpListener::from(got.remove(0));
        assert_eq!(back.local_addr().unwrap(), addr, "the very same socket");

        let off = Notifier {
            socket: None,
            watchdog: Some(Duration::from_secs(1)),
        };
        off.ready("x");
        assert_eq!(off.watchdog_interval(), None);
        off.store_fds("x", &[listener.as_fd()]).unwrap();
    }
}
