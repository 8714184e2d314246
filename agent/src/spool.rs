//! The agent's durable disk spool: every telemetry record is written here, and flushed to
//! disk, before it is sent; only the hub's acknowledgement deletes it.
//!
//! Invariants: nothing acknowledged is ever lost, and no `(stream, seq)` is ever handed out
//! twice. The hub drops every record at or below its high-water mark, so a reused seq would
//! silently lose the new record; a hole in the seqs is harmless.
//!
//! Layout under the agent's state directory:
//! - `spool/`: a sled database. One tree per class (`metrics`, `logs`, `events`, `health`)
//!   holding *chunks*: records with consecutive seqs, stored under one key so that sled's
//!   per-key cost (which dominated: 18 MiB of 200-byte lines per CPU-second as one key per
//!   record, 250 as chunks) is paid per chunk. Key = the first seq as big-endian u64; value
//!   = a header (`[version][last seq, u64 BE][count, u32 LE][crc32 of those 13 bytes]`) and
//!   one entry per record, `[payload length, u32 LE][crc32 of payload, u32 LE][payload]`,
//!   the payload being the bincode encoding (standard config, as on the wire) of the
//!   [`Record`]. An append writes its records in chunks of about 64 KiB; an ack removes
//!   whole chunks and rewrites a partly acknowledged one without its acknowledged head.
//!   A `meta` tree holds, per class, `next_seq/<class>`, `acked/<class>`,
//!   `dropped_records/<class>`, `dropped_bytes/<class>` and `corrupt/<class>` (big-endian
//!   u64), and the collectors' checkpoints under `ckpt/<key>`.
//! - `spool-seq.json`: the seq reservation sidecar (below).
//! - `spool.corrupt-<unix_ts>/`: a damaged store that sled could not open, kept for
//!   inspection; its records are not resent.
//!
//! Seqs: before a seq beyond `reserved_up_to[class]` is used, the sidecar is rewritten (temp
//! file, fsync, rename, directory fsync) with the reservation raised by [`SEQ_BLOCK`], so every
//! seq ever handed out is at most `reserved_up_to`. A clean close (the last handle dropped
//! after a successful flush) also records the exact next seqs. On open, a class continues at
//! the store's own next seq only if the sidecar says the previous close was clean and agrees
//! with the store; otherwise (a crash, a quarantined store, a store that came back older
//! than it was) it continues at `reserved_up_to + 1`, leaving a hole of less than one block.
//! If the hub acknowledges a seq this spool never reached (both the store and the sidecar
//! were lost), the stream jumps past it, so later records are not taken for duplicates.
//!
//! Cap: when a class holds more than its cap after an append, its oldest chunks are dropped
//! (then, if needed, the oldest records of the append itself, never its newest) and one
//! [`RecordBody::Gap`] takes their place, in a chunk of its own keyed at the last dropped
//! seq; a gap already at the head is extended instead. A gap may also cover records the hub already received
//! (they were in flight when dropped): the hub's own mark tells which ones are really missing.
//!
//! Corruption: a record whose checksum, encoding or seq (its place in the chunk) is wrong is
//! removed and counted, never returned; the rest of its chunk is kept (rewritten as chunks
//! of the records that remain). A chunk whose header or key is damaged goes whole, counted
//! by its header's record count when that is readable. When sled cannot open the store (an error, or a panic inside sled, caught
//! here: keep `panic = "unwind"`), its small `conf` file is set aside and the open retried
//! once (sled refuses a whole store over a damaged `conf`); failing that, the store is
//! quarantined and a fresh one opened, so the agent always starts. sled itself says nothing
//! when it recovers a damaged log only up to the first bad entry; a store found older than
//! its last clean close is reported as [`OpenReport::rolled_back`].
//!
//! This module must not know QUIC, frames or sessions; must not drop a record except by the
//! cap policy or because it is corrupt; must not panic, or allocate without bound, on any disk
//! content; and must not let [`Spool::pending`] return a record before it is on disk.

use gantry_shared::message::StreamClass;
use gantry_shared::telemetry::{Record, RecordBody};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// How many seqs one reservation in `spool-seq.json` covers.
pub const SEQ_BLOCK: u64 = 1_000_000;
/// Largest encoded record the spool takes, so that one record always fits in a frame of the
/// default size with room for the batch around it. Collectors truncate long lines below it.
pub const MAX_RECORD_BYTES: usize = gantry_shared::frame::DEFAULT_MAX_FRAME_BYTES / 2;
/// Bytes in front of each record's payload in a chunk: its length and checksum.
const ENTRY_HEADER: usize = 8;
/// Bytes of a chunk's header.
const CHUNK_HEADER: usize = 17;
/// Version byte of the chunk layout.
const CHUNK_VERSION: u8 = 1;
/// An append is stored in chunks of about this many bytes (a record never splits). Small
/// enough that a sled leaf (split above 16 keys) stays under sled's blob threshold (a
/// quarter of its 512 KiB segment): a larger page is written as a file of its own on every
/// change, which once cost the agent a third of its CPU in file creation.
const CHUNK_TARGET_BYTES: usize = 6 * 1024;

const SPOOL_DIR: &str = "spool";
const SEQ_FILE: &str = "spool-seq.json";
const SEQ_FILE_VERSION: u32 = 1;
const META_TREE: &str = "meta";
const CLASSES: [StreamClass; 4] = [StreamClass::Metrics, StreamClass::Logs, StreamClass::Events, StreamClass::Health];
const CLASS_NAMES: [&str; 4] = ["metrics", "logs", "events", "health"];
/// Keys removed per sled batch when acknowledging.
const ACK_CHUNK: usize = 10_000;
/// sled's page cache: the agent must stay small; the spool is written far more than read.
const CACHE_BYTES: u64 = 8 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

/// What went wrong in the spool.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// sled failed (disk IO, or damage found after the store was opened).
    #[error("spool store: {0}")]
    Sled(#[from] sled::Error),
    /// A file next to the store (the directory, `spool-seq.json`) could not be written.
    #[error("spool file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The store is already open (another agent process, or another handle here).
    #[error("spool at {0} is already in use")]
    Locked(PathBuf),
    /// The damaged store was moved aside, and even a fresh one could not be opened.
    #[error("spool at {path} could not be opened even after quarantining the damaged store: {reason}")]
    Unrecoverable { path: PathBuf, reason: String },
    /// One record of an append is larger than [`MAX_RECORD_BYTES`]; nothing was stored.
    #[error("record {index} of the append encodes to {bytes} bytes, over the limit of {max}")]
    RecordTooLarge { index: usize, bytes: usize, max: usize },
    /// A record could not be encoded.
    #[error("record could not be encoded: {0}")]
    Encode(String),
    /// The stream reached `u64::MAX`.
    #[error("sequence numbers of the {0} stream are exhausted")]
    SeqExhausted(&'static str),
}

/// Per-class byte caps of the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolConfig {
    /// Stored bytes (checksum and encoded record) each class may hold before its oldest
    /// records are dropped, in the order Metrics, Logs, Events, Health. Defaults: metrics
    /// 64 MiB, logs 256 MiB, events 128 MiB (the largest share per record: kept longest),
    /// health 32 MiB.
    pub cap_bytes: [u64; 4],
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig { cap_bytes: [64 * MIB, 256 * MIB, 128 * MIB, 32 * MIB] }
    }
}

impl SpoolConfig {
    /// The cap of one class.
    pub fn cap(&self, class: StreamClass) -> u64 {
        self.cap_bytes[class.index()]
    }
}

/// Records the cap forced out during one append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Records dropped by this append (not counting a gap marker that was extended).
    pub records: u64,
    /// Their stored bytes.
    pub bytes: u64,
    /// Lowest seq dropped by this append.
    pub first_seq: u64,
    /// Highest seq dropped by this append: where the gap marker now stands.
    pub last_seq: u64,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// First seq given to the appended records.
    pub first_seq: u64,
    /// Last seq given; for an empty append `last_seq == first_seq - 1`.
    pub last_seq: u64,
    /// Set when the cap forced records out (possibly some of this append's own, oldest first).
    pub dropped: Option<Dropped>,
}

/// What opening the spool found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Where a damaged store was moved, when sled could not open it.
    pub quarantined: Option<PathBuf>,
    /// Records removed at open because their key or checksum was wrong.
    pub corrupt_records: u64,
    /// The previous close was clean, but the store came back older than it was left: sled
    /// replays its log only up to the first damaged entry and says nothing, so records
    /// written before that close may be lost (seqs still move past every one handed out).
    pub rolled_back: bool,
    /// sled refused the store because of its damaged `conf` file; the file was set aside
    /// (as `conf.damaged`) and the store opened with its records.
    pub config_repaired: bool,
}

/// Counters of one class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamStats {
    /// Records held (gap markers included).
    pub records: u64,
    /// Their stored bytes, as counted against the cap.
    pub bytes: u64,
    /// Records dropped by the cap since the store was created.
    pub dropped_records: u64,
    /// Their stored bytes.
    pub dropped_bytes: u64,
    /// Records removed because they were corrupt, since the store was created.
    pub corrupt_records: u64,
    /// The seq the next appended record gets.
    pub next_seq: u64,
    /// Lowest seq held.
    pub oldest_seq: Option<u64>,
    /// Highest seq the hub acknowledged.
    pub acked_up_to: u64,
}

/// Handle to the spool; clones share one store. Send + Sync.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("dir", &self.inner.dir).field("config", &self.inner.config).finish()
    }
}

struct Inner {
    dir: PathBuf,
    db: sled::Db,
    trees: [sled::Tree; 4],
    meta: sled::Tree,
    config: SpoolConfig,
    /// Per class; held while seqs are assigned and the tree changes, never across an fsync.
    classes: [Mutex<ClassState>; 4],
    /// Per class: every seq up to this is on disk; `pending` returns nothing beyond it.
    durable: [AtomicU64; 4],
    seq_file: Mutex<SeqFile>,
}

