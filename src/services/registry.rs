//! The OCI distribution registry (Debian's `docker-registry`, the reference server),
//! storing in a temporary directory, with htpasswd auth when asked.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;

use super::{Process, ServiceError, free_port, http_status, wait_ready};

/// A running registry.
#[derive(Debug)]
pub struct Registry {
    _process: Process,
    dir: tempfile::TempDir,
    pub port: u16,
    /// `user`, `password` when started with auth.
    pub credentials: Option<(String, String)>,
}

impl Registry {
    /// Start a registry on a free port; with `auth`, it requires basic auth (htpasswd,
    /// bcrypt) for user `seedcast`.
    pub fn start(auth: bool) -> Result<Registry, ServiceError> {
        let dir = tempfile::Builder::new()
            .prefix("seedcast-registry-")
            .tempdir()
            .map_err(ServiceError::io("registry directory"))?;
        let port = free_port()?;
        let data = dir.path().join("data");
        let mut config = format!(
            "version: 0.1\nstorage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\nhttp: {{addr: 127.0.0.1:{port}}}\nhealth: {{storagedriver: {{enabled: false}}}}\nlog: {{level: warn}}\n",
            data.display()
        );
        let credentials = if auth {
            let (user, pass) = (
                "seedcast".to_string(),
                hex::encode(rand::random::<[u8; 8]>()),
            );
            let out = Command::new("htpasswd")
                .args(["-Bbn", &user, &pass])
                .output()
                .map_err(ServiceError::io("htpasswd (apache2-utils)"))?;
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, &out.stdout).map_err(ServiceError::io("htpasswd file"))?;
            config += &format!(
                "auth: {{htpasswd: {{realm: basic-realm, path: {}}}}}\n",
                htpasswd.display()
            );
            Some((user, pass))
        } else {
            None
        };
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).map_err(ServiceError::io("registry config"))?;
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&cfg);
        // It reads every REGISTRY_* variable as configuration: start it from a clean one.
        for (k, _) in std::env::vars() {
            if k.starts_with("REGISTRY_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(ServiceError::io(
                "docker-registry (apt-get install docker-registry)",
            ))?;
        let mut process = Process(child);
        wait_ready(
            "docker-registry",
            &mut process.0,
            Duration::from_secs(20),
            || matches!(http_status(port, "/v2/"), Some(200 | 401)),
        )?;
        Ok(Registry {
            _process: process,
            dir,
            port,
            credentials,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`, as references name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A containers auth file holding the credentials (as `skopeo login` writes one).
    pub fn auth_file(&self) -> Result<PathBuf, ServiceError> {
        let p = self.dir.path().join("auth.json");
        let auths = match &self.credentials {
            Some((u, pw)) => {
                let b = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{pw}"));
                serde_json::json!({ "auths": { self.host(): { "auth": b } } })
            }
            None => serde_json::json!({ "auths": {} }),
        };
        std::fs::write(&p, auths.to_string()).map_err(ServiceError::io("auth file"))?;
        Ok(p)
    }

    /// The registry's storage directory.
    pub fn storage(&self) -> &Path {
        self.dir.path()
    }
}
