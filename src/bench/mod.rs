//! `seedcast bench local`: ingest, seeding and reassembly measured end to end on this
//! machine — a real engine and real agents as separate processes on 127.0.0.1, this process
//! as the client — each beside what it is judged against, in the same run on the same image:
//! the machine's stage limits ([`limits`]), the loopback QUIC limit, and the peers
//! ([`peers`]: casync, rsync). Every phase reports wall time, throughput, CPU seconds and peak
//! resident set of client, engine and agents ([`meter`]), and bytes on the wire.
//!
//! Seeding runs in rounds of 1, 2, 4 … sites, each round with fresh agents (empty caches)
//! and the image pushed to them under a new name: the engine holds its chunks from the
//! ingest, so a round is the engine reading each stored chunk and sending it to every site
//! of the round, and the agents verifying and writing it. Reassembly is the same image pushed
//! once more to a site that holds every chunk: nothing travels, the agent rebuilds the image
//! from its cache and publishes it.

pub mod limits;
pub mod links;
pub mod meter;
pub mod peers;
pub mod text;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use seedcast_core::ChunkerConfig;
use seedcast_core::protocol::{ImageStatus, PlacementState};
use seedcast_net::pki::Token;
use serde::Serialize;

use crate::client::{Client, ClientError, PushOptions};
use limits::StageLimits;
use meter::{CpuSnapshot, Pid};
use peers::PeerRun;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("image: {0}")]
    Image(String),
    #[error("loopback limit: {0}")]
    Loopback(String),
    #[error("{0}")]
    Peer(String),
    #[error("{what} (its log: {log})")]
    Process { what: String, log: PathBuf },
    #[error("{0}")]
    Failed(String),
}

/// What `bench local` runs.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// The `seedcast` binary engine and agents run as.
    pub bin: PathBuf,
    /// Size of the generated image (ignored with `image`).
    pub size: u64,
    /// About this share of the generated image is data, the rest holes (0.6 by default).
    pub data_share: f64,
    /// An image file to use instead of a generated one (raw or qcow2).
    pub image: Option<PathBuf>,
    /// The largest seeding round; rounds are 1, 2, 4 … up to it.
    pub sites: usize,
    /// Keep the work here (engine, agents, pools, logs) instead of a temporary directory.
    pub dir: Option<PathBuf>,
    /// Run casync and rsync beside seedcast (those installed).
    pub peers: bool,
}

/// The seeding rounds for `max` sites: 1, 2, 4 … and `max` itself.
pub fn rounds(max: usize) -> Vec<usize> {
    let mut r: Vec<usize> = std::iter::successors(Some(1usize), |n| n.checked_mul(2))
        .take_while(|n| *n <= max)
        .collect();
    if max > 0 && r.last() != Some(&max) {
        r.push(max);
    }
    r
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub generated: bool,
    /// Bytes of the image's files, holes included.
    pub total_len: u64,
    /// Bytes of data (not holes) in the guest view.
    pub data_len: u64,
}

/// CPU seconds and peak resident set of each role during one phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cost {
    pub client_cpu_secs: f64,
    pub engine_cpu_secs: f64,
    /// Summed over the phase's agents.
    pub agents_cpu_secs: f64,
    pub client_peak_rss: u64,
    pub engine_peak_rss: u64,
    /// The largest agent's.
    pub agent_peak_rss: u64,
}

