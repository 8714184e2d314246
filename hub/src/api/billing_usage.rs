//! Usage ledger over HTTP: exports and corrections.
//!
//! - `GET /api/v1/billing/usage?from=&to=&org=&format=csv|json|cloudevents`: the ledger
//!   entries whose hour starts in `[from, to)`. Operators (billing permission) may export
//!   every org or one; an org's owners and billing members only their own org, with `org=`.
//!   CSV has a header row and RFC 4180 quoting; `cloudevents` is one CloudEvents 1.0 JSON
//!   object per line, whose `id` is derived from the entry's deterministic ledger key (so a
//!   consumer can deduplicate across exports).
//! - `POST /api/v1/billing/corrections` (operators): a compensating entry with the caller
//!   as actor.
//!
//! Read and append only: nothing here changes or deletes a ledger entry.

use super::{authorize, parse_time, require_operator, rfc3339, ApiError, ApiJson, ApiQuery, ApiResult};
use crate::access::Perm;
use crate::auth::Principal;
use crate::billing::{hour_of, Meter};
use crate::store::{EntryKind, LedgerEntry, LedgerRecorded};
use crate::Hub;
use axum::extract::State;
use axum::http::header::{self, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Most entries one export returns; a larger range is refused (ask for shorter ranges).
pub const MAX_EXPORT_ENTRIES: usize = 500_000;
/// Entries read from the store per page while exporting.
const EXPORT_PAGE: usize = 10_000;

/// Query string of the usage export.
#[derive(Debug, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// RFC 3339 or Unix ms, inclusive: entries whose hour starts at or after it. Default:
    /// the start of the current UTC month.
    pub from: Option<String>,
    /// RFC 3339 or Unix ms, exclusive. Default: the end of the current hour.
    pub to: Option<String>,
    /// One org; required unless the caller is a platform operator.
    pub org: Option<String>,
    /// `json` (default), `csv` or `cloudevents` (JSON lines).
    pub format: Option<String>,
}

/// One exported ledger entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UsageRow {
    /// Deterministic id from the ledger key (the CloudEvents `id`).
    pub id: String,
    pub seq: u64,
    pub org: String,
    pub meter: Meter,
    /// Start of the UTC hour, RFC 3339.
    pub hour_start: String,
    pub hour_ms: i64,
    pub source: String,
    pub quantity: i64,
    /// `usage` or `correction`.
    pub kind: String,
    pub reason: Option<String>,
    pub actor: Option<String>,
    pub corrects_period_start_ms: Option<i64>,
    pub recorded_at: String,
}

/// The JSON export.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UsageExport {
    pub from_ms: i64,
    pub to_ms: i64,
    pub org: Option<String>,
    pub entries: Vec<UsageRow>,
    /// Per org, per meter: counters summed, gauges the largest hour (as `ledger_usage`).
    pub totals: BTreeMap<String, BTreeMap<Meter, i64>>,
}

/// A correction to add.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CorrectionRequest {
    pub org: String,
    /// A meter name, e.g. `log_bytes`.
    pub meter: String,
    /// The hour the correction belongs to (RFC 3339 or Unix ms; rounded down to the hour).
    /// Without it, the current hour.
    pub hour: Option<String>,
    /// Start of the (closed) billing period the correction is about (RFC 3339 or Unix
    /// ms); it is then billed in the current period.
    pub period_start: Option<String>,
    /// Units to add; negative to take away. Not zero.
    pub quantity: i64,
    pub reason: String,
    /// Idempotency key: the same id again with the same quantity adds nothing. Letters,
    /// digits, `-`, `_`, `.`, at most 64. Random when absent.
    pub id: Option<String>,
}

/// The answer to a correction.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct CorrectionResponse {
    pub entry: UsageRow,
    /// The same correction was already recorded; nothing was added.
    pub duplicate: bool,
}

