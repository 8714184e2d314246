//! Webhook endpoints, the events they are sent, and the durable delivery queue with each
//! delivery's attempt log.
//!
//! Keys: endpoints `org \0 id`; events and deliveries by id; the delivery log
//! `org \0 webhook \0 created (8 bytes BE) delivery id`, so an endpoint's deliveries scan
//! newest first; the queue `due (8 bytes BE) delivery id`, one entry per pending delivery,
//! so the worker finds what is due with one ordered scan. A delivery and its queue entry
//! always change together in one transaction; an event is written in the same transaction
//! as its deliveries. Signing secrets are stored sealed only (see `crate::secrets`).
//!
//! This module knows nothing of HTTP or signing: callers pass in plain records.

use super::{decode, encode, org_agent_key, Error, Store};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use std::collections::HashSet;

/// The trees of this module.
#[derive(Debug, Clone)]
pub(super) struct Trees {
    endpoints: sled::Tree,
    events: sled::Tree,
    deliveries: sled::Tree,
    log: sled::Tree,
    queue: sled::Tree,
}

impl Trees {
    pub fn open(db: &sled::Db) -> Result<Trees, Error> {
        Ok(Trees {
            endpoints: db.open_tree("webhooks")?,
            events: db.open_tree("webhook_events")?,
            deliveries: db.open_tree("webhook_deliveries")?,
            log: db.open_tree("webhook_delivery_log")?,
            queue: db.open_tree("webhook_queue")?,
        })
    }

    /// Whether any webhook signing secret is sealed in the store.
    pub fn has_sealed(&self) -> bool {
        !self.endpoints.is_empty()
    }

    /// The endpoints tree, for re-sealing signing secrets under a new key (`rekey.rs`).
    pub(super) fn endpoints(&self) -> &sled::Tree {
        &self.endpoints
    }
}

/// A webhook endpoint as stored: the signing secret sealed, never in clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    /// `whk_...`, unique in the hub.
    pub id: String,
    pub org: String,
    /// `http://` or `https://` URL deliveries are POSTed to.
    pub url: String,
    /// Event types this endpoint receives; `*` means all.
    pub events: Vec<String>,
    pub description: Option<String>,
    /// Disabled endpoints get no new deliveries; pending ones end as failed.
    pub enabled: bool,
    /// The signing secret, sealed for (org, webhook, id).
    pub sealed_secret: Vec<u8>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub updated_by: String,
}

impl Webhook {
    /// Whether this endpoint is enabled and subscribed to `event_type`.
    pub fn wants(&self, event_type: &str) -> bool {
        self.enabled && self.events.iter().any(|e| e == "*" || e == event_type)
    }
}

/// Something that happened in an org, as sent to its webhook endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookEvent {
    /// `evt_...`; the same in every delivery and redelivery of the event.
    pub id: String,
    pub org: String,
    pub event_type: String,
    pub created_at_ms: i64,
    pub data: serde_json::Value,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Not yet answered with 2xx; another attempt is due at `next_attempt_ms`.
    Pending,
    /// An attempt was answered with 2xx; never sent again.
    Succeeded,
    /// Out of attempts (or the endpoint went away); never sent again.
    Failed,
}

impl DeliveryStatus {
    pub fn name(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Succeeded => "succeeded",
            DeliveryStatus::Failed => "failed",
        }
    }
}

/// One try at sending a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryAttempt {
    pub at_ms: i64,
    pub duration_ms: u64,
    /// The HTTP status the endpoint answered with, if it answered.
    pub status_code: Option<u16>,
    /// Why the attempt failed without an answer (connect error, timeout).
    pub error: Option<String>,
}

/// One event to be sent to one endpoint, with every attempt made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookDelivery {
    /// `dlv_...`; sent as the `Gantry-Delivery` header.
    pub id: String,
    pub org: String,
    pub webhook_id: String,
    pub event_id: String,
    pub event_type: String,
    pub created_at_ms: i64,
    pub status: DeliveryStatus,
    pub attempts: Vec<DeliveryAttempt>,
    /// When the next attempt is due, while pending.
    pub next_attempt_ms: Option<i64>,
    /// Why the delivery ended as failed, when no attempt says it (e.g. endpoint disabled).
    pub failure: Option<String>,
    /// The delivery this one repeats, for manual redeliveries.
    pub redelivery_of: Option<String>,
}

