//! Probe execution: runs one [`Probe`] of a health check on this host and says whether it
//! passed, with a short output and how long it took.
//!
//! Every probe is bounded by the check's timeout. Network probes speak just enough HTTP/1.0
//! and TLS (rustls, driven over a tokio socket here) to judge an endpoint; exec runs an argv
//! without a shell and kills it on timeout; host probes read sysinfo; container probes ask
//! Docker through bollard's typed API. This module only looks: it never restarts, writes or
//! reports anything (remediation is [`super::remediate`], reporting is the runner's).

use crate::collector::docker::{self, DockerConfig};
use bollard::models::{ContainerStateStatusEnum, HealthStatusEnum};
use bollard::query_parameters::InspectContainerOptions;
use bollard::Docker;
use gantry_shared::checks::{parse_http_url, Probe};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Most bytes of an HTTP response body read (the rest is not waited for).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most bytes of an HTTP response head (status line and headers) read.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most bytes of a command's stdout and of its stderr kept.
const MAX_COMMAND_OUTPUT: usize = 4096;
/// How long a command's output may trail its exit (a background child holding the pipes).
const OUTPUT_GRACE: Duration = Duration::from_millis(500);
/// How long the output of a killed command is waited for.
const KILLED_GRACE: Duration = Duration::from_millis(100);
/// Linux keeps this many bytes of a process name (`/proc/PID/comm`).
const COMM_BYTES: usize = 15;
/// Where Linux distributions keep their CA bundle; `SSL_CERT_FILE` comes first.
const CA_BUNDLES: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// What one run of a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// The probe passed.
    pub passed: bool,
    /// What it saw (status line, error, exit code and output), one line where possible.
    pub output: String,
    /// How long the run took, in milliseconds.
    pub latency_ms: u64,
}

/// Runs probes. Holds what runs share: the Docker client (connected on first use and again
/// after a transport error) and the HTTPS trust roots. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Prober {
    docker: DockerClient,
    https: Mutex<Option<Arc<ClientConfig>>>,
}

impl Prober {
    /// A prober reaching Docker as `docker` says and trusting the system's CA bundle for
    /// HTTPS (`SSL_CERT_FILE`, else the usual distribution paths; loaded on first use).
    pub fn new(docker: DockerConfig) -> Prober {
        Prober { docker: DockerClient::new(docker), https: Mutex::new(None) }
    }

    /// The same prober trusting exactly `roots` for HTTPS checks instead of the system's
    /// CA bundle.
    pub fn with_https_roots(self, roots: RootCertStore) -> anyhow::Result<Prober> {
        let config = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        *self.https.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(config));
        Ok(self)
    }

    /// The Docker client remediation shares with the container probe.
    pub(crate) fn docker(&self) -> &DockerClient {
        &self.docker
    }

    /// Run `probe`, giving it at most `limit`.
    pub async fn run(&self, probe: &Probe, limit: Duration) -> ProbeResult {
        let started = Instant::now();
        let result = match probe {
            // Exec bounds itself, so that it can kill the command and say so.
            Probe::Exec { command } => run_command(command, limit).await,
            _ => match tokio::time::timeout(limit, self.probe(probe, limit)).await {
                Ok(result) => result,
                Err(_) => Err(format!("timed out after {}", seconds(limit))),
            },
        };
        let latency_ms = started.elapsed().as_millis() as u64;
        let (passed, output) = match result {
            Ok(output) => (true, output),
            Err(output) => (false, output),
        };
        ProbeResult { passed, output: super::cap_output(&output), latency_ms }
    }

    async fn probe(&self, probe: &Probe, limit: Duration) -> Result<String, String> {
        match probe {
            Probe::Http { url, expect_status, body_contains, max_latency_ms } => {
                let tls = if url.starts_with("https://") { Some(self.https_config()?) } else { None };
                http(url, *expect_status, body_contains.as_deref(), *max_latency_ms, tls).await
            }
            Probe::Tcp { host, port } => {
                let stream = connect(host, *port).await?;
                let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| format!("{host}:{port}"));
                Ok(format!("connected to {peer}"))
            }
            Probe::Exec { command } => run_command(command, limit).await,
            Probe::Container { name } => self.container(name).await,
            Probe::DiskFree { path, min_free_percent } => {
                let (path, min) = (path.clone(), *min_free_percent);
                blocking(move || disk_free(Path::new(&path), min)).await
            }
            Probe::Memory { max_used_percent } => {
                let max = *max_used_percent;
                blocking(move || memory(max)).await
            }
            Probe::Load { max_per_core } => {
                let max = *max_per_core;
                blocking(move || load(max)).await
            }
            Probe::Process { name } => {
                let name = name.clone();
                blocking(move || process(&name)).await
            }
            Probe::TlsExpiry { host, port, min_days } => tls_expiry(host, *port, *min_days, crate::wall_ms() / 1000).await,
        }
    }

    fn https_config(&self) -> Result<Arc<ClientConfig>, String> {
        let mut slot = self.https.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(config) = &*slot {
            return Ok(config.clone());
        }
        let roots = system_roots()?;
        let config = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let config = Arc::new(config);
        *slot = Some(config.clone());
        Ok(config)
    }

    /// Passes while the container runs and, if it has a Docker health check, is healthy.
    async fn container(&self, name: &str) -> Result<String, String> {
        let client = self.docker.get().await?;
        let inspect = match client.inspect_container(name, None::<InspectContainerOptions>).await {
            Ok(inspect) => inspect,
            Err(error) if docker::is_gone(&error) => return Err(format!("container {name} does not exist")),
            Err(error) => {
                self.docker.forget_after(&error).await;
                return Err(format!("inspecting container {name} failed: {error}"));
            }
        };
        let state = inspect.state.unwrap_or_default();
        let running = state.status == Some(ContainerStateStatusEnum::RUNNING) && state.running != Some(false);
        if !running {
            let status = state.status.map(|s| s.to_string()).unwrap_or_else(|| "unknown".to_string());
            let exit = match state.exit_code {
                Some(code) if status == "exited" => format!(", exit code {code}"),
                _ => String::new(),
            };
            let oom = if state.oom_killed == Some(true) { ", killed: out of memory" } else { "" };
            return Err(format!("container {name} is not running (state {status}{exit}{oom})"));
        }
        let health = state.health.unwrap_or_default();
        match health.status {
            Some(HealthStatusEnum::HEALTHY) => Ok(format!("container {name} runs and is healthy")),
            None | Some(HealthStatusEnum::NONE) | Some(HealthStatusEnum::EMPTY) => Ok(format!("container {name} runs (no health check)")),
            Some(status) => {
                let last = health
                    .log
                    .as_ref()
                    .and_then(|log| log.last())
                    .map(|result| format!(": health check exit code {}: {}", result.exit_code.unwrap_or(-1), result.output.as_deref().unwrap_or("").trim()))
                    .unwrap_or_default();
                Err(format!("container {name} runs but is {status}{last}"))
            }
        }
    }
}

