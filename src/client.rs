//! The client side: push an image, ask where images are, list sites — as library calls, so
//! the CLI, the tests and the benchmarks all drive the same code.
//!
//! A push chunks every file locally (on a thread of its own, streaming: memory stays at a
//! few batches), asks the engine which chunks it lacks, compresses only those (on every
//! core) and uploads them, then commits the file list. The engine assigns the global id.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use quinn::{Connection, ConnectionError, VarInt};
use seedcast_core::chunker::StreamingChunker;
use seedcast_core::manifest::{RecipeBuilder, validate_file_name};
use seedcast_core::protocol::{
    AdaptOp, AdaptRequest, ChunkHeader, CommitRequest, ErrorKind, Hello, HelloReply, ImageStatus,
    MAX_WRITE, PROTOCOL_VERSION, Request, Response, Role, SERVER_NAME, SiteInfo, VersionInfo,
    close,
};
use seedcast_core::{ChunkId, ChunkerConfig, CompressedChunk, FileEntry, GlobalId};
use seedcast_net::endpoint::TransportOptions;
use seedcast_net::pki::{Token, TokenKind};
use seedcast_net::{FramedError, read_msg, read_msg_required, write_msg};
use tokio::sync::mpsc;

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
    #[error("unexpected reply from the engine: {0}")]
    Unexpected(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl ClientError {
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            ClientError::Engine {
                kind: ErrorKind::NotFound,
                ..
            }
        )
    }
}

/// What to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    pub name: String,
    pub files: Vec<PathBuf>,
    /// Target sites; `None`: every site the engine knows.
    pub sites: Option<Vec<String>>,
    /// zstd level for uploaded chunks. 3: a good ratio at ~0.2–0.4 GB/s per core.
    pub zstd_level: i32,
    /// Raw bytes of new chunks per missing-check and upload round trip. 8 MiB.
    pub batch_bytes: usize,
}

impl PushOptions {
    pub fn new(name: impl Into<String>, files: Vec<PathBuf>) -> Self {
        PushOptions {
            name: name.into(),
            files,
            sites: None,
            zstd_level: 3,
            batch_bytes: 8 << 20,
        }
    }
}

/// One change of an adaptation block, as the CLI states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `--file PATH=NEWFILE`: a new version of an existing file.
    Replace { path: String, file: PathBuf },
    /// `--write PATH@OFFSET=DATAFILE`: DATAFILE's bytes written at OFFSET.
    Write {
        path: String,
        offset: u64,
        data_file: PathBuf,
    },
    /// `--add PATH=FILE`: a new file.
    Add { path: String, file: PathBuf },
    /// `--remove PATH`.
    Remove { path: String },
}

impl Change {
    fn split_eq(s: &str, flag: &str, form: &str) -> Result<(String, PathBuf), ClientError> {
        let (a, b) = s
            .split_once('=')
            .filter(|(a, b)| !a.is_empty() && !b.is_empty())
            .ok_or_else(|| ClientError::Usage(format!("{flag} {s:?}: expected {form}")))?;
        Ok((a.to_string(), PathBuf::from(b)))
    }

    pub fn parse_file(s: &str) -> Result<Self, ClientError> {
        let (path, file) = Self::split_eq(s, "--file", "PATH=NEWFILE")?;
        Ok(Change::Replace { path, file })
    }

    pub fn parse_add(s: &str) -> Result<Self, ClientError> {
        let (path, file) = Self::split_eq(s, "--add", "PATH=FILE")?;
        Ok(Change::Add { path, file })
    }

    pub fn parse_write(s: &str) -> Result<Self, ClientError> {
        let form = "PATH@OFFSET=DATAFILE";
        let (target, data_file) = Self::split_eq(s, "--write", form)?;
        let (path, off) = target
            .rsplit_once('@')
            .ok_or_else(|| ClientError::Usage(format!("--write {s:?}: expected {form}")))?;
        let offset = off.parse::<u64>().map_err(|_| {
            ClientError::Usage(format!("--write {s:?}: offset {off:?} is not a number"))
        })?;
        Ok(Change::Write {
            path: path.to_string(),
            offset,
            data_file,
        })
    }
}

