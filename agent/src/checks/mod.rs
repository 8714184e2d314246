//! Local health checks: the agent runs the [`CheckSet`] the hub sent, judges each check
//! with a state machine, fixes what it can by itself and reports on the health stream.
//!
//! - Persistence: the set is kept in the state directory as [`FILE`] (atomic, mode 0600).
//!   A set with a lower revision than the one kept is ignored. At start the kept set runs
//!   at once, so checks go on while the hub is unreachable and across restarts.
//! - [`Tracker`]: the pure, clock-injected state machine of one check (thresholds, the
//!   remediation ladder, the crash-loop budget, summaries). Time is an argument.
//! - Runner: one supervisor task applies new sets (a check whose spec did not change keeps
//!   its state), and one task per check runs its probe every `interval_secs` on a fixed
//!   schedule. Each state change is reported at once, each remediation after it was
//!   taken, and a summary of each check every [`SUMMARY_EVERY_SECS`], all as
//!   [`RecordBody::Check`] records through the [`Outbox`]. Remediations and crash loops
//!   also raise the agent events `check.remediated` and `check.crash_loop`.
//!
//! Layout: `probes.rs` (running a probe), `remediate.rs` (carrying out a step). One check
//! failing, hanging or panicking never stops the others; spool errors are logged at a
//! bounded rate. What a check's state was is not persisted: after a restart every check
//! starts `pending` again (and with a fresh remediation budget).

pub mod probes;
pub mod remediate;

#[cfg(test)]
mod tests;

pub use probes::{ProbeResult, Prober};

use crate::collector::docker::DockerConfig;
use crate::deployer::Deployer;
use crate::telemetry::{agent_event, Outbox};
use gantry_shared::checks::{CheckReport, CheckSet, CheckSpec, CheckState, Remediation, RemediationStep, MAX_OUTPUT_BYTES, SUMMARY_EVERY_SECS};
use gantry_shared::message::StreamClass;
use gantry_shared::telemetry::{RecordBody, Severity};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// Name of the file in the state directory that keeps the check set.
pub const FILE: &str = "checks.json";

/// Why the check set could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file exists but could not be read (or, when corrupt, set aside).
    #[error("reading {path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The file could not be written.
    #[error("writing {path}: {message}")]
    Write {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// The set kept in `state_dir`, if any. A file that cannot be parsed is renamed to
/// `checks.json.corrupt` and treated as absent (the hub sends the set again).
pub fn load(state_dir: &Path) -> Result<Option<CheckSet>, Error> {
    let path = state_dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(Error::Read { path: path.display().to_string(), message: error.to_string() }),
    };
    match serde_json::from_slice(&bytes) {
        Ok(set) => Ok(Some(set)),
        Err(error) => {
            let aside = state_dir.join(format!("{FILE}.corrupt"));
            warn!(path = %path.display(), %error, "unreadable check set set aside");
            std::fs::rename(&path, &aside).map_err(|e| Error::Read { path: path.display().to_string(), message: format!("setting it aside: {e}") })?;
            Ok(None)
        }
    }
}

/// Keep `set` in `state_dir` (atomically, mode 0600).
pub fn save(state_dir: &Path, set: &CheckSet) -> Result<(), Error> {
    let path = state_dir.join(FILE);
    let write = |message: String| Error::Write { path: path.display().to_string(), message };
    let bytes = serde_json::to_vec_pretty(set).map_err(|e| write(e.to_string()))?;
    crate::state::write_atomic(&path, &bytes).map_err(|e| write(format!("{e:#}")))
}

/// `text` cut to at most [`MAX_OUTPUT_BYTES`], keeping its end (where errors usually are).
pub(crate) fn cap_output(text: &str) -> String {
    if text.len() <= MAX_OUTPUT_BYTES {
        return text.to_string();
    }
    let mut start = text.len() - (MAX_OUTPUT_BYTES - 3);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

/// What the runner has to do after a run, as [`Tracker::record`] decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdict {
    /// Reports to send now: a change of state, a refused remediation (crash loop), or one
    /// report saying both.
    pub reports: Vec<CheckReport>,
    /// A remediation to take now; its result goes back through [`Tracker::remediated`].
    pub remediate: Option<RemediationStep>,
    /// The remediation budget just ran out: the message of the `check.crash_loop` event.
    pub crash_loop: Option<String>,
}

