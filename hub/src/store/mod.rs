//! The hub's store: sled trees in one data directory, behind this module's API.
//!
//! Nothing outside this module knows sled or the key layout, so a clustered backend can
//! replace it later. Values are JSON (readable with any sled dump, tolerant of added fields);
//! keys are designed for range scans (`org \0 agent` for agents of an org). Multi-record
//! changes (an enrollment spends a token use, counts against the org and creates the agent)
//! run in one sled transaction, so they hold under concurrency and crashes.
//!
//! Every write path holds the store-wide write gate shared ([`Store::writing`]) for as long
//! as it changes records, so [`Store::snapshot`] (`backup.rs`), holding it exclusively,
//! sees no operation half-applied across trees. The telemetry writer is held by its own
//! gate instead (`segments.rs`).
//!
//! This module must not know HTTP, QUIC or certificates: callers pass in plain records.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use std::path::Path;

mod accounts;
mod alerts;
mod audit;
pub mod backup;
mod branding;
mod checks;
mod deployments;
mod ledger;
mod org_data;
mod org_settings;
mod plans;
mod rekey;
mod secrets;
mod segments;
mod stripe;
mod telemetry;
mod webhooks;
pub use accounts::{Invitation, Membership, Spend};
pub use alerts::{Alert, AlertRules, AlertStatus, Silence};
pub use audit::{entry_hash, verify_chain, AuditEntry, AuditFilter, AuditPage, AuditVerdict, Head as AuditHead, NewAuditEntry, AUDIT_SCAN_LIMIT, GENESIS_HASH};
pub use branding::StoredBrand;
pub use checks::{CheckConfig, CheckScope, CheckStatus};
pub use deployments::{AgentDeployStatus, Deployment, Revision, Targets};
pub use ledger::{EntryKind, LedgerConflict, LedgerEntry, Recorded as LedgerRecorded};
pub use org_data::{ConfirmError, DeletionRequest, Tombstone};
pub use org_settings::OrgSettings;
pub use plans::ClosedInvoice;
pub use rekey::{SealedPlace, SealedValue};
pub use secrets::{StoredRegistry, StoredSecret};
pub use stripe::{OrderMarks, OutboxRow, OutboxState, Recorded, StripeEvent};
pub use telemetry::{IngestOutcome, MetricSeries, RecordCursor, RecordFilter, StoredUsage};
pub use webhooks::{DeliveryAttempt, DeliveryStatus, Webhook, WebhookDelivery, WebhookEvent};

/// Store format version written at creation; a newer one is refused.
pub const SCHEMA_VERSION: u32 = 1;

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store is not initialised at {0}; run `gantry-hub init` first")]
    NotInitialised(String),
    #[error("store schema version {found} is newer than this hub understands ({SCHEMA_VERSION})")]
    SchemaTooNew { found: u32 },
    #[error("store at {0} is in use by another process (is another gantry-hub running on this data directory?)")]
    Locked(String),
    #[error("store io: {0}")]
    Sled(#[from] sled::Error),
    #[error("store record is corrupt: {0}")]
    Corrupt(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

/// Why an enrollment was refused by the store's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    #[error("token not found")]
    UnknownToken,
    #[error("token expired")]
    TokenExpired,
    #[error("token used up")]
    TokenUsedUp,
    #[error("token revoked")]
    TokenRevoked,
    #[error("org not found")]
    UnknownOrg,
    #[error("org at agent limit {limit}")]
    OrgAtAgentLimit { limit: u32 },
    #[error("org suspended")]
    OrgSuspended,
}

/// A tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Org {
    /// Slug, unique, used in URLs.
    pub id: String,
    pub name: String,
    /// Agents this org may have enrolled (not revoked) at once.
    pub agent_limit: u32,
    /// Agents enrolled and not revoked.
    pub agent_count: u32,
    pub suspended: bool,
    pub created_at_ms: i64,
    /// Days of telemetry kept; 0 means the hub's default.
    #[serde(default)]
    pub retention_days: u32,
}

/// A person who logs in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct User {
    pub id: String,
    /// Lowercased email, the login name.
    pub email: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Platform operator: may act in every org.
    pub operator: bool,
    pub disabled: bool,
    pub created_at_ms: i64,
    /// TOTP second factor, pending until confirmed with a code (see `totp.rs`).
    #[serde(default)]
    pub totp: Option<crate::totp::Factor>,
}

