//! One connected agent: greet it, learn what it holds, register it, and let its site worker
//! ([`crate::distribute`]) deploy whatever belongs there until the connection ends.

use std::sync::Arc;

use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream, VarInt};
use seedcast_core::GlobalId;
use seedcast_core::protocol::{AgentMsg, EngineMsg, HeldImage, PlacementState, close};
use seedcast_core::sender::Held;
use seedcast_net::{FramedError, read_msg, read_msg_required, write_msg};
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

use crate::distribute::{self, DeployError};
use crate::handshake::{close_for_violation, close_protocol, welcome};
use crate::sites;
use crate::state::{AgentHandle, Shared};

/// Largest renewal request (a CSR is a few hundred bytes).
const MAX_RENEW_FRAME: usize = 16 * 1024;
/// Least time between two renewals on one connection: signing is cheap, but an agent must
/// not be able to keep the engine's CA busy.
const RENEW_INTERVAL: Duration = Duration::from_secs(10);

/// An agent whose certificate was checked: its connection and control stream.
#[derive(Debug)]
pub(crate) struct Connected {
    pub conn: Connection,
    pub conn_id: u64,
    pub site: String,
    pub adapter: String,
    pub send: SendStream,
    pub recv: RecvStream,
    /// The connection's congestion controller, set from the site's settings.
    pub congestion: seedcast_net::congestion::Choice,
}

pub(crate) async fn session(shared: Arc<Shared>, a: Connected) {
    let Connected {
        conn,
        conn_id,
        site,
        adapter,
        mut send,
        mut recv,
        congestion,
    } = a;
    let Some(held) = greet(&shared, &conn, &site, &mut send, &mut recv).await else {
        return;
    };
    let Some(wake) = register(&shared, &conn, conn_id, &site, &adapter, &congestion) else {
        conn.close(
            VarInt::from_u32(close::REFUSED),
            format!("site {site:?} was revoked or reset").as_bytes(),
        );
        return;
    };
    serve(&shared, &conn, &site, send, recv, &wake, held).await;
    {
        let mut agents = shared.agents.lock();
        if agents.get(&site).is_some_and(|h| h.conn_id == conn_id) {
            agents.remove(&site);
        }
    }
    info!(site, "agent disconnected");
    shared.changed();
}

/// Welcome the agent and read its inventory (which must come first).
async fn greet(
    shared: &Shared,
    conn: &Connection,
    site: &str,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Option<Held> {
    write_msg(send, &welcome(shared)).await.ok()?;
    match read_msg_required::<AgentMsg>(recv).await {
        Ok(AgentMsg::Inventory { images }) => {
            let images = believable(shared, site, images);
            reconcile_inventory(shared, site, &images);
            Some(
                images
                    .iter()
                    .map(|h| (h.global_id, (h.version, h.manifest_id)))
                    .collect(),
            )
        }
        Ok(other) => {
            warn!(site, "expected Inventory, got {other:?}");
            conn.close(
                VarInt::from_u32(close::PROTOCOL),
                b"expected Inventory first",
            );
            None
        }
        Err(e) => {
            if e.is_protocol_violation() {
                close_for_violation(conn, &e);
            }
            None
        }
    }
}

/// Make this connection the site's agent (closing an older one); returns its wake-up, or
/// `None` when the site was revoked or reset since its certificate was checked.
fn register(
    shared: &Shared,
    conn: &Connection,
    conn_id: u64,
    site: &str,
    adapter: &str,
    congestion: &seedcast_net::congestion::Choice,
) -> Option<Arc<Notify>> {
    let _records = shared.site_records.lock();
    let cert = seedcast_net::tls::peer_certificate(conn)?;
    if !sites::still_admitted(shared, site, seedcast_net::pki::fingerprint(&cert)) {
        return None;
    }
    let wake = Arc::new(Notify::new());
    // Read under the site lock, so a `site set` racing this registration is not lost: it
    // either wrote before (read here) or finds this handle and sets it.
    let settings = shared.catalog.site_settings(site).unwrap_or_else(|e| {
        warn!(site, "reading site settings: {e}");
        Default::default()
    });
    congestion.set(
        settings
            .congestion
            .unwrap_or(shared.cfg.transport.congestion),
    );
    let handle = AgentHandle {
        conn_id,
        conn: conn.clone(),
        wake: wake.clone(),
        congestion: congestion.clone(),
    };
    // The site may have moved to another kind of local service since it enrolled.
    if let Ok(Some(mut rec)) = shared.catalog.site(site)
        && rec.adapter != adapter
    {
        rec.adapter = adapter.to_string();
        if let Err(e) = shared.catalog.put_site(site, &rec) {
            warn!(site, "recording adapter change: {e}");
        }
    }
    if let Some(old) = shared.agents.lock().insert(site.to_string(), handle) {
        old.conn.close(
            VarInt::from_u32(close::REPLACED),
            b"a newer connection took over this site",
        );
    }
    info!(site, adapter, remote = %conn.remote_address(), "agent connected");
    shared.changed();
    Some(wake)
}

/// Serve the agent's certificate renewals: each on a stream of its own, one request and
/// one answer, at most one per [`RENEW_INTERVAL`]. Ends when the connection does.
async fn renewals(shared: &Shared, conn: &Connection, site: &str) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let msg = seedcast_net::read_msg_limited::<AgentMsg>(&mut recv, MAX_RENEW_FRAME).await;
        let reply = match msg {
            Ok(Some(AgentMsg::Renew { csr_der })) => match sites::renew(shared, site, &csr_der) {
                Ok((cert_der, expires_unix)) => EngineMsg::Renewed {
                    cert_der,
                    expires_unix,
                },
                Err(message) => EngineMsg::RenewRefused { message },
            },
            Ok(_) => {
                close_protocol(conn, "a request stream must carry one Renew");
                return;
            }
            Err(e) => {
                if e.is_protocol_violation() {
                    close_for_violation(conn, &e);
                }
                return;
            }
        };
        let _ = write_msg(&mut send, &reply).await;
        let _ = send.finish();
        tokio::time::sleep(RENEW_INTERVAL).await;
    }
}

