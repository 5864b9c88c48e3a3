//! The Anthropic Messages API adapter: translates a [`ModelRequest`] into a
//! streaming `POST /v1/messages` and assembles the event stream back into a
//! [`ModelResponse`]. Only this module knows Anthropic's JSON; it does not
//! retry (see `retry`) and does not decide which key to use (see `route`).
//!
//! Prompt caching: both system blocks and the last block of the last message
//! carry `cache_control: {"type": "ephemeral"}`. The cache prefix runs tools →
//! system → messages, so the first breakpoint also covers the tools; the last
//! one lets the next call of a tool loop read the whole history from cache.
//! That is three of the four breakpoints the API allows.

use async_trait::async_trait;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::Serialize;
use serde_json::Value;
use tinyfat_core::Secret;
use tinyfat_core::message::{ContentBlock, Message, Role, ToolSpec, Usage};

use crate::client::parse_tool_input;
use crate::http::{Flow, endpoint, error_detail, status_error};
use crate::sse::SseEvent;
use crate::{
    CancelToken, ClientOptions, EventSink, HttpClient, ModelClient, ModelError, ModelRequest, ModelResponse,
    ModelRoute, Provider, StopReason, StreamEvent,
};

pub const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

#[derive(Debug)]
pub struct AnthropicClient {
    http: HttpClient,
    api_key: Secret,
    url: String,
}

impl AnthropicClient {
    /// `base_url` defaults to [`ANTHROPIC_BASE_URL`]; see [`crate::http`] for
    /// how `/v1` is added.
    pub fn new(http: HttpClient, api_key: Secret, base_url: Option<&str>) -> Self {
        let url = endpoint(base_url.unwrap_or(ANTHROPIC_BASE_URL), "messages");
        Self { http, api_key, url }
    }

    fn headers(&self) -> Result<HeaderMap, ModelError> {
        let mut key = HeaderValue::from_str(self.api_key.expose()).map_err(|_| ModelError::Permanent {
            message: "the Anthropic API key contains characters that cannot be sent: set it again with \
                      `tinyfat secret set NAME anthropic_api_key`"
                .to_string(),
        })?;
        key.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", key);
        headers.insert("anthropic-version", HeaderValue::from_static(ANTHROPIC_VERSION));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(headers)
    }
}

#[async_trait]
impl ModelClient for AnthropicClient {
    async fn stream(
        &self,
        request: &ModelRequest,
        cancel: &CancelToken,
        sink: &mut EventSink<'_>,
    ) -> Result<ModelResponse, ModelError> {
        let route = ModelRoute::parse(&request.model)?;
        if route.provider != Provider::Anthropic {
            return Err(ModelError::Permanent { message: format!("'{}' is not an Anthropic model", request.model) });
        }
        let body = request_body(&route.model, request);
        let response = self.http.post_stream(Provider::Anthropic, &self.url, self.headers()?, body, cancel).await?;
        let mut assembler = Assembler::new(self.http.options());
        self.http.read_events(Provider::Anthropic, response, cancel, |event| assembler.on_event(&event, sink)).await?;
        assembler.finish()
    }
}

/// The JSON body of a streaming Messages API call, serialised straight from
/// the request: the wire structs below borrow every string, so the history
/// is neither copied nor built into a `Value` on its way out.
pub(crate) fn request_body(model: &str, request: &ModelRequest) -> Vec<u8> {
    let system = [&request.system_static, &request.system_dynamic]
        .into_iter()
        .filter(|text| !text.is_empty())
        .map(|text| WireBlock::Text { text, cache_control: Some(EPHEMERAL) })
        .collect();
    let body = WireBody {
        model,
        max_tokens: request.max_tokens,
        stream: true,
        system,
        messages: messages(&request.messages),
        tools: &request.tools,
    };
    serde_json::to_vec(&body).expect("strings and JSON values always serialise")
}

#[derive(Serialize)]
struct WireBody<'a> {
    model: &'a str,
    max_tokens: u32,
    stream: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    system: Vec<WireBlock<'a>>,
    messages: Vec<WireMessage<'a>>,
    /// `ToolSpec` serialises as Anthropic's tool: name, description, input_schema.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tools: &'a [ToolSpec],
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: Vec<WireBlock<'a>>,
}

#[derive(Clone, Copy, Serialize)]
struct CacheControl {
    #[serde(rename = "type")]
    kind: &'static str,
}

