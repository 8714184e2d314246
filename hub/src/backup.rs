//! Backups of a running hub and restores into a new data directory.
//!
//! A backup is one file: the store (every sled tree, and the telemetry segment bytes its
//! index points to) and the key material a restored hub needs (the CA key and certificate,
//! the server and HTTPS keys, the QUIC reset key, every secrets key version and the
//! operator key), as taken by [`crate::store::Store::snapshot`] while the hub serves.
//!
//! File format (all integers big-endian):
//! `GANTRYBK` · format `1` · key source (`1` passphrase through argon2id, `2` key file
//! through SHA-256) · argon2 memory KiB, iterations, lanes (u32 each) · salt (16) · nonce
//! prefix (7), then the archive sealed with AES-256-GCM in chunks of up to 64 KiB, each
//! `[len u32][ciphertext+tag]` with nonce `prefix · chunk number (u32) · last flag` and the
//! header as associated data (so chunks cannot be reordered, dropped or cut off), then the
//! SHA-256 of everything before it. A restore checks the checksum before it decrypts
//! anything and writes into a staging directory that only becomes the data directory when
//! every chunk opened and every record was written, so a damaged file, a wrong passphrase
//! or a failure half-way leaves nothing behind.
//!
//! The archive inside is a sequence of sections: `M` manifest (JSON), `T` one tree (name,
//! count, then `[klen u32][key][vlen u32][value]` records), `F` one file (relative path,
//! u64 length, bytes), `E` end.
//!
//! This module must not serve HTTP: `api/backup.rs` streams what [`write_backup`] writes,
//! and `cli.rs` calls [`restore`] with the hub stopped.

use crate::store::backup::Importer;
use crate::Hub;
use anyhow::{bail, Context};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"GANTRYBK";
const FORMAT: u8 = 1;
const SOURCE_PASSPHRASE: u8 = 1;
const SOURCE_KEY_FILE: u8 = 2;
const HEADER_LEN: usize = 8 + 1 + 1 + 12 + 16 + 7;
/// Plaintext bytes per sealed chunk.
const CHUNK: usize = 64 * 1024;
const CHECKSUM_LEN: u64 = 32;
/// Shortest passphrase accepted.
pub const MIN_PASSPHRASE_CHARS: usize = 12;
/// Smallest key file accepted, in bytes.
pub const MIN_KEY_FILE_BYTES: usize = 32;
/// argon2id cost of passphrase keys: OWASP's floor (19 MiB, 2 iterations, 1 lane).
const ARGON2_MEMORY_KIB: u32 = 19 * 1024;
const ARGON2_ITERATIONS: u32 = 2;
const ARGON2_LANES: u32 = 1;
/// File name prefix and suffix of backups written by the schedule.
pub const SCHEDULED_PREFIX: &str = "gantry-backup-";
pub const SCHEDULED_SUFFIX: &str = ".gbk";

/// What a backup is encrypted with.
#[derive(Clone)]
pub enum BackupSecret {
    /// A passphrase (at least [`MIN_PASSPHRASE_CHARS`] characters), stretched with argon2id.
    Passphrase(String),
    /// The contents of a key file (at least [`MIN_KEY_FILE_BYTES`] bytes of randomness).
    KeyFile(Vec<u8>),
}

impl std::fmt::Debug for BackupSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackupSecret::Passphrase(_) => "Passphrase(<redacted>)",
            BackupSecret::KeyFile(_) => "KeyFile(<redacted>)",
        })
    }
}

impl BackupSecret {
    /// Check the secret is strong enough to protect the CA and secrets keys.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            BackupSecret::Passphrase(p) if p.chars().count() < MIN_PASSPHRASE_CHARS => {
                Err(format!("the backup passphrase must have at least {MIN_PASSPHRASE_CHARS} characters"))
            }
            BackupSecret::KeyFile(k) if k.len() < MIN_KEY_FILE_BYTES => {
                Err(format!("the backup key file must hold at least {MIN_KEY_FILE_BYTES} bytes (e.g. `head -c 32 /dev/urandom > backup.key`)"))
            }
            _ => Ok(()),
        }
    }

    /// Read a passphrase file (one line; the trailing newline is not part of it).
    pub fn passphrase_file(path: &Path) -> anyhow::Result<BackupSecret> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading passphrase file {}", path.display()))?;
        Ok(BackupSecret::Passphrase(text.trim_end_matches(['\n', '\r']).to_string()))
    }

    /// Read a key file.
    pub fn key_file(path: &Path) -> anyhow::Result<BackupSecret> {
        Ok(BackupSecret::KeyFile(std::fs::read(path).with_context(|| format!("reading key file {}", path.display()))?))
    }

    fn source(&self) -> u8 {
        match self {
            BackupSecret::Passphrase(_) => SOURCE_PASSPHRASE,
            BackupSecret::KeyFile(_) => SOURCE_KEY_FILE,
        }
    }
}

