//! What the fake model answers: a [`Script`] per request, serde-friendly so a
//! JSON file can drive the standalone `fake-model` binary. Scripts describe
//! replies in provider-neutral terms; `wire` renders them per API.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tinyfat_core::message::Usage;

/// One scripted answer. JSON: `{"kind": "reply", "text": ["Hel", "lo"]}`,
/// `{"kind": "http_error", "status": 429, "error_type": "rate_limit_error",
/// "message": "slow down", "retry_after": "1"}`, …
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Script {
    /// A complete streamed answer: text deltas, then tool calls.
    Reply(Reply),
    /// A non-2xx response with the provider's error body.
    HttpError(HttpError),
    /// Starts streaming `text`, then sends an error event and ends the stream
    /// (Anthropic `event: error`; OpenAI-compatible `data: {"error": …}`).
    StreamError {
        #[serde(default)]
        text: Vec<String>,
        error_type: String,
        message: String,
        #[serde(default)]
        chunk_delay_ms: u64,
    },
    /// A raw `text/event-stream` body, for malformed streams. With a chunk
    /// delay, it is sent in pieces split after each blank line.
    Raw {
        body: String,
        #[serde(default)]
        chunk_delay_ms: u64,
    },
}

/// A streamed reply.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Reply {
    /// Text deltas, in order; empty for a tool-only answer.
    pub text: Vec<String>,
    pub tool_calls: Vec<ToolCall>,
    /// Defaults to `tool_use` when there are tool calls, else `end_turn`.
    pub stop_reason: Option<ScriptStop>,
    /// Reported as the provider would: Anthropic's fields as they are; for
    /// OpenAI, `prompt_tokens` = input + cache read + cache creation and
    /// `cached_tokens` = cache read.
    pub usage: Usage,
    /// Pause between two streamed events.
    pub chunk_delay_ms: u64,
}

/// A tool call whose JSON input streams in the given fragments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// Concatenated, these form the JSON input (empty means `{}`).
    pub input_deltas: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScriptStop {
    EndTurn,
    ToolUse,
    MaxTokens,
}

/// An error response: status, the provider's error `type` and message, and
/// an optional `retry-after` header value (seconds or an HTTP date).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpError {
    pub status: u16,
    pub error_type: String,
    pub message: String,
    #[serde(default)]
    pub retry_after: Option<String>,
}

impl ToolCall {
    pub fn new(id: impl Into<String>, name: impl Into<String>, input_deltas: &[&str]) -> Self {
        Self { id: id.into(), name: name.into(), input_deltas: input_deltas.iter().map(|d| d.to_string()).collect() }
    }
}

impl Script {
    /// A reply of one text delta.
    pub fn text(text: impl Into<String>) -> Self {
        Script::Reply(Reply { text: vec![text.into()], ..Default::default() })
    }

    /// A reply streamed as the given text deltas.
    pub fn text_deltas(deltas: &[&str]) -> Self {
        Script::Reply(Reply { text: deltas.iter().map(|d| d.to_string()).collect(), ..Default::default() })
    }

    /// A reply that is one tool call, its input split into `input_deltas`.
    pub fn tool_call(id: impl Into<String>, name: impl Into<String>, input_deltas: &[&str]) -> Self {
        Script::Reply(Reply { tool_calls: vec![ToolCall::new(id, name, input_deltas)], ..Default::default() })
    }

    pub fn http_error(status: u16, error_type: impl Into<String>, message: impl Into<String>) -> Self {
        Script::HttpError(HttpError {
            status,
            error_type: error_type.into(),
            message: message.into(),
            retry_after: None,
        })
    }

    /// 529 `overloaded_error`, as Anthropic answers under load.
    pub fn overloaded() -> Self {
        Self::http_error(529, "overloaded_error", "Overloaded")
    }

    /// 429 `rate_limit_error` with `retry-after: {seconds}`.
    pub fn rate_limited(retry_after_s: u64) -> Self {
        Script::HttpError(HttpError {
            status: 429,
            error_type: "rate_limit_error".into(),
            message: "Number of request tokens has exceeded your per-minute rate limit".into(),
            retry_after: Some(retry_after_s.to_string()),
        })
    }

    /// 500 `api_error`.
    pub fn server_error() -> Self {
        Self::http_error(500, "api_error", "Internal server error")
    }

    /// 401 `authentication_error`.
    pub fn unauthorized() -> Self {
        Self::http_error(401, "authentication_error", "invalid x-api-key")
    }

    /// Streams `text` deltas, then an error event of `error_type`.
    pub fn stream_error(text: &[&str], error_type: impl Into<String>, message: impl Into<String>) -> Self {
        Script::StreamError {
            text: text.iter().map(|t| t.to_string()).collect(),
            error_type: error_type.into(),
            message: message.into(),
            chunk_delay_ms: 0,
        }
    }

    pub fn raw(body: impl Into<String>) -> Self {
        Script::Raw { body: body.into(), chunk_delay_ms: 0 }
    }

    /// Sets the pause between streamed events (no effect on HTTP errors).
    pub fn with_chunk_delay(mut self, delay: Duration) -> Self {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        match &mut self {
            Script::Reply(reply) => reply.chunk_delay_ms = ms,
            Script::StreamError { chunk_delay_ms, .. } | Script::Raw { chunk_delay_ms, .. } => *chunk_delay_ms = ms,
            Script::HttpError(_) => {}
        }
        self
    }

    /// Sets the usage a reply reports (no effect on other scripts).
    pub fn with_usage(mut self, usage: Usage) -> Self {
        if let Script::Reply(reply) = &mut self {
            reply.usage = usage;
        }
        self
    }

    /// Sets the stop reason a reply reports (no effect on other scripts).
    pub fn with_stop(mut self, stop: ScriptStop) -> Self {
        if let Script::Reply(reply) = &mut self {
            reply.stop_reason = Some(stop);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_round_trip_through_json() {
        let scripts = vec![
            Script::text_deltas(&["a", "b"]).with_chunk_delay(Duration::from_millis(5)),
            Script::tool_call("t1", "bash", &["{\"command\":", "\"ls\"}"]),
            Script::rate_limited(1),
            Script::stream_error(&["x"], "overloaded_error", "Overloaded"),
            Script::raw("data: {\n\n"),
        ];
        let json = serde_json::to_string(&scripts).unwrap();
        let back: Vec<Script> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, scripts);
    }

    #[test]
    fn hand_written_json_needs_only_the_essentials() {
        let json = r#"[
            {"kind": "reply", "text": ["hi"]},
            {"kind": "http_error", "status": 529, "error_type": "overloaded_error", "message": "Overloaded"}
        ]"#;
        let scripts: Vec<Script> = serde_json::from_str(json).unwrap();
        assert_eq!(scripts, vec![Script::text("hi"), Script::overloaded()]);
    }
}
