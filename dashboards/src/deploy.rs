//! Deployment pages: the org's deployments with a create form (fields or a pasted spec),
//! and one deployment's progress per agent (live through [`ADMIN_SCRIPT_PATH`]), its
//! revisions with what each changed, and rollback.
//!
//! Views only: the hub fills the structs below from the same functions its JSON API uses
//! and decides what the caller may do (`can_deploy`); buttons a caller may not use are left
//! out, never just disabled.

use crate::layout::{self, Cell, Shell};
use crate::{escape, ADMIN_SCRIPT_PATH};
use std::fmt::Write;

/// One deployment in the list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeploymentRow {
    pub id: String,
    pub name: String,
    pub revision: u64,
    /// Targets as text: agent ids and `key=value` selectors.
    pub targets: String,
    /// Agents healthy on the current revision, of all targeted.
    pub healthy: usize,
    pub total: usize,
    /// RFC 3339.
    pub updated_at: String,
}

/// What the create form holds (kept when it is shown again with an error).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeployForm {
    pub name: String,
    pub image: String,
    /// A shell command the container runs (`sh -c`), or empty for the image's own.
    pub command: String,
    /// Comma-separated agent ids and `key=value` label selectors.
    pub targets: String,
    /// A whole deployment spec as JSON; when given, it replaces name, image and command.
    pub spec: String,
}

/// The deployments page of one org.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeploymentsView {
    pub org: String,
    pub deployments: Vec<DeploymentRow>,
    /// The caller may create deployments (the form is shown).
    pub can_deploy: bool,
    /// The org's agents as (id, hostname), listed as a hint under the targets field.
    pub agents: Vec<(String, String)>,
    pub form: DeployForm,
    /// Why the last submission was refused.
    pub error: Option<String>,
}

/// One agent's progress on a deployment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentProgress {
    pub agent: String,
    pub hostname: String,
    /// The revision it reported on, if it reported.
    pub revision: Option<u64>,
    /// `pending`, `applying`, `healthy`, `rolled_back`, `failed` or `removed`.
    pub state: String,
    pub message: String,
    pub updated_at: String,
}

/// One changed value between two revisions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiffLine {
    /// Where, e.g. `spec.services[0].image`.
    pub path: String,
    /// JSON text before and after (`null` when absent).
    pub before: String,
    pub after: String,
}

/// One revision with its changes against the one before.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RevisionRow {
    pub revision: u64,
    pub change: String,
    pub created_by: String,
    pub created_at: String,
    pub diff: Vec<DiffLine>,
}

/// One deployment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeploymentDetail {
    pub id: String,
    pub org: String,
    pub name: String,
    pub revision: u64,
    pub targets: String,
    pub deleted: bool,
    /// `rolling`/`stopped` with its reason, when a rolling update is under way.
    pub rollout: Option<String>,
    pub agents: Vec<AgentProgress>,
    /// Newest first.
    pub revisions: Vec<RevisionRow>,
    /// The current spec, pretty JSON.
    pub spec_json: String,
    pub can_deploy: bool,
    pub error: Option<String>,
}

/// The deployments list with the create form.
pub fn deployments_page(shell: &Shell, view: &DeploymentsView) -> String {
    let mut body = layout::page_header(&format!("Deployments of {}", view.org), "");
    if let Some(error) = &view.error {
        body.push_str(&layout::error_box(error));
    }
    let rows: Vec<Vec<Cell>> = view
        .deployments
        .iter()
        .map(|d| {
            let progress = if d.total > 0 && d.healthy == d.total { "healthy" } else { "pending" };
            vec![
                Cell::html(format!("<a href=\"/deployments/{}\">{}</a>", escape(&d.id), escape(&d.name))),
                Cell::text(d.revision.to_string()),
                Cell::text(&d.targets),
                Cell::html(format!("{} <small>{} of {} healthy</small>", layout::status_badge(progress), d.healthy, d.total)),
                Cell::text(&d.updated_at),
            ]
        })
        .collect();
    let hint = if view.can_deploy { "Create one with the form below." } else { "Someone with the Deploy role can create one." };
    body.push_str(&layout::table(
        "Deployments",
        &["Name", "Revision", "Targets", "Progress", "Updated"],
        &rows,
        &layout::empty_state("No deployments yet", hint),
    ));
    if view.can_deploy {
        body.push_str(&create_form(view));
    }
    layout::render(shell, "Deployments", &body)
}

