//! Deployment records: the deployment (org, name, targets, current revision) and its
//! append-only revision history. Each change writes the new revision and the updated
//! deployment in one transaction, so the history and the current state never disagree.

use super::{decode, encode, Error, Store};
use gantry_shared::deploy::DeploymentSpec;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use std::collections::BTreeMap;

/// Which agents of the org a deployment runs on: listed ids, or every agent whose labels
/// include all of `selector`'s pairs (or both: the union).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    #[serde(default)]
    pub agents: Vec<String>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

/// A deployment as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: String,
    pub org: String,
    pub name: String,
    pub targets: Targets,
    pub revision: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Set by DELETE: agents remove its containers; the record stays for the history.
    pub deleted_at_ms: Option<i64>,
}

/// One revision: what was asked, by whom, when and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    pub revision: u64,
    pub spec: DeploymentSpec,
    pub targets: Targets,
    pub created_by: String,
    pub created_at_ms: i64,
    /// What changed, e.g. `created`, `updated: services[0].image`, `rollback to 2`.
    pub change: String,
}

/// What an agent last reported about a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentDeployStatus {
    pub revision: u64,
    pub state: gantry_shared::message::DeployState,
    pub message: String,
    pub updated_at_ms: i64,
}

fn revision_key(id: &str, revision: u64) -> Vec<u8> {
    let mut key = id.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&revision.to_be_bytes());
    key
}

fn name_key(org: &str, name: &str) -> Vec<u8> {
    let mut key = org.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(name.as_bytes());
    key
}

impl Store {
    /// Create a deployment with revision 1; its name must be free in the org.
    pub fn create_deployment(&self, deployment: &Deployment, first: &Revision) -> Result<(), Error> {
        let _writing = self.writing();
        let result = (&self.deployments, &self.deployment_names, &self.deployment_revisions).transaction(|(deployments, names, revisions)| {
            let key = name_key(&deployment.org, &deployment.name);
            if names.get(&key)?.is_some() {
                return Err(ConflictableTransactionError::Abort(Error::AlreadyExists(format!("deployment {}", deployment.name))));
            }
            names.insert(key, deployment.id.as_bytes())?;
            deployments.insert(deployment.id.as_bytes(), encode(deployment))?;
            revisions.insert(revision_key(&deployment.id, first.revision), encode(first))?;
            Ok(())
        });
        finish(result)?;
        self.durable()?;
        Ok(())
    }

    pub fn deployment(&self, id: &str) -> Result<Option<Deployment>, Error> {
        Store::get(&self.deployments, "deployment", id.as_bytes())
    }

