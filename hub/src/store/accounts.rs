//! Org memberships, invitations, and the account changes that go with them (disabling a
//! user, API key bookkeeping).
//!
//! Keys: memberships `org \0 user id`, mirrored in `user \0 org` so a login finds its orgs
//! without a scan (both written in one transaction); invitations by id. An invitation is
//! spent with a compare-and-swap, so two people racing one link get one membership.

use super::{decode, encode, ApiKey, Error, Store, User};
use crate::access::Role;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

/// The trees of this module.
#[derive(Debug, Clone)]
pub(super) struct Trees {
    members: sled::Tree,
    by_user: sled::Tree,
    invitations: sled::Tree,
    /// Serialises membership changes (see `change_membership`).
    changes: std::sync::Arc<std::sync::Mutex<()>>,
}

impl Trees {
    pub fn open(db: &sled::Db) -> Result<Trees, Error> {
        Ok(Trees {
            members: db.open_tree("memberships")?,
            by_user: db.open_tree("memberships_by_user")?,
            invitations: db.open_tree("invitations")?,
            changes: std::sync::Arc::default(),
        })
    }
}

/// A person's role in an org.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub org: String,
    pub user_id: String,
    pub email: String,
    pub role: Role,
    pub added_by: String,
    pub added_at_ms: i64,
}

/// An invitation to join an org; the secret part of its link is stored as a SHA-256 only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invitation {
    pub id: String,
    pub org: String,
    /// Lowercased; only this address can accept.
    pub email: String,
    pub role: Role,
    pub secret_sha256: String,
    pub created_by: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// When it was accepted (single use), and by which user.
    pub accepted_at_ms: Option<i64>,
    pub accepted_by: Option<String>,
    pub revoked: bool,
}

fn key(first: &str, second: &str) -> Vec<u8> {
    let mut key = first.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(second.as_bytes());
    key
}

fn prefix(first: &str) -> Vec<u8> {
    key(first, "")
}

/// Why spending an invitation failed.
#[derive(Debug, PartialEq, Eq)]
pub enum Spend {
    Unknown,
    Expired,
    Used,
    Revoked,
}

impl Store {
    // ---- users ----

    pub fn user_by_id(&self, id: &str) -> Result<Option<User>, Error> {
        Ok(self.users()?.into_iter().find(|u| u.id == id))
    }

    /// Apply `change` to the user with `email` atomically; `Ok(None)` if there is none.
    pub fn update_user(&self, email: &str, mut change: impl FnMut(&mut User)) -> Result<Option<User>, Error> {
        let _writing = self.writing();
        loop {
            let Some(raw) = self.users.get(email.as_bytes())? else { return Ok(None) };
            let mut user: User = decode("user", &raw)?;
            change(&mut user);
            if self.users.compare_and_swap(email.as_bytes(), Some(raw), Some(encode(&user)))?.is_ok() {
                self.durable()?;
                return Ok(Some(user));
            }
        }
    }

    /// Delete every session of `user_id`; how many there were.
    pub fn delete_sessions_of(&self, user_id: &str) -> Result<usize, Error> {
        self.delete_sessions_of_except(user_id, None)
    }

    /// Delete every session of `user_id` but the one stored under `keep` (a session key,
    /// the SHA-256 of its cookie value); how many were deleted.
    pub fn delete_sessions_of_except(&self, user_id: &str, keep: Option<&str>) -> Result<usize, Error> {
        let _writing = self.writing();
        let mut ended = 0;
        for entry in self.sessions.iter() {
            let (k, v) = entry?;
            let session: super::Session = decode("session", &v)?;
            if session.user_id == user_id && keep.is_none_or(|keep| k.as_ref() != keep.as_bytes()) {
                self.sessions.remove(k)?;
                ended += 1;
            }
        }
        self.durable()?;
        Ok(ended)
    }

    // ---- memberships ----

    pub fn membership(&self, org: &str, user_id: &str) -> Result<Option<Membership>, Error> {
        Store::get(&self.accounts.members, "membership", &key(org, user_id))
    }

    pub fn members_of(&self, org: &str) -> Result<Vec<Membership>, Error> {
        self.accounts.members.scan_prefix(prefix(org)).values().map(|v| decode("membership", &v?)).collect()
    }

