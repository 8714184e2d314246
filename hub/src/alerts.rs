//! Alerting: a background task turns what the hub knows (sessions, agents' check states,
//! disk use, spool drops, deployment reports, certificates) into alerts per org, and
//! notifies operators through webhooks.
//!
//! Each evaluation computes the set of conditions that hold now, per org and rule
//! ([`conditions`], pure), then reconciles it with the open alerts in the store: a new
//! condition fires an alert, a condition that no longer holds resolves its alert, and one
//! that keeps holding stays one alert (deduplicated by key). Silences hold back
//! notifications, never the alert itself. The in-memory inputs here (latest disk use,
//! last spool drop) are rebuilt from the next reports after a restart.

use crate::metrics::Metrics;
use crate::store::{Agent, Alert, AlertRules, AlertStatus, CheckStatus};
use crate::Hub;
use gantry_shared::checks::CheckState;
use gantry_shared::message::DeployState;
use gantry_shared::telemetry::{Record, RecordBody};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

/// Disk readings older than this no longer fire or hold `disk_full`.
const DISK_READING_TTL_MS: i64 = 10 * 60 * 1000;
/// Shortest time between two evaluations triggered by reports.
const MIN_EVALUATION_GAP: Duration = Duration::from_millis(200);

/// Counters of checks and alerts, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub check_reports: AtomicU64,
    pub remediations: AtomicU64,
    pub alerts_fired: AtomicU64,
    pub alerts_resolved: AtomicU64,
    pub evaluations: AtomicU64,
}

/// Latest `disk.used_percent` per mount: `(percent, reported at)`.
type MountReadings = HashMap<String, (f64, i64)>;

/// What alert rules need besides the store, and the alert task's wake-up.
#[derive(Debug)]
pub struct Health {
    /// When this hub process started serving (grace for `agent_offline` after a restart).
    started_ms: AtomicI64,
    /// Latest disk readings per agent.
    disk: Mutex<HashMap<String, MountReadings>>,
    /// When each agent last reported records dropped from a full spool.
    drops: Mutex<HashMap<String, i64>>,
    /// Wakes the alert task early (a check report arrived).
    pub wake: Notify,
    pub counters: Counters,
}

impl Health {
    pub fn new(now_ms: i64) -> Health {
        Health { started_ms: AtomicI64::new(now_ms), disk: Mutex::default(), drops: Mutex::default(), wake: Notify::new(), counters: Counters::default() }
    }

    /// The hub started serving at `now_ms`.
    pub fn set_started(&self, now_ms: i64) {
        self.started_ms.store(now_ms, Ordering::Relaxed);
    }

    pub fn started_ms(&self) -> i64 {
        self.started_ms.load(Ordering::Relaxed)
    }

    /// Note disk readings among metric records just stored.
    pub fn observe_metrics(&self, agent: &str, records: &[Record]) {
        let mut readings = Vec::new();
        for record in records {
            if let RecordBody::Metrics(samples) = &record.body {
                for sample in samples.iter().filter(|s| s.name == "disk.used_percent") {
                    if let Some((_, mount)) = sample.labels.iter().find(|(k, _)| k == "mount") {
                        readings.push((mount.clone(), sample.value, record.ts_unix_ms));
                    }
                }
            }
        }
        if readings.is_empty() {
            return;
        }
        let mut disk = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        let mounts = disk.entry(agent.to_string()).or_default();
        for (mount, percent, ts) in readings {
            let entry = mounts.entry(mount).or_insert((percent, ts));
            if ts >= entry.1 {
                *entry = (percent, ts);
            }
        }
    }

    /// Note that `agent` reported dropped records at `now_ms`.
    pub fn observe_drop(&self, agent: &str, now_ms: i64) {
        self.drops.lock().unwrap_or_else(|p| p.into_inner()).insert(agent.to_string(), now_ms);
        self.wake.notify_one();
    }

    fn disk_of(&self, agent: &str) -> Vec<(String, f64, i64)> {
        let disk = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        disk.get(agent).map(|m| m.iter().map(|(mount, (p, ts))| (mount.clone(), *p, *ts)).collect()).unwrap_or_default()
    }

    fn last_drop(&self, agent: &str) -> Option<i64> {
        self.drops.lock().unwrap_or_else(|p| p.into_inner()).get(agent).copied()
    }
}

/// A condition that holds now and should be an open alert.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub key: String,
    pub rule: &'static str,
    pub severity: &'static str,
    pub summary: String,
    pub agent: Option<String>,
    pub check: Option<String>,
    pub deployment: Option<String>,
}

