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
    pub level: i32,
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
    let shared = Arc::new(Shared {
        out,
        work,
        cursor: AtomicUsize::new(0),
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
                        d.level,
                    )
                    .await?;
                match &*enc {
                    Encoded::Group { header, payload } => {
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
