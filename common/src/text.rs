//! Untrusted text in messages: errors, logs and statuses quote at most a
//! short prefix of what a client sent, so a hostile megabyte never reaches
//! a log line, an audit entry or a `grpc-message` header whole.

/// Characters of untrusted input an error message quotes.
pub const QUOTE_CHARS: usize = 80;

/// At most `max` characters of `text`, with `…` when cut (always on a
/// character boundary).
pub fn prefix(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// At most `max` bytes of `text` (cut on a character boundary), with `…`
/// when cut: for headers, whose limits count bytes.
pub fn prefix_bytes(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &text[..cut])
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
        let now = crate::time::unix_millis(std::time::SystemTime::now()).max(1);
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

/// `text` for an error message: its first [`QUOTE_CHARS`] characters.
pub fn shorten(text: &str) -> String {
    prefix(text, QUOTE_CHARS)
}

/// `text` quoted for an error message, shortened first (`"abc…"`).
pub fn quote(text: &str) -> String {
    format!("{:?}", shorten(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        assert_eq!(prefix("abc", 3), "abc");
        assert_eq!(prefix("abcd", 3), "abc…");
        assert_eq!(prefix("ééé", 2), "éé…");
        assert_eq!(
            shorten(&"x".repeat(1 << 20)).chars().count(),
            QUOTE_CHARS + 1
        );
        assert_eq!(quote("a\0b"), "\"a\\0b\"");
        assert_eq!(prefix_bytes("aé", 2), "a…");
        assert_eq!(prefix_bytes("aé", 3), "aé");
        assert!(prefix_bytes(&"é".repeat(10_000), 2_000).len() <= 2_003);
    }

    #[test]
    fn a_throttle_allows_once_per_period() {
        let t = Throttle::new();
        assert!(t.allow(std::time::Duration::from_secs(3600)));
        assert!(!t.allow(std::time::Duration::from_secs(3600)));
        assert!(t.allow(std::time::Duration::ZERO));
    }
}
