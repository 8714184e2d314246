//! What the installer needs from the hub: the agent builds it serves under `/downloads/`,
//! the host requirements of an org's plan, what an enrollment token may still do, and the
//! check of an agent's signed request to be revoked (`--purge`).
//!
//! Plain functions over the config, the store and the file system; the HTTP side is
//! `api/install.rs`. Nothing here reveals a secret: a token's holder learns its org's
//! requirements and the state of the agents that token enrolled, and an enrolled machine
//! (by its agent's certificate) its org's requirements and its own agent's state, no more.

use crate::store::{Agent, Token};
use crate::Hub;
use gantry_shared::token::{hex, EnrollmentToken};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use subtle::ConstantTimeEq;

/// Name of the checksum file of each version folder.
pub const SHA256SUMS: &str = "SHA256SUMS";
/// File name prefix of agent builds: `gantry-agent-<os>-<arch>`.
pub const BUILD_PREFIX: &str = "gantry-agent-";
/// How far a deregistration request's time may be from the hub's clock, in milliseconds.
pub const DEREGISTER_WINDOW_MS: i64 = 5 * 60 * 1000;

/// The smallest machine an agent may be installed on. The installer's preflight compares
/// the host against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct HostRequirements {
    /// CPUs (as `nproc` counts them).
    pub min_cpus: u32,
    /// Total memory, in MiB.
    pub min_memory_mib: u64,
    /// Free disk space where the agent keeps its state (the file system of its state
    /// directory, `/var/lib` by default), in MiB.
    pub min_disk_mib: u64,
}

impl Default for HostRequirements {
    fn default() -> Self {
        HostRequirements { min_cpus: 1, min_memory_mib: 256, min_disk_mib: 1024 }
    }
}

/// The `[installer]` section of the hub's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstallerConfig {
    /// Folder of agent builds served at `/downloads/`: one folder per version (`0.2.0/`)
    /// holding `gantry-agent-<os>-<arch>` programs (`gantry-agent-linux-x86_64`,
    /// `gantry-agent-linux-aarch64`) and, optionally, their `SHA256SUMS` (computed by the hub
    /// when absent). The highest version is what `install.sh` installs, and upgrades to on a
    /// re-run. Unset: only the hub's own build (see `serve_own_agent`).
    pub downloads_dir: Option<PathBuf>,
    /// Also serve the hub's own build of the agent: the `gantry-agent` program next to the
    /// `gantry-hub` executable, if there is one, as the hub's version for the hub machine's OS
    /// and architecture (a folder of the same version in `downloads_dir` wins). On by
    /// default, so `gantry-hub quickstart` can install agents out of the box.
    pub serve_own_agent: bool,
    /// Host requirements for orgs whose plan names none (`limits.agent_host`), and for orgs
    /// without a plan. Default: 1 CPU, 256 MiB of memory, 1024 MiB of free disk.
    pub requirements: HostRequirements,
}

impl Default for InstallerConfig {
    fn default() -> Self {
        InstallerConfig { downloads_dir: None, serve_own_agent: true, requirements: HostRequirements::default() }
    }
}

/// One downloadable agent program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentBuild {
    pub version: String,
    /// File name, `gantry-agent-<os>-<arch>`.
    pub file: String,
    pub path: PathBuf,
}

/// Whether `version` may name a downloads folder: a digit first, then digits, letters, `.`,
/// `-` and `+` (no path separators, no `..`).
pub fn valid_version(version: &str) -> bool {
    version.len() <= 64
        && version.starts_with(|c: char| c.is_ascii_digit())
        && !version.contains("..")
        && version.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
}

/// Whether `file` names an agent build: `gantry-agent-<os>-<arch>` of lowercase letters,
/// digits and `_`.
pub fn valid_build_file(file: &str) -> bool {
    file.strip_prefix(BUILD_PREFIX).and_then(|rest| rest.split_once('-')).is_some_and(|(os, arch)| {
        let part = |s: &str| !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        part(os) && part(arch)
    })
}

/// Versions compare by their dot- and dash-separated parts, numbers as numbers
/// (`0.10.0` > `0.9.1`).
pub fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    let parts =
        |v: &str| -> Vec<(u64, String)> { v.split(['.', '-', '+']).map(|p| p.parse::<u64>().map_or((0, p.to_string()), |n| (n, String::new()))).collect() };
    parts(a).cmp(&parts(b))
}

/// The hub's own agent program (`gantry-agent` next to the running executable), if present.
fn own_agent() -> Option<AgentBuild> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.join("gantry-agent");
    path.is_file().then(|| AgentBuild {
        version: env!("CARGO_PKG_VERSION").to_string(),
        file: format!("{BUILD_PREFIX}{}-{}", std::env::consts::OS, std::env::consts::ARCH),
        path,
    })
}

