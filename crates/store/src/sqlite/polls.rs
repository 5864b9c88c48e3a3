//! SQLite implementation of `Polls` (the `channel_polls` table of migration
//! 0006) and the secret lookup pollers use to find their agents.

use async_trait::async_trait;
use sqlx::Row;
use tinyfat_core::AgentId;

use super::SqliteStore;
use crate::polls::Polls;
use crate::{Result, StoreError};

#[async_trait]
impl Polls for SqliteStore {
    async fn claim_poll(
        &self,
        agent: &AgentId,
        channel: &str,
        owner: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<String>> {
        // One statement: insert, or take over a free/expired/own lease.
        let row = sqlx::query(
            "INSERT INTO channel_polls (agent_id, channel, owner, lease_until_ms, cursor, updated_ms) \
             VALUES (?, ?, ?, ?, '', ?) \
             ON CONFLICT (agent_id, channel) DO UPDATE SET owner = excluded.owner, \
             lease_until_ms = excluded.lease_until_ms \
             WHERE channel_polls.owner = excluded.owner OR channel_polls.lease_until_ms <= ? \
             RETURNING cursor",
        )
        .bind(agent.as_str())
        .bind(channel)
        .bind(owner)
        .bind(now_ms.saturating_add(ttl_ms))
        .bind(now_ms)
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(Some(row.try_get("cursor")?)),
            None => Ok(None),
        }
    }

    async fn save_poll_cursor(
        &self,
        agent: &AgentId,
        channel: &str,
        owner: &str,
        cursor: &str,
        now_ms: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE channel_polls SET cursor = ?, updated_ms = ? \
             WHERE agent_id = ? AND channel = ? AND owner = ? AND lease_until_ms > ?",
        )
        .bind(cursor)
        .bind(now_ms)
        .bind(agent.as_str())
        .bind(channel)
        .bind(owner)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_poll(&self, agent: &AgentId, channel: &str, owner: &str, now_ms: i64) -> Result<()> {
        sqlx::query("UPDATE channel_polls SET lease_until_ms = ? WHERE agent_id = ? AND channel = ? AND owner = ?")
            .bind(now_ms)
            .bind(agent.as_str())
            .bind(channel)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn agents_with_secret(&self, name: &str) -> Result<Vec<AgentId>> {
        let rows = sqlx::query("SELECT agent_id FROM secrets WHERE name = ? ORDER BY agent_id")
            .bind(name)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("agent_id")?;
                AgentId::parse(&id).map_err(|e| StoreError::Corrupt(format!("secret agent id: {e}")))
            })
            .collect()
    }
}
