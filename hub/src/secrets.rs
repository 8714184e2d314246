//! Encryption at rest for org secrets, registry passwords, webhook signing secrets and users'
//! TOTP secrets.
//!
//! Values are sealed with AES-256-GCM under a key kept in its own file, outside the store
//! (`secrets_key_file`, by default `DATA/pki/secrets.key`, mode 0600), so a copy of the
//! store alone reveals no secret. Each sealed value is bound to its place by associated
//! data (`org`, kind, name): a sealed value copied to another record does not open.
//!
//! Keys are versioned and append-only: the key file is version 1, and each rotation
//! ([`SecretBox::rotate`]) writes the next version beside it (`secrets.key.v2`, `.v3`, …)
//! and seals new values with it. A value sealed under version 1 is `nonce (12 bytes) ||
//! ciphertext || tag`, as it always was; later versions prefix `\0gk` and the version (u32
//! big-endian), so every ciphertext names the key that opens it and old versions stay
//! readable until `keys::reencrypt` has moved everything to the newest. No key file is
//! ever deleted or rewritten.
//!
//! The id of version 1 (a digest prefix) is written to the store with the first sealed
//! value; a hub started with a different key file refuses to start rather than fail each
//! deploy.

use anyhow::{bail, Context};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// Length of the key file's contents, in bytes.
const KEY_LEN: usize = 32;
/// Prefix of a value sealed under key version 2 or later, followed by the version.
const VERSION_MAGIC: &[u8; 3] = b"\0gk";
const VERSION_HEADER_LEN: usize = VERSION_MAGIC.len() + 4;

/// One key version.
struct VersionedKey {
    version: u32,
    key: LessSafeKey,
}

/// Sealing keys for secrets: every version, the newest seals.
pub struct SecretBox {
    /// Ascending by version, from 1 with no gaps; never shrinks.
    keys: RwLock<Vec<VersionedKey>>,
    id: String,
    path: PathBuf,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBox").field("id", &self.id).field("path", &self.path).field("current", &self.current_version()).finish_non_exhaustive()
    }
}

/// What a sealed value belongs to; part of the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// The file of key `version` when version 1 is at `path`.
pub fn version_path(path: &Path, version: u32) -> PathBuf {
    if version <= 1 {
        return path.to_path_buf();
    }
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".v{version}"));
    path.with_file_name(name)
}

/// The key version a sealed value names (1 for values without a version header).
pub fn version_of(sealed: &[u8]) -> u32 {
    match sealed.strip_prefix(VERSION_MAGIC.as_slice()) {
        Some(rest) if sealed.len() >= VERSION_HEADER_LEN + NONCE_LEN + AES_256_GCM.tag_len() => u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]).max(1),
        _ => 1,
    }
}

fn read_key(path: &Path) -> anyhow::Result<LessSafeKey> {
    let bytes = std::fs::read(path).with_context(|| format!("reading secrets key file {}", path.display()))?;
    key_of(path, &bytes)
}

fn key_of(path: &Path, bytes: &[u8]) -> anyhow::Result<LessSafeKey> {
    if bytes.len() != KEY_LEN {
        bail!("secrets key file {} holds {} bytes; expected {KEY_LEN}", path.display(), bytes.len());
    }
    Ok(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| anyhow::anyhow!("bad secrets key"))?))
}

fn random_key() -> anyhow::Result<[u8; KEY_LEN]> {
    let mut key = [0u8; KEY_LEN];
    SystemRandom::new().fill(&mut key).map_err(|_| anyhow::anyhow!("no system randomness"))?;
    Ok(key)
}

