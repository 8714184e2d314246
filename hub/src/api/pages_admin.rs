//! Dashboard pages for orgs, deployments, usage and billing, the plan catalog and the audit
//! log: server-rendered HTML whose forms work without JavaScript.
//!
//! Every page and form goes through the JSON API's own handlers (`deployments::create`,
//! `billing::set_status`, `audit::org_log`, ...) with the caller's principal, so a page can
//! neither see nor do more than the API allows; this module only turns forms into request
//! bodies and answers into view data. Refusals become pages with the same status: 404 for
//! an object of another org, 403 for a role that falls short, 400 with the API's message for
//! bad input (the form is shown again with what was typed). Form posts are audited like API
//! calls (see `audit::is_audited`).

use super::{accounts, audit, billing, billing_usage, deployments, health, require_operator, rfc3339, ApiError, ApiJson, ApiQuery, ApiResult};
use crate::access::Perm;
use crate::auth::Principal;
use crate::store::Targets;
use crate::Hub;
use axum::extract::{Path, Query, State};
use axum::http::header::{self, HeaderMap};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::MethodFilter;
use axum::{Form, Json};
use gantry_dashboards::admin::{self, AuditRow, AuditView, KeyRow, MemberRow, OrgRow, OrgsView, UsersView};
use gantry_dashboards::alerts::{AlertRow, AlertsView};
use gantry_dashboards::billing::{InvoiceLineRow, InvoiceView, MeterSeries, PlanRow, UsageView};
use gantry_dashboards::deploy::{AgentProgress, DeployForm, DeploymentDetail, DeploymentRow, DeploymentsView, DiffLine, RevisionRow};
use gantry_dashboards::layout::{Brand, Nav, Shell};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Largest JSON answer of an API handler read back into a page.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;
/// Audit entries per page.
const AUDIT_PAGE: usize = 100;

/// The pages and form actions of this module.
pub fn routes(routes: super::Routes) -> super::Routes {
    routes
        .page(MethodFilter::GET, gantry_dashboards::ADMIN_SCRIPT_PATH, script)
        .page(MethodFilter::GET, "/orgs", orgs_page)
        .page(MethodFilter::POST, "/orgs", create_org_form)
        .page(MethodFilter::POST, "/orgs/{org}/status", org_status_form)
        .page(MethodFilter::GET, "/deployments", deployments_page)
        .page(MethodFilter::POST, "/orgs/{org}/deployments", create_deployment_form)
        .page(MethodFilter::GET, "/deployments/{id}", deployment_page)
        .page(MethodFilter::POST, "/deployments/{id}/rollback", rollback_form)
        .page(MethodFilter::GET, "/usage", usage_page)
        .page(MethodFilter::GET, "/plans", plans_page)
        .page(MethodFilter::POST, "/plans", create_plan_form)
        .page(MethodFilter::POST, "/plans/{id}", change_plan_form)
        .page(MethodFilter::GET, "/audit", audit_page)
        .page(MethodFilter::GET, "/alerts", alerts_page)
        .page(MethodFilter::GET, "/users", users_page)
        .page(MethodFilter::POST, "/orgs/{org}/api-keys/{id}/revoke", revoke_key_form)
        .page(MethodFilter::POST, "/orgs/{org}/alerts/{id}/acknowledge", acknowledge_form)
        .page(MethodFilter::POST, "/orgs/{org}/silences", silence_form)
}

async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], gantry_dashboards::ADMIN_SCRIPT).into_response()
}

/// The signed-in caller of a page, or the response to send instead (the login page, or the
/// error that reading the session cookie met).
pub(super) fn signed_in(hub: &Hub, headers: &HeaderMap) -> Result<Principal, Box<Response>> {
    match super::pages::session_principal(hub, headers) {
        Ok(Some(principal)) => Ok(principal),
        Ok(None) => Err(Box::new(Redirect::to("/login").into_response())),
        Err(error) => Err(Box::new(error.into_response())),
    }
}

/// Whether the principal administers `org`, or with no org selected, any org: what decides
/// whether the navigation shows admin-only sections ([`Nav::admin_only`]).
pub(super) fn administers(principal: &Principal, org: Option<&str>) -> bool {
    match org {
        Some(org) => principal.check(org, Perm::Admin).is_ok(),
        None => principal.access.everywhere.has(Perm::Admin) || principal.access.orgs.values().any(|perms| perms.has(Perm::Admin)),
    }
}

/// Who is looking, where, and how the page is branded.
pub(super) struct Page {
    pub(super) principal: Principal,
    pub(super) org: Option<String>,
    brand: Brand,
    active: Nav,
}

impl Page {
    pub(super) fn new(hub: &Hub, principal: Principal, org: Option<String>, active: Nav) -> Page {
        let mut page = Page { principal, org: None, brand: Brand::default(), active };
        page.set_org(hub, org);
        page
    }

    /// The org the page is about, and so its brand (white-label per org).
    pub(super) fn set_org(&mut self, hub: &Hub, org: Option<String>) {
        self.brand = crate::branding::brand_for(hub, &self.principal, org.as_deref()).unwrap_or_else(|error| {
            tracing::warn!(%error, "reading the brand failed; showing the default");
            Brand::default()
        });
        self.org = org;
    }

