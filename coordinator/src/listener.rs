//! Accepting connections: TCP, then the TLS handshake — run here, bounded
//! in number and time — then the connection goes to one of two gRPC
//! servers, by whether the client presented a certificate.
//!
//! Clients with a certificate from the fleet's CA (agents, operators,
//! other coordinators) reach the full server. Clients without one can only
//! be new hosts enrolling, so they reach a small server that answers
//! enrollment and nothing else, with small limits of its own
//! ([`crate::limits::anonymous_server`]). What such clients can hold is
//! bounded, whatever their number:
//!
//! - a connection that has sent nothing holds no TLS state (the handshake
//!   starts on its first bytes), only its socket and a timer;
//! - at most [`MAX_HANDSHAKES`] handshakes run at once, and at most
//!   [`MAX_HANDSHAKES_PER_ADDRESS`] from one address (others wait their
//!   turn), so one address stalling handshakes cannot hold the others up;
//! - every connection completes its handshake within
//!   [`TLS_HANDSHAKE_TIMEOUT`] of being accepted, waiting included, and
//!   within [`HANDSHAKE_TURN`] of getting its turn, or is closed;
//! - addresses count per IPv4 address and per IPv6 /64;
//! - at most [`MAX_ANONYMOUS`] connections without a certificate are open
//!   at once, [`MAX_ANONYMOUS_PER_ADDRESS`] from one address, each for at
//!   most [`ANONYMOUS_LIFETIME`]; more are closed at once.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use baton_common::tls::TLS_HANDSHAKE_TIMEOUT;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tracing::{debug, warn};

/// TLS handshakes in progress at once; more wait for a turn.
pub const MAX_HANDSHAKES: usize = 512;
/// TLS handshakes in progress at once from one address.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 64;
/// Connections without a client certificate open at once.
pub const MAX_ANONYMOUS: usize = 128;
/// Connections without a client certificate open at once from one address.
pub const MAX_ANONYMOUS_PER_ADDRESS: usize = 8;
/// How long a connection without a client certificate may stay open
/// (enrolling takes one call).
pub const ANONYMOUS_LIFETIME: Duration = Duration::from_secs(60);
/// How long a handshake may hold its turn: one that stops making progress
/// gives its place up well before the overall timeout.
pub const HANDSHAKE_TURN: Duration = Duration::from_secs(5);

/// Connections handed to a server before it takes them.
const QUEUE: usize = 64;

/// The two streams of accepted connections, for `serve_with_incoming`.
pub struct Split {
    /// Clients that presented a certificate of the fleet's CA.
    pub certified: ReceiverStream<io::Result<Conn>>,
    /// Clients without a certificate.
    pub anonymous: ReceiverStream<io::Result<Conn>>,
}

/// Per-address counts, shared by the accept loop and the connections.
#[derive(Default)]
struct Counts {
    handshakes: HashMap<IpAddr, Arc<Semaphore>>,
    anonymous: HashMap<IpAddr, usize>,
}

struct Shared {
    acceptor: TlsAcceptor,
    handshakes: Arc<Semaphore>,
    anonymous: Arc<Semaphore>,
    counts: Mutex<Counts>,
    certified: mpsc::Sender<io::Result<Conn>>,
    unauthenticated: mpsc::Sender<io::Result<Conn>>,
    /// Refusals logged at warn level, at most one per second.
    last_warning: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single map update.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// Says once a second, at most, why a connection was turned away.
    fn refused(&self, peer: IpAddr, why: &str) {
        let mut last = lock(&self.last_warning);
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            warn!(%peer, reason = why, "closed a connection (further ones this second are logged at debug level)");
        } else {
            debug!(%peer, reason = why, "closed a connection");
        }
    }

    fn address_gate(&self, ip: IpAddr) -> Arc<Semaphore> {
        lock(&self.counts)
            .handshakes
            .entry(ip)
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_HANDSHAKES_PER_ADDRESS)))
            .clone()
    }

    /// Forgets an address's handshake gate once nobody uses it.
    fn release_address_gate(&self, ip: IpAddr, gate: Arc<Semaphore>) {
        let mut counts = lock(&self.counts);
        // Let go of ours under the lock: whoever takes a clone takes it
        // under the lock too, so the map's is then the only one left.
        drop(gate);
        if counts
            .handshakes
            .get(&ip)
            .is_some_and(|g| Arc::strong_count(g) == 1)
        {
            counts.handshakes.remove(&ip);
        }
    }

    /// A slot for a connection without a certificate, if there is room.
    fn anonymous_slot(self: &Arc<Self>, ip: IpAddr) -> Option<AnonymousSlot> {
        let permit = self.anonymous.clone().try_acquire_owned().ok()?;
        let mut counts = lock(&self.counts);
        let n = counts.anonymous.entry(ip).or_insert(0);
        if *n >= MAX_ANONYMOUS_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(AnonymousSlot {
            _permit: permit,
            shared: self.clone(),
            ip,
        })
    }
}

