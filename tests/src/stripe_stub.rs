//! A local server speaking Stripe's HTTP API for the endpoints the hub uses, so tests run
//! the hub's Stripe client against something stateful and strict without reaching Stripe.
//!
//! Endpoints: `POST /v1/customers`, `POST /v1/subscriptions`, `POST /v1/billing/meter_events`,
//! `GET /v1/billing/meters`, `GET /v1/billing/meters/{id}/event_summaries`. Strict like
//! Stripe: a request without the secret key answers 401; a POST that is not
//! `application/x-www-form-urlencoded`, an unknown or missing parameter answers 400;
//! `Idempotency-Key` replays the first answer for the same parameters and refuses other
//! parameters with `idempotency_error`; a meter event identifier seen in the last 24 h is
//! refused, and so is a meter event timestamp outside Stripe's window (35 days back, 5
//! minutes ahead); a malformed `Stripe-Version` answers 400. Answers carry every field
//! Stripe's objects have that async-stripe's typed responses require, so the hub's typed
//! parsing is exercised. Idempotency compares parameters as a set (form order is free, as
//! at Stripe). Faults on demand: 429 with `Retry-After`, and "accept then drop the
//! connection" (the event is recorded, the answer never arrives).
//!
//! It must not be used outside tests: it keeps everything in memory.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The secret key the stub accepts.
pub const SECRET_KEY: &str = "sk_test_gantry_stub";

/// The meters the stub has, by event name (the hub's `gantry_<meter>` names).
const METERS: [&str; 7] =
    ["gantry_agent_hours", "gantry_peak_agents", "gantry_log_bytes", "gantry_metric_samples", "gantry_events", "gantry_deployments", "gantry_check_runs"];

/// One meter event as recorded.
#[derive(Debug, Clone)]
pub struct MeterEvent {
    pub identifier: String,
    pub event_name: String,
    pub customer: String,
    pub value: i64,
    pub timestamp: i64,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    customers: BTreeMap<String, Value>,
    subscriptions: BTreeMap<String, Value>,
    events: Vec<MeterEvent>,
    /// Identifier → when it was recorded.
    identifiers: HashMap<String, Instant>,
    /// Idempotency key → (fingerprint of method, path and parameters; status; body).
    idempotency: HashMap<String, (String, u16, Value)>,
    /// Requests still to answer with 429, and the `Retry-After` to send.
    rate_limit_next: u32,
    retry_after_secs: u64,
    /// When each 429 was sent, and when each later request arrived.
    rate_limited_at: Vec<Instant>,
    requests: Vec<(Instant, String, String)>,
    /// The `Stripe-Version` header of every request (`None`: not sent).
    versions: Vec<Option<String>>,
    /// Meter events still to accept and then answer by dropping the connection.
    drop_after_accept: u32,
    replays: u32,
    /// Subscription item price changes and cancellations made.
    price_changes: u32,
    cancellations: u32,
}

