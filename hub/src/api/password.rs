//! Password change: `POST /api/v1/auth/password` `{current_password, new_password}`.
//!
//! Only people logged in with a session may change their password, never API keys. The new
//! password meets the same policy as at account creation (`auth::check_password_policy`);
//! a wrong current password answers 403 `invalid_credentials` and counts as a failed login
//! of the account (the same throttle as the login form). On success every other session of
//! the user ends; the one the request came with stays. The dashboard's account form calls
//! [`change_password`] too, so both paths check and do the same. The audit middleware
//! records the request like every other API change; no password is ever logged.

use super::limits::{self, ClientIp};
use super::{mfa, session_cookie_value, ApiError, ApiJson, ApiResult, Op, Routes};
use crate::auth::{self, Principal};
use crate::Hub;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::IpAddr;
use std::sync::Arc;

/// Body of `POST /api/v1/auth/password`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordRequest {
    /// The password the account has now.
    pub current_password: String,
    /// The new password: at least 12 characters, not common or guessable.
    pub new_password: String,
}

/// What a successful change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordChanged {
    /// Other sessions of the user that were ended.
    pub sessions_ended: usize,
}

/// The route of this module.
pub(crate) fn routes(routes: Routes) -> Routes {
    routes.post(
        "/api/v1/auth/password",
        change,
        Op::new("Change the caller's password; ends their other sessions").tag("auth").body::<PasswordRequest>().error(403),
    )
}

async fn change(
    State(hub): State<Arc<Hub>>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    principal: Principal,
    ApiJson(body): ApiJson<PasswordRequest>,
) -> ApiResult<Json<Value>> {
    let changed = change_password(&hub, &principal, ip, session_cookie_value(&hub, &headers).as_deref(), body).await?;
    Ok(Json(json!({ "password_changed": true, "sessions_ended": changed.sessions_ended })))
}

/// The 403 of a wrong current password.
fn wrong_password() -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "invalid_credentials", "the current password is wrong; nothing was changed")
}

/// Change `principal`'s password (a person's, with a session) from `request.current_password`
/// to `request.new_password`, and end every session of theirs but `current_session` (the
/// cookie value the request came with). Nothing is written unless every check passes.
pub(super) async fn change_password(
    hub: &Arc<Hub>,
    principal: &Principal,
    ip: Option<IpAddr>,
    current_session: Option<&str>,
    request: PasswordRequest,
) -> ApiResult<PasswordChanged> {
    let user = mfa::person(hub, principal, "a password change")?;
    auth::check_password_policy(&request.new_password, &user.email).map_err(ApiError::bad_request)?;
    if request.new_password == request.current_password {
        return Err(ApiError::bad_request("the new password must differ from the current one"));
    }
    limits::login_allowed(hub, &user.email, ip)?;
    let (hash, current, new) = (user.password_hash.clone(), request.current_password, request.new_password);
    let verified = tokio::task::spawn_blocking(move || auth::verify_password(&hash, &current).then(|| auth::hash_password(&new)))
        .await
        .map_err(|error| internal(&error.to_string()))?;
    limits::login_outcome(hub, &user.email, ip, verified.is_some());
    let new_hash = match verified {
        None => return Err(wrong_password()),
        Some(hashed) => hashed.map_err(|error| internal(&error))?,
    };
    // Only over the hash that was verified: of two changes racing, one wins and the other
    // is told, rather than silently undoing the first.
    let mut replaced = false;
    hub.store
        .update_user(&user.email, |stored| {
            replaced = stored.id == user.id && stored.password_hash == user.password_hash;
            if replaced {
                stored.password_hash = new_hash.clone();
            }
        })?
        .ok_or_else(ApiError::unauthorized)?;
    if !replaced {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", "the password was changed meanwhile; sign in again and retry"));
    }
    let keep = current_session.map(auth::sha256_hex);
    let sessions_ended = hub.store.delete_sessions_of_except(&user.id, keep.as_deref())?;
    tracing::info!(user = %user.email, sessions_ended, "password changed");
    Ok(PasswordChanged { sessions_ended })
}

fn internal(error: &str) -> ApiError {
    tracing::error!(%error, "changing a password failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "changing the password failed; see the hub log")
}