    /// Deployments of an org, by name.
    pub fn deployments_of_org(&self, org: &str) -> Result<Vec<Deployment>, Error> {
        let mut prefix = org.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for id in self.deployment_names.scan_prefix(&prefix).values() {
            if let Some(d) = Store::get::<Deployment>(&self.deployments, "deployment", &id?)? {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Append revision `next` (which must be `deployment.revision + 1` as stored) and update
    /// the deployment, atomically; a concurrent change makes this fail with `Conflict`.
    pub fn add_revision(&self, id: &str, expected_revision: u64, next: &Revision, now_ms: i64) -> Result<Deployment, Error> {
        let _writing = self.writing();
        let result = (&self.deployments, &self.deployment_revisions).transaction(|(deployments, revisions)| {
            let Some(raw) = deployments.get(id.as_bytes())? else {
                return Err(ConflictableTransactionError::Abort(Error::NotFound(format!("deployment {id}"))));
            };
            let mut deployment: Deployment = decode("deployment", &raw).map_err(ConflictableTransactionError::Abort)?;
            if deployment.revision != expected_revision || next.revision != expected_revision + 1 {
                return Err(ConflictableTransactionError::Abort(Error::Conflict(format!(
                    "deployment {id} changed meanwhile (now at revision {})",
                    deployment.revision
                ))));
            }
            deployment.revision = next.revision;
            deployment.targets = next.targets.clone();
            deployment.updated_at_ms = now_ms;
            deployments.insert(id.as_bytes(), encode(&deployment))?;
            revisions.insert(revision_key(id, next.revision), encode(next))?;
            Ok(deployment)
        });
        let deployment = finish(result)?;
        self.durable()?;
        Ok(deployment)
    }

    pub fn revision(&self, id: &str, revision: u64) -> Result<Option<Revision>, Error> {
        Store::get(&self.deployment_revisions, "revision", &revision_key(id, revision))
    }

    /// Every revision of a deployment, oldest first.
    pub fn revisions(&self, id: &str) -> Result<Vec<Revision>, Error> {
        let mut prefix = id.as_bytes().to_vec();
        prefix.push(0);
        self.deployment_revisions.scan_prefix(&prefix).values().map(|v| decode("revision", &v?)).collect()
    }

    /// Every deployment of an org, deleted ones included (agents may still run them).
    pub fn deployments_of_org_all(&self, org: &str) -> Result<Vec<Deployment>, Error> {
        let mut out = Vec::new();
        for value in self.deployments.iter().values() {
            let deployment: Deployment = decode("deployment", &value?)?;
            if deployment.org == org {
                out.push(deployment);
            }
        }
        Ok(out)
    }

    pub fn set_deploy_status(&self, id: &str, agent: &str, status: &AgentDeployStatus) -> Result<(), Error> {
        let _writing = self.writing();
        self.deployment_status.insert(name_key(id, agent), encode(status))?;
        self.durable()?;
        Ok(())
    }

    pub fn deploy_status(&self, id: &str, agent: &str) -> Result<Option<AgentDeployStatus>, Error> {
        Store::get(&self.deployment_status, "deployment status", &name_key(id, agent))
    }

    /// Every agent's status for a deployment, by agent id.
    pub fn deploy_statuses(&self, id: &str) -> Result<Vec<(String, AgentDeployStatus)>, Error> {
        let mut prefix = id.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.deployment_status.scan_prefix(&prefix) {
            let (key, value) = item?;
            let agent = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            out.push((agent, decode("deployment status", &value)?));
        }
        Ok(out)
    }

    /// Mark a deployment deleted and free its name.
    pub fn delete_deployment(&self, id: &str, now_ms: i64) -> Result<Option<Deployment>, Error> {
        let _writing = self.writing();
        let result = (&self.deployments, &self.deployment_names).transaction(|(deployments, names)| {
            let Some(raw) = deployments.get(id.as_bytes())? else { return Ok(None) };
            let mut deployment: Deployment = decode("deployment", &raw).map_err(ConflictableTransactionError::Abort)?;
            if deployment.deleted_at_ms.is_none() {
                deployment.deleted_at_ms = Some(now_ms);
                deployments.insert(id.as_bytes(), encode(&deployment))?;
                names.remove(name_key(&deployment.org, &deployment.name))?;
            }
            Ok(Some(deployment))
        });
        let deployment = finish(result)?;
        self.durable()?;
        Ok(deployment)
    }
}

fn finish<T>(result: Result<T, TransactionError<Error>>) -> Result<T, Error> {
    match result {
        Ok(value) => Ok(value),
        Err(TransactionError::Abort(error)) => Err(error),
        Err(TransactionError::Storage(error)) => Err(Error::Sled(error)),
    }
}

impl Store {
    /// Write the rollout state of deployment `id`.
    pub fn put_rollout(&self, id: &str, rollout: &crate::orchestrator::Rollout) -> Result<(), Error> {
        let _writing = self.writing();
        self.rollouts.insert(id.as_bytes(), encode(rollout))?;
        self.durable()?;
        Ok(())
    }

    /// Forget the rollout state of deployment `id`.
    pub fn delete_rollout(&self, id: &str) -> Result<(), Error> {
        let _writing = self.writing();
        self.rollouts.remove(id.as_bytes())?;
        self.durable()?;
        Ok(())
    }

    /// Every stored rollout, by deployment id.
    pub fn rollouts(&self) -> Result<Vec<(String, crate::orchestrator::Rollout)>, Error> {
        self.rollouts
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((String::from_utf8_lossy(&k).into_owned(), decode("rollout", &v)?))
            })
            .collect()
    }
}
