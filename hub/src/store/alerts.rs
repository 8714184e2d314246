//! Alerts, silences and per-org alert rules.
//!
//! Keys: alerts `org \0 id`; the open (firing or acknowledged) alert of each condition
//! `org \0 dedup key` → alert id, so a condition that stays true is one alert, not many;
//! silences `org \0 id`; rules `org`. Firing and resolving write the alert and its open
//! marker in one transaction.

use super::{decode, encode, Error, Store};
use serde::{Deserialize, Serialize};
use sled::transaction::TransactionError;
use sled::Transactional;

/// The trees of this module.
#[derive(Debug, Clone)]
pub(super) struct Trees {
    alerts: sled::Tree,
    open: sled::Tree,
    silences: sled::Tree,
    rules: sled::Tree,
}

impl Trees {
    pub fn open(db: &sled::Db) -> Result<Trees, Error> {
        Ok(Trees {
            alerts: db.open_tree("alerts")?,
            open: db.open_tree("alerts_open")?,
            silences: db.open_tree("silences")?,
            rules: db.open_tree("alert_rules")?,
        })
    }
}

/// Where an alert is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertStatus {
    Firing,
    /// Someone said they are on it; it still resolves by itself when the condition clears.
    Acknowledged,
    Resolved,
}

impl AlertStatus {
    pub fn name(self) -> &'static str {
        match self {
            AlertStatus::Firing => "firing",
            AlertStatus::Acknowledged => "acknowledged",
            AlertStatus::Resolved => "resolved",
        }
    }
}

/// One alert: a condition that became true, until it is false again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub id: String,
    pub org: String,
    /// Rule name, e.g. `agent_offline`, `check_failing`.
    pub rule: String,
    /// Deduplication key: rule plus subject, e.g. `check_failing:agt_1:web`.
    pub key: String,
    pub severity: String,
    pub summary: String,
    pub agent: Option<String>,
    pub check: Option<String>,
    pub deployment: Option<String>,
    pub status: AlertStatus,
    pub started_at_ms: i64,
    pub updated_at_ms: i64,
    pub acknowledged_at_ms: Option<i64>,
    pub acknowledged_by: Option<String>,
    pub resolved_at_ms: Option<i64>,
    /// Whether operators were notified that it fires (not while a silence matched).
    pub notified: bool,
}

/// Alerts matching a silence fire and resolve as usual but notify no one until it expires.
/// Each given matcher must equal the alert's field; at least one is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Silence {
    pub id: String,
    pub org: String,
    pub rule: Option<String>,
    pub agent: Option<String>,
    pub check: Option<String>,
    pub deployment: Option<String>,
    pub reason: String,
    pub created_by: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

impl Silence {
    /// Whether this silence covers `alert` at `now_ms`.
    pub fn matches(&self, alert: &Alert, now_ms: i64) -> bool {
        fn eq(want: &Option<String>, have: &Option<String>) -> bool {
            want.as_ref().is_none_or(|w| have.as_ref() == Some(w))
        }
        now_ms < self.expires_at_ms
            && self.rule.as_ref().is_none_or(|r| *r == alert.rule)
            && eq(&self.agent, &alert.agent)
            && eq(&self.check, &alert.check)
            && eq(&self.deployment, &alert.deployment)
    }
}

/// An org's alert rules: thresholds, and which rules are on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AlertRules {
    /// An agent disconnected this long fires `agent_offline` (0 turns the rule off).
    pub offline_after_secs: u64,
    /// After a hub restart, agents get this long to reconnect before any of them can fire
    /// `agent_offline`, so a hub restart never floods anyone.
    pub restart_grace_secs: u64,
    /// A mount fuller than this fires `disk_full` (0 turns the rule off).
    pub disk_used_percent: f64,
    /// An agent certificate expiring within this many days fires `certificate_expiring`,
    /// as does a failing `tls_expiry` check (0 turns the agent-certificate part off).
    pub certificate_days: u32,
    /// A failing check fires `check_failing`.
    pub check_failing: bool,
    /// An agent dropping records from a full spool fires `spool_dropping`; it resolves
    /// after `spool_quiet_secs` without drops.
    pub spool_dropping: bool,
    pub spool_quiet_secs: u64,
    /// A deployment failed or rolled back on an agent fires `deployment_failed`.
    pub deployment_failed: bool,
}

impl Default for AlertRules {
    fn default() -> Self {
        AlertRules {
            offline_after_secs: 300,
            restart_grace_secs: 120,
            disk_used_percent: 90.0,
            certificate_days: 14,
            check_failing: true,
            spool_dropping: true,
            spool_quiet_secs: 900,
            deployment_failed: true,
        }
    }
}

