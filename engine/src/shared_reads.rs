//! One read of a chunk for every site it goes to.
//!
//! Sites seeded with the same version take the same chunks in the same order, a few
//! milliseconds apart. Without this, every site's streams read each chunk from its pack into
//! a buffer of their own, and quinn keeps that buffer until the site acknowledges it: the
//! engine held a send window of private copies per site (≈ 16 MiB per site at an 8 MiB
//! window, `docs/BENCHMARKS.md`). Here the first read of a chunk is kept in a small
//! weighted cache and the others get the same [`bytes::Bytes`]: quinn's send buffers of
//! every site point at one allocation, and the pack is read once.
//!
//! Concurrent reads of one chunk wait for the first ([`quick_cache::sync::Cache::get_or_insert_with`]),
//! so sites in step never read twice. Content-addressed chunks never change, so nothing is
//! invalidated: a chunk collected from the store while still cached is still correct bytes,
//! and lookups of what the store *holds* ([`ChunkSource::info`]) go to the store itself.

use std::fmt;
use std::sync::Arc;

use quick_cache::Weighter;
use quick_cache::sync::Cache;
use seedcast_core::ChunkId;
use seedcast_core::chunk::CompressedChunk;
use seedcast_core::source::{ChunkInfo, ChunkSource, SourceError};

#[derive(Clone, Copy, Debug)]
struct StoredBytes;

impl Weighter<ChunkId, CompressedChunk> for StoredBytes {
    fn weight(&self, _: &ChunkId, c: &CompressedChunk) -> u64 {
        // Never zero: a zero-weight entry would never be evicted.
        c.payload.len() as u64 + 64
    }
}

/// A [`ChunkSource`] that keeps the most recently read chunks, up to a byte budget, for the
/// next site that asks.
pub struct SharedReads {
    inner: Arc<dyn ChunkSource>,
    cache: Cache<ChunkId, CompressedChunk, StoredBytes>,
}

impl fmt::Debug for SharedReads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedReads")
            .field("chunks", &self.cache.len())
            .field("bytes", &self.cache.weight())
            .field("capacity", &self.cache.capacity())
            .finish()
    }
}

impl SharedReads {
    /// Keep up to `budget` bytes of stored chunks (0: pass every read through).
    pub fn new(inner: Arc<dyn ChunkSource>, budget: u64) -> Self {
        // Items are ~64 KiB; the estimate only sizes the table.
        let items = (budget / (64 << 10)).max(16) as usize;
        SharedReads {
            inner,
            cache: Cache::with_weighter(items, budget.max(1), StoredBytes),
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.cache.weight()
    }
}

impl ChunkSource for SharedReads {
    fn info(&self, id: &ChunkId) -> Option<ChunkInfo> {
        self.inner.info(id)
    }

    fn read(&self, id: &ChunkId) -> Result<CompressedChunk, SourceError> {
        self.cache.get_or_insert_with(id, || self.inner.read(id))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use seedcast_core::VerifiedChunk;
    use seedcast_core::source::ChunkStore;

    use super::*;
    use crate::catalog::Catalog;
    use crate::store::PackStore;
    use crate::testutil::noise;

    /// The real pack store, counting the reads that reach it.
    #[derive(Debug)]
    struct Counting {
        packs: PackStore,
        reads: AtomicUsize,
        _dir: tempfile::TempDir,
    }

    impl ChunkSource for Counting {
        fn info(&self, id: &ChunkId) -> Option<ChunkInfo> {
            self.packs.info(id)
        }
        fn read(&self, id: &ChunkId) -> Result<CompressedChunk, SourceError> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.packs.read(id)
        }
    }

    fn store(chunks: &[VerifiedChunk]) -> Arc<Counting> {
        let dir = tempfile::tempdir().unwrap();
        let cat = Arc::new(Catalog::open(&dir.path().join("cat")).unwrap());
        let packs = PackStore::open(&dir.path().join("packs"), cat).unwrap();
        packs.insert(chunks).unwrap();
        Arc::new(Counting {
            packs,
            reads: AtomicUsize::new(0),
            _dir: dir,
        })
    }

    fn chunks(n: u64) -> Vec<VerifiedChunk> {
        (0..n)
            .map(|i| VerifiedChunk::compress(Bytes::from(noise(i, 64 << 10)), 3))
            .collect()
    }

    #[test]
    fn sites_in_step_share_one_read_and_one_allocation() {
        let chunks = chunks(8);
        let store = store(&chunks);
        let shared = Arc::new(SharedReads::new(store.clone(), 8 << 20));
        // Ten sites on ten threads, each reading every chunk in order, as their streams do.
        let got: Vec<Vec<CompressedChunk>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..10)
                .map(|_| {
                    let shared = shared.clone();
                    let ids: Vec<_> = chunks.iter().map(|c| c.id()).collect();
                    s.spawn(move || ids.iter().map(|id| shared.read(id).unwrap()).collect())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            store.reads.load(Ordering::Relaxed),
            8,
            "each chunk read once"
        );
        for site in &got {
            for (c, want) in site.iter().zip(&chunks) {
                assert_eq!(c, want.stored());
                assert_eq!(
                    c.payload.as_ptr(),
                    got[0][0..]
                        .iter()
                        .find(|g| g.id == c.id)
                        .unwrap()
                        .payload
                        .as_ptr()
                );
            }
        }
        // Without the cache every read is a new buffer: the sharing is this module's doing.
        let a = store.packs.read(&chunks[0].id()).unwrap();
        let b = store.packs.read(&chunks[0].id()).unwrap();
        assert_ne!(a.payload.as_ptr(), b.payload.as_ptr());
    }

    #[test]
    fn the_budget_bounds_what_is_kept_and_misses_are_not_remembered() {
        let chunks = chunks(64);
        let store = store(&chunks);
        let shared = SharedReads::new(store.clone(), 1 << 20);
        for c in &chunks {
            assert_eq!(&shared.read(&c.id()).unwrap(), c.stored());
        }
        assert!(shared.held() <= 1 << 20, "{}", shared.held());
        let late = VerifiedChunk::compress(Bytes::from(noise(1000, 1000)), 3);
        assert!(
            matches!(shared.read(&late.id()), Err(SourceError::Missing(id)) if id == late.id())
        );
        assert!(shared.info(&late.id()).is_none());
        store.packs.insert(std::slice::from_ref(&late)).unwrap();
        assert_eq!(&shared.read(&late.id()).unwrap(), late.stored());
        assert!(shared.info(&late.id()).is_some());
    }
}
