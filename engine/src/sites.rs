//! The site registry: site tokens, enrollment, the check of an agent's certificate, renewal,
//! reset and revocation, and which sites a push targets.
//!
//! A site enrolls with a single-use token the admin made for its name (`site add`), or —
//! only when the engine runs with open enrollment — the join token, for a name no site
//! has. Enrollment never replaces an enrolled site and never clears a revocation: both
//! take the admin (`site reset`). Certificates live `site_cert_lifetime`; the agent renews
//! over its authenticated connection, and the engine accepts the old certificate until
//! the agent first connects with the new one (a renewal lost in a crash locks no one out).

use std::collections::BTreeSet;
use std::time::Duration;

use quinn::{Connection, SendStream, VarInt};
use seedcast_core::protocol::{HelloReply, RefuseReason, close};
use seedcast_net::pki::{TokenKind, fingerprint, secrets_match, token_key, validate_site_name};
use seedcast_net::write_msg;
use tracing::{info, warn};

use crate::EngineError;
use crate::catalog::{Catalog, EnrollmentRecord, SiteRecord, unix_now};
use crate::handshake::refuse;
use crate::state::Shared;

/// Longest life a site token may be given: a year.
pub const MAX_TOKEN_SECS: u64 = 365 * 86_400;

type Refusal = (RefuseReason, String);

/// Is this connection's certificate the one issued to `site` (or its renewal), and is the
/// site in good standing? The refusal to send otherwise. A renewed certificate used for
/// the first time becomes the site's certificate.
pub(crate) fn check_agent(shared: &Shared, conn: &Connection, site: &str) -> Result<(), Refusal> {
    let _records = shared.site_records.lock();
    let catalog = &shared.catalog;
    let cert = seedcast_net::tls::peer_certificate(conn).ok_or((
        RefuseReason::BadToken,
        "no site certificate: enroll with a site token first".to_string(),
    ))?;
    let mut rec = catalog
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
    let fp = fingerprint(&cert);
    if rec.next_fingerprint == Some(fp) {
        rec.cert_fingerprint = rec.next_fingerprint.take();
        rec.cert_expires_unix = std::mem::take(&mut rec.next_expires_unix);
        catalog
            .put_site(site, &rec)
            .map_err(|e| (RefuseReason::BadRequest, format!("catalog: {e}")))?;
        info!(site, "renewed certificate in use");
    } else if rec.cert_fingerprint != Some(fp) {
        let why = if rec.cert_fingerprint.is_none() {
            format!("site {site:?} was reset by the admin: enroll again with a new site token")
        } else {
            format!("certificate is not the one issued to site {site:?}")
        };
        return Err((RefuseReason::BadToken, why));
    }
    Ok(())
}

/// What an enrolling agent asked for.
#[derive(Debug)]
pub(crate) struct Enrollment<'a> {
    pub secret: &'a str,
    pub site: &'a str,
    pub adapter: &'a str,
    pub csr_der: &'a [u8],
}

/// Which token the secret is: a site token's key, or the join token (`None`).
fn token_for(shared: &Shared, e: &Enrollment<'_>) -> Result<Option<[u8; 32]>, Refusal> {
    let key = token_key(e.secret);
    let bad = || (RefuseReason::BadToken, "invalid site token".to_string());
    match shared.catalog.enrollment(&key) {
        Err(err) => return Err((RefuseReason::BadRequest, format!("catalog: {err}"))),
        Ok(Some(t)) => {
            if t.site != e.site {
                return Err((
                    RefuseReason::BadToken,
                    format!("this token enrolls site {:?}, not {:?}", t.site, e.site),
                ));
            }
            if unix_now() >= t.expires_unix {
                let _ = shared.catalog.delete_enrollment(&key);
                return Err((
                    RefuseReason::Expired,
                    format!(
                        "the token for site {:?} has expired: make a new one with `seedcast site add {}`",
                        t.site, t.site
                    ),
                ));
            }
            return Ok(Some(key));
        }
        Ok(None) => {}
    }
    match &shared.pki.join {
        Some(j) if secrets_match(e.secret, &j.secret) => Ok(None),
        Some(_) => Err(bad()),
        None => Err(bad()),
    }
}

