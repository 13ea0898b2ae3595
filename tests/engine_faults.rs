//! Faults in the engine's own store: a damaged pack entry fails the placements that need
//! it, with a clear error, and nothing else — the site's session and its other images go
//! on (it used to end the session, the agent reconnected every ~100 ms and every image
//! queued behind it waited for ever).

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{SITES, make_image, with_cluster};
use seedcast::client::PushOptions;
use seedcast_core::protocol::PlacementState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_fails_its_placement_and_the_site_goes_on() -> Result<()> {
    with_cluster(&SITES[..1], async |cluster| {
        let site = SITES[0];
        // Image A waits for the site (its agent is away) while its first chunk is damaged
        // in the engine's pack.
        cluster.stop_agent(site).await;
        let client = cluster.client().await?;
        let a_files = make_image(&cluster.root.join("a"), 2, "damaged")?;
        let a = client.push(&PushOptions::new("a", a_files), |_| {}).await?;
        client.close().await;
        cluster.stop_engine().await?;
        let packs = cluster.engine_dir().join("packs");
        let pack = std::fs::read_dir(&packs)?
            .next()
            .context("no pack file")??
            .path();
        let mut f = std::fs::OpenOptions::new().write(true).open(&pack)?;
        // The first entry's header (after the 8-byte pack magic): it no longer names its chunk.
        f.seek(SeekFrom::Start(8))?;
        f.write_all(b"XXXX")?;
        f.sync_all()?;
        drop(f);
        cluster.restart_engine().await?;

        // Image B, pushed after; then the site comes back.
        let client = cluster.client().await?;
        let b_files = make_image(&cluster.root.join("b"), 2, "healthy")?;
        let b = client
            .push(&PushOptions::new("b", b_files.clone()), |_| {})
            .await?;
        cluster.resume_agent(site);

        // B is published; A fails with the store's reason; the agent never left.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let sa = client.status(&a.global_id).await?;
            let sb = client.status(&b.global_id).await?;
            let (pa, pb) = (&sa.sites[0], &sb.sites[0]);
            if pa.state == PlacementState::Failed && pb.state == PlacementState::Published {
                let why = pa.error.clone().unwrap_or_default();
                ensure!(why.contains("engine store"), "{why}");
                ensure!(why.contains("pack"), "{why}");
                break;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "A {:?} ({:?}), B {:?}",
                pa.state,
                pa.error,
                pb.state
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(cluster.agent(site).is_running(), "the agent stopped");
        let sites = client.sites().await?;
        ensure!(sites[0].connected, "the site's session ended");
        common::assert_copies(cluster, &client.status(&b.global_id).await?, &b_files).await?;
        client.close().await;
        Ok(())
    })
    .await
}
