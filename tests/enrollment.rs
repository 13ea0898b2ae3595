//! Who may become a site: a single-use token per site name, the admin alone re-admitting a
//! name, open enrollment only when asked for, certificates that expire and are renewed —
//! a real engine and real agents on 127.0.0.1.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{make_image, push_wait, with_cluster, with_engine};
use seedcast::cluster::LocalCluster;
use seedcast_agents::adapters::dir::DirAdapter;
use seedcast_agents::{Agent, AgentConfig, AgentError};
use seedcast_core::protocol::RefuseReason;
use seedcast_net::pki::{SiteCredentials, Token, unix_now};

/// An agent for `site` keeping its credentials in `data` (under the cluster's root).
fn agent(cluster: &LocalCluster, site: &str, data: &str, token: Option<Token>) -> Result<Agent> {
    let adapter = Arc::new(DirAdapter::new(cluster.root.join("pools").join(data))?);
    let cfg = AgentConfig::new(
        cluster.root.join("agents").join(data),
        cluster.engine_addr.to_string(),
        site,
        token,
    );
    Ok(Agent::open(cfg, adapter)?)
}

/// Enroll and say how the engine refused it.
async fn refusal(a: Agent) -> Result<(RefuseReason, String)> {
    match a.credentials().await {
        Err(AgentError::Refused { reason, message }) => Ok((reason, message)),
        Err(e) => anyhow::bail!("expected a refusal, got {e}"),
        Ok(_) => anyhow::bail!("expected a refusal, got enrolled"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_token_enrolls_its_one_site_once_and_expires() -> Result<()> {
    with_cluster(&[], async |cluster| {
        let client = cluster.client().await?;
        // No token that enrolls any site exists unless the engine is told to make one.
        ensure!(!cluster.engine_dir().join("join.token").exists());
        let (text, expires) = client.site_add("edge", 3600).await?;
        ensure!(expires.abs_diff(unix_now() + 3600) < 5, "{expires}");
        let token: Token = text.parse()?;

        // Another name: refused, and the token is not used up by the attempt.
        let (reason, msg) = refusal(agent(cluster, "other", "other", Some(token.clone()))?).await?;
        ensure!(reason == RefuseReason::BadToken, "{reason:?}");
        ensure!(msg.contains("enrolls site \"edge\""), "{msg}");

        // Its own name: enrolled, with a certificate that expires.
        let creds = agent(cluster, "edge", "edge", Some(token.clone()))?
            .credentials()
            .await?;
        ensure!(
            creds.expires_unix > unix_now() + 29 * 86_400,
            "{}",
            creds.expires_unix
        );

        // Used twice: refused, whoever holds it.
        let (reason, msg) = refusal(agent(cluster, "edge", "edge-2", Some(token))?).await?;
        ensure!(
            reason == RefuseReason::BadToken && msg.contains("invalid site token"),
            "{msg}"
        );

        // A token for an enrolled site is not made; the admin must reset it first.
        let e = client.site_add("edge", 3600).await.unwrap_err().to_string();
        ensure!(
            e.contains("is enrolled") && e.contains("site reset edge"),
            "{e}"
        );

        // An expired token is refused as expired.
        let (late, _) = client.site_add("late", 1).await?;
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let (reason, msg) = refusal(agent(cluster, "late", "late", Some(late.parse()?))?).await?;
        ensure!(
            reason == RefuseReason::Expired && msg.contains("site add late"),
            "{msg}"
        );

        // Bad requests are named.
        let e = client.site_add("x", 0).await.unwrap_err().to_string();
        ensure!(e.contains("at most"), "{e}");
        let e = client
            .site_add("Bad Name", 60)
            .await
            .unwrap_err()
            .to_string();
        ensure!(e.contains("invalid site name"), "{e}");
        let sites = client.sites().await?;
        ensure!(sites.len() == 1 && sites[0].site == "edge" && sites[0].enrolled);
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_admin_re_admits_a_revoked_or_reset_site() -> Result<()> {
    with_cluster(&["site-a"], async |cluster| {
        let client = cluster.client().await?;
        client.revoke("site-a").await?;
        let ended = tokio::time::timeout(Duration::from_secs(20), cluster.agent_exit("site-a"))
            .await?
            .context("agent task")?;
        ensure!(ended.is_err());

        // A revoked site gets no new token; reset re-admits the name.
        let e = client
            .site_add("site-a", 600)
            .await
            .unwrap_err()
            .to_string();
        ensure!(
            e.contains("revoked") && e.contains("site reset site-a"),
            "{e}"
        );
        client.site_reset("site-a").await?;
        let s = client.sites().await?;
        ensure!(
            !s[0].revoked && !s[0].enrolled && s[0].cert_expires_unix == 0,
            "{s:?}"
        );

        // The old certificate no longer gets in.
        cluster.resume_agent("site-a");
        let e = tokio::time::timeout(Duration::from_secs(20), cluster.agent_exit("site-a"))
            .await?
            .context("agent task")?
            .unwrap_err();
        ensure!(
            e.is_fatal() && e.to_string().contains("reset by the admin"),
            "{e}"
        );

        // A token made before a revocation dies with it.
        let (doomed, _) = client.site_add("site-a", 600).await?;
        client.revoke("site-a").await?;
        let (reason, _) = refusal(agent(cluster, "site-a", "a2", Some(doomed.parse()?))?).await?;
        ensure!(reason == RefuseReason::BadToken, "{reason:?}");

        // After a reset and a new token, a new agent enrolls the name and gets images.
        client.site_reset("site-a").await?;
        let fresh = cluster.site_token("site-a").await?;
        let a = agent(cluster, "site-a", "a3", Some(fresh))?;
        let run = tokio::spawn(a.clone().run(std::future::pending()));
        cluster.wait_connected(1, Duration::from_secs(20)).await?;
        let files = make_image(&cluster.root.join("img"), 2, "re-admitted")?;
        let s = push_wait(&client, "after-reset", &files, None).await?;
        ensure!(s.sites.len() == 1 && s.sites[0].local_id.is_some(), "{s:?}");
        run.abort();
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_enrollment_admits_new_names_only() -> Result<()> {
    with_engine(
        &[],
        |c| c.open_enrollment = true,
        async |cluster| {
            let text = std::fs::read_to_string(cluster.engine_dir().join("join.token"))?;
            let join: Token = text.parse()?;
            agent(cluster, "n1", "n1", Some(join.clone()))?
                .credentials()
                .await?;
            // Not a name already enrolled: that would take the site over.
            let (reason, msg) = refusal(agent(cluster, "n1", "n1-b", Some(join.clone()))?).await?;
            ensure!(
                reason == RefuseReason::BadToken && msg.contains("already enrolled"),
                "{msg}"
            );
            // Not a revoked name: enrollment never clears a revocation.
            let client = cluster.client().await?;
            client.revoke("n1").await?;
            let (reason, _) = refusal(agent(cluster, "n1", "n1-c", Some(join))?).await?;
            ensure!(reason == RefuseReason::Revoked, "{reason:?}");
            client.close().await;
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_renewed_before_they_expire_and_an_expired_agent_says_so() -> Result<()> {
    let life = Duration::from_secs(6);
    with_engine(
        &["site-a"],
        move |c| c.site_cert_lifetime = life,
        async |cluster| {
            let data = cluster.agent("site-a").data.clone();
            let first = SiteCredentials::load(&data)?.context("enrolled")?;
            // The agent renews when a third of the life is left, over its connection.
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            let renewed = loop {
                let c = SiteCredentials::load(&data)?.context("credentials")?;
                if c.cert_fingerprint() != first.cert_fingerprint() {
                    break c;
                }
                ensure!(std::time::Instant::now() < deadline, "never renewed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            ensure!(renewed.expires_unix > first.expires_unix);
            // Reconnecting with the renewed certificate works, and the engine now records it.
            cluster.stop_agent("site-a").await;
            cluster.resume_agent("site-a");
            cluster.wait_connected(1, Duration::from_secs(10)).await?;
            let client = cluster.client().await?;
            let s = client.sites().await?;
            ensure!(s[0].connected, "{s:?}");
            ensure!(s[0].cert_expires_unix == renewed.expires_unix, "{s:?}");
            client.close().await;

            // Offline past its certificate's expiry, an agent stops and says what to do.
            cluster.stop_agent("site-a").await;
            let c = SiteCredentials::load(&data)?.context("credentials")?;
            let wait = c.expires_unix.saturating_sub(unix_now()) + 1;
            tokio::time::sleep(Duration::from_secs(wait)).await;
            cluster.resume_agent("site-a");
            let e = tokio::time::timeout(Duration::from_secs(10), cluster.agent_exit("site-a"))
                .await?
                .context("agent task")?
                .unwrap_err();
            ensure!(
                matches!(e, AgentError::Expired { .. })
                    && e.to_string().contains("site reset site-a"),
                "{e}"
            );
            Ok(())
        },
    )
    .await
}
