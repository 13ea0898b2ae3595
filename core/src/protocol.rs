//! The seedcast wire protocol, version 5. This module is the specification.
//!
//! # Transport
//! QUIC (RFC 9000) with TLS 1.3, ALPN [`ALPN`]. The engine's certificate is issued by its own
//! CA for the name [`SERVER_NAME`]; peers pin that CA (by the fingerprint in a token, then by
//! the stored CA certificate). Agents present a per-site client certificate from the same CA.
//!
//! # Framing
//! Every message is one frame ([`crate::frame`]): a 4-byte big-endian length, then the
//! message encoded by [`crate::codec`]. No frame may exceed [`MAX_MESSAGE_SIZE`]; a larger
//! length prefix is refused before anything is allocated.
//!
//! # Connection
//! 1. The dialer opens the first bidirectional stream (the *control stream*) and sends
//!    [`Hello`]. The engine answers [`HelloReply`]; a `Refused` reply is followed by a
//!    connection close with [`close::REFUSED`] or [`close::VERSION`].
//! 2. **Enroll** (no client certificate yet): the engine checks the secret — a single-use
//!    site token bound to the site's name (`seedcast site add NAME`), or the join token
//!    when the engine runs with open enrollment — signs the agent's CSR and answers
//!    `Enrolled` with a certificate of bounded life; the agent reconnects with it, and
//!    renews it over its authenticated connection ([`AgentMsg::Renew`]) before it expires.
//! 3. **Agent** (with its site certificate): after `Welcome`, the agent sends
//!    [`AgentMsg::Inventory`]; from then on the engine sends [`EngineMsg`] and the agent
//!    [`AgentMsg`] on the control stream. For each `Deploy` (or `DeployDelta`: the manifest
//!    as a delta against one the site holds) the agent answers `NeedFrom` (the
//!    chunks it lacks after looking in its cache and in the images it holds, and which held
//!    versions it can use as delta bases), the engine sends those chunks on unidirectional
//!    streams (each: one [`DataStreamHeader`] frame, then any number of [`DataRecord`]
//!    frames, each followed by its `payload_len` raw bytes), and the agent answers
//!    `Published` or `Failed`. A [`DataRecord::Chunk`] is one chunk in its stored form; a
//!    [`DataRecord::Group`] is several chunks compressed as one zstd frame whose prefix
//!    ("dictionary", as `zstd --patch-from`) is the concatenation of base chunks the site
//!    holds. Every chunk is verified against its id after decoding either way.
//!    The engine may also open bidirectional *probe streams* to an agent (`seedcast bench
//!    site`): one [`Probe`] frame, then raw bytes or chunk records as on a data stream until
//!    the stream ends; the agent answers one [`ProbeReply`] and keeps nothing.
//! 4. **Client** (admin secret): after `Welcome`, each request is one new bidirectional
//!    stream: one [`Request`] frame (for `Upload`, followed by `count` chunk records as on a
//!    data stream; for `UploadRecords`, `count` chunk or delta-group records against chunks
//!    the engine holds), then the engine's [`Response`] frame(s). `Watch` answers with `Progress`
//!    frames until every target site is published or failed, then finishes the stream.
//!
//! # Evolving it
//! Enum variants are encoded by their index: **append new variants at the end, never
//! reorder or remove** (the golden tests below pin today's encodings). A change that old
//! peers cannot ignore bumps [`PROTOCOL_VERSION`] and the ALPN. Version 2 added each
//! file's format to file entries (a qcow2 disk travels as its guest content and is rebuilt
//! at the site); version 3 per-site enrollment tokens, certificate expiry and renewal.
//! A peer of another version is refused with both versions named.

use serde::{Deserialize, Serialize};

use crate::chunk::Encoding;
use crate::chunker::ChunkerConfig;
use crate::id::{ChunkId, GlobalId};
use crate::manifest::{FileEntry, Manifest};

/// ALPN protocol id; a peer without it fails the TLS handshake.
pub const ALPN: &[u8] = b"seedcast/7";
/// Carried in [`Hello`] and checked by the engine. 2: files carry their format
/// ([`crate::manifest::FileFormat`], manifest format 2). 3: site tokens, certificate
/// expiry and renewal. 4: agents report images that changed underneath them
/// ([`AgentMsg::Drifted`], [`PlacementState::Drifted`]). 5: the engine opens probe streams
/// to agents ([`Probe`], `seedcast bench site`). 6: per-site link settings
/// ([`Request::SiteSet`], [`SiteInfo::max_rate`]) and live rates in [`SitePlacement`].
/// 7: clients upload delta groups ([`Request::UploadRecords`]).
pub const PROTOCOL_VERSION: u32 = 7;
/// Hard maximum of one frame's body: the codec's decode bound. A manifest of a ~100 GiB
/// image fits.
pub const MAX_MESSAGE_SIZE: usize = crate::codec::MAX_ENCODED_LEN;
/// The DNS name in the engine's certificate; dialers verify it whatever address they use.
pub const SERVER_NAME: &str = "seedcast-engine";
/// Most chunk ids one `Missing` request may carry.
pub const MAX_IDS_PER_REQUEST: usize = 65_536;
/// Most chunks one `Upload` request may carry.
pub const MAX_UPLOAD_BATCH: u32 = 4096;
/// Raw bytes the delta groups of one `UploadRecords` batch may decode to at most.
pub const MAX_UPLOAD_RAW_BYTES: u64 = 256 * 1024 * 1024;
/// Base bytes the delta groups of one `UploadRecords` batch may make the engine read.
pub const MAX_UPLOAD_BASE_BYTES: u64 = 512 * 1024 * 1024;
/// Stored bytes in one upload batch at most: what the engine holds unverified for one
/// client stream (clients send about 8 MiB).
pub const MAX_UPLOAD_BATCH_BYTES: u64 = 64 * 1024 * 1024;
/// Largest `Write` of an adaptation block (larger changes: replace the file).
pub const MAX_WRITE: usize = 16 * 1024 * 1024;
/// Longest local id an agent may report (the longest kind, an S3 key prefix, is far
/// shorter); a longer one is a protocol violation.
pub const MAX_LOCAL_ID: usize = 1024;
/// Longest error text kept from an agent's `Failed` (longer ones are cut).
pub const MAX_ERROR_TEXT: usize = 4096;
/// Longest adapter name an agent may give (`dir`, `qcow2`, …).
pub const MAX_ADAPTER_NAME: usize = 32;
/// Largest hello: a CSR and a secret fit many times over. Read with this limit from peers
/// that are not authenticated yet, instead of the general frame maximum.
pub const MAX_HELLO_SIZE: usize = 16 * 1024;

