//! The dashboard's fleet pages (overview, agents, agent detail, enrollment), the served
//! assets (script, operator theme, org brand stylesheets and logos) and the branding API
//! `GET/PUT/DELETE /api/v1/orgs/{org}/branding`.
//!
//! Pages read the session cookie themselves (no session redirects to `/login`), scope
//! every read by the orgs the session's principal knows and pass plain view structs to
//! `gantry_dashboards`. Form posts go through the `Principal` extractor (same-origin check,
//! audit) and the same permission checks as the JSON API; a refusal is a page with the
//! API's status and message.

use super::pages_admin::Page;
use super::{agent_view, authorize, find_agent, org_in_scope, rfc3339, session_cookie_value, visible_orgs, ApiError, ApiJson, ApiResult, Op, Routes};
use crate::access::Perm;
use crate::auth::{self, Principal};
use crate::branding::{self, BrandingRequest};
use crate::enroll::{self, TokenRequest, TokenRequestError};
use crate::store::{self, Agent, RecordFilter};
use crate::Hub;
use axum::extract::{Path, Query, State};
use axum::http::header::{self, HeaderMap};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::MethodFilter;
use axum::{Form, Json};
use gantry_dashboards::chart::{Chart, Series, Unit};
use gantry_dashboards::fleet::{self, AgentFilter, AgentItem};
use gantry_dashboards::layout::{self, Nav};
use gantry_shared::message::StreamClass;
use gantry_shared::telemetry::RecordBody;
use serde::Deserialize;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// The fleet pages, the assets and the branding API.
pub(crate) fn routes(routes: Routes) -> Routes {
    routes
        .page(MethodFilter::GET, "/", overview)
        .page(MethodFilter::GET, "/agents", agents)
        .page(MethodFilter::GET, "/agents/{id}", agent)
        .page(MethodFilter::POST, "/agents/{id}/revoke", revoke)
        .page(MethodFilter::GET, "/enrollment", enrollment)
        .page(MethodFilter::POST, "/enrollment", create_token)
        .page(MethodFilter::GET, gantry_dashboards::SCRIPT_PATH, script)
        .page(MethodFilter::GET, layout::THEME_PATH, theme_css)
        .page(MethodFilter::GET, branding::THEME_LOGO_PATH, theme_logo)
        .page(MethodFilter::GET, "/assets/brand/{file}", brand_css)
        .page(MethodFilter::GET, "/assets/brand/{org}/logo", brand_logo)
        .get("/api/v1/orgs/{org}/branding", get_branding, Op::new("An org's brand (the operator theme when it has none)").tag("orgs"))
        .put(
            "/api/v1/orgs/{org}/branding",
            put_branding,
            Op::new("Set an org's brand: product name, colours, logo (admins)").tag("orgs").body::<BrandingRequest>(),
        )
        .delete("/api/v1/orgs/{org}/branding", delete_branding, Op::new("Remove an org's brand (admins)").tag("orgs").no_content())
}

// ---- the session and the shell ----

/// The principal of the session cookie, if it names a live session.
pub(crate) fn session_principal(hub: &Hub, headers: &HeaderMap) -> ApiResult<Option<Principal>> {
    match session_cookie_value(hub, headers) {
        Some(value) => Ok(auth::principal_from_session(hub, &value)?),
        None => Ok(None),
    }
}

fn html(page: String) -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Html(page)).into_response()
}

fn to_login() -> Response {
    Redirect::to("/login").into_response()
}

/// An optional `?org=` that is empty when not given.
fn org_param(org: &Option<String>) -> Option<String> {
    org.as_deref().map(str::trim).filter(|o| !o.is_empty()).map(str::to_string)
}

/// Orgs the principal sees, narrowed to `only` (which must be one of them: 404 otherwise).
fn status_of(hub: &Hub, agent: &Agent) -> &'static str {
    if agent.revoked_at_ms.is_some() {
        "revoked"
    } else if hub.registry.info(&agent.id).is_some() {
        "online"
    } else {
        "offline"
    }
}

