//! `seedcast demo`: the main job on embedded defaults. An engine and three agents on
//! loopback in a temporary directory; a generated image of a few hundred MiB pushed to all
//! three; an adaptation block applied to it; the mapping and the bytes moved printed; every
//! site's copy checked byte for byte after each step.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Instant;

use seedcast_agents::Adapter;
use seedcast_core::protocol::{ImageStatus, PlacementState, SitePlacement};

use crate::client::{Change, ClientError, PushOptions};
use crate::cluster::{ClusterError, LocalCluster, file_hash};
use crate::output::{human_bytes, image_table};
use crate::synth;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Keep everything in this directory instead of a temporary one.
    pub dir: Option<PathBuf>,
    /// Size of the generated disk image. 256 MiB.
    pub disk_mib: u64,
    pub sites: Vec<String>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            dir: None,
            disk_mib: 256,
            sites: vec!["site-a".into(), "site-b".into(), "site-c".into()],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Client(#[from] ClientError),
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

/// Run the demo, narrating to `out`.
pub async fn run(opts: DemoOptions, out: &mut (dyn Write + Send)) -> Result<DemoReport, DemoError> {
    let sites: Vec<&str> = opts.sites.iter().map(String::as_str).collect();
    let cluster = LocalCluster::start(opts.dir.clone(), &sites).await?;
    writeln!(
        out,
        "seedcast demo: engine on {} with {} agents ({}), data in {}",
        cluster.engine_addr,
        sites.len(),
        sites.join(", "),
        cluster.root.display()
    )?;

    // The image: a sparse disk, a kernel, an initrd, metadata.
    let img = cluster.root.join("image");
    std::fs::create_dir_all(&img)?;
    let disk = img.join("disk.raw");
    let data = synth::write_disk(&disk, opts.disk_mib << 20, "seedcast demo disk")?;
    synth::write_blob(&img.join("vmlinuz"), 8 << 20, "seedcast demo kernel", 0.3)?;
    synth::write_blob(
        &img.join("initrd.img"),
        24 << 20,
        "seedcast demo initrd",
        0.6,
    )?;
    std::fs::write(
        img.join("metadata.json"),
        format!(
            "{{\"os\": \"demo-linux\", \"arch\": \"x86_64\", \"disk_mib\": {}}}\n",
            opts.disk_mib
        ),
    )?;
    let files: Vec<PathBuf> = ["disk.raw", "vmlinuz", "initrd.img", "metadata.json"]
        .iter()
        .map(|f| img.join(f))
        .collect();
    writeln!(
        out,
        "image: disk.raw {} ({} data, the rest holes), vmlinuz, initrd.img, metadata.json",
        human_bytes(opts.disk_mib << 20),
        human_bytes(data)
    )?;

    let client = cluster.client().await?;
    let push = |name: &'static str| {
        let client = &client;
        let files = files.clone();
        async move {
            let t = Instant::now();
            let committed = client.push(&PushOptions::new(name, files), |_| {}).await?;
            let done = client
                .watch(&committed.global_id, committed.version, |_| {})
                .await?;
            Ok::<_, ClientError>((done, t.elapsed()))
        }
    };

    let (first, took) = push("demo-image").await?;
    writeln!(
        out,
        "\npush + distribute to {} sites: {:.2} s",
        sites.len(),
        took.as_secs_f64()
    )?;
    write!(out, "{}", image_table(&first))?;
    writeln!(
        out,
        "uploaded to the engine: {} (zstd chunks of {} data); sent to each site: {}",
        human_bytes(first.bytes_uploaded),
        human_bytes(first.data_len),
        first
            .sites
            .iter()
            .map(|p| human_bytes(p.bytes_sent))
            .collect::<Vec<_>>()
            .join(" / ")
    )?;

    // Check every site's copy against the originals.
    let mut identical = first.sites.len() == sites.len();
    let originals: Vec<(String, blake3::Hash)> = files
        .iter()
        .map(|p| {
            Ok((
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                file_hash(p)?,
            ))
        })
        .collect::<std::io::Result<_>>()?;
    for p in &first.sites {
        match check_site(&cluster, p, &originals).await? {
            None => {
                writeln!(out, "  {}: not published ({:?})", p.site, p.error)?;
                identical = false;
            }
            Some((ok, allocated)) => {
                identical &= ok;
                writeln!(
                    out,
                    "  {}: {} — {} on disk (holes kept sparse)",
                    p.site,
                    if ok { "byte-identical" } else { "DIFFERS" },
                    human_bytes(allocated)
                )?;
            }
        }
    }

    // An adaptation block: 64 KiB written into the disk and a new metadata.json, as one new
    // version of the same global id; only the change travels.
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
    std::fs::write(
        &meta,
        format!(
            "{{\"os\": \"demo-linux\", \"arch\": \"x86_64\", \"disk_mib\": {}, \"patched\": true}}\n",
            opts.disk_mib
        ),
    )?;
    let offset = (opts.disk_mib << 20) / 3;
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
        adapted
            .sites
            .iter()
            .map(|p| human_bytes(p.wire_bytes))
            .collect::<Vec<_>>()
            .join(" / "),
        adapted
            .sites
            .first()
            .map(|p| human_bytes(p.bytes_sent))
            .unwrap_or_default(),
        human_bytes(adapted.total_len),
        human_bytes(adapted.data_len)
    )?;
    // The same change made locally, and every site checked against it.
    let mut expected = Vec::new();
    for (name, _) in &originals {
        let src = if name == "metadata.json" {
            meta.clone()
        } else {
            img.join(name)
        };
        let dst = work.join(format!("expected-{name}"));
        std::fs::copy(&src, &dst)?;
        if name == "disk.raw" {
            use std::os::unix::fs::FileExt;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&dst)?
                .write_all_at(&patch_bytes, offset)?;
        }
        expected.push((name.clone(), file_hash(&dst)?));
    }
    for p in &adapted.sites {
        match check_site(&cluster, p, &expected).await? {
            None => {
                writeln!(out, "  {}: update not published ({:?})", p.site, p.error)?;
                identical = false;
            }
            Some((ok, _)) => {
                identical &= ok;
                writeln!(
                    out,
                    "  {}: {}",
                    p.site,
                    if ok {
                        "byte-identical to the same change made locally"
                    } else {
                        "DIFFERS from the same change made locally"
                    }
                )?;
            }
        }
    }

    let (second, _) = push("demo-image-again").await?;
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
    writeln!(
        out,
        "\n{}",
        if identical {
            "demo OK: one global id, a local id per site, every site byte-identical"
        } else {
            "demo FAILED: not every site holds a byte-identical copy"
        }
    )?;
    Ok(DemoReport {
        first,
        adapted,
        second,
        identical,
    })
}
