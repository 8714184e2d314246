//! Hub configuration: one struct, loaded once and passed down.
//!
//! Precedence: built-in defaults < TOML file (`--config`) < `GANTRY_*` environment <
//! command-line flags. Every field's doc comment is its user documentation; the README's
//! configuration table is made from them. Startup logs a redacted copy.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./gantry-data";
/// Default HTTP listen address.
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:8080";
/// Default QUIC listen address.
pub const DEFAULT_QUIC_ADDR: &str = "0.0.0.0:7443";
/// Default first webhook retry delay, in milliseconds.
pub const DEFAULT_WEBHOOK_RETRY_BASE_MS: u64 = 10_000;

/// Everything `gantry-hub serve` needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory holding the sled store (`store/`) and the CA and server keys (`pki/`).
    /// Env `GANTRY_DATA`, flag `--data`.
    pub data_dir: PathBuf,
    /// TCP address for the HTTP API, dashboard, `/healthz`, `/readyz` and `/metrics`.
    /// Env `GANTRY_HTTP_ADDR`, flag `--http`.
    pub http_addr: SocketAddr,
    /// UDP address for agent QUIC connections. Env `GANTRY_QUIC_ADDR`, flag `--quic`.
    pub quic_addr: SocketAddr,
    /// `HOST:PORT` that agents dial, written into enrollment tokens. Defaults to the
    /// address given at `init`. Env `GANTRY_PUBLIC_ADDR`, flag `--public-addr`.
    pub public_addr: Option<String>,
    /// Base URL of the dashboard as users reach it, e.g. `https://hub.example.com`; used in
    /// printed links. Defaults to `http://` plus the HTTP address (`https://` when the hub
    /// serves TLS itself). An `https://` URL also makes the session cookie `Secure` (named
    /// `__Host-gantry_session`), as behind a TLS-terminating proxy. Env `GANTRY_PUBLIC_URL`.
    pub public_url: Option<String>,
    /// Addresses or networks (`10.0.0.5`, `10.0.0.0/8`, `fd00::/8`) of reverse proxies whose
    /// `X-Forwarded-For` / `Forwarded: for=` headers are believed. A request whose TCP peer
    /// is one of them is treated as coming from the right-most forwarded address that is not
    /// itself a trusted proxy; from any other peer those headers are ignored, so clients
    /// cannot choose their own address. The client address is what rate limits, login
    /// throttling and the audit log use. Empty (the default) believes no one. Env
    /// `GANTRY_TRUSTED_PROXIES`, comma-separated.
    pub trusted_proxies: Vec<IpNet>,
    /// Largest protocol frame accepted from an agent, in bytes (at most 16 MiB).
    pub max_frame_bytes: usize,
    /// How often agents send heartbeats, in seconds.
    pub heartbeat_interval_secs: u64,
    /// A session that has sent nothing for this long is closed and the agent shown
    /// offline, in seconds. Must be at least twice the heartbeat interval.
    pub liveness_timeout_secs: u64,
    /// Lifetime of agent certificates, in seconds (default 30 days). Agents renew at
    /// about two thirds of it over their live connection.
    pub agent_cert_lifetime_secs: u64,
    /// Agent limit for orgs created without one.
    pub default_org_agent_limit: u32,
    /// On shutdown, agents are told to come back after this many seconds (plus jitter).
    pub drain_retry_after_secs: u64,
    /// Login sessions end after this long without a request, in seconds.
    pub session_idle_timeout_secs: u64,
    /// Login sessions end this long after login regardless of use, in seconds.
    pub session_absolute_timeout_secs: u64,
    /// Largest HTTP request body accepted, in bytes.
    pub max_http_body_bytes: usize,
    /// Days of telemetry (logs, events, metrics, health) kept for orgs without their own
    /// retention.
    pub default_retention_days: u32,
    /// Seconds between runs of the retention pruner.
    pub prune_interval_secs: u64,
    /// Milliseconds between evaluations of the alert rules (50 to 3600000); check reports
    /// also trigger one at once.
    pub alert_interval_ms: u64,
    /// Milliseconds between runs of the usage metering, which samples connected agents
    /// (agent hours, peak agents), meters new deployment revisions and closes hours into the
    /// usage ledger (50 to 3600000; default 60000).
    pub usage_close_interval_ms: u64,
    /// How long after an hour ends its telemetry usage (log bytes, metric samples, events,
    /// check runs) and peak agents are written to the ledger, in milliseconds (0 to 86400000;
    /// default 300000). Usage stored for that hour later becomes a `late usage` correction.
    pub usage_close_grace_ms: u64,
    /// Milliseconds between runs of the billing clock, which ends trials that are over and
    /// closes billing periods whose usage has settled (50 to 3600000; default 60000).
    pub billing_interval_ms: u64,
    /// Memory the store may use to cache pages, in MiB (at least 8). More keeps more of a
    /// large store's recent telemetry in memory for queries; the hub's resident memory
    /// grows with it.
    pub store_cache_mib: u64,
    /// File holding the key that encrypts org secrets and registry passwords in the store
    /// (32 bytes, mode 0600). Defaults to `DATA/pki/secrets.key`; created while the store
    /// holds no sealed value; rotations add versions beside it (`.v2`, …). `gantry-hub
    /// backup` includes every version, encrypted with the backup's passphrase; a plain copy
    /// of the store does not: without the key the secrets cannot be read, and a different
    /// key makes the hub refuse to start.
    /// Env `GANTRY_SECRETS_KEY_FILE`.
    pub secrets_key_file: Option<PathBuf>,
    /// Delay before the first retry of a failed webhook delivery, in milliseconds (default
    /// 10 s). Later retries wait multiples of it (x3, x6, x12, x30, x60, x180, then x360:
    /// 30 s, 1 min, 2 min, 5 min, 10 min, 30 min, then hourly at the default) until 24 h
    /// after the delivery was created.
    pub webhook_retry_base_ms: u64,
    /// Pause after each value a secrets-key re-encryption reseals, in milliseconds
    /// (default 0: none). Spreads a re-encryption of many values out so it takes less of
    /// the store's write capacity from the hub's other work; values stay readable
    /// throughout either way.
    pub reencrypt_pause_ms: u64,
    /// QUIC transport limits.
    pub quic: QuicLimits,
    /// HTTP API rate limits and login throttling.
    pub rate_limit: RateLimitConfig,
    /// HTTPS on the HTTP port (`http_addr`). Off by default: plain HTTP, for local use or
    /// behind a TLS-terminating reverse proxy.
    pub tls: TlsConfig,
    /// Stripe: customer and subscription sync, usage as meter events, payment webhooks.
    /// Off unless a secret key is given (README, "Stripe").
    pub stripe: StripeConfig,
    /// The agent installer: the builds served at `/downloads/` for `install.sh`, and the
    /// host requirements its preflight checks (README, "Install an agent").
    pub installer: crate::install::InstallerConfig,
    /// The operator theme: product name, colours and logo of the hub's dashboard, also
    /// shown to orgs without a brand of their own (README, "Dashboard").
    pub theme: crate::branding::ThemeConfig,
    /// Scheduled backups (README, "Backup, restore and key rotation"). Off unless `dir`
    /// is set.
    pub backup: crate::backup::BackupConfig,
}

