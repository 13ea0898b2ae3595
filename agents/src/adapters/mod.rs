//! The adapters, one module per kind of local image service, and the factory that builds one
//! from its options.
//!
//! - [`dir`]: raw files in a directory pool; each image a directory named by a UUID.
//! - [`memory`]: images kept in memory, for tests of the agent itself (not a site service).
//!
//! Each adapter has its own options struct; [`AdapterConfig`] names the kind and carries
//! them, read from the command line ([`AdapterConfig::from_flags`]) or from the `[adapter]`
//! table of a site config file (`kind = "dir"`, then that kind's options; unknown keys are
//! refused).

pub mod dir;
pub mod memory;

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::adapter::{Adapter, AdapterError};

/// Options of the `dir` adapter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirOptions {
    /// The pool directory (created if missing). Images are staged in `POOL/.staging`, on
    /// the same filesystem, so publishing is a rename.
    pub pool: PathBuf,
}

/// A site's local image service and its options.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum AdapterConfig {
    Dir(DirOptions),
}

/// The kinds `--adapter` accepts.
pub const KINDS: &[&str] = &["dir"];

impl AdapterConfig {
    /// The name used on the command line and reported to the engine.
    pub fn kind(&self) -> &'static str {
        match self {
            AdapterConfig::Dir(_) => "dir",
        }
    }

    /// From the command line: `--adapter KIND` and that kind's flags.
    pub fn from_flags(kind: &str, pool: Option<PathBuf>) -> Result<Self, AdapterError> {
        match kind {
            "dir" => {
                let pool = pool.ok_or_else(|| {
                    AdapterError::Config("the dir adapter needs --pool DIR".into())
                })?;
                Ok(AdapterConfig::Dir(DirOptions { pool }))
            }
            other => Err(AdapterError::Config(format!(
                "unknown adapter {other:?} (available: {})",
                KINDS.join(", ")
            ))),
        }
    }

    /// Build the adapter (creating its pool, sweeping interrupted stagings).
    pub fn build(&self) -> Result<Arc<dyn Adapter>, AdapterError> {
        Ok(match self {
            AdapterConfig::Dir(o) => Arc::new(dir::DirAdapter::new(o.pool.clone())?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_tables_make_the_same_config_and_unknown_keys_are_refused() {
        let from_flags = AdapterConfig::from_flags("dir", Some("/srv/images".into())).unwrap();
        let from_file: AdapterConfig =
            toml::from_str("kind = \"dir\"\npool = \"/srv/images\"\n").unwrap();
        assert_eq!(from_flags, from_file);
        assert_eq!(from_file.kind(), "dir");
        let e = toml::from_str::<AdapterConfig>("kind = \"dir\"\npool = \"/p\"\npoll = 1\n")
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `poll`"), "{e}");
        let e = toml::from_str::<AdapterConfig>("kind = \"floppy\"\n").unwrap_err();
        assert!(e.to_string().contains("floppy"), "{e}");
        let e = AdapterConfig::from_flags("dir", None).unwrap_err();
        assert!(e.to_string().contains("--pool"), "{e}");
        let e = AdapterConfig::from_flags("floppy", None).unwrap_err();
        assert!(e.to_string().contains("available: dir"), "{e}");
    }

    #[test]
    fn building_creates_the_pool() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = tmp.path().join("pool");
        let a = AdapterConfig::Dir(DirOptions { pool: pool.clone() })
            .build()
            .unwrap();
        assert_eq!(a.kind(), "dir");
        assert!(pool.join(".staging").is_dir());
    }
}
