//! The page shell every signed-in dashboard page shares: document head, brand, navigation,
//! flash message, skip link and `main` landmark, plus small building blocks (tables, empty
//! states, error boxes, stat tiles) that keep pages looking and behaving alike.
//!
//! How a page uses it:
//!
//! ```
//! use gantry_dashboards::layout::{self, Brand, Nav, Shell};
//!
//! let brand = Brand::default();
//! let shell = Shell { user: "ops@example.com", operator: true, admin: true, org: None, brand: &brand, active: Nav::Agents, flash: None };
//! let rows = vec![vec![layout::Cell::text("web-1"), layout::Cell::html("<b>online</b>")]];
//! let body = layout::table("Agents", &["Host", "Status"], &rows, &layout::empty_state("No agents yet", "Create an enrollment token to add one."));
//! let html = layout::render(&shell, "Agents", &body);
//! assert!(html.contains("aria-current=\"page\""));
//! ```
//!
//! Everything here follows the hub's Content Security Policy (`default-src 'self'`): no
//! inline `<style>`, no `style=` attributes, no inline script. Brand colours reach the page
//! through a stylesheet the hub serves ([`Brand::stylesheet`], whose text is
//! [`Brand::css`]); behaviour through [`crate::SCRIPT_PATH`]. Every value passed as text is
//! escaped; values passed as HTML (the `body` of [`render`], [`Cell::html`]) must already be.

use crate::escape;
use std::fmt::Write;

/// Where the hub serves the operator theme (the [`Brand`] of the hub itself), which pages
/// outside any org and the login page use.
pub const THEME_PATH: &str = "/assets/theme.css";

/// The default accent colour (a blue with 5.9:1 contrast against white).
pub const DEFAULT_ACCENT: &str = "#1f5fd1";
/// The default header background.
pub const DEFAULT_HEADER_BACKGROUND: &str = "#ffffff";
/// The default product name.
pub const DEFAULT_PRODUCT_NAME: &str = "Gantry";
/// Longest product name a brand may have.
pub const MAX_PRODUCT_NAME: usize = 60;

/// A white-label brand: what a page is called and how it is coloured. The hub keeps one
/// per org (an org's customers see it) and one for itself (the operator theme).
///
/// Colours are `#rgb` or `#rrggbb` ([`parse_hex_colour`]); they become CSS custom
/// properties in [`Brand::css`]. Text colours on top of them are derived, black or white,
/// whichever contrasts more, so a brand cannot make the navigation unreadable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brand {
    /// Shown in the header and in every page title ("Agents · Acme Cloud").
    pub product_name: String,
    /// Path of the logo image on the hub (the CSP allows images from the hub only), shown
    /// in the header beside the product name. `None` shows the name alone.
    pub logo_url: Option<String>,
    /// Links, buttons, focus rings, chart lines: `#rrggbb`.
    pub accent: String,
    /// The header bar's background: `#rrggbb`.
    pub header_background: String,
    /// Path of the stylesheet that carries this brand's colours ([`Brand::css`]); the hub
    /// serves it (with a version query so a change is picked up at once).
    pub stylesheet: String,
}

impl Default for Brand {
    fn default() -> Self {
        Brand {
            product_name: DEFAULT_PRODUCT_NAME.to_string(),
            logo_url: None,
            accent: DEFAULT_ACCENT.to_string(),
            header_background: DEFAULT_HEADER_BACKGROUND.to_string(),
            stylesheet: THEME_PATH.to_string(),
        }
    }
}

