//! The hub's certificate authority: creates the CA and the QUIC server certificate at init,
//! signs agent CSRs at enrollment and renewal, and reads agent identity back out of a
//! presented client certificate.
//!
//! Keys live as PEM files in `DATA/pki/` (mode 0600), outside the store, so a store dump
//! never carries key material. This module must not touch the store or the network.
//!
//! CA continuity: besides the current CA (`ca.crt`, `ca.key`) the hub can hold a *next* CA
//! (`ca-next.crt`, `ca-next.key`, staged by [`Pki::stage_next`]) and a *retiring* one
//! (`ca-old.crt`, certificate only, left by [`Pki::promote_next`] until
//! [`Pki::retire_old`] or its expiry). Client certificates signed by any of them are
//! accepted; new agent certificates are signed by the next CA once one is staged; the
//! server certificate always comes from the current CA.

use anyhow::{bail, Context};
use gantry_agent::state::write_atomic;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use time::OffsetDateTime;

/// Lifetime of the hub CA.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of the QUIC server certificate; reissued at startup when less than a quarter is left.
pub const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates are valid from up to this long before issue, to tolerate clock skew.
pub const BACKDATE: Duration = Duration::from_secs(300);

/// Current CA certificate, in `DATA/pki/`.
pub const CA_CERT_FILE: &str = "ca.crt";
/// Current CA key (mode 0600), in `DATA/pki/`.
pub const CA_KEY_FILE: &str = "ca.key";
/// Staged next CA certificate, in `DATA/pki/`.
pub const NEXT_CA_CERT_FILE: &str = "ca-next.crt";
/// Staged next CA key (mode 0600), in `DATA/pki/`.
pub const NEXT_CA_KEY_FILE: &str = "ca-next.key";
/// The CA the last promotion replaced (certificate only: it signs nothing any more).
pub const OLD_CA_CERT_FILE: &str = "ca-old.crt";

/// What a CA the hub trusts is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CaRole {
    /// Issues the hub's server certificate; enrollment tokens pin it.
    Current,
    /// Staged by `rotate-ca`: signs new agent certificates and is announced to agents, so
    /// they trust it before it becomes current.
    Next,
    /// Replaced by the last promotion: agent certificates it signed are still accepted
    /// until `rotate-ca --retire-old` or its expiry.
    Retiring,
}

/// One CA the hub trusts, as `gantry-hub rotate-ca` and `GET /api/v1/hub/ca` show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct CaInfo {
    /// What the CA is for.
    pub role: CaRole,
    /// SHA-256 (hex) of the CA certificate: what agents and enrollment tokens pin.
    pub sha256: String,
    /// Subject common name.
    pub name: String,
    /// Start of validity, Unix seconds.
    pub not_before_unix: i64,
    /// End of validity, Unix seconds.
    pub not_after_unix: i64,
}

/// Identity read from an agent's client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub agent_id: String,
    pub org: String,
    /// SHA-256 (hex) of the certificate.
    pub cert_sha256: String,
    pub not_after_unix: i64,
}

/// An issued agent certificate.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub der: Vec<u8>,
    pub sha256: String,
    pub not_after_unix: i64,
}

/// The CA and server certificate, loaded from `DATA/pki`.
pub struct Pki {
    dir: PathBuf,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key_der: Vec<u8>,
    /// The staged next CA, if any.
    next: Option<(CertificateDer<'static>, Issuer<'static, KeyPair>)>,
    /// The CA the last promotion replaced, while it is still valid and not retired.
    old: Option<CertificateDer<'static>>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("dir", &self.dir).field("ca_sha256", &self.ca_fingerprint_hex()).finish()
    }
}

/// SHA-256 of `der` as lowercase hex.
pub fn sha256_hex(der: &[u8]) -> String {
    gantry_shared::token::hex(&Sha256::digest(der))
}

/// Validity window: from a little before now (tolerating clock skew, at most a tenth of the
/// lifetime so short-lived certificates keep their renewal point) to `lifetime` from now.
fn validity(lifetime: Duration) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (now - BACKDATE.min(lifetime / 10), now + lifetime)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // keep the serial positive
    SerialNumber::from_slice(&bytes)
}

fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

