//! Customer data requests: exporting everything the hub holds for one org, and deleting
//! an org.
//!
//! The export is a tar archive (written here by hand: plain ustar, regular files only) of
//! one JSON-lines file per kind of record under `<org>/`, plus `manifest.json` naming every
//! file with its line count. Secrets never leave: secret and registry values, webhook
//! signing secrets, hashed key and token secrets are left out; only names and metadata go.
//!
//! Deletion revokes and disconnects the org's agents, cancels its subscription, then has
//! the store erase the org ([`crate::store::Store::erase_org`]): telemetry (payloads
//! overwritten in the shared segment files), deployments, checks, alerts, webhooks,
//! secrets, settings, branding, members, invitations, API keys, enrollment tokens, and the
//! accounts of people who belonged to no other org. Kept for accounting, unchanged: the
//! usage ledger, closed invoices, the subscription (canceled) and the Stripe records, which
//! carry org and agent ids and quantities but no personal data; and the audit log, whose
//! entries of the org keep what was done and when but lose their personal fields (see
//! `store/audit.rs` and README, "Customer data: export and deletion").
//!
//! The confirmation writes the org's tombstone before anything is removed (see
//! `store/org_data.rs`); a deletion the hub did not finish (it was killed, or the store
//! failed) is finished by [`resume_deletions`] when the hub starts, before it serves.
//!
//! This module must not know HTTP: `api/org_data.rs` maps its results to responses.

use crate::store::{self, RecordCursor, RecordFilter};
use crate::Hub;
use gantry_shared::message::StreamClass;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Format name written into every export's manifest.
pub const EXPORT_FORMAT: &str = "gantry-org-export/1";

/// Most telemetry records (log lines, events, check reports) one export holds; a larger
/// range is refused, to be exported in narrower `from`/`to` slices.
pub const MAX_EXPORT_RECORDS: usize = 2_000_000;

/// How long a deletion confirmation code stays valid.
pub const CONFIRMATION_TTL: Duration = Duration::from_secs(10 * 60);

/// How long deletion waits for the sessions of the revoked agents to end.
const DISCONNECT_WAIT: Duration = Duration::from_secs(10);

/// Test hook: when set to a number of milliseconds, every org erasure sleeps that long
/// after its first step (the org record and its enrollment tokens removed, durably), so an
/// end-to-end test can kill the hub in the middle of a deletion. Leave it unset in
/// production; it has no other effect.
pub const TEST_PAUSE_ENV: &str = "GANTRY_TEST_ORG_DELETION_PAUSE_MS";

/// What an export covers.
#[derive(Debug, Clone, Default)]
pub struct ExportRange {
    /// Telemetry from (inclusive, Unix ms); everything older when `None`.
    pub from_ms: Option<i64>,
    /// Telemetry until (exclusive, Unix ms); up to now when `None`.
    pub to_ms: Option<i64>,
    /// Include metric samples (can be large).
    pub metrics: bool,
}

/// Why an export was refused.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the range holds more than {MAX_EXPORT_RECORDS} telemetry records; export it in narrower from/to slices")]
    TooLarge,
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// One file of the archive: JSON lines, counted.
#[derive(Debug, Default)]
struct Lines {
    text: Vec<u8>,
    count: u64,
}

impl Lines {
    fn push(&mut self, value: &Value) {
        self.text.extend_from_slice(value.to_string().as_bytes());
        self.text.push(b'\n');
        self.count += 1;
    }

