//! The one place the binary encoding is named.
//!
//! bincode 2.0.1 (serde mode, standard config: little-endian varints) is pinned: bincode 3
//! is a placeholder and the project has ended upstream (RUSTSEC-2025-0141). Everything else
//! calls [`encode`] / [`decode`], so swapping in postcard or wincode touches only this file
//! (and bumps [`crate::protocol::PROTOCOL_VERSION`] and the persisted format versions).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest encoded value [`decode`] accepts (64 MiB). The wire protocol's frame maximum
/// ([`crate::protocol::MAX_MESSAGE_SIZE`]) is this bound: a manifest of a ~100 GiB image fits.
pub const MAX_ENCODED_LEN: usize = 64 * 1024 * 1024;

/// A value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encode failed: {0}")]
    Encode(String),
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("malformed message: {0} trailing bytes after the value")]
    Trailing(usize),
}

fn config() -> impl bincode::config::Config {
    // The limit bounds every length prefix inside a message, so a hostile one cannot make
    // the decoder allocate more than a whole message may hold.
    bincode::config::standard().with_limit::<MAX_ENCODED_LEN>()
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decode exactly one value that fills all of `bytes`.
///
/// bincode checks each length prefix against its limit before it allocates, counting a
/// container as its length times the in-memory size of its element (which exceeds the
/// encoded size: a `u32` of 1 byte is 4 in memory, an empty `String` 1 byte and 24). The
/// limit is a type parameter, so it is picked from tiers at 16× the message's size: a
/// hostile prefix makes the decoder allocate at most 16× what it was sent (a 16 KiB hello
/// cannot claim a 64 MiB buffer), while honest messages keep ample room.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    use bincode::config::standard;
    let (v, used) = match bytes.len() {
        n if n <= 16 << 10 => decode_with(bytes, standard().with_limit::<{ 256 << 10 }>()),
        n if n <= 256 << 10 => decode_with(bytes, standard().with_limit::<{ 4 << 20 }>()),
        n if n <= 1 << 20 => decode_with(bytes, standard().with_limit::<{ 16 << 20 }>()),
        _ => decode_with(bytes, config()),
    }?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(v)
}

fn decode_with<T: DeserializeOwned>(
    bytes: &[u8],
    cfg: impl bincode::config::Config,
) -> Result<(T, usize), CodecError> {
    bincode::serde::decode_from_slice(bytes, cfg).map_err(|e| CodecError::Decode(e.to_string()))
}

/// A persisted record was written by another format version or is damaged.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("empty record")]
    Empty,
    #[error("record format {found} is not supported (this build reads format {expected})")]
    Format { found: u8, expected: u8 },
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Encode a persisted record: one format byte, then the value. Every record on disk
/// carries its format, so a newer build can read or refuse an older one clearly.
pub fn encode_record<T: Serialize>(format: u8, value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![format];
    out.extend(encode(value)?);
    Ok(out)
}

/// Decode a record written by [`encode_record`] with the same `format`.
pub fn decode_record<T: DeserializeOwned>(format: u8, bytes: &[u8]) -> Result<T, RecordError> {
    let (&found, body) = bytes.split_first().ok_or(RecordError::Empty)?;
    if found != format {
        return Err(RecordError::Format {
            found,
            expected: format,
        });
    }
    Ok(decode(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_carry_their_format() {
        let r = encode_record(1, &(5u32, "x".to_string())).unwrap();
        assert_eq!(r[0], 1);
        let back: (u32, String) = decode_record(1, &r).unwrap();
        assert_eq!(back, (5, "x".into()));
        assert!(matches!(
            decode_record::<(u32, String)>(2, &r),
            Err(RecordError::Format {
                found: 1,
                expected: 2
            })
        ));
        assert!(matches!(
            decode_record::<(u32, String)>(1, &[]),
            Err(RecordError::Empty)
        ));
        // Truncated body.
        assert!(decode_record::<(u32, String)>(1, &r[..r.len() - 1]).is_err());
        // Trailing garbage.
        let mut long = r.clone();
        long.push(0);
        assert!(matches!(
            decode_record::<(u32, String)>(1, &long),
            Err(RecordError::Codec(CodecError::Trailing(1)))
        ));
    }

    #[test]
    fn a_length_prefix_cannot_claim_far_more_than_was_sent() {
        // A 10-byte message whose byte vector claims 20 MiB: refused by the limit, before
        // any buffer of that size is made.
        let mut m = vec![0xfc];
        m.extend_from_slice(&(20u32 << 20).to_le_bytes());
        m.extend_from_slice(&[1, 2, 3, 4, 5]);
        let limited = |e: CodecError| e.to_string().contains("LimitExceeded");
        // Strings are read into a buffer of the declared size: the limit refuses it first.
        assert!(limited(decode::<String>(&m).unwrap_err()));
        // Sequences are read element by element (serde preallocates at most 1 MiB), so
        // the claim only runs into the end of the message.
        let e = decode::<Vec<u8>>(&m).unwrap_err().to_string();
        assert!(e.contains("UnexpectedEnd"), "{e}");
        // The same string claim in a message that large is within its tier: only the
        // missing bytes are wrong.
        let mut big = m.clone();
        big.resize(5 << 20, 0);
        assert!(!limited(decode::<String>(&big).unwrap_err()));
        // Honest values of every size still decode, including those whose in-memory size
        // is well above their encoding (small integers, short strings, near each tier).
        for n in [
            100usize,
            4000,
            10_000,
            16 << 10,
            60 << 10,
            200_000,
            256 << 10,
            1 << 20,
        ] {
            let ints = vec![7u32; n];
            assert_eq!(decode::<Vec<u32>>(&encode(&ints).unwrap()).unwrap(), ints);
            let ids = vec![([3u8; 32], 5u32); n / 33];
            assert_eq!(
                decode::<Vec<([u8; 32], u32)>>(&encode(&ids).unwrap()).unwrap(),
                ids
            );
            let names = vec!["disk.raw".to_string(); n / 9];
            assert_eq!(
                decode::<Vec<String>>(&encode(&names).unwrap()).unwrap(),
                names
            );
        }
        for n in [0, 100, (16 << 10) - 8, 300 << 10, 5 << 20] {
            let v = vec![7u8; n];
            assert_eq!(decode::<Vec<u8>>(&encode(&v).unwrap()).unwrap(), v);
        }
    }
}
