//! The agent's life: enroll once, then dial the engine, stay connected, and serve
//! deployments; reconnect with backoff when the connection drops.
//!
//! Per deployment (one at a time, in the order the engine sends them):
//! `Deploy` → [`Transfer::new`] decides what is missing → `Need` → chunks arrive on data
//! streams, each checked against the transfer before its payload is read, verified, and put
//! in the cache → assemble and check every file → adapter `publish` / `update` → `Published`
//! with the local id (or `Failed` with the reason).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::{Connection, ConnectionError, RecvStream, SendStream, VarInt};
use seedcast_core::delta::decode_group;
use seedcast_core::protocol::{
    AgentMsg, DataRecord, DataStreamHeader, EngineMsg, GroupHeader, HeldVersion, Hello, HelloReply,
    PROTOCOL_VERSION, RefuseReason, Role, SERVER_NAME, close,
};
use seedcast_core::transfer::Transfer;
use seedcast_core::{
    ChunkId, ChunkerConfig, CompressedChunk, Manifest, UnverifiedChunk, VerifiedChunk,
};
use seedcast_net::endpoint::TransportOptions;
use seedcast_net::pki::{
    PendingEnrollment, PkiError, SiteCredentials, Token, TokenKind, fingerprint,
};
use seedcast_net::tls::TlsError;
use seedcast_net::{FramedError, read_msg, read_msg_required, read_payload, write_msg};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::adapter::{Adapter, AdapterError};
use crate::assemble::{AssembleError, assemble};
use crate::cache::{AgentDb, CacheError, HeldRecord};
use crate::seeds::SeedIndex;

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Data directory: credentials and the agent database.
    pub data: PathBuf,
    /// The engine's address, `host:port`.
    pub engine: String,
    /// The join token; needed only until the site is enrolled.
    pub token: Option<Token>,
    pub site: String,
    pub transport: TransportOptions,
    /// Longest wait between reconnection attempts. 5 s.
    pub reconnect_max: Duration,
}

impl AgentConfig {
    pub fn new(
        data: impl Into<PathBuf>,
        engine: impl Into<String>,
        site: impl Into<String>,
        token: Option<Token>,
    ) -> Self {
        AgentConfig {
            data: data.into(),
            engine: engine.into(),
            token,
            site: site.into(),
            transport: TransportOptions::default(),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

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
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error("cannot reach the engine at {addr}: {why}")]
    Unreachable { addr: String, why: String },
    #[error("connection: {0}")]
    Connection(ConnectionError),
    #[error(transparent)]
    Framed(#[from] FramedError),
    #[error("the engine broke the protocol: {0}")]
    Protocol(String),
    #[error("internal: {0}")]
    Internal(String),
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

impl AgentError {
    /// Errors that retrying cannot fix: the agent stops and says why.
    pub fn is_fatal(&self) -> bool {
        match self {
            AgentError::Refused { .. }
            | AgentError::Config(_)
            | AgentError::Pki(_)
            | AgentError::Tls(_) => true,
            AgentError::Closed { code, .. } => {
                [close::REFUSED, close::REPLACED, close::VERSION].contains(&(*code as u32))
            }
            _ => false,
        }
    }
}

/// The transfer being received, shared with the data-stream tasks.
struct Active {
    transfer: Transfer,
    /// Published images, for delta bases the cache does not hold.
    seeds: Arc<SeedIndex>,
    /// Completed (Ok) or failed (Err with the reason) — sent once.
    done: Option<oneshot::Sender<Result<(), String>>>,
}

impl Active {
    fn finish(&mut self, r: Result<(), String>) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(r);
        }
    }
}

type Slot = Arc<Mutex<Option<Active>>>;

#[derive(Debug, Clone)]
pub struct Agent {
    cfg: AgentConfig,
    db: Arc<AgentDb>,
    adapter: Arc<dyn Adapter>,
}

impl Agent {
    pub fn open(cfg: AgentConfig, adapter: Arc<dyn Adapter>) -> Result<Agent, AgentError> {
        seedcast_net::pki::validate_site_name(&cfg.site)?;
        if let Some(t) = &cfg.token
            && t.kind != TokenKind::Join
        {
            return Err(AgentError::Config(
                "this is an admin token; agents enroll with the join token (DATA/join.token)"
                    .into(),
            ));
        }
        std::fs::create_dir_all(&cfg.data)
            .map_err(|e| AgentError::Config(format!("{}: {e}", cfg.data.display())))?;
        let db = Arc::new(AgentDb::open(&cfg.data.join("db"))?);
        Ok(Agent { cfg, db, adapter })
    }

