//! Sending an update as deltas: which base chunks a site holds that resemble what it needs,
//! and the encoded delta groups, computed once and shared by every site that needs them.
//!
//! For a site that already holds a version of the image, the chunks it lacks are sent in
//! *groups* (consecutive needed chunks, as the sender plans them:
//! [`seedcast_core::sender::plan_groups`]) compressed as one zstd
//! frame at [`crate::EngineConfig::delta_level`], with a prefix made of base chunks the site
//! holds, found by aligned blocks and sketches ([`seedcast_core::bases`]).
//!
//! A group that would not be smaller than its chunks' stored forms is sent as those.

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use seedcast_core::bases::{BaseBudget, BaseIndex, Keys, encode_against};
use seedcast_core::protocol::{GroupHeader, HeldVersion};
use seedcast_core::source::{ChunkSource, SourceError};
use seedcast_core::{ChunkId, Manifest};
use tokio::sync::OnceCell;

use crate::EngineError;
use crate::catalog::ManifestRecord;

/// Base chunks one group names at most.
pub const MAX_BASE_CHUNKS: usize = 96;
/// Base bytes one group uses at most (agents accept up to `GroupHeader::MAX_BASE_BYTES`).
pub const MAX_BASE_BYTES: usize = 12 << 20;
/// Encoded groups kept for other sites (bytes of payload).
const MEMO_BYTES: usize = 512 << 20;

/// A stored chunk's raw bytes, checked against its id.
pub(crate) fn read_raw(source: &dyn ChunkSource, id: &ChunkId) -> Result<Bytes, SourceError> {
    Ok(source.read_verified(id)?.raw().clone())
}

/// Index every available chunk of `held` (the manifests of the versions the site can
/// serve bases from), except `unavailable`. A base the engine cannot read (damaged or
/// missing in its store) is left out, not fatal: chunks that would have used it are sent
/// against other bases or whole. The chunks are read and keyed on every core (it is on the
/// path between a site's answer and the first byte of its update), then indexed in order.
pub(crate) fn build_index(
    source: &dyn ChunkSource,
    held: &[Manifest],
    unavailable: &HashSet<ChunkId>,
) -> BaseIndex {
    let mut seen = HashSet::new();
    let mut todo = Vec::new();
    for m in held {
        for f in &m.files {
            for (off, id, _) in f.recipe.chunks_at() {
                if !unavailable.contains(&id) && seen.insert(id) {
                    todo.push((off, id));
                }
            }
        }
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per = todo.len().div_ceil(threads).max(1);
    let keyed: Vec<Vec<(ChunkId, Option<Keys>)>> = std::thread::scope(|s| {
        let parts: Vec<_> = todo
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|(off, id)| match read_raw(source, id) {
                            Ok(raw) => (*id, Some(Keys::of(*off, &raw))),
                            Err(e) => {
                                tracing::warn!("delta base {id} left out: {e}");
                                (*id, None)
                            }
                        })
                        .collect()
                })
            })
            .collect();
        parts
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut ix = BaseIndex::default();
    for (id, keys) in keyed.into_iter().flatten() {
        if let Some(k) = keys {
            ix.insert(id, k);
        }
    }
    ix
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

/// A built index by what it indexes ([`content_key`]).
type ByContent = ([u8; 32], Weak<BaseIndex>);

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
    /// The indexes built, by what they index ([`content_key`]): the same manifests held
    /// under another image's name (a re-push, a copy) share one index instead of reading,
    /// hashing and sketching every chunk again. Weak: eviction from `indexes` frees them.
    by_content: Arc<Mutex<Vec<ByContent>>>,
    /// Manifest deltas by (base manifest id, new manifest id): one per version pair, not
    /// one per site.
    manifests: Mutex<VecDeque<(ManifestPair, Arc<Vec<u8>>)>>,
    groups: Mutex<GroupMemo>,
}

/// Most base indexes kept ...
const INDEXES_KEPT: usize = 4;
/// ... and most bytes of them (the newest is kept whatever its size): an index holds an
/// entry per 4 KiB block of its images (~13 MiB for a 2.4 GiB image).
const INDEXES_BYTES: usize = 96 << 20;

