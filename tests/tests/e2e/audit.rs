//! The audit log as users meet it: every mutating API call (and a failed login) leaves
//! exactly one entry naming the caller, org, route, status, request id and address; reads
//! leave none; another org cannot read it; it exports as JSON lines; and
//! `gantry-hub audit verify` refuses a running hub's data directory, passes an untouched
//! log once the hub is stopped and names the entry someone edited.

#![allow(clippy::unwrap_used)]

use gantry_tests::*;
use serde_json::{json, Value};
use std::time::Duration;

/// Send a JSON request; status, `x-request-id` and the parsed body.
async fn call(api: &Api, method: &str, path: &str, body: Option<Value>) -> (u16, String, Value) {
    let (content_type, bytes) = match body {
        Some(body) => (Some("application/json"), serde_json::to_vec(&body).unwrap()),
        None => (None, Vec::new()),
    };
    let (status, headers, text) = api.send(method, path, content_type, bytes).await;
    let request_id = headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    (status, request_id, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn hub_cli(args: &[&str]) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(hub_binary());
    command.args(args).env("GANTRY_LOG", "error").stdin(std::process::Stdio::null());
    let output = tokio::time::timeout(Duration::from_secs(60), command.output()).await.expect("hub command timed out").unwrap();
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Open the stopped hub's sled store directly (its lock can trail the hub's shutdown).
async fn open_raw_store(data: &std::path::Path) -> sled::Db {
    wait_for(Duration::from_secs(15), "the stopped hub to release its store", || async { sled::open(data.join("store")).ok() }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_calls_are_audited_once_and_tampering_is_detected() {
    let dir = TempDir::new("audit");
    let hub = TestHub::start(dir.path(), |_| {}).await;
    let api = hub.api();
    let operator = format!("key:{}", hub.operator_key.trim_start_matches("gk_").split('.').next().unwrap());

    // Five state changes: two orgs, a check, a refused token request, a failed login.
    let (status, create_acme, _) = call(&api, "POST", "/api/v1/orgs", Some(json!({ "id": "acme" }))).await;
    assert_eq!(status, 201);
    let (status, create_globex, _) = call(&api, "POST", "/api/v1/orgs", Some(json!({ "id": "globex" }))).await;
    assert_eq!(status, 201);
    let check = json!({ "spec": { "name": "m", "probe": { "type": "memory", "max_used_percent": 90 } } });
    let (status, create_check, body) = call(&api, "POST", "/api/v1/orgs/acme/checks", Some(check)).await;
    assert_eq!(status, 201, "{body}");
    let check_id = body["id"].as_str().unwrap().to_string();
    let (status, bad_token, body) = call(&api, "POST", "/api/v1/orgs/acme/enrollment-tokens", Some(json!({ "ttl": true }))).await;
    assert_eq!(status, 400, "{body}");
    let login = json!({ "email": ADMIN_EMAIL, "password": "not the admin password" });
    let (status, bad_login, _) = call(&api.anonymous(), "POST", "/api/v1/auth/login", Some(login)).await;
    assert_eq!(status, 401);

    // Reads are not recorded, but they get a request id too.
    let (status, read_id, _) = call(&api, "GET", "/api/v1/orgs/acme/checks", None).await;
    assert_eq!(status, 200);
    assert_eq!(read_id.len(), 32, "every response has an x-request-id");
    let ids = [&create_acme, &create_globex, &create_check, &bad_token, &bad_login, &read_id];
    assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>().len(), ids.len(), "request ids are unique");

    let (status, _, all) = call(&api, "GET", "/api/v1/audit", None).await;
    assert_eq!(status, 200, "{all}");
    let entries = all["entries"].as_array().unwrap();
    let summary: Vec<_> = entries
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["actor"].as_str().unwrap(),
                e["org"].as_str(),
                e["action"].as_str().unwrap(),
                e["outcome"].as_str().unwrap(),
                e["request_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (5, ADMIN_EMAIL, None, "POST /api/v1/auth/login", "401", bad_login.as_str()),
            (4, operator.as_str(), Some("acme"), "POST /api/v1/orgs/{org}/enrollment-tokens", "400", bad_token.as_str()),
            (3, operator.as_str(), Some("acme"), "POST /api/v1/orgs/{org}/checks", "201", create_check.as_str()),
            (2, operator.as_str(), Some("globex"), "POST /api/v1/orgs", "201", create_globex.as_str()),
            (1, operator.as_str(), Some("acme"), "POST /api/v1/orgs", "201", create_acme.as_str()),
        ],
        "one entry per mutating call, newest first: {all:#}"
    );
    assert_eq!(entries[0]["actor_kind"], "anonymous", "a failed login is not an identity");
    assert_eq!(entries[1]["actor_kind"], "api_key");
    assert_eq!(entries[2]["target"], json!({ "org": "acme", "id": check_id }));
    assert_eq!(entries[4]["target"], json!({ "id": "acme" }));
    assert!(entries.iter().all(|e| e["client_ip"] == "127.0.0.1"), "{all:#}");
    assert!(!all.to_string().contains("not the admin password"), "no password in the log");
    assert!(all["next_cursor"].is_null());

    // Paging by cursor, newest first; filters.
    let (_, _, first) = call(&api, "GET", "/api/v1/audit?limit=2", None).await;
    assert_eq!(first["entries"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(), [5, 4]);
    let cursor = first["next_cursor"].as_str().unwrap().to_string();
    let (_, _, second) = call(&api, "GET", &format!("/api/v1/audit?limit=2&cursor={cursor}"), None).await;
    assert_eq!(second["entries"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(), [3, 2]);
    let (_, _, by_actor) = call(&api, "GET", &format!("/api/v1/audit?actor={ADMIN_EMAIL}"), None).await;
    assert_eq!(by_actor["entries"].as_array().unwrap().len(), 1, "{by_actor}");
    let (_, _, acme) = call(&api, "GET", "/api/v1/orgs/acme/audit", None).await;
    assert_eq!(acme["entries"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(), [4, 3, 1]);
    let (_, _, checks) = call(&api, "GET", "/api/v1/orgs/acme/audit?action=POST%20/api/v1/orgs/%7Borg%7D/checks", None).await;
    assert_eq!(checks["entries"].as_array().unwrap().len(), 1, "{checks}");
    let (status, _, _) = call(&api, "GET", "/api/v1/orgs/nope/audit", None).await;
    assert_eq!(status, 404, "unknown org");

    // Another org's key sees its own org's log only; the global log is for operators.
    let (_, globex_key) = gantry_hub::auth::create_api_key(&hub.hub, "globex key", Some("globex".into()), "test").unwrap();
    let globex = api.with_bearer(&globex_key);
    let (status, _, _) = call(&globex, "GET", "/api/v1/orgs/acme/audit", None).await;
    assert_eq!(status, 404);
    let (status, _, _) = call(&globex, "GET", "/api/v1/audit", None).await;
    assert_eq!(status, 403);
    let (status, _, own) = call(&globex, "GET", "/api/v1/orgs/globex/audit", None).await;
    assert_eq!(status, 200);
    assert_eq!(own["entries"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(), [2]);

    // Export: JSON lines, one entry each.
    let (status, headers, text) = api.send("GET", "/api/v1/orgs/acme/audit?format=jsonl", None, Vec::new()).await;
    assert_eq!(status, 200);
    assert_eq!(headers.get("content-type").unwrap(), "application/x-ndjson");
    let lines: Vec<Value> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(lines.iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(), [4, 3, 1]);
    assert!(lines.iter().all(|e| e["hash"].as_str().unwrap().len() == 64));

    // None of these reads were recorded.
    let (_, _, after) = call(&api, "GET", "/api/v1/audit", None).await;
    assert_eq!(after["entries"].as_array().unwrap().len(), 5);

    // Verifying reads the store directly, so a running hub is refused, saying why.
    let data = hub.data.clone();
    let data_arg = data.to_str().unwrap();
    let (code, _, stderr) = hub_cli(&["audit", "verify", "--data", data_arg]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("stop the hub before running `gantry-hub audit verify`"), "{stderr}");

    hub.stop().await;
    let (code, stdout, stderr) = hub_cli(&["audit", "verify", "--data", data_arg]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("audit chain intact: 5 entries, last hash "), "{stdout}");

    // Someone turns the refused request (seq 4) into a success.
    {
        let db = open_raw_store(&data).await;
        let tree = db.open_tree("audit").unwrap();
        let key = 4u64.to_be_bytes();
        let stored = String::from_utf8(tree.get(key).unwrap().unwrap().to_vec()).unwrap();
        assert!(stored.contains(r#""outcome":"400""#), "{stored}");
        tree.insert(key, stored.replace(r#""outcome":"400""#, r#""outcome":"201""#).as_bytes()).unwrap();
        db.flush().unwrap();
    }
    let (code, stdout, stderr) = hub_cli(&["audit", "verify", "--data", data_arg]).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stderr.contains("audit chain broken at seq 4: hash mismatch"), "{stderr}");
}
