//! Deploying image versions to one site: the async driver of the engine's sender.
//!
//! Per site, one worker deploys one version at a time, updates of images the site holds
//! before first seeds: an update committed while a seed is in flight *preempts* it — the
//! seed's transfer is aborted (the agent keeps every chunk it verified), the update goes,
//! and the seed resumes after it, asking only for what it still lacks. A patch to a site
//! thus never waits behind a bulk seed on a thin link. What the site gets is decided by a
//! [`Sender`] (sans-IO, in `seedcast-core`); this module only does what it asks: the
//! manifest on the control stream, the chunks on data streams ([`crate::data_streams`]),
//! the placement records and live counters as it goes. Desired state lives in the
//! catalog's placements, so a worker that starts (an agent that connects or reconnects)
//! simply deploys every placement not yet published; anything a crash interrupted is
//! redone, and chunks the agent verified before are not asked for again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use quinn::{Connection, SendStream};
use seedcast_core::GlobalId;
use seedcast_core::protocol::{AgentMsg, EngineMsg, HeldVersion, PlacementState};
use seedcast_core::sender::{Action, Handled, Held, Outcome, SendError, Sender, Violation};
use seedcast_core::source::{ChunkSource, SourceError};
use seedcast_net::{FramedError, write_msg};
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

use crate::EngineError;
use crate::catalog::{ManifestRecord, PlacementRecord};
use crate::data_streams::{self, Deltas, Outbound, StreamError};
use crate::delta::bases_key;
use crate::state::Shared;

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Framed(#[from] FramedError),
    #[error(transparent)]
    Streams(#[from] StreamError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("agent disconnected")]
    Disconnected,
    #[error("agent broke the protocol: {0}")]
    Protocol(#[from] Violation),
}

impl From<crate::catalog::CatalogError> for DeployError {
    fn from(e: crate::catalog::CatalogError) -> Self {
        DeployError::Engine(e.into())
    }
}

/// The engine's end of one agent's session, as its worker uses it.
pub(crate) struct SiteLink<'a> {
    pub site: &'a str,
    pub conn: &'a Connection,
    pub send: &'a mut SendStream,
    /// The agent's messages, in order.
    pub rx: mpsc::Receiver<AgentMsg>,
    /// What the site holds (from its inventory, then kept up to date as it publishes).
    pub held: Held,
    /// The site's and the engine's rate limits, for this connection.
    pub pacer: Arc<crate::pacing::Pacer>,
}

/// Deploy whatever belongs at the site, then wait for more (`wake`) or for a failed
/// deployment's next try, until the session ends.
pub(crate) async fn site_worker(
    shared: &Arc<Shared>,
    mut link: SiteLink<'_>,
    wake: &Notify,
) -> Result<(), DeployError> {
    // A new session knows of no earlier try: what failed before is tried again at once.
    let mut retries = Retries::default();
    loop {
        let placements = shared.catalog.placements_at(link.site)?;
        let work = pending_work(placements, &retries, Instant::now(), &link.held);
        if work.is_empty() {
            match retries.next_due() {
                Some(at) => tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep_until(at.into()) => {}
                },
                None => wake.notified().await,
            }
            continue;
        }
        for (g, version) in work {
            match deploy(shared, &mut link, g, version, wake).await? {
                Ended::Published => retries.forget(&g, version),
                Ended::Failed => retries.failed(g, version, Instant::now()),
                // The update that preempted it is first in the next round.
                Ended::Preempted => break,
            }
        }
    }
}

/// When failed deployments at one site are tried again: 2 s after the first failure,
/// doubling to at most 5 minutes, so a service that is away for a while is not hammered
/// and one that comes back is used soon.
#[derive(Debug, Default)]
struct Retries {
    /// By (image, version): failures so far and when the next try is due.
    next: HashMap<(GlobalId, u32), (u32, Instant)>,
}

impl Retries {
    const FIRST: Duration = Duration::from_secs(2);
    const MAX: Duration = Duration::from_secs(300);

    fn failed(&mut self, g: GlobalId, version: u32, now: Instant) {
        let n = self.next.get(&(g, version)).map_or(0, |(n, _)| *n) + 1;
        let wait = Self::FIRST
            .saturating_mul(1 << (n - 1).min(16))
            .min(Self::MAX);
        self.next.insert((g, version), (n, now + wait));
    }

