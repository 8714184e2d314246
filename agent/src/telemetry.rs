//! Telemetry delivery: collectors put records into the [`Outbox`] (the durable spool plus
//! a wake-up per class), and one sender per class streams them to the hub over its own
//! QUIC stream, deleting records only when the hub acknowledges them.
//!
//! Up to [`WINDOW`] batches are in flight per class, so a backlog drains at the link's
//! speed rather than one round trip per batch; classes never wait for each other, so a log
//! backlog cannot starve metrics or events. This module never drops a record: only the
//! spool's cap policy does, and it leaves a gap marker.

use crate::spool::{AppendOutcome, Spool};
use crate::wire::{FramedRecv, FramedSend, WireError};
use gantry_shared::message::StreamClass;
use gantry_shared::telemetry::{Batch, Event, RecordBody, Severity, StreamDown, StreamUp};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{debug, warn};

/// Batches sent and not yet acknowledged, per class.
pub const WINDOW: usize = 4;
/// Most records per batch.
pub const BATCH_RECORDS: usize = 2000;
/// About the most bytes per batch (well under the 1 MiB frame cap).
pub const BATCH_BYTES: usize = 512 * 1024;
/// Every class, in the order senders start.
pub const CLASSES: [StreamClass; 4] = [StreamClass::Events, StreamClass::Health, StreamClass::Metrics, StreamClass::Logs];

/// Where collectors put records. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    spool: Spool,
    wake: Arc<[Notify; 4]>,
}

impl Outbox {
    pub fn new(spool: Spool) -> Outbox {
        Outbox { spool, wake: Arc::new([Notify::new(), Notify::new(), Notify::new(), Notify::new()]) }
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// The backlog per class, as reported to the hub.
    pub fn spool_state(&self) -> gantry_shared::message::SpoolState {
        let config = self.spool.config();
        let streams = StreamClass::ALL
            .into_iter()
            .map(|class| {
                let stats = self.spool.stats(class);
                gantry_shared::message::SpoolStream {
                    class,
                    records: stats.records,
                    bytes: stats.bytes,
                    cap_bytes: config.cap(class),
                    dropped_records: stats.dropped_records,
                }
            })
            .collect();
        gantry_shared::message::SpoolState { streams }
    }

    /// Spool records (and a collector checkpoint) durably, then wake the class's sender.
    /// If the spool had to drop old records to stay under its cap, an event says so.
    pub fn push(&self, class: StreamClass, items: Vec<(i64, RecordBody)>, checkpoint: Option<(&str, &[u8])>) -> Result<AppendOutcome, crate::spool::Error> {
        let outcome = self.spool.append(class, items, checkpoint)?;
        self.wake[class.index()].notify_one();
        if let Some(dropped) = &outcome.dropped {
            if class != StreamClass::Events {
                let event = Event {
                    kind: "spool.dropped".into(),
                    severity: Severity::Warning,
                    message: format!("spool full: dropped {} oldest {:?} records ({} bytes)", dropped.records, class, dropped.bytes),
                    attributes: vec![
                        ("class".into(), format!("{class:?}").to_lowercase()),
                        ("records".into(), dropped.records.to_string()),
                        ("bytes".into(), dropped.bytes.to_string()),
                    ],
                };
                self.event(event);
            }
        }
        Ok(outcome)
    }

    /// Spool one agent event; failures are logged (there is nowhere else to report them).
    pub fn event(&self, event: Event) {
        if let Err(error) = self.push(StreamClass::Events, vec![(crate::wall_ms(), RecordBody::Event(event))], None) {
            warn!(%error, "could not spool an agent event");
        }
    }

    fn wake(&self, class: StreamClass) -> &Notify {
        &self.wake[class.index()]
    }
}

/// Convenience for agent events.
pub fn agent_event(kind: &str, severity: Severity, message: impl Into<String>, attributes: Vec<(String, String)>) -> Event {
    Event { kind: kind.to_string(), severity, message: message.into(), attributes }
}

/// Stream one class to the hub until the connection ends.
pub async fn send_class(connection: quinn::Connection, outbox: Outbox, class: StreamClass, max_frame: usize) -> Result<(), WireError> {
    let (send, recv) = connection.open_bi().await.map_err(|e| WireError::Read(quinn::ReadError::ConnectionLost(e)))?;
    let mut send = FramedSend::new(send, max_frame);
    let mut recv = FramedRecv::new(recv, max_frame);
    send.send(&StreamUp::Open { class }).await?;
    // The hub's first ack is its high-water mark: everything up to it is already stored.
    let mut acked = match recv.next::<StreamDown>().await? {
        Some(StreamDown::Ack(ack)) if ack.stream == class => ack.up_to_seq,
        Some(other) => return Err(WireError::Frame(gantry_shared::frame::FrameError::Decode(format!("expected the stream's first ack, got {other:?}")))),
        None => return Ok(()),
    };
    ack_spool(&outbox, class, acked);
    let mut sent = acked;
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    loop {
        if in_flight.len() < WINDOW {
            let records = match outbox.spool.pending(class, sent, BATCH_RECORDS, BATCH_BYTES) {
                Ok(records) => records,
                Err(error) => {
                    warn!(%error, ?class, "cannot read the spool");
                    Vec::new()
                }
            };
            if let Some(last) = records.last().map(|r| r.seq) {
                debug!(?class, records = records.len(), last, "sending batch");
                send.send(&StreamUp::Batch(Batch { records })).await?;
                sent = last;
                in_flight.push_back(last);
                continue;
            }
        }
        tokio::select! {
            reply = recv.next::<StreamDown>() => match reply? {
                Some(StreamDown::Ack(ack)) => {
                    acked = acked.max(ack.up_to_seq);
                    ack_spool(&outbox, class, acked);
                    while in_flight.front().is_some_and(|seq| *seq <= acked) {
                        in_flight.pop_front();
                    }
                }
                Some(StreamDown::Refused { reason, retry_after_ms }) => {
                    warn!(?class, %reason, retry_after_ms, "hub refused a batch; keeping it and retrying");
                    tokio::time::sleep(Duration::from_millis(retry_after_ms.clamp(100, 60_000))).await;
                    // Resend everything not acknowledged; the hub drops what it already has.
                    sent = acked;
                    in_flight.clear();
                }
                None => return Ok(()),
            },
            _ = outbox.wake(class).notified(), if in_flight.len() < WINDOW => {}
            // A safety net: never sit on spooled records because a wake-up was missed.
            _ = tokio::time::sleep(Duration::from_secs(1)), if in_flight.len() < WINDOW => {}
        }
    }
}

fn ack_spool(outbox: &Outbox, class: StreamClass, up_to: u64) {
    if up_to > 0 {
        if let Err(error) = outbox.spool.ack(class, up_to) {
            warn!(%error, ?class, "could not delete acknowledged records from the spool");
        }
    }
}
