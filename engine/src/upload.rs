//! Chunks a client uploads: which ones the engine lacks, and a batch received, verified
//! (decoded and hashed, on a blocking thread) and stored. A batch with any bad chunk is
//! refused whole; bytes uploaded are counted per connection until the commit that uses them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use quinn::RecvStream;
use seedcast_core::delta::decode_group;
use seedcast_core::protocol::{
    ChunkHeader, DataRecord, GroupHeader, MAX_IDS_PER_REQUEST, MAX_UPLOAD_BASE_BYTES,
    MAX_UPLOAD_BATCH, MAX_UPLOAD_BATCH_BYTES, MAX_UPLOAD_RAW_BYTES,
};
pub(crate) use seedcast_core::source::Inserted;
use seedcast_core::source::{ChunkSource, ChunkStore};
use seedcast_core::{ChunkId, CompressedChunk, UnverifiedChunk, VerifiedChunk};
use seedcast_net::{FramedError, read_msg_required, read_payload};

use crate::EngineError;
use crate::error::UploadRefused;
use crate::state::Shared;

/// An upload that failed: the stream broke the framing (the connection is closed), or the
/// engine refused the batch (the client is told why).
#[derive(Debug)]
pub(crate) enum UploadError {
    Framing(FramedError),
    Engine(EngineError),
}

impl From<FramedError> for UploadError {
    fn from(e: FramedError) -> Self {
        UploadError::Framing(e)
    }
}

impl From<UploadRefused> for UploadError {
    fn from(e: UploadRefused) -> Self {
        UploadError::Engine(e.into())
    }
}

/// Which of `ids` the engine lacks, in the order asked.
pub(crate) fn missing(shared: &Shared, ids: &[ChunkId]) -> Result<Vec<ChunkId>, EngineError> {
    if ids.len() > MAX_IDS_PER_REQUEST {
        return Err(EngineError::TooManyIds {
            count: ids.len(),
            max: MAX_IDS_PER_REQUEST,
        });
    }
    Ok(shared.store.missing(ids))
}

/// Read `count` chunk records, verify them on a blocking thread, store the new ones.
pub(crate) async fn receive(
    shared: &Arc<Shared>,
    recv: &mut RecvStream,
    count: u32,
) -> Result<Inserted, UploadError> {
    check_count(count)?;
    let bounds = Bounds::of(shared);
    let mut chunks = Vec::with_capacity((count as usize).min(1024));
    let mut held = 0u64;
    for _ in 0..count {
        let h: ChunkHeader = read_msg_required(recv).await?;
        bounds.check(&h)?;
        hold(&mut held, h.payload_len)?;
        let payload = read_payload(recv, h.payload_len as usize).await?;
        chunks.push(unverified(&h, payload));
    }
    let store = shared.store.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let verified = chunks
            .into_iter()
            .map(|c| c.verify(bounds.max_raw))
            .collect::<Result<Vec<_>, _>>()
            .map_err(UploadRefused::from)?;
        Ok::<_, EngineError>(store.insert(&verified)?)
    })
    .await;
    match stored {
        Ok(r) => r.map_err(UploadError::Engine),
        Err(e) => Err(UploadError::Engine(e.into())),
    }
}

/// A batch's record count within the protocol's limit.
fn check_count(count: u32) -> Result<(), UploadRefused> {
    if count > MAX_UPLOAD_BATCH {
        return Err(UploadRefused::TooMany {
            count,
            max: MAX_UPLOAD_BATCH,
        });
    }
    Ok(())
}

/// Add a record's payload to what the batch holds unverified, within the limit.
fn hold(held: &mut u64, payload_len: u32) -> Result<(), UploadRefused> {
    *held += payload_len as u64;
    if *held > MAX_UPLOAD_BATCH_BYTES {
        return Err(UploadRefused::BatchTooLarge {
            max: MAX_UPLOAD_BATCH_BYTES,
        });
    }
    Ok(())
}

/// What one uploaded chunk may be. What is held unverified is bounded by the engine's own
/// chunk size, not the protocol's: a chunk's stored form is its raw bytes or zstd's worst
/// case of them.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    max_raw: u32,
    max_payload: u32,
}

