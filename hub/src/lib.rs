//! Gantry hub: the QUIC server agents dial, the HTTP API and dashboard, the store, and
//! enrollment.
//!
//! Entry points: [`init`] prepares a data directory; [`Hub::open`] loads it; [`run`] serves
//! on already-bound sockets until a shutdown future resolves, so tests boot real hubs on
//! `127.0.0.1:0` in-process. The binary in `main.rs` only parses flags and calls these.

pub mod access;
pub mod alerts;
pub mod api;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod billing;
pub mod branding;
pub mod checks;
pub mod cli;
pub mod config;
pub mod connection;
pub mod enroll;
pub mod ingest;
pub mod install;
pub mod keys;
pub mod metrics;
pub mod orchestrator;
pub mod org_data;
pub mod pki;
pub mod ratelimit;
pub mod registry;
pub mod retention;
pub mod secrets;
pub mod store;
pub mod tls;
pub mod totp;
pub mod transport;
pub mod webhooks;

use anyhow::Context;
use config::Config;
use gantry_shared::session::Timestamp;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Current wall-clock time in Unix milliseconds.
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Everything a running hub shares between its tasks.
#[derive(Debug)]
pub struct Hub {
    pub config: Config,
    pub store: store::Store,
    pub pki: pki::Pki,
    /// Seals org secrets and registry passwords in the store.
    pub secret_box: secrets::SecretBox,
    pub registry: registry::Registry,
    pub metrics: metrics::Metrics,
    /// API rate limits and login throttling (in memory; a restart resets them).
    pub limiter: ratelimit::Limiter,
    /// `HOST:PORT` written into enrollment tokens.
    pub public_addr: String,
    /// Rolling rollouts in progress, by deployment id (rebuilt as changes are made).
    pub rollouts: std::sync::Mutex<std::collections::HashMap<String, orchestrator::Rollout>>,
    /// Woken whenever an agent reports on a deployment.
    pub deploy_changes: tokio::sync::Notify,
    /// Wakes the webhook delivery worker when deliveries are queued.
    pub webhook_wake: tokio::sync::Notify,
    /// QUIC handshakes accepted and not yet finished (address validation kicks in above
    /// `quic.retry_above_incoming`).
    pub handshakes_in_flight: std::sync::atomic::AtomicUsize,
    /// Tasks holding a QUIC connection or stream; shutdown waits for them so the UDP socket
    /// is released when `run` returns.
    pub quic_tasks: std::sync::atomic::AtomicUsize,
    /// Telemetry batches just stored, for live tails (`.../logs/stream`).
    pub live: tokio::sync::broadcast::Sender<Arc<ingest::LiveBatch>>,
    /// What alert rules look at besides the store (latest disk use, spool drops), and the
    /// counters of checks and alerts.
    pub health: alerts::Health,
    origin: Instant,
    accepting: AtomicBool,
}

impl Hub {
    /// Open the data directory named by `config`.
    pub fn open(config: Config) -> anyhow::Result<Arc<Hub>> {
        let store = store::Store::open_with_cache(&config.data_dir, config.store_cache_mib << 20)?;
        let mut pki = pki::Pki::load(&config.data_dir)?;
        let public_addr = match &config.public_addr {
            Some(addr) => addr.clone(),
            None => store.setting("public_addr")?.context("no public address: pass --public-addr")?,
        };
        if pki.server_cert_needs_renewal() {
            pki.issue_server_cert(&public_addr)?;
        }
        let secret_box = open_secret_box(&config, &store)?;
        Ok(Arc::new(Hub::assemble(config, store, pki, secret_box, public_addr)))
    }

    /// A hub over an opened store and PKI, with empty in-memory state.
    fn assemble(config: Config, store: store::Store, pki: pki::Pki, secret_box: secrets::SecretBox, public_addr: String) -> Hub {
        let limiter = ratelimit::Limiter::new(&config.rate_limit);
        Hub {
            config,
            store,
            pki,
            secret_box,
            registry: registry::Registry::default(),
            metrics: metrics::Metrics::default(),
            limiter,
            public_addr,
            live: tokio::sync::broadcast::channel(ingest::LIVE_BUFFER).0,
            health: alerts::Health::new(wall_ms()),
            rollouts: Default::default(),
            deploy_changes: tokio::sync::Notify::new(),
            webhook_wake: tokio::sync::Notify::new(),
            handshakes_in_flight: Default::default(),
            quic_tasks: Default::default(),
            origin: Instant::now(),
            accepting: AtomicBool::new(false),
        }
    }

    /// Monotonic time for the sans-IO sessions.
    pub fn now(&self) -> Timestamp {
        Timestamp(self.origin.elapsed().as_millis() as u64)
    }

    /// The tokio instant of a session timestamp.
    pub fn instant_of(&self, t: Timestamp) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.origin + Duration::from_millis(t.0))
    }

    /// Whether the QUIC listener is accepting agents (for `/readyz`).
    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Relaxed)
    }
}

