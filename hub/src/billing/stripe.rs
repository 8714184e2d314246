//! Handing billing to Stripe: customer and subscription sync, usage as meter events through
//! a durable outbox, and Stripe's webhooks (signature check and event processing).
//!
//! Requests and answers are async-stripe's (1.0 line, pinned at 1.0.0-rc.10) typed ones:
//! `stripe_core` for customers, `stripe_billing` for subscriptions, meters, meter events
//! and their summaries, `stripe_shared` for the objects they answer with. They travel
//! through [`Client`], this module's implementation of `stripe_client_core::StripeClient`
//! on the hub's own hyper + rustls stack, not async-stripe's bundled client: that one reads
//! only `Stripe-Should-Retry` from an answer, never `Retry-After`, and may retry by its own
//! strategy, while the outbox must see a 429's wait and decide every resend itself. Every
//! write carries an `Idempotency-Key` that is a function of (org, action, version) or of
//! the meter event's identifier, so a retry, a crash or a restart never creates a second
//! object or a second event while Stripe remembers the key (24 h). Past that window a
//! request whose fate is unknown is never resent blindly: the outbox asks Stripe's meter
//! event summaries first.
//!
//! This module must not know sled: rows and events go through `store::Store`.

use super::plans::{self, Status};
use super::{Meter, HOUR_MS};
use crate::config::Config;
use crate::store::{self, OrderMarks, OutboxRow, OutboxState, Recorded, StripeEvent};
use crate::Hub;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::Value;
use sha2::Digest;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use stripe_billing::billing_meter::ListBillingMeter;
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
use stripe_billing::billing_meter_event_summary::{ListIdBillingMeterEventSummary, ListIdBillingMeterEventSummaryValueGroupingWindow};
use stripe_billing::subscription::{
    CancelSubscription, CreateSubscription, CreateSubscriptionItems, RetrieveSubscription, SearchSubscription, UpdateSubscription, UpdateSubscriptionItems,
    UpdateSubscriptionProrationBehavior,
};
use stripe_billing::SubscriptionStatus;
use stripe_client_core::{CustomizedStripeRequest, IdempotencyKey, RequestStrategy, StripeClient, StripeClientErr, StripeMethod, StripeRequest};
use stripe_core::customer::{CreateCustomer, SearchCustomer};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

/// Largest age of a webhook signature's timestamp (either way), in seconds.
pub const SIGNATURE_TOLERANCE_SECS: i64 = 300;
/// How long Stripe remembers a meter event identifier and an idempotency key.
pub const IDENTIFIER_WINDOW_MS: i64 = 24 * HOUR_MS;
/// How old a meter event's timestamp may be for Stripe to accept it.
pub const METER_EVENT_WINDOW_MS: i64 = 35 * 24 * HOUR_MS;
/// Safety margin kept inside both windows (clock skew, time in flight).
const WINDOW_MARGIN_MS: i64 = HOUR_MS;
/// Ledger entries read per pass.
const LEDGER_BATCH: usize = 500;
/// Per-request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait a `Retry-After` may impose.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// Wait after a 429 without a usable `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(2);

/// The Stripe event name of a meter: Stripe meters must be created with these names.
pub fn event_name(meter: Meter) -> String {
    format!("gantry_{}", meter.name())
}

/// The meter event identifier (and idempotency key) of a ledger entry: `gantry_` and the
/// first 32 hex digits of SHA-256 over org, meter, hour and source. The same usage always
/// gets the same identifier, whichever pass or restart queues it.
pub fn identifier(org: &str, meter: Meter, hour_ms: i64, source: &str) -> String {
    let mut hash = sha2::Sha256::new();
    for part in [org.as_bytes(), meter.name().as_bytes(), hour_ms.to_string().as_bytes(), source.as_bytes()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    let digest = hash.finalize();
    format!("gantry_{}", &gantry_shared::token::hex(&digest)[..32])
}

// ---- webhook signatures ----

/// Why a `Stripe-Signature` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is missing")]
    Missing,
    #[error("the Stripe-Signature header is malformed: {0}")]
    Malformed(&'static str),
    #[error("the signature timestamp is {age_secs} s away from now (tolerance {SIGNATURE_TOLERANCE_SECS} s)")]
    OutsideTolerance { age_secs: i64 },
    #[error("no v1 signature matches the body")]
    Mismatch,
}

/// Lowercase hex HMAC-SHA256 of `"{t}.{body}"` under `secret`: Stripe's `v1` scheme.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    gantry_shared::token::hex(context.sign().as_ref())
}

/// Check a `Stripe-Signature` header (`t=...,v1=...,v1=...`) against the raw body: every
/// `v1` is compared in constant time, and the timestamp must be within
/// [`SIGNATURE_TOLERANCE_SECS`] of `now_secs`. Returns the signed timestamp.
pub fn verify_signature(header: Option<&str>, body: &[u8], secret: &[u8], now_secs: i64) -> Result<i64, SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        let (key, value) = part.trim().split_once('=').ok_or(SignatureError::Malformed("expected key=value pairs"))?;
        match key {
            "t" => timestamp = Some(value.parse::<i64>().map_err(|_| SignatureError::Malformed("t is not a Unix time"))?),
            "v1" => candidates.push(value),
            // Other schemes (v0, test-mode signatures) are not trusted.
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed("no t= value"))?;
    if candidates.is_empty() {
        return Err(SignatureError::Malformed("no v1= value"));
    }
    let age_secs = now_secs.saturating_sub(timestamp);
    if age_secs.abs() > SIGNATURE_TOLERANCE_SECS {
        return Err(SignatureError::OutsideTolerance { age_secs });
    }
    let expected = sign(secret, timestamp, body);
    // Compare with every candidate, without stopping at the first match.
    let matched = candidates.iter().fold(subtle::Choice::from(0), |found, candidate| found | candidate.as_bytes().ct_eq(expected.as_bytes()));
    if bool::from(matched) {
        Ok(timestamp)
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// The webhook signing secret from `stripe.webhook_secret_file`, `None` when not set.
pub fn webhook_secret(config: &Config) -> Result<Option<Vec<u8>>, String> {
    let Some(path) = &config.stripe.webhook_secret_file else { return Ok(None) };
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading the Stripe webhook secret {}: {e}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("the Stripe webhook secret file {} is empty", path.display()));
    }
    Ok(Some(secret.as_bytes().to_vec()))
}

