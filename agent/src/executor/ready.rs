//! Readiness of a new process: `READY=1` on a notify socket of its own,
//! or its health check, within the gate.

use super::*;

/// Binds the datagram socket a new process announces `READY=1` on, in the
/// abstract namespace (no path length limit, nothing left on disk).
pub(super) fn notify_socket() -> Result<(String, tokio::net::UnixDatagram), String> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!(
        "baton-ready-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| format!("cannot name a notify socket: {e}"))?;
    let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr)
        .and_then(|s| {
            s.set_nonblocking(true)?;
            tokio::net::UnixDatagram::from_std(s)
        })
        .map_err(|e| format!("cannot bind a notify socket: {e}"))?;
    Ok((format!("@{name}"), socket))
}

/// Waits until a process started beside the old one is ready to take the
/// sockets over: `READY=1` on its notify socket (`ready = "notify"`), or
/// else a first passing health check (which the old process may answer:
/// the weaker choice, for services that cannot notify).
pub(super) async fn wait_ready(
    spec: &ServiceSpec,
    release_dir: &std::path::Path,
    alive: &mut watch::Receiver<bool>,
    cancel: &CancellationToken,
    gate: &Gate,
    notify: Option<tokio::net::UnixDatagram>,
) -> Result<(), String> {
    let deadline = gate.healthy_deadline;
    let mut for_check = alive.clone();
    let ready = async {
        match &notify {
            Some(socket) => {
                let mut buf = vec![0u8; 4096];
                loop {
                    let n = socket.recv(&mut buf).await.map_err(|e| e.to_string())?;
                    if String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .any(|l| l == "READY=1")
                    {
                        return Ok(());
                    }
                }
            }
            None => health::wait_passing(
                spec.health.as_ref(),
                release_dir,
                // The whole gate, while the old process still serves: the
                // check may reach either process, so only its length (and
                // the new process staying alive) says something.
                gate,
                &mut for_check,
                cancel,
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        }
    };
    tokio::select! {
        r = ready => r,
        () = cancel.cancelled() => Err("cancelled".into()),
        _ = alive.wait_for(|a| !*a) => Err("the new process exited before it was ready".into()),
        () = tokio::time::sleep(deadline) => Err(format!(
            "not ready within {} (no READY=1 on its notify socket)",
            humantime::format_duration(deadline)
        )),
    }
}
