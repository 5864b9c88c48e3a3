//! `JobQueue` for SQLite: claims with per-agent leases and fencing epochs,
//! renewal, finishing a turn, dead letters and queue metrics.
//!
//! Every read-then-write runs in one `BEGIN IMMEDIATE` transaction, so the
//! check (no live lease, epoch still current) and the write it justifies are
//! atomic across processes sharing the database. This module decides no
//! policy of its own: failure rules and backoff come from `crate::queue`.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use tinyfat_core::{AgentId, SessionId};

use super::{BEGIN_IMMEDIATE, SqliteStore};
use crate::queue::{LEASE_LOST_ERROR, LEASE_OWNER_BYTES_MAX, clip_error, settle_failure};
use crate::{
    AgentQueueStatus, Claim, Enqueued, Job, JobOutcome, JobQueue, JobState, Lease, NewDelivery, NewJob, Outcome,
    QueueCounts, Result, Settled, StoreError,
};

/// Agents one claim may look at before it gives up for this call. Only an
/// agent whose every due job was dead-lettered on takeover is passed over,
/// so this bound is rarely reached.
const CLAIM_SCAN_MAX: usize = 16;

macro_rules! job_columns {
    () => {
        "id, dedup_key, agent_id, session, kind, payload, state, attempts, failures, next_run_at_ms, \
         lease_owner, lease_expires_ms, last_error, first_failure_ms, created_ms, updated_ms"
    };
}

/// A candidate row (`Candidate`): the job's agent, and whether that agent
/// has jobs `running` (under a lapsed lease, since its lease is not live).
macro_rules! candidate_columns {
    () => {
        "SELECT j.agent_id, EXISTS (SELECT 1 FROM jobs r WHERE r.agent_id = j.agent_id AND r.state = 'running') \
         FROM jobs j"
    };
}

/// The oldest due job whose agent holds no live lease: a queued job due by
/// now, or a job still `running` under a lease that lapsed (its worker is
/// gone). `state IN (...)` repeats the `jobs_active` index's condition so the
/// scan walks that index in due order.
const CANDIDATE_SQL: &str = concat!(
    candidate_columns!(),
    " WHERE j.state IN ('queued', 'running') AND (j.state = 'running' OR j.next_run_at_ms <= ?1) \
     AND NOT EXISTS (SELECT 1 FROM agent_leases l WHERE l.agent_id = j.agent_id \
                     AND l.owner IS NOT NULL AND l.expires_ms > ?1) \
     ORDER BY j.next_run_at_ms, j.id LIMIT 1"
);

/// `CANDIDATE_SQL` for one agent: it has a due (or orphaned running) job and
/// no live lease.
const AGENT_CANDIDATE_SQL: &str = concat!(
    candidate_columns!(),
    " WHERE j.agent_id = ?2 AND j.state IN ('queued', 'running') AND (j.state = 'running' OR j.next_run_at_ms <= ?1) \
     AND NOT EXISTS (SELECT 1 FROM agent_leases l WHERE l.agent_id = j.agent_id \
                     AND l.owner IS NOT NULL AND l.expires_ms > ?1) \
     LIMIT 1"
);

/// An agent a claim may take, and whether it has jobs left `running` by a
/// lease that lapsed (orphans to recover first).
type Candidate = (String, bool);

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("job {what}: {e}"))
}

fn count(row_value: i64) -> u32 {
    u32::try_from(row_value.max(0)).unwrap_or(u32::MAX)
}

fn job_from_row(row: &SqliteRow) -> Result<Job> {
    Ok(Job {
        id: row.try_get("id")?,
        dedup_key: row.try_get("dedup_key")?,
        agent_id: AgentId::parse(row.try_get("agent_id")?).map_err(|e| corrupt("agent id", e))?,
        session: SessionId::parse(row.try_get("session")?).map_err(|e| corrupt("session", e))?,
        kind: row.try_get("kind")?,
        payload: row.try_get("payload")?,
        state: JobState::parse(row.try_get("state")?)?,
        attempts: count(row.try_get("attempts")?),
        failures: count(row.try_get("failures")?),
        next_run_at_ms: row.try_get("next_run_at_ms")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_ms: row.try_get("lease_expires_ms")?,
        last_error: row.try_get("last_error")?,
        first_failure_ms: row.try_get("first_failure_ms")?,
        created_ms: row.try_get("created_ms")?,
        updated_ms: row.try_get("updated_ms")?,
    })
}

