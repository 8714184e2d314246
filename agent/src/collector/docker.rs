//! Docker collectors: container inventory and resource stats, Docker events, and the
//! connection to the Docker Engine with its availability. Container logs are in
//! [`super::container_logs`].
//!
//! Everything goes through bollard's typed Engine API calls. This module must never build
//! shell strings or run the docker CLI, and like every collector it only reads: it does not
//! spool, send or retry on its own. The caller (`collection.rs`) owns the schedule, the
//! reconnect loop and the spool writes, and passes the time in.
//!
//! Metric samples, every [`DockerConfig::interval_secs`]; per-container samples carry the
//! labels `container` (the 12-character short id), `name` and `image`:
//! - `docker.containers{state}`: how many containers are in each state (`running`,
//!   `exited`, ...).
//! - `docker.container.running`: 1 while the container runs (or is paused or restarting),
//!   else 0; one sample per container, running or not.
//! - `docker.container.restart_count`: restarts by Docker's restart policy.
//! - `docker.container.healthy`: 1 healthy, 0 unhealthy; only for containers with a health
//!   check whose state is known (not `starting`).
//! - `docker.container.cpu_percent`: CPU used since the previous collection, 100 = one full
//!   core (as `docker stats` shows it). Needs two collections, so the first has none.
//! - `docker.container.memory_usage_bytes` (without the inactive page cache, as
//!   `docker stats`), `docker.container.memory_limit_bytes`.
//! - `docker.container.network_rx_bytes_per_second`,
//!   `docker.container.network_tx_bytes_per_second`: all interfaces, since the previous
//!   collection.
//! - `docker.container.pids`: processes and threads in the container.
//! - `docker.images.count`, `docker.images.size_bytes`: top-level images and the sum of
//!   their sizes (layers shared by images are counted once per image).
//!
//! Events (Gantry events on the events stream):
//! - `docker.inventory` (Info) when the set of containers or any of their id, name, image,
//!   state, health, restart count, ports or labels changed since the previous collection
//!   (and on the first one). Its `containers` attribute is a JSON array of
//!   [`ContainerInfo`]; `running` and `total` count them.
//! - `docker.container.<action>` for every container event Docker reports (`create`,
//!   `start`, `die`, `kill`, `oom`, `stop`, `restart`, `pause`, `unpause`, `destroy`,
//!   `health_status`, `rename`, `update`, ...) except [`DockerConfig::ignore_actions`].
//!   Severity: `oom` is Error; `die` with a non-zero exit code, `kill` and `health_status`
//!   unhealthy are Warning; the rest Info. Attributes: `container` (full id), `name`,
//!   `image`, and where Docker gives them `exit_code`, `signal`, `health_status`,
//!   `compose_project`, `compose_service`, `detail` (text after the action's `:`).
//!   Each keeps Docker's own time.
//! - `docker.unavailable` (Warning) once per outage, `docker.available` (Info) when Docker
//!   answers again after one; built by [`Availability`].
//!
//! Events resume after an agent restart from a checkpoint ([`DockerEvents::checkpoint`]):
//! the time of the newest event delivered and the keys of the events delivered at exactly
//! that nanosecond. Docker's `since` includes its bound, so those are skipped on resume.
//! Limits: Docker keeps only its last 256 events in memory and loses them when it
//! restarts, so events older than that (or from before a daemon restart) cannot be
//! replayed; an event Docker publishes out of time order (two at almost the same instant)
//! just before an agent crash may be missed. Only container events are collected (not
//! image, network or volume events).

use bollard::models::{ContainerSummary, ContainerSummaryStateEnum, EventMessage, EventMessageTypeEnum, HealthStatusEnum};
use bollard::query_parameters::{EventsOptions, InspectContainerOptions, ListContainersOptions, ListImagesOptions, StatsOptions};
use bollard::Docker;
use futures_util::{Stream, StreamExt};
use gantry_shared::telemetry::{Event, Sample, Severity};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tracing::{debug, warn};

/// Default for [`DockerConfig::interval_secs`].
pub const DEFAULT_INTERVAL_SECS: u64 = 10;
/// How many containers are inspected or asked for stats at the same time.
const CONCURRENCY: usize = 8;
/// Version of the events checkpoint document.
const EVENTS_CHECKPOINT_VERSION: u32 = 1;
/// Longest `containers` attribute of `docker.inventory`, in bytes; beyond it labels are
/// left out.
const MAX_INVENTORY_JSON: usize = 256 * 1024;

/// Settings of the Docker collectors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// Collect from Docker at all. While Docker cannot be reached the agent reports
    /// `docker.unavailable` once and keeps retrying; on machines without Docker set this to
    /// false.
    pub enabled: bool,
    /// Docker Engine API address: `unix:///path/docker.sock`, `tcp://HOST:PORT` or
    /// `http://HOST:PORT` (plain HTTP, no TLS). Unset: the `DOCKER_HOST` environment
    /// variable, else `unix:///var/run/docker.sock`.
    pub host: Option<String>,
    /// Seconds between inventory and stats collections.
    pub interval_secs: u64,
    /// Collect per-container resource stats (one API call per running container per
    /// interval). The inventory samples are collected either way.
    pub stats: bool,
    /// Turn Docker's container events into Gantry events.
    pub events: bool,
    /// Container event actions not turned into events (compared with the part of Docker's
    /// action before any `:`). Health checks alone cause the `exec_*` ones every few
    /// seconds.
    pub ignore_actions: Vec<String>,
    /// Seconds to wait for Docker to answer a request (followed streams are not limited).
    pub timeout_secs: u64,
    /// First delay before connecting again to a Docker that did not answer, in
    /// milliseconds; doubles after each failure up to `retry_max_ms`.
    pub retry_min_ms: u64,
    /// Longest delay between connection attempts, in milliseconds.
    pub retry_max_ms: u64,
    /// Container logs (stdout and stderr).
    pub logs: super::container_logs::ContainerLogsConfig,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            enabled: true,
            host: None,
            interval_secs: DEFAULT_INTERVAL_SECS,
            stats: true,
            events: true,
            ignore_actions: [
                "exec_create",
                "exec_start",
                "exec_die",
                "exec_detach",
                "attach",
                "detach",
                "resize",
                "top",
                "archive-path",
                "extract-to-dir",
                "export",
                "copy",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            timeout_secs: 10,
            retry_min_ms: 1_000,
            retry_max_ms: 30_000,
            logs: Default::default(),
        }
    }
}