/// The file's header, also the associated data of every chunk.
#[derive(Debug, Clone)]
struct Header {
    source: u8,
    memory_kib: u32,
    iterations: u32,
    lanes: u32,
    salt: [u8; 16],
    nonce_prefix: [u8; 7],
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT);
        out.push(self.source);
        out.extend_from_slice(&self.memory_kib.to_be_bytes());
        out.extend_from_slice(&self.iterations.to_be_bytes());
        out.extend_from_slice(&self.lanes.to_be_bytes());
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&self.nonce_prefix);
        out
    }

    fn decode(bytes: &[u8], file: &Path) -> anyhow::Result<Header> {
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            bail!("{} is not a Gantry backup", file.display());
        }
        if bytes[8] != FORMAT {
            bail!("{} is a backup of format {}, which this hub does not read (it reads format {FORMAT})", file.display(), bytes[8]);
        }
        let u32_at = |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&bytes[22..38]);
        let mut nonce_prefix = [0u8; 7];
        nonce_prefix.copy_from_slice(&bytes[38..45]);
        Ok(Header { source: bytes[9], memory_kib: u32_at(10), iterations: u32_at(14), lanes: u32_at(18), salt, nonce_prefix })
    }

    fn key(&self, secret: &BackupSecret) -> anyhow::Result<LessSafeKey> {
        let mut key = [0u8; 32];
        match (self.source, secret) {
            (SOURCE_PASSPHRASE, BackupSecret::Passphrase(passphrase)) => {
                // Bounds keep a crafted header from asking for gigabytes of memory.
                if !(8..=1 << 20).contains(&self.memory_kib) || !(1..=16).contains(&self.iterations) || !(1..=16).contains(&self.lanes) {
                    bail!("the backup's key derivation parameters are out of range");
                }
                let params =
                    argon2::Params::new(self.memory_kib, self.iterations, self.lanes, Some(32)).map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                    .hash_password_into(passphrase.as_bytes(), &self.salt, &mut key)
                    .map_err(|e| anyhow::anyhow!("deriving the backup key: {e}"))?;
            }
            (SOURCE_KEY_FILE, BackupSecret::KeyFile(contents)) => {
                let mut hasher = Sha256::new();
                hasher.update(b"gantry-backup-key-file\0");
                hasher.update(self.salt);
                hasher.update(contents);
                key.copy_from_slice(&hasher.finalize());
            }
            (SOURCE_PASSPHRASE, BackupSecret::KeyFile(_)) => bail!("this backup is encrypted with a passphrase, not a key file"),
            (SOURCE_KEY_FILE, BackupSecret::Passphrase(_)) => bail!("this backup is encrypted with a key file, not a passphrase"),
            (other, _) => bail!("unknown key source {other} in the backup header"),
        }
        Ok(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).map_err(|_| anyhow::anyhow!("bad backup key"))?))
    }

    fn nonce(&self, chunk: u32, last: bool) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[..7].copy_from_slice(&self.nonce_prefix);
        nonce[7..11].copy_from_slice(&chunk.to_be_bytes());
        nonce[11] = u8::from(last);
        Nonce::assume_unique_for_key(nonce)
    }
}

/// Encrypts an archive into the backup format as it is written; [`Sealer::finish`] seals
/// the last chunk and appends the checksum.
struct Sealer<W: Write> {
    out: W,
    header: Header,
    aad: Vec<u8>,
    key: LessSafeKey,
    buf: Vec<u8>,
    chunk: u32,
    hasher: Sha256,
}

impl<W: Write> Sealer<W> {
    fn new(mut out: W, secret: &BackupSecret) -> anyhow::Result<Sealer<W>> {
        let rng = SystemRandom::new();
        let mut salt = [0u8; 16];
        let mut nonce_prefix = [0u8; 7];
        rng.fill(&mut salt).map_err(|_| anyhow::anyhow!("no system randomness"))?;
        rng.fill(&mut nonce_prefix).map_err(|_| anyhow::anyhow!("no system randomness"))?;
        let header = Header { source: secret.source(), memory_kib: ARGON2_MEMORY_KIB, iterations: ARGON2_ITERATIONS, lanes: ARGON2_LANES, salt, nonce_prefix };
        let key = header.key(secret)?;
        let aad = header.encode();
        out.write_all(&aad)?;
        let mut hasher = Sha256::new();
        hasher.update(&aad);
        Ok(Sealer { out, header, aad, key, buf: Vec::with_capacity(CHUNK), chunk: 0, hasher })
    }

    fn seal_chunk(&mut self, last: bool) -> std::io::Result<()> {
        let mut data = std::mem::take(&mut self.buf);
        self.key
            .seal_in_place_append_tag(self.header.nonce(self.chunk, last), Aad::from(&self.aad), &mut data)
            .map_err(|_| std::io::Error::other("sealing a backup chunk failed"))?;
        let len = (data.len() as u32).to_be_bytes();
        self.hasher.update(len);
        self.hasher.update(&data);
        self.out.write_all(&len)?;
        self.out.write_all(&data)?;
        self.chunk = self.chunk.checked_add(1).ok_or_else(|| std::io::Error::other("backup too large"))?;
        self.buf = Vec::with_capacity(CHUNK);
        Ok(())
    }

