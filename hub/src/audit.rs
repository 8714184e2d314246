//! Recording the audit log: who changed what, from where, with what outcome.
//!
//! One middleware ([`record_requests`]) gives every HTTP response an `x-request-id` and,
//! after the handler ran, records each state-changing request (POST, PUT, PATCH, DELETE
//! under `/api/v1/`, plus the dashboard's login and logout forms, and the org export, a
//! read of everything): the caller as the
//! `Principal` extractor resolved it (it notes the principal in a [`PrincipalSlot`] the
//! middleware put in the request), the org of the path (looked up for agent and deployment
//! routes), the route template, the path parameters, the status, the request id and the
//! client address. Login attempts record the email tried; no body, password or secret is
//! ever recorded. [`deploy_report`] records what agents report back on deployments the hub
//! ordered.
//!
//! Handlers do not call this module: adding a route audits it. A handler may only add
//! facts the path does not carry (a support action's command and exit code) by putting an
//! [`AuditDetail`] in its response's extensions; they join the entry's target. The entries
//! themselves, their chain and its verification live in `store::audit`.

use crate::auth::{self, Principal};
use crate::store::{self, AuditVerdict, NewAuditEntry};
use crate::Hub;
use axum::body::{Body, HttpBody};
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::header::{self, HeaderValue};
use axum::http::{Extensions, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::RequestPartsExt;
use gantry_shared::message::{DeployReport, DeployState};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tracing::Instrument;

/// Response header carrying the id of the request (also in its audit entry).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Actor of a request without valid credentials.
pub const ANONYMOUS: &str = "anonymous";

/// Largest created-object reply read to find the new object's id.
const MAX_CREATED_REPLY_BYTES: u64 = 256 * 1024;

/// Routes whose body names the account a login attempt was for.
const LOGIN_ROUTES: [&str; 2] = ["/api/v1/auth/login", "/login"];
/// Routes that end the caller's session (the principal is resolved before, since it is
/// gone after).
const LOGOUT_ROUTES: [&str; 2] = ["/api/v1/auth/logout", "/logout"];

/// Facts a handler adds to its request's audit entry (in the response's extensions),
/// e.g. `command` and `exit_code` of a remote exec. Keys never replace path parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditDetail(pub BTreeMap<String, String>);

/// The id the hub gave a request, in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// Where the `Principal` extractor leaves the caller it resolved, so the middleware can
/// record it after the handler ran. Present in the extensions of audited requests only.
#[derive(Debug, Clone, Default)]
pub struct PrincipalSlot(Arc<Mutex<Option<Principal>>>);

impl PrincipalSlot {
    fn take(&self) -> Option<Principal> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Note the caller of an audited request (called by the `Principal` extractor).
pub fn note_principal(extensions: &Extensions, principal: &Principal) {
    if let Some(slot) = extensions.get::<PrincipalSlot>() {
        *slot.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(principal.clone());
    }
}

/// Dashboard form actions (see `api::pages` and `api::pages_admin`) that change state like
/// API calls do.
const DASHBOARD_FORM_PREFIXES: [&str; 6] = ["/orgs", "/deployments/", "/plans", "/agents/", "/enrollment", "/account/"];

/// Whether a request is recorded: state-changing methods on the API, the login and
/// logout forms, and the dashboard's form actions.
pub fn is_audited(method: &Method, path: &str) -> bool {
    let changes_state = matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE);
    let dashboard_form = DASHBOARD_FORM_PREFIXES.iter().any(|prefix| path.starts_with(prefix));
    let bulk_read = *method == Method::GET && is_org_export(path);
    bulk_read || (changes_state && (path.starts_with("/api/v1/") || LOGIN_ROUTES.contains(&path) || LOGOUT_ROUTES.contains(&path) || dashboard_form))
}

/// `GET /api/v1/orgs/{org}/export`: a read, but one that hands out all of an org's data,
/// so it is recorded like a change.
fn is_org_export(path: &str) -> bool {
    path.strip_prefix("/api/v1/orgs/").and_then(|rest| rest.strip_suffix("/export")).is_some_and(|org| !org.is_empty() && !org.contains('/'))
}

/// The login form and JSON body, reduced to the one field the audit log keeps.
#[derive(Debug, serde::Deserialize)]
struct LoginEmail {
    email: String,
}

/// Middleware: an `x-request-id` on every response, an audit entry for every
/// state-changing request (see the module doc).
pub async fn record_requests(State(hub): State<Arc<Hub>>, request: Request, next: axum::middleware::Next) -> Response {
    let request_id = auth::random_hex(16);
    let span = tracing::info_span!("http", request_id = %request_id, method = %request.method(), path = %request.uri().path());
    let audited = is_audited(request.method(), request.uri().path());
    let mut response = if audited {
        record_request(&hub, request, next, &request_id).instrument(span).await
    } else {
        let mut request = request;
        request.extensions_mut().insert(RequestId(request_id.clone()));
        next.run(request).instrument(span).await
    };
    // Random hex is always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

async fn record_request(hub: &Arc<Hub>, request: Request, next: axum::middleware::Next, request_id: &str) -> Response {
    let (mut parts, body) = request.into_parts();
    let method = parts.method.clone();
    let route = parts.extensions.get::<MatchedPath>().map(|m| m.as_str().to_string());
    let params: BTreeMap<String, String> =
        parts.extract::<RawPathParams>().await.map(|p| p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap_or_default();
    let client_ip = crate::api::client_ip(hub, &parts).map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
    let template = route.clone().unwrap_or_else(|| parts.uri.path().chars().take(200).collect());
    let is_login = route.as_deref().is_some_and(|r| LOGIN_ROUTES.contains(&r));
    let is_logout = route.as_deref().is_some_and(|r| LOGOUT_ROUTES.contains(&r));

    // Only the email of a login attempt is read; the body is handed on unchanged.
    let (body, login_email) = if is_login {
        match axum::body::to_bytes(body, hub.config.max_http_body_bytes).await {
            Ok(bytes) => {
                let email = login_email(parts.headers.get(header::CONTENT_TYPE), &bytes);
                (Body::from(bytes), email)
            }
            Err(_) => {
                let response = crate::api::ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "request body is too large").into_response();
                let entry = entry_of(EntryParts {
                    actor: (ANONYMOUS.into(), ANONYMOUS),
                    org: None,
                    method: &method,
                    template,
                    target: params,
                    status: response.status(),
                    request_id,
                    client_ip,
                });
                append(hub, entry).await;
                return response;
            }
        }
    } else {
        (body, None)
    };
    let session_before = if is_logout {
        match crate::api::session_cookie_value(hub, &parts.headers) {
            Some(value) => auth::principal_from_session(hub, &value).ok().flatten(),
            None => None,
        }
    } else {
        None
    };
    let slot = PrincipalSlot::default();
    parts.extensions.insert(slot.clone());
    parts.extensions.insert(RequestId(request_id.to_string()));

    let response = next.run(Request::from_parts(parts, body)).await;

    let status = response.status();
    let (response, created) = created_id(response).await;
    let principal = slot.take().or(session_before);
    let actor = match (&principal, login_email) {
        (Some(p), _) => (p.name.clone(), if p.name.starts_with("key:") { "api_key" } else { "user" }),
        (None, Some(email)) => (email, if status.is_success() || status.is_redirection() { "user" } else { ANONYMOUS }),
        (None, None) => (ANONYMOUS.to_string(), ANONYMOUS),
    };
    let mut target = params;
    if let Some(detail) = response.extensions().get::<AuditDetail>() {
        for (key, value) in &detail.0 {
            target.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
    if let Some(id) = created {
        target.entry("id".to_string()).or_insert(id);
    }
    let org = org_of(hub, &template, &target, principal.as_ref());
    append(hub, entry_of(EntryParts { actor, org, method: &method, template, target, status, request_id, client_ip })).await;
    response
}

/// The lowercased email of a login body (JSON or form), if it has one.
fn login_email(content_type: Option<&HeaderValue>, bytes: &[u8]) -> Option<String> {
    let is_form = content_type.and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let parsed: Option<LoginEmail> = if is_form {
        // A form body is a query string: parse it as one.
        let uri: axum::http::Uri = format!("/?{}", std::str::from_utf8(bytes).ok()?).parse().ok()?;
        axum::extract::Query::<LoginEmail>::try_from_uri(&uri).ok().map(|q| q.0)
    } else {
        serde_json::from_slice(bytes).ok()
    };
    parsed.map(|l| l.email.trim().to_lowercase().chars().take(254).collect())
}

/// The `id` of the object a 201 reply created, reading small JSON replies only.
async fn created_id(response: Response) -> (Response, Option<String>) {
    let is_json = response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    let small = response.body().size_hint().exact().is_some_and(|n| n <= MAX_CREATED_REPLY_BYTES);
    if response.status() != StatusCode::CREATED || !is_json || !small {
        return (response, None);
    }
    let (parts, body) = response.into_parts();
    match axum::body::to_bytes(body, MAX_CREATED_REPLY_BYTES as usize).await {
        Ok(bytes) => {
            let id = serde_json::from_slice::<serde_json::Value>(&bytes).ok().and_then(|v| v["id"].as_str().map(str::to_string));
            (Response::from_parts(parts, Body::from(bytes)), id)
        }
        // Unreachable in practice (the size was known and small); answer without a body
        // rather than fail the request.
        Err(_) => (Response::from_parts(parts, Body::empty()), None),
    }
}

/// The org a request acted in: the path's `{org}`, the org of the agent or deployment it
/// names, the org an org was created as, or else the caller's own org.
fn org_of(hub: &Hub, template: &str, target: &BTreeMap<String, String>, principal: Option<&Principal>) -> Option<String> {
    if let Some(org) = target.get("org") {
        return Some(org.clone());
    }
    let id = target.get("id");
    let found = match id {
        Some(id) if template.starts_with("/api/v1/agents/{id}") || template.starts_with("/agents/{id}") => hub.store.agent(id).ok().flatten().map(|a| a.org),
        Some(id) if template.starts_with("/api/v1/deployments/{id}") || template.starts_with("/deployments/{id}") => {
            hub.store.deployment(id).ok().flatten().map(|d| d.org)
        }
        Some(id) if template == "/api/v1/orgs" => Some(id.clone()),
        _ => None,
    };
    found.or_else(|| principal.and_then(|p| p.org.clone()))
}

struct EntryParts<'a> {
    actor: (String, &'static str),
    org: Option<String>,
    method: &'a Method,
    template: String,
    target: BTreeMap<String, String>,
    status: StatusCode,
    request_id: &'a str,
    client_ip: String,
}

fn entry_of(parts: EntryParts<'_>) -> NewAuditEntry {
    NewAuditEntry {
        at_ms: crate::wall_ms(),
        actor: parts.actor.0,
        actor_kind: parts.actor.1.to_string(),
        org: parts.org,
        action: format!("{} {}", parts.method, parts.template),
        target: parts.target,
        outcome: parts.status.as_u16().to_string(),
        request_id: Some(parts.request_id.to_string()),
        client_ip: Some(parts.client_ip),
    }
}

/// Append off the async workers (appending flushes). A failure is logged: the change it
/// describes has already been made and answered.
async fn append(hub: &Arc<Hub>, entry: NewAuditEntry) {
    let store = hub.store.clone();
    let action = entry.action.clone();
    match tokio::task::spawn_blocking(move || store.append_audit(entry)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::error!(%error, %action, "cannot record an audit entry"),
        Err(error) => tracing::error!(%error, %action, "audit append task failed"),
    }
}

/// Record an action that is not an HTTP request (an agent's report, a system task).
pub fn record(hub: &Hub, entry: NewAuditEntry) {
    let action = entry.action.clone();
    if let Err(error) = hub.store.append_audit(entry) {
        tracing::error!(%error, %action, "cannot record an audit entry");
    }
}

/// Record an agent's report on a deployment the hub ordered: actor `agent:<id>`, action
/// `deploy.report`, the deployment and revision as target, the reported state as outcome.
pub fn deploy_report(hub: &Hub, agent_id: &str, org: &str, report: &DeployReport) {
    let outcome = match report.state {
        DeployState::Applying => "applying".to_string(),
        DeployState::Healthy => "healthy".to_string(),
        DeployState::RolledBack { to } => format!("rolled_back to {to}"),
        DeployState::Failed => "failed".to_string(),
        DeployState::Removed => "removed".to_string(),
    };
    let client_ip = hub.registry.info(agent_id).map(|l| l.remote_addr.parse::<SocketAddr>().map_or(l.remote_addr, |a| a.ip().to_string()));
    let target = [("deployment".to_string(), report.deployment_id.clone()), ("revision".to_string(), report.revision.to_string())].into();
    record(
        hub,
        NewAuditEntry {
            at_ms: crate::wall_ms(),
            actor: format!("agent:{agent_id}"),
            actor_kind: "agent".into(),
            org: Some(org.to_string()),
            action: "deploy.report".into(),
            target,
            outcome,
            request_id: None,
            client_ip,
        },
    );
}

/// The audit chain did not verify: the first bad entry and why. `gantry-hub audit verify`
/// exits 1 on this error (2 on any other).
#[derive(Debug, thiserror::Error)]
#[error("audit chain broken at seq {seq}: {reason}")]
pub struct ChainBroken {
    pub seq: u64,
    pub reason: String,
}

/// `gantry-hub audit verify`: open the store of a stopped hub and walk the chain. The
/// line to print when it is intact; [`ChainBroken`] when it is not.
pub fn verify_data_dir(data: &Path) -> anyhow::Result<String> {
    let store = match store::Store::open(data) {
        Ok(store) => store,
        Err(store::Error::Locked(path)) => {
            anyhow::bail!("the store at {path} is in use: stop the hub before running `gantry-hub audit verify` (it reads the store directly)")
        }
        Err(error) => return Err(anyhow::Error::new(error).context(format!("opening the store in {}", data.display()))),
    };
    match store.verify_audit()? {
        AuditVerdict::Intact { entries, last_hash } => Ok(format!("audit chain intact: {entries} entries, last hash {last_hash}")),
        AuditVerdict::Broken { seq, reason } => Err(ChainBroken { seq, reason }.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_state_changes_are_audited() {
        assert!(is_audited(&Method::POST, "/api/v1/orgs"));
        assert!(is_audited(&Method::DELETE, "/api/v1/deployments/dep_1"));
        assert!(is_audited(&Method::POST, "/login"));
        assert!(!is_audited(&Method::GET, "/api/v1/orgs"));
        assert!(!is_audited(&Method::HEAD, "/api/v1/orgs"));
        assert!(!is_audited(&Method::POST, "/metrics"));
    }

    /// Driven with `oneshot`, without `ConnectInfo`: the address is recorded as unknown.
    #[tokio::test]
    async fn a_router_without_connect_info_records_an_unknown_address() {
        use tower::ServiceExt;
        let dir = std::env::temp_dir().join(format!("gantry-audit-router-{}-{}", std::process::id(), rand::random::<u64>()));
        crate::init(&dir, "127.0.0.1:7443", "ops@example.com", Some("a long enough password")).unwrap();
        let key = std::fs::read_to_string(dir.join("operator.key")).unwrap().trim().to_string();
        let hub = Hub::open(crate::config::Config { data_dir: dir.clone(), ..crate::config::Config::default() }).unwrap();
        let request = Request::builder()
            .method(Method::POST)
            .uri("/api/v1/orgs")
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(r#"{"id":"acme"}"#))
            .unwrap();
        let response = crate::api::router(hub.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let request_id = response.headers()[REQUEST_ID_HEADER].to_str().unwrap().to_string();
        let page = hub.store.audit_entries(&store::AuditFilter::default(), 10).unwrap();
        assert_eq!(page.entries.len(), 1);
        let entry = &page.entries[0];
        assert_eq!((entry.client_ip.as_deref(), entry.request_id.as_deref(), entry.org.as_deref()), (Some("unknown"), Some(request_id.as_str()), Some("acme")));
        drop(hub);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn login_bodies_give_only_the_email() {
        let json = HeaderValue::from_static("application/json");
        assert_eq!(login_email(Some(&json), br#"{"email":" Ops@Example.com","password":"hunter2 hunter2"}"#), Some("ops@example.com".into()));
        let form = HeaderValue::from_static("application/x-www-form-urlencoded");
        assert_eq!(login_email(Some(&form), b"email=a%40b.c&password=x"), Some("a@b.c".into()));
        assert_eq!(login_email(Some(&json), b"not json"), None);
    }
}
