//! Telemetry ingest: one task per agent telemetry stream. Reads batches, stores each with
//! the stream's new high-water mark in one durable write, and only then acknowledges.
//!
//! The first ack (right after `Open`) tells a reconnecting agent what the hub already has,
//! so it deletes those records instead of resending them. A protocol violation on a
//! telemetry stream closes the agent's connection; other agents are unaffected.

use crate::metrics::Metrics;
use crate::Hub;
use futures_util::FutureExt;
use gantry_agent::wire::{FramedRecv, FramedSend, WireError};
use gantry_shared::message::{Ack, ErrorCode, StreamClass};
use gantry_shared::telemetry::{StreamDown, StreamUp};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, warn};

/// Batches a slow live-tail subscriber may fall behind before it re-reads from the store.
pub const LIVE_BUFFER: usize = 1024;

/// A stored batch, as published to live tails.
#[derive(Debug)]
pub struct LiveBatch {
    pub agent: String,
    pub class: StreamClass,
    pub records: Vec<gantry_shared::telemetry::Record>,
}

/// Most records accepted in one batch.
pub const MAX_BATCH_RECORDS: usize = 10_000;
/// Records at which already-arrived batches stop being merged into one write (a full chunk).
pub const COALESCE_RECORDS: usize = 2_000;
/// How far ahead of the hub's clock a record's timestamp may be; later ones are clamped.
pub const MAX_FUTURE_SKEW_MS: i64 = 3_600_000;
/// How long a new stream has to say which class it carries.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve one telemetry stream of `agent_id` until the agent finishes it or the connection
/// ends.
pub async fn serve_stream(hub: Arc<Hub>, connection: quinn::Connection, agent_id: String, send: quinn::SendStream, recv: quinn::RecvStream) {
    let max_frame = hub.config.max_frame_bytes;
    let mut send = FramedSend::new(send, max_frame);
    let mut recv = FramedRecv::new(recv, max_frame);
    let class = match tokio::time::timeout(OPEN_TIMEOUT, recv.next::<StreamUp>()).await {
        Ok(Ok(Some(StreamUp::Open { class }))) => class,
        Ok(Ok(None)) | Ok(Err(WireError::Read(_))) => return,
        Ok(Ok(Some(_))) => return violation(&hub, &connection, "telemetry stream must start with Open"),
        Ok(Err(error)) => return violation(&hub, &connection, &error.to_string()),
        Err(_) => return violation(&hub, &connection, "telemetry stream did not say its class"),
    };
    let mark = match hub.store.high_water(&agent_id, class) {
        Ok(mark) => mark,
        Err(error) => {
            warn!(%error, "cannot read the stream's high-water mark");
            return;
        }
    };
    if send.send(&StreamDown::Ack(Ack { stream: class, up_to_seq: mark })).await.is_err() {
        return;
    }
    let mut finishing = false;
    let mut billing = Entitlement::default();
    loop {
        let batch = match recv.next::<StreamUp>().await {
            Ok(Some(StreamUp::Batch(batch))) => batch,
            Ok(Some(StreamUp::Open { .. })) => return violation(&hub, &connection, "telemetry stream opened twice"),
            Ok(None) => return,
            Err(error) if error.is_protocol() => return violation(&hub, &connection, &error.to_string()),
            Err(_) => return,
        };
        if batch.records.len() > MAX_BATCH_RECORDS {
            return violation(&hub, &connection, "telemetry batch has too many records");
        }
        // Batches that have already arrived are stored and acknowledged together: one write
        // and one ack instead of several, so a busy hub does less work per record the
        // further it falls behind. The ack carries the highest mark, which covers them all.
        let mut batch = batch;
        while batch.records.len() < COALESCE_RECORDS {
            match recv.next::<StreamUp>().now_or_never() {
                None => break,
                Some(Ok(Some(StreamUp::Batch(more)))) if more.records.len() <= MAX_BATCH_RECORDS => batch.records.extend(more.records),
                Some(Ok(Some(StreamUp::Batch(_)))) => return violation(&hub, &connection, "telemetry batch has too many records"),
                Some(Ok(Some(StreamUp::Open { .. }))) => return violation(&hub, &connection, "telemetry stream opened twice"),
                Some(Err(error)) if error.is_protocol() => return violation(&hub, &connection, &error.to_string()),
                // The stream or connection ended: store what arrived whole, then stop.
                Some(Ok(None)) | Some(Err(_)) => {
                    finishing = true;
                    break;
                }
            }
        }
        // A record may not claim to come from the future (a wrong agent clock would park it
        // beyond retention for ever); older timestamps are normal after an outage.
        let latest = crate::wall_ms().saturating_add(MAX_FUTURE_SKEW_MS);
        for record in &mut batch.records {
            record.ts_unix_ms = record.ts_unix_ms.min(latest);
        }
        // A suspended or canceled org's agents keep their records: refused, not dropped.
        if let Some(reason) = billing.refusal(&hub, &agent_id, class) {
            let _ = send.send(&StreamDown::Refused { reason, retry_after_ms: REFUSED_RETRY_MS }).await;
            if finishing {
                return;
            }
            continue;
        }
        let outcome = match hub.store.ingest(&agent_id, class, &batch.records).await {
            Ok(outcome) => outcome,
            Err(error) => {
                // Not acknowledged: the agent keeps the records and resends them.
                warn!(%error, ?class, "could not store a telemetry batch");
                let reply = StreamDown::Refused { reason: "hub store unavailable".into(), retry_after_ms: 1000 };
                let _ = send.send(&reply).await;
                continue;
            }
        };
        hub.metrics.ingested(class, &outcome, crate::wall_ms());
        if outcome.accepted > 0 {
            match class {
                StreamClass::Health => crate::checks::record_reports(&hub, &agent_id, &batch.records, outcome.previous_high_water),
                StreamClass::Metrics => hub.health.observe_metrics(&agent_id, &batch.records),
                _ => {}
            }
            if outcome.gap_records > 0 {
                hub.health.observe_drop(&agent_id, crate::wall_ms());
            }
        }
        if outcome.accepted > 0 && hub.live.receiver_count() > 0 {
            let mut mark = outcome.previous_high_water;
            let records = batch
                .records
                .into_iter()
                .filter(|r| {
                    let fresh = r.seq > mark;
                    mark = mark.max(r.seq);
                    fresh
                })
                .collect();
            let _ = hub.live.send(Arc::new(LiveBatch { agent: agent_id.clone(), class, records }));
        }
        debug!(?class, accepted = outcome.accepted, duplicates = outcome.duplicates, mark = outcome.high_water, "batch stored");
        if send.send(&StreamDown::Ack(Ack { stream: class, up_to_seq: outcome.high_water })).await.is_err() || finishing {
            return;
        }
    }
}

