//! Telemetry storage: records of every agent stream, the streams' high-water marks, range
//! queries and retention pruning.
//!
//! One tree per class. Record keys are `agent \0 ts seq` (big-endian, timestamps shifted so
//! negative ones sort first), metric samples `agent \0 name \0 ts seq index`, so every
//! query and every prune is a range scan. Each tree also holds its streams' high-water
//! marks under `\0hwm\0 agent`, which sorts before every agent key: a batch of records and
//! its new mark go into the tree in one atomic `apply_batch`, and the store is flushed
//! before the caller acknowledges. Records at or below the mark are dropped as duplicates.

use super::{Error, Store};
use gantry_shared::message::StreamClass;
use gantry_shared::telemetry::{Record, RecordBody};
use serde::{Deserialize, Serialize};

const HWM_PREFIX: &[u8] = b"\0hwm\0";

/// Timestamps as order-preserving unsigned keys.
fn ts_key(ts_ms: i64) -> [u8; 8] {
    ((ts_ms as u64) ^ (1 << 63)).to_be_bytes()
}

fn ts_from_key(bytes: &[u8]) -> i64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[..8]);
    (u64::from_be_bytes(raw) ^ (1 << 63)) as i64
}

fn agent_prefix(agent: &str) -> Vec<u8> {
    let mut key = agent.as_bytes().to_vec();
    key.push(0);
    key
}

fn record_key(agent: &str, ts_ms: i64, seq: u64) -> Vec<u8> {
    let mut key = agent_prefix(agent);
    key.extend_from_slice(&ts_key(ts_ms));
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn metric_prefix(agent: &str, name: &str) -> Vec<u8> {
    let mut key = agent_prefix(agent);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key
}

fn hwm_key(agent: &str) -> Vec<u8> {
    let mut key = HWM_PREFIX.to_vec();
    key.extend_from_slice(agent.as_bytes());
    key
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// A stored metric sample.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSample {
    labels: Vec<(String, String)>,
    value: f64,
}

/// Name under which a gap in the metrics stream is stored, so metric queries can show it.
pub const METRICS_GAP_NAME: &str = "gantry.spool.gap";

/// What one ingest did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    /// Records stored.
    pub accepted: usize,
    /// Records at or below the high-water mark, dropped.
    pub duplicates: usize,
    /// The stream's mark after this batch: everything up to it is durable.
    pub high_water: u64,
    /// The mark before this batch: records above it were new.
    pub previous_high_water: u64,
    /// Bytes stored.
    pub bytes: usize,
    /// Timestamp of the newest record stored, if any.
    pub newest_ts_ms: Option<i64>,
    /// Records the agent reported dropped (gap markers in this batch).
    pub gap_records: u64,
}

/// Which records a query wants.
#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    /// Inclusive start.
    pub from_ms: Option<i64>,
    /// Exclusive end.
    pub to_ms: Option<i64>,
    /// Log source (path or `container:<name>`), exact.
    pub source: Option<String>,
    /// Container id or name, exact.
    pub container: Option<String>,
    /// Case-insensitive substring of the log line or event message.
    pub text: Option<String>,
    /// Event kind, exact, or a prefix ending in `.` (e.g. `docker.`).
    pub kind: Option<String>,
    /// Newest first instead of oldest first.
    pub newest_first: bool,
}

impl RecordFilter {
    /// Whether `record` passes this filter's content conditions (time bounds aside).
    pub fn matches_public(&self, record: &Record) -> bool {
        self.matches(record)
    }

    fn matches(&self, record: &Record) -> bool {
        match &record.body {
            RecordBody::Log(line) => {
                self.kind.is_none()
                    && self.source.as_ref().is_none_or(|s| *s == line.source)
                    && self.container.as_ref().is_none_or(|c| line.container.as_deref() == Some(c.as_str()) || line.source == format!("container:{c}"))
                    && self.text.as_ref().is_none_or(|t| contains_ignore_case(&line.line, t))
            }
            RecordBody::Event(event) => {
                self.source.is_none()
                    && self.container.is_none()
                    && self.kind.as_ref().is_none_or(|k| if k.ends_with('.') { event.kind.starts_with(k.as_str()) } else { event.kind == *k })
                    && self.text.as_ref().is_none_or(|t| contains_ignore_case(&event.message, t))
            }
            // Gaps are shown whatever the filter: a loss must never be hidden by a search.
            RecordBody::Gap { .. } => true,
            RecordBody::Metrics(_) => true,
        }
    }
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack.to_lowercase().contains(&needle.to_lowercase())
}

