//! A site's pool on a filesystem that fills up (a 6 MiB tmpfs the test mounts): the
//! deployment fails with the system's reason, no partial image is ever visible, the
//! catalog stays sound, and once space is freed the site completes by itself.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use common::procs::{TestEngine, run};
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

/// `push --json DISK` to `engine`, retried while the engine is not answering yet.
fn push(engine: &TestEngine, disk: &Path) -> Result<std::process::Output> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = run(
            &["push", "--name", "full", "--json", disk.to_str().unwrap()],
            &engine.env(),
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !err.contains("cannot reach") || std::time::Instant::now() > deadline {
            return Ok(out);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `mib` MiB that do not compress, in a file.
fn incompressible(at: &Path, mib: usize, seed: &str) -> Result<()> {
    let mut bytes = vec![0u8; mib << 20];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut bytes);
    Ok(std::fs::write(at, &bytes)?)
}

#[test]
fn a_full_engine_store_refuses_the_push_and_takes_it_once_space_is_freed() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // The engine's whole data directory on a 24 MiB filesystem; 32 MiB pushed into it.
    let fs = SmallFs::mount(&tmp.path().join("engine"), "24m")?;
    let disk = tmp.path().join("disk.raw");
    incompressible(&disk, 32, "full store")?;
    let engine = TestEngine::start(tmp.path(), &[])?;
    let out = push(&engine, &disk)?;
    ensure!(!out.status.success(), "a push into a full store succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("No space left on device") && err.contains("pack"),
        "{err}"
    );
    // Space is freed; the same engine (no restart) takes the push, and only what it had
    // not stored is uploaded.
    fs.grow("128m")?;
    let out = push(&engine, &disk)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let uploaded = v["bytes_uploaded"].as_u64().unwrap_or(u64::MAX);
    ensure!(uploaded < 24 << 20, "uploaded {uploaded} bytes again");
    drop(engine);
    drop(fs);
    Ok(())
}

/// The engine's catalog alone on a filesystem that fills (its packs elsewhere): RocksDB
/// refuses the write-ahead-log append and would refuse every write after it until
/// reopened; the engine reopens it by itself, so once space is freed the same process
/// takes the push, and its data checks clean.
#[test]
fn a_full_catalog_refuses_the_push_and_the_same_engine_takes_it_once_space_is_freed() -> Result<()>
{
    let tmp = tempfile::tempdir()?;
    let fs = SmallFs::mount(&tmp.path().join("engine").join("catalog"), "16m")?;
    let disk = tmp.path().join("disk.raw");
    incompressible(&disk, 32, "full catalog")?;
    let engine = TestEngine::start(tmp.path(), &[])?;
    // The engine is up; then its catalog's filesystem is filled to its last 16 KiB. RocksDB
    // may still be writing its start-up files between `df` and `fallocate` (a CI run saw
    // the space shrink in between), so a fill that does not fit is measured and tried again.
    let filler = fs.0.join("filler");
    let mut tries = 0;
    loop {
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "avail=$(df -k --output=avail {0} | tail -1); fallocate -l $(( (avail - 16) * 1024 )) {1}",
                fs.0.display(),
                filler.display()
            ))
            .status()?;
        if st.success() {
            break;
        }
        let _ = std::fs::remove_file(&filler);
        tries += 1;
        ensure!(tries < 50, "fill the catalog's filesystem");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = push(&engine, &disk)?;
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
        let out = push(&engine, &disk)?;
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
    let out = run(
        &[
            "check",
            "--read-data",
            "--data",
            engine.data.to_str().unwrap(),
        ],
        &[],
    )?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(engine);
    drop(fs);
    Ok(())
}
