//! Docker telemetry end to end: an agent process on the real Docker engine reports its
//! containers, their stats and events, and their stdout/stderr, and the hub serves them.
//! Images are built locally from Debian's busybox-static; nothing is pulled.

#![allow(clippy::unwrap_used)]

use gantry_agent::collector::docker::testing::{docker, unique, Container};
use gantry_tests::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_logs_stats_and_events_reach_the_hub() {
    if docker().await.is_none() {
        return;
    }
    let dir = TempDir::new("docker");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 1, "10m").await;
    let state = dir.path().join("agent");
    let id = enroll(&token, &state).await.unwrap();
    let name = unique("e2e");
    let config = agent_config_file(
        dir.path(),
        &state,
        &[],
        &format!("[host]\nenabled = false\n[docker]\ninterval_secs = 1\n[docker.logs]\ncontainers = [{name:?}]\npoll_ms = 50\ndiscover_ms = 200"),
    );
    let mut agent = AgentProcess::start_with_config(&config, &state);
    let api = hub.api();
    // The container starts after the agent: a fresh agent reads containers from its first
    // start on (older output is not its to collect), and every later container in full.
    hub.wait_status(&id, "online", Duration::from_secs(30)).await;
    let container =
        Container::run(&name, "i=0; while [ $i -lt 200 ]; do echo out-$i; echo err-$i >&2; i=$((i+1)); done; sleep 300", &["--label", "gantry.test=e2e"]);

    // Both streams, every line once, from the container's source.
    let lines = wait_for(Duration::from_secs(60), "400 container lines at the hub", || async {
        let records = api.all_records(&format!("/api/v1/agents/{id}/logs"), &format!("&container={name}")).await;
        (records.len() >= 400).then_some(records)
    })
    .await;
    assert_eq!(lines.len(), 400, "no duplicates");
    let stdout = lines.iter().filter(|r| r["stream"] == "stdout").count();
    let stderr = lines.iter().filter(|r| r["stream"] == "stderr").count();
    assert_eq!((stdout, stderr), (200, 200));
    assert!(lines.iter().all(|r| r["source"] == format!("container:{name}")), "{}", lines[0]);

    // Stats per container.
    wait_for(Duration::from_secs(60), "container cpu samples", || async {
        let (_, body) = api.get(&format!("/api/v1/agents/{id}/metrics?name=docker.container.memory_usage_bytes&from=0")).await;
        let series = body["series"].as_array()?.clone();
        series.iter().any(|s| s["labels"]["name"] == name.as_str()).then_some(())
    })
    .await;

    // Kill it: a die event with the exit code, while the agent is down (resumed on restart).
    agent.kill9().await;
    gantry_agent::collector::docker::testing::cli(&["kill", &container.name]);
    let _agent = AgentProcess::start_with_config(&config, &state);
    let events = wait_for(Duration::from_secs(60), "a die event", || async {
        let events = api.all_records(&format!("/api/v1/agents/{id}/events"), "&kind=docker.container.").await;
        events.iter().any(|e| e["event"] == "docker.container.die" && e["attributes"]["name"] == name.as_str()).then_some(events)
    })
    .await;
    let die = events.iter().find(|e| e["event"] == "docker.container.die" && e["attributes"]["name"] == name.as_str()).unwrap();
    assert_eq!(die["attributes"]["exit_code"], "137", "{die}");
    assert_eq!(die["severity"], "warning");
    hub.stop().await;
}