    pub(super) fn shell<'a>(&'a self, flash: Option<&'a str>) -> Shell<'a> {
        Shell {
            user: &self.principal.name,
            operator: self.principal.operator,
            admin: administers(&self.principal, self.org.as_deref()),
            org: self.org.as_deref(),
            brand: &self.brand,
            active: self.active,
            flash,
        }
    }

    pub(super) fn html(&self, status: StatusCode, html: String) -> Response {
        (status, Html(html)).into_response()
    }

    /// A refusal as a page with the refusal's status and message.
    pub(super) fn error(&self, error: ApiError) -> Response {
        self.html(error.status, admin::error_page(&self.shell(None), error.status.as_u16(), &error.message))
    }
}

/// The JSON body of an API handler's answer.
pub(super) async fn answer_json(response: Response) -> ApiResult<Value> {
    let bytes = axum::body::to_bytes(response.into_body(), MAX_ANSWER_BYTES)
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "reading an answer failed"))?;
    serde_json::from_slice(&bytes).map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "an answer was not JSON"))
}

/// The org a page is about: the one asked for, else the caller's own, else the first the
/// caller can see. Whether the caller may see it is for the API handler to say.
pub(super) fn pick_org(hub: &Hub, principal: &Principal, asked: Option<String>) -> ApiResult<String> {
    if let Some(org) = asked.filter(|o| !o.is_empty()) {
        return Ok(org);
    }
    if let Some(org) = &principal.org {
        return Ok(org.clone());
    }
    hub.store
        .orgs()?
        .into_iter()
        .find(|o| principal.access.knows(&o.id))
        .map(|o| o.id)
        .ok_or_else(|| ApiError::not_found("org (create one on the Orgs page first)"))
}

/// A fixed message for `?done=` after a form action (never text from the query itself).
pub(super) fn flash(done: Option<&str>) -> Option<&'static str> {
    match done? {
        "org-created" => Some("Org created."),
        "status-changed" => Some("Subscription status changed."),
        "rolled-back" => Some("Rollback started: a new revision with the old spec."),
        "deployed" => Some("Deployment created; agents are applying it."),
        "plan-saved" => Some("Plan saved as a new version."),
        "acknowledged" => Some("Alert acknowledged."),
        "silenced" => Some("Silence created."),
        "key-revoked" => Some("API key revoked."),
        "password-changed" => Some("Password changed. Your other sessions were signed out."),
        "totp-on" => Some("Two-factor login is on. From now on, sign-ins ask for a code from your authenticator app."),
        "totp-off" => Some("Two-factor login is off."),
        "webhook-deleted" => Some("Webhook endpoint deleted."),
        "redelivered" => Some("Redelivery queued: a new delivery of the same event."),
        _ => None,
    }
}

pub(super) fn see_other(location: &str) -> Response {
    Redirect::to(location).into_response()
}

#[derive(Debug, Deserialize, Default)]
struct OrgQuery {
    org: Option<String>,
    done: Option<String>,
}

// ---------------------------------------------------------------- orgs

async fn orgs_view(hub: &Hub, principal: &Principal) -> ApiResult<OrgsView> {
    require_operator(principal, Perm::Admin)?;
    let mut orgs = Vec::new();
    for org in hub.store.orgs()? {
        let subscription = hub.store.subscription(&org.id)?;
        let (plan, status, period_end) = match &subscription {
            Some(s) => {
                let (_, end) = crate::billing::plans::period_containing(s.period_anchor_ms, crate::wall_ms());
                (format!("{} v{}", s.plan_id, s.plan_version), s.status.name().to_string(), rfc3339(end))
            }
            None => Default::default(),
        };
        orgs.push(OrgRow { id: org.id, name: org.name, agent_count: org.agent_count, agent_limit: org.agent_limit, plan, status, period_end });
    }
    let plans = hub.store.plans()?.into_iter().map(|p| p.id).collect();
    Ok(OrgsView { orgs, plans, ..OrgsView::default() })
}

async fn orgs_page(State(hub): State<Arc<Hub>>, headers: HeaderMap, Query(query): Query<OrgQuery>) -> Response {
    let principal = match signed_in(&hub, &headers) {
        Ok(p) => p,
        Err(redirect) => return *redirect,
    };
    let page = Page::new(&hub, principal, None, Nav::Orgs);
    match orgs_view(&hub, &page.principal).await {
        Ok(view) => page.html(StatusCode::OK, admin::orgs_page(&page.shell(flash(query.done.as_deref())), &view)),
        Err(e) => page.error(e),
    }
}

#[derive(Debug, Deserialize)]
struct OrgForm {
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    plan: String,
}