/// What `init` did.
#[derive(Debug)]
pub enum InitOutcome {
    Created { admin_email: String, admin_password: Option<String>, operator_key: String, ca_fingerprint: String },
    AlreadyInitialised { ca_fingerprint: String },
}

/// Default admin email when `GANTRY_ADMIN_EMAIL` is not set.
pub const DEFAULT_ADMIN_EMAIL: &str = "admin@gantry.local";

/// Create the store, CA, server certificate, first operator account and an operator API
/// key (written to `DATA/operator.key`, mode 0600). On an initialised directory, changes
/// nothing. `admin_password` `None` generates one, returned so the caller prints it once.
pub fn init(data_dir: &Path, public_addr: &str, admin_email: &str, admin_password: Option<&str>) -> anyhow::Result<InitOutcome> {
    if store::Store::exists(data_dir) && pki::Pki::exists(data_dir) {
        let pki = pki::Pki::load(data_dir)?;
        return Ok(InitOutcome::AlreadyInitialised { ca_fingerprint: pki.ca_fingerprint_hex() });
    }
    let probe = Config { data_dir: data_dir.to_path_buf(), public_addr: Some(public_addr.to_string()), ..Config::default() };
    let errors = probe.validate();
    if !errors.is_empty() {
        anyhow::bail!("{}", errors.join("; "));
    }
    if let Some(password) = admin_password {
        auth::check_password_policy(password, admin_email).map_err(|e| anyhow::anyhow!("GANTRY_ADMIN_PASSWORD: {e}"))?;
    }
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    restrict_dir(data_dir)?;
    let pki = pki::Pki::create(data_dir, public_addr)?;
    let store = store::Store::create(data_dir)?;
    store.set_setting("public_addr", public_addr)?;
    let ca_fingerprint = pki.ca_fingerprint_hex();
    let secret_box = open_secret_box(&probe, &store)?;
    let hub = Hub::assemble(probe, store, pki, secret_box, public_addr.to_string());
    let generated = admin_password.is_none().then(|| auth::random_hex(12));
    let password = admin_password.map(str::to_string).or_else(|| generated.clone()).unwrap_or_default();
    let user = auth::create_user(&hub, admin_email, &password, true).map_err(|e| anyhow::anyhow!("creating the admin account: {e}"))?;
    let (_, operator_key) = auth::create_api_key(&hub, "operator key made at init", None, &user.email)?;
    write_secret(&data_dir.join("operator.key"), &operator_key)?;
    Ok(InitOutcome::Created { admin_email: user.email, admin_password: generated, operator_key, ca_fingerprint })
}

/// Load the secrets key (creating it while nothing is sealed yet) and check it is the key
/// the store's sealed values were made with.
fn open_secret_box(config: &Config, store: &store::Store) -> anyhow::Result<secrets::SecretBox> {
    let sealed = store.has_sealed_values()?;
    let secret_box = secrets::SecretBox::load(&config.secrets_key_path(), !sealed)?;
    match store.setting("secrets_key_id")? {
        Some(id) if id != secret_box.id() && sealed => anyhow::bail!(
            "secrets key file {} (key {}) is not the key the store's secrets were sealed with (key {id}); restore the original key file",
            config.secrets_key_path().display(),
            secret_box.id()
        ),
        Some(id) if id == secret_box.id() => {}
        _ => store.set_setting("secrets_key_id", secret_box.id())?,
    }
    keys::check_versions(secret_box.current_version(), store.setting(keys::CURRENT_SETTING)?.as_deref(), &config.secrets_key_path())?;
    Ok(secret_box)
}

fn restrict_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| format!("restricting {}", dir.display()))
}

/// Write a file readable only by its owner (atomically, mode 0600).
pub fn write_secret(path: &Path, contents: &str) -> anyhow::Result<()> {
    gantry_agent::state::write_atomic(path, format!("{contents}\n").as_bytes())
}

/// Endpoint config whose stateless-reset key and connection-id key survive restarts (kept
/// in `DATA/pki/reset.key`): a restarted hub recognises connection ids it issued before and
/// answers their packets with a reset the agent trusts, so agents notice a hub crash at
/// once instead of waiting out their liveness timeout.
fn endpoint_config(data_dir: &Path) -> anyhow::Result<quinn::EndpointConfig> {
    let secret = endpoint_secret(data_dir)?;
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("cid:{secret}").as_bytes());
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&digest.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    Ok(config)
}

fn endpoint_secret(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("pki").join("reset.key");
    let secret = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().to_string(),
        Err(_) => {
            let secret = auth::random_hex(32);
            write_secret(&path, &secret)?;
            secret
        }
    };
    anyhow::ensure!(secret.len() >= 32, "{} is too short; delete it to make a new one", path.display());
    Ok(secret)
}