impl Pki {
    /// Whether the CA exists under `data_dir`.
    pub fn exists(data_dir: &Path) -> bool {
        data_dir.join("pki").join("ca.crt").exists()
    }

    /// Create the CA and a server certificate for `public_addr` under `data_dir/pki`.
    pub fn create(data_dir: &Path, public_addr: &str) -> anyhow::Result<Pki> {
        let dir = data_dir.join("pki");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if dir.join("ca.crt").exists() {
            bail!("a CA already exists in {}", dir.display());
        }
        let (cert_pem, key_pem) = new_ca("Gantry Hub CA")?;
        write_atomic(&dir.join(CA_KEY_FILE), key_pem.as_bytes())?;
        std::fs::write(dir.join(CA_CERT_FILE), cert_pem).context("writing ca.crt")?;
        let mut pki = Pki::load(data_dir)?;
        pki.issue_server_cert(public_addr)?;
        Ok(pki)
    }

    /// Load the CAs and server certificate from `data_dir/pki` (finishing a promotion that
    /// was interrupted half-way).
    pub fn load(data_dir: &Path) -> anyhow::Result<Pki> {
        let dir = data_dir.join("pki");
        finish_promotion(&dir)?;
        let (ca_der, issuer) = load_ca(&dir, CA_CERT_FILE, CA_KEY_FILE)?;
        let next = if dir.join(NEXT_CA_CERT_FILE).exists() { Some(load_ca(&dir, NEXT_CA_CERT_FILE, NEXT_CA_KEY_FILE)?) } else { None };
        let old = match std::fs::read_to_string(dir.join(OLD_CA_CERT_FILE)) {
            Ok(pem) => pem_certs(&pem)?.into_iter().next().filter(|old| *old != ca_der && parse_not_after(old).is_some_and(|t| t > unix_now())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => return Err(error).with_context(|| format!("reading {}/{OLD_CA_CERT_FILE}", dir.display())),
        };
        let mut pki = Pki { dir, ca_der, issuer, server_chain: Vec::new(), server_key_der: Vec::new(), next, old };
        pki.load_server_cert()?;
        Ok(pki)
    }

    /// Stage a new CA as the next one under `data_dir/pki`. Refused, changing nothing,
    /// when one is staged already. Takes effect when the hub next starts.
    pub fn stage_next(data_dir: &Path) -> anyhow::Result<CaInfo> {
        let pki = Pki::load(data_dir)?;
        if let Some(next) = pki.cas().into_iter().find(|ca| ca.role == CaRole::Next) {
            bail!("a next CA ({}) is staged already; promote it with `rotate-ca --promote`; nothing changed", next.sha256);
        }
        let stamp = OffsetDateTime::now_utc();
        let name = format!("Gantry Hub CA {:04}-{:02}-{:02} {:08x}", stamp.year(), stamp.month() as u8, stamp.day(), rand::random::<u32>());
        let (cert_pem, key_pem) = new_ca(&name)?;
        // Key first: a certificate without its key is not a staged CA (load would refuse it).
        write_atomic(&pki.dir.join(NEXT_CA_KEY_FILE), key_pem.as_bytes())?;
        write_atomic(&pki.dir.join(NEXT_CA_CERT_FILE), cert_pem.as_bytes())?;
        let staged = Pki::load(data_dir)?;
        staged.cas().into_iter().find(|ca| ca.role == CaRole::Next).context("the staged CA did not load")
    }

    /// Make the staged next CA current; the current one becomes retiring (certificate
    /// only; its key is dropped). Refused, changing nothing, when no next CA is staged or
    /// the CA retired by the previous promotion is still trusted. The server certificate
    /// is reissued by the new CA when the hub next starts.
    pub fn promote_next(data_dir: &Path) -> anyhow::Result<Vec<CaInfo>> {
        let pki = Pki::load(data_dir)?;
        if pki.next.is_none() {
            bail!("no next CA is staged: run `gantry-hub rotate-ca` first, and promote once agents have learnt it; nothing changed");
        }
        if let Some(old) = pki.cas().into_iter().find(|ca| ca.role == CaRole::Retiring) {
            bail!(
                "the CA replaced by the previous promotion ({}) is still trusted; retire it first with `rotate-ca --retire-old`; nothing changed",
                old.sha256
            );
        }
        let dir = &pki.dir;
        // Order matters for crash safety: `load` finishes a promotion found between the two
        // renames (a next certificate without its key).
        write_atomic(&dir.join(OLD_CA_CERT_FILE), pem_of(&pki.ca_der).as_bytes())?;
        std::fs::rename(dir.join(NEXT_CA_KEY_FILE), dir.join(CA_KEY_FILE)).context("moving ca-next.key to ca.key")?;
        std::fs::rename(dir.join(NEXT_CA_CERT_FILE), dir.join(CA_CERT_FILE)).context("moving ca-next.crt to ca.crt")?;
        sync_dir(dir);
        Ok(Pki::load(data_dir)?.cas())
    }

    /// Stop trusting the CA the last promotion replaced: agents still holding a
    /// certificate it signed can no longer connect. Refused, changing nothing, when there
    /// is none.
    pub fn retire_old(data_dir: &Path) -> anyhow::Result<CaInfo> {
        let pki = Pki::load(data_dir)?;
        let path = pki.dir.join(OLD_CA_CERT_FILE);
        let Some(old) = pki.cas().into_iter().find(|ca| ca.role == CaRole::Retiring) else {
            // An expired leftover is trusted by nobody; tidy it away.
            let _ = std::fs::remove_file(&path);
            bail!("no retiring CA to retire; nothing changed");
        };
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        sync_dir(&pki.dir);
        Ok(old)
    }

    fn load_server_cert(&mut self) -> anyhow::Result<()> {
        let (crt, key) = (self.dir.join("server.crt"), self.dir.join("server.key"));
        if !crt.exists() || !key.exists() {
            return Ok(());
        }
        let chain = pem_certs(&std::fs::read_to_string(&crt)?)?;
        let key_pair = KeyPair::from_pem(&std::fs::read_to_string(&key)?).context("parsing server.key")?;
        self.server_chain = chain;
        self.server_key_der = key_pair.serialize_der();
        Ok(())
    }

    /// Issue (or reissue) the QUIC server certificate, naming [`gantry_shared::HUB_SERVER_NAME`]
    /// and the host of `public_addr`.
    pub fn issue_server_cert(&mut self, public_addr: &str) -> anyhow::Result<()> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut names = vec![SanType::DnsName(gantry_shared::HUB_SERVER_NAME.try_into()?)];
        let host = host_of(public_addr);
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            names.push(SanType::IpAddress(ip));
        } else if !host.is_empty() && host != gantry_shared::HUB_SERVER_NAME {
            if let Ok(name) = host.try_into() {
                names.push(SanType::DnsName(name));
            }
        }
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "Gantry Hub");
        params.subject_alt_names = names;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        (params.not_before, params.not_after) = validity(SERVER_CERT_LIFETIME);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer)?;
        let chain_pem = format!("{}{}", cert.pem(), pem_of(&self.ca_der));
        write_atomic(&self.dir.join("server.key"), key.serialize_pem().as_bytes())?;
        std::fs::write(self.dir.join("server.crt"), chain_pem).context("writing server.crt")?;
        self.load_server_cert()
    }

    /// Whether the server certificate is missing, was not issued by the current CA (after a
    /// promotion), or has less than a quarter of its life left.
    pub fn server_cert_needs_renewal(&self) -> bool {
        let Some(leaf) = self.server_chain.first() else { return true };
        if self.server_chain.get(1) != Some(&self.ca_der) {
            return true;
        }
        match parse_not_after(leaf) {
            Some(not_after) => {
                let left = not_after - OffsetDateTime::now_utc().unix_timestamp();
                left < (SERVER_CERT_LIFETIME.as_secs() / 4) as i64
            }
            None => true,
        }
    }

    /// The CA certificate (DER).
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// SHA-256 of the CA certificate: what enrollment tokens carry.
    pub fn ca_sha256(&self) -> [u8; 32] {
        Sha256::digest(self.ca_der.as_ref()).into()
    }

    /// SHA-256 (hex) of the current CA certificate.
    pub fn ca_fingerprint_hex(&self) -> String {
        sha256_hex(self.ca_der.as_ref())
    }

    /// The CA that signs agent certificates now: the next one once staged, else the
    /// current one. Enrollment and renewal replies end their chain with it.
    pub fn signing_ca_der(&self) -> &CertificateDer<'static> {
        self.next.as_ref().map_or(&self.ca_der, |(der, _)| der)
    }

    /// Every CA whose agent certificates are accepted: current, next, retiring.
    pub fn trusted_ders(&self) -> Vec<CertificateDer<'static>> {
        let mut out = vec![self.ca_der.clone()];
        out.extend(self.next.as_ref().map(|(der, _)| der.clone()));
        out.extend(self.old.clone());
        out
    }

    /// Every CA the hub trusts, with its role, current first.
    pub fn cas(&self) -> Vec<CaInfo> {
        let mut out = vec![ca_info(CaRole::Current, &self.ca_der)];
        out.extend(self.next.as_ref().map(|(der, _)| ca_info(CaRole::Next, der)));
        out.extend(self.old.as_ref().map(|der| ca_info(CaRole::Retiring, der)));
        out
    }

    /// Server certificate chain and key for the QUIC listener.
    pub fn server_identity(&self) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        if self.server_chain.is_empty() {
            bail!("no server certificate in {}", self.dir.display());
        }
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone()));
        Ok((self.server_chain.clone(), key))
    }

    /// Sign an agent's CSR. Subject and extensions come from the hub, never from the CSR:
    /// only the public key is taken from it (its self-signature proves possession).
    pub fn sign_agent_csr(&self, csr_der: &[u8], agent_id: &str, org: &str, lifetime: Duration) -> Result<IssuedCert, String> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into()).map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, agent_id);
        params.distinguished_name.push(DnType::OrganizationName, org);
        params.subject_alt_names = vec![SanType::URI(format!("gantry://agent/{org}/{agent_id}").try_into().map_err(|e: rcgen::Error| e.to_string())?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        (params.not_before, params.not_after) = validity(lifetime);
        params.serial_number = Some(random_serial());
        let not_after_unix = params.not_after.unix_timestamp();
        let issuer = self.next.as_ref().map_or(&self.issuer, |(_, issuer)| issuer);
        let cert = params.signed_by(&csr.public_key, issuer).map_err(|e| e.to_string())?;
        let der = cert.der().to_vec();
        Ok(IssuedCert { sha256: sha256_hex(&der), der, not_after_unix })
    }
}

