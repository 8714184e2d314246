//! Usage and billing pages: usage per meter as SVG bar charts, the current period's
//! invoice preview, closed invoices, export links, and the plan catalog (operators).
//!
//! Views only: the hub fills the structs from the ledger, invoice and plan functions its
//! JSON API uses. Charts are drawn here as SVG with no script and no inline style (the
//! Content Security Policy allows neither); bar colour is the brand's accent, passed as a
//! presentation attribute.

use crate::escape;
use crate::layout::{self, Cell, Shell};
use std::fmt::Write;

/// One meter's usage: a value per bucket (hour or day), oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeterSeries {
    /// Meter id, e.g. `agent_hours`.
    pub meter: String,
    /// (bucket label, value), e.g. ("2026-01-03", 48).
    pub points: Vec<(String, i64)>,
    /// Period total (counters summed, gauges the largest value).
    pub total: i64,
}

/// One invoice line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InvoiceLineRow {
    pub description: String,
    pub quantity: u64,
    pub included: u64,
    pub billable: u64,
    /// Amount in minor units of the invoice currency.
    pub amount_minor: i64,
}

/// An invoice, previewed or closed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InvoiceView {
    /// Empty for the preview.
    pub id: String,
    pub period_start: String,
    pub period_end: String,
    pub currency: String,
    pub lines: Vec<InvoiceLineRow>,
    pub total_minor: i64,
}

/// A plan in the catalog.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlanRow {
    pub id: String,
    pub version: u32,
    pub name: String,
    /// The plan's whole request (name, prices, limits) as pretty JSON, for the editor.
    pub json: String,
}

/// The usage and billing page of one org.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageView {
    pub org: String,
    /// `plan v2 · active`, or empty without a subscription.
    pub subscription: String,
    /// RFC 3339 bounds of what the charts show.
    pub from: String,
    pub to: String,
    pub meters: Vec<MeterSeries>,
    /// `None` without a subscription (or without the billing permission).
    pub preview: Option<InvoiceView>,
    pub invoices: Vec<InvoiceView>,
    /// Why part of the page could not be shown.
    pub error: Option<String>,
}

/// Minor units as a decimal amount with the currency: `12.50 EUR`.
pub fn money(minor: i64, currency: &str) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    format!("{sign}{}.{:02} {}", abs / 100, abs % 100, currency.to_uppercase())
}

/// A bar chart of one series as SVG: one bar per point, the largest value labelled, every
/// bar titled with its label and value (hover and screen readers).
pub fn bar_chart(title: &str, points: &[(String, i64)], accent: &str) -> String {
    const WIDTH: f64 = 600.0;
    const HEIGHT: f64 = 140.0;
    const TOP: f64 = 16.0;
    let accent = if crate::layout::parse_hex_colour(accent).is_ok() { accent } else { crate::layout::DEFAULT_ACCENT };
    let max = points.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {}\" role=\"img\" aria-label=\"{}\"><line class=\"grid-line\" x1=\"0\" y1=\"{HEIGHT}\" x2=\"{WIDTH}\" y2=\"{HEIGHT}\"/>",
        HEIGHT + 18.0,
        escape(title)
    );
    let n = points.len().max(1) as f64;
    let slot = WIDTH / n;
    for (i, (label, value)) in points.iter().enumerate() {
        let h = (*value).max(0) as f64 / max as f64 * (HEIGHT - TOP);
        let x = i as f64 * slot + slot * 0.1;
        let _ = write!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{accent}\"><title>{}: {value}</title></rect>",
            HEIGHT - h,
            slot * 0.8,
            escape(label)
        );
    }
    if let (Some(first), Some(last)) = (points.first(), points.last()) {
        let _ = write!(
            svg,
            "<text class=\"axis-label\" x=\"0\" y=\"{:.0}\">{}</text><text class=\"axis-label\" x=\"{WIDTH}\" y=\"{:.0}\" text-anchor=\"end\">{}</text>",
            HEIGHT + 14.0,
            escape(&first.0),
            HEIGHT + 14.0,
            escape(&last.0)
        );
    }
    let _ = write!(svg, "<text class=\"axis-label\" x=\"0\" y=\"11\">max {max}</text></svg>");
    svg
}