/// Every agent build the hub serves, highest version first.
pub fn builds(config: &InstallerConfig) -> Vec<AgentBuild> {
    let mut builds = Vec::new();
    if let Some(dir) = &config.downloads_dir {
        for version_dir in read_dir(dir) {
            let Some(version) = version_dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
            if !valid_version(&version) || !version_dir.is_dir() {
                continue;
            }
            for path in read_dir(&version_dir) {
                let Some(file) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
                if valid_build_file(&file) && path.is_file() {
                    builds.push(AgentBuild { version: version.clone(), file, path });
                }
            }
        }
    }
    if config.serve_own_agent {
        if let Some(own) = own_agent() {
            if !builds.iter().any(|b| b.version == own.version) {
                builds.push(own);
            }
        }
    }
    builds.sort_by(|a, b| version_order(&b.version, &a.version).then_with(|| a.file.cmp(&b.file)));
    builds
}

fn read_dir(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default()
}

/// The highest version served, with its file names.
pub fn latest(config: &InstallerConfig) -> Option<(String, Vec<String>)> {
    let builds = builds(config);
    let version = builds.first()?.version.clone();
    let files = builds.iter().filter(|b| b.version == version).map(|b| b.file.clone()).collect();
    Some((version, files))
}

/// The build `file` of `version`, if served.
pub fn build(config: &InstallerConfig, version: &str, file: &str) -> Option<AgentBuild> {
    builds(config).into_iter().find(|b| b.version == version && b.file == file)
}

/// `SHA256SUMS` of `version`: the folder's own file when it has one (as a release made
/// it), else computed from the builds (`<hex>  <file>` lines, as `sha256sum` writes them).
pub fn sha256sums(config: &InstallerConfig, version: &str) -> std::io::Result<Option<String>> {
    let builds: Vec<AgentBuild> = builds(config).into_iter().filter(|b| b.version == version).collect();
    let Some(first) = builds.first() else { return Ok(None) };
    let given = first.path.with_file_name(SHA256SUMS);
    if config.downloads_dir.as_deref().is_some_and(|dir| given.starts_with(dir)) && given.is_file() {
        return std::fs::read_to_string(&given).map(Some);
    }
    let mut text = String::new();
    for build in &builds {
        let mut hasher = Sha256::new();
        std::io::copy(&mut std::fs::File::open(&build.path)?, &mut hasher)?;
        text.push_str(&format!("{}  {}\n", hex(&hasher.finalize()), build.file));
    }
    Ok(Some(text))
}

// ---- tokens ----

/// Why a token cannot be used at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenProblem {
    #[error("{0}")]
    Malformed(String),
    #[error("enrollment token is unknown or its secret does not match")]
    Unknown,
}

/// The stored token whose text is `text`, its secret checked in constant time. Expired,
/// spent and revoked tokens are returned too: they still prove who holds them.
pub fn authenticate(hub: &Hub, text: &str) -> Result<Token, TokenProblem> {
    let token = EnrollmentToken::parse(text).map_err(|e| TokenProblem::Malformed(e.to_string()))?;
    let stored = hub.store.token(&token.id).ok().flatten().ok_or(TokenProblem::Unknown)?;
    let presented = hex(&Sha256::digest(token.secret.as_bytes()));
    if !bool::from(presented.as_bytes().ct_eq(stored.secret_sha256.as_bytes())) {
        return Err(TokenProblem::Unknown);
    }
    Ok(stored)
}

/// Why `token` could not enroll one more agent now, if it could not (the checks
/// `store::enroll` makes, read without writing).
pub fn enroll_refusal(hub: &Hub, token: &Token, now_ms: i64) -> Result<Option<String>, crate::store::Error> {
    if token.revoked {
        return Ok(Some("enrollment token was revoked; ask the operator for a new one".into()));
    }
    if token.expires_at_ms <= now_ms {
        return Ok(Some("enrollment token expired; ask the operator for a new one".into()));
    }
    if token.uses_left == 0 {
        return Ok(Some("enrollment token has been used up; ask the operator for a new one".into()));
    }
    let Some(org) = hub.store.org(&token.org)? else {
        return Ok(Some("organisation no longer exists".into()));
    };
    if org.suspended {
        return Ok(Some("organisation is suspended".into()));
    }
    if org.agent_count >= org.agent_limit {
        return Ok(Some(format!("organisation has reached its limit of {} agents", org.agent_limit)));
    }
    Ok(None)
}

/// The org's plan (`id` and version) and the host requirements it sets, or the hub's
/// default ones.
pub fn requirements(hub: &Hub, org: &str) -> Result<(Option<String>, HostRequirements), crate::store::Error> {
    let Some(subscription) = crate::billing::plans::subscription(hub, org)? else {
        return Ok((None, hub.config.installer.requirements));
    };
    let plan = hub.store.plan_version(&subscription.plan_id, subscription.plan_version)?;
    let requirements = plan.as_ref().and_then(|p| p.limits.agent_host).unwrap_or(hub.config.installer.requirements);
    Ok((Some(subscription.plan_id), requirements))
}

// ---- enrolled machines ----

