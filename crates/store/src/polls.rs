//! Channel pollers' shared state (IMAP; usable by any poller): a lease per
//! agent and channel, so that one process polls a mailbox while several
//! `serve` processes run, and the poller's cursor, so that a restart picks
//! up where the last poller stopped.
//!
//! This module owns the meaning and holds no SQL (each backend implements
//! `Polls`). The cursor is opaque text to the store. Fencing: a cursor is
//! saved only by the lease's current owner while the lease is unexpired, so
//! a poller that lost its lease (paused, partitioned) cannot move the cursor
//! of its successor. Duplicates after a lost lease are the job queue's dedup
//! keys' business, not this module's.

use async_trait::async_trait;
use tinyfat_core::AgentId;

use crate::Result;

#[async_trait]
pub trait Polls: Send + Sync + std::fmt::Debug {
    /// Takes or renews the poll lease of (`agent`, `channel`) for `owner`
    /// until `now_ms + ttl_ms`, when it is free, expired or already
    /// `owner`'s. Returns the saved cursor (`Some("")` when none was saved
    /// yet) when the lease is held, `None` when another owner holds it.
    async fn claim_poll(
        &self,
        agent: &AgentId,
        channel: &str,
        owner: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<String>>;
    /// Saves the cursor if `owner` still holds an unexpired lease; `false`
    /// otherwise (the lease was lost: stop polling).
    async fn save_poll_cursor(
        &self,
        agent: &AgentId,
        channel: &str,
        owner: &str,
        cursor: &str,
        now_ms: i64,
    ) -> Result<bool>;
    /// Gives the lease up (expires it now) if `owner` holds it; the cursor stays.
    async fn release_poll(&self, agent: &AgentId, channel: &str, owner: &str, now_ms: i64) -> Result<()>;
    /// The agents that hold a secret of this name (a poller's credential,
    /// e.g. `imap_password`), ordered by id: where pollers look for work.
    async fn agents_with_secret(&self, name: &str) -> Result<Vec<AgentId>>;
}
