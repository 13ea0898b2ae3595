//! The engine's chunk store: every distinct chunk once, in its stored (zstd) form, appended
//! to pack files; located through an in-memory index built from the catalog at start. It is
//! the first implementation of [`ChunkStore`] (the seam an object-store backend plugs into).
//!
//! Pack format 1: the file starts with [`PACK_MAGIC`]; then entries, each a 45-byte header
//! (`SCCK`, chunk id, encoding, raw length, stored length; integers little-endian) and the
//! stored bytes. The header lets a read check it got the entry it asked for, and lets a pack
//! be re-indexed without the catalog.
//!
//! Durability order: entries are appended and the pack is synced *before* their index
//! records are written, so the catalog never points at bytes that are not on disk. An entry
//! whose record was lost in a crash is garbage at the end of a pack and is uploaded again.
//! The send path reads packs with positioned reads and never touches RocksDB.

use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use seedcast_core::source::{ChunkInfo, ChunkSource, ChunkStore, Inserted, SourceError};
use seedcast_core::{ChunkId, CompressedChunk, Encoding, VerifiedChunk};

use crate::catalog::{Catalog, CatalogError, ChunkRecord};

/// First bytes of every pack file; the last byte is the pack format.
pub const PACK_MAGIC: &[u8; 8] = b"SCPACK\x00\x01";
const ENTRY_MAGIC: &[u8; 4] = b"SCCK";
const ENTRY_HEADER: usize = 4 + 32 + 1 + 4 + 4;
/// Packs roll over past this size (1 GiB).
pub const DEFAULT_MAX_PACK: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pack {path}: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug)]
struct Writer {
    pack: u32,
    file: Arc<File>,
    len: u64,
}

/// Pack files and their in-memory index.
#[derive(Debug)]
pub struct PackStore {
    dir: PathBuf,
    catalog: Arc<Catalog>,
    index: RwLock<HashMap<ChunkId, ChunkRecord>>,
    packs: RwLock<Vec<Arc<File>>>,
    writer: Mutex<Writer>,
    max_pack: u64,
}

fn pack_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("pack-{n:06}.pack"))
}

fn open_pack(path: &Path, create: bool) -> Result<(Arc<File>, u64), StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(io_err(path))?;
    let mut len = file.metadata().map_err(io_err(path))?.len();
    if len == 0 && create {
        file.write_all_at(PACK_MAGIC, 0).map_err(io_err(path))?;
        file.sync_all().map_err(io_err(path))?;
        // The new pack's directory entry is durable before any index record points into it.
        if let Some(dir) = path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir))?;
        }
        len = PACK_MAGIC.len() as u64;
    }
    let mut magic = [0u8; 8];
    file.read_exact_at(&mut magic, 0)
        .map_err(|_| StoreError::Corrupt {
            path: path.to_path_buf(),
            why: "shorter than its header".into(),
        })?;
    if magic[..7] != PACK_MAGIC[..7] {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            why: "not a seedcast pack (bad magic)".into(),
        });
    }
    if magic[7] != PACK_MAGIC[7] {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            why: format!(
                "pack format {} is not supported (this build reads {})",
                magic[7], PACK_MAGIC[7]
            ),
        });
    }
    Ok((Arc::new(file), len))
}

/// Read the entry `rec` points at in `file` and check its header names `id` with the
/// recorded lengths. Without `payload` only the header is read (a structure check), and
/// the chunk returned has an empty payload.
pub(crate) fn read_entry(
    file: &File,
    path: &Path,
    id: &ChunkId,
    rec: &ChunkRecord,
    payload: bool,
) -> Result<CompressedChunk, StoreError> {
    let len = ENTRY_HEADER + if payload { rec.stored_len as usize } else { 0 };
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, rec.offset)
        .map_err(io_err(path))?;
    let corrupt = |why: &str| StoreError::Corrupt {
        path: path.to_path_buf(),
        why: format!("entry at {} for chunk {id}: {why}", rec.offset),
    };
    if &buf[..4] != ENTRY_MAGIC || &buf[4..36] != id.as_bytes() {
        return Err(corrupt("header does not match the index"));
    }
    let encoding = Encoding::from_u8(buf[36]).ok_or_else(|| corrupt("unknown encoding"))?;
    let raw_len = u32::from_le_bytes(buf[37..41].try_into().expect("4 bytes"));
    let stored_len = u32::from_le_bytes(buf[41..45].try_into().expect("4 bytes"));
    if raw_len != rec.raw_len || stored_len != rec.stored_len {
        return Err(corrupt("lengths do not match the index"));
    }
    let payload = Bytes::from(buf).slice(ENTRY_HEADER..);
    Ok(CompressedChunk {
        id: *id,
        raw_len,
        encoding,
        payload,
    })
}

