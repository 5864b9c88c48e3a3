//! The enqueue writer: group commit for SQLite.
//!
//! One OS thread per store owns every enqueue, on a SQLite connection of its
//! own that it calls directly (`tinyfat-sqlite-raw`: no thread hop per
//! statement, as sqlx would make). Callers put their job on a bounded
//! channel and wait on a oneshot. The thread takes everything waiting (up to
//! `enqueue_batch_max`) and writes it in ONE `BEGIN IMMEDIATE` transaction:
//! a multi-row insert per table, every value a bound parameter, through
//! statements prepared once per row count (`BULK_ROWS`). Batches form by
//! themselves: while one batch is written, the next callers queue up, so
//! there is no timer and no added latency when idle.
//!
//! Pipelined durability: the writer's connection commits with `synchronous
//! = NORMAL` (the WAL frames are written, not synced), and a syncer thread
//! `fdatasync`s the WAL file and only then answers the callers of the batch
//! committed before that sync began. So the next batch is written while the
//! previous one syncs. The writer hands over one committed batch at a time
//! (`Handoff`): it collects its next batch only once the syncer took the
//! last, so under load the callers that arrive during a sync join one
//! bigger batch (fewer commits, fewer WAL pages per job) instead of several. A commit seen by another connection before its sync is safe:
//! any write that builds on it (a claim, under `synchronous = FULL` like
//! every other connection) syncs the same WAL file past it first.
//!
//! Inside each transaction the writer reads `catalog_version`: a job
//! enqueued with `enqueue_checked` under another version is answered
//! `CatalogChanged` and left out of the batch (see `catalog.rs`).
//!
//! After commits, a checkpointer task runs `wal_checkpoint(PASSIVE)` on the
//! pool at most every `CHECKPOINT_EVERY`, so copying the WAL into the
//! database (and its fsync) never sits inside an acknowledged commit.
//!
//! Invariants: a caller is answered `Ok` only after the commit that holds its
//! job returned and a WAL fsync begun after that commit succeeded; a failed
//! fsync fails its callers and every later enqueue (`StoreError::Sync`); if
//! a batch fails, every caller in it gets the error and none of its jobs is
//! stored. A full channel makes `enqueue` wait (backpressure); nothing is
//! dropped. Jobs are validated before they are queued, so one bad job cannot
//! fail a batch of others. This module does not claim or modify jobs after
//! they are inserted.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnection, SqlitePool};
use tinyfat_sqlite_raw::{Connection, Statement, Step};
use tokio::sync::{mpsc, oneshot, watch};

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

/// Row counts the bulk statements are prepared for: a bulk of `n` rows
/// binds the smallest that holds it and pads the rest with NULL rows, which
/// the statements filter out. Five shapes per statement, each prepared once.
const BULK_ROWS: [usize; 5] = [1, 4, 16, 64, 256];
/// Values per row of `take_keys_sql` and of `insert_jobs_sql`.
const KEY_COLUMNS: usize = 4;
const JOB_COLUMNS: usize = 7;

/// Where the writer's connection and its syncer work.
#[derive(Debug, Clone)]
pub(crate) struct WriterConfig {
    /// The database file (not `:memory:`: the pool and the writer must
    /// open the same database).
    pub db: PathBuf,
    pub busy_timeout: Duration,
    /// Run on the writer's connection after opening (the pool's pragmas,
    /// with `synchronous = NORMAL`: the syncer makes commits durable).
    pub pragmas: String,
}

struct Request {
    job: NewJob,
    now_ms: i64,
    /// `enqueue_checked`: the catalog version the caller admitted the job at.
    catalog_version: Option<i64>,
    reply: oneshot::Sender<Result<Enqueued>>,
}

/// One caller's answer, waiting for the sync that makes it durable.
type Answer = (oneshot::Sender<Result<Enqueued>>, Result<Enqueued>);

/// The sending side of the writer thread; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Request>,
}

