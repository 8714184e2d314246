//! Dashboard pages for the signed-in account (`/account`: memberships, password change,
//! two-factor login, sign out) and for an org's webhooks (`/webhooks`: endpoints, their
//! delivery log, redelivery, create and delete).
//!
//! Like `pages_admin`, every page and form goes through the JSON API's own handlers
//! (`password::change_password`, `mfa::enrol`, `webhooks::redeliver`, ...) with the
//! caller's principal, so a page can neither see nor do more than the API allows; this
//! module only turns forms into request bodies and answers into view data. Forms post and
//! redirect with a fixed flash message; an error shows the page again with the API's
//! status and message next to the form. The webhook pages need the admin permission, like
//! the webhook API: anyone else gets the refusal page. Form posts are audited like API
//! calls (see `audit::is_audited`).

use super::limits::{self, ClientIp};
use super::pages_admin::{answer_json, flash, pick_org, see_other, signed_in, Page};
use super::{accounts, mfa, password, session_cookie_value, webhooks, ApiError, ApiJson, ApiQuery, ApiResult};
use crate::auth::Principal;
use crate::Hub;
use axum::extract::{Path, Query, State};
use axum::http::header::HeaderMap;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::MethodFilter;
use axum::{Form, Json};
use gantry_dashboards::account::{self, AccountView, MembershipRow, TotpEnrolment, TotpState};
use gantry_dashboards::layout::{query_escape, Nav};
use gantry_dashboards::webhooks::{self as views, CreatedWebhook, DeliveriesView, DeliveryRow, LastDelivery, WebhookRow, WebhooksView};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

/// The pages and form actions of this module.
pub(crate) fn routes(routes: super::Routes) -> super::Routes {
    routes
        .page(MethodFilter::GET, "/account", account_page)
        .page(MethodFilter::POST, "/account/password", password_form)
        .page(MethodFilter::POST, "/account/totp", totp_start_form)
        .page(MethodFilter::POST, "/account/totp/confirm", totp_confirm_form)
        .page(MethodFilter::POST, "/account/totp/disable", totp_disable_form)
        .page(MethodFilter::GET, "/webhooks", webhooks_page)
        .page(MethodFilter::GET, "/webhooks/{id}", deliveries_page)
        .page(MethodFilter::POST, "/orgs/{org}/webhooks", create_webhook_form)
        .page(MethodFilter::POST, "/orgs/{org}/webhooks/{id}/delete", delete_webhook_form)
        .page(MethodFilter::POST, "/orgs/{org}/webhooks/{id}/deliveries/{delivery}/redeliver", redeliver_form)
}

fn text(value: &Value, key: &str) -> String {
    value[key].as_str().unwrap_or_default().to_string()
}

// ---------------------------------------------------------------- account

/// The account page's data; errors and a new enrolment are for the caller to add.
fn account_view(hub: &Hub, principal: &Principal) -> ApiResult<AccountView> {
    let me = accounts::me_view(hub, principal)?;
    let memberships = me["memberships"].as_array().into_iter().flatten().map(|m| MembershipRow { org: text(m, "org"), role: text(m, "role") }).collect();
    let totp = match hub.store.user_by_email(&principal.name)?.and_then(|u| u.totp) {
        None => TotpState::Off,
        Some(factor) if factor.enabled => TotpState::On,
        Some(_) => TotpState::Pending,
    };
    Ok(AccountView { email: principal.name.clone(), user_id: principal.id.clone(), operator: principal.operator, memberships, totp, ..AccountView::default() })
}

/// The account page with `status`, after `change` fills in what the action left to say.
fn account_response(hub: &Hub, page: &Page, status: StatusCode, done: Option<&str>, change: impl FnOnce(&mut AccountView)) -> Response {
    match account_view(hub, &page.principal) {
        Ok(mut view) => {
            change(&mut view);
            page.html(status, account::account_page(&page.shell(flash(done)), &view))
        }
        Err(e) => page.error(e),
    }
}

#[derive(Debug, Deserialize, Default)]
struct DoneQuery {
    done: Option<String>,
}

async fn account_page(State(hub): State<Arc<Hub>>, headers: HeaderMap, Query(query): Query<DoneQuery>) -> Response {
    let principal = match signed_in(&hub, &headers) {
        Ok(p) => p,
        Err(redirect) => return *redirect,
    };
    let page = Page::new(&hub, principal, None, Nav::Account);
    account_response(&hub, &page, StatusCode::OK, query.done.as_deref(), |_| {})
}