    /// Seal the last chunk, write the checksum; the checksum as hex.
    fn finish(mut self) -> std::io::Result<String> {
        self.seal_chunk(true)?;
        let digest = self.hasher.finalize();
        self.out.write_all(&digest)?;
        self.out.flush()?;
        Ok(gantry_shared::token::hex(&digest))
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.seal_chunk(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a backup holds, written first in the archive.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Manifest {
    /// Archive format version.
    pub format: u32,
    pub created_at_ms: i64,
    /// Version of the hub that wrote it.
    pub hub_version: String,
    /// SHA-256 of the hub CA certificate (what agents pin).
    pub ca_sha256: String,
    /// Secrets key versions included.
    pub secrets_key_versions: u32,
    pub trees: u64,
    pub records: u64,
    pub segment_files: u64,
    pub segment_bytes: u64,
    /// Key material and other files, by path relative to the data directory.
    pub files: Vec<String>,
}

/// What was written: the manifest and the file's SHA-256.
#[derive(Debug, Clone)]
pub struct Written {
    pub manifest: Manifest,
    pub sha256: String,
}

/// Files of the data directory a restored hub needs besides the store: `(path in the
/// backup, where it is now)`.
fn key_material(hub: &Hub) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let data = &hub.config.data_dir;
    let pki = data.join("pki");
    let mut out = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(&pki)
        .with_context(|| format!("listing {}", pki.display()))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().to_str().map(String::from))
        // Secrets keys are added below from wherever they live; temporaries are not state.
        .filter(|n| !n.starts_with("secrets.key") && !n.ends_with(".tmp"))
        .collect();
    names.sort();
    for name in names {
        out.push((format!("pki/{name}"), pki.join(&name)));
    }
    for (i, file) in hub.secret_box.key_files().into_iter().enumerate() {
        let name = crate::secrets::version_path(Path::new("pki/secrets.key"), i as u32 + 1);
        out.push((name.display().to_string(), file));
    }
    if data.join("operator.key").exists() {
        out.push(("operator.key".to_string(), data.join("operator.key")));
    }
    Ok(out)
}

fn section_file(out: &mut dyn Write, path: &str, bytes: &[u8]) -> std::io::Result<()> {
    out.write_all(b"F")?;
    out.write_all(&(path.len() as u32).to_be_bytes())?;
    out.write_all(path.as_bytes())?;
    out.write_all(&(bytes.len() as u64).to_be_bytes())?;
    out.write_all(bytes)
}

/// Take a snapshot of `hub` and write it to `out` as a backup sealed with `secret`.
/// Blocking: run it off the async workers.
pub fn write_backup(hub: &Hub, secret: &BackupSecret, out: impl Write) -> anyhow::Result<Written> {
    secret.validate().map_err(|e| anyhow::anyhow!(e))?;
    let started = std::time::Instant::now();
    let snapshot = hub.store.snapshot().context("copying the store")?;
    let copied = started.elapsed();
    // Read after the snapshot, so every key version a copied value names is included.
    let files = key_material(hub)?;
    let mut contents = Vec::with_capacity(files.len());
    for (name, path) in &files {
        contents.push((name.clone(), std::fs::read(path).with_context(|| format!("reading {}", path.display()))?));
    }
    let manifest = Manifest {
        format: 1,
        created_at_ms: crate::wall_ms(),
        hub_version: env!("CARGO_PKG_VERSION").to_string(),
        ca_sha256: hub.pki.ca_fingerprint_hex(),
        secrets_key_versions: hub.secret_box.current_version(),
        trees: snapshot.trees.len() as u64,
        records: snapshot.records(),
        segment_files: snapshot.segments.len() as u64,
        segment_bytes: snapshot.segments.iter().map(|s| s.len).sum(),
        files: files.iter().map(|(name, _)| name.clone()).collect(),
    };
    let mut sealer = Sealer::new(std::io::BufWriter::with_capacity(CHUNK + 64, out), secret)?;
    let json = serde_json::to_vec(&manifest)?;
    sealer.write_all(b"M")?;
    sealer.write_all(&(json.len() as u64).to_be_bytes())?;
    sealer.write_all(&json)?;
    for tree in &snapshot.trees {
        sealer.write_all(b"T")?;
        sealer.write_all(&(tree.name.len() as u32).to_be_bytes())?;
        sealer.write_all(&tree.name)?;
        sealer.write_all(&tree.records.to_be_bytes())?;
        snapshot.copy_tree_to(tree, &mut sealer)?;
    }
    for (name, bytes) in &contents {
        section_file(&mut sealer, name, bytes)?;
    }
    for segment in &snapshot.segments {
        sealer.write_all(b"F")?;
        sealer.write_all(&(segment.path.len() as u32).to_be_bytes())?;
        sealer.write_all(segment.path.as_bytes())?;
        sealer.write_all(&segment.len.to_be_bytes())?;
        segment.copy_to(&mut sealer)?;
    }
    sealer.write_all(b"E")?;
    let sha256 = sealer.finish()?;
    tracing::info!(
        records = manifest.records,
        segment_bytes = manifest.segment_bytes,
        writes_held_ms = snapshot.held.as_millis() as u64,
        snapshot_ms = copied.as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        "backup written"
    );
    Ok(Written { manifest, sha256 })
}

/// Check a backup file's checksum (without decrypting it); its SHA-256 as hex.
pub fn verify_checksum(file: &Path) -> anyhow::Result<String> {
    let mut reader = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let len = reader.metadata()?.len();
    if len < HEADER_LEN as u64 + CHECKSUM_LEN {
        bail!("{} is not a Gantry backup (only {len} bytes)", file.display());
    }
    let mut head = [0u8; HEADER_LEN];
    reader.read_exact(&mut head)?;
    Header::decode(&head, file)?;
    let mut hasher = Sha256::new();
    hasher.update(head);
    let mut left = len - HEADER_LEN as u64 - CHECKSUM_LEN;
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        reader.read_exact(&mut buf[..n])?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    let mut stored = [0u8; CHECKSUM_LEN as usize];
    reader.read_exact(&mut stored)?;
    let computed = hasher.finalize();
    if computed.as_slice() != stored {
        bail!(
            "{} is damaged: its SHA-256 checksum does not match (stored {}, computed {})",
            file.display(),
            gantry_shared::token::hex(&stored),
            gantry_shared::token::hex(&computed)
        );
    }
    Ok(gantry_shared::token::hex(&computed))
}

/// Reads the archive out of a backup file whose checksum was checked.
struct Opener {
    file: std::io::BufReader<std::fs::File>,
    path: PathBuf,
    header: Header,
    aad: Vec<u8>,
    key: LessSafeKey,
    /// Where the chunks end (the checksum starts).
    body_end: u64,
    pos: u64,
    chunk: u32,
    plain: Vec<u8>,
    at: usize,
    done: bool,
}

impl Opener {
    fn open(path: &Path, secret: &BackupSecret) -> anyhow::Result<Opener> {
        let mut file = std::io::BufReader::with_capacity(CHUNK + 64, std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?);
        let len = file.get_ref().metadata()?.len();
        let mut head = [0u8; HEADER_LEN];
        file.read_exact(&mut head)?;
        let header = Header::decode(&head, path)?;
        let key = header.key(secret)?;
        Ok(Opener {
            file,
            path: path.to_path_buf(),
            header,
            aad: head.to_vec(),
            key,
            body_end: len - CHECKSUM_LEN,
            pos: HEADER_LEN as u64,
            chunk: 0,
            plain: Vec::new(),
            at: 0,
            done: false,
        })
    }

