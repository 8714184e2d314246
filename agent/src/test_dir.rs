//! A directory under the system temp dir for one unit test, removed when dropped.

use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory named after the test (`name`), this process and a random suffix.
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("gantry-agent-{name}-{}-{:016x}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("creating a test directory");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