/// What one agent contributes to an evaluation.
#[derive(Debug, Clone)]
pub struct AgentFacts {
    pub agent: Agent,
    pub connected: bool,
    pub checks: Vec<CheckStatus>,
    /// `(mount, used percent, reported at)`.
    pub disks: Vec<(String, f64, i64)>,
    pub last_drop_ms: Option<i64>,
    /// `(deployment id, deployment name, state, message)` of its deployments.
    pub deployments: Vec<(String, String, DeployState, String)>,
}

/// The conditions that hold for one org's agents at `now_ms` under `rules`.
pub fn conditions(rules: &AlertRules, agents: &[AgentFacts], hub_started_ms: i64, now_ms: i64) -> Vec<Condition> {
    let mut out = Vec::new();
    for facts in agents {
        let agent = &facts.agent;
        if agent.revoked_at_ms.is_some() {
            continue;
        }
        let name = if agent.hostname.is_empty() { agent.id.clone() } else { format!("{} ({})", agent.hostname, agent.id) };
        let condition = |key: String, rule: &'static str, severity: &'static str, summary: String| Condition {
            key,
            rule,
            severity,
            summary,
            agent: Some(agent.id.clone()),
            check: None,
            deployment: None,
        };
        // Offline: disconnected longer than the threshold, and the hub has been up long
        // enough for agents to come back after a restart.
        let grace_over = now_ms >= hub_started_ms + rules.restart_grace_secs as i64 * 1000;
        if !facts.connected && rules.offline_after_secs > 0 && grace_over && agent.last_connected_ms.is_some() {
            let since = agent.last_disconnected_ms.or(agent.last_seen_ms).unwrap_or(agent.enrolled_at_ms);
            if now_ms - since >= rules.offline_after_secs as i64 * 1000 {
                out.push(condition(
                    format!("agent_offline:{}", agent.id),
                    "agent_offline",
                    "critical",
                    format!("agent {name} has been offline since {}", crate::api::rfc3339(since)),
                ));
            }
        }
        if rules.certificate_days > 0 && agent.cert_not_after_ms > 0 && agent.cert_not_after_ms - now_ms < i64::from(rules.certificate_days) * 86_400_000 {
            let days = (agent.cert_not_after_ms - now_ms) / 86_400_000;
            out.push(condition(
                format!("certificate_expiring:{}:agent", agent.id),
                "certificate_expiring",
                "warning",
                format!("agent {name}'s certificate expires in {days} days and was not renewed"),
            ));
        }
        for check in &facts.checks {
            if check.state != CheckState::Failing {
                continue;
            }
            let tls = check.kind == "tls_expiry";
            if !tls && !rules.check_failing {
                continue;
            }
            let rule = if tls { "certificate_expiring" } else { "check_failing" };
            let mut c = condition(
                format!("{rule}:{}:{}", agent.id, check.name),
                rule,
                if check.crash_loop { "critical" } else { "warning" },
                format!(
                    "check {} on {name} is failing{}: {}",
                    check.name,
                    if check.crash_loop { " and its remediation budget is spent (crash loop)" } else { "" },
                    check.output
                ),
            );
            c.check = Some(check.name.clone());
            out.push(c);
        }
        if rules.disk_used_percent > 0.0 {
            for (mount, percent, ts) in &facts.disks {
                if *percent > rules.disk_used_percent && now_ms - ts <= DISK_READING_TTL_MS {
                    out.push(condition(
                        format!("disk_full:{}:{mount}", agent.id),
                        "disk_full",
                        "warning",
                        format!("{mount} on {name} is {percent:.1} % full (threshold {} %)", rules.disk_used_percent),
                    ));
                }
            }
        }
        if rules.spool_dropping && facts.last_drop_ms.is_some_and(|t| now_ms - t < rules.spool_quiet_secs as i64 * 1000) {
            out.push(condition(
                format!("spool_dropping:{}", agent.id),
                "spool_dropping",
                "warning",
                format!("agent {name} is dropping telemetry: its spool is full"),
            ));
        }
        if rules.deployment_failed {
            for (id, dep_name, state, message) in &facts.deployments {
                let what = match state {
                    DeployState::Failed => "failed",
                    DeployState::RolledBack { .. } => "was rolled back",
                    _ => continue,
                };
                let mut c = condition(
                    format!("deployment_failed:{id}:{}", agent.id),
                    "deployment_failed",
                    "critical",
                    format!("deployment {dep_name} {what} on {name}: {message}"),
                );
                c.deployment = Some(id.clone());
                out.push(c);
            }
        }
    }
    out
}

