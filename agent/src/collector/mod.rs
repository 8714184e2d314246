//! Collectors: read telemetry from the host and hand it to the caller.
//!
//! A collector only reads. It never sends, spools or retries anything itself, and it keeps
//! no clock of its own: the caller passes the time in. A collector that must resume where
//! it stopped (the file tailer) returns an opaque checkpoint with its records; the caller
//! stores both in one transaction, so after a crash collection resumes exactly after the
//! last record durably kept (no gaps, no duplicates).

pub mod container_logs;
pub mod docker;
pub mod file;
pub mod host;
