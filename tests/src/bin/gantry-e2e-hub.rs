//! The real hub program under a test-local name, so end-to-end tests can run it as a
//! separate process (`CARGO_BIN_EXE_gantry-e2e-hub`), with the same allocator as `gantry-hub`.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gantry_hub::cli::main()
}
