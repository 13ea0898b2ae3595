//! An S3-compatible object store as a site: OpenStack Swift with `s3api` started on
//! 127.0.0.1 from Debian's packages, a real agent storing images in a bucket, and what it
//! holds read back with the AWS CLI (a standard S3 client).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{push_wait, with_cluster};
use seedcast::client::Change;
use seedcast::cluster::file_hash;
use seedcast::services::swift::Swift;
use seedcast::synth;
use seedcast_agents::adapters::S3Options;
use seedcast_agents::adapters::s3::{Credentials, S3Adapter};
use seedcast_agents::{Adapter, AdapterError};
use seedcast_core::protocol::{ImageStatus, PlacementState};
use serde_json::Value;

fn adapter(swift: &Swift, bucket: &str, staging: &Path) -> Result<S3Adapter> {
    let (key, secret) = swift.credentials();
    Ok(S3Adapter::with_credentials(
        S3Options {
            endpoint: swift.endpoint(),
            bucket: bucket.into(),
            prefix: Some("images".into()),
        },
        Some(Credentials {
            access_key_id: key.into(),
            secret_access_key: secret.into(),
        }),
        staging.to_path_buf(),
    )?)
}

/// An image: a raw disk large enough for a multipart upload, a kernel, metadata.
fn image(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    synth::write_disk(&dir.join("disk.raw"), 48 << 20, "s3")?;
    synth::write_blob(&dir.join("vmlinuz"), 2 << 20, "s3 kernel", 0.4)?;
    std::fs::write(dir.join("metadata.json"), b"{\"os\": \"s3\"}\n")?;
    Ok(["disk.raw", "vmlinuz", "metadata.json"]
        .iter()
        .map(|f| dir.join(f))
        .collect())
}

/// What the bucket holds for `s`, read with the AWS CLI, is `files` byte for byte.
fn check_bucket(swift: &Swift, s: &ImageStatus, files: &[PathBuf], out: &Path) -> Result<()> {
    let p = &s.sites[0];
    ensure!(p.state == PlacementState::Published, "{p:?}");
    let prefix = p.local_id.clone().context("no local id")?;
    ensure!(
        prefix == format!("images/{}/v{}", s.global_id, s.version),
        "{prefix}"
    );
    let listed: Value = serde_json::from_str(&swift.aws(&[
        "s3api",
        "list-objects-v2",
        "--bucket",
        "vms",
        "--prefix",
        &prefix,
    ])?)?;
    let keys: Vec<&str> = listed["Contents"]
        .as_array()
        .context("no objects")?
        .iter()
        .map(|o| o["Key"].as_str().unwrap())
        .collect();
    ensure!(keys.len() == files.len() + 1, "{keys:?}");
    ensure!(keys.iter().all(|k| k.starts_with(&prefix)), "{keys:?}");
    std::fs::create_dir_all(out)?;
    for f in files {
        let name = f.file_name().unwrap().to_str().unwrap();
        let got = out.join(name);
        swift.aws(&[
            "s3",
            "cp",
            &format!("s3://vms/{prefix}/{name}"),
            got.to_str().unwrap(),
        ])?;
        ensure!(file_hash(&got)? == file_hash(f)?, "{name} differs");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_become_objects_under_a_prefix_per_version() -> Result<()> {
    let swift = Swift::start()?;
    swift.create_bucket("vms")?;
    with_cluster(&[], async |cluster| {
        let a = adapter(&swift, "vms", &cluster.root.join("s3-staging"))?;
        a.check().await?;
        cluster.add_agent_using("objects", Arc::new(a)).await?;
        cluster.wait_connected(1, Duration::from_secs(30)).await?;
        let files = image(&cluster.root.join("img"))?;
        let client = cluster.client().await?;
        let v1 = push_wait(&client, "s3-image", &files, None).await?;
        check_bucket(&swift, &v1, &files, &cluster.root.join("get1"))?;

        let patch = cluster.root.join("patch.bin");
        std::fs::write(&patch, vec![9u8; 5000])?;
        let change = [Change::Write {
            path: "disk.raw".into(),
            offset: 20 << 20,
            data_file: patch.clone(),
        }];
        let c = client.adapt(&v1.global_id, &change, 3).await?;
        let v2 = client.watch(&v1.global_id, c.version, |_| {}).await?;
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&files[0])?;
            f.write_all_at(&std::fs::read(&patch)?, 20 << 20)?;
        }
        check_bucket(&swift, &v2, &files, &cluster.root.join("get2"))?;
        // The old version is gone: not even a key of it is left.
        let agent = cluster.agent("objects");
        let old = v1.sites[0].local_id.clone().unwrap();
        ensure!(!agent.adapter.exists(&old).await?);
        let listed = swift.aws(&[
            "s3api",
            "list-objects-v2",
            "--bucket",
            "vms",
            "--prefix",
            &old,
        ])?;
        ensure!(!listed.contains(&old), "{listed}");
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_or_an_absent_store_is_named() -> Result<()> {
    let swift = Swift::start()?;
    let dir = tempfile::tempdir()?;
    let e = adapter(&swift, "nowhere", dir.path())?
        .check()
        .await
        .unwrap_err();
    ensure!(matches!(e, AdapterError::Service(_)), "{e}");
    let e = e.to_string();
    ensure!(
        e.contains("bucket nowhere") && e.contains(&swift.endpoint()),
        "{e}"
    );
    drop(swift);
    Ok(())
}

/// The store refuses mid-life (its bucket is gone): the placement fails with the store's
/// words in `status`, nothing of the version stays in the store, and the engine tries the
/// site again by itself once the store answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_refuses_is_named_in_status_and_the_site_is_retried() -> Result<()> {
    let swift = Swift::start()?;
    swift.create_bucket("vms")?;
    with_cluster(&[], async |cluster| {
        let a = adapter(&swift, "vms", &cluster.root.join("s3-staging"))?;
        cluster.add_agent_using("objects", Arc::new(a)).await?;
        cluster.wait_connected(1, Duration::from_secs(30)).await?;
        swift.aws(&["s3api", "delete-bucket", "--bucket", "vms"])?;
        let files = image(&cluster.root.join("img"))?;
        let client = cluster.client().await?;
        let c = client
            .push(
                &seedcast::client::PushOptions::new("retry", files.clone()),
                |_| {},
            )
            .await?;
        let s = client.watch(&c.global_id, 1, |_| {}).await?;
        let p = &s.sites[0];
        ensure!(p.state == PlacementState::Failed, "{p:?}");
        let error = p.error.clone().unwrap_or_default();
        ensure!(
            error.contains("S3 store")
                && error.contains("bucket vms")
                && error.contains("NoSuchBucket"),
            "{error}"
        );
        // The store answers again: the engine retries by itself (after 2 s, then 4 s …).
        swift.create_bucket("vms")?;
        let s = cluster
            .wait_published(
                &client,
                &c.global_id,
                1,
                &["objects"],
                Duration::from_secs(60),
            )
            .await?;
        check_bucket(&swift, &s, &files, &cluster.root.join("get"))?;
        client.close().await;
        Ok(())
    })
    .await
}
