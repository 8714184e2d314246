//! Customer data routes: `GET /api/v1/orgs/{org}/export` (owners and operators) answers
//! the org's export archive (see `crate::org_data`); deleting an org takes two steps, both
//! for platform operators only: `POST /api/v1/orgs/{org}/deletion` returns a confirmation
//! code valid for ten minutes, `DELETE /api/v1/orgs/{org}?confirm=CODE` deletes.
//!
//! All three are recorded in the audit log by the middleware (the export although it is
//! a GET: it hands out everything of the org). The code travels in the query string,
//! which the audit log never records.

use super::{org_in_scope, parse_time, require_operator, rfc3339, ApiError, ApiQuery, ApiResult, Op, Routes};
use crate::access::Perm;
use crate::auth::Principal;
use crate::org_data::{self, ExportError, ExportRange};
use crate::store::ConfirmError;
use crate::Hub;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The customer data routes.
pub fn routes(routes: Routes) -> Routes {
    routes
        .get(
            "/api/v1/orgs/{org}/export",
            export,
            Op::new("Export everything of an org as a tar of JSON-lines files (owners, operators)")
                .describe(EXPORT_DOC)
                .tag("orgs")
                .query::<ExportQuery>()
                .text("application/x-tar"),
        )
        .post(
            "/api/v1/orgs/{org}/deletion",
            request_deletion,
            Op::new("Ask to delete an org: returns the confirmation code (operators)").tag("orgs").response::<DeletionRequested>().status(201),
        )
        .delete(
            "/api/v1/orgs/{org}",
            delete_org,
            Op::new("Delete an org with the code from its deletion request (operators)")
                .describe(DELETE_DOC)
                .tag("orgs")
                .query::<DeleteQuery>()
                .response::<Deleted>(),
        )
}

const EXPORT_DOC: &str = "A ustar archive with `<org>/manifest.json` (format, range and the line count of every file) and one JSON-lines file per kind: \
org (with settings), branding (logo as base64), agents, enrollment tokens, deployments (with revisions and per-agent status), logs, events, check reports, metrics (with `metrics=true`), \
checks, check states, alerts, silences, webhooks, webhook deliveries and events, secrets and registry logins (names only), members, \
invitations, API keys (metadata only), usage ledger entries, closed invoices and audit entries. `from`/`to` bound the telemetry only.";

const DELETE_DOC: &str = "Revokes and disconnects the org's agents and erases its records (telemetry payloads included). \
The usage ledger, closed invoices, the (canceled) subscription, the Stripe records and the audit log are kept for accounting; the org id stays reserved. \
A deletion interrupted by a stop is finished when the hub starts again.";

/// Query string of the export.
#[derive(Debug, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// Telemetry from (RFC 3339 or Unix ms, inclusive); everything older when absent.
    from: Option<String>,
    /// Telemetry until (RFC 3339 or Unix ms, exclusive); up to now when absent.
    to: Option<String>,
    /// Include metric samples (`true`/`false`, default false).
    metrics: Option<bool>,
}

/// Export the org's data; owners of the org and operators.
async fn export(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>, ApiQuery(query): ApiQuery<ExportQuery>) -> ApiResult<Response> {
    org_in_scope(&hub, &principal, &org, Perm::Owner)?;
    let time = |t: &Option<String>| t.as_deref().map(parse_time).transpose().map_err(ApiError::bad_request);
    let range = ExportRange { from_ms: time(&query.from)?, to_ms: time(&query.to)?, metrics: query.metrics.unwrap_or(false) };
    if let (Some(from), Some(to)) = (range.from_ms, range.to_ms) {
        if from >= to {
            return Err(ApiError::bad_request("from must be before to"));
        }
    }
    let record = hub.store.org(&org)?.ok_or_else(|| ApiError::not_found(&format!("org {org}")))?;
    let worker = hub.clone();
    let now = crate::wall_ms();
    let archive = tokio::task::spawn_blocking(move || org_data::export(&worker, &record, &range, now))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the export failed; see the hub log"))?
        .map_err(|error| match error {
            ExportError::TooLarge => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "export_too_large", error.to_string()),
            ExportError::Store(error) => error.into(),
        })?;
    tracing::info!(org = %org, by = %principal.name, bytes = archive.len(), "org exported");
    let stamp = rfc3339(now).replace(':', "");
    let disposition =
        HeaderValue::from_str(&format!("attachment; filename=\"gantry-export-{org}-{stamp}.tar\"")).unwrap_or_else(|_| HeaderValue::from_static("attachment"));
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/x-tar")), (header::CONTENT_DISPOSITION, disposition)], archive).into_response())
}

