//! Support actions: requests the hub sends to one connected agent on its control stream
//! (container start/stop/restart/remove, a container's last log lines, a remote exec, a
//! diagnostics bundle) and the result the agent sends back under the same id.
//!
//! Plain data and pure validation only: no IO. Every output the agent reports is capped
//! here by constants, so a reply always fits well inside a frame ([`MAX_RESULT_BYTES`] is
//! far below [`crate::frame::DEFAULT_MAX_FRAME_BYTES`]).

use serde::{Deserialize, Serialize};

/// Most bytes kept of an exec's stdout, and separately of its stderr (the last bytes).
pub const MAX_EXEC_OUTPUT_BYTES: u32 = 256 * 1024;
/// Longest exec timeout, in seconds.
pub const MAX_EXEC_TIMEOUT_SECS: u32 = 120;
/// Most arguments of an exec command, and most bytes of all of them together.
pub const MAX_ARGV: usize = 256;
pub const MAX_ARGV_BYTES: usize = 16 * 1024;
/// Most log lines one logs request may ask for.
pub const MAX_LOG_TAIL: u32 = 5_000;
/// Most bytes of log lines in one reply (the newest lines are kept).
pub const MAX_LOG_BYTES: usize = 512 * 1024;
/// Longest log line kept; longer lines are cut.
pub const MAX_LOG_LINE_BYTES: usize = 16 * 1024;
/// Largest diagnostics document.
pub const MAX_DIAGNOSTICS_BYTES: usize = 512 * 1024;
/// Largest encoded result an agent sends: every cap above keeps a reply under it.
pub const MAX_RESULT_BYTES: usize = 768 * 1024;
/// Longest container reference (name or id).
pub const MAX_CONTAINER_REF: usize = 128;

/// One support action for one agent; `id` ties the result to the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionRequest {
    pub id: u64,
    pub action: SupportAction,
}

/// What the agent is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SupportAction {
    /// Start, stop, restart or remove a container (by name or id).
    Container { container: String, op: ContainerOp },
    /// The last `tail` lines of a container's stdout and stderr.
    ContainerLogs { container: String, tail: u32 },
    /// Run a command in a container, or on the host when `container` is `None`.
    Exec(ExecRequest),
    /// Collect the diagnostics bundle.
    Diagnostics,
}

/// A container lifecycle change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerOp {
    Start,
    Stop,
    Restart,
    /// Remove; a running container only with `force` (it is killed first).
    Remove {
        force: bool,
    },
}

impl ContainerOp {
    pub fn name(self) -> &'static str {
        match self {
            ContainerOp::Start => "start",
            ContainerOp::Stop => "stop",
            ContainerOp::Restart => "restart",
            ContainerOp::Remove { .. } => "remove",
        }
    }
}

/// A command to run, given as an argv (never a shell string: wrap in `sh -c` explicitly).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Container name or id; `None` runs on the host as the agent's user.
    pub container: Option<String>,
    pub argv: Vec<String>,
    /// Killed after this long.
    pub timeout_secs: u32,
    /// Bytes kept of stdout and of stderr each (the last ones), at most
    /// [`MAX_EXEC_OUTPUT_BYTES`].
    pub max_output_bytes: u32,
}

/// The agent's answer to an [`ActionRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionReply {
    pub id: u64,
    pub result: Result<ActionOutput, ActionError>,
}

/// What a successful action produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionOutput {
    /// The container after the change (`state` is `removed` after a removal).
    Container(ContainerStatus),
    Logs(LogTail),
    Exec(ExecOutput),
    /// The diagnostics bundle as a JSON document (at most [`MAX_DIAGNOSTICS_BYTES`]).
    Diagnostics(String),
}

/// A container's state as Docker reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct ContainerStatus {
    pub id: String,
    pub name: String,
    /// `running`, `exited`, `created`, `restarting`, `paused`, `dead`, or `removed`.
    pub state: String,
    /// RFC 3339 times from Docker; empty when unknown.
    pub started_at: String,
    pub finished_at: String,
    pub restart_count: i64,
    /// What the action did, e.g. "restarted" or "was already running".
    pub message: String,
}