impl DockerConfig {
    /// What is wrong with this configuration; empty when it is usable.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(host) = &self.host {
            if !["unix://", "tcp://", "http://"].iter().any(|scheme| host.starts_with(scheme)) {
                errors.push(format!("host {host:?} must start with unix://, tcp:// or http://"));
            }
        }
        if self.interval_secs == 0 {
            errors.push("interval_secs must be at least 1".to_string());
        }
        if self.timeout_secs == 0 {
            errors.push("timeout_secs must be at least 1".to_string());
        }
        if self.retry_min_ms == 0 || self.retry_max_ms < self.retry_min_ms {
            errors.push("retry_min_ms must be at least 1 and at most retry_max_ms".to_string());
        }
        errors.extend(self.logs.validate().into_iter().map(|e| format!("logs: {e}")));
        errors
    }

    /// The address used, for messages.
    pub fn endpoint(&self) -> String {
        match &self.host {
            Some(host) => host.clone(),
            None => std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_string()),
        }
    }
}

/// Why a Docker collector failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid docker configuration: {0}")]
    Config(String),
    #[error("docker api: {0}")]
    Api(#[from] bollard::errors::Error),
    #[error("encoding a docker checkpoint failed: {0}")]
    Checkpoint(#[from] serde_json::Error),
}

/// Whether a Docker API error is Docker answering "no such container" or "not running"
/// (the container went away between two calls), which is no problem.
pub fn is_gone(error: &bollard::errors::Error) -> bool {
    matches!(error, bollard::errors::Error::DockerResponseServerError { status_code: 404 | 409, .. })
}

/// A client that Docker answered, with what it said about itself.
#[derive(Debug, Clone)]
pub struct Attached {
    /// The client, speaking the agreed API version.
    pub docker: Docker,
    /// Docker's version, e.g. `20.10.24`.
    pub version: String,
    /// The API version both sides speak, e.g. `1.41`.
    pub api_version: String,
}

/// Connect to Docker and agree on an API version (one request). Fails when Docker does
/// not answer; never retries.
pub async fn connect(config: &DockerConfig) -> Result<Attached, Error> {
    let docker = match &config.host {
        Some(host) => Docker::connect_with_host(host)?,
        None => Docker::connect_with_defaults()?,
    };
    let docker = docker.with_timeout(Duration::from_secs(config.timeout_secs)).negotiate_version().await?;
    let version = docker.version().await?;
    let api = docker.client_version();
    Ok(Attached { version: version.version.unwrap_or_default(), api_version: format!("{}.{}", api.major_version, api.minor_version), docker })
}

/// Tracks whether Docker is reachable and says when to report it and when to retry.
#[derive(Debug)]
pub struct Availability {
    endpoint: String,
    /// Whether the last attempt succeeded; `None` before the first.
    up: Option<bool>,
    /// Failed attempts since the last success.
    failures: u32,
    retry_min_ms: u64,
    retry_max_ms: u64,
}

impl Availability {
    pub fn new(config: &DockerConfig) -> Availability {
        Availability { endpoint: config.endpoint(), up: None, failures: 0, retry_min_ms: config.retry_min_ms, retry_max_ms: config.retry_max_ms }
    }

    /// Docker answered. Returns `docker.available` when this ends an outage (not on the
    /// first connection).
    pub fn attached(&mut self, attached: &Attached) -> Option<Event> {
        self.reached(&attached.version, &attached.api_version)
    }

    /// [`Availability::attached`] with what Docker said about itself.
    pub fn reached(&mut self, version: &str, api_version: &str) -> Option<Event> {
        let was = self.up.replace(true);
        let outage = self.failures;
        self.failures = 0;
        (was == Some(false)).then(|| Event {
            kind: "docker.available".into(),
            severity: Severity::Info,
            message: format!("docker {version} is reachable again at {}", self.endpoint),
            attributes: vec![
                ("endpoint".into(), self.endpoint.clone()),
                ("version".into(), version.to_string()),
                ("api_version".into(), api_version.to_string()),
                ("failed_attempts".into(), outage.to_string()),
            ],
        })
    }

    /// Docker did not answer. Returns `docker.unavailable` for the first failure of an
    /// outage only.
    pub fn failed(&mut self, error: &str) -> Option<Event> {
        let was = self.up.replace(false);
        self.failures = self.failures.saturating_add(1);
        (was != Some(false)).then(|| Event {
            kind: "docker.unavailable".into(),
            severity: Severity::Warning,
            message: format!("docker is not reachable at {}: {error}", self.endpoint),
            attributes: vec![("endpoint".into(), self.endpoint.clone()), ("error".into(), error.to_string())],
        })
    }

    /// Whether the last attempt succeeded.
    pub fn is_up(&self) -> bool {
        self.up == Some(true)
    }

    /// How long to wait before the next attempt: `retry_min_ms` doubled per failure since
    /// the last success, at most `retry_max_ms`.
    pub fn retry_delay(&self) -> Duration {
        let shift = self.failures.saturating_sub(1).min(20);
        let ms = self.retry_min_ms.saturating_mul(1u64 << shift).min(self.retry_max_ms);
        Duration::from_millis(ms)
    }
}

/// One container as the inventory describes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContainerInfo {
    /// Full id.
    pub id: String,
    /// Name without the leading `/`.
    pub name: String,
    /// The image as the container was created from it (name:tag, or an id).
    pub image: String,
    /// `created`, `running`, `paused`, `restarting`, `exited`, `removing` or `dead`.
    pub state: String,
    /// `starting`, `healthy` or `unhealthy`; `None` without a health check.
    pub health: Option<String>,
    /// Restarts by Docker's restart policy.
    pub restart_count: i64,
    /// Published and exposed ports, e.g. `0.0.0.0:8080->80/tcp`, `443/tcp`.
    pub ports: Vec<String>,
    /// The container's labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, Unix seconds.
    pub created: i64,
}

