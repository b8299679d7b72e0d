//! Capped exponential backoff with jitter, for reconnect loops.
//!
//! Each delay is drawn uniformly from `[ceiling / 2, ceiling]` where the
//! ceiling doubles from `initial` up to `max`. The random half spreads a
//! fleet that lost its coordinator at the same instant, so a restarted
//! coordinator is not hit by every agent in the same millisecond, while the
//! fixed half keeps a single agent from hammering it.

use std::time::Duration;

/// The state of one reconnect loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    ceiling: Duration,
}

impl Backoff {
    /// A backoff that starts at `initial` and never exceeds `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.min(max);
        Self {
            initial,
            max,
            ceiling: initial,
        }
    }

    /// The next delay to wait before retrying; doubles the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(self.max);
        let half = ceiling / 2;
        let jitter_ns = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(fastrand::u64(0..=jitter_ns))
    }

    /// Starts over from `initial`, after a connection that worked.
    pub fn reset(&mut self) {
        self.ceiling = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_under_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..50 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(2), "{d:?} exceeds the cap");
            assert!(
                d >= Duration::from_millis(50),
                "{d:?} is below half the initial delay"
            );
        }
        // After many attempts the ceiling is the cap, so the floor is half of it.
        assert!(b.next_delay() >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
