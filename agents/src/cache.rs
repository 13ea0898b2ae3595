//! The agent's own database (RocksDB): its chunk cache and what it has published.
//!
//! | column family | key | value |
//! | --- | --- | --- |
//! | `stored` | chunk id | the chunk as it travelled: encoding, raw length, payload (zstd, or raw where zstd did not pay); blob files, key-value separated |
//! | `chunks` | chunk id | format 1: the chunk's raw bytes (read and freed, no longer written) |
//! | `images` | global id | [`HeldRecord`]: version, manifest id, local id |
//! | `manifests` | global id + version | the published manifest (record) |
//! | `meta` | name | cache format |
//! | `meta` | `floor` + global id | [`Floor`]: the newest version applied, never lowered |
//! | `meta` | `repair` + global id | [`Repair`]: set by `seedcast check --repair`, cleared when done |
//!
//! Only a [`VerifiedChunk`] can be put in the cache. It is kept in the form it arrived in:
//! the engine's stored zstd bytes, verified on arrival, are written as they are, so the
//! cache takes the engine store's space rather than the image's (a third of it for the
//! benchmark's images) and a site writes each received byte once raw (the image) and once
//! compressed (the cache), not twice raw. Reading a chunk back decompresses it. Chunk
//! writes skip the write-ahead log (a chunk lost in a crash is simply asked for again) and
//! are flushed once a transfer is complete; image records are synced.

use std::path::Path;

use seedcast_core::protocol::HeldImage;
use seedcast_core::{ChunkId, GlobalId, Manifest, VerifiedChunk};
use seedcast_db::{Batch, Db, DbError, Durability, Layout, Record, Spec, version_key};

pub use crate::cache_value::CachedChunk;
use crate::cache_value::{ScannedChunk, decode_value, stored_header, stored_value};
use serde::{Deserialize, Serialize};

/// 2: chunks kept in their stored form (`stored`); format 1's raw `chunks` stay readable.
pub const CACHE_FORMAT: u8 = 2;

const CF_STORED: &str = "stored";
/// Format 1's raw chunks.
const CF_CHUNKS: &str = "chunks";
/// The two chunk families, newest first.
const CHUNK_FAMILIES: [&str; 2] = [CF_STORED, CF_CHUNKS];
const CF_IMAGES: &str = "images";
const CF_MANIFESTS: &str = "manifests";
const CF_META: &str = "meta";

const SPEC: Spec = Spec {
    families: &[
        (CF_STORED, Layout::Blobs),
        (CF_CHUNKS, Layout::Blobs),
        (CF_IMAGES, Layout::Records),
        (CF_MANIFESTS, Layout::Records),
        (CF_META, Layout::Records),
    ],
    meta_family: CF_META,
    format_key: b"cache_format",
    upgrades_from: &[1],
    format: CACHE_FORMAT,
    cache_bytes: 32 << 20,
};

/// The agent database's errors are the database layer's.
pub type CacheError = DbError;

impl Record for HeldRecord {}

/// Manifests are stored as records of their own: format 2 since files have a format;
/// format 1 records read as format-1 manifests with every file raw.
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
struct ManifestRec(Manifest);

impl Record for ManifestRec {
    const FORMAT: u8 = 2;
    fn decode(bytes: &[u8]) -> Result<Self, seedcast_core::codec::RecordError> {
        use seedcast_core::codec::decode_record;
        use seedcast_core::manifest::v1::ManifestV1;
        match bytes.first() {
            Some(1) => decode_record::<ManifestV1>(1, bytes).map(|m| ManifestRec(m.into())),
            _ => decode_record(Self::FORMAT, bytes),
        }
    }
}

/// What the site holds of one image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRecord {
    pub version: u32,
    pub manifest_id: [u8; 32],
    pub local_id: String,
    pub adapter: String,
}

/// The newest version of an image this site has applied. Kept apart from [`HeldRecord`]
/// and only ever raised, so a replayed older manifest is refused even if the image's
/// record is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Floor {
    pub version: u32,
    pub manifest_id: [u8; 32],
}

