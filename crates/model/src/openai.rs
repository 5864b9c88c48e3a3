//! The OpenAI-compatible Chat Completions adapter: translates a
//! [`ModelRequest`] into a streaming `POST /v1/chat/completions` and
//! assembles the chunk stream back into a [`ModelResponse`]. Only this module
//! knows the Chat Completions JSON; it does not retry and does not choose keys.
//!
//! Translation: the two system blocks become one `system` message (joined by
//! a blank line); assistant tool_use blocks become `tool_calls`; tool_result
//! blocks become `tool` messages placed before the rest of their user
//! message, since the API wants them right after the assistant's calls. A
//! failed tool result has no flag in this API, so its content is prefixed
//! with `Error: `. Usage maps `prompt_tokens_details.cached_tokens` to
//! `cache_read_input_tokens` and the rest of `prompt_tokens` to `input_tokens`.
//!
//! Servers differ; to work with local ones the assembler tolerates a missing
//! `[DONE]` after a `finish_reason`, a missing tool call id (it makes one up),
//! `null` arguments, and `finish_reason: "stop"` alongside tool calls.

use std::borrow::Cow;

use async_trait::async_trait;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::Value;
use tinyfat_core::Secret;
use tinyfat_core::message::{ContentBlock, Message, Role, Usage};

use crate::client::parse_tool_input;
use crate::http::{Flow, endpoint, error_detail, status_error};
use crate::sse::SseEvent;
use crate::{
    CancelToken, ClientOptions, EventSink, HttpClient, ModelClient, ModelError, ModelRequest, ModelResponse,
    ModelRoute, Provider, StopReason, StreamEvent,
};

pub const OPENAI_BASE_URL: &str = "https://api.openai.com";

#[derive(Debug)]
pub struct OpenAiClient {
    http: HttpClient,
    api_key: Option<Secret>,
    url: String,
    /// OpenAI's own API wants `max_completion_tokens` (its reasoning models
    /// reject `max_tokens`); compatible servers widely know only `max_tokens`.
    max_tokens_field: &'static str,
}

impl OpenAiClient {
    /// `base_url` defaults to [`OPENAI_BASE_URL`]; `/v1` is added unless the
    /// base already ends in it. Without a key no `Authorization` header is
    /// sent, which suits local servers.
    pub fn new(http: HttpClient, api_key: Option<Secret>, base_url: Option<&str>) -> Self {
        let base = base_url.unwrap_or(OPENAI_BASE_URL);
        let max_tokens_field = if base.contains("://api.openai.com") { "max_completion_tokens" } else { "max_tokens" };
        Self { http, api_key, url: endpoint(base, "chat/completions"), max_tokens_field }
    }

    fn headers(&self) -> Result<HeaderMap, ModelError> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(key) = &self.api_key {
            let mut value =
                HeaderValue::from_str(&format!("Bearer {}", key.expose())).map_err(|_| ModelError::Permanent {
                    message: "the OpenAI API key contains characters that cannot be sent: set it again with \
                              `tinyfat secret set NAME openai_api_key`"
                        .to_string(),
                })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        Ok(headers)
    }
}

#[async_trait]
impl ModelClient for OpenAiClient {
    async fn stream(
        &self,
        request: &ModelRequest,
        cancel: &CancelToken,
        sink: &mut EventSink<'_>,
    ) -> Result<ModelResponse, ModelError> {
        let route = ModelRoute::parse(&request.model)?;
        if route.provider != Provider::OpenAi {
            return Err(ModelError::Permanent {
                message: format!("'{}' is not an OpenAI-compatible model (use openai:NAME)", request.model),
            });
        }
        let body = request_body(&route.model, self.max_tokens_field, request);
        let response = self.http.post_stream(Provider::OpenAi, &self.url, self.headers()?, body, cancel).await?;
        let mut assembler = Assembler::new(self.http.options());
        self.http.read_events(Provider::OpenAi, response, cancel, |event| assembler.on_event(&event, sink)).await?;
        assembler.finish()
    }
}

