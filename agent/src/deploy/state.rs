//! The executor's persisted state: one JSON file per deployment in
//! `STATE_DIR/deployments/<id>.json` (desired revision, current revision, last good
//! revision, a revision that failed) and the secret values it needs in
//! `STATE_DIR/deployments/<id>.secrets`.
//!
//! Both are written atomically with mode 0600 ([`crate::state::write_atomic`]); the
//! directory is 0700. The JSON holds specs only, with secrets as references (`secret`
//! names), never their values.
//!
//! Trade-off: the secret values are kept on disk (0600, readable by root and the agent's
//! user only) so that the agent can roll back or restart a deployment after an agent or
//! host restart while the hub is unreachable. Keeping them in memory only would mean a
//! rollback after a restart has to wait for the hub. Only the secrets the kept revisions
//! (desired and last good) reference are stored, and each revision keeps its own values,
//! so a rollback gets the values that revision ran with. This module does no Docker IO.

use super::Error;
use gantry_shared::deploy::DeploymentSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tracing::warn;

/// A revision number with its spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevisionSpec {
    pub revision: u64,
    pub spec: DeploymentSpec,
}

/// What the executor knows about one deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentState {
    /// The deployment id.
    pub id: String,
    /// The revision the hub asked for last.
    pub desired: RevisionSpec,
    /// The revision that runs and passed its health gate; `None` while converging or after
    /// a failure with nothing to return to.
    #[serde(default)]
    pub current: Option<u64>,
    /// The newest revision that passed its health gate; what a failure rolls back to.
    #[serde(default)]
    pub last_good: Option<RevisionSpec>,
    /// Set when the desired revision failed its health gate: reconcile does not retry it
    /// (a new `apply` does) and runs the last good revision instead.
    #[serde(default)]
    pub failed: Option<u64>,
    /// Set while the deployment is being removed, so a removal cut short by a crash is
    /// finished by the next reconcile instead of the deployment coming back.
    #[serde(default)]
    pub removing: bool,
}

impl DeploymentState {
    /// A deployment seen for the first time.
    pub fn new(id: &str, desired: RevisionSpec) -> DeploymentState {
        DeploymentState { id: id.to_string(), desired, current: None, last_good: None, failed: None, removing: false }
    }

    /// The revision that should run: the desired one, unless it failed, then the last
    /// good one (`None`: nothing should run).
    pub fn target(&self) -> Option<&RevisionSpec> {
        if self.failed == Some(self.desired.revision) {
            self.last_good.as_ref()
        } else {
            Some(&self.desired)
        }
    }
}

/// The secret values of the kept revisions: revision → secret name → value.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct SecretFile {
    #[serde(default)]
    pub revisions: BTreeMap<u64, BTreeMap<String, String>>,
}

impl std::fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: BTreeMap<&u64, Vec<&String>> = self.revisions.iter().map(|(r, s)| (r, s.keys().collect())).collect();
        f.debug_struct("SecretFile").field("names", &names).finish()
    }
}

impl SecretFile {
    /// The values of one revision (empty when it has none or they are lost).
    pub fn of(&self, revision: u64) -> BTreeMap<String, String> {
        self.revisions.get(&revision).cloned().unwrap_or_default()
    }

    /// Keep only the revisions the state still refers to (desired and last good).
    pub fn prune(&mut self, state: &DeploymentState) {
        let keep = [Some(state.desired.revision), state.last_good.as_ref().map(|g| g.revision)];
        self.revisions.retain(|revision, _| keep.contains(&Some(*revision)));
    }
}

/// The `deployments` directory of the state directory.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    dir: PathBuf,
}

fn io_error(what: &str, path: &Path, error: impl std::fmt::Display) -> Error {
    Error::State(format!("{what} {}: {error}", path.display()))
}

impl Store {
    /// Open (and create, mode 0700) `state_dir/deployments`.
    pub fn open(state_dir: &Path) -> Result<Store, Error> {
        use std::os::unix::fs::PermissionsExt;
        let dir = state_dir.join("deployments");
        std::fs::create_dir_all(&dir).map_err(|e| io_error("creating", &dir, e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| io_error("restricting", &dir, e))?;
        Ok(Store { dir })
    }

    /// Path of a deployment's state file.
    pub fn state_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Path of a deployment's secrets file.
    pub fn secrets_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.secrets"))
    }