/// Cut peer text to at most `max` bytes, on a character boundary; whether it was cut.
pub fn cut_text(text: &mut String, max: usize) -> bool {
    if text.len() <= max {
        return false;
    }
    text.truncate(text.floor_char_boundary(max));
    true
}

/// QUIC application close codes.
pub mod close {
    /// Normal end of a session.
    pub const DONE: u32 = 0;
    /// The peer speaks another protocol version.
    pub const VERSION: u32 = 1;
    /// Credentials missing, wrong or revoked.
    pub const REFUSED: u32 = 2;
    /// A frame was malformed, truncated or too large.
    pub const PROTOCOL: u32 = 3;
    /// The engine is shutting down.
    pub const SHUTDOWN: u32 = 4;
    /// Another connection took over this site.
    pub const REPLACED: u32 = 5;
}

/// First message of every connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub role: Role,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A client (push / status / …), authenticated by the admin token's secret.
    Client { admin_secret: String },
    /// An enrolled agent; its identity is its client certificate.
    Agent { site: String, adapter: String },
    /// An agent asking for a site certificate with a site token's secret (or, at an
    /// engine with open enrollment, the join token's).
    Enroll {
        secret: String,
        site: String,
        adapter: String,
        /// PKCS#10 request (DER) for the key the agent keeps.
        csr_der: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Welcome {
        protocol: u32,
        engine_id: String,
        /// Chunking the engine expects pushes to use.
        chunking: ChunkerConfig,
        /// The engine's manifest signing key (ed25519). An agent checks it against the key
        /// it pinned at enrollment and refuses to go on if they differ.
        signing_key: [u8; 32],
    },
    Enrolled {
        cert_der: Vec<u8>,
        ca_der: Vec<u8>,
        /// When the certificate stops being valid (Unix seconds).
        expires_unix: u64,
        /// The engine's manifest signing key, for the agent to pin.
        signing_key: [u8; 32],
    },
    Refused {
        reason: RefuseReason,
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    ProtocolVersion,
    BadToken,
    UnknownSite,
    Revoked,
    BadRequest,
    /// The token or certificate has expired.
    Expired,
}

/// What an agent holds: reported on connect so the engine can reconcile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldImage {
    pub global_id: GlobalId,
    pub version: u32,
    pub manifest_id: [u8; 32],
    pub local_id: String,
}

/// An image version whose chunks a site can provide as delta bases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldVersion {
    pub global_id: GlobalId,
    pub version: u32,
}

/// Agent → engine, on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    Inventory {
        images: Vec<HeldImage>,
    },
    /// The chunks of `transfer` this site lacks (after looking in its cache).
    Need {
        transfer: u64,
        chunks: Vec<ChunkId>,
    },
    Published {
        transfer: u64,
        local_id: String,
        /// Chunk payload bytes this site received for the transfer.
        bytes_received: u64,
    },
    Failed {
        transfer: u64,
        error: String,
    },
    /// As `Need`, and: the chunks of `bases_from` (except `unavailable`) are at the site and
    /// may be named as delta bases.
    NeedFrom {
        transfer: u64,
        chunks: Vec<ChunkId>,
        bases_from: Vec<HeldVersion>,
        unavailable: Vec<ChunkId>,
    },
    /// A request to certify a new key for this site (its certificate nears expiry).
    Renew {
        csr_der: Vec<u8>,
    },
    /// The published copy of this version no longer matches it (found when its bytes were
    /// read as seeds, or by `seedcast check`); `detail` says what differs. The engine shows
    /// the placement as drifted until it is repaired or replaced; it does not redeploy by
    /// itself (a VM may be running from that copy).
    Drifted {
        global_id: GlobalId,
        version: u32,
        detail: String,
    },
}

/// Engine → agent, on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EngineMsg {
    /// Make this manifest's version of the image published at the site. `signature`: the
    /// engine's ed25519 signature over the manifest id (see `seedcast_net::signing`).
    Deploy {
        transfer: u64,
        manifest: Manifest,
        signature: Vec<u8>,
    },
    /// As `Deploy`, with the manifest sent as a zstd delta against the encoding of a manifest
    /// the site holds (`base`); the rebuilt manifest must hash to `manifest_id`.
    DeployDelta {
        transfer: u64,
        base: HeldVersion,
        manifest_id: [u8; 32],
        delta: Vec<u8>,
        signature: Vec<u8>,
    },
    /// The answer to [`AgentMsg::Renew`]: the site's next certificate. The engine accepts
    /// the old one until the agent connects with this one.
    Renewed {
        cert_der: Vec<u8>,
        expires_unix: u64,
    },
    /// A renewal refused (the site is being reset or revoked), saying why.
    RenewRefused { message: String },
}

/// First frame of a unidirectional data stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStreamHeader {
    pub transfer: u64,
}

/// One record of a data stream; its `payload_len` raw bytes follow the frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataRecord {
    Chunk(ChunkHeader),
    Group(GroupHeader),
    /// The engine cannot finish this transfer (a chunk it must send is damaged or missing
    /// in its store): the agent ends the deployment with `Failed`, giving this reason, and
    /// the session goes on. No payload follows.
    Abort {
        reason: String,
    },
}