    fn next_chunk(&mut self) -> std::io::Result<bool> {
        if self.done {
            return Ok(false);
        }
        let damaged = |what: &str| std::io::Error::other(format!("{} is damaged: {what}", self.path.display()));
        if self.pos + 4 > self.body_end {
            return Err(damaged("it ends before its last chunk"));
        }
        let mut len = [0u8; 4];
        self.file.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as u64;
        if len > (CHUNK + 16) as u64 || self.pos + 4 + len > self.body_end {
            return Err(damaged("a chunk length is out of range"));
        }
        let mut data = vec![0u8; len as usize];
        self.file.read_exact(&mut data)?;
        self.pos += 4 + len;
        let last = self.pos == self.body_end;
        let opened = self.key.open_in_place(self.header.nonce(self.chunk, last), Aad::from(&self.aad), &mut data).map_err(|_| {
            if self.chunk == 0 {
                std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("cannot decrypt {}: wrong passphrase or key file", self.path.display()))
            } else {
                damaged(&format!("chunk {} does not decrypt", self.chunk))
            }
        })?;
        self.plain = opened.to_vec();
        self.at = 0;
        self.chunk += 1;
        self.done = last;
        Ok(true)
    }
}

impl Read for Opener {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.plain.len() {
            if !self.next_chunk()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.plain.len() - self.at);
        out[..n].copy_from_slice(&self.plain[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn read_vec(r: &mut impl Read, len: u64, limit: u64, what: &str) -> anyhow::Result<Vec<u8>> {
    if len > limit {
        bail!("the backup's {what} is {len} bytes, more than {limit}");
    }
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// A path from the archive, checked to stay inside the data directory.
fn safe_path(path: &str) -> anyhow::Result<&str> {
    let ok_prefix = path == "operator.key" || path.starts_with("pki/") || path.starts_with(&format!("{}/", crate::store::backup::SEGMENT_DIR));
    let ok_parts = path.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
    if !ok_prefix || !ok_parts {
        bail!("the backup names a file outside the data directory: {path:?}");
    }
    Ok(path)
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    pub manifest: Manifest,
    pub sha256: String,
}

/// Restore the backup `from` into `data`, which must be missing or empty. The checksum is
/// checked and everything is written to a staging directory beside `data` first; on any
/// error the staging directory is removed and `data` is left as it was.
pub fn restore(from: &Path, secret: &BackupSecret, data: &Path) -> anyhow::Result<Restored> {
    if data.exists() {
        let mut entries = std::fs::read_dir(data).with_context(|| format!("{} is not a directory", data.display()))?;
        if entries.next().is_some() {
            bail!("{} is not empty; restore only into an empty or new directory (nothing was written)", data.display());
        }
    }
    let sha256 = verify_checksum(from).map_err(|e| e.context("nothing was restored"))?;
    let parent = match data.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = data.file_name().and_then(|n| n.to_str()).unwrap_or("data");
    let staging = parent.join(format!(".{name}.restoring-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let result = unpack(from, secret, &staging).and_then(|manifest| {
        record_restore(&staging, &manifest, &sha256)?;
        Ok(manifest)
    });
    let manifest = match result {
        Ok(manifest) => manifest,
        Err(error) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(error.context("nothing was restored"));
        }
    };
    let moved = (|| -> anyhow::Result<()> {
        if data.exists() {
            for entry in std::fs::read_dir(&staging)? {
                let entry = entry?;
                std::fs::rename(entry.path(), data.join(entry.file_name()))
                    .with_context(|| format!("moving {} into {}", entry.path().display(), data.display()))?;
            }
            std::fs::remove_dir(&staging)?;
        } else {
            std::fs::rename(&staging, data).with_context(|| format!("moving {} to {}", staging.display(), data.display()))?;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))?;
        Ok(())
    })();
    if let Err(error) = moved {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(error);
    }
    Ok(Restored { manifest, sha256 })
}

/// Decrypt the archive into `dir`; the manifest.
fn unpack(from: &Path, secret: &BackupSecret, dir: &Path) -> anyhow::Result<Manifest> {
    let mut r = Opener::open(from, secret)?;
    let mut kind = [0u8; 1];
    r.read_exact(&mut kind)?;
    if &kind != b"M" {
        bail!("{} is damaged: no manifest", from.display());
    }
    let len = read_u64(&mut r)?;
    let manifest: Manifest = serde_json::from_slice(&read_vec(&mut r, len, 1 << 20, "manifest")?).context("reading the backup's manifest")?;
    std::fs::create_dir_all(dir.join("pki"))?;
    std::fs::create_dir_all(dir.join(crate::store::backup::SEGMENT_DIR))?;
    let mut importer = Importer::create(dir)?;
    loop {
        r.read_exact(&mut kind)?;
        match &kind {
            b"T" => {
                let len = read_u32(&mut r)? as u64;
                let name = read_vec(&mut r, len, 4096, "tree name")?;
                for _ in 0..read_u64(&mut r)? {
                    let len = read_u32(&mut r)? as u64;
                    let key = read_vec(&mut r, len, 1 << 30, "key")?;
                    let len = read_u32(&mut r)? as u64;
                    let value = read_vec(&mut r, len, 1 << 30, "value")?;
                    importer.insert(&name, &key, &value)?;
                }
            }
            b"F" => {
                let len = read_u32(&mut r)? as u64;
                let path = String::from_utf8(read_vec(&mut r, len, 4096, "file name")?).context("a file name in the backup is not UTF-8")?;
                let target = dir.join(safe_path(&path)?);
                let len = read_u64(&mut r)?;
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                use std::os::unix::fs::OpenOptionsExt;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)
                    .with_context(|| format!("creating {}", target.display()))?;
                std::io::copy(&mut (&mut r).take(len), &mut file)?;
                if file.metadata()?.len() != len {
                    bail!("{} is damaged: {path} is cut short", from.display());
                }
                file.sync_all()?;
            }
            b"E" => break,
            other => bail!("{} is damaged: unknown section {:?}", from.display(), other[0] as char),
        }
    }
    importer.finish()?;
    // Everything after the end marker must be nothing: read to the last chunk.
    let mut rest = Vec::new();
    r.read_to_end(&mut rest)?;
    if !rest.is_empty() {
        bail!("{} is damaged: data after the end of the archive", from.display());
    }
    Ok(manifest)
}

/// Open the restored store once: check it, and write the restore into its audit log.
fn record_restore(dir: &Path, manifest: &Manifest, sha256: &str) -> anyhow::Result<()> {
    let store = crate::store::Store::open(dir).context("opening the restored store")?;
    let target = [
        ("backup_sha256".to_string(), sha256.to_string()),
        ("backup_created_at".to_string(), crate::api::rfc3339(manifest.created_at_ms)),
        ("ca_sha256".to_string(), manifest.ca_sha256.clone()),
    ]
    .into_iter()
    .collect();
    store.append_audit(crate::store::NewAuditEntry {
        at_ms: crate::wall_ms(),
        actor: "cli".to_string(),
        actor_kind: "system".to_string(),
        org: None,
        action: "backup.restore".to_string(),
        target,
        outcome: "restored".to_string(),
        request_id: None,
        client_ip: None,
    })?;
    Ok(())
}

/// Default seconds between scheduled backups (a day).
pub const DEFAULT_INTERVAL_SECS: u64 = 24 * 3600;
/// Default number of scheduled backups kept.
pub const DEFAULT_KEEP: u32 = 7;

/// Where and how often the hub writes backups of itself (`[backup]` in the config file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// Directory scheduled backups are written to (created if missing), as
    /// `gantry-backup-<UTC time>.gbk`. Unset (the default) turns scheduled backups off.
    /// Best on another disk or a mounted remote volume.
    pub dir: Option<PathBuf>,
    /// Seconds between scheduled backups (default 86400, a day); the first is taken one
    /// interval after the hub starts.
    pub interval_secs: u64,
    /// How many scheduled backups to keep: after each one written, the oldest beyond this
    /// many are deleted (at least 1, default 7). Backups taken with `gantry-hub backup`
    /// are never deleted.
    pub keep: u32,
    /// File holding the passphrase scheduled backups are encrypted with (one line, at
    /// least 12 characters, mode 0600). Set this or `key_file` when `dir` is set.
    pub passphrase_file: Option<PathBuf>,
    /// File of at least 32 random bytes scheduled backups are encrypted with instead of a
    /// passphrase (`head -c 32 /dev/urandom > backup.key`).
    pub key_file: Option<PathBuf>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig { dir: None, interval_secs: DEFAULT_INTERVAL_SECS, keep: DEFAULT_KEEP, passphrase_file: None, key_file: None }
    }
}

