//! Webhooks: org events sent to the org's endpoints as signed HTTP POSTs, retried until
//! they are accepted or a day has passed.
//!
//! [`notify`] records an event and one delivery per subscribed endpoint in one store write
//! and wakes the delivery worker ([`run`]), which POSTs each due delivery with a
//! `Gantry-Signature` header (HMAC-SHA256 of `"<t>.<body>"` under the endpoint's secret,
//! see [`signature`]). A 2xx answer ends a delivery; anything else is retried on the
//! schedule of [`backoff_ms`] until [`RETRY_WINDOW_MS`] after the delivery was created.
//! The queue lives in the store, so deliveries due while the hub was down go out after it
//! starts. Every attempt is recorded with its time, status code or error, and duration.
//!
//! Delivery is at least once: a hub stopped between a receiver's 2xx and the write that
//! records it sends that delivery again after it restarts. Receivers deduplicate by the
//! event id. This module never logs a secret or an endpoint URL (URLs often carry tokens).

use crate::metrics::Metrics;
use crate::secrets::Kind;
use crate::store::{self, AgentDeployStatus, DeliveryAttempt, DeliveryStatus, Deployment, WebhookDelivery, WebhookEvent};
use crate::Hub;
use bytes::Bytes;
use gantry_shared::message::DeployState;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// Every event type an endpoint may subscribe to, besides [`ALL_EVENTS`].
pub const EVENT_TYPES: [&str; 11] = [
    "alert.firing",
    "alert.resolved",
    "alert.acknowledged",
    "deployment.started",
    "deployment.succeeded",
    "deployment.failed",
    "deployment.rolled_back",
    "agent.enrolled",
    "agent.revoked",
    "agent.offline",
    "agent.online",
];

/// Subscribes an endpoint to every event type, including ones added later.
pub const ALL_EVENTS: &str = "*";

/// Longest one attempt may take, connecting and waiting for the answer's status included.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// A delivery is retried until this long after it was created, then ends as failed.
pub const RETRY_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// Retry delays as multiples of the base (`webhook_retry_base_ms`): with the default 10 s,
/// 10 s, 30 s, 1 min, 2 min, 5 min, 10 min, 30 min, 1 h, then hourly.
pub const BACKOFF_STEPS: [u64; 8] = [1, 3, 6, 12, 30, 60, 180, 360];

/// Most attempts in flight at once.
pub const MAX_IN_FLIGHT: usize = 16;

/// Finished deliveries and their events are kept this long for the delivery log.
pub const LOG_RETENTION_MS: i64 = 30 * 24 * 3600 * 1000;

/// `User-Agent` of every delivery.
pub const USER_AGENT: &str = concat!("Gantry-Webhooks/", env!("CARGO_PKG_VERSION"));

/// How often old deliveries are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// How long the worker sleeps when nothing is due (a new delivery wakes it sooner).
const IDLE_WAIT: Duration = Duration::from_secs(3600);

/// At shutdown, attempts in flight get this long to finish; cut ones are sent again after
/// a restart.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Whether `event_type` is one endpoints can subscribe to.
pub fn is_event_type(event_type: &str) -> bool {
    EVENT_TYPES.contains(&event_type)
}

/// Delay after the `failed_attempts`-th failed attempt (counting from 1), in milliseconds.
pub fn backoff_ms(base_ms: u64, failed_attempts: usize) -> u64 {
    let step = BACKOFF_STEPS[failed_attempts.clamp(1, BACKOFF_STEPS.len()) - 1];
    base_ms.saturating_mul(step)
}

/// When to try a delivery created at `created_ms` again, after its `failed_attempts`-th
/// failed attempt ended at `now_ms`; `None` once that is past the retry window.
pub fn next_attempt_ms(base_ms: u64, created_ms: i64, failed_attempts: usize, now_ms: i64) -> Option<i64> {
    let at = now_ms.saturating_add(i64::try_from(backoff_ms(base_ms, failed_attempts)).unwrap_or(i64::MAX));
    (at <= created_ms.saturating_add(RETRY_WINDOW_MS)).then_some(at)
}

/// The `Gantry-Signature` header value: `t=<unix seconds>,v1=<lowercase hex
/// HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    format!("t={timestamp},v1={}", gantry_shared::token::hex(context.sign().as_ref()))
}

