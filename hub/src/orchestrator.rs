//! Deployment orchestration: decides which agent should run which revision, pushes
//! revisions to connected agents, records what each agent reports, and rolls changes out
//! all at once or in batches.
//!
//! Desired state lives in the store (deployments and revisions); what each agent reported
//! lives in the store too, so a hub restart loses nothing: when an agent connects it is
//! sent every revision it does not yet report as applied. Pure planning ([`plan`]) is
//! separate from the IO around it.

use crate::secrets::Kind;
use crate::store::{AgentDeployStatus, Deployment, Targets};
use crate::Hub;
use gantry_shared::deploy::{OnFailure, Strategy};
use gantry_shared::message::{DeployCommand, DeployReport, DeployState, HubMessage, RegistryAuth};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// What one agent should be told about one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Deploy { revision: u64 },
    Remove,
}

/// Whether `revision` is settled on an agent that reported `status`.
pub fn settled(status: Option<&AgentDeployStatus>, revision: u64) -> bool {
    status.is_some_and(|s| s.revision >= revision && !matches!(s.state, DeployState::Applying))
}

/// What to tell an agent about a deployment, given what it reported (pure).
pub fn plan(deployment: &Deployment, targeted: bool, allowed_revision: u64, status: Option<&AgentDeployStatus>) -> Action {
    let removed = status.is_none_or(|s| s.state == DeployState::Removed);
    if deployment.deleted_at_ms.is_some() || !targeted {
        return if removed { Action::Nothing } else { Action::Remove };
    }
    if allowed_revision == 0 {
        return Action::Nothing;
    }
    match status {
        Some(s) if s.revision >= allowed_revision && s.state != DeployState::Removed => Action::Nothing,
        _ => Action::Deploy { revision: allowed_revision },
    }
}

/// The deploy command for one targeted agent: the revision's spec with the values of the
/// org secrets it references and the logins of the registries its images come from. A
/// secret deleted since is left out; the agent then fails the revision, naming it.
pub fn deploy_command(hub: &Hub, deployment: &Deployment, revision: u64) -> Option<DeployCommand> {
    let spec = hub.store.revision(&deployment.id, revision).ok().flatten()?.spec;
    let org = &deployment.org;
    let mut secrets = Vec::new();
    for name in spec.secret_names() {
        let Ok(Some(stored)) = hub.store.secret(org, &name) else { continue };
        match hub.secret_box.open(org, Kind::Secret, &name, &stored.sealed) {
            Ok(value) => secrets.push((name, String::from_utf8_lossy(&value).into_owned())),
            Err(error) => warn!(%org, secret = %name, %error, "secret does not open; not sent"),
        }
    }
    let mut registry_auth = Vec::new();
    for server in spec.registries() {
        let Ok(Some(login)) = hub.store.registry_login(org, &server) else { continue };
        match hub.secret_box.open(org, Kind::RegistryPassword, &server, &login.sealed_password) {
            Ok(password) => registry_auth.push(RegistryAuth { server, username: login.username, password: String::from_utf8_lossy(&password).into_owned() }),
            Err(error) => warn!(%org, %server, %error, "registry password does not open; not sent"),
        }
    }
    Some(DeployCommand { deployment_id: deployment.id.clone(), revision, spec, secrets, registry_auth })
}

fn command(hub: &Hub, deployment: &Deployment, revision: u64) -> Option<HubMessage> {
    deploy_command(hub, deployment, revision).map(|c| HubMessage::Deploy(Box::new(c)))
}

/// The revision an agent may run now: the current one, unless a rolling rollout has not
/// reached it yet (then the one it already has).
fn allowed_revision(hub: &Hub, deployment: &Deployment, agent_id: &str) -> u64 {
    let rollout = hub.rollouts.lock().unwrap_or_else(|p| p.into_inner()).get(&deployment.id).cloned();
    match rollout {
        Some(rollout) if rollout.revision == deployment.revision && !rollout.released.contains(agent_id) => {
            hub.store.deploy_status(&deployment.id, agent_id).ok().flatten().map_or(0, |s| s.revision)
        }
        _ => deployment.revision,
    }
}

