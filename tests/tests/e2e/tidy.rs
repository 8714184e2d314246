//! Conventions kept true by a test: every Rust file opens with a `//!` comment saying what
//! it is for, and every field of a config struct has a `///` doc comment (it is the user's
//! documentation).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if path.is_dir() {
            if !matches!(name, "target" | ".git" | "corpus" | "artifacts") {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_starts_with_a_module_doc() {
    let mut files = Vec::new();
    for krate in ["shared", "hub", "agent", "installer", "dashboards", "tests"] {
        rust_files(&workspace_root().join(krate), &mut files);
    }
    assert!(files.len() > 20, "found only {} files", files.len());
    let missing: Vec<_> = files
        .iter()
        .filter(|f| !std::fs::read_to_string(f).unwrap_or_default().starts_with("//!"))
        .map(|f| f.strip_prefix(workspace_root()).unwrap_or(f).display().to_string())
        .collect();
    assert!(missing.is_empty(), "files without a //! module doc: {missing:?}");
}

#[test]
fn every_config_field_is_documented() {
    for file in ["hub/src/config.rs", "agent/src/config.rs"] {
        let text = std::fs::read_to_string(workspace_root().join(file)).expect("config file");
        let lines: Vec<&str> = text.lines().collect();
        let mut in_struct = false;
        for (i, line) in lines.iter().enumerate() {
            let trimmed = line.trim();
            if trimmed.starts_with("pub struct") && trimmed.ends_with('{') {
                in_struct = true;
                continue;
            }
            if in_struct && trimmed == "}" {
                in_struct = false;
                continue;
            }
            if in_struct && trimmed.starts_with("pub ") && trimmed.contains(':') {
                let mut j = i;
                while j > 0 && lines[j - 1].trim().starts_with("#[") {
                    j -= 1;
                }
                assert!(j > 0 && lines[j - 1].trim().starts_with("///"), "{file}:{}: field without a doc comment: {trimmed}", i + 1);
            }
        }
    }
}
