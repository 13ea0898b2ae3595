//! The engine's catalog: RocksDB, one column family per kind of record.
//!
//! | column family | key | value |
//! | --- | --- | --- |
//! | `chunks` | chunk id (32 B) | [`ChunkRecord`]: pack location, sizes, reference count |
//! | `manifests` | global id (12 B) + version (u32 BE) | [`ManifestRecord`] |
//! | `images` | global id | [`ImageRecord`]: name, current version, target sites |
//! | `sites` | site name | [`SiteRecord`]: adapter, certificate fingerprints and expiry, revoked |
//! | `enrollments` | BLAKE3 of a site token's secret | [`EnrollmentRecord`]: site, expiry |
//! | `site_settings` | site name | [`SiteSettings`]: the site's rate limit, congestion control |
//! | `placements` | global id + site name | [`PlacementRecord`]: version, local id, state, bytes |
//! | `notes` | global id + version | [`VersionNote`]: what made the version |
//! | `meta` | name | catalog format, engine id |
//!
//! Every value is a versioned record ([`seedcast_core::codec::encode_record`]). The catalog
//! stays off the per-chunk path: chunk records are written in batches after their pack bytes
//! are durable, and the chunk index is read once at start into memory (see `store`).
//! Commits of images are one synced `WriteBatch`, so a crash leaves all of a commit or none.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use seedcast_core::codec::RecordError;
use seedcast_core::protocol::PlacementState;
use seedcast_core::{ChunkId, GlobalId, Manifest};
use seedcast_db::{Batch, Db, DbError, Durability, Layout, Record, Spec, version_key};
use serde::{Deserialize, Serialize};

/// Format of this catalog's layout; stored under `meta/catalog_format`. 2 added the
/// `enrollments` family, 3 `site_settings` (older catalogs are upgraded by creating them).
pub const CATALOG_FORMAT: u8 = 3;

const CF_CHUNKS: &str = "chunks";
const CF_MANIFESTS: &str = "manifests";
const CF_IMAGES: &str = "images";
const CF_SITES: &str = "sites";
const CF_PLACEMENTS: &str = "placements";
const CF_META: &str = "meta";
const CF_NOTES: &str = "notes";
const CF_ENROLLMENTS: &str = "enrollments";
const CF_SITE_SETTINGS: &str = "site_settings";

const SPEC: Spec = Spec {
    families: &[
        (CF_CHUNKS, Layout::Records),
        (CF_MANIFESTS, Layout::Records),
        (CF_IMAGES, Layout::Records),
        (CF_SITES, Layout::Records),
        (CF_PLACEMENTS, Layout::Records),
        (CF_NOTES, Layout::Records),
        (CF_META, Layout::Records),
        (CF_ENROLLMENTS, Layout::Records),
        (CF_SITE_SETTINGS, Layout::Records),
    ],
    meta_family: CF_META,
    format_key: b"catalog_format",
    format: CATALOG_FORMAT,
    upgrades_from: &[1, 2],
    // The chunk index is read once at start; this serves manifests, sites and placements.
    cache_bytes: 64 << 20,
};

/// The catalog's errors are the database layer's.
pub type CatalogError = DbError;

impl Record for ChunkRecord {}
/// Manifest records gained file formats in format 2 (manifest format 2); format 1 records
/// read as manifests of format 1 with every file raw.
impl Record for ManifestRecord {
    const FORMAT: u8 = 2;
    fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        match bytes.first() {
            Some(1) => {
                seedcast_core::codec::decode_record::<ManifestRecordV1>(1, bytes).map(Into::into)
            }
            _ => seedcast_core::codec::decode_record(Self::FORMAT, bytes),
        }
    }
}
impl Record for ImageRecord {}
/// Site records gained certificate renewal and reset in format 2; format 1 records read
/// with their one fingerprint and an unknown expiry.
impl Record for SiteRecord {
    const FORMAT: u8 = 2;
    fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        match bytes.first() {
            Some(1) => {
                seedcast_core::codec::decode_record::<SiteRecordV1>(1, bytes).map(Into::into)
            }
            _ => seedcast_core::codec::decode_record(Self::FORMAT, bytes),
        }
    }
}
impl Record for EnrollmentRecord {}
impl Record for SiteSettings {}

