//! Support actions against the Docker engine, through bollard's typed API only: container
//! start/stop/restart/remove, the last lines of a container's output, and exec inside a
//! container (killed at its timeout through the host pid Docker reports).

use super::host::{read_capped_stream, text_of, Capped};
use bollard::errors::Error as DockerError;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::query_parameters::{
    InspectContainerOptions, LogsOptions, RemoveContainerOptions, RestartContainerOptions, StartContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use gantry_shared::support::{cut, ActionError, ContainerOp, ContainerStatus, ExecOutput, ExecRequest, LogLine, LogTail, MAX_LOG_BYTES, MAX_LOG_LINE_BYTES};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Time Docker gets for a request beyond the work it waits for.
const REQUEST_MARGIN: Duration = Duration::from_secs(30);

/// What went wrong, in the terms the hub reports: Docker's own message for a missing
/// container (404) or a state conflict (409).
pub fn failure(what: &str, error: DockerError) -> ActionError {
    match error {
        DockerError::DockerResponseServerError { status_code: 404, message } => ActionError::NotFound(message),
        DockerError::DockerResponseServerError { status_code: 409, message } => ActionError::Conflict(message),
        DockerError::DockerResponseServerError { status_code, message } => ActionError::Failed(format!("{what}: docker answered {status_code}: {message}")),
        other => ActionError::Unavailable(format!("{what}: docker did not answer: {other}")),
    }
}

fn not_modified(error: &DockerError) -> bool {
    matches!(error, DockerError::DockerResponseServerError { status_code: 304, .. })
}

/// The container as Docker reports it now.
pub async fn status(docker: &Docker, container: &str, message: String) -> Result<ContainerStatus, ActionError> {
    let inspect = docker.inspect_container(container, None::<InspectContainerOptions>).await.map_err(|e| failure("inspecting the container", e))?;
    let state = inspect.state.unwrap_or_default();
    Ok(ContainerStatus {
        id: inspect.id.unwrap_or_default(),
        name: inspect.name.unwrap_or_default().trim_start_matches('/').to_string(),
        state: state.status.map(|s| s.to_string()).unwrap_or_default(),
        started_at: state.started_at.unwrap_or_default(),
        finished_at: state.finished_at.unwrap_or_default(),
        restart_count: inspect.restart_count.unwrap_or(0),
        message,
    })
}

/// Start, stop, restart or remove `container`; its state afterwards.
pub async fn container_op(docker: &Docker, container: &str, op: ContainerOp, stop_grace_secs: u32) -> Result<ContainerStatus, ActionError> {
    let grace = i32::try_from(stop_grace_secs).unwrap_or(i32::MAX);
    let docker = docker.clone().with_timeout(Duration::from_secs(u64::from(stop_grace_secs)) + REQUEST_MARGIN);
    // Docker answers a start of a running container (or a stop of a stopped one) like any
    // other, so the state before says whether there was anything to do.
    let before = status(&docker, container, String::new()).await?;
    let running = matches!(before.state.as_str(), "running" | "restarting" | "paused");
    let message = match op {
        ContainerOp::Start if running => "was already running",
        ContainerOp::Start => match docker.start_container(container, None::<StartContainerOptions>).await {
            Ok(()) => "started",
            Err(e) if not_modified(&e) => "was already running",
            Err(e) => return Err(failure("starting the container", e)),
        },
        ContainerOp::Stop if !running => "was already stopped",
        ContainerOp::Stop => match docker.stop_container(container, Some(StopContainerOptions { t: Some(grace), signal: None })).await {
            Ok(()) => "stopped",
            Err(e) if not_modified(&e) => "was already stopped",
            Err(e) => return Err(failure("stopping the container", e)),
        },
        ContainerOp::Restart => match docker.restart_container(container, Some(RestartContainerOptions { t: Some(grace), signal: None })).await {
            Ok(()) => "restarted",
            Err(e) => return Err(failure("restarting the container", e)),
        },
        ContainerOp::Remove { force } => {
            let options = RemoveContainerOptions { force, v: false, link: false };
            return match docker.remove_container(container, Some(options)).await {
                Ok(()) => Ok(ContainerStatus { state: "removed".into(), message: "removed".into(), ..before }),
                Err(DockerError::DockerResponseServerError { status_code: 409, message }) if !force => {
                    Err(ActionError::Conflict(format!("{message} (ask again with force=true to kill and remove it)")))
                }
                Err(e) => Err(failure("removing the container", e)),
            };
        }
    };
    status(&docker, container, message.to_string()).await
}

/// The last `tail` lines of `container`'s stdout and stderr, at most [`MAX_LOG_BYTES`].
pub async fn logs(docker: &Docker, container: &str, tail: u32) -> Result<LogTail, ActionError> {
    let options = LogsOptions { stdout: true, stderr: true, timestamps: true, tail: tail.to_string(), ..Default::default() };
    let docker = docker.clone().with_timeout(REQUEST_MARGIN);
    let mut stream = docker.logs(container, Some(options));
    let mut lines: VecDeque<LogLine> = VecDeque::new();
    let (mut bytes, mut truncated) = (0usize, false);
    while let Some(item) = stream.next().await {
        let output = item.map_err(|e| failure("reading the container's logs", e))?;
        let stream_name = match &output {
            bollard::container::LogOutput::StdErr { .. } => "stderr",
            bollard::container::LogOutput::Console { .. } => "console",
            _ => "stdout",
        };
        let text = String::from_utf8_lossy(&output.into_bytes()).into_owned();
        for raw in text.split('\n').filter(|l| !l.is_empty()) {
            let raw = raw.trim_end_matches('\r');
            let (ts, line) = raw.split_once(' ').filter(|(ts, _)| ts.contains('T')).unwrap_or(("", raw));
            let (line, was_cut) = cut(line, MAX_LOG_LINE_BYTES);
            truncated |= was_cut;
            bytes += line.len();
            lines.push_back(LogLine { stream: stream_name.into(), ts: ts.to_string(), line: line.to_string() });
            while bytes > MAX_LOG_BYTES {
                let Some(old) = lines.pop_front() else { break };
                bytes -= old.line.len();
                truncated = true;
            }
        }
    }
    // Docker copies stdout and stderr separately, so its file order can mix the two
    // streams; the timestamps say in which order the lines came.
    let mut lines: Vec<LogLine> = lines.into();
    let stamps: Option<Vec<i128>> = lines
        .iter()
        .map(|l| time::OffsetDateTime::parse(&l.ts, &time::format_description::well_known::Rfc3339).ok().map(|t| t.unix_timestamp_nanos()))
        .collect();
    if let Some(stamps) = stamps {
        let mut keyed: Vec<(i128, LogLine)> = stamps.into_iter().zip(lines).collect();
        keyed.sort_by_key(|(stamp, _)| *stamp);
        lines = keyed.into_iter().map(|(_, line)| line).collect();
    }
    Ok(LogTail { lines, truncated })
}

/// Run `request.argv` inside `container`.
pub async fn exec(docker: &Docker, container: &str, request: &ExecRequest) -> Result<ExecOutput, ActionError> {
    let started = Instant::now();
    let limit = Duration::from_secs(u64::from(request.timeout_secs));
    let max = request.max_output_bytes as usize;
    let docker = docker.clone().with_timeout(limit + REQUEST_MARGIN);
    let options = CreateExecOptions { attach_stdout: Some(true), attach_stderr: Some(true), cmd: Some(request.argv.clone()), ..Default::default() };
    let created = docker.create_exec(container, options).await.map_err(|e| failure("creating the exec", e))?;
    let started_exec = docker
        .start_exec(&created.id, Some(StartExecOptions { detach: false, tty: false, output_capacity: None }))
        .await
        .map_err(|e| failure("starting the exec", e))?;
    let StartExecResults::Attached { mut output, .. } = started_exec else {
        return Err(ActionError::Failed("docker started the exec detached".into()));
    };
    let streams = [Arc::new(Mutex::new(Capped::default())), Arc::new(Mutex::new(Capped::default()))];
    let deadline = tokio::time::Instant::now() + limit;
    let mut result = ExecOutput::default();
    loop {
        match tokio::time::timeout_at(deadline, output.next()).await {
            Ok(Some(Ok(chunk))) => {
                let index = usize::from(matches!(chunk, bollard::container::LogOutput::StdErr { .. }));
                read_capped_stream(&streams[index], &chunk.into_bytes(), max);
            }
            Ok(Some(Err(error))) => return Err(failure("reading the exec's output", error)),
            Ok(None) => break,
            Err(_) => {
                result.timed_out = true;
                break;
            }
        }
    }
    drop(output);
    let inspect = docker.inspect_exec(&created.id).await.map_err(|e| failure("inspecting the exec", e))?;
    if result.timed_out {
        result.kill_failed = match inspect.pid.filter(|pid| *pid > 0).and_then(|pid| u32::try_from(pid).ok()) {
            Some(pid) if super::host::kill_tree(pid) => None,
            Some(pid) => Some(format!("could not kill process {pid} (the agent may lack the permission); it may still be running")),
            None => Some("docker did not report the exec's process id; it may still be running".into()),
        };
    } else {
        // The output ends a moment before Docker records the exit code.
        let mut inspect = inspect;
        let settle = Instant::now();
        while inspect.running == Some(true) && settle.elapsed() < Duration::from_secs(2) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            inspect = docker.inspect_exec(&created.id).await.map_err(|e| failure("inspecting the exec", e))?;
        }
        result.exit_code = inspect.exit_code;
    }
    let (stdout, stdout_truncated) = text_of(&streams[0], max);
    let (stderr, stderr_truncated) = text_of(&streams[1], max);
    Ok(ExecOutput { stdout, stderr, stdout_truncated, stderr_truncated, duration_ms: started.elapsed().as_millis() as u64, ..result })
}
