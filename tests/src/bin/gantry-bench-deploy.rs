//! `gantry-bench-deploy`: rerunnable deployment benchmarks of a real hub process on
//! loopback.
//!
//! ```text
//! gantry-bench-deploy api-to-running [--runs N (20)]
//! gantry-bench-deploy fan-out        [--agents N (100)] [--rounds R (10)] [--endpoints E (4)]
//! ```
//!
//! - `api-to-running`: one real agent process on this machine's Docker engine. Each run
//!   creates a deployment of one service (the locally built busybox image, present) through
//!   the HTTP API and measures from just before the request to the container's own
//!   `State.StartedAt`, as Docker records it; the health gate comes after and is not
//!   counted. In the same run, alternating with it, a plain `docker run -d` of the same
//!   image and command is measured the same way (from just before the command to
//!   `StartedAt`). Each deployment is deleted and its container gone before the next run.
//! - `fan-out`: N simulated agents (real enrolled identities, real mTLS QUIC sessions with
//!   heartbeats, on a few shared client endpoints) that acknowledge each deploy command
//!   the moment it arrives (an `applying` report, then `healthy`). Each round creates one
//!   deployment targeting all of them by label; per agent, the time from just before the
//!   API call to the command's arrival, and the time until the hub's own view shows every
//!   agent acknowledged.
//!
//! Prints a human summary and, as its last line, one JSON object with the figures. Build
//! in release: `cargo build --release -p gantry-tests --features bench --bins`; the hub and agent programs
//! (`gantry-e2e-hub`, `gantry-e2e-agent`) run from the same directory as this binary.
//! Everything binds loopback only, is bounded in time, and cleans up after itself.

use anyhow::{bail, Context, Result};
use gantry_agent::collector::docker::testing::{ensure_image, IMAGE};
use gantry_shared::message::{AgentMessage, DeployReport, DeployState, Heartbeat, HostFacts, HubMessage};
use gantry_tests::bench::*;
use gantry_tests::TempDir;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

const USAGE: &str = "usage:
  gantry-bench-deploy api-to-running [--runs N (20)]
  gantry-bench-deploy fan-out        [--agents N (100)] [--rounds R (10)] [--endpoints E (4)]";

/// Target: API-to-running overhead over `docker run`, as a fraction of `docker run`.
const TARGET_OVERHEAD: f64 = 0.5;
/// Target: p99 time until every agent acknowledged a fanned-out deployment, in ms.
const TARGET_FAN_OUT_P99_MS: f64 = 3000.0;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let flag = |name: &str, default: u64| -> Result<u64> {
        match rest.iter().position(|a| a == name) {
            Some(i) => rest.get(i + 1).with_context(|| format!("{name} needs a value"))?.parse().with_context(|| format!("{name} must be a number")),
            None => Ok(default),
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command.as_str() {
            "api-to-running" => api_to_running(flag("--runs", 20)? as usize).await,
            "fan-out" => fan_out(flag("--agents", 100)? as usize, flag("--rounds", 10)? as usize, flag("--endpoints", 4)?.max(1) as usize).await,
            _ => bail!("unknown command {command:?}\n{USAGE}"),
        }
    });
    match result {
        Ok(figures) => {
            println!("{figures}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn ms_quantile(values: &[f64], p: f64) -> f64 {
    let mut sorted: Vec<u32> = values.iter().map(|v| v.round().max(0.0) as u32).collect();
    sorted.sort_unstable();
    quantile(&sorted, p)
}

/// The docker CLI; stdout, or an error with stderr.
async fn docker(args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new("docker").args(args).output().await.context("running docker")?;
    anyhow::ensure!(output.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&output.stderr).trim());
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// A container's `State.StartedAt`, as Unix nanoseconds.
async fn started_at_ns(container: &str) -> Result<i128> {
    let text = docker(&["inspect", "--format", "{{.State.StartedAt}}", container]).await?;
    let at = time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339).with_context(|| format!("parsing StartedAt {text:?}"))?;
    Ok(at.unix_timestamp_nanos())
}

fn now_ns() -> i128 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos()
}