/// Progress of a push, for a progress bar.
#[derive(Debug, Clone, Copy, Default)]
pub struct PushProgress {
    /// Bytes of all files (holes included).
    pub total: u64,
    /// Bytes chunked so far.
    pub chunked: u64,
    /// Compressed bytes uploaded so far.
    pub uploaded: u64,
}

/// A connected client.
#[derive(Debug)]
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: Connection,
    chunking: ChunkerConfig,
    engine_id: String,
}

enum Chunked {
    Batch {
        chunks: Vec<(ChunkId, Bytes)>,
        chunked: u64,
    },
    File(FileEntry),
}

/// Base name of `p` as the image will know it.
fn base_name(p: &Path) -> Result<String, ClientError> {
    let name = p
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ClientError::Usage(format!("{}: no usable file name", p.display())))?;
    validate_file_name(name).map_err(|e| ClientError::Usage(format!("{}: {e}", p.display())))?;
    Ok(name.to_string())
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
                "this is a join token; clients need the admin token (DATA/admin.token)".into(),
            ));
        }
        let unreachable = |why: String| ClientError::Unreachable {
            addr: engine.to_string(),
            why,
        };
        let addr = tokio::net::lookup_host(engine)
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .next()
            .ok_or_else(|| unreachable("no address".into()))?;
        let cc = seedcast_net::tls::client_config(token.ca_fingerprint, None, transport)?;
        let endpoint = seedcast_net::endpoint::client(addr, transport)
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = endpoint
            .connect_with(cc, addr, SERVER_NAME)
            .map_err(|e| unreachable(e.to_string()))?
            .await
            .map_err(|e| match e {
                ConnectionError::TransportError(t) => {
                    unreachable(format!("TLS/QUIC handshake failed: {t}"))
                }
                ConnectionError::TimedOut => unreachable("timed out".into()),
                e => ClientError::Connection(e),
            })?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Client {
                admin_secret: token.secret.clone(),
            },
        };
        write_msg(&mut send, &hello).await?;
        match read_msg_required::<HelloReply>(&mut recv).await? {
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
        let mut named = Vec::new();
        for p in &opts.files {
            named.push((p.clone(), base_name(p)?));
        }
        let entries = self
            .upload_files(named, opts.zstd_level, opts.batch_bytes, on_progress)
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

    /// Chunk local files (each with the name the image knows it by), upload the chunks the
    /// engine lacks, return the files' entries.
    async fn upload_files(
        &self,
        files: Vec<(PathBuf, String)>,
        zstd_level: i32,
        batch_bytes: usize,
        mut on_progress: impl FnMut(PushProgress),
    ) -> Result<Vec<FileEntry>, ClientError> {
        let mut names = HashSet::new();
        let mut total = 0u64;
        for (p, name) in &files {
            if !names.insert(name.clone()) {
                return Err(ClientError::Usage(format!(
                    "two files are named {name:?}: files of an image are known by their base names"
                )));
            }
            let md = std::fs::metadata(p).map_err(|source| ClientError::File {
                path: p.clone(),
                source,
            })?;
            if !md.is_file() {
                return Err(ClientError::Usage(format!(
                    "{}: not a regular file",
                    p.display()
                )));
            }
            total += md.len();
        }
        let mut progress = PushProgress {
            total,
            ..Default::default()
        };
        on_progress(progress);
        if files.is_empty() {
            return Ok(Vec::new());
        }

        let (tx, mut rx) = mpsc::channel::<Result<Chunked, ClientError>>(2);
        let (cfg, batch_bytes) = (self.chunking, batch_bytes.max(1 << 20));
        let chunker = std::thread::spawn(move || chunk_files(files, cfg, batch_bytes, &tx));

        let mut entries = Vec::new();
        while let Some(item) = rx.recv().await {
            match item? {
                Chunked::File(e) => entries.push(e),
                Chunked::Batch { chunks, chunked } => {
                    progress.chunked = chunked;
                    progress.uploaded += self.upload_missing(chunks, zstd_level).await?;
                    on_progress(progress);
                }
            }
        }
        chunker
            .join()
            .map_err(|_| ClientError::Internal("chunking thread panicked".into()))?;
        progress.chunked = total;
        on_progress(progress);
        Ok(entries)
    }

    /// Send an adaptation block: the next version of `global_id`, made of `changes` applied
    /// in order. New file contents are chunked here and only missing chunks uploaded.
    pub async fn adapt(
        &self,
        global_id: &GlobalId,
        changes: &[Change],
        zstd_level: i32,
    ) -> Result<ImageStatus, ClientError> {
        if changes.is_empty() {
            return Err(ClientError::Usage(
                "an adaptation block needs at least one change (--file, --write, --add or --remove)".into(),
            ));
        }
        let mut uploads = Vec::new();
        for c in changes {
            match c {
                Change::Replace { path, file } | Change::Add { path, file } => {
                    validate_file_name(path).map_err(|e| ClientError::Usage(e.to_string()))?;
                    if !uploads
                        .iter()
                        .any(|(f, p): &(PathBuf, String)| f == file && p == path)
                    {
                        uploads.push((file.clone(), path.clone()));
                    }
                }
                _ => {}
            }
        }
        let entries = self
            .upload_files(uploads, zstd_level, 8 << 20, |_| {})
            .await?;
        let entry = |path: &str| {
            entries
                .iter()
                .find(|e| e.path == path)
                .cloned()
                .ok_or_else(|| ClientError::Internal(format!("no entry for {path}")))
        };
        let mut ops = Vec::new();
        for c in changes {
            ops.push(match c {
                Change::Replace { path, .. } => {
                    let e = entry(path)?;
                    AdaptOp::Replace {
                        path: e.path,
                        mode: e.mode,
                        recipe: e.recipe,
                    }
                }
                Change::Add { path, .. } => AdaptOp::Add(entry(path)?),
                Change::Remove { path } => AdaptOp::Remove { path: path.clone() },
                Change::Write {
                    path,
                    offset,
                    data_file,
                } => {
                    let md = std::fs::metadata(data_file).map_err(|source| ClientError::File {
                        path: data_file.clone(),
                        source,
                    })?;
                    if md.len() as usize > MAX_WRITE {
                        return Err(ClientError::Usage(format!(
                            "{}: a write carries at most {MAX_WRITE} bytes; use --file to replace the whole file",
                            data_file.display()
                        )));
                    }
                    let data = std::fs::read(data_file).map_err(|source| ClientError::File {
                        path: data_file.clone(),
                        source,
                    })?;
                    if data.is_empty() {
                        return Err(ClientError::Usage(format!(
                            "{}: an empty write changes nothing",
                            data_file.display()
                        )));
                    }
                    AdaptOp::Write {
                        path: path.clone(),
                        offset: *offset,
                        data,
                    }
                }
            });
        }
        let req = AdaptRequest {
            global_id: *global_id,
            ops,
        };
        match self.request(&Request::Adapt(req)).await? {
            Response::Committed(s) => Ok(s),
            r => Err(ClientError::Unexpected(format!("{r:?}"))),
        }
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

    /// Ask which of `chunks` the engine lacks; compress and upload those. Returns the
    /// compressed bytes uploaded.
    async fn upload_missing(
        &self,
        chunks: Vec<(ChunkId, Bytes)>,
        level: i32,
    ) -> Result<u64, ClientError> {
        let ids: Vec<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();
        let missing: HashSet<ChunkId> =
            match self.request(&Request::Missing { chunks: ids }).await? {
                Response::Missing { chunks } => chunks.into_iter().collect(),
                r => return Err(ClientError::Unexpected(format!("{r:?}"))),
            };
        let todo: Vec<(ChunkId, Bytes)> = chunks
            .into_iter()
            .filter(|(id, _)| missing.contains(id))
            .collect();
        if todo.is_empty() {
            return Ok(0);
        }
        let compressed = compress_parallel(todo, level).await?;
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_msg(
            &mut send,
            &Request::Upload {
                count: compressed.len() as u32,
            },
        )
        .await?;
        let mut bytes = 0u64;
        for c in compressed {
            let h = ChunkHeader::of(&c);
            write_msg(&mut send, &h).await?;
            bytes += c.payload.len() as u64;
            send.write_chunk(c.payload)
                .await
                .map_err(FramedError::from)?;
        }
        let _ = send.finish();
        match Self::check(read_msg_required(&mut recv).await?)? {
            Response::Uploaded { .. } => Ok(bytes),
            r => Err(ClientError::Unexpected(format!("{r:?}"))),
        }
    }
}

/// Compress on every core: split the batch across blocking threads.
async fn compress_parallel(
    todo: Vec<(ChunkId, Bytes)>,
    level: i32,
) -> Result<Vec<CompressedChunk>, ClientError> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let per = todo.len().div_ceil(threads).max(1);
    let mut handles = Vec::new();
    let mut rest = todo;
    while !rest.is_empty() {
        let tail = rest.split_off(per.min(rest.len()));
        let part = std::mem::replace(&mut rest, tail);
        handles.push(tokio::task::spawn_blocking(move || {
            part.into_iter()
                .map(|(id, raw)| CompressedChunk::compress(id, &raw, level))
                .collect::<Vec<_>>()
        }));
    }
    let mut out = Vec::new();
    for h in handles {
        out.extend(h.await.map_err(|e| ClientError::Internal(e.to_string()))?);
    }
    Ok(out)
}

