//! Append-only segment files holding telemetry chunk payloads. sled keeps only small index
//! entries ([`Location`]s) pointing into them: sled rewrites whole pages as they change, so
//! bulk payload kept inside it costs many times its size in disk writes.
//!
//! Files are `DATA/telemetry/seg-<id>.log`, ids increasing. Only the telemetry writer
//! appends, and only to the newest segment, which it opened itself: a segment left by an
//! earlier run is never appended to, so a torn tail after a crash is never built upon (no
//! index entry points there: entries are written after the payload is synced). Each payload
//! is stored as `[crc32 LE][bytes]` and checked on every read.
//!
//! A segment is deleted when no index entry refers to it any more (counted in memory,
//! rebuilt from the index at start), unless it is the one being appended to.

use super::Error;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A segment grows to about this size before the writer starts the next one.
pub const SEGMENT_BYTES: u64 = 64 << 20;
const CRC_LEN: u64 = 4;
/// Segment files kept open for reading.
const OPEN_READERS: usize = 64;

/// Where a payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub segment: u64,
    /// Offset of the payload's checksum.
    pub offset: u64,
    /// Payload length, without the checksum.
    pub len: u32,
}

/// The segment directory, its readers and reference counts.
#[derive(Debug)]
pub struct Segments {
    dir: PathBuf,
    readers: Mutex<HashMap<u64, Arc<File>>>,
    /// Index entries per segment.
    refs: Mutex<HashMap<u64, u64>>,
    /// The segment being appended to (0: none yet).
    active: AtomicU64,
    /// Held by the writer while it commits a group, and by a backup while it copies the
    /// index: holding it keeps the telemetry trees and segment lengths still.
    gate: Mutex<()>,
}

fn file_name(id: u64) -> String {
    format!("seg-{id:016x}.log")
}

fn parse_name(name: &str) -> Option<u64> {
    u64::from_str_radix(name.strip_prefix("seg-")?.strip_suffix(".log")?, 16).ok()
}

fn io(what: &str, path: &Path, error: std::io::Error) -> Error {
    Error::Corrupt(format!("{what} {}: {error}", path.display()))
}

impl Segments {
    /// Open (creating) the directory. `referenced` yields the location of every index entry;
    /// segments nothing refers to are deleted.
    pub fn open(dir: &Path, referenced: impl Iterator<Item = Location>) -> Result<Segments, Error> {
        std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
        let mut refs: HashMap<u64, u64> = HashMap::new();
        for location in referenced {
            *refs.entry(location.segment).or_default() += 1;
        }
        for entry in std::fs::read_dir(dir).map_err(|e| io("listing", dir, e))? {
            let entry = entry.map_err(|e| io("listing", dir, e))?;
            let Some(id) = entry.file_name().to_str().and_then(parse_name) else { continue };
            if !refs.contains_key(&id) {
                std::fs::remove_file(entry.path()).map_err(|e| io("removing", &entry.path(), e))?;
            }
        }
        Ok(Segments { dir: dir.to_path_buf(), readers: Mutex::default(), refs: Mutex::new(refs), active: AtomicU64::new(0), gate: Mutex::default() })
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(file_name(id))
    }

    /// Start a new segment after every existing one, for the writer.
    pub fn appender(self: &Arc<Segments>) -> Result<Appender, Error> {
        let mut newest = 0;
        for entry in std::fs::read_dir(&self.dir).map_err(|e| io("listing", &self.dir, e))? {
            let entry = entry.map_err(|e| io("listing", &self.dir, e))?;
            if let Some(id) = entry.file_name().to_str().and_then(parse_name) {
                newest = newest.max(id);
            }
        }
        let mut appender = Appender { segments: self.clone(), file: None, id: newest, len: 0 };
        appender.rotate()?;
        Ok(appender)
    }

    /// The payload at `location`, checked against its checksum.
    pub fn read(&self, location: Location) -> Result<Vec<u8>, Error> {
        let file = self.reader(location.segment)?;
        let mut buf = vec![0u8; CRC_LEN as usize + location.len as usize];
        file.read_exact_at(&mut buf, location.offset).map_err(|e| io("reading", &self.path(location.segment), e))?;
        let crc = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if crc32fast::hash(&buf[CRC_LEN as usize..]) != crc {
            return Err(Error::Corrupt(format!("checksum mismatch in {} at {}", file_name(location.segment), location.offset)));
        }
        buf.drain(..CRC_LEN as usize);
        Ok(buf)
    }