/// Default Stripe API base URL.
pub const DEFAULT_STRIPE_API_BASE: &str = "https://api.stripe.com";
/// Default pause between two passes of the Stripe exporter, in milliseconds.
pub const DEFAULT_STRIPE_EXPORT_INTERVAL_MS: u64 = 10_000;

/// Where the hub reaches Stripe and with which secrets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StripeConfig {
    /// Base URL of Stripe's API (default `https://api.stripe.com`); tests point it at a
    /// local server speaking Stripe's HTTP API.
    pub api_base: String,
    /// File holding the Stripe secret key (`sk_...`, mode 0600). Env
    /// `GANTRY_STRIPE_SECRET_KEY` holds the key itself and wins over the file. Without a
    /// key nothing is sent to Stripe.
    pub secret_key_file: Option<PathBuf>,
    /// File holding the webhook endpoint's signing secret (`whsec_...`), read on every
    /// webhook request so a rotation needs no restart. Without it
    /// `POST /api/v1/webhooks/stripe` answers 503.
    pub webhook_secret_file: Option<PathBuf>,
    /// Pause between two passes of the exporter (sync, then meter events), in
    /// milliseconds (default 10 s).
    pub export_interval_ms: u64,
    /// The secret key from `GANTRY_STRIPE_SECRET_KEY` (never read from or written to the
    /// file; redacted in debug output).
    #[serde(skip)]
    pub secret_key: Option<RedactedSecret>,
}

