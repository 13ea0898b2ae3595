//! `s3`: images as objects in an S3-compatible object store (AWS S3, Ceph RGW, Swift's
//! s3api, Garage …), through `object_store`.
//!
//! Version V of image G is the key prefix `<prefix>/<G>/v<V>` — its local id: every object
//! of the version has a key that contains it. Files are stored as they were pushed (a
//! qcow2 disk rebuilt as qcow2 by `qemu-img`, everything else as its bytes); files above
//! 16 MiB go up as multipart uploads, every request carrying its SHA-256 checksum. After
//! each upload a `HEAD` checks the object's size and its ETag: the MD5 of what was sent,
//! or for a multipart upload the MD5 of the parts' MD5s with `-<parts>`, as S3 defines it
//! (stores that encrypt with SSE-KMS or SSE-C make other ETags: see the README). The version's manifest object,
//! `<prefix>/<G>/v<V>/.seedcast.json` (each file's key, format, size and SHA-256), is
//! written last: a version exists only once it is there, so a reader never takes a
//! half-written version for one. Credentials come from the standard AWS environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`); the
//! bucket must exist.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use futures::future::BoxFuture;
use object_store::aws::{AmazonS3Builder, Checksum};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use seedcast_core::manifest::FileFormat;
use serde::{Deserialize, Serialize};

use crate::adapter::{Adapter, AdapterError, AssembledImage, ReadBack};

/// Files above this go up in parts of this size.
const PART: usize = 16 << 20;
/// The version's manifest object, written last.
const MANIFEST: &str = ".seedcast.json";

/// Options of the `s3` adapter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Options {
    /// The service's URL, e.g. `https://s3.example.net` or `http://127.0.0.1:8080`.
    pub endpoint: String,
    pub bucket: String,
    /// Keys start with it (default: none).
    #[serde(default)]
    pub prefix: Option<String>,
}

/// One stored file, in the version's manifest object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredObject {
    key: String,
    format: String,
    size: u64,
    sha256: String,
}

/// The version's manifest object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VersionObject {
    global_id: String,
    version: u32,
    name: String,
    manifest_id: String,
    files: std::collections::BTreeMap<String, StoredObject>,
}

#[derive(Debug)]
pub struct S3Adapter {
    opts: S3Options,
    store: Arc<dyn ObjectStore>,
    staging: PathBuf,
}

fn service(opts: &S3Options, what: &str, e: impl std::fmt::Display) -> AdapterError {
    AdapterError::Service(format!(
        "S3 store {} (bucket {}): {what}: {e}",
        opts.endpoint, opts.bucket
    ))
}

/// An access key and its secret, when not taken from the environment.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, …)", self.access_key_id)
    }
}

impl S3Adapter {
    /// An adapter for `opts` (credentials from the AWS environment), staging under
    /// `staging`. Makes no request: see [`Adapter::check`].
    pub fn new(opts: S3Options, staging: PathBuf) -> Result<Self, AdapterError> {
        Self::with_credentials(opts, None, staging)
    }

