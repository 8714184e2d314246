//! The webhook pages of an org: its endpoints with the outcome of their latest delivery,
//! the form that creates one (its signing secret shown once), and an endpoint's delivery
//! log with a Redeliver button per delivery.
//!
//! Views only: the hub fills the structs from the webhook API's own handlers. Managing
//! webhooks needs the admin permission, which the hub checks before any of these views is
//! drawn, so every action here is one the viewer may take.

use crate::escape;
use crate::layout::{self, Cell, Shell};
use std::fmt::Write;

/// The latest delivery of an endpoint, as its list shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LastDelivery {
    /// `pending`, `succeeded` or `failed`.
    pub status: String,
    pub at: String,
    /// The HTTP status of its latest attempt, if the endpoint answered.
    pub response_code: Option<u16>,
}

/// One endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookRow {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    pub description: String,
    pub enabled: bool,
    /// `None` before its first delivery.
    pub last: Option<LastDelivery>,
}

/// An endpoint just created, with the secret its deliveries are signed with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreatedWebhook {
    pub id: String,
    pub secret: String,
}

/// The webhooks page of one org.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhooksView {
    pub org: String,
    pub webhooks: Vec<WebhookRow>,
    /// The event types an endpoint may subscribe to (besides `*`, all of them).
    pub event_types: Vec<String>,
    /// Set on the answer that created an endpoint, and only there.
    pub created: Option<CreatedWebhook>,
    pub error: Option<String>,
    /// What the create form held, kept after an error.
    pub form_url: String,
    pub form_events: Vec<String>,
    pub form_description: String,
}

/// One delivery in an endpoint's log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryRow {
    pub id: String,
    pub event_type: String,
    /// `pending`, `succeeded` or `failed`.
    pub status: String,
    pub attempts: usize,
    /// The HTTP status of the latest attempt, if the endpoint answered.
    pub response_code: Option<u16>,
    /// Why the latest attempt or the delivery failed, if it did.
    pub error: String,
    pub created_at: String,
    /// The delivery this one repeats, for redeliveries.
    pub redelivery_of: String,
}

/// An endpoint's delivery log, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveriesView {
    pub org: String,
    pub webhook: WebhookRow,
    pub deliveries: Vec<DeliveryRow>,
    /// Id of the oldest delivery shown, when older ones exist.
    pub next_before: Option<String>,
    pub error: Option<String>,
}

/// The path of an endpoint's delivery log page.
pub fn deliveries_href(org: &str, webhook: &str) -> String {
    format!("/webhooks/{}?org={}", layout::query_escape(webhook), layout::query_escape(org))
}

fn form_action(org: &str, rest: &str) -> String {
    format!("/orgs/{}/webhooks{rest}", layout::query_escape(org))
}

fn enabled_badge(enabled: bool) -> String {
    layout::status_badge(if enabled { "enabled" } else { "disabled" })
}

fn response_text(code: Option<u16>) -> String {
    code.map_or_else(|| "—".to_string(), |c| c.to_string())
}

/// The org's endpoints and the create form.
pub fn webhooks_page(shell: &Shell, view: &WebhooksView) -> String {
    let mut body = layout::page_header(&format!("Webhooks of {}", view.org), "");
    body.push_str("<p class=\"muted\">Gantry sends signed JSON events to these URLs, retrying for a day until they answer 2xx.</p>");
    if let Some(created) = &view.created {
        let _ = write!(
            body,
            "<section class=\"card\" aria-labelledby=\"secret-h\"><h2 id=\"secret-h\">Signing secret of {id}</h2><p>Verify the <code>Gantry-Signature</code> header of each delivery with this secret. It is shown only now.</p><div class=\"command\"><code id=\"webhook-secret\" tabindex=\"0\">{secret}</code><button type=\"button\" class=\"js-only hidden\" data-copy=\"webhook-secret\">Copy</button></div></section>",
            id = escape(&created.id),
            secret = escape(&created.secret),
        );
    }
    if let Some(error) = &view.error {
        body.push_str(&layout::error_box(error));
    }
    let rows: Vec<Vec<Cell>> = view
        .webhooks
        .iter()
        .map(|w| {
            let last = match &w.last {
                Some(last) => {
                    format!("{} <small>{} · HTTP {}</small>", layout::status_badge(&last.status), escape(&last.at), response_text(last.response_code))
                }
                None => "<span class=\"muted\">no deliveries yet</span>".to_string(),
            };
            let description = if w.description.is_empty() { String::new() } else { format!("<br><small>{}</small>", escape(&w.description)) };
            vec![
                Cell::html(format!("<a href=\"{}\"><code>{}</code></a>{description}", escape(&deliveries_href(&view.org, &w.id)), escape(&w.url))),
                Cell::text(w.events.join(", ")),
                Cell::html(enabled_badge(w.enabled)),
                Cell::html(last),
                Cell::html(format!(
                    "<a href=\"{}\">Deliveries</a> {}",
                    escape(&deliveries_href(&view.org, &w.id)),
                    layout::action_button(&form_action(&view.org, &format!("/{}/delete", layout::query_escape(&w.id))), "Delete", &[], true)
                )),
            ]
        })
        .collect();
    body.push_str(&layout::table(
        "Webhook endpoints",
        &["URL", "Events", "State", "Latest delivery", "Actions"],
        &rows,
        &layout::empty_state("No webhook endpoints", "Add one below to have events sent to your systems."),
    ));
    create_form(&mut body, view);
    layout::render(shell, "Webhooks", &body)
}