impl Default for StripeConfig {
    fn default() -> Self {
        StripeConfig {
            api_base: DEFAULT_STRIPE_API_BASE.to_string(),
            secret_key_file: None,
            webhook_secret_file: None,
            export_interval_ms: DEFAULT_STRIPE_EXPORT_INTERVAL_MS,
            secret_key: None,
        }
    }
}

/// A secret held in memory; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct RedactedSecret(pub String);

impl std::fmt::Debug for RedactedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Whether and how the hub serves HTTPS itself on `http_addr` (one port: with TLS on it
/// answers HTTPS only). Browsers then get HSTS and the `__Host-` session cookie.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// `off` (plain HTTP), `files` (the PEM `cert_file` and `key_file`, e.g. from an ACME
    /// client; re-read at restart) or `self-signed` (a certificate the hub makes on first
    /// start and keeps in `DATA/pki/https.crt` and `https.key`, for the hub's host name,
    /// `localhost` and the loopback addresses; clients must be told to trust it). Env
    /// `GANTRY_TLS`.
    pub mode: TlsMode,
    /// PEM file with the certificate chain, leaf first, for `mode = "files"`. Env
    /// `GANTRY_TLS_CERT` (which also selects `files` when the mode is `off`).
    pub cert_file: Option<PathBuf>,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1), for
    /// `mode = "files"`. Keep it readable only by the hub's user. Env `GANTRY_TLS_KEY`.
    pub key_file: Option<PathBuf>,
}

/// How the HTTP port is served; see [`TlsConfig::mode`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Plain HTTP.
    #[default]
    Off,
    /// HTTPS with a certificate and key from PEM files.
    Files,
    /// HTTPS with a self-signed certificate kept in `DATA/pki/`.
    SelfSigned,
}

impl std::str::FromStr for TlsMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "off" => Ok(TlsMode::Off),
            "files" => Ok(TlsMode::Files),
            "self-signed" => Ok(TlsMode::SelfSigned),
            other => Err(format!("{other:?} is not one of off, files, self-signed")),
        }
    }
}

impl TlsConfig {
    /// Every rule the values break.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let files = self.cert_file.is_some() || self.key_file.is_some();
        match self.mode {
            TlsMode::Files if self.cert_file.is_none() || self.key_file.is_none() => {
                errors.push("tls.mode = \"files\" needs both tls.cert_file and tls.key_file".to_string());
            }
            TlsMode::Off | TlsMode::SelfSigned if files => {
                errors.push("tls.cert_file and tls.key_file are only used with tls.mode = \"files\"".to_string());
            }
            _ => {}
        }
        errors
    }
}

/// An IP address or network in CIDR notation (`192.0.2.7`, `10.0.0.0/8`, `fd00::/8`); a bare
/// address is a network of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `ip` is inside the network. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
    /// as a dual-stack socket reports IPv4 peers) counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_matches(u128::from(net.to_bits()) << 96, u128::from(ip.to_bits()) << 96, self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_matches(net.to_bits(), ip.to_bits(), self.prefix),
            _ => false,
        }
    }
}

fn prefix_matches(net: u128, ip: u128, prefix: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    net & mask == ip & mask
}

impl std::str::FromStr for IpNet {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("{text:?} is not an IP address or CIDR network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("{text:?}: prefix length must be 0-{max}"))?,
            None => max,
        };
        Ok(IpNet { addr, prefix })
    }
}

