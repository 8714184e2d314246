//! `gantry-bench-backup`: how long a backup's snapshot holds the store's writes, in process.
//!
//! ```text
//! gantry-bench-backup [--orgs N (1000)] [--hours H (720)] [--audit A (10000)] [--writers W (2)] [--runs R (3)]
//! ```
//!
//! Fills a real sled store in a fresh temporary directory: N orgs, N × H usage ledger
//! entries (one source per org and hour, appended in transactions of 1,000 as the
//! metering's hour close does) and A audit entries. Then W threads write without pause
//! (login sessions, one record each, no flush: a write's latency is the time it waited
//! for the store), and `Store::snapshot` runs R times, a second apart, each followed by
//! reading every copied tree back as a backup does. Reported per run: how long the
//! snapshot held writes (`Snapshot::held`), the longest write that overlapped it (what a
//! client saw), and the write latency median and 99th percentile outside snapshots; plus
//! the records copied and the store's size on disk.
//!
//! Prints a human summary and, as its last line, one JSON object with the figures. Build in
//! release: `cargo build --release -p gantry-tests --features bench --bin gantry-bench-backup`.

use anyhow::{bail, Context, Result};
use gantry_hub::store::{NewAuditEntry, Org, Session, Store};
use gantry_tests::bench::{cores, log_bytes_usage, median, r2, today, MONTH_START_MS};
use serde_json::json;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: gantry-bench-backup [--orgs N (1000)] [--hours H (720)] [--audit A (10000)] [--writers W (2)] [--runs R (3)]";

struct Flags {
    orgs: u64,
    hours: u64,
    audit: u64,
    writers: u64,
    runs: u64,
}

