//! QUIC endpoint setup for agent connections: TLS 1.3 with the hub's server certificate,
//! client certificates verified against every CA the hub trusts (optional at the TLS layer,
//! because enrollment connections have none; the session layer refuses anything but
//! enrollment without one), and every transport limit set explicitly from [`QuicLimits`].

use crate::config::{Config, QuicLimits};
use crate::pki::Pki;
use anyhow::Context;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::sync::Arc;
use std::time::Duration;

/// Keep-alive interval: keeps NAT bindings open and detects dead paths between heartbeats.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Transport parameters from the configured limits.
pub fn transport_config(limits: &QuicLimits) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::VarInt::from_u64(limits.idle_timeout_secs.saturating_mul(1000)).unwrap_or(quinn::VarInt::MAX);
    transport
        .max_idle_timeout(Some(quinn::IdleTimeout::from(idle)))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .stream_receive_window(quinn::VarInt::from_u32(limits.stream_receive_window))
        .receive_window(quinn::VarInt::from_u32(limits.receive_window))
        .send_window(limits.send_window)
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(limits.max_concurrent_bidi_streams))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(limits.max_concurrent_uni_streams))
        .datagram_receive_buffer_size(None);
    transport
}

/// The QUIC server config for `pki` and `config`.
pub fn server_config(pki: &Pki, config: &Config) -> anyhow::Result<quinn::ServerConfig> {
    let provider = gantry_agent::tls::provider();
    let mut roots = RootCertStore::empty();
    // Every CA the hub trusts (current, next, retiring), so agents keep connecting across
    // a CA rotation.
    for ca in pki.trusted_ders() {
        roots.add(ca).context("adding a CA to the client trust store")?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .context("building the client certificate verifier")?;
    let (chain, key) = pki.server_identity()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("loading the server certificate")?;
    tls.alpn_protocols = vec![gantry_shared::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(transport_config(&config.quic)));
    server.max_incoming(config.quic.max_incoming);
    server.migration(true);
    Ok(server)
}