/// Check the token, sign the agent's key for its site, record the site and use the token up.
fn admit(shared: &Shared, e: &Enrollment<'_>) -> Result<HelloReply, Refusal> {
    let _records = shared.site_records.lock();
    validate_site_name(e.site).map_err(|err| (RefuseReason::BadRequest, err.to_string()))?;
    let token = token_for(shared, e)?;
    match shared.catalog.site(e.site) {
        Err(err) => return Err((RefuseReason::BadRequest, format!("catalog: {err}"))),
        Ok(Some(r)) if r.revoked => {
            return Err((
                RefuseReason::Revoked,
                format!("site {:?} has been revoked", e.site),
            ));
        }
        Ok(Some(r)) if r.cert_fingerprint.is_some() => {
            return Err((
                RefuseReason::BadToken,
                format!(
                    "site {:?} is already enrolled; only the admin can reset it",
                    e.site
                ),
            ));
        }
        Ok(_) => {}
    }
    let lifetime = shared.cfg.site_cert_lifetime;
    let (cert, expires) = shared
        .pki
        .issue_site_cert(e.site, e.csr_der, lifetime)
        .map_err(|err| {
            (
                RefuseReason::BadRequest,
                format!("certificate request refused: {err}"),
            )
        })?;
    let rec = Catalog::new_site_record(e.adapter, fingerprint(&cert), expires);
    shared
        .catalog
        .enroll_site(e.site, &rec, token.as_ref())
        .map_err(|err| (RefuseReason::BadRequest, format!("catalog: {err}")))?;
    let how = if token.is_some() {
        "site token"
    } else {
        "join token"
    };
    info!(site = e.site, adapter = e.adapter, how, "site enrolled");
    Ok(HelloReply::Enrolled {
        cert_der: cert.to_vec(),
        ca_der: shared.pki.ca_der().to_vec(),
        expires_unix: expires,
        signing_key: shared.signer.public_key(),
    })
}

/// Enroll an agent, or refuse it saying why.
pub(crate) async fn enroll(
    shared: &Shared,
    conn: &Connection,
    mut send: SendStream,
    e: Enrollment<'_>,
) {
    match admit(shared, &e) {
        Err((reason, msg)) => refuse(conn, &mut send, reason, msg).await,
        Ok(reply) => {
            if write_msg(&mut send, &reply).await.is_ok() {
                let _ = send.finish();
                // The agent closes once it has its certificate.
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
            }
            shared.changed();
        }
    }
}

/// A new single-use token enrolling `site`, valid `secs`; its text (shown once) and expiry.
pub(crate) fn add(shared: &Shared, site: &str, secs: u64) -> Result<(String, u64), EngineError> {
    validate_site_name(site).map_err(|_| EngineError::InvalidSiteName(site.to_string()))?;
    if secs == 0 || secs > MAX_TOKEN_SECS {
        return Err(EngineError::TokenLifetime {
            secs,
            max: MAX_TOKEN_SECS,
        });
    }
    let _records = shared.site_records.lock();
    match shared.catalog.site(site)? {
        Some(r) if r.revoked => return Err(EngineError::SiteRevoked(site.to_string())),
        Some(r) if r.cert_fingerprint.is_some() => {
            return Err(EngineError::SiteEnrolled(site.to_string()));
        }
        _ => {}
    }
    let token = shared.pki.new_site_token();
    let now = unix_now();
    let expires_unix = now.saturating_add(secs);
    let rec = EnrollmentRecord {
        site: site.to_string(),
        created_unix: now,
        expires_unix,
    };
    shared
        .catalog
        .put_enrollment(&token_key(&token.secret), &rec)?;
    debug_assert_eq!(token.kind, TokenKind::Site);
    info!(site, expires_unix, "site token made");
    Ok((token.to_string(), expires_unix))
}

/// Forget a site's certificate, unused tokens and revocation; cut its agent off. Its
/// images stay assigned to it: a new enrollment of the name picks them up.
pub(crate) fn reset(shared: &Shared, site: &str) -> Result<(), EngineError> {
    let _records = shared.site_records.lock();
    let mut rec = shared
        .catalog
        .site(site)?
        .ok_or_else(|| EngineError::UnknownSite(site.to_string()))?;
    rec.cert_fingerprint = None;
    rec.next_fingerprint = None;
    rec.cert_expires_unix = 0;
    rec.next_expires_unix = 0;
    rec.revoked = false;
    shared.catalog.put_site_dropping_tokens(site, &rec)?;
    disconnect(shared, site, close::REFUSED, "site reset by the admin");
    warn!(site, "site reset");
    shared.changed();
    Ok(())
}

/// Change a site's link settings (`None`: leave as is; `Some(None)`: back to the default)
/// and apply them to its connection at once. The site must be known: enrolled, or added
/// with a token not yet used.
pub(crate) fn set(
    shared: &Shared,
    site: &str,
    max_rate: Option<Option<u64>>,
    congestion: Option<Option<seedcast_core::protocol::Congestion>>,
) -> Result<crate::catalog::SiteSettings, EngineError> {
    let _records = shared.site_records.lock();
    if shared.catalog.site(site)?.is_none() && shared.catalog.enrollments_of(site)?.is_empty() {
        return Err(EngineError::UnknownSite(site.to_string()));
    }
    if let Some(Some(bps)) = max_rate
        && !(seedcast_core::rate::MIN_RATE_BPS..=seedcast_core::rate::MAX_RATE_BPS).contains(&bps)
    {
        return Err(EngineError::RateRange(bps));
    }
    let mut settings = shared.catalog.site_settings(site)?;
    if let Some(r) = max_rate {
        settings.max_rate = r;
    }
    if let Some(c) = congestion {
        settings.congestion = c;
    }
    shared.catalog.put_site_settings(site, &settings)?;
    shared.limits.set_site(site, settings.max_rate);
    if let Some(h) = shared.agents.lock().get(site) {
        h.congestion.set(
            settings
                .congestion
                .unwrap_or(shared.cfg.transport.congestion),
        );
    }
    info!(site, max_rate = ?settings.max_rate, congestion = ?settings.congestion, "site settings changed");
    Ok(settings)
}

