//! Remediation: the one step of a check's ladder the runner decided to take, carried out.
//!
//! Restarting a container goes through bollard's typed API, redeploying goes to the
//! deployer (which owns the deployment's containers and its last good revision), and a
//! command runs like an exec probe (argv, no shell, killed after the check's timeout).
//! This module decides nothing: when to remediate, and when to stop, is the
//! [`Tracker`](super::Tracker)'s call.

use super::probes::{self, Prober};
use crate::deployer::{Command, Deployer};
use bollard::query_parameters::RestartContainerOptions;
use gantry_shared::checks::RemediationStep;
use gantry_shared::message::DeployState;
use std::time::Duration;
use tokio::sync::oneshot;

/// Longest time a container restart may take (Docker waits for the container's own stop
/// grace period first).
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest time the runner waits for the outcome of a redeploy (pulls and health gates
/// included); the redeploy itself goes on after that.
pub const REDEPLOY_WAIT: Duration = Duration::from_secs(15 * 60);

/// The `action` name of a step, as in its JSON form and the `check.remediated` event.
pub fn action(step: &RemediationStep) -> &'static str {
    match step {
        RemediationStep::RestartContainer { .. } => "restart_container",
        RemediationStep::Redeploy { .. } => "redeploy",
        RemediationStep::RunCommand { .. } => "run_command",
    }
}

/// Carry out `step`. `Ok` says what was done, `Err` why it failed. Commands get at most
/// `limit`; `deployer` is needed for redeploys.
pub async fn run(step: &RemediationStep, prober: &Prober, deployer: Option<&Deployer>, limit: Duration) -> Result<String, String> {
    match step {
        RemediationStep::RestartContainer { container } => restart(prober, container).await,
        RemediationStep::Redeploy { deployment_id } => redeploy(deployer, deployment_id).await,
        RemediationStep::RunCommand { command } => probes::run_command(command, limit).await,
    }
}

async fn restart(prober: &Prober, container: &str) -> Result<String, String> {
    let client = prober.docker().get().await?;
    // The request lasts as long as the stop grace period: give it its own timeout.
    let restarting = client.clone().with_timeout(RESTART_TIMEOUT);
    match restarting.restart_container(container, None::<RestartContainerOptions>).await {
        Ok(()) => Ok(format!("container {container} restarted")),
        Err(error) if crate::collector::docker::is_gone(&error) => Err(format!("container {container} does not exist")),
        Err(error) => {
            prober.docker().forget_after(&error).await;
            Err(format!("restarting container {container} failed: {error}"))
        }
    }
}

async fn redeploy(deployer: Option<&Deployer>, deployment_id: &str) -> Result<String, String> {
    let Some(deployer) = deployer else {
        return Err("deployments are not available in this agent".to_string());
    };
    let (reply, outcome) = oneshot::channel();
    if !deployer.submit(Command::Redeploy(deployment_id.to_string(), reply)) {
        return Err("the deployment queue is full".to_string());
    }
    match tokio::time::timeout(REDEPLOY_WAIT, outcome).await {
        Ok(Ok(Ok(report))) if report.state == DeployState::Healthy => Ok(format!("revision {} of {deployment_id} runs again and is healthy", report.revision)),
        Ok(Ok(Ok(report))) => Err(format!("redeploying revision {} of {deployment_id} failed: {}", report.revision, report.message)),
        Ok(Ok(Err(error))) => Err(error),
        Ok(Err(_)) => Err("the deployer stopped before redeploying".to_string()),
        Err(_) => Err(format!("no outcome within {}; the redeploy goes on", probes::seconds(REDEPLOY_WAIT))),
    }
}
