//! The audit log: an append-only, hash-chained record of who changed what, when, from
//! where and with what outcome.
//!
//! Keys: entries by big-endian `seq` (1, 2, 3, … with no gaps) in `audit`; the per-org
//! index `org \0 seq` (empty values) in `audit_by_org`; the head of the chain (last seq and
//! hash) under `head` in `audit_head`. Every entry carries the hash of the one before it
//! (`prev_hash`, [`GENESIS_HASH`] for the first) and its own
//! `hash = SHA-256(prev_hash || canonical JSON of the entry without hash)`, so changing,
//! removing or reordering a stored entry breaks the chain at that entry ([`verify_chain`]).
//!
//! Personal fields (the actor, the client address, and the target's `command`, `email`,
//! `user` and `user_id`) can be erased without breaking the chain: an entry of format 2
//! stores, beside their text, a random salt and a salted SHA-256 of each
//! ([`AuditEntry::personal`]), and its hash covers the digests instead of the text.
//! Verifying checks the text against its digest while the salt is there. Erasing
//! ([`Store::erase_audit_personal`], for an org deletion) replaces the text with
//! [`ERASED`] and drops the salt, so the digests, all that is left, cannot be tried against
//! guesses. Entries of format 1 (written before) hash their text and verify as they always
//! did; they cannot be erased, only counted.
//!
//! Appends are serialised by one mutex, so two requests never chain onto the same entry;
//! an entry, its index key and the new head are written in one sled transaction.
//!
//! This module must not know HTTP: callers hand in actor, action, target and outcome as
//! plain text.

use super::{encode, Error, Store};
use gantry_shared::token::hex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// `prev_hash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Most entries one query looks at before it hands back a cursor (keeps a selective
/// filter over a long log from scanning all of it in one request).
pub const AUDIT_SCAN_LIMIT: usize = 10_000;

const HEAD_KEY: &[u8] = b"head";

/// Entry format whose hash covers salted digests of the personal fields.
pub const FORMAT_PERSONAL_DIGESTS: u8 = 2;

/// What an erased actor reads as.
pub const ERASED: &str = "[erased]";

/// Target keys whose values are personal: an exec's command line, a person's email or id.
const PERSONAL_TARGET_KEYS: [&str; 4] = ["command", "email", "user", "user_id"];

fn format_1() -> u8 {
    1
}

/// The trees of this module and the cached head of the chain.
#[derive(Debug, Clone)]
pub(super) struct Trees {
    entries: sled::Tree,
    by_org: sled::Tree,
    head: sled::Tree,
    /// The head as last written; `None` until the first append loads it. Holding this lock
    /// is what serialises appends.
    tail: Arc<Mutex<Option<Head>>>,
}

impl Trees {
    pub fn open(db: &sled::Db) -> Result<Trees, Error> {
        Ok(Trees { entries: db.open_tree("audit")?, by_org: db.open_tree("audit_by_org")?, head: db.open_tree("audit_head")?, tail: Arc::default() })
    }
}

/// The last entry of the chain, as recorded next to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

/// One audit record as stored and served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// `1` for entries written before personal digests (the hash covers every field's
    /// text), [`FORMAT_PERSONAL_DIGESTS`] since.
    #[serde(default = "format_1")]
    pub format: u8,
    /// Position in the global chain, from 1.
    pub seq: u64,
    /// When it was recorded, Unix milliseconds.
    pub at_ms: i64,
    /// Who acted: an email, `key:<id>`, `agent:<id>`, `system`, or `anonymous` for a
    /// request without valid credentials. For a login attempt, the email tried.
    pub actor: String,
    /// `user`, `api_key`, `agent`, `system` or `anonymous`.
    pub actor_kind: String,
    /// The org acted in, when there is one.
    pub org: Option<String>,
    /// What was done: `METHOD /route/{template}` for HTTP requests, a dotted name such as
    /// `deploy.report` otherwise.
    pub action: String,
    /// What it was done to: the route's path parameters, plus `id` of an object created.
    pub target: BTreeMap<String, String>,
    /// The HTTP status (`"201"`), or a state such as `healthy` or `error: …`.
    pub outcome: String,
    /// The `x-request-id` the hub answered the request with.
    pub request_id: Option<String>,
    /// The client's address as the hub saw it (`unknown` when it was not known).
    pub client_ip: Option<String>,
    /// `hash` of the entry before, [`GENESIS_HASH`] for the first.
    pub prev_hash: String,
    /// SHA-256 (hex) of `prev_hash` and the canonical JSON of every other field.
    pub hash: String,
    /// Format 2: `hex(SHA-256(salt, field name, text))` of each personal field, by name
    /// (`actor`, `client_ip`, `target.<key>`); the hash covers these, not the text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub personal: BTreeMap<String, String>,
    /// Format 2: the salt of those digests (hex); `None` once the fields were erased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
}

