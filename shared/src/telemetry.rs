//! Telemetry records and the messages of telemetry streams.
//!
//! Each telemetry class (metrics, logs, events, health) travels on its own QUIC stream so a
//! log flood never delays control traffic or another class. The agent opens the stream with
//! [`StreamUp::Open`], then sends [`Batch`]es of [`Record`]s in `seq` order; the hub answers
//! [`StreamDown::Ack`] once the batch and the stream's new high-water mark are durable.
//! Records carry `(agent, stream, seq)` implicitly (agent from the connection, stream from
//! the open), so resends at or below the mark are dropped exactly. Plain data; no IO.

use crate::message::{Ack, StreamClass};
use serde::{Deserialize, Serialize};

/// Which output of a source a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LogStream {
    Stdout,
    Stderr,
    /// A plain file.
    File,
}

/// One log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Where it came from: a file path, or `container:<name>`.
    pub source: String,
    pub stream: LogStream,
    /// Container id, for container logs.
    pub container: Option<String>,
    /// The line, without its newline; invalid UTF-8 is replaced.
    pub line: String,
}

/// One metric sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Metric name, e.g. `cpu.usage_percent`.
    pub name: String,
    /// Small, fixed label sets, e.g. `[("core", "0")]`.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// How serious an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Severity {
    Info,
    Warning,
    Error,
}

/// Something that happened on the machine or in the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Stable kind, e.g. `agent.started`, `docker.container.die`, `spool.dropped`.
    pub kind: String,
    pub severity: Severity,
    pub message: String,
    pub attributes: Vec<(String, String)>,
}

/// What one record holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RecordBody {
    Log(LogLine),
    Metrics(Vec<Sample>),
    Event(Event),
    /// Records `first_seq..=last_seq` of this stream were dropped on the agent (spool full);
    /// stands in their place so the loss is visible.
    Gap {
        first_seq: u64,
        last_seq: u64,
        records: u64,
        bytes: u64,
    },
    /// A health check's state change, remediation or periodic summary (health stream).
    Check(crate::checks::CheckReport),
}

/// One record of a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the stream, strictly increasing per `(agent, stream)`.
    pub seq: u64,
    /// When it happened, Unix milliseconds (the source's own timestamp where it has one).
    pub ts_unix_ms: i64,
    pub body: RecordBody,
}

/// Records of one stream, in `seq` order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub records: Vec<Record>,
}

/// What the agent sends on a telemetry stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StreamUp {
    /// First message: which class this stream carries.
    Open {
        class: StreamClass,
    },
    Batch(Batch),
}

/// What the hub sends on a telemetry stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamDown {
    /// The stream's high-water mark: the agent may delete every record up to `up_to_seq`.
    /// Also sent right after `Open`, so a restarted agent skips what the hub already has.
    Ack(Ack),
    /// The hub will not take this stream's records now (e.g. quota); the agent keeps them
    /// buffered and retries after `retry_after_ms`.
    Refused { reason: String, retry_after_ms: u64 },
}
