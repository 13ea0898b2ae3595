//! Seeds: the images a site already holds, used as a source of chunks (as casync's
//! `--seed`), so a site whose cache was wiped still reuses what it has published.
//!
//! The index maps every chunk of every held version to where it sits in the published
//! files. Bytes read from a seed are hashed before use: a seed that was changed outside
//! seedcast simply stops providing those chunks.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use seedcast_core::{ChunkId, GlobalId, VerifiedChunk};
use tracing::debug;

use crate::adapter::{Adapter, ReadBack};
use crate::cache::{AgentDb, CacheError};

#[derive(Debug, Clone)]
struct Loc {
    file: usize,
    offset: u64,
    len: u32,
}

/// Where each chunk of the held images can be read.
#[derive(Debug, Default)]
pub struct SeedIndex {
    locs: HashMap<ChunkId, Loc>,
    /// Open published files (kept with their read-back handles alive).
    files: Vec<(Arc<File>, ReadBack)>,
    /// The held version of each image.
    held: HashMap<GlobalId, u32>,
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
            ix.held.insert(held.global_id, held.version);
            if !adapter.keeps_copies() {
                continue;
            }
            for f in &m.files {
                let rb = match adapter.read_back(&held.local_id, &f.path).await {
                    Ok(rb) => rb,
                    Err(e) => {
                        debug!(local_id = %held.local_id, file = %f.path, "no seed: {e}");
                        continue;
                    }
                };
                let Ok(file) = File::open(rb.path()) else {
                    continue;
                };
                if file.metadata().map(|m| m.len()).ok() != Some(f.recipe.len) {
                    continue;
                }
                let fi = ix.files.len();
                ix.files.push((Arc::new(file), rb));
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

    /// Read `id` from a seed and check it. Blocking (a positioned read).
    pub fn read(&self, id: &ChunkId) -> Option<VerifiedChunk> {
        let loc = self.locs.get(id)?;
        let mut buf = vec![0u8; loc.len as usize];
        self.files[loc.file]
            .0
            .read_exact_at(&mut buf, loc.offset)
            .ok()?;
        VerifiedChunk::check(*id, Bytes::from(buf)).ok()
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