#[derive(Debug, Deserialize)]
struct PasswordForm {
    #[serde(default)]
    current_password: String,
    #[serde(default)]
    new_password: String,
    #[serde(default)]
    confirm_password: String,
}

async fn password_form(
    State(hub): State<Arc<Hub>>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    principal: Principal,
    Form(form): Form<PasswordForm>,
) -> Response {
    let page = Page::new(&hub, principal.clone(), None, Nav::Account);
    let result = if form.new_password != form.confirm_password {
        Err(ApiError::bad_request("the new password and its repetition differ; nothing was changed"))
    } else {
        let request = password::PasswordRequest { current_password: form.current_password, new_password: form.new_password };
        password::change_password(&hub, &principal, ip, session_cookie_value(&hub, &headers).as_deref(), request).await
    };
    match result {
        Ok(_) => see_other("/account?done=password-changed"),
        Err(error) => {
            let response = account_response(&hub, &page, error.status, None, |view| view.password_error = Some(error.message));
            limits::with_retry_after(response, error.retry_after_secs)
        }
    }
}

async fn totp_start_form(State(hub): State<Arc<Hub>>, principal: Principal) -> Response {
    let page = Page::new(&hub, principal.clone(), None, Nav::Account);
    let answer = match mfa::enrol(State(hub.clone()), principal).await {
        Ok(response) => answer_json(response).await,
        Err(e) => Err(e),
    };
    match answer {
        // The secret is shown in this answer only: no redirect.
        Ok(body) => account_response(&hub, &page, StatusCode::CREATED, None, |view| {
            view.enrolment = Some(TotpEnrolment { secret: text(&body, "secret"), otpauth_uri: text(&body, "otpauth_uri") });
        }),
        Err(error) => account_response(&hub, &page, error.status, None, |view| view.totp_error = Some(error.message)),
    }
}

#[derive(Debug, Deserialize)]
struct CodeForm {
    #[serde(default)]
    code: String,
}

async fn totp_confirm_form(State(hub): State<Arc<Hub>>, principal: Principal, Form(form): Form<CodeForm>) -> Response {
    let page = Page::new(&hub, principal.clone(), None, Nav::Account);
    match mfa::confirm(State(hub.clone()), principal, ApiJson(mfa::ConfirmRequest { code: form.code.trim().to_string() })).await {
        Ok(_) => see_other("/account?done=totp-on"),
        Err(error) => account_response(&hub, &page, error.status, None, |view| view.totp_error = Some(error.message)),
    }
}

#[derive(Debug, Deserialize)]
struct DisableForm {
    #[serde(default)]
    password: String,
}

async fn totp_disable_form(State(hub): State<Arc<Hub>>, client_ip: ClientIp, principal: Principal, Form(form): Form<DisableForm>) -> Response {
    let page = Page::new(&hub, principal.clone(), None, Nav::Account);
    let request = mfa::DisableRequest { code: None, password: Some(form.password) };
    match mfa::disable(State(hub.clone()), client_ip, principal, ApiJson(request)).await {
        Ok(_) => see_other("/account?done=totp-off"),
        Err(error) => {
            let response = account_response(&hub, &page, error.status, None, |view| view.totp_error = Some(error.message));
            limits::with_retry_after(response, error.retry_after_secs)
        }
    }
}

// ---------------------------------------------------------------- webhooks

/// An endpoint as the API shows it, without its latest delivery.
fn webhook_row(w: &Value) -> WebhookRow {
    WebhookRow {
        id: text(w, "id"),
        url: text(w, "url"),
        events: w["events"].as_array().into_iter().flatten().filter_map(Value::as_str).map(String::from).collect(),
        description: text(w, "description"),
        enabled: w["enabled"] == true,
        last: None,
    }
}

/// A delivery as the API shows it: its latest attempt decides the response code and error.
fn delivery_row(d: &Value) -> DeliveryRow {
    let attempts = d["attempts"].as_array().cloned().unwrap_or_default();
    let latest = attempts.last();
    let response_code = latest.and_then(|a| a["status_code"].as_u64()).and_then(|c| u16::try_from(c).ok());
    let error = latest.and_then(|a| a["error"].as_str()).or_else(|| d["failure"].as_str()).unwrap_or_default().to_string();
    DeliveryRow {
        id: text(d, "id"),
        event_type: text(d, "event_type"),
        status: text(d, "status"),
        attempts: attempts.len(),
        response_code,
        error,
        created_at: text(d, "created_at"),
        redelivery_of: text(d, "redelivery_of"),
    }
}

