//! The agent's connection loop: dial the hub, run one session driven by
//! `gantry_shared::session::AgentSession`, renew the certificate when due, and reconnect
//! forever with jittered backoff, honouring the hub's retry-after.
//!
//! Only three things end the loop besides shutdown, because no retry can fix them: the
//! agent was revoked, its certificate expired, or the hub no longer accepts its
//! certificate. Each ends with a message telling the operator to re-enroll.

use crate::config::Config;
use crate::spool::Spool;
use crate::state::{Identity, StateDir};
use crate::telemetry::{agent_event, Outbox};
use crate::wire::{FramedRecv, FramedSend};
use gantry_shared::message::{AgentMessage, ErrorCode, HubMessage, RenewRequest};
use gantry_shared::session::{AgentSession, Backoff, BackoffConfig, SessionConfig, SessionEvent, Timestamp};
use gantry_shared::telemetry::Severity;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Why the agent stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("this machine is not enrolled (no identity in {0}); run `gantry-agent enroll --token TOKEN` first")]
    NotEnrolled(String),
    #[error("agent {agent_id} was revoked by an operator; re-enroll this machine with a new token")]
    Revoked { agent_id: String },
    #[error("agent certificate expired at {expired_at} (unix seconds) and can no longer be renewed; re-enroll this machine with a new token")]
    CertificateExpired { expired_at: i64 },
    #[error("the hub refused this agent's certificate ({reason}); the hub may have been re-initialised: re-enroll this machine with a new token")]
    CertificateRejected { reason: String },
    #[error(
        "hub CA fingerprint mismatch at {addr}: the server there presents none of the CAs this agent pins; either it is not the hub this agent enrolled with, or the hub's CA was renewed while this agent was offline: re-enroll this machine with a new token"
    )]
    CaMismatch { addr: String },
    #[error("{0:#}")]
    Local(#[from] anyhow::Error),
}

/// How one connection ended.
#[derive(Debug)]
enum Ended {
    Shutdown,
    Drained(Duration),
    /// Lost after (or before) a session was established; `established` resets backoff.
    Lost {
        reason: String,
        established: bool,
    },
    Fatal(RunError),
}

/// Current wall-clock time in Unix milliseconds.
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Resolve `HOST:PORT` to one socket address.
pub async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    let mut addrs = tokio::net::lookup_host(addr).await.map_err(|e| anyhow::anyhow!("cannot resolve {addr}: {e}"))?;
    addrs.next().ok_or_else(|| anyhow::anyhow!("{addr} resolves to no address"))
}

/// A client-only QUIC endpoint on an ephemeral port of the right address family.
pub fn client_endpoint(remote: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let bind: SocketAddr = if remote.is_ipv6() { "[::]:0".parse()? } else { "0.0.0.0:0".parse()? };
    Ok(quinn::Endpoint::client(bind)?)
}