#[derive(Debug, Clone, Copy, Default)]
struct ClassState {
    next_seq: u64,
    records: u64,
    bytes: u64,
    dropped_records: u64,
    dropped_bytes: u64,
    corrupt_records: u64,
    acked_up_to: u64,
}

/// Contents of `spool-seq.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SeqFile {
    version: u32,
    /// Per class: no seq above this has been handed out.
    reserved_up_to: [u64; 4],
    /// Per class: the exact next seqs, written only by a clean close.
    clean_next_seq: Option<[u64; 4]>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn key_seq(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

fn meta_key(counter: &str, i: usize) -> String {
    format!("{counter}/{}", CLASS_NAMES[i])
}

fn ckpt_key(key: &str) -> String {
    format!("ckpt/{key}")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// One record's entry in a chunk: `[payload length, u32 LE][crc32 of payload, u32 LE]
/// [payload]`, the payload being the record's bincode encoding.
fn encode_value(record: &Record) -> Result<Vec<u8>, Error> {
    let mut value = vec![0u8; ENTRY_HEADER];
    bincode::serde::encode_into_std_write(record, &mut value, bincode::config::standard()).map_err(|e| Error::Encode(e.to_string()))?;
    let len = u32::try_from(value.len() - ENTRY_HEADER).map_err(|_| Error::Encode("record over 4 GiB".into()))?;
    let crc = crc32fast::hash(&value[ENTRY_HEADER..]);
    value[..4].copy_from_slice(&len.to_le_bytes());
    value[4..ENTRY_HEADER].copy_from_slice(&crc.to_le_bytes());
    Ok(value)
}

/// A chunk's header: `[version][last seq, u64 BE][record count, u32 LE][crc32 of the
/// preceding 13 bytes, u32 LE]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChunkHeader {
    last_seq: u64,
    count: u32,
}

/// A chunk value: the header, then `entries` (each from [`encode_value`]).
fn chunk_value<'a>(last_seq: u64, entries: impl Iterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let count = entries.clone().count() as u32;
    let len: usize = entries.clone().map(<[u8]>::len).sum();
    let mut value = Vec::with_capacity(CHUNK_HEADER + len);
    value.push(CHUNK_VERSION);
    value.extend_from_slice(&last_seq.to_be_bytes());
    value.extend_from_slice(&count.to_le_bytes());
    let crc = crc32fast::hash(&value);
    value.extend_from_slice(&crc.to_le_bytes());
    for entry in entries {
        value.extend_from_slice(entry);
    }
    value
}

/// The header of a chunk value, if it is well formed.
fn chunk_header(value: &[u8]) -> Option<ChunkHeader> {
    let head = value.get(..CHUNK_HEADER)?;
    if head[0] != CHUNK_VERSION || crc32fast::hash(&head[..13]).to_le_bytes() != head[13..17] {
        return None;
    }
    let last_seq = u64::from_be_bytes(head[1..9].try_into().ok()?);
    let count = u32::from_le_bytes(head[9..13].try_into().ok()?);
    (count > 0).then_some(ChunkHeader { last_seq, count })
}

/// The entries of a chunk whose checksums hold, as (position in the chunk, offset, length
/// of the whole entry), and how many of the header's count are missing or damaged. A
/// damaged length ends the walk: the rest of the chunk counts as damaged.
fn chunk_entries(value: &[u8], header: ChunkHeader) -> (Vec<(u64, usize, usize)>, u64) {
    let mut good = Vec::new();
    let mut seen = 0u64;
    let mut at = CHUNK_HEADER;
    while at < value.len() && seen < u64::from(header.count) {
        let Some(head) = value.get(at..at + ENTRY_HEADER) else { break };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let Some(payload) = value.get(at + ENTRY_HEADER..(at + ENTRY_HEADER).saturating_add(len)) else { break };
        if len > 0 && crc32fast::hash(payload).to_le_bytes() == head[4..8] {
            good.push((seen, at, ENTRY_HEADER + len));
        }
        seen += 1;
        at += ENTRY_HEADER + len;
    }
    let damaged = u64::from(header.count).saturating_sub(good.len() as u64);
    (good, damaged)
}

/// Decode one entry (its checksum already checked) under bincode's size limit (via the
/// frame decoder), so no length field can make it allocate past a small multiple of the
/// entry's size.
fn decode_entry(entry: &[u8]) -> Option<Record> {
    gantry_shared::frame::decode_body(entry.get(ENTRY_HEADER..)?).ok()
}

/// The records of the chunk stored under `key`, each with its entry: the chunk's records
/// have consecutive seqs starting at the key's and ending at the header's last seq. Records
/// that are damaged, do not decode or carry another seq are left out and counted.
struct Decoded<'a> {
    records: Vec<(Record, &'a [u8])>,
    damaged: u64,
    header: Option<ChunkHeader>,
}

fn decode_chunk<'a>(key: &[u8], value: &'a [u8]) -> Decoded<'a> {
    let (Some(first), Some(header)) = (key_seq(key), chunk_header(value)) else {
        return Decoded { records: Vec::new(), damaged: chunk_header(value).map_or(1, |h| u64::from(h.count)), header: None };
    };
    if header.last_seq < first || header.last_seq - first + 1 != u64::from(header.count) {
        return Decoded { records: Vec::new(), damaged: u64::from(header.count), header: None };
    }
    let (entries, mut damaged) = chunk_entries(value, header);
    let mut records = Vec::with_capacity(entries.len());
    for (position, at, len) in entries {
        let entry = &value[at..at + len];
        match decode_entry(entry) {
            Some(record) if record.seq == first + position => records.push((record, entry)),
            _ => damaged += 1,
        }
    }
    Decoded { records, damaged, header: Some(header) }
}

/// Stored size of the largest possible gap marker: the room a new gap needs under the cap.
fn max_gap_value_len() -> u64 {
    let record =
        Record { seq: u64::MAX, ts_unix_ms: i64::MIN, body: RecordBody::Gap { first_seq: u64::MAX, last_seq: u64::MAX, records: u64::MAX, bytes: u64::MAX } };
    encode_value(&record).map(|v| (CHUNK_HEADER + v.len()) as u64).unwrap_or(96)
}

/// Chunk values holding `entries` (seq, entry bytes; ascending), one chunk per run of
/// consecutive seqs and at most about [`CHUNK_TARGET_BYTES`] each: (key seq, value).
fn chunks_of(entries: &[(u64, &[u8])]) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < entries.len() {
        let mut end = start + 1;
        let mut bytes = entries[start].1.len();
        while end < entries.len() && entries[end].0 == entries[end - 1].0 + 1 && bytes + entries[end].1.len() <= CHUNK_TARGET_BYTES {
            bytes += entries[end].1.len();
            end += 1;
        }
        let run = &entries[start..end];
        out.push((run[0].0, chunk_value(run[run.len() - 1].0, run.iter().map(|(_, e)| *e))));
        start = end;
    }
    out
}

fn meta_u64(meta: &sled::Tree, key: &str) -> Result<u64, sled::Error> {
    Ok(meta.get(key.as_bytes())?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map(u64::from_be_bytes).unwrap_or(0))
}

fn storage(e: TransactionError<()>) -> Error {
    match e {
        TransactionError::Storage(e) => Error::Sled(e),
        TransactionError::Abort(()) => Error::Sled(sled::Error::ReportableBug("spool transaction aborted".into())),
    }
}

// ---------------------------------------------------------------------------------------
// Opening

/// What a scan of one class found at open.
#[derive(Debug, Default)]
struct Scan {
    state: ClassState,
    max_seq: u64,
    meta_next: u64,
}

struct Loaded {
    db: sled::Db,
    trees: [sled::Tree; 4],
    meta: sled::Tree,
    scans: [Scan; 4],
    corrupt_removed: u64,
}

enum LoadFailure {
    /// Another process holds the store.
    Locked,
    /// The environment refused (permissions, disk full): quarantining would not help.
    Environment(sled::Error),
    /// The store itself is damaged.
    Damaged(String),
}

fn classify(e: sled::Error) -> LoadFailure {
    use std::io::ErrorKind;
    match e {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => LoadFailure::Locked,
        sled::Error::Io(io)
            if matches!(
                io.kind(),
                ErrorKind::PermissionDenied
                    | ErrorKind::StorageFull
                    | ErrorKind::ReadOnlyFilesystem
                    | ErrorKind::OutOfMemory
                    | ErrorKind::Interrupted
                    | ErrorKind::WouldBlock
            ) || io.raw_os_error() == Some(24) /* EMFILE */ =>
        {
            LoadFailure::Environment(sled::Error::Io(io))
        }
        other => LoadFailure::Damaged(other.to_string()),
    }
}

fn open_tree(db: &sled::Db, name: &str) -> Result<sled::Tree, sled::Error> {
    db.open_tree(name.as_bytes())
}

