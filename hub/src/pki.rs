//! The hub's certificate authority: creates the CA and the QUIC server certificate at init,
//! signs agent CSRs at enrollment and renewal, and reads agent identity back out of a
//! presented client certificate.
//!
//! Keys live as PEM files in `DATA/pki/` (mode 0600), outside the store, so a store dump
//! never carries key material. This module must not touch the store or the network.

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
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "Gantry Hub CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        (params.not_before, params.not_after) = validity(CA_LIFETIME);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        write_atomic(&dir.join("ca.key"), key.serialize_pem().as_bytes())?;
        std::fs::write(dir.join("ca.crt"), cert.pem()).context("writing ca.crt")?;
        let mut pki = Pki::load(data_dir)?;
        pki.issue_server_cert(public_addr)?;
        Ok(pki)
    }

    /// Load the CA and server certificate from `data_dir/pki`.
    pub fn load(data_dir: &Path) -> anyhow::Result<Pki> {
        let dir = data_dir.join("pki");
        let ca_pem = std::fs::read_to_string(dir.join("ca.crt")).with_context(|| format!("reading {}/ca.crt", dir.display()))?;
        let key_pem = std::fs::read_to_string(dir.join("ca.key")).with_context(|| format!("reading {}/ca.key", dir.display()))?;
        let key = KeyPair::from_pem(&key_pem).context("parsing ca.key")?;
        let ca_der = pem_certs(&ca_pem)?.into_iter().next().context("ca.crt holds no certificate")?;
        let issuer = Issuer::from_ca_cert_der(&ca_der, key).context("loading the CA certificate")?;
        let mut pki = Pki { dir, ca_der, issuer, server_chain: Vec::new(), server_key_der: Vec::new() };
        pki.load_server_cert()?;
        Ok(pki)
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

    /// Whether the server certificate is missing or has less than a quarter of its life left.
    pub fn server_cert_needs_renewal(&self) -> bool {
        let Some(leaf) = self.server_chain.first() else { return true };
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

    pub fn ca_fingerprint_hex(&self) -> String {
        sha256_hex(self.ca_der.as_ref())
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
        let cert = params.signed_by(&csr.public_key, &self.issuer).map_err(|e| e.to_string())?;
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
}
