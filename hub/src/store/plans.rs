//! The plan catalog (every version kept), each org's subscription, and closed invoices.
//!
//! Keys: plans `id \0 version (u32 big-endian)`, so an id's versions scan in order and the
//! newest is the last; subscriptions by org; invoices `org \0 period start (i64 BE)`.
//! A plan version, once written, is never rewritten; a closed invoice never changes.

use super::{decode, encode, Error, Store};
use crate::billing::plans::{Plan, Subscription};
use crate::billing::pricing::Invoice;
use serde::{Deserialize, Serialize};

/// The trees of this module.
#[derive(Debug, Clone)]
pub(super) struct Trees {
    plans: sled::Tree,
    subscriptions: sled::Tree,
    invoices: sled::Tree,
}

impl Trees {
    pub fn open(db: &sled::Db) -> Result<Trees, Error> {
        Ok(Trees { plans: db.open_tree("plans")?, subscriptions: db.open_tree("subscriptions")?, invoices: db.open_tree("invoices")? })
    }
}

/// An invoice as closed for a period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClosedInvoice {
    pub id: String,
    pub org: String,
    pub invoice: Invoice,
    pub closed_at_ms: i64,
    /// Late usage carried onto this invoice, by the start of the earlier period it belongs
    /// to, in minor units.
    #[serde(default)]
    pub carried: std::collections::BTreeMap<i64, i64>,
}

fn plan_key(id: &str, version: u32) -> Vec<u8> {
    let mut key = id.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

fn invoice_key(org: &str, period_start_ms: i64) -> Vec<u8> {
    let mut key = org.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&period_start_ms.to_be_bytes());
    key
}

fn prefix(id: &str) -> Vec<u8> {
    let mut key = id.as_bytes().to_vec();
    key.push(0);
    key
}

impl Store {
    /// Store a new plan version; refused if that version exists (versions are immutable).
    pub fn create_plan_version(&self, plan: &Plan) -> Result<(), Error> {
        let _writing = self.writing();
        Store::insert_new(&self.plans.plans, &format!("plan {} version {}", plan.id, plan.version), &plan_key(&plan.id, plan.version), plan)?;
        self.durable()
    }

    pub fn plan_version(&self, id: &str, version: u32) -> Result<Option<Plan>, Error> {
        Store::get(&self.plans.plans, "plan", &plan_key(id, version))
    }

    /// Every version of plan `id`, oldest first.
    pub fn plan_versions(&self, id: &str) -> Result<Vec<Plan>, Error> {
        self.plans.plans.scan_prefix(prefix(id)).values().map(|v| decode("plan", &v?)).collect()
    }

    pub fn latest_plan(&self, id: &str) -> Result<Option<Plan>, Error> {
        match self.plans.plans.scan_prefix(prefix(id)).values().next_back() {
            Some(v) => Ok(Some(decode("plan", &v?)?)),
            None => Ok(None),
        }
    }

    /// The newest version of every plan.
    pub fn plans(&self) -> Result<Vec<Plan>, Error> {
        let _writing = self.writing();
        let mut latest: std::collections::BTreeMap<String, Plan> = std::collections::BTreeMap::new();
        for value in self.plans.plans.iter().values() {
            let plan: Plan = decode("plan", &value?)?;
            latest.insert(plan.id.clone(), plan);
        }
        Ok(latest.into_values().collect())
    }

    pub fn subscription(&self, org: &str) -> Result<Option<Subscription>, Error> {
        Store::get(&self.plans.subscriptions, "subscription", org.as_bytes())
    }

    pub fn subscriptions(&self) -> Result<Vec<Subscription>, Error> {
        Store::scan(&self.plans.subscriptions, "subscription")
    }

    /// Apply `change` to the org's subscription atomically (retrying on concurrent writes).
    /// `change` gets `None` when there is none yet and returns the new value, or an error to
    /// leave things as they are.
    pub fn update_subscription(&self, org: &str, mut change: impl FnMut(Option<Subscription>) -> Result<Subscription, Error>) -> Result<Subscription, Error> {
        let _writing = self.writing();
        let tree = &self.plans.subscriptions;
        loop {
            let raw = tree.get(org.as_bytes())?;
            let current = raw.as_ref().map(|r| decode("subscription", r)).transpose()?;
            let next = change(current)?;
            if tree.compare_and_swap(org.as_bytes(), raw, Some(encode(&next)))?.is_ok() {
                self.durable()?;
                return Ok(next);
            }
        }
    }

    /// Close an invoice for its period; a second close of the same period keeps the first.
    pub fn close_invoice(&self, invoice: &ClosedInvoice) -> Result<ClosedInvoice, Error> {
        let _writing = self.writing();
        let key = invoice_key(&invoice.org, invoice.invoice.from_ms);
        match self.plans.invoices.compare_and_swap(&key, None as Option<&[u8]>, Some(encode(invoice)))? {
            Ok(()) => {
                self.durable()?;
                Ok(invoice.clone())
            }
            Err(existing) => decode("invoice", &existing.current.unwrap_or_default()),
        }
    }

    pub fn closed_invoice(&self, org: &str, period_start_ms: i64) -> Result<Option<ClosedInvoice>, Error> {
        Store::get(&self.plans.invoices, "invoice", &invoice_key(org, period_start_ms))
    }

    /// An org's closed invoices, oldest first.
    pub fn closed_invoices(&self, org: &str) -> Result<Vec<ClosedInvoice>, Error> {
        self.plans.invoices.scan_prefix(prefix(org)).values().map(|v| decode("invoice", &v?)).collect()
    }

    /// Set an org's agent limit, retention and suspension from its plan and subscription.
    pub fn apply_entitlements(&self, org: &str, agent_limit: Option<u32>, retention_days: Option<u32>, suspended: bool) -> Result<(), Error> {
        let _writing = self.writing();
        loop {
            let Some(raw) = self.orgs.get(org.as_bytes())? else { return Err(Error::NotFound(format!("org {org}"))) };
            let mut record: super::Org = decode("org", &raw)?;
            if let Some(limit) = agent_limit {
                record.agent_limit = limit;
            }
            if let Some(days) = retention_days {
                record.retention_days = days;
            }
            record.suspended = suspended;
            if self.orgs.compare_and_swap(org.as_bytes(), Some(raw), Some(encode(&record)))?.is_ok() {
                return self.durable();
            }
        }
    }
}
