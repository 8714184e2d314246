//! The audit log routes: `GET /api/v1/orgs/{org}/audit` for an org's members and
//! `GET /api/v1/audit` (every org) for platform operators. Newest first, filtered by
//! actor, action prefix and time, paged by a seq cursor; `?format=jsonl` exports one entry
//! per line.
//!
//! Read-only: entries are written by `crate::audit` and never changed through the API.

use super::{authorize, parse_time, require_operator, rfc3339, ApiError, ApiQuery, ApiResult, MAX_PAGE};
use crate::access::Perm;
use crate::auth::Principal;
use crate::store::{AuditEntry, AuditFilter, AuditPage};
use crate::Hub;
use axum::extract::{Path, State};
use axum::http::header::{self, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

/// Entries in a page when `limit` is not given.
pub const DEFAULT_AUDIT_PAGE: usize = 100;

/// Response header of a JSON-lines export naming the cursor of the next page.
pub const NEXT_CURSOR_HEADER: &str = "x-next-cursor";

/// Query string of the audit routes.
#[derive(Debug, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Exactly this actor (an email, `key:<id>`, `agent:<id>`, `anonymous`).
    actor: Option<String>,
    /// Actions starting with this (`POST`, `deploy.`, a whole `METHOD /route`).
    action: Option<String>,
    /// RFC 3339 or Unix ms, inclusive.
    from: Option<String>,
    /// RFC 3339 or Unix ms, exclusive.
    to: Option<String>,
    /// Entries per page, 1 to `MAX_PAGE` (default 100).
    limit: Option<usize>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// `json` (default) or `jsonl`.
    format: Option<String>,
}

/// The audit log of one org; members of the org and operators may read it.
pub async fn org_log(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>, ApiQuery(query): ApiQuery<AuditQuery>) -> ApiResult<Response> {
    authorize(&principal, &org, Perm::Admin, &format!("org {org}"))?;
    if hub.store.org(&org)?.is_none() {
        return Err(ApiError::not_found(&format!("org {org}")));
    }
    answer(&hub, Some(org), query).await
}

/// The audit log of every org and of actions outside any org; operators only.
pub async fn all(State(hub): State<Arc<Hub>>, principal: Principal, ApiQuery(query): ApiQuery<AuditQuery>) -> ApiResult<Response> {
    require_operator(&principal, Perm::Admin)?;
    answer(&hub, None, query).await
}

fn entry_json(entry: &AuditEntry) -> serde_json::Value {
    let mut value = json!(entry);
    value["at"] = json!(rfc3339(entry.at_ms));
    // The salt only lets the store check the text against its digests; a reader has no
    // use for it, and without it the digests of an erased entry cannot be tried.
    if let Some(fields) = value.as_object_mut() {
        fields.remove("salt");
    }
    value
}

async fn answer(hub: &Arc<Hub>, org: Option<String>, query: AuditQuery) -> ApiResult<Response> {
    let time = |t: &Option<String>| t.as_deref().map(parse_time).transpose().map_err(ApiError::bad_request);
    let limit = query.limit.unwrap_or(DEFAULT_AUDIT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!("limit must be 1 to {MAX_PAGE}")));
    }
    let before_seq = match query.cursor.as_deref() {
        Some(text) => Some(text.parse::<u64>().map_err(|_| ApiError::bad_request("cursor is malformed; pass back next_cursor unchanged"))?),
        None => None,
    };
    let jsonl = match query.format.as_deref() {
        None | Some("json") => false,
        Some("jsonl") => true,
        Some(other) => return Err(ApiError::bad_request(format!("format {other:?} must be json or jsonl"))),
    };
    let filter = AuditFilter { org, actor: query.actor, action: query.action, from_ms: time(&query.from)?, to_ms: time(&query.to)?, before_seq };
    let store = hub.store.clone();
    let page: AuditPage = tokio::task::spawn_blocking(move || store.audit_entries(&filter, limit))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "audit query failed"))??;
    let next_cursor = page.next_cursor.map(|c| c.to_string());
    if !jsonl {
        let entries: Vec<_> = page.entries.iter().map(entry_json).collect();
        return Ok(Json(json!({ "entries": entries, "next_cursor": next_cursor })).into_response());
    }
    let mut body = String::new();
    for entry in &page.entries {
        body.push_str(&entry_json(entry).to_string());
        body.push('\n');
    }
    let mut response = ([(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"))], body).into_response();
    if let Some(cursor) = next_cursor.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert(NEXT_CURSOR_HEADER, cursor);
    }
    Ok(response)
}
