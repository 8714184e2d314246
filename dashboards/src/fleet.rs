//! Fleet pages: the overview, the agents list with its filters, an agent's detail (host
//! charts, containers, live log tail, events, checks, connection quality, revoke) and
//! enrollment (a token and the one-line install command).
//!
//! Views only: the hub fills the structs and says what the caller may do (`can_*`);
//! actions a caller may not take are left out of the page, and the hub refuses them too.
//! Filters are GET forms and actions POST forms, so everything but the live log tail works
//! without JavaScript.

use crate::chart::{self, Chart};
use crate::layout::{self, query_escape, Cell, Shell};
use crate::{billing, escape};
use std::fmt::Write;

/// A firing (or acknowledged) alert on the overview.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertItem {
    pub org: String,
    pub severity: String,
    pub summary: String,
    /// Agent id the alert is about, if any.
    pub agent: Option<String>,
    /// RFC 3339.
    pub since: String,
    pub acknowledged: bool,
}

/// A recently changed deployment on the overview.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeploymentItem {
    pub org: String,
    pub id: String,
    pub name: String,
    pub revision: u64,
    /// Agents per state of the current revision (`running` 3, `failed` 1, ...).
    pub states: Vec<(String, usize)>,
    /// RFC 3339.
    pub updated: String,
}

/// One org's usage so far in its current billing period.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageItem {
    pub org: String,
    /// Subscription status (`active`, `trialing`, ...).
    pub status: String,
    /// RFC 3339 end of the period.
    pub period_end: String,
    /// The invoice so far, in minor units of `currency`.
    pub total_minor: i64,
    pub currency: String,
}

/// The overview page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OverviewView {
    pub online: usize,
    pub offline: usize,
    pub revoked: usize,
    /// Orgs the caller sees.
    pub orgs: usize,
    pub alerts: Vec<AlertItem>,
    pub deployments: Vec<DeploymentItem>,
    /// Orgs whose billing the caller may see.
    pub usage: Vec<UsageItem>,
    /// Monthly recurring revenue across orgs, per currency (operators only; `None` hides it).
    pub mrr: Option<Vec<(String, i64)>>,
    /// Subscriptions counted in the MRR.
    pub paying_orgs: usize,
    /// Whether the caller may create enrollment tokens somewhere.
    pub can_enroll: bool,
}

/// The overview: headline figures, firing alerts, recent deployments, usage this period
/// and, for operators, monthly recurring revenue.
pub fn overview_page(shell: &Shell, view: &OverviewView) -> String {
    let mut body = layout::page_header("Overview", "");
    let org_query = shell.org.map(|o| format!("&org={}", query_escape(o))).unwrap_or_default();
    body.push_str("<div class=\"stats\">");
    let total = view.online + view.offline;
    body.push_str(&layout::stat(
        "Agents online",
        &view.online.to_string(),
        if view.online > 0 { "ok" } else { "" },
        Some(&format!("/agents?status=online{org_query}")),
    ));
    body.push_str(&layout::stat(
        "Agents offline",
        &view.offline.to_string(),
        if view.offline > 0 { "bad" } else { "" },
        Some(&format!("/agents?status=offline{org_query}")),
    ));
    let firing = view.alerts.iter().filter(|a| !a.acknowledged).count();
    body.push_str(&layout::stat("Firing alerts", &firing.to_string(), if firing > 0 { "bad" } else { "ok" }, Some(layout::Nav::Alerts.path())));
    if let Some(mrr) = &view.mrr {
        let text = if mrr.is_empty() { "0".to_string() } else { mrr.iter().map(|(c, m)| billing::money(*m, c)).collect::<Vec<_>>().join(" + ") };
        body.push_str(&layout::stat("MRR", &text, "", Some(layout::Nav::Orgs.path())));
    }
    if shell.operator {
        body.push_str(&layout::stat("Orgs", &view.orgs.to_string(), "", Some(layout::Nav::Orgs.path())));
    }
    body.push_str("</div>");
    if shell.operator && view.orgs == 0 {
        body.push_str(&layout::empty_state("No orgs yet", "Agents enroll into an org: create the first one, then add a machine to it."));
        let _ = write!(body, "<p><a class=\"button\" href=\"{}\">Create an org</a></p>", escape(layout::Nav::Orgs.path()));
    } else if total == 0 && view.revoked == 0 {
        let hint = if view.can_enroll {
            "Create an enrollment token and run the one-line install command on a server."
        } else {
            "Ask an admin of your org for an enrollment token."
        };
        body.push_str(&layout::empty_state("No agents yet", hint));
        if view.can_enroll {
            let _ = write!(body, "<p><a class=\"button\" href=\"{}\">Add a machine</a></p>", escape(&layout::Nav::Enrollment.href(shell.org)));
        }
    }
    if let Some(mrr) = &view.mrr {
        let _ = write!(
            body,
            "<p class=\"muted\">MRR: base fees of {} active or past-due subscriptions{}.</p>",
            view.paying_orgs,
            if mrr.len() > 1 { ", per currency" } else { "" }
        );
    }
    body.push_str("<div class=\"grid\"><section class=\"card\" aria-labelledby=\"alerts-h\"><h2 id=\"alerts-h\">Firing alerts</h2>");
    let rows: Vec<Vec<Cell>> = view
        .alerts
        .iter()
        .map(|a| {
            let agent = match &a.agent {
                Some(agent) => format!("<a href=\"/agents/{}\">{}</a>", escape(&query_escape(agent)), escape(agent)),
                None => String::new(),
            };
            let state = if a.acknowledged { "acknowledged" } else { "firing" };
            vec![
                Cell::html(layout::status_badge(state)),
                Cell::text(&a.severity),
                Cell::text(&a.summary),
                Cell::html(agent),
                Cell::text(&a.org),
                Cell::text(&a.since),
            ]
        })
        .collect();
    body.push_str(&layout::table(
        "Open alerts",
        &["State", "Severity", "Summary", "Agent", "Org", "Since"],
        &rows,
        &layout::empty_state("Nothing is firing", "Alerts appear here when an agent goes offline or a check fails."),
    ));
    body.push_str("</section><section class=\"card\" aria-labelledby=\"deploys-h\"><h2 id=\"deploys-h\">Recent deployments</h2>");
    let rows: Vec<Vec<Cell>> = view
        .deployments
        .iter()
        .map(|d| {
            let states = d.states.iter().map(|(state, n)| format!("{} {}", n, layout::status_badge(state))).collect::<Vec<_>>().join(", ");
            vec![
                Cell::html(format!("<a href=\"/deployments/{}\">{}</a>", escape(&query_escape(&d.id)), escape(&d.name))),
                Cell::text(format!("r{}", d.revision)),
                Cell::html(if states.is_empty() { "<span class=\"muted\">no reports yet</span>".to_string() } else { states }),
                Cell::text(&d.org),
                Cell::text(&d.updated),
            ]
        })
        .collect();
    body.push_str(&layout::table(
        "Recent deployments",
        &["Deployment", "Revision", "Agents", "Org", "Updated"],
        &rows,
        &layout::empty_state("No deployments yet", "Deploy containers to your agents from the Deployments page."),
    ));
    body.push_str("</section></div>");
    if !view.usage.is_empty() {
        body.push_str("<section class=\"card\" aria-labelledby=\"usage-h\"><h2 id=\"usage-h\">Usage this period</h2>");
        let rows: Vec<Vec<Cell>> = view
            .usage
            .iter()
            .map(|u| {
                vec![
                    Cell::html(format!("<a href=\"/usage?org={}\">{}</a>", escape(&query_escape(&u.org)), escape(&u.org))),
                    Cell::html(layout::status_badge(&u.status)),
                    Cell::text(billing::money(u.total_minor, &u.currency)),
                    Cell::text(&u.period_end),
                ]
            })
            .collect();
        body.push_str(&layout::table("Invoice so far per org", &["Org", "Subscription", "So far", "Period ends"], &rows, ""));
        body.push_str("</section>");
    }
    layout::render(shell, "Overview", &body)
}

