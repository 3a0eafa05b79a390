//! The check of an etcd snapshot file: etcd's Snapshot stream ends with a
//! 32-byte SHA-256 of everything before it, and the database itself is a
//! whole number of 512-byte pages, so a complete file has
//! `size % 512 == 32` and `sha256(body) == trailer`.
//!
//! [`TrailerCheck`] verifies while the bytes stream by (holding back the last
//! 32 bytes), so a snapshot of any size is checked without reading it twice.

use sha2::{Digest, Sha256};

/// The trailer length.
pub const TRAILER: usize = 32;

/// Why a snapshot is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// Too short to hold a trailer, or not pages plus a trailer.
    #[error("snapshot is {size} bytes; a complete one is 512-byte pages plus a 32-byte trailer")]
    BadSize {
        /// The size.
        size: u64,
    },
    /// The trailer does not match the body.
    #[error("snapshot checksum mismatch: trailer {trailer}, body hashes to {body}")]
    Mismatch {
        /// The trailer, hex.
        trailer: String,
        /// The body's hash, hex.
        body: String,
    },
}

/// Verifies a snapshot as it streams.
#[derive(Default)]
pub struct TrailerCheck {
    body: Sha256,
    whole: Sha256,
    tail: Vec<u8>,
    size: u64,
}

/// A verified snapshot's digests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The file size.
    pub size: u64,
    /// SHA-256 of the whole file, hex (what `sha256sum` prints).
    pub file_sha256: String,
}

impl TrailerCheck {
    /// Feeds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        self.whole.update(bytes);
        self.tail.extend_from_slice(bytes);
        if self.tail.len() > TRAILER {
            let spill = self.tail.len() - TRAILER;
            self.body.update(&self.tail[..spill]);
            self.tail.drain(..spill);
        }
    }

    /// Checks the size and the trailer.
    pub fn finish(self) -> Result<Verified, SnapshotError> {
        if self.size < TRAILER as u64 || self.size % 512 != TRAILER as u64 {
            return Err(SnapshotError::BadSize { size: self.size });
        }
        let body = hex::encode(self.body.finalize());
        let trailer = hex::encode(&self.tail);
        if body != trailer {
            return Err(SnapshotError::Mismatch { trailer, body });
        }
        Ok(Verified {
            size: self.size,
            file_sha256: hex::encode(self.whole.finalize()),
        })
    }
}

/// Verifies a whole snapshot held in memory.
pub fn verify(bytes: &[u8]) -> Result<Verified, SnapshotError> {
    let mut check = TrailerCheck::default();
    check.update(bytes);
    check.finish()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn snapshot(pages: usize, fill: u8) -> Vec<u8> {
        let mut body = vec![fill; pages * 512];
        let trailer = Sha256::digest(&body);
        body.extend_from_slice(&trailer);
        body
    }

    #[test]
    fn accepts_valid_and_refuses_damaged_snapshots() {
        let good = snapshot(3, 7);
        let v = verify(&good).unwrap();
        assert_eq!(v.size, 3 * 512 + 32);
        assert_eq!(v.file_sha256, hex::encode(Sha256::digest(&good)));
        let mut flipped = good.clone();
        flipped[100] ^= 1;
        assert!(matches!(
            verify(&flipped),
            Err(SnapshotError::Mismatch { .. })
        ));
        assert!(matches!(
            verify(&good[..good.len() - 1]),
            Err(SnapshotError::BadSize { .. })
        ));
        assert!(matches!(verify(&[]), Err(SnapshotError::BadSize { .. })));
    }

    proptest! {
        #[test]
        fn chunking_does_not_matter(pages in 1usize..6, cuts in prop::collection::vec(0usize..4000, 0..8)) {
            let good = snapshot(pages, 3);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % good.len()).collect();
            cuts.sort();
            let mut check = TrailerCheck::default();
            let mut at = 0;
            for c in cuts.into_iter().chain([good.len()]) {
                check.update(&good[at..c.max(at)]);
                at = c.max(at);
            }
            prop_assert_eq!(check.finish().map(|v| v.size), Ok(good.len() as u64));
        }
    }
}