impl Brand {
    /// Check every field; the message names the field and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        validate_product_name(&self.product_name)?;
        parse_hex_colour(&self.accent).map_err(|e| format!("accent: {e}"))?;
        parse_hex_colour(&self.header_background).map_err(|e| format!("header_background: {e}"))?;
        if let Some(logo) = &self.logo_url {
            if !logo.starts_with('/') || logo.starts_with("//") || logo.chars().any(|c| c.is_control() || c == '"' || c == '\\') {
                return Err("logo_url must be a path on the hub, like /assets/brand/acme/logo".to_string());
            }
        }
        Ok(())
    }

    /// The brand's stylesheet: CSS custom properties on `:root` that the dashboard
    /// stylesheet reads (`--accent`, `--accent-fg`, `--header-bg`, `--header-fg`). Invalid
    /// colours fall back to the defaults, so this never emits anything but colours.
    pub fn css(&self) -> String {
        let accent = parse_hex_colour(&self.accent).unwrap_or_else(|_| parse_hex_colour(DEFAULT_ACCENT).unwrap_or((31, 95, 209)));
        let header = parse_hex_colour(&self.header_background).unwrap_or((255, 255, 255));
        format!(
            ":root {{ --accent:{}; --accent-fg:{}; --header-bg:{}; --header-fg:{}; --header-muted:{}; }}\n",
            hex(accent),
            hex(text_on(accent)),
            hex(header),
            hex(text_on(header)),
            if text_on(header) == (255, 255, 255) { "#d6d9e0" } else { "#4a505c" },
        )
    }
}

/// Product names: 1-60 characters, no control characters.
pub fn validate_product_name(name: &str) -> Result<(), String> {
    let length = name.trim().chars().count();
    if length == 0 || length > MAX_PRODUCT_NAME || name.chars().any(char::is_control) {
        return Err(format!("product_name must be 1-{MAX_PRODUCT_NAME} characters without control characters"));
    }
    Ok(())
}

/// Parse `#rgb` or `#rrggbb` (case-insensitive) into red, green and blue.
pub fn parse_hex_colour(text: &str) -> Result<(u8, u8, u8), String> {
    let bad = || format!("{text:?} is not a colour like #1f5fd1 or #15d");
    let digits = text.strip_prefix('#').ok_or_else(bad)?;
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let channel = |s: &str| u8::from_str_radix(s, 16).map_err(|_| bad());
    match digits.len() {
        3 => {
            let d: Vec<u8> = digits.bytes().map(|b| (b as char).to_digit(16).unwrap_or(0) as u8).collect();
            Ok((d[0] * 17, d[1] * 17, d[2] * 17))
        }
        6 => Ok((channel(&digits[0..2])?, channel(&digits[2..4])?, channel(&digits[4..6])?)),
        _ => Err(bad()),
    }
}

fn hex((r, g, b): (u8, u8, u8)) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// WCAG relative luminance.
fn luminance((r, g, b): (u8, u8, u8)) -> f64 {
    let linear = |c: u8| {
        let c = f64::from(c) / 255.0;
        if c <= 0.039_28 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b)
}

/// WCAG contrast ratio of two colours (1 to 21).
pub fn contrast(a: (u8, u8, u8), b: (u8, u8, u8)) -> f64 {
    let (la, lb) = (luminance(a), luminance(b));
    (la.max(lb) + 0.05) / (la.min(lb) + 0.05)
}

/// Black or white, whichever reads better on `background`.
fn text_on(background: (u8, u8, u8)) -> (u8, u8, u8) {
    let (white, black) = ((255, 255, 255), (0, 0, 0));
    if contrast(background, white) >= contrast(background, black) {
        white
    } else {
        black
    }
}

/// The dashboard's sections, in navigation order. [`Shell::active`] marks the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Orgs,
    Agents,
    Enrollment,
    Deployments,
    Alerts,
    Webhooks,
    Usage,
    Users,
    Audit,
    Account,
}

impl Nav {
    /// Every section, in navigation order.
    pub const ALL: [Nav; 11] = [
        Nav::Overview,
        Nav::Orgs,
        Nav::Agents,
        Nav::Enrollment,
        Nav::Deployments,
        Nav::Alerts,
        Nav::Webhooks,
        Nav::Usage,
        Nav::Users,
        Nav::Audit,
        Nav::Account,
    ];

