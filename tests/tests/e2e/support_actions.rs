//! Support actions end to end: a real hub, a real agent process and the real Docker engine
//! (images built locally from busybox, nothing pulled). Container restart, stop, start and
//! removal are checked with `docker inspect`; logs are the container's real output; exec
//! runs in the container and on the host with exit codes, output caps and timeouts; exec
//! is refused to a role without the permission and in an org that has not enabled it;
//! every call is in the audit log with its command and exit code; the diagnostics bundle
//! carries the agent's version, facts and redacted configuration; and once the agent is
//! gone every action fails at once with a clear reason. Against a simulated agent session
//! (the protocol spoken by hand, no Docker): an agent that drops mid-action gives 503
//! `agent_disconnected`, one that never answers 504 `agent_timeout`, and its late answer is
//! ignored while the session goes on serving.

#![allow(clippy::unwrap_used)]

use gantry_agent::collector::docker::testing::{cli, unique, Container};
use gantry_tests::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const PASSWORD: &str = "violet harbor stapler quantum 42";

/// A member of `org` with `role`, logged in with a session cookie.
async fn member(hub: &TestHub, org: &str, role: &str) -> Api {
    let email = format!("{role}@{org}.example.com");
    let (status, invitation) = hub.api().post(&format!("/api/v1/orgs/{org}/invitations"), &json!({ "email": email, "role": role })).await;
    assert_eq!(status, 201, "{invitation}");
    let anonymous = hub.api().anonymous();
    let body = json!({ "token": invitation["token"], "password": PASSWORD }).to_string().into_bytes();
    let (status, headers, text) = anonymous.send("POST", "/api/v1/invitations/accept", Some("application/json"), body).await;
    assert_eq!(status, 200, "{text}");
    anonymous.with_cookie(&session_cookie_of(&headers).expect("session cookie"))
}

/// `POST path` with a JSON body (cookie sessions must send JSON).
async fn post(api: &Api, path: &str, body: Value) -> (u16, Value) {
    api.post(path, &body).await
}

