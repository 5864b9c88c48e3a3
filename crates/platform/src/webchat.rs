//! Web chat (SPEC §4): `POST /api/agents/{id}/chat` enqueues through the
//! common inbound path with `web:{agent}:{user}:{request_id}` as the dedup
//! key, then streams the run as server-sent events; `GET
//! /api/agents/{id}/runs/{request_id}/events` replays a run and follows it.
//!
//! While this process holds the run's log, events replay from memory. After
//! a restart (or from another process) the run is rebuilt from durable state:
//! the job row says whether it is done, and the session file holds the reply.
//! Either way the client sees the answer exactly once per run.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::response::sse::{Event, Sse};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tinyfat_core::SessionId;
use tinyfat_core::message::{ContentBlock, Role};
use tinyfat_core::sender::SenderIdentity;
use tinyfat_core::session::RecordBody;
use tinyfat_runtime::session::SessionLog;
use tinyfat_runtime::{Conversation, InboundMessage};
use tinyfat_store::{Agent, JobState};
use tokio::sync::mpsc;

use crate::api::{ApiError, JsonBody};
use crate::auth::Caller;
use crate::inbound::{Ingest, IngestOutcome, MessageJob};
use crate::state::AppState;

pub const HEARTBEAT: Duration = Duration::from_secs(15);
const MESSAGE_CHARS_MAX: usize = 100_000;
const REQUEST_ID_LEN_MAX: usize = 100;
const STREAM_BUFFER: usize = 256;
const POLL_INTERVAL: Duration = Duration::from_millis(250);
const DONE: &str = "[DONE]";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub message: String,
    #[serde(default)]
    pub session: Option<String>,
    #[serde(default)]
    pub request_id: Option<String>,
}

fn principal(caller: &Caller) -> String {
    match caller {
        Caller::Operator => "operator".to_owned(),
        Caller::User { user_id, .. } => user_id.clone(),
    }
}

fn run_key(agent: &Agent, caller: &Caller, request_id: &str) -> String {
    format!("web:{}:{}:{request_id}", agent.id, principal(caller))
}

fn web_session(given: Option<&str>) -> Result<SessionId, ApiError> {
    let raw = given.unwrap_or("main");
    let id = SessionId::parse(raw)
        .ok()
        .filter(|s| s.kind() == "web")
        .or_else(|| SessionId::parse(&format!("web-{raw}")).ok())
        .ok_or_else(|| ApiError::bad_request(format!("invalid session {raw:?}: use web-NAME or NAME")))?;
    Ok(id)
}

fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= REQUEST_ID_LEN_MAX
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

pub async fn chat(
    State(state): State<AppState>,
    caller: Caller,
    Path(agent_id): Path<String>,
    JsonBody(request): JsonBody<ChatRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let started = std::time::Instant::now();
    let agent = caller.agent(&state.platform, &agent_id).await?;
    if request.message.trim().is_empty() {
        return Err(ApiError::bad_request("message is empty"));
    }
    if request.message.chars().count() > MESSAGE_CHARS_MAX {
        return Err(ApiError::bad_request(format!("message is longer than {MESSAGE_CHARS_MAX} characters")));
    }
    let session = web_session(request.session.as_deref())?;
    let request_id = match request.request_id {
        Some(id) if valid_request_id(&id) => id,
        Some(id) => {
            return Err(ApiError::bad_request(format!("invalid request_id {id:?}: 1-100 of A-Z a-z 0-9 . _ -")));
        }
        None => tinyfat_core::ids::new_ulid_string(ulid::Ulid::new()),
    };
    let key = run_key(&agent, &caller, &request_id);
    state.runs.open_log(&key);
    let ingest = Ingest {
        dedup_key: key.clone(),
        session: session.clone(),
        sender: SenderIdentity::Local(format!("web:{}", caller.display_name())),
        job: MessageJob {
            message: InboundMessage {
                channel: "web".into(),
                sender: caller.display_name(),
                text: request.message,
                received_at: chrono::Utc::now(),
                untrusted: vec![],
            },
            conversation: Some(Conversation { channel: "web".into(), to: None }),
            run_key: Some(key.clone()),
        },
    };
    let outcome = state.ingest(&agent, ingest).await?;
    state.metrics.webhook_ack_latency.observe(started.elapsed());
    let accepted = |queued: u64| json!({"type": "accepted", "request_id": request_id, "session": session.to_string(), "queued": queued});
    match outcome {
        IngestOutcome::Answered(text) => {
            let events = vec![
                accepted(0),
                json!({"type": "text_delta", "delta": text}),
                json!({"type": "run_complete", "session": session.to_string()}),
            ];
            Ok(sse(fixed_stream(events)))
        }
        IngestOutcome::Rejected => Err(ApiError::forbidden("this sender may not write to the agent")),
        IngestOutcome::Enqueued { job_id, duplicate } => {
            if !duplicate {
                let queued =
                    state.platform.store.agent_status(&agent.id, state.platform.now_ms()).await.map_or(0, |s| s.queued);
                state.runs.push(&key, accepted(queued.saturating_sub(1)));
            }
            Ok(sse(follow(state, agent, key, Some(job_id), session, request_id)))
        }
    }
}