// ---- webhook events ----

/// What a webhook event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOutcome {
    /// First time seen; `effect` says what it changed (or why it changed nothing).
    Processed { effect: String },
    /// Already processed: nothing done.
    Duplicate,
}

/// Why an event could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("the event is not valid: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// What an event type asks of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    PaymentFailed,
    PaymentSucceeded,
    /// A subscription's status in Stripe (`None`: deleted).
    SubscriptionStatus(Option<Status>),
    /// An event this hub does not act on.
    None,
}

fn action_of(event_type: &str, object: &Value) -> Action {
    match event_type {
        "invoice.payment_failed" => Action::PaymentFailed,
        "invoice.paid" | "invoice.payment_succeeded" => Action::PaymentSucceeded,
        "customer.subscription.deleted" => Action::SubscriptionStatus(None),
        "customer.subscription.updated" => match object.get("status").and_then(Value::as_str) {
            Some("canceled") => Action::SubscriptionStatus(None),
            Some("unpaid") => Action::SubscriptionStatus(Some(Status::Unpaid)),
            // trialing, active, past_due, incomplete: the payment events drive those.
            _ => Action::None,
        },
        _ => Action::None,
    }
}

/// Whether an event applies given the org's ordering marks (Stripe's `created`, seconds),
/// the marks after it, and a word on what it does. A payment event older than the newest
/// applied event of the opposite outcome is stale: a late `payment_failed` does not undo
/// a newer `paid`, nor a late `paid` a newer failure. Subscription status events apply in
/// `created` order per org.
fn decide(action: Action, created: i64, mut marks: OrderMarks) -> (bool, OrderMarks, String) {
    match action {
        Action::PaymentFailed if created < marks.payment_succeeded => (false, marks, "stale: a newer payment succeeded".into()),
        Action::PaymentFailed => {
            marks.payment_failed = marks.payment_failed.max(created);
            (true, marks, "payment_failed".into())
        }
        Action::PaymentSucceeded if created < marks.payment_failed => (false, marks, "stale: a newer payment failed".into()),
        Action::PaymentSucceeded => {
            marks.payment_succeeded = marks.payment_succeeded.max(created);
            (true, marks, "payment_succeeded".into())
        }
        Action::SubscriptionStatus(_) if created < marks.subscription => (false, marks, "stale: a newer subscription update was applied".into()),
        Action::SubscriptionStatus(status) => {
            marks.subscription = created;
            (true, marks, format!("subscription_status: {}", status.map_or("canceled", Status::name)))
        }
        Action::None => (false, marks, "ignored".into()),
    }
}

/// The org an event's object belongs to: by the Stripe customer recorded on a
/// subscription, else by the object's `metadata.gantry_org` if that org has a subscription.
fn org_of(hub: &Hub, object: &Value) -> Result<Option<String>, store::Error> {
    let customer = object.get("customer").and_then(Value::as_str);
    let subscriptions = plans::subscriptions(hub)?;
    if let Some(customer) = customer {
        if let Some(s) = subscriptions.iter().find(|s| s.stripe_customer_id.as_deref() == Some(customer)) {
            return Ok(Some(s.org.clone()));
        }
    }
    let tagged = object.pointer("/metadata/gantry_org").and_then(Value::as_str);
    Ok(tagged.and_then(|org| subscriptions.iter().find(|s| s.org == org)).map(|s| s.org.clone()))
}

