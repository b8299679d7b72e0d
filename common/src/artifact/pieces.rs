//! Piece hashes: the payload cut into pieces of one size, each with its
//! SHA-256 in the signed manifest, so that a download from a source nobody
//! trusts (another agent) is checked piece by piece as it arrives, and a
//! bad source is caught at its first bad piece rather than at the end.

use super::*;

/// The smallest piece, and the unit piece sizes are rounded up to.
pub const PIECE_UNIT: u64 = 1 << 20;

/// The piece size of payloads up to `MAX_PIECES × DEFAULT_PIECE` bytes.
pub const DEFAULT_PIECE: u64 = 4 << 20;

/// The most pieces a manifest lists (keeping it within
/// [`MAX_MANIFEST_BYTES`](super::MAX_MANIFEST_BYTES)): bigger payloads get
/// bigger pieces.
pub const MAX_PIECES: u64 = 512;

/// The largest piece: a payload of 512 GiB.
pub const MAX_PIECE: u64 = 1 << 30;

/// The piece size `pack` uses for a payload of `size` bytes:
/// [`DEFAULT_PIECE`], or the least multiple of [`PIECE_UNIT`] that keeps
/// the count at [`MAX_PIECES`].
pub fn piece_size_for(size: u64) -> u64 {
    let needed = size.div_ceil(MAX_PIECES);
    needed
        .div_ceil(PIECE_UNIT)
        .saturating_mul(PIECE_UNIT)
        .clamp(DEFAULT_PIECE, MAX_PIECE)
}

/// How many pieces of `piece_size` a payload of `size` bytes has.
pub fn piece_count(size: u64, piece_size: u64) -> u64 {
    if piece_size == 0 {
        return 0;
    }
    size.div_ceil(piece_size)
}

/// The hex SHA-256 of each `piece_size` piece of what `reader` yields.
pub fn hash_pieces(mut reader: impl Read, piece_size: u64) -> io::Result<Vec<String>> {
    let mut pieces = Vec::new();
    let mut buf = vec![0u8; COPY_BUFFER_BYTES * 16];
    let mut context = digest::Context::new(&digest::SHA256);
    let mut filled = 0u64;
    loop {
        let want = usize::try_from(piece_size - filled)
            .unwrap_or(buf.len())
            .min(buf.len());
        let n = reader.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        context.update(&buf[..n]);
        filled += n as u64;
        if filled == piece_size {
            let done = std::mem::replace(&mut context, digest::Context::new(&digest::SHA256));
            pieces.push(crate::hex::encode(done.finish().as_ref()));
            filled = 0;
        }
    }
    if filled > 0 {
        pieces.push(crate::hex::encode(context.finish().as_ref()));
    }
    Ok(pieces)
}

impl Manifest {
    /// Whether the manifest carries piece hashes (artifacts packed before
    /// they existed do not, and are fetched from the coordinator only).
    pub fn has_pieces(&self) -> bool {
        self.piece_size > 0
    }

    /// The byte range of piece `index`.
    pub fn piece_range(&self, index: u64) -> std::ops::Range<u64> {
        let start = index.saturating_mul(self.piece_size).min(self.size);
        start..start.saturating_add(self.piece_size).min(self.size)
    }

    /// Checks `piece_size` and `pieces` against the size: both absent, or
    /// a size within bounds and exactly one well-formed hash per piece.
    pub(super) fn validate_pieces(&self) -> Result<(), ArtifactError> {
        let bad = |reason: String| Err(ArtifactError::BadManifest { reason });
        if self.piece_size == 0 {
            if !self.pieces.is_empty() {
                return bad("pieces are listed without a piece_size".into());
            }
            return Ok(());
        }
        if !(PIECE_UNIT..=MAX_PIECE).contains(&self.piece_size) {
            return bad(format!(
                "piece_size {} is outside {PIECE_UNIT}..={MAX_PIECE}",
                self.piece_size
            ));
        }
        let count = piece_count(self.size, self.piece_size);
        if count > MAX_PIECES {
            return bad(format!(
                "{count} pieces of {} bytes, above the limit of {MAX_PIECES}",
                self.piece_size
            ));
        }
        if self.pieces.len() as u64 != count {
            return bad(format!(
                "{} piece hashes for {count} pieces of {} bytes",
                self.pieces.len(),
                self.piece_size
            ));
        }
        if let Some((i, p)) = self
            .pieces
            .iter()
            .enumerate()
            .find(|(_, p)| !crate::hex::is_lower(p, 64))
        {
            return bad(format!(
                "piece {i}'s hash {:?} is not 64 lowercase hex digits",
                shorten(p)
            ));
        }
        Ok(())
    }
}

