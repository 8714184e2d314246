//! Local health checks: what an agent checks, how often, what it does when a check fails,
//! and what it reports.
//!
//! The hub keeps check configurations per org (scoped to every agent, a label selector,
//! listed agents or a deployment's targets), resolves them into one [`CheckSet`] per agent
//! and sends it over the control stream. The agent keeps the set on disk and runs it even
//! while offline; every state change and a periodic summary go to the hub as
//! [`CheckReport`] records on the health telemetry stream. Plain data and validation; no IO.

use serde::{Deserialize, Serialize};

/// Longest check name.
pub const MAX_NAME_CHARS: usize = 64;
/// Most checks one agent runs.
pub const MAX_CHECKS_PER_AGENT: usize = 200;
/// Longest probe output kept in a report, in bytes.
pub const MAX_OUTPUT_BYTES: usize = 512;
/// Longest interval between two runs.
pub const MAX_INTERVAL_SECS: u64 = 86_400;
/// Longest timeout of one run.
pub const MAX_TIMEOUT_SECS: u64 = 300;
/// Largest failure or success threshold.
pub const MAX_THRESHOLD: u32 = 100;
/// How often the agent sends a summary of each check besides its state changes.
pub const SUMMARY_EVERY_SECS: u64 = 60;

/// One check as the hub configures it and the agent runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// Unique among an agent's checks; letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// What to probe.
    #[serde(with = "binary::probe")]
    #[cfg_attr(feature = "schemars", schemars(with = "Probe"))]
    pub probe: Probe,
    /// Seconds between runs (1-86400).
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    /// Seconds one run may take before it counts as failed (1-300, at most the interval).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Consecutive failed runs before the check is failing (1-100).
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Consecutive passed runs before a failing check passes again (1-100).
    #[serde(default = "default_success_threshold")]
    pub success_threshold: u32,
    /// What the agent does by itself when the check is failing.
    #[serde(default)]
    pub remediation: Remediation,
}

fn default_interval() -> u64 {
    30
}
fn default_timeout() -> u64 {
    10
}
fn default_failure_threshold() -> u32 {
    3
}
fn default_success_threshold() -> u32 {
    1
}

/// What a check probes. JSON: `{"type": "http", "url": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Probe {
    /// An HTTP(S) GET from the agent. Passes when the status is `expect_status` (any 2xx or
    /// 3xx when absent), the body contains `body_contains` (if given) and the answer came
    /// within `max_latency_ms` (if given).
    Http {
        url: String,
        #[serde(default)]
        expect_status: Option<u16>,
        #[serde(default)]
        body_contains: Option<String>,
        #[serde(default)]
        max_latency_ms: Option<u64>,
    },
    /// A TCP connect to `host:port`.
    Tcp { host: String, port: u16 },
    /// A command on the host (argv, no shell); passes on exit code 0.
    Exec { command: Vec<String> },
    /// A container by name: passes while it runs and, if it has a Docker health check, is
    /// healthy.
    Container { name: String },
    /// Free space of the filesystem holding `path`, in percent of its size.
    DiskFree { path: String, min_free_percent: f64 },
    /// Memory in use, in percent of the total.
    Memory { max_used_percent: f64 },
    /// One-minute load average divided by the number of cores.
    Load { max_per_core: f64 },
    /// Some process whose name is exactly `name` runs.
    Process { name: String },
    /// The certificate `host:port` presents expires no sooner than `min_days` from now.
    TlsExpiry {
        host: String,
        #[serde(default = "default_tls_port")]
        port: u16,
        min_days: u32,
    },
}

fn default_tls_port() -> u16 {
    443
}

impl Probe {
    /// Stable lowercase name, as in the JSON `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Probe::Http { .. } => "http",
            Probe::Tcp { .. } => "tcp",
            Probe::Exec { .. } => "exec",
            Probe::Container { .. } => "container",
            Probe::DiskFree { .. } => "disk_free",
            Probe::Memory { .. } => "memory",
            Probe::Load { .. } => "load",
            Probe::Process { .. } => "process",
            Probe::TlsExpiry { .. } => "tls_expiry",
        }
    }
}

/// What the agent does when a check turns failing, and how often it may.
///
/// The steps form a ladder: the first remediation of a failure episode runs `steps[0]`,
/// the next (if the check is still failing `failure_threshold` runs later) `steps[1]`, and
/// so on, staying on the last step. More than `max_attempts` remediations within
/// `window_secs` is a crash loop: the agent stops remediating that check, reports it, and
/// starts again only after the check has passed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Remediation {
    #[serde(default, with = "binary::steps")]
    #[cfg_attr(feature = "schemars", schemars(with = "Vec<RemediationStep>"))]
    pub steps: Vec<RemediationStep>,
    /// Remediations allowed within `window_secs` (1-100).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Length of the crash-loop window in seconds (1-86400).
    #[serde(default = "default_window")]
    pub window_secs: u64,
}

