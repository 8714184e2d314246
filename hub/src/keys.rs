//! Rotation of the key that seals secrets at rest, without downtime.
//!
//! [`rotate`] appends a key version (`SecretBox::rotate`): new values are sealed with it at
//! once, and every value sealed before still opens under the version it names. [`reencrypt`]
//! then walks every sealed value in the store (org secrets, registry passwords, webhook
//! signing secrets, TOTP secrets) and reseals those under older versions with the newest,
//! each by compare-and-swap so a value changed meanwhile is read again rather than
//! overwritten. Deploys and webhook deliveries keep opening values throughout: a value is
//! readable under its old version until the moment it is replaced by the new one.
//!
//! The hub records the newest version in the store (`secrets_key_current`), so a hub
//! started without that version's key file refuses to start instead of failing each
//! deploy. This module must not know HTTP: `api/backup.rs` calls it for operators.

use crate::secrets::{version_of, Kind};
use crate::store::{SealedPlace, SealedValue};
use crate::Hub;
use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;

/// Store setting naming the newest key version.
pub const CURRENT_SETTING: &str = "secrets_key_current";
/// Most passes over a value changed under the re-encryption before it gives up on it.
const MAX_TRIES: usize = 5;

/// Where the sealed values stand.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct KeyStatus {
    /// The version new values are sealed with.
    pub current_version: u32,
    /// Sealed values in the store by the key version they name.
    pub values_by_version: BTreeMap<u32, u64>,
    /// Sealed values under an older version than the current one.
    pub stale: u64,
}

/// What a re-encryption pass did.
#[derive(Debug, Clone, Default, Serialize, schemars::JsonSchema)]
pub struct Reencrypted {
    /// Values moved to the newest version.
    pub resealed: u64,
    /// Values already on the newest version.
    pub current: u64,
    /// Values that could not be moved (they do not open, or kept changing); named in the
    /// hub's log.
    pub failed: u64,
}

fn kind_of(place: SealedPlace) -> Kind {
    match place {
        SealedPlace::Secret => Kind::Secret,
        SealedPlace::Registry => Kind::RegistryPassword,
        SealedPlace::Webhook => Kind::Webhook,
        SealedPlace::Totp => Kind::Totp,
    }
}

/// Count the store's sealed values by key version.
pub fn status(hub: &Hub) -> anyhow::Result<KeyStatus> {
    let current_version = hub.secret_box.current_version();
    let mut values_by_version = BTreeMap::new();
    for value in hub.store.sealed_values()? {
        *values_by_version.entry(version_of(&value.sealed)).or_insert(0) += 1;
    }
    let stale = values_by_version.iter().filter(|(v, _)| **v < current_version).map(|(_, n)| n).sum();
    Ok(KeyStatus { current_version, values_by_version, stale })
}

/// Add a key version and seal with it from now on; the new version.
pub fn rotate(hub: &Hub) -> anyhow::Result<u32> {
    let version = hub.secret_box.rotate().context("writing the new secrets key version")?;
    hub.store.set_setting(CURRENT_SETTING, &version.to_string())?;
    tracing::info!(version, "secrets key rotated");
    Ok(version)
}

/// Reseal every value under an older key version with the newest, pausing
/// `reencrypt_pause_ms` after each. Blocking.
pub fn reencrypt(hub: &Hub) -> anyhow::Result<Reencrypted> {
    let mut done = Reencrypted::default();
    for value in hub.store.sealed_values()? {
        match reseal(hub, value) {
            Ok(true) => {
                done.resealed += 1;
                if hub.config.reencrypt_pause_ms > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(hub.config.reencrypt_pause_ms));
                }
            }
            Ok(false) => done.current += 1,
            Err(error) => {
                tracing::warn!(%error, "a sealed value could not be re-encrypted");
                done.failed += 1;
            }
        }
    }
    tracing::info!(resealed = done.resealed, current = done.current, failed = done.failed, "secrets re-encrypted");
    Ok(done)
}

/// Move one value to the newest key; `Ok(false)` when it already was.
fn reseal(hub: &Hub, mut value: SealedValue) -> anyhow::Result<bool> {
    for _ in 0..MAX_TRIES {
        let current = hub.secret_box.current_version();
        if version_of(&value.sealed) >= current {
            return Ok(false);
        }
        let kind = kind_of(value.place);
        let plain = hub
            .secret_box
            .open(&value.org, kind, &value.name, &value.sealed)
            .with_context(|| format!("{:?} {} of org {:?}", value.place, value.name, value.org))?;
        let sealed = hub.secret_box.seal(&value.org, kind, &value.name, &plain)?;
        if hub.store.replace_sealed(&value, sealed)? {
            return Ok(true);
        }
        // Changed meanwhile (a new value was set): look at it again.
        match hub.store.sealed_values()?.into_iter().find(|v| v.place == value.place && v.org == value.org && v.name == value.name) {
            Some(fresh) => value = fresh,
            None => return Ok(false),
        }
    }
    anyhow::bail!("{:?} {} of org {:?} kept changing during re-encryption", value.place, value.name, value.org)
}

/// At start: the store's newest key version must be loaded.
pub fn check_versions(hub_current: u32, stored: Option<&str>, key_path: &std::path::Path) -> anyhow::Result<()> {
    let stored: u32 = stored.and_then(|s| s.parse().ok()).unwrap_or(1);
    if stored > hub_current {
        let missing: Vec<String> = (hub_current + 1..=stored).map(|v| crate::secrets::version_path(key_path, v).display().to_string()).collect();
        anyhow::bail!(
            "the store's secrets key is at key version {stored}, but only versions 1 to {hub_current} were found beside {}; restore {} from your backup",
            key_path.display(),
            missing.join(", ")
        );
    }
    Ok(())
}