/// The state machine of one check: pure, driven by run results and an injected clock
/// (`now_ms`: monotonic milliseconds; `wall_ms`: Unix milliseconds for reports).
///
/// - `pending` until a threshold is reached; `failure_threshold` consecutive failed runs
///   make it `failing`, `success_threshold` consecutive passed runs `passing`.
/// - Turning `failing` takes the first step of the remediation ladder; every further
///   `failure_threshold` failed runs while it stays failing take the next (staying on the
///   last).
/// - More than `max_attempts` remediations within `window_secs` is a crash loop: the step
///   is refused (reported, with [`Verdict::crash_loop`] set once), and every later step is
///   refused and reported too until the check turns `passing` again. The attempts are
///   remembered across failure episodes (a container that passes briefly after each
///   restart is still crash-looping).
/// - Every report carries the runs and failed runs since the previous one; a summary is
///   due [`SUMMARY_EVERY_SECS`] after the previous report.
#[derive(Debug, Clone)]
pub struct Tracker {
    name: String,
    kind: &'static str,
    failure_threshold: u32,
    success_threshold: u32,
    remediation: Remediation,
    state: CheckState,
    since_unix_ms: i64,
    passes_in_row: u32,
    failures_in_row: u32,
    runs: u32,
    failures: u32,
    output: String,
    latency_ms: u64,
    last_report_ms: u64,
    /// Index of the next ladder step in this failure episode.
    rung: usize,
    /// Failed runs since the check turned failing or was last remediated.
    failed_since_remediation: u32,
    /// When the remediations within the window were taken (`now_ms`).
    attempts: VecDeque<u64>,
    crash_loop: bool,
}

impl Tracker {
    /// A `pending` check that has not run yet.
    pub fn new(spec: &CheckSpec, now_ms: u64, wall_ms: i64) -> Tracker {
        Tracker {
            name: spec.name.clone(),
            kind: spec.probe.kind(),
            failure_threshold: spec.failure_threshold.max(1),
            success_threshold: spec.success_threshold.max(1),
            remediation: spec.remediation.clone(),
            state: CheckState::Pending,
            since_unix_ms: wall_ms,
            passes_in_row: 0,
            failures_in_row: 0,
            runs: 0,
            failures: 0,
            output: String::new(),
            latency_ms: 0,
            last_report_ms: now_ms,
            rung: 0,
            failed_since_remediation: 0,
            attempts: VecDeque::new(),
            crash_loop: false,
        }
    }

    /// Where the check stands.
    pub fn state(&self) -> CheckState {
        self.state
    }

    /// Whether remediation stopped because the budget ran out.
    pub fn crash_loop(&self) -> bool {
        self.crash_loop
    }

