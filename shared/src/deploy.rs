//! Deployment specs: what the hub asks an agent to run, and how the agent reports progress.
//!
//! A deployment is one or more services (containers) with a health gate; each change is a
//! new revision. The hub validates specs before storing them ([`DeploymentSpec::validate`]
//! gives every problem at once); the agent applies them through Docker and keeps the last
//! good revision to roll back to on its own. Plain data and pure checks; no IO.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Label the agent puts on every container it creates: the deployment id.
pub const LABEL_DEPLOYMENT: &str = "io.gantry.deployment";
/// Label with the service name.
pub const LABEL_SERVICE: &str = "io.gantry.service";
/// Label with the revision number.
pub const LABEL_REVISION: &str = "io.gantry.revision";

/// Default time a new container must stay healthy before it counts as good.
pub const DEFAULT_MIN_HEALTHY_SECS: u64 = 10;
/// Default deadline for a new container to become healthy.
pub const DEFAULT_HEALTH_DEADLINE_SECS: u64 = 120;
/// Default grace period between SIGTERM and SIGKILL when stopping a container.
pub const DEFAULT_STOP_GRACE_SECS: u64 = 10;

/// A whole deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    /// Name, unique within the org: 1-63 characters of a-z, 0-9 and '-'.
    pub name: String,
    /// The containers to run.
    pub services: Vec<ServiceSpec>,
    /// How the hub rolls the change out across agents.
    #[serde(default)]
    pub strategy: Strategy,
    /// How each agent replaces a running revision.
    #[serde(default)]
    pub order: UpdateOrder,
    /// When a new revision counts as good on an agent.
    #[serde(default)]
    pub health_gate: HealthGate,
}

/// One container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Name within the deployment: 1-63 characters of a-z, 0-9 and '-'.
    pub name: String,
    /// Image reference, by tag or digest (`repo:tag`, `repo@sha256:...`).
    pub image: String,
    /// Replaces the image's entrypoint.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's command (arguments).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Environment variables.
    #[serde(default)]
    pub env: Vec<EnvVar>,
    /// Published ports.
    #[serde(default)]
    pub ports: Vec<PortMapping>,
    /// Volumes and bind mounts.
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// Docker restart policy.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Memory limit in bytes.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// CPU limit in cores (e.g. 0.5).
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Extra container labels (keys starting with `io.gantry.` are reserved).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Health check; none means "running" is healthy.
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// Seconds between SIGTERM and SIGKILL when stopping.
    #[serde(default = "default_stop_grace")]
    pub stop_grace_secs: u64,
}

fn default_stop_grace() -> u64 {
    DEFAULT_STOP_GRACE_SECS
}

/// An environment variable: a plain `value`, or a `secret` referenced by name that the hub
/// resolves only for the targeted agents and that is never printed. Exactly one of the two.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub secret: Option<String>,
}

/// A published port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    /// Port on the host, 1-65535.
    pub host: u16,
    /// Port in the container, 1-65535.
    pub container: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// Host address to bind, e.g. `127.0.0.1`; all addresses when absent.
    #[serde(default)]
    pub host_ip: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

/// A named volume or a bind mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// Volume name, or an absolute host path for a bind mount.
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

/// Docker restart policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    No,
    Always,
    #[default]
    UnlessStopped,
    OnFailure,
}

/// How a container's health is judged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HealthCheck {
    /// The image's own Docker HEALTHCHECK.
    Docker,
    /// HTTP GET from the agent to the container's published host port.
    Http {
        port: u16,
        path: String,
        #[serde(default = "default_status")]
        expect_status: u16,
    },
    /// TCP connect to the published host port.
    Tcp { port: u16 },
    /// A command run inside the container; exit 0 is healthy.
    Exec { command: Vec<String> },
}

fn default_status() -> u16 {
    200
}

/// How a change rolls out across agents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Strategy {
    #[default]
    AllAtOnce,
    Rolling {
        batch_size: u32,
        #[serde(default)]
        pause_secs: u64,
        #[serde(default)]
        on_failure: OnFailure,
    },
}

/// What a rolling deployment does when a batch fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Stop rolling out; agents already updated keep the new revision.
    #[default]
    Stop,
    /// Roll every agent back to the previous revision.
    RollbackAll,
}

/// How one agent replaces a running revision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum UpdateOrder {
    /// Start the new container and wait for it to be healthy before stopping the old one.
    #[default]
    StartFirst,
    /// Stop the old container first (needed when host ports collide).
    StopFirst,
}

/// When a new revision counts as good on an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct HealthGate {
    /// The container must run and stay healthy this long.
    #[serde(default = "default_min_healthy")]
    pub min_healthy_secs: u64,
    /// ...within this deadline from its start; otherwise the agent rolls back.
    #[serde(default = "default_deadline")]
    pub deadline_secs: u64,
}

