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

/// `hex(SHA-256(prev_hash || canonical JSON of the entry without hash))`, where
/// `prev_hash` is taken as its hex text.
pub fn entry_hash(entry: &AuditEntry) -> String {
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
            };
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
        entry.actor = "someone else".into();
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
}