/// Bring one agent up to date on every deployment of its org.
pub fn sync_agent(hub: &Hub, agent_id: &str, org: &str) {
    let deployments = match hub.store.deployments_of_org_all(org) {
        Ok(d) => d,
        Err(error) => return warn!(%error, "cannot read deployments"),
    };
    for deployment in deployments {
        let targets = resolve_targets(hub, org, &deployment.targets).unwrap_or_default();
        sync_one(hub, &deployment, targets.iter().any(|a| a == agent_id), agent_id);
    }
}

/// Tell one agent what it is missing of one deployment.
fn sync_one(hub: &Hub, deployment: &Deployment, targeted: bool, agent_id: &str) {
    let status = hub.store.deploy_status(&deployment.id, agent_id).ok().flatten();
    let allowed = allowed_revision(hub, deployment, agent_id);
    match plan(deployment, targeted, allowed, status.as_ref()) {
        Action::Nothing => {}
        Action::Deploy { revision } => {
            if let Some(message) = command(hub, deployment, revision) {
                hub.registry.send(agent_id, message);
            }
        }
        Action::Remove => {
            hub.registry.send(agent_id, HubMessage::RemoveDeployment { deployment_id: deployment.id.clone() });
        }
    }
}

/// Bring every connected agent of the org up to date on one deployment.
fn sync_deployment(hub: &Hub, deployment: &Deployment) {
    let targets = resolve_targets(hub, &deployment.org, &deployment.targets).unwrap_or_default();
    for agent in hub.store.agents_of_org(&deployment.org).unwrap_or_default() {
        if hub.registry.is_connected(&agent.id) {
            sync_one(hub, deployment, targets.binary_search(&agent.id).is_ok(), &agent.id);
        }
    }
}

/// The org's agents a target list selects (listed ids plus selector matches), sorted.
pub fn resolve_targets(hub: &Hub, org: &str, targets: &Targets) -> Result<Vec<String>, crate::store::Error> {
    let mut out: Vec<String> = Vec::new();
    for agent in hub.store.agents_of_org(org)? {
        if agent.revoked_at_ms.is_some() {
            continue;
        }
        let listed = targets.agents.contains(&agent.id);
        let selected = !targets.selector.is_empty() && targets.selector.iter().all(|(k, v)| agent.labels.iter().any(|(lk, lv)| lk == k && lv == v));
        if listed || selected {
            out.push(agent.id);
        }
    }
    out.sort();
    Ok(out)
}

/// An agent just connected: send it what it is missing.
pub fn agent_connected(hub: &Hub, agent_id: &str, org: &str) {
    sync_agent(hub, agent_id, org);
}

/// Record an agent's report.
pub fn report(hub: &Hub, agent_id: &str, org: &str, report: DeployReport) {
    let Ok(Some(deployment)) = hub.store.deployment(&report.deployment_id) else { return };
    if deployment.org != org {
        return warn!(deployment = %report.deployment_id, "report about another org's deployment ignored");
    }
    info!(deployment = %report.deployment_id, revision = report.revision, state = ?report.state, "deployment report");
    crate::audit::deploy_report(hub, agent_id, org, &report);
    let status = AgentDeployStatus { revision: report.revision, state: report.state, message: report.message, updated_at_ms: crate::wall_ms() };
    let previous = hub.store.deploy_status(&report.deployment_id, agent_id).ok().flatten();
    if let Err(error) = hub.store.set_deploy_status(&report.deployment_id, agent_id, &status) {
        warn!(%error, "cannot record a deployment report");
    }
    crate::webhooks::deployment_reported(hub, &deployment, agent_id, previous.as_ref(), &status);
    hub.deploy_changes.notify_waiters();
}

/// A deployment changed (created, updated, rolled back, deleted): roll it out.
pub fn changed(hub: &Arc<Hub>, deployment: &Deployment, spec_strategy: Strategy) {
    // Checks scoped to this deployment follow its targets.
    crate::checks::org_changed(hub, &deployment.org);
    let targets = resolve_targets(hub, &deployment.org, &deployment.targets).unwrap_or_default();
    match spec_strategy {
        Strategy::Rolling { batch_size, pause_secs, on_failure } if deployment.deleted_at_ms.is_none() && targets.len() > 1 => {
            set_rollout(hub, &deployment.id, Some(Rollout { revision: deployment.revision, ..Rollout::default() }));
            let hub = hub.clone();
            let deployment = deployment.clone();
            tokio::spawn(async move {
                roll(&hub, &deployment, targets, batch_size.max(1) as usize, Duration::from_secs(pause_secs), on_failure).await;
            });
        }
        _ => {
            set_rollout(hub, &deployment.id, None);
            sync_deployment(hub, deployment);
        }
    }
}

