//! A consistent copy of the store for backups, and loading one into a new directory.
//!
//! [`Store::snapshot`] holds every write path still (the store-wide write gate, see
//! `mod.rs`, and the telemetry writer's gate) while it reads every sled tree once, so the
//! copy is one point in time across all trees: no deployment without its revision, no
//! audit entry without its head, and telemetry index, marks and usage totals exactly those
//! of acknowledged batches (a batch is acknowledged only after its group committed, and no
//! group commits while the gate is held). Every write that returned before the snapshot
//! began is in it. The records are streamed to a spill file in the data directory (unlinked
//! as soon as it is created, so it never outlives the process) rather than held in memory;
//! the pause is the time to read the trees and write them there sequentially
//! ([`Snapshot::held`]). The segment files the copied index points into are opened under the
//! gate, their lengths noted, and their bytes read after it is released: segments are
//! append-only and an open file outlives its deletion, so the recorded prefix stays
//! readable.
//!
//! [`compact`] rewrites a stopped hub's store into a fresh directory holding only the live
//! records: sled appends every change to its log and reuses the space of old versions only
//! later, so the bytes of erased records (a deleted org's) can stay in its files until then.
//!
//! This module knows sled and the directory layout, nothing of the backup file format.

use super::segments::Segments;
use super::{Error, Store};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One tree as copied: its name, how many records it has and where they are in the spill.
#[derive(Debug, Clone)]
pub struct TreeCopy {
    pub name: Vec<u8>,
    pub records: u64,
    at: u64,
    len: u64,
}

/// A point-in-time copy of the store.
#[derive(Debug)]
pub struct Snapshot {
    pub trees: Vec<TreeCopy>,
    pub segments: Vec<SegmentCopy>,
    /// How long every write path was held still while the trees were copied.
    pub held: Duration,
    spill: File,
}

impl Snapshot {
    /// Records of every tree.
    pub fn records(&self) -> u64 {
        self.trees.iter().map(|t| t.records).sum()
    }

    /// Write the records of `tree`, in key order, each as `[klen u32][key][vlen u32][value]`
    /// (lengths big-endian).
    pub fn copy_tree_to(&self, tree: &TreeCopy, out: &mut dyn Write) -> std::io::Result<()> {
        copy_range(&self.spill, tree.at, tree.len, out)
    }
}

/// A segment file held open, and how much of it the snapshot covers.
#[derive(Debug)]
pub struct SegmentCopy {
    /// Path relative to the data directory (`telemetry/seg-….log`).
    pub path: String,
    pub len: u64,
    file: File,
}

impl SegmentCopy {
    /// Write the covered bytes to `out`.
    pub fn copy_to(&self, out: &mut dyn Write) -> std::io::Result<()> {
        copy_range(&self.file, 0, self.len, out)
    }
}

fn copy_range(file: &File, from: u64, len: u64, out: &mut dyn Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut at = 0u64;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], from + at)?;
        out.write_all(&buf[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// Bytes buffered before the spill file is written to.
const SPILL_BUFFER: usize = 1 << 20;

impl Store {
    /// Copy the whole store at one point in time (see the module doc).
    pub fn snapshot(&self) -> Result<Snapshot, Error> {
        let spill = self.spill_file()?;
        let spill_error = |e: std::io::Error| Error::Corrupt(format!("writing the snapshot spill file in {}: {e}", self.dir.display()));
        let mut out = std::io::BufWriter::with_capacity(SPILL_BUFFER, &spill);
        let mut trees = Vec::new();
        let mut referenced = std::collections::HashSet::new();
        let mut at = 0u64;
        let (open, held) = {
            // The telemetry gate first: the writer thread takes only that one, every other
            // write path only the store's, so the order cannot deadlock.
            let _telemetry = self.segments.pause();
            let _writes = self.hold_writes();
            let started = std::time::Instant::now();
            // Opened before the index is read: a segment the copy points into cannot be
            // deleted before this (nothing adds an entry to it while the gate is held).
            let open = self.segments.open_all()?;
            for name in self.db.tree_names() {
                let tree = self.db.open_tree(&name)?;
                let mut copy = TreeCopy { name: name.to_vec(), records: 0, at, len: 0 };
                for item in tree.iter() {
                    let (key, value) = item?;
                    if let Some(segment) = super::telemetry::segment_of(&name, &key, &value) {
                        referenced.insert(segment);
                    }
                    for part in [&key, &value] {
                        out.write_all(&(part.len() as u32).to_be_bytes()).map_err(spill_error)?;
                        out.write_all(part).map_err(spill_error)?;
                    }
                    copy.records += 1;
                    copy.len += 8 + key.len() as u64 + value.len() as u64;
                }
                at += copy.len;
                trees.push(copy);
            }
            out.flush().map_err(spill_error)?;
            (open, started.elapsed())
        };
        drop(out);
        let segments = open
            .into_iter()
            .filter(|(id, _, _)| referenced.contains(id))
            .map(|(id, file, len)| SegmentCopy { path: format!("{SEGMENT_DIR}/{}", Segments::file_name(id)), len, file })
            .collect();
        Ok(Snapshot { trees, segments, held, spill })
    }

    /// A new file in the data directory, already unlinked: readable through the handle
    /// only, and gone with it even if the process dies.
    fn spill_file(&self) -> Result<File, Error> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join(format!(".snapshot-{:016x}.tmp", rand::random::<u64>()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::Corrupt(format!("creating {}: {e}", path.display())))?;
        std::fs::remove_file(&path).map_err(|e| Error::Corrupt(format!("removing {}: {e}", path.display())))?;
        Ok(file)
    }
}

/// Directory of segment files inside a data directory.
pub const SEGMENT_DIR: &str = "telemetry";

/// Writes trees into a new store directory (a restore).
pub struct Importer {
    db: sled::Db,
    current: Option<(Vec<u8>, sled::Tree)>,
}

impl std::fmt::Debug for Importer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Importer").finish_non_exhaustive()
    }
}