/// One measured phase.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub seconds: f64,
    /// Image data bytes (not holes) handled, per second: at a phase with several sites,
    /// summed over them.
    pub data_rate: f64,
    /// Chunk payload bytes moved (upload for ingest, summed over sites for seeding).
    pub payload_bytes: u64,
    /// Every QUIC datagram of the sites' transfers with UDP/IP headers (seeding only).
    pub wire_bytes: u64,
    pub cost: Cost,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeedRound {
    pub sites: usize,
    /// From the commit to every site published.
    pub phase: Phase,
    /// The same payload through plain quinn streams, one connection per site.
    pub loopback_secs: f64,
    /// `loopback_secs / phase.seconds`: the share of the loopback limit reached.
    pub of_loopback: f64,
    /// Every site here writes to this machine's one disk: its copy of the image's data and
    /// its cache of the chunks as they travelled (the engine's stored bytes), so `sites ×
    /// (data + stored)` at the measured disk rate.
    pub disk_limit_secs: f64,
    /// `disk_limit_secs / phase.seconds`.
    pub of_disk_limit: f64,
    pub engine_cpu_per_site: f64,
    pub rsync: Option<PeerRun>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LocalReport {
    pub cores: usize,
    pub image: ImageInfo,
    pub limits: StageLimits,
    /// The slowest stage a pipelined ingest runs on every core, and its seconds.
    pub slowest_stage: String,
    pub ingest: Phase,
    /// Bytes the engine's data directory holds after the ingest.
    pub ingest_stored_bytes: u64,
    /// `slowest stage seconds / ingest seconds`.
    pub ingest_of_limit: f64,
    pub casync_make: Option<PeerRun>,
    pub seeding: Vec<SeedRound>,
    /// The image rebuilt at one site from its cache (nothing sent) and published.
    pub reassembly: Phase,
    pub casync_extract: Option<PeerRun>,
    /// Peers asked for but not installed.
    pub peers_missing: Vec<String>,
}

/// A child process killed when dropped; its output goes to a log file.
#[derive(Debug)]
pub(crate) struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Kill it now (SIGKILL) and reap it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn spawn(cmd: &mut Command, log: PathBuf) -> Result<Proc, BenchError> {
        // Appended to: a restarted process keeps the earlier run's log.
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()?;
        Ok(Proc { child, log })
    }

    fn pid(&self) -> Pid {
        Pid::Child(self.child.id())
    }

    /// Fail naming the log if the process has exited.
    fn alive(&mut self, what: &str) -> Result<(), BenchError> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(st) => Err(BenchError::Process {
                what: format!("{what} exited: {st}"),
                log: self.log.clone(),
            }),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the harness tells its caller as it goes (for a progress bar).
#[derive(Debug, Clone)]
pub struct Step {
    pub index: usize,
    pub total: usize,
    pub what: String,
}

struct Steps<F> {
    index: usize,
    total: usize,
    f: F,
}

impl<F: FnMut(Step)> Steps<F> {
    fn next(&mut self, what: impl Into<String>) {
        self.index += 1;
        (self.f)(Step {
            index: self.index,
            total: self.total,
            what: what.into(),
        });
    }
}

/// Run the whole benchmark.
pub async fn run_local(
    opts: &LocalOptions,
    on_step: impl FnMut(Step),
) -> Result<LocalReport, BenchError> {
    if opts.sites == 0 {
        return Err(BenchError::Failed("--sites must be at least 1".into()));
    }
    let rounds = rounds(opts.sites);
    let mut steps = Steps {
        index: 0,
        total: 5 + 3 * rounds.len(),
        f: on_step,
    };
    let tmp;
    let work = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("seedcast-bench")
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;

    steps.next("image");
    let image = match &opts.image {
        Some(p) => {
            let total_len = seedcast_qemu::guest_len(p)
                .map_err(|e| BenchError::Image(format!("{}: {e}", p.display())))?;
            ImageInfo {
                path: p.clone(),
                generated: false,
                total_len,
                data_len: 0,
            }
        }
        None => {
            let p = work.join("disk.raw");
            let data_len = crate::synth::write_disk_share(
                &p,
                opts.size,
                "seedcast bench local",
                opts.data_share,
            )?;
            ImageInfo {
                path: p,
                generated: true,
                total_len: opts.size,
                data_len,
            }
        }
    };

    steps.next("stage limits");
    let cfg = ChunkerConfig::default();
    let stage = {
        let p = image.path.clone();
        // The disk is measured with as many bytes as one site writes (capped: 2 GiB shows
        // the sustained rate past the page cache's dirty limits).
        let one_site = match image.data_len {
            0 => image.total_len, // a given image: its data is known after the push
            d => d,
        };
        let (scratch, disk_bytes) = (work.clone(), (2 * one_site).clamp(64 << 20, 2 << 30));
        tokio::task::spawn_blocking(move || limits::stage_limits(&p, cfg, 3, &scratch, disk_bytes))
            .await
            .map_err(|e| BenchError::Failed(e.to_string()))??
    };
    let (slow_name, slow_secs) = stage.slowest_parallel();

    steps.next("engine");
    let engine_dir = work.join("engine");
    let addr = free_udp_addr()?;
    let mut engine = Proc::spawn(
        Command::new(&opts.bin)
            .arg("engine")
            .arg("--data")
            .arg(&engine_dir)
            .args(["--listen", &addr]),
        logs.join("engine.log"),
    )?;
    let client = connect_admin(&mut engine, &engine_dir, &addr).await?;

    steps.next("ingest");
    let (ingest, data_len) =
        ingest(&opts.bin, &mut engine, &engine_dir, &addr, &image, &logs).await?;
    let image = ImageInfo { data_len, ..image };
    let ingest_stored_bytes = peers::dir_bytes(&engine_dir)?;

    let mut peers_missing = Vec::new();
    let want = |tool: &str, missing: &mut Vec<String>| {
        let ok = opts.peers && peers::installed(tool);
        if opts.peers && !ok && !missing.iter().any(|m| m == tool) {
            missing.push(tool.to_string());
        }
        ok
    };
    steps.next("casync make");
    let casync = if want("casync", &mut peers_missing) {
        let d = work.join("casync");
        std::fs::create_dir_all(&d)?;
        Some(peers::casync_make(&image.path, &d)?)
    } else {
        None
    };

    let mut seeding = Vec::new();
    let mut reassembly = None;
    let mut casync_extract = None;
    for &n in &rounds {
        steps.next(format!("seeding {n} site(s)"));
        let mut agents = start_agents(&opts.bin, &client, &work, &logs, &addr, n).await?;
        let names: Vec<String> = agents.iter().map(|a| a.0.clone()).collect();
        let (phase, _) = seed(
            &client,
            &mut engine,
            &mut agents,
            &image,
            &format!("bench-seed-{n}"),
        )
        .await?;

        if reassembly.is_none() {
            // The first round's site holds every chunk now: rebuild from its cache.
            let (phase, status) = seed(
                &client,
                &mut engine,
                &mut agents,
                &image,
                "bench-reassemble",
            )
            .await?;
            if status.sites.iter().any(|p| p.bytes_needed > 0) {
                return Err(BenchError::Failed(format!(
                    "reassembly was sent chunks: {:?}",
                    status.sites
                )));
            }
            reassembly = Some(phase);
            // The peer right after, on the disk as seedcast left it: run at the end, after
            // every round's writes, it was measured on a disk still writing those back.
            steps.next("casync extract");
            if let Some((_, store)) = &casync {
                wait_idle(engine.pid()).await?;
                let out = work.join("casync-extract.raw");
                let r = peers::casync_extract(store, &out)?;
                let _ = std::fs::remove_file(&out);
                casync_extract = Some(r);
            }
        }
        drop(agents);
        for s in &names {
            let _ = std::fs::remove_dir_all(work.join(format!("agent-{s}")));
            let _ = std::fs::remove_dir_all(work.join(format!("pool-{s}")));
        }

        steps.next(format!("loopback limit, {n} connection(s)"));
        wait_idle(engine.pid()).await?;
        let per_site = phase.payload_bytes / n as u64;
        let loopback_secs = limits::quic_loopback(n, per_site.max(1)).await?;

        steps.next(format!("rsync to {n} site(s)"));
        let rsync = if want("rsync", &mut peers_missing) {
            let dests: Vec<PathBuf> = (0..n)
                .map(|i| work.join(format!("rsync/{n}-{i}")))
                .collect();
            let r = peers::rsync_to(&image.path, &dests)?;
            let _ = std::fs::remove_dir_all(work.join("rsync"));
            Some(r)
        } else {
            None
        };
        let disk_limit_secs =
            (n as u64 * (image.data_len + ingest_stored_bytes)) as f64 / stage.disk_rate();
        seeding.push(SeedRound {
            sites: n,
            loopback_secs,
            of_loopback: loopback_secs / phase.seconds,
            disk_limit_secs,
            of_disk_limit: disk_limit_secs / phase.seconds,
            engine_cpu_per_site: phase.cost.engine_cpu_secs / n as f64,
            phase,
            rsync,
        });
    }

    client.close().await;
    engine.alive("the engine")?;
    drop(engine);

    Ok(LocalReport {
        cores: stage.threads,
        ingest_of_limit: slow_secs / ingest.seconds,
        slowest_stage: slow_name.to_string(),
        limits: stage,
        image,
        ingest,
        ingest_stored_bytes,
        casync_make: casync.map(|c| c.0),
        seeding,
        reassembly: reassembly.ok_or_else(|| BenchError::Failed("no seeding round ran".into()))?,
        casync_extract,
        peers_missing,
    })
}

/// Ingest: `seedcast push` of the image as its own process, no site targeted. Its CPU is
/// charged once it is reaped; its peak is its last `VmHWM` read while it ran (sampled every
/// 20 ms; the peak only grows). Returns the phase and the image's data bytes.
async fn ingest(
    bin: &Path,
    engine: &mut Proc,
    engine_dir: &Path,
    addr: &str,
    image: &ImageInfo,
    logs: &Path,
) -> Result<(Phase, u64), BenchError> {
    let e = engine.pid();
    e.reset_peak()?;
    let me = Pid::This;
    let (e0, reaped0) = (CpuSnapshot::take(&[e])?, me.reaped_children_cpu_secs()?);
    let t = Instant::now();
    let log = logs.join("push.log");
    let mut push = Command::new(bin)
        .args(["push", "--name", "bench-ingest", "--json"])
        .arg(&image.path)
        .env("SEEDCAST_ENGINE", addr)
        .env("SEEDCAST_TOKEN", engine_dir.join("admin.token"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let pid = Pid::Child(push.id());
    let mut client_peak = 0;
    while push.try_wait()?.is_none() {
        if let Ok(p) = pid.peak_rss() {
            client_peak = client_peak.max(p);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = push.wait_with_output()?;
    let seconds = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(BenchError::Process {
            what: format!("seedcast push: {}", out.status),
            log,
        });
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| BenchError::Failed(format!("push --json printed no JSON: {e}")))?;
    let field = |k: &str| {
        v[k].as_u64()
            .ok_or_else(|| BenchError::Failed(format!("push --json without {k}: {v}")))
    };
    let data_len = field("data_bytes")?;
    let cost = Cost {
        client_cpu_secs: me.reaped_children_cpu_secs()? - reaped0,
        engine_cpu_secs: e0.since()?,
        client_peak_rss: client_peak,
        engine_peak_rss: e.peak_rss()?,
        ..Cost::default()
    };
    Ok((
        Phase {
            seconds,
            data_rate: data_len as f64 / seconds,
            payload_bytes: field("bytes_uploaded")?,
            wire_bytes: 0,
            cost,
        },
        data_len,
    ))
}

pub(crate) fn free_udp_addr() -> std::io::Result<String> {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(format!("127.0.0.1:{port}"))
}

/// Wait for the engine's admin token, then connect as its admin.
pub(crate) async fn connect_admin(
    engine: &mut Proc,
    data: &Path,
    addr: &str,
) -> Result<Client, BenchError> {
    let token_path = data.join("admin.token");
    let t = Instant::now();
    loop {
        engine.alive("the engine")?;
        if token_path.exists()
            && let Ok(token) = Token::from_text_or_file(&token_path.display().to_string())
            && let Ok(c) = Client::connect(addr, &token).await
        {
            return Ok(c);
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Err(BenchError::Process {
                what: "the engine did not start within 60 s".into(),
                log: engine.log.clone(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` fresh sites with their agents (dir pools), every one connected.
async fn start_agents(
    bin: &Path,
    client: &Client,
    work: &Path,
    logs: &Path,
    addr: &str,
    n: usize,
) -> Result<Vec<(String, Proc)>, BenchError> {
    let mut agents = Vec::new();
    for i in 0..n {
        let site = format!("bench-{n}-{i}");
        let (token, _) = client.site_add(&site, 3600).await?;
        let token_file = work.join(format!("{site}.token"));
        std::fs::write(&token_file, token)?;
        let p = Proc::spawn(
            Command::new(bin)
                .arg("agent")
                .arg("--data")
                .arg(work.join(format!("agent-{site}")))
                .args(["--engine", addr, "--site", &site, "--token"])
                .arg(&token_file)
                .arg("--pool")
                .arg(work.join(format!("pool-{site}"))),
            logs.join(format!("agent-{site}.log")),
        )?;
        agents.push((site, p));
    }
    let t = Instant::now();
    loop {
        let sites = client.sites().await?;
        let up = agents
            .iter()
            .filter(|(s, _)| sites.iter().any(|i| &i.site == s && i.connected))
            .count();
        if up == n {
            return Ok(agents);
        }
        for (s, p) in &mut agents {
            p.alive(&format!("the agent of {s}"))?;
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err(BenchError::Failed(format!(
                "{up} of {n} agents connected in 120 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Push the (already ingested) image to `agents`' sites under `name` and measure from the
/// commit until every site has published.
/// Wait, at most a minute, until `pid` uses under 5 % of a core over a quarter second. The
/// engine indexes a version as delta bases in the background once a site has published
/// it (seconds of both cores for this benchmark's image): a phase timed meanwhile,
/// seedcast's or a peer's, would share the cores with that.
async fn wait_idle(pid: Pid) -> Result<(), BenchError> {
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        let before = CpuSnapshot::take(&[pid])?;
        tokio::time::sleep(Duration::from_millis(250)).await;
        if before.since()? < 0.0125 {
            break;
        }
    }
    Ok(())
}

async fn seed(
    client: &Client,
    engine: &mut Proc,
    agents: &mut [(String, Proc)],
    image: &ImageInfo,
    name: &str,
) -> Result<(Phase, ImageStatus), BenchError> {
    let sites: Vec<String> = agents.iter().map(|a| a.0.clone()).collect();
    wait_idle(engine.pid()).await?;
    peers::settle_disk()?;
    let mut push = PushOptions::new(name, vec![image.path.clone()]);
    push.sites = Some(sites.clone());
    // The client chunks and asks; nothing is uploaded (the engine holds every chunk).
    let committed = client.push(&push, |_| {}).await?;
    let e = engine.pid();
    let a: Vec<Pid> = agents.iter().map(|a| a.1.pid()).collect();
    e.reset_peak()?;
    for p in &a {
        p.reset_peak()?;
    }
    let (e0, a0) = (CpuSnapshot::take(&[e])?, CpuSnapshot::take(&a)?);
    let t = Instant::now();
    let status = client
        .watch(&committed.global_id, committed.version, |_| {})
        .await?;
    let seconds = t.elapsed().as_secs_f64();
    let cost = Cost {
        engine_cpu_secs: e0.since()?,
        agents_cpu_secs: a0.since()?,
        engine_peak_rss: e.peak_rss()?,
        agent_peak_rss: meter::max_peak(&a)?,
        ..Cost::default()
    };
    engine.alive("the engine")?;
    for (s, p) in agents.iter_mut() {
        p.alive(&format!("the agent of {s}"))?;
    }
    if let Some(p) = status
        .sites
        .iter()
        .find(|p| p.state != PlacementState::Published)
    {
        return Err(BenchError::Failed(format!(
            "{name}: site {} is {}: {}",
            p.site,
            p.state.as_str(),
            p.error.as_deref().unwrap_or("-")
        )));
    }
    let phase = Phase {
        seconds,
        data_rate: (status.data_len * sites.len() as u64) as f64 / seconds,
        payload_bytes: status.sites.iter().map(|p| p.bytes_sent).sum(),
        wire_bytes: status.sites.iter().map(|p| p.wire_bytes).sum(),
        cost,
    };
    Ok((phase, status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_double_up_to_the_sites_asked_for() {
        assert_eq!(rounds(1), vec![1]);
        assert_eq!(rounds(4), vec![1, 2, 4]);
        assert_eq!(rounds(6), vec![1, 2, 4, 6]);
        assert_eq!(rounds(8), vec![1, 2, 4, 8]);
    }
}
