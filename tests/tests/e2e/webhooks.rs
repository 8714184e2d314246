//! Webhooks end to end: a receiver in the test (plain HTTP/1.1 on loopback) checks each
//! delivery's signature with the secret from the create answer; failed attempts are retried
//! and logged, a success is final, redelivery repeats the event id, deliveries pending at
//! a hub stop go out after it restarts, deployment and agent changes are sent once per
//! change, and the API validates, scopes and never shows a secret twice.

#![allow(clippy::unwrap_used)]

use gantry_tests::*;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Retry base for these hubs: retries after 0.2 s, 0.6 s, 1.2 s, 2.4 s, ...
const RETRY_BASE_MS: u64 = 200;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    /// Header names lowercased.
    headers: HashMap<String, String>,
    body: Vec<u8>,
    /// The status the receiver answered with.
    answered: u16,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or_default()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// Check `Gantry-Signature` against the body with `secret`, and that it is fresh.
    fn verify(&self, secret: &str) {
        let header = self.header("gantry-signature");
        let t: i64 = header.strip_prefix("t=").and_then(|rest| rest.split(',').next()).and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("{header}"));
        assert_eq!(header, gantry_hub::webhooks::signature(secret.as_bytes(), t, &self.body), "signature of {}", String::from_utf8_lossy(&self.body));
        let now = gantry_hub::wall_ms() / 1000;
        assert!((now - t).abs() < 300, "timestamp {t} is not now ({now})");
    }
}

