//! Gantry's wire protocol: the messages hub and agent exchange, the framing codec that
//! carries them, and the sans-IO session logic (heartbeats, liveness, backoff, version
//! negotiation).
//!
//! This crate does no IO: no sockets, no clock reads, no tokio. Time always comes in as an
//! argument, so every rule here is tested on a virtual clock.

pub mod checks;
pub mod deploy;
pub mod frame;
pub mod message;
pub mod session;
pub mod support;
pub mod telemetry;
pub mod token;

/// ALPN protocol id for agent connections.
pub const ALPN: &[u8] = b"gantry/1";

/// Server name the agent verifies on the hub's certificate. The hub certificate always
/// carries this name besides its public address, because the agent pins the hub's CA by
/// fingerprint and may reach the hub under any address (NAT, proxies, changed DNS).
pub const HUB_SERVER_NAME: &str = "hub.gantry.internal";

/// Oldest protocol version this build speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// Newest protocol version this build speaks. Version 2 adds
/// [`message::HubMessage::TrustedCas`], version 3 [`message::AgentMessage::SpoolState`];
/// everything else is as in version 1.
pub const PROTOCOL_VERSION_MAX: u16 = 3;
/// First protocol version whose agents understand [`message::HubMessage::TrustedCas`].
pub const TRUSTED_CAS_VERSION: u16 = 2;
/// First protocol version whose hubs understand [`message::AgentMessage::SpoolState`].
pub const SPOOL_STATE_VERSION: u16 = 3;
