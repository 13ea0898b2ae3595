//! How an agent runs: [`AgentConfig`] for the library, and [`SiteConfig`], the site config
//! file (`seedcast agent --config site.toml`) whose values the command line may override.
//!
//! ```toml
//! site = "site-a"                          # a-z, 0-9, '-', '_'
//! engine = "engine.example.net:7447"
//! data = "/var/lib/seedcast/agent"         # site certificate and the agent database
//! token = "/etc/seedcast/join.token"       # the token's path (or its text); only to enroll
//!
//! [adapter]                                # the site's image service and its options
//! kind = "dir"
//! pool = "/srv/images"
//! ```
//!
//! Unknown keys are refused, so a typo cannot silently fall back to a default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use seedcast_net::endpoint::TransportOptions;
use seedcast_net::pki::Token;
use serde::Deserialize;

use crate::adapters::AdapterConfig;
use crate::error::AgentError;

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Data directory: credentials and the agent database.
    pub data: PathBuf,
    /// The engine's address, `host:port`.
    pub engine: String,
    /// The site token (or, at an engine with open enrollment, the join token); needed
    /// only until the site is enrolled.
    pub token: Option<Token>,
    pub site: String,
    pub transport: TransportOptions,
    /// Longest wait between reconnection attempts. 5 s.
    pub reconnect_max: Duration,
    /// Caps on what a manifest may make this site write (a deployment over them fails,
    /// naming the cap).
    pub limits: seedcast_core::manifest::Limits,
}