/// Forward the agent's messages to its worker until either ends; close the connection with
/// the reason when the agent broke the protocol.
async fn serve(
    shared: &Arc<Shared>,
    conn: &Connection,
    site: &str,
    mut send: SendStream,
    mut recv: RecvStream,
    wake: &Notify,
    held: Held,
) {
    let (tx, rx) = mpsc::channel(64);
    let reader = async {
        loop {
            let Some(m) = read_msg::<AgentMsg>(&mut recv).await? else {
                return Ok::<(), FramedError>(());
            };
            if let AgentMsg::Drifted {
                global_id,
                version,
                detail,
            } = m
            {
                record_drift(shared, site, &global_id, version, detail);
                continue;
            }
            if tx.send(m).await.is_err() {
                return Ok(());
            }
        }
    };
    let max_rate = shared
        .catalog
        .site_settings(site)
        .map(|s| s.max_rate)
        .unwrap_or_default();
    let pacer = Arc::new(crate::pacing::Pacer::new(
        conn.clone(),
        shared.limits.site(site, max_rate),
        shared.limits.global.clone(),
    ));
    let link = distribute::SiteLink {
        site,
        conn,
        send: &mut send,
        rx,
        held,
        pacer,
    };
    let worker = distribute::site_worker(shared, link, wake);
    tokio::select! {
        () = renewals(shared, conn, site) => {}
        r = reader => {
            if let Err(e) = r
                && e.is_protocol_violation()
            {
                close_for_violation(conn, &e);
            }
        }
        r = worker => {
            if let Err(e) = r {
                match &e {
                    DeployError::Protocol(v) => close_protocol(conn, &v.to_string()),
                    DeployError::Framed(fe) if fe.is_protocol_violation() => {
                        close_for_violation(conn, fe);
                    }
                    _ => {}
                }
                warn!(site, "site session ended: {e}");
            }
        }
    }
}