/// Read the agent id (common name) and org (organisation) from a client certificate that
/// rustls already verified against the CA.
pub fn agent_identity(cert: &[u8]) -> Option<AgentIdentity> {
    use x509_parser::prelude::*;
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    let subject = parsed.subject();
    let agent_id = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    let org = subject.iter_organization().next()?.as_str().ok()?.to_string();
    Some(AgentIdentity { agent_id, org, cert_sha256: sha256_hex(cert), not_after_unix: parsed.validity().not_after.timestamp() })
}

/// A new self-signed CA named `name`: (certificate PEM, key PEM).
fn new_ca(name: &str) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    (params.not_before, params.not_after) = validity(CA_LIFETIME);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The CA certificate and its signing key from two files in `dir`.
fn load_ca(dir: &Path, cert_file: &str, key_file: &str) -> anyhow::Result<(CertificateDer<'static>, Issuer<'static, KeyPair>)> {
    let ca_pem = std::fs::read_to_string(dir.join(cert_file)).with_context(|| format!("reading {}/{cert_file}", dir.display()))?;
    let key_pem = std::fs::read_to_string(dir.join(key_file)).with_context(|| format!("reading {}/{key_file}", dir.display()))?;
    let key = KeyPair::from_pem(&key_pem).with_context(|| format!("parsing {key_file}"))?;
    let ca_der = pem_certs(&ca_pem)?.into_iter().next().with_context(|| format!("{cert_file} holds no certificate"))?;
    if !public_key_matches(&ca_der, &key) {
        bail!("{}/{key_file} is not the key of {cert_file}", dir.display());
    }
    let issuer = Issuer::from_ca_cert_der(&ca_der, key).with_context(|| format!("loading the CA certificate {cert_file}"))?;
    Ok((ca_der, issuer))
}

