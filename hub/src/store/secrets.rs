//! Org secrets and registry logins, as sealed by [`crate::secrets::SecretBox`]: the store
//! holds only ciphertext, keyed `org \0 name` (secrets) and `org \0 registry host`
//! (registry logins).

use super::{decode, encode, org_agent_key, Error, Store};
use serde::{Deserialize, Serialize};

/// An org secret as stored: the value sealed, never in clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSecret {
    pub org: String,
    pub name: String,
    pub sealed: Vec<u8>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub updated_by: String,
}

/// A registry login as stored: the password sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRegistry {
    pub org: String,
    /// Registry host as in image references (`ghcr.io`, `registry.example.com:5000`).
    pub server: String,
    pub username: String,
    pub sealed_password: Vec<u8>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub updated_by: String,
}

fn prefix(org: &str) -> Vec<u8> {
    let mut p = org.as_bytes().to_vec();
    p.push(0);
    p
}

impl Store {
    /// Write (create or replace) a secret; returns whether it existed before.
    pub fn put_secret(&self, secret: &StoredSecret) -> Result<bool, Error> {
        let _writing = self.writing();
        let old = self.secrets.insert(org_agent_key(&secret.org, &secret.name), encode(secret))?;
        self.durable()?;
        Ok(old.is_some())
    }

    pub fn secret(&self, org: &str, name: &str) -> Result<Option<StoredSecret>, Error> {
        self.secrets.get(org_agent_key(org, name))?.map(|v| decode("secret", &v)).transpose()
    }

    /// The org's secrets, by name.
    pub fn secrets_of(&self, org: &str) -> Result<Vec<StoredSecret>, Error> {
        self.secrets.scan_prefix(prefix(org)).map(|kv| decode("secret", &kv?.1)).collect()
    }

    /// Delete a secret; returns whether it existed.
    pub fn delete_secret(&self, org: &str, name: &str) -> Result<bool, Error> {
        let _writing = self.writing();
        let old = self.secrets.remove(org_agent_key(org, name))?;
        self.durable()?;
        Ok(old.is_some())
    }

    /// Write (create or replace) a registry login; returns whether it existed before.
    pub fn put_registry(&self, registry: &StoredRegistry) -> Result<bool, Error> {
        let _writing = self.writing();
        let old = self.registries.insert(org_agent_key(&registry.org, &registry.server), encode(registry))?;
        self.durable()?;
        Ok(old.is_some())
    }

    pub fn registry_login(&self, org: &str, server: &str) -> Result<Option<StoredRegistry>, Error> {
        self.registries.get(org_agent_key(org, server))?.map(|v| decode("registry", &v)).transpose()
    }

    /// The org's registry logins, by host.
    pub fn registries_of(&self, org: &str) -> Result<Vec<StoredRegistry>, Error> {
        self.registries.scan_prefix(prefix(org)).map(|kv| decode("registry", &kv?.1)).collect()
    }

    /// Delete a registry login; returns whether it existed.
    pub fn delete_registry(&self, org: &str, server: &str) -> Result<bool, Error> {
        let _writing = self.writing();
        let old = self.registries.remove(org_agent_key(org, server))?;
        self.durable()?;
        Ok(old.is_some())
    }

    /// Whether any value is sealed in the store (then the key file must be the same one).
    pub fn has_sealed_values(&self) -> Result<bool, Error> {
        // Users' TOTP secrets are sealed too; losing the key would lock those users out.
        Ok(!self.secrets.is_empty() || !self.registries.is_empty() || self.webhooks.has_sealed() || self.users()?.iter().any(|u| u.totp.is_some()))
    }
}
