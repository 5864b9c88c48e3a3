//! `Deliveries` and `UsageLedger` for SQLite.
//!
//! Each method is one statement (plus a read for the insert's answer), so it
//! is atomic on its own; conditional updates (`WHERE state IN (...)`) make a
//! claim or a state change happen at most once across processes. Nothing here
//! sends anything or knows a channel's format.

use async_trait::async_trait;
use chrono::NaiveDate;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use tinyfat_core::AgentId;
use tinyfat_core::message::Usage;

use super::{SqliteStore, conflict};
use crate::queue::clip_error;
use crate::{Deliveries, Delivery, DeliveryState, InsertedDelivery, NewDelivery, Result, StoreError, UsageLedger};

macro_rules! delivery_columns {
    () => {
        "id, idempotency_key, agent_id, job_id, channel, target, body, state, attempts, next_attempt_ms, \
         last_error, provider_message_id, created_ms, updated_ms"
    };
}

fn delivery_from_row(row: &SqliteRow) -> Result<Delivery> {
    Ok(Delivery {
        id: row.try_get("id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        agent_id: AgentId::parse(row.try_get("agent_id")?)
            .map_err(|e| StoreError::Corrupt(format!("delivery agent id: {e}")))?,
        job_id: row.try_get("job_id")?,
        channel: row.try_get("channel")?,
        target: row.try_get("target")?,
        body: row.try_get("body")?,
        state: DeliveryState::parse(row.try_get("state")?)?,
        attempts: u32::try_from(row.try_get::<i64, _>("attempts")?.max(0)).unwrap_or(u32::MAX),
        next_attempt_ms: row.try_get("next_attempt_ms")?,
        last_error: row.try_get("last_error")?,
        provider_message_id: row.try_get("provider_message_id")?,
        created_ms: row.try_get("created_ms")?,
        updated_ms: row.try_get("updated_ms")?,
    })
}

#[async_trait]
impl Deliveries for SqliteStore {
    async fn insert_delivery(&self, delivery: &NewDelivery, now_ms: i64) -> Result<InsertedDelivery> {
        delivery.validate()?;
        let mut conn = self.pool.acquire().await?;
        let inserted = insert_delivery(&mut conn, delivery, now_ms).await?;
        let row = sqlx::query(concat!("SELECT ", delivery_columns!(), " FROM deliveries WHERE idempotency_key = ?"))
            .bind(&delivery.idempotency_key)
            .fetch_one(&mut *conn)
            .await?;
        Ok(InsertedDelivery { delivery: delivery_from_row(&row)?, inserted })
    }

    async fn get_delivery(&self, id: &str) -> Result<Option<Delivery>> {
        let row = sqlx::query(concat!("SELECT ", delivery_columns!(), " FROM deliveries WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(delivery_from_row).transpose()
    }

    async fn due_deliveries(&self, now_ms: i64, limit: u32) -> Result<Vec<Delivery>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM deliveries WHERE state IN ('pending', 'sending') AND next_attempt_ms <= ?1 \
             ORDER BY next_attempt_ms, id LIMIT ?2"
        ))
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(delivery_from_row).collect()
    }

    async fn mark_delivery_sending(&self, id: &str, now_ms: i64, stale_after_ms: i64) -> Result<bool> {
        if stale_after_ms <= 0 {
            return Err(StoreError::Invalid(format!("stale_after_ms must be positive, got {stale_after_ms}")));
        }
        let done = sqlx::query(
            "UPDATE deliveries SET state = 'sending', attempts = attempts + 1, next_attempt_ms = ?1, \
             updated_ms = ?2 WHERE id = ?3 AND state IN ('pending', 'sending') AND next_attempt_ms <= ?2",
        )
        .bind(now_ms.saturating_add(stale_after_ms))
        .bind(now_ms)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn mark_delivery_sent(&self, id: &str, provider_message_id: Option<&str>, now_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE deliveries SET state = 'sent', provider_message_id = ?1, updated_ms = ?2 \
             WHERE id = ?3 AND state IN ('pending', 'sending')",
        )
        .bind(provider_message_id)
        .bind(now_ms)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn mark_delivery_failed(&self, id: &str, error: &str, retry_at_ms: Option<i64>, now_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE deliveries SET state = CASE WHEN ?1 IS NULL THEN 'failed' ELSE 'pending' END, \
             next_attempt_ms = COALESCE(?1, next_attempt_ms), last_error = ?2, updated_ms = ?3 \
             WHERE id = ?4 AND state IN ('pending', 'sending')",
        )
        .bind(retry_at_ms)
        .bind(clip_error(error))
        .bind(now_ms)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn deliveries_for(&self, agent: &AgentId, limit: u32) -> Result<Vec<Delivery>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM deliveries WHERE agent_id = ? ORDER BY created_ms DESC, id DESC LIMIT ?"
        ))
        .bind(agent.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(delivery_from_row).collect()
    }

    async fn deliveries_on(&self, agent: &AgentId, channel: &str, limit: u32) -> Result<Vec<Delivery>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM deliveries WHERE agent_id = ? AND channel = ? ORDER BY created_ms DESC, id DESC LIMIT ?"
        ))
        .bind(agent.as_str())
        .bind(channel)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(delivery_from_row).collect()
    }
}

