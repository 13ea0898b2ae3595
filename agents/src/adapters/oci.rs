//! `oci`: images pushed to an OCI registry with the distribution API, in the layout
//! KubeVirt pulls VM disks in (a *containerDisk*).
//!
//! Layout of version V of an image (tag `<name>-v<V>`; local id: the manifest's digest):
//! - one layer per disk: a tar holding `disk/<stem>.qcow2` (owner 107:107, the qemu user
//!   KubeVirt runs as; mode 0440). Disks go in as qcow2 whatever they were pushed as: a
//!   raw disk's zeros would otherwise fill the layer, and KubeVirt boots qcow2
//!   containerDisks as they are;
//! - one layer per other file (kernel, initrd, metadata): a tar holding `boot/<name>`, so an
//!   unchanged one keeps its digest and is never uploaded again;
//! - an OCI image config (`linux/amd64`, the layers' diff ids) and annotations with the
//!   global id, version and manifest id; each layer is annotated with its file's name.
//!
//! Layers are built in staging with fixed tar headers (no timestamps, fixed owners), so the
//! same content always has the same digest; `HEAD` skips blobs the registry holds; the rest
//! are uploaded in chunks (`PATCH` + `Content-Range`, the final `PUT` checking the digest).
//! The tag is pushed last: nothing is visible under it until every blob is there.
//! Credentials come from the containers auth file (`--auth-file`, the `auths` JSON that
//! `skopeo login`, `podman login` and `docker login` write); basic and bearer-token auth
//! both work. An `http://` registry URL means plain HTTP (a registry on the site's own
//! network); `https://` verifies certificates.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use futures::future::BoxFuture;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use seedcast_core::manifest::FileFormat;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::adapter::{Adapter, AdapterError, AssembledFile, AssembledImage, ReadBack};
use crate::adapters::local::file_chunks;
use futures::TryStreamExt;

const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_JSON: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_JSON: &str = "application/vnd.oci.image.manifest.v1+json";
/// The layer annotation naming the image file it carries.
const FILE_ANNOTATION: &str = "io.seedcast.file";
/// The owner KubeVirt's qemu runs as: containerDisk files must be readable by it.
const QEMU_UID: u64 = 107;
/// Bytes read from a staged layer per upload request.
const UPLOAD_CHUNK: usize = 8 << 20;

/// Options of the `oci` adapter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct OciOptions {
    /// `http://host:port` (plain HTTP) or `https://host[:port]`.
    pub registry: String,
    /// The repository every image of the site goes to, e.g. `vms/site-a`.
    pub repository: String,
    /// A containers auth file (`{"auths": {"host:port": {"auth": "base64(user:pass)"}}}`).
    #[serde(default)]
    pub auth_file: Option<PathBuf>,
}

pub struct OciAdapter {
    opts: OciOptions,
    /// `host:port` as the registry is named in references.
    host: String,
    client: Client,
    auth: RegistryAuth,
    http: reqwest::Client,
    staging: PathBuf,
}

impl std::fmt::Debug for OciAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OciAdapter({}/{})",
            self.opts.registry, self.opts.repository
        )
    }
}

fn service(what: &str, e: impl std::fmt::Display) -> AdapterError {
    AdapterError::Service(format!("OCI registry: {what}: {e}"))
}

