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
    let manifest_id = manifest.id()?;
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
        // Format 3: the file's hash is its recipe's, and every chunk written was verified
        // against its id when it arrived. Older manifests hash the bytes as written.
        let by_bytes = !manifest.hashes_recipes();
        if !by_bytes && f.recipe.content_hash() != f.recipe.hash {
            return Err(AssembleError::FileHash {
                path: f.path.clone(),
                expected: hex::encode(f.recipe.hash),
                actual: hex::encode(f.recipe.content_hash()),
            });
        }
        let mut hasher = blake3::Hasher::new();
        for (off, e) in f.recipe.extents_at() {
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
                    if by_bytes {
                        hasher.update(&data);
                    }
                }
                Extent::Hole { len } if by_bytes => hash_zeros(&mut hasher, *len),
                Extent::Hole { .. } => {}
            }
        }
        let actual = hasher.finalize();
        if by_bytes && actual.as_bytes() != &f.recipe.hash {
            return Err(AssembleError::FileHash {
                path: f.path.clone(),
                expected: hex::encode(f.recipe.hash),
                actual: actual.to_hex().to_string(),
            });
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
    File::open(&staging)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", &staging))?;
    Ok(image)
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
}
