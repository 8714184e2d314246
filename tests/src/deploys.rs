//! Helpers for tests that deploy containers through the hub onto a real agent.

use crate::{wait_for, Api};
use gantry_agent::collector::docker::testing::cli;
use serde_json::Value;
use std::time::Duration;

/// Wait until `agent` reports `state` for `revision` of deployment `id`; its status entry.
pub async fn wait_deploy_state(api: &Api, id: &str, agent: &str, revision: u64, state: &str) -> Value {
    wait_for(Duration::from_secs(90), &format!("{agent} {state} on revision {revision}"), || async {
        let (_, body) = api.get(&format!("/api/v1/deployments/{id}")).await;
        let status = body["agents"][agent].clone();
        (status["revision"] == revision && status["state"] == state).then_some(status)
    })
    .await
}

/// The names of a deployment's containers, by the label the agent puts on them.
pub fn containers_of(deployment: &str) -> Vec<String> {
    let out = cli(&["ps", "-a", "--filter", &format!("label=io.gantry.deployment={deployment}"), "--format", "{{.Names}}"]);
    out.lines().filter(|l| !l.is_empty()).map(String::from).collect()
}

/// Removes a deployment's containers when dropped, even when the test fails.
#[derive(Debug)]
pub struct ContainerGuard(pub String);

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        for name in containers_of(&self.0) {
            let _ = std::process::Command::new("docker").args(["rm", "-f", &name]).output();
        }
    }
}
