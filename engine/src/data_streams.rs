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
/// How far (in seconds of the link) an adapting transfer encodes ahead of its link: more
/// than the second that raises the level, little enough that the level still matters.
const ADAPT_AHEAD_SECS: f64 = 2.0;
/// ... and before the link's rate is known (its first half second).
const ADAPT_AHEAD_FIRST: u64 = 512 << 10;

/// The level a transfer's first groups are encoded at.
pub(crate) fn start_level(d: &Deltas) -> i32 {
    if d.adapt {
        ADAPT_START.min(d.level)
    } else {
        d.level
    }
}

/// The delta level of one adapting transfer, moved by how much encoded data waits for the
/// link: the bytes written to the streams (and reserved by groups being encoded) and not
/// yet sent by the connection, in seconds of what the connection sent over the last second.
#[derive(Debug)]
struct Adaptive {
    start: std::time::Instant,
    tx0: u64,
    written: AtomicU64,
    /// [`GROUP_GUESS`] for each group being encoded: four streams starting at once would
    /// otherwise each see nothing queued.
    reserved: AtomicU64,
    control: parking_lot::Mutex<LevelControl>,
}

/// What a group being encoded is counted as until its size is known.
const GROUP_GUESS: u64 = 256 << 10;

impl Adaptive {
    fn new(conn: &Connection, max: i32) -> Self {
        Adaptive {
            start: std::time::Instant::now(),
            tx0: conn.stats().udp_tx.bytes,
            written: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            control: parking_lot::Mutex::new(LevelControl::new(max)),
        }
    }

    /// Look at the link now: the time, and the seconds queued for it (once its rate is
    /// known) and bytes ahead of it, each counting what is written, and what is written or
    /// being encoded. The level follows what is written: groups still being encoded (slowly,
    /// at a high level) are not yet waiting for the link, and counting them kept the level
    /// up while the link emptied.
    fn look(&self, conn: &Connection) -> Look {
        let t = self.start.elapsed().as_secs_f64();
        let sent = conn.stats().udp_tx.bytes.saturating_sub(self.tx0);
        let written = self.written.load(Ordering::Relaxed);
        let ahead = written + self.reserved.load(Ordering::Relaxed);
        let mut c = self.control.lock();
        c.observe(t, sent);
        Look {
            t,
            queued: c.queued(sent, written),
            queued_ahead: c.queued(sent, ahead),
            ahead: backlog(ahead, sent),
        }
    }

