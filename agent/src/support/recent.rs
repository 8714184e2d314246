//! The agent's own recent log lines, kept in memory for the diagnostics bundle: a writer
//! for `tracing_subscriber::fmt` that passes every line on to stderr and keeps the last
//! [`KEPT_LINES`] (escape codes removed, each cut to [`MAX_LINE_BYTES`]).
//!
//! The tracing subscriber is process-wide by nature, so the buffer it writes to is too
//! ([`recent_logs`]); nothing else here is global.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

/// Lines kept.
pub const KEPT_LINES: usize = 300;
/// Longest line kept, in bytes.
pub const MAX_LINE_BYTES: usize = 1024;

/// The kept lines, oldest first.
#[derive(Debug, Default)]
pub struct RecentLogs {
    lines: Mutex<VecDeque<String>>,
}

/// The process's buffer.
pub fn recent_logs() -> &'static RecentLogs {
    static BUFFER: OnceLock<RecentLogs> = OnceLock::new();
    BUFFER.get_or_init(RecentLogs::default)
}

impl RecentLogs {
    /// Keep the lines of `text` (one formatted event, possibly several lines).
    pub fn push(&self, text: &str) {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        for line in strip_escapes(text).lines().filter(|l| !l.trim().is_empty()) {
            if lines.len() == KEPT_LINES {
                lines.pop_front();
            }
            lines.push_back(gantry_shared::support::cut(line, MAX_LINE_BYTES).0.to_string());
        }
    }

    /// The kept lines, oldest first.
    pub fn snapshot(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `MakeWriter` for the fmt subscriber: stderr, plus a copy into [`recent_logs`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TeeToRecent;

/// One event's writer: collects the formatted text and hands it over when dropped.
#[derive(Debug, Default)]
pub struct EventWriter {
    text: Vec<u8>,
}

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        // One write per event keeps lines of concurrent events from interleaving.
        let _ = std::io::stderr().write_all(&self.text);
        recent_logs().push(&String::from_utf8_lossy(&self.text));
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for TeeToRecent {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> Self::Writer {
        EventWriter::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_without_escape_codes() {
        let logs = RecentLogs::default();
        for i in 0..KEPT_LINES + 5 {
            logs.push(&format!("\u{1b}[32m INFO\u{1b}[0m line {i}\n"));
        }
        let kept = logs.snapshot();
        assert_eq!(kept.len(), KEPT_LINES);
        assert_eq!(kept[0], " INFO line 5");
        logs.push(&"x".repeat(MAX_LINE_BYTES * 2));
        assert_eq!(logs.snapshot().last().map(String::len), Some(MAX_LINE_BYTES));
    }
}
