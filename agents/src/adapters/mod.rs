//! The adapters, one module per kind of local image service, and the factory that builds one
//! from its options.
//!
//! - [`dir`]: files in a directory pool as they were pushed; each image a directory named
//!   by a UUID.
//! - [`qcow2`]: disks as qcow2 files (libvirt/KVM hosts), updates optionally as overlays.
//! - [`oci`]: an OCI registry, images as KubeVirt containerDisks.
//! - [`s3`]: an S3-compatible object store, a key prefix per version.
//! - [`glance`]: OpenStack Glance (Keystone auth), an image per file, the disk's id.
//! - [`memory`]: images kept in memory, for tests of the agent itself (not a site service).
//! - [`local`]: what the file-keeping adapters share (sidecar, qcow2 writing, read-back).
//!
//! Each adapter has its own options struct; [`AdapterConfig`] names the kind and carries
//! them, read from the command line ([`AdapterConfig::from_flags`]) or from the `[adapter]`
//! table of a site config file (`kind = "dir"`, then that kind's options; unknown keys are
//! refused).

pub mod dir;
pub mod glance;
pub mod local;
pub mod memory;
pub mod oci;
pub mod qcow2;
pub mod s3;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::adapter::{Adapter, AdapterError};
pub use glance::{DiskFormat, GlanceOptions};
pub use oci::OciOptions;
pub use qcow2::{Compress, Qcow2Options};
pub use s3::S3Options;

/// Options of the `dir` adapter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DirOptions {
    /// The pool directory (created if missing). Images are staged in `POOL/.staging`, on
    /// the same filesystem, so publishing is a rename.
    pub pool: PathBuf,
}

/// A site's local image service and its options.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum AdapterConfig {
    Dir(DirOptions),
    Qcow2(Qcow2Options),
    Oci(OciOptions),
    S3(S3Options),
    Glance(GlanceOptions),
}

/// The kinds `--adapter` accepts.
pub const KINDS: &[&str] = &["dir", "qcow2", "glance", "oci", "s3"];

/// Every adapter option the command line can give; each kind takes its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdapterFlags {
    /// `--pool DIR` (dir, qcow2).
    pub pool: Option<PathBuf>,
    /// `--compress zstd` (qcow2).
    pub compress: Option<String>,
    /// `--overlays` (qcow2).
    pub overlays: bool,
    /// `--registry URL` (oci).
    pub registry: Option<String>,
    /// `--repository NAME` (oci).
    pub repository: Option<String>,
    /// `--auth-file FILE` (oci).
    pub auth_file: Option<PathBuf>,
    /// `--endpoint URL` (s3).
    pub endpoint: Option<String>,
    /// `--bucket NAME` (s3).
    pub bucket: Option<String>,
    /// `--prefix P` (s3).
    pub prefix: Option<String>,
    /// `--url URL` (glance).
    pub url: Option<String>,
    /// `--os-cloud NAME` (glance).
    pub os_cloud: Option<String>,
    /// `--disk-format raw|qcow2` (glance).
    pub disk_format: Option<String>,
}

impl AdapterFlags {
    /// The flags given, by name, that `kind` does not take.
    fn foreign(&self, kind: &str) -> Vec<&'static str> {
        let given = [
            ("pool", self.pool.is_some(), &["dir", "qcow2"][..]),
            ("compress", self.compress.is_some(), &["qcow2"][..]),
            ("overlays", self.overlays, &["qcow2"][..]),
            ("registry", self.registry.is_some(), &["oci"][..]),
            ("repository", self.repository.is_some(), &["oci"][..]),
            ("auth-file", self.auth_file.is_some(), &["oci"][..]),
            ("endpoint", self.endpoint.is_some(), &["s3"][..]),
            ("bucket", self.bucket.is_some(), &["s3"][..]),
            ("prefix", self.prefix.is_some(), &["s3"][..]),
            ("url", self.url.is_some(), &["glance"][..]),
            ("os-cloud", self.os_cloud.is_some(), &["glance"][..]),
            ("disk-format", self.disk_format.is_some(), &["glance"][..]),
        ];
        given
            .into_iter()
            .filter(|(_, set, kinds)| *set && !kinds.contains(&kind))
            .map(|(name, _, _)| name)
            .collect()
    }
}

