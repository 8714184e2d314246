//! Deployment executor: applies the revisions of a deployment the hub sent to the local
//! Docker engine, health-gates them and rolls back to the last good revision on its own.
//!
//! [`Executor`] is the entry point: [`Executor::apply`] persists a revision as desired and
//! converges to it, [`Executor::remove`] takes a deployment down, [`Executor::reconcile`]
//! picks up after an agent restart. Every step is reported through a [`Progress`] callback
//! that the caller turns into events ([`Progress::to_event`]) and hub messages.
//!
//! Layout: `executor.rs` (converging, container naming and configuration), `health.rs`
//! (probes and the health gate), `state.rs` (the per-deployment state files).
//!
//! Rules this module keeps:
//! - Docker is driven through bollard's typed API only: no shell strings, no docker CLI.
//! - It only touches containers labelled with [`LABEL_DEPLOYMENT`](gantry_shared::deploy::LABEL_DEPLOYMENT)
//!   of a deployment it was asked about; it never lists, stops or removes anything else.
//! - Secret values (env vars given as `secret`) never appear in progress messages, failure
//!   reports, errors, logs or the state JSON: every text leaving the module goes through a
//!   redactor that knows the values of the deployment's secrets.
//! - It does not talk to the hub: the caller carries [`Progress`] and [`Outcome`] there.

pub mod executor;
pub mod health;
pub mod state;

#[cfg(test)]
mod tests;

pub use executor::Executor;
pub use state::{DeploymentState, RevisionSpec};

use gantry_shared::telemetry::{Event, Severity};
use serde::{Deserialize, Serialize};

/// Why the executor could not do what it was asked. A revision that fails its health gate
/// is no error: that is an [`Outcome`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid deployment id {0:?}: it must be 1-64 characters of a-z, A-Z, 0-9, '-' and '_', starting with a letter or digit")]
    InvalidId(String),
    #[error("invalid deployment spec: {0}")]
    InvalidSpec(String),
    #[error("secret {secret:?} (env {env} of service {service}) was not provided")]
    MissingSecret { service: String, env: String, secret: String },
    #[error("revision {revision} of deployment {id} is older than its desired revision {desired}")]
    StaleRevision { id: String, revision: u64, desired: u64 },
    #[error("revision {revision} of deployment {id} was already applied with a different spec")]
    RevisionConflict { id: String, revision: u64 },
    #[error("docker: {context}: {message}")]
    Docker { context: String, message: String },
    #[error("deployment state: {0}")]
    State(String),
}

/// One step of applying, rolling back or removing a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Pulling an image that is not present locally.
    Pulling,
    /// Creating a container.
    Creating,
    /// Starting a container.
    Starting,
    /// Waiting for a container to pass the health gate.
    WaitingForHealth,
    /// A container passed the health gate.
    Healthy,
    /// Stopping (and removing) a container of the revision being replaced.
    StoppingOld,
    /// The revision runs and passed its health gate; nothing left to do.
    Done,
    /// The revision failed (the message says why).
    Failed,
    /// Returning to the last good revision.
    RollingBack,
    /// The last good revision runs again.
    RolledBack,
    /// Removing a container (failed, stray, or of a removed deployment).
    Removing,
    /// The deployment was removed.
    Removed,
}

impl Step {
    /// The step's name in event kinds: `waiting_for_health`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Pulling => "pulling",
            Step::Creating => "creating",
            Step::Starting => "starting",
            Step::WaitingForHealth => "waiting_for_health",
            Step::Healthy => "healthy",
            Step::StoppingOld => "stopping_old",
            Step::Done => "done",
            Step::Failed => "failed",
            Step::RollingBack => "rolling_back",
            Step::RolledBack => "rolled_back",
            Step::Removing => "removing",
            Step::Removed => "removed",
        }
    }
}

/// A step as reported to the caller. `revision` is the revision the step acts on (during a
/// rollback: the revision being returned to). Never holds a secret value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub deployment: String,
    pub revision: u64,
    pub service: Option<String>,
    pub step: Step,
    pub message: String,
}

impl Progress {
    /// The event for this step: kind `deploy.<step>`; `failed` is an Error, `rolling_back`
    /// and `rolled_back` are Warnings, the rest Info. Attributes: `deployment`, `revision`
    /// and, for steps about one service, `service`.
    pub fn to_event(&self) -> Event {
        let severity = match self.step {
            Step::Failed => Severity::Error,
            Step::RollingBack | Step::RolledBack => Severity::Warning,
            _ => Severity::Info,
        };
        let mut attributes = vec![("deployment".to_string(), self.deployment.clone()), ("revision".to_string(), self.revision.to_string())];
        if let Some(service) = &self.service {
            attributes.push(("service".to_string(), service.clone()));
        }
        Event { kind: format!("deploy.{}", self.step.as_str()), severity, message: self.message.clone(), attributes }
    }
}

/// How applying (or reconciling) a deployment ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The revision runs and passed its health gate.
    Healthy { revision: u64 },
    /// Revision `from` failed; the last good revision `to` runs again.
    RolledBack { from: u64, to: u64, failure: FailureReport },
    /// The revision failed and there was no good revision to return to (or returning to it
    /// failed too). Nothing of the failed revision is left running.
    Failed { revision: u64, failure: FailureReport },
}

/// Why a revision failed, with what the agent could gather. Secret values are redacted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureReport {
    /// Lowercase, one line: what went wrong and with which container or image.
    pub reason: String,
    /// The failing container's last exit code, when it exited or restarted.
    pub exit_code: Option<i64>,
    /// The failing container's last log lines (stdout and stderr), at most 20.
    pub last_logs: Vec<String>,
    /// The last health probe's result (HTTP status, connect error, exec output, Docker
    /// health log).
    pub health_output: Option<String>,
}

/// Replaces secret values in text that leaves the executor.
#[derive(Clone, Default)]
pub(crate) struct Redactor {
    values: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} values)", self.values.len())
    }
}

/// What secret values are replaced with.
pub const REDACTED: &str = "[redacted]";

impl Redactor {
    /// A redactor for these secret values (empty ones are ignored).
    pub(crate) fn new<'a>(values: impl IntoIterator<Item = &'a String>) -> Redactor {
        let mut values: Vec<String> = values.into_iter().filter(|v| !v.is_empty()).cloned().collect();
        // Longest first, so a secret containing another is replaced whole.
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        Redactor { values }
    }

    /// `text` with every secret value replaced by [`REDACTED`].
    pub(crate) fn apply(&self, text: &str) -> String {
        let mut out = text.to_string();
        for value in &self.values {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), REDACTED);
            }
        }
        out
    }

    /// The report with every text field redacted.
    pub(crate) fn report(&self, report: FailureReport) -> FailureReport {
        FailureReport {
            reason: self.apply(&report.reason),
            exit_code: report.exit_code,
            last_logs: report.last_logs.iter().map(|l| self.apply(l)).collect(),
            health_output: report.health_output.as_deref().map(|h| self.apply(h)),
        }
    }
}
