//! Agent connections: the QUIC accept loop, enrollment connections, and authenticated
//! sessions driven by `gantry_shared::session::HubSession`.
//!
//! A connection without a client certificate may only enroll. A connection with one is an
//! agent session: its identity comes from the certificate alone, it is refused if the agent
//! is unknown or revoked, and a newer connection of the same agent supersedes it. One
//! misbehaving connection is closed with a protocol error; the others carry on.

use crate::metrics::Metrics;
use crate::registry::{LiveInfo, SessionCommand};
use crate::Hub;
use gantry_agent::wire::{FramedRecv, FramedSend, WireError};
use gantry_shared::message::{AgentMessage, ErrorCode, HubMessage, ProtocolError, Renewed};
use gantry_shared::session::{HubEvent, HubSession, SessionConfig};
use rustls::pki_types::CertificateDer;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn, Instrument};

/// How long a peer has to open its control stream and send its first message.
pub const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Store writes of `last_seen` are at most this frequent per agent; the registry holds the
/// live value in between.
pub const LAST_SEEN_PERSIST_INTERVAL: Duration = Duration::from_secs(30);
/// Time given to a drained agent to read the drain before the connection is closed.
pub const DRAIN_GRACE: Duration = Duration::from_millis(500);

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Accept connections until `shutdown` turns true.
pub async fn accept_loop(hub: Arc<Hub>, endpoint: quinn::Endpoint, mut shutdown: watch::Receiver<bool>) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let Some(incoming) = incoming else { break };
        if endpoint.open_connections() >= hub.config.quic.max_connections {
            Metrics::inc(&hub.metrics.quic_connections_refused);
            incoming.refuse();
            continue;
        }
        // Under a flood of handshakes, make new clients prove their address first so a
        // spoofed-source flood cannot make the hub do handshake work. Only handshakes in
        // progress count: established sessions are not load of this kind.
        if hub.handshakes_in_flight.load(Ordering::Relaxed) >= hub.config.quic.retry_above_incoming
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            Metrics::inc(&hub.metrics.quic_retries_sent);
            let _ = incoming.retry();
            continue;
        }
        let hub = hub.clone();
        hub.handshakes_in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = QuicTask::enter(&hub);
        tokio::spawn(async move {
            handle_incoming(hub, incoming).await;
            drop(guard);
        });
    }
}

/// Counts a task that holds QUIC handles (and so keeps the endpoint's socket open).
struct QuicTask(Arc<Hub>);

impl QuicTask {
    fn enter(hub: &Arc<Hub>) -> QuicTask {
        hub.quic_tasks.fetch_add(1, Ordering::Relaxed);
        QuicTask(hub.clone())
    }
}

impl Drop for QuicTask {
    fn drop(&mut self) {
        self.0.quic_tasks.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle_incoming(hub: Arc<Hub>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let handshake = incoming.await;
    hub.handshakes_in_flight.fetch_sub(1, Ordering::Relaxed);
    let connection = match handshake {
        Ok(connection) => connection,
        Err(error) => {
            Metrics::inc(&hub.metrics.quic_handshakes_failed);
            debug!(%remote, %error, "handshake failed");
            return;
        }
    };
    Metrics::inc(&hub.metrics.quic_connections_accepted);
    let leaf = connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|c| c.to_vec()));
    match leaf {
        None => enrollment(hub, connection).instrument(tracing::info_span!("enrollment", %remote)).await,
        Some(cert) => match crate::pki::agent_identity(&cert) {
            Some(identity) => {
                let span = tracing::info_span!("session", agent_id = %identity.agent_id, org = %identity.org, %remote);
                session(hub, connection, identity).instrument(span).await
            }
            None => {
                Metrics::inc(&hub.metrics.sessions_refused);
                close(&connection, ErrorCode::Unauthenticated, "client certificate names no agent");
            }
        },
    }
}

fn close(connection: &quinn::Connection, code: ErrorCode, reason: &str) {
    connection.close(code.as_u32().into(), reason.as_bytes());
}

fn protocol_error(hub: &Hub, connection: &quinn::Connection, error: &WireError) {
    Metrics::inc(&hub.metrics.protocol_errors);
    warn!(%error, "closing connection for a protocol error");
    close(connection, ErrorCode::Protocol, &error.to_string());
}

