//! What bounds one agent's staging rate on this machine: the cost of each
//! step a download cannot skip, measured alone, and the leanest data path
//! there could be (the payload over a bare TLS 1.3 stream, no HTTP/2, no
//! protobuf), doing the same checks and writes as the agent. The
//! `artifact` scenario reports them beside the real path's rate, so that
//! a choice of data path is made on figures.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use baton_common::artifact::{Manifest, PieceChecker};

use crate::common::{cpu_time, median};

/// Bytes sealed per call: one TLS record's worth.
const RECORD: usize = 16 << 10;

/// `work` over a 256 MiB buffer of random bytes on one core, three times:
/// the median rate in MB/s.
fn one_core_mb_per_s(mut work: impl FnMut(&mut [u8])) -> f64 {
    let mut data = vec![0u8; 256 << 20];
    fastrand::Rng::with_seed(7).fill(&mut data);
    let mut rates = vec![];
    for _ in 0..3 {
        let t0 = Instant::now();
        work(&mut data);
        rates.push(data.len() as f64 / t0.elapsed().as_secs_f64() / 1e6);
    }
    median(rates)
}

/// SHA-256 on one core, with the same implementation the agent checks
/// pieces with: the reference the artifact target is set against.
pub fn sha256_mb_per_s() -> f64 {
    one_core_mb_per_s(|data| {
        std::hint::black_box(ring::digest::digest(&ring::digest::SHA256, data));
    })
}

/// AES-256-GCM sealing on one core, 16 KiB at a time (a TLS record): the
/// cipher rustls picks first with ring, so the one both ends of every
/// agent connection run.
pub fn aes_gcm_mb_per_s() -> f64 {
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).expect("a 32-byte key"));
    one_core_mb_per_s(|data| {
        for (i, record) in data.chunks_mut(RECORD).enumerate() {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::empty(),
                    record,
                )
                .expect("sealing never fails for a record this size");
            let _ = std::hint::black_box(tag);
        }
    })
}

/// Writes `size` bytes into a new file in `dir` and syncs it, as a staged
/// download must be before it counts: the disk's own rate, in MB/s.
pub fn disk_write_mb_per_s(dir: &Path, size: u64) -> f64 {
    let path = dir.join("disk-probe");
    let block = vec![0x5au8; 1 << 20];
    let mut rates = vec![];
    for _ in 0..3 {
        let t0 = Instant::now();
        let mut f = std::fs::File::create(&path).expect("create the disk probe");
        let mut left = size;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            f.write_all(&block[..n]).expect("write the disk probe");
            left -= n as u64;
        }
        f.sync_all().expect("sync the disk probe");
        rates.push(size as f64 / t0.elapsed().as_secs_f64() / 1e6);
        std::fs::remove_file(&path).expect("remove the disk probe");
    }
    median(rates)
}

/// The leanest data path: `payload` sent over one TLS 1.3 connection on
/// loopback (blocking sockets, rustls with ring, as the agent's
/// connections). One thread sends; at the other end one thread receives
/// and a second writes each buffer into a file in `dir` and checks every
/// piece against `m`, then syncs the file. MB/s of `runs` runs (median,
/// after one warm-up), and the CPU time both ends used per byte.
pub fn lean_tls(payload: &[u8], m: &Manifest, dir: &Path, runs: usize) -> (f64, f64) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("a self-signed certificate");
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .expect("the server's certificate"),
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).expect("the root");
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let mut rates = vec![];
    let me = std::process::id() as i32;
    let mut cpu = std::time::Duration::ZERO;
    for run in 0..=runs {
        let cpu0 = cpu_time(me);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("its address");
        let t0 = Instant::now();
        std::thread::scope(|s| {
            let server = server.clone();
            s.spawn(move || {
                let (tcp, _) = listener.accept().expect("accept");
                tcp.set_nodelay(true).expect("nodelay");
                let conn = rustls::ServerConnection::new(server).expect("a server connection");
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                for chunk in payload.chunks(1 << 20) {
                    tls.write_all(chunk).expect("send");
                }
                tls.conn.send_close_notify();
                tls.flush().expect("flush");
            });
            let tcp = std::net::TcpStream::connect(addr).expect("connect");
            tcp.set_nodelay(true).expect("nodelay");
            let name = "localhost".try_into().expect("a name");
            let conn = rustls::ClientConnection::new(client.clone(), name).expect("a client");
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let path = dir.join("lean-download");
            let file = std::fs::File::create(&path).expect("create");
            // The receiving thread decrypts; a second one writes and
            // checks, a few buffers behind.
            let (full, filled_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
            let (empty, empty_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(6);
            for _ in 0..6 {
                empty.send(vec![0u8; 1 << 20]).expect("a free buffer");
            }
            let writer = s.spawn(move || {
                let mut checker = PieceChecker::new(m, 0).expect("pieces");
                let mut at = 0u64;
                for buf in filled_rx {
                    file.write_all_at(&buf, at).expect("write");
                    checker.feed(&buf).expect("every piece checks");
                    at += buf.len() as u64;
                    let _ = empty.send(buf);
                }
                file.sync_all().expect("sync");
                checker.checked()
            });
            loop {
                let mut buf = empty_rx.recv().expect("a free buffer");
                buf.resize(1 << 20, 0);
                // Fill the buffer (or reach the end), then hand it over.
                let mut filled = 0;
                while filled < buf.len() {
                    match tls.read(&mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) => panic!("receive: {e}"),
                    }
                }
                if filled == 0 {
                    break;
                }
                buf.truncate(filled);
                full.send(buf).expect("the writer runs");
            }
            drop(full);
            let checked = writer.join().expect("the writer");
            assert_eq!(checked, m.size, "the whole payload arrived");
            std::fs::remove_file(&path).expect("remove");
        });
        rates.push(payload.len() as f64 / t0.elapsed().as_secs_f64() / 1e6);
        if run > 0 {
            cpu += cpu_time(me).saturating_sub(cpu0);
        }
    }
    // The first run warms up, as in the scenario.
    rates.remove(0);
    let per_byte = cpu.as_nanos() as f64 / (payload.len() * runs) as f64;
    (median(rates), per_byte)
}
