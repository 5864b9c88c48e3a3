//! `SessionCache`: parsed session logs kept between turns, so that a turn
//! reads and parses only the records appended since the last one instead of
//! the session's whole history.
//!
//! The file stays the truth: a log taken from the cache is refreshed
//! against its file before use (`SessionLog::refreshed`), which reads what
//! was appended since (by this process or another) and falls back to a full
//! read when the file was replaced, shortened or rewritten. A log is taken
//! out while its turn runs (one turn per agent at a time, under the agent
//! lease) and kept again only after the turn succeeded. The cache is bounded
//! by the session file bytes it holds, evicting the least recently kept.
//!
//! This module does not parse or write session files (`session.rs` does),
//! and nothing may depend on an entry being present.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tinyfat_core::session::SessionId;
use tinyfat_storage::{AgentDir, FileError, RelPath, validate_path};

use crate::session::SessionLog;

#[derive(Debug)]
pub struct SessionCache {
    state: Mutex<State>,
    /// Most session file bytes held at once; a larger session is not kept.
    bytes_max: u64,
}

#[derive(Debug, Default)]
struct State {
    /// By the session file's host path; the tick orders evictions.
    logs: HashMap<PathBuf, (u64, SessionLog)>,
    bytes: u64,
    tick: u64,
}

impl State {
    fn remove(&mut self, key: &Path) -> Option<SessionLog> {
        let (_, log) = self.logs.remove(key)?;
        self.bytes -= log.known_len().unwrap_or(0);
        Some(log)
    }
}

/// A session file's host path: one key per agent and session.
fn key(dir: &AgentDir, path: &RelPath) -> PathBuf {
    dir.host_path().join(path.as_str())
}

impl SessionCache {
    pub fn new(bytes_max: u64) -> Self {
        Self { state: Mutex::new(State::default()), bytes_max }
    }

    /// The session's log, up to date with its file: the cached one
    /// refreshed, or a full read.
    pub fn load(&self, dir: &AgentDir, session: &SessionId) -> Result<SessionLog, FileError> {
        let path = validate_path(&session.file_path())?;
        match self.take(&key(dir, &path)) {
            Some(log) => log.refreshed(dir),
            None => SessionLog::load_path(dir, path),
        }
    }

    /// Keeps `log` for the next turn of its session.
    pub fn keep(&self, dir: &AgentDir, log: SessionLog) {
        let Some(len) = log.known_len().filter(|&len| len <= self.bytes_max) else { return };
        let key = key(dir, log.path());
        let mut state = self.lock();
        state.tick += 1;
        let tick = state.tick;
        state.remove(&key);
        state.logs.insert(key, (tick, log));
        state.bytes += len;
        while state.bytes > self.bytes_max {
            let Some(oldest) = state.logs.iter().min_by_key(|(_, (tick, _))| *tick).map(|(key, _)| key.clone()) else {
                break;
            };
            state.remove(&oldest);
        }
    }

    /// Session file bytes held now.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    fn take(&self, key: &Path) -> Option<SessionLog> {
        self.lock().remove(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
