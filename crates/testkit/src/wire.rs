//! Renders a [`Script`] in one provider's wire format: the event sequence of
//! Anthropic's streaming docs, or OpenAI's `chat.completion.chunk` objects
//! ending in `data: [DONE]`, and each provider's error body. This module is
//! the only place in the testkit that knows those shapes.

use std::time::Duration;

use serde_json::{Value, json};

use crate::script::{Reply, Script, ScriptStop};
use crate::server::Api;

/// A response ready to send: status, extra headers, and the body in frames
/// with `delay` between two frames.
#[derive(Debug)]
pub(crate) struct Rendered {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub frames: Vec<String>,
    pub delay: Duration,
}

/// Context of one request that shapes the answer.
#[derive(Debug)]
pub(crate) struct Call<'a> {
    pub api: Api,
    pub model: &'a str,
    /// OpenAI sends the usage chunk only when asked with `stream_options`.
    pub include_usage: bool,
    /// Makes ids unique per response.
    pub sequence: u64,
}

/// The error body the provider sends with a non-2xx status.
pub(crate) fn error_body(api: Api, error_type: &str, message: &str) -> String {
    match api {
        Api::Anthropic => json!({"type": "error", "error": {"type": error_type, "message": message}}),
        Api::OpenAi => json!({"error": {"message": message, "type": error_type, "param": null, "code": null}}),
    }
    .to_string()
}

pub(crate) fn render(call: &Call<'_>, script: &Script) -> Rendered {
    let stream = |frames: Vec<String>, delay_ms: u64| Rendered {
        status: 200,
        content_type: "text/event-stream",
        headers: vec![("cache-control", "no-cache".to_string())],
        frames,
        delay: Duration::from_millis(delay_ms),
    };
    match script {
        Script::Reply(reply) => stream(
            match call.api {
                Api::Anthropic => anthropic_reply(call, reply),
                Api::OpenAi => openai_reply(call, reply),
            },
            reply.chunk_delay_ms,
        ),
        Script::StreamError { text, error_type, message, chunk_delay_ms } => {
            let reply = Reply { text: text.clone(), ..Default::default() };
            let mut frames = match call.api {
                Api::Anthropic => anthropic_reply(call, &reply),
                Api::OpenAi => openai_reply(call, &reply),
            };
            // Keep what streamed before the failure: message_start, the text
            // block's start, ping and deltas (Anthropic); role and text chunks (OpenAI).
            let keep = match call.api {
                Api::Anthropic => 1 + if text.is_empty() { 1 } else { 2 + text.len() },
                Api::OpenAi => 1 + text.len(),
            };
            frames.truncate(keep);
            frames.push(match call.api {
                Api::Anthropic => {
                    sse_event("error", json!({"type": "error", "error": {"type": error_type, "message": message}}))
                }
                Api::OpenAi => sse_data(&error_body(Api::OpenAi, error_type, message)),
            });
            stream(frames, *chunk_delay_ms)
        }
        Script::Raw { body, chunk_delay_ms } => {
            let frames = if *chunk_delay_ms == 0 {
                vec![body.clone()]
            } else {
                body.split_inclusive("\n\n").map(str::to_string).collect()
            };
            stream(frames, *chunk_delay_ms)
        }
        Script::HttpError(error) => Rendered {
            status: error.status,
            content_type: "application/json",
            headers: error.retry_after.iter().map(|v| ("retry-after", v.clone())).collect(),
            frames: vec![error_body(call.api, &error.error_type, &error.message)],
            delay: Duration::ZERO,
        },
    }
}

fn sse_event(event: &str, data: Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

fn sse_data(data: &str) -> String {
    format!("data: {data}\n\n")
}

fn stop_reason(reply: &Reply) -> ScriptStop {
    reply.stop_reason.unwrap_or(if reply.tool_calls.is_empty() { ScriptStop::EndTurn } else { ScriptStop::ToolUse })
}

/// The sequence of Anthropic's streaming docs: message_start, then per
/// block content_block_start / deltas / content_block_stop (a ping after the
/// first start), message_delta with stop_reason and usage, message_stop.
fn anthropic_reply(call: &Call<'_>, reply: &Reply) -> Vec<String> {
    let usage = &reply.usage;
    let mut frames = vec![sse_event(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": format!("msg_fake{:04}", call.sequence),
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": call.model,
            "stop_reason": null,
            "stop_sequence": null,
            "usage": {
                "input_tokens": usage.input_tokens,
                "cache_creation_input_tokens": usage.cache_creation_input_tokens,
                "cache_read_input_tokens": usage.cache_read_input_tokens,
                "output_tokens": 1,
            },
        }}),
    )];
    let ping = sse_event("ping", json!({"type": "ping"}));
    let mut index = 0;
    if !reply.text.is_empty() {
        frames.push(sse_event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
        ));
        frames.push(ping.clone());
        for text in &reply.text {
            frames.push(sse_event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}),
            ));
        }
        frames.push(sse_event("content_block_stop", json!({"type": "content_block_stop", "index": index})));
        index += 1;
    } else {
        frames.push(ping);
    }
    for tool in &reply.tool_calls {
        frames.push(sse_event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": {
                "type": "tool_use", "id": tool.id, "name": tool.name, "input": {},
            }}),
        ));
        for partial in std::iter::once("").chain(tool.input_deltas.iter().map(String::as_str)) {
            frames.push(sse_event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {
                    "type": "input_json_delta", "partial_json": partial,
                }}),
            ));
        }
        frames.push(sse_event("content_block_stop", json!({"type": "content_block_stop", "index": index})));
        index += 1;
    }
    let stop = match stop_reason(reply) {
        ScriptStop::EndTurn => "end_turn",
        ScriptStop::ToolUse => "tool_use",
        ScriptStop::MaxTokens => "max_tokens",
    };
    frames.push(sse_event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
               "usage": {"output_tokens": usage.output_tokens}}),
    ));
    frames.push(sse_event("message_stop", json!({"type": "message_stop"})));
    frames
}

