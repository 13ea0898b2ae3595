//! seedcast-db: RocksDB opened the one way seedcast opens it, shared by the engine's catalog
//! and the agent's database.
//!
//! - [`Db::open`] creates or opens a database from a [`Spec`]: every column family gets a
//!   bloom filter and one shared block cache ("do I hold this?" misses are the common
//!   question and must not touch disk), passed per descriptor (`open_cf` would silently use
//!   defaults), and families of chunk bytes keep them in blob files. A format byte under a
//!   fixed key refuses databases of another layout.
//! - [`Record`]: every value carries its format byte ([`seedcast_core::codec::encode_record`]),
//!   so a newer build reads or refuses an older record clearly; [`Db::get`] and [`Db::scan`]
//!   decode and name the record that failed.
//! - [`version_key`]: the key layout of per-version records (global id, then version
//!   big-endian, so a prefix scan lists an image's versions in order).

use std::path::{Path, PathBuf};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode,
    Options, WriteOptions,
};
use seedcast_core::GlobalId;
use seedcast_core::codec::{self, CodecError, RecordError};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Format byte of records that have not changed since the first release.
pub const RECORD_FORMAT: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database cannot be used now (it is being reopened after a failed write).
    #[error("database {path}: {why}")]
    Unavailable { path: PathBuf, why: String },
    /// Another process (a running engine or agent) holds the database.
    #[error("database {path} is in use by another process (a running engine or agent)")]
    InUse { path: PathBuf },
    #[error("database {path}: {source}")]
    Rocks {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("database record {what}: {source}")]
    Record {
        what: String,
        #[source]
        source: RecordError,
    },
    #[error("database encode: {0}")]
    Encode(#[from] CodecError),
    #[error("database at {path} has format {found}; this build reads format {expected}")]
    Format {
        path: PathBuf,
        found: u8,
        expected: u8,
    },
}

/// A persisted record: its format byte, and how older formats are read.
pub trait Record: Serialize + DeserializeOwned {
    const FORMAT: u8 = RECORD_FORMAT;
    fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        codec::decode_record(Self::FORMAT, bytes)
    }
    fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode_record(Self::FORMAT, self)
    }
}

/// A key and its value, as an iterator yields them.
pub type KeyValue = (Box<[u8]>, Box<[u8]>);

/// How a column family stores its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Small records in the LSM tree.
    Records,
    /// Large values (chunk bytes) in blob files: the tree holds only keys and blob pointers,
    /// so compaction never rewrites the bytes and lookups stay fast.
    Blobs,
}

/// What a database holds and how it is laid out.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub families: &'static [(&'static str, Layout)],
    /// The family holding `format_key`.
    pub meta_family: &'static str,
    pub format_key: &'static [u8],
    /// This build's layout; another value found on disk is refused.
    pub format: u8,
    /// Older layouts this build opens and upgrades (by creating the families they lack):
    /// the marker is rewritten to `format`.
    pub upgrades_from: &'static [u8],
    /// Block cache shared by every family.
    pub cache_bytes: usize,
}

/// An open database.
pub struct Db {
    db: DB,
    path: PathBuf,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Db({})", self.path.display())
    }
}

/// The key of a per-version record: global id, then version (big-endian).
pub fn version_key(g: &GlobalId, version: u32) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..12].copy_from_slice(g.as_bytes());
    k[12..].copy_from_slice(&version.to_be_bytes());
    k
}

fn synced() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

/// The column families of `spec`, each with a bloom filter and the shared block cache.
fn descriptors(spec: &Spec) -> impl Iterator<Item = ColumnFamilyDescriptor> + '_ {
    let cache = Cache::new_lru_cache(spec.cache_bytes);
    spec.families.iter().map(move |(name, layout)| {
        let mut bbo = BlockBasedOptions::default();
        bbo.set_bloom_filter(10.0, false);
        bbo.set_block_cache(&cache);
        bbo.set_cache_index_and_filter_blocks(true);
        let mut o = Options::default();
        o.set_block_based_table_factory(&bbo);
        if *layout == Layout::Blobs {
            o.set_enable_blob_files(true);
            o.set_min_blob_size(1024);
            // No blob garbage collection: it relocates the live blobs of the oldest blob
            // files at every compaction, rewriting a cache being filled (agents seeding a
            // 1 GiB image took 1.45x as long and 1.3x the CPU with it, `bench local`). A blob
            // file goes once no table refers to it, so values deleted in bulk are reclaimed
            // by [`Db::compact`].
            o.set_enable_blob_gc(false);
        }
        ColumnFamilyDescriptor::new(*name, o)
    })
}

