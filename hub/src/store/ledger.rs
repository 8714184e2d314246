//! The usage ledger: append-only entries of metered usage, each under a deterministic key
//! `(org, meter, hour, source)`, numbered by one global sequence.
//!
//! Trees and keys:
//! - `ledger_entries`: `seq (u64 BE)` → the entry (JSON). Read in order by exporters
//!   ([`Store::ledger_since`]).
//! - `ledger_keys`: `org \0 hour (i64, order-preserving BE) meter (u8) source` →
//!   `[seq u64 BE][quantity i64 BE]`. The deterministic key: a second write of the same key
//!   is a duplicate (same quantity) or a conflict (another quantity). It sorts per org and
//!   hour, so a period of one org is a range scan, and sums need no entry decoding.
//! - `ledger_hours`: `hour org \0 meter source` → `seq`, for queries across orgs.
//! - `ledger_meta`: `seq` → the last sequence number given out.
//! - `ledger_work`: the metering's own durable scratch (hourly gauge maxima, cursors); see
//!   `billing/ledger.rs`. The ledger proper never reads it.
//! - `ledger_conflicts`: `org \0 key text` → [`LedgerConflict`]: every refused re-record of
//!   a key with another quantity, kept until an operator resolves it (it fires the org's
//!   `ledger_conflict` alert until then).
//!
//! An append writes the entry, both index keys and the sequence counter in one sled
//! transaction. Nothing here rewrites or deletes an entry: corrections are new entries.
//! This module knows nothing of where usage comes from.

use super::{decode, encode, Error, Store};
use crate::billing::Meter;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The trees of this module.
#[derive(Debug, Clone)]
pub(super) struct Trees {
    entries: sled::Tree,
    keys: sled::Tree,
    hours: sled::Tree,
    meta: sled::Tree,
    work: sled::Tree,
    conflict_records: sled::Tree,
    /// Conflicting re-records refused since the store opened (exported as a metric).
    conflicts: Arc<AtomicU64>,
}

impl Trees {
    pub fn open(db: &sled::Db) -> Result<Trees, Error> {
        Ok(Trees {
            entries: db.open_tree("ledger_entries")?,
            keys: db.open_tree("ledger_keys")?,
            hours: db.open_tree("ledger_hours")?,
            meta: db.open_tree("ledger_meta")?,
            work: db.open_tree("ledger_work")?,
            conflict_records: db.open_tree("ledger_conflicts")?,
            conflicts: Arc::default(),
        })
    }
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EntryKind {
    /// Usage as metered.
    Usage,
    /// A compensating entry (signed quantity) made by an operator or by late usage.
    Correction {
        reason: String,
        /// Who made it: an operator's email, or `hub` for late usage.
        actor: String,
        /// The billing period the correction is about, when it is about an earlier one.
        #[serde(default)]
        corrects_period_start_ms: Option<i64>,
    },
}

/// One ledger entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LedgerEntry {
    /// Global append order, from 1; assigned by [`Store::record`] (the caller's is ignored).
    pub seq: u64,
    pub org: String,
    pub meter: Meter,
    /// Start of the UTC hour the usage belongs to.
    pub hour_ms: i64,
    /// Where the usage was measured: an agent id, `hub`, `<deployment>:<revision>`, or
    /// `correction:<id>` / `late:<agent>:<total>` for corrections. Unique per
    /// `(org, meter, hour)`.
    pub source: String,
    /// Units of the meter; negative only in corrections.
    pub quantity: i64,
    pub kind: EntryKind,
    pub recorded_at_ms: i64,
}

impl LedgerEntry {
    /// The deterministic key as text, `org/meter/hour_ms/source` (for messages and ids).
    pub fn key_text(&self) -> String {
        format!("{}/{}/{}/{}", self.org, self.meter, self.hour_ms, self.source)
    }
}

