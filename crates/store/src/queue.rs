//! The durable job queue as callers see it: the `JobQueue` trait, its row and
//! result types, the `QueuePolicy` and the backoff rule.
//!
//! This module owns the queue's *semantics* — what a state means, when a
//! failure dead-letters a job, how long a retry waits — and holds no SQL and
//! no I/O: each backend implements `JobQueue` with its own SQL. It reads no
//! clock and draws no randomness; times and jitter come from the caller.
//!
//! Life of a job: `queued` → (`claim_next`) `running` → (`finish`) `done`, back
//! to `queued` (retry after a backoff, or release), or `dead` (a dead letter,
//! kept with its `last_error` until replayed or purged).
//!
//! Architecture invariants:
//! - An acknowledged `enqueue` is committed: it returns only after the
//!   transaction holding the job is durable.
//! - At most one turn per agent: a job is `running` only under its agent's
//!   current lease, and every acquisition of a lease increments its fencing
//!   `epoch`. A call that names a superseded epoch changes nothing.
//! - Waiting for a lease is never an attempt: jobs of a leased agent are
//!   skipped by `claim_next`, not touched.

use async_trait::async_trait;
use tinyfat_core::{AgentId, SessionId};

use crate::{Result, StoreError};

/// Longest dedup key accepted (Slack `slack:{team}:{channel}:{ts}` and email
/// Message-IDs stay far below it).
pub const DEDUP_KEY_BYTES_MAX: usize = 1024;
/// Largest job payload. Bodies larger than this (raw email, attachments) are
/// staged as files and the payload names them.
pub const JOB_PAYLOAD_BYTES_MAX: usize = 1024 * 1024;
/// Longest job kind (`message`, `event`, `command`, ...).
pub const JOB_KIND_BYTES_MAX: usize = 64;
/// Longest lease owner name.
pub const LEASE_OWNER_BYTES_MAX: usize = 256;
/// `last_error` is cut to this many bytes (at a character boundary).
pub const ERROR_BYTES_MAX: usize = 4096;
/// The `last_error` a job gets when its worker lost the lease mid-turn.
pub const LEASE_LOST_ERROR: &str = "the worker lost its lease mid-turn (crashed, killed or stalled)";

/// Queue settings (`queue.*` in the configuration) and the store's own bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueuePolicy {
    /// A dedup key is unique for this long after its first enqueue
    /// (`queue.dedup_ttl`, 7 days: longer than any provider's retry window).
    pub dedup_ttl_ms: i64,
    /// First retry waits up to this long; each failure doubles it.
    pub retry_base_ms: i64,
    /// No retry waits longer than this.
    pub retry_cap_ms: i64,
    /// Transient failures retry until this long after the first one
    /// (`queue.retry_window`, 6 h), then the job is dead.
    pub retry_window_ms: i64,
    /// Failures of our own (including a worker lost mid-turn) before the job
    /// is dead (`queue.max_attempts`, 8).
    pub attempts_max: u32,
    /// Most jobs one claim takes (one turn's batch).
    pub claim_batch_max: u32,
    /// Most enqueues written in one group-commit transaction.
    pub enqueue_batch_max: usize,
    /// Enqueues waiting for the writer; when full, `enqueue` waits.
    pub enqueue_pending_max: usize,
}

impl Default for QueuePolicy {
    fn default() -> Self {
        Self {
            dedup_ttl_ms: 7 * 24 * 3600 * 1000,
            retry_base_ms: 2_000,
            retry_cap_ms: 10 * 60 * 1000,
            retry_window_ms: 6 * 3600 * 1000,
            attempts_max: 8,
            claim_batch_max: 100,
            enqueue_batch_max: 256,
            enqueue_pending_max: 4096,
        }
    }
}

