//! Stripe's share of the store: the meter-event outbox with its ledger cursor, and the
//! Stripe webhook events already processed with the ordering marks that make late events
//! converge.
//!
//! Keys: outbox rows by their meter-event identifier, and the identifiers of the open ones
//! (`pending` or `sent`) in their own tree, so a pass reads only those; the cursor under
//! `cursor` in the meta tree; events by Stripe event id; ordering marks by org. The cursor only moves in the same
//! transaction that writes the rows of the entries it passes, so an entry is never skipped
//! and never queued twice. This module decides nothing about Stripe: callers pass the rows
//! and the rules (`billing/stripe.rs`).

use super::{decode, encode, Error, Store};
use crate::billing::Meter;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

/// The trees of this module.
#[derive(Debug, Clone)]
pub(super) struct Trees {
    outbox: sled::Tree,
    /// Identifiers of rows still `pending` or `sent`.
    open: sled::Tree,
    meta: sled::Tree,
    events: sled::Tree,
    marks: sled::Tree,
}

impl Trees {
    pub fn open(db: &sled::Db) -> Result<Trees, Error> {
        Ok(Trees {
            outbox: db.open_tree("stripe_outbox")?,
            open: db.open_tree("stripe_outbox_open")?,
            meta: db.open_tree("stripe_meta")?,
            events: db.open_tree("stripe_events")?,
            marks: db.open_tree("stripe_marks")?,
        })
    }
}

const CURSOR_KEY: &[u8] = b"cursor";

/// Where an outbox row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutboxState {
    /// Not sent yet (or Stripe refused it with a retryable answer).
    Pending,
    /// A request left; whether Stripe recorded it is unknown until it answers or a
    /// reconciliation decides.
    Sent,
    /// Stripe recorded it.
    Confirmed,
    /// Not sendable as a meter event (older than Stripe's 35-day window, or a negative
    /// correction): reported as an invoice adjustment instead.
    Fallback,
    /// A reconciliation could not tell whether Stripe has it: an operator decides.
    NeedsReview,
}

impl OutboxState {
    /// Whether the exporter still has work with a row in this state.
    pub fn is_open(self) -> bool {
        matches!(self, OutboxState::Pending | OutboxState::Sent)
    }

    pub fn name(self) -> &'static str {
        match self {
            OutboxState::Pending => "pending",
            OutboxState::Sent => "sent",
            OutboxState::Confirmed => "confirmed",
            OutboxState::Fallback => "fallback",
            OutboxState::NeedsReview => "needs_review",
        }
    }
}

/// One ledger entry on its way to Stripe as a meter event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OutboxRow {
    /// The meter event's `identifier`, also its `Idempotency-Key`.
    pub identifier: String,
    /// The ledger entry's sequence number.
    pub seq: u64,
    pub org: String,
    pub meter: Meter,
    pub hour_ms: i64,
    pub source: String,
    pub quantity: i64,
    pub state: OutboxState,
    pub created_at_ms: i64,
    /// When the last request left (for the 24 h identifier window).
    pub sent_at_ms: Option<i64>,
    /// When the first request left: resending with the same key is safe only while
    /// Stripe still remembers it.
    pub first_sent_at_ms: Option<i64>,
    pub confirmed_at_ms: Option<i64>,
    pub attempts: u32,
    /// Why the row is in `fallback` or `needs_review`, or the last error.
    pub note: Option<String>,
}

/// A Stripe webhook event already processed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeEvent {
    pub id: String,
    pub event_type: String,
    /// Stripe's `created`, Unix seconds.
    pub created: i64,
    pub org: Option<String>,
    /// What it did (`payment_failed`, `stale: ...`, `ignored: ...`).
    pub effect: String,
    pub received_at_ms: i64,
    /// Recorded with an effect to apply that is not confirmed applied yet (the hub stopped
    /// in between, or applying failed): a redelivery applies it then, and the subscription
    /// itself remembers the events it carries, so it is never applied twice.
    #[serde(default)]
    pub pending: bool,
}

/// Per org: the newest Stripe event times already applied, per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderMarks {
    pub payment_failed: i64,
    pub payment_succeeded: i64,
    pub subscription: i64,
}

/// What recording an event found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Seen before: nothing done.
    Duplicate(StripeEvent),
    /// Recorded now; `apply` says whether its effect is to be applied (not stale).
    New { apply: bool },
}

fn abort(e: Error) -> ConflictableTransactionError<Error> {
    ConflictableTransactionError::Abort(e)
}

fn unwrap_tx(e: TransactionError<Error>) -> Error {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => Error::Sled(e),
    }
}

impl Store {
    /// The last ledger sequence number queued (0 before any).
    pub fn stripe_cursor(&self) -> Result<u64, Error> {
        Ok(match self.stripe.meta.get(CURSOR_KEY)? {
            Some(raw) => u64::from_be_bytes(raw.as_ref().try_into().map_err(|_| Error::Corrupt("stripe cursor".into()))?),
            None => 0,
        })
    }

