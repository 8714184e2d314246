//! `gantry-hub` binary: everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    gantry_hub::cli::main()
}