/// The wait before retry number `failures` (1 = after the first failure):
/// full jitter over an exponential ceiling, `jitter × min(cap, base × 2^(failures-1))`.
/// `jitter` is a uniform sample from `[0, 1)` the caller drew; it is clamped.
pub fn backoff_ms(policy: &QueuePolicy, failures: u32, jitter: f64) -> i64 {
    let exponent = failures.saturating_sub(1).min(62);
    let ceiling = policy.retry_base_ms.max(0).saturating_mul(1_i64 << exponent).min(policy.retry_cap_ms.max(0));
    let jitter = if jitter.is_finite() { jitter.clamp(0.0, 1.0) } else { 0.0 };
    (ceiling as f64 * jitter) as i64
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    Queued,
    Running,
    Done,
    Dead,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Done => "done",
            Self::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "done" => Self::Done,
            "dead" => Self::Dead,
            other => return Err(StoreError::Corrupt(format!("job state {other:?}"))),
        })
    }
}

/// What `enqueue` needs. Ids are ULID strings the caller made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewJob {
    pub id: String,
    /// E.g. `telegram:{bot_id}:{update_id}` (SPEC §4). Unique within `dedup_ttl_ms`.
    pub dedup_key: String,
    pub agent_id: AgentId,
    pub session: SessionId,
    /// `message`, `event`, `command`, ...: the worker interprets it.
    pub kind: String,
    /// JSON text.
    pub payload: String,
}

impl NewJob {
    /// Checks the bounds before the job reaches a transaction, so one bad job
    /// never fails a group commit that carries other callers' jobs.
    pub fn validate(&self) -> Result<()> {
        let invalid = |what: String| Err(StoreError::Invalid(what));
        if self.id.is_empty() || self.id.len() > 64 {
            return invalid(format!("job id {:?}", self.id));
        }
        if self.dedup_key.is_empty() || self.dedup_key.len() > DEDUP_KEY_BYTES_MAX {
            return invalid(format!("dedup key must be 1..={DEDUP_KEY_BYTES_MAX} bytes"));
        }
        if self.kind.is_empty() || self.kind.len() > JOB_KIND_BYTES_MAX {
            return invalid(format!("job kind must be 1..={JOB_KIND_BYTES_MAX} bytes"));
        }
        validate_payload(&self.payload)
    }
}

/// A job payload is JSON of at most `JOB_PAYLOAD_BYTES_MAX` bytes.
pub fn validate_payload(payload: &str) -> Result<()> {
    if payload.len() > JOB_PAYLOAD_BYTES_MAX {
        return Err(StoreError::Invalid(format!("job payload over {JOB_PAYLOAD_BYTES_MAX} bytes")));
    }
    if serde_json::from_str::<serde::de::IgnoredAny>(payload).is_err() {
        return Err(StoreError::Invalid("job payload is not JSON".to_owned()));
    }
    Ok(())
}

/// The answer to `enqueue`: the job's id, and whether the dedup key was
/// already taken (then nothing was inserted and `job_id` is the first job's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enqueued {
    pub job_id: String,
    pub duplicate: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    pub dedup_key: String,
    pub agent_id: AgentId,
    pub session: SessionId,
    pub kind: String,
    pub payload: String,
    pub state: JobState,
    /// Failures of our own: `Failure::Internal` and workers lost mid-turn.
    /// Dead at `attempts_max`.
    pub attempts: u32,
    /// Every failure of any kind; drives the backoff exponent.
    pub failures: u32,
    pub next_run_at_ms: i64,
    pub lease_owner: Option<String>,
    pub lease_expires_ms: Option<i64>,
    pub last_error: Option<String>,
    /// First transient failure, start of the retry window.
    pub first_failure_ms: Option<i64>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// An agent lease: who holds it and under which fencing epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub agent_id: AgentId,
    pub owner: String,
    pub epoch: i64,
    /// When the lease lapses unless renewed (as of the claim or last renewal).
    pub expires_ms: i64,
}

/// One turn's work: the lease and every due job of one session, oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub lease: Lease,
    pub session: SessionId,
    pub jobs: Vec<Job>,
}

