//! Enrollment: minting tokens, and turning a valid token plus a CSR into an agent with a
//! certificate.
//!
//! The token secret is stored as SHA-256 and compared in constant time. The use count, the
//! org's agent limit and the agent record change together in one store transaction, so a
//! single-use token enrolls exactly one agent however many try at once. A refused
//! enrollment writes nothing.

use crate::auth::random_hex;
use crate::store::{self, Agent, EnrollError, Token};
use crate::Hub;
use gantry_shared::message::{EnrollRefusal, EnrollRequest, Enrolled};
use gantry_shared::token::{hex, EnrollmentToken};
use sha2::{Digest, Sha256};
use std::time::Duration;
use subtle::ConstantTimeEq;

/// Longest token lifetime accepted.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Most uses one token may have.
pub const MAX_TOKEN_USES: u32 = 100_000;
/// Most labels per token, and the longest key or value.
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_CHARS: usize = 63;

/// What an operator asks for when creating a token.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub org: String,
    pub ttl: Duration,
    pub uses: u32,
    pub labels: Vec<(String, String)>,
    pub created_by: String,
}

/// A freshly minted token: the text is shown once and never stored.
#[derive(Debug, Clone)]
pub struct MintedToken {
    pub record: Token,
    pub text: String,
}

/// Why a token request was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenRequestError {
    #[error("{0}")]
    Invalid(String),
    #[error("org {0} not found")]
    UnknownOrg(String),
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// Check one label: lowercase-ish DNS-label-like keys, printable values.
pub fn validate_label(key: &str, value: &str) -> Result<(), String> {
    let key_ok = !key.is_empty() && key.len() <= MAX_LABEL_CHARS && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
    if !key_ok {
        return Err(format!("label key {key:?} must be 1-{MAX_LABEL_CHARS} characters of a-z, 0-9, '-', '_', '.', '/'"));
    }
    if value.len() > MAX_LABEL_CHARS || value.chars().any(|c| c.is_control()) {
        return Err(format!("label value for {key:?} must be at most {MAX_LABEL_CHARS} printable characters"));
    }
    Ok(())
}