/// A Docker client connected on first use; dropped after a transport error so that the
/// next use connects again (Docker restarted, socket moved).
#[derive(Debug)]
pub(crate) struct DockerClient {
    config: DockerConfig,
    client: tokio::sync::Mutex<Option<Docker>>,
}

impl DockerClient {
    fn new(config: DockerConfig) -> DockerClient {
        DockerClient { config, client: tokio::sync::Mutex::new(None) }
    }

    /// The client, connecting when there is none.
    pub(crate) async fn get(&self) -> Result<Docker, String> {
        if !self.config.enabled {
            return Err("docker is disabled in the agent configuration (docker.enabled = false)".to_string());
        }
        let mut slot = self.client.lock().await;
        if let Some(client) = &*slot {
            return Ok(client.clone());
        }
        match docker::connect(&self.config).await {
            Ok(attached) => {
                *slot = Some(attached.docker.clone());
                Ok(attached.docker)
            }
            Err(error) => Err(format!("docker at {} is not reachable: {error}", self.config.endpoint())),
        }
    }

    /// Forget the client when `error` is not an answer from Docker.
    pub(crate) async fn forget_after(&self, error: &bollard::errors::Error) {
        if !matches!(error, bollard::errors::Error::DockerResponseServerError { .. }) {
            *self.client.lock().await = None;
        }
    }
}

/// `limit` as `5s` or `250ms`.
pub(crate) fn seconds(limit: Duration) -> String {
    if limit.subsec_millis() == 0 {
        format!("{}s", limit.as_secs())
    } else {
        format!("{}ms", limit.as_millis())
    }
}

async fn blocking(work: impl FnOnce() -> Result<String, String> + Send + 'static) -> Result<String, String> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|error| Err(format!("probe failed: {error}")))
}

/// Connect to `host:port`, trying each address the name resolves to in turn.
async fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await.map_err(|e| format!("cannot resolve {host}: {e}"))?.collect();
    let mut last = format!("{host} resolves to no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last = format!("connect to {addr}: {error}"),
        }
    }
    Err(last)
}

