//! The executor: turns a deployment revision into running, health-gated containers and
//! rolls back to the last good revision when it fails.
//!
//! Containers are named `gantry-<id>-<service>-r<revision>` and carry the labels
//! `io.gantry.deployment`, `io.gantry.service`, `io.gantry.revision` and
//! `io.gantry.spec-sha256` (a digest of the service spec, without secret values) besides the
//! user's. The executor finds its containers by the deployment label only, and adopts a
//! container only when revision, service and digest all match; anything else labelled with
//! the deployment is a stray and is removed. So applying twice, or reconciling after a
//! crash at any point, never creates duplicates.
//!
//! Converging to a revision: pull missing images (while the old revision still runs), for
//! `StopFirst` stop the old containers, create and start the new ones (or adopt existing
//! ones), health-gate them ([`super::health`]), then stop and remove the old revision. On
//! any failure: remove the failed revision's containers and bring the last good revision
//! back (start its stopped containers, recreate missing ones), gated as well.
//!
//! One operation at a time per deployment (an async lock per id); different deployments
//! converge concurrently. This module must not shell out or use the docker CLI, must not
//! touch containers without its deployment label, and must not let a secret value reach a
//! message, a report, an error or the state JSON.

use super::health::{self, Watched};
use super::state::{DeploymentState, RevisionSpec, SecretFile, Store};
use super::{Error, FailureReport, Outcome, Progress, Redactor, Step};
use bollard::auth::DockerCredentials;
use bollard::models::{
    ContainerCreateBody, ContainerStateStatusEnum, ContainerSummaryStateEnum, HostConfig, Mount as DockerMount, MountType, PortBinding,
    RestartPolicy as DockerRestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions, StartContainerOptions,
    StopContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use gantry_shared::deploy::{DeploymentSpec, Protocol, RestartPolicy, ServiceSpec, UpdateOrder, LABEL_DEPLOYMENT, LABEL_REVISION, LABEL_SERVICE};
use gantry_shared::message::RegistryAuth;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tracing::info;

/// Label with the SHA-256 (hex) of the service spec a container was created from.
pub const LABEL_SPEC: &str = "io.gantry.spec-sha256";
/// Longest time an image pull may take.
const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Log lines kept in a failure report.
const LOG_LINES: usize = 20;
/// Longest log line kept in a failure report, in bytes.
const MAX_LOG_LINE: usize = 1000;
/// How long reading a failed container's logs may take.
const LOGS_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest stop grace period a spec may ask for (see `DeploymentSpec::validate`).
const MAX_STOP_GRACE_SECS: u64 = 3600;

/// Applies deployments to the local Docker engine. See the module documentation.
#[derive(Debug)]
pub struct Executor {
    docker: Docker,
    store: Store,
    /// The persisted states, as last written.
    states: Mutex<BTreeMap<String, DeploymentState>>,
    /// One lock per deployment: one operation at a time on it.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Registry logins from the hub, by registry host; in memory only (the hub sends them
    /// again with every deploy command).
    registry_auth: Mutex<HashMap<String, RegistryAuth>>,
    /// The agent id this executor acts for (`LABEL_AGENT`); empty: no owner label.
    owner: String,
}

/// A container of a deployment, as listed.
#[derive(Debug, Clone)]
struct Owned {
    id: String,
    name: String,
    service: Option<String>,
    revision: Option<u64>,
    spec_hash: Option<String>,
    running: bool,
}

/// Adopted containers by (revision, service).
type Matched = BTreeMap<(u64, String), Owned>;

/// One operation's reporting: redacts, logs and passes each step on.
struct Run<'a> {
    id: String,
    redactor: Redactor,
    progress: &'a mut (dyn FnMut(Progress) + Send),
}

impl Run<'_> {
    fn emit(&mut self, revision: u64, service: Option<&str>, step: Step, message: impl AsRef<str>) {
        let message = self.redactor.apply(message.as_ref());
        info!(deployment = %self.id, revision, service = service.unwrap_or(""), step = step.as_str(), "{message}");
        (self.progress)(Progress { deployment: self.id.clone(), revision, service: service.map(String::from), step, message });
    }
}

/// The name of a service's container in a revision.
pub fn container_name(id: &str, service: &str, revision: u64) -> String {
    format!("gantry-{id}-{service}-r{revision}")
}

/// Label naming the agent that owns a container, so agents sharing one Docker engine
/// never adopt or remove each other's containers.
pub const LABEL_AGENT: &str = "io.gantry.agent";

/// The name of `owner`'s container for a service in a revision: [`container_name`] with
/// the owner id's last 8 characters appended (names are unique per Docker engine).
fn owned_name(owner: &str, id: &str, service: &str, revision: u64) -> String {
    let name = container_name(id, service, revision);
    if owner.is_empty() {
        return name;
    }
    let suffix = owner.get(owner.len().saturating_sub(8)..).unwrap_or(owner);
    format!("{name}-{suffix}")
}

/// SHA-256 (hex) of a service spec; secrets are references in it, never values.
pub fn service_hash(service: &ServiceSpec) -> String {
    let bytes = serde_json::to_vec(service).unwrap_or_default();
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `id` can name a deployment (it is part of container and file names).
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
}

fn check_id(id: &str) -> Result<(), Error> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(Error::InvalidId(id.to_string()))
    }
}

/// Docker's own message for an API error.
fn docker_message(error: &bollard::errors::Error) -> String {
    match error {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.trim().to_string(),
        other => other.to_string(),
    }
}

