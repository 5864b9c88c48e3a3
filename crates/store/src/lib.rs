//! The metadata store: users, agents, allowed senders, encrypted secrets, API
//! tokens, the durable job queue with agent leases and dead letters, outbound
//! deliveries and daily token usage.
//!
//! Callers see only the traits (`MetadataStore`, `JobQueue`, `Deliveries`,
//! `UsageLedger`, and `Store`, which is all of them) and the row types. Each
//! backend owns its SQL and its migrations (`migrations/<backend>/`), so a
//! PostgreSQL backend can follow without changing a caller.
//!
//! Architecture invariant: the store never sees a plaintext secret; it keeps
//! what `tinyfat_core::Cipher` sealed. Times are Unix milliseconds passed in
//! by the caller; the store reads no clock and draws no randomness.

pub mod delivery;
pub mod polls;
pub mod queue;
mod sqlite;
pub mod timers;

use std::sync::Arc;

use async_trait::async_trait;
use tinyfat_core::{AgentId, AgentName, EmailAddress, SealedSecret, SenderPattern};

pub use delivery::{Deliveries, Delivery, DeliveryState, InsertedDelivery, NewDelivery, UsageLedger};
pub use polls::Polls;
pub use queue::{
    AgentQueueStatus, Claim, Enqueued, Failure, Job, JobOutcome, JobQueue, JobState, Lease, NewJob, Outcome,
    QueueCounts, QueuePolicy, Settled, backoff_ms,
};
pub use sqlite::SqliteStore;
pub use timers::{TimerRow, Timers};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint refused the write; the string names what clashed.
    #[error("{0} already exists")]
    Conflict(&'static str),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("unsupported database url {0:?}: use sqlite://PATH (postgres:// is not available yet)")]
    UnsupportedUrl(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The caller's input breaks a bound or format; retrying cannot help.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A group commit failed; no job of that batch was stored. Retry later
    /// (a webhook answers 5xx so the provider retries).
    #[error("enqueue was not committed: {0}")]
    Commit(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// A batch was committed but the WAL fsync that makes it durable failed:
    /// its jobs may not survive a crash. Retry (the dedup key makes that
    /// safe); the writer refuses every later enqueue until the store is
    /// opened again, because after a failed fsync the kernel may have
    /// dropped the unsynced pages.
    #[error("enqueue was committed but not made durable (WAL fsync failed): {0}")]
    Sync(#[source] Arc<std::io::Error>),
    /// The enqueue writer task has stopped (the runtime is shutting down).
    #[error("the queue writer has stopped")]
    Closed,
    /// `enqueue_checked`: agents or allowed senders changed after the
    /// caller's view was read; nothing was stored. Re-read and re-check.
    #[error("the agent catalog changed; re-check the sender")]
    CatalogChanged,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub email: EmailAddress,
    pub created_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    pub id: AgentId,
    pub name: AgentName,
    pub email: EmailAddress,
    pub owner_id: String,
    pub owner_email: EmailAddress,
    pub model: String,
    pub created_ms: i64,
}

/// What `insert_agent` needs; `owner_email` is resolved by the store.
#[derive(Clone, Debug)]
pub struct NewAgent {
    pub id: AgentId,
    pub name: AgentName,
    pub email: EmailAddress,
    pub owner_id: String,
    pub model: String,
    pub created_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretInfo {
    pub name: String,
    pub key_id: String,
    pub updated_ms: i64,
}

/// One stored secret, for re-encryption during key rotation.
#[derive(Clone, Debug)]
pub struct StoredSecret {
    pub agent_id: AgentId,
    pub name: String,
    pub sealed: SealedSecret,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiToken {
    pub id: String,
    pub name: String,
    /// `None`: an operator token that acts on every agent.
    pub user_id: Option<String>,
    pub token_hash: String,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// Rows removed by `delete_agent`, for the user's confirmation message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeletedRows {
    pub agents: u64,
    pub senders: u64,
    pub secrets: u64,
    /// Jobs that were not dead letters (queued, running, done).
    pub jobs: u64,
    pub dead_letters: u64,
    pub deliveries: u64,
    /// Days of token usage.
    pub usage_days: u64,
    /// Scheduler timers (one per event directory).
    pub timers: u64,
}

/// An agent and its allowed senders as of one `catalog_version` (the
/// counter every change to agents, users or allowed senders bumps).
#[derive(Clone, Debug)]
pub struct AgentView {
    pub agent: Agent,
    pub senders: Vec<SenderPattern>,
    pub catalog_version: i64,
}

#[async_trait]
pub trait MetadataStore: Send + Sync + std::fmt::Debug {
    /// Applies pending migrations; safe to call on every start.
    async fn migrate(&self) -> Result<()>;
    /// A cheap round trip, for readiness.
    async fn ping(&self) -> Result<()>;
    fn describe(&self) -> String;

    async fn upsert_user(&self, id_if_new: &str, email: &EmailAddress, now_ms: i64) -> Result<User>;
    async fn user_by_email(&self, email: &EmailAddress) -> Result<Option<User>>;
    async fn user_by_id(&self, id: &str) -> Result<Option<User>>;

    /// Fails with `Conflict("agent name")` or `Conflict("agent email")`.
    async fn insert_agent(&self, agent: &NewAgent) -> Result<Agent>;
    async fn agent_by_id(&self, id: &AgentId) -> Result<Option<Agent>>;
    async fn agent_by_name(&self, name: &str) -> Result<Option<Agent>>;
    async fn agent_by_email(&self, email: &EmailAddress) -> Result<Option<Agent>>;
    /// All agents, or those of one user, ordered by name.
    async fn list_agents(&self, owner_id: Option<&str>) -> Result<Vec<Agent>>;
    async fn set_agent_model(&self, id: &AgentId, model: &str) -> Result<()>;
    /// Removes the agent and every row that belongs to it, in one transaction:
    /// senders, secrets, jobs (dead letters included), their dedup keys, the
    /// agent's lease, deliveries, usage and timers. A worker holding the lease finds
    /// it lost at its next renewal.
    async fn delete_agent(&self, id: &AgentId) -> Result<DeletedRows>;

    /// Returns false when the rule was already there.
    async fn add_sender(&self, agent: &AgentId, pattern: &SenderPattern, now_ms: i64) -> Result<bool>;
    /// Returns false when there was no such rule.
    async fn remove_sender(&self, agent: &AgentId, pattern: &SenderPattern) -> Result<bool>;
    async fn list_senders(&self, agent: &AgentId) -> Result<Vec<SenderPattern>>;
    /// The agent `id_or_name` names (an agent id if it parses as one, else a
    /// name) with its allowed senders, read in one snapshot. Unless `fresh`,
    /// from an in-memory cache that may lag a change made by another process
    /// (never one made through this store): admit with
    /// `JobQueue::enqueue_checked`, which refuses a job whose view is stale,
    /// and re-check a rejection with `fresh`.
    async fn agent_view(&self, id_or_name: &str, fresh: bool) -> Result<Option<Arc<AgentView>>>;

    async fn put_secret(&self, agent: &AgentId, name: &str, sealed: &SealedSecret, now_ms: i64) -> Result<()>;
    async fn get_secret(&self, agent: &AgentId, name: &str) -> Result<Option<SealedSecret>>;
    async fn list_secrets(&self, agent: &AgentId) -> Result<Vec<SecretInfo>>;
    async fn delete_secret(&self, agent: &AgentId, name: &str) -> Result<bool>;
    async fn all_secrets(&self) -> Result<Vec<StoredSecret>>;
    /// Replaces the given secrets' ciphertexts in one transaction (key rotation).
    async fn reseal_secrets(&self, resealed: &[StoredSecret], now_ms: i64) -> Result<()>;

    async fn insert_token(&self, token: &ApiToken) -> Result<()>;
    async fn token_by_hash(&self, token_hash: &str) -> Result<Option<ApiToken>>;
    async fn list_tokens(&self) -> Result<Vec<ApiToken>>;
    /// Returns false when no live token has that id.
    async fn revoke_token(&self, id: &str, now_ms: i64) -> Result<bool>;
}

/// Everything the store offers, as one object: `Arc<dyn Store>` upcasts to
/// `Arc<dyn MetadataStore>`, `Arc<dyn JobQueue>` and the others.
pub trait Store: MetadataStore + JobQueue + Deliveries + UsageLedger + Timers + Polls {}

impl<T: MetadataStore + JobQueue + Deliveries + UsageLedger + Timers + Polls + ?Sized> Store for T {}

/// Opens the store a `database_url` names, with the default `QueuePolicy`.
pub async fn connect(database_url: &str) -> Result<Arc<dyn Store>> {
    connect_with(database_url, QueuePolicy::default()).await
}

/// Opens the store a `database_url` names. Must run inside a Tokio runtime:
/// the store starts its enqueue writer task.
pub async fn connect_with(database_url: &str, policy: QueuePolicy) -> Result<Arc<dyn Store>> {
    if database_url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open_with(database_url, policy).await?))
    } else {
        Err(StoreError::UnsupportedUrl(database_url.to_owned()))
    }
}