async fn put(api: &Api, path: &str, body: Value) -> (u16, Value) {
    let (status, _, text) = api.send("PUT", path, Some("application/json"), body.to_string().into_bytes()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn inspect(name: &str, format: &str) -> String {
    cli(&["inspect", "--format", format, name])
}

/// Audit entries of org `acme` for `action` (e.g. `POST /api/v1/agents/{id}/exec`).
async fn audited(hub: &TestHub, action: &str) -> Vec<Value> {
    let (status, body) = hub.api().get("/api/v1/orgs/acme/audit?limit=1000").await;
    assert_eq!(status, 200, "{body}");
    body["entries"].as_array().unwrap().iter().filter(|e| e["action"] == action).cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_actions_exec_and_diagnostics_on_a_real_agent() {
    if !docker_available().await {
        return;
    }
    let dir = TempDir::new("support");
    let hub = TestHub::start(&dir.path().join("hub"), |config| config.rate_limit.enabled = false).await;
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 1, "10m").await;
    let state = dir.path().join("agent");
    let agent_id = enroll(&token, &state).await.unwrap();
    let config = agent_config_file(dir.path(), &state, &[], "[host]\nenabled = false\n[docker.logs]\nenabled = false");
    let mut agent = AgentProcess::start_with_config(&config, &state);
    hub.wait_status(&agent_id, "online", Duration::from_secs(30)).await;
    let api = hub.api();
    let base = format!("/api/v1/agents/{agent_id}");

    // A container that prints six lines (the last on stderr, a moment later so the order
    // is the timestamps' one), then idles and exits promptly on SIGTERM.
    let name = unique("support");
    let _container = Container::run(
        &name,
        "trap 'exit 0' TERM; for i in 1 2 3 4 5; do echo line-$i; done; sleep 0.3; echo oops >&2; sleep 600 & wait",
        &["--label", "gantry.test=support"],
    );

    // Logs: the container's real output, the newest `tail` lines, streams kept apart.
    let logs = wait_for(Duration::from_secs(20), "six lines of container output", || async {
        let (status, body) = api.get(&format!("{base}/containers/{name}/logs?tail=100")).await;
        assert_eq!(status, 200, "{body}");
        (body["lines"].as_array().unwrap().len() == 6).then_some(body)
    })
    .await;
    let lines: Vec<&str> = logs["lines"].as_array().unwrap().iter().map(|l| l["line"].as_str().unwrap()).collect();
    assert_eq!(lines, ["line-1", "line-2", "line-3", "line-4", "line-5", "oops"]);
    let (status, tail) = api.get(&format!("{base}/containers/{name}/logs?tail=2")).await;
    assert_eq!(status, 200, "{tail}");
    let streams: Vec<(&str, &str)> = tail["lines"].as_array().unwrap().iter().map(|l| (l["stream"].as_str().unwrap(), l["line"].as_str().unwrap())).collect();
    assert_eq!(streams, [("stdout", "line-5"), ("stderr", "oops")]);
    assert!(tail["lines"][0]["ts"].as_str().unwrap().contains('T'), "{tail}");
    for bad in ["tail=0", "tail=5001", "tail=x", "lines=3"] {
        let (status, body) = api.get(&format!("{base}/containers/{name}/logs?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }

    // Restart: Docker shows a new start time, and the answer says so.
    let started_before = inspect(&name, "{{.State.StartedAt}}");
    let began = Instant::now();
    let (status, restarted) = post(&api, &format!("{base}/containers/{name}/restart"), json!({})).await;
    assert_eq!(status, 200, "{restarted}");
    assert!(began.elapsed() < Duration::from_secs(15), "restart took {:?}", began.elapsed());
    assert_eq!((restarted["state"].as_str(), restarted["message"].as_str()), (Some("running"), Some("restarted")), "{restarted}");
    let started_after = inspect(&name, "{{.State.StartedAt}}");
    assert_ne!(started_before, started_after, "docker shows no new start");
    assert_eq!(restarted["started_at"].as_str().unwrap(), started_after);
    assert_eq!(inspect(&name, "{{.State.Running}}"), "true");

    // Stop, stop again (nothing to do), start.
    let (status, stopped) = post(&api, &format!("{base}/containers/{name}/stop"), json!({})).await;
    assert_eq!((status, stopped["state"].as_str()), (200, Some("exited")), "{stopped}");
    assert_eq!(inspect(&name, "{{.State.Running}}"), "false");
    let (status, again) = post(&api, &format!("{base}/containers/{name}/stop"), json!({})).await;
    assert_eq!((status, again["message"].as_str()), (200, Some("was already stopped")), "{again}");
    let (status, started) = post(&api, &format!("{base}/containers/{name}/start"), json!({})).await;
    assert_eq!((status, started["state"].as_str(), started["message"].as_str()), (200, Some("running"), Some("started")), "{started}");
    assert_eq!(inspect(&name, "{{.State.Running}}"), "true");

    // An unknown container: 404 with Docker's reason; a malformed name: 400, nothing sent.
    let (status, missing) = post(&api, &format!("{base}/containers/gantry-test-no-such-container/restart"), json!({})).await;
    assert_eq!((status, missing["error"]["code"].as_str()), (404, Some("container_not_found")), "{missing}");
    assert!(missing["error"]["message"].as_str().unwrap().contains("No such container"), "{missing}");
    let (status, bad) = post(&api, &format!("{base}/containers/-bad/restart"), json!({})).await;
    assert_eq!((status, bad["error"]["code"].as_str()), (400, Some("invalid_request")), "{bad}");

    // Exec: off in an org that has not enabled it, and never for a role without the
    // permission (a deployer), whatever the setting.
    let admin = member(&hub, "acme", "admin").await;
    let deployer = member(&hub, "acme", "deployer").await;
    let exec_path = format!("{base}/exec");
    let hello = json!({ "container": name, "command": ["sh", "-c", "echo hello; echo warn >&2"] });
    let (status, refused) = post(&admin, &exec_path, hello.clone()).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (403, Some("exec_disabled")), "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("PUT /api/v1/orgs/acme/settings"), "{refused}");
    let (status, body) = put(&deployer, "/api/v1/orgs/acme/settings", json!({ "exec_enabled": true })).await;
    assert_eq!(status, 403, "a deployer may not enable exec: {body}");
    for bad in [json!({ "exec_enabled": "yes" }), json!({ "exec_enabled": true, "shell": true })] {
        let (status, body) = put(&admin, "/api/v1/orgs/acme/settings", bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    assert_eq!(admin.get("/api/v1/orgs/acme/settings").await.1["exec_enabled"], false, "bad input changed nothing");
    let (status, body) = put(&admin, "/api/v1/orgs/acme/settings", json!({ "exec_enabled": true })).await;
    assert_eq!((status, &body["exec_enabled"]), (200, &json!(true)), "{body}");
    let (status, refused) = post(&deployer, &exec_path, hello.clone()).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (403, Some("forbidden")), "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("exec permission"), "{refused}");

    // In the container: output and exit codes, zero and not.
    let (status, out) = post(&admin, &exec_path, hello).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!((out["exit_code"].as_i64(), out["stdout"].as_str(), out["stderr"].as_str()), (Some(0), Some("hello\n"), Some("warn\n")), "{out}");
    let (status, out) = post(&admin, &exec_path, json!({ "container": name, "command": ["sh", "-c", "echo bad; exit 7"] })).await;
    assert_eq!((status, out["exit_code"].as_i64(), out["stdout"].as_str(), out["timed_out"].as_bool()), (200, Some(7), Some("bad\n"), Some(false)), "{out}");
    // The output cap keeps the last bytes.
    let big = json!({ "container": name, "command": ["sh", "-c", "yes abcdefgh | head -c 200000; echo END"], "max_output_bytes": 1000 });
    let (status, out) = post(&admin, &exec_path, big).await;
    let stdout = out["stdout"].as_str().unwrap();
    assert_eq!((status, out["stdout_truncated"].as_bool()), (200, Some(true)), "{out}");
    assert!(stdout.len() <= 1000 && stdout.ends_with("END\n"), "{} bytes kept", stdout.len());
    // The timeout kills the command in the container, and the answer comes promptly.
    let began = Instant::now();
    let slow = json!({ "container": name, "command": ["sh", "-c", "echo started; exec sleep 47"], "timeout_secs": 1 });
    let (status, out) = post(&admin, &exec_path, slow).await;
    assert_eq!((status, out["timed_out"].as_bool(), out["exit_code"].as_i64(), out["stdout"].as_str()), (200, Some(true), None, Some("started\n")), "{out}");
    assert!(out["kill_failed"].is_null(), "{out}");
    assert!(began.elapsed() < Duration::from_secs(15), "exec timeout answered after {:?}", began.elapsed());
    wait_for(Duration::from_secs(10), "the timed-out command to be gone", || async { (!cli(&["top", &name]).contains("sleep 47")).then_some(()) }).await;

    // On the host: it really runs there (it writes a file the test can see).
    let marker = dir.path().join("host-exec-marker");
    let script = format!("echo on-host > {}; cat {}", marker.display(), marker.display());
    let (status, out) = post(&admin, &exec_path, json!({ "command": ["sh", "-c", script], "timeout_secs": 10 })).await;
    assert_eq!((status, out["exit_code"].as_i64(), out["stdout"].as_str(), out["container"].is_null()), (200, Some(0), Some("on-host\n"), true), "{out}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "on-host\n");
    let (status, out) = post(&admin, &exec_path, json!({ "command": ["/nonexistent/gantry-program"] })).await;
    assert_eq!((status, out["exit_code"].as_i64()), (200, Some(127)), "{out}");
    let began = Instant::now();
    let (status, out) = post(&admin, &exec_path, json!({ "command": ["sh", "-c", "echo waiting; sleep 30"], "timeout_secs": 1 })).await;
    assert_eq!((status, out["timed_out"].as_bool(), out["stdout"].as_str()), (200, Some(true), Some("waiting\n")), "{out}");
    assert!(began.elapsed() < Duration::from_secs(15), "host exec timeout answered after {:?}", began.elapsed());

    // Bad requests: 400 naming the problem, nothing run.
    for (bad, expect) in [
        (json!({ "command": [] }), "command"),
        (json!({ "command": ["true"], "timeout_secs": 0 }), "timeout_secs"),
        (json!({ "command": ["true"], "timeout_secs": 121 }), "timeout_secs"),
        (json!({ "command": ["true"], "max_output_bytes": 10_000_000 }), "max_output_bytes"),
        (json!({ "command": ["true"], "container": "../etc" }), "container"),
    ] {
        let (status, body) = post(&admin, &exec_path, bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(expect), "{bad}: {body}");
    }
    let (status, body) = post(&admin, &exec_path, json!({ "container": "gantry-test-no-such-container", "command": ["true"] })).await;
    assert_eq!(status, 404, "{body}");

    // Every exec is audited with its command and exit code, refusals too.
    let entries = audited(&hub, "POST /api/v1/agents/{id}/exec").await;
    let find = |command: &str, outcome: &str| {
        entries
            .iter()
            .find(|e| e["target"]["command"] == command && e["outcome"] == outcome)
            .cloned()
            .unwrap_or_else(|| panic!("no {outcome} entry for {command:?} in {entries:#?}"))
    };
    let failing = find("sh -c 'echo bad; exit 7'", "200");
    assert_eq!(
        (&failing["target"]["exit_code"], &failing["target"]["container"], &failing["actor"]),
        (&json!("7"), &json!(name), &json!("admin@acme.example.com"))
    );
    assert_eq!(find("sh -c 'echo hello; echo warn >&2'", "200")["target"]["exit_code"], "0");
    let mut refusals: Vec<(&str, &str)> = entries
        .iter()
        .filter(|e| e["target"]["command"] == "sh -c 'echo hello; echo warn >&2'" && e["outcome"] == "403")
        .map(|e| (e["actor"].as_str().unwrap(), e["target"]["error"].as_str().unwrap()))
        .collect();
    refusals.sort();
    assert_eq!(refusals, [("admin@acme.example.com", "exec_disabled"), ("deployer@acme.example.com", "forbidden")]);
    assert_eq!(find("sh -c 'echo started; exec sleep 47'", "200")["target"]["exit_code"], "timeout");
    assert_eq!(find(&format!("sh -c '{script}'"), "200")["target"]["container"], "(host)");
    let settings = audited(&hub, "PUT /api/v1/orgs/{org}/settings").await;
    assert!(settings.iter().any(|e| e["outcome"] == "200" && e["target"]["exec_enabled"] == "true" && e["actor"] == "admin@acme.example.com"), "{settings:#?}");
    let restarts = audited(&hub, "POST /api/v1/agents/{id}/containers/{name}/restart").await;
    assert!(restarts.iter().any(|e| e["outcome"] == "200" && e["target"]["name"] == name.as_str()), "{restarts:#?}");

    // Diagnostics: a download with the agent's version, facts and configuration, and no
    // key material.
    let (status, _, body) = deployer.send("POST", &format!("{base}/diagnostics"), Some("application/json"), b"{}".to_vec()).await;
    assert_eq!(status, 403, "diagnostics need the admin permission: {body}");
    let (status, headers, body) = admin.send("POST", &format!("{base}/diagnostics"), Some("application/json"), b"{}".to_vec()).await;
    assert_eq!(status, 200, "{body}");
    let disposition = headers["content-disposition"].to_str().unwrap();
    assert!(disposition.starts_with("attachment; filename=\"gantry-diagnostics-") && disposition.ends_with(".json\""), "{disposition}");
    let bundle: Value = serde_json::from_str(&body).unwrap();
    let report = &bundle["agent"];
    assert_eq!(report["agent"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(report["identity"]["agent_id"], agent_id.as_str());
    assert!(report["identity"]["certificate"]["not_after_unix"].as_i64().unwrap() > 0, "{}", report["identity"]);
    assert_eq!(report["config"]["state_dir"], state.display().to_string());
    assert_eq!(report["config"]["host"]["enabled"], false, "the configuration in force");
    assert!(!report["host"]["facts"]["hostname"].as_str().unwrap().is_empty());
    assert!(report["host"]["facts"]["cpu_count"].as_u64().unwrap() > 0);
    assert!(!report["docker"]["version"].as_str().unwrap().is_empty(), "{}", report["docker"]);
    assert!(report["docker"]["containers"].as_array().unwrap().iter().any(|c| c["name"] == name.as_str()));
    assert!(report["spool"]["logs"]["cap_bytes"].as_u64().unwrap() > 0);
    assert!(report["recent_logs"].is_array());
    assert_eq!(bundle["hub"]["agent_record"]["status"], "online");
    let files: Vec<&str> = report["state_dir"]["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert!(files.contains(&"agent.key"), "the key is listed: {files:?}");
    let key = std::fs::read_to_string(state.join("agent.key")).unwrap();
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!body.contains(&key_body[..40]) && !body.contains("PRIVATE KEY"), "the bundle carries key material");
    let audit = audited(&hub, "POST /api/v1/agents/{id}/diagnostics").await;
    assert!(audit.iter().any(|e| e["outcome"] == "200" && e["actor"] == "admin@acme.example.com"));

    // Remove: a running container only with force.
    let (status, conflict) = post(&api, &format!("{base}/containers/{name}/remove"), json!({})).await;
    assert_eq!((status, conflict["error"]["code"].as_str()), (409, Some("conflict")), "{conflict}");
    assert!(conflict["error"]["message"].as_str().unwrap().contains("force=true"), "{conflict}");
    assert_eq!(inspect(&name, "{{.State.Running}}"), "true");
    let (status, removed) = post(&api, &format!("{base}/containers/{name}/remove?force=true"), json!({})).await;
    assert_eq!((status, removed["state"].as_str()), (200, Some("removed")), "{removed}");
    let gone = std::process::Command::new("docker").args(["inspect", &name]).output().unwrap();
    assert!(!gone.status.success(), "the container is still there");

    // The agent goes away: every action fails at once, saying why.
    agent.kill9().await;
    hub.wait_status(&agent_id, "offline", Duration::from_secs(30)).await;
    for (method, path) in [
        ("POST", format!("{base}/containers/{name}/restart")),
        ("GET", format!("{base}/containers/{name}/logs")),
        ("POST", format!("{base}/exec")),
        ("POST", format!("{base}/diagnostics")),
    ] {
        let began = Instant::now();
        let body = if method == "POST" { json!({ "command": ["true"] }).to_string().into_bytes() } else { Vec::new() };
        let (status, _, text) = admin.send(method, &path, (method == "POST").then_some("application/json"), body).await;
        let error: Value = serde_json::from_str(&text).unwrap();
        assert_eq!((status, error["error"]["code"].as_str()), (409, Some("agent_offline")), "{method} {path}: {text}");
        assert!(error["error"]["message"].as_str().unwrap().contains("offline"), "{text}");
        assert!(began.elapsed() < Duration::from_secs(2), "{path} took {:?} to fail", began.elapsed());
    }
    hub.stop().await;
}

/// A hub whose sessions outlive the exec waits below without heartbeats, org `acme` with
/// exec enabled, and a simulated agent in it.
async fn hub_with_fake_agent(dir: &TempDir) -> (TestHub, SimulatedAgent) {
    let hub = TestHub::start(&dir.path().join("hub"), |config| {
        config.rate_limit.enabled = false;
        config.liveness_timeout_secs = 120;
    })
    .await;
    hub.create_org("acme", 5).await;
    let (status, body) = put(&hub.api(), "/api/v1/orgs/acme/settings", json!({ "exec_enabled": true })).await;
    assert_eq!(status, 200, "{body}");
    let agent = SimulatedAgent::start(&hub, "acme", &dir.path().join("simulated-agent")).await;
    (hub, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_drops_mid_action_gives_503_agent_disconnected() {
    let dir = TempDir::new("support-drop");
    let (hub, mut agent) = hub_with_fake_agent(&dir).await;
    let api = hub.api();
    let path = format!("/api/v1/agents/{}/exec", agent.id);
    let call = tokio::spawn(async move { api.post(&path, &json!({ "command": ["sleep", "5"], "timeout_secs": 60 })).await });
    let request = agent.next_action().await;
    assert!(matches!(request.action, gantry_shared::support::SupportAction::Exec(ref exec) if exec.argv == ["sleep", "5"]), "{request:?}");
    // The agent goes away with the action in flight.
    agent.connection.close(0u32.into(), b"gone");
    let (status, body) = call.await.unwrap();
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("agent_disconnected")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains(&agent.id), "{body}");
    let entries = audited(&hub, "POST /api/v1/agents/{id}/exec").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!((entries[0]["target"]["command"].as_str(), entries[0]["target"]["error"].as_str()), (Some("sleep 5"), Some("agent_disconnected")));
    hub.wait_status(&agent.id, "offline", Duration::from_secs(20)).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_answer_in_time_gives_504_agent_timeout_and_its_late_answer_is_ignored() {
    use gantry_shared::support::{ActionOutput, ActionReply, ExecOutput};
    let dir = TempDir::new("support-timeout");
    let (hub, mut agent) = hub_with_fake_agent(&dir).await;
    let api = hub.api();
    let path = format!("/api/v1/agents/{}/exec", agent.id);
    // The hub waits the command's timeout (1 s) plus its margin for the answer.
    let call = tokio::spawn(async move { api.post(&path, &json!({ "command": ["true"], "timeout_secs": 1 })).await });
    let request = agent.next_action().await;
    let (status, body) = call.await.unwrap();
    assert_eq!((status, body["error"]["code"].as_str()), (504, Some("agent_timeout")), "{body}");
    let entries = audited(&hub, "POST /api/v1/agents/{id}/exec").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["target"]["error"].as_str(), Some("agent_timeout"));

    // The answer arrives after the hub gave up: it is dropped, and the session goes on.
    let late = ExecOutput {
        exit_code: Some(0),
        stdout: String::new(),
        stderr: String::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        timed_out: false,
        kill_failed: None,
        duration_ms: 1,
    };
    agent.answer(ActionReply { id: request.id, result: Ok(ActionOutput::Exec(late)) }).await;
    let api = hub.api();
    let path = format!("/api/v1/agents/{}/diagnostics", agent.id);
    let call = tokio::spawn(async move { api.post(&path, &json!({})).await });
    let next = agent.next_action().await;
    assert_ne!(next.id, request.id, "a new action gets a new id");
    agent.answer(ActionReply { id: next.id, result: Ok(ActionOutput::Diagnostics(r#"{"fake":true}"#.into())) }).await;
    let (status, bundle) = call.await.unwrap();
    assert_eq!(status, 200, "{bundle}");
    assert_eq!(hub.agent(&agent.id).await["status"], "online");
    hub.stop().await;
}