fn create_form(body: &mut String, view: &WebhooksView) {
    let _ = write!(
        body,
        "<form method=\"post\" action=\"{}\" class=\"card stacked\" id=\"new-webhook\"><h2>New endpoint</h2>\
<label for=\"w-url\">URL</label><input id=\"w-url\" name=\"url\" type=\"url\" value=\"{}\" required placeholder=\"https://hooks.example.com/gantry\">\
<fieldset><legend>Events</legend>",
        escape(&form_action(&view.org, "")),
        escape(&view.form_url)
    );
    let checked = |event: &str| if view.form_events.iter().any(|e| e == event) { " checked" } else { "" };
    let _ = write!(body, "<label><input type=\"checkbox\" name=\"events\" value=\"*\"{}> All events</label>", checked("*"));
    for event in &view.event_types {
        let _ = write!(body, "<label><input type=\"checkbox\" name=\"events\" value=\"{0}\"{1}> <code>{0}</code></label>", escape(event), checked(event));
    }
    let _ = write!(
        body,
        "</fieldset><label for=\"w-description\">Description <small>(optional)</small></label><input id=\"w-description\" name=\"description\" value=\"{}\" maxlength=\"500\"><button type=\"submit\">Add endpoint</button></form>",
        escape(&view.form_description)
    );
}

