//! `gantry-chaos [--minutes M] [--agents N] [--seed S]`: the long chaos run. Injects random
//! faults (agent kill -9, hub kill -9, graceful hub restart, 20 s network partition) into a
//! hub process and N agent processes on loopback for M minutes, checks after each fault
//! that every agent returns on its own and nothing was lost, and prints recovery figures.
//!
//! `gantry-chaos outage [--minutes M] [--rate R]`: the hub is down for M minutes while an
//! agent keeps collecting a file written at R lines/s; afterwards every line must arrive
//! exactly once and the spool must have stayed within its cap.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number"))).unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let minutes = arg(&args, "--minutes", 10);
    let agents = arg(&args, "--agents", 8) as usize;
    let seed = arg(&args, "--seed", 0x9e3779b97f4a7c15);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    if args.get(1).map(String::as_str) == Some("outage") {
        let rate = arg(&args, "--rate", 200);
        let report = runtime.block_on(gantry_tests::chaos::outage(Duration::from_secs(minutes * 60), rate));
        println!(
            "outage: hub down {} min at {rate} lines/s: {} lines, peak spool {:.1} MiB, all delivered exactly once {:.1} s after the hub returned",
            minutes,
            report.lines,
            report.peak_spool_bytes as f64 / (1024.0 * 1024.0),
            report.drain_time.as_secs_f64()
        );
        println!(
            "{}",
            serde_json::json!({ "scenario": "outage", "minutes": minutes, "rate": rate, "lines": report.lines, "peak_spool_bytes": report.peak_spool_bytes, "drain_s": report.drain_time.as_secs_f64() })
        );
        return;
    }
    let report = runtime.block_on(gantry_tests::chaos::run(agents, usize::MAX, Duration::from_secs(minutes * 60), seed));
    println!("chaos: {minutes} min, {agents} agents, seed {seed}, {} faults, every agent recovered every time", report.faults);
    print!("{}", report.summary());
    println!("{}", serde_json::json!({ "minutes": minutes, "agents": agents, "seed": seed, "report": report.json() }));
}
