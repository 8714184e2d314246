//! Login hardening end to end, over a real hub's HTTP API: TOTP two-factor login (enrol,
//! confirm, login needs the code, wrong and replayed codes refused and throttled, turning it
//! off), common passwords refused when accounts are created, and session fixation (a login
//! ends the session the request came with and issues a fresh one).

#![allow(clippy::unwrap_used)]

use gantry_hub::totp;
use gantry_tests::*;
use serde_json::{json, Value};

fn unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn login_body(code: Option<&str>) -> Value {
    match code {
        Some(code) => json!({ "email": ADMIN_EMAIL, "password": ADMIN_PASSWORD, "code": code }),
        None => json!({ "email": ADMIN_EMAIL, "password": ADMIN_PASSWORD }),
    }
}

/// Log the admin in without a second factor; a client holding the session.
async fn session(hub: &TestHub) -> Api {
    let (status, body, cookie) = hub.api().anonymous().login(&login_body(None)).await;
    assert_eq!(status, 200, "{body}");
    hub.api().with_cookie(&cookie.expect("session cookie"))
}

/// Enrol and confirm TOTP for the client's user; the secret and the step the confirming code
/// used (so the next usable code is of a later step).
async fn turn_on_totp(client: &Api) -> (Vec<u8>, u64) {
    let (status, body) = client.post("/api/v1/auth/totp", &json!({})).await;
    assert_eq!(status, 201, "{body}");
    let secret = totp::decode_secret(body["secret"].as_str().unwrap()).unwrap();
    let now = unix_secs();
    let (status, body) = client.post("/api/v1/auth/totp/confirm", &json!({ "code": totp::code_at(&secret, now) })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["totp_enabled"], true);
    (secret, totp::step_of(now))
}

/// A code usable now by an account whose last accepted code was of `last_step`: the current
/// one, or the next step's (one step of drift is allowed) while the current one is spent.
fn next_code(secret: &[u8], last_step: u64) -> String {
    totp::code_of_step(secret, totp::step_of(unix_secs()).max(last_step + 1))
}

