//! `gantry-agent deregister`: a request, signed with this agent's own key, asking the hub to
//! revoke the agent (the installer's `--purge`).
//!
//! The hub accepts it only with the certificate it last saw this agent use and a signature by
//! that certificate's key over [`signed_text`], issued within a few minutes of the hub's
//! clock. The agent only signs and prints; the installer sends it over HTTP, so this crate
//! still speaks no HTTP.

use crate::state::StateDir;
use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Body of `POST /api/v1/agents/{id}/deregister`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeregisterRequest {
    /// When the request was signed, Unix milliseconds (the hub refuses stale ones).
    pub issued_at_ms: i64,
    /// The agent's certificate (leaf), PEM.
    pub certificate: String,
    /// ECDSA P-256 / SHA-256 signature (ASN.1 DER, hex) of [`signed_text`].
    pub signature: String,
}

/// The exact bytes signed: a fixed purpose line, the agent id and the time.
pub fn signed_text(agent_id: &str, issued_at_ms: i64) -> String {
    format!("gantry-deregister-v1\n{agent_id}\n{issued_at_ms}\n")
}

/// The enrolled agent's id and a signed request to revoke it, made now.
pub fn request(state: &StateDir) -> anyhow::Result<(String, DeregisterRequest)> {
    use rcgen::SigningKey;
    let identity = state.load_identity().context("this machine is not enrolled")?;
    let key_pem = std::fs::read_to_string(state.key_path()).with_context(|| format!("reading {}", state.key_path().display()))?;
    let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| anyhow::anyhow!("parsing {}: {e}", state.key_path().display()))?;
    let (chain, _) = state.load_credentials()?;
    let certificate = crate::state::pem_of("CERTIFICATE", chain.first().context("no certificate")?.as_ref());
    let issued_at_ms = crate::wall_ms();
    let signature = key.sign(signed_text(&identity.agent_id, issued_at_ms).as_bytes()).map_err(|e| anyhow::anyhow!("signing: {e}"))?;
    Ok((identity.agent_id, DeregisterRequest { issued_at_ms, certificate, signature: gantry_shared::token::hex(&signature) }))
}
