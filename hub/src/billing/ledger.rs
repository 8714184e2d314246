//! Metering: feeds the usage ledger from the hub's own durable records, so a hub restart
//! neither loses usage nor counts it twice.
//!
//! Every entry has a deterministic key `(org, meter, hour, source)` and the store refuses a
//! second, different value for a key, so each step below can be re-run at any time (after a
//! crash, by two runs at once) and adds nothing the ledger already holds.
//!
//! - `agent_hours`: 1 per agent (source: agent id) for each UTC hour in which it was seen
//!   connected: every run records the current hour of each agent in the session registry,
//!   and the hour of each agent's last connection (so a session shorter than the run
//!   interval still counts). The quantity is always 1, so it is written at once.
//! - `peak_agents`: per org and hour (source `hub`), the most agents connected at once,
//!   approximated by sampling the registry on every run (default each minute). The hour's
//!   running maximum is kept in the store's metering scratch (written only when it rises,
//!   so a restart keeps it) and written to the ledger when the hour closes.
//! - `log_bytes`, `metric_samples`, `events`, `check_runs`: per agent (source: agent id) and
//!   UTC hour of the records' timestamps. The telemetry store adds each batch's counts to a
//!   per-(agent, class, hour) total in the same atomic write as the batch itself (see
//!   `store/telemetry.rs`), so ingest pays one read and two writes per batch, never per
//!   record. Once an hour has closed (`usage_close_grace_ms` after its end) its totals are
//!   written; usage stored for a closed hour later becomes a correction with reason
//!   `late usage` and source `late:<agent>:<new total>` (deterministic, so a retry after a
//!   crash is a duplicate).
//! - `deployments`: 1 per revision created (source `<deployment id>:<revision>`), in the
//!   hour of its creation, written on the next run; a per-deployment cursor in the scratch
//!   remembers the last revision metered.
//!
//! This module must not price anything or talk to Stripe: it only writes the ledger.

use super::{hour_of, Meter, HOUR_MS};
use crate::store::{EntryKind, Error, LedgerEntry, StoredUsage};
use crate::Hub;
use gantry_shared::message::StreamClass;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// The reason of corrections for usage stored after its hour closed.
pub const LATE_USAGE: &str = "late usage";
/// The actor of corrections the hub makes itself.
pub const HUB_ACTOR: &str = "hub";
/// Source of per-org entries the hub measures itself (peak agents).
pub const HUB_SOURCE: &str = "hub";
/// Unsettled telemetry hours read per store call while closing.
const CLOSE_BATCH: usize = 1024;
/// Most store calls one close makes for telemetry usage; the rest waits for the next run.
const CLOSE_ROUNDS: usize = 64;

/// The meter of a telemetry class.
pub fn meter_of(class: StreamClass) -> Meter {
    match class {
        StreamClass::Logs => Meter::LogBytes,
        StreamClass::Metrics => Meter::MetricSamples,
        StreamClass::Events => Meter::Events,
        StreamClass::Health => Meter::CheckRuns,
    }
}

/// The ledger quantity of stored telemetry usage.
fn quantity_of(usage: &StoredUsage) -> i64 {
    let units = if usage.class == StreamClass::Logs { usage.bytes } else { usage.records };
    i64::try_from(units).unwrap_or(i64::MAX)
}

/// What one run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunReport {
    /// New ledger entries (duplicates not counted).
    pub appended: usize,
    /// Of those, `late usage` corrections.
    pub late: usize,
    /// Entries refused as conflicts (logged by the store).
    pub conflicts: usize,
}

/// The metering's memory between runs: only shortcuts (what it already wrote), so a new
/// one after a restart re-derives everything from the store and the registry.
#[derive(Debug, Default)]
pub struct Metering {
    /// `(agent, hour)` pairs already in the ledger as agent hours.
    agent_hours: HashSet<(String, i64)>,
    /// Peak agents per `(org, hour)` already in the scratch.
    peaks: HashMap<(String, i64), i64>,
}

fn peak_key(hour_ms: i64, org: &str) -> String {
    format!("peak/{hour_ms:016}/{org}")
}

fn deploy_key(deployment: &str) -> String {
    format!("deploy/{deployment}")
}

fn entry(org: &str, meter: Meter, hour_ms: i64, source: String, quantity: i64, kind: EntryKind, now_ms: i64) -> LedgerEntry {
    LedgerEntry { seq: 0, org: org.to_string(), meter, hour_ms, source, quantity, kind, recorded_at_ms: now_ms }
}