    fn forget(&mut self, g: &GlobalId, version: u32) {
        self.next.remove(&(*g, version));
    }

    /// Is a failed placement's next try due (one this session has not tried is)?
    fn due(&self, g: &GlobalId, version: u32, now: Instant) -> bool {
        self.next
            .get(&(*g, version))
            .is_none_or(|(_, at)| *at <= now)
    }

    /// The earliest next try.
    fn next_due(&self) -> Option<Instant> {
        self.next.values().map(|(_, at)| *at).min()
    }
}

/// Placements that are not yet what they should be (failed ones when their try is due),
/// updates of images the site holds first (a patch is urgent; a seed is bulk), each kind in
/// catalog order.
fn pending_work(
    placements: Vec<(GlobalId, PlacementRecord)>,
    retries: &Retries,
    now: Instant,
    held: &Held,
) -> Vec<(GlobalId, u32)> {
    let mut work = unpublished(placements, retries, now);
    work.sort_by_key(|(g, _)| !held.contains_key(g));
    work
}

/// Placements not yet published at their version (failed ones when their try is due).
fn unpublished(
    placements: Vec<(GlobalId, PlacementRecord)>,
    retries: &Retries,
    now: Instant,
) -> Vec<(GlobalId, u32)> {
    placements
        .into_iter()
        .filter(|(g, p)| match p.state {
            // A drifted copy is left for the operator (`seedcast check --repair` at the site):
            // a VM may be running from it. A newer version replaces it as usual.
            PlacementState::Published | PlacementState::Drifted => {
                p.published_version != Some(p.version)
            }
            PlacementState::Failed => retries.due(g, p.version, now),
            PlacementState::Pending | PlacementState::Transferring => true,
        })
        .map(|(g, p)| (g, p.version))
        .collect()
}

/// How one deployment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Published,
    Failed,
    /// Stopped for an update of an image the site holds; deployed again after it.
    Preempted,
}

