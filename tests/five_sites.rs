//! One engine, five kinds of site: a qcow2 image, an adaptation block and a rollback go to
//! agents whose services are a directory pool, qcow2 files, OpenStack Glance behind
//! Keystone, an OCI registry and an S3 object store — all real, started on 127.0.0.1 — and
//! every site's copy is read back through its own service (a file, qemu's export, the
//! Glance API, the registry API, the S3 API) and compared byte for byte with the guest
//! content.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{push_wait, with_cluster};
use seedcast::client::Change;
use seedcast::cluster::{LocalCluster, file_hash};
use seedcast::sites::{SiteKind, SiteServices};
use seedcast::synth;
use seedcast_core::protocol::{ImageStatus, PlacementState};
use seedcast_qemu::{ConvertOptions, Format, convert};

/// A site of each kind, named after it, with the real services started side by side.
async fn add_sites(cluster: &mut LocalCluster, sv: &SiteServices) -> Result<()> {
    for kind in SiteKind::ALL {
        sv.add_site(cluster, kind.name(), kind).await?;
    }
    cluster.wait_connected(5, Duration::from_secs(60)).await?;
    Ok(())
}

/// Every site holds `files` (the qcow2 disk as the guest content `raw`), read back through
/// its own service; each local id is of its service's kind.
async fn check_sites(
    cluster: &LocalCluster,
    s: &ImageStatus,
    files: &[PathBuf],
    raw: &Path,
) -> Result<()> {
    ensure!(s.sites.len() == 5, "{:?}", s.sites);
    for p in &s.sites {
        ensure!(p.state == PlacementState::Published, "{p:?}");
        let id = p.local_id.as_deref().context("no local id")?;
        let g = s.global_id.to_string();
        let kind_ok = match p.site.as_str() {
            "dir" | "glance" => uuid::Uuid::parse_str(id).is_ok(),
            "qcow2" => id == format!("{g}/v{}", s.version),
            "oci" => id.starts_with("sha256:") && id.len() == 71,
            "s3" => id == format!("s3/{g}/v{}", s.version),
            other => anyhow::bail!("unexpected site {other}"),
        };
        ensure!(kind_ok, "{}: local id {id}", p.site);
        let adapter = &cluster.agent(&p.site).adapter;
        for f in files {
            let name = f.file_name().unwrap().to_str().unwrap();
            let rb = adapter.read_back(id, name).await?;
            let want = if name == "disk.qcow2" {
                raw
            } else {
                f.as_path()
            };
            ensure!(
                file_hash(rb.path())? == file_hash(want)?,
                "{name} at {} differs",
                p.site
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_global_id_five_kinds_of_site_pushed_and_adapted() -> Result<()> {
    let sv = SiteServices::start(&SiteKind::ALL)?;
    with_cluster(&[], async |cluster| {
        add_sites(cluster, &sv).await?;
        let img = cluster.root.join("img");
        std::fs::create_dir_all(&img)?;
        let raw = img.join("guest.raw");
        synth::write_disk(&raw, 24 << 20, "five sites")?;
        let disk = img.join("disk.qcow2");
        convert(
            &raw,
            Format::Raw,
            &disk,
            Format::Qcow2,
            &ConvertOptions::default(),
        )?;
        synth::write_blob(&img.join("vmlinuz"), 1 << 20, "five kernel", 0.4)?;
        std::fs::write(img.join("metadata.json"), b"{\"os\": \"five\"}\n")?;
        let files = vec![disk, img.join("vmlinuz"), img.join("metadata.json")];
        let client = cluster.client().await?;
        let v1 = push_wait(&client, "five", &files, None).await?;
        check_sites(cluster, &v1, &files, &raw).await?;
        let raw_v1 = cluster.root.join("guest-v1.raw");
        std::fs::copy(&raw, &raw_v1)?;

        let patch = cluster.root.join("patch.bin");
        std::fs::write(&patch, vec![0xab; 12_000])?;
        let change = [Change::Write {
            path: "disk.qcow2".into(),
            offset: 9 << 20,
            data_file: patch.clone(),
        }];
        let c = client.adapt(&v1.global_id, &change, 3).await?;
        let v2 = client.watch(&v1.global_id, c.version, |_| {}).await?;
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&raw)?;
            f.write_all_at(&std::fs::read(&patch)?, 9 << 20)?;
        }
        check_sites(cluster, &v2, &files, &raw).await?;
        // The update crossed the wire as the same small delta to every kind of site.
        for p in &v2.sites {
            ensure!(
                p.bytes_sent < 64 << 10,
                "{}: {} bytes",
                p.site,
                p.bytes_sent
            );
        }

        // Rolling back makes v1's content version 3 at every kind of site, from what each
        // agent already holds: nothing but the manifest travels.
        let r = client.rollback(&v1.global_id, 1).await?;
        let v3 = client.watch(&v1.global_id, r.version, |_| {}).await?;
        ensure!(v3.version == 3, "{v3:?}");
        check_sites(cluster, &v3, &files, &raw_v1).await?;
        for p in &v3.sites {
            ensure!(p.bytes_sent == 0, "{}: {} bytes", p.site, p.bytes_sent);
        }
        client.close().await;
        Ok(())
    })
    .await
}