fn prefix(parts: &[&str]) -> Vec<u8> {
    let mut key = Vec::new();
    for part in parts {
        key.extend_from_slice(part.as_bytes());
        key.push(0);
    }
    key
}

fn log_key(delivery: &WebhookDelivery) -> Vec<u8> {
    let mut key = prefix(&[&delivery.org, &delivery.webhook_id]);
    key.extend_from_slice(&(delivery.created_at_ms.max(0) as u64).to_be_bytes());
    key.extend_from_slice(delivery.id.as_bytes());
    key
}

fn queue_key(due_ms: i64, id: &str) -> Vec<u8> {
    let mut key = (due_ms.max(0) as u64).to_be_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

/// `(due, delivery id)` of a queue key.
fn parse_queue_key(key: &[u8]) -> Option<(i64, String)> {
    let (due, id) = key.split_at_checked(8)?;
    let due = u64::from_be_bytes(due.try_into().ok()?);
    Some((due as i64, String::from_utf8_lossy(id).into_owned()))
}

/// `(created, delivery id)` of a log key.
fn parse_log_key(key: &[u8]) -> Option<(i64, String)> {
    let second_nul = key.iter().enumerate().filter(|(_, b)| **b == 0).nth(1)?.0;
    parse_queue_key(&key[second_nul + 1..])
}

type TxResult<T> = Result<T, ConflictableTransactionError<Error>>;

fn abort(error: Error) -> ConflictableTransactionError<Error> {
    ConflictableTransactionError::Abort(error)
}

fn finish<T>(result: Result<T, TransactionError<Error>>) -> Result<T, Error> {
    match result {
        Ok(value) => Ok(value),
        Err(TransactionError::Abort(e)) => Err(e),
        Err(TransactionError::Storage(e)) => Err(Error::Sled(e)),
    }
}

/// Write `delivery` with its log and queue entries, replacing the queue entry of the
/// stored version if there is one.
fn put_delivery(deliveries: &TransactionalTree, log: &TransactionalTree, queue: &TransactionalTree, delivery: &WebhookDelivery) -> TxResult<()> {
    if let Some(raw) = deliveries.get(delivery.id.as_bytes())? {
        let old: WebhookDelivery = decode("webhook delivery", &raw).map_err(abort)?;
        if let Some(due) = old.next_attempt_ms {
            queue.remove(queue_key(due, &old.id))?;
        }
    }
    deliveries.insert(delivery.id.as_bytes(), encode(delivery))?;
    log.insert(log_key(delivery), &[])?;
    if let (DeliveryStatus::Pending, Some(due)) = (delivery.status, delivery.next_attempt_ms) {
        queue.insert(queue_key(due, &delivery.id), &[])?;
    }
    Ok(())
}

impl Store {
    /// Create an endpoint; its id must be new.
    pub fn create_webhook(&self, webhook: &Webhook) -> Result<(), Error> {
        let _writing = self.writing();
        let key = org_agent_key(&webhook.org, &webhook.id);
        Store::insert_new(&self.webhooks.endpoints, &format!("webhook {}", webhook.id), &key, webhook)?;
        self.durable()
    }

    pub fn webhook(&self, org: &str, id: &str) -> Result<Option<Webhook>, Error> {
        Store::get(&self.webhooks.endpoints, "webhook", &org_agent_key(org, id))
    }

    /// The org's endpoints, by id.
    pub fn webhooks_of(&self, org: &str) -> Result<Vec<Webhook>, Error> {
        self.webhooks.endpoints.scan_prefix(prefix(&[org])).map(|kv| decode("webhook", &kv?.1)).collect()
    }

    /// Apply `change` to endpoint `id` of `org` atomically (retrying on concurrent writes);
    /// `Ok(None)` if there is no such endpoint.
    pub fn update_webhook(&self, org: &str, id: &str, mut change: impl FnMut(&mut Webhook)) -> Result<Option<Webhook>, Error> {
        let _writing = self.writing();
        let key = org_agent_key(org, id);
        loop {
            let Some(raw) = self.webhooks.endpoints.get(&key)? else {
                return Ok(None);
            };
            let mut webhook: Webhook = decode("webhook", &raw)?;
            change(&mut webhook);
            if self.webhooks.endpoints.compare_and_swap(&key, Some(raw), Some(encode(&webhook)))?.is_ok() {
                self.durable()?;
                return Ok(Some(webhook));
            }
        }
    }

    /// Delete an endpoint with its deliveries (pending ones are dropped); returns whether it
    /// existed. Events stay until pruned, as other endpoints may share them.
    pub fn delete_webhook(&self, org: &str, id: &str) -> Result<bool, Error> {
        let _writing = self.writing();
        let t = &self.webhooks;
        let log_keys: Vec<sled::IVec> = t.log.scan_prefix(prefix(&[org, id])).keys().collect::<Result<_, _>>()?;
        let result = (&t.endpoints, &t.deliveries, &t.log, &t.queue).transaction(|(endpoints, deliveries, log, queue)| {
            if endpoints.remove(org_agent_key(org, id))?.is_none() {
                return Ok(false);
            }
            for key in &log_keys {
                log.remove(key)?;
                let Some((_, delivery_id)) = parse_log_key(key) else { continue };
                if let Some(raw) = deliveries.remove(delivery_id.as_bytes())? {
                    let delivery: WebhookDelivery = decode("webhook delivery", &raw).map_err(abort)?;
                    if let Some(due) = delivery.next_attempt_ms {
                        queue.remove(queue_key(due, &delivery.id))?;
                    }
                }
            }
            Ok(true)
        });
        let existed = finish(result)?;
        self.durable()?;
        Ok(existed)
    }

    /// Store `event` (if given) and `deliveries` with their queue entries, in one
    /// transaction, durably.
    pub fn enqueue_webhook_deliveries(&self, event: Option<&WebhookEvent>, deliveries: &[WebhookDelivery]) -> Result<(), Error> {
        let _writing = self.writing();
        let t = &self.webhooks;
        let result = (&t.events, &t.deliveries, &t.log, &t.queue).transaction(|(events, stored, log, queue)| {
            if let Some(event) = event {
                events.insert(event.id.as_bytes(), encode(event))?;
            }
            for delivery in deliveries {
                put_delivery(stored, log, queue, delivery)?;
            }
            Ok(())
        });
        finish(result)?;
        self.durable()
    }

    pub fn webhook_event(&self, id: &str) -> Result<Option<WebhookEvent>, Error> {
        Store::get(&self.webhooks.events, "webhook event", id.as_bytes())
    }

    pub fn webhook_delivery(&self, id: &str) -> Result<Option<WebhookDelivery>, Error> {
        Store::get(&self.webhooks.deliveries, "webhook delivery", id.as_bytes())
    }

    /// Up to `limit` deliveries of endpoint `webhook`, newest first, older than `before`
    /// if given.
    pub fn webhook_deliveries(&self, org: &str, webhook: &str, before: Option<&WebhookDelivery>, limit: usize) -> Result<Vec<WebhookDelivery>, Error> {
        let start = prefix(&[org, webhook]);
        let end = match before {
            Some(before) => log_key(before),
            None => {
                let mut end = start.clone();
                end.push(0xff);
                end
            }
        };
        let mut out = Vec::new();
        for key in self.webhooks.log.range(start..end).keys().rev() {
            let Some((_, id)) = parse_log_key(&key?) else { continue };
            if let Some(delivery) = self.webhook_delivery(&id)? {
                out.push(delivery);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Up to `limit` ids of pending deliveries due at `now_ms`, earliest first, leaving out
    /// those `skip` names (attempts in flight); and when the earliest entry not taken is
    /// due.
    pub fn due_webhook_deliveries(&self, now_ms: i64, limit: usize, skip: impl Fn(&str) -> bool) -> Result<(Vec<String>, Option<i64>), Error> {
        let mut due = Vec::new();
        for key in self.webhooks.queue.iter().keys() {
            let Some((at, id)) = parse_queue_key(&key?) else { continue };
            if skip(&id) {
                continue;
            }
            if at > now_ms || due.len() >= limit {
                return Ok((due, Some(at)));
            }
            due.push(id);
        }
        Ok((due, None))
    }

    /// Deliveries still pending.
    pub fn pending_webhook_deliveries(&self) -> usize {
        self.webhooks.queue.len()
    }

    /// Write a delivery after an attempt, moving its queue entry to its new due time (or
    /// removing it once the delivery is done). Returns false, writing nothing, when the
    /// delivery is gone (its endpoint was deleted meanwhile).
    pub fn save_webhook_delivery(&self, delivery: &WebhookDelivery) -> Result<bool, Error> {
        let _writing = self.writing();
        let t = &self.webhooks;
        let result = (&t.deliveries, &t.log, &t.queue).transaction(|(deliveries, log, queue)| {
            if deliveries.get(delivery.id.as_bytes())?.is_none() {
                return Ok(false);
            }
            put_delivery(deliveries, log, queue, delivery)?;
            Ok(true)
        });
        let saved = finish(result)?;
        self.durable()?;
        Ok(saved)
    }

    /// Remove every queue entry of delivery `id` unless it is pending (entries of finished or
    /// deleted deliveries; none should exist, but one would otherwise be picked forever).
    pub fn unqueue_webhook_delivery(&self, id: &str) -> Result<(), Error> {
        let _writing = self.writing();
        let t = &self.webhooks;
        let keys: Vec<sled::IVec> =
            t.queue.iter().keys().filter(|k| k.as_ref().map_or(true, |k| parse_queue_key(k).is_some_and(|(_, i)| i == id))).collect::<Result<_, _>>()?;
        let result = (&t.deliveries, &t.queue).transaction(|(deliveries, queue)| {
            if let Some(raw) = deliveries.get(id.as_bytes())? {
                let delivery: WebhookDelivery = decode("webhook delivery", &raw).map_err(abort)?;
                if delivery.status == DeliveryStatus::Pending {
                    return Ok(());
                }
            }
            for key in &keys {
                queue.remove(key)?;
            }
            Ok(())
        });
        finish(result)?;
        self.durable()
    }

    /// Delete finished deliveries created before `cut_ms`, and events created before it
    /// that no pending delivery still needs. Returns how many records went.
    pub fn prune_webhook_deliveries(&self, cut_ms: i64) -> Result<usize, Error> {
        let _writing = self.writing();
        let t = &self.webhooks;
        let mut pending_events = HashSet::new();
        for key in t.queue.iter().keys() {
            let Some((_, id)) = parse_queue_key(&key?) else { continue };
            if let Some(delivery) = self.webhook_delivery(&id)? {
                pending_events.insert(delivery.event_id);
            }
        }
        let mut removed = 0;
        for key in t.log.iter().keys() {
            let key = key?;
            let Some((created, id)) = parse_log_key(&key) else { continue };
            if created >= cut_ms {
                continue;
            }
            match self.webhook_delivery(&id)? {
                Some(delivery) if delivery.status == DeliveryStatus::Pending => continue,
                Some(_) => {
                    // The record first, then its log entry: an interrupted prune leaves at
                    // most a log entry without a record, which the next run removes.
                    t.deliveries.remove(id.as_bytes())?;
                    removed += 1;
                }
                None => {}
            }
            t.log.remove(&key)?;
        }
        for item in t.events.iter() {
            let (key, raw) = item?;
            let event: WebhookEvent = decode("webhook event", &raw)?;
            if event.created_at_ms < cut_ms && !pending_events.contains(&event.id) {
                t.events.remove(key)?;
                removed += 1;
            }
        }
        self.durable()?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("gantry-webhooks-test-{}-{}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn webhook(org: &str, id: &str) -> Webhook {
        Webhook {
            id: id.into(),
            org: org.into(),
            url: "http://127.0.0.1:1/hook".into(),
            events: vec!["*".into()],
            description: None,
            enabled: true,
            sealed_secret: vec![1, 2, 3],
            created_at_ms: 0,
            updated_at_ms: 0,
            updated_by: "test".into(),
        }
    }

    fn event(id: &str, created: i64) -> WebhookEvent {
        WebhookEvent { id: id.into(), org: "acme".into(), event_type: "agent.online".into(), created_at_ms: created, data: serde_json::json!({}) }
    }

    fn delivery(id: &str, webhook: &str, event: &str, created: i64) -> WebhookDelivery {
        WebhookDelivery {
            id: id.into(),
            org: "acme".into(),
            webhook_id: webhook.into(),
            event_id: event.into(),
            event_type: "agent.online".into(),
            created_at_ms: created,
            status: DeliveryStatus::Pending,
            attempts: vec![],
            next_attempt_ms: Some(created),
            failure: None,
            redelivery_of: None,
        }
    }

    #[test]
    fn the_queue_follows_each_delivery_until_it_is_done() {
        let store = Store::create(&tempdir()).unwrap();
        store.create_webhook(&webhook("acme", "whk_1")).unwrap();
        let deliveries = [delivery("dlv_a", "whk_1", "evt_1", 100), delivery("dlv_b", "whk_1", "evt_1", 200)];
        store.enqueue_webhook_deliveries(Some(&event("evt_1", 100)), &deliveries).unwrap();
        assert_eq!(store.pending_webhook_deliveries(), 2);
        assert_eq!(store.due_webhook_deliveries(150, 10, |_| false).unwrap(), (vec!["dlv_a".to_string()], Some(200)));
        assert_eq!(store.due_webhook_deliveries(250, 10, |id| id == "dlv_a").unwrap(), (vec!["dlv_b".to_string()], None));
        assert_eq!(store.due_webhook_deliveries(250, 1, |_| false).unwrap(), (vec!["dlv_a".to_string()], Some(200)));

        // A failed attempt moves the entry; a success removes it.
        let mut a = deliveries[0].clone();
        a.attempts.push(DeliveryAttempt { at_ms: 100, duration_ms: 1, status_code: Some(500), error: None });
        a.next_attempt_ms = Some(1000);
        assert!(store.save_webhook_delivery(&a).unwrap());
        assert_eq!(store.due_webhook_deliveries(250, 10, |_| false).unwrap(), (vec!["dlv_b".to_string()], Some(1000)));
        a.status = DeliveryStatus::Succeeded;
        a.next_attempt_ms = None;
        store.save_webhook_delivery(&a).unwrap();
        assert_eq!(store.pending_webhook_deliveries(), 1);

        // Newest first, and pages continue before a given delivery.
        let ids = |list: Vec<WebhookDelivery>| list.into_iter().map(|d| d.id).collect::<Vec<_>>();
        assert_eq!(ids(store.webhook_deliveries("acme", "whk_1", None, 10).unwrap()), ["dlv_b", "dlv_a"]);
        assert_eq!(ids(store.webhook_deliveries("acme", "whk_1", Some(&deliveries[1]), 10).unwrap()), ["dlv_a"]);
        assert!(store.webhook_deliveries("acme", "whk_10", None, 10).unwrap().is_empty(), "a longer id is another endpoint");

        // Deleting the endpoint takes its deliveries and queue entries along.
        assert!(store.delete_webhook("acme", "whk_1").unwrap());
        assert_eq!(store.pending_webhook_deliveries(), 0);
        assert!(store.webhook_delivery("dlv_a").unwrap().is_none());
        assert!(!store.save_webhook_delivery(&a).unwrap(), "a delivery of a deleted endpoint is not written back");
        assert!(!store.delete_webhook("acme", "whk_1").unwrap());

        // A queue entry left without its pending delivery can be cleared; a pending one stays.
        store.enqueue_webhook_deliveries(None, &[delivery("dlv_c", "whk_2", "evt_1", 300)]).unwrap();
        store.unqueue_webhook_delivery("dlv_c").unwrap();
        assert_eq!(store.pending_webhook_deliveries(), 1, "pending: kept");
        store.webhooks.deliveries.remove("dlv_c").unwrap();
        store.unqueue_webhook_delivery("dlv_c").unwrap();
        assert_eq!(store.pending_webhook_deliveries(), 0);
    }

    #[test]
    fn pruning_keeps_what_is_recent_or_pending() {
        let store = Store::create(&tempdir()).unwrap();
        store.create_webhook(&webhook("acme", "whk_1")).unwrap();
        let mut old_done = delivery("dlv_old", "whk_1", "evt_old", 10);
        old_done.status = DeliveryStatus::Succeeded;
        old_done.next_attempt_ms = None;
        store.enqueue_webhook_deliveries(Some(&event("evt_old", 10)), &[old_done]).unwrap();
        store.enqueue_webhook_deliveries(Some(&event("evt_kept", 20)), &[delivery("dlv_pending", "whk_1", "evt_kept", 20)]).unwrap();
        store.enqueue_webhook_deliveries(Some(&event("evt_new", 5000)), &[delivery("dlv_new", "whk_1", "evt_new", 5000)]).unwrap();
        assert_eq!(store.prune_webhook_deliveries(1000).unwrap(), 2);
        assert!(store.webhook_delivery("dlv_old").unwrap().is_none());
        assert!(store.webhook_event("evt_old").unwrap().is_none());
        assert!(store.webhook_delivery("dlv_pending").unwrap().is_some());
        assert!(store.webhook_event("evt_kept").unwrap().is_some(), "a pending delivery still needs its event");
        assert_eq!(store.webhook_deliveries("acme", "whk_1", None, 10).unwrap().len(), 2);
    }
}
