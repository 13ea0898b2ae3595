//! The engine's data streams, turned into verified chunks in the cache.
//!
//! Each stream names its transfer in its first frame; every record's header is checked
//! against the transfer ([`Transfer::admit`]) before a byte of its payload is read; the
//! payload is decoded (a stored chunk, or a delta group against base chunks the site holds),
//! verified against the chunk ids, and cached on a blocking thread. The transfer being
//! received lives in a [`Slot`] shared with the deployment waiting for it; the slot is the
//! one place a stream's transfer id is checked.

use parking_lot::Mutex;
use std::sync::Arc;

use bytes::Bytes;
use quinn::{Connection, RecvStream, VarInt};
use seedcast_core::delta::GroupDecoder;
use seedcast_core::protocol::{
    ChunkHeader, DataRecord, DataStreamHeader, GroupHeader, MAX_ERROR_TEXT, close, cut_text,
};
use seedcast_core::transfer::Transfer;
use seedcast_core::{ChunkId, CompressedChunk, UnverifiedChunk, VerifiedChunk};
use seedcast_net::{read_msg, read_msg_required, read_payload};
use tokio::sync::oneshot;
use tracing::debug;

use crate::assemble::Staging;
use crate::cache::AgentDb;
use crate::error::{AgentError, ReceiveError};
use crate::seeds::SeedIndex;

/// The transfer being received.
#[derive(Debug)]
pub(crate) struct Active {
    pub transfer: Transfer,
    /// Published images, for delta bases the cache does not hold.
    pub seeds: Arc<SeedIndex>,
    /// The image being built: each verified chunk is written into it as it arrives.
    pub staging: Option<Arc<Staging>>,
    /// Told once: every chunk is here (`Ok`), or why the transfer failed.
    done: Option<oneshot::Sender<Result<(), ReceiveError>>>,
}

impl Active {
    /// The transfer to receive, and the receiver its end is reported on.
    pub fn new(
        transfer: Transfer,
        seeds: Arc<SeedIndex>,
        staging: Option<Arc<Staging>>,
    ) -> (Self, oneshot::Receiver<Result<(), ReceiveError>>) {
        let (tx, rx) = oneshot::channel();
        let a = Active {
            transfer,
            seeds,
            staging,
            done: Some(tx),
        };
        (a, rx)
    }

    fn finish(&mut self, r: Result<(), ReceiveError>) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(r);
        }
    }
}

/// The one transfer this agent receives at a time, shared by the deployment and the
/// data-stream tasks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Slot(Arc<Mutex<Option<Active>>>);

impl Slot {
    pub fn begin(&self, a: Active) {
        *self.0.lock() = Some(a);
    }

    /// Run `f` on the active transfer if it is `transfer`: the one check of a stream's
    /// transfer id.
    fn with<R>(&self, transfer: u64, f: impl FnOnce(&mut Active) -> R) -> Option<R> {
        let mut g = self.0.lock();
        g.as_mut().filter(|a| a.transfer.id() == transfer).map(f)
    }

    /// Take the transfer out (it is complete, or abandoned).
    pub fn take(&self) -> Option<Active> {
        self.0.lock().take()
    }

    /// Chunks of `transfer` were verified and stored (`payload` bytes of the record counted
    /// with the first); the transfer is told it is done once every chunk is here. `None`
    /// when `transfer` is no longer the active one.
    fn complete(
        &self,
        transfer: u64,
        ids: impl IntoIterator<Item = ChunkId>,
        payload: u32,
    ) -> Option<()> {
        self.with(transfer, |a| {
            let mut all = false;
            for (i, id) in ids.into_iter().enumerate() {
                all = a
                    .transfer
                    .complete_chunk(&id, if i == 0 { payload } else { 0 });
            }
            if all {
                a.finish(Ok(()));
            }
        })
    }

    /// Fail `transfer`, if it is the active one.
    fn fail(&self, transfer: u64, why: ReceiveError) {
        self.with(transfer, |a| a.finish(Err(why)));
    }
}

