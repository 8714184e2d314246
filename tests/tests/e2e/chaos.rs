//! A short chaos round for CI: one of each fault (agent kill -9, hub kill -9, graceful hub
//! restart, network partition) against three agent processes. `gantry-chaos` runs the same
//! scenario for many minutes (see BENCHMARKS.md).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_recovers_from_every_fault() {
    gantry_tests::init_logging();
    let report = gantry_tests::chaos::run(3, 4, Duration::from_secs(300), 7).await;
    eprint!("{}", report.summary());
    assert_eq!(report.faults, 4);
    assert_eq!(report.recoveries.len(), 4, "one of each fault kind");
}