/// Position in an agent's stream for pagination: the last record a page returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordCursor {
    pub ts_ms: i64,
    pub seq: u64,
}

type Labels = Vec<(String, String)>;
/// Sum and count per bucket start.
type Buckets = std::collections::BTreeMap<i64, (f64, u32)>;

/// One metric series: a label set and its points, averaged per step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricSeries {
    pub labels: Vec<(String, String)>,
    /// `(bucket start, average)` in time order.
    pub points: Vec<(i64, f64)>,
}

impl Store {
    fn class_tree(&self, class: StreamClass) -> &sled::Tree {
        &self.telemetry[class.index()]
    }

    /// The stream's high-water mark (0 if nothing was stored yet).
    pub fn high_water(&self, agent: &str, class: StreamClass) -> Result<u64, Error> {
        let Some(raw) = self.class_tree(class).get(hwm_key(agent))? else { return Ok(0) };
        let bytes: [u8; 8] = raw.as_ref().try_into().map_err(|_| Error::Corrupt("high-water mark".into()))?;
        Ok(u64::from_be_bytes(bytes))
    }

    /// Store a batch of one agent stream and its new high-water mark atomically, then
    /// flush to disk. Records at or below the mark (resends) are dropped. Returns once the
    /// batch is durable: only then may the caller acknowledge it.
    pub async fn ingest(&self, agent: &str, class: StreamClass, records: &[Record]) -> Result<IngestOutcome, Error> {
        let tree = self.class_tree(class);
        let mark = self.high_water(agent, class)?;
        let mut outcome = IngestOutcome { high_water: mark, previous_high_water: mark, ..IngestOutcome::default() };
        let mut batch = sled::Batch::default();
        for record in records {
            if record.seq <= outcome.high_water {
                outcome.duplicates += 1;
                continue;
            }
            outcome.high_water = record.seq;
            outcome.accepted += 1;
            outcome.newest_ts_ms = Some(outcome.newest_ts_ms.map_or(record.ts_unix_ms, |t| t.max(record.ts_unix_ms)));
            if let RecordBody::Gap { records, .. } = &record.body {
                outcome.gap_records += records;
            }
            match (&record.body, class) {
                (RecordBody::Metrics(samples), StreamClass::Metrics) => {
                    for (index, sample) in samples.iter().enumerate() {
                        let mut key = metric_prefix(agent, &sample.name);
                        key.extend_from_slice(&ts_key(record.ts_unix_ms));
                        key.extend_from_slice(&record.seq.to_be_bytes());
                        key.extend_from_slice(&(index as u32).to_be_bytes());
                        let value = bincode::serde::encode_to_vec(StoredSample { labels: sample.labels.clone(), value: sample.value }, bincode_config())
                            .map_err(|e| Error::Corrupt(format!("encoding a sample: {e}")))?;
                        outcome.bytes += key.len() + value.len();
                        batch.insert(key, value);
                    }
                }
                (RecordBody::Gap { records, .. }, StreamClass::Metrics) => {
                    let mut key = metric_prefix(agent, METRICS_GAP_NAME);
                    key.extend_from_slice(&ts_key(record.ts_unix_ms));
                    key.extend_from_slice(&record.seq.to_be_bytes());
                    key.extend_from_slice(&0u32.to_be_bytes());
                    let value = bincode::serde::encode_to_vec(StoredSample { labels: Vec::new(), value: *records as f64 }, bincode_config())
                        .map_err(|e| Error::Corrupt(format!("encoding a gap: {e}")))?;
                    batch.insert(key, value);
                }
                _ => {
                    let key = record_key(agent, record.ts_unix_ms, record.seq);
                    let value = bincode::serde::encode_to_vec(record, bincode_config()).map_err(|e| Error::Corrupt(format!("encoding a record: {e}")))?;
                    outcome.bytes += key.len() + value.len();
                    batch.insert(key, value);
                }
            }
        }
        if outcome.accepted > 0 {
            batch.insert(hwm_key(agent), &outcome.high_water.to_be_bytes());
            tree.apply_batch(batch)?;
            self.durable_async().await?;
        }
        Ok(outcome)
    }