impl Importer {
    /// Create an empty store under `data_dir/store`; refuses one that exists.
    pub fn create(data_dir: &Path) -> Result<Importer, Error> {
        let path: PathBuf = data_dir.join("store");
        if path.exists() {
            return Err(Error::AlreadyExists(format!("store at {}", path.display())));
        }
        let db = sled::Config::new().path(&path).open()?;
        Ok(Importer { db, current: None })
    }

    /// Insert one record of tree `name`.
    pub fn insert(&mut self, name: &[u8], key: &[u8], value: &[u8]) -> Result<(), Error> {
        let tree = match &self.current {
            Some((current, tree)) if current == name => tree,
            _ => {
                let tree = self.db.open_tree(name)?;
                &self.current.insert((name.to_vec(), tree)).1
            }
        };
        tree.insert(key, value)?;
        Ok(())
    }

    /// Make everything durable and close the store.
    pub fn finish(self) -> Result<(), Error> {
        self.db.flush()?;
        Ok(())
    }
}

/// What a compaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compacted {
    pub trees: u64,
    pub records: u64,
    /// Bytes of the store's files before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// Beside `DATA/store` while it is being rewritten; then renamed to [`COMPACTED`].
const COMPACTING: &str = "store.compacting";
/// A complete rewrite, waiting to replace `DATA/store`.
const COMPACTED: &str = "store.compacted";
/// The store a complete rewrite replaced, removed once the rewrite is in place.
const REPLACED: &str = "store.replaced";

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().map(|e| if e.path().is_dir() { dir_bytes(&e.path()) } else { e.metadata().map_or(0, |m| m.len()) }).sum()
}

fn fs_error(what: &str, path: &Path, error: std::io::Error) -> Error {
    Error::Corrupt(format!("{what} {}: {error}", path.display()))
}

/// Rewrite the store of the stopped hub in `data_dir` with only its live records (see
/// the module doc). The copy is made beside it and swapped in only when complete; a crash
/// at any point leaves either store whole, and [`finish_compaction`] (run when a store is
/// opened) completes or discards an interrupted swap.
pub fn compact(data_dir: &Path) -> Result<Compacted, Error> {
    finish_compaction(data_dir)?;
    let live = data_dir.join("store");
    let bytes_before = dir_bytes(&live);
    let (trees, records) = {
        let store = Store::open(data_dir)?;
        let target = data_dir.join(COMPACTING);
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(|e| fs_error("removing", &target, e))?;
        }
        let fresh = sled::Config::new().path(&target).open()?;
        let (mut trees, mut records) = (0u64, 0u64);
        for name in store.db.tree_names() {
            let from = store.db.open_tree(&name)?;
            let to = fresh.open_tree(&name)?;
            for item in from.iter() {
                let (key, value) = item?;
                to.insert(key, value)?;
                records += 1;
            }
            trees += 1;
        }
        fresh.flush()?;
        drop(fresh);
        (trees, records)
    };
    // sled lets go of a store (its lock, its background writes) only with its last
    // thread's handle (see `Store::open_raw`): both must be closed before they move.
    wait_until_closed(&live)?;
    wait_until_closed(&data_dir.join(COMPACTING))?;
    let (compacting, compacted) = (data_dir.join(COMPACTING), data_dir.join(COMPACTED));
    std::fs::rename(&compacting, &compacted).map_err(|e| fs_error("renaming", &compacting, e))?;
    finish_compaction(data_dir)?;
    Ok(Compacted { trees, records, bytes_before, bytes_after: dir_bytes(&live) })
}