/// The last lines of a container's output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogTail {
    pub lines: Vec<LogLine>,
    /// Older lines were left out to stay under [`MAX_LOG_BYTES`], or lines were cut.
    pub truncated: bool,
}

/// One line of container output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// `stdout`, `stderr` or `console` (a container with a TTY).
    pub stream: String,
    /// Docker's RFC 3339 timestamp of the line.
    pub ts: String,
    pub line: String,
}

/// How an exec ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    /// `None` when the command was killed (timeout) or killed by a signal.
    pub exit_code: Option<i64>,
    /// The last bytes of each stream, as UTF-8 (invalid sequences replaced).
    pub stdout: String,
    pub stderr: String,
    /// More was written than kept.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// The timeout passed and the command was killed.
    pub timed_out: bool,
    /// Set when a timed-out command could not be killed (e.g. a container process the
    /// agent cannot signal): it may still be running.
    pub kill_failed: Option<String>,
    pub duration_ms: u64,
}

/// Why an action failed, as the agent saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ActionError {
    /// The container (or the command's program) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is not valid (the agent checks again what the hub checked).
    #[error("{0}")]
    Invalid(String),
    /// The action conflicts with the container's state (e.g. removing a running one).
    #[error("{0}")]
    Conflict(String),
    /// Docker is not reachable, or this agent does not allow the action.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else, with Docker's or the system's message.
    #[error("{0}")]
    Failed(String),
}

/// Whether `text` may name a container: Docker's name rule (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`),
/// which container ids also satisfy.
pub fn valid_container_ref(text: &str) -> bool {
    let mut chars = text.chars();
    text.len() <= MAX_CONTAINER_REF
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

impl SupportAction {
    /// Every problem with the request, so a caller can report them together.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let check_container = |container: &str, errors: &mut Vec<String>| {
            if !valid_container_ref(container) {
                errors.push(format!(
                    "container {:?} is not a container name or id (1-{MAX_CONTAINER_REF} characters of a-z, A-Z, 0-9, '_', '.', '-', starting with a letter or digit)",
                    container.chars().take(MAX_CONTAINER_REF + 1).collect::<String>()
                ));
            }
        };
        match self {
            SupportAction::Container { container, .. } => check_container(container, &mut errors),
            SupportAction::ContainerLogs { container, tail } => {
                check_container(container, &mut errors);
                if *tail == 0 || *tail > MAX_LOG_TAIL {
                    errors.push(format!("tail must be between 1 and {MAX_LOG_TAIL}"));
                }
            }
            SupportAction::Exec(exec) => {
                if let Some(container) = &exec.container {
                    check_container(container, &mut errors);
                }
                if exec.argv.is_empty() || exec.argv[0].is_empty() {
                    errors.push("command must name a program: a non-empty argv like [\"sh\", \"-c\", \"...\"]".to_string());
                }
                if exec.argv.len() > MAX_ARGV {
                    errors.push(format!("command may have at most {MAX_ARGV} arguments"));
                }
                if exec.argv.iter().map(String::len).sum::<usize>() > MAX_ARGV_BYTES {
                    errors.push(format!("command may have at most {MAX_ARGV_BYTES} bytes of arguments"));
                }
                if exec.argv.iter().any(|a| a.contains('\0')) {
                    errors.push("command arguments may not contain NUL bytes".to_string());
                }
                if exec.timeout_secs == 0 || exec.timeout_secs > MAX_EXEC_TIMEOUT_SECS {
                    errors.push(format!("timeout_secs must be between 1 and {MAX_EXEC_TIMEOUT_SECS}"));
                }
                if exec.max_output_bytes == 0 || exec.max_output_bytes > MAX_EXEC_OUTPUT_BYTES {
                    errors.push(format!("max_output_bytes must be between 1 and {MAX_EXEC_OUTPUT_BYTES}"));
                }
            }
            SupportAction::Diagnostics => {}
        }
        errors
    }
}

