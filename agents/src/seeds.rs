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
use seedcast_core::{ChunkId, Extent, GlobalId, VerifiedChunk};
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
    /// Index every image the site holds. Images the service no longer has are skipped.
    pub async fn build(db: &AgentDb, adapter: &dyn Adapter) -> Result<Self, CacheError> {
        let mut ix = SeedIndex::default();
        for held in db.inventory()? {
            let Some(m) = db.manifest(&held.global_id, held.version)? else {
                continue;
            };
            ix.held.insert(held.global_id, held.version);
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
                let mut off = 0u64;
                for e in &f.recipe.extents {
                    if let Extent::Data { id, len } = e {
                        ix.locs.entry(*id).or_insert(Loc {
                            file: fi,
                            offset: off,
                            len: *len,
                        });
                    }
                    off += e.len();
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
