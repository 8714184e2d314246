//! Enrollment against a real hub: single use under concurrency, and every refusal with a
//! clear error that changes nothing.

#![allow(clippy::unwrap_used)]

use gantry_agent::enroll::EnrollError;
use gantry_shared::message::EnrollRefusal;
use gantry_shared::token::EnrollmentToken;
use gantry_tests::*;
use std::time::Duration;

async fn enroll_err(token: &str, dir: &TempDir, name: &str) -> EnrollError {
    let state = gantry_agent::state::StateDir::new(dir.path().join(name));
    gantry_agent::enroll::enroll(token, &state, false, Duration::from_secs(5)).await.expect_err("enrollment should be refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_enrollments_with_a_single_use_token_enroll_one() {
    let dir = TempDir::new("concurrent");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 100).await;
    let token = hub.token("acme", 1, "10m").await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let token = token.clone();
        let state = gantry_agent::state::StateDir::new(dir.path().join(format!("agent-{i}")));
        tasks.push(tokio::spawn(async move { gantry_agent::enroll::enroll(&token, &state, false, Duration::from_secs(60)).await }));
    }
    let mut ok = 0;
    let mut used_up = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(EnrollError::Refused(EnrollRefusal::TokenUsedUp)) => used_up += 1,
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!((ok, used_up), (1, 49));
    let (_, agents) = hub.api().get("/api/v1/orgs/acme/agents").await;
    assert_eq!(agents["agents"].as_array().unwrap().len(), 1);
    let (_, org) = hub.api().get("/api/v1/orgs/acme").await;
    assert_eq!(org["agent_count"], 1);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_clear_errors() {
    let dir = TempDir::new("refusals");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 1).await;
    let good = hub.token("acme", 5, "10m").await;

    // Malformed and tampered tokens.
    let error = enroll_err("not-a-token", &dir, "m1").await;
    assert!(matches!(error, EnrollError::MalformedToken(_)), "{error}");
    assert!(error.to_string().contains("malformed enrollment token"));
    let mut tampered = EnrollmentToken::parse(&good).unwrap();
    let last = tampered.secret.pop().unwrap();
    tampered.secret.push(if last == '0' { '1' } else { '0' });
    let error = enroll_err(&tampered.encode(), &dir, "t1").await;
    assert!(matches!(error, EnrollError::Refused(EnrollRefusal::UnknownToken)), "{error}");
    let mut cut = good.clone();
    cut.truncate(good.len() - 5);
    assert!(matches!(enroll_err(&cut, &dir, "t2").await, EnrollError::MalformedToken(_)));

    // Wrong CA fingerprint: the agent refuses the hub before sending its secret.
    let mut wrong_ca = EnrollmentToken::parse(&good).unwrap();
    wrong_ca.ca_sha256[0] ^= 0xff;
    let error = enroll_err(&wrong_ca.encode(), &dir, "ca").await;
    assert!(matches!(error, EnrollError::CaMismatch { .. }), "{error}");
    assert!(error.to_string().contains("fingerprint mismatch"));

    // Hub unreachable.
    let mut nowhere = EnrollmentToken::parse(&good).unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    nowhere.hub_addr = format!("127.0.0.1:{port}");
    let error = enroll_err(&nowhere.encode(), &dir, "nowhere").await;
    assert!(matches!(error, EnrollError::Unreachable { .. }), "{error}");
    assert!(error.to_string().contains("hub unreachable"));

    // Expired token.
    let (status, body) = hub.api().post("/api/v1/orgs/acme/enrollment-tokens", &serde_json::json!({ "ttl": 1 })).await;
    assert_eq!(status, 201);
    let expired = body["token"].as_str().unwrap().to_string();
    let expires_at = time::OffsetDateTime::parse(body["expires_at"].as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap();
    wait_for(Duration::from_secs(5), "token expiry", || async { (time::OffsetDateTime::now_utc() > expires_at).then_some(()) }).await;
    let error = enroll_err(&expired, &dir, "exp").await;
    assert!(matches!(error, EnrollError::Refused(EnrollRefusal::TokenExpired)), "{error}");
    assert!(error.to_string().contains("expired"));

    // Org at its agent limit (1): the first enrollment succeeds, the second is refused.
    enroll(&good, &dir.path().join("first")).await.unwrap();
    let error = enroll_err(&good, &dir, "second").await;
    assert!(matches!(error, EnrollError::Refused(EnrollRefusal::OrgAtAgentLimit { limit: 1 })), "{error}");
    assert!(error.to_string().contains("limit of 1 agents"));

    // Nothing refused wrote anything: one agent, the token spent once.
    let (_, agents) = hub.api().get("/api/v1/orgs/acme/agents").await;
    assert_eq!(agents["agents"].as_array().unwrap().len(), 1);

    // The CLI prints the same messages and exits 2.
    let (code, _, stderr) = agent_cli(&["enroll", "--token", "gt1_garbage", "--state-dir", dir.path().join("cli").to_str().unwrap()]).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("malformed enrollment token"), "{stderr}");
    hub.stop().await;
}
