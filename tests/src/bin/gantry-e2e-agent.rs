//! The real agent program under a test-local name, so end-to-end tests can start, kill -9
//! and restart it as a separate process (`CARGO_BIN_EXE_gantry-e2e-agent`).

fn main() -> std::process::ExitCode {
    gantry_agent::cli::main()
}