/// `chat.completion.chunk` objects: the role, text deltas, tool call
/// fragments (id and name in the first one of an index, then arguments),
/// the finish_reason, the usage chunk when asked for, then `[DONE]`.
fn openai_reply(call: &Call<'_>, reply: &Reply) -> Vec<String> {
    let chunk = |choices: Value, usage: Value| {
        let mut chunk = json!({
            "id": format!("chatcmpl-fake{:04}", call.sequence),
            "object": "chat.completion.chunk",
            "created": 1_700_000_000 + call.sequence,
            "model": call.model,
            "system_fingerprint": "fp_fake",
            "choices": choices,
        });
        if call.include_usage {
            chunk["usage"] = usage;
        }
        sse_data(&chunk.to_string())
    };
    let delta = |delta: Value, finish: Value| {
        chunk(json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]), Value::Null)
    };
    let mut frames = vec![delta(json!({"role": "assistant", "content": ""}), Value::Null)];
    for text in &reply.text {
        frames.push(delta(json!({"content": text}), Value::Null));
    }
    for (index, tool) in reply.tool_calls.iter().enumerate() {
        frames.push(delta(
            json!({"tool_calls": [{"index": index, "id": tool.id, "type": "function",
                                   "function": {"name": tool.name, "arguments": ""}}]}),
            Value::Null,
        ));
        for arguments in &tool.input_deltas {
            frames.push(delta(
                json!({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}),
                Value::Null,
            ));
        }
    }
    let finish = match stop_reason(reply) {
        ScriptStop::EndTurn => "stop",
        ScriptStop::ToolUse => "tool_calls",
        ScriptStop::MaxTokens => "length",
    };
    frames.push(delta(json!({}), json!(finish)));
    if call.include_usage {
        let usage = &reply.usage;
        let prompt = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens;
        frames.push(chunk(
            json!([]),
            json!({
                "prompt_tokens": prompt,
                "completion_tokens": usage.output_tokens,
                "total_tokens": prompt + usage.output_tokens,
                "prompt_tokens_details": {"cached_tokens": usage.cache_read_input_tokens},
            }),
        ));
    }
    frames.push(sse_data("[DONE]"));
    frames
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::ToolCall;

    fn call(api: Api) -> Call<'static> {
        Call { api, model: "m", include_usage: true, sequence: 1 }
    }

    fn data_of(frame: &str) -> Value {
        let data = frame.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
        serde_json::from_str(data).unwrap()
    }

    #[test]
    fn anthropic_events_follow_the_documented_order() {
        let reply = Reply {
            text: vec!["Hi".into()],
            tool_calls: vec![ToolCall::new("t", "bash", &["{\"a\":", "1}"])],
            ..Default::default()
        };
        let frames = anthropic_reply(&call(Api::Anthropic), &reply);
        let kinds: Vec<String> = frames.iter().map(|f| data_of(f)["type"].as_str().unwrap().to_string()).collect();
        let expected = [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ];
        assert_eq!(kinds, expected);
        assert!(frames.iter().all(|f| f.starts_with("event: ") && f.ends_with("\n\n")));
        assert_eq!(data_of(&frames[10])["delta"]["stop_reason"], "tool_use");
    }

    #[test]
    fn openai_chunks_end_with_usage_and_done() {
        let frames = openai_reply(&call(Api::OpenAi), &Reply { text: vec!["Hi".into()], ..Default::default() });
        assert_eq!(frames.last().unwrap(), "data: [DONE]\n\n");
        let usage_chunk = data_of(&frames[frames.len() - 2]);
        assert_eq!(usage_chunk["choices"], json!([]));
        assert!(usage_chunk["usage"]["prompt_tokens"].is_u64());
        let first = data_of(&frames[0]);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["usage"], Value::Null);
        let finish = data_of(&frames[2]);
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn stream_errors_cut_in_after_the_text() {
        let script = Script::stream_error(&["a", "b"], "overloaded_error", "Overloaded");
        let rendered = render(&call(Api::Anthropic), &script);
        let last = rendered.frames.last().unwrap();
        assert!(last.starts_with("event: error\n"), "{last}");
        assert_eq!(data_of(&rendered.frames[rendered.frames.len() - 2])["delta"]["text"], "b");
        let rendered = render(&call(Api::OpenAi), &script);
        assert_eq!(data_of(rendered.frames.last().unwrap())["error"]["type"], "overloaded_error");
        assert_eq!(rendered.frames.len(), 4);
    }
}
