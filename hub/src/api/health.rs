//! Health check configurations, agents' check states, alerts, silences and alert rules.
//!
//! - `POST/GET /api/v1/orgs/{org}/checks`, `GET/PUT/DELETE /api/v1/orgs/{org}/checks/{id}`:
//!   `{"scope": {"agents"|"selector"|"deployment"}, "spec": CheckSpec}`; an empty scope is
//!   every agent of the org. Every change is validated whole before anything is written,
//!   then sent to the org's connected agents.
//! - `GET /api/v1/agents/{id}/checks`: each check's latest state and its recent reports.
//! - `GET /api/v1/orgs/{org}/alerts?status=open|firing|acknowledged|resolved|all`,
//!   `GET .../alerts/{id}`, `POST .../alerts/{id}/acknowledge`.
//! - `GET/POST /api/v1/orgs/{org}/silences`, `DELETE .../silences/{id}`.
//! - `GET/PUT /api/v1/orgs/{org}/alert-rules`.

use super::{find_agent, org_in_scope, parse_duration, parse_time, rfc3339, ApiError, ApiJson, ApiQuery, ApiResult};
use crate::access::Perm;
use crate::auth::Principal;
use crate::store::{Alert, AlertRules, AlertStatus, CheckConfig, CheckScope, CheckStatus, RecordFilter, Silence};
use crate::Hub;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use gantry_shared::checks::{CheckSpec, MAX_CHECKS_PER_AGENT};
use gantry_shared::message::StreamClass;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Reports shown per agent in `GET /api/v1/agents/{id}/checks`.
pub const HISTORY_LIMIT: usize = 100;
/// Most silences per org.
pub const MAX_SILENCES_PER_ORG: usize = 1000;

/// Body of a check create or replace.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    #[serde(default)]
    pub scope: CheckScope,
    pub spec: CheckSpec,
}

fn invalid(errors: Vec<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_check", errors.join("; "))
}

fn check_json(config: &CheckConfig) -> Value {
    json!({
        "id": config.id,
        "org": config.org,
        "scope": config.scope,
        "spec": config.spec,
        "created_by": config.created_by,
        "created_at": rfc3339(config.created_at_ms),
        "updated_at": rfc3339(config.updated_at_ms),
    })
}

/// Validate a request against the org: spec, scope (own agents and deployment only, well
/// formed labels) and the per-org limit.
fn validate(hub: &Hub, org: &str, request: &CheckRequest, replacing: Option<&str>) -> ApiResult<()> {
    let mut errors: Vec<String> = request.spec.validate().err().unwrap_or_default().into_iter().map(|e| format!("spec.{e}")).collect();
    for (key, value) in &request.scope.selector {
        if let Err(error) = crate::enroll::validate_label(key, value) {
            errors.push(format!("scope.selector: {error}"));
        }
    }
    if request.scope.agents.len() > 10_000 {
        errors.push("scope.agents may list at most 10000 agents".to_string());
    }
    let existing = hub.store.check_configs(org)?;
    if replacing.is_none() && existing.len() >= MAX_CHECKS_PER_AGENT {
        errors.push(format!("an org may have at most {MAX_CHECKS_PER_AGENT} checks"));
    }
    if !errors.is_empty() {
        return Err(invalid(errors));
    }
    for id in &request.scope.agents {
        match hub.store.agent(id)? {
            Some(agent) if agent.org == org => {}
            _ => return Err(ApiError::not_found(&format!("scope agent {id}"))),
        }
    }
    if let Some(id) = &request.scope.deployment {
        match hub.store.deployment(id)? {
            Some(d) if d.org == org && d.deleted_at_ms.is_none() => {}
            _ => return Err(ApiError::not_found(&format!("scope deployment {id}"))),
        }
    }
    Ok(())
}

pub async fn create_check(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(org): Path<String>,
    ApiJson(request): ApiJson<CheckRequest>,
) -> ApiResult<Response> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    validate(&hub, &org, &request, None)?;
    let now = crate::wall_ms();
    let config = CheckConfig {
        id: format!("chk_{}", crate::auth::random_hex(8)),
        org: org.clone(),
        scope: request.scope,
        spec: request.spec,
        created_by: principal.name.clone(),
        created_at_ms: now,
        updated_at_ms: now,
    };
    hub.store.put_check_config(&config)?;
    tracing::info!(org = %org, check = %config.spec.name, id = %config.id, by = %principal.name, "check created");
    crate::checks::org_changed(&hub, &org);
    Ok((StatusCode::CREATED, Json(check_json(&config))).into_response())
}

