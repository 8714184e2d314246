//! Every sealed value in the store, found and replaced in place: what a secrets key rotation
//! needs to move old ciphertexts to the newest key (see `crate::keys`).
//!
//! A value is replaced only if its record is still exactly as it was read (compare and
//! swap), so a concurrent update (a new secret value, a rotated webhook secret) is never
//! overwritten; the caller reads again. This module knows nothing of keys or sealing: it
//! moves opaque bytes.

use super::{decode, encode, Error, Store, StoredRegistry, StoredSecret, User, Webhook};

/// Which kind of record a sealed value sits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedPlace {
    /// An org secret (`name` is the secret's name).
    Secret,
    /// A registry login's password (`name` is the registry host).
    Registry,
    /// A webhook endpoint's signing secret (`name` is the endpoint id).
    Webhook,
    /// A user's TOTP secret (`name` is the user id; no org).
    Totp,
}

/// One sealed value as found, with what is needed to replace it.
#[derive(Debug, Clone)]
pub struct SealedValue {
    pub place: SealedPlace,
    /// Org of the record (empty for TOTP secrets).
    pub org: String,
    /// What the value is sealed for within its org (see [`SealedPlace`]).
    pub name: String,
    pub sealed: Vec<u8>,
    tree_key: Vec<u8>,
    record: sled::IVec,
}

impl Store {
    fn place_tree(&self, place: SealedPlace) -> &sled::Tree {
        match place {
            SealedPlace::Secret => &self.secrets,
            SealedPlace::Registry => &self.registries,
            SealedPlace::Webhook => self.webhooks.endpoints(),
            SealedPlace::Totp => &self.users,
        }
    }

    /// Every sealed value in the store.
    pub fn sealed_values(&self) -> Result<Vec<SealedValue>, Error> {
        let mut out = Vec::new();
        for place in [SealedPlace::Secret, SealedPlace::Registry, SealedPlace::Webhook, SealedPlace::Totp] {
            for item in self.place_tree(place).iter() {
                let (key, record) = item?;
                if let Some((org, name, sealed)) = read_sealed(place, &record)? {
                    out.push(SealedValue { place, org, name, sealed, tree_key: key.to_vec(), record });
                }
            }
        }
        Ok(out)
    }

    /// Replace `value`'s ciphertext with `sealed` if its record has not changed since it
    /// was read; `Ok(false)` when it has (read it again).
    pub fn replace_sealed(&self, value: &SealedValue, sealed: Vec<u8>) -> Result<bool, Error> {
        let _writing = self.writing();
        let updated = match value.place {
            SealedPlace::Secret => {
                let mut record: StoredSecret = decode("secret", &value.record)?;
                record.sealed = sealed;
                encode(&record)
            }
            SealedPlace::Registry => {
                let mut record: StoredRegistry = decode("registry", &value.record)?;
                record.sealed_password = sealed;
                encode(&record)
            }
            SealedPlace::Webhook => {
                let mut record: Webhook = decode("webhook", &value.record)?;
                record.sealed_secret = sealed;
                encode(&record)
            }
            SealedPlace::Totp => {
                let mut record: User = decode("user", &value.record)?;
                let Some(factor) = record.totp.as_mut() else { return Ok(false) };
                factor.sealed_secret = gantry_shared::token::hex(&sealed);
                encode(&record)
            }
        };
        let swapped = self.place_tree(value.place).compare_and_swap(&value.tree_key, Some(&value.record), Some(updated))?;
        self.durable()?;
        Ok(swapped.is_ok())
    }
}

/// `(org, name, sealed bytes)` of a record's sealed value, if it has one.
fn read_sealed(place: SealedPlace, record: &[u8]) -> Result<Option<(String, String, Vec<u8>)>, Error> {
    Ok(match place {
        SealedPlace::Secret => {
            let r: StoredSecret = decode("secret", record)?;
            Some((r.org, r.name, r.sealed))
        }
        SealedPlace::Registry => {
            let r: StoredRegistry = decode("registry", record)?;
            Some((r.org, r.server, r.sealed_password))
        }
        SealedPlace::Webhook => {
            let r: Webhook = decode("webhook", record)?;
            Some((r.org, r.id, r.sealed_secret))
        }
        SealedPlace::Totp => {
            let r: User = decode("user", record)?;
            match r.totp {
                Some(factor) => Some((
                    String::new(),
                    r.id,
                    data_encoding::HEXLOWER.decode(factor.sealed_secret.as_bytes()).map_err(|e| Error::Corrupt(format!("sealed TOTP secret: {e}")))?,
                )),
                None => None,
            }
        }
    })
}
