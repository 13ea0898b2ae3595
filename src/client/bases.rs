//! Uploading new chunks as deltas against a file the client already has: the previous
//! version (`adapt --file disk.raw=v2.raw --base v1.raw`).
//!
//! An operator patching from a thin link holds v1 as well as v2. The engine holds v1's
//! chunks; the client cuts v1 as the engine would, asks which of those chunks the engine
//! holds, and indexes them ([`seedcast_core::bases`]). Each batch of new chunks then travels
//! as delta groups whose prefix is base chunks read back from v1 — the engine decodes them
//! against its own copies and verifies every chunk, so a base file that changed since it
//! was cut can only make the upload fail, never store wrong bytes.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use seedcast_core::bases::{BaseBudget, BaseIndex, encode_against};
use seedcast_core::chunker::{Piece, StreamingChunker};
use seedcast_core::protocol::{
    ChunkHeader, DataRecord, GroupHeader, MAX_IDS_PER_REQUEST, Request, Response,
};
use seedcast_core::sender::{SendConfig, plan_groups};
use seedcast_core::{ChunkId, ChunkerConfig, CompressedChunk};

use super::{Client, ClientError};

/// Base chunks one group names at most, and their bytes (the engine's own choice for
/// what it sends to sites; well inside what it accepts).
const BUDGET: BaseBudget = BaseBudget {
    chunks: 96,
    bytes: 12 << 20,
};

/// Where one base chunk lies.
#[derive(Debug, Clone, Copy)]
struct At {
    file: usize,
    offset: u64,
    len: u32,
}

/// The client's base files: their chunks the engine holds, indexed for similarity.
#[derive(Debug)]
pub struct BaseFiles {
    paths: Vec<PathBuf>,
    files: Vec<std::fs::File>,
    at: HashMap<ChunkId, At>,
    index: BaseIndex,
    /// Base chunks the engine holds: the only ones a group may name.
    held: HashSet<ChunkId>,
}

/// One record of an upload, ready to go.
pub(crate) enum Outgoing {
    Chunk(CompressedChunk),
    Group(GroupHeader, Bytes),
}

impl Outgoing {
    pub fn record(&self) -> DataRecord {
        match self {
            Outgoing::Chunk(c) => DataRecord::Chunk(ChunkHeader::of(c)),
            Outgoing::Group(h, _) => DataRecord::Group(h.clone()),
        }
    }

    pub fn payload(&self) -> &Bytes {
        match self {
            Outgoing::Chunk(c) => &c.payload,
            Outgoing::Group(_, p) => p,
        }
    }
}

impl BaseFiles {
    /// Cut and index `paths` (raw files: a qcow2 base would need its guest view read at
    /// random offsets, which qemu's export does not give), keep the chunks the engine holds.
    pub async fn open(client: &Client, paths: Vec<PathBuf>) -> Result<Self, ClientError> {
        let cfg = client.chunking;
        let mut b = tokio::task::spawn_blocking(move || Self::cut(paths, cfg))
            .await
            .map_err(|e| ClientError::Internal(e.to_string()))??;
        let ids: Vec<ChunkId> = b.at.keys().copied().collect();
        let mut missing = HashSet::new();
        for part in ids.chunks(MAX_IDS_PER_REQUEST) {
            match client
                .request(&Request::Missing {
                    chunks: part.to_vec(),
                })
                .await?
            {
                Response::Missing { chunks } => missing.extend(chunks),
                r => return Err(ClientError::Unexpected(format!("{r:?}"))),
            }
        }
        b.held = ids.into_iter().filter(|id| !missing.contains(id)).collect();
        Ok(b)
    }