pub async fn list_checks(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Read)?;
    let checks: Vec<Value> = hub.store.check_configs(&org)?.iter().map(check_json).collect();
    Ok(Json(json!({ "checks": checks, "revision": hub.store.check_revision(&org)? })))
}

fn find_check(hub: &Hub, principal: &Principal, org: &str, id: &str, perm: Perm) -> ApiResult<CheckConfig> {
    org_in_scope(hub, principal, org, perm)?;
    hub.store.check_config(org, id)?.ok_or_else(|| ApiError::not_found(&format!("check {id}")))
}

pub async fn get_check(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, id)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    Ok(Json(check_json(&find_check(&hub, &principal, &org, &id, Perm::Read)?)))
}

pub async fn replace_check(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path((org, id)): Path<(String, String)>,
    ApiJson(request): ApiJson<CheckRequest>,
) -> ApiResult<Json<Value>> {
    let mut config = find_check(&hub, &principal, &org, &id, Perm::Admin)?;
    validate(&hub, &org, &request, Some(&id))?;
    config.scope = request.scope;
    config.spec = request.spec;
    config.updated_at_ms = crate::wall_ms();
    hub.store.put_check_config(&config)?;
    tracing::info!(org = %org, check = %config.spec.name, id = %id, by = %principal.name, "check changed");
    crate::checks::org_changed(&hub, &org);
    Ok(Json(check_json(&config)))
}

pub async fn delete_check(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, id)): Path<(String, String)>) -> ApiResult<StatusCode> {
    find_check(&hub, &principal, &org, &id, Perm::Admin)?;
    hub.store.delete_check_config(&org, &id)?;
    tracing::info!(org = %org, id = %id, by = %principal.name, "check deleted");
    crate::checks::org_changed(&hub, &org);
    Ok(StatusCode::NO_CONTENT)
}

fn status_json(status: &CheckStatus) -> Value {
    json!({
        "name": status.name,
        "type": status.kind,
        "state": status.state.name(),
        "since": rfc3339(status.since_ms),
        "output": status.output,
        "latency_ms": status.latency_ms,
        "reported_at": rfc3339(status.reported_at_ms),
        "crash_loop": status.crash_loop,
        "last_remediation": status.last_remediation,
        "last_remediation_at": status.last_remediation_ms.map(rfc3339),
    })
}

/// `?check=NAME` limits the history to one check.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentChecksQuery {
    pub check: Option<String>,
}

pub async fn agent_checks(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<AgentChecksQuery>,
) -> ApiResult<Json<Value>> {
    let agent = find_agent(&hub, &principal, &id, Perm::Read)?;
    let set = crate::checks::set_for(&hub, &agent)?;
    let statuses = hub.store.check_statuses(&agent.id)?;
    let checks: Vec<Value> = set
        .checks
        .iter()
        .map(|spec| {
            let status = statuses.iter().find(|s| s.name == spec.name);
            let mut value = status.map_or_else(|| json!({ "name": spec.name, "type": spec.probe.kind(), "state": "pending" }), status_json);
            value["spec"] = json!(spec);
            value
        })
        .collect();
    let filter = RecordFilter { kind: query.check.clone(), newest_first: true, ..RecordFilter::default() };
    let history: Vec<Value> =
        hub.store.records(&agent.id, StreamClass::Health, &filter, None, HISTORY_LIMIT)?.iter().map(|r| super::record_json(None, r)).collect();
    Ok(Json(json!({ "agent": agent.id, "revision": set.revision, "checks": checks, "history": history })))
}

