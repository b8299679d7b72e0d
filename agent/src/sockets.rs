//! Listening sockets the agent owns and hands to its services with the
//! systemd socket-activation protocol, so a service is replaced without
//! its sockets ever closing: the old and the new process accept from the
//! same kernel queue during the swap, and no connection is refused.
//!
//! A `listen` entry is `tcp://HOST:PORT` or `unix:///absolute/path`. The
//! agent binds it once and keeps it for as long as the service declares
//! it. After an agent restart the sockets are recovered from systemd's
//! file-descriptor store when the agent runs under systemd, otherwise
//! copied out of the running service with `pidfd_getfd(2)`.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

/// A parsed `listen` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenSpec {
    /// `tcp://HOST:PORT`.
    Tcp(SocketAddr),
    /// `unix:///path`.
    Unix(PathBuf),
}

impl ListenSpec {
    /// Parses `tcp://127.0.0.1:8080` or `unix:///run/web.sock`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(addr) = text.strip_prefix("tcp://") {
            return addr.parse().map(Self::Tcp).map_err(|_| {
                format!("listen {text:?}: expected tcp://IP:PORT, e.g. tcp://127.0.0.1:8080")
            });
        }
        if let Some(path) = text.strip_prefix("unix://") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(format!(
                    "listen {text:?}: a unix socket needs an absolute path, e.g. unix:///run/web.sock"
                ));
            }
            return Ok(Self::Unix(path));
        }
        Err(format!(
            "listen {text:?}: expected tcp://IP:PORT or unix:///path"
        ))
    }

    /// The name passed in `LISTEN_FDNAMES` (no `:`, which separates names).
    pub fn fd_name(&self) -> String {
        let raw = match self {
            Self::Tcp(a) => format!("tcp-{a}"),
            Self::Unix(p) => format!("unix-{}", p.display()),
        };
        raw.chars()
            .map(|c| {
                if c.is_ascii_graphic() && c != ':' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// The `listen` text this was parsed from.
    pub fn text(&self) -> String {
        match self {
            Self::Tcp(a) => format!("tcp://{a}"),
            Self::Unix(p) => format!("unix://{}", p.display()),
        }
    }

    /// Binds a new listening socket.
    pub fn bind(&self) -> std::io::Result<OwnedFd> {
        match self {
            Self::Tcp(addr) => Ok(TcpListener::bind(addr)?.into()),
            Self::Unix(path) => {
                // A socket file left by an earlier run (nobody owns it any
                // more, or we would have recovered it) is replaced; any other
                // file is not ours to delete.
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    // Never take a socket someone still serves on.
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            format!("{} is in use by another process", path.display()),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                Ok(UnixListener::bind(path)?.into())
            }
        }
    }

    /// Whether `fd` is a listening socket for this entry.
    pub fn matches(&self, fd: &OwnedFd) -> bool {
        let Ok(copy) = fd.try_clone() else {
            return false;
        };
        let listening = rustix::net::sockopt::socket_acceptconn(fd).unwrap_or(false);
        listening
            && match self {
                Self::Tcp(addr) => TcpListener::from(copy)
                    .local_addr()
                    .is_ok_and(|a| a == *addr),
                Self::Unix(path) => UnixListener::from(copy)
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(std::path::Path::to_path_buf))
                    .is_some_and(|p| p == *path),
            }
    }
}

impl From<ListenSpec> for String {
    fn from(s: ListenSpec) -> Self {
        s.text()
    }
}

/// One socket handed to a service.
#[derive(Debug)]
pub struct ListenSocket {
    /// What it listens on.
    pub spec: ListenSpec,
    /// The socket.
    pub fd: OwnedFd,
}

impl ListenSocket {
    /// A borrowed view, e.g. for the fd store.
    pub fn borrow(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Copies descriptor `target` out of process `pid` (`pidfd_getfd(2)`;
/// needs the right to ptrace it: the same user, or CAP_SYS_PTRACE).
pub fn copy_from_process(pid: u32, target: i32) -> std::io::Result<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).map_err(std::io::Error::other)?)
        .ok_or_else(|| std::io::Error::other("pid 0"))?;
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
    Ok(rustix::process::pidfd_getfd(
        &pidfd,
        target,
        rustix::process::PidfdGetfdFlags::empty(),
    )?)
}

/// Recovers a service's sockets from its running process, which received
/// them as fds 3, 4, … in the order of `specs`; each is checked to be a
/// listening socket for its entry.
pub fn recover(pid: u32, specs: &[ListenSpec]) -> Result<Vec<ListenSocket>, String> {
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let target = 3 + i32::try_from(i).map_err(|e| e.to_string())?;
            let fd = copy_from_process(pid, target)
                .map_err(|e| format!("cannot copy fd {target} from pid {pid}: {e}"))?;
            if !spec.matches(&fd) {
                return Err(format!(
                    "fd {target} of pid {pid} is not the socket for {}",
                    spec.fd_name()
                ));
            }
            Ok(ListenSocket {
                spec: spec.clone(),
                fd,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_entries_parse_bind_and_match() {
        let spec = ListenSpec::parse("tcp://127.0.0.1:0").unwrap();
        let fd = spec.bind().unwrap();
        let bound = TcpListener::from(fd.try_clone().unwrap())
            .local_addr()
            .unwrap();
        let exact = ListenSpec::Tcp(bound);
        assert!(exact.matches(&fd));
        assert!(!ListenSpec::Tcp("127.0.0.1:1".parse().unwrap()).matches(&fd));
        assert_eq!(exact.fd_name(), format!("tcp-127.0.0.1_{}", bound.port()));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s/web.sock");
        let unix = ListenSpec::parse(&format!("unix://{}", path.display())).unwrap();
        let ufd = unix.bind().unwrap();
        assert!(unix.matches(&ufd));
        drop(ufd);
        // A stale socket file from an earlier run is replaced.
        let again = unix.bind().unwrap();
        assert!(unix.matches(&again));
        // A live socket is never taken over.
        let err = unix.bind().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");

        assert!(
            ListenSpec::parse("udp://1.2.3.4:5")
                .unwrap_err()
                .contains("expected tcp://")
        );
        assert!(
            ListenSpec::parse("tcp://localhost")
                .unwrap_err()
                .contains("tcp://IP:PORT")
        );
        assert!(
            ListenSpec::parse("unix://rel.sock")
                .unwrap_err()
                .contains("absolute")
        );
    }

    #[test]
    fn sockets_are_copied_out_of_a_running_process() {
        // Our own process stands in for the service: fd numbers are ours.
        let spec = ListenSpec::parse("tcp://127.0.0.1:0").unwrap();
        let fd = spec.bind().unwrap();
        let addr = TcpListener::from(fd.try_clone().unwrap())
            .local_addr()
            .unwrap();
        use std::os::fd::AsRawFd;
        let copy = copy_from_process(std::process::id(), fd.as_raw_fd()).unwrap();
        assert!(ListenSpec::Tcp(addr).matches(&copy));
    }
}
