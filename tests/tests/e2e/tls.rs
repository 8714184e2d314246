//! HTTPS end to end: real hubs serving TLS with a self-signed certificate and with
//! certificate files, talked to by a client that trusts only that certificate (the session
//! cookie becomes `__Host-gantry_session` with `Secure`, HSTS is sent, plain HTTP to the
//! port gets no answer, bad files stop the start naming the file), and the client address
//! behind a trusted reverse proxy (`X-Forwarded-For` decides it for login throttling and
//! the audit log only when the peer is a listed proxy).

#![allow(clippy::unwrap_used)]

use gantry_hub::config::{TlsConfig, TlsMode};
use gantry_tests::*;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Header `name` of a response as text ("" if absent).
fn header<'a>(headers: &'a hyper::HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

fn login_body(email: &str, password: &str) -> Vec<u8> {
    json!({ "email": email, "password": password }).to_string().into_bytes()
}

/// The self-signed certificate a hub made, as PEM.
fn self_signed_pem(data: &Path) -> String {
    std::fs::read_to_string(data.join("pki").join("https.crt")).expect("self-signed certificate in DATA/pki")
}

/// Bytes a plain-HTTP client gets back from `addr` for a GET (until the server closes).
async fn plain_http_answer(addr: SocketAddr) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    // A reset instead of a clean close is as much a refusal, so the read's result is not
    // checked; only that the hub ends the connection.
    let _ = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer)).await.expect("the hub closes the connection");
    answer
}

/// A TLS connection to `addr` (as `localhost`, trusting `pem`) that sends nothing.
async fn tls_connect(addr: SocketAddr, pem: &str) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_signed_hub_serves_https_with_a_host_only_secure_cookie_and_hsts() {
    let dir = TempDir::new("tls-self-signed");
    let self_signed = |config: &mut gantry_hub::config::Config| config.tls = TlsConfig { mode: TlsMode::SelfSigned, ..TlsConfig::default() };
    let hub = TestHub::start_tls(dir.path(), self_signed).await;
    assert!(hub.hub.config.public_url().starts_with("https://"), "{}", hub.hub.config.public_url());
    let pem = self_signed_pem(dir.path());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("pki").join("https.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the key is readable by its owner only");
    }

    let (status, headers, _) = https_send(hub.http, "localhost", &pem, "GET", "/healthz", &[], Vec::new()).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "strict-transport-security"), "max-age=31536000", "{headers:?}");

    // Login over HTTPS sets the `__Host-` cookie: Secure, Path=/, no Domain.
    let json = [("content-type", "application/json")];
    let (status, headers, body) =
        https_send(hub.http, "localhost", &pem, "POST", "/api/v1/auth/login", &json, login_body(ADMIN_EMAIL, ADMIN_PASSWORD)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let cookie = header(&headers, "set-cookie");
    let value = cookie.strip_prefix("__Host-gantry_session=").and_then(|rest| rest.split(';').next()).unwrap_or_else(|| panic!("{cookie}"));
    let attributes: Vec<&str> = cookie.split(';').skip(1).map(str::trim).collect();
    for wanted in ["Secure", "Path=/", "HttpOnly", "SameSite=Lax"] {
        assert!(attributes.contains(&wanted), "{wanted} missing: {cookie}");
    }
    assert!(!cookie.to_ascii_lowercase().contains("domain"), "{cookie}");

    // The hub reads the cookie by the same name, and only by it.
    let secure_cookie = format!("__Host-gantry_session={value}");
    let (status, _, body) = https_send(hub.http, "localhost", &pem, "GET", "/api/v1/auth/me", &[("cookie", &secure_cookie)], Vec::new()).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let plain_cookie = format!("gantry_session={value}");
    let (status, _, _) = https_send(hub.http, "localhost", &pem, "GET", "/api/v1/auth/me", &[("cookie", &plain_cookie)], Vec::new()).await.unwrap();
    assert_eq!(status, 401, "the plain-HTTP cookie name is not accepted over HTTPS");

    // Plain HTTP to the TLS port gets no HTTP answer.
    let answer = plain_http_answer(hub.http).await;
    assert!(!answer.starts_with(b"HTTP/"), "plain HTTP was answered: {}", String::from_utf8_lossy(&answer));
    assert_eq!(hub.api().get_status("/healthz").await, 0);

    // Shutdown neither waits for an idle HTTPS connection nor for a handshake that never
    // started, and releases the port.
    let idle = tls_connect(hub.http, &pem).await;
    let silent = tokio::net::TcpStream::connect(hub.http).await.unwrap();
    let (addr, started) = (hub.http, std::time::Instant::now());
    hub.stop().await;
    assert!(started.elapsed() < Duration::from_secs(4), "stopping took {:?}", started.elapsed());
    std::net::TcpListener::bind(addr).expect("the HTTPS port is released");
    drop((idle, silent));

    // The certificate is made once: a restart serves the same one.
    let hub = TestHub::start_tls(dir.path(), self_signed).await;
    assert_eq!(self_signed_pem(dir.path()), pem, "the self-signed certificate is kept across restarts");
    let (status, _, _) = https_send(hub.http, "localhost", &pem, "GET", "/healthz", &[], Vec::new()).await.unwrap();
    assert_eq!(status, 200);
    hub.stop().await;
}

