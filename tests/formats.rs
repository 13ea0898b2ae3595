//! qcow2 disks in, any format out: a real engine and real agents on 127.0.0.1, disks read
//! and written by qemu's own tools, every site's copy checked with `qemu-img`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, ensure};
use common::{push_wait, with_cluster};
use seedcast::client::{Change, Client};
use seedcast::cluster::LocalCluster;
use seedcast::synth;
use seedcast_agents::adapters::{AdapterConfig, DirOptions, Qcow2Options};
use seedcast_core::GlobalId;
use seedcast_core::protocol::{ImageStatus, PlacementState};
use seedcast_qemu::{ConvertOptions, Format, check, compare, convert, info};

/// A raw disk (sparse, with data) and the same disk as qcow2, in `dir`.
fn disks(dir: &Path, mib: u64) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let raw = dir.join("disk.raw");
    synth::write_disk(&raw, mib << 20, "formats")?;
    let q = dir.join("disk.qcow2");
    convert(
        &raw,
        Format::Raw,
        &q,
        Format::Qcow2,
        &ConvertOptions::default(),
    )?;
    Ok((raw, q))
}

async fn add_sites(cluster: &mut LocalCluster, sites: &[(&str, AdapterConfig)]) -> Result<()> {
    for (site, cfg) in sites {
        cluster.add_agent_with(site, cfg).await?;
    }
    cluster
        .wait_connected(sites.len(), Duration::from_secs(30))
        .await?;
    Ok(())
}

/// The published disk file of `site` for `status`, found through the site's sidecar.
fn published_disk(cluster: &LocalCluster, s: &ImageStatus, site: &str) -> Result<PathBuf> {
    let p = s.sites.iter().find(|p| p.site == site).unwrap();
    ensure!(p.state == PlacementState::Published, "{p:?}");
    let dir = cluster.pool_dir(site).join(p.local_id.as_deref().unwrap());
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(".seedcast.json"))?)?;
    let name = sidecar["files"]["disk.qcow2"]["path"].as_str().unwrap();
    Ok(dir.join(name))
}

/// Every site's disk is a consistent qcow2 showing the guest `expected` (raw).
fn assert_qcow2_copies(
    cluster: &LocalCluster,
    s: &ImageStatus,
    sites: &[&str],
    expected: &Path,
) -> Result<()> {
    for site in sites {
        let disk = published_disk(cluster, s, site)?;
        ensure!(
            info(&disk, Format::Qcow2)?.format == "qcow2",
            "{site}: not qcow2"
        );
        check(&disk, Format::Qcow2)?;
        ensure!(
            compare(&disk, Format::Qcow2, expected, Format::Raw)?,
            "{site}: guest content differs"
        );
    }
    Ok(())
}

fn sites(cluster: &LocalCluster) -> [(&'static str, AdapterConfig); 3] {
    [
        (
            "dir",
            AdapterConfig::Dir(DirOptions {
                pool: cluster.pool_dir("dir"),
            }),
        ),
        (
            "kvm",
            AdapterConfig::Qcow2(Qcow2Options {
                pool: cluster.pool_dir("kvm"),
                compress: None,
                overlays: false,
            }),
        ),
        (
            "kvm-overlays",
            AdapterConfig::Qcow2(Qcow2Options {
                pool: cluster.pool_dir("kvm-overlays"),
                compress: Some(seedcast_agents::adapters::Compress::Zstd),
                overlays: true,
            }),
        ),
    ]
}

async fn adapt_wait(client: &Client, g: &GlobalId, changes: &[Change]) -> Result<ImageStatus> {
    let c = client.adapt(g, changes, 3).await?;
    Ok(client.watch(g, c.version, |_| {}).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qcow2_disk_is_its_guest_content_and_shares_every_chunk_with_its_raw_self() -> Result<()>
{
    with_cluster(&[], async |cluster| {
        let (raw, q) = disks(&cluster.root.join("img"), 24)?;
        let s = sites(cluster);
        add_sites(cluster, &s).await?;
        let client = cluster.client().await?;
        let first = push_wait(&client, "raw", std::slice::from_ref(&raw), None).await?;
        ensure!(first.bytes_uploaded > 0);
        // The same disk as qcow2: every chunk is already at the engine and at every site.
        let second = push_wait(&client, "qcow2", std::slice::from_ref(&q), None).await?;
        ensure!(second.bytes_uploaded == 0, "{second:?}");
        ensure!(second.total_len == first.total_len && second.data_len == first.data_len);
        for p in &second.sites {
            ensure!(p.bytes_sent == 0, "{p:?}");
        }
        assert_qcow2_copies(cluster, &second, &["dir", "kvm", "kvm-overlays"], &raw)?;
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_sites_take_updates_and_overlays_hold_only_what_changed() -> Result<()> {
    with_cluster(&[], async |cluster| {
        let (raw, q) = disks(&cluster.root.join("img"), 32)?;
        let s = sites(cluster);
        add_sites(cluster, &s).await?;
        let client = cluster.client().await?;
        let v1 = push_wait(&client, "vm", std::slice::from_ref(&q), None).await?;
        let all = ["dir", "kvm", "kvm-overlays"];
        assert_qcow2_copies(cluster, &v1, &all, &raw)?;

        // A write into the disk named by its qcow2 name; the expected guest content changes
        // the same way.
        let patch = cluster.root.join("patch.bin");
        std::fs::write(&patch, vec![0x5a; 20_000])?;
        let change = [Change::Write {
            path: "disk.qcow2".into(),
            offset: 7 << 20,
            data_file: patch.clone(),
        }];
        let v2 = adapt_wait(&client, &v1.global_id, &change).await?;
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&raw)?;
            f.write_all_at(&std::fs::read(&patch)?, 7 << 20)?;
        }
        assert_qcow2_copies(cluster, &v2, &all, &raw)?;
        let over = published_disk(cluster, &v2, "kvm-overlays")?;
        let i = info(&over, Format::Qcow2)?;
        ensure!(i.backing_filename.is_some(), "an overlay: {i:?}");
        let full = info(&published_disk(cluster, &v2, "kvm")?, Format::Qcow2)?;
        ensure!(
            i.actual_size.unwrap() * 10 < full.actual_size.unwrap(),
            "overlay {:?} vs full {:?}",
            i.actual_size,
            full.actual_size
        );
        // Rollback to version 1: every site shows version 1's guest content again.
        let c = client.rollback(&v1.global_id, 1).await?;
        let v3 = client.watch(&v1.global_id, c.version, |_| {}).await?;
        let (orig, _) = disks(&cluster.root.join("orig"), 32)?;
        assert_qcow2_copies(cluster, &v3, &all, &orig)?;
        client.close().await;
        Ok(())
    })
    .await
}