impl Bounds {
    fn of(shared: &Shared) -> Self {
        let max_raw = shared.cfg.chunking.max;
        Bounds {
            max_raw,
            max_payload: payload_bound(max_raw).min(ChunkHeader::MAX_PAYLOAD),
        }
    }

    fn check(&self, h: &ChunkHeader) -> Result<(), UploadRefused> {
        if h.payload_len > self.max_payload || h.raw_len > self.max_raw {
            return Err(UploadRefused::PayloadTooLarge {
                id: h.id,
                len: h.payload_len.max(h.raw_len),
                max: self.max_payload,
                max_raw: self.max_raw,
            });
        }
        Ok(())
    }
}

fn unverified(h: &ChunkHeader, payload: bytes::Bytes) -> UnverifiedChunk {
    UnverifiedChunk(CompressedChunk {
        id: h.id,
        raw_len: h.raw_len,
        encoding: h.encoding,
        payload,
    })
}

/// zstd level of chunks decoded from uploaded delta groups, as they are stored: the level
/// clients compress plain uploads at.
const STORE_LEVEL: i32 = 3;

/// A record's header, checked, before its payload is read.
enum Pending {
    Chunk(ChunkHeader),
    Group(GroupHeader),
}

/// A record of an `UploadRecords` batch, read but not yet verified.
enum Record {
    Chunk(UnverifiedChunk),
    Group(GroupHeader, bytes::Bytes),
}

/// Read `count` chunk or delta-group records, then on a blocking thread decode every group
/// against its bases (chunks this engine holds, read verified), verify every chunk against
/// its id, and store the new ones. Everything a record makes the engine hold, decode or read
/// is checked against the limits before its payload is read. Returns what was stored and
/// the payload bytes the client sent.
pub(crate) async fn receive_records(
    shared: &Arc<Shared>,
    recv: &mut RecvStream,
    count: u32,
) -> Result<(Inserted, u64), UploadError> {
    check_count(count)?;
    let bounds = Bounds::of(shared);
    let max_raw = bounds.max_raw;
    let mut records = Vec::with_capacity((count as usize).min(1024));
    let (mut held, mut chunks, mut raw, mut base) = (0u64, 0u64, 0u64, 0u64);
    for _ in 0..count {
        let record = match read_msg_required::<DataRecord>(recv).await? {
            DataRecord::Chunk(h) => {
                bounds.check(&h)?;
                chunks += 1;
                Pending::Chunk(h)
            }
            DataRecord::Group(g) => {
                base += check_group(&*shared.store, &g, max_raw)?;
                raw += g.raw_len();
                chunks += g.chunks.len() as u64;
                Pending::Group(g)
            }
            DataRecord::Abort { .. } => return Err(UploadRefused::AbortRecord.into()),
        };
        let len = match &record {
            Pending::Chunk(h) => h.payload_len,
            Pending::Group(g) => g.payload_len,
        };
        hold(&mut held, len)?;
        if chunks > MAX_UPLOAD_BATCH as u64 {
            return Err(UploadRefused::TooMany {
                count: chunks.min(u32::MAX as u64) as u32,
                max: MAX_UPLOAD_BATCH,
            }
            .into());
        }
        for (what, n, max) in [
            ("decode to", raw, MAX_UPLOAD_RAW_BYTES),
            ("name bases of", base, MAX_UPLOAD_BASE_BYTES),
        ] {
            if n > max {
                return Err(UploadRefused::GroupsTooLarge { what, max }.into());
            }
        }
        let payload = read_payload(recv, len as usize).await?;
        records.push(match record {
            Pending::Chunk(h) => Record::Chunk(unverified(&h, payload)),
            Pending::Group(g) => Record::Group(g, payload),
        });
    }
    let store = shared.store.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let mut verified = Vec::new();
        for r in records {
            match r {
                Record::Chunk(c) => verified.push(c.verify(max_raw).map_err(UploadRefused::from)?),
                Record::Group(g, payload) => {
                    verified.extend(decode_verified(&*store, &g, &payload)?);
                }
            }
        }
        Ok::<_, EngineError>(store.insert(&verified)?)
    })
    .await;
    match stored {
        Ok(r) => r.map(|i| (i, held)).map_err(UploadError::Engine),
        Err(e) => Err(UploadError::Engine(e.into())),
    }
}

