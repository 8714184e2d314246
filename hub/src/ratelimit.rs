//! Request rate limits (token buckets per API key, per org and per client IP) and failed
//! login throttling (per account and per client IP), kept in memory.
//!
//! The state is rebuildable: a restart forgets it, which at worst hands every caller a full
//! bucket once. Every map is bounded by `rate_limit.max_tracked`; idle entries (a full
//! bucket, an expired failure window) carry no information and are dropped first, so memory
//! cannot grow without bound however many keys or addresses a client invents. This module
//! is sans-IO: time is an argument (monotonic milliseconds), it knows nothing of HTTP, and
//! it never reads a clock itself, so the arithmetic is tested on virtual time.

use crate::config::RateLimitConfig;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;

/// A refill rate and a bucket size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: f64,
    /// Most tokens a bucket holds (the burst a quiet caller may send at once).
    pub burst: f64,
}

impl Rate {
    pub fn new(per_sec: u32, burst: u32) -> Rate {
        Rate { per_sec: f64::from(per_sec), burst: f64::from(burst.max(1)) }
    }

    /// `n` requests in any minute: a bucket of `n` refilled at `n` a minute.
    pub fn per_minute(n: u32) -> Rate {
        Rate { per_sec: f64::from(n) / 60.0, burst: f64::from(n.max(1)) }
    }
}

/// One token bucket. A new bucket is full.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    tokens: f64,
    updated_ms: u64,
}

impl Bucket {
    pub fn full(rate: Rate, now_ms: u64) -> Bucket {
        Bucket { tokens: rate.burst, updated_ms: now_ms }
    }

    fn refill(&mut self, rate: Rate, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.updated_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate.per_sec).min(rate.burst);
        self.updated_ms = self.updated_ms.max(now_ms);
    }

    /// Milliseconds until one token is available (0 if one is).
    fn wait_ms(&self, rate: Rate) -> u64 {
        if self.tokens >= 1.0 {
            0
        } else if rate.per_sec <= 0.0 {
            u64::MAX
        } else {
            ((1.0 - self.tokens) / rate.per_sec * 1000.0).ceil() as u64
        }
    }

    /// Whether refilling up to `now_ms` makes the bucket full, i.e. it is the same as a
    /// new one and may be forgotten.
    fn is_idle(&self, rate: Rate, now_ms: u64) -> bool {
        let mut copy = *self;
        copy.refill(rate, now_ms);
        copy.tokens >= rate.burst
    }
}

/// Whole seconds a client should wait, at least 1 (the `Retry-After` header's unit).
pub fn retry_after_secs(wait_ms: u64) -> u64 {
    wait_ms.div_ceil(1000).max(1)
}

/// Token buckets by key, at most `capacity` of them.
#[derive(Debug)]
pub struct Buckets<K> {
    buckets: HashMap<K, Bucket>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub fn new(capacity: usize) -> Self {
        Buckets { buckets: HashMap::new(), capacity: capacity.max(1) }
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Milliseconds until `key` could take a token, without taking one (0 if it could now).
    pub fn wait_ms(&self, key: &K, rate: Rate, now_ms: u64) -> u64 {
        match self.buckets.get(key) {
            Some(bucket) => {
                let mut bucket = *bucket;
                bucket.refill(rate, now_ms);
                bucket.wait_ms(rate)
            }
            None => 0,
        }
    }

    /// Take one token from `key`'s bucket: `Ok` if there was one, else the milliseconds
    /// until there will be.
    pub fn take(&mut self, key: &K, rate: Rate, now_ms: u64) -> Result<(), u64> {
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.capacity {
            self.evict(rate, now_ms);
        }
        let bucket = self.buckets.entry(key.clone()).or_insert_with(|| Bucket::full(rate, now_ms));
        bucket.refill(rate, now_ms);
        match bucket.wait_ms(rate) {
            0 => {
                bucket.tokens -= 1.0;
                Ok(())
            }
            wait => Err(wait),
        }
    }

    /// Make room: forget idle buckets; if every bucket is busy, forget the least recently
    /// used half, so the sweep runs at most once per `capacity / 2` new keys.
    fn evict(&mut self, rate: Rate, now_ms: u64) {
        self.buckets.retain(|_, bucket| !bucket.is_idle(rate, now_ms));
        if self.buckets.len() >= self.capacity {
            let mut ages: Vec<u64> = self.buckets.values().map(|b| b.updated_ms).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 2];
            self.buckets.retain(|_, bucket| bucket.updated_ms > cutoff);
        }
    }
}

