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
}
