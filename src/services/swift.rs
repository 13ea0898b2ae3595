//! OpenStack Swift with its `s3api` middleware: an S3-compatible object store from Debian's
//! packages (`swift-proxy`, `swift-object`, `swift-container`, `swift-account`), one device,
//! one replica, tempauth user `admin:admin` / `admin`, everything under a temporary
//! directory. Each server runs from Debian's Python with the directory as its swift dir.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Process, ServiceError, free_port, http_status, wait_ready};

/// Debian's Python (another `python3` first on PATH may not see Debian's packages).
const PYTHON: &str = "/usr/bin/python3";
const LAUNCHER: &str = include_str!("swift_server.py");

/// A running Swift cluster of one node.
#[derive(Debug)]
pub struct Swift {
    _servers: Vec<Process>,
    dir: tempfile::TempDir,
    pub port: u16,
}

fn run(cmd: &mut Command) -> Result<(), ServiceError> {
    let what = format!("{cmd:?}");
    let out = cmd.output().map_err(ServiceError::io(what.clone()))?;
    if !out.status.success() {
        return Err(ServiceError::Start {
            service: "swift",
            why: format!("{what}: {}", String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(())
}

fn write(p: &Path, text: &str) -> Result<(), ServiceError> {
    std::fs::write(p, text).map_err(ServiceError::io(p.display().to_string()))
}

impl Swift {
    /// Build the rings and start the account, container, object and proxy servers.
    pub fn start() -> Result<Swift, ServiceError> {
        let dir = tempfile::Builder::new()
            .prefix("seedcast-swift-")
            .tempdir()
            .map_err(ServiceError::io("swift directory"))?;
        let etc = dir.path().join("etc");
        let srv = dir.path().join("srv");
        for d in [&etc, &srv.join("d1"), &dir.path().join("run")] {
            std::fs::create_dir_all(d).map_err(ServiceError::io(d.display().to_string()))?;
        }
        write(
            &etc.join("swift.conf"),
            "[swift-hash]\nswift_hash_path_suffix = seedcast\nswift_hash_path_prefix = test\n\n\
             [storage-policy:0]\nname = Policy-0\ndefault = yes\n",
        )?;
        let ports = [free_port()?, free_port()?, free_port()?];
        let launcher = dir.path().join("swift_server.py");
        write(&launcher, LAUNCHER)?;
        run(Command::new(PYTHON)
            .arg(&launcher)
            .arg("rings")
            .arg(&etc)
            .args(ports.map(|p| p.to_string())))?;
        let proxy_port = free_port()?;
        let common = |port: u16| {
            format!(
                "[DEFAULT]\ndevices = {}\nmount_check = false\nbind_ip = 127.0.0.1\nbind_port = {port}\nworkers = 0\nuser = root\nswift_dir = {}\nlog_level = WARNING\n\n",
                srv.display(),
                etc.display()
            )
        };
        let mut confs = Vec::new();
        for ((app, port), egg) in ["account-server", "container-server", "object-server"]
            .iter()
            .zip(ports)
            .zip(["account", "container", "object"])
        {
            let conf = etc.join(format!("{app}.conf"));
            write(
                &conf,
                &format!(
                    "{}[pipeline:main]\npipeline = {app}\n\n[app:{app}]\nuse = egg:swift#{egg}\n",
                    common(port)
                ),
            )?;
            confs.push((*app, conf, port));
        }
        let proxy = etc.join("proxy-server.conf");
        write(
            &proxy,
            &format!(
                "{}[pipeline:main]\npipeline = catch_errors gatekeeper proxy-logging cache listing_formats s3api tempauth copy slo dlo proxy-logging proxy-server\n\n\
             [app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n\n\
             [filter:tempauth]\nuse = egg:swift#tempauth\nuser_admin_admin = admin .admin .reseller_admin\n\n\
             [filter:s3api]\nuse = egg:swift#s3api\nlocation = us-east-1\n\n\
             [filter:cache]\nuse = egg:swift#memcache\n\n\
             [filter:catch_errors]\nuse = egg:swift#catch_errors\n\n\
             [filter:gatekeeper]\nuse = egg:swift#gatekeeper\n\n\
             [filter:proxy-logging]\nuse = egg:swift#proxy_logging\n\n\
             [filter:listing_formats]\nuse = egg:swift#listing_formats\n\n\
             [filter:copy]\nuse = egg:swift#copy\n\n\
             [filter:slo]\nuse = egg:swift#slo\n\n\
             [filter:dlo]\nuse = egg:swift#dlo\n",
                common(proxy_port)
            ),
        )?;
        confs.push(("proxy-server", proxy, proxy_port));
        // Start them all, then wait for each: they come up in parallel.
        let mut servers = Vec::new();
        for (app, conf, _) in &confs {
            let log = std::fs::File::create(dir.path().join("run").join(format!("{app}.log")))
                .map_err(ServiceError::io("swift log"))?;
            let child = Command::new(PYTHON)
                .arg(&launcher)
                .arg(app)
                .arg(&etc)
                .arg(conf)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(ServiceError::io(format!("{PYTHON} (swift {app})")))?;
            servers.push(Process(child));
        }
        for (p, (_, _, port)) in servers.iter_mut().zip(&confs) {
            let port = *port;
            wait_ready("swift", &mut p.0, Duration::from_secs(60), || {
                http_status(port, "/").is_some()
            })?;
        }
        Ok(Swift {
            _servers: servers,
            dir,
            port: proxy_port,
        })
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Access key and secret (tempauth's `admin:admin`).
    pub fn credentials(&self) -> (&'static str, &'static str) {
        ("admin:admin", "admin")
    }

    /// Run the AWS CLI (Debian's) against this store; its stdout.
    pub fn aws(&self, args: &[&str]) -> Result<String, ServiceError> {
        let (key, secret) = self.credentials();
        let out = Command::new("/usr/bin/aws")
            .env("AWS_ACCESS_KEY_ID", key)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env_remove("AWS_PROFILE")
            .arg("--endpoint-url")
            .arg(self.endpoint())
            .args(args)
            .output()
            .map_err(ServiceError::io("aws (apt-get install awscli)"))?;
        if !out.status.success() {
            return Err(ServiceError::Start {
                service: "aws cli",
                why: format!("{args:?}: {}", String::from_utf8_lossy(&out.stderr)),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Create a bucket.
    pub fn create_bucket(&self, name: &str) -> Result<(), ServiceError> {
        self.aws(&["s3api", "create-bucket", "--bucket", name])
            .map(|_| ())
    }

    /// Where the servers keep their data and logs.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}
