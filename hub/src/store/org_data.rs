//! An org's data as a whole: the lists an export needs that no other module gives
//! (enrollment tokens, API keys and webhook events of one org), pending deletion
//! confirmations, and erasing an org ([`Store::erase_org`]).
//!
//! Trees: `org_deletions` (`org` → [`DeletionRequest`], the confirmation an operator asked
//! for) and `org_tombstones` (`org` → [`Tombstone`]). A tombstone keeps a deleted org's id
//! from being taken again: the ledger, the closed invoices and the audit log, kept for
//! accounting, still name it, and a new org under that id would inherit them.
//!
//! Erasing removes the org's records from the trees of other store modules too. Where a
//! module has no call that removes them (memberships past the last-owner rule, alerts,
//! invitations, webhook events, check revisions) its tree is opened here by name: sled
//! hands back the same tree, and the key layouts are the ones documented in those modules.
//! The ledger, invoices, subscription, Stripe outbox and audit log are never touched.

use super::{decode, encode, ApiKey, Error, Store, Token, WebhookEvent};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A deletion an operator asked for, waiting for its confirmation code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletionRequest {
    pub org: String,
    /// SHA-256 (hex) of the confirmation code; the code itself is shown once.
    pub code_sha256: String,
    pub requested_by: String,
    pub requested_at_ms: i64,
    pub expires_at_ms: i64,
}

/// Why a confirmation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfirmError {
    #[error("no deletion of this org was requested; POST .../deletion first")]
    NotRequested,
    #[error("the confirmation code does not match the one the deletion request returned")]
    Mismatch,
    #[error("the confirmation code expired; request the deletion again")]
    Expired,
}

/// What is left of a deleted org: who deleted it, when, and how many records went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub org: String,
    pub deleted_by: String,
    pub started_at_ms: i64,
    /// `None` while the erasure runs (or if it was interrupted).
    pub finished_at_ms: Option<i64>,
    /// Records removed, by kind.
    pub removed: BTreeMap<String, u64>,
}

fn prefix(org: &str) -> Vec<u8> {
    let mut key = org.as_bytes().to_vec();
    key.push(0);
    key
}

fn pair(first: &str, second: &str) -> Vec<u8> {
    let mut key = prefix(first);
    key.extend_from_slice(second.as_bytes());
    key
}

/// Remove every key of `tree` starting with `start`; how many there were.
fn remove_prefix(tree: &sled::Tree, start: &[u8]) -> Result<u64, Error> {
    let mut batch = sled::Batch::default();
    let mut n = 0;
    for key in tree.scan_prefix(start).keys() {
        batch.remove(key?);
        n += 1;
    }
    tree.apply_batch(batch)?;
    Ok(n)
}

/// Remove every JSON value of `tree` whose `org` field is `org`; the removed keys.
fn remove_where_org(tree: &sled::Tree, what: &str, org: &str) -> Result<Vec<sled::IVec>, Error> {
    #[derive(Deserialize)]
    struct OrgField {
        #[serde(default)]
        org: Option<String>,
    }
    let mut removed = Vec::new();
    for item in tree.iter() {
        let (key, value) = item?;
        let record: OrgField = decode(what, &value)?;
        if record.org.as_deref() == Some(org) {
            tree.remove(&key)?;
            removed.push(key);
        }
    }
    Ok(removed)
}

impl Store {
    fn named_tree(&self, name: &str) -> Result<sled::Tree, Error> {
        Ok(self.db.open_tree(name)?)
    }

    /// Enrollment tokens of one org (hashed secrets included: callers must not show them).
    pub fn tokens_of_org(&self, org: &str) -> Result<Vec<Token>, Error> {
        let all: Vec<Token> = Store::scan(&self.tokens, "token")?;
        Ok(all.into_iter().filter(|t| t.org == org).collect())
    }

    /// API keys of one org (hashed secrets included: callers must not show them).
    pub fn api_keys_of_org(&self, org: &str) -> Result<Vec<ApiKey>, Error> {
        let all: Vec<ApiKey> = Store::scan(&self.api_keys, "api key")?;
        Ok(all.into_iter().filter(|k| k.org.as_deref() == Some(org)).collect())
    }

