//! Health probes and the health gate a new container must pass.
//!
//! A container passes when it runs and is healthy without a break for `min_healthy_secs`
//! within `deadline_secs` of its start. Healthy means, per [`HealthCheck`]: `Docker` —
//! Docker reports `healthy` (running, when the image has no HEALTHCHECK); `Http` — an HTTP
//! GET from the agent to the published port answers the expected status; `Tcp` — a TCP
//! connect to the published port succeeds; `Exec` — the command exits 0 inside the
//! container; none — running. A container that exits or is restarted by Docker fails at
//! once.
//!
//! Probes only read: this module never starts, stops or removes containers, and it sends
//! nothing but the probe requests themselves.

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, ExecConfig, HealthStatusEnum};
use bollard::query_parameters::{EventsOptions, InspectContainerOptions};
use bollard::Docker;
use futures_util::StreamExt;
use gantry_shared::deploy::{HealthCheck, HealthGate, PortMapping, Protocol};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Time between two rounds of probes.
const POLL: Duration = Duration::from_millis(250);
/// Longest time one HTTP or TCP probe may take.
const NET_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest time one exec probe may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(10);
/// Most probe output kept, in bytes.
const MAX_OUTPUT: usize = 512;

/// A container under the health gate.
#[derive(Debug, Clone)]
pub(crate) struct Watched {
    /// Container id.
    pub id: String,
    /// Container name.
    pub name: String,
    pub service: String,
    pub check: Option<HealthCheck>,
    /// The service's published ports (to find the address of HTTP and TCP checks).
    pub ports: Vec<PortMapping>,
    /// When it was started (or, for a container found running, when the gate began).
    pub started: Instant,
    /// Docker's restart count when it was started; `None`: taken at the first look.
    pub restarts: Option<i64>,
}

/// Why a container did not pass the gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GateFailure {
    /// Index of the container in the watched list.
    pub index: usize,
    pub reason: String,
    pub exit_code: Option<i64>,
    pub health_output: Option<String>,
}

/// One look at a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Look {
    /// Running; healthy or not, with the probe's output.
    Running { healthy: bool, output: Option<String> },
    /// Not running (or restarted by Docker): the gate fails.
    Down { reason: String, exit_code: Option<i64> },
}

