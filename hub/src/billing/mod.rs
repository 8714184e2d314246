//! Billing: what each org may use (plans and subscriptions), what it did use (the usage
//! ledger), what that costs (pricing and invoices), and handing it to Stripe.
//!
//! Money is integer minor units (cents) of one ISO 4217 currency per plan; no floating
//! point touches it anywhere. Periods are half-open `[start, end)` in UTC milliseconds.
//!
//! - `pricing.rs`: pure charge models and invoice computation.
//! - `plans.rs`: the plan catalog, subscriptions, their status machine and entitlements.
//! - `ledger.rs`: meters fed from the hub's own records into the append-only ledger.
//! - `stripe.rs`: customer and subscription sync, the meter-event outbox, Stripe webhooks.

pub mod invoices;
pub mod ledger;
pub mod plans;
pub mod pricing;
pub mod stripe;

use serde::{Deserialize, Serialize};
use std::fmt;

/// Something the hub meters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Meter {
    /// One per agent per UTC hour in which it was connected at any time.
    AgentHours,
    /// The most agents connected at once during the period (a gauge: the period's maximum,
    /// not a sum).
    PeakAgents,
    /// Bytes of log lines ingested.
    LogBytes,
    /// Metric samples ingested.
    MetricSamples,
    /// Events ingested.
    Events,
    /// Deployment revisions created.
    Deployments,
    /// Health check executions reported by agents.
    CheckRuns,
}

impl Meter {
    pub const ALL: [Meter; 7] =
        [Meter::AgentHours, Meter::PeakAgents, Meter::LogBytes, Meter::MetricSamples, Meter::Events, Meter::Deployments, Meter::CheckRuns];

    pub fn name(self) -> &'static str {
        match self {
            Meter::AgentHours => "agent_hours",
            Meter::PeakAgents => "peak_agents",
            Meter::LogBytes => "log_bytes",
            Meter::MetricSamples => "metric_samples",
            Meter::Events => "events",
            Meter::Deployments => "deployments",
            Meter::CheckRuns => "check_runs",
        }
    }

    pub fn parse(text: &str) -> Result<Meter, String> {
        Meter::ALL.into_iter().find(|m| m.name() == text).ok_or_else(|| {
            let names: Vec<&str> = Meter::ALL.iter().map(|m| m.name()).collect();
            format!("meter {text:?} must be one of {}", names.join(", "))
        })
    }

    /// Whether the period's quantity is the maximum of its entries rather than their sum.
    pub fn is_gauge(self) -> bool {
        self == Meter::PeakAgents
    }
}

impl fmt::Display for Meter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One hour in milliseconds; ledger entries are keyed by the UTC hour they fall in.
pub const HOUR_MS: i64 = 3_600_000;

/// The start of the UTC hour holding `ms`.
pub fn hour_of(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS) * HOUR_MS
}
