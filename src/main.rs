//! The `seedcast` binary: parses the command line and dispatches to library calls.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use seedcast::client::{AdaptOptions, Change, Client, PushOptions};
use seedcast::output;
use seedcast::sites::SiteKind;
use seedcast_agents::SiteConfig;
use seedcast_agents::adapters::{AdapterConfig, AdapterFlags};
use seedcast_core::GlobalId;
use seedcast_core::protocol::ImageStatus;
use seedcast_net::pki::Token;

/// jemalloc for every allocation of the process, RocksDB's (C++) included. With glibc's
/// malloc, engine and agent held freed chunk buffers in per-thread arenas: seeding a 16 GiB
/// image peaked the agent at 316 MiB and the engine at 258 MiB, against 229 and 192 MiB with
/// `MALLOC_ARENA_MAX=2` (same run, `bench local`, docs/BENCHMARKS.md).
#[cfg(all(target_os = "linux", not(target_env = "msvc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(
    name = "seedcast",
    version,
    about = "Distribute VM images and their updates to many sites, moving only the chunks each site lacks"
)]
struct Cli {
    /// Log filter (tracing syntax), e.g. `info` or `seedcast_engine=debug`. Logs go to stderr.
    #[arg(long, global = true, env = "SEEDCAST_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the engine is and the admin token.
#[derive(Args, Debug)]
struct Conn {
    /// Engine address, host:port.
    #[arg(long, env = "SEEDCAST_ENGINE")]
    engine: String,
    /// The admin token (its text, or the path of DATA/admin.token).
    #[arg(long, env = "SEEDCAST_TOKEN", hide_env_values = true)]
    token: String,
}

/// What to print after a command that makes a version.
#[derive(Args, Debug)]
struct Finish {
    /// Return only once every target site has published (or failed).
    #[arg(long)]
    wait: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Caps on what one image may describe (engine and agent alike): a push, block or
/// deployment over one is refused, naming it.
#[derive(Args, Debug)]
struct LimitArgs {
    /// Longest file of an image, holes included (a disk's virtual size).
    #[arg(long, default_value = "4TiB", value_parser = parse_size)]
    max_file_size: u64,
    /// Longest image: its files' lengths added up, holes included.
    #[arg(long, default_value = "8TiB", value_parser = parse_size)]
    max_image_size: u64,
    /// Most data (not holes) one image may make a site write.
    #[arg(long, default_value = "1TiB", value_parser = parse_size)]
    max_image_data: u64,
}

impl LimitArgs {
    fn limits(&self) -> seedcast_core::manifest::Limits {
        seedcast_core::manifest::Limits {
            max_file_len: self.max_file_size,
            max_image_len: self.max_image_size,
            max_data_len: self.max_image_data,
            ..Default::default()
        }
    }
}

/// A byte size as people write it: `4TiB`, `512 MiB`, `10GB`, `4096`.
fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.05..=1.0).contains(&v) => Ok(v),
        Ok(v) => Err(format!("{v} is not between 0.05 and 1")),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let b: bytesize::ByteSize = s.trim().parse()?;
    if b.as_u64() == 0 {
        return Err("must be more than 0 bytes".into());
    }
    Ok(b.as_u64())
}

#[derive(Args, Debug)]
struct EngineArgs {
    /// Data directory: catalog, chunk packs, CA, admin.token (and join.token with
    /// --open-enrollment).
    #[arg(long)]
    data: PathBuf,
    /// Let any new site enroll with DATA/join.token (labs, demos). Without it a site
    /// enrolls only with the single-use token `seedcast site add NAME` prints.
    #[arg(long)]
    open_enrollment: bool,
    /// How long a site certificate lives (agents renew it when a third is left).
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    site_cert_lifetime: std::time::Duration,
    /// UDP address to listen on.
    #[arg(long, default_value = "0.0.0.0:7447")]
    listen: SocketAddr,
    /// zstd level of the delta groups sent to sites that hold an earlier version
    /// (1-22; higher: fewer bytes, more CPU, spent once for all sites).
    #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(i32).range(1..=22))]
    delta_level: i32,
    /// Adapt each transfer's delta level to its site's link, up to --delta-level: lower
    /// while the link waits for the encoder, higher while encoded data queues for it (for
    /// links faster than zstd at --delta-level encodes on this host).
    #[arg(long)]
    delta_adapt: bool,
    /// Stream data buffered per connected site (sent and not yet acknowledged, or queued):
    /// most of the engine's memory per site. Enough for the bandwidth-delay product of the
    /// fastest site link (8 MiB: 1.6 Gbit/s at 40 ms).
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    send_window: u64,
    /// Recently read chunks kept for the next site that is sent them, so sites seeded
    /// together share one read and one buffer per chunk (0: off).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    read_cache: u64,
    /// Parallel data streams per transfer to one site.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    streams: u32,
    /// The most the engine sends to all sites together, on the wire (e.g. 100Mbit, 2MB/s;
    /// off: no limit). A site's own limit: `seedcast site set NAME --max-rate`.
    #[arg(long, default_value = "off", value_parser = parse_rate)]
    max_rate: RateArg,
    /// The congestion controller of sites that have none of their own (`site set
    /// --congestion`): cubic, newreno, bbr or delivery (seedcast's BBR-style controller for thin, lossy or far links).
    #[arg(long, default_value = "cubic")]
    congestion: seedcast_core::protocol::Congestion,
    #[command(flatten)]
    limits: LimitArgs,
}

