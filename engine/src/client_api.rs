//! Client requests: which chunks are missing, uploads, commits, status, sites, watch, revoke.
//!
//! One request per bidirectional stream, so a slow upload never blocks a status query.
//! Uploaded chunks are verified (decoded and hashed) before the store sees them; a batch
//! with any bad chunk is refused whole.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream, VarInt};
use seedcast_core::manifest::{MANIFEST_FORMAT, validate_files, validate_image_name};
use seedcast_core::protocol::{
    ChunkHeader, CommitRequest, MAX_IDS_PER_REQUEST, MAX_UPLOAD_BATCH, Request, Response, close,
};
use seedcast_core::{CompressedChunk, GlobalId, Manifest, UnverifiedChunk};
use seedcast_net::{FramedError, read_msg_required, read_payload, write_msg};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::catalog::{ImageCommit, ImageRecord, ManifestRecord, PlacementRecord, unix_now};
use crate::server::close_for_violation;
use crate::{EngineError, Shared, status};

pub(crate) async fn session(
    shared: Arc<Shared>,
    conn: Connection,
    mut send: SendStream,
    _recv: RecvStream,
) {
    if write_msg(&mut send, &crate::server::welcome(&shared))
        .await
        .is_err()
    {
        return;
    }
    let _ = send.finish();
    // Bytes this connection uploaded since its last commit: reported by that commit.
    let uploaded = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let (shared, conn, uploaded) = (shared.clone(), conn.clone(), uploaded.clone());
                    tasks.spawn(async move {
                        if let Err(e) = request(&shared, send, recv, &uploaded).await {
                            if e.is_protocol_violation() {
                                close_for_violation(&conn, &e);
                            } else {
                                debug!("client stream ended: {e}");
                            }
                        }
                    });
                }
                Err(e) => {
                    debug!("client connection ended: {e}");
                    break;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

fn error_response(e: &EngineError) -> Response {
    Response::Error {
        kind: e.kind(),
        message: e.to_string(),
    }
}

async fn request(
    shared: &Arc<Shared>,
    mut send: SendStream,
    mut recv: RecvStream,
    uploaded: &AtomicU64,
) -> Result<(), FramedError> {
    let req: Request = read_msg_required(&mut recv).await?;
    let resp = match req {
        Request::Missing { chunks } => {
            if chunks.len() > MAX_IDS_PER_REQUEST {
                Response::Error {
                    kind: seedcast_core::protocol::ErrorKind::Invalid,
                    message: format!("at most {MAX_IDS_PER_REQUEST} ids per request"),
                }
            } else {
                Response::Missing {
                    chunks: shared.store.missing(&chunks),
                }
            }
        }
        Request::Upload { count } => match upload(shared, &mut recv, count).await {
            Ok((stored, bytes)) => {
                uploaded.fetch_add(bytes, Ordering::Relaxed);
                Response::Uploaded { stored, bytes }
            }
            Err(UploadError::Framing(e)) => {
                let _ = write_msg(
                    &mut send,
                    &Response::Error {
                        kind: seedcast_core::protocol::ErrorKind::Invalid,
                        message: e.to_string(),
                    },
                )
                .await;
                return Err(e);
            }
            Err(UploadError::Engine(e)) => error_response(&e),
        },
        Request::Commit(c) => {
            let bytes = uploaded.swap(0, Ordering::Relaxed);
            match commit(shared, c, bytes).await {
                Ok(s) => Response::Committed(s),
                Err(e) => {
                    uploaded.fetch_add(bytes, Ordering::Relaxed);
                    error_response(&e)
                }
            }
        }
        Request::Status { global_id: Some(g) } => match status::image(shared, &g) {
            Ok(s) => Response::Image(s),
            Err(e) => error_response(&e),
        },
        Request::Status { global_id: None } => match status::images(shared) {
            Ok(v) => Response::Images(v),
            Err(e) => error_response(&e),
        },
        Request::Sites => match status::sites(shared) {
            Ok(v) => Response::Sites(v),
            Err(e) => error_response(&e),
        },
        Request::Watch { global_id, version } => {
            return watch(shared, &mut send, global_id, version).await;
        }
        Request::Revoke { site } => match revoke(shared, &site) {
            Ok(()) => Response::Revoked,
            Err(e) => error_response(&e),
        },
        Request::Adapt(a) => {
            let g = a.global_id;
            let bytes = uploaded.swap(0, Ordering::Relaxed);
            let r = new_version(shared, g, move |sh| crate::adapt::adapt(sh, a, bytes)).await;
            if r.is_err() {
                uploaded.fetch_add(bytes, Ordering::Relaxed);
            }
            match r {
                Ok(s) => Response::Committed(s),
                Err(e) => error_response(&e),
            }
        }
        Request::Rollback { global_id, to } => {
            match new_version(shared, global_id, move |sh| {
                crate::adapt::rollback(sh, global_id, to)
            })
            .await
            {
                Ok(s) => Response::Committed(s),
                Err(e) => error_response(&e),
            }
        }
        Request::History { global_id } => match crate::adapt::history(shared, &global_id) {
            Ok(v) => Response::History(v),
            Err(e) => error_response(&e),
        },
    };
    write_msg(&mut send, &resp).await?;
    let _ = send.finish();
    Ok(())
}

enum UploadError {
    Framing(FramedError),
    Engine(EngineError),
}

impl From<FramedError> for UploadError {
    fn from(e: FramedError) -> Self {
        UploadError::Framing(e)
    }
}

/// Read `count` chunk records, verify them on a blocking thread, store the new ones.
async fn upload(
    shared: &Arc<Shared>,
    recv: &mut RecvStream,
    count: u32,
) -> Result<(u32, u64), UploadError> {
    if count > MAX_UPLOAD_BATCH {
        return Err(UploadError::Engine(EngineError::Invalid(format!(
            "upload of {count} chunks exceeds the batch limit {MAX_UPLOAD_BATCH}"
        ))));
    }
    let max_raw = shared.cfg.chunking.max;
    let mut chunks = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let h: ChunkHeader = read_msg_required(recv).await?;
        if h.payload_len > ChunkHeader::MAX_PAYLOAD {
            return Err(UploadError::Engine(EngineError::Invalid(format!(
                "chunk {} payload of {} bytes exceeds the limit",
                h.id, h.payload_len
            ))));
        }
        let payload = read_payload(recv, h.payload_len as usize).await?;
        chunks.push(UnverifiedChunk(CompressedChunk {
            id: h.id,
            raw_len: h.raw_len,
            encoding: h.encoding,
            payload,
        }));
    }
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let verified = chunks
            .into_iter()
            .map(|c| c.verify(max_raw))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EngineError::Invalid(format!("upload refused: {e}")))?;
        Ok::<_, EngineError>(shared.store.insert(&verified, &shared.catalog)?)
    })
    .await
    .map_err(|e| UploadError::Engine(EngineError::Internal(e.to_string())))?
    .map_err(UploadError::Engine)
}

