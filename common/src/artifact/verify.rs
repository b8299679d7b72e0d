//! Streaming verification: the payload hashed as it arrives (or as it is
//! written), and its digest and length compared with the manifest's.

use super::*;

/// Hashes a payload as it streams past and checks it against the manifest.
#[derive(Clone)]
pub struct PayloadHasher {
    context: digest::Context,
    bytes: u64,
}

impl PayloadHasher {
    /// A hasher that has seen nothing.
    pub fn new() -> Self {
        Self {
            context: digest::Context::new(&digest::SHA256),
            bytes: 0,
        }
    }

    /// Feeds the next payload bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.context.update(data);
        self.bytes = self.bytes.saturating_add(data.len() as u64);
    }

    /// How many bytes were fed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The lowercase hex digest of everything fed.
    pub(super) fn hex_digest(self) -> String {
        crate::hex::encode(self.context.finish().as_ref())
    }

    /// Checks the length and digest of everything fed against `manifest`.
    pub fn finish(self, manifest: &Manifest) -> Result<(), ArtifactError> {
        if self.bytes != manifest.size {
            return Err(ArtifactError::SizeMismatch {
                actual: self.bytes,
                expected: manifest.size,
            });
        }
        let actual = self.hex_digest();
        if actual != manifest.payload_sha256 {
            return Err(ArtifactError::DigestMismatch {
                actual,
                expected: manifest.payload_sha256.clone(),
            });
        }
        Ok(())
    }
}

impl Default for PayloadHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for PayloadHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadHasher")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

/// A writer that hashes everything written through it, so `pack` digests
/// the compressed payload in the same pass that writes it.
pub(super) struct HashingWriter<W> {
    pub(super) inner: W,
    pub(super) hasher: PayloadHasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