/// A login session; the key is the SHA-256 of the cookie value, never the value itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Session {
    pub user_id: String,
    pub email: String,
    pub created_at_ms: i64,
    pub last_seen_ms: i64,
}

/// An API key; the secret is stored as its SHA-256 only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub secret_sha256: String,
    /// `None` for operator keys, which act across orgs.
    pub org: Option<String>,
    pub created_by: String,
    pub created_at_ms: i64,
    pub revoked: bool,
    /// What the key may do (keys from before scopes existed hold all of them).
    #[serde(default = "crate::access::Scope::all")]
    pub scopes: Vec<crate::access::Scope>,
    /// The user who made it: the key can never do more than that user still may, and stops
    /// working when the user is disabled. `None` for keys made by the CLI at init.
    #[serde(default)]
    pub created_by_user: Option<String>,
    /// After this the key is refused.
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
    /// Last successful use (recorded at most once a minute).
    #[serde(default)]
    pub last_used_ms: Option<i64>,
}

/// An enrollment token; the secret is stored as its SHA-256 only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub org: String,
    pub secret_sha256: String,
    pub labels: Vec<(String, String)>,
    pub expires_at_ms: i64,
    pub uses_total: u32,
    pub uses_left: u32,
    pub revoked: bool,
    pub created_by: String,
    pub created_at_ms: i64,
}

/// An enrolled agent: identity, facts it reported, and its last known connection state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Agent {
    pub id: String,
    pub org: String,
    pub labels: Vec<(String, String)>,
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub arch: String,
    pub cpu_count: u32,
    pub memory_bytes: u64,
    pub agent_version: String,
    pub enrolled_at_ms: i64,
    pub enrolled_with_token: String,
    /// SHA-256 (hex) of the current certificate.
    pub cert_sha256: String,
    pub cert_not_after_ms: i64,
    pub revoked_at_ms: Option<i64>,
    /// Whether a session was live when this record was last written. Reset to false for
    /// every agent when the hub starts, since connections do not survive a hub restart.
    pub connected: bool,
    pub last_seen_ms: Option<i64>,
    pub last_connected_ms: Option<i64>,
    pub last_disconnected_ms: Option<i64>,
    pub remote_addr: Option<String>,
    pub rtt_ms: Option<f64>,
    pub clock_skew_ms: Option<i64>,
    pub protocol_version: Option<u16>,
}

/// Serialises every flush of the store and lets concurrent writers share one (group
/// commit). sled 0.34 can deadlock when flushes run concurrently with writes (seen under
/// load: every flush waiting on log stability, writers on sled's global lock; see
/// spacejam/sled#1308), so no two flushes ever run at once.
#[derive(Debug, Default)]
struct Flusher {
    lock: std::sync::Mutex<()>,
    /// Flushes asked for, numbered from 1.
    requested: std::sync::atomic::AtomicU64,
    /// Every request numbered up to this is durable.
    completed: std::sync::atomic::AtomicU64,
}

impl Flusher {
    /// See [`Store::durable`].
    fn durable(&self, db: &sled::Db) -> Result<(), Error> {
        use std::sync::atomic::Ordering;
        let ticket = self.requested.fetch_add(1, Ordering::AcqRel) + 1;
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.completed.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        // Every request numbered up to `target` wrote before asking: this flush covers it.
        let target = self.requested.load(Ordering::Acquire);
        db.flush()?;
        self.completed.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }
}

/// The store-wide write gate: write paths hold it shared, a snapshot exclusively.
#[derive(Debug, Default)]
struct WriteGate(std::sync::RwLock<()>);