    /// The section's page on the hub.
    pub fn path(self) -> &'static str {
        match self {
            Nav::Overview => "/",
            Nav::Orgs => "/orgs",
            Nav::Agents => "/agents",
            Nav::Enrollment => "/enrollment",
            Nav::Deployments => "/deployments",
            Nav::Alerts => "/alerts",
            Nav::Webhooks => "/webhooks",
            Nav::Usage => "/usage",
            Nav::Users => "/users",
            Nav::Audit => "/audit",
            Nav::Account => "/account",
        }
    }

    /// The link text.
    pub fn label(self) -> &'static str {
        match self {
            Nav::Overview => "Overview",
            Nav::Orgs => "Orgs",
            Nav::Agents => "Agents",
            Nav::Enrollment => "Enrollment",
            Nav::Deployments => "Deployments",
            Nav::Alerts => "Alerts",
            Nav::Webhooks => "Webhooks",
            Nav::Usage => "Usage",
            Nav::Users => "Users",
            Nav::Audit => "Audit",
            Nav::Account => "Account",
        }
    }

    /// Whether only platform operators see the section in the navigation.
    pub fn operator_only(self) -> bool {
        matches!(self, Nav::Orgs)
    }

    /// Whether only admins of an org ([`Shell::admin`]) see the section in the navigation.
    pub fn admin_only(self) -> bool {
        matches!(self, Nav::Webhooks)
    }

    /// The link for the section, keeping the selected org (`?org=`) if there is one.
    pub fn href(self, org: Option<&str>) -> String {
        match org {
            Some(org) if self != Nav::Account && self != Nav::Orgs => format!("{}?org={}", self.path(), query_escape(org)),
            _ => self.path().to_string(),
        }
    }
}

/// Who is looking at the page, and where they are: everything the shell around a page's
/// body needs.
#[derive(Debug, Clone, Copy)]
pub struct Shell<'a> {
    /// The signed-in account (email or key name), shown beside the log-out button.
    pub user: &'a str,
    /// Platform operator: sees operator-only sections.
    pub operator: bool,
    /// Administers the org the page is about (with none selected: some org); sees
    /// admin-only sections such as Webhooks.
    pub admin: bool,
    /// The org the page is about, if one is selected; kept in navigation links.
    pub org: Option<&'a str>,
    /// Name, logo and colours.
    pub brand: &'a Brand,
    /// The current section, marked `aria-current="page"`.
    pub active: Nav,
    /// A one-off message after an action ("Agent revoked."), announced politely.
    pub flash: Option<&'a str>,
}

/// A whole signed-in page: `<head>` (title, stylesheets, script), a skip link, the header
/// with brand and account, the navigation, the flash message and `body` inside `<main>`.
/// `body` is HTML and must already be escaped; `title` is text.
pub fn render(shell: &Shell, title: &str, body: &str) -> String {
    let brand = shell.brand;
    let mut html = String::with_capacity(body.len() + 4096);
    head(&mut html, brand, title);
    html.push_str("<a class=\"skip\" href=\"#main\">Skip to content</a><header class=\"top\">");
    brand_mark(&mut html, brand);
    let _ = write!(
        html,
        "<div class=\"account\"><span class=\"who\">{}{}</span><form method=\"post\" action=\"/logout\"><button type=\"submit\" class=\"link\">Log out</button></form></div></header>",
        escape(shell.user),
        if shell.operator { " <span class=\"badge\">operator</span>" } else { "" },
    );
    html.push_str("<nav class=\"sections\" aria-label=\"Sections\"><ul>");
    for nav in Nav::ALL {
        if (nav.operator_only() && !shell.operator) || (nav.admin_only() && !shell.admin) {
            continue;
        }
        let current = if nav == shell.active { " aria-current=\"page\"" } else { "" };
        let _ = write!(html, "<li><a href=\"{}\"{current}>{}</a></li>", escape(&nav.href(shell.org)), nav.label());
    }
    html.push_str("</ul></nav><main id=\"main\" tabindex=\"-1\">");
    if let Some(flash) = shell.flash {
        let _ = write!(html, "<p class=\"flash\" role=\"status\">{}</p>", escape(flash));
    }
    html.push_str(body);
    html.push_str("</main></body></html>");
    html
}

/// A page outside the signed-in shell (login, invitation, errors before login): head,
/// brand header and `body` inside `<main>`.
pub fn render_bare(brand: &Brand, title: &str, body: &str) -> String {
    let mut html = String::with_capacity(body.len() + 1024);
    head(&mut html, brand, title);
    html.push_str("<header class=\"top\">");
    brand_mark(&mut html, brand);
    html.push_str("</header><main id=\"main\">");
    html.push_str(body);
    html.push_str("</main></body></html>");
    html
}

