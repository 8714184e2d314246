//! Rotation of the key that seals secrets at rest, end to end: deployments that pull from a
//! registry with a stored login and inject a stored secret, and signed webhook deliveries,
//! keep working before a rotation, after a new key version is added while old values are
//! still sealed under the old one, while `gantry-hub rotate-key` re-encrypts them, and after
//! everything is on the newest version. A restart needs every key version the store names,
//! and says which file is missing otherwise.

#![allow(clippy::unwrap_used)]

use base64::Engine;
use gantry_agent::collector::docker::testing::{cli, IMAGE};
use gantry_tests::deploys::{containers_of, wait_deploy_state as wait_state};
use gantry_tests::*;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Extra org secrets the rotation test seals, and the pause after each resealed value: a
/// re-encryption pass lasts about (BULK_SECRETS + 4) × REENCRYPT_PAUSE_MS.
const BULK_SECRETS: u64 = 50;
const REENCRYPT_PAUSE_MS: u64 = 600;
const REGISTRY_PASSWORD: &str = "reg-pass-rotation-51c";
const SECRET_VALUE: &str = "db-secret-rotation-8e2";

/// Requests a test server received.
type Requests = Arc<Mutex<Vec<web::HttpRequest>>>;

/// A tiny HTTP server that records each request's headers and body and answers `reply`.
async fn recorder(reply: impl Fn(&str, bool) -> String + Send + Sync + 'static) -> (u16, Requests) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (record, reply) = (seen.clone(), Arc::new(reply));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (record, reply) = (record.clone(), reply.clone());
            tokio::spawn(async move {
                let Some(request) = web::read_http_request(&mut stream).await else { return };
                let path = request.request_line.split_whitespace().nth(1).unwrap_or("").to_string();
                let authorized = request.headers.contains_key("authorization");
                record.lock().unwrap().push(request);
                let _ = stream.write_all(reply(&path, authorized).as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (port, seen)
}

/// A registry that wants a login and knows no manifests (as in `deployments.rs`).
fn registry_reply(path: &str, authorized: bool) -> String {
    match (path, authorized) {
        ("/v2/", false) => "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"gantry-test\"\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".into(),
        ("/v2/", true) => "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".into(),
        _ => {
            let body = r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
            format!("HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
        }
    }
}

fn ok_reply(_: &str, _: bool) -> String {
    "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
}

async fn put(api: &Api, path: &str, body: Value) -> Value {
    let (status, _, reply) = api.send("PUT", path, Some("application/json"), body.to_string().into_bytes()).await;
    assert!(status == 200 || status == 201, "PUT {path}: {status} {reply}");
    serde_json::from_str(&reply).unwrap_or(Value::Null)
}

/// Removes the deployments' containers when the test ends, whatever happens.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for id in &self.0 {
            for name in containers_of(id) {
                let _ = std::process::Command::new("docker").args(["rm", "-f", &name]).output();
            }
        }
    }
}

/// What one round of use needs: the hub, the agent, the two deployments and what the
/// registry and the webhook receiver saw.
struct Fleet {
    api: Api,
    agent: String,
    private: String,
    web: String,
    revision: u64,
    registry: Requests,
    registry_host: String,
    hooks: Requests,
    hook_secret: String,
}

impl Fleet {
    /// A new revision of both deployments: the private image is pulled with the stored
    /// login (the registry must see it), the web container gets the stored secret in its
    /// environment, and both outcomes arrive as webhook deliveries signed with the
    /// endpoint's secret.
    async fn round(&mut self, label: &str) {
        self.revision += 1;
        let rev = self.revision;
        let logins_before = self.registry_logins().len();
        let hooks_before = self.hooks.lock().unwrap().len();
        let private = json!({
            "spec": {
                "name": "private",
                "services": [{ "name": "app", "image": format!("{}/team/app:{rev}", self.registry_host) }],
                "health_gate": { "min_healthy_secs": 1, "deadline_secs": 15 }
            },
            "targets": { "agents": [self.agent] }
        });
        put(&self.api, &format!("/api/v1/deployments/{}", self.private), private).await;
        let web = json!({
            "spec": {
                "name": "web",
                "services": [{
                    "name": "app",
                    "image": IMAGE,
                    "command": ["sh", "-c", "sleep 3600"],
                    "env": [{ "name": "DB", "secret": "db" }, { "name": "ROUND", "value": rev.to_string() }]
                }],
                "order": "stop_first",
                "health_gate": { "min_healthy_secs": 1, "deadline_secs": 30 }
            },
            "targets": { "agents": [self.agent] }
        });
        put(&self.api, &format!("/api/v1/deployments/{}", self.web), web).await;
        wait_state(&self.api, &self.private, &self.agent, rev, "failed").await;
        wait_state(&self.api, &self.web, &self.agent, rev, "healthy").await;

        // The registry was sent exactly the stored login, again.
        let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("deploy:{REGISTRY_PASSWORD}")));
        let logins = self.registry_logins();
        assert!(logins.len() > logins_before, "{label}: the registry saw no login for revision {rev}");
        assert!(logins[logins_before..].iter().all(|l| *l == expected), "{label}: registry saw {:?}", &logins[logins_before..]);
        // The container runs with the secret's value.
        let envs: Vec<String> = containers_of(&self.web).iter().map(|c| cli(&["inspect", "--format", "{{json .Config.Env}}", c])).collect();
        assert!(
            envs.iter().any(|env| env.contains(&format!("\"DB={SECRET_VALUE}\"")) && env.contains(&format!("\"ROUND={rev}\""))),
            "{label}: no container of revision {rev} has the secret: {envs:?}"
        );
        // Deliveries for both outcomes arrive, each signed with the endpoint's secret.
        let hooks = wait_for(Duration::from_secs(30), &format!("{label}: webhook deliveries of revision {rev}"), || async {
            let hooks = self.hooks.lock().unwrap().clone();
            let types: Vec<String> = hooks[hooks_before..]
                .iter()
                .filter_map(|request| serde_json::from_slice::<Value>(&request.body).ok())
                .filter(|event| event["data"]["revision"] == rev)
                .map(|event| event["type"].as_str().unwrap_or("").to_string())
                .collect();
            (types.iter().any(|t| t == "deployment.failed") && types.iter().any(|t| t == "deployment.succeeded")).then_some(hooks)
        })
        .await;
        for request in &hooks[hooks_before..] {
            let (header, body) = (request.headers["gantry-signature"].clone(), &request.body);
            let t: i64 = header.strip_prefix("t=").and_then(|r| r.split(',').next()).and_then(|t| t.parse().ok()).unwrap();
            assert_eq!(header, gantry_hub::webhooks::signature(self.hook_secret.as_bytes(), t, body), "{label}: a delivery's signature does not verify");
        }
    }

    fn registry_logins(&self) -> Vec<String> {
        self.registry.lock().unwrap().iter().filter_map(|request| request.headers.get("authorization").cloned()).collect()
    }
}

