//! `seedcast demo`: the main job on embedded defaults. An engine and three agents on
//! loopback in a temporary directory; a generated image of a few hundred MiB pushed to all
//! three; an adaptation block applied to it; the mapping and the bytes moved printed; every
//! site's copy read back through its service and checked byte for byte after each step.
//!
//! The sites are three directory pools unless `adapters` names other kinds: then the real
//! services they need (an OCI registry, Swift, Keystone and Glance) are started here too,
//! and the mapping shows each service's own kind of local id under the one global id.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use seedcast_core::protocol::{ImageStatus, PlacementState, SitePlacement};

use crate::client::{Change, Client, ClientError, PushOptions};
use crate::cluster::{ClusterError, LocalCluster, file_hash};
use crate::output::{human_bytes, image_table};
use crate::services::ServiceError;
use crate::sites::{SiteError, SiteKind, SiteServices, site_names};
use crate::synth;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Keep everything in this directory instead of a temporary one.
    pub dir: Option<PathBuf>,
    /// Size of the generated disk image. 256 MiB.
    pub disk_mib: u64,
    /// One site per entry, of that kind.
    pub adapters: Vec<SiteKind>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            dir: None,
            disk_mib: 256,
            adapters: vec![SiteKind::Dir; 3],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Site(#[from] SiteError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// What the demo found.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub first: ImageStatus,
    pub adapted: ImageStatus,
    pub second: ImageStatus,
    /// Every site holds every file byte-identical to the original.
    pub identical: bool,
}

/// Does the site hold every file with the expected hash? `None` when nothing is published
/// there; else whether all match, and the bytes its files allocate on disk.
async fn check_site(
    cluster: &LocalCluster,
    p: &SitePlacement,
    expected: &[(String, blake3::Hash)],
) -> Result<Option<(bool, u64)>, DemoError> {
    let Some(local) = p
        .local_id
        .as_deref()
        .filter(|_| p.state == PlacementState::Published)
    else {
        return Ok(None);
    };
    let a = cluster.agent(&p.site);
    let (mut ok, mut allocated) = (true, 0u64);
    for (name, h) in expected {
        let rb = a
            .adapter
            .read_back(local, name)
            .await
            .map_err(ClusterError::from)?;
        ok &= file_hash(rb.path())? == *h;
        allocated += std::fs::metadata(rb.path())?.blocks() * 512;
    }
    Ok(Some((ok, allocated)))
}

/// Check every site of `status` against `expected`, narrating; true when all match.
async fn check_sites(
    cluster: &LocalCluster,
    status: &ImageStatus,
    expected: &[(String, blake3::Hash)],
    out: &mut (dyn Write + Send),
    what: &str,
) -> Result<bool, DemoError> {
    let mut identical = true;
    for p in &status.sites {
        match check_site(cluster, p, expected).await? {
            None => {
                writeln!(out, "  {}: {what} not published ({:?})", p.site, p.error)?;
                identical = false;
            }
            Some((ok, allocated)) => {
                identical &= ok;
                let dir = cluster.agent(&p.site).adapter.kind() == "dir";
                let verdict = match (ok, what) {
                    (true, "image") if dir => format!(
                        "byte-identical — {} on disk (holes kept sparse)",
                        human_bytes(allocated)
                    ),
                    (true, "image") => "byte-identical, read back through its service".into(),
                    (false, "image") => "DIFFERS".to_string(),
                    (true, _) => "byte-identical to the same change made locally".into(),
                    (false, _) => "DIFFERS from the same change made locally".into(),
                };
                writeln!(out, "  {}: {verdict}", p.site)?;
            }
        }
    }
    Ok(identical)
}

/// Name and hash of each file.
fn hashes(files: &[PathBuf]) -> std::io::Result<Vec<(String, blake3::Hash)>> {
    files
        .iter()
        .map(|p| {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            Ok((name, file_hash(p)?))
        })
        .collect()
}

fn metadata(disk_mib: u64, patched: bool) -> String {
    let extra = if patched { ", \"patched\": true" } else { "" };
    format!("{{\"os\": \"demo-linux\", \"arch\": \"x86_64\", \"disk_mib\": {disk_mib}{extra}}}\n")
}