/// The running stub; stops when dropped.
#[derive(Debug)]
pub struct StripeStub {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StripeStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn error(status: u16, kind: &str, code: &str, message: &str) -> (u16, Value) {
    (status, json!({ "error": { "type": kind, "code": code, "message": message } }))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A list object as Stripe answers it.
fn list(url: &str, data: Vec<Value>) -> Value {
    json!({ "object": "list", "data": data, "has_more": false, "url": url })
}

/// A customer with the fields Stripe always sends.
fn customer_json(id: &str, name: Option<&str>, metadata: Value) -> Value {
    json!({ "id": id, "object": "customer", "created": unix_now(), "livemode": false, "name": name, "email": null, "metadata": metadata })
}

/// A subscription with one item on `price`, with the fields Stripe always sends.
fn subscription_json(id: &str, item: &str, customer: &str, price: &str, metadata: Value) -> Value {
    let now = unix_now();
    json!({ "id": id, "object": "subscription", "customer": customer, "status": "active", "metadata": metadata,
        "automatic_tax": { "enabled": false, "liability": null }, "billing_cycle_anchor": now, "billing_mode": { "type": "classic" },
        "billing_schedules": [], "cancel_at_period_end": false, "collection_method": "charge_automatically", "created": now,
        "currency": "usd", "discounts": [], "invoice_settings": { "issuer": { "type": "self" } }, "livemode": false, "start_date": now,
        "items": list(&format!("/v1/subscription_items?subscription={id}"), vec![item_json(item, id, price, now)]) })
}

/// A subscription item on `price` (a monthly licensed price of product `prod_stub`).
fn item_json(id: &str, subscription: &str, price: &str, now: i64) -> Value {
    json!({ "id": id, "object": "subscription_item", "created": now, "current_period_start": now, "current_period_end": now + 30 * 86_400,
        "discounts": [], "metadata": {}, "quantity": 1, "subscription": subscription,
        "plan": { "id": price, "object": "plan", "active": true, "billing_scheme": "per_unit", "created": now, "currency": "usd",
            "interval": "month", "interval_count": 1, "livemode": false, "usage_type": "licensed" },
        "price": { "id": price, "object": "price", "active": true, "billing_scheme": "per_unit", "created": now, "currency": "usd",
            "livemode": false, "metadata": {}, "product": "prod_stub", "type": "recurring" } })
}

/// A billing meter summing `payload[value]` per `payload[stripe_customer_id]`.
fn meter_json(event_name: &str) -> Value {
    json!({ "id": format!("mtr_{event_name}"), "object": "billing.meter", "created": 0, "updated": 0, "display_name": event_name,
        "event_name": event_name, "livemode": false, "status": "active", "status_transitions": { "deactivated_at": null },
        "customer_mapping": { "event_payload_key": "stripe_customer_id", "type": "by_id" },
        "default_aggregation": { "formula": "sum" }, "value_settings": { "event_payload_key": "value" } })
}

/// Whether `version` has the shape of a Stripe API version (`2026-09-30` or `2026-09-30.name`).
fn version_well_formed(version: &str) -> bool {
    let (date, name) = version.split_once('.').unwrap_or((version, "a"));
    let digits = date.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
    date.len() == 10 && digits && !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// `application/x-www-form-urlencoded` into pairs, in order.
pub fn parse_form(text: &str) -> Result<Vec<(String, String)>, String> {
    fn decode(part: &str) -> Result<String, String> {
        let bytes = part.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = part.get(i + 1..i + 3).ok_or("truncated escape")?;
                    out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad escape")?);
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).map_err(|_| "not UTF-8".to_string())
    }
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

impl StripeStub {
    pub async fn start() -> StripeStub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind stripe stub");
        let addr = listener.local_addr().expect("stub addr");
        let state = Arc::new(Mutex::new(State { retry_after_secs: 1, ..State::default() }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| handle(state.clone(), request));
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                });
            }
        });
        StripeStub { addr, state, task }
    }

    /// The base URL for the hub's `stripe.api_base`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answer the next `count` requests with 429 and `Retry-After: retry_after_secs`.
    pub fn rate_limit_next(&self, count: u32, retry_after_secs: u64) {
        let mut state = self.state();
        state.rate_limit_next = count;
        state.retry_after_secs = retry_after_secs;
    }

    /// Record the next `count` meter events, then drop their connections unanswered.
    pub fn drop_after_accept(&self, count: u32) {
        self.state().drop_after_accept = count;
    }

    /// Summed meter event values per (customer, event name).
    pub fn totals(&self) -> BTreeMap<(String, String), i64> {
        let mut totals = BTreeMap::new();
        for event in &self.state().events {
            *totals.entry((event.customer.clone(), event.event_name.clone())).or_insert(0) += event.value;
        }
        totals
    }

    pub fn events(&self) -> Vec<MeterEvent> {
        self.state().events.clone()
    }

    /// Make a customer directly in the stub, as an earlier run would have.
    pub fn create_customer(&self, org: &str) -> String {
        let mut state = self.state();
        state.next_id += 1;
        let id = format!("cus_stub{}", state.next_id);
        state.customers.insert(id.clone(), customer_json(&id, Some(org), json!({ "gantry_org": org })));
        id
    }

    pub fn customers(&self) -> Vec<Value> {
        self.state().customers.values().cloned().collect()
    }

    pub fn subscriptions(&self) -> Vec<Value> {
        self.state().subscriptions.values().cloned().collect()
    }

    /// How many subscription price changes and cancellations were made.
    pub fn changes(&self) -> (u32, u32) {
        let state = self.state();
        (state.price_changes, state.cancellations)
    }

    /// How many answers were replays of an earlier idempotency key.
    pub fn replays(&self) -> u32 {
        self.state().replays
    }

    /// The `Stripe-Version` header of every request so far, in order.
    pub fn versions(&self) -> Vec<Option<String>> {
        self.state().versions.clone()
    }

    /// When the 429s were sent, and every request's arrival (time, method, path).
    pub fn timeline(&self) -> (Vec<Instant>, Vec<(Instant, String, String)>) {
        let state = self.state();
        (state.rate_limited_at.clone(), state.requests.clone())
    }
}