    /// Webhook events of one org, in id order.
    pub fn webhook_events_of_org(&self, org: &str) -> Result<Vec<WebhookEvent>, Error> {
        let all: Vec<WebhookEvent> = Store::scan(&self.named_tree("webhook_events")?, "webhook event")?;
        Ok(all.into_iter().filter(|e| e.org == org).collect())
    }

    /// Record a deletion request (replacing an earlier one of the same org).
    pub fn put_deletion_request(&self, request: &DeletionRequest) -> Result<(), Error> {
        self.named_tree("org_deletions")?.insert(request.org.as_bytes(), encode(request))?;
        self.durable()
    }

    /// Check a confirmation code against the org's pending request at `now_ms`, and spend
    /// the request if it matches. A wrong code leaves the request in place; an expired one
    /// removes it.
    pub fn confirm_deletion(&self, org: &str, code_sha256: &str, now_ms: i64) -> Result<Result<DeletionRequest, ConfirmError>, Error> {
        let tree = self.named_tree("org_deletions")?;
        let Some(raw) = tree.get(org.as_bytes())? else { return Ok(Err(ConfirmError::NotRequested)) };
        let request: DeletionRequest = decode("deletion request", &raw)?;
        if now_ms >= request.expires_at_ms {
            tree.compare_and_swap(org.as_bytes(), Some(raw), None as Option<&[u8]>)?.ok();
            self.durable()?;
            return Ok(Err(ConfirmError::Expired));
        }
        // Hashes are compared, so timing says nothing about the code.
        if request.code_sha256 != code_sha256 {
            return Ok(Err(ConfirmError::Mismatch));
        }
        // Spent once: of two racing confirmations, only one deletes.
        if tree.compare_and_swap(org.as_bytes(), Some(raw), None as Option<&[u8]>)?.is_err() {
            return Ok(Err(ConfirmError::NotRequested));
        }
        self.durable()?;
        Ok(Ok(request))
    }

    /// The tombstone of a deleted org.
    pub fn org_tombstone(&self, org: &str) -> Result<Option<Tombstone>, Error> {
        Store::get(&self.named_tree("org_tombstones")?, "tombstone", org.as_bytes())
    }

