//! A site's pool on a filesystem that fills up (a 6 MiB tmpfs the test mounts): the
//! deployment fails with the system's reason, no partial image is ever visible, the
//! catalog stays sound, and once space is freed the site completes by itself.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use common::{assert_copies, with_cluster};
use seedcast::client::PushOptions;
use seedcast_agents::adapters::{AdapterConfig, DirOptions};
use seedcast_core::protocol::PlacementState;

/// A tmpfs of `size` mounted at a path, unmounted when dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: &Path, size: &str) -> Result<SmallFs> {
        std::fs::create_dir_all(at)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()?;
        ensure!(
            out.status.success(),
            "mount tmpfs (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(SmallFs(at.to_path_buf()))
    }

    fn grow(&self, size: &str) -> Result<()> {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Image directories in the pool (what a user of the pool sees).
fn images(pool: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_dir(pool)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_fails_cleanly_and_completes_once_space_is_freed() -> Result<()> {
    with_cluster(&[], async |cluster| {
        let pool = cluster.root.join("small");
        let fs = SmallFs::mount(&pool, "6m")?;
        let dir = AdapterConfig::Dir(DirOptions { pool: pool.clone() });
        cluster.add_agent_with("tight", &dir).await?;

        // 12 MiB that does not compress or sparsify: twice what the pool holds.
        let img = cluster.root.join("img");
        std::fs::create_dir_all(&img)?;
        let mut bytes = vec![0u8; 12 << 20];
        blake3::Hasher::new()
            .update(b"full")
            .finalize_xof()
            .fill(&mut bytes);
        let disk = img.join("disk.raw");
        std::fs::write(&disk, &bytes)?;
        let client = cluster.client().await?;
        let pushed = client
            .push(&PushOptions::new("full", vec![disk.clone()]), |_| {})
            .await?;
        let g = pushed.global_id;

        // It fails with the system's reason, and nothing half-made is visible.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let st = client.status(&g).await?;
            let p = &st.sites[0];
            ensure!(images(&pool)?.is_empty(), "a partial image is visible");
            if p.state == PlacementState::Failed {
                let why = p.error.clone().unwrap_or_default();
                ensure!(why.contains("No space left"), "{why}");
                break;
            }
            ensure!(tokio::time::Instant::now() < deadline, "{:?}", p.state);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The catalog is sound: the image and the site are as they were.
        ensure!(client.sites().await?.len() == 1);
        ensure!(client.history(&g).await?.len() == 1);

        // Space is freed: the next try (the engine retries with backoff) completes.
        fs.grow("64m")?;
        let st = cluster
            .wait_published(&client, &g, 1, &["tight"], Duration::from_secs(60))
            .await?;
        assert_copies(cluster, &st, &[disk]).await?;
        ensure!(images(&pool)?.len() == 1);
        client.close().await;
        drop(fs);
        Ok(())
    })
    .await
}

#[test]
fn a_full_engine_store_refuses_the_push_and_takes_it_once_space_is_freed() -> Result<()> {
    const BIN: &str = env!("CARGO_BIN_EXE_seedcast");
    let tmp = tempfile::tempdir()?;
    let fs = SmallFs::mount(&tmp.path().join("engine"), "24m")?;
    let data = fs.0.join("data");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut engine = Command::new(BIN)
        .args([
            "engine",
            "--data",
            data.to_str().unwrap(),
            "--listen",
            &addr,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let token = data.join("admin.token");
    let push = |disk: &Path| -> Result<std::process::Output> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(BIN)
                .args(["push", "--name", "full", "--json"])
                .arg(disk)
                .env("SEEDCAST_ENGINE", &addr)
                .env("SEEDCAST_TOKEN", &token)
                .output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            if !(err.contains("cannot reach") || err.contains("No such file"))
                || std::time::Instant::now() > deadline
            {
                return Ok(out);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // 32 MiB that does not compress, into a 24 MiB store.
    let disk = tmp.path().join("disk.raw");
    let mut bytes = vec![0u8; 32 << 20];
    blake3::Hasher::new()
        .update(b"full store")
        .finalize_xof()
        .fill(&mut bytes);
    std::fs::write(&disk, &bytes)?;
    let out = push(&disk)?;
    let r = (|| {
        ensure!(!out.status.success(), "a push into a full store succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            err.contains("No space left on device") && err.contains("pack"),
            "{err}"
        );
        // Space is freed; the same engine (no restart) takes the push, and only what it
        // had not stored is uploaded.
        fs.grow("128m")?;
        let out = push(&disk)?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let uploaded = v["bytes_uploaded"].as_u64().unwrap_or(u64::MAX);
        ensure!(uploaded < 24 << 20, "uploaded {uploaded} bytes again");
        Ok(())
    })();
    let _ = engine.kill();
    let _ = engine.wait();
    drop(fs);
    r
}

/// The engine's catalog alone on a filesystem that fills (its packs elsewhere): RocksDB
/// refuses the write-ahead-log append and would refuse every write after it until
/// reopened; the engine reopens it by itself, so once space is freed the same process
/// takes the push, and its data checks clean.
#[test]
fn a_full_catalog_refuses_the_push_and_the_same_engine_takes_it_once_space_is_freed() -> Result<()>
{
    const BIN: &str = env!("CARGO_BIN_EXE_seedcast");
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let fs = SmallFs::mount(&data.join("catalog"), "16m")?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut engine = Command::new(BIN)
        .args([
            "engine",
            "--data",
            data.to_str().unwrap(),
            "--listen",
            &addr,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let token = data.join("admin.token");
    let push = |disk: &Path| -> Result<std::process::Output> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(BIN)
                .args(["push", "--name", "full", "--json"])
                .arg(disk)
                .env("SEEDCAST_ENGINE", &addr)
                .env("SEEDCAST_TOKEN", &token)
                .output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            if !(err.contains("cannot reach") || err.contains("No such file"))
                || std::time::Instant::now() > deadline
            {
                return Ok(out);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let disk = tmp.path().join("disk.raw");
    let mut bytes = vec![0u8; 32 << 20];
    blake3::Hasher::new()
        .update(b"full catalog")
        .finalize_xof()
        .fill(&mut bytes);
    std::fs::write(&disk, &bytes)?;
    let r = (|| {
        // The engine is up (its token written); then its catalog's filesystem is filled.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !token.exists() {
            ensure!(std::time::Instant::now() < deadline, "engine did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let filler = fs.0.join("filler");
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "avail=$(df -k --output=avail {0} | tail -1); fallocate -l $(( (avail - 16) * 1024 )) {1}",
                fs.0.display(),
                filler.display()
            ))
            .status()?;
        ensure!(st.success(), "fill the catalog's filesystem");
        let out = push(&disk)?;
        ensure!(
            !out.status.success(),
            "a push into a full catalog succeeded"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            err.contains("No space left on device") && err.contains("catalog"),
            "{err}"
        );
        // Space is freed: the same engine (not restarted) takes the push.
        std::fs::remove_file(&filler)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let out = push(&disk)?;
            if out.status.success() {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "never recovered: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let out = Command::new(BIN)
            .args(["check", "--read-data", "--data"])
            .arg(&data)
            .output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(())
    })();
    let _ = engine.kill();
    let _ = engine.wait();
    drop(fs);
    r
}