/// Already-bound sockets for [`run`].
#[derive(Debug)]
pub struct Listeners {
    pub http: std::net::TcpListener,
    pub quic: std::net::UdpSocket,
}

impl Listeners {
    /// Bind the configured addresses.
    pub fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let http = std::net::TcpListener::bind(config.http_addr).with_context(|| format!("binding HTTP on {}", config.http_addr))?;
        let quic = std::net::UdpSocket::bind(config.quic_addr).with_context(|| format!("binding QUIC on {}", config.quic_addr))?;
        Ok(Listeners { http, quic })
    }
}

/// Serve agents and HTTP on `listeners` until `shutdown` resolves, then drain: agents are
/// told to come back after the configured retry-after, the store is flushed.
pub async fn run(hub: Arc<Hub>, listeners: Listeners, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // First, so that a bad certificate or key stops the start before anything is served.
    let https = tls::server_config(&hub.config, &hub.public_addr)?;
    let reset = hub.store.mark_all_disconnected(wall_ms())?;
    if reset > 0 {
        tracing::info!(agents = reset, "marked agents offline after restart; they reconnect on their own");
    }
    orchestrator::resume(&hub);
    // Before anything is served: an org whose deletion was confirmed is gone before its
    // agents or its users can reach the hub again.
    org_data::resume_deletions(&hub).await?;
    listeners.http.set_nonblocking(true)?;
    listeners.quic.set_nonblocking(true)?;
    let http_addr = listeners.http.local_addr()?;
    let quic_addr = listeners.quic.local_addr()?;
    let server_config = transport::server_config(&hub.pki, &hub.config)?;
    let endpoint = quinn::Endpoint::new(endpoint_config(&hub.config.data_dir)?, Some(server_config), listeners.quic, Arc::new(quinn::TokioRuntime))
        .context("starting the QUIC endpoint")?;
    let http = tokio::net::TcpListener::from_std(listeners.http)?;
    let (stop_tx, stop_rx) = watch::channel(false);

    let accept = tokio::spawn(connection::accept_loop(hub.clone(), endpoint.clone(), stop_rx.clone()));
    let pruner = tokio::spawn(retention::run(hub.clone(), stop_rx.clone()));
    let webhook_worker = tokio::spawn(webhooks::run(hub.clone(), stop_rx.clone()));
    hub.health.set_started(wall_ms());
    let alerting = tokio::spawn(alerts::run(hub.clone(), stop_rx.clone()));
    let billing_clock = tokio::spawn(billing::plans::run(hub.clone(), stop_rx.clone()));
    let metering = tokio::spawn(billing::ledger::run(hub.clone(), stop_rx.clone()));
    // Returns at once when no Stripe secret key is configured.
    let stripe_exporter = tokio::spawn(billing::stripe::run(hub.clone(), stop_rx.clone()));
    // Returns at once when no backup directory is configured.
    let scheduled_backups = tokio::spawn(backup::run(hub.clone(), stop_rx.clone()));
    let mut http_stop = stop_rx.clone();
    let http_task = match https {
        Some(tls_config) => tokio::spawn(tls::serve(http, tls_config, api::router(hub.clone()), stop_rx.clone())),
        None => {
            let app = api::router(hub.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>();
            tokio::spawn(async move {
                axum::serve(http, app)
                    .with_graceful_shutdown(async move {
                        let _ = http_stop.wait_for(|stop| *stop).await;
                    })
                    .await
            })
        }
    };
    hub.accepting.store(true, Ordering::Relaxed);
    tracing::info!(%http_addr, %quic_addr, public_addr = %hub.public_addr, https = hub.config.serves_tls(), "hub serving");

    shutdown.await;
    tracing::info!(agents = hub.registry.len(), "shutting down: draining agents");
    hub.accepting.store(false, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let retry_after = Duration::from_secs(hub.config.drain_retry_after_secs);
    hub.registry.drain_all(retry_after);
    let deadline = Instant::now() + connection::DRAIN_GRACE + Duration::from_secs(2);
    while !hub.registry.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    endpoint.close(gantry_shared::message::ErrorCode::Draining.as_u32().into(), b"hub is shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    let _ = accept.await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while hub.quic_tasks.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = pruner.await;
    let _ = webhook_worker.await;
    let _ = alerting.await;
    let _ = billing_clock.await;
    let _ = metering.await;
    let _ = stripe_exporter.await;
    let _ = scheduled_backups.await;
    match tokio::time::timeout(Duration::from_secs(5), http_task).await {
        Ok(Ok(Err(error))) => tracing::warn!(%error, "HTTP server ended with an error"),
        Err(_) => tracing::warn!("HTTP server did not stop within 5 s"),
        _ => {}
    }
    hub.store.mark_all_disconnected(wall_ms())?;
    hub.store.flush().await?;
    tracing::info!("hub stopped");
    Ok(())
}