/// An HTTP/1.1 endpoint that answers with the scripted statuses, then with a default one,
/// and records every request.
#[derive(Debug)]
struct Receiver {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Received>>>,
    default: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(script: &[u16], then: u16) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let default = Arc::new(AtomicU16::new(then));
        let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<u16>>()));
        let (record, fallback) = (requests.clone(), default.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (record, fallback, script) = (record.clone(), fallback.clone(), script.clone());
                tokio::spawn(async move {
                    let Some(mut request) = read_request(&mut stream).await else { return };
                    let status = {
                        // Record and pick the answer together, so requests and answers pair up.
                        let mut record = record.lock().unwrap();
                        request.answered = script.lock().unwrap().pop_front().unwrap_or_else(|| fallback.load(Ordering::SeqCst));
                        record.push(request.clone());
                        request.answered
                    };
                    let reply = format!("HTTP/1.1 {status} Scripted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    let _ = stream.write_all(reply.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Receiver { addr, requests, default, task }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/gantry", self.addr)
    }

    fn requests(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    fn answer(&self, status: u16) {
        self.default.store(status, Ordering::SeqCst);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Received> {
    let request = gantry_tests::web::read_http_request(stream).await?;
    assert!(request.request_line.starts_with("POST /hooks/gantry HTTP/1.1"), "{request:?}");
    Some(Received { headers: request.headers, body: request.body, answered: 0 })
}

async fn start_hub(data: &std::path::Path) -> TestHub {
    TestHub::start(data, |c| c.webhook_retry_base_ms = RETRY_BASE_MS).await
}

/// Create an endpoint; its id and secret.
async fn create_webhook(api: &Api, org: &str, url: &str, events: &[&str]) -> (String, String) {
    let (status, body) = api.post(&format!("/api/v1/orgs/{org}/webhooks"), &json!({ "url": url, "events": events, "description": "test receiver" })).await;
    assert_eq!(status, 201, "{body}");
    let secret = body["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{body}");
    (body["id"].as_str().unwrap().to_string(), secret)
}

async fn deliveries(api: &Api, org: &str, webhook: &str) -> Vec<Value> {
    let (status, body) = api.get(&format!("/api/v1/orgs/{org}/webhooks/{webhook}/deliveries")).await;
    assert_eq!(status, 200, "{body}");
    body["deliveries"].as_array().unwrap().clone()
}

/// The status codes of a delivery's attempts, in order.
fn codes(delivery: &Value) -> Vec<u64> {
    delivery["attempts"].as_array().unwrap().iter().map(|a| a["status_code"].as_u64().unwrap_or(0)).collect()
}

async fn send_json(api: &Api, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, text) = api.send(method, path, Some("application/json"), body.to_string().into_bytes()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_are_retried_until_one_succeeds_and_then_never_again() {
    let dir = TempDir::new("webhooks-retry");
    let hub = start_hub(&dir.path().join("hub")).await;
    hub.create_org("acme", 5).await;
    let api = hub.api();
    let flaky = Receiver::start(&[500, 500], 200).await;
    let broken = Receiver::start(&[], 500).await;
    let (webhook, secret) = create_webhook(&api, "acme", &flaky.url(), &["agent.enrolled"]).await;
    let (broken_webhook, _) = create_webhook(&api, "acme", &broken.url(), &["*"]).await;

    // A real enrollment raises the event.
    let token = hub.token("acme", 1, "10m").await;
    let agent_id = enroll(&token, &dir.path().join("agent")).await.unwrap();

    let delivery = wait_for(Duration::from_secs(30), "the delivery to succeed", || async {
        deliveries(&api, "acme", &webhook).await.into_iter().find(|d| d["status"] == "succeeded")
    })
    .await;
    assert_eq!(codes(&delivery), [500, 500, 200], "both failures and the success are in the log: {delivery}");
    assert!(delivery["attempts"].as_array().unwrap().iter().all(|a| a["at"].as_str().unwrap().starts_with("20") && a["duration_ms"].is_u64()), "{delivery}");
    assert_eq!(delivery["event_type"], "agent.enrolled");
    assert!(delivery["next_attempt_at"].is_null(), "{delivery}");

    // Three requests of the same delivery, each signed over the exact body it carried.
    let received = flaky.requests();
    assert_eq!(received.iter().map(|r| r.answered).collect::<Vec<_>>(), [500, 500, 200]);
    for request in &received {
        request.verify(&secret);
        assert_eq!(request.body, received[0].body, "every attempt carries the same body");
        assert_eq!(request.header("gantry-delivery"), delivery["id"].as_str().unwrap());
        assert_eq!(request.header("gantry-event"), "agent.enrolled");
        assert_eq!(request.header("content-type"), "application/json");
        assert!(request.header("user-agent").starts_with("Gantry-Webhooks/"), "{:?}", request.headers);
    }
    let event = received[0].json();
    assert_eq!(event["id"], delivery["event_id"]);
    assert!(event["id"].as_str().unwrap().starts_with("evt_"));
    assert_eq!(event["type"], "agent.enrolled");
    assert_eq!(event["org"], "acme");
    assert_eq!(event["data"]["agent_id"], agent_id.as_str());
    assert!(time::OffsetDateTime::parse(event["created_at"].as_str().unwrap(), &time::format_description::well_known::Rfc3339).is_ok(), "{event}");

    // The broken endpoint keeps failing meanwhile; by its fifth attempt the worker has gone
    // through two more backoff periods than the success needed, and sent nothing more.
    let stubborn = wait_for(Duration::from_secs(30), "five attempts at the broken endpoint", || async {
        deliveries(&api, "acme", &broken_webhook).await.into_iter().find(|d| d["attempts"].as_array().unwrap().len() >= 5)
    })
    .await;
    assert_eq!(stubborn["status"], "pending", "{stubborn}");
    assert!(codes(&stubborn).iter().all(|c| *c == 500), "{stubborn}");
    assert_eq!(flaky.requests().len(), 3, "no request after the success");
    let log = deliveries(&api, "acme", &webhook).await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(codes(&log[0]), [500, 500, 200]);

    let (_, _, metrics) = api.send("GET", "/metrics", None, Vec::new()).await;
    assert!(metrics.contains("gantry_webhook_deliveries_succeeded_total 1\n"), "{metrics}");
    assert!(metrics.contains("gantry_webhook_deliveries_pending "), "{metrics}");
    let attempts: u64 = metrics.lines().find_map(|l| l.strip_prefix("gantry_webhook_delivery_attempts_total ")).unwrap().parse().unwrap();
    assert!(attempts >= 8, "3 + at least 5 attempts: {attempts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_validated_scoped_to_their_org_and_show_the_secret_once() {
    let dir = TempDir::new("webhooks-api");
    let hub = start_hub(&dir.path().join("hub")).await;
    hub.create_org("acme", 5).await;
    hub.create_org("other", 5).await;
    let api = hub.api();
    let path = "/api/v1/orgs/acme/webhooks";

    // Bad input: 400 naming the problem, and nothing is created.
    let long = "x".repeat(501);
    let cases = [
        (json!({ "url": "ftp://hooks.example.com/", "events": ["*"] }), "must start with http:// or https://"),
        (json!({ "url": "https:///path", "events": ["*"] }), "url:"),
        (json!({ "url": "https://hooks.example.com/", "events": ["agent.exploded"] }), "unknown event type \"agent.exploded\""),
        (json!({ "url": "https://hooks.example.com/", "events": [] }), "at least one event type"),
        (json!({ "events": ["*"] }), "url is required"),
        (json!({ "url": "https://hooks.example.com/" }), "events is required"),
        (json!({ "url": "https://hooks.example.com/", "events": ["*"], "description": long }), "description must be at most 500"),
        (json!({ "url": "https://hooks.example.com/", "events": ["*"], "secret": "mine" }), "unknown field `secret`"),
    ];
    for (body, expected) in cases {
        let (status, answer) = api.post(path, &body).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains(expected), "{body} -> {answer}");
    }
    let (status, list) = api.get(path).await;
    assert_eq!(status, 200);
    assert_eq!(list["webhooks"], json!([]), "nothing was created");

    // Created: the secret is in this answer and nowhere else.
    let (id, secret) = create_webhook(&api, "acme", "https://hooks.example.com/gantry", &["deployment.failed", "alert.firing"]).await;
    let one = format!("{path}/{id}");
    for reply in [api.send("GET", path, None, vec![]).await.2, api.send("GET", &one, None, vec![]).await.2] {
        assert!(reply.contains(&id) && !reply.contains(&secret) && !reply.contains("\"secret\""), "{reply}");
    }
    let store_dir = dir.path().join("hub").join("store");
    hub.hub.store.flush().await.unwrap();
    assert!(!files_contain(&store_dir, secret.as_bytes()), "the secret is stored sealed, not in clear");

    // Another org's caller sees nothing, exactly as if it did not exist.
    let (_, other_key) = gantry_hub::auth::create_api_key(&hub.hub, "other key", Some("other".into()), "test").unwrap();
    let other = api.with_bearer(&other_key);
    assert_eq!(other.get(path).await.0, 404);
    assert_eq!(other.get(&one).await.0, 404);
    assert_eq!(other.get(&format!("/api/v1/orgs/other/webhooks/{id}")).await.0, 404);
    assert_eq!(other.get(&format!("{one}/deliveries")).await.0, 404);
    assert_eq!(other.post(&format!("{one}/rotate-secret"), &json!({})).await.0, 404);
    assert_eq!(send_json(&other, "PATCH", &one, &json!({ "enabled": false })).await.0, 404);
    assert_eq!(other.send("DELETE", &one, None, vec![]).await.0, 404);
    let (status, own) = other.get("/api/v1/orgs/other/webhooks").await;
    assert_eq!((status, own["webhooks"].clone()), (200, json!([])));

    // A bad change is refused whole; good ones apply.
    let (status, answer) = send_json(&api, "PATCH", &one, &json!({ "events": ["nope"], "enabled": false })).await;
    assert_eq!(status, 400, "{answer}");
    let (_, unchanged) = api.get(&one).await;
    assert_eq!((unchanged["events"].clone(), unchanged["enabled"].clone()), (json!(["deployment.failed", "alert.firing"]), json!(true)));
    let (status, patched) = send_json(&api, "PATCH", &one, &json!({ "enabled": false, "events": ["*", "*"] })).await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!((patched["events"].clone(), patched["enabled"].clone(), patched["description"].clone()), (json!(["*"]), json!(false), json!("test receiver")));
    let (status, replaced) = send_json(&api, "PUT", &one, &json!({ "url": "http://10.0.0.1:8080/in", "events": ["agent.offline"] })).await;
    assert_eq!(status, 200, "{replaced}");
    assert_eq!(
        (replaced["url"].clone(), replaced["events"].clone(), replaced["enabled"].clone(), replaced["description"].clone()),
        (json!("http://10.0.0.1:8080/in"), json!(["agent.offline"]), json!(true), Value::Null)
    );
    assert!(!replaced.to_string().contains(&secret));

    // A rotated secret is shown once too, and differs.
    let (status, rotated) = api.post(&format!("{one}/rotate-secret"), &json!({})).await;
    assert_eq!(status, 200, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap();
    assert!(new_secret.starts_with("whsec_") && new_secret != secret);
    assert!(!api.send("GET", &one, None, vec![]).await.2.contains(new_secret));

    assert_eq!(api.send("DELETE", &one, None, vec![]).await.0, 200);
    assert_eq!(api.get(&one).await.0, 404);
}

/// Whether any file under `dir` contains `needle`.
fn files_contain(dir: &std::path::Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().any(|entry| {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_contain(&path, needle)
        } else {
            std::fs::read(&path).unwrap_or_default().windows(needle.len()).any(|w| w == needle)
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_sends_the_same_event_again_at_once() {
    let dir = TempDir::new("webhooks-redeliver");
    let hub = start_hub(&dir.path().join("hub")).await;
    hub.create_org("acme", 5).await;
    let api = hub.api();
    let receiver = Receiver::start(&[], 200).await;
    let (webhook, secret) = create_webhook(&api, "acme", &receiver.url(), &["deployment.failed"]).await;

    // Events the endpoint is not subscribed to make no delivery.
    gantry_hub::webhooks::notify(&hub.hub, "acme", "agent.online", json!({ "agent_id": "agt_x" }));
    gantry_hub::webhooks::notify(&hub.hub, "acme", "deployment.failed", json!({ "deployment_id": "dep_1", "revision": 2 }));
    let first = wait_for(Duration::from_secs(20), "the first delivery", || async {
        deliveries(&api, "acme", &webhook).await.into_iter().find(|d| d["status"] == "succeeded")
    })
    .await;
    let first_id = first["id"].as_str().unwrap().to_string();

    let base = format!("/api/v1/orgs/acme/webhooks/{webhook}/deliveries");
    let (status, queued) = api.post(&format!("{base}/{first_id}/redeliver"), &json!({})).await;
    assert_eq!(status, 202, "{queued}");
    assert_eq!(queued["redelivery_of"], first_id.as_str());
    assert_eq!(queued["event_id"], first["event_id"]);
    let again_id = queued["id"].as_str().unwrap().to_string();
    assert_ne!(again_id, first_id);

    let received = wait_for(Duration::from_secs(20), "the redelivery", || async {
        let received = receiver.requests();
        (received.len() >= 2).then_some(received)
    })
    .await;
    assert_eq!(received.len(), 2, "one delivery and one redelivery");
    for request in &received {
        request.verify(&secret);
    }
    assert_eq!(received[0].json()["id"], received[1].json()["id"], "same event id, so receivers can deduplicate");
    assert_eq!(received[0].json()["data"], json!({ "deployment_id": "dep_1", "revision": 2 }));
    assert_eq!(received[0].header("gantry-delivery"), first_id);
    assert_eq!(received[1].header("gantry-delivery"), again_id);

    let again = wait_for(Duration::from_secs(20), "the redelivery to be recorded", || async {
        let (_, d) = api.get(&format!("{base}/{again_id}")).await;
        (d["status"] == "succeeded").then_some(d)
    })
    .await;
    assert_eq!(codes(&again), [200]);
    assert_eq!(again["event"]["id"], first["event_id"], "the one-delivery view shows the event: {again}");
    let ids: Vec<Value> = deliveries(&api, "acme", &webhook).await.iter().map(|d| d["id"].clone()).collect();
    assert_eq!(ids, [json!(again_id), json!(first_id)], "newest first, and nothing for the unsubscribed event");

    // Unknown or foreign deliveries are 404.
    assert_eq!(api.post(&format!("{base}/dlv_nope/redeliver"), &json!({})).await.0, 404);
    let (other_webhook, _) = create_webhook(&api, "acme", &receiver.url(), &["*"]).await;
    assert_eq!(api.get(&format!("/api/v1/orgs/acme/webhooks/{other_webhook}/deliveries/{first_id}")).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_pending_at_a_hub_stop_are_sent_after_it_restarts() {
    let dir = TempDir::new("webhooks-restart");
    let data = dir.path().join("hub");
    let hub = start_hub(&data).await;
    hub.create_org("acme", 5).await;
    let receiver = Receiver::start(&[], 503).await;
    let (webhook, secret) = create_webhook(&hub.api(), "acme", &receiver.url(), &["*"]).await;
    gantry_hub::webhooks::notify(&hub.hub, "acme", "agent.offline", json!({ "agent_id": "agt_gone" }));
    let api = hub.api();
    let pending = wait_for(Duration::from_secs(20), "a failed attempt", || async {
        deliveries(&api, "acme", &webhook).await.into_iter().find(|d| !d["attempts"].as_array().unwrap().is_empty())
    })
    .await;
    assert_eq!(pending["status"], "pending", "{pending}");
    hub.stop().await;

    // The receiver recovers while the hub is down; the restarted hub finishes the job.
    receiver.answer(200);
    let hub = start_hub(&data).await;
    let api = hub.api();
    let done = wait_for(Duration::from_secs(30), "the delivery after the restart", || async {
        deliveries(&api, "acme", &webhook).await.into_iter().find(|d| d["status"] == "succeeded")
    })
    .await;
    assert_eq!(done["id"], pending["id"]);
    let codes = codes(&done);
    assert_eq!(codes.last(), Some(&200));
    assert!(codes[..codes.len() - 1].iter().all(|c| *c == 503), "{codes:?}");
    let received = receiver.requests();
    assert_eq!(received.iter().filter(|r| r.answered == 200).count(), 1, "accepted once, never sent again");
    assert!(received.iter().all(|r| r.header("gantry-delivery") == pending["id"].as_str().unwrap()), "one delivery throughout");
    received.last().unwrap().verify(&secret);
    assert_eq!(received.last().unwrap().json()["data"]["agent_id"], "agt_gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_and_agent_changes_are_sent_once_per_change() {
    use gantry_shared::message::{DeployReport, DeployState};
    let dir = TempDir::new("webhooks-events");
    let hub = start_hub(&dir.path().join("hub")).await;
    hub.create_org("acme", 5).await;
    let api = hub.api();
    let receiver = Receiver::start(&[], 200).await;
    let events = ["deployment.started", "deployment.succeeded", "deployment.failed", "deployment.rolled_back", "agent.revoked"];
    let (webhook, secret) = create_webhook(&api, "acme", &receiver.url(), &events).await;
    let token = hub.token("acme", 1, "10m").await;
    let agent_id = enroll(&token, &dir.path().join("agent")).await.unwrap();
    let spec = json!({ "name": "web", "services": [{ "name": "app", "image": "web:1", "ports": [{ "host": 8080, "container": 80 }] }] });
    let (status, created) = api.post("/api/v1/orgs/acme/deployments", &json!({ "spec": spec, "targets": { "agents": [agent_id] } })).await;
    assert_eq!(status, 201, "{created}");
    let deployment_id = created["id"].as_str().unwrap().to_string();

    // What the agent reports, as its connection would hand it over; repeats are no change.
    let report = |revision: u64, state: DeployState, message: &str| {
        let report = DeployReport { deployment_id: deployment_id.clone(), revision, state, message: message.to_string() };
        gantry_hub::orchestrator::report(&hub.hub, &agent_id, "acme", report);
    };
    report(1, DeployState::Applying, "");
    report(1, DeployState::Healthy, "");
    report(1, DeployState::Healthy, "");
    report(2, DeployState::Applying, "");
    report(2, DeployState::RolledBack { to: 1 }, "exit code 3");
    report(3, DeployState::Applying, "");
    report(3, DeployState::Failed, "image not found");
    report(3, DeployState::Removed, "");
    for _ in 0..2 {
        let (status, body) = api.post(&format!("/api/v1/agents/{agent_id}/revoke"), &json!({})).await;
        assert_eq!(status, 200, "{body}");
    }

    // Events are queued before the calls return: one per change, none for the repeats, the
    // removal, the second revocation or the (unsubscribed) enrollment.
    let mut types: Vec<String> = deliveries(&api, "acme", &webhook).await.iter().map(|d| d["event_type"].as_str().unwrap().to_string()).collect();
    types.sort();
    let expected = [
        "agent.revoked",
        "deployment.failed",
        "deployment.rolled_back",
        "deployment.started",
        "deployment.started",
        "deployment.started",
        "deployment.succeeded",
    ];
    assert_eq!(types, expected);

    let received = wait_for(Duration::from_secs(20), "seven deliveries", || async {
        let received = receiver.requests();
        (received.len() >= expected.len()).then_some(received)
    })
    .await;
    assert_eq!(received.len(), expected.len());
    for request in &received {
        request.verify(&secret);
    }
    let of_type = |t: &str| received.iter().map(Received::json).find(|e| e["type"] == t).unwrap();
    let rolled_back = of_type("deployment.rolled_back");
    assert_eq!(
        rolled_back["data"],
        json!({ "deployment_id": deployment_id, "deployment": "web", "revision": 2, "agent_id": agent_id, "message": "exit code 3", "rolled_back_to": 1 })
    );
    assert_eq!(of_type("deployment.failed")["data"]["message"], "image not found");
    let revoked = of_type("agent.revoked");
    assert_eq!((revoked["org"].clone(), revoked["data"]["agent_id"].clone()), (json!("acme"), json!(agent_id)));
}