fn check_owner(owner: &str) -> Result<()> {
    if owner.is_empty() || owner.len() > LEASE_OWNER_BYTES_MAX {
        return Err(StoreError::Invalid(format!("lease owner must be 1..={LEASE_OWNER_BYTES_MAX} bytes")));
    }
    Ok(())
}

fn check_lease_ms(lease_ms: i64) -> Result<()> {
    if lease_ms <= 0 {
        return Err(StoreError::Invalid(format!("lease duration must be positive, got {lease_ms} ms")));
    }
    Ok(())
}

/// Inside a claim transaction: leases the candidate's agent to `owner`,
/// recovers jobs a lost lease left running (when it has any), and takes the
/// batch. `None`: the agent has no due job left (its orphans were
/// dead-lettered); the lease is released.
async fn claim_agent(
    conn: &mut SqliteConnection,
    store: &SqliteStore,
    (agent_id, orphans): &Candidate,
    owner: &str,
    now_ms: i64,
    lease_ms: i64,
) -> Result<Option<Claim>> {
    let expires_ms = now_ms.saturating_add(lease_ms);
    let epoch: i64 = sqlx::query_scalar(
        "INSERT INTO agent_leases (agent_id, owner, epoch, expires_ms) VALUES (?1, ?2, 1, ?3) \
         ON CONFLICT (agent_id) DO UPDATE SET owner = excluded.owner, epoch = agent_leases.epoch + 1, \
         expires_ms = excluded.expires_ms RETURNING epoch",
    )
    .bind(agent_id)
    .bind(owner)
    .bind(expires_ms)
    .fetch_one(&mut *conn)
    .await?;

    // Jobs still running here belong to the previous epoch, whose worker let
    // the lease lapse: it crashed, was killed, or stalled past renewal. Count
    // an attempt, so a job that kills its worker every time dead-letters
    // after `attempts_max` turns instead of looping forever; one crash costs
    // one attempt out of eight, not the job. (The candidate query said
    // whether there are any, in the same transaction.)
    if *orphans {
        sqlx::query(
            "UPDATE jobs SET state = CASE WHEN attempts + 1 >= ?1 THEN 'dead' ELSE 'queued' END, \
             attempts = attempts + 1, failures = failures + 1, last_error = ?2, \
             lease_owner = NULL, lease_expires_ms = NULL, updated_ms = ?3 \
             WHERE agent_id = ?4 AND state = 'running'",
        )
        .bind(i64::from(store.policy.attempts_max))
        .bind(LEASE_LOST_ERROR)
        .bind(now_ms)
        .bind(agent_id)
        .execute(&mut *conn)
        .await?;
    }

    // The batch: due queued jobs of the session of the agent's oldest due job.
    let rows = sqlx::query(concat!(
        "UPDATE jobs SET state = 'running', lease_owner = ?1, lease_expires_ms = ?2, updated_ms = ?3 \
         WHERE id IN (SELECT id FROM jobs WHERE agent_id = ?4 AND state = 'queued' AND next_run_at_ms <= ?3 \
                      AND session = (SELECT session FROM jobs WHERE agent_id = ?4 AND state = 'queued' \
                                     AND next_run_at_ms <= ?3 ORDER BY created_ms, id LIMIT 1) \
                      ORDER BY created_ms, id LIMIT ?5) \
         RETURNING ",
        job_columns!()
    ))
    .bind(owner)
    .bind(expires_ms)
    .bind(now_ms)
    .bind(agent_id)
    .bind(i64::from(store.policy.claim_batch_max.max(1)))
    .fetch_all(&mut *conn)
    .await?;
    let mut jobs = rows.iter().map(job_from_row).collect::<Result<Vec<_>>>()?;
    jobs.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    let Some(session) = jobs.first().map(|job| job.session.clone()) else {
        sqlx::query("UPDATE agent_leases SET owner = NULL, expires_ms = 0 WHERE agent_id = ?")
            .bind(agent_id)
            .execute(&mut *conn)
            .await?;
        return Ok(None);
    };
    Ok(Some(Claim {
        lease: Lease {
            agent_id: AgentId::parse(agent_id).map_err(|e| corrupt("agent id", e))?,
            owner: owner.to_owned(),
            epoch,
            expires_ms,
        },
        session,
        jobs,
    }))
}

