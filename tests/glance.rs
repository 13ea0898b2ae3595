//! OpenStack Glance as a site: a real Keystone and a real Glance (Debian's packages, sqlite,
//! file store) started on 127.0.0.1; a real agent authenticating with the standard `OS_*`
//! settings, finding Glance in the service catalog, uploading each version; what Glance
//! holds read back through its own API.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{push_wait, with_cluster};
use seedcast::client::Change;
use seedcast::cluster::file_hash;
use seedcast::services::openstack::Glance;
use seedcast::synth;
use seedcast_agents::adapters::glance::GlanceAdapter;
use seedcast_agents::adapters::glance::keystone::AuthConfig;
use seedcast_agents::adapters::{DiskFormat, GlanceOptions};
use seedcast_agents::{Adapter, AgentError};
use seedcast_core::protocol::{ImageStatus, PlacementState};
use seedcast_qemu::{ConvertOptions, Format, convert};

/// An image: a qcow2 disk, a kernel, metadata; and the disk's raw view.
fn image(dir: &Path) -> Result<(Vec<PathBuf>, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let raw = dir.join("guest.raw");
    synth::write_disk(&raw, 16 << 20, "glance")?;
    let disk = dir.join("disk.qcow2");
    convert(
        &raw,
        Format::Raw,
        &disk,
        Format::Qcow2,
        &ConvertOptions::default(),
    )?;
    synth::write_blob(&dir.join("vmlinuz"), 1 << 20, "glance kernel", 0.4)?;
    std::fs::write(dir.join("metadata.json"), b"{\"os\": \"glance\"}\n")?;
    Ok((
        vec![disk, dir.join("vmlinuz"), dir.join("metadata.json")],
        raw,
    ))
}

fn keystone_auth(g: &Glance) -> Result<AuthConfig> {
    let k = g.keystone.as_ref().context("no keystone")?;
    AuthConfig::from_vars(k.agent_env())?.context("no OS_AUTH_URL")
}

