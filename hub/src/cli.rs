//! Command line of `gantry-hub`: `init`, `serve`, `quickstart`, `token create`, `deploy`,
//! `audit verify`, `billing export`, `org export`, `backup`, `restore`, `compact`, `rotate-key`
//! and `rotate-ca`.
//!
//! Parses flags, loads the config once, sets up logging and calls the library. `token
//! create` talks to a running hub over its HTTP API (the store is locked by the server), with
//! the operator key from `GANTRY_API_KEY` or `DATA/operator.key`.

use crate::config::{Config, Overrides};
use crate::{Hub, InitOutcome, Listeners};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "gantry-hub", version, about = "Gantry hub: accounts, fleet and deployments for agents on machines you don't own")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args, Clone, Default)]
struct ServeFlags {
    /// TOML config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (store and keys).
    #[arg(long)]
    data: Option<PathBuf>,
    /// HTTP listen address (API, dashboard, metrics).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// QUIC listen address for agents.
    #[arg(long)]
    quic: Option<SocketAddr>,
    /// `HOST:PORT` agents dial, written into enrollment tokens.
    #[arg(long)]
    public_addr: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the store, CA, server certificate and first operator account.
    Init {
        /// Data directory to create.
        #[arg(long, env = "GANTRY_DATA", default_value = crate::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
        /// `HOST:PORT` agents will dial (the QUIC address as seen from agents).
        #[arg(long, env = "GANTRY_PUBLIC_ADDR")]
        public_addr: String,
    },
    /// Serve agents, the API and the dashboard.
    Serve(ServeFlags),
    /// Initialise if needed, serve, enroll a local agent and print how to log in.
    Quickstart(ServeFlags),
    /// Enrollment tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Deployments.
    Deploy {
        #[command(subcommand)]
        command: DeployCommand,
    },
    /// Rewrite a stopped hub's store with only its live records, so the bytes of erased
    /// records (e.g. a deleted org's) leave sled's files. Stop the hub first.
    Compact {
        /// Data directory of the (stopped) hub.
        #[arg(long, env = "GANTRY_DATA", default_value = crate::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Usage and billing.
    Billing {
        #[command(subcommand)]
        command: BillingCommand,
    },
    /// Customer data of one org.
    Org {
        #[command(subcommand)]
        command: OrgCommand,
    },
    /// Take an encrypted backup of the running hub (store and key material), through its
    /// API (`POST /api/v1/backups`), into a file.
    Backup {
        /// File to write (replaced only once the whole backup arrived and its checksum
        /// matched).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        secret: BackupSecretFlags,
        #[command(flatten)]
        remote: Remote,
    },
    /// Restore a backup into an empty or new data directory (the hub must not be running
    /// on it); then start `gantry-hub serve` on it.
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// Data directory to restore into: missing or empty.
        #[arg(long)]
        data: PathBuf,
        #[command(flatten)]
        secret: BackupSecretFlags,
    },
    /// Rotate the key that seals secrets at rest, on the running hub: a new key version,
    /// then every sealed value re-encrypted with it.
    RotateKey {
        /// Only add the new version; old values stay on theirs until a later
        /// `rotate-key --reencrypt-only`.
        #[arg(long, conflicts_with = "reencrypt_only")]
        no_reencrypt: bool,
        /// Do not add a version; move every sealed value to the newest one.
        #[arg(long)]
        reencrypt_only: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Renew the hub CA that agents pin, without re-enrolling them, in steps that each take
    /// effect when the hub next starts: without flags, stage a next CA (agents learn it as
    /// they connect); `--promote` makes it current once agents have learnt it;
    /// `--retire-old` stops trusting the replaced CA once agents have renewed their
    /// certificates. Works on the files in `DATA/pki/`.
    RotateCa {
        /// Data directory of the hub.
        #[arg(long, env = "GANTRY_DATA", default_value = crate::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
        /// Make the staged next CA current (the hub's server certificate and new tokens
        /// then use it; certificates of the replaced CA stay accepted).
        #[arg(long, conflicts_with_all = ["retire_old", "status"])]
        promote: bool,
        /// Stop accepting agent certificates of the CA the last promotion replaced.
        #[arg(long, conflicts_with = "status")]
        retire_old: bool,
        /// Only show the CAs the hub trusts.
        #[arg(long)]
        status: bool,
    },
}

/// What a backup is encrypted with: a passphrase file, a key file, or
/// `GANTRY_BACKUP_PASSPHRASE`.
#[derive(Debug, Args, Clone)]
struct BackupSecretFlags {
    /// File holding the passphrase (one line, at least 12 characters).
    #[arg(long, conflicts_with = "key_file")]
    passphrase_file: Option<PathBuf>,
    /// File of at least 32 random bytes, instead of a passphrase.
    #[arg(long)]
    key_file: Option<PathBuf>,
}

impl BackupSecretFlags {
    fn secret(&self) -> anyhow::Result<crate::backup::BackupSecret> {
        let secret = match (&self.passphrase_file, &self.key_file) {
            (Some(path), _) => crate::backup::BackupSecret::passphrase_file(path)?,
            (None, Some(path)) => crate::backup::BackupSecret::key_file(path)?,
            (None, None) => match env("GANTRY_BACKUP_PASSPHRASE") {
                Some(passphrase) => crate::backup::BackupSecret::Passphrase(passphrase),
                None => anyhow::bail!("give --passphrase-file, --key-file or GANTRY_BACKUP_PASSPHRASE"),
            },
        };
        secret.validate().map_err(|e| anyhow::anyhow!(e))?;
        Ok(secret)
    }
}

#[derive(Debug, Subcommand)]
enum BillingCommand {
    /// Print usage ledger entries whose hour starts in `[from, to)`, through the hub's API
    /// (`GET /api/v1/billing/usage`).
    Export {
        /// Start, inclusive: RFC 3339 or Unix milliseconds.
        #[arg(long)]
        from: String,
        /// End, exclusive: RFC 3339 or Unix milliseconds.
        #[arg(long)]
        to: String,
        /// Only this org (required for keys that are not operators').
        #[arg(long)]
        org: Option<String>,
        /// `csv`, `json` or `cloudevents` (JSON lines).
        #[arg(long, default_value = "csv")]
        format: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum OrgCommand {
    /// Download everything the hub holds of one org (a tar of JSON-lines files with a
    /// manifest) from the running hub's API (`GET /api/v1/orgs/{org}/export`) into a file.
    Export {
        /// The org.
        #[arg(long)]
        org: String,
        /// File to write (replaced only once the whole archive arrived).
        #[arg(long)]
        out: PathBuf,
        /// Telemetry from (inclusive): RFC 3339 or Unix milliseconds; all when absent.
        #[arg(long)]
        from: Option<String>,
        /// Telemetry until (exclusive): RFC 3339 or Unix milliseconds; up to now when absent.
        #[arg(long)]
        to: Option<String>,
        /// Include metric samples.
        #[arg(long)]
        metrics: bool,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Walk the audit log's hash chain and report the first entry that was modified,
    /// removed or reordered (exit 1), or that it is intact (exit 0). Reads the store
    /// directly: stop the hub first.
    Verify {
        /// Data directory of the (stopped) hub.
        #[arg(long, env = "GANTRY_DATA", default_value = crate::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
}

/// Where the CLI finds a running hub and its operator key.
#[derive(Debug, Args, Clone)]
struct Remote {
    /// Hub HTTP base URL.
    #[arg(long, env = "GANTRY_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Data directory holding `operator.key` (used when GANTRY_API_KEY is not set).
    #[arg(long, env = "GANTRY_DATA", default_value = crate::config::DEFAULT_DATA_DIR)]
    data: PathBuf,
}

impl Remote {
    fn key(&self) -> anyhow::Result<String> {
        match env("GANTRY_API_KEY") {
            Some(key) => Ok(key),
            None => Ok(std::fs::read_to_string(self.data.join("operator.key"))
                .with_context(|| format!("no GANTRY_API_KEY and no {}/operator.key", self.data.display()))?
                .trim()
                .to_string()),
        }
    }
}

#[derive(Debug, Subcommand)]
enum DeployCommand {
    /// Create or update a deployment from a file (`{"spec": {...}, "targets": {...}}`, JSON
    /// or YAML); an existing deployment of the same name in the org gets a new revision.
    Apply {
        /// The file (`.json`, `.yaml` or `.yml`; `-` reads standard input as YAML or JSON).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Org the deployment belongs to.
        #[arg(long)]
        org: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show a deployment and where it stands on each agent.
    Status {
        /// Deployment id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Roll a deployment back to an earlier revision (the previous one by default).
    Rollback {
        /// Deployment id.
        id: String,
        /// Revision to go back to.
        #[arg(long)]
        revision: Option<u64>,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create an enrollment token and print the command that enrolls a machine.
    Create {
        /// Org the agents will belong to.
        #[arg(long)]
        org: String,
        /// Lifetime, e.g. 15m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many machines may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Label given to enrolled agents, `key=value`; repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Hub HTTP base URL.
        #[arg(long, env = "GANTRY_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Data directory holding `operator.key` (used when GANTRY_API_KEY is not set).
        #[arg(long, env = "GANTRY_DATA", default_value = crate::config::DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
}

/// `gantry-hub rotate-ca`: one step of a CA rotation, then the CAs the hub trusts.
fn rotate_ca(data: &Path, promote: bool, retire_old: bool, status: bool) -> anyhow::Result<()> {
    use crate::pki::Pki;
    anyhow::ensure!(Pki::exists(data), "{} holds no hub CA; run `gantry-hub init` first", data.display());
    let restart = "restart the hub to apply it";
    if promote {
        Pki::promote_next(data)?;
        println!("promoted the next CA to current; {restart} (its server certificate is then reissued by the new CA)");
    } else if retire_old {
        let old = Pki::retire_old(data)?;
        println!("retired CA {}; {restart} (agents still holding a certificate it signed can no longer connect)", old.sha256);
    } else if !status {
        let next = Pki::stage_next(data)?;
        println!("staged next CA {}; {restart}, then promote it once every agent has connected", next.sha256);
    }
    println!("{:<9} {:<64} not after", "role", "sha256");
    for ca in Pki::load(data)?.cas() {
        let role = serde_json::to_value(ca.role)?.as_str().unwrap_or_default().to_string();
        println!("{role:<9} {} {}", ca.sha256, crate::api::rfc3339(ca.not_after_unix.saturating_mul(1000)));
    }
    Ok(())
}

/// The whole program.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    gantry_agent::cli::init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            // A broken audit chain is a finding, not a failure to run: exit 1 as documented.
            ExitCode::from(if error.is::<crate::audit::ChainBroken>() { 1 } else { 2 })
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn load_config(flags: &ServeFlags) -> anyhow::Result<Config> {
    let overrides = Overrides { data_dir: flags.data.clone(), http_addr: flags.http, quic_addr: flags.quic, public_addr: flags.public_addr.clone() };
    Config::load(flags.config.as_deref(), &env, &overrides)
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init { data, public_addr } => {
            let email = env("GANTRY_ADMIN_EMAIL").unwrap_or_else(|| crate::DEFAULT_ADMIN_EMAIL.to_string());
            let password = env("GANTRY_ADMIN_PASSWORD");
            match crate::init(&data, &public_addr, &email, password.as_deref())? {
                InitOutcome::AlreadyInitialised { ca_fingerprint } => {
                    println!("{} is already initialised (CA {ca_fingerprint}); nothing changed", data.display());
                }
                InitOutcome::Created { admin_email, admin_password, operator_key, ca_fingerprint } => {
                    println!("initialised {} (CA {ca_fingerprint})", data.display());
                    println!("admin login: {admin_email}");
                    if let Some(password) = admin_password {
                        println!("admin password (shown once): {password}");
                    }
                    println!("operator API key (shown once, also saved to {}/operator.key): {operator_key}", data.display());
                }
            }
            Ok(())
        }
        Command::Serve(flags) => {
            let config = load_config(&flags)?;
            let listeners = Listeners::bind(&config)?;
            let hub = Hub::open(config).context("opening the data directory")?;
            tracing::info!(config = ?hub.config, "configuration");
            crate::run(hub, listeners, gantry_agent::cli::shutdown_signal()).await
        }
        Command::Quickstart(flags) => quickstart(flags).await,
        Command::Deploy { command } => deploy(command).await,
        Command::Billing { command: BillingCommand::Export { from, to, org, format, remote } } => {
            let mut path = format!("/api/v1/billing/usage?from={}&to={}&format={}", query_value(&from), query_value(&to), query_value(&format));
            if let Some(org) = org {
                path.push_str(&format!("&org={}", query_value(&org)));
            }
            let (status, bytes) = http_request("GET", &remote.url, &path, &remote.key()?, None, ANSWER_WAIT).await?;
            if !status.is_success() {
                let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                anyhow::bail!("hub answered {status}: {}", value["error"]["message"].as_str().unwrap_or("no details"));
            }
            use std::io::Write;
            std::io::stdout().write_all(&bytes).context("writing the export")?;
            Ok(())
        }
        Command::Org { command: OrgCommand::Export { org, out, from, to, metrics, remote } } => {
            let mut path = format!("/api/v1/orgs/{}/export?metrics={metrics}", query_value(&org));
            for (name, value) in [("from", from), ("to", to)] {
                if let Some(value) = value {
                    path.push_str(&format!("&{name}={}", query_value(&value)));
                }
            }
            let bytes = download_to_file(&remote, &path, &out).await?;
            println!("export of org {org} written to {} ({bytes} bytes)", out.display());
            Ok(())
        }
        Command::Backup { out, secret, remote } => backup_to_file(&out, &secret.secret()?, &remote).await,
        Command::RotateCa { data, promote, retire_old, status } => rotate_ca(&data, promote, retire_old, status),
        Command::Restore { from, data, secret } => {
            let secret = secret.secret()?;
            let restored = tokio::task::spawn_blocking(move || crate::backup::restore(&from, &secret, &data).map(|r| (r, data))).await??;
            let (restored, data) = restored;
            let m = &restored.manifest;
            println!(
                "restored {} records, {} telemetry segment file(s) and {} key file(s) into {} (backup of {}, SHA-256 {})",
                m.records,
                m.segment_files,
                m.files.len(),
                data.display(),
                crate::api::rfc3339(m.created_at_ms),
                restored.sha256
            );
            println!("CA {} (agents keep their certificates); start it with: gantry-hub serve --data {}", m.ca_sha256, data.display());
            Ok(())
        }
        Command::RotateKey { no_reencrypt, reencrypt_only, remote } => {
            let key = remote.key()?;
            let reply = if reencrypt_only {
                http_json_within("POST", &remote.url, "/api/v1/secrets-key/reencrypt", &key, None, REENCRYPT_WAIT).await?
            } else {
                let body = serde_json::json!({ "reencrypt": !no_reencrypt });
                let reply = http_json_within("POST", &remote.url, "/api/v1/secrets-key/rotate", &key, Some(&body), REENCRYPT_WAIT).await?;
                println!("secrets key version {} is now current", reply["version"]);
                reply
            };
            if reply["reencrypted"].is_object() {
                let r = &reply["reencrypted"];
                println!("re-encrypted {} value(s); {} already current; {} failed", r["resealed"], r["current"], r["failed"]);
            }
            println!("sealed values by key version: {}; on older versions: {}", reply["status"]["values_by_version"], reply["status"]["stale"]);
            if reply["reencrypted"]["failed"].as_u64().unwrap_or(0) > 0 {
                anyhow::bail!("some values could not be re-encrypted; see the hub's log");
            }
            Ok(())
        }
        Command::Compact { data } => {
            let done = match crate::store::backup::compact(&data) {
                Err(crate::store::Error::Locked(path)) => anyhow::bail!("the store at {path} is in use: stop the hub before running `gantry-hub compact`"),
                other => other.with_context(|| format!("compacting the store in {}", data.display()))?,
            };
            println!("store compacted: {} trees, {} records, {} bytes before, {} after", done.trees, done.records, done.bytes_before, done.bytes_after);
            Ok(())
        }
        Command::Audit { command: AuditCommand::Verify { data } } => {
            println!("{}", crate::audit::verify_data_dir(&data)?);
            Ok(())
        }
        Command::Token { command: TokenCommand::Create { org, ttl, uses, labels, url, data } } => {
            let key = match env("GANTRY_API_KEY") {
                Some(key) => key,
                None => std::fs::read_to_string(data.join("operator.key"))
                    .with_context(|| format!("no GANTRY_API_KEY and no {}/operator.key", data.display()))?
                    .trim()
                    .to_string(),
            };
            let mut label_map = serde_json::Map::new();
            for label in labels {
                let (k, v) = label.split_once('=').with_context(|| format!("label {label:?} must be key=value"))?;
                label_map.insert(k.to_string(), serde_json::Value::String(v.to_string()));
            }
            let body = serde_json::json!({ "ttl": ttl, "uses": uses, "labels": label_map });
            let path = format!("/api/v1/orgs/{org}/enrollment-tokens");
            let reply = http_json("POST", &url, &path, &key, Some(&body)).await?;
            let token = reply["token"].as_str().context("reply has no token")?;
            println!("token {} for org {org}, {uses} use(s), expires {}", reply["id"].as_str().unwrap_or(""), reply["expires_at"].as_str().unwrap_or(""));
            println!("{token}");
            println!("enroll a machine with:\n  gantry-agent enroll --token {token} && gantry-agent run");
            if let Some(install) = reply["install_command"].as_str() {
                println!("or install the agent there with one command:\n  {install}");
            }
            Ok(())
        }
    }
}

/// Call the hub's API with an optional JSON body; the parsed reply, or the API's error.
pub async fn http_json(method: &str, base: &str, path: &str, bearer: &str, body: Option<&serde_json::Value>) -> anyhow::Result<serde_json::Value> {
    http_json_within(method, base, path, bearer, body, ANSWER_WAIT).await
}

/// [`http_json`] for a call that may take up to `wait` before the hub answers.
async fn http_json_within(
    method: &str,
    base: &str,
    path: &str,
    bearer: &str,
    body: Option<&serde_json::Value>,
    wait: Duration,
) -> anyhow::Result<serde_json::Value> {
    let (status, bytes) = http_request(method, base, path, bearer, body, wait).await?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        let message = value["error"]["message"].as_str().unwrap_or("no details");
        anyhow::bail!("hub answered {status}: {message}");
    }
    Ok(value)
}

/// A query-string value, percent-encoded (RFC 3986 unreserved characters kept).
fn query_value(text: &str) -> String {
    text.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { char::from(b).to_string() } else { format!("%{b:02X}") }).collect()
}

/// How long a CLI call waits for the hub's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(15);
/// How long `rotate-key` waits: the hub answers when every value is re-encrypted, which on
/// a large store (or with `reencrypt_pause_ms`) takes minutes.
const REENCRYPT_WAIT: Duration = Duration::from_secs(3600);

/// Call the hub's API with an optional JSON body; the status and the raw reply.
async fn http_request(
    method: &str,
    base: &str,
    path: &str,
    bearer: &str,
    body: Option<&serde_json::Value>,
    wait: Duration,
) -> anyhow::Result<(hyper::StatusCode, bytes::Bytes)> {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
    let uri = format!("{}{path}", base.trim_end_matches('/'));
    anyhow::ensure!(uri.starts_with("http://"), "only http:// hub URLs are supported by this command: {uri}");
    let bytes = match body {
        Some(body) => serde_json::to_vec(body)?,
        None => Vec::new(),
    };
    let request = hyper::Request::builder()
        .method(method)
        .uri(&uri)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {bearer}"))
        .body(Full::new(bytes::Bytes::from(bytes)))?;
    let response = tokio::time::timeout(wait, client.request(request))
        .await
        .with_context(|| format!("no answer from {uri} within {} s", wait.as_secs()))?
        .with_context(|| format!("cannot reach the hub at {base}"))?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, bytes))
}

/// Read a deployment file as JSON or YAML.
fn read_deploy_file(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
        text
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    let is_json = path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    if is_json {
        serde_json::from_str(&text).with_context(|| format!("parsing {} as JSON", path.display()))
    } else {
        serde_yaml::from_str(&text).with_context(|| format!("parsing {} as YAML", path.display()))
    }
}

fn print_deployment(reply: &serde_json::Value) {
    println!(
        "deployment {} ({}) revision {}{}",
        reply["id"].as_str().unwrap_or(""),
        reply["name"].as_str().unwrap_or(""),
        reply["revision"],
        if reply["deleted_at"].is_string() { ", deleted" } else { "" }
    );
    let targets: Vec<&str> = reply["target_agents"].as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
    println!("targets: {}", if targets.is_empty() { "(no agent matches yet)".to_string() } else { targets.join(", ") });
    if let Some(agents) = reply["agents"].as_object() {
        for (agent, status) in agents {
            println!(
                "  {agent}: revision {} {}{}",
                status["revision"],
                status["state"].as_str().unwrap_or("?"),
                status["message"].as_str().filter(|m| !m.is_empty() && *m != "healthy").map(|m| format!(" ({m})")).unwrap_or_default()
            );
        }
    }
}

async fn deploy(command: DeployCommand) -> anyhow::Result<()> {
    match command {
        DeployCommand::Apply { file, org, remote } => {
            let body = read_deploy_file(&file)?;
            let name = body["spec"]["name"].as_str().context("the file needs spec.name")?.to_string();
            let key = remote.key()?;
            let list = http_json("GET", &remote.url, &format!("/api/v1/orgs/{org}/deployments"), &key, None).await?;
            let existing =
                list["deployments"].as_array().and_then(|all| all.iter().find(|d| d["name"] == name.as_str())).and_then(|d| d["id"].as_str()).map(String::from);
            let reply = match existing {
                Some(id) => http_json("PUT", &remote.url, &format!("/api/v1/deployments/{id}"), &key, Some(&body)).await?,
                None => http_json("POST", &remote.url, &format!("/api/v1/orgs/{org}/deployments"), &key, Some(&body)).await?,
            };
            print_deployment(&reply);
            Ok(())
        }
        DeployCommand::Status { id, remote } => {
            let reply = http_json("GET", &remote.url, &format!("/api/v1/deployments/{id}"), &remote.key()?, None).await?;
            print_deployment(&reply);
            Ok(())
        }
        DeployCommand::Rollback { id, revision, remote } => {
            let body = serde_json::json!({ "revision": revision });
            let reply = http_json("POST", &remote.url, &format!("/api/v1/deployments/{id}/rollback"), &remote.key()?, Some(&body)).await?;
            print_deployment(&reply);
            Ok(())
        }
    }
}

/// Quickstart's local org.
pub const QUICKSTART_ORG: &str = "default";

async fn quickstart(flags: ServeFlags) -> anyhow::Result<()> {
    let mut config = load_config(&flags)?;
    let listeners = Listeners::bind(&config)?;
    let quic_port = listeners.quic.local_addr()?.port();
    let quic_ip = listeners.quic.local_addr()?.ip();
    let local_quic = SocketAddr::new(if quic_ip.is_unspecified() { [127, 0, 0, 1].into() } else { quic_ip }, quic_port);
    let default_public = if quic_ip.is_unspecified() { format!("127.0.0.1:{quic_port}") } else { format!("{quic_ip}:{quic_port}") };
    let public_addr = config.public_addr.clone().unwrap_or(default_public);
    config.http_addr = listeners.http.local_addr()?;
    let data = config.data_dir.clone();
    let email = env("GANTRY_ADMIN_EMAIL").unwrap_or_else(|| crate::DEFAULT_ADMIN_EMAIL.to_string());
    let password_file = data.join("initial-admin-password");
    let login = match crate::init(&data, &public_addr, &email, env("GANTRY_ADMIN_PASSWORD").as_deref())? {
        InitOutcome::Created { admin_email, admin_password, .. } => {
            if let Some(password) = &admin_password {
                crate::write_secret(&password_file, password)?;
            }
            (admin_email, admin_password)
        }
        InitOutcome::AlreadyInitialised { .. } => (email, std::fs::read_to_string(&password_file).ok().map(|p| p.trim().to_string())),
    };
    if config.public_addr.is_none() {
        config.public_addr = Some(public_addr);
    }
    let hub = Hub::open(config)?;
    if hub.store.org(QUICKSTART_ORG)?.is_none() {
        hub.store.create_org(&crate::store::Org {
            id: QUICKSTART_ORG.to_string(),
            name: "Default".to_string(),
            agent_limit: hub.config.default_org_agent_limit,
            agent_count: 0,
            suspended: false,
            created_at_ms: crate::wall_ms(),
            retention_days: 0,
        })?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let serve = {
        let hub = hub.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            crate::run(hub, listeners, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        })
    };
    let agent_dir = data.join("local-agent");
    let state = gantry_agent::state::StateDir::new(&agent_dir);
    if !state.is_enrolled() {
        let minted = crate::enroll::create_token(&hub, token_request(QUICKSTART_ORG, Duration::from_secs(600), 1, "quickstart"))?;
        let done = gantry_agent::enroll::enroll(&minted.text, &state, false, Duration::from_secs(20)).await?;
        tracing::info!(agent_id = %done.identity.agent_id, "local agent enrolled");
    }
    // The local agent dials the listener directly: its enrolled address may name a port
    // from an earlier run (quickstart may bind port 0).
    let agent_config =
        gantry_agent::config::Config { state_dir: agent_dir.clone(), hub_addr: Some(local_quic.to_string()), ..gantry_agent::config::Config::default() };
    let agent = {
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            gantry_agent::connection::run(agent_config, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        })
    };
    let another = crate::enroll::create_token(&hub, token_request(QUICKSTART_ORG, Duration::from_secs(24 * 3600), 10, "quickstart"))?;
    print_quickstart(&hub, &login, &another.text, &data);

    gantry_agent::cli::shutdown_signal().await;
    println!("stopping…");
    let _ = stop_tx.send(true);
    if let Ok(Err(error)) = agent.await {
        tracing::warn!(%error, "local agent stopped with an error");
    }
    serve.await.context("hub task")??;
    Ok(())
}

fn token_request(org: &str, ttl: Duration, uses: u32, by: &str) -> crate::enroll::TokenRequest {
    crate::enroll::TokenRequest { org: org.to_string(), ttl, uses, labels: Vec::new(), created_by: by.to_string() }
}

fn print_quickstart(hub: &Arc<Hub>, login: &(String, Option<String>), token: &str, data: &Path) {
    let url = hub.config.public_url();
    println!();
    println!("Gantry is running.");
    println!("  dashboard:  {url}/");
    println!("  login:      {}", login.0);
    match &login.1 {
        Some(password) => println!("  password:   {password}"),
        None => println!("  password:   the one set with GANTRY_ADMIN_PASSWORD when {} was created", data.display()),
    }
    println!("  agents:     QUIC on {} (a local agent is enrolled in org '{QUICKSTART_ORG}')", hub.public_addr);
    println!("  API key:    {}/operator.key (use as `Authorization: Bearer`)", data.display());
    println!();
    println!("Enroll another machine (token valid 24 h, 10 uses):");
    println!("  gantry-agent enroll --token {token} && gantry-agent run");
    if crate::install::builds(&hub.config.installer).is_empty() {
        // Nothing to download: install.sh would stop at its download step.
        println!("(the one-command installer needs an agent build to serve: build gantry-agent beside");
        println!(" gantry-hub, e.g. `cargo build --release -p gantry-agent`, or set [installer] downloads_dir)");
    } else {
        println!("or install the agent there with one command:");
        println!("  curl -fsSL {url}/install.sh | sudo sh -s -- --token {token}");
    }
    println!();
    println!("Press Ctrl-C to stop.");
}

/// `gantry-hub backup`: stream the running hub's backup into `FILE.partial`, check its
/// checksum against the one the hub announced, then rename it to `out`.
async fn backup_to_file(out: &Path, secret: &crate::backup::BackupSecret, remote: &Remote) -> anyhow::Result<()> {
    let body = match secret {
        crate::backup::BackupSecret::Passphrase(passphrase) => serde_json::json!({ "passphrase": passphrase }),
        crate::backup::BackupSecret::KeyFile(bytes) => serde_json::json!({ "key_file_base64": data_encoding::BASE64.encode(bytes) }),
    };
    let mut sha256 = String::new();
    let verify = |partial: &Path, headers: &hyper::HeaderMap| -> anyhow::Result<()> {
        let announced = headers.get("x-backup-sha256").and_then(|v| v.to_str().ok());
        sha256 = crate::backup::verify_checksum(partial)?;
        anyhow::ensure!(announced == Some(sha256.as_str()), "the backup received does not match the checksum the hub announced");
        Ok(())
    };
    // The hub answers once the snapshot is written, which takes longer for a big store.
    let bytes = fetch_to_file(remote, "POST", "/api/v1/backups", Some(serde_json::to_vec(&body)?), out, verify).await?;
    println!("backup written to {} ({bytes} bytes, SHA-256 {sha256})", out.display());
    Ok(())
}

/// `GET path` on the running hub, streamed into `FILE.partial` and renamed to `out` once
/// complete; the bytes written.
async fn download_to_file(remote: &Remote, path: &str, out: &Path) -> anyhow::Result<u64> {
    // The hub answers once the archive is built, which takes longer for a big org.
    fetch_to_file(remote, "GET", path, None, out, |_, _| Ok(())).await
}

/// `method path` (with a JSON `body`) on the running hub with the operator's key, the answer
/// streamed into `FILE.partial`, made durable, accepted by `check` (given the partial file
/// and the response headers) and only then renamed to `out`; the bytes written. The partial
/// file is removed on any failure. Waits up to an hour for the answer to start.
async fn fetch_to_file(
    remote: &Remote,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    out: &Path,
    check: impl FnOnce(&Path, &hyper::HeaderMap) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    use http_body_util::{BodyExt, Full};
    use tokio::io::AsyncWriteExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
    let uri = format!("{}{path}", remote.url.trim_end_matches('/'));
    anyhow::ensure!(uri.starts_with("http://"), "only http:// hub URLs are supported by this command: {uri}");
    let mut request = hyper::Request::builder().method(method).uri(&uri).header("authorization", format!("Bearer {}", remote.key()?));
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request.body(Full::new(bytes::Bytes::from(body.unwrap_or_default())))?;
    let response = tokio::time::timeout(Duration::from_secs(3600), client.request(request))
        .await
        .context("no answer from the hub within an hour")?
        .with_context(|| format!("cannot reach the hub at {}", remote.url))?;
    let status = response.status();
    let headers = response.headers().clone();
    let mut body = response.into_body();
    if !status.is_success() {
        let bytes = body.collect().await?.to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        anyhow::bail!("hub answered {status}: {}", value["error"]["message"].as_str().unwrap_or("no details"));
    }
    let partial = out.with_extension("partial");
    let mut file = tokio::fs::File::create(&partial).await.with_context(|| format!("creating {}", partial.display()))?;
    let written = async {
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.context("the download broke off")?.into_data() {
                file.write_all(&data).await?;
                bytes += data.len() as u64;
            }
        }
        file.sync_all().await?;
        check(&partial, &headers)?;
        tokio::fs::rename(&partial, out).await.with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
        Ok::<_, anyhow::Error>(bytes)
    }
    .await;
    if written.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    written
}
