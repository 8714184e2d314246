//! The programs as a new user runs them: `gantry-hub init` (twice), `quickstart` (prints a
//! working URL and login, enrolls a local agent, stops cleanly on Ctrl-C, resumes on the
//! next run) and `token create`.

#![allow(clippy::unwrap_used)]

use gantry_tests::*;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

async fn hub_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(hub_binary());
    command.args(args).env("GANTRY_LOG", "error").stdin(std::process::Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), command.output()).await.expect("hub command timed out").unwrap();
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_twice_changes_nothing_the_second_time() {
    let dir = TempDir::new("init");
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let (code, stdout, stderr) = hub_cli(&["init", "--data", data_arg, "--public-addr", "hub.example.com:7443"], &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("admin login: admin@gantry.local"), "{stdout}");
    assert!(stdout.contains("admin password (shown once): "), "{stdout}");
    let key_before = std::fs::read(data.join("operator.key")).unwrap();
    let ca_before = std::fs::read(data.join("pki/ca.crt")).unwrap();
    let (code, stdout, _) = hub_cli(&["init", "--data", data_arg, "--public-addr", "other:1"], &[]).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("already initialised") && stdout.contains("nothing changed"), "{stdout}");
    assert_eq!(std::fs::read(data.join("operator.key")).unwrap(), key_before);
    assert_eq!(std::fs::read(data.join("pki/ca.crt")).unwrap(), ca_before);

    // Bad input: a weak admin password or an address without a port is refused, nothing made.
    let fresh = dir.path().join("fresh");
    let (code, _, stderr) = hub_cli(&["init", "--data", fresh.to_str().unwrap(), "--public-addr", "noport"], &[]).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("HOST:PORT"), "{stderr}");
    let (code, _, stderr) = hub_cli(&["init", "--data", fresh.to_str().unwrap(), "--public-addr", "h:1"], &[("GANTRY_ADMIN_PASSWORD", "short")]).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("at least 12 characters"), "{stderr}");
    assert!(!fresh.join("pki").exists() && !fresh.join("store").exists());
}

struct Quickstart {
    child: tokio::process::Child,
    url: String,
    password: String,
    token: String,
}

