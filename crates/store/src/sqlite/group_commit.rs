//! The enqueue writer: group commit for SQLite.
//!
//! One task per store owns every enqueue, on a connection of its own (no
//! wait for the pool the readers share). Callers put their job on a bounded
//! channel and wait on a oneshot. The task takes everything waiting (up to
//! `enqueue_batch_max`), writes it in ONE `BEGIN IMMEDIATE` transaction with
//! a fixed number of statements (the batch travels as a JSON array),
//! commits (one WAL fsync under `synchronous = FULL`), and only then answers
//! each caller. Batches form by themselves: while one commit is syncing, the
//! next callers queue up, so there is no timer and no added latency when idle.
//!
//! Inside each transaction the task reads `catalog_version`: a job enqueued
//! with `enqueue_checked` under another version is answered
//! `CatalogChanged` and left out of the batch (see `catalog.rs`).
//!
//! After commits, a checkpointer task runs `wal_checkpoint(PASSIVE)` on the
//! pool at most every `CHECKPOINT_EVERY`, so copying the WAL into the
//! database (and its fsync) never sits inside an acknowledged commit.
//!
//! Invariants: a caller is answered `Ok` only after the commit that holds its
//! job returned; if a batch fails, every caller in it gets the error and none
//! of its jobs is stored. A full channel makes `enqueue` wait (backpressure);
//! nothing is dropped. Jobs are validated before they are queued, so one bad
//! job cannot fail a batch of others. This module does not claim or modify
//! jobs after they are inserted.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePool};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::{mpsc, oneshot, watch};

use super::BEGIN_IMMEDIATE;
use super::catalog::Catalog;
use crate::{Enqueued, NewJob, QueuePolicy, Result, StoreError};

/// Least time between two background checkpoints.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Most expired dedup keys one purge deletes: bounded work on the commit
/// path, and twice the largest batch, so purging outpaces expiry.
const DEDUP_PURGE_MAX: i64 = 512;
/// When a purge found less than `DEDUP_PURGE_MAX`, the next one waits this
/// many batches (a purge is one more statement on the commit path).
const DEDUP_PURGE_EVERY_BATCHES: u32 = 64;

struct Request {
    job: NewJob,
    now_ms: i64,
    /// `enqueue_checked`: the catalog version the caller admitted the job at.
    catalog_version: Option<i64>,
    reply: oneshot::Sender<Result<Enqueued>>,
}

/// The sending side of the writer task; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Request>,
}

impl Writer {
    /// Starts the writer (its own connection, opened with `options`) and
    /// the checkpointer (on `pool`); both stop with the last `Writer` clone.
    pub(crate) fn spawn(
        options: SqliteConnectOptions,
        pool: SqlitePool,
        policy: QueuePolicy,
        catalog: Arc<Catalog>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(policy.enqueue_pending_max.max(1));
        let (committed, commits) = watch::channel(());
        tokio::spawn(run(options, rx, policy, catalog, committed));
        tokio::spawn(checkpoint(pool, commits));
        Self { tx }
    }