/// Run until `shutdown` resolves or a fatal error. Reconnects on its own forever otherwise.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let state = StateDir::new(&config.state_dir);
    if !state.is_enrolled() {
        return Err(RunError::NotEnrolled(state.dir.display().to_string()));
    }
    let identity = state.load_identity()?;
    let hub_addr = config.hub_addr.clone().unwrap_or_else(|| identity.hub_addr.clone());
    info!(agent_id = %identity.agent_id, org = %identity.org, hub = %hub_addr, "agent starting");
    let (spool, report) = Spool::open(&state.dir, config.spool.to_spool_config()).map_err(|e| anyhow::anyhow!("opening the spool: {e}"))?;
    let outbox = Outbox::new(spool);
    if let Some(path) = &report.quarantined {
        let message = format!("spool was damaged and moved to {}; a fresh one was started", path.display());
        warn!("{message}");
        outbox.event(agent_event("spool.quarantined", Severity::Warning, message, vec![]));
    }
    if report.config_repaired {
        outbox.event(agent_event("spool.repaired", Severity::Warning, "spool store's damaged config file was set aside; its records were kept", vec![]));
    }
    if report.rolled_back {
        outbox.event(agent_event(
            "spool.rolled_back",
            Severity::Error,
            "spool store came back older than it was left; records spooled before the last stop may be lost",
            vec![],
        ));
    }
    if report.corrupt_records > 0 {
        outbox.event(agent_event("spool.corrupt_records", Severity::Warning, format!("{} corrupt spool records skipped", report.corrupt_records), vec![]));
    }
    outbox.event(agent_event("agent.started", Severity::Info, format!("agent {} started", env!("CARGO_PKG_VERSION")), vec![]));
    crate::collection::note_config(&outbox, &config);
    let metrics = Arc::new(crate::metrics::AgentMetrics::default());
    let _metrics_server = match config.metrics_listen {
        Some(addr) => {
            let server = crate::metrics::start(addr, metrics.clone(), outbox.clone())
                .await
                .map_err(|e| anyhow::anyhow!("serving metrics on {addr} (metrics_listen): {e}"))?;
            info!(addr = %server.addr, "serving Prometheus metrics at /metrics");
            Some(server)
        }
        None => None,
    };
    let (collectors_stop, collectors_stopped) = tokio::sync::watch::channel(false);
    let collectors = crate::collection::spawn_all(&config, outbox.clone(), collectors_stopped.clone());
    let (deployer, deployer_task) =
        crate::deployer::start(config.docker.clone(), state.dir.clone(), identity.agent_id.clone(), outbox.clone(), collectors_stopped.clone());
    // Checks run from the kept set at once, connected or not.
    let (checks, checks_task) = crate::checks::start(state.dir.clone(), config.docker.clone(), outbox.clone(), Some(deployer.clone()), collectors_stopped);
    let mut backoff = Backoff::new(BackoffConfig { base: Duration::from_millis(config.backoff_base_ms), cap: Duration::from_millis(config.backoff_cap_ms) });
    let origin = Instant::now();
    let mut endpoint: Option<(SocketAddr, quinn::Endpoint)> = None;
    let mut failures: u64 = 0;
    let workers = Workers { outbox: &outbox, deployer: &deployer, checks: &checks, metrics: &metrics };
    tokio::pin!(shutdown);
    loop {
        let ended = tokio::select! {
            ended = connect_once(&config, &state, &identity, &hub_addr, origin, &mut endpoint, &workers) => ended,
            _ = &mut shutdown => Ended::Shutdown,
        };
        metrics.session_ended(!matches!(&ended, Ended::Lost { established: false, .. }));
        match ended {
            Ended::Shutdown => break,
            Ended::Fatal(error) => {
                stop_collectors(collectors_stop, collectors).await;
                deployer_task.abort();
                checks_task.abort();
                outbox.event(agent_event("agent.stopped", Severity::Error, error.to_string(), vec![]));
                close_endpoint(endpoint).await;
                return Err(error);
            }
            Ended::Drained(retry_after) => {
                info!(retry_after_ms = retry_after.as_millis() as u64, "hub asked us to reconnect later");
                backoff.reset();
                backoff.retry_after(retry_after);
                failures = 0;
            }
            Ended::Lost { reason, established } => {
                if established {
                    backoff.reset();
                    failures = 0;
                }
                failures += 1;
                // Log the first failure and then every power of two, so an outage of
                // hours does not flood the log.
                if failures.is_power_of_two() {
                    warn!(%reason, attempts = failures, "connection to hub lost; retrying");
                } else {
                    debug!(%reason, attempts = failures, "connection attempt failed");
                }
            }
        }
        let delay = backoff.next_delay(rand::random());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut shutdown => break,
        }
    }
    info!("agent stopping");
    stop_collectors(collectors_stop, collectors).await;
    // A deployment in progress is persisted as desired; the next start reconciles it.
    deployer_task.abort();
    checks_task.abort();
    outbox.event(agent_event("agent.stopped", Severity::Info, "agent stopped", vec![]));
    if let Err(error) = outbox.spool().flush() {
        warn!(%error, "could not flush the spool");
    }
    if let Some((_, endpoint)) = &endpoint {
        endpoint.close(ErrorCode::Normal.as_u32().into(), b"agent stopping");
    }
    close_endpoint(endpoint).await;
    Ok(())
}

async fn stop_collectors(stop: tokio::sync::watch::Sender<bool>, mut collectors: tokio::task::JoinSet<()>) {
    let _ = stop.send(true);
    // Collectors finish their current write (records and checkpoint together) and return.
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while collectors.join_next().await.is_some() {} }).await;
    collectors.abort_all();
}

async fn close_endpoint(endpoint: Option<(SocketAddr, quinn::Endpoint)>) {
    if let Some((_, endpoint)) = endpoint {
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
}

fn now(origin: Instant) -> Timestamp {
    Timestamp(origin.elapsed().as_millis() as u64)
}

fn instant_of(origin: Instant, t: Timestamp) -> tokio::time::Instant {
    tokio::time::Instant::from_std(origin + Duration::from_millis(t.0))
}

/// When to renew a certificate valid over `[not_before, not_after]`: at `fraction` of
/// its life, moved by up to 5 % of the life either way (`random` in 0..=u64::MAX).
pub fn renewal_time(not_before: i64, not_after: i64, fraction: f64, random: u64) -> i64 {
    let life = (not_after - not_before).max(1) as f64;
    let jitter = (random as f64 / u64::MAX as f64 - 0.5) * 0.1 * life;
    not_before + (life * fraction + jitter) as i64
}

/// The agent's long-lived parts that every session feeds and is fed by.
#[derive(Clone, Copy)]
struct Workers<'a> {
    outbox: &'a Outbox,
    deployer: &'a crate::deployer::Deployer,
    checks: &'a crate::checks::Checks,
    metrics: &'a crate::metrics::AgentMetrics,
}

