//! Shared helpers for the integration tests: images, pushes, and checks of what sites hold.
#![allow(dead_code)]

pub mod impostor;
pub mod procs;

use std::os::unix::fs::MetadataExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::FutureExt;
use seedcast::client::{Client, PushOptions};
use seedcast::cluster::{LocalCluster, file_hash};
use seedcast::synth;
use seedcast_core::protocol::{ImageStatus, PlacementState};

pub const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

/// Run `body` against a fresh cluster of `sites`, and shut the cluster down whatever the body
/// does — returns, fails, or panics on an assertion — before reporting how it ended.
pub async fn with_cluster(
    sites: &[&str],
    body: impl AsyncFnOnce(&mut LocalCluster) -> Result<()>,
) -> Result<()> {
    with_engine(sites, |_| {}, body).await
}

/// As [`with_cluster`], with the engine configured by `configure`.
pub async fn with_engine(
    sites: &[&str],
    configure: impl Fn(&mut seedcast_engine::EngineConfig) + Send + Sync + 'static,
    body: impl AsyncFnOnce(&mut LocalCluster) -> Result<()>,
) -> Result<()> {
    let mut cluster = LocalCluster::start_with(None, sites, configure).await?;
    let outcome = AssertUnwindSafe(body(&mut cluster)).catch_unwind().await;
    let down = cluster.shutdown().await;
    match outcome {
        Err(panic) => std::panic::resume_unwind(panic),
        Ok(r) => {
            r?;
            Ok(down?)
        }
    }
}

/// Wait until every site in `sites` has published `version` of `g` (30 s at most).
pub async fn wait_published(
    cluster: &LocalCluster,
    client: &Client,
    g: &seedcast_core::GlobalId,
    version: u32,
    sites: &[&str],
) -> Result<ImageStatus> {
    Ok(cluster
        .wait_published(client, g, version, sites, Duration::from_secs(30))
        .await?)
}

/// A small image: a sparse disk of `disk_mib`, a kernel, metadata.
pub fn make_image(dir: &Path, disk_mib: u64, seed: &str) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let disk = dir.join("disk.raw");
    synth::write_disk(&disk, disk_mib << 20, seed)?;
    synth::write_blob(
        &dir.join("vmlinuz"),
        3 << 20,
        &format!("{seed} kernel"),
        0.4,
    )?;
    std::fs::write(
        dir.join("metadata.json"),
        format!("{{\"seed\": \"{seed}\"}}\n"),
    )?;
    Ok(vec![disk, dir.join("vmlinuz"), dir.join("metadata.json")])
}

/// Push and wait until every target site is done.
pub async fn push_wait(
    client: &Client,
    name: &str,
    files: &[PathBuf],
    sites: Option<Vec<String>>,
) -> Result<ImageStatus> {
    let mut opts = PushOptions::new(name, files.to_vec());
    opts.sites = sites;
    let committed = client.push(&opts, |_| {}).await?;
    let done = client
        .watch(&committed.global_id, committed.version, |_| {})
        .await?;
    ensure!(done.bytes_uploaded == committed.bytes_uploaded);
    Ok(done)
}

/// Every published site of `status` holds `files` byte-identical, with holes kept sparse.
pub async fn assert_copies(
    cluster: &LocalCluster,
    status: &ImageStatus,
    files: &[PathBuf],
) -> Result<()> {
    for p in &status.sites {
        ensure!(
            p.state == PlacementState::Published,
            "{} is {:?}: {:?}",
            p.site,
            p.state,
            p.error
        );
        let local = p
            .local_id
            .as_deref()
            .context("published without local id")?;
        let agent = cluster.agent(&p.site);
        for f in files {
            let name = f.file_name().unwrap().to_str().unwrap();
            let rb = agent.adapter.read_back(local, name).await?;
            ensure!(
                file_hash(rb.path())? == file_hash(f)?,
                "{name} at {} differs from the original",
                p.site
            );
            let (src, dst) = (std::fs::metadata(f)?, std::fs::metadata(rb.path())?);
            ensure!(src.len() == dst.len());
            // Holes stay holes: the copy allocates no more than the data (plus slack).
            ensure!(
                dst.blocks() * 512 <= src.blocks() * 512 + (1 << 20),
                "{name} at {} is not sparse: {} allocated vs {}",
                p.site,
                dst.blocks() * 512,
                src.blocks() * 512
            );
        }
    }
    Ok(())
}

/// A bare QUIC connection to the engine (CA pinned, no credentials): for speaking the
/// protocol by hand.
pub async fn raw_connect(cluster: &LocalCluster) -> Result<quinn::Connection> {
    use seedcast_net::endpoint::TransportOptions;
    let t = TransportOptions::default();
    let cc = seedcast_net::tls::client_config(cluster.admin.ca_fingerprint, None, &t)?;
    let ep = seedcast_net::endpoint::client(cluster.engine_addr, &t)?;
    Ok(ep
        .connect_with(
            cc,
            cluster.engine_addr,
            seedcast_core::protocol::SERVER_NAME,
        )?
        .await?)
}

/// A bare connection that has said hello as a client with the admin secret.
pub async fn raw_admin(cluster: &LocalCluster) -> Result<quinn::Connection> {
    use seedcast_core::protocol::{Hello, HelloReply, PROTOCOL_VERSION, Role};
    let conn = raw_connect(cluster).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    seedcast_net::write_msg(
        &mut send,
        &Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Client {
                admin_secret: cluster.admin.secret.clone(),
            },
        },
    )
    .await?;
    let r: HelloReply = seedcast_net::read_msg_required(&mut recv).await?;
    ensure!(matches!(r, HelloReply::Welcome { .. }), "{r:?}");
    Ok(conn)
}