async fn key_status(api: &Api) -> Value {
    let (status, body) = api.get("/api/v1/secrets-key").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Run the hub CLI with the operator key; exit code, stdout, stderr.
async fn hub_cli(args: &[&str], key: &str) -> (i32, String, String) {
    let output = tokio::process::Command::new(hub_binary())
        .args(args)
        .env("GANTRY_API_KEY", key)
        .env("GANTRY_LOG", "error")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run hub command");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_and_webhooks_keep_working_before_during_and_after_a_key_rotation() {
    if !docker_available().await {
        return;
    }
    let dir = TempDir::new("keys-rotation");
    // Each resealed value is followed by a pause, so a re-encryption of the values below
    // lasts longer than a round of deploys and deliveries.
    let hub = TestHub::start(&dir.path().join("hub"), |c| {
        c.webhook_retry_base_ms = 200;
        c.reencrypt_pause_ms = REENCRYPT_PAUSE_MS;
    })
    .await;
    hub.create_org("acme", 5).await;
    let api = hub.api();
    let state = dir.path().join("agent");
    let agent = enroll(&hub.token("acme", 1, "10m").await, &state).await.unwrap();
    let config = agent_config_file(dir.path(), &state, &[], "[host]\nenabled = false\n[docker.logs]\nenabled = false");
    let _agent = AgentProcess::start_with_config(&config, &state);
    hub.wait_status(&agent, "online", Duration::from_secs(20)).await;

    let (registry_port, registry) = recorder(registry_reply).await;
    let registry_host = format!("127.0.0.1:{registry_port}");
    put(&api, &format!("/api/v1/orgs/acme/registries/{registry_host}"), json!({ "username": "deploy", "password": REGISTRY_PASSWORD })).await;
    put(&api, "/api/v1/orgs/acme/secrets/db", json!({ "value": SECRET_VALUE })).await;
    for n in 0..BULK_SECRETS {
        put(&api, &format!("/api/v1/orgs/acme/secrets/bulk-{n}"), json!({ "value": format!("bulk value {n}") })).await;
    }
    let sealed = 3 + BULK_SECRETS;
    let (hooks_port, hooks) = recorder(ok_reply).await;
    let (status, hook) = api.post("/api/v1/orgs/acme/webhooks", &json!({ "url": format!("http://127.0.0.1:{hooks_port}/hooks"), "events": ["*"] })).await;
    assert_eq!(status, 201, "{hook}");
    // "private" never had a good revision, so each of its revisions ends failed (not
    // rolled back); "web" runs the local image.
    let mut ids = Vec::new();
    for (name, image) in [("private", format!("{registry_host}/team/app:1")), ("web", IMAGE.to_string())] {
        let spec = json!({ "name": name, "services": [{ "name": "app", "image": image, "command": ["sh", "-c", "sleep 3600"] }], "health_gate": { "min_healthy_secs": 1, "deadline_secs": 30 } });
        let (status, created) = api.post("/api/v1/orgs/acme/deployments", &json!({ "spec": spec, "targets": { "agents": [agent] } })).await;
        assert_eq!(status, 201, "{created}");
        ids.push(created["id"].as_str().unwrap().to_string());
    }
    let _cleanup = Cleanup(ids.clone());
    wait_state(&api, &ids[0], &agent, 1, "failed").await;
    wait_state(&api, &ids[1], &agent, 1, "healthy").await;
    let mut fleet = Fleet {
        api: api.clone(),
        agent: agent.clone(),
        private: ids[0].clone(),
        web: ids[1].clone(),
        revision: 1,
        registry,
        registry_host,
        hooks,
        hook_secret: hook["secret"].as_str().unwrap().to_string(),
    };

    // Before: everything sealed under version 1.
    fleet.round("before rotation").await;
    let status = key_status(&api).await;
    assert_eq!((status["current_version"].as_u64(), status["values_by_version"].clone()), (Some(1), json!({ "1": sealed })), "{status}");

    // A new version, old values not yet re-encrypted: they stay readable where they are.
    let (status, rotated) = api.post("/api/v1/secrets-key/rotate", &json!({ "reencrypt": false })).await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(rotated["version"], 2);
    assert_eq!(rotated["status"]["values_by_version"], json!({ "1": sealed }), "{rotated}");
    assert_eq!(rotated["status"]["stale"], sealed);
    fleet.round("new version, old ciphertexts").await;
    // A value written now is sealed with the new version.
    put(&api, "/api/v1/orgs/acme/secrets/other", json!({ "value": "x-other-value" })).await;
    assert_eq!(key_status(&api).await["values_by_version"], json!({ "1": sealed, "2": 1 }));

    // During: the CLI re-encrypts while a round of deploys (one pulling with the stored
    // registry login, one with the stored secret) and webhook deliveries runs. The key
    // status shows the pass under way (values moved, others not yet) before the round
    // starts and still after it ended, so every operation of the round ran inside it.
    let key = hub.operator_key.clone();
    let url = format!("http://{}", hub.http);
    let reencrypt = tokio::spawn(async move { hub_cli(&["rotate-key", "--reencrypt-only", "--url", &url], &key).await });
    let in_progress = |status: &Value| status["values_by_version"]["2"].as_u64() > Some(1) && status["stale"].as_u64() > Some(0);
    let started = wait_for(Duration::from_secs(30), "the re-encryption under way", || async {
        let status = key_status(&api).await;
        in_progress(&status).then_some(status)
    })
    .await;
    fleet.round("during re-encryption").await;
    let after_round = key_status(&api).await;
    assert!(in_progress(&after_round), "the re-encryption was still running when the round ended: {started} then {after_round}");
    let (code, stdout, stderr) = reencrypt.await.unwrap();
    assert_eq!(code, 0, "{stdout} {stderr}");
    assert!(stdout.contains(&format!("re-encrypted {sealed} value(s)")), "{stdout}");
    let status = key_status(&api).await;
    assert_eq!((status["values_by_version"].clone(), status["stale"].as_u64()), (json!({ "2": sealed + 1 }), Some(0)), "all on the new version: {status}");
    fleet.round("after re-encryption").await;

    // `gantry-hub rotate-key` does both steps at once.
    let (code, stdout, stderr) = hub_cli(&["rotate-key", "--url", &format!("http://{}", hub.http)], &hub.operator_key).await;
    assert_eq!(code, 0, "{stdout} {stderr}");
    assert!(stdout.contains("secrets key version 3 is now current"), "{stdout}");
    assert_eq!(key_status(&api).await["values_by_version"], json!({ "3": sealed + 1 }));
    fleet.round("after a second rotation").await;

    // Both rotations and the re-encryption are in the audit log.
    let (_, audit) = api.get("/api/v1/audit?action=POST%20/api/v1/secrets-key").await;
    let actions: Vec<&str> = audit["entries"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions.iter().filter(|a| a.ends_with("/rotate")).count(), 2, "{actions:?}");
    assert_eq!(actions.iter().filter(|a| a.ends_with("/reencrypt")).count(), 1, "{actions:?}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_needs_every_key_version_and_only_operators_may_rotate() {
    let dir = TempDir::new("keys-restart");
    let data = dir.path().join("hub");
    let hub = TestHub::start(&data, |_| {}).await;
    hub.create_org("acme", 5).await;
    let api = hub.api();
    put(&api, "/api/v1/orgs/acme/secrets/db", json!({ "value": SECRET_VALUE })).await;

    // Not for org keys, and a bad body changes nothing.
    let (_, key) = api.post("/api/v1/orgs/acme/api-keys", &json!({ "name": "org admin", "scopes": ["admin", "read"] })).await;
    let org_key = api.with_bearer(key["key"].as_str().unwrap());
    for path in ["/api/v1/secrets-key/rotate", "/api/v1/secrets-key/reencrypt"] {
        let (status, reply) = org_key.post(path, &json!({})).await;
        assert_eq!(status, 403, "{path}: {reply}");
    }
    let (status, _) = org_key.get("/api/v1/secrets-key").await;
    assert_eq!(status, 403);
    let (status, _, reply) = api.send("POST", "/api/v1/secrets-key/rotate", Some("application/json"), b"{\"reencrypt\": \"yes\"}".to_vec()).await;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(key_status(&api).await["current_version"], 1, "nothing rotated");

    // Rotate with an empty body (defaults: re-encrypt at once).
    let (status, _, reply) = api.send("POST", "/api/v1/secrets-key/rotate", None, Vec::new()).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(key_status(&api).await["values_by_version"], json!({ "2": 1 }));
    let v2 = data.join("pki").join("secrets.key.v2");
    assert!(v2.exists());
    let sealed_before = std::fs::read(&v2).unwrap();
    hub.stop().await;

    // A restart loads every version: the secret still opens (it is moved to a third).
    let hub = TestHub::start(&data, |_| {}).await;
    let (status, rotated) = hub.api().post("/api/v1/secrets-key/rotate", &json!({})).await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!((rotated["reencrypted"]["resealed"].as_u64(), rotated["reencrypted"]["failed"].as_u64()), (Some(1), Some(0)), "{rotated}");
    assert_eq!(std::fs::read(&v2).unwrap(), sealed_before, "key files are never rewritten");
    hub.stop().await;

    // Without the version-2 file the hub refuses to start and names what is missing.
    std::fs::rename(&v2, dir.path().join("moved-away")).unwrap();
    let config = gantry_hub::config::Config { data_dir: data.clone(), public_addr: Some("127.0.0.1:7443".into()), ..Default::default() };
    let error = gantry_hub::Hub::open(config).unwrap_err();
    let message = format!("{error:#}");
    assert!(message.contains("key version 3") && message.contains("secrets.key.v2") && message.contains("secrets.key.v3"), "{message}");
}
