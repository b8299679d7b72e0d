//! Secret tokens (enrollment tokens, dashboard sign-in tokens): one way to
//! make them and one way to store them. A token is a recognisable prefix
//! and 256 random bits in hex; it is stored only by its SHA-256, so a copy
//! of the store signs nobody in.

/// The system's random number generator failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the system's random number generator failed")]
pub struct NoRandomness;

/// A new token: `prefix` and 64 hex digits of fresh randomness.
pub fn new_token(prefix: &str) -> Result<String, NoRandomness> {
    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| NoRandomness)?;
    Ok(format!("{prefix}{}", crate::hex::encode(&secret)))
}

/// What a token is stored and looked up by: the hex of its SHA-256.
pub fn stored_id(token: &str) -> String {
    crate::hex::sha256_hex(token.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_and_stored_by_digest_only() {
        let a = new_token("bt1-").unwrap();
        let b = new_token("bt1-").unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("bt1-") && crate::hex::is_lower(&a[4..], 64));
        assert!(crate::hex::is_lower(&stored_id(&a), 64));
        assert!(!stored_id(&a).contains(&a[4..]));
        assert_eq!(stored_id(&a), stored_id(&a.clone()));
    }
}
