//! rustls configurations for the three roles: TLS 1.3 only, ALPN `seedcast/5`, ring as the
//! only crypto provider, the engine's CA pinned by fingerprint.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use seedcast_core::protocol::ALPN;

use crate::endpoint::TransportOptions;
use crate::pki::{EnginePki, fingerprint};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC needs TLS 1.3 with AES-128-GCM: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The engine's server configuration: presents its certificate and CA; asks for (but does
/// not require) a client certificate from the same CA. Peers without one may only enroll
/// (with the join secret) or act as clients (with the admin secret): the engine checks that
/// in the first message, before any image byte moves.
pub fn server_config(
    pki: &EnginePki,
    transport: &TransportOptions,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca_der().clone())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server_chain(), pki.server_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // No 0-RTT: early data is replayable and would reach the hello before the peer's
    // address is validated. (rustls's default; stated so a change is a visible one.)
    cfg.max_early_data_size = 0;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(cfg)?));
    sc.transport_config(transport.to_config());
    Ok(sc)
}

/// A dialer's configuration: trusts exactly the CA whose fingerprint it was given, and
/// presents `identity` (an enrolled site's certificate and key) when it has one.
pub fn client_config(
    ca_fingerprint: [u8; 32],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    transport: &TransportOptions,
) -> Result<quinn::ClientConfig, TlsError> {
    let cfg = client_crypto(ca_fingerprint, identity)?;
    let mut cc = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(cfg)?));
    cc.transport_config(transport.to_config());
    Ok(cc)
}

/// The rustls half of [`client_config`] (for tests that change one setting, e.g. ask for
/// 0-RTT the engine must refuse).
pub fn client_crypto(
    ca_fingerprint: [u8; 32],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let p = provider();
    let builder = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            fingerprint: ca_fingerprint,
            provider: p,
        }));
    let mut cfg = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = false;
    Ok(cfg)
}

/// Accepts the engine's certificate only if the chain carries the CA with the pinned
/// fingerprint and the certificate is valid under that CA for the engine's name.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The first certificate a peer presented, if any (the engine's view of an agent).
pub fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}
