//! Sans-IO session logic for one connection's control stream, in the style of quinn-proto:
//! version negotiation, the hello/welcome handshake, heartbeats, round-trip and clock-skew
//! measurement, liveness deadlines, draining, and the agent's reconnect backoff.
//!
//! The state machines here are driven entirely by their callers: messages come in through
//! `handle_message`, the passage of time through `handle_timeout`, and results go out
//! through `poll_transmit`, `poll_event` and `poll_timeout`. This module must not do IO:
//! it never reads a clock (no `Instant::now()`, no `SystemTime::now()`), never draws
//! random numbers (randomness is passed in as `u64` arguments), never touches a socket
//! and never spawns a task. Monotonic time is a [`Timestamp`] supplied by the caller;
//! wall-clock time is a separate `i64` of Unix milliseconds, also supplied by the caller.

use std::collections::VecDeque;
use std::time::Duration;

use crate::message::{AgentMessage, Drain, ErrorCode, Heartbeat, HeartbeatAck, Hello, HostFacts, HubMessage, ProtocolError, VersionRange, Welcome};

/// Default interval between agent heartbeats.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Default time either side waits without hearing from the other before giving up.
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(15);
/// Smallest heartbeat interval a session accepts; smaller values are raised to this.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// Largest heartbeat interval a session accepts; larger values are lowered to this.
pub const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Largest liveness timeout a session accepts, so a misconfigured peer cannot make a dead
/// connection look alive for ever. Always at least twice [`MAX_HEARTBEAT_INTERVAL`].
pub const MAX_LIVENESS_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How many unanswered heartbeats the agent remembers for round-trip measurement; older
/// ones are forgotten (their answers, if they ever come, are ignored).
pub const MAX_OUTSTANDING_HEARTBEATS: usize = 16;

/// Default first (and smallest) reconnect delay.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Default largest reconnect delay (a hub-supplied retry-after may exceed it).
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Reason sent in a [`Drain`] queued by [`HubSession::drain`].
pub const DEFAULT_DRAIN_REASON: &str = "hub is draining";

/// Convert a span to whole milliseconds, rounding up so that a deadline computed from it
/// never fires early, and saturating at `u64::MAX`.
fn duration_to_ms_ceil(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// Convert a span to whole milliseconds for the wire, saturating at `u64::MAX`.
fn duration_to_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `a - b` on wall-clock milliseconds, saturating instead of overflowing.
fn wall_diff(a: i64, b: i64) -> i64 {
    clamp_i128(i128::from(a) - i128::from(b))
}

fn clamp_i128(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// A point on the caller's monotonic clock: milliseconds since an arbitrary origin.
///
/// Only differences between timestamps of the same clock mean anything. Spans added to a
/// timestamp are rounded up to whole milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// This instant plus `d` (rounded up to whole milliseconds), saturating at the end of
    /// time rather than overflowing.
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration_to_ms_ceil(d)))
    }

    /// Time elapsed from `earlier` to `self`, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// Milliseconds since the clock's origin.
    pub fn as_millis(self) -> u64 {
        self.0
    }
}

/// The two sides share no protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "no protocol version in common: agent speaks {}..={}, hub speaks {}..={}",
    .agent.min, .agent.max, .hub.min, .hub.max
)]
pub struct VersionMismatch {
    /// Versions the agent speaks.
    pub agent: VersionRange,
    /// Versions the hub speaks.
    pub hub: VersionRange,
}

/// The highest protocol version both ranges contain.
///
/// An inverted range (`min > max`) contains no version, so it is a mismatch too.
pub fn negotiate(agent: VersionRange, hub: VersionRange) -> Result<u16, VersionMismatch> {
    let low = agent.min.max(hub.min);
    let high = agent.max.min(hub.max);
    if agent.min > agent.max || hub.min > hub.max || low > high {
        return Err(VersionMismatch { agent, hub });
    }
    Ok(high)
}

/// Why a session cannot go on. The IO layer closes the connection with [`Self::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The peer sent a message that is not allowed at this point.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The two sides share no protocol version.
    #[error(transparent)]
    Version(#[from] VersionMismatch),
    /// The peer reported an error in-band before closing.
    #[error("peer reported an error: {0}")]
    Remote(ProtocolError),
}

impl SessionError {
    /// Error code to close the QUIC connection with.
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::Protocol(_) => ErrorCode::Protocol,
            SessionError::Version(_) => ErrorCode::VersionUnsupported,
            SessionError::Remote(e) => e.code,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Backoff
// ---------------------------------------------------------------------------------------

/// Settings of a [`Backoff`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Smallest delay, and the first one after a reset. Raised to 1 ms if zero.
    pub base: Duration,
    /// Largest delay of normal backoff. Raised to `base` if smaller.
    pub cap: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig { base: DEFAULT_BACKOFF_BASE, cap: DEFAULT_BACKOFF_CAP }
    }
}

/// Map `random` uniformly onto `low..=high` (nanosecond resolution). `low > high` yields
/// `low`. Spans longer than `u64::MAX` nanoseconds (about 584 years) are cut to that.
fn uniform_between(low: Duration, high: Duration, random: u64) -> Duration {
    let Some(span) = high.checked_sub(low) else {
        return low;
    };
    let span = u64::try_from(span.as_nanos()).unwrap_or(u64::MAX);
    // (random * (span + 1)) >> 64 lies in 0..=span and is below u128::MAX because both
    // factors are at most 2^64.
    let offset = (u128::from(random) * (u128::from(span) + 1)) >> 64;
    let offset = u64::try_from(offset).unwrap_or(u64::MAX);
    low.saturating_add(Duration::from_nanos(offset))
}

/// Reconnect delays: exponential backoff with decorrelated jitter (the AWS scheme:
/// `delay = min(cap, uniform(base, previous * 3))`).
///
/// Deterministic: the same sequence of random inputs gives the same delays.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    previous: Duration,
    retry_after: Option<Duration>,
}

impl Backoff {
    /// A backoff at its starting point. The config is normalised: `base` at least 1 ms,
    /// `cap` at least `base`.
    pub fn new(config: BackoffConfig) -> Self {
        let base = config.base.max(Duration::from_millis(1));
        let cap = config.cap.max(base);
        let config = BackoffConfig { base, cap };
        Backoff { config, previous: base, retry_after: None }
    }

    /// The normalised settings in force.
    pub fn config(&self) -> BackoffConfig {
        self.config
    }

    /// The delay before the next connection attempt. `random` is any uniformly random
    /// `u64`; it is mapped uniformly onto the allowed range.
    ///
    /// Normally the result lies in `base..=cap`. If the hub asked for a retry-after (see
    /// [`Self::retry_after`]), this one delay is that value plus up to 50 % jitter instead,
    /// uncapped, and normal backoff then resumes from `base`.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        if let Some(requested) = self.retry_after.take() {
            self.previous = self.config.base;
            return requested.saturating_add(uniform_between(Duration::ZERO, requested / 2, random));
        }
        let high = self.previous.saturating_mul(3).max(self.config.base);
        let delay = uniform_between(self.config.base, high, random).min(self.config.cap);
        self.previous = delay;
        delay
    }

    /// Start over from `base`: call once a session was established. A pending hub
    /// retry-after is kept, because the hub asked for it.
    pub fn reset(&mut self) {
        self.previous = self.config.base;
    }

    /// The hub asked the agent to stay away for at least `d`: the next delay will be at
    /// least `d` (plus jitter), even above the cap. Several requests keep the largest.
    pub fn retry_after(&mut self, d: Duration) {
        self.retry_after = Some(self.retry_after.map_or(d, |old| old.max(d)));
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(BackoffConfig::default())
    }
}

// ---------------------------------------------------------------------------------------
// Session configuration
// ---------------------------------------------------------------------------------------

/// Timing of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// How often the agent sends a heartbeat.
    pub heartbeat_interval: Duration,
    /// How long either side waits without hearing from the other before giving up.
    pub liveness_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig { heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL, liveness_timeout: DEFAULT_LIVENESS_TIMEOUT }
    }
}

