//! Real `seedcast` processes for the command-line tests: an engine started and waited for,
//! site tokens, commands run as scripts run them. Each child is killed when dropped.

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_seedcast");

/// Kills the child when the test ends, pass or fail.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn spawn(args: &[&str]) -> Result<Proc> {
    Ok(Proc(
        Command::new(BIN)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ))
}

pub fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let mut c = Command::new(BIN);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    Ok(c.output()?)
}

pub fn json(out: &Output) -> Result<Value> {
    ensure!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An engine process on 127.0.0.1 with its data under `d/engine`, started and waited for
/// (its admin token written); killed when dropped.
pub struct TestEngine {
    /// Behind a lock so a test can restart the engine while it holds `env()`.
    proc: std::sync::Mutex<Option<Proc>>,
    pub addr: String,
    pub data: std::path::PathBuf,
    pub admin: String,
    extra: Vec<String>,
}

impl TestEngine {
    pub fn start(d: &Path, extra: &[&str]) -> Result<TestEngine> {
        let data = d.join("engine");
        let admin = data.join("admin.token").to_string_lossy().into_owned();
        let e = TestEngine {
            proc: std::sync::Mutex::new(None),
            addr: format!("127.0.0.1:{}", free_port()?),
            data,
            admin,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        e.restart()?;
        wait_for_file(Path::new(&e.admin))?;
        Ok(e)
    }

    /// SIGKILL the engine and start it again on the same data and address.
    pub fn restart(&self) -> Result<()> {
        self.kill()?;
        let mut args = vec!["engine", "--data", self.data.to_str().unwrap()];
        args.extend(["--listen", &self.addr]);
        args.extend(self.extra.iter().map(String::as_str));
        *self.proc.lock().expect("engine process lock") = Some(spawn(&args)?);
        Ok(())
    }

    /// The running engine's process id.
    pub fn pid(&self) -> Option<u32> {
        self.proc
            .lock()
            .expect("engine process lock")
            .as_ref()
            .map(|p| p.0.id())
    }

    pub fn kill(&self) -> Result<()> {
        if let Some(mut p) = self.proc.lock().expect("engine process lock").take() {
            p.0.kill()?;
            p.0.wait()?;
        }
        Ok(())
    }

    /// The environment a client of this engine runs with.
    pub fn env(&self) -> [(&'static str, &str); 2] {
        [
            ("SEEDCAST_ENGINE", self.addr.as_str()),
            ("SEEDCAST_TOKEN", self.admin.as_str()),
        ]
    }
}

/// `push --name NAME FILE --wait --json`: the image's status.
pub fn push_wait_json(env: &[(&str, &str)], name: &str, file: &Path) -> Result<Value> {
    json(&run(
        &[
            "push",
            "--name",
            name,
            file.to_str().context("path")?,
            "--wait",
            "--json",
        ],
        env,
    )?)
}

/// The `global_id` of an image's status.
pub fn gid(status: &Value) -> Result<String> {
    Ok(status["global_id"]
        .as_str()
        .context("global_id")?
        .to_string())
}

/// The agent flags and environment of an S3 site storing in bucket `vms` of `swift`.
pub fn s3_site(
    swift: &seedcast::services::swift::Swift,
) -> (Vec<String>, [(&'static str, &'static str); 3]) {
    let (key, secret) = swift.credentials();
    let args = [
        "--adapter",
        "s3",
        "--endpoint",
        &swift.endpoint(),
        "--bucket",
        "vms",
    ]
    .map(String::from)
    .to_vec();
    let env = [
        ("AWS_ACCESS_KEY_ID", key),
        ("AWS_SECRET_ACCESS_KEY", secret),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ];
    (args, env)
}

/// `seedcast site add SITE` (retried while the engine starts): the token's text.
pub fn site_token(env: &[(&str, &str)], site: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = run(&["site", "add", site], env)?;
        if out.status.success() {
            let text = String::from_utf8(out.stdout)?;
            ensure!(text.lines().count() == 1, "{text:?}");
            return Ok(text.trim().to_string());
        }
        if Instant::now() > deadline {
            bail!("site add: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait until at least `n` sites show connected in `sites --json` (within `within`);
/// the listing that showed them.
pub fn wait_connected(env: &[(&str, &str)], n: usize, within: Duration) -> Result<Value> {
    let deadline = Instant::now() + within;
    loop {
        let s = json(&run(&["sites", "--json"], env)?)?;
        let up = s["sites"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|s| s["connected"] == true).count());
        if up >= n {
            return Ok(s);
        }
        ensure!(Instant::now() < deadline, "{up}/{n} agents connected");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn wait_for_file(p: &Path) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(s) = std::fs::read_to_string(p) {
            return Ok(s.trim().to_string());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{} never appeared", p.display())
}

/// An agent process for site `site` of `engine`, data under `d/agent-SITE`, with the
/// adapter arguments given; enrolled with a fresh site token at first start.
pub struct TestAgent {
    proc: Option<Proc>,
    pub data: std::path::PathBuf,
    /// Every run's log (stderr), appended.
    pub log: std::path::PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl TestAgent {
    pub fn start(d: &Path, engine: &TestEngine, site: &str, adapter: &[&str]) -> Result<Self> {
        Self::start_with_env(d, engine, site, adapter, &[])
    }

    /// As [`TestAgent::start`], the agent run with `env` added to its environment (a
    /// service's credentials).
    pub fn start_with_env(
        d: &Path,
        engine: &TestEngine,
        site: &str,
        adapter: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let token = d.join(format!("{site}.token"));
        std::fs::write(&token, site_token(&engine.env(), site)?)?;
        let data = d.join(format!("agent-{site}"));
        let mut args: Vec<String> = [
            "agent",
            "--data",
            data.to_str().context("path")?,
            "--engine",
            &engine.addr,
            "--site",
            site,
            "--token",
            token.to_str().context("path")?,
        ]
        .map(String::from)
        .to_vec();
        args.extend(adapter.iter().map(|s| s.to_string()));
        let mut a = TestAgent {
            proc: None,
            log: d.join(format!("agent-{site}.log")),
            data,
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        a.restart()?;
        Ok(a)
    }

    /// (Re)start the agent process (SIGKILLing a running one).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.proc = Some(Proc(
            Command::new(BIN)
                .args(&self.args)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&self.log)?,
                )
                .spawn()?,
        ));
        Ok(())
    }

    /// Wait until the log, past its first `from` bytes, shows `needle` (polling every
    /// millisecond, so a kill can follow the moment it does); false after `secs`.
    pub fn wait_log(&self, from: u64, needle: &str, secs: u64) -> Result<bool> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            let text = std::fs::read(&self.log).unwrap_or_default();
            if text.len() as u64 > from
                && String::from_utf8_lossy(&text[from as usize..]).contains(needle)
            {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(false)
    }

    /// The log's length now.
    pub fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map_or(0, |m| m.len())
    }

    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.0.kill()?;
            p.0.wait()?;
        }
        Ok(())
    }
}

/// `status GID --json`, polled until `done` holds for it (or `secs` pass).
pub fn wait_status(
    env: &[(&str, &str)],
    gid: &str,
    secs: u64,
    done: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let st = json(&run(&["status", gid, "--json"], env)?)?;
        if done(&st) {
            return Ok(st);
        }
        ensure!(Instant::now() < deadline, "status never reached: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