impl DbError {
    /// RocksDB found stored bytes that fail its checksums.
    pub fn is_corruption(&self) -> bool {
        matches!(self, DbError::Rocks { source, .. } if source.kind() == rocksdb::ErrorKind::Corruption)
    }
}

impl Db {
    /// Open (or create) the database at `path` laid out as `spec` says.
    pub fn open(path: &Path, spec: &Spec) -> Result<Db, DbError> {
        let rocks = |source| DbError::Rocks {
            path: path.to_path_buf(),
            source,
        };
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let db = DB::open_cf_descriptors(&opts, path, descriptors(spec)).map_err(|e| {
            // RocksDB's LOCK file: the database is open elsewhere.
            if e.kind() == rocksdb::ErrorKind::IOError && e.to_string().contains("LOCK") {
                DbError::InUse {
                    path: path.to_path_buf(),
                }
            } else {
                rocks(e)
            }
        })?;
        let me = Db {
            db,
            path: path.to_path_buf(),
        };
        let meta = me.cf(spec.meta_family);
        match me.db.get_cf(meta, spec.format_key).map_err(rocks)? {
            None => me
                .db
                .put_cf_opt(meta, spec.format_key, [spec.format], &synced())
                .map_err(rocks)?,
            Some(v) if v.as_slice() == [spec.format] => {}
            Some(v) if v.len() == 1 && spec.upgrades_from.contains(&v[0]) => me
                .db
                .put_cf_opt(meta, spec.format_key, [spec.format], &synced())
                .map_err(rocks)?,
            Some(v) => {
                return Err(DbError::Format {
                    path: path.to_path_buf(),
                    found: v.first().copied().unwrap_or(0),
                    expected: spec.format,
                });
            }
        }
        Ok(me)
    }

    /// Open the database at `path` to read beside the process that has it open (RocksDB's
    /// secondary mode: no lock taken, nothing written to `path`; the secondary's own logs go
    /// to `scratch`). What it sees is the primary's state when opened. Refuses a database
    /// of another layout, as [`Db::open`] does, without upgrading it.
    pub fn open_secondary(path: &Path, scratch: &Path, spec: &Spec) -> Result<Db, DbError> {
        let rocks = |source| DbError::Rocks {
            path: path.to_path_buf(),
            source,
        };
        let mut opts = Options::default();
        // Secondaries must keep every table file open: the primary may delete them.
        opts.set_max_open_files(-1);
        let db = DB::open_cf_descriptors_as_secondary(&opts, path, scratch, descriptors(spec))
            .map_err(rocks)?;
        let me = Db {
            db,
            path: path.to_path_buf(),
        };
        let format = me
            .get_raw(spec.meta_family, spec.format_key)?
            .map(|v| v.to_vec());
        match format {
            Some(v)
                if v.as_ref() == [spec.format]
                    || (v.len() == 1 && spec.upgrades_from.contains(&v[0])) =>
            {
                Ok(me)
            }
            v => Err(DbError::Format {
                path: path.to_path_buf(),
                found: v.and_then(|v| v.first().copied()).unwrap_or(0),
                expected: spec.format,
            }),
        }
    }