/// A page of an endpoint's delivery log through the API handler.
async fn delivery_page(hub: &Arc<Hub>, principal: &Principal, org: &str, id: &str, limit: Option<usize>, before: Option<String>) -> ApiResult<Value> {
    let query = webhooks::DeliveriesQuery { limit, before };
    let Json(page) = webhooks::deliveries(State(hub.clone()), principal.clone(), Path((org.to_string(), id.to_string())), ApiQuery(query)).await?;
    Ok(page)
}

async fn webhooks_view(hub: &Arc<Hub>, principal: &Principal, org: &str) -> ApiResult<WebhooksView> {
    let Json(list) = webhooks::list(State(hub.clone()), principal.clone(), Path(org.to_string())).await?;
    let mut rows = Vec::new();
    for w in list["webhooks"].as_array().into_iter().flatten() {
        let mut row = webhook_row(w);
        let latest = delivery_page(hub, principal, org, &row.id, Some(1), None).await?;
        row.last = latest["deliveries"].as_array().and_then(|d| d.first()).map(|d| {
            let d = delivery_row(d);
            LastDelivery { status: d.status, at: d.created_at, response_code: d.response_code }
        });
        rows.push(row);
    }
    Ok(WebhooksView {
        org: org.to_string(),
        webhooks: rows,
        event_types: crate::webhooks::EVENT_TYPES.iter().map(|e| e.to_string()).collect(),
        ..WebhooksView::default()
    })
}

#[derive(Debug, Deserialize, Default)]
struct WebhooksQuery {
    org: Option<String>,
    done: Option<String>,
    before: Option<String>,
}

/// The page about the org asked for (or the caller's), or the refusal to send instead.
fn org_page(hub: &Hub, headers: &HeaderMap, asked: Option<String>) -> Result<(Page, String), Box<Response>> {
    let principal = signed_in(hub, headers)?;
    let mut page = Page::new(hub, principal, asked.clone(), Nav::Webhooks);
    let org = pick_org(hub, &page.principal, asked).map_err(|e| Box::new(page.error(e)))?;
    page.set_org(hub, Some(org.clone()));
    Ok((page, org))
}

async fn webhooks_page(State(hub): State<Arc<Hub>>, headers: HeaderMap, Query(query): Query<WebhooksQuery>) -> Response {
    let (page, org) = match org_page(&hub, &headers, query.org) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    match webhooks_view(&hub, &page.principal, &org).await {
        Ok(view) => page.html(StatusCode::OK, views::webhooks_page(&page.shell(flash(query.done.as_deref())), &view)),
        Err(e) => page.error(e),
    }
}

async fn deliveries_view(hub: &Arc<Hub>, principal: &Principal, org: &str, id: &str, before: Option<String>) -> ApiResult<DeliveriesView> {
    let Json(webhook) = webhooks::get(State(hub.clone()), principal.clone(), Path((org.to_string(), id.to_string()))).await?;
    let before = before.filter(|b| !b.is_empty());
    let log = delivery_page(hub, principal, org, id, None, before).await?;
    Ok(DeliveriesView {
        org: org.to_string(),
        webhook: webhook_row(&webhook),
        deliveries: log["deliveries"].as_array().into_iter().flatten().map(delivery_row).collect(),
        next_before: log["next_before"].as_str().map(String::from),
        error: None,
    })
}

async fn deliveries_page(State(hub): State<Arc<Hub>>, headers: HeaderMap, Path(id): Path<String>, Query(query): Query<WebhooksQuery>) -> Response {
    let (page, org) = match org_page(&hub, &headers, query.org) {
        Ok(found) => found,
        Err(response) => return *response,
    };
    match deliveries_view(&hub, &page.principal, &org, &id, query.before).await {
        Ok(view) => page.html(StatusCode::OK, views::deliveries_page(&page.shell(flash(query.done.as_deref())), &view)),
        Err(e) => page.error(e),
    }
}

/// The create form: `url`, `description` and any number of `events` (checkboxes).
#[derive(Debug, Default)]
struct WebhookForm {
    url: String,
    events: Vec<String>,
    description: String,
}

