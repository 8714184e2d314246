//! The agent's own Prometheus metrics: its session with the hub, its spool per telemetry
//! class, and its process. Served over plain HTTP on `metrics_listen` when that is set (off
//! by default; there is no authentication, so bind it to loopback or a private address).
//!
//! The responder is deliberately small: `GET` or `HEAD` of `/metrics`, one request per
//! connection, the request head capped at [`MAX_REQUEST_BYTES`] and [`REQUEST_TIMEOUT`], at
//! most [`MAX_CONNECTIONS`] at once. It adds no dependency and next to no memory to an agent
//! whose idle footprint is a budget.

use crate::telemetry::Outbox;
use gantry_shared::message::StreamClass;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

/// Longest request head accepted.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; further connections wait for a slot.
pub const MAX_CONNECTIONS: usize = 4;

/// Counters the connection loop keeps; the spool and the process are read when scraped.
#[derive(Debug)]
pub struct AgentMetrics {
    connected: AtomicBool,
    sessions: AtomicU64,
    failures: AtomicU64,
    started_unix: u64,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let started_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        AgentMetrics { connected: AtomicBool::new(false), sessions: AtomicU64::new(0), failures: AtomicU64::new(0), started_unix }
    }
}

impl AgentMetrics {
    /// A session with the hub was established.
    pub fn session_established(&self) {
        self.connected.store(true, Ordering::Relaxed);
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// The session ended, or an attempt failed before one was established.
    pub fn session_ended(&self, established: bool) {
        self.connected.store(false, Ordering::Relaxed);
        if !established {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The exposition text (Prometheus text format 0.0.4).
    pub fn render(&self, outbox: &Outbox) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: f64| [(String::new(), v)];
        metric("gantry_agent_build_info", "gauge", "The agent's version.", &[(format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")), 1.0)]);
        metric("gantry_agent_start_time_seconds", "gauge", "When the agent started, Unix seconds.", &one(self.started_unix as f64));
        metric(
            "gantry_agent_connected",
            "gauge",
            "1 while a session with the hub is established.",
            &one(f64::from(u8::from(self.connected.load(Ordering::Relaxed)))),
        );
        metric(
            "gantry_agent_sessions_established_total",
            "counter",
            "Sessions established with the hub since the agent started.",
            &one(self.sessions.load(Ordering::Relaxed) as f64),
        );
        metric(
            "gantry_agent_connection_failures_total",
            "counter",
            "Connection attempts that ended before a session was established.",
            &one(self.failures.load(Ordering::Relaxed) as f64),
        );
        let config = outbox.spool().config();
        let stats: Vec<(String, crate::spool::StreamStats, u64)> = StreamClass::ALL
            .into_iter()
            .map(|class| (format!("{{class=\"{}\"}}", class_label(class)), outbox.spool().stats(class), config.cap(class)))
            .collect();
        let per_class = |f: &dyn Fn(&crate::spool::StreamStats, u64) -> u64| -> Vec<(String, f64)> {
            stats.iter().map(|(labels, s, cap)| (labels.clone(), f(s, *cap) as f64)).collect()
        };
        metric("gantry_agent_spool_records", "gauge", "Records spooled and not yet acknowledged by the hub.", &per_class(&|s, _| s.records));
        metric("gantry_agent_spool_bytes", "gauge", "Stored bytes of those records, as counted against the cap.", &per_class(&|s, _| s.bytes));
        metric("gantry_agent_spool_cap_bytes", "gauge", "The class's spool cap in bytes.", &per_class(&|_, cap| cap));
        metric(
            "gantry_agent_records_spooled_total",
            "counter",
            "Records written to the spool since it was created (gap markers included).",
            &per_class(&|s, _| s.next_seq.saturating_sub(1)),
        );
        metric(
            "gantry_agent_records_acknowledged_total",
            "counter",
            "Records the hub has acknowledged since the spool was created.",
            &per_class(&|s, _| s.acked_up_to),
        );
        metric(
            "gantry_agent_spool_records_dropped_total",
            "counter",
            "Records dropped because the class's spool cap was reached.",
            &per_class(&|s, _| s.dropped_records),
        );
        metric("gantry_agent_spool_records_corrupt_total", "counter", "Corrupt spool records found and skipped.", &per_class(&|s, _| s.corrupt_records));
        let process = ProcessStats::read();
        metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", &one(process.resident_bytes as f64));
        metric("process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds.", &one(process.cpu_seconds));
        metric("process_open_fds", "gauge", "Open file descriptors.", &one(process.open_fds as f64));
        out
    }
}

/// A class as a label value.
pub fn class_label(class: StreamClass) -> &'static str {
    match class {
        StreamClass::Metrics => "metrics",
        StreamClass::Logs => "logs",
        StreamClass::Events => "events",
        StreamClass::Health => "health",
    }
}

/// This process's resident memory, CPU time and open files, from `/proc/self` (zeros where
/// it is not available).
#[derive(Debug, Default)]
struct ProcessStats {
    resident_bytes: u64,
    cpu_seconds: f64,
    open_fds: u64,
}

impl ProcessStats {
    fn read() -> ProcessStats {
        let mut stats = ProcessStats::default();
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let rss_kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse::<u64>().ok());
            stats.resident_bytes = rss_kib.unwrap_or(0) * 1024;
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which may hold spaces): utime and stime are the
            // 14th and 15th fields of the line, in clock ticks (100 per second on Linux).
            if let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                stats.cpu_seconds = (ticks(11) + ticks(12)) as f64 / 100.0;
            }
        }
        stats.open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
        stats
    }
}

