//! Org secrets and private registry logins.
//!
//! `PUT /api/v1/orgs/{org}/secrets/{name}` `{"value": "..."}` creates or replaces a secret
//! that deployment specs reference by name (`env: [{name, secret}]`);
//! `PUT /api/v1/orgs/{org}/registries/{host}` `{"username", "password"}` stores a login
//! used to pull images from `host`. Values are sealed before they are stored and never
//! returned, listed or logged: reads show names, hosts, usernames and timestamps only.
//! They leave the hub only inside a deploy command to an agent the deployment targets.

use super::{org_in_scope, rfc3339, ApiError, ApiJson, ApiResult};
use crate::access::Perm;
use crate::auth::Principal;
use crate::secrets::Kind;
use crate::store::{StoredRegistry, StoredSecret};
use crate::Hub;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Longest secret value, in bytes.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;
/// Most secrets per org.
pub const MAX_SECRETS_PER_ORG: usize = 1000;
/// Most registry logins per org.
pub const MAX_REGISTRIES_PER_ORG: usize = 100;

/// Body of `PUT .../secrets/{name}`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretRequest {
    pub value: String,
}

/// Body of `PUT .../registries/{host}`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryRequest {
    pub username: String,
    pub password: String,
}

/// A secret name: what an env var may reference (letters, digits, `-`, `_`, `.`).
pub fn validate_secret_name(name: &str) -> Result<(), String> {
    let ok = (1..=128).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!("secret name {name:?} must be 1 to 128 characters of letters, digits, '-', '_' and '.'"))
    }
}

/// A registry host as image references spell it: `host[:port]`, lowercase.
pub fn validate_registry_host(host: &str) -> Result<(), String> {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let name_ok = (1..=253).contains(&name.len())
        && name.split('.').all(|part| !part.is_empty() && part.len() <= 63 && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if name_ok && port_ok {
        Ok(())
    } else {
        Err(format!("registry {host:?} must be a lowercase host name with an optional port, as in image references (e.g. registry.example.com:5000, or docker.io for Docker Hub)"))
    }
}

fn secret_view(secret: &StoredSecret) -> Value {
    json!({ "name": secret.name, "created_at": rfc3339(secret.created_at_ms), "updated_at": rfc3339(secret.updated_at_ms), "updated_by": secret.updated_by })
}

fn registry_view(registry: &StoredRegistry) -> Value {
    json!({
        "server": registry.server,
        "username": registry.username,
        "created_at": rfc3339(registry.created_at_ms),
        "updated_at": rfc3339(registry.updated_at_ms),
        "updated_by": registry.updated_by,
    })
}

fn sealing_failed(error: anyhow::Error) -> ApiError {
    tracing::error!(%error, "sealing a secret failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the value could not be sealed")
}

pub async fn list_secrets(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    let secrets: Vec<Value> = hub.store.secrets_of(&org)?.iter().map(secret_view).collect();
    Ok(Json(json!({ "secrets": secrets })))
}

pub async fn put_secret(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path((org, name)): Path<(String, String)>,
    ApiJson(body): ApiJson<SecretRequest>,
) -> ApiResult<Response> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    validate_secret_name(&name).map_err(ApiError::bad_request)?;
    if body.value.len() > MAX_SECRET_BYTES {
        return Err(ApiError::bad_request(format!("value must be at most {MAX_SECRET_BYTES} bytes")));
    }
    let existing = hub.store.secret(&org, &name)?;
    if existing.is_none() && hub.store.secrets_of(&org)?.len() >= MAX_SECRETS_PER_ORG {
        return Err(ApiError::new(StatusCode::CONFLICT, "limit", format!("org {org} has {MAX_SECRETS_PER_ORG} secrets, the most allowed")));
    }
    let now = crate::wall_ms();
    let sealed = hub.secret_box.seal(&org, Kind::Secret, &name, body.value.as_bytes()).map_err(sealing_failed)?;
    let secret = StoredSecret {
        org: org.clone(),
        name: name.clone(),
        sealed,
        created_at_ms: existing.as_ref().map_or(now, |s| s.created_at_ms),
        updated_at_ms: now,
        updated_by: principal.name.clone(),
    };
    let replaced = hub.store.put_secret(&secret)?;
    tracing::info!(%org, secret = %name, by = %principal.name, replaced, "secret written");
    let status = if replaced { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(secret_view(&secret))).into_response())
}

pub async fn delete_secret(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, name)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    if !hub.store.delete_secret(&org, &name)? {
        return Err(ApiError::not_found(&format!("secret {name}")));
    }
    tracing::info!(%org, secret = %name, by = %principal.name, "secret deleted");
    Ok(Json(json!({ "deleted": name })))
}

pub async fn list_registries(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    let registries: Vec<Value> = hub.store.registries_of(&org)?.iter().map(registry_view).collect();
    Ok(Json(json!({ "registries": registries })))
}

pub async fn put_registry(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path((org, server)): Path<(String, String)>,
    ApiJson(body): ApiJson<RegistryRequest>,
) -> ApiResult<Response> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    validate_registry_host(&server).map_err(ApiError::bad_request)?;
    if body.username.is_empty() || body.username.len() > 256 || body.username.chars().any(char::is_control) {
        return Err(ApiError::bad_request("username must be 1 to 256 printable characters"));
    }
    if body.password.is_empty() || body.password.len() > MAX_SECRET_BYTES {
        return Err(ApiError::bad_request(format!("password must be 1 to {MAX_SECRET_BYTES} bytes")));
    }
    let existing = hub.store.registry_login(&org, &server)?;
    if existing.is_none() && hub.store.registries_of(&org)?.len() >= MAX_REGISTRIES_PER_ORG {
        return Err(ApiError::new(StatusCode::CONFLICT, "limit", format!("org {org} has {MAX_REGISTRIES_PER_ORG} registry logins, the most allowed")));
    }
    let now = crate::wall_ms();
    let sealed_password = hub.secret_box.seal(&org, Kind::RegistryPassword, &server, body.password.as_bytes()).map_err(sealing_failed)?;
    let registry = StoredRegistry {
        org: org.clone(),
        server: server.clone(),
        username: body.username,
        sealed_password,
        created_at_ms: existing.as_ref().map_or(now, |r| r.created_at_ms),
        updated_at_ms: now,
        updated_by: principal.name.clone(),
    };
    let replaced = hub.store.put_registry(&registry)?;
    tracing::info!(%org, %server, by = %principal.name, replaced, "registry login written");
    let status = if replaced { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(registry_view(&registry))).into_response())
}

pub async fn delete_registry(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, server)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    if !hub.store.delete_registry(&org, &server)? {
        return Err(ApiError::not_found(&format!("registry login for {server}")));
    }
    tracing::info!(%org, %server, by = %principal.name, "registry login deleted");
    Ok(Json(json!({ "deleted": server })))
}
