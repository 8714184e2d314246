//! The HTTP API under `/api/v1`, the probes (`/healthz`, `/readyz`, `/metrics`) and the
//! dashboard pages, as one axum `Router` built by [`router`].
//!
//! Every handler takes the caller's org from the credential (session cookie or API key),
//! never from the request alone: an object of another org answers 404 as if it did not
//! exist. Errors have one JSON shape, `{"error": {"code", "message"}}`, with stable codes
//! and no internals. Bodies are size-capped and validated before anything is written.

mod accounts;
mod audit;
mod backup;
pub mod billing;
pub mod billing_usage;
mod deployments;
mod forwarded;
mod headers;
mod health;
mod install;
mod limits;
mod mfa;
pub mod openapi;
mod org_data;
mod pages;
mod pages_account;
mod pages_admin;
mod password;
mod secrets;
mod stripe_webhook;
mod support;
mod webhooks;

pub(crate) use forwarded::client_ip;
pub use openapi::{Op, Routes};

use crate::access::{Perm, Refusal};
use crate::auth::{self, Principal};
use crate::enroll::{self, TokenRequest, TokenRequestError};
use crate::metrics::Metrics;
use crate::store::{self, Agent, Org};
use crate::Hub;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::MethodFilter;
use axum::{Form, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// One API error: HTTP status, stable code, human message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (429 answers).
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), retry_after_secs: None }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn not_found(what: &str) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
    }
    pub fn unauthorized() -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "log in or send an API key as `Authorization: Bearer`")
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
}

impl From<store::Error> for ApiError {
    fn from(error: store::Error) -> Self {
        match error {
            store::Error::AlreadyExists(what) => ApiError::new(StatusCode::CONFLICT, "conflict", format!("{what} already exists")),
            store::Error::NotFound(what) => ApiError::not_found(&what),
            store::Error::Conflict(message) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            other => {
                tracing::error!(error = %other, "store error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the hub log")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": { "code": self.code, "message": self.message } }));
        limits::with_retry_after((self.status, body).into_response(), self.retry_after_secs)
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// `Json<T>` whose rejections answer in the API's error shape.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(match rejection {
                JsonRejection::MissingJsonContentType(_) => {
                    ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "send the body as application/json")
                }
                JsonRejection::JsonDataError(e) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.body_text()),
                JsonRejection::JsonSyntaxError(e) => ApiError::bad_request(e.body_text()),
                JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "request body is too large")
                }
                other => ApiError::bad_request(other.body_text()),
            }),
        }
    }
}

/// `Query<T>` whose rejections answer in the API's error shape.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state).await.map(|Query(value)| ApiQuery(value)).map_err(|rejection| ApiError::bad_request(rejection.body_text()))
    }
}

/// The value of cookie `name`, if the request sent it.
pub(crate) fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// The login session cookie's value, read by the name [`auth::session_cookie_name`] gives
/// (a plain-HTTP cookie is not accepted once the hub is reached over HTTPS).
pub(crate) fn session_cookie_value(hub: &Hub, headers: &HeaderMap) -> Option<String> {
    cookie_value(headers, auth::session_cookie_name(&hub.config))
}

/// The authenticated caller; rejects with 401 when there is none. State-changing requests
/// authenticated by cookie must be JSON (which a cross-site form cannot send without a
/// CORS preflight this hub never grants) or come from the same origin.
impl FromRequestParts<Arc<Hub>> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, hub: &Arc<Hub>) -> Result<Self, Self::Rejection> {
        let bearer = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
        if let Some(text) = bearer {
            let principal = auth::principal_from_api_key(hub, text)?.ok_or_else(ApiError::unauthorized)?;
            crate::audit::note_principal(&parts.extensions, &principal);
            return Ok(principal);
        }
        let Some(value) = session_cookie_value(hub, &parts.headers) else {
            return Err(ApiError::unauthorized());
        };
        let principal = auth::principal_from_session(hub, &value)?.ok_or_else(ApiError::unauthorized)?;
        // A request refused below is still recorded as this caller's.
        crate::audit::note_principal(&parts.extensions, &principal);
        if !parts.method.is_safe() && !is_json(&parts.headers) && !same_origin(&parts.headers) {
            return Err(ApiError::forbidden("cross-site request refused (CSRF protection)"));
        }
        Ok(principal)
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"))
}

fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    match (host, origin) {
        (Some(host), Some(origin)) => origin.split_once("://").is_some_and(|(_, rest)| rest == host),
        _ => false,
    }
}

/// Whether the caller holds `perm` in `org`. To a caller with nothing in the org, the
/// object (`what`, e.g. "deployment dep_1") answers 404 as if it did not exist; a member
/// whose role or key scopes fall short gets 403 naming what is missing.
pub(crate) fn authorize(principal: &Principal, org: &str, perm: Perm, what: &str) -> ApiResult<()> {
    principal.check(org, perm).map_err(|refusal| match refusal {
        Refusal::NotMember => ApiError::not_found(what),
        Refusal::Lacks(perm) => {
            ApiError::forbidden(format!("this needs the {} permission in org {org}, which your role or key scopes do not grant", perm.name()))
        }
    })
}

/// [`authorize`] for an org named in the path, which must also exist.
pub(crate) fn org_in_scope(hub: &Hub, principal: &Principal, org: &str, perm: Perm) -> ApiResult<()> {
    let what = format!("org {org}");
    authorize(principal, org, perm, &what)?;
    if hub.store.org(org)?.is_none() {
        return Err(ApiError::not_found(&what));
    }
    Ok(())
}

/// The orgs the caller can read: all of them, or `only` (404 when it cannot see it).
pub(crate) fn visible_orgs(hub: &Hub, principal: &Principal, only: Option<&str>) -> ApiResult<Vec<store::Org>> {
    if let Some(org) = only {
        authorize(principal, org, Perm::Read, &format!("org {org}"))?;
        let org = hub.store.org(org)?.ok_or_else(|| ApiError::not_found(&format!("org {org}")))?;
        return Ok(vec![org]);
    }
    Ok(hub.store.orgs()?.into_iter().filter(|o| principal.access.knows(&o.id) && principal.check(&o.id, Perm::Read).is_ok()).collect())
}

/// Platform-wide actions: operators (and operator keys whose scopes grant `perm`) only.
pub(crate) fn require_operator(principal: &Principal, perm: Perm) -> ApiResult<()> {
    if principal.access.everywhere.has(perm) {
        Ok(())
    } else {
        Err(ApiError::forbidden("only platform operators may do this"))
    }
}

