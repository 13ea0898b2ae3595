//! `dir`: a directory pool of image files.
//!
//! Each published image is a directory `POOL/<uuid>/` holding its files by their base
//! names, plus `.seedcast.json` (global id, version, each file's format) for operators. The
//! UUID is the local id. Files are as they were pushed: raw files as raw (holes stay holes:
//! sparse files), qcow2 disks rebuilt as qcow2 by `qemu-img` from their guest content.
//! Images are staged in `POOL/.staging/` (same filesystem) and renamed into place, so a
//! reader of the pool never sees a half-written image.

use std::fs;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;

use seedcast_core::manifest::FileFormat;

use crate::adapter::{Adapter, AdapterError, AssembledImage, Leftover, ReadBack};
use crate::adapters::local::{self, Sidecar, Stored, sync_dir};

#[derive(Debug)]
pub struct DirAdapter {
    pool: PathBuf,
    staging: PathBuf,
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

    fn keeps_copies(&self) -> bool {
        true
    }

    fn exists<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<bool, AdapterError>> {
        Box::pin(async move {
            Ok(check_local_id(local_id).is_ok() && self.image_dir(local_id).is_dir())
        })
    }

    fn staging_root(&self) -> &Path {
        &self.staging
    }

    fn publish(&self, image: AssembledImage) -> BoxFuture<'_, Result<String, AdapterError>> {
        Box::pin(async move {
            let local_id = uuid::Uuid::new_v4().to_string();
            let mut sidecar = Sidecar::of(&image);
            for f in &image.files {
                if f.format == FileFormat::Qcow2 {
                    // Rebuilt as the qcow2 disk it was pushed as.
                    let raw = image.file_path(&f.name);
                    let tmp = image.dir().join(format!(".{}.qcow2", f.name));
                    let (r2, t2) = (raw.clone(), tmp.clone());
                    tokio::task::spawn_blocking(move || local::raw_to_qcow2(&r2, &t2, None))
                        .await??;
                    fs::rename(&tmp, &raw).map_err(AdapterError::io("rename", &raw))?;
                }
                let stored = Stored {
                    path: f.name.clone(),
                    format: f.format.as_str().into(),
                    backing: None,
                };
                sidecar.files.insert(f.name.clone(), stored);
            }
            sidecar.write(image.dir())?;
            // The sidecar's and renamed disks' entries are durable before the image is.
            sync_dir(image.dir())?;
            let dest = self.image_dir(&local_id);
            let src = image.into_dir();
            fs::rename(&src, &dest).map_err(AdapterError::io("publish", &dest))?;
            sync_dir(&self.pool)?;
            Ok(local_id)
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Option<Vec<String>>, AdapterError>> {
        Box::pin(async move {
            let mut ids = Vec::new();
            let entries = fs::read_dir(&self.pool).map_err(AdapterError::io("list", &self.pool))?;
            for e in entries {
                let e = e.map_err(AdapterError::io("list", &self.pool))?;
                let name = e.file_name().to_string_lossy().into_owned();
                // Only what this adapter makes: a UUID-named directory with a sidecar.
                if check_local_id(&name).is_ok() && e.path().join(local::SIDECAR).is_file() {
                    ids.push(name);
                }
            }
            Ok(Some(ids))
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
            local::read_back(dir, local_id, file).await
        })
    }

    fn delete<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move { self.hide(local_id).await?.remove().await })
    }

