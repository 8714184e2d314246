//! Host facts the agent reports at enrollment and in every hello (sysinfo).

use gantry_shared::message::HostFacts;

/// Facts about this machine, as far as they can be read; unknown values stay empty.
pub fn collect() -> HostFacts {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    HostFacts {
        hostname: sysinfo::System::host_name().unwrap_or_default(),
        os: sysinfo::System::long_os_version().unwrap_or_else(|| std::env::consts::OS.to_string()),
        kernel: sysinfo::System::kernel_version().unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
        cpu_count: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(0),
        memory_bytes: system.total_memory(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}