/// Drop the oldest indexes beyond [`INDEXES_KEPT`] or [`INDEXES_BYTES`] (those still being
/// built count as empty; a deployment that holds one keeps its `Arc`).
fn evict_indexes(ix: &mut VecDeque<([u8; 32], Slot<BaseIndex>)>, kept: usize, budget: usize) {
    // An index shared by several keys (see `DeltaCache::by_content`) counts once.
    let bytes = |ix: &VecDeque<([u8; 32], Slot<BaseIndex>)>| -> usize {
        let mut seen = HashSet::new();
        ix.iter()
            .filter_map(|(_, s)| s.get())
            .filter(|i| seen.insert(Arc::as_ptr(i)))
            .map(|i| i.heap_bytes())
            .sum()
    };
    while ix.len() > kept || (ix.len() > 1 && bytes(ix) > budget) {
        ix.pop_front();
    }
}

/// What an index indexes: the held manifests' ids and the chunks left out.
fn content_key(held: &[[u8; 32]], unavailable: &[ChunkId]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"seedcast base index content");
    for id in held {
        h.update(id);
    }
    let mut u: Vec<_> = unavailable.to_vec();
    u.sort();
    for id in u {
        h.update(id.as_bytes());
    }
    *h.finalize().as_bytes()
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
        base: &ManifestRecord,
        target: &ManifestRecord,
    ) -> Option<Arc<Vec<u8>>> {
        let key = (base.manifest_id, target.manifest_id);
        if let Some((_, d)) = self.manifests.lock().iter().find(|(k, _)| *k == key) {
            return Some(d.clone());
        }
        let d = Arc::new(target.manifest.delta_against(&base.manifest).ok()?);
        let mut m = self.manifests.lock();
        m.push_back((key, d.clone()));
        if m.len() > 8 {
            m.pop_front();
        }
        Some(d)
    }

    /// Is the index for `key` built or being built?
    pub fn has_index(&self, key: &[u8; 32]) -> bool {
        self.indexes.lock().iter().any(|(k, _)| k == key)
    }

    /// The base index for this set of held versions, built once: `load` gives their
    /// manifests (called only by the first site that needs the index).
    pub async fn index(
        &self,
        source: Arc<dyn ChunkSource>,
        key: [u8; 32],
        load: impl FnOnce() -> Result<Vec<([u8; 32], Manifest)>, EngineError> + Send + 'static,
        unavailable: Vec<ChunkId>,
    ) -> Result<Arc<BaseIndex>, EngineError> {
        let slot = {
            let mut ix = self.indexes.lock();
            match ix.iter().find(|(k, _)| *k == key) {
                Some((_, s)) => s.clone(),
                None => {
                    let s: Slot<BaseIndex> = Arc::new(OnceCell::new());
                    ix.push_back((key, s.clone()));
                    evict_indexes(&mut ix, INDEXES_KEPT, INDEXES_BYTES);
                    s
                }
            }
        };
        let by_content = self.by_content.clone();
        slot.get_or_try_init(|| async move {
            tokio::task::spawn_blocking(move || {
                let (ids, held): (Vec<_>, Vec<_>) = load()?.into_iter().unzip();
                let content = content_key(&ids, &unavailable);
                let built = {
                    let mut b = by_content.lock();
                    b.retain(|(_, w)| w.strong_count() > 0);
                    b.iter()
                        .find(|(k, _)| *k == content)
                        .and_then(|(_, w)| w.upgrade())
                };
                if let Some(ix) = built {
                    return Ok(ix);
                }
                let unavailable: HashSet<ChunkId> = unavailable.into_iter().collect();
                let ix = Arc::new(build_index(&*source, &held, &unavailable));
                by_content.lock().push((content, Arc::downgrade(&ix)));
                Ok(ix)
            })
            .await?
        })
        .await
        .cloned()
    }

    /// The encoding of one group at zstd `level`, computed once for every site with the
    /// same bases.
    pub async fn group(
        &self,
        source: Arc<dyn ChunkSource>,
        index: Arc<BaseIndex>,
        bases: [u8; 32],
        chunks: Vec<(ChunkId, u64)>,
        level: i32,
    ) -> Result<Arc<Encoded>, EngineError> {
        let mut k = blake3::Hasher::new();
        k.update(&bases);
        k.update(&level.to_le_bytes());
        for (id, _) in &chunks {
            k.update(id.as_bytes());
        }
        let key = *k.finalize().as_bytes();
        let slot = {
            let mut g = self.groups.lock();
            g.map
                .entry(key)
                .or_insert_with(|| Arc::new(OnceCell::new()))
                .clone()
        };
        let enc = slot
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || {
                    encode(&*source, &index, &chunks, level).map(Arc::new)
                })
                .await?
            })
            .await?
            .clone();
        self.remember(key, &enc);
        Ok(enc)
    }

    /// Count an encoded group against the memo's budget, dropping the oldest past it.
    fn remember(&self, key: [u8; 32], enc: &Encoded) {
        let size = match enc {
            Encoded::Group { payload, .. } => payload.len(),
            Encoded::Stored(ids) => 32 * ids.len(),
        };
        let mut g = self.groups.lock();
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
    }
}