    /// Open the database at `path` read-only in this process: no lock taken and nothing
    /// written (it works on a full disk), the write-ahead log replayed in memory.
    pub fn open_read_only(path: &Path, spec: &Spec) -> Result<Db, DbError> {
        let db =
            DB::open_cf_descriptors_read_only(&Options::default(), path, descriptors(spec), false)
                .map_err(|source| DbError::Rocks {
                    path: path.to_path_buf(),
                    source,
                })?;
        Ok(Db {
            db,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A value's bytes without checking RocksDB's own checksums, for a scrub that hashes
    /// what it reads itself: a damaged value is then named by its key instead of failing
    /// the whole scan.
    pub fn scan_raw_unchecked<'a>(
        &'a self,
        cf: &str,
    ) -> impl Iterator<Item = Result<KeyValue, DbError>> + 'a {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_verify_checksums(false);
        ro.fill_cache(false);
        self.db
            .iterator_cf_opt(self.cf(cf), ro, IteratorMode::Start)
            .map(|r| r.map_err(|e| self.rocks(e)))
    }

    /// Delete keys of one family, synced.
    pub fn delete_synced(&self, cf: &str, keys: &[&[u8]]) -> Result<(), DbError> {
        let mut b = Batch::default();
        for k in keys {
            b.delete_cf(self.cf(cf), k);
        }
        self.write(b, Durability::Synced)
    }

    fn rocks(&self, source: rocksdb::Error) -> DbError {
        DbError::Rocks {
            path: self.path.clone(),
            source,
        }
    }

    /// A column family named in the spec.
    pub fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    /// A record, decoded; `what` names it in errors.
    pub fn get<T: Record>(
        &self,
        cf: &str,
        key: &[u8],
        what: impl FnOnce() -> String,
    ) -> Result<Option<T>, DbError> {
        match self.get_raw(cf, key)? {
            None => Ok(None),
            Some(v) => T::decode(&v).map(Some).map_err(|source| DbError::Record {
                what: what(),
                source,
            }),
        }
    }

    /// A value's bytes as stored (pinned: no copy).
    pub fn get_raw(&self, cf: &str, key: &[u8]) -> Result<Option<DBPinnableSlice<'_>>, DbError> {
        self.db
            .get_pinned_cf(self.cf(cf), key)
            .map_err(|e| self.rocks(e))
    }

    /// Every record whose key starts with `prefix`, in key order.
    pub fn scan<T: Record>(&self, cf: &str, prefix: &[u8]) -> Result<Vec<(Vec<u8>, T)>, DbError> {
        let mut out = Vec::new();
        for item in self.scan_raw(cf, prefix) {
            let (k, v) = item?;
            let rec = T::decode(&v).map_err(|source| DbError::Record {
                what: format!("{cf}/{}", hex::encode(&k)),
                source,
            })?;
            out.push((k.to_vec(), rec));
        }
        Ok(out)
    }

    /// Keys and raw values from `prefix` on while they start with it.
    pub fn scan_raw<'a>(
        &'a self,
        cf: &str,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = Result<KeyValue, DbError>> + 'a {
        let mode = if prefix.is_empty() {
            IteratorMode::Start
        } else {
            IteratorMode::From(prefix, Direction::Forward)
        };
        self.db
            .iterator_cf(self.cf(cf), mode)
            .map(|r| r.map_err(|e| self.rocks(e)))
            .take_while(move |r| r.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)))
    }

    /// Write one record, synced.
    pub fn put_synced<T: Record>(&self, cf: &str, key: &[u8], value: &T) -> Result<(), DbError> {
        self.db
            .put_cf_opt(self.cf(cf), key, value.encode()?, &synced())
            .map_err(|e| self.rocks(e))
    }

    /// Write a raw value, synced (small metadata such as ids).
    pub fn put_raw_synced(&self, cf: &str, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        self.db
            .put_cf_opt(self.cf(cf), key, value, &synced())
            .map_err(|e| self.rocks(e))
    }

    /// Apply a batch: `Durability::Synced` for commits, `Unsynced` for what is redone after a
    /// crash anyway, `NoWal` for bulk bytes made durable later by [`Db::flush`].
    pub fn write(&self, batch: Batch, durability: Durability) -> Result<(), DbError> {
        let wo = match durability {
            Durability::Synced => synced(),
            Durability::Unsynced => WriteOptions::default(),
            Durability::NoWal => {
                let mut wo = WriteOptions::default();
                wo.disable_wal(true);
                wo
            }
        };
        self.db.write_opt(batch, &wo).map_err(|e| self.rocks(e))
    }

    /// Flush one family's memtable to disk (after `NoWal` writes).
    pub fn flush(&self, cf: &str) -> Result<(), DbError> {
        self.db.flush_cf(self.cf(cf)).map_err(|e| self.rocks(e))
    }

    /// Compact one family whole: deleted records leave its tables, and blob files no table
    /// refers to any more are deleted (the space of values deleted in bulk comes back).
    pub fn compact(&self, cf: &str) -> Result<(), DbError> {
        self.flush(cf)?;
        self.db
            .compact_range_cf(self.cf(cf), None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }
}

