//! Test helpers shared by the modules' unit tests.

use crate::chunker::ChunkerConfig;

/// `n` deterministic pseudo-random bytes.
pub(crate) fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut v);
    v
}

/// Small chunks and holes, so tests see many cuts in little data.
pub(crate) fn small() -> ChunkerConfig {
    ChunkerConfig {
        min: 1024,
        avg: 4096,
        max: 16384,
        hole_block: 512,
        hole_min: 2048,
    }
}