    /// Moved into staging (the same filesystem: a rename), so the image disappears at once;
    /// its files go when the leftover is freed, or with staging at the next start.
    fn hide<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<Leftover, AdapterError>> {
        Box::pin(async move {
            check_local_id(local_id)?;
            let dir = self.image_dir(local_id);
            if !dir.exists() {
                return Err(AdapterError::NotFound(local_id.to_string()));
            }
            let trash = self.staging.join(format!("deleted-{local_id}"));
            fs::rename(&dir, &trash).map_err(AdapterError::io("delete", &dir))?;
            Ok(Leftover::dir(trash))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::AssembledFile;
    use seedcast_core::GlobalId;

    fn staged(a: &DirAdapter, name: &str, body: &[u8]) -> AssembledImage {
        let dir = a.staging_root().join(format!("t-{name}"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), body).unwrap();
        AssembledImage::new(
            dir,
            GlobalId([1; 12]),
            1,
            [0; 32],
            "img".into(),
            vec![AssembledFile {
                name: name.into(),
                len: body.len() as u64,
                mode: 0o644,
                format: FileFormat::Raw,
                disk: true,
            }],
        )
    }

    #[tokio::test]
    async fn publish_read_back_update_and_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let a = DirAdapter::new(tmp.path().join("pool")).unwrap();
        assert!(a.keeps_copies());
        let id = a.publish(staged(&a, "disk.raw", b"one")).await.unwrap();
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
        assert!(a.exists(&id).await.unwrap());
        let rb = a.read_back(&id, "disk.raw").await.unwrap();
        assert_eq!(fs::read(rb.path()).unwrap(), b"one");
        let meta: serde_json::Value =
            serde_json::from_slice(&fs::read(a.image_dir(&id).join(".seedcast.json")).unwrap())
                .unwrap();
        assert_eq!(meta["global_id"], GlobalId([1; 12]).to_string());
        // An update publishes the new image, then removes the old one.
        let id2 = a.update(&id, staged(&a, "disk.raw", b"two")).await.unwrap();
        assert_ne!(id, id2);
        assert!(!a.exists(&id).await.unwrap());
        assert!(matches!(
            a.read_back(&id, "disk.raw").await,
            Err(AdapterError::NotFound(_))
        ));
        a.delete(&id2).await.unwrap();
        assert!(matches!(
            a.delete(&id2).await,
            Err(AdapterError::NotFound(_))
        ));
        // Nothing left behind in staging.
        assert_eq!(fs::read_dir(a.staging_root()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_retired_image_leaves_the_pool_at_once_and_its_bytes_when_freed() {
        let tmp = tempfile::tempdir().unwrap();
        let a = DirAdapter::new(tmp.path().join("pool")).unwrap();
        let id = a.publish(staged(&a, "disk.raw", b"old")).await.unwrap();
        let left = a.retire(&id).await;
        // Out of the service's view before it is freed: not listed, not readable.
        assert!(!a.exists(&id).await.unwrap());
        assert_eq!(a.list().await.unwrap(), Some(vec![]));
        assert_eq!(fs::read_dir(a.staging_root()).unwrap().count(), 1);
        left.free().await;
        assert_eq!(fs::read_dir(a.staging_root()).unwrap().count(), 0);
        // Retiring what is gone leaves nothing to free.
        a.retire(&id).await.remove().await.unwrap();
        // A crash before freeing: the next start sweeps it with staging.
        let id = a.publish(staged(&a, "disk.raw", b"old")).await.unwrap();
        let left = a.retire(&id).await;
        drop(left);
        drop(a);
        let a = DirAdapter::new(tmp.path().join("pool")).unwrap();
        assert_eq!(fs::read_dir(a.staging_root()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn local_ids_and_file_names_cannot_name_paths_outside_the_pool() {
        let tmp = tempfile::tempdir().unwrap();
        let a = DirAdapter::new(tmp.path().join("pool")).unwrap();
        fs::write(tmp.path().join("secret"), b"s").unwrap();
        let id = a.publish(staged(&a, "disk.raw", b"x")).await.unwrap();
        for bad in ["..", "../secret", ".staging", "/etc", ""] {
            assert!(!a.exists(bad).await.unwrap(), "{bad}");
            assert!(
                matches!(
                    a.read_back(bad, "disk.raw").await,
                    Err(AdapterError::NotFound(_))
                ),
                "{bad}"
            );
            assert!(
                matches!(a.delete(bad).await, Err(AdapterError::NotFound(_))),
                "{bad}"
            );
        }
        for bad in ["../../secret", ".seedcast.json", "a/b", ""] {
            assert!(
                matches!(
                    a.read_back(&id, bad).await,
                    Err(AdapterError::NoSuchFile { .. })
                ),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn interrupted_stagings_are_swept_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = tmp.path().join("pool");
        let a = DirAdapter::new(pool.clone()).unwrap();
        let id = a.publish(staged(&a, "disk.raw", b"kept")).await.unwrap();
        // A crash mid-assembly leaves a half-written image in staging.
        let half = a.staging_root().join("t9-half");
        fs::create_dir_all(&half).unwrap();
        fs::write(half.join("disk.raw"), b"partial").unwrap();
        drop(a);
        let a = DirAdapter::new(pool).unwrap();
        assert_eq!(fs::read_dir(a.staging_root()).unwrap().count(), 0);
        assert!(
            a.exists(&id).await.unwrap(),
            "published images are untouched"
        );
    }
}