/// Failed logins of one account or address within the current window.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Failures {
    count: u32,
    window_start_ms: u64,
}

/// Failure counters by key, at most `capacity` of them. The window starts at the first
/// failure and lasts `window_ms`; `limit` failures within it block further attempts
/// until it ends.
#[derive(Debug)]
pub struct FailureWindows<K> {
    entries: HashMap<K, Failures>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone> FailureWindows<K> {
    pub fn new(capacity: usize) -> Self {
        FailureWindows { entries: HashMap::new(), capacity: capacity.max(1) }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `Err(ms until the window ends)` if `key` has used up its `limit` failures.
    pub fn check(&self, key: &K, limit: u32, window_ms: u64, now_ms: u64) -> Result<(), u64> {
        match self.entries.get(key) {
            Some(f) if f.count >= limit && now_ms < f.window_start_ms + window_ms => Err(f.window_start_ms + window_ms - now_ms),
            _ => Ok(()),
        }
    }

    /// Count one failure of `key`.
    pub fn fail(&mut self, key: &K, window_ms: u64, now_ms: u64) {
        if !self.entries.contains_key(key) && self.entries.len() >= self.capacity {
            self.entries.retain(|_, f| now_ms < f.window_start_ms + window_ms);
            if self.entries.len() >= self.capacity {
                // Everything is live: forget the oldest half rather than grow.
                let mut starts: Vec<u64> = self.entries.values().map(|f| f.window_start_ms).collect();
                starts.sort_unstable();
                let cutoff = starts[starts.len() / 2];
                self.entries.retain(|_, f| f.window_start_ms > cutoff);
            }
        }
        let entry = self.entries.entry(key.clone()).or_insert(Failures { count: 0, window_start_ms: now_ms });
        if now_ms >= entry.window_start_ms + window_ms {
            *entry = Failures { count: 0, window_start_ms: now_ms };
        }
        entry.count = entry.count.saturating_add(1);
    }

    /// Forget `key`'s failures (after a successful login).
    pub fn reset(&mut self, key: &K) {
        self.entries.remove(key);
    }
}

/// Who a request is counted against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A known API key, with its org (`None` for operator keys) and the org's plan limit
    /// of requests per minute, if its plan sets one (it replaces the configured per-org rate).
    Key { id: String, org: Option<String>, operator: bool, org_per_minute: Option<u32> },
    /// A live login session (by the hash of its cookie), of an operator or not.
    Session { hash: String, operator: bool },
    /// No valid credential: the client's address.
    Address(IpAddr),
    /// No credential and no known address (requests not over TCP, as in handler tests).
    Unknown,
}

/// Which limit a refused request hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Key,
    Org,
    Address,
}

