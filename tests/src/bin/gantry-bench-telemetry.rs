//! `gantry-bench-telemetry`: rerunnable telemetry benchmarks of a real hub and real agents
//! on loopback.
//!
//! ```text
//! gantry-bench-telemetry file-throughput [--mib N] [--rounds R] [--timeout-secs T]
//!                                        [--read-chunk-kib K] [--poll-ms P]
//! gantry-bench-telemetry ingest          [--agents N] [--secs S] [--lines L1,L2,..] [--samples S1,S2,..]
//!                                        [--line-batch B] [--metric-period-secs M] [--endpoints E] [--warmup-secs W]
//! gantry-bench-telemetry agent-idle      [--secs S] [--variants all|v1,v2,..] [--variant-secs S]
//!                                        [--container IMAGE]
//! (every subcommand: [--hub-bin PATH] [--agent-bin PATH] to run other hub/agent builds)
//! ```
//!
//! - `file-throughput`: the real agent binary tails a pre-written file of N MiB of 200-byte
//!   numbered lines into a hub process, both sides durable (agent spool fsync per poll, hub
//!   fsync per batch). Timed from the agent's start until the hub's `/metrics` counts every
//!   line; the agent's CPU time comes from `/proc/PID/stat`. Baselines in the same round:
//!   reading the file (256 KiB buffer), the file tailer alone, and the spool alone (append
//!   in 1000-line batches with fsync, then pending + frame encode + ack).
//! - `ingest`: N simulated agents (real enrolled identities, real mTLS QUIC sessions with
//!   heartbeats) on a few shared client endpoints stream logs and metric samples at an
//!   offered load into a hub process, window 4 batches per stream like the agent; each batch
//!   is timed from send to its ack. The load rises step by step.
//! - `agent-idle`: the real agent binary with every collector on (host metrics every 10 s,
//!   Docker, one tailed file that gets no writes), idle; RSS and CPU. `--variants` runs
//!   configurations with collectors switched off (and allocator settings) to see what the
//!   memory belongs to.
//!
//! When the hub stops answering during `ingest`, the run ends with the figures so far and a
//! diagnosis (CPU progress, `/readyz`, what the hub's threads wait on), instead of hanging.
//!
//! Each subcommand prints a human summary and, as its last line, one JSON object with the
//! figures. Everything binds loopback only, is bounded in time, stops by itself, kills its
//! child processes and removes its temporary directories. Build in release:
//! `cargo build --release -p gantry-tests --features bench --bins`; the hub and agent programs
//! (`gantry-e2e-hub`, `gantry-e2e-agent`) are run from the same directory as this binary.

use anyhow::{bail, Context, Result};
use gantry_agent::spool::{Spool, SpoolConfig};
use gantry_agent::wire::{FramedRecv, FramedSend};
use gantry_shared::frame::DEFAULT_MAX_FRAME_BYTES;
use gantry_shared::message::{AgentMessage, Heartbeat, HostFacts, HubMessage, StreamClass};
use gantry_shared::telemetry::{Batch, LogLine, LogStream, Record, RecordBody, Sample, StreamDown, StreamUp};
use gantry_tests::bench::*;
use gantry_tests::TempDir;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

const USAGE: &str = "usage:
  gantry-bench-telemetry file-throughput [--mib N (256)] [--rounds R (3)] [--timeout-secs T (600)]
                                         [--read-chunk-kib K (agent default: 256)] [--poll-ms P (agent default: 250)]
  gantry-bench-telemetry ingest          [--agents N (1000)] [--secs S (30)] [--lines L1,L2,.. (25,50,100)]
                                         [--samples S1,S2,.. (125,250,500)] [--line-batch B (10)]
                                         [--metric-period-secs M (1)] [--endpoints E (4)] [--warmup-secs W (5)]
  gantry-bench-telemetry agent-idle      [--secs S (60)] [--variants all|NAME,.. (none)] [--variant-secs S (30)]
                                         [--container IMAGE]
  every subcommand also takes [--hub-bin PATH] and [--agent-bin PATH] (default: gantry-e2e-hub / gantry-e2e-agent
    next to this binary), e.g. to compare a patched build
  agent-idle variants: no-docker, no-host, no-files, none, only-host, only-docker, only-files,
    poll1000 (all, files_poll_ms = 1000 instead of 250), files-poll1000 (only files, 1000 ms), host1s (only host, every 1 s),
    no-container-logs ([docker.logs] enabled = false), discover10s ([docker.logs] discover_ms = 10000), arena2 (MALLOC_ARENA_MAX=2), trim (MALLOC_TRIM_THRESHOLD_=0 + MALLOC_ARENA_MAX=1)";