/// A rolling rollout: which agents may take the new revision yet, and whether it stopped
/// on a failed batch. Kept in the store, so a hub restart neither forgets a stopped rollout
/// (and pushes the failed revision everywhere) nor abandons one halfway.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rollout {
    pub revision: u64,
    pub released: std::collections::BTreeSet<String>,
    /// Why the rollout stopped, when a batch failed; `None` while it rolls.
    pub stopped: Option<String>,
}

/// Record (or with `None`, end) the rollout of deployment `id`, in memory and in the store.
fn set_rollout(hub: &Hub, id: &str, rollout: Option<Rollout>) {
    let stored = match &rollout {
        Some(r) => hub.store.put_rollout(id, r),
        None => hub.store.delete_rollout(id),
    };
    if let Err(error) = stored {
        warn!(deployment = %id, %error, "cannot persist the rollout state");
    }
    let mut rollouts = hub.rollouts.lock().unwrap_or_else(|p| p.into_inner());
    match rollout {
        Some(r) => rollouts.insert(id.to_string(), r),
        None => rollouts.remove(id),
    };
}

/// The rollout of deployment `id`, if one is rolling or stopped.
pub fn rollout_of(hub: &Hub, id: &str) -> Option<Rollout> {
    hub.rollouts.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
}

/// After a restart: load the stored rollouts and carry on those still rolling.
pub fn resume(hub: &Arc<Hub>) {
    let stored = match hub.store.rollouts() {
        Ok(stored) => stored,
        Err(error) => return warn!(%error, "cannot read rollouts"),
    };
    for (id, rollout) in stored {
        let deployment = match hub.store.deployment(&id) {
            Ok(Some(d)) if d.revision == rollout.revision && d.deleted_at_ms.is_none() => d,
            _ => {
                set_rollout(hub, &id, None);
                continue;
            }
        };
        let rolling = rollout.stopped.is_none();
        hub.rollouts.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), rollout);
        if !rolling {
            continue;
        }
        let Ok(Some(revision)) = hub.store.revision(&id, deployment.revision) else { continue };
        if let Strategy::Rolling { batch_size, pause_secs, on_failure } = revision.spec.strategy {
            let targets = resolve_targets(hub, &deployment.org, &deployment.targets).unwrap_or_default();
            info!(deployment = %id, revision = deployment.revision, "resuming rolling deployment");
            let hub = hub.clone();
            tokio::spawn(async move {
                roll(&hub, &deployment, targets, batch_size.max(1) as usize, Duration::from_secs(pause_secs), on_failure).await;
            });
        }
    }
}

/// Longest wait for one batch to settle.
pub const BATCH_TIMEOUT: Duration = Duration::from_secs(600);

