//! Helpers shared by the engine's unit tests.

use seedcast_core::chunker::chunk_all;
use seedcast_core::manifest::{FileEntry, MANIFEST_FORMAT, RecipeBuilder};
use seedcast_core::source::{ChunkStore, MemChunks};
use seedcast_core::{ChunkerConfig, GlobalId, Manifest, VerifiedChunk};

/// `n` deterministic pseudo-random bytes.
pub(crate) fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut v);
    v
}

/// `data` cut with the default chunking, its chunks put in `store` (zstd 3): the file.
pub(crate) fn stored_file(store: &MemChunks, path: &str, data: &[u8]) -> FileEntry {
    let mut rb = RecipeBuilder::new();
    for p in chunk_all(data, ChunkerConfig::default()).unwrap() {
        if let Some((_, b)) = rb.push(p) {
            store.insert(&[VerifiedChunk::compress(b, 3)]).unwrap();
        }
    }
    FileEntry {
        path: path.into(),
        mode: 0o644,
        recipe: rb.finish(),
        format: seedcast_core::manifest::FileFormat::Raw,
    }
}

/// Version 1 of an image of one file, `disk.raw`, holding `data` (chunks in `store`).
pub(crate) fn stored_manifest(store: &MemChunks, data: &[u8]) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT,
        global_id: GlobalId([3; 12]),
        version: 1,
        parent: None,
        name: "t".into(),
        chunking: ChunkerConfig::default(),
        files: vec![stored_file(store, "disk.raw", data)],
    }
}
