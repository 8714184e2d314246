//! Customer data end to end: two orgs, each with a real enrolled agent streaming logs,
//! events, metrics and check reports over QUIC, plus deployments, webhooks, secrets,
//! registry logins, members, invitations, API keys, checks, alerts, silences and ledger
//! entries. The export of one org holds exactly its data (every kind, counts as the API
//! shows them) and nothing of the other; deleting it takes a confirmation, revokes and
//! disconnects its agent, answers 404 everywhere after, leaves none of its log text in
//! any file of the hub's data directory and none of its ids, names or addresses in any
//! store tree but the kept ones (ledger, invoices, subscription, Stripe, audit, the
//! tombstone), erases its people's emails, addresses and command lines from the audit log
//! (which still verifies; after `gantry-hub compact` they are in no file of the data
//! directory), and leaves the other org as it was. Wrong confirmations change nothing.
//! `gantry-hub org export` downloads the same archive. An export's `from`/`to` bound the
//! telemetry to [from, to). A deletion interrupted by SIGKILL is finished when the hub
//! starts again.

#![allow(clippy::unwrap_used)]

use base64::Engine;
use gantry_tests::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const PASSWORD: &str = "violet harbor stapler quantum 42";

/// Trees that keep a deleted org's records for accounting (see README, "Customer data").
const KEPT_TREES: [&str; 15] = [
    "audit",
    "audit_by_org",
    "ledger_entries",
    "ledger_keys",
    "ledger_hours",
    "ledger_work",
    "ledger_conflicts",
    "subscriptions",
    "invoices",
    "stripe_outbox",
    "stripe_outbox_open",
    "stripe_events",
    "stripe_marks",
    "org_tombstones",
    "ledger_meta",
];
const LINES: usize = 40;

fn fast(config: &mut gantry_hub::config::Config) {
    config.alert_interval_ms = 200;
}

