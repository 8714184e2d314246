//! Webhook routes: an org's endpoints, their delivery log, and manual redelivery.
//!
//! `POST /api/v1/orgs/{org}/webhooks` `{url, events, description?, enabled?}` creates an
//! endpoint and answers with its signing secret; that answer and the one of
//! `POST .../webhooks/{id}/rotate-secret` are the only places the secret ever appears. It
//! is sealed before it is stored and never returned, listed or logged afterwards. Every
//! body is validated completely before anything is written. Sending is
//! `crate::webhooks`'s job, not this module's.

use super::{org_in_scope, rfc3339, ApiError, ApiJson, ApiQuery, ApiResult};
use crate::access::Perm;
use crate::auth::Principal;
use crate::secrets::Kind;
use crate::store::{DeliveryStatus, Webhook, WebhookDelivery};
use crate::webhooks::{ALL_EVENTS, EVENT_TYPES};
use crate::Hub;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Most endpoints per org.
pub const MAX_WEBHOOKS_PER_ORG: usize = 25;
/// Longest description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 500;
/// Deliveries per page of the log, by default and at most.
pub const DEFAULT_DELIVERY_PAGE: usize = 50;
pub const MAX_DELIVERY_PAGE: usize = 500;

/// Body of create, `PUT` (replace) and `PATCH` (change the given fields).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    /// `http://` or `https://` URL with a host; required to create and to replace.
    pub url: Option<String>,
    /// Event types (see [`EVENT_TYPES`]) or `*`; required to create and to replace.
    pub events: Option<Vec<String>>,
    /// Free text for people; `""` clears it.
    pub description: Option<String>,
    /// Whether deliveries are made (default true).
    pub enabled: Option<bool>,
}

/// Query string of the delivery log.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    /// Page size (default 50, at most 500).
    pub limit: Option<usize>,
    /// Continue with the deliveries older than this delivery id (the previous page's
    /// `next_before`).
    pub before: Option<String>,
}

/// An endpoint URL: `http(s)://host[:port][/path]`, as the delivery client can send to.
pub fn validate_url(url: &str) -> Result<(), String> {
    gantry_shared::checks::parse_http_url(url).map_err(|e| format!("url: {e}"))?;
    url.parse::<axum::http::Uri>().map_err(|e| format!("url: {url:?} is not a valid URI ({e})"))?;
    Ok(())
}

/// The subscribed event types, each known (or `*`), duplicates dropped, order kept.
pub fn validate_events(events: &[String]) -> Result<Vec<String>, String> {
    if events.is_empty() {
        return Err(format!("events must name at least one event type, or \"{ALL_EVENTS}\" for all"));
    }
    let mut out: Vec<String> = Vec::new();
    for event in events {
        if event != ALL_EVENTS && !crate::webhooks::is_event_type(event) {
            return Err(format!("events: unknown event type {event:?}; known types are {}, or \"{ALL_EVENTS}\" for all", EVENT_TYPES.join(", ")));
        }
        if !out.contains(event) {
            out.push(event.clone());
        }
    }
    Ok(out)
}

/// A description: at most [`MAX_DESCRIPTION_CHARS`] characters without control characters;
/// empty means none.
pub fn validate_description(description: &str) -> Result<Option<String>, String> {
    let description = description.trim();
    if description.chars().count() > MAX_DESCRIPTION_CHARS || description.chars().any(char::is_control) {
        return Err(format!("description must be at most {MAX_DESCRIPTION_CHARS} characters, without control characters"));
    }
    Ok((!description.is_empty()).then(|| description.to_string()))
}

/// The fields of a request, checked together: every problem is reported in one message.
/// With `complete`, `url` and `events` are required (create and replace).
struct Checked {
    url: Option<String>,
    events: Option<Vec<String>>,
    description: Option<Option<String>>,
    enabled: Option<bool>,
}