fn invoice_table(caption: &str, invoice: &InvoiceView) -> String {
    let rows: Vec<Vec<Cell>> = invoice
        .lines
        .iter()
        .map(|l| {
            vec![
                Cell::text(&l.description),
                Cell::text(l.quantity.to_string()),
                Cell::text(l.included.to_string()),
                Cell::text(l.billable.to_string()),
                Cell::text(money(l.amount_minor, &invoice.currency)),
            ]
        })
        .collect();
    let mut html = layout::table(
        caption,
        &["Line", "Quantity", "Included", "Billable", "Amount"],
        &rows,
        &layout::empty_state("No lines", "Nothing is charged for this period."),
    );
    let _ = write!(html, "<p class=\"invoice-total\">Total: <strong>{}</strong></p>", escape(&money(invoice.total_minor, &invoice.currency)));
    html
}

/// Usage per meter, the invoice so far, closed invoices and export links.
pub fn usage_page(shell: &Shell, view: &UsageView) -> String {
    let org = layout::query_escape(&view.org);
    let exports = format!(
        "<a class=\"button secondary\" id=\"export-csv\" href=\"/api/v1/billing/usage?org={org}&amp;format=csv\" download>Export CSV</a><a class=\"button secondary\" id=\"export-json\" href=\"/api/v1/billing/usage?org={org}&amp;format=json\">Export JSON</a>"
    );
    let mut body = layout::page_header(&format!("Usage of {}", view.org), &exports);
    if let Some(error) = &view.error {
        body.push_str(&layout::error_box(error));
    }
    let _ = write!(
        body,
        "<p>Subscription: <strong>{}</strong>. Usage from {} to {}.</p>",
        escape(if view.subscription.is_empty() { "none" } else { &view.subscription }),
        escape(&view.from),
        escape(&view.to)
    );
    if view.meters.is_empty() {
        body.push_str(&layout::empty_state("No usage yet", "Usage appears here once agents of this org connect."));
    } else {
        body.push_str("<div class=\"grid\">");
        for m in &view.meters {
            let _ = write!(body, "<section class=\"card meter\" id=\"meter-{0}\"><h2>{0}</h2><p>Total: <strong>{1}</strong></p>", escape(&m.meter), m.total);
            body.push_str(&bar_chart(&format!("{} per day", m.meter), &m.points, &shell.brand.accent));
            body.push_str("</section>");
        }
        body.push_str("</div>");
    }
    body.push_str("<h2>This period so far</h2>");
    match &view.preview {
        Some(preview) => body.push_str(&invoice_table(&format!("Invoice preview, {} to {}", preview.period_start, preview.period_end), preview)),
        None => body.push_str(&layout::empty_state("No invoice", "The org has no subscription, so nothing is billed.")),
    }
    body.push_str("<h2>Closed invoices</h2>");
    if view.invoices.is_empty() {
        body.push_str(&layout::empty_state("No closed invoices", "Invoices close at the end of each billing period."));
    }
    for invoice in &view.invoices {
        body.push_str(&invoice_table(&format!("Invoice {}, {} to {}", invoice.id, invoice.period_start, invoice.period_end), invoice));
    }
    layout::render(shell, "Usage", &body)
}

