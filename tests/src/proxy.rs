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
/// cut yet, cuts this one.
fn pump(mut from: TcpStream, mut to: TcpStream, budget: u64, cut: &AtomicBool) {
    let mut buf = vec![0; 64 * 1024];
    let mut passed = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        passed += n as u64;
        if passed >= budget && !cut.swap(true, Ordering::SeqCst) {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