/// Check a group's header before its payload is read: its shape within the protocol's
/// bounds, every chunk within the engine's chunk size, every base held here. Returns the
/// bytes of its bases.
fn check_group(
    store: &dyn ChunkSource,
    g: &GroupHeader,
    max_raw: u32,
) -> Result<u64, UploadRefused> {
    let bad = |why: String| UploadRefused::BadGroup(why);
    if g.chunks.is_empty() {
        return Err(bad("no chunks".into()));
    }
    if g.raw_len() > GroupHeader::MAX_RAW {
        return Err(bad(format!(
            "decodes to {} bytes, more than {}",
            g.raw_len(),
            GroupHeader::MAX_RAW
        )));
    }
    if g.payload_len > GroupHeader::MAX_PAYLOAD {
        return Err(bad(format!(
            "payload of {} bytes, more than {}",
            g.payload_len,
            GroupHeader::MAX_PAYLOAD
        )));
    }
    if g.base.len() > GroupHeader::MAX_BASE {
        return Err(bad(format!(
            "{} base chunks, more than {}",
            g.base.len(),
            GroupHeader::MAX_BASE
        )));
    }
    if let Some((id, len)) = g.chunks.iter().find(|(_, l)| *l == 0 || *l > max_raw) {
        return Err(bad(format!(
            "chunk {id} of {len} bytes (the engine's chunks are 1 to {max_raw} bytes)"
        )));
    }
    let mut base = 0u64;
    for id in &g.base {
        let info = store.info(id).ok_or(UploadRefused::UnknownBase(*id))?;
        base += info.raw_len as u64;
    }
    if base > GroupHeader::MAX_BASE_BYTES as u64 {
        return Err(bad(format!(
            "its bases add up to {base} bytes, more than {}",
            GroupHeader::MAX_BASE_BYTES
        )));
    }
    Ok(base)
}

/// Decode one group against its bases and verify every chunk it yields, each compressed
/// for the store as a plain upload would have been.
fn decode_verified(
    store: &dyn ChunkSource,
    g: &GroupHeader,
    payload: &[u8],
) -> Result<Vec<VerifiedChunk>, EngineError> {
    let mut prefix = Vec::new();
    for id in &g.base {
        prefix.extend_from_slice(store.read_verified(id)?.raw());
    }
    let lens: Vec<u32> = g.chunks.iter().map(|(_, l)| *l).collect();
    let parts = decode_group(&prefix, payload, &lens).map_err(UploadRefused::from)?;
    g.chunks
        .iter()
        .zip(parts)
        .map(|((id, _), raw)| {
            let v = VerifiedChunk::compress(raw, STORE_LEVEL);
            if v.id() == *id {
                Ok(v)
            } else {
                Err(
                    UploadRefused::Verify(seedcast_core::chunk::VerifyError::HashMismatch(
                        seedcast_core::chunk::HashMismatch {
                            expected: *id,
                            actual: v.id(),
                        },
                    ))
                    .into(),
                )
            }
        })
        .collect()
}

/// The largest stored form of a chunk of `max_raw` bytes: zstd's worst case.
fn payload_bound(max_raw: u32) -> u32 {
    u32::try_from(zstd::zstd_safe::compress_bound(max_raw as usize)).unwrap_or(u32::MAX)
}

/// Chunk bytes a client connection uploaded since its last commit: the next commit (push,
/// adaptation block) reports them as its upload; a failed commit gives them back.
#[derive(Debug, Default)]
pub(crate) struct Uploaded(AtomicU64);

impl Uploaded {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn take(&self) -> u64 {
        self.0.swap(0, Ordering::Relaxed)
    }

    pub fn give_back(&self, n: u64) {
        self.add(n);
    }
}
