//! Length-prefixed frames: a 4-byte big-endian length, then that many bytes of one encoded
//! message. `check` and `parse` are pure (as mini-redis' `Frame::check` / `parse`), so the
//! async readers in `seedcast-net` and the tests share them.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{self, CodecError};

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("truncated frame: stream ended after {have} of {need} bytes")]
    Truncated { have: usize, need: usize },
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Read a length prefix, refusing anything above `max`.
pub fn decode_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Is there a whole frame at the front of `buf`? `Ok(Some(n))`: the first `n` bytes are one.
pub fn check(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = decode_len(buf[..HEADER_LEN].try_into().expect("4 bytes"), max)?;
    let total = HEADER_LEN + len;
    Ok((buf.len() >= total).then_some(total))
}

/// Decode the frame at the front of `buf`, if whole; returns the message and bytes used.
pub fn parse<T: DeserializeOwned>(
    buf: &[u8],
    max: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    match check(buf, max)? {
        None => Ok(None),
        Some(total) => Ok(Some((codec::decode(&buf[HEADER_LEN..total])?, total))),
    }
}

/// Encode `msg` as one frame (prefix included), refusing messages above `max`.
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let body = codec::encode(msg)?;
    if body.len() > max {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn oversized_and_partial_frames() {
        let f = encode(&"hello".to_string(), 100).unwrap();
        assert_eq!(check(&f[..3], 100).unwrap(), None);
        assert_eq!(check(&f[..f.len() - 1], 100).unwrap(), None);
        assert_eq!(check(&f, 100).unwrap(), Some(f.len()));
        let big = [0xff, 0xff, 0xff, 0xff];
        assert!(matches!(check(&big, 100), Err(FrameError::TooLarge { .. })));
        assert!(encode(&vec![0u8; 200], 100).is_err());
    }

    proptest! {
        #[test]
        fn round_trips(s in ".*", v in proptest::collection::vec(any::<u64>(), 0..50)) {
            let f = encode(&(s.clone(), v.clone()), 1 << 20).unwrap();
            let (back, used): ((String, Vec<u64>), usize) = parse(&f, 1 << 20).unwrap().unwrap();
            prop_assert_eq!(used, f.len());
            prop_assert_eq!(back, (s, v));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse::<crate::protocol::Request>(&bytes, 1 << 16);
            let _ = parse::<crate::protocol::Response>(&bytes, 1 << 16);
            let _ = parse::<crate::protocol::Hello>(&bytes, 1 << 16);
            let _ = parse::<crate::protocol::AgentMsg>(&bytes, 1 << 16);
            let _ = parse::<crate::protocol::EngineMsg>(&bytes, 1 << 16);
            let _ = parse::<crate::protocol::ChunkHeader>(&bytes, 1 << 16);
            let _ = parse::<crate::protocol::DataRecord>(&bytes, 1 << 16);
        }
    }
}
