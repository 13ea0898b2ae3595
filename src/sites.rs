//! Sites of every kind on one machine: the real service each kind needs, started once and
//! shared, and the adapter that writes into it. The demo (`seedcast demo --adapters …`),
//! the five-site test and the per-adapter benchmark build their sites here, so each sees
//! the same services configured the same way an operator would (an OCI registry with
//! htpasswd auth, Glance behind Keystone, S3 on Swift with a bucket made beforehand).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use seedcast_agents::Adapter;
use seedcast_agents::adapters::glance::GlanceAdapter;
use seedcast_agents::adapters::glance::keystone::AuthConfig;
use seedcast_agents::adapters::s3::{Credentials, S3Adapter};
use seedcast_agents::adapters::{
    AdapterConfig, DirOptions, DiskFormat, GlanceOptions, OciOptions, Qcow2Options, S3Options,
};

use crate::cluster::{ClusterError, LocalCluster};
use crate::services::ServiceError;
use crate::services::openstack::Glance;
use crate::services::registry::Registry;
use crate::services::swift::Swift;

/// A site could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Adapter(#[from] seedcast_agents::AdapterError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// The bucket S3 sites write into (made when Swift starts).
pub const BUCKET: &str = "seedcast";

/// A kind of site, named as `seedcast agent --adapter` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SiteKind {
    Dir,
    Qcow2,
    Oci,
    S3,
    Glance,
}

impl SiteKind {
    pub const ALL: [SiteKind; 5] = [
        SiteKind::Dir,
        SiteKind::Qcow2,
        SiteKind::Oci,
        SiteKind::S3,
        SiteKind::Glance,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SiteKind::Dir => "dir",
            SiteKind::Qcow2 => "qcow2",
            SiteKind::Oci => "oci",
            SiteKind::S3 => "s3",
            SiteKind::Glance => "glance",
        }
    }

    /// The service behind the site, for a user reading the demo's output.
    pub fn service(self) -> &'static str {
        match self {
            SiteKind::Dir => "a directory pool",
            SiteKind::Qcow2 => "qcow2 files (qemu-img), updates as overlays",
            SiteKind::Oci => "an OCI registry (docker-registry, htpasswd auth)",
            SiteKind::S3 => "an S3 object store (Swift with s3api)",
            SiteKind::Glance => "OpenStack Glance behind Keystone",
        }
    }

    /// The Debian packages the site's service needs.
    pub fn packages(self) -> &'static str {
        match self {
            SiteKind::Dir => "",
            SiteKind::Qcow2 => "qemu-utils",
            SiteKind::Oci => "docker-registry apache2-utils",
            SiteKind::S3 => "swift-proxy swift-object swift-container swift-account",
            SiteKind::Glance => "python3-glance python3-keystone python3-keystonemiddleware",
        }
    }
}

impl SiteKind {
    /// Is the site's service installed here? An error names what to install.
    pub fn check_installed(self) -> Result<(), ServiceError> {
        let (program, args): (&str, &[&str]) = match self {
            SiteKind::Dir => return Ok(()),
            SiteKind::Qcow2 => ("qemu-img", &["--version"]),
            SiteKind::Oci => ("docker-registry", &["--version"]),
            SiteKind::S3 => (
                "/usr/bin/python3",
                &["-c", "import swift.common.middleware.s3api"],
            ),
            SiteKind::Glance => ("/usr/bin/python3", &["-c", "import glance, keystone"]),
        };
        let ok = std::process::Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Ok(())
        } else {
            Err(ServiceError::Start {
                service: self.name(),
                why: format!(
                    "its service is not installed here (apt-get install -y {})",
                    self.packages()
                ),
            })
        }
    }
}

impl std::fmt::Display for SiteKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SiteKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        SiteKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown adapter {s:?} (one of: dir, qcow2, oci, s3, glance)"))
    }
}

/// Site names for `kinds`: the kind's name, with `-a`, `-b`, … when a kind repeats.
pub fn site_names(kinds: &[SiteKind]) -> Vec<String> {
    let mut seen = std::collections::BTreeMap::<SiteKind, u8>::new();
    kinds
        .iter()
        .map(|k| {
            let n = kinds.iter().filter(|x| *x == k).count();
            let i = seen.entry(*k).or_default();
            *i += 1;
            if n == 1 {
                k.name().to_string()
            } else {
                format!("{}-{}", k.name(), char::from(b'a' + (*i - 1) % 26))
            }
        })
        .collect()
}

/// The services a set of sites needs, running until dropped.
#[derive(Debug, Default)]
pub struct SiteServices {
    pub registry: Option<Registry>,
    pub swift: Option<Swift>,
    pub glance: Option<Glance>,
}