thread_local! {
    /// How many [`Writing`] guards this thread holds. Only the outermost takes the gate:
    /// std's `RwLock` makes new readers wait behind a waiting writer, so a write path that
    /// took it again from inside another would deadlock against a snapshot.
    static WRITING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Held by a write path while it changes records (see the module doc). Not `Send`: it
/// never crosses an `.await`, so a snapshot never waits on a parked task.
struct Writing<'a> {
    _shared: Option<std::sync::RwLockReadGuard<'a, ()>>,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        WRITING.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// The hub's store, cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    /// See [`WriteGate`]; the data directory, for a snapshot's spill file.
    gate: std::sync::Arc<WriteGate>,
    dir: std::path::PathBuf,
    flusher: std::sync::Arc<Flusher>,
    /// Metric-name index keys known to be written (see telemetry.rs), so ingest writes each
    /// once.
    metric_names_written: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<Vec<u8>>>>,
    /// Telemetry chunk payloads (see segments.rs).
    segments: std::sync::Arc<segments::Segments>,
    /// The telemetry writer thread (see telemetry.rs).
    telemetry_writer: std::sync::mpsc::Sender<telemetry::WriterJob>,
    meta: sled::Tree,
    orgs: sled::Tree,
    users: sled::Tree,
    sessions: sled::Tree,
    api_keys: sled::Tree,
    tokens: sled::Tree,
    agents: sled::Tree,
    agents_by_org: sled::Tree,
    deployments: sled::Tree,
    deployment_names: sled::Tree,
    deployment_revisions: sled::Tree,
    deployment_status: sled::Tree,
    /// Rolling rollouts in progress or stopped, by deployment id.
    rollouts: sled::Tree,
    /// Org secrets and registry logins, sealed: see `secrets.rs`.
    secrets: sled::Tree,
    registries: sled::Tree,
    /// Telemetry per class (metrics, logs, events, health): see `telemetry.rs`.
    telemetry: [sled::Tree; 4],
    /// Webhook endpoints, events and the delivery queue: see `webhooks.rs`.
    webhooks: webhooks::Trees,
    /// Check configurations and each agent's latest check states: see `checks.rs`.
    checks: checks::Trees,
    /// Alerts, silences and alert rules: see `alerts.rs`.
    alerts: alerts::Trees,
    /// The hash-chained audit log: see `audit.rs`.
    audit: audit::Trees,
    /// Memberships and invitations: see `accounts.rs`.
    accounts: accounts::Trees,
    /// Plans, subscriptions and closed invoices: see `plans.rs`.
    plans: plans::Trees,
    /// The usage ledger: see `ledger.rs`.
    ledger: ledger::Trees,
    /// The Stripe meter-event outbox and processed webhook events: see `stripe.rs`.
    stripe: stripe::Trees,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain structs to JSON cannot fail: no maps with non-string keys.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("{what}: {e}")))
}

fn org_agent_key(org: &str, agent: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(org.len() + agent.len() + 1);
    key.extend_from_slice(org.as_bytes());
    key.push(0);
    key.extend_from_slice(agent.as_bytes());
    key
}

/// Page cache of a store opened without a configured size (CLI commands, tests).
const DEFAULT_CACHE_BYTES: u64 = 128 << 20;