/// The CloudEvents / export id of an entry: from its ledger key, never from its position.
pub fn entry_id(entry: &LedgerEntry) -> String {
    let digest = Sha256::digest(entry.key_text().as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// An entry as exported.
pub fn row(entry: &LedgerEntry) -> UsageRow {
    let (kind, reason, actor, corrects) = match &entry.kind {
        EntryKind::Usage => ("usage", None, None, None),
        EntryKind::Correction { reason, actor, corrects_period_start_ms } => {
            ("correction", Some(reason.clone()), Some(actor.clone()), *corrects_period_start_ms)
        }
    };
    UsageRow {
        id: entry_id(entry),
        seq: entry.seq,
        org: entry.org.clone(),
        meter: entry.meter,
        hour_start: rfc3339(entry.hour_ms),
        hour_ms: entry.hour_ms,
        source: entry.source.clone(),
        quantity: entry.quantity,
        kind: kind.to_string(),
        reason,
        actor,
        corrects_period_start_ms: corrects,
        recorded_at: rfc3339(entry.recorded_at_ms),
    }
}

/// The CSV header row.
pub const CSV_HEADER: &str = "id,seq,org,meter,hour_start,hour_ms,source,quantity,kind,reason,actor,corrects_period_start_ms,recorded_at";

/// One CSV field, quoted per RFC 4180 when it holds a comma, quote, CR or LF.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// Rows as CSV, header first, CRLF line ends (RFC 4180).
pub fn to_csv(rows: &[UsageRow]) -> String {
    let mut out = String::with_capacity(64 + rows.len() * 128);
    out.push_str(CSV_HEADER);
    out.push_str("\r\n");
    for r in rows {
        let fields = [
            r.id.clone(),
            r.seq.to_string(),
            r.org.clone(),
            r.meter.name().to_string(),
            r.hour_start.clone(),
            r.hour_ms.to_string(),
            r.source.clone(),
            r.quantity.to_string(),
            r.kind.clone(),
            r.reason.clone().unwrap_or_default(),
            r.actor.clone().unwrap_or_default(),
            r.corrects_period_start_ms.map(|v| v.to_string()).unwrap_or_default(),
            r.recorded_at.clone(),
        ];
        let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&line.join(","));
        out.push_str("\r\n");
    }
    out
}

/// One CloudEvents 1.0 JSON object per row, newline-terminated.
pub fn to_cloudevents(rows: &[UsageRow], hub_source: &str) -> String {
    let mut out = String::with_capacity(rows.len() * 400);
    for r in rows {
        let event = json!({
            "specversion": "1.0",
            "id": r.id,
            "source": hub_source,
            "type": format!("dev.gantry.usage.{}", r.meter.name()),
            "time": r.hour_start,
            "subject": r.org,
            "datacontenttype": "application/json",
            "data": r,
        });
        out.push_str(&event.to_string());
        out.push('\n');
    }
    out
}

/// The export: the query's entries in the asked format.
pub async fn export(State(hub): State<Arc<Hub>>, principal: Principal, ApiQuery(query): ApiQuery<UsageQuery>) -> ApiResult<Response> {
    match &query.org {
        Some(org) => {
            if !principal.access.everywhere.has(Perm::Billing) {
                authorize(&principal, org, Perm::Billing, &format!("org {org}"))?;
            }
            if hub.store.org(org)?.is_none() {
                return Err(ApiError::not_found(&format!("org {org}")));
            }
        }
        None => require_operator(&principal, Perm::Billing)?,
    }
    let now = crate::wall_ms();
    let from_ms = match &query.from {
        Some(text) => parse_time(text).map_err(ApiError::bad_request)?,
        None => month_start(now),
    };
    let to_ms = match &query.to {
        Some(text) => parse_time(text).map_err(ApiError::bad_request)?,
        None => hour_of(now) + crate::billing::HOUR_MS,
    };
    if from_ms >= to_ms {
        return Err(ApiError::bad_request("from must be before to"));
    }
    let format = query.format.as_deref().unwrap_or("json").to_string();
    if !matches!(format.as_str(), "json" | "csv" | "cloudevents") {
        return Err(ApiError::bad_request(format!("format {format:?} must be json, csv or cloudevents")));
    }
    let store = hub.store.clone();
    let org = query.org.clone();
    let entries = tokio::task::spawn_blocking(move || -> Result<Result<Vec<LedgerEntry>, ()>, crate::store::Error> {
        let mut out: Vec<LedgerEntry> = Vec::new();
        loop {
            let page = store.ledger_entries(org.as_deref(), from_ms, to_ms, out.last(), EXPORT_PAGE)?;
            let done = page.len() < EXPORT_PAGE;
            out.extend(page);
            if out.len() > MAX_EXPORT_ENTRIES {
                return Ok(Err(()));
            }
            if done {
                return Ok(Ok(out));
            }
        }
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "usage export failed"))??
    .map_err(|()| ApiError::bad_request(format!("more than {MAX_EXPORT_ENTRIES} entries in this range; export shorter ranges")))?;
    let rows: Vec<UsageRow> = entries.iter().map(row).collect();
    let disposition = |ext: &str| HeaderValue::from_str(&format!("attachment; filename=\"usage-{from_ms}-{to_ms}.{ext}\"")).ok();
    match format.as_str() {
        "csv" => {
            let mut response = ([(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"))], to_csv(&rows)).into_response();
            if let Some(value) = disposition("csv") {
                response.headers_mut().insert(header::CONTENT_DISPOSITION, value);
            }
            Ok(response)
        }
        "cloudevents" => {
            let source = format!("//{}/billing/usage", hub.public_addr);
            Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"))], to_cloudevents(&rows, &source)).into_response())
        }
        _ => {
            let mut totals: BTreeMap<String, BTreeMap<Meter, i64>> = BTreeMap::new();
            let orgs: std::collections::BTreeSet<&str> = entries.iter().map(|e| e.org.as_str()).collect();
            for org in orgs {
                totals.insert(org.to_string(), hub.store.ledger_usage(org, from_ms, to_ms)?);
            }
            Ok(Json(UsageExport { from_ms, to_ms, org: query.org, entries: rows, totals }).into_response())
        }
    }
}

/// The start of the UTC month holding `ms`.
fn month_start(ms: i64) -> i64 {
    let day_ms = 86_400_000;
    let Ok(at) = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)) else { return hour_of(ms) };
    ms.div_euclid(day_ms) * day_ms - i64::from(at.day() - 1) * day_ms
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Record an operator's correction.
pub async fn correct(State(hub): State<Arc<Hub>>, principal: Principal, ApiJson(request): ApiJson<CorrectionRequest>) -> ApiResult<Response> {
    require_operator(&principal, Perm::Billing)?;
    let meter = Meter::parse(&request.meter).map_err(ApiError::bad_request)?;
    if request.quantity == 0 {
        return Err(ApiError::bad_request("quantity must not be zero"));
    }
    let reason = request.reason.trim();
    if reason.is_empty() || reason.len() > 500 {
        return Err(ApiError::bad_request("reason must be 1 to 500 characters"));
    }
    if hub.store.org(&request.org)?.is_none() {
        return Err(ApiError::not_found(&format!("org {}", request.org)));
    }
    let now = crate::wall_ms();
    let time = |t: &Option<String>| t.as_deref().map(parse_time).transpose().map_err(ApiError::bad_request);
    let hour_ms = hour_of(time(&request.hour)?.unwrap_or(now));
    let corrects_period_start_ms = time(&request.period_start)?;
    let id = match request.id {
        Some(id) if valid_id(&id) => id,
        Some(_) => return Err(ApiError::bad_request("id must be 1 to 64 letters, digits, '-', '_' or '.'")),
        None => format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>()),
    };
    let entry = LedgerEntry {
        seq: 0,
        org: request.org,
        meter,
        hour_ms,
        source: format!("correction:{id}"),
        quantity: request.quantity,
        kind: EntryKind::Correction { reason: reason.to_string(), actor: principal.name.clone(), corrects_period_start_ms },
        recorded_at_ms: now,
    };
    let store = hub.store.clone();
    let (recorded, stored) = tokio::task::spawn_blocking(move || -> Result<_, crate::store::Error> {
        let recorded = store.record(&entry)?;
        let stored = store.ledger_entry(&entry.org, entry.meter, entry.hour_ms, &entry.source)?;
        Ok((recorded, stored.unwrap_or(entry)))
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "recording the correction failed"))??;
    let duplicate = matches!(recorded, LedgerRecorded::Duplicate { .. });
    let status = if duplicate { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(CorrectionResponse { entry: row(&stored), duplicate })).into_response())
}

/// `GET /api/v1/billing/conflicts` query: one org's conflicts, or every org's.
#[derive(Debug, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConflictQuery {
    pub org: Option<String>,
    /// Include resolved conflicts too (default: only open ones).
    #[serde(default)]
    pub all: bool,
}