async fn send_json(api: &Api, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, text) = api.send(method, path, Some("application/json"), serde_json::to_vec(body).unwrap()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Everything made for one org, and the strings that must (not) appear in exports.
struct Tenant {
    org: String,
    agent_id: String,
    marker: String,
    agent: AgentProcess,
    owner: Api,
    owner_email: String,
    token: String,
    key_secret: String,
    deployment_id: String,
    webhook_secret: String,
    secret_value: String,
    registry_password: String,
    /// Ids, names and addresses of this org's objects.
    identifiers: Vec<String>,
}

/// Create org `org` with everything a customer has, its agent online and its data stored.
async fn tenant(hub: &TestHub, dir: &Path, org: &str, marker: &str) -> Tenant {
    let api = hub.api();
    hub.create_org(org, 10).await;
    let token = hub.token(org, 2, "1h").await;
    let state = dir.join(format!("agent-{org}"));
    let agent_id = enroll(&token, &state).await.unwrap();
    let log = dir.join(format!("{org}.log"));
    let text: String = (0..LINES).map(|n| format!("{marker} request {n} served\n")).collect();
    std::fs::write(&log, text).unwrap();
    let config = agent_config_file(dir, &state, &[&log], "[host]\ninterval_secs = 1\n[docker]\nenabled = false");
    let agent = AgentProcess::start_with_config(&config, &state);
    hub.wait_status(&agent_id, "online", Duration::from_secs(20)).await;

    // An owner (by invitation), an API key of theirs, and a pending invitation.
    let owner_email = format!("owner@{org}.example");
    let (code, invitation) = api.post(&format!("/api/v1/orgs/{org}/invitations"), &json!({ "email": owner_email, "role": "owner" })).await;
    assert_eq!(code, 201, "{invitation}");
    let (code, headers, text) = api
        .anonymous()
        .send(
            "POST",
            "/api/v1/invitations/accept",
            Some("application/json"),
            json!({ "token": invitation["token"], "password": PASSWORD }).to_string().into_bytes(),
        )
        .await;
    assert_eq!(code, 200, "{text}");
    let owner = api.anonymous().with_cookie(&session_cookie_of(&headers).unwrap());
    let (code, pending) = api.post(&format!("/api/v1/orgs/{org}/invitations"), &json!({ "email": format!("later@{org}.example"), "role": "viewer" })).await;
    assert_eq!(code, 201, "{pending}");
    let key_name = format!("{org}-ci-key");
    let (code, key) = owner.post(&format!("/api/v1/orgs/{org}/api-keys"), &json!({ "name": key_name, "scopes": ["read"] })).await;
    assert_eq!(code, 201, "{key}");

    let webhook_url = format!("http://127.0.0.1:{}/hooks/{org}", free_tcp_addr().port());
    let (code, webhook) = api.post(&format!("/api/v1/orgs/{org}/webhooks"), &json!({ "url": webhook_url, "events": ["*"] })).await;
    assert_eq!(code, 201, "{webhook}");
    let secret_name = format!("{org}-db-password");
    let secret_value = format!("{org}-s3cret-value-{}", rand::random::<u64>());
    let (code, body) = send_json(&api, "PUT", &format!("/api/v1/orgs/{org}/secrets/{secret_name}"), &json!({ "value": secret_value })).await;
    assert_eq!(code, 201, "{body}");
    let registry = format!("registry.{org}.example:5000");
    let registry_password = format!("{org}-registry-pw-{}", rand::random::<u64>());
    let (code, body) = send_json(
        &api,
        "PUT",
        &format!("/api/v1/orgs/{org}/registries/{registry}"),
        &json!({ "username": format!("{org}-puller"), "password": registry_password }),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let deployment_name = format!("{org}-web");
    let spec = json!({ "name": deployment_name, "services": [{ "name": "app", "image": "busybox:latest", "command": ["sleep", "600"] }] });
    let (code, deployment) = api.post(&format!("/api/v1/orgs/{org}/deployments"), &json!({ "spec": spec, "targets": { "agents": [agent_id] } })).await;
    assert_eq!(code, 201, "{deployment}");
    // A second revision: the export holds every revision.
    let spec = json!({ "name": deployment_name, "services": [{ "name": "app", "image": "busybox:latest", "command": ["sleep", "700"] }] });
    let (code, body) = send_json(
        &api,
        "PUT",
        &format!("/api/v1/deployments/{}", deployment["id"].as_str().unwrap()),
        &json!({ "spec": spec, "targets": { "agents": [agent_id] } }),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    // Settings and a brand with a logo, each a per-org record of its own.
    let (code, body) = send_json(&api, "PUT", &format!("/api/v1/orgs/{org}/settings"), &json!({ "exec_enabled": true })).await;
    assert_eq!(code, 200, "{body}");
    let brand_name = format!("{org} Cloud Console");
    let logo = format!("<svg xmlns=\"http://www.w3.org/2000/svg\"><title>{org}-logo-mark</title></svg>");
    let logo_url = format!("data:image/svg+xml;base64,{}", base64::engine::general_purpose::STANDARD.encode(logo.as_bytes()));
    let (code, body) =
        send_json(&api, "PUT", &format!("/api/v1/orgs/{org}/branding"), &json!({ "product_name": brand_name, "accent": "#aa3300", "logo": logo_url })).await;
    assert_eq!(code, 200, "{body}");
    // A check that fails (nothing listens on its port), so reports, states and an alert exist.
    let check_name = format!("{org}-api-port");
    let probe = json!({ "type": "tcp", "host": "127.0.0.1", "port": free_tcp_addr().port() });
    let (code, check) = api
        .post(
            &format!("/api/v1/orgs/{org}/checks"),
            &json!({ "spec": { "name": check_name, "probe": probe, "interval_secs": 1, "timeout_secs": 1, "failure_threshold": 1 } }),
        )
        .await;
    assert_eq!(code, 201, "{check}");
    let (code, silence) = api
        .post(&format!("/api/v1/orgs/{org}/silences"), &json!({ "rule": "agent_offline", "duration": "1h", "reason": format!("{org} maintenance window") }))
        .await;
    assert_eq!(code, 201, "{silence}");
    let (code, correction) = api
        .post("/api/v1/billing/corrections", &json!({ "org": org, "meter": "events", "quantity": 3, "reason": "goodwill", "id": format!("{org}-c1") }))
        .await;
    assert_eq!(code, 201, "{correction}");

    // Everything stored: every log line, events, metrics, a failing check and its alert.
    wait_for(Duration::from_secs(30), &format!("{org}'s log lines"), || async {
        let records = api.all_records(&format!("/api/v1/orgs/{org}/logs"), "").await;
        (records.iter().filter(|r| r["line"].as_str().is_some_and(|l| l.starts_with(marker))).count() == LINES).then_some(())
    })
    .await;
    wait_for(Duration::from_secs(30), &format!("{org}'s events"), || async {
        (!api.all_records(&format!("/api/v1/orgs/{org}/events"), "").await.is_empty()).then_some(())
    })
    .await;
    wait_for(Duration::from_secs(60), &format!("{org}'s check_failing alert"), || async {
        let (_, body) = api.get(&format!("/api/v1/orgs/{org}/alerts")).await;
        body["alerts"].as_array().unwrap().iter().any(|a| a["rule"] == "check_failing").then_some(())
    })
    .await;
    wait_for(Duration::from_secs(30), &format!("{org}'s metrics"), || async {
        let (_, body) = api.get(&format!("/api/v1/agents/{agent_id}/metrics")).await;
        body["names"].as_array().is_some_and(|n| !n.is_empty()).then_some(())
    })
    .await;

    let owner_id = {
        let (_, me) = owner.get("/api/v1/auth/me").await;
        me["id"].as_str().unwrap().to_string()
    };
    let identifiers = vec![
        org.to_string(),
        agent_id.clone(),
        marker.to_string(),
        owner_email.clone(),
        owner_id,
        key_name,
        key["id"].as_str().unwrap().to_string(),
        webhook_url,
        webhook["id"].as_str().unwrap().to_string(),
        secret_name,
        registry,
        deployment_name,
        deployment["id"].as_str().unwrap().to_string(),
        check_name,
        check["id"].as_str().unwrap().to_string(),
        silence["id"].as_str().unwrap().to_string(),
        brand_name,
        format!("{org}-logo-mark"),
    ];
    Tenant {
        org: org.to_string(),
        agent_id,
        marker: marker.to_string(),
        agent,
        owner,
        owner_email,
        token,
        key_secret: key["key"].as_str().unwrap().to_string(),
        deployment_id: deployment["id"].as_str().unwrap().to_string(),
        webhook_secret: webhook["secret"].as_str().unwrap().to_string(),
        secret_value,
        registry_password,
        identifiers,
    }
}

/// The files of a ustar archive, by name.
fn untar(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut at = 0;
    while at + 512 <= bytes.len() {
        let header = &bytes[at..at + 512];
        if header.iter().all(|b| *b == 0) {
            break;
        }
        assert_eq!(&header[257..262], b"ustar", "ustar magic at {at}");
        let stored = u64::from_str_radix(std::str::from_utf8(&header[148..154]).unwrap(), 8).unwrap();
        let sum: u64 = header.iter().enumerate().map(|(i, b)| if (148..156).contains(&i) { 32 } else { u64::from(*b) }).sum();
        assert_eq!(stored, sum, "header checksum at {at}");
        let name = String::from_utf8(header[..100].iter().take_while(|b| **b != 0).copied().collect()).unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&header[124..135]).unwrap(), 8).unwrap();
        files.insert(name, bytes[at + 512..at + 512 + size].to_vec());
        at += 512 + size.div_ceil(512) * 512;
    }
    files
}

fn lines(files: &BTreeMap<String, Vec<u8>>, org: &str, name: &str) -> Vec<Value> {
    let data = files.get(&format!("{org}/{name}")).unwrap_or_else(|| panic!("{name} missing from the export: {:?}", files.keys()));
    std::str::from_utf8(data).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

async fn export(api: &Api, org: &str, query: &str) -> (u16, Vec<u8>) {
    let (status, headers, body) = api.send("GET", &format!("/api/v1/orgs/{org}/export{query}"), None, vec![]).await;
    if status == 200 {
        assert_eq!(headers.get("content-type").unwrap(), "application/x-tar");
        assert!(headers.get("content-disposition").unwrap().to_str().unwrap().contains(".tar"));
    }
    (status, body.into_bytes())
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if std::fs::read(&path).is_ok_and(|bytes| contains(&bytes, needle)) {
            found.push(path.display().to_string());
        }
    }
    found
}

/// Trees other than [`KEPT_TREES`] holding `needle`.
fn unkept_trees_containing(store: &gantry_hub::store::Store, needle: &str) -> BTreeMap<String, u64> {
    let mut found = store.trees_containing(needle.as_bytes()).unwrap();
    found.retain(|tree, _| !KEPT_TREES.contains(&tree.as_str()));
    found
}

/// Run `gantry-hub ARGS` with `GANTRY_API_KEY=key`; exit code, stdout, stderr.
async fn hub_cli(args: &[&str], key: &str) -> (i32, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(hub_binary()).args(args).env("GANTRY_API_KEY", key).env("GANTRY_LOG", "error").stdin(std::process::Stdio::null()).output(),
    )
    .await
    .expect("hub command timed out")
    .expect("run hub command");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

async fn count(api: &Api, path: &str, key: &str) -> usize {
    let (code, body) = api.get(path).await;
    assert_eq!(code, 200, "{path}: {body}");
    body[key].as_array().unwrap_or_else(|| panic!("{path}: {body}")).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_org_exports_exactly_its_own_data_and_deletion_leaves_none_behind() {
    let dir = TempDir::new("org-data");
    let hub = TestHub::start(&dir.path().join("hub"), fast).await;
    let api = hub.api();
    let mut alpha = tenant(&hub, dir.path(), "alpha-corp", "MARKER-ALPHA-7f3c1e").await;
    let bravo = tenant(&hub, dir.path(), "bravo-corp", "MARKER-BRAVO-91d2ab").await;
    let org = alpha.org.clone();

    // ---- export ----
    let to = gantry_hub::wall_ms() + 1;
    let (code, archive) = export(&alpha.owner, &org, &format!("?from=0&to={to}&metrics=true")).await;
    assert_eq!(code, 200, "the owner may export");
    let files = untar(&archive);
    let manifest: Value = serde_json::from_slice(&files[&format!("{org}/manifest.json")]).unwrap();
    assert_eq!(manifest["format"], "gantry-org-export/1");
    assert_eq!(manifest["org"], org.as_str());
    for (name, n) in manifest["files"].as_object().unwrap() {
        assert_eq!(lines(&files, &org, name).len() as u64, n.as_u64().unwrap(), "manifest count of {name}");
    }
    // Every kind is there, and counts agree with what the API shows.
    let logs = lines(&files, &org, "logs.jsonl");
    let api_logs = api.all_records(&format!("/api/v1/orgs/{org}/logs"), &format!("&from=0&to={to}")).await;
    assert_eq!(logs.len(), api_logs.len(), "log records");
    assert_eq!(logs.iter().filter(|l| l["line"].as_str().unwrap_or("").starts_with(&alpha.marker)).count(), LINES);
    let events = lines(&files, &org, "events.jsonl");
    assert_eq!(events.len(), api.all_records(&format!("/api/v1/orgs/{org}/events"), &format!("&from=0&to={to}")).await.len(), "events");
    assert!(events.iter().any(|e| e["event"] == "agent.started"), "agent events");
    assert!(!lines(&files, &org, "check_reports.jsonl").is_empty(), "check reports");
    let metrics = lines(&files, &org, "metrics.jsonl");
    assert!(!metrics.is_empty() && metrics.iter().all(|m| m["agent"] == alpha.agent_id.as_str()), "metrics of the agent");
    let agents = lines(&files, &org, "agents.jsonl");
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["id"], alpha.agent_id.as_str());
    assert_eq!(lines(&files, &org, "enrollment_tokens.jsonl").len(), 1);
    let deployments = lines(&files, &org, "deployments.jsonl");
    assert_eq!(deployments.len(), count(&api, &format!("/api/v1/orgs/{org}/deployments"), "deployments").await);
    assert_eq!(deployments[0]["id"], alpha.deployment_id.as_str());
    assert_eq!(deployments[0]["revisions"].as_array().unwrap().len(), 2, "every revision");
    let org_line = &lines(&files, &org, "org.jsonl")[0];
    assert_eq!(org_line["settings"]["exec_enabled"], true, "{org_line}");
    let brand = lines(&files, &org, "branding.jsonl");
    assert_eq!(brand.len(), 1);
    assert_eq!(brand[0]["product_name"], format!("{org} Cloud Console"));
    let logo = base64::engine::general_purpose::STANDARD.decode(brand[0]["logo_base64"].as_str().unwrap()).unwrap();
    assert!(contains(&logo, &format!("{org}-logo-mark")), "the logo's bytes");
    assert_eq!(lines(&files, &org, "checks.jsonl").len(), count(&api, &format!("/api/v1/orgs/{org}/checks"), "checks").await);
    assert!(!lines(&files, &org, "check_states.jsonl").is_empty());
    assert_eq!(lines(&files, &org, "alerts.jsonl").len(), count(&api, &format!("/api/v1/orgs/{org}/alerts"), "alerts").await);
    assert_eq!(lines(&files, &org, "silences.jsonl").len(), count(&api, &format!("/api/v1/orgs/{org}/silences"), "silences").await);
    assert_eq!(lines(&files, &org, "webhooks.jsonl").len(), count(&api, &format!("/api/v1/orgs/{org}/webhooks"), "webhooks").await);
    assert!(!lines(&files, &org, "webhook_deliveries.jsonl").is_empty() && !lines(&files, &org, "webhook_events.jsonl").is_empty());
    assert_eq!(lines(&files, &org, "secrets.jsonl").len(), count(&api, &format!("/api/v1/orgs/{org}/secrets"), "secrets").await);
    assert_eq!(lines(&files, &org, "registry_logins.jsonl").len(), count(&api, &format!("/api/v1/orgs/{org}/registries"), "registries").await);
    assert_eq!(lines(&files, &org, "members.jsonl").len(), count(&api, &format!("/api/v1/orgs/{org}/members"), "members").await);
    assert_eq!(lines(&files, &org, "invitations.jsonl").len(), count(&api, &format!("/api/v1/orgs/{org}/invitations"), "invitations").await);
    assert_eq!(lines(&files, &org, "api_keys.jsonl").len(), count(&api, &format!("/api/v1/orgs/{org}/api-keys"), "api_keys").await);
    let ledger = lines(&files, &org, "ledger.jsonl");
    assert!(ledger.iter().any(|e| e["source"].as_str().unwrap_or("").contains(&format!("{org}-c1"))), "the correction: {ledger:?}");
    let (code, invoices) = api.get(&format!("/api/v1/orgs/{org}/invoices")).await;
    assert_eq!(code, 200, "{invoices}");
    assert_eq!(lines(&files, &org, "invoices.jsonl").len(), invoices["invoices"].as_array().map_or(0, Vec::len), "closed invoices: {invoices}");
    let (code, page) = api.get(&format!("/api/v1/orgs/{org}/audit?limit=1000")).await;
    assert_eq!(code, 200);
    let audited: Vec<u64> =
        page["entries"].as_array().unwrap().iter().filter(|e| e["action"] != "GET /api/v1/orgs/{org}/export").map(|e| e["seq"].as_u64().unwrap()).collect();
    let mut exported: Vec<u64> = lines(&files, &org, "audit.jsonl").iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    exported.reverse();
    assert_eq!(exported, audited, "audit entries of the org, all of them");
    // The export itself is in the audit log, by the owner.
    assert!(page["entries"].as_array().unwrap().iter().any(|e| e["action"] == "GET /api/v1/orgs/{org}/export" && e["actor"] == alpha.owner_email.as_str()));
    // Nothing of the other org, and no secret of this one, anywhere in the archive.
    for needle in &bravo.identifiers {
        assert!(!contains(&archive, needle), "{needle} of {} is in {org}'s export", bravo.org);
    }
    for secret in [&alpha.key_secret, &alpha.webhook_secret, &alpha.secret_value, &alpha.registry_password] {
        assert!(!contains(&archive, secret), "a secret value is in the export");
    }
    assert!(!contains(&archive, "$argon2") && !contains(&archive, "secret_sha256") && !contains(&archive, "sealed"), "hashes or sealed values in the export");

    // Export: only owners of the org and operators; bad ranges refused.
    assert_eq!(export(&bravo.owner, &org, "").await.0, 404, "another org's owner");
    let (code, viewer_key) = alpha.owner.post(&format!("/api/v1/orgs/{org}/api-keys"), &json!({ "name": "reader", "scopes": ["read"] })).await;
    assert_eq!(code, 201, "{viewer_key}");
    assert_eq!(export(&api.with_bearer(viewer_key["key"].as_str().unwrap()), &org, "").await.0, 403, "a read-only key");
    assert_eq!(export(&api, "no-such-org", "").await.0, 404);
    assert_eq!(export(&api, &org, "?from=yesterday").await.0, 400);
    assert_eq!(export(&api, &org, "?from=100&to=50").await.0, 400);
    assert_eq!(export(&api, &org, "?colour=red").await.0, 400);
    let (code, full) = export(&api, &org, "").await;
    assert_eq!(code, 200, "an operator may export");
    assert!(contains(&full, &alpha.marker));

    // ---- the same export from the command line ----
    let url = format!("http://{}", hub.http);
    let out = dir.path().join("alpha-export.tar");
    let to_arg = to.to_string();
    let (code, stdout, stderr) = hub_cli(
        &["org", "export", "--org", &org, "--out", out.to_str().unwrap(), "--from", "0", "--to", &to_arg, "--metrics", "--url", &url],
        &hub.operator_key,
    )
    .await;
    assert_eq!(code, 0, "org export: {stdout}{stderr}");
    assert!(stdout.contains("written to"), "{stdout}");
    let from_cli = std::fs::read(&out).unwrap();
    let cli_files = untar(&from_cli);
    assert_eq!(cli_files.keys().collect::<Vec<_>>(), files.keys().collect::<Vec<_>>(), "the same files as the API's export");
    for name in ["logs.jsonl", "events.jsonl", "deployments.jsonl", "ledger.jsonl", "webhooks.jsonl", "branding.jsonl"] {
        assert_eq!(lines(&cli_files, &org, name).len(), lines(&files, &org, name).len(), "{name} from the CLI");
    }
    // (Its audit file now also records the refused attempts above, bravo's owner included.)
    for (name, bytes) in cli_files.iter().filter(|(name, _)| !name.ends_with("/audit.jsonl")) {
        for needle in &bravo.identifiers {
            assert!(!contains(bytes, needle), "{needle} of {} is in {name} of the CLI export of {org}", bravo.org);
        }
    }
    // A narrower range holds fewer log records; refusals exit non-zero with the hub's reason.
    let narrow = dir.path().join("alpha-narrow.tar");
    let (code, _, stderr) =
        hub_cli(&["org", "export", "--org", &org, "--out", narrow.to_str().unwrap(), "--from", &to_arg, "--url", &url], &hub.operator_key).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(lines(&untar(&std::fs::read(&narrow).unwrap()), &org, "logs.jsonl").len() < lines(&files, &org, "logs.jsonl").len());
    let missing = dir.path().join("missing.tar");
    let (code, _, stderr) = hub_cli(&["org", "export", "--org", "no-such-org", "--out", missing.to_str().unwrap(), "--url", &url], &hub.operator_key).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("404"), "{stderr}");
    assert!(!missing.exists() && !missing.with_extension("partial").exists(), "nothing written for a refused export");
    let (code, _, stderr) = hub_cli(&["org", "export", "--org", &org, "--out", missing.to_str().unwrap(), "--url", &url], &bravo.key_secret).await;
    assert_ne!(code, 0, "another org's key");
    assert!(stderr.contains("404") || stderr.contains("403"), "{stderr}");

    // ---- deletion: refused without the right confirmation, changing nothing ----
    let delete = |query: String| {
        let api = api.clone();
        let org = org.clone();
        async move {
            let (code, _, text) = api.send("DELETE", &format!("/api/v1/orgs/{org}{query}"), None, vec![]).await;
            (code, serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)))
        }
    };
    let (code, body) = delete(String::new()).await;
    assert_eq!((code, body["error"]["code"].as_str()), (400, Some("confirmation_required")), "{body}");
    let (code, body) = delete("?confirm=delete-alpha-corp-0000000000000000".into()).await;
    assert_eq!((code, body["error"]["code"].as_str()), (409, Some("deletion_not_requested")), "{body}");
    let (code, body) = alpha.owner.post(&format!("/api/v1/orgs/{org}/deletion"), &json!({})).await;
    assert_eq!(code, 403, "owners ask an operator: {body}");
    assert_eq!(api.post("/api/v1/orgs/no-such-org/deletion", &json!({})).await.0, 404);
    let (code, requested) = api.post(&format!("/api/v1/orgs/{org}/deletion"), &json!({})).await;
    assert_eq!(code, 201, "{requested}");
    let confirm = requested["confirm"].as_str().unwrap().to_string();
    assert!(requested["keeps"].as_array().unwrap().iter().any(|k| k.as_str().unwrap().contains("audit")));
    let (code, body) = delete("?confirm=delete-alpha-corp-0123456789abcdef".into()).await;
    assert_eq!((code, body["error"]["code"].as_str()), (409, Some("confirmation_mismatch")), "{body}");
    let (code, _, _) = api.send("DELETE", &format!("/api/v1/orgs/{}?confirm={confirm}", bravo.org), None, vec![]).await;
    assert_eq!(code, 409, "a code is for its own org only");
    assert_eq!(api.get(&format!("/api/v1/orgs/{org}")).await.0, 200, "nothing deleted");
    assert_eq!(hub.agent(&alpha.agent_id).await["status"], "online");
    let still = api.all_records(&format!("/api/v1/orgs/{org}/logs"), "").await;
    assert_eq!(still.iter().filter(|r| r["line"].as_str().unwrap_or("").starts_with(&alpha.marker)).count(), LINES);
    assert_eq!(count(&api, &format!("/api/v1/orgs/{org}/members"), "members").await, 1);

    // A remote exec by the owner (on the agent's host) is audited with its command line,
    // their email and their address.
    let exec_marker = format!("EXEC-MARKER-{}", rand::random::<u64>());
    let (code, body) = alpha.owner.post(&format!("/api/v1/agents/{}/exec", alpha.agent_id), &json!({ "command": ["echo", exec_marker] })).await;
    assert_eq!((code, body["exit_code"].as_i64()), (200, Some(0)), "{body}");
    let (_, before) = api.get(&format!("/api/v1/orgs/{org}/audit?limit=1000")).await;
    let before = before.to_string();
    assert!(
        before.contains(&exec_marker) && before.contains(&alpha.owner_email) && before.contains("127.0.0.1"),
        "the audit log shows who did what from where"
    );

    let bravo_logs_before = api.all_records(&format!("/api/v1/orgs/{}/logs", bravo.org), &format!("&to={to}")).await.len();
    let audit_before =
        hub.hub.store.audit_entries(&gantry_hub::store::AuditFilter { org: Some(org.clone()), ..Default::default() }, 10_000).unwrap().entries.len();

    let (code, _, operator_cookie) = api.anonymous().login(&json!({ "email": ADMIN_EMAIL, "password": ADMIN_PASSWORD })).await;
    assert_eq!(code, 200, "operator login");
    let operator = api.anonymous().with_cookie(&operator_cookie.unwrap());
    assert_eq!(operator.send("GET", &format!("/assets/brand/{org}/logo"), None, vec![]).await.0, 200, "the org's logo is served");
    hub.hub.store.flush().await.unwrap();
    assert!(!files_containing(&hub.data, &alpha.marker).is_empty(), "the scan finds the org's log text while it is stored");
    // (The log text lives in segment files, not trees: the file scan covers it.)
    for needle in alpha.identifiers.iter().filter(|n| **n != alpha.marker) {
        assert!(!unkept_trees_containing(&hub.hub.store, needle).is_empty(), "the store scan finds {needle} while the org exists");
    }
    // ---- deletion ----
    let (code, deleted) = delete(format!("?confirm={confirm}")).await;
    assert_eq!(code, 200, "{deleted}");
    assert_eq!(deleted["deleted"], true);
    assert!(deleted["removed"]["telemetry_records"].as_u64().unwrap() >= LINES as u64, "{deleted}");
    assert_eq!(deleted["removed"]["users"], 1, "the owner belonged to no other org: {deleted}");
    let (code, _) = delete(format!("?confirm={confirm}")).await;
    assert_eq!(code, 404, "the code was spent with the org");

    // The agent was revoked and disconnected: its process ends (revoked is final).
    let status = tokio::time::timeout(Duration::from_secs(30), alpha.agent.child.wait()).await.expect("the revoked agent exits").unwrap();
    assert!(!status.success(), "the agent reports the revocation as an error: {status}");
    assert!(!hub.hub.registry.is_connected(&alpha.agent_id));
    // Nothing more enrolls with the org's token (it had a use left); other orgs' do.
    assert!(enroll(&alpha.token, &dir.path().join("late-alpha")).await.is_err(), "the org's enrollment token still works");
    assert!(enroll(&hub.token(&bravo.org, 1, "1h").await, &dir.path().join("late-bravo")).await.is_ok());

    // Every query about the org answers 404; its key and its owner's session are dead.
    for path in [
        format!("/api/v1/orgs/{org}"),
        format!("/api/v1/orgs/{org}/agents"),
        format!("/api/v1/agents/{}", alpha.agent_id),
        format!("/api/v1/agents/{}/logs", alpha.agent_id),
        format!("/api/v1/agents/{}/events", alpha.agent_id),
        format!("/api/v1/orgs/{org}/logs"),
        format!("/api/v1/orgs/{org}/events"),
        format!("/api/v1/orgs/{org}/deployments"),
        format!("/api/v1/deployments/{}", alpha.deployment_id),
        format!("/api/v1/orgs/{org}/webhooks"),
        format!("/api/v1/orgs/{org}/secrets"),
        format!("/api/v1/orgs/{org}/registries"),
        format!("/api/v1/orgs/{org}/members"),
        format!("/api/v1/orgs/{org}/invitations"),
        format!("/api/v1/orgs/{org}/api-keys"),
        format!("/api/v1/orgs/{org}/checks"),
        format!("/api/v1/orgs/{org}/alerts"),
        format!("/api/v1/orgs/{org}/silences"),
        format!("/api/v1/orgs/{org}/export"),
        format!("/api/v1/orgs/{org}/settings"),
        format!("/api/v1/orgs/{org}/branding"),
        format!("/api/v1/orgs/{org}/invoices"),
        format!("/api/v1/orgs/{org}/alert-rules"),
    ] {
        let (code, body) = api.get(&path).await;
        assert_eq!(code, 404, "{path}: {body}");
    }
    assert_eq!(api.with_bearer(&alpha.key_secret).get(&format!("/api/v1/orgs/{org}/agents")).await.0, 401, "the org's API key");
    assert_eq!(alpha.owner.get("/api/v1/auth/me").await.0, 401, "the owner's session");
    let (code, body) = api.post("/api/v1/orgs", &json!({ "id": org, "agent_limit": 5 })).await;
    assert_eq!(code, 409, "the id stays reserved: {body}");

    assert_eq!(operator.send("GET", &format!("/assets/brand/{org}/logo"), None, vec![]).await.0, 404, "the org's logo");
    // No id, name or address of the org is left in any store tree but the kept ones.
    for needle in &alpha.identifiers {
        let left = unkept_trees_containing(&hub.hub.store, needle);
        assert!(left.is_empty(), "{needle} of the deleted org is still in {left:?}");
    }
    let tombstone = hub.hub.store.org_tombstone(&org).unwrap().expect("tombstone");
    assert!(
        tombstone.finished_at_ms.is_some() && tombstone.removed.get("branding") == Some(&2) && tombstone.removed.get("settings") == Some(&1),
        "{tombstone:?}"
    );
    assert!(hub.hub.store.unfinished_org_deletions().unwrap().is_empty());
    // No readable data of the org is left in any file of the hub; the other org's is.
    hub.hub.store.flush().await.unwrap();
    let found = files_containing(&hub.data, &alpha.marker);
    assert!(found.is_empty(), "{} still readable in {found:?}", alpha.marker);
    assert!(!files_containing(&hub.data, &bravo.marker).is_empty(), "the other org's logs are still stored");

    // Ledger and audit entries are kept (the ledger carries no personal data; the audit
    // entries lose theirs, below).
    let ledger = hub.hub.store.ledger_entries(Some(&org), i64::MIN, i64::MAX, None, 1000).unwrap();
    assert!(ledger.iter().any(|e| e.source.contains(&format!("{org}-c1"))), "ledger entries kept");
    for entry in &ledger {
        let text = serde_json::to_string(entry).unwrap();
        assert!(!text.contains(&alpha.owner_email) && !text.contains(&alpha.marker), "personal data in the ledger: {text}");
    }
    let audit = hub.hub.store.audit_entries(&gantry_hub::store::AuditFilter { org: Some(org.clone()), ..Default::default() }, 10_000).unwrap().entries;
    assert!(audit.len() > audit_before, "audit entries kept, the deletion added");
    let deletion = audit.iter().find(|e| e.action == "DELETE /api/v1/orgs/{org}" && e.outcome == "200").expect("the deletion is audited");
    assert!(deletion.actor.starts_with("key:"), "{deletion:?}");
    assert!(audit.iter().any(|e| e.action == "POST /api/v1/orgs/{org}/deletion" && e.outcome == "201"));
    assert!(matches!(hub.hub.store.verify_audit().unwrap(), gantry_hub::store::AuditVerdict::Intact { .. }), "the audit chain is intact");
    // ... with the personal fields of the org's entries (and of its departed owner's
    // entries outside it) erased: no email, address or command line of theirs is readable.
    assert!(deleted["removed"]["audit_entries_anonymised"].as_u64().unwrap() > 0, "{deleted}");
    let mut all = Vec::new();
    let mut cursor = String::new();
    loop {
        let (code, page) = api.get(&format!("/api/v1/audit?limit=1000{cursor}")).await;
        assert_eq!(code, 200, "{page}");
        all.extend(page["entries"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_u64() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    let text = serde_json::to_string(&all).unwrap();
    assert!(!text.contains(&alpha.owner_email) && !text.contains(&exec_marker), "the deleted org's people are still named in the audit log");
    for entry in all.iter().filter(|e| e["org"] == org.as_str() && e["seq"].as_u64() < Some(deletion.seq)) {
        assert_eq!((entry["actor"].as_str(), entry["client_ip"].as_str()), (Some("[erased]"), None), "{entry}");
        assert!(entry["action"].as_str().is_some_and(|a| !a.is_empty()) && entry.get("salt").is_none(), "what was done stays: {entry}");
    }
    assert!(all.iter().any(|e| e["org"] == org.as_str() && e["action"] == "POST /api/v1/agents/{id}/exec" && e["target"].get("command").is_none()));

    // The other org is untouched.
    assert_eq!(hub.agent(&bravo.agent_id).await["status"], "online");
    assert_eq!(api.all_records(&format!("/api/v1/orgs/{}/logs", bravo.org), &format!("&to={to}")).await.len(), bravo_logs_before);
    assert_eq!(count(&api, &format!("/api/v1/orgs/{}/deployments", bravo.org), "deployments").await, 1);
    assert_eq!(count(&api, &format!("/api/v1/orgs/{}/secrets", bravo.org), "secrets").await, 1);
    assert_eq!(count(&api, &format!("/api/v1/orgs/{}/members", bravo.org), "members").await, 1);
    assert_eq!(bravo.owner.get("/api/v1/auth/me").await.0, 200);
    let (code, archive) = export(&bravo.owner, &bravo.org, "").await;
    assert_eq!(code, 200);
    assert!(contains(&archive, &bravo.marker));
    assert_eq!(bravo.owner.get(&format!("/api/v1/orgs/{}/branding", bravo.org)).await.0, 200);
    for needle in bravo.identifiers.iter().filter(|n| **n != bravo.marker) {
        assert!(!unkept_trees_containing(&hub.hub.store, needle).is_empty(), "{needle} of the other org is still stored");
    }
    let data = hub.data.clone();
    hub.stop().await;

    // sled may still hold erased records' old bytes in its log; `gantry-hub compact` on the
    // stopped hub rewrites the store with only live records. After it, no file of the data
    // directory holds the owner's email or the command line, and the chain still verifies.
    let lingering = files_containing(&data, &alpha.owner_email);
    eprintln!("before compaction the owner's email is in {} file(s) (old sled log bytes): {lingering:?}", lingering.len());
    let (code, stdout, stderr) = hub_cli(&["compact", "--data", data.to_str().unwrap()], "").await;
    assert_eq!(code, 0, "compact: {stdout} {stderr}");
    assert!(stdout.contains("store compacted"), "{stdout}");
    for needle in [&alpha.owner_email, &exec_marker] {
        let found = files_containing(&data, needle);
        assert!(found.is_empty(), "{needle} still readable in {found:?}");
    }
    assert!(!files_containing(&data, &bravo.owner_email).is_empty(), "the other org's owner is still stored");
    let (code, stdout, stderr) = hub_cli(&["audit", "verify", "--data", data.to_str().unwrap()], "").await;
    assert_eq!(code, 0, "audit verify: {stdout} {stderr}");
    assert!(stdout.contains("audit chain intact"), "{stdout}");
    // The compacted store serves: the other org is there.
    let restarted = TestHub::start(&data, fast).await;
    assert_eq!(restarted.api().get(&format!("/api/v1/orgs/{}", bravo.org)).await.0, 200);
    restarted.stop().await;
}

/// A deletion cut short by SIGKILL after its confirmation was accepted (the org record
/// gone, its agent, telemetry, secrets, webhooks, settings and brand still stored) is
/// finished when the hub starts again, before it serves: nothing of the org is left, the
/// other org is untouched, and the audit log says the deletion was resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_interrupted_by_sigkill_is_finished_when_the_hub_starts_again() {
    let dir = TempDir::new("org-delete-kill");
    let data = dir.path().join("hub");
    let (http, quic) = free_addrs();
    // The test hook holds the erasure for a minute after its first step.
    let mut hub = HubProcess::start_with_env(&data, http, quic, &[(gantry_hub::org_data::TEST_PAUSE_ENV, "60000")]).await;
    let api = hub.api(&data);
    let (org, other, marker) = ("gamma-corp", "delta-corp", "MARKER-GAMMA-5be0c4");
    for id in [org, other] {
        let (code, body) = api.post("/api/v1/orgs", &json!({ "id": id, "agent_limit": 5 })).await;
        assert_eq!(code, 201, "{body}");
        let (code, body) = send_json(&api, "PUT", &format!("/api/v1/orgs/{id}/secrets/{id}-db-password"), &json!({ "value": format!("{id}-value") })).await;
        assert_eq!(code, 201, "{body}");
    }
    let (code, token) = api.post(&format!("/api/v1/orgs/{org}/enrollment-tokens"), &json!({ "uses": 1, "ttl": "1h" })).await;
    assert_eq!(code, 201, "{token}");
    let state = dir.path().join("agent");
    let agent_id = enroll(token["token"].as_str().unwrap(), &state).await.unwrap();
    let log = dir.path().join("gamma.log");
    std::fs::write(&log, (0..LINES).map(|n| format!("{marker} job {n} done\n")).collect::<String>()).unwrap();
    let config = agent_config_file(dir.path(), &state, &[&log], "[host]\ninterval_secs = 1\n[docker]\nenabled = false");
    let mut agent = AgentProcess::start_with_config(&config, &state);
    wait_for(Duration::from_secs(30), "the org's log lines", || async {
        let records = api.all_records(&format!("/api/v1/orgs/{org}/logs"), "").await;
        (records.iter().filter(|r| r["line"].as_str().is_some_and(|l| l.starts_with(marker))).count() == LINES).then_some(())
    })
    .await;
    let webhook_url = format!("http://127.0.0.1:{}/hooks/{org}", free_tcp_addr().port());
    let (code, webhook) = api.post(&format!("/api/v1/orgs/{org}/webhooks"), &json!({ "url": webhook_url, "events": ["*"] })).await;
    assert_eq!(code, 201, "{webhook}");
    let (code, body) = send_json(&api, "PUT", &format!("/api/v1/orgs/{org}/settings"), &json!({ "exec_enabled": true })).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) =
        send_json(&api, "PUT", &format!("/api/v1/orgs/{org}/branding"), &json!({ "product_name": "Gamma Ops Portal", "accent": "#123456" })).await;
    assert_eq!(code, 200, "{body}");
    let identifiers = [org.to_string(), agent_id.clone(), format!("{org}-db-password"), webhook_url.clone(), "Gamma Ops Portal".to_string()];

    // Confirm; the erasure starts, removes the org record and pauses. Then SIGKILL.
    let (code, requested) = api.post(&format!("/api/v1/orgs/{org}/deletion"), &json!({})).await;
    assert_eq!(code, 201, "{requested}");
    let confirm = requested["confirm"].as_str().unwrap().to_string();
    let deleting = {
        let api = api.clone();
        tokio::spawn(async move { api.send("DELETE", &format!("/api/v1/orgs/{org}?confirm={confirm}"), None, vec![]).await })
    };
    wait_for(Duration::from_secs(30), "the org record removed by the paused erasure", || async {
        (api.get(&format!("/api/v1/orgs/{org}")).await.0 == 404).then_some(())
    })
    .await;
    assert!(!deleting.is_finished(), "the deletion is still under way when the hub is killed");
    hub.kill9().await;
    deleting.abort();
    let _ = tokio::time::timeout(Duration::from_secs(30), agent.child.wait()).await;

    // On disk now: the intent, and most of the org's data.
    {
        let store = gantry_hub::store::Store::open(&data).unwrap();
        let pending = store.unfinished_org_deletions().unwrap();
        assert_eq!(pending.iter().map(|t| t.org.as_str()).collect::<Vec<_>>(), [org], "the deletion intent survived the kill");
        assert!(store.org(org).unwrap().is_none(), "the first step was durable");
        assert!(store.agent(&agent_id).unwrap().is_some(), "the kill landed before the agent was erased");
        assert!(!unkept_trees_containing(&store, &format!("{org}-db-password")).is_empty(), "the secret is still stored");
    }
    assert!(!files_containing(&data, marker).is_empty(), "the log text is still stored");

    // Restart without the hook: the deletion is finished before the hub answers.
    let hub = HubProcess::start(&data, http, quic).await;
    let api = hub.api(&data);
    for path in [
        format!("/api/v1/orgs/{org}"),
        format!("/api/v1/agents/{agent_id}"),
        format!("/api/v1/orgs/{org}/secrets"),
        format!("/api/v1/orgs/{org}/webhooks"),
        format!("/api/v1/orgs/{org}/settings"),
        format!("/api/v1/orgs/{org}/branding"),
        format!("/api/v1/orgs/{org}/logs"),
    ] {
        let (code, body) = api.get(&path).await;
        assert_eq!(code, 404, "{path}: {body}");
    }
    assert_eq!(count(&api, &format!("/api/v1/orgs/{other}/secrets"), "secrets").await, 1, "the other org keeps its secret");
    let (code, body) = api.post("/api/v1/orgs", &json!({ "id": org, "agent_limit": 5 })).await;
    assert_eq!(code, 409, "the id stays reserved: {body}");
    let mut hub = hub;
    hub.terminate().await;

    let store = gantry_hub::store::Store::open(&data).unwrap();
    assert!(store.unfinished_org_deletions().unwrap().is_empty());
    let tombstone = store.org_tombstone(org).unwrap().expect("tombstone");
    assert!(tombstone.finished_at_ms.is_some(), "{tombstone:?}");
    assert!(tombstone.deleted_by.starts_with("key:"), "the confirming operator is named: {tombstone:?}");
    for needle in &identifiers {
        let left = unkept_trees_containing(&store, needle);
        assert!(left.is_empty(), "{needle} of the deleted org is still in {left:?}");
    }
    assert!(!unkept_trees_containing(&store, &format!("{other}-db-password")).is_empty(), "the other org's secret");
    let audit = store.audit_entries(&gantry_hub::store::AuditFilter { org: Some(org.to_string()), ..Default::default() }, 1000).unwrap().entries;
    assert!(audit.iter().any(|e| e.action == "org.deletion.resumed" && e.outcome == "finished"), "the resumed deletion is audited");
    assert!(matches!(store.verify_audit().unwrap(), gantry_hub::store::AuditVerdict::Intact { .. }));
    drop(store);
    assert!(files_containing(&data, marker).is_empty(), "the log text is gone");
}