    /// Queue `rows` and move the cursor to `cursor`, in one transaction, only if the cursor is
    /// still `expected` (another exporter moved it otherwise: [`Error::Conflict`]). A row
    /// whose identifier is already queued is left as it is.
    pub fn stripe_enqueue(&self, expected: u64, cursor: u64, rows: &[OutboxRow]) -> Result<(), Error> {
        let _writing = self.writing();
        (&self.stripe.outbox, &self.stripe.open, &self.stripe.meta)
            .transaction(|(outbox, open, meta)| {
                let current = match meta.get(CURSOR_KEY)? {
                    Some(raw) => u64::from_be_bytes(raw.as_ref().try_into().map_err(|_| abort(Error::Corrupt("stripe cursor".into())))?),
                    None => 0,
                };
                if current != expected {
                    return Err(abort(Error::Conflict(format!("stripe cursor moved from {expected} to {current}"))));
                }
                for row in rows {
                    if outbox.get(row.identifier.as_bytes())?.is_none() {
                        outbox.insert(row.identifier.as_bytes(), encode(row))?;
                        if row.state.is_open() {
                            open.insert(row.identifier.as_bytes(), &[])?;
                        }
                    }
                }
                meta.insert(CURSOR_KEY, &cursor.to_be_bytes())?;
                Ok(())
            })
            .map_err(unwrap_tx)?;
        self.durable()
    }

    /// Every outbox row in `states` (all rows when empty), in identifier order.
    pub fn stripe_outbox(&self, states: &[OutboxState]) -> Result<Vec<OutboxRow>, Error> {
        let mut rows = Vec::new();
        for item in self.stripe.outbox.iter() {
            let (_, value) = item?;
            let row: OutboxRow = decode("stripe outbox row", &value)?;
            if states.is_empty() || states.contains(&row.state) {
                rows.push(row);
            }
        }
        Ok(rows)
    }

    /// The rows still `pending` or `sent`, in identifier order.
    pub fn stripe_open_rows(&self) -> Result<Vec<OutboxRow>, Error> {
        let mut rows = Vec::new();
        for item in self.stripe.open.iter() {
            let (key, _) = item?;
            if let Some(value) = self.stripe.outbox.get(&key)? {
                rows.push(decode("stripe outbox row", &value)?);
            }
        }
        Ok(rows)
    }

    pub fn stripe_outbox_row(&self, identifier: &str) -> Result<Option<OutboxRow>, Error> {
        self.stripe.outbox.get(identifier.as_bytes())?.map(|v| decode("stripe outbox row", &v)).transpose()
    }

    /// Write a row's new state durably (before a request leaves, and after it answered).
    pub fn stripe_put_row(&self, row: &OutboxRow) -> Result<(), Error> {
        let _writing = self.writing();
        (&self.stripe.outbox, &self.stripe.open)
            .transaction(|(outbox, open)| {
                outbox.insert(row.identifier.as_bytes(), encode(row))?;
                if row.state.is_open() {
                    open.insert(row.identifier.as_bytes(), &[])?;
                } else {
                    open.remove(row.identifier.as_bytes())?;
                }
                Ok::<_, ConflictableTransactionError<Error>>(())
            })
            .map_err(unwrap_tx)?;
        self.durable()
    }

    /// Record a webhook event once, with the org's ordering marks, in one transaction.
    /// `decide` gets the org's marks and answers whether the event applies and the new
    /// marks. A known event id answers [`Recorded::Duplicate`] and changes nothing.
    pub fn stripe_record_event(&self, event: &StripeEvent, decide: impl Fn(OrderMarks) -> (bool, OrderMarks, String)) -> Result<Recorded, Error> {
        let _writing = self.writing();
        let recorded = (&self.stripe.events, &self.stripe.marks)
            .transaction(|(events, marks)| {
                if let Some(raw) = events.get(event.id.as_bytes())? {
                    let seen: StripeEvent = decode("stripe event", &raw).map_err(abort)?;
                    return Ok(if seen.pending { Recorded::New { apply: true } } else { Recorded::Duplicate(seen) });
                }
                let mut stored = event.clone();
                let apply = match &event.org {
                    Some(org) => {
                        let current = match marks.get(org.as_bytes())? {
                            Some(raw) => decode("stripe marks", &raw).map_err(abort)?,
                            None => OrderMarks::default(),
                        };
                        let (apply, next, effect) = decide(current);
                        marks.insert(org.as_bytes(), encode(&next))?;
                        stored.effect = effect;
                        stored.pending = apply;
                        apply
                    }
                    None => false,
                };
                events.insert(event.id.as_bytes(), encode(&stored))?;
                Ok(Recorded::New { apply })
            })
            .map_err(unwrap_tx)?;
        self.durable()?;
        Ok(recorded)
    }

    /// The effect of a pending event is applied: later deliveries are duplicates.
    pub fn stripe_event_applied(&self, id: &str) -> Result<(), Error> {
        let _writing = self.writing();
        let Some(raw) = self.stripe.events.get(id.as_bytes())? else {
            return Ok(());
        };
        let mut event: StripeEvent = decode("stripe event", &raw)?;
        event.pending = false;
        self.stripe.events.insert(id.as_bytes(), encode(&event))?;
        self.durable()
    }

    pub fn stripe_event(&self, id: &str) -> Result<Option<StripeEvent>, Error> {
        self.stripe.events.get(id.as_bytes())?.map(|v| decode("stripe event", &v)).transpose()
    }
}
