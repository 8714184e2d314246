//! The `gantry-agent` program as a user runs it: version, usage errors and bad tokens.
//! (Cargo builds the program for these tests, so it is also there for the hub's quickstart
//! to serve from beside its own executable in the workspace's end-to-end tests.)

use std::process::Command;

fn agent(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_gantry-agent")).args(args).env("GANTRY_LOG", "error").output().expect("run gantry-agent");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn version_names_the_program_and_its_version() {
    let (code, stdout, _) = agent(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(stdout.trim(), format!("gantry-agent {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn an_unknown_command_is_a_usage_error() {
    let (code, _, stderr) = agent(&["frobnicate"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unrecognized subcommand 'frobnicate'") && stderr.contains("Usage: gantry-agent"), "{stderr}");
}

#[test]
fn a_malformed_token_is_refused_and_nothing_is_written() {
    let dir = std::env::temp_dir().join(format!("gantry-agent-cli-{}", std::process::id()));
    let (code, _, stderr) = agent(&["enroll", "--token", "not-a-token", "--state-dir", dir.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!dir.join("identity.json").exists(), "a refused enrollment wrote an identity");
    let _ = std::fs::remove_dir_all(&dir);
}
