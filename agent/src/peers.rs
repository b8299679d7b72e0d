//! Peer-to-peer staging: this agent serves the payloads it stages to other
//! agents of the fleet (`--peer-listen`), and fetches from them when the
//! coordinator says so (see `executor::swarm`).
//!
//! What is served is a [`Seeds`] entry: a payload being downloaded (only
//! its pieces checked so far, more as they arrive) or, for
//! `--peer-serve-for` after it was staged, the whole of it. Nothing else on
//! the host is reachable. Peers are agents of the same fleet, both ways:
//! mutual TLS with the agents' own certificates, the fleet CA's, and a
//! client must present an agent certificate. A peer is not trusted for
//! content: every piece is checked against the signed manifest's hashes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub mod serve;
pub mod tls;

/// Downloads served to peers at once by default (`--peer-uploads`).
pub const DEFAULT_UPLOADS: u32 = 4;
/// The most `--peer-uploads` may be.
pub const MAX_UPLOADS: u32 = 256;
/// How long a staged payload is served by default (`--peer-serve-for`).
pub const DEFAULT_SERVE_FOR: Duration = Duration::from_secs(30 * 60);
/// The lowest `--peer-upload-rate`: slower, peers would give up on this
/// host as stalled.
pub const MIN_UPLOAD_RATE: u64 = 1 << 20;
/// The longest `--peer-serve-for`.
pub const MAX_SERVE_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

/// How this agent takes part in peer-to-peer staging.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Where to serve peers (`None`: it does not serve, though it may
    /// still fetch from peers).
    pub listen: Option<SocketAddr>,
    /// Downloads served at once; more are refused (RESOURCE_EXHAUSTED) and
    /// go elsewhere.
    pub uploads: u32,
    /// How long a payload stays served after it was staged.
    pub serve_for: Duration,
    /// Bytes per second served to peers in all (`None`: as fast as they
    /// take them).
    pub upload_rate: Option<u64>,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            listen: None,
            uploads: DEFAULT_UPLOADS,
            serve_for: DEFAULT_SERVE_FOR,
            upload_rate: None,
        }
    }
}

/// The agent's TLS identity as it is now: certificates are renewed while
/// the agent runs.
pub type Identity = Arc<dyn Fn() -> baton_common::tls::ClientTls + Send + Sync>;

/// What the executor needs for peer-to-peer staging.
#[derive(Clone, Default)]
pub struct PeerSetup {
    /// What this agent serves.
    pub seeds: Arc<Seeds>,
    /// Its identity as it is now (renewals replace it), to fetch from
    /// peers (`None`: it does not fetch from peers).
    pub creds: Option<Identity>,
    /// Where it serves peers (`None`: it does not; a staged payload is
    /// then deleted at once).
    pub serve: Option<SocketAddr>,
    /// How long a staged payload is served.
    pub serve_for: Duration,
}

impl std::fmt::Debug for PeerSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSetup")
            .field("serve", &self.serve)
            .field("serve_for", &self.serve_for)
            .field("fetches_from_peers", &self.creds.is_some())
            .finish_non_exhaustive()
    }
}

/// A payload this agent serves.
#[derive(Debug, Clone)]
pub struct Served {
    /// The file.
    pub path: PathBuf,
    /// Its whole size.
    pub size: u64,
    /// The bytes checked so far (all of it once staged); closes when the
    /// download ends without success.
    pub checked: watch::Receiver<u64>,
}

#[derive(Debug)]
struct Entry {
    served: Served,
    /// Which registration it is (a newer download of the same payload
    /// replaces an older one).
    generation: u64,
    /// Served until then; `None` while it is downloaded.
    until: Option<Instant>,
}

/// The payloads this agent serves, by hex digest.
#[derive(Debug, Default)]
pub struct Seeds {
    entries: Mutex<HashMap<String, Entry>>,
    next: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Seeds {
    /// Registers a download of `hex` into `path`, served as its pieces
    /// are checked; unregistered when the handle is dropped unless kept.
    pub fn begin(self: &Arc<Self>, hex: &str, path: &Path, size: u64, checked: u64) -> Seed {
        let (tx, rx) = watch::channel(checked);
        let generation = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.entries).insert(
            hex.to_owned(),
            Entry {
                served: Served {
                    path: path.to_owned(),
                    size,
                    checked: rx,
                },
                generation,
                until: None,
            },
        );
        Seed {
            seeds: self.clone(),
            hex: hex.to_owned(),
            generation,
            checked: tx,
            kept: false,
        }
    }