fn check(body: WebhookRequest, complete: bool) -> ApiResult<Checked> {
    let mut errors = Vec::new();
    match &body.url {
        Some(url) => errors.extend(validate_url(url).err()),
        None if complete => errors.push("url is required".to_string()),
        None => {}
    }
    let events = match &body.events {
        Some(events) => validate_events(events).map_err(|e| errors.push(e)).ok(),
        None if complete => {
            errors.push(format!("events is required: a list of event types, or [\"{ALL_EVENTS}\"] for all"));
            None
        }
        None => None,
    };
    let description = match &body.description {
        Some(text) => validate_description(text).map_err(|e| errors.push(e)).ok(),
        None if complete => Some(None),
        None => None,
    };
    if !errors.is_empty() {
        return Err(ApiError::bad_request(errors.join("; ")));
    }
    let enabled = if complete { Some(body.enabled.unwrap_or(true)) } else { body.enabled };
    Ok(Checked { url: body.url, events, description, enabled })
}

fn find(hub: &Hub, principal: &Principal, org: &str, id: &str) -> ApiResult<Webhook> {
    org_in_scope(hub, principal, org, Perm::Admin)?;
    hub.store.webhook(org, id)?.ok_or_else(|| ApiError::not_found(&format!("webhook {id}")))
}

fn find_delivery(hub: &Hub, principal: &Principal, org: &str, id: &str, delivery: &str) -> ApiResult<(Webhook, WebhookDelivery)> {
    let webhook = find(hub, principal, org, id)?;
    match hub.store.webhook_delivery(delivery)? {
        Some(d) if d.org == org && d.webhook_id == id => Ok((webhook, d)),
        _ => Err(ApiError::not_found(&format!("delivery {delivery}"))),
    }
}

/// An endpoint as the API shows it: never the secret.
fn webhook_view(webhook: &Webhook) -> Value {
    json!({
        "id": webhook.id,
        "org": webhook.org,
        "url": webhook.url,
        "events": webhook.events,
        "description": webhook.description,
        "enabled": webhook.enabled,
        "created_at": rfc3339(webhook.created_at_ms),
        "updated_at": rfc3339(webhook.updated_at_ms),
        "updated_by": webhook.updated_by,
    })
}

/// The view with the secret, for the two answers that show it.
fn with_secret(webhook: &Webhook, secret: &str) -> Value {
    let mut view = webhook_view(webhook);
    view["secret"] = json!(secret);
    view
}

fn delivery_view(delivery: &WebhookDelivery) -> Value {
    let attempts: Vec<Value> = delivery
        .attempts
        .iter()
        .map(|a| json!({ "at": rfc3339(a.at_ms), "duration_ms": a.duration_ms, "status_code": a.status_code, "error": a.error }))
        .collect();
    json!({
        "id": delivery.id,
        "webhook_id": delivery.webhook_id,
        "event_id": delivery.event_id,
        "event_type": delivery.event_type,
        "status": delivery.status.name(),
        "created_at": rfc3339(delivery.created_at_ms),
        "next_attempt_at": delivery.next_attempt_ms.filter(|_| delivery.status == DeliveryStatus::Pending).map(rfc3339),
        "attempts": attempts,
        "failure": delivery.failure,
        "redelivery_of": delivery.redelivery_of,
    })
}

fn sealing_failed(error: anyhow::Error) -> ApiError {
    tracing::error!(%error, "sealing a webhook secret failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the signing secret could not be sealed")
}

pub async fn list(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    let webhooks: Vec<Value> = hub.store.webhooks_of(&org)?.iter().map(webhook_view).collect();
    Ok(Json(json!({ "webhooks": webhooks })))
}