impl SessionConfig {
    /// This config clamped to sane bounds: the interval into
    /// [`MIN_HEARTBEAT_INTERVAL`]`..=`[`MAX_HEARTBEAT_INTERVAL`], the timeout to at least
    /// twice the interval and at most [`MAX_LIVENESS_TIMEOUT`]. Sessions always use the
    /// normalised values.
    pub fn normalized(self) -> SessionConfig {
        let heartbeat_interval = self.heartbeat_interval.clamp(MIN_HEARTBEAT_INTERVAL, MAX_HEARTBEAT_INTERVAL);
        let liveness_timeout = self.liveness_timeout.min(MAX_LIVENESS_TIMEOUT).max(heartbeat_interval.saturating_mul(2));
        SessionConfig { heartbeat_interval, liveness_timeout }
    }
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// Timers run.
    Running,
    /// A drain was sent or received; the connection is about to close.
    Draining,
    /// Liveness lost or a fatal error: nothing more happens.
    Closed,
}

// ---------------------------------------------------------------------------------------
// Agent side
// ---------------------------------------------------------------------------------------

/// Something the agent's IO layer must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// The hub welcomed us: the session is up.
    Established {
        /// Negotiated protocol version.
        version: u16,
        /// Our identity as the hub knows it.
        agent_id: String,
        /// Our organisation.
        org: String,
    },
    /// The hub asked us to close this connection and come back after `retry_after`.
    /// Timers stop; feed `retry_after` to [`Backoff::retry_after`].
    Drained {
        /// How long the hub asked us to stay away.
        retry_after: Duration,
    },
    /// Nothing was heard from the hub within the liveness timeout. Emitted once; the
    /// session is then closed. Close the connection with [`ErrorCode::Timeout`].
    LivenessLost,
    /// A message for the IO layer to handle (renewals, acks and the like).
    Message(HubMessage),
}

/// A heartbeat sent and not yet answered.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    seq: u64,
    sent: Timestamp,
    sent_wall_unix_ms: i64,
}

/// Agent side of one connection's control stream.
///
/// Queues a [`Hello`] on creation, waits for the hub's [`Welcome`], then sends heartbeats
/// every interval and watches the hub's liveness.
#[derive(Debug)]
pub struct AgentSession {
    config: SessionConfig,
    versions: VersionRange,
    life: Life,
    version: Option<u16>,
    last_heard: Timestamp,
    next_heartbeat: Option<Timestamp>,
    next_seq: u64,
    outstanding: VecDeque<Outstanding>,
    hello_wall_unix_ms: i64,
    srtt: Option<Duration>,
    clock_skew_ms: Option<i64>,
    transmit: VecDeque<AgentMessage>,
    events: VecDeque<SessionEvent>,
}

impl AgentSession {
    /// A session speaking [`VersionRange::CURRENT`], with its [`Hello`] queued.
    /// `wall_unix_ms` is the agent's wall clock now, reported in the hello.
    pub fn new(config: SessionConfig, now: Timestamp, facts: HostFacts, wall_unix_ms: i64) -> Self {
        Self::with_versions(config, now, facts, wall_unix_ms, VersionRange::CURRENT)
    }

    /// Like [`Self::new`], offering `versions` instead of the current range.
    pub fn with_versions(config: SessionConfig, now: Timestamp, facts: HostFacts, wall_unix_ms: i64, versions: VersionRange) -> Self {
        let mut transmit = VecDeque::new();
        transmit.push_back(AgentMessage::Hello(Hello { versions, facts, agent_clock_unix_ms: wall_unix_ms }));
        AgentSession {
            config: config.normalized(),
            versions,
            life: Life::Running,
            version: None,
            last_heard: now,
            next_heartbeat: None,
            next_seq: 0,
            outstanding: VecDeque::new(),
            hello_wall_unix_ms: wall_unix_ms,
            srtt: None,
            clock_skew_ms: None,
            transmit,
            events: VecDeque::new(),
        }
    }

    /// Process one message from the hub.
    ///
    /// An error is fatal: the session closes and the IO layer should close the connection
    /// with [`SessionError::code`]. Messages arriving after the session closed are
    /// ignored.
    pub fn handle_message(&mut self, now: Timestamp, wall_unix_ms: i64, msg: HubMessage) -> Result<(), SessionError> {
        if self.life == Life::Closed {
            return Ok(());
        }
        self.last_heard = self.last_heard.max(now);
        let result = self.dispatch(now, wall_unix_ms, msg);
        if result.is_err() {
            self.life = Life::Closed;
        }
        result
    }

    fn dispatch(&mut self, now: Timestamp, wall_unix_ms: i64, msg: HubMessage) -> Result<(), SessionError> {
        match msg {
            HubMessage::Error(e) => Err(SessionError::Remote(e)),
            HubMessage::Drain(drain) => {
                if self.life == Life::Running {
                    self.life = Life::Draining;
                    self.events.push_back(SessionEvent::Drained { retry_after: Duration::from_millis(drain.retry_after_ms) });
                }
                Ok(())
            }
            HubMessage::Welcome(welcome) => self.on_welcome(now, wall_unix_ms, welcome),
            other if self.version.is_none() => Err(SessionError::Protocol(format!("hub sent {} before welcome", hub_message_name(&other)))),
            HubMessage::HeartbeatAck(ack) => self.on_heartbeat_ack(now, wall_unix_ms, ack),
            other => {
                self.events.push_back(SessionEvent::Message(other));
                Ok(())
            }
        }
    }

    fn on_welcome(&mut self, now: Timestamp, wall_unix_ms: i64, welcome: Welcome) -> Result<(), SessionError> {
        if self.version.is_some() {
            return Err(SessionError::Protocol("hub sent a second welcome".into()));
        }
        if self.life != Life::Running {
            return Err(SessionError::Protocol("hub sent welcome after drain".into()));
        }
        let v = welcome.version;
        if !(self.versions.min..=self.versions.max).contains(&v) {
            return Err(SessionError::Version(VersionMismatch { agent: self.versions, hub: VersionRange { min: v, max: v } }));
        }
        self.config = SessionConfig {
            heartbeat_interval: Duration::from_millis(welcome.heartbeat_interval_ms),
            liveness_timeout: Duration::from_millis(welcome.liveness_timeout_ms),
        }
        .normalized();
        self.version = Some(v);
        self.next_heartbeat = Some(now.saturating_add(self.config.heartbeat_interval));
        // A coarse first estimate; heartbeat answers replace it.
        self.clock_skew_ms = Some(skew_from_exchange(self.hello_wall_unix_ms, wall_unix_ms, welcome.hub_clock_unix_ms));
        self.events.push_back(SessionEvent::Established { version: v, agent_id: welcome.agent_id, org: welcome.org });
        Ok(())
    }

    fn on_heartbeat_ack(&mut self, now: Timestamp, wall_unix_ms: i64, ack: HeartbeatAck) -> Result<(), SessionError> {
        if ack.seq >= self.next_seq {
            return Err(SessionError::Protocol(format!("hub acknowledged heartbeat {} which was never sent", ack.seq)));
        }
        let Some(index) = self.outstanding.iter().position(|o| o.seq == ack.seq) else {
            // Answered already, or forgotten because too many were outstanding.
            return Ok(());
        };
        let sent = self.outstanding[index];
        // The control stream is ordered, so older heartbeats will not be answered later.
        self.outstanding.drain(..=index);
        let sample = now.saturating_duration_since(sent.sent);
        self.srtt = Some(match self.srtt {
            None => sample,
            Some(srtt) => (srtt * 7 + sample) / 8,
        });
        self.clock_skew_ms = Some(skew_from_exchange(sent.sent_wall_unix_ms, wall_unix_ms, ack.hub_clock_unix_ms));
        Ok(())
    }

