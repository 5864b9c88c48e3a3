//! Runs in progress in this process. For each agent with a running turn: its
//! cancel flag (set by `stop`, checked by the worker at every streamed chunk
//! and tool boundary) and its session. A `stop` for a turn of another process
//! goes through the store instead (`AppState::stop_text`). For each web chat request: a bounded
//! log of the run's events, so `GET …/runs/{request_id}/events` can replay
//! the run and then follow it live.
//!
//! Bounded: a run log keeps at most `RUN_EVENTS_MAX` events and the registry
//! at most `RUN_LOGS_MAX` finished logs (oldest dropped first).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::Value;
use tinyfat_core::AgentId;
use tinyfat_model::CancelToken;
use tokio::sync::broadcast;

pub const RUN_EVENTS_MAX: usize = 10_000;
pub const RUN_LOGS_MAX: usize = 1_000;
const LIVE_CHANNEL_CAPACITY: usize = 1024;

#[derive(Debug, Clone)]
pub struct ActiveRun {
    pub cancel: CancelToken,
    pub session: String,
    pub started_ms: i64,
    pub job_ids: Vec<String>,
}

#[derive(Debug)]
struct RunLog {
    events: Vec<Value>,
    done: bool,
    live: broadcast::Sender<Value>,
}

#[derive(Debug, Default)]
pub struct RunRegistry {
    active: Mutex<HashMap<AgentId, ActiveRun>>,
    logs: Mutex<(HashMap<String, RunLog>, VecDeque<String>)>,
}

/// A replay of a run so far, and a receiver for what follows.
#[derive(Debug)]
pub struct RunSubscription {
    pub past: Vec<Value>,
    pub done: bool,
    pub live: broadcast::Receiver<Value>,
}

impl RunRegistry {
    pub fn start(&self, agent: &AgentId, run: ActiveRun) {
        self.active.lock().expect("registry lock").insert(agent.clone(), run);
    }

    pub fn finish(&self, agent: &AgentId) {
        self.active.lock().expect("registry lock").remove(agent);
    }

    pub fn active(&self, agent: &AgentId) -> Option<ActiveRun> {
        self.active.lock().expect("registry lock").get(agent).cloned()
    }

    /// Sets the cancel flag of the agent's running turn; false if none runs here.
    pub fn cancel(&self, agent: &AgentId) -> bool {
        match self.active.lock().expect("registry lock").get(agent) {
            Some(run) => {
                run.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Cancels every running turn (shutdown past its deadline).
    pub fn cancel_all(&self) {
        for run in self.active.lock().expect("registry lock").values() {
            run.cancel.cancel();
        }
    }

    /// Creates the log of a web chat run if it does not exist yet.
    pub fn open_log(&self, request_key: &str) {
        let mut guard = self.logs.lock().expect("registry lock");
        let (logs, order) = &mut *guard;
        if logs.contains_key(request_key) {
            return;
        }
        let (live, _) = broadcast::channel(LIVE_CHANNEL_CAPACITY);
        logs.insert(request_key.to_owned(), RunLog { events: Vec::new(), done: false, live });
        order.push_back(request_key.to_owned());
        while order.len() > RUN_LOGS_MAX {
            if let Some(old) = order.pop_front() {
                logs.remove(&old);
            }
        }
    }

    /// Appends an event to a run's log and sends it to live followers.
    pub fn push(&self, request_key: &str, event: Value) {
        let mut guard = self.logs.lock().expect("registry lock");
        if let Some(log) = guard.0.get_mut(request_key) {
            if log.events.len() < RUN_EVENTS_MAX {
                log.events.push(event.clone());
            }
            let _ = log.live.send(event);
        }
    }

    pub fn close_log(&self, request_key: &str) {
        let mut guard = self.logs.lock().expect("registry lock");
        if let Some(log) = guard.0.get_mut(request_key) {
            log.done = true;
            let _ = log.live.send(Value::String("[DONE]".into()));
        }
    }

    pub fn subscribe(&self, request_key: &str) -> Option<RunSubscription> {
        let guard = self.logs.lock().expect("registry lock");
        guard.0.get(request_key).map(|log| RunSubscription {
            past: log.events.clone(),
            done: log.done,
            live: log.live.subscribe(),
        })
    }
}