    /// Take one run's result.
    pub fn record(&mut self, now_ms: u64, wall_ms: i64, result: &ProbeResult) -> Verdict {
        self.runs = self.runs.saturating_add(1);
        self.output = cap_output(&result.output);
        self.latency_ms = result.latency_ms;
        if result.passed {
            self.passes_in_row = self.passes_in_row.saturating_add(1);
            self.failures_in_row = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.failures_in_row = self.failures_in_row.saturating_add(1);
            self.passes_in_row = 0;
        }
        let mut transition = false;
        let mut due = false;
        if result.passed && self.state != CheckState::Passing && self.passes_in_row >= self.success_threshold {
            self.enter(CheckState::Passing, wall_ms);
            self.crash_loop = false;
            transition = true;
        } else if !result.passed && self.state != CheckState::Failing && self.failures_in_row >= self.failure_threshold {
            self.enter(CheckState::Failing, wall_ms);
            self.rung = 0;
            self.failed_since_remediation = 0;
            transition = true;
            due = true;
        } else if !result.passed && self.state == CheckState::Failing {
            self.failed_since_remediation = self.failed_since_remediation.saturating_add(1);
            due = self.failed_since_remediation >= self.failure_threshold;
        }

        let mut verdict = Verdict::default();
        let mut refused = None;
        if due && !self.remediation.steps.is_empty() {
            self.failed_since_remediation = 0;
            let window_ms = self.remediation.window_secs.saturating_mul(1000);
            while self.attempts.front().is_some_and(|at| now_ms.saturating_sub(*at) >= window_ms) {
                self.attempts.pop_front();
            }
            let step = &self.remediation.steps[self.rung.min(self.remediation.steps.len() - 1)];
            if self.crash_loop {
                // Each remediation the check would have had is reported as refused.
                refused = Some(format!("crash loop: not taking \"{}\" until the check passes again", step.describe()));
            } else if self.attempts.len() >= self.remediation.max_attempts as usize {
                self.crash_loop = true;
                let (attempts, window) = (self.attempts.len(), self.remediation.window_secs);
                refused =
                    Some(format!("crash loop: {attempts} remediations within {window}s; not taking \"{}\" until the check passes again", step.describe()));
                verdict.crash_loop =
                    Some(format!("check {}: {attempts} remediations within {window}s; stopped remediating until the check passes again", self.name));
            } else {
                self.attempts.push_back(now_ms);
                verdict.remediate = Some(step.clone());
                self.rung = self.rung.saturating_add(1);
            }
        }
        if transition || refused.is_some() {
            let report = self.report(now_ms, transition, refused);
            verdict.reports.push(report);
        }
        verdict
    }

    /// The report after the runner took `step` with `result` (what was done, or why it
    /// failed).
    pub fn remediated(&mut self, now_ms: u64, step: &RemediationStep, result: &Result<String, String>) -> CheckReport {
        let text = match result {
            Ok(done) => format!("{}: {done}", step.describe()),
            Err(error) => format!("{}: failed: {error}", step.describe()),
        };
        self.report(now_ms, false, Some(cap_output(&text)))
    }

    /// When the next summary is due (`now_ms` clock).
    pub fn summary_due_ms(&self) -> u64 {
        self.last_report_ms.saturating_add(SUMMARY_EVERY_SECS * 1000)
    }

    /// A summary: where the check stands and its runs since the previous report.
    pub fn summary(&mut self, now_ms: u64) -> CheckReport {
        self.report(now_ms, false, None)
    }

    fn enter(&mut self, state: CheckState, wall_ms: i64) {
        self.state = state;
        self.since_unix_ms = wall_ms;
    }

    fn report(&mut self, now_ms: u64, transition: bool, remediation: Option<String>) -> CheckReport {
        let report = CheckReport {
            name: self.name.clone(),
            kind: self.kind.to_string(),
            state: self.state,
            since_unix_ms: self.since_unix_ms,
            transition,
            output: self.output.clone(),
            latency_ms: self.latency_ms,
            runs: self.runs,
            failures: self.failures,
            remediation,
            crash_loop: self.crash_loop,
        };
        self.runs = 0;
        self.failures = 0;
        self.last_report_ms = now_ms;
        report
    }
}

/// Handle the connection uses to hand over sets from the hub. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Checks {
    sets: Arc<watch::Sender<Option<CheckSet>>>,
}

impl Checks {
    /// Hand a set from the hub to the runner; never blocks. Of sets arriving faster than
    /// the runner takes them, the newest revision wins; the runner ignores a set older
    /// than the one it keeps.
    pub fn submit(&self, set: CheckSet) {
        self.sets.send_if_modified(|slot| {
            if slot.as_ref().is_some_and(|held| held.revision > set.revision) {
                return false;
            }
            *slot = Some(set);
            true
        });
    }
}

