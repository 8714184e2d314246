//! Telemetry storage: records of every agent stream, the streams' high-water marks, range
//! queries and retention pruning.
//!
//! Records are stored in chunks, one sled key per chunk, never one per line or sample. One
//! tree per class; a chunk's key is `agent \0 ts seq`: the timestamp (big-endian, shifted so
//! negative ones sort first) and sequence number of its oldest record. A chunk holds
//! records of one agent stream sorted by `(ts, seq)`, spanning at most [`CHUNK_SPAN_MS`], so
//! a query for `[from, to)` reads the chunks whose keys fall in `[from - span, to)` and
//! merges them; chunks of different batches may overlap in time.
//!
//! Each tree also holds its streams' high-water marks under `\0hwm\0 agent`, which sorts
//! before every agent key: a batch's chunks and its new mark go into the tree in one atomic
//! `apply_batch`, and the store is flushed before the caller acknowledges. Records at or
//! below the mark are dropped as duplicates. The metrics tree also lists each agent's
//! metric names under `\0name\0 agent \0 name`.
//!
//! A mark also carries the stream's usage of its newest hour (see [`Mark`]), counted in the
//! same write as the records; the hour moves to the usage keys once the stream writes a
//! later hour or the ledger asks for closed hours. So a batch writes two keys per tree
//! (its chunk index entries and its mark), not four.
//!
//! Chunk values start with a header, `[format u8][count u32 BE][newest ts i64 BE]`. Logs,
//! events and health hold the bincode of their records; metrics hold one block per metric
//! name, `[name len u16][name][block len u32][bincode of (ts, labels, value) points]`, so a
//! query decodes only the name it asks for.

use super::segments::{Appender, Location};
use super::{Error, Store};
use gantry_shared::message::StreamClass;
use gantry_shared::telemetry::{Record, RecordBody};
use std::collections::{BTreeMap, HashMap};

const HWM_PREFIX: &[u8] = b"\0hwm\0";
const NAME_PREFIX: &[u8] = b"\0name\0";
/// Usage per agent and hour (`\0use\0 hour agent` → `[records u64][bytes u64]`), added to
/// in the same atomic batch as the mark that held it, and the hours whose usage changed since
/// the ledger last took it (`\0dirty\0 hour agent` → the usage as it was then).
const USE_PREFIX: &[u8] = b"\0use\0";
const DIRTY_PREFIX: &[u8] = b"\0dirty\0";

/// Longest stretch of time one chunk covers (newest minus oldest timestamp).
pub const CHUNK_SPAN_MS: i64 = 60_000;
/// Most records in one chunk.
const CHUNK_MAX_RECORDS: usize = 2_000;
/// Rough size at which a chunk is closed.
const CHUNK_MAX_BYTES: usize = 256 * 1024;

const FORMAT_RECORDS: u8 = 1;
const FORMAT_METRICS: u8 = 2;
const HEADER_LEN: usize = 13;
/// Decoding stored chunks never allocates beyond this.
const DECODE_LIMIT: usize = 64 << 20;

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

fn chunk_key(agent: &str, ts_ms: i64, seq: u64) -> Vec<u8> {
    let mut key = agent_prefix(agent);
    key.extend_from_slice(&ts_key(ts_ms));
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The first key of `agent`'s chunks whose oldest record is at `ts_ms` or later.
fn chunk_bound(agent: &str, ts_ms: i64) -> Vec<u8> {
    let mut key = agent_prefix(agent);
    key.extend_from_slice(&ts_key(ts_ms));
    key
}

fn hwm_key(agent: &str) -> Vec<u8> {
    let mut key = HWM_PREFIX.to_vec();
    key.extend_from_slice(agent.as_bytes());
    key
}

/// A stream's stored mark: the highest sequence number stored, and the usage of its newest
/// hour that is not yet in the usage keys (`(hour, records, bytes)`).
///
/// Stored as `[seq u64]` (hubs before open-hour usage) or `[seq u64][hour i64][records
/// u64][bytes u64]`, all big-endian.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Mark {
    seq: u64,
    open: Option<(i64, u64, u64)>,
}

impl Mark {
    fn decode(raw: &[u8]) -> Result<Mark, Error> {
        let u64_at = |at: usize| u64::from_be_bytes(raw[at..at + 8].try_into().unwrap_or_default());
        match raw.len() {
            8 => Ok(Mark { seq: u64_at(0), open: None }),
            32 => Ok(Mark { seq: u64_at(0), open: Some((u64_at(8) as i64, u64_at(16), u64_at(24))) }),
            _ => Err(Error::Corrupt("high-water mark".into())),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = self.seq.to_be_bytes().to_vec();
        if let Some((hour, records, bytes)) = self.open {
            out.extend_from_slice(&hour.to_be_bytes());
            out.extend_from_slice(&records.to_be_bytes());
            out.extend_from_slice(&bytes.to_be_bytes());
        }
        out
    }

    /// Count `(hour, records, bytes)` in: into the open hour, or as a new open hour (the
    /// old one pushed to `closed`), or straight to `closed` when it is older (late records).
    fn count(&mut self, hour: i64, records: u64, bytes: u64, closed: &mut Vec<(i64, u64, u64)>) {
        match &mut self.open {
            None => self.open = Some((hour, records, bytes)),
            Some(open) if open.0 == hour => (open.1, open.2) = (open.1 + records, open.2 + bytes),
            Some(open) if open.0 < hour => {
                closed.push(*open);
                *open = (hour, records, bytes);
            }
            Some(_) => closed.push((hour, records, bytes)),
        }
    }
}

fn name_key(agent: &str, name: &str) -> Vec<u8> {
    let mut key = NAME_PREFIX.to_vec();
    key.extend_from_slice(agent.as_bytes());
    key.push(0);
    key.extend_from_slice(name.as_bytes());
    key
}

fn bincode_config() -> bincode::config::Configuration<bincode::config::LittleEndian, bincode::config::Varint, bincode::config::Limit<DECODE_LIMIT>> {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

fn corrupt(what: &str, error: impl std::fmt::Display) -> Error {
    Error::Corrupt(format!("{what}: {error}"))
}

/// One stored metric point.
type Point = (i64, Vec<(String, String)>, f64);

/// Name under which a gap in the metrics stream is stored, so metric queries can show it.
pub const METRICS_GAP_NAME: &str = "gantry.spool.gap";

fn usage_key(prefix: &[u8], hour_ms: i64, agent: &str) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&ts_key(hour_ms));
    key.extend_from_slice(agent.as_bytes());
    key
}

