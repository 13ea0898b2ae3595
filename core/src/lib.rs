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
//! - [`delta`]: zstd deltas against a base chunk, and sketches that find a similar base;
//!   [`bases`]: which base chunks a new chunk resembles, and a group encoded against them.
//! - [`frame`] and [`codec`]: length-prefixed frames and the one place bincode is named.
//! - [`transfer`]: the agent's side of a transfer as a state machine (what to ask for, what
//!   is done); [`sender`]: the engine's side (what a site gets, in which order, how it ends).
//! - [`source`]: where chunks are kept, as a trait (the engine's pack store today; an object
//!   store or a relay's cache next), with an in-memory one for tests.
//! - [`check`]: the report `seedcast check` makes of an engine's or an agent's data.
//! - [`units`]: byte counts for people; [`rate`]: link rates and the token bucket.

pub mod bases;
pub mod check;
pub mod chunk;
pub mod chunker;
pub mod codec;
pub mod delta;
pub mod edit;
pub mod frame;
pub mod id;
pub mod manifest;
pub mod protocol;
pub mod rate;
pub mod sender;
pub mod source;
pub mod transfer;
pub mod units;
pub mod zstd_ctx;

#[cfg(test)]
mod testutil;

pub use chunk::{
    CompressedChunk, Encoding, HashMismatch, UnverifiedChunk, VerifiedChunk, VerifyError,
};
pub use chunker::{ChunkerConfig, Piece};
pub use id::{ChunkId, GlobalId};
pub use manifest::{Extent, FileEntry, FileRecipe, Manifest};