impl BackupConfig {
    /// Every rule the values break.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.interval_secs == 0 {
            errors.push("backup.interval_secs must be at least 1".to_string());
        }
        if self.keep == 0 {
            errors.push("backup.keep must be at least 1".to_string());
        }
        if self.dir.is_some() && self.passphrase_file.is_some() == self.key_file.is_some() {
            errors.push("backup.dir needs exactly one of backup.passphrase_file and backup.key_file".to_string());
        }
        errors
    }

    /// The secret scheduled backups are sealed with, read now (so a changed file counts).
    fn secret(&self) -> anyhow::Result<BackupSecret> {
        match (&self.passphrase_file, &self.key_file) {
            (Some(path), _) => BackupSecret::passphrase_file(path),
            (None, Some(path)) => BackupSecret::key_file(path),
            (None, None) => bail!("no backup.passphrase_file or backup.key_file configured"),
        }
    }
}

/// Store setting holding [`BackupStatus`].
const STATUS_SETTING: &str = "backup_status";
/// The alert scope of hub-wide conditions: not an org id (org ids are slugs), so no
/// tenant's alerts can be it. Operators read it at `GET /api/v1/hub/alerts`.
pub const HUB_ALERT_SCOPE: &str = "_hub";

/// How scheduled backups have gone, kept in the store (so a restart keeps the alert and
/// the counters).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BackupStatus {
    pub successes: u64,
    pub failures: u64,
    pub last_success_ms: Option<i64>,
    pub last_failure_ms: Option<i64>,
    /// Why the last failed attempt failed.
    pub last_error: Option<String>,
    /// File name of the last backup written.
    pub last_file: Option<String>,
    pub last_bytes: Option<u64>,
}