const MIB: u64 = 1024 * 1024;
/// Bytes per line of the throughput file, newline included.
const LINE_BYTES: usize = 200;
/// Target: file-to-hub log throughput per agent CPU-second.
const TARGET_MIB_PER_AGENT_CORE: f64 = 50.0;
/// Targets of the hub ingest benchmark.
const TARGET_LINES_PER_SEC: f64 = 50_000.0;
const TARGET_SAMPLES_PER_SEC: f64 = 250_000.0;
const TARGET_P99_MS: f64 = 250.0;
/// Targets of the idle agent.
const TARGET_IDLE_RSS_MIB: f64 = 12.0;
const TARGET_IDLE_CPU_PCT: f64 = 0.2;
/// Samples per metric record in the ingest benchmark (one host collection is about this).
const SAMPLES_PER_RECORD: u64 = 50;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let flags = match Flags::parse(rest) {
        Ok(flags) => flags,
        Err(error) => {
            eprintln!("error: {error:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(bin) = flags.last("hub-bin") {
        let _ = HUB_BIN.set(PathBuf::from(bin));
    }
    if let Some(bin) = flags.last("agent-bin") {
        let _ = AGENT_BIN.set(PathBuf::from(bin));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command.as_str() {
            "file-throughput" => {
                flags.only(&["mib", "rounds", "timeout-secs", "read-chunk-kib", "poll-ms"])?;
                let tuning = FileTuning {
                    read_chunk_kib: flags.last("read-chunk-kib").map(|_| flags.num("read-chunk-kib", 256)).transpose()?,
                    poll_ms: flags.last("poll-ms").map(|_| flags.num("poll-ms", 250)).transpose()?,
                };
                file_throughput(flags.num("mib", 256)?, flags.num("rounds", 3)? as usize, flags.num("timeout-secs", 600)?, tuning).await
            }
            "ingest" => {
                flags.only(&["agents", "secs", "lines", "samples", "line-batch", "metric-period-secs", "endpoints", "warmup-secs"])?;
                let lines = flags.list("lines", &[25, 50, 100])?;
                let samples = flags.list("samples", &[125, 250, 500])?;
                anyhow::ensure!(lines.len() == samples.len(), "--lines and --samples need the same number of steps");
                ingest(IngestOptions {
                    agents: flags.num("agents", 1000)? as usize,
                    secs: flags.num("secs", 30)?,
                    steps: lines.into_iter().zip(samples).map(|(l, s)| Load { lines_per_sec: l, samples_per_sec: s }).collect(),
                    line_batch: flags.num("line-batch", 10)?,
                    metric_period_secs: flags.num("metric-period-secs", 1)?,
                    endpoints: flags.num("endpoints", 4)? as usize,
                    warmup_secs: flags.num0("warmup-secs", 5)?,
                })
                .await
            }
            "agent-idle" => {
                flags.only(&["secs", "variants", "variant-secs", "container"])?;
                let variants = match flags.last("variants").as_deref() {
                    None => Vec::new(),
                    Some("all") => IDLE_VARIANTS.iter().map(|v| v.to_string()).collect(),
                    Some(list) => list.split(',').map(str::to_string).collect(),
                };
                for v in &variants {
                    anyhow::ensure!(IDLE_VARIANTS.contains(&v.as_str()), "unknown variant {v:?}");
                }
                agent_idle(flags.num("secs", 60)?, variants, flags.num("variant-secs", 30)?, flags.last("container")).await
            }
            other => bail!("unknown subcommand {other:?}"),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(figures) => {
            println!("{figures}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--name value` pairs.
#[derive(Debug)]
struct Flags(Vec<(String, String)>);

impl Flags {
    fn parse(args: &[String]) -> Result<Flags> {
        let mut out = Vec::new();
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            let name = arg.strip_prefix("--").with_context(|| format!("unexpected argument {arg:?}"))?;
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => (name.to_string(), iter.next().with_context(|| format!("--{name} needs a value"))?.clone()),
            };
            out.push((name, value));
        }
        Ok(Flags(out))
    }

    fn only(&self, allowed: &[&str]) -> Result<()> {
        match self.0.iter().find(|(n, _)| n != "hub-bin" && n != "agent-bin" && !allowed.contains(&n.as_str())) {
            Some((name, _)) => bail!("unknown flag --{name}"),
            None => Ok(()),
        }
    }

    fn last(&self, name: &str) -> Option<String> {
        self.0.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    }

    fn num(&self, name: &str, default: u64) -> Result<u64> {
        let n = self.num0(name, default)?;
        anyhow::ensure!(n > 0, "--{name} must be at least 1");
        Ok(n)
    }

    fn num0(&self, name: &str, default: u64) -> Result<u64> {
        match self.last(name) {
            Some(v) => v.parse().with_context(|| format!("--{name} {v:?} is not a number")),
            None => Ok(default),
        }
    }

    fn list(&self, name: &str, default: &[u64]) -> Result<Vec<u64>> {
        match self.last(name) {
            Some(v) => v.split(',').map(|p| p.trim().parse().with_context(|| format!("--{name}: {p:?} is not a number"))).collect(),
            None => Ok(default.to_vec()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

/// CPU time of the live threads of `pid` from `/proc/PID/task/*/schedstat`, in seconds
/// (nanosecond resolution; threads that already exited are not counted).
fn schedstat_secs(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
        .sum::<u64>() as f64
        / 1e9
}

/// Figures from `/proc/PID/status` in KiB (`VmRSS`, `RssAnon`, `RssFile`, `VmHWM`) and `Threads`.
fn proc_status(pid: u32) -> Result<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}/status"))?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        if ["VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "Threads"].contains(&key) {
            if let Some(n) = value.split_whitespace().next().and_then(|v| v.parse().ok()) {
                out.insert(key.to_string(), n);
            }
        }
    }
    anyhow::ensure!(out.contains_key("VmRSS"), "no VmRSS in /proc/{pid}/status");
    Ok(out)
}

fn rss_kib(pid: u32) -> Result<u64> {
    Ok(proc_status(pid)?["VmRSS"])
}

/// CPU seconds of each live thread of `pid` by thread id, with its name (schedstat).
fn thread_cpu(pid: u32) -> BTreeMap<String, (String, f64)> {
    let mut out = BTreeMap::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.filter_map(Result::ok) {
            let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
            let ns = std::fs::read_to_string(task.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
                .unwrap_or(0);
            out.insert(task.file_name().to_string_lossy().into_owned(), (name, ns as f64 / 1e9));
        }
    }
    out
}

/// CPU used per thread name between two [`thread_cpu`] readings, in % of one core over `secs`.
fn thread_cpu_delta(before: &BTreeMap<String, (String, f64)>, after: &BTreeMap<String, (String, f64)>, secs: f64) -> BTreeMap<String, f64> {
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for (tid, (name, cpu)) in after {
        let start = before.get(tid).map_or(0.0, |b| b.1);
        *out.entry(name.clone()).or_insert(0.0) += 100.0 * (cpu - start) / secs;
    }
    out.values_mut().for_each(|v| *v = r3(*v));
    out
}

/// Names of the threads of `pid` with their counts, e.g. `{"tokio-runtime-w": 2}`.
fn thread_names(pid: u32) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.filter_map(Result::ok) {
            let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
            *out.entry(name).or_insert(0) += 1;
        }
    }
    out
}

/// Resident memory of `pid` by mapping, from `/proc/PID/smaps`: KiB per file name
/// (`[heap]`, `[stack]`, `[anon]` for nameless mappings), and the largest nameless
/// mappings as (size KiB, RSS KiB).
fn smaps_by_mapping(pid: u32) -> (BTreeMap<String, u64>, Vec<(u64, u64)>) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by_name: BTreeMap<String, u64> = BTreeMap::new();
    let mut anon = Vec::new();
    let mut current = String::new();
    let mut size = 0u64;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // Header: address perms offset dev inode [pathname]
            let parts: Vec<&str> = line.split_whitespace().collect();
            current = parts.get(5..).map(|p| p.join(" ")).filter(|p| !p.is_empty()).unwrap_or_else(|| "[anon]".into());
            if let Some(name) = Path::new(&current).file_name().and_then(|n| n.to_str()) {
                if current.starts_with('/') {
                    current = name.to_string();
                }
            }
            continue;
        }
        if let Some(v) = line.strip_prefix("Size:") {
            size = v.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
        }
        if let Some(v) = line.strip_prefix("Rss:") {
            let kib: u64 = v.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
            *by_name.entry(current.clone()).or_insert(0) += kib;
            if current == "[anon]" && kib > 0 {
                anon.push((size, kib));
            }
        }
    }
    anon.sort_by_key(|a| std::cmp::Reverse(a.1));
    anon.truncate(8);
    (by_name, anon)
}

fn ingested(metrics: &HashMap<String, f64>, class: &str) -> f64 {
    metrics.get(&format!("gantry_ingest_records_total{{class=\"{class}\"}}")).copied().unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------
// file-throughput
// ---------------------------------------------------------------------------------------

/// Line `n` of the throughput file: `line-0000000042 ` and filler, 199 bytes plus `\n`.
fn numbered_line(n: u64, out: &mut Vec<u8>) {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ";
    let start = out.len();
    let _ = write!(out, "line-{n:010} ");
    let mut i = (n as usize).wrapping_mul(7);
    while out.len() - start < LINE_BYTES - 1 {
        out.push(ALPHABET[i % ALPHABET.len()]);
        i += 1;
    }
    out.push(b'\n');
}

/// Write `lines` numbered lines to `path` and fsync it.
fn write_line_file(path: &Path, lines: u64) -> Result<()> {
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut buf = Vec::with_capacity(LINE_BYTES);
    for n in 0..lines {
        buf.clear();
        numbered_line(n, &mut buf);
        file.write_all(&buf)?;
    }
    let file = file.into_inner().map_err(|e| anyhow::anyhow!("writing the line file: {e}"))?;
    file.sync_all()?;
    Ok(())
}

/// Wall seconds and CPU seconds (this process) of `f`.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64, f64)> {
    let cpu = self_cpu();
    let started = Instant::now();
    let value = f()?;
    Ok((value, started.elapsed().as_secs_f64(), self_cpu() - cpu))
}

/// Read the whole file with a 256 KiB buffer; bytes read.
fn read_file(path: &Path) -> Result<u64> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// The agent's file tailer alone over the file (as the agent's files loop drives it); lines.
fn tail_file(path: &Path) -> Result<u64> {
    let config = gantry_agent::collector::file::FileSourceConfig { paths: vec![path.display().to_string()], ..Default::default() };
    let mut tailer = gantry_agent::collector::file::FileTailer::new(config, None)?;
    let mut lines = 0u64;
    loop {
        let polled = tailer.poll(gantry_agent::wall_ms(), gantry_agent::collection::MAX_LINES_PER_POLL)?;
        if polled.lines.is_empty() {
            return Ok(lines);
        }
        lines += polled.lines.len() as u64;
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct SpoolFigures {
    append_secs: f64,
    append_cpu: f64,
    drain_secs: f64,
    drain_cpu: f64,
    encode_secs: f64,
    pending_secs: f64,
    ack_secs: f64,
    records: u64,
    disk_bytes: u64,
}

/// The spool alone: append the file's lines as log records in 1000-line batches (each
/// append is one transaction and an fsync, with a checkpoint, as the agent's file loop does),
/// then read them back in sender-sized batches, frame-encode each, and ack it.
fn spool_alone(path: &Path, dir: &Path) -> Result<SpoolFigures> {
    let cap = 64 * 1024 * MIB;
    let (spool, _) = Spool::open(dir, SpoolConfig { cap_bytes: [64 * MIB, cap, 128 * MIB, 32 * MIB] })?;
    let source = path.display().to_string();
    let checkpoint = vec![b'x'; 160];
    let mut figures = SpoolFigures::default();
    let cpu = self_cpu();
    let started = Instant::now();
    let mut reader = std::io::BufReader::with_capacity(256 * 1024, std::fs::File::open(path)?);
    let mut batch = Vec::with_capacity(1000);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n > 0 {
            let text = line.trim_end_matches('\n').to_string();
            batch.push((gantry_agent::wall_ms(), RecordBody::Log(LogLine { source: source.clone(), stream: LogStream::File, container: None, line: text })));
        }
        if batch.len() >= 1000 || (n == 0 && !batch.is_empty()) {
            spool.append(StreamClass::Logs, std::mem::take(&mut batch), Some(("files", checkpoint.as_slice())))?;
        }
        if n == 0 {
            break;
        }
    }
    figures.append_secs = started.elapsed().as_secs_f64();
    figures.append_cpu = self_cpu() - cpu;
    figures.disk_bytes = dir_size(dir);

    let cpu = self_cpu();
    let started = Instant::now();
    let mut after = 0;
    let mut scratch = Vec::with_capacity(1 << 20);
    loop {
        let t = Instant::now();
        let records = spool.pending(StreamClass::Logs, after, gantry_agent::telemetry::BATCH_RECORDS, gantry_agent::telemetry::BATCH_BYTES)?;
        figures.pending_secs += t.elapsed().as_secs_f64();
        let Some(last) = records.last().map(|r| r.seq) else { break };
        figures.records += records.len() as u64;
        let t = Instant::now();
        scratch.clear();
        gantry_shared::frame::encode(&StreamUp::Batch(Batch { records }), DEFAULT_MAX_FRAME_BYTES, &mut scratch)?;
        figures.encode_secs += t.elapsed().as_secs_f64();
        let t = Instant::now();
        spool.ack(StreamClass::Logs, last)?;
        figures.ack_secs += t.elapsed().as_secs_f64();
        after = last;
    }
    figures.drain_secs = started.elapsed().as_secs_f64();
    figures.drain_cpu = self_cpu() - cpu;
    drop(spool);
    Ok(figures)
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.filter_map(Result::ok).map(|e| if e.path().is_dir() { dir_size(&e.path()) } else { e.metadata().map(|m| m.len()).unwrap_or(0) }).sum()
        })
        .unwrap_or(0)
}