/// A six-digit code that is none of the codes accepted around now.
fn wrong_code(secret: &[u8]) -> String {
    let now = totp::step_of(unix_secs());
    let accepted: Vec<String> = (now - 2..=now + 2).map(|step| totp::code_of_step(secret, step)).collect();
    (0..).map(|n: u32| format!("{:06}", (n * 7919) % 1_000_000)).find(|code| !accepted.contains(code)).unwrap()
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

async fn form_login(hub: &TestHub, cookie: Option<&str>, code: &str) -> (u16, hyper::HeaderMap, String) {
    let body = format!("email={}&password={}&code={code}", ADMIN_EMAIL.replace('@', "%40"), ADMIN_PASSWORD.replace(' ', "+")).into_bytes();
    let client = match cookie {
        Some(cookie) => hub.api().with_cookie(cookie),
        None => hub.api().anonymous(),
    };
    client.send("POST", "/login", Some("application/x-www-form-urlencoded"), body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totp_enrolment_login_and_removal() {
    let dir = TempDir::new("mfa-flow");
    // Room for every refusal below; the throttle has its own test.
    let hub = TestHub::start(dir.path(), |config| config.rate_limit.login_failures_per_account = 50).await;
    let client = session(&hub).await;
    let (_, me) = client.get("/api/v1/auth/me").await;
    assert_eq!(me["totp_enabled"], false, "{me}");

    assert!(!hub.hub.store.has_sealed_values().unwrap());

    // API keys cannot enrol: a second factor belongs to a person.
    let (status, body) = hub.api().post("/api/v1/auth/totp", &json!({})).await;
    assert_eq!((status, error_code(&body)), (403, "forbidden"), "{body}");

    // Enrolment: the secret once, in base32 and as an otpauth URI; pending until confirmed.
    let (status, body) = client.post("/api/v1/auth/totp", &json!({})).await;
    assert_eq!(status, 201, "{body}");
    let text = body["secret"].as_str().unwrap();
    let secret = totp::decode_secret(text).unwrap();
    assert_eq!(secret.len(), 20);
    let uri = body["otpauth_uri"].as_str().unwrap();
    assert!(uri.starts_with("otpauth://totp/Gantry%3Aops%40example.com?") && uri.contains(&format!("secret={text}")), "{uri}");
    // Sealed at rest: the store holds neither the secret nor its base32.
    let stored = hub.hub.store.user_by_email(ADMIN_EMAIL).unwrap().unwrap().totp.unwrap();
    assert!(!stored.enabled);
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!stored.sealed_secret.contains(&hex) && !stored.sealed_secret.contains(text), "the secret is stored sealed");
    assert!(hub.hub.store.has_sealed_values().unwrap(), "the secrets key is now needed: a different one is refused at start");
    let (_, me) = client.get("/api/v1/auth/me").await;
    assert_eq!(me["totp_enabled"], false, "pending is not on: {me}");
    assert_eq!(hub.api().anonymous().login(&login_body(None)).await.0, 200, "a pending factor is not asked for");

    // Confirmation: a wrong code leaves it pending, the right one turns it on.
    let (status, body) = client.post("/api/v1/auth/totp/confirm", &json!({ "code": wrong_code(&secret) })).await;
    assert_eq!((status, error_code(&body)), (400, "invalid_totp"), "{body}");
    let confirmed_at = unix_secs();
    let confirm_code = totp::code_at(&secret, confirmed_at);
    let (status, body) = client.post("/api/v1/auth/totp/confirm", &json!({ "code": confirm_code })).await;
    assert_eq!(status, 200, "{body}");
    let (_, me) = client.get("/api/v1/auth/me").await;
    assert_eq!(me["totp_enabled"], true, "{me}");
    let (status, body) = client.post("/api/v1/auth/totp", &json!({})).await;
    assert_eq!((status, error_code(&body)), (409, "conflict"), "no second enrolment while on: {body}");

    // Log out; the password alone is no longer enough, and no session is made.
    assert_eq!(client.send("POST", "/api/v1/auth/logout", Some("application/json"), b"{}".to_vec()).await.0, 204);
    let anonymous = hub.api().anonymous();
    let (status, body, cookie) = anonymous.login(&login_body(None)).await;
    assert_eq!((status, error_code(&body)), (401, "totp_required"), "{body}");
    assert!(cookie.is_none());
    let (status, body, cookie) = anonymous.login(&login_body(Some(&wrong_code(&secret)))).await;
    assert_eq!((status, error_code(&body)), (401, "invalid_totp"), "{body}");
    assert!(cookie.is_none());
    // The code that confirmed the enrolment is spent.
    let (status, body, _) = anonymous.login(&login_body(Some(&confirm_code))).await;
    assert_eq!((status, error_code(&body)), (401, "invalid_totp"), "replayed: {body}");
    // A right code with a wrong password says nothing about the code.
    let next = next_code(&secret, totp::step_of(confirmed_at));
    let (status, body, _) = anonymous.login(&json!({ "email": ADMIN_EMAIL, "password": "wrong password!!", "code": next })).await;
    assert_eq!((status, error_code(&body)), (401, "invalid_credentials"), "{body}");

    // A fresh code logs in, once.
    let (status, body, cookie) = anonymous.login(&login_body(Some(&next))).await;
    assert_eq!(status, 200, "{body}");
    let client = hub.api().with_cookie(&cookie.unwrap());
    let (status, body, _) = anonymous.login(&login_body(Some(&next))).await;
    assert_eq!((status, error_code(&body)), (401, "invalid_totp"), "replayed: {body}");

    // The dashboard's form asks for the code too.
    let (status, headers, page) = form_login(&hub, None, "").await;
    assert_eq!(status, 401, "{page}");
    assert!(page.contains("two-factor login on") && page.contains("name=\"code\""), "{page}");
    assert!(session_cookie_of(&headers).is_none());
    let (status, _, page) = form_login(&hub, None, &wrong_code(&secret)).await;
    assert_eq!(status, 401);
    assert!(page.contains("wrong, expired or already used"), "{page}");

    // Turning it off takes a current code or the password; wrong ones are refused.
    let (status, body) = client.delete_json("/api/v1/auth/totp", &json!({ "code": wrong_code(&secret) })).await;
    assert_eq!((status, error_code(&body)), (403, "invalid_totp"), "{body}");
    let (status, body) = client.delete_json("/api/v1/auth/totp", &json!({ "password": "wrong password!!" })).await;
    assert_eq!((status, error_code(&body)), (403, "invalid_credentials"), "{body}");
    let (status, body) = client.delete_json("/api/v1/auth/totp", &json!({})).await;
    assert_eq!((status, error_code(&body)), (400, "bad_request"), "{body}");
    let (status, body) = client.delete_json("/api/v1/auth/totp", &json!({ "password": ADMIN_PASSWORD })).await;
    assert_eq!(status, 200, "{body}");
    let (_, me) = client.get("/api/v1/auth/me").await;
    assert_eq!(me["totp_enabled"], false, "{me}");
    assert!(hub.hub.store.user_by_email(ADMIN_EMAIL).unwrap().unwrap().totp.is_none());
    assert_eq!(anonymous.login(&login_body(None)).await.0, 200, "the password alone works again");

    // On again, and off with a code.
    let (secret, step) = turn_on_totp(&client).await;
    let (status, body) = client.delete_json("/api/v1/auth/totp", &json!({ "code": next_code(&secret, step) })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(anonymous.login(&login_body(None)).await.0, 200);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_codes_count_toward_the_login_throttle() {
    let dir = TempDir::new("mfa-throttle");
    let hub = TestHub::start(dir.path(), |config| {
        config.rate_limit.login_failures_per_account = 3;
        config.rate_limit.login_failures_per_ip = 100;
    })
    .await;
    let (secret, step) = turn_on_totp(&session(&hub).await).await;
    let anonymous = hub.api().anonymous();
    // A right password without a code is not a failure: more than the limit, no 429.
    for _ in 0..5 {
        let (status, body, _) = anonymous.login(&login_body(None)).await;
        assert_eq!((status, error_code(&body)), (401, "totp_required"), "{body}");
    }
    // Guessing codes is: after three wrong ones even the right code is refused unchecked.
    for _ in 0..3 {
        let (status, body, _) = anonymous.login(&login_body(Some(&wrong_code(&secret)))).await;
        assert_eq!((status, error_code(&body)), (401, "invalid_totp"), "{body}");
    }
    let right = next_code(&secret, step);
    let (status, body, cookie) = anonymous.login(&login_body(Some(&right))).await;
    assert_eq!((status, error_code(&body)), (429, "rate_limited"), "{body}");
    assert!(cookie.is_none());
    // The refused code was not spent: it still works once the throttle is lifted.
    hub.hub.limiter.login_succeeded(ADMIN_EMAIL);
    assert_eq!(anonymous.login(&login_body(Some(&right))).await.0, 200);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_sent_twice_at_once_logs_in_once() {
    let dir = TempDir::new("mfa-race");
    let hub = TestHub::start(dir.path(), |_| {}).await;
    let (secret, step) = turn_on_totp(&session(&hub).await).await;
    let code = next_code(&secret, step);
    let body = login_body(Some(&code));
    let anonymous = hub.api().anonymous();
    let (first, second) = tokio::join!(anonymous.login(&body), anonymous.login(&body));
    let mut statuses = [first.0, second.0];
    statuses.sort();
    assert_eq!(statuses, [200, 401], "{} / {}", first.1, second.1);
    let refused = if first.0 == 401 { &first } else { &second };
    assert_eq!(error_code(&refused.1), "invalid_totp", "{}", refused.1);
    assert!(refused.2.is_none(), "no session for the replay");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn common_passwords_are_refused_and_nothing_is_created() {
    let dir = TempDir::new("mfa-common-passwords");
    let hub = TestHub::start(dir.path(), |_| {}).await;
    for password in ["password1234", "qwertyuiop123", "123456789012", "newuser@example.com1"] {
        let (status, body) = hub.api().post("/api/v1/users", &json!({ "email": "newuser@example.com", "password": password })).await;
        assert_eq!((status, error_code(&body)), (400, "bad_request"), "{password}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("password is too common or easy to guess: "), "{message}");
        assert!(hub.hub.store.user_by_email("newuser@example.com").unwrap().is_none(), "{password}: no account was created");
    }
    let (status, body) = hub.api().post("/api/v1/users", &json!({ "email": "newuser@example.com", "password": "orbit velvet canyon mosaic" })).await;
    assert_eq!(status, 201, "a passphrase of four random words is fine: {body}");
    assert!(hub.hub.store.user_by_email("newuser@example.com").unwrap().is_some());
    hub.stop().await;

    // `init` refuses a common admin password before making anything.
    let fresh = dir.path().join("fresh");
    let error = gantry_hub::init(&fresh, "127.0.0.1:7443", ADMIN_EMAIL, Some("password1234")).unwrap_err().to_string();
    assert!(error.contains("GANTRY_ADMIN_PASSWORD: password is too common"), "{error}");
    assert!(!fresh.join("store").exists() && !fresh.join("pki").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_ends_the_session_it_came_with() {
    let dir = TempDir::new("mfa-fixation");
    let hub = TestHub::start(dir.path(), |_| {}).await;
    let first = session(&hub).await;
    let first_cookie = first.cookie.clone().unwrap();
    assert_eq!(first.get("/api/v1/auth/me").await.0, 200);

    // Logging in again from a browser that holds a session (one an attacker could have
    // planted) ends that session and issues another id.
    let (status, body, second_cookie) = first.login(&login_body(None)).await;
    assert_eq!(status, 200, "{body}");
    let second_cookie = second_cookie.unwrap();
    assert_ne!(second_cookie, first_cookie);
    assert_eq!(first.get("/api/v1/auth/me").await.0, 401, "the old session no longer works");
    assert_eq!(hub.api().with_cookie(&second_cookie).get("/api/v1/auth/me").await.0, 200);

    // The same through the dashboard's form.
    let (status, headers, page) = form_login(&hub, Some(&second_cookie), "").await;
    assert_eq!(status, 303, "{page}");
    let third_cookie = session_cookie_of(&headers).unwrap();
    assert_ne!(third_cookie, second_cookie);
    assert_eq!(hub.api().with_cookie(&second_cookie).get("/api/v1/auth/me").await.0, 401);
    assert_eq!(hub.api().with_cookie(&third_cookie).get("/api/v1/auth/me").await.0, 200);

    // A failed login leaves the session alone.
    let (status, _, _) = hub.api().with_cookie(&third_cookie).login(&json!({ "email": ADMIN_EMAIL, "password": "wrong password!!" })).await;
    assert_eq!(status, 401);
    assert_eq!(hub.api().with_cookie(&third_cookie).get("/api/v1/auth/me").await.0, 200);
    hub.stop().await;
}
