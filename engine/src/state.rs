//! What every task of a running engine shares: the catalog, the chunk store, the PKI, the
//! connected agents and the counters status reads.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use seedcast_core::GlobalId;
use seedcast_net::pki::EnginePki;
use tokio::sync::{Notify, watch};

use crate::catalog::Catalog;
use crate::config::EngineConfig;
use crate::delta::DeltaCache;
use crate::store::PackStore;

/// A connected agent, as the rest of the engine sees it.
#[derive(Debug, Clone)]
pub(crate) struct AgentHandle {
    pub conn_id: u64,
    pub conn: quinn::Connection,
    /// Wakes the site's worker when new work for it is committed.
    pub wake: Arc<Notify>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub id: String,
    pub cfg: EngineConfig,
    pub catalog: Arc<Catalog>,
    pub store: Arc<PackStore>,
    /// The store as sites' data streams read it: one read per chunk for every site.
    pub reads: Arc<crate::shared_reads::SharedReads>,
    pub pki: EnginePki,
    /// Signs every manifest sent to a site (`DATA/signing.key`, apart from the TLS keys).
    pub signer: seedcast_net::signing::ManifestSigner,
    pub agents: Mutex<HashMap<String, AgentHandle>>,
    /// Bumped on every placement change; watchers wait on it.
    pub changes: watch::Sender<u64>,
    pub live: LiveBytes,
    pub next_transfer: AtomicU64,
    pub next_conn: AtomicU64,
    pub delta: Arc<DeltaCache>,
    /// Held while a version is made: one writer for versions and chunk reference counts.
    pub versions: Mutex<()>,
    /// Held while a site record is read and rewritten (enroll, renew, reset, revoke, an
    /// agent registering), so no update undoes another (a revocation is never lost).
    pub site_records: Mutex<()>,
}

impl Shared {
    pub fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn wake_site(&self, site: &str) {
        if let Some(h) = self.agents.lock().get(site) {
            h.wake.notify_one();
        }
    }

    pub fn next_transfer(&self) -> u64 {
        self.next_transfer.fetch_add(1, Ordering::Relaxed)
    }
}

/// Bytes sent so far by each transfer in flight, by (image, site): the send path adds to its
/// counter without a lock; status reads them.
#[derive(Debug, Default)]
pub(crate) struct LiveBytes(Mutex<HashMap<(GlobalId, String), Arc<AtomicU64>>>);

impl LiveBytes {
    /// Start counting a transfer; the count disappears when the guard drops.
    pub fn start(&self, g: GlobalId, site: &str) -> LiveGuard<'_> {
        let counter = Arc::new(AtomicU64::new(0));
        self.0.lock().insert((g, site.to_string()), counter.clone());
        LiveGuard {
            live: self,
            key: (g, site.to_string()),
            counter,
        }
    }

    /// Bytes sent so far to `site` for `g`, if a transfer is in flight.
    pub fn get(&self, g: &GlobalId, site: &str) -> Option<u64> {
        self.0
            .lock()
            .get(&(*g, site.to_string()))
            .map(|c| c.load(Ordering::Relaxed))
    }
}

/// One transfer's live byte count.
#[derive(Debug)]
pub(crate) struct LiveGuard<'a> {
    live: &'a LiveBytes,
    key: (GlobalId, String),
    pub counter: Arc<AtomicU64>,
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        let mut m = self.live.0.lock();
        if m.get(&self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.counter))
        {
            m.remove(&self.key);
        }
    }
}