/// What a caller records; the store adds `seq`, `prev_hash` and `hash`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewAuditEntry {
    pub at_ms: i64,
    pub actor: String,
    pub actor_kind: String,
    pub org: Option<String>,
    pub action: String,
    pub target: BTreeMap<String, String>,
    pub outcome: String,
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
}

/// The hashed form of an entry: every field but `hash`, in this fixed order. serde_json
/// writes it compactly with a fixed escaping and `BTreeMap` keys sorted, so the same entry
/// always gives the same bytes.
#[derive(Serialize)]
struct Canonical<'a> {
    seq: u64,
    at_ms: i64,
    actor: &'a str,
    actor_kind: &'a str,
    org: Option<&'a str>,
    action: &'a str,
    target: &'a BTreeMap<String, String>,
    outcome: &'a str,
    request_id: Option<&'a str>,
    client_ip: Option<&'a str>,
    prev_hash: &'a str,
}

/// The hashed form of a format 2 entry: personal fields only as their digests.
#[derive(Serialize)]
struct CanonicalV2<'a> {
    format: u8,
    seq: u64,
    at_ms: i64,
    actor_kind: &'a str,
    org: Option<&'a str>,
    action: &'a str,
    /// The target without its personal keys.
    target: BTreeMap<&'a str, &'a str>,
    outcome: &'a str,
    request_id: Option<&'a str>,
    personal: &'a BTreeMap<String, String>,
    prev_hash: &'a str,
}

fn personal_digest(salt: &str, field: &str, text: &str) -> String {
    let mut digest = Sha256::new();
    for part in ["gantry-audit-personal", salt, field, text] {
        digest.update(part.as_bytes());
        digest.update([0u8]);
    }
    hex(&digest.finalize())
}

/// The personal fields of an entry that was not erased: `(name, text)`.
fn personal_fields(entry: &AuditEntry) -> Vec<(String, &str)> {
    let mut out = vec![("actor".to_string(), entry.actor.as_str())];
    if let Some(ip) = &entry.client_ip {
        out.push(("client_ip".to_string(), ip.as_str()));
    }
    for (key, value) in &entry.target {
        if PERSONAL_TARGET_KEYS.contains(&key.as_str()) {
            out.push((format!("target.{key}"), value.as_str()));
        }
    }
    out
}

/// Whether the personal text of a format 2 entry matches its digests (or, erased, is gone).
fn check_personal(entry: &AuditEntry) -> Result<(), String> {
    let Some(salt) = &entry.salt else {
        if entry.actor != ERASED {
            return Err("personal field actor modified: the entry was erased but names an actor".into());
        }
        if entry.client_ip.is_some() || entry.target.keys().any(|k| PERSONAL_TARGET_KEYS.contains(&k.as_str())) {
            return Err("personal fields modified: the entry was erased but holds personal text".into());
        }
        return Ok(());
    };
    let fields = personal_fields(entry);
    for (name, text) in &fields {
        if entry.personal.get(name) != Some(&personal_digest(salt, name, text)) {
            return Err(format!("personal field {name} modified: its text does not match its digest"));
        }
    }
    if let Some(name) = entry.personal.keys().find(|name| !fields.iter().any(|(field, _)| field == *name)) {
        return Err(format!("personal field {name} modified: its text was removed"));
    }
    Ok(())
}

