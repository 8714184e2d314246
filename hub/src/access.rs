//! Who may do what: roles of people in orgs, scopes of API keys, and the permissions both
//! grant.
//!
//! Every route needs one [`Perm`] in the org it touches. A person's role in an org grants a
//! fixed set; an API key's scopes grant a set too, cut down to what its creator may still
//! do. Platform operators hold every permission in every org (their keys only what the
//! scopes say). Nothing here knows HTTP: `api::authorize` turns a refusal into 404 (not a
//! member: the org looks absent) or 403 (a member whose role does not allow it).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A permission a route needs in an org.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Perm {
    /// See agents, deployments, telemetry, checks, alerts and members.
    Read,
    /// Create, change, roll back and delete deployments; acknowledge alerts.
    Deploy,
    /// Enroll and revoke agents; manage secrets, registries, checks, alert rules, silences,
    /// webhooks, API keys, invitations and members below Owner; read the audit log.
    Admin,
    /// See usage, plans and invoices.
    Billing,
    /// Grant or take away the Owner role.
    Owner,
    /// Run commands on agents' hosts and in their containers (remote exec), where the org
    /// has enabled it.
    Exec,
}

impl Perm {
    const ALL: [Perm; 6] = [Perm::Read, Perm::Deploy, Perm::Admin, Perm::Billing, Perm::Owner, Perm::Exec];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    pub fn name(self) -> &'static str {
        match self {
            Perm::Read => "read",
            Perm::Deploy => "deploy",
            Perm::Admin => "admin",
            Perm::Billing => "billing",
            Perm::Owner => "owner",
            Perm::Exec => "exec",
        }
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms(u8);

impl Perms {
    pub const NONE: Perms = Perms(0);

    pub fn of(perms: &[Perm]) -> Perms {
        Perms(perms.iter().fold(0, |bits, p| bits | p.bit()))
    }

    pub fn all() -> Perms {
        Perms::of(&Perm::ALL)
    }

    pub fn has(self, perm: Perm) -> bool {
        self.0 & perm.bit() != 0
    }

    pub fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    pub fn intersect(self, other: Perms) -> Perms {
        Perms(self.0 & other.0)
    }

    pub fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn names(self) -> Vec<&'static str> {
        Perm::ALL.iter().filter(|p| self.has(**p)).map(|p| p.name()).collect()
    }
}

/// A person's role in an org.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything in the org, including who owns it.
    Owner,
    /// Everything but billing and the Owner role (remote exec included).
    Admin,
    /// Reads, and ships deployments.
    Deployer,
    /// Reads only.
    Viewer,
    /// Usage, plans and invoices only.
    Billing,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Owner, Role::Admin, Role::Deployer, Role::Viewer, Role::Billing];

    pub fn perms(self) -> Perms {
        match self {
            Role::Owner => Perms::all(),
            Role::Admin => Perms::of(&[Perm::Read, Perm::Deploy, Perm::Admin, Perm::Exec]),
            Role::Deployer => Perms::of(&[Perm::Read, Perm::Deploy]),
            Role::Viewer => Perms::of(&[Perm::Read]),
            Role::Billing => Perms::of(&[Perm::Billing]),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Deployer => "deployer",
            Role::Viewer => "viewer",
            Role::Billing => "billing",
        }
    }

    /// The permission needed to grant or take away this role: Owner for Owner, Admin for
    /// the rest.
    pub fn managed_by(self) -> Perm {
        if self == Role::Owner {
            Perm::Owner
        } else {
            Perm::Admin
        }
    }

    pub fn parse(text: &str) -> Result<Role, String> {
        Role::ALL.into_iter().find(|r| r.name() == text).ok_or_else(|| format!("role {text:?} must be one of owner, admin, deployer, viewer, billing"))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Read everything a Viewer can.
    Read,
    /// Read, and deploy.
    Deploy,
    /// Read, deploy and administer, remote exec included; the Owner role too when the
    /// key's creator holds it (a key never exceeds its creator).
    Admin,
    /// Usage, plans and invoices.
    Billing,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Deploy, Scope::Admin, Scope::Billing];

    pub fn perms(self) -> Perms {
        match self {
            Scope::Read => Perms::of(&[Perm::Read]),
            Scope::Deploy => Perms::of(&[Perm::Read, Perm::Deploy]),
            Scope::Admin => Perms::of(&[Perm::Read, Perm::Deploy, Perm::Admin, Perm::Owner, Perm::Exec]),
            Scope::Billing => Perms::of(&[Perm::Billing]),
        }
    }

    /// Keys made before scopes existed hold every scope.
    pub fn all() -> Vec<Scope> {
        Scope::ALL.to_vec()
    }

    pub fn perms_of(scopes: &[Scope]) -> Perms {
        scopes.iter().fold(Perms::NONE, |perms, s| perms.union(s.perms()))
    }
}