    pub fn db(&self) -> &Arc<AgentDb> {
        &self.db
    }

    pub fn adapter(&self) -> &Arc<dyn Adapter> {
        &self.adapter
    }

    /// Credentials from the data dir, or enroll with the join token and keep them.
    pub async fn credentials(&self) -> Result<SiteCredentials, AgentError> {
        if let Some(c) = SiteCredentials::load(&self.cfg.data)? {
            if c.site != self.cfg.site {
                return Err(AgentError::Config(format!(
                    "{} belongs to site {:?}, not {:?}",
                    self.cfg.data.display(),
                    c.site,
                    self.cfg.site
                )));
            }
            if let Some(t) = &self.cfg.token
                && t.ca_fingerprint != c.ca_fingerprint()
            {
                return Err(AgentError::Config(
                    "the token is for another engine than the one this site enrolled with".into(),
                ));
            }
            return Ok(c);
        }
        let token = self.cfg.token.clone().ok_or_else(|| {
            AgentError::Config(
                "this site is not enrolled yet: pass --token (the engine's join.token)".into(),
            )
        })?;
        self.enroll(&token).await
    }

    async fn resolve(&self) -> Result<SocketAddr, AgentError> {
        let unreachable = |why: String| AgentError::Unreachable {
            addr: self.cfg.engine.clone(),
            why,
        };
        tokio::net::lookup_host(&self.cfg.engine)
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .next()
            .ok_or_else(|| unreachable("no address".into()))
    }

    async fn dial(
        &self,
        cc: quinn::ClientConfig,
    ) -> Result<(quinn::Endpoint, Connection), AgentError> {
        let addr = self.resolve().await?;
        let ep = seedcast_net::endpoint::client(addr, &self.cfg.transport).map_err(|e| {
            AgentError::Unreachable {
                addr: self.cfg.engine.clone(),
                why: e.to_string(),
            }
        })?;
        let conn = ep
            .connect_with(cc, addr, SERVER_NAME)
            .map_err(|e| AgentError::Unreachable {
                addr: self.cfg.engine.clone(),
                why: e.to_string(),
            })?
            .await
            .map_err(|e| match e {
                ConnectionError::TransportError(t) => AgentError::Unreachable {
                    addr: self.cfg.engine.clone(),
                    why: format!("TLS/QUIC handshake failed: {t}"),
                },
                e => AgentError::from(e),
            })?;
        Ok((ep, conn))
    }

    async fn enroll(&self, token: &Token) -> Result<SiteCredentials, AgentError> {
        info!(site = %self.cfg.site, engine = %self.cfg.engine, "enrolling");
        let pending = PendingEnrollment::new(&self.cfg.site)?;
        let cc = seedcast_net::tls::client_config(token.ca_fingerprint, None, &self.cfg.transport)?;
        let (ep, conn) = self.dial(cc).await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Enroll {
                join_secret: token.secret.clone(),
                site: self.cfg.site.clone(),
                adapter: self.adapter.kind().to_string(),
                csr_der: pending.csr_der.clone(),
            },
        };
        write_msg(&mut send, &hello).await?;
        let reply: HelloReply = read_msg_required(&mut recv).await?;
        conn.close(VarInt::from_u32(close::DONE), b"enrolled");
        ep.wait_idle().await;
        match reply {
            HelloReply::Enrolled { cert_der, ca_der } => {
                if fingerprint(&ca_der) != token.ca_fingerprint {
                    return Err(AgentError::Protocol(
                        "enrolled with a CA other than the token's".into(),
                    ));
                }
                let creds = pending.complete(&self.cfg.site, cert_der, ca_der);
                creds.save(&self.cfg.data)?;
                info!(site = %self.cfg.site, "enrolled; credentials saved");
                Ok(creds)
            }
            HelloReply::Refused { reason, message } => Err(AgentError::Refused { reason, message }),
            HelloReply::Welcome { .. } => Err(AgentError::Protocol(
                "expected Enrolled, got Welcome".into(),
            )),
        }
    }

