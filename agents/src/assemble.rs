//! Build an image's files from the chunks a transfer brings (written as they arrive) and
//! cached ones, and check each against its whole-file hash.
//!
//! Files are created at full length (sparse) and only data extents are written, so holes
//! stay holes on the site's disk. Every chunk written was verified against its id; a file's
//! recipe is checked against the manifest's hash of it (files of manifests older than
//! format 3 are hashed as written, in order) before anything is handed to an adapter.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use seedcast_core::manifest::hash_zeros;
use seedcast_core::{ChunkId, Extent, Manifest, VerifiedChunk};

use crate::adapter::{AssembledFile, AssembledImage};
use crate::cache::{AgentDb, CacheError};

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("chunk {0} is not in the cache")]
    MissingChunk(ChunkId),
    #[error("chunk {id} in the cache is {actual} bytes, the recipe says {expected}")]
    ChunkLength {
        id: ChunkId,
        expected: u32,
        actual: usize,
    },
    #[error(
        "file {path:?} does not match its hash after assembly: expected {expected}, got {actual}"
    )]
    FileHash {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("manifest: {0}")]
    Manifest(#[from] seedcast_core::codec::CodecError),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> AssembleError + 'a {
    move |source| AssembleError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Build every file of `manifest` in a fresh directory `staging` from chunks in `db`.
/// Blocking: call from a blocking thread. On error the staging directory is removed.
pub fn assemble(
    db: &AgentDb,
    manifest: &Manifest,
    staging: PathBuf,
) -> Result<AssembledImage, AssembleError> {
    Staging::create(manifest, staging, &[])?.finish(db, manifest)
}

/// An image being built while its chunks arrive.
///
/// The files are created at full length (sparse) before the first chunk is asked for, and
/// every chunk the transfer brings is written where the manifest places it as soon as it
/// is verified, on the receiving thread ([`Staging::write`]). Assembly afterwards only fills
/// in the chunks the site already held. Before, the agent cached every chunk, waited for
/// the last, then read each back from the cache and wrote the image on one thread: a fifth
/// of its CPU, and all of it after the transfer (`docs/BENCHMARKS.md`).
///
/// Dropping a `Staging` that was not finished removes its directory: a failed transfer
/// leaves nothing half-written behind.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    files: Vec<File>,
    /// Where each chunk to be received goes: (file, offset, length). Only chunks of the
    /// transfer, so its size is bounded by what the manifest may hold.
    places: HashMap<ChunkId, Vec<(u32, u64, u32)>>,
    /// The directory became an [`AssembledImage`]: no cleanup here.
    handed_over: AtomicBool,
    /// Every chunk not being received was written by [`Staging::prefill`].
    prefilled: AtomicBool,
    /// The transfer ended without an image: a running prefill stops.
    cancelled: AtomicBool,
    /// Bytes written since the files were last synced, and when that was.
    unsynced: Mutex<(u64, Instant)>,
}

/// The staged files are synced whenever this much was written into them since the last
/// sync (the chunk cache's flush cadence) ...
const SYNC_EVERY: u64 = 16 << 20;
/// ... or this long ago: then the sync that makes the finished image durable writes only
/// the last moments of the transfer. Once at the end, it wrote everything a thin link
/// brought (0.15 s of a 10 Mbit/s update's 8 s, after its last byte).
const SYNC_AFTER: Duration = Duration::from_secs(2);