/// The metrics listener; stops serving when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Bind `addr` and serve scrapes there until the returned server is dropped.
pub async fn start(addr: std::net::SocketAddr, metrics: Arc<AgentMetrics>, outbox: Outbox) -> std::io::Result<MetricsServer> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    Ok(MetricsServer { addr, task: tokio::spawn(serve(listener, metrics, outbox)) })
}

async fn serve(listener: TcpListener, metrics: Arc<AgentMetrics>, outbox: Outbox) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "metrics listener could not accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, outbox) = (metrics.clone(), outbox.clone());
        tokio::spawn(async move {
            if let Err(error) = answer(stream, &metrics, &outbox).await {
                debug!(%error, %peer, "metrics request failed");
            }
            drop(permit);
        });
    }
}

async fn answer(mut stream: TcpStream, metrics: &AgentMetrics, outbox: &Outbox) -> std::io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => return respond(&mut stream, "431 Request Header Fields Too Large", "", "request head too large\n", true).await,
        Ok(Err(error)) => return Err(error),
        Err(_) => return respond(&mut stream, "408 Request Timeout", "", "request not received in time\n", true).await,
    };
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let with_body = method != "HEAD";
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = metrics.render(outbox);
            respond(&mut stream, "200 OK", "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n", &body, with_body).await
        }
        (_, "/metrics") => respond(&mut stream, "405 Method Not Allowed", "Allow: GET, HEAD\r\n", "only GET and HEAD\n", with_body).await,
        _ => respond(&mut stream, "404 Not Found", "", "the agent serves /metrics only\n", with_body).await,
    }
}

/// The request head, or `None` if it grew past [`MAX_REQUEST_BYTES`] without ending.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed before the request ended"));
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(String::from_utf8_lossy(&head).into_owned()));
        }
        if head.len() > MAX_REQUEST_BYTES {
            return Ok(None);
        }
    }
}

async fn respond(stream: &mut TcpStream, status: &str, headers: &str, body: &str, with_body: bool) -> std::io::Result<()> {
    let head = format!("HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await?;
    if with_body {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(dir: &std::path::Path) -> Outbox {
        let (spool, _) = crate::spool::Spool::open(dir, crate::spool::SpoolConfig::default()).unwrap();
        Outbox::new(spool)
    }

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing in\n{text}"))
    }

    #[test]
    fn exposition_counts_sessions_and_spooled_records() {
        let dir = crate::test_dir::TempDir::new("metrics");
        let outbox = outbox(dir.path());
        let metrics = AgentMetrics::default();
        metrics.session_ended(false);
        metrics.session_established();
        outbox.event(crate::telemetry::agent_event("agent.started", gantry_shared::telemetry::Severity::Info, "started", vec![]));
        let text = metrics.render(&outbox);
        assert_eq!(value(&text, "gantry_agent_connected"), 1.0);
        assert_eq!(value(&text, "gantry_agent_sessions_established_total"), 1.0);
        assert_eq!(value(&text, "gantry_agent_connection_failures_total"), 1.0);
        assert_eq!(value(&text, "gantry_agent_records_spooled_total{class=\"events\"}"), 1.0);
        assert_eq!(value(&text, "gantry_agent_spool_records{class=\"events\"}"), 1.0);
        assert_eq!(value(&text, "gantry_agent_records_acknowledged_total{class=\"events\"}"), 0.0);
        assert!(value(&text, "process_resident_memory_bytes") > 0.0);
        // Every series has its TYPE line, and every TYPE names a series.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} has no TYPE line");
        }
        metrics.session_ended(true);
        assert_eq!(value(&metrics.render(&outbox), "gantry_agent_connected"), 0.0);
        assert_eq!(value(&metrics.render(&outbox), "gantry_agent_connection_failures_total"), 1.0);
    }
}
