//! Scheduled wake-ups (SPEC §5 events, the wake manifest; §1 scheduler role).
//!
//! The pure rules live in `tinyfat_events`; this module carries them out:
//! - `sync_timers` (after every turn, under the lease): lists the agent's
//!   `events/` folder, parses each `event.json`, writes `error.txt` beside a
//!   malformed one (only when its text changes; nothing is ever deleted),
//!   computes each timer with `decide` and replaces the agent's rows in the
//!   timers table, then wakes the scheduler loop of this process.
//! - `run` (the scheduler role): sleeps until the earliest `next_fire_ms`
//!   (capped, and woken early by `AppState::scheduler_wake`), then for each
//!   due timer re-reads the file (read-only), decides, enqueues an `event`
//!   job under `tinyfat_events::dedup_key` (so two schedulers or a restart
//!   never fire one tick twice) and advances the row (`record_fired`). The
//!   scheduler never writes the agent's prefix.
//! - `prepare_event_job` (the worker, under the lease): re-reads event.json,
//!   drops the job when the file is gone or changed (SHA-256 recorded in the
//!   payload), appends to `history.jsonl`, marks a fired one-shot or
//!   immediate event `"status":"done"`, and returns the
//!   `[EVENT:{name}:{type}:{when}] {text}` message.
//!
//! Missed one-shots (more than `scheduler.late_grace` late): the scheduler
//! enqueues an `event` job flagged `missed` under the same dedup key a firing
//! would use (so a tick is either fired or missed, never both); its worker
//! appends the `missed` history line under the lease and runs no turn.
//!
//! Replies: an event whose session is a channel session replies there
//! (`telegram-{chat}` → Telegram chat, `slack-{rest}` → Slack); `events`,
//! `email-…`, `web-…` and `cli-…` sessions have no reply target (the agent
//! can still send mail through its outbox).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use tinyfat_core::SessionId;
use tinyfat_events::{
    Decision, EVENT_FILE_BYTES_MAX, Event, EventName, EventType, HistoryReason, HistoryRecord, Status, TimerState,
    decide, dedup_key, event_message, sha256_hex,
};
pub use tinyfat_events::{ManifestEntry, WakeManifest};
use tinyfat_runtime::{Conversation, InboundMessage};
use tinyfat_storage::{AgentDir, EntryKind, FileError, RelPath, validate_path};
use tinyfat_store::{Agent, Job, NewJob, TimerRow};
use tokio::sync::watch;

use crate::Platform;
use crate::api::{ApiError, ApiPath};
use crate::auth::Caller;
use crate::error::{Error, Result};
use crate::inbound::MessageJob;
use crate::state::AppState;

pub const JOB_KIND_EVENT: &str = "event";
/// The `"type"` of a timer row whose event file is malformed.
pub const TYPE_INVALID: &str = tinyfat_events::MANIFEST_TYPE_INVALID;
/// Due timers handled per round of the scheduler loop.
const DUE_BATCH_MAX: u32 = 100;
/// Longest sleep of the scheduler loop: timers changed by another process
/// (a worker-only process, `tinyfat chat` running a turn in-process) are not
/// announced to this one. One indexed `min(next_fire_ms)` query per wake.
const SLEEP_MAX: Duration = Duration::from_secs(5);
/// Sleep after a round that hit an error, so a failing timer cannot spin.
const ERROR_SLEEP: Duration = Duration::from_secs(1);
/// `error.txt` is compared with the new text only up to this size.
const ERROR_TXT_BYTES_MAX: u64 = 64 * 1024;
/// `history.jsonl` is searched for a job's record only up to this size.
const HISTORY_SCAN_BYTES_MAX: u64 = 1024 * 1024;
/// Event directories synced per agent.
const EVENTS_MAX: usize = 1000;

/// What an `event` job carries (the `payload` column).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventJob {
    pub name: String,
    pub event_type: EventType,
    /// SHA-256 of the event.json the scheduler fired.
    pub file_sha256: String,
    /// SHA-256 of that file once marked done: a retried job whose first
    /// attempt already marked it done still runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done_sha256: Option<String>,
    pub due_at: DateTime<Utc>,
    pub text: String,
    /// Not a firing: record a `missed` history line and run no turn.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub missed: bool,
}