impl Staging {
    /// Create the image's files in a fresh directory `dir`; chunks in `receive` will be
    /// written as they arrive. Manifests older than format 3 hash files by their bytes in
    /// order, so they are staged whole at [`Staging::finish`] instead. Blocking.
    pub fn create(
        manifest: &Manifest,
        dir: PathBuf,
        receive: &[ChunkId],
    ) -> Result<Staging, AssembleError> {
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io("clean", &dir))?;
        }
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let mut staging = Staging {
            dir,
            files: Vec::new(),
            places: HashMap::new(),
            handed_over: AtomicBool::new(false),
            prefilled: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            unsynced: Mutex::new((0, Instant::now())),
        };
        for f in &manifest.files {
            let path = staging.dir.join(&f.path);
            let file = File::create(&path).map_err(io("create", &path))?;
            file.set_len(f.recipe.len).map_err(io("size", &path))?;
            staging.files.push(file);
        }
        if manifest.hashes_recipes() && !receive.is_empty() {
            let wanted: HashSet<&ChunkId> = receive.iter().collect();
            for (i, f) in manifest.files.iter().enumerate() {
                for (off, e) in f.recipe.extents_at() {
                    if let Extent::Data { id, len } = e
                        && wanted.contains(id)
                    {
                        staging
                            .places
                            .entry(*id)
                            .or_default()
                            .push((i as u32, off, *len));
                    }
                }
            }
        }
        Ok(staging)
    }

    /// Write a verified chunk wherever the image has it (nothing if it is not one this
    /// staging waits for). Safe from several threads at once. Blocking.
    /// Write every chunk of the image this site already holds (each data extent not being
    /// received) from the cache, while the rest of the transfer travels: [`Staging::finish`]
    /// then only checks and syncs, instead of copying the unchanged bulk of an update after
    /// its last byte arrived. Only for manifests whose file hashes are their recipes' (the
    /// bytes need not be hashed again). Blocking.
    pub fn prefill(&self, db: &AgentDb, manifest: &Manifest) -> Result<(), AssembleError> {
        if !manifest.hashes_recipes() {
            return Ok(());
        }
        for (f, file) in manifest.files.iter().zip(&self.files) {
            fill_from_cache(db, file, &self.dir, &self.held(f), &self.cancelled)?;
            if self.cancelled.load(Ordering::Relaxed) {
                return Ok(());
            }
            // Written back now, while the rest travels: the sync in `finish` then has only
            // the received chunks to write (the Debian update's held 500 MB took 0.1–0.2 s
            // there, after the last byte had arrived).
            file.sync_data().map_err(io("sync", &self.dir))?;
        }
        self.prefilled.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// The data extents of `f` not being received (offset, id, length): the site holds them.
    fn held(&self, f: &seedcast_core::FileEntry) -> Vec<(u64, ChunkId, u32)> {
        f.recipe
            .extents_at()
            .filter_map(|(off, e)| match e {
                Extent::Data { id, len } if !self.places.contains_key(id) => Some((off, *id, *len)),
                _ => None,
            })
            .collect()
    }

    /// Stop a running [`Staging::prefill`] (the transfer failed or was abandoned).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    pub fn write(&self, chunk: &VerifiedChunk) -> Result<(), AssembleError> {
        let Some(places) = self.places.get(&chunk.id()) else {
            return Ok(());
        };
        let data = chunk.raw();
        for &(file, off, len) in places {
            if data.len() != len as usize {
                return Err(AssembleError::ChunkLength {
                    id: chunk.id(),
                    expected: len,
                    actual: data.len(),
                });
            }
            self.files[file as usize]
                .write_all_at(data, off)
                .map_err(io("write", &self.dir))?;
        }
        self.written(data.len() as u64 * places.len() as u64)
    }

    /// Count bytes written; sync the files once [`SYNC_EVERY`] or [`SYNC_AFTER`] has
    /// passed (on the writer's thread, as the cache's flushes, with the count released:
    /// other streams go on writing).
    fn written(&self, n: u64) -> Result<(), AssembleError> {
        let due = {
            let mut u = self.unsynced.lock();
            u.0 += n;
            let due = u.0 >= SYNC_EVERY || u.1.elapsed() >= SYNC_AFTER;
            if due {
                *u = (0, Instant::now());
            }
            due
        };
        if due {
            for f in &self.files {
                f.sync_data().map_err(io("sync", &self.dir))?;
            }
        }
        Ok(())
    }

    /// Write the chunks that did not arrive (the site held them) from `db`, check each
    /// file, set its mode and make it durable. Call once every chunk given to
    /// [`Staging::create`] has been [written](Staging::write). Blocking.
    pub fn finish(
        &self,
        db: &AgentDb,
        manifest: &Manifest,
    ) -> Result<AssembledImage, AssembleError> {
        let manifest_id = manifest.id()?;
        // From here the image owns the directory and removes it if we return early.
        self.handed_over.store(true, Ordering::SeqCst);
        let mut image = AssembledImage::new(
            self.dir.clone(),
            manifest.global_id,
            manifest.version,
            manifest_id,
            manifest.name.clone(),
            Vec::new(),
        );
        for (f, file) in manifest.files.iter().zip(&self.files) {
            let path = self.dir.join(&f.path);
            // Format 3: the file's hash is its recipe's, and every chunk written was
            // verified against its id when it arrived. Older manifests hash the bytes as
            // written.
            let by_bytes = !manifest.hashes_recipes();
            let prefilled = !by_bytes && self.prefilled.load(Ordering::SeqCst);
            if !by_bytes && f.recipe.content_hash() != f.recipe.hash {
                return Err(AssembleError::FileHash {
                    path: f.path.clone(),
                    expected: hex::encode(f.recipe.hash),
                    actual: hex::encode(f.recipe.content_hash()),
                });
            }
            if by_bytes {
                let mut hasher = blake3::Hasher::new();
                for (off, e) in f.recipe.extents_at() {
                    match e {
                        Extent::Data { id, len } => {
                            let data = cached(db, id, *len)?;
                            file.write_all_at(&data, off).map_err(io("write", &path))?;
                            hasher.update(&data);
                        }
                        Extent::Hole { len } => hash_zeros(&mut hasher, *len),
                    }
                }
                let actual = hasher.finalize();
                if actual.as_bytes() != &f.recipe.hash {
                    return Err(AssembleError::FileHash {
                        path: f.path.clone(),
                        expected: hex::encode(f.recipe.hash),
                        actual: actual.to_hex().to_string(),
                    });
                }
            } else if !prefilled {
                fill_from_cache(db, file, &path, &self.held(f), &AtomicBool::new(false))?;
            }
            // Permission bits only: never setuid, setgid or sticky from a manifest.
            file.set_permissions(fs::Permissions::from_mode(f.mode & 0o777))
                .map_err(io("chmod", &path))?;
            file.sync_all().map_err(io("sync", &path))?;
            image.files.push(AssembledFile {
                name: f.path.clone(),
                len: f.recipe.len,
                mode: f.mode & 0o777,
                format: f.format,
                disk: f.is_disk(),
            });
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", &self.dir))?;
        Ok(image)
    }
}