impl BackupStatus {
    /// Whether the latest attempt failed.
    pub fn failing(&self) -> bool {
        match (self.last_failure_ms, self.last_success_ms) {
            (Some(failed), Some(ok)) => failed >= ok,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

/// The scheduled backups' status as stored.
pub fn status(hub: &Hub) -> BackupStatus {
    hub.store.setting(STATUS_SETTING).ok().flatten().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default()
}

/// Name of a scheduled backup taken at `ms`.
fn scheduled_name(ms: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{SCHEDULED_PREFIX}{:04}{:02}{:02}T{:02}{:02}{:02}.{:03}Z{SCHEDULED_SUFFIX}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

/// Scheduled backups in `dir`, oldest first (their names sort by time).
pub fn scheduled_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(SCHEDULED_PREFIX) && n.ends_with(SCHEDULED_SUFFIX)))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Which of `files` (oldest first) to delete to keep the newest `keep`.
pub fn beyond_retention(files: &[PathBuf], keep: u32) -> &[PathBuf] {
    &files[..files.len().saturating_sub(keep as usize)]
}

/// Take one scheduled backup: write it beside its final name, sync, rename, then apply
/// retention. Blocking. The file written.
pub fn scheduled_backup(hub: &Hub) -> anyhow::Result<(PathBuf, u64)> {
    let config = &hub.config.backup;
    let dir = config.dir.as_ref().context("scheduled backups are off (no backup.dir)")?;
    let secret = config.secret()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(scheduled_name(crate::wall_ms()));
    let partial = path.with_extension("gbk.partial");
    let written = (|| -> anyhow::Result<u64> {
        use std::os::unix::fs::OpenOptionsExt;
        let file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&partial).with_context(|| format!("creating {}", partial.display()))?;
        write_backup(hub, &secret, &file)?;
        file.sync_all().with_context(|| format!("syncing {}", partial.display()))?;
        std::fs::rename(&partial, &path).with_context(|| format!("renaming {}", partial.display()))?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))?;
        Ok(std::fs::metadata(&path)?.len())
    })();
    let bytes = match written {
        Ok(bytes) => bytes,
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
    };
    for old in beyond_retention(&scheduled_files(dir), config.keep) {
        if let Err(error) = std::fs::remove_file(old) {
            tracing::warn!(file = %old.display(), %error, "could not delete an old backup");
        }
    }
    Ok((path, bytes))
}

