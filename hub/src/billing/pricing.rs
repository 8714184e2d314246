//! Prices and charge models, and invoice computation from usage: pure functions over data,
//! integer minor units, no floating point. This module reads no clock and no store; the
//! caller hands it the period, the segments with their usage, and the adjustments.
//!
//! # Charge models
//!
//! A meter's *billable* quantity is its usage minus the included allowance (never below
//! zero). Zero billable units cost nothing under every model: no tier is reached, no flat fee.
//!
//! - `per_unit`: billable × `minor` / `per`.
//! - `graduated`: each unit at the price of the tier it falls in (tier `i` holds the units
//!   above tier `i - 1`'s `up_to` up to and including its own); every tier holding at least one
//!   unit adds its `flat_minor` once.
//! - `volume`: every unit at the price of the tier the whole quantity lands in (the first
//!   tier whose `up_to` is at least the quantity), plus that tier's `flat_minor`.
//! - `package`: ceil(billable / `size`) packages at `price_minor` each.
//!
//! # Rounding
//!
//! Each invoice LINE is computed exactly (a fraction of i128 numerator and denominator: unit
//! prices like 5 per 1,000,000 need no fractions of a minor unit) and rounded once, half up,
//! to whole minor units. The invoice total is exactly the sum of the rounded lines; nothing
//! is rounded again. A graduated line's tier breakdown telescopes: tier `k`'s amount is
//! round(exact cost of tiers 1..=k) − round(exact cost of tiers 1..k), so the breakdown sums to
//! the line and each tier is within one minor unit of its exact cost.
//!
//! # Invoices
//!
//! A period `[from_ms, to_ms)` is made of one or more segments: the plan can change during
//! the period and a free trial can end during it. The rules:
//!
//! - Segments tile the period exactly: the first starts at `from_ms`, each starts where the
//!   previous one ends, the last ends at `to_ms`, none is empty, and all are priced in one
//!   currency. Anything else is an error naming the problem; nothing is guessed.
//! - Each segment's usage is charged with that segment's own plan prices.
//! - A paid segment's base fee is prorated by milliseconds: round_half_up(base × segment_ms /
//!   period_ms). Two paid halves of an odd base therefore each round up (1001 → 501 + 501):
//!   each line is rounded once, as above. A plan without a base fee gets no base line.
//! - A counter meter's included allowance is prorated the same way, rounded down:
//!   floor(included × segment_ms / period_ms).
//! - Gauge meters ([`Meter::is_gauge`], peak agents) are neither prorated nor summed: the
//!   segment's usage is the segment's own maximum, charged against the whole allowance.
//!   A period with two paid segments therefore charges each segment's peak.
//! - Trial segments are free: no base line, and each priced meter gets a usage line showing
//!   the quantity and the (prorated) allowance, with nothing billable and amount 0, marked
//!   `trial`.
//! - A meter with usage but no price in the segment's plan gets no line; a priced meter gets a
//!   line even when its usage is zero.
//! - Adjustments (corrections carried onto this invoice, e.g. late usage from a closed period)
//!   are lines of their own in the invoice's currency, taken as given; they may be negative,
//!   and so may the total (a credit).
//! - Line order is deterministic: segment by segment in time order, each with its base line
//!   and then one line per priced meter in [`Meter`] order; then the adjustments as given.

use super::Meter;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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

// ---- validation ----

impl Prices {
    /// `Ok` when these prices can be charged; otherwise the first problem, starting with the
    /// path of the field at fault (`meters[1].charge.tiers[0].up_to: ...`).
    pub fn validate(&self) -> Result<(), String> {
        let currency = &self.currency;
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!("currency: {currency:?} must be three upper-case letters (ISO 4217, e.g. USD)"));
        }
        if self.base_minor < 0 {
            return Err(format!("base_minor: {} must not be negative", self.base_minor));
        }
        let mut seen: BTreeMap<Meter, usize> = BTreeMap::new();
        for (i, price) in self.meters.iter().enumerate() {
            if let Some(first) = seen.insert(price.meter, i) {
                return Err(format!("meters[{i}].meter: {} is already priced by meters[{first}]; each meter at most once", price.meter));
            }
            price.charge.validate().map_err(|e| format!("meters[{i}].charge.{e}"))?;
        }
        Ok(())
    }
}

impl UnitPrice {
    /// `Ok` when the price is non-negative and `per` is above zero; errors start with the
    /// field's name.
    pub fn validate(&self) -> Result<(), String> {
        if self.minor < 0 {
            return Err(format!("minor: {} must not be negative", self.minor));
        }
        if self.per == 0 {
            return Err("per: must be above zero".into());
        }
        Ok(())
    }
}

impl Charge {
    /// `Ok` when the charge model is well formed; errors start with the path of the field
    /// inside the charge (`tiers[2].up_to: ...`).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Charge::PerUnit { unit } => unit.validate().map_err(|e| format!("unit.{e}")),
            Charge::Graduated { tiers } | Charge::Volume { tiers } => validate_tiers(tiers),
            Charge::Package { size, price_minor } => {
                if *size == 0 {
                    return Err("size: must be above zero".into());
                }
                if *price_minor < 0 {
                    return Err(format!("price_minor: {price_minor} must not be negative"));
                }
                Ok(())
            }
        }
    }
}

