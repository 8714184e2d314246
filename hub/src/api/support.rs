//! Support actions on a connected agent: container start/stop/restart/remove, a
//! container's last log lines, remote exec (in a container or on the host) and the
//! diagnostics bundle; plus the org settings that switch remote exec on.
//!
//! Each action goes to the agent on its control stream (`registry::request`) and the
//! handler waits for the answer with a deadline: an offline agent fails at once (409
//! `agent_offline`), one that drops mid-action with 503, one that does not answer in time
//! with 504. Remote exec needs the `exec` permission (owners, admins) *and* the org's
//! `exec_enabled` setting. Every call is audited by the middleware like any mutation; the
//! handlers add the command, container and exit code to the entry ([`AuditDetail`]).
//! Nothing here talks to Docker or runs anything: the agent does.

use super::{find_agent, org_in_scope, rfc3339, ApiError, ApiJson, ApiQuery, ApiResult, Op, Routes};
use crate::access::Perm;
use crate::audit::AuditDetail;
use crate::auth::Principal;
use crate::registry::SendRefused;
use crate::store::{Agent, OrgSettings};
use crate::Hub;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gantry_shared::support::{self, ActionError, ActionOutput, ContainerOp, ExecRequest, SupportAction};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Longest wait for a container start, stop, restart or removal (the agent gives a
/// stopping container 10 s before Docker kills it).
pub const CONTAINER_WAIT: Duration = Duration::from_secs(40);
/// Longest wait for log lines or a diagnostics bundle.
pub const READ_WAIT: Duration = Duration::from_secs(30);
/// Time an exec answer may take beyond the command's own timeout.
pub const EXEC_MARGIN: Duration = Duration::from_secs(15);
/// Defaults of an exec request.
pub const DEFAULT_EXEC_TIMEOUT_SECS: u32 = 30;
pub const DEFAULT_EXEC_OUTPUT_BYTES: u32 = 64 * 1024;
/// Default number of log lines.
pub const DEFAULT_LOG_TAIL: u32 = 100;
/// Longest command text kept in an audit entry.
const MAX_AUDITED_COMMAND: usize = 2_000;

/// The support routes.
pub fn routes(routes: Routes) -> Routes {
    routes
        .post(
            "/api/v1/agents/{id}/containers/{name}/start",
            start,
            Op::new("Start a container on an agent").describe(CONTAINER_DOC).tag("support").response::<ContainerView>().error(404).error(409).error(503),
        )
        .post(
            "/api/v1/agents/{id}/containers/{name}/stop",
            stop,
            Op::new("Stop a container on an agent").describe(CONTAINER_DOC).tag("support").response::<ContainerView>().error(404).error(409).error(503),
        )
        .post(
            "/api/v1/agents/{id}/containers/{name}/restart",
            restart,
            Op::new("Restart a container on an agent").describe(CONTAINER_DOC).tag("support").response::<ContainerView>().error(404).error(409).error(503),
        )
        .post(
            "/api/v1/agents/{id}/containers/{name}/remove",
            remove,
            Op::new("Remove a container on an agent (a running one only with ?force=true)")
                .describe(CONTAINER_DOC)
                .tag("support")
                .query::<RemoveQuery>()
                .response::<ContainerView>()
                .error(404)
                .error(409)
                .error(503),
        )
        .get(
            "/api/v1/agents/{id}/containers/{name}/logs",
            logs,
            Op::new("The last lines of a container's output, read from the agent now")
                .tag("support")
                .query::<LogsQuery>()
                .response::<LogsView>()
                .error(404)
                .error(409)
                .error(503),
        )
        .post(
            "/api/v1/agents/{id}/exec",
            exec,
            Op::new("Run a command in a container or on the agent's host")
                .describe(EXEC_DOC)
                .tag("support")
                .body::<ExecBody>()
                .response::<ExecView>()
                .error(404)
                .error(409)
                .error(503),
        )
        .post(
            "/api/v1/agents/{id}/diagnostics",
            diagnostics,
            Op::new("Collect an agent's diagnostics bundle (a JSON download)").describe(DIAGNOSTICS_DOC).tag("support").error(409).error(503),
        )
        .get("/api/v1/orgs/{org}/settings", get_settings, Op::new("An org's settings").tag("orgs").response::<OrgSettings>())
        .put(
            "/api/v1/orgs/{org}/settings",
            put_settings,
            Op::new("Replace an org's settings (owners and admins)").tag("orgs").body::<OrgSettings>().response::<OrgSettings>(),
        )
}

const CONTAINER_DOC: &str = "Needs the deploy permission. The agent must be online: 409 `agent_offline` otherwise; an unknown container answers 404 `container_not_found` with Docker's reason.";
const EXEC_DOC: &str = "Needs the exec permission (owners, admins) and the org setting `exec_enabled` (403 `exec_disabled` otherwise). `command` is an argv, never a shell string (use `[\"sh\", \"-c\", \"...\"]`); without `container` it runs on the host as the agent's user. The last `max_output_bytes` of stdout and of stderr are kept; after `timeout_secs` the command is killed and `timed_out` is true. Audited with the command and the exit code.";
const DIAGNOSTICS_DOC: &str = "Needs the admin permission. A JSON document (`Content-Disposition: attachment`): the hub's record of the agent and, from the agent, its version, configuration (secrets redacted), spool state, recent log lines, Docker info and host facts.";

/// Body of an exec.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// Container name or id; absent: run on the agent's host.
    pub container: Option<String>,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// Kill the command after this many seconds (default 30, at most 120).
    pub timeout_secs: Option<u32>,
    /// Bytes kept of stdout and of stderr each, the last ones (default 65536, at most
    /// 262144).
    pub max_output_bytes: Option<u32>,
}