impl SecretBox {
    /// Load the key at `path` and every later version beside it, creating version 1 (mode
    /// 0600) when `create` is set and it does not exist. A file of the wrong size is
    /// refused.
    pub fn load(path: &Path, create: bool) -> anyhow::Result<SecretBox> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let key = random_key()?;
                write_new_private(path, &key)?;
                key.to_vec()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("secrets key file {} is missing; the store's secrets cannot be read without it (restore it from your backup)", path.display())
            }
            Err(e) => return Err(e).with_context(|| format!("reading secrets key file {}", path.display())),
        };
        let id = crate::pki::sha256_hex(&bytes)[..16].to_string();
        let mut keys = vec![VersionedKey { version: 1, key: key_of(path, &bytes)? }];
        loop {
            let version = keys.len() as u32 + 1;
            let file = version_path(path, version);
            if !file.exists() {
                break;
            }
            keys.push(VersionedKey { version, key: read_key(&file)? });
        }
        Ok(SecretBox { keys: RwLock::new(keys), id, path: path.to_path_buf() })
    }

    /// Short public id of key version 1 (a digest prefix), to tell key files apart.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The version new values are sealed with.
    pub fn current_version(&self) -> u32 {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).last().map_or(1, |k| k.version)
    }

    /// The files of every key version, oldest first.
    pub fn key_files(&self) -> Vec<PathBuf> {
        (1..=self.current_version()).map(|v| version_path(&self.path, v)).collect()
    }

    /// Make a new key version, write it beside the others (mode 0600) and seal with it
    /// from now on. Values sealed before stay readable. Returns the new version.
    pub fn rotate(&self) -> anyhow::Result<u32> {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let version = keys.last().map_or(1, |k| k.version) + 1;
        let file = version_path(&self.path, version);
        let key = random_key()?;
        write_new_private(&file, &key)?;
        keys.push(VersionedKey { version, key: key_of(&file, &key)? });
        Ok(version)
    }

    /// Seal `plain` for the record (`org`, `kind`, `name`) under the newest key.
    pub fn seal(&self, org: &str, kind: Kind, name: &str, plain: &[u8]) -> anyhow::Result<Vec<u8>> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let current = keys.last().context("no secrets key loaded")?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| anyhow::anyhow!("no system randomness"))?;
        let mut out = plain.to_vec();
        current
            .key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad(org, kind, name)), &mut out)
            .map_err(|_| anyhow::anyhow!("sealing failed"))?;
        let mut sealed = Vec::with_capacity(VERSION_HEADER_LEN + NONCE_LEN + out.len());
        if current.version > 1 {
            sealed.extend_from_slice(VERSION_MAGIC);
            sealed.extend_from_slice(&current.version.to_be_bytes());
        }
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&out);
        Ok(sealed)
    }

    /// Open a value sealed for (`org`, `kind`, `name`) under whichever key version it
    /// names; fails on any tampering, on a value of another record, or under another key.
    pub fn open(&self, org: &str, kind: Kind, name: &str, sealed: &[u8]) -> anyhow::Result<Vec<u8>> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let version = version_of(sealed);
        if version > 1 {
            let Some(key) = keys.iter().find(|k| k.version == version) else {
                bail!(
                    "sealed value names secrets key version {version}, which this hub does not have (restore {})",
                    version_path(&self.path, version).display()
                );
            };
            if let Ok(plain) = open_with(&key.key, org, kind, name, &sealed[VERSION_HEADER_LEN..]) {
                return Ok(plain);
            }
            // A version-1 nonce may start like a header, however unlikely: try it as one.
        }
        let first = keys.first().context("no secrets key loaded")?;
        open_with(&first.key, org, kind, name, sealed)
            .map_err(|()| anyhow::anyhow!("sealed value does not open with key {} version {version} (wrong key file, or the store was altered)", self.id))
    }
}

fn open_with(key: &LessSafeKey, org: &str, kind: Kind, name: &str, sealed: &[u8]) -> Result<Vec<u8>, ()> {
    if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
        return Err(());
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| ())?;
    let mut buf = body.to_vec();
    let plain = key.open_in_place(nonce, Aad::from(aad(org, kind, name)), &mut buf).map_err(|_| ())?;
    Ok(plain.to_vec())
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
    fn rotation_appends_a_version_and_old_values_stay_readable() {
        let (sb, path) = temp_key(true);
        let old = sb.seal("acme", Kind::RegistryPassword, "ghcr.io", b"s3cret").unwrap();
        assert_eq!((version_of(&old), sb.current_version()), (1, 1));
        assert_eq!(sb.rotate().unwrap(), 2);
        let new = sb.seal("acme", Kind::RegistryPassword, "ghcr.io", b"s3cret").unwrap();
        assert_eq!(version_of(&new), 2);
        assert_eq!(sb.open("acme", Kind::RegistryPassword, "ghcr.io", &old).unwrap(), b"s3cret");
        assert_eq!(sb.open("acme", Kind::RegistryPassword, "ghcr.io", &new).unwrap(), b"s3cret");
        assert!(sb.open("acme", Kind::RegistryPassword, "other", &new).is_err(), "still bound to its place");
        // A restart loads every version; the files are private and never rewritten.
        let again = SecretBox::load(&path, false).unwrap();
        assert_eq!(again.current_version(), 2);
        assert_eq!(again.open("acme", Kind::RegistryPassword, "ghcr.io", &new).unwrap(), b"s3cret");
        assert_eq!(again.key_files(), vec![path.clone(), version_path(&path, 2)]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(version_path(&path, 2)).unwrap().permissions().mode() & 0o777, 0o600);
        // Without the version-2 file, a version-2 value says which file is missing.
        std::fs::remove_file(version_path(&path, 2)).unwrap();
        let without = SecretBox::load(&path, false).unwrap();
        assert!(without.open("acme", Kind::RegistryPassword, "ghcr.io", &new).unwrap_err().to_string().contains("version 2"));
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