const EPHEMERAL: CacheControl = CacheControl { kind: "ephemeral" };

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireBlock<'a> {
    Text {
        text: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<CacheControl>,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: &'a Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<CacheControl>,
    },
    ToolResult {
        tool_use_id: &'a str,
        content: &'a str,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        is_error: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<CacheControl>,
    },
    Image {
        source: ImageSource<'a>,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<CacheControl>,
    },
}

#[derive(Serialize)]
struct ImageSource<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    media_type: &'a str,
    data: &'a str,
}

impl WireBlock<'_> {
    fn mark_cache_breakpoint(&mut self) {
        let (Self::Text { cache_control, .. }
        | Self::ToolUse { cache_control, .. }
        | Self::ToolResult { cache_control, .. }
        | Self::Image { cache_control, .. }) = self;
        *cache_control = Some(EPHEMERAL);
    }
}

/// Core messages in Anthropic's shape. The API rejects empty text blocks and
/// empty messages, so both are left out. The last block of the last message
/// is a cache breakpoint.
fn messages(messages: &[Message]) -> Vec<WireMessage<'_>> {
    let mut out: Vec<WireMessage<'_>> = messages
        .iter()
        .filter_map(|message| {
            let content: Vec<WireBlock<'_>> = message.content.iter().filter_map(block).collect();
            if content.is_empty() {
                return None;
            }
            let role = match message.role {
                Role::User => "user",
                Role::Assistant => "assistant",
            };
            Some(WireMessage { role, content })
        })
        .collect();
    if let Some(last) = out.last_mut().and_then(|m| m.content.last_mut()) {
        last.mark_cache_breakpoint();
    }
    out
}

fn block(block: &ContentBlock) -> Option<WireBlock<'_>> {
    Some(match block {
        ContentBlock::Text { text } if text.is_empty() => return None,
        ContentBlock::Text { text } => WireBlock::Text { text, cache_control: None },
        ContentBlock::ToolUse { id, name, input } => WireBlock::ToolUse { id, name, input, cache_control: None },
        ContentBlock::ToolResult { tool_use_id, content, is_error } => {
            WireBlock::ToolResult { tool_use_id, content, is_error: *is_error, cache_control: None }
        }
        ContentBlock::Image { media_type, data } => {
            WireBlock::Image { source: ImageSource { kind: "base64", media_type, data }, cache_control: None }
        }
    })
}

#[derive(Debug)]
enum Block {
    Text(String),
    Tool {
        id: String,
        name: String,
        json: String,
        initial: Value,
        input: Option<Value>,
    },
    /// Blocks we do not use (thinking, server tools) and index gaps.
    Other,
}

/// Folds stream events into the response, enforcing the size limits.
#[derive(Debug)]
struct Assembler<'o> {
    options: &'o ClientOptions,
    blocks: Vec<Block>,
    usage: Usage,
    stop_reason: Option<String>,
    done: bool,
}

fn protocol(message: impl Into<String>) -> ModelError {
    ModelError::protocol(format!("Anthropic stream: {}", message.into()))
}

fn read_usage(value: &Value, usage: &mut Usage) {
    let fields: [(&str, &mut u64); 4] = [
        ("input_tokens", &mut usage.input_tokens),
        ("output_tokens", &mut usage.output_tokens),
        ("cache_creation_input_tokens", &mut usage.cache_creation_input_tokens),
        ("cache_read_input_tokens", &mut usage.cache_read_input_tokens),
    ];
    for (name, slot) in fields {
        if let Some(n) = value.get(name).and_then(Value::as_u64) {
            *slot = n;
        }
    }
}

/// An `error` event: what the status code would have said, had the error
/// come before the stream started.
fn stream_error(data: &Value) -> ModelError {
    let detail = error_detail(&data.to_string());
    match data["error"]["type"].as_str().unwrap_or_default() {
        "authentication_error" => status_error(Provider::Anthropic, 401, None, &data.to_string()),
        "permission_error" => status_error(Provider::Anthropic, 403, None, &data.to_string()),
        "invalid_request_error" | "request_too_large" => {
            ModelError::BadRequest { message: format!("Anthropic rejected the request mid-stream ({detail})") }
        }
        _ => ModelError::Transient {
            status: None,
            retry_after: None,
            message: format!("Anthropic sent an error mid-stream ({detail})"),
        },
    }
}

