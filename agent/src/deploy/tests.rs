//! End-to-end tests of the deployment executor against a real Docker engine, with the
//! locally built busybox image (nothing is pulled). Each test uses its own deployment id
//! and state directory, and a guard removes every container labelled with that id even
//! when the test fails. Waits are bounded by the specs' health gates, never fixed sleeps.

use super::executor::container_name;
use super::state::Store;
use super::*;
use crate::collector::docker::testing::{docker, unique, IMAGE};
use bollard::models::ContainerSummary;
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions};
use bollard::Docker;
use gantry_shared::deploy::{DeploymentSpec, LABEL_DEPLOYMENT, LABEL_REVISION, LABEL_SERVICE};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::Duration;

use crate::test_dir::TempDir;

/// Removes every container of a deployment when dropped, even when the test fails.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let filter = format!("label={LABEL_DEPLOYMENT}={}", self.0);
        if let Ok(output) = Command::new("docker").args(["ps", "-aq", "--filter", &filter]).output() {
            for container in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", "-v", container]).output();
            }
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Serve `/www` with `body` in `/www/health`.
fn serve(body: &str) -> String {
    format!("mkdir -p /www && echo {body} > /www/health && httpd -f -p 80 -h /www")
}

/// A `web` service on `port` (loopback) with an HTTP check of `/health`.
fn web(port: u16, script: &str) -> Value {
    json!({
        "name": "web", "image": IMAGE, "command": ["sh", "-c", script],
        "ports": [{"host": port, "container": 80, "host_ip": "127.0.0.1"}],
        "health": {"http": {"port": port, "path": "/health"}},
        "stop_grace_secs": 1
    })
}

/// A `web` service running `script`, without ports or health check.
fn plain(script: &str) -> Value {
    json!({"name": "web", "image": IMAGE, "command": ["sh", "-c", script], "stop_grace_secs": 1})
}

fn spec(order: &str, deadline: u64, services: Vec<Value>) -> DeploymentSpec {
    let spec: DeploymentSpec = serde_json::from_value(json!({
        "name": "web", "services": services, "order": order,
        "health_gate": {"min_healthy_secs": 1, "deadline_secs": deadline}
    }))
    .unwrap();
    assert!(spec.validate().is_empty(), "{:?}", spec.validate());
    spec
}

async fn containers(docker: &Docker, id: &str) -> Vec<ContainerSummary> {
    let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_DEPLOYMENT}={id}")])]);
    docker.list_containers(Some(ListContainersOptions { all: true, filters: Some(filters), ..Default::default() })).await.unwrap()
}

fn name_of(summary: &ContainerSummary) -> String {
    summary.names.as_ref().unwrap()[0].trim_start_matches('/').to_string()
}

fn running(summary: &ContainerSummary) -> bool {
    summary.state.map(|s| s.to_string()).as_deref() == Some("running")
}

async fn get(port: u16) -> Result<(u16, String), String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    health::http_get(addr, "/health", Duration::from_secs(3)).await
}

fn steps(seen: &[Progress]) -> Vec<Step> {
    seen.iter().map(|p| p.step).collect()
}