/// Answer one request; an `Err` makes hyper drop the connection without an answer.
async fn handle(state: Arc<Mutex<State>>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let method = request.method().as_str().to_string();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (auth, content_type, idempotency_key, version) = (header("authorization"), header("content-type"), header("idempotency-key"), header("stripe-version"));
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    state.requests.push((Instant::now(), method.clone(), path.clone()));
    state.versions.push(version.clone());
    if version.as_deref().is_some_and(|v| !version_well_formed(v)) {
        let (status, value) = error(400, "invalid_request_error", "api_version_invalid", "Invalid Stripe API version");
        return Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(value.to_string())))
            .unwrap_or_default());
    }
    let (status, value, drop_connection, retry_after, replayed) = answer(&mut state, &method, &path, &query, auth, content_type, idempotency_key, &body);
    if drop_connection {
        return Err(std::io::Error::other("stub: accepted, dropping the connection"));
    }
    let mut response =
        Response::builder().status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)).header("content-type", "application/json");
    if let Some(secs) = retry_after {
        response = response.header("retry-after", secs.to_string());
    }
    if replayed {
        response = response.header("idempotent-replayed", "true");
    }
    Ok(response.body(Full::new(Bytes::from(value.to_string()))).unwrap_or_default())
}

#[allow(clippy::too_many_arguments)]
fn answer(
    state: &mut State,
    method: &str,
    path: &str,
    query: &str,
    auth: Option<String>,
    content_type: Option<String>,
    idempotency_key: Option<String>,
    body: &[u8],
) -> (u16, Value, bool, Option<u64>, bool) {
    let plain = |(status, value): (u16, Value)| (status, value, false, None, false);
    if auth.as_deref() != Some(&format!("Bearer {SECRET_KEY}")) {
        return plain(error(401, "invalid_request_error", "api_key_invalid", "Invalid API Key provided"));
    }
    if state.rate_limit_next > 0 {
        state.rate_limit_next -= 1;
        state.rate_limited_at.push(Instant::now());
        let (status, value) = error(429, "rate_limit_error", "rate_limit", "Too many requests");
        return (status, value, false, Some(state.retry_after_secs), false);
    }
    if method == "GET" {
        let params = match parse_form(query) {
            Ok(p) => p,
            Err(e) => return plain(error(400, "invalid_request_error", "parameter_invalid", &e)),
        };
        return plain(get(state, path, &params));
    }
    if method != "POST" && method != "DELETE" {
        return plain(error(404, "invalid_request_error", "resource_missing", "Unrecognized request URL"));
    }
    if (method == "POST" || !body.is_empty()) && content_type.as_deref() != Some("application/x-www-form-urlencoded") {
        return plain(error(400, "invalid_request_error", "content_type_invalid", "Content-Type must be application/x-www-form-urlencoded"));
    }
    let params = match std::str::from_utf8(body).map_err(|e| e.to_string()).and_then(parse_form) {
        Ok(p) => p,
        Err(e) => return plain(error(400, "invalid_request_error", "parameter_invalid", &e)),
    };
    if method == "DELETE" {
        return plain(delete(state, path, &params));
    }
    // Stripe compares the parameters, not their order in the body.
    let mut sorted = params.clone();
    sorted.sort();
    let fingerprint = format!("{method} {path} {sorted:?}");
    if let Some(key) = &idempotency_key {
        if let Some((seen, status, value)) = state.idempotency.get(key) {
            if *seen != fingerprint {
                return plain(error(
                    400,
                    "idempotency_error",
                    "idempotency_key_in_use",
                    "Keys for idempotent requests can only be used with the same parameters they were first used with",
                ));
            }
            let (status, value) = (*status, value.clone());
            state.replays += 1;
            return (status, value, false, None, true);
        }
    }
    let (status, value) = post(state, path, &params);
    if let Some(key) = idempotency_key {
        state.idempotency.insert(key, (fingerprint, status, value.clone()));
    }
    let drop_connection = path == "/v1/billing/meter_events" && status == 200 && state.drop_after_accept > 0;
    if drop_connection {
        state.drop_after_accept -= 1;
    }
    (status, value, drop_connection, None, false)
}