    /// Run until `shutdown` completes or a fatal error (refused, revoked, misconfigured).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        let creds = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            c = self.credentials() => c?,
        };
        let min_backoff = Duration::from_millis(100);
        let mut backoff = min_backoff;
        loop {
            let mut welcomed = false;
            let r = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                r = self.session(&creds, &mut welcomed) => r,
            };
            match r {
                Ok(()) => info!("engine ended the session"),
                Err(e) if e.is_fatal() => {
                    warn!("stopping: {e}");
                    return Err(e);
                }
                Err(e) => warn!("session lost: {e}; reconnecting"),
            }
            if welcomed {
                backoff = min_backoff;
            }
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.cfg.reconnect_max);
        }
    }

    async fn session(
        &self,
        creds: &SiteCredentials,
        welcomed: &mut bool,
    ) -> Result<(), AgentError> {
        let cc = seedcast_net::tls::client_config(
            creds.ca_fingerprint(),
            Some((vec![creds.cert.clone()], creds.key())),
            &self.cfg.transport,
        )?;
        let (_ep, conn) = self.dial(cc).await?;
        let r = self.serve(&conn, welcomed).await;
        if let Err(AgentError::Framed(e)) = &r
            && e.is_protocol_violation()
        {
            conn.close(VarInt::from_u32(close::PROTOCOL), e.to_string().as_bytes());
        }
        // Prefer the engine's stated reason (e.g. revoked) to a bare stream error.
        match (r, conn.close_reason()) {
            (Err(AgentError::Framed(_)), Some(reason)) => Err(reason.into()),
            (r, _) => r,
        }
    }

    async fn serve(&self, conn: &Connection, welcomed: &mut bool) -> Result<(), AgentError> {
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Agent {
                site: self.cfg.site.clone(),
                adapter: self.adapter.kind().to_string(),
            },
        };
        write_msg(&mut send, &hello).await?;
        let chunking = match read_msg_required::<HelloReply>(&mut recv).await? {
            HelloReply::Welcome {
                engine_id,
                chunking,
                ..
            } => {
                info!(site = %self.cfg.site, engine = %engine_id, "connected");
                chunking
            }
            HelloReply::Refused { reason, message } => {
                return Err(AgentError::Refused { reason, message });
            }
            HelloReply::Enrolled { .. } => {
                return Err(AgentError::Protocol("unexpected Enrolled".into()));
            }
        };
        *welcomed = true;
        let db = self.db.clone();
        let inventory = tokio::task::spawn_blocking(move || db.inventory())
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))??;
        write_msg(&mut send, &AgentMsg::Inventory { images: inventory }).await?;

        let slot: Slot = Arc::new(Mutex::new(None));
        let streams = accept_data_streams(conn.clone(), slot.clone(), self.db.clone(), chunking);
        let control = async {
            loop {
                match read_msg::<EngineMsg>(&mut recv).await? {
                    None => return Ok::<(), AgentError>(()),
                    Some(EngineMsg::Deploy { transfer, manifest }) => {
                        self.deploy(conn, &mut send, &slot, transfer, manifest)
                            .await?;
                    }
                    Some(EngineMsg::DeployDelta {
                        transfer,
                        base,
                        manifest_id,
                        delta,
                    }) => match self.rebuild_manifest(&base, &delta, manifest_id).await {
                        Ok(manifest) => {
                            self.deploy(conn, &mut send, &slot, transfer, manifest)
                                .await?;
                        }
                        Err(error) => {
                            warn!(transfer, "{error}");
                            write_msg(&mut send, &AgentMsg::Failed { transfer, error }).await?;
                        }
                    },
                }
            }
        };
        tokio::select! {
            r = control => r,
            r = streams => r,
        }
    }

    async fn deploy(
        &self,
        conn: &Connection,
        send: &mut SendStream,
        slot: &Slot,
        transfer: u64,
        manifest: Manifest,
    ) -> Result<(), AgentError> {
        let g = manifest.global_id;
        let version = manifest.version;
        info!(site = %self.cfg.site, global_id = %g, version, transfer, "deploy");
        let result = self
            .receive_and_publish(conn, send, slot, transfer, manifest)
            .await;
        *slot.lock().expect("slot lock") = None;
        let reply = match result {
            Ok((local_id, bytes_received)) => AgentMsg::Published {
                transfer,
                local_id,
                bytes_received,
            },
            Err(e)
                if matches!(
                    e,
                    AgentError::Connection(_) | AgentError::Closed { .. } | AgentError::Framed(_)
                ) =>
            {
                return Err(e);
            }
            Err(e) => {
                warn!(global_id = %g, version, "deployment failed: {e}");
                AgentMsg::Failed {
                    transfer,
                    error: e.to_string(),
                }
            }
        };
        write_msg(send, &reply).await?;
        Ok(())
    }

    /// A manifest sent as a delta against one this site holds.
    async fn rebuild_manifest(
        &self,
        base: &HeldVersion,
        delta: &[u8],
        id: [u8; 32],
    ) -> Result<Manifest, String> {
        let db = self.db.clone();
        let (base, delta) = (*base, delta.to_vec());
        tokio::task::spawn_blocking(move || {
            let m = db
                .manifest(&base.global_id, base.version)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| {
                    format!(
                        "cannot rebuild the manifest: this site does not hold {}@{}",
                        base.global_id, base.version
                    )
                })?;
            Manifest::from_delta(&m, &delta, &id)
                .map_err(|e| format!("cannot rebuild the manifest: {e}"))
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Ask for what is missing, wait for it, assemble, publish. Returns the local id and the
    /// payload bytes received.
    async fn receive_and_publish(
        &self,
        conn: &Connection,
        send: &mut SendStream,
        slot: &Slot,
        transfer_id: u64,
        manifest: Manifest,
    ) -> Result<(String, u64), AgentError> {
        let g = manifest.global_id;
        let manifest_id = manifest
            .id()
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let held = self.db.held(&g)?;

        // Already published here (a repeated deployment): nothing to move.
        if let Some(h) = &held
            && h.version == manifest.version
            && h.manifest_id == manifest_id
            && self.still_there(h, &manifest).await
        {
            write_msg(
                send,
                &AgentMsg::NeedFrom {
                    transfer: transfer_id,
                    chunks: vec![],
                    bases_from: vec![],
                    unavailable: vec![],
                },
            )
            .await?;
            return Ok((h.local_id.clone(), 0));
        }

        // What is missing: not in the cache, and not in an image this site holds (seeds).
        let seeds = Arc::new(SeedIndex::build(&self.db, self.adapter.as_ref()).await?);
        let db = self.db.clone();
        let sd = seeds.clone();
        let planned = tokio::task::spawn_blocking(move || plan(&db, &sd, transfer_id, manifest))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        let (transfer, bases_from, unavailable) = match planned {
            Ok(p) => p,
            Err(e) => {
                // Answer first so the engine's exchange stays in step, then fail.
                write_msg(
                    send,
                    &AgentMsg::NeedFrom {
                        transfer: transfer_id,
                        chunks: vec![],
                        bases_from: vec![],
                        unavailable: vec![],
                    },
                )
                .await?;
                return Err(e);
            }
        };
        debug!(need = transfer.need().len(), "asking for missing chunks");
        let need = transfer.need().to_vec();
        let (tx, rx) = oneshot::channel();
        let complete = transfer.is_complete();
        *slot.lock().expect("slot lock") = Some(Active {
            transfer,
            seeds,
            done: Some(tx),
        });
        write_msg(
            send,
            &AgentMsg::NeedFrom {
                transfer: transfer_id,
                chunks: need,
                bases_from,
                unavailable,
            },
        )
        .await?;
        if !complete {
            tokio::select! {
                r = rx => match r {
                    Ok(Ok(())) => {}
                    Ok(Err(why)) => return Err(AgentError::Protocol(why)),
                    Err(_) => return Err(AgentError::Internal("transfer abandoned".into())),
                },
                e = conn.closed() => return Err(e.into()),
            }
        }
        let active = slot
            .lock()
            .expect("slot lock")
            .take()
            .ok_or_else(|| AgentError::Internal("transfer vanished".into()))?;
        let bytes_received = active.transfer.bytes_received();
        let manifest = active.transfer.into_manifest();

        // Assemble and verify every file, then hand the image to the service.
        let db = self.db.clone();
        let staging = self
            .adapter
            .staging_root()
            .join(format!("t{transfer_id}-{}", uuid::Uuid::new_v4().simple()));
        let m2 = manifest.clone();
        let image = tokio::task::spawn_blocking(move || {
            db.flush_chunks()?;
            Ok::<_, AgentError>(assemble(&db, &m2, staging)?)
        })
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))??;
        let local_id = match &held {
            Some(h) => self.adapter.update(&h.local_id, image).await?,
            None => self.adapter.publish(image).await?,
        };
        let rec = HeldRecord {
            version: manifest.version,
            manifest_id,
            local_id: local_id.clone(),
            adapter: self.adapter.kind().to_string(),
        };
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.put_held(&g, &rec, &manifest))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))??;
        info!(global_id = %g, %local_id, bytes_received, "published");
        Ok((local_id, bytes_received))
    }

    /// Is a held image still present in the service (an operator may have deleted it)?
    async fn still_there(&self, h: &HeldRecord, m: &Manifest) -> bool {
        match m.files.first() {
            Some(f) => self.adapter.read_back(&h.local_id, &f.path).await.is_ok(),
            None => false,
        }
    }
}