/// A new signing secret: `whsec_` and 64 hex digits (256 random bits). Receivers use the
/// whole text, prefix included, as the HMAC key.
pub fn new_secret() -> String {
    format!("whsec_{}", crate::auth::random_hex(32))
}

/// The JSON body every delivery of `event` carries, byte for byte the same each time.
pub fn payload(event: &WebhookEvent) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Payload<'a> {
        id: &'a str,
        #[serde(rename = "type")]
        event_type: &'a str,
        created_at: String,
        org: &'a str,
        data: &'a Value,
    }
    let body =
        Payload { id: &event.id, event_type: &event.event_type, created_at: crate::api::rfc3339(event.created_at_ms), org: &event.org, data: &event.data };
    // Serialising strings and a JSON value cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// A pending delivery of `event` to endpoint `webhook_id`, due at `now_ms`.
fn new_delivery(event_id: &str, event_type: &str, org: &str, webhook_id: &str, now_ms: i64, redelivery_of: Option<String>) -> WebhookDelivery {
    WebhookDelivery {
        id: format!("dlv_{}", crate::auth::random_hex(12)),
        org: org.to_string(),
        webhook_id: webhook_id.to_string(),
        event_id: event_id.to_string(),
        event_type: event_type.to_string(),
        created_at_ms: now_ms,
        status: DeliveryStatus::Pending,
        attempts: Vec::new(),
        next_attempt_ms: Some(now_ms),
        failure: None,
        redelivery_of,
    }
}

/// Record that `event_type` happened in `org`, with `data` as the payload's `data`: one
/// event and one delivery per enabled endpoint of the org subscribed to the type, in one
/// store write, then wake the delivery worker. Nothing is written when no endpoint is
/// subscribed. Never fails the caller: store errors are logged. Costs one store read and,
/// with subscribers, one durable write; the HTTP requests happen in the worker.
pub fn notify(hub: &Hub, org: &str, event_type: &str, data: Value) {
    if !is_event_type(event_type) {
        return warn!(%org, event_type, "unknown webhook event type; not sent");
    }
    let endpoints = match hub.store.webhooks_of(org) {
        Ok(endpoints) => endpoints,
        Err(error) => return warn!(%org, event_type, %error, "cannot read webhook endpoints; event not sent"),
    };
    let subscribed: Vec<_> = endpoints.iter().filter(|e| e.wants(event_type)).collect();
    if subscribed.is_empty() {
        return;
    }
    let now = crate::wall_ms();
    let event =
        WebhookEvent { id: format!("evt_{}", crate::auth::random_hex(12)), org: org.to_string(), event_type: event_type.to_string(), created_at_ms: now, data };
    let deliveries: Vec<_> = subscribed.iter().map(|e| new_delivery(&event.id, event_type, org, &e.id, now, None)).collect();
    match hub.store.enqueue_webhook_deliveries(Some(&event), &deliveries) {
        Ok(()) => hub.webhook_wake.notify_one(),
        Err(error) => warn!(%org, event_type, %error, "cannot store a webhook event; not sent"),
    }
}

/// A new delivery of the event `original` carried (same event id), to the same endpoint,
/// due at once.
pub fn redeliver(hub: &Hub, original: &WebhookDelivery) -> Result<WebhookDelivery, store::Error> {
    let delivery = new_delivery(&original.event_id, &original.event_type, &original.org, &original.webhook_id, crate::wall_ms(), Some(original.id.clone()));
    hub.store.enqueue_webhook_deliveries(None, std::slice::from_ref(&delivery))?;
    hub.webhook_wake.notify_one();
    Ok(delivery)
}

/// An agent reported on a deployment: when its state changed from `previous`, send
/// `deployment.started` (applying), `.succeeded` (healthy), `.failed` or `.rolled_back`.
pub fn deployment_reported(hub: &Hub, deployment: &Deployment, agent_id: &str, previous: Option<&AgentDeployStatus>, status: &AgentDeployStatus) {
    if previous.is_some_and(|p| p.revision == status.revision && p.state == status.state) {
        return;
    }
    let (event_type, rolled_back_to) = match status.state {
        DeployState::Applying => ("deployment.started", None),
        DeployState::Healthy => ("deployment.succeeded", None),
        DeployState::Failed => ("deployment.failed", None),
        DeployState::RolledBack { to } => ("deployment.rolled_back", Some(to)),
        DeployState::Removed => return,
    };
    let mut data = json!({
        "deployment_id": deployment.id,
        "deployment": deployment.name,
        "revision": status.revision,
        "agent_id": agent_id,
        "message": status.message,
    });
    if let Some(to) = rolled_back_to {
        data["rolled_back_to"] = json!(to);
    }
    notify(hub, &deployment.org, event_type, data);
}

