//! Sending an update as deltas: which base chunks a site holds that resemble what it needs,
//! and the encoded delta groups, computed once and shared by every site that needs them.
//!
//! For a site that already holds a version of the image, the chunks it lacks are sent in
//! *groups* (consecutive needed chunks, up to [`GROUP_RAW`] bytes) compressed as one zstd
//! frame at [`crate::EngineConfig::delta_level`], with a prefix made of base chunks the site
//! holds. Bases are found two ways, both pointing at chunks of the site's held version:
//! - **blocks**: disk images are filesystems, and files stay block-aligned when a
//!   filesystem is rebuilt or patched, so every 4 KiB block of a needed chunk (aligned to
//!   its file offset) is looked up among the held version's aligned blocks; the chunks
//!   holding matches join the base;
//! - **sketches**: chunks sharing a super-feature with a needed chunk ([`seedcast_core::delta`])
//!   catch similar content that is not block-aligned.
//!
//! A group that would not be smaller than its chunks' stored forms is sent as those.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use seedcast_core::delta::{encode_group, sketch};
use seedcast_core::protocol::{GroupHeader, HeldVersion};
use seedcast_core::{ChunkId, Extent, Manifest, UnverifiedChunk};
use tokio::sync::OnceCell;

use crate::{EngineError, Shared};

/// Raw bytes one group covers at most (about 32 chunks of 64 KiB).
pub const GROUP_RAW: u64 = 2 << 20;
/// Chunks one group covers at most.
pub const GROUP_CHUNKS: usize = 32;
/// Base chunks one group names at most.
pub const MAX_BASE_CHUNKS: usize = 96;
/// Base bytes one group uses at most (agents accept up to `GroupHeader::MAX_BASE_BYTES`).
pub const MAX_BASE_BYTES: usize = 12 << 20;
const BLOCK: u64 = 4096;
/// Encoded groups kept for other sites (bytes of payload).
const MEMO_BYTES: usize = 512 << 20;

/// Read a stored chunk and decode it to its raw bytes (verified against its id).
pub(crate) fn read_raw(shared: &Shared, id: &ChunkId) -> Result<Bytes, EngineError> {
    let c = shared
        .store
        .read(id)?
        .ok_or_else(|| EngineError::Internal(format!("chunk {id} is not in the store")))?;
    let v = UnverifiedChunk(c)
        .verify(seedcast_core::ChunkerConfig::MAX_CHUNK)
        .map_err(|e| EngineError::Internal(format!("stored chunk {id} is damaged: {e}")))?;
    Ok(v.raw().clone())
}