fn agent_item(hub: &Hub, agent: &Agent) -> AgentItem {
    let view = agent_view(hub, agent);
    AgentItem {
        id: view.id,
        org: view.org,
        hostname: view.hostname,
        status: view.status,
        os: view.os,
        arch: view.arch,
        version: view.agent_version,
        last_seen: view.last_seen.unwrap_or_default(),
        rtt_ms: view.rtt_ms,
        labels: view.labels.into_iter().collect(),
    }
}

// ---- overview ----

#[derive(Debug, Deserialize, Default)]
struct OrgQuery {
    org: Option<String>,
}

async fn overview(State(hub): State<Arc<Hub>>, headers: HeaderMap, Query(query): Query<OrgQuery>) -> ApiResult<Response> {
    let Some(principal) = session_principal(&hub, &headers)? else { return Ok(to_login()) };
    let viewer = Page::new(&hub, principal, org_param(&query.org), Nav::Overview);
    match overview_view(&hub, &viewer.principal, viewer.org.as_deref()) {
        Ok(view) => Ok(html(fleet::overview_page(&viewer.shell(None), &view))),
        Err(error) => Ok(viewer.error(error)),
    }
}

/// The overview's figures over the orgs `principal` sees (or the one selected).
pub(crate) fn overview_view(hub: &Hub, principal: &Principal, only: Option<&str>) -> ApiResult<fleet::OverviewView> {
    let orgs = visible_orgs(hub, principal, only)?;
    let mut view = fleet::OverviewView { orgs: orgs.len(), ..fleet::OverviewView::default() };
    let mut deployments = Vec::new();
    let mut alerts = Vec::new();
    let now = crate::wall_ms();
    for org in &orgs {
        for agent in hub.store.agents_of_org(&org.id)? {
            match status_of(hub, &agent) {
                "online" => view.online += 1,
                "offline" => view.offline += 1,
                _ => view.revoked += 1,
            }
        }
        for alert in hub.store.open_alerts_of_org(&org.id)? {
            alerts.push((
                alert.started_at_ms,
                fleet::AlertItem {
                    org: alert.org,
                    severity: alert.severity,
                    summary: alert.summary,
                    agent: alert.agent,
                    since: rfc3339(alert.started_at_ms),
                    acknowledged: alert.acknowledged_at_ms.is_some(),
                },
            ));
        }
        for deployment in hub.store.deployments_of_org(&org.id)? {
            deployments.push(deployment);
        }
        if principal.check(&org.id, Perm::Billing).is_ok() {
            if let Some(s) = hub.store.subscription(&org.id)? {
                let (start, end) = crate::billing::plans::period_containing(s.period_anchor_ms, now);
                if let Ok(invoice) = crate::billing::invoices::invoice_for(hub, &s, start, end) {
                    view.usage.push(fleet::UsageItem {
                        org: org.id.clone(),
                        status: s.status.name().to_string(),
                        period_end: rfc3339(end),
                        total_minor: invoice.total_minor,
                        currency: invoice.currency,
                    });
                }
            }
        }
    }
    alerts.sort_by_key(|a| std::cmp::Reverse(a.0));
    view.alerts = alerts.into_iter().take(10).map(|(_, a)| a).collect();
    deployments.sort_by_key(|d| std::cmp::Reverse(d.updated_at_ms));
    for d in deployments.into_iter().take(8) {
        let mut states: BTreeMap<String, usize> = BTreeMap::new();
        for (_, status) in hub.store.deploy_statuses(&d.id)? {
            if status.revision == d.revision {
                *states.entry(deploy_state(&status.state).to_string()).or_default() += 1;
            }
        }
        view.deployments.push(fleet::DeploymentItem {
            org: d.org,
            id: d.id,
            name: d.name,
            revision: d.revision,
            states: states.into_iter().collect(),
            updated: rfc3339(d.updated_at_ms),
        });
    }
    view.can_enroll = orgs.iter().any(|o| principal.check(&o.id, Perm::Admin).is_ok());
    if principal.operator && only.is_none() {
        let (mrr, paying) = mrr(hub)?;
        view.mrr = Some(mrr);
        view.paying_orgs = paying;
    }
    Ok(view)
}

