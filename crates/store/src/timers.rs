//! The timers table as callers see it: one row per event directory of an
//! agent (SPEC §5 "firing state lives in the timers table"), the `Timers`
//! trait and its row type.
//!
//! This module owns the table's meaning and holds no SQL (each backend
//! implements `Timers`). The store does not understand events: rows are
//! computed by the platform from `tinyfat_events` decisions; the store only
//! keeps them, finds due ones and advances one after a firing.
//!
//! Concurrency: `replace_timers` replaces an agent's rows in one
//! transaction; `record_fired` advances a row only while it still describes
//! the same event file (`file_sha256`), so a scheduler that read a row before
//! the file was rewritten and resynced cannot stamp the new file's timer.
//! Firing twice is prevented by the job queue's dedup keys, not here.

use async_trait::async_trait;
use tinyfat_core::AgentId;

use crate::Result;

/// One timer: what the scheduler knows about `events/{name}/event.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimerRow {
    pub agent_id: AgentId,
    /// The event name (the directory name).
    pub name: String,
    /// `immediate`, `one-shot`, `periodic`, or `invalid` for a malformed file.
    pub event_type: String,
    /// When the scheduler must look at this timer next; `None`: never (done,
    /// spent, malformed).
    pub next_fire_ms: Option<i64>,
    /// The due instant of the last tick consumed (fired or recorded missed).
    pub last_fired_ms: Option<i64>,
    /// Hex SHA-256 of the event.json this row was computed from.
    pub file_sha256: String,
    /// Platform-owned JSON text (e.g. the event's status and session).
    pub state: String,
    /// The `error.txt` text of a malformed event file.
    pub error: Option<String>,
    pub updated_ms: i64,
}

#[async_trait]
pub trait Timers: Send + Sync + std::fmt::Debug {
    /// In one transaction: upserts `rows` (all of `agent`) and deletes the
    /// agent's other timers (their event directories are gone).
    async fn replace_timers(&self, agent: &AgentId, rows: &[TimerRow]) -> Result<()>;
    /// The agent's timers, ordered by name.
    async fn timers_for(&self, agent: &AgentId) -> Result<Vec<TimerRow>>;
    /// Up to `limit` timers with `next_fire_ms <= now_ms`, earliest first.
    async fn due_timers(&self, now_ms: i64, limit: u32) -> Result<Vec<TimerRow>>;
    /// The earliest `next_fire_ms` of all timers (`None`: nothing scheduled).
    async fn next_timer_ms(&self) -> Result<Option<i64>>;
    /// After the scheduler acted on a due timer (fired it, recorded a miss,
    /// or found it waiting): sets `last_fired_ms` (the due instant of the
    /// tick consumed) and `next_fire_ms`, if the row still has `file_sha256`.
    /// `false`: the row is gone or describes another file.
    async fn record_fired(
        &self,
        agent: &AgentId,
        name: &str,
        file_sha256: &str,
        last_fired_ms: Option<i64>,
        next_fire_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<bool>;
}
