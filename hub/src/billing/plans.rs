//! The plan catalog and each org's subscription: its status machine, its billing periods,
//! and what each status entitles the org to.
//!
//! Plans are versioned: changing a plan writes a new version, and a subscription names the
//! version it is on, so past periods are always priced as they were sold. A subscription
//! records every plan change with its time; an invoice splits its period at those times.
//!
//! Entitlements by status (the one table the hub enforces; `entitlements` is it in code):
//!
//! | status      | ingest | deploy | enroll agents | read and export |
//! |-------------|--------|--------|---------------|-----------------|
//! | `trialing`  | yes    | yes    | yes           | yes             |
//! | `active`    | yes    | yes    | yes           | yes             |
//! | `past_due`  | yes    | yes    | yes           | yes             |
//! | `unpaid`    | yes    | no     | no            | yes             |
//! | `suspended` | no: agents keep buffering | no | no | yes          |
//! | `canceled`  | no: agents keep buffering | no | no | yes          |
//!
//! An org without a subscription is entitled as `active` (a hub that does not bill).
//! Suspension keeps the org's data and leaves running workloads alone.

use super::pricing::Prices;
use super::{Meter, HOUR_MS};
use crate::store::{self, Error};
use crate::Hub;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// Consecutive failed payments that suspend an org.
pub const FAILED_PAYMENTS_TO_SUSPEND: u32 = 3;

/// What a plan allows per org; `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub agents: Option<u32>,
    pub log_bytes_per_month: Option<u64>,
    pub events_per_day: Option<u64>,
    pub retention_days: Option<u32>,
    /// Deployment revisions (creates, updates and rollbacks) per billing period; refused
    /// over it under `hard` enforcement, billed as `deployments` overage under `soft`.
    pub deployments_per_month: Option<u64>,
    /// API requests per minute for all of the org's API keys together (in place of the hub's
    /// `rate_limit.per_org_*`). People at the dashboard are limited per session as usual.
    pub api_requests_per_minute: Option<u32>,
    /// The smallest host the installer accepts for this plan's agents (its preflight
    /// checks CPUs, memory and free disk against it); unset: the hub's
    /// `installer.requirements`.
    #[serde(default)]
    pub agent_host: Option<crate::install::HostRequirements>,
    /// `soft`: usage over a limit is billed as overage; `hard`: ingest over it is refused
    /// (agents keep it buffered) until the period ends.
    #[serde(default)]
    pub enforcement: Enforcement,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    #[default]
    Soft,
    Hard,
}

/// A free trial: it ends after `days`, or as soon as usage reaches any of `usage`, whichever
/// comes first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Trial {
    pub days: u32,
    #[serde(default)]
    pub usage: BTreeMap<Meter, u64>,
}

/// One version of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Plan {
    pub id: String,
    pub version: u32,
    pub name: String,
    pub prices: Prices,
    pub limits: Limits,
    pub trial: Option<Trial>,
    /// The Stripe price a synced subscription uses, if any.
    pub stripe_price_id: Option<String>,
    pub created_at_ms: i64,
    pub created_by: String,
}

/// Where a subscription stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Trialing,
    Active,
    PastDue,
    Unpaid,
    Suspended,
    Canceled,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Trialing => "trialing",
            Status::Active => "active",
            Status::PastDue => "past_due",
            Status::Unpaid => "unpaid",
            Status::Suspended => "suspended",
            Status::Canceled => "canceled",
        }
    }
}

/// What a status allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Entitlements {
    pub ingest: bool,
    pub deploy: bool,
    pub enroll: bool,
    pub read: bool,
}

/// The entitlement table (see the module doc).
pub fn entitlements(status: Status) -> Entitlements {
    let all = Entitlements { ingest: true, deploy: true, enroll: true, read: true };
    match status {
        Status::Trialing | Status::Active | Status::PastDue => all,
        Status::Unpaid => Entitlements { deploy: false, enroll: false, ..all },
        Status::Suspended | Status::Canceled => Entitlements { ingest: false, deploy: false, enroll: false, read: true },
    }
}

/// A plan change inside a subscription's life: from `at_ms` on, `plan_id` at `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PlanChange {
    pub at_ms: i64,
    pub plan_id: String,
    pub plan_version: u32,
}