/// Tiers ascend strictly by `up_to`, only the last is open, and prices are non-negative.
fn validate_tiers(tiers: &[Tier]) -> Result<(), String> {
    let Some(last) = tiers.len().checked_sub(1) else {
        return Err("tiers: must not be empty (at least one tier, the last without up_to)".into());
    };
    let mut below = 0;
    for (i, tier) in tiers.iter().enumerate() {
        tier.unit.validate().map_err(|e| format!("tiers[{i}].unit.{e}"))?;
        if tier.flat_minor < 0 {
            return Err(format!("tiers[{i}].flat_minor: {} must not be negative", tier.flat_minor));
        }
        match tier.up_to {
            None if i < last => return Err(format!("tiers[{i}].up_to: only the last tier may be open (without up_to)")),
            Some(up_to) if i == last => return Err(format!("tiers[{i}].up_to: the last tier must be open (without up_to), got {up_to}")),
            Some(up_to) if up_to <= below => return Err(format!("tiers[{i}].up_to: {up_to} must be above the previous tier's up_to ({below})")),
            Some(up_to) => below = up_to,
            None => {}
        }
    }
    Ok(())
}

// ---- charges ----

/// One tier of a graduated or volume line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TierLine {
    /// The tier's last unit (inclusive); none for the open last tier.
    pub up_to: Option<u64>,
    /// Units charged at this tier's price: the units falling in it (graduated), or every
    /// billable unit (volume).
    pub units: u64,
    /// The tier's unit price.
    pub unit: UnitPrice,
    /// The tier's flat fee, included in `amount_minor`.
    pub flat_minor: i64,
    /// What this tier adds to the line, flat fee included; the tiers sum to the line.
    pub amount_minor: i64,
}

/// What a charge model makes of a billable quantity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    /// The line's amount, rounded half up once.
    pub amount_minor: i64,
    /// The tier breakdown (graduated and volume only).
    pub tiers: Vec<TierLine>,
}

impl Charge {
    /// The price of `units` billable units (see the module doc for each model and the
    /// rounding). Errors only on malformed charges (see [`Charge::validate`]) and on amounts
    /// that do not fit in i64 minor units.
    pub fn price(&self, units: u64) -> Result<Priced, String> {
        match self {
            Charge::PerUnit { unit } => Ok(Priced { amount_minor: to_minor(Exact::of(units, *unit)?.round_half_up())?, tiers: Vec::new() }),
            Charge::Graduated { tiers } => graduated(tiers, units),
            Charge::Volume { tiers } => volume(tiers, units),
            Charge::Package { size, price_minor } => {
                if *size == 0 {
                    return Err("package size must be above zero".into());
                }
                let packages = units.div_ceil(*size);
                Ok(Priced { amount_minor: to_minor(i128::from(packages) * i128::from(*price_minor))?, tiers: Vec::new() })
            }
        }
    }
}

fn graduated(tiers: &[Tier], units: u64) -> Result<Priced, String> {
    let mut exact = Exact::ZERO;
    // The rounded cost of the tiers so far: each tier shows the rounded running total minus
    // this, so the breakdown sums to the line, which is rounded once.
    let mut shown: i128 = 0;
    let mut below: u64 = 0;
    let mut lines = Vec::new();
    for tier in tiers {
        if units <= below {
            break;
        }
        let top = tier.up_to.map_or(units, |up_to| up_to.min(units));
        let in_tier = top.saturating_sub(below);
        exact = exact.plus(Exact::of(in_tier, tier.unit)?)?.plus(Exact::whole(tier.flat_minor))?;
        let running = exact.round_half_up();
        lines.push(TierLine { up_to: tier.up_to, units: in_tier, unit: tier.unit, flat_minor: tier.flat_minor, amount_minor: to_minor(running - shown)? });
        shown = running;
        below = top;
    }
    if below < units {
        return Err(format!("the tiers end at {below} units, below the {units} to charge (the last tier must be open)"));
    }
    Ok(Priced { amount_minor: to_minor(shown)?, tiers: lines })
}

fn volume(tiers: &[Tier], units: u64) -> Result<Priced, String> {
    if units == 0 {
        return Ok(Priced { amount_minor: 0, tiers: Vec::new() });
    }
    let tier =
        tiers.iter().find(|t| t.up_to.is_none_or(|up_to| units <= up_to)).ok_or_else(|| format!("no tier holds {units} units (the last tier must be open)"))?;
    let amount = to_minor(Exact::of(units, tier.unit)?.plus(Exact::whole(tier.flat_minor))?.round_half_up())?;
    Ok(Priced { amount_minor: amount, tiers: vec![TierLine { up_to: tier.up_to, units, unit: tier.unit, flat_minor: tier.flat_minor, amount_minor: amount }] })
}

/// An exact amount of minor units: `num / den`, `den > 0`, kept reduced.
#[derive(Debug, Clone, Copy)]
struct Exact {
    num: i128,
    den: i128,
}

impl Exact {
    const ZERO: Exact = Exact { num: 0, den: 1 };

    fn whole(minor: i64) -> Exact {
        Exact { num: i128::from(minor), den: 1 }
    }

    /// `units` at `price`. A u64 times an i64 always fits in an i128.
    fn of(units: u64, price: UnitPrice) -> Result<Exact, String> {
        if price.per == 0 {
            return Err("unit price per must be above zero".into());
        }
        Ok(Exact { num: i128::from(units) * i128::from(price.minor), den: i128::from(price.per) }.reduced())
    }

    fn plus(self, other: Exact) -> Result<Exact, String> {
        let overflow = || "amount too large to compute exactly".to_string();
        let den = (self.den / gcd(self.den, other.den)).checked_mul(other.den).ok_or_else(overflow)?;
        let left = self.num.checked_mul(den / self.den).ok_or_else(overflow)?;
        let right = other.num.checked_mul(den / other.den).ok_or_else(overflow)?;
        Ok(Exact { num: left.checked_add(right).ok_or_else(overflow)?, den }.reduced())
    }

    fn reduced(self) -> Exact {
        let g = gcd(self.num, self.den);
        if g > 1 {
            Exact { num: self.num / g, den: self.den / g }
        } else {
            self
        }
    }