#[derive(Debug, Default, Clone, Copy)]
struct EndToEnd {
    secs: f64,
    agent_cpu: f64,
    hub_cpu: f64,
    agent_hwm_kib: u64,
    first_record_secs: f64,
}

/// Agent file-collector settings the run overrides (`None`: the agent's default).
#[derive(Debug, Clone, Copy, Default)]
struct FileTuning {
    read_chunk_kib: Option<u64>,
    poll_ms: Option<u64>,
}

impl FileTuning {
    /// Root-level TOML keys for the agent config.
    fn toml(&self) -> String {
        let mut out = String::new();
        if let Some(k) = self.read_chunk_kib {
            out.push_str(&format!("files.read_chunk_bytes = {}\n", k * 1024));
        }
        if let Some(p) = self.poll_ms {
            out.push_str(&format!("files_poll_ms = {p}\n"));
        }
        out
    }
}

/// One end-to-end round: fresh hub, fresh agent, time until the hub counts `lines` lines.
async fn end_to_end(root: &Path, file: &Path, lines: u64, file_bytes: u64, timeout: Duration, tuning: FileTuning) -> Result<EndToEnd> {
    let mut hub = HubProc::start(&root.join("hub")).await?;
    let token = hub.org_and_token(1).await?;
    let state = root.join("agent");
    enroll_many(&token, root, 1, 1).await?;
    std::fs::rename(root.join("agent-00000"), &state)?;
    let config = root.join("agent.toml");
    // The spool must hold the whole file should the hub fall behind (no cap drops).
    let cap = (4 * file_bytes).max(256 * MIB);
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\nfiles.paths = [{:?}]\n{}[spool]\nlogs_bytes = {cap}\n[host]\nenabled = false\n[docker]\nenabled = false\n",
            state.display().to_string(),
            file.display().to_string(),
            tuning.toml()
        ),
    )?;
    let hub_cpu0 = hub.cpu();
    let started = Instant::now();
    let mut agent = AgentProc::start(&config, &root.join("agent.log"), &[])?;
    let pid = agent.pid;
    println!("    agent pid {pid}, hub pid {}", hub.pid);
    let mut first_record = None;
    let mut last_count = 0.0;
    let mut last_progress = Instant::now();
    let result = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !agent.alive() {
            break Err(anyhow::anyhow!("the agent exited; its log:\n{}", agent.log_text()));
        }
        let count = hub.metrics().await.map(|m| ingested(&m, "logs")).unwrap_or(last_count);
        if count > 0.0 && first_record.is_none() {
            first_record = Some(started.elapsed().as_secs_f64());
        }
        if count >= lines as f64 {
            break Ok(started.elapsed().as_secs_f64());
        }
        if count > last_count {
            last_count = count;
            last_progress = Instant::now();
        }
        if started.elapsed() > timeout || last_progress.elapsed() > Duration::from_secs(60) {
            let diagnosis = hub.diagnose_stall().await;
            break Err(anyhow::anyhow!(
                "only {last_count} of {lines} lines reached the hub after {:.0} s ({diagnosis}); agent log:\n{}\nhub log:\n{}",
                started.elapsed().as_secs_f64(),
                agent.log_text(),
                hub.log_text()
            ));
        }
    };
    let agent_cpu = cpu_secs(&pid.to_string()).unwrap_or(f64::NAN);
    let agent_hwm_kib = proc_status(pid).map(|s| s.get("VmHWM").copied().unwrap_or(0)).unwrap_or(0);
    let hub_cpu = hub.cpu() - hub_cpu0;
    agent.kill().await;
    hub.stop().await;
    let secs = result?;
    Ok(EndToEnd { secs, agent_cpu, hub_cpu, agent_hwm_kib, first_record_secs: first_record.unwrap_or(f64::NAN) })
}