/// Send an `agent.*` event about agent `agent_id` (its id, hostname and labels) to its org.
pub fn agent_event(hub: &Hub, event_type: &str, agent_id: &str) {
    match hub.store.agent(agent_id) {
        Ok(Some(agent)) => {
            let labels: serde_json::Map<String, Value> = agent.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            notify(hub, &agent.org, event_type, json!({ "agent_id": agent.id, "hostname": agent.hostname, "labels": labels }));
        }
        Ok(None) => {}
        Err(error) => warn!(agent_id, event_type, %error, "cannot read the agent; webhook event not sent"),
    }
}

/// The HTTP(S) client of the worker.
type Client = hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client for `http://` and `https://` (rustls on ring, Mozilla's roots), HTTP/1.1, a new
/// connection per attempt: deliveries are rare, and a pooled connection the receiver has
/// since closed would fail an attempt for nothing.
fn client() -> Result<Client, rustls::Error> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(ATTEMPT_TIMEOUT));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).pool_max_idle_per_host(0).http1_title_case_headers(true).build(https))
}

/// The delivery worker: sends due deliveries (at most [`MAX_IN_FLIGHT`] at once) until
/// `stop` turns true, waking when [`notify`] or [`redeliver`] queue one, when the next is
/// due, or when an attempt ends. Prunes the delivery log hourly.
pub async fn run(hub: Arc<Hub>, mut stop: watch::Receiver<bool>) {
    let client = match client() {
        Ok(client) => client,
        Err(error) => return tracing::error!(%error, "cannot build the webhook HTTP client; webhooks are not delivered"),
    };
    let mut tasks = tokio::task::JoinSet::new();
    // Delivery ids of the attempts in flight, by task.
    let mut in_flight: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut next_prune = tokio::time::Instant::now();
    // The pending gauge is refreshed after the queue changed, at most once a second
    // (counting the queue is a scan).
    let mut gauge_stale = true;
    let mut next_gauge = tokio::time::Instant::now();
    loop {
        let now = crate::wall_ms();
        if tokio::time::Instant::now() >= next_prune {
            next_prune += PRUNE_EVERY;
            prune(&hub, now);
        }
        let room = MAX_IN_FLIGHT.saturating_sub(tasks.len());
        let next_due = match hub.store.due_webhook_deliveries(now, room, |id| in_flight.values().any(|f| f == id)) {
            Ok((due, next_due)) => {
                for id in due {
                    let (hub, client, delivery) = (hub.clone(), client.clone(), id.clone());
                    let task = tasks.spawn(async move { attempt(&hub, &client, &delivery).await });
                    in_flight.insert(task.id(), id);
                }
                next_due
            }
            Err(error) => {
                warn!(%error, "cannot read the webhook queue");
                Some(now + 1000)
            }
        };
        if gauge_stale && tokio::time::Instant::now() >= next_gauge {
            gauge_stale = false;
            next_gauge = tokio::time::Instant::now() + Duration::from_secs(1);
            hub.metrics.webhook_deliveries_pending.store(hub.store.pending_webhook_deliveries() as u64, Ordering::Relaxed);
        }
        let mut wait = match next_due {
            Some(_) if tasks.len() >= MAX_IN_FLIGHT => IDLE_WAIT,
            Some(at) => Duration::from_millis(u64::try_from(at - now).unwrap_or(0)),
            None => IDLE_WAIT,
        };
        if gauge_stale {
            wait = wait.min(next_gauge.saturating_duration_since(tokio::time::Instant::now()));
        }
        tokio::select! {
            _ = hub.webhook_wake.notified() => gauge_stale = true,
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                in_flight.remove(&done.map_or_else(|error| error.id(), |(id, ())| id));
                gauge_stale = true;
            }
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|stop| *stop) => break,
        }
        while let Some(done) = tasks.try_join_next_with_id() {
            in_flight.remove(&done.map_or_else(|error| error.id(), |(id, ())| id));
        }
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.shutdown().await;
}

