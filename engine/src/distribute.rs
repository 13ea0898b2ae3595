//! Deploying image versions to one site: the engine's half of the transfer.
//!
//! Per site, one worker deploys one version at a time: `Deploy` (the manifest) → the agent's
//! `Need` (what it lacks) → those chunks, in their stored compressed form, on several
//! unidirectional streams → the agent's `Published` (with its local id) or `Failed`.
//! Desired state lives in the catalog's placements, so a worker that starts (an agent that
//! connects or reconnects) simply deploys every placement not yet published; anything a
//! crash interrupted is redone, and chunks the agent verified before are not asked for again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use quinn::{Connection, SendStream};
use seedcast_core::protocol::{
    AgentMsg, ChunkHeader, DataRecord, DataStreamHeader, EngineMsg, PlacementState,
};
use seedcast_core::{ChunkId, GlobalId};
use seedcast_net::{FramedError, write_msg};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::catalog::PlacementRecord;
use crate::delta::Encoded;
use crate::{Engine, EngineError, Shared};

/// Chunks a data stream reads from the store at a time.
const READ_BATCH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Framed(#[from] FramedError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("agent disconnected")]
    Disconnected,
    #[error("agent broke the protocol: {0}")]
    Protocol(String),
}

fn update_placement(
    shared: &Shared,
    g: &GlobalId,
    site: &str,
    f: impl FnOnce(&mut PlacementRecord),
) -> Result<(), EngineError> {
    let Some(mut p) = shared.catalog.placement(g, site)? else {
        return Ok(());
    };
    f(&mut p);
    shared.catalog.put_placement(g, site, &p)?;
    shared.changed();
    Ok(())
}

/// Placements at `site` that are not yet what they should be.
fn pending_work(
    shared: &Shared,
    site: &str,
    retry_failed: bool,
) -> Result<Vec<(GlobalId, u32)>, EngineError> {
    Ok(shared
        .catalog
        .placements_at(site)?
        .into_iter()
        .filter(|(_, p)| match p.state {
            PlacementState::Published => p.published_version != Some(p.version),
            PlacementState::Failed => retry_failed,
            PlacementState::Pending | PlacementState::Transferring => true,
        })
        .map(|(g, p)| (g, p.version))
        .collect())
}

pub(crate) async fn site_worker(
    shared: &Arc<Shared>,
    site: &str,
    conn: &Connection,
    send: &mut SendStream,
    rx: mpsc::Receiver<AgentMsg>,
    wake: &Notify,
    held: Held,
) -> Result<(), DeployError> {
    let mut link = SiteLink {
        site,
        conn,
        send,
        rx,
        held,
    };
    // On (re)connect, failed placements get another try; afterwards only new work.
    let mut retry_failed = true;
    loop {
        let work = pending_work(shared, site, retry_failed)?;
        retry_failed = false;
        if work.is_empty() {
            wake.notified().await;
            continue;
        }
        for (g, version) in work {
            deploy(shared, &mut link, g, version).await?;
        }
    }
}

/// What the site holds, by image: version and manifest id (from its inventory, then kept
/// up to date as it publishes).
pub(crate) type Held = std::collections::HashMap<GlobalId, (u32, [u8; 32])>;

/// The deploy message for `m`: as a delta against the manifest the site holds of the same
/// image when there is one (a few KiB instead of ~40 bytes per chunk of the image).
fn deploy_msg(
    shared: &Shared,
    held: &Held,
    transfer: u64,
    m: &crate::catalog::ManifestRecord,
) -> EngineMsg {
    let g = m.manifest.global_id;
    if let Some((v, mid)) = held.get(&g)
        && *v != m.manifest.version
        && let Ok(Some(base)) = shared.catalog.manifest(&g, *v)
        && base.manifest_id == *mid
        && let Some(delta) = shared.delta.manifest_delta(&base, m)
    {
        return EngineMsg::DeployDelta {
            transfer,
            base: seedcast_core::protocol::HeldVersion {
                global_id: g,
                version: *v,
            },
            manifest_id: m.manifest_id,
            delta: delta.as_ref().clone(),
        };
    }
    EngineMsg::Deploy {
        transfer,
        manifest: m.manifest.clone(),
    }
}

/// The next message about `transfer` from the agent.
async fn reply_for(
    rx: &mut mpsc::Receiver<AgentMsg>,
    transfer: u64,
) -> Result<AgentMsg, DeployError> {
    loop {
        let m = rx.recv().await.ok_or(DeployError::Disconnected)?;
        let t = match &m {
            AgentMsg::Need { transfer, .. }
            | AgentMsg::NeedFrom { transfer, .. }
            | AgentMsg::Published { transfer, .. }
            | AgentMsg::Failed { transfer, .. } => *transfer,
            AgentMsg::Inventory { .. } => continue,
        };
        if t == transfer {
            return Ok(m);
        }
        warn!(
            got = t,
            want = transfer,
            "reply for another transfer ignored"
        );
    }
}

