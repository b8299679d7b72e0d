//! Conversions between `SystemTime`, protobuf timestamps and durations, and
//! RFC 3339 text.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The wire timestamp (re-exported for crates that use it only here).
pub use prost_types::Timestamp;

/// Converts a wall-clock time to a protobuf timestamp.
pub fn to_timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Converts a protobuf timestamp to a wall-clock time; times before the
/// epoch or with invalid nanos are `None`.
pub fn from_timestamp(t: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// Converts a duration to a protobuf duration.
pub fn to_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Converts a protobuf duration to a duration; negative ones are `None`.
pub fn from_duration(d: &prost_types::Duration) -> Option<Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    Some(Duration::new(secs, nanos))
}

/// Formats a time as RFC 3339 in UTC with second precision
/// (`2026-11-26T07:00:00Z`), the form every `--json` output uses.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t.min(last_formattable())).to_string()
}

/// The last instant RFC 3339 can write (9999-12-31T23:59:59Z): later times
/// (a saturated deadline, a hostile timestamp) are written as it rather
/// than failing to format.
fn last_formattable() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(253_402_300_799)
}

/// Formats a time as RFC 3339 in UTC with millisecond precision
/// (`2026-11-26T07:00:00.250Z`), for timestamps whose order matters within
/// a second (a rollout's hosts).
pub fn rfc3339_millis(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t.min(last_formattable())).to_string()
}

/// Milliseconds since the Unix epoch, the form timestamps take in the store.
pub fn unix_millis(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// The inverse of [`unix_millis`].
pub fn from_unix_millis(ms: u64) -> SystemTime {
    later(UNIX_EPOCH, Duration::from_millis(ms))
}

/// The latest time Baton's arithmetic produces: about 34,800 years after
/// the epoch, beyond any deadline and well within what `SystemTime`,
/// protobuf timestamps and the store hold.
pub fn far_future() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1 << 40)
}

/// `t + d`, or [`far_future`] when that would overflow or pass it: a
/// deadline computed from any input never panics.
pub fn later(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_add(d)
        .filter(|at| *at <= far_future())
        .unwrap_or_else(far_future)
}

/// Parses a humantime duration (`500ms`, `2s`, `5m`) that must lie within
/// `min..=max`. Errors quote a short prefix of the text and name the bound.
pub fn parse_bounded(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration {}: {e}", crate::text::quote(text)))?;
    if d < min {
        return Err(if min <= Duration::from_nanos(1) {
            "must be longer than zero".to_owned()
        } else {
            format!(
                "{} is shorter than the minimum of {}",
                humantime::format_duration(d),
                humantime::format_duration(min)
            )
        });
    }
    if d > max {
        return Err(format!(
            "{} is longer than the maximum of {}",
            crate::text::shorten(&humantime::format_duration(d).to_string()),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// Says whether something may be logged now: at most once per `every`.
/// Lets a flood of refusals be logged at warn level once a second and at
/// debug level otherwise, so that nobody outside can fill the log.
#[derive(Debug, Default)]
pub struct Throttle {
    last_ms: std::sync::atomic::AtomicU64,
}

impl Throttle {
    /// A throttle that allows the first call.
    pub const fn new() -> Self {
        Self {
            last_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether `every` has passed since the last allowed call.
    pub fn allow(&self, every: std::time::Duration) -> bool {
        use std::sync::atomic::Ordering;
        let now = unix_millis(std::time::SystemTime::now()).max(1);
        let every = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < every {
            return false;
        }
        self.last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        let t = UNIX_EPOCH + Duration::new(1_800_000_000, 123_000_000);
        assert_eq!(from_timestamp(&to_timestamp(t)), Some(t));
        assert_eq!(from_unix_millis(unix_millis(t)), t);
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(86_400)),
            "1970-01-02T00:00:00Z"
        );
    }

    #[test]
    fn arithmetic_saturates_and_bounds_are_enforced() {
        let now = SystemTime::now();
        assert_eq!(later(now, Duration::MAX), far_future());
        assert_eq!(later(far_future(), Duration::from_secs(1)), far_future());
        assert_eq!(
            later(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert_eq!(from_unix_millis(u64::MAX), far_future());
        assert_eq!(rfc3339(far_future()), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339_millis(far_future()), "9999-12-31T23:59:59.000Z");
        let (min, max) = (Duration::from_millis(1), Duration::from_secs(3600));
        assert_eq!(parse_bounded("2s", min, max), Ok(Duration::from_secs(2)));
        assert_eq!(
            parse_bounded("0s", min, max).unwrap_err(),
            "0s is shorter than the minimum of 1ms"
        );
        assert_eq!(
            parse_bounded("0s", Duration::from_nanos(1), max).unwrap_err(),
            "must be longer than zero"
        );
        assert!(
            parse_bounded("300000000000y", min, max)
                .unwrap_err()
                .contains("longer than the maximum of 1h")
        );
        let junk = "9".repeat(100_000);
        let err = parse_bounded(&junk, min, max).unwrap_err();
        assert!(err.len() < 300, "{err}");
    }

    #[test]
    fn invalid_protobuf_times_are_rejected() {
        let bad = prost_types::Timestamp {
            seconds: 1,
            nanos: -1,
        };
        assert_eq!(from_timestamp(&bad), None);
        let negative = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert_eq!(from_duration(&negative), None);
    }

    #[test]
    fn a_throttle_allows_once_per_period() {
        let t = Throttle::new();
        assert!(t.allow(std::time::Duration::from_secs(3600)));
        assert!(!t.allow(std::time::Duration::from_secs(3600)));
        assert!(t.allow(std::time::Duration::ZERO));
    }
}