async fn file_throughput(mib: u64, rounds: usize, timeout_secs: u64, tuning: FileTuning) -> Result<Value> {
    let tmp = TempDir::new("bench-file-throughput");
    let file = tmp.path().join("app.log");
    let lines = mib * MIB / LINE_BYTES as u64;
    let bytes = lines * LINE_BYTES as u64;
    let mibs = bytes as f64 / MIB as f64;
    println!(
        "file-throughput: {mibs:.1} MiB file of {lines} lines x {LINE_BYTES} bytes; {rounds} rounds; {} cores; agent file settings {}; temp dir {}",
        cores(),
        if tuning.toml().is_empty() { "default".to_string() } else { tuning.toml().trim().replace('\n', ", ") },
        tmp.path().display()
    );
    {
        let file = file.clone();
        tokio::task::spawn_blocking(move || write_line_file(&file, lines)).await??;
    }
    println!("  agent program: {}; hub program: {}", agent_binary_label(), hub_binary_label());
    println!(
        "  per round: read (256 KiB buffer) | tailer alone | spool alone (append 1000-line batches + fsync; pending + encode + ack) | agent -> hub end to end"
    );
    let mut rows = Vec::new();
    for round in 1..=rounds {
        let (file2, dir) = (file.clone(), tmp.path().join(format!("round-{round}")));
        std::fs::create_dir_all(&dir)?;
        let spool_dir = dir.join("spool-alone");
        let (read, tail, spool) = tokio::task::spawn_blocking(move || -> Result<_> {
            let read = timed(|| read_file(&file2))?;
            let tail = timed(|| tail_file(&file2))?;
            let spool = spool_alone(&file2, &spool_dir)?;
            let _ = std::fs::remove_dir_all(&spool_dir);
            Ok((read, tail, spool))
        })
        .await??;
        anyhow::ensure!(read.0 == bytes, "read {} bytes of {bytes}", read.0);
        anyhow::ensure!(tail.0 == lines, "the tailer returned {} lines of {lines}", tail.0);
        anyhow::ensure!(spool.records == lines, "the spool returned {} records of {lines}", spool.records);
        let e2e = end_to_end(&dir, &file, lines, bytes, Duration::from_secs(timeout_secs), tuning).await?;
        let _ = std::fs::remove_dir_all(&dir);
        let row = json!({
            "read_mib_s": mibs / read.1,
            "tail_mib_s": mibs / tail.1,
            "tail_mib_per_cpu_s": mibs / tail.2,
            "spool_append_mib_s": mibs / spool.append_secs,
            "spool_append_mib_per_cpu_s": mibs / spool.append_cpu,
            "spool_drain_mib_s": mibs / spool.drain_secs,
            "spool_drain_mib_per_cpu_s": mibs / spool.drain_cpu,
            "spool_mib_s": mibs / (spool.append_secs + spool.drain_secs),
            "spool_mib_per_cpu_s": mibs / (spool.append_cpu + spool.drain_cpu),
            "spool_pending_s": spool.pending_secs,
            "spool_encode_s": spool.encode_secs,
            "spool_ack_s": spool.ack_secs,
            "spool_disk_mib": spool.disk_bytes as f64 / MIB as f64,
            "e2e_s": e2e.secs,
            "e2e_first_record_s": e2e.first_record_secs,
            "e2e_mib_s": mibs / e2e.secs,
            "agent_cpu_s": e2e.agent_cpu,
            "agent_mib_per_cpu_s": mibs / e2e.agent_cpu,
            "agent_cpu_pct": 100.0 * e2e.agent_cpu / e2e.secs,
            "agent_hwm_mib": e2e.agent_hwm_kib as f64 / 1024.0,
            "hub_cpu_s": e2e.hub_cpu,
            "hub_mib_per_cpu_s": mibs / e2e.hub_cpu,
            "hub_cpu_pct": 100.0 * e2e.hub_cpu / e2e.secs,
        });
        println!(
            "  round {round}: read {:.0} MiB/s | tail {:.0} MiB/s ({:.0}/CPU-s) | spool append {:.1} MiB/s ({:.1}/CPU-s), drain {:.1} MiB/s ({:.1}/CPU-s: pending {:.1} s, encode {:.1} s, ack {:.1} s) | e2e {:.1} s = {:.1} MiB/s, agent {:.1} CPU-s = {:.1} MiB/CPU-s ({:.0} % of a core), hub {:.1} CPU-s ({:.0} %), agent peak RSS {:.1} MiB",
            mibs / read.1,
            mibs / tail.1,
            mibs / tail.2,
            mibs / spool.append_secs,
            mibs / spool.append_cpu,
            mibs / spool.drain_secs,
            mibs / spool.drain_cpu,
            spool.pending_secs,
            spool.encode_secs,
            spool.ack_secs,
            e2e.secs,
            mibs / e2e.secs,
            e2e.agent_cpu,
            mibs / e2e.agent_cpu,
            100.0 * e2e.agent_cpu / e2e.secs,
            e2e.hub_cpu,
            100.0 * e2e.hub_cpu / e2e.secs,
            e2e.agent_hwm_kib as f64 / 1024.0
        );
        rows.push(row);
    }
    let med = |key: &str| median(&rows.iter().filter_map(|r| r[key].as_f64()).collect::<Vec<_>>());
    let mut medians = serde_json::Map::new();
    for key in rows[0].as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default() {
        medians.insert(key.clone(), json!(r2(med(&key))));
    }
    let per_core = med("agent_mib_per_cpu_s");
    let met = per_core >= TARGET_MIB_PER_AGENT_CORE;
    println!(
        "median: end to end {:.1} MiB/s wall, {per_core:.1} MiB per agent CPU-second (target >= {TARGET_MIB_PER_AGENT_CORE}: {}), hub {:.1} MiB per hub CPU-second",
        med("e2e_mib_s"),
        if met { "met" } else { "NOT met" },
        med("hub_mib_per_cpu_s")
    );
    println!(
        "median baselines: read {:.0} MiB/s, tailer {:.0} MiB/CPU-s, spool append {:.1} MiB/CPU-s, spool drain {:.1} MiB/CPU-s, spool round trip {:.1} MiB/s wall / {:.1} MiB/CPU-s",
        med("read_mib_s"),
        med("tail_mib_per_cpu_s"),
        med("spool_append_mib_per_cpu_s"),
        med("spool_drain_mib_per_cpu_s"),
        med("spool_mib_s"),
        med("spool_mib_per_cpu_s")
    );
    // Ratios to 3 significant digits (the read baseline is thousands of times faster).
    let ratio = |a: &str, b: &str| {
        let x = med(a) / med(b);
        let digits = (2 - x.abs().log10().floor() as i32).max(0);
        let scale = 10f64.powi(digits);
        (x * scale).round() / scale
    };
    println!(
        "ratios: e2e/read wall {}, e2e/spool-alone wall {}; agent MiB/CPU-s over spool-alone MiB/CPU-s {} (1.0 would mean the spool is the agent's whole cost)",
        ratio("e2e_mib_s", "read_mib_s"),
        ratio("e2e_mib_s", "spool_mib_s"),
        ratio("agent_mib_per_cpu_s", "spool_mib_per_cpu_s")
    );
    drop(tmp);
    Ok(json!({
        "bench": "file-throughput",
        "date": today(),
        "cores": cores(),
        "mib": r2(mibs),
        "lines": lines,
        "line_bytes": LINE_BYTES,
        "hub_program": hub_binary_label(),
        "agent_program": agent_binary_label(),
        "rounds": rounds,
        "agent_read_chunk_kib": tuning.read_chunk_kib,
        "agent_files_poll_ms": tuning.poll_ms,
        "per_round": rows,
        "median": medians,
        "ratio_e2e_vs_read_wall": ratio("e2e_mib_s", "read_mib_s"),
        "ratio_e2e_vs_spool_alone_wall": ratio("e2e_mib_s", "spool_mib_s"),
        "ratio_agent_vs_spool_alone_per_cpu_s": ratio("agent_mib_per_cpu_s", "spool_mib_per_cpu_s"),
        "target_mib_per_agent_core": TARGET_MIB_PER_AGENT_CORE,
        "target_met": met,
    }))
}

// ---------------------------------------------------------------------------------------
// ingest
// ---------------------------------------------------------------------------------------

/// Offered load per simulated agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Load {
    lines_per_sec: u64,
    samples_per_sec: u64,
}

#[derive(Debug)]
struct IngestOptions {
    agents: usize,
    secs: u64,
    steps: Vec<Load>,
    line_batch: u64,
    /// A simulated agent sends its metric samples once per this many seconds.
    metric_period_secs: u64,
    endpoints: usize,
    warmup_secs: u64,
}

/// What the fleet is told to do now; `stats` is set while a measurement window is open.
#[derive(Debug, Clone)]
struct Phase {
    load: Load,
    stats: Option<Arc<StepStats>>,
}

/// Figures of one measurement window, filled by every stream.
#[derive(Debug, Default)]
struct StepStats {
    /// Send-to-ack latency of log and metric batches, in microseconds.
    log_ack_us: Mutex<Vec<u32>>,
    metric_ack_us: Mutex<Vec<u32>>,
    /// From the generation of a batch's oldest record to its ack (window queueing included).
    log_e2e_us: Mutex<Vec<u32>>,
    metric_e2e_us: Mutex<Vec<u32>>,
    lines_acked: AtomicU64,
    samples_acked: AtomicU64,
    lines_generated: AtomicU64,
    samples_generated: AtomicU64,
    refused: AtomicU64,
}

/// Fleet-wide counters.
#[derive(Debug, Default)]
struct FleetStats {
    established: AtomicU64,
    failed: AtomicU64,
    lost: AtomicU64,
    heartbeats_sent: AtomicU64,
    heartbeat_acks: AtomicU64,
    /// Lines and samples generated and not yet acknowledged.
    outstanding: AtomicI64,
}

/// Open a telemetry stream of `class` and wait for its first ack (the hub's mark).
async fn open_stream(connection: &quinn::Connection, class: StreamClass) -> Result<(FramedSend, FramedRecv, u64)> {
    let (send, recv) = connection.open_bi().await?;
    let mut send = FramedSend::new(send, DEFAULT_MAX_FRAME_BYTES);
    let mut recv = FramedRecv::new(recv, DEFAULT_MAX_FRAME_BYTES);
    send.send(&StreamUp::Open { class }).await?;
    match recv.next::<StreamDown>().await? {
        Some(StreamDown::Ack(ack)) => Ok((send, recv, ack.up_to_seq)),
        other => bail!("expected the first ack of the {class:?} stream, got {other:?}"),
    }
}

/// One batch sent and not yet acknowledged.
#[derive(Debug)]
struct InFlight {
    last_seq: u64,
    sent: Instant,
    oldest: Instant,
    units: u64,
    /// What was taken from the queue, to requeue on a refusal.
    taken: Vec<(Instant, u64)>,
}

/// 200-byte log line text (without newline) for seq `n`.
fn log_text(n: u64) -> String {
    let mut buf = Vec::with_capacity(LINE_BYTES);
    numbered_line(n, &mut buf);
    buf.pop();
    String::from_utf8(buf).unwrap_or_default()
}