fn default_min_healthy() -> u64 {
    DEFAULT_MIN_HEALTHY_SECS
}

fn default_deadline() -> u64 {
    DEFAULT_HEALTH_DEADLINE_SECS
}

impl Default for HealthGate {
    fn default() -> Self {
        HealthGate { min_healthy_secs: DEFAULT_MIN_HEALTHY_SECS, deadline_secs: DEFAULT_HEALTH_DEADLINE_SECS }
    }
}

/// The registry an image reference pulls from, by Docker's rule: the first path component
/// when it looks like a host (has a `.` or `:`, or is `localhost`), else Docker Hub.
/// `registry.example.com:5000/team/app:1` -> `registry.example.com:5000`; `nginx:1` ->
/// `docker.io`.
pub fn registry_of(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            if first == "index.docker.io" || first == "registry-1.docker.io" {
                DOCKER_HUB.to_string()
            } else {
                first.to_ascii_lowercase()
            }
        }
        _ => DOCKER_HUB.to_string(),
    }
}

/// The registry name images without a registry host come from.
pub const DOCKER_HUB: &str = "docker.io";

impl DeploymentSpec {
    /// The names of the org secrets the spec's services reference, sorted, without repeats.
    pub fn secret_names(&self) -> Vec<String> {
        let names: std::collections::BTreeSet<&String> = self.services.iter().flat_map(|s| s.env.iter().filter_map(|v| v.secret.as_ref())).collect();
        names.into_iter().cloned().collect()
    }

    /// The registries the spec's images come from, sorted, without repeats.
    pub fn registries(&self) -> Vec<String> {
        let hosts: std::collections::BTreeSet<String> = self.services.iter().map(|s| registry_of(s.image.trim())).collect();
        hosts.into_iter().collect()
    }
}

fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl DeploymentSpec {
    /// Every problem with the spec, each naming the field (`services[0].ports[1].host`).
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if !valid_name(&self.name) {
            errors.push(format!("name {:?} must be 1-63 characters of a-z, 0-9 and '-'", self.name));
        }
        if self.services.is_empty() {
            errors.push("services must hold at least one service".to_string());
        }
        let mut names = std::collections::BTreeSet::new();
        let mut host_ports = std::collections::BTreeSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let at = format!("services[{i}]");
            if !valid_name(&service.name) {
                errors.push(format!("{at}.name {:?} must be 1-63 characters of a-z, 0-9 and '-'", service.name));
            } else if !names.insert(service.name.clone()) {
                errors.push(format!("{at}.name {:?} is used twice", service.name));
            }
            let image = service.image.trim();
            if image.is_empty() {
                errors.push(format!("{at}.image must not be empty"));
            } else if image.len() > 512 || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
                errors.push(format!("{at}.image {:?} is not an image reference", service.image));
            }
            for (j, port) in service.ports.iter().enumerate() {
                if port.host == 0 {
                    errors.push(format!("{at}.ports[{j}].host must be 1-65535"));
                }
                if port.container == 0 {
                    errors.push(format!("{at}.ports[{j}].container must be 1-65535"));
                }
                if port.host != 0 && !host_ports.insert((port.host, port.protocol as u8)) {
                    errors.push(format!("{at}.ports[{j}].host {} is published twice", port.host));
                }
                if let Some(ip) = &port.host_ip {
                    if ip.parse::<std::net::IpAddr>().is_err() {
                        errors.push(format!("{at}.ports[{j}].host_ip {ip:?} is not an IP address"));
                    }
                }
            }
            for (j, mount) in service.mounts.iter().enumerate() {
                if !mount.target.starts_with('/') {
                    errors.push(format!("{at}.mounts[{j}].target {:?} must be an absolute path", mount.target));
                }
                if mount.source.is_empty() {
                    errors.push(format!("{at}.mounts[{j}].source must not be empty"));
                }
            }
            for (j, var) in service.env.iter().enumerate() {
                if var.name.is_empty() || var.name.contains('=') || var.name.chars().any(char::is_control) {
                    errors.push(format!("{at}.env[{j}].name {:?} is not a variable name", var.name));
                }
                if var.value.is_some() == var.secret.is_some() {
                    errors.push(format!("{at}.env[{j}] must have exactly one of value and secret"));
                }
            }
            if let Some(cpus) = service.cpus {
                if !(cpus > 0.0 && cpus <= 1024.0) {
                    errors.push(format!("{at}.cpus must be between 0 and 1024"));
                }
            }
            if service.memory_bytes.is_some_and(|m| m < 4 * 1024 * 1024) {
                errors.push(format!("{at}.memory_bytes must be at least 4 MiB"));
            }
            if service.labels.keys().any(|k| k.starts_with("io.gantry.")) {
                errors.push(format!("{at}.labels: keys starting with io.gantry. are reserved"));
            }
            match &service.health {
                Some(HealthCheck::Http { port, path, .. }) => {
                    if *port == 0 {
                        errors.push(format!("{at}.health.http.port must be 1-65535"));
                    }
                    if !path.starts_with('/') {
                        errors.push(format!("{at}.health.http.path must start with '/'"));
                    }
                }
                Some(HealthCheck::Tcp { port: 0 }) => errors.push(format!("{at}.health.tcp.port must be 1-65535")),
                Some(HealthCheck::Exec { command }) if command.is_empty() => errors.push(format!("{at}.health.exec.command must not be empty")),
                _ => {}
            }
            if service.stop_grace_secs > 3600 {
                errors.push(format!("{at}.stop_grace_secs must be at most 3600"));
            }
        }
        if let Strategy::Rolling { batch_size: 0, .. } = self.strategy {
            errors.push("strategy.rolling.batch_size must be at least 1".to_string());
        }
        if self.health_gate.deadline_secs < self.health_gate.min_healthy_secs {
            errors.push("health_gate.deadline_secs must be at least min_healthy_secs".to_string());
        }
        if self.health_gate.deadline_secs > 24 * 3600 {
            errors.push("health_gate.deadline_secs must be at most 86400".to_string());
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_follow_dockers_rule() {
        assert_eq!(registry_of("nginx:1.27"), "docker.io");
        assert_eq!(registry_of("library/nginx@sha256:abc"), "docker.io");
        assert_eq!(registry_of("team/app:1"), "docker.io");
        assert_eq!(registry_of("ghcr.io/team/app:1"), "ghcr.io");
        assert_eq!(registry_of("Registry.Example.com:5000/app:2"), "registry.example.com:5000");
        assert_eq!(registry_of("localhost/app:1"), "localhost");
        assert_eq!(registry_of("127.0.0.1:5000/app:1"), "127.0.0.1:5000");
        assert_eq!(registry_of("index.docker.io/library/nginx:1"), "docker.io");
    }

    fn spec() -> DeploymentSpec {
        serde_json::from_str(
            r#"{"name":"web","services":[{"name":"app","image":"busybox:latest","ports":[{"host":8080,"container":80}],
                "env":[{"name":"MODE","value":"prod"},{"name":"TOKEN","secret":"api-token"}],
                "health":{"http":{"port":8080,"path":"/health"}}}],
                "strategy":{"rolling":{"batch_size":1,"pause_secs":5}}}"#,
        )
        .unwrap()
    }

    #[test]
    fn a_good_spec_parses_with_defaults_and_validates() {
        let spec = spec();
        assert!(spec.validate().is_empty(), "{:?}", spec.validate());
        assert_eq!(spec.order, UpdateOrder::StartFirst);
        assert_eq!(spec.health_gate, HealthGate::default());
        assert_eq!(spec.services[0].restart, RestartPolicy::UnlessStopped);
        assert_eq!(spec.services[0].env[1].secret.as_deref(), Some("api-token"));
        assert!(matches!(spec.services[0].health, Some(HealthCheck::Http { expect_status: 200, .. })));
    }

    #[test]
    fn specs_round_trip_through_the_wire_encoding() {
        let spec = spec();
        let bytes = bincode::serde::encode_to_vec(&spec, bincode::config::standard()).unwrap();
        let (back, _): (DeploymentSpec, usize) = bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn bad_specs_name_every_problem() {
        let mut spec = spec();
        spec.services[0].image = " ".into();
        spec.services[0].ports.push(PortMapping { host: 0, container: 70000u32 as u16, protocol: Protocol::Tcp, host_ip: Some("nope".into()) });
        spec.services[0].labels.insert("io.gantry.deployment".into(), "x".into());
        spec.services[0].env.push(EnvVar { name: "BOTH".into(), value: Some("a".into()), secret: Some("b".into()) });
        spec.strategy = Strategy::Rolling { batch_size: 0, pause_secs: 0, on_failure: OnFailure::Stop };
        let errors = spec.validate().join("\n");
        for expected in ["services[0].image", "services[0].ports[1].host must be", "host_ip", "reserved", "batch_size", "env[2] must have exactly one"] {
            assert!(errors.contains(expected), "{expected} missing from:\n{errors}");
        }
        let unknown: Result<DeploymentSpec, _> = serde_json::from_str(r#"{"name":"x","services":[],"colour":"red"}"#);
        assert!(unknown.unwrap_err().to_string().contains("unknown field `colour`"));
        let out_of_range: Result<DeploymentSpec, _> =
            serde_json::from_str(r#"{"name":"x","services":[{"name":"a","image":"i","ports":[{"host":70000,"container":1}]}]}"#);
        assert!(out_of_range.is_err());
    }
}