fn usage_value(records: u64, bytes: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&records.to_be_bytes());
    out[8..].copy_from_slice(&bytes.to_be_bytes());
    out
}

fn parse_usage_value(value: &[u8]) -> Option<(u64, u64)> {
    let bytes: &[u8; 16] = value.try_into().ok()?;
    Some((u64::from_be_bytes(bytes[..8].try_into().ok()?), u64::from_be_bytes(bytes[8..].try_into().ok()?)))
}

/// What a record counts for in the stored usage: `(records, bytes)`. Log lines count their
/// text's bytes, metric records their samples, events one each, check reports the runs
/// they report; gap markers nothing.
fn usage_of(record: &Record) -> (u64, u64) {
    match &record.body {
        RecordBody::Log(line) => (1, line.line.len() as u64),
        RecordBody::Metrics(samples) => (samples.len() as u64, 0),
        RecordBody::Event(_) => (1, 0),
        RecordBody::Check(report) => (u64::from(report.runs), 0),
        RecordBody::Gap { .. } => (0, 0),
    }
}

/// Telemetry stored for one agent stream in one UTC hour (by record timestamp), as the
/// ledger's metering reads it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoredUsage {
    pub agent: String,
    pub class: StreamClass,
    pub hour_ms: i64,
    /// Log lines, metric samples, events or check reports, by class.
    pub records: u64,
    /// Bytes of log line text (logs only).
    pub bytes: u64,
}

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
            // Check reports: `kind` filters by check name.
            RecordBody::Check(report) => {
                self.source.is_none()
                    && self.container.is_none()
                    && self.kind.as_ref().is_none_or(|k| report.name == *k)
                    && self.text.as_ref().is_none_or(|t| contains_ignore_case(&report.output, t))
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
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MetricSeries {
    pub labels: Vec<(String, String)>,
    /// `(bucket start, average)` in time order.
    pub points: Vec<(i64, f64)>,
}

/// Rough stored size of a record, to close chunks near [`CHUNK_MAX_BYTES`].
fn approx_size(record: &Record) -> usize {
    16 + match &record.body {
        RecordBody::Log(line) => line.line.len() + line.source.len() + line.container.as_ref().map_or(0, String::len),
        RecordBody::Event(event) => event.kind.len() + event.message.len() + event.attributes.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>(),
        RecordBody::Metrics(samples) => samples.iter().map(|s| 12 + s.name.len() + s.labels.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()).sum(),
        RecordBody::Gap { .. } => 32,
        RecordBody::Check(report) => 48 + report.name.len() + report.output.len() + report.remediation.as_ref().map_or(0, String::len),
    }
}

/// Split records sorted by `(ts, seq)` into chunks within the span, count and size limits.
fn chunk_groups<'a>(sorted: &'a [&'a Record]) -> Vec<&'a [&'a Record]> {
    let mut groups = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, record) in sorted.iter().enumerate() {
        let size = approx_size(record);
        if i > start && (record.ts_unix_ms - sorted[start].ts_unix_ms > CHUNK_SPAN_MS || i - start >= CHUNK_MAX_RECORDS || bytes + size > CHUNK_MAX_BYTES) {
            groups.push(&sorted[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < sorted.len() {
        groups.push(&sorted[start..]);
    }
    groups
}

fn header(format: u8, count: usize, newest_ts: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 256);
    out.push(format);
    out.extend_from_slice(&(count as u32).to_be_bytes());
    out.extend_from_slice(&newest_ts.to_be_bytes());
    out
}

/// `(format, count, newest ts, body)` of a stored chunk.
fn parse_header(value: &[u8]) -> Result<(u8, u32, i64, &[u8]), Error> {
    if value.len() < HEADER_LEN || !matches!(value[0], FORMAT_RECORDS | FORMAT_METRICS) {
        return Err(Error::Corrupt("telemetry chunk header".into()));
    }
    let count = u32::from_be_bytes([value[1], value[2], value[3], value[4]]);
    let mut newest = [0u8; 8];
    newest.copy_from_slice(&value[5..13]);
    Ok((value[0], count, i64::from_be_bytes(newest), &value[HEADER_LEN..]))
}

fn encode_records(group: &[&Record]) -> Result<Vec<u8>, Error> {
    let newest = group.iter().map(|r| r.ts_unix_ms).max().unwrap_or_default();
    let mut out = header(FORMAT_RECORDS, group.len(), newest);
    out.reserve(group.iter().map(|r| approx_size(r)).sum());
    bincode::serde::encode_into_std_write(group, &mut out, bincode_config()).map_err(|e| corrupt("encoding records", e))?;
    Ok(out)
}

fn decode_records(value: &[u8]) -> Result<Vec<Record>, Error> {
    let (format, _, _, body) = parse_header(value)?;
    if format != FORMAT_RECORDS {
        return Err(Error::Corrupt("a metrics chunk among records".into()));
    }
    Ok(bincode::serde::decode_from_slice(body, bincode_config()).map_err(|e| corrupt("telemetry records", e))?.0)
}

/// A point to store, borrowed from its record; encodes exactly as a [`Point`].
type PointRef<'a> = (i64, &'a [(String, String)], f64);

/// The points of each metric name in `group`, names in first-seen order.
fn metric_blocks<'a>(group: &[&'a Record]) -> Vec<(&'a str, Vec<PointRef<'a>>)> {
    let mut blocks: Vec<(&str, Vec<PointRef>)> = Vec::new();
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut push = |name: &'a str, point: PointRef<'a>| match index.get(name) {
        Some(&at) => blocks[at].1.push(point),
        None => {
            index.insert(name, blocks.len());
            blocks.push((name, vec![point]));
        }
    };
    for record in group {
        match &record.body {
            RecordBody::Metrics(samples) => {
                for sample in samples {
                    push(&sample.name, (record.ts_unix_ms, &sample.labels, sample.value));
                }
            }
            RecordBody::Gap { records, .. } => push(METRICS_GAP_NAME, (record.ts_unix_ms, &[], *records as f64)),
            // Other bodies do not belong on the metrics stream; the hub stores what it can.
            _ => {}
        }
    }
    blocks
}

fn encode_metrics(group: &[&Record], blocks: &[(&str, Vec<PointRef>)]) -> Result<Vec<u8>, Error> {
    let newest = group.iter().map(|r| r.ts_unix_ms).max().unwrap_or_default();
    let points: usize = blocks.iter().map(|(_, p)| p.len()).sum();
    let mut out = header(FORMAT_METRICS, points, newest);
    out.reserve(group.iter().map(|r| approx_size(r)).sum());
    for (name, points) in blocks {
        let name_len = u16::try_from(name.len()).map_err(|_| Error::Corrupt("metric name too long".into()))?;
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        bincode::serde::encode_into_std_write(points, &mut out, bincode_config()).map_err(|e| corrupt("encoding metric points", e))?;
        let block_len = (out.len() - len_at - 4) as u32;
        out[len_at..len_at + 4].copy_from_slice(&block_len.to_be_bytes());
    }
    Ok(out)
}

/// The points of metric `name` in a stored metrics chunk (the other blocks are skipped).
fn decode_metric(value: &[u8], name: &str) -> Result<Vec<Point>, Error> {
    let (format, _, _, mut rest) = parse_header(value)?;
    if format != FORMAT_METRICS {
        return Err(Error::Corrupt("a records chunk among metrics".into()));
    }
    let short = || Error::Corrupt("truncated metrics chunk".into());
    while !rest.is_empty() {
        let name_len = usize::from(u16::from_be_bytes(rest.get(..2).ok_or_else(short)?.try_into().map_err(|_| short())?));
        let block_name = rest.get(2..2 + name_len).ok_or_else(short)?;
        let at = 2 + name_len;
        let block_len = u32::from_be_bytes(rest.get(at..at + 4).ok_or_else(short)?.try_into().map_err(|_| short())?) as usize;
        let block = rest.get(at + 4..at + 4 + block_len).ok_or_else(short)?;
        if block_name == name.as_bytes() {
            return Ok(bincode::serde::decode_from_slice(block, bincode_config()).map_err(|e| corrupt("metric points", e))?.0);
        }
        rest = &rest[at + 4 + block_len..];
    }
    Ok(Vec::new())
}

impl Store {
    fn class_tree(&self, class: StreamClass) -> &sled::Tree {
        &self.telemetry[class.index()]
    }

    /// The stream's high-water mark (0 if nothing was stored yet).
    pub fn high_water(&self, agent: &str, class: StreamClass) -> Result<u64, Error> {
        let Some(raw) = self.class_tree(class).get(hwm_key(agent))? else { return Ok(0) };
        Ok(Mark::decode(&raw)?.seq)
    }

    /// Store a batch of one agent stream and its new high-water mark atomically, then
    /// flush to disk. Records at or below the mark (resends) are dropped. Returns once the
    /// batch is durable: only then may the caller acknowledge it.
    ///
    /// The chunks are built here, on the caller's task; one writer thread applies the
    /// batches of every stream and makes each group durable with one flush (see
    /// [`Writer`]), so no async worker ever waits on sled.
    pub async fn ingest(&self, agent: &str, class: StreamClass, records: &[Record]) -> Result<IngestOutcome, Error> {
        loop {
            let mark = self.high_water(agent, class)?;
            let (outcome, job) = self.prepare(agent, class, records, mark)?;
            let Some((job, reply)) = job else { return Ok(outcome) };
            let new_names = job.new_names.clone();
            self.telemetry_writer.send(WriterJob::Write(job)).map_err(|_| Error::Corrupt("the telemetry writer has stopped".into()))?;
            match reply.await.map_err(|_| Error::Corrupt("the telemetry writer has stopped".into()))? {
                Ok(true) => {
                    if !new_names.is_empty() {
                        self.metric_names_written.lock().unwrap_or_else(|p| p.into_inner()).extend(new_names);
                    }
                    return Ok(outcome);
                }
                // Another task stored part of this stream meanwhile (a reconnect racing
                // its old connection): work out again what is new.
                Ok(false) => continue,
                Err(error) => return Err(Error::Corrupt(error)),
            }
        }
    }

    /// The outcome of storing `records` over `mark`, and the write that does it (none when
    /// every record is a duplicate).
    fn prepare(&self, agent: &str, class: StreamClass, records: &[Record], mark: u64) -> Result<(IngestOutcome, Option<(WriteJob, WriteReply)>), Error> {
        let mut outcome = IngestOutcome { high_water: mark, previous_high_water: mark, ..IngestOutcome::default() };
        let mut fresh: Vec<&Record> = Vec::with_capacity(records.len());
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
            fresh.push(record);
        }
        if fresh.is_empty() {
            return Ok((outcome, None));
        }
        fresh.sort_by_key(|r| (r.ts_unix_ms, r.seq));
        let mut usage: Vec<(i64, u64, u64)> = Vec::new();
        for record in &fresh {
            let (records, bytes) = usage_of(record);
            if records == 0 {
                continue;
            }
            let hour = crate::billing::hour_of(record.ts_unix_ms);
            match usage.last_mut() {
                Some(last) if last.0 == hour => (last.1, last.2) = (last.1 + records, last.2 + bytes),
                _ => usage.push((hour, records, bytes)),
            }
        }
        let mut chunks = Vec::new();
        let mut new_names = Vec::new();
        for group in chunk_groups(&fresh) {
            let key = chunk_key(agent, group[0].ts_unix_ms, group[0].seq);
            let payload = if class == StreamClass::Metrics {
                let blocks = metric_blocks(group);
                let known = self.metric_names_written.lock().unwrap_or_else(|p| p.into_inner());
                for (name, _) in &blocks {
                    let name_key = name_key(agent, name);
                    if !known.contains(&name_key) && !new_names.contains(&name_key) {
                        new_names.push(name_key);
                    }
                }
                drop(known);
                encode_metrics(group, &blocks)?
            } else {
                encode_records(group)?
            };
            outcome.bytes += key.len() + payload.len();
            let (_, count, newest, _) = parse_header(&payload)?;
            chunks.push(NewChunk { key, payload, count, newest });
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = WriteJob {
            tree: class.index(),
            hwm_key: hwm_key(agent),
            expected_mark: mark,
            new_mark: outcome.high_water,
            chunks,
            new_names,
            agent: agent.to_string(),
            usage,
            reply,
        };
        Ok((outcome, Some((job, answer))))
    }

    /// Records of one agent stream (logs, events or health) matching `filter`, after
    /// `cursor` (exclusive, in the query's direction), at most `limit`, in `(ts, seq)`
    /// order (or its reverse with `newest_first`).
    pub fn records(&self, agent: &str, class: StreamClass, filter: &RecordFilter, cursor: Option<RecordCursor>, limit: usize) -> Result<Vec<Record>, Error> {
        let tree = self.class_tree(class);
        let from = filter.from_ms.unwrap_or(i64::MIN);
        let to = filter.to_ms.unwrap_or(i64::MAX);
        let after = (!filter.newest_first).then_some(cursor).flatten().map(|c| (c.ts_ms, c.seq));
        let before = filter.newest_first.then_some(cursor).flatten().map(|c| (c.ts_ms, c.seq));
        // Chunks whose oldest record could still fall in the window.
        let low = from.max(after.map_or(i64::MIN, |(ts, _)| ts)).saturating_sub(CHUNK_SPAN_MS);
        let high = match before {
            Some((ts, _)) => to.min(ts.saturating_add(1)),
            None => to,
        };
        let lower = chunk_bound(agent, low);
        let upper = if high == i64::MAX { agent_prefix_end(agent) } else { chunk_bound(agent, high) };
        if limit == 0 || lower >= upper {
            return Ok(Vec::new());
        }
        let wanted = |record: &Record| {
            let at = (record.ts_unix_ms, record.seq);
            record.ts_unix_ms >= from && record.ts_unix_ms < to && after.is_none_or(|a| at > a) && before.is_none_or(|b| at < b) && filter.matches(record)
        };
        // Merge overlapping chunks: a record is final once no chunk still to be read can hold
        // one that sorts before it.
        let mut pending: BTreeMap<(i64, u64), Record> = BTreeMap::new();
        let mut out = Vec::new();
        let newest_first = filter.newest_first;
        let range = tree.range(lower..upper);
        let chunks: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if newest_first { Box::new(range.rev()) } else { Box::new(range) };
        // The next record in the query's order, if no chunk still to be read (the next one
        // starting at `oldest`; none left with `None`) can hold one that sorts before it.
        // Chunks still to come start at `oldest` or later (or earlier, newest first, and
        // then end by `oldest` + span).
        let take_final = |pending: &mut BTreeMap<(i64, u64), Record>, oldest: Option<i64>| {
            let (next, _) = if newest_first { pending.last_key_value()? } else { pending.first_key_value()? };
            let is_final = oldest.is_none_or(|o| if newest_first { next.0 > o.saturating_add(CHUNK_SPAN_MS) } else { next.0 < o });
            if !is_final {
                return None;
            }
            if newest_first { pending.pop_last() } else { pending.pop_first() }.map(|(_, record)| record)
        };
        for item in chunks {
            let (key, value) = item?;
            let oldest = ts_from_key(&key[agent.len() + 1..]);
            while out.len() < limit {
                let Some(record) = take_final(&mut pending, Some(oldest)) else { break };
                out.push(record);
            }
            if out.len() >= limit {
                break;
            }
            let Some(payload) = self.chunk_payload(&value)? else { continue };
            pending.extend(decode_records(&payload)?.into_iter().filter(|r| wanted(r)).map(|r| ((r.ts_unix_ms, r.seq), r)));
        }
        while out.len() < limit {
            let Some(record) = take_final(&mut pending, None) else { break };
            out.push(record);
        }
        Ok(out)
    }

    /// Samples of metric `name` for one agent in `[from, to)`, averaged per `step_ms`
    /// bucket and grouped by label set.
    pub fn metric_series(&self, agent: &str, name: &str, from_ms: i64, to_ms: i64, step_ms: i64) -> Result<Vec<MetricSeries>, Error> {
        let step = step_ms.max(1);
        let lower = chunk_bound(agent, from_ms.saturating_sub(CHUNK_SPAN_MS));
        let upper = chunk_bound(agent, to_ms);
        if lower >= upper {
            return Ok(Vec::new());
        }
        let mut series: Vec<(Labels, Buckets)> = Vec::new();
        for item in self.class_tree(StreamClass::Metrics).range(lower..upper) {
            let (_, value) = item?;
            let Some(payload) = self.chunk_payload(&value)? else { continue };
            for (ts, labels, value) in decode_metric(&payload, name)? {
                if ts < from_ms || ts >= to_ms {
                    continue;
                }
                let bucket = from_ms + (ts - from_ms).div_euclid(step) * step;
                let index = match series.iter().position(|(l, _)| *l == labels) {
                    Some(index) => index,
                    None => {
                        series.push((labels, Default::default()));
                        series.len() - 1
                    }
                };
                let slot = series[index].1.entry(bucket).or_insert((0.0, 0));
                slot.0 += value;
                slot.1 += 1;
            }
        }
        Ok(series
            .into_iter()
            .map(|(labels, buckets)| MetricSeries { labels, points: buckets.into_iter().map(|(t, (sum, n))| (t, sum / f64::from(n))).collect() })
            .collect())
    }

    /// Metric names an agent has stored, sorted.
    pub fn metric_names(&self, agent: &str) -> Result<Vec<String>, Error> {
        let prefix = name_key(agent, "");
        self.class_tree(StreamClass::Metrics).scan_prefix(&prefix).keys().map(|key| Ok(String::from_utf8_lossy(&key?[prefix.len()..]).into_owned())).collect()
    }

    /// Delete an agent's telemetry chunks whose newest record is older than `before_ms`, in
    /// every class; returns how many records (log lines, events, metric points) went.
    pub fn prune_agent(&self, agent: &str, before_ms: i64) -> Result<u64, Error> {
        let _writing = self.writing();
        let mut removed = 0;
        for tree in &self.telemetry {
            let upper = chunk_bound(agent, before_ms);
            // Delete in bounded batches so pruning never holds a huge batch in memory.
            let mut from = chunk_bound(agent, i64::MIN);
            loop {
                let mut batch = sled::Batch::default();
                let mut released = Vec::new();
                let mut next = None;
                for (taken, item) in tree.range(from.clone()..upper.clone()).enumerate() {
                    let (key, value) = item?;
                    let (location, count, newest) = decode_index(&value)?;
                    if newest < before_ms {
                        batch.remove(key.clone());
                        released.push(location);
                        removed += u64::from(count);
                    }
                    if taken + 1 >= 1024 {
                        let mut after = key.to_vec();
                        after.push(0);
                        next = Some(after);
                        break;
                    }
                }
                tree.apply_batch(batch)?;
                self.segments.release(&released)?;
                match next {
                    Some(after) => from = after,
                    None => break,
                }
            }
        }
        Ok(removed)
    }

    /// Stored usage of hours before `before_ms` that changed since it was last settled
    /// ([`Store::settle_telemetry_usage`]), oldest hours first, at most `limit` per class.
    /// The totals are everything ever stored for that agent, class and hour.
    pub fn unsettled_telemetry_usage(&self, before_ms: i64, limit: usize) -> Result<Vec<StoredUsage>, Error> {
        // Hours still open in streams' marks are counted in first. Not under the write
        // gate: the writer may be held by a snapshot that waits for that gate.
        let (reply, answer) = std::sync::mpsc::channel();
        let stopped = || Error::Corrupt("the telemetry writer has stopped".into());
        self.telemetry_writer.send(WriterJob::CloseHours { before_ms, reply }).map_err(|_| stopped())?;
        answer.recv().map_err(|_| stopped())?.map_err(Error::Corrupt)?;
        let mut out = Vec::new();
        for class in [StreamClass::Metrics, StreamClass::Logs, StreamClass::Events, StreamClass::Health] {
            let upper = usage_key(DIRTY_PREFIX, before_ms, "");
            for item in self.class_tree(class).range(DIRTY_PREFIX.to_vec()..upper).take(limit) {
                let (key, value) = item?;
                let rest = &key[DIRTY_PREFIX.len()..];
                if rest.len() < 8 {
                    return Err(Error::Corrupt("telemetry usage key".into()));
                }
                let (records, bytes) = parse_usage_value(&value).ok_or_else(|| Error::Corrupt("telemetry usage value".into()))?;
                out.push(StoredUsage { agent: String::from_utf8_lossy(&rest[8..]).into_owned(), class, hour_ms: ts_from_key(rest), records, bytes });
            }
        }
        Ok(out)
    }

    /// Mark `usage` as taken into the ledger, unless more was stored for its hour since it
    /// was read (then it stays unsettled, with the new total). Returns whether it settled.
    pub fn settle_telemetry_usage(&self, usage: &StoredUsage) -> Result<bool, Error> {
        let _writing = self.writing();
        let key = usage_key(DIRTY_PREFIX, usage.hour_ms, &usage.agent);
        let expected = usage_value(usage.records, usage.bytes);
        Ok(self.class_tree(usage.class).compare_and_swap(key, Some(&expected[..]), None as Option<&[u8]>)?.is_ok())
    }

    /// Telemetry segment files and their total size in bytes.
    pub fn telemetry_disk_usage(&self) -> (u64, u64) {
        self.segments.usage()
    }

    /// The payload an index entry points at; `None` (logged) when it is damaged, so one bad
    /// chunk never hides the rest of a query.
    fn chunk_payload(&self, index: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let (location, _, _) = decode_index(index)?;
        match self.segments.read(location) {
            Ok(payload) => Ok(Some(payload)),
            Err(error) => {
                tracing::warn!(%error, "skipping a damaged telemetry chunk");
                Ok(None)
            }
        }
    }
}

impl Store {
    /// Remove every trace of `agent`'s telemetry: its chunks (index entries, and their
    /// payloads overwritten with zeros in the segment files, which other agents' chunks
    /// share), its high-water marks, metric names and stored usage not yet metered. Returns
    /// how many records went. For deleting an org: the agent must be revoked and
    /// disconnected first, or a batch arriving later is stored again.
    pub fn erase_agent_telemetry(&self, agent: &str) -> Result<u64, Error> {
        let _writing = self.writing();
        let mut removed = 0;
        for tree in &self.telemetry {
            let mut batch = sled::Batch::default();
            let mut locations = Vec::new();
            for item in tree.range(chunk_bound(agent, i64::MIN)..agent_prefix_end(agent)) {
                let (key, value) = item?;
                let (location, count, _) = decode_index(&value)?;
                batch.remove(key);
                locations.push(location);
                removed += u64::from(count);
            }
            batch.remove(hwm_key(agent));
            for key in tree.scan_prefix(name_key(agent, "")).keys() {
                batch.remove(key?);
            }
            for prefix in [USE_PREFIX, DIRTY_PREFIX] {
                for key in tree.scan_prefix(prefix).keys() {
                    let key = key?;
                    if key.len() == prefix.len() + 8 + agent.len() && key.ends_with(agent.as_bytes()) {
                        batch.remove(key);
                    }
                }
            }
            tree.apply_batch(batch)?;
            self.segments.erase(&locations)?;
            self.segments.release(&locations)?;
        }
        let names = name_key(agent, "");
        self.metric_names_written.lock().unwrap_or_else(|p| p.into_inner()).retain(|key| !key.starts_with(&names));
        self.durable()?;
        Ok(removed)
    }
}

/// A chunk to store: its index key and payload, with the header facts the index keeps.
#[derive(Debug)]
struct NewChunk {
    key: Vec<u8>,
    payload: Vec<u8>,
    count: u32,
    newest: i64,
}

/// One stream's prepared write: applied only if the stream's mark is still `expected_mark`.
#[derive(Debug)]
pub(super) struct WriteJob {
    tree: usize,
    hwm_key: Vec<u8>,
    expected_mark: u64,
    new_mark: u64,
    chunks: Vec<NewChunk>,
    new_names: Vec<Vec<u8>>,
    agent: String,
    /// `(hour, records, bytes)` of the batch's new records, hours ascending.
    usage: Vec<(i64, u64, u64)>,
    reply: tokio::sync::oneshot::Sender<Result<bool, String>>,
}

/// `Ok(true)` stored and durable, `Ok(false)` the mark moved (prepare again), `Err` failed.
type WriteReply = tokio::sync::oneshot::Receiver<Result<bool, String>>;

/// What the telemetry writer thread is asked to do.
#[derive(Debug)]
pub(super) enum WriterJob {
    Write(WriteJob),
    /// Move the usage of every stream's open hour before `before_ms` into the usage keys,
    /// so the ledger finds it (see [`Mark`]).
    CloseHours {
        before_ms: i64,
        reply: std::sync::mpsc::Sender<Result<(), String>>,
    },
}

/// Usage leaving marks in one group, summed per `(tree, hour, agent)`.
type ClosedUsage = BTreeMap<(usize, i64, String), (u64, u64)>;

/// Most jobs applied before one flush.
const WRITER_GROUP: usize = 4096;
/// Longest wait between the starts of two telemetry flushes; the added acknowledgement
/// latency is at most this.
const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);
/// The wait grows by this per job of the previous group, up to [`FLUSH_INTERVAL`]: a lone
/// stream (an agent draining its spool) is answered within a few milliseconds, while a
/// busy hub settles at a few large synced writes per second instead of thousands of small
/// ones.
const FLUSH_WAIT_PER_JOB: std::time::Duration = std::time::Duration::from_millis(2);