/// The site says its published copy of `g` at `version` changed underneath it: show the
/// placement as drifted, if that is the version the catalog has published there (a report
/// about anything else — another version, an image not placed here — is only logged). Not
/// redeployed by the engine: a VM may be running from that copy; `seedcast check --repair`
/// at the site restores it.
fn record_drift(shared: &Shared, site: &str, g: &GlobalId, version: u32, mut detail: String) {
    if seedcast_core::protocol::cut_text(&mut detail, seedcast_core::protocol::MAX_ERROR_TEXT) {
        detail.push('…');
    }
    // The lock commits hold: a new version's placement is not overwritten by this one.
    let _versions = shared.versions.lock();
    let p = match shared.catalog.placement(g, site) {
        Ok(Some(p)) => p,
        Ok(None) => {
            return warn!(site, global_id = %g, "drift report for an image not placed here; ignored");
        }
        Err(e) => return warn!(site, "reading a placement: {e}"),
    };
    if p.state != PlacementState::Published || p.published_version != Some(version) {
        return info!(site, global_id = %g, version, "drift report about a version not published there now; ignored");
    }
    warn!(site, global_id = %g, version, "the site's copy has drifted: {detail}");
    let mut p = p;
    p.state = PlacementState::Drifted;
    p.error = Some(detail);
    match shared.catalog.put_placement(g, site, &p) {
        Ok(()) => shared.changed(),
        Err(e) => warn!(site, "recording drift: {e}"),
    }
}

/// The part of an agent's inventory the catalog can vouch for: images that belong at the
/// site (it has a placement there), each once, in a version that exists with the manifest
/// the agent names. The rest is dropped: an agent cannot make the engine use chunks of
/// images it was never sent as delta bases, nor make it look up more than the site's own
/// placements (one hash lookup per entry, whatever the list's length).
fn believable(shared: &Shared, site: &str, images: Vec<HeldImage>) -> Vec<HeldImage> {
    let placements: std::collections::HashMap<_, _> = match shared.catalog.placements_at(site) {
        Ok(p) => p.into_iter().collect(),
        Err(e) => {
            warn!(site, "reading placements: {e}");
            return Vec::new();
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for h in images {
        let Some(p) = placements.get(&h.global_id) else {
            continue;
        };
        if h.version == 0 || h.version > p.version.max(p.published_version.unwrap_or(0)) {
            continue;
        }
        if !seen.insert(h.global_id) {
            continue;
        }
        let known = shared
            .catalog
            .manifest(&h.global_id, h.version)
            .ok()
            .flatten()
            .is_some_and(|m| m.manifest_id == h.manifest_id);
        if known && h.local_id.len() <= seedcast_core::protocol::MAX_LOCAL_ID {
            out.push(h);
        }
    }
    out
}

/// An agent that reports holding the version that belongs at its site (for example after
/// the engine restarted between the agent publishing and the engine recording it) is
/// recorded as published there without sending anything.
fn reconcile_inventory(shared: &Shared, site: &str, images: &[HeldImage]) {
    // What the catalog says is published here but the site no longer holds (its disk was
    // wiped, its database restored from an older copy) is deployed again.
    if let Ok(placements) = shared.catalog.placements_at(site) {
        for (g, mut p) in placements {
            if !matches!(p.state, PlacementState::Published | PlacementState::Drifted) {
                continue;
            }
            let held = images.iter().find(|h| h.global_id == g);
            if held.is_some_and(|h| Some(h.version) == p.published_version) {
                continue;
            }
            info!(site, global_id = %g, "the site no longer holds its image; deploying it again");
            p.state = PlacementState::Pending;
            p.published_version = held.map(|h| h.version);
            p.local_id = held.map(|h| h.local_id.clone());
            p.error = None;
            if let Err(e) = shared.catalog.put_placement(&g, site, &p) {
                warn!(site, "recording a lost image: {e}");
            }
        }
    }
    for held in images {
        let Ok(Some(mut p)) = shared.catalog.placement(&held.global_id, site) else {
            continue;
        };
        let Ok(Some(m)) = shared.catalog.manifest(&held.global_id, held.version) else {
            continue;
        };
        if p.version != held.version || m.manifest_id != held.manifest_id {
            continue;
        }
        // Still the same copy: published stays published, and drifted stays drifted until
        // the site replaces the copy (a repair publishes it under a new local id).
        if matches!(p.state, PlacementState::Published | PlacementState::Drifted)
            && p.local_id.as_deref() == Some(&held.local_id)
        {
            continue;
        }
        p.state = PlacementState::Published;
        p.local_id = Some(held.local_id.clone());
        p.published_version = Some(held.version);
        p.error = None;
        if let Err(e) = shared.catalog.put_placement(&held.global_id, site, &p) {
            warn!(site, "recording reported image: {e}");
        }
    }
}
