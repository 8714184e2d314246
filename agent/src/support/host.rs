//! Remote exec on the host: runs an argv (never through a shell) as the agent's user with
//! stdin closed, keeps the last bytes of stdout and stderr, and kills the command and
//! every process it started when the timeout passes.

use gantry_shared::support::{tail_text, ExecOutput, ExecRequest};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// How long output is still read after the command exited (a background child may hold
/// the pipes open).
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// The last bytes read from a pipe, and how many were read in all.
#[derive(Debug, Default)]
pub struct Capped {
    pub kept: Vec<u8>,
    pub total: u64,
}

/// Read `pipe` to its end into `into`, keeping the last `max` bytes.
pub async fn read_capped(mut pipe: impl tokio::io::AsyncRead + Unpin, into: Arc<Mutex<Capped>>, max: usize) {
    let mut buf = [0u8; 8192];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        read_capped_stream(&into, &buf[..n], max);
    }
}

/// Add `bytes` to `into`, keeping the last `max`.
pub fn read_capped_stream(into: &Mutex<Capped>, bytes: &[u8], max: usize) {
    let mut capped = into.lock().unwrap_or_else(|p| p.into_inner());
    capped.total += bytes.len() as u64;
    capped.kept.extend_from_slice(bytes);
    if capped.kept.len() > max {
        let excess = capped.kept.len() - max;
        capped.kept.drain(..excess);
    }
}

/// The text kept of a stream and whether bytes were left out.
pub fn text_of(capped: &Mutex<Capped>, max: usize) -> (String, bool) {
    let capped = capped.lock().unwrap_or_else(|p| p.into_inner());
    let (text, cut) = tail_text(&capped.kept, max);
    (text, cut || capped.total > capped.kept.len() as u64)
}

/// Run `request.argv` on the host. A program that cannot be started ends like a shell
/// would say it: exit code 127 (not found) or 126 (not executable) with the reason on
/// stderr.
pub async fn exec(request: &ExecRequest) -> ExecOutput {
    let started = Instant::now();
    let max = request.max_output_bytes as usize;
    let limit = Duration::from_secs(u64::from(request.timeout_secs));
    let Some((program, args)) = request.argv.split_first() else {
        return ExecOutput { exit_code: Some(127), stderr: "no command given".into(), ..ExecOutput::default() };
    };
    let mut command = tokio::process::Command::new(program);
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    // Its own process group: a signal meant for the agent (Ctrl-C) does not reach it.
    command.process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            let code = if error.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
            return ExecOutput {
                exit_code: Some(code),
                stderr: format!("cannot run {program}: {error}"),
                duration_ms: started.elapsed().as_millis() as u64,
                ..ExecOutput::default()
            };
        }
    };
    let streams = [Arc::new(Mutex::new(Capped::default())), Arc::new(Mutex::new(Capped::default()))];
    let mut readers = tokio::task::JoinSet::new();
    if let Some(pipe) = child.stdout.take() {
        readers.spawn(read_capped(pipe, streams[0].clone(), max));
    }
    if let Some(pipe) = child.stderr.take() {
        readers.spawn(read_capped(pipe, streams[1].clone(), max));
    }
    let mut output = ExecOutput::default();
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) => {
            output.exit_code = status.code().map(i64::from);
        }
        Ok(Err(error)) => {
            output.stderr = format!("waiting for {program} failed: {error}");
        }
        Err(_) => {
            output.timed_out = true;
            if let Some(pid) = child.id() {
                kill_tree(pid);
            }
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
        }
    }
    let _ = tokio::time::timeout(OUTPUT_GRACE, async { while readers.join_next().await.is_some() {} }).await;
    readers.abort_all();
    let (stdout, stdout_truncated) = text_of(&streams[0], max);
    let (stderr, stderr_truncated) = text_of(&streams[1], max);
    output.stdout = stdout;
    output.stdout_truncated = stdout_truncated;
    if output.stderr.is_empty() {
        output.stderr = stderr;
        output.stderr_truncated = stderr_truncated;
    }
    output.duration_ms = started.elapsed().as_millis() as u64;
    output
}

/// SIGKILL every descendant of `root` (found through parent links), then `root`.
pub fn kill_tree(root: u32) -> bool {
    use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, Signal, System};
    let mut system = System::new();
    system.refresh_processes_specifics(ProcessesToUpdate::All, true, ProcessRefreshKind::nothing());
    let root = Pid::from_u32(root);
    let mut doomed = vec![root];
    let mut i = 0;
    while i < doomed.len() {
        let parent = doomed[i];
        doomed.extend(system.processes().iter().filter(|(_, p)| p.parent() == Some(parent)).map(|(pid, _)| *pid));
        i += 1;
    }
    let mut killed = false;
    for pid in doomed.iter().rev() {
        if let Some(process) = system.process(*pid) {
            killed |= process.kill_with(Signal::Kill).unwrap_or(false);
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(argv: &[&str], timeout_secs: u32, max: u32) -> ExecRequest {
        ExecRequest { container: None, argv: argv.iter().map(|s| s.to_string()).collect(), timeout_secs, max_output_bytes: max }
    }

    #[tokio::test]
    async fn runs_commands_with_exit_codes_caps_and_timeouts() {
        let ok = exec(&request(&["sh", "-c", "echo out; echo err >&2; exit 3"], 10, 1024)).await;
        assert_eq!((ok.exit_code, ok.stdout.as_str(), ok.stderr.as_str(), ok.timed_out), (Some(3), "out\n", "err\n", false));
        let big = exec(&request(&["sh", "-c", "yes x | head -c 100000; echo END"], 10, 1000)).await;
        assert!(big.stdout_truncated && big.stdout.len() <= 1000 && big.stdout.ends_with("END\n"), "{}", big.stdout.len());
        let missing = exec(&request(&["/nonexistent/gantry-program"], 10, 1024)).await;
        assert_eq!(missing.exit_code, Some(127), "{missing:?}");
        let marker = format!("gantry-exec-{}", rand::random::<u32>());
        let slow = exec(&request(&["sh", "-c", &format!("echo started; sleep 30 # {marker}\nsleep 30")], 1, 1024)).await;
        assert!(slow.timed_out && slow.exit_code.is_none() && slow.stdout == "started\n", "{slow:?}");
        assert!(slow.duration_ms < 10_000, "{slow:?}");
    }
}