/// Every file of `s` at the site, read back through the Glance API, is the original (the
/// disk as its guest content).
async fn check_images(
    a: &dyn Adapter,
    s: &ImageStatus,
    files: &[PathBuf],
    raw: &Path,
) -> Result<()> {
    let p = &s.sites[0];
    ensure!(p.state == PlacementState::Published, "{p:?}");
    let id = p.local_id.clone().context("no local id")?;
    ensure!(uuid::Uuid::parse_str(&id).is_ok(), "Glance's own id: {id}");
    ensure!(a.exists(&id).await?);
    for f in files {
        let name = f.file_name().unwrap().to_str().unwrap();
        let rb = a.read_back(&id, name).await?;
        let want = if name == "disk.qcow2" {
            raw
        } else {
            f.as_path()
        };
        ensure!(file_hash(rb.path())? == file_hash(want)?, "{name} differs");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_become_glance_images_through_keystone_and_the_catalog() -> Result<()> {
    let glance = Glance::start_with_keystone()?;
    with_cluster(&[], async |cluster| {
        let opts = GlanceOptions {
            url: None,
            os_cloud: None,
            disk_format: DiskFormat::Qcow2,
        };
        let staging = cluster.root.join("glance-staging");
        let adapter = Arc::new(GlanceAdapter::with_auth(
            opts,
            Some(keystone_auth(&glance)?),
            staging,
        )?);
        adapter.check().await?;
        cluster
            .add_agent_using("openstack", adapter.clone())
            .await?;
        cluster.wait_connected(1, Duration::from_secs(30)).await?;
        let (files, raw) = image(&cluster.root.join("img"))?;
        let client = cluster.client().await?;
        let v1 = push_wait(&client, "cirros", &files, None).await?;
        check_images(adapter.as_ref(), &v1, &files, &raw).await?;

        let patch = cluster.root.join("patch.bin");
        std::fs::write(&patch, vec![3u8; 3000])?;
        let change = [Change::Write {
            path: "disk.qcow2".into(),
            offset: 5 << 20,
            data_file: patch.clone(),
        }];
        let c = client.adapt(&v1.global_id, &change, 3).await?;
        let v2 = client.watch(&v1.global_id, c.version, |_| {}).await?;
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&raw)?;
            f.write_all_at(&std::fs::read(&patch)?, 5 << 20)?;
        }
        check_images(adapter.as_ref(), &v2, &files, &raw).await?;
        // The old version's images are gone, only after the new one was active.
        let old = v1.sites[0].local_id.clone().unwrap();
        ensure!(!adapter.exists(&old).await?);
        ensure!(v1.sites[0].local_id != v2.sites[0].local_id);
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noauth_glance_takes_raw_disks_and_refusals_are_named() -> Result<()> {
    let glance = Glance::start_noauth()?;
    let dir = tempfile::tempdir()?;
    let adapter = GlanceAdapter::with_auth(
        GlanceOptions {
            url: Some(glance.url()),
            os_cloud: None,
            disk_format: DiskFormat::Raw,
        },
        None,
        dir.path().join("staging"),
    )?;
    adapter.check().await?;
    // Nothing said where Glance is.
    let e = GlanceAdapter::with_auth(
        GlanceOptions {
            url: None,
            os_cloud: None,
            disk_format: DiskFormat::Raw,
        },
        None,
        dir.path().join("s2"),
    )
    .unwrap_err();
    ensure!(e.to_string().contains("OS_AUTH_URL"), "{e}");
    // A Keystone that refuses the password: the agent stops at start, saying so.
    let with_keystone = Glance::start_with_keystone()?;
    let mut auth = keystone_auth(&with_keystone)?;
    if let seedcast_agents::adapters::glance::keystone::Method::Password { password, .. } =
        &mut auth.method
    {
        *password = "wrong".into();
    }
    let bad = GlanceAdapter::with_auth(
        GlanceOptions {
            url: None,
            os_cloud: None,
            disk_format: DiskFormat::Qcow2,
        },
        Some(auth),
        dir.path().join("s3"),
    )?;
    let agent = seedcast_agents::Agent::open(
        seedcast_agents::AgentConfig::new(dir.path().join("agent"), "127.0.0.1:9", "site", None),
        Arc::new(bad),
    )?;
    let e: AgentError = agent.run(std::future::pending()).await.unwrap_err();
    ensure!(e.is_fatal(), "{e}");
    let e = e.to_string();
    ensure!(e.contains("Keystone at") && e.contains("401"), "{e}");
    Ok(())
}

/// A site lists (and so sweeps at start) only its own images in a Glance others may share:
/// each version's image and any file image no version names (a publish cut short), never
/// another site's or an unmarked one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_lists_its_own_glance_images_and_no_one_elses() -> Result<()> {
    let glance = Glance::start_noauth()?;
    let dir = tempfile::tempdir()?;
    let opts = || GlanceOptions {
        url: Some(glance.url()),
        os_cloud: None,
        disk_format: DiskFormat::Qcow2,
    };
    let east = GlanceAdapter::with_auth(opts(), None, dir.path().join("s1"))?.for_site("east");
    let url = glance.url();
    // Images made through Glance's API (left `queued`: no data needed to be listed).
    let create = |props: serde_json::Value| -> Result<String> {
        let out = std::process::Command::new("curl")
            .args([
                "-sf",
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "-d",
            ])
            .arg(props.to_string())
            .arg(format!("{url}/v2/images"))
            .output()?;
        ensure!(out.status.success(), "create: {:?}", out);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["id"].as_str().context("id")?.to_string())
    };
    let mark = |site: &str, file: &str| {
        serde_json::json!({
            "name": format!("img {file}"),
            "seedcast_site": site,
            "seedcast_global_id": "sc-000000000000000000000001",
            "seedcast_version": "1",
            "seedcast_file": file,
        })
    };
    let file = create(mark("east", "vmlinuz"))?;
    let mut main = mark("east", "disk.raw");
    main["seedcast_files"] = serde_json::json!(format!("{{\"vmlinuz\":\"{file}\"}}"));
    let main = create(main)?;
    let orphan = create(mark("east", "initrd"))?;
    let mut foreign = mark("west", "disk.raw");
    foreign["seedcast_files"] = serde_json::json!("{}");
    let foreign = create(foreign)?;
    let unmarked = create(serde_json::json!({"name": "someone else's"}))?;

    let mut listed = east.list().await?.context("a site lists its images")?;
    listed.sort();
    let mut want = vec![main.clone(), orphan.clone()];
    want.sort();
    ensure!(listed == want, "{listed:?} != {want:?}");
    let anonymous = GlanceAdapter::with_auth(opts(), None, dir.path().join("s2"))?;
    ensure!(anonymous.list().await?.is_none(), "no site, no listing");

    // Retiring them (as the sweep does) removes the version with its file image, and the
    // orphan; the other site's and the unmarked image stay.
    east.retire(&orphan).await.free().await;
    east.retire(&main).await.free().await;
    ensure!(east.list().await?.context("list")?.is_empty());
    for (id, left) in [(&file, false), (&foreign, true), (&unmarked, true)] {
        let st = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("{url}/v2/images/{id}"))
            .output()?;
        let code = String::from_utf8_lossy(&st.stdout).into_owned();
        ensure!((code == "200") == left, "{id}: {code}");
    }
    Ok(())
}
