//! A TCP proxy that breaks one connection midway: after a connection has
//! carried `cut_after` bytes from the server to the client, both of its
//! sides are shut down. Only the first connection to reach the budget is
//! cut; everything else is forwarded untouched. Used to break a download.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A running proxy; it lives as long as the test process (its threads
/// block in `accept`), which is fine for a test binary.
pub struct CuttingProxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
}

impl CuttingProxy {
    /// Forwards connections on a fresh loopback port to `target`.
    pub fn start(target: SocketAddr, cut_after: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let done = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let done = done.clone();
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    pump(c2, s2, u64::MAX, &Arc::new(AtomicBool::new(true)))
                });
                std::thread::spawn(move || pump(server, client, cut_after, &done));
            }
        });
        Self { addr, cut }
    }

    /// Whether a connection has been cut.
    pub fn has_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

/// Copies `from` → `to`; once `budget` bytes passed and no connection was
/// cut yet, cuts this one: the far end gets every byte passed so far and
/// then an end of stream (FIN), never a reset that would discard what it
/// has not read yet. A side whose peer is gone is drained until it closes,
/// for the same reason.
fn pump(mut from: TcpStream, mut to: TcpStream, budget: u64, cut: &AtomicBool) {
    let mut buf = vec![0; 64 * 1024];
    let mut passed = 0u64;
    let mut sink = false;
    // Bounded: a peer that never closes ends the draining after this.
    let _ = from.set_read_timeout(Some(std::time::Duration::from_secs(30)));
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if sink {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            sink = true;
            continue;
        }
        passed += n as u64;
        if passed >= budget && !cut.swap(true, Ordering::SeqCst) {
            let _ = to.shutdown(Shutdown::Write);
            let _ = from.shutdown(Shutdown::Both);
            return;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// A TCP proxy whose connections can be stalled (bytes held, connections
/// kept open) and reset (every open connection shut down) at will, to
/// inject network faults between agents and `batond`.
pub struct FaultyProxy {
    pub addr: SocketAddr,
    stalled: Arc<AtomicBool>,
    open: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl FaultyProxy {
    /// Forwards connections on a fresh loopback port to `target`.
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = Arc::new(AtomicBool::new(false));
        let open: Arc<std::sync::Mutex<Vec<TcpStream>>> = Arc::default();
        let (s, o) = (stalled.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                {
                    let mut open = o.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let s = s.clone();
                    std::thread::spawn(move || stalling_pump(from, to, &s));
                }
            }
        });
        Self {
            addr,
            stalled,
            open,
        }
    }

    /// Holds every byte in flight (new connections too) until `resume`.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Lets bytes flow again.
    pub fn resume(&self) {
        self.stalled.store(false, Ordering::SeqCst);
    }

    /// Shuts every open connection down (both peers see a reset or EOF).
    pub fn reset(&self) {
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn stalling_pump(mut from: TcpStream, mut to: TcpStream, stalled: &AtomicBool) {
    let mut buf = vec![0; 64 * 1024];
    loop {
        while stalled.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while stalled.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// A TCP proxy that, once told to, lets bytes from the server through to
/// the client at one byte a second — on every connection but the first
/// (an agent's stream, opened first, stays healthy while its downloads,
/// on a connection of their own, dribble).
pub struct TricklingProxy {
    pub addr: SocketAddr,
    trickle: Arc<AtomicBool>,
}

impl TricklingProxy {
    /// Forwards connections on a fresh loopback port to `target`.
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let trickle = Arc::new(AtomicBool::new(false));
        let t = trickle.clone();
        std::thread::spawn(move || {
            for (n, client) in listener.incoming().enumerate() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let never = Arc::new(AtomicBool::new(false));
                std::thread::spawn(move || trickling_pump(c2, s2, &never));
                let t = if n == 0 {
                    Arc::new(AtomicBool::new(false))
                } else {
                    t.clone()
                };
                std::thread::spawn(move || trickling_pump(server, client, &t));
            }
        });
        Self { addr, trickle }
    }

    /// From now on, one byte a second (connections but the first).
    pub fn trickle(&self) {
        self.trickle.store(true, Ordering::SeqCst);
    }
}

fn trickling_pump(mut from: TcpStream, mut to: TcpStream, trickle: &AtomicBool) {
    let mut buf = vec![0; 64 * 1024];
    'copy: loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut sent = 0;
        while sent < n {
            let step = if trickle.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_secs(1));
                1
            } else {
                n - sent
            };
            if to.write_all(&buf[sent..sent + step]).is_err() {
                break 'copy;
            }
            sent += step;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
