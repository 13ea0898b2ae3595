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
use seedcast_core::delta::decode_group;
use seedcast_core::protocol::{
    DataRecord, DataStreamHeader, GroupHeader, MAX_ERROR_TEXT, close, cut_text,
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

/// The payload length a record announces.
fn payload_len(record: &DataRecord) -> u32 {
    match record {
        DataRecord::Chunk(h) => h.payload_len,
        DataRecord::Group(g) => g.payload_len,
        DataRecord::Abort { .. } => 0,
    }
}

/// The chunks a record carries.
fn record_chunks(record: &DataRecord) -> Vec<ChunkId> {
    match record {
        DataRecord::Chunk(h) => vec![h.id],
        DataRecord::Group(g) => g.chunks.iter().map(|(id, _)| *id).collect(),
        DataRecord::Abort { .. } => vec![],
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
        let len = payload_len(&record);
        let payload = read_payload(&mut recv, len as usize).await?;
        let (db2, rec2) = (db.clone(), record.clone());
        let accepted = tokio::task::spawn_blocking(move || {
            accept(&db2, &seeds, staging.as_deref(), &rec2, payload, max_raw)
        })
        .await?;
        let ended = slot.with(transfer, |a| match accepted {
            Ok(()) => {
                let mut done = false;
                for (i, id) in record_chunks(&record).iter().enumerate() {
                    // The payload counts once, with the record's first chunk.
                    done = a.transfer.complete_chunk(id, if i == 0 { len } else { 0 });
                }
                if done {
                    a.finish(Ok(()));
                }
                Ok(())
            }
            Err(why) => {
                record_chunks(&record)
                    .iter()
                    .for_each(|id| a.transfer.reject(id));
                let msg = why.to_string();
                a.finish(Err(why));
                Err(msg)
            }
        });
        match ended {
            // The transfer is over (or was never this one): nothing more to take.
            None => return Ok(()),
            Some(Ok(())) => {}
            Some(Err(msg)) => return Err(ReceiveError::Stream(msg).into()),
        }
    }
}

/// A base chunk's bytes: from the cache, else from a held image.
fn base_bytes(db: &AgentDb, seeds: &SeedIndex, id: &ChunkId) -> Result<Bytes, ReceiveError> {
    if let Some(b) = db.chunk(id)? {
        return Ok(Bytes::copy_from_slice(&b));
    }
    seeds
        .read(id)
        .map(|v| v.raw().clone())
        .ok_or(ReceiveError::BaseUnavailable(*id))
}

/// Verify and cache what a data record carried, and write it into the image being built.
/// Blocking.
fn accept(
    db: &AgentDb,
    seeds: &SeedIndex,
    staging: Option<&Staging>,
    record: &DataRecord,
    payload: Bytes,
    max_raw: u32,
) -> Result<(), ReceiveError> {
    match record {
        DataRecord::Chunk(h) => {
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
        }
        DataRecord::Group(g) => {
            let verified = decode_verified(db, seeds, g, &payload)?;
            if let Some(s) = staging {
                verified.iter().try_for_each(|v| s.write(v))?;
            }
            db.put_received(&verified, g.payload_len as u64)?;
        }
        DataRecord::Abort { .. } => {}
    }
    Ok(())
}

/// Decode a delta group against its bases (bounded) and check every chunk it yields.
fn decode_verified(
    db: &AgentDb,
    seeds: &SeedIndex,
    g: &GroupHeader,
    payload: &[u8],
) -> Result<Vec<VerifiedChunk>, ReceiveError> {
    let mut base = Vec::new();
    for id in &g.base {
        base.extend_from_slice(&base_bytes(db, seeds, id)?);
        if base.len() > GroupHeader::MAX_BASE_BYTES {
            return Err(ReceiveError::BasesTooLarge {
                max: GroupHeader::MAX_BASE_BYTES,
            });
        }
    }
    let lens: Vec<u32> = g.chunks.iter().map(|(_, l)| *l).collect();
    let parts = decode_group(&base, payload, &lens)?;
    Ok(g.chunks
        .iter()
        .zip(parts)
        .map(|((id, _), raw)| VerifiedChunk::check(*id, raw))
        .collect::<Result<Vec<_>, _>>()?)
}
