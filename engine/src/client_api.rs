//! One client session: each request on its own bidirectional stream (so a slow upload
//! never blocks a status query), dispatched to the module that answers it.

use std::sync::Arc;

use quinn::{Connection, RecvStream, SendStream};
use seedcast_core::protocol::{ErrorKind, ImageStatus, Request, Response};
use seedcast_net::{FramedError, read_msg_required, write_msg};
use tokio::task::JoinSet;
use tracing::debug;

use crate::handshake::{close_for_violation, welcome};
use crate::state::Shared;
use crate::upload::{UploadError, Uploaded};
use crate::versions::{self, Draft};
use crate::{EngineError, adapt, sites, status, upload};

pub(crate) async fn session(
    shared: Arc<Shared>,
    conn: Connection,
    mut send: SendStream,
    _recv: RecvStream,
) {
    if write_msg(&mut send, &welcome(&shared)).await.is_err() {
        return;
    }
    let _ = send.finish();
    let uploaded = Arc::new(Uploaded::default());
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

/// The answer to an upload (what was stored, counted for the next commit; or why not). A
/// stream that broke the framing is answered too, and closes the connection.
async fn upload_answer(
    send: &mut SendStream,
    r: Result<(upload::Inserted, u64), UploadError>,
    uploaded: &Uploaded,
) -> Result<Result<Response, EngineError>, FramedError> {
    match r {
        Ok((added, bytes)) => {
            uploaded.add(bytes);
            Ok(Ok(Response::Uploaded {
                stored: added.chunks,
                bytes,
            }))
        }
        Err(UploadError::Framing(e)) => {
            let refused = Response::Error {
                kind: ErrorKind::Invalid,
                message: e.to_string(),
            };
            let _ = write_msg(send, &refused).await;
            Err(e)
        }
        Err(UploadError::Engine(e)) => Ok(Err(e)),
    }
}

/// Read one request, answer it, finish the stream.
async fn request(
    shared: &Arc<Shared>,
    mut send: SendStream,
    mut recv: RecvStream,
    uploaded: &Uploaded,
) -> Result<(), FramedError> {
    let resp = match read_msg_required::<Request>(&mut recv).await? {
        Request::Watch { global_id, version } => {
            return status::watch(shared, &mut send, global_id, version).await;
        }
        Request::Upload { count } => {
            let r = upload::receive(shared, &mut recv, count).await;
            upload_answer(&mut send, r.map(|a| (a, a.bytes)), uploaded).await?
        }
        Request::UploadRecords { count } => {
            let r = upload::receive_records(shared, &mut recv, count).await;
            upload_answer(&mut send, r, uploaded).await?
        }
        Request::Missing { chunks } => {
            upload::missing(shared, &chunks).map(|chunks| Response::Missing { chunks })
        }
        Request::Commit(c) => {
            let bytes = uploaded.take();
            let draft = Draft {
                files: c.files,
                change: "push".into(),
                bytes_uploaded: bytes,
            };
            let f = move |sh: &Shared| versions::first(sh, c.name, c.sites, draft);
            committed(versions::make(shared, f).await, uploaded, bytes)
        }
        Request::Adapt(a) => {
            let bytes = uploaded.take();
            let f = move |sh: &Shared| adapt::adapt(sh, a, bytes);
            committed(versions::make(shared, f).await, uploaded, bytes)
        }
        Request::Rollback { global_id, to } => {
            let f = move |sh: &Shared| adapt::rollback(sh, global_id, to);
            committed(versions::make(shared, f).await, uploaded, 0)
        }
        Request::History { global_id } => adapt::history(shared, &global_id).map(Response::History),
        Request::Status { global_id: Some(g) } => status::image(shared, &g).map(Response::Image),
        Request::Status { global_id: None } => status::images(shared).map(Response::Images),
        Request::Sites => status::sites(shared).map(Response::Sites),
        Request::Revoke { site } => sites::revoke(shared, &site).map(|()| Response::Revoked),
        Request::SiteSet {
            site,
            max_rate,
            congestion,
        } => sites::set(shared, &site, max_rate, congestion).and_then(|set| {
            // A site added but not yet enrolled is not listed by `sites`: answer for it too.
            let info = status::sites(shared)?
                .into_iter()
                .find(|i| i.site == site)
                .unwrap_or(seedcast_core::protocol::SiteInfo {
                    site,
                    adapter: String::new(),
                    connected: false,
                    revoked: false,
                    enrolled: false,
                    cert_expires_unix: 0,
                    max_rate: set.max_rate,
                    congestion: set.congestion,
                });
            Ok(Response::Sites(vec![info]))
        }),
        Request::SiteAdd { site, expires_secs } => {
            sites::add(shared, &site, expires_secs).map(|(token, expires_unix)| {
                Response::SiteToken {
                    site,
                    token,
                    expires_unix,
                }
            })
        }
        Request::SiteReset { site } => sites::reset(shared, &site).map(|()| Response::Done),
        Request::BenchSite { site, seconds } => crate::probe::bench_site(shared, &site, seconds)
            .await
            .map(Response::SiteBench),
    };
    write_msg(&mut send, &resp.unwrap_or_else(|e| e.response())).await?;
    let _ = send.finish();
    Ok(())
}

/// A new version's answer; a version that was not made gives its upload back to the next.
fn committed(
    made: Result<ImageStatus, EngineError>,
    uploaded: &Uploaded,
    bytes: u64,
) -> Result<Response, EngineError> {
    made.map(Response::Committed)
        .inspect_err(|_| uploaded.give_back(bytes))
}
