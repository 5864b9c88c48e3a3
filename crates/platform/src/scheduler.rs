//! Scheduled wake-ups (SPEC §5 events, the wake manifest; §1 scheduler role).
//!
//! Hooks the worker and `serve` call:
//! - `prepare_event_job`: under the agent's lease, turn an `event` job into
//!   the message the agent receives, or drop it.
//! - `sync_timers`: after every turn, sync the agent's event files into the
//!   timers table.
//! - `run`: the scheduler role.

use tinyfat_store::{Agent, Job};
use tokio::sync::watch;

use crate::inbound::MessageJob;
use crate::state::AppState;

pub const JOB_KIND_EVENT: &str = "event";

/// Re-reads the event under the lease; `Ok(None)` drops the job (the file is
/// gone or changed since it was scheduled).
pub async fn prepare_event_job(_state: &AppState, _agent: &Agent, job: &Job) -> Result<Option<MessageJob>, String> {
    Err(format!("event job {} cannot run: the scheduler is not available in this version", job.id))
}

/// Syncs the agent's event files into the timers table (after every turn).
pub async fn sync_timers(_state: &AppState, _agent: &Agent) {}

/// The scheduler role: fires due timers by enqueueing event jobs.
pub async fn run(_state: AppState, mut shutdown: watch::Receiver<bool>) {
    tracing::info!("scheduler: not available in this version; events are not fired yet");
    let _ = shutdown.changed().await;
}

/// `GET /api/agents/{id}/schedule` (the wake manifest).
pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
}