/// One agent in the list (and the head of its detail page).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentItem {
    pub id: String,
    pub org: String,
    pub hostname: String,
    /// `online`, `offline` or `revoked`.
    pub status: String,
    pub os: String,
    pub arch: String,
    pub version: String,
    /// RFC 3339, or empty if never seen.
    pub last_seen: String,
    pub rtt_ms: Option<f64>,
    pub labels: Vec<(String, String)>,
}

/// The agents list's filters, from the query string (`?status=&label=&version=&q=&org=`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentFilter {
    /// `online`, `offline`, `revoked` or empty for all.
    pub status: String,
    /// `key=value` or `key` (has the label), or empty.
    pub label: String,
    /// Exact agent version, or empty.
    pub version: String,
    /// Case-insensitive text in the host name, id, OS or a label.
    pub q: String,
    /// Org id, or empty for every org the caller sees.
    pub org: String,
}

impl AgentFilter {
    /// Whether `agent` passes every filter given.
    pub fn matches(&self, agent: &AgentItem) -> bool {
        if !self.status.is_empty() && agent.status != self.status {
            return false;
        }
        if !self.org.is_empty() && agent.org != self.org {
            return false;
        }
        if !self.version.is_empty() && agent.version != self.version {
            return false;
        }
        if !self.label.is_empty() {
            let (key, value) = match self.label.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (self.label.trim(), None),
            };
            if !agent.labels.iter().any(|(k, v)| k == key && value.is_none_or(|value| v == value)) {
                return false;
            }
        }
        if !self.q.is_empty() {
            let q = self.q.to_lowercase();
            let hit = [&agent.hostname, &agent.id, &agent.os].iter().any(|f| f.to_lowercase().contains(&q))
                || agent.labels.iter().any(|(k, v)| k.to_lowercase().contains(&q) || v.to_lowercase().contains(&q));
            if !hit {
                return false;
            }
        }
        true
    }

    /// Whether any filter is set.
    pub fn is_set(&self) -> bool {
        !(self.status.is_empty() && self.label.is_empty() && self.version.is_empty() && self.q.is_empty() && self.org.is_empty())
    }

    /// The list's URL with these filters and `page` (pages after the first only).
    pub fn href(&self, page: usize) -> String {
        let mut pairs: Vec<String> = [("q", &self.q), ("status", &self.status), ("label", &self.label), ("version", &self.version), ("org", &self.org)]
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| format!("{k}={}", query_escape(v)))
            .collect();
        if page > 1 {
            pairs.push(format!("page={page}"));
        }
        if pairs.is_empty() {
            "/agents".into()
        } else {
            format!("/agents?{}", pairs.join("&"))
        }
    }
}