/// RFC 3339 text of a Unix-milliseconds time.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// Parse a duration like `90s`, `15m`, `1h`, `7d`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 90s, 15m, 1h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86400),
        _ => return Err(format!("{text:?} has an unknown unit; use s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

/// Agent as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, schemars::JsonSchema)]
pub struct AgentView {
    pub id: String,
    pub org: String,
    /// `online`, `offline` or `revoked`.
    pub status: String,
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub arch: String,
    pub cpu_count: u32,
    pub memory_bytes: u64,
    pub agent_version: String,
    pub labels: BTreeMap<String, String>,
    pub enrolled_at: String,
    pub last_seen: Option<String>,
    pub connected_since: Option<String>,
    pub rtt_ms: Option<f64>,
    pub clock_skew_ms: Option<i64>,
    pub cert_expires_at: String,
    pub remote_addr: Option<String>,
    pub protocol_version: Option<u16>,
    /// What the agent holds in its spool, not yet acknowledged by the hub, per stream class.
    /// Null while the agent is offline, and for agents too old to report it.
    pub spool: Option<SpoolBacklogView>,
}

/// An online agent's spool backlog, as it last reported it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, schemars::JsonSchema)]
pub struct SpoolBacklogView {
    /// When the hub received this report.
    pub reported_at: String,
    /// Unacknowledged records and bytes, summed over the classes.
    pub records: u64,
    pub bytes: u64,
    /// Per class: `metrics`, `logs`, `events`, `health`.
    pub streams: Vec<SpoolStreamView>,
}

/// The backlog of one stream class.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, schemars::JsonSchema)]
pub struct SpoolStreamView {
    pub class: String,
    pub records: u64,
    pub bytes: u64,
    /// The class's byte cap on the agent: once full, its oldest logs and metrics are dropped.
    pub cap_bytes: u64,
    /// Records dropped because the cap was reached, since the agent's spool was created.
    pub dropped_records: u64,
}

fn spool_view(reported_at_ms: i64, state: &gantry_shared::message::SpoolState) -> SpoolBacklogView {
    let streams: Vec<SpoolStreamView> = state
        .streams
        .iter()
        .map(|s| SpoolStreamView {
            class: s.class.name().to_string(),
            records: s.records,
            bytes: s.bytes,
            cap_bytes: s.cap_bytes,
            dropped_records: s.dropped_records,
        })
        .collect();
    SpoolBacklogView {
        reported_at: rfc3339(reported_at_ms),
        records: streams.iter().map(|s| s.records).sum(),
        bytes: streams.iter().map(|s| s.bytes).sum(),
        streams,
    }
}

/// Merge the stored record with the live session figures, if any.
pub fn agent_view(hub: &Hub, agent: &Agent) -> AgentView {
    let live = hub.registry.info(&agent.id);
    let status = if agent.revoked_at_ms.is_some() {
        "revoked"
    } else if live.is_some() {
        "online"
    } else {
        "offline"
    };
    let last_seen = live.as_ref().map(|l| l.last_seen_ms).or(agent.last_seen_ms);
    AgentView {
        id: agent.id.clone(),
        org: agent.org.clone(),
        status: status.to_string(),
        hostname: agent.hostname.clone(),
        os: agent.os.clone(),
        kernel: agent.kernel.clone(),
        arch: agent.arch.clone(),
        cpu_count: agent.cpu_count,
        memory_bytes: agent.memory_bytes,
        agent_version: agent.agent_version.clone(),
        labels: agent.labels.iter().cloned().collect(),
        enrolled_at: rfc3339(agent.enrolled_at_ms),
        last_seen: last_seen.map(rfc3339),
        connected_since: live.as_ref().map(|l| rfc3339(l.connected_at_ms)),
        rtt_ms: live.as_ref().map(|l| (l.rtt_ms * 100.0).round() / 100.0).or(agent.rtt_ms),
        clock_skew_ms: live.as_ref().map(|l| l.clock_skew_ms).or(agent.clock_skew_ms),
        cert_expires_at: rfc3339(agent.cert_not_after_ms),
        spool: live.as_ref().and_then(|l| l.spool.as_ref()).map(|(at, state)| spool_view(*at, state)),
        remote_addr: live.map(|l| l.remote_addr).or_else(|| agent.remote_addr.clone()),
        protocol_version: agent.protocol_version,
    }
}

fn org_view(org: &Org) -> serde_json::Value {
    json!({
        "id": org.id,
        "name": org.name,
        "agent_limit": org.agent_limit,
        "agent_count": org.agent_count,
        "suspended": org.suspended,
        "created_at": rfc3339(org.created_at_ms),
        "retention_days": org.retention_days,
    })
}

/// The whole HTTP surface: [`routes`] plus the fallbacks and the middleware.
pub fn router(hub: Arc<Hub>) -> Router {
    let max_body = hub.config.max_http_body_bytes;
    routes()
        .into_router()
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async { ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this route does not take that method") })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(hub.clone(), limits::rate_limit))
        .layer(axum::middleware::from_fn_with_state(hub.clone(), count_requests))
        .layer(axum::middleware::from_fn_with_state(hub.clone(), crate::audit::record_requests))
        .with_state(hub)
}

/// Every route, each registered with its OpenAPI operation (see [`openapi`]); the
/// dashboard pages are routed but not documented. A module with many routes can register
/// them itself with `.with(module::routes)`, a `fn(Routes) -> Routes`.
pub fn routes() -> Routes {
    Routes::new()
        .get("/healthz", || async { "ok\n" }, Op::new("Liveness probe").tag("probes").id("healthz").public().text("text/plain"))
        .get("/readyz", readyz, Op::new("Readiness probe (503 while not ready)").tag("probes").public().text("text/plain"))
        .get("/metrics", metrics, Op::new("Prometheus metrics").tag("probes").public().text("text/plain"))
        .post("/api/v1/auth/login", login, Op::new("Log in; sets the session cookie").tag("auth").public().body::<LoginRequest>().error(401))
        .post("/api/v1/auth/logout", logout, Op::new("Log out; clears the session cookie").tag("auth").public().no_content())
        .get("/api/v1/auth/me", me, Op::new("The caller: account, memberships, two-factor state").tag("auth"))
        .post("/api/v1/auth/totp", mfa::enrol, Op::new("Start two-factor enrolment: a new pending secret, shown once").tag("auth").status(201))
        .delete("/api/v1/auth/totp", mfa::disable, Op::new("Turn two-factor login off").tag("auth").body::<mfa::DisableRequest>())
        .post("/api/v1/auth/totp/confirm", mfa::confirm, Op::new("Confirm two-factor enrolment with a code").tag("auth").body::<mfa::ConfirmRequest>())
        .get("/api/v1/orgs", list_orgs, Op::new("List the orgs the caller can see").tag("orgs"))
        .post("/api/v1/orgs", create_org, Op::new("Create an org (operators)").tag("orgs").body::<CreateOrg>().status(201).error(409))
        .get("/api/v1/orgs/{org}", get_org, Op::new("Get an org").tag("orgs"))
        .post("/api/v1/orgs/{org}/enrollment-tokens", create_token, Op::new("Mint an agent enrollment token").tag("agents").body::<CreateToken>().status(201))
        .get("/api/v1/orgs/{org}/agents", list_agents, Op::new("List an org's agents").tag("agents").list::<AgentView>("agents"))
        .get(
            "/api/v1/agents/stream",
            agents_stream,
            Op::new("Live status of the caller's agents (Server-Sent Events)").tag("agents").query::<FleetStreamQuery>().event_stream(),
        )
        .get("/api/v1/agents/{id}", get_agent, Op::new("Get an agent").tag("agents").response::<AgentView>())
        .post("/api/v1/agents/{id}/revoke", revoke_agent, Op::new("Revoke an agent and close its session").tag("agents").response::<AgentView>())
        .get("/api/v1/agents/{id}/logs", agent_logs, Op::new("Query an agent's logs").tag("telemetry").query::<RecordQuery>())
        .get("/api/v1/agents/{id}/logs/stream", agent_logs_stream, Op::new("Live tail of an agent's logs").tag("telemetry").query::<TailQuery>().event_stream())
        .get("/api/v1/agents/{id}/events", agent_events, Op::new("Query an agent's events").tag("telemetry").query::<RecordQuery>())
        .get("/api/v1/agents/{id}/metrics", agent_metrics, Op::new("An agent's metric names, or one metric's series").tag("telemetry").query::<MetricQuery>())
        .get("/api/v1/orgs/{org}/deployments", deployments::list, Op::new("List an org's deployments").tag("deployments"))
        .post(
            "/api/v1/orgs/{org}/deployments",
            deployments::create,
            Op::new("Create a deployment").tag("deployments").body::<deployments::DeploymentRequest>().status(201),
        )
        .get("/api/v1/deployments/{id}", deployments::get, Op::new("Get a deployment").tag("deployments"))
        .put(
            "/api/v1/deployments/{id}",
            deployments::update,
            Op::new("Update a deployment (a new revision)").tag("deployments").body::<deployments::DeploymentRequest>(),
        )
        .delete("/api/v1/deployments/{id}", deployments::delete, Op::new("Delete a deployment").tag("deployments"))
        .post(
            "/api/v1/deployments/{id}/rollback",
            deployments::rollback,
            Op::new("Roll a deployment back").tag("deployments").body::<deployments::RollbackRequest>(),
        )
        .get("/api/v1/deployments/{id}/revisions", deployments::revisions, Op::new("List a deployment's revisions").tag("deployments"))
        .get("/api/v1/deployments/{id}/progress", deployments::progress, Op::new("Progress of a deployment per agent").tag("deployments").event_stream())
        .get("/api/v1/orgs/{org}/secrets", secrets::list_secrets, Op::new("List an org's secrets (names only)").tag("secrets"))
        .put("/api/v1/orgs/{org}/secrets/{name}", secrets::put_secret, Op::new("Set a secret").tag("secrets").body::<secrets::SecretRequest>().or_status(201))
        .delete("/api/v1/orgs/{org}/secrets/{name}", secrets::delete_secret, Op::new("Delete a secret").tag("secrets"))
        .get("/api/v1/orgs/{org}/registries", secrets::list_registries, Op::new("List an org's registry logins").tag("secrets"))
        .put(
            "/api/v1/orgs/{org}/registries/{server}",
            secrets::put_registry,
            Op::new("Set a registry login").tag("secrets").body::<secrets::RegistryRequest>().or_status(201),
        )
        .delete("/api/v1/orgs/{org}/registries/{server}", secrets::delete_registry, Op::new("Delete a registry login").tag("secrets"))
        .get("/api/v1/orgs/{org}/webhooks", webhooks::list, Op::new("List an org's webhook endpoints").tag("webhooks"))
        .post(
            "/api/v1/orgs/{org}/webhooks",
            webhooks::create,
            Op::new("Create a webhook endpoint").tag("webhooks").body::<webhooks::WebhookRequest>().status(201),
        )
        .get("/api/v1/orgs/{org}/webhooks/{id}", webhooks::get, Op::new("Get a webhook endpoint").tag("webhooks"))
        .patch(
            "/api/v1/orgs/{org}/webhooks/{id}",
            webhooks::update,
            Op::new("Change a webhook endpoint's given fields").tag("webhooks").body::<webhooks::WebhookRequest>(),
        )
        .put("/api/v1/orgs/{org}/webhooks/{id}", webhooks::replace, Op::new("Replace a webhook endpoint").tag("webhooks").body::<webhooks::WebhookRequest>())
        .delete("/api/v1/orgs/{org}/webhooks/{id}", webhooks::delete, Op::new("Delete a webhook endpoint").tag("webhooks"))
        .post("/api/v1/orgs/{org}/webhooks/{id}/rotate-secret", webhooks::rotate_secret, Op::new("Rotate a webhook's signing secret").tag("webhooks"))
        .get(
            "/api/v1/orgs/{org}/webhooks/{id}/deliveries",
            webhooks::deliveries,
            Op::new("List a webhook's deliveries").tag("webhooks").query::<webhooks::DeliveriesQuery>(),
        )
        .get("/api/v1/orgs/{org}/webhooks/{id}/deliveries/{delivery}", webhooks::delivery, Op::new("Get a delivery with its attempts").tag("webhooks"))
        .post(
            "/api/v1/orgs/{org}/webhooks/{id}/deliveries/{delivery}/redeliver",
            webhooks::redeliver,
            Op::new("Send a delivery again").tag("webhooks").status(202),
        )
        .get("/api/v1/orgs/{org}/checks", health::list_checks, Op::new("List an org's checks").tag("checks"))
        .post("/api/v1/orgs/{org}/checks", health::create_check, Op::new("Create a check").tag("checks").body::<health::CheckRequest>().status(201))
        .get("/api/v1/orgs/{org}/checks/{id}", health::get_check, Op::new("Get a check").tag("checks"))
        .put("/api/v1/orgs/{org}/checks/{id}", health::replace_check, Op::new("Replace a check").tag("checks").body::<health::CheckRequest>())
        .delete("/api/v1/orgs/{org}/checks/{id}", health::delete_check, Op::new("Delete a check").tag("checks").no_content())
        .get("/api/v1/agents/{id}/checks", health::agent_checks, Op::new("An agent's check states").tag("checks").query::<health::AgentChecksQuery>())
        .get("/api/v1/orgs/{org}/alerts", health::list_alerts, Op::new("List an org's alerts").tag("alerts").query::<health::AlertsQuery>())
        .get("/api/v1/orgs/{org}/alerts/{id}", health::get_alert, Op::new("Get an alert").tag("alerts"))
        .post("/api/v1/orgs/{org}/alerts/{id}/acknowledge", health::acknowledge_alert, Op::new("Acknowledge an alert").tag("alerts"))
        .get("/api/v1/orgs/{org}/silences", health::list_silences, Op::new("List an org's silences").tag("alerts"))
        .post("/api/v1/orgs/{org}/silences", health::create_silence, Op::new("Create a silence").tag("alerts").body::<health::SilenceRequest>().status(201))
        .delete("/api/v1/orgs/{org}/silences/{id}", health::delete_silence, Op::new("Delete a silence").tag("alerts").no_content())
        .get("/api/v1/orgs/{org}/alert-rules", health::get_rules, Op::new("Get an org's alert rules").tag("alerts").response::<store::AlertRules>())
        .put(
            "/api/v1/orgs/{org}/alert-rules",
            health::put_rules,
            Op::new("Set an org's alert rules").tag("alerts").body::<store::AlertRules>().response::<store::AlertRules>(),
        )
        .get("/api/v1/orgs/{org}/members", accounts::list_members, Op::new("List an org's members").tag("members"))
        .put(
            "/api/v1/orgs/{org}/members/{user}",
            accounts::put_member,
            Op::new("Add a member or change their role").tag("members").body::<accounts::MemberRequest>(),
        )
        .delete("/api/v1/orgs/{org}/members/{user}", accounts::delete_member, Op::new("Remove a member").tag("members").no_content())
        .get("/api/v1/orgs/{org}/invitations", accounts::list_invitations, Op::new("List an org's invitations").tag("members"))
        .post(
            "/api/v1/orgs/{org}/invitations",
            accounts::create_invitation,
            Op::new("Invite someone by email").tag("members").body::<accounts::InvitationRequest>().status(201),
        )
        .delete("/api/v1/orgs/{org}/invitations/{id}", accounts::revoke_invitation, Op::new("Revoke an invitation").tag("members"))
        .post(
            "/api/v1/invitations/accept",
            accounts::accept_invitation,
            Op::new("Accept an invitation; logs in").tag("members").public().body::<accounts::AcceptRequest>().error(401),
        )
        .get("/api/v1/orgs/{org}/api-keys", accounts::list_org_keys, Op::new("List an org's API keys").tag("api-keys"))
        .post(
            "/api/v1/orgs/{org}/api-keys",
            accounts::create_org_key,
            Op::new("Create an org API key, shown once").tag("api-keys").body::<accounts::KeyRequest>().status(201),
        )
        .delete("/api/v1/orgs/{org}/api-keys/{id}", accounts::revoke_org_key, Op::new("Revoke an org API key").tag("api-keys"))
        .get("/api/v1/api-keys", accounts::list_operator_keys, Op::new("List operator API keys").tag("api-keys"))
        .post(
            "/api/v1/api-keys",
            accounts::create_operator_key,
            Op::new("Create an operator API key, shown once").tag("api-keys").body::<accounts::KeyRequest>().status(201),
        )
        .delete("/api/v1/api-keys/{id}", accounts::revoke_operator_key, Op::new("Revoke an operator API key").tag("api-keys"))
        .get("/api/v1/plans", billing::list_plans, Op::new("List plans (newest versions)").tag("billing"))
        .post("/api/v1/plans", billing::create_plan, Op::new("Create a plan (operators)").tag("billing").body::<billing::NewPlan>().status(201).error(409))
        .get("/api/v1/plans/{id}", billing::get_plan, Op::new("A plan: newest version and every version").tag("billing"))
        .put(
            "/api/v1/plans/{id}",
            billing::change_plan,
            Op::new("Change a plan: writes its next version (operators)").tag("billing").body::<crate::billing::plans::PlanRequest>(),
        )
        .get("/api/v1/orgs/{org}/subscription", billing::get_subscription, Op::new("An org's subscription, period and entitlements").tag("billing"))
        .put(
            "/api/v1/orgs/{org}/subscription",
            billing::put_subscription,
            Op::new("Subscribe an org or change its plan from now (operators)").tag("billing").body::<billing::SubscribeRequest>(),
        )
        .post(
            "/api/v1/orgs/{org}/subscription/status",
            billing::set_status,
            Op::new("Suspend, restore or cancel a subscription (operators)").tag("billing").body::<billing::StatusRequest>(),
        )
        .get("/api/v1/orgs/{org}/invoices/preview", billing::preview, Op::new("The current period's invoice so far").tag("billing"))
        .get("/api/v1/orgs/{org}/invoices", billing::list_invoices, Op::new("Closed invoices, newest first").tag("billing"))
        .post("/api/v1/billing/close", billing::close_now, Op::new("Close every ended billing period now (operators)").tag("billing"))
        .get(
            "/api/v1/billing/usage",
            billing_usage::export,
            Op::new("Export usage ledger entries as JSON, CSV or CloudEvents")
                .tag("billing")
                .query::<billing_usage::UsageQuery>()
                .response::<billing_usage::UsageExport>(),
        )
        .post(
            "/api/v1/billing/corrections",
            billing_usage::correct,
            Op::new("Add a usage correction (operators)")
                .tag("billing")
                .body::<billing_usage::CorrectionRequest>()
                .response::<billing_usage::CorrectionResponse>()
                .status(201),
        )
        .get(
            "/api/v1/billing/conflicts",
            billing_usage::conflicts,
            Op::new("Usage ledger conflicts kept for review (operators)")
                .tag("billing")
                .query::<billing_usage::ConflictQuery>()
                .response::<billing_usage::ConflictList>(),
        )
        .post(
            "/api/v1/billing/conflicts/resolve",
            billing_usage::resolve_conflict,
            Op::new("Mark a ledger conflict reviewed (operators)").tag("billing").body::<billing_usage::ResolveConflictRequest>(),
        )
        .get(
            "/api/v1/billing/stripe/outbox",
            billing_usage::stripe_outbox,
            Op::new("Stripe meter-event outbox rows; by default those an operator must act on (operators)")
                .tag("billing")
                .query::<billing_usage::OutboxQuery>()
                .response::<billing_usage::OutboxList>(),
        )
        .post(
            "/api/v1/webhooks/stripe",
            stripe_webhook::receive,
            Op::new("Stripe event deliveries (signed with Stripe-Signature)").tag("billing").public().error(503),
        )
        .get("/api/v1/users", accounts::list_users, Op::new("List accounts (operators)").tag("users"))
        .post(
            "/api/v1/users",
            accounts::create_user,
            Op::new("Create an account (operators)").tag("users").body::<accounts::UserRequest>().status(201).error(409),
        )
        .post("/api/v1/users/{id}/disable", accounts::disable_user, Op::new("Disable an account").tag("users"))
        .post("/api/v1/users/{id}/enable", accounts::enable_user, Op::new("Enable an account").tag("users"))
        .get("/api/v1/orgs/{org}/logs", org_logs, Op::new("Query the logs of an org's agents").tag("telemetry").query::<RecordQuery>())
        .get("/api/v1/orgs/{org}/events", org_events, Op::new("Query the events of an org's agents").tag("telemetry").query::<RecordQuery>())
        .get("/api/v1/orgs/{org}/audit", audit::org_log, Op::new("An org's audit log").describe(AUDIT_FORMATS).tag("audit").query::<audit::AuditQuery>())
        .get("/api/v1/audit", audit::all, Op::new("The whole audit log (operators)").describe(AUDIT_FORMATS).tag("audit").query::<audit::AuditQuery>())
        .with(install::routes)
        .with(backup::routes)
        .with(support::routes)
        .with(org_data::routes)
        .with(password::routes)
        .with(pages_account::routes)
        .with(pages_admin::routes)
        .with(pages::routes)
        .page(MethodFilter::GET, "/login", login_page)
        .page(MethodFilter::POST, "/login", login_form)
        .page(MethodFilter::GET, "/invite", accounts::invite_page)
        .page(MethodFilter::POST, "/invite", accounts::invite_form)
        .page(MethodFilter::GET, headers::STYLESHEET_PATH, headers::stylesheet)
        .page(MethodFilter::POST, "/logout", logout_form)
}

const AUDIT_FORMATS: &str =
    "JSON `{entries, next_cursor}`; with `?format=jsonl`, one entry per line as `application/x-ndjson` and the next cursor in `x-next-cursor`.";

async fn count_requests(State(hub): State<Arc<Hub>>, request: Request, next: axum::middleware::Next) -> Response {
    Metrics::inc(&hub.metrics.http_requests);
    let mut response = next.run(request).await;
    headers::security_headers(response.headers_mut(), hub.config.serves_tls());
    response
}

async fn readyz(State(hub): State<Arc<Hub>>) -> Response {
    if hub.store.is_healthy() && hub.is_accepting() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(hub): State<Arc<Hub>>) -> Response {
    let enrolled = hub.store.orgs().map(|orgs| orgs.iter().map(|o| o.agent_count as usize).sum()).unwrap_or(0);
    let mut body = hub.metrics.render(hub.registry.len(), enrolled);
    body.push_str(&crate::alerts::render_metrics(&hub));
    body.push_str(&crate::billing::ledger::render_metrics(&hub));
    body.push_str(&crate::backup::render_metrics(&hub));
    let (segments, bytes) = hub.store.telemetry_disk_usage();
    body.push_str(&format!(
        "# HELP gantry_telemetry_segments Telemetry segment files on disk.\n# TYPE gantry_telemetry_segments gauge\ngantry_telemetry_segments {segments}\n# HELP gantry_telemetry_segment_bytes Bytes of telemetry segment files on disk.\n# TYPE gantry_telemetry_segment_bytes gauge\ngantry_telemetry_segment_bytes {bytes}\n"
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    email: String,
    password: String,
    /// The authenticator code, for accounts with two-factor login on.
    #[serde(default)]
    code: Option<String>,
}

/// `Set-Cookie` for the login session: `__Host-gantry_session=...; Secure` when browsers reach
/// the hub over HTTPS, `gantry_session=...` otherwise; never a `Domain`.
fn session_cookie(hub: &Hub, value: &str, max_age_secs: u64) -> HeaderValue {
    let name = auth::session_cookie_name(&hub.config);
    let secure = if hub.config.secure_cookies() { "; Secure" } else { "" };
    let text = format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_secs}{secure}");
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Check a login (throttled per account and address): the password, then the authenticator
/// code when the account has two-factor login on.
async fn check_login_with_code(hub: &Arc<Hub>, ip: Option<std::net::IpAddr>, email: String, password: String, code: Option<String>) -> ApiResult<store::User> {
    if email.len() > 254 || password.len() > auth::MAX_PASSWORD_BYTES {
        return Err(ApiError::bad_request("email or password too long"));
    }
    let account = email.trim().to_lowercase();
    limits::login_allowed(hub, &account, ip)?;
    let worker = hub.clone();
    let user = tokio::task::spawn_blocking(move || auth::login(&worker, &email, &password))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "login failed"))??;
    let Some(user) = user else {
        limits::login_outcome(hub, &account, ip, false);
        Metrics::inc(&hub.metrics.logins_failed);
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_credentials", "email or password is wrong"));
    };
    // With two-factor login on, the password alone neither succeeds nor clears the
    // account's failures; a wrong code is a failed login.
    match mfa::second_factor(hub, &user, code.as_deref())? {
        mfa::SecondFactor::Missing => return Err(mfa::totp_required()),
        mfa::SecondFactor::Wrong => {
            limits::login_outcome(hub, &account, ip, false);
            Metrics::inc(&hub.metrics.logins_failed);
            return Err(mfa::invalid_totp());
        }
        mfa::SecondFactor::NotRequired | mfa::SecondFactor::Accepted => {}
    }
    limits::login_outcome(hub, &account, ip, true);
    Ok(user)
}

async fn login(
    State(hub): State<Arc<Hub>>,
    limits::ClientIp(ip): limits::ClientIp,
    headers: HeaderMap,
    ApiJson(body): ApiJson<LoginRequest>,
) -> ApiResult<Response> {
    let user = check_login_with_code(&hub, ip, body.email, body.password, body.code).await?;
    let value = auth::start_login_session(&hub, &user, session_cookie_value(&hub, &headers).as_deref())?;
    let cookie = session_cookie(&hub, &value, hub.config.session_absolute_timeout_secs);
    let body = Json(json!({ "user": { "id": user.id, "email": user.email, "operator": user.operator } }));
    Ok(([(header::SET_COOKIE, cookie)], body).into_response())
}

async fn logout(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> ApiResult<Response> {
    if let Some(value) = session_cookie_value(&hub, &headers) {
        auth::end_session(&hub, &value)?;
    }
    Ok(([(header::SET_COOKIE, session_cookie(&hub, "", 0))], StatusCode::NO_CONTENT).into_response())
}

async fn me(State(hub): State<Arc<Hub>>, principal: Principal) -> ApiResult<Json<serde_json::Value>> {
    let mut view = accounts::me_view(&hub, &principal)?;
    view["totp_enabled"] = json!(mfa::totp_enabled(&hub, &principal)?);
    Ok(Json(view))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CreateOrg {
    id: String,
    name: Option<String>,
    agent_limit: Option<u32>,
    retention_days: Option<u32>,
}

/// Org ids are URL slugs: 2-40 characters of a-z, 0-9 and '-', not starting or ending with '-'.
pub fn validate_org_id(id: &str) -> Result<(), String> {
    let ok = (2..=40).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("org id {id:?} must be 2-40 characters of a-z, 0-9 and '-'"))
    }
}

async fn create_org(State(hub): State<Arc<Hub>>, principal: Principal, ApiJson(body): ApiJson<CreateOrg>) -> ApiResult<Response> {
    require_operator(&principal, Perm::Admin)?;
    validate_org_id(&body.id).map_err(ApiError::bad_request)?;
    let name = body.name.unwrap_or_else(|| body.id.clone());
    if name.trim().is_empty() || name.len() > 120 {
        return Err(ApiError::bad_request("name must be 1-120 characters"));
    }
    let org = Org {
        id: body.id,
        name: name.trim().to_string(),
        agent_limit: body.agent_limit.unwrap_or(hub.config.default_org_agent_limit),
        agent_count: 0,
        suspended: false,
        created_at_ms: crate::wall_ms(),
        retention_days: body.retention_days.unwrap_or(0),
    };
    if org.retention_days > crate::retention::MAX_RETENTION_DAYS {
        return Err(ApiError::bad_request(format!("retention_days must be at most {}", crate::retention::MAX_RETENTION_DAYS)));
    }
    hub.store.create_org(&org)?;
    tracing::info!(org = %org.id, by = %principal.name, "org created");
    Ok((StatusCode::CREATED, Json(org_view(&org))).into_response())
}

async fn list_orgs(State(hub): State<Arc<Hub>>, principal: Principal) -> ApiResult<Json<serde_json::Value>> {
    let orgs: Vec<_> = hub.store.orgs()?.iter().filter(|o| principal.access.knows(&o.id)).map(org_view).collect();
    Ok(Json(json!({ "orgs": orgs })))
}

async fn get_org(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    if !principal.access.knows(&org) {
        return Err(ApiError::not_found(&format!("org {org}")));
    }
    let org = hub.store.org(&org)?.ok_or_else(|| ApiError::not_found(&format!("org {org}")))?;
    Ok(Json(org_view(&org)))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    /// Duration text (`1h`) or seconds.
    ttl: Option<serde_json::Value>,
    uses: Option<u32>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

async fn create_token(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>, ApiJson(body): ApiJson<CreateToken>) -> ApiResult<Response> {
    authorize(&principal, &org, Perm::Admin, &format!("org {org}"))?;
    let ttl = match body.ttl {
        None => Duration::from_secs(3600),
        Some(serde_json::Value::Number(n)) => Duration::from_secs(n.as_u64().ok_or_else(|| ApiError::bad_request("ttl must be a positive number of seconds"))?),
        Some(serde_json::Value::String(s)) => parse_duration(&s).map_err(ApiError::bad_request)?,
        Some(_) => return Err(ApiError::bad_request("ttl must be seconds or a duration like \"1h\"")),
    };
    let request =
        TokenRequest { org: org.clone(), ttl, uses: body.uses.unwrap_or(1), labels: body.labels.into_iter().collect(), created_by: principal.name.clone() };
    let minted = enroll::create_token(&hub, request).map_err(|e| match e {
        TokenRequestError::Invalid(message) => ApiError::bad_request(message),
        TokenRequestError::UnknownOrg(org) => ApiError::not_found(&format!("org {org}")),
        TokenRequestError::Store(e) => e.into(),
    })?;
    tracing::info!(%org, token_id = %minted.record.id, by = %principal.name, "enrollment token created");
    let body = json!({
        "id": minted.record.id,
        "token": minted.text,
        "org": org,
        "expires_at": rfc3339(minted.record.expires_at_ms),
        "uses": minted.record.uses_total,
        "labels": minted.record.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        "enroll_command": format!("gantry-agent enroll --token {}", minted.text),
        "install_command": format!("curl -fsSL {}/install.sh | sudo sh -s -- --token {}", hub.config.public_url(), minted.text),
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn list_agents(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Read)?;
    let agents: Vec<_> = hub.store.agents_of_org(&org)?.iter().map(|a| agent_view(&hub, a)).collect();
    Ok(Json(json!({ "agents": agents })))
}

pub(crate) fn find_agent(hub: &Hub, principal: &Principal, id: &str, perm: Perm) -> ApiResult<Agent> {
    let agent = hub.store.agent(id)?.ok_or_else(|| ApiError::not_found(&format!("agent {id}")))?;
    authorize(principal, &agent.org, perm, &format!("agent {id}"))?;
    Ok(agent)
}

async fn get_agent(State(hub): State<Arc<Hub>>, principal: Principal, Path(id): Path<String>) -> ApiResult<Json<AgentView>> {
    let agent = find_agent(&hub, &principal, &id, Perm::Read)?;
    Ok(Json(agent_view(&hub, &agent)))
}

/// Query of the live fleet stream.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct FleetStreamQuery {
    /// Only this org's agents; default: every org the caller can read.
    pub org: Option<String>,
}

/// How long the fleet stream waits after a change before it looks, so that a burst of
/// connections (a hub restart brings every agent back at once) becomes one look.
const FLEET_STREAM_COALESCE: Duration = Duration::from_millis(500);
/// How often the fleet stream refreshes last-seen times and round trips when nothing
/// came online or went offline.
const FLEET_STREAM_REFRESH: Duration = Duration::from_secs(30);

/// Live status of agents as Server-Sent Events: one `agent` event per agent first, then one
/// whenever an agent comes online, goes offline or is revoked (at once), and refreshed
/// last-seen times and round trips every 30 s. The dashboard's agents list follows it.
async fn agents_stream(State(hub): State<Arc<Hub>>, principal: Principal, Query(query): Query<FleetStreamQuery>) -> ApiResult<Response> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let orgs: Vec<String> = visible_orgs(&hub, &principal, query.org.as_deref())?.into_iter().map(|o| o.id).collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(256);
    tokio::spawn(async move {
        // Per agent: (status, last seen bucket) as last sent.
        let mut sent: HashMap<String, (String, i64)> = HashMap::new();
        loop {
            // Register for the next change before reading, so none is missed.
            let changed = hub.registry.changes.notified();
            for org in &orgs {
                let Ok(agents) = hub.store.agents_of_org(org) else { return };
                for agent in agents {
                    let last_seen = hub.registry.info(&agent.id).map(|l| l.last_seen_ms).or(agent.last_seen_ms).unwrap_or(0);
                    let bucket = last_seen / FLEET_STREAM_REFRESH.as_millis() as i64;
                    let view = agent_view(&hub, &agent);
                    let key = (view.status.clone(), bucket);
                    if sent.get(&view.id) == Some(&key) {
                        continue;
                    }
                    let data = json!({
                        "id": view.id,
                        "org": view.org,
                        "status": view.status,
                        "last_seen": view.last_seen,
                        "rtt_ms": view.rtt_ms,
                    });
                    if tx.send(Event::default().event("agent").data(data.to_string())).await.is_err() {
                        return;
                    }
                    sent.insert(view.id, key);
                }
            }
            tokio::select! {
                _ = changed => tokio::time::sleep(FLEET_STREAM_COALESCE).await,
                _ = tokio::time::sleep(FLEET_STREAM_REFRESH) => {}
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok::<_, std::convert::Infallible>(e), rx)) });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(TAIL_KEEP_ALIVE)).into_response())
}

async fn revoke_agent(State(hub): State<Arc<Hub>>, principal: Principal, Path(id): Path<String>) -> ApiResult<Json<AgentView>> {
    let before = find_agent(&hub, &principal, &id, Perm::Admin)?;
    let agent = hub.store.revoke_agent(&id, crate::wall_ms())?.ok_or_else(|| ApiError::not_found(&format!("agent {id}")))?;
    if before.revoked_at_ms.is_none() {
        crate::webhooks::agent_event(&hub, "agent.revoked", &id);
    }
    Metrics::inc(&hub.metrics.agents_revoked);
    hub.registry.close(&id, gantry_shared::message::ErrorCode::Revoked, "agent was revoked by an operator; re-enroll it");
    hub.registry.changes.notify_waiters();
    tracing::info!(agent_id = %id, by = %principal.name, "agent revoked");
    Ok(Json(agent_view(&hub, &agent)))
}

// ---- telemetry queries ----

/// Query string of the log and event endpoints.
#[derive(Debug, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordQuery {
    /// RFC 3339 or Unix milliseconds, inclusive.
    from: Option<String>,
    /// RFC 3339 or Unix milliseconds, exclusive.
    to: Option<String>,
    source: Option<String>,
    container: Option<String>,
    /// Case-insensitive text search.
    q: Option<String>,
    /// Event kind (exact, or a prefix ending in `.`).
    kind: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
    /// `asc` (default) or `desc`.
    order: Option<String>,
}

/// Most records one page returns.
pub const MAX_PAGE: usize = 1000;

/// Parse a time given as RFC 3339 or Unix milliseconds.
pub fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| format!("{text:?} is not an RFC 3339 time or Unix milliseconds"))
}