/// Record an attempt's outcome: status in the store, an audit entry, the alert.
fn record_attempt(hub: &Hub, outcome: &anyhow::Result<(PathBuf, u64)>) {
    let now = crate::wall_ms();
    let mut status = status(hub);
    let mut target = std::collections::BTreeMap::new();
    let outcome_text = match outcome {
        Ok((path, bytes)) => {
            status.successes += 1;
            status.last_success_ms = Some(now);
            status.last_file = path.file_name().map(|n| n.to_string_lossy().into_owned());
            status.last_bytes = Some(*bytes);
            target.insert("file".to_string(), path.display().to_string());
            tracing::info!(file = %path.display(), bytes, "scheduled backup written");
            "written".to_string()
        }
        Err(error) => {
            status.failures += 1;
            status.last_failure_ms = Some(now);
            status.last_error = Some(format!("{error:#}"));
            tracing::error!(error = %format!("{error:#}"), "scheduled backup failed");
            format!("error: {error:#}")
        }
    };
    if let Err(error) = hub.store.set_setting(STATUS_SETTING, &serde_json::to_string(&status).unwrap_or_default()) {
        tracing::error!(%error, "could not record the backup status");
    }
    let entry = crate::store::NewAuditEntry {
        at_ms: now,
        actor: "system".to_string(),
        actor_kind: "system".to_string(),
        org: None,
        action: "backup.scheduled".to_string(),
        target,
        outcome: outcome_text,
        request_id: None,
        client_ip: None,
    };
    if let Err(error) = hub.store.append_audit(entry) {
        tracing::error!(%error, "could not audit the scheduled backup");
    }
    if let Err(error) = evaluate_alerts(hub, now) {
        tracing::warn!(%error, "hub alert evaluation failed");
    }
}

/// Reconcile the hub-wide alerts (scope [`HUB_ALERT_SCOPE`]) with what holds now.
pub fn evaluate_alerts(hub: &Hub, now_ms: i64) -> Result<(), crate::store::Error> {
    let mut holding = crate::alerts::backup_conditions(&status(hub));
    holding.extend(crate::alerts::ca_conditions(&hub.pki.cas(), now_ms));
    for open in hub.store.open_alerts_of_org(HUB_ALERT_SCOPE)? {
        if !holding.iter().any(|c| c.key == open.key) {
            if let Some(resolved) = hub.store.resolve_alert(HUB_ALERT_SCOPE, &open.key, now_ms)? {
                crate::metrics::Metrics::inc(&hub.health.counters.alerts_resolved);
                tracing::info!(alert = %resolved.id, rule = %resolved.rule, "hub alert resolved");
            }
        }
    }
    let open = hub.store.open_alerts_of_org(HUB_ALERT_SCOPE)?;
    for condition in holding {
        if let Some(existing) = open.iter().find(|a| a.key == condition.key) {
            if existing.summary != condition.summary {
                hub.store.update_alert(HUB_ALERT_SCOPE, &existing.id, |a| {
                    a.summary = condition.summary.clone();
                    a.updated_at_ms = now_ms;
                })?;
            }
            continue;
        }
        let alert = crate::store::Alert {
            id: format!("alr_{:013x}{}", now_ms.max(0), crate::auth::random_hex(4)),
            org: HUB_ALERT_SCOPE.to_string(),
            rule: condition.rule.to_string(),
            key: condition.key,
            severity: condition.severity.to_string(),
            summary: condition.summary,
            agent: None,
            check: None,
            deployment: None,
            status: crate::store::AlertStatus::Firing,
            started_at_ms: now_ms,
            updated_at_ms: now_ms,
            acknowledged_at_ms: None,
            acknowledged_by: None,
            resolved_at_ms: None,
            notified: true,
        };
        if let Some(fired) = hub.store.fire_alert(&alert)? {
            crate::metrics::Metrics::inc(&hub.health.counters.alerts_fired);
            tracing::warn!(alert = %fired.id, rule = %fired.rule, summary = %fired.summary, "hub alert firing");
        }
    }
    Ok(())
}

