//! `gantry-agent preflight`: can this machine reach the hub a token names? The installer runs
//! it before it installs anything.
//!
//! It makes a real QUIC handshake (UDP) to the token's hub address and verifies the hub by the
//! CA fingerprint the token pins, exactly as enrollment will, then closes the connection
//! without sending anything: no token is spent and nothing is written.

use crate::enroll::EnrollError;
use gantry_shared::token::EnrollmentToken;
use std::net::SocketAddr;
use std::time::Duration;

/// A successful probe.
#[derive(Debug, Clone)]
pub struct Probe {
    /// `HOST:PORT` from the token.
    pub hub_addr: String,
    /// The address it resolved to.
    pub remote: SocketAddr,
    /// How long the QUIC and TLS handshake took.
    pub handshake: Duration,
}

/// Handshake with the hub named in `token_text` within `timeout`.
pub async fn probe(token_text: &str, timeout: Duration) -> Result<Probe, EnrollError> {
    let token = EnrollmentToken::parse(token_text)?;
    let silent = format!("no QUIC answer within {} s (is UDP to that port blocked?)", timeout.as_secs());
    let hub_addr = token.hub_addr.clone();
    crate::enroll::with_hub(&token, timeout, &silent, |connection, remote, handshake| async move {
        connection.close(0u32.into(), b"preflight done");
        Ok(Probe { hub_addr, remote, handshake })
    })
    .await
}