/// An org's subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Subscription {
    pub org: String,
    pub plan_id: String,
    pub plan_version: u32,
    pub status: Status,
    /// Periods are calendar months starting at this instant's day and time of month.
    pub period_anchor_ms: i64,
    /// When the trial ends (or ended); `None` without a trial.
    pub trial_end_ms: Option<i64>,
    /// Consecutive failed payments.
    pub failed_payments: u32,
    pub stripe_customer_id: Option<String>,
    pub stripe_subscription_id: Option<String>,
    /// Every plan the subscription has been on, oldest first (the first is its start).
    pub changes: Vec<PlanChange>,
    pub status_changed_at_ms: i64,
    pub created_at_ms: i64,
    /// The Stripe price the Stripe subscription was last set to by the hub (a plan change
    /// to a version with another price is pushed to Stripe when this differs).
    #[serde(default)]
    pub stripe_price_synced: Option<String>,
    /// The Stripe subscription is known canceled in Stripe.
    #[serde(default)]
    pub stripe_canceled: bool,
    /// The latest Stripe events whose effect this subscription carries (at most
    /// [`APPLIED_EVENTS_KEPT`]), written with the effect so an event is never applied twice.
    #[serde(default)]
    pub applied_events: Vec<String>,
}

/// Stripe event ids a subscription remembers (far more than can be pending at once).
pub const APPLIED_EVENTS_KEPT: usize = 64;

/// The UTC calendar-month period `[start, end)` holding `at_ms` for a subscription anchored
/// at `anchor_ms` (anchored on the 31st, a period starts on the last day of shorter months).
pub fn period_containing(anchor_ms: i64, at_ms: i64) -> (i64, i64) {
    let start_of = |k: i64| month_offset(anchor_ms, k);
    // Months between anchor and at, then step to the period holding `at`.
    let (anchor, at) = (to_datetime(anchor_ms), to_datetime(at_ms));
    let mut k = (i64::from(at.year()) - i64::from(anchor.year())) * 12 + i64::from(at.month() as u8) - i64::from(anchor.month() as u8);
    while start_of(k) > at_ms {
        k -= 1;
    }
    while start_of(k + 1) <= at_ms {
        k += 1;
    }
    (start_of(k), start_of(k + 1))
}

fn to_datetime(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// `anchor_ms` moved by `k` calendar months, the day clamped to the month's length.
fn month_offset(anchor_ms: i64, k: i64) -> i64 {
    let anchor = to_datetime(anchor_ms);
    let months = i64::from(anchor.year()) * 12 + i64::from(anchor.month() as u8) - 1 + k;
    let (year, month0) = (months.div_euclid(12), months.rem_euclid(12));
    let month = time::Month::try_from((month0 + 1) as u8).unwrap_or(time::Month::January);
    let year = i32::try_from(year).unwrap_or(anchor.year());
    let day = anchor.day().min(month.length(year));
    let date = time::Date::from_calendar_date(year, month, day).unwrap_or(anchor.date());
    let moved = anchor.replace_date(date);
    (moved.unix_timestamp_nanos() / 1_000_000) as i64
}

// ---- catalog ----

/// Body of a plan create or change.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    pub name: String,
    pub prices: Prices,
    #[serde(default)]
    pub limits: Limits,
    pub trial: Option<Trial>,
    pub stripe_price_id: Option<String>,
}

/// Plan ids are slugs: 2-40 characters of a-z, 0-9 and '-'.
pub fn validate_plan(id: &str, request: &PlanRequest) -> Result<(), String> {
    crate::api::validate_org_id(id).map_err(|_| format!("plan id {id:?} must be 2-40 characters of a-z, 0-9 and '-'"))?;
    if request.name.trim().is_empty() || request.name.len() > 120 {
        return Err("name must be 1-120 characters".into());
    }
    request.prices.validate().map_err(|e| format!("prices: {e}"))?;
    if let Some(trial) = &request.trial {
        if trial.days == 0 || trial.days > 365 {
            return Err("trial.days must be 1-365".into());
        }
    }
    if request.limits.retention_days.is_some_and(|d| d > crate::retention::MAX_RETENTION_DAYS) {
        return Err(format!("limits.retention_days must be at most {}", crate::retention::MAX_RETENTION_DAYS));
    }
    Ok(())
}