impl TryFrom<String> for IpNet {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<IpNet> for String {
    fn from(net: IpNet) -> String {
        net.to_string()
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Rate limits of the HTTP API (`/api/v1/*`; the probes, `/metrics` and the dashboard
/// pages are not limited) and failed-login throttling. Counters live in memory, so a
/// restart resets them. A request over a limit answers 429 with `Retry-After`.
///
/// A request with a known API key counts against that key's bucket and, for an org's key,
/// also its org's (shared by all of the org's keys); a request with a login session counts
/// against that session; anything else (no credential, or one the hub does not know)
/// counts against the client's IP address. Operators' keys and sessions act for the whole
/// platform, so they are exempt by default (`operator_per_sec = 0`); set it to give them
/// their own per-credential limit instead.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Apply the limits and the login throttle at all.
    pub enabled: bool,
    /// Requests per second each API key or login session may make on average.
    pub per_key_per_sec: u32,
    /// Requests an idle API key or session may make at once, above its rate.
    pub per_key_burst: u32,
    /// Requests per second all of one org's API keys may make together.
    pub per_org_per_sec: u32,
    /// Requests an idle org's keys may make at once, above its rate.
    pub per_org_burst: u32,
    /// Requests per second one client IP address may make without a valid credential.
    /// The address is the TCP peer's, or behind a proxy listed in `trusted_proxies` the
    /// client's it forwarded; behind any other proxy every client shares the proxy's, so
    /// list the proxy (or raise this).
    pub per_ip_per_sec: u32,
    /// Requests an idle address may make at once without a valid credential.
    pub per_ip_burst: u32,
    /// Requests per second each operator key or session may make; 0 exempts operators.
    pub operator_per_sec: u32,
    /// Burst of each operator key or session when `operator_per_sec` is set.
    pub operator_burst: u32,
    /// Failed logins of one account (email) within `login_window_secs` after which further
    /// attempts are refused, without checking the password, until the window ends. A
    /// successful login clears the account's count.
    pub login_failures_per_account: u32,
    /// Failed logins from one client IP address (any accounts) within `login_window_secs`
    /// after which further attempts from it are refused until the window ends.
    pub login_failures_per_ip: u32,
    /// Length of the failed-login window, in seconds; it starts at the first failure.
    pub login_window_secs: u64,
    /// Most keys, orgs, addresses or accounts tracked per limiter; beyond it idle entries
    /// (and then the least recently active) are forgotten, bounding memory.
    pub max_tracked: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            enabled: true,
            per_key_per_sec: 20,
            per_key_burst: 100,
            per_org_per_sec: 50,
            per_org_burst: 200,
            per_ip_per_sec: 10,
            per_ip_burst: 50,
            operator_per_sec: 0,
            operator_burst: 200,
            login_failures_per_account: 5,
            login_failures_per_ip: 20,
            login_window_secs: 15 * 60,
            max_tracked: 100_000,
        }
    }
}

impl RateLimitConfig {
    /// Every rule the values break.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let rates = [
            ("per_key_per_sec", self.per_key_per_sec),
            ("per_key_burst", self.per_key_burst),
            ("per_org_per_sec", self.per_org_per_sec),
            ("per_org_burst", self.per_org_burst),
            ("per_ip_per_sec", self.per_ip_per_sec),
            ("per_ip_burst", self.per_ip_burst),
            ("operator_burst", self.operator_burst),
            ("login_failures_per_account", self.login_failures_per_account),
            ("login_failures_per_ip", self.login_failures_per_ip),
        ];
        for (name, value) in rates {
            if value == 0 {
                errors.push(format!("rate_limit.{name} must be at least 1"));
            }
        }
        if self.login_window_secs == 0 {
            errors.push("rate_limit.login_window_secs must be at least 1".to_string());
        }
        if self.max_tracked < 100 {
            errors.push("rate_limit.max_tracked must be at least 100".to_string());
        }
        errors
    }
}