fn deploy_state(state: &gantry_shared::message::DeployState) -> &'static str {
    use gantry_shared::message::DeployState;
    match state {
        DeployState::Applying => "applying",
        DeployState::Healthy => "healthy",
        DeployState::RolledBack { .. } => "rolled back",
        DeployState::Failed => "failed",
        DeployState::Removed => "removed",
    }
}

/// Monthly recurring revenue: the base fee of every active or past-due subscription's plan
/// version, per currency; and how many subscriptions that is.
fn mrr(hub: &Hub) -> ApiResult<(Vec<(String, i64)>, usize)> {
    use crate::billing::plans::Status;
    let mut totals: BTreeMap<String, i64> = BTreeMap::new();
    let mut paying = 0;
    for s in hub.store.subscriptions()? {
        if !matches!(s.status, Status::Active | Status::PastDue) {
            continue;
        }
        if let Some(plan) = hub.store.plan_version(&s.plan_id, s.plan_version)? {
            paying += 1;
            let total = totals.entry(plan.prices.currency.clone()).or_default();
            *total = total.saturating_add(plan.prices.base_minor);
        }
    }
    Ok((totals.into_iter().collect(), paying))
}

// ---- agents list ----

#[derive(Debug, Deserialize, Default)]
struct ListQuery {
    status: Option<String>,
    label: Option<String>,
    version: Option<String>,
    q: Option<String>,
    org: Option<String>,
    page: Option<String>,
}

async fn agents(State(hub): State<Arc<Hub>>, headers: HeaderMap, Query(query): Query<ListQuery>) -> ApiResult<Response> {
    let Some(principal) = session_principal(&hub, &headers)? else { return Ok(to_login()) };
    let viewer = Page::new(&hub, principal, org_param(&query.org), Nav::Agents);
    match agents_view(&hub, &viewer.principal, query) {
        Ok(view) => Ok(html(fleet::agents_page(&viewer.shell(None), &view))),
        Err(error) => Ok(viewer.error(error)),
    }
}

fn agents_view(hub: &Hub, principal: &Principal, query: ListQuery) -> ApiResult<fleet::AgentsListView> {
    let text = |v: Option<String>| v.map(|v| v.trim().to_string()).unwrap_or_default();
    let filter = AgentFilter { status: text(query.status), label: text(query.label), version: text(query.version), q: text(query.q), org: text(query.org) };
    if !["", "online", "offline", "revoked"].contains(&filter.status.as_str()) {
        return Err(ApiError::bad_request(format!("status {:?} must be online, offline or revoked", filter.status)));
    }
    if filter.q.len() > 200 || filter.label.len() > 200 || filter.version.len() > 100 {
        return Err(ApiError::bad_request("filters are limited to 200 characters"));
    }
    let page = match query.page.as_deref().map(str::trim) {
        None | Some("") => 1,
        Some(page) => page
            .parse::<usize>()
            .ok()
            .filter(|p| (1..=1_000_000).contains(p))
            .ok_or_else(|| ApiError::bad_request(format!("page {page:?} must be a number from 1")))?,
    };
    let all_orgs = visible_orgs(hub, principal, None)?;
    let orgs = if filter.org.is_empty() { all_orgs.clone() } else { visible_orgs(hub, principal, Some(&filter.org))? };
    let mut view = fleet::AgentsListView {
        orgs: all_orgs.iter().map(|o| (o.id.clone(), o.name.clone())).collect(),
        can_enroll: orgs.iter().any(|o| principal.check(&o.id, Perm::Admin).is_ok()),
        ..fleet::AgentsListView::default()
    };
    let mut versions = BTreeSet::new();
    for org in &orgs {
        for agent in hub.store.agents_of_org(&org.id)? {
            let item = agent_item(hub, &agent);
            view.total += 1;
            versions.insert(item.version.clone());
            if filter.matches(&item) {
                view.agents.push(item);
            }
        }
    }
    view.agents.sort_by(|a, b| (&a.org, &a.hostname, &a.id).cmp(&(&b.org, &b.hostname, &b.id)));
    view.matched = view.agents.len();
    view.page = page;
    view.agents = view.agents.drain(..).skip((page - 1) * fleet::AGENTS_PER_PAGE).take(fleet::AGENTS_PER_PAGE).collect();
    view.versions = versions.into_iter().filter(|v| !v.is_empty()).collect();
    view.filter = filter;
    Ok(view)
}