/// A refused re-record: the key held one quantity and another was offered. Kept for an
/// operator to look into (usage counted twice, or a metering fault); resolving it records
/// who looked and what they decided, and never changes the ledger (a correction does that).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LedgerConflict {
    pub org: String,
    /// The entry's key, `org/meter/hour_ms/source`.
    pub key: String,
    pub meter: Meter,
    pub hour_ms: i64,
    pub source: String,
    /// The quantity the ledger holds.
    pub recorded: i64,
    /// The last quantity refused.
    pub refused: i64,
    /// How many times a conflicting quantity was offered.
    pub attempts: u64,
    pub first_at_ms: i64,
    pub last_at_ms: i64,
    pub resolved_at_ms: Option<i64>,
    pub resolved_by: Option<String>,
    pub resolution: Option<String>,
}

fn conflict_key(org: &str, key: &str) -> Vec<u8> {
    [org.as_bytes(), b"\0", key.as_bytes()].concat()
}

/// What [`Store::record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A new entry with this sequence number.
    Appended { seq: u64 },
    /// The same key with the same quantity was already there (entry `seq`): nothing written.
    Duplicate { seq: u64 },
}

/// Timestamps as order-preserving unsigned keys.
fn ts_key(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

fn ts_from(bytes: &[u8]) -> i64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[..8]);
    (u64::from_be_bytes(raw) ^ (1 << 63)) as i64
}

fn meter_byte(meter: Meter) -> u8 {
    Meter::ALL.iter().position(|m| *m == meter).unwrap_or(0) as u8
}

fn meter_from(byte: u8) -> Result<Meter, Error> {
    Meter::ALL.get(usize::from(byte)).copied().ok_or_else(|| Error::Corrupt(format!("ledger meter byte {byte}")))
}

fn org_bound(org: &str, ms: i64) -> Vec<u8> {
    let mut key = Vec::with_capacity(org.len() + 9);
    key.extend_from_slice(org.as_bytes());
    key.push(0);
    key.extend_from_slice(&ts_key(ms));
    key
}

fn entry_key(org: &str, hour_ms: i64, meter: Meter, source: &str) -> Vec<u8> {
    let mut key = org_bound(org, hour_ms);
    key.push(meter_byte(meter));
    key.extend_from_slice(source.as_bytes());
    key
}

fn hour_key(org: &str, hour_ms: i64, meter: Meter, source: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(org.len() + source.len() + 10);
    key.extend_from_slice(&ts_key(hour_ms));
    key.extend_from_slice(org.as_bytes());
    key.push(0);
    key.push(meter_byte(meter));
    key.extend_from_slice(source.as_bytes());
    key
}

fn key_value(seq: u64, quantity: i64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&seq.to_be_bytes());
    out[8..].copy_from_slice(&quantity.to_be_bytes());
    out
}

fn parse_key_value(value: &[u8]) -> Result<(u64, i64), Error> {
    let bytes: &[u8; 16] = value.try_into().map_err(|_| Error::Corrupt("ledger key value".into()))?;
    let mut seq = [0u8; 8];
    let mut quantity = [0u8; 8];
    seq.copy_from_slice(&bytes[..8]);
    quantity.copy_from_slice(&bytes[8..]);
    Ok((u64::from_be_bytes(seq), i64::from_be_bytes(quantity)))
}

fn seq_of(value: &[u8]) -> Result<u64, Error> {
    let bytes: [u8; 8] = value.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| Error::Corrupt("ledger sequence".into()))?;
    Ok(u64::from_be_bytes(bytes))
}

const SEQ_KEY: &[u8] = b"seq";

/// One entry's outcome inside the append transaction.
enum Outcome {
    Appended(u64),
    Duplicate(u64),
    Conflict { existing: i64 },
}

fn append(
    entries: &TransactionalTree,
    keys: &TransactionalTree,
    hours: &TransactionalTree,
    meta: &TransactionalTree,
    entry: &LedgerEntry,
) -> Result<Outcome, ConflictableTransactionError<Error>> {
    let key = entry_key(&entry.org, entry.hour_ms, entry.meter, &entry.source);
    if let Some(existing) = keys.get(&key)? {
        let (seq, quantity) = parse_key_value(&existing).map_err(ConflictableTransactionError::Abort)?;
        return Ok(if quantity == entry.quantity { Outcome::Duplicate(seq) } else { Outcome::Conflict { existing: quantity } });
    }
    let last = match meta.get(SEQ_KEY)? {
        Some(raw) => seq_of(&raw).map_err(ConflictableTransactionError::Abort)?,
        None => 0,
    };
    let seq = last + 1;
    let mut stored = entry.clone();
    stored.seq = seq;
    entries.insert(&seq.to_be_bytes(), encode(&stored))?;
    keys.insert(key, &key_value(seq, entry.quantity))?;
    hours.insert(hour_key(&entry.org, entry.hour_ms, entry.meter, &entry.source), &seq.to_be_bytes())?;
    meta.insert(SEQ_KEY, &seq.to_be_bytes())?;
    Ok(Outcome::Appended(seq))
}

