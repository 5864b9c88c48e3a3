//! One turn: the batch of pending messages for one agent session goes in;
//! the model is streamed, its tool calls run, and the loop repeats until the
//! model ends its turn, a limit is hit (tool calls, wall time, the daily token
//! budget) or the user says `stop`. Events stream to the caller as they
//! happen; every record is appended to the session file as it completes.
//!
//! A retried job resumes from the session file: its user records are not
//! appended twice, an interrupted tool call gets a synthetic result, and a
//! turn whose final answer was already recorded returns it without calling
//! the model again.
//!
//! This module delivers nothing and knows no channel: the reply and any
//! `send_message` calls come back in `TurnOutcome` for the delivery table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tinyfat_core::AgentConfig;
use tinyfat_core::message::{ContentBlock, Message, Role, Usage};
use tinyfat_core::session::{RecordBody, SessionId};
use tinyfat_model::{CancelToken, ModelClient, ModelError, ModelRequest, StopReason, StreamEvent};
use tinyfat_sandbox::ToolExecutor;
use tinyfat_storage::{FileError, Workspace};

use crate::commands::{self, Command};
use crate::prompt::{self, Identity, InboundMessage};
use crate::session::{META_STOP, SessionLog};
use crate::session_cache::SessionCache;
use crate::tools::{self, Conversation, OutboundMessage, ToolContext};

/// The words a turn answers when the user stops it.
pub const STOPPED_REPLY: &str = "Stopped.";
/// A reply that means "send nothing".
pub const NO_REPLY: &str = "NO_REPLY";

#[derive(Clone, Debug)]
pub struct TurnLimits {
    pub tool_calls_max: u32,
    pub wall_max: Duration,
    pub tool_wall_max: Duration,
    pub tokens_per_day_max: u64,
    /// `max_tokens` of each model call.
    pub output_tokens_max: u32,
    /// The model's context window; compaction starts at 75 % of it.
    pub context_window_tokens: u64,
}

impl Default for TurnLimits {
    fn default() -> Self {
        Self {
            tool_calls_max: 50,
            wall_max: Duration::from_secs(600),
            tool_wall_max: Duration::from_secs(60),
            tokens_per_day_max: 2_000_000,
            output_tokens_max: 8192,
            context_window_tokens: 200_000,
        }
    }
}

/// What the caller sees while a turn runs (SPEC §4's SSE events are one
/// rendering of these; the terminal is another).
#[derive(Clone, Debug, PartialEq)]
pub enum TurnEvent {
    TextDelta(String),
    ToolCall {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        id: String,
        output: String,
        is_error: bool,
    },
    /// The model call is being retried; text streamed since the last restart is void.
    Restart {
        reason: String,
    },
}

pub type TurnSink<'a> = dyn FnMut(TurnEvent) + Send + 'a;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TurnEnd {
    /// The model ended its turn.
    Completed,
    /// The user said `stop`.
    Stopped,
    ToolCallLimit,
    WallLimit,
    /// The answer was cut at `output_tokens_max`.
    OutputLimit,
    /// A `/command` was answered without the model.
    Command,
}

#[derive(Debug)]
pub struct TurnOutcome {
    /// The reply to the conversation that started the turn; `None` when
    /// nothing is to be sent (empty, `NO_REPLY`, or `send_message` answered it).
    pub reply: Option<String>,
    pub outbound: Vec<OutboundMessage>,
    pub usage: Usage,
    pub end: TurnEnd,
    /// Set when `/model NAME` changed config.json; the caller updates the store.
    pub model_changed: Option<String>,
    pub tool_calls: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    /// The model call failed; `ModelError` says whether to retry.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The agent used its daily token budget: permanent until tomorrow.
    #[error("the daily token budget of {max} tokens is used up ({used} used today); it resets at midnight UTC")]
    Budget { used: u64, max: u64 },
    #[error("agent storage: {0}")]
    File(#[from] FileError),
    #[error("{0}")]
    Invalid(String),
}

/// The agent-specific parts of a turn that the platform assembles.
pub struct Turn<'a> {
    pub workspace: &'a Workspace,
    pub identity: Identity,
    pub config: AgentConfig,
    /// config.json as the agent's file holds it (shown to the model).
    pub config_json: String,
    pub model: &'a dyn ModelClient,
    pub executor: &'a dyn ToolExecutor,
    pub limits: TurnLimits,
    pub cancel: CancelToken,
    pub tokens_used_today: u64,
    pub clock: Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>,
    /// Parsed session logs kept between turns (`None`: read every time).
    pub sessions: Option<&'a SessionCache>,
}

