//! The account page: who is signed in, their org memberships and roles, the password
//! change form, two-factor login (state, enrolment with the secret shown once, confirmation,
//! turning it off) and signing out.
//!
//! Views only: the hub fills [`AccountView`] from the auth API's own handlers. Every form
//! posts to the hub and works without JavaScript; an error is shown next to the form it
//! belongs to, and nothing typed into a password field is ever rendered back.

use crate::escape;
use crate::layout::{self, Cell, Shell};
use std::fmt::Write;

/// Where two-factor login stands for the account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TotpState {
    /// No authenticator is set up.
    #[default]
    Off,
    /// An enrolment was started but not confirmed with a code yet.
    Pending,
    /// Sign-ins ask for a code.
    On,
}

/// A new two-factor secret, shown once right after enrolment starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TotpEnrolment {
    /// The secret in base32, for typing into an authenticator app.
    pub secret: String,
    /// The `otpauth://` URI (what a QR code would carry); phones open it in the app.
    pub otpauth_uri: String,
}

/// One org the account belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MembershipRow {
    pub org: String,
    /// `owner`, `admin`, `deployer`, `viewer` or `billing`.
    pub role: String,
}

/// The account page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountView {
    pub email: String,
    pub user_id: String,
    /// Platform operator: may act in every org.
    pub operator: bool,
    pub memberships: Vec<MembershipRow>,
    pub totp: TotpState,
    /// Set on the answer that started an enrolment, and only there.
    pub enrolment: Option<TotpEnrolment>,
    /// What went wrong with the password form.
    pub password_error: Option<String>,
    /// What went wrong with a two-factor form.
    pub totp_error: Option<String>,
}

/// The account page: facts, memberships, password change, two-factor login, sign out.
pub fn account_page(shell: &Shell, view: &AccountView) -> String {
    let mut body = layout::page_header("Your account", "");
    let _ = write!(
        body,
        "<dl class=\"facts\"><dt>Email</dt><dd>{}</dd><dt>User id</dt><dd><code>{}</code></dd><dt>Access</dt><dd>{}</dd><dt>Two-factor login</dt><dd>{}</dd></dl>",
        escape(&view.email),
        escape(&view.user_id),
        if view.operator { "Platform operator: every org" } else { "Members of the orgs below" },
        layout::status_badge(match view.totp {
            TotpState::Off => "off",
            TotpState::Pending => "pending",
            TotpState::On => "on",
        }),
    );
    let rows: Vec<Vec<Cell>> = view
        .memberships
        .iter()
        .map(|m| {
            vec![Cell::html(format!("<a href=\"/?org={}\">{}</a>", layout::query_escape(&m.org), escape(&m.org))), Cell::html(layout::status_badge(&m.role))]
        })
        .collect();
    let empty = if view.operator {
        layout::empty_state("No memberships", "As a platform operator you act in every org without one.")
    } else {
        layout::empty_state("No memberships", "Ask an admin of an org for an invitation.")
    };
    body.push_str(&layout::table("Org memberships", &["Org", "Role"], &rows, &empty));
    password_form(&mut body, view);
    totp_section(&mut body, view);
    body.push_str(
        "<section class=\"card\" aria-labelledby=\"signout-h\"><h2 id=\"signout-h\">Sign out</h2><p>End this session in this browser.</p><form method=\"post\" action=\"/logout\"><button type=\"submit\" class=\"secondary\">Sign out</button></form></section>",
    );
    layout::render(shell, "Account", &body)
}

fn password_form(body: &mut String, view: &AccountView) {
    body.push_str("<form method=\"post\" action=\"/account/password\" class=\"card stacked\" id=\"password\" aria-labelledby=\"password-h\"><h2 id=\"password-h\">Change password</h2>");
    if let Some(error) = &view.password_error {
        body.push_str(&layout::error_box(error));
    }
    // The email lets password managers file the new password under the right account.
    let _ = write!(
        body,
        "<input type=\"hidden\" name=\"username\" value=\"{}\" autocomplete=\"username\">\
<label for=\"pw-current\">Current password</label><input id=\"pw-current\" name=\"current_password\" type=\"password\" autocomplete=\"current-password\" required>\
<label for=\"pw-new\">New password</label><input id=\"pw-new\" name=\"new_password\" type=\"password\" autocomplete=\"new-password\" required minlength=\"12\" aria-describedby=\"pw-new-hint\"><small id=\"pw-new-hint\">At least 12 characters and hard to guess: a few unrelated words work well.</small>\
<label for=\"pw-confirm\">New password again</label><input id=\"pw-confirm\" name=\"confirm_password\" type=\"password\" autocomplete=\"new-password\" required minlength=\"12\">\
<p class=\"muted\">Your other sessions are signed out; this one stays.</p><button type=\"submit\">Change password</button></form>",
        escape(&view.email)
    );
}