/// The JSON body of a streaming Chat Completions call, serialised straight
/// from the request: the wire structs below borrow what they can, so the
/// history is not built into a `Value` on its way out.
pub(crate) fn request_body(model: &str, max_tokens_field: &str, request: &ModelRequest) -> Vec<u8> {
    let tools = request
        .tools
        .iter()
        .map(|tool| WireTool {
            kind: "function",
            function: WireToolFunction {
                name: &tool.name,
                description: &tool.description,
                parameters: &tool.input_schema,
            },
        })
        .collect();
    let body = WireBody { model, max_tokens_field, max_tokens: request.max_tokens, messages: messages(request), tools };
    serde_json::to_vec(&body).expect("strings and JSON values always serialise")
}

struct WireBody<'a> {
    model: &'a str,
    /// `max_tokens`, or `max_completion_tokens` for OpenAI's own API.
    max_tokens_field: &'a str,
    max_tokens: u32,
    messages: Vec<WireMessage<'a>>,
    tools: Vec<WireTool<'a>>,
}

impl Serialize for WireBody<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct StreamOptions {
            include_usage: bool,
        }
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("model", self.model)?;
        map.serialize_entry("stream", &true)?;
        map.serialize_entry("stream_options", &StreamOptions { include_usage: true })?;
        map.serialize_entry("messages", &self.messages)?;
        map.serialize_entry(self.max_tokens_field, &self.max_tokens)?;
        if !self.tools.is_empty() {
            map.serialize_entry("tools", &self.tools)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireToolFunction<'a>,
}

#[derive(Serialize)]
struct WireToolFunction<'a> {
    name: &'a str,
    description: &'a str,
    parameters: &'a Value,
}

#[derive(Serialize)]
#[serde(tag = "role", rename_all = "lowercase")]
enum WireMessage<'a> {
    System {
        content: String,
    },
    User {
        content: UserContent<'a>,
    },
    Assistant {
        /// `null` when the message is only tool calls.
        content: Option<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<WireCall<'a>>,
    },
    Tool {
        tool_call_id: &'a str,
        content: Cow<'a, str>,
    },
}

/// Plain text goes as a string: not every compatible server takes parts.
#[derive(Serialize)]
#[serde(untagged)]
enum UserContent<'a> {
    Text(Cow<'a, str>),
    Parts(Vec<UserPart<'a>>),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum UserPart<'a> {
    Text { text: &'a str },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Serialize)]
struct ImageUrl {
    url: String,
}

#[derive(Serialize)]
struct WireCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireCallFunction<'a>,
}

#[derive(Serialize)]
struct WireCallFunction<'a> {
    name: &'a str,
    /// The API wants the input as a JSON string.
    arguments: String,
}

fn messages(request: &ModelRequest) -> Vec<WireMessage<'_>> {
    let mut out = Vec::with_capacity(request.messages.len() + 1);
    let system: Vec<&str> = [request.system_static.as_str(), request.system_dynamic.as_str()]
        .into_iter()
        .filter(|text| !text.is_empty())
        .collect();
    if !system.is_empty() {
        out.push(WireMessage::System { content: system.join("\n\n") });
    }
    for message in &request.messages {
        match message.role {
            Role::User => user_messages(message, &mut out),
            Role::Assistant => {
                let text = message.text();
                let tool_calls: Vec<WireCall<'_>> = message
                    .content
                    .iter()
                    .filter_map(|block| match block {
                        ContentBlock::ToolUse { id, name, input } => Some(WireCall {
                            id,
                            kind: "function",
                            function: WireCallFunction { name, arguments: input.to_string() },
                        }),
                        _ => None,
                    })
                    .collect();
                if text.is_empty() && tool_calls.is_empty() {
                    continue;
                }
                let content = if text.is_empty() { None } else { Some(text) };
                out.push(WireMessage::Assistant { content, tool_calls });
            }
        }
    }
    out
}

fn user_messages<'a>(message: &'a Message, out: &mut Vec<WireMessage<'a>>) {
    let mut parts = Vec::new();
    for block in &message.content {
        match block {
            ContentBlock::ToolResult { tool_use_id, content, is_error } => {
                let content =
                    if *is_error { Cow::Owned(format!("Error: {content}")) } else { Cow::Borrowed(content.as_str()) };
                out.push(WireMessage::Tool { tool_call_id: tool_use_id, content });
            }
            ContentBlock::Text { text } if !text.is_empty() => parts.push(UserPart::Text { text }),
            ContentBlock::Image { media_type, data } => parts
                .push(UserPart::ImageUrl { image_url: ImageUrl { url: format!("data:{media_type};base64,{data}") } }),
            _ => {}
        }
    }
    let content = match parts.as_slice() {
        [] => return,
        [UserPart::Text { text }] => UserContent::Text(Cow::Borrowed(text)),
        _ if parts.iter().all(|p| matches!(p, UserPart::Text { .. })) => {
            let texts: Vec<&str> =
                parts.iter().filter_map(|p| if let UserPart::Text { text } = p { Some(*text) } else { None }).collect();
            UserContent::Text(Cow::Owned(texts.join("\n\n")))
        }
        _ => UserContent::Parts(parts),
    };
    out.push(WireMessage::User { content });
}