/// One simulated telemetry stream: generates `class` units (lines or samples) at the phase's
/// rate, sends them in batches with up to `WINDOW` unacknowledged, and times the acks.
#[allow(clippy::too_many_arguments)]
async fn stream_loop(
    class: StreamClass,
    mut send: FramedSend,
    mut recv: FramedRecv,
    mark: u64,
    line_batch: u64,
    metric_period: Duration,
    mut phase: watch::Receiver<Phase>,
    fleet: Arc<FleetStats>,
    mut stop: watch::Receiver<bool>,
) {
    let logs = class == StreamClass::Logs;
    let mut next_seq = mark + 1;
    let mut queue: VecDeque<(Instant, u64)> = VecDeque::new();
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut load = phase.borrow().load;
    let ticker = |load: Load| -> Option<(tokio::time::Interval, u64)> {
        let (period, units) = if logs {
            if load.lines_per_sec == 0 {
                return None;
            }
            (Duration::from_secs_f64(line_batch as f64 / load.lines_per_sec as f64), line_batch)
        } else {
            if load.samples_per_sec == 0 {
                return None;
            }
            (metric_period, load.samples_per_sec * metric_period.as_secs().max(1))
        };
        // A random phase, so the fleet does not send in step.
        let offset = Duration::from_micros(rand::random::<u64>() % period.as_micros().max(1) as u64);
        Some((tokio::time::interval_at(tokio::time::Instant::now() + offset, period), units))
    };
    let mut tick = ticker(load);
    let source = "/var/log/bench/app.log".to_string();
    loop {
        while in_flight.len() < gantry_agent::telemetry::WINDOW && !queue.is_empty() {
            let mut records = Vec::new();
            let mut taken = Vec::new();
            let mut units = 0;
            let oldest = queue.front().map(|q| q.0).unwrap_or_else(Instant::now);
            let now_ms = gantry_agent::wall_ms();
            while let Some(&(at, n)) = queue.front() {
                let room = gantry_agent::telemetry::BATCH_RECORDS.saturating_sub(records.len()) as u64;
                if logs {
                    let take = n.min(room);
                    if take == 0 {
                        break;
                    }
                    for _ in 0..take {
                        let line = LogLine { source: source.clone(), stream: LogStream::File, container: None, line: log_text(next_seq) };
                        records.push(Record { seq: next_seq, ts_unix_ms: now_ms, body: RecordBody::Log(line) });
                        next_seq += 1;
                    }
                    units += take;
                    taken.push((at, take));
                    if take == n {
                        queue.pop_front();
                    } else if let Some(front) = queue.front_mut() {
                        front.1 -= take;
                    }
                } else {
                    let needed = n.div_ceil(SAMPLES_PER_RECORD);
                    if !records.is_empty() && needed > room {
                        break;
                    }
                    let mut left = n;
                    while left > 0 {
                        let count = left.min(SAMPLES_PER_RECORD);
                        let samples = (0..count)
                            .map(|i| Sample {
                                name: format!("bench.metric_{i:02}"),
                                labels: vec![("host".into(), "bench".into()), ("part".into(), (i % 4).to_string())],
                                value: (next_seq as f64) * 0.5 + i as f64,
                            })
                            .collect();
                        records.push(Record { seq: next_seq, ts_unix_ms: now_ms, body: RecordBody::Metrics(samples) });
                        next_seq += 1;
                        left -= count;
                    }
                    units += n;
                    taken.push((at, n));
                    queue.pop_front();
                }
            }
            let last_seq = next_seq - 1;
            if send.send(&StreamUp::Batch(Batch { records })).await.is_err() {
                fleet.lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
            in_flight.push_back(InFlight { last_seq, sent: Instant::now(), oldest, units, taken });
        }
        tokio::select! {
            _ = async {
                match &mut tick {
                    Some((interval, _)) => { interval.tick().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {
                let units = tick.as_ref().map_or(0, |t| t.1);
                queue.push_back((Instant::now(), units));
                fleet.outstanding.fetch_add(units as i64, Ordering::Relaxed);
                if let Some(stats) = phase.borrow().stats.clone() {
                    let counter = if logs { &stats.lines_generated } else { &stats.samples_generated };
                    counter.fetch_add(units, Ordering::Relaxed);
                }
            }
            reply = recv.next::<StreamDown>() => match reply {
                Ok(Some(StreamDown::Ack(ack))) => {
                    let now = Instant::now();
                    let stats = phase.borrow().stats.clone();
                    while in_flight.front().is_some_and(|f| f.last_seq <= ack.up_to_seq) {
                        let Some(done) = in_flight.pop_front() else { break };
                        fleet.outstanding.fetch_sub(done.units as i64, Ordering::Relaxed);
                        if let Some(stats) = &stats {
                            let ack_us = (now - done.sent).as_micros().min(u32::MAX as u128) as u32;
                            let e2e_us = (now - done.oldest).as_micros().min(u32::MAX as u128) as u32;
                            let (acks, e2es, counter) = if logs {
                                (&stats.log_ack_us, &stats.log_e2e_us, &stats.lines_acked)
                            } else {
                                (&stats.metric_ack_us, &stats.metric_e2e_us, &stats.samples_acked)
                            };
                            acks.lock().unwrap_or_else(|e| e.into_inner()).push(ack_us);
                            e2es.lock().unwrap_or_else(|e| e.into_inner()).push(e2e_us);
                            counter.fetch_add(done.units, Ordering::Relaxed);
                        }
                    }
                }
                Ok(Some(StreamDown::Refused { retry_after_ms, .. })) => {
                    if let Some(stats) = phase.borrow().stats.clone() {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(retry_after_ms.clamp(100, 5_000))).await;
                    // Send everything unacknowledged again, with fresh seqs (a hole is harmless).
                    for f in in_flight.drain(..).rev() {
                        for t in f.taken.into_iter().rev() {
                            queue.push_front(t);
                        }
                    }
                }
                Ok(None) | Err(_) => {
                    fleet.lost.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
            changed = phase.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = phase.borrow().load;
                if now != load {
                    load = now;
                    tick = ticker(load);
                }
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

/// One simulated agent: session with heartbeats every 5 s, a logs and a metrics stream.
#[allow(clippy::too_many_arguments)]
async fn simulated_agent(
    endpoint: quinn::Endpoint,
    creds: AgentCreds,
    remote: SocketAddr,
    facts: Arc<HostFacts>,
    slots: Arc<tokio::sync::Semaphore>,
    fleet: Arc<FleetStats>,
    phase: watch::Receiver<Phase>,
    line_batch: u64,
    metric_period: Duration,
    mut stop: watch::Receiver<bool>,
) {
    const INTERVAL: Duration = Duration::from_secs(5);
    let permit = slots.acquire_owned().await;
    let mut session = None;
    for attempt in 1..=3 {
        let dial = async { dial_session(&endpoint, creds.client_config()?, remote, &facts, Duration::from_secs(20)).await };
        match dial.await {
            Ok(established) => {
                session = Some(established);
                break;
            }
            Err(error) => eprintln!("  agent connection attempt {attempt} failed: {error:#}"),
        }
    }
    let Some((connection, mut send, mut recv)) = session else {
        fleet.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut streams = tokio::task::JoinSet::new();
    for class in [StreamClass::Logs, StreamClass::Metrics] {
        match tokio::time::timeout(Duration::from_secs(20), open_stream(&connection, class)).await {
            Ok(Ok((s, r, mark))) => {
                streams.spawn(stream_loop(class, s, r, mark, line_batch, metric_period, phase.clone(), fleet.clone(), stop.clone()));
            }
            Ok(Err(error)) => {
                eprintln!("  could not open a {class:?} stream: {error:#}");
                fleet.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(_) => {
                eprintln!("  the {class:?} stream got no first ack within 20 s");
                fleet.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
    drop(permit);
    fleet.established.fetch_add(1, Ordering::Relaxed);
    let offset = Duration::from_millis(rand::random::<u64>() % INTERVAL.as_millis() as u64);
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + offset, INTERVAL);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = beat.tick() => {
                seq += 1;
                let message = AgentMessage::Heartbeat(Heartbeat { seq, agent_clock_unix_ms: gantry_agent::wall_ms() });
                if send.send(&message).await.is_err() {
                    fleet.lost.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                fleet.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
            }
            message = recv.next::<HubMessage>() => match message {
                Ok(Some(HubMessage::HeartbeatAck(_))) => { fleet.heartbeat_acks.fetch_add(1, Ordering::Relaxed); }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    fleet.lost.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while streams.join_next().await.is_some() {} }).await;
    streams.abort_all();
    connection.close(0u32.into(), b"bench done");
}

fn sorted(values: &Mutex<Vec<u32>>) -> Vec<u32> {
    let mut v = values.lock().unwrap_or_else(|e| e.into_inner()).clone();
    v.sort_unstable();
    v
}

async fn ingest(options: IngestOptions) -> Result<Value> {
    let IngestOptions { agents, secs, steps, line_batch, metric_period_secs, endpoints, warmup_secs } = options;
    let metric_period = Duration::from_secs(metric_period_secs);
    let tmp = TempDir::new("bench-ingest");
    println!(
        "ingest: {agents} simulated agents on {endpoints} shared client endpoints, a logs and a metrics stream each (window {}), heartbeats every 5 s; hub as its own process; {} cores shared by hub and load generator",
        gantry_agent::telemetry::WINDOW,
        cores()
    );
    println!(
        "  per agent: log lines of {LINE_BYTES} bytes in batches of {line_batch}, metric samples in records of {SAMPLES_PER_RECORD} sent every {metric_period_secs} s; steps (lines/s, samples/s per agent): {:?}; {warmup_secs} s warm-up + {secs} s measured per step",
        steps.iter().map(|s| (s.lines_per_sec, s.samples_per_sec)).collect::<Vec<_>>()
    );
    println!("  hub program: {}", hub_binary_label());
    let mut hub = HubProc::start(&tmp.path().join("hub")).await?;
    let token = hub.org_and_token(agents).await?;
    let enroll_started = Instant::now();
    let dirs = enroll_many(&token, &tmp.path().join("agents"), agents, 16).await?;
    let enroll_secs = enroll_started.elapsed().as_secs_f64();
    println!("  enrolled {agents} agents in {enroll_secs:.1} s");

    let endpoint_list: Vec<quinn::Endpoint> = (0..endpoints).map(|_| gantry_agent::connection::client_endpoint(hub.quic)).collect::<Result<_>>()?;
    let facts = Arc::new(gantry_agent::facts::collect());
    let fleet = Arc::new(FleetStats::default());
    let slots = Arc::new(tokio::sync::Semaphore::new(32));
    let idle = Load { lines_per_sec: 0, samples_per_sec: 0 };
    let (phase_tx, phase_rx) = watch::channel(Phase { load: idle, stats: None });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let connect_started = Instant::now();
    for (i, dir) in dirs.iter().enumerate() {
        let creds = AgentCreds::load(dir)?;
        tasks.spawn(simulated_agent(
            endpoint_list[i % endpoints].clone(),
            creds,
            hub.quic,
            facts.clone(),
            slots.clone(),
            fleet.clone(),
            phase_rx.clone(),
            line_batch,
            metric_period,
            stop_rx.clone(),
        ));
    }
    let connected = wait_until(Duration::from_secs(300), Duration::from_millis(200), "all agents connected", || async {
        let ready = fleet.established.load(Ordering::Relaxed) as usize;
        let failed = fleet.failed.load(Ordering::Relaxed) as usize;
        (ready + failed >= agents).then_some(ready)
    })
    .await?;
    anyhow::ensure!(connected == agents, "only {connected} of {agents} agents connected; hub log:\n{}", hub.log_text());
    println!("  {agents} agents connected with both streams open in {:.1} s", connect_started.elapsed().as_secs_f64());

    let mut results = Vec::new();
    let mut stalled: Option<Value> = None;
    for (index, &load) in steps.iter().enumerate() {
        let offered_lines = (load.lines_per_sec * agents as u64) as f64;
        let offered_samples = (load.samples_per_sec * agents as u64) as f64;
        println!("  step {}: offering {offered_lines:.0} lines/s and {offered_samples:.0} samples/s", index + 1);
        phase_tx.send_replace(Phase { load, stats: None });
        tokio::time::sleep(Duration::from_secs(warmup_secs)).await;
        let stats = Arc::new(StepStats::default());
        let m0 = match hub.metrics().await {
            Some(m) => m,
            None => {
                let diagnosis = hub.diagnose_stall().await;
                println!("    the hub stopped answering before step {}: {diagnosis}", index + 1);
                stalled = Some(json!({ "step": index + 1, "when": "before the window", "diagnosis": diagnosis }));
                break;
            }
        };
        let (hub_cpu0, self_cpu0, lost0) = (hub.cpu(), self_cpu(), fleet.lost.load(Ordering::Relaxed));
        let started = Instant::now();
        phase_tx.send_replace(Phase { load, stats: Some(stats.clone()) });
        tokio::time::sleep(Duration::from_secs(secs)).await;
        phase_tx.send_replace(Phase { load, stats: None });
        let window = started.elapsed().as_secs_f64();
        let (hub_cpu, bench_cpu) = (hub.cpu() - hub_cpu0, self_cpu() - self_cpu0);
        let m1 = match hub.metrics().await {
            Some(m) => m,
            None => {
                let diagnosis = hub.diagnose_stall().await;
                let acked = stats.lines_acked.load(Ordering::Relaxed) as f64 / window;
                println!("    the hub stopped answering during step {} (acks seen: {acked:.0} lines/s on average): {diagnosis}", index + 1);
                stalled = Some(json!({ "step": index + 1, "when": "during the window", "lines_acked_s": r2(acked), "diagnosis": diagnosis }));
                break;
            }
        };
        let lost = fleet.lost.load(Ordering::Relaxed) - lost0;
        let outstanding_at_end = fleet.outstanding.load(Ordering::Relaxed);
        // Pause the load and let the backlog drain before the next step.
        phase_tx.send_replace(Phase { load: idle, stats: None });
        let drain_started = Instant::now();
        let drained = wait_until(Duration::from_secs(120), Duration::from_millis(200), "the backlog to drain", || async {
            (fleet.outstanding.load(Ordering::Relaxed) <= 0).then_some(())
        })
        .await
        .is_ok();
        let drain_secs = drain_started.elapsed().as_secs_f64();

        let lines = stats.lines_acked.load(Ordering::Relaxed) as f64 / window;
        let samples = stats.samples_acked.load(Ordering::Relaxed) as f64 / window;
        let hub_lines = (ingested(&m1, "logs") - ingested(&m0, "logs")) / window;
        // Records carry up to SAMPLES_PER_RECORD samples; one period's samples make whole records.
        let per_tick = load.samples_per_sec * metric_period_secs;
        let samples_per_record = per_tick as f64 / per_tick.div_ceil(SAMPLES_PER_RECORD).max(1) as f64;
        let hub_samples = (ingested(&m1, "metrics") - ingested(&m0, "metrics")) * samples_per_record / window;
        let (log_ack, metric_ack, log_e2e, metric_e2e) =
            (sorted(&stats.log_ack_us), sorted(&stats.metric_ack_us), sorted(&stats.log_e2e_us), sorted(&stats.metric_e2e_us));
        let ms = |v: &[u32], p: f64| r2(quantile(v, p) / 1000.0);
        let mut all_ack: Vec<u32> = log_ack.iter().chain(&metric_ack).copied().collect();
        all_ack.sort_unstable();
        let p99 = quantile(&all_ack, 0.99) / 1000.0;
        let lines_ok = lines >= TARGET_LINES_PER_SEC;
        let samples_ok = samples >= TARGET_SAMPLES_PER_SEC;
        let latency_ok = p99 <= TARGET_P99_MS;
        let hub_batches = m1.get("gantry_ingest_batches_total{class=\"logs\"}").unwrap_or(&0.0)
            - m0.get("gantry_ingest_batches_total{class=\"logs\"}").unwrap_or(&0.0)
            + m1.get("gantry_ingest_batches_total{class=\"metrics\"}").unwrap_or(&0.0)
            - m0.get("gantry_ingest_batches_total{class=\"metrics\"}").unwrap_or(&0.0);
        println!(
            "    achieved {lines:.0} lines/s ({:.0} % of offered; hub counted {hub_lines:.0}/s), {samples:.0} samples/s ({:.0} %; hub counted {hub_samples:.0}/s); hub stored {:.0} batches/s",
            100.0 * lines / offered_lines.max(1.0),
            100.0 * samples / offered_samples.max(1.0),
            hub_batches / window
        );
        println!(
            "    ack latency logs p50 {} ms p99 {} ms max {} ms | metrics p50 {} ms p99 {} ms | all p99 {:.1} ms; generation-to-ack p99 logs {} ms metrics {} ms",
            ms(&log_ack, 0.5),
            ms(&log_ack, 0.99),
            ms(&log_ack, 1.0),
            ms(&metric_ack, 0.5),
            ms(&metric_ack, 0.99),
            p99,
            ms(&log_e2e, 0.99),
            ms(&metric_e2e, 0.99)
        );
        println!(
            "    hub CPU {:.0} % of one core, load generator CPU {:.0} %; backlog at window end {outstanding_at_end} units, drained in {drain_secs:.1} s ({}); sessions lost {lost}; refused batches {}",
            100.0 * hub_cpu / window,
            100.0 * bench_cpu / window,
            if drained { "ok" } else { "NOT drained" },
            stats.refused.load(Ordering::Relaxed)
        );
        println!(
            "    targets: >= {TARGET_LINES_PER_SEC} lines/s {}, >= {TARGET_SAMPLES_PER_SEC} samples/s {}, p99 <= {TARGET_P99_MS} ms {}",
            if lines_ok { "met" } else { "NOT met" },
            if samples_ok { "met" } else { "NOT met" },
            if latency_ok { "met" } else { "NOT met" }
        );
        results.push(json!({
            "lines_per_agent_s": load.lines_per_sec,
            "samples_per_agent_s": load.samples_per_sec,
            "offered_lines_s": offered_lines,
            "offered_samples_s": offered_samples,
            "generated_lines_s": r2(stats.lines_generated.load(Ordering::Relaxed) as f64 / window),
            "generated_samples_s": r2(stats.samples_generated.load(Ordering::Relaxed) as f64 / window),
            "lines_s": r2(lines),
            "samples_s": r2(samples),
            "hub_lines_s": r2(hub_lines),
            "hub_samples_s": r2(hub_samples),
            "hub_batches_s": r2(hub_batches / window),
            "log_ack_ms": { "p50": ms(&log_ack, 0.5), "p90": ms(&log_ack, 0.9), "p99": ms(&log_ack, 0.99), "max": ms(&log_ack, 1.0), "n": log_ack.len() },
            "metric_ack_ms": { "p50": ms(&metric_ack, 0.5), "p90": ms(&metric_ack, 0.9), "p99": ms(&metric_ack, 0.99), "max": ms(&metric_ack, 1.0), "n": metric_ack.len() },
            "all_ack_p50_ms": r2(quantile(&all_ack, 0.5) / 1000.0),
            "all_ack_p99_ms": r2(p99),
            "log_gen_to_ack_ms": { "p50": ms(&log_e2e, 0.5), "p99": ms(&log_e2e, 0.99) },
            "metric_gen_to_ack_ms": { "p50": ms(&metric_e2e, 0.5), "p99": ms(&metric_e2e, 0.99) },
            "hub_cpu_pct": r2(100.0 * hub_cpu / window),
            "bench_cpu_pct": r2(100.0 * bench_cpu / window),
            "backlog_at_end": outstanding_at_end,
            "drain_s": r2(drain_secs),
            "drained": drained,
            "sessions_lost": lost,
            "refused": stats.refused.load(Ordering::Relaxed),
            "lines_target_met": lines_ok,
            "samples_target_met": samples_ok,
            "p99_target_met": latency_ok,
        }));
        if lost > 0 || !drained {
            println!("  stopping the ramp: sessions were lost or the backlog did not drain");
            break;
        }
    }
    let connected_at_end = hub.metrics().await.and_then(|m| m.get("gantry_agents_connected").copied()).unwrap_or(f64::NAN);
    let hub_status = proc_status(hub.pid).ok();
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    for endpoint in &endpoint_list {
        endpoint.close(0u32.into(), b"bench done");
    }
    for endpoint in &endpoint_list {
        let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    }
    hub.stop().await;
    drop(tmp);
    let all_met = results.iter().any(|r| r["lines_target_met"] == true && r["samples_target_met"] == true && r["p99_target_met"] == true);
    if let Some(stall) = &stalled {
        println!("ingest: THE HUB STALLED: {stall}");
    }
    println!(
        "ingest: every target met in one step: {}; hub still had {connected_at_end} agents connected at the end; heartbeats sent {}, acked {}",
        if all_met { "yes" } else { "no" },
        fleet.heartbeats_sent.load(Ordering::Relaxed),
        fleet.heartbeat_acks.load(Ordering::Relaxed)
    );
    Ok(json!({
        "bench": "ingest",
        "date": today(),
        "cores": cores(),
        "agents": agents,
        "endpoints": endpoints,
        "secs": secs,
        "warmup_secs": warmup_secs,
        "line_bytes": LINE_BYTES,
        "line_batch": line_batch,
        "metric_period_secs": metric_period_secs,
        "samples_per_record": SAMPLES_PER_RECORD,
        "enroll_secs": r2(enroll_secs),
        "steps": results,
        "hub_vm_hwm_kib": hub_status.as_ref().and_then(|s| s.get("VmHWM").copied()),
        "targets": { "lines_s": TARGET_LINES_PER_SEC, "samples_s": TARGET_SAMPLES_PER_SEC, "p99_ms": TARGET_P99_MS },
        "all_targets_met_in_a_step": all_met,
        "hub_program": hub_binary_label(),
        "hub_stalled": stalled,
    }))
}

// ---------------------------------------------------------------------------------------
// agent-idle
// ---------------------------------------------------------------------------------------

const IDLE_VARIANTS: [&str; 14] = [
    "no-docker",
    "no-host",
    "no-files",
    "none",
    "only-host",
    "only-docker",
    "only-files",
    "poll1000",
    "files-poll1000",
    "host1s",
    "no-container-logs",
    "discover10s",
    "arena2",
    "trim",
];

/// Collectors, extra configuration and environment of one idle run.
#[derive(Debug)]
struct IdleSetup {
    host: bool,
    docker: bool,
    files: bool,
    host_interval_secs: u64,
    files_poll_ms: Option<u64>,
    /// Lines for the `[docker.logs]` table.
    docker_logs: &'static str,
    env: Vec<(&'static str, &'static str)>,
}

fn idle_setup(variant: &str) -> IdleSetup {
    let all = IdleSetup { host: true, docker: true, files: true, host_interval_secs: 10, files_poll_ms: None, docker_logs: "", env: vec![] };
    match variant {
        "only-host" => IdleSetup { docker: false, files: false, ..all },
        "only-docker" => IdleSetup { host: false, files: false, ..all },
        "only-files" => IdleSetup { host: false, docker: false, ..all },
        "files-poll1000" => IdleSetup { host: false, docker: false, files_poll_ms: Some(1000), ..all },
        "host1s" => IdleSetup { docker: false, files: false, host_interval_secs: 1, ..all },
        "no-docker" => IdleSetup { docker: false, ..all },
        "no-host" => IdleSetup { host: false, ..all },
        "no-files" => IdleSetup { files: false, ..all },
        "none" => IdleSetup { host: false, docker: false, files: false, ..all },
        "poll1000" => IdleSetup { files_poll_ms: Some(1000), ..all },
        "no-container-logs" => IdleSetup { docker_logs: "enabled = false\n", ..all },
        "discover10s" => IdleSetup { docker_logs: "discover_ms = 10000\n", ..all },
        "arena2" => IdleSetup { env: vec![("MALLOC_ARENA_MAX", "2")], ..all },
        "trim" => IdleSetup { env: vec![("MALLOC_ARENA_MAX", "1"), ("MALLOC_TRIM_THRESHOLD_", "0")], ..all },
        _ => all,
    }
}

async fn idle_run(hub: &HubProc, token: &str, root: &Path, variant: &str, secs: u64) -> Result<Value> {
    let setup = idle_setup(variant);
    let (host, docker, files, env) = (setup.host, setup.docker, setup.files, setup.env.clone());
    let dir = root.join(variant);
    std::fs::create_dir_all(&dir)?;
    let agent_dir = enroll_many(token, &dir, 1, 1).await?.remove(0);
    let agent_id = gantry_agent::state::StateDir::new(&agent_dir).load_identity()?.agent_id;
    let log_file = dir.join("idle.log");
    std::fs::write(&log_file, (0..10).map(|n| format!("idle line {n}\n")).collect::<String>())?;
    let paths = if files { format!("[{:?}]", log_file.display().to_string()) } else { "[]".to_string() };
    let poll = setup.files_poll_ms.map(|p| format!("files_poll_ms = {p}\n")).unwrap_or_default();
    let config = dir.join("agent.toml");
    let config_text = format!(
        "state_dir = {:?}\n{poll}files.paths = {paths}\n[host]\nenabled = {host}\ninterval_secs = {}\n[docker]\nenabled = {docker}\n[docker.logs]\n{}",
        agent_dir.display().to_string(),
        setup.host_interval_secs,
        setup.docker_logs
    );
    std::fs::write(&config, &config_text)?;
    let mut agent = AgentProc::start(&config, &dir.join("agent.log"), &env)?;
    let pid = agent.pid;
    let online = wait_until(Duration::from_secs(30), Duration::from_millis(200), "agent online", || async {
        hub.get(&format!("/api/v1/agents/{agent_id}")).await.filter(|a| a["status"] == "online").map(|_| ())
    })
    .await;
    if let Err(error) = online {
        bail!("{error}; agent log:\n{}", agent.log_text());
    }
    let rss_online = rss_kib(pid)?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cpu0 = cpu_secs(&pid.to_string())?;
    let sched0 = schedstat_secs(pid);
    let threads0 = thread_cpu(pid);
    let started = Instant::now();
    let samples_n = 10u32;
    let every = Duration::from_secs_f64(secs as f64 / samples_n as f64);
    let mut rss = Vec::new();
    for _ in 0..samples_n {
        tokio::time::sleep(every).await;
        rss.push(rss_kib(pid)? as f64);
    }
    let window = started.elapsed().as_secs_f64();
    let cpu = cpu_secs(&pid.to_string())? - cpu0;
    let sched = schedstat_secs(pid) - sched0;
    let per_thread = thread_cpu_delta(&threads0, &thread_cpu(pid), window);
    anyhow::ensure!(agent.alive(), "the agent exited during the idle window; its log:\n{}", agent.log_text());
    let status = proc_status(pid)?;
    let threads = thread_names(pid);
    let (by_mapping, anon) = smaps_by_mapping(pid);
    let still_online = hub.get(&format!("/api/v1/agents/{agent_id}")).await.map(|a| a["status"] == "online").unwrap_or(false);
    let warnings: Vec<String> = agent.log_text().lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).take(5).map(str::to_string).collect();
    agent.kill().await;
    let rss_mib = median(&rss) / 1024.0;
    // Least-squares slope of the RSS samples, KiB per minute.
    let n = rss.len() as f64;
    let xs: Vec<f64> = (0..rss.len()).map(|i| (i + 1) as f64 * every.as_secs_f64() / 60.0).collect();
    let (mx, my) = (xs.iter().sum::<f64>() / n, rss.iter().sum::<f64>() / n);
    let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    let slope = if sxx > 0.0 { xs.iter().zip(&rss).map(|(x, y)| (x - mx) * (y - my)).sum::<f64>() / sxx } else { 0.0 };
    let cpu_pct = 100.0 * cpu / window;
    let sched_pct = 100.0 * sched / window;
    let mut top: Vec<(&String, &u64)> = by_mapping.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1));
    println!(
        "  [{variant}] host={host} (every {} s) docker={docker} files={files} files_poll_ms={:?} docker.logs={:?} env={env:?}: RSS median {rss_mib:.2} MiB, growing {slope:.0} KiB/min (online {:.2}, samples {:?} KiB), RssAnon {} KiB, RssFile {} KiB, VmHWM {} KiB; CPU {cpu_pct:.3} % of a core ({cpu:.2} s ticks; schedstat {sched_pct:.3} %) over {window:.0} s; threads {:?}; still online {still_online}",
        setup.host_interval_secs,
        setup.files_poll_ms,
        setup.docker_logs.trim(),
        rss_online as f64 / 1024.0,
        rss.iter().map(|v| *v as u64).collect::<Vec<_>>(),
        status["RssAnon"],
        status["RssFile"],
        status["VmHWM"],
        threads
    );
    println!("      CPU by thread (% of a core): {per_thread:?}");
    println!(
        "      resident by mapping (KiB): {}; largest nameless mappings (size KiB, rss KiB): {anon:?}",
        top.iter().take(8).map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
    );
    for w in &warnings {
        println!("      agent log: {w}");
    }
    Ok(json!({
        "variant": variant,
        "host": host,
        "docker": docker,
        "files": files,
        "env": env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "agent_config": config_text,
        "secs": r2(window),
        "rss_mib": r2(rss_mib),
        "rss_samples_kib": rss,
        "rss_growth_kib_per_min": r2(slope),
        "rss_online_kib": rss_online,
        "rss_anon_kib": status["RssAnon"],
        "rss_file_kib": status["RssFile"],
        "vm_hwm_kib": status["VmHWM"],
        "threads": threads,
        "cpu_s": cpu,
        "cpu_pct": r3(cpu_pct),
        "schedstat_cpu_pct": r3(sched_pct),
        "cpu_pct_by_thread": per_thread,
        "resident_by_mapping_kib": top.iter().take(12).map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
        "largest_anon_mappings_kib": anon,
        "still_online": still_online,
        "rss_target_met": rss_mib <= TARGET_IDLE_RSS_MIB,
        "cpu_target_met": cpu_pct <= TARGET_IDLE_CPU_PCT,
    }))
}

/// A container for the Docker collectors to see, removed on drop.
#[derive(Debug)]
struct Container(String);

impl Container {
    fn start(image: &str) -> Result<Container> {
        let out = std::process::Command::new("docker")
            .args(["run", "-d", "--rm", "--label", "gantry-bench=1", image, "sleep", "900"])
            .output()
            .context("running docker")?;
        anyhow::ensure!(out.status.success(), "docker run failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(Container(String::from_utf8_lossy(&out.stdout).trim().to_string()))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

/// Containers Docker runs right now, or why that is unknown.
fn docker_running() -> String {
    match std::process::Command::new("docker").args(["ps", "-q"]).output() {
        Ok(out) if out.status.success() => format!("{} running", String::from_utf8_lossy(&out.stdout).lines().count()),
        Ok(out) => format!("docker ps failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(error) => format!("no docker command: {error}"),
    }
}

async fn agent_idle(secs: u64, variants: Vec<String>, variant_secs: u64, container: Option<String>) -> Result<Value> {
    let tmp = TempDir::new("bench-agent-idle");
    let _container = container.as_deref().map(Container::start).transpose()?;
    let docker = docker_running();
    println!(
        "agent-idle: real agent process, every collector on (host every 10 s, Docker, one tailed file without writes); hub as its own process; 10 s warm-up after online, then {secs} s measured; Docker containers: {docker}; {} cores",
        cores()
    );
    println!("  agent program: {}; hub program: {}", agent_binary_label(), hub_binary_label());
    let hub = HubProc::start(&tmp.path().join("hub")).await?;
    let token = hub.org_and_token(1 + variants.len()).await?;
    let base = idle_run(&hub, &token, tmp.path(), "all", secs).await?;
    let mut others = Vec::new();
    for variant in &variants {
        others.push(idle_run(&hub, &token, tmp.path(), variant, variant_secs).await?);
    }
    hub.stop().await;
    drop(_container);
    drop(tmp);
    let rss = base["rss_mib"].as_f64().unwrap_or(f64::NAN);
    let cpu = base["cpu_pct"].as_f64().unwrap_or(f64::NAN);
    println!(
        "agent idle, all collectors: RSS {rss:.2} MiB (target <= {TARGET_IDLE_RSS_MIB}: {}), CPU {cpu:.3} % of a core (target <= {TARGET_IDLE_CPU_PCT}: {})",
        if rss <= TARGET_IDLE_RSS_MIB { "met" } else { "NOT met" },
        if cpu <= TARGET_IDLE_CPU_PCT { "met" } else { "NOT met" }
    );
    for v in &others {
        println!(
            "  variant {}: RSS {} MiB ({:+.2} vs all), CPU {} %",
            v["variant"].as_str().unwrap_or(""),
            v["rss_mib"],
            v["rss_mib"].as_f64().unwrap_or(f64::NAN) - rss,
            v["cpu_pct"]
        );
    }
    Ok(json!({
        "bench": "agent-idle",
        "date": today(),
        "cores": cores(),
        "docker_containers": docker,
        "agent_program": agent_binary_label(),
        "container_image": container,
        "secs": secs,
        "all": base,
        "variants": others,
        "target_rss_mib": TARGET_IDLE_RSS_MIB,
        "target_cpu_pct": TARGET_IDLE_CPU_PCT,
        "rss_target_met": rss <= TARGET_IDLE_RSS_MIB,
        "cpu_target_met": cpu <= TARGET_IDLE_CPU_PCT,
    }))
}
