//! `seedcast bench site`: measure the real path to one connected site over its agent's own
//! connection — round trip, raw throughput, and the chunk pipeline (stored chunks sent as
//! a deployment sends them, verified and written at the agent, then discarded) — so an
//! operator can tell a slow link from a slow site. Nothing is published or recorded.
//!
//! The time asked for is split: a few pings, then half the rest raw bytes and half chunks.
//! It is capped below [`Probe::MAX_SECS`], after which an agent stops reading a probe.

use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream};
use seedcast_core::protocol::{ChunkHeader, Probe, ProbeReply, SiteBench};
use seedcast_core::source::ChunkSource;
use seedcast_core::{ChunkId, CompressedChunk};
use seedcast_net::{FramedError, read_msg_required, write_msg};

use crate::EngineError;
use crate::state::Shared;

/// Most seconds one `bench site` may take (the agent's own cap is above it).
pub const MAX_SECS: u32 = Probe::MAX_SECS - 10;
/// Pings sent; the least round trip is reported.
const PINGS: u32 = 5;
/// The most distinct stored chunks one run reads, and their most bytes held (it sends them
/// in cycles): what a probe makes the engine hold stays small whatever the store holds.
const MAX_DISTINCT: usize = 4096;
const MAX_SAMPLE_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("site {0:?} is not connected")]
    NotConnected(String),
    #[error("the probe stream to {site:?} failed: {source}")]
    Stream { site: String, source: FramedError },
    #[error("site {site:?} refused the probe: {message}")]
    Refused { site: String, message: String },
    #[error("site {site:?} answered a probe with {reply}")]
    Unexpected { site: String, reply: String },
    #[error("site {site:?} did not answer a probe within {secs} s")]
    Timeout { site: String, secs: u64 },
}

/// Measure the path to `site` for about `seconds`.
pub(crate) async fn bench_site(
    shared: &Shared,
    site: &str,
    seconds: u32,
) -> Result<SiteBench, EngineError> {
    if shared.catalog.site(site)?.is_none() {
        return Err(EngineError::UnknownSite(site.to_string()));
    }
    let conn = shared
        .agents
        .lock()
        .get(site)
        .map(|h| h.conn.clone())
        .ok_or_else(|| ProbeError::NotConnected(site.to_string()))?;
    let budget = Duration::from_secs(seconds.clamp(1, MAX_SECS).into());
    let p = Prober { site, conn: &conn };

    let mut rtt_ping = Duration::MAX;
    for _ in 0..PINGS {
        let t = Instant::now();
        let (send, recv) = p.open(Probe::Ping).await?;
        match p.reply(send, recv).await? {
            ProbeReply::Pong => rtt_ping = rtt_ping.min(t.elapsed()),
            r => return Err(p.unexpected(r)),
        }
    }

    let half = budget / 2;
    let block = Bytes::from(pseudo_random(1 << 20, b"raw probe"));
    let (mut send, recv) = p.open(Probe::Raw).await?;
    let t = Instant::now();
    while t.elapsed() < half {
        send.write_chunk(block.clone())
            .await
            .map_err(|e| p.stream(e.into()))?;
    }
    let (raw_bytes, raw_us) = match p.reply(send, recv).await? {
        ProbeReply::Received { bytes, micros, .. } => (bytes, micros),
        r => return Err(p.unexpected(r)),
    };

    let chunks = chunk_sample(shared).await?;
    let (mut send, recv) = p.open(Probe::Chunks).await?;
    let t = Instant::now();
    'send: loop {
        for c in &chunks {
            if t.elapsed() >= half {
                break 'send;
            }
            write_msg(&mut send, &ChunkHeader::of(c))
                .await
                .map_err(|e| p.stream(e))?;
            send.write_chunk(c.payload.clone())
                .await
                .map_err(|e| p.stream(e.into()))?;
        }
    }
    let sent = p.reply(send, recv).await?;
    let ProbeReply::Received {
        bytes,
        chunks,
        raw_bytes: chunk_raw_bytes,
        micros,
        verify_micros,
        write_micros,
    } = sent
    else {
        return Err(p.unexpected(sent));
    };
    Ok(SiteBench {
        site: site.to_string(),
        rtt_quic_us: conn.rtt().as_micros() as u64,
        rtt_ping_us: rtt_ping.as_micros() as u64,
        raw_bytes,
        raw_us,
        chunks,
        chunk_payload_bytes: bytes,
        chunk_raw_bytes,
        chunk_us: micros,
        verify_us: verify_micros,
        write_us: write_micros,
    })
}