/// The credentials for `host` in a containers auth file.
fn auth_from_file(path: &Path, host: &str) -> Result<RegistryAuth, AdapterError> {
    #[derive(Deserialize)]
    struct AuthFile {
        #[serde(default)]
        auths: BTreeMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        auth: Option<String>,
    }
    let text = std::fs::read(path).map_err(AdapterError::io("read", path))?;
    let file: AuthFile = serde_json::from_slice(&text).map_err(|e| {
        AdapterError::Config(format!(
            "{}: not a containers auth file: {e}",
            path.display()
        ))
    })?;
    let Some(entry) = file
        .auths
        .iter()
        .find(|(k, _)| {
            k.trim_start_matches("https://")
                .trim_start_matches("http://")
                == host
        })
        .and_then(|(_, e)| e.auth.as_deref())
    else {
        return Ok(RegistryAuth::Anonymous);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(entry.trim())
        .map_err(|e| AdapterError::Config(format!("{}: auth for {host}: {e}", path.display())))?;
    let text = String::from_utf8(decoded).map_err(|_| {
        AdapterError::Config(format!("{}: auth for {host} is not UTF-8", path.display()))
    })?;
    let (user, pass) = text.split_once(':').ok_or_else(|| {
        AdapterError::Config(format!(
            "{}: auth for {host} is not user:password",
            path.display()
        ))
    })?;
    Ok(RegistryAuth::Basic(user.into(), pass.into()))
}

/// A tag for version `version` of the image `name`: the tag grammar's characters only.
fn tag_for(name: &str, version: u32) -> String {
    let mut t: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !t.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
        t.insert(0, '_');
    }
    let suffix = format!("-v{version}");
    t.truncate(128 - suffix.len());
    t + &suffix
}

/// A writer that hashes (SHA-256) and counts what passes through.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A staged layer: its tar file, digest and size.
struct Layer {
    path: PathBuf,
    digest: String,
    size: u64,
    file: String,
    format: FileFormat,
}

/// Write a tar holding `src` as `entry` (fixed header: no time, the given owner) to
/// `dst`, hashing it. Blocking.
fn write_layer(
    src: &Path,
    entry: &str,
    owner: u64,
    mode: u32,
    dst: &Path,
) -> io::Result<(String, u64)> {
    let out = Hashing {
        inner: io::BufWriter::new(File::create(dst)?),
        hash: Sha256::new(),
        len: 0,
    };
    let mut tar = tar::Builder::new(out);
    let dir = entry.split('/').next().unwrap_or("");
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o555);
    h.set_uid(owner);
    h.set_gid(owner);
    h.set_mtime(0);
    h.set_size(0);
    tar.append_data(&mut h, format!("{dir}/"), io::empty())?;
    let f = File::open(src)?;
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(mode);
    h.set_uid(owner);
    h.set_gid(owner);
    h.set_mtime(0);
    h.set_size(f.metadata()?.len());
    tar.append_data(&mut h, entry, f)?;
    let mut out = tar.into_inner()?;
    out.flush()?;
    out.inner.get_ref().sync_all()?;
    Ok((
        format!("sha256:{}", hex::encode(out.hash.finalize())),
        out.len,
    ))
}

/// The layer for one file of the image, in `work`. Blocking.
fn build_layer(image_dir: &Path, f: &AssembledFile, work: &Path) -> Result<Layer, AdapterError> {
    let staged = image_dir.join(&f.name);
    let (src, entry, owner, mode) = if f.disk {
        let stem = f
            .name
            .strip_suffix(".qcow2")
            .or_else(|| f.name.strip_suffix(".raw"))
            .unwrap_or(&f.name);
        let q = work.join(format!("{stem}.qcow2"));
        seedcast_qemu::convert(
            &staged,
            seedcast_qemu::Format::Raw,
            &q,
            seedcast_qemu::Format::Qcow2,
            &seedcast_qemu::ConvertOptions::default(),
        )?;
        (q, format!("disk/{stem}.qcow2"), QEMU_UID, 0o440)
    } else {
        (staged, format!("boot/{}", f.name), 0, f.mode & 0o777)
    };
    let path = work.join(format!("{}.tar", f.name));
    let (digest, size) = write_layer(&src, &entry, owner, mode, &path)
        .map_err(AdapterError::io("write layer", &path))?;
    if f.disk {
        let _ = std::fs::remove_file(&src);
    }
    Ok(Layer {
        path,
        digest,
        size,
        file: f.name.clone(),
        format: f.format,
    })
}

