//! A consistent copy of the store for backups, and loading one into a new directory.
//!
//! [`Store::snapshot`] copies every sled tree into memory while telemetry writes and audit
//! appends are held still (the telemetry writer's gate and the audit mutex), and opens the
//! segment files the copied index points into, noting their lengths. Every write that
//! returned before the snapshot began is in it: telemetry is acknowledged only after its
//! group committed, and no group commits while the gate is held, so the copied index, marks
//! and usage totals are exactly those of the acknowledged batches. Other trees are copied
//! one after the other while their writers carry on; a write racing the copy may be in it
//! or not, as after a crash at that moment. The segment bytes are read after the gate is
//! released: segments are append-only and an open file outlives its deletion, so the
//! recorded prefix stays readable.
//!
//! This module knows sled and the directory layout, nothing of the backup file format.

use super::segments::Segments;
use super::{Error, Store};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One tree as copied: its name and every `(key, value)` in key order.
pub type TreeCopy = (Vec<u8>, Vec<(sled::IVec, sled::IVec)>);

/// A point-in-time copy of the store.
#[derive(Debug)]
pub struct Snapshot {
    pub trees: Vec<TreeCopy>,
    pub segments: Vec<SegmentCopy>,
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
    pub fn copy_to(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut at = 0u64;
        while at < self.len {
            let n = ((self.len - at) as usize).min(buf.len());
            self.file.read_exact_at(&mut buf[..n], at)?;
            out.write_all(&buf[..n])?;
            at += n as u64;
        }
        Ok(())
    }
}

impl Store {
    /// Copy the whole store (see the module doc for what is consistent with what).
    pub fn snapshot(&self) -> Result<Snapshot, Error> {
        let (trees, segments) = {
            let _telemetry = self.segments.pause();
            let _audit = self.audit.hold_appends();
            // Opened before the index is copied: a segment the copy points into cannot be
            // deleted before this (nothing adds an entry to it while the gate is held).
            let open = self.segments.open_all()?;
            let mut trees = Vec::new();
            for name in self.db.tree_names() {
                let tree = self.db.open_tree(&name)?;
                let entries = tree.iter().collect::<Result<Vec<_>, _>>()?;
                trees.push((name.to_vec(), entries));
            }
            (trees, open)
        };
        let referenced: std::collections::HashSet<u64> = super::telemetry::locations_in(&trees).into_iter().map(|l| l.segment).collect();
        let segments = segments
            .into_iter()
            .filter(|(id, _, _)| referenced.contains(id))
            .map(|(id, file, len)| SegmentCopy { path: format!("{SEGMENT_DIR}/{}", Segments::file_name(id)), len, file })
            .collect();
        Ok(Snapshot { trees, segments })
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
