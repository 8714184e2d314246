//! Harness for end-to-end tests: boots real hubs in-process on `127.0.0.1:0` with real sled
//! files, runs real agents (in-process or as processes), and talks to the hub's HTTP API
//! like any client would.
//!
//! Tests wait on conditions with deadlines ([`wait_for`]), never on fixed sleeps.

#![allow(clippy::unwrap_used)]

/// A WebDriver client for headless Chromium (the dashboard tests).
pub mod browser;
pub mod chaos;
/// A local server speaking Stripe's HTTP API (see `stripe_stub.rs`).
pub mod stripe_stub;

pub mod bench;
/// Deploying containers through the hub in tests.
pub mod deploys;
/// Container images built locally for the tests (Debian base via debootstrap).
pub mod images;
/// The dashboard as a browser without JavaScript uses it (pages, forms, a webhook receiver).
pub mod web;

use anyhow::Context;
use gantry_hub::config::Config;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Admin password used by test hubs.
pub const ADMIN_PASSWORD: &str = "test password for gantry";
pub const ADMIN_EMAIL: &str = "ops@example.com";

/// Whether this is a CI run (`CI` is `true` or `1`): there a test never skips for a missing
/// prerequisite, it fails saying what to install.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Decide what a test does without a prerequisite: `missing` is `None` when it is there
/// (true: run). Otherwise, under CI ([`under_ci`]), panic with `missing`, which should say
/// what to install; elsewhere say `SKIPPED` on stderr and return false (the test returns).
pub fn prerequisite(missing: Option<String>) -> bool {
    let Some(message) = missing else { return true };
    assert!(!under_ci(), "{message} (CI=true: a missing prerequisite fails the test)");
    eprintln!("SKIPPED: {message}");
    false
}

/// Whether the Docker engine a test needs is reachable (and the test image built); false
/// (the test returns) only outside CI, see [`prerequisite`].
pub async fn docker_available() -> bool {
    let missing = gantry_agent::collector::docker::testing::docker().await.is_none();
    prerequisite(missing.then(|| "docker is not reachable: this test needs a running docker engine (e.g. `service docker start`)".to_string()))
}

/// Log to the test output when `GANTRY_LOG` is set.
pub fn init_logging() {
    if let Ok(filter) = std::env::var("GANTRY_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(filter)).with_test_writer().try_init();
    }
}