async fn create_org_form(State(hub): State<Arc<Hub>>, principal: Principal, Form(form): Form<OrgForm>) -> Response {
    let page = Page::new(&hub, principal.clone(), None, Nav::Orgs);
    let id = form.id.trim().to_string();
    let body = super::CreateOrg { id: id.clone(), name: Some(form.name.trim().to_string()).filter(|n| !n.is_empty()), agent_limit: None, retention_days: None };
    let mut result = super::create_org(State(hub.clone()), principal.clone(), ApiJson(body)).await.map(|_| ());
    if result.is_ok() && !form.plan.is_empty() {
        let request = billing::SubscribeRequest { plan: form.plan.clone() };
        result = billing::put_subscription(State(hub.clone()), principal, Path(id.clone()), ApiJson(request)).await.map(|_| ());
    }
    match result {
        Ok(()) => see_other("/orgs?done=org-created"),
        Err(error) => match orgs_view(&hub, &page.principal).await {
            Ok(view) => {
                let status = error.status;
                let view = OrgsView { error: Some(error.message), form_id: form.id, form_name: form.name, ..view };
                page.html(status, admin::orgs_page(&page.shell(None), &view))
            }
            Err(e) => page.error(e),
        },
    }
}

#[derive(Debug, Deserialize)]
struct StatusForm {
    status: String,
}

async fn org_status_form(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>, Form(form): Form<StatusForm>) -> Response {
    let page = Page::new(&hub, principal.clone(), Some(org.clone()), Nav::Orgs);
    let status = match serde_json::from_value(json!(form.status)) {
        Ok(status) => status,
        Err(_) => return page.error(ApiError::bad_request("status must be suspended, active or canceled")),
    };
    match billing::set_status(State(hub), principal, Path(org), ApiJson(billing::StatusRequest { status })).await {
        Ok(_) => see_other("/orgs?done=status-changed"),
        Err(e) => page.error(e),
    }
}

// ---------------------------------------------------------------- deployments

/// Targets as text: agent ids, then `key=value` selectors.
fn targets_text(targets: &Value) -> String {
    let mut parts: Vec<String> = targets["agents"].as_array().into_iter().flatten().filter_map(Value::as_str).map(String::from).collect();
    if let Some(selector) = targets["selector"].as_object() {
        parts.extend(selector.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())));
    }
    parts.join(", ")
}

/// Parse the form's targets: `key=value` items are label selectors, the others agent ids.
fn parse_targets(text: &str) -> Targets {
    let mut targets = Targets::default();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item.split_once('=') {
            Some((key, value)) => {
                targets.selector.insert(key.trim().to_string(), value.trim().to_string());
            }
            None => targets.agents.push(item.to_string()),
        }
    }
    targets
}

async fn deployments_view(hub: &Arc<Hub>, principal: &Principal, org: &str) -> ApiResult<DeploymentsView> {
    let Json(list) = deployments::list(State(hub.clone()), principal.clone(), Path(org.to_string())).await?;
    let rows = list["deployments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["deleted_at"].is_null())
        .map(|d| {
            let revision = d["revision"].as_u64().unwrap_or(0);
            let targeted = d["target_agents"].as_array().map_or(0, Vec::len);
            let healthy = d["agents"].as_object().map_or(0, |m| m.values().filter(|s| s["state"] == "healthy" && s["revision"] == revision).count());
            DeploymentRow {
                id: d["id"].as_str().unwrap_or_default().into(),
                name: d["name"].as_str().unwrap_or_default().into(),
                revision,
                targets: targets_text(&d["targets"]),
                healthy,
                total: targeted,
                updated_at: d["updated_at"].as_str().unwrap_or_default().into(),
            }
        })
        .collect();
    let agents = hub.store.agents_of_org(org)?.into_iter().filter(|a| a.revoked_at_ms.is_none()).map(|a| (a.id, a.hostname)).collect();
    let can_deploy = super::authorize(principal, org, Perm::Deploy, "org").is_ok();
    Ok(DeploymentsView { org: org.to_string(), deployments: rows, can_deploy, agents, ..DeploymentsView::default() })
}

async fn deployments_page(State(hub): State<Arc<Hub>>, headers: HeaderMap, Query(query): Query<OrgQuery>) -> Response {
    let principal = match signed_in(&hub, &headers) {
        Ok(p) => p,
        Err(redirect) => return *redirect,
    };
    let mut page = Page::new(&hub, principal, query.org.clone(), Nav::Deployments);
    let org = match pick_org(&hub, &page.principal, query.org) {
        Ok(org) => org,
        Err(e) => return page.error(e),
    };
    page.set_org(&hub, Some(org.clone()));
    match deployments_view(&hub, &page.principal, &org).await {
        Ok(view) => page.html(StatusCode::OK, gantry_dashboards::deploy::deployments_page(&page.shell(None), &view)),
        Err(e) => page.error(e),
    }
}

#[derive(Debug, Deserialize, Default)]
struct DeploymentForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    command: String,
    #[serde(default)]
    targets: String,
    #[serde(default)]
    spec: String,
}

/// The request a create form stands for: the pasted spec if there is one, else a
/// one-service spec from the fields.
fn deployment_request(form: &DeploymentForm) -> ApiResult<deployments::DeploymentRequest> {
    let spec = if form.spec.trim().is_empty() {
        let mut service = json!({ "name": "app", "image": form.image.trim() });
        if !form.command.trim().is_empty() {
            service["command"] = json!(["sh", "-c", form.command.trim()]);
        }
        serde_json::from_value(json!({ "name": form.name.trim(), "services": [service] }))
    } else {
        serde_json::from_str(&form.spec)
    };
    let spec = spec.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_spec", format!("the spec is not valid: {e}")))?;
    Ok(deployments::DeploymentRequest { spec, targets: parse_targets(&form.targets) })
}

