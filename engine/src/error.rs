//! The engine's errors and how each reaches a client.
//!
//! Policy: each variant carries its typed cause (the layer below's error, or the fields
//! that say what was wrong), never a flattened string; [`EngineError::kind`] decides what a
//! client may do about it (fix the request, upload first, or report an engine fault), and
//! the message is what the client prints.

use seedcast_core::chunker::ConfigError;
use seedcast_core::codec::CodecError;
use seedcast_core::delta::DeltaError;
use seedcast_core::manifest::ManifestError;
use seedcast_core::protocol::{ErrorKind, Response};
use seedcast_core::source::SourceError;
use seedcast_core::{ChunkId, GlobalId, VerifyError};

use crate::catalog::CatalogError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Pki(#[from] seedcast_net::pki::PkiError),
    #[error(transparent)]
    Tls(#[from] seedcast_net::tls::TlsError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Chunking(#[from] ConfigError),
    #[error("unknown global id {0}")]
    UnknownImage(GlobalId),
    #[error("unknown site {0:?}")]
    UnknownSite(String),
    /// `bench site` could not measure the site.
    #[error(transparent)]
    Probe(#[from] crate::probe::ProbeError),
    #[error("site {0:?} is revoked")]
    RevokedSite(String),
    #[error(
        "site {0:?} is enrolled: `seedcast site reset {0}` cuts its agent off and lets a new token enroll it"
    )]
    SiteEnrolled(String),
    #[error(
        "site {0:?} is revoked: `seedcast site reset {0}` re-admits it (then `seedcast site add {0}`)"
    )]
    SiteRevoked(String),
    #[error("invalid site name {0:?}: use 1-63 characters from a-z, 0-9, '-' and '_'")]
    InvalidSiteName(String),
    #[error("max rate {0} bit/s is outside 64kbit..1Tbit")]
    RateRange(u64),
    #[error("a site token may live at most {max} s (asked for {secs} s)")]
    TokenLifetime { secs: u64, max: u64 },
    /// The files of a push or a block break the manifest rules.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// An adaptation block or rollback that cannot apply.
    #[error(transparent)]
    Adapt(#[from] AdaptError),
    /// An upload refused whole.
    #[error("upload refused: {0}")]
    Upload(#[from] UploadRefused),
    #[error("at most {max} ids per request (got {count})")]
    TooManyIds { count: usize, max: usize },
    #[error("file {path:?}: chunk {id} is {held} bytes, the recipe says {recipe}")]
    ChunkLength {
        path: String,
        id: ChunkId,
        held: u32,
        recipe: u32,
    },
    #[error(
        "the engine lacks {count} chunk(s) the image needs (first: {first}); upload them before committing"
    )]
    MissingChunks { count: usize, first: ChunkId },
    #[error("manifest {global_id}@{version} is missing from the catalog")]
    ManifestMissing { global_id: GlobalId, version: u32 },
    #[error("encoding: {0}")]
    Codec(#[from] CodecError),
    #[error("delta encoding: {0}")]
    Delta(#[from] DeltaError),
    #[error("engine task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why an adaptation block or a rollback cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum AdaptError {
    #[error("an adaptation block needs at least one change")]
    Empty,
    #[error("{global_id} version {version} has no file {path:?} (its files: {files})")]
    NoSuchFile {
        global_id: GlobalId,
        version: u32,
        path: String,
        files: String,
    },
    #[error("{global_id} version {version} already has a file {path:?} (replace it instead)")]
    FileExists {
        global_id: GlobalId,
        version: u32,
        path: String,
    },
    #[error("a write of {len} bytes exceeds the limit of {max} (replace the file instead)")]
    WriteTooLarge { len: usize, max: usize },
    #[error("offset {offset} is past the end of {path:?} ({len} bytes)")]
    OffsetPastEnd { path: String, offset: u64, len: u64 },
    #[error("empty write to {path:?}")]
    EmptyWrite { path: String },
    #[error("write to {path:?}: {source}")]
    Edit {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("version {version} is already the current version of {global_id}")]
    AlreadyCurrent { global_id: GlobalId, version: u32 },
    #[error("{global_id} has no version {version} (versions 1 to {current})")]
    NoSuchVersion {
        global_id: GlobalId,
        version: u32,
        current: u32,
    },
}

impl AdaptError {
    /// The client's mistake (as opposed to the engine failing to read its own chunks).
    fn is_invalid(&self) -> bool {
        !matches!(self, AdaptError::Edit { .. })
    }
}

/// Why an upload batch was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadRefused {
    #[error("{count} chunks exceed the batch limit {max}")]
    TooMany { count: u32, max: u32 },
    #[error(
        "chunk {id} payload of {len} bytes exceeds the limit {max} (the engine's chunks are at most {max_raw} bytes)"
    )]
    PayloadTooLarge {
        id: ChunkId,
        len: u32,
        max: u32,
        max_raw: u32,
    },
    #[error("upload batch exceeds {max} bytes")]
    BatchTooLarge { max: u64 },
    #[error("delta group refused: {0}")]
    BadGroup(String),
    #[error("delta group names base chunk {0}, which the engine does not hold")]
    UnknownBase(ChunkId),
    #[error("the delta groups of one batch {what} more than {max} bytes")]
    GroupsTooLarge { what: &'static str, max: u64 },
    #[error("delta group does not decode against its bases: {0}")]
    GroupDecode(#[from] seedcast_core::delta::DeltaError),
    #[error("an upload carries chunks and delta groups only, not an abort")]
    AbortRecord,
    #[error(transparent)]
    Verify(#[from] VerifyError),
}

impl EngineError {
    /// How the error reaches a client.
    pub fn response(&self) -> Response {
        Response::Error {
            kind: self.kind(),
            message: self.to_string(),
        }
    }

    /// The kind a client sees.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::UnknownImage(_) | EngineError::UnknownSite(_) => ErrorKind::NotFound,
            EngineError::Adapt(a) if !a.is_invalid() => ErrorKind::Internal,
            EngineError::RevokedSite(_)
            | EngineError::SiteEnrolled(_)
            | EngineError::SiteRevoked(_)
            | EngineError::InvalidSiteName(_)
            | EngineError::TokenLifetime { .. }
            | EngineError::RateRange(_)
            | EngineError::Probe(crate::probe::ProbeError::NotConnected(_))
            | EngineError::Manifest(_)
            | EngineError::Adapt(_)
            | EngineError::Upload(_)
            | EngineError::TooManyIds { .. }
            | EngineError::ChunkLength { .. } => ErrorKind::Invalid,
            EngineError::MissingChunks { .. } => ErrorKind::MissingChunks,
            _ => ErrorKind::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_cause() {
        let g = GlobalId([1; 12]);
        assert_eq!(EngineError::UnknownImage(g).kind(), ErrorKind::NotFound);
        assert_eq!(
            EngineError::Manifest(ManifestError::NoFiles).kind(),
            ErrorKind::Invalid
        );
        assert_eq!(
            EngineError::Adapt(AdaptError::Empty).kind(),
            ErrorKind::Invalid
        );
        let edit = AdaptError::Edit {
            path: "d".into(),
            source: Box::new(std::io::Error::other("pack unreadable")),
        };
        assert_eq!(EngineError::Adapt(edit).kind(), ErrorKind::Internal);
        assert_eq!(
            EngineError::MissingChunks {
                count: 1,
                first: ChunkId([0; 32])
            }
            .kind(),
            ErrorKind::MissingChunks
        );
        assert_eq!(
            EngineError::ManifestMissing {
                global_id: g,
                version: 2
            }
            .kind(),
            ErrorKind::Internal
        );
        // The typed cause stays reachable.
        let e = EngineError::Manifest(ManifestError::NoFiles);
        assert!(matches!(e, EngineError::Manifest(ManifestError::NoFiles)));
        assert_eq!(e.to_string(), "an image needs at least one file");
    }
}
