//! `gantry-bench-billing`: rerunnable benchmarks of billing's computations, in process.
//!
//! ```text
//! gantry-bench-billing invoices [--orgs N (10000)] [--runs R (5)]
//! gantry-bench-billing ledger [--orgs N (10000)] [--hours H (720)] [--batch B (1000)] [--runs R (3)]
//! ```
//!
//! - `invoices`: invoice computation (`billing::pricing::compute_invoice`) for N orgs over
//!   one 30-day month (720 hours). Two plans with a base fee and three metered prices
//!   (agent hours graduated, log bytes volume, events in packages). Each org's usage comes
//!   from 720 hourly figures (agents connected, log bytes, events) drawn from a fixed seed,
//!   summed per segment (counters) or maxed (peak agents); one org in ten changes plan on
//!   day 12 and one in twenty ends a free trial on day 7, so their months have two
//!   segments. Building the usage is setup, timed once and reported apart; the batch of N
//!   invoices is then computed R times and the median batch time is the figure. Every run
//!   must produce the same sum of totals (checked).
//!
//! - `ledger`: usage ledger write throughput (`Store::record_many`) on a real sled store in
//!   a fresh temporary directory per run: N orgs × H hourly `log_bytes` entries (one source
//!   per org), appended in transactions of B entries as the metering's hour close does,
//!   each durable before the next. Entries per second of the whole append, median of R
//!   runs; every run must end with N × H entries and the same usage sum (checked).
//!
//! Prints a human summary and, as its last line, one JSON object with the figures. Build in
//! release: `cargo build --release -p gantry-tests --features bench --bin gantry-bench-billing`.

use anyhow::{bail, ensure, Context, Result};
use gantry_hub::billing::pricing::{compute_invoice, Charge, MeterPrice, Prices, Segment, Tier, UnitPrice};
use gantry_hub::billing::{Meter, HOUR_MS};
use gantry_tests::bench::{cores, log_bytes_usage, median, r2, r3, today, MONTH_START_MS};
use serde_json::json;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str = "usage:
  gantry-bench-billing invoices [--orgs N (10000)] [--runs R (5)]
  gantry-bench-billing ledger [--orgs N (10000)] [--hours H (720)] [--batch B (1000)] [--runs R (3)]";

