//! Plans, subscriptions and invoices over HTTP.
//!
//! - `GET /api/v1/plans` (anyone logged in), `POST /api/v1/plans` `{"id", ...}` and
//!   `PUT /api/v1/plans/{id}` (operators; every change is a new version), `GET
//!   /api/v1/plans/{id}` (the newest version and all versions).
//! - `GET /api/v1/orgs/{org}/subscription` (billing permission): plan, status, current
//!   period, entitlements. `PUT` `{"plan"}` (operators) subscribes or changes plan from now;
//!   `POST .../subscription/status` `{"status"}` (operators) suspends, restores or cancels.
//! - `GET /api/v1/orgs/{org}/invoices/preview`: the current period so far;
//!   `GET /api/v1/orgs/{org}/invoices`: closed invoices, which never change.

use super::{org_in_scope, require_operator, rfc3339, ApiError, ApiJson, ApiResult};
use crate::access::Perm;
use crate::auth::Principal;
use crate::billing::invoices::{self, InvoiceError};
use crate::billing::plans::{self, entitlements, period_containing, Plan, PlanError, PlanRequest, Status, Subscription};
use crate::store::ClosedInvoice;
use crate::Hub;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

fn invoice_error(e: InvoiceError) -> ApiError {
    match e {
        InvoiceError::Store(e) => e.into(),
        InvoiceError::Pricing(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "invoice_failed", m),
    }
}

fn plan_error(e: PlanError) -> ApiError {
    match e {
        PlanError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_plan", m),
        PlanError::Store(e) => e.into(),
    }
}

pub async fn list_plans(State(hub): State<Arc<Hub>>, _principal: Principal) -> ApiResult<Json<Value>> {
    Ok(Json(json!({ "plans": hub.store.plans()? })))
}

/// Body of `POST /api/v1/plans`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct NewPlan {
    pub id: String,
    #[serde(flatten)]
    pub plan: PlanRequest,
}

pub async fn create_plan(State(hub): State<Arc<Hub>>, principal: Principal, ApiJson(body): ApiJson<NewPlan>) -> ApiResult<Response> {
    require_operator(&principal, Perm::Admin)?;
    let plan = plans::put_plan(&hub, &body.id, body.plan, &principal.name, true).map_err(plan_error)?;
    Ok((StatusCode::CREATED, Json(plan)).into_response())
}

pub async fn change_plan(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PlanRequest>,
) -> ApiResult<Json<Plan>> {
    require_operator(&principal, Perm::Admin)?;
    if hub.store.latest_plan(&id)?.is_none() {
        return Err(ApiError::not_found(&format!("plan {id}")));
    }
    Ok(Json(plans::put_plan(&hub, &id, body, &principal.name, false).map_err(plan_error)?))
}

pub async fn get_plan(State(hub): State<Arc<Hub>>, _principal: Principal, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let versions = hub.store.plan_versions(&id)?;
    let latest = versions.last().cloned().ok_or_else(|| ApiError::not_found(&format!("plan {id}")))?;
    Ok(Json(json!({ "plan": latest, "versions": versions })))
}

fn subscription_view(hub: &Hub, s: &Subscription) -> Value {
    let (start, end) = period_containing(s.period_anchor_ms, crate::wall_ms());
    let mut view = json!(s);
    view["current_period"] = json!({ "start": rfc3339(start), "end": rfc3339(end) });
    view["entitlements"] = json!(entitlements(s.status));
    view["trial_end"] = json!(s.trial_end_ms.map(rfc3339));
    view["plan"] = json!(hub.store.plan_version(&s.plan_id, s.plan_version).ok().flatten());
    view
}

pub async fn get_subscription(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Billing)?;
    let s = hub.store.subscription(&org)?.ok_or_else(|| ApiError::not_found(&format!("subscription of org {org}")))?;
    Ok(Json(subscription_view(&hub, &s)))
}