/// Process one verified event body: record its id with its ordering marks (one store
/// transaction), then apply its effect. An id seen before does nothing. If applying fails
/// the record is removed again, so Stripe's retry applies it.
pub fn process_event(hub: &Hub, body: &[u8], now_ms: i64) -> Result<EventOutcome, EventError> {
    let event: Value = serde_json::from_slice(body).map_err(|e| EventError::Invalid(format!("not JSON: {e}")))?;
    let text = |name: &str| event.get(name).and_then(Value::as_str).map(str::to_string).ok_or_else(|| EventError::Invalid(format!("no {name:?}")));
    let id = text("id")?;
    let event_type = text("type")?;
    let created = event.get("created").and_then(Value::as_i64).ok_or_else(|| EventError::Invalid("no \"created\"".into()))?;
    let object = event.pointer("/data/object").cloned().unwrap_or(Value::Null);
    let action = action_of(&event_type, &object);
    let org = if action == Action::None { None } else { org_of(hub, &object)? };
    let record = StripeEvent {
        id: id.clone(),
        event_type: event_type.clone(),
        created,
        org: org.clone(),
        effect: if action == Action::None { "ignored".into() } else { "ignored: no org has this customer".into() },
        received_at_ms: now_ms,
        pending: false,
    };
    let apply = match hub.store.stripe_record_event(&record, |marks| decide(action, created, marks))? {
        Recorded::Duplicate(_) => return Ok(EventOutcome::Duplicate),
        Recorded::New { apply } => apply,
    };
    let stored = hub.store.stripe_event(&id)?.map_or(record.effect, |e| e.effect);
    let Some(org) = org.filter(|_| apply) else {
        tracing::info!(event_id = %id, %event_type, effect = %stored, "stripe event recorded");
        return Ok(EventOutcome::Processed { effect: stored });
    };
    let at_ms = created.saturating_mul(1000);
    // The event is recorded as pending with its decision; the subscription write below
    // records the event id with the change, so applying again after a crash changes nothing.
    let applied = match action {
        Action::PaymentFailed => plans::apply_payment_event(hub, &org, at_ms, &id, false).map(drop),
        Action::PaymentSucceeded => plans::apply_payment_event(hub, &org, at_ms, &id, true).map(drop),
        Action::SubscriptionStatus(status) => {
            let status = status.unwrap_or(Status::Canceled);
            match plans::subscription(hub, &org)? {
                Some(s) if s.status != status && s.status != Status::Canceled => plans::apply_status_event(hub, &org, status, &id).map(drop),
                _ => Ok(()),
            }
        }
        Action::None => Ok(()),
    };
    // On failure the event stays pending: Stripe's retry applies it.
    applied?;
    hub.store.stripe_event_applied(&id)?;
    tracing::info!(event_id = %id, %event_type, %org, effect = %stored, "stripe event applied");
    Ok(EventOutcome::Processed { effect: stored })
}

// ---- the API client ----

/// The secret key and base URL of a configured hub.
#[derive(Clone)]
pub struct Settings {
    pub api_base: String,
    secret_key: String,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings").field("api_base", &self.api_base).field("secret_key", &"<redacted>").finish()
    }
}

impl Settings {
    /// From `GANTRY_STRIPE_SECRET_KEY` (already in the config) or `stripe.secret_key_file`;
    /// `None` when neither is set: Stripe is off.
    pub fn from_config(config: &Config) -> Result<Option<Settings>, String> {
        let key = match (&config.stripe.secret_key, &config.stripe.secret_key_file) {
            (Some(key), _) => key.0.clone(),
            (None, Some(path)) => {
                std::fs::read_to_string(path).map_err(|e| format!("reading the Stripe secret key {}: {e}", path.display()))?.trim().to_string()
            }
            (None, None) => return Ok(None),
        };
        if key.is_empty() {
            return Err("the Stripe secret key is empty".into());
        }
        Ok(Some(Settings { api_base: config.stripe.api_base.trim_end_matches('/').to_string(), secret_key: key }))
    }
}

/// Why a Stripe request did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("stripe rate limited the request; retry after {0:?}")]
    RateLimited(Duration),
    #[error("stripe answered {status}: {code}: {message}")]
    Refused { status: u16, code: String, message: String },
    /// No answer (connection refused or dropped, timeout): the request may or may not have
    /// been processed.
    #[error("no answer from stripe: {0}")]
    Transport(String),
    /// Stripe answered 2xx, so it processed the request, but the body is not the object
    /// async-stripe's typed response expects.
    #[error("stripe's answer could not be read: {0}")]
    Unreadable(String),
}

impl StripeClientErr for CallError {
    fn deserialize_err(msg: impl std::fmt::Display) -> Self {
        CallError::Unreadable(msg.to_string())
    }
}

type HttpClient = hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The transport under async-stripe's typed requests: implements
/// [`stripe_client_core::StripeClient`] on the hub's hyper + rustls stack. Every request
/// is sent exactly once, whatever [`RequestStrategy`] it carries (the outbox decides about
/// resends, never the transport); `RequestStrategy::Idempotent` becomes the
/// `Idempotency-Key` header; a 429 comes back as [`CallError::RateLimited`] with the wait
/// its `Retry-After` asks for.
#[derive(Clone)]
pub struct Client {
    settings: Settings,
    http: HttpClient,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("settings", &self.settings).finish()
    }
}

impl Client {
    /// A client for the Stripe API at `settings.api_base` (TLS by rustls on ring with the
    /// webpki roots; plain HTTP for a local stand-in).
    pub fn new(settings: Settings) -> Result<Client, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("stripe TLS setup: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
        Ok(Client { settings, http })
    }
}

impl StripeClient for Client {
    type Err = CallError;

