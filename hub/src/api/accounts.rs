//! People, org memberships, invitations and API keys.
//!
//! - `GET /api/v1/orgs/{org}/members`; `PUT|DELETE /api/v1/orgs/{org}/members/{user}`
//!   `{"role"}`: change or remove a member (Admin; Owner to touch the Owner role; the last
//!   Owner cannot be removed or demoted). Adding someone who is not yet a member is for
//!   operators; everyone else invites.
//! - `POST|GET /api/v1/orgs/{org}/invitations`, `DELETE .../invitations/{id}`: a single-use
//!   link with an expiry for one email address and role; `POST /api/v1/invitations/accept`
//!   `{"token", "password"}` joins (creating the account if the address has none) and logs in.
//! - `POST|GET /api/v1/orgs/{org}/api-keys`, `DELETE .../api-keys/{id}`: org keys with
//!   scopes (never beyond the creator's own permissions), optional expiry, last-used time;
//!   `/api/v1/api-keys` the same for operator keys.
//! - `GET|POST /api/v1/users`, `POST /api/v1/users/{id}/disable|enable` (operators):
//!   disabling ends every session of the user at once and stops the keys they made.

use super::{authorize, limits, org_in_scope, parse_duration, require_operator, rfc3339, session_cookie, session_cookie_value, ApiError, ApiJson, ApiResult};
use crate::access::{Perm, Perms, Role, Scope};
use crate::auth::{self, NewApiKey, Principal};
use crate::store::{ApiKey, Invitation, Membership, Spend, User};
use crate::Hub;
use axum::extract::{Path, Query, State};
use axum::http::header::{self, HeaderMap};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Form, Json};
use gantry_dashboards::InvitePage;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Prefix of invitation tokens.
pub const INVITATION_PREFIX: &str = "gi_";
/// Invitations live this long unless the request says otherwise.
const DEFAULT_INVITATION_TTL_SECS: u64 = 7 * 86400;
/// Longest an invitation may live.
const MAX_INVITATION_TTL_SECS: u64 = 30 * 86400;
/// Longest an API key may live when it has an expiry.
const MAX_KEY_TTL_SECS: u64 = 5 * 365 * 86400;

fn member_view(hub: &Hub, m: &Membership) -> Value {
    let disabled = hub.store.user_by_email(&m.email).ok().flatten().is_some_and(|u| u.disabled);
    json!({ "user_id": m.user_id, "email": m.email, "role": m.role, "added_by": m.added_by, "added_at": rfc3339(m.added_at_ms), "disabled": disabled })
}

fn invitation_view(i: &Invitation) -> Value {
    let status = if i.revoked {
        "revoked"
    } else if i.accepted_at_ms.is_some() {
        "accepted"
    } else if crate::wall_ms() >= i.expires_at_ms {
        "expired"
    } else {
        "pending"
    };
    json!({
        "id": i.id, "org": i.org, "email": i.email, "role": i.role, "status": status,
        "created_by": i.created_by, "created_at": rfc3339(i.created_at_ms), "expires_at": rfc3339(i.expires_at_ms),
        "accepted_at": i.accepted_at_ms.map(rfc3339), "accepted_by": i.accepted_by,
    })
}

pub(crate) fn key_view(k: &ApiKey) -> Value {
    let expired = k.expires_at_ms.is_some_and(|at| crate::wall_ms() >= at);
    json!({
        "id": k.id, "name": k.name, "org": k.org, "scopes": k.scopes, "created_by": k.created_by,
        "created_at": rfc3339(k.created_at_ms), "expires_at": k.expires_at_ms.map(rfc3339),
        "last_used_at": k.last_used_ms.map(rfc3339), "revoked": k.revoked, "expired": expired,
    })
}

fn user_view(u: &User) -> Value {
    json!({ "id": u.id, "email": u.email, "operator": u.operator, "disabled": u.disabled, "created_at": rfc3339(u.created_at_ms) })
}

