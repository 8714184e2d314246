//! The alerts page: an org's alerts by status (open, resolved, all), acknowledge, and a
//! form to silence a rule or an agent for a while.
//!
//! Views only: the hub fills [`AlertsView`] from the alert API's own handlers and says
//! whether the caller may act (`can_act`); without it the buttons and form are left out.

use crate::escape;
use crate::layout::{self, Cell, Shell};
use std::fmt::Write;

/// One alert.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertRow {
    pub id: String,
    pub rule: String,
    pub severity: String,
    pub summary: String,
    /// `firing`, `acknowledged` or `resolved`.
    pub status: String,
    pub agent: String,
    pub started_at: String,
    /// Who acknowledged it, if anyone.
    pub acknowledged_by: String,
}

/// The alerts page of one org.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertsView {
    pub org: String,
    /// The status filter: `open`, `resolved` or `all`.
    pub status: String,
    pub alerts: Vec<AlertRow>,
    /// Rule names a silence may name.
    pub rules: Vec<String>,
    /// The caller may acknowledge and silence.
    pub can_act: bool,
    pub error: Option<String>,
}

/// Alerts with acknowledge buttons and the silence form.
pub fn alerts_page(shell: &Shell, view: &AlertsView) -> String {
    let mut body = layout::page_header(&format!("Alerts of {}", view.org), "");
    let _ = write!(
        body,
        "<form method=\"get\" action=\"/alerts\" class=\"filters\"><input type=\"hidden\" name=\"org\" value=\"{}\"><div><label for=\"al-status\">Status</label><select id=\"al-status\" name=\"status\">",
        escape(&view.org)
    );
    for status in ["open", "resolved", "all"] {
        let selected = if view.status == status { " selected" } else { "" };
        let _ = write!(body, "<option value=\"{status}\"{selected}>{status}</option>");
    }
    body.push_str("</select></div><button type=\"submit\">Show</button></form>");
    if let Some(error) = &view.error {
        body.push_str(&layout::error_box(error));
    }
    let rows: Vec<Vec<Cell>> = view
        .alerts
        .iter()
        .map(|a| {
            let action = if view.can_act && a.status == "firing" {
                layout::action_button(&format!("/orgs/{}/alerts/{}/acknowledge", view.org, a.id), "Acknowledge", &[], false)
            } else if !a.acknowledged_by.is_empty() {
                format!("<small>by {}</small>", escape(&a.acknowledged_by))
            } else {
                String::new()
            };
            vec![
                Cell::html(layout::status_badge(&a.status)),
                Cell::text(&a.severity),
                Cell::text(&a.rule),
                Cell::text(&a.summary),
                Cell::text(&a.agent),
                Cell::text(&a.started_at),
                Cell::html(action),
            ]
        })
        .collect();
    let empty = layout::empty_state("No alerts", "Nothing is firing. Alerts appear when an agent goes offline, a check fails or a deployment fails.");
    body.push_str(&layout::table("Alerts", &["Status", "Severity", "Rule", "Summary", "Agent", "Since", ""], &rows, &empty));
    if view.can_act {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/orgs/{}/silences\" class=\"card stacked\" id=\"new-silence\"><h2>Silence</h2><p class=\"muted\">No notifications for matching alerts while the silence lasts.</p><label for=\"s-rule\">Rule</label><select id=\"s-rule\" name=\"rule\"><option value=\"\">Any rule</option>",
            escape(&view.org)
        );
        for rule in &view.rules {
            let _ = write!(body, "<option value=\"{0}\">{0}</option>", escape(rule));
        }
        body.push_str(
            "</select><label for=\"s-agent\">Agent id <small>(optional)</small></label><input id=\"s-agent\" name=\"agent\">\
<label for=\"s-duration\">For</label><input id=\"s-duration\" name=\"duration\" value=\"1h\" required placeholder=\"90m, 4h, 2d\">\
<label for=\"s-reason\">Reason</label><input id=\"s-reason\" name=\"reason\"><button type=\"submit\">Silence</button></form>",
        );
    }
    layout::render(shell, "Alerts", &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Brand, Nav};

    #[test]
    fn firing_alerts_can_be_acknowledged_by_those_allowed() {
        let brand = Brand::default();
        let shell = Shell { user: "dev@example.com", operator: false, admin: false, org: Some("acme"), brand: &brand, active: Nav::Alerts, flash: None };
        let mut view = AlertsView {
            org: "acme".into(),
            status: "open".into(),
            alerts: vec![
                AlertRow {
                    id: "al_1".into(),
                    rule: "agent_offline".into(),
                    status: "firing".into(),
                    summary: "agent <vps-1> offline".into(),
                    ..AlertRow::default()
                },
                AlertRow { id: "al_2".into(), status: "acknowledged".into(), acknowledged_by: "ana@example.com".into(), ..AlertRow::default() },
            ],
            rules: vec!["agent_offline".into()],
            can_act: true,
            error: None,
        };
        let html = alerts_page(&shell, &view);
        assert!(html.contains("action=\"/orgs/acme/alerts/al_1/acknowledge\""));
        assert!(!html.contains("/alerts/al_2/acknowledge"), "only firing alerts are acknowledged");
        assert!(html.contains("by ana@example.com") && html.contains("agent &lt;vps-1&gt; offline"));
        assert!(html.contains("id=\"new-silence\"") && html.contains("<option value=\"open\" selected>"));
        view.can_act = false;
        let html = alerts_page(&shell, &view);
        assert!(!html.contains("Acknowledge") && !html.contains("new-silence"));
        view.alerts.clear();
        assert!(alerts_page(&shell, &view).contains("No alerts"));
    }
}