/// An HTTP(S) GET: passes when the status is `expect_status` (any 2xx or 3xx when absent),
/// the first [`MAX_BODY_BYTES`] of the body contain `body_contains` and the whole exchange
/// took at most `max_latency_ms`. `tls` is required for `https://` URLs.
pub async fn http(
    url: &str,
    expect_status: Option<u16>,
    body_contains: Option<&str>,
    max_latency_ms: Option<u64>,
    tls: Option<Arc<ClientConfig>>,
) -> Result<String, String> {
    let started = Instant::now();
    let parsed = parse_http_url(url)?;
    let tcp = connect(&parsed.host, parsed.port).await?;
    let mut conn = if parsed.tls {
        let config = tls.ok_or_else(|| "https is not set up in this agent".to_string())?;
        Conn::Tls(Box::new(TlsStream::connect(tcp, config, &parsed.host).await?))
    } else {
        Conn::Plain(tcp)
    };
    let default_port = if parsed.tls { 443 } else { 80 };
    let host = if parsed.host.contains(':') { format!("[{}]", parsed.host) } else { parsed.host.clone() };
    let authority = if parsed.port == default_port { host } else { format!("{host}:{}", parsed.port) };
    let request = format!("GET {} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: gantry-agent\r\nAccept: */*\r\nConnection: close\r\n\r\n", parsed.path);
    conn.write_all(request.as_bytes()).await?;
    let (status, body) = read_response(&mut conn).await?;
    let elapsed = started.elapsed().as_millis() as u64;
    let status_ok = match expect_status {
        Some(expected) => status == expected,
        None => (200..400).contains(&status),
    };
    if !status_ok {
        let expected = expect_status.map(|s| s.to_string()).unwrap_or_else(|| "2xx or 3xx".to_string());
        return Err(format!("GET {url}: status {status}, expected {expected}"));
    }
    if let Some(needle) = body_contains {
        if !contains(&body, needle.as_bytes()) {
            return Err(format!("GET {url}: status {status}, but the body does not contain {needle:?}"));
        }
    }
    if let Some(max) = max_latency_ms {
        if elapsed > max {
            return Err(format!("GET {url}: status {status} after {elapsed} ms, more than {max} ms"));
        }
    }
    Ok(format!("GET {url}: status {status} in {elapsed} ms"))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Read the status and up to [`MAX_BODY_BYTES`] of the body: until the peer closes, the
/// `Content-Length` is reached or the body cap is.
async fn read_response(conn: &mut Conn) -> Result<(u16, Vec<u8>), String> {
    let mut data = Vec::new();
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if data.len() > MAX_HEAD_BYTES {
            return Err(format!("the response head is longer than {MAX_HEAD_BYTES} bytes"));
        }
        if conn.read_some(&mut data).await? == 0 {
            if data.is_empty() {
                return Err("the server closed the connection without answering".to_string());
            }
            // HTTP/0.9-style or truncated answers: judge what there is.
            break data.len();
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let status_line = head.lines().next().unwrap_or("");
    let mut parts = status_line.split_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") => code.parse::<u16>().ok(),
        _ => None,
    };
    let Some(status) = status else {
        let shown: String = status_line.chars().take(80).collect();
        return Err(format!("not an HTTP response: {shown:?}"));
    };
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if name.trim().eq_ignore_ascii_case("content-length") {
            value.trim().parse::<usize>().ok()
        } else {
            None
        }
    });
    let wanted = length.unwrap_or(usize::MAX).min(MAX_BODY_BYTES);
    while data.len() - head_end < wanted {
        if conn.read_some(&mut data).await? == 0 {
            break;
        }
    }
    let end = data.len().min(head_end + MAX_BODY_BYTES);
    Ok((status, data[head_end..end].to_vec()))
}

/// A plain or TLS connection, as the HTTP probe uses it.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Conn {
    async fn write_all(&mut self, data: &[u8]) -> Result<(), String> {
        match self {
            Conn::Plain(tcp) => tcp.write_all(data).await.map_err(|e| format!("sending the request: {e}")),
            Conn::Tls(tls) => tls.write_all(data).await,
        }
    }

    /// Append what arrives next to `out`; 0 at the end of the stream.
    async fn read_some(&mut self, out: &mut Vec<u8>) -> Result<usize, String> {
        match self {
            Conn::Plain(tcp) => {
                let mut buf = [0u8; 8192];
                let n = tcp.read(&mut buf).await.map_err(|e| format!("reading the response: {e}"))?;
                out.extend_from_slice(&buf[..n]);
                Ok(n)
            }
            Conn::Tls(tls) => tls.read_some(out).await,
        }
    }
}

/// A rustls client connection driven over a tokio socket (the workspace has no
/// tokio-rustls): records go through `read_tls`/`write_tls`, plaintext is drained into
/// `plain` after every packet so rustls's buffer never fills.
struct TlsStream {
    tcp: TcpStream,
    tls: rustls::ClientConnection,
    plain: Vec<u8>,
    /// The peer closed (TCP end or close_notify).
    closed: bool,
}