/// Body of `PUT .../subscription`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscribeRequest {
    /// Plan id; its newest version is used.
    pub plan: String,
}

pub async fn put_subscription(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(org): Path<String>,
    ApiJson(body): ApiJson<SubscribeRequest>,
) -> ApiResult<Json<Value>> {
    require_operator(&principal, Perm::Billing)?;
    org_in_scope(&hub, &principal, &org, Perm::Billing)?;
    let s = plans::subscribe(&hub, &org, &body.plan).map_err(plan_error)?;
    Ok(Json(subscription_view(&hub, &s)))
}

/// Body of `POST .../subscription/status`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {
    /// `suspended`, `active` or `canceled`.
    pub status: Status,
}

pub async fn set_status(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(org): Path<String>,
    ApiJson(body): ApiJson<StatusRequest>,
) -> ApiResult<Json<Value>> {
    require_operator(&principal, Perm::Billing)?;
    org_in_scope(&hub, &principal, &org, Perm::Billing)?;
    if !matches!(body.status, Status::Suspended | Status::Active | Status::Canceled) {
        return Err(ApiError::bad_request("status must be suspended, active or canceled; the others follow payments"));
    }
    let s = plans::force_status(&hub, &org, body.status)?;
    Ok(Json(subscription_view(&hub, &s)))
}

pub async fn preview(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Billing)?;
    let s = hub.store.subscription(&org)?.ok_or_else(|| ApiError::not_found(&format!("subscription of org {org}")))?;
    let now = crate::wall_ms();
    let (start, end) = period_containing(s.period_anchor_ms, now);
    // Usage so far; the base fee and allowances are the whole period's.
    let invoice = invoices::invoice_for(&hub, &s, start, end).map_err(invoice_error)?;
    Ok(Json(json!({ "org": org, "status": s.status, "period": { "start": rfc3339(start), "end": rfc3339(end) }, "invoice": invoice, "final": false })))
}

pub async fn list_invoices(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Billing)?;
    let invoices: Vec<Value> = hub.store.closed_invoices(&org)?.iter().rev().map(closed_view).collect();
    Ok(Json(json!({ "invoices": invoices })))
}

fn closed_view(c: &ClosedInvoice) -> Value {
    json!({ "id": c.id, "org": c.org, "closed_at": rfc3339(c.closed_at_ms), "period": { "start": rfc3339(c.invoice.from_ms), "end": rfc3339(c.invoice.to_ms) }, "invoice": c.invoice, "final": true })
}

/// `POST /api/v1/billing/close` (operators): close ended periods now.
pub async fn close_now(State(hub): State<Arc<Hub>>, principal: Principal) -> ApiResult<Json<Value>> {
    require_operator(&principal, Perm::Billing)?;
    let closed = invoices::close_periods(&hub, crate::wall_ms()).map_err(invoice_error)?;
    Ok(Json(json!({ "closed": closed })))
}

/// Refuse a new deployment revision over a hard `deployments_per_month` limit:
/// `402 plan_limit_reached` with the count and when it resets.
pub(crate) fn require_deploy_quota(hub: &Hub, org: &str) -> ApiResult<()> {
    match plans::deploy_quota_refusal(hub, org, crate::wall_ms())? {
        Some(reason) => Err(ApiError::new(StatusCode::PAYMENT_REQUIRED, "plan_limit_reached", reason)),
        None => Ok(()),
    }
}

/// Refuse `what` (e.g. "deploying") when the org's subscription does not entitle it:
/// `402 subscription_inactive` with the reason.
pub(crate) fn require_entitlement(hub: &Hub, org: &str, what: &str, allowed: impl Fn(&crate::billing::plans::Entitlements) -> bool) -> ApiResult<()> {
    plans::require(hub, org, what, allowed).map_err(|reason| ApiError::new(StatusCode::PAYMENT_REQUIRED, "subscription_inactive", reason))
}