#[async_trait]
impl JobQueue for SqliteStore {
    async fn enqueue(&self, job: NewJob, now_ms: i64) -> Result<Enqueued> {
        self.writer.enqueue(job, now_ms, None).await
    }

    async fn enqueue_checked(&self, job: NewJob, now_ms: i64, catalog_version: i64) -> Result<Enqueued> {
        self.writer.enqueue(job, now_ms, Some(catalog_version)).await
    }

    async fn claim_next(&self, owner: &str, now_ms: i64, lease_ms: i64) -> Result<Option<Claim>> {
        check_owner(owner)?;
        check_lease_ms(lease_ms)?;
        // Most polls find nothing: look without the write lock first.
        let any: Option<Candidate> = sqlx::query_as(CANDIDATE_SQL).bind(now_ms).fetch_optional(&self.pool).await?;
        if any.is_none() {
            return Ok(None);
        }
        let mut tx = self.pool.begin_with(BEGIN_IMMEDIATE).await?;
        for _ in 0..CLAIM_SCAN_MAX {
            let candidate: Option<Candidate> =
                sqlx::query_as(CANDIDATE_SQL).bind(now_ms).fetch_optional(&mut *tx).await?;
            let Some(candidate) = candidate else { break };
            if let Some(claim) = claim_agent(&mut tx, self, &candidate, owner, now_ms, lease_ms).await? {
                tx.commit().await?;
                return Ok(Some(claim));
            }
        }
        // Keeps the dead-lettering of orphans a passed-over agent had.
        tx.commit().await?;
        Ok(None)
    }

    async fn claim_for_agent(&self, agent: &AgentId, owner: &str, now_ms: i64, lease_ms: i64) -> Result<Option<Claim>> {
        check_owner(owner)?;
        check_lease_ms(lease_ms)?;
        let mut tx = self.pool.begin_with(BEGIN_IMMEDIATE).await?;
        let candidate: Option<Candidate> =
            sqlx::query_as(AGENT_CANDIDATE_SQL).bind(now_ms).bind(agent.as_str()).fetch_optional(&mut *tx).await?;
        let claim = match candidate {
            Some(candidate) => claim_agent(&mut tx, self, &candidate, owner, now_ms, lease_ms).await?,
            None => None,
        };
        tx.commit().await?;
        Ok(claim)
    }

    async fn request_cancel(&self, agent: &AgentId, now_ms: i64) -> Result<bool> {
        let requested = sqlx::query(
            "UPDATE agent_leases SET cancel_epoch = epoch WHERE agent_id = ?1 AND owner IS NOT NULL AND expires_ms > ?2",
        )
        .bind(agent.as_str())
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(requested.rows_affected() > 0)
    }

