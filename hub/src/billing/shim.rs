//! Stand-ins for `pricing::compute_invoice` and `Store::ledger_usage` while they are written;
//! inherent methods of the same names take precedence, and this file goes when both exist.

use super::pricing::Prices;
use super::Meter;
use crate::store::{Error, Store};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub trait ValidatePrices {
    fn validate(&self) -> Result<(), String>;
}

impl ValidatePrices for Prices {
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

pub trait LedgerUsage {
    fn ledger_usage(&self, org: &str, from_ms: i64, to_ms: i64) -> Result<BTreeMap<Meter, i64>, Error>;
}

impl LedgerUsage for Store {
    fn ledger_usage(&self, _org: &str, _from_ms: i64, _to_ms: i64) -> Result<BTreeMap<Meter, i64>, Error> {
        Ok(BTreeMap::new())
    }
}

#[derive(Debug, Clone)]
pub struct Segment {
    pub from_ms: i64,
    pub to_ms: i64,
    pub plan_id: String,
    pub plan_version: u32,
    pub prices: Prices,
    pub trial: bool,
    pub usage: BTreeMap<Meter, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Invoice {
    pub currency: String,
    pub from_ms: i64,
    pub to_ms: i64,
    pub total_minor: i64,
}

pub fn compute_invoice(from_ms: i64, to_ms: i64, segments: &[Segment], _adjustments: &[()]) -> Result<Invoice, String> {
    Ok(Invoice { currency: segments.first().map(|s| s.prices.currency.clone()).unwrap_or_default(), from_ms, to_ms, total_minor: 0 })
}
