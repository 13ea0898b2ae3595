//! Identifiers: content ids for chunks, engine-assigned ids for images.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A chunk's name: the BLAKE3 hash of its uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Hash `data` and name it.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Short form: enough to tell chunks apart in logs.
        write!(f, "ChunkId({})", &self.to_hex()[..12])
    }
}

/// Error for an identifier that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind} {text:?}: {why}")]
pub struct ParseIdError {
    kind: &'static str,
    text: String,
    why: &'static str,
}

impl FromStr for ChunkId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| ParseIdError {
            kind: "chunk id",
            text: s.to_string(),
            why,
        };
        let bytes = hex::decode(s).map_err(|_| err("not hex"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| err("expected 64 hex digits"))?;
        Ok(ChunkId(arr))
    }
}

/// The one identity of an image across every site and every version.
///
/// Assigned by the engine at the first push; printed as `sc-` and 24 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GlobalId(pub [u8; 12]);

impl GlobalId {
    pub const PREFIX: &'static str = "sc-";

    pub fn from_bytes(b: [u8; 12]) -> Self {
        GlobalId(b)
    }

    pub fn as_bytes(&self) -> &[u8; 12] {
        &self.0
    }
}

impl fmt::Display for GlobalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, hex::encode(self.0))
    }
}

impl fmt::Debug for GlobalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GlobalId({self})")
    }
}

impl FromStr for GlobalId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| ParseIdError {
            kind: "global id",
            text: s.to_string(),
            why,
        };
        let rest = s
            .strip_prefix(Self::PREFIX)
            .ok_or_else(|| err("expected it to start with \"sc-\""))?;
        let bytes = hex::decode(rest).map_err(|_| err("not hex after \"sc-\""))?;
        let arr: [u8; 12] = bytes
            .try_into()
            .map_err(|_| err("expected 24 hex digits after \"sc-\""))?;
        Ok(GlobalId(arr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_id_round_trips_and_rejects_garbage() {
        let g = GlobalId([7; 12]);
        let s = g.to_string();
        assert_eq!(s, "sc-070707070707070707070707");
        assert_eq!(s.parse::<GlobalId>().unwrap(), g);
        for bad in ["", "sc-", "sc-zz", "xx-070707070707070707070707", "sc-0707"] {
            let e = bad.parse::<GlobalId>().unwrap_err();
            assert!(e.to_string().contains("invalid global id"), "{e}");
        }
    }

    #[test]
    fn chunk_id_is_blake3() {
        let id = ChunkId::of(b"abc");
        assert_eq!(
            id.to_hex(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        assert_eq!(id.to_hex().parse::<ChunkId>().unwrap(), id);
    }
}