impl OciAdapter {
    /// An adapter for `opts`, staging layers under `staging`. Makes no request: see
    /// [`Adapter::check`].
    pub fn new(opts: OciOptions, staging: PathBuf) -> Result<Self, AdapterError> {
        // oci-client leaves the TLS crypto provider to us: the same (ring) as the rest.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (plain, host) = match opts.registry.split_once("://") {
            Some(("http", h)) => (true, h),
            Some(("https", h)) => (false, h),
            _ => {
                return Err(AdapterError::Config(format!(
                    "--registry {:?}: give http://HOST:PORT or https://HOST[:PORT]",
                    opts.registry
                )));
            }
        };
        let host = host.trim_end_matches('/').to_string();
        if host.is_empty() || host.contains('/') {
            return Err(AdapterError::Config(format!(
                "--registry {:?}: no path after the host",
                opts.registry
            )));
        }
        Reference::with_tag(host.clone(), opts.repository.clone(), "x".into())
            .to_string()
            .parse::<Reference>()
            .map_err(|e| {
                AdapterError::Config(format!("--repository {:?}: {e}", opts.repository))
            })?;
        let auth = match &opts.auth_file {
            Some(p) => auth_from_file(p, &host)?,
            None => RegistryAuth::Anonymous,
        };
        let config = ClientConfig {
            protocol: if plain {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            ..Default::default()
        };
        std::fs::create_dir_all(&staging).map_err(AdapterError::io("create", &staging))?;
        for e in std::fs::read_dir(&staging).map_err(AdapterError::io("list", &staging))? {
            let p = e.map_err(AdapterError::io("list", &staging))?.path();
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
        Ok(OciAdapter {
            opts,
            host,
            client: Client::new(config),
            auth,
            http: reqwest::Client::new(),
            staging,
        })
    }

    fn reference(&self, tag_or_digest: &str) -> Reference {
        if tag_or_digest.starts_with("sha256:") {
            Reference::with_digest(
                self.host.clone(),
                self.opts.repository.clone(),
                tag_or_digest.into(),
            )
        } else {
            Reference::with_tag(
                self.host.clone(),
                self.opts.repository.clone(),
                tag_or_digest.into(),
            )
        }
    }

    fn base_url(&self) -> String {
        let scheme = self.opts.registry.split("://").next().unwrap_or("https");
        format!("{scheme}://{}/v2/{}", self.host, self.opts.repository)
    }

    /// Upload a staged layer unless the registry holds it.
    async fn push_layer(&self, r: &Reference, l: &Layer) -> Result<(), AdapterError> {
        if self
            .client
            .blob_exists(r, &l.digest)
            .await
            .map_err(|e| service("HEAD blob", e))?
        {
            return Ok(());
        }
        let f = tokio::fs::File::open(&l.path)
            .await
            .map_err(AdapterError::io("open", &l.path))?;
        self.client
            .push_blob_stream(
                r,
                file_chunks(f, UPLOAD_CHUNK).map_err(OciDistributionError::from),
                &l.digest,
                Some(l.size),
            )
            .await
            .map_err(|e| service(&format!("upload of {}", l.file), e))?;
        Ok(())
    }

    /// Upload the image config blob; its descriptor.
    async fn push_config(
        &self,
        r: &Reference,
        layers: &[Layer],
    ) -> Result<OciDescriptor, AdapterError> {
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| &l.digest).collect::<Vec<_>>()},
        });
        let body = serde_json::to_vec(&config).expect("plain data");
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        let size = body.len() as i64;
        self.client
            .push_blob(r, body, &digest)
            .await
            .map_err(|e| service("upload of the image config", e))?;
        Ok(OciDescriptor {
            media_type: CONFIG_JSON.into(),
            digest,
            size,
            urls: None,
            annotations: None,
            artifact_type: None,
        })
    }

    async fn publish_image(&self, image: AssembledImage) -> Result<String, AdapterError> {
        let work = self.staging.join(format!(
            "v{}-{}",
            image.version,
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&work).map_err(AdapterError::io("create", &work))?;
        let r = self.publish_from(&image, &work).await;
        let _ = std::fs::remove_dir_all(&work);
        r
    }

    async fn publish_from(
        &self,
        image: &AssembledImage,
        work: &Path,
    ) -> Result<String, AdapterError> {
        let tag = tag_for(&image.name, image.version);
        let r = self.reference(&tag);
        let mut layers = Vec::new();
        for f in &image.files {
            let (dir, f2, w) = (image.dir().to_path_buf(), f.clone(), work.to_path_buf());
            let l = tokio::task::spawn_blocking(move || build_layer(&dir, &f2, &w)).await??;
            self.push_layer(&r, &l).await?;
            let _ = std::fs::remove_file(&l.path);
            layers.push(l);
        }
        let config = self.push_config(&r, &layers).await?;
        let descriptors = layers
            .iter()
            .map(|l| OciDescriptor {
                media_type: LAYER_TAR.into(),
                digest: l.digest.clone(),
                size: l.size as i64,
                urls: None,
                artifact_type: None,
                annotations: Some(BTreeMap::from([
                    ("org.opencontainers.image.title".to_string(), l.file.clone()),
                    (FILE_ANNOTATION.to_string(), l.file.clone()),
                    (
                        "io.seedcast.format".to_string(),
                        l.format.as_str().to_string(),
                    ),
                ])),
            })
            .collect();
        let manifest = OciImageManifest {
            schema_version: 2,
            media_type: Some(MANIFEST_JSON.into()),
            config,
            layers: descriptors,
            subject: None,
            artifact_type: None,
            annotations: Some(BTreeMap::from([
                (
                    "org.opencontainers.image.title".to_string(),
                    image.name.clone(),
                ),
                (
                    "io.seedcast.global-id".to_string(),
                    image.global_id.to_string(),
                ),
                ("io.seedcast.version".to_string(), image.version.to_string()),
                (
                    "io.seedcast.manifest-id".to_string(),
                    hex::encode(image.manifest_id),
                ),
            ])),
        };
        self.client
            .push_manifest(&r, &OciManifest::Image(manifest))
            .await
            .map_err(|e| service(&format!("push of tag {tag}"), e))?;
        let digest = self
            .client
            .fetch_manifest_digest(&r, &self.auth)
            .await
            .map_err(|e| service(&format!("digest of tag {tag}"), e))?;
        Ok(digest)
    }

    /// The image manifest `digest` names, or `None` when the registry has none.
    async fn manifest(&self, digest: &str) -> Result<Option<OciImageManifest>, AdapterError> {
        let r = self.reference(digest);
        match self
            .client
            .pull_manifest_raw(&r, &self.auth, &[MANIFEST_JSON])
            .await
        {
            Ok((body, _)) => Ok(Some(
                serde_json::from_slice(&body)
                    .map_err(|e| service(&format!("manifest {digest}"), e))?,
            )),
            Err(e) if is_unknown(&e, OciErrorCode::ManifestUnknown) => Ok(None),
            Err(e) => Err(service(&format!("manifest {digest}"), e)),
        }
    }

    async fn read_file(&self, local_id: &str, file: &str) -> Result<ReadBack, AdapterError> {
        let m = self
            .manifest(local_id)
            .await?
            .ok_or_else(|| AdapterError::NotFound(local_id.to_string()))?;
        let layer = m
            .layers
            .iter()
            .find(|l| {
                l.annotations
                    .as_ref()
                    .and_then(|a| a.get(FILE_ANNOTATION))
                    .is_some_and(|f| f == file)
            })
            .ok_or_else(|| AdapterError::NoSuchFile {
                local_id: local_id.to_string(),
                file: file.to_string(),
            })?;
        let tar = tempfile::NamedTempFile::new_in(&self.staging)
            .map_err(AdapterError::io("create", &self.staging))?;
        let mut out = tokio::fs::File::create(tar.path())
            .await
            .map_err(AdapterError::io("create", tar.path()))?;
        self.client
            .pull_blob(&self.reference(local_id), layer, &mut out)
            .await
            .map_err(|e| service(&format!("download of {file}"), e))?;
        // tokio writes in the background: all of it must be in the file before it is read.
        tokio::io::AsyncWriteExt::flush(&mut out)
            .await
            .map_err(AdapterError::io("write", tar.path()))?;
        drop(out);
        let staging = self.staging.clone();
        let tar_path = tar.path().to_path_buf();
        let rb = tokio::task::spawn_blocking(move || unpack(&tar_path, &staging)).await??;
        Ok(ReadBack::Downloaded(rb))
    }
}