fn block_key(b: &[u8]) -> u64 {
    u64::from_le_bytes(blake3::hash(b).as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Each distinct data chunk of a manifest with the file offset of its first use.
pub(crate) fn first_offsets(m: &Manifest) -> HashMap<ChunkId, u64> {
    let mut out = HashMap::new();
    for f in &m.files {
        let mut off = 0u64;
        for e in &f.recipe.extents {
            if let Extent::Data { id, .. } = e {
                out.entry(*id).or_insert(off);
            }
            off += e.len();
        }
    }
    out
}

/// The site's base chunks, indexed by aligned block and by super-feature.
#[derive(Debug, Default)]
pub(crate) struct BaseIndex {
    blocks: HashMap<u64, ChunkId>,
    features: HashMap<u64, ChunkId>,
    lens: HashMap<ChunkId, u32>,
}

impl BaseIndex {
    /// Index every available chunk of `held` (the versions the site can serve bases from).
    fn build(
        shared: &Shared,
        held: &[HeldVersion],
        unavailable: &HashSet<ChunkId>,
    ) -> Result<Self, EngineError> {
        let mut ix = BaseIndex::default();
        for h in held {
            let Some(m) = shared.catalog.manifest(&h.global_id, h.version)? else {
                continue;
            };
            for f in &m.manifest.files {
                let mut off = 0u64;
                for e in &f.recipe.extents {
                    if let Extent::Data { id, len } = e
                        && !unavailable.contains(id)
                        && !ix.lens.contains_key(id)
                    {
                        let raw = read_raw(shared, id)?;
                        ix.lens.insert(*id, *len);
                        if let Some(s) = sketch(&raw) {
                            for sf in s.0 {
                                ix.features.entry(sf).or_insert(*id);
                            }
                        }
                        let mut b = ((BLOCK - off % BLOCK) % BLOCK) as usize;
                        while b + BLOCK as usize <= raw.len() {
                            ix.blocks
                                .entry(block_key(&raw[b..b + BLOCK as usize]))
                                .or_insert(*id);
                            b += BLOCK as usize;
                        }
                    }
                    off += e.len();
                }
            }
        }
        Ok(ix)
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Base chunks resembling `raw` (first used at `offset` of its file), best first.
    fn candidates(&self, raw: &[u8], offset: u64, out: &mut Vec<ChunkId>) {
        let mut b = ((BLOCK - offset % BLOCK) % BLOCK) as usize;
        while b + BLOCK as usize <= raw.len() {
            if let Some(id) = self.blocks.get(&block_key(&raw[b..b + BLOCK as usize]))
                && !out.contains(id)
            {
                out.push(*id);
            }
            b += BLOCK as usize;
        }
        if let Some(s) = sketch(raw) {
            for sf in s.0 {
                if let Some(id) = self.features.get(&sf)
                    && !out.contains(id)
                {
                    out.push(*id);
                }
            }
        }
    }
}

/// How one group goes on the wire.
#[derive(Debug)]
pub(crate) enum Encoded {
    Group {
        header: GroupHeader,
        payload: Bytes,
    },
    /// Not worth a delta: send these chunks in their stored form.
    Stored(Vec<ChunkId>),
}

type Slot<T> = Arc<OnceCell<Arc<T>>>;

/// (base manifest id, new manifest id).
type ManifestPair = ([u8; 32], [u8; 32]);

/// Encoded groups by key, oldest first for eviction, and their total size.
#[derive(Debug, Default)]
struct GroupMemo {
    map: HashMap<[u8; 32], Slot<Encoded>>,
    order: VecDeque<([u8; 32], usize)>,
    bytes: usize,
}

/// Base indexes and encoded groups, shared by concurrent deployments to many sites.
#[derive(Debug, Default)]
pub(crate) struct DeltaCache {
    indexes: Mutex<VecDeque<([u8; 32], Slot<BaseIndex>)>>,
    /// Manifest deltas by (base manifest id, new manifest id): one per version pair, not
    /// one per site.
    manifests: Mutex<VecDeque<(ManifestPair, Arc<Vec<u8>>)>>,
    groups: Mutex<GroupMemo>,
}

pub(crate) fn bases_key(held: &[HeldVersion], unavailable: &[ChunkId]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for v in held {
        h.update(v.global_id.as_bytes());
        h.update(&v.version.to_le_bytes());
    }
    let mut u: Vec<_> = unavailable.to_vec();
    u.sort();
    for id in u {
        h.update(id.as_bytes());
    }
    *h.finalize().as_bytes()
}

impl DeltaCache {
    /// The delta of `target` against `base`, computed once for every site holding `base`.
    pub fn manifest_delta(
        &self,
        base: &crate::catalog::ManifestRecord,
        target: &crate::catalog::ManifestRecord,
    ) -> Option<Arc<Vec<u8>>> {
        let key = (base.manifest_id, target.manifest_id);
        if let Some((_, d)) = self
            .manifests
            .lock()
            .expect("manifest cache lock")
            .iter()
            .find(|(k, _)| *k == key)
        {
            return Some(d.clone());
        }
        let d = Arc::new(target.manifest.delta_against(&base.manifest).ok()?);
        let mut m = self.manifests.lock().expect("manifest cache lock");
        m.push_back((key, d.clone()));
        if m.len() > 8 {
            m.pop_front();
        }
        Some(d)
    }

    /// The base index for this set of held versions, built once.
    pub async fn index(
        &self,
        shared: &Arc<Shared>,
        key: [u8; 32],
        held: Vec<HeldVersion>,
        unavailable: Vec<ChunkId>,
    ) -> Result<Arc<BaseIndex>, EngineError> {
        let slot = {
            let mut ix = self.indexes.lock().expect("index cache lock");
            match ix.iter().find(|(k, _)| *k == key) {
                Some((_, s)) => s.clone(),
                None => {
                    let s: Slot<BaseIndex> = Arc::new(OnceCell::new());
                    ix.push_back((key, s.clone()));
                    if ix.len() > 4 {
                        ix.pop_front();
                    }
                    s
                }
            }
        };
        let shared = shared.clone();
        slot.get_or_try_init(|| async move {
            tokio::task::spawn_blocking(move || {
                let unavailable: HashSet<ChunkId> = unavailable.into_iter().collect();
                BaseIndex::build(&shared, &held, &unavailable).map(Arc::new)
            })
            .await
            .map_err(|e| EngineError::Internal(format!("base index task: {e}")))?
        })
        .await
        .cloned()
    }

    /// The encoding of one group, computed once for every site with the same bases.
    pub async fn group(
        &self,
        shared: &Arc<Shared>,
        index: Arc<BaseIndex>,
        bases: [u8; 32],
        chunks: Vec<(ChunkId, u64)>,
    ) -> Result<Arc<Encoded>, EngineError> {
        let mut k = blake3::Hasher::new();
        k.update(&bases);
        k.update(&shared.cfg.delta_level.to_le_bytes());
        for (id, _) in &chunks {
            k.update(id.as_bytes());
        }
        let key = *k.finalize().as_bytes();
        let slot = {
            let mut g = self.groups.lock().expect("group cache lock");
            g.map
                .entry(key)
                .or_insert_with(|| Arc::new(OnceCell::new()))
                .clone()
        };
        let sh = shared.clone();
        let enc = slot
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || encode(&sh, &index, &chunks).map(Arc::new))
                    .await
                    .map_err(|e| EngineError::Internal(format!("delta task: {e}")))?
            })
            .await?
            .clone();
        let size = match &*enc {
            Encoded::Group { payload, .. } => payload.len(),
            Encoded::Stored(ids) => 32 * ids.len(),
        };
        let mut g = self.groups.lock().expect("group cache lock");
        if !g.order.iter().any(|(k2, _)| *k2 == key) {
            g.order.push_back((key, size));
            g.bytes += size;
            while g.bytes > MEMO_BYTES {
                let Some((old, n)) = g.order.pop_front() else {
                    break;
                };
                g.map.remove(&old);
                g.bytes -= n;
            }
        }
        Ok(enc)
    }
}

