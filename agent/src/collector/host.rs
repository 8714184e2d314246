//! Host collector (sysinfo): CPU total and per core, load, memory, swap, disk usage per
//! mount, disk and network I/O rates, uptime and process count, as metric samples.
//!
//! Rates are computed from the counters' change between two collections divided by the
//! time between them, so the first collection reports no rates. This module only reads
//! the host; it does not spool or send.

use gantry_shared::telemetry::Sample;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Settings of the host collector.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// Collect host metrics at all.
    pub enabled: bool,
    /// Seconds between collections.
    pub interval_secs: u64,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig { enabled: true, interval_secs: 10 }
    }
}

/// Keeps the previous readings needed for rates.
#[derive(Debug)]
pub struct HostCollector {
    system: sysinfo::System,
    disks: sysinfo::Disks,
    networks: sysinfo::Networks,
    last: Option<Instant>,
}

impl Default for HostCollector {
    fn default() -> Self {
        Self::new()
    }
}

fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
    Sample { name: name.to_string(), labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), value }
}

impl HostCollector {
    pub fn new() -> Self {
        let mut system = sysinfo::System::new();
        system.refresh_cpu_usage();
        HostCollector { system, disks: sysinfo::Disks::new_with_refreshed_list(), networks: sysinfo::Networks::new_with_refreshed_list(), last: None }
    }

    /// One collection.
    pub fn collect(&mut self) -> Vec<Sample> {
        let now = Instant::now();
        let elapsed = self.last.map(|t| now.duration_since(t).as_secs_f64()).filter(|s| *s > 0.0);
        self.last = Some(now);
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        self.disks.refresh(true);
        self.networks.refresh(true);

        let mut out = Vec::with_capacity(64);
        out.push(sample("cpu.usage_percent", &[], f64::from(self.system.global_cpu_usage())));
        for (index, cpu) in self.system.cpus().iter().enumerate() {
            out.push(sample("cpu.core_usage_percent", &[("core", &index.to_string())], f64::from(cpu.cpu_usage())));
        }
        let load = sysinfo::System::load_average();
        out.push(sample("load.1m", &[], load.one));
        out.push(sample("load.5m", &[], load.five));
        out.push(sample("load.15m", &[], load.fifteen));
        out.push(sample("memory.total_bytes", &[], self.system.total_memory() as f64));
        out.push(sample("memory.used_bytes", &[], self.system.used_memory() as f64));
        out.push(sample("memory.available_bytes", &[], self.system.available_memory() as f64));
        if self.system.total_memory() > 0 {
            let used = 100.0 * (self.system.total_memory() - self.system.available_memory()) as f64 / self.system.total_memory() as f64;
            out.push(sample("memory.used_percent", &[], used));
        }
        out.push(sample("swap.total_bytes", &[], self.system.total_swap() as f64));
        out.push(sample("swap.used_bytes", &[], self.system.used_swap() as f64));
        for disk in self.disks.list() {
            let mount = disk.mount_point().to_string_lossy().into_owned();
            let device = disk.name().to_string_lossy().into_owned();
            let total = disk.total_space();
            let used = total.saturating_sub(disk.available_space());
            out.push(sample("disk.total_bytes", &[("mount", &mount)], total as f64));
            out.push(sample("disk.used_bytes", &[("mount", &mount)], used as f64));
            if total > 0 {
                out.push(sample("disk.used_percent", &[("mount", &mount)], 100.0 * used as f64 / total as f64));
            }
            if let Some(secs) = elapsed {
                let usage = disk.usage();
                out.push(sample("disk.read_bytes_per_second", &[("mount", &mount), ("device", &device)], usage.read_bytes as f64 / secs));
                out.push(sample("disk.written_bytes_per_second", &[("mount", &mount), ("device", &device)], usage.written_bytes as f64 / secs));
            }
        }
        if let Some(secs) = elapsed {
            for (interface, data) in self.networks.list() {
                out.push(sample("net.received_bytes_per_second", &[("interface", interface)], data.received() as f64 / secs));
                out.push(sample("net.transmitted_bytes_per_second", &[("interface", interface)], data.transmitted() as f64 / secs));
            }
        }
        out.push(sample("uptime_seconds", &[], sysinfo::System::uptime() as f64));
        out.push(sample("processes", &[], process_count() as f64));
        out
    }
}

/// Processes running, counted from `/proc` (cheaper than sysinfo's full process scan).
fn process_count() -> usize {
    std::fs::read_dir("/proc")
        .map(|entries| entries.filter_map(Result::ok).filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))).count())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_the_documented_metrics() {
        let mut collector = HostCollector::new();
        let first = collector.collect();
        let names: std::collections::BTreeSet<_> = first.iter().map(|s| s.name.as_str()).collect();
        for expected in [
            "cpu.usage_percent",
            "cpu.core_usage_percent",
            "load.1m",
            "memory.total_bytes",
            "memory.used_percent",
            "swap.total_bytes",
            "disk.used_percent",
            "uptime_seconds",
            "processes",
        ] {
            assert!(names.contains(expected), "missing {expected}: {names:?}");
        }
        assert!(!names.contains("net.received_bytes_per_second"), "no rates without a previous reading");
        let second = collector.collect();
        assert!(second.iter().any(|s| s.name == "net.received_bytes_per_second"));
        let processes = second.iter().find(|s| s.name == "processes").unwrap().value;
        assert!(processes >= 1.0);
        let memory = second.iter().find(|s| s.name == "memory.total_bytes").unwrap().value;
        assert!(memory > 0.0);
    }
}
