//! Gantry's web dashboard views: plain view data in, HTML out.
//!
//! Presentation only: this crate knows nothing of the store, HTTP or sessions. The hub
//! builds the view structs and mounts the rendered pages. Every value is HTML-escaped on
//! the way out.

use std::fmt::Write;

/// One agent row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentRow {
    pub id: String,
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

/// One org with its agents.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrgSection {
    pub id: String,
    pub name: String,
    pub agent_limit: u32,
    pub agents: Vec<AgentRow>,
}

/// The agents overview page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentsView {
    /// Who is logged in.
    pub user: String,
    pub orgs: Vec<OrgSection>,
}

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

/// The dashboard's stylesheet.
pub const STYLESHEET: &str = "
:root { --bg:#f6f7f9; --fg:#16181d; --muted:#5b6170; --accent:#1f5fd1; --ok:#137333; --bad:#a50e0e; --card:#fff; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif; background:var(--bg); color:var(--fg); }
header { display:flex; justify-content:space-between; align-items:center; padding:.8rem 1.2rem; background:var(--card); border-bottom:1px solid #dde1e8; }
main { padding:1.2rem; max-width:72rem; margin:auto; }
h1 { font-size:1.15rem; margin:0; } h2 { font-size:1.05rem; }
table { width:100%; border-collapse:collapse; background:var(--card); }
th, td { text-align:left; padding:.45rem .6rem; border-bottom:1px solid #e6e9ef; }
th { color:var(--muted); font-weight:600; font-size:.85rem; }
.status-online { color:var(--ok); font-weight:600; } .status-offline, .status-revoked { color:var(--bad); font-weight:600; }
.empty { color:var(--muted); } .label { display:inline-block; padding:0 .35rem; margin-right:.25rem; border-radius:.25rem; background:#e8eefb; font-size:.8rem; }
form.login { max-width:22rem; margin:4rem auto; background:var(--card); padding:1.5rem; border:1px solid #dde1e8; border-radius:.5rem; }
label { display:block; margin:.6rem 0 .2rem; } input { width:100%; padding:.5rem; font:inherit; }
button { margin-top:1rem; padding:.5rem 1rem; font:inherit; background:var(--accent); color:#fff; border:0; border-radius:.3rem; cursor:pointer; }
.error { color:var(--bad); }
@media (max-width: 40rem) { .wide { display:none; } }
";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{} · Gantry</title><link rel=\"stylesheet\" href=\"{STYLESHEET_PATH}\"></head><body>{body}</body></html>",
        escape(title)
    )
}

/// The agents overview: every org the user may see, with its agents and their status.
pub fn agents_page(view: &AgentsView) -> String {
    let mut body = String::new();
    let _ = write!(
        body,
        "<header><h1>Gantry</h1><form method=\"post\" action=\"/logout\"><span>{}</span> <button type=\"submit\">Log out</button></form></header><main>",
        escape(&view.user)
    );
    if view.orgs.is_empty() {
        body.push_str("<p class=\"empty\">No organisations yet. Create one with <code>POST /api/v1/orgs</code>.</p>");
    }
    for org in &view.orgs {
        let online = org.agents.iter().filter(|a| a.status == "online").count();
        let _ = write!(
            body,
            "<section aria-labelledby=\"org-{id}\"><h2 id=\"org-{id}\">{name} <small>({online} online / {total} agents, limit {limit})</small></h2>",
            id = escape(&org.id),
            name = escape(&org.name),
            total = org.agents.len(),
            limit = org.agent_limit
        );
        if org.agents.is_empty() {
            body.push_str("<p class=\"empty\">No agents enrolled. Create an enrollment token to add a machine.</p></section>");
            continue;
        }
        body.push_str("<table><thead><tr><th>Host</th><th>Status</th><th class=\"wide\">OS</th><th class=\"wide\">Version</th><th>Last seen</th><th class=\"wide\">RTT</th><th class=\"wide\">Labels</th></tr></thead><tbody>");
        for agent in &org.agents {
            let rtt = agent.rtt_ms.map(|r| format!("{r:.1} ms")).unwrap_or_default();
            let labels: String = agent.labels.iter().map(|(k, v)| format!("<span class=\"label\">{}={}</span>", escape(k), escape(v))).collect();
            let _ = write!(
                body,
                "<tr data-agent=\"{id}\"><td title=\"{id}\">{host}</td><td class=\"status-{status}\">{status}</td><td class=\"wide\">{os} ({arch})</td><td class=\"wide\">{version}</td><td>{seen}</td><td class=\"wide\">{rtt}</td><td class=\"wide\">{labels}</td></tr>",
                id = escape(&agent.id),
                host = escape(&agent.hostname),
                status = escape(&agent.status),
                os = escape(&agent.os),
                arch = escape(&agent.arch),
                version = escape(&agent.version),
                seen = escape(&agent.last_seen),
            );
        }
        body.push_str("</tbody></table></section>");
    }
    body.push_str("</main>");
    page("Agents", &body)
}

/// The login form, with an optional error message.
pub fn login_page(error: Option<&str>) -> String {
    let error = error.map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e))).unwrap_or_default();
    let body = format!(
        "<form class=\"login\" method=\"post\" action=\"/login\"><h1>Sign in to Gantry</h1>{error}<label for=\"email\">Email</label><input id=\"email\" name=\"email\" type=\"email\" autocomplete=\"username\" required><label for=\"password\">Password</label><input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required><label for=\"code\">Authenticator code <small>(if two-factor login is on)</small></label><input id=\"code\" name=\"code\" type=\"text\" inputmode=\"numeric\" maxlength=\"7\" autocomplete=\"one-time-code\"><button type=\"submit\">Sign in</button></form>"
    );
    page("Sign in", &body)
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
    fn renders_agents_escaped() {
        let view = AgentsView {
            user: "ops@example.com".into(),
            orgs: vec![OrgSection {
                id: "acme".into(),
                name: "Acme <Corp>".into(),
                agent_limit: 5,
                agents: vec![AgentRow {
                    id: "agt_1".into(),
                    hostname: "web-1".into(),
                    status: "online".into(),
                    labels: vec![("env".into(), "<prod>".into())],
                    ..AgentRow::default()
                }],
            }],
        };
        let html = agents_page(&view);
        assert!(html.contains("web-1"));
        assert!(html.contains("class=\"status-online\">online"));
        assert!(html.contains("Acme &lt;Corp&gt;"));
        assert!(html.contains("env=&lt;prod&gt;"));
        assert!(!html.contains("<prod>"));
    }

    #[test]
    fn empty_states_say_what_to_do() {
        let html = agents_page(&AgentsView { user: "u".into(), orgs: vec![] });
        assert!(html.contains("No organisations yet"));
        let html = login_page(Some("email or password is wrong"));
        assert!(html.contains("role=\"alert\""));
        assert!(html.contains("name=\"code\"") && html.contains("autocomplete=\"one-time-code\""), "the form asks for a two-factor code");
    }
}
