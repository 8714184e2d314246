//! Container logs: stdout and stderr of Docker containers, followed through the Engine
//! API's logs call (bollard, `follow` and `timestamps` on), exactly once across agent
//! restarts, container restarts and Docker restarts.
//!
//! One reader task per followed container puts lines into a bounded channel (so a slow
//! spool slows the readers, never memory). The caller drives the rest: [`ContainerLogs::discover`]
//! lists containers and starts readers for new ones, [`ContainerLogs::drain`] takes the lines
//! read so far together with the checkpoint that covers exactly them. This module must not
//! spool or send anything: the caller commits lines and checkpoint together, and a
//! restarted agent passes the last committed checkpoint to [`ContainerLogs::new`]. It
//! never runs the docker CLI.
//!
//! Positions. Docker stamps every log message with a nanosecond time, but the logs call's
//! `since` takes whole seconds (and includes its bound). So the checkpoint keeps, per
//! container, a second `since` and how many lines delivered so far carry a time at or
//! after it, per second. A resumed reader asks for `since` and skips that many lines of
//! what Docker returns (in Docker's own order, which is the log file's order and does not
//! change between reads), so it goes on exactly after the last delivered line even when
//! many lines share a timestamp or stdout and stderr interleave out of time order. `since`
//! trails the newest delivered second by [`MARGIN_SECS`] so the counts stay small.
//!
//! Which lines: a container not in the checkpoint is read from the collector's origin, the
//! time it first ran on this machine (kept in the checkpoint). So containers running when
//! the agent is first installed are read from then on, not from their start; every
//! container created later is read in full. Running (and paused and restarting) containers
//! are followed; a stopped container is read to its end once when it stopped after the
//! origin (a container that lived between two discoveries is not missed). After a
//! container restart the next discovery follows it again from its position.
//!
//! Each line keeps Docker's time (as Unix ms), source `container:<name>`, its stream, and
//! the container id. Lines longer than `max_line_bytes` are split into several lines;
//! a trailing `\r` is stripped and invalid UTF-8 replaced. TTY containers have one stream,
//! reported as stdout.
//!
//! Limits: only log drivers Docker can read back (json-file, local, journald) work; with
//! others the error is reported and the container retried every [`RETRY_AFTER_MS`]. Lines
//! Docker already rotated away (json-file `max-file`) while the agent was down are lost, and
//! if rotation removed lines at or after a container's `since` the resumed reader skips a
//! few lines too many. A TTY container's output is split at newlines, so its last line,
//! without one, is delivered when the container stops and a later continuation of that
//! same line is lost. A host clock stepped back by more than [`MARGIN_SECS`] can lose
//! lines written between the step and an agent restart.

use bollard::container::LogOutput;
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions, LogsOptions};
use bollard::Docker;
use futures_util::StreamExt;
use gantry_shared::telemetry::{LogLine, LogStream};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, warn};

use super::docker::{container_name, is_live, short_id, Error};

/// Default for [`ContainerLogsConfig::max_line_bytes`].
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 * 1024;
/// How far `since` trails the newest delivered second.
pub const MARGIN_SECS: i64 = 1;
/// How long a container whose logs Docker refused to give is left alone, in milliseconds.
pub const RETRY_AFTER_MS: i64 = 30_000;
/// Version of the checkpoint document.
const CHECKPOINT_VERSION: u32 = 1;

/// Which container logs to collect, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainerLogsConfig {
    /// Collect container logs at all.
    pub enabled: bool,
    /// Read only these containers (names, or full or 12-character ids), plus those
    /// matching `labels`. Both empty: every container.
    pub containers: Vec<String>,
    /// Read containers with one of these labels: `key` (any value) or `key=value`.
    pub labels: Vec<String>,
    /// Never read these containers (names or ids), even when selected otherwise.
    pub exclude: Vec<String>,
    /// Longest line delivered, in bytes; longer lines are split into several lines.
    pub max_line_bytes: usize,
    /// How often lines read are handed to the spool, in milliseconds.
    pub poll_ms: u64,
    /// How often the container list is checked for containers to follow, in milliseconds.
    pub discover_ms: u64,
    /// Lines read ahead of the spool, at most (all containers together).
    pub buffer_lines: usize,
}

impl Default for ContainerLogsConfig {
    fn default() -> Self {
        ContainerLogsConfig {
            enabled: true,
            containers: Vec::new(),
            labels: Vec::new(),
            exclude: Vec::new(),
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            poll_ms: 500,
            discover_ms: 5_000,
            buffer_lines: 10_000,
        }
    }
}

