//! Seeds: the images a site already holds, used as a source of chunks (as casync's
//! `--seed`), so a site whose cache was wiped still reuses what it has published.
//!
//! The index maps every chunk of every held version to where it sits in the published
//! files. Bytes read from a seed are hashed before use: a seed that was changed outside
//! seedcast stops providing those chunks, and the version it belongs to is noted as
//! drifted (the agent reports it, so `status` shows it for the site).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use seedcast_core::protocol::HeldVersion;
use seedcast_core::{ChunkId, GlobalId, VerifiedChunk};
use tracing::debug;

use crate::adapter::{Adapter, AdapterError, ReadBack};
use crate::cache::{AgentDb, CacheError};

#[derive(Debug, Clone)]
struct Loc {
    file: usize,
    offset: u64,
    len: u32,
}

/// An open published file (kept with its read-back handle alive) and whose it is.
#[derive(Debug)]
struct SeedFile {
    file: Arc<File>,
    _handle: ReadBack,
    owner: HeldVersion,
    path: String,
}

/// Where each chunk of the held images can be read.
#[derive(Debug, Default)]
pub struct SeedIndex {
    locs: HashMap<ChunkId, Loc>,
    files: Vec<SeedFile>,
    /// The held version of each image.
    held: HashMap<GlobalId, u32>,
    /// Held versions whose published copy was found changed, with what differs.
    drifted: Mutex<BTreeMap<(GlobalId, u32), String>>,
}

impl SeedIndex {
    /// Index every image the site holds. Images the service no longer has are skipped; a
    /// service that keeps no readable copies ([`Adapter::keeps_copies`]) provides no seeds,
    /// only the record of which versions are held.
    pub async fn build(db: &AgentDb, adapter: &dyn Adapter) -> Result<Self, CacheError> {
        let mut ix = SeedIndex::default();
        for held in db.inventory()? {
            let Some(m) = db.manifest(&held.global_id, held.version)? else {
                continue;
            };
            // An image marked for repair is left out of what the engine is told the site
            // holds, so it cannot be offered as delta bases either (its verified bytes
            // may still seed).
            if db.repair(&held.global_id)?.is_none() {
                ix.held.insert(held.global_id, held.version);
            }
            if !adapter.keeps_copies() {
                continue;
            }
            let owner = HeldVersion {
                global_id: held.global_id,
                version: held.version,
            };
            for f in &m.files {
                let rb = match adapter.read_back(&held.local_id, &f.path).await {
                    Ok(rb) => rb,
                    Err(e @ AdapterError::NoSuchFile { .. }) => {
                        ix.drift(owner, e.to_string());
                        continue;
                    }
                    Err(e) => {
                        debug!(local_id = %held.local_id, file = %f.path, "no seed: {e}");
                        continue;
                    }
                };
                let Ok(file) = File::open(rb.path()) else {
                    continue;
                };
                match file.metadata().map(|m| m.len()) {
                    Ok(len) if len == f.recipe.len => {}
                    Ok(len) => {
                        ix.drift(
                            owner,
                            format!(
                                "file {:?} is {len} bytes; version {} has {}",
                                f.path, held.version, f.recipe.len
                            ),
                        );
                        continue;
                    }
                    Err(_) => continue,
                }
                let fi = ix.files.len();
                ix.files.push(SeedFile {
                    file: Arc::new(file),
                    _handle: rb,
                    owner,
                    path: f.path.clone(),
                });
                for (offset, id, len) in f.recipe.chunks_at() {
                    ix.locs.entry(id).or_insert(Loc {
                        file: fi,
                        offset,
                        len,
                    });
                }
            }
        }
        Ok(ix)
    }

    /// The version of `g` this site holds, if any.
    pub fn held_version(&self, g: &GlobalId) -> Option<u32> {
        self.held.get(g).copied()
    }

    /// Could a seed provide `id` (not yet read or checked)?
    pub fn has(&self, id: &ChunkId) -> bool {
        self.locs.contains_key(id)
    }

