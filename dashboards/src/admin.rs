//! Administration pages: orgs with their plan and subscription (operators), the audit log
//! with filters, and the error page every dashboard page falls back to.
//!
//! Views only: the hub fills the structs from the functions its JSON API uses and says what
//! the caller may do; actions a caller may not take are left out of the page.

use crate::escape;
use crate::layout::{self, Cell, Shell};
use std::fmt::Write;

/// Where the hub serves [`ADMIN_SCRIPT`], the live parts of the deployment pages.
pub const ADMIN_SCRIPT_PATH: &str = "/assets/admin.js";

/// The deployment pages' script (progress per agent over Server-Sent Events).
pub const ADMIN_SCRIPT: &str = include_str!("../assets/admin.js");

/// An error as a whole page: 404 for what does not exist or is not the caller's, 403 for
/// what their role does not allow, 400 for bad input. `message` is text.
pub fn error_page(shell: &Shell, status: u16, message: &str) -> String {
    let title = match status {
        404 => "Not found",
        403 => "Not allowed",
        400..=499 => "Request refused",
        _ => "Something went wrong",
    };
    let mut body = layout::page_header(title, "");
    body.push_str(&layout::error_box(message));
    body.push_str("<p><a href=\"/\">Back to the overview</a></p>");
    layout::render(shell, title, &body)
}

/// One org in the operators' list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrgRow {
    pub id: String,
    pub name: String,
    pub agent_count: u32,
    pub agent_limit: u32,
    /// Plan id and version, or empty without a subscription.
    pub plan: String,
    /// `active`, `trialing`, `past_due`, `suspended`, `canceled`, or empty.
    pub status: String,
    /// End of the current billing period, RFC 3339.
    pub period_end: String,
}

/// The orgs page (operators).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrgsView {
    pub orgs: Vec<OrgRow>,
    /// Plan ids to subscribe a new or existing org to.
    pub plans: Vec<String>,
    pub error: Option<String>,
    /// Values of the create form, kept after an error.
    pub form_id: String,
    pub form_name: String,
}

/// Operators' org list: plan and subscription state, create, suspend and resume.
pub fn orgs_page(shell: &Shell, view: &OrgsView) -> String {
    let mut body = layout::page_header("Orgs", "");
    if let Some(error) = &view.error {
        body.push_str(&layout::error_box(error));
    }
    let rows: Vec<Vec<Cell>> = view
        .orgs
        .iter()
        .map(|o| {
            let action = match o.status.as_str() {
                "" | "canceled" => String::new(),
                "suspended" => layout::action_button(&format!("/orgs/{}/status", o.id), "Resume", &[("status", "active")], false),
                _ => layout::action_button(&format!("/orgs/{}/status", o.id), "Suspend", &[("status", "suspended")], true),
            };
            let status = if o.status.is_empty() { "<span class=\"muted\">no subscription</span>".to_string() } else { layout::status_badge(&o.status) };
            vec![
                Cell::html(format!("<a href=\"/?org={}\">{}</a> <small><code>{}</code></small>", layout::query_escape(&o.id), escape(&o.name), escape(&o.id))),
                Cell::text(format!("{} / {}", o.agent_count, o.agent_limit)),
                Cell::text(if o.plan.is_empty() { "—" } else { &o.plan }),
                Cell::html(status),
                Cell::text(&o.period_end),
                Cell::html(format!("{action} <a href=\"/usage?org={}\">Usage</a>", layout::query_escape(&o.id))),
            ]
        })
        .collect();
    body.push_str(&layout::table(
        "Orgs",
        &["Org", "Agents", "Plan", "Subscription", "Period ends", "Actions"],
        &rows,
        &layout::empty_state("No orgs yet", "Create the first one below."),
    ));
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/orgs\" class=\"card stacked\" id=\"new-org\"><h2>New org</h2>\
<label for=\"o-id\">Id</label><input id=\"o-id\" name=\"id\" value=\"{}\" required aria-describedby=\"o-id-hint\"><small id=\"o-id-hint\">2-40 characters of a-z, 0-9 and '-'; used in URLs</small>\
<label for=\"o-name\">Name</label><input id=\"o-name\" name=\"name\" value=\"{}\">\
<label for=\"o-plan\">Plan</label><select id=\"o-plan\" name=\"plan\"><option value=\"\">No subscription</option>",
        escape(&view.form_id),
        escape(&view.form_name)
    );
    for plan in &view.plans {
        let _ = write!(body, "<option value=\"{0}\">{0}</option>", escape(plan));
    }
    body.push_str("</select><button type=\"submit\">Create org</button></form>");
    layout::render(shell, "Orgs", &body)
}

/// One audit entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditRow {
    pub at: String,
    pub actor: String,
    pub action: String,
    /// `key=value` pairs of the target.
    pub target: String,
    /// HTTP status or outcome word.
    pub outcome: String,
    pub client_ip: String,
}

