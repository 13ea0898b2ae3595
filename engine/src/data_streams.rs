//! The engine's data streams to one site: the work a deployment's sender planned, carried on
//! several unidirectional streams that take items from a shared cursor, so one slow stream
//! does not hold the others back.
//!
//! Each stream is one [`DataStreamHeader`] frame, then records: a stored chunk goes out as
//! it sits in the store (no copy, no recompression); a delta group is encoded once for
//! every site with the same bases ([`DeltaCache::group`]) and sent, or sent as its stored
//! chunks when the delta would not be smaller. Chunks come from a [`ChunkSource`]: this path
//! never touches the catalog.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use quinn::{Connection, SendStream};
use seedcast_core::ChunkId;
use seedcast_core::protocol::{ChunkHeader, DataRecord, DataStreamHeader};
use seedcast_core::sender::Work;
use seedcast_core::source::{ChunkSource, SourceError};
use seedcast_net::{FramedError, write_msg};
use tokio::task::JoinSet;

use crate::EngineError;
use crate::delta::{DeltaCache, Encoded};
use seedcast_core::bases::BaseIndex;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Framed(#[from] FramedError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl StreamError {
    /// The engine's own store could not provide what it had to send (a chunk damaged or
    /// missing): that transfer cannot finish, but the connection is fine.
    pub fn store_fault(&self) -> bool {
        matches!(
            self,
            StreamError::Source(_)
                | StreamError::Engine(EngineError::Source(_) | EngineError::Store(_))
        )
    }
}

/// Tell the agent that `transfer` cannot finish, and why, on a stream of its own.
pub(crate) async fn abort(
    conn: &Connection,
    transfer: u64,
    reason: String,
) -> Result<(), StreamError> {
    let mut s = conn.open_uni().await?;
    write_msg(&mut s, &DataStreamHeader { transfer }).await?;
    write_msg(&mut s, &DataRecord::Abort { reason }).await?;
    s.finish()?;
    Ok(())
}

impl From<tokio::task::JoinError> for StreamError {
    fn from(e: tokio::task::JoinError) -> Self {
        StreamError::Engine(e.into())
    }
}

/// The delta bases a site's groups are encoded against.
#[derive(Debug, Clone)]
pub(crate) struct Deltas {
    pub cache: Arc<DeltaCache>,
    pub index: Arc<BaseIndex>,
    /// Names the set of bases (for sharing encodings between sites).
    pub key: [u8; 32],
    /// The zstd level of groups (the highest, when adapting).
    pub level: i32,
    /// Adapt the level to the link as the transfer goes.
    pub adapt: bool,
}

/// Where an adapting transfer starts: fast enough (~20 MB/s a core) that the first groups
/// reach the link at once.
pub const ADAPT_START: i32 = 9;
/// The lowest level an adapting transfer goes to.
pub const ADAPT_MIN: i32 = 6;

/// The level a transfer's first groups are encoded at.
pub(crate) fn start_level(d: &Deltas) -> i32 {
    if d.adapt {
        ADAPT_START.min(d.level)
    } else {
        d.level
    }
}

/// The delta level of one adapting transfer, moved by how much encoded data waits for the
/// link: the bytes written to the streams and not yet sent by the connection, in seconds of
/// what the connection has been sending.
#[derive(Debug)]
struct Adaptive {
    level: std::sync::atomic::AtomicI32,
    max: i32,
    start: std::time::Instant,
    tx0: u64,
    written: AtomicU64,
}

impl Adaptive {
    fn new(conn: &Connection, max: i32) -> Self {
        Adaptive {
            level: std::sync::atomic::AtomicI32::new(ADAPT_START.min(max)),
            max,
            start: std::time::Instant::now(),
            tx0: conn.stats().udp_tx.bytes,
            written: AtomicU64::new(0),
        }
    }

    fn level(&self) -> i32 {
        self.level.load(Ordering::Relaxed)
    }

    /// A group of `n` payload bytes is about to be written: adjust the level for the next.
    fn wrote(&self, conn: &Connection, n: u64) {
        let written = self.written.fetch_add(n, Ordering::Relaxed) + n;
        let sent = conn.stats().udp_tx.bytes.saturating_sub(self.tx0);
        let l = self.level();
        let next = next_level(
            l,
            self.max,
            written,
            sent,
            self.start.elapsed().as_secs_f64(),
        );
        if next != l {
            self.level.store(next, Ordering::Relaxed);
            tracing::debug!(level = next, "delta level adapted");
        }
    }
}

/// The next delta level of an adapting transfer at `level` (at most `max`) that has
/// written `written` payload bytes to its streams while its connection sent `sent` bytes
/// in `elapsed` seconds: up while more than a second of the link's rate waits, down while
/// less than a quarter second does.
fn next_level(level: i32, max: i32, written: u64, sent: u64, elapsed: f64) -> i32 {
    if elapsed < 0.5 || sent == 0 {
        return level;
    }
    // QUIC and UDP/IP add ~5 % to the payload.
    let backlog = written.saturating_sub(sent * 95 / 100) as f64;
    let queued_secs = backlog / (sent as f64 / elapsed);
    // Step by step: early in a transfer the rate is still growing and the queue looks
    // longer than it is (jumping to the highest level at once left wan's link waiting).
    if queued_secs > 1.0 {
        (level + 2).min(max)
    } else if queued_secs < 0.25 {
        (level - 2).max(ADAPT_MIN.min(max))
    } else {
        level
    }
}

