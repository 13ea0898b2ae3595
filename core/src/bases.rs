//! Finding the base chunks a new chunk resembles, and encoding a group of new chunks as one
//! zstd delta against them — the same on both legs of an update: the engine sending to a
//! site that holds an earlier version, and a client uploading to an engine that holds one.
//!
//! Bases are found two ways:
//! - **blocks**: disk images are filesystems, and files stay block-aligned when a
//!   filesystem is rebuilt or patched, so every 4 KiB block of a new chunk (aligned to its
//!   file offset) is looked up among the base chunks' aligned blocks; the chunks holding
//!   matches join the base;
//! - **sketches**: chunks sharing a super-feature with a new chunk ([`crate::delta::sketch`])
//!   catch similar content that is not block-aligned.
//!
//! Which chunks may be bases, and where their bytes come from, is the caller's: the engine
//! indexes a site's held versions from its store, a client the base file it names.

use std::collections::HashMap;

use bytes::Bytes;

use crate::ChunkId;
use crate::delta::{DeltaError, encode_group, sketch};

/// Alignment of the blocks matched between new and base chunks: a filesystem's block.
pub const BLOCK: u64 = 4096;

fn block_key(b: &[u8]) -> u64 {
    u64::from_le_bytes(blake3::hash(b).as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The first whole aligned block of a chunk at `offset` of its file.
fn first_block(offset: u64) -> usize {
    ((BLOCK - offset % BLOCK) % BLOCK) as usize
}

/// What a base chunk is indexed by: its aligned blocks' keys and its super-features. The
/// costly part of indexing (hashing every block, the sketch), computed apart from the
/// index so that many chunks' keys are computed in parallel.
#[derive(Debug, Clone)]
pub struct Keys {
    len: u32,
    blocks: Vec<u64>,
    features: Option<[u64; crate::delta::SUPER_FEATURES]>,
}

impl Keys {
    pub fn of(offset: u64, raw: &[u8]) -> Keys {
        let mut blocks = Vec::with_capacity(raw.len() / BLOCK as usize);
        let mut b = first_block(offset);
        while b + BLOCK as usize <= raw.len() {
            blocks.push(block_key(&raw[b..b + BLOCK as usize]));
            b += BLOCK as usize;
        }
        Keys {
            len: raw.len() as u32,
            blocks,
            features: sketch(raw).map(|s| s.0),
        }
    }
}

/// Base chunks, indexed by aligned block and by super-feature.
///
/// The tables name a chunk by its position in `chunks` (4 bytes) rather than by its id
/// (32): an index holds an entry per 4 KiB block of its images, and with ids the engine's
/// index of a 2.4 GiB image took ~40 MiB.
#[derive(Debug, Default)]
pub struct BaseIndex {
    /// Indexed chunks and their lengths, in the order indexed.
    chunks: Vec<(ChunkId, u32)>,
    positions: HashMap<ChunkId, u32>,
    blocks: HashMap<u64, u32>,
    features: HashMap<u64, u32>,
}

impl BaseIndex {
    /// Index one base chunk (its raw bytes, first used at `offset` of its file). A chunk
    /// already indexed is left as it is.
    pub fn add(&mut self, id: ChunkId, offset: u64, raw: &[u8]) {
        if !self.positions.contains_key(&id) {
            self.insert(id, Keys::of(offset, raw));
        }
    }

    /// Index one base chunk from its [`Keys`] (computed on another thread). A chunk
    /// already indexed is left as it is, and so is any past 2^32 of them.
    pub fn insert(&mut self, id: ChunkId, keys: Keys) {
        if self.positions.contains_key(&id) {
            return;
        }
        let Ok(at) = u32::try_from(self.chunks.len()) else {
            return;
        };
        self.chunks.push((id, keys.len));
        self.positions.insert(id, at);
        for sf in keys.features.into_iter().flatten() {
            self.features.entry(sf).or_insert(at);
        }
        for b in keys.blocks {
            self.blocks.entry(b).or_insert(at);
        }
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.positions.contains_key(id)
    }

    /// An indexed chunk's length.
    fn len_of(&self, id: &ChunkId) -> Option<u32> {
        self.positions.get(id).map(|&at| self.chunks[at as usize].1)
    }

    /// Memory the index holds (its tables' capacity), so that whoever keeps indexes can
    /// bound them by bytes.
    pub fn heap_bytes(&self) -> usize {
        let id = std::mem::size_of::<ChunkId>();
        // Key, value and hashbrown's control byte per slot.
        (self.blocks.capacity() + self.features.capacity()) * (8 + 4 + 1)
            + self.positions.capacity() * (id + 4 + 1)
            + self.chunks.capacity() * (id + 4)
    }

    /// Base chunks indexed.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Base chunks resembling `raw` (first used at `offset` of its file), best first,
    /// appended to `out` unless already there.
    pub fn candidates(&self, raw: &[u8], offset: u64, out: &mut Vec<ChunkId>) {
        let mut b = first_block(offset);
        while b + BLOCK as usize <= raw.len() {
            if let Some(&at) = self.blocks.get(&block_key(&raw[b..b + BLOCK as usize])) {
                let id = self.chunks[at as usize].0;
                if !out.contains(&id) {
                    out.push(id);
                }
            }
            b += BLOCK as usize;
        }
        if let Some(s) = sketch(raw) {
            for sf in s.0 {
                if let Some(&at) = self.features.get(&sf) {
                    let id = self.chunks[at as usize].0;
                    if !out.contains(&id) {
                        out.push(id);
                    }
                }
            }
        }
    }
}

/// How much base one group may use: the receiver holds it all in memory while decoding.
#[derive(Clone, Copy, Debug)]
pub struct BaseBudget {
    pub chunks: usize,
    pub bytes: usize,
}

/// One group encoded: the zstd frame and the base chunks its prefix is made of, in order.
#[derive(Debug)]
pub struct GroupDelta {
    pub payload: Vec<u8>,
    pub base: Vec<ChunkId>,
}

/// Encode `parts` (new chunks' raw bytes, each with its file offset) as one zstd frame at
/// `level`, with every resembling base chunk (best first, within `budget`) as its prefix.
/// `read_base` gives a base chunk's raw bytes, checked against its id; one it cannot give
/// (damaged or gone since it was indexed) is left out of this group.
pub fn encode_against(
    index: &BaseIndex,
    parts: &[(&[u8], u64)],
    mut read_base: impl FnMut(&ChunkId) -> Option<Bytes>,
    budget: BaseBudget,
    level: i32,
) -> Result<GroupDelta, DeltaError> {
    let mut cands = Vec::new();
    for (raw, off) in parts {
        index.candidates(raw, *off, &mut cands);
    }
    let mut prefix = Vec::new();
    let mut base = Vec::new();
    for id in cands {
        let len = index.len_of(&id).unwrap_or(0) as usize;
        if base.len() >= budget.chunks || prefix.len() + len > budget.bytes {
            break;
        }
        let Some(raw) = read_base(&id) else {
            continue;
        };
        prefix.extend_from_slice(&raw);
        base.push(id);
    }
    let raws: Vec<&[u8]> = parts.iter().map(|(r, _)| *r).collect();
    let payload = encode_group(&prefix, &raws, level)?;
    Ok(GroupDelta { payload, base })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::decode_group;

    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut out);
        out
    }

    #[test]
    fn aligned_blocks_and_sketches_find_the_chunk_a_change_was_made_to() {
        let raw = noise(1, 64 << 10);
        let id = ChunkId::of(&raw);
        let off = 4096 * 10 + 100;
        let mut ix = BaseIndex::default();
        ix.add(id, off, &raw);
        assert!(ix.contains(&id) && ix.len() == 1);
        // One block rewritten in place: the other aligned blocks still match this chunk.
        let mut edited = raw.clone();
        let b = first_block(off);
        edited[b..b + 100].fill(0xaa);
        let mut cands = Vec::new();
        ix.candidates(&edited, off, &mut cands);
        assert_eq!(cands, vec![id]);
        // Bytes inserted at the front: nothing aligns any more, the sketch still finds it.
        let mut shifted = vec![7u8; 333];
        shifted.extend_from_slice(&raw[..raw.len() - 333]);
        let mut cands = Vec::new();
        ix.candidates(&shifted, off, &mut cands);
        assert!(cands.contains(&id), "sketch match");
        // Unrelated bytes find nothing.
        let mut cands = Vec::new();
        ix.candidates(&noise(9, 65536), 0, &mut cands);
        assert!(cands.is_empty(), "{cands:?}");
    }

    #[test]
    fn a_group_decodes_from_the_bases_it_names_within_its_budget() {
        let bases: Vec<Vec<u8>> = (0..4).map(|i| noise(10 + i, 32 << 10)).collect();
        let mut ix = BaseIndex::default();
        for (i, b) in bases.iter().enumerate() {
            ix.add(ChunkId::of(b), (i as u64) * (32 << 10), b);
        }
        let find = |id: &ChunkId| {
            bases
                .iter()
                .find(|b| ChunkId::of(b) == *id)
                .map(|b| Bytes::from(b.clone()))
        };
        let mut news = bases.clone();
        for n in &mut news {
            n[5000..5040].fill(3);
        }
        let parts: Vec<(&[u8], u64)> = news
            .iter()
            .enumerate()
            .map(|(i, n)| (&n[..], (i as u64) * (32 << 10)))
            .collect();
        let budget = BaseBudget {
            chunks: 2,
            bytes: 1 << 20,
        };
        let g = encode_against(&ix, &parts, find, budget, 19).unwrap();
        assert_eq!(g.base.len(), 2, "the budget bounds the base");
        let prefix: Vec<u8> = g.base.iter().flat_map(|id| find(id).unwrap()).collect();
        let lens: Vec<u32> = news.iter().map(|n| n.len() as u32).collect();
        let out = decode_group(&prefix, &g.payload, &lens).unwrap();
        for (o, n) in out.iter().zip(&news) {
            assert_eq!(&o[..], &n[..]);
        }
        // Two of four chunks had their base: the payload holds about the other two.
        assert!(g.payload.len() < 3 * (32 << 10), "{}", g.payload.len());
        // A base that cannot be read is left out, not fatal.
        let g = encode_against(&ix, &parts, |_| None, budget, 3).unwrap();
        assert!(g.base.is_empty());
    }
}