/// The hub's limiters; one per hub, shared by every request.
#[derive(Debug)]
pub struct Limiter {
    config: RateLimitConfig,
    credentials: Mutex<Buckets<String>>,
    orgs: Mutex<Buckets<String>>,
    addresses: Mutex<Buckets<IpAddr>>,
    login_accounts: Mutex<FailureWindows<String>>,
    login_addresses: Mutex<FailureWindows<IpAddr>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps hold plain counters that no panic can leave half-updated; carry on.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Limiter {
    pub fn new(config: &RateLimitConfig) -> Limiter {
        let capacity = config.max_tracked;
        Limiter {
            config: config.clone(),
            credentials: Mutex::new(Buckets::new(capacity)),
            orgs: Mutex::new(Buckets::new(capacity)),
            addresses: Mutex::new(Buckets::new(capacity)),
            login_accounts: Mutex::new(FailureWindows::new(capacity)),
            login_addresses: Mutex::new(FailureWindows::new(capacity)),
        }
    }

    /// Count one API request of `subject`: `Err((limit, ms to wait))` if over a limit.
    /// An org request takes from its key's bucket and its org's, and from neither unless
    /// both have a token, so a refused request costs nothing.
    pub fn request(&self, subject: &Subject, now_ms: u64) -> Result<(), (Limit, u64)> {
        let c = &self.config;
        if !c.enabled {
            return Ok(());
        }
        let key_rate = Rate::new(c.per_key_per_sec, c.per_key_burst);
        let operator_rate = Rate::new(c.operator_per_sec, c.operator_burst);
        match subject {
            Subject::Key { operator: true, .. } | Subject::Session { operator: true, .. } if c.operator_per_sec == 0 => Ok(()),
            Subject::Key { id, org, operator, org_per_minute } => {
                let rate = if *operator { operator_rate } else { key_rate };
                let id = format!("key:{id}");
                let mut credentials = lock(&self.credentials);
                if let Some(org) = org {
                    let org_rate = org_per_minute.map_or(Rate::new(c.per_org_per_sec, c.per_org_burst), Rate::per_minute);
                    let mut orgs = lock(&self.orgs);
                    let wait = credentials.wait_ms(&id, rate, now_ms);
                    if wait > 0 {
                        return Err((Limit::Key, wait));
                    }
                    orgs.take(org, org_rate, now_ms).map_err(|wait| (Limit::Org, wait))?;
                }
                credentials.take(&id, rate, now_ms).map_err(|wait| (Limit::Key, wait))
            }
            Subject::Session { hash, operator } => {
                let rate = if *operator { operator_rate } else { key_rate };
                lock(&self.credentials).take(&format!("session:{hash}"), rate, now_ms).map_err(|wait| (Limit::Key, wait))
            }
            Subject::Address(ip) => lock(&self.addresses).take(ip, Rate::new(c.per_ip_per_sec, c.per_ip_burst), now_ms).map_err(|wait| (Limit::Address, wait)),
            Subject::Unknown => Ok(()),
        }
    }

    fn login_window_ms(&self) -> u64 {
        self.config.login_window_secs.saturating_mul(1000)
    }

    /// Whether a login for `email` (normalised) from `ip` may be checked at all:
    /// `Err(ms to wait)` once either has used up its failures in the window.
    pub fn login_allowed(&self, email: &str, ip: Option<IpAddr>, now_ms: u64) -> Result<(), u64> {
        let c = &self.config;
        if !c.enabled {
            return Ok(());
        }
        let window = self.login_window_ms();
        let account = lock(&self.login_accounts).check(&email.to_string(), c.login_failures_per_account, window, now_ms);
        let address = match ip {
            Some(ip) => lock(&self.login_addresses).check(&ip, c.login_failures_per_ip, window, now_ms),
            None => Ok(()),
        };
        match (account, address) {
            (Err(a), Err(b)) => Err(a.max(b)),
            (Err(wait), Ok(())) | (Ok(()), Err(wait)) => Err(wait),
            (Ok(()), Ok(())) => Ok(()),
        }
    }

    /// Count a failed login for `email` from `ip`.
    pub fn login_failed(&self, email: &str, ip: Option<IpAddr>, now_ms: u64) {
        let window = self.login_window_ms();
        lock(&self.login_accounts).fail(&email.to_string(), window, now_ms);
        if let Some(ip) = ip {
            lock(&self.login_addresses).fail(&ip, window, now_ms);
        }
    }

    /// A successful login clears the account's failures (not the address's: one right
    /// password must not reopen guessing at other accounts from the same address).
    pub fn login_succeeded(&self, email: &str) {
        lock(&self.login_accounts).reset(&email.to_string());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let rate = Rate::new(2, 3);
        let mut buckets = Buckets::new(10);
        let key = "k".to_string();
        for _ in 0..3 {
            buckets.take(&key, rate, 1_000).unwrap();
        }
        // Empty: one token comes back after 500 ms at 2 per second.
        assert_eq!(buckets.take(&key, rate, 1_000), Err(500));
        assert_eq!(buckets.take(&key, rate, 1_200), Err(300));
        buckets.take(&key, rate, 1_500).unwrap();
        assert_eq!(buckets.take(&key, rate, 1_500), Err(500));
        // A long pause refills only up to the burst.
        for _ in 0..3 {
            buckets.take(&key, rate, 100_000).unwrap();
        }
        assert!(buckets.take(&key, rate, 100_000).is_err());
    }

    #[test]
    fn retry_after_is_whole_seconds_and_at_least_one() {
        assert_eq!(retry_after_secs(0), 1);
        assert_eq!(retry_after_secs(1), 1);
        assert_eq!(retry_after_secs(1000), 1);
        assert_eq!(retry_after_secs(1001), 2);
        let rate = Rate::new(1, 1);
        let mut buckets = Buckets::new(10);
        buckets.take(&1u8, rate, 0).unwrap();
        assert_eq!(buckets.take(&1u8, rate, 0).map_err(retry_after_secs), Err(1));
    }

    #[test]
    fn time_going_backwards_does_not_mint_tokens() {
        let rate = Rate::new(1, 1);
        let mut buckets = Buckets::new(10);
        buckets.take(&1u8, rate, 5_000).unwrap();
        assert!(buckets.take(&1u8, rate, 4_000).is_err());
        assert!(buckets.take(&1u8, rate, 5_999).is_err());
        buckets.take(&1u8, rate, 6_000).unwrap();
    }

    #[test]
    fn bucket_maps_stay_bounded_and_forget_idle_buckets_first() {
        let rate = Rate::new(1, 2);
        let mut buckets = Buckets::new(100);
        // A busy key, then many one-off keys that become idle a few seconds later.
        buckets.take(&u32::MAX, rate, 10_000).unwrap();
        buckets.take(&u32::MAX, rate, 10_000).unwrap();
        for i in 0..10_000u32 {
            buckets.take(&i, rate, u64::from(i)).unwrap();
            assert!(buckets.len() <= 100);
        }
        // The busy key was never forgotten while it had a history (it is still empty).
        assert!(buckets.take(&u32::MAX, rate, 10_000).is_err());
        // When every bucket is busy, the map still does not grow.
        let mut busy = Buckets::new(10);
        for i in 0..1_000u32 {
            let _ = busy.take(&i, Rate::new(1, 1), 0);
            let _ = busy.take(&i, Rate::new(1, 1), 0);
            assert!(busy.len() <= 10);
        }
    }

    #[test]
    fn failure_windows_block_after_the_limit_until_the_window_ends() {
        let mut windows = FailureWindows::new(10);
        let key = "a@example.com".to_string();
        for t in 0..5 {
            windows.check(&key, 5, 60_000, t).unwrap();
            windows.fail(&key, 60_000, t);
        }
        assert_eq!(windows.check(&key, 5, 60_000, 10_000), Err(50_000));
        windows.check(&key, 5, 60_000, 60_000).unwrap();
        // A failure after the window starts a new one.
        windows.fail(&key, 60_000, 70_000);
        windows.check(&key, 5, 60_000, 70_000).unwrap();
        windows.reset(&key);
        assert!(windows.is_empty());
        for i in 0..1_000u64 {
            windows.fail(&i.to_string(), 60_000, 1);
            assert!(windows.len() <= 10);
        }
    }

    fn config() -> RateLimitConfig {
        RateLimitConfig { per_key_per_sec: 1, per_key_burst: 2, per_org_per_sec: 1, per_org_burst: 3, ..RateLimitConfig::default() }
    }

    #[test]
    fn keys_share_their_org_bucket_and_a_refusal_costs_nothing() {
        let limiter = Limiter::new(&config());
        let key = |id: &str, org: &str| Subject::Key { id: id.into(), org: Some(org.into()), operator: false, org_per_minute: None };
        limiter.request(&key("a", "acme"), 0).unwrap();
        limiter.request(&key("a", "acme"), 0).unwrap();
        assert_eq!(limiter.request(&key("a", "acme"), 0), Err((Limit::Key, 1000)));
        limiter.request(&key("b", "acme"), 0).unwrap();
        assert_eq!(limiter.request(&key("b", "acme"), 0), Err((Limit::Org, 1000)));
        // Another org is unaffected; operators are exempt by default.
        limiter.request(&key("c", "other"), 0).unwrap();
        let operator = Subject::Key { id: "op".into(), org: None, operator: true, org_per_minute: None };
        for _ in 0..100 {
            limiter.request(&operator, 0).unwrap();
        }
        // Key b was refused by its org, so it kept its second token.
        limiter.request(&key("b", "acme"), 1000).unwrap();
    }

    #[test]
    fn login_throttle_counts_accounts_and_addresses_apart() {
        let config = RateLimitConfig { login_failures_per_account: 2, login_failures_per_ip: 3, login_window_secs: 60, ..RateLimitConfig::default() };
        let limiter = Limiter::new(&config);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other_ip: IpAddr = "192.0.2.2".parse().unwrap();
        limiter.login_failed("a@x", Some(ip), 0);
        limiter.login_failed("a@x", Some(ip), 0);
        assert_eq!(limiter.login_allowed("a@x", Some(other_ip), 1_000), Err(59_000));
        limiter.login_allowed("b@x", Some(ip), 1_000).unwrap();
        limiter.login_failed("b@x", Some(ip), 1_000);
        assert!(limiter.login_allowed("c@x", Some(ip), 1_000).is_err(), "the address used up its failures");
        limiter.login_allowed("c@x", Some(other_ip), 1_000).unwrap();
        limiter.login_succeeded("a@x");
        limiter.login_allowed("a@x", Some(other_ip), 1_000).unwrap();
        limiter.login_allowed("a@x", Some(ip), 61_000).unwrap();
    }
}
