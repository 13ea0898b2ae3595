//! The engine's error type and how its variants reach clients.

use seedcast_core::protocol::ErrorKind;
use seedcast_core::{ChunkId, GlobalId};

use crate::catalog::CatalogError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pki(#[from] seedcast_net::pki::PkiError),
    #[error(transparent)]
    Tls(#[from] seedcast_net::tls::TlsError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("unknown global id {0}")]
    UnknownImage(GlobalId),
    #[error("unknown site {0:?}")]
    UnknownSite(String),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the engine lacks {count} chunk(s) the image needs (first: {first}); upload them before committing"
    )]
    MissingChunks { count: usize, first: ChunkId },
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// The kind a client sees.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::UnknownImage(_) | EngineError::UnknownSite(_) => ErrorKind::NotFound,
            EngineError::Invalid(_) => ErrorKind::Invalid,
            EngineError::MissingChunks { .. } => ErrorKind::MissingChunks,
            _ => ErrorKind::Internal,
        }
    }
}