/// A fresh temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("gantry-e2e-{name}-{}-{:016x}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Wait until `check` returns `Some`, polling every 50 ms, failing after `limit` with `what`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A hub running in-process.
#[derive(Debug)]
pub struct TestHub {
    pub data: PathBuf,
    pub http: SocketAddr,
    pub quic: SocketAddr,
    pub operator_key: String,
    pub hub: Arc<gantry_hub::Hub>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestHub {
    /// Initialise `data` (if new) and serve on fresh loopback ports.
    pub async fn start(data: &Path, tweak: impl FnOnce(&mut Config)) -> TestHub {
        let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind http");
        let quic = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind quic");
        Self::start_on(data, http, quic, tweak).await
    }

    /// Serve on the given addresses (to restart a hub where agents expect it).
    pub async fn start_at(data: &Path, http: SocketAddr, quic: SocketAddr, tweak: impl FnOnce(&mut Config)) -> TestHub {
        // Sockets of the previous hub close as its last tasks end; give them a moment.
        let deadline = Instant::now() + Duration::from_secs(15);
        let (http, quic) = loop {
            match (std::net::TcpListener::bind(http), std::net::UdpSocket::bind(quic)) {
                (Ok(http), Ok(quic)) => break (http, quic),
                (http_result, quic_result) => {
                    assert!(Instant::now() < deadline, "rebinding {http} / {quic}: {:?} / {:?}", http_result.err(), quic_result.err());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        Self::start_on(data, http, quic, tweak).await
    }

    async fn start_on(data: &Path, http: std::net::TcpListener, quic: std::net::UdpSocket, tweak: impl FnOnce(&mut Config)) -> TestHub {
        init_logging();
        let http_addr = http.local_addr().expect("http addr");
        let quic_addr = quic.local_addr().expect("quic addr");
        let public_addr = quic_addr.to_string();
        gantry_hub::init(data, &public_addr, ADMIN_EMAIL, Some(ADMIN_PASSWORD)).expect("init hub");
        let operator_key = std::fs::read_to_string(data.join("operator.key")).expect("operator key").trim().to_string();
        let mut config = Config { data_dir: data.to_path_buf(), http_addr, quic_addr, public_addr: Some(public_addr), ..Config::default() };
        tweak(&mut config);
        let hub = gantry_hub::Hub::open(config).expect("open hub");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let listeners = gantry_hub::Listeners { http, quic };
        let task = tokio::spawn(gantry_hub::run(hub.clone(), listeners, async move {
            let _ = stop_rx.await;
        }));
        let test_hub = TestHub { data: data.to_path_buf(), http: http_addr, quic: quic_addr, operator_key, hub, stop: Some(stop_tx), task: Some(task) };
        let api = test_hub.api();
        wait_for(Duration::from_secs(10), "hub /readyz", || async { (api.get_status("/readyz").await == 200).then_some(()) }).await;
        test_hub
    }

    /// API client with the operator key.
    pub fn api(&self) -> Api {
        Api { base: format!("http://{}", self.http), bearer: Some(self.operator_key.clone()), cookie: None }
    }

    /// Graceful shutdown (drains agents); waits until fully stopped.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("hub task panicked").expect("hub run failed");
        }
    }

    /// Create an org with an agent limit.
    pub async fn create_org(&self, id: &str, agent_limit: u32) {
        let (status, body) = self.api().post("/api/v1/orgs", &serde_json::json!({ "id": id, "agent_limit": agent_limit })).await;
        assert_eq!(status, 201, "create org: {body}");
    }

    /// Mint a token; returns its text.
    pub async fn token(&self, org: &str, uses: u32, ttl: &str) -> String {
        let (status, body) = self.api().post(&format!("/api/v1/orgs/{org}/enrollment-tokens"), &serde_json::json!({ "uses": uses, "ttl": ttl })).await;
        assert_eq!(status, 201, "create token: {body}");
        body["token"].as_str().expect("token text").to_string()
    }

    /// The agent as the API shows it.
    pub async fn agent(&self, id: &str) -> Value {
        let (status, body) = self.api().get(&format!("/api/v1/agents/{id}")).await;
        assert_eq!(status, 200, "get agent: {body}");
        body
    }

    /// Wait until the API shows `status` for agent `id`.
    pub async fn wait_status(&self, id: &str, status: &str, limit: Duration) -> Value {
        wait_for(limit, &format!("agent {id} {status}"), || async {
            let agent = self.agent(id).await;
            (agent["status"] == status).then_some(agent)
        })
        .await
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A minimal HTTP client for the hub API.
#[derive(Debug, Clone)]
pub struct Api {
    pub base: String,
    pub bearer: Option<String>,
    pub cookie: Option<String>,
}

impl Api {
    pub fn anonymous(&self) -> Api {
        Api { base: self.base.clone(), bearer: None, cookie: None }
    }

    pub fn with_bearer(&self, bearer: &str) -> Api {
        Api { base: self.base.clone(), bearer: Some(bearer.to_string()), cookie: None }
    }

    /// Send a request; status, headers and body text.
    pub async fn send(&self, method: &str, path: &str, content_type: Option<&str>, body: Vec<u8>) -> (u16, hyper::HeaderMap, String) {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
        let mut request = hyper::Request::builder().method(method).uri(format!("{}{path}", self.base));
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        if let Some(bearer) = &self.bearer {
            request = request.header("authorization", format!("Bearer {bearer}"));
        }
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie.clone());
        }
        let request = request.body(Full::new(bytes::Bytes::from(body))).expect("request");
        let response =
            tokio::time::timeout(Duration::from_secs(20), client.request(request)).await.expect("HTTP request timed out").expect("HTTP request failed");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        (status, headers, String::from_utf8_lossy(&bytes).into_owned())
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let (status, _, body) = self.send("GET", path, None, Vec::new()).await;
        (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
    }

    pub async fn get_status(&self, path: &str) -> u16 {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
        let request = hyper::Request::get(format!("{}{path}", self.base)).body(Full::new(bytes::Bytes::new())).expect("request");
        match tokio::time::timeout(Duration::from_secs(5), client.request(request)).await {
            Ok(Ok(response)) => response.status().as_u16(),
            _ => 0,
        }
    }

    pub async fn post(&self, path: &str, json: &Value) -> (u16, Value) {
        let (status, _, body) = self.send("POST", path, Some("application/json"), serde_json::to_vec(json).expect("json")).await;
        (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
    }
}

/// Path of the agent program built by this crate (cargo builds a package's binaries before
/// its integration tests, next to the `deps/` folder the test runs from).
pub fn agent_binary() -> PathBuf {
    binary("gantry-e2e-agent")
}

/// Path of the hub program built by this crate.
pub fn hub_binary() -> PathBuf {
    binary("gantry-e2e-hub")
}

fn binary(name: &str) -> PathBuf {
    // Tests run from `target/<profile>/deps/`, binaries such as gantry-chaos from
    // `target/<profile>/`; the programs sit in `target/<profile>/` either way.
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable directory");
    let dir = if dir.ends_with("deps") { dir.parent().expect("target directory") } else { dir };
    let path = dir.join(name);
    assert!(path.exists(), "{name} missing at {}; build the workspace with cargo first", path.display());
    path
}

/// An agent running as its own process (so it can be killed with SIGKILL).
#[derive(Debug)]
pub struct AgentProcess {
    pub child: tokio::process::Child,
    pub state_dir: PathBuf,
}

impl AgentProcess {
    /// Start `gantry-agent run --state-dir DIR`.
    pub fn start(state_dir: &Path) -> AgentProcess {
        Self::spawn(state_dir, None)
    }

    /// Start an agent that dials `hub_addr` (`GANTRY_HUB_ADDR`) instead of its enrolled address.
    pub fn start_via(state_dir: &Path, hub_addr: &str) -> AgentProcess {
        Self::spawn(state_dir, Some(hub_addr))
    }

    fn spawn(state_dir: &Path, hub_addr: Option<&str>) -> AgentProcess {
        let mut args: Vec<std::ffi::OsString> = vec!["run".into(), "--state-dir".into()];
        args.push(state_dir.into());
        Self::spawn_with(&args, state_dir, hub_addr)
    }

    fn spawn_with(args: &[std::ffi::OsString], state_dir: &Path, hub_addr: Option<&str>) -> AgentProcess {
        let mut command = tokio::process::Command::new(agent_binary());
        if let Some(addr) = hub_addr {
            command.env("GANTRY_HUB_ADDR", addr);
        }
        let child = command
            .args(args)
            .env("GANTRY_LOG", std::env::var("GANTRY_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn agent process");
        AgentProcess { child, state_dir: state_dir.to_path_buf() }
    }

    /// SIGKILL: no goodbye, no drain.
    pub async fn kill9(&mut self) {
        self.child.start_kill().expect("kill agent");
        let _ = self.child.wait().await;
    }
}

/// Run an agent CLI command to completion; exit code, stdout, stderr.
pub async fn agent_cli(args: &[&str]) -> (i32, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(agent_binary()).args(args).env("GANTRY_LOG", "error").stdin(std::process::Stdio::null()).output(),
    )
    .await
    .expect("agent command timed out")
    .expect("run agent command");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Enroll in-process; the agent id.
pub async fn enroll(token: &str, state_dir: &Path) -> anyhow::Result<String> {
    let state = gantry_agent::state::StateDir::new(state_dir);
    let done = gantry_agent::enroll::enroll(token, &state, false, Duration::from_secs(20)).await.context("enroll")?;
    Ok(done.identity.agent_id)
}

/// An agent running in-process with a stop handle.
#[derive(Debug)]
pub struct InProcessAgent {
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Result<(), gantry_agent::connection::RunError>>,
}

impl InProcessAgent {
    pub fn start(state_dir: &Path) -> InProcessAgent {
        let config = gantry_agent::config::Config { state_dir: state_dir.to_path_buf(), ..gantry_agent::config::Config::default() };
        Self::start_with(config)
    }

    pub fn start_with(config: gantry_agent::config::Config) -> InProcessAgent {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(gantry_agent::connection::run(config, async move {
            let _ = stop_rx.await;
        }));
        InProcessAgent { stop: Some(stop_tx), task }
    }

    pub async fn stop(mut self) -> Result<(), gantry_agent::connection::RunError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("agent task panicked")
    }
}

/// A UDP relay between agents and a hub that can cut the path both ways (a partition)
/// and restore it, for network-loss tests on loopback.
#[derive(Debug)]
pub struct Partition {
    pub addr: SocketAddr,
    blocked: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl Partition {
    /// Relay datagrams from a fresh loopback port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Partition {
        use std::collections::HashMap;
        use std::sync::atomic::Ordering;
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind relay"));
        let addr = front.local_addr().expect("relay addr");
        let blocked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = blocked.clone();
        let task = tokio::spawn(async move {
            // One upstream socket per client address, so the hub sees distinct peers.
            let mut backs: HashMap<SocketAddr, Arc<tokio::net::UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, client)) = front.recv_from(&mut buf).await else { return };
                if flag.load(Ordering::SeqCst) {
                    continue;
                }
                let back = match backs.get(&client) {
                    Some(back) => back.clone(),
                    None => {
                        let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind relay back"));
                        back.connect(upstream).await.expect("connect upstream");
                        let (front, back2, flag) = (front.clone(), back.clone(), flag.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            loop {
                                match back2.recv(&mut buf).await {
                                    Ok(n) => {
                                        if !flag.load(Ordering::SeqCst) {
                                            let _ = front.send_to(&buf[..n], client).await;
                                        }
                                    }
                                    // While the hub is down, a datagram sent upstream comes back
                                    // as an ICMP "port unreachable", reported by the next recv on
                                    // this connected socket. The hub returns: keep relaying.
                                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                                    Err(_) => break,
                                }
                            }
                        });
                        backs.insert(client, back.clone());
                        back
                    }
                };
                let _ = back.send(&buf[..n]).await;
            }
        });
        Partition { addr, blocked, task }
    }