#[derive(Debug, Default)]
struct Call {
    id: String,
    name: String,
    arguments: String,
    started: bool,
}

/// Folds chunks into the response, enforcing the size limits.
#[derive(Debug)]
struct Assembler<'o> {
    options: &'o ClientOptions,
    text: String,
    calls: Vec<Call>,
    finish_reason: Option<String>,
    usage: Usage,
    done: bool,
}

fn protocol(message: impl Into<String>) -> ModelError {
    ModelError::protocol(format!("OpenAI stream: {}", message.into()))
}

/// An `{"error": …}` chunk, as vLLM, OpenRouter and others send mid-stream.
fn stream_error(data: &Value) -> ModelError {
    let detail = error_detail(&data.to_string());
    let kind = data["error"]["type"].as_str().or_else(|| data["error"]["code"].as_str()).unwrap_or_default();
    match kind {
        "invalid_request_error" => {
            ModelError::BadRequest { message: format!("OpenAI rejected the request mid-stream ({detail})") }
        }
        "authentication_error" | "invalid_api_key" => status_error(Provider::OpenAi, 401, None, &data.to_string()),
        _ => ModelError::Transient {
            status: None,
            retry_after: None,
            message: format!("OpenAI sent an error mid-stream ({detail})"),
        },
    }
}

impl<'o> Assembler<'o> {
    fn new(options: &'o ClientOptions) -> Self {
        Self {
            options,
            text: String::new(),
            calls: Vec::new(),
            finish_reason: None,
            usage: Usage::default(),
            done: false,
        }
    }

    fn on_event(&mut self, event: &SseEvent, sink: &mut EventSink<'_>) -> Result<Flow, ModelError> {
        if event.data.trim() == "[DONE]" {
            self.done = true;
            return Ok(Flow::Done);
        }
        let data: Value =
            serde_json::from_str(&event.data).map_err(|e| protocol(format!("invalid JSON in a chunk: {e}")))?;
        if data.get("error").is_some_and(|e| !e.is_null()) {
            return Err(stream_error(&data));
        }
        if let Some(usage) = data.get("usage").filter(|u| u.is_object()) {
            let prompt = usage["prompt_tokens"].as_u64().unwrap_or(0);
            let cached = usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
            self.usage = Usage {
                input_tokens: prompt.saturating_sub(cached),
                output_tokens: usage["completion_tokens"].as_u64().unwrap_or(0),
                cache_creation_input_tokens: 0,
                cache_read_input_tokens: cached,
            };
        }
        let choices = data["choices"].as_array().map(Vec::as_slice).unwrap_or_default();
        // We ask for one choice (n = 1); others would be a server's mistake.
        for choice in choices.iter().filter(|c| c["index"].as_u64().unwrap_or(0) == 0) {
            let delta = &choice["delta"];
            if let Some(piece) = delta["content"].as_str().filter(|p| !p.is_empty()) {
                self.text.push_str(piece);
                sink(StreamEvent::TextDelta(piece.to_string()));
            }
            let fragments = delta["tool_calls"].as_array().map(Vec::as_slice).unwrap_or_default();
            for (position, fragment) in fragments.iter().enumerate() {
                self.on_tool_fragment(position, fragment, sink)?;
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                self.finish_reason = Some(reason.to_string());
            }
        }
        Ok(Flow::More)
    }

