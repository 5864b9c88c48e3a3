//! The worker role: claims due jobs (one turn per agent at a time, under the
//! agent's lease and fencing epoch), runs the turn, records the reply and any
//! outbound messages in the delivery table with idempotency keys decided
//! before sending, then completes the jobs — all fenced by the epoch, so a
//! worker that lost its lease commits nothing.
//!
//! Crash safety: every step is durable before the next. A worker killed at
//! any point leaves jobs `running` under a lease that lapses; the next claim
//! resumes the turn from the session file (the runtime skips what is already
//! recorded), re-inserts deliveries under the same keys (a no-op), and
//! completes. Nothing is answered twice.
//!
//! Shutdown: stop claiming, let running turns finish up to a deadline, then
//! cancel what remains and release its leases (the jobs run again later,
//! without counting an attempt).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tinyfat_model::{CancelToken, ModelError};
use tinyfat_runtime::{TurnEnd, TurnError, TurnEvent, TurnInput};
use tinyfat_store::{Claim, Failure, JobOutcome, JobState, NewDelivery, Outcome};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::inbound::{JOB_KIND_MESSAGE, MessageJob};
use crate::runs::ActiveRun;
use crate::state::AppState;
use crate::turns::RunError;

pub const LEASE_MS: i64 = 30_000;
/// How often a running turn looks for a `stop` recorded by another process.
const CANCEL_POLL_MS: i64 = 500;
/// Longest idle sleep: leases released by other processes are not announced.
const IDLE_SLEEP_MAX: Duration = Duration::from_millis(500);
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Turns this process runs at once (each for a different agent).
    pub turns_concurrent_max: usize,
    /// This process's lease owner name.
    pub owner: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self { turns_concurrent_max: 8, owner: format!("worker-{}-{}", std::process::id(), ulid::Ulid::new()) }
    }
}

/// The SSE rendering of a turn event (SPEC §4); `None` for events it omits.
pub fn event_json(event: &TurnEvent) -> Option<serde_json::Value> {
    Some(match event {
        TurnEvent::TextDelta(delta) => json!({"type": "text_delta", "delta": delta}),
        TurnEvent::ToolCall { id, name, input } => json!({"type": "tool_call", "id": id, "name": name, "input": input}),
        TurnEvent::ToolResult { id, output, is_error } => {
            json!({"type": "tool_result", "id": id, "output": output, "is_error": is_error})
        }
        TurnEvent::Restart { .. } => return None,
    })
}

/// Runs the worker loop until `shutdown` turns true, then drains.
pub async fn run(state: AppState, config: WorkerConfig, mut shutdown: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(config.turns_concurrent_max.max(1)));
    let shutting_down = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
            _ = shutdown.changed() => break,
        };
        let now = state.platform.now_ms();
        match state.platform.store.claim_next(&config.owner, now, LEASE_MS).await {
            Ok(Some(claim)) => {
                let state = state.clone();
                let shutting_down = shutting_down.clone();
                tasks.spawn(async move {
                    process(&state, claim, &shutting_down).await;
                    drop(permit);
                });
            }
            Ok(None) => {
                drop(permit);
                let next_due = state.platform.store.next_due_ms().await.ok().flatten();
                let wait = next_due
                    .map(|due| Duration::from_millis((due - state.platform.now_ms()).max(0) as u64))
                    .unwrap_or(IDLE_SLEEP_MAX)
                    .min(IDLE_SLEEP_MAX);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = state.wake.notified() => {}
                    _ = shutdown.changed() => break,
                }
            }
            Err(e) => {
                drop(permit);
                tracing::error!(error = %e, "claiming a job failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        while tasks.try_join_next().is_some() {}
    }

    let running = tasks.len();
    if running > 0 {
        tracing::info!(running, "waiting up to {} s for running turns to finish", SHUTDOWN_GRACE.as_secs());
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while !tasks.is_empty() && Instant::now() < deadline {
            let _ = tokio::time::timeout(deadline - Instant::now(), tasks.join_next()).await;
        }
        if !tasks.is_empty() {
            tracing::warn!(remaining = tasks.len(), "stopping the remaining turns; their jobs will run again");
            shutting_down.store(true, Ordering::SeqCst);
            state.runs.cancel_all();
            while tasks.join_next().await.is_some() {}
        }
    }
}