fn create_form(view: &DeploymentsView) -> String {
    let f = &view.form;
    let mut html = String::new();
    let _ = write!(
        html,
        "<form method=\"post\" action=\"/orgs/{org}/deployments\" class=\"card stacked\" id=\"new-deployment\"><h2>New deployment</h2>\
<label for=\"d-name\">Name</label><input id=\"d-name\" name=\"name\" value=\"{name}\" pattern=\"[a-z0-9-]{{1,63}}\" aria-describedby=\"d-name-hint\"><small id=\"d-name-hint\">a-z, 0-9 and '-'; unique in the org</small>\
<label for=\"d-image\">Image</label><input id=\"d-image\" name=\"image\" value=\"{image}\" placeholder=\"registry.example.com/app:1.4\">\
<label for=\"d-command\">Command <small>(optional, run with sh -c)</small></label><input id=\"d-command\" name=\"command\" value=\"{command}\">\
<label for=\"d-targets\">Targets</label><input id=\"d-targets\" name=\"targets\" value=\"{targets}\" required aria-describedby=\"d-targets-hint\" placeholder=\"agent ids, or labels like env=prod\">\
<small id=\"d-targets-hint\">Comma-separated agent ids and key=value labels.",
        org = escape(&view.org),
        name = escape(&f.name),
        image = escape(&f.image),
        command = escape(&f.command),
        targets = escape(&f.targets),
    );
    if !view.agents.is_empty() {
        html.push_str(" Agents: ");
        let list: Vec<String> = view.agents.iter().map(|(id, host)| format!("<code>{}</code> ({})", escape(id), escape(host))).collect();
        html.push_str(&list.join(", "));
    }
    let _ = write!(
        html,
        "</small><details{open}><summary>Or paste a whole spec (JSON)</summary><label for=\"d-spec\">Spec</label><textarea id=\"d-spec\" name=\"spec\" spellcheck=\"false\">{spec}</textarea>\
<small>With a spec, the name, image and command fields are ignored.</small></details><button type=\"submit\">Deploy</button></form>",
        open = if f.spec.is_empty() { "" } else { " open" },
        spec = escape(&f.spec),
    );
    html
}