/// The platform-owned `state` JSON of a timer row.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RowState {
    #[serde(default)]
    status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session: Option<String>,
}

fn ms_to_utc(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::UNIX_EPOCH)
}

fn path(p: &str) -> Result<RelPath> {
    validate_path(p).map_err(|e| Error::Invalid(e.to_string()))
}

/// The event file's bytes: `Ok(None)` when it does not exist, `Err(text)`
/// when it exists but cannot be read as an event file (a link, a FIFO, too
/// large) — the text goes to `error.txt`.
fn read_event_file(dir: &AgentDir, file: &RelPath) -> Result<Option<Vec<u8>>, String> {
    match dir.read(file, EVENT_FILE_BYTES_MAX as u64) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(FileError::NotFound(_)) => Ok(None),
        Err(FileError::TooLarge { size, .. }) => Err(tinyfat_events::EventFileError::FileTooLarge {
            size_bytes: size as usize,
            max_bytes: EVENT_FILE_BYTES_MAX,
        }
        .to_string()),
        Err(e) => Err(format!("event.json cannot be read: {e}")),
    }
}

/// The event file with `"status":"done"`, all other fields kept.
fn mark_done(file: &[u8]) -> Option<Vec<u8>> {
    let mut fields: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(file).ok()?;
    fields.insert("status".into(), "done".into());
    let mut bytes = serde_json::to_vec_pretty(&fields).ok()?;
    bytes.push(b'\n');
    Some(bytes)
}

/// Where the reply of an event's turn goes (see the module documentation).
pub fn conversation_for(session: &SessionId) -> Option<Conversation> {
    let s = session.as_str();
    if let Some(chat) = s.strip_prefix("telegram-") {
        return Some(Conversation { channel: "telegram".into(), to: Some(chat.to_owned()) });
    }
    if let Some(rest) = s.strip_prefix("slack-") {
        return Some(Conversation { channel: "slack".into(), to: Some(rest.to_owned()) });
    }
    None
}

impl Platform {
    /// The agent's `config.json` timezone (`UTC` when unreadable).
    async fn agent_timezone(&self, agent: &Agent) -> String {
        self.agent_config(agent).await.map(|c| c.timezone).unwrap_or_else(|_| "UTC".to_owned())
    }

    fn late_grace(&self) -> TimeDelta {
        TimeDelta::from_std(self.settings.late_grace()).unwrap_or(TimeDelta::hours(1))
    }

    /// The wake manifest of `agent`, from the timers table (SPEC §5):
    /// `{"next_wake", "events":[{"name","type","next_fire"}]}`, plus
    /// `"status":"done"` and `"error"` where they apply.
    pub async fn wake_manifest(&self, agent: &Agent) -> Result<WakeManifest> {
        let rows = self.store.timers_for(&agent.id).await?;
        let mut events: Vec<ManifestEntry> = rows
            .into_iter()
            .map(|row| {
                let state: RowState = serde_json::from_str(&row.state).unwrap_or_default();
                let active = row.error.is_none() && state.status.is_active();
                ManifestEntry {
                    name: row.name,
                    event_type: row.event_type,
                    next_fire: row.next_fire_ms.filter(|_| active).map(ms_to_utc),
                    status: state.status,
                    error: row.error,
                }
            })
            .collect();
        events.sort_by(|a, b| a.name.cmp(&b.name));
        let next_wake = events.iter().filter_map(|e| e.next_fire).min();
        Ok(WakeManifest { next_wake, events })
    }

