//! Login sessions against a real hub: logout ends the session on the server (the old
//! cookie replayed is refused), sessions end after the idle and absolute timeouts, and a
//! cross-site form post riding on the cookie is refused and changes nothing.

#![allow(clippy::unwrap_used)]

use gantry_tests::*;
use serde_json::json;
use std::time::Duration;

async fn login(hub: &TestHub) -> Api {
    let anonymous = hub.api().anonymous();
    let body = json!({ "email": ADMIN_EMAIL, "password": ADMIN_PASSWORD }).to_string().into_bytes();
    let (code, headers, text) = anonymous.send("POST", "/api/v1/auth/login", Some("application/json"), body).await;
    assert_eq!(code, 200, "{text}");
    let cookie = headers.get("set-cookie").unwrap().to_str().unwrap();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"), "{cookie}");
    let value = cookie.split(';').next().unwrap().split_once('=').unwrap().1;
    assert_eq!(value.len(), 64, "256 random bits as hex: {cookie}");
    Api { cookie: Some(cookie.split(';').next().unwrap().to_string()), ..anonymous }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_ends_the_session_on_the_server_and_cross_site_forms_are_refused() {
    let dir = TempDir::new("sessions-logout");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    let browser = login(&hub).await;
    assert_eq!(browser.get("/api/v1/auth/me").await.0, 200);

    // A form another site makes the browser post carries the cookie but no JSON and no
    // same-origin proof.
    let (code, _, body) = browser.send("POST", "/api/v1/orgs", Some("application/x-www-form-urlencoded"), b"id=evil".to_vec()).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("CSRF"), "{body}");
    let (code, _, body) = browser.send("POST", "/api/v1/orgs", Some("text/plain"), br#"{"id":"evil"}"#.to_vec()).await;
    assert_eq!(code, 403, "{body}");
    let (_, orgs) = hub.api().get("/api/v1/orgs").await;
    assert_eq!(orgs["orgs"], json!([]), "nothing was created");
    // The same request as the dashboard's own script sends it works.
    let (code, _, body) = browser.send("POST", "/api/v1/orgs", Some("application/json"), br#"{"id":"acme"}"#.to_vec()).await;
    assert_eq!(code, 201, "{body}");
    // No GET changes state: the logout route does not take GET.
    assert_eq!(browser.get("/api/v1/auth/logout").await.0, 405);
    assert_eq!(browser.get("/api/v1/auth/me").await.0, 200);

    let (code, headers, _) = browser.send("POST", "/api/v1/auth/logout", Some("application/json"), b"{}".to_vec()).await;
    assert_eq!(code, 204);
    assert!(headers.get("set-cookie").unwrap().to_str().unwrap().contains("Max-Age=0"), "the browser is told to forget it");
    // Replaying the old cookie (as a thief holding a copy would) is refused.
    assert_eq!(browser.get("/api/v1/auth/me").await.0, 401);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_after_the_idle_and_the_absolute_timeouts() {
    let dir = TempDir::new("sessions-timeouts");
    let hub = TestHub::start(&dir.path().join("hub"), |config| {
        config.session_idle_timeout_secs = 2;
        config.session_absolute_timeout_secs = 3600;
    })
    .await;
    let idle = login(&hub).await;
    assert_eq!(idle.get("/api/v1/auth/me").await.0, 200);
    let last_use = gantry_hub::wall_ms();
    // Left alone (any request would refresh it) for longer than the idle timeout.
    wait_for(Duration::from_secs(20), "the idle timeout to pass", || async { (gantry_hub::wall_ms() > last_use + 2_500).then_some(()) }).await;
    assert_eq!(idle.get("/api/v1/auth/me").await.0, 401, "an idle session ends");
    // Ended means gone: a fresh login is needed and works.
    assert_eq!(login(&hub).await.get("/api/v1/auth/me").await.0, 200);
    hub.stop().await;

    let dir = TempDir::new("sessions-absolute");
    let hub = TestHub::start(&dir.path().join("hub"), |config| {
        config.session_idle_timeout_secs = 3600;
        config.session_absolute_timeout_secs = 2;
    })
    .await;
    let busy = login(&hub).await;
    // Used all the time, it still ends at the absolute limit.
    wait_for(Duration::from_secs(20), "the busy session to end", || async { (busy.get("/api/v1/auth/me").await.0 == 401).then_some(()) }).await;
    hub.stop().await;
}
