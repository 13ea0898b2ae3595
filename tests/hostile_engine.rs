//! What an agent accepts from the engine's side of the connection, tried by an impostor
//! holding the engine's TLS keys (see `common::impostor`): forged, replayed and re-keyed
//! manifests (signed manifests, the site's version floor across a restart), and damaged,
//! substituted, oversized and undeclared chunk data (verified before anything is cached,
//! asked for again, published only when whole).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::impostor::{Impostor, Session};
use common::{SITES, make_image, push_wait, with_cluster};
use seedcast::client::Change;
use seedcast::cluster::LocalCluster;
use seedcast_agents::adapters::dir::DirAdapter;
use seedcast_agents::cache::AgentDb;
use seedcast_agents::{Agent, AgentConfig, AgentError};
use seedcast_core::protocol::{AgentMsg, ChunkHeader, DataRecord, EngineMsg, GroupHeader};
use seedcast_core::{ChunkId, Encoding, Extent, FileEntry, FileRecipe, GlobalId, Manifest};

/// Every file under `dir` with its BLAKE3, sorted: what a site's pool shows.
fn pool_listing(dir: &Path) -> Result<Vec<(String, String)>> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.is_dir() {
                walk(&p, out)?;
            } else {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    let mut out = Vec::new();
    for f in files {
        let rel = f.strip_prefix(dir)?.display().to_string();
        out.push((rel, seedcast::cluster::file_hash(&f)?.to_hex().to_string()));
    }
    out.sort();
    Ok(out)
}

/// Push a small image to the one site, stop (and forget) its agent; returns the image's
/// global id and the site's data directory.
async fn seeded_site(cluster: &mut LocalCluster) -> Result<(GlobalId, std::path::PathBuf)> {
    let client = cluster.client().await?;
    let files = make_image(&cluster.root.join("img"), 2, "hostile")?;
    let s = push_wait(&client, "hostile", &files, None).await?;
    client.close().await;
    let data = cluster.agent(SITES[0]).data.clone();
    cluster.remove_agent(SITES[0]).await;
    Ok((s.global_id, data))
}

/// The site's agent, restarted on its data and pool, dialling `impostor`.
fn restart_against(
    cluster: &LocalCluster,
    data: &Path,
    impostor: &Impostor,
) -> Result<tokio::task::JoinHandle<Result<(), AgentError>>> {
    let adapter = Arc::new(DirAdapter::new(cluster.pool_dir(SITES[0]))?);
    let mut cfg = AgentConfig::new(data, impostor.addr()?.to_string(), SITES[0], None);
    cfg.reconnect_max = Duration::from_millis(200);
    let agent = Agent::open(cfg, adapter)?;
    Ok(tokio::spawn(agent.run(std::future::pending())))
}

/// `m1`'s next version: the same files and one more, `extra.bin`, made of `chunks`.
fn with_new_file(m1: &Manifest, chunks: &[Vec<u8>]) -> Manifest {
    let extents: Vec<Extent> = chunks
        .iter()
        .map(|c| Extent::Data {
            id: ChunkId::of(c),
            len: c.len() as u32,
        })
        .collect();
    let recipe = FileRecipe {
        len: chunks.iter().map(|c| c.len() as u64).sum(),
        hash: [0; 32],
        extents,
    };
    let recipe = FileRecipe {
        hash: recipe.content_hash(),
        ..recipe
    };
    let mut m2 = m1.clone();
    m2.version = m1.version + 1;
    m2.parent = Some(m1.version);
    m2.files.push(FileEntry {
        path: "extra.bin".into(),
        mode: 0o644,
        recipe,
        format: seedcast_core::manifest::FileFormat::Raw,
    });
    m2
}

/// A data record and the payload sent after it.
type Sent = (DataRecord, Vec<u8>);

/// Read the agent's answers up to its final one for this deployment.
async fn until_final(s: &mut Session) -> Result<Vec<AgentMsg>> {
    let mut out = Vec::new();
    loop {
        let a = s.next().await?;
        let last = matches!(a, AgentMsg::Published { .. } | AgentMsg::Failed { .. });
        out.push(a);
        if last {
            return Ok(out);
        }
    }
}

