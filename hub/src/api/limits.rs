//! HTTP side of the rate limits and the login throttle: a middleware that picks a
//! request's bucket from its credential (cheaply, without verifying the secret; the
//! handler's extractor does that once) and answers 429 with `Retry-After`, and the checks
//! the login handlers make before and after checking a password.
//!
//! The arithmetic lives in [`crate::ratelimit`]; this module only maps requests onto it.

use super::{session_cookie_value, ApiError};
use crate::auth::{self, API_KEY_PREFIX};
use crate::metrics::Metrics;
use crate::ratelimit::{retry_after_secs, Limit, Subject};
use crate::Hub;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::{self, HeaderMap};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

/// Paths the request rate limits apply to.
pub const LIMITED_PREFIX: &str = "/api/v1/";

/// The client's IP address, when the request came over TCP (always, when served by
/// [`crate::run`]; not in handler tests driven with `oneshot`): the TCP peer, or behind a
/// trusted proxy the address it forwarded for (see [`super::client_ip`]).
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<IpAddr>);

impl FromRequestParts<Arc<Hub>> for ClientIp {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, hub: &Arc<Hub>) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(super::client_ip(hub, parts)))
    }
}

/// A 429 answer: wait `wait_ms` (sent as whole seconds, at least 1).
pub fn too_many_requests(wait_ms: u64, message: &str) -> ApiError {
    let secs = retry_after_secs(wait_ms);
    let mut error = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", format!("{message}; retry after {secs} s"));
    error.retry_after_secs = Some(secs);
    error
}

/// Who a request counts against, from its `Authorization` header or session cookie. Only
/// credentials the store knows pick a key or session bucket (looked up by the key id or the
/// cookie's hash, the secret is not checked here); anything else counts against the address,
/// so inventing key ids does not escape the limit.
pub fn subject_of(hub: &Hub, headers: &HeaderMap, ip: Option<IpAddr>) -> Subject {
    let by_address = || ip.map_or(Subject::Unknown, Subject::Address);
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    if let Some(text) = bearer {
        let id = text.strip_prefix(API_KEY_PREFIX).and_then(|rest| rest.split_once('.')).map(|(id, _)| id).filter(|id| id.len() <= 64);
        return match id.map(|id| hub.store.api_key(id)) {
            Some(Ok(Some(key))) if !key.revoked => {
                let org_per_minute = key.org.as_deref().and_then(|org| crate::billing::plans::api_requests_per_minute(hub, org));
                Subject::Key { operator: key.org.is_none(), id: key.id, org: key.org, org_per_minute }
            }
            _ => by_address(),
        };
    }
    if let Some(value) = session_cookie_value(hub, headers).filter(|v| v.len() == 64) {
        let hash = auth::sha256_hex(&value);
        if let Ok(Some(session)) = hub.store.session(&hash) {
            let operator = matches!(hub.store.user_by_email(&session.email), Ok(Some(user)) if user.operator);
            return Subject::Session { hash, operator };
        }
    }
    by_address()
}

/// Middleware: count each `/api/v1/*` request against its bucket; over the limit, answer
/// 429 without running the handler.
pub async fn rate_limit(State(hub): State<Arc<Hub>>, ClientIp(ip): ClientIp, request: Request, next: axum::middleware::Next) -> Response {
    if !hub.config.rate_limit.enabled || !request.uri().path().starts_with(LIMITED_PREFIX) {
        return next.run(request).await;
    }
    let subject = subject_of(&hub, request.headers(), ip);
    match hub.limiter.request(&subject, hub.now().0) {
        Ok(()) => next.run(request).await,
        Err((limit, wait_ms)) => {
            Metrics::inc(&hub.metrics.http_rate_limited);
            let what = match limit {
                Limit::Key => "this credential",
                Limit::Org => "this org",
                Limit::Address => "this address",
            };
            // Debug level: a client hammering the API must not flood the log as well.
            tracing::debug!(?subject, limit = what, wait_ms, "request rate limited");
            too_many_requests(wait_ms, &format!("too many requests from {what}")).into_response()
        }
    }
}

/// Before checking a password: refuse (429) if the account or address has used up its
/// failed logins, so guessing costs no argon2 work once throttled.
pub fn login_allowed(hub: &Hub, email: &str, ip: Option<IpAddr>) -> Result<(), ApiError> {
    hub.limiter.login_allowed(email, ip, hub.now().0).map_err(|wait_ms| {
        Metrics::inc(&hub.metrics.logins_throttled);
        tracing::debug!(?ip, wait_ms, "login throttled");
        too_many_requests(wait_ms, "too many failed logins")
    })
}

/// After checking a password: count a failure, or clear the account's failures.
pub fn login_outcome(hub: &Hub, email: &str, ip: Option<IpAddr>, ok: bool) {
    if ok {
        hub.limiter.login_succeeded(email);
    } else {
        hub.limiter.login_failed(email, ip, hub.now().0);
    }
}

/// Add `Retry-After` to a response when the error carries one.
pub fn with_retry_after(mut response: Response, retry_after_secs: Option<u64>) -> Response {
    if let Some(secs) = retry_after_secs {
        response.headers_mut().insert(header::RETRY_AFTER, secs.into());
    }
    response
}