fn filter_of(query: &RecordQuery) -> ApiResult<(store::RecordFilter, usize)> {
    let time = |t: &Option<String>| t.as_deref().map(parse_time).transpose().map_err(ApiError::bad_request);
    let newest_first = match query.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => return Err(ApiError::bad_request(format!("order {other:?} must be asc or desc"))),
    };
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!("limit must be 1..={MAX_PAGE}")));
    }
    let filter = store::RecordFilter {
        from_ms: time(&query.from)?,
        to_ms: time(&query.to)?,
        source: query.source.clone(),
        container: query.container.clone(),
        text: query.q.clone().filter(|q| !q.is_empty()),
        kind: query.kind.clone(),
        newest_first,
    };
    Ok((filter, limit))
}

/// Cursor text: `ts.seq` for one agent, `ts.seq.agent` across an org.
fn parse_cursor(text: &str) -> ApiResult<(store::RecordCursor, Option<String>)> {
    let mut parts = text.splitn(3, '.');
    let bad = || ApiError::bad_request("cursor is malformed; pass back next_cursor unchanged");
    let ts_ms = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let seq = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    Ok((store::RecordCursor { ts_ms, seq }, parts.next().map(str::to_string)))
}

pub(crate) fn record_json(agent: Option<&str>, record: &gantry_shared::telemetry::Record) -> serde_json::Value {
    use gantry_shared::telemetry::RecordBody;
    let mut value = match &record.body {
        RecordBody::Log(line) => json!({
            "kind": "log",
            "source": line.source,
            "stream": format!("{:?}", line.stream).to_lowercase(),
            "container": line.container,
            "line": line.line,
        }),
        RecordBody::Event(event) => json!({
            "kind": "event",
            "event": event.kind,
            "severity": format!("{:?}", event.severity).to_lowercase(),
            "message": event.message,
            "attributes": event.attributes.iter().cloned().collect::<BTreeMap<_, _>>(),
        }),
        RecordBody::Gap { first_seq, last_seq, records, bytes } => json!({
            "kind": "gap",
            "message": format!("{records} records ({bytes} bytes) were dropped on the agent because its spool was full"),
            "first_seq": first_seq,
            "last_seq": last_seq,
            "records": records,
            "bytes": bytes,
        }),
        RecordBody::Metrics(samples) => json!({ "kind": "metrics", "samples": samples.len() }),
        RecordBody::Check(report) => json!({
            "kind": "check",
            "check": report.name,
            "type": report.kind,
            "state": report.state.name(),
            "since": rfc3339(report.since_unix_ms),
            "transition": report.transition,
            "output": report.output,
            "latency_ms": report.latency_ms,
            "runs": report.runs,
            "failures": report.failures,
            "remediation": report.remediation,
            "crash_loop": report.crash_loop,
        }),
    };
    value["seq"] = json!(record.seq);
    value["ts"] = json!(rfc3339(record.ts_unix_ms));
    value["ts_ms"] = json!(record.ts_unix_ms);
    if let Some(agent) = agent {
        value["agent"] = json!(agent);
    }
    value
}