    async fn execute(&self, request: CustomizedStripeRequest) -> Result<Bytes, CallError> {
        let (request, config) = request.into_pieces();
        let idempotency_key = match config.request_strategy {
            Some(RequestStrategy::Idempotent(key)) => Some(key),
            // `Once`, and the retrying strategies, which this client never retries.
            _ => None,
        };
        let method = match request.method {
            StripeMethod::Get => hyper::Method::GET,
            StripeMethod::Post => hyper::Method::POST,
            StripeMethod::Delete => hyper::Method::DELETE,
        };
        let mut uri = format!("{}/v1{}", self.settings.api_base, request.path);
        if let Some(query) = request.query.filter(|q| !q.is_empty()) {
            uri.push('?');
            uri.push_str(&query);
        }
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {}", self.settings.secret_key))
            .header(hyper::header::USER_AGENT, concat!("gantry-hub/", env!("CARGO_PKG_VERSION")))
            // The API version the typed responses were generated for.
            .header("Stripe-Version", stripe_client_core::VERSION.as_str());
        if request.body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        if let Some(key) = &idempotency_key {
            builder = builder.header("Idempotency-Key", key.as_str());
        }
        let http_request =
            builder.body(Full::new(Bytes::from(request.body.unwrap_or_default()))).map_err(|e| CallError::Transport(format!("building the request: {e}")))?;
        let exchange = async {
            let response = self.http.request(http_request).await.map_err(|e| CallError::Transport(error_text(&e)))?;
            let status = response.status().as_u16();
            let retry_after = response.headers().get(hyper::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
            let bytes = response.into_body().collect().await.map_err(|e| CallError::Transport(error_text(&e)))?.to_bytes();
            Ok::<_, CallError>((status, retry_after, bytes))
        };
        let timeout = config.timeout.unwrap_or(REQUEST_TIMEOUT);
        let (status, retry_after, bytes) = tokio::time::timeout(timeout, exchange).await.map_err(|_| CallError::Transport("timed out".into()))??;
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        if status == 429 {
            let wait = retry_after.map_or(DEFAULT_RETRY_AFTER, Duration::from_secs).min(MAX_RETRY_AFTER);
            return Err(CallError::RateLimited(wait));
        }
        // Stripe's error envelope `{"error": {"type", "code", "message"}}`.
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let field = |name: &str| value.pointer(&format!("/error/{name}")).and_then(Value::as_str).unwrap_or("").to_string();
        let code = if field("code").is_empty() { field("type") } else { field("code") };
        Err(CallError::Refused { status, code, message: field("message") })
    }
}

/// The strategy that sends a request once under `key` as its `Idempotency-Key`.
fn idempotent(key: &str) -> Result<RequestStrategy, CallError> {
    IdempotencyKey::new(key).map(RequestStrategy::Idempotent).map_err(|e| CallError::Transport(format!("idempotency key {key:?}: {e}")))
}

fn error_text(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `metadata[gantry_org] = org`: how Stripe objects name the org they belong to.
fn org_metadata(org: &str) -> HashMap<String, String> {
    HashMap::from([("gantry_org".to_string(), org.to_string())])
}

// ---- customer and subscription sync ----

/// Idempotency key of a sync action: deterministic per (org, action, version).
pub fn sync_key(org: &str, action: &str, version: &str) -> String {
    format!("gantry-{action}-{org}-{version}")
}

/// Create the Stripe customer of every subscribed org that has none (metadata
/// `gantry_org`), and a Stripe subscription when its plan names a Stripe price. Ids are
/// stored on the subscription. A plan change to a version with another Stripe price moves
/// the Stripe subscription's item to it (Stripe prorates), and a subscription canceled in
/// the hub is canceled in Stripe. Before creating, Stripe is searched for an object already
/// tagged with the org (made by an earlier run that died before storing its id, perhaps
/// more than 24 h ago when the idempotency key no longer protects), which is adopted. One
/// org's failure is logged and the others go on; a 429 stops the pass and is returned.
pub async fn sync(hub: &Hub, client: &Client) -> Result<(), CallError> {
    let subscriptions = match plans::subscriptions(hub) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "stripe sync: reading subscriptions failed");
            return Ok(());
        }
    };
    for s in subscriptions.into_iter().filter(|s| s.status != Status::Canceled || (s.stripe_subscription_id.is_some() && !s.stripe_canceled)) {
        let synced = if s.status == Status::Canceled { cancel_subscription(hub, client, &s).await } else { sync_org(hub, client, &s).await };
        match synced {
            Err(CallError::RateLimited(wait)) => return Err(CallError::RateLimited(wait)),
            Err(error) => tracing::warn!(org = %s.org, %error, "stripe sync failed"),
            Ok(()) => {}
        }
    }
    Ok(())
}

/// The price of a subscription's (single) item.
fn item_price(subscription: &stripe_billing::Subscription) -> Option<String> {
    subscription.items.data.first().map(|item| item.price.id.as_str().to_string())
}

async fn sync_org(hub: &Hub, client: &Client, s: &plans::Subscription) -> Result<(), CallError> {
    let store_error = |e: store::Error| CallError::Transport(format!("storing stripe ids: {e}"));
    let customer = match &s.stripe_customer_id {
        Some(id) => id.clone(),
        None => {
            let id = match find_tagged_customer(client, &s.org).await? {
                Some(id) => id,
                None => {
                    let create = CreateCustomer::new().name(s.org.clone()).metadata(org_metadata(&s.org));
                    let customer = create.customize().request_strategy(idempotent(&sync_key(&s.org, "customer", "v1"))?).send(client).await?;
                    customer.id.as_str().to_string()
                }
            };
            plans::set_stripe_ids(hub, &s.org, Some(id.clone()), None).map_err(store_error)?;
            tracing::info!(org = %s.org, customer = %id, "stripe customer created");
            id
        }
    };
    let plan = hub.store.plan_version(&s.plan_id, s.plan_version).map_err(store_error)?;
    let Some(price) = plan.and_then(|p| p.stripe_price_id) else { return Ok(()) };
    let version = format!("{}-v{}", s.plan_id, s.plan_version);
    if let Some(id) = &s.stripe_subscription_id {
        if s.stripe_price_synced.as_deref() == Some(price.as_str()) {
            return Ok(());
        }
        return change_price(hub, client, &s.org, id, &price, &version).await;
    }
    let (id, on) = match find_tagged_subscription(client, &s.org).await? {
        // An adopted subscription may be on an older price: the next pass compares.
        Some(found) => (found.id.as_str().to_string(), item_price(&found)),
        None => {
            let mut item = CreateSubscriptionItems::new();
            item.price = Some(price.clone());
            let create = CreateSubscription::new().customer(customer).items(vec![item]).metadata(org_metadata(&s.org));
            let created = create.customize().request_strategy(idempotent(&sync_key(&s.org, "subscription", &version))?).send(client).await?;
            (created.id.as_str().to_string(), item_price(&created))
        }
    };
    plans::set_stripe_ids(hub, &s.org, None, Some(id.clone())).map_err(store_error)?;
    tracing::info!(org = %s.org, subscription = %id, "stripe subscription created");
    plans::set_stripe_synced(hub, &s.org, on, false).map_err(store_error)?;
    Ok(())
}