// ---------------------------------------------------------------------------------------
// api-to-running
// ---------------------------------------------------------------------------------------

async fn docker_run_once(name: &str) -> Result<f64> {
    let t0 = now_ns();
    docker(&["run", "-d", "--name", name, "--label", "gantry.bench=deploy", IMAGE, "sleep", "600"]).await?;
    let started = started_at_ns(name).await?;
    docker(&["rm", "-f", name]).await?;
    Ok((started - t0) as f64 / 1e6)
}

async fn gantry_once(hub: &HubProc, agent: &str, run: usize) -> Result<f64> {
    let spec = json!({
        "spec": {
            "name": format!("bench-{run}"),
            "services": [{ "name": "app", "image": IMAGE, "command": ["sleep", "600"], "stop_grace_secs": 1 }],
            "health_gate": { "min_healthy_secs": 1, "deadline_secs": 60 }
        },
        "targets": { "agents": [agent] }
    });
    let t0 = now_ns();
    let created = hub.post("/api/v1/orgs/bench/deployments", &spec).await?;
    let id = created["id"].as_str().context("no deployment id")?.to_string();
    let filter = format!("label=io.gantry.deployment={id}");
    let container = wait_until(Duration::from_secs(60), Duration::from_millis(5), "the deployment's container to run", || async {
        let out = docker(&["ps", "-q", "--filter", &filter, "--filter", "status=running"]).await.ok()?;
        (!out.is_empty()).then(|| out.lines().next().unwrap_or_default().to_string())
    })
    .await?;
    let started = started_at_ns(&container).await?;
    // Settle and clean up outside the timed part.
    wait_until(Duration::from_secs(60), Duration::from_millis(50), "healthy", || async {
        let view = hub.get(&format!("/api/v1/deployments/{id}")).await?;
        (view["agents"][agent]["state"] == "healthy").then_some(())
    })
    .await?;
    let (status, text) = http("DELETE", &hub.base, &format!("/api/v1/deployments/{id}"), &hub.key, None).await.context("DELETE failed")?;
    anyhow::ensure!(status == 200, "DELETE: {status} {text}");
    wait_until(Duration::from_secs(60), Duration::from_millis(50), "the container to go", || async {
        docker(&["ps", "-aq", "--filter", &filter]).await.ok().filter(|o| o.is_empty()).map(|_| ())
    })
    .await?;
    Ok((started - t0) as f64 / 1e6)
}