    pub(crate) async fn enqueue(&self, job: NewJob, now_ms: i64, catalog_version: Option<i64>) -> Result<Enqueued> {
        job.validate()?;
        let (reply, answer) = oneshot::channel();
        self.tx.send(Request { job, now_ms, catalog_version, reply }).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// Runs until every `Writer` clone is gone and the channel is drained.
async fn run(
    options: SqliteConnectOptions,
    mut rx: mpsc::Receiver<Request>,
    policy: QueuePolicy,
    catalog: Arc<Catalog>,
    committed: watch::Sender<()>,
) {
    let batch_max = policy.enqueue_batch_max.max(1);
    let mut batch = Vec::with_capacity(batch_max);
    let mut batches_to_purge = 0;
    let mut conn: Option<SqliteConnection> = None;
    while rx.recv_many(&mut batch, batch_max).await > 0 {
        let purge = batches_to_purge == 0;
        let written = match connection(&mut conn, &options).await {
            Ok(conn) => write_batch(conn, &batch, policy.dedup_ttl_ms, purge).await,
            Err(error) => Err(error),
        };
        if written.is_err() {
            // Opened again for the next batch, in case this one is broken.
            conn = None;
        }
        match written {
            Ok((answers, purged, version)) => {
                catalog.observe(version);
                committed.send_replace(());
                if purge {
                    batches_to_purge = if purged < DEDUP_PURGE_MAX as u64 { DEDUP_PURGE_EVERY_BATCHES } else { 0 };
                } else {
                    batches_to_purge -= 1;
                }
                for (request, answer) in batch.drain(..).zip(answers) {
                    // A caller that stopped waiting still has its job stored;
                    // its retry will find the dedup key.
                    let _ = request.reply.send(answer);
                }
            }
            Err(error) => {
                tracing::warn!(%error, jobs = batch.len(), "enqueue batch failed; every caller gets the error");
                let error = Arc::new(error);
                for request in batch.drain(..) {
                    let _ = request.reply.send(Err(StoreError::Commit(Arc::clone(&error))));
                }
            }
        }
    }
}

async fn connection<'c>(
    conn: &'c mut Option<SqliteConnection>,
    options: &SqliteConnectOptions,
) -> Result<&'c mut SqliteConnection, sqlx::Error> {
    if conn.is_none() {
        *conn = Some(options.connect().await?);
    }
    Ok(conn.as_mut().expect("opened above"))
}

/// Checkpoints (PASSIVE: never waits for, nor blocks, the writer or a
/// reader) after commits, at most every `CHECKPOINT_EVERY`, until the
/// writer stops.
async fn checkpoint(pool: SqlitePool, mut commits: watch::Receiver<()>) {
    while commits.changed().await.is_ok() {
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
            tracing::debug!(%error, "background WAL checkpoint failed; the next commit retries it");
        }
        tokio::time::sleep(CHECKPOINT_EVERY).await;
    }
}

/// One transaction for the whole batch, in a fixed number of statements:
/// the batch goes to SQLite as one JSON array (`json_each`), so a batch of
/// 256 costs about as many round trips as a batch of 1. With `purge`, also
/// deletes expired dedup keys and says how many. Answers the catalog version
/// the transaction saw. The outer error fails the batch; an inner error
/// belongs to one caller (its job id was taken, or its catalog view is stale).
async fn write_batch(
    conn: &mut SqliteConnection,
    batch: &[Request],
    dedup_ttl_ms: i64,
    purge: bool,
) -> Result<(Vec<Result<Enqueued>>, u64, i64), sqlx::Error> {
    let mut tx = conn.begin_with(BEGIN_IMMEDIATE).await?;
    let version: i64 =
        sqlx::query_scalar("SELECT version FROM catalog_version WHERE id = 1").fetch_one(&mut *tx).await?;
    let mut answers: Vec<Option<Result<Enqueued>>> = batch.iter().map(|_| None).collect();
    let mut admitted = Vec::with_capacity(batch.len());
    for (i, request) in batch.iter().enumerate() {
        if request.catalog_version.is_some_and(|v| v != version) {
            answers[i] = Some(Err(StoreError::CatalogChanged));
        } else {
            admitted.push(i);
        }
    }
    let several = admitted.len() > 1;
    // A key or id that repeats an earlier one of this batch goes one by one
    // after the bulk insert, so it sees that insert's rows.
    let (mut keys, mut ids) = (HashSet::new(), HashSet::new());
    // A batch of one takes the one-by-one path too: two plain statements.
    let (bulk, one_by_one): (Vec<usize>, Vec<usize>) = admitted.into_iter().partition(|&i| {
        let job = &batch[i].job;
        (keys.insert(job.dedup_key.as_str()) & ids.insert(job.id.as_str())) && several
    });
    if !bulk.is_empty() {
        insert_bulk(&mut tx, batch, &bulk, dedup_ttl_ms, &mut answers).await?;
    }
    for i in one_by_one {
        let request = &batch[i];
        answers[i] = Some(insert_job_sql(&mut tx, &request.job, request.now_ms, dedup_ttl_ms).await?);
    }
    let mut purged = 0;
    if purge {
        let now_ms = batch.iter().map(|r| r.now_ms).max().unwrap_or(i64::MIN);
        purged = sqlx::query(
            "DELETE FROM job_dedup WHERE rowid IN \
             (SELECT rowid FROM job_dedup WHERE expires_ms <= ?1 ORDER BY expires_ms LIMIT ?2)",
        )
        .bind(now_ms)
        .bind(DEDUP_PURGE_MAX)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    tx.commit().await?;
    // Every index went through the bulk or the one-by-one path above.
    let missing = || Err(StoreError::Corrupt("a batched enqueue got no answer".to_owned()));
    Ok((answers.into_iter().map(|a| a.unwrap_or_else(missing)).collect(), purged, version))
}

/// One job as a row of the JSON array `insert_bulk` binds.
#[derive(Serialize)]
struct BulkRow<'a> {
    id: &'a str,
    key: &'a str,
    agent: &'a str,
    session: &'a str,
    kind: &'a str,
    /// JSON text carried as a string, so SQLite stores it byte for byte.
    payload: &'a str,
    now: i64,
    expires: i64,
}

