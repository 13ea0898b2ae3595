//! The adapters benchmark: the real Debian image (`make-images.sh` v1 → v2, pushed as qcow2
//! disks) seeded to and updated at one site of each kind — dir, qcow2 (overlays), OCI
//! registry, S3 on Swift, Glance behind Keystone — all real services on 127.0.0.1, in one
//! run. For each site it reports:
//!
//! - bytes on the wire for the update (the adapter should not change them);
//! - the time from the client starting (chunking, upload) and from the engine's commit to
//!   the site's local id, and the part of it the adapter spent publishing into its service
//!   (assembled image in, local id out);
//! - the bytes written into the service's own storage (allocated bytes of files created
//!   or changed under the registry's, Swift's, Glance's or the pool's directory) for the
//!   update, side by side with what seeding v1 wrote there in the same run: the ratio is
//!   what the adapter's layout saves over writing the whole image again.
//!
//! Every site's copy of v2 is read back through its service and compared with v2's guest
//! content before anything is printed.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use futures::future::BoxFuture;
use seedcast::client::{Change, Client, PushOptions};
use seedcast::cluster::{LocalCluster, file_hash};
use seedcast::sites::{SiteKind, SiteServices};
use seedcast_agents::{Adapter, AdapterError, AssembledImage, ReadBack};
use seedcast_core::GlobalId;
use seedcast_core::protocol::{ImageStatus, PlacementState};
use seedcast_qemu::{ConvertOptions, Format, convert};

#[derive(Parser, Debug)]
struct Args {
    /// Directory with v1.qcow2 and the raw v2 (make-images.sh OUTDIR).
    #[arg(long, default_value_t = default_images())]
    images: String,
    /// The new version, a raw file in the images directory: `v2.raw` (a rebuilt
    /// filesystem) or `v2-inplace.raw` (v1 patched in place; `INPLACE=1 make-images.sh`).
    /// The benchmark converts it to qcow2 and pushes that.
    #[arg(long, default_value = "v2.raw")]
    v2: String,
    /// The kinds of site, one of each.
    #[arg(long, value_delimiter = ',', default_value = "dir,qcow2,oci,s3,glance")]
    adapters: Vec<SiteKind>,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn default_images() -> String {
    format!(
        "{}/.cache/seedcast-images",
        std::env::var("HOME").unwrap_or_default()
    )
}

/// An adapter that times its `publish` and `update` calls and otherwise is the real one.
#[derive(Debug)]
struct Timed {
    inner: Arc<dyn Adapter>,
    last: Arc<Mutex<Option<Duration>>>,
}

impl Timed {
    fn time<'a, T: Send + 'a>(
        &'a self,
        f: BoxFuture<'a, Result<T, AdapterError>>,
    ) -> BoxFuture<'a, Result<T, AdapterError>> {
        Box::pin(async move {
            let t = Instant::now();
            let r = f.await;
            *self.last.lock().expect("timer lock") = Some(t.elapsed());
            r
        })
    }
}

impl Adapter for Timed {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn keeps_copies(&self) -> bool {
        self.inner.keeps_copies()
    }
    fn check(&self) -> BoxFuture<'_, Result<(), AdapterError>> {
        self.inner.check()
    }
    fn exists<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<bool, AdapterError>> {
        self.inner.exists(local_id)
    }
    fn staging_root(&self) -> &Path {
        self.inner.staging_root()
    }
    fn publish(&self, image: AssembledImage) -> BoxFuture<'_, Result<String, AdapterError>> {
        self.time(self.inner.publish(image))
    }
    fn update<'a>(
        &'a self,
        local_id: &'a str,
        image: AssembledImage,
    ) -> BoxFuture<'a, Result<String, AdapterError>> {
        self.time(self.inner.update(local_id, image))
    }
    fn read_back<'a>(
        &'a self,
        local_id: &'a str,
        file: &'a str,
    ) -> BoxFuture<'a, Result<ReadBack, AdapterError>> {
        self.inner.read_back(local_id, file)
    }
    fn delete<'a>(&'a self, local_id: &'a str) -> BoxFuture<'a, Result<(), AdapterError>> {
        self.inner.delete(local_id)
    }
}

/// Every file under a directory: (inode, length, mtime) and allocated bytes.
type Snapshot = HashMap<PathBuf, ((u64, u64, i64, i64), u64)>;

fn snapshot(dir: &Path) -> Result<Snapshot> {
    let mut out = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue; // not made yet (a pool before its first image)
        };
        for e in rd {
            let e = e?;
            let m = std::fs::symlink_metadata(e.path())?;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                let key = (m.ino(), m.len(), m.mtime(), m.mtime_nsec());
                out.insert(e.path(), (key, m.blocks() * 512));
            }
        }
    }
    Ok(out)
}