/// Open the store and scan it: byte totals, highest seq, counters; entries with a bad key or
/// checksum are removed.
fn load(path: &Path) -> Result<Loaded, sled::Error> {
    // No background flusher: every append flushes before it returns, and acks need not be
    // durable (a resent record is dropped by the hub), so its wake-ups twice a second
    // would only cost an idle agent CPU.
    let db = sled::Config::new().path(path).cache_capacity(CACHE_BYTES).flush_every_ms(None).open()?;
    let meta = open_tree(&db, META_TREE)?;
    let trees = [open_tree(&db, CLASS_NAMES[0])?, open_tree(&db, CLASS_NAMES[1])?, open_tree(&db, CLASS_NAMES[2])?, open_tree(&db, CLASS_NAMES[3])?];
    let mut scans: [Scan; 4] = Default::default();
    let mut corrupt_removed = 0;
    for (i, (tree, scan)) in trees.iter().zip(scans.iter_mut()).enumerate() {
        let mut damaged_total = 0u64;
        // Repairs wait until the walk is done, so it never meets the chunks they write.
        let mut repairs = Vec::new();
        for entry in tree.iter() {
            let (key, value) = entry?;
            let header = chunk_header(&value);
            let first = key_seq(&key);
            let (Some(first), Some(header)) = (first, header.filter(|h| first.is_some_and(|f| h.last_seq >= f && h.last_seq - f + 1 == u64::from(h.count))))
            else {
                damaged_total += header.map_or(1, |h| u64::from(h.count));
                let mut batch = sled::Batch::default();
                batch.remove(&key);
                repairs.push(batch);
                continue;
            };
            let (good, damaged) = chunk_entries(&value, header);
            scan.max_seq = scan.max_seq.max(header.last_seq);
            if damaged == 0 {
                scan.state.records += u64::from(header.count);
                scan.state.bytes += value.len() as u64;
                continue;
            }
            damaged_total += damaged;
            let kept: Vec<(u64, &[u8])> = good.iter().map(|(pos, at, len)| (first + pos, &value[*at..at + len])).collect();
            let mut batch = sled::Batch::default();
            batch.remove(&key);
            for (seq, chunk) in chunks_of(&kept) {
                scan.state.records += chunk_header(&chunk).map_or(0, |h| u64::from(h.count));
                scan.state.bytes += chunk.len() as u64;
                batch.insert(&seq_key(seq)[..], chunk);
            }
            repairs.push(batch);
        }
        for batch in repairs {
            tree.apply_batch(batch)?;
        }
        scan.state.corrupt_records = meta_u64(&meta, &meta_key("corrupt", i))?;
        if damaged_total > 0 {
            scan.state.corrupt_records += damaged_total;
            corrupt_removed += damaged_total;
            meta.insert(meta_key("corrupt", i).as_bytes(), &scan.state.corrupt_records.to_be_bytes())?;
        }
        scan.meta_next = meta_u64(&meta, &meta_key("next_seq", i))?;
        scan.state.acked_up_to = meta_u64(&meta, &meta_key("acked", i))?;
        scan.state.dropped_records = meta_u64(&meta, &meta_key("dropped_records", i))?;
        scan.state.dropped_bytes = meta_u64(&meta, &meta_key("dropped_bytes", i))?;
    }
    if corrupt_removed > 0 {
        db.flush()?;
    }
    Ok(Loaded { db, trees, meta, scans, corrupt_removed })
}

/// [`load`], with a panic inside sled turned into a damaged-store failure.
fn load_guarded(path: &Path) -> Result<Loaded, LoadFailure> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load(path))) {
        Ok(Ok(loaded)) => Ok(loaded),
        Ok(Err(e)) => Err(classify(e)),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(LoadFailure::Damaged(format!("sled panicked: {message}")))
        }
    }
}

/// How long [`Spool::open`] waits for sled's file lock: sled releases it only when its
/// flusher thread exits, a moment after the last handle is dropped (sled issues #1234,
/// #1289), so an immediate reopen in the same process can find it still held.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// [`load_guarded`], waiting up to [`LOCK_WAIT`] for a lock still held by a closing handle.
/// A lock held by a live process stays held, and is reported after the wait.
fn load_waiting(path: &Path) -> Result<Loaded, LoadFailure> {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        match load_guarded(path) {
            Err(LoadFailure::Locked) if start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// What setting a damaged `conf` aside gave.
enum Salvage {
    Opened(Box<Loaded>),
    /// Still damaged: quarantine it.
    Damaged,
    /// The store is held by a live process (sled checks `conf` before its lock): `conf` was
    /// put back and nothing may be moved.
    Locked,
}

/// sled refuses a whole store when only its small `conf` file (storage parameters, always
/// the defaults here) is damaged. Move that file aside and try once more.
fn salvage_config(db_path: &Path, reason: &str) -> Salvage {
    let conf = db_path.join("conf");
    if !conf.is_file() {
        return Salvage::Damaged;
    }
    let aside = db_path.join("conf.damaged");
    if std::fs::rename(&conf, &aside).is_err() {
        return Salvage::Damaged;
    }
    sync_dir(db_path);
    match load_waiting(db_path) {
        Ok(loaded) => {
            tracing::warn!(path = %db_path.display(), %reason, "spool store opened again after setting its damaged conf file aside");
            Salvage::Opened(Box::new(loaded))
        }
        Err(LoadFailure::Locked) => {
            let _ = std::fs::remove_file(&conf);
            let _ = std::fs::rename(&aside, &conf);
            Salvage::Locked
        }
        Err(_) => Salvage::Damaged,
    }
}

/// Move a damaged store aside as `spool.corrupt-<unix_ts>` (with a suffix if taken).
fn quarantine(dir: &Path, db_path: &Path) -> Result<PathBuf, Error> {
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut target = dir.join(format!("{SPOOL_DIR}.corrupt-{ts}"));
    let mut n = 1u32;
    while target.exists() {
        target = dir.join(format!("{SPOOL_DIR}.corrupt-{ts}-{n}"));
        n += 1;
    }
    std::fs::rename(db_path, &target).map_err(io_err(db_path))?;
    sync_dir(dir);
    Ok(target)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Read `spool-seq.json`; a missing file is `None`, an unreadable one is logged and `None`.
fn read_seq_file(path: &Path) -> Result<Option<SeqFile>, Error> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Io { path: path.to_path_buf(), source: e }),
    };
    match serde_json::from_slice::<SeqFile>(&bytes) {
        Ok(file) if file.version == SEQ_FILE_VERSION => Ok(Some(file)),
        Ok(file) => {
            tracing::warn!(path = %path.display(), version = file.version, "spool seq file has an unknown version; ignored");
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "spool seq file is unreadable; ignored");
            Ok(None)
        }
    }
}

/// Write `spool-seq.json` through a synced temporary file and a rename.
fn write_seq_file(path: &Path, file: &SeqFile) -> Result<(), Error> {
    let text = serde_json::to_vec_pretty(file).map_err(|e| Error::Encode(e.to_string()))?;
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()
    };
    write().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The cap

/// What the cap forces out of one append.
struct CapPlan {
    /// Keys to remove: old records, and the head gap being extended.
    remove_old: Vec<sled::IVec>,
    /// Stored bytes of `remove_old`.
    removed_bytes: u64,
    /// Records in `remove_old`.
    removed_records: u64,
    /// How many of the appended records (oldest first) are not stored.
    drop_new: usize,
    /// The gap marker to write: seq and stored value.
    gap: Option<(u64, Vec<u8>)>,
    dropped: Dropped,
}

/// One appended record, encoded.
struct NewRecord {
    seq: u64,
    ts_unix_ms: i64,
    value: Vec<u8>,
}

impl Inner {
    /// Decide what to drop so the class fits under its cap after appending `new`: whole
    /// chunks from the head, then (if still over) the oldest of `new`, never its newest.
    fn plan_cap(&self, i: usize, st: &ClassState, new: &[NewRecord]) -> Result<Option<CapPlan>, Error> {
        let cap = self.config.cap_bytes[i];
        let entries: u64 = new.iter().map(|r| r.value.len() as u64).sum();
        let new_bytes = entries + CHUNK_HEADER as u64 * (1 + entries / CHUNK_TARGET_BYTES as u64);
        let mut total = st.bytes.saturating_add(new_bytes);
        if total <= cap {
            return Ok(None);
        }
        let gap_room = max_gap_value_len();
        let tree = &self.trees[i];
        let mut iter = tree.iter();
        let mut entry = iter.next().transpose()?;

        // A gap at the head is extended, not stacked behind.
        struct Base {
            key: sled::IVec,
            len: u64,
            first_seq: u64,
            records: u64,
            bytes: u64,
            ts_unix_ms: i64,
        }
        let mut base = None;
        if let Some((key, value)) = &entry {
            let decoded = decode_chunk(key, value);
            if let [(Record { ts_unix_ms, body: RecordBody::Gap { first_seq, records, bytes, .. }, .. }, _)] = decoded.records.as_slice() {
                if decoded.damaged == 0 {
                    base = Some(Base {
                        key: key.clone(),
                        len: value.len() as u64,
                        first_seq: *first_seq,
                        records: *records,
                        bytes: *bytes,
                        ts_unix_ms: *ts_unix_ms,
                    });
                    total = total.saturating_sub(value.len() as u64);
                    entry = iter.next().transpose()?;
                }
            }
        }

        let mut remove_old = Vec::new();
        let mut removed_bytes = 0u64;
        let mut removed_records = 0u64;
        let mut records = 0u64;
        let mut bytes = 0u64;
        let mut first_seq = None;
        let mut last_seq = None;
        let mut last_old: Option<(sled::IVec, sled::IVec)> = None;
        while total.saturating_add(gap_room) > cap {
            let Some((key, value)) = entry else { break };
            let len = value.len() as u64;
            let count = chunk_header(&value).map_or(1, |h| u64::from(h.count));
            total = total.saturating_sub(len);
            removed_bytes += len;
            removed_records += count;
            records += count;
            bytes += len;
            if let (Some(seq), Some(header)) = (key_seq(&key), chunk_header(&value)) {
                first_seq.get_or_insert(seq);
                last_seq = Some(header.last_seq.max(seq));
            }
            remove_old.push(key.clone());
            last_old = Some((key, value));
            entry = iter.next().transpose()?;
        }
        // Still over: the oldest of this append's own records go too, but never the newest.
        let mut drop_new = 0usize;
        let mut last_new_ts = None;
        while total.saturating_add(gap_room) > cap && drop_new + 1 < new.len() {
            let r = &new[drop_new];
            let len = r.value.len() as u64;
            total = total.saturating_sub(len);
            records += 1;
            bytes += len;
            first_seq.get_or_insert(r.seq);
            last_seq = Some(r.seq);
            last_new_ts = Some(r.ts_unix_ms);
            drop_new += 1;
        }
        if records == 0 {
            // Nothing but a gap marker and the newest record: leave things as they are.
            return Ok(None);
        }
        let (Some(first), Some(last)) = (first_seq, last_seq) else {
            // Only chunks with unreadable keys or headers went: remove them, no range to report.
            return Ok(Some(CapPlan {
                remove_old,
                removed_bytes,
                removed_records,
                drop_new,
                gap: None,
                dropped: Dropped { records, bytes, first_seq: 0, last_seq: 0 },
            }));
        };
        let ts_unix_ms = last_new_ts
            .or_else(|| last_old.as_ref().and_then(|(k, v)| decode_chunk(k, v).records.last().map(|(r, _)| r.ts_unix_ms)))
            .or(base.as_ref().map(|b| b.ts_unix_ms))
            .unwrap_or_else(now_ms);
        let (gap_first, gap_records, gap_bytes) = match &base {
            Some(b) => (b.first_seq.min(first), b.records.saturating_add(records), b.bytes.saturating_add(bytes)),
            None => (first, records, bytes),
        };
        if let Some(b) = base {
            remove_old.insert(0, b.key);
            removed_bytes += b.len;
            removed_records += 1;
        }
        let gap = Record { seq: last, ts_unix_ms, body: RecordBody::Gap { first_seq: gap_first, last_seq: last, records: gap_records, bytes: gap_bytes } };
        let gap_entry = encode_value(&gap)?;
        Ok(Some(CapPlan {
            remove_old,
            removed_bytes,
            removed_records,
            drop_new,
            gap: Some((last, chunk_value(last, std::iter::once(gap_entry.as_slice())))),
            dropped: Dropped { records, bytes, first_seq: first, last_seq: last },
        }))
    }