    fn reader(&self, id: u64) -> Result<Arc<File>, Error> {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = readers.get(&id) {
            return Ok(file.clone());
        }
        let path = self.path(id);
        let file = Arc::new(File::open(&path).map_err(|e| io("opening", &path, e))?);
        if readers.len() >= OPEN_READERS {
            readers.clear();
        }
        readers.insert(id, file.clone());
        Ok(file)
    }

    fn add_refs(&self, added: &HashMap<u64, u64>) {
        let mut refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        for (id, n) in added {
            *refs.entry(*id).or_default() += n;
        }
    }

    /// Index entries pointing at `locations` were deleted: delete segments left unreferenced.
    pub fn release(&self, locations: &[Location]) -> Result<(), Error> {
        let mut touched = Vec::new();
        {
            let mut refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
            for location in locations {
                if let Some(n) = refs.get_mut(&location.segment) {
                    *n = n.saturating_sub(1);
                    if !touched.contains(&location.segment) {
                        touched.push(location.segment);
                    }
                }
            }
        }
        for id in touched {
            self.remove_if_unreferenced(id)?;
        }
        Ok(())
    }

    /// Delete segment `id` if no index entry refers to it and it is not being appended to.
    fn remove_if_unreferenced(&self, id: u64) -> Result<(), Error> {
        {
            let mut refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
            if refs.get(&id).is_some_and(|n| *n > 0) || id == self.active.load(Ordering::Acquire) {
                return Ok(());
            }
            refs.remove(&id);
        }
        self.readers.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", &path, e)),
        }
    }

    /// Overwrite the payloads at `locations` (checksum included) with zeros and sync, so
    /// what they held can no longer be read from the files; for erasing an org's data from
    /// segments it shares with others. Their index entries must be gone already (a later
    /// read of one would find a checksum mismatch). A payload in a segment already deleted
    /// is gone anyway.
    pub fn erase(&self, locations: &[Location]) -> Result<(), Error> {
        let mut by_segment: HashMap<u64, Vec<Location>> = HashMap::new();
        for location in locations {
            by_segment.entry(location.segment).or_default().push(*location);
        }
        for (id, locations) in by_segment {
            let path = self.path(id);
            let file = match OpenOptions::new().write(true).open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("opening", &path, e)),
            };
            for location in locations {
                let zeros = vec![0u8; CRC_LEN as usize + location.len as usize];
                file.write_all_at(&zeros, location.offset).map_err(|e| io("erasing in", &path, e))?;
            }
            file.sync_data().map_err(|e| io("syncing", &path, e))?;
        }
        Ok(())
    }

    /// Hold telemetry writes still: the writer commits no group while the guard lives.
    pub fn pause(&self) -> std::sync::MutexGuard<'_, ()> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open every segment file now on disk: `(id, file, length)`. An open file stays
    /// readable after retention deletes it, so a backup can copy what it indexed.
    pub fn open_all(&self) -> Result<Vec<(u64, File, u64)>, Error> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| io("listing", &self.dir, e))? {
            let entry = entry.map_err(|e| io("listing", &self.dir, e))?;
            let Some(id) = entry.file_name().to_str().and_then(parse_name) else { continue };
            match File::open(entry.path()) {
                Ok(file) => {
                    let len = file.metadata().map_err(|e| io("reading", &entry.path(), e))?.len();
                    out.push((id, file, len));
                }
                // Deleted by retention between the listing and the open: nothing indexes it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("opening", &entry.path(), e)),
            }
        }
        out.sort_by_key(|(id, _, _)| *id);
        Ok(out)
    }

    /// The file name of segment `id` (relative to the segment directory).
    pub fn file_name(id: u64) -> String {
        file_name(id)
    }

    /// Segment files on disk and their total size.
    pub fn usage(&self) -> (u64, u64) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return (0, 0) };
        entries
            .flatten()
            .filter(|e| e.file_name().to_str().and_then(parse_name).is_some())
            .fold((0, 0), |(n, bytes), e| (n + 1, bytes + e.metadata().map_or(0, |m| m.len())))
    }
}

/// The writer's handle on the newest segment.
#[derive(Debug)]
pub struct Appender {
    segments: Arc<Segments>,
    file: Option<File>,
    id: u64,
    len: u64,
}

