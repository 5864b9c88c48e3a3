//! Retention of finished jobs. A done job's row is deleted once its dedup
//! key has expired (`queue.dedup_ttl` after the job's creation; the row is
//! what holds the key, so deleting it earlier would let a provider's late
//! redelivery run twice). Nothing else reads an old done job: the
//! conversation is in the session file and the replies in the delivery table.
//!
//! Must not: delete a job that is not done (dead letters stay until an
//! operator replays or purges them), nor one whose key is still held.

use std::time::Duration;

use tokio::sync::watch;

use crate::state::AppState;

/// How often the retention pass runs (and once at start).
const EVERY: Duration = Duration::from_secs(3600);
/// Most rows one delete takes: short write transactions between enqueues.
const DELETE_BATCH_MAX: u32 = 1000;
/// Pause between two full deletes, so a large backlog (the first pass after
/// an upgrade) leaves the write lock to enqueues most of the time.
const BETWEEN_BATCHES: Duration = Duration::from_millis(50);

/// Deletes every done job whose dedup key has expired; answers how many.
pub async fn purge_expired_done(state: &AppState) -> tinyfat_store::Result<u64> {
    let now_ms = state.platform.now_ms();
    let mut deleted = 0;
    loop {
        let batch = state.platform.store.purge_done(now_ms, DELETE_BATCH_MAX).await?;
        deleted += batch;
        if batch < u64::from(DELETE_BATCH_MAX) {
            return Ok(deleted);
        }
        tokio::time::sleep(BETWEEN_BATCHES).await;
    }
}

pub async fn run(state: AppState, mut shutdown: watch::Receiver<bool>) {
    loop {
        match purge_expired_done(&state).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "retention: deleted done jobs older than queue.dedup_ttl"),
            Err(error) => tracing::warn!(%error, "retention: deleting old done jobs failed; retrying in an hour"),
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}