impl Claim {
    pub fn job_ids(&self) -> Vec<String> {
        self.jobs.iter().map(|j| j.id.clone()).collect()
    }
}

/// Why a job failed; decides what happens to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// A provider's 429/5xx/529 or a timeout: retry with backoff until
    /// `retry_window_ms` after the first such failure, then dead.
    Transient,
    /// Our own failure (a crashing turn): counts an attempt; dead at `attempts_max`.
    Internal,
    /// Retrying cannot help (bad key, exhausted budget): dead at once.
    Permanent,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Failed { failure: Failure, error: String },
}

/// The result of one job of a turn, for `finish`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobOutcome {
    pub job_id: String,
    pub outcome: Outcome,
}

impl JobOutcome {
    pub fn done(job_id: impl Into<String>) -> Self {
        Self { job_id: job_id.into(), outcome: Outcome::Done }
    }

    pub fn failed(job_id: impl Into<String>, failure: Failure, error: impl Into<String>) -> Self {
        Self { job_id: job_id.into(), outcome: Outcome::Failed { failure, error: error.into() } }
    }
}

/// Where `finish` left one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled {
    pub job_id: String,
    pub state: JobState,
    pub attempts: u32,
    /// For a requeued job, when it runs again.
    pub next_run_at_ms: i64,
}

/// Queue depth for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub queued: u64,
    /// Queued and due now (some may be waiting for their agent's lease).
    pub due: u64,
    pub running: u64,
    pub dead: u64,
}

/// One agent's queue, for `GET /api/agents/{id}/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentQueueStatus {
    pub queued: u64,
    pub dead: u64,
    /// A live lease: a turn is running now.
    pub running: bool,
    pub lease_owner: Option<String>,
}

/// The durable job queue, agent leases and dead letters.
#[async_trait]
pub trait JobQueue: Send + Sync + std::fmt::Debug {
    /// Durably enqueues a job (group commit: returns after the transaction
    /// holding it is committed). A dedup key seen within `dedup_ttl_ms`
    /// inserts nothing and answers the first job's id with `duplicate`.
    /// Waits while the writer's pending queue is full.
    async fn enqueue(&self, job: NewJob, now_ms: i64) -> Result<Enqueued>;

    /// `enqueue`, committed only while the catalog is still at
    /// `catalog_version` (checked inside the commit, so a sender removed by
    /// any process before the commit is never admitted under the old rules);
    /// otherwise `StoreError::CatalogChanged` and nothing is stored.
    async fn enqueue_checked(&self, job: NewJob, now_ms: i64, catalog_version: i64) -> Result<Enqueued>;

    /// Atomically takes the oldest due job whose agent has no live lease,
    /// acquires that lease (epoch + 1) and takes every due queued job of the
    /// same agent and session (up to `claim_batch_max`), marking them running.
    /// Jobs left `running` under an earlier, lapsed lease count one attempt
    /// (`LEASE_LOST_ERROR`) and run again, or are dead at `attempts_max`.
    /// `None`: nothing is claimable now.
    async fn claim_next(&self, owner: &str, now_ms: i64, lease_ms: i64) -> Result<Option<Claim>>;
    /// `claim_next` restricted to one agent (the terminal runs its own job
    /// in-process this way, under the same lease as every worker).
    async fn claim_for_agent(&self, agent: &AgentId, owner: &str, now_ms: i64, lease_ms: i64) -> Result<Option<Claim>>;

    /// Extends the lease and its running jobs to `now_ms + lease_ms`. `false`:
    /// the lease was lost (another owner took it, or it was released or its
    /// agent deleted) and the caller must stop and commit nothing. A lapsed
    /// lease nobody took is still renewable: every takeover moves the epoch.
    async fn renew(&self, lease: &Lease, now_ms: i64, lease_ms: i64) -> Result<bool>;