    fn of(values: impl IntoIterator<Item = Value>) -> Lines {
        let mut lines = Lines::default();
        for value in values {
            lines.push(&value);
        }
        lines
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    // Plain records with string map keys: serialising cannot fail.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn time(ms: i64) -> String {
    crate::api::rfc3339(ms)
}

/// Every telemetry record of `class` of the org's agents in the range, oldest first per agent.
fn telemetry(hub: &Hub, agents: &[store::Agent], class: StreamClass, range: &ExportRange, budget: &mut usize) -> Result<Lines, ExportError> {
    const PAGE: usize = 5_000;
    let mut lines = Lines::default();
    let filter = RecordFilter { from_ms: range.from_ms, to_ms: range.to_ms, ..RecordFilter::default() };
    for agent in agents {
        let mut cursor: Option<RecordCursor> = None;
        loop {
            let page = hub.store.records(&agent.id, class, &filter, cursor, PAGE)?;
            *budget = budget.checked_sub(page.len()).ok_or(ExportError::TooLarge)?;
            for record in &page {
                lines.push(&crate::api::record_json(Some(&agent.id), record));
            }
            match page.last() {
                Some(last) if page.len() == PAGE => cursor = Some(RecordCursor { ts_ms: last.ts_unix_ms, seq: last.seq }),
                _ => break,
            }
        }
    }
    Ok(lines)
}

/// Every metric sample of the org's agents in the range, one line per agent, metric and
/// label set.
fn metrics(hub: &Hub, agents: &[store::Agent], range: &ExportRange, now_ms: i64) -> Result<Lines, ExportError> {
    let from = range.from_ms.unwrap_or(0);
    let to = range.to_ms.unwrap_or(now_ms + 86_400_000);
    let mut lines = Lines::default();
    for agent in agents {
        for name in hub.store.metric_names(&agent.id)? {
            // A step of 1 ms keeps every sample as it was stored.
            for series in hub.store.metric_series(&agent.id, &name, from, to, 1)? {
                let labels: BTreeMap<_, _> = series.labels.into_iter().collect();
                lines.push(&json!({ "agent": agent.id, "name": name, "labels": labels, "points": series.points }));
            }
        }
    }
    Ok(lines)
}

/// Build the export archive of `org` (which must exist). Runs on a blocking thread.
pub fn export(hub: &Hub, org: &store::Org, range: &ExportRange, now_ms: i64) -> Result<Vec<u8>, ExportError> {
    let store = &hub.store;
    let id = org.id.as_str();
    let agents = store.agents_of_org(id)?;
    let mut files: Vec<(&str, Lines)> = Vec::new();

    let subscription = store.subscription(id)?;
    files.push((
        "org.jsonl",
        Lines::of([json!({
            "id": org.id,
            "name": org.name,
            "agent_limit": org.agent_limit,
            "agent_count": org.agent_count,
            "suspended": org.suspended,
            "created_at": time(org.created_at_ms),
            "retention_days": org.retention_days,
            "subscription": subscription.as_ref().map(to_json),
            "alert_rules": to_json(&store.alert_rules(id)?),
            "settings": to_json(&store.org_settings(id)?),
        })]),
    ));
    let brand = store.branding(id)?.map(|brand| {
        let mut line = to_json(&brand);
        line["logo_base64"] = json!(store.branding_logo(id).ok().flatten().map(|bytes| data_encoding::BASE64.encode(&bytes)));
        line["updated_at"] = json!(time(brand.updated_at_ms));
        line
    });
    files.push(("branding.jsonl", Lines::of(brand)));
    files.push(("agents.jsonl", Lines::of(agents.iter().map(|a| to_json(&crate::api::agent_view(hub, a))))));
    files.push((
        "enrollment_tokens.jsonl",
        Lines::of(store.tokens_of_org(id)?.into_iter().map(|t| {
            json!({
                "id": t.id, "labels": t.labels.into_iter().collect::<BTreeMap<_, _>>(), "expires_at": time(t.expires_at_ms),
                "uses_total": t.uses_total, "uses_left": t.uses_left, "revoked": t.revoked,
                "created_by": t.created_by, "created_at": time(t.created_at_ms),
            })
        })),
    ));
    let mut deployments = Lines::default();
    for deployment in store.deployments_of_org_all(id)? {
        let statuses: BTreeMap<String, Value> = store.deploy_statuses(&deployment.id)?.into_iter().map(|(agent, s)| (agent, to_json(&s))).collect();
        let revisions: Vec<Value> = store.revisions(&deployment.id)?.iter().map(to_json).collect();
        let mut line = to_json(&deployment);
        line["revisions"] = json!(revisions);
        line["statuses"] = json!(statuses);
        deployments.push(&line);
    }
    files.push(("deployments.jsonl", deployments));

    let mut budget = MAX_EXPORT_RECORDS;
    files.push(("logs.jsonl", telemetry(hub, &agents, StreamClass::Logs, range, &mut budget)?));
    files.push(("events.jsonl", telemetry(hub, &agents, StreamClass::Events, range, &mut budget)?));
    files.push(("check_reports.jsonl", telemetry(hub, &agents, StreamClass::Health, range, &mut budget)?));
    if range.metrics {
        files.push(("metrics.jsonl", metrics(hub, &agents, range, now_ms)?));
    }

    files.push(("checks.jsonl", Lines::of(store.check_configs(id)?.iter().map(to_json))));
    let mut states = Lines::default();
    for agent in &agents {
        for status in store.check_statuses(&agent.id)? {
            let mut line = to_json(&status);
            line["agent"] = json!(agent.id);
            states.push(&line);
        }
    }
    files.push(("check_states.jsonl", states));
    files.push(("alerts.jsonl", Lines::of(store.alerts_of_org(id)?.iter().map(to_json))));
    files.push(("silences.jsonl", Lines::of(store.silences(id)?.iter().map(to_json))));

    let webhooks = store.webhooks_of(id)?;
    let mut deliveries = Lines::default();
    for webhook in &webhooks {
        let mut before: Option<store::WebhookDelivery> = None;
        loop {
            let page = store.webhook_deliveries(id, &webhook.id, before.as_ref(), 1000)?;
            for delivery in &page {
                deliveries.push(&to_json(delivery));
            }
            if page.len() < 1000 {
                break;
            }
            before = page.last().cloned();
        }
    }
    files.push((
        "webhooks.jsonl",
        Lines::of(webhooks.iter().map(|w| {
            json!({
                "id": w.id, "url": w.url, "events": w.events, "description": w.description, "enabled": w.enabled,
                "created_at": time(w.created_at_ms), "updated_at": time(w.updated_at_ms), "updated_by": w.updated_by,
            })
        })),
    ));
    files.push(("webhook_deliveries.jsonl", deliveries));
    files.push(("webhook_events.jsonl", Lines::of(store.webhook_events_of_org(id)?.iter().map(to_json))));
    files.push((
        "secrets.jsonl",
        Lines::of(
            store
                .secrets_of(id)?
                .into_iter()
                .map(|s| json!({ "name": s.name, "created_at": time(s.created_at_ms), "updated_at": time(s.updated_at_ms), "updated_by": s.updated_by })),
        ),
    ));
    files.push((
        "registry_logins.jsonl",
        Lines::of(store.registries_of(id)?.into_iter().map(|r| {
            json!({ "server": r.server, "username": r.username, "created_at": time(r.created_at_ms), "updated_at": time(r.updated_at_ms), "updated_by": r.updated_by })
        })),
    ));

    files.push((
        "members.jsonl",
        Lines::of(
            store
                .members_of(id)?
                .into_iter()
                .map(|m| json!({ "user_id": m.user_id, "email": m.email, "role": m.role, "added_by": m.added_by, "added_at": time(m.added_at_ms) })),
        ),
    ));
    files.push((
        "invitations.jsonl",
        Lines::of(store.invitations_of(id)?.into_iter().map(|i| {
            json!({
                "id": i.id, "email": i.email, "role": i.role, "created_by": i.created_by, "created_at": time(i.created_at_ms),
                "expires_at": time(i.expires_at_ms), "accepted_at": i.accepted_at_ms.map(time), "accepted_by": i.accepted_by, "revoked": i.revoked,
            })
        })),
    ));
    files.push((
        "api_keys.jsonl",
        Lines::of(store.api_keys_of_org(id)?.into_iter().map(|k| {
            json!({
                "id": k.id, "name": k.name, "scopes": k.scopes, "created_by": k.created_by, "created_at": time(k.created_at_ms),
                "revoked": k.revoked, "expires_at": k.expires_at_ms.map(time), "last_used": k.last_used_ms.map(time),
            })
        })),
    ));

    let mut ledger = Lines::default();
    let mut after: Option<store::LedgerEntry> = None;
    loop {
        let page = store.ledger_entries(Some(id), i64::MIN, i64::MAX, after.as_ref(), 1000)?;
        for entry in &page {
            ledger.push(&to_json(entry));
        }
        if page.len() < 1000 {
            break;
        }
        after = page.last().cloned();
    }
    files.push(("ledger.jsonl", ledger));
    files.push(("invoices.jsonl", Lines::of(store.closed_invoices(id)?.iter().map(to_json))));
    files.push(("audit.jsonl", audit(hub, id)?));

    let counts: BTreeMap<&str, u64> = files.iter().map(|(name, lines)| (*name, lines.count)).collect();
    let manifest = json!({
        "format": EXPORT_FORMAT,
        "org": id,
        "generated_at": time(now_ms),
        "from": range.from_ms.map(time),
        "to": range.to_ms.map(time),
        "metrics": range.metrics,
        "files": counts,
    });
    let mut archive = Tar::default();
    archive.file(&format!("{id}/manifest.json"), format!("{manifest:#}\n").as_bytes(), now_ms);
    for (name, lines) in &files {
        archive.file(&format!("{id}/{name}"), &lines.text, now_ms);
    }
    Ok(archive.finish())
}

/// The org's audit entries, oldest first.
fn audit(hub: &Hub, org: &str) -> Result<Lines, ExportError> {
    let mut entries = Vec::new();
    let mut filter = store::AuditFilter { org: Some(org.to_string()), ..store::AuditFilter::default() };
    loop {
        let page = hub.store.audit_entries(&filter, 1000)?;
        entries.extend(page.entries);
        match page.next_cursor {
            Some(cursor) => filter.before_seq = Some(cursor),
            None => break,
        }
    }
    entries.sort_by_key(|e| e.seq);
    Ok(Lines::of(entries.iter().map(|e| {
        let mut line = to_json(e);
        line["at"] = json!(time(e.at_ms));
        // As the audit API shows entries: without the salt of the personal digests.
        if let Some(fields) = line.as_object_mut() {
            fields.remove("salt");
        }
        line
    })))
}

/// A ustar archive being written in memory.
#[derive(Debug, Default)]
struct Tar {
    bytes: Vec<u8>,
}

impl Tar {
    /// Append a regular file (mode 0644). `name` must fit ustar's 100 bytes, which every
    /// name used here does (an org id is at most 64 characters).
    fn file(&mut self, name: &str, data: &[u8], mtime_ms: i64) {
        let mut header = [0u8; 512];
        let name = name.as_bytes();
        header[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
        let octal = |field: &mut [u8], value: u64| {
            let text = format!("{value:0width$o}", width = field.len() - 1);
            field[..text.len()].copy_from_slice(text.as_bytes());
        };
        octal(&mut header[100..108], 0o644);
        octal(&mut header[108..116], 0);
        octal(&mut header[116..124], 0);
        octal(&mut header[124..136], data.len() as u64);
        octal(&mut header[136..148], (mtime_ms.max(0) / 1000) as u64);
        header[156] = b'0';
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        header[265..271].copy_from_slice(b"gantry");
        header[297..303].copy_from_slice(b"gantry");
        // The checksum is taken with its own field as spaces.
        header[148..156].copy_from_slice(b"        ");
        let sum: u64 = header.iter().map(|b| u64::from(*b)).sum();
        let text = format!("{sum:06o}\0 ");
        header[148..156].copy_from_slice(text.as_bytes());
        self.bytes.extend_from_slice(&header);
        self.bytes.extend_from_slice(data);
        let padding = (512 - data.len() % 512) % 512;
        self.bytes.extend(std::iter::repeat_n(0u8, padding));
    }

    /// The archive with its end marker (two zero blocks).
    fn finish(mut self) -> Vec<u8> {
        self.bytes.extend(std::iter::repeat_n(0u8, 1024));
        self.bytes
    }
}

/// A confirmation code, as returned once by the deletion request.
#[derive(Debug, Clone)]
pub struct Confirmation {
    pub code: String,
    pub expires_at_ms: i64,
}

/// Record a deletion request for `org` and return its confirmation code.
pub fn request_deletion(hub: &Hub, org: &str, by: &str, now_ms: i64) -> Result<Confirmation, store::Error> {
    let code = format!("delete-{org}-{}", crate::auth::random_hex(8));
    let expires_at_ms = now_ms + CONFIRMATION_TTL.as_millis() as i64;
    hub.store.put_deletion_request(&store::DeletionRequest {
        org: org.to_string(),
        code_sha256: crate::auth::sha256_hex(&code),
        requested_by: by.to_string(),
        requested_at_ms: now_ms,
        expires_at_ms,
    })?;
    Ok(Confirmation { code, expires_at_ms })
}

/// Delete `org` (its confirmation already checked and its tombstone written): revoke and
/// disconnect its agents, cancel its subscription, erase its records. Returns the records
/// removed, by kind. Safe to run again on an org whose deletion was interrupted.
pub async fn delete(hub: &Arc<Hub>, org: &str, by: &str) -> Result<BTreeMap<String, u64>, store::Error> {
    let now = crate::wall_ms();
    if hub.store.subscription(org)?.is_some() {
        crate::billing::plans::force_status(hub, org, crate::billing::plans::Status::Canceled)?;
    }
    let agents = hub.store.agents_of_org(org)?;
    for agent in &agents {
        hub.store.revoke_agent(&agent.id, now)?;
        hub.registry.close(&agent.id, gantry_shared::message::ErrorCode::Revoked, "the agent's org was deleted");
    }
    // Wait for the sessions to end, so no batch of theirs is stored after the erasure.
    let deadline = tokio::time::Instant::now() + DISCONNECT_WAIT;
    while agents.iter().any(|a| hub.registry.is_connected(&a.id)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    {
        let deployments = hub.store.deployments_of_org_all(org)?;
        let mut rollouts = hub.rollouts.lock().unwrap_or_else(|p| p.into_inner());
        for deployment in deployments {
            rollouts.remove(&deployment.id);
        }
    }
    let pause = std::env::var(TEST_PAUSE_ENV).ok().and_then(|v| v.parse::<u64>().ok()).map(Duration::from_millis);
    let worker = hub.clone();
    let (org_id, actor) = (org.to_string(), by.to_string());
    let removed = tokio::task::spawn_blocking(move || {
        let mut first = true;
        let mut after_step = |step: &str| {
            if let Some(pause) = pause.filter(|_| std::mem::take(&mut first)) {
                tracing::warn!(org = %org_id, step, ?pause, "org deletion paused by {TEST_PAUSE_ENV}");
                std::thread::sleep(pause);
            }
        };
        worker.store.erase_org(&org_id, &actor, crate::wall_ms(), &mut after_step)?;
        // A batch that was already being stored when its session closed, or an alert
        // evaluation or webhook event that read the org before it went, can land after the
        // first pass; a second pass removes what landed meanwhile.
        for agent in &agents {
            worker.store.erase_agent_telemetry(&agent.id)?;
        }
        worker.store.erase_org(&org_id, &actor, crate::wall_ms(), &mut |_| {})
    })
    .await
    .map_err(|e| store::Error::Corrupt(format!("org deletion task failed: {e}")))??;
    tracing::info!(org = %org, by = %by, ?removed, "org deleted");
    Ok(removed)
}

/// Finish every deletion that was confirmed but not completed (the hub stopped or the
/// store failed during it). Runs at start, before agents or requests are served; a
/// deletion that fails again is logged and left for the next start, and the others go on.
pub async fn resume_deletions(hub: &Arc<Hub>) -> Result<usize, store::Error> {
    let pending = hub.store.unfinished_org_deletions()?;
    let mut finished = 0;
    for tombstone in pending {
        tracing::warn!(org = %tombstone.org, deleted_by = %tombstone.deleted_by, "finishing an org deletion that was interrupted");
        match delete(hub, &tombstone.org, &tombstone.deleted_by).await {
            Ok(removed) => {
                tracing::info!(org = %tombstone.org, ?removed, "interrupted org deletion finished");
                let target = [("org".to_string(), tombstone.org.clone()), ("deleted_by".to_string(), tombstone.deleted_by.clone())].into();
                crate::audit::record(
                    hub,
                    store::NewAuditEntry {
                        at_ms: crate::wall_ms(),
                        actor: "hub".into(),
                        actor_kind: "system".into(),
                        org: Some(tombstone.org.clone()),
                        action: "org.deletion.resumed".into(),
                        target,
                        outcome: "finished".into(),
                        request_id: None,
                        client_ip: None,
                    },
                );
                finished += 1;
            }
            Err(error) => tracing::error!(org = %tombstone.org, %error, "could not finish the org deletion; the next start tries again"),
        }
    }
    Ok(finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_headers_are_valid_ustar() {
        let mut tar = Tar::default();
        tar.file("acme/logs.jsonl", b"{\"a\":1}\n", 1_700_000_000_000);
        let bytes = tar.finish();
        assert_eq!(bytes.len(), 512 + 512 + 1024);
        assert_eq!(&bytes[..15], b"acme/logs.jsonl");
        assert_eq!(&bytes[124..135], b"00000000010");
        let mut header = bytes[..512].to_vec();
        let stored = u64::from_str_radix(std::str::from_utf8(&header[148..154]).unwrap(), 8).unwrap();
        header[148..156].copy_from_slice(b"        ");
        assert_eq!(stored, header.iter().map(|b| u64::from(*b)).sum::<u64>());
        assert_eq!(&bytes[512..520], b"{\"a\":1}\n");
        assert!(bytes[1024..].iter().all(|b| *b == 0));
    }
}