/// Wait until the sled store at `path` can be opened (every earlier handle is gone).
fn wait_until_closed(path: &Path) -> Result<(), Error> {
    let started = std::time::Instant::now();
    loop {
        match sled::Config::new().path(path).open() {
            Ok(db) => {
                drop(db);
                return Ok(());
            }
            Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") && started.elapsed() < super::LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Complete a compaction a crash interrupted: a finished rewrite (`store.compacted`)
/// replaces the store, an unfinished one (`store.compacting`) is discarded, and the
/// replaced store is removed.
pub fn finish_compaction(data_dir: &Path) -> Result<(), Error> {
    let (live, compacted, replaced) = (data_dir.join("store"), data_dir.join(COMPACTED), data_dir.join(REPLACED));
    if compacted.exists() {
        if live.exists() {
            if replaced.exists() {
                std::fs::remove_dir_all(&replaced).map_err(|e| fs_error("removing", &replaced, e))?;
            }
            std::fs::rename(&live, &replaced).map_err(|e| fs_error("renaming", &live, e))?;
        }
        std::fs::rename(&compacted, &live).map_err(|e| fs_error("renaming", &compacted, e))?;
    }
    for leftover in [replaced, data_dir.join(COMPACTING)] {
        if leftover.exists() {
            std::fs::remove_dir_all(&leftover).map_err(|e| fs_error("removing", &leftover, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Org;

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gantry-compact-test-{}-{}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn org(id: &str, name: &str) -> Org {
        Org { id: id.into(), name: name.into(), agent_limit: 5, agent_count: 0, suspended: false, created_at_ms: 0, retention_days: 0 }
    }

    fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(files_containing(&path, needle));
            } else if std::fs::read(&path).unwrap().windows(needle.len()).any(|w| w == needle) {
                found.push(path);
            }
        }
        found
    }

    #[test]
    fn compaction_keeps_live_records_and_drops_the_bytes_of_removed_ones() {
        let dir = tempdir();
        {
            let store = Store::create(&dir).unwrap();
            store.create_org(&org("kept", "kept-name-3b1")).unwrap();
            store.create_org(&org("gone", "gone-name-9f4")).unwrap();
            store.orgs.remove("gone").unwrap();
            store.durable().unwrap();
        }
        let done = compact(&dir).unwrap();
        assert!(done.records >= 2, "{done:?}");
        assert!(files_containing(&dir, b"gone-name-9f4").is_empty(), "the removed record's bytes are gone");
        assert!(!dir.join(COMPACTING).exists() && !dir.join(COMPACTED).exists() && !dir.join(REPLACED).exists());
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.org("kept").unwrap().unwrap().name, "kept-name-3b1");
        assert!(store.org("gone").unwrap().is_none());
    }

    #[test]
    fn an_interrupted_swap_is_finished_and_an_unfinished_copy_discarded() {
        let dir = tempdir();
        {
            let store = Store::create(&dir).unwrap();
            store.create_org(&org("acme", "acme")).unwrap();
        }
        // A complete copy waiting to replace the store, as a crash between the renames
        // leaves it (the store itself already moved aside).
        std::fs::rename(dir.join("store"), dir.join(REPLACED)).unwrap();
        {
            // The store dropped above lets go of its file lock a moment later.
            let old = {
                let started = std::time::Instant::now();
                loop {
                    match sled::Config::new().path(dir.join(REPLACED)).open() {
                        Ok(db) => break db,
                        Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") && started.elapsed() < super::super::LOCK_WAIT => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => panic!("opening the moved store: {e}"),
                    }
                }
            };
            let copy = sled::Config::new().path(dir.join(COMPACTED)).open().unwrap();
            for name in old.tree_names() {
                let (from, to) = (old.open_tree(&name).unwrap(), copy.open_tree(&name).unwrap());
                for item in from.iter() {
                    let (key, value) = item.unwrap();
                    to.insert(key, value).unwrap();
                }
            }
            copy.flush().unwrap();
        }
        std::fs::create_dir_all(dir.join(COMPACTING)).unwrap();
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.org("acme").unwrap().unwrap().id, "acme");
        for leftover in [COMPACTING, COMPACTED, REPLACED] {
            assert!(!dir.join(leftover).exists(), "{leftover} left behind");
        }
    }
}
