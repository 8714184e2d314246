//! The chaos scenario: a hub process and several agent processes (behind a relay that can
//! partition them), hit by random faults — agent kill -9, hub kill -9, graceful hub
//! restart, network partition — checking after each that every agent comes back on its own
//! and nothing acknowledged was lost. The `gantry-chaos` binary runs it for minutes; the
//! test suite runs a short round of every fault.

#![allow(clippy::unwrap_used)]

use crate::{enroll, free_addrs, wait_for, AgentProcess, Api, HubProcess, Partition, TempDir};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The kinds of fault the scenario injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    AgentKill,
    HubKill,
    HubRestart,
    Partition,
}

impl Fault {
    pub const ALL: [Fault; 4] = [Fault::AgentKill, Fault::HubKill, Fault::HubRestart, Fault::Partition];

    pub fn name(self) -> &'static str {
        match self {
            Fault::AgentKill => "agent_kill9",
            Fault::HubKill => "hub_kill9",
            Fault::HubRestart => "hub_graceful_restart",
            Fault::Partition => "partition_20s",
        }
    }
}

/// What one run saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Recovery times (fault healed → every agent online again), per fault.
    pub recoveries: BTreeMap<&'static str, Vec<Duration>>,
    pub faults: usize,
}

impl Report {
    /// One line per fault kind: count, median and max recovery.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for (name, times) in &self.recoveries {
            let mut sorted = times.clone();
            sorted.sort();
            let median = sorted[sorted.len() / 2];
            let max = sorted[sorted.len() - 1];
            out.push_str(&format!("{name}: {} faults, recovery median {:.2} s, max {:.2} s\n", sorted.len(), median.as_secs_f64(), max.as_secs_f64()));
        }
        out
    }

    /// The figures as one JSON object.
    pub fn json(&self) -> serde_json::Value {
        let mut kinds = serde_json::Map::new();
        for (name, times) in &self.recoveries {
            let mut sorted: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
            sorted.sort_by(f64::total_cmp);
            kinds.insert(
                name.to_string(),
                serde_json::json!({ "count": sorted.len(), "median_s": sorted[sorted.len() / 2], "max_s": sorted[sorted.len() - 1] }),
            );
        }
        serde_json::json!({ "faults": self.faults, "kinds": kinds })
    }
}

struct Fleet {
    dir: TempDir,
    data: PathBuf,
    http: std::net::SocketAddr,
    quic: std::net::SocketAddr,
    hub: HubProcess,
    relay: Partition,
    agents: Vec<(String, PathBuf, AgentProcess)>,
}

impl Fleet {
    fn api(&self) -> Api {
        self.hub.api(&self.data)
    }

    fn start_agent(&self, state: &std::path::Path) -> AgentProcess {
        AgentProcess::start_via(state, &self.relay.addr.to_string())
    }

    async fn all_online(&self, limit: Duration, what: &str) {
        let api = self.api();
        let ids: Vec<String> = self.agents.iter().map(|(id, _, _)| id.clone()).collect();
        wait_for(limit, what, || async {
            let (_, body) = api.get("/api/v1/orgs/chaos/agents").await;
            let agents = body["agents"].as_array()?.clone();
            let online = agents.iter().filter(|a| a["status"] == "online").count();
            (agents.len() == ids.len() && online == ids.len()).then_some(())
        })
        .await;
    }

    /// Nothing acknowledged is lost: every enrolled agent is still there, counted once,
    /// and no agent process gave up.
    async fn check_invariants(&mut self) {
        let (_, org) = self.api().get("/api/v1/orgs/chaos").await;
        assert_eq!(org["agent_count"].as_u64(), Some(self.agents.len() as u64), "org agent count: {org}");
        for (id, _, process) in &mut self.agents {
            let exited = process.child.try_wait().expect("agent status");
            assert!(exited.is_none(), "agent {id} exited on its own: {exited:?}");
        }
    }
}

/// Run `rounds` faults (each kind in turn when `rounds` ≥ 4, then random ones chosen from
/// `seed`) against `agents` agent processes, or until `max_time` has passed. Panics with a
/// clear message on any broken promise.
pub async fn run(agents: usize, rounds: usize, max_time: Duration, seed: u64) -> Report {
    let dir = TempDir::new("chaos");
    let data = dir.path().join("hub");
    let (http, quic) = free_addrs();
    let hub = HubProcess::start(&data, http, quic).await;
    let relay = Partition::start(quic).await;
    let mut fleet = Fleet { data, http, quic, hub, relay, agents: Vec::new(), dir };
    let api = fleet.api();
    let (status, body) = api.post("/api/v1/orgs", &serde_json::json!({ "id": "chaos", "agent_limit": agents })).await;
    assert_eq!(status, 201, "{body}");
    let (_, body) = api.post("/api/v1/orgs/chaos/enrollment-tokens", &serde_json::json!({ "uses": agents })).await;
    let token = body["token"].as_str().expect("token").to_string();
    for i in 0..agents {
        let state = fleet.dir.path().join(format!("agent-{i}"));
        let id = enroll(&token, &state).await.expect("enroll");
        let process = fleet.start_agent(&state);
        fleet.agents.push((id, state, process));
    }
    fleet.all_online(Duration::from_secs(30), "every agent online at start").await;

    let mut report = Report::default();
    let mut rng = seed.max(1);
    let started = Instant::now();
    for round in 0..rounds {
        if started.elapsed() > max_time {
            break;
        }
        // xorshift: deterministic for a seed, no extra dependency.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let fault = if round < Fault::ALL.len() { Fault::ALL[round] } else { Fault::ALL[(rng % 4) as usize] };
        let healed = inject(&mut fleet, fault, rng).await;
        fleet.all_online(Duration::from_secs(30), &format!("every agent online after {}", fault.name())).await;
        report.recoveries.entry(fault.name()).or_default().push(healed.elapsed());
        report.faults += 1;
        fleet.check_invariants().await;
    }
    let _ = fleet.http;
    fleet.hub.kill9().await;
    report
}

