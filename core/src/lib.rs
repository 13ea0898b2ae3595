//! seedcast-core: the pure, I/O-free heart of seedcast.
//!
//! Nothing in this crate touches a socket, a clock or a runtime; bytes are passed in and
//! values come out, so every part is tested without a network (the quinn-proto approach).
//!
//! Where to start:
//! - [`id`]: the names of things — [`ChunkId`] (BLAKE3 of a chunk's bytes) and [`GlobalId`].
//! - [`chunker`]: FastCDC v2020 cutting with zero runs split out as holes, buffer-in /
//!   piece-out ([`chunker::Chunker`]) plus a streaming adapter over `Read`.
//! - [`chunk`]: integrity in the types — bytes from the network are an [`UnverifiedChunk`];
//!   only [`UnverifiedChunk::verify`] makes a [`VerifiedChunk`] that stores accept.
//! - [`manifest`]: file recipes and versioned image manifests.
//! - [`edit`]: a write at an offset re-cuts only the chunks it touches.
//! - [`protocol`]: the wire protocol as a spec module (ALPN, limits, every message).
//! - [`delta`]: zstd deltas against a base chunk, and sketches that find a similar base.
//! - [`frame`] and [`codec`]: length-prefixed frames and the one place bincode is named.
//! - [`transfer`]: the agent-side transfer state machine (what to ask for, what is done).

pub mod chunk;
pub mod chunker;
pub mod codec;
pub mod delta;
pub mod edit;
pub mod frame;
pub mod id;
pub mod manifest;
pub mod protocol;
pub mod transfer;

#[cfg(test)]
mod testutil;

pub use chunk::{CompressedChunk, Encoding, HashMismatch, UnverifiedChunk, VerifiedChunk};
pub use chunker::{ChunkerConfig, Piece};
pub use id::{ChunkId, GlobalId};
pub use manifest::{Extent, FileEntry, FileRecipe, Manifest};