    fn cut(paths: Vec<PathBuf>, cfg: ChunkerConfig) -> Result<Self, ClientError> {
        let mut b = BaseFiles {
            paths: paths.clone(),
            files: Vec::new(),
            at: HashMap::new(),
            index: BaseIndex::default(),
            held: HashSet::new(),
        };
        for (n, path) in paths.iter().enumerate() {
            let fail = |source| ClientError::File {
                path: path.clone(),
                source,
            };
            if seedcast_qemu::is_qcow2(path)? {
                return Err(ClientError::Usage(format!(
                    "{}: a --base must be a raw file (convert it: qemu-img convert -O raw)",
                    path.display()
                )));
            }
            let file = std::fs::File::open(path).map_err(fail)?;
            let reader =
                std::io::BufReader::with_capacity(1 << 20, file.try_clone().map_err(fail)?);
            let chunker = StreamingChunker::new(reader, cfg)
                .map_err(|e| ClientError::Usage(e.to_string()))?;
            for piece in chunker {
                let (offset, piece) = piece.map_err(fail)?;
                if let Piece::Data(raw) = piece {
                    let id = ChunkId::of(&raw);
                    b.index.add(id, offset, &raw);
                    b.at.entry(id).or_insert(At {
                        file: n,
                        offset,
                        len: raw.len() as u32,
                    });
                }
            }
            b.files.push(file);
        }
        Ok(b)
    }

    /// Base chunks the engine holds.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// A held base chunk's bytes, read back from its file and checked against its id (the
    /// file may have changed since it was cut).
    fn read(&self, id: &ChunkId) -> Option<Bytes> {
        if !self.held.contains(id) {
            return None;
        }
        let at = self.at.get(id)?;
        let mut buf = vec![0u8; at.len as usize];
        self.files[at.file]
            .read_exact_at(&mut buf, at.offset)
            .ok()?;
        if ChunkId::of(&buf) != *id {
            tracing::warn!(
                "{} changed since it was read: base chunk {id} left out",
                self.paths[at.file].display()
            );
            return None;
        }
        Some(Bytes::from(buf))
    }

    /// Encode new chunks (raw bytes with their file offsets, in file order) as delta groups
    /// at `delta_level` against the bases; a group that would not be smaller than its
    /// chunks as zstd at `level` goes as those chunks. Runs on the calling thread.
    pub(crate) fn encode(
        &self,
        chunks: &[(ChunkId, Bytes, u64)],
        level: i32,
        delta_level: i32,
    ) -> Result<Vec<Outgoing>, ClientError> {
        let by_id: HashMap<ChunkId, (u32, u64)> = chunks
            .iter()
            .map(|(id, raw, off)| (*id, (raw.len() as u32, *off)))
            .collect();
        let raws: HashMap<ChunkId, &Bytes> = chunks.iter().map(|(id, r, _)| (*id, r)).collect();
        let need: Vec<ChunkId> = chunks.iter().map(|(id, _, _)| *id).collect();
        let mut out = Vec::new();
        for group in plan_groups(&need, &by_id, &SendConfig::default()) {
            let parts: Vec<(&[u8], u64)> = group
                .iter()
                .map(|(id, off)| (&raws[id][..], *off))
                .collect();
            let g = encode_against(&self.index, &parts, |id| self.read(id), BUDGET, delta_level)
                .map_err(|e| ClientError::Internal(format!("delta encoding: {e}")))?;
            // A group that does not beat the raw bytes (new, incompressible content) goes as
            // plain chunks: the engine then stores them as they come.
            let raw_len: usize = parts.iter().map(|(r, _)| r.len()).sum();
            if g.payload.len() + 36 * group.len() >= raw_len {
                out.extend(group.iter().map(|(id, _)| {
                    Outgoing::Chunk(CompressedChunk::compress(*id, raws[id], level))
                }));
                continue;
            }
            let header = GroupHeader {
                chunks: group
                    .iter()
                    .map(|(id, _)| (*id, raws[id].len() as u32))
                    .collect(),
                base: g.base,
                payload_len: g.payload.len() as u32,
            };
            out.push(Outgoing::Group(header, Bytes::from(g.payload)));
        }
        Ok(out)
    }
}

/// Shared by the upload's batches.
pub type Bases = Arc<BaseFiles>;