impl<'o> Assembler<'o> {
    fn new(options: &'o ClientOptions) -> Self {
        Self { options, blocks: Vec::new(), usage: Usage::default(), stop_reason: None, done: false }
    }

    fn index(&self, data: &Value) -> Result<usize, ModelError> {
        let index = data["index"].as_u64().ok_or_else(|| protocol("a content block event has no index"))?;
        match usize::try_from(index) {
            Ok(index) if index < self.options.content_blocks_max => Ok(index),
            _ => Err(protocol(format!("more than {} content blocks", self.options.content_blocks_max))),
        }
    }

    fn on_event(&mut self, event: &SseEvent, sink: &mut EventSink<'_>) -> Result<Flow, ModelError> {
        let data: Value = serde_json::from_str(&event.data)
            .map_err(|e| protocol(format!("invalid JSON in a '{}' event: {e}", event.event)))?;
        let kind = data["type"].as_str().unwrap_or(&event.event);
        match kind {
            "message_start" => read_usage(&data["message"]["usage"], &mut self.usage),
            "content_block_start" => {
                let index = self.index(&data)?;
                if index < self.blocks.len() && !matches!(self.blocks[index], Block::Other) {
                    return Err(protocol(format!("content block {index} started twice")));
                }
                if index >= self.blocks.len() {
                    self.blocks.resize_with(index + 1, || Block::Other);
                }
                let start = &data["content_block"];
                self.blocks[index] = match start["type"].as_str() {
                    Some("text") => {
                        let text = start["text"].as_str().unwrap_or_default().to_string();
                        if !text.is_empty() {
                            sink(StreamEvent::TextDelta(text.clone()));
                        }
                        Block::Text(text)
                    }
                    Some("tool_use") => {
                        let id = start["id"].as_str().filter(|s| !s.is_empty());
                        let name = start["name"].as_str().filter(|s| !s.is_empty());
                        let (Some(id), Some(name)) = (id, name) else {
                            return Err(protocol("a tool_use block lacks its id or name"));
                        };
                        sink(StreamEvent::ToolUseStart { id: id.to_string(), name: name.to_string() });
                        Block::Tool {
                            id: id.to_string(),
                            name: name.to_string(),
                            json: String::new(),
                            initial: start["input"].clone(),
                            input: None,
                        }
                    }
                    _ => Block::Other,
                };
            }
            "content_block_delta" => {
                let index = self.index(&data)?;
                let block =
                    self.blocks.get_mut(index).ok_or_else(|| protocol(format!("delta for unknown block {index}")))?;
                let delta = &data["delta"];
                match (delta["type"].as_str(), block) {
                    (Some("text_delta"), Block::Text(text)) => {
                        let piece = delta["text"].as_str().unwrap_or_default();
                        if !piece.is_empty() {
                            text.push_str(piece);
                            sink(StreamEvent::TextDelta(piece.to_string()));
                        }
                    }
                    (Some("input_json_delta"), Block::Tool { id, json, input: None, .. }) => {
                        let piece = delta["partial_json"].as_str().unwrap_or_default();
                        if json.len() + piece.len() > self.options.tool_input_bytes_max {
                            return Err(protocol(format!(
                                "tool input exceeds {} bytes",
                                self.options.tool_input_bytes_max
                            )));
                        }
                        if !piece.is_empty() {
                            json.push_str(piece);
                            sink(StreamEvent::ToolInputDelta { id: id.clone(), partial_json: piece.to_string() });
                        }
                    }
                    (Some("text_delta" | "input_json_delta"), _) => {
                        return Err(protocol(format!("delta does not fit content block {index}")));
                    }
                    // thinking, signature and citation deltas are not used.
                    _ => {}
                }
            }
            "content_block_stop" => {
                let index = self.index(&data)?;
                if let Some(Block::Tool { json, initial, input, .. }) = self.blocks.get_mut(index) {
                    *input = Some(finish_input(json, initial)?);
                }
            }
            "message_delta" => {
                if let Some(reason) = data["delta"]["stop_reason"].as_str() {
                    self.stop_reason = Some(reason.to_string());
                }
                read_usage(&data["usage"], &mut self.usage);
            }
            "message_stop" => {
                self.done = true;
                return Ok(Flow::Done);
            }
            "error" => return Err(stream_error(&data)),
            // `ping` and event types added after this was written.
            _ => {}
        }
        Ok(Flow::More)
    }

