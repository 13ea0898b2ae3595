//! An engine and agents in one process on 127.0.0.1 — real RocksDB on disk, real QUIC
//! sockets, real image services — for the demo, the integration tests and the benchmarks.
//!
//! Each site's adapter is built from an [`AdapterConfig`] (a dir pool under the cluster's
//! root by default). Dropping a cluster asks every task to stop; [`LocalCluster::shutdown`]
//! also waits until they have.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use seedcast_agents::adapters::{AdapterConfig, DirOptions};
use seedcast_agents::{Adapter, Agent, AgentConfig, AgentError};
use seedcast_engine::{Engine, EngineConfig, EngineError};
use seedcast_net::pki::Token;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use seedcast_core::GlobalId;
use seedcast_core::protocol::{ImageStatus, PlacementState};

use crate::client::{Client, ClientError};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("adapter: {0}")]
    Adapter(#[from] seedcast_agents::AdapterError),
    #[error("{0}")]
    Timeout(String),
}

#[derive(Debug)]
struct Running<T> {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<T>,
}

impl<T> Running<T> {
    /// Ask the task to stop without waiting for it.
    fn signal(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Ask the task to stop and wait for how it ended.
    async fn stop(mut self) -> Option<T> {
        self.signal();
        self.task.await.ok()
    }
}

/// One site's agent.
#[derive(Debug)]
pub struct LocalAgent {
    pub site: String,
    pub data: PathBuf,
    /// The directory the cluster gives this site's service (a dir adapter's pool).
    pub pool: PathBuf,
    pub adapter: Arc<dyn Adapter>,
    pub agent: Agent,
    run: Option<Running<Result<(), AgentError>>>,
}

impl LocalAgent {
    pub fn is_running(&self) -> bool {
        self.run.as_ref().is_some_and(|r| !r.task.is_finished())
    }
}

/// How the cluster's engine is configured, kept so a restart opens it the same way.
#[derive(Clone)]
struct EngineSetup(Arc<dyn Fn(&mut EngineConfig) + Send + Sync>);

impl std::fmt::Debug for EngineSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineSetup")
    }
}

#[derive(Debug)]
pub struct LocalCluster {
    pub root: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    configure: EngineSetup,
    pub engine_addr: SocketAddr,
    pub admin: Token,
    engine: Option<Running<Result<(), EngineError>>>,
    pub agents: Vec<LocalAgent>,
}

impl LocalCluster {
    /// Start an engine and one agent per site under `root` (a temporary directory if
    /// `None`), and wait until every agent is connected.
    pub async fn start(
        root: Option<PathBuf>,
        sites: &[&str],
    ) -> Result<LocalCluster, ClusterError> {
        Self::start_with(root, sites, |_| {}).await
    }

