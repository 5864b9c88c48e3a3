//! Compaction: when the conversation nears the model's context window (or
//! on `/compact`), the model summarises the older turns into a `compaction`
//! record; the recent turns stay verbatim. Nothing is rewritten: the session
//! file gains one record saying which records the summary replaces.

use tinyfat_core::message::{ContentBlock, Message, Role};
use tinyfat_core::session::RecordBody;
use tinyfat_model::ModelRequest;

use crate::session::SessionLog;
use crate::turn::{Turn, TurnError};

/// Share of the context window kept verbatim after compaction.
const KEEP_RECENT_SHARE_PERCENT: u64 = 25;
/// Fewest records worth summarising.
const COMPACT_RECORDS_MIN: usize = 4;
const SUMMARY_TOKENS_MAX: u32 = 2048;

const SUMMARY_PROMPT: &str = "You compact a conversation history. Summarise the conversation so far for your \
    own future reference: who is involved, what was asked and decided, facts learned, files created or changed \
    in /data, open tasks and promises. Be specific (names, dates, paths, numbers) and brief. Write plain text \
    only; do not call tools.";

/// Summarises the older part of the live session; returns how many records
/// the new compaction record replaces, or `None` when there is too little.
pub async fn compact(turn: &Turn<'_>, log: &mut SessionLog, job_id: &str) -> Result<Option<usize>, TurnError> {
    let keep_tokens = turn.limits.context_window_tokens * KEEP_RECENT_SHARE_PERCENT / 100;
    // Candidate split points: user records that start a turn (text, not tool results).
    let mut kept_tokens = 0u64;
    let mut split_index = None;
    for (index, record) in log.records.iter().enumerate().rev() {
        match &record.body {
            RecordBody::Meta { event, .. } if event == crate::session::META_CLEAR => break,
            RecordBody::Compaction { .. } => break,
            RecordBody::Message { message, .. } => {
                kept_tokens += SessionLog::estimate_tokens(std::slice::from_ref(message));
                let starts_turn = message.role == Role::User
                    && message.content.iter().all(|b| !matches!(b, ContentBlock::ToolResult { .. }));
                if starts_turn && kept_tokens >= keep_tokens.min(kept_tokens) && index > 0 {
                    split_index = Some(index);
                    if kept_tokens >= keep_tokens {
                        break;
                    }
                }
            }
            RecordBody::Meta { .. } => {}
        }
    }
    let Some(split_index) = split_index else { return Ok(None) };
    // The records being replaced: everything live before the split.
    let older = log.model_view_before(split_index);
    if older.len() < COMPACT_RECORDS_MIN {
        return Ok(None);
    }
    let replaces_through = log.records[split_index - 1].id;
    let mut messages = older;
    let instruction = "Summarise the conversation above, as instructed.";
    match messages.last_mut() {
        Some(last) if last.role == Role::User => last.content.push(ContentBlock::Text { text: instruction.into() }),
        _ => messages.push(Message::user_text(instruction)),
    }
    let request = ModelRequest {
        model: turn.config.model.clone(),
        system_static: SUMMARY_PROMPT.into(),
        system_dynamic: String::new(),
        messages,
        tools: Vec::new(),
        max_tokens: SUMMARY_TOKENS_MAX,
    };
    let response = turn.model.stream(&request, &turn.cancel, &mut |_| {}).await?;
    let summary = response.message.text();
    if summary.trim().is_empty() {
        return Ok(None);
    }
    let replaced = log.records[..split_index].len();
    log.append(
        &turn.workspace.dir,
        (turn.clock)().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        RecordBody::Compaction { summary, replaces_through },
    )?;
    tracing::info!(job = job_id, replaces_through, "session compacted");
    Ok(Some(replaced))
}
