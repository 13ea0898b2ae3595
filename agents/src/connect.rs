//! Reaching the engine: enroll once (a CSR signed with the site token), then dial with the
//! site certificate and stay connected, reconnecting with exponential backoff; renew the
//! certificate over the authenticated connection when a third of its life is left; stop
//! only on errors retrying cannot fix (refused, revoked, expired, misconfigured) or on
//! shutdown.

use std::future::Future;
use std::time::Duration;

use quinn::{Connection, VarInt};
use seedcast_core::protocol::{AgentMsg, EngineMsg, HelloReply, Role, close};
use seedcast_net::dial::{dial, hello};
use seedcast_net::pki::{PendingEnrollment, SiteCredentials, Token, fingerprint, unix_now};
use seedcast_net::{read_msg_limited, write_msg};
use tracing::{info, warn};

use crate::agent::Agent;
use crate::error::AgentError;

/// The first wait before reconnecting; it doubles up to `AgentConfig::reconnect_max`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// A welcomed session that lasted this long resets the backoff; one that ends sooner (the
/// engine closing it over and over, e.g. for a protocol violation) backs off as a failed
/// dial does, instead of reconnecting ten times a second for ever.
const STABLE_SESSION: Duration = Duration::from_secs(10);
/// Largest renewal answer (a certificate is about a kilobyte).
const MAX_RENEWED_FRAME: usize = 64 * 1024;

impl Agent {
    /// Credentials from the data dir, or enroll with the site token and keep them.
    pub async fn credentials(&self) -> Result<SiteCredentials, AgentError> {
        let Some(c) = SiteCredentials::load(&self.cfg.data)? else {
            let token = self.cfg.token.clone().ok_or_else(|| {
                AgentError::Config(
                    "this site is not enrolled yet: pass --token (a site token from `seedcast site add NAME`)".into(),
                )
            })?;
            return self.enroll(&token).await;
        };
        if c.expired(unix_now()) {
            return Err(AgentError::Expired {
                site: c.site,
                expired_unix: c.expires_unix,
            });
        }
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
        Ok(c)
    }

    async fn enroll(&self, token: &Token) -> Result<SiteCredentials, AgentError> {
        info!(site = %self.cfg.site, engine = %self.cfg.engine, "enrolling");
        let pending = PendingEnrollment::new(&self.cfg.site)?;
        let cc = seedcast_net::tls::client_config(token.ca_fingerprint, None, &self.cfg.transport)?;
        let (ep, conn) = dial(&self.cfg.engine, cc, &self.cfg.transport).await?;
        let role = Role::Enroll {
            secret: token.secret.clone(),
            site: self.cfg.site.clone(),
            adapter: self.adapter.kind().to_string(),
            csr_der: pending.csr_der.clone(),
        };
        let (_, _, reply) = hello(&conn, role).await?;
        conn.close(VarInt::from_u32(close::DONE), b"enrolled");
        ep.wait_idle().await;
        match reply {
            HelloReply::Enrolled {
                cert_der,
                ca_der,
                expires_unix,
                signing_key,
            } => {
                if fingerprint(&ca_der) != token.ca_fingerprint {
                    return Err(AgentError::Protocol(
                        "enrolled with a CA other than the token's",
                    ));
                }
                let creds = pending.complete(
                    &self.cfg.site,
                    cert_der,
                    ca_der,
                    expires_unix,
                    Some(signing_key),
                );
                creds.save(&self.cfg.data)?;
                info!(site = %self.cfg.site, "enrolled; credentials saved");
                Ok(creds)
            }
            HelloReply::Refused { reason, message } => Err(AgentError::Refused { reason, message }),
            HelloReply::Welcome { .. } => {
                Err(AgentError::Protocol("expected Enrolled, got Welcome"))
            }
        }
    }

