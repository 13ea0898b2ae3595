//! One connection to the engine: say hello as the site, report what it holds, then serve
//! the engine's deployments one at a time while the data streams (and the engine's probe
//! streams, `seedcast bench site`) are accepted alongside.

use quinn::{Connection, RecvStream, SendStream};
use seedcast_core::ChunkerConfig;
use seedcast_core::protocol::{AgentMsg, EngineMsg, HelloReply, Role};
use seedcast_net::dial::hello;
use seedcast_net::pki::SiteCredentials;
use seedcast_net::{read_msg, write_msg};
use tracing::{info, warn};

use crate::agent::Agent;
use crate::error::AgentError;
use crate::receive::{Slot, accept_data_streams};

/// The control stream and the transfer slot, as a deployment uses them.
pub(crate) struct Control<'a> {
    pub conn: &'a Connection,
    pub send: &'a mut SendStream,
    pub slot: &'a Slot,
    /// The engine's manifest signing key, as pinned.
    pub signing_key: [u8; 32],
}

impl Agent {
    /// Serve one connection until it ends. `welcomed` is set once the engine accepted it.
    pub(crate) async fn serve(
        &self,
        conn: &Connection,
        creds: &SiteCredentials,
        welcomed: &mut bool,
    ) -> Result<(), AgentError> {
        let role = Role::Agent {
            site: self.cfg.site.clone(),
            adapter: self.adapter.kind().to_string(),
        };
        let (mut send, mut recv, reply) = hello(conn, role).await?;
        let (chunking, presented) = self.welcomed(reply)?;
        let signing_key = self.pin_signing_key(creds, presented).await?;
        *welcomed = true;
        let db = self.db.clone();
        let inventory = tokio::task::spawn_blocking(move || db.reported_inventory()).await??;
        write_msg(&mut send, &AgentMsg::Inventory { images: inventory }).await?;

        let slot = Slot::default();
        let streams =
            accept_data_streams(conn.clone(), slot.clone(), self.db.clone(), chunking.max);
        let probes = crate::probe::accept_probes(conn.clone(), self.cfg.data.clone(), chunking.max);
        let mut ctl = Control {
            conn,
            send: &mut send,
            slot: &slot,
            signing_key,
        };
        tokio::select! {
            r = self.control(&mut ctl, &mut recv) => r,
            r = streams => r,
            r = probes => r,
        }
    }

    /// The chunking the engine expects and its signing key, from its welcome; or why it
    /// did not welcome us.
    fn welcomed(&self, reply: HelloReply) -> Result<(ChunkerConfig, [u8; 32]), AgentError> {
        match reply {
            HelloReply::Welcome {
                engine_id,
                chunking,
                signing_key,
                ..
            } => {
                info!(site = %self.cfg.site, engine = %engine_id, "connected");
                Ok((chunking, signing_key))
            }
            HelloReply::Refused { reason, message } => Err(AgentError::Refused { reason, message }),
            HelloReply::Enrolled { .. } => Err(AgentError::Protocol("unexpected Enrolled")),
        }
    }

    /// The signing key to check manifests against: the one pinned at enrollment, which the
    /// engine must present again; credentials from before manifests were signed pin the
    /// one presented now (over the CA-pinned connection) and keep it.
    async fn pin_signing_key(
        &self,
        creds: &SiteCredentials,
        presented: [u8; 32],
    ) -> Result<[u8; 32], AgentError> {
        match creds.signing_key {
            Some(pinned) if pinned == presented => Ok(pinned),
            Some(pinned) => Err(AgentError::SigningKeyChanged {
                pinned: hex::encode(pinned),
                presented: hex::encode(presented),
            }),
            None => {
                let dir = self.cfg.data.clone();
                tokio::task::spawn_blocking(move || {
                    if let Some(mut c) = SiteCredentials::load(&dir)? {
                        c.signing_key = Some(presented);
                        c.save(&dir)?;
                    }
                    Ok::<_, AgentError>(())
                })
                .await??;
                info!(site = %self.cfg.site, key = %hex::encode(&presented[..8]), "pinned the engine's manifest signing key");
                Ok(presented)
            }
        }
    }

    /// The engine's messages, one deployment at a time, until it finishes the stream.
    async fn control(
        &self,
        ctl: &mut Control<'_>,
        recv: &mut RecvStream,
    ) -> Result<(), AgentError> {
        loop {
            match read_msg::<EngineMsg>(recv).await? {
                None => return Ok(()),
                Some(EngineMsg::Deploy {
                    transfer,
                    manifest,
                    signature,
                }) => {
                    self.deploy(ctl, transfer, manifest, &signature).await?;
                }
                Some(EngineMsg::DeployDelta {
                    transfer,
                    base,
                    manifest_id,
                    delta,
                    signature,
                }) => match self.rebuild_manifest(base, delta, manifest_id).await {
                    Ok(manifest) => self.deploy(ctl, transfer, manifest, &signature).await?,
                    Err(e) => {
                        warn!(transfer, "{e}");
                        let error = e.to_string();
                        write_msg(ctl.send, &AgentMsg::Failed { transfer, error }).await?;
                    }
                },
                Some(EngineMsg::Renewed { .. } | EngineMsg::RenewRefused { .. }) => {
                    return Err(AgentError::Protocol(
                        "a renewal answer on the control stream",
                    ));
                }
            }
        }
    }
}
