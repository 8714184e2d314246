//! Enrollment: trade a token for an identity. Makes a key pair, sends a CSR over a QUIC
//! connection that pins the hub CA from the token, and saves key, certificate and identity.
//!
//! Every failure has its own error with a message an operator can act on.

use crate::state::{Identity, StateDir};
use gantry_shared::message::{AgentMessage, EnrollRefusal, EnrollRequest, HostFacts, HubMessage};
use gantry_shared::token::{EnrollmentToken, TokenError};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("malformed enrollment token: {0}")]
    MalformedToken(#[from] TokenError),
    #[error("this machine is already enrolled as {agent_id} in {dir}; pass --force to enroll again")]
    AlreadyEnrolled { agent_id: String, dir: String },
    #[error("hub unreachable at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("hub CA fingerprint mismatch: the server at {addr} is not the hub that issued this token (expected CA {expected}); check the address or ask for a new token")]
    CaMismatch { addr: String, expected: String },
    #[error("hub refused enrollment: {0}")]
    Refused(EnrollRefusal),
    #[error("protocol error during enrollment: {0}")]
    Protocol(String),
    #[error("{0:#}")]
    Local(#[from] anyhow::Error),
}

/// The outcome of a successful enrollment.
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub identity: Identity,
    pub not_after_unix: i64,
}

/// Enroll with `token_text`, saving the identity in `state`.
pub async fn enroll(token_text: &str, state: &StateDir, force: bool, timeout: Duration) -> Result<Enrollment, EnrollError> {
    enroll_with_labels(token_text, state, force, timeout, Vec::new()).await
}

/// [`enroll`], asking the hub for `labels` besides the token's own (the token's win).
pub async fn enroll_with_labels(
    token_text: &str,
    state: &StateDir,
    force: bool,
    timeout: Duration,
    labels: Vec<(String, String)>,
) -> Result<Enrollment, EnrollError> {
    let token = EnrollmentToken::parse(token_text)?;
    if state.is_enrolled() && !force {
        let agent_id = state.load_identity().map(|i| i.agent_id).unwrap_or_else(|_| "an unknown agent".into());
        return Err(EnrollError::AlreadyEnrolled { agent_id, dir: state.dir.display().to_string() });
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| anyhow::anyhow!("generating a key pair: {e}"))?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key).map_err(|e| anyhow::anyhow!("making a certificate signing request: {e}"))?;
    let request =
        EnrollRequest { token_id: token.id.clone(), token_secret: token.secret.clone(), csr_der: csr.der().to_vec(), facts: crate::facts::collect(), labels };
    let reply = exchange(&token, request, timeout).await?;
    let enrolled = match reply {
        HubMessage::Enrolled(enrolled) => enrolled,
        HubMessage::EnrollRefused(refusal) => return Err(EnrollError::Refused(refusal)),
        other => return Err(EnrollError::Protocol(format!("unexpected reply {other:?}"))),
    };
    if enrolled.cert_chain_der.len() < 2 {
        return Err(EnrollError::Protocol("hub sent an incomplete certificate chain".into()));
    }
    state.create()?;
    state.save_credentials(&enrolled.cert_chain_der, Some(&key.serialize_pem()))?;
    let mut identity = Identity {
        agent_id: enrolled.agent_id,
        org: enrolled.org,
        hub_addr: token.hub_addr.clone(),
        ca_sha256: token.ca_fingerprint_hex(),
        labels: enrolled.labels,
        enrolled_at_unix: crate::wall_ms() / 1000,
        extra_ca_sha256: Vec::new(),
    };
    // During a CA rotation the certificate comes from the hub's next CA; the hub was
    // verified against the token's CA, so pin the new one too.
    if let Some(ca) = enrolled.cert_chain_der.last() {
        identity.learn_cas([crate::tls::fingerprint_hex(ca).as_str()]);
    }
    state.save_identity(&identity)?;
    Ok(Enrollment { identity, not_after_unix: enrolled.not_after_unix })
}

async fn exchange(token: &EnrollmentToken, request: EnrollRequest, timeout: Duration) -> Result<HubMessage, EnrollError> {
    let silent = format!("no answer within {} s", timeout.as_secs());
    with_hub(token, timeout, &silent, |connection, _, _| async move {
        let unreachable = |reason: String| EnrollError::Unreachable { addr: token.hub_addr.clone(), reason };
        let (send, recv) = connection.open_bi().await.map_err(|e| unreachable(e.to_string()))?;
        let mut send = crate::wire::FramedSend::new(send, gantry_shared::frame::DEFAULT_MAX_FRAME_BYTES);
        let mut recv = crate::wire::FramedRecv::new(recv, gantry_shared::frame::DEFAULT_MAX_FRAME_BYTES);
        send.send(&AgentMessage::Enroll(request)).await.map_err(|e| EnrollError::Protocol(e.to_string()))?;
        let _ = send.finish();
        let reply = recv.next::<HubMessage>().await.map_err(|e| EnrollError::Protocol(e.to_string()))?;
        connection.close(0u32.into(), b"enrollment done");
        reply.ok_or_else(|| EnrollError::Protocol("hub closed the stream without answering".into()))
    })
    .await
}

/// Connect to the hub `token` names, verifying it by the CA fingerprint the token pins, and
/// run `talk` on the connection (given the resolved address and how long the handshake
/// took), all within `timeout`; `silent` is the reason given when that runs out. The
/// endpoint is idle when this returns.
pub(crate) async fn with_hub<T, F, Fut>(token: &EnrollmentToken, timeout: Duration, silent: &str, talk: F) -> Result<T, EnrollError>
where
    F: FnOnce(quinn::Connection, SocketAddr, Duration) -> Fut,
    Fut: std::future::Future<Output = Result<T, EnrollError>>,
{
    let addr = token.hub_addr.clone();
    let unreachable = |reason: String| EnrollError::Unreachable { addr: addr.clone(), reason };
    let remote = crate::connection::resolve(&addr).await.map_err(|e| unreachable(format!("{e:#}")))?;
    let (client_config, mismatch) = crate::tls::client_config(token.ca_sha256, None)?;
    let endpoint = crate::connection::client_endpoint(remote)?;
    let started = std::time::Instant::now();
    let attempt = async {
        let connecting = endpoint.connect_with(client_config, remote, gantry_shared::HUB_SERVER_NAME).map_err(|e| unreachable(e.to_string()))?;
        let connection = connecting.await.map_err(|e| {
            if mismatch.load(Ordering::SeqCst) {
                EnrollError::CaMismatch { addr: addr.clone(), expected: token.ca_fingerprint_hex() }
            } else {
                unreachable(e.to_string())
            }
        })?;
        talk(connection, remote, started.elapsed()).await
    };
    let result = match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(unreachable(silent.to_string())),
    };
    endpoint.wait_idle().await;
    result
}

/// Facts are gathered by [`crate::facts::collect`]; re-exported for callers that want to
/// show what will be sent.
pub fn facts() -> HostFacts {
    crate::facts::collect()
}
