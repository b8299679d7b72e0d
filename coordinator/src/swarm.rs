//! Where each agent downloads a payload from: the coordinator for the
//! first ones, then other agents (peers) that hold it or are fetching it,
//! so that the coordinator sends about one copy whatever the fleet's size.
//!
//! One [`Swarm`] per digest in a [`Swarms`]. A host that asks becomes a
//! member; once it has a source (or is done) and serves peers, it is a
//! source itself, for up to `peer_slots` others at a time — its pieces flow
//! on as they arrive (a pipelined tree, as Murder and Kraken do). Sources
//! in the asker's zone and rack come first, then its zone, then any, the
//! least loaded first. A peer reported failed is skipped until it asks
//! again (a live agent does, a dead one never); one reported corrupt is
//! never named again. The coordinator serves `coordinator_slots` at a time
//! while peers exist or are coming; alone, it serves everyone.
//!
//! Pure and synchronous (time is passed in), so the benchmark's 10,000-host
//! simulation drives this very code. Every call costs O(log n) plus at most
//! [`PROBES`] candidates per tier: no call scans the swarm.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_common::host::HostId;

/// Candidates looked at per tier before giving up on it (skipping the
/// asker's own descendants and the peers it just failed with).
const PROBES: usize = 16;

/// How long a peer that failed one host is skipped by that host.
const AVOID_FOR: Duration = Duration::from_secs(60);

/// The deepest chain of sources followed to rule out cycles.
const MAX_DEPTH: usize = 64;

/// Digests tracked at once; the least recently used goes first.
pub const MAX_SWARMS: usize = 256;

/// A swarm asked about within this long is never pushed out by another.
pub const SWARM_BUSY: Duration = Duration::from_secs(600);

/// A swarm nobody asked about for this long is forgotten.
pub const SWARM_IDLE: Duration = Duration::from_secs(3600);

/// How the scheduler shares out sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwarmConfig {
    /// Downloads the coordinator serves at once per payload while peers
    /// exist or are coming (`batond --artifact-uploads`).
    pub coordinator_slots: u32,
    /// Downloads one peer is given at once (its own cap, `baton-agent
    /// --peer-uploads`, is the hard limit).
    pub peer_slots: u32,
    /// How long an assignment counts against its source's slots when the
    /// host does not ask again.
    pub lease: Duration,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        Self {
            coordinator_slots: 2,
            peer_slots: 4,
            lease: Duration::from_secs(120),
        }
    }
}

/// The most `--artifact-uploads` may be.
pub const MAX_COORDINATOR_SLOTS: u32 = 10_000;

/// What a host asks (see `baton.agent.v1.SourceRequest`).
#[derive(Debug, Clone, Default)]
pub struct Ask {
    /// Checked bytes it holds.
    pub offset: u64,
    /// Where it serves peers, if it does.
    pub serve: Option<SocketAddr>,
    /// Its `zone` label.
    pub zone: Option<String>,
    /// Its `rack` label.
    pub rack: Option<String>,
    /// The peer its last attempt failed with.
    pub failed: Option<HostId>,
    /// That peer sent a bad piece.
    pub corrupt: bool,
    /// It has the whole payload.
    pub done: bool,
    /// With `done`: how long it serves the payload from now (`None`: as
    /// long as the swarm lasts).
    pub serve_for: Option<Duration>,
}

/// Where to download from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The coordinator.
    Coordinator,
    /// Another agent, at its address.
    Peer(HostId, SocketAddr),
    /// Nothing is free: ask again after this long.
    Wait(Duration),
    /// Nothing more is needed (the host said it is done).
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Via {
    Coordinator,
    Peer(HostId),
}

#[derive(Debug)]
struct Member {
    serve: Option<SocketAddr>,
    zone: Option<String>,
    rack: Option<String>,
    offset: u64,
    done: bool,
    /// Its current source, and the assignment's number.
    from: Option<(Via, u64)>,
    /// Downloads it serves (assignments within their lease).
    children: u32,
    /// Hops from the coordinator when it got its source (0 once done).
    depth: u32,
    /// Skipped until it asks again.
    down: bool,
    /// Sent a bad piece: never a source again.
    corrupt: bool,
    /// Peers it failed with, and when.
    avoid: Vec<(HostId, Instant)>,
    /// When it stops serving (it said so when done).
    serve_until: Option<Instant>,
}

