//! Renewing the hub CA without re-enrolling agents, end to end with a real hub, real agents
//! over QUIC and the real `gantry-hub rotate-ca` program: a next CA is staged and agents
//! learn it as they connect; after promotion the hub presents a certificate from the new CA
//! and agents enrolled under the old one reconnect on their own; new tokens pin the new CA;
//! after the old CA is retired, an agent that slept through the whole overlap stops with a
//! message that says what happened and what to do. Steps refused for bad input change
//! nothing. Agents speaking protocol version 1 are never sent the new message.

#![allow(clippy::unwrap_used)]

use gantry_agent::state::StateDir;
use gantry_agent::wire::{FramedRecv, FramedSend};
use gantry_shared::message::{AgentMessage, Heartbeat, Hello, HubMessage, TrustedCas, VersionRange};
use gantry_tests::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Agent certificates live this long on the hub under test, so a connected agent renews
/// within the test (at about two thirds of it) and shows which CA signs renewals.
const SHORT_CERT_SECS: u64 = 40;

/// Run `gantry-hub ARGS`; exit code, stdout, stderr.
async fn hub_cli(args: &[&str]) -> (i32, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(hub_binary()).args(args).env("GANTRY_LOG", "error").stdin(std::process::Stdio::null()).output(),
    )
    .await
    .expect("gantry-hub timed out")
    .expect("run gantry-hub");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// `(role, sha256)` of every CA `GET /api/v1/hub/ca` lists.
async fn cas(hub: &TestHub) -> Vec<(String, String)> {
    let (status, body) = hub.api().get("/api/v1/hub/ca").await;
    assert_eq!(status, 200, "{body}");
    body["cas"].as_array().unwrap().iter().map(|ca| (ca["role"].as_str().unwrap().to_string(), ca["sha256"].as_str().unwrap().to_string())).collect()
}

/// SHA-256 (hex) of the CA that signed the agent's certificate (the last one in agent.crt).
fn signer_of(state_dir: &Path) -> String {
    let (chain, _) = StateDir::new(state_dir).load_credentials().unwrap();
    gantry_agent::tls::fingerprint_hex(chain.last().unwrap())
}

/// Every CA fingerprint the agent pins.
fn pins_of(state_dir: &Path) -> Vec<String> {
    let identity = StateDir::new(state_dir).load_identity().unwrap();
    let mut pins = vec![identity.ca_sha256];
    pins.extend(identity.extra_ca_sha256);
    pins
}

fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.join("pki"))
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

