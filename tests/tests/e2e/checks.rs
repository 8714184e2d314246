//! Health checks end to end on the real Docker engine: the hub configures a check, the agent
//! process runs it against a real container, restarts the container when it fails and
//! reports the recovery; a crash-looping container stops being restarted once its budget is
//! spent and the hub raises a critical alert. Images are built locally.

#![allow(clippy::unwrap_used)]

use gantry_agent::collector::docker::testing::{cli, docker, unique, Container};
use gantry_tests::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn fast(config: &mut gantry_hub::config::Config) {
    config.alert_interval_ms = 200;
}

/// The container's start time as Docker reports it.
fn started_at(name: &str) -> String {
    cli(&["inspect", "-f", "{{.State.StartedAt}}", name])
}

async fn check_state(api: &Api, agent: &str, name: &str) -> Value {
    let (code, body) = api.get(&format!("/api/v1/agents/{agent}/checks")).await;
    assert_eq!(code, 200, "{body}");
    body["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).cloned().unwrap_or(Value::Null)
}

async fn remediations(api: &Api, agent: &str, check: &str) -> usize {
    let events = api.all_records(&format!("/api/v1/agents/{agent}/events"), "&kind=check.remediated").await;
    events.iter().filter(|e| e["attributes"]["check"] == check).count()
}

/// A hub, an org and a running agent process with Docker on.
async fn setup(dir: &TempDir) -> (TestHub, String, AgentProcess) {
    let hub = TestHub::start(&dir.path().join("hub"), fast).await;
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 1, "10m").await;
    let state = dir.path().join("agent");
    let id = enroll(&token, &state).await.unwrap();
    let config = agent_config_file(dir.path(), &state, &[], "[host]\nenabled = false");
    let agent = AgentProcess::start_with_config(&config, &state);
    hub.wait_status(&id, "online", Duration::from_secs(30)).await;
    (hub, id, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_http_check_restarts_its_container_and_recovers() {
    if docker().await.is_none() {
        return;
    }
    let dir = TempDir::new("check-http");
    let (hub, id, _agent) = setup(&dir).await;
    let api = hub.api();
    let port = free_tcp_addr().port();
    let name = unique("check-web");
    // Serves /health until the file is removed; a restart writes it again.
    let container = Container::run(
        &name,
        "mkdir -p /www && echo ok > /www/health && httpd -f -p 80 -h /www",
        &["-p", &format!("127.0.0.1:{port}:80"), "--label", "gantry.test=checks"],
    );
    let spec = json!({
        "name": "web",
        "probe": { "type": "http", "url": format!("http://127.0.0.1:{port}/health"), "expect_status": 200, "body_contains": "ok" },
        "interval_secs": 2, "timeout_secs": 1, "failure_threshold": 2, "success_threshold": 1,
        "remediation": { "steps": [{ "action": "restart_container", "container": name }], "max_attempts": 3, "window_secs": 600 }
    });
    let (code, body) = api.post("/api/v1/orgs/acme/checks", &json!({ "scope": { "agents": [id] }, "spec": spec })).await;
    assert_eq!(code, 201, "{body}");
    wait_for(Duration::from_secs(30), "the check passing", || async { (check_state(&api, &id, "web").await["state"] == "passing").then_some(()) }).await;

    let before = started_at(&name);
    let broken = Instant::now();
    cli(&["exec", &name, "rm", "/www/health"]);
    // Restarted within 30 s of failing, then passing again.
    wait_for(Duration::from_secs(30), "the container restarted", || async { (started_at(&name) != before).then_some(()) }).await;
    let restarted_after = broken.elapsed();
    assert!(restarted_after < Duration::from_secs(30), "restart took {restarted_after:?}");
    let recovered = wait_for(Duration::from_secs(30), "the check passing again", || async {
        let state = check_state(&api, &id, "web").await;
        (state["state"] == "passing" && state["last_remediation"].is_string()).then_some(state)
    })
    .await;
    assert!(recovered["last_remediation"].as_str().unwrap().contains(&name), "{recovered}");
    assert_eq!(recovered["crash_loop"], false);
    // The history shows the way there: failing, then passing.
    let (_, body) = api.get(&format!("/api/v1/agents/{id}/checks?check=web")).await;
    let states: Vec<&str> = body["history"].as_array().unwrap().iter().filter(|r| r["transition"] == true).map(|r| r["state"].as_str().unwrap()).collect();
    assert!(states.windows(2).any(|w| w == ["passing", "failing"]), "newest first: {states:?}");
    assert_eq!(remediations(&api, &id, "web").await, 1);
    // The failure was short and healed: the alert, if it fired, is resolved.
    wait_for(Duration::from_secs(20), "no open alert", || async {
        let (_, body) = api.get("/api/v1/orgs/acme/alerts").await;
        body["alerts"].as_array().unwrap().is_empty().then_some(())
    })
    .await;
    drop(container);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_container_stops_being_restarted_and_an_alert_fires() {
    if docker().await.is_none() {
        return;
    }
    let dir = TempDir::new("check-loop");
    let (hub, id, _agent) = setup(&dir).await;
    let api = hub.api();
    let name = unique("check-loop");
    // Runs, but never serves what the check wants.
    let container = Container::run(&name, "sleep 600", &["--label", "gantry.test=checks"]);
    let port = free_tcp_addr().port();
    let spec = json!({
        "name": "api",
        "probe": { "type": "tcp", "host": "127.0.0.1", "port": port },
        "interval_secs": 1, "timeout_secs": 1, "failure_threshold": 2,
        "remediation": { "steps": [{ "action": "restart_container", "container": name }], "max_attempts": 2, "window_secs": 600 }
    });
    let (code, body) = api.post("/api/v1/orgs/acme/checks", &json!({ "spec": spec })).await;
    assert_eq!(code, 201, "{body}");

    let alert = wait_for(Duration::from_secs(60), "a critical check_failing alert", || async {
        let (_, body) = api.get("/api/v1/orgs/acme/alerts?status=firing").await;
        body["alerts"].as_array().unwrap().iter().find(|a| a["rule"] == "check_failing" && a["severity"] == "critical").cloned()
    })
    .await;
    assert_eq!(alert["agent"], id.as_str());
    assert_eq!(alert["check"], "api");
    assert!(alert["summary"].as_str().unwrap().contains("crash loop"), "{alert}");
    let state = check_state(&api, &id, "api").await;
    assert_eq!(state["crash_loop"], true, "{state}");
    assert_eq!(remediations(&api, &id, "api").await, 2, "two restarts, then the budget is spent");
    let (_, events) = api.get(&format!("/api/v1/agents/{id}/events?kind=check.crash_loop")).await;
    assert!(!events["records"].as_array().unwrap().is_empty(), "{events}");
    // Budget spent: many more failed runs, no more restarts.
    let started = started_at(&name);
    let (_, before) = api.get(&format!("/api/v1/agents/{id}/checks?check=api")).await;
    let seen = before["history"].as_array().unwrap().len();
    wait_for(Duration::from_secs(30), "more reports of the failing check", || async {
        let (_, now) = api.get(&format!("/api/v1/agents/{id}/checks?check=api")).await;
        let state = check_state(&api, &id, "api").await;
        (now["history"].as_array().unwrap().len() > seen && state["reported_at"] != before["checks"][0]["reported_at"]).then_some(())
    })
    .await;
    assert_eq!(started_at(&name), started, "not restarted again");
    assert_eq!(remediations(&api, &id, "api").await, 2);
    let (_, _, metrics) = api.anonymous().send("GET", "/metrics", None, vec![]).await;
    assert!(metrics.lines().any(|l| l == "gantry_checks{state=\"failing\"} 1"), "{metrics}");
    assert!(metrics.lines().any(|l| l == "gantry_check_remediations_total 2"), "{metrics}");
    assert!(metrics.lines().any(|l| l == "gantry_alerts_open{status=\"firing\"} 1"), "{metrics}");

    // Acknowledged, it stays open until the condition clears; deleting the check clears it.
    let (code, acked) = api.post(&format!("/api/v1/orgs/acme/alerts/{}/acknowledge", alert["id"].as_str().unwrap()), &json!({})).await;
    assert_eq!(code, 200, "{acked}");
    assert_eq!(acked["status"], "acknowledged");
    let (code, body) = api.get("/api/v1/orgs/acme/checks").await;
    assert_eq!(code, 200);
    let check_id = body["checks"][0]["id"].as_str().unwrap().to_string();
    let (code, _, _) = api.send("DELETE", &format!("/api/v1/orgs/acme/checks/{check_id}"), None, vec![]).await;
    assert_eq!(code, 204);
    wait_for(Duration::from_secs(30), "the alert resolved", || async {
        let (_, body) = api.get(&format!("/api/v1/orgs/acme/alerts/{}", alert["id"].as_str().unwrap())).await;
        (body["status"] == "resolved").then_some(())
    })
    .await;
    drop(container);
    hub.stop().await;
}