/// Start the check runner: it loads the set kept in `state_dir` and runs it until `stop`
/// turns true (or the task is aborted). Probes reach Docker as `docker` says; redeploys
/// go to `deployer`. Call once per process: checks run whether or not the hub is
/// connected.
pub fn start(
    state_dir: PathBuf,
    docker: DockerConfig,
    outbox: Outbox,
    deployer: Option<Deployer>,
    stop: watch::Receiver<bool>,
) -> (Checks, tokio::task::JoinHandle<()>) {
    let (sets, receiver) = watch::channel(None);
    let runner = Arc::new(Runner { outbox, prober: Prober::new(docker), deployer });
    let task = tokio::spawn(supervise(runner, state_dir, receiver, stop));
    (Checks { sets: Arc::new(sets) }, task)
}

/// What every check task shares.
#[derive(Debug)]
struct Runner {
    outbox: Outbox,
    prober: Prober,
    deployer: Option<Deployer>,
}

/// Counts errors and says when to log one: the first, then every power of two.
#[derive(Debug, Default)]
struct ErrorBudget {
    count: u64,
}

impl ErrorBudget {
    fn should_log(&mut self) -> bool {
        self.count += 1;
        self.count.is_power_of_two()
    }
}

impl Runner {
    /// Send the report of a remediation and raise its `check.remediated` event.
    fn remediated(&self, check: &str, action: &str, report: CheckReport, result: &Result<String, String>, errors: &mut ErrorBudget) {
        let (severity, outcome) = match result {
            Ok(_) => (Severity::Warning, "ok"),
            Err(error) => {
                warn!(check, action, %error, "remediation failed");
                (Severity::Error, "failed")
            }
        };
        let message = format!("check {check}: {}", report.remediation.as_deref().unwrap_or(action));
        let attributes =
            vec![("check".to_string(), check.to_string()), ("action".to_string(), action.to_string()), ("result".to_string(), outcome.to_string())];
        self.send(vec![report], errors);
        self.outbox.event(agent_event("check.remediated", severity, message, attributes));
    }

    fn send(&self, reports: Vec<CheckReport>, errors: &mut ErrorBudget) {
        if reports.is_empty() {
            return;
        }
        let now = crate::wall_ms();
        let items = reports.into_iter().map(|report| (now, RecordBody::Check(report))).collect();
        if let Err(error) = self.outbox.push(StreamClass::Health, items, None) {
            if errors.should_log() {
                warn!(%error, failures = errors.count, "could not spool a check report");
            }
        }
    }
}

/// The running check tasks, by check name.
#[derive(Debug, Default)]
struct Running {
    tasks: JoinSet<()>,
    checks: BTreeMap<String, (CheckSpec, AbortHandle)>,
    names: HashMap<tokio::task::Id, String>,
}

impl Running {
    /// Run exactly the valid checks of `specs`: stop removed and changed ones, start new
    /// and changed ones; unchanged ones keep running with their state.
    fn apply(&mut self, runner: &Arc<Runner>, specs: &[CheckSpec]) {
        let mut wanted: BTreeMap<String, CheckSpec> = BTreeMap::new();
        for spec in specs {
            if let Err(problems) = spec.validate() {
                let message = format!("check {:?} skipped: {}", spec.name, problems.join("; "));
                warn!("{message}");
                runner.outbox.event(agent_event("check.invalid", Severity::Warning, message, vec![("check".into(), spec.name.clone())]));
                continue;
            }
            if wanted.contains_key(&spec.name) {
                warn!(check = %spec.name, "check name used twice; the first one runs");
                continue;
            }
            wanted.insert(spec.name.clone(), spec.clone());
        }
        self.checks.retain(|name, (spec, handle)| {
            let keep = wanted.get(name) == Some(spec);
            if !keep {
                handle.abort();
            }
            keep
        });
        for (name, spec) in wanted {
            if !self.checks.contains_key(&name) {
                self.spawn(runner, spec, Duration::ZERO);
            }
        }
    }