/// The kept ledger conflicts.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ConflictList {
    pub conflicts: Vec<crate::store::LedgerConflict>,
}

/// Refused re-records of ledger keys with another quantity (operators). Each open one also
/// fires its org's `ledger_conflict` alert.
pub async fn conflicts(State(hub): State<Arc<Hub>>, principal: Principal, ApiQuery(query): ApiQuery<ConflictQuery>) -> ApiResult<Json<ConflictList>> {
    require_operator(&principal, Perm::Billing)?;
    let mut conflicts = hub.store.ledger_conflict_records(query.org.as_deref())?;
    if !query.all {
        conflicts.retain(|c| c.resolved_at_ms.is_none());
    }
    Ok(Json(ConflictList { conflicts }))
}

/// `POST /api/v1/billing/conflicts/resolve` body.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveConflictRequest {
    pub org: String,
    /// The conflict's `key` as listed.
    pub key: String,
    /// What was found and done (e.g. "duplicate metering after restore; no correction
    /// needed", or the id of the correction entry made).
    pub note: String,
}

/// Mark a ledger conflict reviewed (operators); its alert resolves at the next evaluation.
/// The ledger itself is never changed here: a correction does that.
pub async fn resolve_conflict(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    ApiJson(request): ApiJson<ResolveConflictRequest>,
) -> ApiResult<Json<crate::store::LedgerConflict>> {
    require_operator(&principal, Perm::Billing)?;
    let note = request.note.trim();
    if note.is_empty() || note.len() > 500 {
        return Err(ApiError::bad_request("note must be 1 to 500 characters"));
    }
    let resolved = hub
        .store
        .resolve_ledger_conflict(&request.org, &request.key, &principal.name, note, crate::wall_ms())?
        .ok_or_else(|| ApiError::not_found(&format!("ledger conflict {} of org {}", request.key, request.org)))?;
    hub.health.wake.notify_one();
    Ok(Json(resolved))
}

