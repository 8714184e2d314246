//! Plans, subscriptions and what a subscription's status allows, against a real hub and a
//! real agent: the plan catalog is versioned and validated; a suspended org keeps its data
//! and its agents keep their logs buffered while deployments and enrollments are refused;
//! a payment restores it and every buffered line arrives exactly once.

#![allow(clippy::unwrap_used)]

use gantry_tests::*;
use serde_json::{json, Value};
use std::time::Duration;

async fn send_json(api: &Api, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, text) = api.send(method, path, Some("application/json"), serde_json::to_vec(body).unwrap()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn team_plan() -> Value {
    json!({
        "id": "team",
        "name": "Team",
        "prices": {
            "currency": "USD",
            "base_minor": 4900,
            "meters": [
                { "meter": "agent_hours", "included": 7200, "charge": { "model": "per_unit", "unit": { "minor": 2, "per": 1 } } },
                { "meter": "log_bytes", "included": 10000000000u64, "charge": { "model": "package", "size": 1000000000, "price_minor": 50 } }
            ]
        },
        "limits": { "agents": 10, "retention_days": 30 },
        "trial": { "days": 14 }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_are_versioned_and_a_subscription_carries_its_limits_to_the_org() {
    let dir = TempDir::new("billing-plans");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 3).await;
    let api = hub.api();
    let (code, plan) = api.post("/api/v1/plans", &team_plan()).await;
    assert_eq!(code, 201, "{plan}");
    assert_eq!(plan["version"], 1);
    let (code, _) = api.post("/api/v1/plans", &team_plan()).await;
    assert_eq!(code, 409, "plan ids are unique");
    let mut bad = team_plan();
    bad["id"] = json!("bad");
    bad["prices"]["currency"] = json!("dollars");
    let (code, body) = api.post("/api/v1/plans", &bad).await;
    assert_eq!(code, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("currency"), "{body}");
    assert_eq!(api.get("/api/v1/plans/bad").await.0, 404, "a refused plan is not stored");

    let (code, sub) = send_json(&api, "PUT", "/api/v1/orgs/acme/subscription", &json!({ "plan": "team" })).await;
    assert_eq!(code, 200, "{sub}");
    assert_eq!(sub["status"], "trialing");
    assert_eq!(sub["entitlements"], json!({ "ingest": true, "deploy": true, "enroll": true, "read": true }));
    let (_, org) = api.get("/api/v1/orgs/acme").await;
    assert_eq!((org["agent_limit"].as_u64(), org["retention_days"].as_u64()), (Some(10), Some(30)), "the plan's limits apply: {org}");

    // A new version never rewrites the old one; the subscription stays on the version it has.
    let mut cheaper = team_plan();
    cheaper.as_object_mut().unwrap().remove("id");
    cheaper["prices"]["base_minor"] = json!(3900);
    let (code, v2) = send_json(&api, "PUT", "/api/v1/plans/team", &cheaper).await;
    assert_eq!(code, 200, "{v2}");
    assert_eq!(v2["version"], 2);
    let (_, all) = api.get("/api/v1/plans/team").await;
    let bases: Vec<i64> = all["versions"].as_array().unwrap().iter().map(|v| v["prices"]["base_minor"].as_i64().unwrap()).collect();
    assert_eq!(bases, [4900, 3900]);
    let (_, sub) = api.get("/api/v1/orgs/acme/subscription").await;
    assert_eq!(sub["plan_version"], 1);
    let (code, _) = api.get("/api/v1/orgs/acme/invoices/preview").await;
    assert_eq!(code, 200);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_org_keeps_its_data_and_agents_buffer_until_a_payment_restores_it() {
    let dir = TempDir::new("billing-suspend");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    let api = hub.api();
    let mut plan = team_plan();
    plan.as_object_mut().unwrap().remove("trial");
    assert_eq!(api.post("/api/v1/plans", &plan).await.0, 201);
    let (code, sub) = send_json(&api, "PUT", "/api/v1/orgs/acme/subscription", &json!({ "plan": "team" })).await;
    assert_eq!((code, sub["status"].as_str()), (200, Some("active")), "{sub}");

    let token = hub.token("acme", 2, "10m").await;
    let state = dir.path().join("agent");
    let id = enroll(&token, &state).await.unwrap();
    let log = dir.path().join("app.log");
    std::fs::write(&log, "").unwrap();
    let config = agent_config_file(dir.path(), &state, &[&log], "[host]\nenabled = false\n[docker]\nenabled = false");
    let _agent = AgentProcess::start_with_config(&config, &state);
    hub.wait_status(&id, "online", Duration::from_secs(20)).await;
    let writer = LineWriter::start(&log, Duration::from_millis(5));
    let logs = format!("/api/v1/agents/{id}/logs");
    wait_for(Duration::from_secs(30), "lines before the suspension", || async { (!api.all_records(&logs, "").await.is_empty()).then_some(()) }).await;

    // Three failed payments: past due, past due, suspended.
    for (n, expected) in [(1, "past_due"), (2, "past_due"), (3, "suspended")] {
        let s = gantry_hub::billing::plans::payment_failed(&hub.hub, "acme", gantry_hub::wall_ms()).unwrap();
        assert_eq!((s.failed_payments, s.status.name()), (n, expected));
    }
    let stored_at_suspension = api.all_records(&logs, "").await.len();
    // Deployments and enrollments are refused with the reason; data stays readable.
    let deployment = json!({ "spec": { "name": "web", "services": [{ "name": "app", "image": "busybox:1" }] }, "targets": { "agents": [id] } });
    let (code, body) = api.post("/api/v1/orgs/acme/deployments", &deployment).await;
    assert_eq!(code, 402, "{body}");
    assert_eq!(body["error"]["code"], "subscription_inactive");
    assert!(body["error"]["message"].as_str().unwrap().contains("suspended"), "{body}");
    let second = enroll(&token, &dir.path().join("agent-2")).await;
    let refusal = format!("{:#}", second.unwrap_err());
    assert!(refusal.contains("suspended"), "enrollment is refused with the reason: {refusal}");
    assert_eq!(api.get("/api/v1/orgs/acme/agents").await.0, 200);
    // The agent keeps sending and the hub keeps refusing: nothing more is stored while the
    // lines pile up in the agent's spool.
    let before = api.all_records(&logs, "").await.len();
    assert!(before >= stored_at_suspension);
    let written_while_suspended = wait_for(Duration::from_secs(30), "the writer to add 200 lines", || async {
        let now = std::fs::read_to_string(&log).unwrap().lines().count();
        (now >= before + 200).then_some(now)
    })
    .await;
    let during = api.all_records(&logs, "").await.len();
    assert_eq!(during, before, "a suspended org ingests nothing new: {written_while_suspended} lines were written meanwhile");
    // The lines held back show as the agent's spool backlog (reported every few seconds).
    let backlog = |agent: Value| agent["spool"]["streams"].as_array().and_then(|s| s.iter().find(|s| s["class"] == "logs").cloned());
    let held = wait_for(Duration::from_secs(30), "the agent to report its log backlog", || async {
        backlog(hub.agent(&id).await).filter(|logs| logs["records"].as_u64() >= Some(100))
    })
    .await;
    assert!(held["bytes"].as_u64().unwrap() > 0 && held["cap_bytes"].as_u64().unwrap() > held["bytes"].as_u64().unwrap(), "{held}");

    // Payment: active again; every buffered line arrives, once.
    let s = gantry_hub::billing::plans::payment_succeeded(&hub.hub, "acme", gantry_hub::wall_ms()).unwrap();
    assert_eq!((s.status.name(), s.failed_payments), ("active", 0));
    let written = writer.stop();
    let records = wait_for(Duration::from_secs(60), "every line after the payment", || async {
        let records = api.all_records(&logs, "").await;
        (records.len() as u64 >= written).then_some(records)
    })
    .await;
    assert_lines_exactly_once(&records, written);
    wait_for(Duration::from_secs(30), "the backlog to drain to nothing", || async {
        backlog(hub.agent(&id).await).filter(|logs| logs["records"] == 0 && logs["bytes"] == 0)
    })
    .await;
    let (code, body) = api.post("/api/v1/orgs/acme/deployments", &deployment).await;
    assert_ne!(code, 402, "deploying works again: {body}");
    hub.stop().await;
}

fn usage(org: &str, meter: gantry_hub::billing::Meter, hour_ms: i64, source: &str, quantity: i64) -> gantry_hub::store::LedgerEntry {
    gantry_hub::store::LedgerEntry {
        seq: 0,
        org: org.into(),
        meter,
        hour_ms,
        source: source.into(),
        quantity,
        kind: gantry_hub::store::EntryKind::Usage,
        recorded_at_ms: gantry_hub::wall_ms(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_invoice_is_exact_unchanged_by_duplicates_and_never_rewritten() {
    use gantry_hub::billing::{Meter, HOUR_MS};
    let dir = TempDir::new("billing-invoice");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    let api = hub.api();
    let plan = json!({
        "id": "hourly", "name": "Hourly",
        "prices": { "currency": "USD", "base_minor": 4900, "meters": [
            { "meter": "agent_hours", "included": 10, "charge": { "model": "per_unit", "unit": { "minor": 100 } } },
            { "meter": "log_bytes", "included": 0, "charge": { "model": "volume", "tiers": [
                { "up_to": 1000, "unit": { "minor": 2, "per": 10 } },
                { "up_to": null, "unit": { "minor": 1, "per": 10 } } ] } } ] }
    });
    assert_eq!(api.post("/api/v1/plans", &plan).await.0, 201);
    let (code, _) = send_json(&api, "PUT", "/api/v1/orgs/acme/subscription", &json!({ "plan": "hourly" })).await;
    assert_eq!(code, 200);
    // Move the subscription's start back so its first period (January 2026) has ended.
    let anchor = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    hub.hub
        .store
        .update_subscription("acme", |s| {
            let mut s = s.unwrap();
            s.period_anchor_ms = anchor;
            s.created_at_ms = anchor;
            s.changes[0].at_ms = anchor;
            Ok(s)
        })
        .unwrap();
    // 30 agent hours and 1,500 log bytes in January, from three agents.
    let mut entries = Vec::new();
    for hour in 0..10 {
        for agent in ["agt_a", "agt_b", "agt_c"] {
            entries.push(usage("acme", Meter::AgentHours, anchor + hour * HOUR_MS, agent, 1));
        }
    }
    for (hour, bytes) in [(0, 500), (5, 700), (9, 300)] {
        entries.push(usage("acme", Meter::LogBytes, anchor + hour * HOUR_MS, "agt_a", bytes));
    }
    for entry in &entries {
        assert!(matches!(hub.hub.store.record(entry).unwrap(), gantry_hub::store::LedgerRecorded::Appended { .. }));
    }
    let (code, body) = api.post("/api/v1/billing/close", &json!({})).await;
    assert_eq!(code, 200, "{body}");
    assert!(body["closed"].as_u64().unwrap() >= 1, "{body}");
    let (_, list) = api.get("/api/v1/orgs/acme/invoices").await;
    let january = list["invoices"].as_array().unwrap().iter().find(|i| i["period"]["start"] == "2026-01-01T00:00:00Z").unwrap().clone();
    // By hand: base 49.00; agent hours 30 - 10 included = 20 × 1.00 = 20.00; log bytes 1,500
    // reach the second volume tier, so all 1,500 at 1 per 10 = 150 minor = 1.50.
    // Total 4,900 + 2,000 + 150 = 7,050.
    assert_eq!(january["invoice"]["total_minor"], 7050, "{january}");
    let amounts: i64 = january["invoice"]["lines"].as_array().unwrap().iter().map(|l| l["amount_minor"].as_i64().unwrap()).sum();
    assert_eq!(amounts, 7050, "the total is the sum of its lines");

    // Duplicates of 10 %, 50 % and 100 % of the entries change nothing, to the cent.
    for share in [10, 50, 100] {
        for entry in entries.iter().take(entries.len() * share / 100) {
            assert!(matches!(hub.hub.store.record(entry).unwrap(), gantry_hub::store::LedgerRecorded::Duplicate { .. }), "{share} %");
        }
        let s = hub.hub.store.subscription("acme").unwrap().unwrap();
        let recomputed = gantry_hub::billing::invoices::invoice_for(&hub.hub, &s, anchor, 1_769_904_000_000).unwrap();
        assert_eq!(serde_json::to_value(&recomputed).unwrap(), january["invoice"], "after resending {share} %");
    }
    // The same key with another value is refused.
    let mut changed = entries[0].clone();
    changed.quantity = 2;
    assert!(hub.hub.store.record(&changed).is_err(), "a conflicting re-record is refused");
    // Late usage for January does not touch the closed invoice.
    hub.hub.store.record(&usage("acme", Meter::AgentHours, anchor + 20 * HOUR_MS, "agt_late", 1)).unwrap();
    api.post("/api/v1/billing/close", &json!({})).await;
    let (_, again) = api.get("/api/v1/orgs/acme/invoices").await;
    let still = again["invoices"].as_array().unwrap().iter().find(|i| i["period"]["start"] == "2026-01-01T00:00:00Z").unwrap().clone();
    assert_eq!(still, january, "a closed invoice never changes");
    // It is carried, once, onto the open period's invoice instead: one more agent hour over
    // the allowance is 1.00.
    let (code, preview) = api.get("/api/v1/orgs/acme/invoices/preview").await;
    assert_eq!(code, 200, "{preview}");
    let carried: Vec<&Value> = preview["invoice"]["lines"].as_array().unwrap().iter().filter(|l| l["kind"] == "adjustment").collect();
    assert_eq!(carried.len(), 1, "{preview}");
    assert_eq!(carried[0]["amount_minor"], 100);
    assert!(carried[0]["description"].as_str().unwrap().contains("2026-01-01"), "{preview}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trial_ends_at_its_date_or_when_its_usage_runs_out_whichever_is_first() {
    use gantry_hub::billing::{Meter, HOUR_MS};
    let dir = TempDir::new("billing-trial");
    let hub = TestHub::start(&dir.path().join("hub"), |config| config.billing_interval_ms = 100).await;
    hub.create_org("acme", 5).await;
    hub.create_org("globex", 5).await;
    let api = hub.api();
    let mut plan = team_plan();
    plan["trial"] = json!({ "days": 14, "usage": { "agent_hours": 5 } });
    assert_eq!(api.post("/api/v1/plans", &plan).await.0, 201);
    for org in ["acme", "globex"] {
        let (code, sub) = send_json(&api, "PUT", &format!("/api/v1/orgs/{org}/subscription"), &json!({ "plan": "team" })).await;
        assert_eq!((code, sub["status"].as_str()), (200, Some("trialing")), "{sub}");
    }
    // acme uses up its trial allowance: five agent hours.
    let hour = gantry_hub::billing::hour_of(gantry_hub::wall_ms());
    for agent in ["agt_a", "agt_b", "agt_c", "agt_d", "agt_e"] {
        hub.hub.store.record(&usage("acme", Meter::AgentHours, hour, agent, 1)).unwrap();
    }
    // Usage from before the subscription counts for nothing.
    hub.hub.store.record(&usage("globex", Meter::AgentHours, hour - 24 * HOUR_MS, "agt_old", 9)).unwrap();
    let status = |org: &'static str| {
        let api = api.clone();
        async move { api.get(&format!("/api/v1/orgs/{org}/subscription")).await.1 }
    };
    let ended = wait_for(Duration::from_secs(20), "acme's trial to end by usage", || async {
        let s = status("acme").await;
        (s["status"] == "active").then_some(s)
    })
    .await;
    assert!(ended["trial_end_ms"].as_i64().unwrap() <= gantry_hub::wall_ms(), "{ended}");
    assert_eq!(status("globex").await["status"], "trialing", "globex has used nothing and has days left");
    // globex's fourteen days are over (moved back in time): its trial ends at its date.
    let trial_end = gantry_hub::wall_ms() - 1000;
    hub.hub
        .store
        .update_subscription("globex", |s| {
            let mut s = s.unwrap();
            s.trial_end_ms = Some(trial_end);
            Ok(s)
        })
        .unwrap();
    let ended = wait_for(Duration::from_secs(20), "globex's trial to end by date", || async {
        let s = status("globex").await;
        (s["status"] == "active").then_some(s)
    })
    .await;
    assert_eq!(ended["trial_end_ms"].as_i64().unwrap(), trial_end, "the trial ended at its date: {ended}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_log_quota_holds_logs_back_at_the_agent_until_the_plan_allows_more() {
    use gantry_hub::billing::Meter;
    let dir = TempDir::new("billing-quota");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    let api = hub.api();
    let mut small = team_plan();
    small.as_object_mut().unwrap().remove("trial");
    small["id"] = json!("small");
    small["limits"] = json!({ "log_bytes_per_month": 1000, "enforcement": "hard" });
    let mut large = small.clone();
    large["id"] = json!("large");
    large["limits"] = json!({ "enforcement": "soft" });
    assert_eq!(api.post("/api/v1/plans", &small).await.0, 201);
    assert_eq!(api.post("/api/v1/plans", &large).await.0, 201);
    assert_eq!(send_json(&api, "PUT", "/api/v1/orgs/acme/subscription", &json!({ "plan": "small" })).await.0, 200);
    // The month's allowance is already used.
    let hour = gantry_hub::billing::hour_of(gantry_hub::wall_ms());
    hub.hub.store.record(&usage("acme", Meter::LogBytes, hour, "earlier", 1000)).unwrap();

    let token = hub.token("acme", 1, "10m").await;
    let state = dir.path().join("agent");
    let id = enroll(&token, &state).await.unwrap();
    let log = dir.path().join("app.log");
    std::fs::write(&log, "").unwrap();
    let config = agent_config_file(dir.path(), &state, &[&log], "[host]\nenabled = false\n[docker]\nenabled = false");
    let _agent = AgentProcess::start_with_config(&config, &state);
    hub.wait_status(&id, "online", Duration::from_secs(20)).await;
    let writer = LineWriter::start(&log, Duration::from_millis(5));
    let logs = format!("/api/v1/agents/{id}/logs");
    wait_for(Duration::from_secs(30), "the writer to add 300 lines", || async {
        (std::fs::read_to_string(&log).unwrap().lines().count() >= 300).then_some(())
    })
    .await;
    assert_eq!(api.all_records(&logs, "").await.len(), 0, "over a hard quota, no log line is stored");
    // A bigger plan lets the held-back lines in, each once.
    assert_eq!(send_json(&api, "PUT", "/api/v1/orgs/acme/subscription", &json!({ "plan": "large" })).await.0, 200);
    let written = writer.stop();
    let records = wait_for(Duration::from_secs(60), "every held-back line", || async {
        let records = api.all_records(&logs, "").await;
        (records.len() as u64 >= written).then_some(records)
    })
    .await;
    assert_lines_exactly_once(&records, written);
    hub.stop().await;
}
