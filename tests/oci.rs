//! An OCI registry as a site: a real `docker-registry` with htpasswd auth started on
//! 127.0.0.1, a real agent pushing to it, and what it holds read back with `skopeo` (a
//! standard client) and qemu's tools.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{push_wait, with_cluster};
use seedcast::client::Change;
use seedcast::cluster::{LocalCluster, file_hash};
use seedcast::services::registry::Registry;
use seedcast::synth;
use seedcast_agents::adapters::{AdapterConfig, OciOptions};
use seedcast_core::protocol::{ImageStatus, PlacementState};
use seedcast_qemu::{ConvertOptions, Format, compare, convert};
use serde_json::Value;

/// An image: a qcow2 disk, a kernel, metadata. Returns the files and the disk's raw view.
fn image(dir: &Path) -> Result<(Vec<PathBuf>, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let raw = dir.join("guest.raw");
    synth::write_disk(&raw, 16 << 20, "oci")?;
    let disk = dir.join("disk.qcow2");
    convert(
        &raw,
        Format::Raw,
        &disk,
        Format::Qcow2,
        &ConvertOptions::default(),
    )?;
    synth::write_blob(&dir.join("vmlinuz"), 2 << 20, "oci kernel", 0.4)?;
    std::fs::write(dir.join("metadata.json"), b"{\"os\": \"oci\"}\n")?;
    Ok((
        vec![disk, dir.join("vmlinuz"), dir.join("metadata.json")],
        raw,
    ))
}

fn oci_site(reg: &Registry) -> Result<AdapterConfig> {
    Ok(AdapterConfig::Oci(OciOptions {
        registry: reg.url(),
        repository: "vms/site".into(),
        auth_file: Some(reg.auth_file()?),
    }))
}

