//! The dead-letter queue as the CLI (`tinyfat dlq`) and the API
//! (`/api/dlq`) show and act on it: listing dead jobs of all agents, of one
//! owner's agents or of one agent; replaying them (back to `queued`, due now,
//! attempts reset) and purging them.
//!
//! This module decides nothing about who may see a dead letter (`auth` does)
//! and owns no SQL (the store does).

use serde::Serialize;
use serde_json::Value;
use tinyfat_store::{Agent, Job};

use crate::Platform;
use crate::error::Result;
use crate::provision::format_ms;

/// Most dead letters one listing returns.
pub const DEAD_LETTERS_LIST_MAX: u32 = 1000;
/// Dead letters a listing returns unless asked for another number.
pub const DEAD_LETTERS_LIST_DEFAULT: u32 = 100;

/// One dead letter. The payload (which may hold a user's message) is shown
/// only for a single dead letter, never in listings.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetterView {
    pub id: String,
    pub agent_id: String,
    /// The agent's name; `None` when the agent is gone.
    pub agent: Option<String>,
    pub session: String,
    pub kind: String,
    pub dedup_key: String,
    pub attempts: u32,
    pub failures: u32,
    pub error: Option<String>,
    pub created_at: String,
    /// When the job became a dead letter (its last update).
    pub failed_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}

impl DeadLetterView {
    pub fn new(job: &Job, agent: Option<&Agent>) -> Self {
        Self {
            id: job.id.clone(),
            agent_id: job.agent_id.to_string(),
            agent: agent.map(|a| a.name.to_string()),
            session: job.session.to_string(),
            kind: job.kind.clone(),
            dedup_key: job.dedup_key.clone(),
            attempts: job.attempts,
            failures: job.failures,
            error: job.last_error.clone(),
            created_at: format_ms(job.created_ms),
            failed_at: format_ms(job.updated_ms),
            payload: None,
        }
    }

    /// The view with the job's payload (JSON, or the raw text if it is not).
    pub fn with_payload(mut self, job: &Job) -> Self {
        self.payload = Some(serde_json::from_str(&job.payload).unwrap_or_else(|_| Value::String(job.payload.clone())));
        self
    }
}

/// Which dead letters a listing covers.
#[derive(Clone, Copy, Debug)]
pub enum DeadLetterScope<'a> {
    All,
    /// The agents of one owner (a user's token).
    Owner(&'a str),
    Agent(&'a Agent),
}

impl Platform {
    /// Dead letters in `scope`, most recently failed first, at most `limit`
    /// (capped at `DEAD_LETTERS_LIST_MAX`).
    pub async fn dead_letters(&self, scope: DeadLetterScope<'_>, limit: u32) -> Result<Vec<DeadLetterView>> {
        let limit = limit.min(DEAD_LETTERS_LIST_MAX);
        let (mut jobs, mut agents) = match scope {
            DeadLetterScope::All => (self.store.list_dead(None, limit).await?, Vec::new()),
            DeadLetterScope::Agent(agent) => (self.store.list_dead(Some(&agent.id), limit).await?, vec![agent.clone()]),
            DeadLetterScope::Owner(owner) => {
                let agents = self.store.list_agents(Some(owner)).await?;
                let mut jobs = Vec::new();
                for agent in &agents {
                    jobs.extend(self.store.list_dead(Some(&agent.id), limit).await?);
                }
                (jobs, agents)
            }
        };
        jobs.sort_by(|a, b| b.updated_ms.cmp(&a.updated_ms).then_with(|| b.id.cmp(&a.id)));
        jobs.truncate(limit as usize);
        for job in &jobs {
            if !agents.iter().any(|a| a.id == job.agent_id)
                && let Some(agent) = self.store.agent_by_id(&job.agent_id).await?
            {
                agents.push(agent);
            }
        }
        Ok(jobs.iter().map(|job| DeadLetterView::new(job, agents.iter().find(|a| a.id == job.agent_id))).collect())
    }

    /// Puts a dead job back in the queue. `false`: no dead job has that id.
    pub async fn replay_dead_letter(&self, id: &str) -> Result<bool> {
        let replayed = self.store.replay(id, self.now_ms()).await?;
        if replayed {
            tracing::info!(job = id, "dead letter replayed");
        }
        Ok(replayed)
    }

    /// Replays every dead letter; returns how many.
    pub async fn replay_all_dead_letters(&self) -> Result<u64> {
        let count = self.store.replay_all(self.now_ms()).await?;
        tracing::info!(count, "dead letters replayed");
        Ok(count)
    }

    /// Deletes a dead job. `false`: no dead job has that id.
    pub async fn purge_dead_letter(&self, id: &str) -> Result<bool> {
        let purged = self.store.purge(id).await?;
        if purged {
            tracing::info!(job = id, "dead letter purged");
        }
        Ok(purged)
    }

    /// Deletes every dead letter; returns how many.
    pub async fn purge_all_dead_letters(&self) -> Result<u64> {
        let count = self.store.purge_all_dead().await?;
        tracing::info!(count, "dead letters purged");
        Ok(count)
    }
}
