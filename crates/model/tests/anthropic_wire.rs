//! What the Anthropic adapter puts on the wire, as the fake server recorded it.

mod common;

use common::*;
use serde_json::json;
use tinyfat_model::ModelError;
use tinyfat_testkit::{Api, FakeModel, Script};

#[tokio::test]
async fn request_carries_key_version_and_cache_breakpoints() {
    let fake = FakeModel::start().await;
    let model = "anthropic:claude-sonnet-test";
    let (result, _) = run(&*client(&fake, model), &request(model)).await;
    assert_eq!(result.unwrap().message.text(), "ok", "the fake's default answer");

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!((sent.api, sent.path.as_str()), (Api::Anthropic, "/v1/messages"));
    assert_eq!(sent.header("x-api-key"), Some(ANTHROPIC_KEY));
    assert_eq!(sent.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(sent.header("content-type"), Some("application/json"));
    assert_eq!(sent.header("authorization"), None);

    let body = &sent.body;
    assert_eq!(body["model"], "claude-sonnet-test", "the anthropic: prefix is stripped");
    assert_eq!(body["stream"], true);
    assert_eq!(body["max_tokens"], 1024);
    let ephemeral = json!({"type": "ephemeral"});
    assert_eq!(
        body["system"],
        json!([
            {"type": "text", "text": "You are a test agent.", "cache_control": ephemeral},
            {"type": "text", "text": "MEMORY.md: likes tea", "cache_control": ephemeral},
        ])
    );
    assert_eq!(
        body["tools"],
        json!([{"name": "bash", "description": "Run a command", "input_schema": request(model).tools[0].input_schema}])
    );
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "list my files"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Looking."},
                {"type": "tool_use", "id": "toolu_1", "name": "bash", "input": {"command": "ls"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "notes.md", "cache_control": ephemeral},
            ]},
        ])
    );
}

#[tokio::test]
async fn an_overlong_tool_input_is_a_protocol_error() {
    let fake = FakeModel::start().await;
    let chunk = "x".repeat(1000);
    let deltas: Vec<&str> =
        std::iter::once("{\"content\": \"").chain(std::iter::repeat_n(chunk.as_str(), 20)).collect();
    fake.push(Script::tool_call("toolu_big", "write", &deltas));
    let options = tinyfat_model::ClientOptions { tool_input_bytes_max: 8 * 1024, ..Default::default() };
    let http = tinyfat_model::HttpClient::new(options).unwrap();
    let client = tinyfat_model::build_client("claude-x", &credentials(&fake), &http).unwrap();
    let (result, _) = run(&*client, &request("claude-x")).await;
    let Err(error @ ModelError::Protocol { .. }) = result else { panic!("{result:?}") };
    assert!(error.to_string().contains("exceeds 8192 bytes"), "{error}");
}
