//! Adaptation blocks end to end: a real engine and three real agents on 127.0.0.1 update an
//! image by its global id, sending only what changed.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, ensure};
use common::{SITES, assert_copies, make_image, push_wait, wait_published, with_cluster};
use seedcast::client::{AdaptOptions, Change, Client, ErrorClass};
use seedcast::cluster::LocalCluster;
use seedcast::synth;
use seedcast_core::GlobalId;
use seedcast_core::protocol::{ImageStatus, PlacementState};

async fn adapt_wait(client: &Client, g: &GlobalId, changes: &[Change]) -> Result<ImageStatus> {
    let committed = client.adapt(g, changes, 3).await?;
    Ok(client
        .watch(&committed.global_id, committed.version, |_| {})
        .await?)
}

/// The same change made locally: copy `files` into `dir` and apply `f` there.
fn local_copy(files: &[PathBuf], dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for f in files {
        let d = dir.join(f.file_name().unwrap());
        std::fs::copy(f, &d)?;
        out.push(d);
    }
    Ok(out)
}

fn write_at(path: &Path, offset: u64, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all_at(data, offset)?;
    Ok(())
}

fn noise(seed: &str, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    synth::Stream::new(seed).fill(&mut v);
    v
}

/// Every site holds exactly `files` (no more: removed files are gone).
async fn assert_exactly(cluster: &LocalCluster, s: &ImageStatus, files: &[PathBuf]) -> Result<()> {
    assert_copies(cluster, s, files).await?;
    for p in &s.sites {
        let dir = cluster.published_dir(&p.site, p.local_id.as_deref().unwrap());
        let mut names: Vec<String> = std::fs::read_dir(&dir)?
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        let mut want: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        want.sort();
        ensure!(
            names == want,
            "{} holds {names:?}, expected {want:?}",
            p.site
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_block_reaches_every_site_as_made_locally() -> Result<()> {
    with_cluster(&SITES, async |cluster| {
        let files = make_image(&cluster.root.join("v1"), 16, "kinds")?;
        let client = cluster.client().await?;
        let v1 = push_wait(&client, "kinds", &files, None).await?;
        let g = v1.global_id;
        let work = cluster.root.join("work");
        std::fs::create_dir_all(&work)?;

        // --write: 4 KiB in the middle of the disk, and 100 bytes past its end (it grows).
        let patch = work.join("patch.bin");
        std::fs::write(&patch, noise("patch", 4096))?;
        let tail = work.join("tail.bin");
        std::fs::write(&tail, noise("tail", 100))?;
        let disk_len = std::fs::metadata(&files[0])?.len();
        let s = adapt_wait(
            &client,
            &g,
            &[
                Change::Write {
                    path: "disk.raw".into(),
                    offset: 5 << 20,
                    data_file: patch.clone(),
                },
                Change::Write {
                    path: "disk.raw".into(),
                    offset: disk_len - 50,
                    data_file: tail.clone(),
                },
            ],
        )
        .await?;
        assert_eq!(s.version, 2);
        let local = local_copy(&files, &work.join("local2"))?;
        write_at(&local[0], 5 << 20, &std::fs::read(&patch)?)?;
        write_at(&local[0], disk_len - 50, &std::fs::read(&tail)?)?;
        assert_exactly(cluster, &s, &local).await?;

        // --file: a new kernel; --add: a new file; --remove: metadata — one block, one version.
        let kernel = work.join("vmlinuz-new");
        let mut k = std::fs::read(&files[1])?;
        k[1000..3000].copy_from_slice(&noise("kernel patch", 2000));
        k.extend(noise("kernel grows", 10_000));
        std::fs::write(&kernel, &k)?;
        let notes = work.join("notes.txt");
        std::fs::write(&notes, b"hello from version 3\n")?;
        let s = adapt_wait(
            &client,
            &g,
            &[
                Change::Replace {
                    path: "vmlinuz".into(),
                    file: kernel.clone(),
                },
                Change::Add {
                    path: "notes.txt".into(),
                    file: notes.clone(),
                },
                Change::Remove {
                    path: "metadata.json".into(),
                },
            ],
        )
        .await?;
        assert_eq!(s.version, 3);
        let dir3 = work.join("local3");
        std::fs::create_dir_all(&dir3)?;
        std::fs::copy(&local[0], dir3.join("disk.raw"))?;
        std::fs::copy(&kernel, dir3.join("vmlinuz"))?;
        std::fs::copy(&notes, dir3.join("notes.txt"))?;
        let expect3 = vec![
            dir3.join("disk.raw"),
            dir3.join("vmlinuz"),
            dir3.join("notes.txt"),
        ];
        assert_exactly(cluster, &s, &expect3).await?;
        // The kernel's change travels as a small delta, not the whole kernel.
        for p in &s.sites {
            assert!(p.bytes_sent < 40_000, "{p:?}");
        }

        // One global id throughout, and the history says what happened.
        let h = client.history(&g).await?;
        assert_eq!(h.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(h[1].parent, Some(1));
        assert_eq!(h[2].parent, Some(2));
        assert!(
            h[1].change.contains("write disk.raw@5242880"),
            "{}",
            h[1].change
        );
        assert!(
            h[2].change.contains("replace vmlinuz")
                && h[2].change.contains("add notes.txt")
                && h[2].change.contains("remove metadata.json"),
            "{}",
            h[2].change
        );
        assert_eq!(h[2].files, ["disk.raw", "vmlinuz", "notes.txt"]);
        // Each site's old versions are gone from its pool: it never shows a mix.
        for p in &s.sites {
            let pool = &cluster.agent(&p.site).pool;
            let images = std::fs::read_dir(pool)?
                .filter(|e| {
                    !e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with('.')
                })
                .count();
            assert_eq!(images, 1, "{} keeps {images} images", p.site);
        }
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_block_write_moves_far_less_than_a_chunk() -> Result<()> {
    with_cluster(&SITES, async |cluster| {
        let files = make_image(&cluster.root.join("v1"), 16, "small write")?;
        let client = cluster.client().await?;
        let v1 = push_wait(&client, "small", &files, None).await?;
        let patch = cluster.root.join("patch.bin");
        std::fs::write(&patch, noise("one block", 4096))?;
        // A data region of the disk (the synthetic disk's first 4 MiB hold data and holes).
        let disk = std::fs::read(&files[0])?;
        let offset = (0..disk.len() / 4096)
            .map(|b| b * 4096)
            .find(|&o| o > (1 << 20) && disk[o..o + 4096].iter().any(|&x| x != 0))
            .unwrap() as u64;
        let s = adapt_wait(
            &client,
            &v1.global_id,
            &[Change::Write {
                path: "disk.raw".into(),
                offset,
                data_file: patch,
            }],
        )
        .await?;
        for p in &s.sites {
            assert_eq!(p.state, PlacementState::Published);
            // 4 KiB of random bytes cannot shrink: the payload is that plus a few bytes of delta.
            assert!(p.bytes_sent < 6 * 1024, "payload {p:?}");
            // Everything on the wire (manifest, control, frames, acks, UDP/IP headers) stays
            // far below one 64 KiB chunk.
            assert!(
                p.wire_bytes > p.bytes_sent && p.wire_bytes < 40 * 1024,
                "wire {p:?}"
            );
        }
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_site_catches_up_when_it_reconnects() -> Result<()> {
    with_cluster(&SITES, async |cluster| {
        let files = make_image(&cluster.root.join("v1"), 8, "offline adapt")?;
        let client = cluster.client().await?;
        let v1 = push_wait(&client, "offline", &files, None).await?;
        cluster.stop_agent("site-c").await;
        let patch = cluster.root.join("patch.bin");
        std::fs::write(&patch, noise("offline patch", 10_000))?;
        let change = [Change::Write {
            path: "disk.raw".into(),
            offset: 3 << 20,
            data_file: patch.clone(),
        }];
        let committed = client.adapt(&v1.global_id, &change, 3).await?;
        let s = wait_published(cluster, &client, &v1.global_id, 2, &["site-a", "site-b"]).await?;
        // site-c still serves version 1 and waits for version 2.
        let c = s.sites.iter().find(|p| p.site == "site-c").unwrap();
        assert_eq!((c.version, c.state), (2, PlacementState::Pending));
        assert_eq!(c.local_id, v1.sites[2].local_id);
        cluster.resume_agent("site-c");
        let s = client
            .watch(&v1.global_id, committed.version, |_| {})
            .await?;
        let local = local_copy(&files, &cluster.root.join("local"))?;
        write_at(&local[0], 3 << 20, &std::fs::read(&patch)?)?;
        assert_exactly(cluster, &s, &local).await?;
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_moves_nothing_and_a_wiped_cache_reuses_the_published_image() -> Result<()> {
    with_cluster(&SITES, async |cluster| {
        let files = make_image(&cluster.root.join("v1"), 16, "rollback")?;
        let client = cluster.client().await?;
        let v1 = push_wait(&client, "rollback", &files, None).await?;
        let g = v1.global_id;
        let patch = cluster.root.join("patch.bin");
        std::fs::write(&patch, noise("rollback patch", 64 * 1024))?;
        let v2 = adapt_wait(
            &client,
            &g,
            &[Change::Write {
                path: "disk.raw".into(),
                offset: 2 << 20,
                data_file: patch,
            }],
        )
        .await?;
        assert!(v2.sites.iter().all(|p| p.bytes_sent > 0));

        let committed = client.rollback(&g, 1).await?;
        assert_eq!(committed.version, 3);
        let v3 = client.watch(&g, 3, |_| {}).await?;
        for p in &v3.sites {
            assert_eq!(p.state, PlacementState::Published);
            assert_eq!(p.bytes_sent, 0, "rollback moved chunk bytes: {p:?}");
        }
        assert_exactly(cluster, &v3, &files).await?;
        assert!(
            client.history(&g).await?[2]
                .change
                .contains("rollback to version 1")
        );

        // Wipe site-c's chunk cache: it still reuses the image it has published (version 3 =
        // version 1), so rolling forward to version 2's content moves only the change.
        cluster.stop_agent("site-c").await;
        let dropped = cluster.agent("site-c").agent.db().clear_chunks()?;
        assert!(dropped > 0);
        cluster.resume_agent("site-c");
        cluster.wait_connected(3, Duration::from_secs(30)).await?;
        let committed = client.rollback(&g, 2).await?;
        let v4 = client.watch(&g, committed.version, |_| {}).await?;
        let c = v4.sites.iter().find(|p| p.site == "site-c").unwrap();
        let a = v4.sites.iter().find(|p| p.site == "site-a").unwrap();
        assert_eq!(
            a.bytes_sent, 0,
            "site-a still holds version 2's chunks: {a:?}"
        );
        // site-c lost the changed chunk with its cache: only that travels, not the image.
        assert!(c.bytes_sent > 0 && c.bytes_sent < 200 * 1024, "{c:?}");
        assert!(
            c.bytes_sent * 20 < v1.sites[2].bytes_sent,
            "{c:?} vs {:?}",
            v1.sites[2]
        );
        let local = local_copy(&files, &cluster.root.join("local4"))?;
        write_at(&local[0], 2 << 20, &noise("rollback patch", 64 * 1024))?;
        assert_exactly(cluster, &v4, &local).await?;
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_blocks_get_clear_errors_and_change_nothing() -> Result<()> {
    with_cluster(&SITES[..1], async |cluster| {
        let files = make_image(&cluster.root.join("v1"), 4, "bad")?;
        let client = cluster.client().await?;
        let v1 = push_wait(&client, "bad", &files, None).await?;
        let g = v1.global_id;
        let data = cluster.root.join("data.bin");
        std::fs::write(&data, b"xyz")?;
        let empty = cluster.root.join("empty.bin");
        std::fs::write(&empty, b"")?;
        let len = std::fs::metadata(&files[0])?.len();
        let w = |path: &str, offset: u64, f: &Path| Change::Write {
            path: path.into(),
            offset,
            data_file: f.to_path_buf(),
        };
        let cases: Vec<(GlobalId, Vec<Change>, &str)> = vec![
            (
                "sc-000000000000000000000000".parse()?,
                vec![w("disk.raw", 0, &data)],
                "unknown global id",
            ),
            (g, vec![w("nope.raw", 0, &data)], "no file \"nope.raw\""),
            (g, vec![w("disk.raw", len + 1, &data)], "past the end"),
            (g, vec![w("disk.raw", 0, &empty)], "empty write"),
            (
                g,
                vec![Change::Remove {
                    path: "nope".into(),
                }],
                "no file \"nope\"",
            ),
            (
                g,
                vec![Change::Replace {
                    path: "nope".into(),
                    file: data.clone(),
                }],
                "no file \"nope\"",
            ),
            (
                g,
                vec![Change::Add {
                    path: "vmlinuz".into(),
                    file: data.clone(),
                }],
                "already has",
            ),
            (
                g,
                vec![Change::Replace {
                    path: "disk.raw".into(),
                    file: cluster.root.join("missing"),
                }],
                "missing",
            ),
            (
                g,
                vec![
                    Change::Remove {
                        path: "disk.raw".into(),
                    },
                    Change::Remove {
                        path: "vmlinuz".into(),
                    },
                    Change::Remove {
                        path: "metadata.json".into(),
                    },
                ],
                "at least one file",
            ),
            // A valid change followed by an invalid one: the whole block is refused.
            (
                g,
                vec![w("disk.raw", 0, &data), w("disk.raw", len + 10, &data)],
                "past the end",
            ),
            (g, vec![], "at least one change"),
        ];
        // What kind of failure each is: the client's own refusal, a local file, or the
        // engine's verdict on the block.
        let class = |want: &str| match want {
            "unknown global id" => ErrorClass::NotFound,
            "empty write" | "at least one change" => ErrorClass::Usage,
            "missing" => ErrorClass::File,
            _ => ErrorClass::Invalid,
        };
        for (gid, changes, want) in cases {
            let e = client.adapt(&gid, &changes, 3).await.unwrap_err();
            assert_eq!(e.kind(), class(want), "{changes:?}: {e}");
            assert!(e.to_string().contains(want), "{changes:?}: {e}");
        }
        let e = client.rollback(&g, 7).await.unwrap_err();
        assert_eq!(e.kind(), ErrorClass::Invalid, "{e}");
        assert!(e.to_string().contains("no version 7"), "{e}");
        let e = client.rollback(&g, 1).await.unwrap_err();
        assert_eq!(e.kind(), ErrorClass::Invalid, "{e}");
        assert!(e.to_string().contains("already the current version"), "{e}");
        let e = client
            .history(&"sc-000000000000000000000000".parse()?)
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");

        // Nothing changed: still version 1, same mapping, same files at the site.
        assert_eq!(client.history(&g).await?.len(), 1);
        let s = client.status(&g).await?;
        assert_eq!(s.version, 1);
        assert_eq!(s.sites, v1.sites);
        assert_exactly(cluster, &s, &files).await?;
        client.close().await;
        Ok(())
    })
    .await
}

/// A site whose service keeps no readable copies (as Glance, a registry or an object store):
/// the agent's chunk cache is its only source of delta bases, and it still gets the update
/// as a small delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_without_readable_copies_updates_from_its_cache() -> Result<()> {
    use seedcast_agents::adapters::memory::MemoryAdapter;
    with_cluster(&SITES[..1], async |cluster| {
        cluster
            .add_agent_using("remote", std::sync::Arc::new(MemoryAdapter::new()?))
            .await?;
        cluster.wait_connected(2, Duration::from_secs(30)).await?;
        let files = make_image(&cluster.root.join("v1"), 8, "no copies")?;
        let client = cluster.client().await?;
        let v1 = push_wait(&client, "remote", &files, None).await?;
        let patch = cluster.root.join("patch.bin");
        std::fs::write(&patch, noise("no copies patch", 8192))?;
        let change = [Change::Write {
            path: "disk.raw".into(),
            offset: 1 << 20,
            data_file: patch.clone(),
        }];
        let v2 = adapt_wait(&client, &v1.global_id, &change).await?;
        let local = local_copy(&files, &cluster.root.join("local"))?;
        write_at(&local[0], 1 << 20, &std::fs::read(&patch)?)?;
        for p in &v2.sites {
            ensure!(p.state == PlacementState::Published, "{p:?}");
            let agent = cluster.agent(&p.site);
            for f in &local {
                let name = f.file_name().unwrap().to_str().unwrap();
                let rb = agent
                    .adapter
                    .read_back(p.local_id.as_deref().unwrap(), name)
                    .await?;
                ensure!(
                    seedcast::cluster::file_hash(rb.path())? == seedcast::cluster::file_hash(f)?,
                    "{name} at {} differs",
                    p.site
                );
            }
        }
        let by = |site: &str| v2.sites.iter().find(|p| p.site == site).unwrap().bytes_sent;
        let first = v1
            .sites
            .iter()
            .find(|p| p.site == "remote")
            .unwrap()
            .bytes_sent;
        // The same delta group (against the same bases) reached both kinds of site: the
        // 8 KiB written and little more, not the changed chunk whole.
        ensure!(
            by("remote") == by("site-a"),
            "{} vs {}",
            by("remote"),
            by("site-a")
        );
        ensure!(by("remote") < 12 << 10, "{} of {first}", by("remote"));
        client.close().await;
        Ok(())
    })
    .await
}

/// The client's leg from a thin link: with the previous version at hand (`--base`), the new
/// chunks travel as deltas against the engine's copies of the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_against_the_base_file_sends_deltas_not_whole_chunks() -> Result<()> {
    with_cluster(&SITES[..1], async |cluster| {
        let work = cluster.root.join("work");
        std::fs::create_dir_all(&work)?;
        // 8 MiB of incompressible data: whole new chunks cost their full size.
        let v1 = work.join("v1").join("disk.raw");
        std::fs::create_dir_all(v1.parent().unwrap())?;
        std::fs::write(&v1, noise("base v1", 8 << 20))?;
        let client = cluster.client().await?;
        let s1 = push_wait(&client, "based", std::slice::from_ref(&v1), None).await?;
        // v2: 40 small edits spread over the disk, each in its own chunk.
        let v2 = work.join("v2").join("disk.raw");
        std::fs::create_dir_all(v2.parent().unwrap())?;
        std::fs::copy(&v1, &v2)?;
        for i in 0..40u64 {
            write_at(&v2, i * (200 << 10) + 777, &noise(&format!("edit {i}"), 64))?;
        }
        let change = Change::Replace {
            path: "disk.raw".into(),
            file: v2.clone(),
        };
        // A qcow2 base is refused by name before anything is uploaded.
        let q = work.join("v1.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-q", "-O", "qcow2"])
            .arg(&v1)
            .arg(&q)
            .status()?;
        ensure!(st.success());
        let opts = |base: &Path| AdaptOptions {
            bases: vec![base.to_path_buf()],
            ..AdaptOptions::default()
        };
        let e = client
            .adapt_with(&s1.global_id, std::slice::from_ref(&change), &opts(&q))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorClass::Usage, "{e}");
        assert!(
            e.to_string().contains("v1.qcow2") && e.to_string().contains("raw"),
            "{e}"
        );

        let c = client
            .adapt_with(&s1.global_id, std::slice::from_ref(&change), &opts(&v1))
            .await?;
        // ~40 changed chunks of ~64 KiB each would be ~2.5 MB whole; as deltas a few KB each.
        assert!(
            c.bytes_uploaded > 0 && c.bytes_uploaded < 200_000,
            "uploaded {} bytes",
            c.bytes_uploaded
        );
        let s = client.watch(&c.global_id, c.version, |_| {}).await?;
        assert_copies(cluster, &s, std::slice::from_ref(&v2)).await?;
        client.close().await;
        Ok(())
    })
    .await
}

/// A client's delta groups are hostile input: each is checked before its payload is read,
/// and a group that does not decode to the chunks it names stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_delta_groups_from_a_client_are_refused_and_store_nothing() -> Result<()> {
    use seedcast_core::ChunkId;
    use seedcast_core::protocol::{DataRecord, GroupHeader, Request, Response};
    with_cluster(&SITES[..1], async |cluster| {
        let work = cluster.root.join("work");
        std::fs::create_dir_all(&work)?;
        let v1 = work.join("disk.raw");
        std::fs::write(&v1, noise("hostile base", 1 << 20))?;
        let client = cluster.client().await?;
        push_wait(&client, "hostile", std::slice::from_ref(&v1), None).await?;
        client.close().await;
        // A base chunk the engine holds: the file's first chunk.
        let data = std::fs::read(&v1)?;
        let cfg = seedcast_core::ChunkerConfig::default();
        let first = seedcast_core::chunker::chunk_all(&data, cfg)?
            .into_iter()
            .next()
            .unwrap();
        let base_raw = &data[..first.len() as usize];
        let base = ChunkId::of(base_raw);
        let mut target = base_raw.to_vec();
        target[100..164].fill(9);
        let target_id = ChunkId::of(&target);
        let good = seedcast_core::delta::encode_group(base_raw, &[&target], 19)?;

        let conn = common::raw_admin(cluster).await?;
        let send_group = async |header: GroupHeader, payload: Vec<u8>| -> Result<Response> {
            let (mut send, mut recv) = conn.open_bi().await?;
            seedcast_net::write_msg(&mut send, &Request::UploadRecords { count: 1 }).await?;
            seedcast_net::write_msg(&mut send, &DataRecord::Group(header)).await?;
            // A refused header stops the engine reading: the payload's write may then fail
            // (now and then, by timing); the engine's answer is what is checked.
            let _ = send.write_all(&payload).await;
            let _ = send.finish();
            Ok(seedcast_net::read_msg_required(&mut recv).await?)
        };
        let header = |chunks: Vec<(ChunkId, u32)>, base: Vec<ChunkId>, n: usize| GroupHeader {
            chunks,
            base,
            payload_len: n as u32,
        };
        let error = |r: Response| match r {
            Response::Error { message, .. } => message,
            r => panic!("expected a refusal, got {r:?}"),
        };
        let len = target.len() as u32;
        // A base the engine does not hold.
        let r = send_group(
            header(
                vec![(target_id, len)],
                vec![ChunkId::of(b"nothing")],
                good.len(),
            ),
            good.clone(),
        )
        .await?;
        assert!(error(r).contains("does not hold"));
        // Decoding to bytes that are not the chunk named.
        let r = send_group(
            header(vec![(ChunkId::of(b"other"), len)], vec![base], good.len()),
            good.clone(),
        )
        .await?;
        assert!(error(r).contains("hash mismatch"));
        // More than a group may decode to, refused before any payload is read.
        let r = send_group(
            header(vec![(target_id, 20 << 20)], vec![base], 10),
            vec![0; 10],
        )
        .await?;
        let m = error(r);
        assert!(m.contains("delta group refused"), "{m}");
        // A payload that is not zstd.
        let r = send_group(header(vec![(target_id, len)], vec![base], 64), vec![7; 64]).await?;
        assert!(error(r).contains("does not decode"));
        // Nothing was stored; the good group then is.
        let client = cluster.client().await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        seedcast_net::write_msg(
            &mut send,
            &Request::Missing {
                chunks: vec![target_id],
            },
        )
        .await?;
        send.finish()?;
        let r: Response = seedcast_net::read_msg_required(&mut recv).await?;
        assert_eq!(
            r,
            Response::Missing {
                chunks: vec![target_id]
            }
        );
        let r = send_group(header(vec![(target_id, len)], vec![base], good.len()), good).await?;
        assert!(matches!(r, Response::Uploaded { stored: 1, .. }), "{r:?}");
        client.close().await;
        Ok(())
    })
    .await
}

/// Urgency: an update committed while a large seed is moving to the same site goes first
/// (the seed is preempted, keeping what the site verified) and is published first; the
/// seed then resumes and completes without starting over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_overtakes_a_seed_in_flight_to_the_same_site() -> Result<()> {
    with_cluster(&SITES[..1], async |cluster| {
        let site = SITES[0];
        let work = cluster.root.join("work");
        let small = make_image(&work.join("small"), 8, "urgent")?;
        let client = cluster.client().await?;
        let a = push_wait(&client, "patched", &small, None).await?;
        // A thin link to the site: 32 Mbit/s, so a 40 MiB seed takes ~10 s.
        client.site_set(site, Some(Some(32_000_000)), None).await?;
        let big = work.join("big").join("bulk.raw");
        std::fs::create_dir_all(big.parent().unwrap())?;
        std::fs::write(&big, noise("bulk seed", 40 << 20))?;
        let b = client
            .push(
                &seedcast::client::PushOptions::new("bulk", vec![big.clone()]),
                |_| {},
            )
            .await?;
        // Wait until a quarter of the seed has moved.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let s = client.status(&b.global_id).await?;
            if s.sites[0].bytes_sent > (10 << 20) {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "seed never moved: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let patch = work.join("patch.bin");
        std::fs::write(&patch, noise("urgent patch", 4096))?;
        let u = client
            .adapt(
                &a.global_id,
                &[Change::Write {
                    path: "disk.raw".into(),
                    offset: 1 << 20,
                    data_file: patch,
                }],
                3,
            )
            .await?;
        let updated = client.watch(&a.global_id, u.version, |_| {}).await?;
        assert_eq!(updated.sites[0].state, PlacementState::Published);
        // The seed is not done yet: the update went first.
        let seed = client.status(&b.global_id).await?;
        assert_ne!(seed.sites[0].state, PlacementState::Published, "{seed:?}");
        // It resumes and completes, sending only what the site still lacked.
        let seed = client.watch(&b.global_id, 1, |_| {}).await?;
        let p = &seed.sites[0];
        assert_eq!(p.state, PlacementState::Published, "{p:?}");
        assert!(p.error.is_none(), "{p:?}");
        assert!(
            p.bytes_sent < (34 << 20),
            "the resumed seed sent {} of 40 MiB",
            p.bytes_sent
        );
        assert_copies(cluster, &seed, std::slice::from_ref(&big)).await?;
        client.close().await;
        Ok(())
    })
    .await
}