    /// Make sure seqs up to `last` of class `i` are covered by the sidecar's reservation.
    fn reserve(&self, i: usize, last: u64) -> Result<(), Error> {
        let mut file = lock(&self.seq_file);
        if last <= file.reserved_up_to[i] {
            return Ok(());
        }
        let mut next = file.clone();
        next.reserved_up_to[i] = last.saturating_add(SEQ_BLOCK);
        next.clean_next_seq = None;
        write_seq_file(&self.dir.join(SEQ_FILE), &next)?;
        *file = next;
        Ok(())
    }

    /// Replace the damaged chunk under `key` (`old_len` bytes, `old_count` records) by
    /// chunks of its `kept` records, and count the `damaged` ones.
    fn repair(&self, i: usize, st: &mut ClassState, key: &[u8], old: (u64, u64), kept: &[(u64, &[u8])], damaged: u64) -> Result<(), Error> {
        let (old_len, old_count) = old;
        let mut batch = sled::Batch::default();
        batch.remove(key);
        let mut records = 0u64;
        let mut bytes = 0u64;
        for (seq, chunk) in chunks_of(kept) {
            records += chunk_header(&chunk).map_or(0, |h| u64::from(h.count));
            bytes += chunk.len() as u64;
            batch.insert(&seq_key(seq)[..], chunk);
        }
        self.trees[i].apply_batch(batch)?;
        st.records = st.records.saturating_sub(old_count).saturating_add(records);
        st.bytes = st.bytes.saturating_sub(old_len).saturating_add(bytes);
        st.corrupt_records += damaged;
        self.meta.insert(meta_key("corrupt", i).as_bytes(), &st.corrupt_records.to_be_bytes())?;
        tracing::warn!(stream = CLASS_NAMES[i], removed = damaged, "spool removed corrupt records");
        Ok(())
    }
}

