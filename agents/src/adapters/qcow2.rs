//! `qcow2`: VM disks as qcow2 files, as libvirt/KVM hosts keep them.
//!
//! Version V of image G is the directory `POOL/<G>/v<V>/`; its local id is `<G>/v<V>`:
//! stable, and naming the version. Every disk (pushed as qcow2, or a raw `*.raw` file) is
//! written as qcow2 by `qemu-img` from its guest content (sparse in, sparse out; clusters
//! compressed with zstd under `compress = "zstd"`), named `<stem>.qcow2`; kernels, initrds
//! and metadata sit beside it as they are. `.seedcast.json` says which file is which.
//!
//! With `overlays`, a new version of an image this site holds is published as qcow2
//! overlays: each disk's backing file is the previous version's (`../v<P>/<disk>`), and the
//! overlay holds only the clusters whose guest content changed (found by comparing the two
//! guest views where either holds data, and written through a writable export). Versions
//! that other versions back on are never deleted.
//!
//! A version is built in `POOL/<G>/.build-*` (beside the versions, so relative backing
//! paths resolve the same before and after) and renamed into place whole.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use seedcast_core::GlobalId;
use seedcast_core::manifest::FileFormat;
use seedcast_qemu::{Compression, Export, Extent, Format};
use serde::Deserialize;

use crate::adapter::{Adapter, AdapterError, AssembledFile, AssembledImage, Next, ReadBack};
use crate::adapters::local::{self, Sidecar, Stored, sync_dir};

/// Clusters compared and written when building an overlay (qcow2's default size).
const CLUSTER: u64 = 64 * 1024;

/// Options of the `qcow2` adapter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Qcow2Options {
    /// The pool directory (created if missing).
    pub pool: PathBuf,
    /// Compress the clusters of full images: `zstd`.
    #[serde(default)]
    pub compress: Option<Compress>,
    /// Publish a new version of a held image as overlays on the previous one.
    #[serde(default)]
    pub overlays: bool,
}

/// Cluster compression of written images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    Zstd,
}

impl std::str::FromStr for Compress {
    type Err = AdapterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "zstd" => Ok(Compress::Zstd),
            other => Err(AdapterError::Config(format!(
                "unknown compression {other:?} (qcow2 supports: zstd)"
            ))),
        }
    }
}

#[derive(Debug)]
pub struct Qcow2Adapter {
    opts: Qcow2Options,
    staging: PathBuf,
}

/// A local id's parts: `<global id>/v<version>`.
fn parse_local_id(id: &str) -> Result<(GlobalId, u32), AdapterError> {
    let not_found = || AdapterError::NotFound(id.to_string());
    let (g, v) = id.split_once("/v").ok_or_else(not_found)?;
    let g: GlobalId = g.parse().map_err(|_| not_found())?;
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not_found());
    }
    Ok((g, v.parse().map_err(|_| not_found())?))
}

/// The published name of each file: disks as `<stem>.qcow2` (kept unique), others as they
/// are.
fn stored_names(files: &[AssembledFile]) -> Vec<(String, String)> {
    let mut taken: Vec<String> = files
        .iter()
        .filter(|f| !f.disk)
        .map(|f| f.name.clone())
        .collect();
    let mut out = Vec::new();
    for f in files {
        let name = if f.disk {
            let stem = f
                .name
                .strip_suffix(".qcow2")
                .or_else(|| f.name.strip_suffix(".raw"))
                .unwrap_or(&f.name);
            let mut n = format!("{stem}.qcow2");
            while taken.contains(&n) {
                n = format!("{}.qcow2", n.trim_end_matches(".qcow2").to_string() + "_");
            }
            taken.push(n.clone());
            n
        } else {
            f.name.clone()
        };
        out.push((f.name.clone(), name));
    }
    out
}

