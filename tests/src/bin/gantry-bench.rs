//! `gantry-bench`: rerunnable benchmarks of a real hub and real agents on loopback.
//!
//! ```text
//! gantry-bench handshakes  [--secs N] [--rounds R] [--concurrency C]
//! gantry-bench idle-memory [--agents N] [--idle-secs S] [--telemetry-streams K]
//!                          [--hold-secs S] [--hub-env KEY=VALUE]... [--hub-config FILE]
//! gantry-bench agent-rss   [--secs N] [--env KEY=VALUE]...
//! ```
//!
//! Each subcommand prints a human summary and, as its last line, one JSON object with the
//! figures. Everything binds loopback only, is bounded in time, stops by itself and removes
//! its temporary directories. Build in release: `cargo build --release -p gantry-tests --features bench --bins`
//! (`idle-memory` and `agent-rss` run `gantry-e2e-hub` / `gantry-e2e-agent` from the same
//! directory as this binary).

use anyhow::{bail, Context, Result};
use gantry_agent::wire::{FramedRecv, FramedSend};
use gantry_shared::frame::DEFAULT_MAX_FRAME_BYTES;
use gantry_shared::message::{AgentMessage, Heartbeat, HostFacts, HubMessage};
use gantry_shared::telemetry::{StreamDown, StreamUp};
use gantry_tests::bench::{dial_session, enroll_many, median, r2, sibling_binary, today, AgentCreds};
use gantry_tests::{Api, TempDir, TestHub};
use rustls::pki_types::{PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const USAGE: &str = "usage:
  gantry-bench handshakes  [--secs N (5)] [--rounds R (5)] [--concurrency C (4)]
  gantry-bench idle-memory [--agents N (1000)] [--idle-secs S (20)] [--telemetry-streams K (4, like the agent)]
                           [--hold-secs S (0)] [--hub-env KEY=VALUE]... [--hub-config FILE]
  gantry-bench agent-rss   [--secs N (30)] [--env KEY=VALUE]...";

/// Target for hub memory per idle agent connection.
const TARGET_HUB_KIB_PER_AGENT: f64 = 64.0;
/// Target for the agent's resident memory when idle.
const TARGET_AGENT_RSS_MIB: f64 = 12.0;

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
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command.as_str() {
            "handshakes" => {
                flags.only(&["secs", "rounds", "concurrency"])?;
                handshakes(flags.num("secs", 5)?, flags.num("rounds", 5)? as usize, flags.num("concurrency", 4)? as usize).await
            }
            "idle-memory" => {
                flags.only(&["agents", "idle-secs", "telemetry-streams", "hold-secs", "hub-env", "hub-config"])?;
                let classes = gantry_agent::telemetry::CLASSES.len() as u64;
                idle_memory(IdleOptions {
                    agents: flags.num("agents", 1000)? as usize,
                    idle_secs: flags.num("idle-secs", 20)?,
                    telemetry_streams: flags.num0("telemetry-streams", classes)?.min(classes) as usize,
                    hold_secs: flags.num0("hold-secs", 0)?,
                    hub_env: key_values(&flags.all("hub-env"))?,
                    hub_config: flags.all("hub-config").pop().map(PathBuf::from),
                })
                .await
            }
            "agent-rss" => {
                flags.only(&["secs", "env"])?;
                agent_rss(flags.num("secs", 30)?, key_values(&flags.all("env"))?).await
            }
            other => bail!("unknown subcommand {other:?}"),
        }
    });
    // Don't wait for stray client tasks (closing endpoints) beyond a moment.
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

/// `--name value` pairs; a name may repeat.
#[derive(Debug)]
struct Flags(Vec<(String, String)>);

