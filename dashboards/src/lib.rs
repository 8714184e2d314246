//! Gantry's web dashboard views: plain view data in, HTML out.
//!
//! Presentation only: this crate knows nothing of the store, HTTP or sessions. The hub
//! builds the view structs and mounts the rendered pages. Every value is HTML-escaped on
//! the way out.

pub mod account;
pub mod admin;
pub mod alerts;
pub mod billing;
pub mod chart;
pub mod deploy;
pub mod fleet;
pub mod layout;
pub mod webhooks;

pub use admin::{ADMIN_SCRIPT, ADMIN_SCRIPT_PATH};
pub use layout::{action_button, empty_state, error_box, page_header, render, render_bare, stat, status_badge, table, Brand, Cell, Nav, Shell};

/// Escape text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Where the hub serves [`STYLESHEET`]. Pages link it rather than inline it, so the hub's
/// Content Security Policy needs no `'unsafe-inline'`.
pub const STYLESHEET_PATH: &str = "/assets/gantry.css";

/// The dashboard's stylesheet (colours as CSS custom properties; a [`Brand`]'s stylesheet,
/// linked after it, overrides them).
pub const STYLESHEET: &str = include_str!("../assets/gantry.css");

/// Where the hub serves [`SCRIPT`].
pub const SCRIPT_PATH: &str = "/assets/gantry.js";

/// The dashboard's script: only the live parts (log tail over Server-Sent Events, copy
/// buttons). Pages work without it.
pub const SCRIPT: &str = include_str!("../assets/gantry.js");

fn page(title: &str, body: &str) -> String {
    layout::render_bare(&Brand::default(), title, body)
}

/// The login form in `brand` (the hub's operator theme), with an optional error message.
pub fn login_page_with(brand: &Brand, error: Option<&str>) -> String {
    let error = error.map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e))).unwrap_or_default();
    let body = format!(
        "<form class=\"login\" method=\"post\" action=\"/login\"><h1>Sign in to {}</h1>{error}<label for=\"email\">Email</label><input id=\"email\" name=\"email\" type=\"email\" autocomplete=\"username\" required><label for=\"password\">Password</label><input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required><label for=\"code\">Authenticator code <small>(if two-factor login is on)</small></label><input id=\"code\" name=\"code\" type=\"text\" inputmode=\"numeric\" maxlength=\"7\" autocomplete=\"one-time-code\"><button type=\"submit\">Sign in</button></form>",
        escape(&brand.product_name)
    );
    layout::render_bare(brand, "Sign in", &body)
}

/// The login form in the default brand, with an optional error message.
pub fn login_page(error: Option<&str>) -> String {
    login_page_with(&Brand::default(), error)
}

/// The page an invitation link opens: who is invited where, and a password field (a new
/// one for a new account, the existing one otherwise). `token` is `None` when the link is
/// no good; `error` says why or what went wrong.
#[derive(Debug)]
pub struct InvitePage<'a> {
    pub token: Option<&'a str>,
    pub email: &'a str,
    pub org: &'a str,
    pub role: &'a str,
    pub has_account: bool,
    pub error: Option<&'a str>,
}

pub fn invite_page(view: &InvitePage) -> String {
    let error = view.error.map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e))).unwrap_or_default();
    let Some(token) = view.token else {
        return page("Invitation", &format!("<form class=\"login\"><h1>Invitation</h1>{error}<p>Ask whoever invited you for a new link.</p></form>"));
    };
    let (label, autocomplete, code) = if view.has_account {
        (
            "Your password",
            "current-password",
            "<label for=\"code\">Authenticator code <small>(if two-factor login is on)</small></label><input id=\"code\" name=\"code\" type=\"text\" inputmode=\"numeric\" maxlength=\"7\" autocomplete=\"one-time-code\">",
        )
    } else {
        ("Choose a password <small>(at least 12 characters)</small>", "new-password", "")
    };
    let body = format!(
        "<form class=\"login\" method=\"post\" action=\"/invite\"><h1>Join {org}</h1>{error}<p>{email} is invited to <strong>{org}</strong> as <strong>{role}</strong>.</p><input type=\"hidden\" name=\"token\" value=\"{token}\"><input type=\"hidden\" name=\"email\" value=\"{email}\" autocomplete=\"username\"><label for=\"password\">{label}</label><input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"{autocomplete}\" required>{code}<button type=\"submit\">Join</button></form>",
        org = escape(view.org),
        email = escape(view.email),
        role = escape(view.role),
        token = escape(token),
    );
    page("Invitation", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_says_what_went_wrong_in_the_brand() {
        let brand = Brand { product_name: "Acme <Cloud>".into(), ..Brand::default() };
        let html = login_page_with(&brand, Some("email or password is wrong"));
        assert!(html.contains("Sign in to Acme &lt;Cloud&gt;") && html.contains("<title>Sign in · Acme &lt;Cloud&gt;</title>"));
        assert!(html.contains("role=\"alert\""));
        assert!(html.contains("name=\"code\"") && html.contains("autocomplete=\"one-time-code\""), "the form asks for a two-factor code");
    }
}
