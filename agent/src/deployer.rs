//! Bridges the hub's deployment commands to the [`crate::deploy::Executor`]: one worker
//! task applies commands in order, turns every progress step into a durable agent event,
//! and keeps the latest report per deployment, which each new session sends to the hub.
//!
//! At start the worker reconciles what the agent persisted, so deployments converge after
//! a restart even before the hub is reachable. Docker being away only delays the work.

use crate::deploy::{Executor, Outcome, Progress};
use crate::telemetry::Outbox;
use gantry_shared::message::{DeployCommand, DeployReport, DeployState};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{info, warn};

/// Commands waiting for the worker, at most.
pub const QUEUE: usize = 256;

/// A command from the hub (or, for `Redeploy`, from a health check's remediation).
#[derive(Debug)]
pub enum Command {
    Deploy(Box<DeployCommand>),
    Remove(String),
    /// Run deployment `.0`'s last good revision again from fresh containers; the report
    /// (also sent to the hub) or the error goes to `.1`.
    Redeploy(String, oneshot::Sender<Result<DeployReport, String>>),
}

/// Handle the sessions use. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Deployer {
    commands: mpsc::Sender<Command>,
    reports: Arc<Mutex<BTreeMap<String, DeployReport>>>,
    updates: broadcast::Sender<DeployReport>,
}

impl Deployer {
    /// Queue a command; false if the queue is full (the hub sends it again on reconnect).
    pub fn submit(&self, command: Command) -> bool {
        self.commands.try_send(command).is_ok()
    }

    /// The latest report of every deployment, for a new session to send.
    pub fn snapshot(&self) -> Vec<DeployReport> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// New reports as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<DeployReport> {
        self.updates.subscribe()
    }

    fn publish(&self, report: DeployReport) {
        self.reports.lock().unwrap_or_else(|p| p.into_inner()).insert(report.deployment_id.clone(), report.clone());
        let _ = self.updates.send(report);
    }
}

/// Start the worker.
pub fn start(
    docker: crate::collector::docker::DockerConfig,
    state_dir: PathBuf,
    agent_id: String,
    outbox: Outbox,
    stop: watch::Receiver<bool>,
) -> (Deployer, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let deployer = Deployer { commands: tx, reports: Arc::default(), updates: broadcast::channel(QUEUE).0 };
    let task = tokio::spawn(work(docker, state_dir, agent_id, outbox, deployer.clone(), rx, stop));
    (deployer, task)
}

fn progress_sink(outbox: &Outbox) -> impl FnMut(Progress) + Send + '_ {
    move |progress: Progress| outbox.event(progress.to_event())
}

fn describe(failure: &crate::deploy::FailureReport) -> String {
    let mut text = failure.reason.clone();
    if let Some(code) = failure.exit_code {
        text.push_str(&format!("; exit code {code}"));
    }
    if let Some(health) = &failure.health_output {
        text.push_str(&format!("; health: {health}"));
    }
    if !failure.last_logs.is_empty() {
        text.push_str(&format!("; last logs: {}", failure.last_logs.join(" | ")));
    }
    text
}

/// The report for an outcome of deployment `id`.
pub fn report_of(id: &str, outcome: &Outcome) -> DeployReport {
    match outcome {
        Outcome::Healthy { revision } => DeployReport { deployment_id: id.into(), revision: *revision, state: DeployState::Healthy, message: "healthy".into() },
        Outcome::RolledBack { from, to, failure } => {
            DeployReport { deployment_id: id.into(), revision: *from, state: DeployState::RolledBack { to: *to }, message: describe(failure) }
        }
        Outcome::Failed { revision, failure } => {
            DeployReport { deployment_id: id.into(), revision: *revision, state: DeployState::Failed, message: describe(failure) }
        }
    }
}

async fn attach(config: &crate::collector::docker::DockerConfig, stop: &mut watch::Receiver<bool>) -> Option<bollard::Docker> {
    let mut delay = Duration::from_secs(1);
    loop {
        match crate::collector::docker::connect(config).await {
            Ok(attached) => return Some(attached.docker),
            Err(error) => warn!(%error, "deployments wait for docker"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

async fn work(
    docker: crate::collector::docker::DockerConfig,
    state_dir: PathBuf,
    agent_id: String,
    outbox: Outbox,
    deployer: Deployer,
    mut commands: mpsc::Receiver<Command>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(client) = attach(&docker, &mut stop).await else { return };
    let executor = match Executor::for_owner(client, &state_dir, &agent_id) {
        Ok(executor) => executor,
        Err(error) => return warn!(%error, "deployments disabled: cannot open their state"),
    };
    {
        let mut sink = progress_sink(&outbox);
        match executor.reconcile(&mut sink).await {
            Ok(outcomes) => {
                for (id, outcome) in outcomes {
                    deployer.publish(report_of(&id, &outcome));
                }
            }
            Err(error) => warn!(%error, "reconciling deployments failed; commands from the hub will retry"),
        }
    }
    loop {
        let command = tokio::select! {
            command = commands.recv() => match command {
                Some(command) => command,
                None => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut sink = progress_sink(&outbox);
        match command {
            Command::Deploy(command) => {
                let id = command.deployment_id.clone();
                // Already settled on this revision (the hub re-sends after a reconnect).
                let known = deployer.reports.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned();
                if known.as_ref().is_some_and(|r| r.revision >= command.revision && r.state != DeployState::Applying && r.state != DeployState::Removed) {
                    if let Some(report) = known {
                        deployer.publish(report);
                    }
                    continue;
                }
                deployer.publish(DeployReport {
                    deployment_id: id.clone(),
                    revision: command.revision,
                    state: DeployState::Applying,
                    message: "applying".into(),
                });
                let secrets: BTreeMap<String, String> = command.secrets.iter().cloned().collect();
                executor.set_registry_auth(&command.registry_auth);
                info!(deployment = %id, revision = command.revision, "applying deployment");
                let report = match executor.apply(&id, command.revision, &command.spec, &secrets, &mut sink).await {
                    Ok(outcome) => report_of(&id, &outcome),
                    Err(crate::deploy::Error::StaleRevision { .. }) => match executor.status(&id) {
                        Some(_) => continue,
                        None => DeployReport {
                            deployment_id: id.clone(),
                            revision: command.revision,
                            state: DeployState::Failed,
                            message: "revision is older than the agent's".into(),
                        },
                    },
                    Err(error) => {
                        DeployReport { deployment_id: id.clone(), revision: command.revision, state: DeployState::Failed, message: error.to_string() }
                    }
                };
                deployer.publish(report);
            }
            Command::Remove(id) => {
                let revision = executor.status(&id).map(|s| s.desired.revision).unwrap_or(0);
                let report = match executor.remove(&id, &mut sink).await {
                    Ok(()) => DeployReport { deployment_id: id.clone(), revision, state: DeployState::Removed, message: "removed".into() },
                    Err(error) => {
                        warn!(%error, deployment = %id, "removing a deployment failed");
                        continue;
                    }
                };
                deployer.publish(report);
            }
            Command::Redeploy(id, reply) => {
                info!(deployment = %id, "redeploying the last good revision");
                let result = match executor.redeploy(&id, &mut sink).await {
                    Ok(outcome) => {
                        let report = report_of(&id, &outcome);
                        deployer.publish(report.clone());
                        Ok(report)
                    }
                    Err(error) => {
                        warn!(%error, deployment = %id, "redeploying a deployment failed");
                        Err(error.to_string())
                    }
                };
                let _ = reply.send(result);
            }
        }
    }
}