    fn round_half_up(self) -> i128 {
        round_half_up(self.num, self.den)
    }
}

/// The greatest common divisor of `|a|` and `|b|` (`b > 0`, so it is at least 1 and at most
/// `b`, which fits back in an i128).
fn gcd(a: i128, b: i128) -> i128 {
    let (mut a, mut b) = (a.unsigned_abs(), b.unsigned_abs());
    while b != 0 {
        (a, b) = (b, a % b);
    }
    i128::try_from(a).unwrap_or(1)
}

/// `num / den` rounded to the nearest integer, halves up (towards +∞); `den > 0`.
fn round_half_up(num: i128, den: i128) -> i128 {
    let (quotient, remainder) = (num.div_euclid(den), num.rem_euclid(den));
    // remainder < den, so `den - remainder` cannot overflow where `2 * remainder` could.
    if remainder >= den - remainder {
        quotient + 1
    } else {
        quotient
    }
}

fn to_minor(amount: i128) -> Result<i64, String> {
    i64::try_from(amount).map_err(|_| format!("amount {amount} does not fit in i64 minor units"))
}

// ---- invoices ----

/// A stretch of a billing period on one plan version, trialing or paid, with its usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Segment {
    pub from_ms: i64,
    pub to_ms: i64,
    pub plan_id: String,
    pub plan_version: u32,
    pub prices: Prices,
    /// A free-trial segment: shown, never charged.
    pub trial: bool,
    /// Usage in `[from_ms, to_ms)`: sums for counters, the segment's maximum for gauges.
    pub usage: BTreeMap<Meter, u64>,
}

/// A correction carried onto an invoice (e.g. late usage from a closed period), in the
/// invoice's currency; may be negative.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Adjustment {
    pub description: String,
    pub amount_minor: i64,
    /// Why the correction is made; required.
    pub reason: String,
}

/// What a line charges for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    /// A segment's (prorated) base fee.
    Base,
    /// A meter's usage in a segment.
    Usage,
    /// A correction carried onto the invoice.
    Adjustment,
}

/// One invoice line. Quantities are zero on base and adjustment lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Line {
    pub kind: LineKind,
    pub description: String,
    pub meter: Option<Meter>,
    pub plan_id: Option<String>,
    #[serde(default)]
    pub plan_version: Option<u32>,
    /// The segment the line covers (the whole period for adjustments).
    #[serde(default)]
    pub from_ms: i64,
    #[serde(default)]
    pub to_ms: i64,
    /// Usage in the segment.
    pub quantity: u64,
    /// The allowance that applied (prorated for counters).
    pub included: u64,
    /// What was charged: quantity minus allowance, zero in a trial.
    pub billable: u64,
    pub amount_minor: i64,
    /// Tier breakdown of graduated and volume lines; sums to `amount_minor`.
    #[serde(default)]
    pub tiers: Vec<TierLine>,
    /// A line of a free-trial segment (amount 0).
    #[serde(default)]
    pub trial: bool,
    /// An adjustment's reason.
    #[serde(default)]
    pub reason: Option<String>,
}

/// An invoice for `[from_ms, to_ms)`: `total_minor` is exactly the sum of the lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Invoice {
    pub currency: String,
    pub from_ms: i64,
    pub to_ms: i64,
    pub lines: Vec<Line>,
    pub total_minor: i64,
}

/// The invoice of the period `[from_ms, to_ms)` made of `segments`, with `adjustments`
/// carried onto it, under the rules of the module doc. Errors name the problem: segments
/// that do not tile the period, mixed currencies, invalid prices, an adjustment without a
/// reason, amounts beyond i64.
pub fn compute_invoice(from_ms: i64, to_ms: i64, segments: &[Segment], adjustments: &[Adjustment]) -> Result<Invoice, String> {
    check_tiling(from_ms, to_ms, segments)?;
    let mut currency: Option<&str> = None;
    for (i, s) in segments.iter().enumerate() {
        s.prices.validate().map_err(|e| format!("segment {i} (plan {} v{}): prices: {e}", s.plan_id, s.plan_version))?;
        match currency {
            None => currency = Some(&s.prices.currency),
            Some(c) if c != s.prices.currency => {
                return Err(format!(
                    "segment {i} (plan {} v{}) is priced in {} but segment 0 in {c}; an invoice has one currency",
                    s.plan_id, s.plan_version, s.prices.currency
                ))
            }
            Some(_) => {}
        }
    }
    let period_ms = i128::from(to_ms) - i128::from(from_ms);
    let mut lines = Vec::new();
    for s in segments {
        segment_lines(s, period_ms, &mut lines)?;
    }
    for (i, a) in adjustments.iter().enumerate() {
        if a.description.trim().is_empty() {
            return Err(format!("adjustment {i}: description must not be empty"));
        }
        if a.reason.trim().is_empty() {
            return Err(format!("adjustment {i} ({}): reason must not be empty", a.description));
        }
        lines.push(Line {
            kind: LineKind::Adjustment,
            description: a.description.clone(),
            meter: None,
            plan_id: None,
            plan_version: None,
            from_ms,
            to_ms,
            quantity: 0,
            included: 0,
            billable: 0,
            amount_minor: a.amount_minor,
            tiers: Vec::new(),
            trial: false,
            reason: Some(a.reason.clone()),
        });
    }
    let total_minor = lines.iter().try_fold(0i64, |sum, line| sum.checked_add(line.amount_minor)).ok_or("invoice total does not fit in i64 minor units")?;
    Ok(Invoice { currency: currency.unwrap_or_default().to_string(), from_ms, to_ms, lines, total_minor })
}

