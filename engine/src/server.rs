//! Accepting connections and deciding who they are, before anything else happens.
//!
//! Every connection's first stream carries a [`Hello`]. The engine answers it (or refuses,
//! then closes the connection with a [`close`] code naming why) within [`HELLO_TIMEOUT`];
//! only then does a connection become a client session or an agent session. No image byte
//! moves on a connection that has not passed this.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use quinn::{Connection, SendStream, VarInt};
use seedcast_core::protocol::{Hello, HelloReply, PROTOCOL_VERSION, RefuseReason, Role, close};
use seedcast_net::pki::{fingerprint, secrets_match, validate_site_name};
use seedcast_net::{FramedError, read_msg_required, write_msg};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::catalog::Catalog;
use crate::{EngineError, Shared, agent_session, client_api};

/// How long a dialer has to complete the handshake and say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn run(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    shutdown: impl Future<Output = ()>,
) -> Result<(), EngineError> {
    info!(engine = %shared.id, addr = ?endpoint.local_addr().ok(), "engine serving");
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            incoming = endpoint.accept() => match incoming {
                Some(inc) => {
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        match inc.await {
                            Ok(conn) => handle_connection(shared, conn).await,
                            Err(e) => debug!("handshake failed: {e}"),
                        }
                    });
                }
                None => break,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    info!("engine shutting down");
    endpoint.close(VarInt::from_u32(close::SHUTDOWN), b"engine shutting down");
    tasks.shutdown().await;
    shared.agents.lock().expect("agents lock").clear();
    endpoint.wait_idle().await;
    Ok(())
}

/// The reply to an accepted hello.
pub(crate) fn welcome(shared: &Shared) -> HelloReply {
    HelloReply::Welcome {
        protocol: PROTOCOL_VERSION,
        engine_id: shared.id.clone(),
        chunking: shared.cfg.chunking,
    }
}

/// Refuse a dialer: tell it why on the control stream, give it a moment to read that, close.
pub(crate) async fn refuse(
    conn: &Connection,
    send: &mut SendStream,
    reason: RefuseReason,
    message: String,
) {
    let code = match reason {
        RefuseReason::ProtocolVersion => close::VERSION,
        RefuseReason::BadRequest => close::PROTOCOL,
        _ => close::REFUSED,
    };
    info!(remote = %conn.remote_address(), ?reason, "refused: {message}");
    let _ = write_msg(
        send,
        &HelloReply::Refused {
            reason,
            message: message.clone(),
        },
    )
    .await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(VarInt::from_u32(code), message.as_bytes());
}

/// Close a connection whose peer broke the framing rules, saying what was wrong.
pub(crate) fn close_for_violation(conn: &Connection, e: &FramedError) {
    warn!(remote = %conn.remote_address(), "protocol violation: {e}");
    conn.close(VarInt::from_u32(close::PROTOCOL), e.to_string().as_bytes());
}

async fn handle_connection(shared: Arc<Shared>, conn: Connection) {
    let first = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await?;
        let hello: Hello = read_msg_required(&mut recv).await?;
        Ok::<_, FramedError>((send, recv, hello))
    })
    .await;
    let (mut send, recv, hello) = match first {
        Err(_) => {
            conn.close(VarInt::from_u32(close::PROTOCOL), b"no hello in time");
            return;
        }
        Ok(Err(e)) => {
            if e.is_protocol_violation() {
                close_for_violation(&conn, &e);
            }
            return;
        }
        Ok(Ok(x)) => x,
    };
    if hello.protocol != PROTOCOL_VERSION {
        let msg = format!(
            "protocol version mismatch: the engine speaks {PROTOCOL_VERSION}, the peer {}",
            hello.protocol
        );
        refuse(&conn, &mut send, RefuseReason::ProtocolVersion, msg).await;
        return;
    }
    let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    match hello.role {
        Role::Client { admin_secret } => {
            if !secrets_match(&admin_secret, &shared.pki.admin.secret) {
                refuse(
                    &conn,
                    &mut send,
                    RefuseReason::BadToken,
                    "invalid admin token".into(),
                )
                .await;
                return;
            }
            client_api::session(shared, conn, send, recv).await;
        }
        Role::Enroll {
            join_secret,
            site,
            adapter,
            csr_der,
        } => {
            enroll(
                &shared,
                &conn,
                send,
                &join_secret,
                &site,
                &adapter,
                &csr_der,
            )
            .await
        }
        Role::Agent { site, adapter } => {
            if let Err((reason, msg)) = check_agent(&shared.catalog, &conn, &site) {
                refuse(&conn, &mut send, reason, msg).await;
                return;
            }
            agent_session::session(shared, conn, conn_id, site, adapter, send, recv).await;
        }
    }
}

/// Is this connection's certificate the one issued to `site`, and is the site in good standing?
fn check_agent(
    catalog: &Catalog,
    conn: &Connection,
    site: &str,
) -> Result<(), (RefuseReason, String)> {
    let cert = seedcast_net::tls::peer_certificate(conn).ok_or((
        RefuseReason::BadToken,
        "no site certificate: enroll with the join token first".to_string(),
    ))?;
    let rec = catalog
        .site(site)
        .map_err(|e| (RefuseReason::BadRequest, e.to_string()))?
        .ok_or((
            RefuseReason::UnknownSite,
            format!("site {site:?} is not enrolled at this engine"),
        ))?;
    if rec.revoked {
        return Err((
            RefuseReason::Revoked,
            format!("site {site:?} has been revoked"),
        ));
    }
    if rec.cert_fingerprint != fingerprint(&cert) {
        return Err((
            RefuseReason::BadToken,
            format!(
                "certificate is not the one issued to site {site:?} (re-enrolled or revoked elsewhere)"
            ),
        ));
    }
    Ok(())
}

async fn enroll(
    shared: &Shared,
    conn: &Connection,
    mut send: SendStream,
    join_secret: &str,
    site: &str,
    adapter: &str,
    csr_der: &[u8],
) {
    if !secrets_match(join_secret, &shared.pki.join.secret) {
        refuse(
            conn,
            &mut send,
            RefuseReason::BadToken,
            "invalid join token".into(),
        )
        .await;
        return;
    }
    if let Err(e) = validate_site_name(site) {
        refuse(conn, &mut send, RefuseReason::BadRequest, e.to_string()).await;
        return;
    }
    let cert = match shared.pki.issue_site_cert(site, csr_der) {
        Ok(c) => c,
        Err(e) => {
            refuse(
                conn,
                &mut send,
                RefuseReason::BadRequest,
                format!("certificate request refused: {e}"),
            )
            .await;
            return;
        }
    };
    // A new enrollment of a known site replaces its certificate: the old one stops working.
    let rec = Catalog::new_site_record(adapter, fingerprint(&cert));
    if let Err(e) = shared.catalog.put_site(site, &rec) {
        refuse(
            conn,
            &mut send,
            RefuseReason::BadRequest,
            format!("catalog: {e}"),
        )
        .await;
        return;
    }
    if let Some(old) = shared.agents.lock().expect("agents lock").remove(site) {
        old.conn
            .close(VarInt::from_u32(close::REPLACED), b"site re-enrolled");
    }
    info!(site, adapter, "site enrolled");
    let reply = HelloReply::Enrolled {
        cert_der: cert.to_vec(),
        ca_der: shared.pki.ca_der().to_vec(),
    };
    if write_msg(&mut send, &reply).await.is_ok() {
        let _ = send.finish();
        // The agent closes once it has its certificate.
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    }
    shared.changed();
}
