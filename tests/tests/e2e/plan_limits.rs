//! A plan's per-org limits beyond ingest, against a real hub: deployments per billing period
//! (hard limits refuse the next revision with the reason and change nothing; soft ones
//! allow it), API requests per minute shared by the org's keys, and usage ledger conflicts,
//! which are kept for review and fire a critical alert until an operator resolves them.

#![allow(clippy::unwrap_used)]

use gantry_tests::*;
use serde_json::{json, Value};
use std::time::Duration;

async fn send_json(api: &Api, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, text) = api.send(method, path, Some("application/json"), serde_json::to_vec(body).unwrap()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn plan(id: &str, limits: Value) -> Value {
    json!({
        "id": id,
        "name": id,
        "prices": { "currency": "USD", "base_minor": 1000, "meters": [] },
        "limits": limits,
    })
}

async fn subscribe(hub: &TestHub, org: &str, plan_body: Value) {
    let api = hub.api();
    let plan_id = plan_body["id"].as_str().unwrap().to_string();
    let (code, body) = api.post("/api/v1/plans", &plan_body).await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = send_json(&api, "PUT", &format!("/api/v1/orgs/{org}/subscription"), &json!({ "plan": plan_id })).await;
    assert_eq!(code, 200, "{body}");
}

fn spec(image: &str) -> Value {
    named("web", image)
}

fn named(name: &str, image: &str) -> Value {
    json!({ "spec": { "name": name, "services": [{ "name": "app", "image": image }] }, "targets": { "selector": { "env": "prod" } } })
}

async fn revisions(api: &Api, id: &str) -> usize {
    let (code, body) = api.get(&format!("/api/v1/deployments/{id}/revisions")).await;
    assert_eq!(code, 200, "{body}");
    body["revisions"].as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_deployment_limit_refuses_the_next_revision_and_a_soft_one_does_not() {
    let dir = TempDir::new("plan-deploys");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 3).await;
    hub.create_org("loose", 3).await;
    subscribe(&hub, "acme", plan("capped", json!({ "deployments_per_month": 2, "enforcement": "hard" }))).await;
    subscribe(&hub, "loose", plan("metered", json!({ "deployments_per_month": 1, "enforcement": "soft" }))).await;
    let api = hub.api();

    // Create (revision 1) and update (revision 2) fit the limit of 2.
    let (code, created) = api.post("/api/v1/orgs/acme/deployments", &spec("busybox:1")).await;
    assert_eq!(code, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let (code, body) = send_json(&api, "PUT", &format!("/api/v1/deployments/{id}"), &spec("busybox:2")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(revisions(&api, &id).await, 2);

    // A third revision, of any kind, is refused with the count and the reset time.
    for (method, path, body) in [
        ("PUT", format!("/api/v1/deployments/{id}"), spec("busybox:3")),
        ("POST", format!("/api/v1/deployments/{id}/rollback"), json!({})),
        ("POST", "/api/v1/orgs/acme/deployments".to_string(), named("worker", "busybox:1")),
    ] {
        let (code, body) = send_json(&api, method, &path, &body).await;
        assert_eq!(code, 402, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], "plan_limit_reached", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("limit of 2 deployment revisions") && message.contains("2 made") && message.contains("resets at"), "{message}");
    }
    // Nothing changed: still two revisions, still one deployment.
    assert_eq!(revisions(&api, &id).await, 2);
    let (_, list) = api.get("/api/v1/orgs/acme/deployments").await;
    assert_eq!(list["deployments"].as_array().map(Vec::len), Some(1), "{list}");

    // Under soft enforcement the limit is billed, not enforced.
    for name in ["web", "worker"] {
        let (code, body) = api.post("/api/v1/orgs/loose/deployments", &named(name, "busybox:1")).await;
        assert_eq!(code, 201, "{body}");
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plans_request_rate_is_shared_by_the_orgs_keys_and_leaves_other_orgs_alone() {
    let dir = TempDir::new("plan-rate");
    // Generous hub defaults, so only the plan's limit can refuse.
    let hub = TestHub::start(&dir.path().join("hub"), |config| {
        config.rate_limit.per_key_per_sec = 1000;
        config.rate_limit.per_key_burst = 1000;
        config.rate_limit.per_org_per_sec = 1000;
        config.rate_limit.per_org_burst = 1000;
    })
    .await;
    hub.create_org("acme", 3).await;
    hub.create_org("other", 3).await;
    subscribe(&hub, "acme", plan("small", json!({ "api_requests_per_minute": 6 }))).await;
    let key = |org: &str| gantry_hub::auth::create_api_key(&hub.hub, "test", Some(org.to_string()), "test").unwrap().1;
    let (first, second) = (hub.api().with_bearer(&key("acme")), hub.api().with_bearer(&key("acme")));

    // Six requests a minute for the org, whichever key sends them (one more may slip in if
    // the machine stalls for ten seconds mid-way: the bucket refills one every 10 s).
    let mut served = 0;
    let mut refusal = None;
    for n in 0..12 {
        let api = if n % 2 == 0 { &first } else { &second };
        let (status, headers, body) = api.send("GET", "/api/v1/orgs/acme", None, Vec::new()).await;
        if status == 429 {
            refusal = Some((headers, body));
            break;
        }
        assert_eq!(status, 200, "{body}");
        served += 1;
    }
    let (headers, body) = refusal.expect("the plan's limit refuses within 12 requests");
    assert!((6..=7).contains(&served), "served {served} before the plan's limit");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("this org"), "{body}");
    let retry: u64 = headers.get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry), "Retry-After {retry}");

    // Another org's keys are not affected.
    let other = hub.api().with_bearer(&key("other"));
    for _ in 0..10 {
        assert_eq!(other.get("/api/v1/orgs/other").await.0, 200);
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_conflict_is_kept_and_alerts_until_an_operator_resolves_it() {
    let dir = TempDir::new("plan-conflict");
    let hub = TestHub::start(&dir.path().join("hub"), |config| config.alert_interval_ms = 200).await;
    hub.create_org("acme", 3).await;
    let store = &hub.hub.store;
    let hour = gantry_hub::billing::hour_of(gantry_hub::wall_ms());
    let entry = gantry_hub::store::LedgerEntry {
        seq: 0,
        org: "acme".into(),
        meter: gantry_hub::billing::Meter::Events,
        hour_ms: hour,
        source: "agt_1".into(),
        quantity: 40,
        kind: gantry_hub::store::EntryKind::Usage,
        recorded_at_ms: gantry_hub::wall_ms(),
    };
    store.record(&entry).unwrap();
    let usage = store.ledger_usage("acme", 0, i64::MAX).unwrap();
    assert!(store.record(&gantry_hub::store::LedgerEntry { quantity: 41, ..entry.clone() }).is_err());
    assert!(store.record(&gantry_hub::store::LedgerEntry { quantity: 42, ..entry.clone() }).is_err());
    assert_eq!(store.ledger_usage("acme", 0, i64::MAX).unwrap(), usage, "a conflict changes no usage");

    // Kept for review, with both quantities and the number of attempts.
    let api = hub.api();
    let (code, body) = api.get("/api/v1/billing/conflicts?org=acme").await;
    assert_eq!(code, 200, "{body}");
    let conflicts = body["conflicts"].as_array().unwrap();
    assert_eq!(conflicts.len(), 1, "{body}");
    let key = entry.key_text();
    assert_eq!((conflicts[0]["key"].as_str(), conflicts[0]["recorded"].as_i64(), conflicts[0]["refused"].as_i64()), (Some(key.as_str()), Some(40), Some(42)));
    assert_eq!(conflicts[0]["attempts"], 2);

    // A critical alert in the org, naming the key.
    let alerts = "/api/v1/orgs/acme/alerts?rule=ledger_conflict";
    let alert = wait_for(Duration::from_secs(20), "the ledger_conflict alert", || async {
        let (_, body) = api.get(alerts).await;
        body["alerts"].as_array().and_then(|a| a.first().cloned())
    })
    .await;
    assert_eq!(alert["severity"], "critical", "{alert}");
    assert!(alert["summary"].as_str().unwrap().contains(&key), "{alert}");

    // Bad input is refused and changes nothing; only operators may see or resolve.
    let resolve = "/api/v1/billing/conflicts/resolve";
    let (code, body) = api.post(resolve, &json!({ "org": "acme", "key": key, "note": "  " })).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = api.post(resolve, &json!({ "org": "acme", "key": "acme/events/0/nobody", "note": "x" })).await;
    assert_eq!(code, 404, "{body}");
    let owner_key = gantry_hub::auth::create_api_key(&hub.hub, "test", Some("acme".into()), "test").unwrap().1;
    let customer = hub.api().with_bearer(&owner_key);
    assert_eq!(customer.get("/api/v1/billing/conflicts?org=acme").await.0, 403);
    assert_eq!(customer.get("/api/v1/billing/stripe/outbox?org=acme").await.0, 403, "the Stripe outbox is for operators");
    assert_eq!(customer.post(resolve, &json!({ "org": "acme", "key": key, "note": "mine" })).await.0, 403);
    assert_eq!(api.get("/api/v1/billing/conflicts?org=acme").await.1["conflicts"].as_array().unwrap().len(), 1);

    // The operator resolves it: the alert resolves, the record stays (with who and why).
    let (code, body) = api.post(resolve, &json!({ "org": "acme", "key": key, "note": "duplicate metering; no correction needed" })).await;
    assert_eq!(code, 200, "{body}");
    assert!(body["resolved_by"].as_str().is_some(), "{body}");
    wait_for(Duration::from_secs(20), "the alert to resolve", || async {
        let (_, body) = api.get(&format!("{alerts}&status=resolved")).await;
        (body["alerts"].as_array().is_some_and(|a| !a.is_empty())).then_some(())
    })
    .await;
    assert_eq!(api.get("/api/v1/billing/conflicts?org=acme").await.1["conflicts"].as_array().unwrap().len(), 0);
    let (_, all) = api.get("/api/v1/billing/conflicts?org=acme&all=true").await;
    assert_eq!(all["conflicts"][0]["resolution"], "duplicate metering; no correction needed", "{all}");

    // The same conflict offered again reopens it.
    assert!(store.record(&gantry_hub::store::LedgerEntry { quantity: 43, ..entry.clone() }).is_err());
    assert_eq!(api.get("/api/v1/billing/conflicts?org=acme").await.1["conflicts"][0]["attempts"], 3);
    hub.stop().await;
}
