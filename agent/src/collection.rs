//! Runs the collectors on their schedules and hands what they read to the outbox (the
//! durable spool), together with any checkpoint, in one write.
//!
//! One failing collector never stops the others: each runs in its own task, and its errors
//! are logged at a bounded rate (the first, then every power of two). Collectors stop when
//! the stop signal turns true, after finishing the write in progress.
//!
//! Docker: one supervisor task connects to Docker, reports `docker.unavailable` once per
//! outage and `docker.available` when Docker answers again, and retries with backoff
//! (`docker.retry_min_ms` doubling up to `docker.retry_max_ms`). It hands the client to
//! three workers (inventory and stats, events, container logs), each in its own task; a
//! worker that hits an error asks the supervisor to check Docker, and waits for a client
//! while there is none.

use crate::collector::container_logs::ContainerLogs;
use crate::collector::docker::{self, Availability, DockerConfig, DockerEvents, DockerStats};
use crate::collector::file::FileTailer;
use crate::collector::host::HostCollector;
use crate::config::Config;
use crate::telemetry::{agent_event, Outbox};
use futures_util::StreamExt;
use gantry_shared::message::StreamClass;
use gantry_shared::telemetry::{RecordBody, Severity};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tracing::{info, warn};

/// Spool checkpoint key of the file tailer.
pub const FILES_CHECKPOINT: &str = "files";
/// Spool checkpoint key of the Docker events collector.
pub const DOCKER_EVENTS_CHECKPOINT: &str = "docker.events";
/// Spool checkpoint key of the container log collector.
pub const CONTAINER_LOGS_CHECKPOINT: &str = "docker.logs";
/// Spool checkpoint key of the configuration fingerprint.
pub const CONFIG_CHECKPOINT: &str = "config";
/// Most lines one file poll hands over.
pub const MAX_LINES_PER_POLL: usize = 5_000;

/// Counts errors of one collector and says when to log one.
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

/// Raise `agent.config_changed` when the configuration differs from the last run's.
pub fn note_config(outbox: &Outbox, config: &Config) {
    let text = toml::to_string(config).unwrap_or_default();
    let fingerprint = gantry_shared::token::hex(&Sha256::digest(text.as_bytes()));
    let previous = outbox.spool().checkpoint(CONFIG_CHECKPOINT).ok().flatten();
    if previous.as_deref() == Some(fingerprint.as_bytes()) {
        return;
    }
    let event = agent_event(
        "agent.config_changed",
        Severity::Info,
        if previous.is_some() { "agent configuration changed" } else { "agent configuration recorded" },
        vec![("fingerprint".into(), fingerprint.clone())],
    );
    let item = vec![(crate::wall_ms(), RecordBody::Event(event))];
    if let Err(error) = outbox.push(StreamClass::Events, item, Some((CONFIG_CHECKPOINT, fingerprint.as_bytes()))) {
        warn!(%error, "could not record the configuration");
    }
}

/// Start every enabled collector.
pub fn spawn_all(config: &Config, outbox: Outbox, stop: watch::Receiver<bool>) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    if config.host.enabled {
        tasks.spawn(host_loop(Duration::from_secs(config.host.interval_secs), outbox.clone(), stop.clone()));
    }
    if !config.files.paths.is_empty() {
        tasks.spawn(files_loop(config.clone(), outbox.clone(), stop.clone()));
    }
    if config.docker.enabled {
        tasks.spawn(docker_loop(config.docker.clone(), outbox, stop));
    }
    tasks
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn host_loop(interval: Duration, outbox: Outbox, mut stop: watch::Receiver<bool>) {
    let mut collector = Some(HostCollector::new());
    let mut errors = ErrorBudget::default();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopped(&mut stop) => return,
        }
        let Some(mut current) = collector.take() else { return };
        // sysinfo reads /proc synchronously; keep it off the async workers.
        let Ok((back, samples)) = tokio::task::spawn_blocking(move || {
            let samples = current.collect();
            (current, samples)
        })
        .await
        else {
            warn!("host collector panicked; restarting it");
            collector = Some(HostCollector::new());
            continue;
        };
        collector = Some(back);
        if let Err(error) = outbox.push(StreamClass::Metrics, vec![(crate::wall_ms(), RecordBody::Metrics(samples))], None) {
            if errors.should_log() {
                warn!(%error, count = errors.count, "host collector could not spool its samples");
            }
        }
    }
}