// ---- agent detail ----

#[derive(Debug, Deserialize, Default)]
struct DetailQuery {
    range: Option<String>,
    q: Option<String>,
    done: Option<String>,
}

async fn agent(State(hub): State<Arc<Hub>>, headers: HeaderMap, Path(id): Path<String>, Query(query): Query<DetailQuery>) -> ApiResult<Response> {
    let Some(principal) = session_principal(&hub, &headers)? else { return Ok(to_login()) };
    let org = hub.store.agent(&id)?.filter(|a| principal.access.knows(&a.org)).map(|a| a.org);
    let viewer = Page::new(&hub, principal, org, Nav::Agents);
    // Only fixed messages: nothing from the URL is echoed as a flash.
    let flash = match query.done.as_deref() {
        Some("revoked") => Some("Agent revoked. Its session was closed; it must be enrolled again to reconnect."),
        _ => None,
    };
    match agent_detail(&hub, &viewer.principal, &id, query.range.as_deref(), query.q.as_deref().unwrap_or("").trim()) {
        Ok(view) => Ok(html(fleet::agent_page(&viewer.shell(flash), &view))),
        Err(error) => Ok(viewer.error(error)),
    }
}

/// Buckets per chart line.
const CHART_POINTS: i64 = 120;

pub(crate) fn agent_detail(hub: &Hub, principal: &Principal, id: &str, range: Option<&str>, log_query: &str) -> ApiResult<fleet::AgentDetailView> {
    let agent = find_agent(hub, principal, id, Perm::Read)?;
    let range = range.filter(|r| !r.is_empty()).unwrap_or("1h");
    if !fleet::RANGES.iter().any(|(value, _)| *value == range) {
        return Err(ApiError::bad_request(format!("range {range:?} must be one of 15m, 1h, 6h, 24h")));
    }
    if log_query.len() > 200 {
        return Err(ApiError::bad_request("the log search is limited to 200 characters"));
    }
    let span_ms = super::parse_duration(range).map_err(ApiError::bad_request)?.as_millis() as i64;
    let now = crate::wall_ms();
    let view = agent_view(hub, &agent);
    let item = agent_item(hub, &agent);
    let facts = vec![
        ("Kernel".to_string(), view.kernel.clone()),
        ("CPUs".to_string(), view.cpu_count.to_string()),
        ("Memory".to_string(), gantry_dashboards::chart::bytes(view.memory_bytes as f64)),
        ("Enrolled".to_string(), view.enrolled_at.clone()),
        ("Protocol".to_string(), view.protocol_version.map(|v| format!("v{v}")).unwrap_or_else(|| "unknown".into())),
    ];
    let charts = host_charts(hub, id, now - span_ms, now)?;
    let containers = containers(hub, id, now)?;
    let checks = hub
        .store
        .check_statuses(id)?
        .into_iter()
        .map(|c| fleet::CheckRow { name: c.name, kind: c.kind, state: c.state.name().to_string(), since: rfc3339(c.since_ms), output: c.output })
        .collect();
    let newest = RecordFilter { newest_first: true, ..RecordFilter::default() };
    let mut dropped = Vec::new();
    let mut events = Vec::new();
    for record in hub.store.records(id, StreamClass::Events, &newest, None, 25)? {
        match &record.body {
            RecordBody::Event(event) => events.push(fleet::EventRow {
                ts: rfc3339(record.ts_unix_ms),
                kind: event.kind.clone(),
                severity: format!("{:?}", event.severity).to_lowercase(),
                message: event.message.clone(),
            }),
            RecordBody::Gap { records, .. } => dropped.push((record.ts_unix_ms, *records)),
            _ => {}
        }
    }
    let log_filter = RecordFilter { newest_first: true, text: (!log_query.is_empty()).then(|| log_query.to_string()), ..RecordFilter::default() };
    let mut logs = Vec::new();
    for record in hub.store.records(id, StreamClass::Logs, &log_filter, None, 100)?.into_iter().rev() {
        match &record.body {
            RecordBody::Log(line) => logs.push(fleet::LogRow {
                ts: rfc3339(record.ts_unix_ms),
                stream: format!("{:?}", line.stream).to_lowercase(),
                container: line.container.as_ref().map(|c| c.chars().take(12).collect()),
                line: line.line.clone(),
            }),
            RecordBody::Gap { records, .. } => dropped.push((record.ts_unix_ms, *records)),
            _ => {}
        }
    }
    let spool_dropped = dropped.iter().max_by_key(|(ts, _)| *ts).map(|(ts, records)| format!("{records} records dropped, latest at {}", rfc3339(*ts)));
    let mut streams = Vec::new();
    for (class, name) in [(StreamClass::Metrics, "metrics"), (StreamClass::Logs, "logs"), (StreamClass::Events, "events"), (StreamClass::Health, "health")] {
        streams.push((name.to_string(), hub.store.high_water(id, class)?));
    }
    let connection = fleet::ConnectionView {
        rtt_ms: view.rtt_ms,
        clock_skew_ms: view.clock_skew_ms,
        cert_expires_at: view.cert_expires_at.clone(),
        cert_days_left: (agent.cert_not_after_ms - now).div_euclid(86_400_000),
        connected_since: view.connected_since.clone(),
        remote_addr: view.remote_addr.clone(),
        protocol_version: view.protocol_version,
        streams,
        spool_dropped,
        spool_backlog: view.spool.as_ref().map(|spool| fleet::SpoolBacklog {
            reported_at: spool.reported_at.clone(),
            streams: spool.streams.iter().map(|s| (s.class.clone(), s.records, s.bytes, s.cap_bytes)).collect(),
        }),
        online: view.status == "online",
    };
    Ok(fleet::AgentDetailView {
        agent: item,
        facts,
        connection,
        charts,
        range: range.to_string(),
        containers,
        checks,
        events,
        logs,
        log_query: log_query.to_string(),
        can_revoke: principal.check(&agent.org, Perm::Admin).is_ok(),
    })
}

