//! Agent lifecycle against a real hub: enroll, online, kill -9, offline, back online, hub
//! restart with drain, revocation, certificate renewal and expiry.

#![allow(clippy::unwrap_used)]

use gantry_tests::*;
use std::time::{Duration, Instant};

fn agent_id_of(state: &std::path::Path) -> String {
    let identity: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(state.join("identity.json")).unwrap()).unwrap();
    identity["agent_id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_survives_kill9_and_hub_restart() {
    let dir = TempDir::new("lifecycle");
    let hub_dir = dir.path().join("hub");
    let hub = TestHub::start(&hub_dir, |_| {}).await;
    hub.create_org("acme", 10).await;
    let token = hub.token("acme", 1, "10m").await;
    let state = dir.path().join("agent");
    let (code, stdout, stderr) = agent_cli(&["enroll", "--token", &token, "--state-dir", state.to_str().unwrap()]).await;
    assert_eq!(code, 0, "enroll failed: {stderr}");
    assert!(stdout.contains("enrolled as agt_"), "{stdout}");
    for file in ["agent.key", "agent.crt"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.join(file)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file} mode");
    }
    let id = agent_id_of(&state);

    let mut agent = AgentProcess::start(&state);
    let online = hub.wait_status(&id, "online", Duration::from_secs(10)).await;
    assert_eq!(online["org"], "acme");
    assert!(!online["hostname"].as_str().unwrap().is_empty());
    assert!(online["cpu_count"].as_u64().unwrap() >= 1);
    assert!(online["memory_bytes"].as_u64().unwrap() > 0);
    assert_eq!(online["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(online["rtt_ms"].is_number() && online["clock_skew_ms"].is_number(), "{online}");
    assert!(online["cert_expires_at"].as_str().unwrap().starts_with("20"));

    // Vanish without a word: offline within 30 s.
    agent.kill9().await;
    hub.wait_status(&id, "offline", Duration::from_secs(30)).await;

    // Back: online within 5 s of the process starting.
    let _agent = AgentProcess::start(&state);
    let back = hub.wait_status(&id, "online", Duration::from_secs(5)).await;
    assert!(back["last_seen"].is_string());

    // Hub restart on the same addresses: the agent is drained and returns unaided.
    let (http, quic) = (hub.http, hub.quic);
    hub.stop().await;
    let started = Instant::now();
    let hub = TestHub::start_at(&hub_dir, http, quic, |_| {}).await;
    hub.wait_status(&id, "online", Duration::from_secs(20)).await;
    eprintln!("agent back {:?} after hub restart", started.elapsed());
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_agent_is_disconnected_and_refused() {
    let dir = TempDir::new("revoke");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 1).await;
    let token = hub.token("acme", 2, "10m").await;
    let state = dir.path().join("agent");
    let id = enroll(&token, &state).await.unwrap();
    let agent = InProcessAgent::start(&state);
    hub.wait_status(&id, "online", Duration::from_secs(10)).await;

    let revoked_at = Instant::now();
    let (status, body) = hub.api().post(&format!("/api/v1/agents/{id}/revoke"), &serde_json::json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "revoked");
    // The live connection closes within 5 s and the agent stops with a clear reason.
    let ended = tokio::time::timeout(Duration::from_secs(5), agent.task).await.expect("agent not disconnected within 5 s");
    let error = ended.unwrap().unwrap_err();
    assert!(error.to_string().contains("revoked"), "{error}");
    eprintln!("revoked agent disconnected after {:?}", revoked_at.elapsed());

    // Reconnecting is refused with the same clear message.
    let (code, _, stderr) = agent_cli(&["run", "--state-dir", state.to_str().unwrap()]).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("revoked by an operator"), "{stderr}");

    // The revoked agent no longer counts against the org limit of 1.
    let other = dir.path().join("other");
    enroll(&token, &other).await.expect("slot freed by revocation");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_stream_follows_agents_online_offline_and_revoked_within_the_callers_orgs() {
    let dir = TempDir::new("fleet-stream");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    hub.create_org("globex", 5).await;
    let state = dir.path().join("agent");
    let id = enroll(&hub.token("acme", 1, "10m").await, &state).await.unwrap();
    let other = enroll(&hub.token("globex", 1, "10m").await, &dir.path().join("globex-agent")).await.unwrap();
    let operator = hub.api();
    let (code, key) = operator.post("/api/v1/orgs/acme/api-keys", &serde_json::json!({ "name": "wall", "scopes": ["read"] })).await;
    assert_eq!(code, 201, "{key}");
    let reader = operator.with_bearer(key["key"].as_str().unwrap());

    // An acme key sees acme's agent, nothing of globex, and may not ask for globex.
    let mut stream = SseReader::open(&reader, "/api/v1/agents/stream", None).await;
    let first = stream.events(1).await.remove(0);
    assert_eq!((first.event.as_str(), first.data["id"].as_str(), first.data["status"].as_str()), ("agent", Some(id.as_str()), Some("offline")));
    assert_eq!(reader.get("/api/v1/agents/stream?org=globex").await.0, 404);
    // The operator sees both orgs.
    let mut all = SseReader::open(&operator, "/api/v1/agents/stream", None).await;
    let mut seen: Vec<String> = all.events(2).await.iter().map(|e| e.data["id"].as_str().unwrap().to_string()).collect();
    seen.sort();
    let mut expected = vec![id.clone(), other.clone()];
    expected.sort();
    assert_eq!(seen, expected);

    // Online, offline and revoked arrive as they happen, without asking again.
    // (A 30 s refresh may repeat the current status in between; nothing else may come.)
    async fn next_status(stream: &mut SseReader, id: &str, current: &str, want: &str) -> serde_json::Value {
        loop {
            let event = stream.events(1).await.remove(0);
            assert_eq!(event.data["id"].as_str(), Some(id), "{:?}", event.data);
            match event.data["status"].as_str() {
                Some(status) if status == want => return event.data,
                Some(status) if status == current => continue,
                other => panic!("status {other:?} between {current} and {want}"),
            }
        }
    }
    let agent = InProcessAgent::start(&state);
    let online = next_status(&mut stream, &id, "offline", "online").await;
    assert!(online["rtt_ms"].as_f64().is_some() && online["last_seen"].is_string(), "{online}");
    let _ = agent.stop().await;
    next_status(&mut stream, &id, "online", "offline").await;
    assert_eq!(operator.post(&format!("/api/v1/agents/{id}/revoke"), &serde_json::json!({})).await.0, 200);
    next_status(&mut stream, &id, "offline", "revoked").await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_is_renewed_over_the_live_connection() {
    let dir = TempDir::new("renew");
    let hub = TestHub::start(&dir.path().join("hub"), |c| c.agent_cert_lifetime_secs = 15).await;
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 1, "10m").await;
    let state = dir.path().join("agent");
    let id = enroll(&token, &state).await.unwrap();
    let first_cert = std::fs::read(state.join("agent.crt")).unwrap();
    let before = hub.agent(&id).await["cert_expires_at"].clone();
    let agent = InProcessAgent::start(&state);
    hub.wait_status(&id, "online", Duration::from_secs(10)).await;

    // Renewal at about two thirds of 15 s (plus backdating), over the same connection.
    wait_for(Duration::from_secs(30), "certificate renewal", || async { (std::fs::read(state.join("agent.crt")).unwrap() != first_cert).then_some(()) }).await;
    let after = hub.wait_status(&id, "online", Duration::from_secs(5)).await;
    assert_ne!(after["cert_expires_at"], before, "hub records the new expiry");
    let (_, metrics, _) = hub.api().anonymous().send("GET", "/metrics", None, vec![]).await;
    let _ = metrics;
    let (_, _, text) = hub.api().anonymous().send("GET", "/metrics", None, vec![]).await;
    assert!(text.lines().any(|l| l.starts_with("gantry_certificates_renewed_total ") && !l.ends_with(" 0")), "{text}");

    // The renewed certificate works for a new connection.
    agent.stop().await.unwrap();
    hub.wait_status(&id, "offline", Duration::from_secs(10)).await;
    let agent = InProcessAgent::start(&state);
    hub.wait_status(&id, "online", Duration::from_secs(10)).await;
    agent.stop().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_tells_the_operator_to_re_enroll() {
    let dir = TempDir::new("expired");
    let hub = TestHub::start(&dir.path().join("hub"), |c| c.agent_cert_lifetime_secs = 10).await;
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 1, "10m").await;
    let state = dir.path().join("agent");
    enroll(&token, &state).await.unwrap();
    let not_after = {
        let pem = std::fs::read_to_string(state.join("agent.crt")).unwrap();
        let der = rustls::pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes()).next().unwrap().unwrap();
        let _: &rustls::pki_types::CertificateDer = &der;
        gantry_agent::state::validity(&der).unwrap().1
    };
    wait_for(Duration::from_secs(20), "certificate expiry", || async { (gantry_agent::wall_ms() / 1000 > not_after).then_some(()) }).await;
    let (code, _, stderr) = agent_cli(&["run", "--state-dir", state.to_str().unwrap()]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("certificate expired") && stderr.contains("re-enroll"), "{stderr}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reconnect_after_the_hub_is_killed_and_restarted() {
    let dir = TempDir::new("hub-kill");
    let data = dir.path().join("hub");
    let (http, quic) = free_addrs();
    let mut hub = HubProcess::start(&data, http, quic).await;
    let api = hub.api(&data);
    let (status, body) = api.post("/api/v1/orgs", &serde_json::json!({ "id": "acme" })).await;
    assert_eq!(status, 201, "{body}");
    let (_, body) = api.post("/api/v1/orgs/acme/enrollment-tokens", &serde_json::json!({ "uses": 2 })).await;
    let token = body["token"].as_str().unwrap().to_string();
    let mut agents = Vec::new();
    let mut ids = Vec::new();
    for name in ["one", "two"] {
        let state = dir.path().join(name);
        ids.push(enroll(&token, &state).await.unwrap());
        agents.push(AgentProcess::start(&state));
    }
    let online = |api: Api, id: String, limit: Duration| async move {
        wait_for(limit, &format!("{id} online"), || async {
            let (_, body) = api.get(&format!("/api/v1/agents/{id}")).await;
            (body["status"] == "online").then_some(())
        })
        .await
    };
    for id in &ids {
        online(api.clone(), id.clone(), Duration::from_secs(20)).await;
    }

    // Crash the hub: no drain, nothing flushed on the way out.
    hub.kill9().await;
    let mut hub = HubProcess::start(&data, http, quic).await;
    let api = hub.api(&data);
    // The restarted hub resets the agents' dead connections (its reset key survives the
    // crash) as soon as each agent next sends (heartbeats every 5 s), so they are back
    // within one heartbeat interval plus a short backoff, not after a liveness timeout.
    for id in &ids {
        online(api.clone(), id.clone(), Duration::from_secs(10)).await;
    }
    // Everything acknowledged before the crash is still there.
    let (_, org) = api.get("/api/v1/orgs/acme").await;
    assert_eq!(org["agent_count"], 2);
    hub.kill9().await;
}