impl Drop for Inner {
    /// A clean close: flush, then record the exact next seqs so the next open needs no hole.
    fn drop(&mut self) {
        if self.db.flush().is_err() {
            return;
        }
        let mut file = lock(&self.seq_file).clone();
        let mut next = [0u64; 4];
        for (n, class) in next.iter_mut().zip(self.classes.iter()) {
            *n = lock(class).next_seq;
        }
        // Reservations already cover every seq handed out; the exact values only save a hole.
        if next.iter().zip(file.reserved_up_to.iter()).any(|(n, r)| n.saturating_sub(1) > *r) {
            return;
        }
        file.clean_next_seq = Some(next);
        if let Err(e) = write_seq_file(&self.dir.join(SEQ_FILE), &file) {
            tracing::warn!(error = %e, "spool could not record its clean close");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The API

impl Spool {
    /// Open (or create) the spool under `dir` (the agent's state directory). A store sled
    /// cannot open is moved aside and replaced by a fresh one (see [`OpenReport`]); an error
    /// is returned only when the environment refuses (another process holds the spool,
    /// permissions, disk full) or even a fresh store cannot be opened.
    pub fn open(dir: &Path, config: SpoolConfig) -> Result<(Spool, OpenReport), Error> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let seq_path = dir.join(SEQ_FILE);
        let previous = read_seq_file(&seq_path)?.unwrap_or_default();
        let db_path = dir.join(SPOOL_DIR);
        let mut quarantined = None;
        let mut config_repaired = false;
        let loaded = match load_waiting(&db_path) {
            Ok(loaded) => loaded,
            Err(LoadFailure::Locked) => return Err(Error::Locked(db_path)),
            Err(LoadFailure::Environment(e)) => return Err(Error::Sled(e)),
            Err(LoadFailure::Damaged(reason)) => match salvage_config(&db_path, &reason) {
                Salvage::Opened(loaded) => {
                    config_repaired = true;
                    *loaded
                }
                Salvage::Locked => return Err(Error::Locked(db_path)),
                Salvage::Damaged => {
                    tracing::error!(path = %db_path.display(), %reason, "spool store is damaged; quarantining it");
                    let target = quarantine(dir, &db_path)?;
                    quarantined = Some(target);
                    load_waiting(&db_path).map_err(|f| Error::Unrecoverable {
                        path: db_path.clone(),
                        reason: match f {
                            LoadFailure::Locked => "locked".into(),
                            LoadFailure::Environment(e) => e.to_string(),
                            LoadFailure::Damaged(reason) => reason,
                        },
                    })?
                }
            },
        };

        let mut states = [ClassState::default(); 4];
        let mut reserved = previous.reserved_up_to;
        let mut rolled_back = false;
        for (i, scan) in loaded.scans.iter().enumerate() {
            let from_store = scan.meta_next.max(scan.max_seq.saturating_add(1)).max(scan.state.acked_up_to.saturating_add(1)).max(1);
            let trusted = quarantined.is_none() && previous.clean_next_seq.is_some_and(|c| c[i] == from_store);
            if quarantined.is_none() && previous.clean_next_seq.is_some_and(|c| c[i] != from_store) {
                rolled_back = true;
            }
            let next_seq = if trusted { from_store } else { from_store.max(previous.reserved_up_to[i].saturating_add(1)) };
            states[i] = ClassState { next_seq, ..scan.state };
            reserved[i] = reserved[i].max(next_seq.saturating_sub(1));
        }
        // From here on the previous close no longer counts as clean.
        let seq_file = SeqFile { version: SEQ_FILE_VERSION, reserved_up_to: reserved, clean_next_seq: None };
        write_seq_file(&seq_path, &seq_file)?;

        let Loaded { db, trees, meta, corrupt_removed, .. } = loaded;
        let inner = Inner {
            dir: dir.to_path_buf(),
            db,
            trees,
            meta,
            config,
            classes: states.map(Mutex::new),
            durable: states.map(|s| AtomicU64::new(s.next_seq.saturating_sub(1))),
            seq_file: Mutex::new(seq_file),
        };
        if rolled_back {
            tracing::error!(path = %db_path.display(), "spool store came back older than it was closed; records may be lost");
        }
        let report = OpenReport { quarantined, corrupt_records: corrupt_removed, rolled_back, config_repaired };
        Ok((Spool { inner: Arc::new(inner) }, report))
    }

    /// Append records with fresh consecutive seqs (starting at 1 for a new stream, never
    /// reused, surviving restarts), and optionally set a checkpoint, in ONE sled
    /// transaction; then flush to disk before returning. Applies the cap (see the module
    /// docs). On an error before the commit nothing was stored; an error from the final flush
    /// means the records are stored but maybe not yet durable (do not append them again:
    /// [`Spool::flush`] retries the flush).
    pub fn append(&self, class: StreamClass, items: Vec<(i64, RecordBody)>, checkpoint: Option<(&str, &[u8])>) -> Result<AppendOutcome, Error> {
        let inner = &*self.inner;
        let i = class.index();
        let mut st = lock(&inner.classes[i]);
        let first = st.next_seq;
        let n = items.len() as u64;
        let Some(after) = first.checked_add(n) else { return Err(Error::SeqExhausted(CLASS_NAMES[i])) };
        let last = after - 1;

        let mut new = Vec::with_capacity(items.len());
        for (index, (ts_unix_ms, body)) in items.into_iter().enumerate() {
            let seq = first + index as u64;
            let value = encode_value(&Record { seq, ts_unix_ms, body })?;
            if value.len() - ENTRY_HEADER > MAX_RECORD_BYTES {
                return Err(Error::RecordTooLarge { index, bytes: value.len() - ENTRY_HEADER, max: MAX_RECORD_BYTES });
            }
            new.push(NewRecord { seq, ts_unix_ms, value });
        }
        if n > 0 {
            inner.reserve(i, last)?;
        }
        let plan = inner.plan_cap(i, &st, &new)?;
        let drop_new = plan.as_ref().map_or(0, |p| p.drop_new);
        let (dropped_records, dropped_bytes) = match &plan {
            Some(p) => (st.dropped_records + p.dropped.records, st.dropped_bytes + p.dropped.bytes),
            None => (st.dropped_records, st.dropped_bytes),
        };
        let ckpt = checkpoint.map(|(key, value)| (ckpt_key(key), value));
        let kept: Vec<(u64, &[u8])> = new[drop_new..].iter().map(|r| (r.seq, r.value.as_slice())).collect();
        let chunks = chunks_of(&kept);

        (&inner.trees[i], &inner.meta)
            .transaction(|(tree, meta)| {
                if let Some(plan) = &plan {
                    for key in &plan.remove_old {
                        tree.remove(key.clone())?;
                    }
                    if let Some((seq, value)) = &plan.gap {
                        tree.insert(&seq_key(*seq)[..], value.as_slice())?;
                    }
                    meta.insert(meta_key("dropped_records", i).as_bytes(), &dropped_records.to_be_bytes()[..])?;
                    meta.insert(meta_key("dropped_bytes", i).as_bytes(), &dropped_bytes.to_be_bytes()[..])?;
                }
                for (seq, value) in &chunks {
                    tree.insert(&seq_key(*seq)[..], value.as_slice())?;
                }
                meta.insert(meta_key("next_seq", i).as_bytes(), &after.to_be_bytes()[..])?;
                if let Some((key, value)) = &ckpt {
                    meta.insert(key.as_bytes(), *value)?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(storage)?;

        st.next_seq = after;
        st.records += kept.len() as u64;
        st.bytes += chunks.iter().map(|(_, v)| v.len() as u64).sum::<u64>();
        if let Some(plan) = &plan {
            st.records = st.records.saturating_sub(plan.removed_records);
            st.bytes = st.bytes.saturating_sub(plan.removed_bytes);
            if let Some((_, value)) = &plan.gap {
                st.records += 1;
                st.bytes += value.len() as u64;
            }
            st.dropped_records = dropped_records;
            st.dropped_bytes = dropped_bytes;
        }
        drop(st);

        // Outside the lock, so concurrent appends share fsyncs. A flush covers every commit
        // before it, and seqs are committed in order under the lock: all up to `last` are
        // durable once it returns.
        inner.db.flush()?;
        if n > 0 {
            inner.durable[i].fetch_max(last, Ordering::AcqRel);
        }
        Ok(AppendOutcome { first_seq: first, last_seq: last, dropped: plan.and_then(|p| p.gap.is_some().then_some(p.dropped)) })
    }

    /// Records with seq > `after`, in seq order, at most `max_records` and about `max_bytes`
    /// of encoded payload (at least one record if there is any). Only records already on
    /// disk are returned. Corrupt records (checksum mismatch, undecodable, wrong seq) are
    /// removed, counted and skipped: never returned, never a panic.
    pub fn pending(&self, class: StreamClass, after: u64, max_records: usize, max_bytes: usize) -> Result<Vec<Record>, Error> {
        let inner = &*self.inner;
        let i = class.index();
        let tree = &inner.trees[i];
        let mut st = lock(&inner.classes[i]);
        let durable = inner.durable[i].load(Ordering::Acquire);
        let mut out = Vec::new();
        let Some(start) = after.checked_add(1).filter(|s| *s <= durable) else { return Ok(out) };
        let max_records = max_records.max(1);
        let mut bytes = 0usize;
        // The chunk holding `start` may begin before it.
        let from = match tree.range(..=seq_key(start)).next_back().transpose()? {
            Some((key, value)) if chunk_header(&value).is_none_or(|h| h.last_seq >= start) => key.to_vec(),
            _ => seq_key(start).to_vec(),
        };
        'chunks: for item in tree.range(from..=seq_key(durable).to_vec()) {
            let (key, value) = item?;
            let decoded = decode_chunk(&key, &value);
            if decoded.damaged > 0 {
                let kept: Vec<(u64, &[u8])> = decoded.records.iter().map(|(r, e)| (r.seq, *e)).collect();
                let count = decoded.header.map_or(decoded.damaged, |h| u64::from(h.count));
                inner.repair(i, &mut st, &key, (value.len() as u64, count), &kept, decoded.damaged)?;
            }
            for (record, entry) in decoded.records {
                // `> after` also skips what a repair above rewrote ahead of the walk.
                if record.seq <= after || record.seq > durable || out.last().is_some_and(|r: &Record| record.seq <= r.seq) {
                    continue;
                }
                let len = entry.len() - ENTRY_HEADER;
                if !out.is_empty() && bytes.saturating_add(len) > max_bytes {
                    break 'chunks;
                }
                bytes += len;
                out.push(record);
                if out.len() >= max_records {
                    break 'chunks;
                }
            }
        }
        Ok(out)
    }

    /// Delete every record with seq <= `up_to` (acknowledged by the hub). Not fsynced: after
    /// a crash the records come back and are resent, and the hub drops them. An ack at or
    /// beyond the next seq (the hub holds seqs this spool lost) moves the stream past it.
    pub fn ack(&self, class: StreamClass, up_to: u64) -> Result<(), Error> {
        let inner = &*self.inner;
        let i = class.index();
        let tree = &inner.trees[i];
        let mut st = lock(&inner.classes[i]);
        if up_to >= st.next_seq {
            if let Some(next) = up_to.checked_add(1) {
                tracing::warn!(
                    stream = CLASS_NAMES[i],
                    next_seq = st.next_seq,
                    hub_mark = up_to,
                    "hub holds seqs this spool never reached; moving the stream past them"
                );
                inner.reserve(i, up_to)?;
                inner.meta.insert(meta_key("next_seq", i).as_bytes(), &next.to_be_bytes())?;
                st.next_seq = next;
            }
        }
        loop {
            let mut batch = sled::Batch::default();
            let mut count = 0usize;
            let mut records = 0u64;
            let mut bytes = 0u64;
            let mut done = false;
            for entry in tree.range(..=seq_key(up_to)).take(ACK_CHUNK) {
                let (key, value) = entry?;
                count += 1;
                match chunk_header(&value) {
                    // Partly acknowledged: keep the rest, under the seq it now starts at.
                    // Seqs follow from positions, so the entries are not decoded here; a damaged
                    // one is left for `pending` to find and count.
                    Some(header) if header.last_seq > up_to && key_seq(&key).is_some() => {
                        let first = key_seq(&key).unwrap_or(0);
                        let (entries, _) = chunk_entries(&value, header);
                        let kept: Vec<(u64, &[u8])> =
                            entries.iter().map(|(pos, at, len)| (first + pos, &value[*at..at + len])).filter(|(seq, _)| *seq > up_to).collect();
                        batch.remove(key.clone());
                        records += u64::from(header.count);
                        bytes += value.len() as u64;
                        for (seq, chunk) in chunks_of(&kept) {
                            records = records.saturating_sub(chunk_header(&chunk).map_or(0, |h| u64::from(h.count)));
                            bytes = bytes.saturating_sub(chunk.len() as u64);
                            batch.insert(&seq_key(seq)[..], chunk);
                        }
                        done = true;
                        break;
                    }
                    header => {
                        records += header.map_or(1, |h| u64::from(h.count));
                        bytes += value.len() as u64;
                        batch.remove(key);
                    }
                }
            }
            if count == 0 {
                break;
            }
            tree.apply_batch(batch)?;
            st.records = st.records.saturating_sub(records);
            st.bytes = st.bytes.saturating_sub(bytes);
            if done || count < ACK_CHUNK {
                break;
            }
        }
        if up_to > st.acked_up_to {
            st.acked_up_to = up_to;
            inner.meta.insert(meta_key("acked", i).as_bytes(), &up_to.to_be_bytes())?;
        }
        Ok(())
    }

    /// The value last stored for checkpoint `key` by [`Spool::append`].
    pub fn checkpoint(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.inner.meta.get(ckpt_key(key).as_bytes())?.map(|v| v.to_vec()))
    }

    /// Counters of one class.
    pub fn stats(&self, class: StreamClass) -> StreamStats {
        let i = class.index();
        let st = *lock(&self.inner.classes[i]);
        let oldest_seq = self.inner.trees[i].first().ok().flatten().and_then(|(k, _)| key_seq(&k));
        StreamStats {
            records: st.records,
            bytes: st.bytes,
            dropped_records: st.dropped_records,
            dropped_bytes: st.dropped_bytes,
            corrupt_records: st.corrupt_records,
            next_seq: st.next_seq,
            oldest_seq,
            acked_up_to: st.acked_up_to,
        }
    }

    /// Flush everything to disk (acks and removals included).
    pub fn flush(&self) -> Result<(), Error> {
        let inner = &*self.inner;
        let mut committed = [0u64; 4];
        for (c, class) in committed.iter_mut().zip(inner.classes.iter()) {
            *c = lock(class).next_seq.saturating_sub(1);
        }
        inner.db.flush()?;
        for (durable, c) in inner.durable.iter().zip(committed) {
            durable.fetch_max(c, Ordering::AcqRel);
        }
        Ok(())
    }

    /// The cap configuration in force.
    pub fn config(&self) -> SpoolConfig {
        self.inner.config
    }

    /// The classes in the order of [`SpoolConfig::cap_bytes`].
    pub fn classes() -> [StreamClass; 4] {
        CLASSES
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use gantry_shared::telemetry::{Event, LogLine, LogStream, Sample, Severity};
    use std::collections::BTreeSet;

    use crate::test_dir::TempDir;

    fn log(n: u64, len: usize) -> (i64, RecordBody) {
        let mut line = format!("line {n} ");
        while line.len() < len {
            line.push('x');
        }
        line.truncate(len);
        (1_700_000_000_000 + n as i64, RecordBody::Log(LogLine { source: "/var/log/app.log".into(), stream: LogStream::File, container: None, line }))
    }

    fn logs(from: u64, count: u64, len: usize) -> Vec<(i64, RecordBody)> {
        (from..from + count).map(|n| log(n, len)).collect()
    }

    fn line_of(r: &Record) -> &str {
        match &r.body {
            RecordBody::Log(l) => &l.line,
            other => panic!("not a log: {other:?}"),
        }
    }

    fn open(dir: &Path) -> (Spool, OpenReport) {
        Spool::open(dir, SpoolConfig::default()).unwrap()
    }

    fn cfg_logs_cap(cap: u64) -> SpoolConfig {
        let mut config = SpoolConfig::default();
        config.cap_bytes[1] = cap;
        config
    }

    fn all_pending(spool: &Spool, class: StreamClass) -> Vec<Record> {
        spool.pending(class, 0, usize::MAX, usize::MAX).unwrap()
    }

    #[test]
    fn spool_round_trip_append_pending_ack() {
        let dir = TempDir::new("roundtrip");
        let (spool, report) = open(dir.path());
        assert_eq!((report.quarantined, report.corrupt_records, report.rolled_back), (None, 0, false));

        let out = spool.append(StreamClass::Logs, logs(0, 3, 50), Some(("file:/var/log/app.log", b"offset=150"))).unwrap();
        assert_eq!((out.first_seq, out.last_seq, out.dropped), (1, 3, None));
        let out = spool.append(StreamClass::Logs, logs(3, 2, 50), None).unwrap();
        assert_eq!((out.first_seq, out.last_seq), (4, 5));
        // Classes have their own seqs.
        let ev = Event { kind: "agent.started".into(), severity: Severity::Info, message: "hi".into(), attributes: vec![] };
        let out = spool.append(StreamClass::Events, vec![(5, RecordBody::Event(ev.clone()))], None).unwrap();
        assert_eq!((out.first_seq, out.last_seq), (1, 1));
        let sample = Sample { name: "cpu".into(), labels: vec![("core".into(), "0".into())], value: 0.5 };
        spool.append(StreamClass::Metrics, vec![(6, RecordBody::Metrics(vec![sample]))], None).unwrap();

        let pending = all_pending(&spool, StreamClass::Logs);
        assert_eq!(pending.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert_eq!(pending[0].ts_unix_ms, 1_700_000_000_000);
        assert!(line_of(&pending[4]).starts_with("line 4 "));
        assert_eq!(all_pending(&spool, StreamClass::Events)[0].body, RecordBody::Event(ev));
        assert_eq!(spool.checkpoint("file:/var/log/app.log").unwrap().as_deref(), Some(&b"offset=150"[..]));
        assert_eq!(spool.checkpoint("other").unwrap(), None);

        // Limits: count, bytes (at least one), and `after`.
        assert_eq!(spool.pending(StreamClass::Logs, 0, 2, usize::MAX).unwrap().len(), 2);
        assert_eq!(spool.pending(StreamClass::Logs, 0, 100, 1).unwrap().len(), 1);
        assert_eq!(spool.pending(StreamClass::Logs, 0, 100, 250).unwrap().len(), 3);
        assert_eq!(spool.pending(StreamClass::Logs, 3, 100, usize::MAX).unwrap().len(), 2);
        assert!(spool.pending(StreamClass::Logs, 5, 100, usize::MAX).unwrap().is_empty());
        assert!(spool.pending(StreamClass::Logs, u64::MAX, 100, usize::MAX).unwrap().is_empty());

        let before = spool.stats(StreamClass::Logs);
        assert_eq!((before.records, before.next_seq, before.oldest_seq), (5, 6, Some(1)));
        spool.ack(StreamClass::Logs, 3).unwrap();
        let after = spool.stats(StreamClass::Logs);
        assert_eq!((after.records, after.acked_up_to, after.oldest_seq), (2, 3, Some(4)));
        assert!(after.bytes < before.bytes && after.bytes > 0);
        assert_eq!(all_pending(&spool, StreamClass::Logs).iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4, 5]);
        spool.ack(StreamClass::Logs, 5).unwrap();
        let empty = spool.stats(StreamClass::Logs);
        assert_eq!((empty.records, empty.bytes, empty.oldest_seq, empty.next_seq), (0, 0, None, 6));
        // Acked seqs are never handed out again.
        assert_eq!(spool.append(StreamClass::Logs, logs(5, 1, 10), None).unwrap().first_seq, 6);
        // An empty append only sets the checkpoint.
        let out = spool.append(StreamClass::Logs, vec![], Some(("file:/var/log/app.log", b"offset=999"))).unwrap();
        assert_eq!((out.first_seq, out.last_seq), (7, 6));
        assert_eq!(spool.checkpoint("file:/var/log/app.log").unwrap().as_deref(), Some(&b"offset=999"[..]));
    }

    #[test]
    fn spool_seqs_and_checkpoints_survive_clean_reopen() {
        let dir = TempDir::new("reopen");
        {
            let (spool, _) = open(dir.path());
            spool.append(StreamClass::Logs, logs(0, 10, 40), Some(("k", b"v1"))).unwrap();
            spool.ack(StreamClass::Logs, 4).unwrap();
            spool.append(StreamClass::Health, logs(0, 1, 40), None).unwrap();
        }
        let (spool, report) = open(dir.path());
        assert_eq!(report.quarantined, None);
        let stats = spool.stats(StreamClass::Logs);
        assert_eq!((stats.records, stats.next_seq, stats.acked_up_to, stats.oldest_seq), (6, 11, 4, Some(5)));
        assert_eq!(spool.checkpoint("k").unwrap().as_deref(), Some(&b"v1"[..]));
        // A clean close leaves no hole: the stream continues consecutively.
        assert_eq!(spool.append(StreamClass::Logs, logs(10, 1, 40), None).unwrap().first_seq, 11);
        assert_eq!(spool.append(StreamClass::Health, logs(0, 1, 40), None).unwrap().first_seq, 2);
        assert_eq!(spool.append(StreamClass::Metrics, logs(0, 1, 40), None).unwrap().first_seq, 1);
        let seqs: Vec<u64> = all_pending(&spool, StreamClass::Logs).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (5..=11).collect::<Vec<_>>());
        // Byte totals recomputed by the scan at open match what appends counted.
        let bytes_now = spool.stats(StreamClass::Logs).bytes;
        drop(spool);
        let (spool, _) = open(dir.path());
        assert_eq!(spool.stats(StreamClass::Logs).bytes, bytes_now);
    }

    #[test]
    fn spool_drop_without_flush_keeps_records() {
        let dir = TempDir::new("noflush");
        let (spool, _) = open(dir.path());
        spool.append(StreamClass::Events, logs(0, 5, 30), Some(("c", b"1"))).unwrap();
        drop(spool);
        let (spool, _) = open(dir.path());
        assert_eq!(all_pending(&spool, StreamClass::Events).len(), 5);
        assert_eq!(spool.checkpoint("c").unwrap().as_deref(), Some(&b"1"[..]));
    }

    const CRASH_ENV: &str = "GANTRY_SPOOL_CRASH_DIR";

    /// The child half of `spool_crash_after_append_keeps_records`: appends, then exits
    /// without running any destructor (no clean close, no sled shutdown).
    fn crash_child(dir: &str) -> ! {
        let (spool, _) = open(Path::new(dir));
        let mut last = 0;
        for round in 0..10 {
            last = spool.append(StreamClass::Logs, logs(round * 10, 10, 60), Some(("pos", &round.to_be_bytes()))).unwrap().last_seq;
        }
        println!("LAST_SEQ={last}");
        let _ = std::io::stdout().flush();
        std::process::exit(0);
    }

    #[test]
    fn spool_crash_after_append_keeps_records() {
        // Re-run in a child process (this same test, with the directory in the
        // environment), which appends and dies without a clean close.
        if let Ok(dir) = std::env::var(CRASH_ENV) {
            crash_child(&dir);
        }
        let dir = TempDir::new("crash");
        for run in 0..2u64 {
            let output = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "spool::tests::spool_crash_after_append_keeps_records", "--nocapture", "--test-threads=1"])
                .env(CRASH_ENV, dir.path())
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout);
            let last: u64 = stdout
                .lines()
                .find_map(|l| l.split("LAST_SEQ=").nth(1))
                .unwrap_or_else(|| panic!("child printed no seq: {stdout} {}", String::from_utf8_lossy(&output.stderr)))
                .trim()
                .parse()
                .unwrap();
            let (spool, report) = open(dir.path());
            assert_eq!(report.quarantined, None);
            let pending = all_pending(&spool, StreamClass::Logs);
            assert_eq!(pending.len() as u64, 100 * (run + 1), "every appended record survives the crash");
            assert_eq!(pending.last().unwrap().seq, last);
            assert_eq!(spool.checkpoint("pos").unwrap().as_deref(), Some(&9u64.to_be_bytes()[..]));
            // After a crash the store is not trusted for the next seq: the stream continues
            // past the reservation, never at or below a seq handed out.
            let next = spool.stats(StreamClass::Logs).next_seq;
            assert!(next > last, "next seq {next} must be above {last}");
            if run == 0 {
                assert_eq!(last, 100);
                assert_eq!(next, 10 + SEQ_BLOCK + 1, "the reservation made by the first append, plus one");
            }
        }
    }

