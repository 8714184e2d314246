//! The isolation matrix: every API route against (own org, other org) × (each role, each
//! API key scope). Another org's objects answer 404 to everyone in acme; inside acme a role
//! or scope without the route's permission answers 403; and none of the refused requests
//! changes anything. Allowed reads answer 200 (mutations by allowed callers are what the
//! fixtures themselves do, as acme's owner).
//!
//! The expected permissions are written out here from the product's role table, not read
//! from the hub's code, so a change to either shows up as a failure.

#![allow(clippy::unwrap_used)]

use gantry_tests::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;

const PASSWORD: &str = "violet harbor stapler quantum 42";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum P {
    /// Any member at all (the org's own record).
    Member,
    Read,
    Deploy,
    Admin,
    Billing,
    /// Owners only (the org's export).
    Owner,
    /// Remote exec on agents (owners and admins).
    Exec,
}

/// What each role and key scope may do, as the product promises it.
fn grants(who: &str) -> &'static [P] {
    match who {
        "owner" => &[P::Member, P::Read, P::Deploy, P::Admin, P::Billing, P::Owner, P::Exec],
        "admin" => &[P::Member, P::Read, P::Deploy, P::Admin, P::Exec],
        // The admin scope carries the owner permission of the owner who made the key.
        "key:admin" => &[P::Member, P::Read, P::Deploy, P::Admin, P::Exec, P::Owner],
        "deployer" | "key:deploy" => &[P::Member, P::Read, P::Deploy],
        "viewer" | "key:read" => &[P::Member, P::Read],
        "billing" | "key:billing" => &[P::Member, P::Billing],
        other => panic!("unknown principal {other}"),
    }
}

struct Route {
    method: &'static str,
    path: &'static str,
    body: Option<Value>,
    needs: P,
    /// A stream that never ends when allowed, or a read that needs a live agent: only
    /// refusals are tried.
    stream: bool,
}

fn route(method: &'static str, path: &'static str, needs: P) -> Route {
    Route { method, path, body: None, needs, stream: false }
}

fn with(method: &'static str, path: &'static str, needs: P, body: Value) -> Route {
    Route { method, path, body: Some(body), needs, stream: false }
}

fn deployment_body() -> Value {
    json!({ "spec": { "name": "matrix", "services": [{ "name": "app", "image": "busybox:1" }] }, "targets": { "selector": { "role": "none" } } })
}

fn check_body(name: &str) -> Value {
    json!({ "spec": { "name": name, "probe": { "type": "memory", "max_used_percent": 95 } } })
}