fn head(html: &mut String, brand: &Brand, title: &str) {
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{} · {}</title><link rel=\"stylesheet\" href=\"{}\"><link rel=\"stylesheet\" href=\"{}\"><script src=\"{}\" defer></script></head><body>",
        escape(title),
        escape(&brand.product_name),
        crate::STYLESHEET_PATH,
        escape(&brand.stylesheet),
        crate::SCRIPT_PATH,
    );
}

fn brand_mark(html: &mut String, brand: &Brand) {
    html.push_str("<a class=\"brand\" href=\"/\">");
    if let Some(logo) = &brand.logo_url {
        // The name is next to the logo, so the image itself is decorative.
        let _ = write!(html, "<img src=\"{}\" alt=\"\" height=\"28\">", escape(logo));
    }
    let _ = write!(html, "<span>{}</span></a>", escape(&brand.product_name));
}

/// `text` as a QR code (error correction level M, a quiet zone of 4 modules), drawn as one
/// inline SVG path: dark modules on white, scaled by CSS, no style attributes (the Content
/// Security Policy allows none). `None` when the text is too long for a QR code.
pub fn qr_svg(text: &str, label: &str) -> Option<String> {
    const QUIET: usize = 4;
    let code = qrcode::QrCode::with_error_correction_level(text, qrcode::EcLevel::M).ok()?;
    let width = code.width();
    let colors = code.to_colors();
    let size = width + 2 * QUIET;
    let mut path = String::with_capacity(width * width * 4);
    for (y, row) in colors.chunks(width).enumerate() {
        let mut x = 0;
        while x < width {
            if row[x] == qrcode::Color::Dark {
                // One horizontal run of dark modules per rectangle.
                let start = x;
                while x < width && row[x] == qrcode::Color::Dark {
                    x += 1;
                }
                let _ = write!(path, "M{} {}h{}v1h-{}z", start + QUIET, y + QUIET, x - start, x - start);
            } else {
                x += 1;
            }
        }
    }
    Some(format!(
        "<svg class=\"qr\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {size} {size}\" shape-rendering=\"crispEdges\" role=\"img\" aria-label=\"{}\"><rect width=\"{size}\" height=\"{size}\" fill=\"#fff\"/><path fill=\"#000\" d=\"{path}\"/></svg>",
        escape(label)
    ))
}

/// Percent-encode a query-string value.
pub fn query_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// "Nothing here yet" with what to do about it: a title and a hint (both text).
pub fn empty_state(title: &str, hint: &str) -> String {
    format!("<div class=\"empty\"><p class=\"empty-title\">{}</p><p>{}</p></div>", escape(title), escape(hint))
}

/// An error shown in the page (a failed action, a bad filter), announced at once.
pub fn error_box(message: &str) -> String {
    format!("<div class=\"error-box\" role=\"alert\"><p>{}</p></div>", escape(message))
}

/// A table cell: text (escaped here) or HTML (already safe).
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Text(String),
    Html(String),
}

impl Cell {
    pub fn text(text: impl Into<String>) -> Cell {
        Cell::Text(text.into())
    }
    pub fn html(html: impl Into<String>) -> Cell {
        Cell::Html(html.into())
    }
}