    #[test]
    fn spool_cap_drops_oldest_behind_one_gap() {
        let dir = TempDir::new("cap");
        let cap = 20_000;
        let (spool, _) = Spool::open(dir.path(), cfg_logs_cap(cap)).unwrap();
        let one = encode_value(&Record { seq: 1, ts_unix_ms: 0, body: log(0, 200).1 }).unwrap().len() as u64;

        // 90 records fit (~20 KB cap, ~230 bytes each).
        let mut n = 0;
        while spool.stats(StreamClass::Logs).bytes + one <= cap {
            let out = spool.append(StreamClass::Logs, logs(n, 1, 200), None).unwrap();
            assert_eq!(out.dropped, None);
            n += 1;
        }
        let fitting = n;
        // Overflow, ten records per append.
        let mut total_dropped = 0;
        let mut last_dropped = 0;
        // Until at least 50 records went (a ten-record chunk costs less than ten one-record
        // chunks, so an overflow drops a few less than ten).
        let mut rounds = 0;
        while total_dropped < 50 {
            rounds += 1;
            assert!(rounds <= 20, "50 records dropped within 20 overflowing appends");
            let out = spool.append(StreamClass::Logs, logs(n, 10, 200), None).unwrap();
            n += 10;
            let dropped = out.dropped.expect("the cap drops records");
            assert_eq!(dropped.first_seq, last_dropped + 1);
            last_dropped = dropped.last_seq;
            total_dropped += dropped.records;
            let stats = spool.stats(StreamClass::Logs);
            assert!(stats.bytes <= cap + one, "bytes {} over cap {cap} + {one}", stats.bytes);
            assert_eq!(stats.dropped_records, total_dropped);

            let pending = all_pending(&spool, StreamClass::Logs);
            let gaps: Vec<_> = pending.iter().filter(|r| matches!(r.body, RecordBody::Gap { .. })).collect();
            assert_eq!(gaps.len(), 1, "exactly one gap");
            let RecordBody::Gap { first_seq, last_seq, records, bytes } = pending[0].body else { panic!("the gap is at the head") };
            assert_eq!((first_seq, last_seq, records, bytes), (1, last_dropped, total_dropped, stats.dropped_bytes));
            assert_eq!(pending[0].seq, last_dropped, "the gap stands at the last dropped seq");
            // Then the newer records, in order, with nothing missing.
            let rest: Vec<u64> = pending[1..].iter().map(|r| r.seq).collect();
            assert_eq!(rest, (last_dropped + 1..=n).collect::<Vec<_>>());
            assert_eq!(stats.records, pending.len() as u64);
            assert_eq!(stats.oldest_seq, Some(last_dropped));
        }
        assert!(total_dropped >= 50 && fitting > 50, "dropped {total_dropped}, fitting {fitting}");

        // The counters and the gap survive a reopen, and merging goes on.
        drop(spool);
        let (spool, _) = Spool::open(dir.path(), cfg_logs_cap(cap)).unwrap();
        assert_eq!(spool.stats(StreamClass::Logs).dropped_records, total_dropped);
        let out = spool.append(StreamClass::Logs, logs(n, 5, 200), None).unwrap();
        let dropped = out.dropped.unwrap();
        assert_eq!(dropped.first_seq, last_dropped + 1);
        let pending = all_pending(&spool, StreamClass::Logs);
        let RecordBody::Gap { first_seq, records, .. } = pending[0].body else { panic!("gap at head") };
        assert_eq!((first_seq, records), (1, total_dropped + dropped.records));

        // Once the hub acknowledged the gap, the next overflow starts a new one.
        let head = pending[0].seq;
        spool.ack(StreamClass::Logs, head).unwrap();
        let before_next = spool.stats(StreamClass::Logs).next_seq;
        let out = spool.append(StreamClass::Logs, logs(0, 10, 200), None).unwrap();
        let dropped = out.dropped.unwrap();
        assert_eq!(dropped.first_seq, head + 1);
        let pending = all_pending(&spool, StreamClass::Logs);
        let RecordBody::Gap { first_seq, last_seq, records, .. } = pending[0].body else { panic!("gap at head") };
        assert_eq!((first_seq, last_seq, records), (head + 1, dropped.last_seq, dropped.records));
        assert_eq!(pending.last().unwrap().seq, before_next + 9);
        // Other classes are untouched by the logs cap.
        assert_eq!(spool.stats(StreamClass::Events).dropped_records, 0);
    }