impl Flags {
    fn parse(args: &[String]) -> Result<Flags> {
        let mut out = Vec::new();
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            let name = arg.strip_prefix("--").with_context(|| format!("unexpected argument {arg:?}"))?;
            let (name, value) = match name.split_once('=') {
                Some((n, v)) if !n.ends_with("env") => (n.to_string(), v.to_string()),
                _ => (name.to_string(), iter.next().with_context(|| format!("--{name} needs a value"))?.clone()),
            };
            out.push((name, value));
        }
        Ok(Flags(out))
    }

    fn only(&self, allowed: &[&str]) -> Result<()> {
        match self.0.iter().find(|(n, _)| !allowed.contains(&n.as_str())) {
            Some((name, _)) => bail!("unknown flag --{name}"),
            None => Ok(()),
        }
    }

    fn num(&self, name: &str, default: u64) -> Result<u64> {
        match self.0.iter().rev().find(|(n, _)| n == name) {
            Some((_, v)) => {
                let n: u64 = v.parse().with_context(|| format!("--{name} {v:?} is not a number"))?;
                anyhow::ensure!(n > 0, "--{name} must be at least 1");
                Ok(n)
            }
            None => Ok(default),
        }
    }

    /// Like [`Flags::num`], but 0 is allowed.
    fn num0(&self, name: &str, default: u64) -> Result<u64> {
        match self.0.iter().rev().find(|(n, _)| n == name) {
            Some((_, v)) => v.parse().with_context(|| format!("--{name} {v:?} is not a number")),
            None => Ok(default),
        }
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.0.iter().filter(|(n, _)| n == name).map(|(_, v)| v.clone()).collect()
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

/// `KEY=VALUE` strings as pairs.
fn key_values(items: &[String]) -> Result<Vec<(String, String)>> {
    items.iter().map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).with_context(|| format!("{kv:?} must be KEY=VALUE"))).collect()
}

