//! The email channel's platform side (SPEC §8, §5 outbox, §9): inbound
//! routes and listeners, the outbox, and sending deliveries.
//!
//! Hooks the worker, the delivery loop and `serve` call:
//! - `routes`: `POST /webhooks/resend`.
//! - `process_outbox`: under the lease, after each turn and first when a job
//!   is retried.
//! - `send`: deliver one `email` row of the delivery table.
//! - `start`: the SMTP listener and IMAP pollers, when configured.

use axum::Router;
use tinyfat_store::{Agent, Delivery, Lease};
use tokio::sync::watch;

use crate::state::AppState;

/// Why a send failed: retry later, or give up with the provider's error.
#[derive(Debug)]
pub enum SendError {
    Transient { error: String, retry_after_ms: Option<i64> },
    Permanent(String),
}

pub fn routes() -> Router<AppState> {
    Router::new()
}

/// Claims and sends the agent's outbox files (fenced by `lease`).
pub async fn process_outbox(_state: &AppState, _agent: &Agent, _lease: &Lease) {}

/// Sends one email delivery; returns the provider's message id.
pub async fn send(_state: &AppState, _delivery: &Delivery) -> Result<Option<String>, SendError> {
    Err(SendError::Permanent("no email provider is configured on this server".into()))
}

/// Starts the SMTP listener and IMAP pollers that the settings enable.
pub async fn start(_state: AppState, _shutdown: watch::Receiver<bool>) {}