/// Move the Stripe subscription's (single) item to `price`: read the item first, so a
/// subscription already on it (changed by an earlier pass that died before recording it)
/// is only recorded.
async fn change_price(hub: &Hub, client: &Client, org: &str, id: &str, price: &str, version: &str) -> Result<(), CallError> {
    let store_error = |e: store::Error| CallError::Transport(format!("storing stripe sync state: {e}"));
    let current = RetrieveSubscription::new(id).send(client).await?;
    let item = current.items.data.first().ok_or_else(|| CallError::Unreadable(format!("subscription {id} has no item")))?;
    if item.price.id.as_str() != price {
        let mut change = UpdateSubscriptionItems::new();
        change.id = Some(item.id.as_str().to_string());
        change.price = Some(price.to_string());
        let update = UpdateSubscription::new(id).items(vec![change]).proration_behavior(UpdateSubscriptionProrationBehavior::CreateProrations);
        update.customize().request_strategy(idempotent(&sync_key(org, "price", version))?).send(client).await?;
        tracing::info!(%org, subscription = %id, %price, "stripe subscription moved to the plan's new price");
    }
    plans::set_stripe_synced(hub, org, Some(price.to_string()), false).map_err(store_error)
}

/// Cancel in Stripe a subscription canceled in the hub (unless Stripe has it canceled
/// already, e.g. it told the hub so).
async fn cancel_subscription(hub: &Hub, client: &Client, s: &plans::Subscription) -> Result<(), CallError> {
    let Some(id) = &s.stripe_subscription_id else { return Ok(()) };
    let current = RetrieveSubscription::new(id.as_str()).send(client).await?;
    if current.status != SubscriptionStatus::Canceled {
        CancelSubscription::new(id.as_str()).send(client).await?;
        tracing::info!(org = %s.org, subscription = %id, "stripe subscription canceled");
    }
    plans::set_stripe_synced(hub, &s.org, None, true).map_err(|e| CallError::Transport(format!("storing stripe sync state: {e}")))
}

/// The search query for objects whose metadata names `org`. Org ids are slugs, so they
/// need no quoting.
fn tagged_query(org: &str) -> String {
    format!("metadata['gantry_org']:'{org}'")
}

/// The id of a Stripe customer tagged with `org`, through Stripe's search API.
async fn find_tagged_customer(client: &Client, org: &str) -> Result<Option<String>, CallError> {
    let found = SearchCustomer::new(tagged_query(org)).limit(1).send(client).await?;
    Ok(found.data.first().map(|c| c.id.as_str().to_string()))
}

/// A Stripe subscription tagged with `org`, through Stripe's search API.
async fn find_tagged_subscription(client: &Client, org: &str) -> Result<Option<stripe_billing::Subscription>, CallError> {
    let found = SearchSubscription::new(tagged_query(org)).limit(1).send(client).await?;
    Ok(found.data.into_iter().next())
}

// ---- the meter-event outbox ----

/// Test hook: called after Stripe answered a meter event with 2xx and before the outbox
/// records it; returning `true` abandons the pass there, as if the exporter died.
pub type AfterSendHook = Arc<dyn Fn(&OutboxRow) -> bool + Send + Sync>;

/// Queue the ledger entries past the cursor as outbox rows (gauges are skipped: they are
/// invoiced from the ledger, not summed by Stripe). Rows and cursor move in one
/// transaction. Returns how many entries were read.
pub fn enqueue(hub: &Hub, now_ms: i64) -> Result<usize, store::Error> {
    let cursor = hub.store.stripe_cursor()?;
    let entries = hub.store.ledger_since(cursor, LEDGER_BATCH)?;
    let Some(last) = entries.last().map(|e| e.seq) else { return Ok(0) };
    let rows: Vec<OutboxRow> = entries
        .iter()
        .filter(|e| !e.meter.is_gauge())
        .map(|e| OutboxRow {
            identifier: identifier(&e.org, e.meter, e.hour_ms, &e.source),
            seq: e.seq,
            org: e.org.clone(),
            meter: e.meter,
            hour_ms: e.hour_ms,
            source: e.source.clone(),
            quantity: e.quantity,
            state: OutboxState::Pending,
            created_at_ms: now_ms,
            sent_at_ms: None,
            first_sent_at_ms: None,
            confirmed_at_ms: None,
            attempts: 0,
            note: None,
        })
        .collect();
    hub.store.stripe_enqueue(cursor, last, &rows)?;
    Ok(entries.len())
}

/// What to do with a row now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Send (or resend with the same identifier and key: Stripe still remembers it).
    Send,
    /// Its first request left more than 24 h ago with no known outcome: ask Stripe first.
    Reconcile,
    /// Not sendable as a meter event: to the invoice-adjustment fallback.
    Fallback(&'static str),
    /// Nothing to do.
    Done,
}

