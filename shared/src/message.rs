//! Message types of the agent protocol, version 1.
//!
//! Every message the agent sends is an [`AgentMessage`]; every message the hub sends is a
//! [`HubMessage`]. Both travel in length-prefixed frames (see [`crate::frame`]). Fields are
//! plain data: no IO, no validation beyond what the types enforce; the receiver validates
//! before acting.

use serde::{Deserialize, Serialize};

/// Range of protocol versions one side speaks, both ends inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    pub min: u16,
    pub max: u16,
}

impl VersionRange {
    /// The range this build speaks.
    pub const CURRENT: VersionRange = VersionRange { min: crate::PROTOCOL_VERSION_MIN, max: crate::PROTOCOL_VERSION_MAX };
}

/// Facts about the agent's machine, reported at enrollment and in every hello.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub hostname: String,
    /// Operating system name and version, e.g. "Debian GNU/Linux 12".
    pub os: String,
    /// Kernel version, e.g. "6.1.0-18-amd64".
    pub kernel: String,
    /// CPU architecture, e.g. "x86_64".
    pub arch: String,
    pub cpu_count: u32,
    pub memory_bytes: u64,
    /// Version of the agent binary, e.g. "0.1.0".
    pub agent_version: String,
}

/// First message of an enrollment connection (the only kind accepted without a client
/// certificate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub token_id: String,
    pub token_secret: String,
    /// PKCS#10 certificate signing request (DER) for the key pair the agent made.
    pub csr_der: Vec<u8>,
    pub facts: HostFacts,
    /// Labels the machine asks for (the installer's `--label k=v`), added to the token's
    /// own; on a key both name, the token's value wins.
    pub labels: Vec<(String, String)>,
}

/// Successful enrollment: the agent's identity and its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub agent_id: String,
    pub org: String,
    /// Leaf certificate first, then the hub CA (DER).
    pub cert_chain_der: Vec<Vec<u8>>,
    /// Expiry of the leaf certificate, seconds since the Unix epoch.
    pub not_after_unix: i64,
    pub labels: Vec<(String, String)>,
}

/// Why the hub refused an enrollment. Each variant maps to a message the agent prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum EnrollRefusal {
    #[error("enrollment token is malformed")]
    MalformedToken,
    #[error("enrollment token is unknown or its secret does not match")]
    UnknownToken,
    #[error("enrollment token expired; ask the operator for a new one")]
    TokenExpired,
    #[error("enrollment token has been used up; ask the operator for a new one")]
    TokenUsedUp,
    #[error("organisation has reached its limit of {limit} agents")]
    OrgAtAgentLimit { limit: u32 },
    #[error("organisation cannot enroll agents: {reason}")]
    OrgRefused { reason: String },
    #[error("certificate signing request is invalid: {reason}")]
    InvalidCsr { reason: String },
    #[error("requested labels are invalid: {reason}")]
    InvalidLabels { reason: String },
    #[error("hub could not complete enrollment; try again later")]
    Internal,
}

/// First message on an authenticated connection's control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub versions: VersionRange,
    pub facts: HostFacts,
    /// Agent's wall clock, milliseconds since the Unix epoch.
    pub agent_clock_unix_ms: i64,
}

/// Hub's answer to a hello: the session is established.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Negotiated protocol version.
    pub version: u16,
    pub agent_id: String,
    pub org: String,
    /// How often the agent sends heartbeats.
    pub heartbeat_interval_ms: u64,
    /// How long either side waits without hearing from the other before it gives up on
    /// the session.
    pub liveness_timeout_ms: u64,
    /// Hub's wall clock, milliseconds since the Unix epoch.
    pub hub_clock_unix_ms: i64,
}

/// Periodic proof of life from the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub seq: u64,
    /// Agent's wall clock, milliseconds since the Unix epoch; the hub records the skew.
    pub agent_clock_unix_ms: i64,
}