async fn files_loop(config: Config, outbox: Outbox, mut stop: watch::Receiver<bool>) {
    let checkpoint = outbox.spool().checkpoint(FILES_CHECKPOINT).ok().flatten();
    let mut tailer = match FileTailer::new(config.files.clone(), checkpoint.as_deref()) {
        Ok(tailer) => tailer,
        Err(error) => {
            warn!(%error, "file collector disabled");
            return;
        }
    };
    let mut errors = ErrorBudget::default();
    let mut ticker = tokio::time::interval(Duration::from_millis(config.files_poll_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopped(&mut stop) => return,
        }
        // Drain what is there before waiting for the next tick.
        loop {
            let polled = match tailer.poll(crate::wall_ms(), MAX_LINES_PER_POLL) {
                Ok(polled) => polled,
                Err(error) => {
                    if errors.should_log() {
                        warn!(%error, count = errors.count, "file collector poll failed");
                    }
                    break;
                }
            };
            for error in &polled.errors {
                if errors.should_log() {
                    warn!(%error, count = errors.count, "file collector");
                }
            }
            if polled.lines.is_empty() {
                break;
            }
            let items = polled.lines.into_iter().map(|(ts, line)| (ts, RecordBody::Log(line))).collect();
            // Lines and the tailer's position are written together: after a crash the
            // tailer resumes exactly after the last spooled line.
            if let Err(error) = outbox.push(StreamClass::Logs, items, Some((FILES_CHECKPOINT, &polled.checkpoint))) {
                if errors.should_log() {
                    warn!(%error, count = errors.count, "file collector could not spool lines");
                }
                // The tailer moved past lines that were not kept; start again from the
                // last durable position.
                let checkpoint = outbox.spool().checkpoint(FILES_CHECKPOINT).ok().flatten();
                if let Ok(fresh) = FileTailer::new(config.files.clone(), checkpoint.as_deref()) {
                    tailer = fresh;
                }
                break;
            }
            if *stop.borrow() {
                break;
            }
            // A backlog (a file written faster than one read per tick, or found after a
            // restart) is read on at once, not one chunk per tick; other tasks (the
            // senders) get their turn between reads.
            tokio::task::yield_now().await;
        }
    }
}

/// The Docker client while Docker answers, `None` while it does not.
type DockerClient = watch::Receiver<Option<bollard::Docker>>;

/// The current Docker client, waiting for one while there is none; `None` on stop.
async fn docker_client(client: &mut DockerClient, stop: &mut watch::Receiver<bool>) -> Option<bollard::Docker> {
    tokio::select! {
        current = client.wait_for(Option::is_some) => current.ok().and_then(|c| c.clone()),
        _ = stopped(stop) => None,
    }
}