fn agent_facts(hub: &Hub, org: &str) -> Result<Vec<AgentFacts>, crate::store::Error> {
    let mut deployments: HashMap<String, Vec<(String, String, DeployState, String)>> = HashMap::new();
    for deployment in hub.store.deployments_of_org(org)? {
        for (agent, status) in hub.store.deploy_statuses(&deployment.id)? {
            deployments.entry(agent).or_default().push((deployment.id.clone(), deployment.name.clone(), status.state, status.message));
        }
    }
    let mut out = Vec::new();
    for agent in hub.store.agents_of_org(org)? {
        out.push(AgentFacts {
            connected: hub.registry.is_connected(&agent.id),
            checks: hub.store.check_statuses(&agent.id)?,
            disks: hub.health.disk_of(&agent.id),
            last_drop_ms: hub.health.last_drop(&agent.id),
            deployments: deployments.remove(&agent.id).unwrap_or_default(),
            agent,
        });
    }
    Ok(out)
}

/// Tell an org's webhooks about `event`.
pub fn notify(hub: &Hub, org: &str, event: &str, data: serde_json::Value) {
    crate::webhooks::notify(hub, org, event, data);
}

fn alert_json(alert: &Alert) -> serde_json::Value {
    json!({
        "id": alert.id,
        "rule": alert.rule,
        "severity": alert.severity,
        "summary": alert.summary,
        "status": alert.status.name(),
        "agent": alert.agent,
        "check": alert.check,
        "deployment": alert.deployment,
        "started_at": crate::api::rfc3339(alert.started_at_ms),
        "resolved_at": alert.resolved_at_ms.map(crate::api::rfc3339),
    })
}

/// Order of severities, for escalation.
fn rank(severity: &str) -> u8 {
    match severity {
        "critical" => 2,
        "warning" => 1,
        _ => 0,
    }
}

/// `ledger_conflict`: one critical alert per unresolved conflict in the org's usage ledger
/// (a key re-recorded with another quantity). It holds until an operator resolves the
/// conflict (`POST /api/v1/billing/conflicts/resolve`), not merely until time passes: money
/// may be wrong.
pub fn ledger_conditions(conflicts: &[crate::store::LedgerConflict]) -> Vec<Condition> {
    conflicts
        .iter()
        .filter(|c| c.resolved_at_ms.is_none())
        .map(|c| Condition {
            key: format!("ledger_conflict:{}", c.key),
            rule: "ledger_conflict",
            severity: "critical",
            summary: format!(
                "usage ledger entry {} holds {} but {} was offered ({} time(s)); review it and resolve or correct",
                c.key, c.recorded, c.refused, c.attempts
            ),
            agent: None,
            check: None,
            deployment: None,
        })
        .collect()
}

/// `backup_failed`: the latest scheduled backup failed. Critical (a restore would lose
/// everything since the last good one); it holds until a scheduled backup succeeds.
pub fn backup_conditions(status: &crate::backup::BackupStatus) -> Vec<Condition> {
    if !status.failing() {
        return Vec::new();
    }
    vec![Condition {
        key: "backup_failed".to_string(),
        rule: "backup_failed",
        severity: "critical",
        summary: format!("scheduled backup failed: {}", status.last_error.as_deref().unwrap_or("unknown error")),
        agent: None,
        check: None,
        deployment: None,
    }]
}

/// The hub-wide `ca_expiring` alert fires this long before the current CA expires: a CA
/// rotation needs at least one agent certificate lifetime of overlap.
pub const CA_EXPIRY_WARNING: Duration = Duration::from_secs(180 * 24 * 3600);
/// The `ca_expiring` alert turns critical this long before the current CA expires.
pub const CA_EXPIRY_CRITICAL: Duration = Duration::from_secs(30 * 24 * 3600);