    /// Run until `shutdown` completes or a fatal error (refused, revoked, misconfigured).
    /// Received chunks of a stalled transfer are flushed once a second meanwhile; the
    /// database is released when this returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let db = self.db.clone();
        let flusher = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stopped.changed() => return,
                    _ = tick.tick() => {}
                }
                let db = db.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || db.flush_stale()).await {
                    warn!("flushing received chunks: {e}");
                }
            }
        });
        let r = self.run_sessions(shutdown).await;
        let _ = stop.send(true);
        // Waits for a flush in progress: the caller may reopen the database next.
        let _ = flusher.await;
        r
    }

    async fn run_sessions(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        // A site whose service does not answer says so now, not at its first deployment.
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = self.adapter.check() => r.map_err(AgentError::Service)?,
        }
        self.sweep_unrecorded().await;
        let mut backoff = MIN_BACKOFF;
        loop {
            // Read each time: a renewal during the last session saved new ones.
            let creds = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                c = self.credentials() => c?,
            };
            let mut welcomed = false;
            let started = std::time::Instant::now();
            let r = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                r = self.connection(&creds, &mut welcomed) => r,
            };
            match r {
                Ok(()) => info!("engine ended the session"),
                Err(e) if e.is_fatal() => {
                    warn!("stopping: {e}");
                    return Err(e);
                }
                Err(e) => warn!("session lost: {e}; reconnecting"),
            }
            if welcomed && started.elapsed() >= STABLE_SESSION {
                backoff = MIN_BACKOFF;
            }
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.cfg.reconnect_max);
        }
    }

    /// One connection with the site certificate, served until it ends.
    async fn connection(
        &self,
        creds: &SiteCredentials,
        welcomed: &mut bool,
    ) -> Result<(), AgentError> {
        let identity = Some((vec![creds.cert.clone()], creds.key()));
        let cc = seedcast_net::tls::client_config(
            creds.ca_fingerprint(),
            identity,
            &self.cfg.transport,
        )?;
        let (_ep, conn) = dial(&self.cfg.engine, cc, &self.cfg.transport).await?;
        let r = tokio::select! {
            r = self.serve(&conn, creds, welcomed) => r,
            () = self.renew_when_due(&conn, creds) => unreachable!("renewal never ends a session"),
        };
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

    /// While connected: when the certificate is in the last third of its life, certify a
    /// new key over this (authenticated) connection and save it for the next connection.
    /// Never returns; a failed renewal is logged and tried again later.
    async fn renew_when_due(&self, conn: &Connection, creds: &SiteCredentials) {
        let mut renewed = false;
        loop {
            if !renewed && creds.renew_due(unix_now()) {
                match self.renew(conn).await {
                    Ok(expires) => {
                        info!(site = %self.cfg.site, expires, "site certificate renewed");
                        renewed = true;
                    }
                    Err(e) => warn!("certificate renewal failed (will retry): {e}"),
                }
            }
            // Check often enough for short lifetimes, rarely for long ones.
            let life = creds.expires_unix.saturating_sub(creds.issued_unix);
            let wait = (life / 20).clamp(1, 3600);
            tokio::time::sleep(Duration::from_secs(wait)).await;
        }
    }

    /// One renewal: a new key, its CSR on a stream of its own, the certificate saved.
    async fn renew(&self, conn: &Connection) -> Result<u64, AgentError> {
        let pending = PendingEnrollment::new(&self.cfg.site)?;
        let (mut send, mut recv) = conn.open_bi().await?;
        write_msg(
            &mut send,
            &AgentMsg::Renew {
                csr_der: pending.csr_der.clone(),
            },
        )
        .await?;
        let _ = send.finish();
        let reply = read_msg_limited::<EngineMsg>(&mut recv, MAX_RENEWED_FRAME)
            .await?
            .ok_or(AgentError::Protocol(
                "renewal stream ended without an answer",
            ))?;
        match reply {
            EngineMsg::Renewed {
                cert_der,
                expires_unix,
            } => {
                let old = SiteCredentials::load(&self.cfg.data)?
                    .ok_or(AgentError::Protocol("credentials vanished during renewal"))?;
                let creds = pending.complete(
                    &self.cfg.site,
                    cert_der,
                    old.ca.to_vec(),
                    expires_unix,
                    old.signing_key,
                );
                creds.save(&self.cfg.data)?;
                Ok(expires_unix)
            }
            EngineMsg::RenewRefused { message } => Err(AgentError::Refused {
                reason: seedcast_core::protocol::RefuseReason::BadRequest,
                message,
            }),
            _ => Err(AgentError::Protocol("unexpected answer to a renewal")),
        }
    }
}