impl Qcow2Adapter {
    /// Use (creating if needed) the pool. Leftovers of interrupted work are removed.
    pub fn new(opts: Qcow2Options) -> Result<Self, AdapterError> {
        let staging = opts.pool.join(".staging");
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(AdapterError::io("clean", &staging))?;
        }
        fs::create_dir_all(&staging).map_err(AdapterError::io("create", &staging))?;
        let pool = opts.pool.clone();
        for e in fs::read_dir(&pool).map_err(AdapterError::io("list", &pool))? {
            let d = e.map_err(AdapterError::io("list", &pool))?.path();
            if !d.is_dir() {
                continue;
            }
            for b in fs::read_dir(&d).map_err(AdapterError::io("list", &d))? {
                let b = b.map_err(AdapterError::io("list", &d))?.path();
                if b.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".build-"))
                {
                    fs::remove_dir_all(&b).map_err(AdapterError::io("clean", &b))?;
                }
            }
        }
        Ok(Qcow2Adapter { opts, staging })
    }

    /// Where version `v` of `g` lives.
    pub fn version_dir(&self, g: &GlobalId, v: u32) -> PathBuf {
        self.opts.pool.join(g.to_string()).join(format!("v{v}"))
    }

    fn dir_of(&self, local_id: &str) -> Result<PathBuf, AdapterError> {
        let (g, v) = parse_local_id(local_id)?;
        Ok(self.version_dir(&g, v))
    }

    fn compression(&self) -> Option<Compression> {
        self.opts.compress.map(|Compress::Zstd| Compression::Zstd)
    }

    /// Build `image` into a directory beside its versions and rename it into place.
    /// `base`: the published version to write disks as overlays on.
    async fn build(
        &self,
        image: AssembledImage,
        base: Option<(String, Sidecar)>,
    ) -> Result<String, AdapterError> {
        let g = image.global_id;
        let local_id = format!("{g}/v{}", image.version);
        let image_root = self.opts.pool.join(g.to_string());
        fs::create_dir_all(&image_root).map_err(AdapterError::io("create", &image_root))?;
        let build = image_root.join(format!(".build-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir(&build).map_err(AdapterError::io("create", &build))?;
        let built = self.fill(&image, &build, base).await;
        if let Err(e) = built {
            let _ = fs::remove_dir_all(&build);
            return Err(e);
        }
        let dest = self.version_dir(&g, image.version);
        if dest.exists() {
            // The same version again (the site lost its record of it): replace it.
            let trash = self
                .staging
                .join(format!("replaced-{}", uuid::Uuid::new_v4().simple()));
            fs::rename(&dest, &trash).map_err(AdapterError::io("replace", &dest))?;
            let _ = fs::remove_dir_all(&trash);
        }
        fs::rename(&build, &dest).map_err(AdapterError::io("publish", &dest))?;
        sync_dir(&image_root)?;
        Ok(local_id)
    }

    /// Write every file of `image` into `build`: disks as qcow2 (overlays on `base`'s
    /// where it has the same disk), the rest moved as they are; then the sidecar.
    async fn fill(
        &self,
        image: &AssembledImage,
        build: &Path,
        base: Option<(String, Sidecar)>,
    ) -> Result<(), AdapterError> {
        let mut sidecar = Sidecar::of(image);
        for (f, (name, stored_name)) in image.files.iter().zip(stored_names(&image.files)) {
            let src = image.file_path(&name);
            let dst = build.join(&stored_name);
            if !f.disk {
                fs::rename(&src, &dst).map_err(AdapterError::io("move", &src))?;
                let stored = Stored {
                    path: stored_name,
                    format: FileFormat::Raw.as_str().into(),
                    backing: None,
                };
                sidecar.files.insert(name, stored);
                continue;
            }
            let under = base.as_ref().and_then(|(v, sc)| {
                let old = sc.files.get(&name)?;
                (old.format == FileFormat::Qcow2.as_str()).then(|| format!("../{v}/{}", old.path))
            });
            let compression = self.compression();
            let (s2, d2, b2) = (src.clone(), dst.clone(), under.clone());
            tokio::task::spawn_blocking(move || match b2 {
                Some(backing) => write_overlay(&s2, &d2, &backing),
                None => local::raw_to_qcow2(&s2, &d2, compression),
            })
            .await??;
            let stored = Stored {
                path: stored_name,
                format: FileFormat::Qcow2.as_str().into(),
                backing: under,
            };
            sidecar.files.insert(name, stored);
        }
        sidecar.write(build)?;
        sync_dir(build)
    }

    /// Versions of the image in `dir`'s parent whose disks back on `dir`.
    fn dependents(&self, dir: &Path) -> Vec<String> {
        let Some(name) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            return Vec::new();
        };
        let Some(root) = dir.parent() else {
            return Vec::new();
        };
        let prefix = format!("../{name}/");
        let mut out = Vec::new();
        for e in fs::read_dir(root).into_iter().flatten().flatten() {
            let Ok(sc) = Sidecar::read(&e.path()) else {
                continue;
            };
            let backs = sc
                .files
                .values()
                .any(|s| s.backing.as_deref().is_some_and(|b| b.starts_with(&prefix)));
            if backs {
                out.push(format!("{}/v{}", sc.global_id, sc.version));
            }
        }
        out
    }
}

