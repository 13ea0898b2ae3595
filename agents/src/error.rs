//! The agent's errors.
//!
//! Policy: [`AgentError`] is what ends a deployment or a session; [`AgentError::is_fatal`]
//! says when retrying cannot help (the agent stops and says why) and
//! [`AgentError::ends_session`] when the connection is gone (no `Failed` can be sent). What
//! the engine sends on data streams that is refused is a typed [`ReceiveError`]: the
//! transfer fails with it, and the engine is told its message.

use quinn::ConnectionError;
use seedcast_core::delta::DeltaError;
use seedcast_core::manifest::{ManifestDeltaError, ManifestError};
use seedcast_core::protocol::{RefuseReason, close};
use seedcast_core::transfer::TransferError;
use seedcast_core::{ChunkId, GlobalId, HashMismatch, VerifyError};
use seedcast_net::FramedError;
use seedcast_net::dial::DialError;
use seedcast_net::pki::PkiError;
use seedcast_net::tls::TlsError;

use crate::adapter::AdapterError;
use crate::assemble::AssembleError;
use crate::cache::CacheError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the engine refused this agent ({reason:?}): {message}")]
    Refused {
        reason: RefuseReason,
        message: String,
    },
    #[error("the engine closed the connection (code {code}): {reason}")]
    Closed { code: u64, reason: String },
    #[error("configuration: {0}")]
    Config(String),
    /// The site certificate has expired: only the admin can let the site in again.
    #[error(
        "the certificate of site {site:?} expired at {expired_unix} (Unix time): ask the admin to run `seedcast site reset {site}` and `seedcast site add {site}`, then start the agent with the new token"
    )]
    Expired { site: String, expired_unix: u64 },
    /// The engine presents another manifest signing key than the one pinned at enrollment.
    #[error(
        "the engine's manifest signing key changed (pinned {pinned}, presented {presented}): refusing its images; if the engine was rebuilt on purpose, reset and re-add this site"
    )]
    SigningKeyChanged { pinned: String, presented: String },
    /// A manifest whose signature does not verify: not an image the engine made.
    #[error("manifest of {global_id} version {version}: {source}")]
    Unsigned {
        global_id: GlobalId,
        version: u32,
        source: seedcast_net::signing::BadSignature,
    },
    /// A version older than (or other than) the newest this site applied of the image:
    /// a replay or a rollback not made by the engine as a new version.
    #[error(
        "{global_id} version {version} refused: this site has applied version {floor} (a rollback is a new version made with `seedcast rollback`)"
    )]
    Older {
        global_id: GlobalId,
        version: u32,
        floor: u32,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The site's image service does not answer (checked when the agent starts).
    #[error("the site's image service: {0}")]
    Service(AdapterError),
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error("cannot reach the engine at {addr}: {why}")]
    Unreachable { addr: String, why: String },
    #[error("connection: {0}")]
    Connection(ConnectionError),
    #[error(transparent)]
    Framed(#[from] FramedError),
    /// The engine answered something this agent cannot take at that point.
    #[error("the engine broke the protocol: {0}")]
    Protocol(&'static str),
    #[error("cannot rebuild the manifest: this site does not hold {0}@{1}")]
    BaseNotHeld(GlobalId, u32),
    #[error("cannot rebuild the manifest: {0}")]
    ManifestDelta(#[from] ManifestDeltaError),
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("refused data: {0}")]
    Receive(#[from] ReceiveError),
    #[error("manifest encoding: {0}")]
    Codec(#[from] seedcast_core::codec::CodecError),
    #[error("agent task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl From<ConnectionError> for AgentError {
    fn from(e: ConnectionError) -> Self {
        match e {
            ConnectionError::ApplicationClosed(c) => AgentError::Closed {
                code: c.error_code.into_inner(),
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            e => AgentError::Connection(e),
        }
    }
}

impl From<DialError> for AgentError {
    fn from(e: DialError) -> Self {
        match e {
            DialError::Unreachable { addr, why } => AgentError::Unreachable { addr, why },
            DialError::Connection(c) => c.into(),
        }
    }
}

impl AgentError {
    /// Errors that retrying cannot fix: the agent stops and says why.
    pub fn is_fatal(&self) -> bool {
        match self {
            AgentError::Refused { .. }
            | AgentError::Expired { .. }
            | AgentError::SigningKeyChanged { .. }
            | AgentError::Config(_)
            | AgentError::Service(_)
            | AgentError::Pki(_)
            | AgentError::Tls(_) => true,
            AgentError::Closed { code, .. } => {
                [close::REFUSED, close::REPLACED, close::VERSION].contains(&(*code as u32))
            }
            _ => false,
        }
    }

    /// The connection is gone: the deployment cannot even be answered.
    pub fn ends_session(&self) -> bool {
        matches!(
            self,
            AgentError::Connection(_) | AgentError::Closed { .. } | AgentError::Framed(_)
        )
    }
}

/// Why data the engine sent for a transfer was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The record is not what the transfer asked for (or breaks its limits).
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Mismatch(#[from] HashMismatch),
    #[error("delta group: {0}")]
    Delta(#[from] DeltaError),
    #[error("base chunk {0} is not available at this site")]
    BaseUnavailable(ChunkId),
    /// The engine gave up on the transfer (its store could not provide a chunk).
    #[error("the engine aborted the transfer: {0}")]
    Aborted(String),
    #[error("delta group bases exceed {max} bytes")]
    BasesTooLarge { max: usize },
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Writing a chunk into the image being built failed (the site's disk).
    #[error("staging the image: {0}")]
    Stage(#[from] crate::assemble::AssembleError),
    /// The data stream broke (its reason as the stream error said it).
    #[error("data stream: {0}")]
    Stream(String),
    #[error("transfer abandoned")]
    Abandoned,
}