    async fn cancel_requested(&self, lease: &Lease) -> Result<bool> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT 1 FROM agent_leases WHERE agent_id = ?1 AND epoch = ?2 AND cancel_epoch = ?2")
                .bind(lease.agent_id.as_str())
                .bind(lease.epoch)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some())
    }

    async fn renew(&self, lease: &Lease, now_ms: i64, lease_ms: i64) -> Result<bool> {
        check_lease_ms(lease_ms)?;
        let expires_ms = now_ms.saturating_add(lease_ms);
        let mut tx = self.pool.begin_with(BEGIN_IMMEDIATE).await?;
        let renewed =
            sqlx::query("UPDATE agent_leases SET expires_ms = ?1 WHERE agent_id = ?2 AND owner = ?3 AND epoch = ?4")
                .bind(expires_ms)
                .bind(lease.agent_id.as_str())
                .bind(&lease.owner)
                .bind(lease.epoch)
                .execute(&mut *tx)
                .await?;
        if renewed.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("UPDATE jobs SET lease_expires_ms = ?1 WHERE agent_id = ?2 AND state = 'running'")
            .bind(expires_ms)
            .bind(lease.agent_id.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn finish_with(
        &self,
        lease: &Lease,
        outcomes: &[JobOutcome],
        deliveries: &[NewDelivery],
        now_ms: i64,
        jitter: &mut (dyn FnMut() -> f64 + Send),
    ) -> Result<Option<Vec<Settled>>> {
        for delivery in deliveries {
            delivery.validate()?;
        }
        let agent_id = lease.agent_id.as_str();
        let mut tx = self.pool.begin_with(BEGIN_IMMEDIATE).await?;
        // Releases the lease if it is still this one (the fence), which also
        // says whether the turn's results may be recorded; everything below
        // commits with the release or not at all.
        let released = sqlx::query(
            "UPDATE agent_leases SET owner = NULL, expires_ms = 0 WHERE agent_id = ?1 AND owner = ?2 AND epoch = ?3",
        )
        .bind(agent_id)
        .bind(&lease.owner)
        .bind(lease.epoch)
        .execute(&mut *tx)
        .await?;
        if released.rows_affected() == 0 {
            return Ok(None);
        }
        for delivery in deliveries {
            super::delivery::insert_delivery(&mut tx, delivery, now_ms).await?;
        }
        let mut settled = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            // Running jobs of this agent are this epoch's (a takeover requeues
            // or dead-letters the previous epoch's in the same transaction).
            match &outcome.outcome {
                Outcome::Done => {
                    let attempts: Option<i64> = sqlx::query_scalar(
                        "UPDATE jobs SET state = 'done', lease_owner = NULL, lease_expires_ms = NULL, updated_ms = ?1 \
                         WHERE id = ?2 AND agent_id = ?3 AND state = 'running' RETURNING attempts",
                    )
                    .bind(now_ms)
                    .bind(&outcome.job_id)
                    .bind(agent_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let Some(attempts) = attempts else { continue };
                    settled.push(Settled {
                        job_id: outcome.job_id.clone(),
                        state: JobState::Done,
                        attempts: count(attempts),
                        next_run_at_ms: now_ms,
                    });
                }
                Outcome::Failed { failure, error } => {
                    let row = sqlx::query(
                        "SELECT attempts, failures, first_failure_ms FROM jobs \
                         WHERE id = ?1 AND agent_id = ?2 AND state = 'running'",
                    )
                    .bind(&outcome.job_id)
                    .bind(agent_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let Some(row) = row else { continue };
                    let attempts = count(row.try_get("attempts")?);
                    let failures = count(row.try_get("failures")?);
                    let first_failure_ms: Option<i64> = row.try_get("first_failure_ms")?;
                    let next =
                        settle_failure(&self.policy, *failure, attempts, failures, first_failure_ms, now_ms, jitter());
                    sqlx::query(
                        "UPDATE jobs SET state = ?1, attempts = ?2, failures = ?3, first_failure_ms = ?4, \
                         next_run_at_ms = ?5, last_error = ?6, lease_owner = NULL, lease_expires_ms = NULL, \
                         updated_ms = ?7 WHERE id = ?8",
                    )
                    .bind(next.state.as_str())
                    .bind(i64::from(next.attempts))
                    .bind(i64::from(next.failures))
                    .bind(next.first_failure_ms)
                    .bind(next.next_run_at_ms)
                    .bind(clip_error(error))
                    .bind(now_ms)
                    .bind(&outcome.job_id)
                    .execute(&mut *tx)
                    .await?;
                    settled.push(Settled {
                        job_id: outcome.job_id.clone(),
                        state: next.state,
                        attempts: next.attempts,
                        next_run_at_ms: next.next_run_at_ms,
                    });
                }
            }
        }
        // Whatever the turn did not settle goes back untouched: not an attempt.
        sqlx::query(
            "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_ms = NULL, updated_ms = ?1 \
             WHERE agent_id = ?2 AND state = 'running'",
        )
        .bind(now_ms)
        .bind(agent_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(settled))
    }

    async fn next_due_ms(&self) -> Result<Option<i64>> {
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(MAX(CASE WHEN j.state = 'queued' THEN j.next_run_at_ms ELSE 0 END, \
                            CASE WHEN l.owner IS NOT NULL THEN l.expires_ms ELSE 0 END)) \
             FROM jobs j LEFT JOIN agent_leases l ON l.agent_id = j.agent_id \
             WHERE j.state IN ('queued', 'running')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(next)
    }

    async fn get_job(&self, id: &str) -> Result<Option<Job>> {
        let row = sqlx::query(concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn jobs_for(&self, agent: &AgentId, limit: u32) -> Result<Vec<Job>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE agent_id = ? ORDER BY created_ms DESC, id DESC LIMIT ?"
        ))
        .bind(agent.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn queue_counts(&self, now_ms: i64) -> Result<QueueCounts> {
        // One pass over the `jobs_active` partial index (done jobs, the bulk,
        // are not in it), and the `jobs_dead` index for dead letters.
        let row = sqlx::query(
            "SELECT COUNT(*) AS active, COALESCE(SUM(state = 'queued'), 0) AS queued, \
             COALESCE(SUM(state = 'queued' AND next_run_at_ms <= ?1), 0) AS due, \
             (SELECT COUNT(*) FROM jobs WHERE state = 'dead') AS dead \
             FROM jobs WHERE state IN ('queued', 'running')",
        )
        .bind(now_ms)
        .fetch_one(&self.pool)
        .await?;
        let get = |name: &str| -> Result<u64> { Ok(u64::try_from(row.try_get::<i64, _>(name)?).unwrap_or(0)) };
        let queued = get("queued")?;
        Ok(QueueCounts { queued, due: get("due")?, running: get("active")?.saturating_sub(queued), dead: get("dead")? })
    }

    async fn agent_status(&self, agent: &AgentId, now_ms: i64) -> Result<AgentQueueStatus> {
        let row = sqlx::query(
            "SELECT \
             (SELECT COUNT(*) FROM jobs WHERE agent_id = ?1 AND state = 'queued') AS queued, \
             (SELECT COUNT(*) FROM jobs WHERE agent_id = ?1 AND state = 'dead') AS dead, \
             (SELECT owner FROM agent_leases WHERE agent_id = ?1 AND owner IS NOT NULL AND expires_ms > ?2) AS owner",
        )
        .bind(agent.as_str())
        .bind(now_ms)
        .fetch_one(&self.pool)
        .await?;
        let lease_owner: Option<String> = row.try_get("owner")?;
        Ok(AgentQueueStatus {
            queued: u64::try_from(row.try_get::<i64, _>("queued")?).unwrap_or(0),
            dead: u64::try_from(row.try_get::<i64, _>("dead")?).unwrap_or(0),
            running: lease_owner.is_some(),
            lease_owner,
        })
    }

    async fn list_dead(&self, agent: Option<&AgentId>, limit: u32) -> Result<Vec<Job>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE state = 'dead' AND (?1 IS NULL OR agent_id = ?1) \
             ORDER BY updated_ms DESC, id DESC LIMIT ?2"
        ))
        .bind(agent.map(AgentId::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn replay(&self, id: &str, now_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE jobs SET state = 'queued', attempts = 0, failures = 0, first_failure_ms = NULL, \
             next_run_at_ms = ?1, updated_ms = ?1 WHERE id = ?2 AND state = 'dead'",
        )
        .bind(now_ms)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn replay_all(&self, now_ms: i64) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE jobs SET state = 'queued', attempts = 0, failures = 0, first_failure_ms = NULL, \
             next_run_at_ms = ?1, updated_ms = ?1 WHERE state = 'dead'",
        )
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn set_queued_payload(&self, id: &str, payload: &str) -> Result<bool> {
        crate::queue::validate_payload(payload)?;
        let done = sqlx::query("UPDATE jobs SET payload = ? WHERE id = ? AND state = 'queued'")
            .bind(payload)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn purge(&self, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM jobs WHERE id = ? AND state = 'dead'").bind(id).execute(&self.pool).await?;
        Ok(done.rows_affected() == 1)
    }

    async fn purge_all_dead(&self) -> Result<u64> {
        let done = sqlx::query("DELETE FROM jobs WHERE state = 'dead'").execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    async fn purge_done(&self, now_ms: i64, limit: u32) -> Result<u64> {
        // `updated_ms` is never before `created_ms`: a job last updated
        // before the cut-off was created before it, and its key expired.
        let before_ms = now_ms.saturating_sub(self.policy.dedup_ttl_ms);
        let done = sqlx::query(
            "DELETE FROM jobs WHERE id IN \
             (SELECT id FROM jobs WHERE state = 'done' AND updated_ms < ?1 ORDER BY updated_ms LIMIT ?2)",
        )
        .bind(before_ms)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
