//! HTTPS on the hub's HTTP port: the certificate (PEM files the operator provides, or a
//! self-signed one made on first start and kept in `DATA/pki/`) and the accept loop that
//! terminates TLS and hands each connection to the same axum router the plain path serves.
//!
//! Handlers see no difference: every request carries `ConnectInfo<SocketAddr>` with the TCP
//! peer, as under `axum::serve`. This module decides nothing about cookies, headers or
//! client addresses (see `config::Config::secure_cookies` and `api`), and must not touch the
//! store.

use crate::config::{Config, TlsMode};
use anyhow::{bail, Context};
use axum::extract::ConnectInfo;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// File name (in `DATA/pki/`) of the self-signed HTTPS certificate.
pub const SELF_SIGNED_CERT_FILE: &str = "https.crt";
/// File name (in `DATA/pki/`, mode 0600) of the self-signed certificate's key.
pub const SELF_SIGNED_KEY_FILE: &str = "https.key";
/// Lifetime of a self-signed certificate.
pub const SELF_SIGNED_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// A self-signed certificate with less than this left is replaced at startup.
pub const SELF_SIGNED_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// A client that has not finished its TLS handshake within this long is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that has not sent a request's headers within this long is dropped.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The rustls server config for the HTTP port, or `None` when `config.tls.mode` is off.
/// `public_addr` (the agents' `HOST:PORT`) names the host a self-signed certificate is
/// made for. Errors name the file and what is wrong with it.
pub fn server_config(config: &Config, public_addr: &str) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    let (cert_file, key_file) = match config.tls.mode {
        TlsMode::Off => return Ok(None),
        TlsMode::Files => match (&config.tls.cert_file, &config.tls.key_file) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            _ => bail!("tls.mode = \"files\" needs both tls.cert_file and tls.key_file"),
        },
        TlsMode::SelfSigned => ensure_self_signed(config, public_addr)?,
    };
    let chain = read_certificates(&cert_file)?;
    let key = read_private_key(&key_file)?;
    if let Some(not_after) = not_after(&chain[0]) {
        let left = not_after - crate::wall_ms() / 1000;
        if left <= 0 {
            tracing::warn!(file = %cert_file.display(), "the TLS certificate has expired; browsers will refuse it");
        } else if left < SELF_SIGNED_RENEW_BEFORE.as_secs() as i64 {
            tracing::warn!(file = %cert_file.display(), days_left = left / 86_400, "the TLS certificate expires soon");
        }
    }
    let fingerprint = crate::pki::sha256_hex(chain[0].as_ref());
    let mut tls = rustls::ServerConfig::builder_with_provider(gantry_agent::tls::provider())
        .with_safe_default_protocol_versions()
        .context("choosing TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| format!("TLS key file {} does not fit certificate file {}", key_file.display(), cert_file.display()))?;
    // Only HTTP/1.1 is served; saying so spares clients a failed HTTP/2 attempt.
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tracing::info!(cert = %cert_file.display(), sha256 = %fingerprint, "serving HTTPS");
    Ok(Some(Arc::new(tls)))
}

/// Every certificate in the PEM file at `path`, leaf first; an error naming the file when
/// it cannot be read or holds none.
fn read_certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading TLS certificate file {}", path.display()))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("TLS certificate file {} is not valid PEM: {e}", path.display()))?;
    if chain.is_empty() {
        bail!("TLS certificate file {} holds no certificate (expected a PEM \"BEGIN CERTIFICATE\" block)", path.display());
    }
    if let Some(bad) = chain.iter().position(|der| not_after(der).is_none()) {
        bail!("TLS certificate file {}: certificate {} of the chain is not a valid X.509 certificate", path.display(), bad + 1);
    }
    Ok(chain)
}

