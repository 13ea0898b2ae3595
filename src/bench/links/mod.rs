//! `seedcast bench links`: patch delivery and seeding over real-shaped links — slow, far,
//! lossy, cut — measured against what the link allows.
//!
//! Each run gives one fresh site its own link ([`netns`]: a network namespace, a veth pair,
//! `tbf` rate shaping both ways) and a relay ([`relay`]: delay, loss, reordering, outages).
//! The engine and this process (the client) stay on loopback; the agent runs inside the
//! site's namespace. A run:
//!
//! - **update**: the site is given the old image over the link unshaped, then the link is
//!   shaped and impaired and the image adapted to the new one (the real Debian v1 → v2 by
//!   default); timed from the commit until the site has published.
//! - **seed**: a generated image pushed to a fresh site over the shaped link.
//! - **outage**: the update, with the link cut for a while once part of it has travelled
//!   (and, with `restart`, the agent killed and started again during the cut).
//! - **rsync** and **zstd**: the same update by the tools people use ([`peers`]), over the
//!   same shaped link (TCP: the shaper's rate, not the relay's delay and loss).
//!
//! Judged against the link: the time the bytes that went down it need at its rate, plus
//! two round trips; and what the engine put into the link against what reached the site
//! (a sender overshooting a shallow queue pays for every drop twice).

pub mod netns;
pub mod peers;
pub mod relay;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use seedcast_core::protocol::{Congestion, ImageStatus, PlacementState};
use serde::Serialize;

use super::{BenchError, Proc, connect_admin, free_udp_addr};
use crate::client::{Change, Client, PushOptions};
use netns::{Net, Shape, SiteLink};
use relay::{Impairment, Relay};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link set-up: {0}")]
    Setup(String),
}

impl From<LinkError> for BenchError {
    fn from(e: LinkError) -> Self {
        BenchError::Failed(e.to_string())
    }
}

/// A link's shape: rate, round trip, loss, and how deep its bottleneck queue is.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Profile {
    pub name: String,
    pub rate_bps: u64,
    pub rtt_ms: u32,
    pub loss: f64,
    /// The bottleneck's queue, in milliseconds of its rate (tbf `latency`).
    pub queue_ms: u32,
}

impl Profile {
    fn new(name: &str, rate_bps: u64, rtt_ms: u32, loss: f64, queue_ms: u32) -> Self {
        Profile {
            name: name.into(),
            rate_bps,
            rtt_ms,
            loss,
            queue_ms,
        }
    }

    /// The profiles by name: `lan` 1 Gbit/s; `wan` 10 Mbit/s, 40 ms, 0.5 % loss; `thin`
    /// 2 Mbit/s, 120 ms, 1 %; `satellite` 1 Mbit/s, 600 ms, 1 %; `tbf` 2 Mbit/s with no
    /// delay or loss (only the shaper's queue: where overshooting shows alone).
    pub fn named(name: &str) -> Option<Profile> {
        Some(match name {
            "lan" => Profile::new("lan", 1_000_000_000, 0, 0.0, 20),
            "wan" => Profile::new("wan", 10_000_000, 40, 0.005, 100),
            "thin" => Profile::new("thin", 2_000_000, 120, 0.01, 100),
            "satellite" => Profile::new("satellite", 1_000_000, 600, 0.01, 300),
            "tbf" => Profile::new("tbf", 2_000_000, 0, 0.0, 300),
            _ => return None,
        })
    }

    pub const NAMES: [&'static str; 5] = ["lan", "wan", "thin", "satellite", "tbf"];

    pub fn shape(&self) -> Shape {
        Shape {
            rate_bps: self.rate_bps,
            queue_ms: self.queue_ms,
        }
    }

    pub fn impairment(&self) -> Impairment {
        Impairment {
            one_way_delay: Duration::from_millis(self.rtt_ms as u64 / 2),
            loss: self.loss,
            reorder: 0.0,
        }
    }
}

/// What one run does.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Update,
    Seed,
    /// The update with the link cut once a share of it has gone.
    Outage,
    /// As `Outage`, the agent also killed and restarted during the cut.
    Restart,
    /// The update by `rsync` to a daemon at the site.
    Rsync,
    /// The update as a `zstd --patch-from` file, copied to the site and applied there.
    Zstd,
}