const HOURS: i64 = 720;
/// Where the plan change (day 12) and the trial's end (day 7) cut the month.
const CHANGE_HOUR: i64 = 12 * 24;
const TRIAL_END_HOUR: i64 = 7 * 24;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let flags = match Flags::parse(rest) {
        Ok(flags) => flags,
        Err(error) => {
            eprintln!("error: {error:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match command.as_str() {
        "invoices" => flags.only(&["orgs", "runs"]).and_then(|()| invoices(flags.num("orgs", 10_000)?, flags.num("runs", 5)?)),
        "ledger" => flags
            .only(&["orgs", "hours", "batch", "runs"])
            .and_then(|()| ledger(flags.num("orgs", 10_000)?, flags.num("hours", 720)?, flags.num("batch", 1_000)?, flags.num("runs", 3)?)),
        other => {
            eprintln!("error: unknown subcommand {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--name value` or `--name=value` pairs.
struct Flags(Vec<(String, String)>);

impl Flags {
    fn parse(args: &[String]) -> Result<Flags> {
        let mut out = Vec::new();
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            let name = arg.strip_prefix("--").with_context(|| format!("unexpected argument {arg:?}"))?;
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => (name.to_string(), iter.next().with_context(|| format!("--{name} needs a value"))?.clone()),
            };
            out.push((name, value));
        }
        Ok(Flags(out))
    }

    fn only(&self, allowed: &[&str]) -> Result<()> {
        match self.0.iter().find(|(n, _)| !allowed.contains(&n.as_str())) {
            Some((name, _)) => bail!("unknown flag --{name}"),
            None => Ok(()),
        }
    }

    /// The flag's last value as a number of at least 1, or `default`.
    fn num(&self, name: &str, default: u64) -> Result<u64> {
        let n = match self.0.iter().rev().find(|(n, _)| n == name) {
            Some((_, v)) => v.parse().with_context(|| format!("--{name} {v:?} is not a number"))?,
            None => default,
        };
        ensure!(n > 0, "--{name} must be at least 1");
        Ok(n)
    }
}

// ---------------------------------------------------------------------------------------
// invoices

fn tier(up_to: Option<u64>, minor: i64, per: u64, flat_minor: i64) -> Tier {
    Tier { up_to, unit: UnitPrice { minor, per }, flat_minor }
}

/// The smaller plan: base 19.00 USD; 3,600 agent hours included, then 0.03 / 0.02 / 0.01
/// graduated; 20 GB of logs included, then volume-priced per MB with flat fees on the upper
/// tiers; 1M events included, then 1.50 per started 100k.
fn starter() -> Prices {
    Prices {
        currency: "USD".into(),
        base_minor: 1_900,
        meters: vec![
            MeterPrice {
                meter: Meter::AgentHours,
                included: 3_600,
                charge: Charge::Graduated { tiers: vec![tier(Some(10_000), 3, 1, 0), tier(Some(50_000), 2, 1, 0), tier(None, 1, 1, 0)] },
            },
            MeterPrice {
                meter: Meter::LogBytes,
                included: 20_000_000_000,
                charge: Charge::Volume {
                    tiers: vec![
                        tier(Some(100_000_000_000), 8, 1_000_000, 0),
                        tier(Some(1_000_000_000_000), 6, 1_000_000, 500),
                        tier(None, 4, 1_000_000, 2_000),
                    ],
                },
            },
            MeterPrice { meter: Meter::Events, included: 1_000_000, charge: Charge::Package { size: 100_000, price_minor: 150 } },
        ],
    }
}

/// The larger plan: base 99.00 USD, larger allowances, lower unit prices.
fn pro() -> Prices {
    Prices {
        currency: "USD".into(),
        base_minor: 9_900,
        meters: vec![
            MeterPrice {
                meter: Meter::AgentHours,
                included: 14_400,
                charge: Charge::Graduated { tiers: vec![tier(Some(50_000), 2, 1, 0), tier(None, 1, 1, 0)] },
            },
            MeterPrice {
                meter: Meter::LogBytes,
                included: 200_000_000_000,
                charge: Charge::Volume { tiers: vec![tier(Some(1_000_000_000_000), 5, 1_000_000, 0), tier(None, 3, 1_000_000, 1_000)] },
            },
            MeterPrice { meter: Meter::Events, included: 10_000_000, charge: Charge::Package { size: 1_000_000, price_minor: 900 } },
        ],
    }
}

/// splitmix64: a fixed, dependency-free stream of pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[low, high]`.
    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

/// Busier in the working hours: a percentage applied to each hour's log and event volume.
fn diurnal_percent(hour: i64) -> u64 {
    match hour % 24 {
        0..=5 => 60,
        6..=8 | 18..=21 => 100,
        9..=17 => 140,
        _ => 80,
    }
}

/// A plan version: id, version, prices.
type PlanRef<'a> = (&'a str, u32, &'a Prices);

/// One org's month: its segments with usage summed (counters) or maxed (peak agents) from
/// 720 hourly figures.
fn org_segments(org: u64, starter: &Prices, pro: &Prices) -> Vec<Segment> {
    let mut rng = Rng(org.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5EED);
    // Most orgs are small; a few run dozens of agents.
    let agents = if rng.range(0, 9) < 7 { rng.range(1, 8) } else { rng.range(8, 60) };
    let log_bytes_per_agent_hour = rng.range(1_000_000, 20_000_000);
    let events_per_agent_hour = rng.range(10, 500);
    let at = |hour: i64| MONTH_START_MS + hour * HOUR_MS;
    let end = at(HOURS);
    // Each segment's first hour and plan, and whether the first segment is a trial.
    let (cuts, plans, trial): (Vec<i64>, Vec<PlanRef>, bool) = match org % 20 {
        0 | 10 => (vec![0, CHANGE_HOUR], vec![("starter", 1, starter), ("pro", 2, pro)], false),
        1 => (vec![0, TRIAL_END_HOUR], vec![("pro", 2, pro), ("pro", 2, pro)], true),
        n if n % 3 == 0 => (vec![0], vec![("pro", 2, pro)], false),
        _ => (vec![0], vec![("starter", 1, starter)], false),
    };
    let mut usage = vec![BTreeMap::<Meter, u64>::new(); cuts.len()];
    for hour in 0..HOURS {
        let index = cuts.iter().rposition(|c| *c <= hour).unwrap_or(0);
        let connected = agents - rng.range(0, agents / 5);
        let percent = diurnal_percent(hour);
        let u = &mut usage[index];
        *u.entry(Meter::AgentHours).or_default() += connected;
        *u.entry(Meter::LogBytes).or_default() += connected * log_bytes_per_agent_hour * percent / 100;
        *u.entry(Meter::Events).or_default() += connected * events_per_agent_hour * percent / 100;
        let peak = u.entry(Meter::PeakAgents).or_default();
        *peak = (*peak).max(connected);
    }
    cuts.iter()
        .enumerate()
        .zip(usage)
        .map(|((i, from), usage)| {
            let (plan_id, plan_version, prices) = plans[i];
            Segment {
                from_ms: at(*from),
                to_ms: cuts.get(i + 1).map_or(end, |to| at(*to)),
                plan_id: plan_id.to_string(),
                plan_version,
                prices: prices.clone(),
                trial: trial && i == 0,
                usage,
            }
        })
        .collect()
}

fn invoices(orgs: u64, runs: u64) -> Result<()> {
    let (starter, pro) = (starter(), pro());
    starter.validate().map_err(anyhow::Error::msg).context("starter plan")?;
    pro.validate().map_err(anyhow::Error::msg).context("pro plan")?;
    let (from, to) = (MONTH_START_MS, MONTH_START_MS + HOURS * HOUR_MS);

    let setup = Instant::now();
    let months: Vec<Vec<Segment>> = (0..orgs).map(|org| org_segments(org, &starter, &pro)).collect();
    let setup_ms = setup.elapsed().as_secs_f64() * 1e3;
    let segments: usize = months.iter().map(Vec::len).sum();

    let mut batch_ms = Vec::new();
    let mut checksum: Option<(i128, usize)> = None;
    for run in 1..=runs {
        let started = Instant::now();
        let mut total: i128 = 0;
        let mut lines = 0;
        for segments in &months {
            let invoice = compute_invoice(from, to, black_box(segments), &[]).map_err(anyhow::Error::msg).context("computing an invoice")?;
            total += i128::from(invoice.total_minor);
            lines += invoice.lines.len();
            black_box(&invoice);
        }
        let ms = started.elapsed().as_secs_f64() * 1e3;
        println!("run {run}: {orgs} invoices in {:.1} ms ({lines} lines, totals sum {total} minor)", ms);
        match checksum {
            None => checksum = Some((total, lines)),
            Some(first) => ensure!(first == (total, lines), "run {run} computed {total} in {lines} lines, run 1 {} in {}", first.0, first.1),
        }
        batch_ms.push(ms);
    }
    let (total, lines) = checksum.unwrap_or_default();
    let median_ms = median(&batch_ms);
    let per_invoice_us = median_ms * 1e3 / orgs as f64;
    println!(
        "invoices: {orgs} orgs ({segments} segments, {lines} lines), 720 hourly figures each; usage setup {:.0} ms; \
         median of {runs} batches {:.1} ms = {:.2} µs per invoice on {} cores",
        setup_ms,
        median_ms,
        per_invoice_us,
        cores()
    );
    println!(
        "{}",
        json!({
            "bench": "invoices",
            "date": today(),
            "orgs": orgs,
            "segments": segments,
            "lines": lines,
            "runs": runs,
            "batch_ms": batch_ms.iter().map(|m| r2(*m)).collect::<Vec<_>>(),
            "median_batch_ms": r2(median_ms),
            "per_invoice_us": r3(per_invoice_us),
            "setup_ms": r2(setup_ms),
            "totals_sum_minor": total.to_string(),
            "cores": cores(),
        })
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// ledger

/// What one ledger run measured.
struct LedgerRun {
    secs: f64,
    /// Sampled usage sum, the same in every run.
    sum: i64,
    /// Entries per second of each day's 24 hours, in order: shows whether appends slow down
    /// as the ledger grows.
    day_rates: Vec<f64>,
    /// The store's size on disk at the end.
    disk_bytes: u64,
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// One run: append `orgs` × `hours` entries to a fresh store in batches.
fn ledger_run(orgs: u64, hours: u64, batch: u64) -> Result<LedgerRun> {
    use gantry_hub::store::Store;
    let dir = std::env::temp_dir().join(format!("gantry-bench-ledger-{}-{}", std::process::id(), rand::random::<u64>()));
    std::fs::create_dir_all(&dir)?;
    let store = Store::create(&dir).context("creating the store")?;
    let mut rng = Rng(0x1ED6E5);
    let mut pending = Vec::with_capacity(batch as usize);
    let started = Instant::now();
    let mut day_started = started;
    let mut day_rates = Vec::new();
    // Hour by hour, every org, as hour closes write them.
    for hour in 0..hours as i64 {
        if hour > 0 && hour % 24 == 0 {
            day_rates.push((orgs * 24) as f64 / day_started.elapsed().as_secs_f64());
            day_started = Instant::now();
        }
        for org in 0..orgs {
            pending.push(log_bytes_usage(org, hour, rng.range(1_000, 20_000_000) as i64));
            if pending.len() as u64 >= batch {
                for outcome in store.record_many(&pending) {
                    outcome.context("appending")?;
                }
                pending.clear();
            }
        }
    }
    for outcome in store.record_many(&pending) {
        outcome.context("appending")?;
    }
    let secs = started.elapsed().as_secs_f64();
    if hours.is_multiple_of(24) {
        day_rates.push((orgs * 24) as f64 / day_started.elapsed().as_secs_f64());
    }
    ensure!(store.ledger_head()? == orgs * hours, "ledger holds {} entries, expected {}", store.ledger_head()?, orgs * hours);
    let mut sum = 0i64;
    for org in (0..orgs).step_by((orgs as usize / 10).max(1)) {
        sum += store.ledger_usage(&format!("org-{org:05}"), i64::MIN, i64::MAX)?.values().sum::<i64>();
    }
    drop(store);
    let disk_bytes = dir_bytes(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(LedgerRun { secs, sum, day_rates, disk_bytes })
}

fn ledger(orgs: u64, hours: u64, batch: u64, runs: u64) -> Result<()> {
    let entries = orgs * hours;
    let mut rates = Vec::new();
    let mut checksum = None;
    for run in 1..=runs {
        let LedgerRun { secs, sum, day_rates, disk_bytes } = ledger_run(orgs, hours, batch)?;
        let rate = entries as f64 / secs;
        println!(
            "run {run}: {entries} entries in {secs:.1} s = {rate:.0} entries/s (sampled usage sum {sum}); store {:.2} GiB on disk, {:.0} bytes per entry",
            disk_bytes as f64 / (1u64 << 30) as f64,
            disk_bytes as f64 / entries as f64
        );
        if !day_rates.is_empty() {
            let days: Vec<String> = day_rates.iter().map(|r| format!("{r:.0}")).collect();
            println!("run {run}: entries/s per day of hours: {}", days.join(", "));
        }
        match checksum {
            None => checksum = Some(sum),
            Some(first) => ensure!(first == sum, "run {run} sums to {sum}, run 1 to {first}"),
        }
        rates.push(rate);
    }
    let median_rate = median(&rates);
    println!(
        "ledger: {orgs} orgs x {hours} hours = {entries} entries in transactions of {batch}; median of {runs} runs {median_rate:.0} entries/s on {} cores",
        cores()
    );
    println!(
        "{}",
        json!({
            "bench": "ledger",
            "date": today(),
            "orgs": orgs,
            "hours": hours,
            "entries": entries,
            "batch": batch,
            "runs": runs,
            "entries_per_sec": rates.iter().map(|r| r.round()).collect::<Vec<_>>(),
            "median_entries_per_sec": median_rate.round(),
            "cores": cores(),
        })
    );
    Ok(())
}