    /// Read `id` from a seed and check it. Blocking (a positioned read). Bytes that no
    /// longer match mark their version drifted.
    pub fn read(&self, id: &ChunkId) -> Option<VerifiedChunk> {
        let loc = self.locs.get(id)?;
        let seed = &self.files[loc.file];
        let mut buf = vec![0u8; loc.len as usize];
        let checked = seed
            .file
            .read_exact_at(&mut buf, loc.offset)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                VerifiedChunk::check(*id, Bytes::from(buf)).map_err(|_| "changed".to_string())
            });
        match checked {
            Ok(c) => Some(c),
            Err(why) => {
                self.drift(
                    seed.owner,
                    format!(
                        "file {:?}: the chunk at byte {} no longer matches ({why})",
                        seed.path, loc.offset
                    ),
                );
                None
            }
        }
    }

    fn drift(&self, owner: HeldVersion, detail: String) {
        self.drifted
            .lock()
            .entry((owner.global_id, owner.version))
            .or_insert(detail);
    }

    /// The held versions found drifted so far (each once), with what differs.
    pub fn take_drifted(&self) -> Vec<(HeldVersion, String)> {
        std::mem::take(&mut *self.drifted.lock())
            .into_iter()
            .map(|((global_id, version), d)| (HeldVersion { global_id, version }, d))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::dir::DirAdapter;
    use crate::adapters::memory::MemoryAdapter;
    use crate::assemble::assemble;
    use crate::cache::HeldRecord;
    use crate::testutil::{image, noise};
    use seedcast_core::Manifest;
    use std::os::unix::fs::FileExt;

    /// Publish an image of `data` through `adapter`, record it as held, then empty the
    /// cache (as a wiped cache would be). Returns the manifest.
    async fn published(db: &AgentDb, adapter: &dyn Adapter, data: &[u8]) -> Manifest {
        let (m, chunks) = image(GlobalId([2; 12]), 3, data);
        db.put_chunks(&chunks).unwrap();
        let img = assemble(db, &m, adapter.staging_root().join("t1")).unwrap();
        let local_id = adapter.publish(img).await.unwrap();
        let rec = HeldRecord {
            version: 3,
            manifest_id: m.id().unwrap(),
            local_id,
            adapter: adapter.kind().into(),
        };
        db.put_held(&m.global_id, &rec, &m).unwrap();
        db.clear_chunks().unwrap();
        m
    }

    fn data() -> Vec<u8> {
        noise("seeds", 1 << 20)
    }

    #[tokio::test]
    async fn chunks_of_held_images_are_read_back_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let db = AgentDb::open(&tmp.path().join("db")).unwrap();
        let dir = DirAdapter::new(tmp.path().join("pool")).unwrap();
        let m = published(&db, &dir, &data()).await;
        let ix = SeedIndex::build(&db, &dir).await.unwrap();
        assert_eq!(ix.held_version(&m.global_id), Some(3));
        let chunks: Vec<_> = m.files[0].recipe.chunks_at().collect();
        for (_, id, _) in &chunks {
            assert!(ix.has(id));
            assert_eq!(ix.read(id).unwrap().id(), *id);
        }
        // A published file changed outside seedcast: that chunk is no longer provided.
        let local = db.held(&m.global_id).unwrap().unwrap().local_id;
        let path = dir.image_dir(&local).join("disk.raw");
        let (off, id, _) = chunks[2];
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"tampered", off + 10)
            .unwrap();
        let ix = SeedIndex::build(&db, &dir).await.unwrap();
        assert!(ix.has(&id), "indexed by location…");
        assert!(
            ix.read(&id).is_none(),
            "…but refused when its bytes do not match"
        );
        assert!(ix.read(&chunks[3].1).is_some());
        let drifted = ix.take_drifted();
        assert_eq!(drifted.len(), 1, "{drifted:?}");
        assert_eq!(
            (drifted[0].0.global_id, drifted[0].0.version),
            (m.global_id, 3)
        );
        assert!(drifted[0].1.contains("disk.raw"), "{}", drifted[0].1);
        assert!(ix.take_drifted().is_empty(), "reported once");
    }

    #[tokio::test]
    async fn a_service_without_readable_copies_provides_no_seeds_but_its_versions_count() {
        let tmp = tempfile::tempdir().unwrap();
        let db = AgentDb::open(&tmp.path().join("db")).unwrap();
        let mem = MemoryAdapter::new().unwrap();
        let m = published(&db, &mem, &data()).await;
        let ix = SeedIndex::build(&db, &mem).await.unwrap();
        assert_eq!(ix.held_version(&m.global_id), Some(3));
        let (_, id, _) = m.files[0].recipe.chunks_at().next().unwrap();
        assert!(!ix.has(&id));
    }

    #[tokio::test]
    async fn an_image_deleted_from_the_service_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let db = AgentDb::open(&tmp.path().join("db")).unwrap();
        let dir = DirAdapter::new(tmp.path().join("pool")).unwrap();
        let m = published(&db, &dir, &data()).await;
        let local = db.held(&m.global_id).unwrap().unwrap().local_id;
        dir.delete(&local).await.unwrap();
        let ix = SeedIndex::build(&db, &dir).await.unwrap();
        let (_, id, _) = m.files[0].recipe.chunks_at().next().unwrap();
        assert!(!ix.has(&id));
    }
}