async fn connect_once(
    config: &Config,
    state: &StateDir,
    identity: &Identity,
    hub_addr: &str,
    origin: Instant,
    endpoint_slot: &mut Option<(SocketAddr, quinn::Endpoint)>,
    workers: &Workers<'_>,
) -> Ended {
    let lost = |reason: String| Ended::Lost { reason, established: false };
    let (chain, key) = match state.load_credentials() {
        Ok(credentials) => credentials,
        Err(error) => return Ended::Fatal(RunError::Local(error)),
    };
    let Some((not_before, not_after)) = crate::state::validity(&chain[0]) else {
        return Ended::Fatal(RunError::Local(anyhow::anyhow!("agent.crt is not a valid certificate")));
    };
    if wall_ms() / 1000 >= not_after {
        return Ended::Fatal(RunError::CertificateExpired { expired_at: not_after });
    }
    // Reread: the hub may have announced further CAs since this run started.
    let pins = match state.load_identity().unwrap_or_else(|_| identity.clone()).pinned_cas() {
        Ok(pins) => pins,
        Err(error) => return Ended::Fatal(RunError::Local(error)),
    };
    let remote = match resolve(hub_addr).await {
        Ok(remote) => remote,
        Err(error) => return lost(format!("{error:#}")),
    };
    let (client_config, mismatch) = match crate::tls::client_config_pinning(pins, Some((chain, key))) {
        Ok(pair) => pair,
        Err(error) => return Ended::Fatal(RunError::Local(error)),
    };
    let endpoint = match endpoint_slot {
        Some((addr, endpoint)) if addr.is_ipv6() == remote.is_ipv6() => endpoint.clone(),
        _ => match client_endpoint(remote) {
            Ok(endpoint) => {
                *endpoint_slot = Some((remote, endpoint.clone()));
                endpoint
            }
            Err(error) => return lost(format!("{error:#}")),
        },
    };
    let connecting = match endpoint.connect_with(client_config, remote, gantry_shared::HUB_SERVER_NAME) {
        Ok(connecting) => connecting,
        Err(error) => return lost(error.to_string()),
    };
    let connection = match tokio::time::timeout(Duration::from_secs(config.connect_timeout_secs), connecting).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            if mismatch.load(Ordering::SeqCst) {
                return Ended::Fatal(RunError::CaMismatch { addr: hub_addr.to_string() });
            }
            return classify_close(&error, identity, false);
        }
        Err(_) => return lost(format!("no answer from {remote} within {} s", config.connect_timeout_secs)),
    };
    let renew_at = renewal_time(not_before, not_after, config.renew_at_fraction, rand::random());
    session(config, state, identity, connection, origin, renew_at, workers).await
}

/// Map how the hub closed a connection to what the loop does next.
fn classify_close(error: &quinn::ConnectionError, identity: &Identity, established: bool) -> Ended {
    use quinn::ConnectionError as E;
    match error {
        E::ApplicationClosed(close) => {
            let code = u32::try_from(close.error_code.into_inner()).ok().and_then(ErrorCode::from_u32);
            let reason = String::from_utf8_lossy(&close.reason).into_owned();
            match code {
                Some(ErrorCode::Revoked) => Ended::Fatal(RunError::Revoked { agent_id: identity.agent_id.clone() }),
                Some(ErrorCode::Unauthenticated) => Ended::Fatal(RunError::CertificateRejected { reason }),
                Some(ErrorCode::Draining) => Ended::Drained(Duration::from_secs(1)),
                _ => Ended::Lost { reason: format!("hub closed the connection: {reason}"), established },
            }
        }
        E::ConnectionClosed(close) if close.error_code.to_string().contains("certificate") => {
            Ended::Fatal(RunError::CertificateRejected { reason: close.error_code.to_string() })
        }
        E::TransportError(error) if error.to_string().contains("certificate") => Ended::Fatal(RunError::CertificateRejected { reason: error.to_string() }),
        other => Ended::Lost { reason: other.to_string(), established },
    }
}