impl Writer {
    /// Starts the writer thread (its connection opened before this
    /// returns, so a database it cannot open fails here), the syncer thread
    /// and the checkpointer task (on `pool`); all stop with the last
    /// `Writer` clone.
    pub(crate) async fn spawn(
        config: WriterConfig,
        pool: SqlitePool,
        policy: QueuePolicy,
        catalog: Arc<Catalog>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel(policy.enqueue_pending_max.max(1));
        let (committed, commits) = watch::channel(());
        let handoff = Arc::new(Handoff::default());
        let (to_sync, synced) = (Arc::clone(&handoff), handoff);
        let (opened, open) = oneshot::channel();
        let wal = wal_path(&config.db);
        let thread = |name: &str| std::thread::Builder::new().name(name.to_owned());
        thread("tinyfat-enqueue")
            .spawn(move || {
                let writer = match BatchWriter::open(&config) {
                    Ok(writer) => {
                        let _ = opened.send(Ok(()));
                        writer
                    }
                    Err(error) => {
                        let _ = opened.send(Err(error));
                        return;
                    }
                };
                write_loop(writer, &config, rx, policy, &catalog, &committed, &to_sync);
            })
            .map_err(|e| StoreError::Commit(Arc::new(e)))?;
        open.await.map_err(|_| StoreError::Closed)?.map_err(|e| StoreError::Commit(Arc::new(e)))?;
        thread("tinyfat-wal-sync")
            .spawn(move || sync_wal(&wal, &synced))
            .map_err(|e| StoreError::Commit(Arc::new(e)))?;
        tokio::spawn(checkpoint(pool, commits));
        Ok(Self { tx })
    }

