//! Stripe end to end: a real hub against the local Stripe stub (customer and subscription
//! sync, meter events through the outbox, a crash between Stripe's answer and the outbox
//! commit, 429s), and Stripe's webhooks (signature rules, duplicates, order, lifecycle).

#![allow(clippy::unwrap_used)]

use gantry_hub::billing::plans::{self, PlanRequest, Status};
use gantry_hub::billing::stripe;
use gantry_hub::billing::Meter;
use gantry_hub::config::RedactedSecret;
use gantry_hub::store::{EntryKind, LedgerEntry, OutboxState};
use gantry_tests::stripe_stub::{StripeStub, SECRET_KEY};
use gantry_tests::{wait_for, Api, TempDir, TestHub};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const WEBHOOK_SECRET: &str = "whsec_gantry_test_secret";

/// Files holding the webhook secret, in their own directory.
fn secret_file(dir: &Path) -> PathBuf {
    let path = dir.join("stripe-webhook.secret");
    std::fs::write(&path, format!("{WEBHOOK_SECRET}\n")).unwrap();
    path
}

/// A hub with the webhook secret, and with the stub as its Stripe when given.
async fn start_hub(data: &Path, secrets: &Path, stub: Option<&StripeStub>) -> TestHub {
    let webhook_secret_file = secret_file(secrets);
    let base = stub.map(StripeStub::base_url);
    TestHub::start(data, move |config| {
        config.stripe.webhook_secret_file = Some(webhook_secret_file);
        config.stripe.export_interval_ms = 100;
        if let Some(base) = base {
            config.stripe.api_base = base;
            config.stripe.secret_key = Some(RedactedSecret(SECRET_KEY.to_string()));
        }
    })
    .await
}

/// Org `org` subscribed to plan `pro` (with a Stripe price when given).
async fn subscribed_org(hub: &TestHub, org: &str, price: Option<&str>) {
    hub.create_org(org, 10).await;
    let request: PlanRequest =
        serde_json::from_value(json!({ "name": "Pro", "prices": { "currency": "USD", "base_minor": 1000 }, "stripe_price_id": price })).unwrap();
    plans::put_plan(&hub.hub, "pro", request, "test", false).unwrap();
    plans::subscribe(&hub.hub, org, "pro").unwrap();
}

fn usage(org: &str, meter: Meter, hour_ms: i64, source: &str, quantity: i64) -> LedgerEntry {
    LedgerEntry { seq: 0, org: org.into(), meter, hour_ms, source: source.into(), quantity, kind: EntryKind::Usage, recorded_at_ms: gantry_hub::wall_ms() }
}

fn this_hour() -> i64 {
    gantry_hub::billing::hour_of(gantry_hub::wall_ms())
}

async fn customer_of(hub: &TestHub, org: &str) -> String {
    wait_for(Duration::from_secs(10), "stripe customer synced", || async { plans::subscription(&hub.hub, org).unwrap().and_then(|s| s.stripe_customer_id) })
        .await
}

