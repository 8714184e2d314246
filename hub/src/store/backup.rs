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