fn failed_with(a: &AgentMsg, text: &str) -> Result<()> {
    match a {
        AgentMsg::Failed { error, .. } if error.contains(text) => Ok(()),
        other => bail!("expected a failure saying {text:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_and_rekeyed_manifests_are_refused_across_a_restart() -> Result<()> {
    with_cluster(&SITES[..1], async |cluster| {
        let site = SITES[0];
        let client = cluster.client().await?;
        let files = make_image(&cluster.root.join("img"), 2, "signed")?;
        let s = push_wait(&client, "signed", &files, None).await?;
        let g = s.global_id;
        let patch = cluster.root.join("patch.bin");
        std::fs::write(&patch, b"version two")?;
        let write = Change::Write {
            path: "disk.raw".into(),
            offset: 4096,
            data_file: patch,
        };
        let v2 = client.adapt(&g, &[write], 3).await?;
        tokio::time::timeout(
            Duration::from_secs(30),
            client.watch(&g, v2.version, |_| {}),
        )
        .await??;
        client.close().await;

        // The site holds version 2. Stop its agent and take what an attacker would have:
        // the manifests it was sent (and their genuine signatures), the engine's TLS keys.
        let data = cluster.agent(site).data.clone();
        cluster.remove_agent(site).await;
        let (m1, m2): (Manifest, Manifest) = {
            let db = AgentDb::open(&data.join("db"))?;
            (
                db.manifest(&g, 1)?.context("v1 manifest")?,
                db.manifest(&g, 2)?.context("v2 manifest")?,
            )
        };
        let imp = Impostor::new(cluster)?;
        let before = pool_listing(&cluster.pool_dir(site))?;
        let run = restart_against(cluster, &data, &imp)?;

        let mut forged = m2.clone();
        forged.version = 3;
        forged.parent = Some(2);
        let (forged_id, v1_id, v2_id) = (forged.id()?, m1.id()?, m2.id()?);
        let script = vec![
            // 1. A new version signed by a key that is not the engine's.
            EngineMsg::Deploy {
                transfer: 1,
                manifest: forged.clone(),
                signature: imp.own.sign(&forged_id),
            },
            // 2. The same, unsigned, and with a genuine signature of another manifest.
            EngineMsg::Deploy {
                transfer: 2,
                manifest: forged.clone(),
                signature: vec![],
            },
            EngineMsg::Deploy {
                transfer: 3,
                manifest: forged,
                signature: imp.genuine.sign(&v2_id),
            },
            // 3. Version 1, genuinely signed when it was current: a replay (rollback).
            EngineMsg::Deploy {
                transfer: 4,
                manifest: m1,
                signature: imp.genuine.sign(&v1_id),
            },
            // 4. Version 2 again, genuine: harmless, answered as already published.
            EngineMsg::Deploy {
                transfer: 5,
                manifest: m2,
                signature: imp.genuine.sign(&v2_id),
            },
        ];
        let mut session = imp.accept(imp.genuine.public_key()).await?;
        let inv = session.next().await?;
        ensure!(matches!(inv, AgentMsg::Inventory { .. }), "{inv:?}");
        let mut answers = Vec::new();
        for msg in &script {
            session.send(msg).await?;
            answers.extend(until_final(&mut session).await?);
        }
        session.close();
        let finals: Vec<&AgentMsg> = answers
            .iter()
            .filter(|a| matches!(a, AgentMsg::Published { .. } | AgentMsg::Failed { .. }))
            .collect();
        ensure!(finals.len() == 5, "{answers:?}");
        for f in &finals[..3] {
            failed_with(f, "signature does not verify")?;
        }
        failed_with(finals[3], "this site has applied version 2")?;
        ensure!(
            matches!(
                finals[4],
                AgentMsg::Published {
                    bytes_received: 0,
                    ..
                }
            ),
            "{:?}",
            finals[4]
        );
        // No refused deployment asked for a chunk.
        for a in &answers {
            if let AgentMsg::NeedFrom { chunks, .. } = a {
                ensure!(chunks.is_empty(), "asked for chunks: {a:?}");
            }
        }
        ensure!(
            pool_listing(&cluster.pool_dir(site))? == before,
            "pool changed"
        );

        // 5. An engine presenting another signing key: the agent stops, saying so.
        let s2 = imp.accept(imp.own.public_key()).await?;
        let ended = tokio::time::timeout(Duration::from_secs(20), run).await??;
        s2.close();
        match ended {
            Err(e @ AgentError::SigningKeyChanged { .. }) => {
                ensure!(e.is_fatal() && e.to_string().contains("signing key changed"))
            }
            other => bail!("expected SigningKeyChanged, got {other:?}"),
        }

        // The floor is on disk: a fresh open of the database still says version 2.
        let db = AgentDb::open(&data.join("db"))?;
        let floor = db.floor(&g)?.context("floor")?;
        ensure!(
            floor.version == 2 && floor.manifest_id == v2_id,
            "{floor:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_substituted_and_oversized_chunks_are_refused_then_asked_for_again() -> Result<()> {
    with_cluster(&SITES[..1], async |cluster| {
        let (g, data) = seeded_site(cluster).await?;
        let m1 = AgentDb::open(&data.join("db"))?
            .manifest(&g, 1)?
            .context("v1 manifest")?;
        // Version 2 adds one file of one new chunk, genuinely signed: a faulty engine (a
        // damaged store, a bad disk), not a forger.
        let bytes: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let id = ChunkId::of(&bytes);
        let len = bytes.len() as u32;
        let m2 = with_new_file(&m1, std::slice::from_ref(&bytes));
        let imp = Impostor::new(cluster)?;
        let signature = imp.genuine.sign(&m2.id()?);
        let pool = cluster.pool_dir(SITES[0]);
        let before = pool_listing(&pool)?;
        let run = restart_against(cluster, &data, &imp)?;
        let mut session = imp.accept(imp.genuine.public_key()).await?;
        session.next().await?; // inventory

        let raw = |payload: Vec<u8>, raw_len: u32| {
            let h = ChunkHeader {
                id,
                raw_len,
                encoding: Encoding::Raw,
                payload_len: payload.len() as u32,
            };
            (DataRecord::Chunk(h), payload)
        };
        let mut flipped = bytes.clone();
        flipped[12_345] ^= 0x40;
        let other: Vec<u8> = vec![0x5a; bytes.len()];
        // A zstd frame that inflates to 16× the declared length.
        let bomb = seedcast_core::delta::encode(&[], &vec![0u8; bytes.len() * 16], 3)?;
        let bomb = (
            DataRecord::Chunk(ChunkHeader {
                id,
                raw_len: len,
                encoding: Encoding::Zstd,
                payload_len: bomb.len() as u32,
            }),
            bomb,
        );
        // A delta group decoding to more than it declares.
        let group_bomb = seedcast_core::delta::encode(&[], &vec![1u8; bytes.len() * 4], 3)?;
        let group_bomb = (
            DataRecord::Group(GroupHeader {
                chunks: vec![(id, len)],
                base: vec![],
                payload_len: group_bomb.len() as u32,
            }),
            group_bomb,
        );
        let attempts: Vec<(&str, Sent, &str)> = vec![
            ("one bit flipped", raw(flipped, len), "hash"),
            ("another chunk's bytes", raw(other, len), "hash"),
            ("a zstd bomb", bomb, "does not decode"),
            ("a delta group bomb", group_bomb, "delta"),
            (
                "a length other than the manifest's",
                raw(bytes[..1000].to_vec(), 1000),
                "the manifest says",
            ),
        ];
        let mut results = Vec::new();
        for (transfer, (what, record, says)) in (1u64..).zip(attempts) {
            session
                .send(&EngineMsg::Deploy {
                    transfer,
                    manifest: m2.clone(),
                    signature: signature.clone(),
                })
                .await?;
            // The chunk is asked for each time: nothing bad was kept.
            match session.next().await? {
                AgentMsg::NeedFrom { chunks, .. } if chunks == [id] => {}
                a => bail!("{what}: expected a need for the new chunk, got {a:?}"),
            }
            session.data(transfer, vec![record]).await?;
            let last = until_final(&mut session).await?;
            let r = failed_with(last.last().context("no answer")?, says);
            results.push((what, r.map_err(|e| anyhow::anyhow!("{what}: {e}"))));
        }
        ensure!(
            pool_listing(&pool)? == before,
            "pool changed by refused data"
        );

        // The genuine bytes: asked for once more, verified, published.
        session
            .send(&EngineMsg::Deploy {
                transfer: 99,
                manifest: m2.clone(),
                signature,
            })
            .await?;
        match session.next().await? {
            AgentMsg::NeedFrom { chunks, .. } if chunks == [id] => {}
            a => bail!("expected a need for the new chunk, got {a:?}"),
        }
        session.data(99, vec![raw(bytes.clone(), len)]).await?;
        let last = until_final(&mut session).await?;
        let Some(AgentMsg::Published { local_id, .. }) = last.last() else {
            bail!("not published: {last:?}");
        };
        let extra = pool.join(local_id).join("extra.bin");
        ensure!(std::fs::read(&extra)? == bytes, "published bytes differ");
        session.close();
        run.abort();

        let failed: Vec<String> = results
            .iter()
            .filter_map(|(_, r)| r.as_ref().err().map(|e| format!("{e:#}")))
            .collect();
        println!(
            "damaged chunk data: {}/{} refused, re-requested, never cached",
            results.len() - failed.len(),
            results.len()
        );
        ensure!(failed.is_empty(), "{}", failed.join("\n"));
        Ok(())
    })
    .await
}

/// A delta group whose stream ends part-way (a link that dropped for longer than QUIC
/// waits): the chunks decoded before the cut are verified and kept, and after the agent
/// reconnects it asks only for the chunks after the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_group_cut_mid_stream_keeps_the_chunks_before_the_cut() -> Result<()> {
    with_cluster(&SITES[..1], async |cluster| {
        let (g, data) = seeded_site(cluster).await?;
        let m1 = AgentDb::open(&data.join("db"))?
            .manifest(&g, 1)?
            .context("v1 manifest")?;
        // Eight new chunks of incompressible bytes: the group's payload is about as long as
        // its chunks, so a cut three quarters in falls after some and before others.
        let chunks: Vec<Vec<u8>> = (0..8u8)
            .map(|i| {
                let mut c = vec![0u8; 50_000];
                blake3::Hasher::new()
                    .update(&[i])
                    .finalize_xof()
                    .fill(&mut c);
                c
            })
            .collect();
        let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
        let m2 = with_new_file(&m1, &chunks);
        let refs: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
        let payload = seedcast_core::delta::encode_group(&[], &refs, 3)?;
        let group = |ids: &[ChunkId], payload: &[u8]| {
            DataRecord::Group(GroupHeader {
                chunks: ids.iter().map(|id| (*id, 50_000)).collect(),
                base: vec![],
                payload_len: payload.len() as u32,
            })
        };
        let imp = Impostor::new(cluster)?;
        let signature = imp.genuine.sign(&m2.id()?);
        let run = restart_against(cluster, &data, &imp)?;
        let deploy = |transfer| EngineMsg::Deploy {
            transfer,
            manifest: m2.clone(),
            signature: signature.clone(),
        };

        let mut session = imp.accept(imp.genuine.public_key()).await?;
        session.next().await?; // inventory
        session.send(&deploy(1)).await?;
        match session.next().await? {
            AgentMsg::NeedFrom { chunks, .. } if chunks == ids => {}
            a => bail!("expected a need for the eight chunks, got {a:?}"),
        }
        // The group's header and three quarters of its payload; the stream then ends, and
        // (once the agent has all of it) the connection is lost.
        let cut = payload.len() * 3 / 4;
        let mut s = session.conn.open_uni().await?;
        seedcast_net::write_msg(
            &mut s,
            &seedcast_core::protocol::DataStreamHeader { transfer: 1 },
        )
        .await?;
        seedcast_net::write_msg(&mut s, &group(&ids, &payload)).await?;
        s.write_all(&payload[..cut]).await?;
        s.finish()?;
        tokio::time::timeout(Duration::from_secs(20), s.stopped()).await??;
        // The agent decodes on its own thread after reading: give it a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        session.close();

        // It comes back and asks only for the chunks after the cut.
        let mut session = imp.accept(imp.genuine.public_key()).await?;
        session.next().await?; // inventory
        session.send(&deploy(2)).await?;
        let rest = match session.next().await? {
            AgentMsg::NeedFrom { chunks, .. } => chunks,
            a => bail!("expected a need, got {a:?}"),
        };
        let kept = ids.len() - rest.len();
        ensure!(
            kept > 0 && kept < ids.len() && rest[..] == ids[kept..],
            "after a cut three quarters in the agent asks for {} of 8 chunks: {rest:?}",
            rest.len()
        );
        let refs: Vec<&[u8]> = chunks[kept..].iter().map(|c| &c[..]).collect();
        let payload = seedcast_core::delta::encode_group(&[], &refs, 3)?;
        session
            .data(2, vec![(group(&rest, &payload), payload)])
            .await?;
        let last = until_final(&mut session).await?;
        let Some(AgentMsg::Published { local_id, .. }) = last.last() else {
            bail!("not published: {last:?}");
        };
        let extra = cluster.pool_dir(SITES[0]).join(local_id).join("extra.bin");
        ensure!(
            std::fs::read(&extra)? == chunks.concat(),
            "published bytes differ"
        );
        println!("a group cut three quarters in: {kept} of 8 chunks kept");
        session.close();
        run.abort();
        Ok(())
    })
    .await
}

/// An engine that closes every session right after welcoming it (as it does when the agent
/// breaks the protocol) is redialled with a growing backoff, not ten times a second: a
/// session resets the backoff only once it has lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_keeps_closing_sessions_is_redialled_with_growing_backoff() -> Result<()> {
    with_cluster(&SITES[..1], async |cluster| {
        let site = SITES[0];
        let data = cluster.agent(site).data.clone();
        cluster.remove_agent(site).await;
        let imp = Impostor::new(cluster)?;
        let adapter = Arc::new(DirAdapter::new(cluster.pool_dir(site))?);
        let cfg = AgentConfig::new(&data, imp.addr()?.to_string(), site, None);
        let run = tokio::spawn(Agent::open(cfg, adapter)?.run(std::future::pending()));
        let window = Duration::from_secs(4);
        let start = std::time::Instant::now();
        let mut sessions = 0;
        while let Some(left) = window.checked_sub(start.elapsed()) {
            match tokio::time::timeout(left, imp.accept(imp.genuine.public_key())).await {
                Ok(Ok(mut s)) => {
                    // Welcomed: the agent sends its inventory; then the session is closed.
                    ensure!(matches!(s.next().await?, AgentMsg::Inventory { .. }));
                    sessions += 1;
                    s.conn.close(3u32.into(), b"a protocol violation");
                }
                _ => break,
            }
        }
        run.abort();
        // 100, 200, 400, 800, 1600 ms apart: about five in 4 s (before: one every ~150 ms).
        ensure!((3..=8).contains(&sessions), "{sessions} sessions in 4 s");
        Ok(())
    })
    .await
}

/// Open a probe stream of `kind`, send `body` records, and read the agent's reply.
async fn probe(
    s: &Session,
    kind: seedcast_core::protocol::Probe,
    body: &[(ChunkHeader, Vec<u8>)],
    finish: bool,
) -> Result<(quinn::SendStream, quinn::RecvStream)> {
    let (mut send, recv) = s.conn.open_bi().await?;
    seedcast_net::write_msg(&mut send, &kind).await?;
    for (h, payload) in body {
        seedcast_net::write_msg(&mut send, h).await?;
        send.write_all(payload).await?;
    }
    if finish {
        send.finish()?;
    }
    Ok((send, recv))
}

async fn reply(recv: &mut quinn::RecvStream) -> Result<seedcast_core::protocol::ProbeReply> {
    Ok(tokio::time::timeout(
        Duration::from_secs(20),
        seedcast_net::read_msg_required(recv),
    )
    .await??)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_verified_bounded_one_at_a_time_and_leave_nothing() -> Result<()> {
    use seedcast_core::protocol::{Probe, ProbeReply};
    with_cluster(&SITES[..1], async |cluster| {
        let (_, data) = seeded_site(cluster).await?;
        let imp = Impostor::new(cluster)?;
        let pool = cluster.pool_dir(SITES[0]);
        let before = pool_listing(&pool)?;
        let run = restart_against(cluster, &data, &imp)?;
        let session = imp.accept(imp.genuine.public_key()).await?;

        let good: Vec<u8> = (0..70_000u32).map(|i| (i * 13 % 241) as u8).collect();
        let chunk = |payload: &[u8], id: ChunkId, raw_len: u32| {
            let h = ChunkHeader {
                id,
                raw_len,
                encoding: Encoding::Raw,
                payload_len: payload.len() as u32,
            };
            (h, payload.to_vec())
        };
        let id = ChunkId::of(&good);
        let ok = chunk(&good, id, good.len() as u32);

        // Genuine chunks: verified, written, counted.
        let (_s, mut r) = probe(&session, Probe::Chunks, &[ok.clone(), ok.clone()], true).await?;
        match reply(&mut r).await? {
            ProbeReply::Received {
                chunks, raw_bytes, ..
            } => ensure!(chunks == 2 && raw_bytes == 2 * good.len() as u64),
            other => bail!("{other:?}"),
        }

        // A damaged chunk is refused as a deployment's would be, naming it.
        let mut bad = good.clone();
        bad[100] ^= 1;
        let (_s, mut r) = probe(
            &session,
            Probe::Chunks,
            &[chunk(&bad, id, bad.len() as u32)],
            true,
        )
        .await?;
        match reply(&mut r).await? {
            ProbeReply::Refused { message } => ensure!(message.contains("mismatch"), "{message}"),
            other => bail!("{other:?}"),
        }

        // A chunk over the site's bounds is refused before its payload is read.
        let huge = ChunkHeader {
            id,
            raw_len: u32::MAX,
            encoding: Encoding::Raw,
            payload_len: 16,
        };
        let (_s, mut r) = probe(&session, Probe::Chunks, &[(huge, vec![0; 16])], true).await?;
        match reply(&mut r).await? {
            ProbeReply::Refused { message } => ensure!(message.contains("bounds"), "{message}"),
            other => bail!("{other:?}"),
        }

        // One probe at a time: a second while a raw probe is open is refused; the first
        // still completes.
        let (mut first, mut first_r) = probe(&session, Probe::Raw, &[], false).await?;
        first.write_all(&[7u8; 1 << 20]).await?;
        let (_s, mut r) = probe(&session, Probe::Ping, &[], true).await?;
        match reply(&mut r).await? {
            ProbeReply::Refused { message } => {
                ensure!(message.contains("another probe"), "{message}")
            }
            other => bail!("{other:?}"),
        }
        first.finish()?;
        match reply(&mut first_r).await? {
            ProbeReply::Received { bytes, .. } => ensure!(bytes == 1 << 20),
            other => bail!("{other:?}"),
        }
        let (_s, mut r) = probe(&session, Probe::Ping, &[], true).await?;
        ensure!(reply(&mut r).await? == ProbeReply::Pong);

        // Nothing was kept: no scratch file, the pool as it was.
        ensure!(!data.join(".probe-scratch").exists(), "scratch file left");
        session.close();
        run.abort();
        let _ = run.await;
        ensure!(pool_listing(&pool)? == before, "the pool changed");
        // The probe's chunk never reached the cache (the database reopens once the agent's
        // last task has let go of it).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let db = loop {
            match AgentDb::open(&data.join("db")) {
                Ok(db) => break db,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => return Err(e.into()),
            }
        };
        ensure!(db.chunk(&id)?.is_none(), "probe chunk cached");
        Ok(())
    })
    .await
}
