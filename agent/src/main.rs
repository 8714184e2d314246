//! `gantry-agent` binary: everything lives in the library's `cli` module.

/// With the `mimalloc` feature, the agent allocates through mimalloc (see Cargo.toml).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gantry_agent::cli::main()
}