impl ContainerLogsConfig {
    /// What is wrong with this configuration; empty when it is usable.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.max_line_bytes == 0 {
            errors.push("max_line_bytes must be at least 1".to_string());
        }
        if self.poll_ms == 0 || self.discover_ms == 0 {
            errors.push("poll_ms and discover_ms must be at least 1".to_string());
        }
        if self.buffer_lines == 0 {
            errors.push("buffer_lines must be at least 1".to_string());
        }
        if self.labels.iter().any(|l| l.is_empty() || l.starts_with('=')) {
            errors.push("labels must be `key` or `key=value`".to_string());
        }
        errors
    }

    /// Whether a container with this id, name and labels is to be read.
    pub fn selects(&self, id: &str, name: &str, labels: &HashMap<String, String>) -> bool {
        let named = |list: &[String]| list.iter().any(|n| n == name || n == id || (n.len() >= 12 && id.starts_with(n.as_str())));
        if named(&self.exclude) {
            return false;
        }
        if self.containers.is_empty() && self.labels.is_empty() {
            return true;
        }
        named(&self.containers)
            || self.labels.iter().any(|selector| match selector.split_once('=') {
                Some((key, value)) => labels.get(key).is_some_and(|v| v == value),
                None => labels.contains_key(selector),
            })
    }
}

/// Where a container's log was read up to (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    /// Docker `since` for a resumed reader, Unix seconds.
    since: i64,
    /// Lines delivered, per second, for every second at or after `since`.
    counts: BTreeMap<i64, u64>,
}

impl Position {
    fn new(since: i64) -> Position {
        Position { since, counts: BTreeMap::new() }
    }

    /// Lines of a read from `since` that were delivered already.
    fn skip(&self) -> u64 {
        self.counts.values().sum()
    }