fn short_certs(config: &mut gantry_hub::config::Config) {
    config.agent_cert_lifetime_secs = SHORT_CERT_SECS;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_follow_a_ca_rotation_without_re_enrolling() {
    let dir = TempDir::new("ca-rollover");
    let data = dir.path().join("hub");
    let data_arg = data.to_str().unwrap();
    let (sleeper_state, live_state, overlap_state, fresh_state) =
        (dir.path().join("sleeper"), dir.path().join("live"), dir.path().join("overlap"), dir.path().join("fresh"));

    // The sleeper enrolls with a long-lived certificate and then stays offline through the
    // whole overlap.
    let hub = TestHub::start(&data, |_| {}).await;
    let (http, quic) = (hub.http, hub.quic);
    hub.create_org("acme", 10).await;
    let listed = cas(&hub).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(hub.api().anonymous().get("/api/v1/hub/ca").await.0, 401, "operators only");
    let (role, ca1) = listed[0].clone();
    assert_eq!(role, "current");
    let old_token = hub.token("acme", 3, "1h").await;
    let sleeper = enroll(&old_token, &sleeper_state).await.unwrap();
    hub.stop().await;

    // From here on agent certificates are short-lived, so the live agent renews during the test.
    let hub = TestHub::start_at(&data, http, quic, short_certs).await;
    let live = enroll(&old_token, &live_state).await.unwrap();
    let live_agent = InProcessAgent::start(&live_state);
    hub.wait_status(&live, "online", Duration::from_secs(20)).await;
    assert_eq!(signer_of(&live_state), ca1);
    hub.stop().await;

    // Bad input: promoting with nothing staged is refused and changes nothing.
    let before = listing(&data);
    let (code, out, err) = hub_cli(&["rotate-ca", "--data", data_arg, "--promote"]).await;
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("no next CA is staged") && err.contains("nothing changed"), "{err}");
    let (code, _, err) = hub_cli(&["rotate-ca", "--data", data_arg, "--retire-old"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("no retiring CA") && err.contains("nothing changed"), "{err}");
    assert_eq!(listing(&data), before, "a refused step changed DATA/pki");

    // Stage the next CA.
    let (code, out, err) = hub_cli(&["rotate-ca", "--data", data_arg]).await;
    assert_eq!(code, 0, "{out}{err}");
    let ca2 = out.split_whitespace().skip_while(|w| *w != "CA").nth(1).unwrap().trim_end_matches(';').to_string();
    assert_eq!(ca2.len(), 64, "{out}");
    assert_ne!(ca2, ca1);
    assert!(out.contains(&format!("next      {ca2}")) && out.contains(&format!("current   {ca1}")), "{out}");
    let (code, _, err) = hub_cli(&["rotate-ca", "--data", data_arg]).await;
    assert_ne!(code, 0);
    assert!(err.contains("staged already") && err.contains("nothing changed"), "{err}");

    let hub = TestHub::start_at(&data, http, quic, short_certs).await;
    assert_eq!(cas(&hub).await, vec![("current".to_string(), ca1.clone()), ("next".to_string(), ca2.clone())]);
    // The connected agent learns the next CA from the hub, and its next renewal is signed by it.
    wait_for(Duration::from_secs(30), "the live agent to pin the next CA", || async { pins_of(&live_state).contains(&ca2).then_some(()) }).await;
    wait_for(Duration::from_secs(3 * SHORT_CERT_SECS), "a renewal signed by the next CA", || async { (signer_of(&live_state) == ca2).then_some(()) }).await;
    hub.wait_status(&live, "online", Duration::from_secs(20)).await;
    // A token made during the overlap still pins the current CA; the agent it enrolls gets a
    // certificate from the next CA and pins both at once.
    let overlap_token = hub.token("acme", 1, "1h").await;
    assert_eq!(gantry_shared::token::EnrollmentToken::parse(&overlap_token).unwrap().ca_fingerprint_hex(), ca1);
    enroll(&overlap_token, &overlap_state).await.unwrap();
    assert_eq!(signer_of(&overlap_state), ca2);
    assert!(pins_of(&overlap_state).contains(&ca1) && pins_of(&overlap_state).contains(&ca2));
    hub.stop().await;

    // Promote: the hub's server certificate now comes from the new CA.
    let (code, out, err) = hub_cli(&["rotate-ca", "--data", data_arg, "--promote"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("current   {ca2}")) && out.contains(&format!("retiring  {ca1}")), "{out}");
    let hub = TestHub::start_at(&data, http, quic, short_certs).await;
    assert_eq!(cas(&hub).await, vec![("current".to_string(), ca2.clone()), ("retiring".to_string(), ca1.clone())]);
    let server_chain = gantry_hub::pki::pem_certs(&std::fs::read_to_string(data.join("pki").join("server.crt")).unwrap()).unwrap();
    assert_eq!(gantry_agent::tls::fingerprint_hex(&server_chain[1]), ca2, "server certificate reissued by the new CA");
    // The live agent reconnects on its own, as the same agent.
    let agent = hub.wait_status(&live, "online", Duration::from_secs(30)).await;
    assert_eq!(agent["id"], Value::String(live.clone()));
    assert_eq!(StateDir::new(&live_state).load_identity().unwrap().agent_id, live);
    // A new token pins the new CA, and a fresh machine enrolls with it.
    let new_token = hub.token("acme", 1, "1h").await;
    assert_eq!(gantry_shared::token::EnrollmentToken::parse(&new_token).unwrap().ca_fingerprint_hex(), ca2);
    let fresh = enroll(&new_token, &fresh_state).await.unwrap();
    let fresh_agent = InProcessAgent::start(&fresh_state);
    hub.wait_status(&fresh, "online", Duration::from_secs(20)).await;
    assert_eq!(pins_of(&fresh_state), vec![ca2.clone()]);
    // Another promotion is refused while the replaced CA is still trusted.
    let before = listing(&data);
    let (code, _, err) = hub_cli(&["rotate-ca", "--data", data_arg, "--promote"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("no next CA is staged"), "{err}");
    assert_eq!(listing(&data), before);
    hub.stop().await;

    // Retire the old CA: the live agent (renewed under the new CA) keeps connecting.
    let (code, out, err) = hub_cli(&["rotate-ca", "--data", data_arg, "--retire-old"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("retired CA {ca1}")) && !out.contains("retiring"), "{out}");
    let hub = TestHub::start_at(&data, http, quic, short_certs).await;
    assert_eq!(cas(&hub).await, vec![("current".to_string(), ca2.clone())]);
    hub.wait_status(&live, "online", Duration::from_secs(30)).await;
    hub.wait_status(&fresh, "online", Duration::from_secs(30)).await;

    // The sleeper pinned only the old CA: it stops at once with a message naming the cause
    // and the fix, rather than retrying forever.
    assert_eq!(pins_of(&sleeper_state), vec![ca1.clone()]);
    let started = std::time::Instant::now();
    let (code, out, err) = agent_cli(&["run", "--state-dir", sleeper_state.to_str().unwrap()]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("CA fingerprint mismatch") && err.contains("renewed while this agent was offline") && err.contains("re-enroll"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    let agent = hub.agent(&sleeper).await;
    assert_eq!(agent["status"], "offline", "{agent}");

    live_agent.stop().await.unwrap();
    fresh_agent.stop().await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn rotate_ca_needs_an_initialised_hub() {
    let dir = TempDir::new("ca-rollover-empty");
    let (code, out, err) = hub_cli(&["rotate-ca", "--data", dir.path().to_str().unwrap()]).await;
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("holds no hub CA") && err.contains("gantry-hub init"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing was written");
}

/// The next message from the hub, within 10 s.
async fn next(recv: &mut FramedRecv) -> HubMessage {
    tokio::time::timeout(Duration::from_secs(10), recv.next::<HubMessage>()).await.expect("hub went quiet").unwrap().expect("stream ended")
}

/// Messages the hub sends on a fresh session speaking `versions`, up to the answer to one
/// heartbeat; the negotiated version first.
async fn session_messages(hub: &TestHub, state: &StateDir, versions: VersionRange) -> (u16, Vec<HubMessage>) {
    let (config, _) = gantry_agent::tls::client_config(hub.hub.pki.ca_sha256(), Some(state.load_credentials().unwrap())).unwrap();
    let endpoint = gantry_agent::connection::client_endpoint(hub.quic).unwrap();
    let connection = endpoint.connect_with(config, hub.quic, gantry_shared::HUB_SERVER_NAME).unwrap().await.unwrap();
    let (send, recv) = connection.open_bi().await.unwrap();
    let (mut send, mut recv) = (FramedSend::new(send, 1 << 20), FramedRecv::new(recv, 1 << 20));
    send.send(&AgentMessage::Hello(Hello { versions, facts: Default::default(), agent_clock_unix_ms: gantry_agent::wall_ms() })).await.unwrap();
    let HubMessage::Welcome(welcome) = next(&mut recv).await else { panic!("no welcome first") };
    send.send(&AgentMessage::Heartbeat(Heartbeat { seq: 1, agent_clock_unix_ms: gantry_agent::wall_ms() })).await.unwrap();
    let mut messages = Vec::new();
    loop {
        match next(&mut recv).await {
            HubMessage::HeartbeatAck(_) => break,
            other => messages.push(other),
        }
    }
    connection.close(0u32.into(), b"done");
    (welcome.version, messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_agents_speaking_version_2_are_told_the_trusted_cas() {
    let dir = TempDir::new("ca-rollover-versions");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 10).await;
    let token = hub.token("acme", 1, "1h").await;
    let state = StateDir::new(dir.path().join("agent"));
    enroll(&token, &state.dir).await.unwrap();
    let ca = hub.hub.pki.ca_fingerprint_hex();

    // A version 1 agent could not decode the message, so it never gets one.
    let (version, messages) = session_messages(&hub, &state, VersionRange { min: 1, max: 1 }).await;
    assert_eq!(version, 1);
    assert!(!messages.iter().any(|m| matches!(m, HubMessage::TrustedCas(_))), "{messages:?}");

    // Version 2 and every later one get it.
    for max in gantry_shared::TRUSTED_CAS_VERSION..=gantry_shared::PROTOCOL_VERSION_MAX {
        let (version, messages) = session_messages(&hub, &state, VersionRange { min: 1, max }).await;
        assert_eq!(version, max);
        let trusted: Vec<&TrustedCas> = messages.iter().filter_map(|m| if let HubMessage::TrustedCas(t) = m { Some(t) } else { None }).collect();
        assert_eq!(trusted, vec![&TrustedCas { ca_sha256: vec![ca.clone()] }], "version {max}: {messages:?}");
    }
    hub.stop().await;
}