/// How long opening waits for a lock left by this process's own earlier handle.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Store {
    /// Whether a store exists at `dir`.
    pub fn exists(dir: &Path) -> bool {
        dir.join("store").join("db").exists()
    }

    /// Create or open the store under `dir/store`, writing the schema version if new.
    pub fn create(dir: &Path) -> Result<Store, Error> {
        backup::finish_compaction(dir)?;
        let store = Store::open_raw(dir, DEFAULT_CACHE_BYTES)?;
        if store.meta.get("schema_version")?.is_none() {
            store.meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
            store.durable()?;
        }
        store.check_schema()?;
        Ok(store)
    }

    /// Open an existing store; refuses a missing or newer one.
    pub fn open(dir: &Path) -> Result<Store, Error> {
        Store::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// [`Store::open`] with a page cache of `cache_bytes`.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Store, Error> {
        backup::finish_compaction(dir)?;
        if !Store::exists(dir) {
            return Err(Error::NotInitialised(dir.display().to_string()));
        }
        let store = Store::open_raw(dir, cache_bytes)?;
        store.check_schema()?;
        Ok(store)
    }

    fn open_raw(dir: &Path, cache_bytes: u64) -> Result<Store, Error> {
        let path = dir.join("store");
        let started = std::time::Instant::now();
        // sled releases its file lock only when its last background thread lets go of the
        // database, which can trail a drop by a moment; wait that out, but refuse a lock that
        // another process keeps.
        let db = loop {
            match sled::Config::new().path(&path).cache_capacity(cache_bytes).open() {
                Ok(db) => break db,
                Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                    if started.elapsed() >= LOCK_WAIT {
                        return Err(Error::Locked(path.display().to_string()));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let telemetry = [db.open_tree("t_metrics")?, db.open_tree("t_logs")?, db.open_tree("t_events")?, db.open_tree("t_health")?];
        let flusher = std::sync::Arc::new(Flusher::default());
        let metric_names_written = std::sync::Arc::default();
        let segments = std::sync::Arc::new(segments::Segments::open(&dir.join("telemetry"), telemetry::all_locations(&telemetry)?.into_iter())?);
        let appender = segments.appender()?;
        let telemetry_writer = telemetry::Writer { db: db.clone(), trees: telemetry.clone(), flusher: flusher.clone(), appender }.spawn()?;
        Ok(Store {
            webhooks: webhooks::Trees::open(&db)?,
            checks: checks::Trees::open(&db)?,
            alerts: alerts::Trees::open(&db)?,
            audit: audit::Trees::open(&db)?,
            accounts: accounts::Trees::open(&db)?,
            plans: plans::Trees::open(&db)?,
            ledger: ledger::Trees::open(&db)?,
            stripe: stripe::Trees::open(&db)?,
            meta: db.open_tree("meta")?,
            orgs: db.open_tree("orgs")?,
            users: db.open_tree("users")?,
            sessions: db.open_tree("sessions")?,
            api_keys: db.open_tree("api_keys")?,
            tokens: db.open_tree("tokens")?,
            agents: db.open_tree("agents")?,
            agents_by_org: db.open_tree("agents_by_org")?,
            deployments: db.open_tree("deployments")?,
            deployment_names: db.open_tree("deployment_names")?,
            deployment_revisions: db.open_tree("deployment_revisions")?,
            deployment_status: db.open_tree("deployment_status")?,
            rollouts: db.open_tree("rollouts")?,
            secrets: db.open_tree("secrets")?,
            registries: db.open_tree("registries")?,
            telemetry,
            db,
            gate: std::sync::Arc::default(),
            dir: dir.to_path_buf(),
            flusher,
            metric_names_written,
            telemetry_writer,
            segments,
        })
    }

    /// Hold the write gate shared until the guard drops (see the module doc). Every method
    /// that changes records takes it first; nested calls on one thread share the outermost.
    fn writing(&self) -> Writing<'_> {
        let outermost = WRITING.with(|n| {
            let held = n.get();
            n.set(held + 1);
            held == 0
        });
        Writing { _shared: outermost.then(|| self.gate.0.read().unwrap_or_else(|p| p.into_inner())) }
    }

    /// Hold every write path still until the guard drops (a snapshot).
    fn hold_writes(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.gate.0.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Make every write made before this call durable. One flush runs at a time; a caller
    /// whose writes a flush that started after them already covered returns at once.
    fn durable(&self) -> Result<(), Error> {
        self.flusher.durable(&self.db)
    }

    /// [`Store::durable`] off the async workers.
    async fn durable_async(&self) -> Result<(), Error> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.durable()).await.map_err(|e| Error::Corrupt(format!("flush task failed: {e}")))?
    }

    fn check_schema(&self) -> Result<(), Error> {
        let Some(raw) = self.meta.get("schema_version")? else {
            return Err(Error::Corrupt("schema version missing".into()));
        };
        let bytes: [u8; 4] = raw.as_ref().try_into().map_err(|_| Error::Corrupt("schema version".into()))?;
        let found = u32::from_be_bytes(bytes);
        if found > SCHEMA_VERSION {
            return Err(Error::SchemaTooNew { found });
        }
        Ok(())
    }

    /// Flush everything to disk.
    pub async fn flush(&self) -> Result<(), Error> {
        self.durable_async().await?;
        Ok(())
    }

    /// Write a small setting (e.g. the public address chosen at init).
    pub fn set_setting(&self, name: &str, value: &str) -> Result<(), Error> {
        let _writing = self.writing();
        self.meta.insert(format!("setting/{name}"), value.as_bytes())?;
        self.durable()?;
        Ok(())
    }

    pub fn setting(&self, name: &str) -> Result<Option<String>, Error> {
        Ok(self.meta.get(format!("setting/{name}"))?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Whether the store answers reads (for `/readyz`).
    pub fn is_healthy(&self) -> bool {
        self.meta.get("schema_version").is_ok()
    }

    fn get<T: DeserializeOwned>(tree: &sled::Tree, what: &str, key: &[u8]) -> Result<Option<T>, Error> {
        tree.get(key)?.map(|v| decode(what, &v)).transpose()
    }

    fn insert_new<T: Serialize>(tree: &sled::Tree, what: &str, key: &[u8], value: &T) -> Result<(), Error> {
        tree.compare_and_swap(key, None as Option<&[u8]>, Some(encode(value)))?.map_err(|_| Error::AlreadyExists(what.to_string()))?;
        Ok(())
    }

    fn scan<T: DeserializeOwned>(tree: &sled::Tree, what: &str) -> Result<Vec<T>, Error> {
        tree.iter().values().map(|v| decode(what, &v?)).collect()
    }

    // ---- orgs ----

    pub fn create_org(&self, org: &Org) -> Result<(), Error> {
        let _writing = self.writing();
        if self.org_tombstone(&org.id)?.is_some() {
            return Err(Error::AlreadyExists(format!("org {} (deleted: the id stays reserved for its kept ledger and audit records)", org.id)));
        }
        Store::insert_new(&self.orgs, &format!("org {}", org.id), org.id.as_bytes(), org)?;
        self.durable()?;
        Ok(())
    }

    pub fn org(&self, id: &str) -> Result<Option<Org>, Error> {
        Store::get(&self.orgs, "org", id.as_bytes())
    }

    pub fn orgs(&self) -> Result<Vec<Org>, Error> {
        Store::scan(&self.orgs, "org")
    }

    // ---- users and sessions ----

    pub fn create_user(&self, user: &User) -> Result<(), Error> {
        let _writing = self.writing();
        Store::insert_new(&self.users, &format!("user {}", user.email), user.email.as_bytes(), user)?;
        self.durable()?;
        Ok(())
    }

    pub fn user_by_email(&self, email: &str) -> Result<Option<User>, Error> {
        Store::get(&self.users, "user", email.as_bytes())
    }

    pub fn users(&self) -> Result<Vec<User>, Error> {
        Store::scan(&self.users, "user")
    }

    pub fn put_session(&self, key_sha256: &str, session: &Session) -> Result<(), Error> {
        let _writing = self.writing();
        self.sessions.insert(key_sha256.as_bytes(), encode(session))?;
        Ok(())
    }

    pub fn session(&self, key_sha256: &str) -> Result<Option<Session>, Error> {
        Store::get(&self.sessions, "session", key_sha256.as_bytes())
    }

    pub fn delete_session(&self, key_sha256: &str) -> Result<(), Error> {
        let _writing = self.writing();
        self.sessions.remove(key_sha256.as_bytes())?;
        Ok(())
    }

    // ---- API keys ----

    pub fn create_api_key(&self, key: &ApiKey) -> Result<(), Error> {
        let _writing = self.writing();
        Store::insert_new(&self.api_keys, &format!("api key {}", key.id), key.id.as_bytes(), key)?;
        self.durable()?;
        Ok(())
    }

    pub fn api_key(&self, id: &str) -> Result<Option<ApiKey>, Error> {
        Store::get(&self.api_keys, "api key", id.as_bytes())
    }

    // ---- enrollment tokens ----

    pub fn create_token(&self, token: &Token) -> Result<(), Error> {
        let _writing = self.writing();
        Store::insert_new(&self.tokens, &format!("token {}", token.id), token.id.as_bytes(), token)?;
        self.durable()?;
        Ok(())
    }

    pub fn token(&self, id: &str) -> Result<Option<Token>, Error> {
        Store::get(&self.tokens, "token", id.as_bytes())
    }

    /// Spend one use of `token_id` and create `agent`, atomically: the token must be
    /// live at `now_ms` with a use left, the org must exist, not be suspended and be under
    /// its agent limit. The caller has already checked the token secret.
    pub fn enroll(&self, token_id: &str, now_ms: i64, agent: &Agent) -> Result<Result<Token, EnrollError>, Error> {
        let _writing = self.writing();
        let result = (&self.tokens, &self.orgs, &self.agents, &self.agents_by_org).transaction(|(tokens, orgs, agents, by_org)| {
            let abort = |e: EnrollError| ConflictableTransactionError::Abort(Ok::<EnrollError, Error>(e));
            let corrupt = |e: Error| ConflictableTransactionError::Abort(Err::<EnrollError, Error>(e));
            let Some(raw) = tokens.get(token_id.as_bytes())? else {
                return Err(abort(EnrollError::UnknownToken));
            };
            let mut token: Token = decode("token", &raw).map_err(corrupt)?;
            if token.revoked {
                return Err(abort(EnrollError::TokenRevoked));
            }
            if now_ms >= token.expires_at_ms {
                return Err(abort(EnrollError::TokenExpired));
            }
            if token.uses_left == 0 {
                return Err(abort(EnrollError::TokenUsedUp));
            }
            let Some(raw) = orgs.get(token.org.as_bytes())? else {
                return Err(abort(EnrollError::UnknownOrg));
            };
            let mut org: Org = decode("org", &raw).map_err(corrupt)?;
            if org.suspended {
                return Err(abort(EnrollError::OrgSuspended));
            }
            if org.agent_count >= org.agent_limit {
                return Err(abort(EnrollError::OrgAtAgentLimit { limit: org.agent_limit }));
            }
            token.uses_left -= 1;
            org.agent_count += 1;
            tokens.insert(token.id.as_bytes(), encode(&token))?;
            orgs.insert(org.id.as_bytes(), encode(&org))?;
            agents.insert(agent.id.as_bytes(), encode(agent))?;
            by_org.insert(org_agent_key(&agent.org, &agent.id), &[])?;
            Ok(token)
        });
        match result {
            Ok(token) => {
                self.durable()?;
                Ok(Ok(token))
            }
            Err(TransactionError::Abort(Ok(refusal))) => Ok(Err(refusal)),
            Err(TransactionError::Abort(Err(e))) => Err(e),
            Err(TransactionError::Storage(e)) => Err(Error::Sled(e)),
        }
    }

    // ---- agents ----

    pub fn agent(&self, id: &str) -> Result<Option<Agent>, Error> {
        Store::get(&self.agents, "agent", id.as_bytes())
    }

    /// Agents of one org, in id order.
    pub fn agents_of_org(&self, org: &str) -> Result<Vec<Agent>, Error> {
        let mut prefix = org.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for key in self.agents_by_org.scan_prefix(&prefix).keys() {
            let key = key?;
            let id = &key[prefix.len()..];
            if let Some(agent) = Store::get::<Agent>(&self.agents, "agent", id)? {
                out.push(agent);
            }
        }
        Ok(out)
    }

    /// Every agent, in id order.
    pub fn agents(&self) -> Result<Vec<Agent>, Error> {
        Store::scan(&self.agents, "agent")
    }

    /// Apply `change` to the agent record `id` atomically (retrying on concurrent writes);
    /// `Ok(None)` if there is no such agent.
    pub fn update_agent(&self, id: &str, mut change: impl FnMut(&mut Agent)) -> Result<Option<Agent>, Error> {
        let _writing = self.writing();
        loop {
            let Some(raw) = self.agents.get(id.as_bytes())? else {
                return Ok(None);
            };
            let mut agent: Agent = decode("agent", &raw)?;
            change(&mut agent);
            let swapped = self.agents.compare_and_swap(id.as_bytes(), Some(raw), Some(encode(&agent)))?;
            if swapped.is_ok() {
                return Ok(Some(agent));
            }
        }
    }

    /// Mark an agent revoked and release its slot in the org's agent limit. Returns the
    /// updated record, or `None` if unknown. Revoking twice changes nothing.
    pub fn revoke_agent(&self, id: &str, now_ms: i64) -> Result<Option<Agent>, Error> {
        let _writing = self.writing();
        let result = (&self.agents, &self.orgs).transaction(|(agents, orgs)| {
            let corrupt = |e: Error| ConflictableTransactionError::Abort(e);
            let Some(raw) = agents.get(id.as_bytes())? else {
                return Ok(None);
            };
            let mut agent: Agent = decode("agent", &raw).map_err(corrupt)?;
            if agent.revoked_at_ms.is_some() {
                return Ok(Some(agent));
            }
            agent.revoked_at_ms = Some(now_ms);
            agents.insert(id.as_bytes(), encode(&agent))?;
            if let Some(raw) = orgs.get(agent.org.as_bytes())? {
                let mut org: Org = decode("org", &raw).map_err(corrupt)?;
                org.agent_count = org.agent_count.saturating_sub(1);
                orgs.insert(org.id.as_bytes(), encode(&org))?;
            }
            Ok(Some(agent))
        });
        let agent = match result {
            Ok(agent) => agent,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(Error::Sled(e)),
        };
        self.durable()?;
        Ok(agent)
    }

    /// At startup: no connection survived the previous process, so no agent is connected.
    pub fn mark_all_disconnected(&self, now_ms: i64) -> Result<usize, Error> {
        let _writing = self.writing();
        let mut changed = 0;
        for agent in self.agents()? {
            if agent.connected {
                self.update_agent(&agent.id, |a| {
                    a.connected = false;
                    a.last_disconnected_ms = Some(now_ms);
                })?;
                changed += 1;
            }
        }
        self.durable()?;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org(id: &str, limit: u32) -> Org {
        Org { id: id.into(), name: id.into(), agent_limit: limit, agent_count: 0, suspended: false, created_at_ms: 0, retention_days: 0 }
    }

    fn token(id: &str, org: &str, uses: u32, expires: i64) -> Token {
        Token {
            id: id.into(),
            org: org.into(),
            secret_sha256: "x".into(),
            labels: vec![],
            expires_at_ms: expires,
            uses_total: uses,
            uses_left: uses,
            revoked: false,
            created_by: "test".into(),
            created_at_ms: 0,
        }
    }

    fn agent(id: &str, org: &str) -> Agent {
        Agent { id: id.into(), org: org.into(), ..Agent::default() }
    }

    #[test]
    fn enrollment_spends_token_uses_and_respects_the_org_limit() {
        let dir = tempdir();
        let store = Store::create(&dir).unwrap();
        store.create_org(&org("acme", 2)).unwrap();
        store.create_token(&token("t1", "acme", 5, 1000)).unwrap();
        assert!(store.enroll("t1", 10, &agent("a1", "acme")).unwrap().is_ok());
        assert!(store.enroll("t1", 10, &agent("a2", "acme")).unwrap().is_ok());
        assert_eq!(store.enroll("t1", 10, &agent("a3", "acme")).unwrap(), Err(EnrollError::OrgAtAgentLimit { limit: 2 }));
        assert!(store.agent("a3").unwrap().is_none(), "refused enrollment wrote nothing");
        assert_eq!(store.token("t1").unwrap().unwrap().uses_left, 3);
        store.revoke_agent("a1", 20).unwrap();
        assert!(store.enroll("t1", 30, &agent("a3", "acme")).unwrap().is_ok());
        assert_eq!(store.enroll("t1", 2000, &agent("a4", "acme")).unwrap(), Err(EnrollError::TokenExpired));
        let ids: Vec<_> = store.agents_of_org("acme").unwrap().into_iter().map(|a| a.id).collect();
        assert_eq!(ids, ["a1", "a2", "a3"]);
    }

    #[test]
    fn single_use_token_is_spent_once() {
        let dir = tempdir();
        let store = Store::create(&dir).unwrap();
        store.create_org(&org("acme", 100)).unwrap();
        store.create_token(&token("t1", "acme", 1, 1000)).unwrap();
        assert!(store.enroll("t1", 1, &agent("a1", "acme")).unwrap().is_ok());
        assert_eq!(store.enroll("t1", 1, &agent("a2", "acme")).unwrap(), Err(EnrollError::TokenUsedUp));
    }

    #[test]
    fn reopening_keeps_records() {
        let dir = tempdir();
        {
            let store = Store::create(&dir).unwrap();
            store.create_org(&org("acme", 1)).unwrap();
        }
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.org("acme").unwrap().unwrap().name, "acme");
        assert!(matches!(store.create_org(&org("acme", 1)), Err(Error::AlreadyExists(_))));
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("gantry-store-test-{}-{}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