impl Appender {
    fn rotate(&mut self) -> Result<(), Error> {
        let id = self.id + 1;
        let path = self.segments.path(id);
        let file = OpenOptions::new().create_new(true).append(true).open(&path).map_err(|e| io("creating", &path, e))?;
        File::open(&self.segments.dir).and_then(|d| d.sync_all()).map_err(|e| io("syncing", &self.segments.dir, e))?;
        // Counted from the start, so a prune never deletes it while it fills.
        self.segments.refs.lock().unwrap_or_else(|p| p.into_inner()).entry(id).or_default();
        self.segments.active.store(id, Ordering::Release);
        let previous = self.id;
        (self.file, self.id, self.len) = (Some(file), id, 0);
        // The previous segment may already have lost every reference.
        if previous > 0 && self.segments.refs.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&previous) {
            self.segments.remove_if_unreferenced(previous)?;
        }
        Ok(())
    }

    /// Append `payloads` and sync them; returns where each went. Starts a new segment first
    /// when the current one is full.
    pub fn append(&mut self, payloads: &[&[u8]]) -> Result<Vec<Location>, Error> {
        if self.len >= SEGMENT_BYTES {
            self.rotate()?;
        }
        let mut buf = Vec::with_capacity(payloads.iter().map(|p| p.len() + CRC_LEN as usize).sum());
        let mut locations = Vec::with_capacity(payloads.len());
        for payload in payloads {
            let len = u32::try_from(payload.len()).map_err(|_| Error::Corrupt("telemetry chunk over 4 GiB".into()))?;
            locations.push(Location { segment: self.id, offset: self.len + buf.len() as u64, len });
            buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
            buf.extend_from_slice(payload);
        }
        let path = self.segments.path(self.id);
        let Some(file) = self.file.as_mut() else { return Err(Error::Corrupt("no active segment".into())) };
        file.write_all(&buf).and_then(|()| file.sync_data()).map_err(|e| io("writing", &path, e))?;
        self.len += buf.len() as u64;
        Ok(locations)
    }

    /// The segment directory this appender writes to (for [`Segments::pause`]).
    pub fn segments(&self) -> Arc<Segments> {
        self.segments.clone()
    }

    /// Count index entries just written for `locations`.
    pub fn referenced(&self, locations: &[Location]) {
        let mut added: HashMap<u64, u64> = HashMap::new();
        for location in locations {
            *added.entry(location.segment).or_default() += 1;
        }
        self.segments.add_refs(&added);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        std::env::temp_dir().join(format!("gantry-segments-{}", rand::random::<u64>()))
    }

    #[test]
    fn payloads_read_back_and_damage_is_detected() {
        let dir = dir();
        let segments = Arc::new(Segments::open(&dir, std::iter::empty()).unwrap());
        let mut appender = segments.appender().unwrap();
        let at = appender.append(&[b"first", b"second payload"]).unwrap();
        appender.referenced(&at);
        assert_eq!(segments.read(at[0]).unwrap(), b"first");
        assert_eq!(segments.read(at[1]).unwrap(), b"second payload");
        // Flip one byte of the second payload on disk.
        let path = segments.path(at[1].segment);
        let mut bytes = std::fs::read(&path).unwrap();
        let index = (at[1].offset + CRC_LEN + 2) as usize;
        bytes[index] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        segments.readers.lock().unwrap().clear();
        assert!(matches!(segments.read(at[1]), Err(Error::Corrupt(_))));
        assert_eq!(segments.read(at[0]).unwrap(), b"first");
    }

    #[test]
    fn unreferenced_segments_go_and_a_restart_never_appends_to_an_old_one() {
        let dir = dir();
        let segments = Arc::new(Segments::open(&dir, std::iter::empty()).unwrap());
        let mut appender = segments.appender().unwrap();
        let kept = appender.append(&[b"kept"]).unwrap();
        appender.referenced(&kept);
        let lost = appender.append(&[b"never indexed"]).unwrap();
        drop(appender);
        assert_eq!(kept[0].segment, lost[0].segment);
        // Restart: the old segment is referenced (kept), the new appender starts after it.
        let segments = Arc::new(Segments::open(&dir, kept.iter().copied()).unwrap());
        let mut appender = segments.appender().unwrap();
        let next = appender.append(&[b"next"]).unwrap();
        appender.referenced(&next);
        assert!(next[0].segment > kept[0].segment);
        assert_eq!(segments.read(kept[0]).unwrap(), b"kept");
        assert_eq!(segments.usage().0, 2);
        // Its last reference pruned, the old segment is deleted; the active one stays.
        segments.release(&kept).unwrap();
        assert_eq!(segments.usage().0, 1);
        segments.release(&next).unwrap();
        assert_eq!(segments.usage().0, 1, "the active segment is never deleted");
        // A restart with no references removes everything unreferenced.
        drop(appender);
        let segments = Segments::open(&dir, std::iter::empty()).unwrap();
        assert_eq!(segments.usage().0, 0);
    }
}
