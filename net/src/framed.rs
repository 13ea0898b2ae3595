//! Framed messages over quinn streams; the frame rules live in [`seedcast_core::frame`].

use bytes::Bytes;
use quinn::{ReadExactError, RecvStream, SendStream};
use seedcast_core::frame::{self, FrameError, HEADER_LEN};
use seedcast_core::{codec, protocol::MAX_MESSAGE_SIZE};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum FramedError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("peer ended the stream where a message was expected")]
    UnexpectedEnd,
}

impl FramedError {
    /// Did the peer break the framing rules (as opposed to the connection failing)?
    pub fn is_protocol_violation(&self) -> bool {
        matches!(self, FramedError::Frame(_) | FramedError::UnexpectedEnd)
    }
}

/// Write one message as one frame.
pub async fn write_msg<T: Serialize>(send: &mut SendStream, msg: &T) -> Result<(), FramedError> {
    let buf = frame::encode(msg, MAX_MESSAGE_SIZE)?;
    send.write_all(&buf).await?;
    Ok(())
}

/// Read one message; `Ok(None)` when the peer finished the stream at a frame boundary.
pub async fn read_msg<T: DeserializeOwned>(
    recv: &mut RecvStream,
) -> Result<Option<T>, FramedError> {
    read_msg_limited(recv, MAX_MESSAGE_SIZE).await
}

/// As [`read_msg`], refusing a frame longer than `max` before allocating for it (for
/// messages that are small by nature, such as a hello from a peer not yet authenticated).
pub async fn read_msg_limited<T: DeserializeOwned>(
    recv: &mut RecvStream,
    max: usize,
) -> Result<Option<T>, FramedError> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(ReadExactError::FinishedEarly(n)) => {
            return Err(FrameError::Truncated {
                have: n,
                need: HEADER_LEN,
            }
            .into());
        }
        Err(ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = frame::decode_len(header, max.min(MAX_MESSAGE_SIZE))?;
    let body = read_exact_vec(recv, len).await?;
    Ok(Some(codec::decode(&body).map_err(FrameError::from)?))
}

/// Read one message that must be there.
pub async fn read_msg_required<T: DeserializeOwned>(
    recv: &mut RecvStream,
) -> Result<T, FramedError> {
    read_msg(recv).await?.ok_or(FramedError::UnexpectedEnd)
}

/// Read exactly `len` raw bytes (a chunk payload after its header).
pub async fn read_payload(recv: &mut RecvStream, len: usize) -> Result<Bytes, FramedError> {
    Ok(Bytes::from(read_exact_vec(recv, len).await?))
}

async fn read_exact_vec(recv: &mut RecvStream, len: usize) -> Result<Vec<u8>, FramedError> {
    let mut body = vec![0u8; len];
    match recv.read_exact(&mut body).await {
        Ok(()) => Ok(body),
        Err(ReadExactError::FinishedEarly(n)) => Err(FrameError::Truncated {
            have: HEADER_LEN + n,
            need: HEADER_LEN + len,
        }
        .into()),
        Err(ReadExactError::ReadError(e)) => Err(e.into()),
    }
}