impl Member {
    fn is_source(&self) -> bool {
        self.serve.is_some() && !self.down && !self.corrupt && (self.done || self.from.is_some())
    }
}

/// An open source: the nearest the coordinator first (a broad, shallow
/// tree: each hop adds latency and a point of failure), then the least
/// loaded.
type Key = (u32, u32, HostId);

/// Members that can take a download, by tier.
#[derive(Debug, Default)]
struct Open {
    any: BTreeSet<Key>,
    zone: HashMap<String, BTreeSet<Key>>,
    rack: HashMap<(String, String), BTreeSet<Key>>,
}

/// The scheduler of one payload.
#[derive(Debug)]
pub struct Swarm {
    config: SwarmConfig,
    members: HashMap<HostId, Member>,
    open: Open,
    /// (when the lease ends, host, assignment number).
    leases: VecDeque<(Instant, HostId, u64)>,
    next_assignment: u64,
    /// Hosts that finished.
    done: usize,
    /// Members that are sources (open or full).
    sources: usize,
    last_used: Instant,
}

impl Swarm {
    /// An empty swarm.
    pub fn new(config: SwarmConfig, now: Instant) -> Self {
        Self {
            config,
            members: HashMap::new(),
            open: Open::default(),
            leases: VecDeque::new(),
            next_assignment: 0,
            done: 0,
            sources: 0,
            last_used: now,
        }
    }

    /// Hosts that said they hold the whole payload.
    pub fn done(&self) -> usize {
        self.done
    }

    /// Hosts that asked.
    pub fn members(&self) -> usize {
        self.members.len()
    }

    fn key(&self, host: &HostId) -> Option<Key> {
        let m = self.members.get(host)?;
        Some((m.depth, m.children, host.clone()))
    }

    /// Takes `host` out of the open sets (before its key changes).
    fn close(&mut self, host: &HostId) {
        let Some(key) = self.key(host) else { return };
        let Some(m) = self.members.get(host) else {
            return;
        };
        self.open.any.remove(&key);
        if let Some(z) = &m.zone {
            if let Some(set) = self.open.zone.get_mut(z) {
                set.remove(&key);
                if set.is_empty() {
                    self.open.zone.remove(z);
                }
            }
            if let Some(r) = &m.rack {
                let rk = (z.clone(), r.clone());
                if let Some(set) = self.open.rack.get_mut(&rk) {
                    set.remove(&key);
                    if set.is_empty() {
                        self.open.rack.remove(&rk);
                    }
                }
            }
        }
    }

    /// Puts `host` back in the open sets if it can take a download.
    fn reopen(&mut self, host: &HostId) {
        let Some(key) = self.key(host) else { return };
        let Some(m) = self.members.get(host) else {
            return;
        };
        if !m.is_source() || m.children >= self.config.peer_slots {
            return;
        }
        self.open.any.insert(key.clone());
        if let Some(z) = &m.zone {
            self.open
                .zone
                .entry(z.clone())
                .or_default()
                .insert(key.clone());
            if let Some(r) = &m.rack {
                self.open
                    .rack
                    .entry((z.clone(), r.clone()))
                    .or_default()
                    .insert(key);
            }
        }
    }

    /// Changes a member, keeping the open sets right.
    fn update(&mut self, host: &HostId, change: impl FnOnce(&mut Member)) {
        self.close(host);
        if let Some(m) = self.members.get_mut(host) {
            let was = m.is_source();
            change(m);
            match (was, m.is_source()) {
                (false, true) => self.sources += 1,
                (true, false) => self.sources -= 1,
                _ => {}
            }
        }
        self.reopen(host);
    }

