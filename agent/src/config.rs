//! Agent configuration: one struct, loaded once and passed down.
//!
//! Precedence: defaults < TOML file (`--config`) < `GANTRY_*` environment < flags.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything `gantry-agent run` needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory with the agent's identity, key and certificate (and later its spool).
    /// Env `GANTRY_STATE_DIR`, flag `--state-dir`.
    pub state_dir: PathBuf,
    /// Dial this `HOST:PORT` instead of the hub address from enrollment (e.g. after the
    /// hub moved). The hub is still verified by the pinned CA. Env `GANTRY_HUB_ADDR`.
    pub hub_addr: Option<String>,
    /// First reconnect delay, in milliseconds; later delays grow with jitter.
    pub backoff_base_ms: u64,
    /// Longest reconnect delay, in milliseconds (a hub-supplied retry-after may exceed it).
    pub backoff_cap_ms: u64,
    /// Give up on a connection attempt after this many seconds.
    pub connect_timeout_secs: u64,
    /// Renew the certificate when this fraction of its lifetime has passed (jittered by
    /// up to 5 % of the lifetime so a fleet enrolled together does not renew together).
    pub renew_at_fraction: f64,
    /// Largest protocol frame accepted from the hub, in bytes.
    pub max_frame_bytes: usize,
    /// Disk spool caps per telemetry class.
    pub spool: SpoolCaps,
    /// Host metrics collector (CPU, memory, disks, network, load).
    pub host: crate::collector::host::HostConfig,
    /// Plain log files to tail (paths or `*`/`?` patterns in the file name).
    pub files: crate::collector::file::FileSourceConfig,
    /// How often log files are checked for new lines, in milliseconds.
    pub files_poll_ms: u64,
    /// Docker collectors: container inventory and stats, Docker events, container logs.
    /// On by default; without a reachable Docker the agent reports `docker.unavailable`
    /// once and keeps retrying.
    pub docker: crate::collector::docker::DockerConfig,
    /// Serve the agent's own Prometheus metrics (session with the hub, spool backlog and
    /// drops per class, process memory and CPU) at `http://ADDR/metrics`, e.g.
    /// `"127.0.0.1:9465"`. Off by default. There is no authentication: bind it to loopback
    /// or a private address. Env `GANTRY_METRICS_LISTEN`.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// How many bytes of each telemetry class the spool keeps while the hub is unreachable.
/// Beyond a cap the oldest records of that class are dropped and a gap marker takes their
/// place (visible through the hub's logs API and counted).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolCaps {
    /// Metric samples, in bytes (default 64 MiB).
    pub metrics_bytes: u64,
    /// Log lines, in bytes (default 256 MiB).
    pub logs_bytes: u64,
    /// Events, in bytes (default 128 MiB: events are kept longest).
    pub events_bytes: u64,
    /// Health check results, in bytes (default 32 MiB).
    pub health_bytes: u64,
}

impl Default for SpoolCaps {
    fn default() -> Self {
        let defaults = crate::spool::SpoolConfig::default().cap_bytes;
        SpoolCaps { metrics_bytes: defaults[0], logs_bytes: defaults[1], events_bytes: defaults[2], health_bytes: defaults[3] }
    }
}

impl SpoolCaps {
    /// The spool's own config.
    pub fn to_spool_config(&self) -> crate::spool::SpoolConfig {
        crate::spool::SpoolConfig { cap_bytes: [self.metrics_bytes, self.logs_bytes, self.events_bytes, self.health_bytes] }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from(crate::state::DEFAULT_STATE_DIR),
            hub_addr: None,
            backoff_base_ms: 250,
            backoff_cap_ms: 3_000,
            connect_timeout_secs: 5,
            renew_at_fraction: 2.0 / 3.0,
            max_frame_bytes: gantry_shared::frame::DEFAULT_MAX_FRAME_BYTES,
            spool: SpoolCaps::default(),
            host: Default::default(),
            files: Default::default(),
            files_poll_ms: 500,
            docker: Default::default(),
            metrics_listen: None,
        }
    }
}