    /// Let time pass: sends a heartbeat when one is due, and gives up on the hub (one
    /// [`SessionEvent::LivenessLost`]) once nothing was heard for the liveness timeout.
    pub fn handle_timeout(&mut self, now: Timestamp, wall_unix_ms: i64) {
        if self.life != Life::Running {
            return;
        }
        if now >= self.liveness_deadline() {
            self.life = Life::Closed;
            self.events.push_back(SessionEvent::LivenessLost);
            return;
        }
        let Some(due) = self.next_heartbeat else {
            return;
        };
        if now < due {
            return;
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        if self.outstanding.len() >= MAX_OUTSTANDING_HEARTBEATS {
            self.outstanding.pop_front();
        }
        self.outstanding.push_back(Outstanding { seq, sent: now, sent_wall_unix_ms: wall_unix_ms });
        self.transmit.push_back(AgentMessage::Heartbeat(Heartbeat { seq, agent_clock_unix_ms: wall_unix_ms }));
        self.next_heartbeat = Some(now.saturating_add(self.config.heartbeat_interval));
    }

    fn liveness_deadline(&self) -> Timestamp {
        self.last_heard.saturating_add(self.config.liveness_timeout)
    }

    /// Queue a message for the hub (renew requests, acks), sent after anything queued
    /// before it.
    pub fn queue(&mut self, msg: AgentMessage) {
        self.transmit.push_back(msg);
    }

    /// The next message to send to the hub, in order.
    pub fn poll_transmit(&mut self) -> Option<AgentMessage> {
        self.transmit.pop_front()
    }

    /// When [`Self::handle_timeout`] must next be called: the earlier of the next
    /// heartbeat and the liveness deadline. `None` once draining or closed.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        if self.life != Life::Running {
            return None;
        }
        let liveness = self.liveness_deadline();
        Some(self.next_heartbeat.map_or(liveness, |hb| hb.min(liveness)))
    }

    /// The next event for the IO layer.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// Smoothed round-trip time of heartbeats (SRTT, 7/8 weight on the old value), once
    /// one was answered.
    pub fn rtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// Latest estimate of the agent's clock minus the hub's clock, in milliseconds
    /// (positive: the agent is ahead), taken from the welcome and then from each answered
    /// heartbeat assuming symmetric delay.
    pub fn clock_skew_ms(&self) -> Option<i64> {
        self.clock_skew_ms
    }

    /// Whether the hub's welcome arrived (and the session has not closed since).
    pub fn is_established(&self) -> bool {
        self.version.is_some() && self.life != Life::Closed
    }

    /// Negotiated protocol version, once welcomed.
    pub fn version(&self) -> Option<u16> {
        self.version
    }

    /// Timing in force: our own config until the welcome, the hub's (clamped) after it.
    pub fn config(&self) -> SessionConfig {
        self.config
    }
}

/// Agent clock minus hub clock, assuming the hub read its clock halfway between the agent
/// sending (`sent_wall`) and receiving (`received_wall`).
fn skew_from_exchange(sent_wall: i64, received_wall: i64, hub_wall: i64) -> i64 {
    let midpoint = (i128::from(sent_wall) + i128::from(received_wall)) / 2;
    clamp_i128(midpoint - i128::from(hub_wall))
}

fn hub_message_name(msg: &HubMessage) -> &'static str {
    match msg {
        HubMessage::Enrolled(_) => "Enrolled",
        HubMessage::EnrollRefused(_) => "EnrollRefused",
        HubMessage::Welcome(_) => "Welcome",
        HubMessage::HeartbeatAck(_) => "HeartbeatAck",
        HubMessage::Drain(_) => "Drain",
        HubMessage::Renewed(_) => "Renewed",
        HubMessage::RenewRefused { .. } => "RenewRefused",
        HubMessage::Ack(_) => "Ack",
        HubMessage::Error(_) => "Error",
        HubMessage::Deploy(_) => "Deploy",
        HubMessage::RemoveDeployment { .. } => "RemoveDeployment",
        HubMessage::Checks(_) => "Checks",
        HubMessage::Action(_) => "Action",
        HubMessage::TrustedCas(_) => "TrustedCas",
    }
}

fn agent_message_name(msg: &AgentMessage) -> &'static str {
    match msg {
        AgentMessage::Enroll(_) => "Enroll",
        AgentMessage::Hello(_) => "Hello",
        AgentMessage::Heartbeat(_) => "Heartbeat",
        AgentMessage::Renew(_) => "Renew",
        AgentMessage::Ack(_) => "Ack",
        AgentMessage::DeployReport(_) => "DeployReport",
        AgentMessage::ActionResult(_) => "ActionResult",
        AgentMessage::SpoolState(_) => "SpoolState",
    }
}

// ---------------------------------------------------------------------------------------
// Hub side
// ---------------------------------------------------------------------------------------

/// Something the hub's IO layer must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEvent {
    /// The agent said hello and a version was agreed; a [`Welcome`] is queued.
    HelloReceived {
        /// Facts the agent reported.
        facts: HostFacts,
        /// Negotiated protocol version.
        version: u16,
        /// Agent clock minus hub clock in milliseconds (positive: agent ahead), not
        /// corrected for transit time.
        clock_skew_ms: i64,
    },
    /// A heartbeat arrived; its answer is queued.
    HeartbeatReceived {
        /// The heartbeat's sequence number.
        seq: u64,
        /// Agent clock minus hub clock in milliseconds (positive: agent ahead), not
        /// corrected for transit time.
        clock_skew_ms: i64,
    },
    /// Nothing was heard from the agent within the liveness timeout. Emitted once; the
    /// session is then closed. Close the connection with [`ErrorCode::Timeout`].
    LivenessLost,
    /// A message for the IO layer to handle (renew requests, acks).
    Message(AgentMessage),
}

/// Hub side of one authenticated connection's control stream.
///
/// Waits for the agent's [`Hello`], answers with a [`Welcome`] (or an in-band error),
/// answers heartbeats and watches the agent's liveness.
#[derive(Debug)]
pub struct HubSession {
    config: SessionConfig,
    versions: VersionRange,
    agent_id: String,
    org: String,
    life: Life,
    version: Option<u16>,
    last_heard: Timestamp,
    transmit: VecDeque<HubMessage>,
    events: VecDeque<HubEvent>,
}

impl HubSession {
    /// A session for the agent the IO layer authenticated as `agent_id` in `org`,
    /// speaking [`VersionRange::CURRENT`]. The config is normalised (see
    /// [`SessionConfig::normalized`]) and announced to the agent in the welcome.
    pub fn new(config: SessionConfig, now: Timestamp, agent_id: impl Into<String>, org: impl Into<String>) -> Self {
        Self::with_versions(config, now, agent_id, org, VersionRange::CURRENT)
    }