/// The agent `id`, if `certificate_sha256` (hex) is the SHA-256 of the certificate (DER) the
/// hub last saw it use; `None` for an unknown agent and for any other certificate alike.
///
/// This is how the installer on a machine that is already enrolled identifies itself
/// without a token: the certificate lives in the agent's state directory, readable by root
/// only, and after a renewal the file and the hub's record change together. It reads that
/// one agent's status and its org's install facts; it enrolls and revokes nothing.
pub fn authenticate_agent(hub: &Hub, id: &str, certificate_sha256: &str) -> Result<Option<Agent>, crate::store::Error> {
    let Some(agent) = hub.store.agent(id)? else { return Ok(None) };
    let presented = certificate_sha256.trim().to_ascii_lowercase();
    Ok(bool::from(presented.as_bytes().ct_eq(agent.cert_sha256.as_bytes())).then_some(agent))
}

// ---- deregistration ----

/// Why a deregistration request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeregisterProblem {
    #[error("certificate is not valid PEM")]
    BadCertificate,
    #[error("certificate is not the one this agent uses")]
    WrongCertificate,
    #[error("request was signed {0} s away from the hub's clock (at most 300 s); check this machine's clock")]
    Stale(i64),
    #[error("signature does not verify")]
    BadSignature,
}

/// Check a request to revoke `agent`, signed by its own key: the certificate must be the one
/// the hub last saw it use, the time near the hub's, and the signature valid over
/// [`gantry_agent::deregister::signed_text`].
pub fn check_deregister(agent: &Agent, certificate_pem: &str, issued_at_ms: i64, signature_hex: &str, now_ms: i64) -> Result<(), DeregisterProblem> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let cert = CertificateDer::from_pem_slice(certificate_pem.as_bytes()).map_err(|_| DeregisterProblem::BadCertificate)?;
    let presented = hex(&Sha256::digest(cert.as_ref()));
    if !bool::from(presented.as_bytes().ct_eq(agent.cert_sha256.as_bytes())) {
        return Err(DeregisterProblem::WrongCertificate);
    }
    let skew = now_ms.saturating_sub(issued_at_ms);
    if skew.abs() > DEREGISTER_WINDOW_MS {
        return Err(DeregisterProblem::Stale(skew / 1000));
    }
    let signature = unhex(signature_hex).ok_or(DeregisterProblem::BadSignature)?;
    let public_key = {
        use x509_parser::prelude::*;
        let (_, parsed) = X509Certificate::from_der(cert.as_ref()).map_err(|_| DeregisterProblem::BadCertificate)?;
        parsed.public_key().subject_public_key.data.to_vec()
    };
    let text = gantry_agent::deregister::signed_text(&agent.id, issued_at_ms);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, &public_key)
        .verify(text.as_bytes(), &signature)
        .map_err(|_| DeregisterProblem::BadSignature)
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 1024 {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_numerically_and_names_are_checked() {
        assert_eq!(version_order("0.10.0", "0.9.1"), std::cmp::Ordering::Greater);
        assert_eq!(version_order("1.2.0", "1.2.0"), std::cmp::Ordering::Equal);
        assert!(valid_version("0.2.0") && valid_version("1.0.0-rc.1"));
        assert!(!valid_version("../etc") && !valid_version("latest") && !valid_version("0.1/x") && !valid_version("0..1"));
        assert!(valid_build_file("gantry-agent-linux-x86_64") && valid_build_file("gantry-agent-linux-aarch64"));
        assert!(!valid_build_file("gantry-agent-linux") && !valid_build_file("gantry-hub-linux-x86_64") && !valid_build_file("gantry-agent-linux-x86/64"));
    }

    #[test]
    fn builds_come_from_version_folders_highest_first_with_their_sums() {
        let dir = std::env::temp_dir().join(format!("gantry-downloads-{}", rand::random::<u64>()));
        for (version, body) in [("0.9.0", "old"), ("0.10.0", "new")] {
            std::fs::create_dir_all(dir.join(version)).unwrap();
            std::fs::write(dir.join(version).join("gantry-agent-linux-x86_64"), body).unwrap();
        }
        std::fs::write(dir.join("0.10.0").join("notes.txt"), "ignored").unwrap();
        std::fs::create_dir_all(dir.join("nightly")).unwrap();
        let config = InstallerConfig { downloads_dir: Some(dir.clone()), serve_own_agent: false, ..InstallerConfig::default() };
        assert_eq!(latest(&config), Some(("0.10.0".to_string(), vec!["gantry-agent-linux-x86_64".to_string()])));
        let sums = sha256sums(&config, "0.10.0").unwrap().unwrap();
        assert_eq!(sums, format!("{}  gantry-agent-linux-x86_64\n", hex(&Sha256::digest(b"new"))));
        std::fs::write(dir.join("0.9.0").join(SHA256SUMS), "given\n").unwrap();
        assert_eq!(sha256sums(&config, "0.9.0").unwrap().as_deref(), Some("given\n"));
        assert_eq!(sha256sums(&config, "0.8.0").unwrap(), None);
        assert!(build(&config, "0.9.0", "gantry-agent-linux-x86_64").is_some());
        assert!(build(&config, "0.9.0", "gantry-agent-linux-aarch64").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