    /// Ends the turn in one transaction, if `lease` is still current: applies
    /// each outcome to its job (only jobs running under this lease), puts any
    /// other job still running under it back to `queued` (attempts unchanged),
    /// and releases the lease. `jitter` is called once per failed job for a
    /// sample in `[0, 1)`. `None`: fenced out, nothing changed.
    async fn finish(
        &self,
        lease: &Lease,
        outcomes: &[JobOutcome],
        now_ms: i64,
        jitter: &mut (dyn FnMut() -> f64 + Send),
    ) -> Result<Option<Vec<Settled>>> {
        self.finish_with(lease, outcomes, &[], now_ms, jitter).await
    }

    /// `finish` that also records the turn's `deliveries` in the same
    /// transaction (each as `Deliveries::insert_delivery` would: a key
    /// already recorded keeps its row), so a reply and its job's completion
    /// commit together, with one fsync. Fenced out: nothing is recorded.
    async fn finish_with(
        &self,
        lease: &Lease,
        outcomes: &[JobOutcome],
        deliveries: &[crate::NewDelivery],
        now_ms: i64,
        jitter: &mut (dyn FnMut() -> f64 + Send),
    ) -> Result<Option<Vec<Settled>>>;

    /// Marks the jobs done and releases the lease (`finish` with every job
    /// `Done`). `false`: fenced out, nothing changed.
    async fn complete(&self, lease: &Lease, job_ids: &[String], now_ms: i64) -> Result<bool> {
        let outcomes: Vec<JobOutcome> = job_ids.iter().map(JobOutcome::done).collect();
        Ok(self.finish(lease, &outcomes, now_ms, &mut || 0.0).await?.is_some())
    }

    /// Fails the jobs with one error and releases the lease.
    async fn fail(
        &self,
        lease: &Lease,
        job_ids: &[String],
        failure: Failure,
        error: &str,
        now_ms: i64,
        jitter: &mut (dyn FnMut() -> f64 + Send),
    ) -> Result<Option<Vec<Settled>>> {
        let outcomes: Vec<JobOutcome> = job_ids.iter().map(|id| JobOutcome::failed(id, failure, error)).collect();
        self.finish(lease, &outcomes, now_ms, jitter).await
    }

    /// Releases the lease without completing (graceful shutdown): its running
    /// jobs go back to `queued`, attempts unchanged.
    async fn release(&self, lease: &Lease, now_ms: i64) -> Result<bool> {
        Ok(self.finish(lease, &[], now_ms, &mut || 0.0).await?.is_some())
    }

    /// The earliest time `claim_next` may find work: a queued job's run time,
    /// or the expiry of the live lease that holds its agent. A hint for
    /// sleeping workers: a lease released early by another process is not
    /// announced, so cap the sleep. `None`: no queued or running job.
    async fn next_due_ms(&self) -> Result<Option<i64>>;

    /// Asks the turn running under the agent's current lease — in any
    /// process — to stop. False when no live lease is held (nothing runs).
    async fn request_cancel(&self, agent: &AgentId, now_ms: i64) -> Result<bool>;
    /// Whether `stop` was requested for the turn running under `lease`.
    async fn cancel_requested(&self, lease: &Lease) -> Result<bool>;

    async fn get_job(&self, id: &str) -> Result<Option<Job>>;
    /// An agent's jobs, newest first.
    async fn jobs_for(&self, agent: &AgentId, limit: u32) -> Result<Vec<Job>>;
    async fn queue_counts(&self, now_ms: i64) -> Result<QueueCounts>;
    async fn agent_status(&self, agent: &AgentId, now_ms: i64) -> Result<AgentQueueStatus>;

