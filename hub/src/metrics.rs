//! Prometheus metrics: counters kept as atomics, rendered as text at `/metrics`.
//!
//! Names follow `gantry_<thing>_<unit>_total`; labels come from small fixed sets. This
//! module only counts and renders; callers decide what happened.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Outcomes of an enrollment attempt (fixed label set).
pub const ENROLL_RESULTS: [&str; 8] = ["ok", "malformed", "unknown_token", "expired", "used_up", "org_limit", "org_refused", "error"];

/// Every counter the hub exports.
#[derive(Debug, Default)]
pub struct Metrics {
    pub quic_connections_accepted: AtomicU64,
    pub quic_connections_refused: AtomicU64,
    pub quic_retries_sent: AtomicU64,
    pub quic_handshakes_failed: AtomicU64,
    pub sessions_started: AtomicU64,
    pub sessions_refused: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub heartbeats: AtomicU64,
    pub certificates_renewed: AtomicU64,
    pub agents_revoked: AtomicU64,
    pub http_requests: AtomicU64,
    pub logins_failed: AtomicU64,
    /// API requests refused with 429 by a rate limit.
    pub http_rate_limited: AtomicU64,
    /// Login attempts refused with 429, unchecked, by the failed-login throttle.
    pub logins_throttled: AtomicU64,
    pub retention_runs: AtomicU64,
    pub retention_pruned: AtomicU64,
    pub retention_last_run_ms: AtomicU64,
    pub retention_last_duration_ms: AtomicU64,
    /// Webhook delivery attempts made (each POST, whatever its outcome).
    pub webhook_attempts: AtomicU64,
    /// Webhook deliveries answered with 2xx.
    pub webhook_deliveries_succeeded: AtomicU64,
    /// Webhook deliveries given up on (retries exhausted, endpoint disabled or deleted).
    pub webhook_deliveries_failed: AtomicU64,
    /// Webhook deliveries waiting for an attempt (a gauge the delivery worker sets).
    pub webhook_deliveries_pending: AtomicU64,
    enrollments: [AtomicU64; ENROLL_RESULTS.len()],
    ingest: [IngestCounters; 4],
}

/// Ingest counters of one telemetry class.
#[derive(Debug, Default)]
pub struct IngestCounters {
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub batches: AtomicU64,
    pub duplicates: AtomicU64,
    /// Age of the newest record of the last batch, in milliseconds.
    pub lag_ms: AtomicU64,
    /// Records agents reported dropped from full spools (gap markers).
    pub dropped: AtomicU64,
}

/// Picks one counter out of a class's [`IngestCounters`].
type CounterField = fn(&IngestCounters) -> &AtomicU64;