impl AlertRules {
    /// Every problem with these rules, each naming its field.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        if self.offline_after_secs > 30 * 86_400 {
            errors.push("offline_after_secs must be at most 2592000 (30 days)".to_string());
        }
        if self.restart_grace_secs > 86_400 {
            errors.push("restart_grace_secs must be at most 86400".to_string());
        }
        if !(0.0..=100.0).contains(&self.disk_used_percent) {
            errors.push("disk_used_percent must be 0-100".to_string());
        }
        if self.certificate_days > 3650 {
            errors.push("certificate_days must be at most 3650".to_string());
        }
        if !(1..=30 * 86_400).contains(&self.spool_quiet_secs) {
            errors.push("spool_quiet_secs must be 1-2592000".to_string());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

fn key(first: &str, second: &str) -> Vec<u8> {
    let mut key = first.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(second.as_bytes());
    key
}

impl Store {
    /// Fire `alert` unless an alert with its key is already open; returns the new alert,
    /// or `None` when one was open.
    pub fn fire_alert(&self, alert: &Alert) -> Result<Option<Alert>, Error> {
        let _writing = self.writing();
        let trees = &self.alerts;
        let result = (&trees.alerts, &trees.open).transaction(|(alerts, open)| {
            let marker = key(&alert.org, &alert.key);
            if open.get(&marker)?.is_some() {
                return Ok(None);
            }
            open.insert(marker, alert.id.as_bytes())?;
            alerts.insert(key(&alert.org, &alert.id), encode(alert))?;
            Ok(Some(alert.clone()))
        });
        result.map_err(|e: TransactionError<Error>| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => Error::Sled(e),
        })
    }

    /// Resolve the open alert with `dedup_key`, if any; returns it resolved.
    pub fn resolve_alert(&self, org: &str, dedup_key: &str, now_ms: i64) -> Result<Option<Alert>, Error> {
        let _writing = self.writing();
        let trees = &self.alerts;
        let result = (&trees.alerts, &trees.open).transaction(|(alerts, open)| {
            let marker = key(org, dedup_key);
            let Some(id) = open.remove(marker)? else { return Ok(None) };
            let alert_key = key(org, &String::from_utf8_lossy(&id));
            let Some(raw) = alerts.get(&alert_key)? else { return Ok(None) };
            let mut alert: Alert = decode("alert", &raw).map_err(sled::transaction::ConflictableTransactionError::Abort)?;
            alert.status = AlertStatus::Resolved;
            alert.resolved_at_ms = Some(now_ms);
            alert.updated_at_ms = now_ms;
            alerts.insert(alert_key, encode(&alert))?;
            Ok(Some(alert))
        });
        result.map_err(|e: TransactionError<Error>| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => Error::Sled(e),
        })
    }

    /// Change an alert in place (acknowledge, mark notified). `None` if it does not exist.
    pub fn update_alert(&self, org: &str, id: &str, change: impl Fn(&mut Alert)) -> Result<Option<Alert>, Error> {
        let _writing = self.writing();
        let k = key(org, id);
        let mut out = None;
        self.alerts.alerts.fetch_and_update(&k, |old| {
            let mut alert: Alert = decode("alert", old?).ok()?;
            change(&mut alert);
            out = Some(alert.clone());
            Some(encode(&alert))
        })?;
        Ok(out)
    }

    pub fn alert(&self, org: &str, id: &str) -> Result<Option<Alert>, Error> {
        self.alerts.alerts.get(key(org, id))?.map(|v| decode("alert", &v)).transpose()
    }

    /// The org's alerts, newest first (ids sort by time).
    pub fn alerts_of_org(&self, org: &str) -> Result<Vec<Alert>, Error> {
        let mut out: Vec<Alert> = self.alerts.alerts.scan_prefix(key(org, "")).values().map(|v| decode("alert", &v?)).collect::<Result<_, _>>()?;
        out.sort_by(|a, b| b.started_at_ms.cmp(&a.started_at_ms).then_with(|| b.id.cmp(&a.id)));
        Ok(out)
    }

    /// The org's open (firing or acknowledged) alerts.
    pub fn open_alerts_of_org(&self, org: &str) -> Result<Vec<Alert>, Error> {
        let mut out = Vec::new();
        for id in self.alerts.open.scan_prefix(key(org, "")).values() {
            if let Some(alert) = self.alert(org, &String::from_utf8_lossy(&id?))? {
                out.push(alert);
            }
        }
        Ok(out)
    }

    /// Every open alert of every org.
    pub fn open_alerts(&self) -> Result<Vec<Alert>, Error> {
        let mut out = Vec::new();
        for entry in self.alerts.open.iter() {
            let (k, id) = entry?;
            let org = k.split(|b| *b == 0).next().map(|o| String::from_utf8_lossy(o).into_owned()).unwrap_or_default();
            if let Some(alert) = self.alert(&org, &String::from_utf8_lossy(&id))? {
                out.push(alert);
            }
        }
        Ok(out)
    }

    pub fn put_silence(&self, silence: &Silence) -> Result<(), Error> {
        let _writing = self.writing();
        self.alerts.silences.insert(key(&silence.org, &silence.id), encode(silence))?;
        Ok(())
    }

    /// Delete a silence; false if there was none.
    pub fn delete_silence(&self, org: &str, id: &str) -> Result<bool, Error> {
        let _writing = self.writing();
        Ok(self.alerts.silences.remove(key(org, id))?.is_some())
    }

    /// The org's silences, expired ones included.
    pub fn silences(&self, org: &str) -> Result<Vec<Silence>, Error> {
        self.alerts.silences.scan_prefix(key(org, "")).values().map(|v| decode("silence", &v?)).collect()
    }

    /// The org's alert rules (the defaults until changed).
    pub fn alert_rules(&self, org: &str) -> Result<AlertRules, Error> {
        Ok(self.alerts.rules.get(org.as_bytes())?.map(|v| decode("alert rules", &v)).transpose()?.unwrap_or_default())
    }

    pub fn set_alert_rules(&self, org: &str, rules: &AlertRules) -> Result<(), Error> {
        let _writing = self.writing();
        self.alerts.rules.insert(org.as_bytes(), encode(rules))?;
        Ok(())
    }
}