impl ContainerInfo {
    fn from_summary(summary: &ContainerSummary) -> Option<ContainerInfo> {
        let id = summary.id.clone()?;
        let mut ports: Vec<String> = summary
            .ports
            .iter()
            .flatten()
            .map(|p| {
                let proto = p.typ.map(|t| t.to_string()).unwrap_or_else(|| "tcp".to_string());
                match (p.ip.as_deref(), p.public_port) {
                    (Some(ip), Some(public)) => format!("{ip}:{public}->{}/{proto}", p.private_port),
                    (None, Some(public)) => format!("{public}->{}/{proto}", p.private_port),
                    _ => format!("{}/{proto}", p.private_port),
                }
            })
            .collect();
        ports.sort();
        ports.dedup();
        Some(ContainerInfo {
            name: container_name(summary).unwrap_or_else(|| short_id(&id).to_string()),
            id,
            image: summary.image.clone().unwrap_or_default(),
            state: summary.state.map(|s| s.to_string()).unwrap_or_default(),
            health: None,
            restart_count: 0,
            ports,
            labels: summary.labels.clone().unwrap_or_default().into_iter().collect(),
            created: summary.created.unwrap_or_default(),
        })
    }

    fn labels(&self) -> Vec<(String, String)> {
        vec![("container".into(), short_id(&self.id).to_string()), ("name".into(), self.name.clone()), ("image".into(), self.image.clone())]
    }

    fn is_running(&self) -> bool {
        matches!(self.state.as_str(), "running" | "paused" | "restarting")
    }
}

/// The first 12 characters of a container id, as Docker shows it.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// A container's name from a list entry, without the leading `/`.
pub fn container_name(summary: &ContainerSummary) -> Option<String> {
    summary.names.as_ref()?.first().map(|n| n.trim_start_matches('/').to_string())
}

/// Whether a list entry's state means its process is alive (so logs can be followed).
pub fn is_live(state: Option<ContainerSummaryStateEnum>) -> bool {
    matches!(state, Some(ContainerSummaryStateEnum::RUNNING | ContainerSummaryStateEnum::PAUSED | ContainerSummaryStateEnum::RESTARTING))
}

/// What inspecting a container adds to its list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Inspected {
    health: Option<String>,
    restart_count: i64,
}

/// Counters of one container at one collection, for CPU and network rates.
#[derive(Debug, Clone, Copy)]
struct Counters {
    at_ms: i64,
    cpu_total: Option<u64>,
    system_total: Option<u64>,
    rx: Option<u64>,
    tx: Option<u64>,
}

/// What one inventory and stats collection found.
#[derive(Debug, Clone, PartialEq)]
pub struct Collected {
    /// Metric samples (see the module documentation for their names).
    pub samples: Vec<Sample>,
    /// `docker.inventory`, when the inventory changed since the previous collection.
    pub inventory: Option<Event>,
    /// Every container, sorted by name.
    pub containers: Vec<ContainerInfo>,
    /// Per-container problems (other than a container going away mid-collection).
    pub errors: Vec<String>,
}

/// Collects the container inventory and resource stats; keeps what rates and change
/// detection need between collections.
#[derive(Debug, Default)]
pub struct DockerStats {
    stats: bool,
    previous: HashMap<String, Counters>,
    /// Inspection results of stopped containers, by id, with the state they were for:
    /// a stopped container is inspected again only when its state changes.
    inspected: HashMap<String, (String, Inspected)>,
    last_inventory: Option<Vec<ContainerInfo>>,
}

impl DockerStats {
    pub fn new(config: &DockerConfig) -> DockerStats {
        DockerStats { stats: config.stats, ..DockerStats::default() }
    }

