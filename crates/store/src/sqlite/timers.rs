//! SQLite implementation of `Timers` (the `timers` table of migration 0003).

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use tinyfat_core::AgentId;

use super::{BEGIN_IMMEDIATE, SqliteStore};
use crate::timers::{TimerRow, Timers};
use crate::{Result, StoreError};

const COLUMNS: &str = "agent_id, name, event_type, next_fire_ms, last_fired_ms, file_sha256, state, error, updated_ms";

fn timer_from_row(row: &SqliteRow) -> Result<TimerRow> {
    Ok(TimerRow {
        agent_id: AgentId::parse(row.try_get("agent_id")?)
            .map_err(|e| StoreError::Corrupt(format!("timer agent id: {e}")))?,
        name: row.try_get("name")?,
        event_type: row.try_get("event_type")?,
        next_fire_ms: row.try_get("next_fire_ms")?,
        last_fired_ms: row.try_get("last_fired_ms")?,
        file_sha256: row.try_get("file_sha256")?,
        state: row.try_get("state")?,
        error: row.try_get("error")?,
        updated_ms: row.try_get("updated_ms")?,
    })
}

#[async_trait]
impl Timers for SqliteStore {
    async fn replace_timers(&self, agent: &AgentId, rows: &[TimerRow]) -> Result<()> {
        if let Some(other) = rows.iter().find(|r| &r.agent_id != agent) {
            return Err(StoreError::Invalid(format!("timer {:?} belongs to another agent", other.name)));
        }
        let mut tx = self.pool.begin_with(BEGIN_IMMEDIATE).await?;
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        let names_json = serde_json::to_string(&names).expect("names serialise");
        sqlx::query("DELETE FROM timers WHERE agent_id = ? AND name NOT IN (SELECT value FROM json_each(?))")
            .bind(agent.as_str())
            .bind(names_json)
            .execute(&mut *tx)
            .await?;
        for row in rows {
            sqlx::query(
                "INSERT INTO timers (agent_id, name, event_type, next_fire_ms, last_fired_ms, file_sha256, state, \
                 error, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (agent_id, name) DO UPDATE SET event_type = excluded.event_type, \
                 next_fire_ms = excluded.next_fire_ms, last_fired_ms = excluded.last_fired_ms, \
                 file_sha256 = excluded.file_sha256, state = excluded.state, error = excluded.error, \
                 updated_ms = excluded.updated_ms",
            )
            .bind(agent.as_str())
            .bind(&row.name)
            .bind(&row.event_type)
            .bind(row.next_fire_ms)
            .bind(row.last_fired_ms)
            .bind(&row.file_sha256)
            .bind(&row.state)
            .bind(&row.error)
            .bind(row.updated_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn timers_for(&self, agent: &AgentId) -> Result<Vec<TimerRow>> {
        let sql = format!("SELECT {COLUMNS} FROM timers WHERE agent_id = ? ORDER BY name");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(agent.as_str()).fetch_all(&self.pool).await?;
        rows.iter().map(timer_from_row).collect()
    }

    async fn due_timers(&self, now_ms: i64, limit: u32) -> Result<Vec<TimerRow>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM timers WHERE next_fire_ms IS NOT NULL AND next_fire_ms <= ? \
             ORDER BY next_fire_ms, agent_id, name LIMIT ?"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now_ms).bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(timer_from_row).collect()
    }

    async fn next_timer_ms(&self) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT min(next_fire_ms) AS next FROM timers WHERE next_fire_ms IS NOT NULL")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("next")?)
    }

    async fn record_fired(
        &self,
        agent: &AgentId,
        name: &str,
        file_sha256: &str,
        last_fired_ms: Option<i64>,
        next_fire_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE timers SET last_fired_ms = ?, next_fire_ms = ?, updated_ms = ? \
             WHERE agent_id = ? AND name = ? AND file_sha256 = ?",
        )
        .bind(last_fired_ms)
        .bind(next_fire_ms)
        .bind(now_ms)
        .bind(agent.as_str())
        .bind(name)
        .bind(file_sha256)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
