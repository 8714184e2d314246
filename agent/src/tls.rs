//! The agent's TLS setup: trust the hub only through the CA fingerprint pinned at
//! enrollment, and present the agent certificate on every session.
//!
//! No system trust store is consulted: an agent trusts the CA whose SHA-256 came in its
//! enrollment token, and the further CAs that hub announced over a verified session (a CA
//! rotation), nothing else.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The crypto provider every Gantry TLS context uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a DER certificate as lowercase hex: how CAs are pinned.
pub fn fingerprint_hex(der: &[u8]) -> String {
    gantry_shared::token::hex(&Sha256::digest(der))
}

/// Verifies the hub's certificate chain against the pinned CA fingerprints.
#[derive(Debug)]
pub struct PinnedCa {
    pins: Vec<[u8; 32]>,
    provider: Arc<CryptoProvider>,
    /// Set when the hub presented a chain without the pinned CA, so the caller can say so
    /// plainly instead of reporting a generic handshake failure.
    mismatch: Arc<AtomicBool>,
}

impl PinnedCa {
    /// A verifier pinning one CA.
    pub fn new(ca_sha256: [u8; 32]) -> (Arc<PinnedCa>, Arc<AtomicBool>) {
        Self::any_of(vec![ca_sha256])
    }

    /// A verifier accepting a hub chain that carries any of `pins`.
    pub fn any_of(pins: Vec<[u8; 32]>) -> (Arc<PinnedCa>, Arc<AtomicBool>) {
        let mismatch = Arc::new(AtomicBool::new(false));
        let verifier = PinnedCa { pins, provider: provider(), mismatch: mismatch.clone() };
        (Arc::new(verifier), mismatch)
    }
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
        let pinned = intermediates.iter().find(|c| self.pins.iter().any(|pin| Sha256::digest(c.as_ref()).as_slice() == pin));
        let Some(ca) = pinned else {
            self.mismatch.store(true, Ordering::SeqCst);
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("building verifier: {e}")))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A QUIC client config that pins `ca_sha256` and presents `identity` (chain and key), or
/// no client certificate when `identity` is `None` (enrollment).
pub fn client_config(
    ca_sha256: [u8; 32],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> anyhow::Result<(quinn::ClientConfig, Arc<AtomicBool>)> {
    client_config_pinning(vec![ca_sha256], identity)
}

/// Like [`client_config`], accepting a hub whose chain carries any of `pins`.
pub fn client_config_pinning(
    pins: Vec<[u8; 32]>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> anyhow::Result<(quinn::ClientConfig, Arc<AtomicBool>)> {
    let (verifier, mismatch) = PinnedCa::any_of(pins);
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![gantry_shared::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(30_000))))
        .keep_alive_interval(Some(std::time::Duration::from_secs(5)))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(4))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(4))
        .stream_receive_window(quinn::VarInt::from_u32(256 * 1024))
        .receive_window(quinn::VarInt::from_u32(1024 * 1024));
    config.transport_config(Arc::new(transport));
    Ok((config, mismatch))
}
