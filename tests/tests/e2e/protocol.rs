//! Hostile and broken peers against a real hub: bad frames, no client certificate, a
//! certificate from another CA. Each such connection is closed with a clear error and the
//! hub keeps serving the agents that behave.

#![allow(clippy::unwrap_used)]

use gantry_agent::state::StateDir;
use gantry_shared::message::{AgentMessage, ErrorCode, Hello, VersionRange};
use gantry_tests::*;
use std::net::SocketAddr;
use std::time::Duration;

/// Connect with the identity in `state` (or none), returning the connection.
async fn connect(hub_quic: SocketAddr, ca_sha256: [u8; 32], identity: Option<&StateDir>) -> Result<quinn::Connection, quinn::ConnectionError> {
    let credentials = identity.map(|s| s.load_credentials().unwrap());
    let (config, _) = gantry_agent::tls::client_config(ca_sha256, credentials).unwrap();
    let endpoint = gantry_agent::connection::client_endpoint(hub_quic).unwrap();
    endpoint.connect_with(config, hub_quic, gantry_shared::HUB_SERVER_NAME).unwrap().await
}

async fn close_code(connection: &quinn::Connection) -> (Option<ErrorCode>, String) {
    let error = tokio::time::timeout(Duration::from_secs(10), connection.closed()).await.expect("hub did not close the connection");
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => {
            (u32::try_from(close.error_code.into_inner()).ok().and_then(ErrorCode::from_u32), String::from_utf8_lossy(&close.reason).into_owned())
        }
        other => (None, other.to_string()),
    }
}

fn hello_frame() -> Vec<u8> {
    let hello = AgentMessage::Hello(Hello { versions: VersionRange::CURRENT, facts: Default::default(), agent_clock_unix_ms: 0 });
    gantry_shared::frame::encode_to_vec(&hello, 1 << 20).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_frames_close_only_the_offending_connection() {
    let dir = TempDir::new("frames");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 10).await;
    let token = hub.token("acme", 2, "10m").await;
    let good_state = dir.path().join("good");
    let good_id = enroll(&token, &good_state).await.unwrap();
    let good = InProcessAgent::start(&good_state);
    hub.wait_status(&good_id, "online", Duration::from_secs(10)).await;
    let bad_state = StateDir::new(dir.path().join("bad"));
    enroll(&token, &bad_state.dir).await.unwrap();
    let ca = hub.hub.pki.ca_sha256();

    let mut trailing = hello_frame();
    let len = u32::from_be_bytes(trailing[..4].try_into().unwrap()) + 1;
    trailing[..4].copy_from_slice(&len.to_be_bytes());
    trailing.push(0);
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("oversized length prefix", u32::MAX.to_be_bytes().to_vec(), false),
        ("length over the 1 MiB cap", ((1u32 << 20) + 1).to_be_bytes().to_vec(), false),
        ("garbage bytes", [&8u32.to_be_bytes()[..], &[0xff; 8]].concat(), false),
        ("truncated frame", [&100u32.to_be_bytes()[..], &[1u8; 10]].concat(), true),
        ("trailing bytes", trailing, false),
        (
            "heartbeat before hello",
            gantry_shared::frame::encode_to_vec(&AgentMessage::Heartbeat(gantry_shared::message::Heartbeat { seq: 1, agent_clock_unix_ms: 0 }), 1 << 20)
                .unwrap(),
            false,
        ),
    ];
    for (name, bytes, finish) in cases {
        let connection = connect(hub.quic, ca, Some(&bad_state)).await.expect("handshake");
        let (mut send, _recv) = connection.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        if finish {
            send.finish().unwrap();
        }
        let (code, reason) = close_code(&connection).await;
        assert_eq!(code, Some(ErrorCode::Protocol), "{name}: closed with {reason}");
        assert!(!reason.is_empty(), "{name}: the close carries a reason");
        eprintln!("{name}: {reason}");
    }
    // The well-behaved agent never noticed, and the hub still takes new sessions.
    let agent = hub.agent(&good_id).await;
    assert_eq!(agent["status"], "online");
    let bad_id = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(bad_state.identity_path()).unwrap()).unwrap()["agent_id"]
        .as_str()
        .unwrap()
        .to_string();
    let recovered = InProcessAgent::start(&bad_state.dir);
    hub.wait_status(&bad_id, "online", Duration::from_secs(10)).await;
    let (_, _, metrics) = hub.api().anonymous().send("GET", "/metrics", None, vec![]).await;
    assert!(metrics.lines().any(|l| l == "gantry_protocol_errors_total 6"), "{metrics}");
    recovered.stop().await.unwrap();
    good.stop().await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_need_a_certificate_from_this_hub() {
    let dir = TempDir::new("certs");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    let ca = hub.hub.pki.ca_sha256();

    // No client certificate: only enrollment is allowed.
    let connection = connect(hub.quic, ca, None).await.expect("handshake without a certificate is allowed");
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    send.write_all(&hello_frame()).await.unwrap();
    let (code, reason) = close_code(&connection).await;
    assert_eq!(code, Some(ErrorCode::Unauthenticated), "{reason}");
    assert!(reason.contains("client certificate required"), "{reason}");

    // Garbage on an enrollment connection is a protocol error.
    let connection = connect(hub.quic, ca, None).await.unwrap();
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 4, 9, 9, 9, 9]).await.unwrap();
    assert_eq!(close_code(&connection).await.0, Some(ErrorCode::Protocol));

    // A certificate from another CA fails the TLS handshake.
    let other = TempDir::new("other-ca");
    let other_hub = TestHub::start(other.path(), |_| {}).await;
    other_hub.create_org("acme", 5).await;
    let foreign_token = other_hub.token("acme", 1, "10m").await;
    let foreign = StateDir::new(dir.path().join("foreign"));
    enroll(&foreign_token, &foreign.dir).await.unwrap();
    let result = connect(hub.quic, ca, Some(&foreign)).await;
    let error = match result {
        Err(error) => error.to_string(),
        // TLS 1.3 clients may finish before the server checks their certificate; the
        // server's refusal then arrives as the close.
        Ok(connection) => close_code(&connection).await.1,
    };
    assert!(error.to_lowercase().contains("certificate") || error.contains("UnknownCA") || error.contains("unknown"), "{error}");
    eprintln!("foreign certificate: {error}");

    // Running an agent enrolled elsewhere against this hub ends with a clear message.
    let mut identity = foreign.load_identity().unwrap();
    identity.hub_addr = hub.quic.to_string();
    foreign.save_identity(&identity).unwrap();
    let (code, _, stderr) = agent_cli(&["run", "--state-dir", foreign.dir.to_str().unwrap()]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("fingerprint mismatch"), "{stderr}");

    let (_, _, metrics) = hub.api().anonymous().send("GET", "/metrics", None, vec![]).await;
    assert!(metrics.contains("gantry_quic_handshakes_failed_total"), "{metrics}");
    other_hub.stop().await;
    hub.stop().await;
}