    /// One more line delivered, stamped `ts_ns`.
    fn record(&mut self, ts_ns: i64) {
        let second = ts_ns.div_euclid(1_000_000_000);
        if second < self.since {
            // A read from `since` does not return it, so it needs no count.
            return;
        }
        *self.counts.entry(second).or_default() += 1;
        let floor = second - MARGIN_SECS;
        if floor > self.since {
            self.since = floor;
            self.counts = self.counts.split_off(&floor);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CheckpointDoc {
    version: u32,
    /// When the collector first ran here, Unix seconds: containers without a position are
    /// read from then.
    origin: i64,
    /// By container id.
    containers: BTreeMap<String, Position>,
}

/// What a reader task reports.
#[derive(Debug)]
enum Message {
    /// One log message (several lines if it was longer than `max_line_bytes`).
    Line { id: Arc<str>, name: Arc<str>, ts_ns: i64, stream: LogStream, lines: Vec<String> },
    /// The reader stopped; every line it read was sent before this.
    Ended { id: Arc<str>, error: Option<String>, retry_later: bool },
}

/// What one drain found.
#[derive(Debug, Clone, PartialEq)]
pub struct Drained {
    /// Lines with Docker's time (Unix ms). Lines of one container are in its log's order.
    pub lines: Vec<(i64, LogLine)>,
    /// Covers exactly `lines`: commit it together with them, before the next drain.
    pub checkpoint: Vec<u8>,
    /// Per-container problems; rate limiting is the caller's job.
    pub errors: Vec<String>,
}

/// Follows the logs of the selected containers.
#[derive(Debug)]
pub struct ContainerLogs {
    config: ContainerLogsConfig,
    origin: i64,
    /// Delivered positions, by container id; always what the last drain's checkpoint says.
    positions: BTreeMap<String, Position>,
    /// Containers with a reader whose end was not drained yet.
    readers: HashMap<String, AbortHandle>,
    tasks: JoinSet<()>,
    /// Task ids of the readers, to notice one that panicked.
    task_ids: HashMap<tokio::task::Id, String>,
    /// Stopped containers read to their end, with the stop time they were read for.
    settled: HashMap<String, String>,
    /// Containers left alone until then (Unix ms), after Docker refused their logs.
    retry_at: HashMap<String, i64>,
    /// Containers to put into `retry_at` at the next discovery.
    retry_later: HashSet<String>,
    tx: mpsc::Sender<Message>,
    rx: mpsc::Receiver<Message>,
}

impl ContainerLogs {
    /// A collector resuming from `checkpoint` (bytes of an earlier [`Drained::checkpoint`]),
    /// or starting at `now_unix_ms` without one. An unreadable checkpoint is logged and
    /// ignored. Only an invalid `config` fails. Starts nothing before [`Self::discover`].
    pub fn new(config: ContainerLogsConfig, checkpoint: Option<&[u8]>, now_unix_ms: i64) -> Result<ContainerLogs, Error> {
        let errors = config.validate();
        if !errors.is_empty() {
            return Err(Error::Config(errors.join("; ")));
        }
        let mut origin = now_unix_ms.div_euclid(1_000);
        let mut positions = BTreeMap::new();
        if let Some(bytes) = checkpoint.filter(|b| !b.is_empty()) {
            match serde_json::from_slice::<CheckpointDoc>(bytes) {
                Ok(doc) if doc.version == CHECKPOINT_VERSION => {
                    origin = doc.origin;
                    positions = doc.containers;
                }
                Ok(doc) => warn!(version = doc.version, "container log checkpoint has an unknown version; reading from now"),
                Err(error) => warn!(%error, "container log checkpoint is unreadable; reading from now"),
            }
        }
        let (tx, rx) = mpsc::channel(config.buffer_lines);
        Ok(ContainerLogs {
            config,
            origin,
            positions,
            readers: HashMap::new(),
            tasks: JoinSet::new(),
            task_ids: HashMap::new(),
            settled: HashMap::new(),
            retry_at: HashMap::new(),
            retry_later: HashSet::new(),
            tx,
            rx,
        })
    }

    /// List the containers and start following every selected one not followed yet:
    /// running ones, and stopped ones that may hold unread lines. Forgets the positions
    /// of containers that no longer exist. Fails only when the list cannot be read
    /// (Docker unreachable); returns per-container problems.
    pub async fn discover(&mut self, docker: &Docker, now_unix_ms: i64) -> Result<Vec<String>, Error> {
        self.reap();
        for id in self.retry_later.drain() {
            self.retry_at.insert(id, now_unix_ms + RETRY_AFTER_MS);
        }
        self.retry_at.retain(|_, at| *at > now_unix_ms);
        let summaries = docker.list_containers(Some(ListContainersOptions { all: true, ..Default::default() })).await?;
        let existing: HashSet<&str> = summaries.iter().filter_map(|s| s.id.as_deref()).collect();
        self.positions.retain(|id, _| existing.contains(id.as_str()));
        self.settled.retain(|id, _| existing.contains(id.as_str()));
        let mut errors = Vec::new();
        for summary in &summaries {
            let Some(id) = summary.id.as_deref() else { continue };
            let name = container_name(summary).unwrap_or_else(|| short_id(id).to_string());
            let labels = summary.labels.clone().unwrap_or_default();
            if self.readers.contains_key(id) || self.retry_at.contains_key(id) || !self.config.selects(id, &name, &labels) {
                continue;
            }
            if is_live(summary.state) {
                self.settled.remove(id);
                self.follow(docker, id, &name);
                continue;
            }
            use bollard::models::ContainerSummaryStateEnum as State;
            if !matches!(summary.state, Some(State::EXITED | State::DEAD)) {
                continue;
            }
            // Stopped: read it to its end once per stop, if it ran after the origin.
            let finished = match docker.inspect_container(id, None::<InspectContainerOptions>).await {
                Ok(inspect) => inspect.state.and_then(|s| s.finished_at).unwrap_or_default(),
                Err(error) if super::docker::is_gone(&error) => continue,
                Err(error) => {
                    errors.push(format!("inspecting container {name}: {error}"));
                    continue;
                }
            };
            if self.settled.get(id) == Some(&finished) {
                continue;
            }
            let ran_after_origin = parse_time(&finished).is_none_or(|ns| ns.div_euclid(1_000_000_000) >= self.origin);
            if self.positions.contains_key(id) || ran_after_origin {
                self.follow(docker, id, &name);
            }
            self.settled.insert(id.to_string(), finished);
        }
        Ok(errors)
    }

    /// Start a reader for container `id` from its delivered position.
    fn follow(&mut self, docker: &Docker, id: &str, name: &str) {
        let position = self.positions.get(id).cloned().unwrap_or_else(|| Position::new(self.origin));
        debug!(container = name, since = position.since, skip = position.skip(), "following container logs");
        let reader = Reader {
            docker: docker.clone(),
            id: Arc::from(id),
            name: Arc::from(name),
            since: position.since,
            skip: position.skip(),
            max_line: self.config.max_line_bytes,
            tx: self.tx.clone(),
        };
        let handle = self.tasks.spawn(reader.run());
        self.task_ids.insert(handle.id(), id.to_string());
        self.readers.insert(id.to_string(), handle);
    }

    /// Forget readers that panicked (those that ended normally are forgotten when their
    /// end is drained, after their last line).
    fn reap(&mut self) {
        while let Some(result) = self.tasks.try_join_next_with_id() {
            match result {
                Ok((task, ())) => {
                    self.task_ids.remove(&task);
                }
                Err(error) => {
                    if let Some(id) = self.task_ids.remove(&error.id()) {
                        warn!(container = %short_id(&id), %error, "container log reader failed");
                        self.readers.remove(&id);
                    }
                }
            }
        }
    }

    /// Take up to about `max_lines` lines read so far (a long line split in pieces is
    /// never cut between drains) and the checkpoint covering them.
    pub fn drain(&mut self, max_lines: usize) -> Result<Drained, Error> {
        let mut lines = Vec::new();
        let mut errors = Vec::new();
        while lines.len() < max_lines {
            let Ok(message) = self.rx.try_recv() else { break };
            match message {
                Message::Line { id, name, ts_ns, stream, lines: pieces } => {
                    let origin = self.origin;
                    self.positions.entry(id.to_string()).or_insert_with(|| Position::new(origin)).record(ts_ns);
                    let ts_ms = ts_ns.div_euclid(1_000_000);
                    for line in pieces {
                        let source = format!("container:{name}");
                        lines.push((ts_ms, LogLine { source, stream, container: Some(id.to_string()), line }));
                    }
                }
                Message::Ended { id, error, retry_later } => {
                    self.readers.remove(&*id);
                    if let Some(error) = error {
                        errors.push(format!("logs of container {}: {error}", short_id(&id)));
                    }
                    if retry_later {
                        self.retry_later.insert(id.to_string());
                    }
                }
            }
        }
        Ok(Drained { lines, checkpoint: self.checkpoint()?, errors })
    }

    /// The checkpoint of the delivered position (what the last drain returned).
    pub fn checkpoint(&self) -> Result<Vec<u8>, Error> {
        let doc = CheckpointDoc { version: CHECKPOINT_VERSION, origin: self.origin, containers: self.positions.clone() };
        Ok(serde_json::to_vec(&doc)?)
    }

    /// Ids of the containers being followed now.
    pub fn following(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.readers.keys().cloned().collect();
        ids.sort();
        ids
    }
}

/// One container's log stream, read into the channel.
struct Reader {
    docker: Docker,
    id: Arc<str>,
    name: Arc<str>,
    since: i64,
    skip: u64,
    max_line: usize,
    tx: mpsc::Sender<Message>,
}

impl Reader {
    async fn run(mut self) {
        let options = LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            // `since` 0 would mean "everything" anyway; Docker takes 32-bit seconds here.
            since: i32::try_from(self.since).unwrap_or(if self.since < 0 { 0 } else { i32::MAX }),
            until: 0,
            timestamps: true,
            tail: "all".to_string(),
        };
        let mut stream = std::pin::pin!(self.docker.logs(&self.id, Some(options)));
        let since_ns = self.since.saturating_mul(1_000_000_000);
        let mut last_ts = since_ns;
        // TTY output not yet ending in a newline.
        let mut console: Vec<u8> = Vec::new();
        let (error, retry_later) = loop {
            let Some(item) = stream.next().await else {
                // The container stopped (or went away): what is left is its last line.
                if !console.is_empty() {
                    let rest = std::mem::take(&mut console);
                    if !self.emit(LogStream::Stdout, &rest, &mut last_ts, since_ns).await {
                        return;
                    }
                }
                break (None, false);
            };
            let ok = match item {
                Ok(LogOutput::StdOut { message }) => self.emit(LogStream::Stdout, &message, &mut last_ts, since_ns).await,
                Ok(LogOutput::StdErr { message }) => self.emit(LogStream::Stderr, &message, &mut last_ts, since_ns).await,
                Ok(LogOutput::StdIn { .. }) => true,
                Ok(LogOutput::Console { message }) => {
                    console.extend_from_slice(&message);
                    let mut ok = true;
                    while let Some(end) = console.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = console.drain(..=end).collect();
                        if !self.emit(LogStream::Stdout, &line, &mut last_ts, since_ns).await {
                            ok = false;
                            break;
                        }
                    }
                    ok
                }
                Err(error) => {
                    // Docker answered but refused (e.g. a log driver it cannot read back):
                    // wait before asking again. Connection trouble: retry at once.
                    let refused = matches!(error, bollard::errors::Error::DockerResponseServerError { .. });
                    let gone = super::docker::is_gone(&error);
                    break ((!gone).then(|| error.to_string()), refused && !gone);
                }
            };
            if !ok {
                return;
            }
        };
        let _ = self.tx.send(Message::Ended { id: self.id.clone(), error, retry_later }).await;
    }

    /// Send one log message unless it is before `since` or among the lines to skip.
    /// False when the collector is gone.
    async fn emit(&mut self, stream: LogStream, raw: &[u8], last_ts: &mut i64, since_ns: i64) -> bool {
        let (ts, text) = split_timestamp(raw);
        let ts_ns = ts.unwrap_or(*last_ts);
        *last_ts = ts_ns;
        if ts_ns.div_euclid(1_000_000_000) < since_ns.div_euclid(1_000_000_000) {
            return true;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return true;
        }
        let lines = split_message(text, self.max_line);
        let message = Message::Line { id: self.id.clone(), name: self.name.clone(), ts_ns, stream, lines };
        self.tx.send(message).await.is_ok()
    }
}

/// Parse an RFC 3339 time to Unix nanoseconds.
fn parse_time(text: &str) -> Option<i64> {
    let time = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(time.unix_timestamp_nanos()).ok()
}

/// Docker's `timestamps` prefix (`2024-05-01T10:00:00.123456789Z `) and the rest.
fn split_timestamp(raw: &[u8]) -> (Option<i64>, &[u8]) {
    let Some(space) = raw.iter().take(40).position(|b| *b == b' ') else { return (None, raw) };
    match std::str::from_utf8(&raw[..space]).ok().and_then(parse_time) {
        Some(ts) => (Some(ts), &raw[space + 1..]),
        None => (None, raw),
    }
}

/// The lines of one log message: without its newline and a trailing `\r`, split at inner
/// newlines and into pieces of at most `max_line` bytes (at a character boundary where
/// possible), invalid UTF-8 replaced.
fn split_message(text: &[u8], max_line: usize) -> Vec<String> {
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    let mut out = Vec::new();
    for line in text.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut rest = line;
        loop {
            if rest.len() <= max_line {
                out.push(String::from_utf8_lossy(rest).into_owned());
                break;
            }
            let mut cut = max_line;
            // Back up to a UTF-8 character start (at most 3 bytes).
            while cut > 0 && cut > max_line.saturating_sub(3) && (rest[cut] & 0xC0) == 0x80 {
                cut -= 1;
            }
            if cut == 0 || (rest[cut] & 0xC0) == 0x80 {
                cut = max_line;
            }
            out.push(String::from_utf8_lossy(&rest[..cut]).into_owned());
            rest = &rest[cut..];
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::docker::testing::*;
    use super::*;
    use std::time::{Duration, Instant};

    fn config() -> ContainerLogsConfig {
        ContainerLogsConfig::default()
    }

    #[test]
    fn timestamps_and_messages_are_parsed() {
        let (ts, rest) = split_timestamp(b"2026-11-22T00:31:07.044206265Z out0\n");
        assert_eq!(ts, Some(1_795_307_467_044_206_265));
        assert_eq!(rest, b"out0\n");
        let (ts, rest) = split_timestamp(b"2026-11-22T00:31:07.5Z x");
        assert_eq!(ts, Some(1_795_307_467_500_000_000));
        assert_eq!(rest, b"x");
        assert_eq!(split_timestamp(b"no timestamp here"), (None, &b"no timestamp here"[..]));
        assert_eq!(split_message(b"hello\r\n", 100), ["hello"]);
        assert_eq!(split_message(b"\n", 100), [""]);
        assert_eq!(split_message(b"a\nb\n", 100), ["a", "b"]);
        assert_eq!(split_message(b"abcdefg", 3), ["abc", "def", "g"]);
        assert_eq!(split_message("ééé".as_bytes(), 3), ["é", "é", "é"]);
        assert_eq!(split_message(b"\xffok", 100), ["\u{fffd}ok"]);
    }

    #[test]
    fn positions_count_lines_at_or_after_since() {
        let mut position = Position::new(100);
        position.record(99_500_000_000); // before since: never replayed
        position.record(100_000_000_001);
        position.record(100_000_000_001);
        assert_eq!((position.since, position.skip()), (100, 2));
        position.record(101_000_000_000);
        assert_eq!((position.since, position.skip()), (100, 3));
        position.record(103_200_000_000);
        // since trails by MARGIN_SECS: 102; only the line of second 103 counts.
        assert_eq!((position.since, position.skip()), (102, 1));
        position.record(102_900_000_000); // out of order, still >= since
        assert_eq!((position.since, position.skip()), (102, 2));
    }

    #[test]
    fn the_selection_and_configuration_are_checked() {
        let labels = HashMap::from([("app".to_string(), "web".to_string())]);
        let id = "0123456789abcdef0123";
        assert!(config().selects(id, "web-1", &labels));
        let by_name = ContainerLogsConfig { containers: vec!["web-1".into()], ..config() };
        assert!(by_name.selects(id, "web-1", &labels));
        assert!(!by_name.selects(id, "db", &HashMap::new()));
        let by_id = ContainerLogsConfig { containers: vec!["0123456789ab".into()], ..config() };
        assert!(by_id.selects(id, "x", &HashMap::new()));
        let by_label = ContainerLogsConfig { labels: vec!["app=web".into()], ..config() };
        assert!(by_label.selects(id, "x", &labels));
        assert!(!by_label.selects(id, "x", &HashMap::from([("app".to_string(), "db".to_string())])));
        let by_key = ContainerLogsConfig { labels: vec!["app".into()], ..config() };
        assert!(by_key.selects(id, "x", &labels));
        let excluded = ContainerLogsConfig { exclude: vec!["web-1".into()], ..config() };
        assert!(!excluded.selects(id, "web-1", &labels));
        let bad = ContainerLogsConfig { max_line_bytes: 0, poll_ms: 0, buffer_lines: 0, labels: vec!["=x".into()], ..config() };
        assert_eq!(bad.validate().len(), 4);
        assert!(matches!(ContainerLogs::new(bad, None, 0), Err(Error::Config(_))));
        let logs = ContainerLogs::new(config(), Some(b"garbage"), 5_000).unwrap();
        assert_eq!(logs.origin, 5);
    }

    /// Lines by container id, as (stream, text) in order.
    type Seen = HashMap<String, Vec<(LogStream, String)>>;

    fn lines_of<'a>(seen: &'a Seen, id: &str) -> &'a [(LogStream, String)] {
        seen.get(id).map(Vec::as_slice).unwrap_or_default()
    }