/// How long to gather jobs after a flush that stored `previous` of them.
fn flush_wait(previous: usize) -> std::time::Duration {
    FLUSH_WAIT_PER_JOB.saturating_mul(u32::try_from(previous).unwrap_or(u32::MAX)).min(FLUSH_INTERVAL)
}

/// An index entry: `[format][segment u64][offset u64][len u32][count u32][newest ts i64]`,
/// all big-endian.
const FORMAT_INDEX: u8 = 3;
const INDEX_LEN: usize = 33;

fn encode_index(location: Location, count: u32, newest: i64) -> [u8; INDEX_LEN] {
    let mut out = [0u8; INDEX_LEN];
    out[0] = FORMAT_INDEX;
    out[1..9].copy_from_slice(&location.segment.to_be_bytes());
    out[9..17].copy_from_slice(&location.offset.to_be_bytes());
    out[17..21].copy_from_slice(&location.len.to_be_bytes());
    out[21..25].copy_from_slice(&count.to_be_bytes());
    out[25..33].copy_from_slice(&newest.to_be_bytes());
    out
}

/// `(location, count, newest ts)` of an index entry.
fn decode_index(value: &[u8]) -> Result<(Location, u32, i64), Error> {
    let bytes: &[u8; INDEX_LEN] = value.try_into().map_err(|_| Error::Corrupt("telemetry index entry".into()))?;
    if bytes[0] != FORMAT_INDEX {
        return Err(Error::Corrupt("telemetry index entry format".into()));
    }
    let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
    let u32_at = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
    Ok((Location { segment: u64_at(1), offset: u64_at(9), len: u32_at(17) }, u32_at(21), u64_at(25) as i64))
}

