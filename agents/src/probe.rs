//! Probe streams: the engine measuring the path to this site (`seedcast bench site`).
//!
//! A probe is answered and forgotten: raw bytes are read and dropped; chunk records are
//! verified exactly as a deployment's are (decoded within the chunking's bounds, hashed)
//! and written to a scratch file under the data directory, which wraps at
//! [`SCRATCH_BYTES`] and is removed when the probe ends. Nothing reaches the cache or the
//! site's service. One probe at a time; each stops after [`Probe::MAX_SECS`] or
//! [`Probe::MAX_BYTES`], whatever the engine sends.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream, VarInt};
use seedcast_core::protocol::{ChunkHeader, Probe, ProbeReply, close};
use seedcast_core::{CompressedChunk, UnverifiedChunk};
use seedcast_net::{FramedError, read_msg, read_msg_required, read_payload, write_msg};
use tokio::sync::Semaphore;
use tracing::debug;

use crate::error::AgentError;

/// Why a probe stream ended without an answer.
#[derive(Debug, thiserror::Error)]
enum ProbeFault {
    #[error(transparent)]
    Framed(#[from] FramedError),
    #[error("scratch file: {0}")]
    Io(#[from] std::io::Error),
    #[error("probe task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The scratch file wraps here, so a probe never takes more disk than this.
pub const SCRATCH_BYTES: u64 = 256 << 20;

/// Chunks a probe verifies and writes at once: as many as the engine's data streams of one
/// transfer (4), so the probe measures the pipeline a deployment has.
const IN_FLIGHT: usize = 4;

/// Accept the engine's probe streams for as long as the connection lives.
pub(crate) async fn accept_probes(
    conn: Connection,
    data: PathBuf,
    max_raw: u32,
) -> Result<(), AgentError> {
    let busy = Arc::new(Semaphore::new(Probe::MAX_CONCURRENT));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            s = conn.accept_bi() => {
                let (send, recv) = s?;
                let permit = busy.clone().try_acquire_owned().ok();
                let data = data.clone();
                tasks.spawn(async move {
                    if let Err(e) = probe(send, recv, permit.is_some(), &data, max_raw).await {
                        debug!("probe stream ended: {e}");
                    }
                    drop(permit);
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// Serve one probe stream.
async fn probe(
    mut send: SendStream,
    mut recv: RecvStream,
    allowed: bool,
    data: &Path,
    max_raw: u32,
) -> Result<(), ProbeFault> {
    let kind: Probe = read_msg_required(&mut recv).await?;
    let reply = if !allowed {
        refuse(&mut recv, "another probe is running at this site".into())
    } else {
        let deadline = Instant::now() + Duration::from_secs(Probe::MAX_SECS.into());
        match kind {
            Probe::Ping => ProbeReply::Pong,
            Probe::Raw => match tokio::time::timeout_at(deadline.into(), raw(&mut recv)).await {
                Ok(r) => r?,
                Err(_) => too_long(&mut recv),
            },
            Probe::Chunks => {
                let scratch = data.join(".probe-scratch");
                let r =
                    tokio::time::timeout_at(deadline.into(), chunks(&mut recv, &scratch, max_raw))
                        .await;
                let _ = std::fs::remove_file(&scratch);
                match r {
                    Ok(r) => r?,
                    Err(_) => too_long(&mut recv),
                }
            }
        }
    };
    write_msg(&mut send, &reply).await?;
    let _ = send.finish();
    Ok(())
}

fn too_long(recv: &mut RecvStream) -> ProbeReply {
    refuse(recv, format!("the probe ran over {} s", Probe::MAX_SECS))
}

fn over_bytes(recv: &mut RecvStream) -> ProbeReply {
    refuse(
        recv,
        format!("the probe sent over {} bytes", Probe::MAX_BYTES),
    )
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

/// Read raw bytes until the stream ends.
async fn raw(recv: &mut RecvStream) -> Result<ProbeReply, ProbeFault> {
    let mut bytes = 0u64;
    let mut start = None;
    while let Some(c) = recv
        .read_chunk(1 << 20, true)
        .await
        .map_err(FramedError::from)?
    {
        start.get_or_insert_with(Instant::now);
        bytes += c.bytes.len() as u64;
        if bytes > Probe::MAX_BYTES {
            return Ok(over_bytes(recv));
        }
    }
    Ok(ProbeReply::Received {
        bytes,
        chunks: 0,
        raw_bytes: 0,
        micros: start.map_or(0, |s| micros(s.elapsed())),
        verify_micros: 0,
        write_micros: 0,
    })
}

/// What the chunks of a probe came to at the site.
#[derive(Debug, Default)]
struct Tally {
    chunks: u64,
    raw_bytes: u64,
    verify: Duration,
    write: Duration,
}

/// One chunk verified and written (its bytes, and the time each took), or why not.
type Pending = tokio::task::JoinHandle<Result<(u64, Duration, Duration), String>>;

impl Tally {
    /// Wait for the chunk in flight; a message when it was refused.
    async fn settle(&mut self, pending: Option<Pending>) -> Result<Option<String>, ProbeFault> {
        let Some(p) = pending else { return Ok(None) };
        match p.await? {
            Ok((n, v, w)) => {
                self.chunks += 1;
                self.raw_bytes += n;
                self.verify += v;
                self.write += w;
                Ok(None)
            }
            Err(message) => Ok(Some(message)),
        }
    }
}

/// Read chunk records until the stream ends: verify each and write it to `scratch`.
async fn chunks(
    recv: &mut RecvStream,
    scratch: &Path,
    max_raw: u32,
) -> Result<ProbeReply, ProbeFault> {
    let file = Arc::new(File::create(scratch)?);
    let mut bytes = 0u64;
    let mut tally = Tally::default();
    let mut start = None;
    // Up to IN_FLIGHT records verified and written while the next is read, as a
    // deployment's data streams do.
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut offset = 0u64;
    while let Some(h) = read_msg::<ChunkHeader>(recv).await? {
        start.get_or_insert_with(Instant::now);
        if h.payload_len > ChunkHeader::MAX_PAYLOAD || h.raw_len > max_raw {
            return Ok(refuse(
                recv,
                format!(
                    "chunk {} of {} B ({} B stored) is over this site's bounds",
                    h.id, h.raw_len, h.payload_len
                ),
            ));
        }
        let payload = read_payload(recv, h.payload_len as usize).await?;
        bytes += payload.len() as u64;
        if bytes > Probe::MAX_BYTES {
            return Ok(over_bytes(recv));
        }
        if pending.len() >= IN_FLIGHT
            && let Some(message) = tally.settle(pending.pop_front()).await?
        {
            return Ok(refuse(recv, message));
        }
        let at = offset;
        offset = (offset + h.raw_len as u64) % SCRATCH_BYTES;
        let file = file.clone();
        pending.push_back(tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let c = UnverifiedChunk(CompressedChunk {
                id: h.id,
                raw_len: h.raw_len,
                encoding: h.encoding,
                payload,
            })
            .verify(max_raw)
            .map_err(|e| e.to_string())?;
            let v = t.elapsed();
            let t = Instant::now();
            file.write_all_at(c.raw(), at)
                .map_err(|e| format!("scratch file: {e}"))?;
            Ok((c.raw().len() as u64, v, t.elapsed()))
        }));
    }
    while let Some(p) = pending.pop_front() {
        if let Some(message) = tally.settle(Some(p)).await? {
            return Ok(refuse(recv, message));
        }
    }
    // Written means on disk, as a deployment's chunks are before they count.
    let t = Instant::now();
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.sync_data()).await??;
    tally.write += t.elapsed();
    Ok(ProbeReply::Received {
        bytes,
        chunks: tally.chunks,
        raw_bytes: tally.raw_bytes,
        micros: start.map_or(0, |s| micros(s.elapsed())),
        verify_micros: micros(tally.verify),
        write_micros: micros(tally.write),
    })
}

/// Stop reading the probe and say why.
fn refuse(recv: &mut RecvStream, message: String) -> ProbeReply {
    let _ = recv.stop(VarInt::from_u32(close::PROTOCOL));
    ProbeReply::Refused { message }
}