/// Chunk every file (on the calling thread), sending batches of new distinct chunks and
/// each file's entry when it is done.
fn chunk_files(
    files: Vec<(PathBuf, String)>,
    cfg: ChunkerConfig,
    batch_bytes: usize,
    tx: &mpsc::Sender<Result<Chunked, ClientError>>,
) {
    let mut seen = HashSet::new();
    let mut batch = Vec::new();
    let mut batch_len = 0usize;
    let mut chunked = 0u64;
    let send = |item| tx.blocking_send(item).is_ok();
    for (path, name) in files {
        let fail = |source| ClientError::File {
            path: path.clone(),
            source,
        };
        let r = (|| {
            let f = File::open(&path).map_err(fail)?;
            let mode = f.metadata().map_err(fail)?.permissions().mode() & 0o7777;
            let mut rb = RecipeBuilder::new();
            let chunker =
                StreamingChunker::new(f, cfg).map_err(|e| ClientError::Usage(e.to_string()))?;
            for piece in chunker {
                let (_, piece) = piece.map_err(fail)?;
                chunked += piece.len();
                if let Some((id, data)) = rb.push(piece)
                    && seen.insert(id)
                {
                    batch_len += data.len();
                    batch.push((id, data));
                    if batch_len >= batch_bytes || batch.len() >= 1024 {
                        let chunks = std::mem::take(&mut batch);
                        batch_len = 0;
                        if !send(Ok(Chunked::Batch { chunks, chunked })) {
                            return Ok(None);
                        }
                    }
                }
            }
            Ok(Some(FileEntry {
                path: name.clone(),
                mode,
                recipe: rb.finish(),
            }))
        })();
        match r {
            Ok(Some(entry)) => {
                if !send(Ok(Chunked::File(entry))) {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                send(Err(e));
                return;
            }
        }
    }
    if !batch.is_empty() {
        send(Ok(Chunked::Batch {
            chunks: batch,
            chunked,
        }));
    }
}

/// Read a token given on the command line: the token itself, or a path to a file holding it.
pub fn parse_token(s: &str) -> Result<Token, ClientError> {
    match s.parse::<Token>() {
        Ok(t) => Ok(t),
        Err(e) => {
            let p = Path::new(s);
            if p.is_file() {
                let text = std::fs::read_to_string(p).map_err(|source| ClientError::File {
                    path: p.to_path_buf(),
                    source,
                })?;
                text.parse::<Token>()
                    .map_err(|e| ClientError::Usage(format!("{}: {e}", p.display())))
            } else {
                Err(ClientError::Usage(e.to_string()))
            }
        }
    }
}