/// The segment a copied record of tree `tree` points into, if it is a telemetry chunk
/// index entry (for a snapshot, which keeps only the segments its copy refers to).
pub(super) fn segment_of(tree: &[u8], key: &[u8], value: &[u8]) -> Option<u64> {
    const NAMES: [&[u8]; 4] = [b"t_metrics", b"t_logs", b"t_events", b"t_health"];
    // Chunk keys start with an agent id; marks and names start with a zero byte.
    if !NAMES.contains(&tree) || key.first().is_none_or(|b| *b < 1) {
        return None;
    }
    decode_index(value).ok().map(|(location, _, _)| location.segment)
}

/// Locations of every chunk in `trees`, to count segment references at start.
pub(super) fn all_locations(trees: &[sled::Tree]) -> Result<Vec<Location>, Error> {
    let mut out = Vec::new();
    for tree in trees {
        // Chunk keys start with an agent id; marks and names start with a zero byte.
        for item in tree.range(vec![1u8]..) {
            let (_, value) = item?;
            out.push(decode_index(&value)?.0);
        }
    }
    Ok(out)
}

/// The thread that stores telemetry. It gathers the jobs that arrive until a flush is due,
/// checks each stream's mark, appends every chunk payload to the segment log in one synced
/// write, applies the index entries and marks to sled, flushes sled once, and answers them
/// all: group commit, so writes of many streams share one sync.
pub(super) struct Writer {
    pub db: sled::Db,
    pub trees: [sled::Tree; 4],
    pub flusher: std::sync::Arc<super::Flusher>,
    pub appender: Appender,
}