/// A lifetime given as seconds or duration text (`"90d"`), within `max_secs`.
fn lifetime(value: &Value, field: &str, max_secs: u64) -> ApiResult<u64> {
    let secs = match value {
        Value::Number(n) => n.as_u64().ok_or_else(|| ApiError::bad_request(format!("{field} must be a positive number of seconds")))?,
        Value::String(s) => parse_duration(s).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))?.as_secs(),
        _ => return Err(ApiError::bad_request(format!("{field} must be seconds or a duration like \"30d\""))),
    };
    if secs == 0 || secs > max_secs {
        return Err(ApiError::bad_request(format!("{field} must be between 1 s and {} days", max_secs / 86400)));
    }
    Ok(secs)
}

// ---- members ----

pub async fn list_members(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Read)?;
    let members: Vec<Value> = hub.store.members_of(&org)?.iter().map(|m| member_view(&hub, m)).collect();
    Ok(Json(json!({ "members": members })))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberRequest {
    pub role: String,
}

pub async fn put_member(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path((org, user_id)): Path<(String, String)>,
    ApiJson(body): ApiJson<MemberRequest>,
) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Read)?;
    let role = Role::parse(&body.role).map_err(ApiError::bad_request)?;
    let what = format!("org {org}");
    let existing = hub.store.membership(&org, &user_id)?;
    let user = match &existing {
        Some(m) => {
            authorize(&principal, &org, m.role.managed_by(), &what)?;
            hub.store.user_by_email(&m.email)?
        }
        None => {
            require_operator(&principal, Perm::Admin).map_err(|_| ApiError::not_found(&format!("member {user_id} (invite people to add them)")))?;
            hub.store.user_by_id(&user_id)?
        }
    }
    .ok_or_else(|| ApiError::not_found(&format!("user {user_id}")))?;
    authorize(&principal, &org, role.managed_by(), &what)?;
    authorize(&principal, &org, Perm::Admin, &what)?;
    let membership = Membership {
        org: org.clone(),
        user_id: user.id.clone(),
        email: user.email.clone(),
        role,
        added_by: existing.as_ref().map_or_else(|| principal.name.clone(), |m| m.added_by.clone()),
        added_at_ms: existing.as_ref().map_or_else(crate::wall_ms, |m| m.added_at_ms),
    };
    hub.store.put_membership(&membership)?;
    tracing::info!(%org, user = %user.email, %role, by = %principal.name, "membership set");
    Ok(Json(member_view(&hub, &membership)))
}

pub async fn delete_member(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, user_id)): Path<(String, String)>) -> ApiResult<StatusCode> {
    org_in_scope(&hub, &principal, &org, Perm::Read)?;
    let existing = hub.store.membership(&org, &user_id)?.ok_or_else(|| ApiError::not_found(&format!("member {user_id}")))?;
    let what = format!("org {org}");
    authorize(&principal, &org, Perm::Admin, &what)?;
    authorize(&principal, &org, existing.role.managed_by(), &what)?;
    hub.store.delete_membership(&org, &user_id)?;
    tracing::info!(%org, user = %existing.email, by = %principal.name, "member removed");
    Ok(StatusCode::NO_CONTENT)
}

// ---- invitations ----

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InvitationRequest {
    pub email: String,
    pub role: String,
    /// Seconds or duration text; 7 days when absent.
    pub ttl: Option<Value>,
}