/// Runs one claim to completion (or to a recorded failure).
pub async fn process(state: &AppState, claim: Claim, shutting_down: &AtomicBool) {
    let platform = &state.platform;
    let store = &platform.store;
    let lease = claim.lease.clone();
    if lease.agent_id == crate::email::provision::platform_agent_id() {
        // Platform-level jobs (provisioning by email) run no turn.
        return crate::email::provision::process(state, claim).await;
    }
    let Ok(Some(agent)) = store.agent_by_id(&lease.agent_id).await else {
        // The agent was deleted after the job was enqueued.
        let _ = store.complete(&lease, &claim.job_ids(), platform.now_ms()).await;
        return;
    };

    let mut outcomes = Vec::new();
    let mut batch: Vec<(String, MessageJob)> = Vec::new();
    // Outbox files left by a previous (crashed) attempt go out first; a
    // first attempt has nothing left over, so the folder is not read then.
    if claim.jobs.iter().any(|j| j.failures > 0 || j.attempts > 0) {
        crate::email::process_outbox(state, &agent, &lease).await;
    }
    for job in &claim.jobs {
        if job.kind == crate::email::provision::JOB_KIND_OUTBOX {
            // Outbox files written outside a turn (the hello of a new agent).
            crate::email::process_outbox(state, &agent, &lease).await;
            outcomes.push(JobOutcome { job_id: job.id.clone(), outcome: Outcome::Done });
            continue;
        }
        if job.kind == crate::scheduler::JOB_KIND_EVENT {
            match crate::scheduler::prepare_event_job(state, &agent, job).await {
                Ok(Some(message)) => batch.push((job.id.clone(), message)),
                Ok(None) => outcomes.push(JobOutcome { job_id: job.id.clone(), outcome: Outcome::Done }),
                Err(error) => outcomes.push(JobOutcome {
                    job_id: job.id.clone(),
                    outcome: Outcome::Failed { failure: Failure::Permanent, error },
                }),
            }
            continue;
        }
        if job.kind == crate::email::JOB_KIND_EMAIL {
            match crate::email::prepare_email_job_detailed(state, &agent, job).await {
                Ok(Some(message)) => batch.push((job.id.clone(), message)),
                Ok(None) => outcomes.push(JobOutcome { job_id: job.id.clone(), outcome: Outcome::Done }),
                Err(e) => outcomes.push(JobOutcome {
                    job_id: job.id.clone(),
                    outcome: Outcome::Failed {
                        failure: match e {
                            crate::email::PrepareError::Transient(_) => Failure::Transient,
                            crate::email::PrepareError::Permanent(_) => Failure::Permanent,
                        },
                        error: e.message().to_owned(),
                    },
                }),
            }
            continue;
        }
        match (job.kind.as_str(), serde_json::from_str::<MessageJob>(&job.payload)) {
            (JOB_KIND_MESSAGE, Ok(message)) => batch.push((job.id.clone(), message)),
            (kind, parsed) => outcomes.push(JobOutcome {
                job_id: job.id.clone(),
                outcome: Outcome::Failed {
                    failure: Failure::Permanent,
                    error: match parsed {
                        Err(e) => format!("unreadable {kind} job payload: {e}"),
                        Ok(_) => format!("this worker does not run {kind} jobs"),
                    },
                },
            }),
        }
    }
    if batch.is_empty() {
        let _ = store.finish(&lease, &outcomes, platform.now_ms(), &mut rand_jitter()).await;
        return;
    }

    let turn_id = batch[0].0.clone();
    let run_keys: Vec<String> = batch.iter().filter_map(|(_, m)| m.run_key.clone()).collect();
    let conversation = batch.last().and_then(|(_, m)| m.conversation.clone());
    let cancel = CancelToken::new();
    let started = Instant::now();
    state.runs.start(
        &agent.id,
        ActiveRun {
            cancel: cancel.clone(),
            session: claim.session.to_string(),
            started_ms: platform.now_ms(),
            job_ids: batch.iter().map(|(id, _)| id.clone()).collect(),
        },
    );

    let lost = Arc::new(AtomicBool::new(false));
    let renewal = {
        let (store, lease, lost, cancel, clock) =
            (store.clone(), lease.clone(), lost.clone(), cancel.clone(), platform.clock.clone());
        tokio::spawn(async move {
            // Renew every third of the lease; between renewals, look for a
            // `stop` that another process's gateway recorded in the store.
            let polls_per_renewal = (LEASE_MS / 3 / CANCEL_POLL_MS).max(1);
            let mut polls = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(CANCEL_POLL_MS as u64)).await;
                if !cancel.is_cancelled() && store.cancel_requested(&lease).await.unwrap_or(false) {
                    tracing::info!(agent = %lease.agent_id, "stop requested; cancelling the turn");
                    cancel.cancel();
                }
                polls += 1;
                if polls < polls_per_renewal {
                    continue;
                }
                polls = 0;
                if !store.renew(&lease, clock.now_ms(), LEASE_MS).await.unwrap_or(false) {
                    tracing::warn!(agent = %lease.agent_id, "lease lost; stopping the turn and committing nothing");
                    lost.store(true, Ordering::SeqCst);
                    cancel.cancel();
                    return;
                }
            }
        })
    };

    let input = TurnInput {
        session: claim.session.clone(),
        job_id: turn_id.clone(),
        messages: batch.iter().map(|(_, m)| m.message.clone()).collect(),
        message_jobs: batch.iter().map(|(id, _)| id.clone()).collect(),
        conversation: conversation.clone(),
    };
    let tokens_today = platform.tokens_used_today(&agent).await.unwrap_or(0);
    let mut streamed = String::new();
    let result = platform
        .run_turn(&agent, input, cancel.clone(), tokens_today, &mut |event| {
            match &event {
                TurnEvent::TextDelta(text) => streamed.push_str(text),
                TurnEvent::Restart { .. } => streamed.clear(),
                _ => {}
            }
            if let Some(value) = event_json(&event) {
                for key in &run_keys {
                    state.runs.push(key, value.clone());
                }
            }
        })
        .await;
    renewal.abort();
    state.runs.finish(&agent.id);
    state.metrics.turn_latency.observe(started.elapsed());
    state.metrics.runs_total.fetch_add(1, Ordering::Relaxed);
    if lost.load(Ordering::SeqCst) {
        return;
    }
    let now = platform.now_ms();
    let batch_ids: Vec<String> = batch.iter().map(|(id, _)| id.clone()).collect();

    let (failure, error, tell_user) = match result {
        Ok(outcome) => {
            if outcome.end == TurnEnd::Stopped && shutting_down.load(Ordering::SeqCst) {
                let _ = store.release(&lease, now).await;
                return;
            }
            let _ = platform.record_usage(&agent, &outcome.usage).await;
            state.metrics.add_usage(&outcome.usage);
            let mut deliveries = Vec::new();
            if let (Some(reply), Some(conversation)) = (&outcome.reply, &conversation) {
                deliveries.push(delivery(&agent.id, &turn_id, format!("reply:{turn_id}"), conversation, reply, &[]));
            }
            for message in &outcome.outbound {
                let target = tinyfat_runtime::Conversation { channel: message.channel.clone(), to: message.to.clone() };
                deliveries.push(delivery(
                    &agent.id,
                    &turn_id,
                    message.key.clone(),
                    &target,
                    &message.text,
                    &message.attachments,
                ));
            }
            // A reply its stream delivers commits with the job's completion
            // (`finish_with`, one transaction); any other is recorded first,
            // so `process_outbox` can send it inline under the lease.
            let (by_stream, to_send): (Vec<NewDelivery>, Vec<NewDelivery>) =
                deliveries.into_iter().partition(|d| d.by_stream);
            for new in &to_send {
                if let Err(e) = store.insert_delivery(new, now).await {
                    tracing::error!(error = %e, "recording a delivery failed; the job will run again");
                    let _ = store
                        .fail(&lease, &batch_ids, Failure::Internal, &e.to_string(), now, &mut rand_jitter())
                        .await;
                    return;
                }
            }
            crate::email::process_outbox(state, &agent, &lease).await;
            crate::scheduler::sync_timers(state, &agent).await;
            outcomes.extend(batch_ids.iter().map(|id| JobOutcome { job_id: id.clone(), outcome: Outcome::Done }));
            match store.finish_with(&lease, &outcomes, &by_stream, now, &mut rand_jitter()).await {
                // Recorded as sent: their stream delivers them.
                Ok(Some(_)) => {
                    state.metrics.deliveries_sent_total.fetch_add(by_stream.len() as u64, Ordering::Relaxed);
                }
                Ok(None) => {
                    tracing::warn!(agent = %agent.id, "lease lost before completion; another worker will finish");
                    return;
                }
                Err(e) => {
                    // The session holds the reply: the rerun after the lease
                    // lapses records it without calling the model again.
                    tracing::error!(agent = %agent.id, error = %e, "recording the turn's end failed; it runs again");
                    return;
                }
            }
            for key in &run_keys {
                // A reply that was not streamed (a command's answer, a limit notice).
                if let Some(reply) = outcome.reply.as_deref().filter(|r| !streamed.contains(r)) {
                    state.runs.push(key, json!({"type": "text_delta", "delta": reply}));
                }
                state.runs.push(key, json!({"type": "run_complete", "session": claim.session.to_string()}));
                state.runs.close_log(key);
            }
            state.deliveries_wake.notify_one();
            return;
        }
        Err(RunError::Turn(TurnError::Model(ModelError::Cancelled))) => {
            let _ = store.release(&lease, now).await;
            return;
        }
        Err(RunError::Turn(TurnError::Model(e))) if e.is_transient() => (Failure::Transient, e.to_string(), false),
        Err(RunError::Turn(e @ (TurnError::Model(_) | TurnError::Budget { .. } | TurnError::Invalid(_)))) => {
            (Failure::Permanent, e.to_string(), true)
        }
        Err(RunError::Platform(e)) if e.is_user_error() => (Failure::Permanent, e.to_string(), true),
        Err(e) => (Failure::Internal, e.to_string(), false),
    };
    state.metrics.runs_failed_total.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(agent = %agent.name, job = %turn_id, ?failure, error = %error, "turn failed");
    if tell_user && let Some(conversation) = &conversation {
        let text = format!("Sorry, I could not answer: {error}");
        let _ = store
            .insert_delivery(&delivery(&agent.id, &turn_id, format!("error:{turn_id}"), conversation, &text, &[]), now)
            .await;
        state.deliveries_wake.notify_one();
    }
    outcomes.extend(
        batch_ids
            .iter()
            .map(|id| JobOutcome { job_id: id.clone(), outcome: Outcome::Failed { failure, error: error.clone() } }),
    );
    let settled = store.finish(&lease, &outcomes, now, &mut rand_jitter()).await.ok().flatten().unwrap_or_default();
    let dead = settled.iter().any(|s| s.state == JobState::Dead);
    for key in &run_keys {
        state.runs.push(key, json!({"type": "error", "message": error}));
        if dead {
            state.runs.close_log(key);
        }
    }
}

fn delivery(
    agent: &tinyfat_core::AgentId,
    job_id: &str,
    key: String,
    target: &tinyfat_runtime::Conversation,
    text: &str,
    attachments: &[String],
) -> NewDelivery {
    NewDelivery {
        id: tinyfat_core::ids::new_ulid_string(ulid::Ulid::new()),
        idempotency_key: key,
        agent_id: agent.clone(),
        job_id: Some(job_id.to_owned()),
        channel: target.channel.clone(),
        target: serde_json::to_string(target).expect("serialisable"),
        body: json!({"text": text, "attachments": attachments}).to_string(),
        by_stream: crate::deliver::is_streamed(&target.channel),
    }
}

fn rand_jitter() -> impl FnMut() -> f64 + Send {
    || rand::random::<f64>()
}