/// A CA and a `localhost` certificate it signed: (CA PEM, chain PEM (leaf, CA), key PEM).
fn certificate_files() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_ca_cert_der(ca.der(), ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    (ca.pem(), format!("{}{}", leaf.pem(), ca.pem()), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_serves_https_from_certificate_files() {
    let dir = TempDir::new("tls-files");
    let (ca, chain, key) = certificate_files();
    let (cert_file, key_file) = (write(dir.path(), "hub.crt", &chain), write(dir.path(), "hub.key", &key));
    let data = dir.path().join("data");
    let hub = TestHub::start_tls(&data, |config| {
        config.tls = TlsConfig { mode: TlsMode::Files, cert_file: Some(cert_file), key_file: Some(key_file) };
    })
    .await;
    assert!(!data.join("pki").join("https.crt").exists(), "no self-signed certificate is made when files are given");

    let (status, headers, _) = https_send(hub.http, "localhost", &ca, "GET", "/healthz", &[], Vec::new()).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "strict-transport-security"), "max-age=31536000");
    let json = [("content-type", "application/json")];
    let (status, headers, _) =
        https_send(hub.http, "localhost", &ca, "POST", "/api/v1/auth/login", &json, login_body(ADMIN_EMAIL, ADMIN_PASSWORD)).await.unwrap();
    assert_eq!(status, 200);
    assert!(header(&headers, "set-cookie").starts_with("__Host-gantry_session="), "{headers:?}");

    // A client that trusts another CA refuses the hub.
    let (other_ca, _, _) = certificate_files();
    let error = https_send(hub.http, "localhost", &other_ca, "GET", "/healthz", &[], Vec::new()).await.unwrap_err();
    assert!(format!("{error:#}").contains("TLS handshake"), "{error:#}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_files_stop_the_start_and_name_the_file() {
    let dir = TempDir::new("tls-bad-files");
    let data = dir.path().join("data");
    let (_, chain, _) = certificate_files();
    let cert_file = write(dir.path(), "hub.crt", &chain);
    let not_a_key = write(dir.path(), "hub.key", "this is not a key\n");
    let missing = dir.path().join("missing.crt");

    // In-process: `run` refuses before serving anything.
    gantry_hub::init(&data, "127.0.0.1:7443", ADMIN_EMAIL, Some(ADMIN_PASSWORD)).unwrap();
    for (cert, key, wanted) in [(&missing, &not_a_key, "reading TLS certificate file"), (&cert_file, &not_a_key, "holds no private key")] {
        let tls = TlsConfig { mode: TlsMode::Files, cert_file: Some(cert.clone()), key_file: Some(key.clone()) };
        let config = gantry_hub::config::Config { data_dir: data.clone(), public_addr: Some("127.0.0.1:7443".into()), tls, ..Default::default() };
        let hub = gantry_hub::Hub::open(config).unwrap();
        let listeners =
            gantry_hub::Listeners { http: std::net::TcpListener::bind("127.0.0.1:0").unwrap(), quic: std::net::UdpSocket::bind("127.0.0.1:0").unwrap() };
        let run = gantry_hub::run(hub, listeners, std::future::pending());
        let error = tokio::time::timeout(Duration::from_secs(10), run).await.expect("start fails at once").unwrap_err();
        let message = format!("{error:#}");
        let file = if wanted.contains("key") { key } else { cert };
        assert!(message.contains(wanted) && message.contains(&file.display().to_string()), "{message}");
    }

    // The program: exits with an error naming the missing file.
    let (http, quic) = free_addrs();
    let output = tokio::process::Command::new(hub_binary())
        .args(["serve", "--data"])
        .arg(&data)
        .args(["--http", &http.to_string(), "--quic", &quic.to_string()])
        .env("GANTRY_TLS_CERT", &missing)
        .env("GANTRY_TLS_KEY", &not_a_key)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output).await.expect("the hub exits").unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("reading TLS certificate file {}", missing.display())) && stderr.contains("No such file"), "{stderr}");
}