fn routes() -> Vec<Route> {
    use P::*;
    let mut routes = vec![
        route("GET", "/api/v1/orgs/{org}", Member),
        with("POST", "/api/v1/orgs/{org}/enrollment-tokens", Admin, json!({})),
        route("GET", "/api/v1/orgs/{org}/agents", Read),
        route("GET", "/api/v1/agents/{agent}", Read),
        with("POST", "/api/v1/agents/{agent}/revoke", Admin, json!({})),
        route("GET", "/api/v1/agents/{agent}/logs", Read),
        route("GET", "/api/v1/agents/{agent}/events", Read),
        route("GET", "/api/v1/agents/{agent}/metrics", Read),
        route("GET", "/api/v1/agents/{agent}/checks", Read),
        route("GET", "/api/v1/orgs/{org}/deployments", Read),
        with("POST", "/api/v1/orgs/{org}/deployments", Deploy, deployment_body()),
        route("GET", "/api/v1/deployments/{dep}", Read),
        with("PUT", "/api/v1/deployments/{dep}", Deploy, deployment_body()),
        with("DELETE", "/api/v1/deployments/{dep}", Deploy, json!({})),
        with("POST", "/api/v1/deployments/{dep}/rollback", Deploy, json!({})),
        route("GET", "/api/v1/deployments/{dep}/revisions", Read),
        route("GET", "/api/v1/orgs/{org}/secrets", Admin),
        with("PUT", "/api/v1/orgs/{org}/secrets/{secret}", Admin, json!({ "value": "changed" })),
        with("DELETE", "/api/v1/orgs/{org}/secrets/{secret}", Admin, json!({})),
        route("GET", "/api/v1/orgs/{org}/registries", Admin),
        with("PUT", "/api/v1/orgs/{org}/registries/{registry}", Admin, json!({ "username": "u", "password": "changed" })),
        with("DELETE", "/api/v1/orgs/{org}/registries/{registry}", Admin, json!({})),
        route("GET", "/api/v1/orgs/{org}/webhooks", Admin),
        with("POST", "/api/v1/orgs/{org}/webhooks", Admin, json!({ "url": "http://127.0.0.1:9/other", "events": ["*"] })),
        route("GET", "/api/v1/orgs/{org}/webhooks/{webhook}", Admin),
        with("PATCH", "/api/v1/orgs/{org}/webhooks/{webhook}", Admin, json!({ "enabled": false })),
        with("PUT", "/api/v1/orgs/{org}/webhooks/{webhook}", Admin, json!({ "url": "http://127.0.0.1:9/changed", "events": ["*"] })),
        with("DELETE", "/api/v1/orgs/{org}/webhooks/{webhook}", Admin, json!({})),
        with("POST", "/api/v1/orgs/{org}/webhooks/{webhook}/rotate-secret", Admin, json!({})),
        route("GET", "/api/v1/orgs/{org}/webhooks/{webhook}/deliveries", Admin),
        route("GET", "/api/v1/orgs/{org}/webhooks/{webhook}/deliveries/{delivery}", Admin),
        with("POST", "/api/v1/orgs/{org}/webhooks/{webhook}/deliveries/{delivery}/redeliver", Admin, json!({})),
        route("GET", "/api/v1/orgs/{org}/checks", Read),
        with("POST", "/api/v1/orgs/{org}/checks", Admin, check_body("other")),
        route("GET", "/api/v1/orgs/{org}/checks/{check}", Read),
        with("PUT", "/api/v1/orgs/{org}/checks/{check}", Admin, check_body("renamed")),
        with("DELETE", "/api/v1/orgs/{org}/checks/{check}", Admin, json!({})),
        route("GET", "/api/v1/orgs/{org}/alerts", Read),
        with("POST", "/api/v1/orgs/{org}/alerts/{alert}/acknowledge", Deploy, json!({})),
        route("GET", "/api/v1/orgs/{org}/silences", Read),
        with("POST", "/api/v1/orgs/{org}/silences", Deploy, json!({ "rule": "disk_full", "duration": "1h" })),
        with("DELETE", "/api/v1/orgs/{org}/silences/{silence}", Deploy, json!({})),
        route("GET", "/api/v1/orgs/{org}/alert-rules", Read),
        with("PUT", "/api/v1/orgs/{org}/alert-rules", Admin, json!({ "offline_after_secs": 1 })),
        route("GET", "/api/v1/orgs/{org}/branding", Read),
        with("PUT", "/api/v1/orgs/{org}/branding", Admin, json!({ "product_name": "Changed", "accent": "#123456" })),
        with("DELETE", "/api/v1/orgs/{org}/branding", Admin, json!({})),
        route("GET", "/api/v1/orgs/{org}/logs", Read),
        route("GET", "/api/v1/orgs/{org}/events", Read),
        route("GET", "/api/v1/orgs/{org}/audit", Admin),
        route("GET", "/api/v1/orgs/{org}/export", Owner),
        route("GET", "/api/v1/orgs/{org}/members", Read),
        with("PUT", "/api/v1/orgs/{org}/members/{member}", Admin, json!({ "role": "deployer" })),
        with("DELETE", "/api/v1/orgs/{org}/members/{member}", Admin, json!({})),
        route("GET", "/api/v1/orgs/{org}/invitations", Admin),
        with("POST", "/api/v1/orgs/{org}/invitations", Admin, json!({ "email": "new@example.com", "role": "viewer" })),
        with("DELETE", "/api/v1/orgs/{org}/invitations/{invitation}", Admin, json!({})),
        route("GET", "/api/v1/orgs/{org}/api-keys", Admin),
        with("POST", "/api/v1/orgs/{org}/api-keys", Admin, json!({ "name": "x", "scopes": ["read"] })),
        with("DELETE", "/api/v1/orgs/{org}/api-keys/{key}", Admin, json!({})),
        route("GET", "/api/v1/orgs/{org}/subscription", Billing),
        route("GET", "/api/v1/orgs/{org}/invoices/preview", Billing),
        route("GET", "/api/v1/orgs/{org}/invoices", Billing),
        route("GET", "/api/v1/billing/usage?org={org}", Billing),
    ];
    for path in ["/api/v1/agents/{agent}/logs/stream", "/api/v1/deployments/{dep}/progress", "/api/v1/agents/stream?org={org}"] {
        routes.push(Route { method: "GET", path, body: None, needs: P::Read, stream: true });
    }
    // Support actions need the agent online (it is not here): only refusals are tried.
    for path in [
        "/api/v1/agents/{agent}/containers/{container}/start",
        "/api/v1/agents/{agent}/containers/{container}/stop",
        "/api/v1/agents/{agent}/containers/{container}/restart",
        "/api/v1/agents/{agent}/containers/{container}/remove",
    ] {
        routes.push(with("POST", path, P::Deploy, json!({})));
    }
    routes.push(Route { method: "GET", path: "/api/v1/agents/{agent}/containers/{container}/logs", body: None, needs: P::Read, stream: true });
    routes.push(with("POST", "/api/v1/agents/{agent}/exec", P::Exec, json!({ "command": ["true"] })));
    routes.push(with("POST", "/api/v1/agents/{agent}/diagnostics", P::Admin, json!({})));
    routes.push(route("GET", "/api/v1/orgs/{org}/settings", P::Read));
    routes.push(with("PUT", "/api/v1/orgs/{org}/settings", P::Admin, json!({ "exec_enabled": true })));
    routes
}

