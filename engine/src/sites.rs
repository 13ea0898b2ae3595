//! The site registry: enrollment, the check of an agent's certificate, revocation, and which
//! sites a push targets.

use std::collections::BTreeSet;
use std::time::Duration;

use quinn::{Connection, SendStream, VarInt};
use seedcast_core::protocol::{HelloReply, RefuseReason, close};
use seedcast_net::pki::{fingerprint, secrets_match, validate_site_name};
use seedcast_net::write_msg;
use tracing::{info, warn};

use crate::EngineError;
use crate::catalog::Catalog;
use crate::handshake::refuse;
use crate::state::Shared;

/// Is this connection's certificate the one issued to `site`, and is the site in good
/// standing? The refusal to send otherwise.
pub(crate) fn check_agent(
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

/// What an enrolling agent asked for.
#[derive(Debug)]
pub(crate) struct Enrollment<'a> {
    pub join_secret: &'a str,
    pub site: &'a str,
    pub adapter: &'a str,
    pub csr_der: &'a [u8],
}

/// Check the join secret, sign the agent's key for its site, record the site.
fn admit(shared: &Shared, e: &Enrollment<'_>) -> Result<HelloReply, (RefuseReason, String)> {
    if !secrets_match(e.join_secret, &shared.pki.join.secret) {
        return Err((RefuseReason::BadToken, "invalid join token".into()));
    }
    validate_site_name(e.site).map_err(|err| (RefuseReason::BadRequest, err.to_string()))?;
    let cert = shared
        .pki
        .issue_site_cert(e.site, e.csr_der)
        .map_err(|err| {
            let msg = format!("certificate request refused: {err}");
            (RefuseReason::BadRequest, msg)
        })?;
    // A new enrollment of a known site replaces its certificate: the old one stops working.
    let rec = Catalog::new_site_record(e.adapter, fingerprint(&cert));
    shared
        .catalog
        .put_site(e.site, &rec)
        .map_err(|err| (RefuseReason::BadRequest, format!("catalog: {err}")))?;
    if let Some(old) = shared.agents.lock().expect("agents lock").remove(e.site) {
        old.conn
            .close(VarInt::from_u32(close::REPLACED), b"site re-enrolled");
    }
    info!(site = e.site, adapter = e.adapter, "site enrolled");
    Ok(HelloReply::Enrolled {
        cert_der: cert.to_vec(),
        ca_der: shared.pki.ca_der().to_vec(),
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

/// Revoke a site's certificate: its agent is disconnected and refused from then on.
pub(crate) fn revoke(shared: &Shared, site: &str) -> Result<(), EngineError> {
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
            c.put_site(s, &Catalog::new_site_record("dir", [1; 32]))
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
