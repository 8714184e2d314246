//! Backups end to end: `gantry-hub backup` (the real CLI) takes a backup of a hub that is
//! serving and ingesting a real agent's logs over QUIC; `gantry-hub restore` puts it into a
//! new directory; the restored hub serves every record that was acknowledged before the
//! backup started, and the agent, with its existing certificate, comes online on it. While
//! the backup runs, API clients keep creating orgs, secrets and deployments and adding
//! revisions: every one acknowledged before it started is restored, and what was written
//! during it is restored whole or not at all (no deployment without its revisions).
//! Restores refuse a non-empty directory, a wrong passphrase and a damaged file with a clear
//! message and write nothing; scheduled backups keep the newest N and a failing one raises
//! the `backup_failed` alert and shows in `/metrics`.

#![allow(clippy::unwrap_used)]

use gantry_tests::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PASSPHRASE: &str = "backup passphrase for tests";

/// Run the hub CLI with `GANTRY_API_KEY` set; exit code, stdout, stderr.
async fn hub_cli(args: &[&str], key: &str) -> (i32, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(hub_binary())
            .args(args)
            .env("GANTRY_API_KEY", key)
            .env("GANTRY_LOG", "error")
            .env_remove("GANTRY_BACKUP_PASSPHRASE")
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("hub command timed out")
    .expect("run hub command");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

fn passphrase_file(dir: &Path, text: &str) -> String {
    let path = dir.join(format!("passphrase-{:08x}", rand::random::<u32>()));
    std::fs::write(&path, format!("{text}\n")).unwrap();
    path.display().to_string()
}

/// File log lines by seq, as the API shows them.
fn lines_by_seq(records: &[Value]) -> BTreeMap<u64, String> {
    records
        .iter()
        .filter(|r| r["kind"] == "log" && r["stream"] == "file")
        .map(|r| (r["seq"].as_u64().unwrap(), r["line"].as_str().unwrap().to_string()))
        .collect()
}

async fn put(api: &Api, path: &str, body: Value) {
    let (status, _, reply) = api.send("PUT", path, Some("application/json"), body.to_string().into_bytes()).await;
    assert!(status == 200 || status == 201, "PUT {path}: {status} {reply}");
}

fn names(value: &Value, list: &str, field: &str) -> Vec<String> {
    let mut out: Vec<String> = value[list].as_array().unwrap().iter().map(|v| v[field].as_str().unwrap().to_string()).collect();
    out.sort();
    out
}

/// One write of the load the backup runs under, and when its reply came.
#[derive(Debug, Clone)]
enum Write {
    Org(String),
    Secret(String),
    /// Deployment id and the revision the reply named.
    Revision(String, u64),
}

/// The spec of revision `revision` of the load's deployment `n` (its command names both,
/// so a restored revision shows which write it came from).
fn load_spec(n: usize, revision: u64) -> Value {
    json!({ "name": format!("load-{n}"), "services": [{ "name": "app", "image": "busybox:1.36", "command": ["echo", format!("load-{n}-rev-{revision}")] }] })
}

/// Create orgs, set secrets, create deployments and add revisions to them (each touching
/// several trees) until `stop`; every acknowledged write with the time of its reply.
async fn write_load(api: Api, stop: Arc<AtomicBool>) -> Vec<(Instant, Write)> {
    let mut acked = Vec::new();
    let mut deployments: Vec<(String, u64)> = Vec::new();
    let mut n = 0usize;
    while !stop.load(Ordering::Acquire) {
        n += 1;
        let org = format!("load-{n}");
        let (status, body) = api.post("/api/v1/orgs", &json!({ "id": org, "agent_limit": 1 })).await;
        assert_eq!(status, 201, "create org {org}: {body}");
        acked.push((Instant::now(), Write::Org(org)));
        let name = format!("load-{n}");
        put(&api, &format!("/api/v1/orgs/acme/secrets/{name}"), json!({ "value": format!("load-value-{n}") })).await;
        acked.push((Instant::now(), Write::Secret(name)));
        let (status, created) =
            api.post("/api/v1/orgs/acme/deployments", &json!({ "spec": load_spec(n, 1), "targets": { "selector": { "role": "nowhere" } } })).await;
        assert_eq!(status, 201, "create deployment: {created}");
        let id = created["id"].as_str().unwrap().to_string();
        acked.push((Instant::now(), Write::Revision(id.clone(), 1)));
        deployments.push((id, n as u64));
        // A new revision of an earlier deployment: the deployment record and its revision
        // record change together.
        let (id, m) = deployments[n % deployments.len()].clone();
        let (_, current) = api.get(&format!("/api/v1/deployments/{id}")).await;
        let next = current["revision"].as_u64().unwrap() + 1;
        let body = json!({ "spec": load_spec(m as usize, next), "targets": { "selector": { "role": "nowhere" } } });
        let (status, _, reply) = api.send("PUT", &format!("/api/v1/deployments/{id}"), Some("application/json"), body.to_string().into_bytes()).await;
        assert_eq!(status, 200, "new revision of {id}: {reply}");
        let reply: Value = serde_json::from_str(&reply).unwrap();
        acked.push((Instant::now(), Write::Revision(id, reply["revision"].as_u64().unwrap())));
    }
    acked
}

/// Check the restored hub against the load: everything acknowledged before `started` is
/// there, and every restored deployment has all its revisions, each as it was written.
async fn check_load(api: &Api, acked: &[(Instant, Write)], started: Instant) {
    let (_, orgs) = api.get("/api/v1/orgs").await;
    let orgs = names(&orgs, "orgs", "id");
    let (_, secrets) = api.get("/api/v1/orgs/acme/secrets").await;
    let secrets = names(&secrets, "secrets", "name");
    for (at, write) in acked.iter().filter(|(at, _)| *at < started) {
        match write {
            Write::Org(id) => assert!(orgs.contains(id), "org {id} acknowledged {:?} before the backup is missing", started - *at),
            Write::Secret(name) => assert!(secrets.contains(name), "secret {name} acknowledged before the backup is missing"),
            Write::Revision(id, revision) => {
                let (status, deployment) = api.get(&format!("/api/v1/deployments/{id}")).await;
                assert_eq!(status, 200, "deployment {id} acknowledged before the backup is missing: {deployment}");
                assert!(deployment["revision"].as_u64().unwrap() >= *revision, "revision {revision} of {id} acknowledged before the backup is missing");
            }
        }
    }
    let written: Vec<&String> = acked.iter().filter_map(|(_, w)| if let Write::Org(id) = w { Some(id) } else { None }).collect();
    for id in orgs.iter().filter(|id| id.starts_with("load-")) {
        assert!(written.contains(&id), "org {id} was never acknowledged");
    }
    let (_, deployments) = api.get("/api/v1/orgs/acme/deployments").await;
    let deployments = deployments["deployments"].as_array().unwrap().clone();
    assert!(!deployments.is_empty());
    for deployment in deployments {
        let id = deployment["id"].as_str().unwrap();
        let n: usize = deployment["name"].as_str().unwrap().strip_prefix("load-").unwrap().parse().unwrap();
        let revision = deployment["revision"].as_u64().unwrap();
        let (_, revisions) = api.get(&format!("/api/v1/deployments/{id}/revisions")).await;
        let revisions = revisions["revisions"].as_array().unwrap();
        let numbers: Vec<u64> = revisions.iter().map(|r| r["revision"].as_u64().unwrap()).collect();
        let mut sorted = numbers.clone();
        sorted.sort();
        assert_eq!(sorted, (1..=revision).collect::<Vec<_>>(), "deployment {id} at revision {revision} has revisions {numbers:?}");
        for r in revisions {
            let number = r["revision"].as_u64().unwrap();
            assert_eq!(r["spec"]["services"][0]["command"][1], format!("load-{n}-rev-{number}"), "revision {number} of {id} is not the one written");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_every_acknowledged_record_and_agents_reconnect() {
    let dir = TempDir::new("backup-load");
    // The write load below goes as fast as the hub answers.
    let hub = TestHub::start(&dir.path().join("hub"), |c| c.rate_limit.enabled = false).await;
    let api = hub.api();
    hub.create_org("acme", 10).await;
    let state = dir.path().join("agent");
    let agent_id = enroll(&hub.token("acme", 1, "10m").await, &state).await.unwrap();
    put(&api, "/api/v1/orgs/acme/secrets/db", json!({ "value": "db-secret-9a" })).await;
    put(&api, "/api/v1/orgs/acme/registries/registry.example.com", json!({ "username": "u", "password": "registry-pass-3c" })).await;
    let log = dir.path().join("app.log");
    let config = agent_config_file(dir.path(), &state, &[&log], "[host]\nenabled = false\n[docker]\nenabled = false");
    let writer = LineWriter::start(&log, Duration::from_millis(1));
    let mut agent = AgentProcess::start_with_config(&config, &state);
    hub.wait_status(&agent_id, "online", Duration::from_secs(20)).await;
    let logs = format!("/api/v1/agents/{agent_id}/logs");
    wait_for(Duration::from_secs(30), "lines streaming in", || async { (lines_by_seq(&api.all_records(&logs, "").await).len() >= 500).then_some(()) }).await;

    // Everything the API shows now was acknowledged to the agent before the backup starts.
    let acknowledged = lines_by_seq(&api.all_records(&logs, "").await);
    let out = dir.path().join("hub.gbk");
    let pass = passphrase_file(dir.path(), PASSPHRASE);
    let url = format!("http://{}", hub.http);
    let stop_load = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(write_load(hub.api(), stop_load.clone()));
    wait_for(Duration::from_secs(30), "the write load under way", || async {
        let (_, deployments) = api.get("/api/v1/orgs/acme/deployments").await;
        (deployments["deployments"].as_array().is_some_and(|d| d.len() >= 3)).then_some(())
    })
    .await;
    let started = Instant::now();
    let (code, stdout, stderr) = hub_cli(&["backup", "--out", out.to_str().unwrap(), "--passphrase-file", &pass, "--url", &url], &hub.operator_key).await;
    let finished = Instant::now();
    stop_load.store(true, Ordering::Release);
    let load = load.await.unwrap();
    assert_eq!(code, 0, "backup failed: {stdout} {stderr}");
    assert!(stdout.contains("backup written to"), "{stdout}");
    let during = load.iter().filter(|(at, _)| *at > started && *at < finished).count();
    assert!(during > 0, "writes were acknowledged while the backup ran");
    let after = lines_by_seq(&api.all_records(&logs, "").await);
    assert!(after.len() > acknowledged.len(), "the agent kept streaming while the backup was taken");
    let original_agents = api.get("/api/v1/orgs/acme/agents").await.1;
    let original_secrets = api.get("/api/v1/orgs/acme/secrets").await.1;
    let original_registries = api.get("/api/v1/orgs/acme/registries").await.1;

    let (_, audit) = api.get("/api/v1/audit?action=POST%20/api/v1/backups").await;
    assert_eq!(audit["entries"].as_array().unwrap().len(), 1, "the backup is audited: {audit}");

    // The original hub goes away; the agent is stopped with it.
    writer.stop();
    agent.kill9().await;
    hub.stop().await;

    let restored_dir = dir.path().join("restored");
    let (code, stdout, stderr) =
        hub_cli(&["restore", "--from", out.to_str().unwrap(), "--data", restored_dir.to_str().unwrap(), "--passphrase-file", &pass], "").await;
    assert_eq!(code, 0, "restore failed: {stdout} {stderr}");
    assert!(stdout.contains("restored") && stdout.contains("gantry-hub serve --data"), "{stdout}");
    let restored = TestHub::start(&restored_dir, |_| {}).await;
    let rapi = restored.api();

    // Every acknowledged record is there, unchanged; nothing is there that never was.
    let got = lines_by_seq(&rapi.all_records(&logs, "").await);
    let missing: Vec<&u64> = acknowledged.keys().filter(|seq| got.get(seq) != acknowledged.get(seq)).collect();
    assert!(missing.is_empty(), "{} acknowledged records missing or changed after restore, first {:?}", missing.len(), &missing[..missing.len().min(5)]);
    for (seq, line) in &got {
        assert_eq!(after.get(seq), Some(line), "record {seq} was never at the original hub");
    }
    assert_eq!(names(&rapi.get("/api/v1/orgs/acme/agents").await.1, "agents", "id"), names(&original_agents, "agents", "id"));
    check_load(&rapi, &load, started).await;
    let restored_secrets = names(&rapi.get("/api/v1/orgs/acme/secrets").await.1, "secrets", "name");
    assert!(restored_secrets.contains(&"db".to_string()), "{restored_secrets:?}");
    for name in &restored_secrets {
        assert!(names(&original_secrets, "secrets", "name").contains(name), "secret {name} was never at the original hub");
    }
    assert_eq!(names(&rapi.get("/api/v1/orgs/acme/registries").await.1, "registries", "server"), names(&original_registries, "registries", "server"));
    // The sealed values open under the restored keys (the secrets key came with the backup).
    let (status, keys) = rapi.get("/api/v1/secrets-key").await;
    assert_eq!(status, 200, "{keys}");
    let sealed = restored_secrets.len() as u64 + 1;
    assert_eq!(keys["values_by_version"]["1"], sealed, "{keys}");
    let (status, rotated) = rapi.post("/api/v1/secrets-key/rotate", &json!({ "reencrypt": true })).await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(
        (rotated["reencrypted"]["resealed"].as_u64(), rotated["reencrypted"]["failed"].as_u64()),
        (Some(sealed), Some(0)),
        "every sealed value opens: {rotated}"
    );
    // The restore is in the restored hub's audit log.
    let (_, audit) = rapi.get("/api/v1/audit?action=backup.restore").await;
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "the restore is audited: {audit}");
    assert_eq!(entries[0]["outcome"], "restored");

    // The agent, with the certificate it had, comes online on the restored hub (same CA).
    let _agent = AgentProcess::start_via(&state, &restored.quic.to_string());
    restored.wait_status(&agent_id, "online", Duration::from_secs(30)).await;
    restored.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_non_empty_directory_a_wrong_passphrase_and_a_damaged_file_and_writes_nothing() {
    let dir = TempDir::new("backup-refusals");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 10).await;
    let api = hub.api();

    // Bad requests are refused before anything is written.
    for (body, expect) in [
        (json!({ "passphrase": "short" }), "at least 12 characters"),
        (json!({ "passphrase": PASSPHRASE, "key_file_base64": "AAAA" }), "exactly one"),
        (json!({}), "exactly one"),
        (json!({ "key_file_base64": "AAAA" }), "at least 32 bytes"),
        (json!({ "passphrase": PASSPHRASE, "extra": 1 }), "unknown field"),
    ] {
        let (status, reply) = api.post("/api/v1/backups", &body).await;
        assert_eq!(status, 400, "{body}: {reply}");
        assert!(reply["error"]["message"].as_str().unwrap().contains(expect), "{body}: {reply}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&hub.data).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("backup-")).collect();
    assert!(leftovers.is_empty(), "no temporary backup left in the data directory");
    // Only platform operators may take one.
    let (_, key) = api.post("/api/v1/orgs/acme/api-keys", &json!({ "name": "org admin", "scopes": ["admin", "read"] })).await;
    let org_key = api.with_bearer(key["key"].as_str().unwrap());
    let (status, reply) = org_key.post("/api/v1/backups", &json!({ "passphrase": PASSPHRASE })).await;
    assert_eq!(status, 403, "{reply}");

    // A key-file backup through the CLI.
    let key_file = dir.path().join("backup.key");
    std::fs::write(&key_file, (0..32).map(|_| rand::random::<u8>()).collect::<Vec<u8>>()).unwrap();
    let out = dir.path().join("keyed.gbk");
    let url = format!("http://{}", hub.http);
    let (code, stdout, stderr) =
        hub_cli(&["backup", "--out", out.to_str().unwrap(), "--key-file", key_file.to_str().unwrap(), "--url", &url], &hub.operator_key).await;
    assert_eq!(code, 0, "{stdout} {stderr}");
    hub.stop().await;

    let restore = |target: &Path, extra: Vec<String>| {
        let mut args = vec!["restore".to_string(), "--from".into(), out.display().to_string(), "--data".into(), target.display().to_string()];
        args.extend(extra);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            hub_cli(&args, "").await
        }
    };
    let key_args = vec!["--key-file".to_string(), key_file.display().to_string()];
    let staging_left = |parent: &Path| std::fs::read_dir(parent).unwrap().flatten().any(|e| e.file_name().to_string_lossy().contains(".restoring-"));

    // A non-empty directory: refused, its contents untouched.
    let busy = dir.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), "mine").unwrap();
    let (code, _, stderr) = restore(&busy, key_args.clone()).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("is not empty"), "{stderr}");
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);
    assert_eq!(std::fs::read_to_string(busy.join("keep.txt")).unwrap(), "mine");

    // A wrong key or passphrase: refused, nothing created.
    let target = dir.path().join("target");
    let wrong_key = dir.path().join("wrong.key");
    std::fs::write(&wrong_key, [7u8; 32]).unwrap();
    let (code, _, stderr) = restore(&target, vec!["--key-file".into(), wrong_key.display().to_string()]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("wrong passphrase or key file") && stderr.contains("nothing was restored"), "{stderr}");
    let (code, _, stderr) = restore(&target, vec!["--passphrase-file".into(), passphrase_file(dir.path(), PASSPHRASE)]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("encrypted with a key file, not a passphrase"), "{stderr}");
    assert!(!target.exists() && !staging_left(dir.path()), "nothing written");

    // One flipped byte anywhere: the checksum says so before anything is decrypted.
    let good = std::fs::read(&out).unwrap();
    let mut damaged = good.clone();
    let at = good.len() / 2;
    damaged[at] ^= 0x01;
    std::fs::write(&out, &damaged).unwrap();
    let (code, _, stderr) = restore(&target, key_args.clone()).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("is damaged") && stderr.contains("checksum does not match"), "{stderr}");
    assert!(!target.exists() && !staging_left(dir.path()), "nothing written");
    // Not a backup at all.
    std::fs::write(&out, b"hello, this is not a backup file at all, not even close to one").unwrap();
    let (code, _, stderr) = restore(&target, key_args.clone()).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("is not a Gantry backup"), "{stderr}");
    assert!(!target.exists());

    // The intact file restores into an existing empty directory, and that hub starts.
    std::fs::write(&out, &good).unwrap();
    std::fs::create_dir_all(&target).unwrap();
    let (code, stdout, stderr) = restore(&target, key_args).await;
    assert_eq!(code, 0, "{stdout} {stderr}");
    let restored = TestHub::start(&target, |_| {}).await;
    let (status, org) = restored.api().get("/api/v1/orgs/acme").await;
    assert_eq!(status, 200, "{org}");
    restored.stop().await;
}