/// Supervise the Docker connection and run the Docker workers.
async fn docker_loop(config: DockerConfig, outbox: Outbox, mut stop: watch::Receiver<bool>) {
    let (client_tx, client_rx) = watch::channel(None);
    let trouble = Arc::new(Notify::new());
    let mut workers = JoinSet::new();
    workers.spawn(docker_stats_loop(config.clone(), outbox.clone(), client_rx.clone(), trouble.clone(), stop.clone()));
    if config.events {
        workers.spawn(docker_events_loop(config.clone(), outbox.clone(), client_rx.clone(), trouble.clone(), stop.clone()));
    }
    if config.logs.enabled {
        workers.spawn(container_logs_loop(config.clone(), outbox.clone(), client_rx, trouble.clone(), stop.clone()));
    }
    let mut availability = Availability::new(&config);
    'attach: loop {
        let attempt = tokio::select! {
            attempt = docker::connect(&config) => attempt,
            _ = stopped(&mut stop) => break,
        };
        match attempt {
            Ok(attached) => {
                info!(version = %attached.version, api = %attached.api_version, endpoint = %config.endpoint(), "docker attached");
                if let Some(event) = availability.attached(&attached) {
                    outbox.event(event);
                }
                let docker = attached.docker.clone();
                client_tx.send_replace(Some(attached.docker));
                // Check Docker when a worker had trouble, and now and then anyway.
                loop {
                    tokio::select! {
                        _ = trouble.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(config.interval_secs)) => {}
                        _ = stopped(&mut stop) => break 'attach,
                    }
                    let answer = tokio::select! {
                        answer = docker.ping() => answer,
                        _ = stopped(&mut stop) => break 'attach,
                    };
                    if let Err(error) = answer {
                        client_tx.send_replace(None);
                        let error = docker::Error::from(error).to_string();
                        if let Some(event) = availability.failed(&error) {
                            warn!(%error, "docker became unreachable");
                            outbox.event(event);
                        }
                        break;
                    }
                }
            }
            Err(error) => {
                let error = error.to_string();
                if let Some(event) = availability.failed(&error) {
                    warn!(%error, "docker is unreachable; retrying");
                    outbox.event(event);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(availability.retry_delay()) => {}
            _ = stopped(&mut stop) => break,
        }
    }
    client_tx.send_replace(None);
    while workers.join_next().await.is_some() {}
}

/// Inventory and stats every `interval_secs`.
async fn docker_stats_loop(config: DockerConfig, outbox: Outbox, client: DockerClient, trouble: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    let mut stats = DockerStats::new(&config);
    let mut errors = ErrorBudget::default();
    let mut ticker = tokio::time::interval(Duration::from_secs(config.interval_secs));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopped(&mut stop) => return,
        }
        let Some(docker) = client.borrow().clone() else { continue };
        let now = crate::wall_ms();
        let collected = tokio::select! {
            collected = stats.collect(&docker, now) => collected,
            _ = stopped(&mut stop) => return,
        };
        let collected = match collected {
            Ok(collected) => collected,
            Err(error) => {
                if errors.should_log() {
                    warn!(%error, count = errors.count, "docker stats collection failed");
                }
                trouble.notify_one();
                continue;
            }
        };
        for error in &collected.errors {
            if errors.should_log() {
                warn!(%error, count = errors.count, "docker stats collector");
            }
        }
        if let Err(error) = outbox.push(StreamClass::Metrics, vec![(now, RecordBody::Metrics(collected.samples))], None) {
            if errors.should_log() {
                warn!(%error, count = errors.count, "docker stats collector could not spool its samples");
            }
        }
        if let Some(inventory) = collected.inventory {
            if let Err(error) = outbox.push(StreamClass::Events, vec![(now, RecordBody::Event(inventory))], None) {
                if errors.should_log() {
                    warn!(%error, count = errors.count, "docker stats collector could not spool the inventory");
                }
            }
        }
    }
}