    /// Drop every datagram in both directions.
    pub fn cut(&self) {
        self.blocked.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Let datagrams through again.
    pub fn heal(&self) {
        self.blocked.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A hub running as its own process (`gantry-hub serve`), so a test can SIGKILL it.
#[derive(Debug)]
pub struct HubProcess {
    pub child: tokio::process::Child,
    pub http: SocketAddr,
    pub quic: SocketAddr,
}

impl HubProcess {
    /// Initialise `data` for `quic` (if new) and serve it on `http` and `quic`.
    pub async fn start(data: &Path, http: SocketAddr, quic: SocketAddr) -> HubProcess {
        HubProcess::start_with_env(data, http, quic, &[]).await
    }

    /// [`HubProcess::start`] with extra environment variables (test hooks such as
    /// `GANTRY_TEST_ORG_DELETION_PAUSE_MS`).
    pub async fn start_with_env(data: &Path, http: SocketAddr, quic: SocketAddr, env: &[(&str, &str)]) -> HubProcess {
        gantry_hub::init(data, &quic.to_string(), ADMIN_EMAIL, Some(ADMIN_PASSWORD)).expect("init hub");
        let child = tokio::process::Command::new(hub_binary())
            .args(["serve", "--data"])
            .arg(data)
            .args(["--http", &http.to_string(), "--quic", &quic.to_string()])
            .env("GANTRY_LOG", std::env::var("GANTRY_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn hub process");
        let process = HubProcess { child, http, quic };
        let api = process.api(data);
        wait_for(Duration::from_secs(20), "hub process ready", || async { (api.get_status("/readyz").await == 200).then_some(()) }).await;
        process
    }

    /// API client with the operator key from `data`.
    pub fn api(&self, data: &Path) -> Api {
        let key = std::fs::read_to_string(data.join("operator.key")).expect("operator key").trim().to_string();
        Api { base: format!("http://{}", self.http), bearer: Some(key), cookie: None }
    }

    /// SIGKILL: no drain, no flush.
    pub async fn kill9(&mut self) {
        self.child.start_kill().expect("kill hub");
        let _ = self.child.wait().await;
    }

    /// SIGTERM: the hub drains its agents and exits 0.
    pub async fn terminate(&mut self) {
        let pid = self.child.id().expect("hub pid").to_string();
        let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        assert!(sent.success(), "could not signal the hub");
        let status =
            tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await.expect("hub did not stop within 20 s of SIGTERM").expect("hub status");
        assert!(status.success(), "hub exited with {status} after SIGTERM");
    }
}

/// A loopback TCP address nothing listens on (bound, then released): for a server a test
/// starts there later, or for a peer that must not answer.
pub fn free_tcp_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").expect("probe tcp").local_addr().expect("addr")
}

/// A loopback UDP address nothing listens on (bound, then released).
pub fn free_udp_addr() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0").expect("probe udp").local_addr().expect("addr")
}

/// Two free loopback addresses (TCP for HTTP, UDP for QUIC) for a hub process.
pub fn free_addrs() -> (SocketAddr, SocketAddr) {
    (free_tcp_addr(), free_udp_addr())
}

/// Write an agent config file for `state_dir` that tails `files`, with extra TOML appended.
pub fn agent_config_file(dir: &Path, state_dir: &Path, files: &[&Path], extra: &str) -> PathBuf {
    let paths: Vec<String> = files.iter().map(|p| format!("{:?}", p.display().to_string())).collect();
    // Root keys first (dotted `files.*` keys included), so `extra` may add root keys
    // such as `files.rotate_wait_ms = 100` before opening tables like `[host]`.
    let text = format!("state_dir = {:?}\nfiles_poll_ms = 20\nfiles.paths = [{}]\n{extra}\n", state_dir.display().to_string(), paths.join(", "));
    let path = dir.join(format!("agent-{:08x}.toml", rand::random::<u32>()));
    std::fs::write(&path, text).expect("write agent config");
    path
}

impl AgentProcess {
    /// Start `gantry-agent run --config FILE`.
    pub fn start_with_config(config: &Path, state_dir: &Path) -> AgentProcess {
        Self::spawn_with(&["run".into(), "--config".into(), config.into()], state_dir, None)
    }
}

impl Api {
    /// Every record of a paginated log or event endpoint (`path` without query string,
    /// `query` extra parameters).
    pub async fn all_records(&self, path: &str, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut url = format!("{path}?limit=1000{query}");
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let (status, body) = self.get(&url).await;
            assert_eq!(status, 200, "{url}: {body}");
            out.extend(body["records"].as_array().cloned().unwrap_or_default());
            match body["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_string()),
                None => return out,
            }
        }
    }
}

/// Appends numbered lines (`line-00000042`) to a file at a steady rate until stopped.
#[derive(Debug)]
pub struct LineWriter {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl LineWriter {
    /// Start writing one line every `every`.
    pub fn start(path: &Path, every: Duration) -> LineWriter {
        use std::io::Write;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let path = path.to_path_buf();
        let thread = std::thread::spawn(move || {
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("open log");
            let mut n = 0u64;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                writeln!(file, "line-{n:08}").expect("write line");
                n += 1;
                std::thread::sleep(every);
            }
            n
        });
        LineWriter { stop, thread: Some(thread) }
    }

