//! OpenStack's image service as an OpenStack site runs it: Glance (Debian's
//! `python3-glance`, sqlite, file store), alone (noauth) or behind a real Keystone
//! (`python3-keystone`, sqlite in WAL mode, fernet tokens), with the accounts a site's
//! agent uses: a `glance` service user and an `agent` user, member of project `sites`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Process, ServiceError, free_port, http_status, wait_ready};

const PYTHON: &str = "/usr/bin/python3";
const SETUP: &str = include_str!("openstack_setup.py");

/// A running Keystone.
#[derive(Debug)]
pub struct Keystone {
    _process: Process,
    pub port: u16,
    pub admin_password: String,
    /// The agent's account: user `agent`, project `sites`, domain `Default`.
    pub agent_password: String,
    glance_password: String,
    glance_port: u16,
}

/// A running Glance.
#[derive(Debug)]
pub struct Glance {
    _process: Process,
    _dir: tempfile::TempDir,
    pub port: u16,
    /// The Keystone in front of it, if any.
    pub keystone: Option<Keystone>,
}

fn write(p: &Path, text: &str) -> Result<(), ServiceError> {
    std::fs::write(p, text).map_err(ServiceError::io(p.display().to_string()))
}

fn setup(dir: &Path, args: &[&str]) -> Result<String, ServiceError> {
    let script = dir.join("openstack_setup.py");
    write(&script, SETUP)?;
    let out = Command::new(PYTHON)
        .arg(&script)
        .args(args)
        .output()
        .map_err(ServiceError::io(format!(
            "{PYTHON} openstack_setup.py {}",
            args[0]
        )))?;
    if !out.status.success() {
        return Err(ServiceError::Start {
            service: "openstack set-up",
            why: format!("{}: {}", args[0], String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn log(dir: &Path, name: &str) -> Result<std::fs::File, ServiceError> {
    std::fs::File::create(dir.join(format!("{name}.log"))).map_err(ServiceError::io("log file"))
}

fn password() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

impl Keystone {
    /// Set up and start a Keystone in `dir`; Glance is to listen on `glance_port`.
    fn start(dir: &Path, glance_port: u16) -> Result<Keystone, ServiceError> {
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}/v3");
        let conf = dir.join("keystone.conf");
        let d = dir.display();
        write(
            &conf,
            &format!(
                "[database]\nconnection = sqlite:///{d}/keystone.sqlite\n\
                 [token]\nprovider = fernet\n\
                 [fernet_tokens]\nkey_repository = {d}/fernet-keys\n\
                 [fernet_receipts]\nkey_repository = {d}/fernet-keys\n\
                 [credential]\nkey_repository = {d}/credential-keys\n\
                 [identity]\npassword_hash_rounds = 4\n"
            ),
        )?;
        let admin_password = password();
        setup(
            dir,
            &[
                "keystone",
                &conf.to_string_lossy(),
                &dir.to_string_lossy(),
                &admin_password,
                &url,
            ],
        )?;
        let child = Command::new(PYTHON)
            .arg("/usr/bin/keystone-wsgi-public")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .env("OS_KEYSTONE_CONFIG_FILES", &conf)
            .stdout(Stdio::null())
            .stderr(log(dir, "keystone")?)
            .spawn()
            .map_err(ServiceError::io("keystone-wsgi-public"))?;
        let mut process = Process(child);
        wait_ready("keystone", &mut process.0, Duration::from_secs(60), || {
            http_status(port, "/v3") == Some(200)
        })?;
        let (glance_password, agent_password) = (password(), password());
        setup(
            dir,
            &[
                "accounts",
                &url,
                &admin_password,
                &glance_password,
                &agent_password,
                &format!("http://127.0.0.1:{glance_port}"),
            ],
        )?;
        Ok(Keystone {
            _process: process,
            port,
            admin_password,
            agent_password,
            glance_password,
            glance_port,
        })
    }

    /// `http://127.0.0.1:PORT/v3`.
    pub fn auth_url(&self) -> String {
        format!("http://127.0.0.1:{}/v3", self.port)
    }

    /// The agent's credentials as the standard `OS_*` variables.
    pub fn agent_env(&self) -> Vec<(String, String)> {
        [
            ("OS_AUTH_URL", self.auth_url()),
            ("OS_USERNAME", "agent".into()),
            ("OS_PASSWORD", self.agent_password.clone()),
            ("OS_PROJECT_NAME", "sites".into()),
            ("OS_USER_DOMAIN_NAME", "Default".into()),
            ("OS_PROJECT_DOMAIN_NAME", "Default".into()),
            ("OS_REGION_NAME", "RegionOne".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl Glance {
    /// Start a Glance with no authentication (every request is trusted).
    pub fn start_noauth() -> Result<Glance, ServiceError> {
        Self::start(false)
    }

    /// Start a Keystone and a Glance that validates its tokens.
    pub fn start_with_keystone() -> Result<Glance, ServiceError> {
        Self::start(true)
    }

    fn start(keystone: bool) -> Result<Glance, ServiceError> {
        let dir = tempfile::Builder::new()
            .prefix("seedcast-glance-")
            .tempdir()
            .map_err(ServiceError::io("glance directory"))?;
        let d = dir.path();
        for sub in ["images", "staging", "tasks"] {
            std::fs::create_dir_all(d.join(sub)).map_err(ServiceError::io("glance dirs"))?;
        }
        let port = free_port()?;
        let keystone = if keystone {
            Some(Keystone::start(d, port)?)
        } else {
            None
        };
        let conf = d.join("glance-api.conf");
        write(&conf, &api_conf(d, port, keystone.as_ref()))?;
        write(
            &d.join("glance-api-paste.ini"),
            &paste_ini(keystone.is_some()),
        )?;
        setup(d, &["glance-db", &conf.to_string_lossy()])?;
        let child = Command::new(PYTHON)
            .arg("-c")
            .arg(
                "import sys; from glance.cmd.api import main; \
                 sys.argv = ['glance-api'] + sys.argv[1:]; main()",
            )
            .arg("--config-file")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log(d, "glance")?)
            .spawn()
            .map_err(ServiceError::io("glance-api"))?;
        let mut process = Process(child);
        wait_ready("glance", &mut process.0, Duration::from_secs(60), || {
            http_status(port, "/versions").is_some()
        })?;
        Ok(Glance {
            _process: process,
            _dir: dir,
            port,
            keystone,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where Glance's file store keeps image data.
    pub fn store(&self) -> PathBuf {
        self._dir.path().join("images")
    }
}

fn api_conf(d: &Path, port: u16, keystone: Option<&Keystone>) -> String {
    let d = d.display();
    let mut c = format!(
        "[DEFAULT]\nbind_host = 127.0.0.1\nbind_port = {port}\nworkers = 0\n\
         enabled_backends = fs:file\nnode_staging_uri = file://{d}/staging\n\
         [database]\nconnection = sqlite:///{d}/glance.sqlite\n\
         [glance_store]\ndefault_backend = fs\n\
         [fs]\nfilesystem_store_datadir = {d}/images/\n\
         [os_glance_staging_store]\nfilesystem_store_datadir = {d}/staging/\n\
         [os_glance_tasks_store]\nfilesystem_store_datadir = {d}/tasks/\n\
         [paste_deploy]\nflavor =\nconfig_file = {d}/glance-api-paste.ini\n\
         [oslo_policy]\nenforce_new_defaults = false\nenforce_scope = false\n"
    );
    if let Some(k) = keystone {
        debug_assert_eq!(k.glance_port, port);
        c += &format!(
            "[keystone_authtoken]\nwww_authenticate_uri = {url}\nauth_url = {url}\n\
             auth_type = password\nusername = glance\npassword = {pw}\nproject_name = service\n\
             user_domain_name = Default\nproject_domain_name = Default\n",
            url = k.auth_url(),
            pw = k.glance_password
        );
    }
    c
}

fn paste_ini(keystone: bool) -> String {
    let pipeline = if keystone {
        "versionnegotiation authtoken context rootapp"
    } else {
        "versionnegotiation unauthenticated-context rootapp"
    };
    format!(
        "[pipeline:glance-api]\npipeline = {pipeline}\n\
         [composite:rootapp]\npaste.composite_factory = glance.api:root_app_factory\n/: apiversions\n/v2: apiv2app\n\
         [app:apiversions]\npaste.app_factory = glance.api.versions:create_resource\n\
         [app:apiv2app]\npaste.app_factory = glance.api.v2.router:API.factory\n\
         [filter:versionnegotiation]\npaste.filter_factory = glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory\n\
         [filter:unauthenticated-context]\npaste.filter_factory = glance.api.middleware.context:UnauthenticatedContextMiddleware.factory\n\
         [filter:authtoken]\npaste.filter_factory = keystonemiddleware.auth_token:filter_factory\n\
         [filter:context]\npaste.filter_factory = glance.api.middleware.context:ContextMiddleware.factory\n"
    )
}