    /// Recomputes the agent's timers from its event files and replaces its
    /// rows. With `write_errors`, a malformed file gets `error.txt` (only
    /// under the agent's lease); without, the prefix is only read.
    pub async fn sync_event_timers(&self, agent: &Agent, write_errors: bool) -> Result<Vec<TimerRow>> {
        let timezone = self.agent_timezone(agent).await;
        let workspace = self.storage.checkout(&agent.id).await?;
        let dir = &workspace.dir;
        let now_ms = self.now_ms();
        let now = ms_to_utc(now_ms);
        let grace = self.late_grace();
        let previous = self.store.timers_for(&agent.id).await?;
        let entries = match dir.list(&path("events")?) {
            Ok(entries) => entries,
            Err(FileError::NotFound(_)) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let mut rows = Vec::new();
        for entry in entries.into_iter().filter(|e| e.kind == EntryKind::Dir).take(EVENTS_MAX) {
            let raw_name = entry.name;
            let invalid_row = |sha: String, error: String| TimerRow {
                agent_id: agent.id.clone(),
                name: raw_name.clone(),
                event_type: TYPE_INVALID.to_owned(),
                next_fire_ms: None,
                last_fired_ms: None,
                file_sha256: sha,
                state: "{}".to_owned(),
                error: Some(error),
                updated_ms: now_ms,
            };
            let Ok(file_path) = path(&format!("events/{raw_name}/event.json")) else { continue };
            let error_path = path(&format!("events/{raw_name}/error.txt"))?;
            let bytes = match read_event_file(dir, &file_path) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => continue,
                Err(error) => {
                    if write_errors {
                        write_error_txt(dir, &error_path, &error);
                    }
                    rows.push(invalid_row(String::new(), error));
                    continue;
                }
            };
            let sha = sha256_hex(&bytes);
            let parsed = EventName::parse(&raw_name)
                .map_err(tinyfat_events::EventFileError::from)
                .and_then(|name| Event::parse(&bytes, &timezone).map(|event| (name, event)));
            let (name, event) = match parsed {
                Ok(ok) => ok,
                Err(error) => {
                    let error = error.to_string();
                    if write_errors {
                        write_error_txt(dir, &error_path, &error);
                    }
                    rows.push(invalid_row(sha, error));
                    continue;
                }
            };
            // Same file: keep the firing state. A new or changed file starts afresh.
            let state = previous
                .iter()
                .find(|row| row.name == name.as_str() && row.file_sha256 == sha && row.error.is_none())
                .map(|row| TimerState {
                    last_fired_at: row.last_fired_ms.map(ms_to_utc),
                    next_fire: row.next_fire_ms.map(ms_to_utc),
                })
                .unwrap_or_default();
            let next_fire = match decide(&event, state, now, grace) {
                Decision::Fire { due_at } | Decision::Missed { due_at } => Some(due_at),
                Decision::Wait { until } => Some(until),
                Decision::Never => None,
            };
            let row_state = RowState { status: event.status(), session: Some(event.session().to_string()) };
            rows.push(TimerRow {
                agent_id: agent.id.clone(),
                name: name.to_string(),
                event_type: event.event_type().as_str().to_owned(),
                next_fire_ms: next_fire.map(|t| t.timestamp_millis()),
                last_fired_ms: state.last_fired_at.map(|t| t.timestamp_millis()),
                file_sha256: sha,
                state: serde_json::to_string(&row_state).expect("row state serialises"),
                error: None,
                updated_ms: now_ms,
            });
        }
        // Most turns change no event: then nothing is written (no write
        // transaction per turn, and no stale overwrite of a firing the
        // scheduler recorded since `previous` was read).
        if !same_timers(&previous, &rows) {
            self.store.replace_timers(&agent.id, &rows).await?;
        }
        Ok(rows)
    }
}

/// Whether `rows` would leave the timers table as `previous` has it (in any
/// order; `updated_ms` aside).
fn same_timers(previous: &[TimerRow], rows: &[TimerRow]) -> bool {
    previous.len() == rows.len()
        && rows
            .iter()
            .all(|row| previous.iter().any(|old| TimerRow { updated_ms: row.updated_ms, ..old.clone() } == *row))
}