fn agent_records(
    hub: &Hub,
    principal: &Principal,
    id: &str,
    class: gantry_shared::message::StreamClass,
    query: &RecordQuery,
) -> ApiResult<Json<serde_json::Value>> {
    find_agent(hub, principal, id, Perm::Read)?;
    let (filter, limit) = filter_of(query)?;
    let cursor = query.cursor.as_deref().map(parse_cursor).transpose()?.map(|(c, _)| c);
    let records = hub.store.records(id, class, &filter, cursor, limit)?;
    let next_cursor = (records.len() == limit).then(|| records.last().map(|r| format!("{}.{}", r.ts_unix_ms, r.seq))).flatten();
    let records: Vec<_> = records.iter().map(|r| record_json(None, r)).collect();
    Ok(Json(json!({ "records": records, "next_cursor": next_cursor })))
}

async fn agent_logs(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(id): Path<String>,
    query: ApiQuery<RecordQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    agent_records(&hub, &principal, &id, gantry_shared::message::StreamClass::Logs, &query.0)
}

async fn agent_events(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(id): Path<String>,
    query: ApiQuery<RecordQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    agent_records(&hub, &principal, &id, gantry_shared::message::StreamClass::Events, &query.0)
}

fn org_records(
    hub: &Hub,
    principal: &Principal,
    org: &str,
    class: gantry_shared::message::StreamClass,
    query: &RecordQuery,
) -> ApiResult<Json<serde_json::Value>> {
    authorize(principal, org, Perm::Read, &format!("org {org}"))?;
    if hub.store.org(org)?.is_none() {
        return Err(ApiError::not_found(&format!("org {org}")));
    }
    let (mut filter, limit) = filter_of(query)?;
    let cursor = query.cursor.as_deref().map(parse_cursor).transpose()?;
    // Merge the agents' streams in (time, seq, agent) order; the cursor is exclusive.
    let position = |r: &gantry_shared::telemetry::Record, agent: &str| (r.ts_unix_ms, r.seq, agent.to_string());
    let after = cursor.map(|(c, agent)| (c.ts_ms, c.seq, agent.unwrap_or_default()));
    if let Some((ts, _, _)) = &after {
        if filter.newest_first {
            filter.to_ms = Some(filter.to_ms.map_or(ts + 1, |t| t.min(ts + 1)));
        } else {
            filter.from_ms = Some(filter.from_ms.map_or(*ts, |f| f.max(*ts)));
        }
    }
    let mut merged = Vec::new();
    for agent in hub.store.agents_of_org(org)? {
        for record in hub.store.records(&agent.id, class, &filter, None, limit + MAX_PAGE)? {
            let key = position(&record, &agent.id);
            let beyond = match &after {
                None => true,
                Some(after) if filter.newest_first => key < *after,
                Some(after) => key > *after,
            };
            if beyond {
                merged.push((key, record));
            }
        }
    }
    merged.sort_by(|a, b| if filter.newest_first { b.0.cmp(&a.0) } else { a.0.cmp(&b.0) });
    merged.truncate(limit);
    let next_cursor = (merged.len() == limit).then(|| merged.last().map(|((ts, seq, agent), _)| format!("{ts}.{seq}.{agent}"))).flatten();
    let records: Vec<_> = merged.iter().map(|((_, _, agent), r)| record_json(Some(agent), r)).collect();
    Ok(Json(json!({ "records": records, "next_cursor": next_cursor })))
}