impl TlsStream {
    /// Connect over `tcp` and finish the handshake.
    async fn connect(tcp: TcpStream, config: Arc<ClientConfig>, host: &str) -> Result<TlsStream, String> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?} is not a TLS server name: {e}"))?;
        let tls = rustls::ClientConnection::new(config, name).map_err(|e| format!("tls setup: {e}"))?;
        let mut stream = TlsStream { tcp, tls, plain: Vec::new(), closed: false };
        while stream.tls.is_handshaking() {
            stream.flush().await?;
            if !stream.tls.is_handshaking() {
                break;
            }
            if stream.closed {
                return Err("the server closed the connection during the TLS handshake".to_string());
            }
            stream.fill().await?;
        }
        stream.flush().await?;
        Ok(stream)
    }

    async fn flush(&mut self) -> Result<(), String> {
        while self.tls.wants_write() {
            let mut buf = Vec::new();
            self.tls.write_tls(&mut buf).map_err(|e| format!("tls: {e}"))?;
            self.tcp.write_all(&buf).await.map_err(|e| format!("tls: sending: {e}"))?;
        }
        Ok(())
    }

    /// Read one chunk from the socket and process it.
    async fn fill(&mut self) -> Result<(), String> {
        let mut buf = vec![0u8; 16 * 1024];
        let n = self.tcp.read(&mut buf).await.map_err(|e| format!("tls: reading: {e}"))?;
        if n == 0 {
            self.closed = true;
            // An empty read tells rustls the stream ended.
            let _ = self.tls.read_tls(&mut &[][..]);
        }
        let mut rest = &buf[..n];
        loop {
            if !rest.is_empty() {
                self.tls.read_tls(&mut rest).map_err(|e| format!("tls: {e}"))?;
            }
            if let Err(error) = self.tls.process_new_packets() {
                // Send the alert that explains the failure, then give up.
                let _ = self.flush().await;
                return Err(format!("tls: {error}"));
            }
            self.drain()?;
            if rest.is_empty() {
                return Ok(());
            }
        }
    }

    fn drain(&mut self) -> Result<(), String> {
        let mut buf = [0u8; 8192];
        loop {
            match self.tls.reader().read(&mut buf) {
                Ok(0) => {
                    self.closed = true;
                    return Ok(());
                }
                Ok(n) => self.plain.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                // Many servers close without close_notify; the body is complete for us.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    self.closed = true;
                    return Ok(());
                }
                Err(e) => return Err(format!("tls: {e}")),
            }
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> Result<(), String> {
        self.tls.writer().write_all(data).map_err(|e| format!("tls: {e}"))?;
        self.flush().await
    }

    async fn read_some(&mut self, out: &mut Vec<u8>) -> Result<usize, String> {
        loop {
            if !self.plain.is_empty() {
                let n = self.plain.len();
                out.append(&mut self.plain);
                return Ok(n);
            }
            if self.closed {
                return Ok(0);
            }
            self.fill().await?;
        }
    }
}

/// Accepts any server certificate (the expiry probe judges the certificate itself, not
/// the chain) while still checking the handshake signatures.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Handshake with `host:port` and judge the end-entity certificate it presents, trusted or
/// not: fails when fewer than `min_days` days remain before its `notAfter` (at `now_unix`).
pub async fn tls_expiry(host: &str, port: u16, min_days: u32, now_unix: i64) -> Result<String, String> {
    let provider = crate::tls::provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
        .with_no_client_auth();
    let tcp = connect(host, port).await?;
    let stream = TlsStream::connect(tcp, Arc::new(config), host).await?;
    let der = stream.tls.peer_certificates().and_then(|chain| chain.first()).ok_or_else(|| format!("{host}:{port} presented no certificate"))?;
    let (not_after, subject) = certificate_facts(der.as_ref())?;
    let left = not_after - now_unix;
    let days = left.div_euclid(86_400);
    let when = time::OffsetDateTime::from_unix_timestamp(not_after)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| not_after.to_string());
    if left < 0 {
        return Err(format!("certificate of {host}:{port} ({subject}) expired {} days ago ({when})", (-left) / 86_400));
    }
    let text = format!("certificate of {host}:{port} ({subject}) expires in {days} days ({when})");
    if left < i64::from(min_days) * 86_400 {
        Err(format!("{text}, fewer than {min_days}"))
    } else {
        Ok(text)
    }
}

/// `notAfter` (Unix seconds) and subject of a DER certificate.
fn certificate_facts(der: &[u8]) -> Result<(i64, String), String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    let subject = cert.subject().to_string();
    let subject = if subject.is_empty() { "no subject".to_string() } else { subject };
    Ok((cert.validity().not_after.timestamp(), subject))
}