/// `ca_expiring`: the current hub CA expires within [`CA_EXPIRY_WARNING`] (critical within
/// [`CA_EXPIRY_CRITICAL`]). It holds until a new CA is promoted (`gantry-hub rotate-ca`).
pub fn ca_conditions(cas: &[crate::pki::CaInfo], now_ms: i64) -> Vec<Condition> {
    let Some(current) = cas.iter().find(|ca| ca.role == crate::pki::CaRole::Current) else { return Vec::new() };
    let left_secs = current.not_after_unix - now_ms / 1000;
    if left_secs > CA_EXPIRY_WARNING.as_secs() as i64 {
        return Vec::new();
    }
    let staged = cas.iter().any(|ca| ca.role == crate::pki::CaRole::Next);
    let step = if staged { "promote the staged next CA with `gantry-hub rotate-ca --promote`" } else { "renew it with `gantry-hub rotate-ca`" };
    vec![Condition {
        key: "ca_expiring".to_string(),
        rule: "ca_expiring",
        severity: if left_secs <= CA_EXPIRY_CRITICAL.as_secs() as i64 { "critical" } else { "warning" },
        summary: format!("hub CA {} expires at {}; {step}", current.sha256, crate::api::rfc3339(current.not_after_unix.saturating_mul(1000))),
        agent: None,
        check: None,
        deployment: None,
    }]
}

/// Reconcile one org's open alerts with the conditions that hold now.
pub fn evaluate_org(hub: &Hub, org: &str, now_ms: i64) -> Result<(), crate::store::Error> {
    let rules = hub.store.alert_rules(org)?;
    let facts = agent_facts(hub, org)?;
    let mut holding = conditions(&rules, &facts, hub.health.started_ms(), now_ms);
    holding.extend(ledger_conditions(&hub.store.ledger_conflict_records(Some(org))?));
    let silences: Vec<_> = hub.store.silences(org)?.into_iter().filter(|s| s.expires_at_ms > now_ms).collect();
    let keys: HashSet<&str> = holding.iter().map(|c| c.key.as_str()).collect();
    for open in hub.store.open_alerts_of_org(org)? {
        if !keys.contains(open.key.as_str()) {
            if let Some(resolved) = hub.store.resolve_alert(org, &open.key, now_ms)? {
                Metrics::inc(&hub.health.counters.alerts_resolved);
                info!(org, alert = %resolved.id, rule = %resolved.rule, "alert resolved");
                if resolved.notified {
                    notify(hub, org, "alert.resolved", alert_json(&resolved));
                }
                if resolved.rule == "agent_offline" && resolved.notified {
                    notify(hub, org, "agent.online", json!({ "agent": resolved.agent, "alert": resolved.id }));
                }
            }
        }
    }
    let open: HashMap<String, Alert> = hub.store.open_alerts_of_org(org)?.into_iter().map(|a| (a.key.clone(), a)).collect();
    for condition in holding {
        if let Some(existing) = open.get(&condition.key) {
            // Still the same alert; its text and severity follow the condition (a failing
            // check whose remediation budget is spent becomes critical, and that is news).
            if existing.severity != condition.severity || existing.summary != condition.summary {
                let escalated = rank(condition.severity) > rank(&existing.severity);
                hub.store.update_alert(org, &existing.id, |a| {
                    a.severity = condition.severity.to_string();
                    a.summary = condition.summary.clone();
                    a.updated_at_ms = now_ms;
                    if escalated {
                        a.notified = false;
                    }
                })?;
            }
            continue;
        }
        let alert = Alert {
            id: format!("alr_{:013x}{}", now_ms.max(0), crate::auth::random_hex(4)),
            org: org.to_string(),
            rule: condition.rule.to_string(),
            key: condition.key,
            severity: condition.severity.to_string(),
            summary: condition.summary,
            agent: condition.agent,
            check: condition.check,
            deployment: condition.deployment,
            status: AlertStatus::Firing,
            started_at_ms: now_ms,
            updated_at_ms: now_ms,
            acknowledged_at_ms: None,
            acknowledged_by: None,
            resolved_at_ms: None,
            notified: false,
        };
        if let Some(fired) = hub.store.fire_alert(&alert)? {
            Metrics::inc(&hub.health.counters.alerts_fired);
            info!(org, alert = %fired.id, rule = %fired.rule, summary = %fired.summary, "alert firing");
        }
    }
    // Notify what fires and is not (or no longer) silenced.
    for open in hub.store.open_alerts_of_org(org)? {
        if open.notified || silences.iter().any(|s| s.matches(&open, now_ms)) {
            continue;
        }
        if let Some(marked) = hub.store.update_alert(org, &open.id, |a| a.notified = true)? {
            notify(hub, org, "alert.firing", alert_json(&marked));
            if marked.rule == "agent_offline" {
                notify(hub, org, "agent.offline", json!({ "agent": marked.agent, "alert": marked.id, "summary": marked.summary }));
            }
        }
    }
    Ok(())
}