impl AdapterConfig {
    /// The name used on the command line and reported to the engine.
    pub fn kind(&self) -> &'static str {
        match self {
            AdapterConfig::Dir(_) => "dir",
            AdapterConfig::Qcow2(_) => "qcow2",
            AdapterConfig::Oci(_) => "oci",
            AdapterConfig::S3(_) => "s3",
            AdapterConfig::Glance(_) => "glance",
        }
    }

    /// From the command line: `--adapter KIND` and that kind's flags (a flag another kind
    /// takes is refused, not ignored).
    pub fn from_flags(kind: &str, flags: AdapterFlags) -> Result<Self, AdapterError> {
        if !KINDS.contains(&kind) {
            return Err(AdapterError::Config(format!(
                "unknown adapter {kind:?} (available: {})",
                KINDS.join(", ")
            )));
        }
        if let Some(flag) = flags.foreign(kind).first() {
            return Err(AdapterError::Config(format!(
                "--{flag} is not an option of the {kind} adapter"
            )));
        }
        let need = |v: Option<String>, flag: &str| {
            v.ok_or_else(|| AdapterError::Config(format!("the {kind} adapter needs --{flag}")))
        };
        let pool = flags.pool.map(|p| p.to_string_lossy().into_owned());
        Ok(match kind {
            "dir" => AdapterConfig::Dir(DirOptions {
                pool: need(pool, "pool DIR")?.into(),
            }),
            "qcow2" => AdapterConfig::Qcow2(Qcow2Options {
                pool: need(pool, "pool DIR")?.into(),
                compress: flags.compress.as_deref().map(str::parse).transpose()?,
                overlays: flags.overlays,
            }),
            "oci" => AdapterConfig::Oci(OciOptions {
                registry: need(flags.registry, "registry URL")?,
                repository: need(flags.repository, "repository NAME")?,
                auth_file: flags.auth_file,
            }),
            "s3" => AdapterConfig::S3(S3Options {
                endpoint: need(flags.endpoint, "endpoint URL")?,
                bucket: need(flags.bucket, "bucket NAME")?,
                prefix: flags.prefix,
            }),
            _ => AdapterConfig::Glance(GlanceOptions {
                url: flags.url,
                os_cloud: flags.os_cloud,
                disk_format: flags
                    .disk_format
                    .as_deref()
                    .map(str::parse)
                    .transpose()?
                    .unwrap_or_default(),
            }),
        })
    }

    /// Build the adapter (creating its pool, sweeping interrupted stagings). Services that
    /// keep images elsewhere stage them under `data` (the agent's data directory); `site`
    /// marks what a shared service holds for this site (Glance).
    pub fn build(&self, data: &Path, site: &str) -> Result<Arc<dyn Adapter>, AdapterError> {
        let staging = data.join("staging").join(self.kind());
        Ok(match self {
            AdapterConfig::Dir(o) => Arc::new(dir::DirAdapter::new(o.pool.clone())?),
            AdapterConfig::Qcow2(o) => Arc::new(qcow2::Qcow2Adapter::new(o.clone())?),
            AdapterConfig::Oci(o) => Arc::new(oci::OciAdapter::new(o.clone(), staging)?),
            AdapterConfig::S3(o) => Arc::new(s3::S3Adapter::new(o.clone(), staging)?),
            AdapterConfig::Glance(o) => {
                Arc::new(glance::GlanceAdapter::new(o.clone(), staging)?.for_site(site))
            }
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
        assert!(
            e.to_string()
                .contains("available: dir, qcow2, glance, oci, s3"),
            "{e}"
        );
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
            .build(tmp.path(), "s")
            .unwrap();
        assert_eq!(a.kind(), "dir");
        assert!(pool.join(".staging").is_dir());
    }
}