fn totp_section(body: &mut String, view: &AccountView) {
    body.push_str("<section class=\"card stacked\" id=\"two-factor\" aria-labelledby=\"totp-h\"><h2 id=\"totp-h\">Two-factor login</h2>");
    if let Some(error) = &view.totp_error {
        body.push_str(&layout::error_box(error));
    }
    match (view.totp, &view.enrolment) {
        (TotpState::On, _) => {
            body.push_str(
                "<p>Sign-ins ask for a code from your authenticator app.</p>\
<form method=\"post\" action=\"/account/totp/disable\" class=\"stacked\"><label for=\"totp-off-password\">Password <small>(to turn it off)</small></label><input id=\"totp-off-password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required><button type=\"submit\" class=\"danger\">Turn two-factor login off</button></form>",
            );
        }
        (_, Some(enrolment)) => {
            let _ = write!(
                body,
                "<p>Add this account to your authenticator app, then enter the code it shows. The secret is shown only now.</p>\
<p>Scan this code with the app:</p>{qr}\
<p>On a phone: <a href=\"{uri}\">open in the authenticator app</a>. Otherwise type the secret:</p>\
<div class=\"command\"><code id=\"totp-secret\" tabindex=\"0\">{secret}</code><button type=\"button\" class=\"js-only hidden\" data-copy=\"totp-secret\">Copy</button></div>\
<p class=\"muted\">Time-based, 6 digits, every 30 seconds (SHA-1).</p>",
                uri = escape(&enrolment.otpauth_uri),
                secret = escape(&enrolment.secret),
                qr = layout::qr_svg(&enrolment.otpauth_uri, "QR code of the authenticator link").unwrap_or_default(),
            );
            confirm_form(body);
        }
        (TotpState::Pending, None) => {
            body.push_str("<p>An enrolment was started but not confirmed. Enter the code your app shows, or start again for a new secret.</p>");
            confirm_form(body);
            start_form(body, "Start again");
        }
        (TotpState::Off, None) => {
            body.push_str("<p>Two-factor login is off. With it on, a stolen password alone does not get into your account.</p>");
            start_form(body, "Set up two-factor login");
        }
    }
    body.push_str("</section>");
}

fn confirm_form(body: &mut String) {
    body.push_str(
        "<form method=\"post\" action=\"/account/totp/confirm\" class=\"stacked\"><label for=\"totp-code\">Code from the app</label><input id=\"totp-code\" name=\"code\" type=\"text\" inputmode=\"numeric\" maxlength=\"7\" autocomplete=\"one-time-code\" required><button type=\"submit\">Turn two-factor login on</button></form>",
    );
}

fn start_form(body: &mut String, label: &str) {
    body.push_str(&layout::action_button("/account/totp", label, &[], false));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Brand, Nav};

    fn shell(brand: &Brand) -> Shell<'_> {
        Shell { user: "ana@example.com", operator: false, admin: false, org: None, brand, active: Nav::Account, flash: None }
    }

    fn view() -> AccountView {
        AccountView {
            email: "ana@example.com".into(),
            user_id: "usr_1".into(),
            memberships: vec![MembershipRow { org: "acme".into(), role: "viewer".into() }],
            ..AccountView::default()
        }
    }

    #[test]
    fn shows_who_and_where_with_a_labelled_password_form() {
        let brand = Brand::default();
        let html = account_page(&shell(&brand), &view());
        assert!(html.contains("<dd>ana@example.com</dd>") && html.contains("<code>usr_1</code>"));
        assert!(html.contains("href=\"/?org=acme\">acme</a>") && html.contains("status-viewer\">viewer"));
        assert!(html.contains("aria-current=\"page\">Account"));
        for id in ["pw-current", "pw-new", "pw-confirm"] {
            assert!(html.contains(&format!("<label for=\"{id}\">")) && html.contains(&format!("id=\"{id}\"")), "{id} is labelled");
        }
        assert!(html.contains("action=\"/account/password\"") && html.contains("action=\"/logout\""));
        assert!(html.contains("action=\"/account/totp\"") && html.contains("Set up two-factor login"));
        assert!(!html.contains("role=\"alert\""), "no error without one");
    }

    #[test]
    fn errors_are_shown_at_their_form_and_escaped() {
        let brand = Brand::default();
        let html = account_page(&shell(&brand), &AccountView { password_error: Some("the current password is <wrong>".into()), ..view() });
        let form = html.split("id=\"password\"").nth(1).unwrap();
        assert!(form.contains("role=\"alert\"><p>the current password is &lt;wrong&gt;"), "{html}");
    }

    #[test]
    fn enrolment_shows_the_secret_once_with_a_confirm_form() {
        let brand = Brand::default();
        let enrolment = TotpEnrolment {
            secret: "JBSWY3DPEHPK3PXP".into(),
            otpauth_uri: "otpauth://totp/Gantry:ana%40example.com?secret=JBSWY3DPEHPK3PXP&issuer=Gantry".into(),
        };
        let html = account_page(&shell(&brand), &AccountView { totp: TotpState::Pending, enrolment: Some(enrolment), ..view() });
        assert!(
            html.contains("JBSWY3DPEHPK3PXP") && html.contains("href=\"otpauth://totp/Gantry:ana%40example.com?secret=JBSWY3DPEHPK3PXP&amp;issuer=Gantry\"")
        );
        assert!(html.contains("action=\"/account/totp/confirm\"") && html.contains("<label for=\"totp-code\">"));
        assert!(html.contains("<svg class=\"qr\"") && html.contains("aria-label=\"QR code of the authenticator link\""), "a QR code to scan");
        let pending = account_page(&shell(&brand), &AccountView { totp: TotpState::Pending, ..view() });
        assert!(!pending.contains("JBSWY3DPEHPK3PXP") && pending.contains("Start again") && pending.contains("status-pending\">pending"));
        let on = account_page(&shell(&brand), &AccountView { totp: TotpState::On, ..view() });
        assert!(on.contains("action=\"/account/totp/disable\"") && !on.contains("action=\"/account/totp\"") && on.contains("status-on\">on"));
    }
}