/// Agents per page of the agents list.
pub const AGENTS_PER_PAGE: usize = 100;

/// The agents list page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentsListView {
    pub filter: AgentFilter,
    /// This page of the agents passing the filter, in display order.
    pub agents: Vec<AgentItem>,
    /// Agents passing the filter, on every page.
    pub matched: usize,
    /// The page shown, from 1; [`AGENTS_PER_PAGE`] agents each.
    pub page: usize,
    /// Agents the caller sees before filtering.
    pub total: usize,
    /// Versions seen, for the version filter.
    pub versions: Vec<String>,
    /// Orgs the caller sees, `(id, name)`, for the org filter (shown when more than one).
    pub orgs: Vec<(String, String)>,
    /// A filter the hub could not use, said plainly.
    pub error: Option<String>,
    pub can_enroll: bool,
}

fn select(html: &mut String, id: &str, label: &str, current: &str, options: &[(String, String)]) {
    let _ = write!(html, "<div><label for=\"{id}\">{label}</label><select id=\"{id}\" name=\"{id}\"><option value=\"\">All</option>");
    for (value, text) in options {
        let selected = if value == current { " selected" } else { "" };
        let _ = write!(html, "<option value=\"{}\"{selected}>{}</option>", escape(value), escape(text));
    }
    html.push_str("</select></div>");
}

/// The agents list with its filter form (a GET form: works without JavaScript and gives
/// shareable URLs).
pub fn agents_page(shell: &Shell, view: &AgentsListView) -> String {
    let actions = if view.can_enroll {
        format!("<a class=\"button\" href=\"{}\">Add a machine</a>", escape(&layout::Nav::Enrollment.href(shell.org)))
    } else {
        String::new()
    };
    let mut body = layout::page_header("Agents", &actions);
    if let Some(error) = &view.error {
        body.push_str(&layout::error_box(error));
    }
    let f = &view.filter;
    body.push_str("<form class=\"filters\" method=\"get\" action=\"/agents\" role=\"search\" aria-label=\"Filter agents\">");
    let _ = write!(
        body,
        "<div><label for=\"q\">Search</label><input id=\"q\" name=\"q\" type=\"search\" value=\"{}\" placeholder=\"host, id, label\"></div>",
        escape(&f.q)
    );
    let statuses: Vec<(String, String)> = ["online", "offline", "revoked"].iter().map(|s| (s.to_string(), s.to_string())).collect();
    select(&mut body, "status", "Status", &f.status, &statuses);
    let _ = write!(
        body,
        "<div><label for=\"label\">Label</label><input id=\"label\" name=\"label\" value=\"{}\" placeholder=\"env=prod\"></div>",
        escape(&f.label)
    );
    let versions: Vec<(String, String)> = view.versions.iter().map(|v| (v.clone(), v.clone())).collect();
    select(&mut body, "version", "Version", &f.version, &versions);
    if view.orgs.len() > 1 {
        select(&mut body, "org", "Org", &f.org, &view.orgs);
    } else if !f.org.is_empty() {
        let _ = write!(body, "<input type=\"hidden\" name=\"org\" value=\"{}\">", escape(&f.org));
    }
    body.push_str("<button type=\"submit\">Filter</button>");
    if f.is_set() {
        body.push_str("<a class=\"button secondary\" href=\"/agents\">Clear</a>");
    }
    body.push_str("</form>");
    let pages = view.matched.div_ceil(AGENTS_PER_PAGE).max(1);
    let shown = if pages > 1 {
        let first = (view.page - 1) * AGENTS_PER_PAGE + 1;
        format!(" · showing {first}–{}", first + view.agents.len().saturating_sub(1))
    } else {
        String::new()
    };
    let _ = write!(body, "<p class=\"muted\" role=\"status\">{} of {} agents{shown}</p>", view.matched, view.total);
    let rows: Vec<Vec<Cell>> = view.agents.iter().map(agent_row).collect();
    let empty = if view.total == 0 {
        layout::empty_state("No agents enrolled", "Create an enrollment token and run the install command on a server to add one.")
    } else if view.matched > 0 {
        layout::empty_state("No agents on this page", "Go back to the first page.")
    } else {
        layout::empty_state("No agent matches these filters", "Clear a filter or search for something else.")
    };
    // With JavaScript, the rows follow the agents' status live (GET /api/v1/agents/stream).
    let stream = if f.org.is_empty() { "/api/v1/agents/stream".to_string() } else { format!("/api/v1/agents/stream?org={}", query_escape(&f.org)) };
    if !rows.is_empty() {
        let _ = write!(
            body,
            "<p id=\"agents-live\" class=\"muted js-only hidden\" aria-live=\"polite\"></p><div data-live=\"agent-list\" data-src=\"{}\" data-state=\"agents-live\">",
            escape(&stream)
        );
    }
    body.push_str(&layout::table("Agents", &["Host", "Status", "Org", "OS", "Version", "Last seen", "RTT", "Labels"], &rows, &empty));
    if !rows.is_empty() {
        body.push_str("</div>");
    }
    if pages > 1 {
        body.push_str("<nav class=\"pager\" aria-label=\"Pages of agents\">");
        if view.page > 1 {
            let _ = write!(body, "<a rel=\"prev\" href=\"{}\">Previous</a>", escape(&f.href(view.page - 1)));
        }
        let _ = write!(body, "<span>Page {} of {pages}</span>", view.page);
        if view.page < pages {
            let _ = write!(body, "<a rel=\"next\" href=\"{}\">Next</a>", escape(&f.href(view.page + 1)));
        }
        body.push_str("</nav>");
    }
    layout::render(shell, "Agents", &body)
}