    /// Like [`Self::new`], speaking `versions` instead of the current range.
    pub fn with_versions(config: SessionConfig, now: Timestamp, agent_id: impl Into<String>, org: impl Into<String>, versions: VersionRange) -> Self {
        HubSession {
            config: config.normalized(),
            versions,
            agent_id: agent_id.into(),
            org: org.into(),
            life: Life::Running,
            version: None,
            last_heard: now,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Process one message from the agent. `wall_unix_ms` is the hub's wall clock now.
    ///
    /// An error is fatal: an in-band [`HubMessage::Error`] is queued for the agent, the
    /// session closes, and the IO layer should flush the queue and close the connection
    /// with [`SessionError::code`]. Messages arriving after the session closed are
    /// ignored.
    pub fn handle_message(&mut self, now: Timestamp, wall_unix_ms: i64, msg: AgentMessage) -> Result<(), SessionError> {
        if self.life == Life::Closed {
            return Ok(());
        }
        self.last_heard = self.last_heard.max(now);
        let result = self.dispatch(wall_unix_ms, msg);
        if let Err(e) = &result {
            self.life = Life::Closed;
            self.transmit.push_back(HubMessage::Error(ProtocolError { code: e.code(), message: e.to_string() }));
        }
        result
    }

    fn dispatch(&mut self, wall_unix_ms: i64, msg: AgentMessage) -> Result<(), SessionError> {
        match (self.version, msg) {
            // Drained before the hello arrived: the agent was told to leave, so it is not
            // welcomed (a welcome after a drain would be a protocol error on its side).
            (None, AgentMessage::Hello(_)) if self.life == Life::Draining => Ok(()),
            (None, AgentMessage::Hello(hello)) => {
                let version = negotiate(hello.versions, self.versions)?;
                self.version = Some(version);
                self.transmit.push_back(HubMessage::Welcome(Welcome {
                    version,
                    agent_id: self.agent_id.clone(),
                    org: self.org.clone(),
                    heartbeat_interval_ms: duration_to_ms(self.config.heartbeat_interval),
                    liveness_timeout_ms: duration_to_ms(self.config.liveness_timeout),
                    hub_clock_unix_ms: wall_unix_ms,
                }));
                self.events.push_back(HubEvent::HelloReceived {
                    facts: hello.facts,
                    version,
                    clock_skew_ms: wall_diff(hello.agent_clock_unix_ms, wall_unix_ms),
                });
                Ok(())
            }
            (None, other) => Err(SessionError::Protocol(format!("agent sent {} before hello", agent_message_name(&other)))),
            (Some(_), AgentMessage::Hello(_)) => Err(SessionError::Protocol("agent sent a second hello".into())),
            (Some(_), AgentMessage::Enroll(_)) => Err(SessionError::Protocol("agent sent enroll on an authenticated session".into())),
            (Some(_), AgentMessage::Heartbeat(hb)) => {
                self.transmit.push_back(HubMessage::HeartbeatAck(HeartbeatAck { seq: hb.seq, hub_clock_unix_ms: wall_unix_ms }));
                self.events.push_back(HubEvent::HeartbeatReceived { seq: hb.seq, clock_skew_ms: wall_diff(hb.agent_clock_unix_ms, wall_unix_ms) });
                Ok(())
            }
            (Some(version), AgentMessage::SpoolState(_)) if version < crate::SPOOL_STATE_VERSION => {
                Err(SessionError::Protocol(format!("agent sent SpoolState on a version {version} session (needs {})", crate::SPOOL_STATE_VERSION)))
            }
            (Some(_), other) => {
                self.events.push_back(HubEvent::Message(other));
                Ok(())
            }
        }
    }

    /// Let time pass: gives up on the agent (one [`HubEvent::LivenessLost`]) once nothing
    /// was heard for the liveness timeout. The deadline keeps running while draining.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if self.life == Life::Closed {
            return;
        }
        if now >= self.liveness_deadline() {
            self.life = Life::Closed;
            self.events.push_back(HubEvent::LivenessLost);
        }
    }

    fn liveness_deadline(&self) -> Timestamp {
        self.last_heard.saturating_add(self.config.liveness_timeout)
    }

    /// Ask the agent to close and come back after `retry_after`, with a generic reason.
    pub fn drain(&mut self, retry_after: Duration) {
        self.drain_with_reason(retry_after, DEFAULT_DRAIN_REASON);
    }

    /// Ask the agent to close and come back after `retry_after`, telling it why.
    /// Does nothing once the session is closed or already draining.
    pub fn drain_with_reason(&mut self, retry_after: Duration, reason: impl Into<String>) {
        if self.life != Life::Running {
            return;
        }
        self.life = Life::Draining;
        self.transmit.push_back(HubMessage::Drain(Drain { retry_after_ms: duration_to_ms_ceil(retry_after), reason: reason.into() }));
    }

    /// Queue a message for the agent (acks, renewals), sent after anything queued before.
    pub fn queue(&mut self, msg: HubMessage) {
        self.transmit.push_back(msg);
    }

    /// The next message to send to the agent, in order.
    pub fn poll_transmit(&mut self) -> Option<HubMessage> {
        self.transmit.pop_front()
    }

