//! SQLite backend: one file, WAL journal, `synchronous = FULL` (an
//! acknowledged write survives power loss; the enqueue writer gets the same
//! guarantee from its own WAL fsync before each answer), foreign keys on, and the
//! embedded migrations of `migrations/sqlite`. All SQLite-specific SQL lives
//! in this module and its children: `group_commit` (the enqueue writer),
//! `queue` (claims, leases, dead letters), `delivery` (deliveries, usage),
//! `timers` (the scheduler's timers), `polls` (channel pollers' leases and
//! cursors) and `catalog` (the ingest path's cache of agents and allowed
//! senders).
//!
//! WAL checkpoints run off the request path: the writer's background
//! checkpointer (`group_commit`) copies the WAL into the database after
//! commits, and SQLite's automatic checkpoint inside a commit only fires as
//! a safety net once the WAL is far larger (`WAL_AUTOCHECKPOINT_PAGES`).
//!
//! Every transaction that reads and then writes starts with `BEGIN
//! IMMEDIATE`: it takes SQLite's write lock up front, so several processes on
//! one database serialise (waiting up to the busy timeout) instead of failing
//! a deferred transaction's lock upgrade.

mod catalog;
mod delivery;
mod group_commit;
mod polls;
mod queue;
mod timers;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use tinyfat_core::{AgentId, AgentName, EmailAddress, KeyId, SealedSecret, SenderPattern};

use crate::{
    Agent, AgentView, ApiToken, DeletedRows, MetadataStore, NewAgent, QueuePolicy, Result, SecretInfo, StoreError,
    StoredSecret, User,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

const POOL_CONNECTIONS_MAX: u32 = 8;
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Starts a write transaction that holds SQLite's write lock from the start.
const BEGIN_IMMEDIATE: &str = "BEGIN IMMEDIATE";
/// SQLite checkpoints inside a commit only past this many WAL pages (40 MB);
/// normally the background checkpointer keeps the WAL far smaller.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 10_000;
/// A WAL file left larger than this after a checkpoint is truncated.
const WAL_SIZE_LIMIT_BYTES: u64 = 64 * 1024 * 1024;

/// A handle on one SQLite database. Clones share the pool and the enqueue
/// writer task; the writer stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    url: String,
    policy: QueuePolicy,
    writer: group_commit::Writer,
    catalog: Arc<catalog::Catalog>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database a `sqlite://PATH` url names,
    /// with the default `QueuePolicy`.
    pub async fn open(url: &str) -> Result<Self> {
        Self::open_with(url, QueuePolicy::default()).await
    }

    /// Opens the database and starts the enqueue writer task (so this must
    /// run inside a Tokio runtime).
    pub async fn open_with(url: &str, policy: QueuePolicy) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string())
            .pragma("journal_size_limit", WAL_SIZE_LIMIT_BYTES.to_string());
        let db = options.get_filename().to_owned();
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        if in_memory || db.as_os_str().is_empty() {
            // The pool's connections and the enqueue writer's must share it.
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_CONNECTIONS_MAX)
            // Waits for a lock in steps of 20 µs to 1 ms instead of
            // SQLite's 1, 2, 5 … ms (`tinyfat_sqlite_raw::busy_wait`).
            .after_connect(|conn, _| Box::pin(tinyfat_sqlite_raw::set_busy_handler(conn, BUSY_TIMEOUT)))
            .connect_with(options)
            .await?;
        let catalog = Arc::new(catalog::Catalog::default());
        let writer_config = group_commit::WriterConfig {
            db,
            busy_timeout: BUSY_TIMEOUT,
            // The pool's pragmas; `synchronous = NORMAL` because the writer's
            // syncer makes each batch durable before answering (see
            // `group_commit`). `journal_mode = WAL` is stored in the file.
            // The default page cache (2 MB): with 16 MB, SQLite's walk of
            // the cache at the end of every transaction (`pcache1Truncate`)
            // took 5 % of the writer's time, more than the reads it saved.
            pragmas: format!(
                "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY; \
                 PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}; \
                 PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES};"
            ),
        };
        let writer = group_commit::Writer::spawn(writer_config, pool.clone(), policy, Arc::clone(&catalog)).await?;
        Ok(Self { pool, url: url.to_owned(), policy, writer, catalog })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub fn policy(&self) -> &QueuePolicy {
        &self.policy
    }

    /// Enqueues in a transaction of its own, bypassing the group-commit
    /// writer: one fsync per job. For comparison (the enqueue bench) and for
    /// tools that enqueue a single job; `JobQueue::enqueue` is the fast path.
    pub async fn enqueue_each(&self, job: crate::NewJob, now_ms: i64) -> Result<crate::Enqueued> {
        job.validate()?;
        let mut tx = self.pool.begin_with(BEGIN_IMMEDIATE).await?;
        let answer = group_commit::insert_job(&mut tx, &job, now_ms, self.policy.dedup_ttl_ms).await?;
        tx.commit().await?;
        answer
    }

    /// Reads an agent and its senders in one snapshot, tagged with the
    /// catalog version of that snapshot.
    async fn read_agent_view(&self, id_or_name: &str) -> Result<Option<AgentView>> {
        let by = if AgentId::parse(id_or_name).is_ok() { "a.id" } else { "a.name" };
        let mut tx = self.pool.begin().await?;
        let catalog_version: i64 =
            sqlx::query_scalar("SELECT version FROM catalog_version WHERE id = 1").fetch_one(&mut *tx).await?;
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents a JOIN users u ON u.id = a.owner_id WHERE {by} = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id_or_name).fetch_optional(&mut *tx).await?;
        let Some(agent) = row.as_ref().map(agent_from_row).transpose()? else {
            return Ok(None);
        };
        let senders = senders_of(&mut tx, &agent.id).await?;
        tx.commit().await?;
        Ok(Some(AgentView { agent, senders, catalog_version }))
    }
}

