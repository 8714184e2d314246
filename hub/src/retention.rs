//! Retention: a background task that deletes telemetry older than each org's retention
//! (or the hub default), in bounded batches, and reports its progress in `/metrics`.
//!
//! Pruning only deletes whole records below a time cut; it never touches high-water marks,
//! so a late resend of pruned records is still recognised as a duplicate.

use crate::Hub;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Longest retention an org may ask for.
pub const MAX_RETENTION_DAYS: u32 = 3650;

/// Prune every `prune_interval_secs` until `stop` turns true.
pub async fn run(hub: Arc<Hub>, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(hub.config.prune_interval_secs));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let worker = hub.clone();
        match tokio::task::spawn_blocking(move || run_once(&worker, crate::wall_ms())).await {
            Ok(Ok(removed)) if removed > 0 => tracing::info!(removed, "retention pruned old telemetry"),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "retention run failed"),
            Err(_) => tracing::warn!("retention run panicked"),
        }
    }
}

/// One pass over every org's agents; returns how many entries were removed.
pub fn run_once(hub: &Hub, now_ms: i64) -> Result<u64, crate::store::Error> {
    let started = Instant::now();
    let mut removed = 0;
    for org in hub.store.orgs()? {
        let days = if org.retention_days == 0 { hub.config.default_retention_days } else { org.retention_days };
        let cut = now_ms - i64::from(days) * 86_400_000;
        for agent in hub.store.agents_of_org(&org.id)? {
            removed += hub.store.prune_agent(&agent.id, cut)?;
        }
    }
    let metrics = &hub.metrics;
    metrics.retention_runs.fetch_add(1, Ordering::Relaxed);
    metrics.retention_pruned.fetch_add(removed, Ordering::Relaxed);
    metrics.retention_last_run_ms.store(now_ms.max(0) as u64, Ordering::Relaxed);
    metrics.retention_last_duration_ms.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    Ok(removed)
}
