//! Deployments end to end on the real Docker engine: the hub pushes a revision, the agent
//! applies it behind a health gate, a bad revision rolls back on its own while the old
//! container keeps serving, an agent that was offline converges when it returns, and
//! deleting the deployment removes its containers. Images are built locally.

#![allow(clippy::unwrap_used)]

use gantry_agent::collector::docker::testing::{cli, docker, IMAGE};
use gantry_tests::deploys::{containers_of, wait_deploy_state as wait_state, ContainerGuard};
use gantry_tests::*;
use serde_json::{json, Value};
use std::time::Duration;

fn spec(port: u16, script: &str) -> Value {
    json!({
        "name": "web",
        "services": [{
            "name": "app",
            "image": IMAGE,
            "command": ["sh", "-c", script],
            "ports": [{ "host": port, "container": 80, "host_ip": "127.0.0.1" }],
            "health": { "http": { "port": port, "path": "/health" } }
        }],
        "order": "stop_first",
        "health_gate": { "min_healthy_secs": 1, "deadline_secs": 15 }
    })
}

const GOOD: &str = "mkdir -p /www && echo ok > /www/health && httpd -f -p 80 -h /www";
const BAD: &str = "echo starting; echo broken >&2; exit 3";

async fn http_ok(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return false };
    if stream.write_all(b"GET /health HTTP/1.0\r\n\r\n").await.is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply).await;
    reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_roll_back_converge_and_remove() {
    if docker().await.is_none() {
        return;
    }
    let dir = TempDir::new("deploy");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    let (_, body) = hub.api().post("/api/v1/orgs/acme/enrollment-tokens", &json!({ "uses": 1, "labels": { "role": "web" } })).await;
    let state = dir.path().join("agent");
    let agent_id = enroll(body["token"].as_str().unwrap(), &state).await.unwrap();
    let config = agent_config_file(dir.path(), &state, &[], "[host]\nenabled = false\n[docker.logs]\nenabled = false");
    let mut agent = AgentProcess::start_with_config(&config, &state);
    let api = hub.api();
    hub.wait_status(&agent_id, "online", Duration::from_secs(20)).await;
    let port = free_tcp_addr().port();

    // Revision 1: healthy, serving.
    let (status, created) = api.post("/api/v1/orgs/acme/deployments", &json!({ "spec": spec(port, GOOD), "targets": { "selector": { "role": "web" } } })).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    guard_containers(&id);
    wait_state(&api, &id, &agent_id, 1, "healthy").await;
    assert!(http_ok(port).await);

    // Revision 2 is broken: the agent rolls back by itself and the old container serves.
    let body = json!({ "spec": spec(port, BAD), "targets": { "selector": { "role": "web" } } });
    let (status, _, reply) = api.send("PUT", &format!("/api/v1/deployments/{id}"), Some("application/json"), body.to_string().into_bytes()).await;
    assert_eq!(status, 200, "{reply}");
    let rolled = wait_state(&api, &id, &agent_id, 2, "rolled_back").await;
    assert_eq!(rolled["rolled_back_to"], 1);
    assert!(rolled["message"].as_str().unwrap().contains("exit code 3"), "{rolled}");
    assert!(http_ok(port).await, "the previous revision serves again");
    assert_eq!(containers_of(&id).len(), 1, "nothing of the bad revision is left: {:?}", containers_of(&id));

    // Offline when a fix is deployed: applied on reconnect.
    agent.kill9().await;
    hub.wait_status(&agent_id, "offline", Duration::from_secs(30)).await;
    let fixed = spec(port, &format!("{GOOD} # v3"));
    let (status, _, _) = api
        .send(
            "PUT",
            &format!("/api/v1/deployments/{id}"),
            Some("application/json"),
            json!({ "spec": fixed, "targets": { "selector": { "role": "web" } } }).to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 200);
    let _agent = AgentProcess::start_with_config(&config, &state);
    wait_state(&api, &id, &agent_id, 3, "healthy").await;
    assert!(http_ok(port).await);
    assert_eq!(containers_of(&id).len(), 1, "no duplicate containers after the restart");

    // Progress reached the hub as events.
    let events = api.all_records(&format!("/api/v1/agents/{agent_id}/events"), "&kind=deploy.").await;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    for expected in ["deploy.creating", "deploy.waiting_for_health", "deploy.healthy", "deploy.rolled_back"] {
        assert!(kinds.contains(&expected), "{expected} missing from {kinds:?}");
    }

    // Deleting removes the containers.
    let (status, _, _) = api.send("DELETE", &format!("/api/v1/deployments/{id}"), None, vec![]).await;
    assert_eq!(status, 200);
    wait_state(&api, &id, &agent_id, 3, "removed").await;
    assert!(containers_of(&id).is_empty());

    // The audit log has the orders (API calls, in the deployment's org) and the reports.
    let (_, audit) = api.get("/api/v1/orgs/acme/audit?limit=1000").await;
    let entries = audit["entries"].as_array().unwrap();
    let delete = entries.iter().find(|e| e["action"] == "DELETE /api/v1/deployments/{id}").expect("delete audited");
    assert_eq!((&delete["target"]["id"], &delete["outcome"]), (&json!(id), &json!("200")));
    let reports: Vec<(&str, &str)> = entries
        .iter()
        .filter(|e| e["action"] == "deploy.report" && e["actor"] == format!("agent:{agent_id}") && e["target"]["deployment"] == id.as_str())
        .map(|e| (e["target"]["revision"].as_str().unwrap(), e["outcome"].as_str().unwrap()))
        .collect();
    for expected in [("1", "healthy"), ("2", "rolled_back to 1"), ("3", "healthy"), ("3", "removed")] {
        assert!(reports.contains(&expected), "{expected:?} missing from the audited reports {reports:?}");
    }
    hub.stop().await;
}