/// Encode one group: its chunks' raw bytes, with every resembling base chunk as prefix.
fn encode(
    source: &dyn ChunkSource,
    index: &BaseIndex,
    chunks: &[(ChunkId, u64)],
    level: i32,
) -> Result<Encoded, EngineError> {
    let mut raws = Vec::with_capacity(chunks.len());
    let mut stored = 0u64;
    for (id, _) in chunks {
        raws.push(read_raw(source, id)?);
        stored += source.info(id).map(|i| i.stored_len as u64).unwrap_or(0);
    }
    let parts: Vec<(&[u8], u64)> = raws
        .iter()
        .zip(chunks)
        .map(|(r, (_, off))| (&r[..], *off))
        .collect();
    let budget = BaseBudget {
        chunks: MAX_BASE_CHUNKS,
        bytes: MAX_BASE_BYTES,
    };
    // Read when indexed; damaged since: left out of this group.
    let read_base = |id: &ChunkId| read_raw(source, id).ok();
    let g = encode_against(index, &parts, read_base, budget, level)?;
    let (payload, base_ids) = (g.payload, g.base);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{noise, stored_manifest};
    use seedcast_core::CompressedChunk;
    use seedcast_core::source::MemChunks;

    fn chunks(m: &Manifest) -> Vec<(u64, ChunkId, u32)> {
        m.files[0].recipe.chunks_at().collect()
    }

    #[test]
    fn kept_indexes_are_bounded_by_count_and_bytes_the_newest_always_kept() {
        let store = MemChunks::new();
        let m = stored_manifest(&store, &noise(3, 1 << 20));
        let built = build_index(&store, std::slice::from_ref(&m), &HashSet::new());
        let per = built.heap_bytes();
        assert!(
            per > built.len() * 40,
            "{per} bytes for {} chunks",
            built.len()
        );
        let fresh = || {
            Some(Arc::new(build_index(
                &store,
                std::slice::from_ref(&m),
                &HashSet::new(),
            )))
        };
        let slot = |n: u8, ix: Option<Arc<BaseIndex>>| {
            let s: Slot<BaseIndex> = Arc::new(OnceCell::new());
            if let Some(ix) = ix {
                s.set(ix).unwrap();
            }
            ([n; 32], s)
        };
        let mut q = VecDeque::new();
        for n in 0..7 {
            q.push_back(slot(n, fresh()));
            evict_indexes(&mut q, 4, usize::MAX);
        }
        assert_eq!(q.len(), 4);
        assert_eq!(q.back().unwrap().0, [6; 32], "the newest is kept");
        // Over the byte budget the oldest go; one being built counts as empty.
        let mut q: VecDeque<_> = (0..3).map(|n| slot(n, fresh())).collect();
        q.push_back(slot(9, None));
        evict_indexes(&mut q, 4, per * 5 / 2);
        let kept: Vec<u8> = q.iter().map(|(k, _)| k[0]).collect();
        assert_eq!(kept, [1, 2, 9]);
        // The newest stays whatever its size.
        let mut q: VecDeque<_> = (0..2).map(|n| slot(n, fresh())).collect();
        evict_indexes(&mut q, 4, per / 2);
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].0, [1; 32]);
        // One index shared by three keys counts once.
        let shared = fresh();
        let mut q: VecDeque<_> = (0..3).map(|n| slot(n, shared.clone())).collect();
        evict_indexes(&mut q, 4, per * 3 / 2);
        assert_eq!(q.len(), 3);
    }

    #[tokio::test]
    async fn the_same_manifests_under_another_name_share_one_index() {
        let store: Arc<MemChunks> = Arc::new(MemChunks::new());
        let m = stored_manifest(&store, &noise(6, 1 << 20));
        let other = stored_manifest(&store, &noise(7, 1 << 20));
        let cache = DeltaCache::default();
        let index = |key: u8, m: &Manifest, gone: Vec<ChunkId>| {
            let m = (m.id().unwrap(), m.clone());
            cache.index(store.clone(), [key; 32], move || Ok(vec![m]), gone)
        };
        let a = index(1, &m, vec![]).await.unwrap();
        let b = index(2, &m, vec![]).await.unwrap();
        assert!(Arc::ptr_eq(&a, &b), "built twice for the same manifests");
        // Other manifests, or other chunks left out, are other indexes.
        let c = index(3, &other, vec![]).await.unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        let gone = vec![chunks(&m)[0].1];
        let d = index(4, &m, gone.clone()).await.unwrap();
        assert!(!Arc::ptr_eq(&a, &d));
        assert!(!d.contains(&gone[0]));
        // Once every key holding it is evicted it is freed: the map does not keep it.
        let weak = Arc::downgrade(&a);
        drop((a, b, d));
        for k in 10..20 {
            index(k, &other, vec![]).await.unwrap();
        }
        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn chunks_the_site_lacks_are_never_bases() {
        let store = MemChunks::new();
        let base = stored_manifest(&store, &noise(2, 512 << 10));
        let (off, id, _) = chunks(&base)[2];
        let gone: HashSet<ChunkId> = [id].into();
        let ix = build_index(&store, std::slice::from_ref(&base), &gone);
        let raw = read_raw(&store, &id).unwrap();
        let mut cands = Vec::new();
        ix.candidates(&raw, off, &mut cands);
        assert!(!cands.contains(&id));
    }

    #[test]
    fn a_group_is_a_small_delta_when_bases_resemble_it_and_stored_chunks_when_not() {
        let store = MemChunks::new();
        let old = noise(3, 1 << 20);
        let base = stored_manifest(&store, &old);
        let mut new = old.clone();
        for at in [100_000usize, 400_000, 700_000] {
            new[at..at + 64].fill(0x55);
        }
        let next = stored_manifest(&store, &new);
        let ix = build_index(&store, std::slice::from_ref(&base), &HashSet::new());
        let have: HashSet<ChunkId> = chunks(&base).iter().map(|c| c.1).collect();
        let group: Vec<(ChunkId, u64)> = chunks(&next)
            .into_iter()
            .filter(|(_, id, _)| !have.contains(id))
            .map(|(off, id, _)| (id, off))
            .collect();
        assert!(!group.is_empty());
        let Encoded::Group { header, payload } = encode(&store, &ix, &group, 19).unwrap() else {
            panic!("similar chunks should make a delta group");
        };
        let raw: usize = group
            .iter()
            .map(|(id, _)| store.info(id).unwrap().raw_len as usize)
            .sum();
        assert!(payload.len() * 20 < raw, "{} of {raw}", payload.len());
        // The site rebuilds exactly the chunks from the named bases.
        let mut prefix = Vec::new();
        for b in &header.base {
            prefix.extend_from_slice(&read_raw(&store, b).unwrap());
        }
        let lens: Vec<u32> = header.chunks.iter().map(|(_, l)| *l).collect();
        let parts = seedcast_core::delta::decode_group(&prefix, &payload, &lens).unwrap();
        for ((id, _), p) in header.chunks.iter().zip(parts) {
            assert_eq!(ChunkId::of(&p), *id);
        }
        // Unrelated new content: no base helps, the stored forms go instead.
        let fresh = stored_manifest(&store, &noise(4, 300_000));
        let group: Vec<(ChunkId, u64)> = chunks(&fresh)
            .into_iter()
            .map(|(o, id, _)| (id, o))
            .collect();
        assert!(matches!(
            encode(&store, &ix, &group, 19).unwrap(),
            Encoded::Stored(ids) if ids.len() == group.len()
        ));
    }

    #[test]
    fn a_damaged_base_chunk_is_left_out_not_used_and_not_fatal() {
        let store = MemChunks::new();
        let base = stored_manifest(&store, &noise(5, 300_000));
        let (_, id, len) = chunks(&base)[0];
        store.put_raw(CompressedChunk {
            id,
            raw_len: len,
            encoding: seedcast_core::Encoding::Raw,
            payload: Bytes::from(vec![0u8; len as usize]),
        });
        assert!(matches!(
            store.read_verified(&id),
            Err(SourceError::Damaged { id: d, .. }) if d == id
        ));
        let ix = build_index(&store, std::slice::from_ref(&base), &HashSet::new());
        assert!(!ix.contains(&id), "a damaged base was indexed");
        assert_eq!(ix.len(), chunks(&base).len() - 1);
    }
}