    /// Stop; how many lines were written.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().expect("writer thread").join().expect("writer panicked")
    }
}

/// A Server-Sent Events response read event by event.
#[derive(Debug)]
pub struct SseReader {
    body: hyper::body::Incoming,
    buffer: String,
}

/// One Server-Sent Event with data.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// `id:`, empty when the event has none.
    pub id: String,
    /// `event:`, `message` when the event names none.
    pub event: String,
    pub data: Value,
}

impl SseReader {
    /// Open `path` with the API's credentials (and `Last-Event-ID`, to resume); asserts a 200
    /// event stream.
    pub async fn open(api: &Api, path: &str, last_event_id: Option<&str>) -> SseReader {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
        let mut request = hyper::Request::get(format!("{}{path}", api.base));
        if let Some(bearer) = &api.bearer {
            request = request.header("authorization", format!("Bearer {bearer}"));
        }
        if let Some(cookie) = &api.cookie {
            request = request.header("cookie", cookie.as_str());
        }
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = client.request(request.body(Full::new(bytes::Bytes::new())).expect("request")).await.expect("event stream request");
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        SseReader { body: response.into_body(), buffer: String::new() }
    }

    /// The next `want` events carrying data, within 30 s.
    pub async fn events(&mut self, want: usize) -> Vec<SseEvent> {
        let mut events = Vec::new();
        let read = async {
            while events.len() < want {
                while let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(|s| s.trim().to_string());
                    if let Some(data) = field("data:") {
                        let data = serde_json::from_str(&data).expect("event data is JSON");
                        events.push(SseEvent { id: field("id:").unwrap_or_default(), event: field("event:").unwrap_or_else(|| "message".into()), data });
                    }
                }
                if events.len() >= want {
                    break;
                }
                let Some(frame) = self.body.frame().await else { break };
                if let Ok(data) = frame.expect("event stream frame").into_data() {
                    self.buffer.push_str(&String::from_utf8_lossy(&data));
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read).await.expect("event stream stalled");
        events
    }

    /// The next `want` events as (id, data).
    pub async fn next(&mut self, want: usize) -> Vec<(String, Value)> {
        self.events(want).await.into_iter().map(|e| (e.id, e.data)).collect()
    }
}

/// Check that the file lines among `records` (log records from the API) are `line-0..n`
/// exactly once each, in order of their sequence numbers.
pub fn assert_lines_exactly_once(records: &[Value], n: u64) {
    let mut lines: Vec<(u64, u64)> = records
        .iter()
        .filter(|r| r["kind"] == "log" && r["stream"] == "file")
        .map(|r| {
            let number = r["line"]
                .as_str()
                .and_then(|l| l.strip_prefix("line-"))
                .and_then(|d| d.get(..8))
                .and_then(|d| d.parse().ok())
                .unwrap_or_else(|| panic!("not a numbered line: {r}"));
            (r["seq"].as_u64().expect("seq"), number)
        })
        .collect();
    lines.sort();
    let numbers: Vec<u64> = lines.iter().map(|(_, n)| *n).collect();
    let mut seen = std::collections::HashSet::new();
    let duplicates: Vec<u64> = numbers.iter().copied().filter(|n| !seen.insert(*n)).collect();
    assert!(duplicates.is_empty(), "{} duplicated lines, first {:?}", duplicates.len(), &duplicates[..duplicates.len().min(5)]);
    let missing: Vec<u64> = (0..n).filter(|i| !seen.contains(i)).collect();
    assert!(missing.is_empty(), "{} missing lines of {n}, first {:?}", missing.len(), &missing[..missing.len().min(5)]);
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "lines out of order");
    assert_eq!(numbers.len() as u64, n);
}

