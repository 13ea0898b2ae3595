//! One connected agent: greet it, learn what it holds, register it, and let its site worker
//! ([`crate::distribute`]) deploy whatever belongs there until the connection ends.

use std::sync::Arc;

use quinn::{Connection, RecvStream, SendStream, VarInt};
use seedcast_core::protocol::{AgentMsg, HeldImage, PlacementState, close};
use seedcast_net::{read_msg, read_msg_required, write_msg};
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

use crate::server::close_for_violation;
use crate::{AgentHandle, Shared, distribute};

pub(crate) async fn session(
    shared: Arc<Shared>,
    conn: Connection,
    conn_id: u64,
    site: String,
    adapter: String,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    if write_msg(&mut send, &crate::server::welcome(&shared))
        .await
        .is_err()
    {
        return;
    }
    let held = match read_msg_required::<AgentMsg>(&mut recv).await {
        Ok(AgentMsg::Inventory { images }) => {
            reconcile_inventory(&shared, &site, &images);
            images
                .iter()
                .map(|h| (h.global_id, (h.version, h.manifest_id)))
                .collect()
        }
        Ok(other) => {
            warn!(site, "expected Inventory, got {other:?}");
            conn.close(
                VarInt::from_u32(close::PROTOCOL),
                b"expected Inventory first",
            );
            return;
        }
        Err(e) => {
            if e.is_protocol_violation() {
                close_for_violation(&conn, &e);
            }
            return;
        }
    };

    let wake = Arc::new(Notify::new());
    let handle = AgentHandle {
        conn_id,
        conn: conn.clone(),
        wake: wake.clone(),
    };
    // The site may have moved to another kind of local service since it enrolled.
    if let Ok(Some(mut rec)) = shared.catalog.site(&site)
        && rec.adapter != adapter
    {
        rec.adapter = adapter.clone();
        if let Err(e) = shared.catalog.put_site(&site, &rec) {
            warn!(site, "recording adapter change: {e}");
        }
    }
    if let Some(old) = shared
        .agents
        .lock()
        .expect("agents lock")
        .insert(site.clone(), handle)
    {
        old.conn.close(
            VarInt::from_u32(close::REPLACED),
            b"a newer connection took over this site",
        );
    }
    info!(site, adapter, remote = %conn.remote_address(), "agent connected");
    shared.changed();

    let (tx, rx) = mpsc::channel(64);
    let reader = async {
        loop {
            match read_msg::<AgentMsg>(&mut recv).await {
                Ok(Some(m)) => {
                    if tx.send(m).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    };
    let worker = distribute::site_worker(&shared, &site, &conn, &mut send, rx, &wake, held);
    tokio::select! {
        r = reader => {
            if let Err(e) = r
                && e.is_protocol_violation()
            {
                close_for_violation(&conn, &e);
            }
        }
        r = worker => {
            if let Err(e) = r {
                match &e {
                    distribute::DeployError::Protocol(msg) => {
                        conn.close(VarInt::from_u32(close::PROTOCOL), msg.as_bytes());
                    }
                    distribute::DeployError::Framed(fe) if fe.is_protocol_violation() => {
                        close_for_violation(&conn, fe);
                    }
                    _ => {}
                }
                warn!(site, "site session ended: {e}");
            }
        }
    }
    {
        let mut agents = shared.agents.lock().expect("agents lock");
        if agents.get(&site).is_some_and(|h| h.conn_id == conn_id) {
            agents.remove(&site);
        }
    }
    info!(site, "agent disconnected");
    shared.changed();
}

/// An agent that reports holding the version that belongs at its site (for example after
/// the engine restarted between the agent publishing and the engine recording it) is
/// recorded as published there without sending anything.
fn reconcile_inventory(shared: &Shared, site: &str, images: &[HeldImage]) {
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
        if p.state == PlacementState::Published && p.local_id.as_deref() == Some(&held.local_id) {
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
