//! Shared pieces of the benchmark programs: hub and agent processes on loopback, mass
//! enrollment, simulated agent sessions, HTTP calls, process CPU, and small statistics.

use anyhow::{bail, Context, Result};
use gantry_agent::wire::{FramedRecv, FramedSend};
use gantry_shared::frame::DEFAULT_MAX_FRAME_BYTES;
use gantry_shared::message::{AgentMessage, Hello, HostFacts, HubMessage, VersionRange};
use http_body_util::{BodyExt, Full};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The `p`-quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64
}

pub fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn today() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!("{:04}-{:02}-{:02}", now.year(), u8::from(now.month()), now.day())
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// A program built next to this one (`target/release/NAME`).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let path = exe.parent().context("executable has no directory")?.join(name);
    anyhow::ensure!(path.exists(), "{} is missing; build it with `cargo build --release -p gantry-tests --features bench --bins`", path.display());
    Ok(path)
}

/// The hub program to run (`--hub-bin`), if not the one next to this binary.
pub static HUB_BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

pub fn hub_binary() -> Result<PathBuf> {
    match HUB_BIN.get() {
        Some(path) => {
            anyhow::ensure!(path.exists(), "--hub-bin {} does not exist", path.display());
            Ok(path.clone())
        }
        None => sibling_binary("gantry-e2e-hub"),
    }
}

/// The agent program to run (`--agent-bin`), if not the one next to this binary.
pub static AGENT_BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

pub fn agent_binary() -> Result<PathBuf> {
    match AGENT_BIN.get() {
        Some(path) => {
            anyhow::ensure!(path.exists(), "--agent-bin {} does not exist", path.display());
            Ok(path.clone())
        }
        None => sibling_binary("gantry-e2e-agent"),
    }
}

pub fn agent_binary_label() -> String {
    AGENT_BIN.get().map(|p| p.display().to_string()).unwrap_or_else(|| "gantry-e2e-agent (next to this binary)".into())
}

pub fn hub_binary_label() -> String {
    HUB_BIN.get().map(|p| p.display().to_string()).unwrap_or_else(|| "gantry-e2e-hub (next to this binary)".into())
}

/// Clock ticks per second for `/proc/PID/stat` (`getconf CLK_TCK`, 100 on Linux).
pub fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf").arg("CLK_TCK").output().ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(100.0)
    })
}

/// CPU time (user + system, all threads) of `pid` ("self" for this process), in seconds.
pub fn cpu_secs(pid: &str) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let rest = text.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based).
    let ticks = |i: usize| -> Result<f64> { Ok(fields.get(i).context("short /proc/PID/stat")?.parse::<f64>()?) };
    Ok((ticks(11)? + ticks(12)?) / clk_tck())
}

pub fn self_cpu() -> f64 {
    cpu_secs("self").unwrap_or(0.0)
}

/// GET or POST over plain HTTP with a bearer key; status and body, `None` if the request
/// failed or took longer than 10 s.
pub async fn http(method: &str, base: &str, path: &str, bearer: &str, json_body: Option<&Value>) -> Option<(u16, String)> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
    let body = json_body.map(|v| serde_json::to_vec(v).unwrap_or_default()).unwrap_or_default();
    let mut request = hyper::Request::builder().method(method).uri(format!("{base}{path}")).header("authorization", format!("Bearer {bearer}"));
    if json_body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request.body(Full::new(bytes::Bytes::from(body))).ok()?;
    let response = match tokio::time::timeout(Duration::from_secs(10), client.request(request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            eprintln!("  HTTP {method} {path}: {error:?}");
            return None;
        }
        Err(_) => {
            eprintln!("  HTTP {method} {path}: no answer within 10 s");
            return None;
        }
    };
    let status = response.status().as_u16();
    let bytes = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect()).await.ok()?.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Poll `check` every `every` until it yields, failing after `limit`.
pub async fn wait_until<T, F, Fut>(limit: Duration, every: Duration, what: &str, mut check: F) -> Result<T>
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
        tokio::time::sleep(every).await;
    }
}

pub fn free_addr(udp: bool) -> Result<SocketAddr> {
    Ok(if udp { std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()? } else { std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()? })
}

/// Send SIGTERM (graceful) or SIGKILL to `pid`.
pub fn signal(pid: u32, sig: &str) -> bool {
    std::process::Command::new("kill").args([sig, &pid.to_string()]).status().map(|s| s.success()).unwrap_or(false)
}

// ---------------------------------------------------------------------------------------
// Hub process
// ---------------------------------------------------------------------------------------

/// A hub running as its own process (`gantry-e2e-hub serve`), killed on drop.
#[derive(Debug)]
pub struct HubProc {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub base: String,
    pub key: String,
    pub quic: SocketAddr,
    pub log: PathBuf,
}