/// QUIC limits, set explicitly rather than left to library defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct QuicLimits {
    /// Most agent connections served at once; further ones are refused (agents retry
    /// with backoff).
    pub max_connections: usize,
    /// Handshakes in progress (not yet finished) above which new clients must first prove
    /// their address with a QUIC Retry round trip; established sessions do not count.
    pub retry_above_incoming: usize,
    /// Most handshakes in flight; above this, new attempts are refused.
    pub max_incoming: usize,
    /// A connection with no packets for this long is closed, in seconds.
    pub idle_timeout_secs: u64,
    /// Flow-control window per stream, in bytes.
    pub stream_receive_window: u32,
    /// Flow-control window per connection, across streams, in bytes. Must exceed four
    /// stream windows, so that telemetry streams the hub is slow to read can never use up
    /// the whole connection window and hold back heartbeats on the control stream.
    pub receive_window: u32,
    /// Most bytes buffered for sending per connection.
    pub send_window: u64,
    /// Most bidirectional streams an agent may open at once (control plus telemetry).
    pub max_concurrent_bidi_streams: u32,
    /// Most unidirectional streams an agent may open at once.
    pub max_concurrent_uni_streams: u32,
}

impl Default for QuicLimits {
    fn default() -> Self {
        QuicLimits {
            max_connections: 20_000,
            retry_above_incoming: 256,
            max_incoming: 4096,
            idle_timeout_secs: 30,
            stream_receive_window: 256 * 1024,
            receive_window: 1536 * 1024,
            send_window: 1024 * 1024,
            max_concurrent_bidi_streams: 8,
            max_concurrent_uni_streams: 8,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            http_addr: DEFAULT_HTTP_ADDR.parse().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 8080))),
            quic_addr: DEFAULT_QUIC_ADDR.parse().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 7443))),
            public_addr: None,
            public_url: None,
            trusted_proxies: Vec::new(),
            max_frame_bytes: gantry_shared::frame::DEFAULT_MAX_FRAME_BYTES,
            heartbeat_interval_secs: 5,
            liveness_timeout_secs: 15,
            agent_cert_lifetime_secs: 30 * 24 * 3600,
            default_org_agent_limit: 100,
            drain_retry_after_secs: 2,
            session_idle_timeout_secs: 12 * 3600,
            session_absolute_timeout_secs: 7 * 24 * 3600,
            max_http_body_bytes: 256 * 1024,
            default_retention_days: 7,
            prune_interval_secs: 300,
            alert_interval_ms: 5_000,
            usage_close_interval_ms: 60_000,
            usage_close_grace_ms: 300_000,
            billing_interval_ms: 60_000,
            store_cache_mib: 128,
            secrets_key_file: None,
            webhook_retry_base_ms: DEFAULT_WEBHOOK_RETRY_BASE_MS,
            reencrypt_pause_ms: 0,
            quic: QuicLimits::default(),
            rate_limit: RateLimitConfig::default(),
            tls: TlsConfig::default(),
            stripe: StripeConfig::default(),
            installer: crate::install::InstallerConfig::default(),
            theme: crate::branding::ThemeConfig::default(),
            backup: crate::backup::BackupConfig::default(),
        }
    }
}

/// Flags that override the file and environment (`None` = not given).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--data`.
    pub data_dir: Option<PathBuf>,
    /// `--http`.
    pub http_addr: Option<SocketAddr>,
    /// `--quic`.
    pub quic_addr: Option<SocketAddr>,
    /// `--public-addr`.
    pub public_addr: Option<String>,
}