async fn enrollment(hub: Arc<Hub>, connection: quinn::Connection) {
    let max_frame = hub.config.max_frame_bytes;
    let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, async {
        let (send, recv) = connection.accept_bi().await.ok()?;
        let mut recv = FramedRecv::new(recv, max_frame);
        Some((FramedSend::new(send, max_frame), recv.next::<AgentMessage>().await))
    })
    .await;
    let (mut send, message) = match first {
        Ok(Some(pair)) => pair,
        _ => {
            close(&connection, ErrorCode::Timeout, "no enrollment request received");
            return;
        }
    };
    let request = match message {
        Ok(Some(AgentMessage::Enroll(request))) => request,
        Ok(Some(_)) => {
            Metrics::inc(&hub.metrics.sessions_refused);
            close(&connection, ErrorCode::Unauthenticated, "client certificate required: enroll first");
            return;
        }
        Ok(None) => return,
        Err(error) => return protocol_error(&hub, &connection, &error),
    };
    let worker = hub.clone();
    let outcome = tokio::task::spawn_blocking(move || crate::enroll::enroll(&worker, &request)).await;
    let reply = match outcome {
        Ok(Ok(enrolled)) => HubMessage::Enrolled(enrolled),
        Ok(Err(refusal)) => HubMessage::EnrollRefused(refusal),
        Err(_) => HubMessage::EnrollRefused(gantry_shared::message::EnrollRefusal::Internal),
    };
    if send.send(&reply).await.is_ok() && send.finish().is_ok() {
        // The agent closes once it has read the reply; don't cut it off before that.
        let _ = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, connection.closed()).await;
    }
    close(&connection, ErrorCode::Normal, "enrollment done");
}