fn labels_html(labels: &[(String, String)]) -> String {
    labels.iter().map(|(k, v)| format!("<span class=\"label\">{}={}</span>", escape(k), escape(v))).collect()
}

fn agent_row(agent: &AgentItem) -> Vec<Cell> {
    vec![
        Cell::html(format!("<a href=\"/agents/{}\" title=\"{}\">{}</a>", escape(&query_escape(&agent.id)), escape(&agent.id), escape(&agent.hostname))),
        Cell::html(layout::status_badge(&agent.status)),
        Cell::text(&agent.org),
        Cell::text(format!("{} ({})", agent.os, agent.arch)),
        Cell::text(&agent.version),
        Cell::text(if agent.last_seen.is_empty() { "never" } else { &agent.last_seen }),
        Cell::text(agent.rtt_ms.map(|r| format!("{r:.1} ms")).unwrap_or_default()),
        Cell::html(labels_html(&agent.labels)),
    ]
}

/// A container on the agent, from its latest Docker metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerRow {
    pub name: String,
    pub image: String,
    /// Short id.
    pub id: String,
    pub running: bool,
    pub cpu_percent: Option<f64>,
    pub memory_bytes: Option<f64>,
}

/// A health check's latest state on the agent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckRow {
    pub name: String,
    pub kind: String,
    /// `passing`, `warning`, `failing`, ...
    pub state: String,
    /// RFC 3339.
    pub since: String,
    pub output: String,
}

/// One event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventRow {
    pub ts: String,
    pub kind: String,
    pub severity: String,
    pub message: String,
}

/// One log line of the history.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogRow {
    pub ts: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub container: Option<String>,
    pub line: String,
}

/// What the hub knows about the agent's connection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectionView {
    pub rtt_ms: Option<f64>,
    pub clock_skew_ms: Option<i64>,
    /// RFC 3339.
    pub cert_expires_at: String,
    /// Whole days left (negative when expired).
    pub cert_days_left: i64,
    pub connected_since: Option<String>,
    pub remote_addr: Option<String>,
    pub protocol_version: Option<u16>,
    /// Records stored per telemetry stream: `(stream, highest seq acknowledged)`.
    pub streams: Vec<(String, u64)>,
    /// Records the agent dropped because its spool was full, if it reported any gap.
    pub spool_dropped: Option<String>,
    /// What the agent holds unacknowledged in its spool, as it last reported it; `None`
    /// while offline or for agents too old to report it (see [`ConnectionView::online`]).
    pub spool_backlog: Option<SpoolBacklog>,
    /// The agent has a live session (tells "offline" from "not reported" for the backlog).
    pub online: bool,
}

/// An agent's spool backlog, per stream class.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpoolBacklog {
    /// RFC 3339 time the hub received the report.
    pub reported_at: String,
    /// `(class, records, bytes, cap bytes)`.
    pub streams: Vec<(String, u64, u64, u64)>,
}

impl SpoolBacklog {
    /// One line: the total, then each class that holds anything with its share of the cap.
    pub fn summary(&self) -> String {
        let records: u64 = self.streams.iter().map(|s| s.1).sum();
        let bytes: u64 = self.streams.iter().map(|s| s.2).sum();
        if records == 0 {
            return format!("empty (reported {})", self.reported_at);
        }
        let parts: Vec<String> = self
            .streams
            .iter()
            .filter(|s| s.1 > 0)
            .map(|(class, records, bytes, cap)| {
                let share = if *cap == 0 { 0.0 } else { *bytes as f64 * 100.0 / *cap as f64 };
                format!("{class} {records} ({}, {share:.1} % of {})", crate::chart::bytes(*bytes as f64), crate::chart::bytes(*cap as f64))
            })
            .collect();
        format!("{records} records, {} — {} (reported {})", crate::chart::bytes(bytes as f64), parts.join("; "), self.reported_at)
    }
}

/// The agent detail page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentDetailView {
    pub agent: AgentItem,
    /// Facts as `(label, value)`: kernel, CPUs, memory, enrolled at, ...
    pub facts: Vec<(String, String)>,
    pub connection: ConnectionView,
    /// Host charts (CPU, memory, disk, network).
    pub charts: Vec<Chart>,
    /// The charts' range: one of [`RANGES`].
    pub range: String,
    pub containers: Vec<ContainerRow>,
    pub checks: Vec<CheckRow>,
    pub events: Vec<EventRow>,
    /// Recent log lines (oldest first), matching `log_query`.
    pub logs: Vec<LogRow>,
    pub log_query: String,
    /// Admins: the revoke button is shown.
    pub can_revoke: bool,
}

/// Chart ranges the detail page offers: `(value of ?range=, label)`.
pub const RANGES: [(&str, &str); 4] = [("15m", "15 minutes"), ("1h", "1 hour"), ("6h", "6 hours"), ("24h", "24 hours")];