    /// Records of one agent stream (logs, events or health) matching `filter`, after
    /// `cursor` (exclusive, in the query's direction), at most `limit`.
    pub fn records(&self, agent: &str, class: StreamClass, filter: &RecordFilter, cursor: Option<RecordCursor>, limit: usize) -> Result<Vec<Record>, Error> {
        let tree = self.class_tree(class);
        let prefix = agent_prefix(agent);
        let mut lower = prefix.clone();
        lower.extend_from_slice(&ts_key(filter.from_ms.unwrap_or(i64::MIN)));
        let mut upper = prefix.clone();
        // `to` is exclusive; with no `to`, everything of the agent.
        match filter.to_ms {
            Some(to) => upper.extend_from_slice(&ts_key(to)),
            None => upper.extend_from_slice(&[0xff; 17]),
        }
        match (cursor, filter.newest_first) {
            (Some(c), false) => {
                lower = record_key(agent, c.ts_ms, c.seq);
                lower.push(0); // exclusive
            }
            (Some(c), true) => upper = record_key(agent, c.ts_ms, c.seq),
            (None, _) => {}
        }
        if lower >= upper {
            return Ok(Vec::new());
        }
        let range = tree.range(lower..upper);
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if filter.newest_first { Box::new(range.rev()) } else { Box::new(range) };
        let mut out = Vec::new();
        for item in iter {
            let (_, value) = item?;
            let (record, _): (Record, usize) =
                bincode::serde::decode_from_slice(&value, bincode_config()).map_err(|e| Error::Corrupt(format!("telemetry record: {e}")))?;
            if filter.matches(&record) {
                out.push(record);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Samples of metric `name` for one agent in `[from, to)`, averaged per `step_ms`
    /// bucket and grouped by label set.
    pub fn metric_series(&self, agent: &str, name: &str, from_ms: i64, to_ms: i64, step_ms: i64) -> Result<Vec<MetricSeries>, Error> {
        let step = step_ms.max(1);
        let prefix = metric_prefix(agent, name);
        let mut lower = prefix.clone();
        lower.extend_from_slice(&ts_key(from_ms));
        let mut upper = prefix.clone();
        upper.extend_from_slice(&ts_key(to_ms));
        let mut series: Vec<(Labels, Buckets)> = Vec::new();
        for item in self.class_tree(StreamClass::Metrics).range(lower..upper) {
            let (key, value) = item?;
            let ts = ts_from_key(&key[prefix.len()..]);
            let (sample, _): (StoredSample, usize) =
                bincode::serde::decode_from_slice(&value, bincode_config()).map_err(|e| Error::Corrupt(format!("metric sample: {e}")))?;
            let bucket = from_ms + (ts - from_ms).div_euclid(step) * step;
            let index = match series.iter().position(|(labels, _)| *labels == sample.labels) {
                Some(index) => index,
                None => {
                    series.push((sample.labels.clone(), Default::default()));
                    series.len() - 1
                }
            };
            let slot = series[index].1.entry(bucket).or_insert((0.0, 0));
            slot.0 += sample.value;
            slot.1 += 1;
        }
        Ok(series
            .into_iter()
            .map(|(labels, buckets)| MetricSeries { labels, points: buckets.into_iter().map(|(t, (sum, n))| (t, sum / f64::from(n))).collect() })
            .collect())
    }

    /// Metric names an agent has stored.
    pub fn metric_names(&self, agent: &str) -> Result<Vec<String>, Error> {
        let prefix = agent_prefix(agent);
        let tree = self.class_tree(StreamClass::Metrics);
        let mut names = Vec::new();
        let mut from = prefix.clone();
        while let Some(item) = tree.range(from.clone()..).next() {
            let (key, _) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            let rest = &key[prefix.len()..];
            let Some(end) = rest.iter().position(|b| *b == 0) else { break };
            names.push(String::from_utf8_lossy(&rest[..end]).into_owned());
            // Jump past every key of this name.
            from = key[..prefix.len() + end].to_vec();
            from.push(1);
        }
        Ok(names)
    }

    /// Delete an agent's telemetry older than `before_ms` in every class; returns how many
    /// entries were removed.
    pub fn prune_agent(&self, agent: &str, before_ms: i64) -> Result<u64, Error> {
        let mut removed = 0;
        for class in [StreamClass::Logs, StreamClass::Events, StreamClass::Health] {
            let tree = self.class_tree(class);
            let lower = agent_prefix(agent);
            let mut upper = lower.clone();
            upper.extend_from_slice(&ts_key(before_ms));
            removed += remove_range(tree, lower, upper)?;
        }
        for name in self.metric_names(agent)? {
            let lower = metric_prefix(agent, &name);
            let mut upper = lower.clone();
            upper.extend_from_slice(&ts_key(before_ms));
            removed += remove_range(self.class_tree(StreamClass::Metrics), lower, upper)?;
        }
        Ok(removed)
    }
}

fn remove_range(tree: &sled::Tree, lower: Vec<u8>, upper: Vec<u8>) -> Result<u64, Error> {
    let mut removed = 0;
    // Delete in bounded batches so pruning never holds a huge batch in memory.
    loop {
        let keys: Vec<sled::IVec> = tree.range(lower.clone()..upper.clone()).keys().take(1000).collect::<Result<_, _>>()?;
        if keys.is_empty() {
            return Ok(removed);
        }
        let mut batch = sled::Batch::default();
        for key in &keys {
            batch.remove(key.clone());
        }
        tree.apply_batch(batch)?;
        removed += keys.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::telemetry::{Event, LogLine, LogStream, Sample, Severity};

    fn log(seq: u64, ts: i64, line: &str) -> Record {
        Record {
            seq,
            ts_unix_ms: ts,
            body: RecordBody::Log(LogLine { source: "/var/log/app.log".into(), stream: LogStream::File, container: None, line: line.into() }),
        }
    }

    fn store() -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("gantry-telemetry-{}", rand::random::<u64>()));
        (Store::create(&dir).unwrap(), dir)
    }

    /// Many streams ingesting at once, with writes elsewhere in the store between them: each
    /// ingest's flush is durable and none hangs (concurrent sled flushes used to deadlock).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_ingests_all_complete_and_count_exactly() {
        let (store, _dir) = store();
        let mut tasks = tokio::task::JoinSet::new();
        for agent in 0..64u64 {
            let store = store.clone();
            tasks.spawn(async move {
                let id = format!("agt_{agent}");
                for batch in 0..20u64 {
                    let records: Vec<Record> = (1..=10).map(|i| log(batch * 10 + i, (batch * 10 + i) as i64, "line")).collect();
                    let outcome = store.ingest(&id, StreamClass::Logs, &records).await.unwrap();
                    assert_eq!(outcome.high_water, batch * 10 + 10);
                    if batch % 5 == 0 {
                        store.set_setting(&format!("probe-{agent}"), &batch.to_string()).unwrap();
                    }
                }
            });
        }
        let all = async {
            while let Some(done) = tasks.join_next().await {
                done.unwrap()
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(120), all).await.expect("every ingest completes");
        for agent in [0u64, 31, 63] {
            assert_eq!(store.high_water(&format!("agt_{agent}"), StreamClass::Logs).unwrap(), 200);
            assert_eq!(store.records(&format!("agt_{agent}"), StreamClass::Logs, &RecordFilter::default(), None, 1000).unwrap().len(), 200);
        }
    }

    #[tokio::test]
    async fn ingest_is_exactly_once_per_seq() {
        let (store, dir) = store();
        let first = store.ingest("agt_1", StreamClass::Logs, &[log(1, 10, "a"), log(2, 11, "b")]).await.unwrap();
        assert_eq!((first.accepted, first.duplicates, first.high_water), (2, 0, 2));
        // A resend overlapping the mark: only the new record is stored.
        let again = store.ingest("agt_1", StreamClass::Logs, &[log(2, 11, "b"), log(3, 12, "c")]).await.unwrap();
        assert_eq!((again.accepted, again.duplicates, again.high_water), (1, 1, 3));
        let all = store.records("agt_1", StreamClass::Logs, &RecordFilter::default(), None, 100).unwrap();
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(store.high_water("agt_1", StreamClass::Logs).unwrap(), 3);
        assert_eq!(store.high_water("agt_1", StreamClass::Events).unwrap(), 0);
        drop(store);
        let reopened = Store::open(&dir).unwrap();
        assert_eq!(reopened.high_water("agt_1", StreamClass::Logs).unwrap(), 3);
    }

    #[tokio::test]
    async fn queries_filter_paginate_and_keep_gaps_visible() {
        let (store, _dir) = store();
        let mut records: Vec<Record> = (1..=10).map(|i| log(i, 100 + i as i64, &format!("line {i} {}", if i % 2 == 0 { "ERROR" } else { "ok" }))).collect();
        records.insert(5, Record { seq: 11, ts_unix_ms: 106, body: RecordBody::Gap { first_seq: 1, last_seq: 1, records: 4, bytes: 400 } });
        records.sort_by_key(|r| r.seq);
        store.ingest("agt_1", StreamClass::Logs, &records).await.unwrap();
        let filter = RecordFilter { text: Some("error".into()), ..RecordFilter::default() };
        let page = store.records("agt_1", StreamClass::Logs, &filter, None, 2).unwrap();
        assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), [2, 4]);
        let last = page.last().unwrap();
        let next = store.records("agt_1", StreamClass::Logs, &filter, Some(RecordCursor { ts_ms: last.ts_unix_ms, seq: last.seq }), 10).unwrap();
        assert_eq!(next.iter().map(|r| r.seq).collect::<Vec<_>>(), [6, 11, 8, 10], "the gap is shown despite the text filter");
        let newest = store.records("agt_1", StreamClass::Logs, &RecordFilter { newest_first: true, ..RecordFilter::default() }, None, 3).unwrap();
        assert_eq!(newest.iter().map(|r| r.seq).collect::<Vec<_>>(), [10, 9, 8]);
        let window = RecordFilter { from_ms: Some(103), to_ms: Some(105), ..RecordFilter::default() };
        assert_eq!(store.records("agt_1", StreamClass::Logs, &window, None, 10).unwrap().len(), 2);
        assert!(store.records("agt_2", StreamClass::Logs, &RecordFilter::default(), None, 10).unwrap().is_empty());
    }

