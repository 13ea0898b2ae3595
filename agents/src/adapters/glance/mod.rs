//! `glance`: images in OpenStack Glance, through its v2 API.
//!
//! Each file of a version becomes a Glance image (`<name> v<V> <file>`, container format
//! `bare`): a disk as `--disk-format` (`qcow2` by default, converted by `qemu-img` from the
//! guest content; or `raw`), other files as `raw`. The disk's image (or the first file's)
//! is the version's: its id is the local id, and its `seedcast_files` property maps every
//! file to its image. Every image carries `seedcast_global_id`, `seedcast_version`,
//! `seedcast_manifest_id` and `seedcast_file`. Uploads stream from the staged file; an image
//! counts only once Glance says `active` with the size and the hash
//! (`os_hash_algo`/`os_hash_value`) the agent computed; a version that fails half-way has
//! its images deleted again. An update publishes the new version whole, then deletes the
//! old one.
//!
//! Authentication ([`keystone`]): the standard `OS_*` variables or a `clouds.yaml` entry
//! (`--os-cloud`); Glance's URL from the service catalog unless `--url` is given. With no
//! `OS_AUTH_URL` and no `--os-cloud`, Glance is taken to need no authentication (`--url`
//! then names it).

pub mod keystone;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Deserialize;
use serde_json::Value;

use crate::adapter::{Adapter, AdapterError, AssembledFile, AssembledImage, ReadBack};
use crate::adapters::local::{self, file_chunks};
use keystone::{AuthConfig, Session};

/// Bytes read from a staged file per upload chunk.
const UPLOAD_CHUNK: usize = 4 << 20;
/// How long Glance may take to make an uploaded image `active`.
const ACTIVE_WITHIN: Duration = Duration::from_secs(120);

/// The format a disk is uploaded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    #[default]
    Qcow2,
}

impl std::str::FromStr for DiskFormat {
    type Err = AdapterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            o => Err(AdapterError::Config(format!(
                "--disk-format {o:?}: raw or qcow2"
            ))),
        }
    }
}

/// Options of the `glance` adapter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GlanceOptions {
    /// Glance's URL (default: from the service catalog).
    #[serde(default)]
    pub url: Option<String>,
    /// A `clouds.yaml` entry to authenticate with (default: the `OS_*` variables).
    #[serde(default)]
    pub os_cloud: Option<String>,
    #[serde(default)]
    pub disk_format: DiskFormat,
}

#[derive(Debug)]
pub struct GlanceAdapter {
    opts: GlanceOptions,
    session: Option<Session>,
    http: reqwest::Client,
    staging: PathBuf,
    /// The site whose images these are (`seedcast_site` on each): what lets the agent
    /// list, and sweep, its own images in a Glance others may use too.
    site: Option<String>,
}

/// What Glance says of one image.
#[derive(Debug, Deserialize)]
struct ImageInfo {
    id: String,
    status: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    disk_format: Option<String>,
    #[serde(default)]
    os_hash_algo: Option<String>,
    #[serde(default)]
    os_hash_value: Option<String>,
    #[serde(flatten)]
    properties: BTreeMap<String, Value>,
}

/// A staged file ready to upload, and what Glance must end up holding.
struct Upload {
    path: PathBuf,
    disk_format: &'static str,
    size: u64,
    sha256: String,
    sha512: String,
}

impl GlanceAdapter {
    /// An adapter for `opts`, authenticating as the `OS_*` variables or `--os-cloud` say.
    pub fn new(opts: GlanceOptions, staging: PathBuf) -> Result<Self, AdapterError> {
        let auth = match &opts.os_cloud {
            Some(cloud) => Some(AuthConfig::from_cloud(cloud)?),
            None => AuthConfig::from_vars(std::env::vars())?,
        };
        Self::with_auth(opts, auth, staging)
    }