    /// Ends `host`'s assignment: its source gets the slot back.
    fn release(&mut self, host: &HostId) {
        let mut from = None;
        self.update(host, |m| from = m.from.take());
        // An expired lease gave its slot back already.
        if let Some((Via::Peer(parent), n)) = from
            && n != u64::MAX
        {
            self.update(&parent, |p| p.children = p.children.saturating_sub(1));
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _, _)) = self.leases.front() {
            if *at > now {
                break;
            }
            let Some((_, host, n)) = self.leases.pop_front() else {
                break;
            };
            let current = self
                .members
                .get(&host)
                .and_then(|m| m.from.as_ref())
                .is_some_and(|(_, m)| *m == n);
            if current {
                // Counted no more; kept as its source for ancestry, so a
                // host still fetching stays a source.
                let parent = match self.members.get(&host).and_then(|m| m.from.as_ref()) {
                    Some((Via::Peer(p), _)) => Some(p.clone()),
                    _ => None,
                };
                if let Some(p) = parent {
                    self.update(&p, |p| p.children = p.children.saturating_sub(1));
                }
                if let Some(m) = self.members.get_mut(&host)
                    && let Some((_, n)) = &mut m.from
                {
                    // An assignment number no lease matches: not released twice.
                    *n = u64::MAX;
                }
            }
        }
    }

    /// Whether `candidate` gets its bytes, directly or not, from `host`.
    fn descends_from(&self, candidate: &HostId, host: &HostId) -> bool {
        let mut at = candidate;
        for _ in 0..MAX_DEPTH {
            if at == host {
                return true;
            }
            match self.members.get(at).and_then(|m| m.from.as_ref()) {
                Some((Via::Peer(p), _)) => at = p,
                _ => return false,
            }
        }
        // Too deep to tell: not used.
        true
    }

    /// A free source for `host`: its id, address and depth.
    fn pick(&self, host: &HostId, now: Instant) -> Option<(HostId, SocketAddr, u32)> {
        let me = self.members.get(host)?;
        let usable = |key: &&Key| {
            let c = &key.2;
            let serving = self
                .members
                .get(c)
                .is_some_and(|m| m.serve_until.is_none_or(|until| until > now));
            serving
                && c != host
                && !me
                    .avoid
                    .iter()
                    .any(|(p, at)| p == c && now.duration_since(*at) < AVOID_FOR)
                && !self.descends_from(c, host)
        };
        let rack = me
            .zone
            .clone()
            .zip(me.rack.clone())
            .and_then(|k| self.open.rack.get(&k));
        let zone = me.zone.as_ref().and_then(|z| self.open.zone.get(z));
        [rack, zone, Some(&self.open.any)]
            .into_iter()
            .flatten()
            .find_map(|set| set.iter().take(PROBES).find(usable))
            .and_then(|k| {
                let m = self.members.get(&k.2)?;
                Some((k.2.clone(), m.serve?, m.depth))
            })
    }

    /// Answers `host`'s ask at `now`; `coordinator_busy` is how many
    /// downloads of this payload the coordinator serves right now.
    pub fn ask(&mut self, host: &HostId, ask: Ask, coordinator_busy: u32, now: Instant) -> Source {
        self.last_used = now;
        self.expire(now);
        if !self.members.contains_key(host) {
            self.members.insert(
                host.clone(),
                Member {
                    serve: None,
                    zone: None,
                    rack: None,
                    offset: 0,
                    done: false,
                    from: None,
                    children: 0,
                    depth: 0,
                    down: false,
                    corrupt: false,
                    avoid: Vec::new(),
                    serve_until: None,
                },
            );
        }
        // A report counts only about the host's own source: nobody can
        // have others excluded by naming them.
        let current = self
            .members
            .get(host)
            .and_then(|m| m.from.as_ref())
            .map(|(v, _)| v.clone());
        let failed = ask
            .failed
            .filter(|p| current.as_ref() == Some(&Via::Peer(p.clone())));
        // Asking proves it alive; its old assignment ends.
        self.release(host);
        let was_done = self.members.get(host).is_some_and(|m| m.done);
        self.update(host, |m| {
            m.serve = ask.serve;
            m.zone = ask.zone;
            m.rack = ask.rack;
            m.offset = ask.offset;
            m.down = false;
            // A host that asks again without being done lost its copy.
            m.done = ask.done;
            m.serve_until = ask
                .done
                .then(|| ask.serve_for.and_then(|d| now.checked_add(d)))
                .flatten();
            if m.done {
                m.depth = 0;
            }
            m.avoid
                .retain(|(_, at)| now.duration_since(*at) < AVOID_FOR);
        });
        match (was_done, ask.done) {
            (false, true) => self.done += 1,
            (true, false) => self.done = self.done.saturating_sub(1),
            _ => {}
        }
        if ask.done {
            return Source::Done;
        }
        if let Some(peer) = failed.filter(|p| p != host)
            && self.members.contains_key(&peer)
        {
            let corrupt = ask.corrupt;
            self.update(&peer, |p| {
                if corrupt {
                    p.corrupt = true;
                } else {
                    p.down = true;
                }
            });
            if let Some(m) = self.members.get_mut(host) {
                if m.avoid.len() >= PROBES {
                    m.avoid.remove(0);
                }
                m.avoid.push((peer, now));
            }
        }
        let (from, source, depth) = if let Some((peer, addr, depth)) = self.pick(host, now) {
            self.update(&peer, |p| p.children += 1);
            (
                Via::Peer(peer.clone()),
                Source::Peer(peer, addr),
                depth.saturating_add(1),
            )
        } else {
            // No peer is free: the coordinator, within its slots while
            // peers exist (they free up, or new ones come as hosts start).
            let me = usize::from(self.members.get(host).is_some_and(Member::is_source));
            if self.sources > me && coordinator_busy >= self.config.coordinator_slots {
                return Source::Wait(Duration::from_millis(250));
            }
            (Via::Coordinator, Source::Coordinator, 1)
        };
        let n = self.next_assignment;
        self.next_assignment += 1;
        self.leases
            .push_back((now + self.config.lease, host.clone(), n));
        if self.leases.len() > 2 * self.members.len() + 64 {
            // Hosts asking again and again leave leases that match no
            // assignment: dropped, so memory follows the members.
            let members = &self.members;
            self.leases.retain(|(_, h, n)| {
                members
                    .get(h)
                    .and_then(|m| m.from.as_ref())
                    .is_some_and(|(_, current)| current == n)
            });
        }
        self.update(host, |m| {
            m.from = Some((from, n));
            m.depth = depth;
        });
        source
    }
}