/// An agent: facts, connection quality, host charts, containers, checks, events, the log
/// tail (history now, live with JavaScript) and, for admins, revoke.
pub fn agent_page(shell: &Shell, view: &AgentDetailView) -> String {
    let agent = &view.agent;
    let id_path = query_escape(&agent.id);
    let actions = if view.can_revoke && agent.status != "revoked" {
        layout::action_button(&format!("/agents/{id_path}/revoke"), "Revoke agent", &[], true)
    } else {
        String::new()
    };
    let mut body = layout::page_header(&agent.hostname, &actions);
    let _ = write!(
        body,
        "<p>{} <span class=\"mono\">{}</span> · org {} · {} {} · agent {}</p><p>{}</p>",
        layout::status_badge(&agent.status),
        escape(&agent.id),
        escape(&agent.org),
        escape(&agent.os),
        escape(&agent.arch),
        escape(&agent.version),
        labels_html(&agent.labels)
    );
    body.push_str("<div class=\"grid\"><section class=\"card\" aria-labelledby=\"facts-h\"><h2 id=\"facts-h\">Host</h2><dl class=\"facts\">");
    for (label, value) in &view.facts {
        let _ = write!(body, "<dt>{}</dt><dd>{}</dd>", escape(label), escape(value));
    }
    let _ = write!(body, "<dt>Last seen</dt><dd>{}</dd>", escape(if agent.last_seen.is_empty() { "never" } else { &agent.last_seen }));
    body.push_str("</dl></section><section class=\"card\" aria-labelledby=\"conn-h\"><h2 id=\"conn-h\">Connection</h2><dl class=\"facts\">");
    let c = &view.connection;
    let backlog = match (&c.spool_backlog, c.online) {
        (Some(backlog), _) => backlog.summary(),
        (None, true) => "not reported (agent older than protocol 3)".into(),
        (None, false) => "unknown while offline".into(),
    };
    let rows: [(&str, String); 7] = [
        ("Round trip", c.rtt_ms.map(|r| format!("{r:.1} ms")).unwrap_or_else(|| "unknown".into())),
        ("Clock skew", c.clock_skew_ms.map(|s| format!("{s} ms")).unwrap_or_else(|| "unknown".into())),
        (
            "Certificate expires",
            if c.cert_days_left < 0 { format!("{} (expired)", c.cert_expires_at) } else { format!("{} (in {} days)", c.cert_expires_at, c.cert_days_left) },
        ),
        ("Connected since", c.connected_since.clone().unwrap_or_else(|| "not connected".into())),
        ("Address", c.remote_addr.clone().unwrap_or_default()),
        ("Spool backlog", backlog),
        ("Spool drops", c.spool_dropped.clone().unwrap_or_else(|| "none reported".into())),
    ];
    for (label, value) in rows {
        let _ = write!(body, "<dt>{label}</dt><dd>{}</dd>", escape(&value));
    }
    if !c.streams.is_empty() {
        let streams = c.streams.iter().map(|(s, seq)| format!("{s} {seq}")).collect::<Vec<_>>().join(", ");
        let _ = write!(body, "<dt>Records stored</dt><dd>{}</dd>", escape(&streams));
    }
    body.push_str("</dl></section></div>");

    body.push_str("<section aria-labelledby=\"charts-h\"><div class=\"page-header\"><h2 id=\"charts-h\">Host metrics</h2>");
    let _ = write!(
        body,
        "<form class=\"filters\" method=\"get\" action=\"/agents/{id_path}\"><div><label for=\"range\">Range</label><select id=\"range\" name=\"range\">"
    );
    for (value, label) in RANGES {
        let selected = if value == view.range { " selected" } else { "" };
        let _ = write!(body, "<option value=\"{value}\"{selected}>{label}</option>");
    }
    body.push_str("</select></div><button type=\"submit\" class=\"secondary\">Show</button></form></div><div class=\"grid\">");
    for (index, chart) in view.charts.iter().enumerate() {
        body.push_str(&chart::render(chart, &format!("chart-{index}")));
    }
    body.push_str("</div></section>");

    body.push_str("<section aria-labelledby=\"containers-h\"><h2 id=\"containers-h\">Containers</h2>");
    let rows: Vec<Vec<Cell>> = view
        .containers
        .iter()
        .map(|ct| {
            vec![
                Cell::text(&ct.name),
                Cell::html(layout::status_badge(if ct.running { "running" } else { "stopped" })),
                Cell::text(&ct.image),
                Cell::text(ct.cpu_percent.map(|v| format!("{v:.1} %")).unwrap_or_default()),
                Cell::text(ct.memory_bytes.map(chart::bytes).unwrap_or_default()),
                Cell::html(format!("<span class=\"mono\">{}</span>", escape(&ct.id))),
            ]
        })
        .collect();
    body.push_str(&layout::table(
        "Containers",
        &["Name", "State", "Image", "CPU", "Memory", "Id"],
        &rows,
        &layout::empty_state("No containers reported", "The agent reports Docker containers when Docker runs on the host."),
    ));
    body.push_str("</section><section aria-labelledby=\"checks-h\"><h2 id=\"checks-h\">Health checks</h2>");
    let rows: Vec<Vec<Cell>> = view
        .checks
        .iter()
        .map(|ch| vec![Cell::text(&ch.name), Cell::text(&ch.kind), Cell::html(layout::status_badge(&ch.state)), Cell::text(&ch.since), Cell::text(&ch.output)])
        .collect();
    body.push_str(&layout::table(
        "Health checks",
        &["Check", "Type", "State", "Since", "Output"],
        &rows,
        &layout::empty_state("No checks on this agent", "Add checks for the org on the API (/api/v1/orgs/{org}/checks)."),
    ));
    body.push_str("</section>");

    let _ = write!(
        body,
        "<section aria-labelledby=\"logs-h\"><div class=\"page-header\"><h2 id=\"logs-h\">Logs</h2><span id=\"log-state\" class=\"live-state js-only hidden\" role=\"status\"></span></div><form class=\"filters\" method=\"get\" action=\"/agents/{id_path}\" role=\"search\" aria-label=\"Search logs\" data-log-search=\"log-lines\"><div><label for=\"log-q\">Search logs</label><input id=\"log-q\" name=\"q\" type=\"search\" value=\"{}\"></div><input type=\"hidden\" name=\"range\" value=\"{}\"><button type=\"submit\">Search</button></form>",
        escape(&view.log_query),
        escape(&view.range)
    );
    let _ = write!(
        body,
        "<ul id=\"log-lines\" class=\"log\" aria-label=\"Log lines, newest last\" tabindex=\"0\" data-live=\"log-tail\" data-state=\"log-state\" data-src=\"/api/v1/agents/{id_path}/logs/stream\">"
    );
    for line in &view.logs {
        let class = if line.stream == "stderr" { " class=\"stderr\"" } else { "" };
        let container = line.container.as_ref().map(|c| format!("[{}] ", escape(c))).unwrap_or_default();
        let _ = write!(body, "<li><span class=\"ts\">{}</span><span{class}>{container}{}</span></li>", escape(&line.ts), escape(&line.line));
    }
    body.push_str("</ul>");
    if view.logs.is_empty() {
        let hint = if view.log_query.is_empty() { "Lines appear here as the agent sends them." } else { "No line matches this search." };
        let _ = write!(body, "<p class=\"muted\">{hint}</p>");
    }
    body.push_str("</section><section aria-labelledby=\"events-h\"><h2 id=\"events-h\">Events</h2>");
    let rows: Vec<Vec<Cell>> = view
        .events
        .iter()
        .map(|e| vec![Cell::text(&e.ts), Cell::html(layout::status_badge(&e.severity)), Cell::text(&e.kind), Cell::text(&e.message)])
        .collect();
    body.push_str(&layout::table(
        "Recent events, newest first",
        &["Time", "Severity", "Kind", "Message"],
        &rows,
        &layout::empty_state("No events yet", "Agent starts, container changes and check transitions show up here."),
    ));
    body.push_str("</section>");
    layout::render(shell, &agent.hostname, &body)
}