/// `hex(SHA-256(prev_hash || canonical JSON of the entry without hash))`, where
/// `prev_hash` is taken as its hex text. Format 2 entries put the digests of their
/// personal fields in the canonical JSON instead of the text (see the module doc).
pub fn entry_hash(entry: &AuditEntry) -> String {
    if entry.format == FORMAT_PERSONAL_DIGESTS {
        let canonical = CanonicalV2 {
            format: entry.format,
            seq: entry.seq,
            at_ms: entry.at_ms,
            actor_kind: &entry.actor_kind,
            org: entry.org.as_deref(),
            action: &entry.action,
            target: entry.target.iter().filter(|(k, _)| !PERSONAL_TARGET_KEYS.contains(&k.as_str())).map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            outcome: &entry.outcome,
            request_id: entry.request_id.as_deref(),
            personal: &entry.personal,
            prev_hash: &entry.prev_hash,
        };
        let mut digest = Sha256::new();
        digest.update(entry.prev_hash.as_bytes());
        digest.update(encode(&canonical));
        return hex(&digest.finalize());
    }
    let canonical = Canonical {
        seq: entry.seq,
        at_ms: entry.at_ms,
        actor: &entry.actor,
        actor_kind: &entry.actor_kind,
        org: entry.org.as_deref(),
        action: &entry.action,
        target: &entry.target,
        outcome: &entry.outcome,
        request_id: entry.request_id.as_deref(),
        client_ip: entry.client_ip.as_deref(),
        prev_hash: &entry.prev_hash,
    };
    let mut digest = Sha256::new();
    digest.update(entry.prev_hash.as_bytes());
    digest.update(encode(&canonical));
    hex(&digest.finalize())
}

/// Filters of an audit query; every field set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only this org's entries (through the per-org index).
    pub org: Option<String>,
    /// Exactly this actor.
    pub actor: Option<String>,
    /// Actions starting with this text (`POST`, `deploy.`, or a whole action).
    pub action: Option<String>,
    /// Recorded at or after, Unix ms.
    pub from_ms: Option<i64>,
    /// Recorded before, Unix ms.
    pub to_ms: Option<i64>,
    /// Only entries older than this seq (the cursor of the previous page).
    pub before_seq: Option<u64>,
}

impl AuditFilter {
    fn matches(&self, entry: &AuditEntry) -> bool {
        self.actor.as_ref().is_none_or(|a| *a == entry.actor)
            && self.action.as_ref().is_none_or(|a| entry.action.starts_with(a.as_str()))
            && self.from_ms.is_none_or(|from| entry.at_ms >= from)
            && self.to_ms.is_none_or(|to| entry.at_ms < to)
    }
}

/// One page of a query, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Pass as `before_seq` for the next page; `None` when there is no more. A page can be
    /// short (even empty) and still have a cursor when the scan limit was reached.
    pub next_cursor: Option<u64>,
}

/// The outcome of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditVerdict {
    /// Every entry is in place and chained; `last_hash` is the head's hash (worth keeping
    /// somewhere else: a log cut back to an earlier head looks intact on its own).
    Intact { entries: u64, last_hash: String },
    /// The first entry at which the chain does not hold, and why.
    Broken { seq: u64, reason: String },
}

/// Walks stored entries in key order and finds the first one that breaks the chain.
#[derive(Debug)]
struct ChainWalk {
    expected_seq: u64,
    prev_hash: String,
}

impl ChainWalk {
    fn new() -> ChainWalk {
        ChainWalk { expected_seq: 1, prev_hash: GENESIS_HASH.to_string() }
    }