/// Is an update of an image the site holds waiting (one that would preempt a seed)?
fn update_waiting(shared: &Shared, site: &str, held: &Held) -> Result<bool, EngineError> {
    let placements = shared.catalog.placements_at(site)?;
    let none = Retries::default();
    Ok(unpublished(placements, &none, Instant::now())
        .iter()
        .any(|(g, _)| held.contains_key(g)))
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

/// Bytes a connection has put on the wire so far, both directions, with UDP/IP headers.
fn wire_bytes(conn: &Connection) -> u64 {
    let s = conn.stats();
    let header = crate::pacing::header_bytes(conn);
    s.udp_tx.bytes + s.udp_rx.bytes + header * (s.udp_tx.datagrams + s.udp_rx.datagrams)
}

/// One deployment of version `version` of `g`, recorded in its placement.
async fn deploy(
    shared: &Arc<Shared>,
    link: &mut SiteLink<'_>,
    g: GlobalId,
    version: u32,
    wake: &Notify,
) -> Result<Ended, DeployError> {
    let site = link.site;
    let Some(mrec) = shared.catalog.manifest(&g, version)? else {
        update_placement(shared, &g, site, |p| {
            p.state = PlacementState::Failed;
            p.error = Some(format!("manifest of version {version} is missing"));
        })?;
        return Ok(Ended::Failed);
    };
    update_placement(shared, &g, site, |p| {
        p.state = PlacementState::Transferring;
        p.bytes_sent = 0;
        p.bytes_needed = 0;
        p.wire_bytes = 0;
        p.error = None;
    })?;
    let wire_start = wire_bytes(link.conn);
    let live = shared.live.start(g, site);
    let transfer = shared.next_transfer();
    let mut sender = Sender::new(
        transfer,
        &mrec.manifest,
        mrec.manifest_id,
        &link.held,
        shared.cfg.send,
    );
    let outbound = Outbound {
        conn: link.conn.clone(),
        transfer,
        source: shared.reads.clone() as Arc<dyn ChunkSource>,
        deltas: None,
        sent: live.counter.clone(),
        streams: shared.cfg.streams_per_transfer,
        pacer: link.pacer.clone(),
    };
    // A first seed of this image at this site gives way to updates; an update does not.
    let preemptible = (!link.held.contains_key(&g)).then_some(wake);
    let (outcome, preempted) =
        drive(shared, link, &mrec, &mut sender, outbound, preemptible).await?;
    let bytes_sent = live.counter.load(Ordering::Relaxed);
    drop(live);
    let wire = wire_bytes(link.conn).saturating_sub(wire_start);
    if preempted && let Outcome::Failed { error } = &outcome {
        info!(site, global_id = %g, version, bytes_sent, "preempted by an update ({error}); resumes after it");
        update_placement(shared, &g, site, |p| {
            p.state = PlacementState::Pending;
            p.error = None;
            p.bytes_sent = bytes_sent;
            p.wire_bytes = wire;
        })?;
        return Ok(Ended::Preempted);
    }
    record(shared, link, &g, outcome, bytes_sent, wire)
}

/// Record how a deployment ended.
fn record(
    shared: &Arc<Shared>,
    link: &mut SiteLink<'_>,
    g: &GlobalId,
    outcome: Outcome,
    bytes_sent: u64,
    wire: u64,
) -> Result<Ended, DeployError> {
    let site = link.site;
    match outcome {
        Outcome::Published {
            local_id,
            version,
            manifest_id,
        } => {
            let st = link.conn.stats();
            link.held.insert(*g, (version, manifest_id));
            info!(
                site, global_id = %g, version, %local_id, bytes_sent, wire,
                lost = st.path.lost_packets, sent = st.path.sent_packets, mtu = st.path.current_mtu,
                tx = st.udp_tx.datagrams, rx = st.udp_rx.datagrams,
                "published"
            );
            update_placement(shared, g, site, |p| {
                p.state = PlacementState::Published;
                p.local_id = Some(local_id);
                p.published_version = Some(version);
                p.bytes_sent = bytes_sent;
                p.wire_bytes = wire;
                p.error = None;
            })?;
            index_ahead(shared, *g, version);
            Ok(Ended::Published)
        }
        Outcome::Failed { error } => {
            warn!(site, global_id = %g, "deployment failed: {error}");
            update_placement(shared, g, site, |p| {
                p.state = PlacementState::Failed;
                p.error = Some(error);
                p.bytes_sent = bytes_sent;
                p.wire_bytes = wire;
            })?;
            Ok(Ended::Failed)
        }
    }
}

/// What woke the driver.
enum Event {
    Sent(Result<(), StreamError>),
    Reply(Option<AgentMsg>),
    /// New work for the site was committed.
    Woken,
}

/// Why a preempted transfer ends (the agent reports it back as its failure).
const PREEMPTED: &str = "preempted by an update for this site; resumes after it";

/// Do what the sender asks until it is done. With `preemptible` (the site's wake-up), new
/// work that is an update of an image the site holds stops this transfer while its chunks
/// are moving: returns the outcome and whether it was preempted.
async fn drive(
    shared: &Arc<Shared>,
    link: &mut SiteLink<'_>,
    mrec: &ManifestRecord,
    sender: &mut Sender,
    mut outbound: Outbound,
    preemptible: Option<&Notify>,
) -> Result<(Outcome, bool), DeployError> {
    let mut streams: Option<BoxFuture<'static, Result<(), StreamError>>> = None;
    let mut preempted = false;
    loop {
        while let Some(action) = sender.poll() {
            match action {
                Action::Deploy { base } => {
                    let msg = deploy_msg(shared, sender.transfer(), mrec, base).await?;
                    write_msg(link.send, &msg).await?;
                }
                Action::Needed { bytes, .. } => {
                    update_placement(shared, &mrec.manifest.global_id, link.site, |p| {
                        p.bytes_needed = bytes
                    })?;
                }
                Action::IndexBases {
                    bases_from,
                    unavailable,
                } => {
                    let deltas = index_bases(shared, bases_from, unavailable).await?;
                    sender.handle_bases(deltas.is_some());
                    outbound.deltas = deltas;
                }
                Action::Send { work, .. } => {
                    streams = Some(Box::pin(data_streams::send(outbound.clone(), work)));
                }
                // Dropping the streams' future stops whatever is still being sent.
                Action::Done(outcome) => return Ok((outcome, preempted)),
            }
        }
        let event = tokio::select! {
            r = async { streams.as_mut().expect("checked").await }, if streams.is_some() => {
                Event::Sent(r)
            }
            m = link.rx.recv() => Event::Reply(m),
            // Only while chunks move: the agent is receiving, so it takes the abort.
            _ = async { preemptible.expect("checked").notified().await },
                if preemptible.is_some() && streams.is_some() && !preempted => Event::Woken,
        };
        match event {
            Event::Woken => {
                if update_waiting(shared, link.site, &link.held)? {
                    preempted = true;
                    // The agent answers `Failed` with this reason; its verified chunks stay.
                    streams = None;
                    data_streams::abort(link.conn, sender.transfer(), PREEMPTED.into()).await?;
                }
            }
            Event::Sent(Err(e)) if e.store_fault() => {
                // This placement fails (the agent answers `Failed` with the reason);
                // the session and the site's other placements go on.
                streams = None;
                let reason = format!("engine store: {e}");
                warn!(site = link.site, global_id = %mrec.manifest.global_id, "{reason}");
                data_streams::abort(link.conn, sender.transfer(), reason).await?;
            }
            Event::Sent(r) => {
                r?;
                streams = None;
                sender.handle_sent();
            }
            Event::Reply(m) => {
                let m = m.ok_or(DeployError::Disconnected)?;
                let stored_len = |id: &_| shared.store.info(id).map(|i| i.stored_len);
                match sender.handle_reply(m, stored_len) {
                    Ok(Handled::OtherTransfer(t)) => {
                        warn!(
                            got = t,
                            want = sender.transfer(),
                            "reply for another transfer ignored"
                        )
                    }
                    Ok(_) => {}
                    Err(SendError::Protocol(v)) => return Err(v.into()),
                    Err(SendError::NotStored(id)) => {
                        return Err(EngineError::from(SourceError::Missing(id)).into());
                    }
                }
            }
        }
    }
}

/// The deploy message: as a delta against the manifest the site holds of the same image
/// when the sender chose one and the catalog has it (a few KiB instead of ~40 bytes per
/// chunk of the image); whole otherwise.
async fn deploy_msg(
    shared: &Arc<Shared>,
    transfer: u64,
    mrec: &ManifestRecord,
    base: Option<(HeldVersion, [u8; 32])>,
) -> Result<EngineMsg, EngineError> {
    // Signed here, when it is sent (ed25519: ~20 µs), so versions committed before
    // manifests were signed are signed too.
    let signature = shared.signer.sign(&mrec.manifest_id);
    let whole = || EngineMsg::Deploy {
        transfer,
        manifest: mrec.manifest.clone(),
        signature: signature.clone(),
    };
    let Some((hv, mid)) = base else {
        return Ok(whole());
    };
    let (sh, target) = (shared.clone(), mrec.clone());
    let delta = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let base = sh.catalog.manifest(&hv.global_id, hv.version).ok()??;
        let d = (base.manifest_id == mid)
            .then(|| sh.delta.manifest_delta(&base, &target))
            .flatten();
        tracing::debug!(
            secs = t.elapsed().as_secs_f64(),
            bytes = d.as_ref().map(|d| d.len()),
            "manifest delta"
        );
        d
    })
    .await?;
    Ok(match delta {
        Some(delta) => EngineMsg::DeployDelta {
            transfer,
            base: hv,
            manifest_id: mrec.manifest_id,
            delta: delta.as_ref().clone(),
            signature,
        },
        None => whole(),
    })
}

