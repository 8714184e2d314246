//! Two-factor login: TOTP enrolment for people and the code check the login handlers make
//! once the password is right.
//!
//! `POST /api/v1/auth/totp` starts an enrolment and answers the secret once (base32 and an
//! `otpauth://` URI); `POST /api/v1/auth/totp/confirm` `{"code"}` turns it on when the code is
//! right; `DELETE /api/v1/auth/totp` `{"code"}` or `{"password"}` turns it off. Only people
//! logged in with a session may do this, never API keys. Secrets are sealed with the hub's
//! secrets key before they are stored, and each code is accepted once.
//!
//! This module must not create sessions or decide login throttling; `check_login` does both.

use super::limits::{self, ClientIp};
use super::{ApiError, ApiJson, ApiResult};
use crate::auth::{self, Principal};
use crate::secrets::Kind;
use crate::store::User;
use crate::totp::{self, Factor};
use crate::Hub;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// TOTP secrets belong to users, not orgs: the org part of their sealing context is empty.
const NO_ORG: &str = "";

/// Body of `POST /api/v1/auth/totp/confirm`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfirmRequest {
    /// The current 6-digit code from the authenticator app.
    pub code: String,
}

/// Body of `DELETE /api/v1/auth/totp`: one of the two.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DisableRequest {
    /// A current 6-digit code (one not used before).
    pub code: Option<String>,
    /// The account's password.
    pub password: Option<String>,
}

/// What a login's second factor came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SecondFactor {
    /// The account has no second factor on.
    NotRequired,
    Accepted,
    /// On, but the request sent no code.
    Missing,
    /// Wrong, stale or already used.
    Wrong,
}

/// Which state of the factor a code is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Pending: a right code turns the factor on.
    Pending,
    Enabled,
}

/// The 401 of a login whose password is right but which sent no code.
pub(super) fn totp_required() -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "totp_required", "this account has two-factor login on: enter the 6-digit code from your authenticator app")
}

/// The 401 of a login whose code is wrong, expired or used before.
pub(super) fn invalid_totp() -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "invalid_totp", "the authenticator code is wrong, expired or already used")
}

/// The second-factor check of a login whose password was right: a right code is used up.
pub(super) fn second_factor(hub: &Hub, user: &User, code: Option<&str>) -> ApiResult<SecondFactor> {
    if !user.totp.as_ref().is_some_and(|f| f.enabled) {
        return Ok(SecondFactor::NotRequired);
    }
    let Some(code) = code.map(str::trim).filter(|c| !c.is_empty()) else {
        return Ok(SecondFactor::Missing);
    };
    Ok(if use_code(hub, user, code, Stage::Enabled)? { SecondFactor::Accepted } else { SecondFactor::Wrong })
}

/// Whether the caller is a person with two-factor login on (never for API keys).
pub(super) fn totp_enabled(hub: &Hub, principal: &Principal) -> ApiResult<bool> {
    if !principal.via_cookie {
        return Ok(false);
    }
    Ok(hub.store.user_by_email(&principal.name)?.and_then(|u| u.totp).is_some_and(|f| f.enabled))
}