/// Figures from `/proc/PID/status`, in KiB (`VmRSS`, `RssAnon`, `RssFile`, `VmHWM`) and
/// `Threads`.
fn proc_status(pid: u32) -> Result<HashMap<String, u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}/status"))?;
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        if ["VmRSS", "RssAnon", "RssFile", "VmHWM", "Threads"].contains(&key) {
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

/// Median VmRSS (KiB) of `samples` readings `every` apart.
async fn sample_rss(pid: u32, samples: usize, every: Duration) -> Result<(f64, Vec<u64>)> {
    let mut all = Vec::new();
    for i in 0..samples {
        if i > 0 {
            tokio::time::sleep(every).await;
        }
        all.push(rss_kib(pid)?);
    }
    let med = median(&all.iter().map(|&v| v as f64).collect::<Vec<_>>());
    Ok((med, all))
}

/// CPU time (user + system) this process used so far, in seconds, from `/proc/self/stat`
/// (clock ticks of 1/100 s, the Linux default `CLK_TCK`).
fn process_cpu_secs() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = text.rsplit_once(')').context("malformed /proc/self/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> { Ok(fields.get(i).context("short /proc/self/stat")?.parse::<f64>()?) };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// Soft limit on open files, from `/proc/self/limits`.
fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Poll `check` every 100 ms until it yields, failing after `limit`.
async fn wait_until<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// handshakes
// ---------------------------------------------------------------------------------------

async fn handshakes(secs: u64, rounds: usize, concurrency: usize) -> Result<Value> {
    let tmp = TempDir::new("bench-handshakes");
    let hub = TestHub::start(&tmp.path().join("hub"), |_| {}).await;
    hub.create_org("bench", 100_000).await;
    // One agent per loop: connections of the same agent supersede each other.
    let token = hub.token("bench", concurrency as u32, "1h").await;
    let dirs = enroll_many(&token, tmp.path(), concurrency, 8).await?;
    let creds: Vec<Arc<AgentCreds>> = dirs.iter().map(|d| AgentCreds::load(d).map(Arc::new)).collect::<Result<_>>()?;
    let facts = Arc::new(gantry_agent::facts::collect());
    let remote = hub.quic;
    let (tls_client, tls_server) = baseline_configs()?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);

    println!("handshakes: {rounds} rounds x {secs} s, {concurrency} concurrent agent loops, {cores} cores");
    println!("  gantry = QUIC+mTLS handshake + control stream + hello/welcome + close against an in-process hub");
    println!("  rustls = in-memory TLS 1.3 mutual-auth handshake (ECDSA P-256, ring), both sides in this process");
    println!("  per CPU-s = handshakes per second of this process's CPU time (user+sys), robust to a shared machine");
    let (mut gantry_rates, mut rustls_1, mut rustls_c) = (Vec::new(), Vec::new(), Vec::new());
    let (mut gantry_cpu, mut rustls_cpu, mut round_ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut errors_total = 0u64;
    let metrics = &hub.hub.metrics;
    let length = Duration::from_secs(secs);
    for round in 1..=rounds {
        let retries_before = metrics.quic_retries_sent.load(Ordering::Relaxed);
        let cpu_before = process_cpu_secs()?;
        let (rate, count, errors, first_error) = gantry_round(&creds, &facts, remote, concurrency, length).await?;
        let g_cpu = count as f64 / (process_cpu_secs()? - cpu_before);
        let retries = metrics.quic_retries_sent.load(Ordering::Relaxed) - retries_before;
        errors_total += errors;
        // Let the hub finish the closed sessions before the CPU-bound baseline runs.
        let _ = wait_until(Duration::from_secs(10), "hub sessions to end", || async { hub.hub.registry.is_empty().then_some(()) }).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cpu_before = process_cpu_secs()?;
        let (r1, n1) = rustls_round(&tls_client, &tls_server, 1, length).await?;
        let r_cpu = n1 as f64 / (process_cpu_secs()? - cpu_before);
        let (rc, _) = rustls_round(&tls_client, &tls_server, concurrency, length).await?;
        println!(
            "  round {round}: gantry {rate:7.1}/s {g_cpu:7.1}/CPU-s (errors {errors}, QUIC retries {retries}) | rustls x1 {r1:7.1}/s {r_cpu:7.1}/CPU-s | rustls x{concurrency} {rc:7.1}/s"
        );
        if let Some(error) = first_error {
            println!("    first error: {error}");
        }
        gantry_rates.push(rate);
        rustls_1.push(r1);
        rustls_c.push(rc);
        gantry_cpu.push(g_cpu);
        rustls_cpu.push(r_cpu);
        round_ratios.push(rate / rc);
    }
    let (g, b1, bc) = (median(&gantry_rates), median(&rustls_1), median(&rustls_c));
    let (gc, rcpu) = (median(&gantry_cpu), median(&rustls_cpu));
    let round_ratio = median(&round_ratios);
    println!("median handshakes/s (wall): gantry {g:.1}, rustls x1 thread {b1:.1}, rustls x{concurrency} threads {bc:.1}");
    println!("median handshakes per CPU-second: gantry {gc:.1}, rustls {rcpu:.1}");
    println!(
        "ratio gantry/rustls: {:.3} per CPU-second (cost ratio); {:.3} wall vs x{concurrency} threads (median of per-round ratios {round_ratio:.3}); {:.3} wall vs one thread",
        gc / rcpu,
        g / bc,
        g / b1
    );
    let sessions = metrics.sessions_started.load(Ordering::Relaxed);
    hub.stop().await;
    drop(tmp);
    let list = |v: &[f64]| v.iter().map(|&r| r2(r)).collect::<Vec<_>>();
    let ratio = |x: f64| (x * 1000.0).round() / 1000.0;
    Ok(json!({
        "bench": "handshakes",
        "date": today(),
        "cores": cores,
        "secs": secs,
        "rounds": rounds,
        "concurrency": concurrency,
        "gantry_per_sec": list(&gantry_rates),
        "gantry_per_cpu_sec": list(&gantry_cpu),
        "rustls_1_per_sec": list(&rustls_1),
        "rustls_1_per_cpu_sec": list(&rustls_cpu),
        "rustls_c_per_sec": list(&rustls_c),
        "gantry_median": r2(g),
        "rustls_1_median": r2(b1),
        "rustls_c_median": r2(bc),
        "gantry_per_cpu_sec_median": r2(gc),
        "rustls_per_cpu_sec_median": r2(rcpu),
        "ratio_per_cpu_sec": ratio(gc / rcpu),
        "ratio_vs_rustls_c": ratio(g / bc),
        "ratio_vs_rustls_c_round_median": ratio(round_ratio),
        "ratio_vs_rustls_1": ratio(g / b1),
        "errors": errors_total,
        "hub_sessions_started": sessions,
    }))
}

/// `concurrency` loops of full agent reconnects for `length`; successes per second, their
/// count, the error count and the first error.
async fn gantry_round(
    creds: &[Arc<AgentCreds>],
    facts: &Arc<HostFacts>,
    remote: SocketAddr,
    concurrency: usize,
    length: Duration,
) -> Result<(f64, u64, u64, Option<String>)> {
    let ok = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + length;
    let mut tasks = tokio::task::JoinSet::new();
    for creds in &creds[..concurrency.min(creds.len())] {
        let (creds, facts, ok) = (creds.clone(), facts.clone(), ok.clone());
        let endpoint = gantry_agent::connection::client_endpoint(remote)?;
        tasks.spawn(async move {
            let mut errors = 0u64;
            let mut first_error = None;
            while Instant::now() < deadline {
                let attempt = async {
                    let config = creds.client_config()?;
                    let (connection, _send, _recv) = dial_session(&endpoint, config, remote, &facts, Duration::from_secs(10)).await?;
                    connection.close(0u32.into(), b"bench");
                    anyhow::Ok(())
                };
                match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                    Ok(Ok(())) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(error)) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{error:#}"));
                    }
                    Err(_) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| "attempt timed out after 10 s".to_string());
                    }
                }
            }
            let finished = Instant::now();
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
            (errors, first_error, finished)
        });
    }
    let mut errors = 0;
    let mut first_error = None;
    let mut last_finished = deadline;
    while let Some(joined) = tasks.join_next().await {
        let (e, first, finished) = joined.context("handshake loop panicked")?;
        // The rate counts attempts up to the last one's end, not the endpoint shutdown.
        last_finished = last_finished.max(finished);
        errors += e;
        if first_error.is_none() {
            first_error = first;
        }
    }
    let elapsed = last_finished - started;
    let ok = ok.load(Ordering::Relaxed);
    Ok((ok as f64 / elapsed.as_secs_f64(), ok, errors, first_error))
}