/// A series' label from its labels (`mount=/` → `/`), or `fallback`.
fn series_label(labels: &[(String, String)], key: &str, fallback: &str) -> String {
    labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_else(|| fallback.to_string())
}

fn host_charts(hub: &Hub, id: &str, from: i64, to: i64) -> ApiResult<Vec<Chart>> {
    let step = ((to - from) / CHART_POINTS).max(1000);
    let series = |name: &str| hub.store.metric_series(id, name, from, to, step);
    let chart = |title: &str, unit: Unit, series: Vec<Series>| Chart { title: title.to_string(), unit, from_ms: from, to_ms: to, step_ms: step, series };
    let cpu = series("cpu.usage_percent")?.into_iter().map(|s| Series { label: "CPU".into(), points: s.points }).collect();
    let memory = series("memory.used_percent")?.into_iter().map(|s| Series { label: "Memory used".into(), points: s.points }).collect();
    let mut disks: Vec<Series> =
        series("disk.used_percent")?.into_iter().map(|s| Series { label: series_label(&s.labels, "mount", "disk"), points: s.points }).collect();
    disks.sort_by(|a, b| a.label.len().cmp(&b.label.len()).then(a.label.cmp(&b.label)));
    let mut network = Vec::new();
    for (name, direction) in [("net.received_bytes_per_second", "in"), ("net.transmitted_bytes_per_second", "out")] {
        for s in series(name)? {
            let interface = series_label(&s.labels, "interface", "net");
            if interface != "lo" {
                network.push((interface, direction, s.points));
            }
        }
    }
    // The busiest interfaces first; the chart draws four lines at most.
    network.sort_by(|a, b| {
        let total = |p: &Vec<(i64, f64)>| p.iter().map(|x| x.1).sum::<f64>();
        total(&b.2).total_cmp(&total(&a.2))
    });
    let network = network.into_iter().map(|(interface, direction, points)| Series { label: format!("{interface} {direction}"), points }).collect();
    Ok(vec![
        chart("CPU", Unit::Percent, cpu),
        chart("Memory", Unit::Percent, memory),
        chart("Disk used", Unit::Percent, disks),
        chart("Network", Unit::BytesPerSecond, network),
    ])
}