/// Holds one of the connections without a certificate until dropped.
struct AnonymousSlot {
    _permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for AnonymousSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.shared.counts);
        if let Some(n) = counts.anonymous.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.anonymous.remove(&self.ip);
            }
        }
    }
}

/// Accepts on `listener` until `stop`, handshakes with `config`, and
/// splits the connections. The returned tracker owns every handshake task.
pub fn accept(
    listener: Arc<TcpListener>,
    config: Arc<tokio_rustls::rustls::ServerConfig>,
    stop: CancellationToken,
) -> Split {
    let (certified, certified_rx) = mpsc::channel(QUEUE);
    let (unauthenticated, anonymous_rx) = mpsc::channel(QUEUE);
    let shared = Arc::new(Shared {
        acceptor: TlsAcceptor::from(config),
        handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
        anonymous: Arc::new(Semaphore::new(MAX_ANONYMOUS)),
        counts: Mutex::default(),
        certified,
        unauthenticated,
        last_warning: Mutex::new(None),
    });
    tokio::spawn(async move {
        let tasks = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let (shared, stop) = (shared.clone(), stop.clone());
                    tasks.spawn(async move {
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = handshake(shared, tcp, source(peer.ip())) => {}
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors, most likely: wait a little
                    // instead of spinning on the error.
                    warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tasks.close();
        tasks.wait().await;
    });
    Split {
        certified: ReceiverStream::new(certified_rx),
        anonymous: ReceiverStream::new(anonymous_rx),
    }
}

/// The source a connection counts against: its address, or for IPv6 its
/// /64 (a host usually has a whole /64 to pick addresses from); an IPv4
/// address mapped into IPv6 counts as itself.
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(bits))
            }
        },
    }
}

/// One connection from accept to a server, or closed.
async fn handshake(shared: Arc<Shared>, tcp: TcpStream, ip: IpAddr) {
    let deadline = Instant::now() + TLS_HANDSHAKE_TIMEOUT;
    let gate = shared.address_gate(ip);
    let tls = tokio::time::timeout_at(deadline, async {
        // Nothing is allocated for TLS before the client says something.
        tcp.readable().await.ok()?;
        let _mine = gate.clone().acquire_owned().await.ok()?;
        let _turn = shared.handshakes.clone().acquire_owned().await.ok()?;
        // A handshake that stalls gives its turn up after HANDSHAKE_TURN.
        tokio::time::timeout(HANDSHAKE_TURN, shared.acceptor.accept(tcp))
            .await
            .ok()?
            .ok()
    })
    .await;
    shared.release_address_gate(ip, gate);
    let tls = match tls {
        Ok(Some(tls)) => tls,
        Ok(None) => {
            debug!(peer = %ip, "a TLS handshake failed");
            return;
        }
        Err(_) => {
            shared.refused(ip, "no TLS handshake within the timeout");
            return;
        }
    };
    let has_certificate = tls
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|c| !c.is_empty());
    if has_certificate {
        let _ = shared.certified.send(Ok(Conn::new(tls, None))).await;
        return;
    }
    match shared.anonymous_slot(ip) {
        Some(slot) => {
            let _ = shared
                .unauthenticated
                .send(Ok(Conn::new(tls, Some(slot))))
                .await;
        }
        None => shared.refused(
            ip,
            "too many connections without a client certificate (from this address, or in all)",
        ),
    }
}

/// An accepted TLS connection; one without a certificate carries its slot
/// and ends at its lifetime.
pub struct Conn {
    // Boxed, as tonic does: the connection's task holds a pointer, not the
    // TLS state inline (measured: 1.2 KiB less per connected agent).
    stream: Box<TlsStream<TcpStream>>,
    _slot: Option<AnonymousSlot>,
    expires: Option<Pin<Box<Sleep>>>,
}

impl Conn {
    fn new(stream: TlsStream<TcpStream>, slot: Option<AnonymousSlot>) -> Self {
        let expires = slot
            .as_ref()
            .map(|_| Box::pin(tokio::time::sleep(ANONYMOUS_LIFETIME)));
        Self {
            stream: Box::new(stream),
            _slot: slot,
            expires,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(expires) = self.expires.as_mut()
            && expires.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "a connection without a client certificate reached its lifetime",
            )));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Conn {
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_addresses_and_ipv6_64s() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(source(v4), v4);
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(source(mapped), v4);
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(source(a), source(b));
        assert_eq!(source(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
    }
}