/// One deployment: progress per agent (live), revisions with their changes, rollback.
pub fn deployment_page(shell: &Shell, view: &DeploymentDetail) -> String {
    let back = format!("<a class=\"button secondary\" href=\"/deployments?org={}\">All deployments</a>", layout::query_escape(&view.org));
    let mut body = layout::page_header(&format!("Deployment {}", view.name), &back);
    if let Some(error) = &view.error {
        body.push_str(&layout::error_box(error));
    }
    let _ = write!(
        body,
        "<dl class=\"facts card\"><dt>Id</dt><dd><code>{}</code></dd><dt>Org</dt><dd>{}</dd><dt>Revision</dt><dd id=\"current-revision\">{}</dd><dt>Targets</dt><dd>{}</dd>",
        escape(&view.id),
        escape(&view.org),
        view.revision,
        escape(&view.targets),
    );
    if let Some(rollout) = &view.rollout {
        let _ = write!(body, "<dt>Rollout</dt><dd>{}</dd>", escape(rollout));
    }
    if view.deleted {
        body.push_str("<dt>State</dt><dd>deleted</dd>");
    }
    body.push_str("</dl>");

    let healthy = view.agents.iter().filter(|a| a.state == "healthy" && a.revision == Some(view.revision)).count();
    let _ = write!(
        body,
        "<h2>Progress</h2><p id=\"progress-summary\" role=\"status\" aria-live=\"polite\">{healthy} of {} agents healthy on revision {}</p>",
        view.agents.len(),
        view.revision
    );
    if view.agents.is_empty() {
        body.push_str(&layout::empty_state("No target agents", "No agent of the org matches the targets yet; matching agents join when they enroll."));
    } else {
        let _ = write!(
            body,
            "<div class=\"table-wrap\"><table id=\"progress\"><caption>Agents <small id=\"progress-live\" class=\"muted\"></small></caption><thead><tr><th scope=\"col\">Agent</th><th scope=\"col\">State</th><th scope=\"col\">Revision</th><th scope=\"col\">Message</th><th scope=\"col\">Updated</th></tr></thead>\
<tbody data-live=\"deploy-progress\" data-src=\"/api/v1/deployments/{}/progress\" data-revision=\"{}\" data-summary=\"progress-summary\" data-state=\"progress-live\">",
            escape(&view.id),
            view.revision
        );
        for a in &view.agents {
            let _ = write!(
                body,
                "<tr data-agent=\"{id}\"><td><a href=\"/agents/{id}\">{host}</a></td><td class=\"state\">{state}</td><td class=\"rev\">{rev}</td><td class=\"msg\">{msg}</td><td class=\"at\">{at}</td></tr>",
                id = escape(&a.agent),
                host = escape(if a.hostname.is_empty() { &a.agent } else { &a.hostname }),
                state = layout::status_badge(&a.state),
                rev = a.revision.map(|r| r.to_string()).unwrap_or_default(),
                msg = escape(&a.message),
                at = escape(&a.updated_at),
            );
        }
        body.push_str("</tbody></table></div>");
    }

    body.push_str("<h2>Revisions</h2>");
    for r in &view.revisions {
        let current = r.revision == view.revision;
        let _ = write!(
            body,
            "<section class=\"card revision\" id=\"revision-{}\"><h3>Revision {}{}</h3><p>{} <small>by {} at {}</small></p>",
            r.revision,
            r.revision,
            if current { " <span class=\"badge\">current</span>" } else { "" },
            escape(&r.change),
            escape(&r.created_by),
            escape(&r.created_at),
        );
        if !r.diff.is_empty() {
            let rows: Vec<Vec<Cell>> = r
                .diff
                .iter()
                .map(|d| {
                    vec![
                        Cell::html(format!("<code>{}</code>", escape(&d.path))),
                        Cell::html(format!("<del>{}</del>", escape(&d.before))),
                        Cell::html(format!("<ins>{}</ins>", escape(&d.after))),
                    ]
                })
                .collect();
            body.push_str(&layout::table(&format!("Changes in revision {}", r.revision), &["Field", "Before", "After"], &rows, ""));
        }
        if view.can_deploy && !current && !view.deleted {
            let revision = r.revision.to_string();
            body.push_str(&layout::action_button(
                &format!("/deployments/{}/rollback", view.id),
                &format!("Roll back to revision {}", r.revision),
                &[("revision", &revision)],
                false,
            ));
        }
        body.push_str("</section>");
    }
    let _ = write!(body, "<details><summary>Current spec</summary><pre><code>{}</code></pre></details>", escape(&view.spec_json));
    let _ = write!(body, "<script src=\"{ADMIN_SCRIPT_PATH}\" defer></script>");
    layout::render(shell, &format!("Deployment {}", view.name), &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Brand, Nav};

    fn shell(brand: &Brand) -> Shell<'_> {
        Shell { user: "dev@example.com", operator: false, admin: false, org: Some("acme"), brand, active: Nav::Deployments, flash: None }
    }

    #[test]
    fn list_shows_progress_and_form_only_to_deployers() {
        let brand = Brand::default();
        let mut view = DeploymentsView {
            org: "acme".into(),
            deployments: vec![DeploymentRow {
                id: "dep_1".into(),
                name: "web<1>".into(),
                revision: 3,
                targets: "env=prod".into(),
                healthy: 2,
                total: 2,
                updated_at: "2026-01-01T00:00:00Z".into(),
            }],
            can_deploy: true,
            agents: vec![("agt_1".into(), "vps-1".into())],
            form: DeployForm { spec: "{\"name\":\"x\"}".into(), ..DeployForm::default() },
            error: Some("spec.name is invalid".into()),
        };
        let html = deployments_page(&shell(&brand), &view);
        assert!(html.contains("href=\"/deployments/dep_1\">web&lt;1&gt;</a>"), "{html}");
        assert!(html.contains("status-healthy\">healthy</span> <small>2 of 2 healthy"));
        assert!(html.contains("action=\"/orgs/acme/deployments\"") && html.contains("<details open>"));
        assert!(html.contains("role=\"alert\"><p>spec.name is invalid"));
        assert!(html.contains("<code>agt_1</code> (vps-1)"));
        view.can_deploy = false;
        view.deployments.clear();
        let html = deployments_page(&shell(&brand), &view);
        assert!(!html.contains("<form method=\"post\" action=\"/orgs/acme/deployments\""), "viewers get no form");
        assert!(html.contains("No deployments yet"));
    }

    #[test]
    fn detail_shows_agents_diff_and_rollback() {
        let brand = Brand::default();
        let view = DeploymentDetail {
            id: "dep_1".into(),
            org: "acme".into(),
            name: "web".into(),
            revision: 2,
            targets: "agt_1".into(),
            agents: vec![AgentProgress {
                agent: "agt_1".into(),
                hostname: "vps-1".into(),
                revision: Some(2),
                state: "healthy".into(),
                ..AgentProgress::default()
            }],
            revisions: vec![
                RevisionRow {
                    revision: 2,
                    change: "updated: spec.services[0].image".into(),
                    diff: vec![DiffLine { path: "spec.services[0].image".into(), before: "\"app:1\"".into(), after: "\"app:2\"".into() }],
                    ..RevisionRow::default()
                },
                RevisionRow { revision: 1, change: "created".into(), ..RevisionRow::default() },
            ],
            can_deploy: true,
            ..DeploymentDetail::default()
        };
        let html = deployment_page(&shell(&brand), &view);
        assert!(html.contains("1 of 1 agents healthy on revision 2"));
        assert!(html.contains("data-live=\"deploy-progress\" data-src=\"/api/v1/deployments/dep_1/progress\""));
        assert!(html.contains("<tr data-agent=\"agt_1\">"));
        assert!(html.contains("<del>&quot;app:1&quot;</del>") && html.contains("<ins>&quot;app:2&quot;</ins>"));
        assert!(html.contains("Roll back to revision 1") && !html.contains("Roll back to revision 2"));
        assert!(html.contains(&format!("<script src=\"{ADMIN_SCRIPT_PATH}\"")));
        let viewer = deployment_page(&shell(&brand), &DeploymentDetail { can_deploy: false, ..view });
        assert!(!viewer.contains("Roll back"), "viewers get no rollback");
    }
}
