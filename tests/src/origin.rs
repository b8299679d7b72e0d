//! A plain HTTP/1.1 file server with byte ranges, standing in for an
//! external origin (an HTTP server or an S3 bucket) that holds artifact
//! files: it serves one file, counts the bytes it sent, and can be told
//! to flip a byte of what it serves.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A running origin; stops when dropped.
pub struct Origin {
    /// Where it listens.
    pub addr: SocketAddr,
    sent: Arc<AtomicU64>,
    corrupt: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Origin {
    /// Serves `file` at `/<its file name>` on a free loopback port.
    pub fn start(file: PathBuf) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (sent, corrupt, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (s, c, st) = (sent.clone(), corrupt.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (file, s, c) = (file.clone(), s.clone(), c.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &file, &s, &c);
                });
            }
        });
        Self {
            addr,
            sent,
            corrupt,
            stop,
        }
    }

    /// The URL of the file `name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    /// Bytes of file content sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// From now on, one byte in every MiB served is flipped.
    pub fn corrupt(&self) {
        self.corrupt.store(true, Ordering::Relaxed);
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(
    conn: TcpStream,
    file: &std::path::Path,
    sent: &AtomicU64,
    corrupt: &AtomicBool,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut range: Option<(u64, Option<u64>)> = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
        let lower = header.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            let v = v.trim();
            let (a, b) = v.split_once('-').unwrap_or((v, ""));
            range = a.parse().ok().map(|a| (a, b.parse().ok()));
        }
    }
    let mut out = conn;
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    if path.trim_start_matches('/') != name {
        out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        return Ok(());
    }
    let data = std::fs::read(file)?;
    let len = data.len() as u64;
    let (start, end) = match range {
        Some((a, b)) => (a, b.unwrap_or(len - 1).min(len - 1)),
        None => (0, len - 1),
    };
    if start > end {
        out.write_all(
            b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    let status = if range.is_some() {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{len}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
        end - start + 1
    )?;
    let mut body = data[start as usize..=end as usize].to_vec();
    if corrupt.load(Ordering::Relaxed) {
        for i in (0..body.len()).step_by(1 << 20) {
            body[i] ^= 0x01;
        }
    }
    for chunk in body.chunks(64 << 10) {
        out.write_all(chunk)?;
        sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}
