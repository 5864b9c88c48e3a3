//! The provider-neutral face of a model call: [`ModelClient`], the request it
//! takes, the events it streams and the response it returns. Nothing here
//! knows a provider's wire format or does I/O; the adapters and the retry
//! wrapper implement the trait, and tests can implement it with a script.

use std::time::Duration;

use async_trait::async_trait;
use tinyfat_core::message::{Message, ToolSpec, Usage};

use crate::{CancelToken, ModelError};

/// One call to a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelRequest {
    /// The model name as the user wrote it: `claude-…`, `anthropic:NAME` or
    /// `openai:NAME`. Each client strips its own prefix (see [`crate::ModelRoute`]).
    pub model: String,
    /// The system prompt part that stays byte-identical across turns (identity,
    /// the /data layout, rules). First prompt-cache breakpoint.
    pub system_static: String,
    /// The system prompt part re-read every turn (skills, config, memory).
    /// Second prompt-cache breakpoint.
    pub system_dynamic: String,
    pub messages: Vec<Message>,
    pub tools: Vec<ToolSpec>,
    pub max_tokens: u32,
}

/// Output as it streams. The final [`ModelResponse`] holds everything again in
/// assembled form, so a caller may ignore events entirely.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    TextDelta(String),
    /// The model started a tool call; its input follows as [`StreamEvent::ToolInputDelta`]s.
    ToolUseStart {
        id: String,
        name: String,
    },
    /// A fragment of a tool call's JSON input; only the concatenation is valid JSON.
    ToolInputDelta {
        id: String,
        partial_json: String,
    },
    /// The attempt failed with a transient error and will be retried after
    /// `delay`. Everything streamed since the call began or since the previous
    /// `Restart` is void: a caller that displays partial output resets it.
    Restart {
        attempt: u32,
        delay: Duration,
        reason: String,
    },
}

/// Where streamed events go. A plain closure: `&mut |event| { … }`.
pub type EventSink<'a> = dyn FnMut(StreamEvent) + Send + 'a;

/// Why the model stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model finished its answer.
    EndTurn,
    /// The model wants the tool calls in the message run.
    ToolUse,
    /// The answer was cut at `max_tokens`.
    MaxTokens,
    /// Any other reason, as the provider named it (`refusal`, `content_filter`, …).
    Other(String),
}

/// The result of a successful call.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelResponse {
    /// The assistant message: text blocks and tool_use blocks in the order the
    /// model produced them, tool inputs fully assembled (an empty input is `{}`).
    pub message: Message,
    pub stop_reason: StopReason,
    pub usage: Usage,
}

/// A model endpoint. Object-safe: callers hold `Arc<dyn ModelClient>`.
#[async_trait]
pub trait ModelClient: Send + Sync + std::fmt::Debug {
    /// Runs one call, streaming events into `sink` as they arrive.
    ///
    /// Checks `cancel` before the request and at every streamed chunk (and
    /// while waiting for one), returning [`ModelError::Cancelled`].
    async fn stream(
        &self,
        request: &ModelRequest,
        cancel: &CancelToken,
        sink: &mut EventSink<'_>,
    ) -> Result<ModelResponse, ModelError>;
}

/// Parses a tool call's assembled JSON input. Empty input (or `null`, which
/// some OpenAI-compatible servers send) means `{}`; anything but an object is
/// rejected, since the provider will not accept it back in the history.
pub(crate) fn parse_tool_input(json: &str) -> Result<serde_json::Value, String> {
    if json.trim().is_empty() {
        return Ok(serde_json::Value::Object(Default::default()));
    }
    match serde_json::from_str(json) {
        Ok(serde_json::Value::Null) => Ok(serde_json::Value::Object(Default::default())),
        Ok(value @ serde_json::Value::Object(_)) => Ok(value),
        Ok(_) => Err("the tool input is not a JSON object".to_string()),
        Err(e) => Err(format!("the tool input is not valid JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tool_inputs_are_objects() {
        assert_eq!(parse_tool_input("").unwrap(), json!({}));
        assert_eq!(parse_tool_input("null").unwrap(), json!({}));
        assert_eq!(parse_tool_input(r#"{"a": [1]}"#).unwrap(), json!({"a": [1]}));
        assert!(parse_tool_input("[1]").is_err());
        assert!(parse_tool_input(r#"{"a": "#).is_err());
    }
}
