//! API hygiene end to end, on real hubs with small limits: request rate limits per key, per
//! org and per client address (429 with `Retry-After` and the error JSON, other orgs
//! unaffected, service back once the advertised wait has passed), failed-login throttling
//! per account and per address on the JSON and the form login, security headers on every
//! kind of response, and 413 for oversized bodies.

#![allow(clippy::unwrap_used)]

use gantry_tests::*;
use serde_json::{json, Value};
use std::time::Duration;

/// Header `name` of a response as text ("" if absent).
fn header<'a>(headers: &'a hyper::HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

/// Check a 429 answer: whole-second `Retry-After` within `1..=max_secs`, and the error JSON.
fn assert_rate_limited(status: u16, headers: &hyper::HeaderMap, body: &str, max_secs: u64) -> u64 {
    assert_eq!(status, 429, "{body}");
    let retry_after: u64 = header(headers, "retry-after").parse().unwrap_or_else(|_| panic!("Retry-After {:?}", headers.get("retry-after")));
    assert!((1..=max_secs).contains(&retry_after), "Retry-After {retry_after}");
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    retry_after
}

/// Send GETs with `api` until one is refused; the successes before it and the refusal.
async fn until_refused(api: &Api, path: &str, most: usize) -> (usize, (u16, hyper::HeaderMap, String)) {
    for ok in 0..most {
        let (status, headers, body) = api.send("GET", path, None, Vec::new()).await;
        if status == 429 {
            return (ok, (status, headers, body));
        }
    }
    panic!("{path}: no 429 after {most} requests");
}

