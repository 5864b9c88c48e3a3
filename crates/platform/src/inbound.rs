//! The one inbound path every channel uses: (the adapter has verified the
//! request and resolved the agent) check the allowed senders, answer `stop`
//! and `/status` without the queue, then enqueue durably with the channel's
//! dedup key. The caller acknowledges only after this returns `Enqueued`.
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
use tinyfat_store::{Agent, NewJob};

use crate::error::{Error, Result};
use crate::state::AppState;

/// Distinct rejected senders remembered for log de-duplication.
const REJECTED_REMEMBERED_MAX: usize = 10_000;

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
    pub async fn ingest(&self, agent: &Agent, ingest: Ingest) -> Result<IngestOutcome> {
        let platform = &self.platform;
        let rules = platform.store.list_senders(&agent.id).await?;
        if !is_allowed(&rules, &ingest.sender) {
            self.metrics.rejected_senders_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let sender = ingest.sender.to_string();
            if self.rejections.first(agent, &sender) {
                tracing::warn!(
                    agent = %agent.name,
                    sender = %sender,
                    "message from a sender that is not allowed was dropped; to admit it run: tinyfat agent allow {} {}",
                    agent.name,
                    sender
                );
            }
            return Ok(IngestOutcome::Rejected);
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
        let enqueued = platform.store.enqueue(job, platform.now_ms()).await?;
        if !enqueued.duplicate {
            self.wake.notify_one();
        }
        Ok(IngestOutcome::Enqueued { job_id: enqueued.job_id, duplicate: enqueued.duplicate })
    }

    /// `stop` (SPEC §6): cancels the agent's running turn, in this process
    /// at once, or in any other through the store (its worker polls).
    pub async fn stop_text(&self, agent: &Agent) -> Result<String> {
        let here = self.runs.cancel(&agent.id);
        let elsewhere = here || self.platform.store.request_cancel(&agent.id, self.platform.now_ms()).await?;
        Ok(if here || elsewhere { "Stopping." } else { "Nothing is running." }.to_owned())
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