/// One evaluation of every org.
pub fn evaluate(hub: &Hub, now_ms: i64) -> Result<(), crate::store::Error> {
    Metrics::inc(&hub.health.counters.evaluations);
    for org in hub.store.orgs()? {
        if let Err(error) = evaluate_org(hub, &org.id, now_ms) {
            warn!(%error, org = %org.id, "alert evaluation failed");
        }
    }
    if let Err(error) = crate::backup::evaluate_alerts(hub, now_ms) {
        warn!(%error, "hub alert evaluation failed");
    }
    Ok(())
}

/// Evaluate every `alert_interval_ms`, and soon after check reports, until `stop`.
pub async fn run(hub: Arc<Hub>, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_millis(hub.config.alert_interval_ms.max(50));
    loop {
        let woken = tokio::select! {
            _ = tokio::time::sleep(every) => false,
            _ = hub.health.wake.notified() => true,
            _ = stop.wait_for(|s| *s) => return,
        };
        if woken {
            // Let a burst of reports land before looking.
            tokio::time::sleep(MIN_EVALUATION_GAP).await;
        }
        let worker = hub.clone();
        match tokio::task::spawn_blocking(move || evaluate(&worker, crate::wall_ms())).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(%error, "alert evaluation failed"),
            Err(_) => warn!("alert evaluation panicked"),
        }
    }
}

