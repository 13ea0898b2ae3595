//! Where chunks are kept: the seam between the paths that move chunks and the storage
//! behind them.
//!
//! The engine's send path reads stored chunks through [`ChunkSource`] and its upload path
//! writes through [`ChunkStore`]. Today's implementation is the engine's pack store; an
//! S3-compatible object store (when one engine's disk is not enough) and a relay's cache
//! (a site serving nearby sites) plug in here. [`MemChunks`] keeps chunks in memory, for
//! unit tests.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::fmt;

use crate::chunk::{CompressedChunk, UnverifiedChunk, VerifiedChunk, VerifyError};
use crate::chunker::ChunkerConfig;
use crate::id::ChunkId;

/// What the index knows of a held chunk without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    pub raw_len: u32,
    /// Bytes of its stored (possibly compressed) form: what sending it costs.
    pub stored_len: u32,
}

/// A chunk could not be read or stored.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("chunk {0} is not held here")]
    Missing(ChunkId),
    #[error("chunk {id} is damaged: {source}")]
    Damaged {
        id: ChunkId,
        #[source]
        source: VerifyError,
    },
    /// The storage behind the source failed (a pack file, an object store …).
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
}

impl SourceError {
    pub fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        SourceError::Backend(Box::new(e))
    }
}

/// Chunks in their stored form, by id. Reads are blocking (a positioned file read, an
/// object GET): call them from a blocking thread.
pub trait ChunkSource: Send + Sync + fmt::Debug {
    /// Lengths of a held chunk, from the index (no read).
    fn info(&self, id: &ChunkId) -> Option<ChunkInfo>;

    /// The chunk's stored form, exactly as it travels.
    fn read(&self, id: &ChunkId) -> Result<CompressedChunk, SourceError>;

    fn contains(&self, id: &ChunkId) -> bool {
        self.info(id).is_some()
    }

    /// Read, decode and check the chunk against its id: for work on its raw bytes (delta
    /// encoding, edits). Damage on disk shows up here as [`SourceError::Damaged`].
    fn read_verified(&self, id: &ChunkId) -> Result<VerifiedChunk, SourceError> {
        UnverifiedChunk(self.read(id)?)
            .verify(ChunkerConfig::MAX_CHUNK)
            .map_err(|source| SourceError::Damaged { id: *id, source })
    }
}

/// What an insert added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inserted {
    /// Chunks that were new.
    pub chunks: u32,
    /// Their stored bytes.
    pub bytes: u64,
}

/// A [`ChunkSource`] that also takes new chunks; only verified ones.
pub trait ChunkStore: ChunkSource {
    /// Store the chunks not yet held (each once, however often it appears). Durable when
    /// this returns. Blocking.
    fn insert(&self, chunks: &[VerifiedChunk]) -> Result<Inserted, SourceError>;

    /// Which of `ids` are not held, in the order given.
    fn missing(&self, ids: &[ChunkId]) -> Vec<ChunkId> {
        ids.iter()
            .filter(|id| !self.contains(id))
            .copied()
            .collect()
    }

    /// Chunks held.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Chunks kept in memory: the store unit tests run against.
#[derive(Debug, Default)]
pub struct MemChunks {
    chunks: RwLock<HashMap<ChunkId, CompressedChunk>>,
}

impl MemChunks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replace a held chunk's stored bytes (tests: simulate damage).
    pub fn put_raw(&self, c: CompressedChunk) {
        self.chunks.write().insert(c.id, c);
    }

    /// Forget a chunk (tests: simulate loss).
    pub fn remove(&self, id: &ChunkId) {
        self.chunks.write().remove(id);
    }
}

impl ChunkSource for MemChunks {
    fn info(&self, id: &ChunkId) -> Option<ChunkInfo> {
        self.chunks.read().get(id).map(|c| ChunkInfo {
            raw_len: c.raw_len,
            stored_len: c.payload.len() as u32,
        })
    }

    fn read(&self, id: &ChunkId) -> Result<CompressedChunk, SourceError> {
        self.chunks
            .read()
            .get(id)
            .cloned()
            .ok_or(SourceError::Missing(*id))
    }
}

impl ChunkStore for MemChunks {
    fn insert(&self, chunks: &[VerifiedChunk]) -> Result<Inserted, SourceError> {
        let mut map = self.chunks.write();
        let mut out = Inserted::default();
        for c in chunks {
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry(c.id()) {
                out.chunks += 1;
                out.bytes += c.stored().payload.len() as u64;
                e.insert(c.stored().clone());
            }
        }
        Ok(out)
    }

    fn len(&self) -> usize {
        self.chunks.read().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::Encoding;
    use bytes::Bytes;

    #[test]
    fn memory_store_inserts_once_reads_back_and_reports_damage() {
        let s = MemChunks::new();
        let a = VerifiedChunk::from_raw(Bytes::from(vec![1u8; 5000]));
        let b = VerifiedChunk::from_raw(Bytes::from(vec![2u8; 7000]));
        let added = s.insert(&[a.clone(), b.clone(), a.clone()]).unwrap();
        assert_eq!(added.chunks, 2);
        assert_eq!(s.insert(std::slice::from_ref(&a)).unwrap().chunks, 0);
        assert_eq!(s.len(), 2);
        assert_eq!(s.info(&a.id()).unwrap().raw_len, 5000);
        assert_eq!(s.read_verified(&b.id()).unwrap().raw(), b.raw());
        let absent = ChunkId([9; 32]);
        assert_eq!(s.missing(&[absent, a.id()]), vec![absent]);
        assert!(matches!(s.read(&absent), Err(SourceError::Missing(_))));
        // Damaged bytes are caught by the verifying read, with the chunk named.
        s.put_raw(CompressedChunk {
            id: a.id(),
            raw_len: 5000,
            encoding: Encoding::Raw,
            payload: Bytes::from(vec![3u8; 5000]),
        });
        let e = s.read_verified(&a.id()).unwrap_err();
        assert!(
            matches!(e, SourceError::Damaged { id, .. } if id == a.id()),
            "{e}"
        );
    }
}
