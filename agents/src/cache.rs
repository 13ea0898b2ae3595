//! The agent's own database (RocksDB): its chunk cache and what it has published.
//!
//! | column family | key | value |
//! | --- | --- | --- |
//! | `chunks` | chunk id | the chunk's raw bytes (kept in blob files, key-value separated) |
//! | `images` | global id | [`HeldRecord`]: version, manifest id, local id |
//! | `manifests` | global id + version | the published manifest (record) |
//! | `meta` | name | cache format |
//!
//! Only a [`VerifiedChunk`] can be put in the cache. Chunk writes skip the write-ahead log
//! (a chunk lost in a crash is simply asked for again) and are flushed once a transfer is
//! complete; image records are synced.

use std::path::Path;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBPinnableSlice, IteratorMode, Options,
    WriteBatch, WriteOptions,
};
use seedcast_core::codec::{self, RecordError};
use seedcast_core::protocol::HeldImage;
use seedcast_core::{ChunkId, GlobalId, Manifest, VerifiedChunk};
use serde::{Deserialize, Serialize};

pub const CACHE_FORMAT: u8 = 1;
pub const RECORD_FORMAT: u8 = 1;

const CF_CHUNKS: &str = "chunks";
const CF_IMAGES: &str = "images";
const CF_MANIFESTS: &str = "manifests";
const CF_META: &str = "meta";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("agent database: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("agent record {what}: {source}")]
    Record {
        what: String,
        #[source]
        source: RecordError,
    },
    #[error("agent database encode: {0}")]
    Encode(#[from] codec::CodecError),
    #[error("agent database at {path} has format {found}; this build reads format {CACHE_FORMAT}")]
    Format { path: String, found: u8 },
}

/// What the site holds of one image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRecord {
    pub version: u32,
    pub manifest_id: [u8; 32],
    pub local_id: String,
    pub adapter: String,
}

pub struct AgentDb {
    db: DB,
}

impl std::fmt::Debug for AgentDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentDb({})", self.db.path().display())
    }
}

fn manifest_key(g: &GlobalId, version: u32) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..12].copy_from_slice(g.as_bytes());
    k[12..].copy_from_slice(&version.to_be_bytes());
    k
}