    /// One collection at `now_unix_ms`. Fails only when the container list cannot be read
    /// (Docker unreachable); problems with single containers land in
    /// [`Collected::errors`].
    pub async fn collect(&mut self, docker: &Docker, now_unix_ms: i64) -> Result<Collected, Error> {
        let summaries = docker.list_containers(Some(ListContainersOptions { all: true, ..Default::default() })).await?;
        let images = docker.list_images(Some(ListImagesOptions::default())).await?;
        let mut errors = Vec::new();
        let mut containers: Vec<ContainerInfo> = summaries.iter().filter_map(ContainerInfo::from_summary).collect();
        containers.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));

        // Inspect for health and restart count: live containers every time, stopped ones
        // when their state changed.
        let to_inspect: Vec<String> = containers
            .iter()
            .filter(|c| c.is_running() || self.inspected.get(&c.id).is_none_or(|(state, _)| *state != c.state))
            .map(|c| c.id.clone())
            .collect();
        let results: Vec<(String, Result<Inspected, bollard::errors::Error>)> = futures_util::stream::iter(to_inspect)
            .map(|id| {
                let docker = docker.clone();
                async move {
                    let result = docker.inspect_container(&id, None::<InspectContainerOptions>).await.map(|inspect| Inspected {
                        health: inspect
                            .state
                            .as_ref()
                            .and_then(|s| s.health.as_ref())
                            .and_then(|h| h.status)
                            .filter(|s| !matches!(s, HealthStatusEnum::EMPTY | HealthStatusEnum::NONE))
                            .map(|s| s.to_string()),
                        restart_count: inspect.restart_count.unwrap_or_default(),
                    });
                    (id, result)
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let states: HashMap<&str, &str> = containers.iter().map(|c| (c.id.as_str(), c.state.as_str())).collect();
        for (id, result) in results {
            match result {
                Ok(inspected) => {
                    let state = states.get(id.as_str()).map(|s| s.to_string()).unwrap_or_default();
                    self.inspected.insert(id, (state, inspected));
                }
                Err(error) if is_gone(&error) => {}
                Err(error) => errors.push(format!("inspecting container {}: {error}", short_id(&id))),
            }
        }
        self.inspected.retain(|id, _| states.contains_key(id.as_str()));
        for container in &mut containers {
            if let Some((_, inspected)) = self.inspected.get(&container.id) {
                container.health = inspected.health.clone();
                container.restart_count = inspected.restart_count;
            }
        }

        let mut samples = Vec::new();
        let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
        for container in &containers {
            *by_state.entry(container.state.as_str()).or_default() += 1;
            let labels = container.labels();
            samples.push(sample("docker.container.running", &labels, if container.is_running() { 1.0 } else { 0.0 }));
            samples.push(sample("docker.container.restart_count", &labels, container.restart_count as f64));
            match container.health.as_deref() {
                Some("healthy") => samples.push(sample("docker.container.healthy", &labels, 1.0)),
                Some("unhealthy") => samples.push(sample("docker.container.healthy", &labels, 0.0)),
                _ => {}
            }
        }
        for (state, count) in &by_state {
            samples.push(sample("docker.containers", &[("state".to_string(), state.to_string())], *count as f64));
        }
        samples.push(sample("docker.images.count", &[], images.len() as f64));
        samples.push(sample("docker.images.size_bytes", &[], images.iter().map(|i| i.size.max(0) as f64).sum()));

        if self.stats {
            self.collect_stats(docker, &containers, now_unix_ms, &mut samples, &mut errors).await;
        }

        let inventory = if self.last_inventory.as_ref() != Some(&containers) {
            self.last_inventory = Some(containers.clone());
            Some(inventory_event(&containers))
        } else {
            None
        };
        Ok(Collected { samples, inventory, containers, errors })
    }

    async fn collect_stats(&mut self, docker: &Docker, containers: &[ContainerInfo], now_ms: i64, samples: &mut Vec<Sample>, errors: &mut Vec<String>) {
        let running: Vec<ContainerInfo> = containers.iter().filter(|c| c.state == "running").cloned().collect();
        let results: Vec<(ContainerInfo, Option<Result<bollard::models::ContainerStatsResponse, bollard::errors::Error>>)> =
            futures_util::stream::iter(running)
                .map(|container| {
                    let docker = docker.clone();
                    async move {
                        // One-shot: Docker answers at once without waiting for a second
                        // sample; rates come from the previous collection instead.
                        let options = StatsOptions { stream: false, one_shot: true };
                        let result = docker.stats(&container.id, Some(options)).next().await;
                        (container, result)
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
        let mut current = HashMap::new();
        for (container, result) in results {
            let stats = match result {
                Some(Ok(stats)) => stats,
                Some(Err(error)) if is_gone(&error) => continue,
                Some(Err(error)) => {
                    errors.push(format!("stats of container {}: {error}", container.name));
                    continue;
                }
                None => continue,
            };
            let labels = container.labels();
            let cpu = stats.cpu_stats.as_ref();
            let (rx, tx) = stats.networks.as_ref().map_or((None, None), |networks| {
                let rx = networks.values().filter_map(|n| n.rx_bytes).sum::<u64>();
                let tx = networks.values().filter_map(|n| n.tx_bytes).sum::<u64>();
                (Some(rx), Some(tx))
            });
            let counters = Counters {
                at_ms: now_ms,
                cpu_total: cpu.and_then(|c| c.cpu_usage.as_ref()).and_then(|u| u.total_usage),
                system_total: cpu.and_then(|c| c.system_cpu_usage),
                rx,
                tx,
            };
            if let Some(previous) = self.previous.get(&container.id) {
                if let (Some(total), Some(prev_total), Some(system), Some(prev_system)) =
                    (counters.cpu_total, previous.cpu_total, counters.system_total, previous.system_total)
                {
                    let online = cpu
                        .and_then(|c| c.online_cpus)
                        .filter(|n| *n > 0)
                        .or_else(|| cpu.and_then(|c| c.cpu_usage.as_ref()).and_then(|u| u.percpu_usage.as_ref()).map(|p| p.len() as u32))
                        .unwrap_or(1);
                    if total >= prev_total && system > prev_system {
                        let percent = (total - prev_total) as f64 / (system - prev_system) as f64 * f64::from(online) * 100.0;
                        samples.push(sample("docker.container.cpu_percent", &labels, percent));
                    }
                }
                let seconds = (now_ms - previous.at_ms) as f64 / 1000.0;
                if seconds > 0.0 {
                    for (name, now, before) in [
                        ("docker.container.network_rx_bytes_per_second", counters.rx, previous.rx),
                        ("docker.container.network_tx_bytes_per_second", counters.tx, previous.tx),
                    ] {
                        if let (Some(now), Some(before)) = (now, before) {
                            if now >= before {
                                samples.push(sample(name, &labels, (now - before) as f64 / seconds));
                            }
                        }
                    }
                }
            }
            if let Some(memory) = &stats.memory_stats {
                if let Some(usage) = memory.usage {
                    // As `docker stats`: without the inactive page cache (cgroup v1 names
                    // it total_inactive_file, v2 inactive_file).
                    let inactive = memory
                        .stats
                        .as_ref()
                        .and_then(|s| s.get("total_inactive_file").or_else(|| s.get("inactive_file")).copied())
                        .filter(|i| *i < usage)
                        .unwrap_or(0);
                    samples.push(sample("docker.container.memory_usage_bytes", &labels, (usage - inactive) as f64));
                }
                if let Some(limit) = memory.limit {
                    samples.push(sample("docker.container.memory_limit_bytes", &labels, limit as f64));
                }
            }
            if let Some(pids) = stats.pids_stats.as_ref().and_then(|p| p.current) {
                samples.push(sample("docker.container.pids", &labels, pids as f64));
            }
            current.insert(container.id.clone(), counters);
        }
        self.previous = current;
    }
}

fn sample(name: &str, labels: &[(String, String)], value: f64) -> Sample {
    Sample { name: name.to_string(), labels: labels.to_vec(), value }
}

/// The `docker.inventory` event for `containers`.
fn inventory_event(containers: &[ContainerInfo]) -> Event {
    let running = containers.iter().filter(|c| c.is_running()).count();
    let mut json = serde_json::to_string(containers).unwrap_or_default();
    if json.len() > MAX_INVENTORY_JSON {
        let without_labels: Vec<ContainerInfo> = containers.iter().map(|c| ContainerInfo { labels: BTreeMap::new(), ..c.clone() }).collect();
        json = serde_json::to_string(&without_labels).unwrap_or_default();
    }
    Event {
        kind: "docker.inventory".into(),
        severity: Severity::Info,
        message: format!("{} containers, {running} running", containers.len()),
        attributes: vec![("total".into(), containers.len().to_string()), ("running".into(), running.to_string()), ("containers".into(), json)],
    }
}

/// Position in Docker's event stream: the newest event delivered and which events were
/// delivered at exactly its time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct EventsCheckpoint {
    version: u32,
    /// Where a subscription starts when no event was delivered yet (Unix nanoseconds):
    /// the time of the first subscription, so a resubscription replays what Docker still
    /// has from the time in between.
    floor_ns: Option<i64>,
    /// Time of the newest event delivered, Unix nanoseconds.
    last_ns: Option<i64>,
    /// Keys ([`event_key`]) of the events delivered at `last_ns`.
    seen: Vec<String>,
}

/// Turns Docker's container events into Gantry events, exactly once across
/// resubscriptions and agent restarts (see the module documentation).
#[derive(Debug)]
pub struct DockerEvents {
    position: EventsCheckpoint,
    ignore: Vec<String>,
}

impl DockerEvents {
    /// Resume from `checkpoint` (bytes of an earlier [`DockerEvents::checkpoint`]); an
    /// unreadable one is logged and ignored (events start from the first subscription).
    pub fn new(config: &DockerConfig, checkpoint: Option<&[u8]>) -> DockerEvents {
        let fresh = EventsCheckpoint { version: EVENTS_CHECKPOINT_VERSION, floor_ns: None, last_ns: None, seen: Vec::new() };
        let position = match checkpoint.filter(|b| !b.is_empty()).map(serde_json::from_slice::<EventsCheckpoint>) {
            None => fresh,
            Some(Ok(doc)) if doc.version == EVENTS_CHECKPOINT_VERSION => doc,
            Some(Ok(doc)) => {
                warn!(version = doc.version, "docker events checkpoint has an unknown version; starting from now");
                fresh
            }
            Some(Err(error)) => {
                warn!(%error, "docker events checkpoint is unreadable; starting from now");
                fresh
            }
        };
        DockerEvents { position, ignore: config.ignore_actions.clone() }
    }

    /// Subscribe to container events from the current position (or from `now_unix_ms` on
    /// the very first subscription). The stream never ends while Docker runs.
    pub fn subscribe(&mut self, docker: &Docker, now_unix_ms: i64) -> impl Stream<Item = Result<EventMessage, bollard::errors::Error>> + Send + 'static {
        if self.position.last_ns.is_none() && self.position.floor_ns.is_none() {
            self.position.floor_ns = Some(now_unix_ms.saturating_mul(1_000_000));
        }
        let since_ns = self.position.last_ns.or(self.position.floor_ns).unwrap_or_default();
        let since = format!("{}.{:09}", since_ns.div_euclid(1_000_000_000), since_ns.rem_euclid(1_000_000_000));
        debug!(%since, "subscribing to docker events");
        let filters = HashMap::from([("type".to_string(), vec!["container".to_string()])]);
        docker.events(Some(EventsOptions { since: Some(since), until: None, filters: Some(filters) }))
    }

    /// Take one message of the stream: the Gantry event (with its time, Unix ms) unless it
    /// was delivered before, is not about a container, or its action is ignored. Moves the
    /// position either way.
    pub fn accept(&mut self, message: &EventMessage) -> Option<(i64, Event)> {
        let time_ns = message.time_nano.or_else(|| message.time.map(|s| s.saturating_mul(1_000_000_000)))?;
        let key = event_key(message);
        match self.position.last_ns {
            Some(last) if time_ns == last => {
                if self.position.seen.contains(&key) {
                    return None;
                }
                self.position.seen.push(key);
            }
            Some(last) if time_ns < last => {
                // Published out of time order; a replay from `last` cannot hold it, so it is
                // new. The position stays at the newest time.
            }
            _ => {
                self.position.last_ns = Some(time_ns);
                self.position.seen = vec![key];
            }
        }
        if message.typ != Some(EventMessageTypeEnum::CONTAINER) {
            return None;
        }
        let action = message.action.as_deref().unwrap_or_default();
        let base = action.split(':').next().unwrap_or_default().trim();
        if base.is_empty() || self.ignore.iter().any(|ignored| ignored == base) {
            return None;
        }
        Some((time_ns.div_euclid(1_000_000), container_event(message)))
    }

    /// The current position, to store together with the events accepted so far.
    pub fn checkpoint(&self) -> Result<Vec<u8>, Error> {
        Ok(serde_json::to_vec(&self.position)?)
    }
}

/// What identifies an event among those of the same nanosecond.
fn event_key(message: &EventMessage) -> String {
    format!(
        "{}/{}/{}",
        message.typ.map(|t| t.to_string()).unwrap_or_default(),
        message.action.as_deref().unwrap_or_default(),
        message.actor.as_ref().and_then(|a| a.id.as_deref()).unwrap_or_default()
    )
}

/// The Gantry event for a Docker container event.
pub fn container_event(message: &EventMessage) -> Event {
    let action = message.action.as_deref().unwrap_or_default();
    let (base, detail) = match action.split_once(':') {
        Some((base, detail)) => (base.trim(), Some(detail.trim())),
        None => (action.trim(), None),
    };
    let id = message.actor.as_ref().and_then(|a| a.id.clone()).unwrap_or_default();
    let empty = HashMap::new();
    let attrs = message.actor.as_ref().and_then(|a| a.attributes.as_ref()).unwrap_or(&empty);
    let name = attrs.get("name").cloned().unwrap_or_else(|| short_id(&id).to_string());
    let mut attributes = vec![("container".to_string(), id.clone()), ("name".to_string(), name.clone())];
    if let Some(image) = attrs.get("image") {
        attributes.push(("image".into(), image.clone()));
    }
    let exit_code = attrs.get("exitCode");
    if let Some(code) = exit_code {
        attributes.push(("exit_code".into(), code.clone()));
    }
    if let Some(signal) = attrs.get("signal") {
        attributes.push(("signal".into(), signal.clone()));
    }
    for (docker_key, ours) in [("com.docker.compose.project", "compose_project"), ("com.docker.compose.service", "compose_service")] {
        if let Some(value) = attrs.get(docker_key) {
            attributes.push((ours.into(), value.clone()));
        }
    }
    if base == "health_status" {
        if let Some(status) = detail {
            attributes.push(("health_status".into(), status.to_string()));
        }
    } else if let Some(detail) = detail.filter(|d| !d.is_empty()) {
        attributes.push(("detail".into(), detail.to_string()));
    }
    let failed = exit_code.is_some_and(|c| c != "0");
    let (severity, message) = match base {
        "oom" => (Severity::Error, format!("container {name} ran out of memory")),
        "die" if failed => (Severity::Warning, format!("container {name} exited with code {}", exit_code.map_or("?", |c| c))),
        "die" => (Severity::Info, format!("container {name} exited with code 0")),
        "kill" => (Severity::Warning, format!("container {name} was sent signal {}", attrs.get("signal").map_or("?", |s| s))),
        "health_status" if detail == Some("unhealthy") => (Severity::Warning, format!("container {name} is unhealthy")),
        "health_status" => (Severity::Info, format!("container {name} is {}", detail.unwrap_or("?"))),
        "start" => (Severity::Info, format!("container {name} started")),
        "restart" => (Severity::Info, format!("container {name} restarted")),
        "create" => (Severity::Info, format!("container {name} was created")),
        "destroy" => (Severity::Info, format!("container {name} was removed")),
        other => (Severity::Info, format!("container {name}: {other}")),
    };
    Event { kind: format!("docker.container.{base}"), severity, message, attributes }
}

/// Helpers for tests that need a real Docker engine and a local image (no registry). Built
/// for this crate's tests and, with the `test-support` feature, for the end-to-end tests.
#[cfg(any(test, feature = "test-support"))]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod testing {
    use super::*;
    use std::path::Path;
    use std::process::Command;
    use std::sync::OnceLock;

    /// Built locally from Debian's static busybox; nothing is pulled.
    pub const IMAGE: &str = "gantry-test-busybox:latest";

    /// A Docker client for a test. Fails the test with a clear message when Docker is not
    /// reachable, unless `GANTRY_SKIP_DOCKER_TESTS=1` is set outside CI (then it returns
    /// `None` after saying so on stderr).
    pub async fn docker() -> Option<Docker> {
        match connect(&DockerConfig::default()).await {
            Ok(attached) => {
                ensure_image();
                Some(attached.docker)
            }
            Err(error) => {
                let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
                let skip = std::env::var("GANTRY_SKIP_DOCKER_TESTS").is_ok_and(|v| v == "1");
                if skip && !ci {
                    eprintln!("SKIPPED: docker is not reachable ({error}) and GANTRY_SKIP_DOCKER_TESTS=1");
                    return None;
                }
                panic!(
                    "docker is not reachable ({error}): these tests need a running docker engine \
                     (start it, e.g. `service docker start`; outside CI, GANTRY_SKIP_DOCKER_TESTS=1 skips them)"
                );
            }
        }
    }

    /// Run the docker CLI (tests only) and return its stdout; panics on failure.
    pub fn cli(args: &[&str]) -> String {
        let output = Command::new("docker").args(args).output().unwrap_or_else(|e| panic!("running docker {args:?}: {e}"));
        assert!(output.status.success(), "docker {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// Build [`IMAGE`] once per test run (idempotent: an existing image is kept).
    pub fn ensure_image() {
        static BUILT: OnceLock<()> = OnceLock::new();
        BUILT.get_or_init(|| {
            let exists = Command::new("docker").args(["image", "inspect", IMAGE]).output().is_ok_and(|o| o.status.success());
            if exists {
                return;
            }
            let busybox = Path::new("/bin/busybox");
            assert!(busybox.exists(), "/bin/busybox is missing: install Debian's busybox-static (apt-get install -y busybox-static)");
            let dir = std::env::temp_dir().join(format!("gantry-busybox-image-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("root/bin")).unwrap();
            std::fs::copy(busybox, dir.join("root/bin/busybox")).unwrap();
            let list = Command::new(busybox).arg("--list").output().unwrap();
            for applet in String::from_utf8_lossy(&list.stdout).lines() {
                if !applet.is_empty() && applet != "busybox" {
                    std::os::unix::fs::symlink("busybox", dir.join("root/bin").join(applet)).unwrap();
                }
            }
            let tar = dir.join("rootfs.tar");
            let status = Command::new("tar").arg("-C").arg(dir.join("root")).arg("-cf").arg(&tar).arg(".").status().unwrap();
            assert!(status.success(), "tar failed");
            cli(&["import", "--change", "ENV PATH=/bin", tar.to_str().unwrap(), IMAGE]);
            let _ = std::fs::remove_dir_all(&dir);
        });
    }

    /// A name no other test or run uses.
    pub fn unique(prefix: &str) -> String {
        format!("gantry-test-{prefix}-{}-{:08x}", std::process::id(), rand::random::<u32>())
    }

    /// Removes the container when dropped, even when the test fails.
    #[derive(Debug)]
    pub struct Container {
        pub name: String,
        pub id: String,
    }

    impl Container {
        /// `docker run -d` a container of [`IMAGE`] running `sh -c script`.
        pub fn run(name: &str, script: &str, extra: &[&str]) -> Container {
            let mut args = vec!["run", "-d", "--name", name];
            args.extend_from_slice(extra);
            args.extend_from_slice(&[IMAGE, "sh", "-c", script]);
            let id = cli(&args);
            Container { name: name.to_string(), id }
        }
    }

    impl Drop for Container {
        fn drop(&mut self) {
            let _ = Command::new("docker").args(["rm", "-f", "-v", &self.name]).output();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::testing::*;
    use super::*;
    use std::time::Instant;

    fn labelled<'a>(samples: &'a [Sample], name: &str, container: &str) -> Vec<&'a Sample> {
        samples.iter().filter(|s| s.name == name && s.labels.iter().any(|(k, v)| k == "name" && v == container)).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn docker_inventory_and_stats_of_a_running_container() {
        let Some(docker) = docker().await else { return };
        let name = unique("stats");
        let container = Container::run(&name, "while true; do echo tick; sleep 0.2; done", &["--label", "gantry.test=stats"]);
        let mut stats = DockerStats::new(&DockerConfig::default());
        let first = stats.collect(&docker, crate::wall_ms()).await.unwrap();
        assert!(first.errors.is_empty(), "{:?}", first.errors);
        let info = first.containers.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("{name} missing: {:?}", first.containers));
        assert_eq!(info.id, container.id);
        assert_eq!(info.image, IMAGE);
        assert_eq!(info.state, "running");
        assert_eq!(info.labels.get("gantry.test").map(String::as_str), Some("stats"));
        assert_eq!(info.health, None);
        let inventory = first.inventory.as_ref().expect("first collection has an inventory event");
        assert_eq!(inventory.kind, "docker.inventory");
        let json = &inventory.attributes.iter().find(|(k, _)| k == "containers").unwrap().1;
        let listed: Vec<ContainerInfo> = serde_json::from_str(json).unwrap();
        assert!(listed.iter().any(|c| c.id == container.id && c.state == "running"), "{json}");
        let running = labelled(&first.samples, "docker.container.running", &name);
        assert_eq!(running.len(), 1, "{:?}", first.samples);
        assert_eq!(running[0].value, 1.0);
        assert!(running[0].labels.contains(&("container".into(), container.id[..12].to_string())));
        assert!(running[0].labels.contains(&("image".into(), IMAGE.into())));
        assert_eq!(labelled(&first.samples, "docker.container.restart_count", &name)[0].value, 0.0);
        assert!(labelled(&first.samples, "docker.container.memory_usage_bytes", &name)[0].value > 0.0);
        assert!(labelled(&first.samples, "docker.container.memory_limit_bytes", &name)[0].value > 0.0);
        assert!(first.samples.iter().any(|s| s.name == "docker.images.count" && s.value >= 1.0));
        assert!(first.samples.iter().any(|s| s.name == "docker.containers" && s.labels == [("state".to_string(), "running".to_string())]));
        // Rates need a second collection.
        assert!(labelled(&first.samples, "docker.container.cpu_percent", &name).is_empty());

        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let second = stats.collect(&docker, crate::wall_ms()).await.unwrap();
        let cpu = labelled(&second.samples, "docker.container.cpu_percent", &name);
        assert_eq!(cpu.len(), 1, "{:?}", second.samples);
        assert!(cpu[0].value >= 0.0 && cpu[0].value <= 200.0, "{cpu:?}");
        assert_eq!(labelled(&second.samples, "docker.container.network_rx_bytes_per_second", &name).len(), 1);
        assert!(labelled(&second.samples, "docker.container.pids", &name)[0].value >= 1.0);
        // Nothing about the containers changed (other tests' containers may have).
        if let Some(inventory) = &second.inventory {
            let json = &inventory.attributes.iter().find(|(k, _)| k == "containers").unwrap().1;
            assert!(json.contains(&container.id));
        }

        cli(&["stop", "-t", "0", &name]);
        let third = stats.collect(&docker, crate::wall_ms()).await.unwrap();
        assert_eq!(labelled(&third.samples, "docker.container.running", &name)[0].value, 0.0);
        let info = third.containers.iter().find(|c| c.name == name).unwrap();
        assert_eq!(info.state, "exited");
        assert!(third.inventory.is_some(), "a state change yields a new inventory event");
        drop(container);
    }

    /// Read events from `stream` until `done` says so, or fail after `limit`.
    async fn read_events<S>(events: &mut DockerEvents, stream: &mut S, limit: Duration, done: impl Fn(&[Event]) -> bool) -> Vec<Event>
    where
        S: Stream<Item = Result<EventMessage, bollard::errors::Error>> + Unpin,
    {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        while !done(&out) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.next()).await {
                Ok(Some(Ok(message))) => out.extend(events.accept(&message).map(|(_, e)| e)),
                Ok(other) => panic!("event stream ended: {other:?}"),
                Err(_) => break,
            }
        }
        out
    }

    fn of<'a>(events: &'a [Event], name: &str) -> Vec<&'a Event> {
        events.iter().filter(|e| e.attributes.contains(&("name".into(), name.to_string()))).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn docker_events_become_gantry_events_exactly_once_across_restarts() {
        let Some(docker) = docker().await else { return };
        let config = DockerConfig::default();
        let name = unique("events");
        let mut events = DockerEvents::new(&config, None);
        let mut stream = Box::pin(events.subscribe(&docker, crate::wall_ms() - 1_000));
        let container = Container::run(&name, "sleep 0.3; exit 3", &[]);
        let seen = read_events(&mut events, &mut stream, Duration::from_secs(20), |e| of(e, &name).iter().any(|e| e.kind == "docker.container.die")).await;
        let mine = of(&seen, &name);
        let kinds: Vec<&str> = mine.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["docker.container.create", "docker.container.start", "docker.container.die"], "{mine:?}");
        let die = mine[2];
        assert_eq!(die.severity, Severity::Warning);
        assert!(die.attributes.contains(&("exit_code".into(), "3".into())), "{die:?}");
        assert!(die.attributes.contains(&("container".into(), container.id.clone())), "{die:?}");
        assert!(die.attributes.contains(&("image".into(), IMAGE.into())), "{die:?}");
        assert_eq!(mine[1].severity, Severity::Info);
        let checkpoint = events.checkpoint().unwrap();
        drop(stream);

        // "Agent restart": a new collector from the checkpoint replays nothing already
        // delivered, then sees what happens next.
        let mut resumed = DockerEvents::new(&config, Some(&checkpoint));
        let mut stream = Box::pin(resumed.subscribe(&docker, crate::wall_ms()));
        let replayed = read_events(&mut resumed, &mut stream, Duration::from_millis(1_500), |_| false).await;
        assert!(of(&replayed, &name).is_empty(), "replayed after resume: {replayed:?}");
        cli(&["start", &name]);
        let later = read_events(&mut resumed, &mut stream, Duration::from_secs(20), |e| of(e, &name).iter().any(|e| e.kind == "docker.container.die")).await;
        let kinds: Vec<&str> = of(&later, &name).iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["docker.container.start", "docker.container.die"]);

        // Kill: kill (Warning, with the signal) and die with 137.
        let killed = unique("killed");
        let _killed = Container::run(&killed, "sleep 60", &[]);
        cli(&["kill", &killed]);
        let more = read_events(&mut resumed, &mut stream, Duration::from_secs(20), |e| of(e, &killed).iter().any(|e| e.kind == "docker.container.die")).await;
        let mine = of(&more, &killed);
        let kill = mine.iter().find(|e| e.kind == "docker.container.kill").expect("kill event");
        assert_eq!(kill.severity, Severity::Warning);
        assert!(kill.attributes.contains(&("signal".into(), "9".into())), "{kill:?}");
        let die = mine.iter().find(|e| e.kind == "docker.container.die").unwrap();
        assert!(die.attributes.contains(&("exit_code".into(), "137".into())), "{die:?}");

        // Resume once more from the newest checkpoint: still no duplicates.
        let checkpoint = resumed.checkpoint().unwrap();
        drop(stream);
        let mut again = DockerEvents::new(&config, Some(&checkpoint));
        let mut stream = Box::pin(again.subscribe(&docker, crate::wall_ms()));
        let replayed = read_events(&mut again, &mut stream, Duration::from_millis(1_500), |_| false).await;
        assert!(of(&replayed, &name).is_empty() && of(&replayed, &killed).is_empty(), "replayed: {replayed:?}");
        drop(container);
    }

    fn message(time_nano: i64, action: &str, id: &str, attrs: &[(&str, &str)]) -> EventMessage {
        EventMessage {
            typ: Some(EventMessageTypeEnum::CONTAINER),
            action: Some(action.into()),
            actor: Some(bollard::models::EventActor {
                id: Some(id.into()),
                attributes: Some(attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            }),
            scope: None,
            time: Some(time_nano / 1_000_000_000),
            time_nano: Some(time_nano),
        }
    }

    #[test]
    fn events_at_the_checkpoint_time_are_delivered_once() {
        let config = DockerConfig::default();
        let mut events = DockerEvents::new(&config, None);
        let t = 1_700_000_000_123_456_789;
        assert!(events.accept(&message(t, "start", "a", &[("name", "web")])).is_some());
        assert!(events.accept(&message(t, "start", "b", &[])).is_some());
        let checkpoint = events.checkpoint().unwrap();
        let mut resumed = DockerEvents::new(&config, Some(&checkpoint));
        // Docker's `since` includes its bound: both come again, then a third at that time.
        assert!(resumed.accept(&message(t, "start", "a", &[])).is_none());
        assert!(resumed.accept(&message(t, "start", "b", &[])).is_none());
        let (ts, third) = resumed.accept(&message(t, "die", "a", &[("exitCode", "0"), ("name", "web")])).unwrap();
        assert_eq!(ts, 1_700_000_000_123);
        assert_eq!(third.kind, "docker.container.die");
        assert_eq!(third.severity, Severity::Info);
        // Out of time order but never seen: kept.
        assert!(resumed.accept(&message(t - 5, "stop", "a", &[])).is_some());
        // Ignored actions and other types move the position but make no event.
        assert!(resumed.accept(&message(t + 1, "exec_start: sh -c true", "a", &[])).is_none());
        let mut network = message(t + 2, "connect", "n", &[]);
        network.typ = Some(EventMessageTypeEnum::NETWORK);
        assert!(resumed.accept(&network).is_none());
        let doc: EventsCheckpoint = serde_json::from_slice(&resumed.checkpoint().unwrap()).unwrap();
        assert_eq!(doc.last_ns, Some(t + 2));
        // Garbage checkpoints start fresh.
        let fresh = DockerEvents::new(&config, Some(b"not json"));
        assert_eq!(fresh.position.last_ns, None);
    }

    #[test]
    fn container_events_get_kinds_severities_and_attributes() {
        let health = container_event(&message(1, "health_status: unhealthy", "abc", &[("name", "db"), ("image", "postgres:16")]));
        assert_eq!(health.kind, "docker.container.health_status");
        assert_eq!(health.severity, Severity::Warning);
        assert!(health.attributes.contains(&("health_status".into(), "unhealthy".into())));
        assert!(health.attributes.contains(&("image".into(), "postgres:16".into())));
        let oom = container_event(&message(1, "oom", "abc", &[("name", "db")]));
        assert_eq!((oom.kind.as_str(), oom.severity), ("docker.container.oom", Severity::Error));
        let compose = container_event(&message(1, "start", "abc", &[("name", "x"), ("com.docker.compose.project", "shop")]));
        assert!(compose.attributes.contains(&("compose_project".into(), "shop".into())));
        assert_eq!(container_event(&message(1, "pause", "abc", &[])).severity, Severity::Info);
        assert_eq!(container_event(&message(1, "die", "abc", &[("exitCode", "1")])).severity, Severity::Warning);
    }

    #[test]
    fn availability_reports_each_outage_once_and_backs_off() {
        let config = DockerConfig { host: Some("unix:///tmp/nope.sock".into()), ..DockerConfig::default() };
        let mut availability = Availability::new(&config);
        // Up at the first attempt: nothing to report.
        assert!(availability.reached("27.0", "1.41").is_none());
        let down = availability.failed("connection refused").unwrap();
        assert_eq!((down.kind.as_str(), down.severity), ("docker.unavailable", Severity::Warning));
        assert!(down.message.contains("unix:///tmp/nope.sock"), "{}", down.message);
        let mut delays = vec![availability.retry_delay()];
        for _ in 0..8 {
            assert!(availability.failed("still refused").is_none());
            delays.push(availability.retry_delay());
        }
        assert_eq!(delays[..6].iter().map(|d| d.as_millis()).collect::<Vec<_>>(), [1_000, 2_000, 4_000, 8_000, 16_000, 30_000]);
        assert_eq!(delays[8], Duration::from_secs(30));
        let up = availability.reached("27.0", "1.41").unwrap();
        assert_eq!((up.kind.as_str(), up.severity), ("docker.available", Severity::Info));
        assert_eq!(availability.retry_delay(), Duration::from_secs(1));
        // Down from the start: reported once too.
        let mut cold = Availability::new(&config);
        assert!(cold.failed("refused").is_some());
        assert!(cold.failed("refused").is_none());
    }

    #[tokio::test]
    async fn a_missing_socket_is_an_error_not_a_panic() {
        let config = DockerConfig { host: Some("unix:///tmp/gantry-nope.sock".into()), timeout_secs: 2, ..DockerConfig::default() };
        let error = connect(&config).await.unwrap_err();
        assert!(!error.to_string().is_empty());
        let config = DockerConfig { host: Some("ftp://x".into()), ..DockerConfig::default() };
        assert_eq!(config.validate().len(), 1);
    }

    #[test]
    fn the_configuration_is_checked() {
        assert!(DockerConfig::default().validate().is_empty());
        let cfg: DockerConfig = toml::from_str("host = \"unix:///run/docker.sock\"\n[logs]\ncontainers = [\"web\"]").unwrap();
        assert_eq!(cfg.host.as_deref(), Some("unix:///run/docker.sock"));
        assert_eq!(cfg.interval_secs, DEFAULT_INTERVAL_SECS);
        assert!(toml::from_str::<DockerConfig>("hots = \"x\"").is_err());
        let bad = DockerConfig { interval_secs: 0, timeout_secs: 0, retry_min_ms: 5, retry_max_ms: 1, ..DockerConfig::default() };
        assert_eq!(bad.validate().len(), 3);
    }
}