/// Query of a container removal.
#[derive(Debug, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    /// Remove a running container too (it is killed first).
    #[serde(default)]
    pub force: bool,
}

/// Query of a container's logs.
#[derive(Debug, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// How many of the newest lines (default 100, at most 5000).
    pub tail: Option<u32>,
}

/// A container after an action: the agent, then the container as Docker reports it.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ContainerView {
    pub agent: String,
    #[serde(flatten)]
    pub container: gantry_shared::support::ContainerStatus,
}

/// One line of a container's output.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct LogLineView {
    /// `stdout`, `stderr` or `console`.
    pub stream: String,
    pub ts: String,
    pub line: String,
}

/// A container's last lines.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct LogsView {
    pub agent: String,
    pub container: String,
    pub lines: Vec<LogLineView>,
    /// Older lines were left out (the reply is capped at 512 KiB) or long lines were cut.
    pub truncated: bool,
}

/// How an exec ended.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ExecView {
    pub agent: String,
    /// The container, or `null` on the host.
    pub container: Option<String>,
    pub command: Vec<String>,
    /// `null` when the command was killed (timeout, signal).
    pub exit_code: Option<i64>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub timed_out: bool,
    /// Why a timed-out command could not be killed (it may still run).
    pub kill_failed: Option<String>,
    pub duration_ms: u64,
}

/// A response with facts for its audit entry.
fn audited(response: impl IntoResponse, detail: BTreeMap<String, String>) -> Response {
    let mut response = response.into_response();
    response.extensions_mut().insert(AuditDetail(detail));
    response
}

fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(status, code, message)
}

/// Send `action` to the agent and wait up to `wait` for its answer.
async fn run(hub: &Hub, agent: &Agent, action: SupportAction, wait: Duration) -> ApiResult<ActionOutput> {
    let errors = action.validate();
    if !errors.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "invalid_request", errors.join("; ")));
    }
    if agent.revoked_at_ms.is_some() {
        return Err(error(StatusCode::CONFLICT, "agent_revoked", format!("agent {} is revoked", agent.id)));
    }
    let (id, answer) = match hub.registry.request(&agent.id, action) {
        Ok(sent) => sent,
        Err(SendRefused::NotConnected) => {
            let since = agent.last_seen_ms.map(|ms| format!(" (last seen {})", rfc3339(ms))).unwrap_or_default();
            return Err(error(StatusCode::CONFLICT, "agent_offline", format!("agent {} is offline{since}; support actions need a connected agent", agent.id)));
        }
        Err(SendRefused::Busy) => {
            let mut busy =
                error(StatusCode::SERVICE_UNAVAILABLE, "agent_busy", format!("agent {} has too many actions in progress; try again shortly", agent.id));
            busy.retry_after_secs = Some(2);
            return Err(busy);
        }
    };
    match tokio::time::timeout(wait, answer).await {
        Ok(Ok(Ok(output))) => Ok(output),
        Ok(Ok(Err(refusal))) => Err(agent_error(&agent.id, refusal)),
        Ok(Err(_)) => Err(error(StatusCode::SERVICE_UNAVAILABLE, "agent_disconnected", format!("agent {} disconnected before it answered", agent.id))),
        Err(_) => {
            hub.registry.forget(&agent.id, id);
            Err(error(StatusCode::GATEWAY_TIMEOUT, "agent_timeout", format!("agent {} did not answer within {} s", agent.id, wait.as_secs())))
        }
    }
}

