//! `gantry-bench-dashboard`: how long the dashboard's main pages take to render on the hub
//! with a large fleet in the store.
//!
//! ```text
//! gantry-bench-dashboard [--agents N (1000)] [--orgs O (10)] [--runs R (30)]
//! ```
//!
//! Starts a hub in process on loopback (real sled store in a temporary directory), enrolls
//! N agents across O orgs straight into the store (labels, two versions; none connected),
//! stores one hour of host metrics (every 10 s: CPU, memory, two disks, two interfaces),
//! 200 log lines and 50 events for one agent, logs in as the operator and fetches each page
//! R times after 3 warm-up fetches, one request at a time over HTTP with the session cookie.
//! A page's time is the whole request on loopback: session lookup, store reads, view
//! building, rendering, the response. Reports the median, 90th percentile and maximum per
//! page, the page's size, and as its last line one JSON object with the figures.
//!
//! Build in release: `cargo build --release -p gantry-tests --features bench --bin gantry-bench-dashboard`.

use anyhow::{bail, ensure, Context, Result};
use gantry_hub::store::{Agent, Token};
use gantry_shared::message::StreamClass;
use gantry_shared::telemetry::{Event, LogLine, LogStream, Record, RecordBody, Sample, Severity};
use gantry_tests::bench::{cores, median, r2, today};
use gantry_tests::{TempDir, TestHub, ADMIN_EMAIL, ADMIN_PASSWORD};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: gantry-bench-dashboard [--agents N (1000)] [--orgs O (10)] [--runs R (30)]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = (|| -> Result<(usize, usize, usize)> {
        let (mut agents, mut orgs, mut runs) = (1000, 10, 30);
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value: usize = it.next().with_context(|| format!("{flag} needs a value"))?.parse().with_context(|| format!("{flag} needs a number"))?;
            match flag.as_str() {
                "--agents" => agents = value,
                "--orgs" => orgs = value,
                "--runs" => runs = value,
                other => bail!("unknown flag {other}"),
            }
        }
        ensure!(agents >= 1 && orgs >= 1 && runs >= 1, "every figure must be at least 1");
        Ok((agents, orgs, runs))
    })();
    let (agents, orgs, runs) = match parsed {
        Ok(figures) => figures,
        Err(error) => {
            eprintln!("error: {error:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(agents, orgs, runs)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(agents: usize, orgs: usize, runs: usize) -> Result<()> {
    let dir = TempDir::new("bench-dashboard");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    let store = &hub.hub.store;
    let now = gantry_hub::wall_ms();
    let setup = Instant::now();
    let per_org = agents.div_ceil(orgs);
    let mut first_agent = String::new();
    for o in 0..orgs {
        let org = format!("org-{o:03}");
        let (status, body) = hub.api().post("/api/v1/orgs", &json!({ "id": org, "agent_limit": per_org + 1 })).await;
        ensure!(status == 201, "create org {org}: {status} {body}");
        let token = Token {
            id: format!("tok_{o}"),
            org: org.clone(),
            secret_sha256: String::new(),
            labels: vec![],
            expires_at_ms: now + 3_600_000,
            uses_total: per_org as u32,
            uses_left: per_org as u32,
            revoked: false,
            created_by: "bench".into(),
            created_at_ms: now,
        };
        store.create_token(&token)?;
        for i in (o * per_org)..((o + 1) * per_org).min(agents) {
            let agent = Agent {
                id: format!("agt_{i:05}"),
                org: org.clone(),
                labels: vec![("env".into(), if i % 3 == 0 { "staging" } else { "prod" }.into()), ("region".into(), format!("r{}", i % 4))],
                hostname: format!("host-{i:05}.example.com"),
                os: "linux".into(),
                kernel: "6.1.0".into(),
                arch: "x86_64".into(),
                cpu_count: 4,
                memory_bytes: 8 << 30,
                agent_version: if i % 5 == 0 { "0.1.0" } else { "0.2.0" }.into(),
                enrolled_at_ms: now - 86_400_000,
                enrolled_with_token: token.id.clone(),
                cert_not_after_ms: now + 30 * 86_400_000,
                last_seen_ms: Some(now - 60_000),
                rtt_ms: Some(1.5),
                clock_skew_ms: Some(3),
                ..Agent::default()
            };
            if let Err(refused) = store.enroll(&token.id, now, &agent)? {
                bail!("enroll {}: {refused}", agent.id);
            }
            if first_agent.is_empty() {
                first_agent = agent.id.clone();
            }
        }
    }
    telemetry(&hub, &first_agent, now).await?;
    let setup_secs = setup.elapsed().as_secs_f64();

    let (status, body, cookie) = hub.api().anonymous().login(&json!({ "email": ADMIN_EMAIL, "password": ADMIN_PASSWORD })).await;
    ensure!(status == 200, "login: {status} {body}");
    let cookie = cookie.context("no session cookie")?;
    let pages = [
        ("overview", "/".to_string()),
        ("agents", "/agents".to_string()),
        ("agents page 10", "/agents?page=10".to_string()),
        ("agents filtered", "/agents?status=offline&label=env%3Dprod&q=host-00".to_string()),
        ("agent detail (1 h)", format!("/agents/{first_agent}")),
        ("agent detail (24 h)", format!("/agents/{first_agent}?range=24h")),
        ("enrollment", "/enrollment".to_string()),
    ];
    println!("gantry-bench-dashboard {} · {agents} agents in {orgs} orgs · {runs} runs per page · {} cores", today(), cores());
    println!("setup (orgs, agents, telemetry): {:.1} s", setup_secs);
    println!("{:<22} {:>10} {:>10} {:>10} {:>10}", "page", "median ms", "p90 ms", "max ms", "KiB");
    let mut figures = Vec::new();
    for (name, path) in &pages {
        let mut times = Vec::with_capacity(runs);
        let mut size = 0;
        for run in 0..runs + 3 {
            let started = Instant::now();
            let (status, body) = get(&hub, &cookie, path).await?;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            ensure!(status == 200, "{path}: {status} {}", body.chars().take(300).collect::<String>());
            size = body.len();
            if run >= 3 {
                times.push(ms);
            }
        }
        let mut sorted = times.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let p90 = sorted[((sorted.len() as f64 * 0.9).ceil() as usize).saturating_sub(1).min(sorted.len() - 1)];
        let max = sorted[sorted.len() - 1];
        let med = median(&times);
        println!("{name:<22} {:>10.1} {:>10.1} {:>10.1} {:>10.0}", med, p90, max, size as f64 / 1024.0);
        figures.push(json!({ "page": name, "path": path, "median_ms": r2(med), "p90_ms": r2(p90), "max_ms": r2(max), "bytes": size }));
    }
    hub.stop().await;
    println!("{}", json!({ "bench": "dashboard", "date": today(), "agents": agents, "orgs": orgs, "runs": runs, "cores": cores(), "pages": figures }));
    Ok(())
}

async fn get(hub: &TestHub, cookie: &str, path: &str) -> Result<(u16, String)> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
    let request = hyper::Request::get(format!("http://{}{path}", hub.http)).header("cookie", cookie).body(Full::new(bytes::Bytes::new()))?;
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request)).await.context("request timed out")??;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// One hour of host metrics every 10 s, 200 log lines and 50 events for `agent`.
async fn telemetry(hub: &TestHub, agent: &str, now: i64) -> Result<()> {
    let store = &hub.hub.store;
    let sample = |name: &str, labels: &[(&str, &str)], value: f64| Sample {
        name: name.into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        value,
    };
    let mut records = Vec::new();
    for i in 0..360i64 {
        let wave = (i as f64 / 20.0).sin();
        records.push(Record {
            seq: i as u64 + 1,
            ts_unix_ms: now - 3_600_000 + i * 10_000,
            body: RecordBody::Metrics(vec![
                sample("cpu.usage_percent", &[], 40.0 + 30.0 * wave),
                sample("memory.used_percent", &[], 60.0 + 5.0 * wave),
                sample("disk.used_percent", &[("mount", "/")], 71.0),
                sample("disk.used_percent", &[("mount", "/var")], 35.0 + i as f64 / 100.0),
                sample("net.received_bytes_per_second", &[("interface", "eth0")], 2e6 * (1.0 + wave)),
                sample("net.transmitted_bytes_per_second", &[("interface", "eth0")], 5e5 * (1.0 - wave)),
                sample("net.received_bytes_per_second", &[("interface", "eth1")], 1e4),
                sample("net.transmitted_bytes_per_second", &[("interface", "eth1")], 2e4),
            ]),
        });
    }
    store.ingest(agent, StreamClass::Metrics, &records).await?;
    let logs: Vec<Record> = (0..200i64)
        .map(|i| Record {
            seq: i as u64 + 1,
            ts_unix_ms: now - 600_000 + i * 3_000,
            body: RecordBody::Log(LogLine {
                source: "container:web".into(),
                stream: if i % 10 == 0 { LogStream::Stderr } else { LogStream::Stdout },
                container: Some("0123456789abcdef".into()),
                line: format!("GET /api/items/{i} 200 {} ms", i % 37),
            }),
        })
        .collect();
    store.ingest(agent, StreamClass::Logs, &logs).await?;
    let events: Vec<Record> = (0..50i64)
        .map(|i| Record {
            seq: i as u64 + 1,
            ts_unix_ms: now - 3_000_000 + i * 60_000,
            body: RecordBody::Event(Event {
                kind: "docker.container.start".into(),
                severity: Severity::Info,
                message: format!("container web started ({i})"),
                attributes: vec![],
            }),
        })
        .collect();
    store.ingest(agent, StreamClass::Events, &events).await?;
    Ok(())
}
