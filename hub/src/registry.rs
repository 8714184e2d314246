//! Live agent sessions on this hub process: who is connected, over which connection, and
//! the freshest connection quality figures (RTT, clock skew, last heartbeat).
//!
//! Everything here is rebuildable: agents reconnect after a hub restart and re-register.
//! The store keeps the durable part (last seen, facts). This module must not do IO beyond
//! closing connections and sending commands to session tasks.

use gantry_shared::message::ErrorCode;
use gantry_shared::support::{ActionError, ActionOutput, ActionReply, ActionRequest, SupportAction};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// A command for one session task.
#[derive(Debug, Clone)]
pub enum SessionCommand {
    /// Tell the agent to come back after this long, then close.
    Drain(Duration),
    /// Send a message on the control stream (deployment commands).
    Send(Box<gantry_shared::message::HubMessage>),
}

/// Live figures of one session.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LiveInfo {
    pub connected_at_ms: i64,
    pub last_seen_ms: i64,
    pub rtt_ms: f64,
    pub clock_skew_ms: i64,
    pub remote_addr: String,
    /// The agent's spool backlog as it last reported it (agents of protocol version 3 and
    /// later), with the hub's clock when it arrived.
    pub spool: Option<(i64, gantry_shared::message::SpoolState)>,
}

#[derive(Debug)]
struct Entry {
    conn_id: u64,
    connection: quinn::Connection,
    commands: mpsc::Sender<SessionCommand>,
    info: LiveInfo,
    /// Support actions sent on this connection and not answered yet. Dropped with the
    /// entry, which tells every waiter the session ended.
    pending: HashMap<u64, oneshot::Sender<Result<ActionOutput, ActionError>>>,
}

/// Support actions one session may have unanswered at once.
pub const MAX_PENDING_ACTIONS: usize = 32;

/// Why a support action could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendRefused {
    /// The agent has no live session on this hub.
    NotConnected,
    /// The session has [`MAX_PENDING_ACTIONS`] unanswered, or its queue is full.
    Busy,
}

/// Sessions by agent id.
#[derive(Debug, Default)]
pub struct Registry {
    sessions: Mutex<HashMap<String, Entry>>,
    next_action: AtomicU64,
    /// Woken whenever an agent comes online or goes offline (live fleet views wait on it).
    pub changes: tokio::sync::Notify,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent (every
        // critical section is a single insert, remove or field update), so recover it.
        self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Register a new session, closing any older connection of the same agent (it is
    /// superseded: the agent restarted or moved network before the old one timed out).
    pub fn register(&self, agent_id: &str, conn_id: u64, connection: quinn::Connection, commands: mpsc::Sender<SessionCommand>, info: LiveInfo) {
        let old = self.lock().insert(agent_id.to_string(), Entry { conn_id, connection, commands, info, pending: HashMap::new() });
        if let Some(old) = old {
            old.connection.close(ErrorCode::Superseded.as_u32().into(), b"superseded by a newer connection");
        }
        self.changes.notify_waiters();
    }

    /// Remove the session if `conn_id` is still the current one; returns whether it was.
    pub fn unregister(&self, agent_id: &str, conn_id: u64) -> bool {
        let mut sessions = self.lock();
        if sessions.get(agent_id).is_some_and(|e| e.conn_id == conn_id) {
            sessions.remove(agent_id);
            drop(sessions);
            self.changes.notify_waiters();
            true
        } else {
            false
        }
    }

    /// Update the live figures of the current session.
    pub fn update(&self, agent_id: &str, conn_id: u64, change: impl FnOnce(&mut LiveInfo)) {
        if let Some(entry) = self.lock().get_mut(agent_id) {
            if entry.conn_id == conn_id {
                change(&mut entry.info);
            }
        }
    }

    pub fn info(&self, agent_id: &str) -> Option<LiveInfo> {
        self.lock().get(agent_id).map(|e| e.info.clone())
    }

    pub fn is_connected(&self, agent_id: &str) -> bool {
        self.lock().contains_key(agent_id)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Close an agent's connection at once with `code`.
    pub fn close(&self, agent_id: &str, code: ErrorCode, reason: &str) -> bool {
        match self.lock().get(agent_id) {
            Some(entry) => {
                entry.connection.close(code.as_u32().into(), reason.as_bytes());
                true
            }
            None => false,
        }
    }

    /// Queue a message for an agent's control stream; false if it is not connected or its
    /// queue is full (the message is then sent again when it reconnects).
    pub fn send(&self, agent_id: &str, message: gantry_shared::message::HubMessage) -> bool {
        match self.lock().get(agent_id) {
            Some(entry) => entry.commands.try_send(SessionCommand::Send(Box::new(message))).is_ok(),
            None => false,
        }
    }

    /// Send a support action to an agent; the receiver gets the agent's answer, or an error
    /// (`RecvError`) when the session ends before it answered.
    pub fn request(&self, agent_id: &str, action: SupportAction) -> Result<(u64, oneshot::Receiver<Result<ActionOutput, ActionError>>), SendRefused> {
        let mut sessions = self.lock();
        let entry = sessions.get_mut(agent_id).ok_or(SendRefused::NotConnected)?;
        if entry.pending.len() >= MAX_PENDING_ACTIONS {
            return Err(SendRefused::Busy);
        }
        let id = self.next_action.fetch_add(1, Ordering::Relaxed) + 1;
        let message = gantry_shared::message::HubMessage::Action(Box::new(ActionRequest { id, action }));
        if entry.commands.try_send(SessionCommand::Send(Box::new(message))).is_err() {
            return Err(SendRefused::Busy);
        }
        let (tx, rx) = oneshot::channel();
        entry.pending.insert(id, tx);
        Ok((id, rx))
    }

    /// Hand an agent's answer to whoever waits for it. Answers from an older connection, or
    /// for ids nobody waits for (any more), are dropped.
    pub fn resolve(&self, agent_id: &str, conn_id: u64, reply: ActionReply) -> bool {
        let waiter = match self.lock().get_mut(agent_id) {
            Some(entry) if entry.conn_id == conn_id => entry.pending.remove(&reply.id),
            _ => None,
        };
        waiter.is_some_and(|tx| tx.send(reply.result).is_ok())
    }

    /// Stop waiting for action `id` (the caller gave up).
    pub fn forget(&self, agent_id: &str, id: u64) {
        if let Some(entry) = self.lock().get_mut(agent_id) {
            entry.pending.remove(&id);
        }
    }

    /// Ask every session to drain.
    pub fn drain_all(&self, retry_after: Duration) {
        for entry in self.lock().values() {
            let _ = entry.commands.try_send(SessionCommand::Drain(retry_after));
        }
    }
}