    /// Check the next stored `(key, value)`; `Err((seq, reason))` at the first break.
    fn step(&mut self, key: &[u8], value: &[u8]) -> Result<(), (u64, String)> {
        let expected = self.expected_seq;
        let Ok(raw) = <[u8; 8]>::try_from(key) else {
            return Err((expected, format!("stray key {} in the audit tree", hex(key))));
        };
        let seq = u64::from_be_bytes(raw);
        if seq != expected {
            let missing = if seq == expected + 1 { format!("entry {expected} is missing") } else { format!("entries {expected} to {} are missing", seq - 1) };
            return Err((expected, format!("gap: {missing}")));
        }
        let entry: AuditEntry = serde_json::from_slice(value).map_err(|e| (seq, format!("entry does not parse: {e}")))?;
        if entry.seq != seq {
            return Err((seq, format!("entry stored under seq {seq} says seq {}", entry.seq)));
        }
        match entry.format {
            1 => {}
            FORMAT_PERSONAL_DIGESTS => check_personal(&entry).map_err(|reason| (seq, format!("hash mismatch: {reason}")))?,
            other => return Err((seq, format!("entry has unknown format {other}"))),
        }
        if entry.prev_hash != self.prev_hash {
            return Err((seq, format!("broken link: prev_hash {} is not the hash of entry {} ({})", entry.prev_hash, seq - 1, self.prev_hash)));
        }
        let computed = entry_hash(&entry);
        if computed != entry.hash {
            return Err((seq, format!("hash mismatch: the entry was modified (stored {}, computed {computed})", entry.hash)));
        }
        self.expected_seq = seq + 1;
        self.prev_hash = entry.hash;
        Ok(())
    }

    /// Check the end of the chain against the recorded head.
    fn finish(self, head: Option<Head>) -> AuditVerdict {
        let last = self.expected_seq - 1;
        match head {
            None if last == 0 => AuditVerdict::Intact { entries: 0, last_hash: self.prev_hash },
            None => AuditVerdict::Broken { seq: 1, reason: format!("the head record is missing but {last} entries exist") },
            Some(head) if head.seq > last => AuditVerdict::Broken {
                seq: last + 1,
                reason: format!("gap: the log ends at entry {last} but its head records entry {} (entries were removed from the end)", head.seq),
            },
            Some(head) if head.seq < last => {
                AuditVerdict::Broken { seq: head.seq + 1, reason: format!("entries after the recorded head (entry {}) were added outside the hub", head.seq) }
            }
            Some(head) if head.hash != self.prev_hash => AuditVerdict::Broken {
                seq: last,
                reason: format!("hash mismatch: the head records hash {} for entry {last}, the entry has {}", head.hash, self.prev_hash),
            },
            Some(_) => AuditVerdict::Intact { entries: last, last_hash: self.prev_hash },
        }
    }
}

/// Walk `entries` (stored `(key, value)` pairs in key order) against `head`: the first
/// entry out of sequence (a gap), not chained to the one before (a broken link), or whose
/// hash does not match its contents (a modified entry).
pub fn verify_chain(entries: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>, head: Option<Head>) -> AuditVerdict {
    let mut walk = ChainWalk::new();
    for (key, value) in entries {
        if let Err((seq, reason)) = walk.step(&key, &value) {
            return AuditVerdict::Broken { seq, reason };
        }
    }
    walk.finish(head)
}