impl Metering {
    /// One run at `now_ms`: sample connected agents, meter new deployment revisions, and
    /// close every hour starting before `close_before_ms` (normally the hour of
    /// `now - usage_close_grace_ms`; a test may pass a later time to close the current hour).
    pub fn run_once(&mut self, hub: &Hub, now_ms: i64, close_before_ms: i64) -> Result<RunReport, Error> {
        let mut report = RunReport::default();
        self.sample(hub, now_ms, &mut report)?;
        meter_deployments(hub, now_ms, &mut report)?;
        close(hub, now_ms, close_before_ms, &mut report)?;
        self.peaks.retain(|(_, hour), _| *hour >= close_before_ms);
        let keep_from = hour_of(now_ms) - HOUR_MS;
        self.agent_hours.retain(|(_, hour)| *hour >= keep_from);
        Ok(report)
    }

    /// Agent hours of connected agents and of recent connections; peak agents per org.
    fn sample(&mut self, hub: &Hub, now_ms: i64, report: &mut RunReport) -> Result<(), Error> {
        let hour = hour_of(now_ms);
        let mut connected: BTreeMap<String, i64> = BTreeMap::new();
        let mut new = Vec::new();
        for agent in hub.store.agents()? {
            let mut hours = Vec::new();
            if hub.registry.is_connected(&agent.id) {
                hours.push(hour);
                *connected.entry(agent.org.clone()).or_default() += 1;
            }
            // A session that began and ended between two runs still counts. Older hours were
            // taken when they were current.
            if let Some(at) = agent.last_connected_ms.filter(|at| hour_of(*at) >= hour - HOUR_MS && *at <= now_ms) {
                hours.push(hour_of(at));
            }
            for at in hours {
                if self.agent_hours.insert((agent.id.clone(), at)) {
                    new.push(entry(&agent.org, Meter::AgentHours, at, agent.id.clone(), 1, EntryKind::Usage, now_ms));
                }
            }
        }
        // An agent hour that failed is retried by the next run (it is not remembered).
        for (ok, entry) in record(hub, &new, report).into_iter().zip(&new) {
            if !ok {
                self.agent_hours.remove(&(entry.source.clone(), entry.hour_ms));
            }
        }
        for (org, count) in connected {
            let known = self.peaks.get(&(org.clone(), hour)).copied().unwrap_or(0);
            if count > known {
                let stored = hub.store.ledger_work_max(&peak_key(hour, &org), count)?;
                self.peaks.insert((org, hour), stored);
            }
        }
        Ok(())
    }
}

/// Append entries in one transaction, counting what happened; whether each one is in the
/// ledger now. A failure is logged and left to the next run.
fn record(hub: &Hub, entries: &[LedgerEntry], report: &mut RunReport) -> Vec<bool> {
    let mut recorded = Vec::with_capacity(entries.len());
    for (outcome, entry) in hub.store.record_many(entries).into_iter().zip(entries) {
        recorded.push(match outcome {
            Ok(crate::store::LedgerRecorded::Appended { .. }) => {
                report.appended += 1;
                if matches!(&entry.kind, EntryKind::Correction { reason, .. } if reason == LATE_USAGE) {
                    report.late += 1;
                }
                true
            }
            Ok(crate::store::LedgerRecorded::Duplicate { .. }) => true,
            Err(Error::Conflict(_)) => {
                report.conflicts += 1;
                false
            }
            Err(error) => {
                tracing::warn!(%error, key = %entry.key_text(), "could not record usage; the next run retries");
                false
            }
        });
    }
    recorded
}

/// One entry per deployment revision not metered yet.
fn meter_deployments(hub: &Hub, now_ms: i64, report: &mut RunReport) -> Result<(), Error> {
    for org in hub.store.orgs()? {
        for deployment in hub.store.deployments_of_org_all(&org.id)? {
            let cursor = deploy_key(&deployment.id);
            let metered = hub.store.ledger_work(&cursor)?.unwrap_or(0).max(0) as u64;
            if deployment.revision <= metered {
                continue;
            }
            let mut new = Vec::new();
            for number in metered + 1..=deployment.revision {
                if let Some(revision) = hub.store.revision(&deployment.id, number)? {
                    let source = format!("{}:{}", deployment.id, number);
                    new.push(entry(&org.id, Meter::Deployments, hour_of(revision.created_at_ms), source, 1, EntryKind::Usage, now_ms));
                }
            }
            if record(hub, &new, report).into_iter().all(|ok| ok) {
                hub.store.set_ledger_work(&cursor, deployment.revision as i64)?;
            }
        }
    }
    Ok(())
}

/// The entry that brings `(org, meter, hour, source)` up to `total`: the usage entry if there
/// is none yet, a `late usage` correction for the difference if less is recorded, nothing
/// otherwise (a counter's total never falls; a gauge keeps its largest value).
pub fn settling_entry(hub: &Hub, org: &str, meter: Meter, hour_ms: i64, source: &str, total: i64, now_ms: i64) -> Result<Option<LedgerEntry>, Error> {
    let late_prefix = format!("late:{source}:");
    let mut base = None;
    let mut late = 0i64;
    for (recorded, quantity) in hub.store.ledger_hour_sources(org, meter, hour_ms)? {
        if recorded == source {
            base = Some(quantity);
        } else if recorded.starts_with(&late_prefix) {
            late += quantity;
        }
    }
    Ok(match base {
        None if total > 0 => Some(entry(org, meter, hour_ms, source.to_string(), total, EntryKind::Usage, now_ms)),
        None => None,
        Some(base) if total > base + late => {
            let kind = EntryKind::Correction { reason: LATE_USAGE.into(), actor: HUB_ACTOR.into(), corrects_period_start_ms: None };
            Some(entry(org, meter, hour_ms, format!("{late_prefix}{total}"), total - base - late, kind, now_ms))
        }
        Some(_) => None,
    })
}