async fn api_to_running(runs: usize) -> Result<Value> {
    ensure_image();
    let root = TempDir::new("bench-deploy");
    let hub = HubProc::start(&root.path().join("hub")).await?;
    let token = hub.org_and_token(1).await?;
    let state = root.path().join("agent");
    let dirs = enroll_many(&token, root.path(), 1, 1).await?;
    std::fs::rename(&dirs[0], &state)?;
    let agent_id = gantry_agent::state::StateDir::new(&state).load_identity()?.agent_id;
    let config = gantry_tests::agent_config_file(root.path(), &state, &[], "[host]\nenabled = false\n[docker.logs]\nenabled = false");
    let agent = AgentProc::start(&config, &root.path().join("agent.log"), &[])?;
    wait_until(Duration::from_secs(30), Duration::from_millis(50), "the agent online", || async {
        let view = hub.get(&format!("/api/v1/agents/{agent_id}")).await?;
        (view["status"] == "online").then_some(())
    })
    .await
    .with_context(|| format!("agent log:\n{}", agent.log_text()))?;

    // One of each untimed first: image cache and code paths warm.
    docker_run_once(&format!("gantry-bench-warm-{:08x}", rand::random::<u32>())).await?;
    gantry_once(&hub, &agent_id, 0).await?;
    let mut plain = Vec::new();
    let mut gantry = Vec::new();
    for run in 1..=runs {
        let name = format!("gantry-bench-{:08x}", rand::random::<u32>());
        if run % 2 == 0 {
            plain.push(docker_run_once(&name).await?);
            gantry.push(gantry_once(&hub, &agent_id, run).await?);
        } else {
            gantry.push(gantry_once(&hub, &agent_id, run).await?);
            plain.push(docker_run_once(&name).await?);
        }
        eprintln!("  run {run}/{runs}: gantry {:.1} ms, docker run {:.1} ms", gantry[run - 1], plain[run - 1]);
    }
    agent.kill().await;
    hub.stop().await;
    let (g50, g99, d50, d99) = (median(&gantry), ms_quantile(&gantry, 0.99), median(&plain), ms_quantile(&plain, 0.99));
    let overhead = g50 / d50 - 1.0;
    eprintln!(
        "api-to-running over {runs} runs: gantry p50 {g50:.1} ms p99 {g99:.0} ms; docker run p50 {d50:.1} ms p99 {d99:.0} ms; overhead at p50 {:.0} % (target <= {:.0} %)",
        overhead * 100.0,
        TARGET_OVERHEAD * 100.0
    );
    Ok(json!({
        "bench": "api-to-running", "date": today(), "cores": cores(), "runs": runs,
        "gantry_ms": { "p50": r2(g50), "p99": g99, "all": gantry.iter().map(|v| r2(*v)).collect::<Vec<_>>() },
        "docker_run_ms": { "p50": r2(d50), "p99": d99, "all": plain.iter().map(|v| r2(*v)).collect::<Vec<_>>() },
        "overhead_p50": r3(overhead),
        "overhead_p99": r3(g99 / d99 - 1.0),
        "target_overhead": TARGET_OVERHEAD,
        "met": overhead <= TARGET_OVERHEAD,
    }))
}

// ---------------------------------------------------------------------------------------
// fan-out
// ---------------------------------------------------------------------------------------

/// When each simulated agent received each deployment's command (by deployment id).
type Arrivals = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

