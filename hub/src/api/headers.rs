//! Security headers set on every response, and the dashboard's stylesheet, served as a file
//! so the Content Security Policy needs no `'unsafe-inline'`.
//!
//! The pages carry no inline scripts and no inline styles (script and brand colours are
//! served files); keep it so, or the policy blocks them.

use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

/// Content Security Policy of every response: only the hub's own resources, no framing,
/// no `<base>` and forms posting only to the hub.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// `Strict-Transport-Security` value sent when the hub serves TLS.
pub const STRICT_TRANSPORT_SECURITY: &str = "max-age=31536000";

/// Path of the dashboard stylesheet.
pub const STYLESHEET_PATH: &str = gantry_dashboards::STYLESHEET_PATH;

/// Set the security headers; HSTS only when `tls`, i.e. the hub serves HTTPS itself
/// (`Config::serves_tls`): browsers would otherwise be told to insist on an HTTPS the hub
/// does not serve. A TLS-terminating proxy in front of a plain-HTTP hub sends HSTS itself.
pub fn security_headers(headers: &mut HeaderMap, tls: bool) {
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    if tls {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static(STRICT_TRANSPORT_SECURITY));
    }
}

/// The dashboard stylesheet.
pub async fn stylesheet() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")], gantry_dashboards::STYLESHEET).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsts_is_sent_only_over_tls() {
        let mut plain = HeaderMap::new();
        security_headers(&mut plain, false);
        assert_eq!(plain.get(header::CONTENT_SECURITY_POLICY).and_then(|v| v.to_str().ok()), Some(CONTENT_SECURITY_POLICY));
        assert!(plain.get(header::STRICT_TRANSPORT_SECURITY).is_none());
        let mut tls = HeaderMap::new();
        security_headers(&mut tls, true);
        assert_eq!(tls.get(header::STRICT_TRANSPORT_SECURITY).and_then(|v| v.to_str().ok()), Some("max-age=31536000"));
    }

    #[test]
    fn pages_need_nothing_the_policy_blocks() {
        let brand = gantry_dashboards::Brand::default();
        let shell = gantry_dashboards::Shell {
            user: "u",
            operator: true,
            admin: true,
            org: None,
            brand: &brand,
            active: gantry_dashboards::Nav::Agents,
            flash: Some("x"),
        };
        let pages = [
            gantry_dashboards::login_page(Some("<x>")),
            gantry_dashboards::fleet::agents_page(&shell, &Default::default()),
            gantry_dashboards::fleet::agent_page(&shell, &Default::default()),
            gantry_dashboards::account::account_page(&shell, &Default::default()),
            gantry_dashboards::webhooks::webhooks_page(&shell, &Default::default()),
            gantry_dashboards::webhooks::deliveries_page(&shell, &Default::default()),
        ];
        for page in pages {
            assert!(!page.contains("<script>") && !page.contains("<style") && !page.contains(" style="), "{page}");
            assert_eq!(page.matches("<script").count(), page.matches("<script src=\"/assets/").count(), "scripts only from files: {page}");
            assert!(page.contains(STYLESHEET_PATH), "{page}");
        }
    }
}