/// The audit log page with its filters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditView {
    /// The org, or `None` for the whole log (operators).
    pub org: Option<String>,
    pub actor: String,
    pub action: String,
    pub from: String,
    pub to: String,
    pub entries: Vec<AuditRow>,
    /// Cursor of the next (older) page, if any.
    pub next_cursor: Option<String>,
    pub error: Option<String>,
}

/// The audit log, newest first, with filters by actor, action and time.
pub fn audit_page(shell: &Shell, view: &AuditView) -> String {
    let title = match &view.org {
        Some(org) => format!("Audit log of {org}"),
        None => "Audit log".to_string(),
    };
    let mut body = layout::page_header(&title, "");
    let _ = write!(body, "<form method=\"get\" action=\"/audit\" class=\"filters\" role=\"search\">");
    if let Some(org) = &view.org {
        let _ = write!(body, "<input type=\"hidden\" name=\"org\" value=\"{}\">", escape(org));
    }
    for (name, label, value, hint) in [
        ("actor", "Actor", &view.actor, "ops@example.com"),
        ("action", "Action starts with", &view.action, "POST /api/v1/orgs"),
        ("from", "From", &view.from, "2026-01-01T00:00:00Z"),
        ("to", "To", &view.to, "RFC 3339"),
    ] {
        let _ = write!(
            body,
            "<div><label for=\"a-{name}\">{label}</label><input id=\"a-{name}\" name=\"{name}\" value=\"{}\" placeholder=\"{hint}\"></div>",
            escape(value)
        );
    }
    body.push_str("<button type=\"submit\">Filter</button></form>");
    if let Some(error) = &view.error {
        body.push_str(&layout::error_box(error));
    }
    let rows: Vec<Vec<Cell>> = view
        .entries
        .iter()
        .map(|e| {
            vec![
                Cell::text(&e.at),
                Cell::text(&e.actor),
                Cell::html(format!("<code>{}</code>", escape(&e.action))),
                Cell::text(&e.target),
                Cell::html(layout::status_badge(&e.outcome)),
                Cell::text(&e.client_ip),
            ]
        })
        .collect();
    body.push_str(&layout::table(
        "Audit entries",
        &["When", "Actor", "Action", "Target", "Outcome", "From"],
        &rows,
        &layout::empty_state("No entries", "Nothing matches these filters."),
    ));
    if let Some(cursor) = &view.next_cursor {
        let mut query = vec![("cursor", cursor.as_str())];
        if let Some(org) = &view.org {
            query.push(("org", org));
        }
        for (k, v) in [("actor", &view.actor), ("action", &view.action), ("from", &view.from), ("to", &view.to)] {
            if !v.is_empty() {
                query.push((k, v));
            }
        }
        let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={}", layout::query_escape(v))).collect();
        let _ = write!(body, "<p><a class=\"button secondary\" href=\"/audit?{}\">Older entries</a></p>", escape(&query.join("&")));
    }
    layout::render(shell, "Audit log", &body)
}

/// One member of an org.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemberRow {
    pub email: String,
    /// `owner`, `admin`, `deployer`, `viewer` or `billing`.
    pub role: String,
    pub added_at: String,
    pub disabled: bool,
}

/// One API key of an org (never its secret).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyRow {
    pub id: String,
    pub name: String,
    pub scopes: String,
    pub created_by: String,
    pub last_used_at: String,
    /// `active`, `expired` or `revoked`.
    pub state: String,
}

/// The users page of one org: members and their roles, API keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsersView {
    pub org: String,
    pub members: Vec<MemberRow>,
    /// `None` when the caller may not see keys (they need the admin permission).
    pub keys: Option<Vec<KeyRow>>,
    /// The caller may revoke keys.
    pub can_admin: bool,
}