/// Write `request` as the next version of plan `id` (version 1 when new).
pub fn put_plan(hub: &Hub, id: &str, request: PlanRequest, by: &str, new_only: bool) -> Result<Plan, PlanError> {
    validate_plan(id, &request).map_err(PlanError::Invalid)?;
    loop {
        let latest = hub.store.latest_plan(id)?;
        if new_only && latest.is_some() {
            return Err(PlanError::Store(Error::AlreadyExists(format!("plan {id}"))));
        }
        let plan = Plan {
            id: id.to_string(),
            version: latest.map_or(1, |p| p.version + 1),
            name: request.name.trim().to_string(),
            prices: request.prices.clone(),
            limits: request.limits.clone(),
            trial: request.trial.clone(),
            stripe_price_id: request.stripe_price_id.clone(),
            created_at_ms: crate::wall_ms(),
            created_by: by.to_string(),
        };
        match hub.store.create_plan_version(&plan) {
            Ok(()) => return Ok(plan),
            // Someone wrote that version meanwhile: take the next one.
            Err(Error::AlreadyExists(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] Error),
}

// ---- subscriptions ----

pub fn subscription(hub: &Hub, org: &str) -> Result<Option<Subscription>, Error> {
    hub.store.subscription(org)
}

pub fn subscriptions(hub: &Hub) -> Result<Vec<Subscription>, Error> {
    hub.store.subscriptions()
}

/// The org's entitlements now.
pub fn entitled(hub: &Hub, org: &str) -> Result<(Option<Status>, Entitlements), Error> {
    Ok(match hub.store.subscription(org)? {
        Some(s) => (Some(s.status), entitlements(s.status)),
        None => (None, entitlements(Status::Active)),
    })
}

/// Put an org on plan `plan_id` (its newest version) from now. A new subscription starts
/// its periods now and its trial if the plan has one; a change keeps the anchor and
/// records the change so the current period is split there.
pub fn subscribe(hub: &Hub, org: &str, plan_id: &str) -> Result<Subscription, PlanError> {
    let plan = hub.store.latest_plan(plan_id)?.ok_or_else(|| Error::NotFound(format!("plan {plan_id}")))?;
    hub.store.org(org)?.ok_or_else(|| Error::NotFound(format!("org {org}")))?;
    let now = crate::wall_ms();
    let subscription = hub.store.update_subscription(org, |current| {
        let change = PlanChange { at_ms: now, plan_id: plan.id.clone(), plan_version: plan.version };
        Ok(match current {
            Some(mut s) => {
                if s.status == Status::Canceled {
                    return Err(Error::Conflict(format!("the subscription of org {org} is canceled")));
                }
                s.plan_id = plan.id.clone();
                s.plan_version = plan.version;
                s.changes.push(change);
                s
            }
            None => {
                let trial_end_ms = plan.trial.as_ref().map(|t| now + i64::from(t.days) * 24 * HOUR_MS);
                Subscription {
                    org: org.to_string(),
                    plan_id: plan.id.clone(),
                    plan_version: plan.version,
                    status: if trial_end_ms.is_some() { Status::Trialing } else { Status::Active },
                    period_anchor_ms: now,
                    trial_end_ms,
                    failed_payments: 0,
                    stripe_customer_id: None,
                    stripe_subscription_id: None,
                    changes: vec![change],
                    status_changed_at_ms: now,
                    created_at_ms: now,
                    applied_events: Vec::new(),
                    stripe_price_synced: None,
                    stripe_canceled: false,
                }
            }
        })
    })?;
    sync_org(hub, &subscription)?;
    Ok(subscription)
}

static ENTITLEMENT_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bumped whenever any subscription's entitlements may have changed, so places that cache
/// an answer (the ingest streams) ask again at once.
pub fn entitlement_epoch() -> u64 {
    ENTITLEMENT_EPOCH.load(std::sync::atomic::Ordering::Acquire)
}

/// Carry the plan's limits and the status's suspension onto the org record, where
/// enrollment and retention enforce them.
fn sync_org(hub: &Hub, subscription: &Subscription) -> Result<(), Error> {
    ENTITLEMENT_EPOCH.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let plan = hub.store.plan_version(&subscription.plan_id, subscription.plan_version)?;
    let limits = plan.map(|p| p.limits).unwrap_or_default();
    let suspended = !entitlements(subscription.status).enroll;
    hub.store.apply_entitlements(&subscription.org, limits.agents, limits.retention_days, suspended)
}

/// Move the subscription to `status` (no-op when already there).
fn set_status(hub: &Hub, org: &str, at_ms: i64, change: impl Fn(&mut Subscription)) -> Result<Subscription, Error> {
    set_status_once(hub, org, at_ms, None, change)
}

/// [`set_status`], at most once per `event`: the event id is stored with the change, and a
/// subscription that already carries it is left as it is.
fn set_status_once(hub: &Hub, org: &str, at_ms: i64, event: Option<&str>, change: impl Fn(&mut Subscription)) -> Result<Subscription, Error> {
    let before = hub.store.subscription(org)?.map(|s| s.status);
    let subscription = hub.store.update_subscription(org, |current| {
        let mut s = current.ok_or_else(|| Error::NotFound(format!("subscription of org {org}")))?;
        if let Some(event) = event {
            if s.applied_events.iter().any(|e| e == event) {
                return Ok(s);
            }
            s.applied_events.push(event.to_string());
            let excess = s.applied_events.len().saturating_sub(APPLIED_EVENTS_KEPT);
            s.applied_events.drain(..excess);
        }
        let was = s.status;
        change(&mut s);
        if s.status != was {
            s.status_changed_at_ms = at_ms;
        }
        Ok(s)
    })?;
    if before != Some(subscription.status) {
        tracing::info!(%org, from = ?before, to = subscription.status.name(), "subscription status changed");
        sync_org(hub, &subscription)?;
    }
    Ok(subscription)
}

/// A payment failed: past due, and suspended at the third failure in a row.
pub fn payment_failed(hub: &Hub, org: &str, at_ms: i64) -> Result<Subscription, Error> {
    set_status(hub, org, at_ms, unpaid)
}

/// A payment went through: active again, failures forgotten, the org restored.
pub fn payment_succeeded(hub: &Hub, org: &str, at_ms: i64) -> Result<Subscription, Error> {
    set_status(hub, org, at_ms, paid)
}

fn paid(s: &mut Subscription) {
    if s.status == Status::Canceled {
        return;
    }
    s.failed_payments = 0;
    s.status = Status::Active;
}

fn unpaid(s: &mut Subscription) {
    if s.status == Status::Canceled {
        return;
    }
    s.failed_payments += 1;
    s.status = if s.failed_payments >= FAILED_PAYMENTS_TO_SUSPEND { Status::Suspended } else { Status::PastDue };
}

/// A Stripe payment event (`succeeded` or failed), applied at most once per event id.
pub fn apply_payment_event(hub: &Hub, org: &str, at_ms: i64, event: &str, succeeded: bool) -> Result<Subscription, Error> {
    set_status_once(hub, org, at_ms, Some(event), if succeeded { paid } else { unpaid })
}

/// A Stripe subscription status event, applied at most once per event id.
pub fn apply_status_event(hub: &Hub, org: &str, status: Status, event: &str) -> Result<Subscription, Error> {
    set_status_once(hub, org, crate::wall_ms(), Some(event), |s| {
        s.status = status;
        if status == Status::Active {
            s.failed_payments = 0;
        }
    })
}

/// Operator actions: suspend, restore (active) or cancel.
pub fn force_status(hub: &Hub, org: &str, status: Status) -> Result<Subscription, Error> {
    set_status(hub, org, crate::wall_ms(), |s| {
        s.status = status;
        if status == Status::Active {
            s.failed_payments = 0;
        }
    })
}

/// Record what the hub last made the Stripe subscription: its price, or that it is
/// canceled.
pub fn set_stripe_synced(hub: &Hub, org: &str, price: Option<String>, canceled: bool) -> Result<(), Error> {
    hub.store.update_subscription(org, |current| {
        let mut s = current.ok_or_else(|| Error::NotFound(format!("subscription of org {org}")))?;
        if price.is_some() {
            s.stripe_price_synced = price.clone();
        }
        s.stripe_canceled |= canceled;
        Ok(s)
    })?;
    Ok(())
}

pub fn set_stripe_ids(hub: &Hub, org: &str, customer: Option<String>, subscription: Option<String>) -> Result<(), Error> {
    hub.store.update_subscription(org, |current| {
        let mut s = current.ok_or_else(|| Error::NotFound(format!("subscription of org {org}")))?;
        if customer.is_some() {
            s.stripe_customer_id = customer.clone();
        }
        if subscription.is_some() {
            s.stripe_subscription_id = subscription.clone();
        }
        Ok(s)
    })?;
    Ok(())
}

/// End trials whose time is up (or whose usage reached the plan's trial limits):
/// trialing → active at the moment the trial ended. Returns how many ended.
pub fn end_trials(hub: &Hub, now_ms: i64, usage: impl Fn(&str, i64, i64) -> Result<BTreeMap<Meter, u64>, Error>) -> Result<usize, Error> {
    let mut ended = 0;
    for s in hub.store.subscriptions()?.into_iter().filter(|s| s.status == Status::Trialing) {
        let Some(trial_end) = s.trial_end_ms else { continue };
        let plan = hub.store.plan_version(&s.plan_id, s.plan_version)?;
        let limits = plan.and_then(|p| p.trial).map(|t| t.usage).unwrap_or_default();
        let used_up = !limits.is_empty() && {
            // Ledger entries are hourly: count from the hour the subscription started.
            let used = usage(&s.org, super::hour_of(s.created_at_ms), now_ms.saturating_add(1))?;
            limits.iter().any(|(meter, limit)| used.get(meter).copied().unwrap_or(0) >= *limit)
        };
        if now_ms >= trial_end || used_up {
            let end = trial_end.min(now_ms);
            hub.store.update_subscription(&s.org, |current| {
                let mut s = current.ok_or_else(|| Error::NotFound("subscription".into()))?;
                if s.status == Status::Trialing {
                    s.status = Status::Active;
                    s.trial_end_ms = Some(end);
                    s.status_changed_at_ms = end;
                }
                Ok(s)
            })?;
            tracing::info!(org = %s.org, used_up, "trial ended");
            ended += 1;
        }
    }
    Ok(ended)
}

/// Refuse an action the org's subscription does not allow, with the reason.
pub fn require(hub: &Hub, org: &str, what: &str, allowed: impl Fn(&Entitlements) -> bool) -> Result<(), String> {
    let (status, e) = entitled(hub, org).map_err(|e| e.to_string())?;
    if allowed(&e) {
        return Ok(());
    }
    let status = status.map_or("none", Status::name);
    Err(format!(
        "{what} is not allowed: the subscription of org {org} is {status}; running workloads and data are kept, and paying the open invoice restores it"
    ))
}

/// Usage is complete this long after an hour ends (the ledger closes hours after a grace);
/// periods are closed only once their last hour is this old.
pub const SETTLE_MS: i64 = 2 * HOUR_MS;

/// The billing clock: every `billing_interval_ms`, end trials that are over and close ended
/// periods whose usage has settled.
pub async fn run(hub: std::sync::Arc<Hub>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = std::time::Duration::from_millis(hub.config.billing_interval_ms.max(50));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let worker = hub.clone();
        let outcome = tokio::task::spawn_blocking(move || -> Result<(usize, usize), String> {
            let now = crate::wall_ms();
            let ended = end_trials(&worker, now, |org, from, to| super::invoices::usage(&worker, org, from, to)).map_err(|e| e.to_string())?;
            let closed = super::invoices::close_periods(&worker, now - SETTLE_MS).map_err(|e| e.to_string())?;
            Ok((ended, closed))
        })
        .await;
        match outcome {
            Ok(Ok((0, 0))) => {}
            Ok(Ok((ended, closed))) => tracing::info!(trials_ended = ended, invoices_closed = closed, "billing clock"),
            Ok(Err(error)) => tracing::warn!(%error, "billing clock failed"),
            Err(_) => tracing::warn!("billing clock panicked"),
        }
    }
}

/// Under a plan with `hard` enforcement, why the org may not ingest more of `class` now:
/// log bytes this period or events today at the plan's limit. Usage is the ledger's, which
/// closes each hour shortly after it ends, so enforcement trails usage by about an hour.
pub fn quota_refusal(hub: &Hub, org: &str, class: gantry_shared::message::StreamClass, now_ms: i64) -> Option<String> {
    use gantry_shared::message::StreamClass;
    let s = hub.store.subscription(org).ok()??;
    let plan = hub.store.plan_version(&s.plan_id, s.plan_version).ok()??;
    if plan.limits.enforcement != Enforcement::Hard {
        return None;
    }
    let (meter, limit, from, what) = match class {
        StreamClass::Logs => {
            (Meter::LogBytes, plan.limits.log_bytes_per_month?, period_containing(s.period_anchor_ms, now_ms).0, "log bytes this billing period")
        }
        StreamClass::Events => (Meter::Events, plan.limits.events_per_day?, now_ms.div_euclid(24 * HOUR_MS) * 24 * HOUR_MS, "events today (UTC)"),
        _ => return None,
    };
    let used = hub.store.ledger_usage(org, super::hour_of(from), now_ms.saturating_add(1)).ok()?.get(&meter).copied().unwrap_or(0);
    (used >= limit as i64).then(|| {
        format!("org {org} reached its plan's limit of {limit} {what} ({used} used); the agent keeps the rest until the limit resets or the plan changes")
    })
}

/// The org's plan limit of API requests per minute (its API keys share it), if the plan of
/// its subscription sets one. Enforced whatever the plan's `enforcement`: a rate limit has
/// no overage to bill.
pub fn api_requests_per_minute(hub: &Hub, org: &str) -> Option<u32> {
    let s = hub.store.subscription(org).ok()??;
    hub.store.plan_version(&s.plan_id, s.plan_version).ok()??.limits.api_requests_per_minute
}

/// Under a hard `deployments_per_month` limit, why the org may not make another deployment
/// revision now (create, update and rollback each make one, as the `deployments` meter
/// counts them), or `None` if it may. Counted from the store, not the hourly ledger, so the
/// limit holds to the request.
pub fn deploy_quota_refusal(hub: &Hub, org: &str, now_ms: i64) -> Result<Option<String>, Error> {
    let Some(s) = hub.store.subscription(org)? else {
        return Ok(None);
    };
    let Some(plan) = hub.store.plan_version(&s.plan_id, s.plan_version)? else {
        return Ok(None);
    };
    let (Enforcement::Hard, Some(limit)) = (plan.limits.enforcement, plan.limits.deployments_per_month) else {
        return Ok(None);
    };
    let (from, until) = period_containing(s.period_anchor_ms, now_ms);
    let mut used = 0u64;
    for deployment in hub.store.deployments_of_org_all(org)? {
        used += hub.store.revisions(&deployment.id)?.iter().filter(|r| (from..until).contains(&r.created_at_ms)).count() as u64;
    }
    Ok((used >= limit).then(|| {
        format!(
            "org {org} reached its plan's limit of {limit} deployment revisions this billing period ({used} made); it resets at {}",
            crate::api::rfc3339(until)
        )
    }))
}

/// Store errors for the API.
impl From<PlanError> for store::Error {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::Invalid(m) => store::Error::Conflict(m),
            PlanError::Store(e) => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> i64 {
        let t = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap();
        (t.unix_timestamp_nanos() / 1_000_000) as i64
    }

    #[test]
    fn periods_are_calendar_months_from_the_anchor() {
        let anchor = ms("2026-01-15T10:00:00Z");
        assert_eq!(period_containing(anchor, ms("2026-01-15T10:00:00Z")), (anchor, ms("2026-02-15T10:00:00Z")));
        assert_eq!(period_containing(anchor, ms("2026-03-15T09:59:59Z")), (ms("2026-02-15T10:00:00Z"), ms("2026-03-15T10:00:00Z")));
        assert_eq!(period_containing(anchor, ms("2026-03-15T10:00:00Z")).0, ms("2026-03-15T10:00:00Z"), "half-open: the end belongs to the next");
        // Anchored on the 31st: February's period starts on the 28th.
        let end_of_month = ms("2026-01-31T00:00:00Z");
        assert_eq!(period_containing(end_of_month, ms("2026-03-01T00:00:00Z")), (ms("2026-02-28T00:00:00Z"), ms("2026-03-31T00:00:00Z")));
        assert_eq!(period_containing(end_of_month, ms("2027-01-05T00:00:00Z")), (ms("2026-12-31T00:00:00Z"), ms("2027-01-31T00:00:00Z")));
    }

    #[test]
    fn the_entitlement_table_is_as_documented() {
        let row = |s| {
            let e = entitlements(s);
            (e.ingest, e.deploy, e.enroll, e.read)
        };
        assert_eq!(row(Status::Trialing), (true, true, true, true));
        assert_eq!(row(Status::Active), (true, true, true, true));
        assert_eq!(row(Status::PastDue), (true, true, true, true));
        assert_eq!(row(Status::Unpaid), (true, false, false, true));
        assert_eq!(row(Status::Suspended), (false, false, false, true));
        assert_eq!(row(Status::Canceled), (false, false, false, true));
    }
}