/// Is `[at, at + len)` entirely within extents that read as zeros?
fn all_zero(map: &[Extent], at: u64, len: u64) -> bool {
    let end = at + len;
    let i = map.partition_point(|e| e.start + e.length <= at);
    let mut p = at;
    for e in &map[i..] {
        if e.start > p || !e.zero {
            return false;
        }
        p = e.start + e.length;
        if p >= end {
            return true;
        }
    }
    p >= end
}

/// Write the staged raw disk `src` as an overlay `dst` on `backing` (relative to `dst`'s
/// directory) holding only the clusters that differ from it; then remove `src`. Blocking.
fn write_overlay(src: &Path, dst: &Path, backing: &str) -> Result<(), AdapterError> {
    let len = fs::metadata(src)
        .map_err(AdapterError::io("stat", src))?
        .len();
    let base = dst.parent().expect("a build directory").join(backing);
    let base_len = seedcast_qemu::info(&base, Format::Qcow2)?.virtual_size;
    let new_map = seedcast_qemu::map(src, Format::Raw)?;
    let old_map = seedcast_qemu::map(&base, Format::Qcow2)?;
    seedcast_qemu::create_overlay(dst, backing, len)?;
    let old = Export::open(&base, Format::Qcow2, false)?;
    let out = Export::open(dst, Format::Qcow2, true)?;
    let new_f = fs::File::open(src).map_err(AdapterError::io("open", src))?;
    let old_f = fs::File::open(old.path()).map_err(AdapterError::io("open", old.path()))?;
    let out_f = fs::OpenOptions::new()
        .write(true)
        .open(out.path())
        .map_err(AdapterError::io("open", out.path()))?;
    let (mut a, mut b) = (vec![0u8; CLUSTER as usize], vec![0u8; CLUSTER as usize]);
    let mut at = 0u64;
    while at < len {
        let n = CLUSTER.min(len - at) as usize;
        let old_zero = at >= base_len || all_zero(&old_map, at, n as u64);
        if !(all_zero(&new_map, at, n as u64) && old_zero) {
            new_f
                .read_exact_at(&mut a[..n], at)
                .map_err(AdapterError::io("read", src))?;
            if old_zero {
                b[..n].fill(0);
            } else {
                let m = (n as u64).min(base_len - at) as usize;
                old_f
                    .read_exact_at(&mut b[..m], at)
                    .map_err(AdapterError::io("read", &base))?;
                b[m..n].fill(0);
            }
            if a[..n] != b[..n] {
                out_f
                    .write_all_at(&a[..n], at)
                    .map_err(AdapterError::io("write", dst))?;
            }
        }
        at += n as u64;
    }
    out_f.sync_all().map_err(AdapterError::io("sync", dst))?;
    drop((out_f, old_f));
    out.close()?;
    old.close()?;
    fs::remove_file(src).map_err(AdapterError::io("remove", src))?;
    Ok(())
}