/// The API error for what the agent reported.
fn agent_error(agent: &str, refusal: ActionError) -> ApiError {
    match refusal {
        ActionError::NotFound(reason) => error(StatusCode::NOT_FOUND, "container_not_found", format!("agent {agent}: {reason}")),
        ActionError::Invalid(reason) => error(StatusCode::BAD_REQUEST, "invalid_request", format!("agent {agent}: {reason}")),
        ActionError::Conflict(reason) => error(StatusCode::CONFLICT, "conflict", format!("agent {agent}: {reason}")),
        ActionError::Unavailable(reason) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("agent {agent}: {reason}")),
        ActionError::Failed(reason) => error(StatusCode::BAD_GATEWAY, "action_failed", format!("agent {agent}: {reason}")),
    }
}

fn unexpected(agent: &str) -> ApiError {
    error(StatusCode::BAD_GATEWAY, "action_failed", format!("agent {agent} answered with a result of another kind"))
}

async fn container_action(hub: &Hub, principal: &Principal, id: &str, name: String, op: ContainerOp) -> ApiResult<Json<ContainerView>> {
    let agent = find_agent(hub, principal, id, Perm::Deploy)?;
    match run(hub, &agent, SupportAction::Container { container: name, op }, CONTAINER_WAIT).await? {
        ActionOutput::Container(c) => Ok(Json(ContainerView { agent: agent.id, container: c })),
        _ => Err(unexpected(id)),
    }
}

async fn start(State(hub): State<Arc<Hub>>, principal: Principal, Path((id, name)): Path<(String, String)>) -> ApiResult<Json<ContainerView>> {
    container_action(&hub, &principal, &id, name, ContainerOp::Start).await
}

async fn stop(State(hub): State<Arc<Hub>>, principal: Principal, Path((id, name)): Path<(String, String)>) -> ApiResult<Json<ContainerView>> {
    container_action(&hub, &principal, &id, name, ContainerOp::Stop).await
}

async fn restart(State(hub): State<Arc<Hub>>, principal: Principal, Path((id, name)): Path<(String, String)>) -> ApiResult<Json<ContainerView>> {
    container_action(&hub, &principal, &id, name, ContainerOp::Restart).await
}