fn org_seq_key(org: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(org.len() + 9);
    key.extend_from_slice(org.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

impl Store {
    fn audit_head(&self) -> Result<Option<Head>, Error> {
        Store::get(&self.audit.head, "audit head", HEAD_KEY)
    }

    /// Append an entry at the end of the chain and make it durable; returns it as stored.
    pub fn append_audit(&self, new: NewAuditEntry) -> Result<AuditEntry, Error> {
        let _writing = self.writing();
        let entry = {
            let mut tail = self.audit.tail.lock().unwrap_or_else(|p| p.into_inner());
            let head = match tail.clone() {
                Some(head) => head,
                None => self.audit_head()?.unwrap_or(Head { seq: 0, hash: GENESIS_HASH.to_string() }),
            };
            let mut entry = AuditEntry {
                format: FORMAT_PERSONAL_DIGESTS,
                seq: head.seq + 1,
                at_ms: new.at_ms,
                actor: new.actor,
                actor_kind: new.actor_kind,
                org: new.org,
                action: new.action,
                target: new.target,
                outcome: new.outcome,
                request_id: new.request_id,
                client_ip: new.client_ip,
                prev_hash: head.hash,
                hash: String::new(),
                personal: BTreeMap::new(),
                salt: Some(hex(&rand::random::<[u8; 16]>())),
            };
            if let Some(salt) = &entry.salt {
                entry.personal = personal_fields(&entry).into_iter().map(|(name, text)| (name.clone(), personal_digest(salt, &name, text))).collect();
            }
            entry.hash = entry_hash(&entry);
            let new_head = Head { seq: entry.seq, hash: entry.hash.clone() };
            let (value, head_value) = (encode(&entry), encode(&new_head));
            let index_key = entry.org.as_deref().map(|org| org_seq_key(org, entry.seq));
            (&self.audit.entries, &self.audit.by_org, &self.audit.head)
                .transaction(|(entries, by_org, head)| {
                    entries.insert(&entry.seq.to_be_bytes(), value.as_slice())?;
                    if let Some(key) = &index_key {
                        by_org.insert(key.as_slice(), &[] as &[u8])?;
                    }
                    head.insert(HEAD_KEY, head_value.as_slice())?;
                    Ok::<_, ConflictableTransactionError<Error>>(())
                })
                .map_err(|e| match e {
                    TransactionError::Abort(e) => e,
                    TransactionError::Storage(e) => Error::Sled(e),
                })?;
            *tail = Some(new_head);
            entry
        };
        self.durable()?;
        Ok(entry)
    }

    /// Entries matching `filter`, newest first, at most `limit` of them.
    pub fn audit_entries(&self, filter: &AuditFilter, limit: usize) -> Result<AuditPage, Error> {
        let before = filter.before_seq.unwrap_or(u64::MAX);
        let seqs: Box<dyn Iterator<Item = Result<u64, Error>>> = match &filter.org {
            Some(org) => {
                let prefix_len = org.len() + 1;
                Box::new(self.audit.by_org.range(org_seq_key(org, 0)..org_seq_key(org, before)).keys().rev().map(move |key| {
                    let key = key?;
                    let raw: [u8; 8] = key.get(prefix_len..).and_then(|s| s.try_into().ok()).ok_or_else(|| Error::Corrupt("audit index key".into()))?;
                    Ok(u64::from_be_bytes(raw))
                }))
            }
            None => Box::new(self.audit.entries.range(..before.to_be_bytes()).keys().rev().map(|key| {
                let raw: [u8; 8] = key?.as_ref().try_into().map_err(|_| Error::Corrupt("audit key".into()))?;
                Ok(u64::from_be_bytes(raw))
            })),
        };
        let mut page = AuditPage::default();
        for (examined, seq) in seqs.enumerate() {
            let seq = seq?;
            if examined == AUDIT_SCAN_LIMIT {
                page.next_cursor = Some(seq + 1);
                break;
            }
            let Some(entry) = Store::get::<AuditEntry>(&self.audit.entries, "audit entry", &seq.to_be_bytes())? else { continue };
            if !filter.matches(&entry) {
                continue;
            }
            page.entries.push(entry);
            if page.entries.len() == limit {
                page.next_cursor = Some(seq);
                break;
            }
        }
        Ok(page)
    }

    /// Erase the personal fields (see the module doc) of every entry of org `org` or whose
    /// actor is one of `actors`. Returns how many entries were erased and how many of
    /// format 1 matched and keep their text (their hash covers it). Hashes and the chain
    /// are unchanged; running it again erases nothing more.
    pub fn erase_audit_personal(&self, org: &str, actors: &[String]) -> Result<(u64, u64), Error> {
        let _writing = self.writing();
        let (mut erased, mut kept) = (0, 0);
        for item in self.audit.entries.iter() {
            let (key, raw) = item?;
            let mut entry: AuditEntry = super::decode("audit entry", &raw)?;
            if entry.org.as_deref() != Some(org) && !actors.contains(&entry.actor) {
                continue;
            }
            if entry.format != FORMAT_PERSONAL_DIGESTS {
                kept += 1;
                continue;
            }
            if entry.salt.is_none() {
                continue;
            }
            entry.actor = ERASED.to_string();
            entry.client_ip = None;
            entry.target.retain(|k, _| !PERSONAL_TARGET_KEYS.contains(&k.as_str()));
            entry.salt = None;
            // Nothing else rewrites an entry; a failed swap would mean the log changed
            // under the write gate, which is a corrupt store.
            self.audit
                .entries
                .compare_and_swap(&key, Some(raw), Some(encode(&entry)))?
                .map_err(|_| Error::Corrupt(format!("audit entry {} changed while being erased", entry.seq)))?;
            erased += 1;
        }
        self.durable()?;
        Ok((erased, kept))
    }

    /// Walk the whole chain (see [`verify_chain`]).
    pub fn verify_audit(&self) -> Result<AuditVerdict, Error> {
        let head = self.audit_head()?;
        let mut walk = ChainWalk::new();
        for item in self.audit.entries.iter() {
            let (key, value) = item?;
            if let Err((seq, reason)) = walk.step(&key, &value) {
                return Ok(AuditVerdict::Broken { seq, reason });
            }
        }
        Ok(walk.finish(head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("gantry-audit-test-{}-{}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn new(actor: &str, org: Option<&str>, action: &str, at_ms: i64) -> NewAuditEntry {
        NewAuditEntry {
            at_ms,
            actor: actor.into(),
            actor_kind: "user".into(),
            org: org.map(String::from),
            action: action.into(),
            target: [("org".to_string(), org.unwrap_or("-").to_string())].into(),
            outcome: "201".into(),
            request_id: Some(format!("req_{at_ms}")),
            client_ip: Some("127.0.0.1".into()),
        }
    }

    fn store_with(entries: usize) -> Store {
        let store = Store::create(&tempdir()).unwrap();
        for i in 0..entries {
            let org = if i % 2 == 0 { "acme" } else { "globex" };
            store.append_audit(new("ops@example.com", Some(org), "POST /api/v1/orgs/{org}/checks", 1000 + i as i64)).unwrap();
        }
        store
    }

    #[test]
    fn appends_chain_each_entry_to_the_one_before() {
        let store = store_with(3);
        let page = store.audit_entries(&AuditFilter::default(), 10).unwrap();
        let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 2, 1], "newest first, numbered from 1");
        assert_eq!(page.entries[2].prev_hash, GENESIS_HASH);
        assert_eq!(page.entries[1].prev_hash, page.entries[2].hash);
        assert_eq!(page.entries[0].prev_hash, page.entries[1].hash);
        assert!(page.entries.iter().all(|e| entry_hash(e) == e.hash));
        assert_eq!(store.verify_audit().unwrap(), AuditVerdict::Intact { entries: 3, last_hash: page.entries[0].hash.clone() });
    }

    #[test]
    fn an_empty_log_verifies() {
        let store = Store::create(&tempdir()).unwrap();
        assert_eq!(store.verify_audit().unwrap(), AuditVerdict::Intact { entries: 0, last_hash: GENESIS_HASH.into() });
    }

    #[test]
    fn the_chain_continues_after_a_reopen() {
        let dir = tempdir();
        {
            let store = Store::create(&dir).unwrap();
            store.append_audit(new("a", None, "x", 1)).unwrap();
        }
        let store = Store::open(&dir).unwrap();
        let second = store.append_audit(new("b", None, "y", 2)).unwrap();
        assert_eq!(second.seq, 2);
        assert!(matches!(store.verify_audit().unwrap(), AuditVerdict::Intact { entries: 2, .. }));
    }

    #[test]
    fn concurrent_appends_never_fork_the_chain() {
        let store = Store::create(&tempdir()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        store.append_audit(new(&format!("t{t}"), Some("acme"), "POST", i)).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(matches!(store.verify_audit().unwrap(), AuditVerdict::Intact { entries: 100, .. }));
    }

    #[test]
    fn a_modified_entry_is_detected_at_its_seq() {
        let store = store_with(4);
        let key = 2u64.to_be_bytes();
        let stored = store.audit.entries.get(key).unwrap().unwrap();
        let text = String::from_utf8(stored.to_vec()).unwrap().replace("\"outcome\":\"201\"", "\"outcome\":\"200\"");
        store.audit.entries.insert(key, text.as_bytes()).unwrap();
        match store.verify_audit().unwrap() {
            AuditVerdict::Broken { seq, reason } => {
                assert_eq!(seq, 2);
                assert!(reason.starts_with("hash mismatch"), "{reason}");
            }
            other => panic!("tampering not detected: {other:?}"),
        }
    }

    #[test]
    fn a_modified_entry_with_a_recomputed_hash_breaks_the_next_link() {
        let store = store_with(4);
        let key = 2u64.to_be_bytes();
        let mut entry: AuditEntry = serde_json::from_slice(&store.audit.entries.get(key).unwrap().unwrap()).unwrap();
        entry.outcome = "500".into();
        entry.hash = entry_hash(&entry);
        store.audit.entries.insert(key, encode(&entry)).unwrap();
        match store.verify_audit().unwrap() {
            AuditVerdict::Broken { seq, reason } => {
                assert_eq!(seq, 3);
                assert!(reason.starts_with("broken link"), "{reason}");
            }
            other => panic!("tampering not detected: {other:?}"),
        }
    }

    #[test]
    fn a_deleted_entry_is_a_gap() {
        let store = store_with(4);
        store.audit.entries.remove(3u64.to_be_bytes()).unwrap();
        match store.verify_audit().unwrap() {
            AuditVerdict::Broken { seq, reason } => {
                assert_eq!(seq, 3);
                assert!(reason.starts_with("gap"), "{reason}");
            }
            other => panic!("deletion not detected: {other:?}"),
        }
    }

    #[test]
    fn a_deleted_last_entry_is_a_gap_against_the_head() {
        let store = store_with(4);
        store.audit.entries.remove(4u64.to_be_bytes()).unwrap();
        match store.verify_audit().unwrap() {
            AuditVerdict::Broken { seq, reason } => {
                assert_eq!(seq, 4);
                assert!(reason.starts_with("gap"), "{reason}");
            }
            other => panic!("truncation not detected: {other:?}"),
        }
    }

    #[test]
    fn queries_filter_by_org_actor_action_and_time_and_page_by_cursor() {
        let store = store_with(6);
        store.append_audit(new("key:abc", Some("acme"), "DELETE /api/v1/orgs/{org}/checks/{id}", 2000)).unwrap();
        let acme = AuditFilter { org: Some("acme".into()), ..AuditFilter::default() };
        let page = store.audit_entries(&acme, 2).unwrap();
        assert_eq!(page.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [7, 5]);
        assert_eq!(page.next_cursor, Some(5));
        let rest = store.audit_entries(&AuditFilter { before_seq: page.next_cursor, ..acme.clone() }, 10).unwrap();
        assert_eq!(rest.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 1]);
        assert_eq!(rest.next_cursor, None);
        let by_actor = store.audit_entries(&AuditFilter { actor: Some("key:abc".into()), ..AuditFilter::default() }, 10).unwrap();
        assert_eq!(by_actor.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [7]);
        let by_action = store.audit_entries(&AuditFilter { action: Some("POST".into()), org: Some("globex".into()), ..AuditFilter::default() }, 10).unwrap();
        assert_eq!(by_action.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [6, 4, 2]);
        let by_time = store.audit_entries(&AuditFilter { from_ms: Some(1002), to_ms: Some(1004), ..AuditFilter::default() }, 10).unwrap();
        assert_eq!(by_time.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 3]);
    }

    fn stored(store: &Store, seq: u64) -> AuditEntry {
        serde_json::from_slice(&store.audit.entries.get(seq.to_be_bytes()).unwrap().unwrap()).unwrap()
    }

    fn broken_at(store: &Store) -> (u64, String) {
        match store.verify_audit().unwrap() {
            AuditVerdict::Broken { seq, reason } => (seq, reason),
            other => panic!("tampering not detected: {other:?}"),
        }
    }

    #[test]
    fn a_modified_actor_is_detected_at_its_seq_even_with_a_recomputed_hash() {
        let store = store_with(4);
        let mut entry = stored(&store, 2);
        entry.actor = "someone else".into();
        entry.hash = entry_hash(&entry);
        store.audit.entries.insert(2u64.to_be_bytes(), encode(&entry)).unwrap();
        let (seq, reason) = broken_at(&store);
        assert_eq!(seq, 2);
        assert!(reason.starts_with("hash mismatch: personal field actor"), "{reason}");
    }

    #[test]
    fn erasing_an_orgs_personal_fields_keeps_the_chain_intact() {
        let store = store_with(4);
        let mut exec = new("owner@acme.example", Some("acme"), "POST /api/v1/agents/{id}/exec", 3000);
        exec.target.insert("command".into(), "echo exec-marker-5d1".into());
        exec.client_ip = Some("198.51.100.7".into());
        store.append_audit(exec).unwrap();
        store.append_audit(new("owner@acme.example", None, "POST /api/v1/auth/logout", 3001)).unwrap();
        let before = store.verify_audit().unwrap();

        assert_eq!(store.erase_audit_personal("acme", &["owner@acme.example".to_string()]).unwrap(), (4, 0));
        assert_eq!(store.verify_audit().unwrap(), before, "same chain, same head");
        for seq in [1, 3, 5, 6] {
            let entry = stored(&store, seq);
            assert_eq!((entry.actor.as_str(), entry.client_ip.as_deref(), entry.salt.as_deref()), (ERASED, None, None), "{entry:?}");
            assert!(!entry.target.contains_key("command"));
            assert_eq!(entry.personal.len(), if seq == 5 { 3 } else { 2 }, "the digests stay: {entry:?}");
        }
        assert_eq!(stored(&store, 5).target.get("org").map(String::as_str), Some("acme"), "what is not personal stays");
        for seq in [2, 4] {
            assert_eq!(stored(&store, seq).actor, "ops@example.com", "other orgs' entries keep their text");
        }
        for item in store.audit.entries.iter() {
            let (_, raw) = item.unwrap();
            let text = String::from_utf8_lossy(&raw);
            assert!(!text.contains("owner@acme.example") && !text.contains("exec-marker-5d1") && !text.contains("198.51.100.7"), "{text}");
        }
        assert_eq!(store.erase_audit_personal("acme", &[]).unwrap(), (0, 0), "erasing again finds nothing left");

        // Putting text back into an erased entry is tampering.
        let mut entry = stored(&store, 5);
        entry.actor = "owner@acme.example".into();
        store.audit.entries.insert(5u64.to_be_bytes(), encode(&entry)).unwrap();
        let (seq, reason) = broken_at(&store);
        assert_eq!(seq, 5);
        assert!(reason.starts_with("hash mismatch: personal field actor"), "{reason}");
    }

    #[test]
    fn a_chain_of_format_1_entries_still_verifies_and_continues_in_format_2() {
        let store = Store::create(&tempdir()).unwrap();
        let mut prev = GENESIS_HASH.to_string();
        for seq in 1..=3u64 {
            let mut entry = AuditEntry {
                format: 1,
                seq,
                at_ms: seq as i64,
                actor: "old@acme.example".into(),
                actor_kind: "user".into(),
                org: Some("acme".into()),
                action: "POST /api/v1/orgs/{org}/checks".into(),
                target: BTreeMap::new(),
                outcome: "201".into(),
                request_id: None,
                client_ip: Some("127.0.0.1".into()),
                prev_hash: prev.clone(),
                hash: String::new(),
                personal: BTreeMap::new(),
                salt: None,
            };
            entry.hash = entry_hash(&entry);
            prev = entry.hash.clone();
            // Written as a hub of format 1 wrote it: no `format`, `personal` or `salt` keys.
            let mut value = serde_json::to_value(&entry).unwrap();
            value.as_object_mut().unwrap().remove("format");
            store.audit.entries.insert(seq.to_be_bytes(), serde_json::to_vec(&value).unwrap()).unwrap();
            store.audit.by_org.insert(org_seq_key("acme", seq), &[] as &[u8]).unwrap();
            store.audit.head.insert(HEAD_KEY, encode(&Head { seq, hash: prev.clone() })).unwrap();
        }
        assert!(matches!(store.verify_audit().unwrap(), AuditVerdict::Intact { entries: 3, .. }));
        let next = store.append_audit(new("new@acme.example", Some("acme"), "POST", 10)).unwrap();
        assert_eq!((next.seq, next.format, next.prev_hash.as_str()), (4, FORMAT_PERSONAL_DIGESTS, prev.as_str()));
        assert!(matches!(store.verify_audit().unwrap(), AuditVerdict::Intact { entries: 4, .. }));
        assert_eq!(store.erase_audit_personal("acme", &[]).unwrap(), (1, 3), "format 1 entries are counted, not erased");
        assert!(matches!(store.verify_audit().unwrap(), AuditVerdict::Intact { entries: 4, .. }));
        assert_eq!(stored(&store, 1).actor, "old@acme.example");
    }
}