/// Parameters as a map, refusing unknown and missing ones like Stripe.
fn check(params: &[(String, String)], required: &[&str], optional: &[&str]) -> Result<BTreeMap<String, String>, (u16, Value)> {
    let mut map = BTreeMap::new();
    for (key, value) in params {
        let known = required.contains(&key.as_str()) || optional.iter().any(|o| o == key || (o.ends_with('*') && key.starts_with(&o[..o.len() - 1])));
        if !known {
            return Err(error(400, "invalid_request_error", "parameter_unknown", &format!("Received unknown parameter: {key}")));
        }
        map.insert(key.clone(), value.clone());
    }
    for name in required {
        if !map.contains_key(*name) {
            return Err(error(400, "invalid_request_error", "parameter_missing", &format!("Missing required param: {name}.")));
        }
    }
    Ok(map)
}

fn metadata_of(params: &BTreeMap<String, String>) -> Value {
    let map: serde_json::Map<String, Value> =
        params.iter().filter_map(|(k, v)| Some((k.strip_prefix("metadata[")?.strip_suffix(']')?.to_string(), Value::from(v.clone())))).collect();
    Value::Object(map)
}

fn post(state: &mut State, path: &str, params: &[(String, String)]) -> (u16, Value) {
    state.next_id += 1;
    let n = state.next_id;
    match path {
        "/v1/customers" => {
            let p = match check(params, &[], &["name", "email", "description", "metadata[*"]) {
                Ok(p) => p,
                Err(e) => return e,
            };
            let id = format!("cus_stub{n}");
            let customer = customer_json(&id, p.get("name").map(String::as_str), metadata_of(&p));
            state.customers.insert(id, customer.clone());
            (200, customer)
        }
        "/v1/subscriptions" => {
            let p = match check(params, &["customer", "items[0][price]"], &["metadata[*"]) {
                Ok(p) => p,
                Err(e) => return e,
            };
            if !state.customers.contains_key(&p["customer"]) {
                return error(400, "invalid_request_error", "resource_missing", &format!("No such customer: '{}'", p["customer"]));
            }
            let id = format!("sub_stub{n}");
            let subscription = subscription_json(&id, &format!("si_stub{n}"), &p["customer"], &p["items[0][price]"], metadata_of(&p));
            state.subscriptions.insert(id, subscription.clone());
            (200, subscription)
        }
        "/v1/billing/meter_events" => {
            let p = match check(params, &["event_name", "payload[stripe_customer_id]", "payload[value]"], &["identifier", "timestamp"]) {
                Ok(p) => p,
                Err(e) => return e,
            };
            if !METERS.contains(&p["event_name"].as_str()) {
                return error(400, "invalid_request_error", "resource_missing", &format!("No active meter was found for event_name {}", p["event_name"]));
            }
            let customer = p["payload[stripe_customer_id]"].clone();
            if !state.customers.contains_key(&customer) {
                return error(400, "invalid_request_error", "resource_missing", &format!("No such customer: '{customer}'"));
            }
            let Ok(value) = p["payload[value]"].parse::<i64>() else {
                return error(400, "invalid_request_error", "parameter_invalid", "payload[value] must be an integer");
            };
            let identifier = p.get("identifier").cloned().unwrap_or_else(|| format!("stub_{n}"));
            if state.identifiers.get(&identifier).is_some_and(|at| at.elapsed() < Duration::from_secs(24 * 3600)) {
                return error(400, "invalid_request_error", "resource_already_exists", &format!("An event already exists with identifier {identifier}"));
            }
            let now = unix_now();
            let timestamp = match p.get("timestamp").map(|t| t.parse::<i64>()) {
                None => now,
                Some(Ok(t)) if t >= now - 35 * 86_400 && t <= now + 300 => t,
                Some(Ok(_)) => {
                    return error(
                        400,
                        "invalid_request_error",
                        "parameter_invalid",
                        "timestamp must be within the past 35 days or up to 5 minutes in the future",
                    )
                }
                Some(Err(_)) => return error(400, "invalid_request_error", "parameter_invalid", "timestamp must be an integer"),
            };
            state.identifiers.insert(identifier.clone(), Instant::now());
            state.events.push(MeterEvent { identifier: identifier.clone(), event_name: p["event_name"].clone(), customer: customer.clone(), value, timestamp });
            (
                200,
                json!({ "object": "billing.meter_event", "identifier": identifier, "event_name": p["event_name"], "timestamp": timestamp,
                "created": now, "livemode": false, "payload": { "stripe_customer_id": customer, "value": value.to_string() } }),
            )
        }
        _ => match path.strip_prefix("/v1/subscriptions/") {
            Some(id) if !id.contains('/') => update_subscription(state, id, params),
            _ => error(404, "invalid_request_error", "resource_missing", &format!("Unrecognized request URL (POST: {path})")),
        },
    }
}