/// Check and alert gauges and counters in Prometheus text.
pub fn render_metrics(hub: &Hub) -> String {
    let mut out = String::new();
    let c = &hub.health.counters;
    for (name, help, value) in [
        ("gantry_check_reports_total", "Check reports received from agents.", &c.check_reports),
        ("gantry_check_remediations_total", "Remediations agents reported taking.", &c.remediations),
        ("gantry_alerts_fired_total", "Alerts that started firing.", &c.alerts_fired),
        ("gantry_alerts_resolved_total", "Alerts that resolved.", &c.alerts_resolved),
        ("gantry_alert_evaluations_total", "Runs of the alert evaluation.", &c.evaluations),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Ordering::Relaxed));
    }
    let mut states = [0u64; 3];
    for (_, status) in hub.store.all_check_statuses().unwrap_or_default() {
        states[match status.state {
            CheckState::Pending => 0,
            CheckState::Passing => 1,
            CheckState::Failing => 2,
        }] += 1;
    }
    let _ = writeln!(out, "# HELP gantry_checks Agents' checks by their latest reported state.\n# TYPE gantry_checks gauge");
    for (state, n) in ["pending", "passing", "failing"].iter().zip(states) {
        let _ = writeln!(out, "gantry_checks{{state=\"{state}\"}} {n}");
    }
    let open = hub.store.open_alerts().unwrap_or_default();
    let _ = writeln!(out, "# HELP gantry_alerts_open Open alerts by status.\n# TYPE gantry_alerts_open gauge");
    for status in [AlertStatus::Firing, AlertStatus::Acknowledged] {
        let _ = writeln!(out, "gantry_alerts_open{{status=\"{}\"}} {}", status.name(), open.iter().filter(|a| a.status == status).count());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn facts(id: &str) -> AgentFacts {
        let agent = Agent {
            id: id.into(),
            org: "acme".into(),
            hostname: "web-1".into(),
            last_connected_ms: Some(NOW - 3_600_000),
            last_disconnected_ms: None,
            cert_not_after_ms: NOW + 30 * 86_400_000,
            ..Agent::default()
        };
        AgentFacts { agent, connected: true, checks: Vec::new(), disks: Vec::new(), last_drop_ms: None, deployments: Vec::new() }
    }

    fn check(name: &str, kind: &str, state: CheckState, crash_loop: bool) -> CheckStatus {
        CheckStatus {
            name: name.into(),
            kind: kind.into(),
            state,
            since_ms: NOW - 1000,
            output: "connection refused".into(),
            latency_ms: 3,
            reported_at_ms: NOW - 1000,
            crash_loop,
            last_remediation: None,
            last_remediation_ms: None,
        }
    }

    fn rules_of(conditions: &[Condition]) -> Vec<(&str, &str)> {
        conditions.iter().map(|c| (c.rule, c.severity)).collect()
    }

    #[test]
    fn a_healthy_agent_holds_no_condition() {
        assert!(conditions(&AlertRules::default(), &[facts("a")], 0, NOW).is_empty());
    }

    #[test]
    fn offline_waits_for_the_threshold_and_the_restart_grace() {
        let rules = AlertRules { offline_after_secs: 60, restart_grace_secs: 120, ..AlertRules::default() };
        let mut f = facts("a");
        f.connected = false;
        f.agent.last_disconnected_ms = Some(NOW - 59_000);
        assert!(conditions(&rules, &[f.clone()], 0, NOW).is_empty(), "before the threshold");
        f.agent.last_disconnected_ms = Some(NOW - 61_000);
        assert_eq!(rules_of(&conditions(&rules, &[f.clone()], 0, NOW)), [("agent_offline", "critical")]);
        assert!(conditions(&rules, &[f.clone()], NOW - 100_000, NOW).is_empty(), "within the grace after a hub start");
        f.agent.last_connected_ms = None;
        assert!(conditions(&rules, &[f.clone()], 0, NOW).is_empty(), "never connected is not offline");
        f.agent.last_connected_ms = Some(NOW - 3_600_000);
        f.agent.revoked_at_ms = Some(NOW - 1);
        assert!(conditions(&rules, &[f], 0, NOW).is_empty(), "revoked agents are not watched");
    }

    #[test]
    fn failing_checks_fire_by_kind_and_crash_loops_are_critical() {
        let mut f = facts("a");
        f.checks = vec![
            check("web", "http", CheckState::Failing, false),
            check("db", "tcp", CheckState::Failing, true),
            check("cert", "tls_expiry", CheckState::Failing, false),
            check("ok", "http", CheckState::Passing, false),
            check("new", "http", CheckState::Pending, false),
        ];
        let found = conditions(&AlertRules::default(), &[f.clone()], 0, NOW);
        assert_eq!(rules_of(&found), [("check_failing", "warning"), ("check_failing", "critical"), ("certificate_expiring", "warning")]);
        assert_eq!(found[0].key, "check_failing:a:web");
        assert_eq!(found[0].check.as_deref(), Some("web"));
        let off = AlertRules { check_failing: false, ..AlertRules::default() };
        assert_eq!(rules_of(&conditions(&off, &[f], 0, NOW)), [("certificate_expiring", "warning")]);
    }

    #[test]
    fn disk_spool_certificate_and_deployment_rules() {
        let mut f = facts("a");
        f.disks = vec![("/".into(), 95.5, NOW - 5_000), ("/data".into(), 50.0, NOW), ("/old".into(), 99.0, NOW - DISK_READING_TTL_MS - 1)];
        f.last_drop_ms = Some(NOW - 1000);
        f.agent.cert_not_after_ms = NOW + 2 * 86_400_000;
        f.deployments = vec![
            ("dep_1".into(), "web".into(), DeployState::Failed, "exit 1".into()),
            ("dep_2".into(), "api".into(), DeployState::RolledBack { to: 3 }, "unhealthy".into()),
            ("dep_3".into(), "ok".into(), DeployState::Healthy, String::new()),
        ];
        let found = conditions(&AlertRules::default(), &[f.clone()], 0, NOW);
        let keys: Vec<&str> = found.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["certificate_expiring:a:agent", "disk_full:a:/", "spool_dropping:a", "deployment_failed:dep_1:a", "deployment_failed:dep_2:a"]);
        assert!(found[1].summary.contains("95.5 %"), "{}", found[1].summary);
        f.last_drop_ms = Some(NOW - 901_000);
        assert!(!conditions(&AlertRules::default(), &[f], 0, NOW).iter().any(|c| c.rule == "spool_dropping"), "quiet long enough");
    }

    #[test]
    fn an_expiring_hub_ca_warns_then_turns_critical_and_names_the_next_step() {
        use crate::pki::{CaInfo, CaRole};
        let day = 86_400;
        let ca = |role, days_left: i64| CaInfo {
            role,
            sha256: "ab".repeat(32),
            name: String::new(),
            not_before_unix: 0,
            not_after_unix: NOW / 1000 + days_left * day,
        };
        assert!(ca_conditions(&[ca(CaRole::Current, 181)], NOW).is_empty());
        let found = ca_conditions(&[ca(CaRole::Current, 179)], NOW);
        assert_eq!((found[0].rule, found[0].severity), ("ca_expiring", "warning"));
        assert!(found[0].summary.contains("gantry-hub rotate-ca`"), "{}", found[0].summary);
        let found = ca_conditions(&[ca(CaRole::Current, 10), ca(CaRole::Next, 3650)], NOW);
        assert_eq!(found[0].severity, "critical");
        assert!(found[0].summary.contains("--promote"), "{}", found[0].summary);
    }
}
