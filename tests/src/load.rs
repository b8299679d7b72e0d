//! A load generator for the zero-downtime tests: N clients, each a thread
//! sending `GET /` over a keep-alive HTTP/1.1 connection in a loop, that
//! reconnect when the server answers `Connection: close` (a draining
//! process) and count every request that did not get a 200.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the clients saw.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Requests answered 200.
    pub ok: u64,
    /// Connections refused.
    pub refused: u64,
    /// Requests that failed otherwise (reset, EOF, timeout, non-200).
    pub failed: u64,
    /// The first few failures, for the assertion message.
    pub samples: Vec<String>,
    /// How often each body was seen (which versions answered).
    pub bodies: std::collections::BTreeMap<String, u64>,
}

impl Stats {
    fn merge(&mut self, o: Stats) {
        self.ok += o.ok;
        self.refused += o.refused;
        self.failed += o.failed;
        for s in o.samples {
            if self.samples.len() < 10 {
                self.samples.push(s);
            }
        }
        for (b, n) in o.bodies {
            *self.bodies.entry(b).or_default() += n;
        }
    }

    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.samples.len() < 10 {
            self.samples.push(what);
        }
    }
}

/// Running clients.
pub struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<Stats>>,
}

/// One request on `conn`: the status code, the body and whether the server
/// closes the connection after it.
fn request(conn: &mut BufReader<TcpStream>, path: &str) -> std::io::Result<(u16, String, bool)> {
    conn.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: load\r\n\r\n").as_bytes())?;
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before the status line",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let (mut length, mut close) = (0usize, false);
    loop {
        let mut header = String::new();
        if conn.read_line(&mut header)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed in the headers",
            ));
        }
        let h = header.trim_end().to_ascii_lowercase();
        if h.is_empty() {
            break;
        }
        if let Some(v) = h.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if h == "connection: close" {
            close = true;
        }
    }
    let mut body = vec![0; length];
    conn.read_exact(&mut body)?;
    Ok((
        status,
        String::from_utf8_lossy(&body).trim().to_owned(),
        close,
    ))
}

/// One GET on a fresh connection (for single probes like a slow request).
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut conn = BufReader::new(stream);
    request(&mut conn, path).map(|(s, b, _)| (s, b))
}

impl Load {
    /// Starts `clients` clients against `addr`.
    pub fn start(addr: SocketAddr, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || client(addr, &stop))
            })
            .collect();
        Self { stop, clients }
    }

    /// Stops the clients and adds up what they saw.
    pub fn finish(self) -> Stats {
        self.stop.store(true, Ordering::SeqCst);
        let mut total = Stats::default();
        for c in self.clients {
            total.merge(c.join().unwrap());
        }
        total
    }
}

fn client(addr: SocketAddr, stop: &AtomicBool) -> Stats {
    let mut stats = Stats::default();
    let mut conn: Option<BufReader<TcpStream>> = None;
    // Bounded: a client sends at most this many requests.
    for _ in 0..2_000_000 {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = s.set_nodelay(true);
                    conn.insert(BufReader::new(s))
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    stats.refused += 1;
                    if stats.samples.len() < 10 {
                        stats.samples.push(format!("connect: {e}"));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => {
                    stats.fail(format!("connect: {e}"));
                    continue;
                }
            },
        };
        match request(c, "/") {
            Ok((200, body, close)) => {
                stats.ok += 1;
                *stats.bodies.entry(body).or_default() += 1;
                if close {
                    conn = None;
                }
            }
            Ok((status, body, _)) => {
                stats.fail(format!("status {status}: {body}"));
                conn = None;
            }
            Err(e) => {
                stats.fail(format!("request: {e}"));
                conn = None;
            }
        }
    }
    stats
}