fn default_max_attempts() -> u32 {
    3
}
fn default_window() -> u64 {
    600
}

impl Default for Remediation {
    fn default() -> Self {
        Remediation { steps: Vec::new(), max_attempts: default_max_attempts(), window_secs: default_window() }
    }
}

/// One rung of the remediation ladder. JSON: `{"action": "restart_container", ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum RemediationStep {
    /// Restart the named container.
    RestartContainer { container: String },
    /// Apply the deployment's last good revision again (as the agent recorded it).
    Redeploy { deployment_id: String },
    /// Run a command on the host (argv, no shell), bounded by the check's timeout.
    RunCommand { command: Vec<String> },
}

impl RemediationStep {
    /// Short description for reports and events.
    pub fn describe(&self) -> String {
        match self {
            RemediationStep::RestartContainer { container } => format!("restart container {container}"),
            RemediationStep::Redeploy { deployment_id } => format!("redeploy last good revision of {deployment_id}"),
            RemediationStep::RunCommand { command } => format!("run {}", command.join(" ")),
        }
    }
}

/// The wire form of [`Probe`] and [`RemediationStep`]. In JSON (the API, files) they are
/// internally tagged (`{"type": "http", ...}`); bincode, the protocol's codec, cannot read
/// internally tagged enums back (they need `deserialize_any`), so in binary formats they
/// are externally tagged through these mirrors instead.
mod binary {
    use super::{Probe, RemediationStep};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(remote = "Probe")]
    enum ProbeBinary {
        Http { url: String, expect_status: Option<u16>, body_contains: Option<String>, max_latency_ms: Option<u64> },
        Tcp { host: String, port: u16 },
        Exec { command: Vec<String> },
        Container { name: String },
        DiskFree { path: String, min_free_percent: f64 },
        Memory { max_used_percent: f64 },
        Load { max_per_core: f64 },
        Process { name: String },
        TlsExpiry { host: String, port: u16, min_days: u32 },
    }

    #[derive(Serialize, Deserialize)]
    #[serde(remote = "RemediationStep")]
    enum RemediationStepBinary {
        RestartContainer { container: String },
        Redeploy { deployment_id: String },
        RunCommand { command: Vec<String> },
    }

    pub(super) mod probe {
        use super::*;

        pub(in super::super) fn serialize<S: Serializer>(probe: &Probe, serializer: S) -> Result<S::Ok, S::Error> {
            if serializer.is_human_readable() {
                probe.serialize(serializer)
            } else {
                ProbeBinary::serialize(probe, serializer)
            }
        }

        pub(in super::super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Probe, D::Error> {
            if deserializer.is_human_readable() {
                Probe::deserialize(deserializer)
            } else {
                ProbeBinary::deserialize(deserializer)
            }
        }
    }

    pub(super) mod steps {
        use super::*;

        struct Item<'a>(&'a RemediationStep);

        impl Serialize for Item<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                RemediationStepBinary::serialize(self.0, serializer)
            }
        }

        #[derive(Deserialize)]
        struct Owned(#[serde(with = "RemediationStepBinary")] RemediationStep);

        pub(in super::super) fn serialize<S: Serializer>(steps: &[RemediationStep], serializer: S) -> Result<S::Ok, S::Error> {
            if serializer.is_human_readable() {
                steps.serialize(serializer)
            } else {
                serializer.collect_seq(steps.iter().map(Item))
            }
        }

        pub(in super::super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<RemediationStep>, D::Error> {
            if deserializer.is_human_readable() {
                Vec::<RemediationStep>::deserialize(deserializer)
            } else {
                Ok(Vec::<Owned>::deserialize(deserializer)?.into_iter().map(|owned| owned.0).collect())
            }
        }
    }
}

/// The checks an agent runs, as resolved by the hub. `revision` grows with every change in
/// the org's check configuration, so an agent ignores an older set arriving late.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CheckSet {
    pub revision: u64,
    pub checks: Vec<CheckSpec>,
}

/// Where a check stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckState {
    /// Not yet run enough times to say.
    Pending,
    Passing,
    Failing,
}

impl CheckState {
    pub fn name(self) -> &'static str {
        match self {
            CheckState::Pending => "pending",
            CheckState::Passing => "passing",
            CheckState::Failing => "failing",
        }
    }
}