impl HubProc {
    /// `init` a data directory for fresh loopback ports, then `serve` it; returns once
    /// `/readyz` answers.
    pub async fn start(data: &Path) -> Result<HubProc> {
        let bin = hub_binary()?;
        let http_addr = free_addr(false)?;
        let quic = free_addr(true)?;
        let init = tokio::process::Command::new(&bin)
            .args(["init", "--data"])
            .arg(data)
            .args(["--public-addr", &quic.to_string()])
            .env("GANTRY_ADMIN_PASSWORD", format!("bench-{:016x}", rand::random::<u64>()))
            .env("GANTRY_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let init = tokio::time::timeout(Duration::from_secs(60), init).await.context("hub init timed out")??;
        anyhow::ensure!(init.status.success(), "hub init failed: {}", String::from_utf8_lossy(&init.stderr));
        let key = std::fs::read_to_string(data.join("operator.key")).context("reading operator.key")?.trim().to_string();
        let log = data.with_extension("log");
        let child = tokio::process::Command::new(&bin)
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args(["--http", &http_addr.to_string(), "--quic", &quic.to_string()])
            .env("GANTRY_LOG", std::env::var("GANTRY_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("starting the hub")?;
        let pid = child.id().context("hub exited at once")?;
        let hub = HubProc { child, pid, base: format!("http://{http_addr}"), key, quic, log };
        let ready = wait_until(Duration::from_secs(30), Duration::from_millis(100), "hub /readyz", || async {
            http("GET", &hub.base, "/readyz", &hub.key, None).await.filter(|(s, _)| *s == 200).map(|_| ())
        })
        .await;
        if let Err(error) = ready {
            bail!("{error}; hub log:\n{}", hub.log_text());
        }
        Ok(hub)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let (status, text) = http("POST", &self.base, path, &self.key, Some(body)).await.with_context(|| format!("POST {path} failed"))?;
        anyhow::ensure!((200..300).contains(&status), "POST {path}: {status} {text}");
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> Option<Value> {
        let (status, text) = http("GET", &self.base, path, &self.key, None).await?;
        (status == 200).then(|| serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// An org with a large agent limit and a token with `uses` uses.
    pub async fn org_and_token(&self, uses: usize) -> Result<String> {
        self.post("/api/v1/orgs", &json!({ "id": "bench", "agent_limit": 100_000 })).await?;
        let body = self.post("/api/v1/orgs/bench/enrollment-tokens", &json!({ "uses": uses, "ttl": "2h" })).await?;
        Ok(body["token"].as_str().context("token reply has no token")?.to_string())
    }

    /// Every sample of `/metrics`, by name with labels (`name{labels}`).
    pub async fn metrics(&self) -> Option<HashMap<String, f64>> {
        let (status, text) = http("GET", &self.base, "/metrics", &self.key, None).await?;
        if status != 200 {
            return None;
        }
        Some(
            text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?)))).collect(),
        )
    }

    pub fn cpu(&self) -> f64 {
        cpu_secs(&self.pid.to_string()).unwrap_or(f64::NAN)
    }

    /// Why the hub does not answer: CPU progress over 3 s, `/readyz`, and what its threads
    /// wait on (a tokio runtime polling for IO has a thread in `ep_poll`/`do_epoll_wait`).
    pub async fn diagnose_stall(&mut self) -> String {
        if let Ok(Some(status)) = self.child.try_wait() {
            return format!("hub exited with {status}");
        }
        let cpu0 = self.cpu();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let cpu1 = self.cpu();
        let ready = http("GET", &self.base, "/readyz", &self.key, None).await.map(|(s, _)| s);
        let mut waits: BTreeMap<String, u32> = BTreeMap::new();
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) {
            for task in tasks.filter_map(Result::ok) {
                let wchan = std::fs::read_to_string(task.path().join("wchan")).unwrap_or_default();
                *waits.entry(if wchan.is_empty() { "running".into() } else { wchan }).or_insert(0) += 1;
            }
        }
        let polling = waits.keys().any(|w| w.contains("epoll"));
        format!(
            "hub pid {} used {:.2} CPU-s in 3 s; /readyz {}; threads waiting in {:?}; {}",
            self.pid,
            cpu1 - cpu0,
            ready.map_or("did not answer within 10 s".to_string(), |s| s.to_string()),
            waits,
            if !polling && cpu1 - cpu0 < 0.05 {
                "no thread polls for IO and no CPU is used: the hub is deadlocked (attach gdb for stacks)"
            } else {
                "the hub is alive but slow"
            }
        )
    }

    /// SIGTERM, then SIGKILL after 15 s.
    pub async fn stop(mut self) {
        if signal(self.pid, "-TERM") && tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await.is_ok() {
            return;
        }
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// Enroll `count` agents into `root/agent-N`, `parallel` at a time.
pub async fn enroll_many(token: &str, root: &Path, count: usize, parallel: usize) -> Result<Vec<PathBuf>> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = tokio::task::JoinSet::new();
    let mut dirs = Vec::with_capacity(count);
    for i in 0..count {
        let dir = root.join(format!("agent-{i:05}"));
        dirs.push(dir.clone());
        let token = token.to_string();
        let semaphore = semaphore.clone();
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await?;
            let state = gantry_agent::state::StateDir::new(&dir);
            let mut last = None;
            for _ in 0..3 {
                match gantry_agent::enroll::enroll(&token, &state, false, Duration::from_secs(30)).await {
                    Ok(done) => return Ok(done.identity.agent_id),
                    Err(error @ gantry_agent::enroll::EnrollError::Unreachable { .. }) => last = Some(error),
                    Err(error) => return Err(anyhow::Error::from(error).context(format!("enrolling {}", dir.display()))),
                }
            }
            Err(anyhow::anyhow!("enrolling {}: {:?}", dir.display(), last))
        });
    }
    let started = Instant::now();
    let mut done = 0;
    while let Some(joined) = tasks.join_next().await {
        joined.context("enroll task panicked")??;
        done += 1;
        if count >= 100 && (done % 250 == 0 || done == count) {
            eprintln!("  enrolled {done}/{count} ({:.1} s)", started.elapsed().as_secs_f64());
        }
    }
    Ok(dirs)
}