impl SiteServices {
    /// Start what `kinds` need, side by side (Keystone and Glance take the longest).
    pub fn start(kinds: &[SiteKind]) -> Result<SiteServices, ServiceError> {
        let need = |k| kinds.contains(&k);
        std::thread::scope(|s| {
            let glance = need(SiteKind::Glance).then(|| s.spawn(Glance::start_with_keystone));
            let swift = need(SiteKind::S3).then(|| s.spawn(Swift::start));
            let registry = need(SiteKind::Oci)
                .then(|| Registry::start(true))
                .transpose()?;
            let join = |what| {
                move |_| ServiceError::Start {
                    service: what,
                    why: "its start-up thread panicked".into(),
                }
            };
            let glance = glance
                .map(|h| h.join().map_err(join("glance")))
                .transpose()?
                .transpose()?;
            let swift = swift
                .map(|h| h.join().map_err(join("swift")))
                .transpose()?
                .transpose()?;
            if let Some(sw) = &swift {
                sw.create_bucket(BUCKET)?;
            }
            Ok(SiteServices {
                registry,
                swift,
                glance,
            })
        })
    }

    /// The adapter for a site `site` of kind `kind`, its staging under `data`.
    pub fn adapter(
        &self,
        kind: SiteKind,
        site: &str,
        pool: &Path,
        data: &Path,
    ) -> Result<Arc<dyn Adapter>, SiteError> {
        let missing = |service: &'static str| ServiceError::Start {
            service,
            why: format!("not started for site {site}"),
        };
        let staging = data.join("staging").join(kind.name());
        let config = match kind {
            SiteKind::Dir => AdapterConfig::Dir(DirOptions {
                pool: pool.to_path_buf(),
            }),
            SiteKind::Qcow2 => AdapterConfig::Qcow2(Qcow2Options {
                pool: pool.to_path_buf(),
                compress: None,
                overlays: true,
            }),
            SiteKind::Oci => {
                let reg = self
                    .registry
                    .as_ref()
                    .ok_or_else(|| missing("docker-registry"))?;
                AdapterConfig::Oci(OciOptions {
                    registry: reg.url(),
                    repository: format!("seedcast/{site}"),
                    auth_file: Some(reg.auth_file()?),
                })
            }
            SiteKind::S3 => {
                let sw = self.swift.as_ref().ok_or_else(|| missing("swift"))?;
                let (key, secret) = sw.credentials();
                let s3 = S3Adapter::with_credentials(
                    S3Options {
                        endpoint: sw.endpoint(),
                        bucket: BUCKET.into(),
                        prefix: Some(site.into()),
                    },
                    Some(Credentials {
                        access_key_id: key.into(),
                        secret_access_key: secret.into(),
                    }),
                    staging,
                )?;
                return Ok(Arc::new(s3));
            }
            SiteKind::Glance => {
                let g = self.glance.as_ref().ok_or_else(|| missing("glance"))?;
                let k = g.keystone.as_ref().ok_or_else(|| missing("keystone"))?;
                let glance = GlanceAdapter::with_auth(
                    GlanceOptions {
                        url: None,
                        os_cloud: None,
                        disk_format: DiskFormat::Qcow2,
                    },
                    AuthConfig::from_vars(k.agent_env())?,
                    staging,
                )?
                .for_site(site);
                return Ok(Arc::new(glance));
            }
        };
        Ok(config.build(data, site)?)
    }

    /// The directory the service of a site of `kind` keeps its data in (`pool` for the
    /// kinds that write into the site's own pool): what the benchmarks measure writes in.
    pub fn storage(&self, kind: SiteKind, pool: &Path) -> Option<PathBuf> {
        match kind {
            SiteKind::Dir | SiteKind::Qcow2 => Some(pool.to_path_buf()),
            SiteKind::Oci => self.registry.as_ref().map(|r| r.storage().join("data")),
            SiteKind::S3 => self.swift.as_ref().map(|s| s.dir().join("srv")),
            SiteKind::Glance => self.glance.as_ref().map(|g| g.store()),
        }
    }

    /// Enroll and start an agent for `site`, of kind `kind`, in `cluster`.
    pub async fn add_site(
        &self,
        cluster: &mut LocalCluster,
        site: &str,
        kind: SiteKind,
    ) -> Result<(), SiteError> {
        let data = cluster.root.join("agents").join(site);
        let adapter = self.adapter(kind, site, &cluster.pool_dir(site), &data)?;
        Ok(cluster.add_agent_using(site, adapter).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_repeat_with_suffixes_and_kinds_parse() {
        let k: Vec<SiteKind> = ["dir", "qcow2", "dir", "oci"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(site_names(&k), ["dir-a", "qcow2", "dir-b", "oci"]);
        let e = "nfs".parse::<SiteKind>().unwrap_err();
        assert!(e.contains("nfs") && e.contains("glance"), "{e}");
    }
}