/// A rate limit as given: bits per second, `None` for off.
#[derive(Debug, Clone, Copy)]
struct RateArg(Option<u64>);

fn parse_rate(s: &str) -> Result<RateArg, String> {
    seedcast_core::rate::parse_rate(s)
        .map(RateArg)
        .map_err(|e| e.to_string())
}

/// A congestion controller as given: `None` for the engine's default.
#[derive(Debug, Clone, Copy)]
struct CongestionArg(Option<seedcast_core::protocol::Congestion>);

/// A site's agent: flags, a site config file, or both (flags win).
#[derive(Args, Debug)]
struct AgentArgs {
    /// A site config file (TOML: site, engine, data, token, and an [adapter] table).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory: site certificate and the agent database.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Engine address, host:port.
    #[arg(long, env = "SEEDCAST_ENGINE")]
    engine: Option<String>,
    /// The engine's join token (text or path); needed only for the first start.
    #[arg(long, env = "SEEDCAST_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// This site's name (a-z, 0-9, '-', '_').
    #[arg(long)]
    site: Option<String>,
    /// The site's local image service: dir, qcow2, glance, oci or s3 (`dir` when only --pool
    /// is given).
    #[arg(long)]
    adapter: Option<String>,
    /// dir, qcow2: the pool directory.
    #[arg(long)]
    pool: Option<PathBuf>,
    /// qcow2: compress the clusters of full images (zstd).
    #[arg(long, value_name = "zstd")]
    compress: Option<String>,
    /// qcow2: publish updates as overlays on the previous version.
    #[arg(long)]
    overlays: bool,
    /// oci: the registry, http://HOST:PORT (plain HTTP) or https://HOST[:PORT].
    #[arg(long)]
    registry: Option<String>,
    /// oci: the repository images go to.
    #[arg(long)]
    repository: Option<String>,
    /// oci: a containers auth file (as `skopeo login` / `podman login` write).
    #[arg(long)]
    auth_file: Option<PathBuf>,
    /// s3: the object store's URL (credentials from the AWS_* environment).
    #[arg(long)]
    endpoint: Option<String>,
    /// s3: the bucket (it must exist).
    #[arg(long)]
    bucket: Option<String>,
    /// s3: a key prefix for every object.
    #[arg(long)]
    prefix: Option<String>,
    /// glance: Glance's URL (default: from the Keystone service catalog).
    #[arg(long)]
    url: Option<String>,
    /// glance: authenticate with this clouds.yaml entry (default: the OS_* variables).
    #[arg(long)]
    os_cloud: Option<String>,
    /// glance: upload disks as raw or qcow2 (default qcow2).
    #[arg(long)]
    disk_format: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
}

impl AgentArgs {
    /// The file's settings (if any) with every flag given laid over them.
    fn site_config(self) -> Result<SiteConfig> {
        let file = match &self.config {
            Some(p) => SiteConfig::load(p)?,
            None => SiteConfig::default(),
        };
        let flags = AdapterFlags {
            pool: self.pool,
            compress: self.compress,
            overlays: self.overlays,
            registry: self.registry,
            repository: self.repository,
            auth_file: self.auth_file,
            endpoint: self.endpoint,
            bucket: self.bucket,
            prefix: self.prefix,
            url: self.url,
            os_cloud: self.os_cloud,
            disk_format: self.disk_format,
        };
        let adapter = match self.adapter {
            None if flags == AdapterFlags::default() => None,
            kind => Some(AdapterConfig::from_flags(
                kind.as_deref().unwrap_or("dir"),
                flags,
            )?),
        };
        let flags = SiteConfig {
            site: self.site,
            engine: self.engine,
            data: self.data,
            token: self.token,
            adapter,
        };
        Ok(file.overlay(flags))
    }
}

