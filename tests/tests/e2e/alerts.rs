//! Alerts against a real hub and real agent processes: an agent that dies fires
//! `agent_offline` after the org's threshold and resolves when it returns; a hub restart
//! whose agents come back within the grace period fires nothing; bad check configurations
//! and alert settings are refused and change nothing. Tests about other rules turn `disk_full`
//! off: the host running them may well have a nearly full disk.

#![allow(clippy::unwrap_used)]

use gantry_tests::*;
use serde_json::{json, Value};
use std::time::Duration;

fn fast(config: &mut gantry_hub::config::Config) {
    config.alert_interval_ms = 200;
    config.heartbeat_interval_secs = 1;
    config.liveness_timeout_secs = 3;
}

async fn put(api: &Api, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, text) = api.send("PUT", path, Some("application/json"), serde_json::to_vec(body).unwrap()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn alerts(api: &Api, org: &str, status: &str) -> Vec<Value> {
    let (code, body) = api.get(&format!("/api/v1/orgs/{org}/alerts?status={status}")).await;
    assert_eq!(code, 200, "{body}");
    body["alerts"].as_array().unwrap().clone()
}

/// A webhook endpoint for every event, pointed at a port nothing listens on: the delivery
/// log still shows each event the hub meant to send.
async fn webhook(api: &Api, org: &str) -> String {
    let port = free_tcp_addr().port();
    let (code, body) = api.post(&format!("/api/v1/orgs/{org}/webhooks"), &json!({ "url": format!("http://127.0.0.1:{port}/hook"), "events": ["*"] })).await;
    assert_eq!(code, 201, "{body}");
    body["id"].as_str().unwrap().to_string()
}

/// Event types of the endpoint's deliveries, oldest first.
async fn delivered(api: &Api, org: &str, webhook: &str) -> Vec<String> {
    let (code, body) = api.get(&format!("/api/v1/orgs/{org}/webhooks/{webhook}/deliveries")).await;
    assert_eq!(code, 200, "{body}");
    let mut types: Vec<String> = body["deliveries"].as_array().unwrap().iter().map(|d| d["event_type"].as_str().unwrap().to_string()).collect();
    types.reverse();
    types
}

async fn evaluations(api: &Api) -> u64 {
    let (_, _, metrics) = api.anonymous().send("GET", "/metrics", None, vec![]).await;
    metrics.lines().find_map(|l| l.strip_prefix("gantry_alert_evaluations_total ")).and_then(|v| v.parse().ok()).expect("evaluation counter")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_agent_fires_after_the_threshold_and_resolves_when_back() {
    let dir = TempDir::new("alert-offline");
    let hub = TestHub::start(&dir.path().join("hub"), fast).await;
    hub.create_org("acme", 10).await;
    let api = hub.api();
    let (code, rules) = put(&api, "/api/v1/orgs/acme/alert-rules", &json!({ "offline_after_secs": 3, "restart_grace_secs": 0, "disk_used_percent": 0 })).await;
    assert_eq!(code, 200, "{rules}");
    assert_eq!(rules["certificate_days"], 14, "unnamed rules keep their defaults: {rules}");
    let hook = webhook(&api, "acme").await;
    let token = hub.token("acme", 1, "10m").await;
    let state = dir.path().join("agent");
    let id = enroll(&token, &state).await.unwrap();
    let mut agent = AgentProcess::start(&state);
    hub.wait_status(&id, "online", Duration::from_secs(10)).await;

    agent.kill9().await;
    hub.wait_status(&id, "offline", Duration::from_secs(30)).await;
    let stored = hub.hub.store.agent(&id).unwrap().unwrap();
    let offline_since = stored.last_disconnected_ms.unwrap_or_else(|| panic!("no disconnect time: {stored:?}"));
    let fired = wait_for(Duration::from_secs(30), "agent_offline alert", || async {
        alerts(&api, "acme", "firing").await.into_iter().find(|a| a["rule"] == "agent_offline" && a["agent"] == id.as_str())
    })
    .await;
    let started = gantry_hub::api::parse_time(fired["started_at"].as_str().unwrap()).unwrap();
    assert!(started - offline_since >= 3000, "fired {} ms after the agent went offline, before the 3 s threshold", started - offline_since);
    assert_eq!(fired["severity"], "critical");
    assert!(fired["summary"].as_str().unwrap().contains(&id), "{fired}");
    // Still offline: still one alert, not one per evaluation.
    let before = evaluations(&api).await;
    wait_for(Duration::from_secs(20), "more evaluations", || async { (evaluations(&api).await >= before + 3).then_some(()) }).await;
    assert_eq!(alerts(&api, "acme", "all").await.len(), 1);

    let _agent = AgentProcess::start(&state);
    hub.wait_status(&id, "online", Duration::from_secs(10)).await;
    let resolved = wait_for(Duration::from_secs(20), "the alert to resolve", || async {
        alerts(&api, "acme", "resolved").await.into_iter().find(|a| a["id"] == fired["id"])
    })
    .await;
    assert!(resolved["resolved_at"].is_string(), "{resolved}");
    assert!(alerts(&api, "acme", "open").await.is_empty());
    let events = wait_for(Duration::from_secs(10), "the webhook events", || async {
        let events = delivered(&api, "acme", &hook).await;
        (events.len() >= 5).then_some(events)
    })
    .await;
    // Each event once. Agent events and alert transitions are separate streams, so only
    // the order within each is promised (the agent's offline event and the alert's firing
    // both follow the disconnect; which is delivered first depends on timing).
    let mut sorted = events.clone();
    sorted.sort();
    assert_eq!(sorted, ["agent.enrolled", "agent.offline", "agent.online", "alert.firing", "alert.resolved"], "{events:?}");
    let at = |name: &str| events.iter().position(|e| e == name).unwrap();
    assert!(at("agent.enrolled") < at("agent.offline") && at("agent.offline") < at("agent.online"), "{events:?}");
    assert!(at("alert.firing") < at("alert.resolved"), "{events:?}");
    let (_, _, metrics) = api.anonymous().send("GET", "/metrics", None, vec![]).await;
    assert!(metrics.lines().any(|l| l == "gantry_alerts_fired_total 1"), "{metrics}");
    assert!(metrics.lines().any(|l| l == "gantry_alerts_resolved_total 1"), "{metrics}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_restart_whose_agents_return_within_the_grace_fires_nothing() {
    let dir = TempDir::new("alert-restart");
    let hub_dir = dir.path().join("hub");
    let hub = TestHub::start(&hub_dir, fast).await;
    hub.create_org("acme", 10).await;
    let api = hub.api();
    let (code, body) = put(&api, "/api/v1/orgs/acme/alert-rules", &json!({ "offline_after_secs": 1, "restart_grace_secs": 60, "disk_used_percent": 0 })).await;
    assert_eq!(code, 200, "{body}");
    let hook = webhook(&api, "acme").await;
    let token = hub.token("acme", 3, "10m").await;
    let mut ids = Vec::new();
    let mut agents = Vec::new();
    for n in 0..3 {
        let state = dir.path().join(format!("agent-{n}"));
        ids.push(enroll(&token, &state).await.unwrap());
        agents.push(AgentProcess::start(&state));
    }
    for id in &ids {
        hub.wait_status(id, "online", Duration::from_secs(10)).await;
    }
    let (http, quic) = (hub.http, hub.quic);
    hub.stop().await;
    let hub = TestHub::start_at(&hub_dir, http, quic, fast).await;
    let api = hub.api();
    for id in &ids {
        hub.wait_status(id, "online", Duration::from_secs(45)).await;
    }
    // Offline for longer than the 1 s threshold while the hub was away, but back within
    // the grace: several evaluations later, no alert exists at all.
    let before = evaluations(&api).await;
    wait_for(Duration::from_secs(20), "more evaluations", || async { (evaluations(&api).await >= before + 5).then_some(()) }).await;
    assert_eq!(alerts(&api, "acme", "all").await, Vec::<Value>::new());
    assert_eq!(delivered(&api, "acme", &hook).await, ["agent.enrolled"; 3], "nobody was told anything but the enrollments");
    hub.stop().await;
    drop(agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_check_configurations_get_a_precise_400_and_change_nothing() {
    let dir = TempDir::new("check-config");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 10).await;
    hub.create_org("other", 10).await;
    let api = hub.api();
    let cases = [
        (json!({ "spec": { "name": "web", "probe": { "type": "http", "url": "http://127.0.0.1/" }, "interval_secs": -5 } }), "interval_secs"),
        (
            json!({ "spec": { "name": "web", "probe": { "type": "http", "url": "http://127.0.0.1/" }, "interval_secs": 0 } }),
            "spec.interval_secs must be 1-86400",
        ),
        (json!({ "spec": { "name": "web", "probe": { "type": "ping", "host": "x" } } }), "unknown variant `ping`"),
        (
            json!({ "spec": { "name": "web", "probe": { "type": "http", "url": "htp:/broken" } } }),
            "spec.probe.url: \"htp:/broken\" must start with http:// or https://",
        ),
        (json!({ "spec": { "name": "web", "probe": { "type": "http", "url": "http://exa mple.com/" } } }), "spec.probe.url"),
        (json!({ "spec": { "name": "web", "probe": { "type": "tcp", "host": "db", "port": 0 } } }), "spec.probe.port must be 1-65535"),
        (
            json!({ "spec": { "name": "web", "probe": { "type": "memory", "max_used_percent": 90 } }, "scope": { "selector": { "bad key!": "x" } } }),
            "scope.selector",
        ),
        (json!({ "spec": { "name": "web", "probe": { "type": "memory", "max_used_percent": 90 }, "colour": "red" } }), "unknown field `colour`"),
    ];
    for (body, expect) in cases {
        let (code, answer) = api.post("/api/v1/orgs/acme/checks", &body).await;
        assert_eq!(code, 400, "{body} -> {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(expect), "{body}: expected {expect:?} in {message:?}");
    }
    // A scope naming another org's objects is reported like a missing one.
    let (code, answer) = api
        .post(
            "/api/v1/orgs/acme/checks",
            &json!({ "spec": { "name": "m", "probe": { "type": "memory", "max_used_percent": 90 } }, "scope": { "deployment": "dep_nope" } }),
        )
        .await;
    assert_eq!(code, 404, "{answer}");
    let (code, answer) = api.get("/api/v1/orgs/acme/checks").await;
    assert_eq!(code, 200);
    assert_eq!(answer, json!({ "checks": [], "revision": 0 }), "nothing was written");

    // A good one, then a bad replacement of it: the stored one is unchanged.
    let good = json!({ "spec": { "name": "mem", "probe": { "type": "memory", "max_used_percent": 95 }, "interval_secs": 10, "timeout_secs": 5 } });
    let (code, created) = api.post("/api/v1/orgs/acme/checks", &good).await;
    assert_eq!(code, 201, "{created}");
    let path = format!("/api/v1/orgs/acme/checks/{}", created["id"].as_str().unwrap());
    let (code, answer) =
        put(&api, &path, &json!({ "spec": { "name": "mem", "probe": { "type": "memory", "max_used_percent": 95 }, "timeout_secs": 50, "interval_secs": 10 } }))
            .await;
    assert_eq!(code, 400, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("timeout_secs must not exceed interval_secs"), "{answer}");
    let (_, stored) = api.get(&path).await;
    assert_eq!(stored["spec"]["timeout_secs"], 5);
    let (code, _) = api.post("/api/v1/orgs/acme/checks", &good).await;
    assert_eq!(code, 409, "names are unique in an org");
    // Other orgs see none of it.
    let other_key = org_key(&hub, "other").await;
    let (code, _) = api.with_bearer(&other_key).get(&path).await;
    assert_eq!(code, 404);

    // Alert rules and silences are validated the same way.
    let (code, answer) = put(&api, "/api/v1/orgs/acme/alert-rules", &json!({ "disk_used_percent": 150 })).await;
    assert_eq!(code, 400, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("disk_used_percent must be 0-100"));
    let (code, answer) = api.post("/api/v1/orgs/acme/silences", &json!({ "rule": "nope", "duration": "1h" })).await;
    assert_eq!(code, 400, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("rule \"nope\" must be one of"), "{answer}");
    let (_, rules) = api.get("/api/v1/orgs/acme/alert-rules").await;
    assert_eq!(rules["disk_used_percent"], 90.0);
    let (_, silences) = api.get("/api/v1/orgs/acme/silences").await;
    assert_eq!(silences["silences"], json!([]));
    hub.stop().await;
}

/// An org-scoped API key for `org`.
async fn org_key(hub: &TestHub, org: &str) -> String {
    gantry_hub::auth::create_api_key(&hub.hub, "test", Some(org.to_string()), "test").unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silence_holds_back_notifications_until_it_is_deleted() {
    let dir = TempDir::new("alert-silence");
    let hub = TestHub::start(&dir.path().join("hub"), fast).await;
    hub.create_org("acme", 10).await;
    let api = hub.api();
    let (code, body) = put(&api, "/api/v1/orgs/acme/alert-rules", &json!({ "offline_after_secs": 1, "restart_grace_secs": 0, "disk_used_percent": 0 })).await;
    assert_eq!(code, 200, "{body}");
    let hook = webhook(&api, "acme").await;
    let token = hub.token("acme", 1, "10m").await;
    let state = dir.path().join("agent");
    let id = enroll(&token, &state).await.unwrap();
    let (code, silence) =
        api.post("/api/v1/orgs/acme/silences", &json!({ "agent": id, "rule": "agent_offline", "duration": "1h", "reason": "maintenance" })).await;
    assert_eq!(code, 201, "{silence}");
    assert_eq!(silence["active"], true);
    let mut agent = AgentProcess::start(&state);
    hub.wait_status(&id, "online", Duration::from_secs(10)).await;
    agent.kill9().await;
    let fired = wait_for(Duration::from_secs(30), "the silenced alert", || async { alerts(&api, "acme", "firing").await.into_iter().next() }).await;
    assert_eq!(fired["silenced"], true, "{fired}");
    assert_eq!(fired["notified"], false, "{fired}");
    let before = evaluations(&api).await;
    wait_for(Duration::from_secs(20), "more evaluations", || async { (evaluations(&api).await >= before + 3).then_some(()) }).await;
    assert_eq!(delivered(&api, "acme", &hook).await, ["agent.enrolled"], "silenced: nobody is told");

    let (code, _, _) = api.send("DELETE", &format!("/api/v1/orgs/acme/silences/{}", silence["id"].as_str().unwrap()), None, vec![]).await;
    assert_eq!(code, 204);
    let events = wait_for(Duration::from_secs(20), "the held-back notification", || async {
        let events = delivered(&api, "acme", &hook).await;
        (events.len() >= 3).then_some(events)
    })
    .await;
    assert_eq!(events, ["agent.enrolled", "alert.firing", "agent.offline"]);
    let (code, acked) = api.post(&format!("/api/v1/orgs/acme/alerts/{}/acknowledge", fired["id"].as_str().unwrap()), &json!({})).await;
    assert_eq!(code, 200, "{acked}");
    assert_eq!(acked["status"], "acknowledged");
    assert_eq!(alerts(&api, "acme", "acknowledged").await.len(), 1);
    hub.stop().await;
}