    pub(crate) async fn enqueue(&self, job: NewJob, now_ms: i64, catalog_version: Option<i64>) -> Result<Enqueued> {
        job.validate()?;
        let (reply, answer) = oneshot::channel();
        self.tx.send(Request { job, now_ms, catalog_version, reply }).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

fn wal_path(db: &Path) -> PathBuf {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// Committed batches on their way from the writer to the syncer.
#[derive(Default)]
struct Handoff {
    state: std::sync::Mutex<HandoffState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct HandoffState {
    committed: Vec<Answer>,
    /// The writer is gone: the syncer ends once `committed` is empty.
    closed: bool,
}

impl Handoff {
    fn lock(&self) -> std::sync::MutexGuard<'_, HandoffState> {
        // Both sides keep the state whole between statements.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The writer: passes a committed batch on.
    fn give(&self, answers: Vec<Answer>) {
        self.lock().committed.extend(answers);
        self.changed.notify_all();
    }

    /// The writer: waits until the syncer took every committed batch.
    fn wait_taken(&self) {
        let mut state = self.lock();
        while !state.committed.is_empty() {
            state = self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// The syncer: takes what was committed, waiting for some; `None` once
    /// the writer is gone and everything was taken.
    fn take(&self) -> Option<Vec<Answer>> {
        let mut state = self.lock();
        while state.committed.is_empty() {
            if state.closed {
                return None;
            }
            state = self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let taken = std::mem::take(&mut state.committed);
        drop(state);
        self.changed.notify_all();
        Some(taken)
    }
}

/// Runs until every `Writer` clone is gone and the channel is drained.
fn write_loop(
    writer: BatchWriter,
    config: &WriterConfig,
    mut rx: mpsc::Receiver<Request>,
    policy: QueuePolicy,
    catalog: &Catalog,
    committed: &watch::Sender<()>,
    to_sync: &Handoff,
) {
    let batch_max = policy.enqueue_batch_max.max(1);
    let mut batch = Vec::with_capacity(batch_max);
    let mut batches_to_purge = 0;
    let mut writer = Some(writer);
    // Ends the syncer once it has answered the last batch.
    struct Close<'a>(&'a Handoff);
    impl Drop for Close<'_> {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _close = Close(to_sync);
    loop {
        to_sync.wait_taken();
        if rx.blocking_recv_many(&mut batch, batch_max) == 0 {
            break;
        }
        let purge = batches_to_purge == 0;
        let written = match writer.take() {
            Some(w) => Ok(w),
            // Opened again after a failed batch, in case its connection broke.
            None => BatchWriter::open(config),
        }
        .and_then(|mut w| {
            let answers = w.write(&batch, policy.dedup_ttl_ms, purge)?;
            writer = Some(w);
            Ok(answers)
        });
        match written {
            Ok((answers, purged, version)) => {
                catalog.observe(version);
                committed.send_replace(());
                if purge {
                    batches_to_purge = if purged < DEDUP_PURGE_MAX as u64 { DEDUP_PURGE_EVERY_BATCHES } else { 0 };
                } else {
                    batches_to_purge -= 1;
                }
                to_sync.give(batch.drain(..).map(|request| request.reply).zip(answers).collect());
            }
            Err(error) => {
                tracing::warn!(%error, jobs = batch.len(), "enqueue batch failed; every caller gets the error");
                let error = Arc::new(error);
                for request in batch.drain(..) {
                    let _ = request.reply.send(Err(StoreError::Commit(error.clone())));
                }
            }
        }
    }
}

/// The syncer: takes every batch committed so far, `fdatasync`s the WAL,
/// answers them, and repeats; ends when the writer is gone. After one
/// failed sync every later batch fails too (the kernel may have dropped the
/// unsynced pages, so a later "successful" sync proves nothing).
fn sync_wal(wal: &Path, handoff: &Handoff) {
    let mut file: Option<(File, u64)> = None;
    let mut failed: Option<Arc<std::io::Error>> = None;
    while let Some(pending) = handoff.take() {
        if failed.is_none()
            && let Err(error) = sync_file(wal, &mut file)
        {
            tracing::error!(%error, wal = %wal.display(), "WAL fsync failed: enqueues fail until the store is reopened");
            failed = Some(Arc::new(error));
        }
        for (reply, answer) in pending {
            // A caller that stopped waiting still has its job stored; its
            // retry will find the dedup key.
            let _ = reply.send(match &failed {
                Some(error) => answer.and(Err(StoreError::Sync(Arc::clone(error)))),
                None => answer,
            });
        }
    }
}

/// `fdatasync` of the WAL file, opening it (again) if the file at `wal` is
/// not the one held: SQLite deletes the WAL when the last connection to the
/// database closes, and a later one creates a new file.
fn sync_file(wal: &Path, file: &mut Option<(File, u64)>) -> std::io::Result<()> {
    let inode = std::fs::metadata(wal)?.ino();
    if file.as_ref().is_none_or(|(_, held)| *held != inode) {
        *file = Some((File::open(wal)?, inode));
    }
    let (file, _) = file.as_ref().expect("opened above");
    file.sync_data()
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

/// `(?, ?, …), (…)` for `rows` rows of `columns` anonymous parameters.
/// (Numbered `?N` would make binding scan SQLite's parameter names.)
fn values_rows(rows: usize, columns: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    vec![row; rows].join(", ")
}

/// Takes each key, or takes it over once expired (the row's own time is
/// `expires - ttl`, the ttl bound last); RETURNING names the keys taken.
/// Rows: key, job id, agent id, expires.
fn take_keys_sql(rows: usize) -> String {
    format!(
        "INSERT INTO job_dedup (key, job_id, agent_id, expires_ms) \
         SELECT column1, column2, column3, column4 FROM (VALUES {}) WHERE column1 IS NOT NULL \
         ON CONFLICT (key) DO UPDATE SET job_id = excluded.job_id, agent_id = excluded.agent_id, \
         expires_ms = excluded.expires_ms WHERE job_dedup.expires_ms <= excluded.expires_ms - ? \
         RETURNING key",
        values_rows(rows, KEY_COLUMNS)
    )
}

/// Inserts queued jobs; RETURNING names the ids inserted (a taken id is
/// left alone). Rows: id, dedup key, agent id, session, kind, payload, now.
fn insert_jobs_sql(rows: usize) -> String {
    format!(
        "INSERT INTO jobs (id, dedup_key, agent_id, session, kind, payload, state, attempts, failures, \
         next_run_at_ms, created_ms, updated_ms) \
         SELECT column1, column2, column3, column4, column5, column6, 'queued', 0, 0, column7, column7, column7 \
         FROM (VALUES {}) WHERE column1 IS NOT NULL \
         ON CONFLICT (id) DO NOTHING RETURNING id",
        values_rows(rows, JOB_COLUMNS)
    )
}

const KEY_HOLDER_SQL: &str = "SELECT job_id FROM job_dedup WHERE key = ?";
/// After a refused insert (the caller reused a job id, a bug on its side,
/// refused for it alone), gives the key back. If the key had expired and was
/// taken over, deleting it is what the expiry purge would have done.
const RELEASE_KEY_SQL: &str = "DELETE FROM job_dedup WHERE key = ? AND job_id = ?";
const PURGE_SQL: &str = "DELETE FROM job_dedup WHERE key IN \
     (SELECT key FROM job_dedup WHERE expires_ms <= ? ORDER BY expires_ms LIMIT ?)";
const CATALOG_VERSION_SQL: &str = "SELECT version FROM catalog_version WHERE id = 1";

/// The values of one job in a `take_keys_sql` row.
fn key_row(job: &NewJob, now_ms: i64, dedup_ttl_ms: i64) -> [Value<'_>; KEY_COLUMNS] {
    [
        Value::Text(&job.dedup_key),
        Value::Text(&job.id),
        Value::Text(job.agent_id.as_str()),
        Value::Int(now_ms.saturating_add(dedup_ttl_ms)),
    ]
}

/// The values of one job in an `insert_jobs_sql` row.
fn job_row(job: &NewJob, now_ms: i64) -> [Value<'_>; JOB_COLUMNS] {
    [
        Value::Text(&job.id),
        Value::Text(&job.dedup_key),
        Value::Text(job.agent_id.as_str()),
        Value::Text(job.session.as_str()),
        Value::Text(&job.kind),
        Value::Text(&job.payload),
        Value::Int(now_ms),
    ]
}

#[derive(Clone, Copy)]
enum Value<'a> {
    Text(&'a str),
    Int(i64),
}

/// The writer's connection and its statements, prepared on first use (the
/// store opens before its migrations run).
struct BatchWriter {
    conn: Connection,
    take_keys: [Option<Statement>; BULK_ROWS.len()],
    insert_jobs: [Option<Statement>; BULK_ROWS.len()],
    key_holder: Option<Statement>,
    release_key: Option<Statement>,
    purge: Option<Statement>,
    catalog_version: Option<Statement>,
}

type RawResult<T> = std::result::Result<T, tinyfat_sqlite_raw::Error>;

impl BatchWriter {
    fn open(config: &WriterConfig) -> RawResult<Self> {
        let conn = Connection::open(&config.db, config.busy_timeout)?;
        conn.execute_batch(&config.pragmas)?;
        Ok(Self {
            conn,
            take_keys: Default::default(),
            insert_jobs: Default::default(),
            key_holder: None,
            release_key: None,
            purge: None,
            catalog_version: None,
        })
    }

    /// One transaction for the whole batch. With `purge`, also deletes
    /// expired dedup keys and says how many. Answers the catalog version the
    /// transaction saw. The outer error fails the batch (rolled back); an
    /// inner error belongs to one caller (its job id was taken, or its
    /// catalog view is stale).
    fn write(
        &mut self,
        batch: &[Request],
        dedup_ttl_ms: i64,
        purge: bool,
    ) -> RawResult<(Vec<Result<Enqueued>>, u64, i64)> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let written = self.write_in_transaction(batch, dedup_ttl_ms, purge).and_then(|answers| {
            self.conn.execute_batch("COMMIT")?;
            Ok(answers)
        });
        if written.is_err() {
            // Nothing of the batch stays; a failed ROLLBACK means SQLite
            // already rolled back.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        written
    }

    fn write_in_transaction(
        &mut self,
        batch: &[Request],
        dedup_ttl_ms: i64,
        purge: bool,
    ) -> RawResult<(Vec<Result<Enqueued>>, u64, i64)> {
        let statement = prepared(&self.conn, &mut self.catalog_version, || CATALOG_VERSION_SQL.to_owned())?;
        let version = run(statement, &[], |s| s.int(0))?.first().copied().unwrap_or(0);
        let mut answers: Vec<Option<Result<Enqueued>>> = batch.iter().map(|_| None).collect();
        let mut pending = Vec::with_capacity(batch.len());
        for (i, request) in batch.iter().enumerate() {
            if request.catalog_version.is_some_and(|v| v != version) {
                answers[i] = Some(Err(StoreError::CatalogChanged));
            } else {
                pending.push(i);
            }
        }
        // Rounds of jobs with distinct keys and ids. A job that repeats the
        // key or id of an earlier one waits for a later round, and so does
        // every job after it that shares one of its own: so each job sees
        // the rows of every job before it, as if inserted one by one.
        while !pending.is_empty() {
            let (mut keys, mut ids) = (HashSet::new(), HashSet::new());
            let (round, later): (Vec<usize>, Vec<usize>) = pending.iter().partition(|&&i| {
                let job = &batch[i].job;
                keys.insert(job.dedup_key.as_str()) & ids.insert(job.id.as_str())
            });
            self.insert_round(batch, &round, dedup_ttl_ms, &mut answers)?;
            pending = later;
        }
        let mut purged = 0;
        if purge {
            let now_ms = batch.iter().map(|r| r.now_ms).max().unwrap_or(i64::MIN);
            let statement = prepared(&self.conn, &mut self.purge, || PURGE_SQL.to_owned())?;
            run(statement, &[Value::Int(now_ms), Value::Int(DEDUP_PURGE_MAX)], |_| Ok(()))?;
            purged = self.conn.changes();
        }
        // Every index was admitted to a round or refused above.
        let missing = || Err(StoreError::Corrupt("a batched enqueue got no answer".to_owned()));
        Ok((answers.into_iter().map(|a| a.unwrap_or_else(missing)).collect(), purged, version))
    }

    /// Inserts jobs with distinct keys and ids: the keys first (a key held
    /// by an unexpired earlier job answers that job as a duplicate), then
    /// the jobs whose keys were taken.
    fn insert_round(
        &mut self,
        batch: &[Request],
        round: &[usize],
        dedup_ttl_ms: i64,
        answers: &mut [Option<Result<Enqueued>>],
    ) -> RawResult<()> {
        let mut taken = HashSet::with_capacity(round.len());
        for (shape, chunk) in bulk_chunks(round) {
            let statement = prepared(&self.conn, &mut self.take_keys[shape], || take_keys_sql(BULK_ROWS[shape]))?;
            let rows = chunk.iter().map(|&i| key_row(&batch[i].job, batch[i].now_ms, dedup_ttl_ms));
            let mut values = padded(rows, BULK_ROWS[shape]);
            values.push(Some(Value::Int(dedup_ttl_ms)));
            taken.extend(run_padded(statement, &values, |s| s.text(0))?.into_iter().flatten());
        }
        let mut fresh = Vec::with_capacity(round.len());
        for &i in round {
            let job = &batch[i].job;
            if taken.contains(job.dedup_key.as_str()) {
                fresh.push(i);
                continue;
            }
            let statement = prepared(&self.conn, &mut self.key_holder, || KEY_HOLDER_SQL.to_owned())?;
            let holder = run(statement, &[Value::Text(&job.dedup_key)], |s| s.text(0))?;
            answers[i] = Some(match holder.into_iter().flatten().next() {
                Some(first) => Ok(Enqueued { job_id: first, duplicate: true }),
                None => Err(StoreError::Corrupt(format!("dedup key {:?} vanished", job.dedup_key))),
            });
        }

        let mut inserted = HashSet::with_capacity(fresh.len());
        for (shape, chunk) in bulk_chunks(&fresh) {
            let statement = prepared(&self.conn, &mut self.insert_jobs[shape], || insert_jobs_sql(BULK_ROWS[shape]))?;
            let rows = chunk.iter().map(|&i| job_row(&batch[i].job, batch[i].now_ms));
            inserted
                .extend(run_padded(statement, &padded(rows, BULK_ROWS[shape]), |s| s.text(0))?.into_iter().flatten());
        }
        for i in fresh {
            let job = &batch[i].job;
            answers[i] = Some(if inserted.contains(job.id.as_str()) {
                Ok(Enqueued { job_id: job.id.clone(), duplicate: false })
            } else {
                let statement = prepared(&self.conn, &mut self.release_key, || RELEASE_KEY_SQL.to_owned())?;
                run(statement, &[Value::Text(&job.dedup_key), Value::Text(&job.id)], |_| Ok(()))?;
                Err(StoreError::Conflict("job id"))
            });
        }
        Ok(())
    }
}

/// Splits `rows` into chunks of at most the largest shape, each with the
/// index (in `BULK_ROWS`) of the smallest shape that holds it.
fn bulk_chunks(rows: &[usize]) -> impl Iterator<Item = (usize, &[usize])> {
    rows.chunks(BULK_ROWS[BULK_ROWS.len() - 1]).map(|chunk| {
        let shape = BULK_ROWS.iter().position(|&n| n >= chunk.len()).unwrap_or(BULK_ROWS.len() - 1);
        (shape, chunk)
    })
}

/// The values of `rows`, then NULL rows up to `shape` rows.
fn padded<'a, const N: usize>(rows: impl Iterator<Item = [Value<'a>; N]>, shape: usize) -> Vec<Option<Value<'a>>> {
    let mut values: Vec<Option<Value<'a>>> = rows.flatten().map(Some).collect();
    values.resize(shape * N, None);
    values
}

/// The statement in `slot`, prepared from `sql()` on first use.
fn prepared<'s>(
    conn: &Connection,
    slot: &'s mut Option<Statement>,
    sql: impl FnOnce() -> String,
) -> RawResult<&'s mut Statement> {
    if slot.is_none() {
        *slot = Some(conn.prepare(&sql())?);
    }
    Ok(slot.as_mut().expect("prepared above"))
}

/// Binds `values`, steps to the end collecting `read` of each row, and
/// resets the statement whatever happened.
fn run<T>(
    statement: &mut Statement,
    values: &[Value<'_>],
    read: impl FnMut(&Statement) -> RawResult<T>,
) -> RawResult<Vec<T>> {
    let values: Vec<Option<Value<'_>>> = values.iter().copied().map(Some).collect();
    run_padded(statement, &values, read)
}

fn run_padded<T>(
    statement: &mut Statement,
    values: &[Option<Value<'_>>],
    mut read: impl FnMut(&Statement) -> RawResult<T>,
) -> RawResult<Vec<T>> {
    let result = (|| {
        for (n, value) in values.iter().enumerate() {
            match value {
                Some(Value::Text(text)) => statement.bind_text(n + 1, text)?,
                Some(Value::Int(int)) => statement.bind_int(n + 1, *int)?,
                None => statement.bind_null(n + 1)?,
            }
        }
        let mut rows = Vec::new();
        while statement.step()? == Step::Row {
            rows.push(read(statement)?);
        }
        Ok(rows)
    })();
    statement.reset();
    result
}

/// Inserts one job inside the caller's transaction (through sqlx, with the
/// same statements as a batch of one), unless its dedup key is taken and
/// unexpired (then answers the first job's id as a duplicate).
pub(crate) async fn insert_job(
    conn: &mut SqliteConnection,
    job: &NewJob,
    now_ms: i64,
    dedup_ttl_ms: i64,
) -> Result<Result<Enqueued>> {
    let [key, id, agent, expires] = key_row(job, now_ms, dedup_ttl_ms);
    let took: Option<String> =
        bind(sqlx::query_scalar(sqlx::AssertSqlSafe(take_keys_sql(1))), [key, id, agent, expires])
            .bind(dedup_ttl_ms)
            .fetch_optional(&mut *conn)
            .await?;
    if took.is_none() {
        let first: String = sqlx::query_scalar(KEY_HOLDER_SQL).bind(&job.dedup_key).fetch_one(&mut *conn).await?;
        return Ok(Ok(Enqueued { job_id: first, duplicate: true }));
    }
    let inserted: Option<String> =
        bind(sqlx::query_scalar(sqlx::AssertSqlSafe(insert_jobs_sql(1))), job_row(job, now_ms))
            .fetch_optional(&mut *conn)
            .await?;
    if inserted.is_none() {
        sqlx::query(RELEASE_KEY_SQL).bind(&job.dedup_key).bind(&job.id).execute(&mut *conn).await?;
        return Ok(Err(StoreError::Conflict("job id")));
    }
    Ok(Ok(Enqueued { job_id: job.id.clone(), duplicate: false }))
}

/// Binds `values` in order to a sqlx query.
fn bind<'q, O, const N: usize>(
    mut query: sqlx::query::QueryScalar<'q, sqlx::Sqlite, O, sqlx::sqlite::SqliteArguments>,
    values: [Value<'q>; N],
) -> sqlx::query::QueryScalar<'q, sqlx::Sqlite, O, sqlx::sqlite::SqliteArguments> {
    for value in values {
        query = match value {
            Value::Text(text) => query.bind(text),
            Value::Int(int) => query.bind(int),
        };
    }
    query
}
