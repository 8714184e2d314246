//! Command line of `gantry-agent`: `enroll`, `run`, and the installer's `preflight` and
//! `deregister`. Parses flags, sets up logging and calls the library; exit code 2 means
//! "needs an operator" (bad token, revoked, expired).

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "gantry-agent", version, about = "Gantry agent: connects this machine to a Gantry hub")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll this machine with a hub using a token from the operator.
    Enroll {
        /// Enrollment token (`gt1_...`). Env `GANTRY_TOKEN`.
        #[arg(long, env = "GANTRY_TOKEN", hide_env_values = true)]
        token: String,
        /// State directory for identity, key and certificate.
        #[arg(long, env = "GANTRY_STATE_DIR", default_value = crate::state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Enroll again even if this machine is already enrolled.
        #[arg(long)]
        force: bool,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 15)]
        timeout_secs: u64,
        /// A label `KEY=VALUE` for this agent besides the token's own (repeatable; the
        /// token's value wins on a key both name).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Check that the hub a token names answers over QUIC (UDP) and is the hub the token
    /// pins; sends nothing and spends nothing. Exit 0 ok, 2 bad token, 3 unreachable,
    /// 4 wrong hub (CA mismatch).
    Preflight {
        /// Enrollment token (`gt1_...`). Env `GANTRY_TOKEN`.
        #[arg(long, env = "GANTRY_TOKEN", hide_env_values = true)]
        token: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
    /// Print a request, signed with this agent's key, that asks the hub to revoke it; the
    /// installer's `--purge` sends it to `POST /api/v1/agents/{id}/deregister`. Prints the
    /// agent id on the first line and the JSON body on the second.
    Deregister {
        /// State directory of the enrolled agent.
        #[arg(long, env = "GANTRY_STATE_DIR", default_value = crate::state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Connect to the hub and stay connected.
    Run {
        /// TOML config file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// State directory (overrides the config file and GANTRY_STATE_DIR).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

/// `KEY=VALUE` of `--label`.
fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("label {text:?} must be KEY=VALUE"))?;
    Ok((key.to_string(), value.to_string()))
}

/// Log to stderr, filtered by `GANTRY_LOG` (default `info`); the last lines are also kept
/// in memory for the diagnostics bundle.
pub fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("GANTRY_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,rustls=warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(crate::support::recent::TeeToRecent).try_init();
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// The whole program.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    // One worker is enough for an agent (blocking work goes to the blocking pool) and keeps
    // its idle memory down (see BENCHMARKS.md).
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Enroll { token, state_dir, force, timeout_secs, labels } => {
                let state = crate::state::StateDir::new(state_dir);
                match crate::enroll::enroll_with_labels(&token, &state, force, Duration::from_secs(timeout_secs), labels).await {
                    Ok(done) => {
                        println!(
                            "enrolled as {} in org {} (hub {}); certificate valid until unix {}\nstart the agent with: gantry-agent run --state-dir {}",
                            done.identity.agent_id,
                            done.identity.org,
                            done.identity.hub_addr,
                            done.not_after_unix,
                            state.dir.display()
                        );
                        ExitCode::SUCCESS
                    }
                    Err(error) => {
                        eprintln!("error: {error}");
                        ExitCode::from(2)
                    }
                }
            }
            Command::Preflight { token, timeout_secs } => match crate::preflight::probe(&token, Duration::from_secs(timeout_secs)).await {
                Ok(probe) => {
                    let resolved = if probe.remote.to_string() == probe.hub_addr { String::new() } else { format!(" ({})", probe.remote) };
                    println!("hub {}{resolved} answered over QUIC in {} ms; its CA matches the token", probe.hub_addr, probe.handshake.as_millis());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::from(match error {
                        crate::enroll::EnrollError::MalformedToken(_) => 2,
                        crate::enroll::EnrollError::CaMismatch { .. } => 4,
                        _ => 3,
                    })
                }
            },
            Command::Deregister { state_dir } => match crate::deregister::request(&crate::state::StateDir::new(state_dir)) {
                Ok((agent_id, request)) => {
                    println!("{agent_id}\n{}", serde_json::to_string(&request).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::from(2)
                }
            },
            Command::Run { config, state_dir } => {
                let config = match crate::config::Config::load(config.as_deref(), &|k| std::env::var(k).ok(), state_dir) {
                    Ok(config) => config,
                    Err(error) => {
                        eprintln!("error: {error:#}");
                        return ExitCode::from(2);
                    }
                };
                tracing::info!(config = ?config, "configuration");
                match crate::connection::run(config, shutdown_signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("error: {error}");
                        tracing::error!(%error, "agent stopped");
                        ExitCode::from(2)
                    }
                }
            }
        }
    })
}
