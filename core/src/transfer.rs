//! The agent's side of one transfer, as a state machine without I/O.
//!
//! `Transfer::new` takes a manifest and a "do I hold this chunk?" predicate and yields the
//! chunks to ask for (the `chunks` of the agent's `NeedFrom`); each chunk header that arrives
//! is checked against what was asked for ([`Transfer::admit`]) before any byte of its
//! payload is read, and each verified chunk is ticked off ([`Transfer::complete_chunk`]).
//! When nothing is missing the transfer is ready to assemble. The async agent drives it;
//! tests drive it directly. The engine's side is [`crate::sender`].

use std::collections::{HashMap, HashSet};

use crate::id::ChunkId;
use crate::manifest::{Manifest, ManifestError};
use crate::protocol::{ChunkHeader, GroupHeader};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransferError {
    #[error("transfer {transfer}: chunk {id} was not asked for (or arrived twice)")]
    Unexpected { transfer: u64, id: ChunkId },
    #[error(
        "transfer {transfer}: chunk {id} declares {declared} bytes, the manifest says {expected}"
    )]
    LengthMismatch {
        transfer: u64,
        id: ChunkId,
        declared: u32,
        expected: u32,
    },
    #[error("transfer {transfer}: chunk {id} payload of {len} bytes exceeds the limit")]
    PayloadTooLarge {
        transfer: u64,
        id: ChunkId,
        len: u32,
    },
    #[error("no transfer {0} in progress")]
    NoTransfer(u64),
    #[error("transfer {transfer}: delta group empty or over its limits")]
    BadGroup { transfer: u64 },
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
}

#[derive(Debug)]
pub struct Transfer {
    id: u64,
    manifest: Manifest,
    /// Needed chunks in first-use order (the order they are asked for).
    need: Vec<ChunkId>,
    /// Still missing, with the length the manifest gives them.
    missing: HashMap<ChunkId, u32>,
    /// Admitted (header seen) but not yet stored: refuses a second copy in flight.
    in_flight: HashSet<ChunkId>,
    bytes_received: u64,
}

