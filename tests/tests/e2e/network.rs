//! Network faults and load limits on loopback: a partition between agent and hub, the
//! connection cap, and address validation (QUIC Retry) under load.

#![allow(clippy::unwrap_used)]

use gantry_tests::*;
use std::time::{Duration, Instant};

async fn metric(hub: &TestHub, name: &str) -> u64 {
    let (_, _, text) = hub.api().anonymous().send("GET", "/metrics", None, vec![]).await;
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} ")).map(|v| v.parse().unwrap())).unwrap_or_else(|| panic!("metric {name} missing"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_returns_on_its_own_after_a_network_partition() {
    let dir = TempDir::new("partition");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 1, "10m").await;
    let state = dir.path().join("agent");
    let id = enroll(&token, &state).await.unwrap();
    let relay = Partition::start(hub.quic).await;
    let config = gantry_agent::config::Config { state_dir: state.clone(), hub_addr: Some(relay.addr.to_string()), ..gantry_agent::config::Config::default() };
    let agent = InProcessAgent::start_with(config);
    hub.wait_status(&id, "online", Duration::from_secs(10)).await;

    // Cable cut: the hub shows the agent offline within 30 s.
    relay.cut();
    let cut_at = Instant::now();
    hub.wait_status(&id, "offline", Duration::from_secs(30)).await;
    eprintln!("offline {:?} after the cut", cut_at.elapsed());
    // Keep the path down a while longer so the agent is deep in its reconnect loop.
    wait_for(Duration::from_secs(30), "agent retrying", || async { (cut_at.elapsed() > Duration::from_secs(20)).then_some(()) }).await;

    relay.heal();
    let healed_at = Instant::now();
    // Backoff is capped at 3 s and a stale attempt is abandoned after 5 s, so the agent is
    // back within 5 s of the path returning.
    hub.wait_status(&id, "online", Duration::from_secs(5)).await;
    eprintln!("online {:?} after the path returned", healed_at.elapsed());
    agent.stop().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_refuses_extra_agents_until_a_slot_frees() {
    let dir = TempDir::new("cap");
    let hub = TestHub::start(&dir.path().join("hub"), |c| c.quic.max_connections = 1).await;
    hub.create_org("acme", 5).await;
    // Enroll both while no session holds the single slot.
    let token = hub.token("acme", 2, "10m").await;
    let (first_state, second_state) = (dir.path().join("first"), dir.path().join("second"));
    let first_id = enroll(&token, &first_state).await.unwrap();
    let second_id = enroll(&token, &second_state).await.unwrap();

    let first = InProcessAgent::start(&first_state);
    hub.wait_status(&first_id, "online", Duration::from_secs(10)).await;
    let second = InProcessAgent::start(&second_state);
    wait_for(Duration::from_secs(10), "a refused connection", || async { (metric(&hub, "gantry_quic_connections_refused_total").await > 0).then_some(()) })
        .await;
    assert_eq!(hub.agent(&second_id).await["status"], "offline");

    // When the first leaves, the second gets in by itself.
    first.stop().await.unwrap();
    hub.wait_status(&second_id, "online", Duration::from_secs(15)).await;
    second.stop().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_validation_under_load_still_lets_agents_in() {
    let dir = TempDir::new("retry");
    // Treat every connection as "under load": each new client must answer a Retry first.
    let hub = TestHub::start(&dir.path().join("hub"), |c| c.quic.retry_above_incoming = 0).await;
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 1, "10m").await;
    let state = dir.path().join("agent");
    let id = enroll(&token, &state).await.unwrap();
    let agent = InProcessAgent::start(&state);
    hub.wait_status(&id, "online", Duration::from_secs(10)).await;
    assert!(metric(&hub, "gantry_quic_retries_total").await >= 2, "enrollment and session both passed a Retry");
    agent.stop().await.unwrap();
    hub.stop().await;
}