/// The private key in the PEM file at `path`; an error naming the file when it cannot be
/// read or holds none.
fn read_private_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("reading TLS key file {}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            anyhow::anyhow!("TLS key file {} holds no private key (expected a PEM PKCS#8, PKCS#1 or SEC1 key block)", path.display())
        }
        other => anyhow::anyhow!("TLS key file {} is not valid PEM: {other}", path.display()),
    })
}

/// Expiry of a DER certificate, in Unix seconds; `None` if it does not parse.
fn not_after(der: &[u8]) -> Option<i64> {
    use x509_parser::prelude::*;
    let (_, parsed) = X509Certificate::from_der(der).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// The self-signed certificate and key files, made now if they are missing or close to
/// expiry.
fn ensure_self_signed(config: &Config, public_addr: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = config.data_dir.join("pki");
    let (cert_file, key_file) = (dir.join(SELF_SIGNED_CERT_FILE), dir.join(SELF_SIGNED_KEY_FILE));
    let current = std::fs::read(&cert_file).ok().and_then(|pem| CertificateDer::from_pem_slice(&pem).ok()).and_then(|der| not_after(&der));
    let fresh = current.is_some_and(|not_after| not_after - crate::wall_ms() / 1000 > SELF_SIGNED_RENEW_BEFORE.as_secs() as i64);
    if fresh && key_file.exists() {
        return Ok((cert_file, key_file));
    }
    let names = self_signed_names(config, public_addr);
    let (cert_pem, key_pem) = make_self_signed(&names)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    gantry_agent::state::write_atomic(&key_file, key_pem.as_bytes())?;
    std::fs::write(&cert_file, cert_pem).with_context(|| format!("writing {}", cert_file.display()))?;
    let names: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    tracing::info!(cert = %cert_file.display(), names = %names.join(","), "made a self-signed HTTPS certificate");
    Ok((cert_file, key_file))
}

/// Names a self-signed certificate covers: `localhost`, the loopback addresses, and the
/// hosts of `public_addr`, `public_url` and a specific `http_addr`.
fn self_signed_names(config: &Config, public_addr: &str) -> Vec<SanType> {
    let mut hosts: Vec<String> = vec!["localhost".into(), Ipv4Addr::LOCALHOST.to_string(), Ipv6Addr::LOCALHOST.to_string()];
    hosts.push(host_of(public_addr).to_string());
    if let Some(url) = &config.public_url {
        let authority = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest).split('/').next().unwrap_or_default();
        hosts.push(host_of(authority).to_string());
    }
    if !config.http_addr.ip().is_unspecified() {
        hosts.push(config.http_addr.ip().to_string());
    }
    let mut names = Vec::new();
    for host in hosts {
        let name = match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => match host.as_str().try_into() {
                Ok(dns) if !host.is_empty() => SanType::DnsName(dns),
                _ => continue,
            },
        };
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// The host part of `HOST:PORT`, `HOST` or `[V6]:PORT`.
fn host_of(authority: &str) -> &str {
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() && (!host.contains(':') || host.ends_with(']')) => host,
        _ => authority,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A self-signed server certificate for `names`: (certificate PEM, key PEM).
fn make_self_signed(names: &[SanType]) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating the HTTPS key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "Gantry Hub (self-signed)");
    params.subject_alt_names = names.to_vec();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    // Backdated a little so clients with a slow clock accept it at once.
    params.not_before = now - crate::pki::BACKDATE;
    params.not_after = now + SELF_SIGNED_LIFETIME;
    let cert = params.self_signed(&key).context("signing the self-signed HTTPS certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Serve `router` over TLS on `listener` until `stop` turns true (or its sender is gone),
/// then stop accepting and let open connections finish their requests; returns once they
/// have. Handshakes run in each connection's own task, so a slow or silent client holds up
/// no one else.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let stop_handshakes = stop.clone();
    let stopped = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stopped);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    accept_failed(error).await;
                    continue;
                }
            },
            () = &mut stopped => break,
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        let mut stopping = stop_handshakes.clone();
        tokio::spawn(async move {
            // A handshake still going on at shutdown is dropped rather than waited for.
            let stopping = async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            };
            let handshake = tokio::select! {
                result = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => result,
                () = stopping => return,
            };
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                // Debug level: scanners and plain-HTTP clients fail here all day long.
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                tower::ServiceExt::oneshot(router.clone(), request)
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%peer, %error, "HTTPS connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// After a failed `accept`: a connection that died before it was accepted is nothing; out
/// of file descriptors or similar is logged and waited out (at most one line a second).
async fn accept_failed(error: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(error.kind(), ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused) {
        return;
    }
    tracing::warn!(%error, "accepting an HTTPS connection failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gantry-tls-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_self_signed_certificate_is_made_once_and_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir();
        let config = Config { data_dir: dir.clone(), tls: crate::config::TlsConfig { mode: TlsMode::SelfSigned, ..Default::default() }, ..Config::default() };
        assert!(server_config(&config, "hub.example.com:7443").unwrap().is_some());
        let key_file = dir.join("pki").join(SELF_SIGNED_KEY_FILE);
        assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
        let first = std::fs::read(dir.join("pki").join(SELF_SIGNED_CERT_FILE)).unwrap();
        server_config(&config, "hub.example.com:7443").unwrap();
        assert_eq!(std::fs::read(dir.join("pki").join(SELF_SIGNED_CERT_FILE)).unwrap(), first, "kept across starts");

        use x509_parser::prelude::*;
        let der = CertificateDer::from_pem_slice(&first).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let names = format!("{:?}", cert.subject_alternative_name().unwrap().unwrap().value.general_names);
        assert!(names.contains("hub.example.com") && names.contains("localhost"), "{names}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bad_files_are_named_with_their_problem() {
        let dir = temp_dir();
        let (cert_pem, key_pem) = make_self_signed(&[SanType::DnsName("localhost".try_into().unwrap())]).unwrap();
        let (_, other_key) = make_self_signed(&[SanType::DnsName("localhost".try_into().unwrap())]).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (cert, key, wrong_key, garbage) = (write("c.pem", &cert_pem), write("k.pem", &key_pem), write("o.pem", &other_key), write("g.pem", "hello\n"));
        let error = |cert: &Path, key: &Path| {
            let tls = crate::config::TlsConfig { mode: TlsMode::Files, cert_file: Some(cert.into()), key_file: Some(key.into()) };
            match server_config(&Config { tls, ..Config::default() }, "x:1") {
                Ok(_) => String::new(),
                Err(e) => format!("{e:#}"),
            }
        };
        assert_eq!(error(&cert, &key), "");
        let missing = dir.join("missing.pem");
        let message = error(&missing, &key);
        assert!(message.contains("TLS certificate file") && message.contains("missing.pem") && message.contains("No such file"), "{message}");
        let message = error(&garbage, &key);
        assert!(message.contains("g.pem") && message.contains("holds no certificate"), "{message}");
        let message = error(&cert, &garbage);
        assert!(message.contains("g.pem") && message.contains("holds no private key"), "{message}");
        let message = error(&cert, &wrong_key);
        assert!(message.contains("o.pem") && message.contains("does not fit"), "{message}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn hosts_are_read_from_addresses_and_urls() {
        assert_eq!(host_of("hub.example.com:7443"), "hub.example.com");
        assert_eq!(host_of("[::1]:7443"), "::1");
        assert_eq!(host_of("::1"), "::1");
        assert_eq!(host_of("hub.example.com"), "hub.example.com");
        let config = Config { public_url: Some("https://dash.example.com:8443/gantry".into()), ..Config::default() };
        let names = format!("{:?}", self_signed_names(&config, "10.1.2.3:7443"));
        assert!(names.contains("dash.example.com") && names.contains("10.1.2.3") && names.contains("localhost"), "{names}");
    }
}
