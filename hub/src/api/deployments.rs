//! Deployment routes: create, read, change (a new revision), roll back, history, delete.
//!
//! Every spec and target list is validated before anything is written; errors name the
//! field. Target agents must belong to the deployment's org: an agent of another org is
//! reported exactly like a missing one (404). Pushing revisions to agents is the
//! orchestrator's job, not this module's.

use super::{authorize, rfc3339, ApiError, ApiJson, ApiResult};
use crate::access::Perm;
use crate::auth::Principal;
use crate::store::{Deployment, Revision, Targets};
use crate::Hub;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use gantry_shared::deploy::DeploymentSpec;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Body of create and update.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeploymentRequest {
    pub spec: DeploymentSpec,
    pub targets: Targets,
}

/// Body of a rollback.
#[derive(Debug, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// Revision to go back to; the previous one when absent.
    pub revision: Option<u64>,
}

/// Most target agents listed by id.
pub const MAX_TARGET_AGENTS: usize = 10_000;

fn invalid(errors: Vec<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_spec", errors.join("; "))
}

/// Check targets against the org: listed agents must be its own, labels well formed.
fn check_targets(hub: &Hub, org: &str, targets: &Targets) -> ApiResult<()> {
    let mut errors = Vec::new();
    if targets.agents.is_empty() && targets.selector.is_empty() {
        errors.push("targets must list agents or give a label selector".to_string());
    }
    if targets.agents.len() > MAX_TARGET_AGENTS {
        errors.push(format!("targets.agents may list at most {MAX_TARGET_AGENTS} agents"));
    }
    for (key, value) in &targets.selector {
        if let Err(error) = crate::enroll::validate_label(key, value) {
            errors.push(format!("targets.selector: {error}"));
        }
    }
    if !errors.is_empty() {
        return Err(invalid(errors));
    }
    for id in &targets.agents {
        match hub.store.agent(id)? {
            Some(agent) if agent.org == org && agent.revoked_at_ms.is_none() => {}
            _ => return Err(ApiError::not_found(&format!("target agent {id}"))),
        }
    }
    Ok(())
}

