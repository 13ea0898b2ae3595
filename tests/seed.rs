//! Seeding an image to three sites end to end: a real engine and three real agents on
//! 127.0.0.1, RocksDB on disk, QUIC sockets, dir pools.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Result;
use common::{SITES, assert_copies, make_image, push_wait, wait_published, with_cluster};
use seedcast::client::{ErrorClass, PushOptions};
use seedcast::cluster::LocalCluster;
use seedcast_core::protocol::{ErrorKind, PlacementState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_global_id_three_local_ids_byte_identical() -> Result<()> {
    with_cluster(&SITES, async |cluster| {
        let files = make_image(&cluster.root.join("img"), 24, "one")?;
        let client = cluster.client().await?;
        let s = push_wait(&client, "one", &files, None).await?;

        assert_eq!(s.version, 1);
        assert_eq!(s.sites.len(), 3);
        let locals: HashSet<_> = s
            .sites
            .iter()
            .map(|p| p.local_id.clone().unwrap())
            .collect();
        assert_eq!(locals.len(), 3, "three distinct local ids");
        assert!(
            !locals.contains(&s.global_id.to_string()),
            "local ids are the service's own"
        );
        assert!(s.bytes_uploaded > 0);
        // Holes are neither uploaded nor sent: far less than the logical size moves.
        for p in &s.sites {
            assert!(p.bytes_sent > 0 && p.bytes_sent < s.data_len, "{p:?}");
            assert_eq!(p.bytes_sent, p.bytes_needed);
        }
        assert!(s.data_len < s.total_len);
        assert_copies(cluster, &s, &files).await?;

        // Status by id is the same mapping.
        let again = client.status(&s.global_id).await?;
        assert_eq!(again.sites, s.sites);
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_identical_push_moves_no_chunk_bytes_and_similar_image_little() -> Result<()> {
    with_cluster(&SITES, async |cluster| {
        let files = make_image(&cluster.root.join("img"), 24, "twice")?;
        let client = cluster.client().await?;
        let first = push_wait(&client, "twice", &files, None).await?;
        let second = push_wait(&client, "twice", &files, None).await?;
        assert_ne!(first.global_id, second.global_id);
        assert_eq!(second.bytes_uploaded, 0);
        for p in &second.sites {
            assert_eq!(p.state, PlacementState::Published);
            assert_eq!(p.bytes_sent, 0, "{p:?}");
        }
        assert_copies(cluster, &second, &files).await?;

        // A second image sharing most chunks: 4 KiB changed in the middle of the disk.
        let disk = &files[0];
        let mut bytes = std::fs::read(disk)?;
        let mid = bytes.len() / 2;
        bytes[mid..mid + 4096]
            .iter_mut()
            .for_each(|b| *b = b.wrapping_add(1));
        let dir = cluster.root.join("img2");
        std::fs::create_dir_all(&dir)?;
        let disk2 = dir.join("disk.raw");
        std::fs::write(&disk2, &bytes)?;
        let files2 = vec![disk2, files[1].clone(), files[2].clone()];
        let third = push_wait(&client, "similar", &files2, None).await?;
        // At most a few chunks (max 256 KiB each, compressed) are new.
        assert!(
            third.bytes_uploaded < 768 << 10,
            "uploaded {}",
            third.bytes_uploaded
        );
        for p in &third.sites {
            assert!(p.bytes_sent <= third.bytes_uploaded, "{p:?}");
        }
        assert_copies(cluster, &third, &files2).await?;
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_and_mapping_survive_an_engine_restart() -> Result<()> {
    with_cluster(&SITES, async |cluster| {
        let files = make_image(&cluster.root.join("img"), 16, "restart")?;
        let client = cluster.client().await?;
        let before = push_wait(&client, "restart", &files, None).await?;
        client.close().await;

        cluster.restart_engine().await?;
        let client = cluster.client().await?;
        let after = client.status(&before.global_id).await?;
        assert_eq!(after.global_id, before.global_id);
        assert_eq!(after.name, "restart");
        assert_eq!(after.sites, before.sites, "mapping intact after restart");
        let images = client.images().await?;
        assert_eq!(images.len(), 1);
        // Agents reconnect by themselves, and the engine still knows its chunks: nothing moves.
        cluster.wait_connected(3, Duration::from_secs(30)).await?;
        let again = push_wait(&client, "restart-again", &files, None).await?;
        assert_eq!(again.bytes_uploaded, 0);
        assert!(
            again
                .sites
                .iter()
                .all(|p| p.state == PlacementState::Published && p.bytes_sent == 0)
        );
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_site_receives_the_image_when_it_reconnects() -> Result<()> {
    with_cluster(&SITES, async |cluster| {
        let files = make_image(&cluster.root.join("img"), 8, "offline")?;
        cluster.stop_agent("site-c").await;
        let client = cluster.client().await?;
        let committed = client
            .push(&PushOptions::new("offline", files.clone()), |_| {})
            .await?;
        // site-c is known, so it is a target; it waits as pending while the others publish.
        let s = wait_published(
            cluster,
            &client,
            &committed.global_id,
            1,
            &["site-a", "site-b"],
        )
        .await?;
        let c = s.sites.iter().find(|p| p.site == "site-c").unwrap();
        assert_eq!(c.state, PlacementState::Pending);
        cluster.resume_agent("site-c");
        let s = client.watch(&committed.global_id, 1, |_| {}).await?;
        assert_copies(cluster, &s, &files).await?;
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_to_named_sites_and_bad_requests_get_clear_errors() -> Result<()> {
    with_cluster(&SITES, async |cluster| {
        let files = make_image(&cluster.root.join("img"), 4, "named")?;
        let client = cluster.client().await?;
        let s = push_wait(&client, "named", &files, Some(vec!["site-b".into()])).await?;
        assert_eq!(s.sites.len(), 1);
        assert_eq!(s.sites[0].site, "site-b");

        let mut opts = PushOptions::new("x", files.clone());
        opts.sites = Some(vec!["nowhere".into()]);
        let e = client.push(&opts, |_| {}).await.unwrap_err();
        assert!(e.is_not_found() && e.to_string().contains("nowhere"), "{e}");

        let e = client
            .push(&PushOptions::new("x", vec![cluster.root.clone()]), |_| {})
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorClass::Usage);
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = client
            .push(
                &PushOptions::new("x", vec![cluster.root.join("absent")]),
                |_| {},
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorClass::File);
        assert!(e.to_string().contains("absent"), "{e}");
        let e = client
            .push(
                &PushOptions::new("x", vec![files[0].clone(), files[0].clone()]),
                |_| {},
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorClass::Usage);
        assert!(e.to_string().contains("two files are named"), "{e}");

        let unknown = "sc-000000000000000000000000".parse()?;
        let e = client.status(&unknown).await.unwrap_err();
        assert!(e.is_not_found(), "{e}");
        // Nothing of the failed pushes became an image.
        assert_eq!(client.images().await?.len(), 1);
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_naming_chunks_the_engine_lacks_is_refused() -> Result<()> {
    use seedcast_core::chunker::chunk_all;
    use seedcast_core::manifest::RecipeBuilder;
    use seedcast_core::{ChunkerConfig, FileEntry};

    with_cluster(&SITES[..1], async |cluster| {
        // A client that skips the upload: commit directly (through the raw protocol below).
        let mut rb = RecipeBuilder::new();
        for p in chunk_all(&vec![7u8; 300_000], ChunkerConfig::default())? {
            rb.push(p);
        }
        let entry = FileEntry {
            path: "disk.raw".into(),
            mode: 0o644,
            recipe: rb.finish(),
            format: seedcast_core::manifest::FileFormat::Raw,
        };
        let (kind, e) = raw_commit(cluster, entry).await?;
        assert_eq!(kind, ErrorKind::MissingChunks);
        assert!(e.contains("lacks") && e.contains("chunk"), "{e}");
        let client = cluster.client().await?;
        assert!(client.images().await?.is_empty());
        client.close().await;
        Ok(())
    })
    .await
}

async fn raw_commit(
    cluster: &LocalCluster,
    entry: seedcast_core::FileEntry,
) -> Result<(ErrorKind, String)> {
    use seedcast_core::protocol::{CommitRequest, Request, Response};
    // Client::push always uploads first; build the commit by hand instead.
    let conn = common::raw_admin(cluster).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    seedcast_net::write_msg(
        &mut send,
        &Request::Commit(CommitRequest {
            name: "bad".into(),
            files: vec![entry],
            sites: None,
        }),
    )
    .await?;
    send.finish()?;
    let r: Response = seedcast_net::read_msg_required(&mut recv).await?;
    match r {
        Response::Error { kind, message } => Ok((kind, message)),
        other => anyhow::bail!("expected an error, got {other:?}"),
    }
}