/// The pack files in `dir`, in order, opened read-only with their lengths (for `seedcast
/// check`, which must not create or change anything).
pub(crate) fn open_packs_read_only(dir: &Path) -> Result<Vec<(PathBuf, File, u64)>, StoreError> {
    let mut out = Vec::new();
    loop {
        let p = pack_path(dir, out.len() as u32);
        let file = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(&p)(e)),
        };
        let len = file.metadata().map_err(io_err(&p))?.len();
        let mut magic = [0u8; 8];
        if file.read_exact_at(&mut magic, 0).is_err() || magic[..7] != PACK_MAGIC[..7] {
            return Err(StoreError::Corrupt {
                path: p,
                why: "not a seedcast pack (bad magic or shorter than its header)".into(),
            });
        }
        out.push((p, file, len));
    }
}

/// Where an entry of `rec` ends in its pack.
pub(crate) fn entry_end(rec: &ChunkRecord) -> u64 {
    rec.offset + ENTRY_HEADER as u64 + rec.stored_len as u64
}

impl PackStore {
    /// Open the packs in `dir` and index the chunks the catalog records. Records that point
    /// past the end of their pack (a pack cut short outside seedcast) are dropped, with a
    /// warning, so those chunks are uploaded again rather than served broken.
    pub fn open(dir: &Path, catalog: Arc<Catalog>) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut packs = Vec::new();
        let mut lens = Vec::new();
        loop {
            let p = pack_path(dir, packs.len() as u32);
            if !p.exists() {
                break;
            }
            let (f, len) = open_pack(&p, false)?;
            packs.push(f);
            lens.push(len);
        }
        if packs.is_empty() {
            let (f, len) = open_pack(&pack_path(dir, 0), true)?;
            packs.push(f);
            lens.push(len);
        }
        let mut index = HashMap::new();
        for (id, rec) in catalog.all_chunks()? {
            let end = entry_end(&rec);
            match lens.get(rec.pack as usize) {
                Some(&len) if end <= len => {
                    index.insert(id, rec);
                }
                _ => {
                    tracing::warn!(chunk = %id, pack = rec.pack, "chunk record points past its pack; dropped")
                }
            }
        }
        let last = packs.len() - 1;
        let writer = Writer {
            pack: last as u32,
            file: packs[last].clone(),
            len: lens[last],
        };
        Ok(PackStore {
            dir: dir.to_path_buf(),
            catalog,
            index: RwLock::new(index),
            packs: RwLock::new(packs),
            writer: Mutex::new(writer),
            max_pack: DEFAULT_MAX_PACK,
        })
    }

    pub fn record(&self, id: &ChunkId) -> Option<ChunkRecord> {
        self.index.read().get(id).copied()
    }

    /// Up to `max` ids of stored chunks, in no particular order (chunks to probe a site's
    /// path with).
    pub fn some_ids(&self, max: usize) -> Vec<ChunkId> {
        self.index.read().keys().take(max).copied().collect()
    }

    /// Store verified chunks not yet held. Blocking (file writes and a sync): call from a
    /// blocking thread. Returns how many were new and their stored bytes.
    fn insert_packed(&self, chunks: &[VerifiedChunk]) -> Result<Inserted, StoreError> {
        let mut w = self.writer.lock();
        let mut added: Vec<(ChunkId, ChunkRecord)> = Vec::new();
        let mut in_batch = std::collections::HashSet::new();
        let mut bytes = 0u64;
        let mut touched = vec![w.pack];
        {
            let idx = self.index.read();
            let mut buf = Vec::new();
            for c in chunks {
                let s = c.stored();
                if idx.contains_key(&s.id) || !in_batch.insert(s.id) {
                    continue;
                }
                if w.len >= self.max_pack {
                    let n = w.pack + 1;
                    let (f, len) = open_pack(&pack_path(&self.dir, n), true)?;
                    self.packs.write().push(f.clone());
                    *w = Writer {
                        pack: n,
                        file: f,
                        len,
                    };
                    touched.push(n);
                }
                buf.clear();
                buf.extend_from_slice(ENTRY_MAGIC);
                buf.extend_from_slice(s.id.as_bytes());
                buf.push(s.encoding as u8);
                buf.extend_from_slice(&s.raw_len.to_le_bytes());
                buf.extend_from_slice(&(s.payload.len() as u32).to_le_bytes());
                buf.extend_from_slice(&s.payload);
                let path = pack_path(&self.dir, w.pack);
                w.file.write_all_at(&buf, w.len).map_err(io_err(&path))?;
                added.push((
                    s.id,
                    ChunkRecord {
                        pack: w.pack,
                        offset: w.len,
                        stored_len: s.payload.len() as u32,
                        raw_len: s.raw_len,
                        encoding: s.encoding as u8,
                        refs: 0,
                    },
                ));
                w.len += buf.len() as u64;
                bytes += s.payload.len() as u64;
            }
        }
        if added.is_empty() {
            return Ok(Inserted::default());
        }
        let packs = self.packs.read();
        for n in touched {
            packs[n as usize]
                .sync_data()
                .map_err(io_err(&pack_path(&self.dir, n)))?;
        }
        drop(packs);
        self.catalog.put_chunks(&added)?;
        let n = added.len() as u32;
        self.index.write().extend(added);
        Ok(Inserted { chunks: n, bytes })
    }

    /// Read a chunk's stored form. Blocking (a positioned read, usually from page cache).
    fn read_packed(&self, id: &ChunkId) -> Result<Option<CompressedChunk>, StoreError> {
        let Some(rec) = self.record(id) else {
            return Ok(None);
        };
        let file = self.packs.read()[rec.pack as usize].clone();
        read_entry(&file, &pack_path(&self.dir, rec.pack), id, &rec, true).map(Some)
    }

    /// The chunk records of `ids` with one more reference each, for a commit batch.
    /// Apply them with [`PackStore::apply_refs`] once the commit is durable.
    pub fn with_ref(&self, ids: impl IntoIterator<Item = ChunkId>) -> Vec<(ChunkId, ChunkRecord)> {
        let idx = self.index.read();
        ids.into_iter()
            .filter_map(|id| {
                idx.get(&id).map(|r| {
                    let mut r = *r;
                    r.refs = r.refs.saturating_add(1);
                    (id, r)
                })
            })
            .collect()
    }

    pub fn apply_refs(&self, recs: &[(ChunkId, ChunkRecord)]) {
        let mut idx = self.index.write();
        for (id, r) in recs {
            if let Some(cur) = idx.get_mut(id) {
                cur.refs = r.refs;
            }
        }
    }
}