fn bulk_json(batch: &[Request], indexes: &[usize], dedup_ttl_ms: i64) -> String {
    let rows: Vec<BulkRow<'_>> = indexes
        .iter()
        .map(|&i| {
            let (job, now_ms) = (&batch[i].job, batch[i].now_ms);
            BulkRow {
                id: &job.id,
                key: &job.dedup_key,
                agent: job.agent_id.as_str(),
                session: job.session.as_str(),
                kind: &job.kind,
                payload: &job.payload,
                now: now_ms,
                expires: now_ms.saturating_add(dedup_ttl_ms),
            }
        })
        .collect();
    // Serialising borrowed strings and integers cannot fail.
    serde_json::to_string(&rows).unwrap_or_default()
}

/// The bulk path of `write_batch`, for jobs with distinct keys and ids.
async fn insert_bulk(
    conn: &mut SqliteConnection,
    batch: &[Request],
    bulk: &[usize],
    dedup_ttl_ms: i64,
    answers: &mut [Option<Result<Enqueued>>],
) -> Result<(), sqlx::Error> {
    let rows = bulk_json(batch, bulk, dedup_ttl_ms);
    // Take each key, or take it over once expired (the row's own time is
    // `expires - ttl`); RETURNING names the keys this batch now holds.
    let taken: HashSet<String> = sqlx::query_scalar(
        "INSERT INTO job_dedup (key, job_id, agent_id, expires_ms) \
         SELECT value ->> 'key', value ->> 'id', value ->> 'agent', value ->> 'expires' FROM json_each(?1) WHERE true \
         ON CONFLICT (key) DO UPDATE SET job_id = excluded.job_id, agent_id = excluded.agent_id, \
         expires_ms = excluded.expires_ms WHERE job_dedup.expires_ms <= excluded.expires_ms - ?2 \
         RETURNING key",
    )
    .bind(rows.as_str())
    .bind(dedup_ttl_ms)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();

    let (fresh, held): (Vec<usize>, Vec<usize>) =
        bulk.iter().partition(|&&i| taken.contains(batch[i].job.dedup_key.as_str()));
    if !held.is_empty() {
        let keys: Vec<&str> = held.iter().map(|&i| batch[i].job.dedup_key.as_str()).collect();
        let holders: HashMap<String, String> =
            sqlx::query_as("SELECT key, job_id FROM job_dedup WHERE key IN (SELECT value FROM json_each(?1))")
                .bind(serde_json::to_string(&keys).unwrap_or_default())
                .fetch_all(&mut *conn)
                .await?
                .into_iter()
                .collect();
        for i in held {
            let answer = match holders.get(batch[i].job.dedup_key.as_str()) {
                Some(first) => Ok(Enqueued { job_id: first.clone(), duplicate: true }),
                None => Err(StoreError::Corrupt(format!("dedup key {:?} vanished", batch[i].job.dedup_key))),
            };
            answers[i] = Some(answer);
        }
    }
    if fresh.is_empty() {
        return Ok(());
    }

    let inserted: HashSet<String> = sqlx::query_scalar(
        "INSERT INTO jobs (id, dedup_key, agent_id, session, kind, payload, state, attempts, failures, \
         next_run_at_ms, created_ms, updated_ms) \
         SELECT value ->> 'id', value ->> 'key', value ->> 'agent', value ->> 'session', value ->> 'kind', \
         value ->> 'payload', 'queued', 0, 0, value ->> 'now', value ->> 'now', value ->> 'now' \
         FROM json_each(?1) WHERE true \
         ON CONFLICT (id) DO NOTHING RETURNING id",
    )
    // Usually every key was free: the same array serves again.
    .bind(if fresh.len() == bulk.len() { rows } else { bulk_json(batch, &fresh, dedup_ttl_ms) })
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    for i in fresh {
        let job = &batch[i].job;
        answers[i] = Some(if inserted.contains(job.id.as_str()) {
            Ok(Enqueued { job_id: job.id.clone(), duplicate: false })
        } else {
            release_key(conn, job).await?;
            Err(StoreError::Conflict("job id"))
        });
    }
    Ok(())
}