/// `GET /api/v1/billing/stripe/outbox` query.
#[derive(Debug, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutboxQuery {
    /// Only this org's rows.
    pub org: Option<String>,
    /// Only rows in this state (`pending`, `sent`, `confirmed`, `fallback`, `needs_review`).
    /// Default: the rows an operator has to act on, `fallback` and `needs_review`.
    pub state: Option<crate::store::OutboxState>,
}

/// Rows of the Stripe meter-event outbox, oldest first.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct OutboxList {
    pub rows: Vec<crate::store::OutboxRow>,
}

/// The Stripe outbox (operators): by default the usage Stripe cannot take as meter events
/// (`fallback`: older than its 35-day window, or negative corrections), to be billed as
/// invoice adjustments, and the rows a reconciliation could not decide (`needs_review`).
pub async fn stripe_outbox(State(hub): State<Arc<Hub>>, principal: Principal, ApiQuery(query): ApiQuery<OutboxQuery>) -> ApiResult<Json<OutboxList>> {
    use crate::store::OutboxState;
    require_operator(&principal, Perm::Billing)?;
    let states = match query.state {
        Some(state) => vec![state],
        None => vec![OutboxState::Fallback, OutboxState::NeedsReview],
    };
    let mut rows = hub.store.stripe_outbox(&states)?;
    if let Some(org) = &query.org {
        rows.retain(|r| &r.org == org);
    }
    rows.sort_by_key(|r| r.seq);
    Ok(Json(OutboxList { rows }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(source: &str, reason: Option<&str>) -> LedgerEntry {
        LedgerEntry {
            seq: 7,
            org: "acme".into(),
            meter: Meter::LogBytes,
            hour_ms: 3_600_000,
            source: source.into(),
            quantity: -5,
            kind: match reason {
                Some(r) => EntryKind::Correction { reason: r.into(), actor: "op@example.com".into(), corrects_period_start_ms: None },
                None => EntryKind::Usage,
            },
            recorded_at_ms: 3_600_001,
        }
    }

    #[test]
    fn ledger_csv_quotes_commas_quotes_and_newlines() {
        let rows = [row(&entry("correction:1", Some("said \"oops\", then\nfixed"))), row(&entry("agt_1", None))];
        let csv = to_csv(&rows);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert!(csv.contains("\"said \"\"oops\"\", then\nfixed\""), "{csv}");
        assert!(lines.last().unwrap().is_empty());
    }

    #[test]
    fn ledger_export_defaults_to_the_current_month() {
        // 2026-11-30T20:15:00Z
        assert_eq!(rfc3339(month_start(1_796_069_700_000)), "2026-11-01T00:00:00Z");
        assert_eq!(month_start(1_793_491_200_000), 1_793_491_200_000);
    }

    #[test]
    fn ledger_export_ids_come_from_the_key_alone() {
        let a = entry("agt_1", None);
        let b = LedgerEntry { seq: 99, recorded_at_ms: 5, ..a.clone() };
        assert_eq!(entry_id(&a), entry_id(&b));
        assert_ne!(entry_id(&a), entry_id(&entry("agt_2", None)));
        let event: serde_json::Value = serde_json::from_str(to_cloudevents(&[row(&a)], "//hub/billing/usage").trim()).unwrap();
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["type"], "dev.gantry.usage.log_bytes");
        assert_eq!(event["subject"], "acme");
        assert_eq!(event["data"]["quantity"], -5);
    }
}
