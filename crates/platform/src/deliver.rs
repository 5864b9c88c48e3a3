//! The delivery loop: sends what the delivery table holds. Each row was
//! recorded with its idempotency key before any send; a row is claimed
//! (`sending`) before its send, and a send that crashed is retried after the
//! stale window with the same key, so the provider deduplicates it.
//!
//! Channels: `web` and `cli` are delivered by the stream that carried the run
//! (a web client that reconnects reads the reply from the run replay), so
//! their rows are recorded as sent (`is_streamed`, `NewDelivery::by_stream`)
//! and this loop never takes them; one left pending by an older version is
//! marked sent when taken. Other channels need their adapter; until one is
//! configured, the row fails visibly with the reason.
//!
//! Email replies and `send_message` emails are first sent inline by the
//! worker that recorded them, under the agent's lease, so it can file them
//! in `outbox/sent/` (`email::replies`); this loop leaves such a row alone
//! for `INLINE_GRACE_MS` after it was recorded and takes it only if it is
//! still unsent then (the worker died, or a retry is due).

use std::time::Duration;

use tinyfat_store::Delivery;
use tokio::sync::watch;

use crate::email::SendError;
use crate::state::AppState;

const DUE_BATCH_MAX: u32 = 100;
const IDLE_SLEEP: Duration = Duration::from_millis(500);
/// A row left `sending` this long was abandoned by a crashed process.
const SENDING_STALE_MS: i64 = 60_000;
/// How long a new email reply is left to the worker that sends it inline.
const INLINE_GRACE_MS: i64 = 5_000;

/// Channels whose replies reach their reader through the run's own stream.
pub fn is_streamed(channel: &str) -> bool {
    matches!(channel, "web" | "cli")
}

/// A first send the recording worker makes inline (see the module header).
fn left_to_the_worker(delivery: &Delivery, now: i64) -> bool {
    let key = &delivery.idempotency_key;
    delivery.channel == "email"
        && delivery.attempts == 0
        // The platform's own mail (provisioning) has no worker to send it.
        && delivery.agent_id != crate::email::provision::platform_agent_id()
        && !key.starts_with("outbox:")
        && !key.starts_with("error:")
        && now - delivery.created_ms < INLINE_GRACE_MS
}

pub async fn run(state: AppState, mut shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        let now = state.platform.now_ms();
        let due = match state.platform.store.due_deliveries(now, DUE_BATCH_MAX).await {
            Ok(due) => due,
            Err(e) => {
                tracing::error!(error = %e, "reading due deliveries failed");
                Vec::new()
            }
        };
        for delivery in due.iter().filter(|d| !left_to_the_worker(d, now)) {
            deliver(&state, delivery).await;
        }
        if due.len() < DUE_BATCH_MAX as usize {
            tokio::select! {
                _ = tokio::time::sleep(IDLE_SLEEP) => {}
                _ = state.deliveries_wake.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Claims, sends and records one delivery (also used by the worker to send
/// email replies inline under the lease, see `email::replies`).
pub(crate) async fn deliver(state: &AppState, delivery: &Delivery) {
    let store = &state.platform.store;
    let now = state.platform.now_ms();
    // Web and terminal rows have no external side effect to protect from a
    // double send: a row a crash left `sending` is reclaimed at once.
    let stale_ms = if is_streamed(&delivery.channel) { 1 } else { SENDING_STALE_MS };
    match store.mark_delivery_sending(&delivery.id, now, stale_ms).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::error!(error = %e, delivery = %delivery.id, "claiming a delivery failed");
            return;
        }
    }
    let sent = match delivery.channel.as_str() {
        channel if is_streamed(channel) => Ok(None),
        "email" => crate::email::send(state, delivery).await,
        other => Err(SendError::Permanent(format!("no {other} adapter is configured on this server"))),
    };
    let now = state.platform.now_ms();
    match sent {
        Ok(provider_id) => {
            let _ = store.mark_delivery_sent(&delivery.id, provider_id.as_deref(), now).await;
            state.metrics.deliveries_sent_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Err(SendError::Transient { error, retry_after_ms }) => {
            let backoff = retry_after_ms.unwrap_or_else(|| {
                // The queue's backoff (base 2 s, cap 10 min, full jitter), per send attempt.
                tinyfat_store::backoff_ms(&tinyfat_store::QueuePolicy::default(), delivery.attempts, rand::random())
            });
            tracing::warn!(delivery = %delivery.id, channel = %delivery.channel, error = %error, retry_in_ms = backoff, "delivery failed; will retry");
            let _ = store.mark_delivery_failed(&delivery.id, &error, Some(now + backoff), now).await;
        }
        Err(SendError::Permanent(error)) => {
            tracing::warn!(delivery = %delivery.id, channel = %delivery.channel, error = %error, "delivery failed");
            let _ = store.mark_delivery_failed(&delivery.id, &error, None, now).await;
            state.metrics.deliveries_failed_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
