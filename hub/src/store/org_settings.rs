//! Per-org settings that switch features on or off (`org_settings` tree, keyed by org id).
//! An org without a record has the defaults: everything that needs opting in is off.

use super::{decode, encode, Error, Store};
use serde::{Deserialize, Serialize};

/// An org's switches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct OrgSettings {
    /// Whether members with the exec permission (owners, admins) may run commands on the
    /// org's agents and in their containers. Off until an owner or admin turns it on.
    pub exec_enabled: bool,
}

const TREE: &str = "org_settings";

impl Store {
    /// The org's settings (the defaults when none were ever written).
    pub fn org_settings(&self, org: &str) -> Result<OrgSettings, Error> {
        let tree = self.db.open_tree(TREE)?;
        Ok(tree.get(org.as_bytes())?.map(|v| decode("org settings", &v)).transpose()?.unwrap_or_default())
    }

    /// Replace the org's settings, durably.
    pub fn put_org_settings(&self, org: &str, settings: &OrgSettings) -> Result<(), Error> {
        let _writing = self.writing();
        let tree = self.db.open_tree(TREE)?;
        tree.insert(org.as_bytes(), encode(settings))?;
        self.durable()?;
        Ok(())
    }
}