/// Writes `error.txt` unless it already holds this text. Never deletes.
fn write_error_txt(dir: &AgentDir, error_path: &RelPath, error: &str) {
    let text = format!("{error}\n");
    if dir.read(error_path, ERROR_TXT_BYTES_MAX).is_ok_and(|old| old == text.as_bytes()) {
        return;
    }
    if let Err(e) = dir.write_atomic(error_path, text.as_bytes()) {
        tracing::warn!(path = %error_path.as_str(), error = %e, "cannot write error.txt beside a malformed event file");
    }
}

/// Syncs the agent's event files into the timers table (after every turn,
/// under the lease; also after API edits of the events folder, which run as
/// jobs under the lease), and wakes the scheduler.
pub async fn sync_timers(state: &AppState, agent: &Agent) {
    match state.platform.sync_event_timers(agent, true).await {
        Ok(_) => state.scheduler_wake.notify_one(),
        Err(e) => tracing::warn!(agent = %agent.name, error = %e, "syncing event timers failed"),
    }
}

/// Re-reads the event under the lease; `Ok(None)` drops the job (the file is
/// gone or changed since it was scheduled, or the job only records a miss).
pub async fn prepare_event_job(state: &AppState, agent: &Agent, job: &Job) -> Result<Option<MessageJob>, String> {
    let platform = &state.platform;
    let payload: EventJob =
        serde_json::from_str(&job.payload).map_err(|e| format!("unreadable event job payload: {e}"))?;
    let name = EventName::parse(&payload.name).map_err(|e| e.to_string())?;
    let timezone = platform.agent_timezone(agent).await;
    let workspace = platform.storage.checkout(&agent.id).await.map_err(|e| e.to_string())?;
    let dir = &workspace.dir;
    let now = ms_to_utc(platform.now_ms());
    let history_path = validate_path(&name.history_path()).map_err(|e| e.to_string())?;
    let file_path = validate_path(&name.file_path()).map_err(|e| e.to_string())?;
    let event_dir = validate_path(&format!("events/{name}")).map_err(|e| e.to_string())?;
    let append = |record: HistoryRecord| {
        if let Err(e) = dir.append_sync(&history_path, record.to_json_line().as_bytes()) {
            tracing::warn!(agent = %agent.name, event = %name, error = %e, "cannot append to history.jsonl");
        }
    };
    let drop_job = |reason: HistoryReason| {
        if !payload.missed {
            append(HistoryRecord::dropped(payload.due_at, now, job.id.clone(), reason));
        }
        Ok(None)
    };

    let bytes = match read_event_file(dir, &file_path) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => {
            // Gone: record it only if the event's folder is still there.
            if matches!(dir.kind(&event_dir), Ok(Some(EntryKind::Dir))) {
                return drop_job(HistoryReason::FileGone);
            }
            return Ok(None);
        }
        Err(_) => return drop_job(HistoryReason::FileInvalid),
    };
    let sha = sha256_hex(&bytes);
    let retry = payload.done_sha256.as_deref() == Some(sha.as_str());
    if sha != payload.file_sha256 && !retry {
        return drop_job(HistoryReason::FileChanged);
    }
    let Ok(event) = Event::parse(&bytes, &timezone) else {
        return drop_job(HistoryReason::FileInvalid);
    };
    let recorded = history_mentions(dir, &history_path, &job.id);
    if payload.missed {
        if !recorded {
            append(HistoryRecord::missed(payload.due_at, now, Some(job.id.clone())));
        }
        return Ok(None);
    }
    if event.is_done() && !retry {
        return drop_job(HistoryReason::Done);
    }
    if !recorded {
        append(HistoryRecord::fired(payload.due_at, now, job.id.clone()));
    }
    if !retry
        && matches!(event.event_type(), EventType::Immediate | EventType::OneShot)
        && let Some(done) = mark_done(&bytes)
        && let Err(e) = dir.write_atomic(&file_path, &done)
    {
        tracing::warn!(agent = %agent.name, event = %name, error = %e, "cannot mark the event done");
    }
    let message = InboundMessage {
        channel: "event".into(),
        sender: "scheduler".into(),
        text: event_message(&name, &event),
        received_at: now,
        untrusted: Vec::new(),
    };
    Ok(Some(MessageJob { message, conversation: conversation_for(&job.session), run_key: None }))
}

