//! Gantry agent: enrolls with a hub, then keeps one authenticated QUIC session to it,
//! reconnecting on its own through hub restarts and network loss.
//!
//! Entry points: [`enroll::enroll`] and [`connection::run`] (which takes a shutdown future,
//! so tests and the hub's quickstart run agents in-process). `main.rs` only calls
//! [`cli::main`]. Only this crate talks to the host (`/proc`, Docker).

pub mod checks;
pub mod cli;
pub mod collection;
pub mod collector;
pub mod config;
pub mod connection;
pub mod deploy;
pub mod deployer;
pub mod deregister;
pub mod enroll;
pub mod facts;
pub mod metrics;
pub mod preflight;
pub mod spool;
pub mod state;
pub mod support;
pub mod telemetry;
#[cfg(test)]
mod test_dir;
pub mod tls;
pub mod wire;

pub use connection::wall_ms;
