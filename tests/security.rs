//! Who may talk to the engine, and what a malformed peer gets: real engine, real agents,
//! real QUIC on 127.0.0.1.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::{SITES, make_image, push_wait, with_cluster};
use quinn::ConnectionError;
use seedcast::client::{Client, ErrorClass};
use seedcast::cluster::LocalCluster;
use seedcast_agents::adapters::dir::DirAdapter;
use seedcast_agents::{Agent, AgentConfig, AgentError};
use seedcast_core::protocol::{Hello, PROTOCOL_VERSION, PlacementState, RefuseReason, Role, close};
use seedcast_net::pki::Token;
use std::sync::Arc;

fn agent(cluster: &LocalCluster, site: &str, token: Token) -> Result<Agent> {
    let adapter = Arc::new(DirAdapter::new(cluster.root.join("pools").join(site))?);
    let cfg = AgentConfig::new(
        cluster.root.join("agents").join(site),
        cluster.engine_addr.to_string(),
        site,
        Some(token),
    );
    Ok(Agent::open(cfg, adapter)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_and_clients_without_valid_credentials_are_refused() -> Result<()> {
    with_cluster(&SITES[..1], async |cluster| {
        // Right engine fingerprint, wrong secret: refused at enrollment, with the reason.
        let token = cluster.site_token("intruder").await?;
        let mut forged = token.clone();
        forged.secret = "00000000000000000000000000000000".into();
        let e = agent(cluster, "intruder", forged)?
            .run(std::future::pending())
            .await
            .unwrap_err();
        match &e {
            AgentError::Refused { reason, message } => {
                assert_eq!(*reason, RefuseReason::BadToken);
                assert!(message.contains("invalid site token"), "{message}");
            }
            e => panic!("expected a refusal, got {e}"),
        }
        assert!(e.is_fatal());

        // A token pinning another CA: the agent will not even finish the TLS handshake.
        let mut other_ca = token.clone();
        other_ca.ca_fingerprint = [9; 32];
        let e = agent(cluster, "elsewhere", other_ca)?
            .credentials()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("handshake failed"), "{e}");

        // The admin token cannot enroll an agent; a site token cannot act as a client.
        assert!(agent(cluster, "x", cluster.admin.clone()).is_err());
        let e = Client::connect(&cluster.engine_addr.to_string(), &token)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorClass::Usage);
        assert!(e.to_string().contains("agent's token"), "{e}");
        let mut bad_admin = cluster.admin.clone();
        bad_admin.secret = "11111111111111111111111111111111".into();
        let e = Client::connect(&cluster.engine_addr.to_string(), &bad_admin)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorClass::Refused);
        assert!(e.to_string().contains("invalid admin token"), "{e}");

        // None of them became a site.
        let client = cluster.client().await?;
        let sites = client.sites().await?;
        assert_eq!(
            sites.iter().map(|s| s.site.as_str()).collect::<Vec<_>>(),
            ["site-a"]
        );

        // An agent claiming an enrolled site without that site's certificate is refused too.
        let conn = common::raw_connect(cluster).await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        seedcast_net::write_msg(
            &mut send,
            &Hello {
                protocol: PROTOCOL_VERSION,
                role: Role::Agent {
                    site: "site-a".into(),
                    adapter: "dir".into(),
                },
            },
        )
        .await?;
        let r: seedcast_core::protocol::HelloReply =
            seedcast_net::read_msg_required(&mut recv).await?;
        assert!(format!("{r:?}").contains("enroll"), "{r:?}");
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_site_is_cut_off_and_no_longer_a_target() -> Result<()> {
    with_cluster(&SITES, async |cluster| {
        let client = cluster.client().await?;
        let early = make_image(&cluster.root.join("early"), 2, "before revoke")?;
        let before = push_wait(&client, "before-revoke", &early, None).await?;
        assert_eq!(before.sites.len(), 3);
        client.revoke("site-b").await?;
        // The agent stops with a fatal, explained error.
        let ended =
            tokio::time::timeout(Duration::from_secs(20), cluster.agent_exit("site-b")).await?;
        let e = ended.expect("agent task").unwrap_err();
        assert!(e.is_fatal() && e.to_string().contains("revoked"), "{e}");
        let sites = client.sites().await?;
        let b = sites.iter().find(|s| s.site == "site-b").unwrap();
        assert!(b.revoked && !b.connected);
        // A restart with its old certificate is refused.
        cluster.resume_agent("site-b");
        let e = tokio::time::timeout(Duration::from_secs(20), cluster.agent_exit("site-b")).await?;
        assert!(
            matches!(
                e,
                Some(Err(AgentError::Refused {
                    reason: RefuseReason::Revoked,
                    ..
                }))
            ),
            "{e:?}"
        );

        let files = make_image(&cluster.root.join("img"), 2, "revoked")?;
        let s = push_wait(&client, "after-revoke", &files, None).await?;
        assert_eq!(
            s.sites.iter().map(|p| p.site.as_str()).collect::<Vec<_>>(),
            ["site-a", "site-c"]
        );
        // An image pushed before the revocation: its next version goes to the others only, and
        // waiting for it does not wait for the revoked site (which keeps its old mapping).
        let patch = cluster.root.join("patch.bin");
        std::fs::write(&patch, b"after revoke")?;
        let c = client
            .adapt(
                &before.global_id,
                &[seedcast::client::Change::Write {
                    path: "disk.raw".into(),
                    offset: 0,
                    data_file: patch,
                }],
                3,
            )
            .await?;
        let s = tokio::time::timeout(
            Duration::from_secs(30),
            client.watch(&before.global_id, c.version, |_| {}),
        )
        .await??;
        for p in &s.sites {
            match p.site.as_str() {
                "site-b" => assert_eq!((p.version, p.state), (1, PlacementState::Published)),
                _ => assert_eq!((p.version, p.state), (2, PlacementState::Published)),
            }
        }
        client.close().await;
        Ok(())
    })
    .await
}

/// Send `bytes` as the first stream of a fresh connection; return how the engine closed it.
async fn close_after(cluster: &LocalCluster, bytes: &[u8]) -> Result<(u64, String)> {
    let conn = common::raw_connect(cluster).await?;
    let (mut send, _recv) = conn.open_bi().await?;
    send.write_all(bytes).await?;
    send.finish()?;
    match tokio::time::timeout(Duration::from_secs(15), conn.closed()).await? {
        ConnectionError::ApplicationClosed(c) => Ok((
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        )),
        other => anyhow::bail!("unexpected close: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_oversized_and_garbage_frames_get_errors_not_panics() -> Result<()> {
    with_cluster(&SITES[..1], async |cluster| {
        let protocol = close::PROTOCOL as u64;

        // A length prefix far beyond the maximum: refused before anything is allocated.
        let (code, reason) = close_after(cluster, &u32::MAX.to_be_bytes()).await?;
        assert_eq!(code, protocol);
        assert!(reason.contains("exceeds the maximum"), "{reason}");

        // A hello larger than 16 KiB: before authentication nothing that large is read.
        let (code, reason) = close_after(cluster, &(20u32 << 10).to_be_bytes()).await?;
        assert_eq!(code, protocol);
        assert!(reason.contains("exceeds the maximum"), "{reason}");

        // A frame cut short.
        let mut truncated = 100u32.to_be_bytes().to_vec();
        truncated.extend_from_slice(&[1, 2, 3]);
        let (code, reason) = close_after(cluster, &truncated).await?;
        assert_eq!(code, protocol);
        assert!(reason.contains("truncated"), "{reason}");

        // A whole frame that is not a message.
        let mut garbage = 8u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xff; 8]);
        let (code, reason) = close_after(cluster, &garbage).await?;
        assert_eq!(code, protocol);
        assert!(reason.contains("malformed"), "{reason}");

        // Another protocol version: refused with a reason naming both.
        let hello = seedcast_core::frame::encode(
            &Hello {
                protocol: 99,
                role: Role::Client {
                    admin_secret: cluster.admin.secret.clone(),
                },
            },
            1 << 20,
        )?;
        let (code, reason) = close_after(cluster, &hello).await?;
        assert_eq!(code, close::VERSION as u64);
        assert!(
            reason.contains(&format!("speaks {PROTOCOL_VERSION}")) && reason.contains("99"),
            "{reason}"
        );

        // An authenticated client sending an oversized request frame gets an error too.
        let client = cluster.client().await?;
        let conn = common::raw_admin(cluster).await?;
        let (mut s2, _r2) = conn.open_bi().await?;
        s2.write_all(&(200u32 << 20).to_be_bytes()).await?;
        s2.finish()?;
        match tokio::time::timeout(Duration::from_secs(15), conn.closed()).await? {
            ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code.into_inner(), protocol);
                assert!(String::from_utf8_lossy(&c.reason).contains("exceeds"));
            }
            other => panic!("unexpected close: {other}"),
        }

        // The engine is unharmed: other clients carry on.
        assert_eq!(client.sites().await?.len(), 1);
        client.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_capped_and_authenticated_ones_are_not() -> Result<()> {
    common::with_engine(
        &SITES[..1],
        |c| c.max_unauthenticated = 3,
        async |cluster| {
            // Three peers connect (TLS done, address validated by a Retry) and say nothing.
            let mut silent = Vec::new();
            for _ in 0..3 {
                silent.push(common::raw_connect(cluster).await?);
            }
            // A fourth is refused outright while they hold their places.
            let e = common::raw_connect(cluster).await.unwrap_err();
            assert!(e.to_string().contains("refused"), "{e}");
            // So is the admin's client until a place frees (the site's agent, already
            // authenticated, keeps its connection: the push below reaches it).
            let client_err = cluster.client().await.unwrap_err();
            assert!(client_err.to_string().contains("refused"), "{client_err}");
            // Once the silent ones leave, the engine takes new peers again.
            for c in silent.drain(..) {
                c.close(0u32.into(), b"");
            }
            let client = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match cluster.client().await {
                        Ok(c) => return c,
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
            .await?;
            let files = make_image(&cluster.root.join("img"), 1, "cap")?;
            let s = push_wait(&client, "cap", &files, None).await?;
            assert_eq!(s.sites.len(), 1);
            // Authenticated connections hold no place: three clients at once are fine.
            let more = [
                cluster.client().await?,
                cluster.client().await?,
                cluster.client().await?,
            ];
            for c in more {
                assert_eq!(c.sites().await?.len(), 1);
                c.close().await;
            }
            client.close().await;
            Ok(())
        },
    )
    .await
}
