//! The usage ledger end to end: real agents send logs and events, the hub meters them into
//! the ledger when the hour closes (closed early here through the metering's own entry
//! point), and the ledger holds exactly what the hub stored: once, through re-runs, a hub
//! restart and duplicate injection; late usage becomes a correction; a conflicting re-record
//! is refused; the three export formats parse and agree.

#![allow(clippy::unwrap_used)]

use gantry_hub::billing::ledger::Metering;
use gantry_hub::billing::{hour_of, Meter, HOUR_MS};
use gantry_hub::store::{EntryKind, LedgerEntry, LedgerRecorded};
use gantry_shared::message::StreamClass;
use gantry_shared::telemetry::{LogLine, LogStream, Record, RecordBody};
use gantry_tests::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

const LINES: usize = 40;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Every hour up to the end of the current one.
fn close_all(hub: &TestHub, metering: &mut Metering) -> gantry_hub::billing::ledger::RunReport {
    let now = now_ms();
    metering.run_once(&hub.hub, now, hour_of(now) + HOUR_MS).unwrap()
}

/// Per hour: the summed bytes of an agent's log lines and the count of its events, as the
/// hub's query API returns them.
async fn stored_usage(api: &Api, agent: &str) -> (BTreeMap<i64, i64>, BTreeMap<i64, i64>) {
    let mut bytes = BTreeMap::new();
    for r in api.all_records(&format!("/api/v1/agents/{agent}/logs"), "").await {
        if r["kind"] == "log" {
            *bytes.entry(hour_of(r["ts_ms"].as_i64().unwrap())).or_default() += r["line"].as_str().unwrap().len() as i64;
        }
    }
    let mut events = BTreeMap::new();
    for r in api.all_records(&format!("/api/v1/agents/{agent}/events"), "").await {
        if r["kind"] == "event" {
            *events.entry(hour_of(r["ts_ms"].as_i64().unwrap())).or_default() += 1;
        }
    }
    (bytes, events)
}

fn all_entries(hub: &TestHub) -> Vec<LedgerEntry> {
    hub.hub.store.ledger_since(0, 1_000_000).unwrap()
}

/// `(source, hour) -> quantity` of one meter's usage entries.
fn usage_of(entries: &[LedgerEntry], meter: Meter) -> BTreeMap<(String, i64), i64> {
    entries.iter().filter(|e| e.meter == meter && e.kind == EntryKind::Usage).map(|e| ((e.source.clone(), e.hour_ms), e.quantity)).collect()
}