/// How the engine sends to one site, as the operator set it (`seedcast site set`). Kept
/// apart from the site's record so it can be set before the site enrolls and survives a
/// reset.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteSettings {
    /// Bits per second on the wire at most (`None`: the engine-wide limit only).
    pub max_rate: Option<u64>,
    /// `None`: the engine's default controller.
    pub congestion: Option<seedcast_core::protocol::Congestion>,
}
impl Record for VersionNote {}

/// Placements gained `wire_bytes` in format 2; format 1 records read with it as 0.
impl Record for PlacementRecord {
    const FORMAT: u8 = 2;
    fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        match bytes.first() {
            Some(1) => {
                seedcast_core::codec::decode_record::<PlacementRecordV1>(1, bytes).map(Into::into)
            }
            _ => seedcast_core::codec::decode_record(Self::FORMAT, bytes),
        }
    }
}

/// What made a version (for `history`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionNote {
    pub change: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRecord {
    pub pack: u32,
    /// Offset of the entry (its header) in the pack.
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub encoding: u8,
    /// Number of manifests that reference the chunk.
    pub refs: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub manifest: Manifest,
    pub manifest_id: [u8; 32],
    /// Chunk payload bytes the push of this version uploaded.
    pub bytes_uploaded: u64,
    pub created_unix: u64,
}

/// Manifest record format 1 (before file formats).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ManifestRecordV1 {
    manifest: seedcast_core::manifest::v1::ManifestV1,
    manifest_id: [u8; 32],
    bytes_uploaded: u64,
    created_unix: u64,
}

impl From<ManifestRecordV1> for ManifestRecord {
    fn from(r: ManifestRecordV1) -> Self {
        ManifestRecord {
            manifest: r.manifest.into(),
            manifest_id: r.manifest_id,
            bytes_uploaded: r.bytes_uploaded,
            created_unix: r.created_unix,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub current_version: u32,
    /// Sites the image belongs at.
    pub sites: Vec<String>,
    pub created_unix: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    pub adapter: String,
    /// BLAKE3 of the site certificate the engine issued; only it (or `next_fingerprint`)
    /// is accepted. `None`: not enrolled (reset by the admin).
    pub cert_fingerprint: Option<[u8; 32]>,
    /// A renewed certificate issued but not yet used; it replaces the current one when the
    /// agent first connects with it.
    pub next_fingerprint: Option<[u8; 32]>,
    /// When the current certificate expires (Unix seconds; 0 unknown).
    pub cert_expires_unix: u64,
    pub next_expires_unix: u64,
    pub enrolled_unix: u64,
    pub revoked: bool,
}

/// Site record format 1 (one fingerprint, no expiry).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SiteRecordV1 {
    adapter: String,
    cert_fingerprint: [u8; 32],
    enrolled_unix: u64,
    revoked: bool,
}

impl From<SiteRecordV1> for SiteRecord {
    fn from(v: SiteRecordV1) -> Self {
        SiteRecord {
            adapter: v.adapter,
            cert_fingerprint: Some(v.cert_fingerprint),
            next_fingerprint: None,
            cert_expires_unix: 0,
            next_expires_unix: 0,
            enrolled_unix: v.enrolled_unix,
            revoked: v.revoked,
        }
    }
}

/// A site token not yet used: the site it enrolls and until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentRecord {
    pub site: String,
    pub created_unix: u64,
    pub expires_unix: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    /// The version that belongs at the site.
    pub version: u32,
    pub state: PlacementState,
    /// The site service's id of what is published there (of `published_version`).
    pub local_id: Option<String>,
    pub published_version: Option<u32>,
    pub bytes_sent: u64,
    pub bytes_needed: u64,
    pub error: Option<String>,
    /// Bytes the last transfer put on the wire (both directions, with headers).
    pub wire_bytes: u64,
}

/// Placement record format 1 (before `wire_bytes`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PlacementRecordV1 {
    version: u32,
    state: PlacementState,
    local_id: Option<String>,
    published_version: Option<u32>,
    bytes_sent: u64,
    bytes_needed: u64,
    error: Option<String>,
}