/// `POST /v1/subscriptions/{id}`: move the item named by `items[0][id]` to `items[0][price]`.
fn update_subscription(state: &mut State, id: &str, params: &[(String, String)]) -> (u16, Value) {
    let p = match check(params, &["items[0][id]", "items[0][price]"], &["proration_behavior", "metadata[*"]) {
        Ok(p) => p,
        Err(e) => return e,
    };
    if let Some(behavior) = p.get("proration_behavior") {
        if !["create_prorations", "none", "always_invoice"].contains(&behavior.as_str()) {
            return error(400, "invalid_request_error", "parameter_invalid", &format!("Invalid proration_behavior: {behavior}"));
        }
    }
    let Some(subscription) = state.subscriptions.get_mut(id) else {
        return error(404, "invalid_request_error", "resource_missing", &format!("No such subscription: '{id}'"));
    };
    if subscription["status"] == "canceled" {
        return error(400, "invalid_request_error", "resource_missing", "A canceled subscription can only update its cancellation_details and metadata.");
    }
    if subscription["items"]["data"][0]["id"] != p["items[0][id]"].as_str() {
        return error(400, "invalid_request_error", "resource_missing", &format!("No such subscription item: '{}'", p["items[0][id]"]));
    }
    let (item, now) = (p["items[0][id]"].clone(), unix_now());
    subscription["items"]["data"][0] = item_json(&item, id, &p["items[0][price]"], now);
    state.price_changes += 1;
    (200, subscription.clone())
}