/// Hub's answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    pub seq: u64,
    pub hub_clock_unix_ms: i64,
}

/// "Close this connection and come back after `retry_after_ms`", sent on hub shutdown or
/// under load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    pub retry_after_ms: u64,
    pub reason: String,
}

/// Certificate renewal over the live connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewRequest {
    /// CSR (DER) for a fresh key pair.
    pub csr_der: Vec<u8>,
}

/// Renewed certificate: leaf first, then the hub CA (DER).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewed {
    pub cert_chain_der: Vec<Vec<u8>>,
    pub not_after_unix: i64,
}

/// The CAs that may sign the hub's server certificate (the current one and a staged next
/// one), sent right after the [`Welcome`] on sessions of protocol version 2 and later. The
/// agent adds these fingerprints to the ones it pins, so it keeps trusting the hub after
/// the hub's CA is rotated. Sent over a session whose hub certificate the agent already
/// verified against a pinned CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedCas {
    /// SHA-256 (hex) of each CA certificate, the current CA first.
    pub ca_sha256: Vec<String>,
}

/// What an agent holds in its spool, waiting for the hub's acknowledgement: the backlog an
/// operator sees under "connection quality". Sent at session start and whenever it changes
/// (at most every few seconds), on sessions of protocol version 3 and later only: an older
/// hub cannot decode it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolState {
    /// One entry per stream class, in [`StreamClass::ALL`] order.
    pub streams: Vec<SpoolStream>,
}

/// The spool backlog of one stream class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolStream {
    pub class: StreamClass,
    /// Records not yet acknowledged by the hub (gap markers included).
    pub records: u64,
    /// Their stored bytes, as counted against the cap.
    pub bytes: u64,
    /// The class's byte cap: once full, the oldest logs and metrics are dropped.
    pub cap_bytes: u64,
    /// Records dropped because the cap was reached, since the spool was created.
    pub dropped_records: u64,
}

/// Named telemetry stream; one QUIC stream per class so a log flood never delays control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum StreamClass {
    Metrics,
    Logs,
    Events,
    Health,
}

impl StreamClass {
    /// Every class, in index order.
    pub const ALL: [StreamClass; 4] = [StreamClass::Metrics, StreamClass::Logs, StreamClass::Events, StreamClass::Health];

    /// Position in [`StreamClass::ALL`], for per-class arrays.
    pub fn index(self) -> usize {
        match self {
            StreamClass::Metrics => 0,
            StreamClass::Logs => 1,
            StreamClass::Events => 2,
            StreamClass::Health => 3,
        }
    }

    /// Lowercase name, for labels and messages.
    pub fn name(self) -> &'static str {
        match self {
            StreamClass::Metrics => "metrics",
            StreamClass::Logs => "logs",
            StreamClass::Events => "events",
            StreamClass::Health => "health",
        }
    }
}

/// Acknowledgement: every record of `stream` up to and including `up_to_seq` is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub stream: StreamClass,
    pub up_to_seq: u64,
}

/// Stable error codes, shared by in-band errors and QUIC close codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u32)]
pub enum ErrorCode {
    /// Normal close, nothing wrong.
    Normal = 0,
    /// Malformed frame or a message not allowed at this point.
    Protocol = 1,
    /// No protocol version in common.
    VersionUnsupported = 2,
    /// The connection has no client certificate and asked for more than enrollment.
    Unauthenticated = 3,
    /// The agent was revoked by an operator.
    Revoked = 4,
    /// The hub is draining; reconnect after the retry-after it sent.
    Draining = 5,
    /// A newer connection of the same agent replaced this one.
    Superseded = 6,
    /// The agent's certificate has expired.
    CertificateExpired = 7,
    /// The hub is over its connection limit; retry later.
    Overloaded = 8,
    /// Liveness deadline passed without hearing from the peer.
    Timeout = 9,
    /// An internal error on the hub.
    Internal = 10,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::Normal,
        ErrorCode::Protocol,
        ErrorCode::VersionUnsupported,
        ErrorCode::Unauthenticated,
        ErrorCode::Revoked,
        ErrorCode::Draining,
        ErrorCode::Superseded,
        ErrorCode::CertificateExpired,
        ErrorCode::Overloaded,
        ErrorCode::Timeout,
        ErrorCode::Internal,
    ];

    /// Numeric value used as the QUIC application close code.
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// Code for a QUIC application close code, if it is one of ours.
    pub fn from_u32(value: u32) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_u32() == value)
    }
}

