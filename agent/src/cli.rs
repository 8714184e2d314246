//! Command line of `gantry-agent`: `enroll` and `run`. Parses flags, sets up logging and
//! calls the library; exit code 2 means "needs an operator" (bad token, revoked, expired).

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

/// Log to stderr, filtered by `GANTRY_LOG` (default `info`).
pub fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("GANTRY_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,rustls=warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
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
            Command::Enroll { token, state_dir, force, timeout_secs } => {
                let state = crate::state::StateDir::new(state_dir);
                match crate::enroll::enroll(&token, &state, force, Duration::from_secs(timeout_secs)).await {
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