/// The plan for `row` at `now_ms` (pure).
pub fn plan_for(row: &OutboxRow, now_ms: i64) -> Plan {
    match row.state {
        OutboxState::Confirmed | OutboxState::Fallback | OutboxState::NeedsReview => Plan::Done,
        OutboxState::Sent if row.first_sent_at_ms.is_some_and(|at| now_ms - at >= IDENTIFIER_WINDOW_MS - WINDOW_MARGIN_MS) => Plan::Reconcile,
        _ if now_ms - row.hour_ms >= METER_EVENT_WINDOW_MS - WINDOW_MARGIN_MS => {
            // A request that may have gone through is reconciled before any fallback.
            if row.state == OutboxState::Sent {
                Plan::Reconcile
            } else {
                Plan::Fallback("too_old: past Stripe's 35-day meter event window")
            }
        }
        _ if row.quantity <= 0 => Plan::Fallback("correction: Stripe meter events take positive values only"),
        _ => Plan::Send,
    }
}

/// Send what is due: pending rows, and sent rows whose outcome is unknown (after a crash or
/// a lost answer: resent with the same identifier and key inside the 24 h window,
/// reconciled against Stripe's summaries after it). A 429 stops the pass and returns the
/// wait its `Retry-After` asks for.
pub async fn deliver(hub: &Hub, client: &Client, now_ms: i64, hook: Option<&AfterSendHook>) -> Result<Option<Duration>, store::Error> {
    let customers: BTreeMap<String, String> = plans::subscriptions(hub)?.into_iter().filter_map(|s| Some((s.org, s.stripe_customer_id?))).collect();
    let mut meters: Option<BTreeMap<String, String>> = None;
    for mut row in hub.store.stripe_open_rows()? {
        let plan = plan_for(&row, now_ms);
        if let Plan::Fallback(reason) = plan {
            row.state = OutboxState::Fallback;
            row.note = Some(reason.to_string());
            hub.store.stripe_put_row(&row)?;
            tracing::warn!(identifier = %row.identifier, org = %row.org, meter = %row.meter, quantity = row.quantity, reason, "stripe meter event to invoice adjustment");
            continue;
        }
        let Some(customer) = customers.get(&row.org) else { continue };
        if plan == Plan::Reconcile {
            if meters.is_none() {
                meters = Some(match list_meters(client).await {
                    Ok(m) => m,
                    Err(CallError::RateLimited(wait)) => return Ok(Some(wait)),
                    Err(error) => {
                        tracing::warn!(%error, "stripe meters could not be listed; reconciliation waits");
                        BTreeMap::new()
                    }
                });
            }
            match reconcile(hub, client, meters.as_ref(), customer, &row).await {
                Ok(()) => {}
                Err(ReconcileError::Call(CallError::RateLimited(wait))) => return Ok(Some(wait)),
                Err(ReconcileError::Call(error)) => tracing::warn!(identifier = %row.identifier, %error, "stripe reconciliation failed; retried next pass"),
                Err(ReconcileError::Store(error)) => return Err(error),
            }
            continue;
        }
        if plan != Plan::Send {
            continue;
        }
        let previous = row.clone();
        row.state = OutboxState::Sent;
        row.attempts += 1;
        row.sent_at_ms = Some(now_ms);
        row.first_sent_at_ms.get_or_insert(now_ms);
        // Durably "sent" before the request leaves: a crash from here on is reconciled.
        hub.store.stripe_put_row(&row)?;
        let payload = HashMap::from([("stripe_customer_id".to_string(), customer.clone()), ("value".to_string(), row.quantity.to_string())]);
        let event = CreateBillingMeterEvent::new(event_name(row.meter), payload).identifier(row.identifier.clone()).timestamp(row.hour_ms / 1000);
        let sent = match idempotent(&row.identifier) {
            Ok(strategy) => event.customize().request_strategy(strategy).send(client).await,
            Err(error) => Err(error),
        };
        match sent {
            // A 2xx whose body does not parse was still recorded by Stripe.
            answered @ (Ok(_) | Err(CallError::Unreadable(_))) => {
                if hook.is_some_and(|hook| hook(&row)) {
                    return Ok(None);
                }
                let note = match answered {
                    Err(error) => {
                        tracing::warn!(identifier = %row.identifier, %error, "stripe recorded a meter event with an unreadable answer");
                        Some(format!("stripe answered 2xx: {error}"))
                    }
                    Ok(_) => None,
                };
                confirm(hub, row, now_ms, note)?;
            }
            Err(CallError::RateLimited(wait)) => {
                // Stripe processed nothing: back to where the row stood.
                hub.store.stripe_put_row(&OutboxRow { attempts: row.attempts, ..previous })?;
                tracing::info!(wait_ms = wait.as_millis() as u64, "stripe rate limited meter events; waiting");
                return Ok(Some(wait));
            }
            Err(CallError::Refused { status, code, message }) if code == "resource_already_exists" || message.contains("already exists") => {
                tracing::debug!(status, identifier = %row.identifier, "stripe already has this meter event");
                confirm(hub, row, now_ms, Some("stripe already had this identifier".into()))?;
            }
            Err(CallError::Refused { status, code, message }) if (400..500).contains(&status) => {
                tracing::warn!(identifier = %row.identifier, status, %code, %message, "stripe refused a meter event");
                row.state = OutboxState::NeedsReview;
                row.note = Some(format!("stripe answered {status} {code}: {message}"));
                hub.store.stripe_put_row(&row)?;
            }
            Err(error) => {
                // 5xx or no answer: it may have been recorded; stays `sent` for the next pass.
                tracing::warn!(identifier = %row.identifier, %error, "stripe meter event outcome unknown");
                row.note = Some(error.to_string());
                hub.store.stripe_put_row(&row)?;
            }
        }
    }
    Ok(None)
}