fn public_key_matches(cert: &[u8], key: &KeyPair) -> bool {
    use x509_parser::prelude::*;
    X509Certificate::from_der(cert).is_ok_and(|(_, parsed)| parsed.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

/// Roll forward a promotion interrupted between its two renames: `ca.key` is already the
/// next CA's key and `ca-next.crt` is left without its key.
fn finish_promotion(dir: &Path) -> anyhow::Result<()> {
    let (next_crt, next_key) = (dir.join(NEXT_CA_CERT_FILE), dir.join(NEXT_CA_KEY_FILE));
    if next_crt.exists() && !next_key.exists() {
        let key = KeyPair::from_pem(&std::fs::read_to_string(dir.join(CA_KEY_FILE)).context("reading ca.key")?).context("parsing ca.key")?;
        let next = pem_certs(&std::fs::read_to_string(&next_crt).context("reading ca-next.crt")?)?;
        if next.first().is_some_and(|der| public_key_matches(der, &key)) {
            std::fs::rename(&next_crt, dir.join(CA_CERT_FILE)).context("finishing the CA promotion")?;
            sync_dir(dir);
            tracing::warn!("finished a CA promotion that was interrupted");
        } else {
            bail!("{} has no key beside it; restore ca-next.key or remove ca-next.crt", next_crt.display());
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
}

fn unix_now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn ca_info(role: CaRole, der: &[u8]) -> CaInfo {
    use x509_parser::prelude::*;
    let parsed = X509Certificate::from_der(der).ok().map(|(_, c)| c);
    let name = parsed.as_ref().and_then(|c| c.subject().iter_common_name().next().and_then(|n| n.as_str().ok()).map(String::from)).unwrap_or_default();
    let (not_before_unix, not_after_unix) =
        parsed.as_ref().map(|c| (c.validity().not_before.timestamp(), c.validity().not_after.timestamp())).unwrap_or_default();
    CaInfo { role, sha256: sha256_hex(der), name, not_before_unix, not_after_unix }
}

fn parse_not_after(cert: &[u8]) -> Option<i64> {
    use x509_parser::prelude::*;
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// PEM text of one DER certificate.
pub fn pem_of(der: &[u8]) -> String {
    gantry_agent::state::pem_of("CERTIFICATE", der)
}

/// Every certificate in a PEM text.
pub fn pem_certs(pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>().map_err(|e| anyhow::anyhow!("parsing PEM certificates: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn signs_a_csr_with_the_hub_chosen_identity() {
        let dir = std::env::temp_dir().join(format!("gantry-pki-{}", rand::random::<u64>()));
        let pki = Pki::create(&dir, "127.0.0.1:7443").unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "pretend-to-be-someone-else");
        let csr = params.serialize_request(&key).unwrap();
        let issued = pki.sign_agent_csr(csr.der(), "agt_1", "acme", Duration::from_secs(3600)).unwrap();
        let id = agent_identity(&issued.der).unwrap();
        assert_eq!((id.agent_id.as_str(), id.org.as_str()), ("agt_1", "acme"));
        assert_eq!(id.cert_sha256, issued.sha256);
        assert!(pki.sign_agent_csr(b"garbage", "a", "b", Duration::from_secs(1)).is_err());
        let reloaded = Pki::load(&dir).unwrap();
        assert_eq!(reloaded.ca_fingerprint_hex(), pki.ca_fingerprint_hex());
        assert!(!reloaded.server_cert_needs_renewal());
        let _ = std::fs::remove_dir_all(dir);
    }

    fn pki_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(dir.join("pki"))
            .unwrap()
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
            .collect();
        files.sort();
        files
    }

    fn roles(pki: &Pki) -> Vec<(CaRole, String)> {
        pki.cas().into_iter().map(|ca| (ca.role, ca.sha256)).collect()
    }

    #[test]
    fn a_ca_rotation_stages_promotes_and_retires() {
        let dir = std::env::temp_dir().join(format!("gantry-pki-{}", rand::random::<u64>()));
        let first = Pki::create(&dir, "127.0.0.1:7443").unwrap();
        let ca1 = first.ca_fingerprint_hex();
        let untouched = pki_files(&dir);
        let refused = format!("{:#}", Pki::promote_next(&dir).unwrap_err());
        assert!(refused.contains("no next CA is staged") && refused.contains("nothing changed"), "{refused}");
        assert!(Pki::retire_old(&dir).is_err());
        assert_eq!(pki_files(&dir), untouched);

        let ca2 = Pki::stage_next(&dir).unwrap().sha256;
        assert!(Pki::stage_next(&dir).is_err(), "one next CA at a time");
        let staged = Pki::load(&dir).unwrap();
        assert_eq!(roles(&staged), vec![(CaRole::Current, ca1.clone()), (CaRole::Next, ca2.clone())]);
        assert_eq!(sha256_hex(staged.signing_ca_der()), ca2);
        assert!(!staged.server_cert_needs_renewal(), "the server certificate stays with the current CA");
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default().serialize_request(&key).unwrap();
        let issued = staged.sign_agent_csr(csr.der(), "agt_1", "acme", Duration::from_secs(3600)).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(staged.trusted_ders().into_iter().fold(rustls::RootCertStore::empty(), |mut roots, ca| {
                roots.add(ca).unwrap();
                roots
            })),
            gantry_agent::tls::provider(),
        )
        .build()
        .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        assert!(verifier.verify_client_cert(&CertificateDer::from(issued.der.clone()), &[], now).is_ok(), "signed by the next CA and accepted");

        let after = Pki::promote_next(&dir).unwrap();
        assert_eq!(
            after.iter().map(|ca| (ca.role, ca.sha256.clone())).collect::<Vec<_>>(),
            vec![(CaRole::Current, ca2.clone()), (CaRole::Retiring, ca1.clone())]
        );
        let mut promoted = Pki::load(&dir).unwrap();
        assert!(promoted.server_cert_needs_renewal(), "the server certificate must come from the new CA");
        promoted.issue_server_cert("127.0.0.1:7443").unwrap();
        assert!(!Pki::load(&dir).unwrap().server_cert_needs_renewal());
        assert!(!dir.join("pki").join(NEXT_CA_KEY_FILE).exists() && !dir.join("pki").join(OLD_CA_CERT_FILE).with_extension("key").exists());
        let before = pki_files(&dir);
        Pki::stage_next(&dir).unwrap();
        let refused = format!("{:#}", Pki::promote_next(&dir).unwrap_err());
        assert!(refused.contains("retire it first"), "{refused}");
        std::fs::remove_file(dir.join("pki").join(NEXT_CA_CERT_FILE)).unwrap();
        std::fs::remove_file(dir.join("pki").join(NEXT_CA_KEY_FILE)).unwrap();
        assert_eq!(pki_files(&dir), before);

        assert_eq!(Pki::retire_old(&dir).unwrap().sha256, ca1);
        assert_eq!(roles(&Pki::load(&dir).unwrap()), vec![(CaRole::Current, ca2)]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_promotion_interrupted_between_its_renames_is_finished_at_load() {
        let dir = std::env::temp_dir().join(format!("gantry-pki-{}", rand::random::<u64>()));
        let first = Pki::create(&dir, "127.0.0.1:7443").unwrap();
        let ca2 = Pki::stage_next(&dir).unwrap().sha256;
        let pki = dir.join("pki");
        // The first steps of `promote_next`, then a crash.
        write_atomic(&pki.join(OLD_CA_CERT_FILE), pem_of(first.ca_der()).as_bytes()).unwrap();
        std::fs::rename(pki.join(NEXT_CA_KEY_FILE), pki.join(CA_KEY_FILE)).unwrap();
        let loaded = Pki::load(&dir).unwrap();
        assert_eq!(roles(&loaded), vec![(CaRole::Current, ca2), (CaRole::Retiring, first.ca_fingerprint_hex())]);
        assert!(!pki.join(NEXT_CA_CERT_FILE).exists());

        // A next certificate whose key is simply missing is reported, not guessed at.
        Pki::stage_next(&dir).unwrap();
        std::fs::remove_file(pki.join(NEXT_CA_KEY_FILE)).unwrap();
        let error = format!("{:#}", Pki::load(&dir).unwrap_err());
        assert!(error.contains("ca-next.crt has no key beside it"), "{error}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