/// Containers from the latest Docker metrics (the last ten minutes).
fn containers(hub: &Hub, id: &str, now: i64) -> ApiResult<Vec<fleet::ContainerRow>> {
    let window = 600_000;
    let from = now - window;
    // Container id → (the series' labels, latest value).
    type Latest = BTreeMap<String, (Vec<(String, String)>, f64)>;
    let latest = |name: &str| -> ApiResult<Latest> {
        Ok(hub
            .store
            .metric_series(id, name, from, now, window)?
            .into_iter()
            .filter_map(|s| {
                let value = s.points.last()?.1;
                Some((series_label(&s.labels, "container", ""), (s.labels, value)))
            })
            .collect())
    };
    let cpu = latest("docker.container.cpu_percent")?;
    let memory = latest("docker.container.memory_usage_bytes")?;
    let mut rows: Vec<fleet::ContainerRow> = latest("docker.container.running")?
        .into_iter()
        .map(|(container, (labels, running))| fleet::ContainerRow {
            name: series_label(&labels, "name", &container),
            image: series_label(&labels, "image", ""),
            running: running >= 0.5,
            cpu_percent: cpu.get(&container).map(|c| c.1),
            memory_bytes: memory.get(&container).map(|m| m.1),
            id: container,
        })
        .collect();
    rows.sort_by(|a, b| b.running.cmp(&a.running).then(a.name.cmp(&b.name)));
    Ok(rows)
}

async fn revoke(State(hub): State<Arc<Hub>>, principal: Principal, Path(id): Path<String>) -> ApiResult<Response> {
    let org = hub.store.agent(&id)?.filter(|a| principal.access.knows(&a.org)).map(|a| a.org);
    let viewer = Page::new(&hub, principal.clone(), org, Nav::Agents);
    match super::revoke_agent(State(hub.clone()), principal, Path(id.clone())).await {
        Ok(_) => Ok(Redirect::to(&format!("/agents/{}?done=revoked", layout::query_escape(&id))).into_response()),
        Err(error) => Ok(viewer.error(error)),
    }
}

// ---- enrollment ----

async fn enrollment(State(hub): State<Arc<Hub>>, headers: HeaderMap, Query(query): Query<OrgQuery>) -> ApiResult<Response> {
    let Some(principal) = session_principal(&hub, &headers)? else { return Ok(to_login()) };
    let viewer = Page::new(&hub, principal, org_param(&query.org), Nav::Enrollment);
    let view =
        fleet::EnrollmentView { orgs: admin_orgs(&hub, &viewer.principal)?, org: viewer.org.clone().unwrap_or_default(), ..fleet::EnrollmentView::default() };
    Ok(html(fleet::enrollment_page(&viewer.shell(None), &view)))
}

/// Orgs where the principal may create enrollment tokens.
fn admin_orgs(hub: &Hub, principal: &Principal) -> ApiResult<Vec<(String, String)>> {
    Ok(hub.store.orgs()?.into_iter().filter(|o| principal.check(&o.id, Perm::Admin).is_ok()).map(|o| (o.id, o.name)).collect())
}