impl WebhookForm {
    fn from_pairs(pairs: Vec<(String, String)>) -> WebhookForm {
        let mut form = WebhookForm::default();
        for (key, value) in pairs {
            match key.as_str() {
                "url" => form.url = value.trim().to_string(),
                "events" => form.events.push(value),
                "description" => form.description = value,
                _ => {}
            }
        }
        form
    }
}

async fn create_webhook_form(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>, Form(pairs): Form<Vec<(String, String)>>) -> Response {
    let page = Page::new(&hub, principal.clone(), Some(org.clone()), Nav::Webhooks);
    let form = WebhookForm::from_pairs(pairs);
    let request =
        webhooks::WebhookRequest { url: Some(form.url.clone()), events: Some(form.events.clone()), description: Some(form.description.clone()), enabled: None };
    let answer = match webhooks::create(State(hub.clone()), principal, Path(org.clone()), ApiJson(request)).await {
        Ok(response) => answer_json(response).await,
        Err(e) => Err(e),
    };
    let (status, created, error) = match answer {
        // The secret is shown in this answer only: no redirect.
        Ok(body) => (StatusCode::CREATED, Some(CreatedWebhook { id: text(&body, "id"), secret: text(&body, "secret") }), None),
        Err(e) if e.status == StatusCode::FORBIDDEN || e.status == StatusCode::NOT_FOUND => return page.error(e),
        Err(e) => (e.status, None, Some(e.message)),
    };
    match webhooks_view(&hub, &page.principal, &org).await {
        Ok(view) => {
            let view = if created.is_some() {
                WebhooksView { created, ..view }
            } else {
                WebhooksView { error, form_url: form.url, form_events: form.events, form_description: form.description, ..view }
            };
            page.html(status, views::webhooks_page(&page.shell(None), &view))
        }
        Err(e) => page.error(e),
    }
}

async fn delete_webhook_form(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, id)): Path<(String, String)>) -> Response {
    let page = Page::new(&hub, principal.clone(), Some(org.clone()), Nav::Webhooks);
    match webhooks::delete(State(hub.clone()), principal, Path((org.clone(), id))).await {
        Ok(_) => see_other(&format!("/webhooks?org={}&done=webhook-deleted", query_escape(&org))),
        Err(e) => page.error(e),
    }
}

async fn redeliver_form(State(hub): State<Arc<Hub>>, principal: Principal, Path((org, id, delivery)): Path<(String, String, String)>) -> Response {
    let page = Page::new(&hub, principal.clone(), Some(org.clone()), Nav::Webhooks);
    match webhooks::redeliver(State(hub.clone()), principal, Path((org.clone(), id.clone(), delivery))).await {
        Ok(_) => see_other(&format!("{}&done=redelivered", views::deliveries_href(&org, &id))),
        // A disabled endpoint or a pruned event: say so above the log.
        Err(error) if error.status == StatusCode::CONFLICT => match deliveries_view(&hub, &page.principal, &org, &id, None).await {
            Ok(view) => page.html(error.status, views::deliveries_page(&page.shell(None), &DeliveriesView { error: Some(error.message), ..view })),
            Err(e) => page.error(e),
        },
        Err(e) => page.error(e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_create_form_keeps_every_ticked_event() {
        let pairs =
            vec![("url".into(), " http://127.0.0.1:9/hook ".into()), ("events".into(), "agent.online".into()), ("events".into(), "alert.firing".into())];
        let form = WebhookForm::from_pairs(pairs);
        assert_eq!(form.url, "http://127.0.0.1:9/hook");
        assert_eq!(form.events, vec!["agent.online", "alert.firing"]);
    }

    #[test]
    fn a_delivery_row_reads_its_latest_attempt() {
        let delivery = json!({
            "id": "dlv_1", "event_type": "agent.online", "status": "failed", "created_at": "2026-01-01T00:00:00Z", "redelivery_of": null,
            "attempts": [{ "status_code": 503, "error": null }, { "status_code": null, "error": "connection refused" }],
        });
        let row = delivery_row(&delivery);
        assert_eq!((row.attempts, row.response_code, row.error.as_str(), row.redelivery_of.as_str()), (2, None, "connection refused", ""));
        let failed = json!({ "id": "dlv_2", "status": "failed", "attempts": [], "failure": "endpoint deleted" });
        assert_eq!(delivery_row(&failed).error, "endpoint deleted");
    }
}
