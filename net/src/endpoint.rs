//! quinn endpoints and the transport settings every role shares.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Endpoint, TransportConfig, VarInt};
use seedcast_core::protocol::Congestion;

use crate::congestion::{Choice, SwitchableFactory};

/// Transport tuning, with the scenario each value is for.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// Keep-alive, so idle agents stay connected through NATs and idle timeouts. 5 s.
    pub keep_alive: Duration,
    /// A peer silent this long is gone (agents then reconnect). 30 s.
    pub idle_timeout: Duration,
    /// Per-stream receive window. 8 MiB: above the 1.25 MB default, which caps a stream at
    /// 1.25 MB per round trip (too little on a WAN).
    pub stream_window: u32,
    /// Per-connection receive window. 32 MiB.
    pub connection_window: u32,
    /// Per-connection send window: stream data a sender keeps buffered (sent and not yet
    /// acknowledged, or not yet sent). 8 MiB: enough for a 1.6 Gbit/s link at 40 ms of
    /// round trip. An engine holds it for every connected site: at 32 MiB (the receive
    /// window's size, used before) twenty sites seeded at once peaked at 789 MiB of engine
    /// memory, at 8 MiB at 356 MiB, as fast (`bench/src/bin/engine_memory.rs`).
    pub send_window: u64,
    /// Concurrent streams a peer may open (chunk streams are short-lived). 256.
    pub max_streams: u32,
    /// UDP socket send and receive buffers. 4 MiB: with the kernel's default (~208 KiB) a
    /// receiver busy with several transfers drops datagrams even on loopback, and every drop
    /// is resent. The kernel caps it at `net.core.rmem_max` / `wmem_max`.
    pub socket_buffer: usize,
    /// The congestion controller a connection starts with (the engine may switch a site's
    /// connection to the one chosen for it). Cubic.
    pub congestion: Congestion,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            stream_window: 8 << 20,
            connection_window: 32 << 20,
            send_window: 8 << 20,
            max_streams: 256,
            socket_buffer: 4 << 20,
            congestion: Congestion::Cubic,
        }
    }
}

impl TransportOptions {
    pub fn to_config(&self) -> Arc<TransportConfig> {
        self.to_config_choosing(Choice::default())
    }

    /// As [`TransportOptions::to_config`], the connection's controller following `choice`
    /// once it is set (see [`crate::congestion`]).
    pub fn to_config_choosing(&self, choice: Choice) -> Arc<TransportConfig> {
        let mut t = TransportConfig::default();
        t.keep_alive_interval(Some(self.keep_alive));
        t.max_idle_timeout(Some(
            self.idle_timeout
                .try_into()
                .unwrap_or_else(|_| VarInt::from_u32(30_000).into()),
        ));
        t.stream_receive_window(VarInt::from_u32(self.stream_window));
        t.receive_window(VarInt::from_u32(self.connection_window));
        t.send_window(self.send_window);
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_streams));
        t.max_concurrent_uni_streams(VarInt::from_u32(self.max_streams));
        t.congestion_controller_factory(Arc::new(SwitchableFactory {
            default: self.congestion,
            choice,
        }));
        Arc::new(t)
    }
}

/// A UDP socket with the buffers `opts` asks for (as far as the kernel allows).
fn socket(addr: SocketAddr, opts: &TransportOptions) -> std::io::Result<std::net::UdpSocket> {
    let sock = std::net::UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&sock).into())?;
    let _ = state.set_recv_buffer_size((&sock).into(), opts.socket_buffer);
    let _ = state.set_send_buffer_size((&sock).into(), opts.socket_buffer);
    if let Ok(got) = state.recv_buffer_size((&sock).into())
        && got < opts.socket_buffer
    {
        tracing::debug!(
            wanted = opts.socket_buffer,
            got,
            "UDP receive buffer capped by the kernel (raise net.core.rmem_max)"
        );
    }
    Ok(sock)
}

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    opts: &TransportOptions,
) -> std::io::Result<Endpoint> {
    Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket(addr, opts)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// A server endpoint (the engine).
pub fn server(
    addr: SocketAddr,
    config: quinn::ServerConfig,
    opts: &TransportOptions,
) -> std::io::Result<Endpoint> {
    endpoint(addr, Some(config), opts)
}

/// A client endpoint on an ephemeral port of the same address family as `target`.
pub fn client(target: SocketAddr, opts: &TransportOptions) -> std::io::Result<Endpoint> {
    let bind: SocketAddr = if target.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    endpoint(bind, None, opts)
}