async fn metric(api: &Api, name: &str) -> f64 {
    let (_, _, text) = api.send("GET", "/metrics", None, Vec::new()).await;
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok())).unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_keep_the_newest_n_and_a_failing_one_raises_an_alert() {
    let dir = TempDir::new("backup-scheduled");
    let backups = dir.path().join("backups");
    let pass = passphrase_file(dir.path(), PASSPHRASE);
    let target = backups.clone();
    let hub = TestHub::start(&dir.path().join("hub"), move |c| {
        c.backup.dir = Some(target);
        c.backup.interval_secs = 1;
        c.backup.keep = 2;
        c.backup.passphrase_file = Some(pass.into());
    })
    .await;
    hub.create_org("acme", 10).await;
    let api = hub.api();
    let (_, status) = wait_for(Duration::from_secs(60), "four scheduled backups", || async {
        let (code, body) = api.get("/api/v1/backups").await;
        (body["status"]["successes"].as_u64().unwrap_or(0) >= 4).then_some((code, body))
    })
    .await;
    assert_eq!(status["scheduled"], true);
    // Only the newest two are kept (listed by the API and on disk).
    let (_, listing) = api.get("/api/v1/backups").await;
    let files = gantry_hub::backup::scheduled_files(&backups);
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(listing["backups"].as_array().unwrap().len(), 2, "{listing}");
    assert!(std::fs::read_dir(&backups).unwrap().flatten().all(|e| !e.file_name().to_string_lossy().ends_with(".partial")));
    // A scheduled backup restores.
    let restored = dir.path().join("restored");
    let secret = gantry_hub::backup::BackupSecret::Passphrase(PASSPHRASE.into());
    gantry_hub::backup::restore(files.last().unwrap(), &secret, &restored).unwrap();
    assert!(restored.join("pki").join("ca.key").exists() && restored.join("store").exists());
    assert!(metric(&api, "gantry_backups_total{result=\"ok\"}").await >= 4.0);
    assert_eq!(metric(&api, "gantry_backup_failing").await, 0.0);

    // The backup directory becomes unusable (a file where the directory was): the next
    // scheduled backup fails and raises the alert.
    std::fs::remove_dir_all(&backups).unwrap();
    std::fs::write(&backups, "not a directory").unwrap();
    let alert = wait_for(Duration::from_secs(30), "backup_failed alert", || async {
        let (_, body) = api.get("/api/v1/hub/alerts").await;
        body["alerts"].as_array().unwrap().iter().find(|a| a["rule"] == "backup_failed" && a["status"] == "firing").cloned()
    })
    .await;
    assert_eq!(alert["severity"], "critical", "{alert}");
    assert!(alert["summary"].as_str().unwrap().contains("scheduled backup failed"), "{alert}");
    assert_eq!(metric(&api, "gantry_backup_failing").await, 1.0);
    assert!(metric(&api, "gantry_backups_total{result=\"failed\"}").await >= 1.0);
    let (_, listing) = api.get("/api/v1/backups").await;
    assert_eq!(listing["failing"], true, "{listing}");
    // Tenants do not see hub-wide alerts.
    let (_, key) = api.post("/api/v1/orgs/acme/api-keys", &json!({ "name": "org admin", "scopes": ["admin", "read"] })).await;
    let (status, _) = api.with_bearer(key["key"].as_str().unwrap()).get("/api/v1/hub/alerts").await;
    assert_eq!(status, 403);

    // Fixed: the next backup succeeds and the alert resolves.
    std::fs::remove_file(&backups).unwrap();
    wait_for(Duration::from_secs(30), "backup_failed resolved", || async {
        let (_, body) = api.get("/api/v1/hub/alerts").await;
        body["alerts"].as_array().unwrap().iter().any(|a| a["rule"] == "backup_failed" && a["status"] == "resolved").then_some(())
    })
    .await;
    assert_eq!(metric(&api, "gantry_backup_failing").await, 0.0);
    let (_, audit) = api.get("/api/v1/audit?action=backup.scheduled&limit=500").await;
    let outcomes: Vec<&str> =
        audit["entries"].as_array().unwrap().iter().filter(|e| e["action"] == "backup.scheduled").map(|e| e["outcome"].as_str().unwrap()).collect();
    assert!(outcomes.contains(&"written") && outcomes.iter().any(|o| o.starts_with("error:")), "{outcomes:?}");
    hub.stop().await;
}