/// One unit of a data stream's work.
enum Work {
    /// Chunks sent in their stored form.
    Stored(Vec<ChunkId>),
    /// Chunks sent as a delta group (each with the file offset of its first use).
    Group(Vec<(ChunkId, u64)>),
}

/// Bytes a connection has put on the wire so far, both directions, with UDP/IP headers.
fn wire_bytes(conn: &Connection) -> u64 {
    let s = conn.stats();
    let header = if conn.remote_address().is_ipv6() {
        48
    } else {
        28
    };
    s.udp_tx.bytes + s.udp_rx.bytes + header * (s.udp_tx.datagrams + s.udp_rx.datagrams)
}

/// The engine's end of one agent's session, as its worker uses it.
struct SiteLink<'a> {
    site: &'a str,
    conn: &'a Connection,
    send: &'a mut SendStream,
    rx: mpsc::Receiver<AgentMsg>,
    held: Held,
}

async fn deploy(
    shared: &Arc<Shared>,
    link: &mut SiteLink<'_>,
    g: GlobalId,
    version: u32,
) -> Result<(), DeployError> {
    let (site, conn) = (link.site, link.conn);
    let send = &mut *link.send;
    let rx = &mut link.rx;
    let held = &mut link.held;
    let Some(mrec) = shared
        .catalog
        .manifest(&g, version)
        .map_err(EngineError::from)?
    else {
        update_placement(shared, &g, site, |p| {
            p.state = PlacementState::Failed;
            p.error = Some(format!("manifest of version {version} is missing"));
        })?;
        return Ok(());
    };
    let transfer = Engine::next_transfer(shared);
    update_placement(shared, &g, site, |p| {
        p.state = PlacementState::Transferring;
        p.bytes_sent = 0;
        p.bytes_needed = 0;
        p.wire_bytes = 0;
        p.error = None;
    })?;
    let wire_start = wire_bytes(conn);
    let msg = {
        let sh = shared.clone();
        let (held2, mrec2) = (held.clone(), mrec.clone());
        tokio::task::spawn_blocking(move || deploy_msg(&sh, &held2, transfer, &mrec2))
            .await
            .map_err(|e| EngineError::Internal(format!("manifest delta task: {e}")))?
    };
    write_msg(send, &msg).await?;

    let (need, bases_from, unavailable) = match reply_for(rx, transfer).await? {
        AgentMsg::Need { chunks, .. } => (chunks, vec![], vec![]),
        AgentMsg::NeedFrom {
            chunks,
            bases_from,
            unavailable,
            ..
        } => (chunks, bases_from, unavailable),
        AgentMsg::Failed { error, .. } => return record_failure(shared, &g, site, error),
        other => {
            return Err(DeployError::Protocol(format!(
                "expected Need, got {other:?}"
            )));
        }
    };
    let wanted = mrec.manifest.chunks();
    let mut bytes_needed = 0u64;
    for id in &need {
        if !wanted.contains_key(id) {
            return Err(DeployError::Protocol(format!(
                "asked for chunk {id}, which the manifest does not name"
            )));
        }
        let rec = shared.store.record(id).ok_or_else(|| {
            EngineError::Internal(format!("chunk {id} of {g} is not in the store"))
        })?;
        bytes_needed += rec.stored_len as u64;
    }
    update_placement(shared, &g, site, |p| p.bytes_needed = bytes_needed)?;
    let key = (g, site.to_string());
    shared
        .live
        .lock()
        .expect("live lock")
        .insert(key.clone(), 0);

    // A site holding an earlier version gets delta groups; otherwise stored chunks.
    let mut deltas = None;
    if !need.is_empty() && !bases_from.is_empty() {
        let bkey = crate::delta::bases_key(&bases_from, &unavailable);
        let index = shared
            .delta
            .index(shared, bkey, bases_from.clone(), unavailable.clone())
            .await?;
        if !index.is_empty() {
            deltas = Some((index, bkey));
        }
    }
    let work: Vec<Work> = match &deltas {
        Some(_) => {
            let offsets = crate::delta::first_offsets(&mrec.manifest);
            let lens: std::collections::HashMap<ChunkId, u32> = wanted.into_iter().collect();
            crate::delta::plan_groups(&need, &offsets, &lens)
                .into_iter()
                .map(Work::Group)
                .collect()
        }
        None => need
            .chunks(READ_BATCH)
            .map(|c| Work::Stored(c.to_vec()))
            .collect(),
    };

    let sent = Arc::new(AtomicU64::new(0));
    let sending = send_work(
        shared,
        conn,
        transfer,
        work,
        deltas,
        key.clone(),
        sent.clone(),
    );
    // The agent may answer before everything is sent (it failed): stop sending then.
    let reply = tokio::select! {
        r = sending => { r?; reply_for(rx, transfer).await? }
        m = reply_for(rx, transfer) => m?,
    };
    shared.live.lock().expect("live lock").remove(&key);
    let bytes_sent = sent.load(Ordering::Relaxed);
    let wire = wire_bytes(conn).saturating_sub(wire_start);
    match reply {
        AgentMsg::Published { local_id, .. } => {
            let st = conn.stats();
            held.insert(g, (version, mrec.manifest_id));
            info!(
                site, global_id = %g, version, %local_id, bytes_sent, wire,
                lost = st.path.lost_packets, sent = st.path.sent_packets, mtu = st.path.current_mtu,
                tx = st.udp_tx.datagrams, rx = st.udp_rx.datagrams,
                "published"
            );
            update_placement(shared, &g, site, |p| {
                p.state = PlacementState::Published;
                p.local_id = Some(local_id);
                p.published_version = Some(version);
                p.bytes_sent = bytes_sent;
                p.wire_bytes = wire;
                p.error = None;
            })?;
            Ok(())
        }
        AgentMsg::Failed { error, .. } => {
            update_placement(shared, &g, site, |p| {
                p.bytes_sent = bytes_sent;
                p.wire_bytes = wire;
            })?;
            record_failure(shared, &g, site, error)
        }
        other => Err(DeployError::Protocol(format!(
            "expected Published or Failed, got {other:?}"
        ))),
    }
}