impl Writer {
    /// Start the thread; it ends when every sender (every clone of the store) is gone.
    pub fn spawn(mut self) -> Result<std::sync::mpsc::Sender<WriterJob>, Error> {
        let (tx, rx) = std::sync::mpsc::channel::<WriterJob>();
        std::thread::Builder::new()
            .name("telemetry-writer".into())
            .spawn(move || {
                let mut last_flush = std::time::Instant::now();
                let mut previous = 0;
                while let Ok(first) = rx.recv() {
                    let mut jobs = Vec::new();
                    let mut close = None;
                    match first {
                        WriterJob::Write(job) => jobs.push(job),
                        WriterJob::CloseHours { before_ms, reply } => close = Some((before_ms, reply)),
                    }
                    let due = last_flush + flush_wait(previous);
                    while close.is_none() && jobs.len() < WRITER_GROUP {
                        let left = due.saturating_duration_since(std::time::Instant::now());
                        let next = if left.is_zero() { rx.try_recv().ok() } else { rx.recv_timeout(left).ok() };
                        match next {
                            Some(WriterJob::Write(job)) => jobs.push(job),
                            Some(WriterJob::CloseHours { before_ms, reply }) => close = Some((before_ms, reply)),
                            None => break,
                        }
                    }
                    // A backup copying the index holds this: no group lands mid-copy.
                    let segments = self.appender.segments();
                    let _paused = segments.pause();
                    if !jobs.is_empty() {
                        last_flush = std::time::Instant::now();
                        previous = jobs.len();
                        self.commit(jobs);
                    }
                    if let Some((before_ms, reply)) = close {
                        let _ = reply.send(self.close_hours(before_ms));
                    }
                }
            })
            .map_err(|e| Error::Corrupt(format!("starting the telemetry writer: {e}")))?;
        Ok(tx)
    }