/// Inject one fault and undo it; returns when the cause was removed.
async fn inject(fleet: &mut Fleet, fault: Fault, random: u64) -> Instant {
    match fault {
        Fault::AgentKill => {
            let index = (random as usize / 7) % fleet.agents.len();
            let api = fleet.api();
            let id = fleet.agents[index].0.clone();
            let (_, before) = api.get(&format!("/api/v1/agents/{id}")).await;
            let (_, state, process) = &mut fleet.agents[index];
            process.kill9().await;
            let state = state.clone();
            let restarted = fleet.start_agent(&state);
            let healed = Instant::now();
            fleet.agents[index].2 = restarted;
            // The hub may not have noticed the kill yet; wait for the new session itself.
            wait_for(Duration::from_secs(10), "the restarted agent's new session", || async {
                let (_, now) = api.get(&format!("/api/v1/agents/{id}")).await;
                (now["status"] == "online" && now["connected_since"] != before["connected_since"]).then_some(())
            })
            .await;
            healed
        }
        Fault::HubKill => {
            fleet.hub.kill9().await;
            fleet.hub = HubProcess::start(&fleet.data, fleet.http, fleet.quic).await;
            Instant::now()
        }
        Fault::HubRestart => {
            fleet.hub.terminate().await;
            fleet.hub = HubProcess::start(&fleet.data, fleet.http, fleet.quic).await;
            Instant::now()
        }
        Fault::Partition => {
            fleet.relay.cut();
            let api = fleet.api();
            let count = fleet.agents.len();
            // Long enough for the hub to see every agent offline.
            wait_for(Duration::from_secs(40), "every agent offline during the partition", || async {
                let (_, body) = api.get("/api/v1/orgs/chaos/agents").await;
                let agents = body["agents"].as_array()?.clone();
                (agents.len() == count && agents.iter().all(|a| a["status"] == "offline")).then_some(())
            })
            .await;
            fleet.relay.heal();
            Instant::now()
        }
    }
}

/// What an outage run saw.
#[derive(Debug)]
pub struct OutageReport {
    pub lines: u64,
    pub outage: Duration,
    /// Largest spool size on disk during the outage, in bytes.
    pub peak_spool_bytes: u64,
    /// From the hub's return until every line had arrived.
    pub drain_time: Duration,
}

/// The hub is unreachable for `outage` while the agent keeps collecting a file written at
/// `rate_per_sec` lines per second; afterwards every line arrives exactly once and in
/// order, and the spool stayed within its cap.
pub async fn outage(outage_for: Duration, rate_per_sec: u64) -> OutageReport {
    let dir = TempDir::new("outage-run");
    let data = dir.path().join("hub");
    let (http, quic) = free_addrs();
    let mut hub = HubProcess::start(&data, http, quic).await;
    let api = hub.api(&data);
    api.post("/api/v1/orgs", &serde_json::json!({ "id": "soak" })).await;
    let (_, body) = api.post("/api/v1/orgs/soak/enrollment-tokens", &serde_json::json!({})).await;
    let state = dir.path().join("agent");
    let id = enroll(body["token"].as_str().expect("token"), &state).await.expect("enroll");
    let log = dir.path().join("app.log");
    let cap: u64 = 256 * 1024 * 1024;
    let config = crate::agent_config_file(dir.path(), &state, &[&log], &format!("[spool]\nlogs_bytes = {cap}\n[docker]\nenabled = false"));
    let _agent = AgentProcess::start_with_config(&config, &state);
    wait_for(Duration::from_secs(30), "agent online", || async {
        let (_, body) = api.get(&format!("/api/v1/agents/{id}")).await;
        (body["status"] == "online").then_some(())
    })
    .await;
    let writer = crate::LineWriter::start(&log, Duration::from_micros(1_000_000 / rate_per_sec.max(1)));
    hub.kill9().await;
    let down = Instant::now();
    let mut peak = 0;
    while down.elapsed() < outage_for {
        peak = peak.max(dir_size(&state.join("spool")));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let lines = writer.stop();
    peak = peak.max(dir_size(&state.join("spool")));
    let hub = HubProcess::start(&data, http, quic).await;
    let back = Instant::now();
    let records = wait_for(Duration::from_secs(600), "every line after the outage", || async {
        let records = api.all_records(&format!("/api/v1/agents/{id}/logs"), "").await;
        let count = records.iter().filter(|r| r["kind"] == "log" && r["stream"] == "file").count() as u64;
        (count >= lines).then_some(records)
    })
    .await;
    let drain_time = back.elapsed();
    crate::assert_lines_exactly_once(&records, lines);
    assert!(peak <= cap + cap / 2, "spool grew to {peak} bytes against a cap of {cap}");
    let mut hub = hub;
    hub.kill9().await;
    OutageReport { lines, outage: outage_for, peak_spool_bytes: peak, drain_time }
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.filter_map(Result::ok).map(|e| if e.path().is_dir() { dir_size(&e.path()) } else { e.metadata().map(|m| m.len()).unwrap_or(0) }).sum()
        })
        .unwrap_or(0)
}
