//! The installer's routes, all public (the enrollment token, or on a machine already
//! enrolled its agent's certificate, is the credential where one is needed): the install
//! script, the agent downloads, the preflight facts for a token or an enrolled agent, the
//! status of an agent the token enrolled (or of the agent itself), and an agent's signed
//! request to be revoked.
//!
//! Tokens and certificate fingerprints travel in request bodies or headers
//! (`X-Gantry-Token`, `X-Gantry-Agent-Certificate`), never in URLs, so they stay out of
//! access logs. The logic lives in [`crate::install`]; this module maps it to
//! HTTP.

use super::{agent_view, rfc3339, AgentView, ApiError, ApiJson, ApiResult, Op, Routes};
use crate::install::{self, HostRequirements, TokenProblem};
use crate::metrics::Metrics;
use crate::Hub;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::{self, HeaderMap};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Header carrying an enrollment token on `GET` routes.
pub const TOKEN_HEADER: &str = "x-gantry-token";
/// Header carrying, instead of a token, the SHA-256 (hex) of the agent's own certificate.
pub const AGENT_CERTIFICATE_HEADER: &str = "x-gantry-agent-certificate";

/// The installer's routes.
pub(crate) fn routes(routes: Routes) -> Routes {
    routes
        .get(
            "/install.sh",
            script,
            Op::new("The agent install script")
                .describe("POSIX sh with this hub's URL filled in: `curl -fsSL HUB/install.sh | sudo sh -s -- --token TOKEN`; `--help` lists the options and exit codes.")
                .tag("install")
                .public()
                .text("text/x-shellscript"),
        )
        .get(
            "/downloads/{version}/{file}",
            download,
            Op::new("An agent build (`gantry-agent-<os>-<arch>`) or the version's `SHA256SUMS`")
                .tag("install")
                .id("install_download")
                .public()
                .text("application/octet-stream"),
        )
        .post(
            "/api/v1/install/check",
            check,
            Op::new("What the installer needs to know for a token (or an enrolled agent): host requirements of the org's plan, whether it can enroll, the hub's clock, the newest agent build")
                .tag("install")
                .public()
                .body::<CheckRequest>()
                .response::<InstallCheck>()
                .error(401),
        )
        .get(
            "/api/v1/install/agents/{id}",
            agent_status,
            Op::new("Whether an agent enrolled with the token in `X-Gantry-Token` (or whose certificate's SHA-256 is in `X-Gantry-Agent-Certificate`) is online")
                .tag("install")
                .public()
                .response::<InstalledAgent>()
                .error(401),
        )
        .post(
            "/api/v1/agents/{id}/deregister",
            deregister,
            Op::new("Revoke an agent at its own request, signed with its key (the installer's `--purge`)")
                .tag("install")
                .public()
                .body::<DeregisterBody>()
                .response::<AgentView>()
                .error(401),
        )
}

fn token_error(problem: TokenProblem) -> ApiError {
    match problem {
        TokenProblem::Malformed(message) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_token", message),
        TokenProblem::Unknown => ApiError::new(StatusCode::UNAUTHORIZED, "invalid_token", problem.to_string()),
    }
}

async fn script(State(hub): State<Arc<Hub>>) -> Response {
    let text = gantry_installer::render_script(&hub.config.public_url());
    ([(header::CONTENT_TYPE, "text/x-shellscript; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], text).into_response()
}

async fn download(State(hub): State<Arc<Hub>>, Path((version, file)): Path<(String, String)>) -> ApiResult<Response> {
    if !install::valid_version(&version) {
        return Err(ApiError::not_found(&format!("agent version {version:?}")));
    }
    let config = hub.config.installer.clone();
    if file == install::SHA256SUMS {
        let sums = tokio::task::spawn_blocking(move || install::sha256sums(&config, &version))
            .await
            .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "could not read the agent builds"))?
            .map_err(|error| {
                tracing::error!(%error, "reading agent builds");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "could not read the agent builds; see the hub log")
            })?;
        let sums = sums.ok_or_else(|| ApiError::not_found("agent version"))?;
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], sums).into_response());
    }
    if !install::valid_build_file(&file) {
        return Err(ApiError::not_found(&format!("download {file:?}")));
    }
    let build = install::build(&config, &version, &file).ok_or_else(|| ApiError::not_found(&format!("agent build {version}/{file}")))?;
    let handle = tokio::fs::File::open(&build.path).await.map_err(|_| ApiError::not_found(&format!("agent build {version}/{file}")))?;
    let length = handle.metadata().await.map(|m| m.len()).unwrap_or_default();
    let body = Body::from_stream(file_chunks(handle));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, length.to_string()),
            (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{file}\"")),
        ],
        body,
    )
        .into_response())
}

/// The file's bytes as a stream of chunks, so a large build is never held in memory.
fn file_chunks(file: tokio::fs::File) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> {
    futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buffer = vec![0u8; 64 * 1024];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(n) => {
                buffer.truncate(n);
                Some((Ok(bytes::Bytes::from(buffer)), file))
            }
            Err(error) => Some((Err(error), file)),
        }
    })
}

/// Body of `POST /api/v1/install/check`: a token, or an enrolled agent's id and
/// certificate fingerprint (a re-run on a machine that is already enrolled).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// The enrollment token (`gt1_...`).
    #[serde(default)]
    pub token: Option<String>,
    /// An enrolled agent's id (with `certificate_sha256`, instead of a token).
    #[serde(default)]
    pub agent_id: Option<String>,
    /// SHA-256 (hex) of that agent's current certificate (DER).
    #[serde(default)]
    pub certificate_sha256: Option<String>,
}