pub(super) fn alert_json(alert: &Alert) -> Value {
    json!({
        "id": alert.id,
        "org": alert.org,
        "rule": alert.rule,
        "key": alert.key,
        "severity": alert.severity,
        "summary": alert.summary,
        "status": alert.status.name(),
        "agent": alert.agent,
        "check": alert.check,
        "deployment": alert.deployment,
        "started_at": rfc3339(alert.started_at_ms),
        "updated_at": rfc3339(alert.updated_at_ms),
        "acknowledged_at": alert.acknowledged_at_ms.map(rfc3339),
        "acknowledged_by": alert.acknowledged_by,
        "resolved_at": alert.resolved_at_ms.map(rfc3339),
        "notified": alert.notified,
    })
}

/// `?status=` of the alert list.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertsQuery {
    pub status: Option<String>,
    pub rule: Option<String>,
    pub agent: Option<String>,
}

pub async fn list_alerts(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(org): Path<String>,
    ApiQuery(query): ApiQuery<AlertsQuery>,
) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Read)?;
    let wanted: &[AlertStatus] = match query.status.as_deref().unwrap_or("open") {
        "open" => &[AlertStatus::Firing, AlertStatus::Acknowledged],
        "firing" => &[AlertStatus::Firing],
        "acknowledged" => &[AlertStatus::Acknowledged],
        "resolved" => &[AlertStatus::Resolved],
        "all" => &[AlertStatus::Firing, AlertStatus::Acknowledged, AlertStatus::Resolved],
        other => return Err(ApiError::bad_request(format!("status {other:?} must be open, firing, acknowledged, resolved or all"))),
    };
    let silences: Vec<Silence> = hub.store.silences(&org)?;
    let now = crate::wall_ms();
    let alerts: Vec<Value> = hub
        .store
        .alerts_of_org(&org)?
        .iter()
        .filter(|a| wanted.contains(&a.status))
        .filter(|a| query.rule.as_ref().is_none_or(|r| *r == a.rule))
        .filter(|a| query.agent.as_ref().is_none_or(|g| a.agent.as_ref() == Some(g)))
        .map(|a| {
            let mut value = alert_json(a);
            value["silenced"] = json!(a.status != AlertStatus::Resolved && silences.iter().any(|s| s.matches(a, now)));
            value
        })
        .collect();
    Ok(Json(json!({ "alerts": alerts })))
}

pub async fn get_alert(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, id)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Read)?;
    let alert = hub.store.alert(&org, &id)?.ok_or_else(|| ApiError::not_found(&format!("alert {id}")))?;
    Ok(Json(alert_json(&alert)))
}

pub async fn acknowledge_alert(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, id)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Deploy)?;
    let alert = hub.store.alert(&org, &id)?.ok_or_else(|| ApiError::not_found(&format!("alert {id}")))?;
    match alert.status {
        AlertStatus::Resolved => return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("alert {id} is already resolved"))),
        AlertStatus::Acknowledged => return Ok(Json(alert_json(&alert))),
        AlertStatus::Firing => {}
    }
    let now = crate::wall_ms();
    let by = principal.name.clone();
    let changed = hub
        .store
        .update_alert(&org, &id, |a| {
            if a.status == AlertStatus::Firing {
                a.status = AlertStatus::Acknowledged;
                a.acknowledged_at_ms = Some(now);
                a.acknowledged_by = Some(by.clone());
                a.updated_at_ms = now;
            }
        })?
        .ok_or_else(|| ApiError::not_found(&format!("alert {id}")))?;
    tracing::info!(org = %org, alert = %id, by = %principal.name, "alert acknowledged");
    crate::alerts::notify(
        &hub,
        &org,
        "alert.acknowledged",
        json!({ "id": changed.id, "rule": changed.rule, "summary": changed.summary, "acknowledged_by": changed.acknowledged_by }),
    );
    Ok(Json(alert_json(&changed)))
}

/// Body of a silence: matchers (at least one), reason, and `expires_at` (RFC 3339) or
/// `duration` (e.g. `2h`).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SilenceRequest {
    pub rule: Option<String>,
    pub agent: Option<String>,
    pub check: Option<String>,
    pub deployment: Option<String>,
    #[serde(default)]
    pub reason: String,
    pub expires_at: Option<String>,
    pub duration: Option<String>,
}

/// Rule names alerts can have.
pub const RULES: [&str; 6] = ["agent_offline", "check_failing", "certificate_expiring", "disk_full", "spool_dropping", "deployment_failed"];