impl From<PlacementRecordV1> for PlacementRecord {
    fn from(v: PlacementRecordV1) -> Self {
        PlacementRecord {
            version: v.version,
            state: v.state,
            local_id: v.local_id,
            published_version: v.published_version,
            bytes_sent: v.bytes_sent,
            bytes_needed: v.bytes_needed,
            error: v.error,
            wire_bytes: 0,
        }
    }
}

impl PlacementRecord {
    pub fn pending(version: u32) -> Self {
        PlacementRecord {
            version,
            state: PlacementState::Pending,
            local_id: None,
            published_version: None,
            bytes_sent: 0,
            bytes_needed: 0,
            error: None,
            wire_bytes: 0,
        }
    }
}

/// Everything one image commit writes, applied atomically.
#[derive(Debug)]
pub struct ImageCommit<'a> {
    pub global_id: GlobalId,
    pub image: &'a ImageRecord,
    pub manifest: &'a ManifestRecord,
    pub placements: Vec<(String, PlacementRecord)>,
    /// Chunk records with their reference counts already raised.
    pub chunk_refs: Vec<(ChunkId, ChunkRecord)>,
    pub note: &'a VersionNote,
}

pub struct Catalog {
    path: PathBuf,
    db: RwLock<Arc<Db>>,
    /// A write failed. RocksDB then refuses every later write (a write-ahead-log append that
    /// hit a full disk switches it to read-only until it is reopened, and its C API has no
    /// `Resume`), so the next write reopens it first: the engine recovers by itself once
    /// space is freed.
    failed: AtomicBool,
    last_reopen: Mutex<Option<Instant>>,
}

/// Reopen attempts after a failed write are at least this far apart.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// The catalog as [`Catalog::audit`] read it.
#[derive(Debug, Default)]
pub struct Audit {
    /// Records looked at.
    pub records: u64,
    pub chunks: Vec<(ChunkId, ChunkRecord)>,
    pub images: Vec<(GlobalId, ImageRecord)>,
    pub manifests: Vec<(GlobalId, u32, ManifestRecord)>,
    /// `family/key (hex)` and why, for each record that did not read.
    pub bad: Vec<(String, String)>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Catalog({})", self.path.display())
    }
}