pub async fn create_invitation(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(org): Path<String>,
    ApiJson(body): ApiJson<InvitationRequest>,
) -> ApiResult<Response> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    let role = Role::parse(&body.role).map_err(ApiError::bad_request)?;
    authorize(&principal, &org, role.managed_by(), &format!("org {org}"))?;
    let email = body.email.trim().to_lowercase();
    if !email.contains('@') || email.len() > 254 || email.chars().any(char::is_whitespace) {
        return Err(ApiError::bad_request(format!("email {:?} is not an email address", body.email)));
    }
    let ttl = match &body.ttl {
        Some(value) => lifetime(value, "ttl", MAX_INVITATION_TTL_SECS)?,
        None => DEFAULT_INVITATION_TTL_SECS,
    };
    if let Some(user) = hub.store.user_by_email(&email)? {
        if hub.store.membership(&org, &user.id)?.is_some() {
            return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("{email} is already a member of org {org}")));
        }
    }
    let now = crate::wall_ms();
    let id = format!("inv_{}", auth::random_hex(8));
    let secret = auth::random_hex(32);
    let invitation = Invitation {
        id: id.clone(),
        org: org.clone(),
        email,
        role,
        secret_sha256: auth::sha256_hex(&secret),
        created_by: principal.name.clone(),
        created_at_ms: now,
        expires_at_ms: now.saturating_add((ttl as i64).saturating_mul(1000)),
        accepted_at_ms: None,
        accepted_by: None,
        revoked: false,
    };
    hub.store.create_invitation(&invitation)?;
    let token = format!("{INVITATION_PREFIX}{id}.{secret}");
    let mut view = invitation_view(&invitation);
    view["token"] = json!(token);
    view["url"] = json!(format!("{}/invite?token={token}", hub.config.public_url().trim_end_matches('/')));
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

pub async fn list_invitations(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    let mut invitations = hub.store.invitations_of(&org)?;
    invitations.sort_by_key(|i| std::cmp::Reverse(i.created_at_ms));
    Ok(Json(json!({ "invitations": invitations.iter().map(invitation_view).collect::<Vec<_>>() })))
}

pub async fn revoke_invitation(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, id)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    match hub.store.invitation(&id)? {
        Some(i) if i.org == org => {}
        _ => return Err(ApiError::not_found(&format!("invitation {id}"))),
    }
    let invitation = hub.store.revoke_invitation(&id)?.ok_or_else(|| ApiError::not_found(&format!("invitation {id}")))?;
    Ok(Json(invitation_view(&invitation)))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AcceptRequest {
    pub token: String,
    /// The new account's password, or the existing account's.
    pub password: String,
    /// The existing account's authenticator code, when it has two-factor login on.
    pub code: Option<String>,
}

/// The invitation a token names, if its secret is right.
fn invitation_for(hub: &Hub, token: &str) -> ApiResult<Invitation> {
    let gone = || ApiError::new(StatusCode::NOT_FOUND, "invitation_invalid", "this invitation link is not valid");
    let (id, secret) = token.trim().strip_prefix(INVITATION_PREFIX).and_then(|rest| rest.split_once('.')).ok_or_else(gone)?;
    if id.len() > 64 || secret.len() > 128 {
        return Err(gone());
    }
    let invitation = hub.store.invitation(id)?.ok_or_else(gone)?;
    let presented = auth::sha256_hex(secret);
    if !bool::from(subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), invitation.secret_sha256.as_bytes())) {
        return Err(gone());
    }
    Ok(invitation)
}

fn spend_refusal(why: Spend) -> ApiError {
    match why {
        Spend::Unknown => ApiError::new(StatusCode::NOT_FOUND, "invitation_invalid", "this invitation link is not valid"),
        Spend::Expired => ApiError::new(StatusCode::GONE, "invitation_expired", "this invitation has expired; ask for a new one"),
        Spend::Used => ApiError::new(StatusCode::GONE, "invitation_used", "this invitation has already been used"),
        Spend::Revoked => ApiError::new(StatusCode::GONE, "invitation_revoked", "this invitation was withdrawn"),
    }
}