fn confirm(hub: &Hub, mut row: OutboxRow, now_ms: i64, note: Option<String>) -> Result<(), store::Error> {
    row.state = OutboxState::Confirmed;
    row.confirmed_at_ms = Some(now_ms);
    row.note = note;
    hub.store.stripe_put_row(&row)
}

#[derive(Debug)]
enum ReconcileError {
    Call(CallError),
    Store(store::Error),
}

/// Stripe meter ids by event name.
async fn list_meters(client: &Client) -> Result<BTreeMap<String, String>, CallError> {
    let list = ListBillingMeter::new().limit(100).send(client).await?;
    Ok(list.data.into_iter().map(|meter| (meter.event_name, meter.id.as_str().to_string())).collect())
}

/// Decide a row whose request left more than 24 h ago with no known outcome, from Stripe's
/// hourly summary of its meter for the customer: if the summary equals what the outbox
/// has confirmed for that hour, none of the hour's unknown rows reached Stripe and they are
/// sent again (with a fresh window); if it equals confirmed plus every unknown row, they
/// all did; anything else is left to an operator (`needs_review`), never resent.
async fn reconcile(hub: &Hub, client: &Client, meters: Option<&BTreeMap<String, String>>, customer: &str, row: &OutboxRow) -> Result<(), ReconcileError> {
    let Some(meter_id) = meters.and_then(|m| m.get(&event_name(row.meter))) else {
        return Err(ReconcileError::Call(CallError::Refused {
            status: 404,
            code: "no_meter".into(),
            message: format!("no stripe meter has event name {}", event_name(row.meter)),
        }));
    };
    let start = row.hour_ms / 1000;
    let end = (row.hour_ms + HOUR_MS) / 1000;
    let summaries = ListIdBillingMeterEventSummary::new(meter_id.as_str(), customer, end, start)
        .value_grouping_window(ListIdBillingMeterEventSummaryValueGroupingWindow::Hour)
        .send(client)
        .await
        .map_err(ReconcileError::Call)?;
    // Meter values are integers here: the hub only ever sends whole units.
    let in_stripe: i64 = summaries.data.iter().map(|s| s.aggregated_value.round() as i64).sum();
    let same_hour: Vec<OutboxRow> = hub
        .store
        .stripe_outbox(&[])
        .map_err(ReconcileError::Store)?
        .into_iter()
        .filter(|r| r.org == row.org && r.meter == row.meter && r.hour_ms == row.hour_ms)
        .collect();
    let confirmed: i64 = same_hour.iter().filter(|r| r.state == OutboxState::Confirmed).map(|r| r.quantity).sum();
    let unknown: Vec<&OutboxRow> = same_hour.iter().filter(|r| r.state == OutboxState::Sent).collect();
    let unknown_total: i64 = unknown.iter().map(|r| r.quantity).sum();
    let now = crate::wall_ms();
    for r in unknown {
        let mut r = r.clone();
        if in_stripe == confirmed {
            // Never reached Stripe: send again. The old key is forgotten by Stripe, so the
            // new window starts now.
            r.state = OutboxState::Pending;
            r.first_sent_at_ms = None;
            r.note = Some("reconciled: not in stripe, resending".into());
        } else if in_stripe == confirmed + unknown_total {
            r.state = OutboxState::Confirmed;
            r.confirmed_at_ms = Some(now);
            r.note = Some("reconciled: found in stripe's summary".into());
        } else {
            r.state = OutboxState::NeedsReview;
            r.note = Some(format!("reconcile: stripe has {in_stripe} for the hour, outbox confirmed {confirmed} with {unknown_total} unknown"));
            tracing::warn!(identifier = %r.identifier, in_stripe, confirmed, unknown_total, "stripe meter event needs review");
        }
        hub.store.stripe_put_row(&r).map_err(ReconcileError::Store)?;
    }
    Ok(())
}

/// One exporter pass: sync customers and subscriptions, queue new ledger entries, send
/// what is due. Returns a wait imposed by a 429, if any.
pub async fn pass(hub: &Hub, client: &Client, hook: Option<&AfterSendHook>) -> Result<Option<Duration>, store::Error> {
    if let Err(CallError::RateLimited(wait)) = sync(hub, client).await {
        return Ok(Some(wait));
    }
    while enqueue(hub, crate::wall_ms())? == LEDGER_BATCH {}
    deliver(hub, client, crate::wall_ms(), hook).await
}