/// A cached chunk's bytes, checked against the length the recipe gives it.
fn cached<'a>(
    db: &'a AgentDb,
    id: &ChunkId,
    len: u32,
) -> Result<crate::cache::CachedChunk<'a>, AssembleError> {
    let data = db.chunk(id)?.ok_or(AssembleError::MissingChunk(*id))?;
    if data.len() != len as usize {
        return Err(AssembleError::ChunkLength {
            id: *id,
            expected: len,
            actual: data.len(),
        });
    }
    Ok(data)
}

/// Most threads that read chunks back from the cache for one file.
const FILL_THREADS: usize = 4;

/// Write `todo`'s chunks (offset, id, length) into `file` from the cache. Reading a chunk
/// back decompresses it (the cache keeps chunks as they travelled), and an image rebuilt
/// from the cache is nothing but this, so the reads run on the machine's cores (at most
/// [`FILL_THREADS`], each a consecutive run of `todo`) and hand the bytes to this thread,
/// which alone writes: ext4 takes a file's lock for each buffered write, and two threads
/// writing one file spun on it (11 % of the agent's CPU when both wrote). Stops early,
/// without error, once `cancelled`.
fn fill_from_cache(
    db: &AgentDb,
    file: &File,
    path: &Path,
    todo: &[(u64, ChunkId, u32)],
    cancelled: &AtomicBool,
) -> Result<(), AssembleError> {
    let readers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, FILL_THREADS);
    if readers == 1 || todo.len() < 2 * readers {
        for (off, id, len) in todo {
            if cancelled.load(Ordering::Relaxed) {
                return Ok(());
            }
            let data = cached(db, id, *len)?;
            file.write_all_at(&data, *off).map_err(io("write", path))?;
        }
        return Ok(());
    }
    std::thread::scope(|s| {
        // Bounded: a slow disk holds the readers back, not memory.
        let (tx, rx) = std::sync::mpsc::sync_channel(readers * 4);
        for part in todo.chunks(todo.len().div_ceil(readers)) {
            let tx = tx.clone();
            s.spawn(move || {
                for (off, id, len) in part {
                    if cancelled.load(Ordering::Relaxed) {
                        return;
                    }
                    let read = cached(db, id, *len).map(|d| (*off, d));
                    let failed = read.is_err();
                    // The writer is gone (it failed): stop.
                    if tx.send(read).is_err() || failed {
                        return;
                    }
                }
            });
        }
        drop(tx);
        for read in rx {
            let (off, data) = read?;
            file.write_all_at(&data, off).map_err(io("write", path))?;
        }
        Ok(())
    })
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.handed_over.load(Ordering::SeqCst) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{image, noise};
    use bytes::Bytes;
    use seedcast_core::{GlobalId, VerifiedChunk};
    use std::os::unix::fs::MetadataExt;

    /// A manifest of one file of `data` (mode 0640 with setuid and setgid, which a site
    /// must never apply), its chunks put in `db` (except the `skip`th).
    fn manifest(db: &AgentDb, data: &[u8], skip: usize) -> Manifest {
        let (mut m, chunks) = image(GlobalId([1; 12]), 1, data);
        m.files[0].mode = 0o6640;
        for (i, c) in chunks.into_iter().enumerate() {
            if i != skip {
                db.put_chunks(&[c]).unwrap();
            }
        }
        m
    }

    fn sparse_disk() -> Vec<u8> {
        let mut data = vec![0u8; 8 << 20];
        data[..1 << 20].copy_from_slice(&noise("assemble", 1 << 20));
        data[6 << 20..(6 << 20) + 5000].fill(9);
        data
    }

    #[test]
    fn files_are_rebuilt_sparse_with_their_mode_and_hash() {
        let tmp = tempfile::tempdir().unwrap();
        let db = AgentDb::open(&tmp.path().join("db")).unwrap();
        let data = sparse_disk();
        let m = manifest(&db, &data, usize::MAX);
        let img = assemble(&db, &m, tmp.path().join("stage")).unwrap();
        let p = img.file_path("disk.raw");
        assert_eq!(fs::read(&p).unwrap(), data);
        let md = fs::metadata(&p).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o640);
        assert_eq!(img.files[0].mode, 0o640);
        assert!(
            md.blocks() * 512 < 2 << 20,
            "holes stay holes: {}",
            md.blocks() * 512
        );
        assert_eq!(img.manifest_id, m.id().unwrap());
    }

    #[test]
    fn a_missing_short_or_corrupt_chunk_fails_and_leaves_no_staging() {
        let tmp = tempfile::tempdir().unwrap();
        let db = AgentDb::open(&tmp.path().join("db")).unwrap();
        let data = sparse_disk();
        let stage = tmp.path().join("stage");
        // A chunk the cache lacks.
        let m = manifest(&db, &data, 3);
        let e = assemble(&db, &m, stage.clone()).unwrap_err();
        assert!(matches!(e, AssembleError::MissingChunk(_)), "{e}");
        assert!(!stage.exists(), "staging removed on error");
        // A recipe whose whole-file hash does not match what the chunks give.
        let mut m = manifest(&db, &data, usize::MAX);
        m.files[0].recipe.hash = [0; 32];
        let e = assemble(&db, &m, stage.clone()).unwrap_err();
        assert!(matches!(e, AssembleError::FileHash { .. }), "{e}");
        assert!(!stage.exists());
        // A cached chunk of another length than the recipe says.
        let mut m = manifest(&db, &data, usize::MAX);
        let Extent::Data { id, len } = m.files[0].recipe.extents[0] else {
            panic!()
        };
        let short = Bytes::from(vec![1u8; len as usize - 1]);
        m.files[0].recipe.extents[0] = Extent::Data {
            id: VerifiedChunk::from_raw(short.clone()).id(),
            len,
        };
        m.files[0].recipe.hash = m.files[0].recipe.content_hash();
        db.put_chunks(&[VerifiedChunk::from_raw(short)]).unwrap();
        let e = assemble(&db, &m, stage.clone()).unwrap_err();
        assert!(matches!(e, AssembleError::ChunkLength { .. }), "{e}");
        assert!(!stage.exists());
        let _ = id;
    }

    #[test]
    fn what_the_site_holds_is_written_while_the_rest_arrives() {
        let tmp = tempfile::tempdir().unwrap();
        let db = AgentDb::open(&tmp.path().join("db")).unwrap();
        let data = sparse_disk();
        let (m, chunks) = image(GlobalId([3; 12]), 1, &data);
        let (held, arriving) = chunks.split_at(chunks.len() / 2);
        db.put_chunks(held).unwrap();
        let ids: Vec<ChunkId> = arriving.iter().map(|c| c.id()).collect();
        let stage = tmp.path().join("stage");
        let staging = Staging::create(&m, stage.clone(), &ids).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| staging.prefill(&db, &m).unwrap());
            s.spawn(|| arriving.iter().for_each(|c| staging.write(c).unwrap()));
        });
        // Before finishing, every byte is in place already: held chunks from the prefill.
        let written = fs::read(stage.join("disk.raw")).unwrap();
        assert_eq!(written, data);
        let img = staging.finish(&db, &m).unwrap();
        assert_eq!(fs::read(img.file_path("disk.raw")).unwrap(), data);
        // A held chunk missing from the cache fails the prefill, naming it (whichever of the
        // readers finds one first).
        let db2 = AgentDb::open(&tmp.path().join("db2")).unwrap();
        let staging = Staging::create(&m, tmp.path().join("stage2"), &ids).unwrap();
        assert!(matches!(
            staging.prefill(&db2, &m),
            Err(AssembleError::MissingChunk(id)) if held.iter().any(|c| c.id() == id)
        ));
    }

    #[test]
    fn chunks_written_as_they_arrive_and_cached_ones_make_the_same_image() {
        let tmp = tempfile::tempdir().unwrap();
        let db = AgentDb::open(&tmp.path().join("db")).unwrap();
        let mut data = sparse_disk();
        // The same content twice: one chunk, two places.
        data.copy_within(..256 << 10, 3 << 20);
        let (m, chunks) = image(GlobalId([2; 12]), 1, &data);
        // The first half was cached already; the rest "arrives" during the transfer, out of
        // order and from several threads, and is never put in the cache.
        let (held, arriving) = chunks.split_at(chunks.len() / 2);
        db.put_chunks(held).unwrap();
        let ids: Vec<ChunkId> = arriving.iter().map(|c| c.id()).collect();
        let stage = tmp.path().join("stage");
        let staging = Staging::create(&m, stage.clone(), &ids).unwrap();
        std::thread::scope(|s| {
            for part in arriving.chunks(arriving.len().div_ceil(3)) {
                let staging = &staging;
                s.spawn(move || part.iter().rev().for_each(|c| staging.write(c).unwrap()));
            }
        });
        // One of another length than the manifest's is refused.
        let Extent::Data { id, len } = m.files[0].recipe.extents[chunks.len() - 1] else {
            panic!()
        };
        let mut bad = Staging::create(&m, tmp.path().join("bad"), &[id]).unwrap();
        bad.places.get_mut(&id).unwrap()[0].2 = len + 1;
        let c = chunks.iter().find(|c| c.id() == id).unwrap();
        assert!(matches!(
            bad.write(c),
            Err(AssembleError::ChunkLength { .. })
        ));
        // Dropped before it is finished: its directory goes.
        drop(bad);
        assert!(!tmp.path().join("bad").exists());

        let img = staging.finish(&db, &m).unwrap();
        drop(staging);
        let p = img.file_path("disk.raw");
        assert_eq!(fs::read(&p).unwrap(), data);
        assert!(
            p.exists(),
            "a finished staging leaves its directory to the image"
        );
        drop(img);
        assert!(!stage.exists());
    }
}