/// The answer to a deletion request.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct DeletionRequested {
    org: String,
    /// Pass as `confirm` to `DELETE /api/v1/orgs/{org}`; shown only here.
    confirm: String,
    expires_at: String,
    /// What the deletion removes and what it keeps.
    removes: Vec<&'static str>,
    keeps: Vec<&'static str>,
}

/// What a deletion removes, as the request lists it.
const REMOVES: [&str; 9] = [
    "agents (revoked and disconnected) and enrollment tokens",
    "logs, events, metrics and check reports",
    "deployments with their revisions and statuses",
    "checks, check states, alerts, silences and alert rules",
    "webhooks with their deliveries and events",
    "secrets and registry logins",
    "members, invitations and API keys",
    "accounts, sessions and keys of members who belong to no other org",
    "the org record, its settings and its branding",
];

/// What a deletion keeps, as the request lists it.
const KEEPS: [&str; 3] = [
    "usage ledger entries, closed invoices, the subscription (canceled) and the Stripe records, for accounting",
    "the audit log (hash-chained and append-only), for accountability, with the actors, client addresses and command lines of the org's entries erased",
    "the org id, reserved so kept records never pass to a new org",
];

/// Ask to delete an org; operators only. Asking again replaces the earlier code.
async fn request_deletion(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Response> {
    require_operator(&principal, Perm::Owner)?;
    org_in_scope(&hub, &principal, &org, Perm::Owner)?;
    let confirmation = org_data::request_deletion(&hub, &org, &principal.name, crate::wall_ms())?;
    let body = DeletionRequested {
        org,
        confirm: confirmation.code,
        expires_at: rfc3339(confirmation.expires_at_ms),
        removes: REMOVES.to_vec(),
        keeps: KEEPS.to_vec(),
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Query string of the deletion.
#[derive(Debug, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// The code `POST /api/v1/orgs/{org}/deletion` returned.
    confirm: Option<String>,
}

/// The answer to a deletion.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Deleted {
    org: String,
    deleted: bool,
    /// Records removed, by kind.
    removed: BTreeMap<String, u64>,
}

/// Delete an org with the code of its deletion request; operators only.
async fn delete_org(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(org): Path<String>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> ApiResult<Json<Deleted>> {
    require_operator(&principal, Perm::Owner)?;
    org_in_scope(&hub, &principal, &org, Perm::Owner)?;
    let Some(code) = query.confirm.filter(|c| !c.is_empty()) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "confirmation_required",
            format!("deleting an org needs ?confirm=CODE; get the code from POST /api/v1/orgs/{org}/deletion"),
        ));
    };
    match hub.store.confirm_deletion(&org, &crate::auth::sha256_hex(&code), &principal.name, crate::wall_ms())? {
        Ok(_) => {}
        Err(refusal) => {
            let code = match refusal {
                ConfirmError::NotRequested => "deletion_not_requested",
                ConfirmError::Mismatch => "confirmation_mismatch",
                ConfirmError::Expired => "confirmation_expired",
            };
            return Err(ApiError::new(StatusCode::CONFLICT, code, refusal.to_string()));
        }
    }
    let removed = org_data::delete(&hub, &org, &principal.name).await?;
    Ok(Json(Deleted { org, deleted: true, removed }))
}
