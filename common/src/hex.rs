//! Hex, the one encoding of digests, keys, tokens and stored bytes:
//! lowercase out, either case in (the `hex` crate underneath).

/// Lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// Lowercase hex SHA-256 of `data`: how digests are written everywhere.
pub fn sha256_hex(data: &[u8]) -> String {
    encode(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// Decodes hex (either case); `None` if it is not hex.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    hex::decode(text).ok()
}

/// Whether `text` is exactly `len` lowercase hex digits.
pub fn is_lower(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_hex() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(&encode(&all)), Some(all.clone()));
        assert_eq!(decode(&encode(&all).to_uppercase()), Some(all));
        assert_eq!(encode(&[0x0a, 0xff]), "0aff");
        assert_eq!(decode("abc"), None);
        assert_eq!(decode("zz"), None);
        assert_eq!(decode(""), Some(vec![]));
        assert!(is_lower("0aff", 4));
        assert!(!is_lower("0AFF", 4));
        assert!(!is_lower("0aff", 6));
    }
}