/// What the agent reports about one check: on every state change (`transition`), after
/// every remediation, and as a summary every [`SUMMARY_EVERY_SECS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    pub name: String,
    /// [`Probe::kind`] of the check.
    pub kind: String,
    pub state: CheckState,
    /// When the check entered `state`, Unix milliseconds.
    pub since_unix_ms: i64,
    /// This report announces a change of state.
    pub transition: bool,
    /// Output of the latest run (status line, error, exit code), at most
    /// [`MAX_OUTPUT_BYTES`].
    pub output: String,
    /// Duration of the latest run.
    pub latency_ms: u64,
    /// Runs and failed runs since the previous report.
    pub runs: u32,
    pub failures: u32,
    /// A remediation the agent just took (or refused, for a crash loop), described.
    pub remediation: Option<String>,
    /// The remediation budget is spent: the agent stopped remediating this check.
    pub crash_loop: bool,
}

/// Check `specs` as one agent's set: each spec valid, names unique, not too many. Errors
/// name the check and field, e.g. `checks[2] (web): interval_secs must be 1-86400`.
pub fn validate_set(specs: &[CheckSpec]) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    if specs.len() > MAX_CHECKS_PER_AGENT {
        errors.push(format!("at most {MAX_CHECKS_PER_AGENT} checks per agent"));
    }
    let mut names = std::collections::HashSet::new();
    for (i, spec) in specs.iter().enumerate() {
        if let Err(mut errs) = spec.validate() {
            errors.extend(errs.drain(..).map(|e| format!("checks[{i}] ({}): {e}", spec.name)));
        }
        if !names.insert(spec.name.as_str()) {
            errors.push(format!("checks[{i}]: name {:?} is used twice", spec.name));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

impl CheckSpec {
    /// Every problem with this spec, each naming its field.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        if self.name.is_empty() || self.name.chars().count() > MAX_NAME_CHARS {
            errors.push(format!("name must be 1-{MAX_NAME_CHARS} characters"));
        } else if !self.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
            errors.push("name may only contain letters, digits, '-', '_' and '.'".to_string());
        }
        if !(1..=MAX_INTERVAL_SECS).contains(&self.interval_secs) {
            errors.push(format!("interval_secs must be 1-{MAX_INTERVAL_SECS}"));
        }
        if !(1..=MAX_TIMEOUT_SECS).contains(&self.timeout_secs) {
            errors.push(format!("timeout_secs must be 1-{MAX_TIMEOUT_SECS}"));
        } else if self.timeout_secs > self.interval_secs && (1..=MAX_INTERVAL_SECS).contains(&self.interval_secs) {
            errors.push("timeout_secs must not exceed interval_secs".to_string());
        }
        if !(1..=MAX_THRESHOLD).contains(&self.failure_threshold) {
            errors.push(format!("failure_threshold must be 1-{MAX_THRESHOLD}"));
        }
        if !(1..=MAX_THRESHOLD).contains(&self.success_threshold) {
            errors.push(format!("success_threshold must be 1-{MAX_THRESHOLD}"));
        }
        self.probe.validate(&mut errors);
        let r = &self.remediation;
        if !(1..=MAX_THRESHOLD).contains(&r.max_attempts) {
            errors.push(format!("remediation.max_attempts must be 1-{MAX_THRESHOLD}"));
        }
        if !(1..=MAX_INTERVAL_SECS).contains(&r.window_secs) {
            errors.push(format!("remediation.window_secs must be 1-{MAX_INTERVAL_SECS}"));
        }
        if r.steps.len() > 10 {
            errors.push("remediation.steps may have at most 10 steps".to_string());
        }
        for (i, step) in r.steps.iter().enumerate() {
            match step {
                RemediationStep::RestartContainer { container } if !valid_container_name(container) => {
                    errors.push(format!("remediation.steps[{i}].container must be a container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)"))
                }
                RemediationStep::Redeploy { deployment_id } if deployment_id.is_empty() || deployment_id.len() > 128 => {
                    errors.push(format!("remediation.steps[{i}].deployment_id must be 1-128 characters"))
                }
                RemediationStep::RunCommand { command } if command.is_empty() || command[0].is_empty() => {
                    errors.push(format!("remediation.steps[{i}].command must name a program"))
                }
                _ => {}
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

impl Probe {
    fn validate(&self, errors: &mut Vec<String>) {
        match self {
            Probe::Http { url, expect_status, max_latency_ms, body_contains } => {
                if let Err(e) = parse_http_url(url) {
                    errors.push(format!("probe.url: {e}"));
                }
                if expect_status.is_some_and(|s| !(100..=599).contains(&s)) {
                    errors.push("probe.expect_status must be 100-599".to_string());
                }
                if max_latency_ms.is_some_and(|ms| ms == 0 || ms > MAX_TIMEOUT_SECS * 1000) {
                    errors.push(format!("probe.max_latency_ms must be 1-{}", MAX_TIMEOUT_SECS * 1000));
                }
                if body_contains.as_ref().is_some_and(|b| b.is_empty() || b.len() > 1024) {
                    errors.push("probe.body_contains must be 1-1024 bytes".to_string());
                }
            }
            Probe::Tcp { host, port } | Probe::TlsExpiry { host, port, .. } => {
                if !valid_host(host) {
                    errors.push(format!("probe.host {host:?} is not a host name or IP address"));
                }
                if *port == 0 {
                    errors.push("probe.port must be 1-65535".to_string());
                }
                if let Probe::TlsExpiry { min_days, .. } = self {
                    if *min_days > 3650 {
                        errors.push("probe.min_days must be 0-3650".to_string());
                    }
                }
            }
            Probe::Exec { command } => {
                if command.is_empty() || command[0].is_empty() {
                    errors.push("probe.command must name a program".to_string());
                }
            }
            Probe::Container { name } => {
                if !valid_container_name(name) {
                    errors.push("probe.name must be a container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)".to_string());
                }
            }
            Probe::DiskFree { path, min_free_percent } => {
                if !path.starts_with('/') {
                    errors.push("probe.path must be an absolute path".to_string());
                }
                if !(0.0..=100.0).contains(min_free_percent) {
                    errors.push("probe.min_free_percent must be 0-100".to_string());
                }
            }
            Probe::Memory { max_used_percent } => {
                if !(0.0..=100.0).contains(max_used_percent) {
                    errors.push("probe.max_used_percent must be 0-100".to_string());
                }
            }
            Probe::Load { max_per_core } => {
                if !(max_per_core.is_finite() && *max_per_core > 0.0 && *max_per_core <= 1000.0) {
                    errors.push("probe.max_per_core must be above 0 and at most 1000".to_string());
                }
            }
            Probe::Process { name } => {
                if name.is_empty() || name.len() > 255 || name.contains('/') {
                    errors.push("probe.name must be a process name (1-255 bytes, no '/')".to_string());
                }
            }
        }
    }
}

/// A URL an HTTP check may use, split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

/// Parse an `http://` or `https://` URL with a host, optional port and path.
pub fn parse_http_url(url: &str) -> Result<HttpUrl, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else {
        return Err(format!("{url:?} must start with http:// or https://"));
    };
    if url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{url:?} is not a valid URL (whitespace, control characters or longer than 2048)"));
    }
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    let path = path.split('#').next().unwrap_or("/").to_string();
    if authority.contains('@') {
        return Err(format!("{url:?}: credentials in the URL are not supported"));
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or_else(|| format!("{url:?}: unclosed '[' in host"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse::<u16>().map_err(|_| format!("{url:?}: port {p:?} is not a number 1-65535"))?,
            None if after.is_empty() => default_port,
            None => return Err(format!("{url:?}: unexpected {after:?} after the host")),
        };
        (host.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, p)) => (host.to_string(), p.parse::<u16>().map_err(|_| format!("{url:?}: port {p:?} is not a number 1-65535"))?),
            None => (authority.to_string(), default_port),
        }
    };
    if port == 0 {
        return Err(format!("{url:?}: port must be 1-65535"));
    }
    if !valid_host(&host) {
        return Err(format!("{url:?} has no valid host"));
    }
    Ok(HttpUrl { tls, host, port, path })
}