fn silence_json(silence: &Silence, now: i64) -> Value {
    json!({
        "id": silence.id,
        "rule": silence.rule,
        "agent": silence.agent,
        "check": silence.check,
        "deployment": silence.deployment,
        "reason": silence.reason,
        "created_by": silence.created_by,
        "created_at": rfc3339(silence.created_at_ms),
        "expires_at": rfc3339(silence.expires_at_ms),
        "active": silence.expires_at_ms > now,
    })
}

pub async fn create_silence(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(org): Path<String>,
    ApiJson(request): ApiJson<SilenceRequest>,
) -> ApiResult<Response> {
    org_in_scope(&hub, &principal, &org, Perm::Deploy)?;
    let now = crate::wall_ms();
    let mut errors = Vec::new();
    if request.rule.is_none() && request.agent.is_none() && request.check.is_none() && request.deployment.is_none() {
        errors.push("a silence needs at least one of rule, agent, check, deployment".to_string());
    }
    if let Some(rule) = &request.rule {
        if !RULES.contains(&rule.as_str()) {
            errors.push(format!("rule {rule:?} must be one of {}", RULES.join(", ")));
        }
    }
    if request.reason.len() > 1024 {
        errors.push("reason must be at most 1024 bytes".to_string());
    }
    let expires = match (&request.expires_at, &request.duration) {
        (Some(at), None) => parse_time(at).map_err(|e| format!("expires_at: {e}")),
        (None, Some(d)) => parse_duration(d).map(|d| now + d.as_millis() as i64).map_err(|e| format!("duration: {e}")),
        _ => Err("give exactly one of expires_at and duration".to_string()),
    };
    match &expires {
        Ok(at) if *at <= now => errors.push("the silence would already have expired".to_string()),
        Ok(at) if *at > now + 366 * 86_400_000 => errors.push("a silence may last at most a year".to_string()),
        Err(e) => errors.push(e.clone()),
        _ => {}
    }
    if hub.store.silences(&org)?.len() >= MAX_SILENCES_PER_ORG {
        errors.push(format!("an org may have at most {MAX_SILENCES_PER_ORG} silences; delete expired ones"));
    }
    if !errors.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_silence", errors.join("; ")));
    }
    let silence = Silence {
        id: format!("sil_{}", crate::auth::random_hex(8)),
        org: org.clone(),
        rule: request.rule,
        agent: request.agent,
        check: request.check,
        deployment: request.deployment,
        reason: request.reason,
        created_by: principal.name.clone(),
        created_at_ms: now,
        expires_at_ms: expires.unwrap_or(now),
    };
    hub.store.put_silence(&silence)?;
    tracing::info!(org = %org, silence = %silence.id, by = %principal.name, "silence created");
    Ok((StatusCode::CREATED, Json(silence_json(&silence, now))).into_response())
}

pub async fn list_silences(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Read)?;
    let now = crate::wall_ms();
    let silences: Vec<Value> = hub.store.silences(&org)?.iter().map(|s| silence_json(s, now)).collect();
    Ok(Json(json!({ "silences": silences })))
}

pub async fn delete_silence(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, id)): Path<(String, String)>) -> ApiResult<StatusCode> {
    org_in_scope(&hub, &principal, &org, Perm::Deploy)?;
    if !hub.store.delete_silence(&org, &id)? {
        return Err(ApiError::not_found(&format!("silence {id}")));
    }
    hub.health.wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

pub async fn get_rules(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<AlertRules>> {
    org_in_scope(&hub, &principal, &org, Perm::Read)?;
    Ok(Json(hub.store.alert_rules(&org)?))
}

pub async fn put_rules(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(org): Path<String>,
    ApiJson(rules): ApiJson<AlertRules>,
) -> ApiResult<Json<AlertRules>> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    rules.validate().map_err(|errors| ApiError::new(StatusCode::BAD_REQUEST, "invalid_rules", errors.join("; ")))?;
    hub.store.set_alert_rules(&org, &rules)?;
    tracing::info!(org = %org, by = %principal.name, "alert rules changed");
    hub.health.wake.notify_one();
    Ok(Json(rules))
}
