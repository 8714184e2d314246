//! The HTTP API under `/api/v1`, the probes (`/healthz`, `/readyz`, `/metrics`) and the
//! dashboard pages, as one axum `Router` built by [`router`].
//!
//! Every handler takes the caller's org from the credential (session cookie or API key),
//! never from the request alone: an object of another org answers 404 as if it did not
//! exist. Errors have one JSON shape, `{"error": {"code", "message"}}`, with stable codes
//! and no internals. Bodies are size-capped and validated before anything is written.

mod audit;
mod deployments;
mod headers;
mod health;
mod limits;
mod secrets;
mod webhooks;

use crate::auth::{self, Principal, SESSION_COOKIE};
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
use axum::routing::{get, post, put};
use axum::{Form, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
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
        let Some(value) = cookie_value(&parts.headers, SESSION_COOKIE) else {
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

/// Operators may act in any org; anyone else only in their own. Other orgs look absent.
fn authorize_org(principal: &Principal, org: &str) -> ApiResult<()> {
    if principal.operator || principal.org.as_deref() == Some(org) {
        Ok(())
    } else {
        Err(ApiError::not_found(&format!("org {org}")))
    }
}

fn require_operator(principal: &Principal) -> ApiResult<()> {
    if principal.operator {
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
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
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

/// The whole HTTP surface.
pub fn router(hub: Arc<Hub>) -> Router {
    let max_body = hub.config.max_http_body_bytes;
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/auth/logout", post(logout))
        .route("/api/v1/auth/me", get(me))
        .route("/api/v1/orgs", get(list_orgs).post(create_org))
        .route("/api/v1/orgs/{org}", get(get_org))
        .route("/api/v1/orgs/{org}/enrollment-tokens", post(create_token))
        .route("/api/v1/orgs/{org}/agents", get(list_agents))
        .route("/api/v1/agents/{id}", get(get_agent))
        .route("/api/v1/agents/{id}/revoke", post(revoke_agent))
        .route("/api/v1/agents/{id}/logs", get(agent_logs))
        .route("/api/v1/agents/{id}/logs/stream", get(agent_logs_stream))
        .route("/api/v1/agents/{id}/events", get(agent_events))
        .route("/api/v1/agents/{id}/metrics", get(agent_metrics))
        .route("/api/v1/orgs/{org}/deployments", get(deployments::list).post(deployments::create))
        .route("/api/v1/deployments/{id}", get(deployments::get).put(deployments::update).delete(deployments::delete))
        .route("/api/v1/deployments/{id}/rollback", post(deployments::rollback))
        .route("/api/v1/deployments/{id}/revisions", get(deployments::revisions))
        .route("/api/v1/deployments/{id}/progress", get(deployments::progress))
        .route("/api/v1/orgs/{org}/secrets", get(secrets::list_secrets))
        .route("/api/v1/orgs/{org}/secrets/{name}", put(secrets::put_secret).delete(secrets::delete_secret))
        .route("/api/v1/orgs/{org}/registries", get(secrets::list_registries))
        .route("/api/v1/orgs/{org}/registries/{server}", put(secrets::put_registry).delete(secrets::delete_registry))
        .route("/api/v1/orgs/{org}/webhooks", get(webhooks::list).post(webhooks::create))
        .route("/api/v1/orgs/{org}/webhooks/{id}", get(webhooks::get).patch(webhooks::update).put(webhooks::replace).delete(webhooks::delete))
        .route("/api/v1/orgs/{org}/webhooks/{id}/rotate-secret", post(webhooks::rotate_secret))
        .route("/api/v1/orgs/{org}/webhooks/{id}/deliveries", get(webhooks::deliveries))
        .route("/api/v1/orgs/{org}/webhooks/{id}/deliveries/{delivery}", get(webhooks::delivery))
        .route("/api/v1/orgs/{org}/webhooks/{id}/deliveries/{delivery}/redeliver", post(webhooks::redeliver))
        .route("/api/v1/orgs/{org}/checks", get(health::list_checks).post(health::create_check))
        .route("/api/v1/orgs/{org}/checks/{id}", get(health::get_check).put(health::replace_check).delete(health::delete_check))
        .route("/api/v1/agents/{id}/checks", get(health::agent_checks))
        .route("/api/v1/orgs/{org}/alerts", get(health::list_alerts))
        .route("/api/v1/orgs/{org}/alerts/{id}", get(health::get_alert))
        .route("/api/v1/orgs/{org}/alerts/{id}/acknowledge", post(health::acknowledge_alert))
        .route("/api/v1/orgs/{org}/silences", get(health::list_silences).post(health::create_silence))
        .route("/api/v1/orgs/{org}/silences/{id}", axum::routing::delete(health::delete_silence))
        .route("/api/v1/orgs/{org}/alert-rules", get(health::get_rules).put(health::put_rules))
        .route("/api/v1/orgs/{org}/logs", get(org_logs))
        .route("/api/v1/orgs/{org}/events", get(org_events))
        .route("/api/v1/orgs/{org}/audit", get(audit::org_log))
        .route("/api/v1/audit", get(audit::all))
        .route("/", get(dashboard))
        .route("/login", get(login_page).post(login_form))
        .route(headers::STYLESHEET_PATH, get(headers::stylesheet))
        .route("/logout", post(logout_form))
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async { ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this route does not take that method") })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(hub.clone(), limits::rate_limit))
        .layer(axum::middleware::from_fn_with_state(hub.clone(), count_requests))
        .layer(axum::middleware::from_fn_with_state(hub.clone(), crate::audit::record_requests))
        .with_state(hub)
}

async fn count_requests(State(hub): State<Arc<Hub>>, request: Request, next: axum::middleware::Next) -> Response {
    Metrics::inc(&hub.metrics.http_requests);
    let mut response = next.run(request).await;
    headers::security_headers(response.headers_mut(), headers::SERVES_TLS);
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
    let (segments, bytes) = hub.store.telemetry_disk_usage();
    body.push_str(&format!(
        "# HELP gantry_telemetry_segments Telemetry segment files on disk.\n# TYPE gantry_telemetry_segments gauge\ngantry_telemetry_segments {segments}\n# HELP gantry_telemetry_segment_bytes Bytes of telemetry segment files on disk.\n# TYPE gantry_telemetry_segment_bytes gauge\ngantry_telemetry_segment_bytes {bytes}\n"
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    email: String,
    password: String,
}

fn session_cookie(hub: &Hub, value: &str, max_age_secs: u64) -> HeaderValue {
    let secure = if hub.config.public_url().starts_with("https://") { "; Secure" } else { "" };
    let text = format!("{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_secs}{secure}");
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

async fn check_login(hub: &Arc<Hub>, ip: Option<std::net::IpAddr>, email: String, password: String) -> ApiResult<store::User> {
    if email.len() > 254 || password.len() > auth::MAX_PASSWORD_BYTES {
        return Err(ApiError::bad_request("email or password too long"));
    }
    let account = email.trim().to_lowercase();
    limits::login_allowed(hub, &account, ip)?;
    let worker = hub.clone();
    let user = tokio::task::spawn_blocking(move || auth::login(&worker, &email, &password))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "login failed"))??;
    limits::login_outcome(hub, &account, ip, user.is_some());
    user.ok_or_else(|| {
        Metrics::inc(&hub.metrics.logins_failed);
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_credentials", "email or password is wrong")
    })
}

async fn login(State(hub): State<Arc<Hub>>, limits::ClientIp(ip): limits::ClientIp, ApiJson(body): ApiJson<LoginRequest>) -> ApiResult<Response> {
    let user = check_login(&hub, ip, body.email, body.password).await?;
    let value = auth::start_session(&hub, &user)?;
    let cookie = session_cookie(&hub, &value, hub.config.session_absolute_timeout_secs);
    let body = Json(json!({ "user": { "id": user.id, "email": user.email, "operator": user.operator } }));
    Ok(([(header::SET_COOKIE, cookie)], body).into_response())
}

async fn logout(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> ApiResult<Response> {
    if let Some(value) = cookie_value(&headers, SESSION_COOKIE) {
        auth::end_session(&hub, &value)?;
    }
    Ok(([(header::SET_COOKIE, session_cookie(&hub, "", 0))], StatusCode::NO_CONTENT).into_response())
}

async fn me(principal: Principal) -> Json<serde_json::Value> {
    Json(json!({ "id": principal.id, "name": principal.name, "operator": principal.operator, "org": principal.org }))
}

#[derive(Debug, Deserialize)]
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
    require_operator(&principal)?;
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
    let orgs: Vec<_> = hub.store.orgs()?.iter().filter(|o| authorize_org(&principal, &o.id).is_ok()).map(org_view).collect();
    Ok(Json(json!({ "orgs": orgs })))
}

async fn get_org(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    authorize_org(&principal, &org)?;
    let org = hub.store.org(&org)?.ok_or_else(|| ApiError::not_found(&format!("org {org}")))?;
    Ok(Json(org_view(&org)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    /// Duration text (`1h`) or seconds.
    ttl: Option<serde_json::Value>,
    uses: Option<u32>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

async fn create_token(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>, ApiJson(body): ApiJson<CreateToken>) -> ApiResult<Response> {
    authorize_org(&principal, &org)?;
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
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn list_agents(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    authorize_org(&principal, &org)?;
    if hub.store.org(&org)?.is_none() {
        return Err(ApiError::not_found(&format!("org {org}")));
    }
    let agents: Vec<_> = hub.store.agents_of_org(&org)?.iter().map(|a| agent_view(&hub, a)).collect();
    Ok(Json(json!({ "agents": agents })))
}

pub(crate) fn find_agent(hub: &Hub, principal: &Principal, id: &str) -> ApiResult<Agent> {
    let agent = hub.store.agent(id)?.ok_or_else(|| ApiError::not_found(&format!("agent {id}")))?;
    authorize_org(principal, &agent.org).map_err(|_| ApiError::not_found(&format!("agent {id}")))?;
    Ok(agent)
}

async fn get_agent(State(hub): State<Arc<Hub>>, principal: Principal, Path(id): Path<String>) -> ApiResult<Json<AgentView>> {
    let agent = find_agent(&hub, &principal, &id)?;
    Ok(Json(agent_view(&hub, &agent)))
}

async fn revoke_agent(State(hub): State<Arc<Hub>>, principal: Principal, Path(id): Path<String>) -> ApiResult<Json<AgentView>> {
    let before = find_agent(&hub, &principal, &id)?;
    let agent = hub.store.revoke_agent(&id, crate::wall_ms())?.ok_or_else(|| ApiError::not_found(&format!("agent {id}")))?;
    if before.revoked_at_ms.is_none() {
        crate::webhooks::agent_event(&hub, "agent.revoked", &id);
    }
    Metrics::inc(&hub.metrics.agents_revoked);
    hub.registry.close(&id, gantry_shared::message::ErrorCode::Revoked, "agent was revoked by an operator; re-enroll it");
    tracing::info!(agent_id = %id, by = %principal.name, "agent revoked");
    Ok(Json(agent_view(&hub, &agent)))
}

// ---- telemetry queries ----

/// Query string of the log and event endpoints.
#[derive(Debug, Deserialize, Default)]
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
    find_agent(hub, principal, id)?;
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
    authorize_org(principal, org)?;
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
#[derive(Debug, Deserialize, Default)]
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
    find_agent(&hub, &principal, &id)?;
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
#[derive(Debug, Deserialize)]
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
    find_agent(&hub, &principal, &id)?;
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

async fn dashboard(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> ApiResult<Response> {
    let principal = match cookie_value(&headers, SESSION_COOKIE) {
        Some(value) => auth::principal_from_session(&hub, &value)?,
        None => None,
    };
    let Some(principal) = principal else {
        return Ok(Redirect::to("/login").into_response());
    };
    let mut orgs = Vec::new();
    for org in hub.store.orgs()? {
        if authorize_org(&principal, &org.id).is_err() {
            continue;
        }
        let agents = hub
            .store
            .agents_of_org(&org.id)?
            .iter()
            .map(|a| {
                let v = agent_view(&hub, a);
                gantry_dashboards::AgentRow {
                    id: v.id,
                    hostname: v.hostname,
                    status: v.status,
                    os: v.os,
                    arch: v.arch,
                    version: v.agent_version,
                    last_seen: v.last_seen.unwrap_or_default(),
                    rtt_ms: v.rtt_ms,
                    labels: v.labels.into_iter().collect(),
                }
            })
            .collect();
        orgs.push(gantry_dashboards::OrgSection { id: org.id, name: org.name, agent_limit: org.agent_limit, agents });
    }
    let view = gantry_dashboards::AgentsView { user: principal.name, orgs };
    Ok(Html(gantry_dashboards::agents_page(&view)).into_response())
}

async fn login_page() -> Html<String> {
    Html(gantry_dashboards::login_page(None))
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    email: String,
    password: String,
}

async fn login_form(State(hub): State<Arc<Hub>>, limits::ClientIp(ip): limits::ClientIp, Form(form): Form<LoginForm>) -> Response {
    match check_login(&hub, ip, form.email, form.password).await {
        Ok(user) => match auth::start_session(&hub, &user) {
            Ok(value) => {
                let cookie = session_cookie(&hub, &value, hub.config.session_absolute_timeout_secs);
                ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
            }
            Err(e) => ApiError::from(e).into_response(),
        },
        Err(error) => {
            let page = (error.status, Html(gantry_dashboards::login_page(Some(&error.message)))).into_response();
            limits::with_retry_after(page, error.retry_after_secs)
        }
    }
}

async fn logout_form(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Response {
    if let Some(value) = cookie_value(&headers, SESSION_COOKIE) {
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
