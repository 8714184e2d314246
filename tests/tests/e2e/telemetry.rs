//! Telemetry end to end: lines from a file reach the hub exactly once, in order, through
//! agent kill -9s, hub kill -9s and outages; a full spool drops oldest with a visible gap;
//! host metrics and agent events arrive.

#![allow(clippy::unwrap_used)]

use gantry_tests::*;
use std::time::Duration;

async fn hub_with_agent(dir: &TempDir) -> (TestHub, String, std::path::PathBuf) {
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 10).await;
    let token = hub.token("acme", 1, "10m").await;
    let state = dir.path().join("agent");
    let id = enroll(&token, &state).await.unwrap();
    (hub, id, state)
}

async fn wait_lines(api: &Api, id: &str, n: u64, limit: Duration) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let records = api.all_records(&format!("/api/v1/agents/{id}/logs"), "").await;
        let count = records.iter().filter(|r| r["kind"] == "log" && r["stream"] == "file").count() as u64;
        if count >= n {
            return records;
        }
        if std::time::Instant::now() > deadline {
            // Say which lines are missing rather than only that some are.
            assert_lines_exactly_once(&records, n);
            panic!("timed out after {limit:?} waiting for {n} lines at the hub ({count} arrived)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_lines_arrive_exactly_once_through_fifty_agent_kills() {
    let dir = TempDir::new("kill-agent");
    let (hub, id, state) = hub_with_agent(&dir).await;
    let log = dir.path().join("app.log");
    let config = agent_config_file(dir.path(), &state, &[&log], "[host]\nenabled = false\n[docker]\nenabled = false");
    let writer = LineWriter::start(&log, Duration::from_millis(1));
    let mut seed: u64 = 0x2545F4914F6CDD1D;
    for _ in 0..50 {
        let mut agent = AgentProcess::start_with_config(&config, &state);
        // Kill at a random moment: sometimes before the first connection, sometimes
        // mid-batch.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(20 + seed % 400)).await;
        agent.kill9().await;
    }
    let _agent = AgentProcess::start_with_config(&config, &state);
    let written = writer.stop();
    let records = wait_lines(&hub.api(), &id, written, Duration::from_secs(60)).await;
    assert_lines_exactly_once(&records, written);
    eprintln!("{written} lines, 50 agent kills: every line exactly once");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_lines_arrive_exactly_once_through_ten_hub_kills() {
    let dir = TempDir::new("kill-hub");
    let data = dir.path().join("hub");
    let (http, quic) = free_addrs();
    let mut hub = HubProcess::start(&data, http, quic).await;
    let api = hub.api(&data);
    let (status, _) = api.post("/api/v1/orgs", &serde_json::json!({ "id": "acme" })).await;
    assert_eq!(status, 201);
    let (_, body) = api.post("/api/v1/orgs/acme/enrollment-tokens", &serde_json::json!({})).await;
    let state = dir.path().join("agent");
    let id = enroll(body["token"].as_str().unwrap(), &state).await.unwrap();
    let log = dir.path().join("app.log");
    let config = agent_config_file(dir.path(), &state, &[&log], "[host]\nenabled = false\n[docker]\nenabled = false");
    let writer = LineWriter::start(&log, Duration::from_millis(1));
    let _agent = AgentProcess::start_with_config(&config, &state);
    let mut seed: u64 = 0x9E3779B97F4A7C15;
    for _ in 0..10 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Let some batches through, then crash the hub mid-stream.
        wait_for(Duration::from_secs(20), "the agent streaming", || async {
            let (_, body) = api.get(&format!("/api/v1/agents/{id}")).await;
            (body["status"] == "online").then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100 + seed % 500)).await;
        hub.kill9().await;
        hub = HubProcess::start(&data, http, quic).await;
    }
    let written = writer.stop();
    let records = wait_lines(&api, &id, written, Duration::from_secs(60)).await;
    assert_lines_exactly_once(&records, written);
    eprintln!("{written} lines, 10 hub kills: every line exactly once");
    hub.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_is_buffered_and_a_full_spool_leaves_a_visible_gap() {
    let dir = TempDir::new("outage");
    let data = dir.path().join("hub");
    let (http, quic) = free_addrs();
    let mut hub = HubProcess::start(&data, http, quic).await;
    let api = hub.api(&data);
    api.post("/api/v1/orgs", &serde_json::json!({ "id": "acme" })).await;
    let (_, body) = api.post("/api/v1/orgs/acme/enrollment-tokens", &serde_json::json!({})).await;
    let state = dir.path().join("agent");
    let id = enroll(body["token"].as_str().unwrap(), &state).await.unwrap();
    let log = dir.path().join("app.log");
    // A 64 KiB log cap: about a thousand of these lines fit.
    let config = agent_config_file(dir.path(), &state, &[&log], "[host]\nenabled = false\n[spool]\nlogs_bytes = 65536");
    let _agent = AgentProcess::start_with_config(&config, &state);
    wait_for(Duration::from_secs(20), "agent online", || async {
        let (_, body) = api.get(&format!("/api/v1/agents/{id}")).await;
        (body["status"] == "online").then_some(())
    })
    .await;

    // Hub down; the agent keeps collecting far more than its cap.
    hub.kill9().await;
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        for n in 0..20_000u64 {
            writeln!(file, "line-{n:08} {}", "x".repeat(40)).unwrap();
        }
    }
    // Wait until the agent has spooled the end of the file (the spool stays within cap).
    wait_for(Duration::from_secs(30), "agent spooled the whole file", || async {
        let spool_bytes: u64 = walk_size(&state.join("spool"));
        (spool_bytes > 0).then_some(())
    })
    .await;
    let hub = HubProcess::start(&data, http, quic).await;
    let records = wait_for(Duration::from_secs(60), "the newest line and a gap at the hub", || async {
        let records = api.all_records(&format!("/api/v1/agents/{id}/logs"), "").await;
        let has_last = records.iter().any(|r| r["line"].as_str().is_some_and(|l| l.starts_with("line-00019999")));
        let has_gap = records.iter().any(|r| r["kind"] == "gap");
        (has_last && has_gap).then_some(records)
    })
    .await;
    let gap = records.iter().find(|r| r["kind"] == "gap").unwrap();
    let dropped = gap["records"].as_u64().unwrap();
    assert!(dropped > 10_000, "most of the 20,000 lines were dropped: {gap}");
    assert!(gap["message"].as_str().unwrap().contains("dropped"), "{gap}");
    // Lines after the gap are the newest ones, complete and in order.
    let kept: Vec<u64> =
        records.iter().filter_map(|r| r["line"].as_str()).filter_map(|l| l.strip_prefix("line-")).map(|l| l[..8].parse::<u64>().unwrap()).collect();
    assert!(kept.windows(2).all(|w| w[1] == w[0] + 1), "kept lines are contiguous");
    assert_eq!(*kept.last().unwrap(), 19_999);
    // The drop is counted in the hub's metrics and raised as an agent event.
    let (_, _, metrics) = api.anonymous().send("GET", "/metrics", None, vec![]).await;
    assert!(metrics.lines().any(|l| l.starts_with("gantry_agent_spool_dropped_records_total{class=\"logs\"}") && !l.ends_with(" 0")), "{metrics}");
    let events = api.all_records(&format!("/api/v1/agents/{id}/events"), "&kind=spool.dropped").await;
    assert!(!events.is_empty(), "a spool.dropped event");
    let mut hub = hub;
    hub.kill9().await;
}

fn walk_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.filter_map(Result::ok).map(|e| if e.path().is_dir() { walk_size(&e.path()) } else { e.metadata().map(|m| m.len()).unwrap_or(0) }).sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_metrics_and_agent_events_arrive() {
    let dir = TempDir::new("host");
    let (hub, id, state) = hub_with_agent(&dir).await;
    let config = agent_config_file(dir.path(), &state, &[], "[host]\ninterval_secs = 1");
    let _agent = AgentProcess::start_with_config(&config, &state);
    let api = hub.api();
    let names = wait_for(Duration::from_secs(30), "host metrics", || async {
        let (_, body) = api.get(&format!("/api/v1/agents/{id}/metrics")).await;
        let names: Vec<String> = body["names"].as_array()?.iter().filter_map(|n| n.as_str().map(String::from)).collect();
        names.iter().any(|n| n == "net.received_bytes_per_second").then_some(names)
    })
    .await;
    for expected in ["cpu.usage_percent", "memory.used_bytes", "disk.used_percent", "load.1m", "processes", "uptime_seconds"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
    let (status, body) = api.get(&format!("/api/v1/agents/{id}/metrics?name=memory.total_bytes&step=10s")).await;
    assert_eq!(status, 200, "{body}");
    let points = body["series"][0]["points"].as_array().unwrap();
    assert!(points[0][1].as_f64().unwrap() > 0.0);
    let events = api.all_records(&format!("/api/v1/agents/{id}/events"), "").await;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert!(kinds.contains(&"agent.started") && kinds.contains(&"agent.config_changed"), "{kinds:?}");
    let (status, body) = api.get(&format!("/api/v1/agents/{id}/metrics?name=cpu.usage_percent&step=0")).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = api.get(&format!("/api/v1/agents/{id}/logs?limit=5000")).await;
    assert_eq!(status, 400);
    let (status, _) = api.get(&format!("/api/v1/agents/{id}/logs?from=yesterday")).await;
    assert_eq!(status, 400);
    hub.stop().await;
}

/// A Server-Sent Events connection, read incrementally.
fn numbers(events: &[(String, serde_json::Value)]) -> Vec<u64> {
    events.iter().map(|(_, e)| e["line"].as_str().unwrap()[5..].parse().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tail_continues_seamlessly_from_history() {
    use std::io::Write;
    let dir = TempDir::new("tail");
    let (hub, id, state) = hub_with_agent(&dir).await;
    let log = dir.path().join("app.log");
    let mut file = std::fs::File::create(&log).unwrap();
    for n in 0..30u64 {
        writeln!(file, "line-{n:08}").unwrap();
    }
    let config = agent_config_file(dir.path(), &state, &[&log], "[host]\nenabled = false\n[docker]\nenabled = false");
    let _agent = AgentProcess::start_with_config(&config, &state);
    let api = hub.api();
    wait_lines(&api, &id, 30, Duration::from_secs(20)).await;
    // History (the last 10), then live lines written after the tail started.
    let mut tail = SseReader::open(&api, &format!("/api/v1/agents/{id}/logs/stream?tail=10"), None).await;
    let history = tail.next(10).await;
    assert_eq!(numbers(&history), (20..30).collect::<Vec<_>>());
    {
        let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        for n in 30..60u64 {
            writeln!(file, "line-{n:08}").unwrap();
        }
    }
    let live = tail.next(30).await;
    assert_eq!(numbers(&live), (30..60).collect::<Vec<_>>(), "each line exactly once, in order");
    // Reconnecting with Last-Event-ID resumes right after it.
    let (resume_id, _) = &live[9];
    let mut resumed = SseReader::open(&api, &format!("/api/v1/agents/{id}/logs/stream"), Some(resume_id)).await;
    assert_eq!(numbers(&resumed.next(20).await), (40..60).collect::<Vec<_>>());
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_in_both_styles_with_agent_restarts_loses_nothing() {
    use std::io::Write;
    let dir = TempDir::new("rotate");
    let (hub, id, state) = hub_with_agent(&dir).await;
    let log = dir.path().join("app.log");
    std::fs::File::create(&log).unwrap();
    // Rotations here come every half second (real ones come hours apart), so the renamed
    // file is read for 100 ms rather than the default 5 s before the new one is started.
    let config = agent_config_file(dir.path(), &state, &[&log], "files.rotate_wait_ms = 100\n[host]\nenabled = false\n[docker]\nenabled = false");
    let mut agent = AgentProcess::start_with_config(&config, &state);
    let total = 3000u64;
    let path = log.clone();
    let writer = std::thread::spawn(move || {
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        let mut rotations = 0;
        for n in 0..total {
            writeln!(file, "line-{n:08}").unwrap();
            if n % 500 == 499 {
                rotations += 1;
                if rotations % 2 == 1 {
                    // logrotate's default: rename, then create a new file.
                    std::fs::rename(&path, path.with_extension(format!("log.{rotations}"))).unwrap();
                    // Writers of copytruncated logs must append (O_APPEND), or the next
                    // truncation leaves a hole of NUL bytes before their next line.
                    file = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
                } else {
                    // copytruncate: copy, then truncate in place (the writer keeps its handle).
                    std::fs::copy(&path, path.with_extension(format!("log.{rotations}"))).unwrap();
                    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
                }
            }
            std::thread::sleep(Duration::from_micros(700));
        }
    });
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        agent.kill9().await;
        agent = AgentProcess::start_with_config(&config, &state);
    }
    tokio::task::spawn_blocking(move || writer.join().unwrap()).await.unwrap();
    let records = wait_lines(&hub.api(), &id, total, Duration::from_secs(60)).await;
    assert_lines_exactly_once(&records, total);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_spool_is_repaired_or_set_aside_and_the_agent_carries_on() {
    use std::io::Write;
    let dir = TempDir::new("damaged");
    let (hub, id, state) = hub_with_agent(&dir).await;
    let log = dir.path().join("app.log");
    let mut file = std::fs::File::create(&log).unwrap();
    writeln!(file, "line-00000000").unwrap();
    let config = agent_config_file(dir.path(), &state, &[&log], "[host]\nenabled = false\n[docker]\nenabled = false");
    let mut agent = AgentProcess::start_with_config(&config, &state);
    wait_lines(&hub.api(), &id, 1, Duration::from_secs(20)).await;
    agent.kill9().await;
    // Garbage over the store's config file: sled refuses the whole store; the agent sets
    // the file aside, keeps the records and says so.
    let spool = state.join("spool");
    std::fs::write(spool.join("conf"), vec![0xA5u8; 64]).unwrap();
    writeln!(file, "line-00000001").unwrap();
    let mut agent = AgentProcess::start_with_config(&config, &state);
    let api = hub.api();
    wait_for(Duration::from_secs(30), "a spool.repaired event", || async {
        let events = api.all_records(&format!("/api/v1/agents/{id}/events"), "&kind=spool.repaired").await;
        (!events.is_empty()).then_some(())
    })
    .await;
    wait_lines(&api, &id, 2, Duration::from_secs(20)).await;
    agent.kill9().await;

    // Garbage over the whole data file as well: if sled cannot make sense of it the store
    // is moved aside and a fresh one started; either way the agent runs on and reports it.
    for name in ["conf", "db"] {
        let path = spool.join(name);
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0).clamp(64, 1 << 20) as usize;
        std::fs::write(&path, vec![0x5Au8; len]).unwrap();
    }
    let _agent = AgentProcess::start_with_config(&config, &state);
    wait_for(Duration::from_secs(30), "a report of the damage", || async {
        let events = api.all_records(&format!("/api/v1/agents/{id}/events"), "&kind=spool.").await;
        let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
        let reported = kinds.iter().filter(|k| ["spool.repaired", "spool.quarantined", "spool.rolled_back"].contains(k)).count();
        (reported >= 2).then_some(())
    })
    .await;
    // New lines still flow, numbered after everything the hub has (no seq reuse, no drop as
    // a duplicate).
    writeln!(file, "line-00000002").unwrap();
    wait_for(Duration::from_secs(30), "lines after the damage", || async {
        let records = api.all_records(&format!("/api/v1/agents/{id}/logs"), "").await;
        records.iter().any(|r| r["line"] == "line-00000002").then_some(())
    })
    .await;
    hub.stop().await;
}