async fn create_deployment_form(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>, Form(form): Form<DeploymentForm>) -> Response {
    let page = Page::new(&hub, principal.clone(), Some(org.clone()), Nav::Deployments);
    let created = match deployment_request(&form) {
        Ok(request) => match deployments::create(State(hub.clone()), principal, Path(org.clone()), ApiJson(request)).await {
            Ok(response) => answer_json(response).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    match created {
        Ok(body) => see_other(&format!("/deployments/{}?done=deployed", body["id"].as_str().unwrap_or_default())),
        Err(error) => match deployments_view(&hub, &page.principal, &org).await {
            Ok(view) => {
                let status = error.status;
                let form = DeployForm { name: form.name, image: form.image, command: form.command, targets: form.targets, spec: form.spec };
                let view = DeploymentsView { error: Some(error.message), form, ..view };
                page.html(status, gantry_dashboards::deploy::deployments_page(&page.shell(None), &view))
            }
            // Not the caller's org (or none such): the refusal of the view, a 404.
            Err(e) => page.error(e),
        },
    }
}

/// The value at a path like `spec.services[0].image` (as `changed_paths` writes them).
fn value_at<'a>(root: &'a Value, path: &str) -> &'a Value {
    let mut value = root;
    for part in path.split('.') {
        let (key, indexes) = part.split_once('[').map_or((part, ""), |(k, rest)| (k, rest));
        if !key.is_empty() {
            value = value.get(key).unwrap_or(&Value::Null);
        }
        for index in indexes.split('[').filter(|s| !s.is_empty()) {
            let i: usize = index.trim_end_matches(']').parse().unwrap_or(usize::MAX);
            value = value.get(i).unwrap_or(&Value::Null);
        }
    }
    value
}

/// What changed from one revision (`{spec, targets}`) to the next.
fn diff(old: &Value, new: &Value) -> Vec<DiffLine> {
    deployments::changed_paths(old, new)
        .into_iter()
        .map(|path| DiffLine { before: value_at(old, &path).to_string(), after: value_at(new, &path).to_string(), path })
        .collect()
}

async fn deployment_detail(hub: &Arc<Hub>, principal: &Principal, id: &str) -> ApiResult<DeploymentDetail> {
    let Json(d) = deployments::get(State(hub.clone()), principal.clone(), Path(id.to_string())).await?;
    let Json(history) = deployments::revisions(State(hub.clone()), principal.clone(), Path(id.to_string())).await?;
    let org = d["org"].as_str().unwrap_or_default().to_string();
    let revision = d["revision"].as_u64().unwrap_or(0);
    let statuses = d["agents"].as_object().cloned().unwrap_or_default();
    let mut agent_ids: Vec<String> = d["target_agents"].as_array().into_iter().flatten().filter_map(Value::as_str).map(String::from).collect();
    // Agents that reported but are no longer targeted still show what they did.
    for agent in statuses.keys() {
        if !agent_ids.contains(agent) {
            agent_ids.push(agent.clone());
        }
    }
    let mut agents = Vec::new();
    for agent in agent_ids {
        let hostname = hub.store.agent(&agent)?.map(|a| a.hostname).unwrap_or_default();
        let s = statuses.get(&agent);
        agents.push(AgentProgress {
            hostname,
            revision: s.and_then(|s| s["revision"].as_u64()),
            state: s.and_then(|s| s["state"].as_str()).unwrap_or("pending").to_string(),
            message: s.and_then(|s| s["message"].as_str()).unwrap_or_default().to_string(),
            updated_at: s.and_then(|s| s["updated_at"].as_str()).unwrap_or_default().to_string(),
            agent,
        });
    }
    let list = history["revisions"].as_array().cloned().unwrap_or_default();
    let mut revisions = Vec::new();
    for (i, r) in list.iter().enumerate() {
        let this = json!({ "spec": r["spec"], "targets": r["targets"] });
        let changes = match i.checked_sub(1).and_then(|p| list.get(p)) {
            Some(p) => diff(&json!({ "spec": p["spec"], "targets": p["targets"] }), &this),
            None => Vec::new(),
        };
        revisions.push(RevisionRow {
            revision: r["revision"].as_u64().unwrap_or(0),
            change: r["change"].as_str().unwrap_or_default().into(),
            created_by: r["created_by"].as_str().unwrap_or_default().into(),
            created_at: r["created_at"].as_str().unwrap_or_default().into(),
            diff: changes,
        });
    }
    revisions.sort_by_key(|r| std::cmp::Reverse(r.revision));
    let rollout = d["rollout"].as_object().map(|r| {
        let state = r.get("state").and_then(Value::as_str).unwrap_or_default();
        match r.get("reason").and_then(Value::as_str) {
            Some(reason) => format!("{state}: {reason}"),
            None => state.to_string(),
        }
    });
    Ok(DeploymentDetail {
        id: id.to_string(),
        can_deploy: super::authorize(principal, &org, Perm::Deploy, "org").is_ok(),
        org,
        name: d["name"].as_str().unwrap_or_default().into(),
        revision,
        targets: targets_text(&d["targets"]),
        deleted: !d["deleted_at"].is_null(),
        rollout,
        agents,
        revisions,
        spec_json: serde_json::to_string_pretty(&d["spec"]).unwrap_or_default(),
        error: None,
    })
}