fn tx_error(error: TransactionError<Error>) -> Error {
    match error {
        TransactionError::Abort(error) => error,
        TransactionError::Storage(error) => Error::Sled(error),
    }
}

impl Store {
    /// Append one entry under its deterministic key `(org, meter, hour_ms, source)`, durably.
    /// The same key with the same quantity again is [`Recorded::Duplicate`] and writes
    /// nothing; with another quantity it is refused with [`Error::Conflict`] naming the key
    /// and both quantities (and counted in [`Store::ledger_conflicts`]).
    pub fn record(&self, entry: &LedgerEntry) -> Result<Recorded, Error> {
        let _writing = self.writing();
        self.record_many(std::slice::from_ref(entry)).pop().unwrap_or_else(|| Err(Error::Corrupt("ledger append returned nothing".into())))
    }

    /// [`Store::record`] for many entries in one transaction and one flush; one outcome per
    /// entry, in order (a conflict refuses only its own entry).
    pub fn record_many(&self, batch: &[LedgerEntry]) -> Vec<Result<Recorded, Error>> {
        let _writing = self.writing();
        if batch.is_empty() {
            return Vec::new();
        }
        let trees = &self.ledger;
        let result = (&trees.entries, &trees.keys, &trees.hours, &trees.meta).transaction(|(entries, keys, hours, meta)| {
            let mut outcomes = Vec::with_capacity(batch.len());
            for entry in batch {
                outcomes.push(append(entries, keys, hours, meta, entry)?);
            }
            Ok(outcomes)
        });
        let outcomes = match result.map_err(tx_error).and_then(|outcomes| self.durable().map(|()| outcomes)) {
            Ok(outcomes) => outcomes,
            Err(error) => {
                let message = error.to_string();
                return batch.iter().map(|_| Err(Error::Corrupt(format!("recording ledger entries: {message}")))).collect();
            }
        };
        outcomes
            .into_iter()
            .zip(batch)
            .map(|(outcome, entry)| match outcome {
                Outcome::Appended(seq) => Ok(Recorded::Appended { seq }),
                Outcome::Duplicate(seq) => Ok(Recorded::Duplicate { seq }),
                Outcome::Conflict { existing } => {
                    trees.conflicts.fetch_add(1, Ordering::Relaxed);
                    let key = entry.key_text();
                    tracing::warn!(key = %key, existing, refused = entry.quantity, "ledger entry conflicts with the recorded one");
                    if let Err(error) = self.note_ledger_conflict(entry, existing) {
                        tracing::error!(%error, key = %key, "could not keep the ledger conflict for review");
                    }
                    Err(Error::Conflict(format!("ledger entry {key} is recorded with quantity {existing}; refusing quantity {}", entry.quantity)))
                }
            })
            .collect()
    }

    /// Keep a refused re-record for review (a new conflict, or one more attempt of a known
    /// one, which reopens it if it was resolved). Flushed before it returns.
    fn note_ledger_conflict(&self, entry: &LedgerEntry, recorded: i64) -> Result<(), Error> {
        let _writing = self.writing();
        let key = entry.key_text();
        let now = crate::wall_ms();
        let db_key = conflict_key(&entry.org, &key);
        let previous: Option<LedgerConflict> = self.ledger.conflict_records.get(&db_key)?.map(|raw| decode("ledger conflict", &raw)).transpose()?;
        let conflict = match previous {
            Some(mut c) => {
                c.refused = entry.quantity;
                c.attempts += 1;
                c.last_at_ms = now;
                c.resolved_at_ms = None;
                c.resolved_by = None;
                c.resolution = None;
                c
            }
            None => LedgerConflict {
                org: entry.org.clone(),
                key,
                meter: entry.meter,
                hour_ms: entry.hour_ms,
                source: entry.source.clone(),
                recorded,
                refused: entry.quantity,
                attempts: 1,
                first_at_ms: now,
                last_at_ms: now,
                resolved_at_ms: None,
                resolved_by: None,
                resolution: None,
            },
        };
        self.ledger.conflict_records.insert(db_key, encode(&conflict))?;
        self.durable()
    }