/// The segments start at `from_ms`, follow each other without gap or overlap, are not
/// empty, and end at `to_ms`.
fn check_tiling(from_ms: i64, to_ms: i64, segments: &[Segment]) -> Result<(), String> {
    if from_ms >= to_ms {
        return Err(format!("period [{from_ms}, {to_ms}) is empty"));
    }
    let (Some(first), Some(last)) = (segments.first(), segments.last()) else {
        return Err(format!("no segments: segments must cover the period [{from_ms}, {to_ms})"));
    };
    if first.from_ms != from_ms {
        return Err(format!("segment 0 starts at {} but the period starts at {from_ms}", first.from_ms));
    }
    for (i, s) in segments.iter().enumerate() {
        if s.from_ms >= s.to_ms {
            return Err(format!("segment {i} [{}, {}) is empty", s.from_ms, s.to_ms));
        }
    }
    for (i, pair) in segments.windows(2).enumerate() {
        let (end, start) = (pair[0].to_ms, pair[1].from_ms);
        if end < start {
            return Err(format!("gap between segment {i} (ends at {end}) and segment {} (starts at {start})", i + 1));
        }
        if end > start {
            return Err(format!("segment {i} (ends at {end}) overlaps segment {} (starts at {start})", i + 1));
        }
    }
    if last.to_ms != to_ms {
        return Err(format!("segment {} ends at {} but the period ends at {to_ms}", segments.len() - 1, last.to_ms));
    }
    Ok(())
}