impl std::fmt::Debug for Turn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Turn").field("agent", &self.workspace.agent).field("model", &self.config.model).finish()
    }
}

#[derive(Clone, Debug)]
pub struct TurnInput {
    pub session: SessionId,
    /// The turn's id: records, the reply key and resumption use it.
    pub job_id: String,
    pub messages: Vec<InboundMessage>,
    /// The job of each message when a batch of jobs runs as one turn
    /// (parallel to `messages`); empty means every message is `job_id`'s.
    pub message_jobs: Vec<String>,
    /// Where the reply goes (`None` for an event turn in the `events` session).
    pub conversation: Option<Conversation>,
}

impl Turn<'_> {
    fn ts(&self) -> String {
        (self.clock)().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }

    fn outcome(&self, reply: Option<String>, end: TurnEnd) -> TurnOutcome {
        TurnOutcome { reply, outbound: Vec::new(), usage: Usage::default(), end, model_changed: None, tool_calls: 0 }
    }

    pub async fn run(&self, input: TurnInput, sink: &mut TurnSink<'_>) -> Result<TurnOutcome, TurnError> {
        let dir = &self.workspace.dir;
        let mut log = match self.sessions {
            Some(cache) => cache.load(dir, &input.session)?,
            None => SessionLog::load(dir, &input.session)?,
        };
        let outcome = self.run_on(&mut log, input, sink).await;
        if outcome.is_ok()
            && let Some(cache) = self.sessions
        {
            cache.keep(dir, log);
        }
        outcome
    }

    async fn run_on(
        &self,
        log: &mut SessionLog,
        input: TurnInput,
        sink: &mut TurnSink<'_>,
    ) -> Result<TurnOutcome, TurnError> {
        let dir = &self.workspace.dir;
        if let Some(reply) = log.completed_reply(&input.job_id) {
            return Ok(self.outcome(filter_reply(&reply), TurnEnd::Completed));
        }
        let channel = input.conversation.as_ref().map(|c| c.channel.clone());

        if let [only] = input.messages.as_slice()
            && let Some(command) = commands::parse(&only.text)
        {
            return self.command(log, command, &input, sink).await;
        }

        // One user record per job, each appended once even when the turn is retried.
        for (index, message) in input.messages.iter().enumerate() {
            let job = input.message_jobs.get(index).unwrap_or(&input.job_id);
            if log.has_job(job) {
                continue;
            }
            let text = prompt::wrap_user_message(message, &self.config.timezone);
            let body = RecordBody::Message {
                message: Message { role: Role::User, content: vec![ContentBlock::Text { text }] },
                channel: channel.clone(),
                usage: None,
                job: Some(job.clone()),
            };
            log.append(dir, self.ts(), body)?;
        }

        // The first model call sends this view unless compaction changed it.
        let mut view = Some(log.model_view());
        if SessionLog::estimate_tokens(view.as_deref().unwrap_or_default()) > self.limits.context_window_tokens * 3 / 4
        {
            crate::compaction::compact(self, log, &input.job_id).await?;
            view = None;
        }

        let system_static = prompt::static_prompt(&self.identity);
        let system_dynamic = prompt::dynamic_prompt(dir, &self.config_json);
        let tool_specs = tools::specs();
        let started = Instant::now();
        let mut usage = Usage::default();
        let mut outbound: Vec<OutboundMessage> = Vec::new();
        let mut tool_calls = 0u32;
        let mut answered_here = false;

        loop {
            if self.cancel.is_cancelled() {
                return self.stop(log, &input, usage, outbound, tool_calls);
            }
            if started.elapsed() >= self.limits.wall_max {
                return Ok(self.limit_reached(TurnEnd::WallLimit, usage, outbound, tool_calls));
            }
            let used = self.tokens_used_today + usage.total();
            if used >= self.limits.tokens_per_day_max {
                return Err(TurnError::Budget { used, max: self.limits.tokens_per_day_max });
            }
            let request = ModelRequest {
                model: self.config.model.clone(),
                system_static: system_static.clone(),
                system_dynamic: system_dynamic.clone(),
                messages: view.take().unwrap_or_else(|| log.model_view()),
                tools: tool_specs.clone(),
                max_tokens: self.limits.output_tokens_max,
            };
            let mut forward = |event: StreamEvent| match event {
                StreamEvent::TextDelta(text) => sink(TurnEvent::TextDelta(text)),
                StreamEvent::Restart { reason, .. } => sink(TurnEvent::Restart { reason }),
                StreamEvent::ToolUseStart { .. } | StreamEvent::ToolInputDelta { .. } => {}
            };
            let response = match self.model.stream(&request, &self.cancel, &mut forward).await {
                Ok(response) => response,
                Err(ModelError::Cancelled) => return self.stop(log, &input, usage, outbound, tool_calls),
                Err(e) => return Err(e.into()),
            };
            usage.add(&response.usage);
            let message = response.message;
            log.append(
                dir,
                self.ts(),
                RecordBody::Message {
                    message: message.clone(),
                    channel: channel.clone(),
                    usage: Some(response.usage),
                    job: Some(input.job_id.clone()),
                },
            )?;

            let uses: Vec<(String, String, Value)> = message
                .content
                .iter()
                .filter_map(|b| match b {
                    ContentBlock::ToolUse { id, name, input } => Some((id.clone(), name.clone(), input.clone())),
                    _ => None,
                })
                .collect();
            if uses.is_empty() {
                let end = if response.stop_reason == StopReason::MaxTokens {
                    TurnEnd::OutputLimit
                } else {
                    TurnEnd::Completed
                };
                let reply = if answered_here { None } else { filter_reply(&message.text()) };
                return Ok(TurnOutcome { reply, outbound, usage, end, model_changed: None, tool_calls });
            }

            let ctx = ToolContext {
                dir,
                host_path: &self.workspace.host_path,
                executor: self.executor,
                network: self.config.network,
                tool_wall_max: self.limits.tool_wall_max,
                cancel: &self.cancel,
                job_id: &input.job_id,
            };
            let mut limit_hit = false;
            for (id, name, tool_input) in uses {
                let (content, is_error) = if self.cancel.is_cancelled() {
                    ("not run: the user stopped the turn".to_owned(), true)
                } else if tool_calls >= self.limits.tool_calls_max {
                    limit_hit = true;
                    (
                        format!("not run: the limit of {} tool calls per turn was reached", self.limits.tool_calls_max),
                        true,
                    )
                } else {
                    tool_calls += 1;
                    sink(TurnEvent::ToolCall { id: id.clone(), name: name.clone(), input: tool_input.clone() });
                    let result = tools::run(&ctx, &id, &name, &tool_input).await;
                    if let Some(message) = result.outbound {
                        if input.conversation.as_ref().is_some_and(|c| answers(c, &message)) {
                            answered_here = true;
                        }
                        outbound.push(message);
                    }
                    (result.content, result.is_error)
                };
                sink(TurnEvent::ToolResult { id: id.clone(), output: content.clone(), is_error });
                let block = ContentBlock::ToolResult { tool_use_id: id, content, is_error };
                log.append(
                    dir,
                    self.ts(),
                    RecordBody::Message {
                        message: Message { role: Role::User, content: vec![block] },
                        channel: None,
                        usage: None,
                        job: Some(input.job_id.clone()),
                    },
                )?;
            }
            if limit_hit {
                return Ok(self.limit_reached(TurnEnd::ToolCallLimit, usage, outbound, tool_calls));
            }
        }
    }

    fn limit_reached(
        &self,
        end: TurnEnd,
        usage: Usage,
        outbound: Vec<OutboundMessage>,
        tool_calls: u32,
    ) -> TurnOutcome {
        let reply = match end {
            TurnEnd::ToolCallLimit => format!(
                "I stopped after {} tool calls, the limit for one turn. Tell me to continue if you want me to go on.",
                self.limits.tool_calls_max
            ),
            _ => format!(
                "I stopped after {} seconds, the time limit for one turn. Tell me to continue if you want me to go on.",
                self.limits.wall_max.as_secs()
            ),
        };
        TurnOutcome { reply: Some(reply), outbound, usage, end, model_changed: None, tool_calls }
    }

    fn stop(
        &self,
        log: &mut SessionLog,
        input: &TurnInput,
        usage: Usage,
        outbound: Vec<OutboundMessage>,
        tool_calls: u32,
    ) -> Result<TurnOutcome, TurnError> {
        log.append(
            &self.workspace.dir,
            self.ts(),
            RecordBody::Meta { event: META_STOP.into(), detail: Some(input.job_id.clone()) },
        )?;
        Ok(TurnOutcome {
            reply: Some(STOPPED_REPLY.into()),
            outbound,
            usage,
            end: TurnEnd::Stopped,
            model_changed: None,
            tool_calls,
        })
    }

    async fn command(
        &self,
        log: &mut SessionLog,
        command: Command,
        input: &TurnInput,
        _sink: &mut TurnSink<'_>,
    ) -> Result<TurnOutcome, TurnError> {
        let dir = &self.workspace.dir;
        let reply = match command {
            Command::Stop => "Nothing is running.".to_owned(),
            Command::Clear => {
                log.append(
                    dir,
                    self.ts(),
                    RecordBody::Meta { event: crate::session::META_CLEAR.into(), detail: None },
                )?;
                "Cleared. This conversation starts fresh; my memory (MEMORY.md) is kept.".to_owned()
            }
            Command::Compact => match crate::compaction::compact(self, log, &input.job_id).await? {
                Some(n) => format!("Compacted {n} earlier messages into a summary."),
                None => "Nothing to compact yet.".to_owned(),
            },
            Command::Status => {
                let view = log.model_view();
                format!(
                    "Model {}; session {} with {} messages in context (~{} tokens); {} tokens used today of {}.",
                    self.config.model,
                    input.session,
                    view.len(),
                    SessionLog::estimate_tokens(&view),
                    self.tokens_used_today,
                    self.limits.tokens_per_day_max
                )
            }
            Command::Model(None) => format!("The model is {}.", self.config.model),
            Command::Model(Some(name)) => {
                tinyfat_model::ModelRoute::parse(&name).map_err(|e| TurnError::Invalid(e.to_string()))?;
                let mut config = self.config.clone();
                config.model = name.clone();
                dir.write_atomic(&crate::config_path(), config.to_pretty_json().as_bytes())?;
                log.append(
                    dir,
                    self.ts(),
                    RecordBody::Meta { event: crate::session::META_MODEL.into(), detail: Some(name.clone()) },
                )?;
                let mut outcome = self.outcome(Some(format!("The model is now {name}.")), TurnEnd::Command);
                outcome.model_changed = Some(name);
                return Ok(outcome);
            }
        };
        Ok(self.outcome(Some(reply), TurnEnd::Command))
    }
}

/// Whether a `send_message` went to the conversation the turn answers.
fn answers(conversation: &Conversation, message: &OutboundMessage) -> bool {
    conversation.channel == message.channel && (message.to.is_none() || message.to == conversation.to)
}

/// The reply rules: nothing for empty text or `NO_REPLY`.
fn filter_reply(text: &str) -> Option<String> {
    let trimmed = text.trim();
    if trimmed.is_empty() || trimmed == NO_REPLY { None } else { Some(trimmed.to_owned()) }
}