/// Wait until every watched container passes `gate`, or one fails. `passed` is called once
/// for each container as it passes. Errors talking to Docker count as "not healthy yet",
/// except a container that disappeared, which fails.
pub(crate) async fn gate(docker: &Docker, watched: &[Watched], gate: HealthGate, passed: &mut (dyn FnMut(&Watched) + Send)) -> Result<(), GateFailure> {
    let min_healthy = Duration::from_secs(gate.min_healthy_secs);
    let deadline = Duration::from_secs(gate.deadline_secs);
    let mut restarts: Vec<Option<i64>> = watched.iter().map(|w| w.restarts).collect();
    let mut healthy_since: Vec<Option<Instant>> = vec![None; watched.len()];
    let mut done = vec![false; watched.len()];
    let mut outputs: Vec<Option<String>> = vec![None; watched.len()];
    loop {
        for (i, w) in watched.iter().enumerate() {
            let now = Instant::now();
            match look(docker, w, &mut restarts[i]).await {
                Look::Down { reason, exit_code } => {
                    return Err(GateFailure { index: i, reason, exit_code, health_output: outputs[i].take() });
                }
                Look::Running { healthy, output } => {
                    if output.is_some() {
                        outputs[i] = output;
                    }
                    if done[i] {
                        continue;
                    }
                    if healthy {
                        let since = *healthy_since[i].get_or_insert(now);
                        if now.duration_since(since) >= min_healthy {
                            done[i] = true;
                            passed(w);
                            continue;
                        }
                    } else {
                        healthy_since[i] = None;
                    }
                    if now.duration_since(w.started) >= deadline {
                        let what = if healthy_since[i].is_some() { "did not stay healthy" } else { "was not healthy" };
                        return Err(GateFailure {
                            index: i,
                            reason: format!("container {} {what} for {}s within {}s of its start", w.name, gate.min_healthy_secs, gate.deadline_secs),
                            exit_code: None,
                            health_output: outputs[i].take(),
                        });
                    }
                }
            }
        }
        if done.iter().all(|d| *d) {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One probe of a running container, for "is it still fine" checks outside the gate.
pub(crate) async fn probe_once(docker: &Docker, watched: &Watched) -> bool {
    let mut restarts = watched.restarts;
    matches!(look(docker, watched, &mut restarts).await, Look::Running { healthy: true, .. })
}

/// Inspect the container and, while it runs, probe it. `restarts` is the restart count
/// seen first; a higher one means Docker restarted the container.
pub(crate) async fn look(docker: &Docker, w: &Watched, restarts: &mut Option<i64>) -> Look {
    let inspect = match docker.inspect_container(&w.id, None::<InspectContainerOptions>).await {
        Ok(inspect) => inspect,
        Err(error) if crate::collector::docker::is_gone(&error) => {
            return Look::Down { reason: format!("container {} disappeared", w.name), exit_code: None };
        }
        Err(error) => return Look::Running { healthy: false, output: Some(format!("inspecting the container failed: {error}")) },
    };
    let state = inspect.state.clone().unwrap_or_default();
    let exit_code = state.exit_code;
    let count = inspect.restart_count.unwrap_or(0);
    let first = *restarts.get_or_insert(count);
    if count > first {
        // Running again: the state shows the new run; the exit is in Docker's event log.
        let exit_code = if state.status == Some(ContainerStateStatusEnum::RESTARTING) {
            exit_code
        } else {
            last_exit_code(docker, &w.id, w.started.elapsed()).await.or(exit_code)
        };
        return Look::Down { reason: format!("container {} exited with code {} and was restarted by docker", w.name, exit_code.unwrap_or(-1)), exit_code };
    }
    match state.status {
        Some(ContainerStateStatusEnum::RUNNING) if state.running != Some(false) => {}
        Some(ContainerStateStatusEnum::RESTARTING) => {
            return Look::Down {
                reason: format!("container {} exited with code {} and is being restarted by docker", w.name, exit_code.unwrap_or(-1)),
                exit_code,
            };
        }
        Some(ContainerStateStatusEnum::EXITED) | Some(ContainerStateStatusEnum::DEAD) => {
            let oom = if state.oom_killed == Some(true) { " (killed: out of memory)" } else { "" };
            return Look::Down { reason: format!("container {} exited with code {}{oom}", w.name, exit_code.unwrap_or(-1)), exit_code };
        }
        other => {
            let status = other.map(|s| s.to_string()).unwrap_or_else(|| "unknown".to_string());
            let error = state.error.filter(|e| !e.is_empty()).map(|e| format!(": {e}")).unwrap_or_default();
            return Look::Down { reason: format!("container {} is not running (state {status}){error}", w.name), exit_code };
        }
    }
    let (healthy, output) = probe(docker, w, &inspect).await;
    Look::Running { healthy, output }
}

/// The exit code of the container's last `die` event in the last `ago` (from Docker's
/// event log), for a container Docker restarted since.
async fn last_exit_code(docker: &Docker, container: &str, ago: Duration) -> Option<i64> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?;
    let since = now.saturating_sub(ago + Duration::from_secs(2));
    let filters = HashMap::from([
        ("type".to_string(), vec!["container".to_string()]),
        ("container".to_string(), vec![container.to_string()]),
        ("event".to_string(), vec!["die".to_string()]),
    ]);
    let options = EventsOptions {
        since: Some(format!("{}.{:09}", since.as_secs(), since.subsec_nanos())),
        until: Some(format!("{}.{:09}", now.as_secs(), now.subsec_nanos())),
        filters: Some(filters),
    };
    let mut stream = docker.events(Some(options));
    let mut code = None;
    let read = async {
        while let Some(Ok(message)) = stream.next().await {
            let attributes = message.actor.and_then(|a| a.attributes).unwrap_or_default();
            if let Some(exit) = attributes.get("exitCode").and_then(|c| c.parse().ok()) {
                code = Some(exit);
            }
        }
    };
    let _ = tokio::time::timeout(NET_TIMEOUT, read).await;
    code
}

/// Probe a running container per its check: (healthy, output).
async fn probe(docker: &Docker, w: &Watched, inspect: &ContainerInspectResponse) -> (bool, Option<String>) {
    match &w.check {
        None => (true, None),
        Some(HealthCheck::Docker) => docker_health(inspect),
        Some(HealthCheck::Http { port, path, expect_status }) => {
            let addr = probe_addr(&w.ports, *port);
            match http_get(addr, path, NET_TIMEOUT).await {
                Ok((status, _)) if status == *expect_status => (true, Some(format!("GET {path} on {addr}: status {status}"))),
                Ok((status, _)) => (false, Some(format!("GET {path} on {addr}: status {status}, expected {expect_status}"))),
                Err(error) => (false, Some(format!("GET {path} on {addr}: {error}"))),
            }
        }
        Some(HealthCheck::Tcp { port }) => {
            let addr = probe_addr(&w.ports, *port);
            match tokio::time::timeout(NET_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => (true, Some(format!("connect to {addr}: ok"))),
                Ok(Err(error)) => (false, Some(format!("connect to {addr}: {error}"))),
                Err(_) => (false, Some(format!("connect to {addr}: timed out after {}s", NET_TIMEOUT.as_secs()))),
            }
        }
        Some(HealthCheck::Exec { command }) => match exec(docker, &w.id, command).await {
            Ok((0, output)) => (true, Some(format_exec(0, &output))),
            Ok((code, output)) => (false, Some(format_exec(code, &output))),
            Err(error) => (false, Some(error)),
        },
    }
}

fn format_exec(code: i64, output: &str) -> String {
    let output = output.trim();
    if output.is_empty() {
        format!("exit code {code}")
    } else {
        format!("exit code {code}: {output}")
    }
}

/// Docker's own health status; running counts as healthy without a HEALTHCHECK.
fn docker_health(inspect: &ContainerInspectResponse) -> (bool, Option<String>) {
    let Some(health) = inspect.state.as_ref().and_then(|s| s.health.as_ref()) else {
        return (true, Some("the image has no healthcheck; running counts as healthy".into()));
    };
    let last = health.log.as_ref().and_then(|log| log.last()).map(|result| {
        let output = truncate(result.output.as_deref().unwrap_or("").trim());
        format!("docker health check exit code {}: {output}", result.exit_code.unwrap_or(-1))
    });
    match health.status {
        Some(HealthStatusEnum::HEALTHY) => (true, last),
        Some(HealthStatusEnum::NONE) | Some(HealthStatusEnum::EMPTY) | None => (true, Some("the image has no healthcheck; running counts as healthy".into())),
        Some(status) => (false, Some(last.unwrap_or_else(|| format!("docker health status {status}")))),
    }
}

/// Where to reach a published host port from the agent: the mapping's host address when it
/// names one, else loopback.
pub(crate) fn probe_addr(ports: &[PortMapping], port: u16) -> SocketAddr {
    let ip = ports
        .iter()
        .find(|p| p.host == port && p.protocol == Protocol::Tcp)
        .and_then(|p| p.host_ip.as_deref())
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .filter(|ip| !ip.is_unspecified())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    SocketAddr::new(ip, port)
}

/// `GET path` over HTTP/1.0: the status code and up to 4 KiB of the response (head and
/// body start).
pub async fn http_get(addr: SocketAddr, path: &str, limit: Duration) -> Result<(u16, String), String> {
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("invalid path {path:?}"));
    }
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let head = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: gantry-agent\r\nAccept: */*\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        let mut buf = [0u8; 1024];
        while response.len() < 4096 {
            let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            response.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&response).to_string();
        let status_line = text.lines().next().unwrap_or("");
        let mut parts = status_line.split_whitespace();
        let status = match (parts.next(), parts.next()) {
            (Some(version), Some(code)) if version.starts_with("HTTP/") => code.parse::<u16>().ok(),
            _ => None,
        };
        match status {
            Some(status) => Ok((status, text)),
            None => Err(format!("not an http response: {:?}", truncate(status_line))),
        }
    };
    match tokio::time::timeout(limit, request).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {}s", limit.as_secs())),
    }
}

/// Run `command` in the container: (exit code, output).
async fn exec(docker: &Docker, container: &str, command: &[String]) -> Result<(i64, String), String> {
    use bollard::exec::StartExecResults;
    let config = ExecConfig { attach_stdout: Some(true), attach_stderr: Some(true), cmd: Some(command.to_vec()), ..Default::default() };
    let created = docker.create_exec(container, config).await.map_err(|e| format!("creating the exec failed: {e}"))?;
    let run = async {
        let mut output = String::new();
        match docker.start_exec(&created.id, None).await.map_err(|e| format!("starting the exec failed: {e}"))? {
            StartExecResults::Attached { output: mut stream, .. } => {
                while let Some(item) = stream.next().await {
                    let Ok(item) = item else { break };
                    if output.len() < 4096 {
                        output.push_str(&String::from_utf8_lossy(&item.into_bytes()));
                    }
                }
            }
            StartExecResults::Detached => {}
        }
        // The exit code can lag the end of the output stream by a moment.
        for _ in 0..20 {
            let inspect = docker.inspect_exec(&created.id).await.map_err(|e| format!("inspecting the exec failed: {e}"))?;
            if inspect.running != Some(true) {
                return Ok((inspect.exit_code.unwrap_or(-1), truncate(output.trim())));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the exec did not finish".to_string())
    };
    match tokio::time::timeout(EXEC_TIMEOUT, run).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {}s", EXEC_TIMEOUT.as_secs())),
    }
}

/// The last [`MAX_OUTPUT`] bytes of `text` (on a character boundary).
pub(crate) fn truncate(text: &str) -> String {
    if text.len() <= MAX_OUTPUT {
        return text.to_string();
    }
    let mut start = text.len() - MAX_OUTPUT;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_go_to_the_published_address() {
        let port = |host_ip: Option<&str>| PortMapping { host: 8080, container: 80, protocol: Protocol::Tcp, host_ip: host_ip.map(String::from) };
        assert_eq!(probe_addr(&[port(None)], 8080), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(probe_addr(&[port(Some("0.0.0.0"))], 8080), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(probe_addr(&[port(Some("10.1.2.3"))], 8080), "10.1.2.3:8080".parse().unwrap());
        assert_eq!(probe_addr(&[port(Some("::1"))], 8080), "[::1]:8080".parse().unwrap());
        assert_eq!(probe_addr(&[], 9000), "127.0.0.1:9000".parse().unwrap());
    }

    #[tokio::test]
    async fn http_get_reads_the_status_and_refuses_odd_paths() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let n = socket.read(&mut buf).await.unwrap();
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            socket.write_all(b"HTTP/1.0 503 Service Unavailable\r\n\r\nbusy").await.unwrap();
            request
        });
        let (status, text) = http_get(addr, "/ready", Duration::from_secs(5)).await.unwrap();
        assert_eq!(status, 503);
        assert!(text.ends_with("busy"));
        assert!(server.await.unwrap().starts_with("GET /ready HTTP/1.0\r\n"));
        assert!(http_get(addr, "/a b", Duration::from_secs(1)).await.unwrap_err().contains("invalid path"));
        assert!(http_get(addr, "/x\r\nEvil: 1", Duration::from_secs(1)).await.is_err());
        // Nothing listens any more.
        assert!(http_get(addr, "/", Duration::from_secs(2)).await.is_err());
    }

    #[test]
    fn long_output_keeps_its_end() {
        let text = format!("{}END", "é".repeat(400));
        let cut = truncate(&text);
        assert!(cut.starts_with("...") && cut.ends_with("END") && cut.len() <= MAX_OUTPUT + 3);
    }
}
