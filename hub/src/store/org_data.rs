//! An org's data as a whole: the lists an export needs that no other module gives
//! (enrollment tokens, API keys and webhook events of one org), pending deletion
//! confirmations, and erasing an org ([`Store::erase_org`]).
//!
//! Trees: `org_deletions` (`org` → [`DeletionRequest`], the confirmation an operator asked
//! for) and `org_tombstones` (`org` → [`Tombstone`]). A tombstone is written in the same
//! transaction that spends the confirmation, before any data is removed: it is the durable
//! intent to delete, and a tombstone without `finished_at_ms` is a deletion that a stopped
//! hub has to finish ([`Store::unfinished_org_deletions`]). It also keeps a deleted org's id
//! from being taken again: the ledger, the closed invoices and the audit log, kept for
//! accounting, still name it, and a new org under that id would inherit them.
//!
//! Erasing removes the org's records from the trees of other store modules too. Where a
//! module has no call that removes them (memberships past the last-owner rule, alerts,
//! invitations, webhook events, check revisions, settings, branding) its tree is opened
//! here by name: sled hands back the same tree, and the key layouts are the ones documented
//! in those modules. Kept, never touched: the ledger trees (`ledger_*`), subscriptions,
//! invoices and the Stripe trees (`stripe_*`). The audit log keeps its entries, with the
//! personal fields of the org's and its departing people's entries erased
//! ([`Store::erase_audit_personal`]).

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
        let _writing = self.writing();
        self.named_tree("org_deletions")?.insert(request.org.as_bytes(), encode(request))?;
        self.durable()
    }

    /// Check a confirmation code against the org's pending request at `now_ms`; if it
    /// matches, spend the request and write the org's [`Tombstone`] (unfinished, deleted by
    /// `by`) in one durable transaction: from then on the deletion happens, if need be
    /// after a restart. A wrong code leaves the request in place; an expired one removes it.
    pub fn confirm_deletion(&self, org: &str, code_sha256: &str, by: &str, now_ms: i64) -> Result<Result<DeletionRequest, ConfirmError>, Error> {
        let _writing = self.writing();
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        use sled::Transactional;
        let tree = self.named_tree("org_deletions")?;
        let tombstones = self.named_tree("org_tombstones")?;
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
        let tombstone = Tombstone { org: org.to_string(), deleted_by: by.to_string(), started_at_ms: now_ms, finished_at_ms: None, removed: BTreeMap::new() };
        // Spent once: of two racing confirmations, only one deletes.
        let spent = (&tree, &tombstones).transaction(|(requests, tombstones)| {
            if requests.get(org.as_bytes())?.as_deref() != Some(raw.as_ref()) {
                return Err(ConflictableTransactionError::Abort(()));
            }
            requests.remove(org.as_bytes())?;
            tombstones.insert(org.as_bytes(), encode(&tombstone))?;
            Ok(())
        });
        match spent {
            Ok(()) => {}
            Err(TransactionError::Abort(())) => return Ok(Err(ConfirmError::NotRequested)),
            Err(TransactionError::Storage(e)) => return Err(Error::Sled(e)),
        }
        self.durable()?;
        Ok(Ok(request))
    }

    /// Deletions confirmed but not finished (the hub stopped during the erasure), oldest
    /// first.
    pub fn unfinished_org_deletions(&self) -> Result<Vec<Tombstone>, Error> {
        let mut all: Vec<Tombstone> = Store::scan(&self.named_tree("org_tombstones")?, "tombstone")?;
        all.retain(|t| t.finished_at_ms.is_none());
        all.sort_by_key(|t| t.started_at_ms);
        Ok(all)
    }

    /// Every tree holding `needle` in a key or a value, with how many records do. Reads
    /// the whole store: meant for tests and for checking a deletion by hand on a stopped
    /// hub's data directory, never for a request path. Telemetry payloads live in segment
    /// files, not trees; search those files separately.
    pub fn trees_containing(&self, needle: &[u8]) -> Result<BTreeMap<String, u64>, Error> {
        let mut found = BTreeMap::new();
        if needle.is_empty() {
            return Ok(found);
        }
        let has = |bytes: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        for name in self.db.tree_names() {
            let tree = self.db.open_tree(&name)?;
            let mut n = 0u64;
            for item in tree.iter() {
                let (key, value) = item?;
                if has(&key) || has(&value) {
                    n += 1;
                }
            }
            if n > 0 {
                found.insert(String::from_utf8_lossy(&name).into_owned(), n);
            }
        }
        Ok(found)
    }

    /// The tombstone of a deleted org.
    pub fn org_tombstone(&self, org: &str) -> Result<Option<Tombstone>, Error> {
        Store::get(&self.named_tree("org_tombstones")?, "tombstone", org.as_bytes())
    }

    /// Erase org `org`: every record the hub keeps for it except the ledger, closed
    /// invoices, subscription, Stripe trees and audit log, whose entries of the org (and of
    /// its members who leave with it) lose their personal fields. Its agents must already be
    /// revoked and disconnected. Runs again safely after an interruption: the tombstone
    /// (written at confirmation, or here if there is none) stays unfinished until every
    /// step is done, and each step is durable before `after_step` is called with its name.
    /// Members who belong to no other org (and are not operators) lose their account,
    /// sessions and keys. Returns the records removed, by kind (what an interrupted earlier
    /// run removed is not counted again).
    pub fn erase_org(&self, org: &str, by: &str, now_ms: i64, after_step: &mut dyn FnMut(&str)) -> Result<BTreeMap<String, u64>, Error> {
        // The write gate is held step by step, not across `after_step`, which may wait.
        let mut writing = Some(self.writing());
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
        let mut step = |name: &str| -> Result<(), Error> {
            self.durable()?;
            after_step(name);
            Ok(())
        };

        // The org record first: from here on every route answers 404 and enrollment fails.
        count("orgs", u64::from(self.orgs.remove(org.as_bytes())?.is_some()));
        let tokens = self.tokens_of_org(org)?;
        for token in &tokens {
            self.tokens.remove(token.id.as_bytes())?;
        }
        count("enrollment_tokens", tokens.len() as u64);
        drop(writing.take());
        step("org")?;
        writing = Some(self.writing());

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
        drop(writing.take());
        step("agents")?;
        writing = Some(self.writing());

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
        drop(writing.take());
        step("deployments")?;
        writing = Some(self.writing());

        count("secrets", remove_prefix(&self.secrets, &prefix(org))?);
        count("registry_logins", remove_prefix(&self.registries, &prefix(org))?);
        drop(writing.take());
        step("secrets")?;
        writing = Some(self.writing());

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
        drop(writing.take());
        step("webhooks")?;
        writing = Some(self.writing());

        count("checks", remove_prefix(&self.named_tree("check_configs")?, &prefix(org))?);
        self.named_tree("check_revisions")?.remove(org.as_bytes())?;
        count("alerts", remove_prefix(&self.named_tree("alerts")?, &prefix(org))?);
        remove_prefix(&self.named_tree("alerts_open")?, &prefix(org))?;
        count("silences", remove_prefix(&self.named_tree("silences")?, &prefix(org))?);
        self.named_tree("alert_rules")?.remove(org.as_bytes())?;
        drop(writing.take());
        step("alerts")?;
        writing = Some(self.writing());
        count("settings", u64::from(self.named_tree("org_settings")?.remove(org.as_bytes())?.is_some()));
        // The brand and its logo (`org` and `org \0logo`, see branding.rs).
        let branding = self.named_tree("branding")?;
        let logo = pair(org, "logo");
        count("branding", u64::from(branding.remove(org.as_bytes())?.is_some()) + u64::from(branding.remove(logo)?.is_some()));
        drop(writing.take());
        step("settings")?;
        writing = Some(self.writing());

        // The audit log keeps the org's entries and those of its people, with their
        // personal fields (actor, client address, exec command lines) erased; the chain
        // still verifies (see audit.rs). Before the accounts go, so an interrupted run
        // still knows whose entries to erase when resumed.
        let members = self.members_of(org)?;
        let mut leaving = Vec::new();
        for member in &members {
            let Some(user) = self.user_by_id(&member.user_id)? else { continue };
            if !user.operator && !self.memberships_of(&user.id)?.iter().any(|m| m.org != org) {
                leaving.push(user.email);
            }
        }
        let (erased, kept) = self.erase_audit_personal(org, &leaving)?;
        count("audit_entries_anonymised", erased);
        // Kept entries are found again by every pass; count them once.
        if kept > 0 && !tombstone.removed.contains_key("audit_entries_kept_as_written") {
            count("audit_entries_kept_as_written", kept);
        }
        drop(writing.take());
        step("audit")?;
        writing = Some(self.writing());

        // People who were only in this org lose their account, sessions and keys; this runs
        // before their memberships go, so an interrupted run still finds them when resumed.
        for member in &members {
            let Some(user) = self.user_by_id(&member.user_id)? else { continue };
            if user.operator || self.memberships_of(&user.id)?.iter().any(|m| m.org != org) {
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
        drop(writing.take());
        step("users")?;
        writing = Some(self.writing());
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

        self.named_tree("org_deletions")?.remove(org.as_bytes())?;
        for (kind, n) in &removed {
            *tombstone.removed.entry(kind.clone()).or_default() += n;
        }
        tombstone.finished_at_ms = Some(now_ms.max(tombstone.started_at_ms));
        tombstones.insert(org.as_bytes(), encode(&tombstone))?;
        drop(writing);
        self.durable()?;
        Ok(tombstone.removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Org, OrgSettings, StoredBrand};

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("gantry-org-data-test-{}-{}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn org(id: &str) -> Org {
        Org { id: id.into(), name: id.into(), agent_limit: 5, agent_count: 0, suspended: false, created_at_ms: 0, retention_days: 0 }
    }

    fn brand(name: &str) -> StoredBrand {
        StoredBrand {
            product_name: name.into(),
            accent: "#112233".into(),
            header_background: "#ffffff".into(),
            logo_content_type: Some("image/svg+xml".into()),
            updated_at_ms: 1,
            updated_by: "test".into(),
        }
    }

    fn request(org: &str, code: &str) -> DeletionRequest {
        DeletionRequest { org: org.into(), code_sha256: code.into(), requested_by: "ops".into(), requested_at_ms: 0, expires_at_ms: 1_000 }
    }

    #[test]
    fn the_confirmation_records_the_intent_and_erasure_finishes_it() {
        let dir = tempdir();
        let store = Store::create(&dir).unwrap();
        for id in ["acme", "acme-2"] {
            store.create_org(&org(id)).unwrap();
            store.put_org_settings(id, &OrgSettings { exec_enabled: true }).unwrap();
            store.put_branding(id, &brand(&format!("{id} brand")), Some(b"<svg/>")).unwrap();
        }
        store.put_deletion_request(&request("acme", "right")).unwrap();
        assert_eq!(store.confirm_deletion("acme", "wrong", "ops", 10).unwrap(), Err(ConfirmError::Mismatch));
        assert!(store.unfinished_org_deletions().unwrap().is_empty(), "a wrong code records nothing");
        assert!(store.confirm_deletion("acme", "right", "key:ops", 10).unwrap().is_ok());
        assert_eq!(store.confirm_deletion("acme", "right", "key:ops", 11).unwrap(), Err(ConfirmError::NotRequested), "spent once");
        let pending = store.unfinished_org_deletions().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!((pending[0].org.as_str(), pending[0].deleted_by.as_str(), pending[0].finished_at_ms), ("acme", "key:ops", None));
        assert!(store.org("acme").unwrap().is_some(), "nothing removed yet");
        assert!(store.create_org(&org("acme")).is_err(), "the id is reserved from the confirmation on");

        let mut steps = Vec::new();
        let removed = store.erase_org("acme", "key:ops", 20, &mut |step| steps.push(step.to_string())).unwrap();
        assert_eq!(steps.first().map(String::as_str), Some("org"));
        assert_eq!((removed["orgs"], removed["settings"], removed["branding"]), (1, 1, 2), "{removed:?}");
        assert!(store.unfinished_org_deletions().unwrap().is_empty());
        let tombstone = store.org_tombstone("acme").unwrap().unwrap();
        assert_eq!((tombstone.started_at_ms, tombstone.finished_at_ms, tombstone.deleted_by.as_str()), (10, Some(20), "key:ops"));
        assert!(store.branding("acme").unwrap().is_none() && store.branding_logo("acme").unwrap().is_none());
        assert_eq!(store.org_settings("acme").unwrap(), OrgSettings::default());
        for tree in store.trees_containing(b"acme\0").unwrap().keys() {
            assert!(["org_tombstones"].contains(&tree.as_str()) || tree.starts_with("audit"), "acme left in {tree}");
        }
        // An org whose id starts with the deleted one's keeps everything.
        assert_eq!(store.branding("acme-2").unwrap().unwrap().product_name, "acme-2 brand");
        assert!(store.branding_logo("acme-2").unwrap().is_some());
        assert!(store.org_settings("acme-2").unwrap().exec_enabled);
        assert!(store.org("acme-2").unwrap().is_some());

        // Running it again (a resumed deletion) removes nothing more and stays finished.
        let again = store.erase_org("acme", "key:ops", 30, &mut |_| {}).unwrap();
        assert_eq!(again["orgs"], 1, "counts add up over runs: {again:?}");
        assert!(store.unfinished_org_deletions().unwrap().is_empty());
    }
}
