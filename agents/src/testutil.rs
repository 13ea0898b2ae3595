//! Helpers shared by the agent's unit tests.

use seedcast_core::chunker::chunk_all;
use seedcast_core::manifest::{FileEntry, MANIFEST_FORMAT, RecipeBuilder};
use seedcast_core::{ChunkerConfig, GlobalId, Manifest, VerifiedChunk};

/// `n` deterministic pseudo-random bytes named by `label`.
pub(crate) fn noise(label: &str, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    blake3::Hasher::new()
        .update(label.as_bytes())
        .finalize_xof()
        .fill(&mut v);
    v
}

/// Version `version` of image `g` with one file, `disk.raw`, holding `data`; with its
/// chunks in file order.
pub(crate) fn image(g: GlobalId, version: u32, data: &[u8]) -> (Manifest, Vec<VerifiedChunk>) {
    let mut rb = RecipeBuilder::new();
    let mut chunks = Vec::new();
    for p in chunk_all(data, ChunkerConfig::default()).unwrap() {
        if let Some((_, b)) = rb.push(p) {
            chunks.push(VerifiedChunk::from_raw(b));
        }
    }
    let m = Manifest {
        format: MANIFEST_FORMAT,
        global_id: g,
        version,
        parent: None,
        name: "img".into(),
        chunking: ChunkerConfig::default(),
        files: vec![FileEntry {
            path: "disk.raw".into(),
            mode: 0o644,
            recipe: rb.finish(),
            format: seedcast_core::manifest::FileFormat::Raw,
        }],
    };
    (m, chunks)
}