/// The system's CA bundle as a root store.
fn system_roots() -> Result<RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    let from_env = std::env::var("SSL_CERT_FILE").ok();
    let candidates = from_env.iter().map(String::as_str).chain(CA_BUNDLES);
    for path in candidates {
        let Ok(iter) = CertificateDer::pem_file_iter(path) else { continue };
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(iter.filter_map(Result::ok));
        if added > 0 {
            return Ok(roots);
        }
    }
    Err(format!("no CA certificates found for https checks (SSL_CERT_FILE, {})", CA_BUNDLES.join(", ")))
}

/// Run `argv` (no shell) with stdin closed, killing it after `limit`. `Ok` on exit code
/// 0; either way the text says how it ended, with the end of its output (stdout, then
/// stderr).
pub async fn run_command(argv: &[String], limit: Duration) -> Result<String, String> {
    use std::process::Stdio;
    let Some((program, args)) = argv.split_first() else {
        return Err("no command given".to_string());
    };
    let mut command = tokio::process::Command::new(program);
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| format!("cannot run {program}: {e}"))?;
    let buffers = [Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new()))];
    let mut readers = tokio::task::JoinSet::new();
    if let Some(pipe) = child.stdout.take() {
        readers.spawn(read_capped(pipe, buffers[0].clone()));
    }
    if let Some(pipe) = child.stderr.take() {
        readers.spawn(read_capped(pipe, buffers[1].clone()));
    }
    let started = Instant::now();
    let (status, grace) = match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) => (Some(status), limit.saturating_sub(started.elapsed()).min(OUTPUT_GRACE)),
        Ok(Err(error)) => return Err(format!("waiting for {program} failed: {error}")),
        Err(_) => {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
            (None, KILLED_GRACE)
        }
    };
    // Pipes still open after the exit belong to a background child: take what was read.
    let _ = tokio::time::timeout(grace, async { while readers.join_next().await.is_some() {} }).await;
    readers.abort_all();
    let mut output = String::new();
    for buffer in &buffers {
        let bytes = buffer.lock().unwrap_or_else(|p| p.into_inner());
        output.push_str(String::from_utf8_lossy(&bytes).trim());
        output.push('\n');
    }
    let output = output.split('\n').filter(|l| !l.trim().is_empty()).collect::<Vec<_>>().join(" | ");
    let with_output = |text: String| if output.is_empty() { text } else { format!("{text}: {output}") };
    match status {
        None => Err(with_output(format!("timed out after {}; killed", seconds(limit)))),
        Some(status) => match status.code() {
            Some(0) => Ok(with_output("exit code 0".to_string())),
            Some(code) => Err(with_output(format!("exit code {code}"))),
            None => {
                use std::os::unix::process::ExitStatusExt;
                Err(with_output(format!("killed by signal {}", status.signal().unwrap_or(0))))
            }
        },
    }
}

/// Read a pipe to its end into `kept`, keeping the last [`MAX_COMMAND_OUTPUT`] bytes.
async fn read_capped(mut pipe: impl tokio::io::AsyncRead + Unpin, kept: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > MAX_COMMAND_OUTPUT {
            let excess = kept.len() - MAX_COMMAND_OUTPUT;
            kept.drain(..excess);
        }
    }
}