    /// Wait while more than [`ADAPT_AHEAD_SECS`] of encoded groups wait for the link (or,
    /// before its rate is known, [`ADAPT_AHEAD_FIRST`] bytes), then reserve room for one
    /// group and return the level to encode it at. A group encoded far ahead keeps the
    /// level it was encoded at: with an 8 MiB send window, half of a thin link's update
    /// was encoded at the starting level before the rate was known.
    async fn next_group(&self, conn: &Connection) -> i32 {
        loop {
            let l = self.look(conn);
            let waits = match l.queued_ahead {
                Some(q) => q > ADAPT_AHEAD_SECS,
                None => l.ahead > ADAPT_AHEAD_FIRST,
            };
            if !waits {
                self.reserved.fetch_add(GROUP_GUESS, Ordering::Relaxed);
                let mut c = self.control.lock();
                c.step(l.t, l.queued);
                return c.level;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// The group [`Adaptive::next_group`] reserved room for went as stored chunks.
    fn release(&self) {
        self.reserved.fetch_sub(GROUP_GUESS, Ordering::Relaxed);
    }

    /// The group reserved for is `n` payload bytes, about to be written: adjust the level
    /// for the next.
    fn wrote(&self, conn: &Connection, n: u64) {
        self.release();
        self.written.fetch_add(n, Ordering::Relaxed);
        let l = self.look(conn);
        self.control.lock().step(l.t, l.queued);
    }
}

/// What [`Adaptive::look`] saw.
struct Look {
    t: f64,
    queued: Option<f64>,
    queued_ahead: Option<f64>,
    ahead: u64,
}

/// Payload bytes written and not yet sent (QUIC and UDP/IP add ~5 % to the payload).
fn backlog(ahead: u64, sent: u64) -> u64 {
    ahead.saturating_sub(sent * 95 / 100)
}

/// The rate is measured over about this long (seconds) ...
const RATE_WINDOW: f64 = 1.0;
/// ... and known once this long is seen.
const RATE_KNOWN: f64 = 0.5;
/// The level moves at most once this often (seconds): the streams ask together.
const STEP_EVERY: f64 = 0.25;

/// The level decision of an adapting transfer, without the connection (unit-tested): the
/// link's rate over the last [`RATE_WINDOW`] (a rate since the start counts the slow start
/// and makes the queue look longer than it is), and a level that goes up by two while
/// more than a second of that rate waits and down by two while less than a quarter
/// second does.
#[derive(Debug)]
struct LevelControl {
    level: i32,
    max: i32,
    /// (seconds since the start, wire bytes sent); the oldest is about a window old.
    samples: std::collections::VecDeque<(f64, u64)>,
    last_step: f64,
}

impl LevelControl {
    fn new(max: i32) -> Self {
        LevelControl {
            level: ADAPT_START.min(max),
            max,
            samples: [(0.0, 0)].into(),
            last_step: f64::NEG_INFINITY,
        }
    }

    fn observe(&mut self, t: f64, sent: u64) {
        if self.samples.back().is_some_and(|(t0, _)| t - t0 < 0.05) {
            return;
        }
        self.samples.push_back((t, sent));
        while self.samples.len() > 2 && t - self.samples[1].0 >= RATE_WINDOW {
            self.samples.pop_front();
        }
    }

    /// Bytes a second over the window, once it spans [`RATE_KNOWN`].
    fn rate(&self) -> Option<f64> {
        let (t0, s0) = *self.samples.front()?;
        let (t1, s1) = *self.samples.back()?;
        (t1 - t0 >= RATE_KNOWN && s1 > s0).then(|| (s1 - s0) as f64 / (t1 - t0))
    }

    /// Seconds of the link's rate that `ahead` payload bytes written are ahead of `sent`.
    fn queued(&self, sent: u64, ahead: u64) -> Option<f64> {
        self.rate().map(|r| backlog(ahead, sent) as f64 / r)
    }

    /// Move the level by what is queued (at most once per [`STEP_EVERY`]).
    fn step(&mut self, t: f64, queued: Option<f64>) {
        let Some(q) = queued else { return };
        if t - self.last_step < STEP_EVERY {
            return;
        }
        let next = if q > 1.0 {
            (self.level + 2).min(self.max)
        } else if q < 0.25 {
            (self.level - 2).max(ADAPT_MIN.min(self.max))
        } else {
            self.level
        };
        if next != self.level {
            self.level = next;
            self.last_step = t;
            tracing::debug!(level = next, queued = q, "delta level adapted");
        }
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
                let level = match &sh.adaptive {
                    Some(a) => a.next_group(&out.conn).await,
                    None => d.level,
                };
                let enc = d
                    .cache
                    .group(
                        out.source.clone(),
                        d.index.clone(),
                        d.key,
                        chunks.clone(),
                        level,
                    )
                    .await?;
                if let Encoded::Group { payload, .. } = &*enc {
                    tracing::debug!(
                        level,
                        chunks = chunks.len(),
                        payload = payload.len(),
                        "group"
                    );
                }
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
                    Encoded::Stored(ids) => {
                        if let Some(a) = &sh.adaptive {
                            a.release();
                        }
                        ids.clone()
                    }
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
        let mut c = LevelControl::new(19);
        assert_eq!(c.level, ADAPT_START);
        // Too early to tell: no rate, no step.
        c.observe(0.3, 300_000);
        assert_eq!(c.queued(300_000, 4_000_000), None);
        c.step(0.3, None);
        assert_eq!(c.level, ADAPT_START);
        // 1 MB/s for 2 s, 2 MB ahead of it: up by two, once per step interval.
        for i in 1..=20u64 {
            c.observe(0.1 * i as f64, 100_000 * i);
        }
        let q = c.queued(2_000_000, 4_000_000).unwrap();
        assert!((q - 2.1).abs() < 0.1, "{q}");
        c.step(2.0, Some(q));
        c.step(2.1, Some(q));
        assert_eq!(c.level, ADAPT_START + 2, "one step per interval");
        c.step(2.3, Some(q));
        assert_eq!(c.level, ADAPT_START + 4);
        // The rate is the last second's: a slow start does not make the queue look long.
        let mut d = LevelControl::new(19);
        d.observe(1.0, 10_000);
        for i in 0..=10u64 {
            d.observe(2.0 + 0.1 * i as f64, 10_000 + 100_000 * i);
        }
        let r = d.rate().unwrap();
        assert!((r - 1_000_000.0).abs() < 50_000.0, "{r}");
        // Everything written is out: the link waits for the encoder → down, not below
        // the least.
        c.step(3.0, c.queued(2_000_000, 1_900_000));
        assert_eq!(c.level, ADAPT_START + 2);
        for t in 0..20 {
            c.step(4.0 + t as f64, Some(0.0));
        }
        assert_eq!(c.level, ADAPT_MIN);
        // Half a second queued: where it is; never past the most.
        c.step(30.0, Some(0.5));
        assert_eq!(c.level, ADAPT_MIN);
        for t in 0..20 {
            c.step(40.0 + t as f64, Some(3.0));
        }
        assert_eq!(c.level, 19);
        // A highest level below the least adaptive one is kept.
        let mut low = LevelControl::new(3);
        low.step(10.0, Some(0.0));
        assert_eq!(low.level, 3);
    }
}