async fn deployment_page(State(hub): State<Arc<Hub>>, headers: HeaderMap, Path(id): Path<String>, Query(query): Query<OrgQuery>) -> Response {
    let principal = match signed_in(&hub, &headers) {
        Ok(p) => p,
        Err(redirect) => return *redirect,
    };
    let mut page = Page::new(&hub, principal, None, Nav::Deployments);
    match deployment_detail(&hub, &page.principal, &id).await {
        Ok(view) => {
            page.set_org(&hub, Some(view.org.clone()));
            page.html(StatusCode::OK, gantry_dashboards::deploy::deployment_page(&page.shell(flash(query.done.as_deref())), &view))
        }
        Err(e) => page.error(e),
    }
}

#[derive(Debug, Deserialize)]
struct RollbackForm {
    revision: String,
}

async fn rollback_form(State(hub): State<Arc<Hub>>, principal: Principal, Path(id): Path<String>, Form(form): Form<RollbackForm>) -> Response {
    let mut page = Page::new(&hub, principal.clone(), None, Nav::Deployments);
    let Ok(revision) = form.revision.trim().parse::<u64>() else {
        return page.error(ApiError::bad_request("revision must be a revision number"));
    };
    let request = deployments::RollbackRequest { revision: Some(revision) };
    match deployments::rollback(State(hub.clone()), principal, Path(id.clone()), ApiJson(request)).await {
        Ok(_) => see_other(&format!("/deployments/{id}?done=rolled-back")),
        Err(error) => match deployment_detail(&hub, &page.principal, &id).await {
            Ok(view) => {
                page.set_org(&hub, Some(view.org.clone()));
                let status = error.status;
                let view = DeploymentDetail { error: Some(error.message), ..view };
                page.html(status, gantry_dashboards::deploy::deployment_page(&page.shell(None), &view))
            }
            Err(e) => page.error(e),
        },
    }
}

// ---------------------------------------------------------------- usage and billing

/// Usage per meter per UTC day from the ledger export's entries.
fn meter_series(export: &Value) -> Vec<MeterSeries> {
    let mut by_meter: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for entry in export["entries"].as_array().into_iter().flatten() {
        let meter = entry["meter"].as_str().unwrap_or_default().to_string();
        let day = entry["hour_start"].as_str().unwrap_or_default().chars().take(10).collect::<String>();
        *by_meter.entry(meter).or_default().entry(day).or_default() += entry["quantity"].as_i64().unwrap_or(0);
    }
    let org_totals = export["totals"].as_object().and_then(|t| t.values().next()).cloned().unwrap_or(Value::Null);
    by_meter
        .into_iter()
        .map(|(meter, days)| MeterSeries {
            total: org_totals[&meter].as_i64().unwrap_or_else(|| days.values().sum()),
            points: days.into_iter().collect(),
            meter,
        })
        .collect()
}

fn invoice_view(id: &str, value: &Value) -> InvoiceView {
    let invoice = &value["invoice"];
    InvoiceView {
        id: id.to_string(),
        period_start: value["period"]["start"].as_str().unwrap_or_default().into(),
        period_end: value["period"]["end"].as_str().unwrap_or_default().into(),
        currency: invoice["currency"].as_str().unwrap_or_default().into(),
        total_minor: invoice["total_minor"].as_i64().unwrap_or(0),
        lines: invoice["lines"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| InvoiceLineRow {
                description: l["description"].as_str().unwrap_or_default().into(),
                quantity: l["quantity"].as_u64().unwrap_or(0),
                included: l["included"].as_u64().unwrap_or(0),
                billable: l["billable"].as_u64().unwrap_or(0),
                amount_minor: l["amount_minor"].as_i64().unwrap_or(0),
            })
            .collect(),
    }
}

async fn usage_view(hub: &Arc<Hub>, principal: &Principal, org: &str) -> ApiResult<UsageView> {
    let query = billing_usage::UsageQuery { org: Some(org.to_string()), ..billing_usage::UsageQuery::default() };
    let export = answer_json(billing_usage::export(State(hub.clone()), principal.clone(), ApiQuery(query)).await?).await?;
    let mut view = UsageView {
        org: org.to_string(),
        from: export["from_ms"].as_i64().map(rfc3339).unwrap_or_default(),
        to: export["to_ms"].as_i64().map(rfc3339).unwrap_or_default(),
        meters: meter_series(&export),
        ..UsageView::default()
    };
    // Without a subscription there is no invoice to show; that is not an error.
    match billing::get_subscription(State(hub.clone()), principal.clone(), Path(org.to_string())).await {
        Ok(Json(s)) => {
            view.subscription = format!("{} v{} · {}", s["plan_id"].as_str().unwrap_or_default(), s["plan_version"], s["status"].as_str().unwrap_or_default())
        }
        Err(e) if e.status == StatusCode::NOT_FOUND => return Ok(view),
        Err(e) => return Err(e),
    }
    match billing::preview(State(hub.clone()), principal.clone(), Path(org.to_string())).await {
        Ok(Json(preview)) => view.preview = Some(invoice_view("", &preview)),
        Err(e) => view.error = Some(e.message),
    }
    let Json(closed) = billing::list_invoices(State(hub.clone()), principal.clone(), Path(org.to_string())).await?;
    view.invoices = closed["invoices"].as_array().into_iter().flatten().map(|i| invoice_view(i["id"].as_str().unwrap_or_default(), i)).collect();
    Ok(view)
}

