//! The real hub program under a test-local name, so end-to-end tests can run it as a
//! separate process (`CARGO_BIN_EXE_gantry-e2e-hub`).

fn main() -> std::process::ExitCode {
    gantry_hub::cli::main()
}