/// Batches that arrive together, including a resend overlapping what was already sent, are
/// stored exactly once each and acknowledged up to the highest seq: the hub may merge
/// batches it has already received into one write and one ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_arriving_together_are_stored_once_and_acked_to_the_last() {
    use gantry_shared::message::StreamClass;
    use gantry_shared::telemetry::{Batch, LogLine, LogStream, Record, RecordBody, StreamDown, StreamUp};
    let dir = TempDir::new("coalesce");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 10).await;
    let token = hub.token("acme", 1, "10m").await;
    let state = StateDir::new(dir.path().join("agent"));
    let id = enroll(&token, &state.dir).await.unwrap();
    let connection = connect(hub.quic, hub.hub.pki.ca_sha256(), Some(&state)).await.expect("handshake");
    let (mut control, mut control_recv) = connection.open_bi().await.unwrap();
    control.write_all(&hello_frame()).await.unwrap();
    let mut welcome = [0u8; 4];
    control_recv.read_exact(&mut welcome).await.expect("the hub answers hello");
    hub.wait_status(&id, "online", Duration::from_secs(10)).await;

    let (send, recv) = connection.open_bi().await.unwrap();
    let mut send = gantry_agent::wire::FramedSend::new(send, 1 << 20);
    let mut recv = gantry_agent::wire::FramedRecv::new(recv, 1 << 20);
    send.send(&StreamUp::Open { class: StreamClass::Logs }).await.unwrap();
    let first = recv.next::<StreamDown>().await.unwrap();
    assert!(matches!(first, Some(StreamDown::Ack(ref ack)) if ack.up_to_seq == 0), "{first:?}");
    let record = |seq: u64| Record {
        seq,
        ts_unix_ms: 1_700_000_000_000 + seq as i64,
        body: RecordBody::Log(LogLine { source: "/var/log/app.log".into(), stream: LogStream::File, container: None, line: format!("line-{:08}", seq - 1) }),
    };
    let batch = |seqs: std::ops::RangeInclusive<u64>| {
        gantry_shared::frame::encode_to_vec(&StreamUp::Batch(Batch { records: seqs.map(record).collect() }), 1 << 20).unwrap()
    };
    // Five batches in one write, the fourth resending part of the second and third.
    let bytes = [batch(1..=10), batch(11..=20), batch(21..=30), batch(15..=35), batch(36..=40)].concat();
    send.send_raw(&bytes).await.unwrap();
    let acked = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match recv.next::<StreamDown>().await.unwrap() {
                Some(StreamDown::Ack(ack)) if ack.up_to_seq == 40 => return ack.up_to_seq,
                Some(StreamDown::Ack(ack)) => assert!(ack.up_to_seq < 40, "ack beyond what was sent: {ack:?}"),
                other => panic!("unexpected reply {other:?}"),
            }
        }
    })
    .await
    .expect("acknowledged up to the last seq");
    assert_eq!(acked, 40);
    let records = hub.api().all_records(&format!("/api/v1/agents/{id}/logs"), "").await;
    assert_lines_exactly_once(&records, 40);
    let (_, _, metrics) = hub.api().anonymous().send("GET", "/metrics", None, vec![]).await;
    assert!(
        metrics.lines().any(|l| l.starts_with("gantry_ingest_duplicates_total{class=\"logs\"} 16")),
        "the sixteen resent records (15-30) are counted as duplicates:\n{metrics}"
    );
    connection.close(0u32.into(), b"done");
    hub.stop().await;
}