impl AgentConfig {
    pub fn new(
        data: impl Into<PathBuf>,
        engine: impl Into<String>,
        site: impl Into<String>,
        token: Option<Token>,
    ) -> Self {
        AgentConfig {
            data: data.into(),
            engine: engine.into(),
            token,
            site: site.into(),
            transport: TransportOptions::default(),
            limits: Default::default(),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

/// A site's settings as a file or the command line give them; every field optional so the
/// two can be layered ([`SiteConfig::overlay`]) before [`SiteConfig::resolve`] checks that
/// nothing is missing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub site: Option<String>,
    pub engine: Option<String>,
    pub data: Option<PathBuf>,
    /// The join token's text, or the path of a file holding it.
    pub token: Option<String>,
    pub adapter: Option<AdapterConfig>,
}

/// The settings an agent ran with (site, engine, data, adapter; never a token), kept in its
/// data directory at each start so `seedcast check --data DIR` reaches the same service.
pub const SAVED_CONFIG: &str = "agent.toml";

impl SiteConfig {
    /// Keep the resolved settings in `cfg.data` ([`SAVED_CONFIG`]).
    pub fn save(cfg: &AgentConfig, adapter: &AdapterConfig) -> Result<(), AgentError> {
        let saved = SiteConfig {
            site: Some(cfg.site.clone()),
            engine: Some(cfg.engine.clone()),
            data: Some(cfg.data.clone()),
            token: None,
            adapter: Some(adapter.clone()),
        };
        let text = toml::to_string(&saved).map_err(|e| AgentError::Config(e.to_string()))?;
        let text = format!(
            "# Written by `seedcast agent` at each start; read by `seedcast check`.\n{text}"
        );
        std::fs::create_dir_all(&cfg.data)
            .map_err(|e| AgentError::Config(format!("{}: {e}", cfg.data.display())))?;
        seedcast_net::pki::write_private(&cfg.data.join(SAVED_CONFIG), text.as_bytes(), 0o600)?;
        Ok(())
    }

    /// The settings an agent saved in `data`, if it ever started there.
    pub fn saved(data: &Path) -> Result<Option<SiteConfig>, AgentError> {
        let p = data.join(SAVED_CONFIG);
        if !p.exists() {
            return Ok(None);
        }
        Self::load(&p).map(Some)
    }

    /// Parse a site config file's text.
    pub fn from_toml(text: &str) -> Result<Self, AgentError> {
        toml::from_str(text).map_err(|e| AgentError::Config(e.to_string()))
    }

    /// Read a site config file.
    pub fn load(path: &Path) -> Result<Self, AgentError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))
    }

    /// These settings, with every value `over` gives taking precedence.
    pub fn overlay(self, over: SiteConfig) -> SiteConfig {
        SiteConfig {
            site: over.site.or(self.site),
            engine: over.engine.or(self.engine),
            data: over.data.or(self.data),
            token: over.token.or(self.token),
            adapter: over.adapter.or(self.adapter),
        }
    }

    /// The agent's configuration and its adapter's, or an error naming what is missing.
    pub fn resolve(self) -> Result<(AgentConfig, AdapterConfig), AgentError> {
        let missing = |what: &str| {
            AgentError::Config(format!(
                "no {what}: give it on the command line or in the site config file"
            ))
        };
        let site = self.site.ok_or_else(|| missing("site name (--site)"))?;
        let engine = self
            .engine
            .ok_or_else(|| missing("engine address (--engine)"))?;
        let data = self
            .data
            .ok_or_else(|| missing("data directory (--data)"))?;
        let adapter = self
            .adapter
            .ok_or_else(|| missing("adapter (--adapter and its options, or an [adapter] table)"))?;
        let token = self
            .token
            .map(|t| Token::from_text_or_file(&t))
            .transpose()?;
        Ok((AgentConfig::new(data, engine, site, token), adapter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::DirOptions;

    const FILE: &str = r#"
site = "site-a"
engine = "127.0.0.1:7447"
data = "/var/lib/seedcast/agent"

[adapter]
kind = "dir"
pool = "/srv/images"
"#;

    #[test]
    fn a_site_file_resolves_and_flags_override_it() {
        let file = SiteConfig::from_toml(FILE).unwrap();
        let (cfg, adapter) = file.clone().resolve().unwrap();
        assert_eq!(cfg.site, "site-a");
        assert_eq!(cfg.engine, "127.0.0.1:7447");
        assert!(cfg.token.is_none());
        assert_eq!(
            adapter,
            AdapterConfig::Dir(DirOptions {
                pool: "/srv/images".into()
            })
        );
        let flags = SiteConfig {
            site: Some("site-b".into()),
            ..Default::default()
        };
        let (cfg, _) = file.overlay(flags).resolve().unwrap();
        assert_eq!(
            (cfg.site.as_str(), cfg.engine.as_str()),
            ("site-b", "127.0.0.1:7447")
        );
    }

    #[test]
    fn saved_settings_read_back_without_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let file = SiteConfig::from_toml(FILE).unwrap();
        let (mut cfg, adapter) = file.resolve().unwrap();
        cfg.data = dir.path().to_path_buf();
        SiteConfig::save(&cfg, &adapter).unwrap();
        let back = SiteConfig::saved(dir.path()).unwrap().unwrap();
        assert_eq!(back.adapter, Some(adapter));
        assert_eq!(back.site.as_deref(), Some("site-a"));
        assert_eq!(back.token, None);
        assert!(
            SiteConfig::saved(&dir.path().join("none"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn unknown_keys_and_missing_values_are_named() {
        let e = SiteConfig::from_toml(&format!("{FILE}\n[extra]\nx = 1\n")).unwrap_err();
        assert!(e.to_string().contains("unknown field `extra`"), "{e}");
        let e = SiteConfig::from_toml("sight = \"a\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `sight`"), "{e}");
        let e = SiteConfig::from_toml("site = \"a\"\n")
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("no engine address"), "{e}");
        let e = SiteConfig::from_toml(
            &FILE.replace("[adapter]\nkind = \"dir\"\npool = \"/srv/images\"\n", ""),
        )
        .unwrap()
        .resolve()
        .unwrap_err();
        assert!(e.to_string().contains("no adapter"), "{e}");
        let e = SiteConfig::load(Path::new("/nonexistent/site.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/site.toml"), "{e}");
    }
}
