//! Health checks on the hub's side: which checks each agent runs (resolved from the org's
//! configurations and their scopes), sending those sets to agents, and recording what
//! agents report.
//!
//! The hub never runs a check itself: agents run them locally, keep running them while
//! offline, and report state changes and summaries on their health telemetry stream.

use crate::metrics::Metrics;
use crate::store::{Agent, CheckConfig, CheckStatus};
use crate::Hub;
use gantry_shared::checks::CheckSet;
use gantry_shared::message::HubMessage;
use gantry_shared::telemetry::{Record, RecordBody};
use tracing::warn;

/// Whether `config` applies to `agent` (both of one org).
pub fn applies(hub: &Hub, config: &CheckConfig, agent: &Agent) -> bool {
    let scope = &config.scope;
    if scope.is_everyone() || scope.agents.contains(&agent.id) {
        return true;
    }
    if !scope.selector.is_empty() && scope.selector.iter().all(|(k, v)| agent.labels.iter().any(|(lk, lv)| lk == k && lv == v)) {
        return true;
    }
    let Some(deployment) = &scope.deployment else { return false };
    match hub.store.deployment(deployment) {
        Ok(Some(d)) if d.org == agent.org && d.deleted_at_ms.is_none() => {
            crate::orchestrator::resolve_targets(hub, &d.org, &d.targets).is_ok_and(|targets| targets.binary_search(&agent.id).is_ok())
        }
        _ => false,
    }
}

/// The checks `agent` runs now.
pub fn set_for(hub: &Hub, agent: &Agent) -> Result<CheckSet, crate::store::Error> {
    let revision = hub.store.check_revision(&agent.org)?;
    let mut checks: Vec<_> = hub.store.check_configs(&agent.org)?.into_iter().filter(|c| applies(hub, c, agent)).map(|c| c.spec).collect();
    checks.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(CheckSet { revision, checks })
}

/// Send `agent` its current set and forget states of checks it no longer runs.
pub fn sync_agent(hub: &Hub, agent: &Agent) {
    match set_for(hub, agent) {
        Ok(set) => {
            let names: Vec<&str> = set.checks.iter().map(|c| c.name.as_str()).collect();
            if let Err(error) = hub.store.retain_check_statuses(&agent.id, &names) {
                warn!(%error, agent = %agent.id, "could not forget removed check states");
            }
            hub.registry.send(&agent.id, HubMessage::Checks(set));
        }
        Err(error) => warn!(%error, agent = %agent.id, "could not resolve the agent's checks"),
    }
}

/// An agent just connected: send it its checks (an empty set too, so it drops checks
/// removed while it was away).
pub fn agent_connected(hub: &Hub, agent_id: &str) {
    if let Ok(Some(agent)) = hub.store.agent(agent_id) {
        sync_agent(hub, &agent);
    }
}

/// The org's check configuration (or something a scope depends on) changed: send every
/// connected agent of the org its new set.
pub fn org_changed(hub: &Hub, org: &str) {
    for agent in hub.store.agents_of_org(org).unwrap_or_default() {
        if agent.revoked_at_ms.is_none() {
            if hub.registry.is_connected(&agent.id) {
                sync_agent(hub, &agent);
            } else if let Ok(set) = set_for(hub, &agent) {
                let names: Vec<&str> = set.checks.iter().map(|c| c.name.as_str()).collect();
                let _ = hub.store.retain_check_statuses(&agent.id, &names);
            }
        }
    }
}

/// Record the check reports among records just stored from `agent_id`'s health stream
/// (only records above the previous mark, so a resend is not counted twice).
pub fn record_reports(hub: &Hub, agent_id: &str, records: &[Record], previous_mark: u64) {
    let mut mark = previous_mark;
    for record in records {
        let fresh = record.seq > mark;
        mark = mark.max(record.seq);
        let RecordBody::Check(report) = &record.body else { continue };
        if !fresh {
            continue;
        }
        Metrics::inc(&hub.health.counters.check_reports);
        // A report in a crash loop names the remediation it refused, not one it took.
        if report.remediation.is_some() && !report.crash_loop {
            Metrics::inc(&hub.health.counters.remediations);
        }
        let previous = hub.store.check_status(agent_id, &report.name).ok().flatten();
        // Reports can arrive out of order after an outage; keep the newest.
        if previous.as_ref().is_some_and(|p| p.reported_at_ms > record.ts_unix_ms) {
            continue;
        }
        let (last_remediation, last_remediation_ms) = match &report.remediation {
            Some(what) => (Some(what.clone()), Some(record.ts_unix_ms)),
            None => previous.as_ref().map_or((None, None), |p| (p.last_remediation.clone(), p.last_remediation_ms)),
        };
        let status = CheckStatus {
            name: report.name.clone(),
            kind: report.kind.clone(),
            state: report.state,
            since_ms: report.since_unix_ms,
            output: report.output.clone(),
            latency_ms: report.latency_ms,
            reported_at_ms: record.ts_unix_ms,
            crash_loop: report.crash_loop,
            last_remediation,
            last_remediation_ms,
        };
        if let Err(error) = hub.store.set_check_status(agent_id, &status) {
            warn!(%error, agent = %agent_id, "could not record a check report");
        }
    }
    hub.health.wake.notify_one();
}