/// `DELETE /v1/subscriptions/{id}`: cancel it at once.
fn delete(state: &mut State, path: &str, params: &[(String, String)]) -> (u16, Value) {
    if let Err(e) = check(params, &[], &["invoice_now", "prorate", "cancellation_details[*"]) {
        return e;
    }
    let id = path.strip_prefix("/v1/subscriptions/").unwrap_or_default();
    let Some(subscription) = state.subscriptions.get_mut(id) else {
        return error(404, "invalid_request_error", "resource_missing", &format!("Unrecognized request URL (DELETE: {path})"));
    };
    if subscription["status"] == "canceled" {
        return error(400, "invalid_request_error", "resource_missing", &format!("No such subscription: '{id}'"));
    }
    subscription["status"] = json!("canceled");
    state.cancellations += 1;
    (200, subscription.clone())
}

fn get(state: &State, path: &str, params: &[(String, String)]) -> (u16, Value) {
    if path == "/v1/billing/meters" {
        if let Err(e) = check(params, &[], &["limit", "status"]) {
            return e;
        }
        return (200, list("/v1/billing/meters", METERS.iter().map(|name| meter_json(name)).collect()));
    }
    if let Some(kind) = path.strip_prefix("/v1/").and_then(|rest| rest.strip_suffix("/search")) {
        let p = match check(params, &["query"], &["limit", "page"]) {
            Ok(p) => p,
            Err(e) => return e,
        };
        // Only the one form the hub uses: `metadata['KEY']:'VALUE'`.
        let Some((key, value)) = p["query"].strip_prefix("metadata['").and_then(|q| q.split_once("']:'")).and_then(|(k, v)| Some((k, v.strip_suffix('\'')?)))
        else {
            return error(400, "invalid_request_error", "parameter_invalid", &format!("unsupported search query: {}", p["query"]));
        };
        let objects = match kind {
            "customers" => &state.customers,
            "subscriptions" => &state.subscriptions,
            _ => return error(404, "invalid_request_error", "resource_missing", &format!("Unrecognized request URL (GET: {path})")),
        };
        let data: Vec<Value> = objects.values().filter(|o| o["metadata"][key] == value).cloned().collect();
        return (200, json!({ "object": "search_result", "data": data, "has_more": false, "next_page": null, "url": path }));
    }
    if let Some(name) = path.strip_prefix("/v1/billing/meters/mtr_").and_then(|rest| rest.strip_suffix("/event_summaries")) {
        let p = match check(params, &["customer", "start_time", "end_time"], &["value_grouping_window", "limit"]) {
            Ok(p) => p,
            Err(e) => return e,
        };
        let (Ok(start), Ok(end)) = (p["start_time"].parse::<i64>(), p["end_time"].parse::<i64>()) else {
            return error(400, "invalid_request_error", "parameter_invalid", "start_time and end_time must be integers");
        };
        let total: i64 = state
            .events
            .iter()
            .filter(|e| e.event_name == name && e.customer == p["customer"] && e.timestamp >= start && e.timestamp < end)
            .map(|e| e.value)
            .sum();
        let summary = json!({ "id": format!("mtrusg_{name}_{start}"), "object": "billing.meter_event_summary", "aggregated_value": total,
            "start_time": start, "end_time": end, "livemode": false, "meter": format!("mtr_{name}") });
        return (200, list(path, vec![summary]));
    }
    if let Some(id) = path.strip_prefix("/v1/subscriptions/").filter(|id| !id.contains('/')) {
        if let Err(e) = check(params, &[], &["expand[*"]) {
            return e;
        }
        return match state.subscriptions.get(id) {
            Some(subscription) => (200, subscription.clone()),
            None => error(404, "invalid_request_error", "resource_missing", &format!("No such subscription: '{id}'")),
        };
    }
    error(404, "invalid_request_error", "resource_missing", &format!("Unrecognized request URL (GET: {path})"))
}