fn record_failure(
    shared: &Shared,
    g: &GlobalId,
    site: &str,
    error: String,
) -> Result<(), DeployError> {
    warn!(site, global_id = %g, "deployment failed: {error}");
    update_placement(shared, g, site, |p| {
        p.state = PlacementState::Failed;
        p.error = Some(error);
    })?;
    Ok(())
}

type Deltas = Option<(Arc<crate::delta::BaseIndex>, [u8; 32])>;

/// Send the work over up to `streams_per_transfer` unidirectional streams that take items
/// from a shared cursor, so a slow stream does not hold the others back.
async fn send_work(
    shared: &Arc<Shared>,
    conn: &Connection,
    transfer: u64,
    work: Vec<Work>,
    deltas: Deltas,
    key: (GlobalId, String),
    sent: Arc<AtomicU64>,
) -> Result<(), DeployError> {
    if work.is_empty() {
        return Ok(());
    }
    let streams = shared.cfg.streams_per_transfer.clamp(1, work.len());
    let work = Arc::new(work);
    let cursor = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..streams {
        set.spawn(stream_task(
            shared.clone(),
            conn.clone(),
            transfer,
            work.clone(),
            deltas.clone(),
            cursor.clone(),
            sent.clone(),
            key.clone(),
        ));
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| EngineError::Internal(format!("send task: {e}")))??;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn stream_task(
    shared: Arc<Shared>,
    conn: Connection,
    transfer: u64,
    work: Arc<Vec<Work>>,
    deltas: Deltas,
    cursor: Arc<AtomicUsize>,
    sent: Arc<AtomicU64>,
    key: (GlobalId, String),
) -> Result<(), DeployError> {
    let mut s = conn.open_uni().await?;
    write_msg(&mut s, &DataStreamHeader { transfer }).await?;
    let count = |n: u64| {
        let total = sent.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(v) = shared.live.lock().expect("live lock").get_mut(&key) {
            *v = total;
        }
    };
    loop {
        let i = cursor.fetch_add(1, Ordering::Relaxed);
        let Some(item) = work.get(i) else { break };
        let stored = match (item, &deltas) {
            (Work::Stored(ids), _) => ids.clone(),
            (Work::Group(chunks), Some((index, bkey))) => {
                let enc = shared
                    .delta
                    .group(&shared, index.clone(), *bkey, chunks.clone())
                    .await?;
                match &*enc {
                    Encoded::Group { header, payload } => {
                        write_msg(&mut s, &DataRecord::Group(header.clone())).await?;
                        s.write_chunk(payload.clone()).await?;
                        count(payload.len() as u64);
                        continue;
                    }
                    Encoded::Stored(ids) => ids.clone(),
                }
            }
            (Work::Group(chunks), None) => chunks.iter().map(|(id, _)| *id).collect(),
        };
        let sh = shared.clone();
        let chunks = tokio::task::spawn_blocking(move || {
            stored
                .iter()
                .map(|id| {
                    sh.store.read(id)?.ok_or_else(|| {
                        EngineError::Internal(format!("chunk {id} vanished from the store"))
                    })
                })
                .collect::<Result<Vec<_>, EngineError>>()
        })
        .await
        .map_err(|e| EngineError::Internal(format!("read task: {e}")))??;
        for c in chunks {
            let h = ChunkHeader::of(&c);
            write_msg(&mut s, &DataRecord::Chunk(h)).await?;
            let n = c.payload.len() as u64;
            // The stored bytes go out as they are: no copy, no recompression.
            s.write_chunk(c.payload).await?;
            count(n);
        }
    }
    s.finish()?;
    Ok(())
}
