//! seedcast-engine: the management node.
//!
//! It owns the catalog ([`catalog`], RocksDB) and the chunk store ([`store`], pack files);
//! accepts clients and agents over QUIC ([`server`]); answers client requests
//! ([`client_api`]); keeps a session with every connected agent and deploys image versions to
//! it ([`agent_session`], [`distribute`], as deltas where the site holds an earlier version:
//! [`delta`]); and reports where every image is ([`status`]).
//!
//! Start at [`Engine::open`] and [`Engine::run`]: the server takes its endpoint and a
//! shutdown future (as mini-redis' `server::run`), so tests bind port 0 and stop it cleanly.

pub mod adapt;
pub mod agent_session;
pub mod catalog;
pub mod client_api;
pub mod delta;
pub mod distribute;
pub mod error;
pub mod server;
pub mod status;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use seedcast_core::{ChunkerConfig, GlobalId};
use seedcast_net::endpoint::TransportOptions;
use seedcast_net::pki::{EnginePki, Token};
use tokio::sync::{Notify, watch};

pub use error::EngineError;

use catalog::Catalog;
use store::ChunkStore;

/// How an engine runs. Defaults suit a management node seeding a handful of sites.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Data directory: catalog, packs, CA and tokens.
    pub data: PathBuf,
    /// Chunking pushes must use (sent to clients in the handshake). Default: FastCDC
    /// 16/64/256 KiB, holes of 32 KiB and more.
    pub chunking: ChunkerConfig,
    pub transport: TransportOptions,
    /// Parallel unidirectional streams per transfer to one site. 4: enough to keep one
    /// connection busy; one connection is driven by one task, so more streams do not add CPU.
    pub streams_per_transfer: usize,
    /// zstd level of delta groups sent to sites that hold an earlier version. 19: updates
    /// are for thin links, the work is done once for every site, and 19 is what
    /// `zstd --patch-from` users pick; 12 is about 7× faster for ~10 % more bytes.
    pub delta_level: i32,
}

impl EngineConfig {
    pub fn new(data: impl Into<PathBuf>) -> Self {
        EngineConfig {
            data: data.into(),
            chunking: ChunkerConfig::default(),
            transport: TransportOptions::default(),
            streams_per_transfer: 4,
            delta_level: 19,
        }
    }
}

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
    pub catalog: Catalog,
    pub store: ChunkStore,
    pub pki: EnginePki,
    pub agents: Mutex<HashMap<String, AgentHandle>>,
    /// Bumped on every placement change; watchers wait on it.
    pub changes: watch::Sender<u64>,
    /// Bytes sent so far by transfers in flight, by (image, site).
    pub live: Mutex<HashMap<(GlobalId, String), u64>>,
    pub next_transfer: AtomicU64,
    pub next_conn: AtomicU64,
    pub delta: delta::DeltaCache,
    /// Held while a new version is built and committed.
    pub versions: Mutex<()>,
}

impl Shared {
    pub fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn wake_site(&self, site: &str) {
        if let Some(h) = self.agents.lock().expect("agents lock").get(site) {
            h.wake.notify_one();
        }
    }
}

/// The engine: open it on a data directory, bind an endpoint, run it.
#[derive(Debug, Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Open (or initialise) the engine's data directory: catalog, packs, CA, tokens.
    pub fn open(cfg: EngineConfig) -> Result<Engine, EngineError> {
        cfg.chunking
            .validate()
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        std::fs::create_dir_all(&cfg.data)?;
        let pki = EnginePki::load_or_create(&cfg.data)?;
        let catalog = Catalog::open(&cfg.data.join("catalog"))?;
        let store = ChunkStore::open(&cfg.data.join("packs"), &catalog)?;
        let id = catalog.engine_id()?;
        let (changes, _) = watch::channel(0);
        Ok(Engine {
            shared: Arc::new(Shared {
                id,
                cfg,
                catalog,
                store,
                pki,
                agents: Mutex::new(HashMap::new()),
                changes,
                live: Mutex::new(HashMap::new()),
                next_transfer: AtomicU64::new(1),
                next_conn: AtomicU64::new(1),
                delta: delta::DeltaCache::default(),
                versions: Mutex::new(()),
            }),
        })
    }

    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The token agents enroll with (also in `DATA/join.token`).
    pub fn join_token(&self) -> &Token {
        &self.shared.pki.join
    }

    /// The token clients use (also in `DATA/admin.token`).
    pub fn admin_token(&self) -> &Token {
        &self.shared.pki.admin
    }

    /// A QUIC endpoint on `addr` with the engine's TLS configuration.
    pub fn bind(&self, addr: SocketAddr) -> Result<quinn::Endpoint, EngineError> {
        let sc = seedcast_net::tls::server_config(&self.shared.pki, &self.shared.cfg.transport)?;
        Ok(seedcast_net::endpoint::server(
            addr,
            sc,
            &self.shared.cfg.transport,
        )?)
    }

    /// Serve on `endpoint` until `shutdown` completes; then close every connection and
    /// return once every task has stopped (so the data directory can be reopened).
    pub async fn run(
        self,
        endpoint: quinn::Endpoint,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), EngineError> {
        server::run(self.shared, endpoint, shutdown).await
    }

    /// Chunks held in the store (for tests and status).
    pub fn chunk_count(&self) -> usize {
        self.shared.store.len()
    }

    pub(crate) fn next_transfer(shared: &Shared) -> u64 {
        shared.next_transfer.fetch_add(1, Ordering::Relaxed)
    }
}
