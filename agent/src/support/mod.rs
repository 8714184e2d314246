//! Support actions the hub asks for on the control stream: container start, stop,
//! restart and remove, a container's last log lines, remote exec (in a container or on
//! the host) and the diagnostics bundle.
//!
//! [`Support::handle`] runs one [`ActionRequest`] to its [`ActionReply`]; the session runs
//! each in a task of its own, so a slow action never holds up heartbeats or deployments.
//! Requests are validated again here (the hub already did) and every output is capped by
//! the limits in `gantry_shared::support`. Docker is driven through bollard's typed API only
//! (`docker.rs`); host commands run as an argv, never through a shell (`host.rs`).

pub mod diagnostics;
pub mod docker;
pub mod host;
pub mod recent;

use gantry_shared::support::{ActionError, ActionOutput, ActionReply, ActionRequest, SupportAction};
use tracing::info;

/// Actions one session runs at once; more are refused until one ends.
pub const MAX_RUNNING: usize = 8;
/// Seconds a stopping container gets before Docker kills it.
pub const STOP_GRACE_SECS: u32 = 10;

/// Runs support actions. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Support {
    sources: diagnostics::Sources,
}

impl Support {
    pub fn new(sources: diagnostics::Sources) -> Support {
        Support { sources }
    }

    /// The answer to refuse a request with when [`MAX_RUNNING`] are running.
    pub fn busy(request: &ActionRequest) -> ActionReply {
        ActionReply {
            id: request.id,
            result: Err(ActionError::Unavailable(format!("the agent is running {MAX_RUNNING} support actions already; try again shortly"))),
        }
    }

    /// Run one action.
    pub async fn handle(&self, request: ActionRequest) -> ActionReply {
        let ActionRequest { id, action } = request;
        let errors = action.validate();
        if !errors.is_empty() {
            return ActionReply { id, result: Err(ActionError::Invalid(errors.join("; "))) };
        }
        info!(action = %describe(&action), "support action");
        let result = self.run(action).await;
        if let Err(error) = &result {
            info!(%error, "support action failed");
        }
        ActionReply { id, result }
    }

    async fn run(&self, action: SupportAction) -> Result<ActionOutput, ActionError> {
        match action {
            SupportAction::Container { container, op } => {
                let docker = self.docker().await?;
                docker::container_op(&docker, &container, op, STOP_GRACE_SECS).await.map(ActionOutput::Container)
            }
            SupportAction::ContainerLogs { container, tail } => {
                let docker = self.docker().await?;
                docker::logs(&docker, &container, tail).await.map(ActionOutput::Logs)
            }
            SupportAction::Exec(request) => match &request.container {
                Some(container) => {
                    let docker = self.docker().await?;
                    docker::exec(&docker, container, &request).await.map(ActionOutput::Exec)
                }
                None => Ok(ActionOutput::Exec(host::exec(&request).await)),
            },
            SupportAction::Diagnostics => Ok(ActionOutput::Diagnostics(diagnostics::collect(&self.sources).await)),
        }
    }

    async fn docker(&self) -> Result<bollard::Docker, ActionError> {
        let config = &self.sources.config.docker;
        if !config.enabled {
            return Err(ActionError::Unavailable("docker is disabled in this agent's configuration ([docker] enabled = false)".into()));
        }
        crate::collector::docker::connect(config)
            .await
            .map(|attached| attached.docker)
            .map_err(|error| ActionError::Unavailable(format!("docker is not reachable at {}: {error}", config.endpoint())))
    }
}

/// The action for the agent's log: what and where, never output.
fn describe(action: &SupportAction) -> String {
    match action {
        SupportAction::Container { container, op } => format!("{} container {container}", op.name()),
        SupportAction::ContainerLogs { container, tail } => format!("last {tail} log lines of container {container}"),
        SupportAction::Exec(exec) => {
            let place = exec.container.as_deref().map_or_else(|| "on the host".to_string(), |c| format!("in container {c}"));
            format!("exec {:?} {place} (timeout {} s)", exec.argv.first().map(String::as_str).unwrap_or_default(), exec.timeout_secs)
        }
        SupportAction::Diagnostics => "diagnostics bundle".into(),
    }
}