/// After a refused insert (the caller reused a job id, a bug on its side,
/// refused for it alone), gives the key back. If the key had expired and was
/// taken over, deleting it is what the expiry purge would have done.
async fn release_key(conn: &mut SqliteConnection, job: &NewJob) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM job_dedup WHERE key = ? AND job_id = ?")
        .bind(&job.dedup_key)
        .bind(&job.id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Inserts one job inside the caller's transaction, unless its dedup key is
/// taken and unexpired (then answers the first job's id as a duplicate).
pub(crate) async fn insert_job(
    conn: &mut SqliteConnection,
    job: &NewJob,
    now_ms: i64,
    dedup_ttl_ms: i64,
) -> Result<Result<Enqueued>> {
    Ok(insert_job_sql(conn, job, now_ms, dedup_ttl_ms).await?)
}

async fn insert_job_sql(
    conn: &mut SqliteConnection,
    job: &NewJob,
    now_ms: i64,
    dedup_ttl_ms: i64,
) -> Result<Result<Enqueued>, sqlx::Error> {
    // Takes the key, or takes it over once expired; returns nothing when an
    // unexpired holder keeps it.
    let took: Option<String> = sqlx::query_scalar(
        "INSERT INTO job_dedup (key, job_id, agent_id, expires_ms) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (key) DO UPDATE SET job_id = excluded.job_id, agent_id = excluded.agent_id, \
         expires_ms = excluded.expires_ms WHERE job_dedup.expires_ms <= ?5 \
         RETURNING job_id",
    )
    .bind(&job.dedup_key)
    .bind(&job.id)
    .bind(job.agent_id.as_str())
    .bind(now_ms.saturating_add(dedup_ttl_ms))
    .bind(now_ms)
    .fetch_optional(&mut *conn)
    .await?;
    if took.is_none() {
        let first: String = sqlx::query_scalar("SELECT job_id FROM job_dedup WHERE key = ?")
            .bind(&job.dedup_key)
            .fetch_one(&mut *conn)
            .await?;
        return Ok(Ok(Enqueued { job_id: first, duplicate: true }));
    }
    let inserted = sqlx::query(
        "INSERT INTO jobs (id, dedup_key, agent_id, session, kind, payload, state, attempts, failures, \
         next_run_at_ms, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', 0, 0, ?7, ?7, ?7) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&job.id)
    .bind(&job.dedup_key)
    .bind(job.agent_id.as_str())
    .bind(job.session.as_str())
    .bind(&job.kind)
    .bind(&job.payload)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 0 {
        release_key(conn, job).await?;
        return Ok(Err(StoreError::Conflict("job id")));
    }
    Ok(Ok(Enqueued { job_id: job.id.clone(), duplicate: false }))
}