async fn usage_page(State(hub): State<Arc<Hub>>, headers: HeaderMap, Query(query): Query<OrgQuery>) -> Response {
    let principal = match signed_in(&hub, &headers) {
        Ok(p) => p,
        Err(redirect) => return *redirect,
    };
    let mut page = Page::new(&hub, principal, query.org.clone(), Nav::Usage);
    let org = match pick_org(&hub, &page.principal, query.org) {
        Ok(org) => org,
        Err(e) => return page.error(e),
    };
    page.set_org(&hub, Some(org.clone()));
    match usage_view(&hub, &page.principal, &org).await {
        Ok(view) => page.html(StatusCode::OK, gantry_dashboards::billing::usage_page(&page.shell(None), &view)),
        Err(e) => page.error(e),
    }
}

fn plan_rows(hub: &Hub) -> ApiResult<Vec<PlanRow>> {
    Ok(hub
        .store
        .plans()?
        .into_iter()
        .map(|p| {
            let request = json!({ "name": p.name, "prices": p.prices, "limits": p.limits, "trial": p.trial, "stripe_price_id": p.stripe_price_id });
            PlanRow { json: serde_json::to_string_pretty(&request).unwrap_or_default(), id: p.id, version: p.version, name: p.name }
        })
        .collect())
}

fn plans_response(hub: &Hub, page: &Page, status: StatusCode, error: Option<&str>, draft: (&str, &str), done: Option<&str>) -> Response {
    if let Err(e) = require_operator(&page.principal, Perm::Admin) {
        return page.error(e);
    }
    match plan_rows(hub) {
        Ok(rows) => page.html(status, gantry_dashboards::billing::plans_page(&page.shell(flash(done)), &rows, error, draft)),
        Err(e) => page.error(e),
    }
}

async fn plans_page(State(hub): State<Arc<Hub>>, headers: HeaderMap, Query(query): Query<OrgQuery>) -> Response {
    let principal = match signed_in(&hub, &headers) {
        Ok(p) => p,
        Err(redirect) => return *redirect,
    };
    let page = Page::new(&hub, principal, None, Nav::Usage);
    plans_response(&hub, &page, StatusCode::OK, None, ("", ""), query.done.as_deref())
}

#[derive(Debug, Deserialize)]
struct PlanForm {
    #[serde(default)]
    id: String,
    plan: String,
}

fn plan_request(text: &str) -> ApiResult<crate::billing::plans::PlanRequest> {
    serde_json::from_str(text).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_plan", format!("the plan is not valid: {e}")))
}

async fn create_plan_form(State(hub): State<Arc<Hub>>, principal: Principal, Form(form): Form<PlanForm>) -> Response {
    let page = Page::new(&hub, principal.clone(), None, Nav::Usage);
    let result = match plan_request(&form.plan) {
        Ok(plan) => billing::create_plan(State(hub.clone()), principal, ApiJson(billing::NewPlan { id: form.id.trim().to_string(), plan })).await.map(|_| ()),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => see_other("/plans?done=plan-saved"),
        Err(e) => plans_response(&hub, &page, e.status, Some(&e.message), (&form.id, &form.plan), None),
    }
}

async fn change_plan_form(State(hub): State<Arc<Hub>>, principal: Principal, Path(id): Path<String>, Form(form): Form<PlanForm>) -> Response {
    let page = Page::new(&hub, principal.clone(), None, Nav::Usage);
    let result = match plan_request(&form.plan) {
        Ok(plan) => billing::change_plan(State(hub.clone()), principal, Path(id), ApiJson(plan)).await.map(|_| ()),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => see_other("/plans?done=plan-saved"),
        Err(e) => plans_response(&hub, &page, e.status, Some(&e.message), ("", ""), None),
    }
}

// ---------------------------------------------------------------- audit log

#[derive(Debug, Deserialize, Default)]
struct AuditPageQuery {
    org: Option<String>,
    #[serde(default)]
    actor: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    cursor: Option<String>,
}