    fn commit(&mut self, jobs: Vec<WriteJob>) {
        // Marks as they will be after this group, so two batches of one stream in the same
        // group are checked against each other, and each stream's mark is written once.
        let mut marks: HashMap<(usize, Vec<u8>), Mark> = HashMap::new();
        let mut closed = ClosedUsage::new();
        let mut accepted = Vec::with_capacity(jobs.len());
        let mut answers = Vec::with_capacity(jobs.len());
        for job in jobs {
            let stream = (job.tree, job.hwm_key.clone());
            let current = match marks.get(&stream) {
                Some(mark) => *mark,
                None => match self.trees[job.tree].get(&job.hwm_key).map_err(Error::from).and_then(|raw| raw.map(|raw| Mark::decode(&raw)).transpose()) {
                    Ok(mark) => mark.unwrap_or_default(),
                    Err(error) => {
                        answers.push((job.reply, Err(error.to_string())));
                        continue;
                    }
                },
            };
            if current.seq != job.expected_mark {
                answers.push((job.reply, Ok(false)));
                continue;
            }
            let mut mark = Mark { seq: job.new_mark, ..current };
            let mut left = Vec::new();
            for &(hour, records, bytes) in &job.usage {
                mark.count(hour, records, bytes, &mut left);
            }
            for (hour, records, bytes) in left {
                let sum = closed.entry((job.tree, hour, job.agent.clone())).or_default();
                (sum.0, sum.1) = (sum.0 + records, sum.1 + bytes);
            }
            marks.insert(stream, mark);
            accepted.push(job);
        }
        let result = self.store(&accepted, &marks, &closed);
        for job in accepted {
            answers.push((job.reply, result.clone().map(|()| true)));
        }
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
    }

