//! Shared helpers for the model client tests: clients pointed at a
//! [`FakeModel`], a representative request, and a runner that collects the
//! streamed events next to the result.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tinyfat_core::Secret;
use tinyfat_core::message::{ContentBlock, Message, Role, ToolSpec};
use tinyfat_model::{
    CancelToken, ClientOptions, HttpClient, ModelClient, ModelError, ModelRequest, ModelResponse, ProviderCredentials,
    RetryPolicy, RetryingClient, StreamEvent, build_client,
};
use tinyfat_testkit::FakeModel;

pub const ANTHROPIC_KEY: &str = "sk-ant-test-key";
pub const OPENAI_KEY: &str = "sk-openai-test-key";
/// One model name per provider, for tests that run against both.
pub const MODELS: [&str; 2] = ["claude-test-1", "openai:gpt-test"];

/// Credentials for both providers at the fake. The OpenAI base URL ends in
/// `/v1` on purpose: the client must not double it.
pub fn credentials(fake: &FakeModel) -> ProviderCredentials {
    ProviderCredentials {
        anthropic_key: Some(Secret::new(ANTHROPIC_KEY)),
        anthropic_base_url: Some(fake.base_url()),
        openai_key: Some(Secret::new(OPENAI_KEY)),
        openai_base_url: Some(format!("{}/v1", fake.base_url())),
    }
}

pub fn client(fake: &FakeModel, model: &str) -> Arc<dyn ModelClient> {
    let http = HttpClient::new(ClientOptions::default()).unwrap();
    build_client(model, &credentials(fake), &http).unwrap()
}

/// Retries with a 10 ms base delay, so only a `retry-after` makes a test slow.
pub fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        attempts_max: 4,
        delay_base: Duration::from_millis(10),
        delay_max: Duration::from_secs(5),
        wait_total_max: Duration::from_secs(10),
    }
}

pub fn retrying(fake: &FakeModel, model: &str) -> RetryingClient {
    RetryingClient::new(client(fake, model), fast_policy())
}

/// A request with both system blocks, a tool, and a history that holds a
/// tool call and its result.
pub fn request(model: &str) -> ModelRequest {
    ModelRequest {
        model: model.to_string(),
        system_static: "You are a test agent.".into(),
        system_dynamic: "MEMORY.md: likes tea".into(),
        messages: vec![
            Message::user_text("list my files"),
            Message {
                role: Role::Assistant,
                content: vec![
                    ContentBlock::Text { text: "Looking.".into() },
                    ContentBlock::ToolUse {
                        id: "toolu_1".into(),
                        name: "bash".into(),
                        input: json!({"command": "ls"}),
                    },
                ],
            },
            Message {
                role: Role::User,
                content: vec![ContentBlock::ToolResult {
                    tool_use_id: "toolu_1".into(),
                    content: "notes.md".into(),
                    is_error: false,
                }],
            },
        ],
        tools: vec![ToolSpec {
            name: "bash".into(),
            description: "Run a command".into(),
            input_schema: json!({
                "type": "object",
                "properties": {"command": {"type": "string"}},
                "required": ["command"],
            }),
        }],
        max_tokens: 1024,
    }
}

pub async fn run(
    client: &dyn ModelClient,
    request: &ModelRequest,
) -> (Result<ModelResponse, ModelError>, Vec<StreamEvent>) {
    run_with(client, request, &CancelToken::new()).await
}

pub async fn run_with(
    client: &dyn ModelClient,
    request: &ModelRequest,
    cancel: &CancelToken,
) -> (Result<ModelResponse, ModelError>, Vec<StreamEvent>) {
    let mut events = Vec::new();
    let result = client.stream(request, cancel, &mut |event| events.push(event)).await;
    (result, events)
}

/// The text deltas of a run, in order.
pub fn text_deltas(events: &[StreamEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            StreamEvent::TextDelta(text) => Some(text.clone()),
            _ => None,
        })
        .collect()
}

pub fn restarts(events: &[StreamEvent]) -> usize {
    events.iter().filter(|e| matches!(e, StreamEvent::Restart { .. })).count()
}

/// The concatenated input fragments streamed for tool call `id`.
pub fn streamed_input(events: &[StreamEvent], id: &str) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            StreamEvent::ToolInputDelta { id: call, partial_json } if call == id => Some(partial_json.as_str()),
            _ => None,
        })
        .collect()
}