impl ChunkSource for PackStore {
    fn info(&self, id: &ChunkId) -> Option<ChunkInfo> {
        self.record(id).map(|r| ChunkInfo {
            raw_len: r.raw_len,
            stored_len: r.stored_len,
        })
    }

    fn read(&self, id: &ChunkId) -> Result<CompressedChunk, SourceError> {
        self.read_packed(id)
            .map_err(SourceError::backend)?
            .ok_or(SourceError::Missing(*id))
    }
}

impl ChunkStore for PackStore {
    fn insert(&self, chunks: &[VerifiedChunk]) -> Result<Inserted, SourceError> {
        self.insert_packed(chunks).map_err(SourceError::backend)
    }

    fn missing(&self, ids: &[ChunkId]) -> Vec<ChunkId> {
        let idx = self.index.read();
        ids.iter()
            .filter(|id| !idx.contains_key(id))
            .copied()
            .collect()
    }

    fn len(&self) -> usize {
        self.index.read().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seed: u8, n: usize) -> VerifiedChunk {
        let raw: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(seed)).collect();
        let id = ChunkId::of(&raw);
        seedcast_core::UnverifiedChunk(CompressedChunk::compress(id, &raw, 3))
            .verify(1 << 20)
            .unwrap()
    }

    #[test]
    fn stores_once_reads_back_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Arc::new(Catalog::open(&dir.path().join("cat")).unwrap());
        let store = PackStore::open(&dir.path().join("packs"), cat.clone()).unwrap();
        let a = chunk(3, 70_000);
        let b = chunk(5, 10_000);
        let added = store.insert(&[a.clone(), b.clone(), a.clone()]).unwrap();
        assert_eq!(added.chunks, 2);
        assert!(added.bytes > 0);
        assert_eq!(
            store.insert(std::slice::from_ref(&a)).unwrap(),
            Inserted::default()
        );
        let back = store.read(&a.id()).unwrap();
        assert_eq!(&back, a.stored());
        drop(store);
        let store = PackStore::open(&dir.path().join("packs"), cat.clone()).unwrap();
        assert_eq!(store.len(), 2);
        assert_eq!(&store.read(&b.id()).unwrap(), b.stored());
        assert_eq!(
            store.missing(&[a.id(), ChunkId([0; 32])]),
            vec![ChunkId([0; 32])]
        );
    }

    #[test]
    fn truncated_pack_drops_records_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Arc::new(Catalog::open(&dir.path().join("cat")).unwrap());
        let packs = dir.path().join("packs");
        let store = PackStore::open(&packs, cat.clone()).unwrap();
        let a = chunk(7, 50_000);
        store.insert(std::slice::from_ref(&a)).unwrap();
        drop(store);
        let p = pack_path(&packs, 0);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(20).unwrap();
        let store = PackStore::open(&packs, cat.clone()).unwrap();
        assert!(!store.contains(&a.id()));
        drop(store);
        fs::write(&p, b"not a pack at all").unwrap();
        let e = PackStore::open(&packs, cat.clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad magic"), "{e}");
        fs::write(&p, b"SCPACK\x00\x09").unwrap();
        let e = PackStore::open(&packs, cat.clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains("pack format 9"), "{e}");
    }
}