/// An error reported in-band before the sender closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

/// The hub asks the agent to run revision `revision` of a deployment.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployCommand {
    pub deployment_id: String,
    pub revision: u64,
    pub spec: crate::deploy::DeploymentSpec,
    /// Values of the secrets the spec references, for this agent only. Never logged.
    pub secrets: Vec<(String, String)>,
    /// Credentials for the private registries the spec's images come from, for this agent
    /// only. Never logged.
    pub registry_auth: Vec<RegistryAuth>,
}

/// Login for one image registry, sent with a deployment that pulls from it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryAuth {
    /// Registry host as it appears in image references, e.g. `registry.example.com:5000`
    /// (`docker.io` for Docker Hub).
    pub server: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth").field("server", &self.server).field("username", &self.username).field("password", &"(redacted)").finish()
    }
}

impl std::fmt::Debug for DeployCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.secrets.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("DeployCommand")
            .field("deployment_id", &self.deployment_id)
            .field("revision", &self.revision)
            .field("spec", &self.spec)
            .field("secrets", &format_args!("{names:?} (values redacted)"))
            .field("registry_auth", &self.registry_auth)
            .finish()
    }
}

/// Where a deployment stands on one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeployState {
    /// Received and being applied.
    Applying,
    /// Running and past its health gate.
    Healthy,
    /// The revision failed its health gate; the agent went back to `to`.
    RolledBack { to: u64 },
    /// The revision failed and there was nothing to go back to.
    Failed,
    /// Its containers were removed.
    Removed,
}

/// The agent's report on one deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployReport {
    pub deployment_id: String,
    pub revision: u64,
    pub state: DeployState,
    /// Why, for failures and rollbacks: exit code, health output, last log lines.
    pub message: String,
}

/// Everything an agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    Enroll(EnrollRequest),
    Hello(Hello),
    Heartbeat(Heartbeat),
    Renew(RenewRequest),
    Ack(Ack),
    DeployReport(DeployReport),
    /// The result of a support action the hub asked for (same id).
    ActionResult(Box<crate::support::ActionReply>),
    /// The spool backlog (protocol version 3 and later only).
    SpoolState(SpoolState),
}

/// Everything the hub sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HubMessage {
    Enrolled(Enrolled),
    EnrollRefused(EnrollRefusal),
    Welcome(Welcome),
    HeartbeatAck(HeartbeatAck),
    Drain(Drain),
    Renewed(Renewed),
    RenewRefused {
        reason: String,
    },
    Ack(Ack),
    Error(ProtocolError),
    Deploy(Box<DeployCommand>),
    RemoveDeployment {
        deployment_id: String,
    },
    /// The complete set of health checks this agent runs (replaces any earlier set with a
    /// lower revision); sent at every session start and whenever it changes.
    Checks(crate::checks::CheckSet),
    /// A support action (container lifecycle, logs, exec, diagnostics); the agent answers
    /// with [`AgentMessage::ActionResult`] under the same id.
    Action(Box<crate::support::ActionRequest>),
    /// The CAs agents may pin (protocol version 2 and later only: a version 1 agent cannot
    /// decode it).
    TrustedCas(TrustedCas),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_round_trip_through_u32() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u32(code.as_u32()), Some(code));
        }
        assert_eq!(ErrorCode::from_u32(999), None);
    }
}