    /// Payloads to the segment log (synced), then index entries, marks and closed usage to
    /// sled, one atomic batch per tree, flushed once.
    fn store(&mut self, jobs: &[WriteJob], marks: &HashMap<(usize, Vec<u8>), Mark>, closed: &ClosedUsage) -> Result<(), String> {
        if jobs.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let payloads: Vec<&[u8]> = jobs.iter().flat_map(|job| job.chunks.iter().map(|c| c.payload.as_slice())).collect();
        let locations = self.appender.append(&payloads).map_err(|e| e.to_string())?;
        let appended = started.elapsed();
        let mut batches: [Option<sled::Batch>; 4] = Default::default();
        let mut at = locations.iter();
        for job in jobs {
            let batch = batches[job.tree].get_or_insert_default();
            for chunk in &job.chunks {
                let location = *at.next().ok_or("segment locations out of step")?;
                batch.insert(chunk.key.as_slice(), &encode_index(location, chunk.count, chunk.newest)[..]);
            }
            for name in &job.new_names {
                batch.insert(name.as_slice(), Vec::<u8>::new());
            }
        }
        for ((tree, key), mark) in marks {
            batches[*tree].get_or_insert_default().insert(key.as_slice(), mark.encode());
        }
        self.add_usage(&mut batches, closed)?;
        self.apply(batches)?;
        self.appender.referenced(&locations);
        let applied = started.elapsed();
        let flushed = self.flusher.durable(&self.db).map_err(|e| e.to_string());
        tracing::debug!(
            jobs = jobs.len(),
            chunks = payloads.len(),
            append_ms = appended.as_millis() as u64,
            apply_ms = (applied - appended).as_millis() as u64,
            flush_ms = (started.elapsed() - applied).as_millis() as u64,
            "telemetry group committed"
        );
        flushed
    }

    /// Add `closed` to the usage totals and mark those hours unsettled, in `batches`. This
    /// thread is the only writer of usage keys, so the totals read here are exact.
    fn add_usage(&self, batches: &mut [Option<sled::Batch>; 4], closed: &ClosedUsage) -> Result<(), String> {
        for (&(tree, hour, ref agent), &(records, bytes)) in closed {
            let key = usage_key(USE_PREFIX, hour, agent);
            let current = self.trees[tree].get(&key).map_err(|e| e.to_string())?.and_then(|v| parse_usage_value(&v)).unwrap_or_default();
            let total = usage_value(current.0 + records, current.1 + bytes);
            let batch = batches[tree].get_or_insert_default();
            batch.insert(key, &total[..]);
            batch.insert(usage_key(DIRTY_PREFIX, hour, agent), &total[..]);
        }
        Ok(())
    }