/// The plan catalog (operators): every plan's newest version, editable as JSON (each save
/// writes a new version), and a form for a new plan.
pub fn plans_page(shell: &Shell, plans: &[PlanRow], error: Option<&str>, draft: (&str, &str)) -> String {
    let mut body = layout::page_header("Plan catalog", "");
    if let Some(error) = error {
        body.push_str(&layout::error_box(error));
    }
    if plans.is_empty() {
        body.push_str(&layout::empty_state("No plans yet", "Add the first plan below."));
    }
    for plan in plans {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/plans/{id}\" class=\"card stacked plan\"><h2>{name} <small><code>{id}</code> v{version}</small></h2><label for=\"plan-{id}\">Plan (JSON)</label><textarea id=\"plan-{id}\" name=\"plan\" spellcheck=\"false\">{json}</textarea><button type=\"submit\">Save as version {next}</button></form>",
            id = escape(&plan.id),
            name = escape(&plan.name),
            version = plan.version,
            json = escape(&plan.json),
            next = plan.version + 1,
        );
    }
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/plans\" class=\"card stacked\" id=\"new-plan\"><h2>New plan</h2><label for=\"p-id\">Id</label><input id=\"p-id\" name=\"id\" value=\"{}\" required><label for=\"p-plan\">Plan (JSON)</label><textarea id=\"p-plan\" name=\"plan\" spellcheck=\"false\">{}</textarea><button type=\"submit\">Create plan</button></form>",
        escape(draft.0),
        escape(draft.1)
    );
    layout::render(shell, "Plans", &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Brand, Nav};

    #[test]
    fn money_is_exact() {
        assert_eq!(money(1250, "eur"), "12.50 EUR");
        assert_eq!(money(-5, "usd"), "-0.05 USD");
        assert_eq!(money(0, "eur"), "0.00 EUR");
    }

    #[test]
    fn chart_scales_bars_and_uses_the_brand_accent() {
        let svg = bar_chart("agent_hours per day", &[("d1".into(), 10), ("d2".into(), 20)], "#ff0000");
        assert!(svg.contains("height=\"124.0\""), "the largest bar fills the plot: {svg}");
        assert!(svg.contains("height=\"62.0\""));
        assert!(svg.contains("fill=\"#ff0000\"") && svg.contains("<title>d2: 20</title>"));
        assert!(!svg.contains("style"), "no inline style under the CSP");
        let bad = bar_chart("x", &[("d".into(), 1)], "red\"/><script>");
        assert!(!bad.contains("<script>") && bad.contains(crate::layout::DEFAULT_ACCENT));
    }

    #[test]
    fn usage_page_has_exports_charts_and_invoices() {
        let brand = Brand::default();
        let shell = Shell { user: "ops@example.com", operator: true, admin: true, org: Some("acme"), brand: &brand, active: Nav::Usage, flash: None };
        let view = UsageView {
            org: "acme".into(),
            subscription: "pro v1 · active".into(),
            meters: vec![MeterSeries { meter: "agent_hours".into(), points: vec![("2026-01-01".into(), 24)], total: 24 }],
            preview: Some(InvoiceView {
                currency: "eur".into(),
                lines: vec![InvoiceLineRow { description: "Base fee".into(), amount_minor: 1900, ..InvoiceLineRow::default() }],
                total_minor: 1900,
                ..InvoiceView::default()
            }),
            ..UsageView::default()
        };
        let html = usage_page(&shell, &view);
        assert!(html.contains("href=\"/api/v1/billing/usage?org=acme&amp;format=csv\""));
        assert!(html.contains("id=\"meter-agent_hours\"") && html.contains("<svg class=\"chart\""));
        assert!(html.contains("Total: <strong>19.00 EUR</strong>"));
        assert!(html.contains("No closed invoices"));
        let empty = usage_page(&shell, &UsageView { org: "acme".into(), ..UsageView::default() });
        assert!(empty.contains("No usage yet") && empty.contains("Subscription: <strong>none</strong>"));
    }

    #[test]
    fn plan_editor_escapes_json() {
        let brand = Brand::default();
        let shell = Shell { user: "ops@example.com", operator: true, admin: true, org: None, brand: &brand, active: Nav::Usage, flash: None };
        let plans = [PlanRow { id: "pro".into(), version: 2, name: "Pro".into(), json: "{\"name\": \"</textarea>\"}".into() }];
        let html = plans_page(&shell, &plans, Some("bad"), ("", ""));
        assert!(html.contains("action=\"/plans/pro\"") && html.contains("Save as version 3"));
        assert!(html.contains("&lt;/textarea&gt;") && !html.contains("\"</textarea>\""));
    }
}
