//! Chunks and their integrity: bytes that arrive from anywhere are an [`UnverifiedChunk`];
//! only [`UnverifiedChunk::verify`] turns them into a [`VerifiedChunk`], and stores and
//! assemblers accept nothing else. A mismatch carries both hashes (as bitar's `chunk.rs`).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::id::ChunkId;

/// How a chunk's bytes are stored and sent.
///
/// Discriminants are fixed: they are persisted in pack files and sent on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Encoding {
    /// The bytes as they are (used when zstd would not make them smaller).
    Raw = 0,
    /// One zstd frame holding the whole chunk.
    Zstd = 1,
}

impl Encoding {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Encoding::Raw),
            1 => Some(Encoding::Zstd),
            _ => None,
        }
    }
}

/// The stored (possibly compressed) form of a chunk, exactly as it travels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompressedChunk {
    pub id: ChunkId,
    pub raw_len: u32,
    pub encoding: Encoding,
    pub payload: Bytes,
}

impl CompressedChunk {
    /// Compress `raw` (already named `id`) with zstd at `level`, keeping the raw bytes
    /// instead when compression does not pay.
    pub fn compress(id: ChunkId, raw: &[u8], level: i32) -> Self {
        let raw_len = raw.len() as u32;
        match crate::zstd_ctx::compress(raw, level) {
            Ok(c) if c.len() < raw.len() => CompressedChunk {
                id,
                raw_len,
                encoding: Encoding::Zstd,
                payload: Bytes::from(c),
            },
            _ => CompressedChunk {
                id,
                raw_len,
                encoding: Encoding::Raw,
                payload: Bytes::copy_from_slice(raw),
            },
        }
    }
}

/// Why a zstd payload did not give its declared bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("zstd payload does not decode: {0}")]
    Zstd(String),
    #[error("decoded to {actual} bytes, declared {declared}")]
    Length { declared: u32, actual: usize },
}

/// The raw bytes of a zstd `payload` declared `raw_len` long: exactly that many, or why
/// not. The declared length bounds the output buffer, so a zstd bomb allocates no more;
/// the caller bounds the declared length. What verification decodes with, and what a
/// site's cache of stored chunks is read back with.
pub fn unzstd(payload: &[u8], raw_len: u32) -> Result<Vec<u8>, PayloadError> {
    let raw = crate::zstd_ctx::decompress(payload, raw_len as usize)
        .map_err(|e| PayloadError::Zstd(e.to_string()))?;
    if raw.len() != raw_len as usize {
        return Err(PayloadError::Length {
            declared: raw_len,
            actual: raw.len(),
        });
    }
    Ok(raw)
}

/// Why a chunk was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("chunk hash mismatch: expected {}, got {}", .0.expected, .0.actual)]
    HashMismatch(HashMismatch),
    #[error("chunk {id}: declared length {declared} exceeds the limit {limit}")]
    TooLarge {
        id: ChunkId,
        declared: u32,
        limit: u32,
    },
    #[error("chunk {id}: decoded to {actual} bytes, declared {declared}")]
    LengthMismatch {
        id: ChunkId,
        declared: u32,
        actual: usize,
    },
    #[error("chunk {id}: zstd payload does not decode: {reason}")]
    Decode { id: ChunkId, reason: String },
}

/// Expected and actual hash of a chunk whose bytes do not match its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("chunk hash mismatch: expected {expected}, got {actual}")]
pub struct HashMismatch {
    pub expected: ChunkId,
    pub actual: ChunkId,
}

/// Bytes claimed to be chunk `id`; nothing accepts them until verified.
#[derive(Debug, Clone)]
pub struct UnverifiedChunk(pub CompressedChunk);