/// Take scheduled backups every `backup.interval_secs` until `stop`; returns at once when
/// `backup.dir` is not set.
pub async fn run(hub: std::sync::Arc<Hub>, mut stop: tokio::sync::watch::Receiver<bool>) {
    if hub.config.backup.dir.is_none() {
        return;
    }
    let every = std::time::Duration::from_secs(hub.config.backup.interval_secs.max(1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let worker = hub.clone();
        let outcome = match tokio::task::spawn_blocking(move || scheduled_backup(&worker)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(anyhow::anyhow!("the backup task panicked")),
        };
        let worker = hub.clone();
        let _ = tokio::task::spawn_blocking(move || record_attempt(&worker, &outcome)).await;
    }
}

/// Backup gauges and counters in Prometheus text.
pub fn render_metrics(hub: &Hub) -> String {
    let s = status(hub);
    let seconds = |ms: Option<i64>| ms.map_or(0.0, |ms| ms as f64 / 1000.0);
    format!(
        "# HELP gantry_backups_total Scheduled backups attempted, by result.\n# TYPE gantry_backups_total counter\n\
         gantry_backups_total{{result=\"ok\"}} {}\ngantry_backups_total{{result=\"failed\"}} {}\n\
         # HELP gantry_backup_last_success_timestamp_seconds When the last scheduled backup was written (0: never).\n\
         # TYPE gantry_backup_last_success_timestamp_seconds gauge\ngantry_backup_last_success_timestamp_seconds {}\n\
         # HELP gantry_backup_failing Whether the latest scheduled backup failed (1) or not (0).\n\
         # TYPE gantry_backup_failing gauge\ngantry_backup_failing {}\n",
        s.successes,
        s.failures,
        seconds(s.last_success_ms),
        u8::from(s.failing())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(secret: &BackupSecret, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut sealer = Sealer::new(&mut out, secret).unwrap();
        sealer.write_all(plain).unwrap();
        sealer.finish().unwrap();
        out
    }

    fn read_back(bytes: &[u8], secret: &BackupSecret) -> anyhow::Result<Vec<u8>> {
        let path = std::env::temp_dir().join(format!("gantry-backup-unit-{:016x}", rand::random::<u64>()));
        std::fs::write(&path, bytes).unwrap();
        let result = verify_checksum(&path).and_then(|_| {
            let mut plain = Vec::new();
            Opener::open(&path, secret)?.read_to_end(&mut plain)?;
            Ok(plain)
        });
        let _ = std::fs::remove_file(path);
        result
    }

    #[test]
    fn archives_round_trip_across_chunks_and_refuse_damage_and_wrong_keys() {
        let secret = BackupSecret::KeyFile(vec![7u8; 32]);
        let plain: Vec<u8> = (0..CHUNK * 2 + 123).map(|i| (i % 251) as u8).collect();
        let bytes = sealed(&secret, &plain);
        assert_eq!(read_back(&bytes, &secret).unwrap(), plain);
        let wrong = read_back(&bytes, &BackupSecret::KeyFile(vec![8u8; 32])).unwrap_err().to_string();
        assert!(wrong.contains("wrong passphrase or key file"), "{wrong}");
        let mut flipped = bytes.clone();
        flipped[HEADER_LEN + 100] ^= 1;
        let damaged = read_back(&flipped, &secret).unwrap_err().to_string();
        assert!(damaged.contains("checksum does not match"), "{damaged}");
        // Cut after the first chunk with a recomputed checksum: the missing last chunk shows.
        let first_len = u32::from_be_bytes(bytes[HEADER_LEN..HEADER_LEN + 4].try_into().unwrap()) as usize;
        let mut cut = bytes[..HEADER_LEN + 4 + first_len].to_vec();
        let digest = Sha256::digest(&cut);
        cut.extend_from_slice(&digest);
        assert!(read_back(&cut, &secret).is_err());
    }

    #[test]
    fn passphrases_derive_the_key_and_weak_secrets_are_refused() {
        let secret = BackupSecret::Passphrase("correct horse battery staple".into());
        let bytes = sealed(&secret, b"hello");
        assert_eq!(read_back(&bytes, &secret).unwrap(), b"hello");
        assert!(read_back(&bytes, &BackupSecret::Passphrase("correct horse battery stapler".into())).is_err());
        assert!(read_back(&bytes, &BackupSecret::KeyFile(vec![1; 32])).unwrap_err().to_string().contains("passphrase, not a key file"));
        assert!(BackupSecret::Passphrase("short".into()).validate().is_err());
        assert!(BackupSecret::KeyFile(vec![1; 16]).validate().is_err());
    }

    #[test]
    fn retention_keeps_the_newest_and_names_sort_by_time() {
        let a = scheduled_name(1_700_000_000_000);
        let b = scheduled_name(1_700_000_000_001);
        let c = scheduled_name(1_800_000_000_000);
        assert!(a < b && b < c, "{a} {b} {c}");
        let files: Vec<PathBuf> = [a, b, c].iter().map(PathBuf::from).collect();
        assert_eq!(beyond_retention(&files, 2), &files[..1]);
        assert!(beyond_retention(&files, 5).is_empty());
        let failing = BackupStatus { last_failure_ms: Some(2), last_success_ms: Some(1), ..BackupStatus::default() };
        assert!(failing.failing());
        assert!(!BackupStatus { last_success_ms: Some(3), ..failing }.failing());
    }

    #[test]
    fn archive_paths_stay_inside_the_data_directory() {
        assert!(safe_path("pki/ca.key").is_ok());
        assert!(safe_path("telemetry/seg-0000000000000001.log").is_ok());
        assert!(safe_path("operator.key").is_ok());
        for bad in ["../etc/passwd", "pki/../../x", "/etc/passwd", "store/db", "pki//x"] {
            assert!(safe_path(bad).is_err(), "{bad}");
        }
    }
}