    /// The orgs `user_id` belongs to, with the role in each.
    pub fn memberships_of(&self, user_id: &str) -> Result<Vec<Membership>, Error> {
        let mut out = Vec::new();
        for entry in self.accounts.by_user.scan_prefix(prefix(user_id)).keys() {
            let raw = entry?;
            let org = String::from_utf8_lossy(&raw[user_id.len() + 1..]).into_owned();
            if let Some(m) = self.membership(&org, user_id)? {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// Add or change a membership; refused if it would leave the org without an Owner.
    pub fn put_membership(&self, membership: &Membership) -> Result<(), Error> {
        let _writing = self.writing();
        self.change_membership(&membership.org, &membership.user_id, Some(membership))
    }

    pub fn delete_membership(&self, org: &str, user_id: &str) -> Result<(), Error> {
        let _writing = self.writing();
        self.change_membership(org, user_id, None)
    }

    /// Write (or remove) one membership and its mirror in one transaction, refusing to take
    /// away the org's last Owner. Membership changes are serialised by a lock, so two admins
    /// demoting the last two owners at once cannot both succeed.
    fn change_membership(&self, org: &str, user_id: &str, new: Option<&Membership>) -> Result<(), Error> {
        let _writing = self.writing();
        let _serial = self.accounts.changes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let old = self.membership(org, user_id)?;
        let was_owner = old.as_ref().is_some_and(|m| m.role == Role::Owner);
        let stays_owner = new.is_some_and(|m| m.role == Role::Owner);
        if was_owner && !stays_owner && !self.members_of(org)?.iter().any(|m| m.role == Role::Owner && m.user_id != user_id) {
            let email = old.map(|m| m.email).unwrap_or_default();
            return Err(Error::Conflict(format!("{email} is the last owner of org {org}; make someone else owner first")));
        }
        let (member_key, mirror_key) = (key(org, user_id), key(user_id, org));
        let result = (&self.accounts.members, &self.accounts.by_user).transaction(|(members, by_user)| {
            match new {
                Some(m) => {
                    members.insert(member_key.as_slice(), encode(m))?;
                    by_user.insert(mirror_key.as_slice(), &[][..])?;
                }
                None => {
                    members.remove(member_key.as_slice())?;
                    by_user.remove(mirror_key.as_slice())?;
                }
            }
            Ok::<(), ConflictableTransactionError<Error>>(())
        });
        match result {
            Ok(()) => self.durable(),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    // ---- invitations ----

    pub fn create_invitation(&self, invitation: &Invitation) -> Result<(), Error> {
        let _writing = self.writing();
        Store::insert_new(&self.accounts.invitations, &format!("invitation {}", invitation.id), invitation.id.as_bytes(), invitation)?;
        self.durable()
    }

    pub fn invitation(&self, id: &str) -> Result<Option<Invitation>, Error> {
        Store::get(&self.accounts.invitations, "invitation", id.as_bytes())
    }

    pub fn invitations_of(&self, org: &str) -> Result<Vec<Invitation>, Error> {
        let all: Vec<Invitation> = Store::scan(&self.accounts.invitations, "invitation")?;
        Ok(all.into_iter().filter(|i| i.org == org).collect())
    }

    pub fn revoke_invitation(&self, id: &str) -> Result<Option<Invitation>, Error> {
        let _writing = self.writing();
        self.update_invitation(id, |i| {
            i.revoked = true;
            Ok(())
        })
        .map(|r| r.ok())
    }

    /// Mark the invitation accepted by `user_id`, once: a second caller gets `Spend::Used`.
    pub fn spend_invitation(&self, id: &str, user_id: &str, now_ms: i64) -> Result<Result<Invitation, Spend>, Error> {
        let _writing = self.writing();
        self.update_invitation(id, |i| {
            if i.revoked {
                Err(Spend::Revoked)
            } else if i.accepted_at_ms.is_some() {
                Err(Spend::Used)
            } else if now_ms >= i.expires_at_ms {
                Err(Spend::Expired)
            } else {
                i.accepted_at_ms = Some(now_ms);
                i.accepted_by = Some(user_id.to_string());
                Ok(())
            }
        })
    }

    fn update_invitation(&self, id: &str, mut change: impl FnMut(&mut Invitation) -> Result<(), Spend>) -> Result<Result<Invitation, Spend>, Error> {
        let _writing = self.writing();
        let tree = &self.accounts.invitations;
        loop {
            let Some(raw) = tree.get(id.as_bytes())? else { return Ok(Err(Spend::Unknown)) };
            let mut invitation: Invitation = decode("invitation", &raw)?;
            if let Err(why) = change(&mut invitation) {
                return Ok(Err(why));
            }
            if tree.compare_and_swap(id.as_bytes(), Some(raw), Some(encode(&invitation)))?.is_ok() {
                self.durable()?;
                return Ok(Ok(invitation));
            }
        }
    }

    // ---- API keys ----

    pub fn api_keys(&self) -> Result<Vec<ApiKey>, Error> {
        Store::scan(&self.api_keys, "api key")
    }

    /// Mark API key `id` revoked, durably; `Ok(None)` if there is none.
    pub fn revoke_api_key(&self, id: &str) -> Result<Option<ApiKey>, Error> {
        let _writing = self.writing();
        let key = self.update_api_key(id, |k| k.revoked = true)?;
        self.durable()?;
        Ok(key)
    }

    /// Apply `change` to API key `id` atomically; `Ok(None)` if there is none. Not made
    /// durable at once: used for `last_used` as well, which may lag after a crash.
    pub fn update_api_key(&self, id: &str, mut change: impl FnMut(&mut ApiKey)) -> Result<Option<ApiKey>, Error> {
        let _writing = self.writing();
        loop {
            let Some(raw) = self.api_keys.get(id.as_bytes())? else { return Ok(None) };
            let mut api_key: ApiKey = decode("api key", &raw)?;
            change(&mut api_key);
            if self.api_keys.compare_and_swap(id.as_bytes(), Some(raw), Some(encode(&api_key)))?.is_ok() {
                return Ok(Some(api_key));
            }
        }
    }
}