    /// As [`S3Adapter::new`], with `credentials` instead of the environment's (tests and
    /// embedders that hold their own).
    pub fn with_credentials(
        opts: S3Options,
        credentials: Option<Credentials>,
        staging: PathBuf,
    ) -> Result<Self, AdapterError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        if !(opts.endpoint.starts_with("http://") || opts.endpoint.starts_with("https://")) {
            return Err(AdapterError::Config(format!(
                "--endpoint {:?}: give http(s)://HOST[:PORT]",
                opts.endpoint
            )));
        }
        let region = std::env::var("AWS_REGION")
            .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|_| "us-east-1".into());
        let mut builder = AmazonS3Builder::from_env();
        if let Some(c) = credentials {
            builder = builder
                .with_access_key_id(c.access_key_id)
                .with_secret_access_key(c.secret_access_key);
        }
        let store = builder
            .with_endpoint(&opts.endpoint)
            .with_bucket_name(&opts.bucket)
            .with_region(region)
            .with_allow_http(opts.endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false)
            .with_checksum_algorithm(Checksum::SHA256)
            .build()
            .map_err(|e| AdapterError::Config(format!("S3 store: {e}")))?;
        std::fs::create_dir_all(&staging).map_err(AdapterError::io("create", &staging))?;
        for e in std::fs::read_dir(&staging).map_err(AdapterError::io("list", &staging))? {
            let p = e.map_err(AdapterError::io("list", &staging))?.path();
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
        Ok(S3Adapter {
            opts,
            store: Arc::new(store),
            staging,
        })
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> AdapterError {
        service(&self.opts, what, e)
    }

    /// The key prefix of version `v` of `g`: the local id.
    fn version_prefix(&self, g: &str, v: u32) -> String {
        match self.opts.prefix.as_deref().map(|p| p.trim_matches('/')) {
            Some(p) if !p.is_empty() => format!("{p}/{g}/v{v}"),
            _ => format!("{g}/v{v}"),
        }
    }

    /// Is `local_id` a version prefix this adapter makes (and no other key)?
    fn valid(&self, local_id: &str) -> bool {
        let Some((rest, v)) = local_id.rsplit_once("/v") else {
            return false;
        };
        let g = rest.rsplit('/').next().unwrap_or("");
        g.parse::<seedcast_core::GlobalId>().is_ok()
            && !v.is_empty()
            && v.bytes().all(|b| b.is_ascii_digit())
            && v.parse::<u32>()
                .is_ok_and(|v| self.version_prefix(g, v) == local_id)
    }

    /// Upload `file` as `key`: one PUT, or parts for a large file; then check the stored
    /// object's size and ETag against `want`. Returns its size.
    async fn upload(&self, file: &Path, key: &Key, want: &Digests) -> Result<u64, AdapterError> {
        let size = std::fs::metadata(file)
            .map_err(AdapterError::io("stat", file))?
            .len();
        let mut f = tokio::fs::File::open(file)
            .await
            .map_err(AdapterError::io("open", file))?;
        if size as usize <= PART {
            let bytes = tokio::fs::read(file)
                .await
                .map_err(AdapterError::io("read", file))?;
            self.store
                .put(key, PutPayload::from(bytes))
                .await
                .map_err(|e| self.err(&format!("PUT {key}"), e))?;
        } else {
            use tokio::io::AsyncReadExt;
            let upload = self
                .store
                .put_multipart(key)
                .await
                .map_err(|e| self.err(&format!("multipart upload of {key}"), e))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
            let mut buf = vec![0u8; PART];
            loop {
                let n = f
                    .read(&mut buf)
                    .await
                    .map_err(AdapterError::io("read", file))?;
                if n == 0 {
                    break;
                }
                w.wait_for_capacity(2)
                    .await
                    .map_err(|e| self.err(&format!("part of {key}"), e))?;
                w.write(&buf[..n]);
            }
            w.finish()
                .await
                .map_err(|e| self.err(&format!("multipart upload of {key}"), e))?;
        }
        let meta = self
            .store
            .head(key)
            .await
            .map_err(|e| self.err(&format!("HEAD {key}"), e))?;
        if meta.size != size {
            return Err(self.err(
                &format!("HEAD {key}"),
                format!("holds {} bytes, {size} were sent", meta.size),
            ));
        }
        let etag = meta.e_tag.as_deref().unwrap_or("").trim_matches('"');
        if etag != want.etag {
            return Err(self.err(
                &format!("HEAD {key}"),
                format!(
                    "ETag {etag:?} is not the digest of what was sent ({:?})",
                    want.etag
                ),
            ));
        }
        Ok(size)
    }

    async fn publish_image(&self, image: AssembledImage) -> Result<String, AdapterError> {
        let prefix = self.version_prefix(&image.global_id.to_string(), image.version);
        let mut uploaded = Vec::new();
        let r = self.publish_objects(&image, &prefix, &mut uploaded).await;
        if r.is_err() {
            // Nothing half-written stays: the objects of a version that failed go again.
            for key in uploaded {
                let _ = self.store.delete(&key).await;
            }
        }
        r
    }

    /// Upload every file of `image` under `prefix` (each key into `uploaded` once it is
    /// there), then the version's manifest object.
    async fn publish_objects(
        &self,
        image: &AssembledImage,
        prefix: &str,
        uploaded: &mut Vec<Key>,
    ) -> Result<String, AdapterError> {
        let mut files = std::collections::BTreeMap::new();
        for f in &image.files {
            let staged = image.file_path(&f.name);
            let src = if f.format == FileFormat::Qcow2 {
                let q = image.dir().join(format!(".{}.qcow2", f.name));
                let (s2, q2) = (staged.clone(), q.clone());
                tokio::task::spawn_blocking(move || {
                    crate::adapters::local::raw_to_qcow2(&s2, &q2, None)
                })
                .await??;
                q
            } else {
                staged
            };
            let s2 = src.clone();
            let want = tokio::task::spawn_blocking(move || digests(&s2)).await??;
            let key = Key::from(format!("{prefix}/{}", f.name));
            uploaded.push(key.clone());
            let size = self.upload(&src, &key, &want).await?;
            files.insert(
                f.name.clone(),
                StoredObject {
                    key: key.to_string(),
                    format: f.format.as_str().into(),
                    size,
                    sha256: want.sha256,
                },
            );
        }
        let version = VersionObject {
            global_id: image.global_id.to_string(),
            version: image.version,
            name: image.name.clone(),
            manifest_id: hex::encode(image.manifest_id),
            files,
        };
        let body = serde_json::to_vec_pretty(&version).expect("plain data");
        let key = Key::from(format!("{prefix}/{MANIFEST}"));
        self.store
            .put(&key, PutPayload::from(body))
            .await
            .map_err(|e| self.err(&format!("PUT {key}"), e))?;
        Ok(prefix.to_string())
    }

    /// The version's manifest object, or `None` when the version does not exist.
    async fn version(&self, local_id: &str) -> Result<Option<VersionObject>, AdapterError> {
        if !self.valid(local_id) {
            return Ok(None);
        }
        let key = Key::from(format!("{local_id}/{MANIFEST}"));
        match self.store.get(&key).await {
            Ok(r) => {
                let bytes = r
                    .bytes()
                    .await
                    .map_err(|e| self.err(&format!("GET {key}"), e))?;
                Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
                    self.err(&format!("{key} is not a seedcast version"), e)
                })?))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(&format!("GET {key}"), e)),
        }
    }

    async fn read_file(&self, local_id: &str, file: &str) -> Result<ReadBack, AdapterError> {
        let v = self
            .version(local_id)
            .await?
            .ok_or_else(|| AdapterError::NotFound(local_id.to_string()))?;
        let o = v.files.get(file).ok_or_else(|| AdapterError::NoSuchFile {
            local_id: local_id.to_string(),
            file: file.to_string(),
        })?;
        let out = tempfile::NamedTempFile::new_in(&self.staging)
            .map_err(AdapterError::io("create", &self.staging))?
            .into_temp_path();
        let mut w = tokio::fs::File::create(&out)
            .await
            .map_err(AdapterError::io("create", &out))?;
        let key = Key::from(o.key.as_str());
        let mut stream = self
            .store
            .get(&key)
            .await
            .map_err(|e| self.err(&format!("GET {key}"), e))?
            .into_stream();
        while let Some(b) = stream
            .try_next()
            .await
            .map_err(|e| self.err(&format!("GET {key}"), e))?
        {
            tokio::io::AsyncWriteExt::write_all(&mut w, &b)
                .await
                .map_err(AdapterError::io("write", &out))?;
        }
        // tokio writes in the background: all of it must be in the file before it is read.
        tokio::io::AsyncWriteExt::flush(&mut w)
            .await
            .map_err(AdapterError::io("write", &out))?;
        drop(w);
        if o.format != FileFormat::Qcow2.as_str() {
            return Ok(ReadBack::Downloaded(out));
        }
        let raw = tempfile::NamedTempFile::new_in(&self.staging)
            .map_err(AdapterError::io("create", &self.staging))?
            .into_temp_path();
        let (q, r) = (out.to_path_buf(), raw.to_path_buf());
        tokio::task::spawn_blocking(move || {
            seedcast_qemu::convert(
                &q,
                seedcast_qemu::Format::Qcow2,
                &r,
                seedcast_qemu::Format::Raw,
                &seedcast_qemu::ConvertOptions::default(),
            )
        })
        .await??;
        Ok(ReadBack::Downloaded(raw))
    }
}

