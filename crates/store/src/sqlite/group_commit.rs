//! The enqueue writer: group commit for SQLite.
//!
//! One OS thread per store owns every enqueue, on a SQLite connection of its
//! own that it calls directly (`tinyfat-sqlite-raw`: no thread hop per
//! statement, as sqlx would make). Callers put their job on a bounded
//! channel and wait on a oneshot. The thread takes everything waiting (up to
//! `enqueue_batch_max`) and writes it in ONE `BEGIN IMMEDIATE` transaction:
//! one multi-row `INSERT OR IGNORE` into `jobs`, every value a bound
//! parameter, through statements prepared once per row count (`BULK_ROWS`).
//! A job whose dedup key is held (the partial unique index `jobs_dedup`) or
//! whose id is taken is skipped by that insert; only when some row was
//! skipped does the writer look up each key's holder to answer its caller
//! (and release a key whose holder expired, then insert again). Batches
//! form by themselves: while one batch is written, the next callers queue up, so
//! there is no timer and no added latency when idle.
//!
//! Pipelined durability: the writer's connection commits with `synchronous
//! = NORMAL` (the WAL frames are written, not synced), and a syncer thread
//! `fdatasync`s the WAL file and only then answers the callers of the batch
//! committed before that sync began. So the next batch is written while the
//! previous one syncs. The writer hands over one committed batch at a time
//! (`Handoff`): it collects its next batch only once the syncer took the
//! last, so under load the callers that arrive during a sync join one
//! bigger batch (fewer commits, fewer WAL pages per job) instead of several.
//! A commit seen by another connection before its sync is safe: any write
//! that builds on it (a claim, under `synchronous = FULL` like
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
//! fail a batch of others. This module does not claim jobs, nor change one
//! after its insert except to release the dedup key of a job whose hold
//! expired (`dedup_released`).

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

/// Row counts the bulk statements are prepared for: a bulk of `n` rows
/// binds the smallest that holds it and pads the rest with NULL rows, which
/// the statements filter out. Five shapes per statement, each prepared once.
const BULK_ROWS: [usize; 5] = [1, 4, 16, 64, 256];
/// Values per row of `insert_jobs_sql`.
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
    /// Which connection of the writer committed them (it opens a new one
    /// after a failed batch); every batch in `committed` has the same one,
    /// since the writer waits for the syncer to take each batch.
    connection: u64,
    /// The writer is gone: the syncer ends once `committed` is empty.
    closed: bool,
}

