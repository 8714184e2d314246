//! Operators' routes for backups, the secrets key and hub-wide alerts.
//!
//! `POST /api/v1/backups` takes a backup of the running hub (the store is locked by the
//! server, so the CLI's `gantry-hub backup` asks through here): the hub writes it to a
//! private temporary file in its data directory, checks nothing failed, and streams the
//! file back with its SHA-256 in `x-backup-sha256`; the temporary file is unlinked before
//! the first byte is sent. `GET /api/v1/backups` shows the schedule and its backups.
//! `GET /api/v1/secrets-key`, `POST /api/v1/secrets-key/rotate` and
//! `POST /api/v1/secrets-key/reencrypt` rotate the key that seals secrets at rest (see
//! `crate::keys`). `GET /api/v1/hub/ca` lists the CAs agents are trusted through (see
//! `crate::pki`). All of them are for platform operators only, and audited by the
//! middleware like every state change.

use super::{require_operator, ApiError, ApiJson, ApiResult};
use crate::access::Perm;
use crate::auth::Principal;
use crate::backup::BackupSecret;
use crate::Hub;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Body of `POST /api/v1/backups`: exactly one of the two.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// Passphrase to encrypt the backup with (at least 12 characters).
    #[serde(default)]
    pub passphrase: Option<String>,
    /// Contents of a key file (at least 32 bytes), base64.
    #[serde(default)]
    pub key_file_base64: Option<String>,
}

/// Body of `POST /api/v1/secrets-key/rotate`.
#[derive(Deserialize, schemars::JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// Re-encrypt every sealed value with the new key right away (default true). With
    /// `false`, old values stay on their versions until `POST /api/v1/secrets-key/reencrypt`.
    #[serde(default)]
    pub reencrypt: Option<bool>,
}

/// Reply of `GET /api/v1/hub/ca`.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct CaStatus {
    /// Every CA whose agent certificates the hub accepts, the current one first.
    pub cas: Vec<crate::pki::CaInfo>,
}

/// The CAs the running hub trusts (see `gantry-hub rotate-ca`).
pub async fn ca_status(State(hub): State<Arc<Hub>>, principal: Principal) -> ApiResult<Json<CaStatus>> {
    require_operator(&principal, Perm::Admin)?;
    Ok(Json(CaStatus { cas: hub.pki.cas() }))
}

fn internal(error: anyhow::Error) -> ApiError {
    tracing::error!(error = %format!("{error:#}"), "backup or key operation failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{error:#}"))
}

/// Run blocking work off the async workers.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(work).await.map_err(|_| internal(anyhow::anyhow!("the task panicked")))?.map_err(internal)
}