    fn finish(self) -> Result<ModelResponse, ModelError> {
        if !self.done {
            return Err(ModelError::network("the Anthropic stream ended before message_stop"));
        }
        let stop_reason = match self.stop_reason.as_deref() {
            Some("end_turn") => StopReason::EndTurn,
            Some("tool_use") => StopReason::ToolUse,
            Some("max_tokens") => StopReason::MaxTokens,
            Some(other) => StopReason::Other(other.to_string()),
            None if self.blocks.iter().any(|b| matches!(b, Block::Tool { .. })) => StopReason::ToolUse,
            None => StopReason::EndTurn,
        };
        let mut content = Vec::new();
        for block in self.blocks {
            match block {
                Block::Text(text) if !text.is_empty() => content.push(ContentBlock::Text { text }),
                Block::Tool { id, name, json, initial, input } => {
                    let input = match input.map(Ok).unwrap_or_else(|| finish_input(&json, &initial)) {
                        Ok(input) => input,
                        // A tool call cut off by max_tokens is incomplete, not malformed: drop it.
                        Err(_) if stop_reason == StopReason::MaxTokens => {
                            tracing::warn!(tool = %name, "dropping a tool call cut off by max_tokens");
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    content.push(ContentBlock::ToolUse { id, name, input });
                }
                _ => {}
            }
        }
        Ok(ModelResponse { message: Message { role: Role::Assistant, content }, stop_reason, usage: self.usage })
    }
}

/// The input of a finished tool_use block: the streamed JSON, or the input
/// given in `content_block_start` when nothing streamed.
fn finish_input(json: &str, initial: &Value) -> Result<Value, ModelError> {
    if json.is_empty() && initial.as_object().is_some_and(|o| !o.is_empty()) {
        return Ok(initial.clone());
    }
    parse_tool_input(json).map_err(protocol)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn request() -> ModelRequest {
        ModelRequest {
            model: "claude-x".into(),
            system_static: "static".into(),
            system_dynamic: String::new(),
            messages: vec![
                Message::user_text("hi"),
                Message { role: Role::Assistant, content: vec![ContentBlock::Text { text: String::new() }] },
                Message {
                    role: Role::User,
                    content: vec![ContentBlock::Image { media_type: "image/png".into(), data: "AAAA".into() }],
                },
            ],
            tools: vec![ToolSpec {
                name: "t".into(),
                description: "d".into(),
                input_schema: json!({"type": "object"}),
            }],
            max_tokens: 10,
        }
    }

    #[test]
    fn body_skips_empty_parts_and_marks_cache_breakpoints() {
        let body: Value = serde_json::from_slice(&request_body("claude-x", &request())).unwrap();
        assert_eq!(body["system"].as_array().unwrap().len(), 1, "the empty dynamic block is left out");
        assert_eq!(body["system"][0]["cache_control"], json!({"type": "ephemeral"}));
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 2, "the empty assistant message is left out");
        assert!(messages[0]["content"][0].get("cache_control").is_none());
        assert_eq!(messages[1]["content"][0]["source"]["type"], "base64");
        assert_eq!(messages[1]["content"][0]["cache_control"], json!({"type": "ephemeral"}));
        assert_eq!(body["tools"][0]["input_schema"], json!({"type": "object"}));
    }

    #[test]
    fn body_carries_tool_calls_results_and_the_error_flag() {
        let mut request = request();
        request.system_static = String::new();
        request.tools.clear();
        request.messages = vec![
            Message {
                role: Role::Assistant,
                content: vec![ContentBlock::ToolUse { id: "t1".into(), name: "bash".into(), input: json!({"x": 1}) }],
            },
            Message {
                role: Role::User,
                content: vec![
                    ContentBlock::ToolResult { tool_use_id: "t1".into(), content: "no".into(), is_error: true },
                    ContentBlock::ToolResult { tool_use_id: "t2".into(), content: "ok".into(), is_error: false },
                ],
            },
        ];
        let body: Value = serde_json::from_slice(&request_body("claude-x", &request)).unwrap();
        let ephemeral = json!({"type": "ephemeral"});
        let expected = json!({
            "model": "claude-x", "max_tokens": 10, "stream": true,
            "messages": [
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "bash", "input": {"x": 1}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "no", "is_error": true},
                    {"type": "tool_result", "tool_use_id": "t2", "content": "ok", "cache_control": ephemeral},
                ]},
            ],
        });
        assert_eq!(body, expected, "no system or tools keys when both are empty");
    }

    fn run(events: &[(&str, Value)]) -> (Result<ModelResponse, ModelError>, Vec<StreamEvent>) {
        let options = ClientOptions { tool_input_bytes_max: 32, content_blocks_max: 4, ..Default::default() };
        let mut assembler = Assembler::new(&options);
        let mut seen = Vec::new();
        let mut sink = |e| seen.push(e);
        for (event, data) in events {
            let event = SseEvent { event: event.to_string(), data: data.to_string() };
            if let Err(e) = assembler.on_event(&event, &mut sink) {
                return (Err(e), seen);
            }
        }
        (assembler.finish(), seen)
    }

    fn tool_start(index: usize, id: &str) -> (&'static str, Value) {
        let block = json!({"type": "tool_use", "id": id, "name": "n", "input": {}});
        ("content_block_start", json!({"type": "content_block_start", "index": index, "content_block": block}))
    }

    fn json_delta(index: usize, partial: &str) -> (&'static str, Value) {
        let delta = json!({"type": "input_json_delta", "partial_json": partial});
        ("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": delta}))
    }

    fn message_delta(stop_reason: &str, output_tokens: u64) -> (&'static str, Value) {
        let delta = json!({"stop_reason": stop_reason});
        ("message_delta", json!({"type": "message_delta", "delta": delta, "usage": {"output_tokens": output_tokens}}))
    }

    #[test]
    fn assembles_blocks_in_index_order() {
        let thinking = json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking"}});
        let (response, events) = run(&[
            ("message_start", json!({"type": "message_start", "message": {"usage": {"input_tokens": 5}}})),
            ("content_block_start", thinking),
            tool_start(1, "a"),
            ("content_block_stop", json!({"type": "content_block_stop", "index": 1})),
            message_delta("tool_use", 3),
            ("message_stop", json!({"type": "message_stop"})),
        ]);
        let response = response.unwrap();
        assert_eq!(
            response.message.content,
            vec![ContentBlock::ToolUse { id: "a".into(), name: "n".into(), input: json!({}) }]
        );
        assert_eq!((response.usage.input_tokens, response.usage.output_tokens), (5, 3));
        assert_eq!(events, vec![StreamEvent::ToolUseStart { id: "a".into(), name: "n".into() }]);
    }

    #[test]
    fn enforces_limits_and_shape() {
        let (result, _) = run(&[tool_start(0, "a"), json_delta(0, &"x".repeat(33))]);
        assert!(result.unwrap_err().to_string().contains("tool input exceeds 32 bytes"));
        let far = json!({"type": "content_block_start", "index": 4, "content_block": {"type": "text", "text": ""}});
        assert!(matches!(run(&[("content_block_start", far)]).0, Err(ModelError::Protocol { .. })));
        let text = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}});
        let (result, _) = run(&[tool_start(0, "a"), ("content_block_delta", text)]);
        assert!(matches!(result, Err(ModelError::Protocol { .. })), "a text delta into a tool block");
        let (result, _) = run(&[("ping", json!({"type": "ping"}))]);
        assert!(result.unwrap_err().is_transient(), "a stream without message_stop is cut short");
    }

    #[test]
    fn a_tool_call_cut_off_by_max_tokens_is_dropped() {
        let (response, _) = run(&[
            tool_start(0, "a"),
            json_delta(0, "{\"x\": "),
            message_delta("max_tokens", 9),
            ("message_stop", json!({"type": "message_stop"})),
        ]);
        let response = response.unwrap();
        assert_eq!(response.stop_reason, StopReason::MaxTokens);
        assert!(response.message.content.is_empty());
    }

    #[test]
    fn error_events_map_to_decisions() {
        let error = |kind: &str| json!({"type": "error", "error": {"type": kind, "message": "m"}});
        assert!(run(&[("error", error("overloaded_error"))]).0.unwrap_err().is_transient());
        assert!(run(&[("error", error("api_error"))]).0.unwrap_err().is_transient());
        assert!(matches!(run(&[("error", error("invalid_request_error"))]).0, Err(ModelError::BadRequest { .. })));
        assert!(matches!(run(&[("error", error("authentication_error"))]).0, Err(ModelError::Permanent { .. })));
    }
}