/// Accept the engine's data streams for as long as the connection lives.
pub(crate) async fn accept_data_streams(
    conn: Connection,
    slot: Slot,
    db: Arc<AgentDb>,
    max_raw: u32,
) -> Result<(), AgentError> {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            s = conn.accept_uni() => {
                let recv = s?;
                let (slot, db) = (slot.clone(), db.clone());
                tasks.spawn(async move {
                    if let Err(e) = data_stream(recv, &slot, &db, max_raw).await {
                        debug!("data stream ended: {e}");
                    }
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// Receive one data stream: admit each record, read, verify and cache its payload.
async fn data_stream(
    mut recv: RecvStream,
    slot: &Slot,
    db: &Arc<AgentDb>,
    max_raw: u32,
) -> Result<(), AgentError> {
    let DataStreamHeader { transfer } = read_msg_required(&mut recv).await?;
    loop {
        let record: DataRecord = match read_msg(&mut recv).await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => {
                slot.fail(transfer, ReceiveError::Stream(e.to_string()));
                return Err(e.into());
            }
        };
        if let DataRecord::Abort { mut reason } = record {
            cut_text(&mut reason, MAX_ERROR_TEXT);
            slot.fail(transfer, ReceiveError::Aborted(reason));
            return Ok(());
        }
        // Check the header against what was asked for before reading the payload.
        let admitted = slot
            .with(transfer, |a| {
                match &record {
                    DataRecord::Chunk(h) => a.transfer.admit(h),
                    DataRecord::Group(g) => a.transfer.admit_group(g),
                    // Handled above; nothing to admit.
                    DataRecord::Abort { .. } => Ok(()),
                }
                .map(|()| (a.seeds.clone(), a.staging.clone()))
            })
            .unwrap_or(Err(seedcast_core::transfer::TransferError::NoTransfer(
                transfer,
            )));
        let (seeds, staging) = match admitted {
            Ok(s) => s,
            Err(e) => {
                let _ = recv.stop(VarInt::from_u32(close::PROTOCOL));
                let msg = e.to_string();
                slot.fail(transfer, e.into());
                return Err(ReceiveError::Stream(msg).into());
            }
        };
        let h = match record {
            DataRecord::Group(g) => {
                receive_group(&mut recv, slot, transfer, db, seeds, staging, g).await?;
                continue;
            }
            DataRecord::Chunk(h) => h,
            // Ended the stream above.
            DataRecord::Abort { .. } => return Ok(()),
        };
        let payload = read_payload(&mut recv, h.payload_len as usize).await?;
        let db2 = db.clone();
        let accepted = tokio::task::spawn_blocking(move || {
            accept(&db2, staging.as_deref(), &h, payload, max_raw)
        })
        .await?;
        let ended = match accepted {
            Ok(()) => slot.complete(transfer, [h.id], h.payload_len).map(Ok),
            Err(why) => slot.with(transfer, |a| {
                a.transfer.reject(&h.id);
                let msg = why.to_string();
                a.finish(Err(why));
                Err(msg)
            }),
        };
        match ended {
            // The transfer is over (or was never this one): nothing more to take.
            None => return Ok(()),
            Some(Ok(())) => {}
            Some(Err(msg)) => return Err(ReceiveError::Stream(msg).into()),
        }
    }
}

/// Append a base chunk's bytes to `base`: from the cache, else from a held image.
fn push_base(
    db: &AgentDb,
    seeds: &SeedIndex,
    id: &ChunkId,
    base: &mut Vec<u8>,
) -> Result<(), ReceiveError> {
    if let Some(b) = db.chunk(id)? {
        base.extend_from_slice(&b);
        return Ok(());
    }
    let v = seeds.read(id).ok_or(ReceiveError::BaseUnavailable(*id))?;
    base.extend_from_slice(v.raw());
    Ok(())
}

/// Verify and cache a stored chunk the engine sent, and write it into the image being
/// built. Blocking.
fn accept(
    db: &AgentDb,
    staging: Option<&Staging>,
    h: &ChunkHeader,
    payload: Bytes,
    max_raw: u32,
) -> Result<(), ReceiveError> {
    let v = UnverifiedChunk(CompressedChunk {
        id: h.id,
        raw_len: h.raw_len,
        encoding: h.encoding,
        payload,
    })
    .verify(max_raw)?;
    if let Some(s) = staging {
        s.write(&v)?;
    }
    db.put_received(std::slice::from_ref(&v), h.payload_len as u64)?;
    Ok(())
}

/// Payload bytes read from the stream at a time while a group is decoded.
const GROUP_PIECE: usize = 64 * 1024;
/// Pieces queued for the decoder (bounded: a slow disk slows the stream, not memory).
const GROUP_QUEUE: usize = 8;

/// Receive a delta group, decoding it while it arrives: each chunk is verified, written into
/// the image and cached as soon as its last byte is decoded, so a stream cut mid-group (a
/// link that drops for longer than QUIC waits) keeps every chunk before the cut, and only
/// the rest travels again. Decoding runs on a blocking thread, fed through a bounded queue.
async fn receive_group(
    recv: &mut RecvStream,
    slot: &Slot,
    transfer: u64,
    db: &Arc<AgentDb>,
    seeds: Arc<SeedIndex>,
    staging: Option<Arc<Staging>>,
    g: GroupHeader,
) -> Result<(), AgentError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(GROUP_QUEUE);
    let ids: Vec<ChunkId> = g.chunks.iter().map(|(id, _)| *id).collect();
    let mut left = g.payload_len as usize;
    let (db2, slot2) = (db.clone(), slot.clone());
    let worker = tokio::task::spawn_blocking(move || {
        let mut done = 0;
        let r = decode_group_stream(
            &db2,
            &seeds,
            staging.as_deref(),
            &g,
            rx,
            |verified, payload| {
                done += verified.len();
                slot2.complete(transfer, verified.iter().map(VerifiedChunk::id), payload);
            },
        );
        (done, r)
    });
    let mut cut = None;
    while left > 0 {
        match recv.read_chunk(left.min(GROUP_PIECE), true).await {
            Ok(Some(c)) => {
                left -= c.bytes.len();
                if tx.send(c.bytes).await.is_err() {
                    // The decoder stopped: the group is bad (its answer says why).
                    break;
                }
            }
            Ok(None) => {
                cut = Some(
                    ReceiveError::Stream(format!(
                        "stream ended {left} bytes before its delta group's end"
                    ))
                    .into(),
                );
                break;
            }
            Err(e) => {
                cut = Some(seedcast_net::FramedError::from(e).into());
                break;
            }
        }
    }
    drop(tx);
    let (done, decoded) = worker.await?;
    let rest = &ids[done.min(ids.len())..];
    match (cut, decoded) {
        (None, Ok(())) => Ok(()),
        // The stream was cut: the chunks before the cut are kept; the connection's end
        // decides the transfer's fate, as for any record cut short.
        (Some(e), _) => {
            slot.with(transfer, |a| {
                rest.iter().for_each(|id| a.transfer.reject(id))
            });
            Err(e)
        }
        (None, Err(why)) => {
            let _ = recv.stop(VarInt::from_u32(close::PROTOCOL));
            let msg = why.to_string();
            slot.with(transfer, |a| {
                rest.iter().for_each(|id| a.transfer.reject(id));
                a.finish(Err(why));
            });
            Err(ReceiveError::Stream(msg).into())
        }
    }
}

/// The bases of a delta group, concatenated in order (bounded).
fn group_base(db: &AgentDb, seeds: &SeedIndex, g: &GroupHeader) -> Result<Vec<u8>, ReceiveError> {
    let mut base = Vec::new();
    for id in &g.base {
        push_base(db, seeds, id, &mut base)?;
        if base.len() > GroupHeader::MAX_BASE_BYTES {
            return Err(ReceiveError::BasesTooLarge {
                max: GroupHeader::MAX_BASE_BYTES,
            });
        }
    }
    Ok(base)
}

/// Decode a group's payload pieces as they come (blocking): each batch of chunks a piece
/// completes is verified against its ids, written into the image being built, cached, and
/// handed to `stored` with the payload bytes it took. A chunk that does not match its id
/// ends the group with an error; the chunks before it stay stored (each was verified).
fn decode_group_stream(
    db: &AgentDb,
    seeds: &SeedIndex,
    staging: Option<&Staging>,
    g: &GroupHeader,
    mut pieces: tokio::sync::mpsc::Receiver<Bytes>,
    mut stored: impl FnMut(&[VerifiedChunk], u32),
) -> Result<(), ReceiveError> {
    let base = group_base(db, seeds, g)?;
    let lens: Vec<u32> = g.chunks.iter().map(|(_, l)| *l).collect();
    let mut dec = GroupDecoder::new(&base, lens, g.payload_len as usize)?;
    let mut payload = 0u32;
    while let Some(piece) = pieces.blocking_recv() {
        payload += piece.len() as u32;
        let first = dec.chunks_done();
        let raws = dec.feed(&piece)?;
        if raws.is_empty() {
            continue;
        }
        let verified = g.chunks[first..first + raws.len()]
            .iter()
            .zip(raws)
            .map(|((id, _), raw)| VerifiedChunk::check(*id, raw))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(s) = staging {
            verified.iter().try_for_each(|v| s.write(v))?;
        }
        db.put_received(&verified, payload as u64)?;
        stored(&verified, std::mem::take(&mut payload));
    }
    dec.finish()?;
    Ok(())
}