/// A piece that does not match its hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("piece {index} (bytes {start}..{end}) does not match its signed hash")]
pub struct BadPiece {
    /// The piece's index.
    pub index: u64,
    /// Its first byte.
    pub start: u64,
    /// The byte after its last.
    pub end: u64,
}

/// Checks a payload's pieces as its bytes stream past, from a piece
/// boundary on.
#[derive(Clone)]
pub struct PieceChecker {
    piece_size: u64,
    size: u64,
    pieces: std::sync::Arc<[[u8; 32]]>,
    /// The offset fed up to.
    offset: u64,
    context: digest::Context,
}

impl std::fmt::Debug for PieceChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceChecker")
            .field("piece_size", &self.piece_size)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl PieceChecker {
    /// A checker for `m`'s pieces starting at `offset`, which is rounded
    /// down to its piece; `None` when `m` has no pieces.
    pub fn new(m: &Manifest, offset: u64) -> Option<Self> {
        if !m.has_pieces() {
            return None;
        }
        let pieces = m
            .pieces
            .iter()
            .map(|p| {
                let mut out = [0u8; 32];
                for (i, byte) in out.iter_mut().enumerate() {
                    *byte = u8::from_str_radix(p.get(i * 2..i * 2 + 2)?, 16).ok()?;
                }
                Some(out)
            })
            .collect::<Option<std::sync::Arc<[_]>>>()?;
        Some(Self {
            piece_size: m.piece_size,
            size: m.size,
            pieces,
            offset: Self::boundary(m.piece_size, offset.min(m.size)),
            context: digest::Context::new(&digest::SHA256),
        })
    }

    fn boundary(piece_size: u64, offset: u64) -> u64 {
        offset / piece_size * piece_size
    }

    /// The piece boundary at or below `offset`: where a resumed download
    /// starts.
    pub fn start(&self) -> u64 {
        self.offset
    }

    /// The offset the bytes fed so far reach.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The first byte of the piece being fed: everything before it is
    /// checked.
    pub fn checked(&self) -> u64 {
        if self.offset >= self.size {
            // The last piece, which may be short, is complete.
            return self.size;
        }
        Self::boundary(self.piece_size, self.offset)
    }

    /// Feeds the next bytes. Returns the checked offset after them (it
    /// moves at piece boundaries), or the first piece that did not match.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<u64, BadPiece> {
        while !data.is_empty() {
            let index = self.offset / self.piece_size;
            let end = (index + 1).saturating_mul(self.piece_size).min(self.size);
            let take = usize::try_from(end.saturating_sub(self.offset))
                .unwrap_or(usize::MAX)
                .min(data.len());
            if take == 0 {
                // Past the end: the caller checks lengths, this only hashes.
                break;
            }
            self.context.update(&data[..take]);
            self.offset += take as u64;
            data = &data[take..];
            if self.offset == end {
                let done =
                    std::mem::replace(&mut self.context, digest::Context::new(&digest::SHA256));
                let expected = usize::try_from(index).ok().and_then(|i| self.pieces.get(i));
                if expected.map(|e| e.as_slice()) != Some(done.finish().as_ref()) {
                    let start = index * self.piece_size;
                    // Back to the start of the bad piece.
                    self.offset = start;
                    return Err(BadPiece { index, start, end });
                }
            }
        }
        Ok(self.checked())
    }

    /// Forgets the piece being fed: the next bytes start it again.
    pub fn rewind(&mut self) {
        self.offset = self.checked();
        self.context = digest::Context::new(&digest::SHA256);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(payload: &[u8], piece_size: u64) -> Manifest {
        Manifest {
            name: "api".into(),
            kind: ArtifactKind::Service,
            version: "1.0.0".into(),
            payload_sha256: crate::hex::sha256_hex(payload),
            size: payload.len() as u64,
            created: String::new(),
            key_id: String::new(),
            expires: None,
            piece_size,
            pieces: hash_pieces(payload, piece_size).unwrap(),
        }
    }

    #[test]
    fn piece_sizes_keep_the_count_bounded() {
        assert_eq!(piece_size_for(0), DEFAULT_PIECE);
        assert_eq!(piece_size_for(200 << 20), DEFAULT_PIECE);
        assert_eq!(piece_size_for(MAX_PIECES * DEFAULT_PIECE), DEFAULT_PIECE);
        let bigger = piece_size_for(MAX_PIECES * DEFAULT_PIECE + 1);
        assert_eq!(bigger, DEFAULT_PIECE + PIECE_UNIT);
        for size in [1u64, 10 << 30, 100 << 30, 512 << 30] {
            let p = piece_size_for(size);
            assert!(piece_count(size, p) <= MAX_PIECES, "{size}");
            assert_eq!(p % PIECE_UNIT, 0);
        }
        assert_eq!(piece_size_for(u64::MAX), MAX_PIECE);
    }

    #[test]
    fn pieces_are_checked_as_they_stream_and_a_bad_one_is_named() {
        let payload: Vec<u8> = (0..(PIECE_UNIT * 5 / 2)).map(|i| (i % 251) as u8).collect();
        let m = manifest(&payload, PIECE_UNIT);
        assert_eq!(m.pieces.len(), 3);
        m.validate_pieces().unwrap();
        // Fed in odd sizes: the checked offset moves at boundaries only.
        let mut c = PieceChecker::new(&m, 0).unwrap();
        let mut checked = vec![];
        for chunk in payload.chunks(300_001) {
            checked.push(c.feed(chunk).unwrap());
        }
        assert_eq!(*checked.last().unwrap(), m.size);
        assert!(checked.iter().all(|o| *o % PIECE_UNIT == 0 || *o == m.size));

        // One flipped byte in the second piece: caught there, offset back
        // at its start.
        let mut bad = payload.clone();
        bad[PIECE_UNIT as usize + 7] ^= 1;
        let mut c = PieceChecker::new(&m, 0).unwrap();
        let err = c.feed(&bad).unwrap_err();
        assert_eq!(
            err,
            BadPiece {
                index: 1,
                start: PIECE_UNIT,
                end: 2 * PIECE_UNIT
            }
        );
        assert_eq!(c.checked(), PIECE_UNIT);
        // Resumed from there with good bytes, it finishes.
        assert_eq!(c.feed(&payload[PIECE_UNIT as usize..]).unwrap(), m.size);

        // A resume mid-piece starts at the piece.
        let c = PieceChecker::new(&m, PIECE_UNIT + 5).unwrap();
        assert_eq!(c.start(), PIECE_UNIT);
    }

    #[test]
    fn malformed_piece_lists_are_refused() {
        let payload = vec![7u8; (PIECE_UNIT * 2) as usize];
        let good = manifest(&payload, PIECE_UNIT);
        let cases: Vec<(Manifest, &str)> = vec![
            (
                Manifest {
                    piece_size: 0,
                    ..good.clone()
                },
                "without a piece_size",
            ),
            (
                Manifest {
                    piece_size: 1000,
                    ..good.clone()
                },
                "outside",
            ),
            (
                Manifest {
                    pieces: good.pieces[..1].to_vec(),
                    ..good.clone()
                },
                "1 piece hashes for 2 pieces",
            ),
            (
                Manifest {
                    pieces: vec![good.pieces[0].clone(), "ZZ".repeat(32)],
                    ..good.clone()
                },
                "piece 1's hash",
            ),
            (
                Manifest {
                    size: PIECE_UNIT * (MAX_PIECES + 1),
                    pieces: vec!["0".repeat(64); (MAX_PIECES + 1) as usize],
                    ..good.clone()
                },
                "above the limit",
            ),
        ];
        for (m, want) in cases {
            let err = m.validate_pieces().unwrap_err().to_string();
            assert!(err.contains(want), "{err} should say {want}");
        }
    }
}