impl Api {
    /// A client that sends `cookie` (`name=value`) and no API key.
    pub fn with_cookie(&self, cookie: &str) -> Api {
        Api { base: self.base.clone(), bearer: None, cookie: Some(cookie.to_string()) }
    }

    /// `POST /api/v1/auth/login` with `body` (sending this client's cookie, if any): status,
    /// body, and the session cookie the hub set as `name=value`, if it set a non-empty one.
    pub async fn login(&self, body: &Value) -> (u16, Value, Option<String>) {
        let (status, headers, text) = self.send("POST", "/api/v1/auth/login", Some("application/json"), serde_json::to_vec(body).expect("json")).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), session_cookie_of(&headers))
    }

    /// `DELETE` with a JSON body.
    pub async fn delete_json(&self, path: &str, json: &Value) -> (u16, Value) {
        let (status, _, body) = self.send("DELETE", path, Some("application/json"), serde_json::to_vec(json).expect("json")).await;
        (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
    }
}

/// The `name=value` of a non-empty cookie set by a response, if any.
pub fn session_cookie_of(headers: &hyper::HeaderMap) -> Option<String> {
    headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find(|pair| pair.split_once('=').is_some_and(|(_, value)| !value.is_empty()))
        .map(str::to_string)
}

impl TestHub {
    /// Like [`TestHub::start`], for a hub that `tweak` makes serve HTTPS: readiness is taken
    /// from the hub itself, since [`Api`] speaks plain HTTP only (use [`https_send`]).
    pub async fn start_tls(data: &Path, tweak: impl FnOnce(&mut Config)) -> TestHub {
        init_logging();
        let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind http");
        let quic = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind quic");
        let (http_addr, quic_addr) = (http.local_addr().expect("http addr"), quic.local_addr().expect("quic addr"));
        let public_addr = quic_addr.to_string();
        gantry_hub::init(data, &public_addr, ADMIN_EMAIL, Some(ADMIN_PASSWORD)).expect("init hub");
        let operator_key = std::fs::read_to_string(data.join("operator.key")).expect("operator key").trim().to_string();
        let mut config = Config { data_dir: data.to_path_buf(), http_addr, quic_addr, public_addr: Some(public_addr), ..Config::default() };
        tweak(&mut config);
        let hub = gantry_hub::Hub::open(config).expect("open hub");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(gantry_hub::run(hub.clone(), gantry_hub::Listeners { http, quic }, async move {
            let _ = stop_rx.await;
        }));
        let test_hub = TestHub { data: data.to_path_buf(), http: http_addr, quic: quic_addr, operator_key, hub, stop: Some(stop_tx), task: Some(task) };
        wait_for(Duration::from_secs(10), "hub accepting", || async { test_hub.hub.is_accepting().then_some(()) }).await;
        test_hub
    }
}