#[derive(Debug, Deserialize)]
struct TokenForm {
    org: String,
    #[serde(default)]
    ttl: String,
    #[serde(default)]
    uses: String,
    #[serde(default)]
    labels: String,
}

/// Labels typed as `env=prod, region=eu`.
pub(crate) fn parse_labels(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut labels = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| format!("label {pair:?} must be key=value"))?;
        labels.push((key.trim().to_string(), value.trim().to_string()));
    }
    Ok(labels)
}

/// Check the token form and create the token, as `POST /api/v1/orgs/{org}/enrollment-tokens` does.
fn mint(hub: &Hub, principal: &Principal, org: &str, form: &TokenForm) -> ApiResult<enroll::MintedToken> {
    authorize(principal, org, Perm::Admin, &format!("org {org}"))?;
    let ttl = if form.ttl.trim().is_empty() { Duration::from_secs(24 * 3600) } else { super::parse_duration(&form.ttl).map_err(ApiError::bad_request)? };
    let uses = if form.uses.trim().is_empty() {
        1
    } else {
        form.uses.trim().parse::<u32>().map_err(|_| ApiError::bad_request(format!("uses {:?} must be a whole number", form.uses)))?
    };
    let labels = parse_labels(&form.labels).map_err(ApiError::bad_request)?;
    let request = TokenRequest { org: org.to_string(), ttl, uses, labels, created_by: principal.name.clone() };
    enroll::create_token(hub, request).map_err(|e| match e {
        TokenRequestError::Invalid(message) => ApiError::bad_request(message),
        TokenRequestError::UnknownOrg(org) => ApiError::not_found(&format!("org {org}")),
        TokenRequestError::Store(e) => e.into(),
    })
}

async fn create_token(State(hub): State<Arc<Hub>>, principal: Principal, Form(form): Form<TokenForm>) -> ApiResult<Response> {
    let org = form.org.trim().to_string();
    let viewer = Page::new(&hub, principal, Some(org.clone()).filter(|o| !o.is_empty()), Nav::Enrollment);
    let mut view = fleet::EnrollmentView {
        orgs: admin_orgs(&hub, &viewer.principal)?,
        org: org.clone(),
        ttl: form.ttl.clone(),
        uses: form.uses.clone(),
        labels: form.labels.clone(),
        ..fleet::EnrollmentView::default()
    };
    let minted = mint(&hub, &viewer.principal, &org, &form);
    let status = match minted {
        Ok(minted) => {
            tracing::info!(%org, token_id = %minted.record.id, by = %viewer.principal.name, "enrollment token created");
            view.created = Some(fleet::CreatedToken {
                org: org.clone(),
                install_command: format!("curl -fsSL {}/install.sh | sudo sh -s -- --token {}", hub.config.public_url(), minted.text),
                token: minted.text,
                expires_at: rfc3339(minted.record.expires_at_ms),
                uses: minted.record.uses_total,
            });
            StatusCode::CREATED
        }
        Err(error) => {
            view.error = Some(error.message);
            error.status
        }
    };
    let page = fleet::enrollment_page(&viewer.shell(None), &view);
    Ok((status, [(header::CACHE_CONTROL, "no-store")], Html(page)).into_response())
}

// ---- assets ----

async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")], gantry_dashboards::SCRIPT).into_response()
}

fn css(text: String, cache: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, cache)], text).into_response()
}

async fn theme_css(State(hub): State<Arc<Hub>>) -> Response {
    css(hub.config.theme.brand().css(), "public, max-age=300")
}

async fn theme_logo(State(hub): State<Arc<Hub>>) -> ApiResult<Response> {
    let path = hub.config.theme.logo_file.clone().ok_or_else(|| ApiError::not_found("theme logo"))?;
    let bytes = tokio::fs::read(&path).await.map_err(|_| ApiError::not_found("theme logo"))?;
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_string();
    let content_type = branding::logo_content_type(&extension, &bytes).map_err(|_| ApiError::not_found("theme logo"))?;
    Ok(([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "public, max-age=300")], bytes).into_response())
}