    /// Discover and drain until `done` holds or `limit` passes. Returns the last
    /// checkpoint.
    async fn collect(logs: &mut ContainerLogs, docker: &Docker, seen: &mut Seen, max_lines: usize, limit: Duration, done: impl Fn(&Seen) -> bool) -> Vec<u8> {
        let deadline = Instant::now() + limit;
        let mut checkpoint = logs.checkpoint().unwrap();
        let mut last_discover = Instant::now() - Duration::from_secs(10);
        while !done(seen) && Instant::now() < deadline {
            if last_discover.elapsed() >= Duration::from_millis(300) {
                let errors = logs.discover(docker, crate::wall_ms()).await.unwrap();
                assert!(errors.is_empty(), "{errors:?}");
                last_discover = Instant::now();
            }
            let drained = logs.drain(max_lines).unwrap();
            for (ts, line) in &drained.lines {
                assert!((ts - crate::wall_ms()).abs() < 120_000, "timestamp {ts} far from now");
                let id = line.container.clone().unwrap();
                if line.source.starts_with("container:gantry-test-") {
                    seen.entry(id).or_default().push((line.stream, line.line.clone()));
                }
            }
            checkpoint = drained.checkpoint;
            if drained.lines.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        checkpoint
    }

    /// What Docker itself has for the container: (stdout lines, stderr lines).
    fn docker_truth(name: &str) -> (Vec<String>, Vec<String>) {
        let output = std::process::Command::new("docker").args(["logs", name]).output().unwrap();
        assert!(output.status.success());
        let lines = |bytes: &[u8]| String::from_utf8_lossy(bytes).lines().map(|l| l.trim_end_matches('\r').to_string()).collect();
        (lines(&output.stdout), lines(&output.stderr))
    }

    fn of(seen: &Seen, id: &str, stream: LogStream) -> Vec<String> {
        lines_of(seen, id).iter().filter(|(s, _)| *s == stream).map(|(_, l)| l.clone()).collect()
    }

    /// Panics with the differences when `seen` is not `truth`.
    fn assert_same(what: &str, seen: &[String], truth: &[String]) {
        if seen == truth {
            return;
        }
        let missing: Vec<&String> = truth.iter().filter(|l| !seen.contains(l)).collect();
        let mut counts: HashMap<&String, usize> = HashMap::new();
        seen.iter().for_each(|l| *counts.entry(l).or_default() += 1);
        let doubled: Vec<&&String> = counts.iter().filter(|(_, n)| **n > 1).map(|(l, _)| l).collect();
        panic!("{what}: {} seen, {} in docker; missing {missing:?}; duplicated {doubled:?}", seen.len(), truth.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn container_lines_arrive_exactly_once_across_a_collector_restart() {
        let Some(docker) = docker().await else { return };
        let name = unique("logs");
        let mut logs = ContainerLogs::new(config(), None, crate::wall_ms() - 1_000).unwrap();
        // 600 numbered lines on each stream, in bursts (many share a millisecond).
        let script = "i=0; while [ $i -lt 600 ]; do echo \"out $i\"; echo \"err $i\" >&2; i=$((i+1)); \
                      [ $((i % 60)) -eq 0 ] && sleep 0.25; done; sleep 600";
        let container = Container::run(&name, script, &[]);
        let id = container.id.clone();
        let mut seen = Seen::new();
        // Take some, in small drains, then "crash": lines read but not drained are lost
        // with the collector and must come again.
        let checkpoint = collect(&mut logs, &docker, &mut seen, 37, Duration::from_secs(20), |s| lines_of(s, &id).len() >= 300).await;
        assert!(lines_of(&seen, &id).len() >= 300, "only {} lines", lines_of(&seen, &id).len());
        assert!(logs.following().contains(&id));
        drop(logs);
        let mut resumed = ContainerLogs::new(config(), Some(&checkpoint), crate::wall_ms()).unwrap();
        collect(&mut resumed, &docker, &mut seen, 5_000, Duration::from_secs(30), |s| lines_of(s, &id).len() >= 1_200).await;
        let expected = |prefix: &str| (0..600).map(|i| format!("{prefix} {i}")).collect::<Vec<_>>();
        assert_same("stdout", &of(&seen, &id, LogStream::Stdout), &expected("out"));
        assert_same("stderr", &of(&seen, &id, LogStream::Stderr), &expected("err"));
        // Nothing more comes.
        collect(&mut resumed, &docker, &mut seen, 5_000, Duration::from_millis(800), |_| false).await;
        assert_eq!(lines_of(&seen, &id).len(), 1_200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn container_restarts_and_collector_restarts_leave_no_gaps_or_duplicates() {
        let Some(docker) = docker().await else { return };
        let name = unique("restart");
        let mut logs = ContainerLogs::new(config(), None, crate::wall_ms() - 1_000).unwrap();
        // Each run numbers its lines; the run counter lives in the container's filesystem.
        let script = "r=$(cat /run-count 2>/dev/null || echo 0); r=$((r+1)); echo $r > /run-count; i=0; \
                      while true; do echo \"run $r out $i\"; echo \"run $r err $i\" >&2; i=$((i+1)); sleep 0.01; done";
        let container = Container::run(&name, script, &[]);
        let id = container.id.clone();
        let mut seen = Seen::new();
        let has = |run: u32| {
            let id = id.clone();
            move |s: &Seen| lines_of(s, &id).iter().any(|(_, l)| l.starts_with(&format!("run {run} ")))
        };
        collect(&mut logs, &docker, &mut seen, 5_000, Duration::from_secs(20), has(1)).await;
        cli(&["restart", "-t", "0", &name]);
        let checkpoint = collect(&mut logs, &docker, &mut seen, 50, Duration::from_secs(20), has(2)).await;
        // Collector restart right after the container restart.
        drop(logs);
        let mut logs = ContainerLogs::new(config(), Some(&checkpoint), crate::wall_ms()).unwrap();
        collect(&mut logs, &docker, &mut seen, 5_000, Duration::from_millis(700), |_| false).await;
        // A container restart while the collector is down.
        let checkpoint = collect(&mut logs, &docker, &mut seen, 5_000, Duration::ZERO, |_| false).await;
        drop(logs);
        cli(&["restart", "-t", "0", &name]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut logs = ContainerLogs::new(config(), Some(&checkpoint), crate::wall_ms()).unwrap();
        collect(&mut logs, &docker, &mut seen, 5_000, Duration::from_secs(20), has(3)).await;
        cli(&["stop", "-t", "0", &name]);
        // The stopped container is read to its end.
        let (stdout, stderr) = docker_truth(&name);
        let total = stdout.len() + stderr.len();
        collect(&mut logs, &docker, &mut seen, 5_000, Duration::from_secs(20), |s| lines_of(s, &id).len() >= total).await;
        collect(&mut logs, &docker, &mut seen, 5_000, Duration::from_millis(1_000), |_| false).await;
        assert!(stdout.iter().any(|l| l.starts_with("run 3 ")), "three runs: {:?}", stdout.last());
        assert_same("stdout", &of(&seen, &id, LogStream::Stdout), &stdout);
        assert_same("stderr", &of(&seen, &id, LogStream::Stderr), &stderr);
        // Every run is numbered without gaps.
        for run in 1..=3 {
            let numbers: Vec<u64> = stdout.iter().filter_map(|l| l.strip_prefix(&format!("run {run} out "))).map(|n| n.parse().unwrap()).collect();
            assert!(!numbers.is_empty() && numbers.iter().enumerate().all(|(i, n)| *n == i as u64), "run {run}: {numbers:?}");
        }
        drop(container);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tty_containers_short_lived_containers_and_the_selection() {
        let Some(docker) = docker().await else { return };
        let tty = unique("tty");
        let short = unique("short");
        let other = unique("other");
        let selection = ContainerLogsConfig { containers: vec![tty.clone()], labels: vec!["gantry.test.logs=yes".into()], ..config() };
        let mut logs = ContainerLogs::new(selection, None, crate::wall_ms() - 1_000).unwrap();
        logs.discover(&docker, crate::wall_ms()).await.unwrap();
        let tty_container = Container::run(&tty, "echo one; echo two; printf 'no newline'; sleep 600", &["-t"]);
        // Lives and ends between two discoveries.
        let short_container = Container::run(&short, "echo short-lived; echo oops >&2", &["--label", "gantry.test.logs=yes"]);
        let other_container = Container::run(&other, "echo not selected; sleep 600", &[]);
        let (tty_id, short_id, other_id) = (tty_container.id.clone(), short_container.id.clone(), other_container.id.clone());
        let mut seen = Seen::new();
        collect(&mut logs, &docker, &mut seen, 5_000, Duration::from_secs(20), |s| lines_of(s, &tty_id).len() >= 2 && lines_of(s, &short_id).len() >= 2).await;
        assert_eq!(lines_of(&seen, &tty_id), [(LogStream::Stdout, "one".to_string()), (LogStream::Stdout, "two".to_string())]);
        // Docker copies stdout and stderr separately: their relative order is not fixed.
        assert_eq!(of(&seen, &short_id, LogStream::Stdout), ["short-lived"]);
        assert_eq!(of(&seen, &short_id, LogStream::Stderr), ["oops"]);
        // The unfinished line comes when the container stops.
        cli(&["stop", "-t", "0", &tty]);
        collect(&mut logs, &docker, &mut seen, 5_000, Duration::from_secs(20), |s| lines_of(s, &tty_id).len() >= 3).await;
        assert_eq!(lines_of(&seen, &tty_id).last(), Some(&(LogStream::Stdout, "no newline".to_string())));
        collect(&mut logs, &docker, &mut seen, 5_000, Duration::from_millis(1_000), |_| false).await;
        assert_eq!(lines_of(&seen, &tty_id).len(), 3);
        assert_eq!(lines_of(&seen, &short_id).len(), 2);
        assert!(lines_of(&seen, &other_id).is_empty());
        assert!(!logs.following().contains(&other_id));
        // Removed containers leave the checkpoint.
        let checkpoint: CheckpointDoc = serde_json::from_slice(&logs.checkpoint().unwrap()).unwrap();
        assert!(checkpoint.containers.contains_key(&short_id));
        drop(short_container);
        collect(&mut logs, &docker, &mut seen, 5_000, Duration::from_millis(700), |_| false).await;
        let checkpoint: CheckpointDoc = serde_json::from_slice(&logs.checkpoint().unwrap()).unwrap();
        assert!(!checkpoint.containers.contains_key(&short_id), "{checkpoint:?}");
        drop((tty_container, other_container));
    }
}