/// Members with their roles, and the org's API keys with a revoke button for admins.
pub fn users_page(shell: &Shell, view: &UsersView) -> String {
    let mut body = layout::page_header(&format!("Users of {}", view.org), "");
    let rows: Vec<Vec<Cell>> = view
        .members
        .iter()
        .map(|m| {
            vec![Cell::text(&m.email), Cell::html(layout::status_badge(&m.role)), Cell::text(&m.added_at), Cell::text(if m.disabled { "disabled" } else { "" })]
        })
        .collect();
    body.push_str(&layout::table(
        "Members",
        &["Email", "Role", "Added", ""],
        &rows,
        &layout::empty_state("No members", "Invite people with POST /api/v1/orgs/ORG/invitations."),
    ));
    body.push_str("<h2>API keys</h2>");
    match &view.keys {
        None => body.push_str("<p class=\"muted\">Only admins of the org see its API keys.</p>"),
        Some(keys) => {
            let rows: Vec<Vec<Cell>> = keys
                .iter()
                .map(|k| {
                    let action = if view.can_admin && k.state == "active" {
                        layout::action_button(&format!("/orgs/{}/api-keys/{}/revoke", view.org, k.id), "Revoke", &[], true)
                    } else {
                        String::new()
                    };
                    vec![
                        Cell::text(&k.name),
                        Cell::text(&k.scopes),
                        Cell::text(&k.created_by),
                        Cell::text(&k.last_used_at),
                        Cell::html(layout::status_badge(&k.state)),
                        Cell::html(action),
                    ]
                })
                .collect();
            body.push_str(&layout::table(
                "API keys",
                &["Name", "Scopes", "Created by", "Last used", "State", ""],
                &rows,
                &layout::empty_state("No API keys", "Create one with POST /api/v1/orgs/ORG/api-keys."),
            ));
        }
    }
    layout::render(shell, "Users", &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Brand, Nav};

    fn shell(brand: &Brand, active: Nav) -> Shell<'_> {
        Shell { user: "ops@example.com", operator: true, admin: true, org: None, brand, active, flash: None }
    }

    #[test]
    fn orgs_show_subscription_state_and_the_matching_action() {
        let brand = Brand::default();
        let view = OrgsView {
            orgs: vec![
                OrgRow {
                    id: "acme".into(),
                    name: "Acme <Inc>".into(),
                    agent_count: 2,
                    agent_limit: 10,
                    plan: "pro v1".into(),
                    status: "active".into(),
                    period_end: "2026-02-01T00:00:00Z".into(),
                },
                OrgRow { id: "beta".into(), name: "Beta".into(), status: "suspended".into(), ..OrgRow::default() },
                OrgRow { id: "gamma".into(), name: "Gamma".into(), ..OrgRow::default() },
            ],
            plans: vec!["pro".into()],
            error: Some("org id \"A\" must be 2-40 characters".into()),
            form_id: "A".into(),
            form_name: String::new(),
        };
        let html = orgs_page(&shell(&brand, Nav::Orgs), &view);
        assert!(html.contains("Acme &lt;Inc&gt;") && html.contains("2 / 10"));
        assert!(html.contains("action=\"/orgs/acme/status\"") && html.contains(">Suspend</button>"));
        assert!(html.contains("action=\"/orgs/beta/status\"") && html.contains(">Resume</button>"));
        assert!(!html.contains("/orgs/gamma/status"), "nothing to suspend without a subscription");
        assert!(html.contains("status-suspended\">suspended"));
        assert!(html.contains("role=\"alert\"") && html.contains("value=\"A\""));
        assert!(html.contains("<option value=\"pro\">pro</option>"));
    }

    #[test]
    fn audit_keeps_filters_and_pages_on() {
        let brand = Brand::default();
        let view = AuditView {
            org: Some("acme".into()),
            actor: "ana@example.com".into(),
            entries: vec![AuditRow {
                at: "2026-01-01T00:00:00Z".into(),
                actor: "ana@example.com".into(),
                action: "POST /api/v1/orgs/{org}/deployments".into(),
                target: "org=acme".into(),
                outcome: "201".into(),
                client_ip: "127.0.0.1".into(),
            }],
            next_cursor: Some("c1".into()),
            ..AuditView::default()
        };
        let html = audit_page(&shell(&brand, Nav::Audit), &view);
        assert!(html.contains("name=\"actor\" value=\"ana@example.com\""));
        assert!(html.contains("<input type=\"hidden\" name=\"org\" value=\"acme\">"));
        assert!(html.contains("<code>POST /api/v1/orgs/{org}/deployments</code>"));
        assert!(html.contains("href=\"/audit?cursor=c1&amp;org=acme&amp;actor=ana%40example.com\""), "{html}");
        let empty = audit_page(&shell(&brand, Nav::Audit), &AuditView::default());
        assert!(empty.contains("No entries") && !empty.contains("Older entries"));
    }

    #[test]
    fn users_show_roles_and_keys_without_secrets() {
        let brand = Brand::default();
        let view = UsersView {
            org: "acme".into(),
            members: vec![MemberRow { email: "ana@example.com".into(), role: "viewer".into(), ..MemberRow::default() }],
            keys: Some(vec![KeyRow { id: "key_1".into(), name: "ci".into(), scopes: "deploy".into(), state: "active".into(), ..KeyRow::default() }]),
            can_admin: true,
        };
        let html = users_page(&shell(&brand, Nav::Users), &view);
        assert!(html.contains("ana@example.com") && html.contains("status-viewer\">viewer"));
        assert!(html.contains("action=\"/orgs/acme/api-keys/key_1/revoke\""));
        let member = users_page(&shell(&brand, Nav::Users), &UsersView { keys: None, can_admin: false, ..view });
        assert!(member.contains("Only admins") && !member.contains("Revoke"));
    }

    #[test]
    fn error_page_says_what_happened() {
        let brand = Brand::default();
        let html = error_page(&shell(&brand, Nav::Deployments), 404, "deployment <dep_9> not found");
        assert!(html.contains("<title>Not found · Gantry</title>"));
        assert!(html.contains("deployment &lt;dep_9&gt; not found"));
    }
}