    /// When [`Self::handle_timeout`] must next be called (the liveness deadline); `None`
    /// once closed.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        if self.life == Life::Closed {
            return None;
        }
        Some(self.liveness_deadline())
    }

    /// The next event for the IO layer.
    pub fn poll_event(&mut self) -> Option<HubEvent> {
        self.events.pop_front()
    }

    /// Whether the agent's hello was accepted (and the session has not closed since).
    pub fn is_established(&self) -> bool {
        self.version.is_some() && self.life != Life::Closed
    }

    /// Negotiated protocol version, once the hello was accepted.
    pub fn version(&self) -> Option<u16> {
        self.version
    }

    /// Timing in force (normalised), as announced in the welcome.
    pub fn config(&self) -> SessionConfig {
        self.config
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::message::{Ack, RenewRequest, StreamClass};

    /// Agent's wall clock is this far ahead of the hub's in the simulated world.
    const AGENT_AHEAD_MS: i64 = 1_500;
    const HUB_WALL_ORIGIN: i64 = 1_700_000_000_000;
    const LATENCY: Duration = Duration::from_millis(20);

    fn facts() -> HostFacts {
        HostFacts { hostname: "web-1".into(), arch: "x86_64".into(), cpu_count: 4, ..HostFacts::default() }
    }

    fn hub_wall(now: Timestamp) -> i64 {
        HUB_WALL_ORIGIN + now.0 as i64
    }

    fn agent_wall(now: Timestamp) -> i64 {
        hub_wall(now) + AGENT_AHEAD_MS
    }

    /// An agent and a hub session wired together on a virtual clock, with a fixed one-way
    /// latency and switches to lose everything sent in one direction.
    struct World {
        now: Timestamp,
        agent: AgentSession,
        hub: HubSession,
        to_hub: VecDeque<(Timestamp, AgentMessage)>,
        to_agent: VecDeque<(Timestamp, HubMessage)>,
        lose_to_hub: bool,
        lose_to_agent: bool,
        agent_events: Vec<(Timestamp, SessionEvent)>,
        hub_events: Vec<(Timestamp, HubEvent)>,
        agent_errors: Vec<(Timestamp, SessionError)>,
        hub_errors: Vec<(Timestamp, SessionError)>,
        delivered_to_agent: Vec<(Timestamp, HubMessage)>,
        delivered_to_hub: Vec<(Timestamp, AgentMessage)>,
    }

    impl World {
        fn new(agent_versions: VersionRange, hub_config: SessionConfig) -> World {
            let now = Timestamp(0);
            World {
                now,
                agent: AgentSession::with_versions(SessionConfig::default(), now, facts(), agent_wall(now), agent_versions),
                hub: HubSession::new(hub_config, now, "agent-42", "acme"),
                to_hub: VecDeque::new(),
                to_agent: VecDeque::new(),
                lose_to_hub: false,
                lose_to_agent: false,
                agent_events: Vec::new(),
                hub_events: Vec::new(),
                agent_errors: Vec::new(),
                hub_errors: Vec::new(),
                delivered_to_agent: Vec::new(),
                delivered_to_hub: Vec::new(),
            }
        }

        fn standard() -> World {
            World::new(VersionRange::CURRENT, SessionConfig::default())
        }

        fn flush(&mut self) {
            let arrival = self.now.saturating_add(LATENCY);
            while let Some(m) = self.agent.poll_transmit() {
                if !self.lose_to_hub {
                    self.to_hub.push_back((arrival, m));
                }
            }
            while let Some(m) = self.hub.poll_transmit() {
                if !self.lose_to_agent {
                    self.to_agent.push_back((arrival, m));
                }
            }
            while let Some(e) = self.agent.poll_event() {
                self.agent_events.push((self.now, e));
            }
            while let Some(e) = self.hub.poll_event() {
                self.hub_events.push((self.now, e));
            }
        }

        /// Advance to the next thing that happens and handle it. False once nothing is
        /// left to happen or `limit` would be passed.
        fn step(&mut self, limit: Timestamp) -> bool {
            self.flush();
            let next = [self.agent.poll_timeout(), self.hub.poll_timeout(), self.to_hub.front().map(|(t, _)| *t), self.to_agent.front().map(|(t, _)| *t)]
                .into_iter()
                .flatten()
                .min();
            let Some(next) = next else { return false };
            if next > limit {
                return false;
            }
            assert!(next >= self.now, "time must not go backwards");
            self.now = next;
            let now = self.now;
            while self.to_hub.front().is_some_and(|(t, _)| *t <= now) {
                let Some((_, m)) = self.to_hub.pop_front() else { break };
                self.delivered_to_hub.push((now, m.clone()));
                if let Err(e) = self.hub.handle_message(now, hub_wall(now), m) {
                    self.hub_errors.push((now, e));
                }
            }
            while self.to_agent.front().is_some_and(|(t, _)| *t <= now) {
                let Some((_, m)) = self.to_agent.pop_front() else { break };
                self.delivered_to_agent.push((now, m.clone()));
                if let Err(e) = self.agent.handle_message(now, agent_wall(now), m) {
                    self.agent_errors.push((now, e));
                }
            }
            if self.agent.poll_timeout().is_some_and(|t| t <= now) {
                self.agent.handle_timeout(now, agent_wall(now));
            }
            if self.hub.poll_timeout().is_some_and(|t| t <= now) {
                self.hub.handle_timeout(now);
            }
            self.flush();
            true
        }

        fn run_until(&mut self, limit: Timestamp) {
            let mut steps = 0;
            while self.step(limit) {
                steps += 1;
                assert!(steps < 100_000, "simulation does not settle");
            }
        }

        fn run_for(&mut self, d: Duration) {
            let limit = self.now.saturating_add(d);
            self.run_until(limit);
        }

        fn heartbeats_at_hub(&self) -> Vec<Timestamp> {
            self.delivered_to_hub.iter().filter(|(_, m)| matches!(m, AgentMessage::Heartbeat(_))).map(|(t, _)| *t).collect()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    // --- timestamps and negotiation ---

    #[test]
    fn timestamp_arithmetic_saturates_and_rounds_up() {
        assert_eq!(Timestamp(10).saturating_add(ms(5)), Timestamp(15));
        assert_eq!(Timestamp(10).saturating_add(Duration::from_micros(1)), Timestamp(11));
        assert_eq!(Timestamp(u64::MAX - 1).saturating_add(ms(5)), Timestamp(u64::MAX));
        assert_eq!(Timestamp(0).saturating_add(Duration::MAX), Timestamp(u64::MAX));
        assert_eq!(Timestamp(15).saturating_duration_since(Timestamp(10)), ms(5));
        assert_eq!(Timestamp(10).saturating_duration_since(Timestamp(15)), Duration::ZERO);
    }

    #[test]
    fn negotiate_picks_the_highest_common_version() {
        let r = |min, max| VersionRange { min, max };
        assert_eq!(negotiate(r(1, 1), r(1, 1)), Ok(1));
        assert_eq!(negotiate(r(1, 5), r(2, 3)), Ok(3));
        assert_eq!(negotiate(r(3, 7), r(1, 4)), Ok(4));
        assert_eq!(negotiate(r(0, u16::MAX), r(u16::MAX, u16::MAX)), Ok(u16::MAX));
    }

    #[test]
    fn negotiate_reports_disjoint_and_inverted_ranges_clearly() {
        let r = |min, max| VersionRange { min, max };
        let err = negotiate(r(1, 1), r(2, 3)).unwrap_err();
        assert_eq!(err, VersionMismatch { agent: r(1, 1), hub: r(2, 3) });
        assert_eq!(err.to_string(), "no protocol version in common: agent speaks 1..=1, hub speaks 2..=3");
        assert!(negotiate(r(3, 1), r(1, 3)).is_err());
        assert!(negotiate(r(1, 3), r(2, 1)).is_err());
        assert_eq!(SessionError::from(err).code(), ErrorCode::VersionUnsupported);
    }

    #[test]
    fn session_config_is_clamped_to_sane_bounds() {
        let c = SessionConfig { heartbeat_interval: Duration::ZERO, liveness_timeout: Duration::ZERO }.normalized();
        assert_eq!(c, SessionConfig { heartbeat_interval: ms(100), liveness_timeout: ms(200) });
        let c = SessionConfig { heartbeat_interval: Duration::MAX, liveness_timeout: Duration::MAX }.normalized();
        assert_eq!(c.heartbeat_interval, MAX_HEARTBEAT_INTERVAL);
        assert_eq!(c.liveness_timeout, MAX_LIVENESS_TIMEOUT);
        assert_eq!(SessionConfig::default().normalized(), SessionConfig::default());
        assert_eq!(SessionConfig::default().heartbeat_interval, Duration::from_secs(5));
        assert_eq!(SessionConfig::default().liveness_timeout, Duration::from_secs(15));
    }

    // --- handshake, heartbeats, liveness ---

    #[test]
    fn handshake_establishes_and_negotiates() {
        let mut w = World::standard();
        assert!(!w.agent.is_established());
        w.run_for(ms(100));
        assert!(w.agent.is_established());
        assert!(w.hub.is_established());
        assert_eq!(w.agent.version(), Some(crate::PROTOCOL_VERSION_MAX));
        assert_eq!(w.hub.version(), Some(crate::PROTOCOL_VERSION_MAX));
        assert_eq!(
            w.hub_events,
            vec![(Timestamp(20), HubEvent::HelloReceived { facts: facts(), version: crate::PROTOCOL_VERSION_MAX, clock_skew_ms: AGENT_AHEAD_MS - 20 })]
        );
        assert_eq!(
            w.agent_events,
            vec![(Timestamp(40), SessionEvent::Established { version: crate::PROTOCOL_VERSION_MAX, agent_id: "agent-42".into(), org: "acme".into() })]
        );
        // The welcome gives a first skew estimate: hello at 0, welcome at 40, hub read its
        // clock at 20, so the symmetric estimate is exact.
        assert_eq!(w.agent.clock_skew_ms(), Some(AGENT_AHEAD_MS));
        assert!(w.agent_errors.is_empty() && w.hub_errors.is_empty());
    }

    #[test]
    fn heartbeats_flow_every_interval_and_measure_rtt_and_skew() {
        let mut w = World::standard();
        w.run_for(Duration::from_secs(60));
        let beats = w.heartbeats_at_hub();
        // Established at 40; heartbeats sent at 5040, 10040, ... arrive 20 ms later.
        assert_eq!(beats.len(), 11, "{beats:?}");
        assert_eq!(beats[0], Timestamp(5_060));
        for pair in beats.windows(2) {
            assert_eq!(pair[1].saturating_duration_since(pair[0]), DEFAULT_HEARTBEAT_INTERVAL);
        }
        assert_eq!(w.agent.rtt(), Some(ms(40)));
        assert_eq!(w.agent.clock_skew_ms(), Some(AGENT_AHEAD_MS));
        let seqs_and_skews: Vec<(u64, i64)> = w
            .hub_events
            .iter()
            .filter_map(|(_, e)| match e {
                HubEvent::HeartbeatReceived { seq, clock_skew_ms } => Some((*seq, *clock_skew_ms)),
                _ => None,
            })
            .collect();
        assert_eq!(seqs_and_skews.len(), 11);
        for (i, (seq, skew)) in seqs_and_skews.iter().enumerate() {
            assert_eq!(*seq, i as u64);
            assert_eq!(*skew, AGENT_AHEAD_MS - 20, "hub sees skew minus one-way latency");
        }
        // Neither side gave up.
        assert!(w.agent.poll_timeout().is_some() && w.hub.poll_timeout().is_some());
        assert!(!w.agent_events.iter().any(|(_, e)| *e == SessionEvent::LivenessLost));
        assert!(!w.hub_events.iter().any(|(_, e)| *e == HubEvent::LivenessLost));
    }

    #[test]
    fn agent_adopts_the_hubs_timing_from_the_welcome() {
        let hub_config = SessionConfig { heartbeat_interval: ms(1_000), liveness_timeout: ms(3_000) };
        let mut w = World::new(VersionRange::CURRENT, hub_config);
        w.run_for(Duration::from_secs(10));
        assert_eq!(w.agent.config(), hub_config);
        let beats = w.heartbeats_at_hub();
        assert_eq!(beats.len(), 9);
        assert_eq!(beats[1].saturating_duration_since(beats[0]), ms(1_000));
    }

    #[test]
    fn agent_clamps_absurd_timing_in_the_welcome() {
        let mut agent = AgentSession::new(SessionConfig::default(), Timestamp(0), facts(), 0);
        let welcome = Welcome {
            version: crate::PROTOCOL_VERSION_MAX,
            agent_id: "a".into(),
            org: "o".into(),
            heartbeat_interval_ms: 0,
            liveness_timeout_ms: 0,
            hub_clock_unix_ms: 0,
        };
        agent.handle_message(Timestamp(10), 10, HubMessage::Welcome(welcome.clone())).unwrap();
        assert_eq!(agent.config(), SessionConfig { heartbeat_interval: ms(100), liveness_timeout: ms(200) });
        assert_eq!(agent.poll_timeout(), Some(Timestamp(110)));

        let mut agent = AgentSession::new(SessionConfig::default(), Timestamp(0), facts(), 0);
        let welcome = Welcome { heartbeat_interval_ms: u64::MAX, liveness_timeout_ms: 1, ..welcome };
        agent.handle_message(Timestamp(10), 10, HubMessage::Welcome(welcome)).unwrap();
        assert_eq!(agent.config().heartbeat_interval, MAX_HEARTBEAT_INTERVAL);
        assert_eq!(agent.config().liveness_timeout, MAX_HEARTBEAT_INTERVAL * 2);
    }

    #[test]
    fn hub_silence_makes_the_agent_give_up_exactly_at_the_deadline() {
        let mut w = World::standard();
        w.run_for(Duration::from_secs(12));
        w.lose_to_agent = true;
        w.run_for(Duration::from_secs(60));
        let last_heard = w.delivered_to_agent.last().map(|(t, _)| *t).unwrap();
        let lost: Vec<Timestamp> = w.agent_events.iter().filter(|(_, e)| *e == SessionEvent::LivenessLost).map(|(t, _)| *t).collect();
        assert_eq!(lost, vec![last_heard.saturating_add(DEFAULT_LIVENESS_TIMEOUT)]);
        assert_eq!(w.agent.poll_timeout(), None);
        assert!(!w.agent.is_established());
        // Once lost, no further heartbeats leave the agent.
        w.agent.handle_timeout(Timestamp(1_000_000), 0);
        assert_eq!(w.agent.poll_transmit(), None);
        assert_eq!(w.agent.poll_event(), None);
    }

    #[test]
    fn agent_gives_up_if_no_welcome_arrives() {
        let mut w = World::standard();
        w.lose_to_agent = true;
        w.run_for(Duration::from_secs(60));
        assert_eq!(w.agent_events, vec![(Timestamp(15_000), SessionEvent::LivenessLost)]);
    }

    #[test]
    fn agent_silence_makes_the_hub_give_up() {
        let mut w = World::standard();
        w.run_for(Duration::from_secs(12));
        w.lose_to_hub = true;
        w.run_for(Duration::from_secs(60));
        let last_heard = w.delivered_to_hub.last().map(|(t, _)| *t).unwrap();
        let lost: Vec<Timestamp> = w.hub_events.iter().filter(|(_, e)| *e == HubEvent::LivenessLost).map(|(t, _)| *t).collect();
        assert_eq!(lost, vec![last_heard.saturating_add(DEFAULT_LIVENESS_TIMEOUT)]);
        assert_eq!(w.hub.poll_timeout(), None);
        assert!(!w.hub.is_established());
    }

    #[test]
    fn hub_gives_up_on_a_connection_that_never_says_hello() {
        let mut hub = HubSession::new(SessionConfig::default(), Timestamp(0), "a", "o");
        assert_eq!(hub.poll_timeout(), Some(Timestamp(15_000)));
        hub.handle_timeout(Timestamp(14_999));
        assert_eq!(hub.poll_event(), None);
        hub.handle_timeout(Timestamp(15_000));
        assert_eq!(hub.poll_event(), Some(HubEvent::LivenessLost));
        hub.handle_timeout(Timestamp(30_000));
        assert_eq!(hub.poll_event(), None, "liveness lost is reported once");
    }

    // --- errors ---

    #[test]
    fn version_mismatch_is_a_clear_error_on_both_sides() {
        let (min, max) = (crate::PROTOCOL_VERSION_MAX + 1, crate::PROTOCOL_VERSION_MAX + 2);
        let mut w = World::new(VersionRange { min, max }, SessionConfig::default());
        w.run_for(ms(100));
        let expected = format!("no protocol version in common: agent speaks {min}..={max}, hub speaks 1..={}", crate::PROTOCOL_VERSION_MAX);
        assert_eq!(w.hub_errors.len(), 1);
        assert_eq!(w.hub_errors[0].1.code(), ErrorCode::VersionUnsupported);
        assert_eq!(w.hub_errors[0].1.to_string(), expected);
        assert_eq!(w.agent_errors.len(), 1);
        let SessionError::Remote(remote) = &w.agent_errors[0].1 else {
            panic!("agent should see the hub's error: {:?}", w.agent_errors);
        };
        assert_eq!(remote.code, ErrorCode::VersionUnsupported);
        assert_eq!(remote.message, expected);
        assert_eq!(w.agent_errors[0].1.code(), ErrorCode::VersionUnsupported);
        assert!(!w.agent.is_established() && !w.hub.is_established());
        assert_eq!(w.agent.poll_timeout(), None);
        assert_eq!(w.hub.poll_timeout(), None);
    }

    #[test]
    fn agent_refuses_a_welcome_outside_its_range() {
        let mut agent = AgentSession::new(SessionConfig::default(), Timestamp(0), facts(), 0);
        let welcome =
            Welcome { version: 9, agent_id: "a".into(), org: "o".into(), heartbeat_interval_ms: 5_000, liveness_timeout_ms: 15_000, hub_clock_unix_ms: 0 };
        let err = agent.handle_message(Timestamp(1), 1, HubMessage::Welcome(welcome)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::VersionUnsupported);
        assert_eq!(err.to_string(), format!("no protocol version in common: agent speaks 1..={}, hub speaks 9..=9", crate::PROTOCOL_VERSION_MAX));
        assert!(!agent.is_established());
        assert_eq!(agent.poll_event(), None);
    }

    #[test]
    fn hub_refuses_anything_before_hello() {
        for first in [
            AgentMessage::Heartbeat(Heartbeat { seq: 0, agent_clock_unix_ms: 0 }),
            AgentMessage::Ack(Ack { stream: StreamClass::Logs, up_to_seq: 1 }),
            AgentMessage::Renew(RenewRequest { csr_der: vec![1] }),
            AgentMessage::Enroll(crate::message::EnrollRequest {
                token_id: "t".into(),
                token_secret: "s".into(),
                csr_der: vec![],
                facts: facts(),
                labels: Vec::new(),
            }),
        ] {
            let mut hub = HubSession::new(SessionConfig::default(), Timestamp(0), "a", "o");
            let err = hub.handle_message(Timestamp(1), 0, first).unwrap_err();
            assert_eq!(err.code(), ErrorCode::Protocol);
            assert!(err.to_string().contains("before hello"), "{err}");
            let Some(HubMessage::Error(e)) = hub.poll_transmit() else { panic!("no in-band error") };
            assert_eq!(e.code, ErrorCode::Protocol);
            assert_eq!(hub.poll_transmit(), None);
            assert_eq!(hub.poll_timeout(), None);
            // Later messages are ignored.
            let hello = AgentMessage::Hello(Hello { versions: VersionRange::CURRENT, facts: facts(), agent_clock_unix_ms: 0 });
            assert_eq!(hub.handle_message(Timestamp(2), 0, hello), Ok(()));
            assert_eq!(hub.poll_transmit(), None);
            assert_eq!(hub.poll_event(), None);
        }
    }

    #[test]
    fn hub_refuses_enroll_and_a_second_hello_on_an_established_session() {
        let hello = AgentMessage::Hello(Hello { versions: VersionRange::CURRENT, facts: facts(), agent_clock_unix_ms: 0 });
        let enroll = AgentMessage::Enroll(crate::message::EnrollRequest {
            token_id: "t".into(),
            token_secret: "s".into(),
            csr_der: vec![],
            facts: facts(),
            labels: Vec::new(),
        });
        for second in [hello.clone(), enroll] {
            let mut hub = HubSession::new(SessionConfig::default(), Timestamp(0), "a", "o");
            hub.handle_message(Timestamp(1), 0, hello.clone()).unwrap();
            assert!(matches!(hub.poll_transmit(), Some(HubMessage::Welcome(_))));
            let err = hub.handle_message(Timestamp(2), 0, second).unwrap_err();
            assert_eq!(err.code(), ErrorCode::Protocol);
            assert!(matches!(hub.poll_transmit(), Some(HubMessage::Error(_))));
        }
    }

    #[test]
    fn spool_state_is_delivered_from_version_3_and_refused_before() {
        let state = crate::message::SpoolState {
            streams: vec![crate::message::SpoolStream { class: StreamClass::Logs, records: 7, bytes: 700, cap_bytes: 4096, dropped_records: 1 }],
        };
        for (max, accepted) in [(crate::SPOOL_STATE_VERSION, true), (crate::SPOOL_STATE_VERSION - 1, false)] {
            let mut hub = HubSession::new(SessionConfig::default(), Timestamp(0), "a", "o");
            let hello = AgentMessage::Hello(Hello { versions: VersionRange { min: 1, max }, facts: facts(), agent_clock_unix_ms: 0 });
            hub.handle_message(Timestamp(1), 0, hello).unwrap();
            assert!(matches!(hub.poll_transmit(), Some(HubMessage::Welcome(w)) if w.version == max));
            let _hello = hub.poll_event();
            let result = hub.handle_message(Timestamp(2), 0, AgentMessage::SpoolState(state.clone()));
            if accepted {
                assert_eq!(result, Ok(()));
                assert_eq!(hub.poll_event(), Some(HubEvent::Message(AgentMessage::SpoolState(state.clone()))));
            } else {
                let err = result.unwrap_err();
                assert_eq!(err.code(), ErrorCode::Protocol);
                assert!(err.to_string().contains("SpoolState on a version 2 session"), "{err}");
            }
        }
    }

    #[test]
    fn agent_refuses_anything_but_welcome_error_or_drain_before_welcome() {
        for first in [
            HubMessage::HeartbeatAck(HeartbeatAck { seq: 0, hub_clock_unix_ms: 0 }),
            HubMessage::Ack(Ack { stream: StreamClass::Metrics, up_to_seq: 0 }),
            HubMessage::RenewRefused { reason: "no".into() },
        ] {
            let mut agent = AgentSession::new(SessionConfig::default(), Timestamp(0), facts(), 0);
            let err = agent.handle_message(Timestamp(1), 0, first).unwrap_err();
            assert_eq!(err.code(), ErrorCode::Protocol);
            assert!(err.to_string().contains("before welcome"), "{err}");
            assert_eq!(agent.poll_timeout(), None);
        }
    }

    #[test]
    fn agent_surfaces_other_messages_and_sends_queued_ones_in_order() {
        let mut w = World::standard();
        w.run_for(ms(100));
        w.agent.queue(AgentMessage::Renew(RenewRequest { csr_der: vec![7] }));
        w.agent.queue(AgentMessage::Ack(Ack { stream: StreamClass::Events, up_to_seq: 3 }));
        w.hub.queue(HubMessage::RenewRefused { reason: "later".into() });
        w.run_for(ms(100));
        let at_hub: Vec<&HubEvent> = w.hub_events.iter().map(|(_, e)| e).skip(1).collect();
        assert_eq!(
            at_hub,
            vec![
                &HubEvent::Message(AgentMessage::Renew(RenewRequest { csr_der: vec![7] })),
                &HubEvent::Message(AgentMessage::Ack(Ack { stream: StreamClass::Events, up_to_seq: 3 })),
            ]
        );
        assert_eq!(w.agent_events.last().map(|(_, e)| e), Some(&SessionEvent::Message(HubMessage::RenewRefused { reason: "later".into() })));
    }

    #[test]
    fn heartbeat_ack_for_a_heartbeat_never_sent_is_a_protocol_error() {
        let mut w = World::standard();
        w.run_for(ms(100));
        let ack = HubMessage::HeartbeatAck(HeartbeatAck { seq: 5, hub_clock_unix_ms: 0 });
        let err = w.agent.handle_message(w.now, 0, ack).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Protocol);
    }

    #[test]
    fn outstanding_heartbeats_are_bounded_and_stale_acks_ignored() {
        let mut w = World::standard();
        w.run_for(ms(100));
        // The hub stops answering for a while; the agent keeps at most 16 outstanding.
        w.lose_to_agent = true;
        let hub_config = SessionConfig { heartbeat_interval: ms(100), liveness_timeout: Duration::from_secs(60) };
        let mut agent = AgentSession::new(hub_config, Timestamp(0), facts(), 0);
        let welcome =
            Welcome { version: 1, agent_id: "a".into(), org: "o".into(), heartbeat_interval_ms: 100, liveness_timeout_ms: 60_000, hub_clock_unix_ms: 0 };
        agent.handle_message(Timestamp(0), 0, HubMessage::Welcome(welcome)).unwrap();
        for i in 1..=40u64 {
            agent.handle_timeout(Timestamp(i * 100), (i * 100) as i64);
        }
        assert_eq!(agent.outstanding.len(), MAX_OUTSTANDING_HEARTBEATS);
        // Seq 0 was forgotten: its late answer is ignored without error or sample.
        agent.handle_message(Timestamp(4_050), 4_050, HubMessage::HeartbeatAck(HeartbeatAck { seq: 0, hub_clock_unix_ms: 0 })).unwrap();
        assert_eq!(agent.rtt(), None);
        // Answering seq 39 (sent at 4000) gives a sample and clears everything older.
        agent.handle_message(Timestamp(4_060), 4_060, HubMessage::HeartbeatAck(HeartbeatAck { seq: 39, hub_clock_unix_ms: 4_030 })).unwrap();
        assert_eq!(agent.rtt(), Some(ms(60)));
        assert_eq!(agent.clock_skew_ms(), Some(0));
        assert!(agent.outstanding.is_empty());
        // SRTT smoothing: 7/8 old + 1/8 new.
        agent.handle_timeout(Timestamp(4_100), 4_100);
        agent.handle_message(Timestamp(4_240), 4_240, HubMessage::HeartbeatAck(HeartbeatAck { seq: 40, hub_clock_unix_ms: 4_170 })).unwrap();
        assert_eq!(agent.rtt(), Some((ms(60) * 7 + ms(140)) / 8));
    }

    #[test]
    fn drain_propagates_retry_after_and_stops_the_agents_timers() {
        let mut w = World::standard();
        w.run_for(Duration::from_secs(7));
        w.hub.drain(Duration::from_secs(30));
        w.run_for(ms(100));
        let drained: Vec<&SessionEvent> = w.agent_events.iter().map(|(_, e)| e).filter(|e| matches!(e, SessionEvent::Drained { .. })).collect();
        assert_eq!(drained, vec![&SessionEvent::Drained { retry_after: Duration::from_secs(30) }]);
        assert_eq!(w.agent.poll_timeout(), None);
        let Some(HubMessage::Drain(d)) = w.delivered_to_agent.last().map(|(_, m)| m.clone()) else {
            panic!("no drain delivered");
        };
        assert_eq!(d.reason, DEFAULT_DRAIN_REASON);

        // The IO layer feeds the retry-after to the backoff.
        let mut backoff = Backoff::default();
        backoff.retry_after(Duration::from_secs(30));
        let delay = backoff.next_delay(u64::MAX / 3);
        assert!(delay >= Duration::from_secs(30) && delay <= Duration::from_secs(45), "{delay:?}");
    }

    #[test]
    fn hub_drained_before_hello_does_not_welcome() {
        let mut w = World::standard();
        w.hub.drain_with_reason(ms(2_000), "overloaded");
        w.run_for(ms(100));
        assert!(w.hub_errors.is_empty() && w.agent_errors.is_empty(), "{:?} {:?}", w.hub_errors, w.agent_errors);
        assert_eq!(w.agent_events, vec![(Timestamp(20), SessionEvent::Drained { retry_after: ms(2_000) })]);
        assert!(w.hub_events.is_empty());
        assert!(!w.agent.is_established() && !w.hub.is_established());
        // The hub still gives up on a connection that lingers.
        w.run_for(Duration::from_secs(20));
        assert_eq!(w.hub_events, vec![(Timestamp(15_020), HubEvent::LivenessLost)]);
    }

    #[test]
    fn drain_before_welcome_is_accepted() {
        let mut agent = AgentSession::new(SessionConfig::default(), Timestamp(0), facts(), 0);
        let drain = HubMessage::Drain(Drain { retry_after_ms: 1_500, reason: "overloaded".into() });
        agent.handle_message(Timestamp(5), 5, drain).unwrap();
        assert_eq!(agent.poll_event(), Some(SessionEvent::Drained { retry_after: ms(1_500) }));
        assert_eq!(agent.poll_timeout(), None);
    }

    #[test]
    fn remote_error_carries_its_code() {
        let mut agent = AgentSession::new(SessionConfig::default(), Timestamp(0), facts(), 0);
        let e = ProtocolError { code: ErrorCode::Revoked, message: "revoked by operator".into() };
        let err = agent.handle_message(Timestamp(1), 1, HubMessage::Error(e.clone())).unwrap_err();
        assert_eq!(err, SessionError::Remote(e));
        assert_eq!(err.code(), ErrorCode::Revoked);
        assert_eq!(SessionError::Protocol("x".into()).code(), ErrorCode::Protocol);
    }

    // --- backoff ---

    /// A small deterministic generator for tests (splitmix64).
    fn randoms(mut state: u64, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            })
            .collect()
    }

    #[test]
    fn backoff_defaults() {
        assert_eq!(BackoffConfig::default(), BackoffConfig { base: ms(250), cap: Duration::from_secs(5) });
    }

    #[test]
    fn backoff_grows_to_the_cap() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..5).map(|_| b.next_delay(u64::MAX)).collect();
        assert_eq!(delays, vec![ms(750), ms(2_250), ms(5_000), ms(5_000), ms(5_000)]);
        // With the lowest random input it stays at base.
        let mut b = Backoff::default();
        assert!((0..5).all(|_| b.next_delay(0) == ms(250)));
    }

    #[test]
    fn backoff_stays_within_base_and_cap() {
        let mut b = Backoff::default();
        let mut max_seen = Duration::ZERO;
        for r in randoms(1, 10_000) {
            let d = b.next_delay(r);
            assert!(d >= DEFAULT_BACKOFF_BASE && d <= DEFAULT_BACKOFF_CAP, "{d:?}");
            max_seen = max_seen.max(d);
        }
        assert!(max_seen > Duration::from_secs(4), "jitter should reach near the cap: {max_seen:?}");
    }

    #[test]
    fn backoff_is_deterministic_for_the_same_randoms() {
        let rs = randoms(42, 50);
        let run = |rs: &[u64]| {
            let mut b = Backoff::default();
            rs.iter().map(|r| b.next_delay(*r)).collect::<Vec<_>>()
        };
        assert_eq!(run(&rs), run(&rs));
        assert_ne!(run(&rs), run(&randoms(43, 50)));
    }

    #[test]
    fn backoff_reset_starts_over_from_base() {
        let mut b = Backoff::default();
        for _ in 0..4 {
            b.next_delay(u64::MAX);
        }
        b.reset();
        assert_eq!(b.next_delay(u64::MAX), ms(750));
        b.reset();
        assert_eq!(b.next_delay(0), ms(250));
    }

    #[test]
    fn backoff_honours_retry_after_beyond_the_cap_then_resumes() {
        let mut b = Backoff::default();
        for _ in 0..4 {
            b.next_delay(u64::MAX);
        }
        let d = Duration::from_secs(60);
        b.retry_after(d);
        assert_eq!(b.clone().next_delay(0), d);
        assert_eq!(b.clone().next_delay(u64::MAX), Duration::from_secs(90));
        for r in randoms(7, 100) {
            let mut b2 = b.clone();
            let delay = b2.next_delay(r);
            assert!(delay >= d && delay <= d + d / 2, "{delay:?}");
            // After that one delay, normal backoff resumes from base.
            assert!(b2.next_delay(u64::MAX) == ms(750));
        }
        // Reset does not forget a pending request from the hub; the largest one wins.
        b.retry_after(Duration::from_secs(10));
        b.reset();
        assert!(b.next_delay(0) >= d);
        // A retry-after below base is still honoured as given (plus jitter).
        b.retry_after(ms(10));
        assert_eq!(b.next_delay(0), ms(10));
    }

    #[test]
    fn backoff_survives_extreme_inputs() {
        for config in [
            BackoffConfig { base: Duration::ZERO, cap: Duration::ZERO },
            BackoffConfig { base: Duration::from_secs(10), cap: Duration::from_secs(1) },
            BackoffConfig { base: Duration::MAX, cap: Duration::MAX },
            BackoffConfig { base: ms(1), cap: Duration::MAX },
        ] {
            let mut b = Backoff::new(config);
            let c = b.config();
            assert!(c.base >= ms(1) && c.cap >= c.base);
            for r in [0, u64::MAX, 1, u64::MAX - 1, 0, u64::MAX].into_iter().cycle().take(200) {
                let d = b.next_delay(r);
                assert!(d >= c.base && d <= c.cap, "{config:?}: {d:?}");
            }
            b.retry_after(Duration::MAX);
            assert_eq!(b.next_delay(u64::MAX), Duration::MAX);
            b.retry_after(Duration::MAX);
            assert_eq!(b.next_delay(0), Duration::MAX);
            b.retry_after(Duration::ZERO);
            assert_eq!(b.next_delay(u64::MAX), Duration::ZERO);
        }
    }

    #[test]
    fn uniform_mapping_covers_its_range() {
        assert_eq!(uniform_between(ms(1), ms(3), 0), ms(1));
        assert_eq!(uniform_between(ms(1), ms(3), u64::MAX), ms(3));
        assert_eq!(uniform_between(ms(1), ms(3), u64::MAX / 2), ms(2));
        assert_eq!(uniform_between(ms(3), ms(1), u64::MAX), ms(3));
        assert_eq!(uniform_between(Duration::ZERO, Duration::MAX, u64::MAX), Duration::from_nanos(u64::MAX));
    }

    // --- wall-clock edge cases ---

    #[test]
    fn extreme_wall_clocks_do_not_overflow() {
        assert_eq!(wall_diff(i64::MAX, i64::MIN), i64::MAX);
        assert_eq!(wall_diff(i64::MIN, i64::MAX), i64::MIN);
        assert_eq!(skew_from_exchange(i64::MAX, i64::MAX, i64::MIN), i64::MAX);
        let mut hub = HubSession::new(SessionConfig::default(), Timestamp(0), "a", "o");
        let hello = AgentMessage::Hello(Hello { versions: VersionRange::CURRENT, facts: facts(), agent_clock_unix_ms: i64::MIN });
        hub.handle_message(Timestamp(0), i64::MAX, hello).unwrap();
        assert!(matches!(hub.poll_event(), Some(HubEvent::HelloReceived { clock_skew_ms: i64::MIN, .. })));
    }
}
