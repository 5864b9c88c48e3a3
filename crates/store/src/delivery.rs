//! Outbound deliveries (replies and outbox messages) and per-agent daily token
//! usage, as callers see them: the `Deliveries` and `UsageLedger` traits and
//! their row types.
//!
//! A delivery row is written before anything is sent, under an idempotency
//! key decided before the send (`reply:{job_id}`, `{job_id}:{tool_use_id}`),
//! so a retried turn finds the row instead of sending twice. This module
//! holds no SQL and knows no provider: `channel`, `target` and `body` are
//! opaque to it (JSON text the delivery adapters write and read).

use async_trait::async_trait;
use chrono::NaiveDate;
use tinyfat_core::AgentId;
use tinyfat_core::message::Usage;

use crate::{Result, StoreError};

/// Longest idempotency key accepted.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 1024;
/// Largest delivery body (JSON text).
pub const DELIVERY_BODY_BYTES_MAX: usize = 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryState {
    /// Waiting for its first send or a retry (`next_attempt_ms`).
    Pending,
    /// Claimed by a sender. If still `sending` at `next_attempt_ms` (the
    /// sender crashed), it is due again: at-least-once, with the same ids.
    Sending,
    Sent,
    /// Given up; `last_error` says why.
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sending => "sending",
            Self::Sent => "sent",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "pending" => Self::Pending,
            "sending" => Self::Sending,
            "sent" => Self::Sent,
            "failed" => Self::Failed,
            other => return Err(StoreError::Corrupt(format!("delivery state {other:?}"))),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewDelivery {
    /// A ULID the caller made; also the provider idempotency key's suffix.
    pub id: String,
    pub idempotency_key: String,
    pub agent_id: AgentId,
    /// The job whose turn produced it, if any.
    pub job_id: Option<String>,
    /// `email`, `telegram`, `slack`, `web`, ...
    pub channel: String,
    /// JSON text: where it goes.
    pub target: String,
    /// JSON text: what is sent.
    pub body: String,
    /// Delivered by the stream that carried the run (web chat, the
    /// terminal): recorded as `sent` at once, so the delivery loop never
    /// takes it (a reader that missed the stream reads the run's replay).
    pub by_stream: bool,
}

impl NewDelivery {
    pub fn validate(&self) -> Result<()> {
        let invalid = |what: String| Err(StoreError::Invalid(what));
        if self.id.is_empty() || self.id.len() > 64 {
            return invalid(format!("delivery id {:?}", self.id));
        }
        if self.idempotency_key.is_empty() || self.idempotency_key.len() > IDEMPOTENCY_KEY_BYTES_MAX {
            return invalid(format!("idempotency key must be 1..={IDEMPOTENCY_KEY_BYTES_MAX} bytes"));
        }
        if self.channel.is_empty() || self.channel.len() > 64 {
            return invalid("delivery channel must be 1..=64 bytes".to_owned());
        }
        if self.body.len() + self.target.len() > DELIVERY_BODY_BYTES_MAX {
            return invalid(format!("delivery over {DELIVERY_BODY_BYTES_MAX} bytes"));
        }
        for (what, text) in [("target", &self.target), ("body", &self.body)] {
            if serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() {
                return invalid(format!("delivery {what} is not JSON"));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub id: String,
    pub idempotency_key: String,
    pub agent_id: AgentId,
    pub job_id: Option<String>,
    pub channel: String,
    pub target: String,
    pub body: String,
    pub state: DeliveryState,
    /// Sends started (`mark_delivery_sending` calls that won).
    pub attempts: u32,
    pub next_attempt_ms: i64,
    pub last_error: Option<String>,
    pub provider_message_id: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// The answer to `insert_delivery`: the row under that key, and whether this
/// call created it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InsertedDelivery {
    pub delivery: Delivery,
    pub inserted: bool,
}

#[async_trait]
pub trait Deliveries: Send + Sync + std::fmt::Debug {
    /// Inserts a pending delivery, due at `now_ms`. Idempotent on the key: a
    /// second insert with the same key returns the existing row unchanged.
    async fn insert_delivery(&self, delivery: &NewDelivery, now_ms: i64) -> Result<InsertedDelivery>;
    async fn get_delivery(&self, id: &str) -> Result<Option<Delivery>>;
    /// Pending deliveries due by `now_ms`, and `sending` ones whose sender
    /// went quiet past their `next_attempt_ms`, oldest due first.
    async fn due_deliveries(&self, now_ms: i64, limit: u32) -> Result<Vec<Delivery>>;
    /// Claims a due delivery for sending: `sending`, attempts + 1, due again
    /// at `now_ms + stale_after_ms` should the sender vanish. `false`: not
    /// due, or another sender claimed it first.
    async fn mark_delivery_sending(&self, id: &str, now_ms: i64, stale_after_ms: i64) -> Result<bool>;
    /// `false`: the delivery was already sent or failed (or does not exist).
    async fn mark_delivery_sent(&self, id: &str, provider_message_id: Option<&str>, now_ms: i64) -> Result<bool>;
    /// `retry_at_ms = Some(t)`: a transient failure, pending again at `t`;
    /// `None`: given up (`failed`). `error` is kept either way.
    async fn mark_delivery_failed(&self, id: &str, error: &str, retry_at_ms: Option<i64>, now_ms: i64) -> Result<bool>;
    /// An agent's deliveries, newest first.
    async fn deliveries_for(&self, agent: &AgentId, limit: u32) -> Result<Vec<Delivery>>;
    /// An agent's deliveries on one channel, newest first (an index serves
    /// it: the other channels' rows are never read).
    async fn deliveries_on(&self, agent: &AgentId, channel: &str, limit: u32) -> Result<Vec<Delivery>>;
}

/// Per-agent token usage by UTC day, for the daily budget and the dashboard.
#[async_trait]
pub trait UsageLedger: Send + Sync + std::fmt::Debug {
    /// Adds `usage` to the agent's total for `day` (a UTC date).
    async fn add_usage(&self, agent: &AgentId, day: NaiveDate, usage: &Usage) -> Result<()>;
    /// The agent's total for `day`; zero when nothing was recorded.
    async fn usage_for(&self, agent: &AgentId, day: NaiveDate) -> Result<Usage>;
    /// The agent's most recent `days_max` days with usage, newest first.
    async fn usage_history(&self, agent: &AgentId, days_max: u32) -> Result<Vec<(NaiveDate, Usage)>>;
}
