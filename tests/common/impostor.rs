//! An engine impersonator for tests of what an agent accepts: it holds the real engine's
//! TLS keys (so the agent's CA pin is satisfied) and speaks the protocol by hand, sending
//! whatever a test scripts — forged, replayed or damaged.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use seedcast::cluster::LocalCluster;
use seedcast_core::ChunkerConfig;
use seedcast_core::protocol::{
    AgentMsg, DataRecord, DataStreamHeader, EngineMsg, Hello, HelloReply, PROTOCOL_VERSION,
};
use seedcast_net::endpoint::TransportOptions;
use seedcast_net::pki::EnginePki;
use seedcast_net::signing::ManifestSigner;
use seedcast_net::{read_msg_required, write_msg};

pub struct Impostor {
    pub endpoint: quinn::Endpoint,
    /// The real engine's manifest signing key (for tests of a faulty but genuine engine).
    pub genuine: ManifestSigner,
    /// A signing key of the impostor's own.
    pub own: ManifestSigner,
}

impl Impostor {
    /// Copy the cluster engine's TLS keys (not its signing key) and listen on 127.0.0.1.
    pub fn new(cluster: &LocalCluster) -> Result<Impostor> {
        let dir = cluster.root.join("impostor");
        std::fs::create_dir_all(dir.join("tls"))?;
        for f in ["ca.key", "ca.der", "engine.key", "engine.der"] {
            std::fs::copy(
                cluster.engine_dir().join("tls").join(f),
                dir.join("tls").join(f),
            )?;
        }
        let pki = EnginePki::load_or_create(&dir, false)?;
        let genuine = ManifestSigner::load_or_create(&cluster.engine_dir().join("signing.key"))?;
        let own = ManifestSigner::load_or_create(&dir.join("signing.key"))?;
        ensure!(own.public_key() != genuine.public_key());
        let t = TransportOptions::default();
        let sc = seedcast_net::tls::server_config(&pki, &t)?;
        let endpoint = seedcast_net::endpoint::server("127.0.0.1:0".parse()?, sc, &t)?;
        Ok(Impostor {
            endpoint,
            genuine,
            own,
        })
    }

    pub fn addr(&self) -> Result<std::net::SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Accept the next agent connection and welcome it presenting `signing_key`.
    pub async fn accept(&self, signing_key: [u8; 32]) -> Result<Session> {
        let incoming = tokio::time::timeout(Duration::from_secs(20), self.endpoint.accept())
            .await?
            .context("endpoint closed")?;
        let conn = incoming.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let hello: Hello = read_msg_required(&mut recv).await?;
        ensure!(hello.protocol == PROTOCOL_VERSION, "{hello:?}");
        let welcome = HelloReply::Welcome {
            protocol: PROTOCOL_VERSION,
            engine_id: "impostor".into(),
            chunking: ChunkerConfig::default(),
            signing_key,
        };
        write_msg(&mut send, &welcome).await?;
        Ok(Session { conn, send, recv })
    }
}

pub struct Session {
    pub conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Session {
    /// The agent's next control message (20 s at most).
    pub async fn next(&mut self) -> Result<AgentMsg> {
        Ok(
            tokio::time::timeout(Duration::from_secs(20), read_msg_required(&mut self.recv))
                .await??,
        )
    }

    pub async fn send(&mut self, msg: &EngineMsg) -> Result<()> {
        Ok(write_msg(&mut self.send, msg).await?)
    }

    /// One data stream for `transfer` carrying `records`, each followed by its payload.
    pub async fn data(&self, transfer: u64, records: Vec<(DataRecord, Vec<u8>)>) -> Result<()> {
        let mut s = self.conn.open_uni().await?;
        write_msg(&mut s, &DataStreamHeader { transfer }).await?;
        for (r, payload) in records {
            write_msg(&mut s, &r).await?;
            s.write_all(&payload).await?;
        }
        s.finish()?;
        Ok(())
    }

    pub fn close(&self) {
        self.conn.close(0u32.into(), b"done");
    }
}