/// A data table with a caption (text; also its accessible name) and column headers, or
/// `empty` (HTML, e.g. [`empty_state`]) when there are no rows. Wide tables scroll inside
/// their own box on a phone rather than widening the page.
pub fn table(caption: &str, headers: &[&str], rows: &[Vec<Cell>], empty: &str) -> String {
    if rows.is_empty() {
        return empty.to_string();
    }
    let mut html = String::with_capacity(64 + rows.len() * 128);
    let _ = write!(html, "<div class=\"table-wrap\"><table><caption>{}</caption><thead><tr>", escape(caption));
    for header in headers {
        let _ = write!(html, "<th scope=\"col\">{}</th>", escape(header));
    }
    html.push_str("</tr></thead><tbody>");
    for row in rows {
        html.push_str("<tr>");
        for cell in row {
            match cell {
                Cell::Text(text) => {
                    let _ = write!(html, "<td>{}</td>", escape(text));
                }
                Cell::Html(inner) => {
                    let _ = write!(html, "<td>{inner}</td>");
                }
            }
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table></div>");
    html
}

/// A headline figure (the overview's tiles): label and value are text, `tone` one of
/// `ok`, `bad`, `warn` or `""`.
pub fn stat(label: &str, value: &str, tone: &str, href: Option<&str>) -> String {
    let tone = match tone {
        "ok" | "bad" | "warn" => tone,
        _ => "plain",
    };
    let value = escape(value);
    let inner = match href {
        Some(href) => format!("<a href=\"{}\">{value}</a>", escape(href)),
        None => value,
    };
    format!("<div class=\"stat stat-{tone}\"><p class=\"stat-label\">{}</p><p class=\"stat-value\">{inner}</p></div>", escape(label))
}

/// A status word in its colour (`online`, `offline`, `revoked`, `firing`, `passing`, ...),
/// with the word itself always shown so colour is never the only signal.
pub fn status_badge(status: &str) -> String {
    let class: String = status.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
    format!("<span class=\"status status-{class}\">{}</span>", escape(status))
}

/// A POST form that is only a button (revoke, acknowledge, ...), with optional hidden
/// fields. `danger` styles it as destructive. Pages leave it out entirely for callers
/// without the permission; the hub refuses the POST as well.
pub fn action_button(action: &str, label: &str, hidden: &[(&str, &str)], danger: bool) -> String {
    let mut html = format!("<form method=\"post\" action=\"{}\" class=\"inline\">", escape(action));
    for (name, value) in hidden {
        let _ = write!(html, "<input type=\"hidden\" name=\"{}\" value=\"{}\">", escape(name), escape(value));
    }
    let _ = write!(html, "<button type=\"submit\"{}>{}</button></form>", if danger { " class=\"danger\"" } else { "" }, escape(label));
    html
}

/// A page heading with optional actions (HTML) to its right.
pub fn page_header(title: &str, actions: &str) -> String {
    format!("<div class=\"page-header\"><h1>{}</h1><div class=\"actions\">{actions}</div></div>", escape(title))
}

#[cfg(test)]
mod tests {

    #[test]
    fn qr_codes_are_one_path_of_whole_modules_inside_a_quiet_zone() {
        let svg = qr_svg("otpauth://totp/Gantry:a%40b.c?secret=JBSWY3DPEHPK3PXP&issuer=Gantry", "code <x>").unwrap();
        assert!(svg.starts_with("<svg class=\"qr\"") && svg.ends_with("\"/></svg>"));
        assert!(svg.contains("aria-label=\"code &lt;x&gt;\"") && !svg.contains("style"));
        // Version 5 (37 modules) at level M for this length, plus 4 light modules each side.
        assert!(svg.contains("viewBox=\"0 0 45 45\""), "{svg}");
        // The top-left finder pattern: a run of 7 dark modules at the quiet zone's corner.
        assert!(svg.contains("d=\"M4 4h7v1h-7z"), "{svg}");
        assert_eq!(qr_svg(&"x".repeat(5000), "too long"), None);
    }

    use super::*;

    fn shell<'a>(brand: &'a Brand, operator: bool, active: Nav) -> Shell<'a> {
        Shell { user: "ana@example.com", operator, admin: operator, org: Some("acme"), brand, active, flash: None }
    }

    #[test]
    fn shell_has_landmarks_and_marks_the_current_section() {
        let brand = Brand::default();
        let html = render(&shell(&brand, true, Nav::Agents), "Agents <all>", "<p>body</p>");
        assert!(html.starts_with("<!doctype html>"));
        assert!(html.contains("<title>Agents &lt;all&gt; · Gantry</title>"));
        assert!(html.contains("href=\"#main\"") && html.contains("<main id=\"main\""));
        assert!(html.contains("<a href=\"/agents?org=acme\" aria-current=\"page\">Agents</a>"), "{html}");
        assert_eq!(html.matches("aria-current").count(), 1);
        assert!(html.contains("href=\"/orgs\""), "operators see Orgs");
        assert!(html.contains("<p>body</p>"));
        assert!(!html.contains("<style") && !html.contains(" style="), "the CSP blocks inline styles");
    }

    #[test]
    fn members_do_not_see_operator_sections() {
        let brand = Brand::default();
        let html = render(&shell(&brand, false, Nav::Overview), "Overview", "");
        assert!(!html.contains("href=\"/orgs\""));
        assert!(!html.contains("operator</span>"));
    }

    #[test]
    fn only_admins_see_the_webhooks_section() {
        let brand = Brand::default();
        let admin = Shell { admin: true, ..shell(&brand, false, Nav::Overview) };
        assert!(render(&admin, "Overview", "").contains("<a href=\"/webhooks?org=acme\">Webhooks</a>"));
        assert!(!render(&shell(&brand, false, Nav::Overview), "Overview", "").contains("/webhooks"));
    }

    #[test]
    fn flash_and_user_are_escaped() {
        let brand = Brand { product_name: "Acme <Cloud>".into(), logo_url: Some("/assets/brand/acme/logo?v=1".into()), ..Brand::default() };
        let shell = Shell { user: "<b>x</b>", flash: Some("done & <dusted>"), ..shell(&brand, false, Nav::Account) };
        let html = render(&shell, "Account", "");
        assert!(html.contains("&lt;b&gt;x&lt;/b&gt;"));
        assert!(html.contains("role=\"status\">done &amp; &lt;dusted&gt;</p>"));
        assert!(html.contains("Acme &lt;Cloud&gt;") && !html.contains("<Cloud>"));
        assert!(html.contains("<img src=\"/assets/brand/acme/logo?v=1\" alt=\"\""));
    }

    #[test]
    fn colours_are_validated_and_text_contrasts() {
        assert_eq!(parse_hex_colour("#1F5fd1"), Ok((31, 95, 209)));
        assert_eq!(parse_hex_colour("#fff"), Ok((255, 255, 255)));
        for bad in ["1f5fd1", "#12345", "#gggggg", "red", "#fff;}body{", ""] {
            assert!(parse_hex_colour(bad).is_err(), "{bad}");
        }
        let light = Brand { accent: "#ffe600".into(), header_background: "#101010".into(), ..Brand::default() };
        let css = light.css();
        assert!(css.contains("--accent:#ffe600; --accent-fg:#000000"), "{css}");
        assert!(css.contains("--header-bg:#101010; --header-fg:#ffffff"), "{css}");
        assert!(contrast((31, 95, 209), (255, 255, 255)) > 4.5);
        let injected = Brand { accent: "red}body{display:none".into(), ..Brand::default() };
        assert!(injected.validate().is_err());
        assert!(!injected.css().contains("display"), "invalid colours never reach the stylesheet");
    }

    #[test]
    fn brand_validation_names_the_field() {
        assert!(Brand::default().validate().is_ok());
        let e = Brand { header_background: "blue".into(), ..Brand::default() }.validate().unwrap_err();
        assert!(e.starts_with("header_background"), "{e}");
        assert!(Brand { product_name: " ".into(), ..Brand::default() }.validate().is_err());
        assert!(Brand { logo_url: Some("https://evil.example/x.png".into()), ..Brand::default() }.validate().is_err());
        assert!(Brand { logo_url: Some("//evil.example/x.png".into()), ..Brand::default() }.validate().is_err());
    }

    #[test]
    fn building_blocks() {
        let empty = empty_state("No agents", "Create a token <first>.");
        assert_eq!(table("Agents", &["Host"], &[], &empty), empty);
        assert!(empty.contains("&lt;first&gt;"));
        let html = table("Agents", &["Host", "Status"], &[vec![Cell::text("<web>"), Cell::html(status_badge("online"))]], &empty);
        assert!(html.contains("<caption>Agents</caption>") && html.contains("<th scope=\"col\">Host</th>"));
        assert!(html.contains("<td>&lt;web&gt;</td>") && html.contains("status-online\">online"));
        assert!(error_box("<x>").contains("role=\"alert\"><p>&lt;x&gt;"));
        let form = action_button("/agents/a\"1/revoke", "Revoke", &[("org", "acme")], true);
        assert!(form.contains("action=\"/agents/a&quot;1/revoke\"") && form.contains("class=\"danger\""));
        assert_eq!(query_escape("a b&c"), "a%20b%26c");
        assert!(stat("Online", "3", "ok", Some("/agents?status=online")).contains("stat-ok"));
    }
}
