//! Accepting connections and handing each to its role, once it has said who it is.
//!
//! Every connection's first stream carries a hello ([`crate::handshake`]); only after it
//! is accepted does a connection become a client session, an enrollment or an agent
//! session. No image byte moves on a connection that has not passed this.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use quinn::{Connection, VarInt};
use seedcast_core::protocol::{MAX_ADAPTER_NAME, RefuseReason, Role, close};
use seedcast_net::congestion::Choice;
use seedcast_net::pki::secrets_match;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info};

use crate::handshake::{read_hello, refuse, refuse_other_version};
use crate::sites::{Enrollment, check_agent, enroll};
use crate::state::Shared;
use crate::{EngineError, agent_session, client_api};

pub(crate) async fn run(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    shutdown: impl Future<Output = ()>,
) -> Result<(), EngineError> {
    info!(engine = %shared.id, addr = ?endpoint.local_addr().ok(), "engine serving");
    let mut tasks = JoinSet::new();
    // Each connection gets its own congestion-controller choice, set once the peer is
    // known to be a site (see `seedcast_net::congestion`).
    let base = seedcast_net::tls::server_config(&shared.pki, &shared.cfg.transport)?;
    let unauthenticated = Arc::new(Semaphore::new(shared.cfg.max_unauthenticated.max(1)));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            incoming = endpoint.accept() => match incoming {
                Some(inc) => {
                    // QUIC address validation: a peer that has not shown it receives at
                    // its source address is sent a Retry (one round trip, no state kept),
                    // so a spoofed flood costs the engine neither handshakes nor memory.
                    if !inc.remote_address_validated() && inc.may_retry() {
                        if let Err(e) = inc.retry() {
                            debug!("retry failed: {e}");
                        }
                        continue;
                    }
                    // Peers not yet authenticated hold a permit each; beyond the cap new
                    // ones are refused (the authenticated keep their connections).
                    let Ok(permit) = unauthenticated.clone().try_acquire_owned() else {
                        debug!(remote = %inc.remote_address(), "too many unauthenticated connections; refused");
                        inc.refuse();
                        continue;
                    };
                    let shared = shared.clone();
                    let choice = Choice::default();
                    let mut sc = base.clone();
                    sc.transport_config(shared.cfg.transport.to_config_choosing(choice.clone()));
                    let connecting = match inc.accept_with(Arc::new(sc)) {
                        Ok(c) => c,
                        Err(e) => {
                            debug!("accept failed: {e}");
                            continue;
                        }
                    };
                    tasks.spawn(async move {
                        match connecting.await {
                            Ok(conn) => handle_connection(shared, conn, choice, permit).await,
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
    shared.agents.lock().clear();
    endpoint.wait_idle().await;
    Ok(())
}

/// Read the hello and authenticate; `permit` (one of the unauthenticated connections
/// allowed) is given back once the peer has proven who it is, or has been sent away.
async fn handle_connection(
    shared: Arc<Shared>,
    conn: Connection,
    congestion: Choice,
    permit: OwnedSemaphorePermit,
) {
    let Some((mut send, recv, hello)) = read_hello(&conn).await else {
        return;
    };
    if refuse_other_version(&conn, &mut send, &hello).await {
        return;
    }
    let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    if let Role::Agent { adapter, .. } | Role::Enroll { adapter, .. } = &hello.role
        && !valid_adapter_name(adapter)
    {
        let msg = format!(
            "adapter name of {} bytes: give 1-{MAX_ADAPTER_NAME} characters from a-z, 0-9, '-', '_'",
            adapter.len()
        );
        refuse(&conn, &mut send, RefuseReason::BadRequest, msg).await;
        return;
    }
    match hello.role {
        Role::Client { admin_secret } => {
            if !secrets_match(&admin_secret, &shared.pki.admin.secret) {
                let msg = "invalid admin token".to_string();
                refuse(&conn, &mut send, RefuseReason::BadToken, msg).await;
                return;
            }
            drop(permit);
            client_api::session(shared, conn, send, recv).await;
        }
        Role::Enroll {
            secret,
            site,
            adapter,
            csr_der,
        } => {
            let e = Enrollment {
                secret: &secret,
                site: &site,
                adapter: &adapter,
                csr_der: &csr_der,
            };
            enroll(&shared, &conn, send, e).await;
            drop(permit);
        }
        Role::Agent { site, adapter } => {
            if let Err((reason, msg)) = check_agent(&shared, &conn, &site) {
                refuse(&conn, &mut send, reason, msg).await;
                return;
            }
            drop(permit);
            let agent = agent_session::Connected {
                conn,
                conn_id,
                site,
                adapter,
                send,
                recv,
                congestion,
            };
            agent_session::session(shared, agent).await;
        }
    }
}

/// Adapter names are shown to operators: short, and nothing a terminal would interpret.
fn valid_adapter_name(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= MAX_ADAPTER_NAME
        && a.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}