/// An endpoint's facts and its delivery log with Redeliver buttons.
pub fn deliveries_page(shell: &Shell, view: &DeliveriesView) -> String {
    let w = &view.webhook;
    let mut body = layout::page_header("Webhook deliveries", "");
    let _ = write!(
        body,
        "<p><a href=\"/webhooks?org={}\">All webhooks of {}</a></p><dl class=\"facts\"><dt>URL</dt><dd><code>{}</code></dd><dt>Events</dt><dd>{}</dd><dt>State</dt><dd>{}</dd><dt>Id</dt><dd><code>{}</code></dd></dl>",
        layout::query_escape(&view.org),
        escape(&view.org),
        escape(&w.url),
        escape(&w.events.join(", ")),
        enabled_badge(w.enabled),
        escape(&w.id),
    );
    if !w.enabled {
        body.push_str("<p class=\"muted\">The endpoint is disabled: nothing is sent to it, and deliveries cannot be sent again until it is enabled.</p>");
    }
    if let Some(error) = &view.error {
        body.push_str(&layout::error_box(error));
    }
    let rows: Vec<Vec<Cell>> = view
        .deliveries
        .iter()
        .map(|d| {
            let action = if w.enabled {
                layout::action_button(
                    &form_action(&view.org, &format!("/{}/deliveries/{}/redeliver", layout::query_escape(&w.id), layout::query_escape(&d.id))),
                    "Redeliver",
                    &[],
                    false,
                )
            } else {
                String::new()
            };
            let mut event = format!("<code>{}</code> <small>{}</small>", escape(&d.event_type), escape(&d.id));
            if !d.redelivery_of.is_empty() {
                let _ = write!(event, "<br><small>again of {}</small>", escape(&d.redelivery_of));
            }
            vec![
                Cell::text(&d.created_at),
                Cell::html(event),
                Cell::html(layout::status_badge(&d.status)),
                Cell::text(d.attempts.to_string()),
                Cell::text(response_text(d.response_code)),
                Cell::text(&d.error),
                Cell::html(action),
            ]
        })
        .collect();
    body.push_str(&layout::table(
        "Deliveries",
        &["Created", "Event", "Status", "Attempts", "Response", "Error", ""],
        &rows,
        &layout::empty_state("No deliveries yet", "A delivery appears here when an event the endpoint subscribes to happens."),
    ));
    if let Some(before) = &view.next_before {
        let _ = write!(
            body,
            "<p><a class=\"button secondary\" href=\"{}&amp;before={}\">Older deliveries</a></p>",
            escape(&deliveries_href(&view.org, &w.id)),
            layout::query_escape(before)
        );
    }
    layout::render(shell, "Webhook deliveries", &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Brand, Nav};

    fn shell(brand: &Brand) -> Shell<'_> {
        Shell { user: "admin@example.com", operator: false, admin: true, org: Some("acme"), brand, active: Nav::Webhooks, flash: None }
    }

    fn endpoint() -> WebhookRow {
        WebhookRow {
            id: "whk_1".into(),
            url: "https://hooks.example.com/<x>".into(),
            events: vec!["agent.online".into(), "alert.firing".into()],
            description: "ops pager".into(),
            enabled: true,
            last: Some(LastDelivery { status: "failed".into(), at: "2026-01-01T00:00:00Z".into(), response_code: Some(503) }),
        }
    }

    #[test]
    fn endpoints_show_their_latest_delivery_and_the_create_form() {
        let brand = Brand::default();
        let view = WebhooksView {
            org: "acme".into(),
            webhooks: vec![endpoint(), WebhookRow { id: "whk_2".into(), url: "http://127.0.0.1:9/".into(), events: vec!["*".into()], ..WebhookRow::default() }],
            event_types: vec!["agent.online".into(), "alert.firing".into()],
            form_events: vec!["alert.firing".into()],
            ..WebhooksView::default()
        };
        let html = webhooks_page(&shell(&brand), &view);
        assert!(html.contains("aria-current=\"page\">Webhooks"));
        assert!(html.contains("https://hooks.example.com/&lt;x&gt;") && html.contains("status-failed\">failed") && html.contains("HTTP 503"));
        assert!(html.contains("href=\"/webhooks/whk_1?org=acme\"") && html.contains("action=\"/orgs/acme/webhooks/whk_1/delete\""));
        assert!(html.contains("no deliveries yet") && html.contains("status-disabled\">disabled"));
        assert!(html.contains("<label for=\"w-url\">") && html.contains("<legend>Events</legend>"));
        assert!(html.contains("value=\"alert.firing\" checked") && html.contains("value=\"agent.online\">"), "the form keeps what was ticked");
        assert!(!html.contains("Signing secret"), "no secret unless one was just created");
        let empty = webhooks_page(&shell(&brand), &WebhooksView { org: "acme".into(), ..WebhooksView::default() });
        assert!(empty.contains("No webhook endpoints") && empty.contains("id=\"new-webhook\""));
        let created = webhooks_page(&shell(&brand), &WebhooksView { created: Some(CreatedWebhook { id: "whk_3".into(), secret: "whsec_abc".into() }), ..view });
        assert!(created.contains("Signing secret of whk_3") && created.contains("whsec_abc"));
    }

    #[test]
    fn deliveries_list_attempts_and_offer_redelivery_while_enabled() {
        let brand = Brand::default();
        let mut view = DeliveriesView {
            org: "acme".into(),
            webhook: endpoint(),
            deliveries: vec![
                DeliveryRow {
                    id: "dlv_2".into(),
                    event_type: "alert.firing".into(),
                    status: "succeeded".into(),
                    attempts: 1,
                    response_code: Some(200),
                    created_at: "2026-01-01T00:01:00Z".into(),
                    redelivery_of: "dlv_1".into(),
                    ..DeliveryRow::default()
                },
                DeliveryRow { id: "dlv_1".into(), status: "failed".into(), attempts: 8, error: "connection refused".into(), ..DeliveryRow::default() },
            ],
            next_before: Some("dlv_1".into()),
            error: None,
        };
        let html = deliveries_page(&shell(&brand), &view);
        assert!(html.contains("action=\"/orgs/acme/webhooks/whk_1/deliveries/dlv_2/redeliver\""));
        assert!(html.contains("<td>200</td>") && html.contains("<td>8</td>") && html.contains("connection refused") && html.contains("again of dlv_1"));
        assert!(html.contains("href=\"/webhooks/whk_1?org=acme&amp;before=dlv_1\""));
        view.webhook.enabled = false;
        let html = deliveries_page(&shell(&brand), &view);
        assert!(!html.contains("Redeliver") && html.contains("disabled"));
        view.deliveries.clear();
        assert!(deliveries_page(&shell(&brand), &view).contains("No deliveries yet"));
    }
}