/// What the installer learns for a token.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct InstallCheck {
    /// The token's org.
    pub org: String,
    /// The org's plan, if it has a subscription.
    pub plan: Option<String>,
    /// The smallest host the plan accepts.
    pub requirements: HostRequirements,
    /// Whether the token can enroll one more agent now.
    pub enrollable: bool,
    /// Why not, when it cannot.
    pub refusal: Option<String>,
    /// Asked for an enrolled agent: its status (`online`, `offline` or `revoked`).
    pub agent_status: Option<String>,
    /// The hub's clock, Unix milliseconds (the installer's clock-skew check).
    pub hub_time_ms: i64,
    /// `HOST:PORT` agents dial (UDP, QUIC).
    pub hub_addr: String,
    /// The newest agent build served, if any.
    pub agent: Option<AgentDownload>,
}

/// The newest agent build: its version and files under `/downloads/{version}/`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct AgentDownload {
    pub version: String,
    /// `gantry-agent-<os>-<arch>` file names.
    pub files: Vec<String>,
}

async fn check(State(hub): State<Arc<Hub>>, ApiJson(body): ApiJson<CheckRequest>) -> ApiResult<Json<InstallCheck>> {
    let (org, refusal, agent_status) = match (body.token, body.agent_id, body.certificate_sha256) {
        (Some(text), None, None) => {
            let token = install::authenticate(&hub, &text).map_err(token_error)?;
            let refusal = install::enroll_refusal(&hub, &token, crate::wall_ms())?;
            (token.org, refusal, None)
        }
        (None, Some(id), Some(certificate)) => {
            let agent = install::authenticate_agent(&hub, &id, &certificate)?
                .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "invalid_agent", format!("the hub knows no agent {id} with this certificate")))?;
            let status = agent_view(&hub, &agent).status;
            (agent.org, Some("an enrolled agent enrolls nothing; a new agent needs an enrollment token".to_string()), Some(status))
        }
        _ => return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", "send either a token, or agent_id and certificate_sha256")),
    };
    let (plan, requirements) = install::requirements(&hub, &org)?;
    let config = hub.config.installer.clone();
    let latest = tokio::task::spawn_blocking(move || install::latest(&config)).await.ok().flatten();
    Ok(Json(InstallCheck {
        org,
        plan,
        requirements,
        enrollable: refusal.is_none(),
        refusal,
        agent_status,
        hub_time_ms: crate::wall_ms(),
        hub_addr: hub.public_addr.clone(),
        agent: latest.map(|(version, files)| AgentDownload { version, files }),
    }))
}

/// An agent as the installer sees it.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct InstalledAgent {
    pub id: String,
    /// `online`, `offline` or `revoked`.
    pub status: String,
    pub last_seen: Option<String>,
}

async fn agent_status(State(hub): State<Arc<Hub>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<Json<InstalledAgent>> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let what = format!("agent {id}");
    // Only agents this token enrolled, or the agent itself: to anyone else the agent does
    // not exist.
    let agent = if let Some(certificate) = header(AGENT_CERTIFICATE_HEADER) {
        install::authenticate_agent(&hub, &id, certificate)?.ok_or_else(|| ApiError::not_found(&what))?
    } else {
        let text = header(TOKEN_HEADER).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "send the enrollment token that installed the agent in the X-Gantry-Token header (or the agent's certificate SHA-256 in X-Gantry-Agent-Certificate)",
            )
        })?;
        let token = install::authenticate(&hub, text).map_err(token_error)?;
        hub.store.agent(&id)?.filter(|a| a.enrolled_with_token == token.id && a.org == token.org).ok_or_else(|| ApiError::not_found(&what))?
    };
    let view = agent_view(&hub, &agent);
    Ok(Json(InstalledAgent { id: view.id, status: view.status, last_seen: view.last_seen }))
}

/// Body of `POST /api/v1/agents/{id}/deregister`, as `gantry-agent deregister` prints it.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeregisterBody {
    /// When the request was signed, Unix milliseconds (at most 5 minutes from the hub's clock).
    pub issued_at_ms: i64,
    /// The agent's certificate, PEM: the one the hub last saw it use.
    pub certificate: String,
    /// ECDSA P-256 / SHA-256 signature (ASN.1 DER, hex) of
    /// `gantry-deregister-v1\n{id}\n{issued_at_ms}\n` by the certificate's key.
    pub signature: String,
}

async fn deregister(State(hub): State<Arc<Hub>>, Path(id): Path<String>, ApiJson(body): ApiJson<DeregisterBody>) -> ApiResult<Json<AgentView>> {
    let agent = hub.store.agent(&id)?.ok_or_else(|| ApiError::not_found(&format!("agent {id}")))?;
    install::check_deregister(&agent, &body.certificate, body.issued_at_ms, &body.signature, crate::wall_ms())
        .map_err(|problem| ApiError::new(StatusCode::UNAUTHORIZED, "invalid_signature", format!("deregistration refused: {problem}")))?;
    if agent.revoked_at_ms.is_some() {
        return Ok(Json(agent_view(&hub, &agent)));
    }
    let revoked = hub.store.revoke_agent(&id, crate::wall_ms())?.ok_or_else(|| ApiError::not_found(&format!("agent {id}")))?;
    crate::webhooks::agent_event(&hub, "agent.revoked", &id);
    Metrics::inc(&hub.metrics.agents_revoked);
    hub.registry.close(&id, gantry_shared::message::ErrorCode::Revoked, "agent was deregistered by its installer");
    tracing::info!(agent_id = %id, org = %agent.org, enrolled_at = %rfc3339(agent.enrolled_at_ms), "agent deregistered itself");
    Ok(Json(agent_view(&hub, &revoked)))
}