/// The swarms of every payload being fetched.
#[derive(Debug)]
pub struct Swarms {
    config: SwarmConfig,
    swarms: HashMap<String, Swarm>,
}

impl Swarms {
    /// No swarms yet.
    pub fn new(config: SwarmConfig) -> Self {
        Self {
            config,
            swarms: HashMap::new(),
        }
    }

    /// Answers `host`'s ask about `digest` (see [`Swarm::ask`]).
    pub fn ask(
        &mut self,
        digest: &str,
        host: &HostId,
        ask: Ask,
        coordinator_busy: u32,
        now: Instant,
    ) -> Source {
        self.swarms
            .retain(|_, s| now.duration_since(s.last_used) < SWARM_IDLE);
        if !self.swarms.contains_key(digest) && self.swarms.len() >= MAX_SWARMS {
            let oldest = self
                .swarms
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(d, s)| (d.clone(), s.last_used));
            match oldest {
                // A swarm in use is not pushed out by a host asking about
                // many payloads: the new one goes without one.
                Some((_, used)) if now.duration_since(used) < SWARM_BUSY => {
                    return if ask.done {
                        Source::Done
                    } else {
                        Source::Coordinator
                    };
                }
                Some((d, _)) => {
                    self.swarms.remove(&d);
                }
                None => {}
            }
        }
        self.swarms
            .entry(digest.to_owned())
            .or_insert_with(|| Swarm::new(self.config, now))
            .ask(host, ask, coordinator_busy, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: usize) -> HostId {
        HostId::try_from(format!("h{i}")).unwrap()
    }

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16))
    }

    fn ask(i: usize) -> Ask {
        Ask {
            serve: Some(addr(i)),
            ..Ask::default()
        }
    }

    #[test]
    fn the_first_host_fetches_from_the_coordinator_and_the_rest_from_peers() {
        let now = Instant::now();
        let mut s = Swarm::new(SwarmConfig::default(), now);
        assert_eq!(s.ask(&h(0), ask(0), 0, now), Source::Coordinator);
        let mut from_coordinator = 1;
        for i in 1..1000 {
            match s.ask(&h(i), ask(i), from_coordinator, now) {
                Source::Peer(p, a) => assert_eq!(a, addr(p.as_str()[1..].parse().unwrap())),
                Source::Coordinator => from_coordinator += 1,
                other => panic!("host {i}: {other:?}"),
            }
        }
        assert_eq!(from_coordinator, 1, "one copy leaves the coordinator");
        // No peer serves more than its slots.
        let most = s.members.values().map(|m| m.children).max().unwrap();
        assert!(most <= 4, "{most}");
    }

    #[test]
    fn hosts_that_do_not_serve_all_fetch_from_the_coordinator() {
        let now = Instant::now();
        let mut s = Swarm::new(SwarmConfig::default(), now);
        for i in 0..50 {
            assert_eq!(
                s.ask(&h(i), Ask::default(), i as u32, now),
                Source::Coordinator
            );
        }
    }

    #[test]
    fn a_failed_peer_is_skipped_and_a_corrupt_one_never_named_again() {
        let now = Instant::now();
        let mut s = Swarm::new(SwarmConfig::default(), now);
        s.ask(&h(0), ask(0), 0, now);
        let Source::Peer(p, _) = s.ask(&h(1), ask(1), 1, now) else {
            panic!()
        };
        assert_eq!(p, h(0));
        // h1 reports h0 corrupt: h2 is not sent to h0, nor to h1 (which
        // got its bytes from h0 and now asks again, so it has no source).
        let again = s.ask(
            &h(1),
            Ask {
                failed: Some(h(0)),
                corrupt: true,
                ..ask(1)
            },
            0,
            now,
        );
        assert_eq!(again, Source::Coordinator);
        let next = s.ask(&h(2), ask(2), 1, now);
        assert_eq!(next, Source::Peer(h(1), addr(1)));
        // h0 asking again does not clear its corruption.
        s.ask(&h(0), ask(0), 1, now);
        for i in 3..20 {
            if let Source::Peer(p, _) = s.ask(&h(i), ask(i), 1, now) {
                assert_ne!(p, h(0), "a corrupt peer was named again");
            }
        }
        // A peer that failed (not corrupt) is back once it asks again.
        let mut s = Swarm::new(SwarmConfig::default(), now);
        s.ask(&h(0), ask(0), 0, now);
        s.ask(&h(1), ask(1), 1, now);
        let failed = Ask {
            failed: Some(h(0)),
            ..ask(1)
        };
        // h0 is down, nobody else serves: the coordinator, though busy.
        assert_eq!(s.ask(&h(1), failed, 5, now), Source::Coordinator);
        // h0 finishes and says so: back, and first (it needs nobody).
        s.ask(
            &h(0),
            Ask {
                done: true,
                ..ask(0)
            },
            1,
            now,
        );
        assert_eq!(s.ask(&h(3), ask(3), 2, now), Source::Peer(h(0), addr(0)));
    }

    #[test]
    fn no_host_is_sent_to_its_own_descendant() {
        let now = Instant::now();
        let config = SwarmConfig {
            peer_slots: 1,
            ..SwarmConfig::default()
        };
        let mut s = Swarm::new(config, now);
        s.ask(&h(0), ask(0), 0, now); // coordinator
        s.ask(&h(1), ask(1), 1, now); // from h0
        s.ask(&h(2), ask(2), 1, now); // from h1
        // h0 fails at the coordinator and asks again: h1 and h2 hold
        // bytes only through h0.
        let again = s.ask(&h(0), ask(0), 0, now);
        assert_eq!(again, Source::Coordinator);
    }

    #[test]
    fn peers_in_the_same_zone_and_rack_come_first() {
        let now = Instant::now();
        let mut s = Swarm::new(SwarmConfig::default(), now);
        let z = |i: usize, zone: &str, rack: &str| Ask {
            zone: Some(zone.into()),
            rack: Some(rack.into()),
            ..ask(i)
        };
        s.ask(&h(0), z(0, "a", "1"), 0, now);
        s.ask(&h(1), z(1, "b", "1"), 1, now);
        s.ask(&h(2), z(2, "b", "2"), 1, now);
        assert_eq!(
            s.ask(&h(3), z(3, "b", "2"), 1, now),
            Source::Peer(h(2), addr(2))
        );
        // Same zone, another rack: h1, h2 or h3, never h0.
        for i in 4..8 {
            match s.ask(&h(i), z(i, "b", "9"), 1, now) {
                Source::Peer(p, _) => assert_ne!(p, h(0)),
                other => panic!("{other:?}"),
            }
        }
        // Another zone altogether: whatever is least loaded.
        assert!(matches!(
            s.ask(&h(9), z(9, "c", "1"), 1, now),
            Source::Peer(..)
        ));
    }

    #[test]
    fn leases_free_slots_of_hosts_that_never_ask_again() {
        let now = Instant::now();
        let config = SwarmConfig {
            coordinator_slots: 1,
            peer_slots: 1,
            lease: Duration::from_secs(10),
        };
        let mut s = Swarm::new(config, now);
        s.ask(
            &h(0),
            Ask {
                done: true,
                ..ask(0)
            },
            0,
            now,
        );
        assert_eq!(
            s.ask(&h(1), Ask::default(), 0, now),
            Source::Peer(h(0), addr(0))
        );
        // h0's one slot is taken; the coordinator's too.
        assert!(matches!(
            s.ask(&h(2), Ask::default(), 1, now),
            Source::Wait(_)
        ));
        let later = now + Duration::from_secs(11);
        assert_eq!(
            s.ask(&h(2), Ask::default(), 1, later),
            Source::Peer(h(0), addr(0))
        );
        assert_eq!(s.done(), 1);
    }

    #[test]
    fn a_report_counts_only_about_the_reporters_own_source() {
        let now = Instant::now();
        let mut s = Swarm::new(SwarmConfig::default(), now);
        s.ask(
            &h(0),
            Ask {
                done: true,
                ..ask(0)
            },
            0,
            now,
        );
        s.ask(
            &h(1),
            Ask {
                done: true,
                ..ask(1)
            },
            0,
            now,
        );
        // h2 was never sent to h0: its "corrupt" report is ignored.
        let liar = Ask {
            failed: Some(h(0)),
            corrupt: true,
            ..ask(2)
        };
        let got = s.ask(&h(2), liar, 0, now);
        assert!(matches!(got, Source::Peer(..)), "{got:?}");
        assert!(!s.members[&h(0)].corrupt, "a lie excluded h0");
        // About its own source, it counts.
        let Source::Peer(mine, _) = got else { panic!() };
        let honest = Ask {
            failed: Some(mine.clone()),
            corrupt: true,
            ..ask(2)
        };
        s.ask(&h(2), honest, 0, now);
        assert!(s.members[&mine].corrupt);
    }

    #[test]
    fn a_done_host_serves_for_the_time_it_said_and_a_host_asking_again_is_not_done() {
        let now = Instant::now();
        let mut s = Swarm::new(SwarmConfig::default(), now);
        let for_a_minute = Ask {
            done: true,
            serve_for: Some(Duration::from_secs(60)),
            ..ask(0)
        };
        s.ask(&h(0), for_a_minute, 0, now);
        assert_eq!(s.ask(&h(1), ask(1), 0, now), Source::Peer(h(0), addr(0)));
        // A minute on, h0 serves no more.
        let later = now + Duration::from_secs(61);
        match s.ask(&h(2), ask(2), 0, later) {
            Source::Peer(p, _) => assert_ne!(p, h(0)),
            other => assert_eq!(other, Source::Coordinator),
        }
        assert_eq!(s.done(), 1);
        // h0 lost its copy and asks again: it is not done any more.
        s.ask(&h(0), ask(0), 0, later);
        assert_eq!(s.done(), 0);
    }

    #[test]
    fn hosts_asking_again_and_again_leave_no_pile_of_leases() {
        let now = Instant::now();
        let mut s = Swarm::new(SwarmConfig::default(), now);
        for _ in 0..10_000 {
            s.ask(&h(0), ask(0), 0, now);
            s.ask(&h(1), ask(1), 0, now);
        }
        assert!(
            s.leases.len() <= 2 * s.members.len() + 64,
            "{}",
            s.leases.len()
        );
    }

    #[test]
    fn swarms_are_bounded() {
        let now = Instant::now();
        let mut all = Swarms::new(SwarmConfig::default());
        for d in 0..(MAX_SWARMS + 10) {
            all.ask(&format!("sha256:{d}"), &h(0), Ask::default(), 0, now);
        }
        assert_eq!(all.swarms.len(), MAX_SWARMS);
        // Those in use stay; once idle a while, the oldest makes room.
        assert!(
            !all.swarms
                .contains_key(&format!("sha256:{}", MAX_SWARMS + 5))
        );
        let later = now + SWARM_BUSY;
        all.ask("sha256:new", &h(0), Ask::default(), 0, later);
        assert_eq!(all.swarms.len(), MAX_SWARMS);
        assert!(all.swarms.contains_key("sha256:new"));
        all.ask("x", &h(0), Ask::default(), 0, later + SWARM_IDLE);
        assert_eq!(all.swarms.len(), 1);
    }
}
