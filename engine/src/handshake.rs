//! The first exchange of every connection: read its [`Hello`] within [`HELLO_TIMEOUT`],
//! answer `Welcome`, or refuse and close with a [`close`] code naming why.
//!
//! Client and agent sessions both start here; keeping it apart from the accept loop
//! (`server`) is what lets the sessions use it without depending on the server.

use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream, VarInt};
use seedcast_core::protocol::{
    Hello, HelloReply, MAX_HELLO_SIZE, PROTOCOL_VERSION, RefuseReason, close,
};
use seedcast_net::{FramedError, read_msg_limited, write_msg};
use tracing::{info, warn};

use crate::state::Shared;

/// How long a dialer has to complete the handshake and say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection's control stream with the hello read from it.
pub(crate) type Greeted = (SendStream, RecvStream, Hello);

/// Accept the control stream and read the hello, closing the connection (with the reason)
/// when the peer is too slow or breaks the framing.
pub(crate) async fn read_hello(conn: &Connection) -> Option<Greeted> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await?;
        // Not authenticated yet: a hello is small, and nothing larger is read.
        let hello: Hello = read_msg_limited(&mut recv, MAX_HELLO_SIZE)
            .await?
            .ok_or(FramedError::UnexpectedEnd)?;
        Ok::<_, FramedError>((send, recv, hello))
    })
    .await;
    match first {
        Err(_) => {
            conn.close(VarInt::from_u32(close::PROTOCOL), b"no hello in time");
            None
        }
        Ok(Err(e)) => {
            if e.is_protocol_violation() {
                close_for_violation(conn, &e);
            }
            None
        }
        Ok(Ok(x)) => Some(x),
    }
}

/// Refuse a hello of another protocol version; `true` when it was refused.
pub(crate) async fn refuse_other_version(
    conn: &Connection,
    send: &mut SendStream,
    hello: &Hello,
) -> bool {
    if hello.protocol == PROTOCOL_VERSION {
        return false;
    }
    let msg = format!(
        "protocol version mismatch: the engine speaks {PROTOCOL_VERSION}, the peer {}",
        hello.protocol
    );
    refuse(conn, send, RefuseReason::ProtocolVersion, msg).await;
    true
}

/// The reply to an accepted hello.
pub(crate) fn welcome(shared: &Shared) -> HelloReply {
    HelloReply::Welcome {
        protocol: PROTOCOL_VERSION,
        engine_id: shared.id.clone(),
        chunking: shared.cfg.chunking,
        signing_key: shared.signer.public_key(),
    }
}

/// Refuse a dialer: tell it why on the control stream, give it a moment to read that, close.
pub(crate) async fn refuse(
    conn: &Connection,
    send: &mut SendStream,
    reason: RefuseReason,
    message: String,
) {
    let code = match reason {
        RefuseReason::ProtocolVersion => close::VERSION,
        RefuseReason::BadRequest => close::PROTOCOL,
        _ => close::REFUSED,
    };
    info!(remote = %conn.remote_address(), ?reason, "refused: {message}");
    let _ = write_msg(
        send,
        &HelloReply::Refused {
            reason,
            message: message.clone(),
        },
    )
    .await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(VarInt::from_u32(code), message.as_bytes());
}

/// Close a connection whose peer broke the framing rules, saying what was wrong.
pub(crate) fn close_for_violation(conn: &Connection, e: &FramedError) {
    close_protocol(conn, &e.to_string());
}

/// Close a connection whose peer broke the protocol, saying how.
pub(crate) fn close_protocol(conn: &Connection, why: &str) {
    warn!(remote = %conn.remote_address(), "protocol violation: {why}");
    conn.close(VarInt::from_u32(close::PROTOCOL), why.as_bytes());
}