/// Free space of the filesystem holding `path` (the mount with the longest mount point
/// that is a prefix of the path, symlinks resolved).
fn disk_free(path: &Path, min_free_percent: f64) -> Result<String, String> {
    let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let disks = sysinfo::Disks::new_with_refreshed_list_specifics(sysinfo::DiskRefreshKind::nothing().with_storage());
    let disk = disks
        .list()
        .iter()
        .filter(|d| resolved.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .ok_or_else(|| format!("no mounted filesystem holds {}", path.display()))?;
    let total = disk.total_space();
    if total == 0 {
        return Err(format!("the filesystem at {} reports no size", disk.mount_point().display()));
    }
    let free = 100.0 * disk.available_space() as f64 / total as f64;
    let text = format!("{:.1} % free on {} (holding {}), at least {min_free_percent} % wanted", free, disk.mount_point().display(), path.display());
    if free >= min_free_percent {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Memory in use (total less available), in percent of the total.
fn memory(max_used_percent: f64) -> Result<String, String> {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    let total = system.total_memory();
    if total == 0 {
        return Err("the host reports no memory".to_string());
    }
    let used = 100.0 * total.saturating_sub(system.available_memory()) as f64 / total as f64;
    let text = format!("memory {used:.1} % used, at most {max_used_percent} % wanted");
    if used <= max_used_percent {
        Ok(text)
    } else {
        Err(text)
    }
}

/// One-minute load average per core.
fn load(max_per_core: f64) -> Result<String, String> {
    let system = sysinfo::System::new_with_specifics(sysinfo::RefreshKind::nothing().with_cpu(sysinfo::CpuRefreshKind::nothing()));
    let cores = match system.cpus().len() {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    };
    let one = sysinfo::System::load_average().one;
    let per_core = one / cores as f64;
    let text = format!("load {one:.2} on {cores} cores = {per_core:.2} per core, at most {max_per_core} wanted");
    if per_core <= max_per_core {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Some live (not zombie) process is named exactly `name`. Linux keeps only the first 15
/// bytes of a process name, so a longer `name` matches on those.
fn process(name: &str) -> Result<String, String> {
    let mut system = sysinfo::System::new();
    system.refresh_processes_specifics(sysinfo::ProcessesToUpdate::All, true, sysinfo::ProcessRefreshKind::nothing().without_tasks());
    let wanted = if name.len() > COMM_BYTES && cfg!(target_os = "linux") { name.as_bytes()[..COMM_BYTES].to_vec() } else { name.as_bytes().to_vec() };
    let matching: Vec<u32> = system
        .processes()
        .iter()
        .filter(|(_, p)| p.name().as_encoded_bytes() == wanted.as_slice() && p.status() != sysinfo::ProcessStatus::Zombie)
        .map(|(pid, _)| pid.as_u32())
        .collect();
    match matching.len() {
        0 => Err(format!("no process named {name:?} runs")),
        1 => Ok(format!("process {name:?} runs (pid {})", matching[0])),
        n => Ok(format!("{n} processes named {name:?} run")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    use rustls::pki_types::PrivateKeyDer;
    use std::net::{IpAddr, Ipv4Addr};

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    /// An HTTP server on loopback answering by path: `/ok` 200 "hello ok", `/fail` 503,
    /// `/slow` 200 after 300 ms, `/hang` never, `/big` 200 with 1 MiB of `a` then `needle`.
    async fn http_server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let request = String::from_utf8_lossy(&request).to_string();
                    let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let response: Vec<u8> = match path.as_str() {
                        "/ok" => b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ok".to_vec(),
                        "/fail" => b"HTTP/1.0 503 Service Unavailable\r\n\r\nbusy".to_vec(),
                        "/slow" => {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            b"HTTP/1.0 200 OK\r\n\r\nslow".to_vec()
                        }
                        "/hang" => {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            return;
                        }
                        "/big" => {
                            let mut body = b"HTTP/1.0 200 OK\r\n\r\n".to_vec();
                            body.extend(std::iter::repeat_n(b'a', 1 << 20));
                            body.extend_from_slice(b"needle");
                            body
                        }
                        "/host" => format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{request}", request.len()).into_bytes(),
                        _ => b"HTTP/1.0 404 Not Found\r\n\r\n".to_vec(),
                    };
                    let _ = socket.write_all(&response).await;
                    // `/host` keeps the connection open: the probe must stop at the length.
                    if path == "/host" {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                });
            }
        });
        addr
    }

    async fn probe(prober: &Prober, probe: Probe, limit: Duration) -> ProbeResult {
        prober.run(&probe, limit).await
    }

    fn http_probe(url: String, expect_status: Option<u16>, body_contains: Option<&str>, max_latency_ms: Option<u64>) -> Probe {
        Probe::Http { url, expect_status, body_contains: body_contains.map(String::from), max_latency_ms }
    }

    #[tokio::test]
    async fn http_probes_judge_status_body_and_latency() {
        let addr = http_server().await;
        let prober = Prober::new(DockerConfig::default());
        let url = |path: &str| format!("http://{addr}{path}");
        let limit = Duration::from_secs(5);

        let ok = probe(&prober, http_probe(url("/ok"), None, Some("hello"), None), limit).await;
        assert!(ok.passed, "{ok:?}");
        assert!(ok.output.contains("status 200"), "{ok:?}");
        let missing = probe(&prober, http_probe(url("/ok"), None, Some("goodbye"), None), limit).await;
        assert!(!missing.passed && missing.output.contains("does not contain \"goodbye\""), "{missing:?}");

        let failing = probe(&prober, http_probe(url("/fail"), None, None, None), limit).await;
        assert!(!failing.passed && failing.output.contains("status 503, expected 2xx or 3xx"), "{failing:?}");
        let expected = probe(&prober, http_probe(url("/fail"), Some(503), None, None), limit).await;
        assert!(expected.passed, "{expected:?}");
        let wrong = probe(&prober, http_probe(url("/ok"), Some(204), None, None), limit).await;
        assert!(!wrong.passed && wrong.output.contains("expected 204"), "{wrong:?}");

        let slow = probe(&prober, http_probe(url("/slow"), None, None, Some(100)), limit).await;
        assert!(!slow.passed && slow.output.contains("more than 100 ms"), "{slow:?}");
        assert!(slow.latency_ms >= 300, "{slow:?}");
        let patient = probe(&prober, http_probe(url("/slow"), None, None, Some(5_000)), limit).await;
        assert!(patient.passed, "{patient:?}");

        let hang = probe(&prober, http_probe(url("/hang"), None, None, None), Duration::from_millis(300)).await;
        assert!(!hang.passed && hang.output == "timed out after 300ms", "{hang:?}");
        assert!(hang.latency_ms < 3_000, "{hang:?}");

        // Only the first 64 KiB of the body count, and reading stops there.
        let big = probe(&prober, http_probe(url("/big"), None, Some("needle"), None), limit).await;
        assert!(!big.passed && big.output.contains("does not contain"), "{big:?}");
        let head = probe(&prober, http_probe(url("/big"), None, Some("aaaa"), None), limit).await;
        assert!(head.passed, "{head:?}");

        // The request names the host and port, and a response that gives its length is
        // complete at that length even when the server keeps the connection open.
        let echoed = probe(&prober, http_probe(url("/host"), None, Some(&format!("Host: {addr}\r\n")), None), Duration::from_secs(2)).await;
        assert!(echoed.passed, "{echoed:?}");
    }

    #[tokio::test]
    async fn tcp_and_http_probes_fail_on_a_closed_port() {
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let prober = Prober::new(DockerConfig::default());
        let limit = Duration::from_secs(5);
        let tcp = probe(&prober, Probe::Tcp { host: "127.0.0.1".into(), port: closed }, limit).await;
        assert!(!tcp.passed && tcp.output.contains("refused"), "{tcp:?}");
        let http = probe(&prober, http_probe(format!("http://127.0.0.1:{closed}/"), None, None, None), limit).await;
        assert!(!http.passed && http.output.contains("refused"), "{http:?}");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap().port();
        let tcp = probe(&prober, Probe::Tcp { host: "localhost".into(), port: open }, limit).await;
        assert!(tcp.passed && tcp.output.contains(&format!("127.0.0.1:{open}")), "{tcp:?}");
    }

    #[tokio::test]
    async fn exec_probes_pass_on_exit_zero_and_kill_on_timeout() {
        let prober = Prober::new(DockerConfig::default());
        let limit = Duration::from_secs(5);
        let ok = probe(&prober, Probe::Exec { command: argv(&["true"]) }, limit).await;
        assert_eq!((ok.passed, ok.output.as_str()), (true, "exit code 0"));
        let failed = probe(&prober, Probe::Exec { command: argv(&["false"]) }, limit).await;
        assert_eq!((failed.passed, failed.output.as_str()), (false, "exit code 1"));
        let output = probe(&prober, Probe::Exec { command: argv(&["sh", "-c", "echo out; echo err >&2; exit 3"]) }, limit).await;
        assert_eq!((output.passed, output.output.as_str()), (false, "exit code 3: out | err"));
        let missing = probe(&prober, Probe::Exec { command: argv(&["/nonexistent/gantry-probe"]) }, limit).await;
        assert!(!missing.passed && missing.output.starts_with("cannot run /nonexistent/gantry-probe"), "{missing:?}");

        let slow = probe(&prober, Probe::Exec { command: argv(&["sh", "-c", "echo started; sleep 30; echo never"]) }, Duration::from_millis(300)).await;
        assert!(!slow.passed, "{slow:?}");
        assert_eq!(slow.output, "timed out after 300ms; killed: started");
        assert!(slow.latency_ms < 3_000, "{slow:?}");

        // Long output is capped to its end.
        let long = probe(&prober, Probe::Exec { command: argv(&["sh", "-c", "yes x | head -c 100000; echo; echo END"]) }, limit).await;
        assert!(long.passed && long.output.len() <= gantry_shared::checks::MAX_OUTPUT_BYTES && long.output.ends_with("END"), "{long:?}");
    }

    #[tokio::test]
    async fn host_probes_read_this_machine() {
        let prober = Prober::new(DockerConfig::default());
        let limit = Duration::from_secs(10);
        let disk = probe(&prober, Probe::DiskFree { path: "/".into(), min_free_percent: 0.0 }, limit).await;
        assert!(disk.passed && disk.output.contains("% free on /"), "{disk:?}");
        let full = probe(&prober, Probe::DiskFree { path: std::env::temp_dir().display().to_string(), min_free_percent: 100.0 }, limit).await;
        assert!(!full.passed && full.output.contains("at least 100 % wanted"), "{full:?}");
        let memory_ok = probe(&prober, Probe::Memory { max_used_percent: 100.0 }, limit).await;
        assert!(memory_ok.passed, "{memory_ok:?}");
        let memory_low = probe(&prober, Probe::Memory { max_used_percent: 0.0 }, limit).await;
        assert!(!memory_low.passed && memory_low.output.contains("% used"), "{memory_low:?}");
        let load_ok = probe(&prober, Probe::Load { max_per_core: 1000.0 }, limit).await;
        assert!(load_ok.passed && load_ok.output.contains("per core"), "{load_ok:?}");

        // This test binary's own name (at most 15 bytes are kept by Linux).
        let exe = std::env::current_exe().unwrap();
        let own = exe.file_name().unwrap().to_string_lossy().into_owned();
        let present = probe(&prober, Probe::Process { name: own.clone() }, limit).await;
        assert!(present.passed, "{own}: {present:?}");
        let absent = probe(&prober, Probe::Process { name: "gantry-no-such-process".into() }, limit).await;
        assert!(!absent.passed && absent.output.contains("no process named"), "{absent:?}");
    }

    /// A CA, and a certificate it signed for 127.0.0.1 valid until `not_after`.
    fn certificate(not_after: time::OffsetDateTime) -> (RootCertStore, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "gantry test ca");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_ca_cert_der(ca.der(), ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.subject_alt_names = vec![SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))];
        params.distinguished_name.push(DnType::CommonName, "probe.test");
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = not_after;
        let cert = params.signed_by(&key, &issuer).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        (roots, vec![cert.der().clone()], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
    }

    /// A TLS server on loopback (a plain thread with rustls) answering every request with
    /// `200 secure`.
    fn tls_server(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> u16 {
        let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let config = Arc::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for socket in listener.incoming() {
                let Ok(socket) = socket else { return };
                let config = config.clone();
                std::thread::spawn(move || {
                    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let conn = rustls::ServerConnection::new(config).unwrap();
                    let mut stream = rustls::StreamOwned::new(conn, socket);
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure");
                    stream.conn.send_close_notify();
                    let _ = stream.flush();
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn https_and_certificate_expiry_against_a_local_tls_server() {
        let now = time::OffsetDateTime::now_utc();
        let (roots, chain, key) = certificate(now + time::Duration::days(10) + time::Duration::hours(1));
        let port = tls_server(chain, key);
        let limit = Duration::from_secs(5);

        let trusting = Prober::new(DockerConfig::default()).with_https_roots(roots).unwrap();
        let url = format!("https://127.0.0.1:{port}/health");
        let ok = probe(&trusting, http_probe(url.clone(), Some(200), Some("secure"), None), limit).await;
        assert!(ok.passed, "{ok:?}");
        let (other_roots, _, _) = certificate(now + time::Duration::days(10));
        let distrusting = Prober::new(DockerConfig::default()).with_https_roots(other_roots).unwrap();
        let untrusted = probe(&distrusting, http_probe(url, None, None, None), limit).await;
        assert!(!untrusted.passed && untrusted.output.contains("tls:"), "{untrusted:?}");

        // Expiry is judged whatever the trust.
        let soon = probe(&distrusting, Probe::TlsExpiry { host: "127.0.0.1".into(), port, min_days: 30 }, limit).await;
        assert!(!soon.passed, "{soon:?}");
        assert!(soon.output.contains("expires in 10 days") && soon.output.contains("CN=probe.test") && soon.output.contains("fewer than 30"), "{soon:?}");
        let fine = probe(&distrusting, Probe::TlsExpiry { host: "127.0.0.1".into(), port, min_days: 7 }, limit).await;
        assert!(fine.passed && fine.output.contains("expires in 10 days"), "{fine:?}");

        let (_, chain, key) = certificate(now - time::Duration::days(3) - time::Duration::hours(1));
        let expired_port = tls_server(chain, key);
        let expired = probe(&distrusting, Probe::TlsExpiry { host: "127.0.0.1".into(), port: expired_port, min_days: 0 }, limit).await;
        assert!(!expired.passed && expired.output.contains("expired 3 days ago"), "{expired:?}");
    }

    #[tokio::test]
    async fn container_probes_fail_clearly_without_docker() {
        let disabled = DockerConfig { enabled: false, ..DockerConfig::default() };
        let result = Prober::new(disabled).run(&Probe::Container { name: "web".into() }, Duration::from_secs(5)).await;
        assert!(!result.passed && result.output.contains("docker is disabled"), "{result:?}");
        let absent = DockerConfig { host: Some("unix:///nonexistent/docker.sock".into()), ..DockerConfig::default() };
        let result = Prober::new(absent).run(&Probe::Container { name: "web".into() }, Duration::from_secs(5)).await;
        assert!(!result.passed && result.output.contains("not reachable"), "{result:?}");
    }
}