    /// What is served for `hex`, if anything.
    pub fn get(&self, hex: &str) -> Option<Served> {
        let entries = lock(&self.entries);
        let entry = entries.get(hex)?;
        match entry.until {
            Some(until) if until <= Instant::now() => None,
            _ => Some(entry.served.clone()),
        }
    }

    /// Stops serving payloads whose time is up and deletes their files;
    /// returns how many.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let expired: Vec<PathBuf> = {
            let mut entries = lock(&self.entries);
            let gone: Vec<String> = entries
                .iter()
                .filter(|(_, e)| e.until.is_some_and(|u| u <= now))
                .map(|(k, _)| k.clone())
                .collect();
            gone.iter()
                .filter_map(|k| entries.remove(k))
                .map(|e| e.served.path)
                .collect()
        };
        for path in &expired {
            let _ = std::fs::remove_file(path);
        }
        expired.len()
    }

    /// Payloads served now.
    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    /// Whether nothing is served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The registration of one download; see [`Seeds::begin`].
#[derive(Debug)]
pub struct Seed {
    seeds: Arc<Seeds>,
    hex: String,
    generation: u64,
    checked: watch::Sender<u64>,
    kept: bool,
}

impl Seed {
    /// The download has checked everything before `offset`.
    pub fn publish(&self, offset: u64) {
        self.checked.send_replace(offset);
    }

    /// The download went back to `offset` (a bad piece was cut off).
    pub fn rewind(&self, offset: u64) {
        self.checked.send_replace(offset);
    }

    /// The payload is complete and now lives at `path`: served from there
    /// for `serve_for`, then deleted.
    pub fn keep(mut self, path: &Path, size: u64, serve_for: Duration) {
        self.checked.send_replace(size);
        let mut entries = lock(&self.seeds.entries);
        if let Some(e) = entries.get_mut(&self.hex)
            && e.generation == self.generation
        {
            e.served.path = path.to_owned();
            e.until = Some(Instant::now() + serve_for);
            self.kept = true;
        }
    }
}

impl Drop for Seed {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let mut entries = lock(&self.seeds.entries);
        if entries
            .get(&self.hex)
            .is_some_and(|e| e.generation == self.generation)
        {
            entries.remove(&self.hex);
        }
    }
}

/// Sweeps `seeds` (see [`Seeds::sweep`]) every minute until `shutdown`.
pub async fn sweep_forever(seeds: Arc<Seeds>, shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let n = seeds.sweep();
                if n > 0 {
                    tracing::debug!(payloads = n, "stopped serving payloads to peers: their time is up");
                }
            }
            () = shutdown.cancelled() => return,
        }
    }
}

/// Deletes payloads an earlier run kept for peers (nothing serves them
/// now) from `downloads`.
pub fn forget_kept(downloads: &Path) {
    let Ok(dir) = std::fs::read_dir(downloads) else {
        return;
    };
    for entry in dir.flatten() {
        if entry.path().extension().is_some_and(|e| e == "seed") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_is_served_while_downloading_kept_for_a_while_and_swept() {
        let dir = tempfile::tempdir().unwrap();
        let seeds = Arc::new(Seeds::default());
        let part = dir.path().join("x.partial");
        std::fs::write(&part, b"abc").unwrap();
        let seed = seeds.begin("x", &part, 3, 0);
        seed.publish(2);
        let served = seeds.get("x").unwrap();
        assert_eq!(*served.checked.borrow(), 2);
        // Dropped without keeping: served no more.
        drop(seed);
        assert!(seeds.get("x").is_none());

        let seed = seeds.begin("x", &part, 3, 0);
        let kept = dir.path().join("x.seed");
        std::fs::rename(&part, &kept).unwrap();
        seed.keep(&kept, 3, Duration::from_secs(3600));
        let served = seeds.get("x").unwrap();
        assert_eq!(served.path, kept);
        assert_eq!(*served.checked.borrow(), 3);
        assert_eq!(seeds.sweep(), 0);

        // Expired: not served, and swept from disk.
        let seed = seeds.begin("y", &kept, 3, 3);
        seed.keep(&kept, 3, Duration::ZERO);
        assert!(seeds.get("y").is_none());
        assert_eq!(seeds.sweep(), 1);
        assert!(!kept.exists());

        // An older download's handle does not remove a newer one.
        let old = seeds.begin("z", &part, 3, 0);
        let new = seeds.begin("z", &part, 3, 0);
        drop(old);
        assert!(seeds.get("z").is_some());
        drop(new);
        assert!(seeds.get("z").is_none());
    }
}