/// A real agent process (`gantry-e2e-agent run --config FILE`), killed on drop.
#[derive(Debug)]
pub struct AgentProc {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub log: PathBuf,
}

impl AgentProc {
    pub fn start(config: &Path, log: &Path, env: &[(&str, &str)]) -> Result<AgentProc> {
        let mut command = tokio::process::Command::new(agent_binary()?);
        command
            .args(["run", "--config"])
            .arg(config)
            .env("GANTRY_LOG", std::env::var("GANTRY_LOG").unwrap_or_else(|_| "warn".into()))
            .env_remove("MALLOC_ARENA_MAX")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().context("starting the agent")?;
        let pid = child.id().context("agent exited at once")?;
        Ok(AgentProc { child, pid, log: log.to_path_buf() })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// What a simulated agent needs to dial the hub.
#[derive(Debug)]
pub struct AgentCreds {
    pub ca_sha256: [u8; 32],
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl AgentCreds {
    pub fn load(dir: &Path) -> Result<AgentCreds> {
        let state = gantry_agent::state::StateDir::new(dir);
        let identity = state.load_identity()?;
        let (chain, key) = state.load_credentials()?;
        Ok(AgentCreds { ca_sha256: identity.ca_sha256_bytes()?, chain, key })
    }

    pub fn client_config(&self) -> Result<quinn::ClientConfig> {
        Ok(gantry_agent::tls::client_config(self.ca_sha256, Some((self.chain.clone(), self.key.clone_key())))?.0)
    }
}

/// Dial, open the control stream, send hello, read the welcome, each within `limit`.
pub async fn dial_session(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    remote: SocketAddr,
    facts: &HostFacts,
    limit: Duration,
) -> Result<(quinn::Connection, FramedSend, FramedRecv)> {
    let connecting = endpoint.connect_with(config, remote, gantry_shared::HUB_SERVER_NAME)?;
    let connection = tokio::time::timeout(limit, connecting).await.context("QUIC handshake timed out")?.context("QUIC handshake")?;
    let (send, recv) = tokio::time::timeout(limit, connection.open_bi()).await.context("opening the control stream timed out")??;
    let mut send = FramedSend::new(send, DEFAULT_MAX_FRAME_BYTES);
    let hello = AgentMessage::Hello(Hello { versions: VersionRange::CURRENT, facts: facts.clone(), agent_clock_unix_ms: gantry_agent::wall_ms() });
    tokio::time::timeout(limit, send.send(&hello)).await.context("sending hello timed out")??;
    let mut recv = FramedRecv::new(recv, DEFAULT_MAX_FRAME_BYTES);
    match tokio::time::timeout(limit, recv.next::<HubMessage>()).await.context("waiting for welcome timed out")?? {
        Some(HubMessage::Welcome(_)) => Ok((connection, send, recv)),
        other => bail!("expected a welcome, got {other:?}"),
    }
}

/// The first hour of the month the ledger benchmarks fill (2026-11-01T00:00:00Z).
pub const MONTH_START_MS: i64 = 1_793_491_200_000;

/// One usage entry of the ledger benchmarks: `org`'s log bytes in hour `hour` of the month,
/// recorded as that hour closes.
pub fn log_bytes_usage(org: u64, hour: i64, quantity: i64) -> gantry_hub::store::LedgerEntry {
    use gantry_hub::billing::{Meter, HOUR_MS};
    gantry_hub::store::LedgerEntry {
        seq: 0,
        org: format!("org-{org:05}"),
        meter: Meter::LogBytes,
        hour_ms: MONTH_START_MS + hour * HOUR_MS,
        source: format!("agt-{org:05}"),
        quantity,
        kind: gantry_hub::store::EntryKind::Usage,
        recorded_at_ms: MONTH_START_MS + (hour + 1) * HOUR_MS,
    }
}