fn docker_error(context: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> Error {
    let context = context.into();
    move |error| Error::Docker { context, message: docker_message(&error) }
}

/// The values of the secrets `spec` references, from `secrets`; each must be there.
fn resolve_secrets(spec: &DeploymentSpec, secrets: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, Error> {
    let mut resolved = BTreeMap::new();
    for service in &spec.services {
        for var in &service.env {
            if let Some(name) = &var.secret {
                let value =
                    secrets.get(name).ok_or_else(|| Error::MissingSecret { service: service.name.clone(), env: var.name.clone(), secret: name.clone() })?;
                resolved.insert(name.clone(), value.clone());
            }
        }
    }
    Ok(resolved)
}

/// Whether an image reference names a tag or digest (else Docker would pull every tag).
fn has_tag_or_digest(image: &str) -> bool {
    image.contains('@') || image.rsplit('/').next().is_some_and(|last| last.contains(':'))
}

/// The container configuration of a service in a revision. Fails (with a message naming
/// no value) when a secret value is missing.
pub(crate) fn container_body(id: &str, revision: u64, service: &ServiceSpec, secrets: &BTreeMap<String, String>) -> Result<ContainerCreateBody, String> {
    let mut env = Vec::with_capacity(service.env.len());
    for var in &service.env {
        let value = match (&var.value, &var.secret) {
            (Some(value), _) => value.clone(),
            (None, Some(secret)) => secrets
                .get(secret)
                .cloned()
                .ok_or_else(|| format!("secret {secret:?} (env {} of service {}) is not available on this agent", var.name, service.name))?,
            (None, None) => String::new(),
        };
        env.push(format!("{}={value}", var.name));
    }
    let mut labels: HashMap<String, String> = service.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    labels.insert(LABEL_DEPLOYMENT.to_string(), id.to_string());
    labels.insert(LABEL_SERVICE.to_string(), service.name.clone());
    labels.insert(LABEL_REVISION.to_string(), revision.to_string());
    labels.insert(LABEL_SPEC.to_string(), service_hash(service));

    let mut exposed = Vec::new();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for port in &service.ports {
        let proto = match port.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let key = format!("{}/{proto}", port.container);
        if !exposed.contains(&key) {
            exposed.push(key.clone());
        }
        let binding = PortBinding { host_ip: port.host_ip.clone(), host_port: Some(port.host.to_string()) };
        bindings.entry(key).or_insert_with(|| Some(Vec::new())).get_or_insert_with(Vec::new).push(binding);
    }
    let mounts: Vec<DockerMount> = service
        .mounts
        .iter()
        .map(|m| DockerMount {
            target: Some(m.target.clone()),
            source: Some(m.source.clone()),
            typ: Some(if m.source.starts_with('/') { MountType::BIND } else { MountType::VOLUME }),
            read_only: Some(m.read_only),
            ..Default::default()
        })
        .collect();
    let restart = match service.restart {
        RestartPolicy::No => RestartPolicyNameEnum::NO,
        RestartPolicy::Always => RestartPolicyNameEnum::ALWAYS,
        RestartPolicy::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
        RestartPolicy::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
    };
    let host_config = HostConfig {
        port_bindings: (!bindings.is_empty()).then_some(bindings),
        mounts: (!mounts.is_empty()).then_some(mounts),
        restart_policy: Some(DockerRestartPolicy { name: Some(restart), maximum_retry_count: None }),
        memory: service.memory_bytes.map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
        nano_cpus: service.cpus.map(|c| (c * 1e9).round() as i64),
        ..Default::default()
    };
    Ok(ContainerCreateBody {
        image: Some(service.image.clone()),
        entrypoint: service.entrypoint.clone(),
        cmd: service.command.clone(),
        env: (!env.is_empty()).then_some(env),
        labels: Some(labels),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        stop_timeout: Some(i64::try_from(service.stop_grace_secs).unwrap_or(i64::MAX)),
        host_config: Some(host_config),
        ..Default::default()
    })
}

/// Split the deployment's containers into those to keep (revision, service and spec digest
/// match one of `keep`; one per revision and service) and strays (everything else,
/// including duplicates). Among duplicates the one with the canonical name wins, then a
/// running one.
fn classify(id: &str, owner: &str, owned: Vec<Owned>, keep: &[&RevisionSpec]) -> (Matched, Vec<Owned>) {
    let mut matched = Matched::new();
    let mut strays = Vec::new();
    for container in owned {
        let key = match (container.revision, container.service.as_deref()) {
            (Some(revision), Some(service)) => keep
                .iter()
                .filter(|rs| rs.revision == revision)
                .flat_map(|rs| rs.spec.services.iter())
                .any(|s| s.name == service && container.spec_hash.as_deref() == Some(service_hash(s).as_str()))
                .then(|| (revision, service.to_string())),
            _ => None,
        };
        let Some(key) = key else {
            strays.push(container);
            continue;
        };
        let canonical = owned_name(owner, id, &key.1, key.0);
        let rank = |c: &Owned| (c.name == canonical, c.running);
        match matched.get(&key) {
            Some(existing) if rank(existing) >= rank(&container) => strays.push(container),
            _ => {
                if let Some(loser) = matched.insert(key, container) {
                    strays.push(loser);
                }
            }
        }
    }
    (matched, strays)
}

/// The stop grace period of a container's service, from the specs that know it.
fn grace_of(container: &Owned, specs: &[&RevisionSpec]) -> Option<u64> {
    specs
        .iter()
        .filter(|rs| Some(rs.revision) == container.revision)
        .flat_map(|rs| rs.spec.services.iter())
        .find(|s| Some(s.name.as_str()) == container.service.as_deref())
        .map(|s| s.stop_grace_secs)
}

impl Executor {
    /// An executor keeping its state in `state_dir/deployments` (created, mode 0700). Loads
    /// the persisted deployments; [`Executor::reconcile`] then brings Docker in line.
    pub fn new(docker: Docker, state_dir: &Path) -> Result<Executor, Error> {
        Executor::for_owner(docker, state_dir, "")
    }

    /// An executor acting for agent `owner`: its containers carry `LABEL_AGENT=owner` and
    /// a name suffix, and it touches no container of another owner.
    pub fn for_owner(docker: Docker, state_dir: &Path, owner: &str) -> Result<Executor, Error> {
        let store = Store::open(state_dir)?;
        let states = store.load_all()?.into_iter().map(|s| (s.id.clone(), s)).collect();
        Ok(Executor {
            docker,
            store,
            states: Mutex::new(states),
            locks: Mutex::new(HashMap::new()),
            registry_auth: Mutex::new(HashMap::new()),
            owner: owner.to_string(),
        })
    }

    /// The name of this owner's container for a service in a revision.
    pub fn container_name(&self, id: &str, service: &str, revision: u64) -> String {
        owned_name(&self.owner, id, service, revision)
    }

    /// What the executor knows about deployment `id` (as persisted).
    pub fn status(&self, id: &str) -> Option<DeploymentState> {
        self.states.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// The ids of every persisted deployment.
    pub fn deployments(&self) -> Vec<String> {
        self.states.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).entry(id.to_string()).or_default().clone()
    }

    fn persist(&self, state: &DeploymentState) -> Result<(), Error> {
        self.store.save(state)?;
        self.states.lock().unwrap_or_else(|p| p.into_inner()).insert(state.id.clone(), state.clone());
        Ok(())
    }

    /// Apply revision `revision` of deployment `id`: persist it as desired, then converge
    /// to it. `secrets` resolves the spec's `secret` env vars (each must be there).
    /// `progress` receives each step. Applying the revision that already runs and is
    /// healthy does nothing but report `Done`.
    ///
    /// Errors: an invalid id or spec, a missing secret, a revision older than the desired
    /// one or a known revision number with a different spec (nothing changed then), and
    /// Docker or the state directory failing (the desired revision is persisted; a later
    /// [`Executor::reconcile`] continues). A revision failing its health gate is an
    /// [`Outcome`], not an error.
    pub async fn apply(
        &self,
        id: &str,
        revision: u64,
        spec: &DeploymentSpec,
        secrets: &BTreeMap<String, String>,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<Outcome, Error> {
        check_id(id)?;
        let problems = spec.validate();
        if !problems.is_empty() {
            return Err(Error::InvalidSpec(problems.join("; ")));
        }
        let resolved = resolve_secrets(spec, secrets)?;
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let previous = self.status(id).filter(|s| !s.removing);
        if let Some(previous) = &previous {
            if revision < previous.desired.revision {
                return Err(Error::StaleRevision { id: id.to_string(), revision, desired: previous.desired.revision });
            }
            let known = [Some(&previous.desired), previous.last_good.as_ref()];
            if known.into_iter().flatten().any(|k| k.revision == revision && k.spec != *spec) {
                return Err(Error::RevisionConflict { id: id.to_string(), revision });
            }
        }
        let mut secret_file = self.store.load_secrets(id);
        let redactor = Redactor::new(resolved.values().chain(secret_file.revisions.values().flat_map(|s| s.values())));
        let mut run = Run { id: id.to_string(), redactor, progress };
        let target = RevisionSpec { revision, spec: spec.clone() };

        if let Some(previous) = &previous {
            if previous.current == Some(revision) && previous.desired.revision == revision && self.converged(id, &target).await? {
                run.emit(revision, None, Step::Done, format!("revision {revision} already runs and is healthy"));
                return Ok(Outcome::Healthy { revision });
            }
        }
        let mut state = previous.unwrap_or_else(|| DeploymentState::new(id, target.clone()));
        state.desired = target.clone();
        state.failed = None;
        secret_file.revisions.insert(revision, resolved);
        secret_file.prune(&state);
        // Secrets first: the state never names a revision whose secrets are not on disk.
        self.store.save_secrets(id, &secret_file)?;
        self.persist(&state)?;
        self.converge(&mut state, target, &secret_file, &mut run).await
    }

    /// Stop and remove every container of deployment `id` and forget its state. Removing
    /// an unknown deployment removes any containers labelled with it and succeeds.
    pub async fn remove(&self, id: &str, progress: &mut (dyn FnMut(Progress) + Send)) -> Result<(), Error> {
        check_id(id)?;
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        self.remove_locked(id, progress).await
    }

    async fn remove_locked(&self, id: &str, progress: &mut (dyn FnMut(Progress) + Send)) -> Result<(), Error> {
        let state = self.status(id);
        let secrets = self.store.load_secrets(id);
        let redactor = Redactor::new(secrets.revisions.values().flat_map(|s| s.values()));
        let mut run = Run { id: id.to_string(), redactor, progress };
        let revision = state.as_ref().map(|s| s.desired.revision).unwrap_or(0);
        // Mark first: a crash from here on is finished by the next reconcile.
        if let Some(mut state) = state.clone().filter(|s| !s.removing) {
            state.removing = true;
            self.persist(&state)?;
        }
        let specs: Vec<&RevisionSpec> = state.iter().flat_map(|s| std::iter::once(&s.desired).chain(s.last_good.as_ref())).collect();
        for container in self.list_owned(id).await? {
            run.emit(container.revision.unwrap_or(revision), container.service.as_deref(), Step::Removing, format!("removing container {}", container.name));
            if container.running {
                self.stop(&container.id, grace_of(&container, &specs)).await;
            }
            self.remove_container(&container.id).await?;
        }
        self.store.forget(id)?;
        self.states.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        run.emit(revision, None, Step::Removed, format!("deployment {id} removed"));
        Ok(())
    }

    /// Run deployment `id`'s last good revision again from fresh containers: stop and
    /// remove every container of the deployment, then create, start and health-gate the
    /// last good revision's (a health check's remediation, for containers that run but do
    /// not work). Errors: an unknown deployment, one without a good revision, Docker or the
    /// state directory failing.
    pub async fn redeploy(&self, id: &str, progress: &mut (dyn FnMut(Progress) + Send)) -> Result<Outcome, Error> {
        check_id(id)?;
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let Some(mut state) = self.status(id).filter(|s| !s.removing) else {
            return Err(Error::State(format!("deployment {id} is not known to this agent")));
        };
        let Some(good) = state.last_good.clone() else {
            return Err(Error::State(format!("deployment {id} has no good revision to redeploy")));
        };
        let secrets = self.store.load_secrets(id);
        let redactor = Redactor::new(secrets.revisions.values().flat_map(|s| s.values()));
        let mut run = Run { id: id.to_string(), redactor, progress };
        let specs: Vec<&RevisionSpec> = std::iter::once(&state.desired).chain(state.last_good.as_ref()).collect();
        for container in self.list_owned(id).await? {
            let revision = container.revision.unwrap_or(good.revision);
            run.emit(
                revision,
                container.service.as_deref(),
                Step::Removing,
                format!("removing container {} to redeploy revision {}", container.name, good.revision),
            );
            if container.running {
                self.stop(&container.id, grace_of(&container, &specs)).await;
            }
            self.remove_container(&container.id).await?;
        }
        self.converge(&mut state, good, &secrets, &mut run).await
    }

    /// After an agent restart: for every persisted deployment adopt its containers, remove
    /// strays (other revisions, duplicates, changed specs) and converge to the desired
    /// revision, or to the last good one when the desired one failed. Finishes removals cut
    /// short. Idempotent: a deployment that already runs healthy is left alone.
    pub async fn reconcile(&self, progress: &mut (dyn FnMut(Progress) + Send)) -> Result<Vec<(String, Outcome)>, Error> {
        let mut outcomes = Vec::new();
        for id in self.deployments() {
            let lock = self.lock_for(&id);
            let _guard = lock.lock().await;
            let Some(mut state) = self.status(&id) else { continue };
            if state.removing {
                self.remove_locked(&id, &mut *progress).await?;
                continue;
            }
            let secrets = self.store.load_secrets(&id);
            let redactor = Redactor::new(secrets.revisions.values().flat_map(|s| s.values()));
            let mut run = Run { id: id.clone(), redactor, progress: &mut *progress };
            let outcome = match state.target().cloned() {
                None => {
                    let revision = state.desired.revision;
                    for container in self.list_owned(&id).await? {
                        run.emit(revision, container.service.as_deref(), Step::Removing, format!("removing container {}", container.name));
                        self.remove_container(&container.id).await?;
                    }
                    let reason = format!("revision {revision} failed earlier and there is no good revision to run");
                    run.emit(revision, None, Step::Failed, &reason);
                    if state.current.take().is_some() {
                        self.persist(&state)?;
                    }
                    Outcome::Failed { revision, failure: FailureReport { reason, ..Default::default() } }
                }
                Some(target) => {
                    if state.current == Some(target.revision) && self.converged(&id, &target).await? {
                        run.emit(target.revision, None, Step::Done, format!("revision {} runs and is healthy", target.revision));
                        Outcome::Healthy { revision: target.revision }
                    } else {
                        self.converge(&mut state, target, &secrets, &mut run).await?
                    }
                }
            };
            outcomes.push((id, outcome));
        }
        Ok(outcomes)
    }

    /// Whether exactly the target's containers exist, run and pass one probe each.
    async fn converged(&self, id: &str, target: &RevisionSpec) -> Result<bool, Error> {
        let owned = self.list_owned(id).await?;
        let (matched, strays) = classify(id, &self.owner, owned, &[target]);
        if !strays.is_empty() || matched.len() != target.spec.services.len() {
            return Ok(false);
        }
        for service in &target.spec.services {
            let Some(container) = matched.get(&(target.revision, service.name.clone())) else { return Ok(false) };
            let watched = Watched {
                id: container.id.clone(),
                name: container.name.clone(),
                service: service.name.clone(),
                check: service.health.clone(),
                ports: service.ports.clone(),
                started: Instant::now(),
                restarts: None,
            };
            if !container.running || !health::probe_once(&self.docker, &watched).await {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Converge deployment `state.id` to `target`, rolling back on failure.
    async fn converge(&self, state: &mut DeploymentState, target: RevisionSpec, secrets: &SecretFile, run: &mut Run<'_>) -> Result<Outcome, Error> {
        let id = state.id.clone();
        let revision = target.revision;
        let old = state.last_good.clone().filter(|g| g.revision != revision);
        let keep: Vec<&RevisionSpec> = std::iter::once(&target).chain(old.as_ref()).collect();
        let (mut matched, strays) = classify(&id, &self.owner, self.list_owned(&id).await?, &keep);
        self.remove_strays(strays, &keep, revision, run).await?;

        // Images first, while the old revision still serves.
        for service in &target.spec.services {
            if !matched.contains_key(&(revision, service.name.clone())) {
                if let Err(reason) = self.ensure_image(&service.image, revision, &service.name, run).await {
                    let report = FailureReport { reason, ..Default::default() };
                    return self.fail(state, &target, old, report, secrets, run).await;
                }
            }
        }
        let old_containers: Vec<Owned> = match &old {
            Some(old) => matched.iter().filter(|((r, _), _)| *r == old.revision).map(|(_, c)| c.clone()).collect(),
            None => Vec::new(),
        };
        let old_specs: Vec<&RevisionSpec> = old.iter().collect();
        if target.spec.order == UpdateOrder::StopFirst {
            for container in old_containers.iter().filter(|c| c.running) {
                let from = container.revision.unwrap_or(0);
                run.emit(
                    from,
                    container.service.as_deref(),
                    Step::StoppingOld,
                    format!("stopping container {} of revision {from} before starting revision {revision}", container.name),
                );
                self.stop(&container.id, grace_of(container, &old_specs)).await;
            }
        }
        let watched = match self.bring_up(&id, &target, &secrets.of(revision), &mut matched, run).await {
            Ok(watched) => watched,
            Err(report) => return self.fail(state, &target, old, report, secrets, run).await,
        };
        if let Err(report) = self.health_gate(&target, &watched, run).await {
            return self.fail(state, &target, old, report, secrets, run).await;
        }
        for container in &old_containers {
            let from = container.revision.unwrap_or(0);
            run.emit(from, container.service.as_deref(), Step::StoppingOld, format!("stopping container {} of revision {from}", container.name));
            self.stop(&container.id, grace_of(container, &old_specs)).await;
            self.remove_container(&container.id).await?;
        }
        state.current = Some(revision);
        state.last_good = Some(target.clone());
        if state.desired.revision == revision {
            state.failed = None;
        }
        let mut secrets = secrets.clone();
        secrets.prune(state);
        self.persist(state)?;
        self.store.save_secrets(&id, &secrets)?;
        run.emit(revision, None, Step::Done, format!("revision {revision} runs and is healthy"));
        Ok(Outcome::Healthy { revision })
    }

    /// `target` failed with `report`: take it down and return to `old` if there is one.
    async fn fail(
        &self,
        state: &mut DeploymentState,
        target: &RevisionSpec,
        old: Option<RevisionSpec>,
        report: FailureReport,
        secrets: &SecretFile,
        run: &mut Run<'_>,
    ) -> Result<Outcome, Error> {
        let id = state.id.clone();
        let revision = target.revision;
        let report = run.redactor.report(report);
        run.emit(revision, None, Step::Failed, format!("revision {revision} failed: {}", report.reason));
        for container in self.list_owned(&id).await? {
            // With nothing to return to, nothing of this deployment may keep running.
            if old.is_some() && container.revision != Some(revision) {
                continue;
            }
            run.emit(
                container.revision.unwrap_or(revision),
                container.service.as_deref(),
                Step::Removing,
                format!("removing container {} of failed revision {revision}", container.name),
            );
            self.remove_container(&container.id).await?;
        }
        if state.desired.revision == revision {
            state.failed = Some(revision);
        }
        state.current = None;
        self.persist(state)?;
        let Some(old) = old else {
            return Ok(Outcome::Failed { revision, failure: report });
        };
        let to = old.revision;
        run.emit(to, None, Step::RollingBack, format!("rolling back from revision {revision} to revision {to}"));
        match self.restore(&id, &old, secrets, run).await? {
            Ok(()) => {
                state.current = Some(to);
                self.persist(state)?;
                run.emit(to, None, Step::RolledBack, format!("rolled back from revision {revision} to revision {to}"));
                Ok(Outcome::RolledBack { from: revision, to, failure: report })
            }
            Err(rollback) => {
                let rollback = run.redactor.report(rollback);
                run.emit(to, None, Step::Failed, format!("rolling back to revision {to} failed: {}", rollback.reason));
                let mut failure = report;
                failure.reason = format!("{}; rolling back to revision {to} failed too: {}", failure.reason, rollback.reason);
                Ok(Outcome::Failed { revision, failure })
            }
        }
    }

    /// Bring the last good revision back: adopt, start or recreate its containers and gate
    /// them. The inner error is why it did not come back (its containers are left for
    /// Docker's restart policy and the next reconcile).
    async fn restore(&self, id: &str, good: &RevisionSpec, secrets: &SecretFile, run: &mut Run<'_>) -> Result<Result<(), FailureReport>, Error> {
        let (mut matched, strays) = classify(id, &self.owner, self.list_owned(id).await?, &[good]);
        self.remove_strays(strays, &[good], good.revision, run).await?;
        for service in &good.spec.services {
            if !matched.contains_key(&(good.revision, service.name.clone())) {
                if let Err(reason) = self.ensure_image(&service.image, good.revision, &service.name, run).await {
                    return Ok(Err(FailureReport { reason, ..Default::default() }));
                }
            }
        }
        let watched = match self.bring_up(id, good, &secrets.of(good.revision), &mut matched, run).await {
            Ok(watched) => watched,
            Err(report) => return Ok(Err(report)),
        };
        Ok(self.health_gate(good, &watched, run).await)
    }

    async fn remove_strays(&self, strays: Vec<Owned>, specs: &[&RevisionSpec], revision: u64, run: &mut Run<'_>) -> Result<(), Error> {
        for container in strays {
            let what = match container.revision {
                Some(r) => format!("revision {r}"),
                None => "no revision".to_string(),
            };
            run.emit(
                container.revision.unwrap_or(revision),
                container.service.as_deref(),
                Step::Removing,
                format!("removing stray container {} ({what})", container.name),
            );
            if container.running {
                self.stop(&container.id, grace_of(&container, specs)).await;
            }
            self.remove_container(&container.id).await?;
        }
        Ok(())
    }

    /// Create (unless adopted) and start the containers of `rs`; the started ones to gate.
    async fn bring_up(
        &self,
        id: &str,
        rs: &RevisionSpec,
        secrets: &BTreeMap<String, String>,
        matched: &mut Matched,
        run: &mut Run<'_>,
    ) -> Result<Vec<Watched>, FailureReport> {
        let revision = rs.revision;
        let mut watched = Vec::new();
        for service in &rs.spec.services {
            let watch = |id: String, name: String, started: Instant, restarts: Option<i64>| Watched {
                id,
                name,
                service: service.name.clone(),
                check: service.health.clone(),
                ports: service.ports.clone(),
                started,
                restarts,
            };
            let (container, name, restarts) = match matched.remove(&(revision, service.name.clone())) {
                Some(existing) if existing.running => {
                    watched.push(watch(existing.id, existing.name, Instant::now(), None));
                    continue;
                }
                Some(existing) => (existing.id, existing.name, None),
                None => {
                    let name = self.container_name(id, &service.name, revision);
                    run.emit(revision, Some(&service.name), Step::Creating, format!("creating container {name} from image {}", service.image));
                    let container =
                        self.create(&name, id, revision, service, secrets).await.map_err(|reason| FailureReport { reason, ..Default::default() })?;
                    (container, name, Some(0))
                }
            };
            run.emit(revision, Some(&service.name), Step::Starting, format!("starting container {name}"));
            let started = Instant::now();
            if let Err(error) = self.docker.start_container(&container, None::<StartContainerOptions>).await {
                let reason = format!("starting container {name} failed: {}", docker_message(&error));
                return Err(self.report(&container, reason, None, None).await);
            }
            watched.push(watch(container, name, started, restarts));
        }
        Ok(watched)
    }

    /// Gate `watched` (containers of `rs`), reporting each step.
    async fn health_gate(&self, rs: &RevisionSpec, watched: &[Watched], run: &mut Run<'_>) -> Result<(), FailureReport> {
        let revision = rs.revision;
        let gate = rs.spec.health_gate;
        for w in watched {
            run.emit(
                revision,
                Some(&w.service),
                Step::WaitingForHealth,
                format!("waiting for container {} to stay healthy for {}s (deadline {}s)", w.name, gate.min_healthy_secs, gate.deadline_secs),
            );
        }
        let result = health::gate(&self.docker, watched, gate, &mut |w: &Watched| {
            run.emit(revision, Some(&w.service), Step::Healthy, format!("container {} is healthy", w.name));
        })
        .await;
        match result {
            Ok(()) => Ok(()),
            Err(failure) => {
                let container = watched.get(failure.index).map(|w| w.id.clone()).unwrap_or_default();
                Err(self.report(&container, failure.reason, failure.exit_code, failure.health_output).await)
            }
        }
    }

    /// A failure report about `container`, with its exit code (when it is not running)
    /// and last log lines. Not redacted yet.
    async fn report(&self, container: &str, reason: String, exit_code: Option<i64>, health_output: Option<String>) -> FailureReport {
        let mut exit_code = exit_code;
        if exit_code.is_none() && !container.is_empty() {
            if let Ok(inspect) = self.docker.inspect_container(container, None::<InspectContainerOptions>).await {
                let state = inspect.state.unwrap_or_default();
                let stopped =
                    matches!(state.status, Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD | ContainerStateStatusEnum::RESTARTING));
                if stopped || state.exit_code.is_some_and(|c| c != 0) {
                    exit_code = state.exit_code;
                }
            }
        }
        let last_logs = if container.is_empty() { Vec::new() } else { self.last_logs(container).await };
        FailureReport { reason, exit_code, last_logs, health_output }
    }

    /// The container's last [`LOG_LINES`] lines of stdout and stderr.
    async fn last_logs(&self, container: &str) -> Vec<String> {
        let options = LogsOptions { stdout: true, stderr: true, tail: LOG_LINES.to_string(), ..Default::default() };
        let mut stream = self.docker.logs(container, Some(options));
        let mut lines = Vec::new();
        let read = async {
            while let Some(Ok(output)) = stream.next().await {
                let text = String::from_utf8_lossy(&output.into_bytes()).to_string();
                for line in text.split('\n') {
                    let line = line.trim_end_matches('\r');
                    if !line.is_empty() {
                        let mut end = line.len().min(MAX_LOG_LINE);
                        while !line.is_char_boundary(end) {
                            end -= 1;
                        }
                        lines.push(line[..end].to_string());
                    }
                }
            }
        };
        let _ = tokio::time::timeout(LOGS_TIMEOUT, read).await;
        let skip = lines.len().saturating_sub(LOG_LINES);
        lines.split_off(skip)
    }

    /// Remember registry logins for later pulls (replacing earlier ones for the same hosts).
    pub fn set_registry_auth(&self, logins: &[RegistryAuth]) {
        let mut known = self.registry_auth.lock().unwrap_or_else(|p| p.into_inner());
        for login in logins {
            known.insert(login.server.clone(), login.clone());
        }
    }

    /// Docker credentials for pulling `image`, when the hub sent a login for its registry.
    fn credentials_for(&self, image: &str) -> Option<DockerCredentials> {
        let server = gantry_shared::deploy::registry_of(image);
        let known = self.registry_auth.lock().unwrap_or_else(|p| p.into_inner());
        let login = known.get(&server)?;
        Some(DockerCredentials {
            username: Some(login.username.clone()),
            password: Some(login.password.clone()),
            serveraddress: Some(if server == gantry_shared::deploy::DOCKER_HUB { "https://index.docker.io/v1/".to_string() } else { server }),
            ..Default::default()
        })
    }

    /// Make sure `image` is present: use it when it is, else pull it (with the login for
    /// its registry, when there is one).
    async fn ensure_image(&self, image: &str, revision: u64, service: &str, run: &mut Run<'_>) -> Result<(), String> {
        match self.docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(error) if crate::collector::docker::is_gone(&error) => {}
            Err(error) => return Err(format!("inspecting image {image} failed: {}", docker_message(&error))),
        }
        run.emit(revision, Some(service), Step::Pulling, format!("pulling image {image}"));
        let options =
            CreateImageOptions { from_image: Some(image.to_string()), tag: (!has_tag_or_digest(image)).then(|| "latest".to_string()), ..Default::default() };
        let pull = async {
            let mut stream = self.docker.create_image(Some(options), None, self.credentials_for(image));
            while let Some(item) = stream.next().await {
                item.map_err(|e| docker_message(&e))?;
            }
            Ok::<(), String>(())
        };
        let result = match tokio::time::timeout(PULL_TIMEOUT, pull).await {
            Ok(result) => result,
            Err(_) => Err(format!("timed out after {}s", PULL_TIMEOUT.as_secs())),
        };
        result.map_err(|error| format!("image {image} is not present and could not be pulled: {error}"))?;
        // Some registries end a failed pull without an error message.
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(()),
            Err(error) => Err(format!("image {image} is not present and could not be pulled: {}", docker_message(&error))),
        }
    }

    /// Create the container `name` for `service` of revision `revision` (not started).
    pub(crate) async fn create(
        &self,
        name: &str,
        id: &str,
        revision: u64,
        service: &ServiceSpec,
        secrets: &BTreeMap<String, String>,
    ) -> Result<String, String> {
        let mut body = container_body(id, revision, service, secrets)?;
        if !self.owner.is_empty() {
            body.labels.get_or_insert_with(HashMap::new).insert(LABEL_AGENT.to_string(), self.owner.clone());
        }
        let options = CreateContainerOptions { name: Some(name.to_string()), ..Default::default() };
        self.docker
            .create_container(Some(options), body)
            .await
            .map(|created| created.id)
            .map_err(|error| format!("creating container {name} failed: {}", docker_message(&error)))
    }

    /// Every container labelled with deployment `id`.
    async fn list_owned(&self, id: &str) -> Result<Vec<Owned>, Error> {
        let mut wanted = vec![format!("{LABEL_DEPLOYMENT}={id}")];
        if !self.owner.is_empty() {
            wanted.push(format!("{LABEL_AGENT}={}", self.owner));
        }
        let filters = HashMap::from([("label".to_string(), wanted)]);
        let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        let list = self.docker.list_containers(Some(options)).await.map_err(docker_error("listing containers"))?;
        let mut owned = Vec::new();
        for summary in list {
            let labels = summary.labels.unwrap_or_default();
            let Some(container) = summary.id else { continue };
            if labels.get(LABEL_DEPLOYMENT).map(String::as_str) != Some(id) {
                continue;
            }
            if !self.owner.is_empty() && labels.get(LABEL_AGENT) != Some(&self.owner) {
                continue;
            }
            let name =
                summary.names.and_then(|names| names.into_iter().next()).map(|n| n.trim_start_matches('/').to_string()).unwrap_or_else(|| container.clone());
            owned.push(Owned {
                name,
                service: labels.get(LABEL_SERVICE).cloned(),
                revision: labels.get(LABEL_REVISION).and_then(|r| r.parse().ok()),
                spec_hash: labels.get(LABEL_SPEC).cloned(),
                running: matches!(summary.state, Some(ContainerSummaryStateEnum::RUNNING | ContainerSummaryStateEnum::RESTARTING)),
                id: container,
            });
        }
        owned.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(owned)
    }

    /// Stop a container, giving it `grace` seconds (its own stop timeout when unknown).
    /// Failures are ignored: a forced removal follows.
    async fn stop(&self, container: &str, grace: Option<u64>) {
        let limit = grace.unwrap_or(MAX_STOP_GRACE_SECS).min(MAX_STOP_GRACE_SECS);
        // The request lasts as long as the grace period: give it its own timeout.
        let docker = self.docker.clone().with_timeout(Duration::from_secs(limit + 30));
        let options = StopContainerOptions { t: grace.map(|g| i32::try_from(g.min(MAX_STOP_GRACE_SECS)).unwrap_or(i32::MAX)), signal: None };
        if let Err(error) = docker.stop_container(container, Some(options)).await {
            if !crate::collector::docker::is_gone(&error) {
                info!(container, error = %docker_message(&error), "stopping a container failed; removing it by force");
            }
        }
    }

    /// Remove a container (by force, with its anonymous volumes); gone already is fine.
    async fn remove_container(&self, container: &str) -> Result<(), Error> {
        let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        match self.docker.remove_container(container, Some(options)).await {
            Ok(()) => Ok(()),
            Err(error) if crate::collector::docker::is_gone(&error) => Ok(()),
            Err(error) => Err(docker_error(format!("removing container {container}"))(error)),
        }
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use gantry_shared::deploy::{EnvVar, Mount, PortMapping, DEFAULT_STOP_GRACE_SECS};

    fn service() -> ServiceSpec {
        serde_json::from_str(r#"{"name":"web","image":"busybox:1.36"}"#).unwrap()
    }

    #[test]
    fn ids_names_and_tags() {
        assert!(valid_id("d-1_x") && valid_id("A9"));
        for bad in ["", "-x", "a.b", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        assert_eq!(container_name("d1", "web", 3), "gantry-d1-web-r3");
        assert!(has_tag_or_digest("busybox:1") && has_tag_or_digest("reg:5000/a/b:2") && has_tag_or_digest("a@sha256:00"));
        assert!(!has_tag_or_digest("busybox") && !has_tag_or_digest("reg:5000/a/b"));
    }

    #[test]
    fn the_container_configuration_follows_the_spec() {
        let mut svc = service();
        svc.env = vec![
            EnvVar { name: "MODE".into(), value: Some("prod".into()), secret: None },
            EnvVar { name: "TOKEN".into(), value: None, secret: Some("tok".into()) },
        ];
        svc.ports = vec![
            PortMapping { host: 8080, container: 80, protocol: Protocol::Tcp, host_ip: Some("127.0.0.1".into()) },
            PortMapping { host: 8081, container: 80, protocol: Protocol::Tcp, host_ip: None },
            PortMapping { host: 5353, container: 53, protocol: Protocol::Udp, host_ip: None },
        ];
        svc.mounts = vec![
            Mount { source: "/srv/data".into(), target: "/data".into(), read_only: true },
            Mount { source: "cache".into(), target: "/cache".into(), read_only: false },
        ];
        svc.restart = RestartPolicy::OnFailure;
        svc.memory_bytes = Some(64 << 20);
        svc.cpus = Some(0.5);
        svc.command = Some(vec!["sh".into(), "-c".into(), "true".into()]);
        svc.labels.insert("team".into(), "a".into());
        let secrets = BTreeMap::from([("tok".to_string(), "s3cret".to_string())]);
        let body = container_body("d1", 4, &svc, &secrets).unwrap();
        assert_eq!(body.env.as_deref(), Some(&["MODE=prod".to_string(), "TOKEN=s3cret".to_string()][..]));
        let labels = body.labels.unwrap();
        assert_eq!(labels[LABEL_DEPLOYMENT], "d1");
        assert_eq!(labels[LABEL_SERVICE], "web");
        assert_eq!(labels[LABEL_REVISION], "4");
        assert_eq!(labels["team"], "a");
        assert_eq!(labels[LABEL_SPEC], service_hash(&svc));
        assert!(!labels[LABEL_SPEC].contains("s3cret"));
        assert_eq!(body.exposed_ports.unwrap(), ["80/tcp", "53/udp"]);
        let host = body.host_config.unwrap();
        let bindings = host.port_bindings.unwrap();
        assert_eq!(bindings["80/tcp"].as_ref().unwrap().len(), 2);
        assert_eq!(bindings["80/tcp"].as_ref().unwrap()[0].host_ip.as_deref(), Some("127.0.0.1"));
        let mounts = host.mounts.unwrap();
        assert_eq!((mounts[0].typ, mounts[1].typ), (Some(MountType::BIND), Some(MountType::VOLUME)));
        assert_eq!(mounts[0].read_only, Some(true));
        assert_eq!(host.restart_policy.unwrap().name, Some(RestartPolicyNameEnum::ON_FAILURE));
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(body.stop_timeout, Some(DEFAULT_STOP_GRACE_SECS as i64));
        // A missing secret value is named, never shown.
        let error = container_body("d1", 4, &svc, &BTreeMap::new()).unwrap_err();
        assert!(error.contains("\"tok\"") && error.contains("TOKEN"), "{error}");
    }

    #[test]
    fn duplicates_and_changed_specs_are_strays() {
        let spec: DeploymentSpec = serde_json::from_str(r#"{"name":"x","services":[{"name":"web","image":"busybox"}]}"#).unwrap();
        let rs = RevisionSpec { revision: 2, spec };
        let hash = service_hash(&rs.spec.services[0]);
        let owned = |name: &str, revision: u64, hash: &str, running: bool| Owned {
            id: format!("id-{name}"),
            name: name.into(),
            service: Some("web".into()),
            revision: Some(revision),
            spec_hash: Some(hash.into()),
            running,
        };
        let list = vec![
            owned("copy", 2, &hash, true),
            owned("gantry-d-web-r2", 2, &hash, false),
            owned("other", 2, "changed", true),
            owned("gantry-d-web-r1", 1, &hash, true),
        ];
        let (matched, strays) = classify("d", "", list, &[&rs]);
        assert_eq!(matched.len(), 1);
        assert_eq!(matched[&(2, "web".to_string())].name, "gantry-d-web-r2");
        let mut names: Vec<_> = strays.iter().map(|s| s.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["copy", "gantry-d-web-r1", "other"]);
    }

    #[test]
    fn missing_secrets_are_refused_by_name() {
        let spec: DeploymentSpec =
            serde_json::from_str(r#"{"name":"x","services":[{"name":"web","image":"busybox","env":[{"name":"A","secret":"a"},{"name":"B","value":"b"}]}]}"#)
                .unwrap();
        let error = resolve_secrets(&spec, &BTreeMap::new()).unwrap_err().to_string();
        assert_eq!(error, "secret \"a\" (env A of service web) was not provided");
        let resolved = resolve_secrets(&spec, &BTreeMap::from([("a".into(), "1".into()), ("unused".into(), "2".into())])).unwrap();
        assert_eq!(resolved, BTreeMap::from([("a".to_string(), "1".to_string())]));
    }
}