fn placement_key(g: &GlobalId, site: &str) -> Vec<u8> {
    let mut k = g.as_bytes().to_vec();
    k.extend_from_slice(site.as_bytes());
    k
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Catalog {
    /// Open (or create) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        Ok(Self::with(path, Db::open(path, &SPEC)?))
    }

    /// Open the catalog of a running engine to read it (`seedcast check`): nothing is
    /// written to `path`; `scratch` holds the reader's own files.
    pub fn open_secondary(path: &Path, scratch: &Path) -> Result<Self, CatalogError> {
        Ok(Self::with(path, Db::open_secondary(path, scratch, &SPEC)?))
    }

    fn with(path: &Path, db: Db) -> Self {
        Catalog {
            path: path.to_path_buf(),
            db: RwLock::new(Arc::new(db)),
            failed: AtomicBool::new(false),
            last_reopen: Mutex::new(None),
        }
    }

    /// The database, for a read.
    fn db(&self) -> Arc<Db> {
        self.db.read().clone()
    }

    /// The database, for a write: reopened first if a write failed.
    fn writer(&self) -> Result<Arc<Db>, CatalogError> {
        if self.failed.load(Ordering::Acquire) {
            self.reopen()?;
        }
        Ok(self.db())
    }

    /// Note a failed write (see [`Catalog::failed`]).
    fn wrote<T>(&self, r: Result<T, CatalogError>) -> Result<T, CatalogError> {
        if let Err(e @ CatalogError::Rocks { .. }) = &r {
            tracing::warn!("catalog write failed; it is reopened before the next write: {e}");
            self.failed.store(true, Ordering::Release);
        }
        r
    }

    /// Close the database that refused a write and open it again (at most once per
    /// [`REOPEN_EVERY`]). Meanwhile it is open read-only, which writes nothing: reads go on
    /// while the disk is still full.
    fn reopen(&self) -> Result<(), CatalogError> {
        let unavailable = |why: String| CatalogError::Unavailable {
            path: self.path.clone(),
            why,
        };
        let mut last = self.last_reopen.lock();
        if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
            return Err(unavailable(
                "a write failed and reopening did not succeed yet (is the disk full?)".into(),
            ));
        }
        *last = Some(Instant::now());
        let mut db = self.db.write();
        if !self.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        // Operations in flight hold the old handle for a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&db) > 1 {
            if Instant::now() > deadline {
                return Err(unavailable("still in use; not reopened".into()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Read-only first: it takes no lock, so the failed instance can close under it.
        *db = Arc::new(Db::open_read_only(&self.path, &SPEC)?);
        *db = Arc::new(Db::open(&self.path, &SPEC)?);
        self.failed.store(false, Ordering::Release);
        tracing::info!(path = %self.path.display(), "catalog reopened after a failed write");
        Ok(())
    }

    /// Every record decoded one by one (for `seedcast check`): what decodes, and the key
    /// and error of each record that does not, instead of failing at the first.
    pub fn audit(&self) -> Audit {
        let mut a = Audit::default();
        self.audit_family::<ChunkRecord>(CF_CHUNKS, &mut a, |a, k, r| {
            let id: [u8; 32] = k.try_into().map_err(|_| "key is not a chunk id")?;
            a.chunks.push((ChunkId(id), r));
            Ok(())
        });
        self.audit_family::<ImageRecord>(CF_IMAGES, &mut a, |a, k, r| {
            let g: [u8; 12] = k.try_into().map_err(|_| "key is not a global id")?;
            a.images.push((GlobalId(g), r));
            Ok(())
        });
        self.audit_family::<ManifestRecord>(CF_MANIFESTS, &mut a, |a, k, r| {
            if k.len() != 16 {
                return Err("key is not a global id and version");
            }
            let g = GlobalId(k[..12].try_into().expect("12 bytes"));
            let v = u32::from_be_bytes(k[12..].try_into().expect("4 bytes"));
            if (r.manifest.global_id, r.manifest.version) != (g, v) {
                return Err("the manifest names another image or version than its key");
            }
            a.manifests.push((g, v, r));
            Ok(())
        });
        self.audit_family::<SiteRecord>(CF_SITES, &mut a, |_, _, _| Ok(()));
        self.audit_family::<PlacementRecord>(CF_PLACEMENTS, &mut a, |_, _, _| Ok(()));
        self.audit_family::<VersionNote>(CF_NOTES, &mut a, |_, _, _| Ok(()));
        self.audit_family::<EnrollmentRecord>(CF_ENROLLMENTS, &mut a, |_, _, _| Ok(()));
        a
    }

    fn audit_family<T: Record>(
        &self,
        cf: &str,
        a: &mut Audit,
        mut keep: impl FnMut(&mut Audit, &[u8], T) -> Result<(), &'static str>,
    ) {
        let db = self.db();
        for item in db.scan_raw(cf, &[]) {
            a.records += 1;
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(e) => {
                    a.bad
                        .push((format!("{cf}/…"), format!("cannot read on: {e}")));
                    return;
                }
            };
            let what = || format!("{cf}/{}", hex::encode(&k));
            match T::decode(&v) {
                Ok(r) => {
                    if let Err(e) = keep(a, &k, r) {
                        a.bad.push((what(), e.to_string()));
                    }
                }
                Err(e) => a.bad.push((what(), e.to_string())),
            }
        }
    }

    /// Drop the records of chunks whose stored bytes are damaged (`seedcast check
    /// --repair`): the store then lacks them, so the next push of the same content uploads
    /// them again instead of being told they are held.
    pub fn forget_chunks(&self, ids: &[ChunkId]) -> Result<(), CatalogError> {
        let keys: Vec<&[u8]> = ids.iter().map(|id| id.as_bytes().as_slice()).collect();
        let db = self.writer()?;
        self.wrote(db.delete_synced(CF_CHUNKS, &keys))
    }

    /// A stable random id for this engine, made on first open.
    pub fn engine_id(&self) -> Result<String, CatalogError> {
        if let Some(v) = self.db().get_raw(CF_META, b"engine_id")? {
            return Ok(String::from_utf8_lossy(&v).into_owned());
        }
        let id = format!("engine-{}", hex::encode(rand::random::<[u8; 6]>()));
        let db = self.writer()?;
        self.wrote(db.put_raw_synced(CF_META, b"engine_id", id.as_bytes()))?;
        Ok(id)
    }

    // ---- chunks ----

    /// Every chunk record, for building the in-memory index at start.
    pub fn all_chunks(&self) -> Result<Vec<(ChunkId, ChunkRecord)>, CatalogError> {
        let mut out = Vec::new();
        for (k, rec) in self.db().scan::<ChunkRecord>(CF_CHUNKS, &[])? {
            let id: [u8; 32] = k.as_slice().try_into().map_err(|_| CatalogError::Record {
                what: format!("chunks/{}", hex::encode(&k)),
                source: RecordError::Empty,
            })?;
            out.push((ChunkId(id), rec));
        }
        Ok(out)
    }

    /// Record chunks whose pack bytes are already durable. Not synced: if the write is lost
    /// in a crash the chunks are simply uploaded again; a later synced commit orders it.
    pub fn put_chunks(&self, chunks: &[(ChunkId, ChunkRecord)]) -> Result<(), CatalogError> {
        let db = self.writer()?;
        let mut batch = Batch::default();
        for (id, rec) in chunks {
            batch.put_cf(db.cf(CF_CHUNKS), id.as_bytes(), rec.encode()?);
        }
        self.wrote(db.write(batch, Durability::Unsynced))
    }

    // ---- images and manifests ----

    /// Write an image's version, its placements and chunk references as one synced batch.
    pub fn commit_image(&self, c: ImageCommit<'_>) -> Result<(), CatalogError> {
        let db = self.writer()?;
        let mut batch = Batch::default();
        let g = &c.global_id;
        let cf = |name| db.cf(name);
        let vkey = version_key(g, c.manifest.manifest.version);
        batch.put_cf(cf(CF_IMAGES), g.as_bytes(), c.image.encode()?);
        batch.put_cf(cf(CF_MANIFESTS), vkey, c.manifest.encode()?);
        for (site, p) in &c.placements {
            batch.put_cf(cf(CF_PLACEMENTS), placement_key(g, site), p.encode()?);
        }
        batch.put_cf(cf(CF_NOTES), vkey, c.note.encode()?);
        for (id, rec) in &c.chunk_refs {
            batch.put_cf(cf(CF_CHUNKS), id.as_bytes(), rec.encode()?);
        }
        self.wrote(db.write(batch, Durability::Synced))
    }

    pub fn image(&self, g: &GlobalId) -> Result<Option<ImageRecord>, CatalogError> {
        self.db()
            .get(CF_IMAGES, g.as_bytes(), || format!("images/{g}"))
    }

    pub fn images(&self) -> Result<Vec<(GlobalId, ImageRecord)>, CatalogError> {
        Ok(self
            .db()
            .scan::<ImageRecord>(CF_IMAGES, &[])?
            .into_iter()
            .filter_map(|(k, r)| Some((GlobalId(k.as_slice().try_into().ok()?), r)))
            .collect())
    }

    pub fn manifest(
        &self,
        g: &GlobalId,
        version: u32,
    ) -> Result<Option<ManifestRecord>, CatalogError> {
        self.db().get(CF_MANIFESTS, &version_key(g, version), || {
            format!("manifests/{g}@{version}")
        })
    }

    pub fn note(&self, g: &GlobalId, version: u32) -> Result<Option<VersionNote>, CatalogError> {
        self.db().get(CF_NOTES, &version_key(g, version), || {
            format!("notes/{g}@{version}")
        })
    }

    /// Every version's manifest record of an image, oldest first.
    pub fn manifests(&self, g: &GlobalId) -> Result<Vec<ManifestRecord>, CatalogError> {
        Ok(self
            .db()
            .scan::<ManifestRecord>(CF_MANIFESTS, g.as_bytes())?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    pub fn image_exists(&self, g: &GlobalId) -> Result<bool, CatalogError> {
        Ok(self.db().get_raw(CF_IMAGES, g.as_bytes())?.is_some())
    }

    // ---- sites ----

    pub fn site(&self, name: &str) -> Result<Option<SiteRecord>, CatalogError> {
        self.db()
            .get(CF_SITES, name.as_bytes(), || format!("sites/{name}"))
    }

    pub fn put_site(&self, name: &str, rec: &SiteRecord) -> Result<(), CatalogError> {
        let db = self.writer()?;
        self.wrote(db.put_synced(CF_SITES, name.as_bytes(), rec))
    }

    pub fn sites(&self) -> Result<Vec<(String, SiteRecord)>, CatalogError> {
        Ok(self
            .db()
            .scan::<SiteRecord>(CF_SITES, &[])?
            .into_iter()
            .map(|(k, r)| (String::from_utf8_lossy(&k).into_owned(), r))
            .collect())
    }

    pub fn new_site_record(
        adapter: &str,
        cert_fingerprint: [u8; 32],
        cert_expires_unix: u64,
    ) -> SiteRecord {
        SiteRecord {
            adapter: adapter.to_string(),
            cert_fingerprint: Some(cert_fingerprint),
            next_fingerprint: None,
            cert_expires_unix,
            next_expires_unix: 0,
            enrolled_unix: unix_now(),
            revoked: false,
        }
    }

    pub fn site_settings(&self, name: &str) -> Result<SiteSettings, CatalogError> {
        Ok(self
            .db()
            .get(CF_SITE_SETTINGS, name.as_bytes(), || {
                format!("site_settings/{name}")
            })?
            .unwrap_or_default())
    }

    pub fn put_site_settings(&self, name: &str, s: &SiteSettings) -> Result<(), CatalogError> {
        let db = self.writer()?;
        self.wrote(db.put_synced(CF_SITE_SETTINGS, name.as_bytes(), s))
    }

    // ---- enrollments (site tokens) ----

    pub fn put_enrollment(
        &self,
        key: &[u8; 32],
        rec: &EnrollmentRecord,
    ) -> Result<(), CatalogError> {
        let db = self.writer()?;
        self.wrote(db.put_synced(CF_ENROLLMENTS, key, rec))
    }

    pub fn enrollment(&self, key: &[u8; 32]) -> Result<Option<EnrollmentRecord>, CatalogError> {
        self.db()
            .get(CF_ENROLLMENTS, key, || "enrollments/(token)".to_string())
    }

    pub fn delete_enrollment(&self, key: &[u8; 32]) -> Result<(), CatalogError> {
        let db = self.writer()?;
        let mut b = Batch::default();
        b.delete_cf(db.cf(CF_ENROLLMENTS), key);
        self.wrote(db.write(b, Durability::Synced))
    }

    /// Enroll `site`: write its record and, when it came with a site token, use the token
    /// up — both or neither.
    pub fn enroll_site(
        &self,
        site: &str,
        rec: &SiteRecord,
        token_key: Option<&[u8; 32]>,
    ) -> Result<(), CatalogError> {
        let db = self.writer()?;
        let mut b = Batch::default();
        b.put_cf(db.cf(CF_SITES), site.as_bytes(), rec.encode()?);
        if let Some(k) = token_key {
            b.delete_cf(db.cf(CF_ENROLLMENTS), k);
        }
        self.wrote(db.write(b, Durability::Synced))
    }

    /// Every unused token of `site` (with its key), expired ones too.
    pub fn enrollments_of(
        &self,
        site: &str,
    ) -> Result<Vec<([u8; 32], EnrollmentRecord)>, CatalogError> {
        Ok(self
            .db()
            .scan::<EnrollmentRecord>(CF_ENROLLMENTS, &[])?
            .into_iter()
            .filter(|(_, r)| r.site == site)
            .filter_map(|(k, r)| Some((<[u8; 32]>::try_from(k.as_slice()).ok()?, r)))
            .collect())
    }

    /// Write `rec` for `site` and drop every unused token of the site, in one batch.
    pub fn put_site_dropping_tokens(
        &self,
        site: &str,
        rec: &SiteRecord,
    ) -> Result<(), CatalogError> {
        let tokens = self.enrollments_of(site)?;
        let db = self.writer()?;
        let mut b = Batch::default();
        b.put_cf(db.cf(CF_SITES), site.as_bytes(), rec.encode()?);
        for (k, _) in tokens {
            b.delete_cf(db.cf(CF_ENROLLMENTS), k);
        }
        self.wrote(db.write(b, Durability::Synced))
    }

    // ---- placements ----

    pub fn placements(&self, g: &GlobalId) -> Result<Vec<(String, PlacementRecord)>, CatalogError> {
        Ok(self
            .db()
            .scan::<PlacementRecord>(CF_PLACEMENTS, g.as_bytes())?
            .into_iter()
            .map(|(k, r)| (String::from_utf8_lossy(&k[12..]).into_owned(), r))
            .collect())
    }

    pub fn placement(
        &self,
        g: &GlobalId,
        site: &str,
    ) -> Result<Option<PlacementRecord>, CatalogError> {
        self.db().get(CF_PLACEMENTS, &placement_key(g, site), || {
            format!("placements/{g}/{site}")
        })
    }

    /// Every placement at `site`, for reconciling when its agent connects.
    pub fn placements_at(
        &self,
        site: &str,
    ) -> Result<Vec<(GlobalId, PlacementRecord)>, CatalogError> {
        Ok(self
            .db()
            .scan::<PlacementRecord>(CF_PLACEMENTS, &[])?
            .into_iter()
            .filter(|(k, _)| k.len() > 12 && &k[12..] == site.as_bytes())
            .map(|(k, r)| (GlobalId(k[..12].try_into().expect("12 bytes")), r))
            .collect())
    }

    pub fn put_placement(
        &self,
        g: &GlobalId,
        site: &str,
        p: &PlacementRecord,
    ) -> Result<(), CatalogError> {
        let db = self.writer()?;
        self.wrote(db.put_synced(CF_PLACEMENTS, &placement_key(g, site), p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A placement written by format 1 (before wire_bytes) still reads.
    #[test]
    fn placement_format_1_fixture_reads() {
        // 01 format | 02 version | 02 Published | 01 Some 02 "ab" | 01 Some 02 | 0a | 0b | 00 None
        let v1 = hex::decode("0102020102616201020a0b00").unwrap();
        let p = PlacementRecord::decode(&v1).unwrap();
        assert_eq!(p.version, 2);
        assert_eq!(p.state, PlacementState::Published);
        assert_eq!(p.local_id.as_deref(), Some("ab"));
        assert_eq!((p.bytes_sent, p.bytes_needed, p.wire_bytes), (10, 11, 0));
        let v2 = p.encode().unwrap();
        assert_eq!(v2[0], 2);
        assert_eq!(PlacementRecord::decode(&v2).unwrap(), p);
        // A damaged record is refused with its format named, not misread.
        assert!(
            PlacementRecord::decode(&[3, 1, 2])
                .unwrap_err()
                .to_string()
                .contains("format 3")
        );
        assert!(PlacementRecord::decode(&v1[..5]).is_err());
    }

    /// A manifest record written by format 1 (before file formats) reads, with its id.
    #[test]
    fn manifest_record_format_1_reads_with_its_id() {
        use seedcast_core::manifest::v1::{FileEntryV1, ManifestV1};
        use seedcast_core::manifest::{FileFormat, FileRecipe};
        let old = ManifestV1 {
            format: 1,
            global_id: GlobalId([1; 12]),
            version: 1,
            parent: None,
            name: "img".into(),
            chunking: seedcast_core::ChunkerConfig::default(),
            files: vec![FileEntryV1 {
                path: "disk.raw".into(),
                mode: 0o644,
                recipe: FileRecipe {
                    len: 0,
                    hash: *blake3::hash(b"").as_bytes(),
                    extents: vec![],
                },
            }],
        };
        let id = *blake3::hash(&seedcast_core::codec::encode(&old).unwrap()).as_bytes();
        let rec = ManifestRecordV1 {
            manifest: old,
            manifest_id: id,
            bytes_uploaded: 7,
            created_unix: 9,
        };
        let bytes = seedcast_core::codec::encode_record(1, &rec).unwrap();
        let back = ManifestRecord::decode(&bytes).unwrap();
        assert_eq!(back.manifest.files[0].format, FileFormat::Raw);
        assert_eq!(back.manifest.id().unwrap(), back.manifest_id);
        assert_eq!(back.bytes_uploaded, 7);
        // Written again, it is format 2 and still reads the same.
        let again = back.encode().unwrap();
        assert_eq!(again[0], 2);
        assert_eq!(ManifestRecord::decode(&again).unwrap(), back);
    }

    /// A format-1 catalog (no `enrollments` family, version-1 site records) opens, is
    /// upgraded, and its sites keep their certificate.
    #[test]
    fn a_format_1_catalog_is_upgraded_and_keeps_its_sites() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cat");
        const V1: Spec = Spec {
            families: &[
                (CF_CHUNKS, Layout::Records),
                (CF_MANIFESTS, Layout::Records),
                (CF_IMAGES, Layout::Records),
                (CF_SITES, Layout::Records),
                (CF_PLACEMENTS, Layout::Records),
                (CF_NOTES, Layout::Records),
                (CF_META, Layout::Records),
            ],
            meta_family: CF_META,
            format_key: b"catalog_format",
            format: 1,
            upgrades_from: &[],
            cache_bytes: 1 << 20,
        };
        {
            let db = Db::open(&p, &V1).unwrap();
            let old = SiteRecordV1 {
                adapter: "dir".into(),
                cert_fingerprint: [7; 32],
                enrolled_unix: 5,
                revoked: false,
            };
            let bytes = seedcast_core::codec::encode_record(1, &old).unwrap();
            db.put_raw_synced(CF_SITES, b"a", &bytes).unwrap();
        }
        let c = Catalog::open(&p).unwrap();
        let a = c.site("a").unwrap().unwrap();
        assert_eq!(a.cert_fingerprint, Some([7; 32]));
        assert_eq!((a.cert_expires_unix, a.next_fingerprint), (0, None));
        let key = [1u8; 32];
        let t = EnrollmentRecord {
            site: "b".into(),
            created_unix: 1,
            expires_unix: 2,
        };
        c.put_enrollment(&key, &t).unwrap();
        assert_eq!(c.enrollments_of("b").unwrap(), vec![(key, t)]);
        drop(c);
        // A build of the old layout no longer opens it (RocksDB names the new family).
        let e = Db::open(&p, &V1).unwrap_err().to_string();
        assert!(e.contains("enrollments"), "{e}");
    }

    #[test]
    fn reopens_and_refuses_foreign_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cat");
        {
            let c = Catalog::open(&p).unwrap();
            c.put_site("a", &Catalog::new_site_record("dir", [1; 32], 0))
                .unwrap();
        }
        {
            let c = Catalog::open(&p).unwrap();
            assert_eq!(c.site("a").unwrap().unwrap().adapter, "dir");
            assert_eq!(c.sites().unwrap().len(), 1);
            // A record of a format this build does not know is refused, not misread.
            c.db().put_raw_synced(CF_SITES, b"b", &[9u8, 1, 2]).unwrap();
            let e = c.site("b").unwrap_err().to_string();
            assert!(e.contains("format 9"), "{e}");
            c.db()
                .put_raw_synced(CF_META, b"catalog_format", &[7u8])
                .unwrap();
        }
        let e = Catalog::open(&p).unwrap_err().to_string();
        assert!(e.contains("format 7"), "{e}");
    }

    proptest::proptest! {
        /// A damaged record on disk is an error naming it, never a panic.
        #[test]
        fn any_bytes_as_any_record_never_panic(
            b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let _ = ChunkRecord::decode(&b);
            let _ = ManifestRecord::decode(&b);
            let _ = ImageRecord::decode(&b);
            let _ = SiteRecord::decode(&b);
            let _ = EnrollmentRecord::decode(&b);
            let _ = PlacementRecord::decode(&b);
            let _ = VersionNote::decode(&b);
            // The same bytes behind each format byte these records have had.
            for format in [1u8, 2] {
                let mut r = vec![format];
                r.extend_from_slice(&b);
                let _ = ManifestRecord::decode(&r);
                let _ = SiteRecord::decode(&r);
                let _ = PlacementRecord::decode(&r);
            }
        }
    }
}