async fn session(hub: Arc<Hub>, connection: quinn::Connection, identity: crate::pki::AgentIdentity) {
    let agent_id = identity.agent_id.clone();
    let record = match hub.store.agent(&agent_id) {
        Ok(record) => record,
        Err(error) => {
            warn!(%error, "store error looking up agent");
            return close(&connection, ErrorCode::Internal, "hub store unavailable");
        }
    };
    let refusal = match &record {
        None => Some((ErrorCode::Unauthenticated, "agent is not enrolled on this hub")),
        Some(r) if r.org != identity.org => Some((ErrorCode::Unauthenticated, "certificate does not match the agent's org")),
        Some(r) if r.revoked_at_ms.is_some() => Some((ErrorCode::Revoked, "agent was revoked by an operator; re-enroll it")),
        Some(_) => None,
    };
    if let Some((code, reason)) = refusal {
        Metrics::inc(&hub.metrics.sessions_refused);
        info!(reason, "session refused");
        return close(&connection, code, reason);
    }

    let max_frame = hub.config.max_frame_bytes;
    let (send, recv) = match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, connection.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        _ => return close(&connection, ErrorCode::Timeout, "no control stream opened"),
    };
    let mut send = FramedSend::new(send, max_frame);
    let mut recv = FramedRecv::new(recv, max_frame);
    let session_config = SessionConfig {
        heartbeat_interval: Duration::from_secs(hub.config.heartbeat_interval_secs),
        liveness_timeout: Duration::from_secs(hub.config.liveness_timeout_secs),
    };
    let mut session = HubSession::new(session_config, hub.now(), agent_id.clone(), identity.org.clone());
    let conn_id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    let (commands_tx, mut commands) = mpsc::channel(256);
    let mut registered = false;
    let mut last_persist = hub.now();
    let mut drain_deadline: Option<tokio::time::Instant> = None;

    let end: Result<(), (ErrorCode, String)> = loop {
        while let Some(message) = session.poll_transmit() {
            if let Err(error) = send.send(&message).await {
                debug!(%error, "send failed");
                break;
            }
        }
        let mut stop = None;
        while let Some(event) = session.poll_event() {
            match event {
                HubEvent::HelloReceived { facts, version, clock_skew_ms } => {
                    let now = crate::wall_ms();
                    let info = LiveInfo {
                        connected_at_ms: now,
                        last_seen_ms: now,
                        rtt_ms: connection.rtt().as_secs_f64() * 1000.0,
                        clock_skew_ms,
                        remote_addr: connection.remote_address().to_string(),
                        spool: None,
                    };
                    hub.registry.register(&agent_id, conn_id, connection.clone(), commands_tx.clone(), info.clone());
                    registered = true;
                    Metrics::inc(&hub.metrics.sessions_started);
                    let stored = hub.store.update_agent(&agent_id, |a| {
                        a.hostname = crate::enroll::truncate(&facts.hostname, 253);
                        a.os = crate::enroll::truncate(&facts.os, 128);
                        a.kernel = crate::enroll::truncate(&facts.kernel, 128);
                        a.arch = crate::enroll::truncate(&facts.arch, 32);
                        a.cpu_count = facts.cpu_count;
                        a.memory_bytes = facts.memory_bytes;
                        a.agent_version = crate::enroll::truncate(&facts.agent_version, 64);
                        a.connected = true;
                        a.last_seen_ms = Some(now);
                        a.last_connected_ms = Some(now);
                        a.remote_addr = Some(info.remote_addr.clone());
                        a.rtt_ms = Some(info.rtt_ms);
                        a.clock_skew_ms = Some(clock_skew_ms);
                        a.protocol_version = Some(version);
                        a.cert_sha256 = identity.cert_sha256.clone();
                        a.cert_not_after_ms = identity.not_after_unix.saturating_mul(1000);
                    });
                    if let Err(error) = stored {
                        warn!(%error, "could not record agent connection");
                    }
                    if version >= gantry_shared::TRUSTED_CAS_VERSION {
                        // Right behind the welcome, so an agent learns a staged CA on its
                        // first session after the hub starts trusting it. Only CAs that may
                        // sign the hub's server certificate: a retiring one never will again.
                        let cas = hub.pki.cas().into_iter().filter(|ca| ca.role != crate::pki::CaRole::Retiring);
                        let ca_sha256 = cas.map(|ca| ca.sha256).collect();
                        session.queue(HubMessage::TrustedCas(gantry_shared::message::TrustedCas { ca_sha256 }));
                    }
                    info!(version, clock_skew_ms, "agent online");
                    crate::orchestrator::agent_connected(&hub, &agent_id, &identity.org);
                    crate::checks::agent_connected(&hub, &agent_id);
                }
                HubEvent::HeartbeatReceived { clock_skew_ms, .. } => {
                    Metrics::inc(&hub.metrics.heartbeats);
                    let now = crate::wall_ms();
                    let rtt_ms = connection.rtt().as_secs_f64() * 1000.0;
                    hub.registry.update(&agent_id, conn_id, |info| {
                        info.last_seen_ms = now;
                        info.rtt_ms = rtt_ms;
                        info.clock_skew_ms = clock_skew_ms;
                    });
                    if hub.now().saturating_duration_since(last_persist) >= LAST_SEEN_PERSIST_INTERVAL {
                        last_persist = hub.now();
                        let _ = hub.store.update_agent(&agent_id, |a| {
                            a.last_seen_ms = Some(now);
                            a.rtt_ms = Some(rtt_ms);
                            a.clock_skew_ms = Some(clock_skew_ms);
                        });
                    }
                }
                HubEvent::Message(AgentMessage::Renew(request)) => {
                    let reply = renew(&hub, &identity, &request.csr_der).await;
                    if let Err(error) = send.send(&reply).await {
                        debug!(%error, "send failed");
                    }
                }
                HubEvent::Message(AgentMessage::DeployReport(report)) => {
                    crate::orchestrator::report(&hub, &agent_id, &identity.org, report);
                }
                HubEvent::Message(AgentMessage::ActionResult(reply)) => {
                    hub.registry.resolve(&agent_id, conn_id, *reply);
                }
                HubEvent::Message(AgentMessage::SpoolState(state)) => {
                    let now = crate::wall_ms();
                    hub.registry.update(&agent_id, conn_id, |info| info.spool = Some((now, state)));
                }
                HubEvent::Message(other) => {
                    debug!(message = ?std::mem::discriminant(&other), "message not handled by this hub version");
                }
                HubEvent::LivenessLost => {
                    stop = Some(Err((ErrorCode::Timeout, "no heartbeat within the liveness timeout".to_string())));
                }
            }
        }
        if let Some(stop) = stop {
            break stop;
        }
        let deadline = session.poll_timeout().map(|t| hub.instant_of(t));
        let drain_at = drain_deadline;
        tokio::select! {
            message = recv.next::<AgentMessage>() => match message {
                Ok(Some(message)) => {
                    if let Err(error) = session.handle_message(hub.now(), crate::wall_ms(), message) {
                        Metrics::inc(&hub.metrics.protocol_errors);
                        // Flush the in-band error the session queued before closing.
                        while let Some(message) = session.poll_transmit() {
                            let _ = send.send(&message).await;
                        }
                        break Err((error.code(), error.to_string()));
                    }
                }
                Ok(None) => break Ok(()),
                Err(error) if error.is_protocol() => {
                    Metrics::inc(&hub.metrics.protocol_errors);
                    let _ = send.send(&HubMessage::Error(ProtocolError { code: ErrorCode::Protocol, message: error.to_string() })).await;
                    break Err((ErrorCode::Protocol, error.to_string()));
                }
                Err(_) => break Ok(()),
            },
            _ = sleep_until_opt(deadline) => session.handle_timeout(hub.now()),
            Some(command) = commands.recv() => match command {
                SessionCommand::Drain(retry_after) => {
                    session.drain(retry_after);
                    drain_deadline = Some(tokio::time::Instant::now() + DRAIN_GRACE);
                }
                SessionCommand::Send(message) => session.queue(*message),
            },
            _ = sleep_until_opt(drain_at) => break Err((ErrorCode::Draining, "hub is shutting down".to_string())),
            stream = connection.accept_bi(), if registered => match stream {
                Ok((stream_send, stream_recv)) => {
                    let task = crate::ingest::serve_stream(hub.clone(), connection.clone(), agent_id.clone(), stream_send, stream_recv);
                    let guard = QuicTask::enter(&hub);
                    tokio::spawn(
                        async move {
                            task.await;
                            drop(guard);
                        }
                        .instrument(tracing::Span::current()),
                    );
                }
                Err(_) => break Ok(()),
            },
            _ = connection.closed() => break Ok(()),
        }
    };

    match &end {
        Ok(()) => {}
        Err((code, reason)) => {
            if *code != ErrorCode::Draining {
                info!(?code, reason, "closing session");
            }
            close(&connection, *code, reason);
        }
    }
    if registered && hub.registry.unregister(&agent_id, conn_id) {
        let now = crate::wall_ms();
        let _ = hub.store.update_agent(&agent_id, |a| {
            a.connected = false;
            a.last_disconnected_ms = Some(now);
            a.last_seen_ms = Some(now.max(a.last_seen_ms.unwrap_or(0)));
        });
        info!(reason = ?connection.close_reason(), "agent offline");
    }
}