    /// As [`LocalCluster::start`], with the engine's configuration adjusted by `configure`
    /// (kept for restarts).
    pub async fn start_with(
        root: Option<PathBuf>,
        sites: &[&str],
        configure: impl Fn(&mut EngineConfig) + Send + Sync + 'static,
    ) -> Result<LocalCluster, ClusterError> {
        let (root, tmp) = match root {
            Some(r) => {
                std::fs::create_dir_all(&r)?;
                (r, None)
            }
            None => {
                let t = tempfile::Builder::new().prefix("seedcast-").tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let configure = EngineSetup(Arc::new(configure));
        let mut cfg = EngineConfig::new(root.join("engine"));
        (configure.0)(&mut cfg);
        let engine = Engine::open(cfg)?;
        let mut c = LocalCluster {
            root,
            _tmp: tmp,
            configure,
            engine_addr: "127.0.0.1:0".parse().expect("literal"),
            admin: engine.admin_token().clone(),
            engine: None,
            agents: Vec::new(),
        };
        c.run_engine(engine)?;
        for s in sites {
            c.add_agent(s).await?;
        }
        c.wait_connected(sites.len(), Duration::from_secs(30))
            .await?;
        Ok(c)
    }

    fn run_engine(&mut self, engine: Engine) -> Result<(), ClusterError> {
        let ep = engine.bind(self.engine_addr)?;
        self.engine_addr = ep.local_addr()?;
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(engine.run(ep, async {
            let _ = rx.await;
        }));
        self.engine = Some(Running {
            stop: Some(tx),
            task,
        });
        Ok(())
    }

    pub fn engine_dir(&self) -> PathBuf {
        self.root.join("engine")
    }

    /// Stop the engine and wait until it has closed its data directory.
    pub async fn stop_engine(&mut self) -> Result<(), ClusterError> {
        if let Some(e) = self.engine.take()
            && let Some(r) = e.stop().await
        {
            r?;
        }
        Ok(())
    }

    /// Start the engine again on the same data directory and address.
    pub async fn restart_engine(&mut self) -> Result<(), ClusterError> {
        self.stop_engine().await?;
        let mut cfg = EngineConfig::new(self.engine_dir());
        (self.configure.0)(&mut cfg);
        let engine = Engine::open(cfg)?;
        self.run_engine(engine)
    }

    /// The directory a site's service keeps its images in, under the cluster's root.
    pub fn pool_dir(&self, site: &str) -> PathBuf {
        self.root.join("pools").join(site)
    }

    /// Enroll and start an agent for `site` with a dir pool.
    pub async fn add_agent(&mut self, site: &str) -> Result<(), ClusterError> {
        let pool = self.pool_dir(site);
        self.add_agent_with(site, &AdapterConfig::Dir(DirOptions { pool }))
            .await
    }

    /// Enroll and start an agent for `site` whose service is built from `adapter`.
    pub async fn add_agent_with(
        &mut self,
        site: &str,
        adapter: &AdapterConfig,
    ) -> Result<(), ClusterError> {
        let adapter = adapter.build(&self.root.join("agents").join(site), site)?;
        self.add_agent_using(site, adapter).await
    }

    /// Enroll and start an agent for `site` with an adapter already built.
    pub async fn add_agent_using(
        &mut self,
        site: &str,
        adapter: Arc<dyn Adapter>,
    ) -> Result<(), ClusterError> {
        let data = self.root.join("agents").join(site);
        let pool = self.pool_dir(site);
        let token = self.site_token(site).await?;
        let cfg = AgentConfig::new(&data, self.engine_addr.to_string(), site, Some(token));
        let agent = Agent::open(cfg, adapter.clone())?;
        // Enroll now, so errors surface here and the site is known before any push.
        agent.credentials().await?;
        let mut a = LocalAgent {
            site: site.to_string(),
            data,
            pool,
            adapter,
            agent,
            run: None,
        };
        Self::spawn_agent(&mut a);
        self.agents.push(a);
        Ok(())
    }

    /// A site token for `site`, made through the admin API as an operator would.
    pub async fn site_token(&self, site: &str) -> Result<Token, ClusterError> {
        let client = self.client().await?;
        let made = client.site_add(site, 3600).await;
        client.close().await;
        let (text, _) = made?;
        text.parse()
            .map_err(|e| ClusterError::Agent(AgentError::Pki(e)))
    }

    fn spawn_agent(a: &mut LocalAgent) {
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(a.agent.clone().run(async {
            let _ = rx.await;
        }));
        a.run = Some(Running {
            stop: Some(tx),
            task,
        });
    }

    pub fn agent(&self, site: &str) -> &LocalAgent {
        self.agents
            .iter()
            .find(|a| a.site == site)
            .expect("no such site in this cluster")
    }

    fn agent_mut(&mut self, site: &str) -> &mut LocalAgent {
        self.agents
            .iter_mut()
            .find(|a| a.site == site)
            .expect("no such site in this cluster")
    }

    /// Stop one agent (its site goes offline); returns how its run ended.
    pub async fn stop_agent(&mut self, site: &str) -> Option<Result<(), AgentError>> {
        let a = self.agent_mut(site);
        match a.run.take() {
            Some(r) => r.stop().await,
            None => None,
        }
    }

    /// Stop one agent and forget it (its database is closed; its data directory and pool
    /// stay), e.g. to run the site's agent another way; returns how its run ended.
    pub async fn remove_agent(&mut self, site: &str) -> Option<Result<(), AgentError>> {
        let ended = self.stop_agent(site).await;
        self.agents.retain(|a| a.site != site);
        ended
    }

    /// Wait for an agent to stop by itself (a fatal error); returns how its run ended.
    pub async fn agent_exit(&mut self, site: &str) -> Option<Result<(), AgentError>> {
        let a = self.agent_mut(site);
        match a.run.take() {
            Some(r) => r.task.await.ok(),
            None => None,
        }
    }

    /// Start a stopped agent again with the same data directory.
    pub fn resume_agent(&mut self, site: &str) {
        let a = self.agent_mut(site);
        if a.run.is_none() {
            Self::spawn_agent(a);
        }
    }

    pub async fn client(&self) -> Result<Client, ClusterError> {
        Ok(Client::connect(&self.engine_addr.to_string(), &self.admin).await?)
    }

    /// Wait until at least `n` sites are connected.
    pub async fn wait_connected(&self, n: usize, timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(c) = self.client().await {
                let sites = c.sites().await;
                c.close().await;
                if sites?.iter().filter(|s| s.connected).count() >= n {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Timeout(format!(
                    "fewer than {n} agents connected after {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The published directory of `local_id` at `site`.
    pub fn published_dir(&self, site: &str, local_id: &str) -> PathBuf {
        self.agent(site).pool.join(local_id)
    }

    /// Poll status until every site in `sites` has published `version` of `g`; returns
    /// that status.
    pub async fn wait_published(
        &self,
        client: &Client,
        g: &GlobalId,
        version: u32,
        sites: &[&str],
        timeout: Duration,
    ) -> Result<ImageStatus, ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = client.status(g).await?;
            let done = sites.iter().all(|site| {
                s.sites.iter().any(|p| {
                    p.site == *site && p.version == version && p.state == PlacementState::Published
                })
            });
            if done {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Timeout(format!(
                    "{sites:?} did not publish {g} version {version} within {timeout:?}: {s:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop every agent and the engine.
    pub async fn shutdown(mut self) -> Result<(), ClusterError> {
        for a in &mut self.agents {
            if let Some(r) = a.run.take() {
                r.stop().await;
            }
        }
        self.stop_engine().await
    }
}

impl Drop for LocalCluster {
    /// A cluster dropped without [`LocalCluster::shutdown`] (a test that failed half-way)
    /// still tells every task to stop, so nothing keeps serving its data directory.
    fn drop(&mut self) {
        for a in &mut self.agents {
            if let Some(r) = a.run.as_mut() {
                r.signal();
            }
        }
        if let Some(e) = self.engine.as_mut() {
            e.signal();
        }
    }
}

/// BLAKE3 of a file's bytes (read in 1 MiB blocks).
pub fn file_hash(path: &Path) -> std::io::Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    Ok(h.finalize())
}