/// Encode one group: its chunks' raw bytes, with every resembling base chunk as prefix.
fn encode(
    shared: &Shared,
    index: &BaseIndex,
    chunks: &[(ChunkId, u64)],
) -> Result<Encoded, EngineError> {
    let mut raws = Vec::with_capacity(chunks.len());
    let mut cands = Vec::new();
    let mut stored = 0u64;
    for (id, off) in chunks {
        let raw = read_raw(shared, id)?;
        index.candidates(&raw, *off, &mut cands);
        stored += shared
            .store
            .record(id)
            .map(|r| r.stored_len as u64)
            .unwrap_or(0);
        raws.push(raw);
    }
    let mut base = Vec::new();
    let mut base_ids = Vec::new();
    for id in cands {
        let len = index.lens.get(&id).copied().unwrap_or(0) as usize;
        if base_ids.len() >= MAX_BASE_CHUNKS || base.len() + len > MAX_BASE_BYTES {
            break;
        }
        base.extend_from_slice(&read_raw(shared, &id)?);
        base_ids.push(id);
    }
    let parts: Vec<&[u8]> = raws.iter().map(|r| &r[..]).collect();
    let payload = encode_group(&base, &parts, shared.cfg.delta_level)
        .map_err(|e| EngineError::Internal(format!("delta encoding: {e}")))?;
    // A group header costs ~36 bytes a chunk and ~33 a base chunk; a stored chunk ~40.
    let group_cost = payload.len() as u64 + 36 * chunks.len() as u64 + 33 * base_ids.len() as u64;
    let stored_cost = stored + 40 * chunks.len() as u64;
    if group_cost >= stored_cost {
        return Ok(Encoded::Stored(chunks.iter().map(|(id, _)| *id).collect()));
    }
    Ok(Encoded::Group {
        header: GroupHeader {
            chunks: chunks
                .iter()
                .zip(&raws)
                .map(|((id, _), r)| (*id, r.len() as u32))
                .collect(),
            base: base_ids,
            payload_len: payload.len() as u32,
        },
        payload: Bytes::from(payload),
    })
}

/// Split the needed chunks (in the order asked) into groups.
pub(crate) fn plan_groups(
    need: &[ChunkId],
    offsets: &HashMap<ChunkId, u64>,
    lens: &HashMap<ChunkId, u32>,
) -> Vec<Vec<(ChunkId, u64)>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut raw = 0u64;
    for id in need {
        let len = lens.get(id).copied().unwrap_or(0) as u64;
        if !cur.is_empty() && (raw + len > GROUP_RAW || cur.len() >= GROUP_CHUNKS) {
            out.push(std::mem::take(&mut cur));
            raw = 0;
        }
        cur.push((*id, offsets.get(id).copied().unwrap_or(0)));
        raw += len;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}
