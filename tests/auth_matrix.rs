//! The authentication matrix: every way of presenting the wrong credential to a real
//! engine over QUIC on 127.0.0.1, each refused before any image byte moves — the engine
//! opens no data stream to the peer, and the peer never becomes a site or a target.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::{make_image, push_wait, with_engine};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use seedcast::cluster::LocalCluster;
use seedcast_core::protocol::{
    Hello, HelloReply, PROTOCOL_VERSION, RefuseReason, Role, SERVER_NAME,
};
use seedcast_net::endpoint::TransportOptions;
use seedcast_net::pki::{EnginePki, PendingEnrollment, SiteCredentials, Token};

type Identity = Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>;

/// How an attempt ended.
#[derive(Debug)]
enum Outcome {
    /// The TLS/QUIC handshake (or the connection right after it) failed.
    Handshake(String),
    Refused(RefuseReason, String),
    Welcomed,
    Enrolled,
}

/// Dial the engine pinning `ca`, presenting `identity`, and say `role`. Also checks that
/// the engine opened no data stream to this peer.
async fn attempt(
    cluster: &LocalCluster,
    ca: [u8; 32],
    identity: Identity,
    role: Role,
) -> Result<Outcome> {
    let t = TransportOptions::default();
    let cc = seedcast_net::tls::client_config(ca, identity, &t)?;
    let ep = seedcast_net::endpoint::client(cluster.engine_addr, &t)?;
    let conn = match ep.connect_with(cc, cluster.engine_addr, SERVER_NAME)?.await {
        Ok(c) => c,
        Err(e) => return Ok(Outcome::Handshake(e.to_string())),
    };
    let said = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            role,
        };
        seedcast_net::write_msg(&mut send, &hello).await?;
        let r: HelloReply = seedcast_net::read_msg_required(&mut recv).await?;
        Ok::<_, anyhow::Error>(r)
    };
    let outcome = match tokio::time::timeout(Duration::from_secs(15), said).await? {
        Err(e) => Outcome::Handshake(format!("{e:#}")),
        Ok(HelloReply::Refused { reason, message }) => Outcome::Refused(reason, message),
        Ok(HelloReply::Welcome { .. }) => Outcome::Welcomed,
        Ok(HelloReply::Enrolled { .. }) => Outcome::Enrolled,
    };
    println!("  {outcome}");
    if !matches!(outcome, Outcome::Welcomed) {
        // No image byte: nothing arrives on a stream of the engine's.
        let stream = tokio::time::timeout(Duration::from_millis(500), conn.accept_uni()).await;
        ensure!(
            !matches!(stream, Ok(Ok(_))),
            "the engine opened a data stream to a refused peer"
        );
    }
    conn.close(0u32.into(), b"");
    Ok(outcome)
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Handshake(e) => write!(f, "handshake failed: {e}"),
            Outcome::Refused(r, m) => write!(f, "refused ({r:?}): {m}"),
            Outcome::Welcomed => f.write_str("welcomed"),
            Outcome::Enrolled => f.write_str("enrolled"),
        }
    }
}

fn agent_role(site: &str) -> Role {
    Role::Agent {
        site: site.into(),
        adapter: "dir".into(),
    }
}

fn enroll_role(secret: &str, site: &str) -> Result<Role> {
    Ok(Role::Enroll {
        secret: secret.into(),
        site: site.into(),
        adapter: "dir".into(),
        csr_der: PendingEnrollment::new(site)?.csr_der,
    })
}

fn identity_of(c: &SiteCredentials) -> Identity {
    Some((vec![c.cert.clone()], c.key()))
}

fn refused(o: &Outcome, reason: RefuseReason) -> Result<()> {
    match o {
        Outcome::Refused(r, _) if *r == reason => Ok(()),
        o => bail!("expected a refusal ({reason:?}), got {o:?}"),
    }
}