pub async fn create(State(hub): State<Arc<Hub>>, principal: Principal, ApiJson(body): ApiJson<BackupRequest>) -> ApiResult<Response> {
    require_operator(&principal, Perm::Admin)?;
    let secret = match (body.passphrase, body.key_file_base64) {
        (Some(passphrase), None) => BackupSecret::Passphrase(passphrase),
        (None, Some(encoded)) => {
            let bytes =
                data_encoding::BASE64.decode(encoded.trim().as_bytes()).map_err(|e| ApiError::bad_request(format!("key_file_base64 is not base64: {e}")))?;
            BackupSecret::KeyFile(bytes)
        }
        _ => return Err(ApiError::bad_request("give exactly one of passphrase and key_file_base64")),
    };
    secret.validate().map_err(ApiError::bad_request)?;
    let tmp = hub.config.data_dir.join(format!("backup-{:016x}.tmp", rand::random::<u64>()));
    let worker = hub.clone();
    let path = tmp.clone();
    let (file, written) = blocking(move || {
        use std::os::unix::fs::OpenOptionsExt;
        let result = (|| {
            let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path)?;
            let written = crate::backup::write_backup(&worker, &secret, &file)?;
            Ok((file, written))
        })();
        // Unlinked at once: the open file is all that is left, gone when the stream ends.
        let _ = std::fs::remove_file(&path);
        result
    })
    .await?;
    let len = file.metadata().map_err(|e| internal(e.into()))?.len();
    let file = tokio::fs::File::from_std(file);
    let stream = futures_util::stream::unfold((file, 0u64), move |(mut file, sent)| async move {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        if sent == 0 {
            if let Err(error) = file.seek(std::io::SeekFrom::Start(0)).await {
                return Some((Err(error), (file, len)));
            }
        }
        if sent >= len {
            return None;
        }
        let mut buf = vec![0u8; 256 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => Some((Err(std::io::Error::other("backup file ended early")), (file, len))),
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), (file, sent + n as u64)))
            }
            Err(error) => Some((Err(error), (file, len))),
        }
    });
    let manifest = &written.manifest;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (header::CONTENT_DISPOSITION, "attachment; filename=\"gantry-backup.gbk\"".to_string()),
            (header::HeaderName::from_static("x-backup-sha256"), written.sha256.clone()),
            (header::HeaderName::from_static("x-backup-records"), manifest.records.to_string()),
            (header::HeaderName::from_static("x-backup-segment-bytes"), manifest.segment_bytes.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

pub async fn list(State(hub): State<Arc<Hub>>, principal: Principal) -> ApiResult<Json<Value>> {
    require_operator(&principal, Perm::Admin)?;
    let config = &hub.config.backup;
    let files: Vec<Value> = match &config.dir {
        Some(dir) => crate::backup::scheduled_files(dir)
            .iter()
            .map(|path| {
                json!({
                    "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
                    "bytes": std::fs::metadata(path).map(|m| m.len()).ok(),
                })
            })
            .collect(),
        None => Vec::new(),
    };
    let status = crate::backup::status(&hub);
    Ok(Json(json!({
        "scheduled": config.dir.is_some(),
        "dir": config.dir,
        "interval_secs": config.interval_secs,
        "keep": config.keep,
        "failing": status.failing(),
        "status": status,
        "backups": files,
    })))
}

pub async fn key_status(State(hub): State<Arc<Hub>>, principal: Principal) -> ApiResult<Json<crate::keys::KeyStatus>> {
    require_operator(&principal, Perm::Admin)?;
    let worker = hub.clone();
    Ok(Json(blocking(move || crate::keys::status(&worker)).await?))
}

pub async fn rotate(State(hub): State<Arc<Hub>>, principal: Principal, body: axum::body::Bytes) -> ApiResult<Json<Value>> {
    require_operator(&principal, Perm::Admin)?;
    // The body is optional: an empty one takes the defaults.
    let request: RotateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RotateRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", format!("the body must be {{\"reencrypt\": true|false}}: {e}")))?
    };
    let reencrypt = request.reencrypt.unwrap_or(true);
    let worker = hub.clone();
    let (version, reencrypted, status) = blocking(move || {
        let version = crate::keys::rotate(&worker)?;
        let reencrypted = if reencrypt { Some(crate::keys::reencrypt(&worker)?) } else { None };
        Ok((version, reencrypted, crate::keys::status(&worker)?))
    })
    .await?;
    Ok(Json(json!({ "version": version, "reencrypted": reencrypted, "status": status })))
}

pub async fn reencrypt(State(hub): State<Arc<Hub>>, principal: Principal) -> ApiResult<Json<Value>> {
    require_operator(&principal, Perm::Admin)?;
    let worker = hub.clone();
    let (reencrypted, status) = blocking(move || Ok((crate::keys::reencrypt(&worker)?, crate::keys::status(&worker)?))).await?;
    Ok(Json(json!({ "reencrypted": reencrypted, "status": status })))
}

pub async fn hub_alerts(State(hub): State<Arc<Hub>>, principal: Principal) -> ApiResult<Json<Value>> {
    require_operator(&principal, Perm::Read)?;
    let alerts: Vec<Value> = hub.store.alerts_of_org(crate::backup::HUB_ALERT_SCOPE)?.iter().map(super::health::alert_json).collect();
    Ok(Json(json!({ "alerts": alerts })))
}

/// This module's routes.
pub fn routes(routes: super::openapi::Routes) -> super::openapi::Routes {
    use super::openapi::Op;
    routes
        .post(
            "/api/v1/backups",
            create,
            Op::new("Take a backup of the running hub, streamed back (operators)").tag("operations").body::<BackupRequest>().text("application/octet-stream"),
        )
        .get("/api/v1/backups", list, Op::new("Scheduled backups: settings, status and files (operators)").tag("operations"))
        .get(
            "/api/v1/secrets-key",
            key_status,
            Op::new("The secrets key's versions and the sealed values on each (operators)").tag("operations").response::<crate::keys::KeyStatus>(),
        )
        .post("/api/v1/secrets-key/rotate", rotate, Op::new("Add a secrets key version and re-encrypt (operators)").tag("operations").body::<RotateRequest>())
        .post("/api/v1/secrets-key/reencrypt", reencrypt, Op::new("Move every sealed value to the newest key version (operators)").tag("operations"))
        .get("/api/v1/hub/alerts", hub_alerts, Op::new("Hub-wide alerts such as failed backups (operators)").tag("alerts"))
        .get("/api/v1/hub/ca", ca_status, Op::new("The CAs the hub trusts for agents, with their roles (operators)").tag("operations").response::<CaStatus>())
}