    #[test]
    fn spool_one_append_over_cap_keeps_its_newest() {
        let dir = TempDir::new("capone");
        let (spool, _) = Spool::open(dir.path(), cfg_logs_cap(2_000)).unwrap();
        let out = spool.append(StreamClass::Logs, logs(0, 40, 200), None).unwrap();
        let dropped = out.dropped.unwrap();
        let pending = all_pending(&spool, StreamClass::Logs);
        assert!(matches!(pending[0].body, RecordBody::Gap { first_seq: 1, .. }));
        assert_eq!(pending.last().unwrap().seq, 40, "the newest record is kept");
        assert_eq!(dropped.first_seq, 1);
        assert_eq!(dropped.records as usize + pending.len() - 1, 40);
        assert!(spool.stats(StreamClass::Logs).bytes <= 2_000);

        // A record larger than the whole cap: kept alone, behind the (merged) gap.
        let (spool2, _) = {
            drop(spool);
            Spool::open(dir.path(), cfg_logs_cap(100)).unwrap()
        };
        spool2.append(StreamClass::Logs, logs(40, 1, 1000), None).unwrap();
        let pending = all_pending(&spool2, StreamClass::Logs);
        assert_eq!(pending.len(), 2);
        assert!(matches!(pending[0].body, RecordBody::Gap { first_seq: 1, last_seq: 40, records: 40, .. }));
        assert_eq!(pending[1].seq, 41);
        // Another one: the previous big record goes into the gap, the gap is not re-added.
        spool2.append(StreamClass::Logs, logs(41, 1, 1000), None).unwrap();
        let pending = all_pending(&spool2, StreamClass::Logs);
        assert_eq!(pending.len(), 2);
        assert!(matches!(pending[0].body, RecordBody::Gap { first_seq: 1, last_seq: 41, records: 41, .. }));
        // Too large to ever send: refused, nothing stored.
        let huge = logs(0, 1, MAX_RECORD_BYTES + 1);
        assert!(matches!(spool2.append(StreamClass::Logs, huge, None), Err(Error::RecordTooLarge { index: 0, .. })));
        assert_eq!(spool2.stats(StreamClass::Logs).next_seq, 43);
    }

    /// The (offset, length) of every entry of the chunk under `key`, by position.
    fn entry_spans(tree: &sled::Tree, key: u64) -> (Vec<u8>, Vec<(usize, usize)>) {
        let value = tree.get(seq_key(key)).unwrap().unwrap().to_vec();
        let header = chunk_header(&value).unwrap();
        let (entries, damaged) = chunk_entries(&value, header);
        assert_eq!(damaged, 0);
        (value, entries.into_iter().map(|(_, at, len)| (at, len)).collect())
    }

    #[test]
    fn spool_corrupt_values_are_skipped_and_counted() {
        let dir = TempDir::new("corrupt");
        let (spool, _) = open(dir.path());
        spool.append(StreamClass::Logs, logs(0, 6, 80), None).unwrap();
        let tree = &spool.inner.trees[1];
        let (mut chunk, spans) = entry_spans(tree, 1);
        assert_eq!(spans.len(), 6, "one append, one chunk");
        // 2: a flipped byte (checksum mismatch).
        chunk[spans[1].0 + ENTRY_HEADER + 5] ^= 0x40;
        // 3: a valid checksum over a payload that does not decode (a huge claimed length).
        let (at, len) = spans[2];
        let mut payload = vec![0xff; len - ENTRY_HEADER];
        payload[0] = 3;
        chunk[at + 4..at + 8].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        chunk[at + ENTRY_HEADER..at + len].copy_from_slice(&payload);
        // 4: a valid record at the wrong place (its seq says 5).
        assert_eq!(spans[3].1, spans[4].1);
        let five = chunk[spans[4].0..spans[4].0 + spans[4].1].to_vec();
        chunk[spans[3].0..spans[3].0 + spans[3].1].copy_from_slice(&five);
        tree.insert(seq_key(1), chunk).unwrap();

        let before = spool.stats(StreamClass::Logs);
        let pending = all_pending(&spool, StreamClass::Logs);
        assert_eq!(pending.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 5, 6]);
        let after = spool.stats(StreamClass::Logs);
        assert_eq!((after.corrupt_records, after.records), (3, 3));
        assert!(after.bytes < before.bytes);
        let stored: u64 = tree.iter().map(|kv| kv.unwrap().1.len() as u64).sum();
        assert_eq!(after.bytes, stored, "the byte count is exactly what the tree holds");
        // Removed, so they are not met again.
        assert_eq!(all_pending(&spool, StreamClass::Logs).len(), 3);
        assert_eq!(spool.stats(StreamClass::Logs).corrupt_records, 3);

