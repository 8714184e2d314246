//! The diagnostics bundle: one JSON document with what support needs to understand an
//! agent without logging in to its machine. Sections: `agent` (version, pid, uptime,
//! memory), `identity` (agent id, org, hub address, pinned CA fingerprint, certificate
//! validity; never the key), `config` (the configuration in force, secrets redacted),
//! `state_dir` (file names and sizes, no contents), `spool` (per-class counters and caps),
//! `deployments` (the latest report of each), `docker` (version, info, containers),
//! `host` (facts, uptime, load, disks) and `recent_logs` (the agent's last log lines).
//!
//! Every section that fails says why in its place; the rest is still collected. The
//! document is kept under [`MAX_DIAGNOSTICS_BYTES`] by dropping the oldest log lines.

use crate::config::Config;
use crate::deployer::Deployer;
use crate::telemetry::Outbox;
use bollard::query_parameters::ListContainersOptions;
use gantry_shared::message::StreamClass;
use gantry_shared::support::MAX_DIAGNOSTICS_BYTES;
use serde_json::{json, Value};
use std::path::Path;

/// What replaces a secret value.
pub const REDACTED: &str = "(redacted)";

/// Key names (lowercased, substrings) whose values are secrets wherever they appear.
const SECRET_KEYS: [&str; 8] = ["password", "secret", "token", "key", "credential", "auth", "cookie", "private"];

/// Replace every secret in `value`: values under secret-looking keys, PEM blocks, and the
/// user-info part of URLs (`scheme://user:pass@host`).
pub fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                let lower = key.to_lowercase();
                if SECRET_KEYS.iter().any(|s| lower.contains(s)) && !child.is_null() && *child != Value::Bool(false) {
                    *child = Value::String(REDACTED.into());
                } else {
                    redact(child);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::String(text) => {
            if text.contains("-----BEGIN") {
                *text = REDACTED.into();
            } else if let Some((scheme, rest)) = text.split_once("://") {
                let authority = rest.split('/').next().unwrap_or(rest);
                if let Some((_, host)) = authority.rsplit_once('@') {
                    let path = &rest[authority.len()..];
                    *text = format!("{scheme}://{REDACTED}@{host}{path}");
                }
            }
        }
        _ => {}
    }
}

/// Inputs of the bundle.
#[derive(Debug, Clone)]
pub struct Sources {
    pub config: Config,
    pub outbox: Outbox,
    pub deployer: Deployer,
}

/// Collect the bundle as JSON text.
pub async fn collect(sources: &Sources) -> String {
    let config = &sources.config;
    let mut config_json = serde_json::to_value(config).unwrap_or(Value::Null);
    redact(&mut config_json);
    let state = crate::state::StateDir::new(&config.state_dir);
    let mut document = json!({
        "agent": agent_process(),
        "identity": identity(&state),
        "config": config_json,
        "state_dir": state_dir(&config.state_dir),
        "spool": spool(&sources.outbox),
        "deployments": sources.deployer.snapshot().iter().map(|r| json!({
            "deployment": r.deployment_id,
            "revision": r.revision,
            "state": format!("{:?}", r.state),
            "message": r.message,
        })).collect::<Vec<_>>(),
        "docker": docker(config).await,
        "host": host(),
        "recent_logs": super::recent::recent_logs().snapshot(),
    });
    fit(&mut document)
}

/// The document as text under the size cap, dropping the oldest log lines if needed.
fn fit(document: &mut Value) -> String {
    loop {
        let text = document.to_string();
        if text.len() <= MAX_DIAGNOSTICS_BYTES {
            return text;
        }
        let logs = document["recent_logs"].as_array_mut();
        match logs {
            Some(lines) if !lines.is_empty() => {
                let drop = (lines.len() / 4).max(1);
                lines.drain(..drop);
            }
            _ => {
                // Only a misbehaving Docker (a huge info answer) can get here.
                document["docker"] = json!({ "error": "docker section left out: the bundle was too large" });
                let text = document.to_string();
                let (kept, _) = gantry_shared::support::cut(&text, MAX_DIAGNOSTICS_BYTES);
                return if kept.len() == text.len() { text } else { json!({ "error": "diagnostics too large" }).to_string() };
            }
        }
    }
}

