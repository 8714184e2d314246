//! Invoices: a subscription's period split at plan changes and the trial's end, each piece
//! priced by the plan version it was on with the usage the ledger holds; and closing ended
//! periods, after which an invoice never changes.

use super::plans::{period_containing, Subscription};
use super::pricing::{compute_invoice, Adjustment, Invoice, Segment};
use super::Meter;
use crate::store::{ClosedInvoice, Error};
use crate::Hub;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum InvoiceError {
    #[error(transparent)]
    Store(#[from] Error),
    #[error("{0}")]
    Pricing(String),
}

/// The org's usage per meter over `[from, to)` from the ledger (never below zero).
pub fn usage(hub: &Hub, org: &str, from_ms: i64, to_ms: i64) -> Result<BTreeMap<Meter, u64>, Error> {
    Ok(hub.store.ledger_usage(org, from_ms, to_ms)?.into_iter().map(|(m, q)| (m, q.max(0) as u64)).collect())
}

/// The invoice of `s`'s period `[start, end)`: split at plan changes and the trial's end,
/// each piece priced by the plan version it was on, with the usage the ledger holds, and
/// late usage of earlier closed periods carried onto it.
pub fn invoice_for(hub: &Hub, s: &Subscription, start: i64, end: i64) -> Result<Invoice, InvoiceError> {
    Ok(invoice_with_late_usage(hub, s, start, end)?.0)
}

/// What `[start, end)`'s own usage costs, with `adjustments` added.
fn priced(hub: &Hub, s: &Subscription, start: i64, end: i64, adjustments: &[Adjustment]) -> Result<Invoice, InvoiceError> {
    let mut cuts = vec![start, end];
    cuts.extend(s.changes.iter().map(|c| c.at_ms).filter(|t| *t > start && *t < end));
    cuts.extend(s.trial_end_ms.filter(|t| *t > start && *t < end));
    cuts.sort_unstable();
    cuts.dedup();
    let mut segments = Vec::new();
    for pair in cuts.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        let change = s
            .changes
            .iter()
            .rev()
            .find(|c| c.at_ms <= from)
            .or(s.changes.first())
            .ok_or_else(|| InvoiceError::Pricing("subscription without a plan".into()))?;
        let plan = hub
            .store
            .plan_version(&change.plan_id, change.plan_version)?
            .ok_or_else(|| Error::NotFound(format!("plan {} version {}", change.plan_id, change.plan_version)))?;
        let trial = s.trial_end_ms.is_some_and(|t| from < t);
        segments.push(Segment {
            from_ms: from,
            to_ms: to,
            plan_id: plan.id,
            plan_version: plan.version,
            prices: plan.prices,
            trial,
            usage: usage(hub, &s.org, from, to)?,
        });
    }
    compute_invoice(start, end, &segments, adjustments).map_err(InvoiceError::Pricing)
}

/// The invoice of `[start, end)` with late usage carried onto it: for each earlier closed
/// period, what its usage costs now, minus what its invoice charged and what invoices after
/// it already carried. Returns the invoice and what it carries, by earlier period start.
pub fn invoice_with_late_usage(hub: &Hub, s: &Subscription, start: i64, end: i64) -> Result<(Invoice, BTreeMap<i64, i64>), InvoiceError> {
    let closed = hub.store.closed_invoices(&s.org)?;
    let mut adjustments = Vec::new();
    let mut carried = BTreeMap::new();
    for earlier in closed.iter().filter(|c| c.invoice.to_ms <= start) {
        let from = earlier.invoice.from_ms;
        let already: i64 = closed.iter().filter(|c| c.invoice.from_ms > from && c.invoice.from_ms < start).filter_map(|c| c.carried.get(&from)).sum();
        let own_total = earlier.invoice.total_minor - earlier.carried.values().sum::<i64>();
        let late = priced(hub, s, from, earlier.invoice.to_ms, &[])?.total_minor - own_total - already;
        if late != 0 {
            let day = crate::api::rfc3339(from);
            adjustments.push(Adjustment {
                description: format!("usage reported after the period starting {} was invoiced", day.get(..10).unwrap_or(&day)),
                amount_minor: late,
                reason: "late usage".into(),
            });
            carried.insert(from, late);
        }
    }
    Ok((priced(hub, s, start, end, &adjustments)?, carried))
}

/// Close every ended period of every subscription whose usage is complete (`settled_ms`:
/// the ledger holds every hour before it). Idempotent: a closed period is never recomputed.
pub fn close_periods(hub: &Hub, settled_ms: i64) -> Result<usize, InvoiceError> {
    let mut closed = 0;
    for s in hub.store.subscriptions()? {
        let mut start = s.period_anchor_ms;
        loop {
            let (_, end) = period_containing(s.period_anchor_ms, start);
            if end > settled_ms {
                break;
            }
            if hub.store.closed_invoice(&s.org, start)?.is_none() {
                let (invoice, carried) = invoice_with_late_usage(hub, &s, start, end)?;
                let id = format!("inv_{}_{}", s.org, crate::api::rfc3339(start).get(..10).unwrap_or_default().replace('-', ""));
                hub.store.close_invoice(&ClosedInvoice { id, org: s.org.clone(), invoice, closed_at_ms: crate::wall_ms(), carried })?;
                closed += 1;
            }
            start = end;
        }
    }
    Ok(closed)
}