struct Prober<'a> {
    site: &'a str,
    conn: &'a Connection,
}

impl Prober<'_> {
    /// Open a probe stream of `kind`.
    async fn open(&self, kind: Probe) -> Result<(SendStream, RecvStream), EngineError> {
        let (mut send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| self.stream(e.into()))?;
        write_msg(&mut send, &kind)
            .await
            .map_err(|e| self.stream(e))?;
        Ok((send, recv))
    }

    /// End what the probe sends and read the agent's one reply (within the agent's own cap
    /// on a probe's length).
    async fn reply(
        &self,
        mut send: SendStream,
        mut recv: RecvStream,
    ) -> Result<ProbeReply, EngineError> {
        let _ = send.finish();
        let limit = Duration::from_secs(Probe::MAX_SECS.into());
        let reply = tokio::time::timeout(limit, read_msg_required::<ProbeReply>(&mut recv))
            .await
            .map_err(|_| ProbeError::Timeout {
                site: self.site.to_string(),
                secs: limit.as_secs(),
            })?
            .map_err(|e| self.stream(e))?;
        match reply {
            ProbeReply::Refused { message } => Err(ProbeError::Refused {
                site: self.site.to_string(),
                message,
            }
            .into()),
            r => Ok(r),
        }
    }

    fn stream(&self, source: FramedError) -> EngineError {
        ProbeError::Stream {
            site: self.site.to_string(),
            source,
        }
        .into()
    }

    fn unexpected(&self, reply: ProbeReply) -> EngineError {
        ProbeError::Unexpected {
            site: self.site.to_string(),
            reply: format!("{reply:?}"),
        }
        .into()
    }
}

/// Chunks to send: stored ones as they are stored, read once; on an engine that holds
/// none yet, made here (half incompressible, half text-like, zstd 3 as a client stores
/// them), so a site can be measured before the first push.
async fn chunk_sample(shared: &Shared) -> Result<Vec<CompressedChunk>, EngineError> {
    let ids = shared.store.some_ids(MAX_DISTINCT);
    let store = shared.store.clone();
    let chunks = tokio::task::spawn_blocking(move || -> Result<_, EngineError> {
        if ids.is_empty() {
            return Ok(made_chunks());
        }
        let mut out = Vec::with_capacity(ids.len());
        let mut held = 0u64;
        for id in &ids {
            let c = store.read(id)?;
            held += c.payload.len() as u64;
            out.push(c);
            if held >= MAX_SAMPLE_BYTES {
                break;
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| EngineError::Io(std::io::Error::other(e)))??;
    Ok(chunks)
}

fn made_chunks() -> Vec<CompressedChunk> {
    (0..256u32)
        .map(|i| {
            let mut raw = pseudo_random(64 << 10, &i.to_le_bytes());
            if i % 2 == 1 {
                // Text-like: letters and spaces, compressible as logs and configs are.
                for b in raw.iter_mut() {
                    *b = b"etaoin shrdlu \n"[(*b % 15) as usize];
                }
            }
            CompressedChunk::compress(ChunkId::of(&raw), &raw, 3)
        })
        .collect()
}

fn pseudo_random(len: usize, seed: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; len];
    blake3::Hasher::new()
        .update(b"seedcast probe")
        .update(seed)
        .finalize_xof()
        .fill(&mut v);
    v
}