/// Allocated bytes of the files in `after` that are new or changed since `before`.
fn written(before: &Snapshot, after: &Snapshot) -> u64 {
    after
        .iter()
        .filter(|(p, (k, _))| before.get(*p).is_none_or(|(b, _)| b != k))
        .map(|(_, (_, alloc))| alloc)
        .sum()
}

/// One site in the run.
struct Site {
    name: String,
    kind: SiteKind,
    storage: PathBuf,
    publish: Arc<Mutex<Option<Duration>>>,
}

/// One step (seed or update) at one site.
#[derive(Clone, Copy, Debug, Default)]
struct Step {
    /// From the client starting the push or adapt (chunking, upload) to the local id.
    to_local_id: f64,
    /// From the engine committing the version to the local id.
    commit_to_local_id: f64,
    publish: f64,
    written: u64,
    wire: u64,
    payload: u64,
}

/// Watch version `v` until done, noting when each site first shows it published.
async fn watch_timed(
    client: &Client,
    g: &GlobalId,
    v: u32,
    t0: Instant,
) -> Result<(ImageStatus, BTreeMap<String, f64>)> {
    let mut at = BTreeMap::new();
    let s = client
        .watch(g, v, |s| {
            for p in &s.sites {
                if p.state == PlacementState::Published && p.version == v {
                    at.entry(p.site.clone())
                        .or_insert_with(|| t0.elapsed().as_secs_f64());
                }
            }
        })
        .await?;
    ensure!(
        s.sites.iter().all(|p| p.state == PlacementState::Published),
        "version {v} not published everywhere: {:?}",
        s.sites
    );
    for p in &s.sites {
        at.entry(p.site.clone())
            .or_insert_with(|| t0.elapsed().as_secs_f64());
    }
    Ok((s, at))
}

/// Run `step` and measure each site: time to local id, publish time, bytes written.
async fn measure<F>(
    sites: &[Site],
    client: &Client,
    step: F,
) -> Result<(ImageStatus, BTreeMap<String, Step>)>
where
    F: AsyncFnOnce(&Client) -> Result<(GlobalId, u32)>,
{
    let before: Vec<Snapshot> = sites
        .iter()
        .map(|s| snapshot(&s.storage))
        .collect::<Result<_>>()?;
    for s in sites {
        *s.publish.lock().expect("timer lock") = None;
    }
    let t0 = Instant::now();
    let (g, v) = step(client).await?;
    let committed = t0.elapsed().as_secs_f64();
    let (status, at) = watch_timed(client, &g, v, t0).await?;
    let mut out = BTreeMap::new();
    for (s, b) in sites.iter().zip(&before) {
        let p = status
            .sites
            .iter()
            .find(|p| p.site == s.name)
            .context("site missing from status")?;
        let publish = s.publish.lock().expect("timer lock").unwrap_or_default();
        out.insert(
            s.name.clone(),
            Step {
                to_local_id: at[&s.name],
                commit_to_local_id: at[&s.name] - committed,
                publish: publish.as_secs_f64(),
                written: written(b, &snapshot(&s.storage)?),
                wire: p.wire_bytes,
                payload: p.bytes_sent,
            },
        );
    }
    Ok((status, out))
}

/// Start the services and one agent per kind, each adapter timed.
async fn start(root: &Path, kinds: &[SiteKind]) -> Result<(SiteServices, LocalCluster, Vec<Site>)> {
    let k = kinds.to_vec();
    let services = tokio::task::spawn_blocking(move || SiteServices::start(&k)).await??;
    let mut cluster = LocalCluster::start(Some(root.to_path_buf()), &[]).await?;
    let mut sites = Vec::new();
    for &kind in kinds {
        let name = kind.name().to_string();
        let pool = cluster.pool_dir(&name);
        let data = cluster.root.join("agents").join(&name);
        let last = Arc::new(Mutex::new(None));
        let timed = Timed {
            inner: services.adapter(kind, &name, &pool, &data)?,
            last: last.clone(),
        };
        cluster.add_agent_using(&name, Arc::new(timed)).await?;
        sites.push(Site {
            storage: services
                .storage(kind, &pool)
                .context("service has no storage")?,
            name,
            kind,
            publish: last,
        });
    }
    cluster
        .wait_connected(kinds.len(), Duration::from_secs(60))
        .await?;
    Ok((services, cluster, sites))
}