    /// Kept conflicts, of one org or of all, oldest key first.
    pub fn ledger_conflict_records(&self, org: Option<&str>) -> Result<Vec<LedgerConflict>, Error> {
        let prefix = org.map(|o| [o.as_bytes(), b"\0"].concat()).unwrap_or_default();
        self.ledger.conflict_records.scan_prefix(prefix).values().map(|raw| decode("ledger conflict", &raw?)).collect()
    }

    /// Mark a conflict resolved by `by` with a note; `None` if there is no such conflict.
    pub fn resolve_ledger_conflict(&self, org: &str, key: &str, by: &str, note: &str, now_ms: i64) -> Result<Option<LedgerConflict>, Error> {
        let _writing = self.writing();
        let db_key = conflict_key(org, key);
        let Some(raw) = self.ledger.conflict_records.get(&db_key)? else {
            return Ok(None);
        };
        let mut conflict: LedgerConflict = decode("ledger conflict", &raw)?;
        conflict.resolved_at_ms = Some(now_ms);
        conflict.resolved_by = Some(by.to_string());
        conflict.resolution = Some(note.to_string());
        self.ledger.conflict_records.insert(db_key, encode(&conflict))?;
        self.durable()?;
        Ok(Some(conflict))
    }

    /// Conflicting re-records refused since the store was opened.
    pub fn ledger_conflicts(&self) -> u64 {
        self.ledger.conflicts.load(Ordering::Relaxed)
    }

    /// Entries with a sequence number above `after_seq`, in sequence order, at most `limit`.
    pub fn ledger_since(&self, after_seq: u64, limit: usize) -> Result<Vec<LedgerEntry>, Error> {
        let Some(start) = after_seq.checked_add(1) else { return Ok(Vec::new()) };
        self.ledger.entries.range(start.to_be_bytes()..).values().take(limit).map(|v| decode("ledger entry", &v?)).collect()
    }

    /// The last sequence number given out (0 before any entry).
    pub fn ledger_head(&self) -> Result<u64, Error> {
        self.ledger.meta.get(SEQ_KEY)?.map_or(Ok(0), |raw| seq_of(&raw))
    }

    /// The entry under a deterministic key, if any.
    pub fn ledger_entry(&self, org: &str, meter: Meter, hour_ms: i64, source: &str) -> Result<Option<LedgerEntry>, Error> {
        let Some(raw) = self.ledger.keys.get(entry_key(org, hour_ms, meter, source))? else { return Ok(None) };
        let (seq, _) = parse_key_value(&raw)?;
        self.ledger_by_seq(seq)
    }

    fn ledger_by_seq(&self, seq: u64) -> Result<Option<LedgerEntry>, Error> {
        self.ledger.entries.get(seq.to_be_bytes())?.map(|v| decode("ledger entry", &v)).transpose()
    }

    /// The sources and quantities recorded for one `(org, meter, hour)`, in source order.
    pub fn ledger_hour_sources(&self, org: &str, meter: Meter, hour_ms: i64) -> Result<Vec<(String, i64)>, Error> {
        let prefix = entry_key(org, hour_ms, meter, "");
        self.ledger
            .keys
            .scan_prefix(&prefix)
            .map(|item| {
                let (key, value) = item?;
                Ok((String::from_utf8_lossy(&key[prefix.len()..]).into_owned(), parse_key_value(&value)?.1))
            })
            .collect()
    }