impl Handoff {
    fn lock(&self) -> std::sync::MutexGuard<'_, HandoffState> {
        // Both sides keep the state whole between statements.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The writer: passes a committed batch on.
    fn give(&self, answers: Vec<Answer>, connection: u64) {
        let mut state = self.lock();
        state.committed.extend(answers);
        state.connection = connection;
        drop(state);
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

    /// The syncer: takes what was committed (and by which connection),
    /// waiting for some; `None` once the writer is gone and everything was
    /// taken.
    fn take(&self) -> Option<(Vec<Answer>, u64)> {
        let mut state = self.lock();
        while state.committed.is_empty() {
            if state.closed {
                return None;
            }
            state = self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let taken = (std::mem::take(&mut state.committed), state.connection);
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
    let mut writer = Some(writer);
    // Counts the writer's connections, for the syncer (`HandoffState`).
    let mut connection = 0u64;
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
        let written = match writer.take() {
            Some(w) => Ok(w),
            // Opened again after a failed batch, in case its connection broke.
            None => {
                connection += 1;
                BatchWriter::open(config)
            }
        }
        .and_then(|mut w| {
            let answers = w.write(&batch, policy.dedup_ttl_ms)?;
            writer = Some(w);
            Ok(answers)
        });
        match written {
            Ok((answers, version)) => {
                catalog.observe(version);
                committed.send_replace(());
                to_sync.give(batch.drain(..).map(|request| request.reply).zip(answers).collect(), connection);
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
    let mut file: Option<HeldWal> = None;
    let mut failed: Option<Arc<std::io::Error>> = None;
    while let Some((pending, connection)) = handoff.take() {
        if failed.is_none()
            && let Err(error) = sync_file(wal, &mut file, connection)
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

/// `fdatasync` of the WAL file the writer's `connection` commits into.
/// SQLite never replaces the WAL while a connection has the database open
/// (it deletes it when the last one closes), so within one connection of
/// the writer the file at `wal` must stay the one first seen: if another
/// file took its path (the WAL was deleted, and a new connection made a
/// fresh one), the commits went into the deleted file and cannot be made
/// durable, which is an error, not a sync of the new file. A new connection
/// of the writer (after a failed batch) opens the file at `wal` again.
fn sync_file(wal: &Path, held: &mut Option<HeldWal>, connection: u64) -> std::io::Result<()> {
    let inode = std::fs::metadata(wal)?.ino();
    let wal_file = match held {
        Some(h) if h.connection == connection && h.inode != inode => {
            return Err(std::io::Error::other(
                "the WAL file was replaced under the open database: its commits cannot be made durable",
            ));
        }
        Some(h) if h.connection == connection => &h.file,
        _ => &held.insert(HeldWal { file: File::open(wal)?, inode, connection }).file,
    };
    wal_file.sync_data()
}

/// The WAL file the syncer holds open, and which connection of the writer
/// it was opened for.
struct HeldWal {
    file: File,
    inode: u64,
    connection: u64,
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

/// Inserts queued jobs, skipping (OR IGNORE) any whose dedup key is held
/// or whose id is taken. Rows: id, dedup key, agent id, session, kind,
/// payload, now. No RETURNING: the connection's change count tells whether
/// every row went in, which is the common case, and RETURNING costs every
/// row a trip through a temporary table.
fn insert_jobs_sql(rows: usize) -> String {
    format!(
        "INSERT OR IGNORE INTO jobs (id, dedup_key, agent_id, session, kind, payload, state, attempts, failures, \
         next_run_at_ms, created_ms, updated_ms) \
         SELECT column1, column2, column3, column4, column5, column6, 'queued', 0, 0, column7, column7, column7 \
         FROM (VALUES {}) WHERE column1 IS NOT NULL",
        values_rows(rows, JOB_COLUMNS)
    )
}

/// The job holding a key, and when it took it.
const KEY_HOLDER_SQL: &str = "SELECT id, created_ms FROM jobs WHERE dedup_key = ? AND dedup_released = 0";
/// Frees the key of a job whose hold expired, for the job taking it over.
const RELEASE_KEY_SQL: &str = "UPDATE jobs SET dedup_released = 1 WHERE id = ?";
const CATALOG_VERSION_SQL: &str = "SELECT version FROM catalog_version WHERE id = 1";

/// What an insert that may have been skipped meant for one job, read from
/// its key's holder after the insert.
enum Verdict {
    /// The caller's answer: inserted (the job holds its key; a job
    /// re-enqueued under its own id and key lands here too, exactly one such
    /// job existing either way), a duplicate of the earlier job holding the
    /// key within the TTL, or a conflict (nobody holds the key, so the
    /// insert was skipped for the job id).
    Answer(Result<Enqueued>),
    /// The holder's TTL ran out: release this job's key and insert again.
    Expired(String),
}

fn verdict(job: &NewJob, holder: Option<(String, i64)>, now_ms: i64, dedup_ttl_ms: i64) -> Verdict {
    Verdict::Answer(match holder {
        Some((id, _)) if id == job.id => Ok(Enqueued { job_id: id, duplicate: false }),
        Some((id, created_ms)) if created_ms <= now_ms.saturating_sub(dedup_ttl_ms) => return Verdict::Expired(id),
        Some((id, _)) => Ok(Enqueued { job_id: id, duplicate: true }),
        None => Err(StoreError::Conflict("job id")),
    })
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
    insert_jobs: [Option<Statement>; BULK_ROWS.len()],
    key_holder: Option<Statement>,
    release_key: Option<Statement>,
    catalog_version: Option<Statement>,
}

type RawResult<T> = std::result::Result<T, tinyfat_sqlite_raw::Error>;

impl BatchWriter {
    fn open(config: &WriterConfig) -> RawResult<Self> {
        let conn = Connection::open(&config.db, config.busy_timeout)?;
        conn.execute_batch(&config.pragmas)?;
        Ok(Self { conn, insert_jobs: Default::default(), key_holder: None, release_key: None, catalog_version: None })
    }

    /// One transaction for the whole batch. Answers the catalog version the
    /// transaction saw. The outer error fails the batch (rolled back); an
    /// inner error belongs to one caller (its job id was taken, or its
    /// catalog view is stale).
    fn write(&mut self, batch: &[Request], dedup_ttl_ms: i64) -> RawResult<(Vec<Result<Enqueued>>, i64)> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let written = self.write_in_transaction(batch, dedup_ttl_ms).and_then(|answers| {
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
    ) -> RawResult<(Vec<Result<Enqueued>>, i64)> {
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
        // In batch order, so a job that repeats an earlier one's key or id
        // is skipped in its favour, as if inserted one by one. Only jobs
        // whose expired key was released come round again.
        while !pending.is_empty() {
            pending = self.insert_round(batch, &pending, dedup_ttl_ms, &mut answers)?;
        }
        // Every index was answered or refused above.
        let missing = || Err(StoreError::Corrupt("a batched enqueue got no answer".to_owned()));
        Ok((answers.into_iter().map(|a| a.unwrap_or_else(missing)).collect(), version))
    }

    /// Inserts the jobs of `round` and answers them; returns those to insert
    /// again (their key's holder expired and was released).
    fn insert_round(
        &mut self,
        batch: &[Request],
        round: &[usize],
        dedup_ttl_ms: i64,
        answers: &mut [Option<Result<Enqueued>>],
    ) -> RawResult<Vec<usize>> {
        let mut skipped = false;
        for (shape, chunk) in bulk_chunks(round) {
            let statement = prepared(&self.conn, &mut self.insert_jobs[shape], || insert_jobs_sql(BULK_ROWS[shape]))?;
            let rows = chunk.iter().map(|&i| job_row(&batch[i].job, batch[i].now_ms));
            run_padded(statement, &padded(rows, BULK_ROWS[shape]), |_| Ok(()))?;
            skipped |= self.conn.changes() < chunk.len() as u64;
        }
        if !skipped {
            for &i in round {
                answers[i] = Some(Ok(Enqueued { job_id: batch[i].job.id.clone(), duplicate: false }));
            }
            return Ok(Vec::new());
        }
        // Some row was skipped: each key's holder tells which, and why.
        let mut again = Vec::new();
        let mut released = HashSet::new();
        for &i in round {
            let job = &batch[i].job;
            if released.contains(job.dedup_key.as_str()) {
                // An earlier job of this round takes the released key first.
                again.push(i);
                continue;
            }
            let statement = prepared(&self.conn, &mut self.key_holder, || KEY_HOLDER_SQL.to_owned())?;
            let holder = run(statement, &[Value::Text(&job.dedup_key)], |s| Ok((s.text(0)?, s.int(1)?)))?
                .into_iter()
                .find_map(|(id, created_ms)| Some((id?, created_ms)));
            match verdict(job, holder, batch[i].now_ms, dedup_ttl_ms) {
                Verdict::Answer(answer) => answers[i] = Some(answer),
                Verdict::Expired(holder) => {
                    let statement = prepared(&self.conn, &mut self.release_key, || RELEASE_KEY_SQL.to_owned())?;
                    run(statement, &[Value::Text(&holder)], |_| Ok(()))?;
                    released.insert(job.dedup_key.as_str());
                    again.push(i);
                }
            }
        }
        Ok(again)
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
/// same statements as a batch of one), unless its dedup key is held within
/// the TTL (then answers the first job's id as a duplicate).
pub(crate) async fn insert_job(
    conn: &mut SqliteConnection,
    job: &NewJob,
    now_ms: i64,
    dedup_ttl_ms: i64,
) -> Result<Result<Enqueued>> {
    loop {
        let inserted = bind(sqlx::query(sqlx::AssertSqlSafe(insert_jobs_sql(1))), job_row(job, now_ms))
            .execute(&mut *conn)
            .await?;
        if inserted.rows_affected() == 1 {
            return Ok(Ok(Enqueued { job_id: job.id.clone(), duplicate: false }));
        }
        let holder: Option<(String, i64)> =
            sqlx::query_as(KEY_HOLDER_SQL).bind(&job.dedup_key).fetch_optional(&mut *conn).await?;
        match verdict(job, holder, now_ms, dedup_ttl_ms) {
            Verdict::Answer(answer) => return Ok(answer),
            // Released: the next insert takes the key.
            Verdict::Expired(holder) => {
                sqlx::query(RELEASE_KEY_SQL).bind(holder).execute(&mut *conn).await?;
            }
        }
    }
}

/// Binds `values` in order to a sqlx query.
fn bind<'q, const N: usize>(
    mut query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    values: [Value<'q>; N],
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    for value in values {
        query = match value {
            Value::Text(text) => query.bind(text),
            Value::Int(int) => query.bind(int),
        };
    }
    query
}