/// Every secret the spec references must be defined in the org.
fn check_secrets(hub: &Hub, org: &str, spec: &DeploymentSpec) -> ApiResult<()> {
    let mut missing = Vec::new();
    for name in spec.secret_names() {
        if hub.store.secret(org, &name)?.is_none() {
            missing.push(name);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(invalid(vec![format!(
        "secret{} {} not defined in org {org} (create with PUT /api/v1/orgs/{org}/secrets/{{name}})",
        if missing.len() == 1 { "" } else { "s" },
        missing.iter().map(|m| format!("{m:?}")).collect::<Vec<_>>().join(", ") + if missing.len() == 1 { " is" } else { " are" },
    )]))
}

/// Paths whose values differ between two JSON documents, e.g. `services[0].image`.
pub fn changed_paths(old: &Value, new: &Value) -> Vec<String> {
    fn walk(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
        match (old, new) {
            (Value::Object(a), Value::Object(b)) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for key in keys {
                    let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                    walk(&child, a.get(key).unwrap_or(&Value::Null), b.get(key).unwrap_or(&Value::Null), out);
                }
            }
            (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    walk(&format!("{path}[{i}]"), x, y, out);
                }
            }
            (a, b) if a != b => out.push(if path.is_empty() { "(root)".into() } else { path.to_string() }),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out
}

fn view(hub: &Hub, deployment: &Deployment, revision: Option<&Revision>) -> ApiResult<Value> {
    let agents = crate::orchestrator::resolve_targets(hub, &deployment.org, &deployment.targets)?;
    let mut status = serde_json::Map::new();
    for (agent, s) in hub.store.deploy_statuses(&deployment.id)? {
        status.insert(
            agent,
            json!({
                "revision": s.revision,
                "state": state_name(&s.state),
                "rolled_back_to": match s.state { gantry_shared::message::DeployState::RolledBack { to } => Some(to), _ => None },
                "message": s.message,
                "updated_at": rfc3339(s.updated_at_ms),
            }),
        );
    }
    Ok(json!({
        "id": deployment.id,
        "org": deployment.org,
        "name": deployment.name,
        "revision": deployment.revision,
        "targets": deployment.targets,
        "target_agents": agents,
        "agents": status,
        "rollout": crate::orchestrator::rollout_of(hub, &deployment.id).map(|r| json!({
            "revision": r.revision,
            "state": if r.stopped.is_some() { "stopped" } else { "rolling" },
            "released": r.released,
            "reason": r.stopped,
        })),
        "spec": revision.map(|r| serde_json::to_value(&r.spec).unwrap_or(Value::Null)),
        "created_at": rfc3339(deployment.created_at_ms),
        "updated_at": rfc3339(deployment.updated_at_ms),
        "deleted_at": deployment.deleted_at_ms.map(rfc3339),
    }))
}

/// Lowercase name of a deployment state.
pub fn state_name(state: &gantry_shared::message::DeployState) -> &'static str {
    use gantry_shared::message::DeployState;
    match state {
        DeployState::Applying => "applying",
        DeployState::Healthy => "healthy",
        DeployState::RolledBack { .. } => "rolled_back",
        DeployState::Failed => "failed",
        DeployState::Removed => "removed",
    }
}

fn find(hub: &Hub, principal: &Principal, id: &str, perm: Perm) -> ApiResult<Deployment> {
    let deployment = hub.store.deployment(id)?.ok_or_else(|| ApiError::not_found(&format!("deployment {id}")))?;
    authorize(principal, &deployment.org, perm, &format!("deployment {id}"))?;
    Ok(deployment)
}

pub async fn create(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(org): Path<String>,
    ApiJson(body): ApiJson<DeploymentRequest>,
) -> ApiResult<Response> {
    authorize(&principal, &org, Perm::Deploy, &format!("org {org}"))?;
    super::billing::require_entitlement(&hub, &org, "deploying", |e| e.deploy)?;
    super::billing::require_deploy_quota(&hub, &org)?;
    if hub.store.org(&org)?.is_none() {
        return Err(ApiError::not_found(&format!("org {org}")));
    }
    let errors = body.spec.validate();
    if !errors.is_empty() {
        return Err(invalid(errors));
    }
    check_targets(&hub, &org, &body.targets)?;
    check_secrets(&hub, &org, &body.spec)?;
    let now = crate::wall_ms();
    let deployment = Deployment {
        id: format!("dep_{}", crate::auth::random_hex(8)),
        org: org.clone(),
        name: body.spec.name.clone(),
        targets: body.targets.clone(),
        revision: 1,
        created_at_ms: now,
        updated_at_ms: now,
        deleted_at_ms: None,
    };
    let revision =
        Revision { revision: 1, spec: body.spec, targets: body.targets, created_by: principal.name.clone(), created_at_ms: now, change: "created".into() };
    hub.store.create_deployment(&deployment, &revision)?;
    tracing::info!(deployment = %deployment.id, %org, by = %principal.name, "deployment created");
    crate::orchestrator::changed(&hub, &deployment, revision.spec.strategy);
    Ok((StatusCode::CREATED, Json(view(&hub, &deployment, Some(&revision))?)).into_response())
}

pub async fn list(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<Value>> {
    authorize(&principal, &org, Perm::Read, &format!("org {org}"))?;
    if hub.store.org(&org)?.is_none() {
        return Err(ApiError::not_found(&format!("org {org}")));
    }
    let mut out = Vec::new();
    for deployment in hub.store.deployments_of_org(&org)? {
        out.push(view(&hub, &deployment, None)?);
    }
    Ok(Json(json!({ "deployments": out })))
}

pub async fn get(State(hub): State<Arc<Hub>>, principal: Principal, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let deployment = find(&hub, &principal, &id, Perm::Read)?;
    let revision = hub.store.revision(&id, deployment.revision)?;
    Ok(Json(view(&hub, &deployment, revision.as_ref())?))
}

async fn new_revision(
    hub: &Arc<Hub>,
    principal: &Principal,
    deployment: &Deployment,
    spec: DeploymentSpec,
    targets: Targets,
    change: String,
) -> ApiResult<Json<Value>> {
    let next = Revision { revision: deployment.revision + 1, spec, targets, created_by: principal.name.clone(), created_at_ms: crate::wall_ms(), change };
    let updated = hub.store.add_revision(&deployment.id, deployment.revision, &next, next.created_at_ms)?;
    tracing::info!(deployment = %deployment.id, revision = next.revision, change = %next.change, by = %principal.name, "deployment changed");
    crate::orchestrator::changed(hub, &updated, next.spec.strategy);
    Ok(Json(view(hub, &updated, Some(&next))?))
}

pub async fn update(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<DeploymentRequest>,
) -> ApiResult<Json<Value>> {
    let deployment = find(&hub, &principal, &id, Perm::Deploy)?;
    super::billing::require_entitlement(&hub, &deployment.org, "deploying", |e| e.deploy)?;
    super::billing::require_deploy_quota(&hub, &deployment.org)?;
    if deployment.deleted_at_ms.is_some() {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("deployment {id} was deleted")));
    }
    let errors = body.spec.validate();
    if !errors.is_empty() {
        return Err(invalid(errors));
    }
    if body.spec.name != deployment.name {
        return Err(invalid(vec![format!("spec.name cannot change (it is {:?})", deployment.name)]));
    }
    check_targets(&hub, &deployment.org, &body.targets)?;
    check_secrets(&hub, &deployment.org, &body.spec)?;
    let current = hub.store.revision(&id, deployment.revision)?.ok_or_else(|| ApiError::not_found(&format!("revision {}", deployment.revision)))?;
    let old = json!({ "spec": current.spec, "targets": current.targets });
    let new = json!({ "spec": body.spec, "targets": body.targets });
    let paths = changed_paths(&old, &new);
    if paths.is_empty() {
        return Ok(Json(view(&hub, &deployment, Some(&current))?));
    }
    let shown: Vec<&str> = paths.iter().take(10).map(String::as_str).collect();
    let more = if paths.len() > 10 { format!(" and {} more", paths.len() - 10) } else { String::new() };
    new_revision(&hub, &principal, &deployment, body.spec, body.targets, format!("updated: {}{more}", shown.join(", "))).await
}