/// A token just created, shown once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CreatedToken {
    pub org: String,
    pub token: String,
    /// RFC 3339.
    pub expires_at: String,
    pub uses: u32,
    /// `curl -fsSL <hub>/install.sh | sudo sh -s -- --token TOKEN`.
    pub install_command: String,
}

/// The enrollment page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EnrollmentView {
    /// Orgs where the caller may create tokens: `(id, name)`.
    pub orgs: Vec<(String, String)>,
    /// Org preselected in the form.
    pub org: String,
    pub created: Option<CreatedToken>,
    pub error: Option<String>,
    /// Form values kept after an error.
    pub ttl: String,
    pub uses: String,
    pub labels: String,
}

/// Time-to-live choices of the token form: `(value, label)`.
pub const TOKEN_TTLS: [(&str, &str); 4] = [("1h", "1 hour"), ("24h", "1 day"), ("7d", "7 days"), ("30d", "30 days")];

/// Enrollment: a form that creates a token, and once created the one-line install command
/// with a copy button.
pub fn enrollment_page(shell: &Shell, view: &EnrollmentView) -> String {
    let mut body = layout::page_header("Add a machine", "");
    if let Some(error) = &view.error {
        body.push_str(&layout::error_box(error));
    }
    if let Some(created) = &view.created {
        let _ = write!(
            body,
            "<section class=\"card\" aria-labelledby=\"cmd-h\"><h2 id=\"cmd-h\">Install command for {org}</h2><p>Run this on the server as root. The token is shown only now; it expires {expires} and enrolls {uses} machine{plural}.</p><div class=\"command\"><code id=\"install-command\" tabindex=\"0\">{command}</code><button type=\"button\" class=\"js-only hidden\" data-copy=\"install-command\">Copy</button></div><p class=\"muted\">The agent appears under <a href=\"{agents}\">Agents</a> once it connects.</p></section>",
            org = escape(&created.org),
            expires = escape(&created.expires_at),
            uses = created.uses,
            plural = if created.uses == 1 { "" } else { "s" },
            command = escape(&created.install_command),
            agents = escape(&format!("/agents?org={}", query_escape(&created.org))),
        );
    }
    if view.orgs.is_empty() {
        body.push_str(&layout::empty_state(
            "You cannot create enrollment tokens",
            "Tokens are created by org admins and owners. Ask one to add the machine or to raise your role.",
        ));
        return layout::render(shell, "Add a machine", &body);
    }
    body.push_str("<form class=\"card stacked\" method=\"post\" action=\"/enrollment\"><h2>New enrollment token</h2>");
    let _ = write!(body, "<label for=\"org\">Org</label><select id=\"org\" name=\"org\" required>");
    for (id, name) in &view.orgs {
        let selected = if *id == view.org { " selected" } else { "" };
        let _ = write!(body, "<option value=\"{}\"{selected}>{} ({})</option>", escape(id), escape(name), escape(id));
    }
    body.push_str("</select><label for=\"ttl\">Valid for</label><select id=\"ttl\" name=\"ttl\">");
    let ttl = if view.ttl.is_empty() { "24h" } else { &view.ttl };
    for (value, label) in TOKEN_TTLS {
        let selected = if value == ttl { " selected" } else { "" };
        let _ = write!(body, "<option value=\"{value}\"{selected}>{label}</option>");
    }
    let uses = if view.uses.is_empty() { "1" } else { &view.uses };
    let _ = write!(
        body,
        "</select><label for=\"uses\">Machines it may enroll</label><input id=\"uses\" name=\"uses\" type=\"number\" min=\"1\" max=\"10000\" value=\"{}\" required><label for=\"labels\">Labels <small>(optional, like <code>env=prod, region=eu</code>)</small></label><input id=\"labels\" name=\"labels\" value=\"{}\" aria-describedby=\"labels-help\"><p id=\"labels-help\" class=\"muted\">Every machine enrolled with this token carries these labels.</p><button type=\"submit\">Create token</button></form>",
        escape(uses),
        escape(&view.labels)
    );
    layout::render(shell, "Add a machine", &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Brand, Nav};

    fn shell(brand: &Brand, active: Nav) -> Shell<'_> {
        Shell { user: "ana@example.com", operator: false, admin: false, org: None, brand, active, flash: None }
    }

    fn agent(id: &str, status: &str) -> AgentItem {
        AgentItem {
            id: id.into(),
            org: "acme".into(),
            hostname: format!("<host-{id}>"),
            status: status.into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            version: "0.1.0".into(),
            labels: vec![("env".into(), "prod".into())],
            ..AgentItem::default()
        }
    }

    #[test]
    fn overview_counts_and_empty_states() {
        let brand = Brand::default();
        let html = overview_page(&shell(&brand, Nav::Overview), &OverviewView { can_enroll: true, ..OverviewView::default() });
        assert!(html.contains("No agents yet") && html.contains("Add a machine"));
        assert!(html.contains("Nothing is firing") && html.contains("No deployments yet"));
        assert!(!html.contains("MRR"), "members never see revenue");
        let view = OverviewView {
            online: 3,
            offline: 1,
            alerts: vec![AlertItem {
                summary: "agent <b> is offline".into(),
                agent: Some("agt_1".into()),
                severity: "critical".into(),
                ..AlertItem::default()
            }],
            mrr: Some(vec![("USD".into(), 12_345)]),
            ..OverviewView::default()
        };
        let operator = Shell { operator: true, ..shell(&brand, Nav::Overview) };
        let html = overview_page(&operator, &view);
        assert!(html.contains("<p class=\"stat-value\"><a href=\"/agents?status=online\">3</a>"), "{html}");
        assert!(html.contains("agent &lt;b&gt; is offline") && html.contains("href=\"/agents/agt_1\""));
        assert!(html.contains("MRR") && html.contains("123.45"), "{html}");
    }

    #[test]
    fn filters_match_status_labels_version_and_text() {
        let a = agent("agt_1", "online");
        let f = |status: &str, label: &str, version: &str, q: &str| AgentFilter {
            status: status.into(),
            label: label.into(),
            version: version.into(),
            q: q.into(),
            org: String::new(),
        };
        assert!(f("", "", "", "").matches(&a));
        assert!(f("online", "env=prod", "0.1.0", "HOST-agt").matches(&a));
        assert!(f("", "env", "", "").matches(&a));
        assert!(!f("offline", "", "", "").matches(&a));
        assert!(!f("", "env=dev", "", "").matches(&a));
        assert!(!f("", "", "0.2.0", "").matches(&a));
        assert!(!f("", "", "", "db").matches(&a));
    }

    #[test]
    fn agents_list_escapes_and_keeps_filters() {
        let brand = Brand::default();
        let view = AgentsListView {
            filter: AgentFilter { q: "\"><script>".into(), status: "online".into(), ..AgentFilter::default() },
            agents: vec![agent("agt_1", "online")],
            matched: 1,
            page: 1,
            total: 2,
            versions: vec!["0.1.0".into()],
            ..AgentsListView::default()
        };
        let html = agents_page(&shell(&brand, Nav::Agents), &view);
        assert!(html.contains("&lt;host-agt_1&gt;") && !html.contains("<host-"));
        assert!(html.contains("value=\"&quot;&gt;&lt;script&gt;\""));
        assert!(html.contains("<option value=\"online\" selected>"));
        assert!(html.contains("1 of 2 agents"));
        assert!(!html.contains("Add a machine"), "viewers get no enrollment link");
        let none = agents_page(&shell(&brand, Nav::Agents), &AgentsListView { total: 2, ..AgentsListView::default() });
        assert!(none.contains("No agent matches these filters"));
        let empty = agents_page(&shell(&brand, Nav::Agents), &AgentsListView::default());
        assert!(empty.contains("No agents enrolled"));
        assert!(html.contains("data-live=\"agent-list\" data-src=\"/api/v1/agents/stream\""), "rows follow the live stream");
        assert!(!html.contains("class=\"pager\""), "one page needs no pager");
    }

    #[test]
    fn long_lists_are_paged_and_the_pager_keeps_the_filters() {
        let brand = Brand::default();
        let filter = AgentFilter { status: "online".into(), org: "a&b".into(), ..AgentFilter::default() };
        let agents: Vec<AgentItem> = (0..AGENTS_PER_PAGE).map(|i| agent(&format!("agt_{i}"), "online")).collect();
        let page = |page: usize, agents: Vec<AgentItem>| {
            let view = AgentsListView { filter: filter.clone(), agents, matched: 250, page, total: 300, ..AgentsListView::default() };
            agents_page(&shell(&brand, Nav::Agents), &view)
        };
        let first = page(1, agents.clone());
        assert!(first.contains("250 of 300 agents · showing 1–100"), "{first}");
        assert!(first.contains("<span>Page 1 of 3</span><a rel=\"next\" href=\"/agents?status=online&amp;org=a%26b&amp;page=2\">Next</a>"), "{first}");
        assert!(!first.contains("rel=\"prev\""));
        assert!(first.contains("data-src=\"/api/v1/agents/stream?org=a%26b\""));
        let last = page(3, agents[..50].to_vec());
        assert!(last.contains("showing 201–250") && last.contains("<a rel=\"prev\" href=\"/agents?status=online&amp;org=a%26b&amp;page=2\">Previous</a>"));
        assert!(!last.contains("rel=\"next\""));
        let beyond = page(4, Vec::new());
        assert!(beyond.contains("No agents on this page"), "{beyond}");
        assert_eq!(AgentFilter::default().href(1), "/agents");
    }

    #[test]
    fn the_spool_backlog_says_what_waits_per_class_or_why_it_is_unknown() {
        let brand = Brand::default();
        let mut view = AgentDetailView { agent: agent("agt_1", "offline"), range: "1h".into(), ..AgentDetailView::default() };
        assert!(agent_page(&shell(&brand, Nav::Agents), &view).contains("<dt>Spool backlog</dt><dd>unknown while offline</dd>"));
        view.connection.online = true;
        assert!(agent_page(&shell(&brand, Nav::Agents), &view).contains("<dd>not reported (agent older than protocol 3)</dd>"));
        let at = "2026-12-01T05:00:00Z".to_string();
        view.connection.spool_backlog =
            Some(SpoolBacklog { reported_at: at.clone(), streams: vec![("metrics".into(), 0, 0, 1 << 20), ("logs".into(), 0, 0, 1 << 20)] });
        assert!(agent_page(&shell(&brand, Nav::Agents), &view).contains(&format!("<dd>empty (reported {at})</dd>")));
        view.connection.spool_backlog = Some(SpoolBacklog {
            reported_at: at.clone(),
            streams: vec![("metrics".into(), 2, 1024, 1 << 20), ("logs".into(), 300, 256 * 1024, 1 << 20), ("events".into(), 0, 0, 1 << 20)],
        });
        let html = agent_page(&shell(&brand, Nav::Agents), &view);
        assert!(
            html.contains(&format!(
                "<dd>302 records, 257.0 KiB — metrics 2 (1.0 KiB, 0.1 % of 1.0 MiB); logs 300 (256.0 KiB, 25.0 % of 1.0 MiB) (reported {at})</dd>"
            )),
            "{html}"
        );
    }

    #[test]
    fn revoke_is_shown_only_to_admins() {
        let brand = Brand::default();
        let mut view = AgentDetailView { agent: agent("agt_1", "online"), range: "1h".into(), ..AgentDetailView::default() };
        let html = agent_page(&shell(&brand, Nav::Agents), &view);
        assert!(!html.contains("/revoke") && !html.contains("Revoke"));
        assert!(html.contains("No containers reported") && html.contains("No checks on this agent") && html.contains("No events yet"));
        assert!(html.contains("data-src=\"/api/v1/agents/agt_1/logs/stream\""));
        view.can_revoke = true;
        view.logs = vec![LogRow { ts: "t".into(), stream: "stderr".into(), container: Some("web".into()), line: "<oops>".into() }];
        let html = agent_page(&shell(&brand, Nav::Agents), &view);
        assert!(html.contains("action=\"/agents/agt_1/revoke\"") && html.contains("Revoke agent"));
        assert!(html.contains("[web] &lt;oops&gt;"));
        view.agent.status = "revoked".into();
        assert!(!agent_page(&shell(&brand, Nav::Agents), &view).contains("Revoke agent"), "nothing to revoke twice");
    }

    #[test]
    fn enrollment_shows_the_command_once_created() {
        let brand = Brand::default();
        let html = enrollment_page(&shell(&brand, Nav::Enrollment), &EnrollmentView::default());
        assert!(html.contains("You cannot create enrollment tokens") && !html.contains("<form class=\"card"));
        let view = EnrollmentView {
            orgs: vec![("acme".into(), "Acme".into())],
            created: Some(CreatedToken {
                org: "acme".into(),
                token: "gt1.x".into(),
                uses: 1,
                install_command: "curl -fsSL https://hub/install.sh | sudo sh -s -- --token gt1.x".into(),
                ..CreatedToken::default()
            }),
            ..EnrollmentView::default()
        };
        let html = enrollment_page(&shell(&brand, Nav::Enrollment), &view);
        assert!(html.contains("<code id=\"install-command\" tabindex=\"0\">curl -fsSL https://hub/install.sh | sudo sh -s -- --token gt1.x</code>"));
        assert!(html.contains("data-copy=\"install-command\""));
        assert!(html.contains("<option value=\"24h\" selected>"));
    }
}