/// How durable a batch must be when [`Db::write`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    Synced,
    Unsynced,
    NoWal,
}

pub use rocksdb::{DBPinnableSlice, WriteBatch as Batch};

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Note(String);
    impl Record for Note {}

    const SPEC: Spec = Spec {
        families: &[
            ("notes", Layout::Records),
            ("bytes", Layout::Blobs),
            ("meta", Layout::Records),
        ],
        meta_family: "meta",
        format_key: b"format",
        format: 1,
        upgrades_from: &[],
        cache_bytes: 1 << 20,
    };

    #[test]
    fn records_round_trip_scan_by_prefix_and_foreign_formats_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        {
            let db = Db::open(&p, &SPEC).unwrap();
            let g = GlobalId([1; 12]);
            for v in [1, 2, 300] {
                db.put_synced("notes", &version_key(&g, v), &Note(format!("v{v}")))
                    .unwrap();
            }
            db.put_synced(
                "notes",
                &version_key(&GlobalId([2; 12]), 1),
                &Note("x".into()),
            )
            .unwrap();
            let got: Vec<Note> = db
                .scan::<Note>("notes", g.as_bytes())
                .unwrap()
                .into_iter()
                .map(|(_, n)| n)
                .collect();
            assert_eq!(
                got,
                [Note("v1".into()), Note("v2".into()), Note("v300".into())]
            );
            // Values deleted in bulk give their space back once compacted.
            let mut b = Batch::default();
            for i in 0..2048u32 {
                b.put_cf(db.cf("bytes"), i.to_be_bytes(), vec![i as u8; 8192]);
            }
            db.write(b, Durability::NoWal).unwrap();
            db.flush("bytes").unwrap();
            let blobs = |p: &Path| -> u64 {
                std::fs::read_dir(p)
                    .unwrap()
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".blob"))
                    .map(|e| e.metadata().unwrap().len())
                    .sum()
            };
            assert!(blobs(&p) >= 16 << 20, "values went to blob files");
            let mut b = Batch::default();
            for i in 0..2048u32 {
                b.delete_cf(db.cf("bytes"), i.to_be_bytes());
            }
            db.write(b, Durability::Synced).unwrap();
            db.compact("bytes").unwrap();
            assert!(blobs(&p) < 1 << 20, "blob files left: {} B", blobs(&p));
            let mut b = Batch::default();
            b.put_cf(db.cf("bytes"), b"k", vec![7u8; 5000]);
            db.write(b, Durability::NoWal).unwrap();
            db.flush("bytes").unwrap();
            // A record of a format this build does not know is refused, not misread.
            db.put_raw_synced("notes", b"bad", &[9, 1, 2]).unwrap();
            let e = db
                .get::<Note>("notes", b"bad", || "notes/bad".into())
                .unwrap_err();
            assert!(e.to_string().contains("format 9"), "{e}");
            assert!(e.to_string().contains("notes/bad"), "{e}");
        }
        {
            let db = Db::open(&p, &SPEC).unwrap();
            assert_eq!(db.get_raw("bytes", b"k").unwrap().unwrap().len(), 5000);
            db.put_raw_synced("meta", b"format", &[7]).unwrap();
        }
        let e = Db::open(&p, &SPEC).unwrap_err();
        assert!(
            matches!(
                e,
                DbError::Format {
                    found: 7,
                    expected: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_second_reader_opens_beside_the_writer_and_a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        let db = Db::open(&p, &SPEC).unwrap();
        db.put_synced("notes", b"a", &Note("one".into())).unwrap();
        let e = Db::open(&p, &SPEC).unwrap_err();
        assert!(matches!(e, DbError::InUse { .. }), "{e}");
        let scratch = tempfile::tempdir().unwrap();
        let ro = Db::open_secondary(&p, scratch.path(), &SPEC).unwrap();
        let n: Option<Note> = ro.get("notes", b"a", || "a".into()).unwrap();
        assert_eq!(n, Some(Note("one".into())));
        assert_eq!(ro.scan_raw_unchecked("notes").count(), 1);
        drop(ro);
        db.delete_synced("notes", &[b"a"]).unwrap();
        assert!(db.get_raw("notes", b"a").unwrap().is_none());
        let e = Db::open_secondary(&dir.path().join("none"), scratch.path(), &SPEC).unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
    }
}