/// Accept an invitation: the account is the invited address's (created with `password`
/// when it has none, otherwise proven by its password), the membership is added, and the
/// caller is logged in (any session the request carried ends). The link works once.
async fn accept(hub: &Arc<Hub>, ip: Option<std::net::IpAddr>, headers: &HeaderMap, body: AcceptRequest) -> ApiResult<(Invitation, User, String)> {
    let invitation = invitation_for(hub, &body.token)?;
    // Refuse a spent, withdrawn or expired link before touching any account.
    if invitation.revoked {
        return Err(spend_refusal(Spend::Revoked));
    }
    if invitation.accepted_at_ms.is_some() {
        return Err(spend_refusal(Spend::Used));
    }
    if crate::wall_ms() >= invitation.expires_at_ms {
        return Err(spend_refusal(Spend::Expired));
    }
    let user = match hub.store.user_by_email(&invitation.email)? {
        Some(_) => super::check_login_with_code(hub, ip, invitation.email.clone(), body.password, body.code).await?,
        None => {
            let worker = hub.clone();
            let email = invitation.email.clone();
            tokio::task::spawn_blocking(move || auth::create_user(&worker, &email, &body.password, false))
                .await
                .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "creating the account failed"))?
                .map_err(ApiError::bad_request)?
        }
    };
    let invitation = hub.store.spend_invitation(&invitation.id, &user.id, crate::wall_ms())?.map_err(spend_refusal)?;
    // Someone who is already a member (they joined some other way meanwhile) keeps their role.
    if hub.store.membership(&invitation.org, &user.id)?.is_none() {
        hub.store.put_membership(&Membership {
            org: invitation.org.clone(),
            user_id: user.id.clone(),
            email: user.email.clone(),
            role: invitation.role,
            added_by: invitation.created_by.clone(),
            added_at_ms: crate::wall_ms(),
        })?;
    }
    let session = auth::start_login_session(hub, &user, session_cookie_value(hub, headers).as_deref())?;
    tracing::info!(org = %invitation.org, user = %user.email, role = %invitation.role, "invitation accepted");
    Ok((invitation, user, session))
}

pub async fn accept_invitation(
    State(hub): State<Arc<Hub>>,
    limits::ClientIp(ip): limits::ClientIp,
    headers: HeaderMap,
    ApiJson(body): ApiJson<AcceptRequest>,
) -> ApiResult<Response> {
    let (invitation, user, session) = accept(&hub, ip, &headers, body).await?;
    let cookie = session_cookie(&hub, &session, hub.config.session_absolute_timeout_secs);
    let body = json!({ "user": { "id": user.id, "email": user.email }, "org": invitation.org, "role": invitation.role });
    Ok(([(header::SET_COOKIE, cookie)], Json(body)).into_response())
}

#[derive(Debug, Deserialize)]
pub struct InviteQuery {
    pub token: Option<String>,
}

/// `GET /invite?token=...`: the page an invitation link opens.
pub async fn invite_page(State(hub): State<Arc<Hub>>, Query(query): Query<InviteQuery>) -> Response {
    invite_html(&hub, query.token.as_deref().unwrap_or_default(), None, StatusCode::OK)
}

fn invite_html(hub: &Hub, token: &str, error: Option<&str>, status: StatusCode) -> Response {
    let checked = invitation_for(hub, token).and_then(|i| match () {
        _ if i.revoked => Err(spend_refusal(Spend::Revoked)),
        _ if i.accepted_at_ms.is_some() => Err(spend_refusal(Spend::Used)),
        _ if crate::wall_ms() >= i.expires_at_ms => Err(spend_refusal(Spend::Expired)),
        _ => Ok(i),
    });
    let html = match &checked {
        Ok(i) => {
            let has_account = hub.store.user_by_email(&i.email).ok().flatten().is_some();
            let view = InvitePage { token: Some(token), email: &i.email, org: &i.org, role: i.role.name(), has_account, error };
            gantry_dashboards::invite_page(&view)
        }
        Err(refusal) => {
            let view = InvitePage { token: None, email: "", org: "", role: "", has_account: false, error: Some(&refusal.message) };
            return (refusal.status, Html(gantry_dashboards::invite_page(&view))).into_response();
        }
    };
    (status, Html(html)).into_response()
}

#[derive(Debug, Deserialize)]
pub struct InviteForm {
    pub token: String,
    pub password: String,
    #[serde(default)]
    pub code: Option<String>,
    // The page also sends `email` for password managers; the invitation decides the
    // address, so it is ignored.
}