impl Record for Floor {}

/// What `seedcast check --repair` found wrong with a held image, until the engine has sent
/// it again. A marked image is left out of the inventory, so the engine deploys it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Repair {
    /// The published copy is intact; chunks of it were lost from the cache: fetch them.
    Refetch,
    /// The published copy drifted or is gone: publish the version again (whole, never as
    /// an overlay on the damaged copy).
    Republish,
}

impl Record for Repair {}

fn repair_key(g: &GlobalId) -> Vec<u8> {
    [b"repair".as_slice(), g.as_bytes()].concat()
}

fn floor_key(g: &GlobalId) -> Vec<u8> {
    [b"floor".as_slice(), g.as_bytes()].concat()
}

pub struct AgentDb {
    db: Db,
    /// Chunk payload bytes received from the engine over this database's life (what a
    /// site's link carried, re-sends included), kept with the chunks they brought; and
    /// how many of them are not flushed yet, and when the last flush was.
    received: parking_lot::Mutex<(u64, u64, std::time::Instant)>,
}

/// Received chunk bytes are flushed at least this often during a transfer, so an agent
/// killed mid-transfer keeps all but the last few tens of MiB of what it had verified
/// (chunk writes skip the write-ahead log, which would write every byte twice). 16 MiB:
/// the memtable holds this much raw chunk data (and the next one fills while it is
/// flushed), so it is most of the agent's memory beyond QUIC's receive buffers; at 8 MiB
/// the flushes made many small files, at 32 MiB the agent peaked ~40 MiB higher.
const FLUSH_EVERY: u64 = 16 << 20;
/// ... and at least this often: on a thin link 16 MiB takes minutes (67 s at 2 Mbit/s),
/// and an agent restarted during an outage should not ask again for what it had.
const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

const RECEIVED_KEY: &[u8] = b"received_bytes";

impl std::fmt::Debug for AgentDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentDb({})", self.db.path().display())
    }
}