impl Config {
    /// Load: defaults, then `file`, then environment, then `state_dir_flag`.
    pub fn load(file: Option<&std::path::Path>, env: &dyn Fn(&str) -> Option<String>, state_dir_flag: Option<PathBuf>) -> anyhow::Result<Config> {
        let mut config: Config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => Config::default(),
        };
        if let Some(v) = env("GANTRY_STATE_DIR") {
            config.state_dir = PathBuf::from(v);
        }
        if let Some(v) = env("GANTRY_HUB_ADDR") {
            config.hub_addr = Some(v);
        }
        if let Some(v) = env("GANTRY_METRICS_LISTEN") {
            config.metrics_listen =
                Some(v.parse().map_err(|_| anyhow::anyhow!("GANTRY_METRICS_LISTEN must be an address and port, like 127.0.0.1:9465 (got {v:?})"))?);
        }
        if let Some(v) = state_dir_flag {
            config.state_dir = v;
        }
        let errors = config.validate();
        anyhow::ensure!(errors.is_empty(), "invalid configuration:\n  {}", errors.join("\n  "));
        Ok(config)
    }

    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.backoff_base_ms == 0 || self.backoff_cap_ms < self.backoff_base_ms {
            errors.push("backoff_base_ms must be at least 1 and at most backoff_cap_ms".to_string());
        }
        if !(0.1..=0.95).contains(&self.renew_at_fraction) {
            errors.push("renew_at_fraction must be between 0.1 and 0.95".to_string());
        }
        if self.connect_timeout_secs == 0 {
            errors.push("connect_timeout_secs must be at least 1".to_string());
        }
        if self.host.interval_secs == 0 {
            errors.push("host.interval_secs must be at least 1".to_string());
        }
        if self.files_poll_ms == 0 {
            errors.push("files_poll_ms must be at least 1".to_string());
        }
        let caps = [self.spool.metrics_bytes, self.spool.logs_bytes, self.spool.events_bytes, self.spool.health_bytes];
        if caps.iter().any(|c| *c < 64 * 1024) {
            errors.push("spool caps must be at least 64 KiB each".to_string());
        }
        errors.extend(self.files.validate().into_iter().map(|e| format!("files: {e}")));
        errors.extend(self.docker.validate().into_iter().map(|e| format!("docker: {e}")));
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_validates() {
        let config: Config = toml::from_str(include_str!("../../deploy/agent.example.toml")).unwrap();
        assert!(config.validate().is_empty(), "{:?}", config.validate());
    }

    #[test]
    fn env_and_flag_override_the_file() {
        let env = |k: &str| (k == "GANTRY_HUB_ADDR").then(|| "10.0.0.1:7443".to_string());
        let config = Config::load(None, &env, Some("/tmp/state".into())).unwrap();
        assert_eq!(config.hub_addr.as_deref(), Some("10.0.0.1:7443"));
        assert_eq!(config.state_dir, PathBuf::from("/tmp/state"));
        let bad: Result<Config, _> = toml::from_str("state_dri = 1");
        assert!(bad.is_err());
    }

    #[test]
    fn docker_settings_parse_and_are_checked() {
        let config: Config = toml::from_str(
            "[docker]\nhost = \"unix:///run/docker.sock\"\ninterval_secs = 30\n[docker.logs]\nlabels = [\"app=web\"]\nexclude = [\"gantry-agent\"]",
        )
        .unwrap();
        assert!(config.docker.enabled);
        assert_eq!(config.docker.host.as_deref(), Some("unix:///run/docker.sock"));
        assert_eq!(config.docker.interval_secs, 30);
        assert_eq!(config.docker.logs.labels, ["app=web"]);
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        assert!(toml::from_str::<Config>("[docker.logs]\ncontainer = []").is_err());
        let bad: Config = toml::from_str("[docker]\ninterval_secs = 0\n[docker.logs]\npoll_ms = 0").unwrap();
        assert_eq!(bad.validate().len(), 2, "{:?}", bad.validate());
        // The whole configuration still round-trips through TOML (the fingerprint uses it).
        let text = toml::to_string(&Config::default()).unwrap();
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), Config::default());
    }
}