/// The most chunk data of a version [`index_ahead`] indexes (its index is ~1 % of this;
/// a larger image is indexed when its update comes, as before).
const INDEX_AHEAD_MAX: u64 = 4 << 30;

/// A site published version `version` of `g`: if that is the image's current version,
/// index it as delta bases now, in the background — it is what every site will hold when
/// the next update comes, and the update's first byte would otherwise wait for the index
/// (0.4–0.5 s for the Debian image on this host's two cores). Built once (the index memo
/// is keyed by the held versions), at most [`INDEX_AHEAD_MAX`] of chunk data.
fn index_ahead(shared: &Arc<Shared>, g: GlobalId, version: u32) {
    let bases = vec![seedcast_core::protocol::HeldVersion {
        global_id: g,
        version,
    }];
    // Every site that publishes this version comes here: only the first reads the catalog.
    if shared.delta.has_index(&bases_key(&bases, &[])) {
        return;
    }
    let sh = shared.clone();
    tokio::spawn(async move {
        let catalog = sh.catalog.clone();
        let worth = tokio::task::spawn_blocking(move || {
            let current = catalog.image(&g).ok()??.current_version == version;
            let m = catalog.manifest(&g, version).ok()??;
            let bytes: u64 = m.manifest.chunks().values().map(|l| *l as u64).sum();
            Some(current && bytes <= INDEX_AHEAD_MAX)
        })
        .await;
        if !matches!(worth, Ok(Some(true))) {
            return;
        }
        if let Err(e) = index_bases(&sh, bases, Vec::new()).await {
            tracing::debug!("version {version} of {g} not indexed ahead: {e}");
        }
    });
}

