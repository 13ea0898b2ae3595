//! The client side: push an image, send adaptation blocks, ask where images are — as
//! library calls, so the CLI, the tests and the benchmarks all drive the same code.
//!
//! [`Client::connect`] dials the engine with the admin token; [`upload`] chunks files and
//! uploads what the engine lacks; [`change`] turns a block's changes into operations.

pub mod bases;
pub mod change;
pub mod upload;

use std::path::PathBuf;

use quinn::{Connection, ConnectionError, VarInt};
use seedcast_core::protocol::{
    AdaptRequest, CommitRequest, ErrorKind, HelloReply, ImageStatus, Request, Response, Role,
    SiteInfo, VersionInfo, close,
};
use seedcast_core::{ChunkerConfig, GlobalId};
use seedcast_net::dial::{DialError, dial, hello};
use seedcast_net::endpoint::TransportOptions;
use seedcast_net::pki::{Token, TokenKind};
use seedcast_net::{FramedError, read_msg, read_msg_required, write_msg};

pub use change::Change;
pub use upload::{AdaptOptions, PushOptions, PushProgress};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach the engine at {addr}: {why}")]
    Unreachable { addr: String, why: String },
    #[error("the engine refused this client: {0}")]
    Refused(String),
    #[error("engine: {message}")]
    Engine { kind: ErrorKind, message: String },
    #[error("connection: {0}")]
    Connection(#[from] ConnectionError),
    #[error(transparent)]
    Framed(#[from] FramedError),
    #[error(transparent)]
    Tls(#[from] seedcast_net::tls::TlsError),
    /// A disk image could not be read through qemu's tools.
    #[error(transparent)]
    Image(#[from] seedcast_qemu::QemuError),
    #[error("unexpected reply from the engine: {0}")]
    Unexpected(String),
    #[error("internal: {0}")]
    Internal(String),
}

/// What kind of failure a [`ClientError`] is: what callers (and tests) match on, rather
/// than on message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request as given cannot be sent (bad arguments).
    Usage,
    /// A local file could not be read.
    File,
    /// The engine could not be reached.
    Unreachable,
    /// The engine refused the credentials.
    Refused,
    /// The engine refused the request: what it names does not exist.
    NotFound,
    /// The engine refused the request as invalid.
    Invalid,
    /// The engine lacks chunks the request names.
    MissingChunks,
    /// The engine failed to carry out a valid request.
    EngineFault,
    /// The connection failed or a peer broke the protocol.
    Transport,
}

impl ClientError {
    pub fn kind(&self) -> ErrorClass {
        match self {
            ClientError::Usage(_) => ErrorClass::Usage,
            ClientError::File { .. } | ClientError::Image(_) => ErrorClass::File,
            ClientError::Unreachable { .. } => ErrorClass::Unreachable,
            ClientError::Refused(_) => ErrorClass::Refused,
            ClientError::Engine { kind, .. } => match kind {
                ErrorKind::NotFound => ErrorClass::NotFound,
                ErrorKind::Invalid => ErrorClass::Invalid,
                ErrorKind::MissingChunks => ErrorClass::MissingChunks,
                ErrorKind::Internal => ErrorClass::EngineFault,
            },
            ClientError::Connection(_)
            | ClientError::Framed(_)
            | ClientError::Tls(_)
            | ClientError::Unexpected(_) => ErrorClass::Transport,
            ClientError::Internal(_) => ErrorClass::EngineFault,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.kind() == ErrorClass::NotFound
    }
}

impl From<DialError> for ClientError {
    fn from(e: DialError) -> Self {
        match e {
            DialError::Unreachable { addr, why } => ClientError::Unreachable { addr, why },
            DialError::Connection(c) => ClientError::Connection(c),
        }
    }
}

/// A connected client.
#[derive(Debug)]
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: Connection,
    chunking: ChunkerConfig,
    engine_id: String,
}

impl Client {
    /// Connect to `engine` (`host:port`) with the admin token.
    pub async fn connect(engine: &str, token: &Token) -> Result<Client, ClientError> {
        Self::connect_with(engine, token, &TransportOptions::default()).await
    }

    pub async fn connect_with(
        engine: &str,
        token: &Token,
        transport: &TransportOptions,
    ) -> Result<Client, ClientError> {
        if token.kind != TokenKind::Admin {
            return Err(ClientError::Usage(
                "this is an agent's token (site or join); clients need the admin token (DATA/admin.token)".into(),
            ));
        }
        let cc = seedcast_net::tls::client_config(token.ca_fingerprint, None, transport)?;
        let (endpoint, conn) = dial(engine, cc, transport).await?;
        let role = Role::Client {
            admin_secret: token.secret.clone(),
        };
        let (_send, _recv, reply) = hello(&conn, role).await?;
        match reply {
            HelloReply::Welcome {
                engine_id,
                chunking,
                ..
            } => Ok(Client {
                endpoint,
                conn,
                chunking,
                engine_id,
            }),
            HelloReply::Refused { message, .. } => {
                conn.close(VarInt::from_u32(close::DONE), b"refused");
                Err(ClientError::Refused(message))
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub fn engine_id(&self) -> &str {
        &self.engine_id
    }

    pub fn chunking(&self) -> ChunkerConfig {
        self.chunking
    }

    /// Close the connection and wait until the engine has been told.
    pub async fn close(self) {
        self.conn.close(VarInt::from_u32(close::DONE), b"bye");
        self.endpoint.wait_idle().await;
    }

    async fn request(&self, req: &Request) -> Result<Response, ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_msg(&mut send, req).await?;
        let _ = send.finish();
        Self::check(read_msg_required(&mut recv).await?)
    }

    fn check(r: Response) -> Result<Response, ClientError> {
        match r {
            Response::Error { kind, message } => Err(ClientError::Engine { kind, message }),
            r => Ok(r),
        }
    }

    /// One image's status.
    pub async fn status(&self, g: &GlobalId) -> Result<ImageStatus, ClientError> {
        match self
            .request(&Request::Status {
                global_id: Some(*g),
            })
            .await?
        {
            Response::Image(s) => Ok(s),
            r => Err(ClientError::Unexpected(format!("{r:?}"))),
        }
    }

    /// Every image's status.
    pub async fn images(&self) -> Result<Vec<ImageStatus>, ClientError> {
        match self.request(&Request::Status { global_id: None }).await? {
            Response::Images(v) => Ok(v),
            r => Err(ClientError::Unexpected(format!("{r:?}"))),
        }
    }

    pub async fn sites(&self) -> Result<Vec<SiteInfo>, ClientError> {
        match self.request(&Request::Sites).await? {
            Response::Sites(v) => Ok(v),
            r => Err(ClientError::Unexpected(format!("{r:?}"))),
        }
    }

    /// A single-use token enrolling `site`, valid `expires_secs`: its text and expiry
    /// (Unix seconds).
    pub async fn site_add(
        &self,
        site: &str,
        expires_secs: u64,
    ) -> Result<(String, u64), ClientError> {
        let req = Request::SiteAdd {
            site: site.into(),
            expires_secs,
        };
        match self.request(&req).await? {
            Response::SiteToken {
                token,
                expires_unix,
                ..
            } => Ok((token, expires_unix)),
            r => Err(ClientError::Unexpected(format!("{r:?}"))),
        }
    }

    /// Forget a site's certificate, tokens and revocation (its agent is cut off); a new
    /// `site_add` token can then enroll the name again.
    pub async fn site_reset(&self, site: &str) -> Result<(), ClientError> {
        match self
            .request(&Request::SiteReset { site: site.into() })
            .await?
        {
            Response::Done => Ok(()),
            r => Err(ClientError::Unexpected(format!("{r:?}"))),
        }
    }

    /// Change a site's link settings (`None`: leave as is; `Some(None)`: back to the
    /// engine's default); the site as it now is.
    pub async fn site_set(
        &self,
        site: &str,
        max_rate: Option<Option<u64>>,
        congestion: Option<Option<seedcast_core::protocol::Congestion>>,
    ) -> Result<SiteInfo, ClientError> {
        let req = Request::SiteSet {
            site: site.into(),
            max_rate,
            congestion,
        };
        match self.request(&req).await? {
            Response::Sites(mut v) if v.len() == 1 => Ok(v.remove(0)),
            r => Err(ClientError::Unexpected(format!("{r:?}"))),
        }
    }

    /// Measure the path to a connected site for about `seconds` (`seedcast bench site`).
    pub async fn bench_site(
        &self,
        site: &str,
        seconds: u32,
    ) -> Result<seedcast_core::protocol::SiteBench, ClientError> {
        let req = Request::BenchSite {
            site: site.into(),
            seconds,
        };
        match self.request(&req).await? {
            Response::SiteBench(b) => Ok(b),
            r => Err(ClientError::Unexpected(format!("{r:?}"))),
        }
    }

    pub async fn revoke(&self, site: &str) -> Result<(), ClientError> {
        match self.request(&Request::Revoke { site: site.into() }).await? {
            Response::Revoked => Ok(()),
            r => Err(ClientError::Unexpected(format!("{r:?}"))),
        }
    }

    /// Follow `version` of `g` until every target site has published or failed.
    pub async fn watch(
        &self,
        g: &GlobalId,
        version: u32,
        mut on_progress: impl FnMut(&ImageStatus),
    ) -> Result<ImageStatus, ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_msg(
            &mut send,
            &Request::Watch {
                global_id: *g,
                version,
            },
        )
        .await?;
        let _ = send.finish();
        let mut last = None;
        while let Some(r) = read_msg::<Response>(&mut recv).await? {
            match Self::check(r)? {
                Response::Progress(s) => {
                    on_progress(&s);
                    last = Some(s);
                }
                r => return Err(ClientError::Unexpected(format!("{r:?}"))),
            }
        }
        last.ok_or_else(|| ClientError::Unexpected("watch ended without progress".into()))
    }

    /// Push an image: chunk, upload what the engine lacks, commit. Returns the committed
    /// image's status (global id, target sites, bytes uploaded).
    pub async fn push(
        &self,
        opts: &PushOptions,
        on_progress: impl FnMut(PushProgress),
    ) -> Result<ImageStatus, ClientError> {
        if opts.files.is_empty() {
            return Err(ClientError::Usage("push needs at least one file".into()));
        }
        let named = opts
            .files
            .iter()
            .map(|p| Ok((p.clone(), upload::base_name(p)?)))
            .collect::<Result<Vec<_>, ClientError>>()?;
        let deltas = self.deltas(&opts.bases, opts.delta_level).await?;
        let entries = self
            .upload_files(
                named,
                opts.zstd_level,
                opts.batch_bytes,
                deltas,
                on_progress,
            )
            .await?;
        let commit = CommitRequest {
            name: opts.name.clone(),
            files: entries,
            sites: opts.sites.clone(),
        };
        match self.request(&Request::Commit(commit)).await? {
            Response::Committed(s) => Ok(s),
            r => Err(ClientError::Unexpected(format!("{r:?}"))),
        }
    }

    /// Send an adaptation block: the next version of `global_id`, made of `changes` applied
    /// in order. New file contents are chunked here and only missing chunks uploaded.
    pub async fn adapt(
        &self,
        global_id: &GlobalId,
        changes: &[Change],
        zstd_level: i32,
    ) -> Result<ImageStatus, ClientError> {
        let opts = AdaptOptions {
            zstd_level,
            ..AdaptOptions::default()
        };
        self.adapt_with(global_id, changes, &opts).await
    }

    /// [`Client::adapt`] with options: new chunks uploaded as delta groups against base
    /// files the client holds (`opts.bases`: the previous version, whose chunks the engine
    /// has).
    pub async fn adapt_with(
        &self,
        global_id: &GlobalId,
        changes: &[Change],
        opts: &AdaptOptions,
    ) -> Result<ImageStatus, ClientError> {
        if changes.is_empty() {
            return Err(ClientError::Usage(
                "an adaptation block needs at least one change (--file, --write, --add or --remove)".into(),
            ));
        }
        let uploads = change::uploads(changes)?;
        if uploads.is_empty() && !opts.bases.is_empty() {
            return Err(ClientError::Usage(
                "--base is for new file contents (--file or --add); this block uploads none".into(),
            ));
        }
        let deltas = self.deltas(&opts.bases, opts.delta_level).await?;
        let entries = self
            .upload_files(uploads, opts.zstd_level, 8 << 20, deltas, |_| {})
            .await?;
        let req = AdaptRequest {
            global_id: *global_id,
            ops: change::ops(changes, &entries)?,
        };
        match self.request(&Request::Adapt(req)).await? {
            Response::Committed(s) => Ok(s),
            r => Err(ClientError::Unexpected(format!("{r:?}"))),
        }
    }

    /// Cut and index base files, if any, for delta uploads.
    async fn deltas(
        &self,
        bases: &[PathBuf],
        level: i32,
    ) -> Result<Option<upload::Deltas>, ClientError> {
        if bases.is_empty() {
            return Ok(None);
        }
        if !(1..=22).contains(&level) {
            return Err(ClientError::Usage(format!(
                "delta level {level}: zstd levels are 1 to 22"
            )));
        }
        let b = bases::BaseFiles::open(self, bases.to_vec()).await?;
        tracing::info!("{} base chunks the engine holds", b.held());
        Ok(Some(upload::Deltas {
            bases: std::sync::Arc::new(b),
            level,
        }))
    }

    /// Every version of an image, oldest first.
    pub async fn history(&self, g: &GlobalId) -> Result<Vec<VersionInfo>, ClientError> {
        match self.request(&Request::History { global_id: *g }).await? {
            Response::History(v) => Ok(v),
            r => Err(ClientError::Unexpected(format!("{r:?}"))),
        }
    }

    /// Make the next version of `g` a copy of version `to`.
    pub async fn rollback(&self, g: &GlobalId, to: u32) -> Result<ImageStatus, ClientError> {
        match self
            .request(&Request::Rollback { global_id: *g, to })
            .await?
        {
            Response::Committed(s) => Ok(s),
            r => Err(ClientError::Unexpected(format!("{r:?}"))),
        }
    }
}