    /// The org's usage per meter over entries whose hour starts in `[from_ms, to_ms)`:
    /// counters are summed (corrections included); a gauge ([`Meter::is_gauge`]) is the
    /// largest of its hourly values, each hour being the sum of that hour's entries. Meters
    /// without entries are absent. A range scan of the org's keys; no entry is decoded.
    pub fn ledger_usage(&self, org: &str, from_ms: i64, to_ms: i64) -> Result<BTreeMap<Meter, i64>, Error> {
        let mut sums: BTreeMap<Meter, i64> = BTreeMap::new();
        let mut gauges: BTreeMap<(Meter, i64), i64> = BTreeMap::new();
        if from_ms >= to_ms {
            return Ok(sums);
        }
        let prefix_len = org.len() + 1;
        for item in self.ledger.keys.range(org_bound(org, from_ms)..org_bound(org, to_ms)) {
            let (key, value) = item?;
            let rest = key.get(prefix_len..prefix_len + 9).ok_or_else(|| Error::Corrupt("ledger key".into()))?;
            let hour = ts_from(&rest[..8]);
            let meter = meter_from(rest[8])?;
            let (_, quantity) = parse_key_value(&value)?;
            if meter.is_gauge() {
                *gauges.entry((meter, hour)).or_default() += quantity;
            } else {
                *sums.entry(meter).or_default() += quantity;
            }
        }
        for ((meter, _), value) in gauges {
            let slot = sums.entry(meter).or_insert(value);
            *slot = (*slot).max(value);
        }
        Ok(sums)
    }

    /// Entries whose hour starts in `[from_ms, to_ms)`, of one org or of all, ordered by
    /// `(org, hour, meter, source)` for one org and `(hour, org, meter, source)` for all;
    /// after `after` (the last entry of the previous page) and at most `limit`.
    pub fn ledger_entries(&self, org: Option<&str>, from_ms: i64, to_ms: i64, after: Option<&LedgerEntry>, limit: usize) -> Result<Vec<LedgerEntry>, Error> {
        if from_ms >= to_ms || limit == 0 {
            return Ok(Vec::new());
        }
        let next_after = |mut key: Vec<u8>| {
            key.push(0);
            key
        };
        let mut out = Vec::new();
        match org {
            Some(org) => {
                let lower = match after {
                    Some(a) => next_after(entry_key(&a.org, a.hour_ms, a.meter, &a.source)).max(org_bound(org, from_ms)),
                    None => org_bound(org, from_ms),
                };
                let upper = org_bound(org, to_ms);
                if lower >= upper {
                    return Ok(out);
                }
                for item in self.ledger.keys.range(lower..upper).values().take(limit) {
                    let (seq, _) = parse_key_value(&item?)?;
                    out.extend(self.ledger_by_seq(seq)?);
                }
            }
            None => {
                let lower = match after {
                    Some(a) => next_after(hour_key(&a.org, a.hour_ms, a.meter, &a.source)).max(ts_key(from_ms).to_vec()),
                    None => ts_key(from_ms).to_vec(),
                };
                let upper = ts_key(to_ms).to_vec();
                if lower >= upper {
                    return Ok(out);
                }
                for item in self.ledger.hours.range(lower..upper).values().take(limit) {
                    out.extend(self.ledger_by_seq(seq_of(&item?)?)?);
                }
            }
        }
        Ok(out)
    }

    /// Metering scratch: the value under `key`, if any.
    pub fn ledger_work(&self, key: &str) -> Result<Option<i64>, Error> {
        self.ledger.work.get(key.as_bytes())?.map(|raw| seq_of(&raw).map(|v| v as i64)).transpose()
    }

    /// Metering scratch: raise the value under `key` to at least `value` (atomically);
    /// returns the value now stored.
    pub fn ledger_work_max(&self, key: &str, value: i64) -> Result<i64, Error> {
        let _writing = self.writing();
        let stored = self.ledger.work.update_and_fetch(key.as_bytes(), |old| {
            let old = old.and_then(|o| <[u8; 8]>::try_from(o).ok()).map(i64::from_be_bytes);
            Some(old.map_or(value, |o| o.max(value)).to_be_bytes().to_vec())
        })?;
        Ok(stored.and_then(|raw| <[u8; 8]>::try_from(raw.as_ref()).ok()).map_or(value, i64::from_be_bytes))
    }

    /// Metering scratch: set `key` to `value`, durably.
    pub fn set_ledger_work(&self, key: &str, value: i64) -> Result<(), Error> {
        let _writing = self.writing();
        self.ledger.work.insert(key.as_bytes(), &value.to_be_bytes())?;
        self.durable()
    }