    fn spawn(&mut self, runner: &Arc<Runner>, spec: CheckSpec, delay: Duration) {
        let handle = self.tasks.spawn(run_check(runner.clone(), spec.clone(), delay));
        self.names.insert(handle.id(), spec.name.clone());
        self.checks.insert(spec.name.clone(), (spec, handle));
    }

    /// A task ended: only a panic ends one by itself; the check starts again after its
    /// interval.
    fn ended(&mut self, runner: &Arc<Runner>, id: tokio::task::Id, panicked: bool) {
        let Some(name) = self.names.remove(&id) else { return };
        if !panicked {
            return;
        }
        let Some((spec, handle)) = self.checks.remove(&name) else { return };
        if handle.id() != id {
            // A newer task of the same name runs already.
            self.checks.insert(name, (spec, handle));
            return;
        }
        error!(check = %name, "check task panicked; restarting it after its interval");
        let delay = Duration::from_secs(spec.interval_secs);
        self.spawn(runner, spec, delay);
    }
}

async fn supervise(runner: Arc<Runner>, state_dir: PathBuf, mut sets: watch::Receiver<Option<CheckSet>>, mut stop: watch::Receiver<bool>) {
    let mut current = match load(&state_dir) {
        Ok(Some(set)) => {
            info!(revision = set.revision, checks = set.checks.len(), "running the kept check set");
            set
        }
        Ok(None) => CheckSet::default(),
        Err(error) => {
            warn!(%error, "cannot read the kept check set; waiting for the hub's");
            CheckSet::default()
        }
    };
    let mut running = Running::default();
    running.apply(&runner, &current.checks);
    let mut open = true;
    loop {
        tokio::select! {
            // A set that arrived is applied (and kept) before stopping.
            biased;
            changed = sets.changed(), if open => {
                if changed.is_err() {
                    open = false;
                    continue;
                }
                let Some(set) = sets.borrow_and_update().clone() else { continue };
                if set.revision < current.revision {
                    info!(revision = set.revision, kept = current.revision, "ignoring a check set older than the kept one");
                    continue;
                }
                if set == current {
                    debug!(revision = set.revision, "check set unchanged");
                    continue;
                }
                if let Err(error) = save(&state_dir, &set) {
                    warn!(%error, "cannot keep the check set; it runs until the agent stops");
                }
                info!(revision = set.revision, checks = set.checks.len(), "check set updated");
                running.apply(&runner, &set.checks);
                current = set;
            }
            Some(joined) = running.tasks.join_next_with_id() => match joined {
                Ok((id, ())) => running.ended(&runner, id, false),
                Err(error) => {
                    let panicked = error.is_panic();
                    running.ended(&runner, error.id(), panicked);
                }
            },
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    running.tasks.abort_all();
}

/// Run one check until aborted: its probe every `interval_secs` on a fixed schedule (a
/// run that overran starts the next at once), a summary whenever one is due.
async fn run_check(runner: Arc<Runner>, spec: CheckSpec, delay: Duration) {
    let origin = Instant::now();
    let mono = move || origin.elapsed().as_millis() as u64;
    let mut tracker = Tracker::new(&spec, mono(), crate::wall_ms());
    let interval = Duration::from_secs(spec.interval_secs);
    let limit = Duration::from_secs(spec.timeout_secs);
    let mut errors = ErrorBudget::default();
    let mut next_run = origin + delay;
    loop {
        let summary_at = origin + Duration::from_millis(tracker.summary_due_ms());
        tokio::select! {
            _ = tokio::time::sleep_until(next_run) => {
                let result = runner.prober.run(&spec.probe, limit).await;
                let before = tracker.state();
                let verdict = tracker.record(mono(), crate::wall_ms(), &result);
                if tracker.state() != before {
                    match tracker.state() {
                        CheckState::Failing => warn!(check = %spec.name, output = %result.output, "check failing"),
                        state => info!(check = %spec.name, state = state.name(), output = %result.output, "check state changed"),
                    }
                }
                runner.send(verdict.reports, &mut errors);
                if let Some(message) = verdict.crash_loop {
                    error!(check = %spec.name, "{message}");
                    let attributes = vec![
                        ("check".to_string(), spec.name.clone()),
                        ("max_attempts".to_string(), spec.remediation.max_attempts.to_string()),
                        ("window_secs".to_string(), spec.remediation.window_secs.to_string()),
                    ];
                    runner.outbox.event(agent_event("check.crash_loop", Severity::Error, message, attributes));
                }
                if let Some(step) = verdict.remediate {
                    let action = remediate::action(&step);
                    warn!(check = %spec.name, action, step = %step.describe(), "remediating a failing check");
                    let work = remediate::run(&step, &runner.prober, runner.deployer.as_ref(), limit);
                    tokio::pin!(work);
                    // A redeploy can take minutes: summaries go on meanwhile.
                    let result = loop {
                        let summary_at = origin + Duration::from_millis(tracker.summary_due_ms());
                        tokio::select! {
                            result = &mut work => break result,
                            _ = tokio::time::sleep_until(summary_at) => runner.send(vec![tracker.summary(mono())], &mut errors),
                        }
                    };
                    let report = tracker.remediated(mono(), &step, &result);
                    runner.remediated(&spec.name, action, report, &result, &mut errors);
                }
                next_run += interval;
                let now = Instant::now();
                if next_run < now {
                    next_run = now;
                }
            }
            _ = tokio::time::sleep_until(summary_at) => {
                let report = tracker.summary(mono());
                runner.send(vec![report], &mut errors);
            }
        }
    }
}

#[cfg(test)]
mod tracker_tests {
    use super::*;
    use gantry_shared::checks::Probe;

    const WALL: i64 = 1_700_000_000_000;

    fn spec(failure_threshold: u32, success_threshold: u32, steps: Vec<RemediationStep>, max_attempts: u32, window_secs: u64) -> CheckSpec {
        CheckSpec {
            name: "web".into(),
            probe: Probe::Container { name: "web".into() },
            interval_secs: 5,
            timeout_secs: 5,
            failure_threshold,
            success_threshold,
            remediation: Remediation { steps, max_attempts, window_secs },
        }
    }

    fn restart() -> RemediationStep {
        RemediationStep::RestartContainer { container: "web".into() }
    }

    fn redeploy() -> RemediationStep {
        RemediationStep::Redeploy { deployment_id: "shop".into() }
    }

    fn run(passed: bool) -> ProbeResult {
        ProbeResult { passed, output: if passed { "ok".into() } else { "down".into() }, latency_ms: 7 }
    }

    /// Feed one run at `secs` on the virtual clock.
    fn at(tracker: &mut Tracker, secs: u64, passed: bool) -> Verdict {
        tracker.record(secs * 1000, WALL + secs as i64 * 1000, &run(passed))
    }

    #[test]
    fn pending_until_a_threshold_then_each_change_is_reported_once() {
        let mut t = Tracker::new(&spec(3, 2, vec![], 3, 600), 0, WALL);
        assert_eq!(t.state(), CheckState::Pending);
        assert_eq!(at(&mut t, 0, false), Verdict::default());
        assert_eq!(at(&mut t, 5, false), Verdict::default());
        let failing = at(&mut t, 10, false);
        assert_eq!(t.state(), CheckState::Failing);
        assert_eq!(failing.reports.len(), 1);
        let report = &failing.reports[0];
        assert!(report.transition && !report.crash_loop && report.remediation.is_none());
        assert_eq!((report.state, report.since_unix_ms, report.runs, report.failures), (CheckState::Failing, WALL + 10_000, 3, 3));
        assert_eq!((report.name.as_str(), report.kind.as_str(), report.output.as_str(), report.latency_ms), ("web", "container", "down", 7));
        // No steps: nothing to remediate, and staying failing says nothing new.
        assert_eq!(failing.remediate, None);
        assert_eq!(at(&mut t, 15, false), Verdict::default());
        // One pass is not enough with a success threshold of 2, and a failure resets it.
        assert_eq!(at(&mut t, 20, true), Verdict::default());
        assert_eq!(at(&mut t, 25, false), Verdict::default());
        assert_eq!(at(&mut t, 30, true), Verdict::default());
        let passing = at(&mut t, 35, true);
        assert_eq!(t.state(), CheckState::Passing);
        let report = &passing.reports[0];
        assert!(report.transition);
        assert_eq!((report.state, report.since_unix_ms, report.runs, report.failures), (CheckState::Passing, WALL + 35_000, 5, 2));

        // From pending, passing needs the success threshold too.
        let mut fresh = Tracker::new(&spec(3, 2, vec![], 3, 600), 0, WALL);
        assert!(at(&mut fresh, 0, true).reports.is_empty());
        assert_eq!(at(&mut fresh, 5, true).reports[0].state, CheckState::Passing);
    }

    #[test]
    fn summaries_are_due_a_minute_after_the_previous_report_and_count_the_runs_between() {
        let mut t = Tracker::new(&spec(1, 1, vec![], 3, 600), 0, WALL);
        assert_eq!(t.summary_due_ms(), SUMMARY_EVERY_SECS * 1000);
        for secs in [0, 10, 20] {
            at(&mut t, secs, true);
        }
        // The transition at 0 s was a report: the summary is due a minute after it.
        assert_eq!(t.summary_due_ms(), 60_000);
        at(&mut t, 30, false);
        assert_eq!(t.summary_due_ms(), 90_000);
        for secs in [40, 50, 60] {
            at(&mut t, secs, false);
        }
        let summary = t.summary(90_000);
        assert!(!summary.transition && summary.remediation.is_none());
        assert_eq!((summary.state, summary.runs, summary.failures, summary.since_unix_ms), (CheckState::Failing, 3, 3, WALL + 30_000));
        assert_eq!(t.summary_due_ms(), 150_000);
        let quiet = t.summary(150_000);
        assert_eq!((quiet.runs, quiet.failures), (0, 0));
    }

    #[test]
    fn the_ladder_climbs_every_failure_threshold_runs_and_stays_on_its_last_step() {
        let mut t = Tracker::new(&spec(2, 1, vec![restart(), redeploy()], 100, 600), 0, WALL);
        assert_eq!(at(&mut t, 0, false).remediate, None);
        let failing = at(&mut t, 5, false);
        assert_eq!(failing.remediate, Some(restart()));
        assert!(failing.reports[0].transition);
        assert_eq!(at(&mut t, 10, false).remediate, None);
        assert_eq!(at(&mut t, 15, false), Verdict { remediate: Some(redeploy()), ..Verdict::default() });
        assert_eq!(at(&mut t, 20, false).remediate, None);
        assert_eq!(at(&mut t, 25, false).remediate, Some(redeploy()));
        assert_eq!(at(&mut t, 30, false).remediate, None);
        assert_eq!(at(&mut t, 35, false).remediate, Some(redeploy()));

        let report = t.remediated(36_000, &redeploy(), &Ok("revision 3 of shop runs again and is healthy".into()));
        assert!(!report.transition && !report.crash_loop);
        assert_eq!(report.remediation.as_deref(), Some("redeploy last good revision of shop: revision 3 of shop runs again and is healthy"));
        assert_eq!((report.runs, report.failures), (6, 6));
        let failed = t.remediated(37_000, &restart(), &Err("container web does not exist".into()));
        assert_eq!(failed.remediation.as_deref(), Some("restart container web: failed: container web does not exist"));
        assert_eq!((failed.runs, failed.failures), (0, 0));

        // Passing ends the episode: the next one starts at the bottom of the ladder.
        assert_eq!(at(&mut t, 40, true).reports[0].state, CheckState::Passing);
        at(&mut t, 45, false);
        assert_eq!(at(&mut t, 50, false).remediate, Some(restart()));
    }

    #[test]
    fn more_than_max_attempts_within_the_window_is_a_crash_loop_until_the_check_passes() {
        let mut t = Tracker::new(&spec(1, 1, vec![restart()], 2, 60), 0, WALL);
        assert_eq!(at(&mut t, 0, false).remediate, Some(restart()));
        assert_eq!(at(&mut t, 5, false).remediate, Some(restart()));
        let refused = at(&mut t, 10, false);
        assert_eq!(refused.remediate, None);
        assert!(t.crash_loop());
        assert!(refused.crash_loop.as_deref().is_some_and(|m| m.contains("2 remediations within 60s")), "{refused:?}");
        let report = &refused.reports[0];
        assert!(report.crash_loop && !report.transition);
        assert_eq!(
            report.remediation.as_deref(),
            Some("crash loop: 2 remediations within 60s; not taking \"restart container web\" until the check passes again")
        );
        // Every later remediation point is refused and reported as such (the event is
        // raised once), and summaries keep saying so.
        for secs in [15, 20] {
            let later = at(&mut t, secs, false);
            assert_eq!((later.remediate, later.crash_loop), (None, None));
            assert_eq!(later.reports.len(), 1);
            assert!(later.reports[0].crash_loop && !later.reports[0].transition);
            assert_eq!(later.reports[0].remediation.as_deref(), Some("crash loop: not taking \"restart container web\" until the check passes again"));
        }
        assert!(t.summary(21_000).crash_loop);

        // Passing again ends the crash loop...
        let passing = at(&mut t, 25, true);
        assert!(!passing.reports[0].crash_loop && !t.crash_loop());
        // ...but the attempts still count within their window: failing again at once is
        // still a crash loop (with a transition in the same report).
        let again = at(&mut t, 30, false);
        assert_eq!(again.remediate, None);
        assert!(again.crash_loop.is_some());
        assert_eq!(again.reports.len(), 1);
        assert!(again.reports[0].transition && again.reports[0].crash_loop);

        // Once the window has passed the attempts, remediation resumes after a pass.
        at(&mut t, 70, true);
        let resumed = at(&mut t, 75, false);
        assert_eq!(resumed.remediate, Some(restart()));
        assert_eq!(resumed.crash_loop, None);
    }

    #[test]
    fn a_failed_container_is_restarted_within_30_seconds_at_interval_5_and_threshold_3() {
        // Worst case: the container dies just after a passing run.
        let mut t = Tracker::new(&spec(3, 1, vec![restart()], 3, 600), 0, WALL);
        at(&mut t, 0, true);
        let died = 1;
        let mut restarted_at = None;
        for secs in (5..60).step_by(5) {
            if at(&mut t, secs, false).remediate.is_some() {
                restarted_at = Some(secs);
                break;
            }
        }
        let restarted_at = restarted_at.expect("no restart");
        assert!(restarted_at - died < 30, "restart {}s after the failure", restarted_at - died);
    }

    #[test]
    fn outputs_are_capped_keeping_their_end() {
        let mut t = Tracker::new(&spec(1, 1, vec![], 3, 600), 0, WALL);
        let long = format!("{}END", "é".repeat(1000));
        let verdict = t.record(0, WALL, &ProbeResult { passed: false, output: long, latency_ms: 1 });
        let output = &verdict.reports[0].output;
        assert!(output.len() <= MAX_OUTPUT_BYTES && output.starts_with("...") && output.ends_with("END"), "{}", output.len());
    }

    #[test]
    fn the_kept_set_round_trips_privately_and_a_corrupt_one_is_set_aside() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("gantry-checks-store-{}-{:08x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(load(&dir).unwrap().is_none());
        let set = CheckSet { revision: 7, checks: vec![spec(3, 1, vec![restart()], 3, 600)] };
        save(&dir, &set).unwrap();
        assert_eq!(load(&dir).unwrap(), Some(set));
        assert_eq!(std::fs::metadata(dir.join(FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(dir.join(FILE), b"{not json").unwrap();
        assert!(load(&dir).unwrap().is_none());
        assert!(dir.join("checks.json.corrupt").exists() && !dir.join(FILE).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