/// Is `e` the registry saying it does not know the thing (`code`)?
fn is_unknown(e: &OciDistributionError, code: OciErrorCode) -> bool {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => {
            code == OciErrorCode::ManifestUnknown
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            envelope.errors.iter().any(|x| x.code == code)
        }
        OciDistributionError::ServerError { code: 404, .. } => true,
        _ => false,
    }
}

/// The one regular file of a downloaded layer, as the bytes its recipe describes (a disk
/// converted back to its raw guest content). Blocking.
fn unpack(tar_path: &Path, staging: &Path) -> Result<tempfile::TempPath, AdapterError> {
    let mut a =
        tar::Archive::new(File::open(tar_path).map_err(AdapterError::io("open", tar_path))?);
    let out =
        tempfile::NamedTempFile::new_in(staging).map_err(AdapterError::io("create", staging))?;
    let mut disk = false;
    for e in a.entries().map_err(AdapterError::io("read", tar_path))? {
        let mut e = e.map_err(AdapterError::io("read", tar_path))?;
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        disk = e.path().is_ok_and(|p| p.starts_with("disk"));
        io::copy(&mut e, &mut out.as_file()).map_err(AdapterError::io("write", out.path()))?;
        break;
    }
    let out = out.into_temp_path();
    if !disk {
        return Ok(out);
    }
    let raw = tempfile::NamedTempFile::new_in(staging)
        .map_err(AdapterError::io("create", staging))?
        .into_temp_path();
    seedcast_qemu::convert(
        &out,
        seedcast_qemu::Format::Qcow2,
        &raw,
        seedcast_qemu::Format::Raw,
        &seedcast_qemu::ConvertOptions::default(),
    )?;
    Ok(raw)
}

