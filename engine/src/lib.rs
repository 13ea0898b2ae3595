//! seedcast-engine: the management node.
//!
//! Start at [`Engine::open`] and [`Engine::run`]: the server takes its endpoint and a
//! shutdown future (as mini-redis' `server::run`), so tests bind port 0 and stop it cleanly.
//!
//! The parts, from the socket inwards:
//! - [`server`]: accepts connections and hands each to its role; [`handshake`]: the hello
//!   exchange, refusals and close codes; [`sites`]: the site registry (enrollment, an
//!   agent's certificate check, revocation, push targets).
//! - [`client_api`]: one client session, dispatching requests to [`upload`] (chunks in,
//!   verified), [`versions`] (the one place a version is made: push and every block),
//!   [`adapt`] (what a block or rollback changes), and [`status`] (where images are).
//! - [`agent_session`]: one agent's session; [`distribute`]: its site worker, driving the
//!   sans-IO sender of `seedcast-core` for each deployment; [`data_streams`]: the data
//!   streams that carry the chunks; [`delta`]: delta groups against chunks a site holds.
//! - [`catalog`]: RocksDB records; [`store`]: the pack files, the first
//!   [`seedcast_core::source::ChunkStore`].
//! - [`config`], [`error`]: options and the error policy.

pub mod adapt;
pub mod agent_session;
pub mod catalog;
pub mod check;
pub mod client_api;
pub mod config;
pub mod data_streams;
pub mod delta;
pub mod distribute;
pub mod error;
pub mod handshake;
pub(crate) mod pacing;
pub mod probe;
pub mod server;
pub mod shared_reads;
pub mod sites;
mod state;
pub mod status;
pub mod store;
#[cfg(test)]
mod testutil;
pub mod upload;
pub mod versions;

use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use seedcast_core::source::ChunkStore;
use seedcast_net::pki::{EnginePki, Token};
use seedcast_net::signing::ManifestSigner;
use tokio::sync::watch;

pub use config::EngineConfig;
pub use error::EngineError;

use catalog::Catalog;
use state::Shared;
use store::PackStore;

/// The engine: open it on a data directory, bind an endpoint, run it.
#[derive(Debug, Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Open (or initialise) the engine's data directory: catalog, packs, CA, tokens.
    pub fn open(cfg: EngineConfig) -> Result<Engine, EngineError> {
        cfg.chunking.validate()?;
        std::fs::create_dir_all(&cfg.data)?;
        let pki = EnginePki::load_or_create(&cfg.data, cfg.open_enrollment)?;
        let signer = ManifestSigner::load_or_create(&cfg.data.join("signing.key"))?;
        let catalog = Arc::new(Catalog::open(&cfg.data.join("catalog"))?);
        let store = Arc::new(PackStore::open(&cfg.data.join("packs"), catalog.clone())?);
        let reads = Arc::new(shared_reads::SharedReads::new(
            store.clone(),
            cfg.read_cache,
        ));
        let id = catalog.engine_id()?;
        let (changes, _) = watch::channel(0);
        let cfg_max_rate = cfg.max_rate;
        Ok(Engine {
            shared: Arc::new(Shared {
                id,
                cfg,
                catalog,
                store,
                reads,
                pki,
                signer,
                agents: Mutex::new(HashMap::new()),
                changes,
                live: Default::default(),
                next_transfer: AtomicU64::new(1),
                next_conn: AtomicU64::new(1),
                delta: Default::default(),
                versions: Mutex::new(()),
                site_records: Mutex::new(()),
                limits: pacing::Limits::new(cfg_max_rate),
            }),
        })
    }

    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The token any new site enrolls with under open enrollment (also in
    /// `DATA/join.token`); `None` otherwise.
    pub fn join_token(&self) -> Option<&Token> {
        self.shared.pki.join.as_ref()
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
}
