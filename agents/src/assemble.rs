//! Rebuild an image's files from cached chunks and check each against its whole-file hash.
//!
//! Files are created at full length (sparse) and only data extents are written, so holes
//! stay holes on the site's disk. Each file is hashed in order as it is written (holes as
//! zeros) and compared with the recipe's hash before anything is handed to an adapter.

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use seedcast_core::manifest::hash_zeros;
use seedcast_core::{ChunkId, Extent, Manifest};

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
    Manifest(String),
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
    let manifest_id = manifest
        .id()
        .map_err(|e| AssembleError::Manifest(e.to_string()))?;
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(io("clean", &staging))?;
    }
    fs::create_dir_all(&staging).map_err(io("create", &staging))?;
    // From here the image owns the directory and removes it if we return early.
    let mut image = AssembledImage::new(
        staging.clone(),
        manifest.global_id,
        manifest.version,
        manifest_id,
        manifest.name.clone(),
        Vec::new(),
    );
    for f in &manifest.files {
        let path = staging.join(&f.path);
        let file = File::create(&path).map_err(io("create", &path))?;
        file.set_len(f.recipe.len).map_err(io("size", &path))?;
        let mut hasher = blake3::Hasher::new();
        let mut off = 0u64;
        for e in &f.recipe.extents {
            match e {
                Extent::Data { id, len } => {
                    let data = db.chunk(id)?.ok_or(AssembleError::MissingChunk(*id))?;
                    if data.len() != *len as usize {
                        return Err(AssembleError::ChunkLength {
                            id: *id,
                            expected: *len,
                            actual: data.len(),
                        });
                    }
                    file.write_all_at(&data, off).map_err(io("write", &path))?;
                    hasher.update(&data);
                }
                Extent::Hole { len } => hash_zeros(&mut hasher, *len),
            }
            off += e.len();
        }
        let actual = hasher.finalize();
        if actual.as_bytes() != &f.recipe.hash {
            return Err(AssembleError::FileHash {
                path: f.path.clone(),
                expected: hex::encode(f.recipe.hash),
                actual: actual.to_hex().to_string(),
            });
        }
        file.set_permissions(fs::Permissions::from_mode(f.mode & 0o7777))
            .map_err(io("chmod", &path))?;
        file.sync_all().map_err(io("sync", &path))?;
        image.files.push(AssembledFile {
            name: f.path.clone(),
            len: f.recipe.len,
            mode: f.mode,
        });
    }
    File::open(&staging)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", &staging))?;
    Ok(image)
}