/// The image: a sparse disk, a kernel, an initrd, metadata. Returns the files and the
/// disk's data bytes.
fn make_image(dir: &Path, disk_mib: u64) -> Result<(Vec<PathBuf>, u64), DemoError> {
    std::fs::create_dir_all(dir)?;
    let data = synth::write_disk(&dir.join("disk.raw"), disk_mib << 20, "seedcast demo disk")?;
    synth::write_blob(&dir.join("vmlinuz"), 8 << 20, "seedcast demo kernel", 0.3)?;
    synth::write_blob(
        &dir.join("initrd.img"),
        24 << 20,
        "seedcast demo initrd",
        0.6,
    )?;
    std::fs::write(dir.join("metadata.json"), metadata(disk_mib, false))?;
    let files = ["disk.raw", "vmlinuz", "initrd.img", "metadata.json"]
        .iter()
        .map(|f| dir.join(f))
        .collect();
    Ok((files, data))
}

/// Push `files` as `name` and wait until every site is done.
async fn push(
    client: &Client,
    name: &str,
    files: &[PathBuf],
) -> Result<(ImageStatus, Duration), ClientError> {
    let t = Instant::now();
    let committed = client
        .push(&PushOptions::new(name, files.to_vec()), |_| {})
        .await?;
    let done = client
        .watch(&committed.global_id, committed.version, |_| {})
        .await?;
    Ok((done, t.elapsed()))
}

fn joined(sites: &[SitePlacement], f: impl Fn(&SitePlacement) -> u64) -> String {
    sites
        .iter()
        .map(|p| human_bytes(f(p)))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The adaptation block: 64 KiB written into the disk and a new metadata.json, as one new
/// version of the same global id (only the change travels). Returns the new version's
/// status and the files it should hold, as the same change made locally gives them.
async fn adapt(
    cluster: &LocalCluster,
    client: &Client,
    first: &ImageStatus,
    files: &[PathBuf],
    disk_mib: u64,
    out: &mut (dyn Write + Send),
) -> Result<(ImageStatus, Vec<(String, blake3::Hash)>), DemoError> {
    let work = cluster.root.join("update");
    std::fs::create_dir_all(&work)?;
    let patch = work.join("patch.bin");
    let mut patch_bytes = vec![0u8; 64 * 1024];
    synth::text_like(
        &mut synth::Stream::new("seedcast demo patch"),
        &mut patch_bytes,
    );
    std::fs::write(&patch, &patch_bytes)?;
    let meta = work.join("metadata.json");
    std::fs::write(&meta, metadata(disk_mib, true))?;
    let offset = (disk_mib << 20) / 3;
    let t = Instant::now();
    let changes = [
        Change::Write {
            path: "disk.raw".into(),
            offset,
            data_file: patch.clone(),
        },
        Change::Replace {
            path: "metadata.json".into(),
            file: meta.clone(),
        },
    ];
    let committed = client.adapt(&first.global_id, &changes, 3).await?;
    let adapted = client
        .watch(&committed.global_id, committed.version, |_| {})
        .await?;
    writeln!(
        out,
        "\nadaptation block (64 KiB written into disk.raw at {offset}, metadata.json replaced) → version {} in {:.2} s",
        adapted.version,
        t.elapsed().as_secs_f64()
    )?;
    write!(out, "{}", image_table(&adapted))?;
    writeln!(
        out,
        "update on the wire per site: {} (payload {}), for an image of {} ({} data)",
        joined(&adapted.sites, |p| p.wire_bytes),
        adapted
            .sites
            .first()
            .map(|p| human_bytes(p.bytes_sent))
            .unwrap_or_default(),
        human_bytes(adapted.total_len),
        human_bytes(adapted.data_len)
    )?;
    let expected = made_locally(files, &work, &meta, &patch_bytes, offset)?;
    Ok((adapted, expected))
}

/// The files with the same change made locally: `patch` written into disk.raw at `offset`,
/// metadata.json replaced by `meta`; their names and hashes.
fn made_locally(
    files: &[PathBuf],
    work: &Path,
    meta: &Path,
    patch: &[u8],
    offset: u64,
) -> Result<Vec<(String, blake3::Hash)>, DemoError> {
    let mut expected = Vec::new();
    for src in files {
        let name = src
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let src = if name == "metadata.json" {
            meta
        } else {
            src.as_path()
        };
        let dst = work.join(format!("expected-{name}"));
        std::fs::copy(src, &dst)?;
        if name == "disk.raw" {
            use std::os::unix::fs::FileExt;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&dst)?
                .write_all_at(patch, offset)?;
        }
        expected.push((name, file_hash(&dst)?));
    }
    Ok(expected)
}