fn handshake_failed(o: &Outcome) -> Result<()> {
    match o {
        Outcome::Handshake(_) => Ok(()),
        o => bail!("expected a failed handshake, got {o:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_wrong_credential_is_refused_before_any_image_byte() -> Result<()> {
    let sites = ["site-a", "site-b", "site-c"];
    with_engine(
        &sites,
        |c| c.open_enrollment = true,
        async |cluster| {
            let client = cluster.client().await?;
            let files = make_image(&cluster.root.join("img"), 2, "matrix")?;
            let s = push_wait(&client, "matrix", &files, None).await?;
            client.revoke("site-c").await?;
            let ca = cluster.admin.ca_fingerprint;
            let creds = |site: &str| -> Result<SiteCredentials> {
                SiteCredentials::load(&cluster.agent(site).data)?.context("credentials")
            };
            let join: Token = std::fs::read_to_string(cluster.engine_dir().join("join.token"))?
                .trim()
                .parse()?;
            let mut results: Vec<(&str, Result<()>)> = Vec::new();

            // 1. No certificate, claiming an enrolled site.
            let o = attempt(cluster, ca, None, agent_role("site-a")).await?;
            results.push(("no certificate", refused(&o, RefuseReason::BadToken)));

            // 2. A self-signed certificate naming the site.
            let self_signed = rcgen::generate_simple_self_signed(vec!["site-a".into()])?;
            let id = Some((
                vec![self_signed.cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                    self_signed.signing_key.serialize_der(),
                )),
            ));
            let o = attempt(cluster, ca, id, agent_role("site-a")).await?;
            results.push(("self-signed certificate", handshake_failed(&o)));

            // 3. A site certificate from another engine's CA.
            let other = tempfile::tempdir()?;
            let other_pki = EnginePki::load_or_create(other.path(), false)?;
            let pending = PendingEnrollment::new("site-a")?;
            let (cert, exp) =
                other_pki.issue_site_cert("site-a", &pending.csr_der, Duration::from_secs(3600))?;
            let foreign = pending.complete(
                "site-a",
                cert.to_vec(),
                other_pki.ca_der().to_vec(),
                exp,
                None,
            );
            let o = attempt(cluster, ca, identity_of(&foreign), agent_role("site-a")).await?;
            results.push(("another CA", handshake_failed(&o)));

            // 4. A revoked site's own certificate.
            let o = attempt(
                cluster,
                ca,
                identity_of(&creds("site-c")?),
                agent_role("site-c"),
            )
            .await?;
            results.push(("revoked site", refused(&o, RefuseReason::Revoked)));

            // 5. One site's certificate claiming to be another site.
            let o = attempt(
                cluster,
                ca,
                identity_of(&creds("site-a")?),
                agent_role("site-b"),
            )
            .await?;
            results.push((
                "another site's certificate",
                refused(&o, RefuseReason::BadToken),
            ));

            // 6. An agent's credential used as a client: its certificate, its (spent) token,
            //    and a fresh site token, as the admin secret.
            let site_token: Token = client.site_add("site-d", 3600).await?.0.parse()?;
            let mut outcomes = Vec::new();
            for secret in [String::new(), site_token.secret.clone()] {
                let role = Role::Client {
                    admin_secret: secret,
                };
                outcomes.push(attempt(cluster, ca, identity_of(&creds("site-a")?), role).await?);
            }
            results.push((
                "agent credential as client",
                outcomes
                    .iter()
                    .try_for_each(|o| refused(o, RefuseReason::BadToken)),
            ));

            // 7. The admin's credential used to enroll an agent.
            let o = attempt(
                cluster,
                ca,
                None,
                enroll_role(&cluster.admin.secret, "intruder")?,
            )
            .await?;
            results.push((
                "client credential as agent",
                refused(&o, RefuseReason::BadToken),
            ));

            // 8. The join token used as the admin's.
            let role = Role::Client {
                admin_secret: join.secret.clone(),
            };
            let o = attempt(cluster, ca, None, role).await?;
            results.push(("join token as admin", refused(&o, RefuseReason::BadToken)));

            // 9. A site token used twice.
            let first = attempt(
                cluster,
                ca,
                None,
                enroll_role(&site_token.secret, "site-d")?,
            )
            .await?;
            ensure!(matches!(first, Outcome::Enrolled), "{first:?}");
            let again = attempt(
                cluster,
                ca,
                None,
                enroll_role(&site_token.secret, "site-d")?,
            )
            .await?;
            results.push((
                "token used twice",
                match again {
                    Outcome::Refused(..) => Ok(()),
                    o => Err(anyhow::anyhow!("second use: {o:?}")),
                },
            ));

            // 10. An expired site token.
            let short: Token = client.site_add("site-e", 1).await?.0.parse()?;
            tokio::time::sleep(Duration::from_millis(2100)).await;
            let o = attempt(cluster, ca, None, enroll_role(&short.secret, "site-e")?).await?;
            results.push(("expired token", refused(&o, RefuseReason::Expired)));

            // 11. A dialer pinning another CA (an agent facing an engine it was not enrolled
            //     with): its own side refuses the handshake.
            let o = attempt(cluster, [9; 32], None, enroll_role(&join.secret, "site-f")?).await?;
            results.push(("pin mismatch", handshake_failed(&o)));

            // 12. 0-RTT: a client that asks for it on a resumed connection gets none, so no
            //     replayable early data ever reaches the hello.
            results.push(("0-RTT off", zero_rtt_refused(cluster, ca).await));

            let failed: Vec<String> = results
                .iter()
                .filter_map(|(what, r)| r.as_ref().err().map(|e| format!("{what}: {e:#}")))
                .collect();
            println!(
                "auth matrix: {}/{} refused before any image byte",
                results.len() - failed.len(),
                results.len()
            );
            ensure!(failed.is_empty(), "not refused:\n{}", failed.join("\n"));

            // None of them became a site or a target: the image is where it was pushed.
            let names: Vec<String> = client.sites().await?.into_iter().map(|s| s.site).collect();
            ensure!(
                names == ["site-a", "site-b", "site-c", "site-d"],
                "{names:?}"
            );
            let st = client.status(&s.global_id).await?;
            let placed: Vec<&str> = st.sites.iter().map(|p| p.site.as_str()).collect();
            ensure!(placed == sites, "{placed:?}");
            client.close().await;
            Ok(())
        },
    )
    .await
}

/// Connect once (the engine may hand out resumption tickets), then resume asking for
/// 0-RTT: the engine's tickets allow no early data, so none can be sent.
async fn zero_rtt_refused(cluster: &LocalCluster, ca: [u8; 32]) -> Result<()> {
    let t = TransportOptions::default();
    let mut crypto = seedcast_net::tls::client_crypto(ca, None)?;
    crypto.enable_early_data = true;
    let mut cc = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(crypto)?));
    cc.transport_config(t.to_config());
    let ep = seedcast_net::endpoint::client(cluster.engine_addr, &t)?;
    let first = ep
        .connect_with(cc.clone(), cluster.engine_addr, SERVER_NAME)?
        .await?;
    // Let the tickets arrive, then go.
    let (mut send, mut recv) = first.open_bi().await?;
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        role: Role::Client {
            admin_secret: cluster.admin.secret.clone(),
        },
    };
    seedcast_net::write_msg(&mut send, &hello).await?;
    let _: HelloReply = seedcast_net::read_msg_required(&mut recv).await?;
    first.close(0u32.into(), b"");
    match ep
        .connect_with(cc, cluster.engine_addr, SERVER_NAME)?
        .into_0rtt()
    {
        Err(connecting) => {
            connecting.await?;
            Ok(())
        }
        Ok((conn, accepted)) => {
            let accepted = accepted.await;
            conn.close(0u32.into(), b"");
            ensure!(!accepted, "the engine accepted 0-RTT data");
            Ok(())
        }
    }
}