async fn outbox_settled(hub: &TestHub, confirmed: usize) {
    wait_for(Duration::from_secs(20), "outbox rows confirmed", || async {
        let counts = stripe::outbox_counts(&hub.hub).unwrap();
        (counts.get("confirmed").copied().unwrap_or(0) == confirmed && counts.len() == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn customers_subscriptions_and_usage_sync_to_stripe() {
    let (data, secrets) = (TempDir::new("stripe-sync"), TempDir::new("stripe-sync-secrets"));
    let stub = StripeStub::start().await;
    let hub = start_hub(data.path(), secrets.path(), Some(&stub)).await;
    subscribed_org(&hub, "acme", Some("price_pro")).await;
    subscribed_org(&hub, "beta", None).await;
    // A customer an earlier run made and never recorded: adopted, not made twice.
    let gamma_earlier = stub.create_customer("gamma");
    subscribed_org(&hub, "gamma", None).await;
    let hour = this_hour() - 3 * 3_600_000;
    for entry in [
        usage("acme", Meter::LogBytes, hour, "agent-1", 1000),
        usage("acme", Meter::LogBytes, hour, "agent-2", 500),
        usage("acme", Meter::AgentHours, hour, "agent-1", 1),
        // A gauge: invoiced from the ledger, never sent as an event.
        usage("acme", Meter::PeakAgents, hour, "hub", 2),
        usage("beta", Meter::Events, hour, "agent-9", 7),
    ] {
        hub.hub.store.record(&entry).unwrap();
    }
    let acme = customer_of(&hub, "acme").await;
    let beta = customer_of(&hub, "beta").await;
    outbox_settled(&hub, 4).await;

    let customers = stub.customers();
    assert_eq!(customer_of(&hub, "gamma").await, gamma_earlier);
    assert_eq!(customers.len(), 3, "{customers:?}");
    assert!(customers.iter().any(|c| c["id"] == acme.as_str() && c["metadata"]["gantry_org"] == "acme"));
    let subscriptions = stub.subscriptions();
    assert_eq!(subscriptions.len(), 1, "only the plan with a Stripe price gets a subscription: {subscriptions:?}");
    assert_eq!(subscriptions[0]["customer"], acme.as_str());
    let synced = plans::subscription(&hub.hub, "acme").unwrap().unwrap();
    assert_eq!(synced.stripe_subscription_id.as_deref(), subscriptions[0]["id"].as_str());

    let totals = stub.totals();
    assert_eq!(totals.get(&(acme.clone(), "gantry_log_bytes".into())), Some(&1500));
    assert_eq!(totals.get(&(acme.clone(), "gantry_agent_hours".into())), Some(&1));
    assert_eq!(totals.get(&(beta, "gantry_events".into())), Some(&7));
    assert!(!totals.keys().any(|(_, name)| name == "gantry_peak_agents"), "{totals:?}");
    for event in stub.events() {
        assert!(event.identifier.starts_with("gantry_"), "{event:?}");
        assert_eq!(event.timestamp, hour / 1000);
    }
    // Every answer parsed as async-stripe's typed object, under one pinned API version.
    let rows = hub.hub.store.stripe_outbox(&[]).unwrap();
    assert!(rows.iter().all(|r| r.note.is_none()), "{rows:?}");
    let versions = stub.versions();
    assert!(versions.iter().all(|v| v.is_some() && *v == versions[0]), "{versions:?}");
    hub.stop().await;
}

#[tokio::test]
async fn a_plan_change_moves_the_stripe_price_and_a_cancellation_cancels_in_stripe() {
    let (data, secrets) = (TempDir::new("stripe-change"), TempDir::new("stripe-change-secrets"));
    let stub = StripeStub::start().await;
    let hub = start_hub(data.path(), secrets.path(), Some(&stub)).await;
    subscribed_org(&hub, "acme", Some("price_pro")).await;
    let subscription = wait_for(Duration::from_secs(20), "the stripe subscription", || async {
        plans::subscription(&hub.hub, "acme").unwrap().filter(|s| s.stripe_price_synced.is_some()).and_then(|s| s.stripe_subscription_id)
    })
    .await;
    let price_in_stripe = || stub.subscriptions().into_iter().find(|s| s["id"] == subscription.as_str()).unwrap()["items"]["data"][0]["price"]["id"].clone();
    assert_eq!(price_in_stripe(), "price_pro");

    // A new plan version with another Stripe price, and the org moved onto it.
    let request: PlanRequest =
        serde_json::from_value(json!({ "name": "Pro", "prices": { "currency": "USD", "base_minor": 2000 }, "stripe_price_id": "price_pro_2027" })).unwrap();
    plans::put_plan(&hub.hub, "pro", request, "test", false).unwrap();
    plans::subscribe(&hub.hub, "acme", "pro").unwrap();
    wait_for(Duration::from_secs(20), "the new price in Stripe", || async { (price_in_stripe() == "price_pro_2027").then_some(()) }).await;
    wait_for(Duration::from_secs(20), "the change recorded", || async {
        (plans::subscription(&hub.hub, "acme").unwrap().unwrap().stripe_price_synced.as_deref() == Some("price_pro_2027")).then_some(())
    })
    .await;
    assert_eq!(stub.changes(), (1, 0), "one price change, made once");

    // Canceled in the hub: canceled in Stripe, once.
    plans::force_status(&hub.hub, "acme", Status::Canceled).unwrap();
    wait_for(Duration::from_secs(20), "the cancellation in Stripe", || async {
        (stub.subscriptions().iter().any(|s| s["id"] == subscription.as_str() && s["status"] == "canceled")).then_some(())
    })
    .await;
    wait_for(Duration::from_secs(20), "the cancellation recorded", || async {
        plans::subscription(&hub.hub, "acme").unwrap().unwrap().stripe_canceled.then_some(())
    })
    .await;
    assert_eq!(stub.changes(), (1, 1));
    hub.stop().await;
}

#[tokio::test]
async fn an_exporter_that_dies_after_stripe_answered_does_not_count_twice() {
    let (data, secrets) = (TempDir::new("stripe-crash"), TempDir::new("stripe-crash-secrets"));
    let stub = StripeStub::start().await;
    let hub = start_hub(data.path(), secrets.path(), Some(&stub)).await;
    subscribed_org(&hub, "acme", None).await;
    let acme = customer_of(&hub, "acme").await;
    // Stripe records the next two events, and their answers never arrive.
    stub.drop_after_accept(2);
    let hour = this_hour() - 3_600_000;
    hub.hub.store.record(&usage("acme", Meter::LogBytes, hour, "agent-1", 300)).unwrap();
    hub.hub.store.record(&usage("acme", Meter::LogBytes, hour, "agent-2", 200)).unwrap();
    wait_for(Duration::from_secs(10), "both events recorded by stripe", || async { (stub.events().len() == 2).then_some(()) }).await;
    // The exporter stops here: the outbox still says `sent`.
    hub.stop().await;
    let before = stub.totals();
    assert_eq!(before.get(&(acme.clone(), "gantry_log_bytes".into())), Some(&500));

    let hub = start_hub(data.path(), secrets.path(), Some(&stub)).await;
    outbox_settled(&hub, 2).await;
    assert_eq!(stub.totals(), before, "a restart resends with the same identifier and key: no double count");
    assert_eq!(stub.events().len(), 2);
    assert!(stub.replays() >= 2, "the resends were idempotent replays");
    hub.stop().await;
}

#[tokio::test]
async fn the_after_send_hook_between_answer_and_commit_leaves_totals_unchanged() {
    let (data, secrets) = (TempDir::new("stripe-hook"), TempDir::new("stripe-hook-secrets"));
    let stub = StripeStub::start().await;
    // Webhook secret only: the test drives the exporter passes itself.
    let hub = start_hub(data.path(), secrets.path(), None).await;
    subscribed_org(&hub, "acme", None).await;
    let client = stub_client(stub.base_url());
    let hour = this_hour() - 3_600_000;
    hub.hub.store.record(&usage("acme", Meter::Events, hour, "agent-1", 42)).unwrap();
    let crash: stripe::AfterSendHook = std::sync::Arc::new(|_| true);
    stripe::pass(&hub.hub, &client, Some(&crash)).await.unwrap();
    let acme = plans::subscription(&hub.hub, "acme").unwrap().unwrap().stripe_customer_id.unwrap();
    assert_eq!(stub.totals().get(&(acme.clone(), "gantry_events".into())), Some(&42));
    assert_eq!(stripe::outbox_counts(&hub.hub).unwrap().get("sent"), Some(&1), "killed before the commit");
    // The next exporter run finds the row `sent` inside the 24 h window and resends it.
    stripe::pass(&hub.hub, &client, None).await.unwrap();
    assert_eq!(stripe::outbox_counts(&hub.hub).unwrap().get("confirmed"), Some(&1));
    assert_eq!(stub.totals().get(&(acme, "gantry_events".into())), Some(&42));
    assert_eq!(stub.events().len(), 1);
    hub.stop().await;
}

/// A client of the stub for tests that drive the exporter themselves.
fn stub_client(api_base: String) -> stripe::Client {
    let config = gantry_hub::config::Config {
        stripe: gantry_hub::config::StripeConfig { api_base, secret_key: Some(RedactedSecret(SECRET_KEY.into())), ..Default::default() },
        ..Default::default()
    };
    stripe::Client::new(stripe::Settings::from_config(&config).unwrap().unwrap()).unwrap()
}

#[tokio::test]
async fn after_the_24_hour_window_rows_are_reconciled_never_resent_blindly() {
    let (data, secrets) = (TempDir::new("stripe-reconcile"), TempDir::new("stripe-reconcile-secrets"));
    let stub = StripeStub::start().await;
    let hub = start_hub(data.path(), secrets.path(), None).await;
    subscribed_org(&hub, "acme", None).await;
    let client = stub_client(stub.base_url());
    let hour = this_hour() - 3_600_000;
    // Row 1: Stripe recorded it, the exporter died before the commit.
    hub.hub.store.record(&usage("acme", Meter::Events, hour, "agent-1", 4)).unwrap();
    let crash: stripe::AfterSendHook = std::sync::Arc::new(|_| true);
    stripe::pass(&hub.hub, &client, Some(&crash)).await.unwrap();
    // Row 2 (another meter): the request never reached Stripe.
    hub.hub.store.record(&usage("acme", Meter::CheckRuns, hour, "agent-1", 6)).unwrap();
    let unreachable = stub_client("http://127.0.0.1:9".into());
    stripe::enqueue(&hub.hub, gantry_hub::wall_ms()).unwrap();
    stripe::deliver(&hub.hub, &unreachable, gantry_hub::wall_ms(), None).await.unwrap();
    assert_eq!(stripe::outbox_counts(&hub.hub).unwrap().get("sent"), Some(&2));
    let acme = plans::subscription(&hub.hub, "acme").unwrap().unwrap().stripe_customer_id.unwrap();
    let replays = stub.replays();

    // 25 hours later Stripe has forgotten both keys: ask its summaries, do not resend.
    let later = gantry_hub::wall_ms() + 25 * 3_600_000;
    stripe::deliver(&hub.hub, &client, later, None).await.unwrap();
    let rows = hub.hub.store.stripe_outbox(&[]).unwrap();
    let state = |meter: Meter| rows.iter().find(|r| r.meter == meter).unwrap().state;
    assert_eq!(state(Meter::Events), OutboxState::Confirmed, "found in Stripe's summary: {rows:?}");
    assert_eq!(state(Meter::CheckRuns), OutboxState::Pending, "not in Stripe: queued again: {rows:?}");
    assert_eq!(stub.events().len(), 1, "nothing resent by the reconciliation");
    assert_eq!(stub.replays(), replays);
    stripe::deliver(&hub.hub, &client, later, None).await.unwrap();
    let totals = stub.totals();
    assert_eq!(totals.get(&(acme.clone(), "gantry_events".into())), Some(&4));
    assert_eq!(totals.get(&(acme, "gantry_check_runs".into())), Some(&6));
    assert_eq!(stripe::outbox_counts(&hub.hub).unwrap().get("confirmed"), Some(&2));
    hub.stop().await;
}

#[tokio::test]
async fn rate_limits_are_honoured_with_retry_after() {
    let (data, secrets) = (TempDir::new("stripe-429"), TempDir::new("stripe-429-secrets"));
    let stub = StripeStub::start().await;
    let hub = start_hub(data.path(), secrets.path(), Some(&stub)).await;
    subscribed_org(&hub, "acme", None).await;
    let acme = customer_of(&hub, "acme").await;
    stub.rate_limit_next(1, 2);
    hub.hub.store.record(&usage("acme", Meter::Deployments, this_hour(), "web:1", 1)).unwrap();
    outbox_settled(&hub, 1).await;
    let (limited, requests) = stub.timeline();
    assert_eq!(limited.len(), 1);
    let next = requests.iter().map(|(at, _, _)| *at).find(|at| *at > limited[0]).expect("a request after the 429");
    assert!(next.duration_since(limited[0]) >= Duration::from_millis(1900), "waited {:?}", next.duration_since(limited[0]));
    assert_eq!(stub.totals().get(&(acme, "gantry_deployments".into())), Some(&1));
    hub.stop().await;
}

#[tokio::test]
async fn usage_older_than_35_days_goes_to_the_fallback() {
    let (data, secrets) = (TempDir::new("stripe-old"), TempDir::new("stripe-old-secrets"));
    let stub = StripeStub::start().await;
    let hub = start_hub(data.path(), secrets.path(), Some(&stub)).await;
    subscribed_org(&hub, "acme", None).await;
    customer_of(&hub, "acme").await;
    hub.hub.store.record(&usage("acme", Meter::Events, this_hour() - 36 * 24 * 3_600_000, "agent-1", 5)).unwrap();
    wait_for(Duration::from_secs(10), "row in fallback", || async { stripe::outbox_counts(&hub.hub).unwrap().get("fallback").copied() }).await;
    let rows = hub.hub.store.stripe_outbox(&[OutboxState::Fallback]).unwrap();
    assert!(rows[0].note.as_deref().unwrap_or("").starts_with("too_old"), "{rows:?}");
    assert!(stub.events().is_empty());
    // Operators find it through the API, to bill it as an invoice adjustment.
    let (status, body) = hub.api().get("/api/v1/billing/stripe/outbox?org=acme").await;
    assert_eq!(status, 200, "{body}");
    let listed = body["rows"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{body}");
    assert_eq!(listed[0]["state"], "fallback");
    assert_eq!(listed[0]["quantity"], 5);
    assert_eq!(listed[0]["meter"], "events");
    assert!(listed[0]["note"].as_str().unwrap().starts_with("too_old"), "{body}");
    let (status, body) = hub.api().get("/api/v1/billing/stripe/outbox?org=acme&state=confirmed").await;
    assert_eq!(status, 200, "{body}");
    assert!(body["rows"].as_array().unwrap().is_empty(), "{body}");
    let (status, body) = hub.api().get("/api/v1/billing/stripe/outbox?state=lost").await;
    assert_eq!(status, 400, "an unknown state is refused: {body}");
    hub.stop().await;
}

#[tokio::test]
async fn the_stub_is_strict_like_stripe() {
    let stub = StripeStub::start().await;
    let post = |key: Option<&'static str>, ct: &'static str, body: &'static str, idem: Option<&'static str>| {
        let url = format!("{}/v1/customers", stub.base_url());
        async move {
            let mut request = hyper::Request::post(url).header("content-type", ct);
            if let Some(key) = key {
                request = request.header("authorization", format!("Bearer {key}"));
            }
            if let Some(idem) = idem {
                request = request.header("idempotency-key", idem);
            }
            raw(request.body(Full::new(bytes::Bytes::from(body))).unwrap()).await
        }
    };
    let form = "application/x-www-form-urlencoded";
    assert_eq!(post(None, form, "name=a", None).await.0, 401);
    assert_eq!(post(Some("sk_wrong"), form, "name=a", None).await.0, 401);
    assert_eq!(post(Some(SECRET_KEY), "application/json", "{}", None).await.0, 400);
    let (status, body) = post(Some(SECRET_KEY), form, "name=a&colour=red", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("parameter_unknown")));
    let (first, one) = post(Some(SECRET_KEY), form, "name=a", Some("k1")).await;
    let (again, two) = post(Some(SECRET_KEY), form, "name=a", Some("k1")).await;
    assert_eq!((first, again), (200, 200));
    assert_eq!(one["id"], two["id"], "same key, same params: the first answer replayed");
    let (status, body) = post(Some(SECRET_KEY), form, "name=b", Some("k1")).await;
    assert_eq!((status, body["error"]["type"].as_str()), (400, Some("idempotency_error")));
    // The same parameters in another order are the same request.
    let (_, first) = post(Some(SECRET_KEY), form, "name=c&metadata[gantry_org]=c", Some("k2")).await;
    let (status, again) = post(Some(SECRET_KEY), form, "metadata[gantry_org]=c&name=c", Some("k2")).await;
    assert_eq!((status, &first["id"]), (200, &again["id"]));

    let send = |path: &'static str, version: &'static str, body: String| {
        let url = format!("{}{path}", stub.base_url());
        async move {
            let request = hyper::Request::post(url)
                .header("content-type", form)
                .header("authorization", format!("Bearer {SECRET_KEY}"))
                .header("stripe-version", version);
            raw(request.body(Full::new(bytes::Bytes::from(body))).unwrap()).await
        }
    };
    let (status, body) = send("/v1/customers", "yesterday", "name=a".into()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("api_version_invalid")));
    let customer = stub.create_customer("acme");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let event = |timestamp: i64| {
        format!("event_name=gantry_events&payload[stripe_customer_id]={customer}&payload[value]=1&identifier=id{timestamp}&timestamp={timestamp}")
    };
    for (timestamp, expected) in [(now - 36 * 86_400, 400), (now + 600, 400), (now - 3600, 200)] {
        let (status, body) = send("/v1/billing/meter_events", "2026-09-30.endive", event(timestamp)).await;
        assert_eq!(status, expected, "timestamp {timestamp} (now {now}): {body}");
    }
    // Arrays of objects must be indexed, as Stripe's form encoding has them.
    let (status, body) = send("/v1/subscriptions", "2026-09-30.endive", format!("customer={customer}&items[][price]=price_x")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("parameter_unknown")));
}

// ---- webhooks ----

/// POST a body to the webhook endpoint with `signature` as `Stripe-Signature`.
async fn webhook(hub: &TestHub, body: &str, signature: Option<String>) -> (u16, Value) {
    let mut request = hyper::Request::post(format!("http://{}/api/v1/webhooks/stripe", hub.http)).header("content-type", "application/json");
    if let Some(signature) = signature {
        request = request.header("stripe-signature", signature);
    }
    raw(request.body(Full::new(bytes::Bytes::from(body.to_string()))).unwrap()).await
}

async fn raw(request: hyper::Request<Full<bytes::Bytes>>) -> (u16, Value) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
    let response = tokio::time::timeout(Duration::from_secs(20), client.request(request)).await.unwrap().unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn signed(body: &str, secret: &str, t: i64) -> String {
    format!("t={t},v1={}", stripe::sign(secret.as_bytes(), t, body.as_bytes()))
}

fn now_secs() -> i64 {
    gantry_hub::wall_ms() / 1000
}

fn invoice_event(id: &str, event_type: &str, customer: &str, created: i64) -> String {
    json!({ "id": id, "object": "event", "type": event_type, "created": created,
            "data": { "object": { "id": format!("in_{id}"), "object": "invoice", "customer": customer } } })
    .to_string()
}

/// A hub with org `acme` subscribed and known to Stripe as customer `cus_acme`.
async fn webhook_hub(name: &str) -> (TempDir, TempDir, TestHub) {
    let (data, secrets) = (TempDir::new(name), TempDir::new(&format!("{name}-secrets")));
    let hub = start_hub(data.path(), secrets.path(), None).await;
    subscribed_org(&hub, "acme", None).await;
    plans::set_stripe_ids(&hub.hub, "acme", Some("cus_acme".into()), None).unwrap();
    (data, secrets, hub)
}

fn status_of(hub: &TestHub) -> Status {
    plans::subscription(&hub.hub, "acme").unwrap().unwrap().status
}

#[tokio::test]
async fn webhook_signatures_are_checked_on_the_raw_body() {
    let (_data, _secrets, hub) = webhook_hub("stripe-sig").await;
    let t = now_secs();
    let body = invoice_event("evt_sig", "invoice.payment_failed", "cus_acme", t);

    // Refusals first: none of them may have any effect.
    let (status, reply) = webhook(&hub, &body, Some(signed(&body, WEBHOOK_SECRET, t - 301))).await;
    assert_eq!((status, reply["error"]["code"].as_str()), (400, Some("invalid_signature")), "301 s old: {reply}");
    let mut changed = body.clone().into_bytes();
    changed[10] ^= 1;
    let changed = String::from_utf8(changed).unwrap();
    assert_eq!(webhook(&hub, &changed, Some(signed(&body, WEBHOOK_SECRET, t))).await.0, 400, "one changed body byte");
    assert_eq!(webhook(&hub, &body, Some(signed(&body, "whsec_wrong", t))).await.0, 400, "wrong secret");
    let (status, reply) = webhook(&hub, &body, None).await;
    assert_eq!(status, 400, "missing header");
    assert!(reply["error"]["message"].as_str().unwrap().contains("missing"), "{reply}");
    assert_eq!(webhook(&hub, &body, Some("garbage".into())).await.0, 400, "garbage header");
    assert_eq!(webhook(&hub, &body, Some(format!("t={t},v1=zzzz"))).await.0, 400, "garbage v1");
    assert_eq!(status_of(&hub), Status::Active, "refused deliveries changed nothing");

    // Two v1 values, the first valid.
    let good = stripe::sign(WEBHOOK_SECRET.as_bytes(), t, body.as_bytes());
    let bad = stripe::sign(b"whsec_old", t, body.as_bytes());
    let (status, reply) = webhook(&hub, &body, Some(format!("t={t},v1={good},v1={bad}"))).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["effect"], "payment_failed");
    assert_eq!(status_of(&hub), Status::PastDue);
    // Two v1 values, the second valid (a rolled secret).
    let body = invoice_event("evt_sig2", "invoice.paid", "cus_acme", t + 1);
    let good = stripe::sign(WEBHOOK_SECRET.as_bytes(), t, body.as_bytes());
    let (status, reply) = webhook(&hub, &body, Some(format!("t={t},v1={bad},v1={good}"))).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(status_of(&hub), Status::Active);
    hub.stop().await;
}

#[tokio::test]
async fn the_same_event_five_times_is_processed_once() {
    let (_data, _secrets, hub) = webhook_hub("stripe-dup").await;
    let t = now_secs();
    let body = invoice_event("evt_once", "invoice.payment_failed", "cus_acme", t);
    let mut duplicates = 0;
    for _ in 0..5 {
        let (status, reply) = webhook(&hub, &body, Some(signed(&body, WEBHOOK_SECRET, now_secs()))).await;
        assert_eq!(status, 200, "{reply}");
        duplicates += usize::from(reply["duplicate"] == true);
    }
    assert_eq!(duplicates, 4);
    let s = plans::subscription(&hub.hub, "acme").unwrap().unwrap();
    assert_eq!((s.status, s.failed_payments), (Status::PastDue, 1), "one failure, not five");
    hub.stop().await;
}

#[tokio::test]
async fn an_event_recorded_but_not_applied_before_a_crash_is_applied_once_on_redelivery() {
    let (_data, _secrets, hub) = webhook_hub("stripe-pending").await;
    let t = now_secs();
    let failed_payments = || plans::subscription(&hub.hub, "acme").unwrap().unwrap().failed_payments;
    let pending = |id: &str| gantry_hub::store::StripeEvent {
        id: id.into(),
        event_type: "invoice.payment_failed".into(),
        created: t,
        org: Some("acme".into()),
        effect: "payment_failed".into(),
        received_at_ms: gantry_hub::wall_ms(),
        pending: false,
    };
    // The hub recorded the event, then stopped before the subscription changed.
    hub.hub.store.stripe_record_event(&pending("evt_half"), |marks| (true, marks, "payment_failed".into())).unwrap();
    assert_eq!((status_of(&hub), failed_payments()), (Status::Active, 0));
    // Stripe delivers it again: applied now, and then only ever once.
    let body = invoice_event("evt_half", "invoice.payment_failed", "cus_acme", t);
    let (status, reply) = webhook(&hub, &body, Some(signed(&body, WEBHOOK_SECRET, now_secs()))).await;
    assert_eq!((status, reply["duplicate"].as_bool()), (200, Some(false)), "{reply}");
    assert_eq!((status_of(&hub), failed_payments()), (Status::PastDue, 1));
    let (status, reply) = webhook(&hub, &body, Some(signed(&body, WEBHOOK_SECRET, now_secs()))).await;
    assert_eq!((status, reply["duplicate"].as_bool()), (200, Some(true)), "{reply}");
    assert_eq!(failed_payments(), 1);

    // The hub recorded the next one and changed the subscription, then stopped before
    // marking the event applied: the redelivery changes nothing more.
    hub.hub.store.stripe_record_event(&pending("evt_late"), |marks| (true, marks, "payment_failed".into())).unwrap();
    plans::apply_payment_event(&hub.hub, "acme", t * 1000, "evt_late", false).unwrap();
    assert_eq!(failed_payments(), 2);
    let body = invoice_event("evt_late", "invoice.payment_failed", "cus_acme", t);
    let (status, reply) = webhook(&hub, &body, Some(signed(&body, WEBHOOK_SECRET, now_secs()))).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!((status_of(&hub), failed_payments()), (Status::PastDue, 2), "the failure is counted once");
    let (_, reply) = webhook(&hub, &body, Some(signed(&body, WEBHOOK_SECRET, now_secs()))).await;
    assert_eq!(reply["duplicate"], true, "{reply}");
    hub.stop().await;
}

#[tokio::test]
async fn events_out_of_order_converge() {
    let (_data, _secrets, hub) = webhook_hub("stripe-order").await;
    let t = now_secs();
    let failed = invoice_event("evt_failed", "invoice.payment_failed", "cus_acme", t - 100);
    let paid = invoice_event("evt_paid", "invoice.paid", "cus_acme", t - 50);
    // Delivered in the wrong order: the payment first, then the older failure.
    assert_eq!(webhook(&hub, &paid, Some(signed(&paid, WEBHOOK_SECRET, t))).await.0, 200);
    let (status, reply) = webhook(&hub, &failed, Some(signed(&failed, WEBHOOK_SECRET, t))).await;
    assert_eq!(status, 200);
    assert!(reply["effect"].as_str().unwrap().starts_with("stale"), "{reply}");
    let s = plans::subscription(&hub.hub, "acme").unwrap().unwrap();
    assert_eq!((s.status, s.failed_payments), (Status::Active, 0), "same end state as in order");

    // A late success older than a newer failure does not clear it either.
    let failed = invoice_event("evt_failed2", "invoice.payment_failed", "cus_acme", t - 10);
    let paid = invoice_event("evt_paid2", "invoice.payment_succeeded", "cus_acme", t - 20);
    assert_eq!(webhook(&hub, &failed, Some(signed(&failed, WEBHOOK_SECRET, t))).await.0, 200);
    assert_eq!(webhook(&hub, &paid, Some(signed(&paid, WEBHOOK_SECRET, t))).await.0, 200);
    assert_eq!(status_of(&hub), Status::PastDue);

    // Subscription updates apply in `created` order.
    let sub = |id: &str, status: &str, created: i64| {
        json!({ "id": id, "type": "customer.subscription.updated", "created": created,
                "data": { "object": { "id": "sub_1", "object": "subscription", "customer": "cus_acme", "status": status } } })
        .to_string()
    };
    let newer = sub("evt_sub_new", "unpaid", t);
    let older = sub("evt_sub_old", "canceled", t - 30);
    assert_eq!(webhook(&hub, &newer, Some(signed(&newer, WEBHOOK_SECRET, t))).await.0, 200);
    assert_eq!(webhook(&hub, &older, Some(signed(&older, WEBHOOK_SECRET, t))).await.0, 200);
    assert_eq!(status_of(&hub), Status::Unpaid, "the late cancel is stale");
    hub.stop().await;
}

#[tokio::test]
async fn three_failed_payments_suspend_and_a_payment_restores() {
    let (_data, _secrets, hub) = webhook_hub("stripe-life").await;
    let api: Api = hub.api();
    let t = now_secs();
    hub.hub.store.record(&usage("acme", Meter::Events, this_hour(), "agent-1", 9)).unwrap();
    for i in 0..3 {
        let body = invoice_event(&format!("evt_fail_{i}"), "invoice.payment_failed", "cus_acme", t - 30 + i);
        let (status, reply) = webhook(&hub, &body, Some(signed(&body, WEBHOOK_SECRET, t))).await;
        assert_eq!(status, 200, "{reply}");
        let expected = if i < 2 { Status::PastDue } else { Status::Suspended };
        assert_eq!(status_of(&hub), expected, "after failure {}", i + 1);
    }
    assert!(hub.hub.store.org("acme").unwrap().unwrap().suspended, "the org is suspended");
    let spec = json!({ "name": "web", "services": [{ "name": "app", "image": "busybox:1.36", "command": ["true"] }] });
    let started = Instant::now();
    let (status, reply) = api.post("/api/v1/orgs/acme/deployments", &json!({ "spec": spec, "targets": { "agents": [] } })).await;
    assert_eq!((status, reply["error"]["code"].as_str()), (402, Some("subscription_inactive")), "deployment refused while suspended: {reply}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(hub.hub.store.ledger_usage("acme", 0, i64::MAX).unwrap().get(&Meter::Events), Some(&9), "data kept");

    let body = invoice_event("evt_paid_after", "invoice.paid", "cus_acme", t);
    assert_eq!(webhook(&hub, &body, Some(signed(&body, WEBHOOK_SECRET, t))).await.0, 200);
    let s = plans::subscription(&hub.hub, "acme").unwrap().unwrap();
    assert_eq!((s.status, s.failed_payments), (Status::Active, 0));
    assert!(!hub.hub.store.org("acme").unwrap().unwrap().suspended, "the org is restored");
    let (status, reply) = api.post("/api/v1/orgs/acme/deployments", &json!({ "spec": spec, "targets": { "agents": [] } })).await;
    assert_ne!(status, 402, "deploying is allowed again: {reply}");
    hub.stop().await;
}

#[tokio::test]
async fn webhooks_answer_503_without_a_secret() {
    let data = TempDir::new("stripe-nosecret");
    let hub = TestHub::start(data.path(), |_| {}).await;
    let body = invoice_event("evt_x", "invoice.paid", "cus_x", now_secs());
    let (status, reply) = webhook(&hub, &body, Some(signed(&body, WEBHOOK_SECRET, now_secs()))).await;
    assert_eq!((status, reply["error"]["code"].as_str()), (503, Some("stripe_not_configured")));
    hub.stop().await;
}