pub async fn rollback(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RollbackRequest>,
) -> ApiResult<Json<Value>> {
    let deployment = find(&hub, &principal, &id, Perm::Deploy)?;
    super::billing::require_entitlement(&hub, &deployment.org, "deploying", |e| e.deploy)?;
    super::billing::require_deploy_quota(&hub, &deployment.org)?;
    if deployment.deleted_at_ms.is_some() {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("deployment {id} was deleted")));
    }
    let target = body.revision.unwrap_or(deployment.revision.saturating_sub(1));
    if target == 0 || target >= deployment.revision {
        return Err(ApiError::bad_request(format!("revision must be an earlier revision, 1..={}", deployment.revision.saturating_sub(1).max(1))));
    }
    let old = hub.store.revision(&id, target)?.ok_or_else(|| ApiError::not_found(&format!("revision {target}")))?;
    check_targets(&hub, &deployment.org, &old.targets)?;
    check_secrets(&hub, &deployment.org, &old.spec)?;
    new_revision(&hub, &principal, &deployment, old.spec, old.targets, format!("rollback to {target}")).await
}

pub async fn revisions(State(hub): State<Arc<Hub>>, principal: Principal, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    find(&hub, &principal, &id, Perm::Read)?;
    let revisions: Vec<Value> = hub
        .store
        .revisions(&id)?
        .into_iter()
        .map(|r| {
            json!({
                "revision": r.revision,
                "change": r.change,
                "created_by": r.created_by,
                "created_at": rfc3339(r.created_at_ms),
                "spec": r.spec,
                "targets": r.targets,
            })
        })
        .collect();
    Ok(Json(json!({ "revisions": revisions })))
}

pub async fn delete(State(hub): State<Arc<Hub>>, principal: Principal, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    find(&hub, &principal, &id, Perm::Deploy)?;
    let deployment = hub.store.delete_deployment(&id, crate::wall_ms())?.ok_or_else(|| ApiError::not_found(&format!("deployment {id}")))?;
    tracing::info!(deployment = %id, by = %principal.name, "deployment deleted");
    crate::orchestrator::changed(&hub, &deployment, gantry_shared::deploy::Strategy::AllAtOnce);
    Ok(Json(view(&hub, &deployment, None)?))
}

/// Progress of a deployment as Server-Sent Events: one `status` event per agent whenever
/// its state changes (all of them first), until the client goes away.
pub async fn progress(State(hub): State<Arc<Hub>>, principal: Principal, Path(id): Path<String>) -> ApiResult<Response> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    find(&hub, &principal, &id, Perm::Read)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let mut sent: std::collections::BTreeMap<String, (u64, String, String)> = Default::default();
        loop {
            // Register for the next change before reading, so none is missed.
            let changed = hub.deploy_changes.notified();
            let Ok(statuses) = hub.store.deploy_statuses(&id) else { return };
            for (agent, status) in statuses {
                let key = (status.revision, state_name(&status.state).to_string(), status.message.clone());
                if sent.get(&agent) == Some(&key) {
                    continue;
                }
                let data = json!({
                    "agent": agent,
                    "revision": status.revision,
                    "state": key.1,
                    "message": status.message,
                    "updated_at": rfc3339(status.updated_at_ms),
                });
                if tx.send(Event::default().event("status").data(data.to_string())).await.is_err() {
                    return;
                }
                sent.insert(agent, key);
            }
            tokio::select! {
                _ = changed => {}
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok::<_, std::convert::Infallible>(e), rx)) });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(super::TAIL_KEEP_ALIVE)).into_response())
}
