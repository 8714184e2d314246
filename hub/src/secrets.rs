//! Encryption at rest for org secrets, registry passwords, webhook signing secrets and users'
//! TOTP secrets.
//!
//! Values are sealed with AES-256-GCM under a key kept in its own file, outside the store
//! (`secrets_key_file`, by default `DATA/pki/secrets.key`, mode 0600), so a copy of the
//! store alone reveals no secret. Each sealed value is `nonce (12 bytes) || ciphertext ||
//! tag`, bound to its place by associated data (`org`, kind, name): a sealed value copied
//! to another record does not open.
//!
//! The key's id (a digest prefix) is written to the store with the first sealed value; a
//! hub started with a different key file refuses to start rather than fail each deploy.

use anyhow::{bail, Context};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::path::{Path, PathBuf};

/// Length of the key file's contents, in bytes.
const KEY_LEN: usize = 32;

/// Sealing key for secrets.
pub struct SecretBox {
    key: LessSafeKey,
    id: String,
    path: PathBuf,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBox").field("id", &self.id).field("path", &self.path).finish_non_exhaustive()
    }
}

/// What a sealed value belongs to; part of the associated data.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Secret,
    RegistryPassword,
    /// A webhook endpoint's signing secret, named by the endpoint id.
    Webhook,
    /// A user's TOTP secret, named by the user id (with no org).
    Totp,
}

fn aad(org: &str, kind: Kind, name: &str) -> Vec<u8> {
    let kind = match kind {
        Kind::Secret => "secret",
        Kind::RegistryPassword => "registry",
        Kind::Webhook => "webhook",
        Kind::Totp => "totp",
    };
    format!("gantry-v1\0{org}\0{kind}\0{name}").into_bytes()
}

impl SecretBox {
    /// Load the key at `path`, creating it (mode 0600) when `create` is set and it does not
    /// exist. A file of the wrong size is refused.
    pub fn load(path: &Path, create: bool) -> anyhow::Result<SecretBox> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let mut key = [0u8; KEY_LEN];
                SystemRandom::new().fill(&mut key).map_err(|_| anyhow::anyhow!("no system randomness"))?;
                write_new_private(path, &key)?;
                key.to_vec()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("secrets key file {} is missing; the store's secrets cannot be read without it (restore it from your backup)", path.display())
            }
            Err(e) => return Err(e).with_context(|| format!("reading secrets key file {}", path.display())),
        };
        if bytes.len() != KEY_LEN {
            bail!("secrets key file {} holds {} bytes; expected {KEY_LEN}", path.display(), bytes.len());
        }
        let id = crate::pki::sha256_hex(&bytes)[..16].to_string();
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| anyhow::anyhow!("bad secrets key"))?);
        Ok(SecretBox { key, id, path: path.to_path_buf() })
    }

    /// Short public id of the key (a digest prefix), to tell keys apart.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seal `plain` for the record (`org`, `kind`, `name`).
    pub fn seal(&self, org: &str, kind: Kind, name: &str, plain: &[u8]) -> anyhow::Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| anyhow::anyhow!("no system randomness"))?;
        let mut out = plain.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad(org, kind, name)), &mut out)
            .map_err(|_| anyhow::anyhow!("sealing failed"))?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&out);
        Ok(sealed)
    }

    /// Open a value sealed for (`org`, `kind`, `name`); fails on any tampering, on a value
    /// of another record, or under another key.
    pub fn open(&self, org: &str, kind: Kind, name: &str, sealed: &[u8]) -> anyhow::Result<Vec<u8>> {
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            bail!("sealed value is too short");
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| anyhow::anyhow!("bad nonce"))?;
        let mut buf = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad(org, kind, name)), &mut buf)
            .map_err(|_| anyhow::anyhow!("sealed value does not open with key {} (wrong key file, or the store was altered)", self.id))?;
        Ok(plain.to_vec())
    }
}

/// Write `bytes` to a new file readable by the owner only; refuses to overwrite.
fn write_new_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating secrets key file {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_key(create: bool) -> (SecretBox, PathBuf) {
        let dir = std::env::temp_dir().join(format!("gantry-secrets-{}", rand::random::<u64>()));
        let path = dir.join("secrets.key");
        (SecretBox::load(&path, create).unwrap(), path)
    }

    #[test]
    fn sealed_values_open_only_in_their_place_and_under_their_key() {
        let (sb, path) = temp_key(true);
        let sealed = sb.seal("acme", Kind::Secret, "db-password", b"hunter2").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"), "the value is not stored in clear");
        assert_eq!(sb.open("acme", Kind::Secret, "db-password", &sealed).unwrap(), b"hunter2");
        // Another record, another kind, another org: refused.
        assert!(sb.open("acme", Kind::Secret, "other", &sealed).is_err());
        assert!(sb.open("acme", Kind::RegistryPassword, "db-password", &sealed).is_err());
        assert!(sb.open("evil", Kind::Secret, "db-password", &sealed).is_err());
        // A flipped bit: refused.
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(sb.open("acme", Kind::Secret, "db-password", &flipped).is_err());
        assert!(sb.open("acme", Kind::Secret, "db-password", &sealed[..10]).is_err());
        // The same file loads the same key; another key does not open it.
        let again = SecretBox::load(&path, false).unwrap();
        assert_eq!(again.id(), sb.id());
        assert_eq!(again.open("acme", Kind::Secret, "db-password", &sealed).unwrap(), b"hunter2");
        let (other, _) = temp_key(true);
        assert_ne!(other.id(), sb.id());
        assert!(other.open("acme", Kind::Secret, "db-password", &sealed).unwrap_err().to_string().contains("wrong key file"));
        // The key file is private.
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn missing_or_malformed_key_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("gantry-secrets-{}", rand::random::<u64>()));
        let missing = SecretBox::load(&dir.join("nope.key"), false).unwrap_err().to_string();
        assert!(missing.contains("is missing"), "{missing}");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("short.key"), b"abc").unwrap();
        let short = SecretBox::load(&dir.join("short.key"), true).unwrap_err().to_string();
        assert!(short.contains("holds 3 bytes"), "{short}");
    }
}
