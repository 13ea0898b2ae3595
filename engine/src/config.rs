//! How an engine runs: one options struct, with the scenario each default is tuned for.

use std::path::PathBuf;
use std::time::Duration;

use seedcast_core::ChunkerConfig;
use seedcast_core::manifest::Limits;
use seedcast_core::sender::SendConfig;
use seedcast_net::endpoint::TransportOptions;

/// How an engine runs. Defaults suit a management node seeding a handful of sites.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Data directory: catalog, packs, CA and tokens.
    pub data: PathBuf,
    /// Chunking pushes must use (sent to clients in the handshake). Default: FastCDC
    /// 16/64/256 KiB, holes of 32 KiB and more.
    pub chunking: ChunkerConfig,
    pub transport: TransportOptions,
    /// Parallel unidirectional streams per transfer to one site. 4: enough to keep one
    /// connection busy; one connection is driven by one task, so more streams do not add CPU.
    pub streams_per_transfer: usize,
    /// Bytes of recently read stored chunks kept for the next site that sends them
    /// ([`crate::shared_reads`]). 64 MiB: sites seeded together stay well within it of each
    /// other, so every site's send buffers point at one copy of each chunk; 0 turns it off.
    pub read_cache: u64,
    /// zstd level of delta groups sent to sites that hold an earlier version. 19: updates
    /// are for thin links, the work is done once for every site, and 19 is what
    /// `zstd --patch-from` users pick; 12 is about 7× faster for ~10 % more bytes.
    pub delta_level: i32,
    /// Adapt each transfer's delta level to its link ([`crate::data_streams`]): start at
    /// [`crate::data_streams::ADAPT_START`] and move towards `delta_level` while encoded
    /// groups queue for the link, down (to [`crate::data_streams::ADAPT_MIN`]) while the
    /// link waits for the encoder — as `zstd --adapt`. Off: every group at `delta_level`,
    /// the fewest bytes (a link faster than the encoder then waits for it).
    pub delta_adapt: bool,
    /// How a deployment's work is cut into stream items and delta groups.
    pub send: SendConfig,
    /// Accept `DATA/join.token` for any new site name (off: sites enroll only with the
    /// single-use token `seedcast site add NAME` makes). For labs and demos.
    pub open_enrollment: bool,
    /// How long a site certificate is valid. 30 days: agents renew it when a third is
    /// left (every ~20 days), so a stolen certificate of a reset site dies within weeks
    /// even if revocation were missed.
    pub site_cert_lifetime: Duration,
    /// Caps on what an image may describe (file and image length, data, files): a push or
    /// block over them is refused, naming the cap.
    pub limits: Limits,
    /// Connections that have not yet proven who they are (TLS done, hello not yet
    /// accepted), at most; more are refused. 256: far above honest enrollment bursts, and
    /// each costs a few hundred KiB of QUIC buffers, so a flood stays under ~100 MiB.
    pub max_unauthenticated: usize,
    /// The most the engine sends to all sites together, in bits per second on the wire
    /// (each site may have its own, lower, limit: `seedcast site set`). `None`: the links
    /// decide.
    pub max_rate: Option<u64>,
}

impl EngineConfig {
    pub fn new(data: impl Into<PathBuf>) -> Self {
        EngineConfig {
            data: data.into(),
            chunking: ChunkerConfig::default(),
            transport: TransportOptions::default(),
            streams_per_transfer: 4,
            read_cache: 64 << 20,
            delta_level: 19,
            delta_adapt: false,
            send: SendConfig::default(),
            open_enrollment: false,
            site_cert_lifetime: Duration::from_secs(30 * 86_400),
            limits: Limits::default(),
            max_unauthenticated: 256,
            max_rate: None,
        }
    }
}