/// Revoke a site's certificate (and any unused token for it): its agent is disconnected
/// and refused from then on.
pub(crate) fn revoke(shared: &Shared, site: &str) -> Result<(), EngineError> {
    let _records = shared.site_records.lock();
    let mut rec = shared
        .catalog
        .site(site)?
        .ok_or_else(|| EngineError::UnknownSite(site.to_string()))?;
    rec.revoked = true;
    shared.catalog.put_site_dropping_tokens(site, &rec)?;
    let why = format!("site {site:?} has been revoked");
    disconnect(shared, site, close::REFUSED, &why);
    warn!(site, "site revoked");
    shared.changed();
    Ok(())
}

/// Is `cert_fp` still the certificate of `site` in good standing? Checked again, under the
/// site lock, when an agent registers: a revocation or reset between its check and its
/// registration must not leave it connected.
pub(crate) fn still_admitted(shared: &Shared, site: &str, cert_fp: [u8; 32]) -> bool {
    shared.catalog.site(site).ok().flatten().is_some_and(|r| {
        !r.revoked && (r.cert_fingerprint == Some(cert_fp) || r.next_fingerprint == Some(cert_fp))
    })
}

fn disconnect(shared: &Shared, site: &str, code: u32, why: &str) {
    let h = shared.agents.lock().remove(site);
    if let Some(h) = h {
        h.conn.close(VarInt::from_u32(code), why.as_bytes());
    }
}

/// Certify the new key in `csr_der` for a connected, enrolled `site`; the site's next
/// certificate, accepted alongside the current one until the agent uses it.
pub(crate) fn renew(shared: &Shared, site: &str, csr_der: &[u8]) -> Result<(Vec<u8>, u64), String> {
    let _records = shared.site_records.lock();
    let mut rec: SiteRecord = shared
        .catalog
        .site(site)
        .map_err(|e| format!("catalog: {e}"))?
        .ok_or_else(|| format!("site {site:?} is not enrolled"))?;
    if rec.revoked || rec.cert_fingerprint.is_none() {
        return Err(format!("site {site:?} is revoked or reset"));
    }
    let (cert, expires) = shared
        .pki
        .issue_site_cert(site, csr_der, shared.cfg.site_cert_lifetime)
        .map_err(|e| format!("certificate request refused: {e}"))?;
    rec.next_fingerprint = Some(fingerprint(&cert));
    rec.next_expires_unix = expires;
    shared
        .catalog
        .put_site(site, &rec)
        .map_err(|e| format!("catalog: {e}"))?;
    info!(site, expires, "site certificate renewed");
    Ok((cert.to_vec(), expires))
}

/// The target sites of a push: every known site in good standing, or the named ones (each
/// must exist and not be revoked), sorted and each once.
pub(crate) fn targets(
    catalog: &Catalog,
    wanted: Option<Vec<String>>,
) -> Result<Vec<String>, EngineError> {
    let known = catalog.sites()?;
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
                    Some(_) => return Err(EngineError::RevokedSite(s)),
                    None => return Err(EngineError::UnknownSite(s)),
                }
            }
            Ok(out.into_iter().collect())
        }
    }
}

/// Every revoked site (revoked sites are no longer targets of new versions).
pub(crate) fn revoked(catalog: &Catalog) -> Result<BTreeSet<String>, EngineError> {
    Ok(catalog
        .sites()?
        .into_iter()
        .filter(|(_, r)| r.revoked)
        .map(|(n, _)| n)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_known_sites_in_good_standing() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(dir.path()).unwrap();
        for s in ["b", "a", "gone"] {
            c.put_site(s, &Catalog::new_site_record("dir", [1; 32], 0))
                .unwrap();
        }
        let mut gone = c.site("gone").unwrap().unwrap();
        gone.revoked = true;
        c.put_site("gone", &gone).unwrap();
        assert_eq!(targets(&c, None).unwrap(), ["a", "b"]);
        assert_eq!(
            targets(&c, Some(vec!["b".into(), "a".into(), "b".into()])).unwrap(),
            ["a", "b"]
        );
        assert!(matches!(
            targets(&c, Some(vec!["gone".into()])),
            Err(EngineError::RevokedSite(_))
        ));
        assert!(matches!(
            targets(&c, Some(vec!["nowhere".into()])),
            Err(EngineError::UnknownSite(s)) if s == "nowhere"
        ));
        assert_eq!(
            revoked(&c).unwrap().into_iter().collect::<Vec<_>>(),
            ["gone"]
        );
    }
}
