//! Dialling the engine and saying hello: the one way clients and agents open a session.
//!
//! [`dial`] resolves `host:port`, binds a client endpoint of the same address family and
//! completes the QUIC/TLS handshake (the engine is verified by the CA pin in the client
//! configuration, for [`SERVER_NAME`] whatever address it is reached by). [`hello`] opens
//! the control stream and exchanges [`Hello`] / [`HelloReply`].

use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream};
use seedcast_core::protocol::{Hello, HelloReply, PROTOCOL_VERSION, Role, SERVER_NAME};

use crate::endpoint::TransportOptions;
use crate::framed::{FramedError, read_msg_required, write_msg};

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot reach the engine at {addr}: {why}")]
    Unreachable { addr: String, why: String },
    /// The engine closed the connection during the handshake (for example, refused it).
    #[error("connection: {0}")]
    Connection(ConnectionError),
}

/// Connect to the engine at `addr` (`host:port`) with TLS configuration `cc`. The endpoint
/// is returned too: keep it alive for as long as the connection.
pub async fn dial(
    addr: &str,
    cc: quinn::ClientConfig,
    transport: &TransportOptions,
) -> Result<(Endpoint, Connection), DialError> {
    let unreachable = |why: String| DialError::Unreachable {
        addr: addr.to_string(),
        why,
    };
    let target = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("no address".into()))?;
    let ep = crate::endpoint::client(target, transport).map_err(|e| unreachable(e.to_string()))?;
    let conn = ep
        .connect_with(cc, target, SERVER_NAME)
        .map_err(|e| unreachable(e.to_string()))?
        .await
        .map_err(|e| match e {
            ConnectionError::TransportError(t) => {
                unreachable(format!("TLS/QUIC handshake failed: {t}"))
            }
            ConnectionError::TimedOut => unreachable("timed out".into()),
            e => DialError::Connection(e),
        })?;
    Ok((ep, conn))
}

/// Open the control stream, say hello in `role`, and read the engine's reply.
pub async fn hello(
    conn: &Connection,
    role: Role,
) -> Result<(SendStream, RecvStream, HelloReply), FramedError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        role,
    };
    write_msg(&mut send, &hello).await?;
    let reply = read_msg_required(&mut recv).await?;
    Ok((send, recv, reply))
}