impl Adapter for OciAdapter {
    fn kind(&self) -> &'static str {
        "oci"
    }

    fn keeps_copies(&self) -> bool {
        false
    }

    fn check(&self) -> BoxFuture<'_, Result<(), AdapterError>> {
        Box::pin(async move {
            // An authenticated request: listing the repository's tags (it may not exist
            // yet, which is fine).
            let r = self.reference("seedcast-check");
            match self.client.list_tags(&r, &self.auth, Some(1), None).await {
                Ok(_) => Ok(()),
                Err(e) if is_unknown(&e, OciErrorCode::NameUnknown) => Ok(()),
                Err(e) => Err(service(
                    &format!("{} does not answer us", self.opts.registry),
                    e,
                )),
            }
        })
    }

    fn exists<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<bool, AdapterError>> {
        Box::pin(async move {
            if !local_id.starts_with("sha256:") {
                return Ok(false);
            }
            Ok(self.manifest(local_id).await?.is_some())
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
        Box::pin(async move {
            if !local_id.starts_with("sha256:") {
                return Err(AdapterError::NotFound(local_id.to_string()));
            }
            self.read_file(local_id, file).await
        })
    }

    fn delete<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move {
            if !local_id.starts_with("sha256:") || !self.exists(local_id).await? {
                return Err(AdapterError::NotFound(local_id.to_string()));
            }
            let r = self.reference(local_id);
            let token = self
                .client
                .auth(&r, &self.auth, RegistryOperation::Push)
                .await
                .map_err(|e| service("auth", e))?;
            let mut req = self
                .http
                .delete(format!("{}/manifests/{local_id}", self.base_url()));
            req = match (&token, &self.auth) {
                (Some(t), _) => req.bearer_auth(t),
                (None, RegistryAuth::Basic(u, p)) => req.basic_auth(u, Some(p)),
                _ => req,
            };
            let resp = req
                .send()
                .await
                .map_err(|e| service("DELETE manifest", e))?;
            if !resp.status().is_success() {
                return Err(service(
                    &format!("DELETE manifest {local_id}"),
                    resp.status(),
                ));
            }
            Ok(())
        })
    }
}