/// Every site holds `want` (v2's guest content) as `disk.qcow2`, read through its service.
async fn check(cluster: &LocalCluster, s: &ImageStatus, want: blake3::Hash) -> Result<()> {
    for p in &s.sites {
        let id = p.local_id.as_deref().context("no local id")?;
        let rb = cluster
            .agent(&p.site)
            .adapter
            .read_back(id, "disk.qcow2")
            .await?;
        ensure!(file_hash(rb.path())? == want, "{} does not hold v2", p.site);
    }
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn print_table(sites: &[Site], seed: &BTreeMap<String, Step>, upd: &BTreeMap<String, Step>) {
    println!(
        "| site | update on the wire | update payload | seed: commit → local id | seed: publish | seed: written into service | update: client start → local id | update: commit → local id | update: publish | update: written into service | update ÷ seed written |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for s in sites {
        let (a, b) = (&seed[&s.name], &upd[&s.name]);
        println!(
            "| {} | {} B | {} B | {:.1} s | {:.1} s | {} | {:.1} s | {:.1} s | {:.1} s | {} | {:.3} |",
            s.kind,
            b.wire,
            b.payload,
            a.commit_to_local_id,
            a.publish,
            mib(a.written),
            b.to_local_id,
            b.commit_to_local_id,
            b.publish,
            mib(b.written),
            b.written as f64 / a.written.max(1) as f64
        );
    }
}

fn write_json(
    path: &Path,
    sites: &[Site],
    seed: &BTreeMap<String, Step>,
    upd: &BTreeMap<String, Step>,
) -> Result<()> {
    let step = |s: &Step| {
        serde_json::json!({"seconds_to_local_id": s.to_local_id,
            "seconds_commit_to_local_id": s.commit_to_local_id, "publish_seconds": s.publish,
            "bytes_written": s.written, "wire_bytes": s.wire, "payload_bytes": s.payload})
    };
    let v: Vec<_> = sites
        .iter()
        .map(|s| {
            serde_json::json!({"site": s.name, "adapter": s.kind.name(),
                "seed": step(&seed[&s.name]), "update": step(&upd[&s.name])})
        })
        .collect();
    std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let images = PathBuf::from(&args.images);
    let (v1, v2_raw) = (images.join("v1.qcow2"), images.join(&args.v2));
    if !v1.exists() || !v2_raw.exists() {
        bail!(
            "{} lacks v1.qcow2 or {}: build them with ../shared/testdata/make-images.sh {} (INPLACE=1 for v2-inplace.raw)",
            images.display(),
            args.v2,
            images.display()
        );
    }
    for k in &args.adapters {
        k.check_installed()?;
    }
    let tmp = tempfile::Builder::new()
        .prefix("seedcast-bench-")
        .tempdir()?;
    let (services, cluster, sites) = start(&tmp.path().join("cluster"), &args.adapters).await?;
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work)?;
    // v2 as make-images.sh makes v1.qcow2: qemu-img convert, no compression.
    let v2 = work.join("v2.qcow2");
    convert(
        &v2_raw,
        Format::Raw,
        &v2,
        Format::Qcow2,
        &ConvertOptions::default(),
    )?;
    let disk = work.join("disk.qcow2");
    std::os::unix::fs::symlink(&v1, &disk)?;
    let client = cluster.client().await?;

    let (seeded, seed) = measure(&sites, &client, async |c: &Client| {
        let s = c
            .push(&PushOptions::new("debian", vec![disk.clone()]), |_| {})
            .await?;
        Ok((s.global_id, s.version))
    })
    .await?;
    let g = seeded.global_id;
    let (updated, upd) = measure(&sites, &client, async |c: &Client| {
        let change = Change::Replace {
            path: "disk.qcow2".into(),
            file: v2.clone(),
        };
        let s = c.adapt(&g, &[change], 3).await?;
        Ok((s.global_id, s.version))
    })
    .await?;
    check(&cluster, &updated, file_hash(&v2_raw)?).await?;

    println!(
        "v1 → v2: {} → {} as qcow2 (guest {} / {} of data), one site of each kind",
        v1.display(),
        v2_raw.display(),
        mib(updated.total_len),
        mib(updated.data_len)
    );
    println!(
        "seed upload (client → engine): {}; update upload: {}",
        mib(seeded.bytes_uploaded),
        mib(updated.bytes_uploaded)
    );
    println!();
    print_table(&sites, &seed, &upd);
    if let Some(p) = &args.json {
        write_json(p, &sites, &seed, &upd)?;
    }
    client.close().await;
    cluster.shutdown().await?;
    drop(services);
    Ok(())
}