async fn roll(hub: &Arc<Hub>, deployment: &Deployment, targets: Vec<String>, batch_size: usize, pause: Duration, on_failure: OnFailure) {
    let revision = deployment.revision;
    for (index, batch) in targets.chunks(batch_size).enumerate() {
        if index > 0 && !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        match rollout_of(hub, &deployment.id) {
            Some(mut rollout) if rollout.revision == revision && rollout.stopped.is_none() => {
                if !batch.iter().all(|a| rollout.released.contains(a)) {
                    rollout.released.extend(batch.iter().cloned());
                    set_rollout(hub, &deployment.id, Some(rollout));
                }
            }
            _ => return, // superseded by a newer change
        }
        for agent in batch {
            sync_one(hub, deployment, true, agent);
        }
        let deadline = tokio::time::Instant::now() + BATCH_TIMEOUT;
        let failed = loop {
            let changes = hub.deploy_changes.notified();
            let statuses: Vec<_> = batch.iter().map(|a| hub.store.deploy_status(&deployment.id, a).ok().flatten()).collect();
            if statuses.iter().all(|s| settled(s.as_ref(), revision)) {
                break statuses.iter().any(|s| s.as_ref().is_some_and(|s| !matches!(s.state, DeployState::Healthy)));
            }
            if tokio::time::timeout_at(deadline, changes).await.is_err() {
                break true;
            }
        };
        if failed {
            warn!(deployment = %deployment.id, revision, batch = index, "rolling deployment stopped: a batch failed");
            if rollout_of(hub, &deployment.id).is_some_and(|r| r.revision == revision) {
                let failing: Vec<&str> = batch
                    .iter()
                    .filter(|a| {
                        !hub.store.deploy_status(&deployment.id, a).ok().flatten().is_some_and(|s| s.revision >= revision && s.state == DeployState::Healthy)
                    })
                    .map(String::as_str)
                    .collect();
                let reason = format!("batch {} of revision {revision} failed on {}", index + 1, failing.join(", "));
                let released = rollout_of(hub, &deployment.id).map(|r| r.released).unwrap_or_default();
                set_rollout(hub, &deployment.id, Some(Rollout { revision, released, stopped: Some(reason) }));
            }
            if on_failure == OnFailure::RollbackAll && revision > 1 {
                if let Ok(Some(previous)) = hub.store.revision(&deployment.id, revision - 1) {
                    let next = crate::store::Revision {
                        revision: revision + 1,
                        spec: previous.spec.clone(),
                        targets: previous.targets,
                        created_by: "gantry (rolling deployment failed)".into(),
                        created_at_ms: crate::wall_ms(),
                        change: format!("automatic rollback to {}", revision - 1),
                    };
                    if let Ok(updated) = hub.store.add_revision(&deployment.id, revision, &next, next.created_at_ms) {
                        changed(hub, &updated, Strategy::AllAtOnce);
                    }
                }
            }
            return;
        }
    }
    if rollout_of(hub, &deployment.id).is_some_and(|r| r.revision == revision) {
        set_rollout(hub, &deployment.id, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(revision: u64, deleted: bool) -> Deployment {
        Deployment {
            id: "dep_1".into(),
            org: "acme".into(),
            name: "web".into(),
            targets: Targets::default(),
            revision,
            created_at_ms: 0,
            updated_at_ms: 0,
            deleted_at_ms: deleted.then_some(1),
        }
    }

    fn status(revision: u64, state: DeployState) -> AgentDeployStatus {
        AgentDeployStatus { revision, state, message: String::new(), updated_at_ms: 0 }
    }

    #[test]
    fn plans_what_each_agent_is_missing() {
        let d = deployment(3, false);
        assert_eq!(plan(&d, true, 3, None), Action::Deploy { revision: 3 });
        assert_eq!(plan(&d, true, 3, Some(&status(2, DeployState::Healthy))), Action::Deploy { revision: 3 });
        assert_eq!(plan(&d, true, 3, Some(&status(3, DeployState::Healthy))), Action::Nothing);
        // A rolled-back agent reported on revision 3: it is not asked again and again.
        assert_eq!(plan(&d, true, 3, Some(&status(3, DeployState::RolledBack { to: 2 }))), Action::Nothing);
        // Held back by a rolling rollout at revision 2.
        assert_eq!(plan(&d, true, 2, Some(&status(2, DeployState::Healthy))), Action::Nothing);
        // No longer targeted, or deleted: remove once, then nothing.
        assert_eq!(plan(&d, false, 3, Some(&status(3, DeployState::Healthy))), Action::Remove);
        assert_eq!(plan(&deployment(3, true), true, 3, Some(&status(3, DeployState::Healthy))), Action::Remove);
        assert_eq!(plan(&deployment(3, true), true, 3, Some(&status(3, DeployState::Removed))), Action::Nothing);
        assert_eq!(plan(&deployment(3, true), true, 3, None), Action::Nothing);
        // Re-added after a removal: deployed again.
        assert_eq!(plan(&d, true, 3, Some(&status(3, DeployState::Removed))), Action::Deploy { revision: 3 });
    }

    #[test]
    fn settled_means_reported_on_the_revision_and_done() {
        assert!(!settled(None, 2));
        assert!(!settled(Some(&status(2, DeployState::Applying)), 2));
        assert!(!settled(Some(&status(1, DeployState::Healthy)), 2));
        assert!(settled(Some(&status(2, DeployState::Failed)), 2));
        assert!(settled(Some(&status(2, DeployState::Healthy)), 2));
    }
}