/// Several chunks compressed together as one zstd frame, with base chunks as its prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupHeader {
    /// The chunks the payload decodes to, in order, with their lengths.
    pub chunks: Vec<(ChunkId, u32)>,
    /// Chunks the site holds; their bytes concatenated in this order are the prefix.
    pub base: Vec<ChunkId>,
    pub payload_len: u32,
}

impl GroupHeader {
    /// Most raw bytes one group may decode to.
    pub const MAX_RAW: u64 = 16 * 1024 * 1024;
    /// Most base chunks one group may name.
    pub const MAX_BASE: usize = 256;
    /// Largest payload of a group.
    pub const MAX_PAYLOAD: u32 = 17 * 1024 * 1024;
    /// Most bytes the base chunks of one group may add up to.
    pub const MAX_BASE_BYTES: usize = 64 * 1024 * 1024;

    pub fn raw_len(&self) -> u64 {
        self.chunks.iter().map(|(_, l)| *l as u64).sum()
    }
}

/// Announces one chunk; `payload_len` raw bytes follow the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHeader {
    pub id: ChunkId,
    pub raw_len: u32,
    pub encoding: Encoding,
    pub payload_len: u32,
}

impl ChunkHeader {
    /// The header announcing `c` in its stored form.
    pub fn of(c: &crate::chunk::CompressedChunk) -> Self {
        ChunkHeader {
            id: c.id,
            raw_len: c.raw_len,
            encoding: c.encoding,
            payload_len: c.payload.len() as u32,
        }
    }

    /// Largest payload a header may announce: a chunk of the largest allowed size, stored
    /// raw, plus slack for a zstd frame that did not shrink.
    pub const MAX_PAYLOAD: u32 = ChunkerConfig::MAX_CHUNK + 64 * 1024;
}

/// A client's request; one per bidirectional stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Which of these chunks does the engine lack?
    Missing {
        chunks: Vec<ChunkId>,
    },
    /// `count` chunk records follow on this stream.
    Upload {
        count: u32,
    },
    /// Register an image from chunks the engine holds.
    Commit(CommitRequest),
    /// One image (by id), or every image.
    Status {
        global_id: Option<GlobalId>,
    },
    Sites,
    /// Stream progress of a version until every target site is done.
    Watch {
        global_id: GlobalId,
        version: u32,
    },
    /// Revoke a site's certificate; its agent is disconnected and refused from then on.
    Revoke {
        site: String,
    },
    /// Make the next version of an image from an adaptation block.
    Adapt(AdaptRequest),
    /// Every version of an image, oldest first.
    History {
        global_id: GlobalId,
    },
    /// Make the next version of an image a copy of an earlier one.
    Rollback {
        global_id: GlobalId,
        to: u32,
    },
    /// Create a single-use token for enrolling the site `site`, valid `expires_secs`.
    SiteAdd {
        site: String,
        expires_secs: u64,
    },
    /// Forget a site's certificate, tokens and revocation: its agent is cut off and the
    /// name may be enrolled again with a new `SiteAdd` token.
    SiteReset {
        site: String,
    },
    /// Measure the path to a connected site for about `seconds` (at most
    /// [`Probe::MAX_SECS`]): round trip, raw throughput, and the chunk pipeline (send,
    /// verify, write at the agent). Nothing is published; the agent discards what it gets.
    BenchSite {
        site: String,
        seconds: u32,
    },
    /// Change a site's link settings (`None`: leave it as it is; `Some(None)`: back to the
    /// engine's default). Answered with the site's [`SiteInfo`] as `Sites`.
    SiteSet {
        site: String,
        max_rate: Option<Option<u64>>,
        congestion: Option<Option<Congestion>>,
    },
    /// `count` records follow on this stream, each a [`DataRecord::Chunk`] or a
    /// [`DataRecord::Group`] with its payload: new chunks uploaded as delta groups against
    /// chunks the engine holds (a client that has the previous version's file:
    /// `adapt --base`). Every chunk is verified after decoding; answered `Uploaded`.
    UploadRecords {
        count: u32,
    },
}

/// The congestion controller the engine sends to a site with: quinn's three, or
/// `Delivery`, seedcast's BBR-style controller sized from what the path delivers
/// (`seedcast_net::delivery`: keeps lossy, far links full without overflowing a shallow
/// bottleneck queue).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    Cubic,
    NewReno,
    Bbr,
    Delivery,
}

impl Congestion {
    pub const ALL: [Congestion; 4] = [
        Congestion::Cubic,
        Congestion::NewReno,
        Congestion::Bbr,
        Congestion::Delivery,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
            Congestion::Bbr => "bbr",
            Congestion::Delivery => "delivery",
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Congestion::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!("congestion controller {s:?}: give cubic, newreno, bbr or delivery")
            })
    }
}

/// An adaptation block: changes to the current version of an image, applied atomically as
/// one new version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdaptRequest {
    pub global_id: GlobalId,
    pub ops: Vec<AdaptOp>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdaptOp {
    /// A new version of an existing file (its chunks uploaded first).
    Replace {
        path: String,
        mode: u32,
        recipe: crate::manifest::FileRecipe,
        format: crate::manifest::FileFormat,
    },
    /// Bytes written at an offset of an existing file (at most its length; may grow it).
    Write {
        path: String,
        offset: u64,
        data: Vec<u8>,
    },
    /// A file added to the image (its chunks uploaded first).
    Add(FileEntry),
    /// A file removed from the image.
    Remove { path: String },
}

/// One version in an image's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: u32,
    pub parent: Option<u32>,
    pub created_unix: u64,
    pub total_len: u64,
    pub data_len: u64,
    pub files: Vec<String>,
    /// What the block that made this version changed, for people.
    pub change: String,
    pub bytes_uploaded: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRequest {
    pub name: String,
    pub files: Vec<FileEntry>,
    /// Target sites; `None` means every site the engine knows.
    pub sites: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Missing {
        chunks: Vec<ChunkId>,
    },
    Uploaded {
        stored: u32,
        bytes: u64,
    },
    Committed(ImageStatus),
    Image(ImageStatus),
    Images(Vec<ImageStatus>),
    Sites(Vec<SiteInfo>),
    Progress(ImageStatus),
    Revoked,
    Error {
        kind: ErrorKind,
        message: String,
    },
    History(Vec<VersionInfo>),
    /// A site token, in its text form.
    SiteToken {
        site: String,
        token: String,
        expires_unix: u64,
    },
    /// The request was carried out.
    Done,
    SiteBench(SiteBench),
}