impl Config {
    /// Load: defaults, then `file` if given, then `GANTRY_*` variables from `env`, then
    /// `flags`. Every problem found is reported together.
    pub fn load(file: Option<&std::path::Path>, env: &dyn Fn(&str) -> Option<String>, flags: &Overrides) -> anyhow::Result<Config> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => Config::default(),
        };
        let mut errors = Vec::new();
        if let Some(v) = env("GANTRY_DATA") {
            config.data_dir = PathBuf::from(v);
        }
        let mut addr = |name: &str, slot: &mut SocketAddr| {
            if let Some(v) = env(name) {
                match v.parse() {
                    Ok(a) => *slot = a,
                    Err(e) => errors.push(format!("{name}={v:?}: {e}")),
                }
            }
        };
        addr("GANTRY_HTTP_ADDR", &mut config.http_addr);
        addr("GANTRY_QUIC_ADDR", &mut config.quic_addr);
        if let Some(v) = env("GANTRY_PUBLIC_ADDR") {
            config.public_addr = Some(v);
        }
        if let Some(v) = env("GANTRY_PUBLIC_URL") {
            config.public_url = Some(v);
        }
        if let Some(v) = env("GANTRY_STRIPE_SECRET_KEY").filter(|v| !v.trim().is_empty()) {
            config.stripe.secret_key = Some(RedactedSecret(v.trim().to_string()));
        }
        if let Some(v) = env("GANTRY_SECRETS_KEY_FILE") {
            config.secrets_key_file = Some(PathBuf::from(v));
        }
        if let Some(v) = env("GANTRY_TRUSTED_PROXIES") {
            let parsed: Result<Vec<IpNet>, String> = v.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::parse).collect();
            match parsed {
                Ok(nets) => config.trusted_proxies = nets,
                Err(e) => errors.push(format!("GANTRY_TRUSTED_PROXIES: {e}")),
            }
        }
        if let Some(v) = env("GANTRY_TLS_CERT") {
            config.tls.cert_file = Some(PathBuf::from(v));
            if config.tls.mode == TlsMode::Off {
                config.tls.mode = TlsMode::Files;
            }
        }
        if let Some(v) = env("GANTRY_TLS_KEY") {
            config.tls.key_file = Some(PathBuf::from(v));
        }
        if let Some(v) = env("GANTRY_TLS") {
            match v.parse() {
                Ok(mode) => config.tls.mode = mode,
                Err(e) => errors.push(format!("GANTRY_TLS: {e}")),
            }
        }
        if let Some(v) = &flags.data_dir {
            config.data_dir = v.clone();
        }
        if let Some(v) = flags.http_addr {
            config.http_addr = v;
        }
        if let Some(v) = flags.quic_addr {
            config.quic_addr = v;
        }
        if let Some(v) = &flags.public_addr {
            config.public_addr = Some(v.clone());
        }
        errors.extend(config.validate());
        if !errors.is_empty() {
            anyhow::bail!("invalid configuration:\n  {}", errors.join("\n  "));
        }
        Ok(config)
    }

    /// Where the secrets key is kept.
    pub fn secrets_key_path(&self) -> PathBuf {
        self.secrets_key_file.clone().unwrap_or_else(|| self.data_dir.join("pki").join("secrets.key"))
    }

    /// Every rule the values break.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.heartbeat_interval_secs == 0 {
            errors.push("heartbeat_interval_secs must be at least 1".to_string());
        }
        let telemetry_windows = u64::from(self.quic.stream_receive_window) * gantry_shared::message::StreamClass::ALL.len() as u64;
        if u64::from(self.quic.receive_window) <= telemetry_windows {
            errors.push(format!(
                "quic.receive_window must exceed {telemetry_windows} (4 x quic.stream_receive_window), or full telemetry streams could hold back heartbeats"
            ));
        }
        if self.liveness_timeout_secs < 2 * self.heartbeat_interval_secs {
            errors.push("liveness_timeout_secs must be at least twice heartbeat_interval_secs".to_string());
        }
        if self.quic.idle_timeout_secs <= self.heartbeat_interval_secs {
            errors.push("quic.idle_timeout_secs must exceed heartbeat_interval_secs".to_string());
        }
        if self.max_frame_bytes == 0 || self.max_frame_bytes > gantry_shared::frame::MAX_FRAME_CEILING_BYTES {
            errors.push(format!("max_frame_bytes must be 1..={}", gantry_shared::frame::MAX_FRAME_CEILING_BYTES));
        }
        if self.default_retention_days == 0 || self.default_retention_days > crate::retention::MAX_RETENTION_DAYS {
            errors.push(format!("default_retention_days must be 1..={}", crate::retention::MAX_RETENTION_DAYS));
        }
        if self.store_cache_mib < 8 {
            errors.push("store_cache_mib must be at least 8".to_string());
        }
        if !(50..=3_600_000).contains(&self.billing_interval_ms) {
            errors.push("billing_interval_ms must be 50-3600000".to_string());
        }
        if !(50..=3_600_000).contains(&self.usage_close_interval_ms) {
            errors.push("usage_close_interval_ms must be 50-3600000".to_string());
        }
        if self.usage_close_grace_ms > 86_400_000 {
            errors.push("usage_close_grace_ms must be 0-86400000".to_string());
        }
        if !(50..=3_600_000).contains(&self.alert_interval_ms) {
            errors.push("alert_interval_ms must be 50-3600000".to_string());
        }
        if self.webhook_retry_base_ms == 0 {
            errors.push("webhook_retry_base_ms must be at least 1".to_string());
        }
        if self.prune_interval_secs == 0 {
            errors.push("prune_interval_secs must be at least 1".to_string());
        }
        if self.agent_cert_lifetime_secs < 10 {
            errors.push("agent_cert_lifetime_secs must be at least 10".to_string());
        }
        if let Some(addr) = &self.public_addr {
            if addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
                errors.push(format!("public_addr {addr:?} must be HOST:PORT"));
            }
        }
        errors.extend(self.rate_limit.validate());
        errors.extend(self.tls.validate());
        errors.extend(self.theme.validate());
        errors.extend(self.backup.validate());
        errors
    }

    /// Whether the hub serves HTTPS itself (then HSTS is sent).
    pub fn serves_tls(&self) -> bool {
        self.tls.mode != TlsMode::Off
    }

    /// Whether browsers reach the hub over HTTPS: it serves TLS itself, or `public_url` is
    /// `https://` (a TLS-terminating proxy in front). Session cookies are then `Secure`.
    pub fn secure_cookies(&self) -> bool {
        self.serves_tls() || self.public_url.as_deref().is_some_and(|url| url.starts_with("https://"))
    }

    /// Base URL for printed links.
    pub fn public_url(&self) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => {
                let addr = self.http_addr;
                let host = match addr {
                    _ if addr.ip().is_unspecified() => "127.0.0.1".to_string(),
                    SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
                    SocketAddr::V4(v4) => v4.ip().to_string(),
                };
                let scheme = if self.serves_tls() { "https" } else { "http" };
                format!("{scheme}://{host}:{}", addr.port())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_file_then_env_then_flags() {
        let dir = std::env::temp_dir().join(format!("gantry-config-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hub.toml");
        std::fs::write(&file, "http_addr = \"127.0.0.1:9000\"\nquic_addr = \"127.0.0.1:9001\"\n[quic]\nmax_connections = 5\n").unwrap();
        let env = |k: &str| (k == "GANTRY_QUIC_ADDR").then(|| "127.0.0.1:9002".to_string());
        let flags = Overrides { data_dir: Some("/tmp/x".into()), ..Overrides::default() };
        let c = Config::load(Some(&file), &env, &flags).unwrap();
        assert_eq!(c.http_addr.port(), 9000);
        assert_eq!(c.quic_addr.port(), 9002);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.quic.max_connections, 5);
    }

    #[test]
    fn the_example_config_parses_and_validates() {
        let config: Config = toml::from_str(include_str!("../../deploy/hub.example.toml")).unwrap();
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        assert_eq!(config.public_addr.as_deref(), Some("hub.example.com:7443"));
    }

    #[test]
    fn rate_limits_that_would_refuse_everything_are_refused() {
        let mut config = Config::default();
        config.rate_limit.per_key_per_sec = 0;
        config.rate_limit.login_window_secs = 0;
        let errors = config.validate();
        assert!(errors.iter().any(|e| e.contains("rate_limit.per_key_per_sec")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("rate_limit.login_window_secs")), "{errors:?}");
        config.rate_limit = RateLimitConfig { operator_per_sec: 0, ..RateLimitConfig::default() };
        assert!(config.validate().is_empty(), "operators may be exempt: {:?}", config.validate());
    }

    #[test]
    fn a_connection_window_telemetry_could_fill_is_refused() {
        let mut config = Config::default();
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        config.quic.receive_window = 4 * config.quic.stream_receive_window;
        assert!(config.validate().iter().any(|e| e.contains("quic.receive_window")), "{:?}", config.validate());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_reported_together() {
        let dir = std::env::temp_dir().join(format!("gantry-config-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hub.toml");
        std::fs::write(&file, "htp_addr = \"x\"\n").unwrap();
        let err = Config::load(Some(&file), &|_| None, &Overrides::default()).unwrap_err();
        assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
        let env = |k: &str| match k {
            "GANTRY_HTTP_ADDR" => Some("nope".to_string()),
            "GANTRY_PUBLIC_ADDR" => Some("noport".to_string()),
            _ => None,
        };
        let err = format!("{:#}", Config::load(None, &env, &Overrides::default()).unwrap_err());
        assert!(err.contains("GANTRY_HTTP_ADDR") && err.contains("public_addr"), "{err}");
    }

    #[test]
    fn tls_comes_from_the_file_or_the_environment_and_turns_the_public_url_https() {
        let config = Config::default();
        assert!(!config.serves_tls() && !config.secure_cookies());
        assert_eq!(config.public_url(), "http://127.0.0.1:8080");

        let config: Config = toml::from_str("[tls]\nmode = \"self-signed\"\n").unwrap();
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        assert!(config.serves_tls() && config.secure_cookies());
        assert_eq!(config.public_url(), "https://127.0.0.1:8080");

        let env = |k: &str| match k {
            "GANTRY_TLS_CERT" => Some("/etc/gantry/hub.crt".to_string()),
            "GANTRY_TLS_KEY" => Some("/etc/gantry/hub.key".to_string()),
            _ => None,
        };
        let config = Config::load(None, &env, &Overrides::default()).unwrap();
        assert_eq!(config.tls.mode, TlsMode::Files);
        assert_eq!(config.tls.key_file.as_deref(), Some(std::path::Path::new("/etc/gantry/hub.key")));

        let env = |k: &str| match k {
            "GANTRY_TLS_CERT" => Some("/etc/gantry/hub.crt".to_string()),
            "GANTRY_TLS" => Some("tls-please".to_string()),
            _ => None,
        };
        let err = format!("{:#}", Config::load(None, &env, &Overrides::default()).unwrap_err());
        assert!(err.contains("GANTRY_TLS: \"tls-please\"") && err.contains("tls.key_file"), "{err}");
    }

    #[test]
    fn an_https_public_url_makes_cookies_secure_without_serving_tls() {
        let config = Config { public_url: Some("https://hub.example.com/".into()), ..Config::default() };
        assert!(!config.serves_tls() && config.secure_cookies());
    }

    #[test]
    fn trusted_proxies_parse_as_addresses_and_networks() {
        let env = |k: &str| (k == "GANTRY_TRUSTED_PROXIES").then(|| "127.0.0.1, 10.0.0.0/8,fd00::/8".to_string());
        let config = Config::load(None, &env, &Overrides::default()).unwrap();
        let [one, ten, ula] = config.trusted_proxies[..] else { panic!("{:?}", config.trusted_proxies) };
        assert!(one.contains("127.0.0.1".parse().unwrap()) && !one.contains("127.0.0.2".parse().unwrap()));
        assert!(ten.contains("10.200.3.4".parse().unwrap()) && !ten.contains("11.0.0.1".parse().unwrap()));
        assert!(ten.contains("::ffff:10.1.2.3".parse().unwrap()), "IPv4-mapped peers count as IPv4");
        assert!(ula.contains("fd12::1".parse().unwrap()) && !ula.contains("fe80::1".parse().unwrap()));
        assert!("0.0.0.0/0".parse::<IpNet>().unwrap().contains("203.0.113.9".parse().unwrap()));

        let config: Config = toml::from_str("trusted_proxies = [\"192.0.2.0/24\"]\n").unwrap();
        assert_eq!(config.trusted_proxies, vec!["192.0.2.0/24".parse::<IpNet>().unwrap()]);
        for bad in ["10.0.0.0/33", "proxy.example.com", "fd00::/129"] {
            let env = |k: &str| (k == "GANTRY_TRUSTED_PROXIES").then(|| bad.to_string());
            let err = format!("{:#}", Config::load(None, &env, &Overrides::default()).unwrap_err());
            assert!(err.contains("GANTRY_TRUSTED_PROXIES") && err.contains(bad), "{err}");
        }
    }
}