fn violation(hub: &Hub, connection: &quinn::Connection, reason: &str) {
    Metrics::inc(&hub.metrics.protocol_errors);
    warn!(reason, "closing connection for a telemetry protocol error");
    connection.close(ErrorCode::Protocol.as_u32().into(), reason.as_bytes());
}

/// How long an answer about the org's entitlement to ingest holds before it is asked again
/// (sooner when any subscription's status changes).
const ENTITLEMENT_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);
/// When the agent of a refused org tries again.
const REFUSED_RETRY_MS: u64 = 5_000;

/// Whether the agent's org may ingest, asked at most every [`ENTITLEMENT_RECHECK`] unless
/// a status changed meanwhile.
#[derive(Default)]
struct Entitlement {
    checked: Option<(std::time::Instant, u64, Option<String>)>,
}

impl Entitlement {
    fn refusal(&mut self, hub: &Hub, agent_id: &str, class: StreamClass) -> Option<String> {
        let epoch = crate::billing::plans::entitlement_epoch();
        if let Some((at, seen, answer)) = &self.checked {
            if at.elapsed() < ENTITLEMENT_RECHECK && *seen == epoch {
                return answer.clone();
            }
        }
        let answer = match hub.store.agent(agent_id) {
            Ok(Some(agent)) => crate::billing::plans::require(hub, &agent.org, "sending telemetry", |e| e.ingest)
                .err()
                .or_else(|| crate::billing::plans::quota_refusal(hub, &agent.org, class, crate::wall_ms())),
            _ => None,
        };
        self.checked = Some((std::time::Instant::now(), epoch, answer.clone()));
        answer
    }
}