const NO_SECRETS: &BTreeMap<String, String> = &BTreeMap::new();

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_deploy_passes_its_http_check_and_a_bad_update_rolls_back() {
    let Some(docker) = docker().await else { return };
    let dir = TempDir::new("http");
    let id = unique("http");
    let _cleanup = Cleanup(id.clone());
    let executor = Executor::new(docker.clone(), &dir.0).unwrap();
    let port = free_port();
    let good = spec("start_first", 20, vec![web(port, &serve("ok"))]);

    let mut seen = Vec::new();
    let outcome = executor.apply(&id, 1, &good, NO_SECRETS, &mut |p| seen.push(p)).await.unwrap();
    assert_eq!(outcome, Outcome::Healthy { revision: 1 }, "{seen:#?}");
    assert_eq!(steps(&seen), [Step::Creating, Step::Starting, Step::WaitingForHealth, Step::Healthy, Step::Done]);
    assert!(seen.iter().all(|p| p.deployment == id && p.revision == 1));
    let list = containers(&docker, &id).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let first = list[0].id.clone().unwrap();
    assert_eq!(name_of(&list[0]), container_name(&id, "web", 1));
    assert!(running(&list[0]));
    let labels = list[0].labels.clone().unwrap();
    assert_eq!(labels.get(LABEL_SERVICE).map(String::as_str), Some("web"));
    assert_eq!(labels.get(LABEL_REVISION).map(String::as_str), Some("1"));
    let (status, body) = get(port).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.ends_with("ok\n"), "{body}");
    let state = executor.status(&id).unwrap();
    assert_eq!((state.current, state.last_good.as_ref().map(|g| g.revision)), (Some(1), Some(1)));

    // The same revision again: nothing to do.
    seen.clear();
    let started = std::time::Instant::now();
    let outcome = executor.apply(&id, 1, &good, NO_SECRETS, &mut |p| seen.push(p)).await.unwrap();
    assert_eq!(outcome, Outcome::Healthy { revision: 1 });
    assert_eq!(steps(&seen), [Step::Done]);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(containers(&docker, &id).await.iter().map(|c| c.id.clone().unwrap()).collect::<Vec<_>>(), vec![first.clone()]);

    // A revision whose container exits: back to revision 1, which kept serving.
    let bad = spec("start_first", 20, vec![plain("echo starting v2; echo broken config >&2; exit 3")]);
    seen.clear();
    let outcome = executor.apply(&id, 2, &bad, NO_SECRETS, &mut |p| seen.push(p)).await.unwrap();
    let Outcome::RolledBack { from: 2, to: 1, failure } = outcome else { panic!("{outcome:?}\n{seen:#?}") };
    assert_eq!(failure.exit_code, Some(3), "{failure:?}");
    assert!(failure.reason.contains("exited with code 3"), "{failure:?}");
    assert!(failure.last_logs.iter().any(|l| l == "broken config"), "{failure:?}");
    assert!(failure.last_logs.iter().any(|l| l == "starting v2"), "{failure:?}");
    let all = steps(&seen);
    for step in [Step::Creating, Step::Starting, Step::Failed, Step::Removing, Step::RollingBack, Step::RolledBack] {
        assert!(all.contains(&step), "{step:?} missing: {seen:#?}");
    }
    let failed = seen.iter().find(|p| p.step == Step::Failed).unwrap().to_event();
    assert_eq!((failed.kind.as_str(), failed.severity), ("deploy.failed", gantry_shared::telemetry::Severity::Error));
    assert_eq!(seen.iter().find(|p| p.step == Step::RolledBack).unwrap().to_event().kind, "deploy.rolled_back");
    assert_eq!(get(port).await.unwrap().0, 200);
    let list = containers(&docker, &id).await;
    assert_eq!(list.iter().map(|c| c.id.clone().unwrap()).collect::<Vec<_>>(), [first], "{list:?}");
    let state = executor.status(&id).unwrap();
    assert_eq!((state.desired.revision, state.failed, state.current), (2, Some(2), Some(1)));

    // Revisions only move forward; a revision number never changes its spec.
    let stale = executor.apply(&id, 1, &good, NO_SECRETS, &mut |_| {}).await.unwrap_err();
    assert!(matches!(stale, Error::StaleRevision { revision: 1, desired: 2, .. }), "{stale}");
    let conflict = executor.apply(&id, 2, &good, NO_SECRETS, &mut |_| {}).await.unwrap_err();
    assert!(matches!(conflict, Error::RevisionConflict { revision: 2, .. }), "{conflict}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_first_reuses_the_host_port_and_a_bad_update_serves_again_after_rollback() {
    let Some(docker) = docker().await else { return };
    let dir = TempDir::new("stopfirst");
    let id = unique("stopfirst");
    let _cleanup = Cleanup(id.clone());
    let executor = Executor::new(docker.clone(), &dir.0).unwrap();
    let port = free_port();

    let v1 = spec("stop_first", 20, vec![web(port, &serve("v1"))]);
    assert_eq!(executor.apply(&id, 1, &v1, NO_SECRETS, &mut |_| {}).await.unwrap(), Outcome::Healthy { revision: 1 });
    assert!(get(port).await.unwrap().1.ends_with("v1\n"));

    let v2 = spec("stop_first", 20, vec![web(port, &serve("v2"))]);
    let mut seen = Vec::new();
    let outcome = executor.apply(&id, 2, &v2, NO_SECRETS, &mut |p| seen.push(p)).await.unwrap();
    assert_eq!(outcome, Outcome::Healthy { revision: 2 }, "{seen:#?}");
    // The old container is stopped before the new one starts.
    let order = steps(&seen);
    let stop = order.iter().position(|s| *s == Step::StoppingOld).unwrap();
    let start = order.iter().position(|s| *s == Step::Starting).unwrap();
    assert!(stop < start, "{seen:#?}");
    assert!(get(port).await.unwrap().1.ends_with("v2\n"));
    let list = containers(&docker, &id).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(name_of(&list[0]), container_name(&id, "web", 2));
    let v2_container = list[0].id.clone().unwrap();

    // No health file: /health answers 404 until the deadline.
    let v3 = spec("stop_first", 3, vec![web(port, "mkdir -p /www && httpd -f -p 80 -h /www")]);
    let outcome = executor.apply(&id, 3, &v3, NO_SECRETS, &mut |_| {}).await.unwrap();
    let Outcome::RolledBack { from: 3, to: 2, failure } = outcome else { panic!("{outcome:?}") };
    let health = failure.health_output.clone().unwrap_or_default();
    assert!(health.contains("status 404"), "{failure:?}");
    assert!(failure.reason.contains("was not healthy for 1s within 3s"), "{failure:?}");
    assert_eq!(failure.exit_code, None);
    let (status, body) = get(port).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.ends_with("v2\n"), "{body}");
    let list = containers(&docker, &id).await;
    assert_eq!(list.iter().map(|c| c.id.clone().unwrap()).collect::<Vec<_>>(), [v2_container], "{list:?}");
    assert!(running(&list[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_first_deploy_fails_and_leaves_nothing_running() {
    let Some(docker) = docker().await else { return };
    let dir = TempDir::new("firstbad");
    let id = unique("firstbad");
    let _cleanup = Cleanup(id.clone());
    let executor = Executor::new(docker.clone(), &dir.0).unwrap();
    let bad = spec("start_first", 20, vec![plain("echo no config; exit 3")]);
    let mut seen = Vec::new();
    let outcome = executor.apply(&id, 1, &bad, NO_SECRETS, &mut |p| seen.push(p)).await.unwrap();
    let Outcome::Failed { revision: 1, failure } = outcome else { panic!("{outcome:?}") };
    assert_eq!(failure.exit_code, Some(3), "{failure:?}");
    // Docker may have restarted it before the gate saw it exit: one line per run.
    assert!(!failure.last_logs.is_empty() && failure.last_logs.iter().all(|l| l == "no config"), "{failure:?}");
    assert!(!steps(&seen).contains(&Step::RollingBack));
    assert!(containers(&docker, &id).await.is_empty());
    let state = executor.status(&id).unwrap();
    assert_eq!((state.current, state.failed, state.last_good.is_none()), (None, Some(1), true));

    // After a restart nothing comes back: the revision failed and there is nothing good.
    drop(executor);
    let executor = Executor::new(docker.clone(), &dir.0).unwrap();
    let outcomes = executor.reconcile(&mut |_| {}).await.unwrap();
    assert!(matches!(&outcomes[..], [(d, Outcome::Failed { revision: 1, .. })] if *d == id), "{outcomes:?}");
    assert!(containers(&docker, &id).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_after_a_crash_converges_to_one_healthy_container() {
    let Some(docker) = docker().await else { return };
    let dir = TempDir::new("reconcile");
    let id = unique("reconcile");
    let _cleanup = Cleanup(id.clone());
    let executor = Executor::new(docker.clone(), &dir.0).unwrap();
    let r1 = spec("start_first", 20, vec![plain("sleep 3600")]);
    assert_eq!(executor.apply(&id, 1, &r1, NO_SECRETS, &mut |_| {}).await.unwrap(), Outcome::Healthy { revision: 1 });

    // "Crash" in the middle of applying revision 2: desired is persisted, its container
    // created but not started; also a duplicate of revision 1 and a container of a
    // revision nobody knows.
    let r2 = spec("start_first", 20, vec![plain("echo r2; sleep 3600")]);
    let store = Store::open(&dir.0).unwrap();
    let mut state = executor.status(&id).unwrap();
    state.desired = RevisionSpec { revision: 2, spec: r2.clone() };
    store.save(&state).unwrap();
    let half = executor.create(&container_name(&id, "web", 2), &id, 2, &r2.services[0], NO_SECRETS).await.unwrap();
    let duplicate = format!("{}-copy", container_name(&id, "web", 1));
    executor.create(&duplicate, &id, 1, &r1.services[0], NO_SECRETS).await.unwrap();
    docker.start_container(&duplicate, None::<bollard::query_parameters::StartContainerOptions>).await.unwrap();
    executor.create(&container_name(&id, "web", 7), &id, 7, &r1.services[0], NO_SECRETS).await.unwrap();
    assert_eq!(containers(&docker, &id).await.len(), 4);
    drop(executor);

    let executor = Executor::new(docker.clone(), &dir.0).unwrap();
    let mut seen = Vec::new();
    let outcomes = executor.reconcile(&mut |p| seen.push(p)).await.unwrap();
    assert_eq!(outcomes, [(id.clone(), Outcome::Healthy { revision: 2 })], "{seen:#?}");
    let list = containers(&docker, &id).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].id.as_deref(), Some(half.as_str()), "the half-created container is adopted");
    assert!(running(&list[0]));
    assert!(!steps(&seen).contains(&Step::Creating), "{seen:#?}");
    let state = executor.status(&id).unwrap();
    assert_eq!((state.current, state.last_good.as_ref().map(|g| g.revision), state.failed), (Some(2), Some(2), None));

    // Once more: already converged.
    let mut seen = Vec::new();
    let outcomes = executor.reconcile(&mut |p| seen.push(p)).await.unwrap();
    assert_eq!(outcomes, [(id.clone(), Outcome::Healthy { revision: 2 })]);
    assert_eq!(steps(&seen), [Step::Done]);
    assert_eq!(containers(&docker, &id).await[0].id.as_deref(), Some(half.as_str()));

    // The container died while the agent was down: reconcile starts it again.
    docker.stop_container(&half, Some(bollard::query_parameters::StopContainerOptions { t: Some(0), signal: None })).await.unwrap();
    let outcomes = Executor::new(docker.clone(), &dir.0).unwrap().reconcile(&mut |_| {}).await.unwrap();
    assert_eq!(outcomes, [(id.clone(), Outcome::Healthy { revision: 2 })]);
    let list = containers(&docker, &id).await;
    assert_eq!(list.len(), 1);
    assert!(running(&list[0]) && list[0].id.as_deref() == Some(half.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_takes_everything_down_and_forgets_the_deployment() {
    let Some(docker) = docker().await else { return };
    let dir = TempDir::new("remove");
    let id = unique("remove");
    let _cleanup = Cleanup(id.clone());
    let executor = Executor::new(docker.clone(), &dir.0).unwrap();
    let r1 = spec("start_first", 20, vec![plain("sleep 3600")]);
    assert_eq!(executor.apply(&id, 1, &r1, NO_SECRETS, &mut |_| {}).await.unwrap(), Outcome::Healthy { revision: 1 });
    let mut seen = Vec::new();
    executor.remove(&id, &mut |p| seen.push(p)).await.unwrap();
    assert_eq!(steps(&seen), [Step::Removing, Step::Removed]);
    assert!(containers(&docker, &id).await.is_empty());
    assert!(executor.status(&id).is_none());
    assert!(executor.deployments().is_empty());
    assert!(!dir.0.join(format!("deployments/{id}.json")).exists());
    executor.remove(&id, &mut |_| {}).await.unwrap();

    // A removal cut short by a crash is finished by the next reconcile.
    assert_eq!(executor.apply(&id, 1, &r1, NO_SECRETS, &mut |_| {}).await.unwrap(), Outcome::Healthy { revision: 1 });
    let mut state = executor.status(&id).unwrap();
    state.removing = true;
    Store::open(&dir.0).unwrap().save(&state).unwrap();
    drop(executor);
    let executor = Executor::new(docker.clone(), &dir.0).unwrap();
    assert!(executor.reconcile(&mut |_| {}).await.unwrap().is_empty());
    assert!(containers(&docker, &id).await.is_empty());
    assert!(executor.status(&id).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_values_reach_the_container_and_nothing_else() {
    let Some(docker) = docker().await else { return };
    let dir = TempDir::new("secrets");
    let id = unique("secrets");
    let _cleanup = Cleanup(id.clone());
    let executor = Executor::new(docker.clone(), &dir.0).unwrap();
    const VALUE: &str = "s3cr3t-Value-42";
    let secrets = BTreeMap::from([("api-token".to_string(), VALUE.to_string())]);
    let with_env = |script: &str| {
        let mut service = plain(script);
        service["env"] = json!([{"name": "MODE", "value": "prod"}, {"name": "TOKEN", "secret": "api-token"}]);
        service
    };
    let good = spec("start_first", 20, vec![with_env("sleep 3600")]);

    // Without the value, nothing happens.
    let missing = executor.apply(&id, 1, &good, NO_SECRETS, &mut |_| {}).await.unwrap_err();
    assert!(matches!(missing, Error::MissingSecret { .. }), "{missing}");
    assert!(executor.status(&id).is_none());

    let mut seen = Vec::new();
    assert_eq!(executor.apply(&id, 1, &good, &secrets, &mut |p| seen.push(p)).await.unwrap(), Outcome::Healthy { revision: 1 });
    let inspect = docker.inspect_container(&container_name(&id, "web", 1), None::<InspectContainerOptions>).await.unwrap();
    let env = inspect.config.unwrap().env.unwrap();
    assert!(env.contains(&format!("TOKEN={VALUE}")) && env.contains(&"MODE=prod".to_string()), "{env:?}");

    // A bad revision that prints the value: the report shows it redacted.
    let bad = spec("start_first", 20, vec![with_env("echo token is $TOKEN; exit 4")]);
    let outcome = executor.apply(&id, 2, &bad, &secrets, &mut |p| seen.push(p)).await.unwrap();
    let Outcome::RolledBack { failure, .. } = &outcome else { panic!("{outcome:?}") };
    assert!(failure.last_logs.contains(&format!("token is {REDACTED}")), "{failure:?}");
    assert!(!format!("{outcome:?}").contains(VALUE));
    assert!(!seen.is_empty());
    for progress in &seen {
        assert!(!format!("{progress:?}").contains(VALUE), "{progress:?}");
    }
    let json = std::fs::read_to_string(dir.0.join(format!("deployments/{id}.json"))).unwrap();
    assert!(!json.contains(VALUE) && json.contains("api-token"), "{json}");
    assert!(!format!("{:?}", executor.status(&id)).contains(VALUE));
    // The values are kept apart, for rollbacks while the hub is away.
    use std::os::unix::fs::PermissionsExt;
    let secrets_path = dir.0.join(format!("deployments/{id}.secrets"));
    assert!(std::fs::read_to_string(&secrets_path).unwrap().contains(VALUE));
    assert_eq!(std::fs::metadata(&secrets_path).unwrap().permissions().mode() & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_cannot_be_pulled_fails_clearly() {
    let Some(docker) = docker().await else { return };
    let dir = TempDir::new("noimage");
    let id = unique("noimage");
    let _cleanup = Cleanup(id.clone());
    let executor = Executor::new(docker.clone(), &dir.0).unwrap();
    let mut service = plain("true");
    service["image"] = json!("gantry-nope/none:1");
    let mut seen = Vec::new();
    let outcome = executor.apply(&id, 1, &spec("start_first", 20, vec![service]), NO_SECRETS, &mut |p| seen.push(p)).await.unwrap();
    let Outcome::Failed { revision: 1, failure } = outcome else { panic!("{outcome:?}") };
    assert!(failure.reason.starts_with("image gantry-nope/none:1 is not present and could not be pulled: "), "{failure:?}");
    assert_eq!(steps(&seen), [Step::Pulling, Step::Failed]);
    assert!(containers(&docker, &id).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_tcp_checks_gate_the_revision() {
    let Some(docker) = docker().await else { return };
    let dir = TempDir::new("exec");
    let id = unique("exec");
    let _cleanup = Cleanup(id.clone());
    let executor = Executor::new(docker.clone(), &dir.0).unwrap();
    let port = free_port();
    let mut good = web(port, &format!("mkdir -p /tmp && touch /tmp/ready; {}", serve("ok")));
    good["health"] = json!({"exec": {"command": ["test", "-f", "/tmp/ready"]}});
    let mut tcp = plain("sleep 3600");
    tcp["name"] = json!("side");
    let side_port = free_port();
    tcp["command"] = json!(["httpd", "-f", "-p", "81"]);
    tcp["ports"] = json!([{"host": side_port, "container": 81, "host_ip": "127.0.0.1"}]);
    tcp["health"] = json!({"tcp": {"port": side_port}});
    let outcome = executor.apply(&id, 1, &spec("start_first", 20, vec![good, tcp]), NO_SECRETS, &mut |_| {}).await.unwrap();
    assert_eq!(outcome, Outcome::Healthy { revision: 1 });
    assert_eq!(containers(&docker, &id).await.len(), 2);

    let mut bad = plain("sleep 3600");
    bad["health"] = json!({"exec": {"command": ["sh", "-c", "echo not ready; exit 1"]}});
    let outcome = executor.apply(&id, 2, &spec("start_first", 2, vec![bad]), NO_SECRETS, &mut |_| {}).await.unwrap();
    let Outcome::RolledBack { from: 2, to: 1, failure } = outcome else { panic!("{outcome:?}") };
    assert_eq!(failure.health_output.as_deref(), Some("exit code 1: not ready"), "{failure:?}");
    let list = containers(&docker, &id).await;
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(list.iter().all(|c| running(c) && c.labels.as_ref().unwrap()[LABEL_REVISION] == "1"));
}

#[test]
fn apply_is_a_send_future() {
    fn assert_send<T: Send>(_: &T) {}
    let docker = Docker::connect_with_http("http://127.0.0.1:1", 1, bollard::API_DEFAULT_VERSION).unwrap();
    let dir = TempDir::new("send");
    let executor = Executor::new(docker, &dir.0).unwrap();
    let spec = spec("start_first", 20, vec![plain("true")]);
    let mut progress = |_: Progress| {};
    let apply = executor.apply("d", 1, &spec, NO_SECRETS, &mut progress);
    assert_send(&apply);
    drop(apply);
    let reconcile = executor.reconcile(&mut progress);
    assert_send(&reconcile);
}

#[test]
fn progress_becomes_an_event() {
    use gantry_shared::telemetry::Severity;
    let progress = Progress { deployment: "d1".into(), revision: 3, service: Some("web".into()), step: Step::WaitingForHealth, message: "waiting".into() };
    let event = progress.to_event();
    assert_eq!(event.kind, "deploy.waiting_for_health");
    assert_eq!(event.severity, Severity::Info);
    assert_eq!(event.attributes, [("deployment".into(), "d1".into()), ("revision".into(), "3".into()), ("service".into(), "web".into())]);
    let rolling = Progress { step: Step::RollingBack, service: None, ..progress };
    assert_eq!(rolling.to_event().severity, Severity::Warning);
    assert_eq!(rolling.to_event().attributes.len(), 2);
    let redactor = Redactor::new(&["abc".to_string(), "abcdef".to_string(), String::new()]);
    assert_eq!(redactor.apply("x abcdef abc y"), format!("x {REDACTED} {REDACTED} y"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_sharing_one_docker_engine_keep_to_their_own_containers() {
    let Some(docker) = docker().await else { return };
    let (dir_a, dir_b) = (TempDir::new("owner-a"), TempDir::new("owner-b"));
    let id = unique("owners");
    let _cleanup = Cleanup(id.clone());
    let a = Executor::for_owner(docker.clone(), &dir_a.0, "agt_00000000aaaaaaaa").unwrap();
    let b = Executor::for_owner(docker.clone(), &dir_b.0, "agt_00000000bbbbbbbb").unwrap();
    let one = spec("start_first", 20, vec![plain("sleep 600")]);
    assert_eq!(a.apply(&id, 1, &one, NO_SECRETS, &mut |_| {}).await.unwrap(), Outcome::Healthy { revision: 1 });
    assert_eq!(b.apply(&id, 1, &one, NO_SECRETS, &mut |_| {}).await.unwrap(), Outcome::Healthy { revision: 1 });
    let mut names: Vec<String> = containers(&docker, &id).await.iter().map(name_of).collect();
    names.sort();
    assert_eq!(names, [format!("{}-aaaaaaaa", container_name(&id, "web", 1)), format!("{}-bbbbbbbb", container_name(&id, "web", 1))]);
    // Reconciling one owner leaves the other's container alone; removing removes only its own.
    a.reconcile(&mut |_| {}).await.unwrap();
    assert_eq!(containers(&docker, &id).await.iter().filter(|c| running(c)).count(), 2);
    a.remove(&id, &mut |_| {}).await.unwrap();
    let left: Vec<String> = containers(&docker, &id).await.iter().map(name_of).collect();
    assert_eq!(left, [format!("{}-bbbbbbbb", container_name(&id, "web", 1))]);
}
