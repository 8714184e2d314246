//! Health check configurations per org and each agent's latest check states.
//!
//! Keys: configurations `org \0 id`; the org's check revision (bumped by every change, so
//! agents can ignore a set that arrives late) `org`; states `agent \0 check name`. A change
//! writes the configuration and the new revision in one transaction.

use super::{decode, encode, Error, Store};
use gantry_shared::checks::{CheckSpec, CheckState};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use std::collections::BTreeMap;

/// The trees of this module.
#[derive(Debug, Clone)]
pub(super) struct Trees {
    configs: sled::Tree,
    revisions: sled::Tree,
    states: sled::Tree,
}

impl Trees {
    pub fn open(db: &sled::Db) -> Result<Trees, Error> {
        Ok(Trees { configs: db.open_tree("check_configs")?, revisions: db.open_tree("check_revisions")?, states: db.open_tree("check_states")? })
    }
}

/// Which of the org's agents run a check: every agent when all fields are empty,
/// otherwise the union of the listed agents, the agents whose labels include every pair of
/// `selector`, and the targets of `deployment`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckScope {
    #[serde(default)]
    pub agents: Vec<String>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// A deployment id: the check runs wherever the deployment does.
    #[serde(default)]
    pub deployment: Option<String>,
}

impl CheckScope {
    /// Whether the scope selects every agent of the org.
    pub fn is_everyone(&self) -> bool {
        self.agents.is_empty() && self.selector.is_empty() && self.deployment.is_none()
    }
}

/// A check configuration as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckConfig {
    pub id: String,
    pub org: String,
    pub scope: CheckScope,
    pub spec: CheckSpec,
    pub created_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// An agent's latest known state of one check, from its reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckStatus {
    pub name: String,
    pub kind: String,
    pub state: CheckState,
    pub since_ms: i64,
    pub output: String,
    pub latency_ms: u64,
    /// When the agent's latest report about it was made.
    pub reported_at_ms: i64,
    pub crash_loop: bool,
    pub last_remediation: Option<String>,
    pub last_remediation_ms: Option<i64>,
}

fn key(first: &str, second: &str) -> Vec<u8> {
    let mut key = first.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(second.as_bytes());
    key
}

fn prefix(first: &str) -> Vec<u8> {
    key(first, "")
}

impl Store {
    /// Create or replace a check configuration. Its name must be unique in the org (checks
    /// of one org form one namespace, so an agent never gets two checks of one name).
    /// Returns the org's new check revision.
    pub fn put_check_config(&self, config: &CheckConfig) -> Result<u64, Error> {
        let _writing = self.writing();
        let trees = &self.checks;
        let others = self.check_configs(&config.org)?;
        if let Some(other) = others.iter().find(|c| c.spec.name == config.spec.name && c.id != config.id) {
            return Err(Error::AlreadyExists(format!("check named {:?} (id {})", config.spec.name, other.id)));
        }
        let result = (&trees.configs, &trees.revisions).transaction(|(configs, revisions)| {
            configs.insert(key(&config.org, &config.id), encode(config))?;
            bump(revisions, &config.org)
        });
        result.map_err(tx_error)
    }

    /// Delete a check configuration; false if there was none. Bumps the org's revision.
    pub fn delete_check_config(&self, org: &str, id: &str) -> Result<Option<u64>, Error> {
        let _writing = self.writing();
        let trees = &self.checks;
        let result = (&trees.configs, &trees.revisions).transaction(|(configs, revisions)| {
            if configs.remove(key(org, id))?.is_none() {
                return Ok(None);
            }
            bump(revisions, org).map(Some)
        });
        result.map_err(tx_error)
    }

    pub fn check_config(&self, org: &str, id: &str) -> Result<Option<CheckConfig>, Error> {
        self.checks.configs.get(key(org, id))?.map(|v| decode("check config", &v)).transpose()
    }

    /// The org's check configurations, by id.
    pub fn check_configs(&self, org: &str) -> Result<Vec<CheckConfig>, Error> {
        self.checks.configs.scan_prefix(prefix(org)).values().map(|v| decode("check config", &v?)).collect()
    }

    /// The org's check revision: 0 before any configuration was written.
    pub fn check_revision(&self, org: &str) -> Result<u64, Error> {
        Ok(self.checks.revisions.get(org.as_bytes())?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map_or(0, u64::from_be_bytes))
    }

    /// Record an agent's latest state of one check.
    pub fn set_check_status(&self, agent: &str, status: &CheckStatus) -> Result<(), Error> {
        let _writing = self.writing();
        self.checks.states.insert(key(agent, &status.name), encode(status))?;
        Ok(())
    }

    /// An agent's latest state of one check.
    pub fn check_status(&self, agent: &str, name: &str) -> Result<Option<CheckStatus>, Error> {
        self.checks.states.get(key(agent, name))?.map(|v| decode("check status", &v)).transpose()
    }

    /// Every check state of an agent, by name.
    pub fn check_statuses(&self, agent: &str) -> Result<Vec<CheckStatus>, Error> {
        self.checks.states.scan_prefix(prefix(agent)).values().map(|v| decode("check status", &v?)).collect()
    }

    /// Forget an agent's states of checks it no longer runs.
    pub fn retain_check_statuses(&self, agent: &str, keep: &[&str]) -> Result<(), Error> {
        let _writing = self.writing();
        for status in self.check_statuses(agent)? {
            if !keep.contains(&status.name.as_str()) {
                self.checks.states.remove(key(agent, &status.name))?;
            }
        }
        Ok(())
    }

    /// Every agent's check states, as `(agent, status)`.
    pub fn all_check_statuses(&self) -> Result<Vec<(String, CheckStatus)>, Error> {
        let mut out = Vec::new();
        for entry in self.checks.states.iter() {
            let (k, v) = entry?;
            let agent = k.split(|b| *b == 0).next().map(|a| String::from_utf8_lossy(a).into_owned()).unwrap_or_default();
            out.push((agent, decode("check status", &v)?));
        }
        Ok(out)
    }
}

fn bump(revisions: &sled::transaction::TransactionalTree, org: &str) -> Result<u64, ConflictableTransactionError<Error>> {
    let current = revisions.get(org.as_bytes())?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map_or(0, u64::from_be_bytes);
    let next = current + 1;
    revisions.insert(org.as_bytes(), &next.to_be_bytes())?;
    Ok(next)
}

fn tx_error(error: TransactionError<Error>) -> Error {
    match error {
        TransactionError::Abort(error) => error,
        TransactionError::Storage(error) => Error::Sled(error),
    }
}
