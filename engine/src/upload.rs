//! Chunks a client uploads: which ones the engine lacks, and a batch received, verified
//! (decoded and hashed, on a blocking thread) and stored. A batch with any bad chunk is
//! refused whole; bytes uploaded are counted per connection until the commit that uses them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use quinn::RecvStream;
use seedcast_core::protocol::{
    ChunkHeader, MAX_IDS_PER_REQUEST, MAX_UPLOAD_BATCH, MAX_UPLOAD_BATCH_BYTES,
};
use seedcast_core::source::{ChunkStore, Inserted};
use seedcast_core::{ChunkId, CompressedChunk, UnverifiedChunk};
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
    if count > MAX_UPLOAD_BATCH {
        return Err(UploadRefused::TooMany {
            count,
            max: MAX_UPLOAD_BATCH,
        }
        .into());
    }
    // What is held unverified is bounded by the engine's own chunk size, not the
    // protocol's: a chunk's stored form is its raw bytes or zstd's worst case of them.
    let max_raw = shared.cfg.chunking.max;
    let max_payload = payload_bound(max_raw).min(ChunkHeader::MAX_PAYLOAD);
    let mut chunks = Vec::with_capacity((count as usize).min(1024));
    let mut held = 0u64;
    for _ in 0..count {
        let h: ChunkHeader = read_msg_required(recv).await?;
        if h.payload_len > max_payload || h.raw_len > max_raw {
            return Err(UploadRefused::PayloadTooLarge {
                id: h.id,
                len: h.payload_len.max(h.raw_len),
                max: max_payload,
                max_raw,
            }
            .into());
        }
        held += h.payload_len as u64;
        if held > MAX_UPLOAD_BATCH_BYTES {
            return Err(UploadRefused::BatchTooLarge {
                max: MAX_UPLOAD_BATCH_BYTES,
            }
            .into());
        }
        let payload = read_payload(recv, h.payload_len as usize).await?;
        chunks.push(UnverifiedChunk(CompressedChunk {
            id: h.id,
            raw_len: h.raw_len,
            encoding: h.encoding,
            payload,
        }));
    }
    let store = shared.store.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let verified = chunks
            .into_iter()
            .map(|c| c.verify(max_raw))
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