async fn remove(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path((id, name)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<RemoveQuery>,
) -> ApiResult<Json<ContainerView>> {
    container_action(&hub, &principal, &id, name, ContainerOp::Remove { force: query.force }).await
}

async fn logs(
    State(hub): State<Arc<Hub>>,
    principal: Principal,
    Path((id, name)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<LogsQuery>,
) -> ApiResult<Json<LogsView>> {
    let agent = find_agent(&hub, &principal, &id, Perm::Read)?;
    let tail = query.tail.unwrap_or(DEFAULT_LOG_TAIL);
    match run(&hub, &agent, SupportAction::ContainerLogs { container: name.clone(), tail }, READ_WAIT).await? {
        ActionOutput::Logs(tail) => Ok(Json(LogsView {
            agent: agent.id,
            container: name,
            lines: tail.lines.into_iter().map(|l| LogLineView { stream: l.stream, ts: l.ts, line: l.line }).collect(),
            truncated: tail.truncated,
        })),
        _ => Err(unexpected(&id)),
    }
}

/// `argv` as one line a person can read (and paste into a shell): arguments with spaces or
/// quotes are single-quoted.
pub fn command_line(argv: &[String]) -> String {
    let quoted: Vec<String> = argv
        .iter()
        .map(|arg| {
            let plain = !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
            if plain {
                arg.clone()
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect();
    let line = quoted.join(" ");
    support::cut(&line, MAX_AUDITED_COMMAND).0.to_string()
}

async fn exec(State(hub): State<Arc<Hub>>, principal: Principal, Path(id): Path<String>, ApiJson(body): ApiJson<ExecBody>) -> Response {
    let mut detail = BTreeMap::from([
        ("command".to_string(), command_line(&body.command)),
        ("container".to_string(), body.container.clone().unwrap_or_else(|| "(host)".to_string())),
    ]);
    let outcome = exec_inner(&hub, &principal, &id, body).await;
    match outcome {
        Ok(view) => {
            let code = match (view.timed_out, view.exit_code) {
                (true, _) => "timeout".to_string(),
                (false, Some(code)) => code.to_string(),
                (false, None) => "signal".to_string(),
            };
            detail.insert("exit_code".to_string(), code);
            audited(Json(view), detail)
        }
        Err(refusal) => {
            detail.insert("error".to_string(), refusal.code.to_string());
            audited(refusal, detail)
        }
    }
}

async fn exec_inner(hub: &Hub, principal: &Principal, id: &str, body: ExecBody) -> ApiResult<ExecView> {
    let agent = find_agent(hub, principal, id, Perm::Exec)?;
    if !hub.store.org_settings(&agent.org)?.exec_enabled {
        return Err(error(
            StatusCode::FORBIDDEN,
            "exec_disabled",
            format!(
                "remote exec is disabled in org {org}; an owner or admin can enable it with PUT /api/v1/orgs/{org}/settings {{\"exec_enabled\": true}}",
                org = agent.org
            ),
        ));
    }
    let request = ExecRequest {
        container: body.container.clone(),
        argv: body.command.clone(),
        timeout_secs: body.timeout_secs.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS),
        max_output_bytes: body.max_output_bytes.unwrap_or(DEFAULT_EXEC_OUTPUT_BYTES),
    };
    let wait = Duration::from_secs(u64::from(request.timeout_secs)) + EXEC_MARGIN;
    match run(hub, &agent, SupportAction::Exec(request), wait).await? {
        ActionOutput::Exec(out) => Ok(ExecView {
            agent: agent.id,
            container: body.container,
            command: body.command,
            exit_code: out.exit_code,
            stdout: out.stdout,
            stderr: out.stderr,
            stdout_truncated: out.stdout_truncated,
            stderr_truncated: out.stderr_truncated,
            timed_out: out.timed_out,
            kill_failed: out.kill_failed,
            duration_ms: out.duration_ms,
        }),
        _ => Err(unexpected(id)),
    }
}

/// Version of the diagnostics document's layout.
pub const DIAGNOSTICS_FORMAT: u32 = 1;

async fn diagnostics(State(hub): State<Arc<Hub>>, principal: Principal, Path(id): Path<String>) -> ApiResult<Response> {
    let agent = find_agent(&hub, &principal, &id, Perm::Admin)?;
    let document = match run(&hub, &agent, SupportAction::Diagnostics, READ_WAIT).await? {
        ActionOutput::Diagnostics(text) => serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| error(StatusCode::BAD_GATEWAY, "action_failed", format!("agent {id} sent diagnostics that are not JSON: {e}")))?,
        _ => return Err(unexpected(&id)),
    };
    let now = crate::wall_ms();
    let bundle = json!({
        "format": DIAGNOSTICS_FORMAT,
        "collected_at": rfc3339(now),
        "collected_by": principal.name,
        "hub": { "version": env!("CARGO_PKG_VERSION"), "agent_record": super::agent_view(&hub, &agent) },
        "agent": document,
    });
    let stamp = rfc3339(now).replace([':', '-'], "");
    let disposition = format!("attachment; filename=\"gantry-diagnostics-{}-{}.json\"", agent.id, stamp.split('.').next().unwrap_or(&stamp));
    let mut response = Json(bundle).into_response();
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        response.headers_mut().insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

async fn get_settings(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>) -> ApiResult<Json<OrgSettings>> {
    org_in_scope(&hub, &principal, &org, Perm::Read)?;
    Ok(Json(hub.store.org_settings(&org)?))
}

async fn put_settings(State(hub): State<Arc<Hub>>, principal: Principal, Path(org): Path<String>, ApiJson(body): ApiJson<OrgSettings>) -> ApiResult<Response> {
    org_in_scope(&hub, &principal, &org, Perm::Admin)?;
    hub.store.put_org_settings(&org, &body)?;
    tracing::info!(%org, exec_enabled = body.exec_enabled, by = %principal.name, "org settings changed");
    let detail = BTreeMap::from([("exec_enabled".to_string(), body.exec_enabled.to_string())]);
    Ok(audited(Json(body), detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_audited_as_readable_lines() {
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(command_line(&argv(&["ls", "-l", "/var/log"])), "ls -l /var/log");
        assert_eq!(command_line(&argv(&["sh", "-c", "echo 'hi' && exit 3"])), r"sh -c 'echo '\''hi'\'' && exit 3'");
        assert_eq!(command_line(&argv(&["printf", ""])), "printf ''");
        assert_eq!(command_line(&argv(&["x", &"y".repeat(5000)])).len(), MAX_AUDITED_COMMAND);
    }
}