async fn fake_agent(
    endpoint: quinn::Endpoint,
    creds: AgentCreds,
    remote: SocketAddr,
    facts: Arc<HostFacts>,
    arrivals: Arrivals,
    ready: tokio::sync::mpsc::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let (connection, mut send, mut recv) = dial_session(&endpoint, creds.client_config()?, remote, &facts, Duration::from_secs(20)).await?;
    let _ = ready.send(()).await;
    let mut beat = tokio::time::interval(Duration::from_secs(5));
    let mut seq = 0;
    loop {
        tokio::select! {
            _ = beat.tick() => {
                seq += 1;
                send.send(&AgentMessage::Heartbeat(Heartbeat { seq, agent_clock_unix_ms: gantry_agent::wall_ms() })).await?;
            }
            message = recv.next::<HubMessage>() => match message? {
                Some(HubMessage::Deploy(command)) => {
                    let arrived = Instant::now();
                    arrivals.lock().unwrap_or_else(|p| p.into_inner()).entry(command.deployment_id.clone()).or_default().push(arrived);
                    for state in [DeployState::Applying, DeployState::Healthy] {
                        let report = DeployReport { deployment_id: command.deployment_id.clone(), revision: command.revision, state, message: "simulated".into() };
                        send.send(&AgentMessage::DeployReport(report)).await?;
                    }
                }
                Some(_) => {}
                None => bail!("the hub closed the session"),
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        }
    }
    connection.close(0u32.into(), b"bench done");
    Ok(())
}

async fn fan_out(agents: usize, rounds: usize, endpoints: usize) -> Result<Value> {
    let root = TempDir::new("bench-fanout");
    let hub = HubProc::start(&root.path().join("hub")).await?;
    hub.post("/api/v1/orgs", &json!({ "id": "bench", "agent_limit": 100_000 })).await?;
    let body = hub.post("/api/v1/orgs/bench/enrollment-tokens", &json!({ "uses": agents, "ttl": "2h", "labels": { "fleet": "bench" } })).await?;
    let token = body["token"].as_str().context("no token")?.to_string();
    let dirs = enroll_many(&token, root.path(), agents, 16).await?;
    let facts = Arc::new(gantry_agent::facts::collect());
    let arrivals: Arrivals = Arc::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(agents);
    let client_endpoints: Vec<quinn::Endpoint> =
        (0..endpoints).map(|_| quinn::Endpoint::client("127.0.0.1:0".parse().expect("loopback address"))).collect::<std::io::Result<_>>()?;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, dir) in dirs.iter().enumerate() {
        let creds = AgentCreds::load(dir)?;
        tasks.spawn(fake_agent(client_endpoints[i % endpoints].clone(), creds, hub.quic, facts.clone(), arrivals.clone(), ready_tx.clone(), stop_rx.clone()));
    }
    drop(ready_tx);
    for connected in 0..agents {
        tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await.with_context(|| format!("only {connected} of {agents} agents connected"))?;
    }
    let mut arrival_ms = Vec::new();
    let mut all_received_ms = Vec::new();
    let mut all_acknowledged_ms = Vec::new();
    for round in 1..=rounds {
        let spec = json!({
            "spec": { "name": format!("fan-{round}"), "services": [{ "name": "app", "image": "example.com/app:1" }] },
            "targets": { "selector": { "fleet": "bench" } }
        });
        let t0 = Instant::now();
        let created = hub.post("/api/v1/orgs/bench/deployments", &spec).await?;
        let id = created["id"].as_str().context("no deployment id")?.to_string();
        let acknowledged = wait_until(Duration::from_secs(60), Duration::from_millis(5), "every agent acknowledged", || async {
            let view = hub.get(&format!("/api/v1/deployments/{id}")).await?;
            let agents_view = view["agents"].as_object()?;
            (agents_view.len() == agents && agents_view.values().all(|a| a["state"] != "applying")).then(|| t0.elapsed())
        })
        .await?;
        let times: Vec<f64> =
            arrivals.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned().unwrap_or_default().iter().map(|at| (*at - t0).as_secs_f64() * 1e3).collect();
        anyhow::ensure!(times.len() == agents, "round {round}: {} of {agents} agents got the command", times.len());
        let last = times.iter().copied().fold(0.0, f64::max);
        eprintln!(
            "  round {round}/{rounds}: all {agents} received within {last:.1} ms; hub showed all acknowledged at {:.1} ms",
            acknowledged.as_secs_f64() * 1e3
        );
        all_received_ms.push(last);
        all_acknowledged_ms.push(acknowledged.as_secs_f64() * 1e3);
        arrival_ms.extend(times);
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while tasks.join_next().await.is_some() {} }).await;
    hub.stop().await;
    let p99 = ms_quantile(&arrival_ms, 0.99);
    let p99_all = ms_quantile(&all_acknowledged_ms, 0.99);
    eprintln!(
        "fan-out to {agents} agents, {rounds} rounds: per-agent arrival p50 {:.1} ms p99 {p99:.0} ms; all acknowledged (hub view) median {:.1} ms, worst {:.0} ms (target p99 <= {TARGET_FAN_OUT_P99_MS} ms)",
        median(&arrival_ms),
        median(&all_acknowledged_ms),
        all_acknowledged_ms.iter().copied().fold(0.0, f64::max)
    );
    Ok(json!({
        "bench": "fan-out", "date": today(), "cores": cores(), "agents": agents, "rounds": rounds,
        "arrival_ms": { "p50": r2(median(&arrival_ms)), "p99": p99, "max": r2(arrival_ms.iter().copied().fold(0.0, f64::max)) },
        "all_received_ms": { "median": r2(median(&all_received_ms)), "max": r2(all_received_ms.iter().copied().fold(0.0, f64::max)) },
        "all_acknowledged_ms": { "median": r2(median(&all_acknowledged_ms)), "p99": p99_all },
        "target_p99_ms": TARGET_FAN_OUT_P99_MS,
        "met": p99_all <= TARGET_FAN_OUT_P99_MS && p99 <= TARGET_FAN_OUT_P99_MS,
    }))
}