async fn renew(hub: &Arc<Hub>, identity: &crate::pki::AgentIdentity, csr_der: &[u8]) -> HubMessage {
    let lifetime = Duration::from_secs(hub.config.agent_cert_lifetime_secs);
    let issued = match hub.pki.sign_agent_csr(csr_der, &identity.agent_id, &identity.org, lifetime) {
        Ok(issued) => issued,
        Err(reason) => return HubMessage::RenewRefused { reason: format!("invalid certificate signing request: {reason}") },
    };
    let stored = hub.store.update_agent(&identity.agent_id, |a| {
        a.cert_sha256 = issued.sha256.clone();
        a.cert_not_after_ms = issued.not_after_unix.saturating_mul(1000);
    });
    match stored {
        Ok(Some(agent)) if agent.revoked_at_ms.is_none() => {
            Metrics::inc(&hub.metrics.certificates_renewed);
            info!(not_after = issued.not_after_unix, "certificate renewed");
            HubMessage::Renewed(Renewed { cert_chain_der: vec![issued.der, hub.pki.signing_ca_der().to_vec()], not_after_unix: issued.not_after_unix })
        }
        Ok(_) => HubMessage::RenewRefused { reason: "agent is revoked or unknown".into() },
        Err(error) => {
            warn!(%error, "store error during renewal");
            HubMessage::RenewRefused { reason: "hub store unavailable; try again later".into() }
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