fn parse_csv(text: &str) -> Vec<BTreeMap<String, String>> {
    use std::io::Write;
    let script = "import csv, json, sys\nprint(json.dumps(list(csv.DictReader(sys.stdin))))";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 for the CSV check");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python csv parse failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_meters_agents_once_through_restarts_duplicates_and_exports() {
    let dir = TempDir::new("ledger");
    let data = dir.path().join("hub");
    // The background run happens at start only; the test drives the closes itself.
    let tweak = |c: &mut gantry_hub::config::Config| c.usage_close_interval_ms = 3_600_000;
    let hub = TestHub::start(&data, tweak).await;
    hub.create_org("acme", 10).await;
    let token = hub.token("acme", 2, "10m").await;
    let api = hub.api();

    let mut agents = Vec::new();
    let mut processes = Vec::new();
    for n in 0..2 {
        let state = dir.path().join(format!("agent-{n}"));
        let id = enroll(&token, &state).await.unwrap();
        let log = dir.path().join(format!("app-{n}.log"));
        let text: String = (0..LINES).map(|i| format!("agent {n} line {i:04} {}\n", "x".repeat(i))).collect();
        std::fs::write(&log, text).unwrap();
        let config = agent_config_file(dir.path(), &state, &[&log], "[host]\nenabled = false\n[docker]\nenabled = false");
        processes.push(AgentProcess::start_with_config(&config, &state));
        agents.push(id);
    }
    for id in &agents {
        let registry = &hub.hub.registry;
        wait_for(Duration::from_secs(30), "agent connected", || async { registry.is_connected(id).then_some(()) }).await;
        wait_for(Duration::from_secs(30), "lines and an event stored", || async {
            let logs = api.all_records(&format!("/api/v1/agents/{id}/logs"), "").await;
            let events = api.all_records(&format!("/api/v1/agents/{id}/events"), "").await;
            (logs.iter().filter(|r| r["kind"] == "log").count() == LINES && events.iter().any(|r| r["kind"] == "event")).then_some(())
        })
        .await;
    }
    // Deployments: revision 1 at creation, revision 2 by a change.
    let spec =
        |image: &str| json!({ "spec": { "name": "web", "services": [{ "name": "app", "image": image }] }, "targets": { "selector": { "role": "none" } } });
    let (status, created) = api.post("/api/v1/orgs/acme/deployments", &spec("busybox:1")).await;
    assert_eq!(status, 201, "{created}");
    let deployment = created["id"].as_str().unwrap().to_string();
    let bytes = serde_json::to_vec(&spec("busybox:2")).unwrap();
    let (status, _, body) = api.send("PUT", &format!("/api/v1/deployments/{deployment}"), Some("application/json"), bytes).await;
    assert_eq!(status, 200, "{body}");

    // A run while both agents are connected: agent hours and the hour's peak.
    let mut metering = Metering::default();
    let sampled_at = now_ms();
    metering.run_once(&hub.hub, sampled_at, i64::MIN).unwrap();
    for process in &mut processes {
        process.kill9().await;
    }
    // Anything in flight when the agents died is stored (or not) by now.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let report = close_all(&hub, &mut metering);
    assert_eq!(report.conflicts, 0);
    let entries = all_entries(&hub);
    let hour = hour_of(sampled_at);
    let mut expected_bytes = BTreeMap::new();
    let mut expected_events = BTreeMap::new();
    for id in &agents {
        let (bytes, events) = stored_usage(&api, id).await;
        expected_bytes.extend(bytes.into_iter().map(|(h, q)| ((id.clone(), h), q)));
        expected_events.extend(events.into_iter().map(|(h, q)| ((id.clone(), h), q)));
    }
    assert_eq!(usage_of(&entries, Meter::LogBytes), expected_bytes, "log bytes per agent and hour");
    assert_eq!(usage_of(&entries, Meter::Events), expected_events, "events per agent and hour");
    let agent_hours = usage_of(&entries, Meter::AgentHours);
    for id in &agents {
        assert_eq!(agent_hours.get(&(id.clone(), hour)), Some(&1), "agent hour of {id}");
    }
    assert!(agent_hours.values().all(|q| *q == 1));
    assert_eq!(usage_of(&entries, Meter::PeakAgents), BTreeMap::from([(("hub".to_string(), hour), 2)]));
    let deployments = usage_of(&entries, Meter::Deployments);
    let sources: Vec<&str> = deployments.keys().map(|(s, _)| s.as_str()).collect();
    assert_eq!(sources, [format!("{deployment}:1"), format!("{deployment}:2")]);
    assert!(entries.iter().all(|e| e.org == "acme" && e.kind == EntryKind::Usage));
    let total_bytes: i64 = expected_bytes.values().sum();
    let usage = hub.hub.store.ledger_usage("acme", 0, i64::MAX).unwrap();
    assert_eq!(usage[&Meter::LogBytes], total_bytes);
    assert_eq!(usage[&Meter::Events], expected_events.values().sum::<i64>());
    assert_eq!(usage[&Meter::PeakAgents], 2);

    // Running the closer again adds nothing.
    assert_eq!(close_all(&hub, &mut metering).appended, 0);

    // Late usage for the closed hour becomes a correction for exactly the difference.
    let store = &hub.hub.store;
    let late_agent = &agents[0];
    let mark = store.high_water(late_agent, StreamClass::Logs).unwrap();
    let late_line = "late line";
    let late = Record {
        seq: mark + 1,
        ts_unix_ms: now_ms(),
        body: RecordBody::Log(LogLine { source: "/late.log".into(), stream: LogStream::File, container: None, line: late_line.into() }),
    };
    store.ingest(late_agent, StreamClass::Logs, &[late]).await.unwrap();
    let report = close_all(&hub, &mut metering);
    assert_eq!((report.appended, report.late), (1, 1));
    let correction = all_entries(&hub).pop().unwrap();
    assert_eq!(correction.quantity, late_line.len() as i64);
    assert!(matches!(&correction.kind, EntryKind::Correction { reason, actor, .. } if reason == "late usage" && actor == "hub"));
    assert!(correction.source.starts_with(&format!("late:{late_agent}:")));
    assert_eq!(store.ledger_usage("acme", 0, i64::MAX).unwrap()[&Meter::LogBytes], total_bytes + late_line.len() as i64);

    // A hub restart, its own metering run and another close add nothing.
    let head = store.ledger_head().unwrap();
    let usage = store.ledger_usage("acme", 0, i64::MAX).unwrap();
    hub.stop().await;
    let hub = TestHub::start(&data, tweak).await;
    let mut metering = Metering::default();
    assert_eq!(close_all(&hub, &mut metering).appended, 0);
    let store = &hub.hub.store;
    assert_eq!(store.ledger_head().unwrap(), head);
    assert_eq!(store.ledger_usage("acme", 0, i64::MAX).unwrap(), usage);

    // Duplicate injection: re-record 10 %, 50 % and 100 % of the entries.
    let entries = all_entries(&hub);
    for every in [10, 2, 1] {
        let resend: Vec<LedgerEntry> = entries.iter().step_by(every).map(|e| LedgerEntry { seq: 0, recorded_at_ms: now_ms(), ..e.clone() }).collect();
        for outcome in store.record_many(&resend) {
            assert!(matches!(outcome, Ok(LedgerRecorded::Duplicate { .. })), "{outcome:?}");
        }
        assert_eq!(store.ledger_usage("acme", 0, i64::MAX).unwrap(), usage, "after resending 1 in {every}");
        assert_eq!(store.ledger_head().unwrap(), head);
    }
    // A conflicting re-record is refused, counted, and changes nothing.
    let victim = entries.iter().find(|e| e.meter == Meter::LogBytes).unwrap();
    let conflicts = store.ledger_conflicts();
    let refused = store.record(&LedgerEntry { quantity: victim.quantity + 1, ..victim.clone() }).unwrap_err();
    assert!(refused.to_string().contains(&victim.key_text()), "{refused}");
    assert_eq!(store.ledger_conflicts(), conflicts + 1);
    let (_, _, metrics) = hub.api().send("GET", "/metrics", None, Vec::new()).await;
    assert!(metrics.contains(&format!("gantry_ledger_conflicts_total {}", conflicts + 1)), "{metrics}");
    assert_eq!(store.ledger_usage("acme", 0, i64::MAX).unwrap(), usage);

    // An operator's correction, idempotent by its id.
    let api = hub.api();
    let body = json!({ "org": "acme", "meter": "events", "quantity": -1, "reason": "goodwill, \"one\" event", "id": "c1" });
    let (status, answer) = api.post("/api/v1/billing/corrections", &body).await;
    assert_eq!(status, 201, "{answer}");
    // The operator key made it: the actor is what the audit trail names it by.
    assert!(answer["entry"]["actor"].as_str().unwrap().starts_with("key:"), "{answer}");
    let (status, answer) = api.post("/api/v1/billing/corrections", &body).await;
    assert_eq!((status, answer["duplicate"].clone()), (200, json!(true)));
    let (status, _) = api.post("/api/v1/billing/corrections", &json!({ "org": "acme", "meter": "events", "quantity": -2, "reason": "x", "id": "c1" })).await;
    assert_eq!(status, 409);

    // Exports: all three formats parse and agree with each other and with the ledger.
    let range = format!("from=0&to={}&org=acme", hour_of(now_ms()) + 2 * HOUR_MS);
    let (status, export) = api.get(&format!("/api/v1/billing/usage?{range}&format=json")).await;
    assert_eq!(status, 200, "{export}");
    let rows = export["entries"].as_array().unwrap();
    assert_eq!(rows.len(), all_entries(&hub).len());
    let usage_now = hub.hub.store.ledger_usage("acme", 0, i64::MAX).unwrap();
    for (meter, quantity) in &usage_now {
        assert_eq!(export["totals"]["acme"][meter.name()], json!(quantity));
    }
    let (status, _, csv) = api.send("GET", &format!("/api/v1/billing/usage?{range}&format=csv"), None, Vec::new()).await;
    assert_eq!(status, 200);
    let csv_rows = parse_csv(&csv);
    let (status, _, lines) = api.send("GET", &format!("/api/v1/billing/usage?{range}&format=cloudevents"), None, Vec::new()).await;
    assert_eq!(status, 200);
    let events: Vec<Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!((csv_rows.len(), events.len()), (rows.len(), rows.len()));
    for ((row, csv_row), event) in rows.iter().zip(&csv_rows).zip(&events) {
        assert_eq!(csv_row["id"], row["id"].as_str().unwrap());
        assert_eq!(csv_row["quantity"], row["quantity"].to_string());
        assert_eq!(csv_row["meter"], row["meter"].as_str().unwrap());
        assert_eq!(csv_row["source"], row["source"].as_str().unwrap());
        assert_eq!(csv_row["reason"], row["reason"].as_str().unwrap_or(""));
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["id"], row["id"]);
        assert_eq!(event["subject"], "acme");
        assert_eq!(event["type"], format!("dev.gantry.usage.{}", row["meter"].as_str().unwrap()));
        assert_eq!(event["time"], row["hour_start"]);
        assert_eq!(&event["data"], row);
    }
    let ids: std::collections::BTreeSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), events.len(), "CloudEvents ids are unique");
    // The CLI reads the same export through the API.
    let output = tokio::process::Command::new(hub_binary())
        .args(["billing", "export", "--from", "1970-01-01T00:00:00Z", "--to", &(hour_of(now_ms()) + 2 * HOUR_MS).to_string(), "--org", "acme"])
        .args(["--url", &format!("http://{}", hub.http)])
        .env("GANTRY_API_KEY", &hub.operator_key)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8(output.stdout).unwrap(), csv);

    // A missing org and an unknown format are refused.
    let (status, _) = api.get("/api/v1/billing/usage?from=0&to=1&org=nope").await;
    assert_eq!(status, 404);
    let (status, _) = api.get(&format!("/api/v1/billing/usage?{range}&format=xml")).await;
    assert_eq!(status, 400);
    hub.stop().await;
}