/// Docker events, spooled with the events checkpoint.
async fn docker_events_loop(config: DockerConfig, outbox: Outbox, mut client: DockerClient, trouble: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    let durable = || outbox.spool().checkpoint(DOCKER_EVENTS_CHECKPOINT).ok().flatten();
    let mut events = DockerEvents::new(&config, durable().as_deref());
    let mut committed = durable();
    let mut errors = ErrorBudget::default();
    loop {
        let Some(docker) = docker_client(&mut client, &mut stop).await else { return };
        let mut stream = Box::pin(events.subscribe(&docker, crate::wall_ms()).ready_chunks(256));
        // The first subscription fixes where events start; keep that at once, so a restart
        // before the first event still resumes from there.
        if let Ok(checkpoint) = events.checkpoint() {
            if committed.as_ref() != Some(&checkpoint) {
                match outbox.push(StreamClass::Events, Vec::new(), Some((DOCKER_EVENTS_CHECKPOINT, &checkpoint))) {
                    Ok(_) => committed = Some(checkpoint),
                    Err(error) => {
                        if errors.should_log() {
                            warn!(%error, count = errors.count, "docker events collector could not spool its position");
                        }
                    }
                }
            }
        }
        loop {
            let batch = tokio::select! {
                batch = stream.next() => batch,
                _ = client.changed() => break,
                _ = stopped(&mut stop) => return,
            };
            let Some(batch) = batch else {
                // Docker closed the stream: it is probably going away.
                trouble.notify_one();
                break;
            };
            let mut items = Vec::new();
            let mut failure = None;
            for message in batch {
                match message {
                    Ok(message) => items.extend(events.accept(&message).map(|(ts, event)| (ts, RecordBody::Event(event)))),
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                }
            }
            let checkpoint = match events.checkpoint() {
                Ok(checkpoint) => checkpoint,
                Err(error) => {
                    if errors.should_log() {
                        warn!(%error, count = errors.count, "docker events collector");
                    }
                    break;
                }
            };
            if !items.is_empty() || committed.as_ref() != Some(&checkpoint) {
                // Events and the stream position are written together: after a crash the
                // collector resumes right after the last spooled event.
                match outbox.push(StreamClass::Events, items, Some((DOCKER_EVENTS_CHECKPOINT, &checkpoint))) {
                    Ok(_) => committed = Some(checkpoint),
                    Err(error) => {
                        if errors.should_log() {
                            warn!(%error, count = errors.count, "docker events collector could not spool events");
                        }
                        events = DockerEvents::new(&config, durable().as_deref());
                        committed = durable();
                        break;
                    }
                }
            }
            if let Some(error) = failure {
                if errors.should_log() {
                    warn!(%error, count = errors.count, "docker event stream failed");
                }
                trouble.notify_one();
                break;
            }
        }
        // Do not spin if Docker keeps closing the stream.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(config.retry_min_ms)) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Container logs: discover containers every `logs.discover_ms`, spool what was read every
/// `logs.poll_ms` with the log checkpoint.
async fn container_logs_loop(config: DockerConfig, outbox: Outbox, client: DockerClient, trouble: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    let durable = || outbox.spool().checkpoint(CONTAINER_LOGS_CHECKPOINT).ok().flatten();
    let mut logs = match ContainerLogs::new(config.logs.clone(), durable().as_deref(), crate::wall_ms()) {
        Ok(logs) => logs,
        Err(error) => {
            warn!(%error, "container log collector disabled");
            return;
        }
    };
    let mut committed = durable();
    let mut errors = ErrorBudget::default();
    let discover_every = Duration::from_millis(config.logs.discover_ms);
    let mut discovered: Option<Instant> = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(config.logs.poll_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopped(&mut stop) => return,
        }
        let docker = client.borrow().clone();
        if let Some(docker) = docker.filter(|_| discovered.is_none_or(|at| at.elapsed() >= discover_every)) {
            discovered = Some(Instant::now());
            let found = tokio::select! {
                found = logs.discover(&docker, crate::wall_ms()) => found,
                _ = stopped(&mut stop) => return,
            };
            match found {
                Ok(problems) => {
                    for error in problems {
                        if errors.should_log() {
                            warn!(%error, count = errors.count, "container log collector");
                        }
                    }
                }
                Err(error) => {
                    if errors.should_log() {
                        warn!(%error, count = errors.count, "container log discovery failed");
                    }
                    trouble.notify_one();
                }
            }
        }
        // Drain what is there before waiting for the next tick.
        loop {
            let drained = match logs.drain(MAX_LINES_PER_POLL) {
                Ok(drained) => drained,
                Err(error) => {
                    if errors.should_log() {
                        warn!(%error, count = errors.count, "container log collector");
                    }
                    break;
                }
            };
            for error in &drained.errors {
                if errors.should_log() {
                    warn!(%error, count = errors.count, "container log collector");
                }
            }
            if drained.lines.is_empty() && committed.as_ref() == Some(&drained.checkpoint) {
                break;
            }
            let full = drained.lines.len() >= MAX_LINES_PER_POLL;
            let items = drained.lines.into_iter().map(|(ts, line)| (ts, RecordBody::Log(line))).collect();
            // Lines and positions are written together: after a crash every container
            // resumes exactly after its last spooled line.
            match outbox.push(StreamClass::Logs, items, Some((CONTAINER_LOGS_CHECKPOINT, &drained.checkpoint))) {
                Ok(_) => committed = Some(drained.checkpoint),
                Err(error) => {
                    if errors.should_log() {
                        warn!(%error, count = errors.count, "container log collector could not spool lines");
                    }
                    // The readers moved past lines that were not kept: start again from
                    // the last durable positions.
                    if let Ok(fresh) = ContainerLogs::new(config.logs.clone(), durable().as_deref(), crate::wall_ms()) {
                        logs = fresh;
                        committed = durable();
                        discovered = None;
                    }
                    break;
                }
            }
            if !full || *stop.borrow() {
                break;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::collector::docker::testing::{self, Container};
    use crate::spool::{Spool, SpoolConfig};
    use gantry_shared::telemetry::{Event, LogLine, LogStream, Record};
    use std::path::PathBuf;

    use crate::test_dir::TempDir;

    fn records(outbox: &Outbox, class: StreamClass) -> Vec<Record> {
        outbox.spool().pending(class, 0, usize::MAX, usize::MAX).unwrap()
    }

    fn events(outbox: &Outbox, kind: &str) -> Vec<Event> {
        records(outbox, StreamClass::Events)
            .into_iter()
            .filter_map(|r| match r.body {
                RecordBody::Event(e) if e.kind == kind => Some(e),
                _ => None,
            })
            .collect()
    }

    fn container_lines(outbox: &Outbox, id: &str) -> Vec<LogLine> {
        records(outbox, StreamClass::Logs)
            .into_iter()
            .filter_map(|r| match r.body {
                RecordBody::Log(line) if line.container.as_deref() == Some(id) => Some(line),
                _ => None,
            })
            .collect()
    }

    async fn until<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(value) = check() {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn outbox(dir: &TempDir) -> Outbox {
        Outbox::new(Spool::open(&dir.0, SpoolConfig::default()).unwrap().0)
    }

    fn fast(host: Option<String>) -> DockerConfig {
        DockerConfig { host, interval_secs: 1, retry_min_ms: 100, retry_max_ms: 400, ..DockerConfig::default() }
    }

    async fn stop_loop(stop: watch::Sender<bool>, task: tokio::task::JoinHandle<()>) {
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("the docker loop stops").expect("the docker loop did not panic");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_docker_the_outage_is_reported_once_and_retried() {
        let dir = TempDir::new("nodocker");
        let outbox = outbox(&dir);
        let socket = format!("unix:///tmp/gantry-nope-{}.sock", rand::random::<u32>());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(docker_loop(fast(Some(socket.clone())), outbox.clone(), stop_rx));
        let down = until(Duration::from_secs(5), "docker.unavailable", || events(&outbox, "docker.unavailable").pop()).await;
        assert_eq!(down.severity, Severity::Warning);
        assert!(down.message.contains(&socket), "{}", down.message);
        // Several retries later: still running, still reported once, nothing else.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert!(!task.is_finished());
        assert_eq!(events(&outbox, "docker.unavailable").len(), 1);
        assert!(events(&outbox, "docker.available").is_empty());
        assert!(records(&outbox, StreamClass::Metrics).is_empty());
        stop_loop(stop, task).await;
    }

    /// Forwards a unix socket to Docker's, until dropped.
    struct Relay {
        path: PathBuf,
        _tasks: JoinSet<()>,
    }

    impl Relay {
        fn start(path: &std::path::Path) -> Relay {
            let target = DockerConfig::default().endpoint();
            let target = target.strip_prefix("unix://").expect("docker on a unix socket").to_string();
            let listener = tokio::net::UnixListener::bind(path).unwrap();
            let mut tasks = JoinSet::new();
            tasks.spawn(async move {
                let mut connections = JoinSet::new();
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let target = target.clone();
                    connections.spawn(async move {
                        if let Ok(mut outbound) = tokio::net::UnixStream::connect(&target).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
            });
            Relay { path: path.to_path_buf(), _tasks: tasks }
        }
    }

    impl Drop for Relay {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn docker_going_away_and_coming_back_is_reported_once_each_way() {
        if testing::docker().await.is_none() {
            return;
        }
        let dir = TempDir::new("outage");
        let outbox = outbox(&dir);
        let socket = dir.0.join("docker.sock");
        let (stop, stop_rx) = watch::channel(false);
        let config = fast(Some(format!("unix://{}", socket.display())));
        let task = tokio::spawn(docker_loop(config, outbox.clone(), stop_rx));
        until(Duration::from_secs(5), "docker.unavailable", || events(&outbox, "docker.unavailable").pop()).await;

        // Docker "comes back": the loop kept retrying and reattaches.
        let relay = Relay::start(&socket);
        let up = until(Duration::from_secs(10), "docker.available", || events(&outbox, "docker.available").pop()).await;
        assert_eq!(up.severity, Severity::Info);
        until(Duration::from_secs(10), "docker.inventory", || events(&outbox, "docker.inventory").pop()).await;
        until(Duration::from_secs(10), "docker metrics", || {
            records(&outbox, StreamClass::Metrics).into_iter().find(|r| match &r.body {
                RecordBody::Metrics(samples) => samples.iter().any(|s| s.name == "docker.images.count"),
                _ => false,
            })
        })
        .await;

        // Docker "goes away" again: a second outage, reported once.
        drop(relay);
        until(Duration::from_secs(10), "a second docker.unavailable", || (events(&outbox, "docker.unavailable").len() == 2).then_some(())).await;
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert_eq!(events(&outbox, "docker.unavailable").len(), 2);
        assert_eq!(events(&outbox, "docker.available").len(), 1);
        stop_loop(stop, task).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn container_lines_and_events_reach_the_spool_exactly_once_across_restarts() {
        if testing::docker().await.is_none() {
            return;
        }
        let dir = TempDir::new("e2e");
        let outbox = outbox(&dir);
        let name = testing::unique("spool");
        let config = DockerConfig {
            logs: crate::collector::container_logs::ContainerLogsConfig { containers: vec![name.clone()], poll_ms: 50, ..Default::default() },
            ..fast(None)
        };
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(docker_loop(config.clone(), outbox.clone(), stop_rx));
        // Let the collectors take their first positions.
        until(Duration::from_secs(10), "the first log checkpoint", || outbox.spool().checkpoint(CONTAINER_LOGS_CHECKPOINT).unwrap()).await;
        until(Duration::from_secs(10), "the first events checkpoint", || outbox.spool().checkpoint(DOCKER_EVENTS_CHECKPOINT).unwrap()).await;
        let script = "i=0; while [ $i -lt 400 ]; do echo \"line $i\"; i=$((i+1)); [ $((i % 40)) -eq 0 ] && sleep 0.2; done; exit 2";
        let container = Container::run(&name, script, &[]);
        until(Duration::from_secs(20), "some lines", || (container_lines(&outbox, &container.id).len() >= 40).then_some(())).await;
        stop_loop(stop, task).await;

        // "Agent restart" while the container keeps writing, then dies.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(docker_loop(config, outbox.clone(), stop_rx));
        until(Duration::from_secs(30), "all lines", || (container_lines(&outbox, &container.id).len() >= 400).then_some(())).await;
        let died = until(Duration::from_secs(20), "the die event", || {
            events(&outbox, "docker.container.die").into_iter().find(|e| e.attributes.contains(&("name".into(), name.clone())))
        })
        .await;
        assert!(died.attributes.contains(&("exit_code".into(), "2".into())), "{died:?}");
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        stop_loop(stop, task).await;

        let lines = container_lines(&outbox, &container.id);
        let texts: Vec<&str> = lines.iter().map(|l| l.line.as_str()).collect();
        let expected: Vec<String> = (0..400).map(|i| format!("line {i}")).collect();
        assert!(texts == expected, "{} lines, first differences: {:?}", texts.len(), texts.iter().zip(&expected).find(|(a, b)| *a != b));
        assert!(lines.iter().all(|l| l.stream == LogStream::Stdout && l.source == format!("container:{name}")));
        for kind in ["docker.container.create", "docker.container.start", "docker.container.die"] {
            let mine = events(&outbox, kind).into_iter().filter(|e| e.attributes.contains(&("name".into(), name.clone()))).count();
            assert_eq!(mine, 1, "{kind}");
        }
    }
}