/// Keep the last `max` bytes of `bytes` (on a UTF-8 boundary when the text is UTF-8) as
/// text; whether anything was cut.
pub fn tail_text(bytes: &[u8], max: usize) -> (String, bool) {
    if bytes.len() <= max {
        return (String::from_utf8_lossy(bytes).into_owned(), false);
    }
    let mut start = bytes.len() - max;
    // Skip UTF-8 continuation bytes so the kept text does not start mid-character.
    while start < bytes.len() && (bytes[start] & 0xC0) == 0x80 {
        start += 1;
    }
    (String::from_utf8_lossy(&bytes[start..]).into_owned(), true)
}

/// `text` cut to at most `max` bytes on a character boundary; whether it was cut.
pub fn cut(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{AgentMessage, HubMessage};

    fn exec(argv: &[&str]) -> ExecRequest {
        ExecRequest { container: Some("web-1".into()), argv: argv.iter().map(|s| s.to_string()).collect(), timeout_secs: 5, max_output_bytes: 1024 }
    }

    #[test]
    fn container_refs_follow_dockers_name_rule() {
        assert!(valid_container_ref("web-1") && valid_container_ref("a1b2c3d4e5f6") && valid_container_ref("my_app.v2"));
        assert!(!valid_container_ref("") && !valid_container_ref("-x") && !valid_container_ref("a/b") && !valid_container_ref("a b"));
        assert!(!valid_container_ref(&"a".repeat(MAX_CONTAINER_REF + 1)));
    }

    #[test]
    fn requests_are_validated_with_every_problem_named() {
        assert!(SupportAction::Exec(exec(&["ls"])).validate().is_empty());
        let bad = SupportAction::Exec(ExecRequest { container: Some("../etc".into()), argv: vec![], timeout_secs: 0, max_output_bytes: u32::MAX });
        let errors = bad.validate();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(SupportAction::ContainerLogs { container: "web".into(), tail: MAX_LOG_TAIL + 1 }.validate()[0].contains("tail"));
        assert!(SupportAction::Exec(exec(&["a\0b"])).validate()[0].contains("NUL"));
        assert!(SupportAction::Diagnostics.validate().is_empty());
    }

    #[test]
    fn tails_keep_the_last_bytes_on_a_character_boundary() {
        assert_eq!(tail_text(b"hello", 10), ("hello".to_string(), false));
        assert_eq!(tail_text(b"hello world", 5), ("world".to_string(), true));
        let (kept, cut_off) = tail_text("aé".as_bytes(), 1);
        assert_eq!((kept.as_str(), cut_off), ("", true));
        assert_eq!(cut("héllo", 2), ("h", true));
    }

    #[test]
    fn the_largest_replies_fit_in_a_frame() {
        let big = "x".repeat(MAX_EXEC_OUTPUT_BYTES as usize);
        let output = ExecOutput { exit_code: Some(1), stdout: big.clone(), stderr: big, ..ExecOutput::default() };
        let reply = AgentMessage::ActionResult(Box::new(ActionReply { id: 1, result: Ok(ActionOutput::Exec(output)) }));
        let bytes = crate::frame::encode_to_vec(&reply, crate::frame::DEFAULT_MAX_FRAME_BYTES).unwrap();
        assert!(bytes.len() <= MAX_RESULT_BYTES, "{}", bytes.len());
        let mut buffer = crate::frame::FrameBuffer::new(crate::frame::DEFAULT_MAX_FRAME_BYTES);
        buffer.extend(&bytes);
        assert_eq!(buffer.next_message::<AgentMessage>().unwrap(), Some(reply));
        let request = HubMessage::Action(Box::new(ActionRequest { id: 7, action: SupportAction::Exec(exec(&["ls", "-l"])) }));
        let bytes = crate::frame::encode_to_vec(&request, crate::frame::DEFAULT_MAX_FRAME_BYTES).unwrap();
        let mut buffer = crate::frame::FrameBuffer::new(crate::frame::DEFAULT_MAX_FRAME_BYTES);
        buffer.extend(&bytes);
        assert_eq!(buffer.next_message::<HubMessage>().unwrap(), Some(request));
    }
}