/// Whether `history.jsonl` already has a line about job `job_id` (a retried
/// job appends nothing twice).
fn history_mentions(dir: &AgentDir, history: &RelPath, job_id: &str) -> bool {
    let needle = format!("\"job\":{}", serde_json::Value::from(job_id));
    dir.read(history, HISTORY_SCAN_BYTES_MAX)
        .is_ok_and(|bytes| String::from_utf8_lossy(&bytes).lines().any(|line| line.contains(&needle)))
}

/// The scheduler role: fires due timers by enqueueing event jobs. Sleeps
/// until the earliest timer (at most `SLEEP_MAX`), or until woken.
pub async fn run(state: AppState, mut shutdown: watch::Receiver<bool>) {
    tracing::info!("scheduler: firing event timers");
    loop {
        if *shutdown.borrow() {
            break;
        }
        let now = state.platform.now_ms();
        let mut wait = match fire_due(&state, now).await {
            Ok(round) if round.handled >= DUE_BATCH_MAX as usize && round.errors == 0 => continue,
            Ok(round) if round.errors == 0 => None,
            Ok(_) => Some(ERROR_SLEEP),
            Err(e) => {
                tracing::error!(error = %e, "scheduler: reading due timers failed; retrying in 1 s");
                Some(ERROR_SLEEP)
            }
        };
        if wait.is_none() {
            let next = state.platform.store.next_timer_ms().await.ok().flatten();
            let until = next.map(|t| Duration::from_millis((t - state.platform.now_ms()).max(0) as u64));
            wait = Some(until.unwrap_or(SLEEP_MAX).min(SLEEP_MAX));
        }
        tokio::select! {
            _ = tokio::time::sleep(wait.unwrap_or(SLEEP_MAX)) => {}
            _ = state.scheduler_wake.notified() => {}
            _ = shutdown.changed() => break,
        }
    }
}

/// What one round of `fire_due` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Due timers looked at.
    pub handled: usize,
    /// Jobs enqueued (fired or missed; duplicates not counted).
    pub enqueued: usize,
    pub errors: usize,
}

/// One round of the scheduler: handles every timer due at `now_ms` (up to
/// `DUE_BATCH_MAX`).
pub async fn fire_due(state: &AppState, now_ms: i64) -> Result<Round> {
    let rows = state.platform.store.due_timers(now_ms, DUE_BATCH_MAX).await?;
    let mut round = Round { handled: rows.len(), ..Round::default() };
    for row in &rows {
        match fire_one(state, row, now_ms).await {
            Ok(enqueued) => round.enqueued += usize::from(enqueued),
            Err(e) => {
                round.errors += 1;
                tracing::warn!(agent = %row.agent_id, event = %row.name, error = %e, "scheduler: handling a due timer failed");
            }
        }
    }
    Ok(round)
}