/// Resolve the target sites of a commit: every known site in good standing, or the named
/// ones (each must exist).
fn resolve_sites(shared: &Shared, wanted: Option<Vec<String>>) -> Result<Vec<String>, EngineError> {
    let known = shared.catalog.sites()?;
    match wanted {
        None => Ok(known
            .into_iter()
            .filter(|(_, r)| !r.revoked)
            .map(|(n, _)| n)
            .collect()),
        Some(list) => {
            let mut out = BTreeSet::new();
            for s in list {
                match known.iter().find(|(n, _)| *n == s) {
                    Some((_, r)) if !r.revoked => {
                        out.insert(s);
                    }
                    Some(_) => return Err(EngineError::Invalid(format!("site {s:?} is revoked"))),
                    None => return Err(EngineError::UnknownSite(s)),
                }
            }
            Ok(out.into_iter().collect())
        }
    }
}

async fn commit(
    shared: &Arc<Shared>,
    c: CommitRequest,
    bytes_uploaded: u64,
) -> Result<seedcast_core::protocol::ImageStatus, EngineError> {
    let shared2 = shared.clone();
    let (gid, sites) =
        tokio::task::spawn_blocking(move || commit_blocking(&shared2, c, bytes_uploaded))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))??;
    for s in &sites {
        shared.wake_site(s);
    }
    shared.changed();
    status::image(shared, &gid)
}