/// The index of the site's base chunks (built once for every site holding the same
/// versions), or `None` when it holds none.
pub(crate) async fn index_bases(
    shared: &Arc<Shared>,
    bases_from: Vec<HeldVersion>,
    unavailable: Vec<seedcast_core::ChunkId>,
) -> Result<Option<Deltas>, EngineError> {
    let key = bases_key(&bases_from, &unavailable);
    let catalog = shared.catalog.clone();
    let load = move || {
        let mut manifests = Vec::new();
        for h in &bases_from {
            if let Some(m) = catalog.manifest(&h.global_id, h.version)? {
                manifests.push((m.manifest_id, m.manifest));
            }
        }
        Ok(manifests)
    };
    let source = shared.store.clone() as Arc<dyn ChunkSource>;
    let t = Instant::now();
    let index = shared.delta.index(source, key, load, unavailable).await?;
    tracing::debug!(
        secs = t.elapsed().as_secs_f64(),
        bases = index.len(),
        bytes = index.heap_bytes(),
        "delta bases ready"
    );
    Ok((!index.is_empty()).then(|| Deltas {
        cache: shared.delta.clone(),
        index,
        key,
        level: shared.cfg.delta_level,
        adapt: shared.cfg.delta_adapt,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_work_is_what_is_not_yet_published_and_failures_when_their_try_is_due() {
        let at = |state, version, published| {
            let mut p = PlacementRecord::pending(version);
            p.state = state;
            p.published_version = published;
            (GlobalId([version as u8; 12]), p)
        };
        let placements = vec![
            at(PlacementState::Published, 1, Some(1)),
            at(PlacementState::Published, 2, Some(1)),
            at(PlacementState::Pending, 3, None),
            at(PlacementState::Transferring, 4, None),
            at(PlacementState::Failed, 5, None),
        ];
        let versions = |v: Vec<(GlobalId, u32)>| v.into_iter().map(|(_, v)| v).collect::<Vec<_>>();
        let now = Instant::now();
        let none = Held::new();
        // A new session tries what failed before at once.
        let mut r = Retries::default();
        assert_eq!(
            versions(pending_work(placements.clone(), &r, now, &none)),
            [2, 3, 4, 5]
        );
        // Updates of images the site holds go before first seeds.
        let held: Held = [(GlobalId([4; 12]), (1, [0; 32]))].into();
        assert_eq!(
            versions(pending_work(placements.clone(), &r, now, &held)),
            [4, 2, 3, 5]
        );
        // After this session's try failed: not again until its time comes.
        r.failed(GlobalId([5; 12]), 5, now);
        assert_eq!(
            versions(pending_work(placements.clone(), &r, now, &none)),
            [2, 3, 4]
        );
        let later = now + Duration::from_secs(3);
        assert_eq!(
            versions(pending_work(placements, &r, later, &none)),
            [2, 3, 4, 5]
        );
    }

    #[test]
    fn failed_tries_back_off_from_two_seconds_to_five_minutes() {
        let (g, t0) = (GlobalId([1; 12]), Instant::now());
        let mut r = Retries::default();
        let mut waits = Vec::new();
        for _ in 0..10 {
            r.failed(g, 1, t0);
            waits.push((r.next_due().unwrap() - t0).as_secs());
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        r.forget(&g, 1);
        assert_eq!(r.next_due(), None);
        assert!(r.due(&g, 1, t0));
    }
}