/// An export with `from` and `to` holds exactly the log records stamped in [from, to):
/// records sent by a simulated agent one second apart, the bounds falling on records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_holds_only_the_telemetry_inside_its_time_range() {
    let dir = TempDir::new("org-export-range");
    let hub = TestHub::start(&dir.path().join("hub"), fast).await;
    let api = hub.api();
    hub.create_org("range-corp", 5).await;
    let agent = SimulatedAgent::start(&hub, "range-corp", &dir.path().join("agent")).await;
    let base = gantry_hub::wall_ms() - 600_000;
    let sent: Vec<(i64, String)> = (0..10).map(|n| (base + n * 1_000, format!("RANGE-LINE-{n}"))).collect();
    agent.send_logs(&sent).await;
    let stored = api.all_records(&format!("/api/v1/agents/{}/logs", agent.id), "").await;
    assert_eq!(stored.len(), sent.len(), "{stored:?}");

    let (from, to) = (base + 3_000, base + 7_000);
    let (code, archive) = export(&api, "range-corp", &format!("?from={from}&to={to}")).await;
    assert_eq!(code, 200);
    let files = untar(&archive);
    let got: Vec<String> = lines(&files, "range-corp", "logs.jsonl").iter().map(|r| r["line"].as_str().unwrap().to_string()).collect();
    assert_eq!(got, ["RANGE-LINE-3", "RANGE-LINE-4", "RANGE-LINE-5", "RANGE-LINE-6"], "records from {from} (included) to {to} (excluded)");
    for outside in [0, 1, 2, 7, 8, 9] {
        assert!(!contains(&archive, &format!("RANGE-LINE-{outside}\"")), "record {outside} is outside the range but in the export");
    }
    // Without bounds, every record is there.
    let (code, archive) = export(&api, "range-corp", "").await;
    assert_eq!(code, 200);
    assert_eq!(lines(&untar(&archive), "range-corp", "logs.jsonl").len(), sent.len());
    hub.stop().await;
}
