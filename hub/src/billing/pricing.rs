//! Prices and charge models, and invoice computation from usage: pure functions, integer
//! minor units, no floating point.

use super::Meter;
use serde::{Deserialize, Serialize};

/// `minor` minor units for every `per` units (`{"minor": 5, "per": 1000000}`: 5 cents per
/// million), so prices below one minor unit per unit need no fractions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UnitPrice {
    pub minor: i64,
    #[serde(default = "one")]
    pub per: u64,
}

fn one() -> u64 {
    1
}

/// One tier: units up to and including `up_to` (the last tier has none), priced per unit,
/// plus an optional flat fee for reaching the tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub up_to: Option<u64>,
    pub unit: UnitPrice,
    #[serde(default)]
    pub flat_minor: i64,
}

/// How a meter's billable quantity (after the included allowance) turns into money.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "model", rename_all = "snake_case", deny_unknown_fields)]
pub enum Charge {
    /// The same price for every unit.
    PerUnit { unit: UnitPrice },
    /// Each unit at the price of the tier it falls in.
    Graduated { tiers: Vec<Tier> },
    /// Every unit at the price of the tier the total falls in.
    Volume { tiers: Vec<Tier> },
    /// Whole packages of `size` units, each started package at `price_minor`.
    Package { size: u64, price_minor: i64 },
}

/// A meter's price in a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MeterPrice {
    pub meter: Meter,
    /// Units per period that cost nothing (the free allowance).
    #[serde(default)]
    pub included: u64,
    pub charge: Charge,
}

/// Everything a plan charges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// ISO 4217 code, upper case (`USD`, `EUR`).
    pub currency: String,
    /// Charged once per period.
    #[serde(default)]
    pub base_minor: i64,
    #[serde(default)]
    pub meters: Vec<MeterPrice>,
}