    /// The first fragment of a call carries its id and name; arguments
    /// accumulate over all of them.
    fn on_tool_fragment(
        &mut self,
        position: usize,
        fragment: &Value,
        sink: &mut EventSink<'_>,
    ) -> Result<(), ModelError> {
        let index = fragment["index"].as_u64().and_then(|i| usize::try_from(i).ok()).unwrap_or(position);
        if index >= self.options.content_blocks_max {
            return Err(protocol(format!("more than {} tool calls", self.options.content_blocks_max)));
        }
        if index >= self.calls.len() {
            self.calls.resize_with(index + 1, Call::default);
        }
        let call = &mut self.calls[index];
        if let Some(id) = fragment["id"].as_str().filter(|id| !id.is_empty())
            && call.id.is_empty()
        {
            call.id = id.to_string();
        }
        let function = &fragment["function"];
        if let Some(name) = function["name"].as_str().filter(|n| !n.is_empty())
            && call.name.is_empty()
        {
            call.name = name.to_string();
        }
        if !call.started && !call.name.is_empty() {
            if call.id.is_empty() {
                call.id = format!("call_{index}");
            }
            call.started = true;
            sink(StreamEvent::ToolUseStart { id: call.id.clone(), name: call.name.clone() });
            if !call.arguments.is_empty() {
                sink(StreamEvent::ToolInputDelta { id: call.id.clone(), partial_json: call.arguments.clone() });
            }
        }
        if let Some(piece) = function["arguments"].as_str().filter(|p| !p.is_empty()) {
            if call.arguments.len() + piece.len() > self.options.tool_input_bytes_max {
                return Err(protocol(format!("tool input exceeds {} bytes", self.options.tool_input_bytes_max)));
            }
            call.arguments.push_str(piece);
            if call.started {
                sink(StreamEvent::ToolInputDelta { id: call.id.clone(), partial_json: piece.to_string() });
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<ModelResponse, ModelError> {
        if !self.done && self.finish_reason.is_none() {
            return Err(ModelError::network("the OpenAI stream ended before [DONE]"));
        }
        let stop_reason = match self.finish_reason.as_deref() {
            Some("length") => StopReason::MaxTokens,
            _ if !self.calls.is_empty() => StopReason::ToolUse,
            Some("stop") | None => StopReason::EndTurn,
            Some("tool_calls" | "function_call") => StopReason::ToolUse,
            Some(other) => StopReason::Other(other.to_string()),
        };
        let mut content = Vec::new();
        if !self.text.is_empty() {
            content.push(ContentBlock::Text { text: self.text });
        }
        for (index, call) in self.calls.into_iter().enumerate() {
            if call.name.is_empty() {
                return Err(protocol(format!("tool call {index} has no function name")));
            }
            match parse_tool_input(&call.arguments) {
                Ok(input) => content.push(ContentBlock::ToolUse { id: call.id, name: call.name, input }),
                // A call cut off by the token limit is incomplete, not malformed: drop it.
                Err(_) if stop_reason == StopReason::MaxTokens => {
                    tracing::warn!(tool = %call.name, "dropping a tool call cut off by the token limit");
                }
                Err(e) => return Err(protocol(e)),
            }
        }
        Ok(ModelResponse { message: Message { role: Role::Assistant, content }, stop_reason, usage: self.usage })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tinyfat_core::message::ToolSpec;

    use super::*;

    fn run(chunks: &[Value]) -> (Result<ModelResponse, ModelError>, Vec<StreamEvent>) {
        let options = ClientOptions { tool_input_bytes_max: 16, content_blocks_max: 2, ..Default::default() };
        let mut assembler = Assembler::new(&options);
        let mut seen = Vec::new();
        let mut sink = |e| seen.push(e);
        for chunk in chunks {
            let event = SseEvent { event: "message".into(), data: chunk.to_string() };
            if let Err(e) = assembler.on_event(&event, &mut sink) {
                return (Err(e), seen);
            }
        }
        (assembler.finish(), seen)
    }

    fn delta(delta: Value, finish: Value) -> Value {
        json!({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    }

    #[test]
    fn tolerates_local_server_quirks() {
        let (response, events) = run(&[
            delta(json!({"tool_calls": [{"function": {"name": "read", "arguments": null}}]}), Value::Null),
            delta(json!({}), json!("stop")),
        ]);
        let response = response.unwrap();
        assert_eq!(response.stop_reason, StopReason::ToolUse, "tool calls win over finish_reason stop");
        assert_eq!(
            response.message.content,
            vec![ContentBlock::ToolUse { id: "call_0".into(), name: "read".into(), input: json!({}) }]
        );
        assert_eq!(events, vec![StreamEvent::ToolUseStart { id: "call_0".into(), name: "read".into() }]);
    }

    #[test]
    fn enforces_limits_and_completeness() {
        let big = delta(
            json!({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "n", "arguments": "x".repeat(17)}}]}),
            Value::Null,
        );
        assert!(run(&[big]).0.unwrap_err().to_string().contains("exceeds 16 bytes"));
        let far = delta(json!({"tool_calls": [{"index": 2, "id": "c", "function": {"name": "n"}}]}), Value::Null);
        assert!(matches!(run(&[far]).0, Err(ModelError::Protocol { .. })));
        let nameless = delta(json!({"tool_calls": [{"index": 0, "id": "c"}]}), json!("tool_calls"));
        assert!(matches!(run(&[nameless]).0, Err(ModelError::Protocol { .. })));
        let (result, _) = run(&[delta(json!({"content": "partial"}), Value::Null)]);
        assert!(result.unwrap_err().is_transient(), "a stream cut before finish_reason and [DONE]");
        let error = json!({"error": {"message": "overloaded", "type": "server_error"}});
        assert!(run(&[error]).0.unwrap_err().is_transient());
    }

    #[test]
    fn calls_texts_and_images_take_the_chat_completions_shape() {
        let request = ModelRequest {
            model: "openai:m".into(),
            system_static: String::new(),
            system_dynamic: String::new(),
            messages: vec![
                Message {
                    role: Role::User,
                    content: vec![ContentBlock::Text { text: "one".into() }, ContentBlock::Text { text: "two".into() }],
                },
                Message {
                    role: Role::Assistant,
                    content: vec![ContentBlock::ToolUse {
                        id: "c1".into(),
                        name: "bash".into(),
                        input: json!({"x": 1}),
                    }],
                },
                Message {
                    role: Role::User,
                    content: vec![
                        ContentBlock::ToolResult { tool_use_id: "c1".into(), content: "ok".into(), is_error: false },
                        ContentBlock::Text { text: "see".into() },
                        ContentBlock::Image { media_type: "image/png".into(), data: "AAAA".into() },
                    ],
                },
                Message { role: Role::Assistant, content: vec![ContentBlock::Text { text: String::new() }] },
            ],
            tools: vec![ToolSpec { name: "bash".into(), description: "d".into(), input_schema: json!({}) }],
            max_tokens: 7,
        };
        let body: Value = serde_json::from_slice(&request_body("m", "max_completion_tokens", &request)).unwrap();
        let expected = json!([
            {"role": "user", "content": "one\n\ntwo"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": "{\"x\":1}"}},
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            {"role": "user", "content": [
                {"type": "text", "text": "see"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ]},
        ]);
        assert_eq!(body["messages"], expected, "no system message, and the empty assistant message is left out");
        assert_eq!(body["max_completion_tokens"], 7);
        assert!(body.get("max_tokens").is_none());
        assert_eq!((&body["stream"], &body["stream_options"]), (&json!(true), &json!({"include_usage": true})));
        let function = json!({"name": "bash", "description": "d", "parameters": {}});
        assert_eq!(body["tools"], json!([{"type": "function", "function": function}]));
    }

    #[test]
    fn system_blocks_join_and_tool_results_come_first() {
        let request = ModelRequest {
            model: "openai:m".into(),
            system_static: "a".into(),
            system_dynamic: "b".into(),
            messages: vec![Message {
                role: Role::User,
                content: vec![
                    ContentBlock::Text { text: "after".into() },
                    ContentBlock::ToolResult { tool_use_id: "c1".into(), content: "boom".into(), is_error: true },
                ],
            }],
            tools: vec![],
            max_tokens: 7,
        };
        let body: Value = serde_json::from_slice(&request_body("m", "max_tokens", &request)).unwrap();
        assert_eq!(body["messages"][0], json!({"role": "system", "content": "a\n\nb"}));
        assert_eq!(body["messages"][1], json!({"role": "tool", "tool_call_id": "c1", "content": "Error: boom"}));
        assert_eq!(body["messages"][2], json!({"role": "user", "content": "after"}));
        assert_eq!(body["max_tokens"], 7);
        assert!(body.get("tools").is_none());
        let official = OpenAiClient::new(HttpClient::new(Default::default()).unwrap(), None, None);
        assert_eq!(official.max_tokens_field, "max_completion_tokens");
        assert_eq!(official.url, "https://api.openai.com/v1/chat/completions");
    }
}