async fn metric(hub: &TestHub, name: &str) -> u64 {
    let (_, _, text) = hub.api().anonymous().send("GET", "/metrics", None, Vec::new()).await;
    text.lines().find_map(|line| line.strip_prefix(name)?.trim().parse().ok()).unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_orgs_are_rate_limited_apart_and_recover_after_retry_after() {
    let dir = TempDir::new("hygiene-rate");
    let hub = TestHub::start(dir.path(), |config| {
        let limits = &mut config.rate_limit;
        limits.per_key_per_sec = 1;
        limits.per_key_burst = 3;
        limits.per_org_per_sec = 1;
        limits.per_org_burst = 5;
        limits.per_ip_per_sec = 1;
        limits.per_ip_burst = 2;
    })
    .await;
    hub.create_org("acme", 10).await;
    hub.create_org("other", 10).await;
    let key = |org: &str| gantry_hub::auth::create_api_key(&hub.hub, "test", Some(org.to_string()), "test").unwrap().1;
    let acme = hub.api().with_bearer(&key("acme"));
    let other = hub.api().with_bearer(&key("other"));

    // The key's burst (3; a 4th only if the machine stalled a second mid-way), then 429.
    let (served, (status, headers, body)) = until_refused(&acme, "/api/v1/orgs/acme", 10).await;
    assert!((3..=4).contains(&served), "served {served} before the limit");
    let retry_after = assert_rate_limited(status, &headers, &body, 1);
    assert!(body.contains("credential"), "{body}");
    // Security headers are on the refusal too.
    assert_eq!(header(&headers, "x-content-type-options"), "nosniff");

    // Another org's key is unaffected, and so are operators (exempt by default).
    let (status, _) = other.get("/api/v1/orgs/other").await;
    assert_eq!(status, 200);
    for _ in 0..10 {
        assert_eq!(hub.api().get("/api/v1/orgs").await.0, 200);
    }

    // A second key of the same org has its own bucket but shares the org's: the org's
    // burst of 5 is nearly used up by the first key.
    let acme2 = hub.api().with_bearer(&key("acme"));
    let (served, (status, headers, body)) = until_refused(&acme2, "/api/v1/orgs/acme", 10).await;
    assert!(served <= 2, "served {served}; the org limit did not hold");
    assert_rate_limited(status, &headers, &body, 5);
    assert!(body.contains("org"), "{body}");

    // After the advertised wait the first key is served again (refusals cost no tokens,
    // so polling does not push recovery back).
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    wait_for(Duration::from_secs(3), "the key to be served again", || async { (acme.get("/api/v1/orgs/acme").await.0 == 200).then_some(()) }).await;

    // Without a valid credential the client address is limited; invented key ids count
    // against the address too. The probes and /metrics are never limited.
    let anonymous = hub.api().anonymous();
    let (served, (status, headers, body)) = until_refused(&anonymous.with_bearer("gk_0123456789abcdef.nope"), "/api/v1/orgs", 10).await;
    assert!(served <= 3, "served {served}");
    assert_rate_limited(status, &headers, &body, 2);
    let (status, headers, body) = anonymous.send("GET", "/api/v1/orgs", None, Vec::new()).await;
    assert_rate_limited(status, &headers, &body, 2);
    for path in ["/healthz", "/readyz", "/metrics"] {
        for _ in 0..5 {
            assert_eq!(anonymous.get_status(path).await, 200, "{path}");
        }
    }
    assert!(metric(&hub, "gantry_http_rate_limited_total").await >= 3);
    hub.stop().await;
}

async fn json_login(hub: &TestHub, email: &str, password: &str) -> (u16, hyper::HeaderMap, String) {
    let body = json!({ "email": email, "password": password }).to_string().into_bytes();
    hub.api().anonymous().send("POST", "/api/v1/auth/login", Some("application/json"), body).await
}

async fn form_login(hub: &TestHub, email: &str, password: &str) -> (u16, hyper::HeaderMap, String) {
    let body = format!("email={}&password={}", email.replace('@', "%40"), password.replace(' ', "+")).into_bytes();
    hub.api().anonymous().send("POST", "/login", Some("application/x-www-form-urlencoded"), body).await
}

const OTHER_EMAIL: &str = "dev@example.com";
const OTHER_PASSWORD: &str = "another test password";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_throttle_the_account_without_checking_the_password() {
    let dir = TempDir::new("hygiene-login-account");
    let hub = TestHub::start(dir.path(), |config| {
        config.rate_limit.login_failures_per_account = 3;
        config.rate_limit.login_failures_per_ip = 100;
        config.rate_limit.login_window_secs = 600;
    })
    .await;
    gantry_hub::auth::create_user(&hub.hub, OTHER_EMAIL, OTHER_PASSWORD, false).unwrap();

    // Two failures, then a success clears the count.
    for _ in 0..2 {
        assert_eq!(json_login(&hub, ADMIN_EMAIL, "wrong password!!").await.0, 401);
    }
    assert_eq!(json_login(&hub, ADMIN_EMAIL, ADMIN_PASSWORD).await.0, 200);
    // Three failures (the email's case does not matter), then even the right password is
    // refused, on the JSON login and the form alike.
    for email in [ADMIN_EMAIL, &ADMIN_EMAIL.to_uppercase(), ADMIN_EMAIL] {
        assert_eq!(json_login(&hub, email, "wrong password!!").await.0, 401);
    }
    let (status, headers, body) = json_login(&hub, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_rate_limited(status, &headers, &body, 600);
    let (status, headers, page) = form_login(&hub, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_eq!(status, 429, "{page}");
    assert!(header(&headers, "retry-after").parse::<u64>().is_ok_and(|s| (1..=600).contains(&s)), "{headers:?}");
    assert!(page.contains("too many failed logins"), "{page}");
    assert!(header(&headers, "set-cookie").is_empty(), "no session for a throttled login");

    // Another account from the same address is unaffected, on both logins.
    assert_eq!(json_login(&hub, OTHER_EMAIL, OTHER_PASSWORD).await.0, 200);
    let (status, headers, _) = form_login(&hub, OTHER_EMAIL, OTHER_PASSWORD).await;
    assert_eq!(status, 303);
    assert!(header(&headers, "set-cookie").starts_with("gantry_session="), "{headers:?}");
    assert!(metric(&hub, "gantry_logins_throttled_total").await >= 2);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_throttle_the_client_address_across_accounts() {
    let dir = TempDir::new("hygiene-login-ip");
    let hub = TestHub::start(dir.path(), |config| {
        config.rate_limit.login_failures_per_account = 100;
        config.rate_limit.login_failures_per_ip = 3;
    })
    .await;
    gantry_hub::auth::create_user(&hub.hub, OTHER_EMAIL, OTHER_PASSWORD, false).unwrap();
    // Guessing at different accounts (existing or not) from one address.
    assert_eq!(form_login(&hub, "nobody@example.com", "wrong password!!").await.0, 401);
    assert_eq!(json_login(&hub, "someone@example.com", "wrong password!!").await.0, 401);
    assert_eq!(json_login(&hub, OTHER_EMAIL, "wrong password!!").await.0, 401);
    for (email, password) in [(ADMIN_EMAIL, ADMIN_PASSWORD), (OTHER_EMAIL, OTHER_PASSWORD)] {
        let (status, headers, body) = json_login(&hub, email, password).await;
        assert_rate_limited(status, &headers, &body, 900);
    }
    // API keys are not logins: the address's failed logins do not block them.
    assert_eq!(hub.api().get("/api/v1/orgs").await.0, 200);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_has_the_security_headers_and_the_dashboard_still_renders() {
    let dir = TempDir::new("hygiene-headers");
    let hub = TestHub::start(dir.path(), |_| {}).await;
    let (status, headers, _) = json_login(&hub, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_eq!(status, 200);
    let cookie = header(&headers, "set-cookie").split(';').next().unwrap().to_string();
    let browser = Api { cookie: Some(cookie), ..hub.api().anonymous() };

    let api = hub.api();
    let anonymous = api.anonymous();
    let cases = [
        ("api", api.send("GET", "/api/v1/orgs", None, Vec::new()).await, 200),
        ("dashboard", browser.send("GET", "/", None, Vec::new()).await, 200),
        ("login page", anonymous.send("GET", "/login", None, Vec::new()).await, 200),
        ("stylesheet", anonymous.send("GET", "/assets/gantry.css", None, Vec::new()).await, 200),
        ("unauthorized", anonymous.send("GET", "/api/v1/orgs", None, Vec::new()).await, 401),
        ("not found", api.send("GET", "/api/v1/nothing-here", None, Vec::new()).await, 404),
        ("probe", anonymous.send("GET", "/healthz", None, Vec::new()).await, 200),
    ];
    for (what, (status, headers, body), expected) in &cases {
        assert_eq!(status, expected, "{what}: {body}");
        assert_eq!(header(headers, "content-security-policy"), "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'", "{what}");
        assert_eq!(header(headers, "x-content-type-options"), "nosniff", "{what}");
        assert_eq!(header(headers, "referrer-policy"), "same-origin", "{what}");
        assert_eq!(header(headers, "x-frame-options"), "DENY", "{what}");
        // The hub serves plain HTTP, so it must not tell browsers to insist on HTTPS.
        assert!(headers.get("strict-transport-security").is_none(), "{what}");
    }
    // The dashboard works under the policy: no inline script or style; scripts come only
    // from the hub's own assets, the stylesheet it links is served as CSS.
    let (_, _, page) = &cases[1].1;
    assert!(page.contains("Log out") && page.contains("<link rel=\"stylesheet\" href=\"/assets/gantry.css\">"), "{page}");
    assert!(!page.contains("<style") && !page.contains(" style=") && !page.contains(" onclick="), "{page}");
    let scripts: Vec<&str> = page.split("<script").skip(1).collect();
    assert!(!scripts.is_empty(), "the dashboard loads its live-update script: {page}");
    for script in scripts {
        let tag = &script[..script.find("</script>").expect("closed script tag")];
        assert!(tag.starts_with(" src=\"/assets/") && tag.ends_with('>') && tag.matches('>').count() == 1, "inline script: <script{tag}");
    }
    let (_, headers, css) = &cases[3].1;
    assert!(header(headers, "content-type").starts_with("text/css"), "{headers:?}");
    assert!(css.contains("font:15px"), "{css}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_answer_413_with_the_error_json() {
    let dir = TempDir::new("hygiene-413");
    let hub = TestHub::start(dir.path(), |config| config.max_http_body_bytes = 1024).await;
    let big = serde_json::to_vec(&json!({ "id": "acme", "name": "x".repeat(2000) })).unwrap();
    let (status, headers, body) = hub.api().send("POST", "/api/v1/orgs", Some("application/json"), big).await;
    assert_eq!(status, 413, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
    // Nothing was created, and a body under the limit is accepted.
    assert_eq!(hub.api().get("/api/v1/orgs/acme").await.0, 404);
    assert_eq!(hub.api().post("/api/v1/orgs", &json!({ "id": "acme" })).await.0, 201);
    hub.stop().await;
}
