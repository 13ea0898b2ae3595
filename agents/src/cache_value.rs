//! How a cached chunk is kept in the agent's `stored` family: encoding (one byte), raw
//! length (four, little-endian), then the payload as it travelled — zstd, or raw where zstd
//! did not pay. Decoding is bounded by the largest chunk, and a value that does not decode
//! is an error naming why, never a panic: the cache is the agent's disk, which can be
//! damaged or edited by hand.

use std::borrow::Cow;

use seedcast_core::chunk::{Encoding, unzstd};
use seedcast_core::{ChunkerConfig, CompressedChunk};
use seedcast_db::DBPinnableSlice;

/// Bytes before the payload in a `stored` value: encoding, then raw length (LE).
pub(crate) const STORED_HEADER: usize = 5;

/// A `stored` value: the chunk's encoding, raw length and payload.
pub(crate) fn stored_value(c: &CompressedChunk) -> Vec<u8> {
    let mut v = Vec::with_capacity(STORED_HEADER + c.payload.len());
    v.push(c.encoding as u8);
    v.extend_from_slice(&c.raw_len.to_le_bytes());
    v.extend_from_slice(&c.payload);
    v
}

/// A cached chunk's raw bytes: the stored value itself when it was kept raw, else decoded.
pub enum CachedChunk<'a> {
    Pinned(DBPinnableSlice<'a>, usize),
    Decoded(Vec<u8>),
}

impl std::fmt::Debug for CachedChunk<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CachedChunk({} bytes)", self.len())
    }
}

/// A cached chunk's value as a scan found it, decoded only when asked.
#[derive(Debug)]
pub struct ScannedChunk {
    /// A format-1 value: the raw bytes alone.
    pub(crate) legacy: bool,
    pub(crate) value: Box<[u8]>,
}

impl ScannedChunk {
    /// The chunk's raw bytes, or why its value does not decode.
    pub fn raw(&self) -> Result<Cow<'_, [u8]>, String> {
        if self.legacy {
            return Ok(self.value[..].into());
        }
        Ok(match decode_stored(&self.value)? {
            Raw::InPlace => self.value[STORED_HEADER..].into(),
            Raw::Decoded(d) => d.into(),
        })
    }
}

impl std::ops::Deref for CachedChunk<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            CachedChunk::Pinned(v, at) => &v[*at..],
            CachedChunk::Decoded(v) => v,
        }
    }
}

/// Where a `stored` value's raw bytes are.
enum Raw {
    /// Kept raw: the value after its header.
    InPlace,
    Decoded(Vec<u8>),
}

/// Decode a `stored` value; why not, for one that does not decode (damaged on disk in a
/// way RocksDB's checksums did not catch, or by hand). The declared length is bounded by
/// the largest chunk, so a bad value cannot make the agent allocate more.
fn decode_stored(v: &[u8]) -> Result<Raw, String> {
    match stored_header(v)? {
        (Encoding::Raw, ..) => Ok(Raw::InPlace),
        (Encoding::Zstd, raw_len, payload) => unzstd(payload, raw_len)
            .map(Raw::Decoded)
            .map_err(|e| e.to_string()),
    }
}

/// A `stored` value's encoding, raw length and payload, checked as far as they can be
/// without decoding.
pub(crate) fn stored_header(v: &[u8]) -> Result<(Encoding, u32, &[u8]), String> {
    let (head, payload) = v
        .split_at_checked(STORED_HEADER)
        .ok_or_else(|| format!("{} bytes, shorter than its header", v.len()))?;
    let raw_len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes"));
    if raw_len > ChunkerConfig::MAX_CHUNK {
        return Err(format!("declares {raw_len} bytes, over the largest chunk"));
    }
    match Encoding::from_u8(head[0]) {
        Some(Encoding::Raw) if payload.len() != raw_len as usize => {
            Err(format!("raw, {} bytes, declares {raw_len}", payload.len()))
        }
        Some(e) => Ok((e, raw_len, payload)),
        None => Err(format!("unknown encoding {}", head[0])),
    }
}

/// The raw bytes of a chunk value: a format-1 (`legacy`) one is nothing else.
pub(crate) fn decode_value(
    legacy: bool,
    v: DBPinnableSlice<'_>,
) -> Result<CachedChunk<'_>, String> {
    if legacy {
        return Ok(CachedChunk::Pinned(v, 0));
    }
    Ok(match decode_stored(&v)? {
        Raw::InPlace => CachedChunk::Pinned(v, STORED_HEADER),
        Raw::Decoded(d) => CachedChunk::Decoded(d),
    })
}
