//! What every task of a running engine shares: the catalog, the chunk store, the PKI, the
//! connected agents and the counters status reads.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    /// The congestion controller the connection runs (an operator may change it).
    pub congestion: seedcast_net::congestion::Choice,
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
    /// Rate limits: engine-wide and per site.
    pub limits: crate::pacing::Limits,
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
/// counter without a lock; status reads them, and the rate from them.
#[derive(Debug, Default)]
pub(crate) struct LiveBytes(Mutex<HashMap<(GlobalId, String), Arc<LiveTransfer>>>);

/// One transfer in flight: its byte counter and the samples its rate is taken from.
#[derive(Debug)]
pub(crate) struct LiveTransfer {
    pub counter: Arc<AtomicU64>,
    started: Instant,
    samples: Mutex<std::collections::VecDeque<(Instant, u64)>>,
}

/// The rate is taken over about this much of the recent past.
const RATE_WINDOW: Duration = Duration::from_secs(5);

impl LiveTransfer {
    /// Bytes sent so far and the current rate (bytes per second): over the last seconds
    /// when status has been asked before (watchers ask every 200 ms), else since the start.
    fn read(&self, now: Instant) -> (u64, u64) {
        let bytes = self.counter.load(Ordering::Relaxed);
        let mut s = self.samples.lock();
        if s.back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_millis(100))
        {
            s.push_back((now, bytes));
        }
        while s.len() > 2
            && s.get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= RATE_WINDOW)
        {
            s.pop_front();
        }
        let (t0, b0) = match s.front() {
            Some(&(t, b)) if now.duration_since(t) >= Duration::from_secs(1) => (t, b),
            _ => (self.started, 0),
        };
        let secs = now.duration_since(t0).as_secs_f64();
        let rate = if secs >= 0.2 {
            (bytes.saturating_sub(b0) as f64 / secs) as u64
        } else {
            0
        };
        (bytes, rate)
    }
}

impl LiveBytes {
    /// Start counting a transfer; the count disappears when the guard drops.
    pub fn start(&self, g: GlobalId, site: &str) -> LiveGuard<'_> {
        let live = Arc::new(LiveTransfer {
            counter: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
            samples: Mutex::default(),
        });
        self.0.lock().insert((g, site.to_string()), live.clone());
        LiveGuard {
            live: self,
            key: (g, site.to_string()),
            counter: live.counter.clone(),
        }
    }

    /// Bytes sent so far to `site` for `g` and the current rate, if a transfer is in
    /// flight.
    pub fn get(&self, g: &GlobalId, site: &str) -> Option<(u64, u64)> {
        let t = self.0.lock().get(&(*g, site.to_string())).cloned()?;
        Some(t.read(Instant::now()))
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
            .is_some_and(|c| Arc::ptr_eq(&c.counter, &self.counter))
        {
            m.remove(&self.key);
        }
    }
}
