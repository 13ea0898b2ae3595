//! seedcast-net: what all three roles need to talk: QUIC endpoints, TLS and the engine's
//! small PKI, and framed messages over QUIC streams.
//!
//! - [`pki`]: the engine's CA, its server certificate, per-site certificates, and the site /
//!   join / admin tokens that carry the CA fingerprint (kubeadm / k3s style).
//! - [`signing`]: the engine's manifest signing key (ed25519, apart from TLS) and the
//!   agents' check.
//! - [`tls`]: rustls configurations (TLS 1.3 only, ALPN `seedcast/7`, CA pinning).
//! - [`endpoint`]: quinn endpoints and the transport tuning they share.
//! - [`congestion`]: the congestion controller per connection, switchable once the peer is known;
//!   [`delivery`]: seedcast's BBR-style controller for thin and far links.
//! - [`dial`]: dialling the engine and the hello exchange (clients and agents alike).
//! - [`framed`]: read and write [`seedcast_core::frame`]s on quinn streams.

pub mod congestion;
pub mod delivery;
pub mod dial;
pub mod endpoint;
pub mod framed;
pub mod pki;
pub mod signing;
pub mod tls;

pub use framed::{
    FramedError, read_msg, read_msg_limited, read_msg_required, read_payload, write_msg,
};