fn valid_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|label| !label.is_empty() && label.len() <= 63 && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') && !label.starts_with('-'))
}

fn valid_container_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 255 && chars.next().is_some_and(|c| c.is_ascii_alphanumeric()) && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<CheckSpec, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_fill_in_and_a_plain_spec_is_valid() {
        let s = spec(r#"{"name":"web","probe":{"type":"http","url":"http://127.0.0.1:8080/health"}}"#).unwrap();
        assert_eq!((s.interval_secs, s.timeout_secs, s.failure_threshold, s.success_threshold), (30, 10, 3, 1));
        assert!(s.remediation.steps.is_empty());
        s.validate().unwrap();
    }

    #[test]
    fn bad_specs_name_their_field() {
        let cases = [
            (r#"{"name":"a","probe":{"type":"http","url":"ftp://x"},"interval_secs":5}"#, "probe.url"),
            (r#"{"name":"a","probe":{"type":"http","url":"http://"}}"#, "no valid host"),
            (r#"{"name":"a","probe":{"type":"tcp","host":"db","port":5432},"interval_secs":0}"#, "interval_secs must be 1-86400"),
            (r#"{"name":"a","probe":{"type":"tcp","host":"db","port":5432},"interval_secs":5,"timeout_secs":10}"#, "timeout_secs must not exceed"),
            (r#"{"name":"a b","probe":{"type":"memory","max_used_percent":90}}"#, "name may only"),
            (r#"{"name":"a","probe":{"type":"disk_free","path":"var","min_free_percent":10}}"#, "absolute path"),
            (r#"{"name":"a","probe":{"type":"memory","max_used_percent":190}}"#, "max_used_percent must be 0-100"),
            (r#"{"name":"a","probe":{"type":"exec","command":[]}}"#, "probe.command"),
            (
                r#"{"name":"a","probe":{"type":"process","name":"x"},"remediation":{"steps":[{"action":"restart_container","container":"/bad"}]}}"#,
                "steps[0].container",
            ),
        ];
        for (json, expect) in cases {
            let errors = spec(json).unwrap().validate().unwrap_err().join("; ");
            assert!(errors.contains(expect), "{json}: {errors}");
        }
        let unknown = spec(r#"{"name":"a","probe":{"type":"ping","host":"x"}}"#).unwrap_err();
        assert!(unknown.contains("unknown variant `ping`"), "{unknown}");
        let negative = spec(r#"{"name":"a","probe":{"type":"memory","max_used_percent":90},"interval_secs":-5}"#).unwrap_err();
        assert!(negative.contains("-5"), "{negative}");
    }

    #[test]
    fn duplicate_names_in_a_set_are_refused() {
        let a = spec(r#"{"name":"a","probe":{"type":"memory","max_used_percent":90}}"#).unwrap();
        let errors = validate_set(&[a.clone(), a]).unwrap_err();
        assert!(errors[0].contains("used twice"), "{errors:?}");
    }

    #[test]
    fn a_check_set_crosses_the_wire_and_keeps_its_json_shape() {
        use crate::message::HubMessage;
        let json = r#"{"revision":4,"checks":[
            {"name":"h","probe":{"type":"http","url":"https://x/","expect_status":200,"body_contains":"ok","max_latency_ms":500},
             "remediation":{"steps":[{"action":"restart_container","container":"web"},{"action":"redeploy","deployment_id":"d"},{"action":"run_command","command":["true"]}]}},
            {"name":"t","probe":{"type":"tcp","host":"db","port":5432}},
            {"name":"e","probe":{"type":"exec","command":["true"]}},
            {"name":"c","probe":{"type":"container","name":"web"}},
            {"name":"d","probe":{"type":"disk_free","path":"/","min_free_percent":10}},
            {"name":"m","probe":{"type":"memory","max_used_percent":90}},
            {"name":"l","probe":{"type":"load","max_per_core":2}},
            {"name":"p","probe":{"type":"process","name":"nginx"}},
            {"name":"x","probe":{"type":"tls_expiry","host":"example.com","min_days":14}}]}"#;
        let set: CheckSet = serde_json::from_str(json).unwrap();
        assert_eq!(set.checks.len(), 9);
        let bytes = crate::frame::encode_to_vec(&HubMessage::Checks(set.clone()), crate::frame::DEFAULT_MAX_FRAME_BYTES).unwrap();
        let decoded: HubMessage = crate::frame::decode_body(&bytes[crate::frame::LENGTH_PREFIX_BYTES..]).unwrap();
        assert_eq!(decoded, HubMessage::Checks(set.clone()));
        // JSON is unchanged: internally tagged.
        let text = serde_json::to_string(&set).unwrap();
        assert!(text.contains(r#""probe":{"type":"http","url":"https://x/""#) && text.contains(r#"{"action":"redeploy","deployment_id":"d"}"#), "{text}");
        assert_eq!(serde_json::from_str::<CheckSet>(&text).unwrap(), set);
    }

    #[test]
    fn urls_parse_into_parts() {
        assert_eq!(
            parse_http_url("https://example.com:8443/a?b=1#frag").unwrap(),
            HttpUrl { tls: true, host: "example.com".into(), port: 8443, path: "/a?b=1".into() }
        );
        assert_eq!(parse_http_url("http://[::1]/x").unwrap(), HttpUrl { tls: false, host: "::1".into(), port: 80, path: "/x".into() });
        assert_eq!(parse_http_url("http://h?q").unwrap().path, "/?q");
        for bad in ["http://h:0/", "http://h:99999/", "http://us@h/", "http://h /", "mailto:x", "http://-h/"] {
            assert!(parse_http_url(bad).is_err(), "{bad}");
        }
    }
}