/// `POST /api/v1/auth/totp`: a new pending secret (replacing an unconfirmed one), shown once.
pub async fn enrol(State(hub): State<Arc<Hub>>, principal: Principal) -> ApiResult<Response> {
    let user = person(&hub, &principal, "two-factor login")?;
    if user.totp.as_ref().is_some_and(|f| f.enabled) {
        return Err(already_on());
    }
    let secret = totp::new_secret().map_err(|error| internal(&error))?;
    let sealed = hub.secret_box.seal(NO_ORG, Kind::Totp, &user.id, &secret).map_err(|error| internal(&error.to_string()))?;
    let factor = Factor { sealed_secret: data_encoding::HEXLOWER.encode(&sealed), enabled: false, last_step: None, created_at_ms: crate::wall_ms() };
    // Checked again against the stored record: a confirmation may have landed meanwhile.
    let mut was_on = false;
    hub.store
        .update_user(&user.email, |stored| {
            was_on = stored.totp.as_ref().is_some_and(|f| f.enabled);
            if !was_on {
                stored.totp = Some(factor.clone());
            }
        })?
        .ok_or_else(ApiError::unauthorized)?;
    if was_on {
        return Err(already_on());
    }
    tracing::info!(user = %user.email, "two-factor enrolment started");
    let body = json!({
        "secret": totp::encode_secret(&secret),
        "otpauth_uri": totp::otpauth_uri(&user.email, &secret),
        "digits": totp::DIGITS,
        "period_secs": totp::STEP_SECS,
        "algorithm": "SHA1",
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `POST /api/v1/auth/totp/confirm`: turn the pending factor on with a right code.
pub async fn confirm(State(hub): State<Arc<Hub>>, principal: Principal, ApiJson(body): ApiJson<ConfirmRequest>) -> ApiResult<Json<Value>> {
    let user = person(&hub, &principal, "two-factor login")?;
    match &user.totp {
        None => return Err(ApiError::new(StatusCode::CONFLICT, "conflict", "no two-factor enrolment to confirm; start one with POST /api/v1/auth/totp")),
        Some(factor) if factor.enabled => return Err(already_on()),
        Some(_) => {}
    }
    if !use_code(&hub, &user, &body.code, Stage::Pending)? {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_totp",
            "the code does not match the new secret; check the device's clock and enter the current code",
        ));
    }
    tracing::info!(user = %user.email, "two-factor login turned on");
    Ok(Json(json!({ "totp_enabled": true })))
}

/// `DELETE /api/v1/auth/totp`: turn the factor off (or drop a pending one), proven with a
/// current code or the password. Wrong proofs count as failed logins of the account.
pub async fn disable(
    State(hub): State<Arc<Hub>>,
    ClientIp(ip): ClientIp,
    principal: Principal,
    ApiJson(body): ApiJson<DisableRequest>,
) -> ApiResult<Json<Value>> {
    let user = person(&hub, &principal, "two-factor login")?;
    let Some(factor) = &user.totp else {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", "two-factor login is not on"));
    };
    let stage = if factor.enabled { Stage::Enabled } else { Stage::Pending };
    let (proven, refusal) = match (body.code, body.password) {
        (Some(code), None) => {
            limits::login_allowed(&hub, &user.email, ip)?;
            (use_code(&hub, &user, &code, stage)?, "invalid_totp")
        }
        (None, Some(password)) => {
            limits::login_allowed(&hub, &user.email, ip)?;
            let hash = user.password_hash.clone();
            let proven = tokio::task::spawn_blocking(move || auth::verify_password(&hash, &password)).await.map_err(|e| internal(&e.to_string()))?;
            (proven, "invalid_credentials")
        }
        _ => return Err(ApiError::bad_request("send either `code` (the current authenticator code) or `password`")),
    };
    limits::login_outcome(&hub, &user.email, ip, proven);
    if !proven {
        let message = if refusal == "invalid_totp" { "the authenticator code is wrong, expired or already used" } else { "the password is wrong" };
        return Err(ApiError::new(StatusCode::FORBIDDEN, refusal, message));
    }
    hub.store.update_user(&user.email, |stored| stored.totp = None)?;
    tracing::info!(user = %user.email, "two-factor login turned off");
    Ok(Json(json!({ "totp_enabled": false })))
}

/// The user behind a session; API keys are refused (a second factor or a password belongs
/// to a person). `what` names the refused action in the message.
pub(super) fn person(hub: &Hub, principal: &Principal, what: &str) -> ApiResult<User> {
    if !principal.via_cookie {
        return Err(ApiError::forbidden(format!("{what} needs a person logged in to the dashboard or API, not an API key")));
    }
    match hub.store.user_by_email(&principal.name)? {
        Some(user) if user.id == principal.id && !user.disabled => Ok(user),
        _ => Err(ApiError::unauthorized()),
    }
}

/// Check `code` against the user's factor in `stage`; when it is right, record its step (and
/// turn a pending factor on) in the same atomic update, so of two requests with one code
/// only one succeeds.
fn use_code(hub: &Hub, user: &User, code: &str, stage: Stage) -> ApiResult<bool> {
    let Some(factor) = user.totp.as_ref().filter(|f| f.enabled == (stage == Stage::Enabled)) else {
        return Ok(false);
    };
    let secret = open_secret(hub, &user.id, factor)?;
    let now = u64::try_from(crate::wall_ms() / 1000).unwrap_or(0);
    if totp::verify(&secret, code, now, factor.last_step).is_none() {
        // A wrong code writes nothing.
        return Ok(false);
    }
    let mut accepted = false;
    hub.store.update_user(&user.email, |stored| {
        accepted = false;
        let Some(current) = stored.totp.as_mut() else { return };
        if current.sealed_secret != factor.sealed_secret || current.enabled != (stage == Stage::Enabled) {
            return;
        }
        if let Some(step) = totp::verify(&secret, code, now, current.last_step) {
            current.last_step = Some(step);
            current.enabled = true;
            accepted = true;
        }
    })?;
    Ok(accepted)
}

fn open_secret(hub: &Hub, user_id: &str, factor: &Factor) -> ApiResult<Vec<u8>> {
    let sealed = data_encoding::HEXLOWER.decode(factor.sealed_secret.as_bytes()).map_err(|e| internal(&format!("stored TOTP secret is not hex: {e}")))?;
    hub.secret_box.open(NO_ORG, Kind::Totp, user_id, &sealed).map_err(|e| internal(&e.to_string()))
}

fn already_on() -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "conflict", "two-factor login is already on; turn it off first to enrol another device")
}

fn internal(error: &str) -> ApiError {
    tracing::error!(%error, "two-factor login failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "two-factor login failed; see the hub log")
}