    /// As [`GlanceAdapter::new`] with the credentials given (`None`: no authentication).
    pub fn with_auth(
        opts: GlanceOptions,
        auth: Option<AuthConfig>,
        staging: PathBuf,
    ) -> Result<Self, AdapterError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        if auth.is_none() && opts.url.is_none() {
            return Err(AdapterError::Config(
                "glance: no OS_AUTH_URL, no --os-cloud and no --url: nothing says where Glance is"
                    .into(),
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| AdapterError::Config(format!("glance: HTTP client: {e}")))?;
        std::fs::create_dir_all(&staging).map_err(AdapterError::io("create", &staging))?;
        for e in std::fs::read_dir(&staging).map_err(AdapterError::io("list", &staging))? {
            let p = e.map_err(AdapterError::io("list", &staging))?.path();
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
        Ok(GlanceAdapter {
            session: auth.map(|a| Session::new(a, http.clone())),
            opts,
            http,
            staging,
            site: None,
        })
    }

    /// Mark every image published with `site`'s name, so the agent can list its own (and
    /// retire those a crash left unrecorded) without touching anyone else's.
    pub fn for_site(mut self, site: &str) -> Self {
        self.site = Some(site.to_string());
        self
    }

    /// Every image carrying this site's mark, following Glance's pages.
    async fn own_images(&self, site: &str) -> Result<Vec<ImageInfo>, AdapterError> {
        let mut out = Vec::new();
        let mut path = format!("/v2/images?limit=200&seedcast_site={site}");
        for _ in 0..10_000 {
            let r = self.request(Method::GET, &path).await?;
            let page: Value = self
                .send(r, "list images", &[StatusCode::OK])
                .await?
                .json()
                .await
                .map_err(|e| self.err("list images", e))?;
            for i in page["images"].as_array().into_iter().flatten() {
                let info: ImageInfo =
                    serde_json::from_value(i.clone()).map_err(|e| self.err("list images", e))?;
                // Glance filters by the property; check it anyway.
                if info
                    .properties
                    .get("seedcast_site")
                    .and_then(|v| v.as_str())
                    == Some(site)
                {
                    out.push(info);
                }
            }
            match page["next"].as_str() {
                Some(next) => path = next.to_string(),
                None => return Ok(out),
            }
        }
        Err(self.err("list images", "more than 10000 pages"))
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> AdapterError {
        let at = self.opts.url.as_deref().unwrap_or("(from the catalog)");
        AdapterError::Service(format!("Glance at {at}: {what}: {e}"))
    }

    /// Glance's base URL and the token to send (if any).
    async fn target(&self) -> Result<(String, Option<String>), AdapterError> {
        let Some(s) = &self.session else {
            let url = self.opts.url.clone().expect("checked at construction");
            return Ok((url.trim_end_matches('/').to_string(), None));
        };
        let (token, from_catalog) = s.token().await?;
        let url = match (&self.opts.url, from_catalog) {
            (Some(u), _) => u.trim_end_matches('/').to_string(),
            (None, Some(u)) => u,
            (None, None) => {
                return Err(self.err("service catalog", "lists no image service; give --url"));
            }
        };
        Ok((url, Some(token)))
    }

    /// A request to `path` under Glance's URL, authenticated.
    async fn request(&self, method: Method, path: &str) -> Result<RequestBuilder, AdapterError> {
        let (url, token) = self.target().await?;
        let r = self.http.request(method, format!("{url}{path}"));
        Ok(match token {
            Some(t) => r.header("X-Auth-Token", t),
            None => r,
        })
    }

    /// Send `r`; its response if the status is one of `ok`, else an error naming what.
    async fn send(
        &self,
        r: RequestBuilder,
        what: &str,
        ok: &[StatusCode],
    ) -> Result<reqwest::Response, AdapterError> {
        let resp = r.send().await.map_err(|e| self.err(what, e))?;
        if ok.contains(&resp.status()) {
            return Ok(resp);
        }
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED
            && let Some(s) = &self.session
        {
            s.invalidate().await;
        }
        let body = resp.text().await.unwrap_or_default();
        let body: String = body.trim().chars().take(300).collect();
        Err(self.err(what, format!("{status}: {body}")))
    }

    /// What Glance says of image `id`, or `None` when it has no such image.
    async fn image(&self, id: &str) -> Result<Option<ImageInfo>, AdapterError> {
        if uuid::Uuid::parse_str(id).is_err() {
            return Ok(None);
        }
        let r = self
            .request(Method::GET, &format!("/v2/images/{id}"))
            .await?;
        let resp = self
            .send(
                r,
                &format!("GET image {id}"),
                &[StatusCode::OK, StatusCode::NOT_FOUND],
            )
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let info: ImageInfo = resp
            .json()
            .await
            .map_err(|e| self.err(&format!("GET image {id}"), e))?;
        Ok(Some(info))
    }

    /// Stage one file for upload: a disk converted to the disk format, hashes computed.
    async fn stage(
        &self,
        image: &AssembledImage,
        f: &AssembledFile,
    ) -> Result<Upload, AdapterError> {
        let staged = image.file_path(&f.name);
        let (path, disk_format) = match (f.disk, self.opts.disk_format) {
            (true, DiskFormat::Qcow2) => {
                let q = image.dir().join(format!(".{}.qcow2", f.name));
                let (s2, q2) = (staged.clone(), q.clone());
                tokio::task::spawn_blocking(move || local::raw_to_qcow2(&s2, &q2, None)).await??;
                (q, "qcow2")
            }
            _ => (staged, "raw"),
        };
        let p2 = path.clone();
        let (sha256, sha512) =
            tokio::task::spawn_blocking(move || local::sha256_sha512(&p2)).await??;
        let size = std::fs::metadata(&path)
            .map_err(AdapterError::io("stat", &path))?
            .len();
        Ok(Upload {
            path,
            disk_format,
            size,
            sha256,
            sha512,
        })
    }

    /// Create an image with `props`, upload `u` into it, wait until it is active and holds
    /// what was sent. Returns its id; on failure the image is deleted again.
    async fn create(&self, name: &str, props: Value, u: &Upload) -> Result<String, AdapterError> {
        let mut body = serde_json::json!({
            "name": name,
            "disk_format": u.disk_format,
            "container_format": "bare",
            "visibility": "private",
        });
        if let (Some(b), Some(p)) = (body.as_object_mut(), props.as_object()) {
            b.extend(p.clone());
        }
        let r = self.request(Method::POST, "/v2/images").await?.json(&body);
        let info: ImageInfo = self
            .send(r, &format!("create image {name:?}"), &[StatusCode::CREATED])
            .await?
            .json()
            .await
            .map_err(|e| self.err("create image", e))?;
        let id = info.id;
        match self.upload_and_verify(&id, u).await {
            Ok(()) => Ok(id),
            Err(e) => {
                let _ = self.delete_one(&id).await;
                Err(e)
            }
        }
    }

    async fn upload_and_verify(&self, id: &str, u: &Upload) -> Result<(), AdapterError> {
        let f = tokio::fs::File::open(&u.path)
            .await
            .map_err(AdapterError::io("open", &u.path))?;
        let r = self
            .request(Method::PUT, &format!("/v2/images/{id}/file"))
            .await?
            .header("Content-Type", "application/octet-stream")
            .header("Content-Length", u.size)
            .body(reqwest::Body::wrap_stream(file_chunks(f, UPLOAD_CHUNK)));
        self.send(
            r,
            &format!("upload of image {id}"),
            &[StatusCode::NO_CONTENT, StatusCode::CREATED],
        )
        .await?;
        let deadline = tokio::time::Instant::now() + ACTIVE_WITHIN;
        loop {
            let info = self
                .image(id)
                .await?
                .ok_or_else(|| self.err(&format!("image {id}"), "vanished after upload"))?;
            match info.status.as_str() {
                "active" => return self.verify(id, &info, u),
                "queued" | "saving" | "importing" | "uploading"
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                other => {
                    return Err(self.err(&format!("image {id}"), format!("status {other}")));
                }
            }
        }
    }

    /// Does the active image hold what was sent: size and Glance's own hash?
    fn verify(&self, id: &str, info: &ImageInfo, u: &Upload) -> Result<(), AdapterError> {
        if info.size != Some(u.size) {
            return Err(self.err(
                &format!("image {id}"),
                format!("holds {:?} bytes, {} were sent", info.size, u.size),
            ));
        }
        let want = match info.os_hash_algo.as_deref() {
            Some("sha512") => &u.sha512,
            Some("sha256") => &u.sha256,
            other => {
                return Err(self.err(
                    &format!("image {id}"),
                    format!("hash algorithm {other:?} cannot be checked"),
                ));
            }
        };
        if info.os_hash_value.as_deref() != Some(want.as_str()) {
            return Err(self.err(
                &format!("image {id}"),
                "its hash is not that of the data sent",
            ));
        }
        Ok(())
    }

    async fn delete_one(&self, id: &str) -> Result<(), AdapterError> {
        let r = self
            .request(Method::DELETE, &format!("/v2/images/{id}"))
            .await?;
        self.send(
            r,
            &format!("delete image {id}"),
            &[StatusCode::NO_CONTENT, StatusCode::NOT_FOUND],
        )
        .await
        .map(|_| ())
    }

    async fn publish_image(&self, image: AssembledImage) -> Result<String, AdapterError> {
        // The version's image: the first disk, else the first file.
        let main = image.files.iter().position(|f| f.disk).unwrap_or(0);
        let props = |f: &AssembledFile| {
            let mut p = serde_json::json!({
                "seedcast_global_id": image.global_id.to_string(),
                "seedcast_version": image.version.to_string(),
                "seedcast_manifest_id": hex::encode(image.manifest_id),
                "seedcast_file": f.name,
                "seedcast_format": f.format.as_str(),
            });
            if let Some(site) = &self.site {
                p["seedcast_site"] = Value::String(site.clone());
            }
            p
        };
        let mut made: BTreeMap<String, String> = BTreeMap::new();
        let result = async {
            for (i, f) in image.files.iter().enumerate() {
                if i == main {
                    continue;
                }
                let u = self.stage(&image, f).await?;
                let name = format!("{} v{} {}", image.name, image.version, f.name);
                made.insert(f.name.clone(), self.create(&name, props(f), &u).await?);
            }
            let f = &image.files[main];
            let u = self.stage(&image, f).await?;
            let mut p = props(f);
            p["seedcast_files"] = Value::String(serde_json::to_string(&made).expect("map"));
            let name = format!("{} v{} {}", image.name, image.version, f.name);
            self.create(&name, p, &u).await
        }
        .await;
        if result.is_err() {
            for id in made.values() {
                let _ = self.delete_one(id).await;
            }
        }
        result
    }

    /// Every image of the version `local_id` names: file → image id.
    async fn files(&self, local_id: &str) -> Result<BTreeMap<String, String>, AdapterError> {
        let info = self
            .image(local_id)
            .await?
            .ok_or_else(|| AdapterError::NotFound(local_id.to_string()))?;
        let mut out: BTreeMap<String, String> = info
            .properties
            .get("seedcast_files")
            .and_then(|v| v.as_str())
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| self.err(&format!("image {local_id} seedcast_files"), e))?
            .unwrap_or_default();
        if let Some(name) = info
            .properties
            .get("seedcast_file")
            .and_then(|v| v.as_str())
        {
            out.insert(name.to_string(), info.id.clone());
        }
        Ok(out)
    }

    async fn read_file(&self, local_id: &str, file: &str) -> Result<ReadBack, AdapterError> {
        let id =
            self.files(local_id)
                .await?
                .remove(file)
                .ok_or_else(|| AdapterError::NoSuchFile {
                    local_id: local_id.to_string(),
                    file: file.to_string(),
                })?;
        let info = self
            .image(&id)
            .await?
            .ok_or_else(|| AdapterError::NotFound(id.clone()))?;
        let out = tempfile::NamedTempFile::new_in(&self.staging)
            .map_err(AdapterError::io("create", &self.staging))?
            .into_temp_path();
        let r = self
            .request(Method::GET, &format!("/v2/images/{id}/file"))
            .await?;
        let mut resp = self
            .send(r, &format!("download of image {id}"), &[StatusCode::OK])
            .await?;
        let mut w = tokio::fs::File::create(&out)
            .await
            .map_err(AdapterError::io("create", &out))?;
        while let Some(b) = resp
            .chunk()
            .await
            .map_err(|e| self.err(&format!("download of image {id}"), e))?
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
        if info.disk_format.as_deref() != Some("qcow2") {
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

impl Adapter for GlanceAdapter {
    fn kind(&self) -> &'static str {
        "glance"
    }

    fn keeps_copies(&self) -> bool {
        false
    }

    fn check(&self) -> BoxFuture<'_, Result<(), AdapterError>> {
        Box::pin(async move {
            let r = self.request(Method::GET, "/v2/images?limit=1").await?;
            self.send(r, "list images", &[StatusCode::OK])
                .await
                .map(|_| ())
        })
    }

    fn exists<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<bool, AdapterError>> {
        Box::pin(async move {
            Ok(self
                .image(local_id)
                .await?
                .is_some_and(|i| i.status == "active"))
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

    /// With a site: each version's image of this site, and each file image of it that no
    /// version names (a publish cut short), in any state (an upload cut short leaves one
    /// `queued` or `saving`). Without a site, `None`: nothing tells ours from others'.
    fn list(&self) -> BoxFuture<'_, Result<Option<Vec<String>>, AdapterError>> {
        Box::pin(async move {
            let Some(site) = &self.site else {
                return Ok(None);
            };
            let images = self.own_images(site).await?;
            let files_of = |i: &ImageInfo| -> Option<BTreeMap<String, String>> {
                serde_json::from_str(i.properties.get("seedcast_files")?.as_str()?).ok()
            };
            let named: std::collections::HashSet<String> = images
                .iter()
                .filter_map(files_of)
                .flat_map(|m| m.into_values())
                .collect();
            Ok(Some(
                images
                    .iter()
                    .filter(|i| files_of(i).is_some() || !named.contains(&i.id))
                    .map(|i| i.id.clone())
                    .collect(),
            ))
        })
    }

    fn delete<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move {
            let files = self.files(local_id).await?;
            // The version's own image first: the version is gone at once.
            self.delete_one(local_id).await?;
            for id in files.values().filter(|id| *id != local_id) {
                self.delete_one(id).await?;
            }
            Ok(())
        })
    }
}