/// `POST /invite`: the form on that page; logs in and opens the dashboard.
pub async fn invite_form(State(hub): State<Arc<Hub>>, limits::ClientIp(ip): limits::ClientIp, headers: HeaderMap, Form(form): Form<InviteForm>) -> Response {
    let code = form.code.filter(|c| !c.trim().is_empty());
    let request = AcceptRequest { token: form.token.clone(), password: form.password, code };
    match accept(&hub, ip, &headers, request).await {
        Ok((_, _, session)) => {
            let cookie = session_cookie(&hub, &session, hub.config.session_absolute_timeout_secs);
            ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
        }
        Err(error) => limits::with_retry_after(invite_html(&hub, &form.token, Some(&error.message), error.status), error.retry_after_secs),
    }
}

// ---- API keys ----

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    pub name: String,
    /// `read`, `deploy`, `admin`, `billing`.
    pub scopes: Vec<Scope>,
    /// Seconds or duration text; no expiry when absent.
    pub ttl: Option<Value>,
}

/// Validate a key request against what the caller holds (`held`) and create the key.
fn create_key(hub: &Hub, principal: &Principal, org: Option<String>, held: Perms, body: KeyRequest) -> ApiResult<Response> {
    let name = body.name.trim();
    if name.is_empty() || name.len() > 100 {
        return Err(ApiError::bad_request("name must be 1-100 characters"));
    }
    if body.scopes.is_empty() {
        return Err(ApiError::bad_request("scopes must name at least one of read, deploy, admin, billing"));
    }
    for scope in &body.scopes {
        if !held.contains(scope.perms()) {
            return Err(ApiError::forbidden(format!("you cannot give a key the {scope:?} scope: it grants more than you hold").to_lowercase()));
        }
    }
    let expires_at_ms = match &body.ttl {
        Some(value) => Some(crate::wall_ms().saturating_add((lifetime(value, "ttl", MAX_KEY_TTL_SECS)? as i64).saturating_mul(1000))),
        None => None,
    };
    // A key made by a key answers to the same person as its maker.
    let created_by_user =
        if principal.id.starts_with("usr_") { Some(principal.id.clone()) } else { hub.store.api_key(&principal.id)?.and_then(|k| k.created_by_user) };
    let new = NewApiKey { name: name.to_string(), org, created_by: principal.name.clone(), created_by_user, scopes: body.scopes, expires_at_ms };
    let (key, text) = auth::create_scoped_api_key(hub, new)?;
    let mut view = key_view(&key);
    view["key"] = json!(text);
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

pub async fn list_org_keys(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    let keys: Vec<Value> = hub.store.api_keys()?.iter().filter(|k| k.org.as_deref() == Some(org.as_str())).map(key_view).collect();
    Ok(Json(json!({ "api_keys": keys })))
}

pub async fn create_org_key(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(org): Path<String>,
    ApiJson(body): ApiJson<KeyRequest>,
) -> ApiResult<Response> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    let held = principal.access.perms_in(&org);
    create_key(&hub, &principal, Some(org), held, body)
}

pub async fn revoke_org_key(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, id)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    revoke_key(&hub, &id, Some(&org))
}

fn revoke_key(hub: &Hub, id: &str, org: Option<&str>) -> ApiResult<Json<Value>> {
    match hub.store.api_key(id)? {
        Some(k) if k.org.as_deref() == org => {}
        _ => return Err(ApiError::not_found(&format!("api key {id}"))),
    }
    let key = hub.store.revoke_api_key(id)?.ok_or_else(|| ApiError::not_found(&format!("api key {id}")))?;
    Ok(Json(key_view(&key)))
}

pub async fn list_operator_keys(State(hub): State<Arc<Hub>>, principal: Principal) -> ApiResult<Json<Value>> {
    require_operator(&principal, Perm::Admin)?;
    let keys: Vec<Value> = hub.store.api_keys()?.iter().filter(|k| k.org.is_none()).map(key_view).collect();
    Ok(Json(json!({ "api_keys": keys })))
}