#[derive(Args, Debug)]
struct PushArgs {
    #[command(flatten)]
    conn: Conn,
    /// A name for people (the global id is what identifies the image).
    #[arg(long)]
    name: String,
    /// The image's files (disk images, kernel, initrd, metadata …), known by base name.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Target sites, comma-separated (default: every site the engine knows).
    #[arg(long, value_delimiter = ',')]
    sites: Option<Vec<String>>,
    /// A file you hold whose chunks the engine has (an earlier version of the image, raw):
    /// new chunks are uploaded as zstd deltas against it, as `zstd --patch-from` would.
    /// Repeatable.
    #[arg(long = "base", value_name = "FILE")]
    bases: Vec<PathBuf>,
    /// zstd level of the deltas made against --base (1-22).
    #[arg(long, default_value_t = 19, value_name = "LEVEL")]
    delta_level: i32,
    #[command(flatten)]
    finish: Finish,
}

#[derive(Args, Debug)]
struct AdaptArgs {
    #[command(flatten)]
    conn: Conn,
    global_id: String,
    /// A new version of a file of the image: PATH=NEWFILE.
    #[arg(long = "file", value_name = "PATH=NEWFILE")]
    files: Vec<String>,
    /// Bytes of DATAFILE written at OFFSET of file PATH: PATH@OFFSET=DATAFILE.
    #[arg(long = "write", value_name = "PATH@OFFSET=DATAFILE")]
    writes: Vec<String>,
    /// A file added to the image: PATH=FILE.
    #[arg(long = "add", value_name = "PATH=FILE")]
    adds: Vec<String>,
    /// A file removed from the image.
    #[arg(long = "remove", value_name = "PATH")]
    removes: Vec<String>,
    /// A file you hold whose chunks the engine has (an earlier version of the image, raw):
    /// new chunks are uploaded as zstd deltas against it, as `zstd --patch-from` would.
    /// Repeatable.
    #[arg(long = "base", value_name = "FILE")]
    bases: Vec<PathBuf>,
    /// zstd level of the deltas made against --base (1-22).
    #[arg(long, default_value_t = 19, value_name = "LEVEL")]
    delta_level: i32,
    #[command(flatten)]
    finish: Finish,
}

impl AdaptArgs {
    /// The changes, in the order they apply: removes, files, adds, writes.
    fn changes(&self) -> Result<Vec<Change>> {
        let mut out: Vec<Change> = self
            .removes
            .iter()
            .map(|r| Change::Remove { path: r.clone() })
            .collect();
        for f in &self.files {
            out.push(Change::parse_file(f)?);
        }
        for a in &self.adds {
            out.push(Change::parse_add(a)?);
        }
        for w in &self.writes {
            out.push(Change::parse_write(w)?);
        }
        Ok(out)
    }
}