impl Scenario {
    pub fn parse(s: &str) -> Option<Scenario> {
        Some(match s {
            "update" => Scenario::Update,
            "seed" => Scenario::Seed,
            "outage" => Scenario::Outage,
            "restart" => Scenario::Restart,
            "rsync" => Scenario::Rsync,
            "zstd" => Scenario::Zstd,
            _ => return None,
        })
    }

    /// Run by another tool (once per profile, whatever the congestion controllers).
    pub fn is_peer(self) -> bool {
        matches!(self, Scenario::Rsync | Scenario::Zstd)
    }
}

/// What `bench links` runs.
#[derive(Debug, Clone)]
pub struct LinksOptions {
    /// The `seedcast` binary engine and agents run as.
    pub bin: PathBuf,
    /// The old and new image of the update (the Debian pair by default).
    pub old: PathBuf,
    pub new: PathBuf,
    /// Size of the generated image a seed run pushes.
    pub seed_size: u64,
    /// Share of it that is data.
    pub seed_data_share: f64,
    pub profiles: Vec<Profile>,
    pub scenarios: Vec<Scenario>,
    /// How long an outage run cuts the link.
    pub outage: Duration,
    /// Congestion controllers to run each profile with (each a run of its own); empty:
    /// the engine's default.
    pub congestion: Vec<Congestion>,
    /// A rate limit set on each run's site (`site set --max-rate`).
    pub max_rate: Option<u64>,
    /// More arguments for `seedcast engine` (e.g. `--delta-level 12`).
    pub engine_args: Vec<String>,
    pub dir: Option<PathBuf>,
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct LinkRun {
    pub profile: Profile,
    pub scenario: Scenario,
    pub congestion: Option<Congestion>,
    pub max_rate: Option<u64>,
    /// From the commit until the site published.
    pub seconds: f64,
    /// Chunk payload sent to the site.
    pub payload_bytes: u64,
    /// The placement's count: every datagram both ways with UDP/IP headers.
    pub wire_bytes: u64,
    /// IP bytes the engine sent towards the site (into the relay, before any loss).
    pub engine_sent: u64,
    /// IP bytes that went down the link to the site (after the shaper's drops).
    pub link_down: u64,
    /// Datagrams the shaper dropped (its queue was full).
    pub shaper_drops: u64,
    /// Datagrams the relay dropped (loss and outage), both ways.
    pub relay_drops: u64,
    /// `link_down` at the link's rate plus two round trips (and the outage, if any).
    pub link_secs: f64,
    /// `(seconds − 2 RTT − outage) / (link_down at the rate)`: 1.0 keeps the link full.
    pub of_link: f64,
    /// `engine_sent / link_down`: what the engine put in for each byte the site got.
    pub sent_per_delivered: f64,
    /// What each step of a peer's run took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Everything `bench links` measured.
#[derive(Debug, Clone, Serialize)]
pub struct LinksReport {
    pub old: PathBuf,
    pub new: PathBuf,
    pub seed_size: u64,
    pub runs: Vec<LinkRun>,
}

/// An engine on loopback, this process as its client, and sites each on a link of its own:
/// what every run shares, and what tests build their own runs from.
#[derive(Debug)]
pub struct Lab {
    bin: PathBuf,
    net: Net,
    pub work: PathBuf,
    logs: PathBuf,
    engine: Proc,
    engine_addr: std::net::SocketAddr,
    pub client: Client,
    sites: usize,
    /// Keeps a temporary work directory while the lab runs.
    _tmp: Option<tempfile::TempDir>,
}

/// One site on its own link, its relay and its agent.
#[derive(Debug)]
pub struct Site {
    pub name: String,
    pub link: SiteLink,
    pub relay: Relay,
    agent: Proc,
    agent_cmd: Vec<String>,
    log: PathBuf,
}

impl Site {
    /// Kill the agent (SIGKILL) and start it again on the same data.
    pub fn restart_agent(&mut self) -> Result<(), BenchError> {
        self.agent.kill();
        self.agent = Proc::spawn(Command::new("ip").args(&self.agent_cmd), self.log.clone())?;
        Ok(())
    }

    /// Fail, naming its log, if the agent has exited.
    pub fn alive(&mut self) -> Result<(), BenchError> {
        self.agent.alive(&format!("the agent of {}", self.name))
    }
}

impl Lab {
    /// Start an engine (`bin engine`, extra `engine_args`) in `dir` (a temporary directory
    /// when `None`) and make the hub namespace sites' links join.
    pub async fn start(
        bin: &Path,
        dir: Option<&Path>,
        engine_args: &[&str],
    ) -> Result<Lab, BenchError> {
        let (work, tmp) = match dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (d.to_path_buf(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("seedcast-links")
                    .tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let logs = work.join("logs");
        std::fs::create_dir_all(&logs)?;
        let net = Net::create()?;
        let engine_dir = work.join("engine");
        let addr = free_udp_addr()?;
        let mut engine = Proc::spawn(
            Command::new(bin)
                .arg("engine")
                .arg("--data")
                .arg(&engine_dir)
                .args(["--listen", &addr])
                .args(engine_args),
            logs.join("engine.log"),
        )?;
        let client = connect_admin(&mut engine, &engine_dir, &addr).await?;
        Ok(Lab {
            bin: bin.to_path_buf(),
            net,
            work,
            logs,
            engine,
            engine_addr: addr
                .parse()
                .map_err(|e| BenchError::Failed(format!("{e}")))?,
            client,
            sites: 0,
            _tmp: tmp,
        })
    }

    /// A fresh site on a new link (unshaped, unimpaired), its agent connected.
    pub async fn site(&mut self) -> Result<Site, BenchError> {
        self.sites += 1;
        let name = format!("link-{}", self.sites);
        let link = self.net.add_site()?;
        let hub_ip = link.hub_ip;
        let listen = netns::in_netns(&link.hub_ns, move || std::net::UdpSocket::bind((hub_ip, 0)))?;
        let relay = Relay::start(
            listen,
            self.engine_addr,
            Impairment::default(),
            Duration::from_secs(6 * 3600),
        )?;
        let (token, _) = self.client.site_add(&name, 3600).await?;
        let token_file = self.work.join(format!("{name}.token"));
        std::fs::write(&token_file, token)?;
        let s = |p: PathBuf| p.display().to_string();
        let agent_cmd = vec![
            "netns".into(),
            "exec".into(),
            link.ns.clone(),
            s(self.bin.clone()),
            "agent".into(),
            "--data".into(),
            s(self.work.join(format!("agent-{name}"))),
            "--engine".into(),
            relay.addr.to_string(),
            "--site".into(),
            name.clone(),
            "--token".into(),
            s(token_file),
            "--pool".into(),
            s(self.work.join(format!("pool-{name}"))),
            // The harness reads the agent's "connected" line whatever filter the caller
            // set (SEEDCAST_LOG=warn hid it, and every run failed waiting for it).
            "--log".into(),
            format!(
                "{},seedcast_agents::session=info",
                std::env::var("SEEDCAST_LOG").unwrap_or_else(|_| "info".into())
            ),
        ];
        let log = self.logs.join(format!("agent-{name}.log"));
        let agent = Proc::spawn(Command::new("ip").args(&agent_cmd), log.clone())?;
        let mut site = Site {
            name,
            link,
            relay,
            agent,
            agent_cmd,
            log,
        };
        self.wait_connected(&mut site).await?;
        Ok(site)
    }

    /// Give `site` the link `profile` describes, and reconnect its agent over it: a
    /// connection made on the unshaped link would carry its round-trip estimate (a fraction
    /// of a millisecond) into the first transfer, and QUIC then takes every datagram that is
    /// merely late for lost — which no real site, connected over its own link, sees.
    pub async fn shape(&mut self, site: &mut Site, profile: &Profile) -> Result<(), BenchError> {
        site.relay.set(profile.impairment());
        site.link
            .shape(Some(profile.shape()), Some(profile.shape()))?;
        let from = std::fs::metadata(&site.log).map_or(0, |m| m.len());
        site.restart_agent()?;
        // The engine lists the site as connected until the new connection replaces the
        // old one: wait for the agent's own word that it is connected again.
        let t = Instant::now();
        loop {
            let log = std::fs::read(&site.log).unwrap_or_default();
            if log.len() as u64 > from
                && String::from_utf8_lossy(&log[from as usize..]).contains("connected site=")
            {
                break;
            }
            site.alive()?;
            if t.elapsed() > Duration::from_secs(120) {
                return Err(BenchError::Process {
                    what: format!("{} did not reconnect in 120 s", site.name),
                    log: site.log.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.wait_connected(site).await
    }

    /// Wait until the site's agent is connected (120 s at most).
    pub async fn wait_connected(&mut self, site: &mut Site) -> Result<(), BenchError> {
        let t = Instant::now();
        loop {
            if self
                .client
                .sites()
                .await?
                .iter()
                .any(|i| i.site == site.name && i.connected)
            {
                return Ok(());
            }
            site.alive()?;
            self.engine.alive("the engine")?;
            if t.elapsed() > Duration::from_secs(120) {
                return Err(BenchError::Process {
                    what: format!("{} did not connect in 120 s", site.name),
                    log: site.log.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Push `file` (as `disk.raw`) to `sites` only; the status once all have published.
    pub async fn push(
        &self,
        name: &str,
        file: &Path,
        sites: &[&Site],
    ) -> Result<ImageStatus, BenchError> {
        let c = self.commit_push(name, file, sites).await?;
        let s = self.client.watch(&c.global_id, c.version, |_| {}).await?;
        published(&s)?;
        Ok(s)
    }

    /// Push `file` (as `disk.raw`) to `sites`; returns at the commit.
    pub async fn commit_push(
        &self,
        name: &str,
        file: &Path,
        sites: &[&Site],
    ) -> Result<ImageStatus, BenchError> {
        let mut p = PushOptions::new(name, vec![disk_raw(&self.work, file)?]);
        p.sites = Some(sites.iter().map(|s| s.name.clone()).collect());
        Ok(self.client.push(&p, |_| {}).await?)
    }

    /// The engine's address and admin token file, as `SEEDCAST_ENGINE` / `SEEDCAST_TOKEN`.
    pub fn engine_env(&self) -> (String, String) {
        (
            self.engine_addr.to_string(),
            self.work
                .join("engine")
                .join("admin.token")
                .display()
                .to_string(),
        )
    }

    /// Fail, naming its log, if the engine has exited.
    pub fn engine_alive(&mut self) -> Result<(), BenchError> {
        self.engine.alive("the engine")
    }
}

/// `file` under the name `disk.raw` (a symlink in a directory of its own), so every
/// version of the image names its disk the same.
fn disk_raw(work: &Path, file: &Path) -> Result<PathBuf, BenchError> {
    let file = std::fs::canonicalize(file)
        .map_err(|e| BenchError::Image(format!("{}: {e}", file.display())))?;
    let d = work.join(format!(
        "as-disk-{}",
        blake3::hash(file.as_os_str().as_encoded_bytes()).to_hex()
    ));
    std::fs::create_dir_all(&d)?;
    let p = d.join("disk.raw");
    if !p.exists() {
        std::os::unix::fs::symlink(&file, &p)?;
    }
    Ok(p)
}

/// Every site of the status' version published, or which did not and why.
pub fn published(s: &ImageStatus) -> Result<(), BenchError> {
    match s
        .sites
        .iter()
        .find(|p| p.version == s.version && p.state != PlacementState::Published)
    {
        Some(p) => Err(BenchError::Failed(format!(
            "{}: site {} is {}: {}",
            s.name,
            p.site,
            p.state.as_str(),
            p.error.as_deref().unwrap_or("-")
        ))),
        None => Ok(()),
    }
}

/// Run every profile × scenario (× congestion controller).
pub async fn run_links(
    opts: &LinksOptions,
    mut on_run: impl FnMut(&LinkRun),
) -> Result<LinksReport, BenchError> {
    for p in [&opts.old, &opts.new] {
        if !p.is_file() {
            return Err(BenchError::Image(format!(
                "{} not found: build the Debian pair with ../shared/testdata/make-images.sh DIR, or give --old/--new",
                p.display()
            )));
        }
    }
    let engine_args: Vec<&str> = opts.engine_args.iter().map(String::as_str).collect();
    let mut lab = Lab::start(&opts.bin, opts.dir.as_deref(), &engine_args).await?;
    let seed_image = if opts.scenarios.contains(&Scenario::Seed) {
        let d = lab.work.join("seed");
        std::fs::create_dir_all(&d)?;
        let p = d.join("disk.raw");
        crate::synth::write_disk_share(
            &p,
            opts.seed_size,
            "seedcast bench links",
            opts.seed_data_share,
        )?;
        Some(p)
    } else {
        None
    };
    let ccs: Vec<Option<Congestion>> = if opts.congestion.is_empty() {
        vec![None]
    } else {
        opts.congestion.iter().copied().map(Some).collect()
    };
    let mut runs = Vec::new();
    for profile in &opts.profiles {
        for cc in &ccs {
            for scenario in opts.scenarios.iter().filter(|s| !s.is_peer()) {
                let r = one_run(
                    &mut lab,
                    opts,
                    profile,
                    *scenario,
                    *cc,
                    seed_image.as_deref(),
                )
                .await?;
                on_run(&r);
                runs.push(r);
            }
        }
        for scenario in opts.scenarios.iter().filter(|s| s.is_peer()) {
            let r = peer_run(&mut lab, opts, profile, *scenario).await?;
            on_run(&r);
            runs.push(r);
        }
    }
    lab.client.close().await;
    Ok(LinksReport {
        old: opts.old.clone(),
        new: opts.new.clone(),
        seed_size: opts.seed_size,
        runs,
    })
}

async fn one_run(
    rig: &mut Lab,
    opts: &LinksOptions,
    profile: &Profile,
    scenario: Scenario,
    cc: Option<Congestion>,
    seed_image: Option<&Path>,
) -> Result<LinkRun, BenchError> {
    let mut site = rig.site().await?;
    rig.client
        .site_set(&site.name, opts.max_rate.map(Some), cc.map(Some))
        .await?;
    let name = format!("{}-{}", site.name, profile.name);
    // The old version travels unshaped: only the update is measured.
    let gid = match scenario {
        Scenario::Seed => None,
        _ => Some(rig.push(&name, &opts.old, &[&site]).await?.global_id),
    };
    rig.shape(&mut site, profile).await?;
    let (hub0, relay0) = (site.link.hub_counters()?, relay_counts(&site.relay));
    let committed = match gid {
        None => {
            let file = seed_image.ok_or_else(|| BenchError::Failed("no seed image".into()))?;
            rig.commit_push(&name, file, &[&site]).await?
        }
        Some(g) => {
            let change = Change::Replace {
                path: "disk.raw".into(),
                file: opts.new.clone(),
            };
            rig.client.adapt(&g, &[change], 3).await?
        }
    };
    // The clock starts at the commit: the client's chunking and upload are loopback work.
    let t = Instant::now();
    let mut outage = Duration::ZERO;
    if matches!(scenario, Scenario::Outage | Scenario::Restart) {
        outage = opts.outage;
        cut_midway(
            rig,
            &mut site,
            &committed,
            outage,
            scenario == Scenario::Restart,
        )
        .await?;
    }
    let status = rig
        .client
        .watch(&committed.global_id, committed.version, |_| {})
        .await?;
    let seconds = t.elapsed().as_secs_f64();
    published(&status)?;
    let hub = site.link.hub_counters()?.since(&hub0);
    let relay = relay_counts(&site.relay);
    let p = status
        .sites
        .iter()
        .find(|p| p.site == site.name)
        .ok_or_else(|| BenchError::Failed("the site is missing from the status".into()))?;
    // Ethernet headers are the link's own; IP bytes are what both ends count.
    let link_down = hub.tx_bytes.saturating_sub(14 * hub.tx_packets);
    let rtt = profile.rtt_ms as f64 / 1000.0;
    let at_rate = link_down as f64 * 8.0 / profile.rate_bps as f64;
    let run = LinkRun {
        profile: profile.clone(),
        scenario,
        congestion: cc,
        max_rate: opts.max_rate,
        seconds,
        payload_bytes: p.bytes_sent,
        wire_bytes: p.wire_bytes,
        engine_sent: relay.0 - relay0.0,
        link_down,
        shaper_drops: hub.qdisc_drops,
        relay_drops: relay.1 - relay0.1,
        link_secs: at_rate + 2.0 * rtt + outage.as_secs_f64(),
        of_link: (seconds - 2.0 * rtt - outage.as_secs_f64()).max(0.0) / at_rate.max(1e-9),
        sent_per_delivered: (relay.0 - relay0.0) as f64 / link_down.max(1) as f64,
        detail: None,
    };
    site.alive()?;
    rig.engine_alive()?;
    Ok(run)
}

/// The update by a peer tool over a fresh site's link, shaped as `profile`.
async fn peer_run(
    rig: &mut Lab,
    opts: &LinksOptions,
    profile: &Profile,
    scenario: Scenario,
) -> Result<LinkRun, BenchError> {
    let mut site = rig.site().await?;
    rig.shape(&mut site, profile).await?;
    let (link, work) = (site.link.clone(), rig.work.clone());
    let (old, new) = (opts.old.clone(), opts.new.clone());
    let run = tokio::task::spawn_blocking(move || match scenario {
        Scenario::Rsync => peers::rsync(&link, &work, &old, &new),
        _ => peers::zstd_patch(&link, &work, &old, &new),
    })
    .await
    .map_err(|e| BenchError::Failed(e.to_string()))??;
    // IP bytes, as for seedcast's runs; TCP's own bytes both ways are what the tool sent.
    let link_down = run.down.tx_bytes.saturating_sub(14 * run.down.tx_packets);
    let rtt = profile.rtt_ms as f64 / 1000.0;
    let at_rate = link_down as f64 * 8.0 / profile.rate_bps as f64;
    Ok(LinkRun {
        profile: profile.clone(),
        scenario,
        congestion: None,
        max_rate: None,
        seconds: run.seconds,
        payload_bytes: 0,
        wire_bytes: link_down + run.down.rx_bytes.saturating_sub(14 * run.down.rx_packets),
        engine_sent: link_down,
        link_down,
        shaper_drops: run.down.qdisc_drops,
        relay_drops: 0,
        link_secs: at_rate + 2.0 * rtt,
        of_link: (run.seconds - 2.0 * rtt).max(0.0) / at_rate.max(1e-9),
        sent_per_delivered: 1.0,
        detail: Some(run.detail),
    })
}

/// (bytes the engine sent into the relay, datagrams the relay dropped both ways).
fn relay_counts(r: &Relay) -> (u64, u64) {
    let s = r.stats();
    (
        s.from_engine.bytes(),
        s.from_engine.dropped() + s.from_agents.dropped(),
    )
}

/// Once a third of the transfer has gone, cut the link for the outage (and restart the
/// agent in the middle of it when asked).
pub async fn cut_midway(
    rig: &Lab,
    site: &mut Site,
    committed: &ImageStatus,
    outage: Duration,
    restart: bool,
) -> Result<(), BenchError> {
    let t = Instant::now();
    loop {
        let s = rig.client.status(&committed.global_id).await?;
        let p = s.sites.iter().find(|p| p.site == site.name);
        if let Some(p) = p {
            if p.bytes_needed > 0 && p.bytes_sent * 3 >= p.bytes_needed {
                break;
            }
            if p.state == PlacementState::Published {
                return Err(BenchError::Failed(
                    "the update finished before the link could be cut".into(),
                ));
            }
        }
        if t.elapsed() > Duration::from_secs(600) {
            return Err(BenchError::Failed(
                "the update never got a third of the way".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    site.relay.cut(outage);
    if restart {
        tokio::time::sleep(outage / 3).await;
        // SIGKILL: what it verified before is all it has.
        site.restart_agent()?;
    }
    Ok(())
}

/// A table for people.
pub fn table(r: &LinksReport) -> String {
    let mut out = format!(
        "{:<10} {:<8} {:<8} {:>8} {:>8} {:>7} {:>11} {:>11} {:>7} {:>7}\n",
        "PROFILE",
        "RUN",
        "CC",
        "SECONDS",
        "LINK S",
        "×LINK",
        "DOWN LINK",
        "ENGINE SENT",
        "SENT/GOT",
        "DROPS"
    );
    for x in &r.runs {
        out += &format!(
            "{:<10} {:<8} {:<8} {:>8.1} {:>8.1} {:>7.2} {:>11} {:>11} {:>7.2} {:>7}\n",
            x.profile.name,
            format!("{:?}", x.scenario).to_lowercase(),
            x.congestion.map_or("default", |c| c.name()),
            x.seconds,
            x.link_secs,
            x.of_link,
            x.link_down,
            x.engine_sent,
            x.sent_per_delivered,
            x.shaper_drops + x.relay_drops,
        );
        if let Some(d) = &x.detail {
            out += &format!("{:<10} {d}\n", "");
        }
    }
    out
}

/// The same table in Markdown, as docs/BENCHMARKS.md shows it.
pub fn markdown(r: &LinksReport) -> String {
    let mut out = String::from(
        "| profile | run | controller | seconds | link s | × link | down the link (B) | engine sent / site got | detail |\n\
         | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for x in &r.runs {
        out += &format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} | {} | {:.2} | {} |\n",
            x.profile.name,
            format!("{:?}", x.scenario).to_lowercase(),
            x.congestion.map_or("default", |c| c.name()),
            x.seconds,
            x.link_secs,
            x.of_link,
            x.link_down,
            x.sent_per_delivered,
            x.detail.as_deref().unwrap_or(""),
        );
    }
    out
}
