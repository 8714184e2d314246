//! The web dashboard end to end in real headless Chromium (Debian's chromium, driven over
//! WebDriver by `gantry_tests::browser`) against a real hub with real agents and, for
//! deployments, the real Docker engine (images built locally from busybox).
//!
//! What a user sees is asserted: text on the page, what changes live without a reload,
//! which buttons are there. Screenshots of the main pages are saved under
//! `target/screenshots/`. Under `CI=true` a missing chromium, chromedriver or Docker fails
//! the test with a message saying what to install.

#![allow(clippy::unwrap_used)]

use gantry_agent::collector::docker::testing::{docker, IMAGE};
use gantry_tests::browser::{self, Browser};
use gantry_tests::deploys::{containers_of, ContainerGuard};
use gantry_tests::*;
use serde_json::{json, Value};
use std::time::Duration;

const LIVE: Duration = Duration::from_secs(60);

/// Sign in through the login form; lands on the overview.
async fn sign_in(browser: &Browser, hub: &TestHub, email: &str, password: &str) {
    browser.goto(&format!("http://{}/login", hub.http)).await;
    browser.fill("#email", email).await;
    browser.fill("#password", password).await;
    browser.click_on("form.login button[type=submit]").await;
    browser.wait_for(Duration::from_secs(20), "the page after signing in", || async { (!browser.url().await.ends_with("/login")).then_some(()) }).await;
}

/// An account that is a member of `org` with `role`; its password.
async fn member(hub: &TestHub, email: &str, org: &str, role: &str) -> String {
    let password = format!("password of {email}");
    let (status, user) = hub.api().post("/api/v1/users", &json!({ "email": email, "password": password })).await;
    assert_eq!(status, 201, "create user: {user}");
    let id = user["id"].as_str().unwrap();
    let (status, _, body) = hub
        .api()
        .send("PUT", &format!("/api/v1/orgs/{org}/members/{id}"), Some("application/json"), serde_json::to_vec(&json!({ "role": role })).unwrap())
        .await;
    assert_eq!(status, 200, "add member: {body}");
    password
}

/// A deployment of `org` on an enrolled (not running) agent, with two revisions.
async fn deployment_on_paper(hub: &TestHub, dir: &std::path::Path, org: &str) -> String {
    let token = hub.token(org, 1, "10m").await;
    let agent = enroll(&token, &dir.join(format!("agent-{org}"))).await.unwrap();
    let spec = |cmd: &str| json!({ "name": "web", "services": [{ "name": "app", "image": IMAGE, "command": ["sh", "-c", cmd] }] });
    let (status, created) =
        hub.api().post(&format!("/api/v1/orgs/{org}/deployments"), &json!({ "spec": spec("sleep 600"), "targets": { "agents": [agent] } })).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let body = serde_json::to_vec(&json!({ "spec": spec("sleep 601"), "targets": { "agents": [agent] } })).unwrap();
    let (status, _, text) = hub.api().send("PUT", &format!("/api/v1/deployments/{id}"), Some("application/json"), body).await;
    assert_eq!(status, 200, "{text}");
    id
}