/// Drop deliveries and events past [`LOG_RETENTION_MS`], off the async workers.
fn prune(hub: &Hub, now_ms: i64) {
    let store = hub.store.clone();
    tokio::task::spawn_blocking(move || match store.prune_webhook_deliveries(now_ms - LOG_RETENTION_MS) {
        Ok(0) => {}
        Ok(removed) => info!(removed, "pruned the webhook delivery log"),
        Err(error) => warn!(%error, "cannot prune the webhook delivery log"),
    });
}

/// End a pending delivery as failed without an attempt.
fn give_up(hub: &Hub, mut delivery: WebhookDelivery, reason: &str) {
    delivery.status = DeliveryStatus::Failed;
    delivery.next_attempt_ms = None;
    delivery.failure = Some(reason.to_string());
    Metrics::inc(&hub.metrics.webhook_deliveries_failed);
    warn!(delivery = %delivery.id, webhook = %delivery.webhook_id, reason, "webhook delivery dropped");
    if let Err(error) = hub.store.save_webhook_delivery(&delivery) {
        warn!(delivery = %delivery.id, %error, "cannot record a webhook delivery");
    }
}

/// Make one attempt at delivery `id` and record it.
async fn attempt(hub: &Hub, client: &Client, id: &str) {
    let loaded = hub.store.webhook_delivery(id).and_then(|delivery| {
        let Some(delivery) = delivery.filter(|d| d.status == DeliveryStatus::Pending) else { return Ok(None) };
        let endpoint = hub.store.webhook(&delivery.org, &delivery.webhook_id)?;
        let event = hub.store.webhook_event(&delivery.event_id)?;
        Ok(Some((delivery, endpoint, event)))
    });
    let (mut delivery, endpoint, event) = match loaded {
        Ok(Some((delivery, Some(endpoint), Some(event)))) if endpoint.enabled => (delivery, endpoint, event),
        Ok(Some((delivery, Some(_), Some(_)))) => return give_up(hub, delivery, "endpoint is disabled"),
        Ok(Some((delivery, None, _))) => return give_up(hub, delivery, "endpoint was deleted"),
        Ok(Some((delivery, _, None))) => return give_up(hub, delivery, "event is no longer stored"),
        Ok(None) => {
            // Done, or gone with its endpoint: a queue entry left behind must not come back.
            if let Err(error) = hub.store.unqueue_webhook_delivery(id) {
                warn!(delivery = %id, %error, "cannot clear a webhook queue entry");
            }
            return;
        }
        Err(error) => {
            warn!(delivery = %id, %error, "cannot read a webhook delivery");
            // Stay in flight a moment, so a failing store is not read in a tight loop.
            return tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let started_ms = crate::wall_ms();
    let started = tokio::time::Instant::now();
    let result = match hub.secret_box.open(&endpoint.org, Kind::Webhook, &endpoint.id, &endpoint.sealed_secret) {
        Ok(secret) => {
            let body = payload(&event);
            let signature = signature(&secret, started_ms.div_euclid(1000), &body);
            send(client, &endpoint.url, &delivery, &signature, body).await
        }
        Err(_) => Err("the signing secret does not open (was the secrets key file replaced?)".to_string()),
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    Metrics::inc(&hub.metrics.webhook_attempts);
    let (status_code, error) = match result {
        Ok(code) => (Some(code), None),
        Err(error) => (None, Some(error)),
    };
    delivery.attempts.push(DeliveryAttempt { at_ms: started_ms, duration_ms, status_code, error: error.clone() });
    let ended_ms = crate::wall_ms();
    if status_code.is_some_and(|code| (200..300).contains(&code)) {
        delivery.status = DeliveryStatus::Succeeded;
        delivery.next_attempt_ms = None;
        Metrics::inc(&hub.metrics.webhook_deliveries_succeeded);
        info!(delivery = %delivery.id, webhook = %delivery.webhook_id, event_type = %delivery.event_type, attempts = delivery.attempts.len(), "webhook delivered");
    } else {
        let base = hub.config.webhook_retry_base_ms;
        delivery.next_attempt_ms = next_attempt_ms(base, delivery.created_at_ms, delivery.attempts.len(), ended_ms);
        let outcome = status_code.map_or_else(|| error.unwrap_or_default(), |code| format!("HTTP {code}"));
        if delivery.next_attempt_ms.is_none() {
            delivery.status = DeliveryStatus::Failed;
            Metrics::inc(&hub.metrics.webhook_deliveries_failed);
            warn!(delivery = %delivery.id, webhook = %delivery.webhook_id, attempts = delivery.attempts.len(), %outcome, "webhook delivery failed; no retries left");
        } else {
            info!(delivery = %delivery.id, webhook = %delivery.webhook_id, attempts = delivery.attempts.len(), %outcome, "webhook attempt failed; will retry");
        }
    }
    if let Err(error) = hub.store.save_webhook_delivery(&delivery) {
        warn!(delivery = %delivery.id, %error, "cannot record a webhook attempt");
    }
}

/// POST `body` to `url` with the delivery headers; the answer's status code, or why there
/// was none.
async fn send(client: &Client, url: &str, delivery: &WebhookDelivery, signature: &str, body: Vec<u8>) -> Result<u16, String> {
    let request = hyper::Request::post(url)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, USER_AGENT)
        .header("Gantry-Event", &delivery.event_type)
        .header("Gantry-Delivery", &delivery.id)
        .header("Gantry-Signature", signature)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    match tokio::time::timeout(ATTEMPT_TIMEOUT, client.request(request)).await {
        Ok(Ok(response)) => Ok(response.status().as_u16()),
        Ok(Err(error)) => Err(error_text(&error)),
        Err(_) => Err(format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs())),
    }
}

/// An error and its causes, `: `-separated, at most 300 bytes.
fn error_text(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    crate::enroll::truncate(&text, 300)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_a_known_vector() {
        // Computed independently: Python's hmac.new(b"whsec_test", b'1700000000.{"id":"evt_1"}', sha256).
        assert_eq!(
            signature(b"whsec_test", 1_700_000_000, br#"{"id":"evt_1"}"#),
            "t=1700000000,v1=c89214b5b5da833daed6f0b8c5bb6bd58cea9022bd80ccc78230f3942d632925"
        );
        // The timestamp is part of what is signed.
        assert_ne!(signature(b"whsec_test", 1_700_000_001, br#"{"id":"evt_1"}"#)[13..], signature(b"whsec_test", 1_700_000_000, br#"{"id":"evt_1"}"#)[13..]);
    }

    #[test]
    fn hmac_is_sha256_hmac() {
        // RFC 4231, test case 2.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        let tag = ring::hmac::sign(&key, b"what do ya want for nothing?");
        assert_eq!(gantry_shared::token::hex(tag.as_ref()), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn retries_back_off_to_hourly_and_stop_after_a_day() {
        let base = 10_000;
        let delays: Vec<u64> = (1..=10).map(|n| backoff_ms(base, n) / 1000).collect();
        assert_eq!(delays, [10, 30, 60, 120, 300, 600, 1800, 3600, 3600, 3600]);
        assert_eq!(backoff_ms(base, 0), 10_000, "counts from 1; 0 is treated as the first");
        assert_eq!(backoff_ms(50, 2), 150, "the schedule scales with the base");
        assert_eq!(next_attempt_ms(base, 0, 1, 5_000), Some(15_000));

        // Walk a delivery that always fails: the last attempt is within 24 h of its creation.
        let (mut now, mut attempts) = (0i64, 0usize);
        loop {
            attempts += 1; // an attempt at `now`, failed
            match next_attempt_ms(base, 0, attempts, now) {
                Some(at) => now = at,
                None => break,
            }
        }
        // Attempts at 0, 10 s, 40 s, 100 s, 220 s, 520 s, 1120 s, 2920 s, then hourly: the
        // 31st, at 23 h 48 min 40 s, is the last that fits in 24 h.
        assert_eq!((attempts, now), (31, 85_720_000));
    }

    #[test]
    fn payloads_carry_the_event_in_a_fixed_shape() {
        let event = WebhookEvent {
            id: "evt_1".into(),
            org: "acme".into(),
            event_type: "agent.online".into(),
            created_at_ms: 1_700_000_000_000,
            data: json!({ "agent_id": "agt_1" }),
        };
        let body = String::from_utf8(payload(&event)).unwrap();
        assert_eq!(body, r#"{"id":"evt_1","type":"agent.online","created_at":"2023-11-14T22:13:20Z","org":"acme","data":{"agent_id":"agt_1"}}"#);
        assert!(new_secret().starts_with("whsec_") && new_secret().len() == 70 && new_secret() != new_secret());
        assert!(EVENT_TYPES.iter().all(|t| is_event_type(t)) && !is_event_type("*") && !is_event_type("agent.exploded"));
    }
}