impl AgentDb {
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cache = Cache::new_lru_cache(32 << 20);
        let table = || {
            let mut bbo = BlockBasedOptions::default();
            bbo.set_bloom_filter(10.0, false);
            bbo.set_block_cache(&cache);
            bbo.set_cache_index_and_filter_blocks(true);
            bbo
        };
        let mut chunks = Options::default();
        chunks.set_block_based_table_factory(&table());
        // Chunk bytes go to blob files; the LSM tree holds only keys and blob pointers, so
        // compaction does not rewrite chunk data and lookups stay fast.
        chunks.set_enable_blob_files(true);
        chunks.set_min_blob_size(1024);
        chunks.set_enable_blob_gc(true);
        let plain = || {
            let mut o = Options::default();
            o.set_block_based_table_factory(&table());
            o
        };
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunks),
            ColumnFamilyDescriptor::new(CF_IMAGES, plain()),
            ColumnFamilyDescriptor::new(CF_MANIFESTS, plain()),
            ColumnFamilyDescriptor::new(CF_META, plain()),
        ];
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        let me = AgentDb { db };
        match me.db.get_cf(me.cf(CF_META), b"cache_format")? {
            None => me
                .db
                .put_cf(me.cf(CF_META), b"cache_format", [CACHE_FORMAT])?,
            Some(v) if v.as_slice() == [CACHE_FORMAT] => {}
            Some(v) => {
                return Err(CacheError::Format {
                    path: path.display().to_string(),
                    found: v.first().copied().unwrap_or(0),
                });
            }
        }
        Ok(me)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool, CacheError> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_CHUNKS), id.as_bytes())?
            .is_some())
    }

    /// A cached chunk's raw bytes.
    pub fn chunk(&self, id: &ChunkId) -> Result<Option<DBPinnableSlice<'_>>, CacheError> {
        Ok(self.db.get_pinned_cf(self.cf(CF_CHUNKS), id.as_bytes())?)
    }

    /// Cache verified chunks (no WAL: see the module docs).
    pub fn put_chunks(&self, chunks: &[VerifiedChunk]) -> Result<(), CacheError> {
        let mut batch = WriteBatch::default();
        for c in chunks {
            batch.put_cf(self.cf(CF_CHUNKS), c.id().as_bytes(), c.raw());
        }
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Make cached chunks durable (end of a transfer).
    pub fn flush_chunks(&self) -> Result<(), CacheError> {
        Ok(self.db.flush_cf(self.cf(CF_CHUNKS))?)
    }

    /// Drop every cached chunk (operators free space this way; tests simulate a wiped cache).
    pub fn clear_chunks(&self) -> Result<usize, CacheError> {
        let keys: Vec<Box<[u8]>> = self
            .db
            .iterator_cf(self.cf(CF_CHUNKS), IteratorMode::Start)
            .map(|r| r.map(|(k, _)| k))
            .collect::<Result<_, _>>()?;
        let mut batch = WriteBatch::default();
        for k in &keys {
            batch.delete_cf(self.cf(CF_CHUNKS), k);
        }
        self.db.write(batch)?;
        Ok(keys.len())
    }

    pub fn chunk_count(&self) -> Result<usize, CacheError> {
        Ok(self
            .db
            .iterator_cf(self.cf(CF_CHUNKS), IteratorMode::Start)
            .count())
    }

    pub fn held(&self, g: &GlobalId) -> Result<Option<HeldRecord>, CacheError> {
        match self.db.get_pinned_cf(self.cf(CF_IMAGES), g.as_bytes())? {
            None => Ok(None),
            Some(v) => codec::decode_record(RECORD_FORMAT, &v)
                .map(Some)
                .map_err(|source| CacheError::Record {
                    what: format!("images/{g}"),
                    source,
                }),
        }
    }

    /// Record a published image (and its manifest) in one synced batch.
    pub fn put_held(
        &self,
        g: &GlobalId,
        rec: &HeldRecord,
        manifest: &Manifest,
    ) -> Result<(), CacheError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_IMAGES),
            g.as_bytes(),
            codec::encode_record(RECORD_FORMAT, rec)?,
        );
        batch.put_cf(
            self.cf(CF_MANIFESTS),
            manifest_key(g, manifest.version),
            codec::encode_record(RECORD_FORMAT, manifest)?,
        );
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    pub fn manifest(&self, g: &GlobalId, version: u32) -> Result<Option<Manifest>, CacheError> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_MANIFESTS), manifest_key(g, version))?
        {
            None => Ok(None),
            Some(v) => codec::decode_record(RECORD_FORMAT, &v)
                .map(Some)
                .map_err(|source| CacheError::Record {
                    what: format!("manifests/{g}@{version}"),
                    source,
                }),
        }
    }

    /// Everything held, as reported to the engine on connect.
    pub fn inventory(&self) -> Result<Vec<HeldImage>, CacheError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_IMAGES), IteratorMode::Start) {
            let (k, v) = item?;
            let Ok(g) = <[u8; 12]>::try_from(&k[..]) else {
                continue;
            };
            let rec: HeldRecord =
                codec::decode_record(RECORD_FORMAT, &v).map_err(|source| CacheError::Record {
                    what: format!("images/{}", hex::encode(&k)),
                    source,
                })?;
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
    use bytes::Bytes;

    #[test]
    fn chunks_survive_flush_and_reopen_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let c = VerifiedChunk::from_raw(Bytes::from(vec![5u8; 100_000]));
        {
            let db = AgentDb::open(dir.path()).unwrap();
            db.put_chunks(std::slice::from_ref(&c)).unwrap();
            db.flush_chunks().unwrap();
        }
        let db = AgentDb::open(dir.path()).unwrap();
        assert!(db.has_chunk(&c.id()).unwrap());
        assert_eq!(&db.chunk(&c.id()).unwrap().unwrap()[..], &c.raw()[..]);
        assert_eq!(db.clear_chunks().unwrap(), 1);
        assert!(!db.has_chunk(&c.id()).unwrap());
    }
}