    /// Metering scratch: the keys starting with `prefix` and their values, in key order.
    pub fn ledger_work_prefix(&self, prefix: &str) -> Result<Vec<(String, i64)>, Error> {
        self.ledger
            .work
            .scan_prefix(prefix.as_bytes())
            .map(|item| {
                let (key, value) = item?;
                Ok((String::from_utf8_lossy(&key).into_owned(), seq_of(&value)? as i64))
            })
            .collect()
    }

    /// Metering scratch: forget `key`.
    pub fn remove_ledger_work(&self, key: &str) -> Result<(), Error> {
        let _writing = self.writing();
        self.ledger.work.remove(key.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("gantry-ledger-{}", rand::random::<u64>()));
        (Store::create(&dir).unwrap(), dir)
    }

    fn usage(org: &str, meter: Meter, hour: i64, source: &str, quantity: i64) -> LedgerEntry {
        LedgerEntry {
            seq: 0,
            org: org.into(),
            meter,
            hour_ms: hour * crate::billing::HOUR_MS,
            source: source.into(),
            quantity,
            kind: EntryKind::Usage,
            recorded_at_ms: 1,
        }
    }

    #[test]
    fn ledger_same_key_same_quantity_is_a_duplicate_and_another_quantity_a_conflict() {
        let (store, _dir) = store();
        let entry = usage("acme", Meter::LogBytes, 10, "agt_1", 500);
        assert_eq!(store.record(&entry).unwrap(), Recorded::Appended { seq: 1 });
        assert_eq!(store.record(&entry).unwrap(), Recorded::Duplicate { seq: 1 });
        let other = LedgerEntry { quantity: 501, ..entry.clone() };
        let error = store.record(&other).unwrap_err().to_string();
        assert!(error.contains("acme/log_bytes/36000000/agt_1") && error.contains("500") && error.contains("501"), "{error}");
        assert_eq!(store.ledger_conflicts(), 1);
        assert_eq!(store.ledger_head().unwrap(), 1);
        assert_eq!(store.ledger_usage("acme", 0, i64::MAX).unwrap()[&Meter::LogBytes], 500);
    }

    #[test]
    fn ledger_usage_sums_counters_and_takes_the_largest_hour_of_gauges_per_org_and_period() {
        let (store, _dir) = store();
        let entries = vec![
            usage("acme", Meter::Events, 1, "a", 3),
            usage("acme", Meter::Events, 1, "b", 4),
            usage("acme", Meter::Events, 2, "a", 5),
            usage("acme", Meter::Events, 3, "a", 100),
            usage("acme", Meter::PeakAgents, 1, "hub", 7),
            usage("acme", Meter::PeakAgents, 2, "hub", 9),
            usage("acme", Meter::PeakAgents, 2, "correction:x", -3),
            usage("acmf", Meter::Events, 1, "a", 1000),
            usage("acm", Meter::Events, 1, "a", 1000),
        ];
        assert!(store.record_many(&entries).iter().all(|r| r.is_ok()));
        let h = crate::billing::HOUR_MS;
        let got = store.ledger_usage("acme", h, 3 * h).unwrap();
        assert_eq!(got, BTreeMap::from([(Meter::PeakAgents, 7), (Meter::Events, 12)]));
        let page = store.ledger_entries(Some("acme"), h, 3 * h, None, 3).unwrap();
        assert_eq!(page.len(), 3);
        let rest = store.ledger_entries(Some("acme"), h, 3 * h, page.last(), 100).unwrap();
        assert_eq!(page.len() + rest.len(), 6);
        // Hour 1 of every org: acme's two event sources and its peak, acmf, acm.
        let all = store.ledger_entries(None, h, 2 * h, None, 100).unwrap();
        assert_eq!(all.len(), 5);
        let second = store.ledger_entries(None, h, 2 * h, all.get(1), 100).unwrap();
        assert_eq!(second, all[2..]);
        let since: Vec<u64> = store.ledger_since(4, 3).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(since, [5, 6, 7]);
    }