async fn senders_of(conn: &mut sqlx::SqliteConnection, agent: &AgentId) -> Result<Vec<SenderPattern>> {
    let rows = sqlx::query("SELECT pattern FROM allowed_senders WHERE agent_id = ? ORDER BY pattern")
        .bind(agent.as_str())
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|row| {
            let text: String = row.try_get("pattern")?;
            SenderPattern::parse(&text).map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .collect()
}

const AGENT_COLUMNS: &str = "a.id, a.name, a.email, a.owner_id, u.email AS owner_email, a.model, a.created_ms";

fn agent_from_row(row: &SqliteRow) -> Result<Agent> {
    let corrupt = |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt(format!("agent {what}: {e}"));
    Ok(Agent {
        id: AgentId::parse(row.try_get("id")?).map_err(|e| corrupt("id", &e))?,
        name: AgentName::parse(row.try_get("name")?).map_err(|e| corrupt("name", &e))?,
        email: EmailAddress::parse(row.try_get("email")?).map_err(|e| corrupt("email", &e))?,
        owner_id: row.try_get("owner_id")?,
        owner_email: EmailAddress::parse(row.try_get("owner_email")?).map_err(|e| corrupt("owner", &e))?,
        model: row.try_get("model")?,
        created_ms: row.try_get("created_ms")?,
    })
}

fn user_from_row(row: &SqliteRow) -> Result<User> {
    Ok(User {
        id: row.try_get("id")?,
        email: EmailAddress::parse(row.try_get("email")?).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        created_ms: row.try_get("created_ms")?,
    })
}

fn token_from_row(row: &SqliteRow) -> Result<ApiToken> {
    Ok(ApiToken {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        user_id: row.try_get("user_id")?,
        token_hash: row.try_get("token_hash")?,
        created_ms: row.try_get("created_ms")?,
        revoked_ms: row.try_get("revoked_ms")?,
    })
}

fn sealed_from_row(row: &SqliteRow) -> Result<SealedSecret> {
    Ok(SealedSecret {
        key_id: KeyId(row.try_get("key_id")?),
        nonce: row.try_get("nonce")?,
        ciphertext: row.try_get("ciphertext")?,
    })
}

/// Maps a unique-constraint failure to `Conflict`, naming the column.
fn conflict(err: sqlx::Error, what: &[(&str, &'static str)]) -> StoreError {
    if let sqlx::Error::Database(db) = &err
        && db.is_unique_violation()
    {
        let message = db.message();
        for (column, label) in what {
            if message.contains(column) {
                return StoreError::Conflict(label);
            }
        }
    }
    StoreError::Database(err)
}

#[async_trait]
impl MetadataStore for SqliteStore {
    async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn describe(&self) -> String {
        self.url.clone()
    }

    async fn upsert_user(&self, id_if_new: &str, email: &EmailAddress, now_ms: i64) -> Result<User> {
        sqlx::query("INSERT INTO users (id, email, created_ms) VALUES (?, ?, ?) ON CONFLICT (email) DO NOTHING")
            .bind(id_if_new)
            .bind(email.as_str())
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        self.user_by_email(email).await?.ok_or_else(|| StoreError::NotFound(format!("user {email}")))
    }

    async fn user_by_email(&self, email: &EmailAddress) -> Result<Option<User>> {
        let row = sqlx::query("SELECT id, email, created_ms FROM users WHERE email = ?")
            .bind(email.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn user_by_id(&self, id: &str) -> Result<Option<User>> {
        let row = sqlx::query("SELECT id, email, created_ms FROM users WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn insert_agent(&self, agent: &NewAgent) -> Result<Agent> {
        sqlx::query("INSERT INTO agents (id, name, email, owner_id, model, created_ms) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(agent.id.as_str())
            .bind(agent.name.as_str())
            .bind(agent.email.as_str())
            .bind(&agent.owner_id)
            .bind(&agent.model)
            .bind(agent.created_ms)
            .execute(&self.pool)
            .await
            .map_err(|e| {
                conflict(
                    e,
                    &[("agents.name", "agent name"), ("agents.email", "agent email"), ("agents.id", "agent id")],
                )
            })?;
        self.agent_by_id(&agent.id).await?.ok_or_else(|| StoreError::NotFound(agent.id.to_string()))
    }

    async fn agent_by_id(&self, id: &AgentId) -> Result<Option<Agent>> {
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents a JOIN users u ON u.id = a.owner_id WHERE a.id = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id.as_str()).fetch_optional(&self.pool).await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    async fn agent_by_name(&self, name: &str) -> Result<Option<Agent>> {
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents a JOIN users u ON u.id = a.owner_id WHERE a.name = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(name).fetch_optional(&self.pool).await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    async fn agent_by_email(&self, email: &EmailAddress) -> Result<Option<Agent>> {
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents a JOIN users u ON u.id = a.owner_id WHERE a.email = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(email.as_str()).fetch_optional(&self.pool).await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    async fn list_agents(&self, owner_id: Option<&str>) -> Result<Vec<Agent>> {
        let sql = format!(
            "SELECT {AGENT_COLUMNS} FROM agents a JOIN users u ON u.id = a.owner_id \
             WHERE ?1 IS NULL OR a.owner_id = ?1 ORDER BY a.name"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(owner_id).fetch_all(&self.pool).await?;
        rows.iter().map(agent_from_row).collect()
    }

    async fn set_agent_model(&self, id: &AgentId, model: &str) -> Result<()> {
        let done = sqlx::query("UPDATE agents SET model = ? WHERE id = ?")
            .bind(model)
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        self.catalog.clear();
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(id.to_string()));
        }
        Ok(())
    }

    async fn delete_agent(&self, id: &AgentId) -> Result<DeletedRows> {
        let mut tx = self.pool.begin_with(BEGIN_IMMEDIATE).await?;
        let mut delete = async |sql: &'static str| -> Result<u64> {
            Ok(sqlx::query(sql).bind(id.as_str()).execute(&mut *tx).await?.rows_affected())
        };
        let senders = delete("DELETE FROM allowed_senders WHERE agent_id = ?").await?;
        let secrets = delete("DELETE FROM secrets WHERE agent_id = ?").await?;
        let dead_letters = delete("DELETE FROM jobs WHERE agent_id = ? AND state = 'dead'").await?;
        let jobs = delete("DELETE FROM jobs WHERE agent_id = ?").await?;
        delete("DELETE FROM agent_leases WHERE agent_id = ?").await?;
        let deliveries = delete("DELETE FROM deliveries WHERE agent_id = ?").await?;
        let usage_days = delete("DELETE FROM usage_daily WHERE agent_id = ?").await?;
        let timers = delete("DELETE FROM timers WHERE agent_id = ?").await?;
        let agents = delete("DELETE FROM agents WHERE id = ?").await?;
        tx.commit().await?;
        self.catalog.clear();
        Ok(DeletedRows { agents, senders, secrets, jobs, dead_letters, deliveries, usage_days, timers })
    }

    async fn add_sender(&self, agent: &AgentId, pattern: &SenderPattern, now_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO allowed_senders (agent_id, pattern, created_ms) VALUES (?, ?, ?) \
             ON CONFLICT (agent_id, pattern) DO NOTHING",
        )
        .bind(agent.as_str())
        .bind(pattern.to_string())
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        self.catalog.clear();
        Ok(done.rows_affected() == 1)
    }

    async fn remove_sender(&self, agent: &AgentId, pattern: &SenderPattern) -> Result<bool> {
        let done = sqlx::query("DELETE FROM allowed_senders WHERE agent_id = ? AND pattern = ?")
            .bind(agent.as_str())
            .bind(pattern.to_string())
            .execute(&self.pool)
            .await?;
        self.catalog.clear();
        Ok(done.rows_affected() == 1)
    }

    async fn list_senders(&self, agent: &AgentId) -> Result<Vec<SenderPattern>> {
        senders_of(&mut *self.pool.acquire().await?, agent).await
    }

    async fn agent_view(&self, id_or_name: &str, fresh: bool) -> Result<Option<Arc<AgentView>>> {
        if !fresh && let Some(view) = self.catalog.get(id_or_name) {
            return Ok(Some(view));
        }
        let generation = self.catalog.generation();
        let Some(view) = self.read_agent_view(id_or_name).await? else {
            return Ok(None);
        };
        let view = Arc::new(view);
        self.catalog.remember(id_or_name, Arc::clone(&view), generation);
        Ok(Some(view))
    }

    async fn put_secret(&self, agent: &AgentId, name: &str, sealed: &SealedSecret, now_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO secrets (agent_id, name, key_id, nonce, ciphertext, updated_ms) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (agent_id, name) DO UPDATE SET key_id = excluded.key_id, nonce = excluded.nonce, \
             ciphertext = excluded.ciphertext, updated_ms = excluded.updated_ms",
        )
        .bind(agent.as_str())
        .bind(name)
        .bind(&sealed.key_id.0)
        .bind(&sealed.nonce)
        .bind(&sealed.ciphertext)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_secret(&self, agent: &AgentId, name: &str) -> Result<Option<SealedSecret>> {
        let row = sqlx::query("SELECT key_id, nonce, ciphertext FROM secrets WHERE agent_id = ? AND name = ?")
            .bind(agent.as_str())
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(sealed_from_row).transpose()
    }

    async fn list_secrets(&self, agent: &AgentId) -> Result<Vec<SecretInfo>> {
        let rows = sqlx::query("SELECT name, key_id, updated_ms FROM secrets WHERE agent_id = ? ORDER BY name")
            .bind(agent.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(SecretInfo {
                    name: row.try_get("name")?,
                    key_id: row.try_get("key_id")?,
                    updated_ms: row.try_get("updated_ms")?,
                })
            })
            .collect()
    }

    async fn delete_secret(&self, agent: &AgentId, name: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM secrets WHERE agent_id = ? AND name = ?")
            .bind(agent.as_str())
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn all_secrets(&self) -> Result<Vec<StoredSecret>> {
        let rows = sqlx::query("SELECT agent_id, name, key_id, nonce, ciphertext FROM secrets ORDER BY agent_id, name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(StoredSecret {
                    agent_id: AgentId::parse(row.try_get("agent_id")?)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    name: row.try_get("name")?,
                    sealed: sealed_from_row(row)?,
                })
            })
            .collect()
    }

    async fn reseal_secrets(&self, resealed: &[StoredSecret], now_ms: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for s in resealed {
            sqlx::query(
                "UPDATE secrets SET key_id = ?, nonce = ?, ciphertext = ?, updated_ms = ? WHERE agent_id = ? AND name = ?",
            )
            .bind(&s.sealed.key_id.0)
            .bind(&s.sealed.nonce)
            .bind(&s.sealed.ciphertext)
            .bind(now_ms)
            .bind(s.agent_id.as_str())
            .bind(&s.name)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn insert_token(&self, token: &ApiToken) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_tokens (id, name, user_id, token_hash, created_ms, revoked_ms) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&token.id)
        .bind(&token.name)
        .bind(&token.user_id)
        .bind(&token.token_hash)
        .bind(token.created_ms)
        .bind(token.revoked_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| conflict(e, &[("api_tokens", "token")]))?;
        Ok(())
    }

    async fn token_by_hash(&self, token_hash: &str) -> Result<Option<ApiToken>> {
        let row = sqlx::query("SELECT * FROM api_tokens WHERE token_hash = ?")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn list_tokens(&self) -> Result<Vec<ApiToken>> {
        let rows = sqlx::query("SELECT * FROM api_tokens ORDER BY created_ms").fetch_all(&self.pool).await?;
        rows.iter().map(token_from_row).collect()
    }

    async fn revoke_token(&self, id: &str, now_ms: i64) -> Result<bool> {
        let done = sqlx::query("UPDATE api_tokens SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL")
            .bind(now_ms)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}