    /// Erase org `org`: every record the hub keeps for it except the ledger, closed
    /// invoices, subscription, Stripe outbox and audit log. Its agents must already be
    /// revoked and disconnected. Writes the tombstone first, so an interrupted erasure
    /// is visible and can run again. Members who belong to no other org (and are not
    /// operators) lose their account, sessions and keys. Returns the records removed, by
    /// kind.
    pub fn erase_org(&self, org: &str, by: &str, now_ms: i64) -> Result<BTreeMap<String, u64>, Error> {
        let tombstones = self.named_tree("org_tombstones")?;
        let mut tombstone = self.org_tombstone(org)?.unwrap_or(Tombstone {
            org: org.to_string(),
            deleted_by: by.to_string(),
            started_at_ms: now_ms,
            finished_at_ms: None,
            removed: BTreeMap::new(),
        });
        tombstones.insert(org.as_bytes(), encode(&tombstone))?;
        self.durable()?;
        let mut removed: BTreeMap<String, u64> = BTreeMap::new();
        let mut count = |kind: &str, n: u64| *removed.entry(kind.to_string()).or_default() += n;

        // The org record first: from here on every route answers 404 and enrollment fails.
        self.orgs.remove(org.as_bytes())?;
        count("orgs", 1);
        let tokens = self.tokens_of_org(org)?;
        for token in &tokens {
            self.tokens.remove(token.id.as_bytes())?;
        }
        count("enrollment_tokens", tokens.len() as u64);

        let agents: Vec<String> = self
            .agents_by_org
            .scan_prefix(prefix(org))
            .keys()
            .map(|k| k.map(|k| String::from_utf8_lossy(&k[org.len() + 1..]).into_owned()))
            .collect::<Result<_, _>>()?;
        let check_states = self.named_tree("check_states")?;
        for agent in &agents {
            count("telemetry_records", self.erase_agent_telemetry(agent)?);
            count("check_states", remove_prefix(&check_states, &prefix(agent))?);
            self.agents.remove(agent.as_bytes())?;
            self.agents_by_org.remove(pair(org, agent))?;
        }
        count("agents", agents.len() as u64);

        let deployments = self.deployments_of_org_all(org)?;
        for deployment in &deployments {
            let id = deployment.id.as_str();
            count("deployment_revisions", remove_prefix(&self.deployment_revisions, &prefix(id))?);
            count("deployment_statuses", remove_prefix(&self.deployment_status, &prefix(id))?);
            self.rollouts.remove(id.as_bytes())?;
            self.deployments.remove(id.as_bytes())?;
        }
        remove_prefix(&self.deployment_names, &prefix(org))?;
        count("deployments", deployments.len() as u64);

        count("secrets", remove_prefix(&self.secrets, &prefix(org))?);
        count("registry_logins", remove_prefix(&self.registries, &prefix(org))?);

        let webhooks = self.webhooks_of(org)?;
        for webhook in &webhooks {
            self.delete_webhook(org, &webhook.id)?;
        }
        count("webhooks", webhooks.len() as u64);
        // Deliveries of endpoints deleted earlier, with their log and queue entries.
        let deliveries: BTreeSet<Vec<u8>> =
            remove_where_org(&self.named_tree("webhook_deliveries")?, "webhook delivery", org)?.into_iter().map(|k| k.to_vec()).collect();
        remove_prefix(&self.named_tree("webhook_delivery_log")?, &prefix(org))?;
        let queue = self.named_tree("webhook_queue")?;
        for key in queue.iter().keys() {
            let key = key?;
            if key.len() > 8 && deliveries.contains(&key[8..]) {
                queue.remove(&key)?;
            }
        }
        count("webhook_events", remove_where_org(&self.named_tree("webhook_events")?, "webhook event", org)?.len() as u64);

        count("checks", remove_prefix(&self.named_tree("check_configs")?, &prefix(org))?);
        self.named_tree("check_revisions")?.remove(org.as_bytes())?;
        count("alerts", remove_prefix(&self.named_tree("alerts")?, &prefix(org))?);
        remove_prefix(&self.named_tree("alerts_open")?, &prefix(org))?;
        count("silences", remove_prefix(&self.named_tree("silences")?, &prefix(org))?);
        self.named_tree("alert_rules")?.remove(org.as_bytes())?;
        self.named_tree("org_settings")?.remove(org.as_bytes())?;

        let members = self.members_of(org)?;
        let (by_org, by_user) = (self.named_tree("memberships")?, self.named_tree("memberships_by_user")?);
        for member in &members {
            by_org.remove(pair(org, &member.user_id))?;
            by_user.remove(pair(&member.user_id, org))?;
        }
        count("members", members.len() as u64);
        count("invitations", remove_where_org(&self.named_tree("invitations")?, "invitation", org)?.len() as u64);
        let keys = self.api_keys_of_org(org)?;
        for key in &keys {
            self.api_keys.remove(key.id.as_bytes())?;
        }
        count("api_keys", keys.len() as u64);

        // People who were only in this org: their account goes too.
        for member in &members {
            let Some(user) = self.user_by_id(&member.user_id)? else { continue };
            if user.operator || !self.memberships_of(&user.id)?.is_empty() {
                continue;
            }
            count("sessions", self.delete_sessions_of(&user.id)? as u64);
            for key in Store::scan::<ApiKey>(&self.api_keys, "api key")? {
                if key.created_by_user.as_deref() == Some(user.id.as_str()) {
                    self.api_keys.remove(key.id.as_bytes())?;
                }
            }
            self.users.remove(user.email.as_bytes())?;
            count("users", 1);
        }

        self.named_tree("org_deletions")?.remove(org.as_bytes())?;
        for (kind, n) in &removed {
            *tombstone.removed.entry(kind.clone()).or_default() += n;
        }
        tombstone.finished_at_ms = Some(now_ms.max(tombstone.started_at_ms));
        tombstones.insert(org.as_bytes(), encode(&tombstone))?;
        self.durable()?;
        Ok(tombstone.removed)
    }
}
