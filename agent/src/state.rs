//! The agent's state directory: its identity, key and certificate.
//!
//! Files: `identity.json` (agent id, org, hub address, pinned CA fingerprints),
//! `agent.key` and `agent.crt` (mode 0600), `ca.crt`. Every write goes to a temporary file
//! that is synced and renamed, so a crash leaves either the old or the new file, never a
//! torn one. `identity.json` is written last: its presence means enrollment completed.

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/gantry-agent";

/// Who this agent is, as enrolled.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub agent_id: String,
    pub org: String,
    /// `HOST:PORT` of the hub.
    pub hub_addr: String,
    /// SHA-256 (hex) of the hub CA certificate, pinned at enrollment.
    pub ca_sha256: String,
    pub labels: Vec<(String, String)>,
    pub enrolled_at_unix: i64,
    /// SHA-256 (hex) of further hub CAs, learnt from the hub itself over a verified session
    /// (a CA rotation staged or done); the hub is trusted when its certificate chains to
    /// any pinned CA.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_ca_sha256: Vec<String>,
}

/// Most extra CA fingerprints an identity keeps; the oldest go first.
pub const MAX_EXTRA_CAS: usize = 4;

impl Identity {
    /// The pinned fingerprint as bytes.
    pub fn ca_sha256_bytes(&self) -> anyhow::Result<[u8; 32]> {
        fingerprint_bytes(&self.ca_sha256)
    }

    /// Every pinned CA fingerprint: the one from the enrollment token, then those learnt
    /// since.
    pub fn pinned_cas(&self) -> anyhow::Result<Vec<[u8; 32]>> {
        let mut out = vec![self.ca_sha256_bytes()?];
        for text in &self.extra_ca_sha256 {
            let fingerprint = fingerprint_bytes(text)?;
            if !out.contains(&fingerprint) {
                out.push(fingerprint);
            }
        }
        Ok(out)
    }

    /// Pin the CAs in `announced` (hex fingerprints; malformed ones are skipped) besides
    /// those pinned already, keeping at most [`MAX_EXTRA_CAS`] extra ones. Whether anything
    /// changed.
    pub fn learn_cas<'a>(&mut self, announced: impl IntoIterator<Item = &'a str>) -> bool {
        let mut changed = false;
        for text in announced {
            let text = text.to_ascii_lowercase();
            if fingerprint_bytes(&text).is_err() || text == self.ca_sha256 || self.extra_ca_sha256.contains(&text) {
                continue;
            }
            self.extra_ca_sha256.push(text);
            changed = true;
        }
        let excess = self.extra_ca_sha256.len().saturating_sub(MAX_EXTRA_CAS);
        self.extra_ca_sha256.drain(..excess);
        changed
    }
}

/// A SHA-256 fingerprint from 64 hex digits.
fn fingerprint_bytes(text: &str) -> anyhow::Result<[u8; 32]> {
    let text = text.as_bytes();
    anyhow::ensure!(text.len() == 64, "identity.json: CA fingerprints must be 64 hex digits");
    let mut out = [0u8; 32];
    for (i, pair) in text.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair)?;
        out[i] = u8::from_str_radix(s, 16).context("identity.json: a CA fingerprint is not hex")?;
    }
    Ok(out)
}

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir { dir: dir.into() }
    }
    pub fn identity_path(&self) -> PathBuf {
        self.dir.join("identity.json")
    }
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("agent.key")
    }
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("agent.crt")
    }
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn is_enrolled(&self) -> bool {
        self.identity_path().exists()
    }

    pub fn create(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&self.dir).with_context(|| format!("creating state directory {}", self.dir.display()))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700)).with_context(|| format!("restricting {}", self.dir.display()))
    }

    pub fn load_identity(&self) -> anyhow::Result<Identity> {
        let path = self.identity_path();
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn save_identity(&self, identity: &Identity) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(identity)?;
        write_atomic(&self.identity_path(), text.as_bytes())
    }

    /// Save a certificate chain (leaf first) and, if given, its key.
    pub fn save_credentials(&self, chain_der: &[Vec<u8>], key_pem: Option<&str>) -> anyhow::Result<()> {
        if let Some(key) = key_pem {
            write_atomic(&self.key_path(), key.as_bytes())?;
        }
        let pem: String = chain_der.iter().map(|der| pem_of("CERTIFICATE", der)).collect();
        write_atomic(&self.cert_path(), pem.as_bytes())?;
        if let Some(ca) = chain_der.last() {
            write_atomic(&self.ca_path(), pem_of("CERTIFICATE", ca).as_bytes())?;
        }
        Ok(())
    }

    /// Load the certificate chain and key for a session.
    pub fn load_credentials(&self) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        use rustls::pki_types::pem::PemObject;
        let chain = CertificateDer::pem_file_iter(self.cert_path())
            .with_context(|| format!("reading {}", self.cert_path().display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("parsing {}: {e:?}", self.cert_path().display()))?;
        anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", self.cert_path().display());
        let key = PrivateKeyDer::from_pem_file(self.key_path()).map_err(|e| anyhow::anyhow!("reading {}: {e:?}", self.key_path().display()))?;
        Ok((chain, key))
    }
}

/// PEM text of one DER object.
pub fn pem_of(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Write `bytes` to `path` with mode 0600 through a synced temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    if let Some(parent) = path.parent() {
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// `notBefore` and `notAfter` of a DER certificate, in Unix seconds.
pub fn validity(cert: &[u8]) -> Option<(i64, i64)> {
    use x509_parser::prelude::*;
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    Some((parsed.validity().not_before.timestamp(), parsed.validity().not_after.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            agent_id: "agt_1".into(),
            org: "acme".into(),
            hub_addr: "hub:7443".into(),
            ca_sha256: "aa".repeat(32),
            labels: vec![],
            enrolled_at_unix: 0,
            extra_ca_sha256: vec![],
        }
    }

    #[test]
    fn learnt_cas_are_added_checked_and_capped() {
        let mut id = identity();
        assert!(!id.learn_cas(["aa".repeat(32).as_str(), "not hex", "bb"]), "the enrolled CA and malformed values add nothing");
        assert!(id.learn_cas(["BB".repeat(32).as_str()]));
        assert!(!id.learn_cas(["bb".repeat(32).as_str()]), "already pinned");
        assert_eq!(id.pinned_cas().unwrap(), vec![[0xaa; 32], [0xbb; 32]]);
        let many: Vec<String> = ["c", "d", "e", "f"].iter().map(|d| d.repeat(64)).collect();
        assert!(id.learn_cas(many.iter().map(String::as_str)));
        assert_eq!(id.extra_ca_sha256, many, "the oldest learnt CA goes first");
        assert_eq!(id.pinned_cas().unwrap()[0], [0xaa; 32], "the enrolled CA is always kept");
    }

    #[test]
    fn identities_without_learnt_cas_read_and_write_as_before() {
        let old =
            r#"{"agent_id":"agt_1","org":"acme","hub_addr":"hub:7443","ca_sha256":"AA","labels":[],"enrolled_at_unix":0}"#.replace("AA", &"aa".repeat(32));
        let parsed: Identity = serde_json::from_str(&old).unwrap();
        assert_eq!(parsed, identity());
        assert!(!serde_json::to_string(&parsed).unwrap().contains("extra_ca_sha256"));
    }
}
