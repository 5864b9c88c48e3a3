//! The one inbound path every channel uses: (the adapter has verified the
//! request and resolved the agent) check the allowed senders, answer `stop`
//! and `/status` without the queue, then enqueue durably with the channel's
//! dedup key. The caller acknowledges only after this returns `Enqueued`.
//!
//! The agent and its allowed senders come from the store's in-memory catalog
//! cache (no database read per request). That cache may lag a change made by
//! another process, so admission is checked again where it counts: the job
//! is enqueued with the catalog version its view was read at, the enqueue
//! writer refuses it inside the commit if agents or senders changed since
//! (`CatalogChanged`), and it is re-checked on a fresh read. A rejection is
//! always confirmed on a fresh read before it is final.
//!
//! Rejected senders are counted and logged (once per sender and agent per
//! process, with the command that would admit them), never enqueued.

use std::collections::HashSet;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tinyfat_core::SessionId;
use tinyfat_core::sender::{SenderIdentity, is_allowed};
use tinyfat_runtime::commands::{self, Command};
use tinyfat_runtime::{Conversation, InboundMessage};
use tinyfat_store::{Agent, NewJob, StoreError};

use crate::error::{Error, Result};
use crate::state::AppState;

/// Distinct rejected senders remembered for log de-duplication.
const REJECTED_REMEMBERED_MAX: usize = 10_000;
/// Fresh re-checks of one message whose catalog view went stale before its
/// commit; past this (the catalog changing on every commit) the enqueue
/// fails as a transient error and the sender retries.
const CATALOG_RECHECKS_MAX: u32 = 4;

/// What a message job carries (the `payload` column).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MessageJob {
    pub message: InboundMessage,
    pub conversation: Option<Conversation>,
    /// The web chat run this job belongs to (its SSE log key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_key: Option<String>,
}

pub const JOB_KIND_MESSAGE: &str = "message";

#[derive(Debug)]
pub struct Ingest {
    pub dedup_key: String,
    pub session: SessionId,
    pub sender: SenderIdentity,
    pub job: MessageJob,
}

#[derive(Debug, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Durably enqueued (or already enqueued under this dedup key).
    Enqueued { job_id: String, duplicate: bool },
    /// The sender is not allowed; nothing was enqueued.
    Rejected,
    /// `stop` or `/status`, answered at once without the queue.
    Answered(String),
}

#[derive(Debug, Default)]
pub struct RejectionLog(Mutex<HashSet<(String, String)>>);

impl RejectionLog {
    /// True the first time a sender is rejected for an agent.
    fn first(&self, agent: &Agent, sender: &str) -> bool {
        let mut seen = self.0.lock().expect("rejection log lock");
        if seen.len() >= REJECTED_REMEMBERED_MAX {
            seen.clear();
        }
        seen.insert((agent.id.to_string(), sender.to_owned()))
    }
}

impl AppState {
    /// The agent `name_or_id` names, from the catalog cache: for the ingest
    /// path only, whose commit re-validates what the cache answered.
    pub async fn ingest_agent(&self, name_or_id: &str) -> Result<Agent> {
        match self.platform.store.agent_view(name_or_id, false).await? {
            Some(view) => Ok(view.agent.clone()),
            None => Err(Error::UnknownAgent(name_or_id.to_owned())),
        }
    }

    pub async fn ingest(&self, agent: &Agent, ingest: Ingest) -> Result<IngestOutcome> {
        let store = &self.platform.store;
        let mut fresh = false;
        let mut view = self.agent_view(agent, fresh).await?;
        if !is_allowed(&view.senders, &ingest.sender) {
            fresh = true;
            view = self.agent_view(agent, fresh).await?;
            if !is_allowed(&view.senders, &ingest.sender) {
                self.reject(agent, &ingest.sender);
                return Ok(IngestOutcome::Rejected);
            }
        }
        match commands::parse(&ingest.job.message.text) {
            Some(Command::Stop) => return Ok(IngestOutcome::Answered(self.stop_text(agent).await?)),
            Some(Command::Status) => return Ok(IngestOutcome::Answered(self.status_text(agent).await?)),
            _ => {}
        }
        let payload = serde_json::to_string(&ingest.job).map_err(|e| Error::Other(e.into()))?;
        let job = NewJob {
            id: tinyfat_core::ids::new_ulid_string(ulid::Ulid::new()),
            dedup_key: ingest.dedup_key,
            agent_id: agent.id.clone(),
            session: ingest.session,
            kind: JOB_KIND_MESSAGE.into(),
            payload,
        };
        let mut rechecks = 0;
        let enqueued = loop {
            match store.enqueue_checked(job.clone(), self.platform.now_ms(), view.catalog_version).await {
                Err(StoreError::CatalogChanged) if rechecks < CATALOG_RECHECKS_MAX => {
                    rechecks += 1;
                    view = self.agent_view(agent, true).await?;
                    if !is_allowed(&view.senders, &ingest.sender) {
                        self.reject(agent, &ingest.sender);
                        return Ok(IngestOutcome::Rejected);
                    }
                }
                answer => break answer?,
            }
        };
        if !enqueued.duplicate {
            self.wake.notify_one();
        }
        Ok(IngestOutcome::Enqueued { job_id: enqueued.job_id, duplicate: enqueued.duplicate })
    }

    /// `stop` (SPEC §6): cancels the agent's running turn, in this process
    /// at once, or in any other through the store (its worker polls).
    pub async fn stop_text(&self, agent: &Agent) -> Result<String> {
        let stopping = self.stop_running_turn(agent).await?;
        Ok(if stopping { "Stopping." } else { "Nothing is running." }.to_owned())
    }

    /// Cancels the agent's running turn, if any; true when one was asked to
    /// stop (it answers `Stopped.` itself).
    pub async fn stop_running_turn(&self, agent: &Agent) -> Result<bool> {
        let here = self.runs.cancel(&agent.id);
        Ok(here || self.platform.store.request_cancel(&agent.id, self.platform.now_ms()).await?)
    }

    async fn agent_view(&self, agent: &Agent, fresh: bool) -> Result<std::sync::Arc<tinyfat_store::AgentView>> {
        self.platform
            .store
            .agent_view(agent.id.as_str(), fresh)
            .await?
            .ok_or_else(|| Error::UnknownAgent(agent.id.to_string()))
    }

    /// Counts a rejected message and logs it once per sender and agent.
    fn reject(&self, agent: &Agent, sender: &SenderIdentity) {
        self.metrics.rejected_senders_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sender = sender.to_string();
        if self.rejections.first(agent, &sender) {
            tracing::warn!(
                agent = %agent.name,
                sender = %sender,
                "message from a sender that is not allowed was dropped; to admit it run: tinyfat agent allow {} {}",
                agent.name,
                sender
            );
        }
    }

    pub async fn status_text(&self, agent: &Agent) -> Result<String> {
        let status = self.platform.store.agent_status(&agent.id, self.platform.now_ms()).await?;
        let running = match self.runs.active(&agent.id) {
            Some(run) => {
                format!("running a turn in {} (started {})", run.session, crate::provision::format_ms(run.started_ms))
            }
            None if status.running => "running a turn in another process".to_owned(),
            None => "idle".to_owned(),
        };
        Ok(format!("{} is {running}; {} message(s) queued, {} dead letter(s).", agent.name, status.queued, status.dead))
    }
}