/// Token counts are `u64` in Rust and `INTEGER` (i64) in SQLite.
fn to_db(tokens: u64) -> i64 {
    i64::try_from(tokens).unwrap_or(i64::MAX)
}

fn usage_from_row(row: &SqliteRow) -> Result<Usage> {
    let get = |name: &str| -> Result<u64> {
        let value: i64 = row.try_get(name)?;
        u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("usage {name} is {value}")))
    };
    Ok(Usage {
        input_tokens: get("input_tokens")?,
        output_tokens: get("output_tokens")?,
        cache_creation_input_tokens: get("cache_creation_input_tokens")?,
        cache_read_input_tokens: get("cache_read_input_tokens")?,
    })
}

#[async_trait]
impl UsageLedger for SqliteStore {
    async fn add_usage(&self, agent: &AgentId, day: NaiveDate, usage: &Usage) -> Result<()> {
        sqlx::query(
            "INSERT INTO usage_daily (agent_id, day, input_tokens, output_tokens, cache_creation_input_tokens, \
             cache_read_input_tokens) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
             ON CONFLICT (agent_id, day) DO UPDATE SET \
             input_tokens = input_tokens + excluded.input_tokens, \
             output_tokens = output_tokens + excluded.output_tokens, \
             cache_creation_input_tokens = cache_creation_input_tokens + excluded.cache_creation_input_tokens, \
             cache_read_input_tokens = cache_read_input_tokens + excluded.cache_read_input_tokens",
        )
        .bind(agent.as_str())
        .bind(day.to_string())
        .bind(to_db(usage.input_tokens))
        .bind(to_db(usage.output_tokens))
        .bind(to_db(usage.cache_creation_input_tokens))
        .bind(to_db(usage.cache_read_input_tokens))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn usage_for(&self, agent: &AgentId, day: NaiveDate) -> Result<Usage> {
        let row = sqlx::query(
            "SELECT input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens \
             FROM usage_daily WHERE agent_id = ? AND day = ?",
        )
        .bind(agent.as_str())
        .bind(day.to_string())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(usage_from_row).transpose()?.unwrap_or_default())
    }

    async fn usage_history(&self, agent: &AgentId, days_max: u32) -> Result<Vec<(NaiveDate, Usage)>> {
        let rows = sqlx::query(
            "SELECT day, input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens \
             FROM usage_daily WHERE agent_id = ? ORDER BY day DESC LIMIT ?",
        )
        .bind(agent.as_str())
        .bind(i64::from(days_max))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let day: String = row.try_get("day")?;
                let day = day.parse::<NaiveDate>().map_err(|e| StoreError::Corrupt(format!("usage day {day}: {e}")))?;
                Ok((day, usage_from_row(row)?))
            })
            .collect()
    }
}

/// Inserts one delivery on `conn` (a pooled connection or a transaction),
/// unless its idempotency key is already recorded; true if inserted. The
/// caller validated it.
pub(super) async fn insert_delivery(conn: &mut SqliteConnection, delivery: &NewDelivery, now_ms: i64) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO deliveries (id, idempotency_key, agent_id, job_id, channel, target, body, state, \
             attempts, next_attempt_ms, created_ms, updated_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?9, 0, ?8, ?8, ?8) \
             ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(&delivery.id)
    .bind(&delivery.idempotency_key)
    .bind(delivery.agent_id.as_str())
    .bind(&delivery.job_id)
    .bind(&delivery.channel)
    .bind(&delivery.target)
    .bind(&delivery.body)
    .bind(now_ms)
    .bind(if delivery.by_stream { DeliveryState::Sent } else { DeliveryState::Pending }.as_str())
    .execute(&mut *conn)
    .await
    .map_err(|e| conflict(e, &[("deliveries.id", "delivery id")]))?;
    Ok(done.rows_affected() == 1)
}