/// Write telemetry usage and peak agents of every hour starting before `before_ms`.
fn close(hub: &Hub, now_ms: i64, before_ms: i64, report: &mut RunReport) -> Result<(), Error> {
    let mut orgs: HashMap<String, Option<String>> = HashMap::new();
    let mut seen: HashSet<StoredUsage> = HashSet::new();
    for _ in 0..CLOSE_ROUNDS {
        let pending: Vec<StoredUsage> = hub.store.unsettled_telemetry_usage(before_ms, CLOSE_BATCH)?.into_iter().filter(|u| !seen.contains(u)).collect();
        if pending.is_empty() {
            break;
        }
        // One transaction and one flush for the round's entries, then each hour settles.
        let mut entries = Vec::new();
        let mut settles = Vec::new();
        for usage in pending {
            if !orgs.contains_key(&usage.agent) {
                let org = hub.store.agent(&usage.agent)?.map(|a| a.org);
                orgs.insert(usage.agent.clone(), org);
            }
            let Some(Some(org)) = orgs.get(&usage.agent) else {
                // Telemetry of an agent the store does not know cannot be billed to anyone.
                tracing::warn!(agent = %usage.agent, "stored usage of an unknown agent; not metered");
                hub.store.settle_telemetry_usage(&usage)?;
                continue;
            };
            let new = settling_entry(hub, org, meter_of(usage.class), usage.hour_ms, &usage.agent, quantity_of(&usage), now_ms)?;
            settles.push((usage, new.is_some().then_some(entries.len())));
            entries.extend(new);
        }
        let ok = record(hub, &entries, report);
        for (usage, at) in settles {
            // If more arrived meanwhile it stays unsettled and the next round takes it.
            if at.is_none_or(|at| ok[at]) {
                hub.store.settle_telemetry_usage(&usage)?;
            }
            seen.insert(usage);
        }
    }
    for (key, max) in hub.store.ledger_work_prefix("peak/")? {
        let mut parts = key.splitn(3, '/').skip(1);
        let (Some(hour), Some(org)) = (parts.next().and_then(|h| h.parse::<i64>().ok()), parts.next()) else {
            return Err(Error::Corrupt(format!("metering scratch key {key:?}")));
        };
        if hour >= before_ms {
            continue;
        }
        let new = settling_entry(hub, org, Meter::PeakAgents, hour, HUB_SOURCE, max, now_ms)?;
        if record(hub, new.as_slice(), report).into_iter().all(|ok| ok) {
            hub.store.remove_ledger_work(&key)?;
        }
    }
    Ok(())
}

/// The ledger's lines of `/metrics`: conflicting re-records refused since the hub started
/// (an alert should fire on any) and the last sequence number given out.
pub fn render_metrics(hub: &Hub) -> String {
    let conflicts = hub.store.ledger_conflicts();
    let head = hub.store.ledger_head().unwrap_or(0);
    format!(
        "# HELP gantry_ledger_conflicts_total Usage ledger writes refused because the key holds another quantity.\n# TYPE gantry_ledger_conflicts_total counter\ngantry_ledger_conflicts_total {conflicts}\n# HELP gantry_ledger_entries Usage ledger entries appended (the last sequence number).\n# TYPE gantry_ledger_entries gauge\ngantry_ledger_entries {head}\n"
    )
}

/// The metering task: a run every `usage_close_interval_ms` until `stop`, closing hours
/// `usage_close_grace_ms` after they end.
pub async fn run(hub: Arc<Hub>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = std::time::Duration::from_millis(hub.config.usage_close_interval_ms.max(50));
    let grace = i64::try_from(hub.config.usage_close_grace_ms).unwrap_or(i64::MAX);
    let metering = Arc::new(Mutex::new(Metering::default()));
    loop {
        let worker = hub.clone();
        let state = metering.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let now = crate::wall_ms();
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            state.run_once(&worker, now, hour_of(now.saturating_sub(grace)))
        })
        .await;
        match outcome {
            Ok(Ok(report)) if report.appended > 0 || report.conflicts > 0 => {
                tracing::info!(appended = report.appended, late = report.late, conflicts = report.conflicts, "usage metered")
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "usage metering failed"),
            Err(_) => tracing::warn!("usage metering panicked"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