/// What `BenchSite` measured on the path to one site (times in microseconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteBench {
    pub site: String,
    /// quinn's smoothed round-trip estimate of the agent's connection, in microseconds.
    pub rtt_quic_us: u64,
    /// Round trips of a ping on a fresh stream through the agent's process (the least of
    /// several): the network plus the agent's scheduling.
    pub rtt_ping_us: u64,
    /// Raw bytes the agent read and discarded, and the time it took (first byte to end).
    pub raw_bytes: u64,
    pub raw_us: u64,
    /// Stored chunks sent as a deployment sends them, each verified (decompressed and hashed)
    /// and written at the agent to a scratch file, then discarded.
    pub chunks: u64,
    /// Their payload on the wire and their bytes once verified.
    pub chunk_payload_bytes: u64,
    pub chunk_raw_bytes: u64,
    pub chunk_us: u64,
    /// The agent's time verifying and writing the chunks, summed over the threads doing it
    /// (up to four chunks at once, overlapping the reading): more than `chunk_us` when the
    /// site's cores are the limit.
    pub verify_us: u64,
    pub write_us: u64,
}

/// First frame of a bidirectional stream the engine opens to an agent to measure the path
/// to it (`seedcast bench site`); the agent answers with one [`ProbeReply`]. Nothing a
/// probe carries is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Probe {
    /// Answer `Pong` at once.
    Ping,
    /// Raw bytes follow until the stream ends: read and discarded.
    Raw,
    /// [`ChunkHeader`] records, each followed by its stored payload, until the stream ends:
    /// verified as a deployment's chunks are and written to a scratch file, then dropped.
    Chunks,
}

