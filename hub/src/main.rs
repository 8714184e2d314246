//! `gantry-hub` binary: everything lives in the library's `cli` module.

/// The hub allocates and frees a record per log line and metric sample it ingests, from
/// many threads; mimalloc does that at a fraction of the system allocator's cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gantry_hub::cli::main()
}