/// Send one HTTPS request to `addr` (as host `server_name`), trusting only the certificates
/// in `roots_pem`: status, headers and body text, or why the connection failed.
pub async fn https_send(
    addr: SocketAddr,
    server_name: &str,
    roots_pem: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> anyhow::Result<(u16, hyper::HeaderMap, String)> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(cert.context("parsing a trusted certificate")?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.context("connecting")?;
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string())?;
        let tls = connector.connect(name, tcp).await.context("TLS handshake")?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        let mut request = hyper::Request::builder().method(method).uri(path).header("host", format!("{server_name}:{}", addr.port()));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = sender.send_request(request.body(Full::new(bytes::Bytes::from(body)))?).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, headers, String::from_utf8_lossy(&bytes).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(20), exchange).await.context("HTTPS request timed out")?
}

/// An agent session spoken by hand over QUIC: enrolled in an org, said hello, and then
/// reads what the hub sends and answers only what the test tells it to; it can send log
/// records with the timestamps a test chooses.
#[derive(Debug)]
pub struct SimulatedAgent {
    pub id: String,
    pub connection: quinn::Connection,
    send: gantry_agent::wire::FramedSend,
    recv: gantry_agent::wire::FramedRecv,
}

impl SimulatedAgent {
    /// Enroll in `org` (state in `state_dir`), connect, say hello and wait until online.
    pub async fn start(hub: &TestHub, org: &str, state_dir: &Path) -> SimulatedAgent {
        use gantry_shared::message::{AgentMessage, Hello, VersionRange};
        let state = gantry_agent::state::StateDir::new(state_dir.to_path_buf());
        let id = enroll(&hub.token(org, 1, "10m").await, &state.dir).await.unwrap();
        let (config, _) = gantry_agent::tls::client_config(hub.hub.pki.ca_sha256(), Some(state.load_credentials().unwrap())).unwrap();
        let endpoint = gantry_agent::connection::client_endpoint(hub.quic).unwrap();
        let connection = endpoint.connect_with(config, hub.quic, gantry_shared::HUB_SERVER_NAME).unwrap().await.expect("handshake");
        let (send, recv) = connection.open_bi().await.unwrap();
        let mut send = gantry_agent::wire::FramedSend::new(send, 1 << 20);
        send.send(&AgentMessage::Hello(Hello { versions: VersionRange::CURRENT, facts: Default::default(), agent_clock_unix_ms: 0 })).await.unwrap();
        hub.wait_status(&id, "online", Duration::from_secs(10)).await;
        SimulatedAgent { id, connection, send, recv: gantry_agent::wire::FramedRecv::new(recv, 1 << 20) }
    }

