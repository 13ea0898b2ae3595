//! A site away through a push and an adaptation block catches up when it comes back,
//! with its disk intact (it asks only for what changed) and with it wiped (re-enrolled by
//! the admin, it is sent everything again); the other sites do not wait for it.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::{SITES, assert_copies, make_image, wait_published, with_cluster};
use seedcast::client::{Change, PushOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_site_converges_with_its_disk_intact_or_wiped() -> Result<()> {
    with_cluster(&SITES, async |cluster| {
        let [a, b, c] = SITES;
        let client = cluster.client().await?;
        let files = make_image(&cluster.root.join("img"), 4, "offline")?;
        let v1 = client
            .push(&PushOptions::new("offline", files.clone()), |_| {})
            .await?;
        let g = v1.global_id;
        wait_published(cluster, &client, &g, 1, &SITES).await?;

        // site-c goes away; a block makes version 2; the others publish it without it.
        cluster.stop_agent(c).await;
        let patch = cluster.root.join("patch.bin");
        std::fs::write(&patch, vec![0xab; 300_000])?;
        let change = Change::Write {
            path: "disk.raw".into(),
            offset: 1 << 20,
            data_file: patch,
        };
        let v2 = client.adapt(&g, &[change], 3).await?;
        wait_published(cluster, &client, &g, 2, &[a, b]).await?;
        let mut v2_disk = std::fs::read(&files[0])?;
        v2_disk[1 << 20..(1 << 20) + 300_000].fill(0xab);
        let v2_files = cluster.root.join("v2");
        std::fs::create_dir_all(&v2_files)?;
        std::fs::write(v2_files.join("disk.raw"), &v2_disk)?;
        for f in &files[1..] {
            std::fs::copy(f, v2_files.join(f.file_name().unwrap()))?;
        }
        let expected: Vec<_> = files
            .iter()
            .map(|f| v2_files.join(f.file_name().unwrap()))
            .collect();

        // Back with its disk intact: only the update travels.
        cluster.resume_agent(c);
        let st = wait_published(cluster, &client, &g, 2, &SITES).await?;
        let pc = st.sites.iter().find(|p| p.site == c).unwrap();
        ensure!(
            pc.bytes_sent < 1 << 20,
            "site-c was sent {} bytes for a 300 KB change",
            pc.bytes_sent
        );
        assert_copies(cluster, &st, &expected).await?;

        // site-b's disk is wiped (credentials, cache, pool): the admin resets the site and
        // makes a new token; the new agent is sent the whole image.
        let data = cluster.agent(b).data.clone();
        cluster.remove_agent(b).await;
        std::fs::remove_dir_all(&data)?;
        std::fs::remove_dir_all(cluster.pool_dir(b))?;
        client.site_reset(b).await?;
        cluster.add_agent(b).await?;
        // Until its agent reports an empty inventory the catalog still shows the old
        // placement: wait for a deployment that sends the whole image.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let st = loop {
            let st = client.status(&g).await?;
            let pb = st.sites.iter().find(|p| p.site == b).unwrap();
            if pb.version == 2
                && pb.state == seedcast_core::protocol::PlacementState::Published
                && pb.bytes_sent > 1 << 20
            {
                break st;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "site-b: {:?}, {} bytes sent",
                pb.state,
                pb.bytes_sent
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_copies(cluster, &st, &expected).await?;
        ensure!(v2.version == 2);
        client.close().await;
        Ok(())
    })
    .await
}