impl AgentDb {
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        let db = Db::open(path, &SPEC)?;
        let received = db
            .get_raw(CF_META, RECEIVED_KEY)?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map_or(0, u64::from_le_bytes);
        Ok(AgentDb {
            db,
            received: parking_lot::Mutex::new((received, 0, std::time::Instant::now())),
        })
    }

    /// Open the database of a running agent to read it (`seedcast check`); nothing is
    /// written to `path`, `scratch` holds the reader's own files.
    pub fn open_secondary(path: &Path, scratch: &Path) -> Result<Self, CacheError> {
        let db = Db::open_secondary(path, scratch, &SPEC)?;
        Ok(AgentDb {
            db,
            received: parking_lot::Mutex::new((0, 0, std::time::Instant::now())),
        })
    }

    /// Every cached chunk, without RocksDB's checksums (the caller hashes each): its key
    /// and raw bytes, or why they do not decode, so a damaged one is named by its id rather
    /// than ending the scan.
    pub fn scan_chunks_unchecked(
        &self,
    ) -> impl Iterator<Item = Result<(Box<[u8]>, ScannedChunk), CacheError>> + '_ {
        CHUNK_FAMILIES.into_iter().flat_map(move |cf| {
            self.db.scan_raw_unchecked(cf).map(move |item| {
                item.map(|(k, value)| {
                    let legacy = cf == CF_CHUNKS;
                    (k, ScannedChunk { legacy, value })
                })
            })
        })
    }

    /// Drop cached chunks (damaged ones found by `seedcast check --repair`), synced.
    pub fn delete_chunks(&self, ids: &[ChunkId]) -> Result<(), CacheError> {
        let keys: Vec<&[u8]> = ids.iter().map(|id| id.as_bytes().as_slice()).collect();
        let mut batch = Batch::default();
        for cf in CHUNK_FAMILIES {
            for k in &keys {
                batch.delete_cf(self.db.cf(cf), k);
            }
        }
        self.db.write(batch, Durability::Synced)
    }

    /// Mark a held image for repair (synced).
    pub fn mark_repair(&self, g: &GlobalId, r: Repair) -> Result<(), CacheError> {
        self.db.put_synced(CF_META, &repair_key(g), &r)
    }

    pub fn repair(&self, g: &GlobalId) -> Result<Option<Repair>, CacheError> {
        self.db
            .get(CF_META, &repair_key(g), || format!("repair/{g}"))
    }

    /// The refetch of `g` is done (a republish clears its mark with the record).
    pub fn clear_repair(&self, g: &GlobalId) -> Result<(), CacheError> {
        self.db.delete_synced(CF_META, &[&repair_key(g)])
    }

    /// Images still marked for repair.
    pub fn repairs_pending(&self) -> Result<usize, CacheError> {
        Ok(self.db.scan_raw(CF_META, b"repair").count())
    }

    /// Every record of the images and manifests families decoded one by one (for `seedcast
    /// check`): each that does not decode, by key, with why.
    pub fn audit_records(&self) -> (u64, Vec<(String, String)>) {
        let mut n = 0;
        let mut bad = Vec::new();
        for (cf, is_manifest) in [(CF_IMAGES, false), (CF_MANIFESTS, true)] {
            for item in self.db.scan_raw(cf, &[]) {
                n += 1;
                match item {
                    Ok((k, v)) => {
                        let r = if is_manifest {
                            ManifestRec::decode(&v).map(drop)
                        } else {
                            HeldRecord::decode(&v).map(drop)
                        };
                        if let Err(e) = r {
                            bad.push((format!("{cf}/{}", hex::encode(&k)), e.to_string()));
                        }
                    }
                    Err(e) => {
                        bad.push((format!("{cf}/…"), format!("cannot read on: {e}")));
                        break;
                    }
                }
            }
        }
        (n, bad)
    }

    /// Cache chunks that arrived from the engine in `payload_len` bytes, counting them
    /// in the same write (no WAL: a crash loses both together), flushed every
    /// [`FLUSH_EVERY`] bytes or [`FLUSH_AFTER`], whichever comes first.
    pub fn put_received(
        &self,
        chunks: &[VerifiedChunk],
        payload_len: u64,
    ) -> Result<(), CacheError> {
        let mut r = self.received.lock();
        let (mut batch, written) = self.chunk_batch(chunks);
        let total = r.0 + payload_len;
        batch.put_cf(self.db.cf(CF_META), RECEIVED_KEY, total.to_le_bytes());
        self.db.write(batch, Durability::NoWal)?;
        let now = std::time::Instant::now();
        *r = (total, r.1 + written, r.2);
        let flush = r.1 >= FLUSH_EVERY || now.duration_since(r.2) >= FLUSH_AFTER;
        if flush {
            r.1 = 0;
            r.2 = now;
        }
        // Flushed with the lock released: the other streams go on caching meanwhile (held,
        // every stream waited for each flush's files to be written and synced).
        drop(r);
        if flush {
            self.flush_chunks()?;
        }
        Ok(())
    }

    /// Flush received chunks that have waited [`FLUSH_AFTER`] (the agent asks every second):
    /// a transfer that stalls — a cut link — keeps what it had verified even if the agent
    /// is then killed.
    pub fn flush_stale(&self) -> Result<(), CacheError> {
        let mut r = self.received.lock();
        if r.1 == 0 || r.2.elapsed() < FLUSH_AFTER {
            return Ok(());
        }
        r.1 = 0;
        r.2 = std::time::Instant::now();
        drop(r);
        self.flush_chunks()
    }

    /// Chunk payload bytes received from the engine over this database's life.
    pub fn received_bytes(&self) -> u64 {
        self.received.lock().0
    }

    /// Whether a chunk is cached. Its value is read (RocksDB checks it) but not decoded:
    /// a plan covering a whole image asks this of every chunk. One found damaged is dropped,
    /// as [`AgentDb::chunk`] does.
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool, CacheError> {
        for cf in CHUNK_FAMILIES {
            match self.db.get_raw(cf, id.as_bytes()) {
                Ok(None) => {}
                Ok(Some(v)) if cf == CF_CHUNKS || stored_header(&v).is_ok() => return Ok(true),
                Ok(Some(_)) => return Ok(self.chunk(id)?.is_some()),
                Err(e) if e.is_corruption() => return Ok(self.chunk(id)?.is_some()),
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// A cached chunk's raw bytes. One whose stored bytes fail RocksDB's checksums (a
    /// flipped bit on disk) or do not decode is dropped and reported absent, so it is
    /// fetched again instead of failing every deployment that needs it.
    pub fn chunk(&self, id: &ChunkId) -> Result<Option<CachedChunk<'_>>, CacheError> {
        for cf in CHUNK_FAMILIES {
            let why = match self.db.get_raw(cf, id.as_bytes()) {
                Ok(None) => continue,
                Ok(Some(v)) => match decode_value(cf == CF_CHUNKS, v) {
                    Ok(c) => return Ok(Some(c)),
                    Err(why) => why,
                },
                Err(e) if e.is_corruption() => e.to_string(),
                Err(e) => return Err(e),
            };
            tracing::warn!(chunk = %id, "cached chunk damaged on disk; dropped, to be fetched again: {why}");
            self.delete_chunks(std::slice::from_ref(id))?;
            return Ok(None);
        }
        Ok(None)
    }

    /// A batch putting `chunks` in their stored form, and the bytes it writes.
    fn chunk_batch(&self, chunks: &[VerifiedChunk]) -> (Batch, u64) {
        let mut batch = Batch::default();
        let mut written = 0u64;
        for c in chunks {
            let v = stored_value(c.stored());
            written += v.len() as u64;
            batch.put_cf(self.db.cf(CF_STORED), c.id().as_bytes(), v);
        }
        (batch, written)
    }

    /// Cache verified chunks (no WAL: see the module docs).
    pub fn put_chunks(&self, chunks: &[VerifiedChunk]) -> Result<(), CacheError> {
        self.db.write(self.chunk_batch(chunks).0, Durability::NoWal)
    }

    /// Make cached chunks (and the count of bytes received) durable (end of a transfer).
    pub fn flush_chunks(&self) -> Result<(), CacheError> {
        self.db.flush(CF_META)?;
        self.db.flush(CF_STORED)
    }

    /// Drop every cached chunk (operators free space this way; tests simulate a wiped cache).
    pub fn clear_chunks(&self) -> Result<usize, CacheError> {
        let mut n = 0;
        for cf in CHUNK_FAMILIES {
            let keys: Vec<Box<[u8]>> = self
                .db
                .scan_raw(cf, &[])
                .map(|r| r.map(|(k, _)| k))
                .collect::<Result<_, _>>()?;
            let mut batch = Batch::default();
            for k in &keys {
                batch.delete_cf(self.db.cf(cf), k);
            }
            self.db.write(batch, Durability::Unsynced)?;
            // Without blob garbage collection the space comes back when the tables that
            // named the chunks are compacted away.
            self.db.compact(cf)?;
            n += keys.len();
        }
        Ok(n)
    }

    /// Cached chunks (a chunk held in both families, which only a format-1 cache's chunk
    /// received again can be, counts twice).
    pub fn chunk_count(&self) -> Result<usize, CacheError> {
        Ok(CHUNK_FAMILIES
            .into_iter()
            .map(|cf| self.db.scan_raw(cf, &[]).count())
            .sum())
    }

    pub fn held(&self, g: &GlobalId) -> Result<Option<HeldRecord>, CacheError> {
        self.db
            .get(CF_IMAGES, g.as_bytes(), || format!("images/{g}"))
    }

    /// Record a published image (and its manifest) in one synced batch.
    pub fn put_held(
        &self,
        g: &GlobalId,
        rec: &HeldRecord,
        manifest: &Manifest,
    ) -> Result<(), CacheError> {
        let mut batch = Batch::default();
        batch.put_cf(self.db.cf(CF_IMAGES), g.as_bytes(), rec.encode()?);
        if self.floor(g)?.is_none_or(|f| f.version < rec.version) {
            let floor = Floor {
                version: rec.version,
                manifest_id: rec.manifest_id,
            };
            batch.put_cf(self.db.cf(CF_META), floor_key(g), floor.encode()?);
        }
        batch.put_cf(
            self.db.cf(CF_MANIFESTS),
            version_key(g, manifest.version),
            seedcast_core::codec::encode_record(ManifestRec::FORMAT, manifest)?,
        );
        // A version published (again) is whole: any repair of the image is done.
        batch.delete_cf(self.db.cf(CF_META), repair_key(g));
        self.db.write(batch, Durability::Synced)
    }

    /// The newest version of `g` applied here (from its image record when the database
    /// predates floors).
    pub fn floor(&self, g: &GlobalId) -> Result<Option<Floor>, CacheError> {
        let kept: Option<Floor> = self
            .db
            .get(CF_META, &floor_key(g), || format!("floor/{g}"))?;
        Ok(kept.or(self.held(g)?.map(|h| Floor {
            version: h.version,
            manifest_id: h.manifest_id,
        })))
    }

    pub fn manifest(&self, g: &GlobalId, version: u32) -> Result<Option<Manifest>, CacheError> {
        Ok(self
            .db
            .get::<ManifestRec>(CF_MANIFESTS, &version_key(g, version), || {
                format!("manifests/{g}@{version}")
            })?
            .map(|m| m.0))
    }

    /// What to report to the engine on connect: everything held but the images marked for
    /// repair, which the engine then deploys again.
    pub fn reported_inventory(&self) -> Result<Vec<HeldImage>, CacheError> {
        let mut keep = Vec::new();
        for h in self.inventory()? {
            if self.repair(&h.global_id)?.is_none() {
                keep.push(h);
            }
        }
        Ok(keep)
    }

    /// Everything held.
    pub fn inventory(&self) -> Result<Vec<HeldImage>, CacheError> {
        let mut out = Vec::new();
        for (k, rec) in self.db.scan::<HeldRecord>(CF_IMAGES, &[])? {
            let Ok(g) = <[u8; 12]>::try_from(&k[..]) else {
                continue;
            };
            out.push(HeldImage {
                global_id: GlobalId(g),
                version: rec.version,
                manifest_id: rec.manifest_id,
                local_id: rec.local_id,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache_value::STORED_HEADER;
    use bytes::Bytes;
    use seedcast_core::chunk::Encoding;

    fn text(n: usize) -> Bytes {
        Bytes::from(
            (0..n)
                .map(|i| format!("line {i} of a config file\n"))
                .collect::<String>()
                .into_bytes(),
        )
    }

    #[test]
    fn chunks_survive_flush_and_reopen_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let kept_raw = VerifiedChunk::from_raw(Bytes::from(vec![5u8; 100_000]));
        let zstd = VerifiedChunk::compress(text(5000), 3);
        assert_eq!(zstd.stored().encoding, Encoding::Zstd);
        {
            let db = AgentDb::open(dir.path()).unwrap();
            db.put_chunks(&[kept_raw.clone(), zstd.clone()]).unwrap();
            db.flush_chunks().unwrap();
        }
        let db = AgentDb::open(dir.path()).unwrap();
        for c in [&kept_raw, &zstd] {
            assert!(db.has_chunk(&c.id()).unwrap());
            assert_eq!(&db.chunk(&c.id()).unwrap().unwrap()[..], &c.raw()[..]);
        }
        // The compressed chunk is kept as it travelled, not raw.
        let value = db
            .db
            .get_raw(CF_STORED, zstd.id().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(value.len(), STORED_HEADER + zstd.stored().payload.len());
        assert!(
            value.len() * 4 < zstd.raw().len(),
            "{} bytes kept",
            value.len()
        );
        assert_eq!(db.chunk_count().unwrap(), 2);
        assert_eq!(db.clear_chunks().unwrap(), 2);
        assert!(!db.has_chunk(&kept_raw.id()).unwrap());
        assert!(db.chunk(&zstd.id()).unwrap().is_none());
    }

    /// Format 1 as it was laid out: raw chunks in `chunks`, no `stored` family.
    const SPEC_V1: Spec = Spec {
        families: &[
            (CF_CHUNKS, Layout::Blobs),
            (CF_IMAGES, Layout::Records),
            (CF_MANIFESTS, Layout::Records),
            (CF_META, Layout::Records),
        ],
        format: 1,
        upgrades_from: &[],
        ..SPEC
    };

    #[test]
    fn a_format_1_cache_is_upgraded_and_its_raw_chunks_still_serve() {
        let dir = tempfile::tempdir().unwrap();
        let old = VerifiedChunk::from_raw(text(3000));
        {
            let v1 = Db::open(dir.path(), &SPEC_V1).unwrap();
            let mut b = Batch::default();
            b.put_cf(v1.cf(CF_CHUNKS), old.id().as_bytes(), old.raw());
            v1.write(b, Durability::Synced).unwrap();
        }
        let db = AgentDb::open(dir.path()).unwrap();
        assert!(db.has_chunk(&old.id()).unwrap());
        assert_eq!(&db.chunk(&old.id()).unwrap().unwrap()[..], &old.raw()[..]);
        let new = VerifiedChunk::compress(text(4000), 3);
        db.put_chunks(std::slice::from_ref(&new)).unwrap();
        let scanned: Vec<_> = db.scan_chunks_unchecked().map(|r| r.unwrap()).collect();
        assert_eq!(scanned.len(), 2);
        for (k, v) in &scanned {
            assert_eq!(&ChunkId::of(&v.raw().unwrap()).as_bytes()[..], &k[..]);
        }
        db.delete_chunks(&[old.id()]).unwrap();
        assert!(!db.has_chunk(&old.id()).unwrap());
        drop(db);
        // Upgraded: format 1 no longer opens it as its own.
        assert!(Db::open(dir.path(), &SPEC_V1).is_err());
    }

    #[test]
    fn a_stored_value_that_does_not_decode_is_dropped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let db = AgentDb::open(dir.path()).unwrap();
        let c = VerifiedChunk::compress(text(4000), 3);
        let good = stored_value(c.stored());
        let mut truncated = good.clone();
        truncated.truncate(good.len() - 10);
        let mut unknown = good.clone();
        unknown[0] = 9;
        let mut huge = good.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut short_raw = vec![Encoding::Raw as u8];
        short_raw.extend_from_slice(&100u32.to_le_bytes());
        short_raw.extend_from_slice(&[1, 2, 3]);
        for bad in [truncated, unknown, huge, short_raw, vec![1, 2]] {
            let mut b = Batch::default();
            b.put_cf(db.db.cf(CF_STORED), c.id().as_bytes(), &bad);
            db.db.write(b, Durability::Synced).unwrap();
            let (_, scanned) = db.scan_chunks_unchecked().next().unwrap().unwrap();
            assert!(scanned.raw().is_err(), "{bad:?} decoded");
            assert!(db.chunk(&c.id()).unwrap().is_none(), "{bad:?} served");
            assert!(!db.has_chunk(&c.id()).unwrap(), "{bad:?} kept");
        }
        // A bad header is seen without decoding, and dropped.
        let mut b = Batch::default();
        b.put_cf(db.db.cf(CF_STORED), c.id().as_bytes(), [7u8; 40]);
        db.db.write(b, Durability::Synced).unwrap();
        assert!(!db.has_chunk(&c.id()).unwrap());
        assert!(db.scan_chunks_unchecked().next().is_none(), "dropped");
    }

    proptest::proptest! {
        /// A damaged record on disk is an error naming it, never a panic.
        #[test]
        fn any_bytes_as_any_record_never_panic(
            b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let _ = HeldRecord::decode(&b);
            let _ = Floor::decode(&b);
            let _ = ManifestRec::decode(&b);
            for format in [1u8, 2] {
                let mut r = vec![format];
                r.extend_from_slice(&b);
                let _ = ManifestRec::decode(&r);
                let _ = HeldRecord::decode(&r);
            }
        }
    }
}