    /// The next support action the hub sends (other messages are read past).
    pub async fn next_action(&mut self) -> gantry_shared::support::ActionRequest {
        use gantry_shared::message::HubMessage;
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match self.recv.next::<HubMessage>().await.expect("read from the hub") {
                    Some(HubMessage::Action(request)) => return *request,
                    Some(_) => continue,
                    None => panic!("the hub closed the control stream"),
                }
            }
        })
        .await
        .expect("the hub sent the action")
    }

    /// Send the result of an action.
    pub async fn answer(&mut self, reply: gantry_shared::support::ActionReply) {
        self.send.send(&gantry_shared::message::AgentMessage::ActionResult(Box::new(reply))).await.unwrap();
    }

    /// Send file log lines `(timestamp ms, text)` as records 1, 2, 3, … of a new logs
    /// stream and wait until the hub acknowledged them all.
    pub async fn send_logs(&self, lines: &[(i64, String)]) {
        use gantry_shared::message::StreamClass;
        use gantry_shared::telemetry::{Batch, LogLine, LogStream, Record, RecordBody, StreamDown, StreamUp};
        let (send, recv) = self.connection.open_bi().await.unwrap();
        let mut send = gantry_agent::wire::FramedSend::new(send, 1 << 20);
        let mut recv = gantry_agent::wire::FramedRecv::new(recv, 1 << 20);
        send.send(&StreamUp::Open { class: StreamClass::Logs }).await.unwrap();
        let records: Vec<Record> = lines
            .iter()
            .zip(1u64..)
            .map(|((ts, line), seq)| Record {
                seq,
                ts_unix_ms: *ts,
                body: RecordBody::Log(LogLine { source: "/var/log/app.log".into(), stream: LogStream::File, container: None, line: line.clone() }),
            })
            .collect();
        let last = records.len() as u64;
        send.send(&StreamUp::Batch(Batch { records })).await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match recv.next::<StreamDown>().await.unwrap() {
                    Some(StreamDown::Ack(ack)) if ack.up_to_seq >= last => return,
                    Some(_) => continue,
                    None => panic!("the hub closed the logs stream"),
                }
            }
        })
        .await
        .expect("the hub acknowledged the records");
    }
}