impl Flags {
    fn parse(args: &[String]) -> Result<Flags> {
        let mut flags = Flags { orgs: 1000, hours: 720, audit: 10_000, writers: 2, runs: 3 };
        let mut at = 0;
        while at < args.len() {
            let value = args.get(at + 1).with_context(|| format!("{} needs a value", args[at]))?;
            let number: u64 = value.parse().with_context(|| format!("{} {value}: not a number", args[at]))?;
            match args[at].as_str() {
                "--orgs" => flags.orgs = number,
                "--hours" => flags.hours = number,
                "--audit" => flags.audit = number,
                "--writers" => flags.writers = number.max(1),
                "--runs" => flags.runs = number.max(1),
                other => bail!("unknown flag {other}"),
            }
            at += 2;
        }
        Ok(flags)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flags = match Flags::parse(&args) {
        Ok(flags) => flags,
        Err(error) => {
            eprintln!("error: {error:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().map(|e| if e.path().is_dir() { dir_bytes(&e.path()) } else { e.metadata().map_or(0, |m| m.len()) }).sum()
}

/// One write: when it started and how long it took.
type Sample = (Instant, Duration);

fn run(flags: &Flags) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("gantry-bench-backup-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = measure(flags, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(flags: &Flags, dir: &std::path::Path) -> Result<()> {
    let store = Store::create(dir).context("creating the store")?;
    let filling = Instant::now();
    for org in 0..flags.orgs {
        let id = format!("org-{org:05}");
        store.create_org(&Org {
            id: id.clone(),
            name: id,
            agent_limit: 100,
            agent_count: 0,
            suspended: false,
            created_at_ms: MONTH_START_MS,
            retention_days: 0,
        })?;
    }
    let mut pending = Vec::with_capacity(1000);
    for hour in 0..flags.hours as i64 {
        for org in 0..flags.orgs {
            pending.push(log_bytes_usage(org, hour, 1_000 + (org as i64 * 7919 + hour * 104_729) % 20_000_000));
            if pending.len() == 1000 {
                for outcome in store.record_many(&pending) {
                    outcome.context("appending to the ledger")?;
                }
                pending.clear();
            }
        }
    }
    for outcome in store.record_many(&pending) {
        outcome.context("appending to the ledger")?;
    }
    for n in 0..flags.audit {
        store.append_audit(NewAuditEntry {
            at_ms: MONTH_START_MS + n as i64,
            actor: format!("user-{}@example.com", n % 500),
            actor_kind: "user".into(),
            org: Some(format!("org-{:05}", n % flags.orgs.max(1))),
            action: "POST /api/v1/orgs/{org}/checks".into(),
            target: [("org".to_string(), format!("org-{:05}", n % flags.orgs.max(1)))].into(),
            outcome: "201".into(),
            request_id: Some(format!("req-{n:012x}")),
            client_ip: Some("203.0.113.9".into()),
        })?;
    }
    let filled_s = filling.elapsed().as_secs_f64();
    store.snapshot()?; // warms the page cache as a running hub's would be
    let store_bytes = dir_bytes(&dir.join("store"));
    println!(
        "store filled in {filled_s:.1} s: {} orgs, {} ledger entries, {} audit entries, {:.1} MiB on disk",
        flags.orgs,
        flags.orgs * flags.hours,
        flags.audit,
        store_bytes as f64 / 1048576.0
    );

    let stop = Arc::new(AtomicBool::new(false));
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let writers: Vec<_> = (0..flags.writers)
        .map(|w| {
            let (store, stop, samples) = (store.clone(), stop.clone(), samples.clone());
            std::thread::spawn(move || -> Result<()> {
                let mut mine = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    n += 1;
                    let session = Session { user_id: format!("u{w}"), email: format!("writer-{w}@example.com"), created_at_ms: 0, last_seen_ms: n as i64 };
                    let started = Instant::now();
                    store.put_session(&format!("bench-{w}-{}", n % 10_000), &session)?;
                    mine.push((started, started.elapsed()));
                }
                samples.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
                Ok(())
            })
        })
        .collect();

    let mut runs = Vec::new();
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..flags.runs {
        let started = Instant::now();
        let snapshot = store.snapshot()?;
        let taken = started.elapsed();
        let mut sink = std::io::sink();
        for tree in &snapshot.trees {
            snapshot.copy_tree_to(tree, &mut sink)?;
        }
        runs.push((started, taken, snapshot.held, snapshot.records(), started.elapsed()));
        drop(snapshot);
        std::thread::sleep(Duration::from_secs(1));
    }
    stop.store(true, Ordering::Release);
    for writer in writers {
        writer.join().map_err(|_| anyhow::anyhow!("a writer panicked"))??;
    }
    let samples = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();

    let overlaps = |at: Instant, took: Duration, from: Instant, to: Instant| at < to && at + took > from;
    let mut outside: Vec<f64> = samples
        .iter()
        .filter(|(at, took)| !runs.iter().any(|(from, taken, ..)| overlaps(*at, *took, *from, *from + *taken)))
        .map(|(_, took)| took.as_secs_f64() * 1000.0)
        .collect();
    outside.sort_by(f64::total_cmp);
    let p99 = outside.get(((outside.len() as f64 * 0.99) as usize).min(outside.len().saturating_sub(1))).copied().unwrap_or(0.0);
    let mut per_run = Vec::new();
    for (i, (from, taken, held, records, with_read)) in runs.iter().enumerate() {
        let worst =
            samples.iter().filter(|(at, took)| overlaps(*at, *took, *from, *from + *taken)).map(|(_, took)| took.as_secs_f64() * 1000.0).fold(0.0, f64::max);
        println!(
            "run {}: writes held {:.1} ms, snapshot {:.1} ms ({records} records), longest overlapping write {worst:.1} ms, read back by {:.1} ms",
            i + 1,
            held.as_secs_f64() * 1000.0,
            taken.as_secs_f64() * 1000.0,
            with_read.as_secs_f64() * 1000.0
        );
        per_run.push(json!({ "held_ms": r2(held.as_secs_f64() * 1000.0), "snapshot_ms": r2(taken.as_secs_f64() * 1000.0), "longest_write_ms": r2(worst), "records": records }));
    }
    let held: Vec<f64> = runs.iter().map(|r| r.2.as_secs_f64() * 1000.0).collect();
    println!("writes outside snapshots: {} (median {:.3} ms, p99 {:.3} ms); median hold {:.1} ms", outside.len(), median(&outside), p99, median(&held));
    println!(
        "{}",
        json!({
            "bench": "backup-snapshot",
            "date": today(),
            "cores": cores(),
            "orgs": flags.orgs,
            "ledger_entries": flags.orgs * flags.hours,
            "audit_entries": flags.audit,
            "store_bytes": store_bytes,
            "writers": flags.writers,
            "runs": per_run,
            "median_held_ms": r2(median(&held)),
            "write_median_ms_outside": r2(median(&outside)),
            "write_p99_ms_outside": r2(p99),
        })
    );
    Ok(())
}