/// The brand stylesheet or logo of `org`, for a session that sees the org (404 otherwise,
/// as for a missing org).
fn brand_of(hub: &Hub, headers: &HeaderMap, org: &str) -> ApiResult<Option<store::StoredBrand>> {
    let principal = session_principal(hub, headers)?.ok_or_else(ApiError::unauthorized)?;
    authorize(&principal, org, Perm::Read, &format!("brand of org {org}"))?;
    Ok(hub.store.branding(org)?)
}

async fn brand_css(State(hub): State<Arc<Hub>>, headers: HeaderMap, Path(file): Path<String>) -> ApiResult<Response> {
    let org = file.strip_suffix(".css").ok_or_else(|| ApiError::not_found("stylesheet"))?;
    let brand = match brand_of(&hub, &headers, org)? {
        Some(stored) => branding::org_brand(org, &stored),
        None => hub.config.theme.brand(),
    };
    Ok(css(brand.css(), "private, max-age=86400"))
}

async fn brand_logo(State(hub): State<Arc<Hub>>, headers: HeaderMap, Path(org): Path<String>) -> ApiResult<Response> {
    let stored = brand_of(&hub, &headers, &org)?;
    let content_type = stored.and_then(|s| s.logo_content_type).ok_or_else(|| ApiError::not_found(&format!("logo of org {org}")))?;
    let bytes = hub.store.branding_logo(&org)?.ok_or_else(|| ApiError::not_found(&format!("logo of org {org}")))?;
    let content_type = header::HeaderValue::from_str(&content_type).map_err(|_| ApiError::not_found(&format!("logo of org {org}")))?;
    Ok(([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, header::HeaderValue::from_static("private, max-age=86400"))], bytes).into_response())
}

// ---- branding API ----

fn branding_json(hub: &Hub, org: &str, stored: Option<&store::StoredBrand>) -> serde_json::Value {
    match stored {
        Some(s) => {
            let brand = branding::org_brand(org, s);
            json!({
                "org": org,
                "custom": true,
                "product_name": s.product_name,
                "accent": s.accent,
                "header_background": s.header_background,
                "logo_url": brand.logo_url,
                "stylesheet": brand.stylesheet,
                "updated_at": rfc3339(s.updated_at_ms),
                "updated_by": s.updated_by,
            })
        }
        None => {
            let theme = hub.config.theme.brand();
            json!({
                "org": org,
                "custom": false,
                "product_name": theme.product_name,
                "accent": theme.accent,
                "header_background": theme.header_background,
                "logo_url": theme.logo_url,
                "stylesheet": theme.stylesheet,
            })
        }
    }
}

async fn get_branding(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Read)?;
    let stored = hub.store.branding(&org)?;
    Ok(Json(branding_json(&hub, &org, stored.as_ref())))
}

async fn put_branding(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path(org): Path<String>,
    ApiJson(body): ApiJson<BrandingRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    let brand = branding::validate(&body, &principal.name, crate::wall_ms()).map_err(ApiError::bad_request)?;
    hub.store.put_branding(&org, &brand.stored, brand.logo.as_deref())?;
    tracing::info!(%org, by = %principal.name, "org brand set");
    Ok(Json(branding_json(&hub, &org, Some(&brand.stored))))
}

async fn delete_branding(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<StatusCode> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    hub.store.delete_branding(&org)?;
    tracing::info!(%org, by = %principal.name, "org brand removed");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_from_the_form() {
        assert_eq!(parse_labels("env=prod, region = eu").unwrap(), vec![("env".into(), "prod".into()), ("region".into(), "eu".into())]);
        assert!(parse_labels("").unwrap().is_empty());
        assert!(parse_labels("env").unwrap_err().contains("key=value"));
    }
}