async fn audit_page(State(hub): State<Arc<Hub>>, headers: HeaderMap, Query(query): Query<AuditPageQuery>) -> Response {
    let principal = match signed_in(&hub, &headers) {
        Ok(p) => p,
        Err(redirect) => return *redirect,
    };
    // Operators read the whole log unless they pick an org; members read their org's.
    let org = match &query.org {
        Some(org) if !org.is_empty() => Some(org.clone()),
        _ if principal.operator => None,
        _ => principal.org.clone().or_else(|| pick_org(&hub, &principal, None).ok()),
    };
    let page = Page::new(&hub, principal, org.clone(), Nav::Audit);
    let mut filter = serde_json::Map::new();
    filter.insert("limit".into(), json!(AUDIT_PAGE));
    for (key, value) in [("actor", &query.actor), ("action", &query.action), ("from", &query.from), ("to", &query.to)] {
        if !value.trim().is_empty() {
            filter.insert(key.into(), json!(value.trim()));
        }
    }
    if let Some(cursor) = &query.cursor {
        filter.insert("cursor".into(), json!(cursor));
    }
    let mut view = AuditView { org: org.clone(), actor: query.actor, action: query.action, from: query.from, to: query.to, ..AuditView::default() };
    let answer = match serde_json::from_value::<audit::AuditQuery>(Value::Object(filter)) {
        Ok(q) => match &org {
            Some(org) => audit::org_log(State(hub.clone()), page.principal.clone(), Path(org.clone()), ApiQuery(q)).await,
            None => audit::all(State(hub.clone()), page.principal.clone(), ApiQuery(q)).await,
        },
        Err(e) => Err(ApiError::bad_request(e.to_string())),
    };
    let answer = match answer {
        Ok(response) => answer_json(response).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(body) => {
            view.next_cursor = body["next_cursor"].as_str().map(String::from);
            view.entries = body["entries"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| AuditRow {
                    at: e["at"].as_str().unwrap_or_default().into(),
                    actor: e["actor"].as_str().unwrap_or_default().into(),
                    action: e["action"].as_str().unwrap_or_default().into(),
                    target: e["target"]
                        .as_object()
                        .map(|t| t.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(" "))
                        .unwrap_or_default(),
                    outcome: e["outcome"].as_str().unwrap_or_default().into(),
                    client_ip: e["client_ip"].as_str().unwrap_or_default().into(),
                })
                .collect();
        }
        // A bad filter is shown above the (empty) list; not being allowed is a refusal page.
        Err(e) if e.status == StatusCode::BAD_REQUEST => view.error = Some(e.message),
        Err(e) => return page.error(e),
    }
    page.html(StatusCode::OK, admin::audit_page(&page.shell(None), &view))
}

// ---------------------------------------------------------------- alerts

#[derive(Debug, Deserialize, Default)]
struct AlertsPageQuery {
    org: Option<String>,
    status: Option<String>,
    done: Option<String>,
}

async fn alerts_view(hub: &Arc<Hub>, principal: &Principal, org: &str, status: &str) -> ApiResult<AlertsView> {
    let query = health::AlertsQuery { status: Some(status.to_string()), rule: None, agent: None };
    let Json(list) = health::list_alerts(State(hub.clone()), principal.clone(), Path(org.to_string()), ApiQuery(query)).await?;
    let text = |v: &Value, key: &str| v[key].as_str().unwrap_or_default().to_string();
    let alerts = list["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| AlertRow {
            id: text(a, "id"),
            rule: text(a, "rule"),
            severity: text(a, "severity"),
            summary: text(a, "summary"),
            status: text(a, "status"),
            agent: text(a, "agent"),
            started_at: text(a, "started_at"),
            acknowledged_by: text(a, "acknowledged_by"),
        })
        .collect();
    Ok(AlertsView {
        org: org.to_string(),
        status: status.to_string(),
        alerts,
        rules: health::RULES.iter().map(|r| r.to_string()).collect(),
        can_act: super::authorize(principal, org, Perm::Deploy, "org").is_ok(),
        error: None,
    })
}

async fn alerts_page(State(hub): State<Arc<Hub>>, headers: HeaderMap, Query(query): Query<AlertsPageQuery>) -> Response {
    let principal = match signed_in(&hub, &headers) {
        Ok(p) => p,
        Err(redirect) => return *redirect,
    };
    let mut page = Page::new(&hub, principal, query.org.clone(), Nav::Alerts);
    let org = match pick_org(&hub, &page.principal, query.org) {
        Ok(org) => org,
        Err(e) => return page.error(e),
    };
    page.set_org(&hub, Some(org.clone()));
    let status = query.status.filter(|s| !s.is_empty()).unwrap_or_else(|| "open".to_string());
    match alerts_view(&hub, &page.principal, &org, &status).await {
        Ok(view) => page.html(StatusCode::OK, gantry_dashboards::alerts::alerts_page(&page.shell(flash(query.done.as_deref())), &view)),
        Err(e) => page.error(e),
    }
}

async fn acknowledge_form(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, id)): Path<(String, String)>) -> Response {
    let page = Page::new(&hub, principal.clone(), Some(org.clone()), Nav::Alerts);
    match health::acknowledge_alert(State(hub.clone()), principal, Path((org.clone(), id))).await {
        Ok(_) => see_other(&format!("/alerts?org={}&done=acknowledged", gantry_dashboards::layout::query_escape(&org))),
        Err(e) => page.error(e),
    }
}

#[derive(Debug, Deserialize)]
struct SilenceForm {
    #[serde(default)]
    rule: String,
    #[serde(default)]
    agent: String,
    #[serde(default)]
    duration: String,
    #[serde(default)]
    reason: String,
}