/// A file's SHA-256 (hex) and the ETag S3 gives it as [`S3Adapter::upload`] stores it.
struct Digests {
    sha256: String,
    etag: String,
}

/// Read `p` once for its [`Digests`]. Blocking.
fn digests(p: &Path) -> Result<Digests, AdapterError> {
    use md5::Md5;
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(p).map_err(AdapterError::io("open", p))?;
    let (mut sha, mut whole, mut part) = (Sha256::new(), Md5::new(), Md5::new());
    let (mut parts, mut in_part, mut size) = (Vec::new(), 0usize, 0u64);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(AdapterError::io("read", p))?;
        if n == 0 {
            break;
        }
        let mut data = &buf[..n];
        sha.update(data);
        whole.update(data);
        size += n as u64;
        while !data.is_empty() {
            let take = data.len().min(PART - in_part);
            part.update(&data[..take]);
            in_part += take;
            data = &data[take..];
            if in_part == PART {
                parts.extend_from_slice(&std::mem::take(&mut part).finalize());
                in_part = 0;
            }
        }
    }
    if in_part > 0 {
        parts.extend_from_slice(&part.finalize());
    }
    let etag = if size <= PART as u64 {
        hex::encode(whole.finalize())
    } else {
        format!("{}-{}", hex::encode(Md5::digest(&parts)), parts.len() / 16)
    };
    Ok(Digests {
        sha256: hex::encode(sha.finalize()),
        etag,
    })
}