    #[tokio::test]
    async fn metrics_downsample_and_prune() {
        let (store, _dir) = store();
        let records: Vec<Record> = (0..6)
            .map(|i| Record {
                seq: i + 1,
                ts_unix_ms: 1000 + i as i64 * 10,
                body: RecordBody::Metrics(vec![
                    Sample { name: "cpu.usage_percent".into(), labels: vec![], value: i as f64 },
                    Sample { name: "disk.used_percent".into(), labels: vec![("mount".into(), "/".into())], value: 50.0 },
                ]),
            })
            .collect();
        store.ingest("agt_1", StreamClass::Metrics, &records).await.unwrap();
        let series = store.metric_series("agt_1", "cpu.usage_percent", 1000, 1060, 30).unwrap();
        assert_eq!(series.len(), 1);
        assert_eq!(series[0].points, vec![(1000, 1.0), (1030, 4.0)]);
        assert_eq!(store.metric_names("agt_1").unwrap(), ["cpu.usage_percent", "disk.used_percent"]);
        let events = [Record {
            seq: 1,
            ts_unix_ms: 1000,
            body: RecordBody::Event(Event { kind: "agent.started".into(), severity: Severity::Info, message: "hi".into(), attributes: vec![] }),
        }];
        store.ingest("agt_1", StreamClass::Events, &events).await.unwrap();
        let removed = store.prune_agent("agt_1", 1030).unwrap();
        assert_eq!(removed, 3 + 3 + 1);
        let left = store.metric_series("agt_1", "cpu.usage_percent", 0, 2000, 1000).unwrap();
        assert_eq!(left[0].points, vec![(1000, 4.0)]);
    }
}