fn agent_process() -> Value {
    use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
    let pid = std::process::id();
    let mut system = System::new();
    system.refresh_processes_specifics(ProcessesToUpdate::Some(&[Pid::from_u32(pid)]), false, ProcessRefreshKind::nothing().with_memory());
    let process = system.process(Pid::from_u32(pid));
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "protocol_versions": [gantry_shared::PROTOCOL_VERSION_MIN, gantry_shared::PROTOCOL_VERSION_MAX],
        "pid": pid,
        "started_at_unix": process.map(|p| p.start_time()),
        "memory_rss_bytes": process.map(|p| p.memory()),
    })
}

fn identity(state: &crate::state::StateDir) -> Value {
    let mut out = match state.load_identity() {
        Ok(identity) => json!({
            "agent_id": identity.agent_id,
            "org": identity.org,
            "hub_addr": identity.hub_addr,
            "ca_sha256": identity.ca_sha256,
            "labels": identity.labels,
            "enrolled_at_unix": identity.enrolled_at_unix,
        }),
        Err(error) => json!({ "error": format!("{error:#}") }),
    };
    let certificate = std::fs::read(state.cert_path()).ok().and_then(|pem| first_pem_der(&pem)).and_then(|der| crate::state::validity(&der));
    out["certificate"] = match certificate {
        Some((not_before, not_after)) => json!({ "not_before_unix": not_before, "not_after_unix": not_after }),
        None => json!({ "error": "agent.crt missing or unreadable" }),
    };
    out
}

