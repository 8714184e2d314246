//! Tests of the check runner as the agent runs it: real probes and remediations, a real
//! spool, and (for containers) the real Docker engine with the locally built busybox
//! image. They observe what the hub would receive: the reports on the health stream and
//! the agent events. Waits poll a condition under a deadline, never sleep a fixed time.

use super::*;
use crate::collector::docker::testing::{cli, docker, unique, Container};
use crate::spool::{Spool, SpoolConfig};
use gantry_shared::checks::Probe;
use gantry_shared::telemetry::Event;
use std::time::Duration;

use crate::test_dir::TempDir;

fn spool(dir: &Path) -> Outbox {
    Outbox::new(Spool::open(&dir.join("spool"), SpoolConfig::default()).unwrap().0)
}

/// A runner over a spool in `dir`, with its stop switch.
struct Harness {
    outbox: Outbox,
    checks: Checks,
    task: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Harness {
    fn start(dir: &Path, outbox: Option<Outbox>) -> Harness {
        Harness::with_deployer(dir, outbox.unwrap_or_else(|| spool(dir)), None)
    }

    fn with_deployer(dir: &Path, outbox: Outbox, deployer: Option<Deployer>) -> Harness {
        let (stop, stopped) = watch::channel(false);
        let (checks, task) = start(dir.to_path_buf(), DockerConfig::default(), outbox.clone(), deployer, stopped);
        Harness { outbox, checks, task, stop }
    }

    async fn stop(self) -> Outbox {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("the runner did not stop").unwrap();
        self.outbox
    }

    /// Every check report spooled so far, with its seq.
    fn reports(&self) -> Vec<(u64, CheckReport)> {
        let records = self.outbox.spool().pending(StreamClass::Health, 0, 100_000, 64 << 20).unwrap();
        records
            .into_iter()
            .filter_map(|r| match r.body {
                RecordBody::Check(report) => Some((r.seq, report)),
                _ => None,
            })
            .collect()
    }

    /// Every agent event of `kind` spooled so far.
    fn events(&self, kind: &str) -> Vec<Event> {
        let records = self.outbox.spool().pending(StreamClass::Events, 0, 100_000, 64 << 20).unwrap();
        records
            .into_iter()
            .filter_map(|r| match r.body {
                RecordBody::Event(event) if event.kind == kind => Some(event),
                _ => None,
            })
            .collect()
    }

    /// Wait until `found` picks something out of the reports.
    async fn wait_for<T>(&self, what: &str, limit: Duration, mut found: impl FnMut(&[(u64, CheckReport)]) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let reports = self.reports();
            if let Some(value) = found(&reports) {
                return value;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what}: not within {limit:?}; reports: {reports:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn exec_check(name: &str, command: &[&str], failure_threshold: u32, steps: Vec<RemediationStep>, max_attempts: u32) -> CheckSpec {
    CheckSpec {
        name: name.into(),
        probe: Probe::Exec { command: command.iter().map(|s| s.to_string()).collect() },
        interval_secs: 1,
        timeout_secs: 1,
        failure_threshold,
        success_threshold: 1,
        remediation: Remediation { steps, max_attempts, window_secs: 600 },
    }
}

/// The seq of the first transition of `name` to `state` after `after`.
fn transition(reports: &[(u64, CheckReport)], name: &str, state: CheckState, after: u64) -> Option<u64> {
    reports.iter().find(|(seq, r)| *seq > after && r.name == name && r.transition && r.state == state).map(|(seq, _)| *seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_set_runs_at_start_and_an_older_set_is_ignored() {
    let dir = TempDir::new("kept");
    let harness = Harness::start(&dir.0, None);
    harness.checks.submit(CheckSet { revision: 2, checks: vec![exec_check("alive", &["true"], 1, vec![], 3)] });
    harness.wait_for("alive passing", Duration::from_secs(10), |r| transition(r, "alive", CheckState::Passing, 0)).await;
    assert_eq!(load(&dir.0).unwrap().map(|s| s.revision), Some(2));
    let outbox = harness.stop().await;

    // After a restart the kept set runs before (and without) the hub sending anything,
    // and an older set arriving late changes nothing, on disk or in what runs.
    let last = outbox.spool().pending(StreamClass::Health, 0, 100_000, 64 << 20).unwrap().last().map(|r| r.seq).unwrap_or(0);
    let harness = Harness::start(&dir.0, Some(outbox));
    harness.checks.submit(CheckSet { revision: 1, checks: vec![exec_check("stale", &["true"], 1, vec![], 3)] });
    harness.wait_for("alive passing after a restart", Duration::from_secs(10), |r| transition(r, "alive", CheckState::Passing, last)).await;
    let outbox = harness.stop().await;
    let kept = load(&dir.0).unwrap().unwrap();
    assert_eq!((kept.revision, kept.checks.len(), kept.checks[0].name.as_str()), (2, 1, "alive"));
    let spooled = outbox.spool().pending(StreamClass::Health, 0, 100_000, 64 << 20).unwrap();
    assert!(spooled.iter().all(|r| matches!(&r.body, RecordBody::Check(c) if c.name == "alive")), "{spooled:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_check_is_remediated_by_a_command_and_recovers() {
    let dir = TempDir::new("command");
    let marker = dir.0.join("marker");
    let marker = marker.to_str().unwrap();
    let touch = RemediationStep::RunCommand { command: vec!["touch".into(), marker.into()] };
    let harness = Harness::start(&dir.0, None);
    harness.checks.submit(CheckSet { revision: 1, checks: vec![exec_check("marker", &["test", "-e", marker], 1, vec![touch], 3)] });

    let failing = harness.wait_for("marker failing", Duration::from_secs(10), |r| transition(r, "marker", CheckState::Failing, 0)).await;
    let passing = harness.wait_for("marker passing", Duration::from_secs(10), |r| transition(r, "marker", CheckState::Passing, failing)).await;
    let reports = harness.reports();
    let remediation = reports
        .iter()
        .find(|(seq, r)| *seq > failing && *seq < passing && r.remediation.is_some())
        .map(|(_, r)| r.remediation.clone().unwrap())
        .unwrap_or_else(|| panic!("no remediation report between the transitions: {reports:#?}"));
    assert_eq!(remediation, format!("run touch {marker}: exit code 0"));
    let events = harness.events("check.remediated");
    assert_eq!(events.len(), 1, "{events:#?}");
    let attribute = |key: &str| events[0].attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    assert_eq!((attribute("check"), attribute("action"), attribute("result")), (Some("marker".into()), Some("run_command".into()), Some("ok".into())));
    assert_eq!(events[0].severity, Severity::Warning);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_stays_failing_stops_being_remediated_after_its_budget() {
    let dir = TempDir::new("budget");
    let noop = RemediationStep::RunCommand { command: vec!["true".into()] };
    let harness = Harness::start(&dir.0, None);
    // One healthy neighbour keeps running whatever the broken check does.
    let checks = vec![exec_check("broken", &["false"], 1, vec![noop], 2), exec_check("neighbour", &["true"], 1, vec![], 3)];
    harness.checks.submit(CheckSet { revision: 1, checks });

    let refused = harness
        .wait_for("a crash loop report", Duration::from_secs(15), |r| r.iter().find(|(_, r)| r.name == "broken" && r.crash_loop).map(|(seq, _)| *seq))
        .await;
    let reports = harness.reports();
    let taken =
        reports.iter().filter(|(seq, r)| *seq < refused && r.name == "broken" && r.remediation.as_deref().is_some_and(|t| t.starts_with("run true"))).count();
    assert_eq!(taken, 2, "{reports:#?}");
    let crash = harness.events("check.crash_loop");
    assert_eq!(crash.len(), 1, "{crash:#?}");
    assert_eq!(crash[0].severity, Severity::Error);
    assert!(crash[0].message.contains("broken"), "{crash:#?}");
    assert!(transition(&reports, "neighbour", CheckState::Passing, 0).is_some(), "{reports:#?}");
    harness.stop().await;
}

/// Whether Docker says the container runs.
fn running(name: &str) -> bool {
    cli(&["inspect", "-f", "{{.State.Running}}", name]) == "true"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_container_is_restarted_by_its_check() {
    let Some(_docker) = docker().await else { return };
    let name = unique("check-restart");
    let _container = Container::run(&name, "trap 'exit 0' TERM; while true; do sleep 1; done", &[]);
    let dir = TempDir::new("container");
    let harness = Harness::start(&dir.0, None);
    let check = CheckSpec {
        name: "container".into(),
        probe: Probe::Container { name: name.clone() },
        interval_secs: 1,
        timeout_secs: 1,
        failure_threshold: 2,
        success_threshold: 1,
        remediation: Remediation { steps: vec![RemediationStep::RestartContainer { container: name.clone() }], max_attempts: 3, window_secs: 600 },
    };
    harness.checks.submit(CheckSet { revision: 1, checks: vec![check] });
    let first = harness.wait_for("container passing", Duration::from_secs(15), |r| transition(r, "container", CheckState::Passing, 0)).await;

    cli(&["stop", "-t", "1", &name]);
    assert!(!running(&name));
    let stopped = tokio::time::Instant::now();
    let failing = harness.wait_for("container failing", Duration::from_secs(30), |r| transition(r, "container", CheckState::Failing, first)).await;
    let passing = harness.wait_for("container passing again", Duration::from_secs(30), |r| transition(r, "container", CheckState::Passing, failing)).await;
    assert!(stopped.elapsed() < Duration::from_secs(30), "recovered only after {:?}", stopped.elapsed());
    assert!(running(&name), "the container does not run");
    let reports = harness.reports();
    let failed = reports.iter().find(|(seq, _)| *seq == failing).map(|(_, r)| r.output.clone()).unwrap();
    assert!(failed.contains("is not running (state exited"), "{failed}");
    assert!(
        reports.iter().any(|(seq, r)| *seq > failing
            && *seq < passing
            && r.remediation.as_deref() == Some(&format!("restart container {name}: container {name} restarted"))),
        "{reports:#?}"
    );
    let events = harness.events("check.remediated");
    assert!(events.iter().any(|e| e.attributes.contains(&("action".into(), "restart_container".into()))), "{events:#?}");
    harness.stop().await;
}

/// Removes every container of a deployment when dropped, even when the test fails.
struct DeploymentCleanup(String);

impl Drop for DeploymentCleanup {
    fn drop(&mut self) {
        let filter = format!("label={}={}", gantry_shared::deploy::LABEL_DEPLOYMENT, self.0);
        if let Ok(output) = std::process::Command::new("docker").args(["ps", "-aq", "--filter", &filter]).output() {
            for container in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                let _ = std::process::Command::new("docker").args(["rm", "-f", "-v", container]).output();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_whose_check_fails_is_redeployed_from_fresh_containers() {
    use crate::deployer::Command;
    use gantry_shared::message::{DeployCommand, DeployState};
    let Some(_docker) = docker().await else { return };
    let dir = TempDir::new("redeploy");
    let id = unique("redeploy");
    let _cleanup = DeploymentCleanup(id.clone());
    let outbox = spool(&dir.0);
    let (_stop_deployer, deployer_stopped) = watch::channel(false);
    let (deployer, _deployer_task) = crate::deployer::start(DockerConfig::default(), dir.0.clone(), String::new(), outbox.clone(), deployer_stopped);
    let spec = serde_json::from_value(serde_json::json!({
        "name": "web",
        "services": [{
            "name": "web", "image": crate::collector::docker::testing::IMAGE, "stop_grace_secs": 1,
            "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]
        }],
        "health_gate": {"min_healthy_secs": 1, "deadline_secs": 20}
    }))
    .unwrap();
    let command = DeployCommand { deployment_id: id.clone(), revision: 1, spec, secrets: vec![], registry_auth: vec![] };
    assert!(deployer.submit(Command::Deploy(Box::new(command))));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !deployer.snapshot().iter().any(|r| r.deployment_id == id && r.state == DeployState::Healthy) {
        assert!(tokio::time::Instant::now() < deadline, "not deployed: {:?}", deployer.snapshot());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let name = crate::deploy::executor::container_name(&id, "web", 1);
    let first = cli(&["inspect", "-f", "{{.Id}}", &name]);

    let harness = Harness::with_deployer(&dir.0, outbox, Some(deployer));
    let check = CheckSpec {
        name: "shop".into(),
        probe: Probe::Container { name: name.clone() },
        interval_secs: 1,
        timeout_secs: 1,
        failure_threshold: 1,
        success_threshold: 1,
        remediation: Remediation { steps: vec![RemediationStep::Redeploy { deployment_id: id.clone() }], max_attempts: 3, window_secs: 600 },
    };
    harness.checks.submit(CheckSet { revision: 1, checks: vec![check] });
    let up = harness.wait_for("shop passing", Duration::from_secs(15), |r| transition(r, "shop", CheckState::Passing, 0)).await;
    cli(&["stop", "-t", "1", &name]);
    let failing = harness.wait_for("shop failing", Duration::from_secs(15), |r| transition(r, "shop", CheckState::Failing, up)).await;
    let passing = harness.wait_for("shop passing again", Duration::from_secs(45), |r| transition(r, "shop", CheckState::Passing, failing)).await;
    let reports = harness.reports();
    let expected = format!("redeploy last good revision of {id}: revision 1 of {id} runs again and is healthy");
    assert!(reports.iter().any(|(seq, r)| *seq > failing && *seq < passing && r.remediation.as_deref() == Some(expected.as_str())), "{reports:#?}");
    // A fresh container, not the stopped one started again.
    assert!(running(&name));
    assert_ne!(cli(&["inspect", "-f", "{{.Id}}", &name]), first);
    harness.stop().await;
}