/// The exporter task, started by `run` when a Stripe secret key is configured: a pass every
/// `stripe.export_interval_ms` (sooner never; later after a 429's `Retry-After`), until
/// `stop` turns true. Errors are logged and the next pass tries again.
pub async fn run(hub: Arc<Hub>, mut stop: watch::Receiver<bool>) {
    let client = match Settings::from_config(&hub.config).and_then(|s| s.map(Client::new).transpose()) {
        Ok(Some(client)) => client,
        Ok(None) => return,
        Err(error) => {
            tracing::error!(%error, "stripe exporter not started");
            return;
        }
    };
    let interval = Duration::from_millis(hub.config.stripe.export_interval_ms.max(100));
    tracing::info!(api_base = %client.settings.api_base, "stripe exporter started");
    loop {
        let wait = match pass(&hub, &client, None).await {
            Ok(Some(retry_after)) => retry_after.max(Duration::from_millis(100)),
            Ok(None) => interval,
            Err(error) => {
                tracing::warn!(%error, "stripe export pass failed");
                interval
            }
        };
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Outbox rows per state, for reports and tests.
pub fn outbox_counts(hub: &Hub) -> Result<BTreeMap<&'static str, usize>, store::Error> {
    let mut counts = BTreeMap::new();
    for row in hub.store.stripe_outbox(&[])? {
        *counts.entry(row.state.name()).or_insert(0) += 1;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_test";

    #[test]
    fn a_valid_signature_passes_and_a_changed_byte_fails() {
        let body = br#"{"id":"evt_1"}"#;
        let header = format!("t=1000,v1={}", sign(SECRET, 1000, body));
        assert_eq!(verify_signature(Some(&header), body, SECRET, 1000), Ok(1000));
        assert_eq!(verify_signature(Some(&header), br#"{"id":"evt_2"}"#, SECRET, 1000), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature(Some(&header), body, b"whsec_other", 1000), Err(SignatureError::Mismatch));
    }

    #[test]
    fn the_tolerance_is_300_seconds_either_way() {
        let body = b"{}";
        let header = format!("t=1000,v1={}", sign(SECRET, 1000, body));
        assert!(verify_signature(Some(&header), body, SECRET, 1300).is_ok());
        assert_eq!(verify_signature(Some(&header), body, SECRET, 1301), Err(SignatureError::OutsideTolerance { age_secs: 301 }));
        assert!(verify_signature(Some(&header), body, SECRET, 699).is_err());
    }

    #[test]
    fn every_v1_is_tried_and_garbage_is_refused() {
        let body = b"{}";
        let good = sign(SECRET, 5, body);
        assert!(verify_signature(Some(&format!("t=5,v1={good},v1=00")), body, SECRET, 5).is_ok());
        assert!(verify_signature(Some(&format!("t=5,v1=00,v1={good}")), body, SECRET, 5).is_ok());
        assert_eq!(verify_signature(None, body, SECRET, 5), Err(SignatureError::Missing));
        assert!(matches!(verify_signature(Some("garbage"), body, SECRET, 5), Err(SignatureError::Malformed(_))));
        assert!(matches!(verify_signature(Some("t=5"), body, SECRET, 5), Err(SignatureError::Malformed(_))));
        assert!(matches!(verify_signature(Some(&format!("t=x,v1={good}")), body, SECRET, 5), Err(SignatureError::Malformed(_))));
        assert!(matches!(verify_signature(Some(&format!("t=5,v0={good}")), body, SECRET, 5), Err(SignatureError::Malformed(_))));
    }

    #[test]
    fn late_payment_events_do_not_undo_newer_ones() {
        let marks = OrderMarks::default();
        let (apply, marks, _) = decide(Action::PaymentSucceeded, 200, marks);
        assert!(apply);
        let (apply, marks, effect) = decide(Action::PaymentFailed, 100, marks);
        assert!(!apply, "{effect}");
        let (apply, marks, _) = decide(Action::PaymentFailed, 300, marks);
        assert!(apply);
        let (apply, _, _) = decide(Action::PaymentSucceeded, 250, marks);
        assert!(!apply);
    }

    #[test]
    fn identifiers_are_deterministic_and_distinct() {
        let a = identifier("acme", Meter::LogBytes, 3_600_000, "agent-1");
        assert_eq!(a, identifier("acme", Meter::LogBytes, 3_600_000, "agent-1"));
        assert_ne!(a, identifier("acme", Meter::LogBytes, 3_600_000, "agent-2"));
        assert_ne!(identifier("ab", Meter::Events, 0, "c"), identifier("a", Meter::Events, 0, "bc"));
        assert!(a.starts_with("gantry_") && a.len() == 39);
    }

    #[test]
    fn rows_are_resent_inside_the_window_and_reconciled_after_it() {
        let now = 100 * 24 * HOUR_MS;
        let row = OutboxRow {
            identifier: "gantry_x".into(),
            seq: 1,
            org: "acme".into(),
            meter: Meter::Events,
            hour_ms: now - 2 * HOUR_MS,
            source: "s".into(),
            quantity: 3,
            state: OutboxState::Sent,
            created_at_ms: now,
            sent_at_ms: Some(now - HOUR_MS),
            first_sent_at_ms: Some(now - HOUR_MS),
            confirmed_at_ms: None,
            attempts: 1,
            note: None,
        };
        assert_eq!(plan_for(&row, now), Plan::Send);
        assert_eq!(plan_for(&OutboxRow { first_sent_at_ms: Some(now - 24 * HOUR_MS), ..row.clone() }, now), Plan::Reconcile);
        let old = OutboxRow { hour_ms: now - 36 * 24 * HOUR_MS, state: OutboxState::Pending, first_sent_at_ms: None, ..row.clone() };
        assert!(matches!(plan_for(&old, now), Plan::Fallback(_)));
        assert_eq!(plan_for(&OutboxRow { state: OutboxState::Sent, ..old }, now), Plan::Reconcile);
        assert!(matches!(plan_for(&OutboxRow { quantity: -2, state: OutboxState::Pending, ..row }, now), Plan::Fallback(_)));
    }
}