/// A CA, a server certificate and a client certificate like the hub's (ECDSA P-256, leaf +
/// CA chains), and TLS 1.3-only configs with the same ring provider and ALPN. Client
/// resumption is off: every handshake is a full one, as for an agent reconnect (the agent
/// builds a fresh client config per attempt).
fn baseline_configs() -> Result<(Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    let ca_key = KeyPair::generate_for(alg)?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.push(DnType::CommonName, "Bench CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate_for(alg)?;
    let mut params = CertificateParams::new(vec![gantry_shared::HUB_SERVER_NAME.to_string()])?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = params.signed_by(&server_key, &issuer)?;

    let client_key = KeyPair::generate_for(alg)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "agent");
    params.subject_alt_names = vec![rcgen::SanType::URI("gantry://agent/bench/agent".try_into()?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = params.signed_by(&client_key, &issuer)?;

    let provider = gantry_agent::tls::provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone())?;
    let roots = Arc::new(roots);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server_cert.der().clone(), ca_cert.der().clone()], PrivateKeyDer::Pkcs8(server_key.serialize_der().into()))?;
    server.alpn_protocols = vec![gantry_shared::ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![client_cert.der().clone(), ca_cert.der().clone()], PrivateKeyDer::Pkcs8(client_key.serialize_der().into()))?;
    client.alpn_protocols = vec![gantry_shared::ALPN.to_vec()];
    client.resumption = rustls::client::Resumption::disabled();
    Ok((Arc::new(client), Arc::new(server)))
}

/// Move everything `from` wants to send into `to`; bytes moved.
fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection, buf: &mut Vec<u8>) -> Result<usize> {
    buf.clear();
    while from.wants_write() {
        from.write_tls(buf)?;
    }
    let mut rest = &buf[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest)?;
        to.process_new_packets()?;
    }
    Ok(buf.len())
}

/// One complete handshake in memory, including the server's session tickets.
fn tls_handshake(client: &Arc<rustls::ClientConfig>, server: &Arc<rustls::ServerConfig>, buf: &mut Vec<u8>) -> Result<()> {
    let name = ServerName::try_from(gantry_shared::HUB_SERVER_NAME)?;
    let mut c = rustls::Connection::Client(rustls::ClientConnection::new(client.clone(), name)?);
    let mut s = rustls::Connection::Server(rustls::ServerConnection::new(server.clone())?);
    for _ in 0..16 {
        let moved = pump(&mut c, &mut s, buf)? + pump(&mut s, &mut c, buf)?;
        if moved == 0 && !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
    }
    bail!("in-memory handshake did not finish")
}