/// An org's objects, by placeholder name.
type Fixtures = BTreeMap<&'static str, String>;

async fn send(api: &Api, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let bytes = body.map(|b| serde_json::to_vec(b).unwrap()).unwrap_or_default();
    let content_type = body.map(|_| "application/json");
    let (status, _, text) = api.send(method, path, content_type, bytes).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn created(api: &Api, method: &str, path: &str, body: Value, field: &str) -> String {
    let (code, answer) = send(api, method, path, Some(&body)).await;
    assert!(code == 200 || code == 201, "{method} {path}: {code} {answer}");
    answer[field].as_str().unwrap_or_else(|| panic!("{field} in {answer}")).to_string()
}

async fn accept(hub: &TestHub, token: &str) -> Api {
    let anonymous = hub.api().anonymous();
    let body = json!({ "token": token, "password": PASSWORD }).to_string().into_bytes();
    let (code, headers, text) = anonymous.send("POST", "/api/v1/invitations/accept", Some("application/json"), body).await;
    assert_eq!(code, 200, "{text}");
    let cookie = headers.get("set-cookie").unwrap().to_str().unwrap().split(';').next().unwrap().to_string();
    Api { cookie: Some(cookie), ..anonymous }
}

/// A member of `org` with `role`, logged in.
async fn person(hub: &TestHub, by: &Api, org: &str, role: &str) -> Api {
    person_named(hub, by, org, role, role).await
}

async fn person_named(hub: &TestHub, by: &Api, org: &str, role: &str, name: &str) -> Api {
    let email = format!("{name}@{org}.example.com");
    let token = created(by, "POST", &format!("/api/v1/orgs/{org}/invitations"), json!({ "email": email, "role": role }), "token").await;
    accept(hub, &token).await
}

/// Build one org's objects, as its owner.
async fn furnish(hub: &TestHub, org: &str, dir: &std::path::Path) -> (Api, Fixtures) {
    let operator = hub.api();
    let owner = person(hub, &operator, org, "owner").await;
    let mut f = Fixtures::new();
    f.insert("org", org.to_string());
    f.insert("dep", created(&owner, "POST", &format!("/api/v1/orgs/{org}/deployments"), deployment_body(), "id").await);
    f.insert("check", created(&owner, "POST", &format!("/api/v1/orgs/{org}/checks"), check_body("mem"), "id").await);
    let webhook = created(&owner, "POST", &format!("/api/v1/orgs/{org}/webhooks"), json!({ "url": "http://127.0.0.1:9/hook", "events": ["*"] }), "id").await;
    // The enrollment gives the endpoint a delivery.
    let token = created(&owner, "POST", &format!("/api/v1/orgs/{org}/enrollment-tokens"), json!({}), "token").await;
    f.insert("agent", enroll(&token, &dir.join(format!("agent-{org}"))).await.unwrap());

    let deliveries = format!("/api/v1/orgs/{org}/webhooks/{webhook}/deliveries");
    let delivery = wait_for(std::time::Duration::from_secs(10), "a delivery", || async {
        let (_, list) = owner.get(&deliveries).await;
        list["deliveries"].as_array().and_then(|d| d.first()).and_then(|d| d["id"].as_str()).map(str::to_string)
    })
    .await;
    f.insert("webhook", webhook);
    f.insert("delivery", delivery);
    f.insert("silence", created(&owner, "POST", &format!("/api/v1/orgs/{org}/silences"), json!({ "rule": "agent_offline", "duration": "2h" }), "id").await);
    send(&owner, "PUT", &format!("/api/v1/orgs/{org}/secrets/db"), Some(&json!({ "value": "s3cret" }))).await;
    f.insert("secret", "db".into());
    send(&owner, "PUT", &format!("/api/v1/orgs/{org}/registries/reg.example.com"), Some(&json!({ "username": "u", "password": "p" }))).await;
    f.insert("registry", "reg.example.com".into());
    f.insert(
        "invitation",
        created(&owner, "POST", &format!("/api/v1/orgs/{org}/invitations"), json!({ "email": "later@example.com", "role": "viewer" }), "id").await,
    );
    f.insert("key", created(&owner, "POST", &format!("/api/v1/orgs/{org}/api-keys"), json!({ "name": "fixture", "scopes": ["read"] }), "id").await);
    let member = person_named(hub, &owner, org, "viewer", "member").await;
    let (_, who) = member.get("/api/v1/auth/me").await;
    f.insert("member", who["id"].as_str().unwrap().to_string());
    f.insert("alert", "alr_absent".into());
    f.insert("container", "web".into());
    (owner, f)
}

/// Whether an audited `METHOD /template` is the table's route, whatever the hub names
/// the path parameters.
fn same_route(audited: &str, route: &str) -> bool {
    let shape = |text: &str| text.split('/').map(|part| if part.starts_with('{') { "{}" } else { part }).collect::<Vec<_>>().join("/");
    shape(audited) == shape(route)
}

fn fill(path: &str, f: &Fixtures) -> String {
    f.iter().fold(path.to_string(), |path, (name, value)| path.replace(&format!("{{{name}}}"), value))
}

/// Everything the matrix could change, as the operator sees it, minus what moves by itself.
async fn snapshot(hub: &TestHub, f: &Fixtures) -> Value {
    let operator = hub.api();
    let org = &f["org"];
    let mut out = serde_json::Map::new();
    for path in [
        format!("/api/v1/orgs/{org}"),
        format!("/api/v1/orgs/{org}/agents"),
        format!("/api/v1/orgs/{org}/deployments"),
        format!("/api/v1/deployments/{}/revisions", f["dep"]),
        format!("/api/v1/orgs/{org}/secrets"),
        format!("/api/v1/orgs/{org}/registries"),
        format!("/api/v1/orgs/{org}/webhooks"),
        format!("/api/v1/orgs/{org}/checks"),
        format!("/api/v1/orgs/{org}/silences"),
        format!("/api/v1/orgs/{org}/alert-rules"),
        format!("/api/v1/orgs/{org}/alerts?status=all"),
        format!("/api/v1/orgs/{org}/members"),
        format!("/api/v1/orgs/{org}/invitations"),
        format!("/api/v1/orgs/{org}/api-keys"),
        format!("/api/v1/orgs/{org}/settings"),
    ] {
        let (code, mut body) = operator.get(&path).await;
        assert_eq!(code, 200, "{path}: {body}");
        scrub(&mut body);
        out.insert(path, body);
    }
    Value::Object(out)
}

fn scrub(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for volatile in ["last_used_at", "last_seen", "rtt_ms", "connected_since", "clock_skew_ms", "remote_addr", "status_counts"] {
                map.remove(volatile);
            }
            map.values_mut().for_each(scrub);
        }
        Value::Array(items) => items.iter_mut().for_each(scrub),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_other_orgs_and_missing_permissions_and_changes_nothing() {
    let dir = TempDir::new("isolation");
    let hub = TestHub::start(&dir.path().join("hub"), |config| config.rate_limit.enabled = false).await;
    hub.create_org("acme", 10).await;
    hub.create_org("globex", 10).await;
    let plan = json!({ "id": "basic", "name": "Basic", "prices": { "currency": "USD", "base_minor": 1000 }, "limits": { "agents": 10 } });
    assert_eq!(hub.api().post("/api/v1/plans", &plan).await.0, 201);
    for org in ["acme", "globex"] {
        let (code, body) = send(&hub.api(), "PUT", &format!("/api/v1/orgs/{org}/subscription"), Some(&json!({ "plan": "basic" }))).await;
        assert_eq!(code, 200, "{body}");
    }
    let (acme_owner, acme) = furnish(&hub, "acme", dir.path()).await;
    let (_, globex) = furnish(&hub, "globex", dir.path()).await;

    let mut principals: Vec<(String, Api)> = Vec::new();
    principals.push(("owner".into(), acme_owner.clone()));
    for role in ["admin", "deployer", "viewer", "billing"] {
        principals.push((role.into(), person(&hub, &acme_owner, "acme", role).await));
    }
    for scope in ["read", "deploy", "admin", "billing"] {
        let key = created(&acme_owner, "POST", "/api/v1/orgs/acme/api-keys", json!({ "name": scope, "scopes": [scope] }), "key").await;
        principals.push((format!("key:{scope}"), hub.api().with_bearer(&key)));
    }

    let before = (snapshot(&hub, &acme).await, snapshot(&hub, &globex).await);
    let mut failures = Vec::new();
    let mut tried = 0;
    for route in routes() {
        for (who, api) in &principals {
            for (target, fixtures) in [("acme", &acme), ("globex", &globex)] {
                let allowed = target == "acme" && grants(who).contains(&route.needs);
                if allowed && (route.method != "GET" || route.stream) {
                    continue;
                }
                let path = fill(route.path, fixtures);
                let (code, body) = send(api, route.method, &path, route.body.as_ref()).await;
                tried += 1;
                let expected: &[u16] = match (target, allowed) {
                    ("globex", _) => &[404],
                    (_, false) => &[403],
                    // The one alert id is made up: allowed, it is simply not there.
                    _ if route.path.contains("{alert}") => &[404],
                    _ => &[200],
                };
                if !expected.contains(&code) {
                    failures.push(format!("{who} {} {path}: {code} (expected {expected:?}) {body}", route.method));
                } else if code == 404 && body["error"]["code"] != "not_found" {
                    failures.push(format!("{who} {} {path}: a 404 that is not the API's not_found: {body}", route.method));
                }
            }
        }
    }
    // A password change belongs to a person with a session: every API key is refused,
    // whatever its scopes (the snapshot below shows nothing changed).
    for (who, api) in principals.iter().filter(|(who, _)| who.starts_with("key:")) {
        let body = json!({ "current_password": PASSWORD, "new_password": "a brand new passphrase 42" });
        let (code, answer) = send(api, "POST", "/api/v1/auth/password", Some(&body)).await;
        tried += 1;
        if code != 403 {
            failures.push(format!("{who} POST /api/v1/auth/password: {code} (expected 403) {answer}"));
        }
    }
    assert!(failures.is_empty(), "{} of {tried} requests answered wrongly:\n{}", failures.len(), failures.join("\n"));
    assert!(tried > 500, "the matrix ran {tried} requests");
    let after = (snapshot(&hub, &acme).await, snapshot(&hub, &globex).await);
    assert_eq!(before.0, after.0, "refused requests changed acme");
    assert_eq!(before.1, after.1, "refused requests changed globex");

    // Every mutating route left audit entries for its refusals: 403 by acme's members in
    // acme, 404 in globex, each with the caller's name.
    let mut audited: BTreeMap<String, std::collections::BTreeSet<(String, String)>> = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = format!("/api/v1/audit?limit=1000{}", cursor.as_ref().map(|c| format!("&cursor={c}")).unwrap_or_default());
        let (code, body) = hub.api().get(&page).await;
        assert_eq!(code, 200, "{body}");
        for entry in body["entries"].as_array().unwrap() {
            let set = audited.entry(entry["action"].as_str().unwrap().to_string()).or_default();
            set.insert((entry["outcome"].as_str().unwrap().to_string(), entry["actor"].as_str().unwrap().to_string()));
        }
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    for route in routes().iter().filter(|r| r.method != "GET") {
        let action = format!("{} {}", route.method, route.path.replace("{dep}", "{id}"));
        let outcomes = audited.iter().filter(|(a, _)| same_route(a, &action)).flat_map(|(_, s)| s.iter().cloned()).collect::<Vec<_>>();
        assert!(outcomes.iter().any(|(o, who)| o == "404" && who.ends_with("@acme.example.com")), "{action}: no 404 entry in {outcomes:?}");
        assert!(outcomes.iter().any(|(o, who)| o == "403" && who == "viewer@acme.example.com"), "{action}: no 403 entry for the viewer in {outcomes:?}");
    }
    hub.stop().await;
}
