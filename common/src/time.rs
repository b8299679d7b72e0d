//! Conversions between `SystemTime`, protobuf timestamps and durations, and
//! RFC 3339 text.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Formats a time as RFC 3339 in UTC with millisecond precision
/// (`2026-11-26T07:00:00.250Z`), for timestamps whose order matters within
/// a second (a rollout's hosts).
pub fn rfc3339_millis(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Milliseconds since the Unix epoch, the form timestamps take in the store.
pub fn unix_millis(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// The inverse of [`unix_millis`].
pub fn from_unix_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
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
}