/// Mint a token for `request`, validating everything before writing.
pub fn create_token(hub: &Hub, request: TokenRequest) -> Result<MintedToken, TokenRequestError> {
    if request.ttl.is_zero() || request.ttl > MAX_TOKEN_TTL {
        return Err(TokenRequestError::Invalid(format!("ttl must be between 1 second and {} days", MAX_TOKEN_TTL.as_secs() / 86400)));
    }
    if request.uses == 0 || request.uses > MAX_TOKEN_USES {
        return Err(TokenRequestError::Invalid(format!("uses must be between 1 and {MAX_TOKEN_USES}")));
    }
    if request.labels.len() > MAX_LABELS {
        return Err(TokenRequestError::Invalid(format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in &request.labels {
        validate_label(k, v).map_err(TokenRequestError::Invalid)?;
    }
    if hub.store.org(&request.org)?.is_none() {
        return Err(TokenRequestError::UnknownOrg(request.org));
    }
    let now = crate::wall_ms();
    let id = format!("tok_{}", random_hex(8));
    // 256 random bits; the issue floor is 128.
    let secret = random_hex(32);
    let record = Token {
        id: id.clone(),
        org: request.org,
        secret_sha256: hex(&Sha256::digest(secret.as_bytes())),
        labels: request.labels,
        expires_at_ms: now.saturating_add(request.ttl.as_millis() as i64),
        uses_total: request.uses,
        uses_left: request.uses,
        revoked: false,
        created_by: request.created_by,
        created_at_ms: now,
    };
    hub.store.create_token(&record)?;
    let text = EnrollmentToken { hub_addr: hub.public_addr.clone(), ca_sha256: hub.pki.ca_sha256(), id, secret }.encode();
    Ok(MintedToken { record, text })
}

fn refusal_label(refusal: &EnrollRefusal) -> &'static str {
    match refusal {
        EnrollRefusal::MalformedToken => "malformed",
        EnrollRefusal::UnknownToken => "unknown_token",
        EnrollRefusal::TokenExpired => "expired",
        EnrollRefusal::TokenUsedUp => "used_up",
        EnrollRefusal::OrgAtAgentLimit { .. } => "org_limit",
        EnrollRefusal::OrgRefused { .. } => "org_refused",
        EnrollRefusal::InvalidCsr { .. } => "malformed",
        EnrollRefusal::InvalidLabels { .. } => "malformed",
        EnrollRefusal::Internal => "error",
    }
}

/// Handle one enrollment request; counts the outcome.
pub fn enroll(hub: &Hub, request: &EnrollRequest) -> Result<Enrolled, EnrollRefusal> {
    let result = enroll_inner(hub, request);
    match &result {
        Ok(enrolled) => {
            hub.metrics.enrollment("ok");
            tracing::info!(agent_id = %enrolled.agent_id, org = %enrolled.org, hostname = %request.facts.hostname, "agent enrolled");
            crate::webhooks::agent_event(hub, "agent.enrolled", &enrolled.agent_id);
        }
        Err(refusal) => {
            hub.metrics.enrollment(refusal_label(refusal));
            tracing::info!(token_id = %request.token_id, %refusal, "enrollment refused");
        }
    }
    result
}

fn enroll_inner(hub: &Hub, request: &EnrollRequest) -> Result<Enrolled, EnrollRefusal> {
    let internal = |e: store::Error| {
        tracing::error!(error = %e, "store error during enrollment");
        EnrollRefusal::Internal
    };
    if request.token_id.len() > 64 || request.token_secret.len() > 256 || request.csr_der.len() > 16 * 1024 {
        return Err(EnrollRefusal::MalformedToken);
    }
    let token = hub.store.token(&request.token_id).map_err(internal)?.ok_or(EnrollRefusal::UnknownToken)?;
    let presented = hex(&Sha256::digest(request.token_secret.as_bytes()));
    if !bool::from(presented.as_bytes().ct_eq(token.secret_sha256.as_bytes())) {
        return Err(EnrollRefusal::UnknownToken);
    }
    let labels = merge_labels(&token.labels, &request.labels).map_err(|reason| EnrollRefusal::InvalidLabels { reason })?;
    let agent_id = format!("agt_{}", random_hex(8));
    let lifetime = Duration::from_secs(hub.config.agent_cert_lifetime_secs);
    let cert = hub.pki.sign_agent_csr(&request.csr_der, &agent_id, &token.org, lifetime).map_err(|reason| EnrollRefusal::InvalidCsr { reason })?;
    let now = crate::wall_ms();
    let facts = &request.facts;
    let agent = Agent {
        id: agent_id.clone(),
        org: token.org.clone(),
        labels: labels.clone(),
        hostname: truncate(&facts.hostname, 253),
        os: truncate(&facts.os, 128),
        kernel: truncate(&facts.kernel, 128),
        arch: truncate(&facts.arch, 32),
        cpu_count: facts.cpu_count,
        memory_bytes: facts.memory_bytes,
        agent_version: truncate(&facts.agent_version, 64),
        enrolled_at_ms: now,
        enrolled_with_token: token.id.clone(),
        cert_sha256: cert.sha256.clone(),
        cert_not_after_ms: cert.not_after_unix.saturating_mul(1000),
        ..Agent::default()
    };
    match hub.store.enroll(&token.id, now, &agent).map_err(internal)? {
        Ok(_) => Ok(Enrolled {
            agent_id,
            org: token.org,
            cert_chain_der: vec![cert.der, hub.pki.signing_ca_der().to_vec()],
            not_after_unix: cert.not_after_unix,
            labels,
        }),
        Err(EnrollError::UnknownToken) => Err(EnrollRefusal::UnknownToken),
        Err(EnrollError::TokenExpired) => Err(EnrollRefusal::TokenExpired),
        Err(EnrollError::TokenUsedUp) | Err(EnrollError::TokenRevoked) => Err(EnrollRefusal::TokenUsedUp),
        Err(EnrollError::UnknownOrg) => Err(EnrollRefusal::OrgRefused { reason: "organisation no longer exists".into() }),
        Err(EnrollError::OrgSuspended) => Err(EnrollRefusal::OrgRefused { reason: "organisation is suspended".into() }),
        Err(EnrollError::OrgAtAgentLimit { limit }) => Err(EnrollRefusal::OrgAtAgentLimit { limit }),
    }
}

/// The token's labels plus those the machine asked for (checked like a token's); on a key
/// both name, the token's value wins, since the operator chose it.
pub fn merge_labels(token: &[(String, String)], requested: &[(String, String)]) -> Result<Vec<(String, String)>, String> {
    if requested.len() > MAX_LABELS {
        return Err(format!("at most {MAX_LABELS} labels"));
    }
    let mut labels = token.to_vec();
    for (key, value) in requested {
        validate_label(key, value)?;
        if !labels.iter().any(|(k, _)| k == key) {
            labels.push((key.clone(), value.clone()));
        }
    }
    if labels.len() > MAX_LABELS {
        return Err(format!("at most {MAX_LABELS} labels in all (the token brings {})", token.len()));
    }
    Ok(labels)
}

/// `s` cut to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}