impl Probe {
    /// Longest a probe may last; an agent stops reading one after this.
    pub const MAX_SECS: u32 = 60;
    /// Most bytes an agent reads for one probe.
    pub const MAX_BYTES: u64 = 64 << 30;
    /// Probes an agent serves at once; more are refused.
    pub const MAX_CONCURRENT: usize = 1;
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeReply {
    Pong,
    /// What the agent received: payload bytes, chunks and their verified bytes, the time
    /// from the first byte to the end, and within it the time verifying and writing.
    Received {
        bytes: u64,
        chunks: u64,
        raw_bytes: u64,
        micros: u64,
        verify_micros: u64,
        write_micros: u64,
    },
    Refused {
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    NotFound,
    Invalid,
    MissingChunks,
    Internal,
}

/// Everything known about one version of an image across its sites.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStatus {
    pub global_id: GlobalId,
    pub name: String,
    pub version: u32,
    /// Bytes the push of this version uploaded (chunk payloads the engine lacked).
    pub bytes_uploaded: u64,
    /// Sum of file lengths, holes included.
    pub total_len: u64,
    /// Bytes of data (not holes).
    pub data_len: u64,
    pub sites: Vec<SitePlacement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SitePlacement {
    pub site: String,
    /// The site service's own id for the image, once published.
    pub local_id: Option<String>,
    /// The version this placement is about.
    pub version: u32,
    pub state: PlacementState,
    /// Chunk payload bytes sent to the site for this version.
    pub bytes_sent: u64,
    /// Chunk payload bytes the site asked for (known once it answered `NeedFrom`).
    pub bytes_needed: u64,
    pub error: Option<String>,
    /// Every byte the transfer put on the wire, both directions: QUIC datagrams with their
    /// UDP and IP headers (manifest, control messages, frames, payload, acknowledgements).
    pub wire_bytes: u64,
    /// While transferring: chunk payload bytes per second over the last seconds (0 before
    /// the first measurement and once the transfer is over).
    pub rate: u64,
    /// While transferring: seconds left at `rate` (`None` until both are known).
    pub eta_secs: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlacementState {
    Pending,
    Transferring,
    Published,
    Failed,
    /// Published, then changed underneath the agent: the site's copy no longer matches
    /// its version. `seedcast check --repair` at the site restores it.
    Drifted,
}

impl PlacementState {
    pub fn as_str(&self) -> &'static str {
        match self {
            PlacementState::Pending => "pending",
            PlacementState::Transferring => "transferring",
            PlacementState::Published => "published",
            PlacementState::Failed => "failed",
            PlacementState::Drifted => "drifted",
        }
    }

    /// Published, failed or drifted: nothing more will happen without a new request.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            PlacementState::Published | PlacementState::Failed | PlacementState::Drifted
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteInfo {
    pub site: String,
    pub adapter: String,
    pub connected: bool,
    pub revoked: bool,
    /// An agent holds a certificate for the site (false: added or reset, not enrolled).
    pub enrolled: bool,
    /// When the site's certificate expires (Unix seconds; 0 when not enrolled).
    pub cert_expires_unix: u64,
    /// The most the engine sends to the site, in bits per second on the wire (`None`: only
    /// the engine-wide limit, if any).
    pub max_rate: Option<u64>,
    /// The congestion controller chosen for the site (`None`: the engine's default).
    pub congestion: Option<Congestion>,
}

#[cfg(test)]
mod tests {
    //! Golden encodings: if one of these changes, old peers can no longer talk to new ones.
    use super::*;
    use crate::codec;

    fn hex(v: &impl Serialize) -> String {
        hex::encode(codec::encode(v).unwrap())
    }

    #[test]
    fn golden_hello() {
        let h = Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Client {
                admin_secret: "s".into(),
            },
        };
        // 07        protocol = 7 (varint)
        // 00        Role::Client (variant 0)
        // 01 73     admin_secret = "s" (len 1, 's')
        assert_eq!(hex(&h), "07000173");
        let a = Role::Agent {
            site: "a".into(),
            adapter: "dir".into(),
        };
        // 01 | 01 61 | 03 646972
        assert_eq!(hex(&a), "01016103646972");
    }

    #[test]
    fn golden_variant_indexes() {
        // Each enum's first byte is its variant index; appending keeps these.
        let idx = |v: &dyn Fn() -> Vec<u8>| v()[0];
        assert_eq!(idx(&|| codec::encode(&Request::Sites).unwrap()), 4);
        assert_eq!(
            idx(&|| codec::encode(&Request::Revoke { site: "x".into() }).unwrap()),
            6
        );
        assert_eq!(idx(&|| codec::encode(&Response::Revoked).unwrap()), 7);
        assert_eq!(
            idx(&|| codec::encode(&Response::History(vec![])).unwrap()),
            9
        );
        assert_eq!(
            idx(&|| codec::encode(&Request::Rollback {
                global_id: GlobalId([0; 12]),
                to: 1
            })
            .unwrap()),
            9
        );
        assert_eq!(
            idx(&|| codec::encode(&AgentMsg::NeedFrom {
                transfer: 1,
                chunks: vec![],
                bases_from: vec![],
                unavailable: vec![]
            })
            .unwrap()),
            4
        );
        assert_eq!(
            idx(&|| codec::encode(&AdaptOp::Remove { path: "a".into() }).unwrap()),
            3
        );
        assert_eq!(
            idx(&|| codec::encode(&AgentMsg::Failed {
                transfer: 1,
                error: String::new()
            })
            .unwrap()),
            3
        );
        assert_eq!(idx(&|| codec::encode(&PlacementState::Failed).unwrap()), 3);
        assert_eq!(
            idx(&|| codec::encode(&RefuseReason::BadRequest).unwrap()),
            4
        );
    }

    /// Encode every value; each encoding must start with the index `index` gives its
    /// variant. The `index` functions below are exhaustive `match`es: a new variant cannot
    /// compile without being given its index here, and reordering variants fails.
    fn check<T: Serialize + std::fmt::Debug>(values: &[T], index: impl Fn(&T) -> u8) {
        for v in values {
            assert_eq!(codec::encode(v).unwrap()[0], index(v), "{v:?}");
        }
    }

    fn sample_status() -> ImageStatus {
        ImageStatus {
            global_id: GlobalId([1; 12]),
            name: "n".into(),
            version: 1,
            bytes_uploaded: 0,
            total_len: 0,
            data_len: 0,
            sites: vec![],
        }
    }

    fn sample_manifest() -> Manifest {
        Manifest {
            format: crate::manifest::MANIFEST_FORMAT,
            global_id: GlobalId([1; 12]),
            version: 1,
            parent: None,
            name: "n".into(),
            chunking: ChunkerConfig::default(),
            files: vec![],
        }
    }

    #[test]
    fn golden_every_variant_of_every_wire_enum() {
        check(
            &[
                Role::Client {
                    admin_secret: "s".into(),
                },
                Role::Agent {
                    site: "a".into(),
                    adapter: "dir".into(),
                },
                Role::Enroll {
                    secret: "s".into(),
                    site: "a".into(),
                    adapter: "dir".into(),
                    csr_der: vec![],
                },
            ],
            |v| match v {
                Role::Client { .. } => 0,
                Role::Agent { .. } => 1,
                Role::Enroll { .. } => 2,
            },
        );
        check(
            &[
                HelloReply::Welcome {
                    protocol: 1,
                    engine_id: "e".into(),
                    chunking: ChunkerConfig::default(),
                    signing_key: [0; 32],
                },
                HelloReply::Enrolled {
                    cert_der: vec![],
                    ca_der: vec![],
                    expires_unix: 0,
                    signing_key: [0; 32],
                },
                HelloReply::Refused {
                    reason: RefuseReason::BadToken,
                    message: String::new(),
                },
            ],
            |v| match v {
                HelloReply::Welcome { .. } => 0,
                HelloReply::Enrolled { .. } => 1,
                HelloReply::Refused { .. } => 2,
            },
        );
        check(
            &[
                RefuseReason::ProtocolVersion,
                RefuseReason::BadToken,
                RefuseReason::UnknownSite,
                RefuseReason::Revoked,
                RefuseReason::BadRequest,
                RefuseReason::Expired,
            ],
            |v| match v {
                RefuseReason::ProtocolVersion => 0,
                RefuseReason::BadToken => 1,
                RefuseReason::UnknownSite => 2,
                RefuseReason::Revoked => 3,
                RefuseReason::BadRequest => 4,
                RefuseReason::Expired => 5,
            },
        );
        check(
            &[
                AgentMsg::Inventory { images: vec![] },
                AgentMsg::Need {
                    transfer: 1,
                    chunks: vec![],
                },
                AgentMsg::Published {
                    transfer: 1,
                    local_id: String::new(),
                    bytes_received: 0,
                },
                AgentMsg::Failed {
                    transfer: 1,
                    error: String::new(),
                },
                AgentMsg::NeedFrom {
                    transfer: 1,
                    chunks: vec![],
                    bases_from: vec![],
                    unavailable: vec![],
                },
                AgentMsg::Renew { csr_der: vec![] },
                AgentMsg::Drifted {
                    global_id: GlobalId([0; 12]),
                    version: 1,
                    detail: String::new(),
                },
            ],
            |v| match v {
                AgentMsg::Inventory { .. } => 0,
                AgentMsg::Need { .. } => 1,
                AgentMsg::Published { .. } => 2,
                AgentMsg::Failed { .. } => 3,
                AgentMsg::NeedFrom { .. } => 4,
                AgentMsg::Renew { .. } => 5,
                AgentMsg::Drifted { .. } => 6,
            },
        );
        let held = HeldVersion {
            global_id: GlobalId([1; 12]),
            version: 1,
        };
        check(
            &[
                EngineMsg::Deploy {
                    transfer: 1,
                    manifest: sample_manifest(),
                    signature: vec![],
                },
                EngineMsg::DeployDelta {
                    transfer: 1,
                    base: held,
                    manifest_id: [0; 32],
                    delta: vec![],
                    signature: vec![],
                },
                EngineMsg::Renewed {
                    cert_der: vec![],
                    expires_unix: 0,
                },
                EngineMsg::RenewRefused {
                    message: String::new(),
                },
            ],
            |v| match v {
                EngineMsg::Deploy { .. } => 0,
                EngineMsg::DeployDelta { .. } => 1,
                EngineMsg::Renewed { .. } => 2,
                EngineMsg::RenewRefused { .. } => 3,
            },
        );
        let ch = ChunkHeader {
            id: ChunkId([0; 32]),
            raw_len: 1,
            encoding: Encoding::Raw,
            payload_len: 1,
        };
        check(
            &[
                DataRecord::Chunk(ch),
                DataRecord::Group(GroupHeader {
                    chunks: vec![],
                    base: vec![],
                    payload_len: 0,
                }),
                DataRecord::Abort {
                    reason: String::new(),
                },
            ],
            |v| match v {
                DataRecord::Chunk(_) => 0,
                DataRecord::Group(_) => 1,
                DataRecord::Abort { .. } => 2,
            },
        );
        check(
            &[
                crate::manifest::FileFormat::Raw,
                crate::manifest::FileFormat::Qcow2,
            ],
            |v| match v {
                crate::manifest::FileFormat::Raw => 0,
                crate::manifest::FileFormat::Qcow2 => 1,
            },
        );
        check(&[Encoding::Raw, Encoding::Zstd], |v| match v {
            Encoding::Raw => 0,
            Encoding::Zstd => 1,
        });
        check(
            &[
                crate::manifest::Extent::Data {
                    id: ChunkId([0; 32]),
                    len: 1,
                },
                crate::manifest::Extent::Hole { len: 1 },
            ],
            |v| match v {
                crate::manifest::Extent::Data { .. } => 0,
                crate::manifest::Extent::Hole { .. } => 1,
            },
        );
        let g = GlobalId([1; 12]);
        check(
            &[
                Request::Missing { chunks: vec![] },
                Request::Upload { count: 0 },
                Request::Commit(CommitRequest {
                    name: "n".into(),
                    files: vec![],
                    sites: None,
                }),
                Request::Status { global_id: None },
                Request::Sites,
                Request::Watch {
                    global_id: g,
                    version: 1,
                },
                Request::Revoke { site: "a".into() },
                Request::Adapt(AdaptRequest {
                    global_id: g,
                    ops: vec![],
                }),
                Request::History { global_id: g },
                Request::Rollback {
                    global_id: g,
                    to: 1,
                },
                Request::SiteAdd {
                    site: "a".into(),
                    expires_secs: 1,
                },
                Request::SiteReset { site: "a".into() },
                Request::BenchSite {
                    site: "a".into(),
                    seconds: 1,
                },
                Request::SiteSet {
                    site: "a".into(),
                    max_rate: Some(None),
                    congestion: Some(Some(Congestion::Bbr)),
                },
                Request::UploadRecords { count: 0 },
            ],
            |v| match v {
                Request::Missing { .. } => 0,
                Request::Upload { .. } => 1,
                Request::Commit(_) => 2,
                Request::Status { .. } => 3,
                Request::Sites => 4,
                Request::Watch { .. } => 5,
                Request::Revoke { .. } => 6,
                Request::Adapt(_) => 7,
                Request::History { .. } => 8,
                Request::Rollback { .. } => 9,
                Request::SiteAdd { .. } => 10,
                Request::SiteReset { .. } => 11,
                Request::BenchSite { .. } => 12,
                Request::SiteSet { .. } => 13,
                Request::UploadRecords { .. } => 14,
            },
        );
        check(
            &[
                AdaptOp::Replace {
                    path: "a".into(),
                    mode: 0,
                    recipe: crate::manifest::FileRecipe {
                        len: 0,
                        hash: [0; 32],
                        extents: vec![],
                    },
                    format: crate::manifest::FileFormat::Qcow2,
                },
                AdaptOp::Write {
                    path: "a".into(),
                    offset: 0,
                    data: vec![],
                },
                AdaptOp::Add(FileEntry {
                    path: "a".into(),
                    mode: 0,
                    recipe: crate::manifest::FileRecipe {
                        len: 0,
                        hash: [0; 32],
                        extents: vec![],
                    },
                    format: crate::manifest::FileFormat::Raw,
                }),
                AdaptOp::Remove { path: "a".into() },
            ],
            |v| match v {
                AdaptOp::Replace { .. } => 0,
                AdaptOp::Write { .. } => 1,
                AdaptOp::Add(_) => 2,
                AdaptOp::Remove { .. } => 3,
            },
        );
        check(
            &[
                Response::Missing { chunks: vec![] },
                Response::Uploaded {
                    stored: 0,
                    bytes: 0,
                },
                Response::Committed(sample_status()),
                Response::Image(sample_status()),
                Response::Images(vec![]),
                Response::Sites(vec![]),
                Response::Progress(sample_status()),
                Response::Revoked,
                Response::Error {
                    kind: ErrorKind::Invalid,
                    message: String::new(),
                },
                Response::History(vec![]),
                Response::SiteToken {
                    site: "a".into(),
                    token: "t".into(),
                    expires_unix: 0,
                },
                Response::Done,
                Response::SiteBench(SiteBench {
                    site: "a".into(),
                    rtt_quic_us: 0,
                    rtt_ping_us: 0,
                    raw_bytes: 0,
                    raw_us: 0,
                    chunks: 0,
                    chunk_payload_bytes: 0,
                    chunk_raw_bytes: 0,
                    chunk_us: 0,
                    verify_us: 0,
                    write_us: 0,
                }),
            ],
            |v| match v {
                Response::Missing { .. } => 0,
                Response::Uploaded { .. } => 1,
                Response::Committed(_) => 2,
                Response::Image(_) => 3,
                Response::Images(_) => 4,
                Response::Sites(_) => 5,
                Response::Progress(_) => 6,
                Response::Revoked => 7,
                Response::Error { .. } => 8,
                Response::History(_) => 9,
                Response::SiteToken { .. } => 10,
                Response::Done => 11,
                Response::SiteBench(_) => 12,
            },
        );
        check(
            &[
                ErrorKind::NotFound,
                ErrorKind::Invalid,
                ErrorKind::MissingChunks,
                ErrorKind::Internal,
            ],
            |v| match v {
                ErrorKind::NotFound => 0,
                ErrorKind::Invalid => 1,
                ErrorKind::MissingChunks => 2,
                ErrorKind::Internal => 3,
            },
        );
        check(
            &[
                PlacementState::Pending,
                PlacementState::Transferring,
                PlacementState::Published,
                PlacementState::Failed,
                PlacementState::Drifted,
            ],
            |v| match v {
                PlacementState::Pending => 0,
                PlacementState::Transferring => 1,
                PlacementState::Published => 2,
                PlacementState::Failed => 3,
                PlacementState::Drifted => 4,
            },
        );
        check(&[Probe::Ping, Probe::Raw, Probe::Chunks], |v| match v {
            Probe::Ping => 0,
            Probe::Raw => 1,
            Probe::Chunks => 2,
        });
        check(
            &[
                ProbeReply::Pong,
                ProbeReply::Received {
                    bytes: 0,
                    chunks: 0,
                    raw_bytes: 0,
                    micros: 0,
                    verify_micros: 0,
                    write_micros: 0,
                },
                ProbeReply::Refused {
                    message: String::new(),
                },
            ],
            |v| match v {
                ProbeReply::Pong => 0,
                ProbeReply::Received { .. } => 1,
                ProbeReply::Refused { .. } => 2,
            },
        );
    }

    #[test]
    fn golden_engine_msg_hello_reply_error_kind_and_role() {
        let d = EngineMsg::DeployDelta {
            transfer: 300,
            base: HeldVersion {
                global_id: GlobalId([0xaa; 12]),
                version: 2,
            },
            manifest_id: [0xbb; 32],
            delta: vec![1, 2],
            signature: vec![0xcc; 64],
        };
        // 01            EngineMsg::DeployDelta
        // fb 2c 01      transfer 300
        // aa×12 02      base: global id, version 2
        // bb×32         manifest id
        // 02 01 02      delta: length 2, bytes
        // 40 cc×64      signature: length 64, bytes
        assert_eq!(
            hex(&d),
            format!(
                "01fb2c01{}02{}02010240{}",
                "aa".repeat(12),
                "bb".repeat(32),
                "cc".repeat(64)
            )
        );
        let r = HelloReply::Refused {
            reason: RefuseReason::Revoked,
            message: "no".into(),
        };
        // 02 Refused | 03 Revoked | 02 6e6f "no"
        assert_eq!(hex(&r), "0203026e6f");
        let w = HelloReply::Welcome {
            protocol: 1,
            engine_id: "e".into(),
            chunking: ChunkerConfig::default(),
            signing_key: [0xdd; 32],
        };
        // 00 Welcome | 01 protocol | 01 65 "e" | chunking: min 16384 (fb 0040), avg 65536
        // (fc 00000100), max 262144 (fc 00000400), hole_block 4096 (fb 0010), hole_min 32768
        // (fb 0080) | signing key dd×32 (a fixed-size array: no length)
        assert_eq!(
            hex(&w),
            format!(
                "00010165fb0040fc00000100fc00000400fb0010fb0080{}",
                "dd".repeat(32)
            )
        );
        let e = Response::Error {
            kind: ErrorKind::MissingChunks,
            message: "m".into(),
        };
        // 08 Error | 02 MissingChunks | 01 6d "m"
        assert_eq!(hex(&e), "0802016d");
        let enroll = Role::Enroll {
            secret: "s".into(),
            site: "a".into(),
            adapter: "d".into(),
            csr_der: vec![0xcc],
        };
        // 02 Enroll | 01 73 | 01 61 | 01 64 | 01 cc
        assert_eq!(hex(&enroll), "0201730161016401cc");
    }

    #[test]
    fn golden_file_entry() {
        let f = FileEntry {
            path: "d".into(),
            mode: 0o644,
            recipe: crate::manifest::FileRecipe {
                len: 65536,
                hash: [0xcc; 32],
                extents: vec![crate::manifest::Extent::Hole { len: 65536 }],
            },
            format: crate::manifest::FileFormat::Qcow2,
        };
        // 01 64           path "d"
        // fb a4 01        mode 0o644 = 420
        // fc 00000100     recipe.len 65536
        // cc×32           recipe.hash
        // 01 01 fc 00000100  one extent: Hole (1), len 65536
        // 01              format: Qcow2
        assert_eq!(
            hex(&f),
            format!("0164fba401fc00000100{}0101fc0000010001", "cc".repeat(32))
        );
    }

    #[test]
    fn golden_group_record() {
        let g = DataRecord::Group(GroupHeader {
            chunks: vec![(ChunkId([1; 32]), 300)],
            base: vec![ChunkId([2; 32])],
            payload_len: 7,
        });
        // 01             DataRecord::Group
        // 01 | 01×32 | fb 2c 01   one chunk: id, length 300
        // 01 | 02×32              one base chunk
        // 07                      payload_len
        assert_eq!(
            hex(&g),
            format!("0101{}fb2c0101{}07", "01".repeat(32), "02".repeat(32))
        );
    }

    #[test]
    fn golden_chunk_header() {
        let h = ChunkHeader {
            id: ChunkId([0xab; 32]),
            raw_len: 65536,
            encoding: Encoding::Zstd,
            payload_len: 300,
        };
        // ab×32          id (fixed 32 bytes)
        // fc 00 00 01 00 raw_len 65536 (varint: 0xfc + u32 LE)
        // 01             Encoding::Zstd
        // fb 2c 01       payload_len 300 (varint: 0xfb + u16 LE)
        assert_eq!(hex(&h), format!("{}fc0000010001fb2c01", "ab".repeat(32)));
    }
}

/// Hostile bytes into every wire decoder: valid encodings of every message, mutated (bytes
/// flipped, cut short, lengthened, spliced), must decode to an error or to a value — never
/// panic, and never allocate past the codec's bound (a panic or an abort fails the test).
#[cfg(test)]
mod hostile_bytes {
    use super::*;
    use crate::codec;
    use crate::manifest::{Extent, FileFormat, FileRecipe};
    use proptest::prelude::*;

    fn manifest() -> Manifest {
        let recipe = FileRecipe {
            len: 70_000,
            hash: [0; 32],
            extents: vec![
                Extent::Data {
                    id: ChunkId::of(b"a"),
                    len: 60_000,
                },
                Extent::Hole { len: 10_000 },
            ],
        };
        let recipe = FileRecipe {
            hash: recipe.content_hash(),
            ..recipe
        };
        Manifest {
            format: crate::manifest::MANIFEST_FORMAT,
            global_id: GlobalId([1; 12]),
            version: 2,
            parent: Some(1),
            name: "n".into(),
            chunking: ChunkerConfig::default(),
            files: vec![FileEntry {
                path: "disk.raw".into(),
                mode: 0o644,
                recipe,
                format: FileFormat::Raw,
            }],
        }
    }

    /// One valid encoding of each message type the peers exchange.
    fn samples() -> Vec<Vec<u8>> {
        let m = manifest();
        let held = HeldVersion {
            global_id: GlobalId([1; 12]),
            version: 1,
        };
        let id = ChunkId::of(b"a");
        vec![
            codec::encode(&Hello {
                protocol: PROTOCOL_VERSION,
                role: Role::Enroll {
                    secret: "s".into(),
                    site: "a".into(),
                    adapter: "dir".into(),
                    csr_der: vec![1; 40],
                },
            }),
            codec::encode(&EngineMsg::Deploy {
                transfer: 7,
                manifest: m.clone(),
                signature: vec![5; 64],
            }),
            codec::encode(&EngineMsg::DeployDelta {
                transfer: 7,
                base: held,
                manifest_id: [2; 32],
                delta: vec![9; 30],
                signature: vec![5; 64],
            }),
            codec::encode(&AgentMsg::NeedFrom {
                transfer: 7,
                chunks: vec![id; 5],
                bases_from: vec![held],
                unavailable: vec![id],
            }),
            codec::encode(&AgentMsg::Inventory {
                images: vec![HeldImage {
                    global_id: GlobalId([1; 12]),
                    version: 1,
                    manifest_id: [3; 32],
                    local_id: "x".into(),
                }],
            }),
            codec::encode(&DataRecord::Group(GroupHeader {
                chunks: vec![(id, 100); 3],
                base: vec![id],
                payload_len: 300,
            })),
            codec::encode(&Request::Commit(CommitRequest {
                name: "img".into(),
                files: m.files.clone(),
                sites: Some(vec!["a".into()]),
            })),
            codec::encode(&m),
        ]
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
    }

    /// Decode `bytes` as everything a peer may send; a decoded manifest is also validated
    /// and used as a delta base, as the receivers do.
    fn decode_all(bytes: &[u8]) {
        let _ = codec::decode::<Hello>(bytes);
        let _ = codec::decode::<HelloReply>(bytes);
        let _ = codec::decode::<Request>(bytes);
        let _ = codec::decode::<Response>(bytes);
        let _ = codec::decode::<AgentMsg>(bytes);
        let _ = codec::decode::<DataRecord>(bytes);
        let _ = codec::decode::<DataStreamHeader>(bytes);
        let _ = codec::decode::<ChunkHeader>(bytes);
        if let Ok(EngineMsg::Deploy { manifest, .. }) = codec::decode::<EngineMsg>(bytes) {
            let _ = manifest.validate();
            let _ = manifest.id();
        }
        if let Ok(m) = codec::decode::<Manifest>(bytes) {
            let _ = m.validate();
            let _ = m.first_uses();
            let _ = Manifest::from_delta(&m, bytes, &[0; 32]);
        }
        let _ = Manifest::from_delta(&manifest(), bytes, &[0; 32]);
        let _ = crate::frame::parse::<AgentMsg>(bytes, MAX_HELLO_SIZE);
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Flip(usize, u8),
        Cut(usize),
        Extend(Vec<u8>),
        Splice(usize, Vec<u8>),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
            any::<usize>().prop_map(Mutation::Cut),
            proptest::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Extend),
            (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..9))
                .prop_map(|(i, v)| Mutation::Splice(i, v)),
        ]
    }

    fn apply(mut b: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
        for m in muts {
            if b.is_empty() {
                break;
            }
            let n = b.len();
            match m {
                Mutation::Flip(i, x) => b[i % n] ^= x | 1,
                Mutation::Cut(i) => b.truncate(i % n),
                Mutation::Extend(v) => b.extend_from_slice(v),
                Mutation::Splice(i, v) => {
                    // Overwrite with bytes that often read as long varints (0xfb-0xfd).
                    for (k, x) in v.iter().enumerate() {
                        let j = (i + k) % n;
                        b[j] = 0xfb + x % 3;
                    }
                }
            }
        }
        b
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn mutated_messages_are_errors_or_values_never_panics(
            which in 0usize..8,
            muts in proptest::collection::vec(mutation(), 1..6),
        ) {
            let b = apply(samples()[which].clone(), &muts);
            decode_all(&b);
        }

        #[test]
        fn random_bytes_are_errors_or_values_never_panics(
            b in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            decode_all(&b);
        }
    }
}