async fn session(
    config: &Config,
    state: &StateDir,
    identity: &Identity,
    connection: quinn::Connection,
    origin: Instant,
    mut renew_at: i64,
    workers: &Workers<'_>,
) -> Ended {
    let Workers { outbox, deployer, checks, metrics } = *workers;
    let mut senders = tokio::task::JoinSet::new();
    let mut reports = deployer.subscribe();
    // Support actions run in tasks of their own (ended with the session) and hand their
    // results back through this channel.
    let support =
        crate::support::Support::new(crate::support::diagnostics::Sources { config: config.clone(), outbox: outbox.clone(), deployer: deployer.clone() });
    let mut actions = tokio::task::JoinSet::new();
    let (results_tx, mut results) = tokio::sync::mpsc::channel::<gantry_shared::support::ActionReply>(crate::support::MAX_RUNNING);
    let (send, recv) = match connection.open_bi().await {
        Ok(streams) => streams,
        Err(error) => return classify_close(&error, identity, false),
    };
    let mut send = FramedSend::new(send, config.max_frame_bytes);
    let mut recv = FramedRecv::new(recv, config.max_frame_bytes);
    let mut session = AgentSession::new(SessionConfig::default(), now(origin), crate::facts::collect(), wall_ms());
    let mut established = false;
    let mut renewal: Option<rcgen::KeyPair> = None;
    let mut renew_retry = Duration::from_secs(60);
    // The spool backlog goes to hubs that understand it, when it changed, at most this often.
    let mut spool_reports = tokio::time::interval(SPOOL_REPORT_INTERVAL);
    spool_reports.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut spool_reported: Option<gantry_shared::message::SpoolState> = None;
    let mut reports_spool = false;

    loop {
        while let Some(message) = session.poll_transmit() {
            if let Err(error) = send.send(&message).await {
                return Ended::Lost { reason: error.to_string(), established };
            }
        }
        while let Some(event) = session.poll_event() {
            match event {
                SessionEvent::Established { version, .. } => {
                    established = true;
                    metrics.session_established();
                    reports_spool = version >= gantry_shared::SPOOL_STATE_VERSION;
                    info!(version, "connected to hub");
                    // Tell the hub where every deployment stands (it may have missed reports).
                    for report in deployer.snapshot() {
                        session.queue(AgentMessage::DeployReport(report));
                    }
                    for class in crate::telemetry::CLASSES {
                        let task = crate::telemetry::send_class(connection.clone(), outbox.clone(), class, config.max_frame_bytes);
                        senders.spawn(async move {
                            if let Err(error) = task.await {
                                debug!(%error, ?class, "telemetry stream ended");
                            }
                        });
                    }
                }
                SessionEvent::Drained { retry_after } => {
                    connection.close(ErrorCode::Draining.as_u32().into(), b"draining as asked");
                    return Ended::Drained(retry_after);
                }
                SessionEvent::LivenessLost => {
                    connection.close(ErrorCode::Timeout.as_u32().into(), b"no answer from hub");
                    return Ended::Lost { reason: "hub stopped answering heartbeats".into(), established };
                }
                SessionEvent::Message(HubMessage::Renewed(renewed)) => {
                    let Some(key) = renewal.take() else { continue };
                    match state.save_credentials(&renewed.cert_chain_der, Some(&key.serialize_pem())) {
                        Ok(()) => {
                            info!(not_after = renewed.not_after_unix, "certificate renewed");
                            // Signed by the hub's next CA during a rotation: pin that too.
                            let signer: Vec<String> = renewed.cert_chain_der.last().map(|ca| crate::tls::fingerprint_hex(ca)).into_iter().collect();
                            learn_cas(state, identity, &signer);
                            let not_before = renewed.cert_chain_der.first().and_then(|c| crate::state::validity(c)).map(|v| v.0);
                            renew_at = renewal_time(not_before.unwrap_or(wall_ms() / 1000), renewed.not_after_unix, config.renew_at_fraction, rand::random());
                            renew_retry = Duration::from_secs(60);
                        }
                        Err(error) => warn!(error = %format!("{error:#}"), "could not save the renewed certificate"),
                    }
                }
                SessionEvent::Message(HubMessage::RenewRefused { reason }) => {
                    renewal = None;
                    warn!(%reason, "hub refused certificate renewal; will retry");
                    renew_at = wall_ms() / 1000 + renew_retry.as_secs() as i64;
                    renew_retry = (renew_retry * 2).min(Duration::from_secs(3600));
                }
                SessionEvent::Message(HubMessage::Deploy(command)) => {
                    if !deployer.submit(crate::deployer::Command::Deploy(command)) {
                        warn!("deployment queue full; the hub will send the command again");
                    }
                }
                SessionEvent::Message(HubMessage::RemoveDeployment { deployment_id }) => {
                    if !deployer.submit(crate::deployer::Command::Remove(deployment_id)) {
                        warn!("deployment queue full; the hub will send the command again");
                    }
                }
                SessionEvent::Message(HubMessage::Checks(set)) => checks.submit(set),
                SessionEvent::Message(HubMessage::TrustedCas(trusted)) => learn_cas(state, identity, &trusted.ca_sha256),
                SessionEvent::Message(HubMessage::Action(request)) => {
                    while actions.try_join_next().is_some() {}
                    if actions.len() >= crate::support::MAX_RUNNING {
                        session.queue(AgentMessage::ActionResult(Box::new(crate::support::Support::busy(&request))));
                    } else {
                        let (support, results_tx) = (support.clone(), results_tx.clone());
                        actions.spawn(async move {
                            let reply = support.handle(*request).await;
                            let _ = results_tx.send(reply).await;
                        });
                    }
                }
                SessionEvent::Message(other) => debug!(message = ?other, "message not handled by this agent version"),
            }
        }
        let deadline = session.poll_timeout().map(|t| instant_of(origin, t));
        let renew_due = established && renewal.is_none();
        let renew_in = Duration::from_millis(((renew_at * 1000) - wall_ms()).max(0) as u64);
        tokio::select! {
            message = recv.next::<HubMessage>() => match message {
                Ok(Some(message)) => {
                    if let Err(error) = session.handle_message(now(origin), wall_ms(), message) {
                        connection.close(error.code().as_u32().into(), error.to_string().as_bytes());
                        return Ended::Lost { reason: error.to_string(), established };
                    }
                }
                Ok(None) => return Ended::Lost { reason: "hub closed the control stream".into(), established },
                Err(error) => {
                    if let Some(close) = connection.close_reason() {
                        return classify_close(&close, identity, established);
                    }
                    if error.is_protocol() {
                        connection.close(ErrorCode::Protocol.as_u32().into(), error.to_string().as_bytes());
                    }
                    return Ended::Lost { reason: error.to_string(), established };
                }
            },
            _ = sleep_until_opt(deadline) => session.handle_timeout(now(origin), wall_ms()),
            _ = tokio::time::sleep(renew_in), if renew_due => {
                match make_csr() {
                    Ok((key, csr_der)) => {
                        info!("renewing certificate");
                        renewal = Some(key);
                        session.queue(AgentMessage::Renew(RenewRequest { csr_der }));
                    }
                    Err(error) => {
                        warn!(%error, "could not make a renewal request");
                        renew_at = wall_ms() / 1000 + 60;
                    }
                }
            }
            report = reports.recv(), if established => {
                if let Ok(report) = report {
                    session.queue(AgentMessage::DeployReport(report));
                }
            }
            Some(reply) = results.recv() => session.queue(AgentMessage::ActionResult(Box::new(reply))),
            _ = spool_reports.tick(), if reports_spool => {
                let current = outbox.spool_state();
                if spool_reported.as_ref() != Some(&current) {
                    session.queue(AgentMessage::SpoolState(current.clone()));
                    spool_reported = Some(current);
                }
            }
            error = connection.closed() => return classify_close(&error, identity, established),
        }
    }
}

/// How often the agent looks whether its spool backlog changed (and tells the hub if so).
const SPOOL_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Pin further hub CAs in `identity.json` (announced by the hub, or the signer of a renewed
/// certificate). The session they came over was verified against a pinned CA.
fn learn_cas(state: &StateDir, identity: &Identity, announced: &[String]) {
    let mut current = state.load_identity().unwrap_or_else(|_| identity.clone());
    if current.learn_cas(announced.iter().map(String::as_str)) {
        match state.save_identity(&current) {
            Ok(()) => info!(pinned = ?current.extra_ca_sha256, "pinned further hub CAs"),
            Err(error) => warn!(error = %format!("{error:#}"), "could not save the hub's further CAs"),
        }
    }
}

fn make_csr() -> anyhow::Result<(rcgen::KeyPair, Vec<u8>)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_lands_near_two_thirds_of_the_lifetime() {
        let (start, end) = (1_000_000, 1_000_000 + 30 * 86400);
        for random in [0, u64::MAX / 2, u64::MAX] {
            let at = renewal_time(start, end, 2.0 / 3.0, random);
            let fraction = (at - start) as f64 / (end - start) as f64;
            assert!((0.61..=0.72).contains(&fraction), "{fraction}");
        }
    }
}