impl Adapter for Qcow2Adapter {
    fn kind(&self) -> &'static str {
        "qcow2"
    }

    fn keeps_copies(&self) -> bool {
        true
    }

    fn exists<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<bool, AdapterError>> {
        Box::pin(async move { Ok(self.dir_of(local_id).is_ok_and(|d| d.is_dir())) })
    }

    fn staging_root(&self) -> &Path {
        &self.staging
    }

    fn publish(&self, image: AssembledImage) -> BoxFuture<'_, Result<String, AdapterError>> {
        Box::pin(async move { self.build(image, None).await })
    }

    fn publish_next<'a>(
        &'a self,
        local_id: &'a str,
        image: AssembledImage,
    ) -> BoxFuture<'a, Result<Next, AdapterError>> {
        Box::pin(async move {
            let old = self
                .dir_of(local_id)
                .ok()
                .filter(|d| d.is_dir())
                .filter(|_| parse_local_id(local_id).is_ok_and(|(g, _)| g == image.global_id));
            if self.opts.overlays
                && let Some(dir) = old
            {
                let sidecar = Sidecar::read(&dir)?;
                let v = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                // The previous version stays: the new one backs on it.
                let local_id = self.build(image, Some((v, sidecar))).await?;
                return Ok(Next {
                    local_id,
                    retire: None,
                });
            }
            Ok(Next::replacing(self.build(image, None).await?, local_id))
        })
    }

    /// Every `<global id>/v<N>` directory with a sidecar: only what this adapter makes.
    fn list(&self) -> BoxFuture<'_, Result<Option<Vec<String>>, AdapterError>> {
        Box::pin(async move {
            let pool = &self.opts.pool;
            let mut ids = Vec::new();
            for e in fs::read_dir(pool).map_err(AdapterError::io("list", pool))? {
                let e = e.map_err(AdapterError::io("list", pool))?;
                let g = e.file_name().to_string_lossy().into_owned();
                if g.parse::<GlobalId>().is_err() || !e.path().is_dir() {
                    continue;
                }
                let image = e.path();
                for v in fs::read_dir(&image).map_err(AdapterError::io("list", &image))? {
                    let v = v.map_err(AdapterError::io("list", &image))?;
                    let id = format!("{g}/{}", v.file_name().to_string_lossy());
                    if parse_local_id(&id).is_ok() && v.path().join(local::SIDECAR).is_file() {
                        ids.push(id);
                    }
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
            let dir = self.dir_of(local_id)?;
            if !dir.is_dir() {
                return Err(AdapterError::NotFound(local_id.to_string()));
            }
            local::read_back(dir, local_id, file).await
        })
    }

    fn delete<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move {
            let dir = self.dir_of(local_id)?;
            if !dir.is_dir() {
                return Err(AdapterError::NotFound(local_id.to_string()));
            }
            let deps = self.dependents(&dir);
            if !deps.is_empty() {
                return Err(AdapterError::Service(format!(
                    "{local_id} is the backing file of {}; not deleted",
                    deps.join(", ")
                )));
            }
            let trash = self
                .staging
                .join(format!("deleted-{}", uuid::Uuid::new_v4().simple()));
            fs::rename(&dir, &trash).map_err(AdapterError::io("delete", &dir))?;
            fs::remove_dir_all(&trash).map_err(AdapterError::io("delete", &trash))?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seedcast_qemu::{ConvertOptions, check, compare, info};

    fn staged(a: &Qcow2Adapter, version: u32, disk: &[u8]) -> AssembledImage {
        let dir = a
            .staging_root()
            .join(format!("t{version}-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir_all(&dir).unwrap();
        let f = fs::File::create(dir.join("disk.raw")).unwrap();
        f.set_len(disk.len() as u64).unwrap();
        // Only the non-zero 4 KiB blocks are written: the staged disk stays sparse.
        for (i, b) in disk.chunks(4096).enumerate() {
            if b.iter().any(|x| *x != 0) {
                f.write_all_at(b, i as u64 * 4096).unwrap();
            }
        }
        fs::write(dir.join("vmlinuz"), b"kernel").unwrap();
        let files = vec![
            AssembledFile {
                name: "disk.raw".into(),
                len: disk.len() as u64,
                mode: 0o644,
                format: FileFormat::Raw,
                disk: true,
            },
            AssembledFile {
                name: "vmlinuz".into(),
                len: 6,
                mode: 0o644,
                format: FileFormat::Raw,
                disk: false,
            },
        ];
        AssembledImage::new(
            dir,
            GlobalId([7; 12]),
            version,
            [0; 32],
            "img".into(),
            files,
        )
    }

    fn disk_v1() -> Vec<u8> {
        let mut d = vec![0u8; 16 << 20];
        for (i, b) in d[1 << 20..4 << 20].iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2];
        }
        d
    }

    async fn guest(a: &Qcow2Adapter, id: &str) -> Vec<u8> {
        let rb = a.read_back(id, "disk.raw").await.unwrap();
        fs::read(rb.path()).unwrap()
    }

    #[tokio::test]
    async fn disks_become_qcow2_and_updates_become_small_overlays() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = Qcow2Options {
            pool: tmp.path().join("pool"),
            compress: Some(Compress::Zstd),
            overlays: true,
        };
        let a = Qcow2Adapter::new(opts).unwrap();
        let v1 = disk_v1();
        let id1 = a.publish(staged(&a, 1, &v1)).await.unwrap();
        assert_eq!(id1, format!("{}/v1", GlobalId([7; 12])));
        let d1 = a.dir_of(&id1).unwrap();
        let q1 = d1.join("disk.qcow2");
        check(&q1, Format::Qcow2).unwrap();
        assert_eq!(info(&q1, Format::Qcow2).unwrap().virtual_size, 16 << 20);
        assert_eq!(fs::read(d1.join("vmlinuz")).unwrap(), b"kernel");
        assert_eq!(guest(&a, &id1).await, v1);

        let mut v2 = v1.clone();
        v2[2 << 20..(2 << 20) + 10].fill(0xee);
        v2[10 << 20..(10 << 20) + 5].fill(0x11); // data where v1 had a hole
        let id2 = a.update(&id1, staged(&a, 2, &v2)).await.unwrap();
        let q2 = a.dir_of(&id2).unwrap().join("disk.qcow2");
        check(&q2, Format::Qcow2).unwrap();
        let i2 = info(&q2, Format::Qcow2).unwrap();
        assert_eq!(i2.backing_filename.as_deref(), Some("../v1/disk.qcow2"));
        assert!(
            i2.actual_size.unwrap() < 1 << 20,
            "only changed clusters: {i2:?}"
        );
        assert_eq!(guest(&a, &id2).await, v2);
        // The previous version is its backing file: kept, and not deletable.
        assert!(a.exists(&id1).await.unwrap());
        let e = a.delete(&id1).await.unwrap_err();
        assert!(e.to_string().contains("backing file of"), "{e}");
        // The raw expected content matches through qemu's own compare.
        let raw = tmp.path().join("v2.raw");
        fs::write(&raw, &v2).unwrap();
        assert!(compare(&q2, Format::Qcow2, &raw, Format::Raw).unwrap());
        let _ = ConvertOptions::default();
    }

    #[tokio::test]
    async fn it_lists_only_the_versions_it_published() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = tmp.path().join("pool");
        let a = Qcow2Adapter::new(Qcow2Options {
            pool: pool.clone(),
            compress: None,
            overlays: false,
        })
        .unwrap();
        assert_eq!(a.list().await.unwrap(), Some(vec![]));
        let id = a.publish(staged(&a, 1, &disk_v1())).await.unwrap();
        // An operator's files, and a version directory without its sidecar, are not ours.
        std::fs::create_dir_all(pool.join("not-an-image")).unwrap();
        let g = id.split_once('/').unwrap().0;
        std::fs::create_dir_all(pool.join(g).join("v9")).unwrap();
        assert_eq!(a.list().await.unwrap(), Some(vec![id]));
    }

    #[tokio::test]
    async fn without_overlays_an_update_replaces_the_old_version() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Qcow2Adapter::new(Qcow2Options {
            pool: tmp.path().join("pool"),
            compress: None,
            overlays: false,
        })
        .unwrap();
        let id1 = a.publish(staged(&a, 1, &disk_v1())).await.unwrap();
        let mut v2 = disk_v1();
        v2[0] = 1;
        let id2 = a.update(&id1, staged(&a, 2, &v2)).await.unwrap();
        assert!(!a.exists(&id1).await.unwrap());
        let i = info(&a.dir_of(&id2).unwrap().join("disk.qcow2"), Format::Qcow2).unwrap();
        assert_eq!(i.backing_filename, None);
        assert_eq!(guest(&a, &id2).await, v2);
        // Ids that are not `<global id>/v<n>` name nothing, and never a path.
        for bad in [
            "",
            "x",
            "../etc",
            "sc-070707070707070707070707/v",
            "sc-0707/v1",
            "/v1",
        ] {
            assert!(!a.exists(bad).await.unwrap(), "{bad}");
            assert!(
                matches!(a.delete(bad).await, Err(AdapterError::NotFound(_))),
                "{bad}"
            );
        }
    }
}