pub async fn run_events(
    State(state): State<AppState>,
    caller: Caller,
    Path((agent_id, request_id)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let agent = caller.agent(&state.platform, &agent_id).await?;
    if !valid_request_id(&request_id) {
        return Err(ApiError::not_found("no such run"));
    }
    let key = run_key(&agent, &caller, &request_id);
    let in_memory = state.runs.subscribe(&key).is_some();
    let job = find_job(&state, &agent, &key).await?;
    if !in_memory && job.is_none() {
        return Err(ApiError::not_found("no such run"));
    }
    let session =
        job.as_ref().map(|j| j.session.clone()).unwrap_or_else(|| SessionId::parse("web-main").expect("static"));
    Ok(sse(follow(state, agent, key, job.map(|j| j.id), session, request_id)))
}

async fn find_job(state: &AppState, agent: &Agent, key: &str) -> Result<Option<tinyfat_store::Job>, ApiError> {
    let jobs = state.platform.store.jobs_for(&agent.id, 1000).await.map_err(ApiError::internal)?;
    Ok(jobs.into_iter().find(|j| j.dedup_key == key))
}

type EventStream = futures_util::stream::BoxStream<'static, Result<Event, Infallible>>;

fn sse(stream: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Sse<EventStream> {
    Sse::new(futures_util::StreamExt::boxed(stream))
}

fn fixed_stream(events: Vec<Value>) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let items: Vec<Result<Event, Infallible>> = events
        .into_iter()
        .map(|v| Ok(Event::default().data(v.to_string())))
        .chain(std::iter::once(Ok(Event::default().data(DONE))))
        .collect();
    futures_util::stream::iter(items)
}

/// Streams a run: from the in-memory log when present, else rebuilt from
/// the job row and the session file. Heartbeats at least every 15 s.
fn follow(
    state: AppState,
    agent: Agent,
    key: String,
    job_id: Option<String>,
    session: SessionId,
    request_id: String,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<Value>(STREAM_BUFFER);
    tokio::spawn(async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(v).await.is_ok() }
        };
        if let Some(mut sub) = state.runs.subscribe(&key) {
            for event in sub.past.drain(..) {
                if !send(event).await {
                    return;
                }
            }
            if !sub.done {
                let mut heartbeat = tokio::time::interval(HEARTBEAT);
                heartbeat.tick().await;
                loop {
                    tokio::select! {
                        event = sub.live.recv() => match event {
                            Ok(Value::String(s)) if s == DONE => break,
                            Ok(event) => if !send(event).await { return },
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(_) => break,
                        },
                        _ = heartbeat.tick() => if !send(json!({"type": "heartbeat"})).await { return },
                    }
                }
            }
            let _ = send(Value::String(DONE.into())).await;
            return;
        }
        // Rebuilt from durable state.
        let _ =
            send(json!({"type": "accepted", "request_id": request_id, "session": session.to_string(), "queued": 0}))
                .await;
        let Some(job_id) = job_id else {
            let _ = send(Value::String(DONE.into())).await;
            return;
        };
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        loop {
            let job = state.platform.store.get_job(&job_id).await.ok().flatten();
            match job.map(|j| (j.state, j.last_error)) {
                Some((JobState::Done, _)) => {
                    if let Some(reply) = reply_of(&state, &agent, &session, &job_id).await {
                        let _ = send(json!({"type": "text_delta", "delta": reply})).await;
                    }
                    let _ = send(json!({"type": "run_complete", "session": session.to_string()})).await;
                    break;
                }
                Some((JobState::Dead, error)) => {
                    let _ = send(json!({"type": "error", "message": error.unwrap_or_else(|| "the run failed".into())}))
                        .await;
                    break;
                }
                None => break,
                _ => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = heartbeat.tick() => if !send(json!({"type": "heartbeat"})).await { return },
            }
        }
        let _ = send(Value::String(DONE.into())).await;
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        let value = rx.recv().await?;
        let data = match &value {
            Value::String(s) if s == DONE => DONE.to_owned(),
            other => other.to_string(),
        };
        Some((Ok(Event::default().data(data)), rx))
    })
}

/// The final answer that followed `job_id`'s user record in the session file.
pub async fn reply_of(state: &AppState, agent: &Agent, session: &SessionId, job_id: &str) -> Option<String> {
    let workspace = state.platform.storage.checkout(&agent.id).await.ok()?;
    let log = SessionLog::load(&workspace.dir, session).ok()?;
    let start = log.records.iter().position(
        |r| matches!(&r.body, RecordBody::Message { message, job: Some(j), .. } if j == job_id && message.role == Role::User),
    )?;
    log.records[start..].iter().find_map(|r| match &r.body {
        RecordBody::Message { message, .. }
            if message.role == Role::Assistant
                && !message.content.iter().any(|b| matches!(b, ContentBlock::ToolUse { .. })) =>
        {
            Some(message.text())
        }
        _ => None,
    })
}