/// Handles one due timer; true when a new job was enqueued.
async fn fire_one(state: &AppState, row: &TimerRow, now_ms: i64) -> Result<bool> {
    let platform = &state.platform;
    let store = &platform.store;
    let Some(agent) = store.agent_by_id(&row.agent_id).await? else {
        store.replace_timers(&row.agent_id, &[]).await?;
        return Ok(false);
    };
    let resync = async || -> Result<bool> {
        platform.sync_event_timers(&agent, false).await?;
        Ok(false)
    };
    let Ok(name) = EventName::parse(&row.name) else { return resync().await };
    let timezone = platform.agent_timezone(&agent).await;
    let workspace = platform.storage.checkout(&agent.id).await?;
    let file_path = path(&name.file_path())?;
    let bytes = match read_event_file(&workspace.dir, &file_path) {
        Ok(Some(bytes)) if sha256_hex(&bytes) == row.file_sha256 => bytes,
        // Gone, unreadable or changed since the last sync: recompute.
        _ => return resync().await,
    };
    let Ok(event) = Event::parse(&bytes, &timezone) else { return resync().await };
    let now = ms_to_utc(now_ms);
    let grace = platform.late_grace();
    let timer =
        TimerState { last_fired_at: row.last_fired_ms.map(ms_to_utc), next_fire: row.next_fire_ms.map(ms_to_utc) };
    let decision = decide(&event, timer, now, grace);
    let after = timer.after(&event, decision, now, grace);
    let mut enqueued = false;
    if let Decision::Fire { due_at } | Decision::Missed { due_at } = decision {
        let missed = matches!(decision, Decision::Missed { .. });
        let done_sha256 = (!missed && event.event_type() != EventType::Periodic)
            .then(|| mark_done(&bytes).map(|done| sha256_hex(&done)))
            .flatten();
        let payload = EventJob {
            name: name.to_string(),
            event_type: event.event_type(),
            file_sha256: row.file_sha256.clone(),
            done_sha256,
            due_at,
            text: event.text().to_owned(),
            missed,
        };
        let job = NewJob {
            id: tinyfat_core::ids::new_ulid_string(ulid::Ulid::new()),
            dedup_key: dedup_key(agent.id.as_str(), &name, &event, &bytes, due_at),
            agent_id: agent.id.clone(),
            session: event.session().clone(),
            kind: JOB_KIND_EVENT.into(),
            payload: serde_json::to_string(&payload).map_err(|e| Error::Other(e.into()))?,
        };
        let answer = store.enqueue(job, platform.now_ms()).await?;
        enqueued = !answer.duplicate;
        if enqueued {
            tracing::info!(agent = %agent.name, event = %name, due_at = %due_at, missed, "scheduler: event job enqueued");
            state.wake.notify_one();
        }
    }
    store
        .record_fired(
            &agent.id,
            name.as_str(),
            &row.file_sha256,
            after.last_fired_at.map(|t| t.timestamp_millis()),
            after.next_fire.map(|t| t.timestamp_millis()),
            platform.now_ms(),
        )
        .await?;
    Ok(enqueued)
}

/// `GET /api/agents/{id}/schedule` (the wake manifest).
pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/api/agents/{id}/schedule", get(schedule))
}

async fn schedule(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<WakeManifest>, ApiError> {
    let agent = caller.agent(&state.platform, &id).await?;
    // Re-read the event files (read-only) so files written since the last
    // turn show; the last synced timers answer if that fails.
    match state.platform.sync_event_timers(&agent, false).await {
        Ok(_) => state.scheduler_wake.notify_one(),
        Err(e) => tracing::warn!(agent = %agent.name, error = %e, "re-reading event files for the manifest failed"),
    }
    Ok(Json(state.platform.wake_manifest(&agent).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, next_fire_ms: Option<i64>, updated_ms: i64) -> TimerRow {
        TimerRow {
            agent_id: tinyfat_core::AgentId::from_ulid(ulid::Ulid::nil()),
            name: name.to_owned(),
            event_type: "one-shot".to_owned(),
            next_fire_ms,
            last_fired_ms: None,
            file_sha256: "ab".to_owned(),
            state: "{}".to_owned(),
            error: None,
            updated_ms,
        }
    }

    #[test]
    fn timers_are_the_same_in_any_order_whatever_their_update_time() {
        let previous = [row("a", Some(5), 1), row("b", None, 1)];
        assert!(same_timers(&previous, &[row("b", None, 9), row("a", Some(5), 9)]));
        assert!(same_timers(&[], &[]));
        assert!(!same_timers(&previous, &[row("a", Some(6), 9), row("b", None, 9)]), "a new due time");
        assert!(!same_timers(&previous, &[row("a", Some(5), 9)]), "an event removed");
        assert!(!same_timers(&previous, &[row("a", Some(5), 9), row("c", None, 9)]), "an event renamed");
        let mut invalid = row("b", None, 9);
        invalid.error = Some("bad json".to_owned());
        assert!(!same_timers(&previous, &[row("a", Some(5), 9), invalid]), "an event broken");
    }
}