impl Transfer {
    pub fn new(
        id: u64,
        manifest: Manifest,
        limits: &crate::manifest::Limits,
        mut have: impl FnMut(&ChunkId) -> bool,
    ) -> Result<Self, TransferError> {
        manifest.validate_within(limits)?;
        let mut need = Vec::new();
        let mut missing = HashMap::new();
        let mut seen = HashSet::new();
        for f in &manifest.files {
            for (_, id, len) in f.recipe.chunks_at() {
                if seen.insert(id) && !have(&id) {
                    need.push(id);
                    missing.insert(id, len);
                }
            }
        }
        Ok(Transfer {
            id,
            manifest,
            need,
            missing,
            in_flight: HashSet::new(),
            bytes_received: 0,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// What to ask the engine for, in first-use order.
    pub fn need(&self) -> &[ChunkId] {
        &self.need
    }

    /// Check a chunk header before reading its payload.
    pub fn admit(&mut self, h: &ChunkHeader) -> Result<(), TransferError> {
        self.check(&h.id, h.raw_len)?;
        if h.payload_len > ChunkHeader::MAX_PAYLOAD {
            return Err(TransferError::PayloadTooLarge {
                transfer: self.id,
                id: h.id,
                len: h.payload_len,
            });
        }
        self.in_flight.insert(h.id);
        Ok(())
    }

    /// Check a delta group's header before reading its payload: every chunk asked for,
    /// with its length, none twice, within the limits.
    pub fn admit_group(&mut self, g: &GroupHeader) -> Result<(), TransferError> {
        let too_large = g.raw_len() > GroupHeader::MAX_RAW
            || g.payload_len > GroupHeader::MAX_PAYLOAD
            || g.base.len() > GroupHeader::MAX_BASE
            || g.chunks.is_empty();
        if too_large {
            return Err(TransferError::BadGroup { transfer: self.id });
        }
        let mut seen = HashSet::new();
        for (id, len) in &g.chunks {
            if !seen.insert(*id) {
                return Err(TransferError::Unexpected {
                    transfer: self.id,
                    id: *id,
                });
            }
            self.check(id, *len)?;
        }
        for (id, _) in &g.chunks {
            self.in_flight.insert(*id);
        }
        Ok(())
    }

    fn check(&self, id: &ChunkId, raw_len: u32) -> Result<(), TransferError> {
        let expected = match self.missing.get(id) {
            Some(l) if !self.in_flight.contains(id) => *l,
            _ => {
                return Err(TransferError::Unexpected {
                    transfer: self.id,
                    id: *id,
                });
            }
        };
        if raw_len != expected {
            return Err(TransferError::LengthMismatch {
                transfer: self.id,
                id: *id,
                declared: raw_len,
                expected,
            });
        }
        Ok(())
    }

    /// A chunk admitted earlier failed verification: it may be sent again.
    pub fn reject(&mut self, id: &ChunkId) {
        self.in_flight.remove(id);
    }

    /// A chunk admitted earlier was verified and stored. Returns whether all are here.
    pub fn complete_chunk(&mut self, id: &ChunkId, payload_len: u32) -> bool {
        if self.in_flight.remove(id) && self.missing.remove(id).is_some() {
            self.bytes_received += payload_len as u64;
        }
        self.is_complete()
    }

    pub fn is_complete(&self) -> bool {
        self.missing.is_empty()
    }

    pub fn missing_count(&self) -> usize {
        self.missing.len()
    }

    /// Chunk payload bytes received so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    pub fn into_manifest(self) -> Manifest {
        self.manifest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::Encoding;
    use crate::chunker::{ChunkerConfig, chunk_all};
    use crate::id::GlobalId;
    use crate::manifest::{FileEntry, MANIFEST_FORMAT, RecipeBuilder};
    use crate::protocol::GroupHeader;

    fn manifest(data: &[u8]) -> Manifest {
        let mut b = RecipeBuilder::new();
        for p in chunk_all(data, ChunkerConfig::default()).unwrap() {
            b.push(p);
        }
        let recipe = b.finish();
        Manifest {
            format: MANIFEST_FORMAT,
            global_id: GlobalId([2; 12]),
            version: 1,
            parent: None,
            name: "t".into(),
            chunking: ChunkerConfig::default(),
            files: vec![
                FileEntry {
                    path: "a".into(),
                    mode: 0o644,
                    recipe: recipe.clone(),
                    format: crate::manifest::FileFormat::Raw,
                },
                FileEntry {
                    path: "b".into(),
                    mode: 0o644,
                    recipe,
                    format: crate::manifest::FileFormat::Raw,
                },
            ],
        }
    }

    fn header(id: ChunkId, raw_len: u32) -> ChunkHeader {
        ChunkHeader {
            id,
            raw_len,
            encoding: Encoding::Raw,
            payload_len: raw_len,
        }
    }

    #[test]
    fn needs_each_missing_chunk_once_and_completes() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let m = manifest(&data);
        let chunks = m.chunks();
        let held = *chunks.keys().next().unwrap();
        let mut t = Transfer::new(9, m, &Default::default(), |id| *id == held).unwrap();
        assert_eq!(t.need().len(), chunks.len() - 1);
        assert!(!t.need().contains(&held));
        let need = t.need().to_vec();
        for id in &need {
            let len = chunks[id];
            // Wrong length refused; then right length admitted; a duplicate refused.
            assert!(t.admit(&header(*id, len + 1)).is_err());
            t.admit(&header(*id, len)).unwrap();
            assert!(matches!(
                t.admit(&header(*id, len)),
                Err(TransferError::Unexpected { .. })
            ));
            t.complete_chunk(id, len);
        }
        assert!(t.is_complete());
        // Anything more is unexpected.
        assert!(t.admit(&header(held, chunks[&held])).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// A random engine against the agent's side: records for chunks asked for or not,
        /// twice, with wrong lengths, oversized, as groups with repeats; completions and
        /// rejections in any order. Never a panic; a chunk is admitted only while missing
        /// and not in flight; received bytes count each chunk once.
        #[test]
        fn random_records_never_panic_or_double_count(
            ops in proptest::collection::vec(
                (0u8..5, proptest::collection::vec(0usize..64, 1..5), proptest::prelude::any::<u32>()),
                1..80,
            ),
        ) {
            let data: Vec<u8> = (0..600_000u32).map(|i| (i * 31 % 251) as u8).collect();
            let m = manifest(&data);
            let lens: HashMap<ChunkId, u32> = m.files[0]
                .recipe
                .chunks_at()
                .map(|(_, id, len)| (id, len))
                .collect();
            let ids: Vec<ChunkId> = lens.keys().copied().collect();
            let mut t = Transfer::new(1, m, &crate::manifest::Limits::default(), |_| false).unwrap();
            let pick = |i: usize| -> ChunkId {
                // Indexes past the manifest's chunks are chunks it does not name.
                ids.get(i).copied().unwrap_or_else(|| ChunkId::of(&i.to_le_bytes()))
            };
            let mut completed = std::collections::HashSet::new();
            let mut expected = 0u64;
            for (op, which, x) in ops {
                let id = pick(which[0]);
                let len = lens.get(&id).copied().unwrap_or(100);
                match op {
                    0 => {
                        let wrong = if x % 3 == 0 { x } else { len };
                        let mut h = header(id, wrong);
                        h.payload_len = if x % 7 == 0 { x } else { wrong };
                        let _ = t.admit(&h);
                    }
                    1 => {
                        let g = GroupHeader {
                            chunks: which.iter().map(|i| {
                                let id = pick(*i);
                                (id, lens.get(&id).copied().unwrap_or(x))
                            }).collect(),
                            base: vec![],
                            payload_len: x % (32 << 20),
                        };
                        let _ = t.admit_group(&g);
                    }
                    2 => {
                        let was_in_flight = t.in_flight.contains(&id);
                        let was_missing = t.missing.contains_key(&id);
                        t.complete_chunk(&id, 10);
                        if was_in_flight && was_missing && completed.insert(id) {
                            expected += 10;
                        }
                    }
                    3 => t.reject(&id),
                    _ => {
                        let _ = t.is_complete();
                    }
                }
                proptest::prop_assert_eq!(t.bytes_received(), expected);
                proptest::prop_assert!(t.missing_count() + completed.len() == lens.len());
            }
        }
    }
}