#[derive(Args, Debug)]
struct ImageArgs {
    #[command(flatten)]
    conn: Conn,
    global_id: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RollbackArgs {
    #[command(flatten)]
    conn: Conn,
    global_id: String,
    /// The version to go back to.
    #[arg(long)]
    to: u32,
    #[command(flatten)]
    finish: Finish,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    conn: Conn,
    global_id: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct SitesArgs {
    #[command(flatten)]
    conn: Conn,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum SiteCmd {
    /// Make a single-use token that enrolls the site NAME (printed alone on stdout; with
    /// --json one object {"site", "token", "expires_at"}). Give it to the site's agent as
    /// --token FILE or SEEDCAST_TOKEN.
    Add(SiteAddArgs),
    /// Forget a site's certificate, unused tokens and revocation: its agent is cut off and
    /// a new `site add` token can enroll the name again.
    Reset(RevokeArgs),
    /// Set how the engine sends to a site (kept in the catalog, applied at once, shown by
    /// `sites`): a rate limit on the wire and the congestion controller.
    Set(SiteSetArgs),
}

#[derive(Args, Debug)]
struct SiteSetArgs {
    #[command(flatten)]
    conn: Conn,
    site: String,
    /// The most the engine sends to the site, on the wire: 5Mbit, 500kbit, 1Gbit, 2MB/s
    /// (bytes); off: only the engine-wide limit.
    #[arg(long, value_parser = parse_rate)]
    max_rate: Option<RateArg>,
    /// cubic, newreno, bbr, delivery, or default (the engine's --congestion).
    #[arg(long, value_parser = parse_congestion)]
    congestion: Option<CongestionArg>,
    /// Print one JSON object (the site as `sites --json` shows it).
    #[arg(long)]
    json: bool,
}

fn parse_congestion(s: &str) -> Result<CongestionArg, String> {
    if s.eq_ignore_ascii_case("default") {
        return Ok(CongestionArg(None));
    }
    s.parse().map(|c| CongestionArg(Some(c)))
}

#[derive(Args, Debug)]
struct SiteAddArgs {
    #[command(flatten)]
    conn: Conn,
    site: String,
    /// How long the token may be used (e.g. 30m, 24h, 7d; at most a year).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    expires: std::time::Duration,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RevokeArgs {
    #[command(flatten)]
    conn: Conn,
    site: String,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Keep the demo's files here instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size of the generated disk image in MiB.
    #[arg(long, default_value_t = 256)]
    disk_mib: u64,
    /// One site per entry, of that kind (dir, qcow2, oci, s3, glance; `all` for one of
    /// each). The services they need are started on 127.0.0.1 for the demo.
    #[arg(long, value_delimiter = ',', default_value = "dir,dir,dir")]
    adapters: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the engine (the management node).
    Engine(EngineArgs),
    /// Run a site's agent (settings from --config FILE, each overridden by its flag).
    Agent(Box<AgentArgs>),
    /// Register an image (a set of files) and distribute it; prints its global id.
    Push(PushArgs),
    /// Send an adaptation block: the next version of an image, made by these changes (applied
    /// as --remove, --file, --add, then --write in the order given), delivered to every site.
    Adapt(AdaptArgs),
    /// List an image's versions with their sizes and what each block changed.
    History(ImageArgs),
    /// Make every site serve an earlier version again (as a new version).
    Rollback(RollbackArgs),
    /// Show an image across its sites, or every image.
    Status(StatusArgs),
    /// List the sites the engine knows.
    Sites(SitesArgs),
    /// Revoke a site's certificate: its agent is disconnected and refused from then on.
    Revoke(RevokeArgs),
    /// Enroll sites: `site add NAME` makes a site token, `site reset NAME` re-admits a name.
    #[command(subcommand)]
    Site(SiteCmd),
    /// Run an engine and three agents on loopback, push a generated image, check every copy.
    Demo(DemoArgs),
    /// Verify an engine's or an agent's data directory (it may be running); exits 1 when
    /// anything is damaged. --repair (with it stopped) fixes what can be fixed.
    Check(CheckArgs),
    /// Measure throughput: `bench local` runs ingest, seeding and reassembly on this machine
    /// beside their limits and peers.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// An engine and agents on 127.0.0.1 (separate processes): ingest, seeding to 1, 2, 4 …
    /// sites and reassembly from a site's cache, each beside the machine's stage limits, a
    /// plain QUIC transfer of the same bytes, and casync / rsync when installed.
    Local(BenchLocalArgs),
    /// Measure the real path to one connected site through a running engine: round trip,
    /// raw throughput of its connection, and the chunk pipeline's rate (stored chunks sent,
    /// verified and written at the agent, then discarded) — a slow link or a slow site.
    /// Nothing is published.
    Site(BenchSiteArgs),
    /// Updates and seeds over real-shaped links (needs root): each run's site in a network
    /// namespace behind a veth pair shaped with tc tbf and a relay adding delay, loss and
    /// outages; times judged against what the link allows.
    Links(BenchLinksArgs),
}

#[derive(Args, Debug)]
struct BenchLinksArgs {
    /// Directory with v1.raw and v2.raw (../shared/testdata/make-images.sh DIR).
    #[arg(long, default_value = "~/.cache/seedcast-images")]
    images: String,
    /// The old image of the update (default: IMAGES/v1.raw).
    #[arg(long)]
    old: Option<PathBuf>,
    /// The new image of the update (default: IMAGES/v2.raw).
    #[arg(long)]
    new: Option<PathBuf>,
    /// Link profiles, comma-separated: lan, wan, thin, satellite, tbf.
    #[arg(long, default_value = "wan,thin,satellite,tbf", value_delimiter = ',')]
    profile: Vec<String>,
    /// Runs per profile, comma-separated: update, seed, outage, restart; and the peers
    /// rsync (to a daemon at the site) and zstd (--patch-from file copied and applied).
    #[arg(long, default_value = "update,seed", value_delimiter = ',')]
    run: Vec<String>,
    /// Congestion controllers to compare, comma-separated (each profile run with each);
    /// none: the engine's default.
    #[arg(long, value_delimiter = ',')]
    congestion: Vec<seedcast_core::protocol::Congestion>,
    /// A rate limit set on every run's site.
    #[arg(long, value_parser = parse_rate)]
    max_rate: Option<RateArg>,
    /// Size of the generated image seed runs push.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    seed_size: u64,
    /// Share of it that is data.
    #[arg(long, default_value_t = 0.25, value_parser = parse_share)]
    seed_data_share: f64,
    /// How long outage runs cut the link.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    outage: std::time::Duration,
    /// An argument for the engine (repeat it: --engine-arg=--delta-level --engine-arg=12).
    #[arg(long, allow_hyphen_values = true)]
    engine_arg: Vec<String>,
    /// Keep the work (engine, agents, pools, logs) here instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Print the table as Markdown, as docs/BENCHMARKS.md shows it.
    #[arg(long, conflicts_with = "json")]
    markdown: bool,
}

#[derive(Args, Debug)]
struct BenchSiteArgs {
    #[command(flatten)]
    conn: Conn,
    /// The site.
    site: String,
    /// About how long to measure (at most 50 s).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=50))]
    seconds: u32,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct BenchLocalArgs {
    /// Size of the generated image (sparse, ~60 % data: text-like, random and repeated
    /// regions).
    #[arg(long, default_value = "4GiB", value_parser = parse_size)]
    size: u64,
    /// Share of the generated image that is data, the rest holes (0.05–1): a large disk
    /// with little on it is 0.1.
    #[arg(long, default_value_t = 0.6, value_parser = parse_share)]
    data_share: f64,
    /// Seeding rounds go 1, 2, 4 … up to this many sites.
    #[arg(long, default_value_t = 4)]
    sites: usize,
    /// Use this image (raw or qcow2) instead of a generated one.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Keep the work (engine, agents, pools, logs) here instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Do not run casync and rsync.
    #[arg(long)]
    no_peers: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// The engine's or the agent's data directory.
    #[arg(long)]
    data: PathBuf,
    /// Re-hash every stored chunk and read every published copy whole (without it:
    /// structure, indexes and sizes only).
    #[arg(long)]
    read_data: bool,
    /// Fix what was found (the engine or agent must be stopped). Engine: forget damaged
    /// chunks, so the next push of that content uploads them again. Agent: restore damaged
    /// cache chunks from intact copies, and fetch from the engine what it still lacks and
    /// every drifted or missing image.
    #[arg(long)]
    repair: bool,
    /// How long an agent's repair may wait for the engine.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    #[arg(long)]
    json: bool,
}

/// Logs go to stderr, with colour only when stderr is a terminal (a file or a pipe gets
/// plain text).
fn init_logs(filter: Option<&str>, default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(filter.unwrap_or(default))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn connect(c: &Conn) -> Result<Client> {
    let token = Token::from_text_or_file(&c.token).context("--token")?;
    Ok(Client::connect(&c.engine, &token).await?)
}

fn print_json(v: &serde_json::Value) {
    println!("{v}");
}

/// One progress bar per site while `--wait` waits (on stderr, drawn only on a terminal):
/// bytes sent of those the site asked for, the engine's current rate to it and the time
/// left at that rate — what tells a slow link from a stuck one.
struct SiteBars {
    multi: indicatif::MultiProgress,
    bars: std::cell::RefCell<std::collections::HashMap<String, ProgressBar>>,
}

impl SiteBars {
    fn new() -> Self {
        SiteBars {
            multi: indicatif::MultiProgress::with_draw_target(
                indicatif::ProgressDrawTarget::stderr(),
            ),
            bars: Default::default(),
        }
    }

    fn show(&self, s: &ImageStatus) {
        let mut bars = self.bars.borrow_mut();
        for p in s.sites.iter().filter(|p| p.version == s.version) {
            let bar = bars.entry(p.site.clone()).or_insert_with(|| {
                let b = self.multi.add(ProgressBar::new(0));
                b.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {msg}",
                    )
                    .expect("template")
                    .progress_chars("=> "),
                );
                b.set_prefix(output::printable(&p.site).into_owned());
                b
            });
            bar.set_length(p.bytes_needed.max(p.bytes_sent).max(1));
            bar.set_position(p.bytes_sent);
            let mut msg = p.state.as_str().to_string();
            if p.rate > 0 {
                msg += &format!("  {}", seedcast_core::rate::human_rate(p.rate * 8));
            }
            if let Some(eta) = p.eta_secs {
                msg += &format!("  ETA {}", output::human_secs(eta));
            }
            bar.set_message(msg);
        }
    }

    fn clear(&self) {
        for b in self.bars.borrow().values() {
            b.finish_and_clear();
        }
    }
}

/// A byte progress bar on stderr (drawn only on a terminal).
fn progress_bar(msg: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_message(msg);
    bar
}

/// After a push, adapt or rollback: optionally wait for every site, print the result.
async fn finish(client: Client, committed: ImageStatus, f: &Finish) -> Result<ExitCode> {
    let (wait, json) = (f.wait, f.json);
    let status = if wait {
        let bars = SiteBars::new();
        let s = client
            .watch(&committed.global_id, committed.version, |s| bars.show(s))
            .await?;
        bars.clear();
        s
    } else {
        committed
    };
    client.close().await;
    if json {
        print_json(&output::image_json(&status));
    } else {
        println!("{}", status.global_id);
    }
    if wait
        && status
            .sites
            .iter()
            .any(|p| p.state == seedcast_core::protocol::PlacementState::Failed)
    {
        eprintln!("some sites failed:\n{}", output::image_table(&status));
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn cmd_engine(a: EngineArgs) -> Result<ExitCode> {
    let mut cfg = seedcast_engine::EngineConfig::new(&a.data);
    cfg.delta_level = a.delta_level;
    cfg.delta_adapt = a.delta_adapt;
    cfg.streams_per_transfer = a.streams as usize;
    cfg.open_enrollment = a.open_enrollment;
    cfg.site_cert_lifetime = a.site_cert_lifetime;
    cfg.limits = a.limits.limits();
    cfg.transport.send_window = a.send_window;
    cfg.read_cache = a.read_cache;
    cfg.max_rate = a.max_rate.0;
    cfg.transport.congestion = a.congestion;
    let engine = seedcast_engine::Engine::open(cfg)
        .with_context(|| format!("opening the engine's data directory {}", a.data.display()))?;
    let ep = engine
        .bind(a.listen)
        .with_context(|| format!("listening on {}", a.listen))?;
    let enroll = match engine.join_token() {
        Some(_) => format!("{} (open enrollment)", a.data.join("join.token").display()),
        None => "a site token each: seedcast site add NAME".to_string(),
    };
    eprintln!(
        "seedcast engine {} listening on {}\n  agents enroll with: {enroll}\n  clients use:        {}",
        engine.id(),
        ep.local_addr()?,
        a.data.join("admin.token").display()
    );
    engine.run(ep, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn cmd_agent(args: AgentArgs) -> Result<ExitCode> {
    let limits = args.limits.limits();
    let (mut cfg, adapter) = args.site_config()?.resolve()?;
    cfg.limits = limits;
    // Kept beside the database so `seedcast check --data DIR` reaches the same service.
    SiteConfig::save(&cfg, &adapter)?;
    let adapter = adapter.build(&cfg.data, &cfg.site)?;
    let agent = seedcast_agents::Agent::open(cfg, adapter)?;
    agent.run(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn cmd_push(a: PushArgs) -> Result<ExitCode> {
    let client = connect(&a.conn).await?;
    let mut opts = PushOptions::new(a.name, a.files);
    opts.sites = a.sites;
    opts.bases = a.bases;
    opts.delta_level = a.delta_level;
    let bar = progress_bar("chunking");
    let committed = client
        .push(&opts, |p| {
            bar.set_length(p.total);
            bar.set_position(p.chunked);
        })
        .await?;
    bar.finish_and_clear();
    finish(client, committed, &a.finish).await
}

async fn cmd_adapt(a: AdaptArgs) -> Result<ExitCode> {
    let g: GlobalId = a.global_id.parse()?;
    let changes = a.changes()?;
    let client = connect(&a.conn).await?;
    let opts = AdaptOptions {
        bases: a.bases,
        delta_level: a.delta_level,
        ..AdaptOptions::default()
    };
    let committed = client.adapt_with(&g, &changes, &opts).await?;
    finish(client, committed, &a.finish).await
}

async fn cmd_history(a: ImageArgs) -> Result<ExitCode> {
    let g: GlobalId = a.global_id.parse()?;
    let client = connect(&a.conn).await?;
    let v = client.history(&g).await?;
    client.close().await;
    if a.json {
        print_json(&output::history_json(&g, &v));
    } else {
        print!("{}", output::history_table(&v));
    }
    Ok(ExitCode::SUCCESS)
}

async fn cmd_rollback(a: RollbackArgs) -> Result<ExitCode> {
    let g: GlobalId = a.global_id.parse()?;
    let client = connect(&a.conn).await?;
    let committed = client.rollback(&g, a.to).await?;
    finish(client, committed, &a.finish).await
}

async fn cmd_status(a: StatusArgs) -> Result<ExitCode> {
    let client = connect(&a.conn).await?;
    match a.global_id {
        Some(g) => {
            let s = client.status(&g.parse()?).await?;
            if a.json {
                print_json(&output::image_json(&s));
            } else {
                print!("{}", output::image_table(&s));
            }
        }
        None => {
            let v = client.images().await?;
            if a.json {
                print_json(&output::images_json(&v));
            } else if v.is_empty() {
                println!("no images");
            } else {
                for s in &v {
                    print!("{}", output::image_table(s));
                }
            }
        }
    }
    client.close().await;
    Ok(ExitCode::SUCCESS)
}

async fn cmd_sites(a: SitesArgs) -> Result<ExitCode> {
    let client = connect(&a.conn).await?;
    let v = client.sites().await?;
    client.close().await;
    if a.json {
        print_json(&output::sites_json(&v));
    } else {
        print!("{}", output::sites_table(&v));
    }
    Ok(ExitCode::SUCCESS)
}

async fn cmd_site_set(a: SiteSetArgs) -> Result<ExitCode> {
    if a.max_rate.is_none() && a.congestion.is_none() {
        bail!("nothing to set: give --max-rate and/or --congestion");
    }
    let client = connect(&a.conn).await?;
    let info = client
        .site_set(&a.site, a.max_rate.map(|r| r.0), a.congestion.map(|c| c.0))
        .await?;
    client.close().await;
    if a.json {
        let v = output::sites_json(std::slice::from_ref(&info));
        print_json(&v["sites"][0]);
    } else {
        print!("{}", output::sites_table(std::slice::from_ref(&info)));
    }
    Ok(ExitCode::SUCCESS)
}

async fn cmd_revoke(a: RevokeArgs) -> Result<ExitCode> {
    let client = connect(&a.conn).await?;
    client.revoke(&a.site).await?;
    client.close().await;
    println!("revoked {}", a.site);
    Ok(ExitCode::SUCCESS)
}

async fn cmd_site_add(a: SiteAddArgs) -> Result<ExitCode> {
    let client = connect(&a.conn).await?;
    let (token, expires) = client.site_add(&a.site, a.expires.as_secs()).await?;
    client.close().await;
    if a.json {
        let at = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires),
        );
        let v = serde_json::json!({"site": a.site, "token": token, "expires_at": at.to_string()});
        println!("{v}");
    } else {
        println!("{token}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn cmd_site_reset(a: RevokeArgs) -> Result<ExitCode> {
    let client = connect(&a.conn).await?;
    client.site_reset(&a.site).await?;
    client.close().await;
    println!("reset {}", a.site);
    Ok(ExitCode::SUCCESS)
}

async fn cmd_demo(a: DemoArgs) -> Result<ExitCode> {
    if a.disk_mib == 0 {
        bail!("--disk-mib must be at least 1");
    }
    let mut adapters = Vec::new();
    for name in &a.adapters {
        match name.as_str() {
            "all" => adapters.extend(SiteKind::ALL),
            n => adapters.push(n.parse::<SiteKind>().map_err(anyhow::Error::msg)?),
        }
    }
    if adapters.is_empty() {
        bail!("--adapters names no site");
    }
    let opts = seedcast::demo::DemoOptions {
        dir: a.dir,
        disk_mib: a.disk_mib,
        adapters,
    };
    let report = seedcast::demo::run(opts, &mut std::io::stdout()).await?;
    Ok(if report.identical {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn cmd_check(a: CheckArgs) -> Result<ExitCode> {
    let report = if a.data.join("catalog").exists() {
        let opts = seedcast_engine::check::CheckOptions {
            read_data: a.read_data,
            repair: a.repair,
        };
        let data = a.data.clone();
        tokio::task::spawn_blocking(move || seedcast_engine::check::check(&data, opts)).await??
    } else if a.data.join("db").exists() {
        let opts = seedcast_agents::check::CheckOptions {
            read_data: a.read_data,
            repair: a.repair,
            repair_timeout: a.timeout,
        };
        seedcast_agents::check::check(&a.data, opts).await?
    } else {
        anyhow::bail!(
            "{} is neither an engine's data directory (catalog/) nor an agent's (db/)",
            a.data.display()
        );
    };
    if a.json {
        print_json(&output::check_json(&report));
    } else {
        print!("{}", output::check_text(&report));
    }
    Ok(if report.unrepaired() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn cmd_bench_site(a: BenchSiteArgs) -> Result<ExitCode> {
    let client = connect(&a.conn).await?;
    let bar = ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} measuring {msg} ({elapsed})").expect("template"),
    );
    bar.set_message(a.site.clone());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let r = client.bench_site(&a.site, a.seconds).await;
    bar.finish_and_clear();
    client.close().await;
    let b = r?;
    if a.json {
        print_json(&output::site_bench_json(&b));
    } else {
        print!("{}", output::site_bench_text(&b));
    }
    Ok(ExitCode::SUCCESS)
}

async fn cmd_bench_links(a: BenchLinksArgs) -> Result<ExitCode> {
    use seedcast::bench::links::{LinksOptions, Profile, Scenario, markdown, run_links, table};
    let images = match a.images.strip_prefix("~/") {
        Some(rest) => PathBuf::from(std::env::var("HOME").context("HOME")?).join(rest),
        None => PathBuf::from(&a.images),
    };
    let profiles = a
        .profile
        .iter()
        .map(|p| {
            Profile::named(p)
                .with_context(|| format!("--profile {p:?}: give {}", Profile::NAMES.join(", ")))
        })
        .collect::<Result<Vec<_>>>()?;
    let scenarios = a
        .run
        .iter()
        .map(|r| {
            Scenario::parse(r).with_context(|| {
                format!("--run {r:?}: give update, seed, outage, restart, rsync or zstd")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let opts = LinksOptions {
        bin: std::env::current_exe().context("finding the seedcast binary")?,
        old: a.old.unwrap_or_else(|| images.join("v1.raw")),
        new: a.new.unwrap_or_else(|| images.join("v2.raw")),
        seed_size: a.seed_size,
        seed_data_share: a.seed_data_share,
        profiles,
        scenarios,
        outage: a.outage,
        congestion: a.congestion,
        max_rate: a.max_rate.and_then(|r| r.0),
        engine_args: a.engine_arg,
        dir: a.dir,
    };
    let report = run_links(&opts, |r| {
        eprintln!(
            "{} {:?} {}: {:.1} s ({:.2}× the link), engine sent {:.2}× what went down it",
            r.profile.name,
            r.scenario,
            r.congestion.map_or("default", |c| c.name()),
            r.seconds,
            r.of_link,
            r.sent_per_delivered
        );
    })
    .await?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else if a.markdown {
        print!("{}", markdown(&report));
    } else {
        print!("{}", table(&report));
    }
    Ok(ExitCode::SUCCESS)
}

async fn cmd_bench_local(a: BenchLocalArgs) -> Result<ExitCode> {
    if a.sites == 0 {
        bail!("--sites must be at least 1");
    }
    let opts = seedcast::bench::LocalOptions {
        bin: std::env::current_exe().context("finding the seedcast binary")?,
        size: a.size,
        data_share: a.data_share,
        image: a.image,
        sites: a.sites,
        dir: a.dir,
        peers: !a.no_peers,
    };
    let bar = ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{pos}/{len}] {msg} ({elapsed})")
            .expect("template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let report = seedcast::bench::run_local(&opts, |s| {
        bar.set_length(s.total as u64);
        bar.set_position(s.index as u64);
        bar.set_message(s.what);
    })
    .await;
    bar.finish_and_clear();
    let report = report?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", seedcast::bench::text::render(&report));
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(cli: Cli) -> Result<ExitCode> {
    // Servers log what they do; commands only what went wrong.
    let default_log = match cli.cmd {
        Cmd::Engine(_) | Cmd::Agent(_) => "info",
        _ => "warn",
    };
    init_logs(cli.log.as_deref(), default_log);
    match cli.cmd {
        Cmd::Engine(a) => cmd_engine(a).await,
        Cmd::Agent(a) => cmd_agent(*a).await,
        Cmd::Push(a) => cmd_push(a).await,
        Cmd::Adapt(a) => cmd_adapt(a).await,
        Cmd::History(a) => cmd_history(a).await,
        Cmd::Rollback(a) => cmd_rollback(a).await,
        Cmd::Status(a) => cmd_status(a).await,
        Cmd::Sites(a) => cmd_sites(a).await,
        Cmd::Revoke(a) => cmd_revoke(a).await,
        Cmd::Site(SiteCmd::Add(a)) => cmd_site_add(a).await,
        Cmd::Site(SiteCmd::Reset(a)) => cmd_site_reset(a).await,
        Cmd::Site(SiteCmd::Set(a)) => cmd_site_set(a).await,
        Cmd::Demo(a) => cmd_demo(a).await,
        Cmd::Check(a) => cmd_check(a).await,
        Cmd::Bench(BenchCmd::Local(a)) => cmd_bench_local(a).await,
        Cmd::Bench(BenchCmd::Site(a)) => cmd_bench_site(a).await,
        Cmd::Bench(BenchCmd::Links(a)) => cmd_bench_links(a).await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