/// `skopeo copy` of `reference` out of the registry into a directory; its manifest.
fn skopeo_copy(reg: &Registry, reference: &str, out: &Path) -> Result<Value> {
    let (user, pass) = reg.credentials.clone().context("registry without auth")?;
    let status = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", "--src-creds"])
        .arg(format!("{user}:{pass}"))
        .arg(format!("docker://{}/vms/site{reference}", reg.host()))
        .arg(format!("dir:{}", out.display()))
        .output()?;
    ensure!(
        status.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    Ok(serde_json::from_slice(&std::fs::read(
        out.join("manifest.json"),
    )?)?)
}

/// The one regular file of a layer tar, with its path and owner.
fn layer_file(blob: &Path, to: &Path) -> Result<(String, u64)> {
    let mut a = tar::Archive::new(std::fs::File::open(blob)?);
    for e in a.entries()? {
        let mut e = e?;
        if e.header().entry_type() == tar::EntryType::Regular {
            let path = e.path()?.to_string_lossy().into_owned();
            let uid = e.header().uid()?;
            std::io::copy(&mut e, &mut std::fs::File::create(to)?)?;
            return Ok((path, uid));
        }
    }
    anyhow::bail!("no file in {}", blob.display())
}

/// Check what the registry holds for `s` against the files and the disk's raw view.
fn check_pulled(
    reg: &Registry,
    s: &ImageStatus,
    files: &[PathBuf],
    raw: &Path,
    out: &Path,
) -> Result<Value> {
    let p = &s.sites[0];
    ensure!(p.state == PlacementState::Published, "{p:?}");
    let digest = p.local_id.clone().context("no local id")?;
    ensure!(digest.starts_with("sha256:"), "{digest}");
    let m = skopeo_copy(reg, &format!("@{digest}"), out)?;
    // The tag names the same manifest.
    let by_tag = skopeo_copy(
        reg,
        &format!(":{}-v{}", s.name, s.version),
        &out.with_extension("tag"),
    )?;
    ensure!(by_tag == m);
    ensure!(m["annotations"]["io.seedcast.global-id"] == s.global_id.to_string());
    ensure!(m["annotations"]["io.seedcast.version"] == s.version.to_string());
    for layer in m["layers"].as_array().context("layers")? {
        let digest = layer["digest"].as_str().unwrap();
        let blob = out.join(digest.trim_start_matches("sha256:"));
        let file = layer["annotations"]["io.seedcast.file"].as_str().unwrap();
        let got = out.join(format!("got-{file}"));
        let (path, uid) = layer_file(&blob, &got)?;
        if file == "disk.qcow2" {
            // A KubeVirt containerDisk: the disk under /disk/, owned by qemu (107).
            ensure!(path == "disk/disk.qcow2" && uid == 107, "{path} {uid}");
            ensure!(
                compare(&got, Format::Qcow2, raw, Format::Raw)?,
                "disk differs"
            );
        } else {
            ensure!(path == format!("boot/{file}"), "{path}");
            let orig = files.iter().find(|f| f.ends_with(file)).unwrap();
            ensure!(file_hash(&got)? == file_hash(orig)?, "{file} differs");
        }
    }
    Ok(m)
}

async fn add_site(cluster: &mut LocalCluster, reg: &Registry) -> Result<()> {
    cluster.add_agent_with("registry", &oci_site(reg)?).await?;
    cluster.wait_connected(1, Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_go_to_a_registry_as_containerdisks_and_unchanged_layers_stay() -> Result<()> {
    let reg = Registry::start(true)?;
    with_cluster(&[], async |cluster| {
        add_site(cluster, &reg).await?;
        let (files, raw) = image(&cluster.root.join("img"))?;
        let client = cluster.client().await?;
        let v1 = push_wait(&client, "debian", &files, None).await?;
        let m1 = check_pulled(&reg, &v1, &files, &raw, &cluster.root.join("pull1"))?;

        // An update of the disk only: the kernel and metadata layers keep their digests.
        let patch = cluster.root.join("patch.bin");
        std::fs::write(&patch, vec![7u8; 4096])?;
        let change = [Change::Write {
            path: "disk.qcow2".into(),
            offset: 3 << 20,
            data_file: patch.clone(),
        }];
        let c = client.adapt(&v1.global_id, &change, 3).await?;
        let v2 = client.watch(&v1.global_id, c.version, |_| {}).await?;
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&raw)?;
            f.write_all_at(&std::fs::read(&patch)?, 3 << 20)?;
        }
        let m2 = check_pulled(&reg, &v2, &files, &raw, &cluster.root.join("pull2"))?;
        let digests = |m: &Value| -> Vec<String> {
            m["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["digest"].as_str().unwrap().to_string())
                .collect()
        };
        let (d1, d2) = (digests(&m1), digests(&m2));
        ensure!(d1[0] != d2[0], "the disk layer changed");
        ensure!(d1[1..] == d2[1..], "kernel and metadata layers unchanged");
        // The old version's manifest is gone, the new one is there.
        let old = v1.sites[0].local_id.clone().unwrap();
        let agent = cluster.agent("registry");
        ensure!(!agent.adapter.exists(&old).await?);
        ensure!(
            agent
                .adapter
                .exists(v2.sites[0].local_id.as_deref().unwrap())
                .await?
        );
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_refuses_the_credentials_stops_the_agent_with_the_reason() -> Result<()> {
    let reg = Registry::start(true)?;
    let dir = tempfile::tempdir()?;
    let wrong = dir.path().join("auth.json");
    std::fs::write(
        &wrong,
        format!(
            r#"{{"auths": {{"{}": {{"auth": "c2VlZGNhc3Q6d3Jvbmc="}}}}}}"#,
            reg.host()
        ),
    )?;
    let cfg = AdapterConfig::Oci(OciOptions {
        registry: reg.url(),
        repository: "vms/site".into(),
        auth_file: Some(wrong),
    });
    let adapter = cfg.build(dir.path(), "registry")?;
    let agent = seedcast_agents::Agent::open(
        seedcast_agents::AgentConfig::new(dir.path().join("agent"), "127.0.0.1:9", "site", None),
        adapter,
    )?;
    let e = agent.run(std::future::pending()).await.unwrap_err();
    ensure!(e.is_fatal(), "{e}");
    let e = e.to_string();
    ensure!(
        e.contains("image service") && e.contains("OCI registry") && e.contains(&reg.url()),
        "{e}"
    );
    // Nothing listening at all.
    let gone = AdapterConfig::Oci(OciOptions {
        registry: format!("http://127.0.0.1:{}", seedcast::services::free_port()?),
        repository: "vms/site".into(),
        auth_file: None,
    })
    .build(dir.path(), "registry")?;
    ensure!(gone.check().await.is_err());
    Ok(())
}