pub async fn create(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>, ApiJson(body): ApiJson<WebhookRequest>) -> ApiResult<Response> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    let checked = check(body, true)?;
    if hub.store.webhooks_of(&org)?.len() >= MAX_WEBHOOKS_PER_ORG {
        return Err(ApiError::new(StatusCode::CONFLICT, "limit", format!("org {org} has {MAX_WEBHOOKS_PER_ORG} webhooks, the most allowed")));
    }
    let id = format!("whk_{}", crate::auth::random_hex(8));
    let secret = crate::webhooks::new_secret();
    let sealed_secret = hub.secret_box.seal(&org, Kind::Webhook, &id, secret.as_bytes()).map_err(sealing_failed)?;
    let now = crate::wall_ms();
    let webhook = Webhook {
        id,
        org: org.clone(),
        url: checked.url.unwrap_or_default(),
        events: checked.events.unwrap_or_default(),
        description: checked.description.flatten(),
        enabled: checked.enabled.unwrap_or(true),
        sealed_secret,
        created_at_ms: now,
        updated_at_ms: now,
        updated_by: principal.name.clone(),
    };
    hub.store.create_webhook(&webhook)?;
    tracing::info!(%org, webhook = %webhook.id, events = ?webhook.events, by = %principal.name, "webhook created");
    Ok((StatusCode::CREATED, Json(with_secret(&webhook, &secret))).into_response())
}

pub async fn get(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, id)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    Ok(Json(webhook_view(&find(&hub, &principal, &org, &id)?)))
}

/// `PATCH`: change the fields given.
pub async fn update(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path((org, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<WebhookRequest>,
) -> ApiResult<Json<Value>> {
    change(&hub, &principal, &org, &id, check(body, false)?)
}

/// `PUT`: replace url, events, description and enabled (absent description: none; absent
/// enabled: true). The secret stays.
pub async fn replace(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path((org, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<WebhookRequest>,
) -> ApiResult<Json<Value>> {
    change(&hub, &principal, &org, &id, check(body, true)?)
}

fn change(hub: &Hub, principal: &Principal, org: &str, id: &str, checked: Checked) -> ApiResult<Json<Value>> {
    find(hub, principal, org, id)?;
    let now = crate::wall_ms();
    let updated = hub.store.update_webhook(org, id, |w| {
        if let Some(url) = &checked.url {
            w.url = url.clone();
        }
        if let Some(events) = &checked.events {
            w.events = events.clone();
        }
        if let Some(description) = &checked.description {
            w.description = description.clone();
        }
        if let Some(enabled) = checked.enabled {
            w.enabled = enabled;
        }
        w.updated_at_ms = now;
        w.updated_by = principal.name.clone();
    })?;
    let webhook = updated.ok_or_else(|| ApiError::not_found(&format!("webhook {id}")))?;
    tracing::info!(%org, webhook = %id, events = ?webhook.events, enabled = webhook.enabled, by = %principal.name, "webhook changed");
    Ok(Json(webhook_view(&webhook)))
}

pub async fn delete(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, id)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    if !hub.store.delete_webhook(&org, &id)? {
        return Err(ApiError::not_found(&format!("webhook {id}")));
    }
    tracing::info!(%org, webhook = %id, by = %principal.name, "webhook deleted");
    Ok(Json(json!({ "deleted": id })))
}

/// A new signing secret, shown in this answer only; the old one stops signing at once
/// (retries of pending deliveries are signed with the new one).
pub async fn rotate_secret(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, id)): Path<(String, String)>) -> ApiResult<Json<Value>> {
    find(&hub, &principal, &org, &id)?;
    let secret = crate::webhooks::new_secret();
    let sealed = hub.secret_box.seal(&org, Kind::Webhook, &id, secret.as_bytes()).map_err(sealing_failed)?;
    let now = crate::wall_ms();
    let updated = hub.store.update_webhook(&org, &id, |w| {
        w.sealed_secret = sealed.clone();
        w.updated_at_ms = now;
        w.updated_by = principal.name.clone();
    })?;
    let webhook = updated.ok_or_else(|| ApiError::not_found(&format!("webhook {id}")))?;
    tracing::info!(%org, webhook = %id, by = %principal.name, "webhook secret rotated");
    Ok(Json(with_secret(&webhook, &secret)))
}

/// The endpoint's deliveries, newest first, a page at a time.
pub async fn deliveries(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path((org, id)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<DeliveriesQuery>,
) -> ApiResult<Json<Value>> {
    find(&hub, &principal, &org, &id)?;
    let limit = query.limit.unwrap_or(DEFAULT_DELIVERY_PAGE);
    if !(1..=MAX_DELIVERY_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit must be 1 to {MAX_DELIVERY_PAGE}")));
    }
    let before = match &query.before {
        Some(before) => match hub.store.webhook_delivery(before)? {
            Some(d) if d.org == org && d.webhook_id == id => Some(d),
            _ => return Err(ApiError::bad_request(format!("before: {before:?} is not a delivery of webhook {id}"))),
        },
        None => None,
    };
    let page = hub.store.webhook_deliveries(&org, &id, before.as_ref(), limit)?;
    let next_before = (page.len() == limit).then(|| page.last().map(|d| d.id.clone())).flatten();
    let deliveries: Vec<Value> = page.iter().map(delivery_view).collect();
    Ok(Json(json!({ "deliveries": deliveries, "next_before": next_before })))
}

/// One delivery with its attempts and the event it carries.
pub async fn delivery(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, id, delivery)): Path<(String, String, String)>) -> ApiResult<Json<Value>> {
    let (_, delivery) = find_delivery(&hub, &principal, &org, &id, &delivery)?;
    let mut view = delivery_view(&delivery);
    if let Some(event) = hub.store.webhook_event(&delivery.event_id)? {
        let payload: Value = serde_json::from_slice(&crate::webhooks::payload(&event)).unwrap_or(Value::Null);
        view["event"] = payload;
    }
    Ok(Json(view))
}