        // Corruption found by the scan at open: reported, counted, removed. Record 6 damaged
        // inside its chunk, a chunk with a broken header, and a key that is no seq.
        let (mut chunk, spans) = entry_spans(tree, 5);
        chunk[spans[1].0 + ENTRY_HEADER] ^= 0x01;
        tree.insert(seq_key(5), chunk).unwrap();
        tree.insert(seq_key(9), &b"xx"[..]).unwrap();
        tree.insert(&b"bad key"[..], &b"whatever"[..]).unwrap();
        drop(spool);
        let (spool, report) = open(dir.path());
        assert_eq!(report.corrupt_records, 3);
        assert_eq!(report.quarantined, None);
        let stats = spool.stats(StreamClass::Logs);
        assert_eq!((stats.corrupt_records, stats.records), (6, 2));
        assert_eq!(all_pending(&spool, StreamClass::Logs).iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 5]);
        // Seqs go on after the highest one handed out.
        assert_eq!(spool.append(StreamClass::Logs, logs(6, 1, 80), None).unwrap().first_seq, 7);
    }

    /// A tiny deterministic generator, so failures reproduce.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            if n == 0 {
                0
            } else {
                self.next() % n
            }
        }
    }

    fn sled_files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.join(SPOOL_DIR)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    out.push(path);
                }
            }
        }
        out.sort();
        out
    }

    /// Fill a spool with a few appends and acks over all classes; return the highest seq
    /// handed out per class.
    fn fill(dir: &Path, rounds: u64) -> [u64; 4] {
        let (spool, _) = open(dir);
        let mut last = [0u64; 4];
        for round in 0..rounds {
            for (i, class) in CLASSES.iter().enumerate() {
                let out = spool.append(*class, logs(round * 20, 20, 150), Some(("k", b"v"))).unwrap();
                last[i] = out.last_seq;
            }
            if round % 3 == 2 {
                spool.ack(StreamClass::Logs, last[1] - 10).unwrap();
            }
        }
        last
    }

    /// Open after damage: never a panic; the spool works and hands out only fresh seqs.
    /// Returns the report and the new highest seqs.
    fn check_after_damage(dir: &Path, mut last: [u64; 4], what: &str) -> (OpenReport, [u64; 4]) {
        let (spool, report) = Spool::open(dir, SpoolConfig::default()).unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
        for (i, class) in CLASSES.iter().enumerate() {
            // Reading whatever survived must not fail or panic.
            let pending = spool.pending(*class, 0, usize::MAX, usize::MAX);
            if let Ok(pending) = &pending {
                assert!(pending.windows(2).all(|w| w[0].seq < w[1].seq), "{what}: pending out of order");
            }
            let out = spool.append(*class, logs(0, 2, 50), None).unwrap_or_else(|e| panic!("{what}: append failed: {e}"));
            assert!(out.first_seq > last[i], "{what}: {class:?} reused seq {} <= {}", out.first_seq, last[i]);
            last[i] = out.last_seq;
        }
        let _ = spool.checkpoint("k");
        (report, last)
    }

    /// Damage one sled file of a filled spool, then open it twice. Returns the outcome.
    fn damage_trial(rng: &mut XorShift, trial: u64, rounds: u64) -> String {
        let dir = TempDir::new("damage");
        let last = fill(dir.path(), rounds);
        let files = sled_files(dir.path());
        let file = &files[rng.below(files.len() as u64) as usize];
        let mut bytes = std::fs::read(file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let what = if trial % 3 < 1 && bytes.len() > 1 {
            let keep = rng.below(bytes.len() as u64) as usize;
            bytes.truncate(keep);
            format!("trial {trial} ({} bytes): {name} truncated to {keep}", std::fs::metadata(file).unwrap().len())
        } else {
            let flips = 1 + rng.below(16);
            for _ in 0..flips {
                let at = rng.below(bytes.len() as u64) as usize;
                bytes[at] ^= (1 + rng.below(255)) as u8;
            }
            format!("trial {trial} ({} bytes): {name} with {flips} flipped bytes", bytes.len())
        };
        std::fs::write(file, &bytes).unwrap();
        let (report, last) = check_after_damage(dir.path(), last, &what);
        let outcome = match &report {
            OpenReport { quarantined: Some(_), .. } => "quarantined",
            OpenReport { rolled_back: true, .. } => "rolled back",
            OpenReport { corrupt_records: 0, .. } => "intact",
            _ => "corrupt records removed",
        };
        eprintln!("{what}: {outcome}");
        // And once more: whatever is there now opens as it is.
        let (again, _) = check_after_damage(dir.path(), last, &what);
        assert_eq!((again.quarantined, again.rolled_back), (None, false), "{what}: the reopened store is sound");
        outcome.to_string()
    }

    #[test]
    fn spool_damaged_files_never_panic_nor_reuse_seqs() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
        // Small stores (one log segment), and a few larger ones (several segments: there sled
        // also panics on some damage, which open must survive).
        for (trial, rounds) in (0..24).map(|t| (t, 6)).chain((24..30).map(|t| (t, 100))) {
            *outcomes.entry(damage_trial(&mut rng, trial, rounds)).or_default() += 1;
        }
        eprintln!("outcomes: {outcomes:?}");
    }

    #[test]
    fn spool_damaged_conf_file_is_set_aside_not_the_records() {
        let dir = TempDir::new("conf");
        let last = fill(dir.path(), 3);
        let conf = dir.path().join(SPOOL_DIR).join("conf");
        let mut bytes = std::fs::read(&conf).unwrap();
        for b in bytes.iter_mut().take(12) {
            *b ^= 0x5a;
        }
        std::fs::write(&conf, &bytes).unwrap();
        let (spool, report) = open(dir.path());
        assert_eq!((report.quarantined, report.corrupt_records, report.rolled_back), (None, 0, false));
        assert!(dir.path().join(SPOOL_DIR).join("conf.damaged").is_file());
        assert_eq!(all_pending(&spool, StreamClass::Metrics).len(), 60);
        assert_eq!(spool.append(StreamClass::Metrics, logs(0, 1, 10), None).unwrap().first_seq, last[0] + 1);
    }

    #[test]
    fn spool_unopenable_store_is_quarantined_and_seqs_move_past_reservation() {
        let dir = TempDir::new("quarantine");
        let last = fill(dir.path(), 2);
        let sidecar: SeqFile = serde_json::from_slice(&std::fs::read(dir.path().join(SEQ_FILE)).unwrap()).unwrap();
        assert_eq!(sidecar.reserved_up_to, [20 + SEQ_BLOCK; 4], "the first append of each class reserved a block");
        assert!(last.iter().all(|l| *l == 40));
        assert_eq!(sidecar.clean_next_seq, Some([41; 4]), "a clean close records the exact next seqs");

        // Every file of the store overwritten with garbage: sled either refuses the store or
        // (it does, once the garbage conf is set aside) opens it silently empty.
        for file in sled_files(dir.path()) {
            std::fs::write(&file, vec![0xA5u8; 4096]).unwrap();
        }
        let (spool, report) = open(dir.path());
        assert!(report.quarantined.is_some() || report.rolled_back, "{report:?}");
        for (i, class) in CLASSES.iter().enumerate() {
            assert_eq!(spool.append(*class, logs(0, 1, 10), None).unwrap().first_seq, sidecar.reserved_up_to[i] + 1);
        }
        drop(spool);

        // A store sled cannot open at all (here: not even a directory) is moved aside.
        let sidecar: SeqFile = serde_json::from_slice(&std::fs::read(dir.path().join(SEQ_FILE)).unwrap()).unwrap();
        std::fs::remove_dir_all(dir.path().join(SPOOL_DIR)).unwrap();
        std::fs::write(dir.path().join(SPOOL_DIR), b"not a store").unwrap();
        let (spool, report) = open(dir.path());
        let quarantined = report.quarantined.expect("store is quarantined");
        assert!(quarantined.file_name().unwrap().to_string_lossy().starts_with("spool.corrupt-"));
        assert_eq!(std::fs::read(&quarantined).unwrap(), b"not a store");
        for (i, class) in CLASSES.iter().enumerate() {
            // The fresh store would start at 1; the reservation moves it past every seq used.
            let out = spool.append(*class, logs(0, 1, 10), None).unwrap();
            assert_eq!(out.first_seq, sidecar.reserved_up_to[i] + 1);
        }
        assert_eq!(spool.checkpoint("k").unwrap(), None, "checkpoints went with the quarantined store");
    }

    #[test]
    fn spool_second_open_is_refused_not_quarantined() {
        fn send_sync<T: Send + Sync + Clone>() {}
        send_sync::<Spool>();
        let dir = TempDir::new("locked");
        let (spool, _) = open(dir.path());
        spool.append(StreamClass::Logs, logs(0, 3, 10), None).unwrap();
        assert!(matches!(Spool::open(dir.path(), SpoolConfig::default()), Err(Error::Locked(_))));
        assert_eq!(all_pending(&spool, StreamClass::Logs).len(), 3);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "only spool/ and spool-seq.json");

        // sled reads `conf` before taking its lock: a damaged conf of a store in use must not
        // get the live store quarantined.
        let conf = dir.path().join(SPOOL_DIR).join("conf");
        let mut bytes = std::fs::read(&conf).unwrap();
        bytes[0] ^= 0xff;
        bytes[9] ^= 0xff;
        std::fs::write(&conf, &bytes).unwrap();
        assert!(matches!(Spool::open(dir.path(), SpoolConfig::default()), Err(Error::Locked(_))));
        assert_eq!(std::fs::read(&conf).unwrap(), bytes, "conf put back as it was");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "nothing quarantined");
        spool.append(StreamClass::Logs, logs(3, 1, 10), None).unwrap();
        assert_eq!(all_pending(&spool, StreamClass::Logs).len(), 4);
    }

    #[test]
    fn spool_ack_beyond_next_seq_moves_the_stream_past_it() {
        let dir = TempDir::new("ackjump");
        let (spool, _) = open(dir.path());
        spool.append(StreamClass::Metrics, logs(0, 3, 10), None).unwrap();
        spool.ack(StreamClass::Metrics, 5_000).unwrap();
        let stats = spool.stats(StreamClass::Metrics);
        assert_eq!((stats.records, stats.next_seq, stats.acked_up_to), (0, 5_001, 5_000));
        assert_eq!(spool.append(StreamClass::Metrics, logs(0, 1, 10), None).unwrap().first_seq, 5_001);
        spool.ack(StreamClass::Metrics, 2 * SEQ_BLOCK).unwrap();
        drop(spool);
        let (spool, _) = open(dir.path());
        assert_eq!(spool.append(StreamClass::Metrics, logs(0, 1, 10), None).unwrap().first_seq, 2 * SEQ_BLOCK + 1);
    }

    #[test]
    fn spool_concurrent_appends_get_disjoint_seqs() {
        let dir = TempDir::new("concurrent");
        let (spool, _) = open(dir.path());
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let spool = spool.clone();
                std::thread::spawn(move || {
                    let mut seqs = Vec::new();
                    for round in 0..50 {
                        let out = spool.append(StreamClass::Logs, logs(t * 1000 + round * 5, 5, 40), None).unwrap();
                        seqs.extend(out.first_seq..=out.last_seq);
                    }
                    seqs
                })
            })
            .collect();
        let results: Vec<Vec<u64>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let a: BTreeSet<u64> = results[0].iter().copied().collect();
        let b: BTreeSet<u64> = results[1].iter().copied().collect();
        assert_eq!(a.len(), 250);
        assert_eq!(b.len(), 250);
        assert!(a.is_disjoint(&b));
        let all: Vec<u64> = a.union(&b).copied().collect();
        assert_eq!(all, (1..=500).collect::<Vec<_>>());
        let pending = all_pending(&spool, StreamClass::Logs);
        assert_eq!(pending.iter().map(|r| r.seq).collect::<Vec<_>>(), all);
    }
}