    /// Apply each tree's batch (each one atomic).
    fn apply(&self, batches: [Option<sled::Batch>; 4]) -> Result<(), String> {
        for (tree, batch) in batches.into_iter().enumerate() {
            if let Some(batch) = batch {
                self.trees[tree].apply_batch(batch).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Move every open hour before `before_ms` out of the marks into the usage keys.
    fn close_hours(&mut self, before_ms: i64) -> Result<(), String> {
        let mut batches: [Option<sled::Batch>; 4] = Default::default();
        let mut closed = ClosedUsage::new();
        for (index, tree) in self.trees.iter().enumerate() {
            for item in tree.scan_prefix(HWM_PREFIX) {
                let (key, raw) = item.map_err(|e| e.to_string())?;
                let mut mark = Mark::decode(&raw).map_err(|e| e.to_string())?;
                let Some((hour, records, bytes)) = mark.open.filter(|open| open.0 < before_ms) else { continue };
                mark.open = None;
                let agent = String::from_utf8_lossy(&key[HWM_PREFIX.len()..]).into_owned();
                closed.insert((index, hour, agent), (records, bytes));
                batches[index].get_or_insert_default().insert(key, mark.encode());
            }
        }
        if closed.is_empty() {
            return Ok(());
        }
        self.add_usage(&mut batches, &closed)?;
        self.apply(batches)?;
        self.flusher.durable(&self.db).map_err(|e| e.to_string())
    }
}

/// Just past every chunk key of `agent`.
fn agent_prefix_end(agent: &str) -> Vec<u8> {
    let mut key = agent.as_bytes().to_vec();
    key.push(1);
    key
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

    /// Marks written by older hubs (the sequence number alone) still read; a mark's open
    /// hour takes the stream's newest hour and hands older ones on as closed usage.
    #[test]
    fn marks_read_both_formats_and_count_usage_into_the_newest_hour() {
        assert_eq!(Mark::decode(&7u64.to_be_bytes()).unwrap(), Mark { seq: 7, open: None });
        let mark = Mark { seq: 9, open: Some((3_600_000, 4, 40)) };
        assert_eq!(Mark::decode(&mark.encode()).unwrap(), mark);
        assert!(Mark::decode(&[0u8; 12]).is_err(), "a damaged mark is an error, not zero");
        let mut mark = Mark::default();
        let mut closed = Vec::new();
        mark.count(10, 1, 5, &mut closed);
        mark.count(10, 2, 6, &mut closed);
        mark.count(20, 1, 1, &mut closed);
        mark.count(10, 1, 2, &mut closed);
        assert_eq!(mark.open, Some((20, 1, 1)));
        assert_eq!(closed, [(10, 3, 11), (10, 1, 2)]);
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

    /// Batches whose timestamps overlap, go backwards and span far more than one chunk:
    /// every query and every page of it, in both directions, matches a plain sort.
    #[tokio::test]
    async fn chunked_queries_match_a_plain_sort() {
        use rand::Rng;
        let (store, _dir) = store();
        let mut rng = rand::thread_rng();
        let mut all = Vec::new();
        let mut seq = 0;
        for batch in 0..40 {
            let base = rng.gen_range(0..2_000_000i64);
            let mut records = Vec::new();
            for _ in 0..rng.gen_range(1..300) {
                seq += 1;
                let spread = if batch % 7 == 0 { 3_000_000 } else { 90_000 };
                let ts = base + rng.gen_range(0..spread);
                let line = if rng.gen_bool(0.3) { format!("{seq} ERROR") } else { format!("{seq} ok") };
                records.push(log(seq, ts, &line));
            }
            store.ingest("agt_1", StreamClass::Logs, &records).await.unwrap();
            all.extend(records);
        }
        all.sort_by_key(|r| (r.ts_unix_ms, r.seq));
        for filter in [
            RecordFilter::default(),
            RecordFilter { text: Some("error".into()), ..RecordFilter::default() },
            RecordFilter { from_ms: Some(500_000), to_ms: Some(1_700_000), ..RecordFilter::default() },
        ] {
            let expected: Vec<u64> = all
                .iter()
                .filter(|r| filter.from_ms.is_none_or(|f| r.ts_unix_ms >= f) && filter.to_ms.is_none_or(|t| r.ts_unix_ms < t) && filter.matches(r))
                .map(|r| r.seq)
                .collect();
            for newest_first in [false, true] {
                let filter = RecordFilter { newest_first, ..filter.clone() };
                let mut got = Vec::new();
                let mut cursor = None;
                loop {
                    let page = store.records("agt_1", StreamClass::Logs, &filter, cursor, 97).unwrap();
                    let Some(last) = page.last() else { break };
                    cursor = Some(RecordCursor { ts_ms: last.ts_unix_ms, seq: last.seq });
                    got.extend(page.iter().map(|r| r.seq));
                }
                let mut want = expected.clone();
                if newest_first {
                    want.reverse();
                }
                assert_eq!(got, want, "filter {filter:?}");
            }
        }
    }

    /// Two tasks storing overlapping batches of the same stream at once (an agent's old
    /// connection racing its new one): every seq is stored exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_ingests_of_one_stream_store_each_record_once() {
        let (store, _dir) = store();
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..4u64 {
            let store = store.clone();
            tasks.spawn(async move {
                // Each task resends from its own start, overlapping the others.
                for batch in 0..50u64 {
                    let first = batch * 10 + task * 3 + 1;
                    let records: Vec<Record> = (first..first + 10).map(|seq| log(seq, seq as i64, &seq.to_string())).collect();
                    store.ingest("agt_1", StreamClass::Logs, &records).await.unwrap();
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        let mark = store.high_water("agt_1", StreamClass::Logs).unwrap();
        let all = store.records("agt_1", StreamClass::Logs, &RecordFilter::default(), None, 10_000).unwrap();
        let seqs: Vec<u64> = all.iter().map(|r| r.seq).collect();
        let mut unique = seqs.clone();
        unique.dedup();
        assert_eq!(seqs, unique, "no seq stored twice");
        assert_eq!(*seqs.last().unwrap(), mark);
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
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
        let all = reopened.records("agt_1", StreamClass::Logs, &RecordFilter::default(), None, 100).unwrap();
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3], "records survive a reopen");
        // New writes after a reopen go to a new segment and read back beside the old ones.
        reopened.ingest("agt_1", StreamClass::Logs, &[log(4, 13, "d")]).await.unwrap();
        assert_eq!(reopened.records("agt_1", StreamClass::Logs, &RecordFilter::default(), None, 100).unwrap().len(), 4);
        assert_eq!(reopened.telemetry_disk_usage().0, 2);
    }

    /// A damaged chunk payload is skipped by queries; the other chunks still answer.
    #[tokio::test]
    async fn a_damaged_chunk_is_skipped_not_fatal() {
        let (store, dir) = store();
        store.ingest("agt_1", StreamClass::Logs, &[log(1, 10, "first")]).await.unwrap();
        store.ingest("agt_1", StreamClass::Logs, &[log(2, 100_000, "second")]).await.unwrap();
        let segment = std::fs::read_dir(dir.join("telemetry")).unwrap().next().unwrap().unwrap().path();
        let mut bytes = std::fs::read(&segment).unwrap();
        let at = bytes.windows(5).position(|w| w == b"first").unwrap();
        bytes[at] ^= 0x20;
        std::fs::write(&segment, bytes).unwrap();
        drop(store);
        let store = Store::open(&dir).unwrap();
        let left = store.records("agt_1", StreamClass::Logs, &RecordFilter::default(), None, 100).unwrap();
        assert_eq!(left.iter().map(|r| r.seq).collect::<Vec<_>>(), [2]);
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
        let later =
            [Record { seq: 7, ts_unix_ms: 200_000, body: RecordBody::Metrics(vec![Sample { name: "cpu.usage_percent".into(), labels: vec![], value: 9.0 }]) }];
        store.ingest("agt_1", StreamClass::Metrics, &later).await.unwrap();
        // Whole chunks go once their newest record is older than the cut: the six early
        // records (two points each) and the event; the later point stays.
        let removed = store.prune_agent("agt_1", 100_000).unwrap();
        assert_eq!(removed, 12 + 1);
        assert_eq!(store.prune_agent("agt_1", 100_000).unwrap(), 0);
        let left = store.metric_series("agt_1", "cpu.usage_percent", 0, 300_000, 1000).unwrap();
        assert_eq!(left[0].points, vec![(200_000, 9.0)]);
        assert_eq!(store.metric_names("agt_1").unwrap(), ["cpu.usage_percent", "disk.used_percent"]);
    }
}