/// Telemetry classes in the order of [`Metrics::ingest`] (fixed label set).
pub const INGEST_CLASSES: [gantry_shared::message::StreamClass; 4] = gantry_shared::message::StreamClass::ALL;

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Count an enrollment outcome; `result` must be one of [`ENROLL_RESULTS`].
    pub fn enrollment(&self, result: &str) {
        let index = ENROLL_RESULTS.iter().position(|r| *r == result).unwrap_or(ENROLL_RESULTS.len() - 1);
        self.enrollments[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Count one stored telemetry batch.
    pub fn ingested(&self, class: gantry_shared::message::StreamClass, outcome: &crate::store::IngestOutcome, now_ms: i64) {
        let counters = &self.ingest[class.index()];
        counters.records.fetch_add(outcome.accepted as u64, Ordering::Relaxed);
        counters.bytes.fetch_add(outcome.bytes as u64, Ordering::Relaxed);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters.duplicates.fetch_add(outcome.duplicates as u64, Ordering::Relaxed);
        counters.dropped.fetch_add(outcome.gap_records, Ordering::Relaxed);
        if let Some(newest) = outcome.newest_ts_ms {
            counters.lag_ms.store(now_ms.saturating_sub(newest).max(0) as u64, Ordering::Relaxed);
        }
    }

    /// Prometheus text exposition, with the live gauges passed in.
    pub fn render(&self, agents_connected: usize, agents_enrolled: usize) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Ordering::Relaxed));
        };
        counter("gantry_quic_connections_accepted_total", "QUIC connections that completed a handshake.", &self.quic_connections_accepted);
        counter("gantry_quic_connections_refused_total", "QUIC connection attempts refused over the connection limit.", &self.quic_connections_refused);
        counter("gantry_quic_retries_total", "QUIC Retry packets sent to validate client addresses under load.", &self.quic_retries_sent);
        counter("gantry_quic_handshakes_failed_total", "QUIC handshakes that failed (bad certificate, timeout).", &self.quic_handshakes_failed);
        counter("gantry_agent_sessions_started_total", "Authenticated agent sessions established.", &self.sessions_started);
        counter("gantry_agent_sessions_refused_total", "Authenticated connections refused (revoked, unknown, expired).", &self.sessions_refused);
        counter("gantry_protocol_errors_total", "Connections closed for breaking the wire protocol.", &self.protocol_errors);
        counter("gantry_heartbeats_total", "Agent heartbeats received.", &self.heartbeats);
        counter("gantry_certificates_renewed_total", "Agent certificates renewed over a live session.", &self.certificates_renewed);
        counter("gantry_agents_revoked_total", "Agents revoked by operators.", &self.agents_revoked);
        counter("gantry_http_requests_total", "HTTP requests served.", &self.http_requests);
        counter("gantry_logins_failed_total", "Failed login attempts.", &self.logins_failed);
        counter("gantry_http_rate_limited_total", "API requests refused with 429 by a rate limit.", &self.http_rate_limited);
        counter("gantry_logins_throttled_total", "Login attempts refused with 429 after too many failures.", &self.logins_throttled);
        counter("gantry_retention_runs_total", "Runs of the retention pruner.", &self.retention_runs);
        counter("gantry_retention_pruned_total", "Telemetry entries deleted by retention.", &self.retention_pruned);
        counter("gantry_webhook_delivery_attempts_total", "Webhook delivery attempts made, whatever their outcome.", &self.webhook_attempts);
        counter("gantry_webhook_deliveries_succeeded_total", "Webhook deliveries answered with 2xx.", &self.webhook_deliveries_succeeded);
        counter(
            "gantry_webhook_deliveries_failed_total",
            "Webhook deliveries given up on (retries exhausted, endpoint disabled or deleted).",
            &self.webhook_deliveries_failed,
        );
        let _ = writeln!(
            out,
            "# HELP gantry_webhook_deliveries_pending Webhook deliveries waiting for an attempt.\n# TYPE gantry_webhook_deliveries_pending gauge\ngantry_webhook_deliveries_pending {}",
            self.webhook_deliveries_pending.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP gantry_retention_last_run_timestamp_seconds When the pruner last finished.\n# TYPE gantry_retention_last_run_timestamp_seconds gauge\ngantry_retention_last_run_timestamp_seconds {:.3}",
            self.retention_last_run_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
        let _ = writeln!(
            out,
            "# HELP gantry_retention_last_run_duration_seconds How long the last pruner run took.\n# TYPE gantry_retention_last_run_duration_seconds gauge\ngantry_retention_last_run_duration_seconds {:.3}",
            self.retention_last_duration_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
        let _ = writeln!(out, "# HELP gantry_enrollments_total Enrollment attempts by result.\n# TYPE gantry_enrollments_total counter");
        for (result, value) in ENROLL_RESULTS.iter().zip(&self.enrollments) {
            let _ = writeln!(out, "gantry_enrollments_total{{result=\"{result}\"}} {}", value.load(Ordering::Relaxed));
        }
        let families: [(&str, &str, CounterField); 5] = [
            ("gantry_agent_spool_dropped_records_total", "Records agents dropped from full spools (reported by gap markers), by class.", |c| &c.dropped),
            ("gantry_ingest_records_total", "Telemetry records stored, by class.", |c| &c.records),
            ("gantry_ingest_bytes_total", "Telemetry bytes stored, by class.", |c| &c.bytes),
            ("gantry_ingest_batches_total", "Telemetry batches stored and acknowledged, by class.", |c| &c.batches),
            ("gantry_ingest_duplicates_total", "Resent telemetry records dropped as duplicates, by class.", |c| &c.duplicates),
        ];
        for (name, help, field) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (class, counters) in INGEST_CLASSES.iter().zip(&self.ingest) {
                let _ = writeln!(out, "{name}{{class=\"{}\"}} {}", class.name(), field(counters).load(Ordering::Relaxed));
            }
        }
        let _ = writeln!(
            out,
            "# HELP gantry_ingest_lag_seconds Age of the newest record in the last stored batch, by class.\n# TYPE gantry_ingest_lag_seconds gauge"
        );
        for (class, counters) in INGEST_CLASSES.iter().zip(&self.ingest) {
            let _ = writeln!(out, "gantry_ingest_lag_seconds{{class=\"{}\"}} {:.3}", class.name(), counters.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0);
        }
        let _ = writeln!(
            out,
            "# HELP gantry_agents_connected Agents with a live session.\n# TYPE gantry_agents_connected gauge\ngantry_agents_connected {agents_connected}"
        );
        let _ = writeln!(
            out,
            "# HELP gantry_agents_enrolled Agents enrolled and not revoked.\n# TYPE gantry_agents_enrolled gauge\ngantry_agents_enrolled {agents_enrolled}"
        );
        out
    }
}