async fn silence_form(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>, Form(form): Form<SilenceForm>) -> Response {
    let page = Page::new(&hub, principal.clone(), Some(org.clone()), Nav::Alerts);
    let given = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
    let request = health::SilenceRequest {
        rule: given(&form.rule),
        agent: given(&form.agent),
        check: None,
        deployment: None,
        reason: form.reason.trim().to_string(),
        expires_at: None,
        duration: given(&form.duration),
    };
    match health::create_silence(State(hub.clone()), principal, Path(org.clone()), ApiJson(request)).await {
        Ok(_) => see_other(&format!("/alerts?org={}&done=silenced", gantry_dashboards::layout::query_escape(&org))),
        Err(error) => match alerts_view(&hub, &page.principal, &org, "open").await {
            Ok(view) => {
                let status = error.status;
                page.html(status, gantry_dashboards::alerts::alerts_page(&page.shell(None), &AlertsView { error: Some(error.message), ..view }))
            }
            Err(e) => page.error(e),
        },
    }
}

// ---------------------------------------------------------------- users and API keys

async fn users_view(hub: &Arc<Hub>, principal: &Principal, org: &str) -> ApiResult<UsersView> {
    let Json(list) = accounts::list_members(State(hub.clone()), principal.clone(), Path(org.to_string())).await?;
    let text = |v: &Value, key: &str| v[key].as_str().unwrap_or_default().to_string();
    let members = list["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| MemberRow { email: text(m, "email"), role: text(m, "role"), added_at: text(m, "added_at"), disabled: m["disabled"] == true })
        .collect();
    // Keys need the admin permission; members without it see the members only.
    let keys = match accounts::list_org_keys(State(hub.clone()), principal.clone(), Path(org.to_string())).await {
        Ok(Json(keys)) => Some(
            keys["api_keys"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|k| KeyRow {
                    id: text(k, "id"),
                    name: text(k, "name"),
                    scopes: k["scopes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect::<Vec<_>>().join(", "),
                    created_by: text(k, "created_by"),
                    last_used_at: text(k, "last_used_at"),
                    state: if k["revoked"] == true {
                        "revoked"
                    } else if k["expired"] == true {
                        "expired"
                    } else {
                        "active"
                    }
                    .to_string(),
                })
                .collect(),
        ),
        Err(e) if e.status == StatusCode::FORBIDDEN => None,
        Err(e) => return Err(e),
    };
    Ok(UsersView { org: org.to_string(), members, can_admin: keys.is_some(), keys })
}

async fn users_page(State(hub): State<Arc<Hub>>, headers: HeaderMap, Query(query): Query<OrgQuery>) -> Response {
    let principal = match signed_in(&hub, &headers) {
        Ok(p) => p,
        Err(redirect) => return *redirect,
    };
    let mut page = Page::new(&hub, principal, query.org.clone(), Nav::Users);
    let org = match pick_org(&hub, &page.principal, query.org) {
        Ok(org) => org,
        Err(e) => return page.error(e),
    };
    page.set_org(&hub, Some(org.clone()));
    match users_view(&hub, &page.principal, &org).await {
        Ok(view) => page.html(StatusCode::OK, admin::users_page(&page.shell(flash(query.done.as_deref())), &view)),
        Err(e) => page.error(e),
    }
}

async fn revoke_key_form(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, id)): Path<(String, String)>) -> Response {
    let page = Page::new(&hub, principal.clone(), Some(org.clone()), Nav::Users);
    match accounts::revoke_org_key(State(hub.clone()), principal, Path((org.clone(), id))).await {
        Ok(_) => see_other(&format!("/users?org={}&done=key-revoked", gantry_dashboards::layout::query_escape(&org))),
        Err(e) => page.error(e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn targets_round_trip_through_text() {
        let targets = parse_targets(" agt_1, env=prod ,agt_2,, tier = web");
        assert_eq!(targets.agents, vec!["agt_1", "agt_2"]);
        assert_eq!(targets.selector.get("env").map(String::as_str), Some("prod"));
        assert_eq!(targets.selector.get("tier").map(String::as_str), Some("web"));
        assert_eq!(targets_text(&json!(targets)), "agt_1, agt_2, env=prod, tier=web");
    }

    #[test]
    fn diff_names_paths_with_both_values() {
        let old = json!({ "spec": { "services": [{ "image": "a:1", "env": [] }] } });
        let new = json!({ "spec": { "services": [{ "image": "a:2", "env": [] }] }, "targets": { "agents": ["x"] } });
        let lines = diff(&old, &new);
        assert_eq!(lines[0], DiffLine { path: "spec.services[0].image".into(), before: "\"a:1\"".into(), after: "\"a:2\"".into() });
        assert_eq!(lines[1].path, "targets");
        assert_eq!(lines[1].before, "null");
    }

    #[test]
    fn a_form_without_a_spec_makes_a_one_service_spec() {
        let form = DeploymentForm { name: "web".into(), image: "app:1".into(), command: "httpd -f".into(), targets: "agt_1".into(), spec: String::new() };
        let request = deployment_request(&form).unwrap();
        assert_eq!(request.spec.services[0].command.as_deref(), Some(&["sh".to_string(), "-c".into(), "httpd -f".into()][..]));
        let bad = DeploymentForm { spec: "{\"name\": 3}".into(), ..DeploymentForm::default() };
        let error = deployment_request(&bad).unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert!(error.message.starts_with("the spec is not valid"), "{}", error.message);
    }
}