/// A plain-HTTP request to `hub` with extra `headers`.
async fn send(hub: &TestHub, method: &str, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
    let mut request = hyper::Request::builder().method(method).uri(format!("http://{}{path}", hub.http));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client.request(request.body(Full::new(bytes::Bytes::from(body))).unwrap()).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A JSON login from "behind" `forwarded_for`.
async fn login_via(hub: &TestHub, forwarded_for: &str, password: &str) -> u16 {
    let headers = [("content-type", "application/json"), ("x-forwarded-for", forwarded_for)];
    send(hub, "POST", "/api/v1/auth/login", &headers, login_body(ADMIN_EMAIL, password)).await.0
}

/// The client addresses the audit log recorded for login attempts, oldest first.
async fn audited_login_addresses(hub: &TestHub) -> Vec<String> {
    let (status, all) = hub.api().get("/api/v1/audit").await;
    assert_eq!(status, 200, "{all}");
    let mut addresses: Vec<String> = all["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "POST /api/v1/auth/login")
        .map(|e| e["client_ip"].as_str().unwrap_or_default().to_string())
        .collect();
    addresses.reverse();
    addresses
}

fn small_login_limits(config: &mut gantry_hub::config::Config) {
    config.rate_limit.login_failures_per_account = 100;
    config.rate_limit.login_failures_per_ip = 3;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_forwarded_address_is_throttled_and_audited() {
    let dir = TempDir::new("tls-trusted-proxy");
    let hub = TestHub::start(dir.path(), |config| {
        small_login_limits(config);
        config.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    })
    .await;
    // Three failures from one client behind the proxy use up that client's failures.
    for _ in 0..3 {
        assert_eq!(login_via(&hub, "203.0.113.7", "wrong password!!").await, 401);
    }
    assert_eq!(login_via(&hub, "203.0.113.7", ADMIN_PASSWORD).await, 429);
    // Prepending another address does not get the client out of it.
    assert_eq!(login_via(&hub, "198.51.100.1, 203.0.113.7", ADMIN_PASSWORD).await, 429);
    // Another client behind the same proxy is not affected.
    assert_eq!(login_via(&hub, "203.0.113.8", ADMIN_PASSWORD).await, 200);

    let addresses = audited_login_addresses(&hub).await;
    assert_eq!(addresses.first().map(String::as_str), Some("203.0.113.7"), "{addresses:?}");
    assert_eq!(addresses.last().map(String::as_str), Some("203.0.113.8"), "{addresses:?}");
    assert!(!addresses.iter().any(|a| a == "127.0.0.1" || a == "198.51.100.1"), "{addresses:?}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_trusted_proxies_forwarded_addresses_are_ignored() {
    let dir = TempDir::new("tls-untrusted-proxy");
    let hub = TestHub::start(dir.path(), small_login_limits).await;
    assert!(hub.hub.config.trusted_proxies.is_empty());
    // Claiming a new address with every guess does not escape the per-address limit.
    for fake in ["203.0.113.1", "203.0.113.2", "203.0.113.3"] {
        assert_eq!(login_via(&hub, fake, "wrong password!!").await, 401);
    }
    assert_eq!(login_via(&hub, "203.0.113.4", ADMIN_PASSWORD).await, 429);
    let headers = [("content-type", "application/json"), ("forwarded", "for=203.0.113.5")];
    assert_eq!(send(&hub, "POST", "/api/v1/auth/login", &headers, login_body(ADMIN_EMAIL, ADMIN_PASSWORD)).await.0, 429);

    let addresses = audited_login_addresses(&hub).await;
    assert_eq!(addresses.len(), 5, "{addresses:?}");
    assert!(addresses.iter().all(|a| a == "127.0.0.1"), "the TCP peer is recorded: {addresses:?}");
    // Over plain HTTP no HSTS is sent.
    let (_, headers, _) = hub.api().anonymous().send("GET", "/healthz", None, Vec::new()).await;
    assert!(headers.get("strict-transport-security").is_none(), "{headers:?}");
    hub.stop().await;
}