impl Adapter for S3Adapter {
    fn kind(&self) -> &'static str {
        "s3"
    }

    fn keeps_copies(&self) -> bool {
        false
    }

    fn check(&self) -> BoxFuture<'_, Result<(), AdapterError>> {
        Box::pin(async move {
            let mut keys = self.store.list(None);
            keys.try_next()
                .await
                .map(|_| ())
                .map_err(|e| self.err("listing the bucket (does it exist?)", e))
        })
    }

    fn exists<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<bool, AdapterError>> {
        Box::pin(async move {
            if !self.valid(local_id) {
                return Ok(false);
            }
            let key = Key::from(format!("{local_id}/{MANIFEST}"));
            match self.store.head(&key).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(self.err(&format!("HEAD {key}"), e)),
            }
        })
    }

    fn staging_root(&self) -> &Path {
        &self.staging
    }

    fn publish(&self, image: AssembledImage) -> BoxFuture<'_, Result<String, AdapterError>> {
        Box::pin(self.publish_image(image))
    }

    fn read_back<'a>(
        &'a self,
        local_id: &'a str,
        file: &'a str,
    ) -> BoxFuture<'a, Result<ReadBack, AdapterError>> {
        Box::pin(self.read_file(local_id, file))
    }

    fn delete<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move {
            let v = self
                .version(local_id)
                .await?
                .ok_or_else(|| AdapterError::NotFound(local_id.to_string()))?;
            // The manifest object first: the version is gone at once, then its files.
            let key = Key::from(format!("{local_id}/{MANIFEST}"));
            self.store
                .delete(&key)
                .await
                .map_err(|e| self.err(&format!("DELETE {key}"), e))?;
            for o in v.files.values() {
                let key = Key::from(o.key.as_str());
                match self.store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(self.err(&format!("DELETE {key}"), e)),
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use md5::{Digest, Md5};

    #[test]
    fn etags_are_md5_for_one_put_and_md5_of_part_md5s_for_multipart() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        std::fs::write(&small, b"abc").unwrap();
        let d = digests(&small).unwrap();
        assert_eq!(d.etag, "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            d.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );

        // Exactly one part's worth is still one PUT; one byte more is two parts.
        let data: Vec<u8> = (0..PART + 5).map(|i| (i * 7 % 251) as u8).collect();
        let at_limit = dir.path().join("at-limit");
        std::fs::write(&at_limit, &data[..PART]).unwrap();
        let want = hex::encode(Md5::digest(&data[..PART]));
        assert_eq!(digests(&at_limit).unwrap().etag, want);
        let big = dir.path().join("big");
        std::fs::write(&big, &data).unwrap();
        let mut parts = Md5::digest(&data[..PART]).to_vec();
        parts.extend_from_slice(&Md5::digest(&data[PART..]));
        let want = format!("{}-2", hex::encode(Md5::digest(&parts)));
        assert_eq!(digests(&big).unwrap().etag, want);
    }
}