async fn org_logs(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(org): Path<String>,
    query: ApiQuery<RecordQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    org_records(&hub, &principal, &org, gantry_shared::message::StreamClass::Logs, &query.0)
}

async fn org_events(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(org): Path<String>,
    query: ApiQuery<RecordQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    org_records(&hub, &principal, &org, gantry_shared::message::StreamClass::Events, &query.0)
}

/// Query string of the live tail.
#[derive(Debug, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TailQuery {
    source: Option<String>,
    container: Option<String>,
    q: Option<String>,
    /// Continue after this cursor (`ts.seq`); the `Last-Event-ID` header does the same.
    cursor: Option<String>,
    /// Without a cursor: how many recent lines to send first (default 100).
    tail: Option<usize>,
}

/// Interval of keep-alive comments on live tails.
pub const TAIL_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Live tail of an agent's logs as Server-Sent Events: recent history (or everything after
/// the cursor / `Last-Event-ID`) and then new lines as they are stored, with no gap and no
/// repeat between the two. Each event's id is its cursor, so a reconnecting `EventSource`
/// resumes exactly where it left off.
async fn agent_logs_stream(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<TailQuery>,
) -> ApiResult<Response> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use gantry_shared::message::StreamClass;
    find_agent(&hub, &principal, &id, Perm::Read)?;
    let filter = store::RecordFilter {
        source: query.source.clone(),
        container: query.container.clone(),
        text: query.q.clone().filter(|q| !q.is_empty()),
        ..store::RecordFilter::default()
    };
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_string).or(query.cursor.clone());
    let mut cursor = resume.as_deref().map(parse_cursor).transpose()?.map(|(c, _)| c);
    let tail = query.tail.unwrap_or(100).min(MAX_PAGE);
    // Subscribe before reading history, so nothing stored in between is missed.
    let mut live = hub.live.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(256);
    let to_event = |record: &gantry_shared::telemetry::Record| {
        Event::default().id(format!("{}.{}", record.ts_unix_ms, record.seq)).data(record_json(None, record).to_string())
    };
    let worker = hub.clone();
    tokio::spawn(async move {
        let mut last_seq = 0u64;
        let history = match cursor {
            Some(_) => worker.store.records(&id, StreamClass::Logs, &filter, cursor, MAX_PAGE),
            None => worker.store.records(&id, StreamClass::Logs, &store::RecordFilter { newest_first: true, ..filter.clone() }, None, tail).map(|mut r| {
                r.reverse();
                r
            }),
        };
        let Ok(mut backlog) = history else { return };
        loop {
            // Send the backlog, then keep reading the store until it is caught up.
            let caught_up = backlog.len() < MAX_PAGE;
            for record in &backlog {
                last_seq = last_seq.max(record.seq);
                cursor = Some(store::RecordCursor { ts_ms: record.ts_unix_ms, seq: record.seq });
                if tx.send(to_event(record)).await.is_err() {
                    return;
                }
            }
            if caught_up {
                break;
            }
            backlog = match worker.store.records(&id, StreamClass::Logs, &filter, cursor, MAX_PAGE) {
                Ok(next) => next,
                Err(_) => return,
            };
        }
        loop {
            match live.recv().await {
                Ok(batch) if batch.agent == id && batch.class == StreamClass::Logs => {
                    let since = last_seq;
                    for record in batch.records.iter().filter(|r| r.seq > since && filter.matches_public(r)) {
                        last_seq = record.seq;
                        cursor = Some(store::RecordCursor { ts_ms: record.ts_unix_ms, seq: record.seq });
                        if tx.send(to_event(record)).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Fell behind the live feed: catch up from the store after the cursor.
                    loop {
                        let Ok(missed) = worker.store.records(&id, StreamClass::Logs, &filter, cursor, MAX_PAGE) else { return };
                        let since = last_seq;
                        for record in missed.iter().filter(|r| r.seq > since) {
                            last_seq = record.seq;
                            cursor = Some(store::RecordCursor { ts_ms: record.ts_unix_ms, seq: record.seq });
                            if tx.send(to_event(record)).await.is_err() {
                                return;
                            }
                        }
                        if missed.len() < MAX_PAGE {
                            break;
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|event| (Ok::<_, std::convert::Infallible>(event), rx)) });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(TAIL_KEEP_ALIVE)).into_response())
}

/// Query string of the metrics endpoint.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricQuery {
    /// Metric name; without it, the names the agent has.
    name: Option<String>,
    from: Option<String>,
    to: Option<String>,
    /// Bucket width: seconds or a duration like `1m`.
    step: Option<String>,
}

/// Most points one series may have.
pub const MAX_POINTS: i64 = 11_000;

async fn agent_metrics(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<MetricQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    find_agent(&hub, &principal, &id, Perm::Read)?;
    let Some(name) = query.name else {
        return Ok(Json(json!({ "names": hub.store.metric_names(&id)? })));
    };
    let now = crate::wall_ms();
    let to = query.to.as_deref().map(parse_time).transpose().map_err(ApiError::bad_request)?.unwrap_or(now);
    let from = query.from.as_deref().map(parse_time).transpose().map_err(ApiError::bad_request)?.unwrap_or(to - 3_600_000);
    if from >= to {
        return Err(ApiError::bad_request("from must be before to"));
    }
    let step_ms = match query.step.as_deref() {
        Some(step) => parse_duration(step).map_err(ApiError::bad_request)?.as_millis() as i64,
        None => ((to - from) / 300).max(1000),
    };
    if step_ms <= 0 || (to - from) / step_ms > MAX_POINTS {
        return Err(ApiError::bad_request(format!("step too small: at most {MAX_POINTS} points per series")));
    }
    let series = hub.store.metric_series(&id, &name, from, to, step_ms)?;
    let series: Vec<_> = series.into_iter().map(|s| json!({ "labels": s.labels.into_iter().collect::<BTreeMap<_, _>>(), "points": s.points })).collect();
    Ok(Json(json!({ "name": name, "from": rfc3339(from), "to": rfc3339(to), "step_ms": step_ms, "series": series })))
}

// ---- dashboard pages ----

async fn login_page(State(hub): State<Arc<Hub>>) -> Html<String> {
    Html(gantry_dashboards::login_page_with(&hub.config.theme.brand(), None))
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    email: String,
    password: String,
    /// The authenticator code; the page always sends the field, empty when not needed.
    #[serde(default)]
    code: Option<String>,
}

async fn login_form(State(hub): State<Arc<Hub>>, limits::ClientIp(ip): limits::ClientIp, headers: HeaderMap, Form(form): Form<LoginForm>) -> Response {
    match check_login_with_code(&hub, ip, form.email, form.password, form.code).await {
        Ok(user) => match auth::start_login_session(&hub, &user, session_cookie_value(&hub, &headers).as_deref()) {
            Ok(value) => {
                let cookie = session_cookie(&hub, &value, hub.config.session_absolute_timeout_secs);
                ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
            }
            Err(e) => ApiError::from(e).into_response(),
        },
        Err(error) => {
            let page = (error.status, Html(gantry_dashboards::login_page_with(&hub.config.theme.brand(), Some(&error.message)))).into_response();
            limits::with_retry_after(page, error.retry_after_secs)
        }
    }
}

async fn logout_form(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Response {
    if let Some(value) = session_cookie_value(&hub, &headers) {
        let _ = auth::end_session(&hub, &value);
    }
    ([(header::SET_COOKIE, session_cookie(&hub, "", 0))], Redirect::to("/login")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn org_ids_are_slugs() {
        assert!(validate_org_id("acme-1").is_ok());
        assert!(validate_org_id("Acme").is_err());
        assert!(validate_org_id("-a").is_err());
        assert!(validate_org_id("a").is_err());
    }
}