/// Where one deployment's data goes and what it reads from.
#[derive(Debug, Clone)]
pub(crate) struct Outbound {
    pub conn: Connection,
    pub transfer: u64,
    pub source: Arc<dyn ChunkSource>,
    pub deltas: Option<Deltas>,
    /// Payload bytes sent so far (read live by status).
    pub sent: Arc<AtomicU64>,
    /// Parallel streams at most.
    pub streams: usize,
    /// Rate limits: every record waits for its turn.
    pub pacer: Arc<crate::pacing::Pacer>,
}

/// Send `work` over up to `out.streams` streams; returns when every item is sent.
pub(crate) async fn send(out: Outbound, work: Vec<Work>) -> Result<(), StreamError> {
    if work.is_empty() {
        return Ok(());
    }
    let streams = out.streams.clamp(1, work.len());
    let adaptive = out
        .deltas
        .as_ref()
        .filter(|d| d.adapt)
        .map(|d| Adaptive::new(&out.conn, d.level));
    let shared = Arc::new(Shared {
        out,
        work,
        cursor: AtomicUsize::new(0),
        adaptive,
    });
    let mut set = JoinSet::new();
    for _ in 0..streams {
        set.spawn(stream(shared.clone()));
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// What the streams of one deployment share.
#[derive(Debug)]
struct Shared {
    out: Outbound,
    work: Vec<Work>,
    /// The next item to take.
    cursor: AtomicUsize,
    /// The transfer's delta level, when it adapts to the link.
    adaptive: Option<Adaptive>,
}

async fn stream(sh: Arc<Shared>) -> Result<(), StreamError> {
    let out = &sh.out;
    let mut s = out.conn.open_uni().await?;
    write_msg(
        &mut s,
        &DataStreamHeader {
            transfer: out.transfer,
        },
    )
    .await?;
    loop {
        let i = sh.cursor.fetch_add(1, Ordering::Relaxed);
        let Some(item) = sh.work.get(i) else { break };
        let stored = match (item, &out.deltas) {
            (Work::Stored(ids), _) => ids.clone(),
            (Work::Group(chunks), Some(d)) => {
                let enc = d
                    .cache
                    .group(
                        out.source.clone(),
                        d.index.clone(),
                        d.key,
                        chunks.clone(),
                        sh.adaptive.as_ref().map_or(d.level, Adaptive::level),
                    )
                    .await?;
                match &*enc {
                    Encoded::Group { header, payload } => {
                        if let Some(a) = &sh.adaptive {
                            a.wrote(&out.conn, payload.len() as u64);
                        }
                        out.pacer.admit(payload.len() as u64).await;
                        write_msg(&mut s, &DataRecord::Group(header.clone())).await?;
                        s.write_chunk(payload.clone()).await?;
                        out.sent.fetch_add(payload.len() as u64, Ordering::Relaxed);
                        continue;
                    }
                    Encoded::Stored(ids) => ids.clone(),
                }
            }
            (Work::Group(chunks), None) => chunks.iter().map(|(id, _)| *id).collect(),
        };
        send_stored(out, &mut s, stored).await?;
    }
    s.finish()?;
    Ok(())
}

/// Read chunks from the source (on a blocking thread) and send them in their stored form.
async fn send_stored(
    out: &Outbound,
    s: &mut SendStream,
    ids: Vec<ChunkId>,
) -> Result<(), StreamError> {
    let source = out.source.clone();
    let chunks = tokio::task::spawn_blocking(move || {
        ids.iter()
            .map(|id| source.read(id))
            .collect::<Result<Vec<_>, _>>()
    })
    .await??;
    for c in chunks {
        out.pacer.admit(c.payload.len() as u64).await;
        write_msg(s, &DataRecord::Chunk(ChunkHeader::of(&c))).await?;
        let n = c.payload.len() as u64;
        // The stored bytes go out as they are: no copy, no recompression.
        s.write_chunk(c.payload).await?;
        out.sent.fetch_add(n, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delta_level_rises_while_groups_queue_and_falls_while_the_link_waits() {
        // 1 MB/s sent for 2 s: 2 MB out.
        let sent = 2_000_000;
        // 4 MB written: ~2 s queued → up by two, never past the most.
        assert_eq!(next_level(9, 19, 4_000_000, sent, 2.0), 11);
        assert_eq!(next_level(19, 19, 4_000_000, sent, 2.0), 19);
        // Everything written is out: the link waits for the encoder → down by two, not
        // below the least.
        assert_eq!(next_level(15, 19, 1_950_000, sent, 2.0), 13);
        assert_eq!(next_level(ADAPT_MIN, 19, 1_950_000, sent, 2.0), ADAPT_MIN);
        // Half a second queued: where it is.
        assert_eq!(next_level(15, 19, 2_700_000, sent, 2.0), 15);
        // Too early to tell, or nothing sent yet: unchanged.
        assert_eq!(next_level(9, 19, 4_000_000, sent, 0.3), 9);
        assert_eq!(next_level(9, 19, 4_000_000, 0, 2.0), 9);
        // A highest level below the least adaptive one is kept.
        assert_eq!(next_level(3, 3, 100, sent, 2.0), 3);
    }
}