pub async fn create_operator_key(State(hub): State<Arc<Hub>>, principal: Principal, ApiJson(body): ApiJson<KeyRequest>) -> ApiResult<Response> {
    require_operator(&principal, Perm::Admin)?;
    let held = principal.access.everywhere;
    create_key(&hub, &principal, None, held, body)
}

pub async fn revoke_operator_key(State(hub): State<Arc<Hub>>, principal: Principal, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    require_operator(&principal, Perm::Admin)?;
    revoke_key(&hub, &id, None)
}

// ---- users (operators) ----

pub async fn list_users(State(hub): State<Arc<Hub>>, principal: Principal) -> ApiResult<Json<Value>> {
    require_operator(&principal, Perm::Admin)?;
    let mut users = hub.store.users()?;
    users.sort_by(|a, b| a.email.cmp(&b.email));
    Ok(Json(json!({ "users": users.iter().map(user_view).collect::<Vec<_>>() })))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserRequest {
    pub email: String,
    pub password: String,
    #[serde(default)]
    pub operator: bool,
}

pub async fn create_user(State(hub): State<Arc<Hub>>, principal: Principal, ApiJson(body): ApiJson<UserRequest>) -> ApiResult<Response> {
    require_operator(&principal, Perm::Admin)?;
    let worker = hub.clone();
    let user = tokio::task::spawn_blocking(move || auth::create_user(&worker, &body.email, &body.password, body.operator))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "creating the account failed"))?
        .map_err(|e| if e.contains("already exists") { ApiError::new(StatusCode::CONFLICT, "conflict", e) } else { ApiError::bad_request(e) })?;
    tracing::info!(user = %user.email, operator = user.operator, by = %principal.name, "user created");
    Ok((StatusCode::CREATED, Json(user_view(&user))).into_response())
}

async fn set_disabled(hub: &Hub, principal: &Principal, id: &str, disabled: bool) -> ApiResult<Json<Value>> {
    require_operator(principal, Perm::Admin)?;
    let user = hub.store.user_by_id(id)?.ok_or_else(|| ApiError::not_found(&format!("user {id}")))?;
    if disabled && user.id == principal.id {
        return Err(ApiError::bad_request("you cannot disable yourself"));
    }
    let user = hub.store.update_user(&user.email, |u| u.disabled = disabled)?.ok_or_else(|| ApiError::not_found(&format!("user {id}")))?;
    let ended = if disabled { hub.store.delete_sessions_of(&user.id)? } else { 0 };
    tracing::info!(user = %user.email, disabled, sessions_ended = ended, by = %principal.name, "user access changed");
    let mut view = user_view(&user);
    view["sessions_ended"] = json!(ended);
    Ok(Json(view))
}

pub async fn disable_user(State(hub): State<Arc<Hub>>, principal: Principal, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    set_disabled(&hub, &principal, &id, true).await
}

pub async fn enable_user(State(hub): State<Arc<Hub>>, principal: Principal, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    set_disabled(&hub, &principal, &id, false).await
}

/// Who the caller is and what they hold in each org they can see.
pub fn me_view(hub: &Hub, principal: &Principal) -> ApiResult<Value> {
    let orgs: Vec<Value> = if principal.access.everywhere != Perms::NONE {
        vec![]
    } else {
        principal.access.orgs.iter().map(|(org, perms)| json!({ "org": org, "permissions": perms.names() })).collect()
    };
    let roles: Vec<Value> = if principal.id.starts_with("usr_") {
        hub.store.memberships_of(&principal.id)?.iter().map(|m| json!({ "org": m.org, "role": m.role })).collect()
    } else {
        vec![]
    };
    Ok(json!({
        "id": principal.id, "name": principal.name, "operator": principal.operator, "org": principal.org,
        "permissions_everywhere": principal.access.everywhere.names(), "orgs": orgs, "memberships": roles,
    }))
}