/// The base line (paid segments with a base fee) and one line per priced meter of `s`.
fn segment_lines(s: &Segment, period_ms: i128, lines: &mut Vec<Line>) -> Result<(), String> {
    let segment_ms = i128::from(s.to_ms) - i128::from(s.from_ms);
    let whole = segment_ms == period_ms;
    let plan = format!("plan {} v{}", s.plan_id, s.plan_version);
    let suffix = match (whole, s.trial) {
        (true, false) => String::new(),
        (false, false) => ", prorated".to_string(),
        (_, true) => ", trial".to_string(),
    };
    let line = |kind, description: String, meter| Line {
        kind,
        description,
        meter,
        plan_id: Some(s.plan_id.clone()),
        plan_version: Some(s.plan_version),
        from_ms: s.from_ms,
        to_ms: s.to_ms,
        quantity: 0,
        included: 0,
        billable: 0,
        amount_minor: 0,
        tiers: Vec::new(),
        trial: s.trial,
        reason: None,
    };
    if !s.trial && s.prices.base_minor != 0 {
        let amount_minor = to_minor(round_half_up(i128::from(s.prices.base_minor) * segment_ms, period_ms))?;
        lines.push(Line { amount_minor, ..line(LineKind::Base, format!("Base fee, {plan}{suffix}"), None) });
    }
    let mut priced: Vec<&MeterPrice> = s.prices.meters.iter().collect();
    priced.sort_by_key(|p| p.meter);
    for price in priced {
        let quantity = s.usage.get(&price.meter).copied().unwrap_or(0);
        let included = if price.meter.is_gauge() || whole {
            price.included
        } else {
            // At most `included` (segment_ms < period_ms), so it fits back in a u64.
            u64::try_from(i128::from(price.included) * segment_ms / period_ms).unwrap_or(price.included)
        };
        let billable = if s.trial { 0 } else { quantity.saturating_sub(included) };
        let priced = if s.trial { Priced { amount_minor: 0, tiers: Vec::new() } } else { price.charge.price(billable)? };
        lines.push(Line {
            quantity,
            included,
            billable,
            amount_minor: priced.amount_minor,
            tiers: priced.tiers,
            ..line(LineKind::Usage, format!("{}, {plan}{suffix}", price.meter), Some(price.meter))
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;
    const PERIOD: i64 = 30 * DAY;

    fn per_unit(minor: i64, per: u64) -> Charge {
        Charge::PerUnit { unit: UnitPrice { minor, per } }
    }

    fn tier(up_to: Option<u64>, minor: i64, per: u64, flat_minor: i64) -> Tier {
        Tier { up_to, unit: UnitPrice { minor, per }, flat_minor }
    }

    fn meter(meter: Meter, included: u64, charge: Charge) -> MeterPrice {
        MeterPrice { meter, included, charge }
    }

    fn prices(base_minor: i64, meters: Vec<MeterPrice>) -> Prices {
        Prices { currency: "USD".into(), base_minor, meters }
    }

    fn segment(from_ms: i64, to_ms: i64, plan: (&str, u32), prices: Prices, trial: bool, usage: &[(Meter, u64)]) -> Segment {
        Segment { from_ms, to_ms, plan_id: plan.0.into(), plan_version: plan.1, prices, trial, usage: usage.iter().copied().collect() }
    }

    fn whole_period(prices: Prices, usage: &[(Meter, u64)]) -> Segment {
        segment(0, PERIOD, ("pro", 1), prices, false, usage)
    }

    fn invoice(segments: &[Segment]) -> Invoice {
        compute_invoice(0, PERIOD, segments, &[]).unwrap()
    }

    /// (kind, meter, amount) of every line, in order.
    fn summary(invoice: &Invoice) -> Vec<(LineKind, Option<Meter>, i64)> {
        invoice.lines.iter().map(|l| (l.kind, l.meter, l.amount_minor)).collect()
    }

    fn amount(charge: &Charge, units: u64) -> i64 {
        charge.price(units).unwrap().amount_minor
    }

    fn tier_amounts(charge: &Charge, units: u64) -> Vec<(u64, i64)> {
        charge.price(units).unwrap().tiers.iter().map(|t| (t.units, t.amount_minor)).collect()
    }

    #[test]
    fn per_unit_sub_cent_price_is_exact_then_rounded_once() {
        // 5 minor per 1,000,000 bytes; 2,345,678,901 bytes:
        // 2,345,678,901 × 5 / 1,000,000 = 11,728,394,505 / 1,000,000 = 11,728.394505 → 11,728.
        let p = prices(0, vec![meter(Meter::LogBytes, 0, per_unit(5, 1_000_000))]);
        let inv = invoice(&[whole_period(p, &[(Meter::LogBytes, 2_345_678_901)])]);
        assert_eq!(summary(&inv), vec![(LineKind::Usage, Some(Meter::LogBytes), 11_728)]);
        assert_eq!(inv.total_minor, 11_728);
        assert_eq!((inv.lines[0].quantity, inv.lines[0].included, inv.lines[0].billable), (2_345_678_901, 0, 2_345_678_901));
        // 999 bytes: 999 × 5 / 1,000,000 = 0.004995 → 0.
        assert_eq!(amount(&per_unit(5, 1_000_000), 999), 0);
    }

    #[test]
    fn graduated_and_volume_differ_on_the_same_tiers() {
        // Tiers: 1..=1000 at 10, 1001..=5000 at 8 (+500 flat), 5001.. at 5 (+1000 flat).
        let tiers = vec![tier(Some(1000), 10, 1, 0), tier(Some(5000), 8, 1, 500), tier(None, 5, 1, 1000)];
        let graduated = Charge::Graduated { tiers: tiers.clone() };
        let volume = Charge::Volume { tiers };

        // 6000 graduated: 1000 × 10 = 10,000; 4000 × 8 + 500 = 32,500; 1000 × 5 + 1000 = 6,000;
        // total 48,500. Volume: 6000 lands in the last tier: 6000 × 5 + 1000 = 31,000.
        assert_eq!(tier_amounts(&graduated, 6000), vec![(1000, 10_000), (4000, 32_500), (1000, 6_000)]);
        assert_eq!(amount(&graduated, 6000), 48_500);
        assert_eq!(tier_amounts(&volume, 6000), vec![(6000, 31_000)]);
        assert_eq!(amount(&volume, 6000), 31_000);

        // 5000 (a tier's up_to is inclusive): graduated 10,000 + 4000 × 8 + 500 = 42,500;
        // volume 5000 × 8 + 500 = 40,500.
        assert_eq!(amount(&graduated, 5000), 42_500);
        assert_eq!(amount(&volume, 5000), 40_500);
        // 1000: only the first tier reached, no flat fee of the second: both 1000 × 10 = 10,000.
        assert_eq!(amount(&graduated, 1000), 10_000);
        assert_eq!(tier_amounts(&graduated, 1000), vec![(1000, 10_000)]);
        assert_eq!(amount(&volume, 1000), 10_000);
        // 1001: graduated 10,000 + 1 × 8 + 500 = 10,508; volume 1001 × 8 + 500 = 8,508.
        assert_eq!(amount(&graduated, 1001), 10_508);
        assert_eq!(amount(&volume, 1001), 8_508);

        // The same through an invoice: events graduated, deployments volume, 6000 each:
        // 48,500 + 31,000 = 79,500, and each line's breakdown sums to the line.
        let g = Charge::Graduated { tiers: vec![tier(Some(1000), 10, 1, 0), tier(Some(5000), 8, 1, 500), tier(None, 5, 1, 1000)] };
        let v = Charge::Volume { tiers: vec![tier(Some(1000), 10, 1, 0), tier(Some(5000), 8, 1, 500), tier(None, 5, 1, 1000)] };
        let p = prices(0, vec![meter(Meter::Events, 0, g), meter(Meter::Deployments, 0, v)]);
        let inv = invoice(&[whole_period(p, &[(Meter::Events, 6000), (Meter::Deployments, 6000)])]);
        assert_eq!(summary(&inv), vec![(LineKind::Usage, Some(Meter::Events), 48_500), (LineKind::Usage, Some(Meter::Deployments), 31_000)]);
        assert_eq!(inv.total_minor, 79_500);
        for line in &inv.lines {
            assert_eq!(line.tiers.iter().map(|t| t.amount_minor).sum::<i64>(), line.amount_minor);
        }
    }

    #[test]
    fn graduated_line_is_rounded_once_not_per_tier() {
        // Two tiers at 1 minor per 10 units. 8 units: 4 × 0.1 + 4 × 0.1 = 0.8 → 1 (rounding each
        // tier would give 0 + 0). Breakdown: round(0.4) = 0, then round(0.8) − 0 = 1.
        let g = Charge::Graduated { tiers: vec![tier(Some(4), 1, 10, 0), tier(None, 1, 10, 0)] };
        assert_eq!(amount(&g, 8), 1);
        assert_eq!(tier_amounts(&g, 8), vec![(4, 0), (4, 1)]);
        // Mixed denominators: 3 per 1000 up to 1,000,000, then 1 per 3. 1,000,002 units:
        // 1,000,000 × 3 / 1000 = 3000, plus 2 / 3 = 0.667: 3000.667 → 3001; tiers 3000 and 1.
        let mixed = Charge::Graduated { tiers: vec![tier(Some(1_000_000), 3, 1000, 0), tier(None, 1, 3, 0)] };
        assert_eq!(amount(&mixed, 1_000_002), 3001);
        assert_eq!(tier_amounts(&mixed, 1_000_002), vec![(1_000_000, 3000), (2, 1)]);
    }

    #[test]
    fn package_charges_every_started_package() {
        // 1000 units per package at 250.
        let p = Charge::Package { size: 1000, price_minor: 250 };
        // 3000 = exactly 3 packages: 750. 3001 = ceil(3.001) = 4 packages: 1000.
        assert_eq!(amount(&p, 3000), 750);
        assert_eq!(amount(&p, 3001), 1000);
        // 1 unit starts a package: 250. 0 units: nothing.
        assert_eq!(amount(&p, 1), 250);
        assert_eq!(amount(&p, 0), 0);
    }

    #[test]
    fn base_allowance_and_overage() {
        // Base 4900.
        // agent_hours: 7200 included, 2 per hour; 9000 used → 1800 billable × 2 = 3600.
        // log_bytes: 10 GiB = 10,737,418,240 included, 5 per 1,000,000; 25,000,000,000 used →
        //   14,262,581,760 billable × 5 / 1,000,000 = 71,312.9088 → 71,313.
        // events: 1,000,000 included, packages of 100,000 at 100; 400,000 used → 0 billable → 0.
        // Total 4900 + 3600 + 71,313 + 0 = 79,813. Lines in meter order, whatever the plan's.
        let p = prices(
            4900,
            vec![
                meter(Meter::Events, 1_000_000, Charge::Package { size: 100_000, price_minor: 100 }),
                meter(Meter::LogBytes, 10_737_418_240, per_unit(5, 1_000_000)),
                meter(Meter::AgentHours, 7200, per_unit(2, 1)),
            ],
        );
        let usage = [(Meter::AgentHours, 9000), (Meter::LogBytes, 25_000_000_000), (Meter::Events, 400_000)];
        let inv = invoice(&[whole_period(p, &usage)]);
        assert_eq!(
            summary(&inv),
            vec![
                (LineKind::Base, None, 4900),
                (LineKind::Usage, Some(Meter::AgentHours), 3600),
                (LineKind::Usage, Some(Meter::LogBytes), 71_313),
                (LineKind::Usage, Some(Meter::Events), 0),
            ]
        );
        assert_eq!(inv.lines[2].billable, 14_262_581_760);
        assert_eq!((inv.lines[3].quantity, inv.lines[3].included, inv.lines[3].billable), (400_000, 1_000_000, 0));
        assert_eq!(inv.total_minor, 79_813);
        assert_eq!(inv.currency, "USD");
    }

    #[test]
    fn trial_ending_mid_period_prorates_the_paid_part() {
        // Base 4999, agent_hours 3000 included at 1 each. Trial for days 0-10, paid 10-30.
        // Trial: no base; usage 500 shown, included floor(3000 × 10/30) = 1000, amount 0.
        // Paid: base round(4999 × 20/30) = round(3332.67) = 3333; included
        //   floor(3000 × 20/30) = 2000; 2500 used → 500 billable → 500.
        // Total 3333 + 500 = 3833.
        let p = prices(4999, vec![meter(Meter::AgentHours, 3000, per_unit(1, 1))]);
        let inv = invoice(&[
            segment(0, 10 * DAY, ("starter", 1), p.clone(), true, &[(Meter::AgentHours, 500)]),
            segment(10 * DAY, PERIOD, ("starter", 1), p, false, &[(Meter::AgentHours, 2500)]),
        ]);
        assert_eq!(
            summary(&inv),
            vec![(LineKind::Usage, Some(Meter::AgentHours), 0), (LineKind::Base, None, 3333), (LineKind::Usage, Some(Meter::AgentHours), 500)]
        );
        let trial = &inv.lines[0];
        assert!(trial.trial);
        assert_eq!((trial.quantity, trial.included, trial.billable), (500, 1000, 0));
        assert_eq!((inv.lines[2].included, inv.lines[2].billable), (2000, 500));
        assert_eq!((inv.lines[1].from_ms, inv.lines[1].to_ms), (10 * DAY, PERIOD));
        assert_eq!(inv.total_minor, 3833);
    }

    #[test]
    fn plan_change_mid_period_prices_each_segment_with_its_plan() {
        // basic v1 for days 0-12: base 1000; log_bytes 1,000,000,000 included, 10 per 1,000,000;
        //   no peak_agents price.
        // pro v3 for days 12-30: base 5000; log_bytes 10,000,000,000 included, 3 per 1,000,000;
        //   peak_agents (a gauge) 5 included, 200 each.
        // basic: base 1000 × 12/30 = 400; included floor(1e9 × 12/30) = 400,000,000;
        //   1,500,000,000 used → 1,100,000,000 × 10 / 1e6 = 11,000; peak 4 unpriced: no line.
        // pro: base 5000 × 18/30 = 3000; peak 8 against the whole 5 (not prorated) → 3 × 200 = 600;
        //   included floor(1e10 × 18/30) = 6,000,000,000; 7,000,000,000 used → 1e9 × 3 / 1e6 = 3000.
        // Total 400 + 11,000 + 3000 + 600 + 3000 = 18,000.
        let basic = prices(1000, vec![meter(Meter::LogBytes, 1_000_000_000, per_unit(10, 1_000_000))]);
        let pro = prices(5000, vec![meter(Meter::LogBytes, 10_000_000_000, per_unit(3, 1_000_000)), meter(Meter::PeakAgents, 5, per_unit(200, 1))]);
        let inv = invoice(&[
            segment(0, 12 * DAY, ("basic", 1), basic, false, &[(Meter::LogBytes, 1_500_000_000), (Meter::PeakAgents, 4)]),
            segment(12 * DAY, PERIOD, ("pro", 3), pro, false, &[(Meter::LogBytes, 7_000_000_000), (Meter::PeakAgents, 8)]),
        ]);
        assert_eq!(
            summary(&inv),
            vec![
                (LineKind::Base, None, 400),
                (LineKind::Usage, Some(Meter::LogBytes), 11_000),
                (LineKind::Base, None, 3000),
                (LineKind::Usage, Some(Meter::PeakAgents), 600),
                (LineKind::Usage, Some(Meter::LogBytes), 3000),
            ]
        );
        let plans: Vec<_> = inv.lines.iter().map(|l| (l.plan_id.as_deref().unwrap(), l.plan_version.unwrap())).collect();
        assert_eq!(plans, vec![("basic", 1), ("basic", 1), ("pro", 3), ("pro", 3), ("pro", 3)]);
        assert_eq!((inv.lines[1].included, inv.lines[3].included, inv.lines[4].included), (400_000_000, 5, 6_000_000_000));
        assert_eq!(inv.total_minor, 18_000);
    }

    #[test]
    fn rounding_is_half_up_at_exactly_half() {
        // 5 per 1,000,000: 100,000 units = 0.5 → 1; 99,999 = 0.499995 → 0;
        // 2,300,000 = 11.5 → 12; 2,299,999 = 11.499995 → 11.
        let c = per_unit(5, 1_000_000);
        assert_eq!((amount(&c, 100_000), amount(&c, 99_999)), (1, 0));
        assert_eq!((amount(&c, 2_300_000), amount(&c, 2_299_999)), (12, 11));
        // Volume: 3 units at 1 per 2 = 1.5 → 2.
        assert_eq!(amount(&Charge::Volume { tiers: vec![tier(None, 1, 2, 0)] }, 3), 2);

        // Base 1001 over two halves of the period (plan a v1, then v2): 1001 × 15/30 = 500.5 → 501
        // each, 1002 in all: each line is rounded once, the total is their sum.
        // agent_hours 1001 included, 1 each: floor(1001 × 15/30) = floor(500.5) = 500 per half;
        // 600 used in the first half → 100; 500 in the second → 0.
        // Total 501 + 100 + 501 + 0 = 1102.
        let p = prices(1001, vec![meter(Meter::AgentHours, 1001, per_unit(1, 1))]);
        let inv = invoice(&[
            segment(0, 15 * DAY, ("a", 1), p.clone(), false, &[(Meter::AgentHours, 600)]),
            segment(15 * DAY, PERIOD, ("a", 2), p, false, &[(Meter::AgentHours, 500)]),
        ]);
        assert_eq!(
            summary(&inv),
            vec![
                (LineKind::Base, None, 501),
                (LineKind::Usage, Some(Meter::AgentHours), 100),
                (LineKind::Base, None, 501),
                (LineKind::Usage, Some(Meter::AgentHours), 0),
            ]
        );
        assert_eq!((inv.lines[1].included, inv.lines[3].included), (500, 500));
        assert_eq!(inv.total_minor, 1102);
    }

    #[test]
    fn adjustments_are_lines_after_the_segments() {
        // Base 1000, plus 37 of late usage from last period, minus a 250 credit: 787.
        let adjustments = [
            Adjustment { description: "Late log_bytes of 2026-10".into(), amount_minor: 37, reason: "late usage".into() },
            Adjustment { description: "Outage credit".into(), amount_minor: -250, reason: "outage on 2026-11-03".into() },
        ];
        let inv = compute_invoice(0, PERIOD, &[whole_period(prices(1000, vec![]), &[])], &adjustments).unwrap();
        assert_eq!(summary(&inv), vec![(LineKind::Base, None, 1000), (LineKind::Adjustment, None, 37), (LineKind::Adjustment, None, -250)]);
        assert_eq!(inv.lines[2].reason.as_deref(), Some("outage on 2026-11-03"));
        assert_eq!(inv.total_minor, 787);

        // A credit larger than the charges leaves a negative total: 1000 − 1500 = −500.
        let credit = [Adjustment { description: "Goodwill".into(), amount_minor: -1500, reason: "support ticket 42".into() }];
        assert_eq!(compute_invoice(0, PERIOD, &[whole_period(prices(1000, vec![]), &[])], &credit).unwrap().total_minor, -500);

        let no_reason = [Adjustment { description: "Credit".into(), amount_minor: -1, reason: " ".into() }];
        let err = compute_invoice(0, PERIOD, &[whole_period(prices(1000, vec![]), &[])], &no_reason).unwrap_err();
        assert!(err.starts_with("adjustment 0 (Credit): reason"), "{err}");
    }

    #[test]
    fn zero_usage_costs_nothing_under_every_model() {
        let flat = vec![tier(Some(10), 1, 1, 100), tier(None, 1, 1, 100)];
        for charge in [per_unit(7, 3), Charge::Graduated { tiers: flat.clone() }, Charge::Volume { tiers: flat }, Charge::Package { size: 10, price_minor: 5 }]
        {
            assert_eq!(charge.price(0).unwrap(), Priced { amount_minor: 0, tiers: vec![] }, "{charge:?}");
        }
    }

    #[test]
    fn validation_errors_name_the_field() {
        let ok = prices(
            100,
            vec![
                meter(Meter::LogBytes, 0, per_unit(5, 1_000_000)),
                meter(Meter::Events, 0, Charge::Graduated { tiers: vec![tier(Some(10), 1, 1, 0), tier(None, 0, 1, 0)] }),
                meter(Meter::Deployments, 0, Charge::Package { size: 5, price_minor: 10 }),
            ],
        );
        assert_eq!(ok.validate(), Ok(()));
        let bad = |edit: &dyn Fn(&mut Prices)| {
            let mut p = ok.clone();
            edit(&mut p);
            p.validate().unwrap_err()
        };
        type Edit = Box<dyn Fn(&mut Prices)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|p| p.currency = "usd".into()), "currency:"),
            (Box::new(|p| p.currency = "USDT".into()), "currency:"),
            (Box::new(|p| p.base_minor = -1), "base_minor:"),
            (Box::new(|p| p.meters[0].charge = per_unit(-5, 1)), "meters[0].charge.unit.minor:"),
            (Box::new(|p| p.meters[0].charge = per_unit(5, 0)), "meters[0].charge.unit.per:"),
            (Box::new(|p| p.meters[1].charge = Charge::Volume { tiers: vec![] }), "meters[1].charge.tiers: must not be empty"),
            (
                Box::new(|p| p.meters[1].charge = Charge::Graduated { tiers: vec![tier(Some(10), 1, 1, 0), tier(Some(10), 1, 1, 0), tier(None, 1, 1, 0)] }),
                "meters[1].charge.tiers[1].up_to: 10 must be above the previous tier's up_to (10)",
            ),
            (
                Box::new(|p| p.meters[1].charge = Charge::Graduated { tiers: vec![tier(Some(0), 1, 1, 0), tier(None, 1, 1, 0)] }),
                "meters[1].charge.tiers[0].up_to:",
            ),
            (
                Box::new(|p| p.meters[1].charge = Charge::Volume { tiers: vec![tier(Some(10), 1, 1, 0)] }),
                "meters[1].charge.tiers[0].up_to: the last tier must be open",
            ),
            (
                Box::new(|p| p.meters[1].charge = Charge::Volume { tiers: vec![tier(None, 1, 1, 0), tier(None, 1, 1, 0)] }),
                "meters[1].charge.tiers[0].up_to: only the last",
            ),
            (Box::new(|p| p.meters[1].charge = Charge::Volume { tiers: vec![tier(None, 1, 1, -3)] }), "meters[1].charge.tiers[0].flat_minor:"),
            (Box::new(|p| p.meters[1].charge = Charge::Volume { tiers: vec![tier(None, 1, 0, 0)] }), "meters[1].charge.tiers[0].unit.per:"),
            (Box::new(|p| p.meters[2].charge = Charge::Package { size: 0, price_minor: 10 }), "meters[2].charge.size:"),
            (Box::new(|p| p.meters[2].charge = Charge::Package { size: 5, price_minor: -10 }), "meters[2].charge.price_minor:"),
            (Box::new(|p| p.meters[2].meter = Meter::LogBytes), "meters[2].meter: log_bytes is already priced by meters[0]"),
        ];
        for (edit, expected) in cases {
            let err = bad(&*edit);
            assert!(err.starts_with(expected), "{err:?} should start with {expected:?}");
        }

        // compute_invoice refuses invalid prices, naming the segment.
        let mut p = ok.clone();
        p.meters[2].charge = Charge::Package { size: 0, price_minor: 10 };
        let err = compute_invoice(0, PERIOD, &[whole_period(p, &[])], &[]).unwrap_err();
        assert_eq!(err, "segment 0 (plan pro v1): prices: meters[2].charge.size: must be above zero");
    }

    #[test]
    fn segments_must_tile_the_period() {
        let p = || prices(1000, vec![]);
        let seg = |from, to| segment(from, to, ("pro", 1), p(), false, &[]);
        let err = |segments: &[Segment]| compute_invoice(0, PERIOD, segments, &[]).unwrap_err();

        assert!(err(&[]).starts_with("no segments"));
        assert_eq!(err(&[seg(DAY, PERIOD)]), format!("segment 0 starts at {DAY} but the period starts at 0"));
        assert_eq!(
            err(&[seg(0, 10 * DAY), seg(11 * DAY, PERIOD)]),
            format!("gap between segment 0 (ends at {}) and segment 1 (starts at {})", 10 * DAY, 11 * DAY)
        );
        assert!(err(&[seg(0, 11 * DAY), seg(10 * DAY, PERIOD)]).starts_with("segment 0 (ends at 950400000) overlaps segment 1"));
        assert_eq!(err(&[seg(0, 29 * DAY)]), format!("segment 0 ends at {} but the period ends at {PERIOD}", 29 * DAY));
        assert!(err(&[seg(10 * DAY, PERIOD), seg(0, 10 * DAY)]).starts_with("segment 0 starts at"));
        assert!(err(&[seg(0, 0), seg(0, PERIOD)]).starts_with("segment 0 [0, 0) is empty"));
        assert!(compute_invoice(PERIOD, PERIOD, &[seg(0, PERIOD)], &[]).unwrap_err().starts_with("period"));

        let mut euro = seg(10 * DAY, PERIOD);
        euro.prices.currency = "EUR".into();
        assert_eq!(err(&[seg(0, 10 * DAY), euro]), "segment 1 (plan pro v1) is priced in EUR but segment 0 in USD; an invoice has one currency");

        // Tiled, the same invoice computes: 1000 × 10/30 = 333.33 → 333, 1000 × 20/30 = 666.67 → 667.
        assert_eq!(invoice(&[seg(0, 10 * DAY), seg(10 * DAY, PERIOD)]).total_minor, 1000);
    }

    #[test]
    fn invoice_round_trips_through_json_and_has_a_schema() {
        let p = prices(100, vec![meter(Meter::Events, 0, Charge::Graduated { tiers: vec![tier(Some(1), 1, 1, 0), tier(None, 2, 1, 0)] })]);
        let inv = compute_invoice(
            0,
            PERIOD,
            &[whole_period(p, &[(Meter::Events, 3)])],
            &[Adjustment { description: "Late events".into(), amount_minor: 4, reason: "late usage".into() }],
        )
        .unwrap();
        // 100 + (1 × 1 + 2 × 2 = 5) + 4 = 109.
        assert_eq!(inv.total_minor, 109);
        let json = serde_json::to_string(&inv).unwrap();
        assert_eq!(serde_json::from_str::<Invoice>(&json).unwrap(), inv);
        let schema = serde_json::to_string(&schemars::schema_for!(Invoice)).unwrap();
        assert!(schema.contains("total_minor") && schema.contains("tiers"), "{schema}");
    }
}