    /// Telemetry usage: counted per agent and hour of the records in the ingest's own write,
    /// resends add nothing, and an hour settles only if nothing arrived since it was read.
    #[tokio::test]
    async fn ledger_telemetry_usage_counts_each_stored_record_once_per_hour() {
        use gantry_shared::message::StreamClass;
        use gantry_shared::telemetry::{LogLine, LogStream, Record, RecordBody};
        let (store, dir) = store();
        let h = crate::billing::HOUR_MS;
        let log = |seq: u64, ts: i64, line: &str| Record {
            seq,
            ts_unix_ms: ts,
            body: RecordBody::Log(LogLine { source: "/app.log".into(), stream: LogStream::File, container: None, line: line.into() }),
        };
        let batch = vec![log(1, h + 5, "abc"), log(2, 2 * h - 1, "defgh"), log(3, 2 * h, "ij")];
        store.ingest("agt_1", StreamClass::Logs, &batch).await.unwrap();
        // A resend of the same records is dropped by the high-water mark and counts nothing.
        store.ingest("agt_1", StreamClass::Logs, &batch).await.unwrap();
        let pending = store.unsettled_telemetry_usage(3 * h, 100).unwrap();
        let got: Vec<(i64, u64, u64)> = pending.iter().map(|u| (u.hour_ms, u.records, u.bytes)).collect();
        assert_eq!(got, [(h, 2, 8), (2 * h, 1, 2)]);
        assert_eq!(store.unsettled_telemetry_usage(2 * h, 100).unwrap().len(), 1, "only hours before the bound");
        // More arrives for hour 1 after it was read (while the stream's newest hour is a
        // later one): settling the stale reading fails.
        store.ingest("agt_1", StreamClass::Logs, &[log(4, 3 * h + 1, "l"), log(5, h + 7, "k")]).await.unwrap();
        assert!(!store.settle_telemetry_usage(&pending[0]).unwrap());
        assert!(store.settle_telemetry_usage(&pending[1]).unwrap());
        let again = store.unsettled_telemetry_usage(3 * h, 100).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].hour_ms, again[0].records, again[0].bytes), (h, 3, 9), "totals are cumulative");
        assert!(store.settle_telemetry_usage(&again[0]).unwrap());
        assert!(store.unsettled_telemetry_usage(3 * h, 100).unwrap().is_empty());
        // The newest hour is reported once it is before the bound, and a late record that
        // arrives when no hour is open is counted at the next reading, not lost.
        let newest = store.unsettled_telemetry_usage(4 * h, 100).unwrap();
        assert_eq!(newest.iter().map(|u| (u.hour_ms, u.records, u.bytes)).collect::<Vec<_>>(), [(3 * h, 1, 1)]);
        assert!(store.settle_telemetry_usage(&newest[0]).unwrap());
        store.ingest("agt_1", StreamClass::Logs, &[log(6, h + 9, "mn")]).await.unwrap();
        let late = store.unsettled_telemetry_usage(4 * h, 100).unwrap();
        assert_eq!(late.iter().map(|u| (u.hour_ms, u.records, u.bytes)).collect::<Vec<_>>(), [(h, 4, 11)]);
        // The marks keep counting across a reopen of the store.
        store.ingest("agt_1", StreamClass::Logs, &[log(7, 5 * h, "op")]).await.unwrap();
        drop(store);
        let reopened = Store::open(&dir).unwrap();
        assert_eq!(reopened.high_water("agt_1", StreamClass::Logs).unwrap(), 7);
        let after = reopened.unsettled_telemetry_usage(6 * h, 100).unwrap();
        assert_eq!(after.iter().map(|u| (u.hour_ms, u.records, u.bytes)).collect::<Vec<_>>(), [(h, 4, 11), (5 * h, 1, 2)]);
    }

    #[test]
    fn ledger_survives_reopening_and_keeps_numbering() {
        let dir = std::env::temp_dir().join(format!("gantry-ledger-{}", rand::random::<u64>()));
        {
            let store = Store::create(&dir).unwrap();
            store.record(&usage("acme", Meter::AgentHours, 1, "a", 1)).unwrap();
        }
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.record(&usage("acme", Meter::AgentHours, 1, "a", 1)).unwrap(), Recorded::Duplicate { seq: 1 });
        assert_eq!(store.record(&usage("acme", Meter::AgentHours, 2, "a", 1)).unwrap(), Recorded::Appended { seq: 2 });
    }
}