/// Remove the deployment's containers when the test ends, whatever happens.
fn guard_containers(id: &str) {
    // Kept in a thread-local that lives as long as the test thread.
    thread_local!(static GUARDS: std::cell::RefCell<Vec<ContainerGuard>> = const { std::cell::RefCell::new(Vec::new()) });
    GUARDS.with(|g| g.borrow_mut().push(ContainerGuard(id.to_string())));
}

/// A registry that wants a login: answers `/v2/` with 401 until the request carries Basic
/// credentials, and knows no manifests. Records every `Authorization` header it is sent.
async fn stub_registry() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                    if head.first() == Some(&0x16) {
                        return; // A TLS handshake: this registry speaks plain HTTP.
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let auth = head.lines().find_map(|l| l.to_ascii_lowercase().starts_with("authorization:").then(|| l[14..].trim().to_string()));
                if let Some(auth) = &auth {
                    record.lock().unwrap().push(auth.clone());
                }
                let reply = match (path.as_str(), auth.is_some()) {
                    ("/v2/", false) => "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"gantry-test\"\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_string(),
                    ("/v2/", true) => "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_string(),
                    _ => {
                        let body = r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
                        format!("HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                    }
                };
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_registry_logins_reach_the_registry_and_nothing_else() {
    use base64::Engine;
    if docker().await.is_none() {
        return;
    }
    const PASSWORD: &str = "reg-pass-4e1d9c";
    const SECRET: &str = "db-secret-77a0b2";
    let dir = TempDir::new("deploy-registry");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    let (_, body) = hub.api().post("/api/v1/orgs/acme/enrollment-tokens", &json!({ "uses": 1 })).await;
    let state = dir.path().join("agent");
    let agent_id = enroll(body["token"].as_str().unwrap(), &state).await.unwrap();
    let config = agent_config_file(dir.path(), &state, &[], "[host]\nenabled = false\n[docker.logs]\nenabled = false");
    let _agent = AgentProcess::start_with_config(&config, &state);
    let api = hub.api();
    hub.wait_status(&agent_id, "online", Duration::from_secs(20)).await;

    let (port, seen) = stub_registry().await;
    let server = format!("127.0.0.1:{port}");
    let (status, _, reply) = api
        .send(
            "PUT",
            &format!("/api/v1/orgs/acme/registries/{server}"),
            Some("application/json"),
            json!({ "username": "deploy", "password": PASSWORD }).to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 201, "{reply}");
    let (status, _, reply) =
        api.send("PUT", "/api/v1/orgs/acme/secrets/db", Some("application/json"), json!({ "value": SECRET }).to_string().into_bytes()).await;
    assert_eq!(status, 201, "{reply}");
    let spec = json!({
        "name": "private",
        "services": [{ "name": "app", "image": format!("{server}/team/app:1"), "env": [{ "name": "DB", "secret": "db" }] }],
        "health_gate": { "min_healthy_secs": 1, "deadline_secs": 15 }
    });
    let (status, created) = api.post("/api/v1/orgs/acme/deployments", &json!({ "spec": spec, "targets": { "agents": [agent_id] } })).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    guard_containers(&id);
    let failed = wait_state(&api, &id, &agent_id, 1, "failed").await;
    let message = failed["message"].as_str().unwrap();
    assert!(message.contains(&format!("image {server}/team/app:1 is not present and could not be pulled")), "{failed}");

    // The registry was sent exactly the stored login.
    let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("deploy:{PASSWORD}")));
    let headers = seen.lock().unwrap().clone();
    assert!(headers.contains(&expected), "registry saw {headers:?}");

    // Nowhere else: not in the deployment's status, events, or the hub's APIs.
    let events = api.all_records(&format!("/api/v1/agents/{agent_id}/events"), "").await;
    let (_, view) = api.get(&format!("/api/v1/deployments/{id}")).await;
    let (_, registries) = api.get("/api/v1/orgs/acme/registries").await;
    for shown in [serde_json::to_string(&events).unwrap(), view.to_string(), registries.to_string()] {
        assert!(!shown.contains(PASSWORD) && !shown.contains(SECRET), "a credential leaked: {shown}");
    }
    hub.stop().await;
}

/// A service without host ports (three agents share this machine's Docker engine), checked
/// from inside its container.
fn fleet_spec(script: &str, strategy: Value) -> Value {
    json!({
        "name": "fleet",
        "services": [{
            "name": "app",
            "image": IMAGE,
            "command": ["sh", "-c", script],
            "health": { "exec": { "command": ["sh", "-c", "wget -q -O- http://127.0.0.1/health | grep -q ok"] } },
            "stop_grace_secs": 1
        }],
        "strategy": strategy,
        "health_gate": { "min_healthy_secs": 1, "deadline_secs": 15 }
    })
}

/// The running containers of `deployment` that belong to `agent`, with their revision.
fn agent_containers(deployment: &str, agent: &str) -> Vec<(String, String)> {
    let out = cli(&[
        "ps",
        "--filter",
        &format!("label=io.gantry.deployment={deployment}"),
        "--filter",
        &format!("label=io.gantry.agent={agent}"),
        "--format",
        "{{.Names}} {{.Label \"io.gantry.revision\"}}",
    ]);
    out.lines().filter_map(|l| l.split_once(' ')).map(|(n, r)| (n.to_string(), r.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_deploy_by_selector_roll_back_alone_and_a_rolling_update_stops_at_its_first_failed_batch() {
    if docker().await.is_none() {
        return;
    }
    let dir = TempDir::new("deploy-fleet");
    let mut hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    let (http, quic) = (hub.http, hub.quic);
    hub.create_org("acme", 5).await;
    let mut agents = Vec::new();
    let mut processes = Vec::new();
    for zone in ["a", "b", "c"] {
        let (_, body) = hub.api().post("/api/v1/orgs/acme/enrollment-tokens", &json!({ "uses": 1, "labels": { "role": "web", "zone": zone } })).await;
        let state = dir.path().join(format!("agent-{zone}"));
        let id = enroll(body["token"].as_str().unwrap(), &state).await.unwrap();
        let config = agent_config_file(dir.path(), &state, &[], "[host]\nenabled = false\n[docker.logs]\nenabled = false");
        processes.push(AgentProcess::start_with_config(&config, &state));
        agents.push(id);
    }
    // A fourth agent of another role must not be selected.
    let (_, body) = hub.api().post("/api/v1/orgs/acme/enrollment-tokens", &json!({ "uses": 1, "labels": { "role": "db" } })).await;
    let db = enroll(body["token"].as_str().unwrap(), &dir.path().join("agent-db")).await.unwrap();
    for id in &agents {
        hub.wait_status(id, "online", Duration::from_secs(30)).await;
    }
    let api = hub.api();
    let selector = json!({ "selector": { "role": "web" } });

    // Deploy by selector: the three web agents, each healthy with one container.
    let (status, created) = api.post("/api/v1/orgs/acme/deployments", &json!({ "spec": fleet_spec(GOOD, json!("all_at_once")), "targets": selector })).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    guard_containers(&id);
    let mut sorted = agents.clone();
    sorted.sort();
    assert_eq!(created["target_agents"], json!(sorted), "selector picks the three web agents, not {db}");
    for agent in &agents {
        wait_state(&api, &id, agent, 1, "healthy").await;
        assert_eq!(agent_containers(&id, agent).len(), 1);
    }

    // A broken update: every agent rolls back by itself; the old containers keep serving.
    let (status, _, reply) = api
        .send(
            "PUT",
            &format!("/api/v1/deployments/{id}"),
            Some("application/json"),
            json!({ "spec": fleet_spec(BAD, json!("all_at_once")), "targets": selector }).to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    for agent in &agents {
        let rolled = wait_state(&api, &id, agent, 2, "rolled_back").await;
        assert_eq!(rolled["rolled_back_to"], 1, "{rolled}");
        assert!(rolled["message"].as_str().unwrap().contains("exit code 3"), "{rolled}");
        let running = agent_containers(&id, agent);
        assert_eq!(running.len(), 1, "{agent}: {running:?}");
        assert_eq!(running[0].1, "1", "{agent} runs revision 1 again");
        assert_eq!(cli(&["exec", &running[0].0, "wget", "-q", "-O-", "http://127.0.0.1/health"]), "ok", "{agent} still serves");
    }

    // Rolling, one agent per batch: a good revision reaches all three...
    let rolling = json!({ "rolling": { "batch_size": 1, "on_failure": "stop" } });
    let (status, _, reply) = api
        .send(
            "PUT",
            &format!("/api/v1/deployments/{id}"),
            Some("application/json"),
            json!({ "spec": fleet_spec(&format!("{GOOD} # v3"), rolling.clone()), "targets": selector }).to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    for agent in &agents {
        wait_state(&api, &id, agent, 3, "healthy").await;
    }
    // ...and a broken one stops after the first batch: the other two never get it.
    let (status, _, reply) = api
        .send(
            "PUT",
            &format!("/api/v1/deployments/{id}"),
            Some("application/json"),
            json!({ "spec": fleet_spec(&format!("{BAD} # v4"), rolling), "targets": selector }).to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let first = &sorted[0];
    wait_state(&api, &id, first, 4, "rolled_back").await;
    let view = wait_for(Duration::from_secs(30), "the rollout to stop", || async {
        let (_, view) = api.get(&format!("/api/v1/deployments/{id}")).await;
        (view["rollout"]["state"] == "stopped").then_some(view)
    })
    .await;
    assert!(view["rollout"]["reason"].as_str().unwrap().contains(first.as_str()), "{view}");
    for agent in &sorted[1..] {
        assert_eq!(view["agents"][agent]["revision"], 3, "{agent} was not given revision 4: {view}");
        assert_eq!(view["agents"][agent]["state"], "healthy");
    }

    // A hub restart keeps the rollout stopped. Proof that reconnecting agents were told
    // everything they will be told: a later deployment, queued behind it, comes up first.
    hub.stop().await;
    hub = TestHub::start_at(&dir.path().join("hub"), http, quic, |_| {}).await;
    let api = hub.api();
    for agent in &agents {
        hub.wait_status(agent, "online", Duration::from_secs(30)).await;
    }
    let (status, marker) = api.post("/api/v1/orgs/acme/deployments", &json!({ "spec": { "name": "marker", "services": [{ "name": "m", "image": IMAGE, "command": ["sleep", "600"], "stop_grace_secs": 1 }], "health_gate": { "min_healthy_secs": 1, "deadline_secs": 15 } }, "targets": selector })).await;
    assert_eq!(status, 201, "{marker}");
    let marker = marker["id"].as_str().unwrap().to_string();
    guard_containers(&marker);
    for agent in &agents {
        wait_state(&api, &marker, agent, 1, "healthy").await;
    }
    let (_, view) = api.get(&format!("/api/v1/deployments/{id}")).await;
    assert_eq!(view["rollout"]["state"], "stopped", "{view}");
    for agent in &sorted[1..] {
        assert_eq!((view["agents"][agent]["revision"].clone(), view["agents"][agent]["state"].clone()), (json!(3), json!("healthy")), "{agent}: {view}");
        let running = agent_containers(&id, agent);
        assert_eq!(running.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(), ["3"], "{agent}: {running:?}");
    }

    // Deleting removes every agent's containers.
    for dep in [&id, &marker] {
        let (status, _, _) = api.send("DELETE", &format!("/api/v1/deployments/{dep}"), None, vec![]).await;
        assert_eq!(status, 200);
    }
    for dep in [&id, &marker] {
        for agent in &agents {
            wait_for(Duration::from_secs(90), &format!("{agent} removed {dep}"), || async {
                let (_, body) = api.get(&format!("/api/v1/deployments/{dep}")).await;
                (body["agents"][agent]["state"] == "removed").then_some(())
            })
            .await;
        }
    }
    wait_for(Duration::from_secs(60), "every container removed", || async {
        (containers_of(&id).is_empty() && containers_of(&marker).is_empty()).then_some(())
    })
    .await;
    drop(processes);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_deploy_converges_without_duplicates() {
    if docker().await.is_none() {
        return;
    }
    let dir = TempDir::new("deploy-kill");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    let (_, body) = hub.api().post("/api/v1/orgs/acme/enrollment-tokens", &json!({ "uses": 1 })).await;
    let state = dir.path().join("agent");
    let agent = enroll(body["token"].as_str().unwrap(), &state).await.unwrap();
    let config = agent_config_file(dir.path(), &state, &[], "[host]\nenabled = false\n[docker.logs]\nenabled = false");
    let mut process = AgentProcess::start_with_config(&config, &state);
    let api = hub.api();
    hub.wait_status(&agent, "online", Duration::from_secs(30)).await;
    let slow = |script: &str| {
        let mut spec = fleet_spec(script, json!("all_at_once"));
        spec["health_gate"] = json!({ "min_healthy_secs": 4, "deadline_secs": 30 });
        spec
    };
    let (status, created) = api.post("/api/v1/orgs/acme/deployments", &json!({ "spec": slow(GOOD), "targets": { "agents": [agent] } })).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    guard_containers(&id);

    // Killed while the first container waits out its health gate.
    wait_for(Duration::from_secs(60), "revision 1's container", || async { (agent_containers(&id, &agent).len() == 1).then_some(()) }).await;
    process.kill9().await;
    process = AgentProcess::start_with_config(&config, &state);
    wait_state(&api, &id, &agent, 1, "healthy").await;
    assert_eq!(agent_containers(&id, &agent), [(format!("gantry-{id}-app-r1-{}", &agent[agent.len() - 8..]), "1".to_string())]);

    // Killed mid-update, with the new container up beside the old one (start first).
    let (status, _, reply) = api
        .send(
            "PUT",
            &format!("/api/v1/deployments/{id}"),
            Some("application/json"),
            json!({ "spec": slow(&format!("{GOOD} # v2")), "targets": { "agents": [agent] } }).to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    wait_for(Duration::from_secs(60), "old and new containers side by side", || async { (agent_containers(&id, &agent).len() == 2).then_some(()) }).await;
    process.kill9().await;
    let _process = AgentProcess::start_with_config(&config, &state);
    wait_state(&api, &id, &agent, 2, "healthy").await;
    let all = containers_of(&id);
    assert_eq!(all.len(), 1, "exactly one container, running or not: {all:?}");
    assert_eq!(agent_containers(&id, &agent).iter().map(|c| c.1.as_str()).collect::<Vec<_>>(), ["2"]);
    hub.stop().await;
}
