//! The agent: its configuration, its database and its site's adapter.
//!
//! What it does lives beside it: [`crate::connect`] (enroll, dial, reconnect),
//! [`crate::session`] (one connection's control loop) and [`crate::deploy`] (one
//! deployment).

use std::sync::Arc;

use crate::adapter::Adapter;
use crate::cache::AgentDb;
use crate::config::AgentConfig;
use crate::error::AgentError;

#[derive(Debug, Clone)]
pub struct Agent {
    pub(crate) cfg: AgentConfig,
    pub(crate) db: Arc<AgentDb>,
    pub(crate) adapter: Arc<dyn Adapter>,
}

impl Agent {
    /// Check the configuration and open the agent's database in its data directory.
    pub fn open(cfg: AgentConfig, adapter: Arc<dyn Adapter>) -> Result<Agent, AgentError> {
        seedcast_net::pki::validate_site_name(&cfg.site)?;
        if let Some(t) = &cfg.token
            && !t.kind.enrolls()
        {
            return Err(AgentError::Config(
                "this is an admin token; agents enroll with a site token (`seedcast site add NAME`)"
                    .into(),
            ));
        }
        std::fs::create_dir_all(&cfg.data)
            .map_err(|e| AgentError::Config(format!("{}: {e}", cfg.data.display())))?;
        let db = Arc::new(AgentDb::open(&cfg.data.join("db"))?);
        Ok(Agent { cfg, db, adapter })
    }

    pub fn db(&self) -> &Arc<AgentDb> {
        &self.db
    }

    pub fn adapter(&self) -> &Arc<dyn Adapter> {
        &self.adapter
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }
}
