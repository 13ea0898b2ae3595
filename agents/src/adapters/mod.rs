//! The adapters, one module per kind of local image service, and the factory that builds one
//! from its options.
//!
//! - [`dir`]: files in a directory pool as they were pushed; each image a directory named
//!   by a UUID.
//! - [`qcow2`]: disks as qcow2 files (libvirt/KVM hosts), updates optionally as overlays.
//! - [`memory`]: images kept in memory, for tests of the agent itself (not a site service).
//! - [`local`]: what the file-keeping adapters share (sidecar, qcow2 writing, read-back).
//!
//! Each adapter has its own options struct; [`AdapterConfig`] names the kind and carries
//! them, read from the command line ([`AdapterConfig::from_flags`]) or from the `[adapter]`
//! table of a site config file (`kind = "dir"`, then that kind's options; unknown keys are
//! refused).

pub mod dir;
pub mod local;
pub mod memory;
pub mod qcow2;

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::adapter::{Adapter, AdapterError};
pub use qcow2::{Compress, Qcow2Options};

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
    Qcow2(Qcow2Options),
}

/// The kinds `--adapter` accepts.
pub const KINDS: &[&str] = &["dir", "qcow2"];

/// Every adapter option the command line can give; each kind takes its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdapterFlags {
    /// `--pool DIR` (dir, qcow2).
    pub pool: Option<PathBuf>,
    /// `--compress zstd` (qcow2).
    pub compress: Option<String>,
    /// `--overlays` (qcow2).
    pub overlays: bool,
}

impl AdapterConfig {
    /// The name used on the command line and reported to the engine.
    pub fn kind(&self) -> &'static str {
        match self {
            AdapterConfig::Dir(_) => "dir",
            AdapterConfig::Qcow2(_) => "qcow2",
        }
    }

    /// From the command line: `--adapter KIND` and that kind's flags (a flag another kind
    /// takes is refused, not ignored).
    pub fn from_flags(kind: &str, flags: AdapterFlags) -> Result<Self, AdapterError> {
        let pool = |kind: &str| {
            flags
                .pool
                .clone()
                .ok_or_else(|| AdapterError::Config(format!("the {kind} adapter needs --pool DIR")))
        };
        let refuse = |flag: &str| {
            Err(AdapterError::Config(format!(
                "--{flag} is not an option of the {kind} adapter"
            )))
        };
        match kind {
            "dir" => {
                if flags.compress.is_some() {
                    return refuse("compress");
                }
                if flags.overlays {
                    return refuse("overlays");
                }
                Ok(AdapterConfig::Dir(DirOptions { pool: pool(kind)? }))
            }
            "qcow2" => Ok(AdapterConfig::Qcow2(Qcow2Options {
                pool: pool(kind)?,
                compress: flags.compress.as_deref().map(str::parse).transpose()?,
                overlays: flags.overlays,
            })),
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
            AdapterConfig::Qcow2(o) => Arc::new(qcow2::Qcow2Adapter::new(o.clone())?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_tables_make_the_same_config_and_unknown_keys_are_refused() {
        let dir = |pool: Option<&str>| AdapterFlags {
            pool: pool.map(Into::into),
            ..Default::default()
        };
        let from_flags = AdapterConfig::from_flags("dir", dir(Some("/srv/images"))).unwrap();
        let from_file: AdapterConfig =
            toml::from_str("kind = \"dir\"\npool = \"/srv/images\"\n").unwrap();
        assert_eq!(from_flags, from_file);
        assert_eq!(from_file.kind(), "dir");
        let e = toml::from_str::<AdapterConfig>("kind = \"dir\"\npool = \"/p\"\npoll = 1\n")
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `poll`"), "{e}");
        let e = toml::from_str::<AdapterConfig>("kind = \"floppy\"\n").unwrap_err();
        assert!(e.to_string().contains("floppy"), "{e}");
        let e = AdapterConfig::from_flags("dir", dir(None)).unwrap_err();
        assert!(e.to_string().contains("--pool"), "{e}");
        let e = AdapterConfig::from_flags("floppy", dir(None)).unwrap_err();
        assert!(e.to_string().contains("available: dir, qcow2"), "{e}");
        let e = AdapterConfig::from_flags(
            "dir",
            AdapterFlags {
                overlays: true,
                ..dir(Some("/p"))
            },
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("--overlays is not an option of the dir"),
            "{e}"
        );
        let q = AdapterConfig::from_flags(
            "qcow2",
            AdapterFlags {
                compress: Some("zstd".into()),
                overlays: true,
                ..dir(Some("/p"))
            },
        )
        .unwrap();
        let from_file: AdapterConfig = toml::from_str(
            "kind = \"qcow2\"\npool = \"/p\"\ncompress = \"zstd\"\noverlays = true\n",
        )
        .unwrap();
        assert_eq!(q, from_file);
        let e = AdapterConfig::from_flags(
            "qcow2",
            AdapterFlags {
                compress: Some("lz4".into()),
                ..dir(Some("/p"))
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("lz4"), "{e}");
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
