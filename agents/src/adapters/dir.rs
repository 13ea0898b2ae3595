//! `dir`: a directory pool of raw image files.
//!
//! Each published image is a directory `POOL/<uuid>/` holding its files by their base
//! names, plus `.seedcast.json` (global id, version) for operators. The UUID is the local
//! id. Images are staged in `POOL/.staging/` (same filesystem) and renamed into place, so a
//! reader of the pool never sees a half-written image; holes stay holes (sparse files).

use std::fs;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;

use crate::adapter::{Adapter, AdapterError, AssembledImage, ReadBack};

#[derive(Debug)]
pub struct DirAdapter {
    pool: PathBuf,
    staging: PathBuf,
}

fn sync_dir(p: &Path) -> Result<(), AdapterError> {
    fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(AdapterError::io("sync", p))
}

/// Local ids are UUIDs; anything else cannot name an image here (and must not name a path).
fn check_local_id(id: &str) -> Result<(), AdapterError> {
    uuid::Uuid::parse_str(id)
        .map(|_| ())
        .map_err(|_| AdapterError::NotFound(id.to_string()))
}

impl DirAdapter {
    /// Use (creating if needed) `pool`. Leftovers of interrupted stagings are removed.
    pub fn new(pool: PathBuf) -> Result<Self, AdapterError> {
        let staging = pool.join(".staging");
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(AdapterError::io("clean", &staging))?;
        }
        fs::create_dir_all(&staging).map_err(AdapterError::io("create", &staging))?;
        Ok(DirAdapter { pool, staging })
    }

    pub fn pool(&self) -> &Path {
        &self.pool
    }

    /// Where the image with `local_id` lives.
    pub fn image_dir(&self, local_id: &str) -> PathBuf {
        self.pool.join(local_id)
    }
}

impl Adapter for DirAdapter {
    fn kind(&self) -> &'static str {
        "dir"
    }

    fn staging_root(&self) -> &Path {
        &self.staging
    }

    fn publish(&self, image: AssembledImage) -> BoxFuture<'_, Result<String, AdapterError>> {
        Box::pin(async move {
            let local_id = uuid::Uuid::new_v4().to_string();
            let meta = serde_json::json!({
                "global_id": image.global_id.to_string(),
                "version": image.version,
                "name": image.name,
                "manifest_id": hex::encode(image.manifest_id),
            });
            let meta_path = image.dir().join(".seedcast.json");
            fs::write(&meta_path, format!("{meta:#}\n"))
                .map_err(AdapterError::io("write", &meta_path))?;
            let dest = self.image_dir(&local_id);
            let src = image.into_dir();
            fs::rename(&src, &dest).map_err(AdapterError::io("publish", &dest))?;
            sync_dir(&self.pool)?;
            Ok(local_id)
        })
    }

    fn read_back<'a>(
        &'a self,
        local_id: &'a str,
        file: &'a str,
    ) -> BoxFuture<'a, Result<ReadBack, AdapterError>> {
        Box::pin(async move {
            check_local_id(local_id)?;
            let dir = self.image_dir(local_id);
            if !dir.is_dir() {
                return Err(AdapterError::NotFound(local_id.to_string()));
            }
            seedcast_core::manifest::validate_file_name(file).map_err(|_| {
                AdapterError::NoSuchFile {
                    local_id: local_id.to_string(),
                    file: file.to_string(),
                }
            })?;
            let p = dir.join(file);
            if !p.is_file() {
                return Err(AdapterError::NoSuchFile {
                    local_id: local_id.to_string(),
                    file: file.to_string(),
                });
            }
            Ok(ReadBack::InPlace(p))
        })
    }

    fn delete<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move {
            check_local_id(local_id)?;
            let dir = self.image_dir(local_id);
            if !dir.exists() {
                return Err(AdapterError::NotFound(local_id.to_string()));
            }
            // Move it out of sight first, so the image disappears at once, then remove.
            let trash = self.staging.join(format!("deleted-{local_id}"));
            fs::rename(&dir, &trash).map_err(AdapterError::io("delete", &dir))?;
            fs::remove_dir_all(&trash).map_err(AdapterError::io("delete", &trash))?;
            Ok(())
        })
    }
}