impl UnverifiedChunk {
    /// Decode (bounded by the declared length, itself bounded by `max_raw`), hash, compare.
    ///
    /// The declared length bounds the decompression buffer, so a zstd bomb cannot make
    /// us allocate more than `max_raw` bytes.
    pub fn verify(self, max_raw: u32) -> Result<VerifiedChunk, VerifyError> {
        let c = self.0;
        if c.raw_len > max_raw {
            return Err(VerifyError::TooLarge {
                id: c.id,
                declared: c.raw_len,
                limit: max_raw,
            });
        }
        let raw: Bytes = match c.encoding {
            Encoding::Raw => c.payload.clone(),
            Encoding::Zstd => match unzstd(&c.payload, c.raw_len) {
                Ok(raw) => raw.into(),
                Err(PayloadError::Zstd(reason)) => {
                    return Err(VerifyError::Decode { id: c.id, reason });
                }
                Err(PayloadError::Length { declared, actual }) => {
                    return Err(VerifyError::LengthMismatch {
                        id: c.id,
                        declared,
                        actual,
                    });
                }
            },
        };
        // A raw payload of another length than declared.
        if raw.len() != c.raw_len as usize {
            return Err(VerifyError::LengthMismatch {
                id: c.id,
                declared: c.raw_len,
                actual: raw.len(),
            });
        }
        let actual = ChunkId::of(&raw);
        if actual != c.id {
            return Err(VerifyError::HashMismatch(HashMismatch {
                expected: c.id,
                actual,
            }));
        }
        Ok(VerifiedChunk { stored: c, raw })
    }
}

/// A chunk whose bytes are known to hash to its id: the only kind a store accepts.
///
/// Holds both the raw bytes and the stored form, so whoever verified it never has to
/// decode or re-encode it again.
#[derive(Debug, Clone)]
pub struct VerifiedChunk {
    stored: CompressedChunk,
    raw: Bytes,
}

impl VerifiedChunk {
    /// Name raw bytes by hashing them; verified by construction.
    pub fn from_raw(raw: Bytes) -> Self {
        let id = ChunkId::of(&raw);
        VerifiedChunk {
            stored: CompressedChunk {
                id,
                raw_len: raw.len() as u32,
                encoding: Encoding::Raw,
                payload: raw.clone(),
            },
            raw,
        }
    }

    /// Name raw bytes and compress them for storage (zstd at `level`, kept raw when that
    /// does not pay); verified by construction.
    pub fn compress(raw: Bytes, level: i32) -> Self {
        let id = ChunkId::of(&raw);
        VerifiedChunk {
            stored: CompressedChunk::compress(id, &raw, level),
            raw,
        }
    }

    /// Accept raw bytes claimed to be chunk `expected` (decoded from a delta group, or read
    /// from a published image) if they hash to it.
    pub fn check(expected: ChunkId, raw: Bytes) -> Result<Self, HashMismatch> {
        let v = Self::from_raw(raw);
        if v.id() == expected {
            Ok(v)
        } else {
            Err(HashMismatch {
                expected,
                actual: v.id(),
            })
        }
    }

    pub fn id(&self) -> ChunkId {
        self.stored.id
    }

    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn stored(&self) -> &CompressedChunk {
        &self.stored
    }

    pub fn into_parts(self) -> (CompressedChunk, Bytes) {
        (self.stored, self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_accepts_good_and_names_both_hashes_on_bad() {
        let raw = vec![42u8; 10_000];
        let id = ChunkId::of(&raw);
        let c = CompressedChunk::compress(id, &raw, 3);
        assert_eq!(c.encoding, Encoding::Zstd);
        let v = UnverifiedChunk(c.clone()).verify(1 << 20).unwrap();
        assert_eq!(v.raw().as_ref(), &raw[..]);

        let wrong = ChunkId::of(b"other");
        let err = UnverifiedChunk(CompressedChunk { id: wrong, ..c })
            .verify(1 << 20)
            .unwrap_err();
        match err {
            VerifyError::HashMismatch(m) => {
                assert_eq!(m.expected, wrong);
                assert_eq!(m.actual, id);
            }
            e => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn verify_refuses_oversized_and_lying_lengths() {
        let raw = vec![1u8; 1000];
        let id = ChunkId::of(&raw);
        let c = CompressedChunk::compress(id, &raw, 3);
        let too_big = CompressedChunk {
            raw_len: 5000,
            ..c.clone()
        };
        assert!(matches!(
            UnverifiedChunk(too_big.clone()).verify(2000),
            Err(VerifyError::TooLarge { .. })
        ));
        // Declares more than the payload decodes to.
        assert!(UnverifiedChunk(too_big).verify(1 << 20).is_err());
        // Declares less: the bounded decoder refuses.
        let short = CompressedChunk { raw_len: 10, ..c };
        assert!(UnverifiedChunk(short).verify(1 << 20).is_err());
    }

    #[test]
    fn incompressible_chunks_stay_raw() {
        let raw = crate::testutil::noise(9, 4096);
        let c = CompressedChunk::compress(ChunkId::of(&raw), &raw, 3);
        assert_eq!(c.encoding, Encoding::Raw);
        assert!(UnverifiedChunk(c).verify(8192).is_ok());
    }
}
