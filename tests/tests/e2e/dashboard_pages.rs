//! The dashboard's fleet pages over HTTP with a real session cookie, against a real hub with
//! real agents on QUIC: what an operator, an org admin, a viewer and another org's member
//! see on the overview, the agents list (with its GET filters), an agent's detail and
//! enrollment; forms refused by role change nothing; per-org brands reach the pages through
//! served stylesheets within the Content Security Policy.

#![allow(clippy::unwrap_used)]

use gantry_tests::*;
use serde_json::{json, Value};
use std::time::Duration;

/// A browser-like request (cookie; posts as same-origin forms): status, headers, body.
async fn browse(hub: &TestHub, cookie: Option<&str>, method: &str, path: &str, form: Option<&str>) -> (u16, hyper::HeaderMap, String) {
    let answer = web::browse(hub, cookie, method, path, form).await;
    (answer.status, answer.headers, answer.body)
}

async fn page(hub: &TestHub, cookie: &str, path: &str) -> (u16, String) {
    let answer = web::page(hub, cookie, path).await;
    (answer.status, answer.body)
}

/// A member of `org` with `role`, logged in: their session cookie.
async fn member(hub: &TestHub, email: &str, org: &str, role: &str) -> String {
    let password = format!("password of {email} 42");
    web::add_member(hub, email, &password, org, role).await;
    web::login(hub, email, &password).await
}