/// `threads` OS threads doing in-memory handshakes for `length`; handshakes per second and
/// their count.
async fn rustls_round(client: &Arc<rustls::ClientConfig>, server: &Arc<rustls::ServerConfig>, threads: usize, length: Duration) -> Result<(f64, u64)> {
    let (client, server) = (client.clone(), server.clone());
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let deadline = started + length;
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (client, server) = (client.clone(), server.clone());
                std::thread::spawn(move || -> Result<u64> {
                    let mut buf = Vec::with_capacity(16 * 1024);
                    let mut n = 0;
                    while Instant::now() < deadline {
                        tls_handshake(&client, &server, &mut buf)?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        let mut total = 0;
        for handle in handles {
            total += handle.join().map_err(|_| anyhow::anyhow!("handshake thread panicked"))??;
        }
        Ok((total as f64 / started.elapsed().as_secs_f64(), total))
    })
    .await?
}

// ---------------------------------------------------------------------------------------
// idle-memory
// ---------------------------------------------------------------------------------------

/// A hub running as its own process (`gantry-e2e-hub serve`), killed on drop.
#[derive(Debug)]
struct HubProcess {
    child: tokio::process::Child,
    pid: u32,
    api: Api,
    quic: SocketAddr,
    log: PathBuf,
}

impl HubProcess {
    /// `gantry-e2e-hub init` a data directory for a hub on fresh loopback ports; the
    /// operator key and the HTTP and QUIC addresses to serve on.
    async fn init(data: &Path) -> Result<(String, SocketAddr, SocketAddr)> {
        let bin = sibling_binary("gantry-e2e-hub")?;
        let http: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()?).parse()?;
        let quic: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
        let password = format!("bench-{:016x}", rand::random::<u64>());
        let init = tokio::process::Command::new(&bin)
            .args(["init", "--data"])
            .arg(data)
            .args(["--public-addr", &quic.to_string()])
            .env("GANTRY_ADMIN_PASSWORD", &password)
            .env("GANTRY_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let init = tokio::time::timeout(Duration::from_secs(60), init).await.context("hub init timed out")??;
        anyhow::ensure!(init.status.success(), "hub init failed: {}", String::from_utf8_lossy(&init.stderr));
        let key = std::fs::read_to_string(data.join("operator.key")).context("reading operator.key")?.trim().to_string();
        Ok((key, http, quic))
    }

    /// `gantry-e2e-hub serve` on `data`; returns once `/readyz` answers.
    async fn serve(
        data: &Path,
        key: &str,
        http: SocketAddr,
        quic: SocketAddr,
        log: &Path,
        env: &[(String, String)],
        config: Option<&Path>,
    ) -> Result<HubProcess> {
        let bin = sibling_binary("gantry-e2e-hub")?;
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut command = tokio::process::Command::new(&bin);
        if let Some(config) = config {
            command.arg("serve").arg("--config").arg(config);
        } else {
            command.arg("serve");
        }
        let child = command
            .envs(env.iter().map(|(k, v)| (k, v)))
            .arg("--data")
            .arg(data)
            .args(["--http", &http.to_string(), "--quic", &quic.to_string()])
            .env("GANTRY_LOG", std::env::var("GANTRY_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .context("starting the hub")?;
        let pid = child.id().context("hub exited at once")?;
        let api = Api { base: format!("http://{http}"), bearer: Some(key.to_string()), cookie: None };
        let process = HubProcess { child, pid, api, quic, log: log.to_path_buf() };
        let ready = wait_until(Duration::from_secs(30), "hub /readyz", || async { (process.api.get_status("/readyz").await == 200).then_some(()) }).await;
        if let Err(error) = ready {
            bail!("{error}; hub log:\n{}", process.log_text());
        }
        Ok(process)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let (status, _, body) = self.api.send("GET", "/metrics", None, Vec::new()).await;
        if status != 200 {
            return None;
        }
        body.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
    }

    /// SIGTERM (graceful: drains, flushes the store), then SIGKILL after 15 s.
    async fn stop(mut self) {
        let term = std::process::Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        if term.map(|s| s.success()).unwrap_or(false) && tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await.is_ok() {
            return;
        }
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// Per-agent counters of the simulated fleet.
#[derive(Debug, Default)]
struct FleetStats {
    established: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    heartbeats_sent: AtomicU64,
    acks: AtomicU64,
    lost: AtomicU64,
}

/// What every simulated agent shares.
#[derive(Debug, Clone)]
struct Fleet {
    /// One client endpoint (one UDP socket) for the whole fleet.
    endpoint: quinn::Endpoint,
    remote: SocketAddr,
    facts: Arc<HostFacts>,
    /// Bounds the handshakes in flight.
    handshake_slots: Arc<tokio::sync::Semaphore>,
    stats: Arc<FleetStats>,
    telemetry_streams: usize,
    stop: watch::Receiver<bool>,
}

/// A lightweight agent: one session, `telemetry_streams` idle telemetry streams, heartbeats
/// every 5 s (first one at a random offset so the fleet does not beat in step), acks read,
/// until `stop`.
async fn simulated_agent(fleet: Fleet, creds: AgentCreds) {
    const INTERVAL: Duration = Duration::from_secs(5);
    let Fleet { endpoint, remote, facts, handshake_slots, stats, telemetry_streams, mut stop } = fleet;
    let permit = handshake_slots.acquire_owned().await;
    let mut session = None;
    for attempt in 1..=3 {
        let dial = async {
            let config = creds.client_config()?;
            dial_session(&endpoint, config, remote, &facts, Duration::from_secs(20)).await
        };
        match dial.await {
            Ok(established) => {
                session = Some(established);
                break;
            }
            Err(error) => eprintln!("  agent connection attempt {attempt} failed: {error:#}"),
        }
        stats.retried.fetch_add(1, Ordering::Relaxed);
    }
    let Some((connection, mut send, mut recv)) = session else {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    drop(permit);
    drop(creds);
    // Like the real agent after the welcome: one long-lived stream per telemetry class,
    // opened with `Open`, answered by the hub's first ack (its high-water mark).
    let mut streams = Vec::new();
    for &class in gantry_agent::telemetry::CLASSES.iter().take(telemetry_streams) {
        let open = async {
            let (send, recv) = connection.open_bi().await?;
            let mut send = FramedSend::new(send, DEFAULT_MAX_FRAME_BYTES);
            let mut recv = FramedRecv::new(recv, DEFAULT_MAX_FRAME_BYTES);
            send.send(&StreamUp::Open { class }).await?;
            match recv.next::<StreamDown>().await? {
                Some(StreamDown::Ack(_)) => anyhow::Ok((send, recv)),
                other => bail!("expected the first ack of the {class:?} stream, got {other:?}"),
            }
        };
        match tokio::time::timeout(Duration::from_secs(20), open).await {
            Ok(Ok(stream)) => streams.push(stream),
            Ok(Err(error)) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("  agent could not open its {class:?} telemetry stream: {error:#}");
                return;
            }
            Err(_) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("  agent's {class:?} telemetry stream got no first ack within 20 s");
                return;
            }
        }
    }
    stats.established.fetch_add(1, Ordering::Relaxed);
    let offset = Duration::from_millis(rand::random::<u64>() % INTERVAL.as_millis() as u64);
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + offset, INTERVAL);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = beat.tick() => {
                seq += 1;
                let message = AgentMessage::Heartbeat(Heartbeat { seq, agent_clock_unix_ms: gantry_agent::wall_ms() });
                if send.send(&message).await.is_err() {
                    stats.lost.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                stats.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
            }
            message = recv.next::<HubMessage>() => match message {
                Ok(Some(HubMessage::HeartbeatAck(_))) => {
                    stats.acks.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    stats.lost.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                connection.close(0u32.into(), b"bench done");
                return;
            }
        }
    }
}

#[derive(Debug)]
struct IdleOptions {
    agents: usize,
    idle_secs: u64,
    telemetry_streams: usize,
    hold_secs: u64,
    hub_env: Vec<(String, String)>,
    hub_config: Option<PathBuf>,
}

async fn idle_memory(options: IdleOptions) -> Result<Value> {
    let IdleOptions { agents, idle_secs, telemetry_streams, hold_secs, hub_env, hub_config } = options;
    let tmp = TempDir::new("bench-idle");
    let limit = open_files_limit();
    println!(
        "idle-memory: {agents} simulated agents on one shared QUIC endpoint, each with the control stream and {telemetry_streams} telemetry streams; open-files soft limit {limit:?}; hub env {hub_env:?}"
    );
    if let Some(limit) = limit {
        if (limit as usize) < 64 {
            bail!("open-files soft limit {limit} is too low even for one shared endpoint; raise it with `ulimit -n`");
        }
    }
    let data = tmp.path().join("hub");
    let log = tmp.path().join("hub.log");
    let (key, http, quic) = HubProcess::init(&data).await?;

    // Phase 1: enroll the fleet, then stop the hub, so the measured hub starts clean
    // (no heap left over from enrollment connections, store loaded from disk).
    let hub = HubProcess::serve(&data, &key, http, quic, &log, &[], None).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_fresh, _) = sample_rss(hub.pid, 3, Duration::from_millis(500)).await?;
    let (status, body) = hub.api.post("/api/v1/orgs", &json!({ "id": "bench", "agent_limit": 100_000 })).await;
    anyhow::ensure!(status == 201, "creating the org: {status} {body}");
    let (status, body) = hub.api.post("/api/v1/orgs/bench/enrollment-tokens", &json!({ "uses": agents, "ttl": "1h" })).await;
    anyhow::ensure!(status == 201, "creating a token: {status} {body}");
    let token = body["token"].as_str().context("token reply has no token")?.to_string();
    let enroll_started = Instant::now();
    let dirs = enroll_many(&token, &tmp.path().join("agents"), agents, 16).await?;
    let enroll_secs = enroll_started.elapsed().as_secs_f64();
    let rss_after_enroll = rss_kib(hub.pid)?;
    println!(
        "  enrolled {agents} agents in {enroll_secs:.1} s; that hub went from {:.1} to {:.1} MiB; restarting it",
        rss_fresh / 1024.0,
        rss_after_enroll as f64 / 1024.0
    );
    hub.stop().await;

    // Phase 2: a fresh hub process on the same data and ports.
    let hub = HubProcess::serve(&data, &key, http, quic, &log, &hub_env, hub_config.as_deref()).await?;
    println!("  hub pid {} serving QUIC on {}", hub.pid, hub.quic);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss_base, base_samples) = sample_rss(hub.pid, 5, Duration::from_millis(500)).await?;
    println!("  baseline hub RSS {:.1} MiB (samples KiB {base_samples:?})", rss_base / 1024.0);
    if hold_secs > 0 {
        println!("  holding {hold_secs} s before connecting (attach a profiler to pid {} now)", hub.pid);
        tokio::time::sleep(Duration::from_secs(hold_secs)).await;
    }

    let endpoint = gantry_agent::connection::client_endpoint(hub.quic)?;
    let stats = Arc::new(FleetStats::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let fleet = Fleet {
        endpoint: endpoint.clone(),
        remote: hub.quic,
        facts: Arc::new(gantry_agent::facts::collect()),
        handshake_slots: Arc::new(tokio::sync::Semaphore::new(32)),
        stats: stats.clone(),
        telemetry_streams,
        stop: stop_rx,
    };
    let mut tasks = tokio::task::JoinSet::new();
    let connect_started = Instant::now();
    for dir in &dirs {
        let creds = AgentCreds::load(dir)?;
        tasks.spawn(simulated_agent(fleet.clone(), creds));
    }
    let connected = wait_until(Duration::from_secs(180), "all agents connected", || async {
        let n = hub.metric("gantry_agents_connected").await.unwrap_or(0.0) as usize;
        let ready = stats.established.load(Ordering::Relaxed) as usize;
        let failed = stats.failed.load(Ordering::Relaxed) as usize;
        ((n >= agents && ready >= agents) || (failed > 0 && ready + failed >= agents)).then_some(n.min(ready))
    })
    .await;
    let connected = match connected {
        Ok(n) => n,
        Err(error) => bail!("{error}; hub log:\n{}", hub.log_text()),
    };
    anyhow::ensure!(connected == agents, "only {connected} of {agents} agents connected");
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let rss_connected = rss_kib(hub.pid)?;
    println!("  {agents} agents connected in {connect_secs:.1} s; hub RSS {:.1} MiB; idling {idle_secs} s", rss_connected as f64 / 1024.0);
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let (rss_idle, samples) = sample_rss(hub.pid, 7, Duration::from_secs(1)).await?;
    let status = proc_status(hub.pid)?;
    let still = hub.metric("gantry_agents_connected").await.unwrap_or(0.0) as usize;
    let heartbeats = hub.metric("gantry_heartbeats_total").await.unwrap_or(0.0);
    let retries = hub.metric("gantry_quic_retries_total").await.unwrap_or(0.0);

    let per_agent = (rss_idle - rss_base) / agents as f64;
    println!(
        "  hub RSS samples (KiB): {samples:?}; RssAnon {} KiB, RssFile {} KiB, VmHWM {} KiB, threads {}",
        status["RssAnon"], status["RssFile"], status["VmHWM"], status["Threads"]
    );
    println!(
        "  still connected {still}/{agents}; heartbeats {} sent, {} acked, hub counted {heartbeats}; lost sessions {}; QUIC retries sent by the hub {retries}",
        stats.heartbeats_sent.load(Ordering::Relaxed),
        stats.acks.load(Ordering::Relaxed),
        stats.lost.load(Ordering::Relaxed)
    );
    let met = per_agent <= TARGET_HUB_KIB_PER_AGENT;
    println!(
        "hub memory per idle agent connection: {per_agent:.1} KiB ({:.1} -> {:.1} MiB for {agents}); target <= {TARGET_HUB_KIB_PER_AGENT} KiB: {}",
        rss_base / 1024.0,
        rss_idle / 1024.0,
        if met { "met" } else { "NOT met" }
    );

    let _ = stop_tx.send(true);
    drop(fleet);
    let _ = tokio::time::timeout(Duration::from_secs(10), async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    endpoint.close(0u32.into(), b"bench done");
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    hub.stop().await;
    drop(tmp);
    Ok(json!({
        "bench": "idle-memory",
        "date": today(),
        "agents": agents,
        "telemetry_streams": telemetry_streams,
        "idle_secs": idle_secs,
        "hub_rss_baseline_kib": rss_base,
        "hub_rss_connected_kib": rss_connected,
        "hub_rss_idle_kib": rss_idle,
        "hub_rss_idle_samples_kib": samples,
        "hub_rss_anon_kib": status["RssAnon"],
        "hub_vm_hwm_kib": status["VmHWM"],
        "hub_threads": status["Threads"],
        "kib_per_agent": r2(per_agent),
        "target_kib_per_agent": TARGET_HUB_KIB_PER_AGENT,
        "target_met": met,
        "enroll_secs": r2(enroll_secs),
        "connect_secs": r2(connect_secs),
        "still_connected": still,
        "lost_sessions": stats.lost.load(Ordering::Relaxed),
        "connect_attempts_retried": stats.retried.load(Ordering::Relaxed),
        "quic_retries": retries,
    }))
}

// ---------------------------------------------------------------------------------------
// agent-rss
// ---------------------------------------------------------------------------------------

async fn agent_rss(secs: u64, env: Vec<(String, String)>) -> Result<Value> {
    let bin = sibling_binary("gantry-e2e-agent")?;
    let tmp = TempDir::new("bench-agent-rss");
    let hub = TestHub::start(&tmp.path().join("hub"), |_| {}).await;
    hub.create_org("bench", 10).await;
    let token = hub.token("bench", 1, "1h").await;
    let state_dir = tmp.path().join("agent");
    let agent_id = gantry_tests::enroll(&token, &state_dir).await?;
    let log = tmp.path().join("agent.log");
    let mut command = tokio::process::Command::new(&bin);
    command
        .args(["run", "--state-dir"])
        .arg(&state_dir)
        .env_remove("GANTRY_LOG")
        .env_remove("MALLOC_ARENA_MAX")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true);
    for (k, v) in &env {
        command.env(k, v);
    }
    let mut child = command.spawn().context("starting the agent")?;
    let pid = child.id().context("agent exited at once")?;
    println!("agent-rss: real agent process (pid {pid}) connected to an in-process hub; idle {secs} s; env {env:?}");
    let online = wait_until(Duration::from_secs(30), "agent online", || async { hub.hub.registry.is_connected(&agent_id).then_some(()) }).await;
    if let Err(error) = online {
        bail!("{error}; agent log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    let api_status = hub.agent(&agent_id).await["status"].as_str().unwrap_or("").to_string();
    anyhow::ensure!(api_status == "online", "API shows the agent {api_status:?}");
    let rss_online = rss_kib(pid)?;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (rss, samples) = sample_rss(pid, 5, Duration::from_secs(1)).await?;
    let status = proc_status(pid)?;
    let still = hub.hub.registry.is_connected(&agent_id);
    let heartbeats = hub.hub.metrics.heartbeats.load(Ordering::Relaxed);
    let mib = rss / 1024.0;
    let met = mib <= TARGET_AGENT_RSS_MIB;
    println!("  RSS right after connecting {:.2} MiB; samples after {secs} s idle (KiB): {samples:?}", rss_online as f64 / 1024.0);
    println!(
        "  RssAnon {} KiB, RssFile {} KiB, VmHWM {} KiB, threads {}; still online: {still}; heartbeats seen by hub: {heartbeats}",
        status["RssAnon"], status["RssFile"], status["VmHWM"], status["Threads"]
    );
    println!("agent idle RSS: {mib:.2} MiB; target <= {TARGET_AGENT_RSS_MIB} MiB: {}", if met { "met" } else { "NOT met" });
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    hub.stop().await;
    drop(tmp);
    Ok(json!({
        "bench": "agent-rss",
        "date": today(),
        "idle_secs": secs,
        "env": env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "rss_mib": r2(mib),
        "rss_samples_kib": samples,
        "rss_anon_kib": status["RssAnon"],
        "rss_file_kib": status["RssFile"],
        "vm_hwm_kib": status["VmHWM"],
        "threads": status["Threads"],
        "still_online": still,
        "target_mib": TARGET_AGENT_RSS_MIB,
        "target_met": met,
    }))
}