/// Accept the engine's data streams for as long as the connection lives.
async fn accept_data_streams(
    conn: Connection,
    slot: Slot,
    db: Arc<AgentDb>,
    chunking: ChunkerConfig,
) -> Result<(), AgentError> {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            s = conn.accept_uni() => {
                let recv = s?;
                let (slot, db) = (slot.clone(), db.clone());
                tasks.spawn(async move {
                    if let Err(e) = data_stream(recv, &slot, &db, chunking.max).await {
                        debug!("data stream ended: {e}");
                    }
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// Fail the active transfer (if it is `transfer`) with a reason.
fn fail(slot: &Slot, transfer: u64, why: String) {
    if let Some(a) = slot.lock().expect("slot lock").as_mut()
        && a.transfer.id() == transfer
    {
        a.finish(Err(why));
    }
}

/// Decide what to ask for: chunks neither cached nor readable from a held image (those
/// found in one are read, checked and cached now), and which held version can serve as delta
/// bases. Blocking.
type Plan = (Transfer, Vec<HeldVersion>, Vec<ChunkId>);

fn plan(
    db: &AgentDb,
    seeds: &SeedIndex,
    transfer_id: u64,
    manifest: Manifest,
) -> Result<Plan, AgentError> {
    let g = manifest.global_id;
    let mut err = None;
    let mut seeded = Vec::new();
    let t = Transfer::new(transfer_id, manifest, |id| match db.has_chunk(id) {
        Ok(true) => true,
        Ok(false) => match seeds.read(id) {
            Some(v) => {
                seeded.push(v);
                true
            }
            None => false,
        },
        Err(e) => {
            err.get_or_insert(e);
            false
        }
    });
    if let Some(e) = err {
        return Err(e.into());
    }
    let t = t.map_err(|e| AgentError::Protocol(format!("invalid manifest: {e}")))?;
    if !seeded.is_empty() {
        debug!(chunks = seeded.len(), "reused from images held here");
        db.put_chunks(&seeded)?;
    }
    let mut bases_from = Vec::new();
    let mut unavailable = Vec::new();
    if let Some(version) = seeds.held_version(&g)
        && let Some(m) = db.manifest(&g, version)?
    {
        bases_from.push(HeldVersion {
            global_id: g,
            version,
        });
        for id in m.chunks().keys() {
            if !seeds.has(id) && !db.has_chunk(id)? {
                unavailable.push(*id);
            }
        }
    }
    Ok((t, bases_from, unavailable))
}

/// A base chunk's bytes: from the cache, else from a held image.
fn base_bytes(db: &AgentDb, seeds: &SeedIndex, id: &ChunkId) -> Result<Bytes, String> {
    if let Some(b) = db.chunk(id).map_err(|e| e.to_string())? {
        return Ok(Bytes::copy_from_slice(&b));
    }
    seeds
        .read(id)
        .map(|v| v.raw().clone())
        .ok_or_else(|| format!("base chunk {id} is not available at this site"))
}

/// Verify and cache what a data record carried; returns the chunks it completed.
fn accept_record(
    db: &AgentDb,
    seeds: &SeedIndex,
    record: &DataRecord,
    payload: Bytes,
    max_raw: u32,
) -> Result<Vec<ChunkId>, String> {
    match record {
        DataRecord::Chunk(h) => {
            let v = UnverifiedChunk(CompressedChunk {
                id: h.id,
                raw_len: h.raw_len,
                encoding: h.encoding,
                payload,
            })
            .verify(max_raw)
            .map_err(|e| e.to_string())?;
            db.put_chunks(std::slice::from_ref(&v))
                .map_err(|e| e.to_string())?;
            Ok(vec![h.id])
        }
        DataRecord::Group(g) => {
            let mut base = Vec::new();
            for id in &g.base {
                base.extend_from_slice(&base_bytes(db, seeds, id)?);
                if base.len() > GroupHeader::MAX_BASE_BYTES {
                    return Err(format!(
                        "delta group bases exceed {} bytes",
                        GroupHeader::MAX_BASE_BYTES
                    ));
                }
            }
            let lens: Vec<u32> = g.chunks.iter().map(|(_, l)| *l).collect();
            let parts =
                decode_group(&base, &payload, &lens).map_err(|e| format!("delta group: {e}"))?;
            let verified = g
                .chunks
                .iter()
                .zip(parts)
                .map(|((id, _), raw)| VerifiedChunk::check(*id, raw).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            db.put_chunks(&verified).map_err(|e| e.to_string())?;
            Ok(g.chunks.iter().map(|(id, _)| *id).collect())
        }
    }
}

async fn data_stream(
    mut recv: RecvStream,
    slot: &Slot,
    db: &Arc<AgentDb>,
    max_raw: u32,
) -> Result<(), AgentError> {
    let DataStreamHeader { transfer } = read_msg_required(&mut recv).await?;
    loop {
        let record: DataRecord = match read_msg(&mut recv).await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => {
                fail(slot, transfer, format!("data stream: {e}"));
                return Err(e.into());
            }
        };
        // Check the header against what was asked for before reading the payload.
        let admitted = {
            let mut g = slot.lock().expect("slot lock");
            match g.as_mut() {
                Some(a) if a.transfer.id() == transfer => match &record {
                    DataRecord::Chunk(h) => a.transfer.admit(h),
                    DataRecord::Group(gh) => a.transfer.admit_group(gh),
                }
                .map(|()| a.seeds.clone())
                .map_err(|e| e.to_string()),
                _ => Err(format!("no transfer {transfer} in progress")),
            }
        };
        let seeds = match admitted {
            Ok(s) => s,
            Err(why) => {
                fail(slot, transfer, why.clone());
                let _ = recv.stop(VarInt::from_u32(close::PROTOCOL));
                return Err(AgentError::Protocol(why));
            }
        };
        let payload_len = match &record {
            DataRecord::Chunk(h) => h.payload_len,
            DataRecord::Group(g) => g.payload_len,
        };
        let payload = read_payload(&mut recv, payload_len as usize).await?;
        let db2 = db.clone();
        let rec2 = record.clone();
        let accepted = tokio::task::spawn_blocking(move || {
            accept_record(&db2, &seeds, &rec2, payload, max_raw)
        })
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))?;
        let mut g = slot.lock().expect("slot lock");
        let Some(a) = g.as_mut().filter(|a| a.transfer.id() == transfer) else {
            return Ok(());
        };
        match accepted {
            Ok(ids) => {
                let mut done = false;
                for (i, id) in ids.iter().enumerate() {
                    // The payload counts once, with the record's first chunk.
                    done = a
                        .transfer
                        .complete_chunk(id, if i == 0 { payload_len } else { 0 });
                }
                if done {
                    a.finish(Ok(()));
                }
            }
            Err(why) => {
                match &record {
                    DataRecord::Chunk(h) => a.transfer.reject(&h.id),
                    DataRecord::Group(gh) => {
                        gh.chunks.iter().for_each(|(id, _)| a.transfer.reject(id))
                    }
                }
                a.finish(Err(format!("refused data: {why}")));
                return Err(AgentError::Protocol(why));
            }
        }
    }
}