async fn put_json(api: &Api, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, text) = api.send("PUT", path, Some("application/json"), serde_json::to_vec(body).unwrap()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test(flavor = "multi_thread")]
async fn fleet_pages_show_each_role_what_it_may_see_and_do() {
    let dir = TempDir::new("dashboard-pages");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 10).await;
    hub.create_org("globex", 10).await;

    // acme: one agent online (a real agent process over QUIC) and one enrolled but never
    // connected; globex: one agent.
    let (status, token) = hub.api().post("/api/v1/orgs/acme/enrollment-tokens", &json!({ "uses": 2, "labels": { "env": "prod" } })).await;
    assert_eq!(status, 201, "{token}");
    let token = token["token"].as_str().unwrap().to_string();
    let online_dir = dir.path().join("agent-online");
    let online = enroll(&token, &online_dir).await.unwrap();
    let offline = enroll(&token, &dir.path().join("agent-offline")).await.unwrap();
    let other = enroll(&hub.token("globex", 1, "10m").await, &dir.path().join("agent-globex")).await.unwrap();
    let _agent = AgentProcess::start(&online_dir);
    hub.wait_status(&online, "online", Duration::from_secs(20)).await;

    let operator = web::login(&hub, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let admin = member(&hub, "admin@acme.example.com", "acme", "admin").await;
    let viewer = member(&hub, "viewer@acme.example.com", "acme", "viewer").await;
    let outsider = member(&hub, "owner@globex.example.com", "globex", "owner").await;

    // Without a session every page sends the browser to the login form.
    for path in ["/", "/agents", &format!("/agents/{online}"), "/enrollment"] {
        let (status, headers, _) = browse(&hub, None, "GET", path, None).await;
        assert_eq!((status, headers.get("location").and_then(|v| v.to_str().ok())), (303, Some("/login")), "{path}");
    }

    // The overview: operators see every org, agents online and offline, and MRR.
    let (status, headers, html) = browse(&hub, Some(&operator), "GET", "/", None).await;
    assert_eq!(status, 200, "{html}");
    assert!(headers.get("content-security-policy").is_some());
    assert!(!html.contains(" style=") && !html.contains("<style"), "nothing the CSP blocks");
    assert!(html.contains("<a href=\"/agents?status=online\">1</a>"), "one online: {html}");
    assert!(html.contains("<a href=\"/agents?status=offline\">2</a>"), "acme's and globex's never-connected agents");
    assert!(html.contains("MRR") && html.contains("href=\"/orgs\""), "operators see revenue and the orgs section");
    assert!(html.contains("aria-current=\"page\">Overview"));
    let (_, html) = page(&hub, &viewer, "/").await;
    assert!(html.contains("<a href=\"/agents?status=offline\">1</a>"), "a member counts only their org: {html}");
    assert!(!html.contains("MRR") && !html.contains("href=\"/orgs\""), "members see no revenue and no orgs section");

    // The agents list with GET filters.
    let (_, html) = page(&hub, &viewer, "/agents").await;
    assert!(html.contains(&format!("href=\"/agents/{online}\"")) && html.contains(&format!("href=\"/agents/{offline}\"")));
    assert!(!html.contains(&other), "another org's agent is not listed");
    assert!(html.contains("2 of 2 agents"));
    assert!(!html.contains("Add a machine"), "viewers cannot enroll");
    let (_, html) = page(&hub, &viewer, "/agents?status=online&label=env%3Dprod").await;
    assert!(html.contains(&format!("href=\"/agents/{online}\"")) && !html.contains(&format!("href=\"/agents/{offline}\"")), "{html}");
    assert!(html.contains("1 of 2 agents") && html.contains("<option value=\"online\" selected>"));
    let (_, html) = page(&hub, &viewer, "/agents?label=env%3Ddev").await;
    assert!(html.contains("No agent matches these filters"));
    let (status, html) = page(&hub, &viewer, "/agents?status=sleeping").await;
    assert_eq!(status, 400);
    assert!(html.contains("role=\"alert\"") && html.contains("must be online, offline or revoked"), "{html}");
    let (status, _) = page(&hub, &viewer, "/agents?org=globex").await;
    assert_eq!(status, 404, "another org's filter looks like a missing org");
    let (_, html) = page(&hub, &operator, "/agents?org=globex").await;
    assert!(html.contains(&other) && !html.contains(&online));

    // The agent detail: charts from the agent's real metrics, connection quality, the live
    // log tail's stream; revoke only for admins.
    let (status, html) = page(&hub, &viewer, &format!("/agents/{online}")).await;
    assert_eq!(status, 200, "{html}");
    for text in [
        "Host metrics",
        "CPU",
        "Memory",
        "Disk used",
        "Network",
        "Round trip",
        "Clock skew",
        "Certificate expires",
        "Spool backlog",
        "Containers",
        "Health checks",
        "Events",
    ] {
        assert!(html.contains(text), "{text} on the detail page");
    }
    assert!(html.contains(&format!("data-src=\"/api/v1/agents/{online}/logs/stream\"")));
    assert!(!html.contains("/revoke"), "viewers do not see the revoke button");
    let html = wait_for(Duration::from_secs(30), "host metrics charted", || async {
        let (_, html) = page(&hub, &viewer, &format!("/agents/{online}?range=15m")).await;
        html.contains("class=\"series series-0\"").then_some(html)
    })
    .await;
    assert!(html.contains("<option value=\"15m\" selected>"));
    let (status, html) = page(&hub, &viewer, &format!("/agents/{online}?range=1y")).await;
    assert_eq!(status, 400, "{html}");
    let (status, _) = page(&hub, &outsider, &format!("/agents/{online}")).await;
    assert_eq!(status, 404, "another org's agent does not exist for them");
    let (_, html) = page(&hub, &admin, &format!("/agents/{online}")).await;
    assert!(html.contains(&format!("action=\"/agents/{online}/revoke\"")), "admins see revoke");

    // A viewer's revoke post is refused and changes nothing.
    let (status, _, html) = browse(&hub, Some(&viewer), "POST", &format!("/agents/{online}/revoke"), Some("")).await;
    assert_eq!(status, 403, "{html}");
    assert!(html.contains("admin permission"), "{html}");
    assert_eq!(hub.agent(&online).await["status"], "online");
    let (status, _, _) = browse(&hub, Some(&outsider), "POST", &format!("/agents/{online}/revoke"), Some("")).await;
    assert_eq!(status, 404);
    assert_eq!(hub.agent(&online).await["status"], "online");

    // Enrollment: a token and the one-line install command, for admins only.
    let (_, html) = page(&hub, &viewer, "/enrollment").await;
    assert!(html.contains("You cannot create enrollment tokens"));
    let (status, _, _) = browse(&hub, Some(&viewer), "POST", "/enrollment", Some("org=acme&ttl=1h&uses=1&labels=")).await;
    assert_eq!(status, 403);
    let (status, _, html) = browse(&hub, Some(&admin), "POST", "/enrollment", Some("org=acme&ttl=1h&uses=1&labels=env%3Dbad%2C+oops")).await;
    assert_eq!(status, 400);
    assert!(html.contains("must be key=value") && html.contains("value=\"env=bad, oops\""), "the error and the form values: {html}");
    let (status, headers, html) = browse(&hub, Some(&admin), "POST", "/enrollment", Some("org=acme&ttl=1h&uses=1&labels=env%3Dstaging")).await;
    assert_eq!(status, 201, "{html}");
    assert_eq!(headers.get("cache-control").and_then(|v| v.to_str().ok()), Some("no-store"), "the token is not cached");
    let prefix = format!("curl -fsSL http://{}/install.sh | sudo sh -s -- --token ", hub.http);
    let start = html.find(&prefix).unwrap_or_else(|| panic!("install command in {html}")) + prefix.len();
    let new_token = html[start..].split('<').next().unwrap().to_string();
    let enrolled = enroll(&new_token, &dir.path().join("agent-from-page")).await.unwrap();
    let (_, html) = page(&hub, &viewer, "/agents?label=env%3Dstaging").await;
    assert!(html.contains(&format!("href=\"/agents/{enrolled}\"")), "the page's token enrolls with its labels");

    // An admin's revoke through the form.
    let (status, headers, _) = browse(&hub, Some(&admin), "POST", &format!("/agents/{offline}/revoke"), Some("")).await;
    assert_eq!(status, 303);
    assert_eq!(headers.get("location").and_then(|v| v.to_str().ok()), Some(format!("/agents/{offline}?done=revoked").as_str()));
    assert_eq!(hub.agent(&offline).await["status"], "revoked");
    // Both revoke forms are in the audit log: the refusal and the revocation.
    let (_, audit) = hub.api().get("/api/v1/audit?action=POST%20/agents/").await;
    let outcomes: Vec<(String, String)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["actor"].as_str().unwrap_or("").to_string(), e["outcome"].as_str().unwrap_or("").to_string()))
        .collect();
    assert!(outcomes.contains(&("viewer@acme.example.com".into(), "403".into())), "{audit}");
    assert!(outcomes.contains(&("admin@acme.example.com".into(), "303".into())), "{audit}");
    let (_, html) = page(&hub, &admin, &format!("/agents/{offline}?done=revoked")).await;
    assert!(html.contains("role=\"status\">Agent revoked.") && !html.contains("Revoke agent"));

    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn org_brands_reach_their_members_pages_and_bad_brands_change_nothing() {
    let dir = TempDir::new("dashboard-brand");
    let hub = TestHub::start(&dir.path().join("hub"), |config| {
        config.theme.product_name = "Hosting Ops".into();
        config.theme.accent = "#0a7c55".into();
    })
    .await;
    hub.create_org("acme", 10).await;
    hub.create_org("globex", 10).await;
    let operator = web::login(&hub, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let owner = member(&hub, "owner@acme.example.com", "acme", "owner").await;
    let viewer = member(&hub, "viewer@acme.example.com", "acme", "viewer").await;
    let outsider = member(&hub, "owner@globex.example.com", "globex", "owner").await;
    let api = |cookie: &str| hub.api().with_cookie(cookie);

    // The operator theme, from the config, before any org has a brand.
    let (_, html) = page(&hub, &viewer, "/").await;
    assert!(html.contains("<title>Overview · Hosting Ops</title>") && html.contains("href=\"/assets/theme.css\""), "{html}");
    let (status, headers, css) = browse(&hub, None, "GET", "/assets/theme.css", None).await;
    assert_eq!(status, 200);
    assert!(headers.get("content-type").unwrap().to_str().unwrap().starts_with("text/css"));
    assert!(css.contains("--accent:#0a7c55; --accent-fg:#ffffff"), "{css}");

    // Bad brands are refused with the field named, and change nothing.
    // A PNG signature and some bytes, base64.
    let png = "data:image/png;base64,iVBORw0KGgpyZXN0IG9mIGEgcG5n";
    for (body, field) in [
        (json!({ "product_name": "Acme Cloud", "accent": "red; } body { display:none" }), "accent"),
        (json!({ "product_name": "", "accent": "#ff0000" }), "product_name"),
        (json!({ "product_name": "Acme Cloud", "accent": "#ff0000", "logo": "https://evil.example/logo.png" }), "logo"),
        (json!({ "product_name": "Acme Cloud", "accent": "#ff0000", "logo": "data:image/png;base64,PHN2Zz4=" }), "logo"),
    ] {
        let (status, answer) = put_json(&api(&owner), "/api/v1/orgs/acme/branding", &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer["error"]["message"].as_str().unwrap().starts_with(field), "{answer}");
    }
    let (status, brand) = api(&viewer).get("/api/v1/orgs/acme/branding").await;
    assert_eq!((status, &brand["custom"]), (200, &json!(false)), "{brand}");

    // Viewers may not set it; another org does not see it.
    let good = json!({ "product_name": "Acme Cloud", "accent": "#FF0000", "header_background": "#111", "logo": png });
    let (status, _) = put_json(&api(&viewer), "/api/v1/orgs/acme/branding", &good).await;
    assert_eq!(status, 403);
    let (status, _) = put_json(&api(&outsider), "/api/v1/orgs/acme/branding", &good).await;
    assert_eq!(status, 404);

    let (status, brand) = put_json(&api(&owner), "/api/v1/orgs/acme/branding", &good).await;
    assert_eq!(status, 200, "{brand}");
    assert_eq!(brand["accent"], "#ff0000");
    let stylesheet = brand["stylesheet"].as_str().unwrap().to_string();
    let logo = brand["logo_url"].as_str().unwrap().to_string();
    assert!(stylesheet.starts_with("/assets/brand/acme.css?v="), "{stylesheet}");

    // acme's members see their brand; the stylesheet carries the colours, with readable text
    // on the dark header; the logo is served from the hub.
    let (_, html) = page(&hub, &viewer, "/agents").await;
    assert!(html.contains("<title>Agents · Acme Cloud</title>"), "{html}");
    assert!(html.contains(&format!("href=\"{}\"", stylesheet.replace('&', "&amp;"))) && html.contains(&format!("<img src=\"{logo}\"")));
    let (status, _, css) = browse(&hub, Some(&viewer), "GET", &stylesheet, None).await;
    assert_eq!(status, 200);
    assert!(css.contains("--accent:#ff0000") && css.contains("--header-bg:#111111; --header-fg:#ffffff"), "{css}");
    let (status, headers, bytes) = browse(&hub, Some(&viewer), "GET", &logo, None).await;
    assert_eq!((status, headers.get("content-type").unwrap().to_str().unwrap()), (200, "image/png"));
    assert!(bytes.contains("rest of a png"));

    // Operators keep the operator theme; other orgs cannot fetch acme's brand.
    let (_, html) = page(&hub, &operator, "/").await;
    assert!(html.contains("· Hosting Ops</title>") && !html.contains("Acme Cloud"));
    let (_, html) = page(&hub, &outsider, "/").await;
    assert!(!html.contains("Acme Cloud"));
    for path in [stylesheet.as_str(), logo.as_str()] {
        let (status, _, _) = browse(&hub, Some(&outsider), "GET", path, None).await;
        assert_eq!(status, 404, "{path}");
        let (status, _, _) = browse(&hub, None, "GET", path, None).await;
        assert_eq!(status, 401, "{path}");
    }

    // The change is in the audit log; removing the brand brings the theme back.
    let (_, audit) = hub.api().get("/api/v1/orgs/acme/audit").await;
    assert!(audit.to_string().contains("/api/v1/orgs/{org}/branding"), "{audit}");
    let (status, _, _) = api(&owner).send("DELETE", "/api/v1/orgs/acme/branding", Some("application/json"), Vec::new()).await;
    assert_eq!(status, 204);
    let (_, html) = page(&hub, &viewer, "/").await;
    assert!(html.contains("· Hosting Ops</title>"));
    hub.stop().await;
}