    /// Dead letters, most recently failed first; of one agent or all.
    async fn list_dead(&self, agent: Option<&AgentId>, limit: u32) -> Result<Vec<Job>>;
    /// Puts a dead job back: queued, due now, attempts and failures 0, retry
    /// window cleared (`last_error` kept). `false`: no dead job with that id.
    async fn replay(&self, id: &str, now_ms: i64) -> Result<bool>;
    async fn replay_all(&self, now_ms: i64) -> Result<u64>;
    /// Replaces the payload of a job no worker has claimed yet (`queued`).
    /// `false`: it is running, finished or gone, and nothing changed.
    async fn set_queued_payload(&self, id: &str, payload: &str) -> Result<bool>;
    /// Deletes a dead job. `false`: no dead job with that id.
    async fn purge(&self, id: &str) -> Result<bool>;
    async fn purge_all_dead(&self) -> Result<u64>;
    /// Retention: deletes up to `limit` done jobs whose dedup key has
    /// expired at `now_ms` (last updated `dedup_ttl_ms` or longer ago, so
    /// created longer ago too: the row is what holds the key, SPEC §3).
    async fn purge_done(&self, now_ms: i64, limit: u32) -> Result<u64>;
}

/// Cuts an error message to `ERROR_BYTES_MAX` at a character boundary.
pub(crate) fn clip_error(error: &str) -> &str {
    if error.len() <= ERROR_BYTES_MAX {
        return error;
    }
    let mut end = ERROR_BYTES_MAX;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    &error[..end]
}

/// Where a failed job goes: the rule of `Failure`, given its counters.
pub(crate) struct FailedJob {
    pub state: JobState,
    pub attempts: u32,
    pub failures: u32,
    pub first_failure_ms: Option<i64>,
    pub next_run_at_ms: i64,
}

pub(crate) fn settle_failure(
    policy: &QueuePolicy,
    failure: Failure,
    attempts: u32,
    failures: u32,
    first_failure_ms: Option<i64>,
    now_ms: i64,
    jitter: f64,
) -> FailedJob {
    let failures = failures.saturating_add(1);
    let (state, attempts, first_failure_ms) = match failure {
        Failure::Permanent => (JobState::Dead, attempts, first_failure_ms),
        Failure::Internal => {
            let attempts = attempts.saturating_add(1);
            let state = if attempts >= policy.attempts_max { JobState::Dead } else { JobState::Queued };
            (state, attempts, first_failure_ms)
        }
        Failure::Transient => {
            let first = first_failure_ms.unwrap_or(now_ms);
            let state = if now_ms - first >= policy.retry_window_ms { JobState::Dead } else { JobState::Queued };
            (state, attempts, Some(first))
        }
    };
    let next_run_at_ms =
        if state == JobState::Queued { now_ms.saturating_add(backoff_ms(policy, failures, jitter)) } else { now_ms };
    FailedJob { state, attempts, failures, first_failure_ms, next_run_at_ms }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_jitter_scales_it() {
        let p = QueuePolicy::default();
        let full: Vec<i64> = (1..=12).map(|n| backoff_ms(&p, n, 1.0)).collect();
        assert_eq!(&full[..6], &[2_000, 4_000, 8_000, 16_000, 32_000, 64_000]);
        assert_eq!(full[8], 512_000);
        assert_eq!(full[9], 600_000, "capped at 10 min");
        assert_eq!(backoff_ms(&p, 1000, 1.0), 600_000, "huge exponents saturate");
        assert_eq!(backoff_ms(&p, 3, 0.5), 4_000);
        assert_eq!(backoff_ms(&p, 3, 0.0), 0);
        assert_eq!(backoff_ms(&p, 3, f64::NAN), 0);
        assert_eq!(backoff_ms(&p, 3, 7.0), 8_000, "jitter is clamped");
    }

    #[test]
    fn errors_are_clipped_at_a_char_boundary() {
        let long = "é".repeat(ERROR_BYTES_MAX);
        let clipped = clip_error(&long);
        assert!(clipped.len() <= ERROR_BYTES_MAX && clipped.len() >= ERROR_BYTES_MAX - 1);
        assert_eq!(clip_error("short"), "short");
    }
}