fn commit_blocking(
    shared: &Shared,
    c: CommitRequest,
    bytes_uploaded: u64,
) -> Result<(GlobalId, Vec<String>), EngineError> {
    let chunking = shared.cfg.chunking;
    validate_image_name(&c.name).map_err(|e| EngineError::Invalid(e.to_string()))?;
    validate_files(&c.files, &chunking).map_err(|e| EngineError::Invalid(e.to_string()))?;
    let ids = crate::adapt::check_chunks(shared, &c.files)?;
    let sites = resolve_sites(shared, c.sites)?;
    let gid = loop {
        let g = GlobalId(rand::random());
        if !shared.catalog.image_exists(&g)? {
            break g;
        }
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        global_id: gid,
        version: 1,
        parent: None,
        name: c.name.clone(),
        chunking,
        files: c.files,
    };
    let manifest_id = manifest
        .id()
        .map_err(|e| EngineError::Internal(e.to_string()))?;
    let now = unix_now();
    let image = ImageRecord {
        name: c.name,
        current_version: 1,
        sites: sites.clone(),
        created_unix: now,
    };
    let mrec = ManifestRecord {
        manifest,
        manifest_id,
        bytes_uploaded,
        created_unix: now,
    };
    let chunk_refs = shared.store.with_ref(ids);
    shared.catalog.commit_image(ImageCommit {
        global_id: gid,
        image: &image,
        manifest: &mrec,
        placements: sites
            .iter()
            .map(|s| (s.clone(), PlacementRecord::pending(1)))
            .collect(),
        chunk_refs: chunk_refs.clone(),
        note: &crate::catalog::VersionNote {
            change: "push".into(),
        },
    })?;
    shared.store.apply_refs(&chunk_refs);
    info!(global_id = %gid, name = %image.name, sites = ?sites, "image committed");
    Ok((gid, sites))
}

/// Make a new version on a blocking thread (one at a time per engine, so two blocks for
/// the same image cannot both build on the same parent), then wake its sites.
async fn new_version(
    shared: &Arc<Shared>,
    g: GlobalId,
    f: impl FnOnce(&Shared) -> Result<(u32, Vec<String>), EngineError> + Send + 'static,
) -> Result<seedcast_core::protocol::ImageStatus, EngineError> {
    let sh = shared.clone();
    let (_, sites) = tokio::task::spawn_blocking(move || {
        let _one_at_a_time = sh.versions.lock().expect("versions lock");
        f(&sh)
    })
    .await
    .map_err(|e| EngineError::Internal(e.to_string()))??;
    for s in &sites {
        shared.wake_site(s);
    }
    shared.changed();
    status::image(shared, &g)
}

/// Send `Progress` until every target site of `version` is published or failed.
async fn watch(
    shared: &Arc<Shared>,
    send: &mut SendStream,
    g: GlobalId,
    version: u32,
) -> Result<(), FramedError> {
    let mut rx = shared.changes.subscribe();
    loop {
        let s = match status::image(shared, &g) {
            Ok(s) => s,
            Err(e) => {
                write_msg(send, &error_response(&e)).await?;
                let _ = send.finish();
                return Ok(());
            }
        };
        // Done when every site this version targets is published or failed (sites left
        // out of it, e.g. revoked since, are not waited for).
        let done = s
            .sites
            .iter()
            .filter(|p| p.version == version)
            .all(|p| p.state.is_final());
        write_msg(send, &Response::Progress(s)).await?;
        if done {
            let _ = send.finish();
            return Ok(());
        }
        // Wake on a state change, or every 200 ms to report bytes sent.
        let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
    }
}

fn revoke(shared: &Shared, site: &str) -> Result<(), EngineError> {
    let mut rec = shared
        .catalog
        .site(site)?
        .ok_or_else(|| EngineError::UnknownSite(site.to_string()))?;
    rec.revoked = true;
    shared.catalog.put_site(site, &rec)?;
    if let Some(h) = shared.agents.lock().expect("agents lock").remove(site) {
        h.conn.close(
            VarInt::from_u32(close::REFUSED),
            format!("site {site:?} has been revoked").as_bytes(),
        );
    }
    warn!(site, "site revoked");
    shared.changed();
    Ok(())
}