/// The DER of the first PEM block in `pem`.
fn first_pem_der(pem: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine;
    let text = std::str::from_utf8(pem).ok()?;
    let body: String = text.lines().skip_while(|l| !l.starts_with("-----BEGIN")).skip(1).take_while(|l| !l.starts_with("-----END")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

fn state_dir(dir: &Path) -> Value {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => return json!({ "path": dir.display().to_string(), "error": error.to_string() }),
    };
    let mut files: Vec<Value> = entries
        .filter_map(Result::ok)
        .map(|entry| {
            let meta = entry.metadata().ok();
            json!({
                "name": entry.file_name().to_string_lossy(),
                "dir": meta.as_ref().is_some_and(|m| m.is_dir()),
                "bytes": meta.as_ref().map(|m| m.len()),
                "mode": meta.as_ref().map(|m| { use std::os::unix::fs::PermissionsExt; format!("{:o}", m.permissions().mode() & 0o7777) }),
            })
        })
        .collect();
    files.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    json!({ "path": dir.display().to_string(), "files": files })
}

fn spool(outbox: &Outbox) -> Value {
    let spool = outbox.spool();
    let config = spool.config();
    let mut classes = serde_json::Map::new();
    for class in StreamClass::ALL {
        let s = spool.stats(class);
        classes.insert(
            class.name().to_string(),
            json!({
                "records": s.records,
                "bytes": s.bytes,
                "cap_bytes": config.cap(class),
                "dropped_records": s.dropped_records,
                "dropped_bytes": s.dropped_bytes,
                "corrupt_records": s.corrupt_records,
                "next_seq": s.next_seq,
                "oldest_seq": s.oldest_seq,
                "acked_up_to": s.acked_up_to,
            }),
        );
    }
    Value::Object(classes)
}

async fn docker(config: &Config) -> Value {
    if !config.docker.enabled {
        return json!({ "enabled": false });
    }
    let attached = match crate::collector::docker::connect(&config.docker).await {
        Ok(attached) => attached,
        Err(error) => return json!({ "enabled": true, "endpoint": config.docker.endpoint(), "error": error.to_string() }),
    };
    let info = match attached.docker.info().await {
        Ok(info) => {
            let full = serde_json::to_value(&info).unwrap_or(Value::Null);
            let keep = [
                "ServerVersion",
                "OperatingSystem",
                "KernelVersion",
                "Architecture",
                "NCPU",
                "MemTotal",
                "Driver",
                "DockerRootDir",
                "CgroupDriver",
                "CgroupVersion",
                "Containers",
                "ContainersRunning",
                "ContainersPaused",
                "ContainersStopped",
                "Images",
                "LoggingDriver",
                "Warnings",
            ];
            let mut picked = serde_json::Map::new();
            for key in keep {
                if let Some(value) = full.get(key) {
                    picked.insert(key.to_string(), value.clone());
                }
            }
            Value::Object(picked)
        }
        Err(error) => json!({ "error": error.to_string() }),
    };
    let containers = match attached.docker.list_containers(Some(ListContainersOptions { all: true, ..Default::default() })).await {
        Ok(list) => list
            .into_iter()
            .take(500)
            .map(|c| {
                json!({
                    "name": c.names.and_then(|n| n.into_iter().next()).map(|n| n.trim_start_matches('/').to_string()),
                    "id": c.id.map(|id| id.chars().take(12).collect::<String>()),
                    "image": c.image,
                    "state": c.state.map(|s| s.to_string()),
                    "status": c.status,
                })
            })
            .collect(),
        Err(error) => vec![json!({ "error": error.to_string() })],
    };
    let mut out = json!({
        "enabled": true,
        "endpoint": config.docker.endpoint(),
        "version": attached.version,
        "api_version": attached.api_version,
        "info": info,
        "containers": containers,
    });
    redact(&mut out);
    out
}

fn host() -> Value {
    let facts = crate::facts::collect();
    let load = sysinfo::System::load_average();
    let disks = sysinfo::Disks::new_with_refreshed_list();
    let disks: Vec<Value> = disks
        .list()
        .iter()
        .take(64)
        .map(|d| json!({ "mount": d.mount_point().display().to_string(), "total_bytes": d.total_space(), "available_bytes": d.available_space(), "fs": d.file_system().to_string_lossy() }))
        .collect();
    json!({
        "facts": facts,
        "uptime_secs": sysinfo::System::uptime(),
        "boot_time_unix": sysinfo::System::boot_time(),
        "load_average": [load.one, load.five, load.fifteen],
        "disks": disks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_wherever_they_are() {
        let mut value = json!({
            "state_dir": "/var/lib/gantry-agent",
            "docker": { "host": "tcp://admin:hunter2@10.0.0.5:2376/v1", "registry_password": "pw" },
            "api_token": "t0k",
            "files": { "paths": ["/var/log/app.log"] },
            "cert": "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----",
            "private_key_file": null,
        });
        redact(&mut value);
        let text = value.to_string();
        for secret in ["hunter2", "admin", "pw\"", "t0k", "abc"] {
            assert!(!text.contains(secret), "{secret} left in {text}");
        }
        assert_eq!(value["docker"]["host"], "tcp://(redacted)@10.0.0.5:2376/v1");
        assert_eq!(value["state_dir"], "/var/lib/gantry-agent");
        assert_eq!(value["private_key_file"], Value::Null, "absent values stay visible as absent");
    }

    #[test]
    fn oversized_bundles_lose_their_oldest_log_lines_first() {
        let line = "x".repeat(1000);
        let mut document = json!({ "agent": { "version": "1" }, "recent_logs": vec![line; 2000] });
        let text = fit(&mut document);
        assert!(text.len() <= MAX_DIAGNOSTICS_BYTES);
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["agent"]["version"], "1");
        assert!(!parsed["recent_logs"].as_array().unwrap().is_empty());
    }
}