/// POST a form from inside the page (same origin, with the session cookie), as a user
/// could from the browser's console; the answer's status.
async fn post_from_page(browser: &Browser, path: &str, fields: Value) -> u16 {
    let status = browser
        .execute(
            "return fetch(arguments[0], { method: 'POST', body: new URLSearchParams(arguments[1]), redirect: 'manual' }).then(r => r.status)",
            json!([path, fields]),
        )
        .await;
    status.as_u64().unwrap() as u16
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_no_admin_actions_and_a_customer_sees_no_other_org() {
    if !browser::available() {
        return;
    }
    let dir = TempDir::new("dash-roles");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    hub.create_org("beta", 5).await;
    let acme_dep = deployment_on_paper(&hub, dir.path(), "acme").await;
    let beta_dep = deployment_on_paper(&hub, dir.path(), "beta").await;
    let viewer_password = member(&hub, "viewer@acme.example", "acme", "viewer").await;
    let deployer_password = member(&hub, "dev@acme.example", "acme", "deployer").await;
    let base = format!("http://{}", hub.http);

    // A Viewer sees the deployments but no form and no rollback button.
    let viewer = Browser::start().await;
    sign_in(&viewer, &hub, "viewer@acme.example", &viewer_password).await;
    viewer.goto(&format!("{base}/deployments?org=acme")).await;
    viewer.wait_text("main", "web", Duration::from_secs(10)).await;
    assert!(viewer.find("#new-deployment").await.is_none(), "a viewer gets no create form");
    viewer.goto(&format!("{base}/deployments/{acme_dep}")).await;
    let page = viewer.wait_text("main", "Revision 1", Duration::from_secs(10)).await;
    assert!(page.contains("Revision 2"), "{page}");
    assert!(!page.contains("Roll back"), "a viewer gets no rollback button: {page}");
    viewer.screenshot("deployment-as-viewer").await;
    // Posting the form anyway is refused and changes nothing.
    assert_eq!(post_from_page(&viewer, &format!("/deployments/{acme_dep}/rollback"), json!({ "revision": "1" })).await, 403);
    assert_eq!(post_from_page(&viewer, "/orgs/acme/deployments", json!({ "name": "x", "image": IMAGE, "targets": "env=prod" })).await, 403);
    let (_, now) = hub.api().get(&format!("/api/v1/deployments/{acme_dep}")).await;
    assert_eq!(now["revision"], 2, "the refused rollback wrote nothing");
    let (_, list) = hub.api().get("/api/v1/orgs/acme/deployments").await;
    assert_eq!(list["deployments"].as_array().unwrap().len(), 1, "the refused create wrote nothing");
    // Alerts: no acknowledge or silence for a viewer; users: members, but no API keys.
    viewer.goto(&format!("{base}/alerts?org=acme")).await;
    viewer.wait_text("main", "Alerts of acme", Duration::from_secs(10)).await;
    assert!(viewer.find("#new-silence").await.is_none(), "a viewer cannot silence");
    viewer.goto(&format!("{base}/users?org=acme")).await;
    let users = viewer.wait_text("main", "viewer@acme.example", Duration::from_secs(10)).await;
    assert!(users.contains("dev@acme.example") && users.contains("Only admins"), "{users}");
    // Operator pages are not theirs.
    viewer.goto(&format!("{base}/orgs")).await;
    viewer.wait_text("main", "only platform operators may do this", Duration::from_secs(10)).await;
    assert!(viewer.find("#new-org").await.is_none());
    // Their own account is theirs: a password change through the form, keyboard-labelled
    // fields and a flash; the old password stops working, the new one works.
    viewer.goto(&format!("{base}/account")).await;
    viewer.wait_text("main", "acme", Duration::from_secs(10)).await;
    let new_password = "quiet meadow lantern 58 zephyr";
    viewer.fill("#pw-current", &viewer_password).await;
    viewer.fill("#pw-new", new_password).await;
    viewer.fill("#pw-confirm", new_password).await;
    viewer.click_on("#password button[type=submit]").await;
    viewer.wait_text(".flash", "Password changed", Duration::from_secs(20)).await;
    viewer.screenshot("account").await;
    let login = |password: &str| json!({ "email": "viewer@acme.example", "password": password });
    assert_eq!(hub.api().anonymous().login(&login(&viewer_password)).await.0, 401, "the old password no longer logs in");
    assert_eq!(hub.api().anonymous().login(&login(new_password)).await.0, 200, "the new one does");
    viewer.quit().await;

    // A deployer of acme can roll back, and cannot see beta at all: 404 pages.
    let customer = Browser::start().await;
    sign_in(&customer, &hub, "dev@acme.example", &deployer_password).await;
    customer.goto(&format!("{base}/deployments/{acme_dep}")).await;
    assert!(customer.wait_text("main", "Roll back to revision 1", Duration::from_secs(10)).await.contains("Revision 2"));
    for path in [format!("/deployments/{beta_dep}"), "/deployments?org=beta".to_string(), "/usage?org=beta".to_string(), "/audit?org=beta".to_string()] {
        customer.goto(&format!("{base}{path}")).await;
        let text = customer.wait_text("main", "Not found", Duration::from_secs(10)).await;
        assert!(text.contains("not found") && !text.contains("sleep 60"), "{path}: {text}");
        assert_eq!(customer.title().await, "Not found · Gantry", "{path}");
    }
    customer.screenshot("other-org-not-found").await;
    assert_eq!(post_from_page(&customer, &format!("/deployments/{beta_dep}/rollback"), json!({ "revision": "1" })).await, 404);
    let (_, beta) = hub.api().get(&format!("/api/v1/deployments/{beta_dep}")).await;
    assert_eq!(beta["revision"], 2, "nothing changed in beta");

    // A deployer silences alerts; a bad duration is refused with the API's message.
    customer.goto(&format!("{base}/alerts?org=acme")).await;
    customer.fill("#s-duration", "soon").await;
    customer.click_on("#new-silence button[type=submit]").await;
    customer.wait_text(".error-box", "soon", Duration::from_secs(10)).await;
    let (_, silences) = hub.api().get("/api/v1/orgs/acme/silences").await;
    assert_eq!(silences["silences"].as_array().map(Vec::len), Some(0), "{silences}");
    customer.select("#s-rule", "agent_offline").await;
    customer.fill("#s-duration", "2h").await;
    customer.fill("#s-reason", "maintenance").await;
    customer.click_on("#new-silence button[type=submit]").await;
    customer.wait_text(".flash", "Silence created", Duration::from_secs(10)).await;
    let (_, silences) = hub.api().get("/api/v1/orgs/acme/silences").await;
    assert_eq!(silences["silences"].as_array().map(Vec::len), Some(1), "{silences}");
    customer.screenshot("alerts").await;

    // The deployer's own rollback goes through the page, is audited, and shows revision 3.
    customer.goto(&format!("{base}/deployments/{acme_dep}")).await;
    customer.click_on("#revision-1 form button").await;
    customer.wait_text("main", "Revision 3", Duration::from_secs(10)).await;
    assert!(customer.text(".flash").await.unwrap_or_default().contains("Rollback started"));
    let (_, audit) = hub.api().get("/api/v1/orgs/acme/audit?actor=dev@acme.example").await;
    let actions: Vec<&str> = audit["entries"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    assert!(actions.contains(&"POST /deployments/{id}/rollback"), "{audit}");
    customer.quit().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_enrolls_an_agent_deploys_tails_logs_and_exports_usage() {
    if !browser::available() || docker().await.is_none() {
        return;
    }
    let dir = TempDir::new("dash-e2e");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    let base = format!("http://{}", hub.http);
    let browser = Browser::start().await;

    // Log in; the overview is the first page.
    sign_in(&browser, &hub, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_eq!(browser.url().await, format!("{base}/"));
    browser.screenshot("overview").await;

    // Create an enrollment token in the form and read the install command off the page.
    browser.goto(&format!("{base}/enrollment?org=acme")).await;
    browser.select("#org", "acme").await;
    browser.fill("#labels", "env=e2e").await;
    browser.click_on("form[action='/enrollment'] button[type=submit]").await;
    let command = browser.wait_text("#install-command", "--token ", Duration::from_secs(10)).await;
    browser.screenshot("enrollment").await;
    let token = command.rsplit("--token ").next().unwrap().trim().to_string();

    // A real agent enrolls with it: listed offline until it runs, then online.
    let state = dir.path().join("agent");
    let agent = enroll(&token, &state).await.unwrap();
    let status_cell = format!("main tr:has(a[title='{agent}']) .status");
    browser.goto(&format!("{base}/agents?org=acme")).await;
    assert_eq!(browser.text(&status_cell).await.as_deref(), Some("offline"));
    let log = dir.path().join("app.log");
    std::fs::write(&log, "").unwrap();
    let config = agent_config_file(dir.path(), &state, &[&log], "[docker]\ninterval_secs = 1");
    let _agent_process = AgentProcess::start_with_config(&config, &state);
    // The list follows the fleet live: the row turns online without reloading the page.
    browser.wait_text("#agents-live", "Live", LIVE).await;
    browser
        .wait_for(LIVE, "the agent online in the agents list, live", || async { (browser.text(&status_cell).await.as_deref() == Some("online")).then_some(()) })
        .await;
    assert!(browser.text(&format!("main tr:has(a[title='{agent}'])")).await.unwrap().contains(" ms"), "the round trip filled in live");
    assert!(browser.text("main table").await.unwrap().contains("env=e2e"), "the token's labels are on the agent");
    browser.screenshot("agents").await;

    // Deploy from a pasted spec and watch the progress turn healthy without reloading.
    browser.goto(&format!("{base}/deployments?org=acme")).await;
    browser.fill("#d-targets", &agent).await;
    browser.click_on("#new-deployment summary").await;
    let spec = json!({
        "name": "web",
        "services": [{ "name": "app", "image": IMAGE, "command": ["sh", "-c", "echo started; sleep 600"], "stop_grace_secs": 1 }],
        "health_gate": { "min_healthy_secs": 1, "deadline_secs": 30 }
    });
    browser.fill("#d-spec", &spec.to_string()).await;
    browser.click_on("#new-deployment button[type=submit]").await;
    browser.wait_for(Duration::from_secs(10), "the deployment page", || async { browser.url().await.contains("/deployments/dep_").then_some(()) }).await;
    let url = browser.url().await;
    let deployment = url.rsplit('/').next().unwrap().split('?').next().unwrap().to_string();
    let _guard = ContainerGuard(deployment.clone());
    browser.wait_text(".flash", "Deployment created", Duration::from_secs(5)).await;
    let row = format!("#progress tr[data-agent='{agent}'] .state");
    browser.wait_text(&row, "healthy", Duration::from_secs(90)).await;
    browser.wait_text("#progress-summary", "1 of 1 agents healthy on revision 1", Duration::from_secs(10)).await;
    assert_eq!(browser.url().await, url, "the page updated in place");
    browser.screenshot("deployment").await;
    assert_eq!(containers_of(&deployment).len(), 1, "one container runs");

    // Live logs: a line written now appears in the agent page's tail.
    browser.goto(&format!("{base}/agents/{agent}")).await;
    browser.wait_text("#log-state", "Live", Duration::from_secs(20)).await;
    let marker = format!("dashboard-marker-{:08x}", rand::random::<u32>());
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(file, "{marker}").unwrap();
    }
    browser.wait_text("#log-lines", &marker, LIVE).await;
    browser.screenshot("agent-detail").await;

    // Usage: a ledger entry for acme (and one for another org) is charted, and the export
    // link downloads CSV of acme's alone.
    hub.create_org("other", 1).await;
    for (org, quantity) in [("acme", 42), ("other", 7)] {
        let (status, body) =
            hub.api().post("/api/v1/billing/corrections", &json!({ "org": org, "meter": "events", "quantity": quantity, "reason": "dashboard test" })).await;
        assert_eq!(status, 201, "{body}");
    }
    browser.goto(&format!("{base}/usage?org=acme")).await;
    let meter = browser.wait_text("#meter-events", "Total: 42", Duration::from_secs(10)).await;
    assert!(browser.find("#meter-events svg.chart rect").await.is_some(), "a bar for the day: {meter}");
    let href = browser.attribute("#export-csv", "href").await.expect("an export link");
    let cookie = browser.cookie("gantry_session").await.expect("the session cookie");
    let path = href.strip_prefix(&base).unwrap_or(&href).to_string();
    let (status, headers, csv) = hub.api().with_cookie(&cookie).send("GET", &path, None, Vec::new()).await;
    assert_eq!(status, 200, "{csv}");
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/csv"), "{headers:?}");
    assert_eq!(csv.lines().next(), Some(gantry_hub::api::billing_usage::CSV_HEADER));
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert!(!rows.is_empty() && rows.iter().all(|l| l.contains(",acme,")), "acme's usage only: {csv}");
    assert!(rows.iter().any(|l| l.contains(",events,") && l.contains(",42,")), "{csv}");
    browser.screenshot("usage").await;

    // Orgs: an operator creates one in the form; a bad id is refused and nothing is created.
    browser.goto(&format!("{base}/orgs")).await;
    browser.fill("#o-id", "Not An Id").await;
    browser.click_on("#new-org button[type=submit]").await;
    browser.wait_text(".error-box", "must be 2-40 characters", Duration::from_secs(10)).await;
    assert_eq!(browser.attribute("#o-id", "value").await.as_deref(), Some("Not An Id"), "what was typed is kept");
    browser.fill("#o-id", "beta").await;
    browser.fill("#o-name", "Beta Ltd").await;
    browser.click_on("#new-org button[type=submit]").await;
    browser.wait_text(".flash", "Org created", Duration::from_secs(10)).await;
    assert!(browser.text("main table").await.unwrap().contains("Beta Ltd"));
    let (_, orgs) = hub.api().get("/api/v1/orgs").await;
    assert_eq!(orgs["orgs"].as_array().unwrap().len(), 3, "acme, other and beta only: {orgs}");
    browser.screenshot("orgs").await;

    // The audit log shows what was done through the pages, filtered by actor.
    browser.goto(&format!("{base}/audit?org=acme&actor={ADMIN_EMAIL}")).await;
    let audit = browser.wait_text("main table", "POST /orgs/{org}/deployments", Duration::from_secs(10)).await;
    assert!(audit.contains(ADMIN_EMAIL), "{audit}");
    browser.screenshot("audit").await;

    // Delete the deployment: its container goes away.
    let (status, _, body) = hub.api().send("DELETE", &format!("/api/v1/deployments/{deployment}"), None, Vec::new()).await;
    assert_eq!(status, 200, "{body}");
    wait_for(LIVE, "the deployment's container removed", || async { containers_of(&deployment).is_empty().then_some(()) }).await;
    browser.quit().await;
    hub.stop().await;
}