    /// Every persisted deployment. A file that cannot be parsed is renamed to
    /// `<name>.corrupt` and skipped (the hub sends the deployment again).
    pub fn load_all(&self) -> Result<Vec<DeploymentState>, Error> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| io_error("reading", &self.dir, e))?;
        let mut states = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| io_error("reading", &self.dir, e))?.path();
            let Some(id) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| serde_json::from_slice::<DeploymentState>(&bytes).map_err(|e| e.to_string()))
                .and_then(|state| if state.id == id { Ok(state) } else { Err(format!("it holds deployment {:?}", state.id)) });
            match parsed {
                Ok(state) => states.push(state),
                Err(error) => {
                    let aside = path.with_extension("json.corrupt");
                    warn!(path = %path.display(), %error, "unreadable deployment state set aside");
                    std::fs::rename(&path, &aside).map_err(|e| io_error("setting aside", &path, e))?;
                }
            }
        }
        states.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(states)
    }

    /// Write a deployment's state.
    pub fn save(&self, state: &DeploymentState) -> Result<(), Error> {
        let path = self.state_path(&state.id);
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| io_error("encoding", &path, e))?;
        crate::state::write_atomic(&path, &bytes).map_err(|e| io_error("writing", &path, format!("{e:#}")))
    }

    /// A deployment's secret values (empty when there is no file or it is unreadable; a
    /// rollback that needs a lost value then fails with a clear reason).
    pub fn load_secrets(&self, id: &str) -> SecretFile {
        let path = self.secrets_path(id);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                warn!(path = %path.display(), "unreadable deployment secrets ignored");
                SecretFile::default()
            }),
            Err(_) => SecretFile::default(),
        }
    }

    /// Write a deployment's secret values (mode 0600); no file when there are none.
    pub fn save_secrets(&self, id: &str, secrets: &SecretFile) -> Result<(), Error> {
        let path = self.secrets_path(id);
        if secrets.revisions.values().all(BTreeMap::is_empty) {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error("removing", &path, e)),
                _ => Ok(()),
            };
        }
        // Encoding errors are reported without the (secret) content.
        let bytes = serde_json::to_vec(secrets).map_err(|_| Error::State(format!("encoding {} failed", path.display())))?;
        crate::state::write_atomic(&path, &bytes).map_err(|e| io_error("writing", &path, format!("{e:#}")))
    }

    /// Delete both files of a deployment.
    pub fn forget(&self, id: &str) -> Result<(), Error> {
        for path in [self.secrets_path(id), self.state_path(id)] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_error("removing", &path, e)),
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::deploy::{EnvVar, ServiceSpec};

    fn spec() -> DeploymentSpec {
        serde_json::from_str(r#"{"name":"web","services":[{"name":"app","image":"busybox"}]}"#).unwrap()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gantry-deploy-state-{name}-{}-{:08x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn state_and_secrets_round_trip_with_private_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("roundtrip");
        let store = Store::open(&dir).unwrap();
        let mut spec = spec();
        spec.services[0].env.push(EnvVar { name: "TOKEN".into(), value: None, secret: Some("token".into()) });
        let mut state = DeploymentState::new("d1", RevisionSpec { revision: 2, spec: spec.clone() });
        state.last_good = Some(RevisionSpec { revision: 1, spec });
        state.current = Some(1);
        store.save(&state).unwrap();
        let mut secrets = SecretFile::default();
        for revision in [1, 2, 3] {
            secrets.revisions.insert(revision, BTreeMap::from([("token".to_string(), format!("value-{revision}"))]));
        }
        secrets.prune(&state);
        assert_eq!(secrets.revisions.keys().copied().collect::<Vec<_>>(), [1, 2]);
        store.save_secrets("d1", &secrets).unwrap();
        assert!(!format!("{secrets:?}").contains("value-"), "debug output shows values");

        let loaded = store.load_all().unwrap();
        assert_eq!(loaded, vec![state.clone()]);
        assert_eq!(store.load_secrets("d1"), secrets);
        let json = std::fs::read_to_string(store.state_path("d1")).unwrap();
        assert!(json.contains("\"secret\": \"token\"") && !json.contains("value-"), "{json}");
        for path in [store.state_path("d1"), store.secrets_path("d1")] {
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "{}", path.display());
        }
        assert_eq!(std::fs::metadata(dir.join("deployments")).unwrap().permissions().mode() & 0o777, 0o700);

        store.forget("d1").unwrap();
        store.forget("d1").unwrap();
        assert!(store.load_all().unwrap().is_empty());
        assert_eq!(store.load_secrets("d1"), SecretFile::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_state_files_are_set_aside() {
        let dir = temp_dir("corrupt");
        let store = Store::open(&dir).unwrap();
        store.save(&DeploymentState::new("good", RevisionSpec { revision: 1, spec: spec() })).unwrap();
        std::fs::write(store.state_path("bad"), b"{not json").unwrap();
        let loaded = store.load_all().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].id, "good");
        assert!(dir.join("deployments/bad.json.corrupt").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_desired_revision_targets_the_last_good_one() {
        let mut state = DeploymentState::new("d", RevisionSpec { revision: 2, spec: spec() });
        assert_eq!(state.target().map(|t| t.revision), Some(2));
        state.failed = Some(2);
        assert_eq!(state.target(), None);
        let mut old = spec();
        old.services[0] = ServiceSpec { image: "busybox:1".into(), ..old.services[0].clone() };
        state.last_good = Some(RevisionSpec { revision: 1, spec: old });
        assert_eq!(state.target().map(|t| t.revision), Some(1));
    }
}