/// Start the services `opts.adapters` need, an engine, and an agent per site.
async fn start(
    opts: &DemoOptions,
    out: &mut (dyn Write + Send),
) -> Result<(LocalCluster, SiteServices), DemoError> {
    for k in &opts.adapters {
        k.check_installed()?;
    }
    let remote = opts
        .adapters
        .iter()
        .any(|k| matches!(k, SiteKind::Oci | SiteKind::S3 | SiteKind::Glance));
    if remote {
        writeln!(out, "starting the sites' image services on 127.0.0.1 …")?;
    }
    let kinds = opts.adapters.clone();
    let services = tokio::task::spawn_blocking(move || SiteServices::start(&kinds))
        .await
        .map_err(std::io::Error::other)??;
    let mut cluster = LocalCluster::start(opts.dir.clone(), &[]).await?;
    let names = site_names(&opts.adapters);
    for (name, kind) in names.iter().zip(&opts.adapters) {
        services.add_site(&mut cluster, name, *kind).await?;
    }
    cluster
        .wait_connected(names.len(), Duration::from_secs(60))
        .await?;
    writeln!(
        out,
        "seedcast demo: engine on {} with {} agents, data in {}",
        cluster.engine_addr,
        names.len(),
        cluster.root.display()
    )?;
    for (name, kind) in names.iter().zip(&opts.adapters) {
        writeln!(out, "  {name}: {}", kind.service())?;
    }
    Ok((cluster, services))
}

/// Run the demo, narrating to `out`.
pub async fn run(opts: DemoOptions, out: &mut (dyn Write + Send)) -> Result<DemoReport, DemoError> {
    let (cluster, _services) = start(&opts, out).await?;
    let n_sites = cluster.agents.len();
    let (files, data) = make_image(&cluster.root.join("image"), opts.disk_mib)?;
    writeln!(
        out,
        "image: disk.raw {} ({} data, the rest holes), vmlinuz, initrd.img, metadata.json",
        human_bytes(opts.disk_mib << 20),
        human_bytes(data)
    )?;

    let client = cluster.client().await?;
    let (first, took) = push(&client, "demo-image", &files).await?;
    writeln!(
        out,
        "\npush + distribute to {} sites: {:.2} s",
        n_sites,
        took.as_secs_f64()
    )?;
    write!(out, "{}", image_table(&first))?;
    writeln!(
        out,
        "uploaded to the engine: {} (zstd chunks of {} data); sent to each site: {}",
        human_bytes(first.bytes_uploaded),
        human_bytes(first.data_len),
        joined(&first.sites, |p| p.bytes_sent)
    )?;
    let mut identical = first.sites.len() == n_sites;
    identical &= check_sites(&cluster, &first, &hashes(&files)?, out, "image").await?;

    let (adapted, expected) = adapt(&cluster, &client, &first, &files, opts.disk_mib, out).await?;
    identical &= check_sites(&cluster, &adapted, &expected, out, "update").await?;

    let (second, _) = push(&client, "demo-image-again", &files).await?;
    writeln!(
        out,
        "\nsame files pushed again as {}: uploaded {}, sent {} in total to {} sites",
        second.global_id,
        human_bytes(second.bytes_uploaded),
        human_bytes(second.sites.iter().map(|p| p.bytes_sent).sum()),
        second.sites.len()
    )?;
    identical &= second
        .sites
        .iter()
        .all(|p| p.state == PlacementState::Published);

    client.close().await;
    cluster.shutdown().await?;
    let verdict = if identical {
        "demo OK: one global id, a local id per site, every site byte-identical"
    } else {
        "demo FAILED: not every site holds a byte-identical copy"
    };
    writeln!(out, "\n{verdict}")?;
    Ok(DemoReport {
        first,
        adapted,
        second,
        identical,
    })
}