/// Send a delivery's event again, as a new delivery with the same event id, at once.
pub async fn redeliver(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, id, delivery)): Path<(String, String, String)>) -> ApiResult<Response> {
    let (webhook, original) = find_delivery(&hub, &principal, &org, &id, &delivery)?;
    if !webhook.enabled {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("webhook {id} is disabled; enable it to redeliver")));
    }
    if hub.store.webhook_event(&original.event_id)?.is_none() {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("event {} is no longer stored", original.event_id)));
    }
    let redelivery = crate::webhooks::redeliver(&hub, &original)?;
    tracing::info!(%org, webhook = %id, delivery = %redelivery.id, of = %original.id, by = %principal.name, "webhook redelivery queued");
    Ok((StatusCode::ACCEPTED, Json(delivery_view(&redelivery))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_need_http_and_a_host() {
        assert!(validate_url("https://hooks.example.com/gantry?x=1").is_ok());
        assert!(validate_url("http://127.0.0.1:9000/").is_ok());
        for bad in ["ftp://example.com/", "https://", "example.com/hook", "https://exa mple.com/", "https://user:pw@example.com/"] {
            assert!(validate_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn event_lists_are_known_types_without_duplicates() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(validate_events(&list(&["agent.online", "*", "agent.online"])).unwrap(), list(&["agent.online", "*"]));
        assert!(validate_events(&[]).unwrap_err().contains("at least one"));
        let error = validate_events(&list(&["agent.online", "agent.exploded"])).unwrap_err();
        assert!(error.contains("\"agent.exploded\"") && error.contains("alert.firing"), "{error}");
    }

    #[test]
    fn every_problem_of_a_request_is_reported_together() {
        let body = WebhookRequest { url: Some("nope".into()), events: Some(vec!["x".into()]), description: None, enabled: None };
        let error = check(body, true).err().unwrap();
        assert!(error.message.contains("url:") && error.message.contains("unknown event type"), "{}", error.message);
        let missing = check(WebhookRequest { url: None, events: None, description: None, enabled: None }, true).err().unwrap();
        assert!(missing.message.contains("url is required") && missing.message.contains("events is required"), "{}", missing.message);
        assert!(check(WebhookRequest { url: None, events: None, description: Some(String::new()), enabled: Some(false) }, false).is_ok());
    }
}