/// Where a principal may act, and how.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Access {
    /// Permissions in every org (platform operators).
    pub everywhere: Perms,
    /// Permissions per org (memberships, org keys).
    pub orgs: BTreeMap<String, Perms>,
}

/// Why an action was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The principal has nothing in this org: it must look absent.
    NotMember,
    /// A member without the permission.
    Lacks(Perm),
}

impl Access {
    /// Every permission in every org.
    pub fn operator() -> Access {
        Access { everywhere: Perms::all(), orgs: BTreeMap::new() }
    }

    pub fn perms_in(&self, org: &str) -> Perms {
        self.orgs.get(org).copied().unwrap_or_default().union(self.everywhere)
    }

    /// Whether the principal can see that `org` exists at all.
    pub fn knows(&self, org: &str) -> bool {
        self.everywhere != Perms::NONE || self.orgs.get(org).is_some_and(|p| *p != Perms::NONE)
    }

    pub fn check(&self, org: &str, perm: Perm) -> Result<(), Refusal> {
        if !self.knows(org) {
            return Err(Refusal::NotMember);
        }
        if self.perms_in(org).has(perm) {
            Ok(())
        } else {
            Err(Refusal::Lacks(perm))
        }
    }

    /// The same access, cut down to `limit` everywhere (a key's scopes).
    pub fn limited_to(&self, limit: Perms) -> Access {
        Access {
            everywhere: self.everywhere.intersect(limit),
            orgs: self.orgs.iter().map(|(org, p)| (org.clone(), p.intersect(limit))).filter(|(_, p)| *p != Perms::NONE).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_least_privilege() {
        assert!(Role::Viewer.perms().has(Perm::Read));
        assert!(!Role::Viewer.perms().has(Perm::Deploy));
        assert!(Role::Deployer.perms().has(Perm::Deploy));
        assert!(!Role::Deployer.perms().has(Perm::Admin));
        assert!(!Role::Admin.perms().has(Perm::Billing), "billing is the Owner's and the Billing role's");
        assert!(!Role::Admin.perms().has(Perm::Owner));
        assert!(Role::Admin.perms().has(Perm::Exec) && Role::Owner.perms().has(Perm::Exec));
        assert!(!Role::Deployer.perms().has(Perm::Exec) && !Role::Viewer.perms().has(Perm::Exec), "exec is for owners and admins only");
        assert_eq!(Role::Billing.perms(), Perms::of(&[Perm::Billing]), "Billing sees usage and invoices only");
        assert_eq!(Role::Owner.perms(), Perms::all());
    }

    #[test]
    fn members_of_other_orgs_are_refused_as_strangers() {
        let mut access = Access::default();
        access.orgs.insert("acme".into(), Role::Viewer.perms());
        assert_eq!(access.check("acme", Perm::Read), Ok(()));
        assert_eq!(access.check("acme", Perm::Deploy), Err(Refusal::Lacks(Perm::Deploy)));
        assert_eq!(access.check("globex", Perm::Read), Err(Refusal::NotMember));
        let billing = Access { everywhere: Perms::NONE, orgs: [("acme".to_string(), Role::Billing.perms())].into() };
        assert_eq!(billing.check("acme", Perm::Read), Err(Refusal::Lacks(Perm::Read)));
    }

    #[test]
    fn key_scopes_cut_the_creators_access_down() {
        let mut access = Access::default();
        access.orgs.insert("acme".into(), Role::Admin.perms());
        let key = access.limited_to(Scope::perms_of(&[Scope::Read, Scope::Billing]));
        assert_eq!(key.check("acme", Perm::Read), Ok(()));
        assert_eq!(key.check("acme", Perm::Deploy), Err(Refusal::Lacks(Perm::Deploy)));
        // Billing was asked for, but the Admin creator never had it.
        assert_eq!(key.check("acme", Perm::Billing), Err(Refusal::Lacks(Perm::Billing)));
        let operator_key = Access::operator().limited_to(Scope::perms_of(&[Scope::Read]));
        assert_eq!(operator_key.check("any", Perm::Read), Ok(()));
        assert_eq!(operator_key.check("any", Perm::Admin), Err(Refusal::Lacks(Perm::Admin)));
    }

    #[test]
    fn roles_parse_by_name() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.name()), Ok(role));
        }
        assert!(Role::parse("root").unwrap_err().contains("must be one of"));
    }
}