async fn start_quickstart(data: &str) -> Quickstart {
    let mut child = tokio::process::Command::new(hub_binary())
        .args(["quickstart", "--data", data, "--http", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
        .env("GANTRY_LOG", "warn")
        .env_remove("GANTRY_ADMIN_PASSWORD")
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut url, mut password, mut token) = (String::new(), String::new(), String::new());
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let line = line.trim().to_string();
            if let Some(rest) = line.strip_prefix("dashboard:") {
                url = rest.trim().trim_end_matches('/').to_string();
            } else if let Some(rest) = line.strip_prefix("password:") {
                password = rest.trim().to_string();
            } else if let Some(rest) = line.strip_prefix("gantry-agent enroll --token ") {
                token = rest.split_whitespace().next().unwrap().to_string();
            } else if line.starts_with("Press Ctrl-C") {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.expect("quickstart did not print its summary");
    // Keep draining stdout so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Quickstart { child, url, password, token }
}

async fn interrupt(child: &mut tokio::process::Child) -> i32 {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("quickstart did not stop on Ctrl-C").unwrap();
    exit.code().unwrap_or(-1)
}

async fn login(url: &str, password: &str) -> Api {
    let api = Api { base: url.to_string(), bearer: None, cookie: None };
    let body = serde_json::json!({ "email": "admin@gantry.local", "password": password });
    let (status, headers, text) = api.send("POST", "/api/v1/auth/login", Some("application/json"), body.to_string().into_bytes()).await;
    assert_eq!(status, 200, "login with the printed password: {text}");
    let cookie = headers["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    Api { cookie: Some(cookie), ..api }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_runs_gantry_with_a_local_agent_and_stops_cleanly() {
    let dir = TempDir::new("quickstart");
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap().to_string();
    let mut qs = start_quickstart(&data_arg).await;
    assert!(qs.url.starts_with("http://127.0.0.1:"), "{}", qs.url);
    assert!(qs.password.len() >= 12, "printed password: {:?}", qs.password);
    assert!(qs.token.starts_with("gt1_"));

    let api = login(&qs.url, &qs.password).await;
    let agents = wait_for(Duration::from_secs(20), "local agent online", || async {
        let (_, body) = api.get("/api/v1/orgs/default/agents").await;
        let agents = body["agents"].as_array().cloned().unwrap_or_default();
        (agents.len() == 1 && agents[0]["status"] == "online").then_some(agents)
    })
    .await;
    let local_id = agents[0]["id"].as_str().unwrap().to_string();
    // The dashboard's agents page lists the local agent as online.
    let (status, _, page) = api.send("GET", "/agents", None, vec![]).await;
    assert_eq!(status, 200);
    assert!(page.contains(&local_id) && page.contains("<span class=\"status status-online\">online</span>"), "{page}");

    // Quickstart serves the install script and its own build of the agent, with a checksum
    // that matches the `gantry-agent` program next to the hub's.
    let anonymous = api.anonymous();
    let (status, _, script) = anonymous.send("GET", "/install.sh", None, vec![]).await;
    assert_eq!(status, 200);
    assert!(script.starts_with("#!/bin/sh"), "{script}");
    let version = env!("CARGO_PKG_VERSION");
    let (status, _, sums) = anonymous.send("GET", &format!("/downloads/{version}/SHA256SUMS"), None, vec![]).await;
    assert_eq!(status, 200, "{sums}");
    let beside_hub = hub_binary().with_file_name("gantry-agent");
    assert!(beside_hub.is_file(), "{} is built with the workspace", beside_hub.display());
    let own = std::process::Command::new("sha256sum").arg(&beside_hub).output().unwrap();
    let own_sum = String::from_utf8_lossy(&own.stdout).split_whitespace().next().unwrap().to_string();
    let file = format!("gantry-agent-{}-{}", std::env::consts::OS, std::env::consts::ARCH);
    assert_eq!(sums, format!("{own_sum}  {file}\n"));

    // The printed command enrolls another machine.
    let other = dir.path().join("other-agent");
    let (code, _, stderr) = agent_cli(&["enroll", "--token", &qs.token, "--state-dir", other.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{stderr}");

    // `token create` talks to the running hub with the operator key from the data dir.
    let (code, stdout, stderr) = {
        let output = tokio::process::Command::new(hub_binary())
            .args(["token", "create", "--org", "default", "--ttl", "15m", "--uses", "2", "--label", "env=test", "--url", &qs.url, "--data", &data_arg])
            .env("GANTRY_LOG", "error")
            .env_remove("GANTRY_API_KEY")
            .output()
            .await
            .unwrap();
        (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("2 use(s)") && stdout.contains("gantry-agent enroll --token gt1_"), "{stdout}");

    assert_eq!(interrupt(&mut qs.child).await, 0, "Ctrl-C stops everything cleanly");

    // The next run resumes: same data, same login, the local agent comes back.
    let mut again = start_quickstart(&data_arg).await;
    assert_eq!(again.password, qs.password);
    let api = login(&again.url, &again.password).await;
    wait_for(Duration::from_secs(20), "local agent online again", || async {
        let (_, body) = api.get(&format!("/api/v1/agents/{local_id}")).await;
        (body["status"] == "online").then_some(())
    })
    .await;
    assert_eq!(interrupt(&mut again.child).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_apply_status_and_rollback_from_the_command_line() {
    let dir = TempDir::new("deploy-cli");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    let url = format!("http://{}", hub.http);
    let file = dir.path().join("web.yaml");
    let write = |image: &str| {
        std::fs::write(
            &file,
            format!("spec:\n  name: web\n  services:\n    - name: app\n      image: {image}\n      ports:\n        - host: 8080\n          container: 80\ntargets:\n  selector:\n    role: web\n"),
        )
        .unwrap();
    };
    let env = [("GANTRY_API_KEY", hub.operator_key.as_str()), ("GANTRY_URL", url.as_str())];
    write("web:1");
    let (code, stdout, stderr) = hub_cli(&["deploy", "apply", "-f", file.to_str().unwrap(), "--org", "acme"], &env).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("(web) revision 1"), "{stdout}");
    let id = stdout.split_whitespace().nth(1).unwrap().to_string();
    write("web:2");
    let (code, stdout, _) = hub_cli(&["deploy", "apply", "-f", file.to_str().unwrap(), "--org", "acme"], &env).await;
    assert_eq!(code, 0);
    assert!(stdout.contains(&format!("deployment {id} (web) revision 2")), "the same deployment gets a new revision: {stdout}");
    let (code, stdout, _) = hub_cli(&["deploy", "rollback", &id], &env).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("revision 3"), "{stdout}");
    let (_, revisions) = hub.api().get(&format!("/api/v1/deployments/{id}/revisions")).await;
    assert_eq!(revisions["revisions"][2]["change"], "rollback to 1", "the previous revision by default");
    let (code, stdout, _) = hub_cli(&["deploy", "status", &id], &env).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("revision 3") && stdout.contains("no agent matches yet"), "{stdout}");
    // A bad file is refused with the API's precise message, and nothing changes.
    std::fs::write(&file, "spec:\n  name: web\n  services: []\ntargets:\n  selector:\n    role: web\n").unwrap();
    let (code, _, stderr) = hub_cli(&["deploy", "apply", "-f", file.to_str().unwrap(), "--org", "acme"], &env).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("services must hold at least one service"), "{stderr}");
    hub.stop().await;
}
